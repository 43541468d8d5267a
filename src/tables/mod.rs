//! The seven tables: one file per table that knows its requests, slices and record transform.

pub mod annotations;
pub mod cohort_members;
pub mod cohorts;
pub mod engage;
pub mod export;
pub mod funnels;
pub mod json;
pub mod revenue;

use std::fmt;
use std::str::FromStr;

/// How a table's slices are replicated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runner {
    /// Raw events by day (or hour, or window of days): `run::export`.
    Export,
    /// Query API results by day, read in date windows: `run::dated`.
    Dated,
    /// The whole table as snapshots: `run::snapshot`.
    Snapshot,
}

/// What the rest of the program knows of a table, kept in the table's own file (its `SPEC`).
#[derive(Debug)]
pub struct Spec {
    /// The table.
    pub table: Table,
    /// Its name in events, output keys and state.
    pub name: &'static str,
    /// How its slices are replicated.
    pub runner: Runner,
    /// The keys of its records that hold no property: no property column takes them.
    pub fixed_keys: &'static [&'static str],
    /// The columns every row has, first in its Glue table, with their Athena types (what the
    /// stack's template declares).
    pub glue_columns: &'static [(&'static str, &'static str)],
}

/// The registry: a line per table, in [`Table::ALL`]'s order. Adding a table is its file, its
/// variant and its line here.
const REGISTRY: [&Spec; 7] = [
    &annotations::SPEC,
    &cohort_members::SPEC,
    &cohorts::SPEC,
    &engage::SPEC,
    &export::SPEC,
    &funnels::SPEC,
    &revenue::SPEC,
];

/// A replicated Mixpanel table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// Saved annotations.
    Annotations,
    /// Members of every cohort.
    CohortMembers,
    /// Cohort definitions.
    Cohorts,
    /// User profiles.
    Engage,
    /// Raw events.
    Export,
    /// Funnel results by funnel and day.
    Funnels,
    /// Revenue by day.
    Revenue,
}

impl Table {
    /// Every table, in the order they are replicated by default.
    pub const ALL: [Table; 7] = [
        Table::Annotations,
        Table::CohortMembers,
        Table::Cohorts,
        Table::Engage,
        Table::Export,
        Table::Funnels,
        Table::Revenue,
    ];

    /// What the program knows of the table.
    pub fn spec(self) -> &'static Spec {
        REGISTRY[self as usize]
    }

    /// The table's name in events, output keys and state.
    pub fn as_str(self) -> &'static str {
        self.spec().name
    }

    /// Whether the table is replicated in day slices (else as whole snapshots).
    pub fn is_date_sliced(self) -> bool {
        self.spec().runner != Runner::Snapshot
    }

    /// The column readers take from the output's folder names (`date=` or `snapshot=`: hive
    /// partitions in DuckDB and Spark, the partition key in Athena), which no column takes.
    pub fn partition_key(self) -> &'static str {
        if self.is_date_sliced() {
            "date"
        } else {
            "snapshot"
        }
    }

    /// The keys of the table's records that hold no property: no property column takes them.
    pub fn fixed_keys(self) -> &'static [&'static str] {
        self.spec().fixed_keys
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Table {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Table::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown table {s:?}; expected one of: {}",
                    Table::ALL.map(|t| t.as_str()).join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_has_its_own_line_in_the_registry() {
        for (i, t) in Table::ALL.into_iter().enumerate() {
            assert_eq!(t as usize, i, "Table::ALL is in the enum's order");
            assert_eq!(t.spec().table, t, "{t}'s line is another table's");
            assert_eq!(t.as_str().parse::<Table>(), Ok(t));
        }
        assert_eq!(Table::Export.fixed_keys(), ["event", "distinct_id", "time"]);
        assert!(Table::Funnels.is_date_sliced() && !Table::Engage.is_date_sliced());
    }
}
