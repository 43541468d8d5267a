//! JSON pieces shared by the table transforms: borrowed keys, property flattening with the
//! `$` → `mp_reserved_` rule, column discovery. Values are copied as raw JSON text, so their
//! type and exact value (big integers, float spelling, nesting) are kept.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use std::sync::{Arc, Mutex};

use crate::schema::{Schema, folded, type_name};

/// JSON types seen in a column, as bits.
const T_STRING: u8 = 1;
const T_INTEGER: u8 = 2;
const T_NUMBER: u8 = 4;
const T_BOOLEAN: u8 = 8;
const T_OBJECT: u8 = 16;
const T_ARRAY: u8 = 32;
const T_NULL: u8 = 64;

/// The output column name of a property key: a leading `$` becomes `mp_reserved_`.
pub fn output_key(k: &str) -> Cow<'_, str> {
    match k.strip_prefix('$') {
        Some(rest) => Cow::Owned(format!("mp_reserved_{rest}")),
        None => Cow::Borrowed(k),
    }
}

/// The property key as sent for an output column name (inverse of [`output_key`]).
pub fn source_key(c: &str) -> String {
    match c.strip_prefix("mp_reserved_") {
        Some(rest) => format!("${rest}"),
        None => c.to_string(),
    }
}

/// The JSON type names of a set of type bits.
fn bit_names(bits: u8) -> impl Iterator<Item = &'static str> {
    [
        (T_STRING, "string"),
        (T_INTEGER, "integer"),
        (T_NUMBER, "number"),
        (T_BOOLEAN, "boolean"),
        (T_OBJECT, "object"),
        (T_ARRAY, "array"),
        (T_NULL, "null"),
    ]
    .into_iter()
    .filter(move |(bit, _)| bits & bit != 0)
    .map(|(_, n)| n)
}

fn type_bits(raw: &str) -> u8 {
    match raw.as_bytes().first() {
        Some(b'"') => T_STRING,
        Some(b'{') => T_OBJECT,
        Some(b'[') => T_ARRAY,
        Some(b't' | b'f') => T_BOOLEAN,
        Some(b'n') => T_NULL,
        _ if raw.bytes().any(|c| matches!(c, b'.' | b'e' | b'E')) => T_NUMBER,
        _ => T_INTEGER,
    }
}

/// The JSON types seen in one column, for a column typed by its values (a distinct id may be
/// a string or an integer): one type's name, or the names joined by `|` when mixed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Types(u8);

impl Types {
    /// Adds the type of a raw JSON value.
    pub fn add(&mut self, raw: &str) {
        self.0 |= type_bits(raw);
    }

    /// `integer`, `string`, or `integer|string` when both were seen (`string` when none was).
    pub fn name(self) -> String {
        let mut names: Vec<&str> = bit_names(self.0).collect();
        if names.is_empty() {
            return "string".into();
        }
        names.sort_unstable();
        names.join("|")
    }

    /// The types of a stored type name (the inverse of [`Types::name`]).
    pub fn parse(name: &str) -> Types {
        Types(name.split('|').fold(0, |bits, n| {
            bits | match n {
                "string" => T_STRING,
                "integer" => T_INTEGER,
                "number" => T_NUMBER,
                "boolean" => T_BOOLEAN,
                "object" => T_OBJECT,
                "array" => T_ARRAY,
                "null" => T_NULL,
                _ => 0,
            }
        }))
    }

    /// Both sets of types.
    pub fn union(self, other: Types) -> Types {
        Types(self.0 | other.0)
    }
}

/// The properties a table writes: which are allowed (a known schema), which were seen, and
/// the column each is written under.
///
/// Column names are unique when case is folded, as SQL engines fold them (DuckDB, Spark,
/// Athena's JSON SerDe): a property whose output name would fold to a name already taken —
/// one of the table's own keys (`event`, `distinct_id`, `time`), or another property's column
/// — is written as `{name}__2` (then `__3`, ...). The first spelling seen keeps the plain name;
/// the names already stored for the table are kept whatever comes later.
#[derive(Debug)]
pub struct Columns {
    /// Only these property keys (as sent) are kept, when set.
    allowed: Option<HashSet<String>>,
    /// Property keys seen (as sent), with their output prefix and JSON types.
    seen: HashMap<String, Column, foldhash::fast::RandomState>,
    /// Property keys kept whatever `allowed` says (a table's system properties).
    always: Option<fn(&str) -> bool>,
    /// The columns of every property, shared by the workers of one slice.
    naming: Arc<Mutex<Naming>>,
}

