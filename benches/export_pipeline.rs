//! One simulated export day of over 1 GB of raw JSONL through the whole pipeline (HTTP, gunzip,
//! transform, dedup, gzip, sink, commit) into the local folder and into moto's S3.
//!
//! The replicator runs as its own release process, so its peak RSS is measured alone; the
//! simulator runs in this process. `cargo bench --bench export_pipeline`; set
//! `BENCH_EVENTS` (default 2,000,000 events, about 1.1 GB) and `BENCH_TARGETS` (`local,s3`).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::Instant;

use mixpanel_sim::{SimConfig, Simulator};
use support::harness::{minus, today_in};

const BIN: &str = env!("CARGO_BIN_EXE_mixpanel-replicator");

struct Run {
    target: &'static str,
    seconds: f64,
    max_rss_mb: f64,
    records: u64,
}

/// Runs the replicator to completion and returns (wall seconds, peak RSS in MiB), measured by
/// GNU time (see `common::measure`).
fn measure(cmd: Command) -> (f64, f64) {
    let u = common::measure(cmd, Stdio::null(), Stdio::inherit());
    (u.seconds, u.max_rss_mib)
}

fn main() {
    // `cargo test --all-targets` runs bench targets too: only `cargo bench` (which passes
    // `--bench`) measures.
    if !common::benching("export_pipeline") {
        return;
    }
    let events: u32 = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let targets = std::env::var("BENCH_TARGETS").unwrap_or_else(|_| "local,s3".into());
    let day = minus(today_in("UTC"), 1);
    let config = SimConfig {
        seed: 42,
        timezone: "UTC".into(),
        first_day: day,
        days: 1,
        events_per_day: events,
        ..SimConfig::default()
    };
    let sim = Simulator::new(config.clone());
    let mut counter = std::io::sink();
    let t = Instant::now();
    let raw = sim
        .write_export_body(day, day, None, None, &mut counter)
        .unwrap();
    let gen_secs = t.elapsed().as_secs_f64();
    let truth_rows = events as u64; // distinct events per day before duplicates
    eprintln!(
        "day {day}: {:.1} MB raw JSONL ({events} events + duplicates); simulator generates it at {:.0} MB/s",
        raw as f64 / 1e6,
        raw as f64 / 1e6 / gen_secs
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let running = rt.block_on(sim.serve(0)).unwrap();
    let base_env = vec![
        ("MIXPANEL_API_SECRET".to_string(), config.api_secret.clone()),
        ("MIXPANEL_START_DATE".to_string(), day.to_string()),
        ("MIXPANEL_API_URL".to_string(), running.url()),
        ("MIXPANEL_DATA_URL".to_string(), running.url()),
        ("RUST_LOG".to_string(), "warn".to_string()),
    ];

    let mut runs = Vec::new();
    if targets.contains("local") {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["sync", "--table", "export", "--out"])
            .arg(dir.path())
            .envs(base_env.clone());
        let (seconds, max_rss_mb) = measure(cmd);
        let records =
            manifest_records(&dir.path().join(format!("export/date={day}/_manifest.json")));
        runs.push(Run {
            target: "local folder",
            seconds,
            max_rss_mb,
            records,
        });
    }
    if targets.contains("s3") {
        let aws = rt.block_on(support::harness::Aws::start());
        rt.block_on(async {
            support::aws::create_bucket(&aws_sdk_s3::Client::new(&aws.sdk), "bench").await;
            support::aws::create_state_table(
                &aws_sdk_dynamodb::Client::new(&aws.sdk),
                "bench-state",
            )
            .await;
        });
        let mut cmd = Command::new(BIN);
        cmd.args(["sync", "--table", "export"])
            .envs(base_env.clone())
            .envs(aws.moto.env())
            .env("OUTPUT_BUCKET", "bench")
            .env("STATE_TABLE", "bench-state");
        let (seconds, max_rss_mb) = measure(cmd);
        let body = rt.block_on(async {
            aws_sdk_s3::Client::new(&aws.sdk)
                .get_object()
                .bucket("bench")
                .key(format!("mixpanel/export/date={day}/_manifest.json"))
                .send()
                .await
                .unwrap()
                .body
                .collect()
                .await
                .unwrap()
                .into_bytes()
        });
        let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
        runs.push(Run {
            target: "moto S3 + DynamoDB",
            seconds,
            max_rss_mb,
            records: m["records"].as_u64().unwrap(),
        });
    }

    println!("| target | raw MB | seconds | MB/s raw JSONL | events/s | peak RSS MiB |");
    println!("|---|---|---|---|---|---|");
    for r in runs {
        assert!(
            r.records >= truth_rows,
            "{} records < {truth_rows}",
            r.records
        );
        println!(
            "| {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} |",
            r.target,
            raw as f64 / 1e6,
            r.seconds,
            raw as f64 / 1e6 / r.seconds,
            r.records as f64 / r.seconds,
            r.max_rss_mb
        );
    }
}

fn manifest_records(path: &std::path::Path) -> u64 {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    m["records"].as_u64().unwrap()
}
