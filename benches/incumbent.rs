//! Versus the incumbent (issue 6, target 1): Singer `tap-mixpanel` 1.8.0 (PyPI) and this
//! replicator on the same simulated export day, served by the same simulator.
//!
//! `cargo bench --bench incumbent` (`BENCH_EVENTS`, default 200,000). It installs the tap with
//! `benches/incumbent/setup.sh` (its own venv, pinned) and runs it through
//! `benches/incumbent/run_tap.py`, which points the tap's hard-coded Mixpanel URLs at the
//! simulator. The simulator runs in this process on core 1; each measured process runs alone on
//! core 0 (`taskset -c 0`). The tap writes its Singer messages to /dev/null; the replicator does
//! its whole job (dedup, gzip, local folder, commit). Events/s counts the day's deliveries (the
//! lines of the export body), the same number for both.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

fn main() {
    if !benching("incumbent") {
        return;
    }
    let events: u32 = env_or("BENCH_EVENTS", 200_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let incumbent = root.join("benches/incumbent");
    let ok = Command::new(incumbent.join("setup.sh"))
        .status()
        .expect("run benches/incumbent/setup.sh");
    assert!(ok.success(), "benches/incumbent/setup.sh failed");
    let python = incumbent.join(".venv/bin/python");
    let wrapper = incumbent.join("run_tap.py");

    let day = bench_day();
    let sim = simulator(day, events);
    let mut counter = std::io::sink();
    let raw = sim
        .write_export_body(day, day, None, None, &mut counter)
        .unwrap();
    let mut lines = LineCount(0);
    sim.write_export_body(day, day, None, None, &mut lines)
        .unwrap();
    let deliveries = lines.0;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(|| pin_thread(&[1]))
        .enable_all()
        .build()
        .unwrap();
    let running = rt.block_on(sim.serve(0)).unwrap();
    let url = running.url();
    let secret = sim.config().api_secret.clone();
    eprintln!(
        "day {day}: {events} events, {deliveries} deliveries, {:.1} MB raw JSONL; simulator at {url}",
        raw as f64 / 1e6
    );

    // The tap's config and catalog (discovery is not timed; only the export stream is selected).
    let work = tempfile::tempdir().unwrap();
    let next_day = day.tomorrow().unwrap();
    let config = serde_json::json!({
        "api_secret": secret,
        "date_window_size": "1",
        "attribution_window": "1",
        "project_timezone": "UTC",
        "start_date": format!("{day}T00:00:00Z"),
        "end_date": format!("{next_day}T00:00:00Z"),
        "select_properties_by_default": "true",
        "user_agent": "mixpanel-replicator-bench",
    });
    let config_path = work.path().join("config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let discovered = Command::new(&python)
        .arg(&wrapper)
        .arg("--config")
        .arg(&config_path)
        .arg("--discover")
        .env("MIXPANEL_SIM_URL", &url)
        .stderr(Stdio::null())
        .output()
        .expect("run the tap's discovery");
    assert!(discovered.status.success(), "tap discovery failed");
    let mut catalog: serde_json::Value = serde_json::from_slice(&discovered.stdout).unwrap();
    let streams = catalog["streams"].as_array_mut().unwrap();
    streams.retain(|s| s["tap_stream_id"] == "export");
    for m in streams[0]["metadata"].as_array_mut().unwrap() {
        if m["breadcrumb"].as_array().is_some_and(|b| b.is_empty()) {
            m["metadata"]["selected"] = true.into();
        }
    }
    let catalog_path = work.path().join("catalog.json");
    std::fs::write(&catalog_path, catalog.to_string()).unwrap();

    // The tap, alone on core 0.
    let log_path = work.path().join("tap.log");
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg("0")
        .arg(&python)
        .arg(&wrapper)
        .arg("--config")
        .arg(&config_path)
        .arg("--catalog")
        .arg(&catalog_path)
        .env("MIXPANEL_SIM_URL", &url);
    let tap = measure(
        cmd,
        Stdio::null(),
        Stdio::from(std::fs::File::create(&log_path).unwrap()),
    );
    let log = std::fs::read_to_string(&log_path).unwrap();
    let tap_records: u64 = log
        .lines()
        .filter_map(|l| l.split("Total endpoint records: ").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
        .expect("the tap reports its record count");
    assert_eq!(tap_records, deliveries, "the tap wrote every delivery");

    // The replicator, alone on core 0, then on both cores (sharing core 1 with the simulator).
    let ours = |cpus: &str| {
        let (u, records) = run_replicator(&url, day, cpus, &[("MIXPANEL_API_SECRET", &secret)]);
        assert_eq!(records, events as u64, "exactly the distinct events");
        u
    };
    let one = ours("0");
    let two = ours("0,1");

    let eps = |u: &Usage| deliveries as f64 / u.seconds;
    println!(
        "\n### Versus Singer tap-mixpanel 1.8.0 ({deliveries} deliveries of {events} events, {:.0} MB raw JSONL)\n",
        raw as f64 / 1e6
    );
    println!(
        "| program | cores | seconds | events/s | CPU s | peak RSS MiB | speed vs tap | memory vs tap |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, cores, u) in [
        ("tap-mixpanel 1.8.0 → /dev/null", "1", &tap),
        ("mixpanel-replicator → local gzip parts", "1", &one),
        ("mixpanel-replicator → local gzip parts", "2", &two),
    ] {
        println!(
            "| {name} | {cores} | {:.2} | {:.0} | {:.2} | {:.1} | {:.0}× | 1/{:.1} |",
            u.seconds,
            eps(u),
            u.cpu_seconds,
            u.max_rss_mib,
            eps(u) / eps(&tap),
            tap.max_rss_mib / u.max_rss_mib
        );
    }
    drop(running);
}

/// Counts the lines written to it.
struct LineCount(u64);

impl std::io::Write for LineCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += memchr::memchr_iter(b'\n', buf).count() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
