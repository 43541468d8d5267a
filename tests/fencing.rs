//! A live zombie fenced out, on the local store and on S3 + DynamoDB: a worker whose lease
//! expires while it still reads its day (a stalled process, a slow body) and is taken over by
//! another never commits and never deletes the winner's parts. The partition holds the
//! winner's commit exactly, before and after the zombie finishes. The lease runs out on a
//! clock the test moves forward, so nothing waits for it.

mod support;

use std::time::Duration;

use mixpanel_replicator::app::App;
use mixpanel_replicator::clock::ShiftedClock;
use mixpanel_replicator::plan::Claim;
use mixpanel_replicator::state::{SliceId, SliceStatus};
use mixpanel_replicator::tables::Table;
use mixpanel_sim::{Fault, FaultRule};
use support::harness::*;

async fn claim(app: &App, slice: SliceId, owner: &str, lease: Duration) -> Claim {
    let now = app.clock.now_ms();
    let lease = app
        .store
        .claim(
            Table::Export,
            slice,
            owner,
            now,
            now + lease.as_millis() as u64,
        )
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{owner} could not claim {slice}"));
    Claim {
        lease,
        slices: app.store.slices(Table::Export).await.unwrap(),
        widen: false,
        gate: Default::default(),
    }
}

/// Whether `owner` is refused the slice now.
async fn claim_fails(app: &App, slice: SliceId, owner: &str) -> bool {
    let now = app.clock.now_ms();
    app.store
        .claim(Table::Export, slice, owner, now, now + 60_000)
        .await
        .unwrap()
        .is_none()
}

async fn a_zombie_never_commits_nor_deletes_the_winners_parts(project: &Project, app: App) {
    // Both workers read one clock, which the test moves past the zombie's lease at once.
    let clock = ShiftedClock::new();
    let app = &app.with_clock(clock.clone());
    let sim = project.simulator();
    let day = sim.config().first_day;
    let slice = SliceId::Day(day);
    app.store.enqueue(Table::Export, slice, None).await.unwrap();
    // The zombie's body comes slowly (about 3 s); the winner's at once.
    sim.push_fault(FaultRule::new(
        "/api/2.0/export",
        1,
        Fault::SlowBody {
            lines_per_second: 1000,
        },
    ));
    let zombie = claim(app, slice, "zombie000001", Duration::from_secs(600)).await;
    let long = tokio::time::Instant::now() + Duration::from_secs(120);
    let zombie_app = app.clone();
    let zombie_run = tokio::spawn(async move {
        mixpanel_replicator::run::attempt_slice(&zombie_app, &zombie, long).await
    });
    // Its lease runs out while it still reads; the winner takes the day over and commits it.
    while !sim.requests().iter().any(|r| r.path == "/api/2.0/export") {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let early = claim_fails(app, slice, "early0000001").await;
    assert!(early, "the zombie's lease holds until it runs out");
    clock.advance(Duration::from_secs(601));
    assert!(!zombie_run.is_finished(), "the zombie was still reading");
    let winner = claim(app, slice, "winner000001", Duration::from_secs(120)).await;
    let r = mixpanel_replicator::run::run_slice(app, &winner, long)
        .await
        .unwrap();
    assert_eq!(
        r.status,
        mixpanel_replicator::handler::Status::Done,
        "{r:?}"
    );
    let truth = truth(sim, day, None);
    let (manifest, rows) = read_partition(&app.sink, &app.prefix, "export", day)
        .await
        .unwrap();
    assert_eq!(manifest.attempt, "winner000001");
    assert_eq!(rows, truth);

    // The zombie wakes up to a lost lease: no commit, nothing of the winner's removed.
    let outcome = zombie_run.await.unwrap();
    let refused = match &outcome {
        Err(e) => e.to_string(),
        Ok((resp, e)) => format!("{resp:?} {e:?}"),
    };
    assert!(
        refused.contains("lease"),
        "the zombie was refused for its lost lease: {refused}"
    );
    let (after, rows) = read_partition(&app.sink, &app.prefix, "export", day)
        .await
        .unwrap();
    assert_eq!(after, manifest, "the winner's manifest stands");
    assert_eq!(rows, truth);
    let slices = app.store.slices(Table::Export).await.unwrap();
    let rec = slices.iter().find(|r| r.slice == slice).unwrap();
    assert_eq!(rec.status, SliceStatus::Committed);
    assert_eq!(rec.lease_owner.as_deref(), Some("winner000001"));
    assert_eq!(
        rec.failures, 0,
        "the zombie's refusal is not the day's failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locally_a_zombie_never_commits_nor_deletes_the_winners_parts() {
    let project = Project::start(sim_config("UTC", 1, 3000)).await;
    let (_dir, app) = project.temp_app(&[]).await;
    a_zombie_never_commits_nor_deletes_the_winners_parts(&project, app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_and_dynamodb_a_zombie_never_commits_nor_deletes_the_winners_parts() {
    let project = Project::start(sim_config("UTC", 1, 3000)).await;
    let (_aws, app) = aws_app(
        &project,
        "fencing-out",
        "fencing-state",
        "fencing-secret",
        &[],
    )
    .await;
    a_zombie_never_commits_nor_deletes_the_winners_parts(&project, app).await;
}
