//! JSON pieces shared by the table transforms: borrowed keys, property flattening with the
//! `$` → `mp_reserved_` rule, column discovery. Values are copied as raw JSON text, so their
//! type and exact value (big integers, float spelling, nesting) are kept.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::state::Schema;

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

fn type_name(bits: u8) -> &'static str {
    let b = if bits == T_NULL { bits } else { bits & !T_NULL };
    match b {
        T_STRING => "string",
        T_INTEGER => "integer",
        T_NUMBER | 6 => "number",
        T_BOOLEAN => "boolean",
        T_OBJECT => "object",
        T_ARRAY => "array",
        T_NULL => "null",
        _ => "json",
    }
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
        let names: Vec<&str> = [
            (T_STRING, "string"),
            (T_INTEGER, "integer"),
            (T_NUMBER, "number"),
            (T_BOOLEAN, "boolean"),
            (T_OBJECT, "object"),
            (T_ARRAY, "array"),
            (T_NULL, "null"),
        ]
        .into_iter()
        .filter(|(bit, _)| self.0 & bit != 0)
        .map(|(_, n)| n)
        .collect();
        if names.is_empty() {
            return "string".into();
        }
        let mut names = names;
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

/// The properties a table writes: which are allowed (a known schema) and which were seen.
#[derive(Debug, Default)]
pub struct Columns {
    /// Only these property keys (as sent) are kept, when set.
    allowed: Option<HashSet<String>>,
    /// Property keys seen (as sent), with their output prefix and JSON types.
    seen: HashMap<String, Column, foldhash::fast::RandomState>,
    /// Property keys kept whatever `allowed` says (a table's system properties).
    always: Option<fn(&str) -> bool>,
}

/// A property key seen: one lookup gives all that writing it needs.
#[derive(Debug)]
struct Column {
    /// JSON types seen.
    bits: u8,
    /// Whether the schema keeps it.
    keep: bool,
    /// `,"output name":`, ready to copy.
    prefix: Box<[u8]>,
}

impl Columns {
    /// Columns limited to `known` (output names) when given.
    pub fn new(known: Option<&Schema>) -> Self {
        Columns {
            allowed: known.map(|s| s.columns.keys().map(|c| source_key(c)).collect()),
            seen: HashMap::default(),
            always: None,
        }
    }

    /// Columns limited to `known` when given, but always keeping the keys `always` accepts.
    pub fn keeping(known: Option<&Schema>, always: fn(&str) -> bool) -> Self {
        Columns {
            always: Some(always),
            ..Columns::new(known)
        }
    }

    /// The same filter with nothing seen yet (for another worker of the same slice).
    pub fn fork(&self) -> Self {
        Columns {
            allowed: self.allowed.clone(),
            seen: HashMap::default(),
            always: self.always,
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
                let mut prefix = Vec::with_capacity(key.len() + 16);
                prefix.extend_from_slice(b",\"");
                if key.starts_with('$') {
                    prefix.extend_from_slice(b"mp_reserved_");
                }
                write_escaped(&mut prefix, key.strip_prefix('$').unwrap_or(key));
                prefix.extend_from_slice(b"\":");
                self.seen.entry(key.to_string()).or_insert(Column {
                    bits: 0,
                    keep,
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

    /// The columns seen (output names and JSON types) plus `fixed` ones.
    pub fn schema(&self, fixed: &[(&str, &str)]) -> Schema {
        let mut columns = BTreeMap::new();
        for (name, ty) in fixed {
            columns.insert(name.to_string(), ty.to_string());
        }
        for (k, c) in &self.seen {
            if c.keep {
                columns.insert(output_key(k).into_owned(), type_name(c.bits).to_string());
            }
        }
        Schema { columns }
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

/// Records the top-level keys and types of a JSON object line (tables written as returned).
pub fn discover_object(line: &[u8], columns: &mut Columns) {
    let mut scratch = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(line);
    // A line that is not an object has no columns to discover; it is written as returned.
    let _ = FlattenSeed {
        out: &mut scratch,
        columns,
    }
    .deserialize(&mut de);
}

/// A schema of fixed columns.
pub fn fixed_schema(columns: &[(&str, &str)]) -> Schema {
    Schema {
        columns: columns
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect(),
    }
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
