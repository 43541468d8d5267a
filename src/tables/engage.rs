//! The `engage` table: user profiles, a full snapshot read page by page (also the listing
//! behind `cohort_members`).

use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::{Error, ErrorKind, Result};
use crate::tables::json::{Columns, FlattenSeed, Key, Types};
use crate::tables::{Runner, Spec, Table};

/// What the rest of the program knows of the table (its line in [`super::REGISTRY`]).
pub const SPEC: Spec = Spec {
    table: Table::Engage,
    name: "engage",
    runner: Runner::Snapshot,
    fixed_keys: &["distinct_id"],
    glue_columns: &[("distinct_id", "string")],
};

/// Profiles asked for per page (the most Mixpanel serves; a project may serve fewer, and its
/// answer's `page_size` then says how many).
pub const PAGE_SIZE: usize = 1000;

/// One page of the `engage` listing.
#[derive(Deserialize)]
pub struct Page<'a> {
    /// The profiles, as raw JSON.
    #[serde(borrow, default)]
    pub results: Vec<&'a RawValue>,
    /// The listing's session, needed for the next page.
    #[serde(default)]
    pub session_id: Option<String>,
    /// The page size Mixpanel served (may be smaller than asked).
    #[serde(default)]
    pub page_size: Option<u64>,
    /// Profiles in the whole listing (page 0; later pages may leave it out).
    #[serde(default)]
    pub total: Option<u64>,
}

impl Page<'_> {
    /// Whether another page may follow: Mixpanel's own loop goes on while a page holds the
    /// answer's `page_size` (the requested size when the answer has none).
    pub fn is_full(&self) -> bool {
        let size = self.page_size.unwrap_or(PAGE_SIZE as u64);
        !self.results.is_empty() && self.results.len() as u64 >= size
    }
}

/// Parses a page; a body that is not one is a `BadResponse`.
pub fn parse_page(body: &[u8]) -> Result<Page<'_>> {
    serde_json::from_slice(body).map_err(|e| {
        let excerpt: String = String::from_utf8_lossy(body).chars().take(120).collect();
        Error::new(
            ErrorKind::BadResponse,
            format!("engage answered something that is not a page ({e}): {excerpt:?}"),
        )
    })
}

/// The query parameters of one page (`cohort`: only that cohort's members; `filter`: only the
/// profiles a `where` expression selects).
pub fn page_params(
    session_id: Option<&str>,
    page: u64,
    cohort: Option<u64>,
    filter: Option<&str>,
) -> Vec<(&'static str, String)> {
    let mut p = vec![
        ("page_size", PAGE_SIZE.to_string()),
        ("page", page.to_string()),
    ];
    if let Some(s) = session_id {
        p.push(("session_id", s.to_string()));
    }
    if let Some(id) = cohort {
        p.push(("filter_by_cohort", format!("{{\"id\":{id}}}")));
    }
    if let Some(w) = filter {
        p.push(("where", w.to_string()));
    }
    p
}

/// The parameters of the cheapest listing that tells how many profiles the project holds:
/// page 0 of one profile, unfiltered; its `total` is the count. Its one property keeps the
/// answer small should a project serve a whole page whatever `page_size` asks.
pub fn count_params() -> Vec<(&'static str, String)> {
    vec![
        ("page_size", "1".to_string()),
        ("page", "0".to_string()),
        ("output_properties", "[\"$last_seen\"]".to_string()),
    ]
}

/// The `where` expression of the profiles whose `$last_seen` (a UTC `YYYY-MM-DDTHH:MM:SS`
/// datetime, moved by every profile update not sent with `$ignore_time`) is at or after
/// `since`.
pub fn changed_since(since: jiff::Timestamp) -> String {
    format!(
        "properties[\"$last_seen\"] >= \"{}\"",
        since.strftime("%Y-%m-%dT%H:%M:%S")
    )
}

/// Whether Mixpanel refused a page because the listing's session expired: the listing restarts.
pub fn is_expired_session(e: &Error) -> bool {
    e.cause() == Some(crate::error::Cause::ExpiredSession)
}

