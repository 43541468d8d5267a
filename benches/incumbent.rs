//! Versus the incumbent (issue 6, target 1): Singer `tap-mixpanel` 1.8.0 (PyPI) and this
//! replicator on the same simulated export day.
//!
//! `cargo bench --bench incumbent` (`BENCH_EVENTS`, default 200,000, over `BENCH_DAYS` days,
//! default 1, ending yesterday). It installs the tap with
//! `benches/incumbent/setup.sh` (its own venv, pinned) and runs it through
//! `benches/incumbent/run_tap.py`, which points the tap's hard-coded Mixpanel URLs elsewhere.
//! The tap's discovery (not timed) reads the simulator; the timed runs read the simulator's days,
//! gzip-compressed once for every range of whole days a program may ask for, from a static
//! server in this process on core 1, so that no measured run shares a core with the simulator's
//! generator. `BENCH_TAP=skip` leaves the tap out (its figures then come from
//! `BENCH_TAP_SECONDS` and `BENCH_TAP_RSS_MIB`), to profile the replicator's rows. Each measured process runs on core 0
//! (`taskset -c 0`); the replicator also on both cores, once with gzip parts from a request a
//! day and once with zstd parts from multi-day requests (its default window). Over several days
//! the tap keeps its default 30-day window (one request for them all). The tap writes its
//! Singer messages to /dev/null; the replicator does its whole job (dedup, compression, local
//! folder, commit). Events/s counts the deliveries (the lines of the export bodies), the same
//! number for both.
//!
//! Three more rows give the floor of this project's core: `mixpanel-replicator --version` (the
//! binary's own resident memory before any work) and `examples/read_export.rs` (tokio + reqwest
//! reading and gunzipping the same body and discarding it), on tokio's multi-thread runtime and
//! on a single-threaded one.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use mixpanel_sim::{SimConfig, Simulator};

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

    // `BENCH_DAYS` days ending yesterday (UTC), `events` distinct events in all.
    let days: u32 = env_or("BENCH_DAYS", 1);
    let last = bench_day();
    let first = last
        .checked_sub(jiff::Span::new().days(i64::from(days - 1)))
        .unwrap();
    let today = last.tomorrow().unwrap();
    let sim = Simulator::new(SimConfig {
        seed: 42,
        timezone: "UTC".into(),
        first_day: first,
        days,
        events_per_day: events / days,
        ..SimConfig::default()
    });
    let events = events / days * days;
    // A body for every range of whole days a program may ask for: each day (the tap's one-day
    // windows, the replicator's probe), every run of days (the replicator's multi-day windows)
    // and the whole range (the tap's 30-day window); a range ending today is the same body,
    // since today is empty.
    let mut raw_days = Vec::new();
    let (mut raw, mut deliveries) = (0, 0);
    let mut d = first;
    while d <= last {
        let body = raw_body(&sim, d);
        raw += body.len();
        deliveries += memchr::memchr_iter(b'\n', &body).count() as u64;
        raw_days.push((d, body));
        d = d.tomorrow().unwrap();
    }
    let mut ranges = Vec::new();
    for a in 0..raw_days.len() {
        for b in a..raw_days.len() {
            ranges.push((a, b));
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let built = std::sync::Mutex::new(HashMap::new());
    std::thread::scope(|scope| {
        for _ in 0..std::thread::available_parallelism().map_or(1, |n| n.get()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(a, b)) = ranges.get(i) else { break };
                    let body: Vec<u8> = raw_days[a..=b]
                        .iter()
                        .flat_map(|(_, raw)| raw.iter().copied())
                        .collect();
                    let gz = Arc::new(gzip(&body, 6));
                    let mut built = built.lock().unwrap();
                    built.insert((raw_days[a].0, raw_days[b].0), gz.clone());
                    if b + 1 == raw_days.len() {
                        built.insert((raw_days[a].0, today), gz);
                    }
                }
            });
        }
    });
    let bodies = built.into_inner().unwrap();
    let server = StaticServer::start_ranges(bodies, vec![1]);
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
        "{first}..{last}: {events} events, {deliveries} deliveries, {:.1} MB raw JSONL; simulator at {url}",
        raw as f64 / 1e6
    );
    // What a program asked the static server for.
    let requests = |who: &str| {
        eprintln!(
            "{who}: served {:?}, unknown (answered empty) {:?}",
            server.served.lock().unwrap(),
            server.unknown.lock().unwrap()
        );
        server.clear_log();
    };

    // The tap's config and catalog (discovery is not timed; only the export stream is selected).
    let work = tempfile::tempdir().unwrap();
    // Over several days the tap keeps its own default window (30 days: one request).
    let tap_window = if days > 1 { "30" } else { "1" };
    let config = serde_json::json!({
        "api_secret": secret,
        "date_window_size": tap_window,
        "attribution_window": "1",
        "project_timezone": "UTC",
        "start_date": format!("{first}T00:00:00Z"),
        "end_date": format!("{today}T00:00:00Z"),
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

    // The tap, alone on core 0 (`BENCH_TAP=skip`: not run, its figures from `BENCH_TAP_SECONDS`
    // and `BENCH_TAP_RSS_MIB`, for profiling the replicator's rows).
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
        .env("MIXPANEL_SIM_URL", &server.url);
    let tap = if std::env::var("BENCH_TAP").as_deref() == Ok("skip") {
        Usage {
            seconds: env_or("BENCH_TAP_SECONDS", 48.19),
            max_rss_mib: env_or("BENCH_TAP_RSS_MIB", 34.8),
            cpu_seconds: 0.0,
        }
    } else {
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
        requests("tap");
        tap
    };

    // The replicator, alone on core 0, then on both cores (sharing core 1 with the server):
    // gzip parts from one request per day, then zstd parts from multi-day requests.
    let ours = |cpus: &str, env: &[(&str, &str)]| {
        let (u, records) = run_replicator_days(&server.url, first, last, cpus, env);
        assert_eq!(records, events as u64, "exactly the distinct events");
        requests(&format!("replicator on {cpus} {env:?}"));
        u
    };
    let daily = [("MIXPANEL_EXPORT_WINDOW_DAYS", "1")];
    let zstd_windows = [("OUTPUT_COMPRESSION", "zstd")];
    // `BENCH_ROWS` (a comma list of `gzip1,gzip2,zstd1,zstd2`, default all) picks the
    // replicator's rows; `BENCH_REPEAT` runs each that many times and keeps every figure.
    let rows = std::env::var("BENCH_ROWS").unwrap_or_else(|_| "gzip1,gzip2,zstd1,zstd2".into());
    let repeat: usize = env_or("BENCH_REPEAT", 1);
    let row = |name: &str, cpus: &str, env: &[(&str, &str)]| -> Vec<Usage> {
        if !rows.split(',').any(|r| r == name) {
            return Vec::new();
        }
        (0..repeat).map(|_| ours(cpus, env)).collect()
    };
    let one = row("gzip1", "0", &daily);
    let two = row("gzip2", "0,1", &daily);
    let one_zstd = row("zstd1", "0", &zstd_windows);
    let two_zstd = row("zstd2", "0,1", &zstd_windows);

    // The floor of the core: the binary doing nothing, and tokio + reqwest only reading the day.
    let mut version = Command::new("taskset");
    version.args(["-c", "0", BIN, "--version"]);
    let idle = measure(version, Stdio::null(), Stdio::inherit());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(&cargo)
        .args(["build", "--release", "--example", "read_export"])
        .current_dir(root)
        .status()
        .expect("build examples/read_export.rs");
    assert!(built.success(), "building examples/read_export.rs failed");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let reader = target.join("release/examples/read_export");
    let read_only = |extra: &[&str]| {
        let out = work.path().join("floor.txt");
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "0"])
            .arg(&reader)
            .arg(format!(
                "{}/api/2.0/export?from_date={first}&to_date={last}",
                server.url
            ))
            .args(extra);
        let u = measure(
            cmd,
            Stdio::from(std::fs::File::create(&out).unwrap()),
            Stdio::inherit(),
        );
        let lines: u64 = std::fs::read_to_string(&out)
            .unwrap()
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .expect("read_export prints its line count");
        assert_eq!(lines, deliveries, "read_export read every delivery");
        u
    };
    let floor = read_only(&[]);
    let floor_one_thread = read_only(&["--current-thread"]);

    let eps = |u: &Usage| deliveries as f64 / u.seconds;
    println!(
        "\n### Versus Singer tap-mixpanel 1.8.0 ({deliveries} deliveries of {events} events over {days} days, {:.0} MB raw JSONL)\n",
        raw as f64 / 1e6
    );
    println!(
        "| program | cores | seconds | events/s | CPU s | peak RSS MiB | speed vs tap | memory vs tap |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let tap_row = vec![tap];
    let (floor, floor_one_thread) = (vec![floor], vec![floor_one_thread]);
    for (name, cores, u) in [
        ("tap-mixpanel 1.8.0 → /dev/null", "1", &tap_row),
        (
            "mixpanel-replicator → local gzip parts, a request a day",
            "1",
            &one,
        ),
        (
            "mixpanel-replicator → local gzip parts, a request a day",
            "2",
            &two,
        ),
        (
            "mixpanel-replicator → local zstd parts, multi-day requests",
            "1",
            &one_zstd,
        ),
        (
            "mixpanel-replicator → local zstd parts, multi-day requests",
            "2",
            &two_zstd,
        ),
        ("floor: tokio + reqwest read + gunzip only", "1", &floor),
        (
            "floor: the same on a single-threaded runtime",
            "1",
            &floor_one_thread,
        ),
    ]
    .into_iter()
    .flat_map(|(name, cores, runs)| runs.iter().map(move |u| (name, cores, u)))
    {
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
    println!(
        "| floor: `mixpanel-replicator --version` | 1 | {:.2} | — | {:.2} | {:.1} | — | 1/{:.1} |",
        idle.seconds,
        idle.cpu_seconds,
        idle.max_rss_mib,
        tap.max_rss_mib / idle.max_rss_mib
    );
    drop(running);
}
