//! Profiles at scale (issue 16): the cost of an engage snapshot when only some profiles
//! changed. A project of `BENCH_PROFILES` profiles (default 100,000) on the simulator over
//! HTTP: a first (full) snapshot, then `BENCH_CHANGED_PERCENT` % of the profiles changed
//! (default 5) and 1 % added, then a second snapshot. Reported per run: query requests,
//! profiles served, wall time here (the simulator answers at once), and the wall time the
//! query budget imposes at Mixpanel's 60 queries an hour (requests beyond the first 60 wait
//! for the window).
//!
//! `cargo bench --bench engage_changed`.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use mixpanel_replicator::app::App;
use mixpanel_replicator::handler::{self, Status};
use support::harness::*;

fn main() {
    if !common::benching("engage_changed") {
        return;
    }
    let profiles: u64 = common::env_or("BENCH_PROFILES", 100_000);
    let percent: u64 = common::env_or("BENCH_CHANGED_PERCENT", 5);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(run(profiles, percent));
}

/// Hours the query budget (60 an hour) imposes on `requests` requests: the first 60 go at
/// once, each further 60 wait for the window.
fn budget_hours(requests: u64) -> u64 {
    requests.saturating_sub(1) / 60
}

struct Run {
    requests: u64,
    served: u64,
    wall: Duration,
    rows: u64,
    listing: String,
}

async fn snapshot(app: &App, project: &Project) -> Run {
    let sim = project.simulator();
    let (requests, served) = (sim.requests().len(), sim.engage_profiles_served());
    let started = Instant::now();
    let mut r;
    loop {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        r = handler::handle(app, serde_json::json!({"table": "engage"}), deadline)
            .await
            .unwrap();
        if r.status != Status::Partial {
            break;
        }
    }
    assert_eq!(r.status, Status::Done, "{r:?}");
    let wall = started.elapsed();
    let slices = app
        .store
        .slices(mixpanel_replicator::tables::Table::Engage)
        .await
        .unwrap();
    let result: serde_json::Value =
        serde_json::from_str(slices[0].result.as_deref().unwrap()).unwrap();
    Run {
        requests: sim.requests()[requests..]
            .iter()
            .filter(|q| q.path.ends_with("/engage"))
            .count() as u64,
        served: sim.engage_profiles_served() - served,
        wall,
        rows: r.records,
        listing: result["listing"].as_str().unwrap_or("?").to_string(),
    }
}

async fn run(profiles: u64, percent: u64) {
    let mut cfg = sim_config("UTC", 30, 10);
    cfg.profiles = profiles as u32;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (_dir, app) = project.temp_app(&[("MIXPANEL_REFRESH_MINUTES", "0")]).await;
    let first = snapshot(&app, &project).await;
    let step = (100 / percent.max(1)).max(1);
    let changed: Vec<u64> = (0..profiles).step_by(step as usize).collect();
    sim.update_profiles(&changed);
    sim.add_profiles(profiles / 100);
    let second = snapshot(&app, &project).await;
    let truth = sim.engage_ground_truth().len() as u64;
    assert_eq!(second.rows, truth, "the second snapshot is the whole table");
    println!(
        "{profiles} profiles; {} changed ({percent} %) and {} added before the second run",
        changed.len(),
        profiles / 100
    );
    println!(
        "| run | listing | engage requests | profiles served | rows | wall time here | hours the budget (60 queries/h) imposes |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, r) in [("first", &first), ("second", &second)] {
        println!(
            "| {name} | {} | {} | {} | {} | {:.2} s | {} |",
            r.listing,
            r.requests,
            r.served,
            r.rows,
            r.wall.as_secs_f64(),
            budget_hours(r.requests)
        );
    }
    println!(
        "second / first: {:.1} % of the requests, {:.1} % of the profiles served",
        100.0 * second.requests as f64 / first.requests as f64,
        100.0 * second.served as f64 / first.served as f64
    );
}
