//! The `cohorts` table: `cohorts/list`, a full snapshot of the objects as returned.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{Error, ErrorKind, Result};
use crate::tables::{Runner, Spec, Table};

/// What the rest of the program knows of the table (its line in [`super::REGISTRY`]).
pub const SPEC: Spec = Spec {
    table: Table::Cohorts,
    name: "cohorts",
    runner: Runner::Snapshot,
    fixed_keys: &[],
    glue_columns: &[("id", "bigint"), ("name", "string")],
};

/// The query API path.
pub const PATH: &str = "cohorts/list";

/// Writes one line per cohort object, exactly as returned; returns the cohort ids.
pub fn rows(body: &[u8], mut emit: impl FnMut(&[u8])) -> Result<Vec<u64>> {
    #[derive(Deserialize)]
    struct Id {
        id: u64,
    }
    let list: Vec<&RawValue> =
        serde_json::from_slice(body).map_err(|e| bad(body, &e.to_string()))?;
    let mut ids = Vec::with_capacity(list.len());
    let mut line = Vec::new();
    for c in list {
        let id: Id = serde_json::from_str(c.get())
            .map_err(|e| bad(body, &format!("a cohort without a numeric id: {e}")))?;
        ids.push(id.id);
        line.clear();
        line.extend_from_slice(c.get().as_bytes());
        line.push(b'\n');
        emit(&line);
    }
    Ok(ids)
}

fn bad(body: &[u8], why: &str) -> Error {
    let excerpt: String = String::from_utf8_lossy(body).chars().take(120).collect();
    Error::new(
        ErrorKind::BadResponse,
        format!("cohorts/list answered something unusable ({why}): {excerpt:?}"),
    )
}