/// Writes a profile as `{"distinct_id": ..., <$properties flattened>}` and a newline; the
/// distinct id keeps its JSON type (Mixpanel sends some as integers), recorded in `ids`. A
/// profile without `$properties` is a row of its `distinct_id` alone.
pub fn profile_row(
    profile: &RawValue,
    out: &mut Vec<u8>,
    props: &mut Vec<u8>,
    columns: &mut Columns,
    ids: &mut Types,
) -> Result<()> {
    props.clear();
    let mut de = serde_json::Deserializer::from_str(profile.get());
    let distinct = ProfileSeed { props, columns }
        .deserialize(&mut de)
        .map_err(|e| bad_profile(profile, &e.to_string()))?;
    let distinct = usable_id(profile, distinct)?;
    ids.add(distinct.get());
    out.extend_from_slice(b"{\"distinct_id\":");
    out.extend_from_slice(distinct.get().as_bytes());
    out.extend_from_slice(props);
    out.extend_from_slice(b"}\n");
    Ok(())
}

/// The `$distinct_id` of a profile (a string or an integer).
pub fn distinct_id(profile: &RawValue) -> Result<&RawValue> {
    #[derive(Deserialize)]
    struct Only<'a> {
        #[serde(borrow, rename = "$distinct_id")]
        distinct_id: Option<&'a RawValue>,
    }
    let only: Only =
        serde_json::from_str(profile.get()).map_err(|e| bad_profile(profile, &e.to_string()))?;
    usable_id(profile, only.distinct_id)
}

/// The distinct id, which every row needs.
fn usable_id<'a>(profile: &RawValue, id: Option<&'a RawValue>) -> Result<&'a RawValue> {
    id.ok_or_else(|| bad_profile(profile, "no $distinct_id"))
}

fn bad_profile(profile: &RawValue, why: &str) -> Error {
    let excerpt: String = profile.get().chars().take(120).collect();
    Error::new(
        ErrorKind::BadResponse,
        format!("unusable engage profile ({why}): {excerpt:?}"),
    )
}

struct ProfileSeed<'s> {
    props: &'s mut Vec<u8>,
    columns: &'s mut Columns,
}

impl<'de> DeserializeSeed<'de> for ProfileSeed<'_> {
    type Value = Option<&'de RawValue>;
    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ProfileSeed<'_> {
    type Value = Option<&'de RawValue>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an engage profile object")
    }
    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut distinct = None;
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match &*k {
                "$distinct_id" => distinct = Some(map.next_value::<&'de RawValue>()?),
                "$properties" => map.next_value_seed(FlattenSeed {
                    out: &mut *self.props,
                    columns: &mut *self.columns,
                })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(distinct)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_is_flattened_with_exact_values() {
        let page = parse_page(
            br#"{"page":0,"session_id":"s1","results":[{"$distinct_id":"a/b c","$properties":{"$email":"x@y","n":12345678901234567890,"o":{"k":[1.50]}}}]}"#,
        )
        .unwrap();
        assert_eq!(page.session_id.as_deref(), Some("s1"));
        let mut out = Vec::new();
        let mut props = Vec::new();
        let mut cols = Columns::new(None);
        let mut ids = Types::default();
        profile_row(page.results[0], &mut out, &mut props, &mut cols, &mut ids).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"distinct_id\":\"a/b c\",\"mp_reserved_email\":\"x@y\",\"n\":12345678901234567890,\"o\":{\"k\":[1.50]}}\n"
        );
        assert_eq!(ids.name(), "string");
    }

    #[test]
    fn an_integer_id_stays_an_integer_and_a_bare_profile_is_its_id_alone() {
        let page = parse_page(
            br#"{"page":0,"page_size":500,"total":2,"results":[{"$distinct_id":4},{"$distinct_id":"x","$properties":{}}]}"#,
        )
        .unwrap();
        assert_eq!((page.page_size, page.total), (Some(500), Some(2)));
        assert!(!page.is_full(), "2 of a 500-profile page: the last page");
        let (mut out, mut props, mut cols, mut ids) =
            (Vec::new(), Vec::new(), Columns::new(None), Types::default());
        profile_row(page.results[0], &mut out, &mut props, &mut cols, &mut ids).unwrap();
        assert_eq!(String::from_utf8_lossy(&out), "{\"distinct_id\":4}\n");
        assert_eq!(ids.name(), "integer");
        profile_row(page.results[1], &mut out, &mut props, &mut cols, &mut ids).unwrap();
        assert_eq!(ids.name(), "integer|string");
        let raw: Box<RawValue> = serde_json::from_str(r#"{"$properties":{}}"#).unwrap();
        assert!(distinct_id(&raw).is_err());
    }
}
