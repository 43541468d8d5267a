//! Value pools, JSON-escaped once so the hot path only copies bytes.

use std::sync::LazyLock;

/// Event names, in the order the first events of every day use them.
const NAMES: [&str; 8] = [
    "Page Viewed",
    "Signed Up",
    "Purchase",
    "App Open",
    "Ünïcode Évent 🎉",
    "$mp_web_page_view",
    "Button \"Clicked\"",
    "Logged Out",
];

/// Relative frequency of each name in `NAMES`.
pub(crate) const NAME_WEIGHTS: [u32; 8] = [35, 8, 10, 15, 5, 15, 10, 2];

const CITIES: [(&str, &str); 10] = [
    ("San Francisco", "US"),
    ("New York", "US"),
    ("London", "GB"),
    ("São Paulo", "BR"),
    ("Zürich", "CH"),
    ("東京", "JP"),
    ("Kraków", "PL"),
    ("Montréal", "CA"),
    ("Reykjavík", "IS"),
    ("Mumbai", "IN"),
];

const LIBS: [(&str, &str); 6] = [
    ("web", "2.49.0"),
    ("iphone", "5.0.3"),
    ("android", "7.3.1"),
    ("python", "4.10.1"),
    ("node", "0.18.0"),
    ("ruby", "2.3.1"),
];

const OSES: [&str; 5] = ["Mac OS X", "Windows", "Linux", "Chrome OS", "iOS"];
const BROWSERS: [&str; 6] = [
    "Chrome",
    "Safari",
    "Firefox",
    "Mobile Safari",
    "Microsoft Edge",
    "Samsung Internet",
];
const PATHS: [&str; 8] = [
    "/",
    "/pricing",
    "/docs/getting-started",
    "/blog/2024/ünïcode-urls",
    "/search/\"quoted\"",
    "/checkout/cart",
    "/account/settings",
    "/a\\b/c",
];
const TITLES: [&str; 7] = [
    "Home",
    "Pricing — Plans & Prices",
    "Ünïcode Tïtle 🎉",
    "日本語のページ",
    "Quote \"this\" page",
    "Back\\slash\\path",
    "Tab\tand\nnewline",
];
const MESSAGES: [&str; 7] = [
    "héllo wörld 👋",
    "emoji: 🎉🚀✨👩‍👩‍👧",
    "Ωμέγα λόγος",
    "مرحبا بالعالم",
    "line one\nline two\r\nline three",
    "bell \u{7} nul \u{0} esc \u{1b} del \u{7f}",
    "zero\u{200b}width and \u{2028} separator",
];
const PLANS: [&str; 4] = ["free", "starter", "pro", "enterprise"];
const CURRENCIES: [&str; 5] = ["USD", "EUR", "JPY", "GBP", "BRL"];

/// Distinct ids with slashes, spaces, unicode, escapes; the first two are forced each day.
const SPECIAL_IDS: [&str; 11] = [
    "org/team 42/user",
    "Zoë Ümlaut 🚀",
    "first last",
    "quote\"d id",
    "back\\slash",
    "tab\tid",
    "  padded  ",
    "ユーザー/東京",
    "a:b:c",
    "$device:weird/id",
    "",
];

