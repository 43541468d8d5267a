//! Helpers shared by the simulator's tests: a small HTTP client and a reference replicator.
#![allow(dead_code)]

use std::collections::HashMap;

use base64::Engine;
use jiff::tz::TimeZone;
use mixpanel_sim::{Date, SimConfig, Simulator, TimeMode};
use serde_json::{Map, Value};

pub const SECRET: &str = "sim-secret";

/// Today in UTC.
pub fn today_utc() -> Date {
    jiff::Timestamp::now()
        .to_zoned_datetime(TimeZone::UTC)
        .date()
}

/// `d` plus `n` days.
pub fn add_days(d: Date, n: i64) -> Date {
    d.checked_add(jiff::Span::new().days(n)).unwrap()
}

/// A small config whose days end today (so HTTP requests pass the to_date check).
pub fn recent(seed: u64, events_per_day: u32) -> SimConfig {
    SimConfig {
        seed,
        events_per_day,
        ..SimConfig::default()
    }
}

/// `Authorization` value for HTTP Basic of a raw credential string.
pub fn basic(raw: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// A client that never decompresses, so tests see exactly what was sent.
pub fn raw_client() -> reqwest::Client {
    reqwest::Client::builder().no_gzip().build().unwrap()
}

/// GET the export with the secret (no colon) and the given extra params.
pub async fn export(
    client: &reqwest::Client,
    url: &str,
    params: &[(&str, String)],
) -> reqwest::Response {
    client
        .get(format!("{url}/api/2.0/export"))
        .query(params)
        .header("Authorization", basic(SECRET))
        .send()
        .await
        .unwrap()
}

/// Parses an NDJSON body (every line must be valid JSON).
pub fn lines(body: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(body).expect("body is UTF-8");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "body ends with a newline"
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line ({e}): {l}")))
        .collect()
}

/// The whole body of an export (uncompressed) written by the library.
pub fn body(
    sim: &Simulator,
    from: Date,
    to: Date,
    events: Option<&[String]>,
    where_clause: Option<&str>,
) -> Vec<u8> {
    let mut out = Vec::new();
    sim.write_export_body(from, to, events, where_clause, &mut out)
        .unwrap();
    out
}

/// The true UTC instant of an exported `time`, computed independently of the simulator.
pub fn instant(cfg: &SimConfig, time: i64) -> jiff::Timestamp {
    let ts = jiff::Timestamp::from_second(time).unwrap();
    match cfg.time_mode {
        TimeMode::Utc => ts,
        TimeMode::ProjectLocal => {
            let tz = TimeZone::get(&cfg.timezone).unwrap();
            TimeZone::UTC
                .to_datetime(ts)
                .to_zoned_datetime(tz)
                .unwrap()
                .timestamp()
        }
    }
}

/// What a correct replicator makes of raw lines for one project-local day.
pub fn reference_rows(cfg: &SimConfig, raw: &[Value], day: Date) -> Vec<Value> {
    let tz = TimeZone::get(&cfg.timezone).unwrap();
    let mut best: HashMap<String, (i64, Map<String, Value>, String)> = HashMap::new();
    for line in raw {
        let event = line["event"].as_str().unwrap().to_string();
        let props = line["properties"].as_object().unwrap().clone();
        let time = props["time"].as_i64().unwrap();
        let at = instant(cfg, time);
        if at.to_zoned_datetime(tz.clone()).date() != day {
            continue;
        }
        let key = serde_json::to_string(&(
            &event,
            props.get("distinct_id").unwrap_or(&Value::Null),
            time,
            props.get("$insert_id").unwrap_or(&Value::Null),
        ))
        .unwrap();
        let proc = props["mp_processing_time_ms"].as_i64().unwrap();
        if best.get(&key).is_none_or(|(p, _, _)| *p < proc) {
            best.insert(key, (proc, props, event));
        }
    }
    best.into_values()
        .map(|(_, props, event)| {
            let time = props["time"].as_i64().unwrap();
            let mut row = Map::new();
            row.insert("event".into(), event.into());
            row.insert(
                "distinct_id".into(),
                props.get("distinct_id").cloned().unwrap_or(Value::Null),
            );
            row.insert(
                "time".into(),
                instant(cfg, time)
                    .strftime("%Y-%m-%dT%H:%M:%SZ")
                    .to_string()
                    .into(),
            );
            for (k, v) in props {
                if k != "time" && k != "distinct_id" {
                    let k = k
                        .strip_prefix('$')
                        .map_or(k.clone(), |r| format!("mp_reserved_{r}"));
                    row.insert(k, v);
                }
            }
            Value::Object(row)
        })
        .collect()
}

/// Rows as sorted canonical strings, for order-insensitive comparison.
pub fn canon(rows: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = rows
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    v.sort();
    v
}
