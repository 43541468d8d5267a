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

    /// The table's name in events, output keys and state.
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Annotations => "annotations",
            Table::CohortMembers => "cohort_members",
            Table::Cohorts => "cohorts",
            Table::Engage => "engage",
            Table::Export => "export",
            Table::Funnels => "funnels",
            Table::Revenue => "revenue",
        }
    }

    /// Whether the table is replicated in day slices (else as whole snapshots).
    pub fn is_date_sliced(self) -> bool {
        matches!(self, Table::Export | Table::Funnels | Table::Revenue)
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
        match self {
            Table::Export => &export::FIXED_KEYS,
            Table::Engage => &["distinct_id"],
            _ => &[],
        }
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
