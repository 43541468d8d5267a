//! Steady state of a small project (issue 12), time-compressed: after its backfill, scheduled
//! invocations (`{"table": "export"}`) every tick on a local folder, with the refresh interval
//! (`MIXPANEL_REFRESH_MINUTES`, 60 by default) standing for twelve ticks (a 5-minute schedule).
//! Late events are added to a day of the attribution window once per cycle, at a tick drawn from
//! a fixed sequence; the freshness lag is the number of ticks until that day's committed
//! manifest holds them (× 5 minutes at the real pace). Reported per timezone: cycles, ticks,
//! export requests (in all, in the busiest cycle, ticks that asked at all), and the lag.
//!
//! `cargo bench --bench steady_state` (`STEADY_CYCLES`, default 72: three days of hourly
//! refreshes; `STEADY_TICK_MS`, default 250).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use jiff::civil::Date;
use mixpanel_replicator::app::App;
use mixpanel_replicator::handler::{self, Status};
use mixpanel_sim::SimConfig;
use support::harness::*;

/// Ticks per refresh interval: a 60-minute refresh on a 5-minute schedule.
const TICKS_PER_CYCLE: u64 = 12;

fn var(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("steady_state: run with `cargo bench --bench steady_state`");
        return;
    }
    let cycles = var("STEADY_CYCLES", 72);
    let tick = Duration::from_millis(var("STEADY_TICK_MS", 250));
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!(
        "| timezone | cycles | ticks | export requests | most in one cycle | ticks that asked | lag: worst ticks (min) | lag: mean ticks |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for tz in ["UTC", "America/Los_Angeles"] {
        rt.block_on(steady(tz, cycles, tick));
    }
}

fn export_requests(project: &Project) -> usize {
    project
        .simulator()
        .requests()
        .iter()
        .filter(|r| r.path == "/api/2.0/export")
        .count()
}

async fn tick_once(app: &App) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let r = handler::handle(app, serde_json::json!({"table": "export"}), deadline)
        .await
        .unwrap();
    assert!(
        matches!(r.status, Status::Done | Status::Idle) && r.failed == 0,
        "{r:?}"
    );
}

async fn committed_records(app: &App, day: Date) -> u64 {
    read_partition(&app.sink, &app.prefix, "export", day)
        .await
        .map_or(0, |(m, _)| m.records)
}

async fn steady(tz: &str, cycles: u64, tick: Duration) {
    let cfg = SimConfig {
        seed: 5,
        ..sim_config(tz, 30, 40)
    };
    let project = Project::start(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    // The backfill, with the default settings, to `idle`.
    let backfill = project.local_app(dir.path(), &[]).await;
    loop {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(840);
        let r = handler::handle(&backfill, serde_json::json!({"table": "export"}), deadline)
            .await
            .unwrap();
        if r.status == Status::Idle {
            break;
        }
    }
    drop(backfill);
    let mut settings = project.settings(&[]).unwrap();
    let refresh = tick * TICKS_PER_CYCLE as u32;
    settings.refresh = refresh;
    let app = local_app_in(settings, dir.path()).await;
    let late_day = minus(today_in(tz), 3);

    let mut per_cycle = Vec::new();
    let mut asked_ticks = 0u64;
    let mut lags = Vec::new();
    let start = tokio::time::Instant::now();
    let mut n = 0u64;
    for cycle in 0..cycles {
        let before_cycle = export_requests(&project);
        // Late events arrive at a tick of the cycle drawn from a fixed sequence.
        let arrive_at = (cycle * 7 + 3) % TICKS_PER_CYCLE;
        let mut pending: Option<(u64, u64)> = None;
        // The cycle's ticks, then on (a lag that runs into the next cycle) until the day
        // holds the late events.
        let mut t = 0;
        while t < TICKS_PER_CYCLE || pending.is_some() {
            if t == arrive_at {
                project.simulator().add_late_events(late_day, 4);
                let truth = project
                    .simulator()
                    .export_ground_truth(late_day, None)
                    .len() as u64;
                pending = Some((n, truth));
            }
            tokio::time::sleep_until(start + tick * n as u32).await;
            let before = export_requests(&project);
            tick_once(&app).await;
            if export_requests(&project) > before {
                asked_ticks += 1;
            }
            n += 1;
            t += 1;
            if let Some((arrived, truth)) = pending
                && committed_records(&app, late_day).await == truth
            {
                lags.push(n - arrived);
                pending = None;
            }
        }
        per_cycle.push(export_requests(&project) - before_cycle);
    }
    let total: usize = per_cycle.iter().sum();
    let worst = lags.iter().max().copied().unwrap_or(0);
    let mean = lags.iter().sum::<u64>() as f64 / lags.len().max(1) as f64;
    println!(
        "| {tz} | {cycles} | {n} | {total} | {} | {asked_ticks} | {worst} ({} min) | {mean:.1} |",
        per_cycle.iter().max().copied().unwrap_or(0),
        worst * 5
    );
}
