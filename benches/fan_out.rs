//! Fan-out throughput: N queue workers on the SQS path, against the simulator and moto.
//!
//! A range event queues a backfill (`FAN_OUT_BENCH_DAYS`, default 30) and sends one message per day to the fan-out queue
//! (moto); N workers each receive one message at a time, run it through the handler as the
//! event source mapping's SQS event would be, and delete it when it is not a batch item
//! failure — the Lambda path without Lambda's poller. The simulator enforces Mixpanel's export
//! limits scaled in time (`FAN_OUT_BENCH_WINDOW_SECS` stands for the hour: 60 requests per
//! window, 3 per second) and the replicator's shared budget is set to the same. Reported per N:
//! wall time, days per second, the speed-up over one worker, export requests and 429s; every
//! run checks that each day equals the simulator's ground truth.
//!
//! `cargo bench --bench fan_out` (moto from `scripts/setup-tools`, `MOTO_SERVER` set).
//! `FAN_OUT_BENCH_EVENTS` events a day (default 2000), sent by the simulator at
//! `FAN_OUT_BENCH_LINES_PER_SEC` (default 2000: Mixpanel's own pace, about a second a day, is
//! what a worker waits on), `FAN_OUT_BENCH_WORKERS` (default "1,3,5"). `FAN_OUT_BENCH_SPLIT=1`
//! makes every day one Mixpanel cannot export at once (each request for more than an hour is
//! cut off `terminated early`), so each day is replicated as its 24 hour slices.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mixpanel_replicator::handler::sqs::BatchResponse;
use mixpanel_replicator::handler::{self, Answer};
use mixpanel_sim::{Fault, FaultRule, RateLimit};
use serde_json::json;
use support::aws::{create_queue, delete, receive, sqs_event};
use support::harness::*;

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

struct Run {
    workers: usize,
    wall: Duration,
    requests: usize,
    rate_limited: usize,
}

async fn run(
    workers: usize,
    days: u32,
    split: bool,
    events: u32,
    window_secs: u64,
    lines_per_second: u32,
) -> Run {
    let mut cfg = sim_config("UTC", days, events);
    cfg.rate_limit = Some(RateLimit {
        requests: 60,
        window: Duration::from_secs(window_secs),
    });
    let first = cfg.first_day;
    let last = minus(today_in("UTC"), 1);
    let project = Project::start(cfg).await;
    if split {
        // Days Mixpanel cannot export at once: every request for more than an hour of a day is
        // cut off, so each day is split into its 24 hours, as a day too big would be. (The
        // simulator applies the first rule that matches: these come before the pace.)
        for day in support::harness::days(first, last) {
            project.simulator().push_fault(FaultRule::export_day(
                day,
                Some(Duration::from_secs(3600)),
                Fault::TerminatedEarly { after_lines: 30 },
            ));
        }
    }
    // Mixpanel sends an export body at its own pace: the time a worker waits, not computes.
    project.simulator().push_fault(FaultRule::new(
        "/api/2.0/export",
        FaultRule::PERSISTENT,
        Fault::SlowBody { lines_per_second },
    ));
    let names = format!("bench-{workers}");
    let aws = Aws::start_for(&project, &names, &names, &names).await;
    let sqs = aws_sdk_sqs::Client::new(&aws.sdk);
    let url = create_queue(&sqs, &names).await;
    let window = window_secs.to_string();
    let extra = [
        ("FAN_OUT_QUEUE_URL", url.as_str()),
        ("MIXPANEL_EXPORT_REQUESTS_PER_WINDOW", "60"),
        ("MIXPANEL_RATE_WINDOW_SECONDS", window.as_str()),
        ("MIXPANEL_EXPORT_REQUESTS_PER_SECOND", "3"),
    ];
    let planner = aws.app(&project, &names, &names, &names, &extra).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    handler::handle(
        &planner,
        json!({"table": "export", "from": first.to_string(), "to": last.to_string()}),
        deadline,
    )
    .await
    .expect("the range fans out");

    let started = Instant::now();
    // When the last day was finished, ms after the start (idle polls at the end not counted).
    let finished = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    let sqs = Arc::new(sqs);
    for _ in 0..workers {
        let app = aws.app(&project, &names, &names, &names, &extra).await;
        let (sqs, url, finished) = (sqs.clone(), url.clone(), finished.clone());
        tasks.push(tokio::spawn(async move {
            let mut idle_polls = 0;
            while idle_polls < 20 {
                let messages = receive(&sqs, &url, 1, 900).await;
                if messages.is_empty() {
                    idle_polls += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                idle_polls = 0;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                let answer = handler::answer(&app, sqs_event(&url, &messages), deadline, false)
                    .await
                    .expect("the SQS event runs");
                match answer {
                    Answer::Batch(b) if b == BatchResponse::default() => {
                        delete(&sqs, &url, &messages[0]).await;
                        finished.fetch_max(
                            started.elapsed().as_millis() as u64,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                    // Not finished: it becomes visible again (here at once) and is retried.
                    Answer::Batch(_) => {
                        sqs.change_message_visibility()
                            .queue_url(&url)
                            .receipt_handle(messages[0].receipt_handle().unwrap_or_default())
                            .visibility_timeout(0)
                            .send()
                            .await
                            .expect("the message is made visible again");
                    }
                    other => panic!("an SQS event answered as an invocation: {other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("a worker");
    }
    let wall = Duration::from_millis(finished.load(std::sync::atomic::Ordering::Relaxed));
    assert_exact(&planner, project.simulator(), first, last, None).await;
    let requests = project.simulator().requests();
    let exports: Vec<_> = requests
        .iter()
        .filter(|r| r.path == "/api/2.0/export")
        .collect();
    Run {
        workers,
        wall,
        requests: exports.len(),
        rate_limited: exports.iter().filter(|r| r.status == 429).count(),
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("fan_out: run with `cargo bench --bench fan_out`");
        return;
    }
    let events: u32 = var("FAN_OUT_BENCH_EVENTS", "2000").parse().unwrap();
    let days: u32 = var("FAN_OUT_BENCH_DAYS", "30").parse().unwrap();
    let split = var("FAN_OUT_BENCH_SPLIT", "0") == "1";
    let pace: u32 = var("FAN_OUT_BENCH_LINES_PER_SEC", "2000").parse().unwrap();
    let window: u64 = var("FAN_OUT_BENCH_WINDOW_SECS", "60").parse().unwrap();
    let workers: Vec<usize> = var("FAN_OUT_BENCH_WORKERS", "1,3,5")
        .split(',')
        .map(|w| w.trim().parse().unwrap())
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    println!(
        "{days} days x {events} events sent at {pace} lines/s{}, limits 60 per {window} s and 3 per s (the hour scaled to {window} s)",
        if split {
            ", each day split into hours"
        } else {
            ""
        }
    );
    println!(
        "| workers | wall s | days/s | speed-up | per worker | export requests | requests/s | 429s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut one: Option<f64> = None;
    for n in workers {
        let r = runtime.block_on(run(n, days, split, events, window, pace));
        let rate = f64::from(days) / r.wall.as_secs_f64();
        let base = *one.get_or_insert(rate);
        println!(
            "| {} | {:.1} | {:.2} | {:.2}x | {:.2} | {} | {:.2} | {} |",
            r.workers,
            r.wall.as_secs_f64(),
            rate,
            rate / base,
            rate / base / r.workers as f64,
            r.requests,
            r.requests as f64 / r.wall.as_secs_f64(),
            r.rate_limited
        );
    }
}
