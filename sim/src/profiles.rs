//! User profiles (`engage`) and cohort membership: pure functions of (seed, index), so a page
//! of any listing costs O(page) whatever the number of profiles. A profile mutated while the
//! simulator runs is its base profile with a [`Change`] applied (see `crate::engage`).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use serde_json::{Map, Value};

use crate::r#gen::{Rng, civil, hash4, mix, push_decimal, push_u64, write_uuid};
use crate::templates::TEMPLATES;

const S_PROFILE: u64 = 0x5EED_0101;
const S_PROFILE_ID: u64 = 0x5EED_0102;
const S_COHORT: u64 = 0x5EED_0103;
const S_UPDATE: u64 = 0x5EED_0104;

const FIRST_NAMES: [&str; 12] = [
    "Zoë",
    "José",
    "Ahmed",
    "李",
    "Ólafur",
    "Mary-Jane",
    "D'Angelo",
    "Björk",
    "Nguyễn",
    "Søren",
    "Amélie",
    "Олег",
];
const LAST_NAMES: [&str; 10] = [
    "O'Brien",
    "Müller",
    "García-López",
    "王",
    "Þórsson",
    "van der Berg",
    "Smith",
    "Nakamura 中村",
    "Kowalczyk",
    "Ødegård",
];
const TIMEZONES: [&str; 7] = [
    "America/Los_Angeles",
    "Europe/Berlin",
    "Asia/Tokyo",
    "America/Sao_Paulo",
    "Asia/Kolkata",
    "Australia/Sydney",
    "UTC",
];
const TAGS: [&str; 7] = [
    "beta",
    "vip",
    "ünïcode",
    "emoji 🎉",
    "with,comma",
    "quote\"d",
    "new\nline",
];
const BIOS: [&str; 7] = [
    "Loves \"quotes\" and \\backslashes\\",
    "Line one\nLine two\r\nLine three",
    "Emoji: 👩‍💻🚀✨",
    "日本語の自己紹介",
    "Tab\tseparated\tvalues",
    "<b>html</b> & entities &amp;",
    "",
];
const NICKNAMES: [&str; 4] = ["🦄", "The \"Boss\"", "ñandú", "x\u{200b}y"];
const STREETS: [&str; 4] = [
    "1 Infinite Loop",
    "Rua Augusta, 1500 — apto 12",
    "221B Baker St.",
    "東京都千代田区1-1",
];

/// One `$properties` entry, as written on the wire.
pub(crate) struct Field {
    /// The decoded key.
    pub key: Cow<'static, str>,
    /// The key as written: a JSON string with its quotes (possibly with unusual escapes).
    pub key_json: Cow<'static, [u8]>,
    /// The raw JSON value.
    pub value: Vec<u8>,
}

/// One user profile.
pub(crate) struct Profile {
    pub distinct_id: String,
    /// The distinct id is sent as a JSON integer (it is all digits).
    pub integer_id: bool,
    /// Without properties, the profile is sent without `$properties`.
    pub omit_empty: bool,
    pub fields: Vec<Field>,
}

impl Profile {
    /// The distinct id as sent: a string, or an integer.
    pub(crate) fn distinct_value(&self) -> Value {
        match self.distinct_id.parse::<u64>() {
            Ok(n) if self.integer_id => Value::from(n),
            _ => Value::String(self.distinct_id.clone()),
        }
    }

    /// Appends `{"$distinct_id":...,"$properties":{...}}`, keeping only `keep` keys if given.
    pub(crate) fn write(&self, buf: &mut Vec<u8>, keep: Option<&HashSet<String>>) {
        buf.extend_from_slice(b"{\"$distinct_id\":");
        if self.integer_id {
            buf.extend_from_slice(self.distinct_id.as_bytes());
        } else {
            buf.extend_from_slice(&json_str(&self.distinct_id));
        }
        if self.omit_empty && self.fields.is_empty() {
            buf.push(b'}');
            return;
        }
        buf.extend_from_slice(b",\"$properties\":{");
        let mut first = true;
        for f in &self.fields {
            if keep.is_some_and(|k| !k.contains(f.key.as_ref())) {
                continue;
            }
            if !first {
                buf.push(b',');
            }
            first = false;
            buf.extend_from_slice(&f.key_json);
            buf.push(b':');
            buf.extend_from_slice(&f.value);
        }
        buf.extend_from_slice(b"}}");
    }

