//! A backfill of a small project (issue 12): export requests, scheduled invocations and wall
//! time from the first scheduled invocation to `idle`, local folder and state file, the
//! simulator on loopback (no rate limit), default settings (30-day windows).
//!
//! `cargo bench --bench backfill` (`BACKFILL_DAYS`, default `120,730`; `BACKFILL_EVENTS`
//! per day, default 40).

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use mixpanel_replicator::app::App;
use mixpanel_replicator::config::{RunMode, Settings};
use mixpanel_replicator::handler::{self, Status};
use mixpanel_sim::{SimConfig, Simulator};

fn main() {
    if !benching("backfill") {
        return;
    }
    let days: String = env_or("BACKFILL_DAYS", "120,730".to_string());
    let events: u32 = env_or("BACKFILL_EVENTS", 40);
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!("| days | events/day | export requests | scheduled invocations | wall time (s) |");
    println!("|---|---|---|---|---|");
    for n in days.split(',').filter_map(|d| d.trim().parse::<u32>().ok()) {
        rt.block_on(backfill(n, events));
    }
}

async fn backfill(days: u32, events: u32) {
    let today = bench_day().tomorrow().unwrap();
    let first = today.checked_sub(jiff::Span::new().days(days)).unwrap();
    let cfg = SimConfig {
        seed: 7,
        timezone: "UTC".into(),
        first_day: first,
        days,
        events_per_day: events,
        ..SimConfig::default()
    };
    let sim = Simulator::new(cfg.clone()).serve(0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("MIXPANEL_API_SECRET", cfg.api_secret.clone()),
        ("MIXPANEL_START_DATE", first.to_string()),
        ("MIXPANEL_API_URL", sim.url()),
        ("MIXPANEL_DATA_URL", sim.url()),
        ("MIXPANEL_EXPORT_REQUESTS_PER_WINDOW", "100000".into()),
        ("MIXPANEL_EXPORT_REQUESTS_PER_SECOND", "1000".into()),
    ];
    let mut settings = Settings::from_lookup(RunMode::Local, |k| {
        vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })
    .unwrap();
    settings.output_dir = Some(dir.path().to_path_buf());
    settings.state_file = Some(dir.path().join(".state.json"));
    let app = App::build(settings, None).await.unwrap();
    let started = Instant::now();
    let mut invocations = 0;
    loop {
        invocations += 1;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(840);
        let r = handler::handle(&app, serde_json::json!({"table": "export"}), deadline)
            .await
            .unwrap();
        if r.status == Status::Idle {
            break;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let requests = sim
        .sim()
        .requests()
        .iter()
        .filter(|r| r.path == "/api/2.0/export")
        .count();
    println!(
        "| {days} | {events} | {requests} | {invocations} (the last answers `idle`) | {wall:.1} |"
    );
}
