//! The summary of an invocation: one log line, and on Lambda CloudWatch Embedded Metric Format
//! metrics (namespace `MixpanelReplicator`, dimension `Table`).

use std::sync::atomic::Ordering;

use serde_json::json;

use crate::mixpanel::RequestStats;
use crate::schedule::Response;

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

/// Logs the summary line of an invocation and, when `emf`, prints its EMF metrics on stdout
/// (where Lambda's log capture turns them into CloudWatch metrics).
pub fn report(
    table: &str,
    outcome: Result<&Response, &crate::error::Error>,
    duration_ms: u64,
    before: StatsSnapshot,
    after: StatsSnapshot,
    freshness_lag_s: Option<u64>,
    emf: bool,
) {
    let d = after.since(before);
    let (failed, parked) = outcome.map_or((0, 0), |r| (r.failed, r.parked));
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
    tracing::info!(
        table,
        slice = %slice,
        status = %status,
        records,
        bytes,
        files,
        rejected,
        duration_ms,
        requests = d.requests,
        retries = d.retries,
        rate_limited = d.rate_limited,
        slice_failures = failed,
        parked,
        freshness_lag_s,
        "invocation summary"
    );
    if emf {
        let timestamp = jiff::Timestamp::now().as_millisecond();
        let mut doc = json!({
            "_aws": {
                "Timestamp": timestamp,
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
            "Table": table,
            "Status": status,
            "Slice": slice,
            "Records": records,
            "Bytes": bytes,
            "Files": files,
            "RejectedLines": rejected,
            "Retries": d.retries,
            "RateLimited": d.rate_limited,
            "DurationMs": duration_ms,
            "Failed": u64::from(outcome.is_err()),
            // Attempts that failed and were recorded on their slice (the invocation answered).
            "SliceFailures": failed,
            // Slices of the table parked now, waiting for a person.
            "ParkedSlices": parked,
        });
        // How old the table's newest replicated data is (left out before its first commit).
        if let Some(lag) = freshness_lag_s {
            doc["FreshnessLagSeconds"] = json!(lag);
            if let Some(metrics) = doc["_aws"]["CloudWatchMetrics"][0]["Metrics"].as_array_mut() {
                metrics.push(json!({"Name": "FreshnessLagSeconds", "Unit": "Seconds"}));
            }
        }
        println!("{doc}");
    }
}