    /// The engage table row: `distinct_id` then every property, `$` → `mp_reserved_`.
    pub(crate) fn row(&self) -> Value {
        let mut row = Map::new();
        row.insert("distinct_id".into(), self.distinct_value());
        for f in &self.fields {
            let v: Value = serde_json::from_slice(&f.value).unwrap_or_else(|e| {
                panic!(
                    "mixpanel-sim generated an invalid profile value ({e}): {:?}",
                    String::from_utf8_lossy(&f.value)
                )
            });
            // A property named like the row's own key is written beside it, renamed.
            let k = match f.key.strip_prefix('$') {
                Some(rest) => format!("mp_reserved_{rest}"),
                None if f.key == "distinct_id" => "distinct_id__2".to_string(),
                None => f.key.to_string(),
            };
            row.insert(k, v);
        }
        Value::Object(row)
    }
}

/// A profile's mutations since it was generated (an update, or being added while running).
#[derive(Clone, Debug, Default)]
pub(crate) struct Change {
    /// Number of updates: version `v > 0` changes `plan`, `login_count` and (when present)
    /// `Total Spent` and `is_paying`, deterministically in (seed, index, v).
    pub version: u32,
    /// `$last_seen` as last set (`YYYY-MM-DDTHH:MM:SS`, UTC); `None`: the base value stands.
    pub last_seen: Option<String>,
}

impl Profile {
    /// Sets `key` to the raw JSON `value`, in place or appended.
    fn set(&mut self, key: &'static str, value: Vec<u8>) {
        match self.fields.iter_mut().find(|f| f.key == key) {
            Some(f) => f.value = value,
            None => self.fields.push(Field {
                key: Cow::Borrowed(key),
                key_json: Cow::Owned(json_str(key)),
                value,
            }),
        }
    }

    /// The raw JSON value of a top-level property.
    pub(crate) fn property(&self, key: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|f| f.key == key)
            .map(|f| f.value.as_slice())
    }

    /// Applies `c` to base profile `i`.
    fn apply(&mut self, seed: u64, i: u64, c: &Change) {
        if c.version > 0 {
            let v = u64::from(c.version);
            let h = hash4(seed, S_UPDATE, v as i64, i);
            let plans = &TEMPLATES.plans;
            self.set("plan", plans[(h % plans.len() as u64) as usize].clone());
            // Strictly increasing in the version: every update changes it.
            let base = self
                .property("login_count")
                .and_then(|b| std::str::from_utf8(b).ok()?.parse::<u64>().ok())
                .unwrap_or(0);
            let mut logins = Vec::new();
            push_u64(&mut logins, base + 3 * v + (h >> 16) % 3);
            self.set("login_count", logins);
            if self.property("Total Spent").is_some() {
                let cents = 100 + (h >> 24) % 1_000_000;
                let mut spent = Vec::new();
                push_decimal(&mut spent, cents, 100);
                self.set("Total Spent", spent);
                self.set("is_paying", b"true".to_vec());
            }
        }
        if let Some(seen) = &c.last_seen {
            self.set("$last_seen", json_str(seen));
        }
    }
}

/// See [`Profiles::head`].
struct Head {
    r: Rng,
    kind: u8,
    forced_weird: Option<usize>,
    span: u64,
    seen_day: i64,
    seen_secs: u64,
}

fn json_str(s: &str) -> Vec<u8> {
    // Serializing a &str cannot fail.
    serde_json::to_vec(s).unwrap_or_default()
}

/// (decoded key, key as written, raw value) of a JSON member.
type RawMember = (String, Vec<u8>, Vec<u8>);