impl Default for Columns {
    fn default() -> Self {
        Columns::new(None)
    }
}

/// Which column each property is written under, and which names are taken.
#[derive(Debug, Default)]
struct Naming {
    /// Whether names are kept unique when case is folded (a table whose names are stored);
    /// otherwise each property is written under its output name ([`output_key`]).
    unique: bool,
    /// Whether a key keeps its own spelling as its plain name (a table written as Mixpanel
    /// returns it) instead of its output name ([`output_key`]).
    verbatim: bool,
    /// Property key (as sent) → column name.
    names: HashMap<String, String>,
    /// Column names taken, case folded (the table's own keys included).
    taken: HashSet<String>,
}

impl Naming {
    fn name_for(&mut self, key: &str) -> String {
        if !self.unique {
            return output_key(key).into_owned();
        }
        if let Some(name) = self.names.get(key) {
            return name.clone();
        }
        let base = if self.verbatim && key.trim() == key && plain_length(key) {
            key.to_string()
        } else {
            column_name(key)
        };
        let mut name = base.clone();
        let mut n = 1;
        while self.taken.contains(&folded(&name)) {
            n += 1;
            name = format!("{base}__{n}");
        }
        self.taken.insert(folded(&name));
        self.names.insert(key.to_string(), name.clone());
        name
    }
}

/// Longest column name written (Glue and Athena take 255 characters).
const MAX_COLUMN_CHARS: usize = 200;

/// Whether a name is short enough to be a column's as it is.
fn plain_length(name: &str) -> bool {
    !name.is_empty() && name.chars().count() <= MAX_COLUMN_CHARS
}

/// A property's plain column name: its output name ([`output_key`]); `_blank` for a key that
/// is empty or only whitespace; a key longer than `MAX_COLUMN_CHARS` cut there, with a hash
/// of the whole key so that two long keys stay apart.
pub fn column_name(key: &str) -> String {
    let name = output_key(key);
    if name.trim().is_empty() {
        return "_blank".into();
    }
    if name.chars().count() <= MAX_COLUMN_CHARS {
        return name.into_owned();
    }
    let head: String = name.chars().take(MAX_COLUMN_CHARS - 18).collect();
    // FNV-1a: stable across versions and platforms, unlike the standard hasher.
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{head}__{hash:016x}")
}

/// A property key seen: one lookup gives all that writing it needs.
#[derive(Debug)]
struct Column {
    /// JSON types seen.
    bits: u8,
    /// Whether the schema keeps it.
    keep: bool,
    /// Its column name.
    name: String,
    /// `,"column name":`, ready to copy.
    prefix: Box<[u8]>,
}

impl Columns {
    /// Columns limited to `known` (output names) when given.
    pub fn new(known: Option<&Schema>) -> Self {
        Columns {
            allowed: known.map(|s| s.columns.keys().map(|c| s.source_of(c)).collect()),
            seen: HashMap::default(),
            always: None,
            naming: Arc::default(),
        }
    }

    /// Columns limited to `known` when given, but always keeping the keys `always` accepts.
    pub fn keeping(known: Option<&Schema>, always: fn(&str) -> bool) -> Self {
        Columns {
            always: Some(always),
            ..Columns::new(known)
        }
    }

    /// Names columns as `stored` did (the table's schema in the state store), beside the
    /// table's own keys `fixed`, which no property column may take.
    pub fn named(self, stored: Option<&Schema>, fixed: &[&str]) -> Self {
        let mut naming = Naming {
            unique: true,
            ..Naming::default()
        };
        for f in fixed {
            naming.taken.insert(folded(f));
        }
        if let Some(stored) = stored {
            for c in stored.columns.keys() {
                naming.taken.insert(folded(c));
                if !fixed.contains(&c.as_str()) {
                    naming.names.insert(stored.source_of(c), c.clone());
                }
            }
        }
        Columns {
            naming: Arc::new(Mutex::new(naming)),
            ..self
        }
    }

    /// Names columns as [`Columns::named`] does, but with each key's own spelling as its plain
    /// name (`$x` stays `$x`): the tables written as Mixpanel returns them (cohorts,
    /// annotations), whose keys are renamed only to keep names unique and usable.
    pub fn verbatim(self, stored: Option<&Schema>) -> Self {
        let columns = self.named(stored, &[]);
        columns
            .naming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .verbatim = true;
        columns
    }

