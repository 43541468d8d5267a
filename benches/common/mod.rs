//! Shared pieces of the benchmarks: the simulated day, a static gzip server, core pinning,
//! measuring a child process.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use mixpanel_sim::{Date, SimConfig, Simulator};

/// The release binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mixpanel-replicator");

/// Only `cargo bench` (which passes `--bench`) measures; `cargo test --all-targets` returns.
pub fn benching(name: &str) -> bool {
    let yes = std::env::args().any(|a| a == "--bench");
    if !yes {
        eprintln!("{name}: run with `cargo bench --bench {name}`");
    }
    yes
}

/// An environment variable parsed, or a default.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Yesterday in UTC: a day the export API accepts.
pub fn bench_day() -> Date {
    let today = jiff::Timestamp::now()
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .date();
    today.yesterday().unwrap()
}

/// The simulator of one UTC day of `events` distinct events (plus ~3 % duplicate deliveries).
pub fn simulator(day: Date, events: u32) -> Simulator {
    Simulator::new(SimConfig {
        seed: 42,
        timezone: "UTC".into(),
        first_day: day,
        days: 1,
        events_per_day: events,
        ..SimConfig::default()
    })
}

/// The day's raw export body (JSONL, uncompressed).
pub fn raw_body(sim: &Simulator, day: Date) -> Vec<u8> {
    let mut body = Vec::new();
    sim.write_export_body(day, day, None, None, &mut body)
        .unwrap();
    body
}

/// gzip at `level`, as a server sends it.
pub fn gzip(raw: &[u8], level: u32) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 4),
        flate2::Compression::new(level),
    );
    enc.write_all(raw).unwrap();
    enc.finish().unwrap()
}

/// Pins the calling thread to `cpus` (Linux).
pub fn pin_thread(cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t filled by CPU_SET, for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        let r = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(r, 0, "sched_setaffinity failed");
    }
}

/// A tiny HTTP/1.1 server on loopback answering export requests with pre-compressed bodies
/// (`Content-Encoding: gzip`), so that the measured process is the replicator and not the
/// simulator's generator and compressor. Its threads are pinned to `cpus`. A request is answered
/// by its `from_date` and `to_date`; a range it holds no body for gets an empty one (the
/// replicator also plans today), and is recorded in [`StaticServer::unknown`].
pub struct StaticServer {
    pub url: String,
    /// The ranges asked for that had no body, `from..to`.
    pub unknown: Arc<std::sync::Mutex<Vec<String>>>,
    /// The ranges served with a body, `from..to`, in order.
    pub served: Arc<std::sync::Mutex<Vec<String>>>,
}

/// The `YYYY-MM-DD` after `name=` in a request line.
fn query_date<'a>(request: &'a str, name: &str) -> Option<&'a str> {
    let at = request.find(&format!("{name}="))? + name.len() + 1;
    request.get(at..at + 10)
}

impl StaticServer {
    /// Answers requests for `day` alone with `gz`.
    pub fn start(gz: Arc<Vec<u8>>, day: Date, cpus: Vec<usize>) -> StaticServer {
        StaticServer::start_ranges([((day, day), gz)].into_iter().collect(), cpus)
    }