/// The adversarial export fragments split into members.
static WEIRD_FIELDS: LazyLock<Vec<RawMember>> = LazyLock::new(|| {
    TEMPLATES
        .weird
        .iter()
        .map(|frag| {
            // The key is a JSON string: it ends at the first quote not escaped.
            let mut i = 1;
            while frag[i] != b'"' {
                i += if frag[i] == b'\\' { 2 } else { 1 };
            }
            let key_json = frag[..=i].to_vec();
            let key: String = serde_json::from_slice(&key_json).unwrap_or_default();
            (key, key_json, frag[i + 2..].to_vec())
        })
        .collect()
});

/// `YYYY-MM-DDTHH:MM:SS` (Mixpanel's profile datetime format, no zone).
fn datetime(day: i64, secs: u64) -> String {
    let (y, m, d) = civil(day);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// The profiles of a project.
pub(crate) struct Profiles {
    seed: u64,
    /// Number of profiles.
    pub n: u64,
    first: i64,
    last: i64,
    /// Numeric distinct ids are sent as integers.
    integer_ids: bool,
    /// Profiles without properties are sent without `$properties`.
    omit_empty: bool,
    /// Every fourth profile has a property named `distinct_id` (see `column_collisions`).
    collisions: bool,
}

impl Profiles {
    pub(crate) fn new(seed: u64, n: u64, first: i64, last: i64) -> Profiles {
        Profiles {
            seed,
            n,
            first,
            last: last.max(first),
            integer_ids: false,
            omit_empty: false,
            collisions: false,
        }
    }

    /// Profiles whose properties collide with the row's own key (`column_collisions`).
    pub(crate) fn with_collisions(mut self, collisions: bool) -> Profiles {
        self.collisions = collisions;
        self
    }

    /// The same profiles in other wire shapes Mixpanel has: integer distinct ids, profiles
    /// without `$properties`.
    pub(crate) fn with_shapes(mut self, integer_ids: bool, omit_empty: bool) -> Profiles {
        self.integer_ids = integer_ids;
        self.omit_empty = omit_empty;
        self
    }

    /// The distinct id of profile `i`: unique (every form embeds `i`).
    fn distinct_id(&self, i: u64) -> String {
        let h = hash4(self.seed, S_PROFILE_ID, 0, i);
        let form = if i < 12 {
            i
        } else {
            match h % 100 {
                0..=54 => 0,
                55..=74 => 1,
                75..=86 => 2,
                87..=92 => 3,
                _ => 4 + mix(h) % 8,
            }
        };
        // The low 32 bits of the second uuid half are a bijection of the index: uuids never
        // collide (for up to 2^32 profiles) yet look random.
        let scrambled = (i as u32).wrapping_mul(0x9E37_79B1) ^ (mix(self.seed) as u32);
        let low = |x: u64| (x & !0xFFFF_FFFF) | scrambled as u64;
        let uuid = |a: u64, b: u64| {
            let mut buf = Vec::with_capacity(36);
            write_uuid(&mut buf, a, low(b));
            String::from_utf8(buf).unwrap_or_default()
        };
        match form {
            0 => uuid(mix(h), mix(h ^ 1)),
            1 => format!("user_{i}@example.com"),
            2 => format!("$device:{}", uuid(mix(h ^ 2), mix(h ^ 3))),
            3 => (1_000_000 + i).to_string(),
            4 => format!("org/team {i}/user"),
            5 => format!("Zoë Ümlaut 🚀 {i}"),
            6 => format!("ユーザー/東京/{i}"),
            7 => format!("quote\"d id {i}"),
            8 => format!("back\\slash\\{i}"),
            9 => format!("  padded {i}  "),
            10 => format!("tab\tid {i}"),
            _ => format!("a:b:{i}"),
        }
    }

    /// The draws every profile starts with, in order: its kind and its `$last_seen`. Shared by
    /// [`Profiles::get`] and [`Profiles::base_last_seen`], so the two never disagree.
    fn head(&self, i: u64) -> Head {
        let mut r = Rng::new(hash4(self.seed, S_PROFILE, 0, i));
        // Profiles 0..10 and 12.. each carry one adversarial fragment, all of them in turn.
        let forced_weird = match i {
            0..10 => Some(i as usize),
            10 | 11 => None,
            _ => Some(i as usize - 2).filter(|k| *k < WEIRD_FIELDS.len()),
        };
        let kind = if i == 11 || (i > 11 && i % 997 == 11) {
            // A profile without any property.
            0
        } else if i == 10 || (forced_weird.is_none() && i > 11 && r.chance(40)) {
            // Sparse: only a few reserved properties.
            1
        } else {
            2
        };
        let span = (self.last - self.first + 1) as u64;
        let seen_day = self.first + r.below(span) as i64;
        let seen_secs = r.below(86_400);
        Head {
            r,
            kind,
            forced_weird,
            span,
            seen_day,
            seen_secs,
        }
    }

    /// The `$last_seen` of base profile `i` (`None`: it has none), without generating the rest
    /// of the profile: what a `where` on `$last_seen` reads.
    pub(crate) fn base_last_seen(&self, i: u64) -> Option<String> {
        let h = self.head(i);
        (h.kind != 0).then(|| datetime(h.seen_day, h.seen_secs))
    }

    /// The distinct id of profile `i` as sent: a string, or an integer.
    pub(crate) fn id_value(&self, i: u64) -> Value {
        let id = self.distinct_id(i);
        match id.parse::<u64>() {
            Ok(n) if self.integer_ids && id.bytes().all(|b| b.is_ascii_digit()) => Value::from(n),
            _ => Value::String(id),
        }
    }

    /// Profile `i` at its current version: the base profile with `change` applied (see
    /// [`Change`]).
    pub(crate) fn at(&self, i: u64, change: Option<&Change>) -> Profile {
        let mut p = self.get(i);
        if let Some(c) = change {
            p.apply(self.seed, i, c);
        }
        p
    }

    /// Profile `i` (0-based, in the listing's stable order), as first generated.
    pub(crate) fn get(&self, i: u64) -> Profile {
        let t = &*TEMPLATES;
        let Head {
            mut r,
            kind,
            forced_weird,
            span,
            seen_day,
            seen_secs,
        } = self.head(i);
        let mut fields: Vec<Field> = Vec::with_capacity(28);
        let mut add = |key: &'static str, value: Vec<u8>| {
            fields.push(Field {
                key: Cow::Borrowed(key),
                key_json: Cow::Owned(json_str(key)),
                value,
            })
        };
        let w = &*WEIRD_FIELDS;
        // The first profiles carry every optional property.
        let forced = i < 10;
        let last_seen = datetime(seen_day, seen_secs);
        if kind == 1 {
            add("$last_seen", json_str(&last_seen));
            if r.chance(500) {
                add("$email", json_str(&format!("sparse.{i}@example.com")));
            }
        }
        if kind == 2 {
            if forced || r.chance(950) {
                let day = self.first - 1 - r.below(1500) as i64;
                add("$created", json_str(&datetime(day, r.below(86_400))));
            }
            match r.below(100) {
                0..=59 => add("$email", json_str(&format!("user_{i}@example.com"))),
                60..=74 => add("$email", json_str(&format!("zoë.{i}@exämple.com"))),
                75..=84 => add("$email", json_str(&format!("o'brien+{i}@example.co.uk"))),
                85..=89 => add("$email", b"null".to_vec()),
                _ => {}
            }
            let first = FIRST_NAMES[r.below(FIRST_NAMES.len() as u64) as usize];
            let last = LAST_NAMES[r.below(LAST_NAMES.len() as u64) as usize];
            add("$first_name", json_str(first));
            add("$last_name", json_str(last));
            let suffix = if r.chance(50) { " 🚀" } else { "" };
            add("$name", json_str(&format!("{first} {last}{suffix}")));
            add("$last_seen", json_str(&last_seen));
            let city = r.below(t.cities.len() as u64 + 1) as usize;
            if city == t.cities.len() {
                add("$city", b"null".to_vec());
            } else {
                add("$city", t.cities[city].clone());
                add("$country_code", t.countries[city].clone());
            }
            add(
                "$timezone",
                json_str(TIMEZONES[r.below(TIMEZONES.len() as u64) as usize]),
            );
            if forced || r.chance(700) {
                add("$os", t.oses[r.below(t.oses.len() as u64) as usize].clone());
                add(
                    "$browser",
                    t.browsers[r.below(t.browsers.len() as u64) as usize].clone(),
                );
            }
            let p = r.below(t.plans.len() as u64 + 1) as usize;
            add(
                "plan",
                t.plans.get(p).cloned().unwrap_or_else(|| b"null".to_vec()),
            );
            let mut spent = Vec::new();
            let cents = if r.chance(200) {
                0
            } else if r.chance(200) {
                // Integers as floats: 120.0
                100 * r.below(500)
            } else {
                r.below(1_000_000)
            };
            push_decimal(&mut spent, cents, 100);
            add("Total Spent", spent);
            let mut logins = Vec::new();
            push_u64(&mut logins, r.below(5000));
            add("login_count", logins);
            add(
                "is_paying",
                if cents > 0 {
                    b"true".to_vec()
                } else {
                    b"false".to_vec()
                },
            );
            let tags: Vec<&str> = (0..r.below(4))
                .map(|_| TAGS[r.below(TAGS.len() as u64) as usize])
                .collect();
            add("tags", serde_json::to_vec(&tags).unwrap_or_default());
            if forced || r.chance(300) {
                let addr = serde_json::json!({
                    "street": STREETS[r.below(STREETS.len() as u64) as usize],
                    "zip": format!("{:05}", r.below(100_000)),
                    "geo": {"lat": (r.below(180_000) as f64 - 90_000.0) / 1000.0,
                            "lon": (r.below(360_000) as f64 - 180_000.0) / 1000.0},
                    "primary": r.chance(500),
                    "unit": null,
                });
                add("address", serde_json::to_vec(&addr).unwrap_or_default());
            }
            if forced || r.chance(200) {
                // Beyond 2^53: exact only for parsers that keep integers as integers.
                let mut big = Vec::new();
                push_u64(&mut big, 9_007_199_254_740_993 + i);
                add("external_id_big", big);
            }
            let score = (r.below(2_000_000) as f64 - 1_000_000.0) / 7.0;
            add("score", serde_json::to_vec(&score).unwrap_or_default());
            if forced || r.chance(300) {
                add("bio", json_str(BIOS[r.below(BIOS.len() as u64) as usize]));
            }
            if forced || r.chance(100) {
                add(
                    "nickname",
                    json_str(NICKNAMES[r.below(NICKNAMES.len() as u64) as usize]),
                );
            }
            if forced || r.chance(100) {
                add("referrer", b"null".to_vec());
            }
            if forced || r.chance(150) {
                // Nested `$` keys stay as they are: only top-level keys are renamed.
                let tx: Vec<Value> = (0..1 + r.below(3))
                    .map(|_| {
                        let day = self.first + r.below(span) as i64;
                        serde_json::json!({
                            "$amount": (99 + r.below(20_000)) as f64 / 100.0,
                            "$time": datetime(day, r.below(86_400)),
                        })
                    })
                    .collect();
                add("$transactions", serde_json::to_vec(&tx).unwrap_or_default());
            }
            let mut weird = |k: usize| {
                let (key, key_json, value) = &w[k % w.len()];
                fields.push(Field {
                    key: Cow::Borrowed(key.as_str()),
                    key_json: Cow::Borrowed(key_json.as_slice()),
                    value: value.clone(),
                });
            };
            if let Some(k) = forced_weird {
                weird(k);
            } else if r.chance(80) {
                let start = r.below(w.len() as u64) as usize;
                for k in 0..1 + r.below(3) as usize {
                    weird(start + k);
                }
            }
        }
        if self.collisions && i % 4 == 1 && !fields.is_empty() {
            // A property named like the row's own key: its column is `distinct_id__2`.
            fields.push(Field {
                key: Cow::Borrowed("distinct_id"),
                key_json: Cow::Borrowed(b"\"distinct_id\""),
                value: format!("\"shadow-{i}\"").into_bytes(),
            });
        }
        let distinct_id = self.distinct_id(i);
        Profile {
            integer_id: self.integer_ids
                && !distinct_id.is_empty()
                && distinct_id.bytes().all(|b| b.is_ascii_digit()),
            omit_empty: self.omit_empty,
            distinct_id,
            fields,
        }
    }

    /// Every property key with the number of profiles that have it and its type, most common
    /// first (an O(all) scan: callers cache it).
    pub(crate) fn property_stats(&self) -> Vec<(String, u64, &'static str)> {
        let mut stats: HashMap<String, (u64, HashMap<&'static str, u64>)> = HashMap::new();
        for i in 0..self.n {
            for f in self.get(i).fields {
                let e = stats.entry(f.key.into_owned()).or_default();
                e.0 += 1;
                if let Some(ty) = value_type(&f.value) {
                    *e.1.entry(ty).or_default() += 1;
                }
            }
        }
        let mut out: Vec<(String, u64, &'static str)> = stats
            .into_iter()
            .map(|(k, (count, types))| {
                let ty = types
                    .into_iter()
                    .max_by_key(|(ty, n)| (*n, *ty))
                    .map_or("string", |(ty, _)| ty);
                (k, count, ty)
            })
            .collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }
}

/// Mixpanel's property type of a raw JSON value (`None` for null).
fn value_type(v: &[u8]) -> Option<&'static str> {
    Some(match v.first()? {
        b'"' => {
            let s = &v[1..v.len().saturating_sub(1)];
            let shape = b"dddd-dd-ddTdd:dd:dd";
            let is_dt = s.len() == shape.len()
                && s.iter().zip(shape).all(|(c, p)| match p {
                    b'd' => c.is_ascii_digit(),
                    _ => c == p,
                });
            if is_dt { "datetime" } else { "string" }
        }
        b'{' => "object",
        b'[' => "list",
        b't' | b'f' => "boolean",
        b'n' => return None,
        _ => "number",
    })
}

/// Membership of one cohort: profile `i` is a member iff `(i + offset) % period` falls in the
/// last `width` residues; the j-th member and the count are then closed-form.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CohortRule {
    period: u64,
    width: u64,
    offset: u64,
}

