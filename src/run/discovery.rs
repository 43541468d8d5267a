//! Property discovery from Mixpanel's properties endpoints (`engage/properties`,
//! `events/properties/top`), so that the first discovered schema of `engage` and `export` holds
//! every property Mixpanel knows, not only those of the first slice read.

use std::collections::BTreeMap;

use serde::Deserialize;
use tokio::time::Instant;

use crate::app::App;
use crate::error::{Cause, Error, ErrorKind, Result};
use crate::mixpanel::MixpanelClient;
use crate::state::Schema;
use crate::tables::Table;
use crate::tables::json::{named_schema, output_key, source_key};

/// The properties Mixpanel lists for `table` (engage or export), as output columns.
///
/// `events/properties/top` without `event` lists the properties of every event; a project that
/// answers it with HTTP 400 (Mixpanel's reference marks `event` required) is asked once per
/// event name instead: those of `MIXPANEL_EXPORT_EVENTS`, else the names `events/names` lists.
pub async fn discover(app: &App, table: Table, deadline: Instant) -> Result<Schema> {
    let mc = &app.mixpanel;
    let params = [("limit", "2000".to_string())];
    let (path, fixed): (&str, &[(&str, &str)]) = match table {
        Table::Engage => ("engage/properties", &[("distinct_id", "string")]),
        Table::Export => (
            EVENT_PROPERTIES,
            &[
                ("event", "string"),
                ("distinct_id", "string"),
                ("time", "timestamp"),
            ],
        ),
        other => return Err(Error::event(format!("{other} has no properties endpoint"))),
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
            let body = mc.query(path, &params, deadline).await?;
            let a: Answer = serde_json::from_slice(&body).map_err(|e| bad(path, e.to_string()))?;
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
        _ => match mc.query(path, &params, deadline).await {
            Ok(body) => add_event_properties(&mut columns, &body)?,
            Err(e) if e.kind() == ErrorKind::BadResponse && e.cause() == Some(Cause::Http(400)) => {
                let names = match &app.settings.export_events {
                    Some(names) => names.clone(),
                    None => event_names(mc, deadline).await?,
                };
                tracing::info!(events = names.len(), error = %e, "events/properties/top needs an event: asking per event");
                for name in names {
                    let body = mc
                        .query(
                            path,
                            &[("event", name), ("limit", "2000".to_string())],
                            deadline,
                        )
                        .await?;
                    add_event_properties(&mut columns, &body)?;
                }
            }
            Err(e) => return Err(e),
        },
    }
    // Named as the rows will be: unique when case is folded, none taking a fixed column's.
    let properties = columns
        .into_iter()
        .filter(|(name, _)| !fixed.iter().any(|(f, _)| f == name))
        .map(|(name, ty)| (source_key(&name), ty));
    Ok(named_schema(fixed, &[table.partition_key()], properties))
}

/// The export's properties endpoint.
const EVENT_PROPERTIES: &str = "events/properties/top";
/// The endpoint of the project's event names (the most common of the last 31 days).
const EVENT_NAMES: &str = "events/names";

/// The event names Mixpanel lists (`events/names`, at its default limit of 255).
async fn event_names(mc: &MixpanelClient, deadline: Instant) -> Result<Vec<String>> {
    let body = mc
        .query(EVENT_NAMES, &[("type", "general".to_string())], deadline)
        .await?;
    serde_json::from_slice(&body).map_err(|e| bad(EVENT_NAMES, e.to_string()))
}

/// Adds the properties of an `events/properties/top` answer (the endpoint gives no types: a
/// discovered column's type is that of its values, named "json").
fn add_event_properties(columns: &mut BTreeMap<String, String>, body: &[u8]) -> Result<()> {
    let a: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| bad(EVENT_PROPERTIES, e.to_string()))?;
    for name in a.into_keys() {
        if name != "time" && name != "distinct_id" {
            columns
                .entry(output_key(&name).into_owned())
                .or_insert_with(|| "json".to_string());
        }
    }
    Ok(())
}

fn bad(path: &str, why: String) -> Error {
    Error::new(
        ErrorKind::BadResponse,
        format!("{path} answered something unusable: {why}"),
    )
}
