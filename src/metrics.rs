//! The summary of an invocation: one log line, and on Lambda CloudWatch Embedded Metric Format
//! metrics (namespace `MixpanelReplicator`, dimension `Table`).

use std::sync::atomic::Ordering;

use serde_json::json;

use crate::mixpanel::RequestStats;
use crate::run::Response;

/// Request counters at a point in time, to report one invocation's share.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatsSnapshot {
    requests: u64,
    retries: u64,
    rate_limited: u64,
}

impl StatsSnapshot {
    /// The counters now.
    pub fn take(stats: &RequestStats) -> Self {
        StatsSnapshot {
            requests: stats.requests.load(Ordering::Relaxed),
            retries: stats.retries.load(Ordering::Relaxed),
            rate_limited: stats.rate_limited.load(Ordering::Relaxed),
        }
    }

    fn since(self, earlier: StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests - earlier.requests,
            retries: self.retries - earlier.retries,
            rate_limited: self.rate_limited - earlier.rate_limited,
        }
    }
}

/// Metric namespace.
pub const NAMESPACE: &str = "MixpanelReplicator";

/// What an invocation did, for its summary line and metrics.
pub struct Summary<'a> {
    /// The table.
    pub table: &'a str,
    /// The answer, or the error the invocation failed with.
    pub outcome: Result<&'a Response, &'a crate::error::Error>,
    /// How long it took.
    pub duration_ms: u64,
    /// The request counters before and after it.
    pub requests: (StatsSnapshot, StatsSnapshot),
    /// How old the table's newest replicated data is (none before its first commit).
    pub freshness_lag_s: Option<u64>,
    /// The table's slices parked now, as the state store says after the invocation (whether it
    /// answered or failed); `None` when the store could not be read (the answer's count then).
    pub parked_now: Option<u64>,
}

/// Logs the summary line of an invocation and, when `emf`, prints its EMF metrics on stdout
/// (where Lambda's log capture turns them into CloudWatch metrics).
pub fn report(summary: &Summary<'_>, emf: bool, clock: &dyn crate::clock::Clock) {
    let doc = stamped(summary, clock);
    tracing::info!(
        table = summary.table,
        slice = %doc["Slice"].as_str().unwrap_or_default(),
        status = %doc["Status"].as_str().unwrap_or_default(),
        records = doc["Records"].as_u64(),
        bytes = doc["Bytes"].as_u64(),
        files = doc["Files"].as_u64(),
        rejected = doc["RejectedLines"].as_u64(),
        duration_ms = summary.duration_ms,
        requests = summary.requests.1.since(summary.requests.0).requests,
        retries = doc["Retries"].as_u64(),
        rate_limited = doc["RateLimited"].as_u64(),
        slice_failures = doc["SliceFailures"].as_u64(),
        parked = doc["ParkedSlices"].as_u64(),
        freshness_lag_s = summary.freshness_lag_s,
        "invocation summary"
    );
    if emf {
        println!("{doc}");
    }
}

/// The EMF document of `summary`, stamped with the time `clock` reads now.
fn stamped(summary: &Summary<'_>, clock: &dyn crate::clock::Clock) -> serde_json::Value {
    emf_document(summary, clock.now().as_millisecond())
}