impl CohortRule {
    /// The rule of cohort `k` of `total`; the last of two or more cohorts is empty.
    pub(crate) fn new(seed: u64, k: u64, total: u64) -> CohortRule {
        let period = 3 + 2 * k;
        let width = if total >= 2 && k == total - 1 {
            0
        } else if k == 0 {
            2
        } else {
            (period + 1) / 3
        };
        CohortRule {
            period,
            width,
            offset: hash4(seed, S_COHORT, 0, k) % period,
        }
    }

    /// Members among the shifted positions `0..x`.
    fn below(&self, x: u64) -> u64 {
        let (p, w) = (self.period, self.width);
        (x / p) * w + (x % p).saturating_sub(p - w)
    }

    /// Number of members among profiles `0..n`; for a member `i`, `count(i)` is its position.
    pub(crate) fn count(&self, n: u64) -> u64 {
        self.below(n + self.offset) - self.below(self.offset)
    }

    /// The profile index of the j-th member (j < count).
    pub(crate) fn nth(&self, j: u64) -> u64 {
        let (p, w) = (self.period, self.width);
        let m = self.below(self.offset) + j;
        (m / w) * p + (p - w) + m % w - self.offset
    }

    /// Whether profile `i` is a member.
    pub(crate) fn contains(&self, i: u64) -> bool {
        (i + self.offset) % self.period >= self.period - self.width
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cohort_rules_are_closed_form() {
        for seed in 0..5 {
            for k in 0..5 {
                let rule = CohortRule::new(seed, k, 6);
                for n in [0u64, 1, 2, 7, 100, 301] {
                    let members: Vec<u64> = (0..n).filter(|i| rule.contains(*i)).collect();
                    assert_eq!(rule.count(n), members.len() as u64, "{seed} {k} {n}");
                    for (j, m) in members.iter().enumerate() {
                        assert_eq!(rule.nth(j as u64), *m);
                    }
                }
            }
            assert_eq!(CohortRule::new(seed, 5, 6).count(1000), 0);
        }
    }

    #[test]
    fn profiles_are_valid_and_unique() {
        let p = Profiles::new(3, 2000, 19_000, 19_009);
        let mut ids = HashSet::new();
        for i in 0..p.n {
            let prof = p.get(i);
            let mut buf = Vec::new();
            prof.write(&mut buf, None);
            let v: Value = serde_json::from_slice(&buf)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&buf)));
            assert_eq!(v["$distinct_id"], prof.distinct_value());
            assert_eq!(
                v["$properties"].as_object().unwrap().len(),
                prof.fields.len(),
                "no duplicate keys"
            );
            assert!(ids.insert(prof.distinct_id.clone()));
            let row = prof.row();
            assert!(row.get("distinct_id").is_some());
            assert!(row.as_object().unwrap().keys().all(|k| !k.starts_with('$')));
        }
        assert_eq!(p.get(11).fields.len(), 0);
        // The first profiles cover every adversarial fragment.
        let keys: HashSet<String> = (0..34)
            .flat_map(|i| p.get(i).fields.into_iter().map(|f| f.key.into_owned()))
            .collect();
        for (k, _, _) in WEIRD_FIELDS.iter() {
            assert!(keys.contains(k), "{k:?}");
        }
    }

    #[test]
    fn integer_ids_and_bare_profiles_are_sent_as_mixpanel_has_them() {
        let p = Profiles::new(3, 40, 19_000, 19_009).with_shapes(true, true);
        let mut buf = Vec::new();
        p.get(3).write(&mut buf, None);
        let v: Value = serde_json::from_slice(&buf).unwrap();
        assert!(v["$distinct_id"].is_u64(), "{v}");
        assert_eq!(p.get(3).row()["distinct_id"], v["$distinct_id"]);
        buf.clear();
        p.get(11).write(&mut buf, None);
        let v: Value = serde_json::from_slice(&buf).unwrap();
        assert!(v.get("$properties").is_none(), "{v}");
        assert_eq!(p.get(11).row().as_object().unwrap().len(), 1);
    }

    #[test]
    fn changed_profiles_are_sent_as_their_rows_say() {
        let p = Profiles::new(5, 60, 19_000, 19_009)
            .with_shapes(true, true)
            .with_collisions(true);
        for i in 0..60 {
            let base = p.get(i);
            let mut last = None;
            for (version, seen) in [(0, Some("2030-01-02T03:04:05")), (1, None), (2, None)] {
                let change = Change {
                    version,
                    last_seen: seen.map(str::to_string),
                };
                let prof = p.at(i, Some(&change));
                let mut buf = Vec::new();
                prof.write(&mut buf, None);
                let v: Value = serde_json::from_slice(&buf).unwrap();
                let props = v["$properties"].as_object().unwrap();
                assert_eq!(props.len(), prof.fields.len(), "no duplicate keys: {v}");
                assert_eq!(v["$distinct_id"], p.id_value(i));
                let row = prof.row();
                assert_eq!(row["distinct_id"], v["$distinct_id"]);
                for (k, val) in props {
                    let col = match k.strip_prefix('$') {
                        Some(rest) => format!("mp_reserved_{rest}"),
                        None if k == "distinct_id" => "distinct_id__2".into(),
                        None => k.clone(),
                    };
                    assert_eq!(&row[&col], val, "{i} {k}");
                }
                if version > 0 {
                    assert!(props.contains_key("plan") && props["login_count"].is_u64());
                    assert_ne!(Some(row.clone()), last, "a new version differs");
                }
                if let Some(s) = seen {
                    assert_eq!(props["$last_seen"], s);
                } else {
                    assert_eq!(
                        props.get("$last_seen"),
                        base.property("$last_seen")
                            .map(|b| serde_json::from_slice::<Value>(b).unwrap())
                            .as_ref(),
                    );
                }
                last = Some(row);
            }
            assert_eq!(
                p.base_last_seen(i).map(|s| json_str(&s)),
                base.property("$last_seen").map(<[u8]>::to_vec),
                "the cheap $last_seen is the generated one"
            );
        }
    }

    #[test]
    fn types() {
        assert_eq!(value_type(b"\"2020-01-02T03:04:05\""), Some("datetime"));
        assert_eq!(value_type(b"\"2020-01-02\""), Some("string"));
        assert_eq!(value_type(b"-1.5"), Some("number"));
        assert_eq!(value_type(b"[1]"), Some("list"));
        assert_eq!(value_type(b"null"), None);
    }
}
