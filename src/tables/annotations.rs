//! The `annotations` table: a full snapshot of the annotations from the start date to today,
//! as returned (`annotations`, or the App API with a service account).

use jiff::civil::Date;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{Error, ErrorKind, Result};
use crate::tables::{Runner, Spec, Table};

/// What the rest of the program knows of the table (its line in [`super::REGISTRY`]).
pub const SPEC: Spec = Spec {
    table: Table::Annotations,
    name: "annotations",
    runner: Runner::Snapshot,
    fixed_keys: &[],
    glue_columns: &[("id", "bigint"), ("date", "string")],
};

/// The query parameters of the Query API's `annotations`.
pub fn params(from: Date, to: Date) -> Vec<(&'static str, String)> {
    vec![("from_date", from.to_string()), ("to_date", to.to_string())]
}

/// The query parameters of the App API's annotations (service accounts): its filters are
/// camelCase, and it ignores the Query API's names.
pub fn app_params(from: Date, to: Date) -> Vec<(&'static str, String)> {
    vec![("fromDate", from.to_string()), ("toDate", to.to_string())]
}

/// Writes one line per annotation object, as returned by either API form.
pub fn rows(body: &[u8], mut emit: impl FnMut(&[u8])) -> Result<u64> {
    #[derive(Deserialize)]
    struct Answer<'a> {
        #[serde(borrow)]
        annotations: Option<Vec<&'a RawValue>>,
        #[serde(borrow)]
        results: Option<Vec<&'a RawValue>>,
    }
    let a: Answer = serde_json::from_slice(body).map_err(|e| bad(body, &e.to_string()))?;
    let list = a
        .annotations
        .or(a.results)
        .ok_or_else(|| bad(body, "neither \"annotations\" nor \"results\""))?;
    let mut line = Vec::new();
    for item in &list {
        line.clear();
        line.extend_from_slice(item.get().as_bytes());
        line.push(b'\n');
        emit(&line);
    }
    Ok(list.len() as u64)
}

fn bad(body: &[u8], why: &str) -> Error {
    let excerpt: String = String::from_utf8_lossy(body).chars().take(120).collect();
    Error::new(
        ErrorKind::BadResponse,
        format!("annotations answered something unusable ({why}): {excerpt:?}"),
    )
}