    /// Keeps `names` from every property that has no column yet: the names readers add to each
    /// row (the hive partition `date` or `snapshot` that DuckDB and Spark read from the path,
    /// Athena's partition key). A column already named so keeps its name.
    pub fn reserving(self, names: &[&str]) -> Self {
        {
            let mut naming = self.naming.lock().unwrap_or_else(|p| p.into_inner());
            for name in names {
                naming.taken.insert(folded(name));
            }
        }
        self
    }

    /// The same filter and naming with nothing seen yet (for another worker of the same slice).
    pub fn fork(&self) -> Self {
        Columns {
            allowed: self.allowed.clone(),
            seen: HashMap::default(),
            always: self.always,
            naming: self.naming.clone(),
        }
    }

    /// Adds what `other` saw (a forked worker's columns).
    pub fn merge(&mut self, other: Columns) {
        for (k, c) in other.seen {
            match self.seen.get_mut(&k) {
                Some(mine) => mine.bits |= c.bits,
                None => {
                    self.seen.insert(k, c);
                }
            }
        }
    }

    /// Writes `,"name":value` for one property unless the schema excludes it.
    pub fn push(&mut self, out: &mut Vec<u8>, key: &str, value: &RawValue) {
        let raw = value.get();
        let column = match self.seen.get_mut(key) {
            Some(c) => c,
            None => {
                let keep = self.allowed.as_ref().is_none_or(|a| a.contains(key))
                    || self.always.is_some_and(|always| always(key));
                let name = if keep {
                    self.naming
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .name_for(key)
                } else {
                    String::new()
                };
                let mut prefix = Vec::with_capacity(name.len() + 4);
                prefix.extend_from_slice(b",\"");
                write_escaped(&mut prefix, &name);
                prefix.extend_from_slice(b"\":");
                self.seen.entry(key.to_string()).or_insert(Column {
                    bits: 0,
                    keep,
                    name,
                    prefix: prefix.into_boxed_slice(),
                })
            }
        };
        if !column.keep {
            return;
        }
        column.bits |= type_bits(raw);
        out.extend_from_slice(&column.prefix);
        out.extend_from_slice(raw.as_bytes());
    }

    /// The columns seen (names and JSON types, with the property of each renamed one) plus
    /// `fixed` ones.
    pub fn schema(&self, fixed: &[(&str, &str)]) -> Schema {
        let mut schema = Schema::default();
        for (name, ty) in fixed {
            schema.columns.insert(name.to_string(), ty.to_string());
        }
        for (k, c) in &self.seen {
            if c.keep {
                schema
                    .columns
                    .insert(c.name.clone(), type_name(bit_names(c.bits)));
                // Every column whose property its name does not spell ([`source_key`]).
                if source_key(&c.name) != *k {
                    schema.renamed.insert(c.name.clone(), k.clone());
                }
            }
        }
        schema
    }
}

/// A map key, borrowed from the input unless it had escapes.
pub struct Key<'de>(pub Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Flattens a JSON object's entries into `out` as `,"name":value` (see [`Columns::push`]).
pub struct FlattenSeed<'s> {
    /// Where the entries go.
    pub out: &'s mut Vec<u8>,
    /// Column filter and discovery.
    pub columns: &'s mut Columns,
}

impl<'de> DeserializeSeed<'de> for FlattenSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FlattenSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of properties")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            let v: &'de RawValue = map.next_value()?;
            self.columns.push(self.out, &k, v);
        }
        Ok(())
    }
}

