//! A scheduled invocation works through the pending slices while its deadline allows, not one
//! slice per schedule tick: a small backfill takes one invocation, and one whose time runs out
//! answers `partial` with what it committed, oldest first, the rest pending.

mod support;

use std::time::Duration;

use mixpanel_replicator::handler::{self, Status};
use mixpanel_replicator::state::{SliceId, SliceStatus};
use mixpanel_replicator::tables::Table;
use mixpanel_sim::{Fault, FaultRule};
use serde_json::json;
use support::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_scheduled_invocation_commits_a_small_backfill_day_by_day() {
    let cfg = sim_config("UTC", 10, 40);
    let first = cfg.first_day;
    let today = today_in("UTC");
    let project = Project::start(cfg).await;
    let (_dir, app) = project.temp_app(&[]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let r = handler::handle(&app, json!({"table": "export"}), deadline)
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.queued, r.slices),
        (Status::Done, 11, 11),
        "{r:?}"
    );
    // The oldest day alone (no history near it yet), then the ten others as one window.
    let all = days(first, today);
    assert_eq!(
        r.slice.as_deref(),
        Some(format!("{first},{}..{today}", all[1]).as_str())
    );
    assert_exact(&app, project.simulator(), first, today, None).await;
    let total: u64 = project
        .simulator()
        .requests()
        .iter()
        .filter(|q| q.path == "/api/2.0/export")
        .count() as u64;
    assert_eq!(total, 2, "a probe, then one window");
    let again = handler::handle(&app, json!({"table": "export"}), deadline)
        .await
        .unwrap();
    assert_eq!(again.status, Status::Idle, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocation_whose_time_runs_out_answers_partial_with_the_oldest_days_committed() {
    let cfg = sim_config("UTC", 10, 40);
    let first = cfg.first_day;
    let today = today_in("UTC");
    let project = Project::start(cfg).await;
    // Every body takes about a second: a few fit in a short invocation, not eleven.
    project.simulator().push_fault(FaultRule::new(
        "/api/2.0/export",
        FaultRule::PERSISTENT,
        Fault::SlowBody {
            lines_per_second: 40,
        },
    ));
    let (_dir, app) = project.temp_app(&[]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    let r = handler::handle(&app, json!({"table": "export"}), deadline)
        .await
        .unwrap();
    assert_eq!(r.status, Status::Partial, "{r:?}");
    assert!(r.slices >= 1 && r.slices < 11, "{r:?}");
    assert!(
        r.reason
            .as_deref()
            .unwrap_or_default()
            .contains("stay pending"),
        "{r:?}"
    );
    // The committed days are the oldest ones, each exact; the others are pending, untouched.
    let committed = days(first, today)
        .into_iter()
        .take(r.slices as usize)
        .collect::<Vec<_>>();
    assert_eq!(
        r.slice.as_deref().unwrap(),
        committed
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    assert_exact(
        &app,
        project.simulator(),
        first,
        *committed.last().unwrap(),
        None,
    )
    .await;
    let slices = app.store.slices(Table::Export).await.unwrap();
    for d in days(first, today).into_iter().skip(r.slices as usize) {
        let rec = slices.iter().find(|s| s.slice == SliceId::Day(d)).unwrap();
        assert_eq!(rec.status, SliceStatus::Pending, "{d}");
        assert!(read_partition(&app.sink, "", "export", d).await.is_none());
    }
    // Later invocations go on from there, to the exact whole.
    let mut invocations = 1;
    loop {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let r = handler::handle(&app, json!({"table": "export"}), deadline)
            .await
            .unwrap();
        invocations += 1;
        if r.status == Status::Idle {
            break;
        }
        assert!(invocations < 10, "{r:?}");
    }
    assert_exact(&app, project.simulator(), first, today, None).await;
}
