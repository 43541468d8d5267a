//! One request budget for all invocations: concurrent workers share Mixpanel's limit through
//! the state store, so a fan-out never meets a 429 and still uses the allowed rate.

mod support;

use std::time::Duration;

use mixpanel_replicator::handler::{self, Status};
use mixpanel_sim::RateLimit;
use serde_json::json;
use support::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_workers_backfilling_meet_no_429_and_use_over_90_percent_of_the_allowed_rate() {
    const LIMIT: u32 = 10;
    const WINDOW_SECS: u64 = 12;
    let mut cfg = sim_config("UTC", 39, 5);
    cfg.rate_limit = Some(RateLimit {
        requests: LIMIT,
        window: Duration::from_secs(WINDOW_SECS),
    });
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let aws = Aws::start_for(&project, "budget-bucket", "budget-state", "creds").await;
    let limits = [
        ("MIXPANEL_EXPORT_REQUESTS_PER_WINDOW", LIMIT.to_string()),
        ("MIXPANEL_RATE_WINDOW_SECONDS", WINDOW_SECS.to_string()),
        ("MIXPANEL_EXPORT_REQUESTS_PER_SECOND", "1000".to_string()),
        // One request per day, so that 40 requests meet the budget (windows are tested apart).
        ("MIXPANEL_EXPORT_WINDOW_DAYS", "1".to_string()),
    ];
    let extra: Vec<(&str, &str)> = limits.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let today = today_in("UTC");
    // The backfill fans out into one event per day, all queued.
    let planner = aws
        .app(&project, "budget-bucket", "budget-state", "creds", &extra)
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let r = handler::handle(
        &planner,
        json!({"table": "export", "from": first.to_string(), "to": today.to_string()}),
        deadline,
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.queued), (Status::FanOut, 40));

    let mut workers = Vec::new();
    for _ in 0..8 {
        let app = aws
            .app(&project, "budget-bucket", "budget-state", "creds", &extra)
            .await;
        workers.push(tokio::spawn(async move {
            let mut done = 0;
            loop {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                let r = handler::handle(&app, json!({"table": "export"}), deadline)
                    .await
                    .unwrap();
                // A worker works through days while its deadline allows: `partial` when the
                // deadline came with days left, never a failure.
                match r.status {
                    Status::Done | Status::Partial if r.failed == 0 => done += r.slices,
                    Status::Idle => return done,
                    other => panic!("unexpected {other:?}: {r:?}"),
                }
            }
        }));
    }
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    assert_eq!(total, 40);

    let requests = project.simulator().requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "no 429, no error: {statuses:?}"
    );
    assert_eq!(requests.len(), 40, "one request per day");
    // The window is long against the work of a slice (eight workers need one slice each per
    // 9.6 s to keep the budget busy), so the budget is what holds them back, on a slow or
    // loaded machine too. Whenever the budget is what holds the workers back, a slot freed by request j - LIMIT
    // must be used as soon as the sliding window allows: request j follows request j - LIMIT
    // by about one window. The achieved rate over the allowed rate is WINDOW / mean gap.
    let at: Vec<u64> = requests.iter().map(|r| r.at_ms).collect();
    let gaps: Vec<u64> = (LIMIT as usize..at.len())
        .map(|j| at[j] - at[j - LIMIT as usize])
        .collect();
    assert!(
        gaps.iter().all(|g| *g >= WINDOW_SECS * 1000),
        "never more than {LIMIT} in a window: {gaps:?}"
    );
    let mean_gap = gaps.iter().sum::<u64>() as f64 / gaps.len() as f64;
    let utilization = (WINDOW_SECS * 1000) as f64 / mean_gap;
    assert!(
        utilization >= 0.9,
        "used {:.0}% of the allowed rate: {gaps:?}",
        utilization * 100.0
    );
    assert_exact(&planner, project.simulator(), first, today, None).await;
}