/// Writes a JSON object line as returned, each top-level key under its column (see
/// [`Columns::verbatim`]: the key itself unless that name is taken or unusable), values as
/// sent, and records the columns' types. A line that is not an object is written as it is.
pub fn write_object(line: &[u8], columns: &mut Columns, out: &mut Vec<u8>) {
    let mut entries = Vec::with_capacity(line.len() + 16);
    let mut de = serde_json::Deserializer::from_slice(line);
    let object = FlattenSeed {
        out: &mut entries,
        columns,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    match object {
        Ok(()) => {
            out.push(b'{');
            out.extend_from_slice(entries.get(1..).unwrap_or_default());
            out.push(b'}');
            if line.ends_with(b"\n") {
                out.push(b'\n');
            }
        }
        Err(_) => out.extend_from_slice(line),
    }
}

/// A schema of fixed columns.
pub fn fixed_schema(columns: &[(&str, &str)]) -> Schema {
    Schema {
        columns: columns
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect(),
        renamed: Default::default(),
    }
}

/// The schema of the `fixed` columns and of `properties` (key as sent, type), each property
/// named as [`Columns`] names it (none taking a `reserved` name), in the order given.
pub fn named_schema(
    fixed: &[(&str, &str)],
    reserved: &[&str],
    properties: impl IntoIterator<Item = (String, String)>,
) -> Schema {
    let mut schema = fixed_schema(fixed);
    let mut naming = Naming {
        unique: true,
        ..Naming::default()
    };
    for name in fixed.iter().map(|(f, _)| f).chain(reserved) {
        naming.taken.insert(folded(name));
    }
    for (key, ty) in properties {
        let name = naming.name_for(&key);
        if source_key(&name) != key {
            schema.renamed.insert(name.clone(), key);
        }
        schema.columns.insert(name, ty);
    }
    schema
}

/// Writes the inside of a JSON string.
pub fn write_escaped(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(v: &str) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).unwrap()
    }

    /// The record `{...}` of these properties (key, raw value) written through `columns`.
    fn written(columns: &mut Columns, props: &[(&str, &str)]) -> String {
        let mut out = Vec::new();
        for (k, v) in props {
            columns.push(&mut out, k, &raw(v));
        }
        format!(
            "{{{}}}",
            String::from_utf8(out).unwrap().trim_start_matches(',')
        )
    }

    #[test]
    fn a_column_name_is_unique_when_case_is_folded_and_never_a_fixed_key() {
        let fixed = ["event", "distinct_id", "time"];
        let mut c = Columns::new(None).named(None, &fixed);
        let long_a = format!("{}a", "x".repeat(999));
        let long_b = format!("{}b", "x".repeat(999));
        let row = written(
            &mut c,
            &[
                ("event", "124"),
                ("Country", "\"FR\""),
                ("country", "\"fr\""),
                ("COUNTRY", "1"),
                ("$city", "\"Paris\""),
                ("mp_reserved_city", "\"custom\""),
                ("", "1"),
                ("  ", "2"),
                (&long_a, "3"),
                (&long_b, "4"),
            ],
        );
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&row).unwrap();
        let keys: Vec<&str> = v.keys().map(String::as_str).collect();
        let long_names: Vec<&&str> = keys.iter().filter(|k| k.starts_with("xxx")).collect();
        assert_eq!(long_names.len(), 2, "{keys:?}");
        assert!(
            long_names
                .iter()
                .all(|k| k.chars().count() <= MAX_COLUMN_CHARS)
        );
        for k in [
            "event__2",
            "Country",
            "country__2",
            "COUNTRY__3",
            "mp_reserved_city",
            "mp_reserved_city__2",
            "_blank",
            "_blank__2",
        ] {
            assert!(keys.contains(&k), "{k} in {keys:?}");
        }
        assert_eq!(v["mp_reserved_city"], "Paris");
        assert_eq!(v["mp_reserved_city__2"], "custom");
        // The same key gets the same column in every line, and the schema says which
        // property each renamed column holds.
        assert_eq!(
            written(&mut c, &[("country", "\"de\"")]),
            r#"{"country__2":"de"}"#
        );
        let schema = c.schema(&[("event", "string")]);
        assert_eq!(schema.source_of("country__2"), "country");
        assert_eq!(schema.source_of("event__2"), "event");
        assert_eq!(schema.source_of("mp_reserved_city__2"), "mp_reserved_city");
        assert_eq!(schema.source_of("mp_reserved_city"), "$city");
        let mut long_sources: Vec<String> =
            long_names.iter().map(|n| schema.source_of(n)).collect();
        long_sources.sort();
        assert_eq!(long_sources, [long_a.clone(), long_b.clone()]);
        assert_eq!(schema.columns["country__2"], "string");
        assert_eq!(schema.columns["event"], "string");
        assert_eq!(schema.columns["event__2"], "integer");
        assert!(!schema.renamed.contains_key("Country"), "{schema:?}");
    }

    #[test]
    fn stored_names_win_whatever_order_a_later_body_brings_the_variants_in() {
        let fixed = ["event", "distinct_id", "time"];
        let mut first = Columns::new(None).named(None, &fixed);
        written(&mut first, &[("Country", "\"FR\""), ("country", "\"fr\"")]);
        let stored = first.schema(&[("event", "string")]);
        let mut later = Columns::new(None).named(Some(&stored), &fixed);
        assert_eq!(
            written(
                &mut later,
                &[
                    ("country", "\"de\""),
                    ("Country", "\"DE\""),
                    ("cOuntry", "1")
                ]
            ),
            r#"{"country__2":"de","Country":"DE","cOuntry__3":1}"#
        );
        // A worker forked from it shares the names.
        let mut fork = later.fork();
        assert_eq!(
            written(&mut fork, &[("cOuntry", "2")]),
            r#"{"cOuntry__3":2}"#
        );
    }

    #[test]
    fn without_stored_names_a_table_writes_each_property_under_its_plain_name() {
        let mut c = Columns::new(None);
        assert_eq!(
            written(&mut c, &[("Country", "1"), ("country", "2"), ("$os", "3")]),
            r#"{"Country":1,"country":2,"mp_reserved_os":3}"#
        );
    }

    #[test]
    fn a_custom_mp_reserved_property_seen_before_its_dollar_twin_keeps_its_own_source() {
        let fixed = ["event", "distinct_id", "time"];
        let mut c = Columns::new(None).named(None, &fixed);
        assert_eq!(
            written(
                &mut c,
                &[("mp_reserved_city", "\"custom\""), ("$city", "\"Paris\"")]
            ),
            r#"{"mp_reserved_city":"custom","mp_reserved_city__2":"Paris"}"#
        );
        let schema = c.schema(&[]);
        assert_eq!(schema.source_of("mp_reserved_city"), "mp_reserved_city");
        assert_eq!(schema.source_of("mp_reserved_city__2"), "$city");
        // Both columns survive a merge into the stored schema (one property each).
        let stored = Schema::default().merged(&schema, &fixed);
        assert_eq!(stored, schema);
    }

    #[test]
    fn a_reserved_name_goes_to_no_new_property_but_stays_with_a_column_that_has_it() {
        let fixed = ["event", "distinct_id", "time"];
        let mut c = Columns::new(None).named(None, &fixed).reserving(&["date"]);
        assert_eq!(
            written(&mut c, &[("Date", "1"), ("date", "2")]),
            r#"{"Date__2":1,"date__3":2}"#
        );
        // A table whose stored schema already holds `date` keeps writing it there.
        let stored = named_schema(&[], &[], [("date".to_string(), "integer".to_string())]);
        let mut later = Columns::new(None)
            .named(Some(&stored), &fixed)
            .reserving(&["date"]);
        assert_eq!(written(&mut later, &[("date", "3")]), r#"{"date":3}"#);
    }

    fn as_returned(columns: &mut Columns, line: &str) -> String {
        let mut out = Vec::new();
        write_object(line.as_bytes(), columns, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn an_object_as_returned_keeps_its_keys_but_for_the_ones_no_engine_could_read() {
        let long = "k".repeat(1000);
        let mut c = Columns::new(None).verbatim(None).reserving(&["snapshot"]);
        let line = format!(
            "{{\"id\": 1, \"Name\":\"a\",\"name\":\"b\",\"$x\":{{\"y\": [1, 2]}},\"\":3,\" \":4,\"snapshot\":\"s\",\"{long}\":5}}\n"
        );
        let row = as_returned(&mut c, &line);
        let hashed = column_name(&long);
        assert_eq!(
            row,
            format!(
                "{{\"id\":1,\"Name\":\"a\",\"name__2\":\"b\",\"$x\":{{\"y\": [1, 2]}},\"_blank\":3,\"_blank__2\":4,\"snapshot__2\":\"s\",\"{hashed}\":5}}\n"
            )
        );
        // Lines that are not objects are written as they are.
        assert_eq!(as_returned(&mut c, "[1,2]\n"), "[1,2]\n");
        assert_eq!(as_returned(&mut c, "{\"id\":2}"), "{\"id\":2}");
        let schema = c.schema(&[]);
        assert_eq!(schema.source_of("$x"), "$x");
        assert_eq!(schema.source_of("name__2"), "name");
        assert_eq!(schema.source_of("id"), "id");
        assert_eq!(schema.columns["$x"], "object");
        // A later snapshot that brings the spellings in the other order names them the same.
        let mut later = Columns::new(None)
            .verbatim(Some(&schema))
            .reserving(&["snapshot"]);
        assert_eq!(
            as_returned(
                &mut later,
                "{\"name\":\"c\",\"Name\":\"d\",\"NAME\":\"e\"}\n"
            ),
            "{\"name__2\":\"c\",\"Name\":\"d\",\"NAME__3\":\"e\"}\n"
        );
    }
}