/// Raw JSON `"key":value` fragments covering every awkward JSON shape.
const WEIRD: [&str; 31] = [
    r#""note":"He said \"hello\" and \\ left""#,
    r#""multiline":"line1\nline2\r\nline3\tend""#,
    r#""control_chars":"nul\u0000 soh\u0001 us\u001f del\u007f \b\f""#,
    r#""escaped_unicode":"caf\u00e9 \ud83c\udf89 \u4e2d\u6587 \u00DF""#,
    r#""raw_unicode":"café 🎉 中文 Ωμέγα 👩‍💻""#,
    r#""escaped_slash":"a\/b\/c""#,
    r#""big_int":9007199254740993"#,
    r#""i64_min":-9223372036854775808"#,
    r#""u64_max":18446744073709551615"#,
    r#""negative":-42"#,
    r#""pi":3.14159"#,
    r#""tiny":1e-7"#,
    r#""neg_half":-0.5"#,
    r#""avogadro":6.02e23"#,
    r#""zero":0"#,
    r#""empty_string":"""#,
    r#""empty_object":{}"#,
    r#""empty_array":[]"#,
    r#""nested":{"level1":{"level2":{"level3":[1,"two",3.5,null,true,{"deep":[]}]}},"sibling":null}"#,
    r#""mixed_array":[1,-2,"three",null,false,[4,[5]],{"k":"v"}]"#,
    r#""null_value":null"#,
    r#""flag_true":true"#,
    r#""flag_false":false"#,
    r#""price$usd":19.99"#,
    r#""$custom_dollar":"leading dollar becomes mp_reserved_""#,
    r#""key with spaces":"value with spaces""#,
    r#""ключ":"значение""#,
    r#""emoji_🎉_key":"🎉""#,
    r#""html":"<script>alert('x')</script> &amp; </div>""#,
    r#""tab\tkey":"a key with an escape""#,
    r#""list_of_objects":[{"id":1,"tags":["a","b"]},{"id":2,"tags":[]},{"id":3.25,"tags":null}]"#,
];

/// The escaped pools.
pub(crate) struct Templates {
    pub names: Vec<&'static str>,
    pub names_json: Vec<Vec<u8>>,
    pub cities: Vec<Vec<u8>>,
    pub countries: Vec<Vec<u8>>,
    pub libs: Vec<Vec<u8>>,
    pub lib_versions: Vec<&'static [u8]>,
    pub oses: Vec<Vec<u8>>,
    pub browsers: Vec<Vec<u8>>,
    /// Escaped without quotes: spliced into a URL string.
    pub paths: Vec<Vec<u8>>,
    pub titles: Vec<Vec<u8>>,
    pub messages: Vec<Vec<u8>>,
    pub plans: Vec<Vec<u8>>,
    pub currencies: Vec<Vec<u8>>,
    pub special_ids: Vec<Vec<u8>>,
    pub weird: Vec<Vec<u8>>,
}

fn q(s: &str) -> Vec<u8> {
    // Serializing a &str to JSON cannot fail.
    serde_json::to_vec(s).unwrap_or_default()
}

fn all(list: &[&str]) -> Vec<Vec<u8>> {
    list.iter().map(|s| q(s)).collect()
}

/// The pools, built on first use.
pub(crate) static TEMPLATES: LazyLock<Templates> = LazyLock::new(|| {
    let mut weird: Vec<Vec<u8>> = WEIRD.iter().map(|s| s.as_bytes().to_vec()).collect();
    // One long value: parsers with small line buffers must cope.
    weird.push(
        format!(
            "\"long_text\":\"{}\"",
            "lorem ipsum ünïcode 🎉 ".repeat(120)
        )
        .into_bytes(),
    );
    Templates {
        names: NAMES.to_vec(),
        names_json: all(&NAMES),
        cities: CITIES.iter().map(|(c, _)| q(c)).collect(),
        countries: CITIES.iter().map(|(_, c)| q(c)).collect(),
        libs: LIBS.iter().map(|(l, _)| q(l)).collect(),
        lib_versions: LIBS.iter().map(|(_, v)| v.as_bytes()).collect(),
        oses: all(&OSES),
        browsers: all(&BROWSERS),
        paths: PATHS
            .iter()
            .map(|p| q(p)[1..q(p).len() - 1].to_vec())
            .collect(),
        titles: all(&TITLES),
        messages: all(&MESSAGES),
        plans: all(&PLANS),
        currencies: all(&CURRENCIES),
        special_ids: all(&SPECIAL_IDS),
        weird,
    }
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weird_fragments_are_valid_json() {
        for w in &TEMPLATES.weird {
            let obj = format!("{{{}}}", String::from_utf8_lossy(w));
            serde_json::from_str::<serde_json::Value>(&obj)
                .unwrap_or_else(|e| panic!("{obj}: {e}"));
        }
    }
}
