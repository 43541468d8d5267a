//! The `cohort_members` table: every cohort's members (`engage` with `filter_by_cohort`), one
//! row per membership.

use serde_json::value::RawValue;

use crate::error::Result;
use crate::tables::engage;
use crate::tables::json::{Types, fixed_schema};
use crate::tables::{Runner, Spec, Table};

/// What the rest of the program knows of the table (its line in [`super::REGISTRY`]).
pub const SPEC: Spec = Spec {
    table: Table::CohortMembers,
    name: "cohort_members",
    runner: Runner::Snapshot,
    fixed_keys: &[],
    glue_columns: &[("cohort_id", "bigint"), ("distinct_id", "string")],
};

/// The table's columns: `distinct_id` typed as the ids written were (`string`, `integer`, or
/// both).
pub fn schema(ids: Types) -> crate::schema::Schema {
    fixed_schema(&[("cohort_id", "integer"), ("distinct_id", &ids.name())])
}

/// Writes `{"cohort_id": N, "distinct_id": ...}` and a newline (the id keeps its JSON type,
/// recorded in `ids`).
pub fn member_row(
    cohort_id: u64,
    profile: &RawValue,
    out: &mut Vec<u8>,
    ids: &mut Types,
) -> Result<()> {
    let distinct = engage::distinct_id(profile)?;
    ids.add(distinct.get());
    out.extend_from_slice(format!("{{\"cohort_id\":{cohort_id},\"distinct_id\":").as_bytes());
    out.extend_from_slice(distinct.get().as_bytes());
    out.extend_from_slice(b"}\n");
    Ok(())
}