/// The EMF document of an invocation at `timestamp_ms`: its counts, `ParkedSlices` and
/// `FreshnessLagSeconds` on every invocation, idle and failed ones too (the lag is left out
/// before the table's first commit).
pub fn emf_document(summary: &Summary<'_>, timestamp_ms: i64) -> serde_json::Value {
    let outcome = summary.outcome;
    let d = summary.requests.1.since(summary.requests.0);
    let (failed, answered_parked) = outcome.map_or((0, 0), |r| (r.failed, r.parked));
    let parked = summary.parked_now.unwrap_or(answered_parked);
    let (status, slice, records, bytes, files, rejected) = match outcome {
        Ok(r) => (
            serde_json::to_value(r.status)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            r.slice.clone().unwrap_or_default(),
            r.records,
            r.bytes,
            r.files,
            r.rejected,
        ),
        Err(e) => (format!("error:{}", e.kind()), String::new(), 0, 0, 0, 0),
    };
    let mut doc = json!({
        "_aws": {
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [["Table"]],
                "Metrics": [
                    {"Name": "Records", "Unit": "Count"},
                    {"Name": "Bytes", "Unit": "Bytes"},
                    {"Name": "Files", "Unit": "Count"},
                    {"Name": "RejectedLines", "Unit": "Count"},
                    {"Name": "Retries", "Unit": "Count"},
                    {"Name": "RateLimited", "Unit": "Count"},
                    {"Name": "DurationMs", "Unit": "Milliseconds"},
                    {"Name": "Failed", "Unit": "Count"},
                    {"Name": "SliceFailures", "Unit": "Count"},
                    {"Name": "ParkedSlices", "Unit": "Count"}
                ]
            }]
        },
        "Table": summary.table,
        "Status": status,
        "Slice": slice,
        "Records": records,
        "Bytes": bytes,
        "Files": files,
        "RejectedLines": rejected,
        "Retries": d.retries,
        "RateLimited": d.rate_limited,
        "DurationMs": summary.duration_ms,
        "Failed": u64::from(outcome.is_err()),
        // Attempts that failed and were recorded on their slice (the invocation answered).
        "SliceFailures": failed,
        // Slices of the table parked now, waiting for a person.
        "ParkedSlices": parked,
    });
    if let Some(lag) = summary.freshness_lag_s {
        doc["FreshnessLagSeconds"] = json!(lag);
        if let Some(metrics) = doc["_aws"]["CloudWatchMetrics"][0]["Metrics"].as_array_mut() {
            metrics.push(json!({"Name": "FreshnessLagSeconds", "Unit": "Seconds"}));
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, ErrorKind};

    fn metric_names(doc: &serde_json::Value) -> Vec<String> {
        doc["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap().to_string())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_emf_timestamp_is_the_clocks() {
        let idle = Response::new(crate::run::Status::Idle, crate::tables::Table::Export);
        let zero = StatsSnapshot::default();
        let summary = Summary {
            table: "export",
            outcome: Ok(&idle),
            duration_ms: 12,
            requests: (zero, zero),
            freshness_lag_s: None,
            parked_now: None,
        };
        let clock = crate::clock::TokioClock::starting_at("2026-03-08T10:00:00Z".parse().unwrap());
        assert_eq!(
            stamped(&summary, &clock)["_aws"]["Timestamp"],
            json!(1_772_964_000_000_i64)
        );
        tokio::time::advance(std::time::Duration::from_millis(1500)).await;
        assert_eq!(
            stamped(&summary, &clock)["_aws"]["Timestamp"],
            json!(1_772_964_001_500_i64)
        );
    }

    #[test]
    fn an_idle_and_a_failed_invocation_both_tell_freshness_and_parked_slices() {
        let idle = Response::new(crate::run::Status::Idle, crate::tables::Table::Export);
        let zero = StatsSnapshot::default();
        let summary = Summary {
            table: "export",
            outcome: Ok(&idle),
            duration_ms: 12,
            requests: (zero, zero),
            freshness_lag_s: Some(1800),
            parked_now: Some(2),
        };
        let doc = emf_document(&summary, 1);
        assert_eq!(
            (
                &doc["Status"],
                &doc["ParkedSlices"],
                &doc["FreshnessLagSeconds"],
                &doc["Failed"]
            ),
            (&json!("idle"), &json!(2), &json!(1800), &json!(0))
        );
        let names = metric_names(&doc);
        assert!(
            names.contains(&"ParkedSlices".into()) && names.contains(&"FreshnessLagSeconds".into())
        );

        // A failed invocation answers nothing, but the table's parked slices are still told.
        let error = Error::new(ErrorKind::State, "state store: unreachable");
        let failed = Summary {
            outcome: Err(&error),
            parked_now: Some(3),
            freshness_lag_s: Some(7200),
            ..summary
        };
        let doc = emf_document(&failed, 1);
        assert_eq!(
            (
                &doc["Status"],
                &doc["ParkedSlices"],
                &doc["FreshnessLagSeconds"],
                &doc["Failed"]
            ),
            (&json!("error:State"), &json!(3), &json!(7200), &json!(1))
        );
        // Before a table's first commit there is no lag to tell, and none is declared.
        let first = Summary {
            freshness_lag_s: None,
            parked_now: None,
            ..failed
        };
        let doc = emf_document(&first, 1);
        assert!(doc.get("FreshnessLagSeconds").is_none());
        assert!(!metric_names(&doc).contains(&"FreshnessLagSeconds".into()));
        assert_eq!(doc["ParkedSlices"], 0);
    }
}