    /// Answers a request for `from..=to` with the body `bodies` holds for it.
    pub fn start_ranges(
        bodies: std::collections::HashMap<(Date, Date), Arc<Vec<u8>>>,
        cpus: Vec<usize>,
    ) -> StaticServer {
        let empty = Arc::new(gzip(b"", 6));
        let bodies: Arc<std::collections::HashMap<String, Arc<Vec<u8>>>> = Arc::new(
            bodies
                .into_iter()
                .map(|((from, to), gz)| (format!("{from}..{to}"), gz))
                .collect(),
        );
        let unknown: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let served: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (unknown_log, served_log) = (unknown.clone(), served.clone());
        std::thread::spawn(move || {
            pin_thread(&cpus);
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let bodies = bodies.clone();
                let empty = empty.clone();
                let cpus = cpus.clone();
                let (unknown, served) = (unknown_log.clone(), served_log.clone());
                std::thread::spawn(move || {
                    pin_thread(&cpus);
                    // Read the request head (no request here has a body).
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let request = String::from_utf8_lossy(&head);
                    let line = request.lines().next().unwrap_or("");
                    let range = match (query_date(line, "from_date"), query_date(line, "to_date")) {
                        (Some(from), Some(to)) => format!("{from}..{to}"),
                        _ => String::new(),
                    };
                    let gz = match bodies.get(&range) {
                        Some(gz) => {
                            served.lock().unwrap().push(range);
                            gz.clone()
                        }
                        None => {
                            unknown.lock().unwrap().push(range);
                            empty
                        }
                    };
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        gz.len()
                    );
                    if s.write_all(reply.as_bytes()).is_ok() {
                        for c in gz.chunks(256 * 1024) {
                            if s.write_all(c).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        StaticServer {
            url,
            unknown,
            served,
        }
    }

    /// Forgets the ranges asked for so far.
    pub fn clear_log(&self) {
        self.unknown.lock().unwrap().clear();
        self.served.lock().unwrap().clear();
    }
}

/// What a child process took.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub seconds: f64,
    pub max_rss_mib: f64,
    pub cpu_seconds: f64,
}

/// Runs `cmd` to completion under GNU time (`/usr/bin/time`), which reports the child's peak
/// RSS: wall time, peak RSS and CPU time.
///
/// The child is forked by `time`, a small process, because Linux counts the RSS a child had at
/// fork (a copy of its parent) into its `ru_maxrss`: forked from this benchmark, which holds the
/// day in memory, every child would seem to need hundreds of MiB.
pub fn measure(cmd: Command, stdout: Stdio, stderr: Stdio) -> Usage {
    let report = tempfile::NamedTempFile::new().unwrap();
    let mut timed = Command::new("/usr/bin/time");
    timed
        .args(["-f", "%M %U %S", "-o"])
        .arg(report.path())
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdout(stdout)
        .stderr(stderr);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => timed.env(k, v),
            None => timed.env_remove(k),
        };
    }
    let started = Instant::now();
    let status = timed.status().expect("run /usr/bin/time (GNU time)");
    let seconds = started.elapsed().as_secs_f64();
    assert!(status.success(), "the process failed: {status}");
    let text = std::fs::read_to_string(report.path()).unwrap();
    let f: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(f.len(), 3, "unexpected GNU time report: {text:?}");
    Usage {
        seconds,
        max_rss_mib: f[0] / 1024.0,
        cpu_seconds: f[1] + f[2],
    }
}

/// `mixpanel-replicator sync --table export` of `day` from `url` into a new folder, on `cpus`
/// (`taskset`), returning its usage and the committed record count.
pub fn run_replicator(
    url: &str,
    day: Date,
    cpus: &str,
    extra_env: &[(&str, &str)],
) -> (Usage, u64) {
    run_replicator_days(url, day, day, cpus, extra_env)
}

/// `mixpanel-replicator sync --table export` from `first` on, from `url` into a new folder, on
/// `cpus` (`taskset`), returning its usage and the records committed for `first..=last`.
pub fn run_replicator_days(
    url: &str,
    first: Date,
    last: Date,
    cpus: &str,
    extra_env: &[(&str, &str)],
) -> (Usage, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpus]);
    // `BENCH_WRAP`: a command the replicator runs under (a profiler: `perf record -g --`).
    if let Ok(wrap) = std::env::var("BENCH_WRAP") {
        cmd.args(wrap.split_whitespace());
    }
    cmd.args([BIN, "sync", "--table", "export", "--out"])
        .arg(dir.path())
        .env("MIXPANEL_API_SECRET", "bench-secret")
        .env("MIXPANEL_START_DATE", first.to_string())
        .env("MIXPANEL_API_URL", url)
        .env("MIXPANEL_DATA_URL", url)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs(extra_env.iter().copied());
    let usage = measure(cmd, Stdio::null(), Stdio::inherit());
    let mut records = 0;
    let mut day = first;
    while day <= last {
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join(format!("export/date={day}/_manifest.json"))).unwrap(),
        )
        .unwrap();
        records += m["records"].as_u64().unwrap();
        day = day.tomorrow().unwrap();
    }
    (usage, records)
}
