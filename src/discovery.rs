//! Property discovery from Mixpanel's properties endpoints (`engage/properties`,
//! `events/properties/top`), so that the first discovered schema of `engage` and `export` holds
//! every property Mixpanel knows, not only those of the first slice read.

use std::collections::BTreeMap;

use serde::Deserialize;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::mixpanel::MixpanelClient;
use crate::state::Schema;
use crate::tables::Table;
use crate::tables::json::output_key;

/// The properties Mixpanel lists for `table` (engage or export), as output columns.
pub async fn discover(mc: &MixpanelClient, table: Table, deadline: Instant) -> Result<Schema> {
    let params = [("limit", "2000".to_string())];
    let (path, fixed): (&str, &[(&str, &str)]) = match table {
        Table::Engage => ("engage/properties", &[("distinct_id", "string")]),
        Table::Export => (
            "events/properties/top",
            &[
                ("event", "string"),
                ("distinct_id", "string"),
                ("time", "timestamp"),
            ],
        ),
        other => return Err(Error::event(format!("{other} has no properties endpoint"))),
    };
    let body = mc.query(path, &params, deadline).await?;
    let bad = |why: String| {
        Error::new(
            ErrorKind::BadResponse,
            format!("{path} answered something unusable: {why}"),
        )
    };
    let mut columns: BTreeMap<String, String> = fixed
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    match table {
        Table::Engage => {
            #[derive(Deserialize)]
            struct Prop {
                #[serde(rename = "type")]
                kind: Option<String>,
            }
            #[derive(Deserialize)]
            struct Answer {
                results: BTreeMap<String, Prop>,
            }
            let a: Answer = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
            for (name, p) in a.results {
                let kind = match p.kind.as_deref() {
                    Some("number") => "number",
                    Some("boolean") => "boolean",
                    Some("object") => "object",
                    Some("list") => "array",
                    // datetime and string values are JSON strings.
                    _ => "string",
                };
                columns
                    .entry(output_key(&name).into_owned())
                    .or_insert_with(|| kind.to_string());
            }
        }
        _ => {
            let a: BTreeMap<String, serde_json::Value> =
                serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
            for name in a.into_keys() {
                if name != "time" && name != "distinct_id" {
                    // The endpoint gives no types: the data's first slice refines nothing here,
                    // a discovered column's type is that of its values (JSON), named "json".
                    columns
                        .entry(output_key(&name).into_owned())
                        .or_insert_with(|| "json".to_string());
                }
            }
        }
    }
    Ok(Schema { columns })
}
