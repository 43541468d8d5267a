//! A table's discovered columns: output column names, their JSON types, and the Mixpanel
//! property each renamed column holds (kept in the state store, written as `_schema.json`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The columns discovered for a table: output column name to JSON type name, and the
/// Mixpanel property of each column renamed to keep names unique when case is folded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schema {
    /// Column name → JSON type (`string`, `integer`, `number`, `boolean`, `object`, `array`, `null`),
    /// or several joined by `|` (`integer|string`) when the column held several.
    pub columns: BTreeMap<String, String>,
    /// Column name → the property key (as Mixpanel sent it) of a column whose name is not the
    /// key's own output name (`country__2` for `country` beside `Country`). Every other
    /// column holds the property its name says (`mp_reserved_x` holds `$x`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub renamed: BTreeMap<String, String>,
}

/// A column name as SQL engines compare names: case folded.
pub fn folded(name: &str) -> String {
    name.to_lowercase()
}

impl Schema {
    /// The property key a column holds.
    pub fn source_of(&self, column: &str) -> String {
        match self.renamed.get(column) {
            Some(key) => key.clone(),
            None => match column.strip_prefix("mp_reserved_") {
                Some(rest) => format!("${rest}"),
                None => column.to_string(),
            },
        }
    }

    /// `self` (the stored schema) plus what `new` brings. A column both have holds the union of
    /// their types. A new column is left out when its name folds to the name of a column already
    /// there, or its property already has a column: the one who brought it named it without
    /// knowing, and must use the stored names (see [`Schema::agrees_with`]).
    ///
    /// `fixed` are the table's own keys (export's `event`, `distinct_id`, `time`): columns that
    /// hold no property, so that a property of the same name (`event__2`) is not taken for
    /// theirs.
    pub fn merged(&self, new: &Schema, fixed: &[&str]) -> Schema {
        let mut merged = self.clone();
        let mut taken: std::collections::HashSet<String> =
            merged.columns.keys().map(|c| folded(c)).collect();
        let mut sources: std::collections::HashSet<String> = merged
            .columns
            .keys()
            .filter(|c| !fixed.contains(&c.as_str()))
            .map(|c| merged.source_of(c))
            .collect();
        for (name, kind) in &new.columns {
            if let Some(stored) = merged.columns.get_mut(name) {
                if self.source_of(name) == new.source_of(name) {
                    *stored = union_types(stored, kind);
                }
                continue;
            }
            let source = new.source_of(name);
            let property = !fixed.contains(&name.as_str());
            if !taken.insert(folded(name)) || (property && !sources.insert(source.clone())) {
                continue;
            }
            merged.columns.insert(name.clone(), kind.clone());
            if let Some(key) = new.renamed.get(name) {
                merged.renamed.insert(name.clone(), key.clone());
            }
        }
        merged
    }

    /// Whether every column of `self` is in `stored` under the same name for the same property:
    /// what was written with `self`'s names can be committed beside what `stored` describes.
    pub fn agrees_with(&self, stored: &Schema) -> bool {
        self.columns
            .keys()
            .all(|c| stored.columns.contains_key(c) && stored.source_of(c) == self.source_of(c))
    }
}

/// The union of two type names (`integer` and `string` → `integer|string`), see [`type_name`].
fn union_types(a: &str, b: &str) -> String {
    if a == b {
        return a.to_string();
    }
    type_name(a.split('|').chain(b.split('|')))
}

/// The type name of a column that held values of these JSON types: one type, or several joined
/// by `|` in name order. Nulls count only in a column of nothing else (every column may be
/// null); integers in a column that also held other numbers are numbers; `json` (a column
/// discovered before any value was seen) gives way to the types its values have.
pub fn type_name<'a>(types: impl IntoIterator<Item = &'a str>) -> String {
    let mut all: Vec<&str> = types.into_iter().filter(|t| !t.is_empty()).collect();
    all.sort_unstable();
    all.dedup();
    for placeholder in ["null", "json"] {
        if all.len() > 1 {
            all.retain(|t| *t != placeholder);
        }
    }
    if all.contains(&"number") {
        all.retain(|t| *t != "integer");
    }
    if all.is_empty() {
        return "string".into();
    }
    all.join("|")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(columns: &[(&str, &str)], renamed: &[(&str, &str)]) -> Schema {
        Schema {
            columns: columns
                .iter()
                .map(|(c, t)| (c.to_string(), t.to_string()))
                .collect(),
            renamed: renamed
                .iter()
                .map(|(c, k)| (c.to_string(), k.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_merge_keeps_the_stored_names_and_the_union_of_the_types() {
        let stored = schema(
            &[("Country", "string"), ("n", "integer"), ("x", "null")],
            &[],
        );
        // Named without knowing: `country` folds to the stored `Country`.
        let theirs = schema(
            &[
                ("country", "string"),
                ("n", "string"),
                ("x", "boolean"),
                ("new", "number"),
            ],
            &[],
        );
        let merged = stored.merged(&theirs, &[]);
        assert_eq!(
            merged,
            schema(
                &[
                    ("Country", "string"),
                    ("n", "integer|string"),
                    ("x", "boolean"),
                    ("new", "number")
                ],
                &[]
            )
        );
        assert!(
            !theirs.agrees_with(&merged),
            "`country` must be named again"
        );
        // Named with the stored names: the renamed column joins, and a property that already
        // has a column cannot take a second one.
        let ours = schema(
            &[("country__2", "string"), ("n", "number")],
            &[("country__2", "country")],
        );
        let merged = stored.merged(&ours, &[]);
        assert!(ours.agrees_with(&merged), "{merged:?}");
        assert_eq!(merged.columns["n"], "number");
        assert_eq!(merged.source_of("country__2"), "country");
        let again = schema(&[("country__3", "string")], &[("country__3", "country")]);
        let merged = merged.merged(&again, &[]);
        assert!(!again.agrees_with(&merged), "{merged:?}");
        assert_eq!(merged.source_of("mp_reserved_city"), "$city");
        // A table's own key holds no property: a property named like it has its own column.
        let own = schema(
            &[("distinct_id", "string"), ("distinct_id__2", "string")],
            &[("distinct_id__2", "distinct_id")],
        );
        assert_eq!(Schema::default().merged(&own, &["distinct_id"]), own);
        assert_ne!(Schema::default().merged(&own, &[]), own);
    }
}
