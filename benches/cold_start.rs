//! Cold start (issue 6, target 6): from process start to ready for the first event, excluding
//! network: the time from spawning the release binary as a Lambda function
//! (`AWS_LAMBDA_RUNTIME_API` set) to its first request to a fake Runtime API on loopback
//! (`GET /2018-06-01/runtime/invocation/next`, the request that waits for an event).
//!
//! `cargo bench --bench cold_start` (`BENCH_RUNS`, default 30). The function has its full
//! Lambda settings (secret id, bucket, state table); nothing is reachable at the AWS endpoint,
//! so any network call at start would show up as a stall or a failure.

#[path = "common/mod.rs"]
mod common;

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn main() {
    if !benching("cold_start") {
        return;
    }
    let runs: usize = env_or("BENCH_RUNS", 30);
    // Warm the page cache (a deployed function's image is read from its own cache too).
    let _ = Command::new(BIN).arg("--version").output();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let mut child = Command::new(BIN)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", "bench")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1769")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "bench")
            .env("AWS_SECRET_ACCESS_KEY", "bench")
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
            .env("MIXPANEL_SECRET_ID", "mixpanel-bench")
            .env("MIXPANEL_START_DATE", "2026-01-01")
            .env("OUTPUT_BUCKET", "bench")
            .env("STATE_TABLE", "bench-state")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        listener.set_nonblocking(false).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "the runtime closed the connection");
            head.extend_from_slice(&buf[..n]);
        }
        let elapsed = started.elapsed().as_secs_f64() * 1000.0;
        assert!(
            String::from_utf8_lossy(&head).starts_with("GET /2018-06-01/runtime/invocation/next"),
            "unexpected first request"
        );
        times.push(elapsed);
        // Our own child, by its handle.
        let _ = child.kill();
        let _ = child.wait();
    }
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    println!("\n### Cold start: spawn → first `invocation/next` request ({runs} runs)\n");
    println!("| min ms | median ms | p90 ms | max ms |");
    println!("|---|---|---|---|");
    println!(
        "| {:.1} | {:.1} | {:.1} | {:.1} |",
        times[0],
        pct(0.5),
        pct(0.9),
        times[times.len() - 1]
    );
}
