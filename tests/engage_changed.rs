//! Incremental engage against the simulator over HTTP, locally and on moto: after a full
//! snapshot, a snapshot lists only the profiles whose `$last_seen` moved, merges them into the
//! previous rows, and is still the whole table; gone profiles make it list every one. And
//! cohort_members keeps the members of the cohorts whose entry did not change.

mod support;

use mixpanel_replicator::app::App;
use mixpanel_replicator::clock::ShiftedClock;
use mixpanel_replicator::handler::{self, Response, Status};
use mixpanel_replicator::state::SliceId;
use mixpanel_replicator::tables::Table;
use mixpanel_sim::{Fault, FaultRule, RequestRecord, Simulator};
use serde_json::{Value, json};
use support::harness::*;

fn deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(120)
}

/// Every invocation re-snapshots (no refresh interval), as a scheduled one would hours later.
const ALWAYS: (&str, &str) = ("MIXPANEL_REFRESH_MINUTES", "0");

async fn engage(app: &App) -> Response {
    handler::handle(app, json!({"table": "engage"}), deadline())
        .await
        .unwrap()
}

/// The engage requests the simulator saw from index `from` on.
fn engage_requests(sim: &Simulator, from: usize) -> Vec<RequestRecord> {
    sim.requests()
        .into_iter()
        .skip(from)
        .filter(|r| r.path.ends_with("/engage"))
        .collect()
}

fn is_filtered(r: &RequestRecord) -> bool {
    r.query.split('&').any(|kv| kv.starts_with("where="))
}

fn is_count(r: &RequestRecord) -> bool {
    !is_filtered(r) && r.query.split('&').any(|kv| kv == "page_size=1")
}

/// How the last engage commit listed its profiles (`full` or `changed`), from the state store.
async fn last_listing(app: &App) -> String {
    let slices = app.store.slices(Table::Engage).await.unwrap();
    let full = slices.iter().find(|r| r.slice == SliceId::Full).unwrap();
    let result: Value = serde_json::from_str(full.result.as_deref().unwrap()).unwrap();
    result["listing"].as_str().unwrap().to_string()
}

async fn assert_exact(app: &App, sim: &Simulator) -> String {
    let (snapshot, rows) = read_latest_snapshot(app, "engage").await.unwrap();
    let truth = canonical(sim.engage_ground_truth());
    assert_eq!(rows.len(), truth.len(), "engage rows");
    assert_eq!(rows, truth, "engage rows");
    snapshot
}

/// Every 20th profile, from `offset`.
fn every_20th(n: u64, offset: u64) -> Vec<u64> {
    (offset..n).step_by(20).collect()
}

/// The whole story on one store: a full snapshot; 5 % changed and 1 % added (one filtered
/// listing and one count, merged); some deleted (found by the count, listed in full at once).
async fn changed_added_and_deleted_profiles_are_exact_in_the_next_snapshot(
    project: &Project,
    app: &App,
) {
    let sim = project.simulator();
    assert_eq!(engage(app).await.status, Status::Done);
    let first = assert_exact(app, sim).await;
    assert_eq!(last_listing(app).await, "full");
    let first_requests = engage_requests(sim, 0).len();
    assert!(first_requests >= 4, "3,000 profiles are 3 pages and more");

    let n = sim.profile_count();
    let changed = sim.update_profiles(&every_20th(n, 3));
    let added = sim.add_profiles(n / 100);
    assert_eq!((changed.len(), added.len()), (150, 30));
    let seen = sim.requests().len();
    let r = engage(app).await;
    assert_eq!(r.status, Status::Done, "{r:?}");
    let second = assert_exact(app, sim).await;
    assert_ne!(second, first, "a new snapshot");
    assert_eq!(last_listing(app).await, "changed");
    let asked = engage_requests(sim, seen);
    assert!(
        asked.iter().all(|r| is_filtered(r) || is_count(r)),
        "only the changed profiles and the count: {asked:?}"
    );
    assert_eq!(asked.iter().filter(|r| is_count(r)).count(), 1);
    assert_eq!(
        asked.len(),
        2,
        "one filtered page and the count, against {first_requests} for the full listing: {asked:?}"
    );
    assert!(
        asked.iter().any(|r| r.query.contains("%24last_seen")),
        "the filter is on $last_seen: {asked:?}"
    );

    // Gone profiles: the count says fewer than the merge, so the same run lists every one.
    let gone = sim.delete_profiles(&every_20th(n, 7));
    assert_eq!(gone.len(), 150);
    let seen = sim.requests().len();
    assert_eq!(engage(app).await.status, Status::Done);
    assert_exact(app, sim).await;
    assert_eq!(last_listing(app).await, "full");
    let asked = engage_requests(sim, seen);
    assert!(
        asked
            .iter()
            .filter(|r| !is_filtered(r) && !is_count(r))
            .count()
            >= 3,
        "a full listing followed: {asked:?}"
    );

    // Nothing changed since: one (empty or nearly) filtered page and the count.
    let seen = sim.requests().len();
    assert_eq!(engage(app).await.status, Status::Done);
    assert_exact(app, sim).await;
    assert_eq!(last_listing(app).await, "changed");
    assert_eq!(engage_requests(sim, seen).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locally_changed_added_and_deleted_profiles_are_exact_in_the_next_snapshot() {
    let mut cfg = sim_config("UTC", 3, 10);
    cfg.profiles = 3000;
    let project = Project::start(cfg).await;
    let (_dir, app) = project.temp_app(&[ALWAYS]).await;
    changed_added_and_deleted_profiles_are_exact_in_the_next_snapshot(&project, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_and_dynamodb_changed_added_and_deleted_profiles_are_exact_in_the_next_snapshot() {
    let mut cfg = sim_config("UTC", 3, 10);
    cfg.profiles = 3000;
    let project = Project::start(cfg).await;
    let (_aws, app) = aws_app(
        &project,
        "engage-out",
        "engage-state",
        "engage-secret",
        &[ALWAYS, ("OUTPUT_COMPRESSION", "zstd")],
    )
    .await;
    changed_added_and_deleted_profiles_are_exact_in_the_next_snapshot(&project, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integer_distinct_ids_merge_into_one_row_each() {
    let mut cfg = sim_config("UTC", 3, 10);
    cfg.profiles = 2000;
    cfg.engage_integer_ids = true;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (_dir, app) = project.temp_app(&[ALWAYS]).await;
    assert_eq!(engage(&app).await.status, Status::Done);
    // Change every profile whose id is sent as an integer, and a few others.
    let integers: Vec<u64> = sim
        .engage_ground_truth()
        .iter()
        .enumerate()
        .filter(|(_, row)| row["distinct_id"].is_u64())
        .map(|(i, _)| i as u64)
        .collect();
    assert!(integers.len() > 20, "{} integer ids", integers.len());
    let mut changed = integers.clone();
    changed.extend([0, 1, 2]);
    sim.update_profiles(&changed);
    assert_eq!(engage(&app).await.status, Status::Done);
    assert_eq!(last_listing(&app).await, "changed");
    assert_exact(&app, sim).await;
}

/// The `page` and `session_id` of an engage request.
fn page_of(r: &RequestRecord) -> (u64, String) {
    let mut page = None;
    let mut session = String::new();
    for (k, v) in query_pairs(&r.query) {
        match k.as_str() {
            "page" => page = v.parse().ok(),
            "session_id" => session = v,
            _ => {}
        }
    }
    (page.unwrap_or_else(|| panic!("no page: {r:?}")), session)
}

fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// The interruption does not rest on how fast the machine is: Mixpanel holds the third filtered
// page (`Fault::Held`) until the first invocation has answered, so its deadline certainly comes
// while that page is asked, and the second invocation has the time to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_interrupted_at_the_deadline_resumes_and_publishes_once_while_profiles_change() {
    let mut cfg = sim_config("UTC", 3, 10);
    cfg.profiles = 20_000;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (dir, app) = project.temp_app(&[ALWAYS]).await;
    assert_eq!(engage(&app).await.status, Status::Done);
    let first = assert_exact(&app, sim).await;
    // 4,000 changed profiles: four filtered pages or more, then the count and the merge. The
    // third page is held until the first invocation has answered.
    sim.update_profiles(&(0..20_000).step_by(5).collect::<Vec<u64>>());
    let gate = mixpanel_sim::Gate::new();
    let filtered =
        |times, fault| FaultRule::new("/api/2.0/engage", times, fault).with_param("where");
    sim.push_fault(filtered(
        2,
        Fault::SlowFirstByte {
            delay: std::time::Duration::ZERO,
        },
    ));
    sim.push_fault(filtered(1, Fault::Held { gate: gate.clone() }));
    let short = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let seen = sim.requests().len();
    let r = handler::handle(&app, json!({"table": "engage"}), short)
        .await
        .unwrap();
    assert_eq!(r.status, Status::Partial, "{r:?}");
    assert_eq!(gate.held(), 1);
    let read: Vec<_> = engage_requests(sim, seen)
        .iter()
        .filter(|r| is_filtered(r) && r.status == 200)
        .map(page_of)
        .collect();
    assert_eq!(
        read.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        [0, 1],
        "{read:?}"
    );
    let session = read[1].1.clone();
    assert!(!session.is_empty());
    // The previous snapshot stays the one published until this one is complete.
    let (latest, _) = read_latest_snapshot(&app, "engage").await.unwrap();
    assert_eq!(latest, first);
    // Profiles keep changing while the listing runs.
    sim.update_profiles(&[1, 2, 3]);
    // The next invocation goes on at page 2 of the same session, then counts and merges.
    let seen = sim.requests().len();
    let r = engage(&app).await;
    assert_eq!(r.status, Status::Done, "{r:?}");
    let asked = engage_requests(sim, seen);
    let pages: Vec<_> = asked
        .iter()
        .filter(|r| is_filtered(r))
        .map(page_of)
        .collect();
    assert!(pages.len() >= 3, "{asked:?}");
    for (i, (page, id)) in pages.iter().enumerate() {
        assert_eq!(
            (*page, id.as_str()),
            (i as u64 + 2, session.as_str()),
            "{asked:?}"
        );
    }
    assert_eq!(asked.iter().filter(|r| is_count(r)).count(), 1, "{asked:?}");
    assert_eq!(last_listing(&app).await, "changed");
    let (second, rows) = read_latest_snapshot(&app, "engage").await.unwrap();
    assert_ne!(second, first);
    assert_eq!(
        rows.len() as u64,
        sim.profile_count(),
        "one row per profile"
    );
    // Published once: two complete snapshots, and no delta part left in either folder.
    let files = files_under(&dir.path().join("engage"));
    let manifests = files
        .iter()
        .filter(|f| f.contains("/snapshot=") && f.ends_with("/_manifest.json"))
        .count();
    assert_eq!(manifests, 2, "{files:?}");
    assert!(!files.iter().any(|f| f.contains("/delta-")), "{files:?}");
    // A profile changed during the run is at its newest version by the next run at the latest.
    assert_eq!(engage(&app).await.status, Status::Done);
    assert_exact(&app, sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_answer_to_the_filtered_listing_falls_back_to_a_full_listing() {
    let mut cfg = sim_config("UTC", 3, 10);
    cfg.profiles = 2500;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (_dir, app) = project.temp_app(&[ALWAYS]).await;
    assert_eq!(engage(&app).await.status, Status::Done);
    sim.update_profiles(&every_20th(2500, 0));
    // Mixpanel answers every filtered request with something that is not a page.
    sim.push_fault(
        FaultRule::new(
            "/api/2.0/engage",
            FaultRule::PERSISTENT,
            Fault::Status {
                status: 200,
                body: "<html>upstream proxy error</html>".into(),
            },
        )
        .with_param("where"),
    );
    let seen = sim.requests().len();
    let r = engage(&app).await;
    assert_eq!(r.status, Status::Done, "{r:?}");
    assert_exact(&app, sim).await;
    assert_eq!(last_listing(&app).await, "full");
    let asked = engage_requests(sim, seen);
    assert_eq!(
        asked.iter().filter(|r| is_filtered(r)).count(),
        1,
        "{asked:?}"
    );
    assert!(asked.iter().filter(|r| !is_filtered(r)).count() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_mixpanel_cannot_serve_at_all_is_bounded_then_parked_and_the_last_snapshot_stays()
{
    let mut cfg = sim_config("UTC", 3, 10);
    cfg.profiles = 1500;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (_dir, app) = project
        .temp_app(&[
            ALWAYS,
            ("MAX_SLICE_ATTEMPTS", "2"),
            ("SLICE_RETRY_BACKOFF_SECONDS", "0"),
        ])
        .await;
    assert_eq!(engage(&app).await.status, Status::Done);
    let first = assert_exact(&app, sim).await;
    let truth = sim.engage_ground_truth();
    sim.update_profiles(&every_20th(1500, 0));
    // Every engage request, filtered or not, gets a body that is not a page.
    sim.push_fault(FaultRule::new(
        "/api/2.0/engage",
        FaultRule::PERSISTENT,
        Fault::Status {
            status: 200,
            body: "{\"results\": 7}".into(),
        },
    ));
    for attempt in 1..=2 {
        let r = engage(&app).await;
        assert_eq!((r.status, r.failed), (Status::Partial, 1), "{r:?}");
        let reason = r.reason.unwrap_or_default();
        assert!(reason.contains("not a page"), "{reason}");
        assert_eq!(r.parked, u64::from(attempt == 2), "{reason}");
    }
    let slices = app.store.slices(Table::Engage).await.unwrap();
    let full = slices.iter().find(|r| r.slice == SliceId::Full).unwrap();
    assert_eq!(full.status, mixpanel_replicator::state::SliceStatus::Failed);
    // The previous snapshot is still the table, exactly as it was.
    let (latest, rows) = read_latest_snapshot(&app, "engage").await.unwrap();
    assert_eq!(latest, first);
    assert_eq!(rows, canonical(truth));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_during_the_filtered_listing_restarts_it_once() {
    let mut cfg = sim_config("UTC", 3, 10);
    cfg.profiles = 5000;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (_dir, app) = project.temp_app(&[ALWAYS]).await;
    assert_eq!(engage(&app).await.status, Status::Done);
    sim.update_profiles(&(0..5000).step_by(2).collect::<Vec<u64>>());
    // The filtered listing's page 0 at once, its page 1 after the deadline.
    let slow = |delay| {
        FaultRule::new("/api/2.0/engage", 1, Fault::SlowFirstByte { delay }).with_param("where")
    };
    sim.push_fault(slow(std::time::Duration::ZERO));
    sim.push_fault(slow(std::time::Duration::from_secs(10)));
    let short = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    let r = handler::handle(&app, json!({"table": "engage"}), short)
        .await
        .unwrap();
    assert_eq!(r.status, Status::Partial, "{r:?}");
    sim.expire_engage_sessions();
    let seen = sim.requests().len();
    assert_eq!(engage(&app).await.status, Status::Done);
    assert_exact(&app, sim).await;
    assert_eq!(last_listing(&app).await, "changed");
    let asked = engage_requests(sim, seen);
    assert_eq!(
        asked.iter().filter(|r| r.status == 400).count(),
        1,
        "one refused session: {asked:?}"
    );
    assert!(asked.iter().all(|r| is_filtered(r) || is_count(r)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listing_runs_when_asked_for_and_when_the_refresh_days_say_so() {
    let mut cfg = sim_config("UTC", 3, 10);
    cfg.profiles = 1500;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (dir, app) = project.temp_app(&[]).await;
    assert_eq!(engage(&app).await.status, Status::Done);
    // Fresh: a scheduled invocation has nothing to do; the full event lists every profile.
    assert_eq!(engage(&app).await.status, Status::Idle);
    sim.update_profiles(&[5, 6]);
    let seen = sim.requests().len();
    let r = handler::handle(&app, json!({"table": "engage", "full": true}), deadline())
        .await
        .unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    assert_exact(&app, sim).await;
    assert_eq!(last_listing(&app).await, "full");
    assert!(engage_requests(sim, seen).iter().all(|r| !is_filtered(r)));

    // ENGAGE_FULL_REFRESH_DAYS=0: every snapshot is a full listing.
    let app = project
        .local_app(dir.path(), &[ALWAYS, ("ENGAGE_FULL_REFRESH_DAYS", "0")])
        .await;
    sim.update_profiles(&[7]);
    let seen = sim.requests().len();
    assert_eq!(engage(&app).await.status, Status::Done);
    assert_exact(&app, sim).await;
    assert_eq!(last_listing(&app).await, "full");
    assert!(engage_requests(sim, seen).iter().all(|r| !is_filtered(r)));

    // The default again: the next one lists the changed profiles only.
    let app = project.local_app(dir.path(), &[ALWAYS]).await;
    sim.update_profiles(&[8]);
    assert_eq!(engage(&app).await.status, Status::Done);
    assert_exact(&app, sim).await;
    assert_eq!(last_listing(&app).await, "changed");

    // Eight days on, past ENGAGE_FULL_REFRESH_DAYS (7) since the last full listing: the next
    // scheduled snapshot lists every profile again.
    let clock = ShiftedClock::new();
    let app = app.with_clock(clock.clone());
    clock.advance(std::time::Duration::from_secs(8 * 86_400));
    sim.update_profiles(&[9]);
    let seen = sim.requests().len();
    assert_eq!(engage(&app).await.status, Status::Done);
    assert_exact(&app, sim).await;
    assert_eq!(last_listing(&app).await, "full");
    assert!(engage_requests(sim, seen).iter().all(|r| !is_filtered(r)));

    // `full` is for engage only.
    let e = handler::handle(&app, json!({"table": "cohorts", "full": true}), deadline())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("`full` is for engage"), "{e}");
}

#[test]
fn sync_full_lists_every_profile() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = sim_config("UTC", 3, 10);
    cfg.profiles = 1200;
    let project = rt.block_on(Project::start(cfg));
    let sim = project.simulator();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let sync = |extra: &[&str]| {
        let mut cmd = project.command(None);
        cmd.args(["sync", "--table", "engage", "--out", out])
            .args(extra);
        let o = output_with_stdin(&mut cmd, None);
        assert_success(&o);
    };
    sync(&[]);
    sim.update_profiles(&[1]);
    let seen = sim.requests().len();
    sync(&["--full"]);
    let asked = engage_requests(sim, seen);
    assert!(asked.len() >= 2, "{asked:?}");
    assert!(asked.iter().all(|r| !is_filtered(r)), "{asked:?}");
    let app = rt.block_on(project.local_app(dir.path(), &[]));
    rt.block_on(assert_exact(&app, sim));
    let mut cmd = project.command(None);
    cmd.args(["sync", "--table", "export", "--full", "--out", out]);
    let o = output_with_stdin(&mut cmd, None);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--full is for engage"));
}

/// The cohorts whose members the engage requests from index `from` on listed (page 0 each).
fn cohorts_listed(sim: &Simulator, from: usize) -> Vec<u64> {
    let mut ids: Vec<u64> = engage_requests(sim, from)
        .iter()
        .filter(|r| r.query.split('&').any(|kv| kv == "page=0"))
        .filter_map(|r| {
            let v = r
                .query
                .split('&')
                .find_map(|kv| kv.strip_prefix("filter_by_cohort="))?;
            let digits: String = v
                .replace("%7B%22id%22%3A", "")
                .replace("%7D", "")
                .chars()
                .filter(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect();
    ids.sort_unstable();
    ids
}

async fn cohort_members(app: &App, event: Value) -> Response {
    let r = handler::handle(app, event, deadline()).await.unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    r
}

async fn assert_members_exact(app: &App, sim: &Simulator) -> String {
    let (snapshot, rows) = read_latest_snapshot(app, "cohort_members").await.unwrap();
    let truth = canonical(sim.cohort_members_ground_truth());
    let extra: Vec<&String> = rows.iter().filter(|r| !truth.contains(r)).collect();
    let missing: Vec<&String> = truth.iter().filter(|r| !rows.contains(r)).collect();
    assert!(
        rows == truth,
        "{} rows against {}; not in the truth: {extra:?}; missing: {missing:?}",
        rows.len(),
        truth.len()
    );
    snapshot
}

fn cohort_counts(sim: &Simulator) -> std::collections::BTreeMap<u64, u64> {
    sim.cohorts_ground_truth()
        .iter()
        .map(|c| (c["id"].as_u64().unwrap(), c["count"].as_u64().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cohorts_whose_entry_is_unchanged_keep_their_members_and_the_others_are_listed() {
    let mut cfg = sim_config("UTC", 3, 10);
    cfg.profiles = 3000;
    cfg.cohorts = 6;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (dir, app) = project.temp_app(&[ALWAYS]).await;
    let table = json!({"table": "cohort_members"});
    let all: Vec<u64> = cohort_counts(sim).keys().copied().collect();
    assert_eq!(all.len(), 6);

    cohort_members(&app, table.clone()).await;
    let first = assert_members_exact(&app, sim).await;
    assert_eq!(
        cohorts_listed(sim, 0),
        all,
        "the first snapshot lists every cohort"
    );

    // Profiles changed, none gone or added: every cohort's entry is the same, nothing listed.
    sim.update_profiles(&every_20th(3000, 1));
    let seen = sim.requests().len();
    cohort_members(&app, table.clone()).await;
    let second = assert_members_exact(&app, sim).await;
    assert_ne!(second, first, "a new snapshot");
    assert!(cohorts_listed(sim, seen).is_empty());
    let asked: Vec<String> = sim.requests()[seen..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(asked, ["/api/2.0/cohorts/list"], "one query in all");

    // Gone profiles, then new ones, move some cohorts' counts: exactly those are listed again.
    for change in ["gone", "new"] {
        let before = cohort_counts(sim);
        match change {
            "gone" => sim.delete_profiles(&[4, 5, 6]),
            _ => sim.add_profiles(2),
        };
        let after = cohort_counts(sim);
        let moved: Vec<u64> = all
            .iter()
            .copied()
            .filter(|id| before[id] != after[id])
            .collect();
        assert!(
            !moved.is_empty() && moved.len() < all.len(),
            "{change}: {before:?} → {after:?}"
        );
        let seen = sim.requests().len();
        cohort_members(&app, table.clone()).await;
        assert_members_exact(&app, sim).await;
        assert_eq!(cohorts_listed(sim, seen), moved, "{change}");
    }

    // Asked for: every cohort listed again.
    let seen = sim.requests().len();
    cohort_members(&app, json!({"table": "cohort_members", "full": true})).await;
    assert_members_exact(&app, sim).await;
    assert_eq!(cohorts_listed(sim, seen), all);

    // ENGAGE_FULL_REFRESH_DAYS=0: never kept.
    let app = project
        .local_app(dir.path(), &[ALWAYS, ("ENGAGE_FULL_REFRESH_DAYS", "0")])
        .await;
    let seen = sim.requests().len();
    cohort_members(&app, table.clone()).await;
    assert_members_exact(&app, sim).await;
    assert_eq!(cohorts_listed(sim, seen), all);
}

/// The part files of the latest snapshot of `table` in a local output folder.
fn latest_parts(dir: &std::path::Path, table: &str, snapshot: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir.join(table).join(snapshot))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("part-")
        })
        .collect()
}

/// A previous snapshot that lost a part for good (a person's clean-up, a lifecycle rule) is
/// never built on: every profile, every cohort is listed again, exactly, on that very run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_snapshot_missing_a_part_is_listed_again_in_full() {
    let mut cfg = sim_config("UTC", 3, 10);
    cfg.profiles = 3000;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (dir, app) = project.temp_app(&[ALWAYS]).await;
    assert_eq!(engage(&app).await.status, Status::Done);
    cohort_members(&app, json!({"table": "cohort_members"})).await;
    for table in ["engage", "cohort_members"] {
        let (snapshot, _) = read_latest_snapshot(&app, table).await.unwrap();
        let parts = latest_parts(dir.path(), table, &snapshot);
        assert!(!parts.is_empty(), "{table}");
        std::fs::remove_file(&parts[0]).unwrap();
    }
    sim.update_profiles(&every_20th(3000, 2));
    let seen = sim.requests().len();
    assert_eq!(engage(&app).await.status, Status::Done);
    assert_exact(&app, sim).await;
    assert_eq!(last_listing(&app).await, "full");
    let asked = engage_requests(sim, seen);
    assert!(
        asked
            .iter()
            .filter(|r| !is_filtered(r) && !is_count(r))
            .count()
            >= 3
    );

    let all: Vec<u64> = cohort_counts(sim).keys().copied().collect();
    let seen = sim.requests().len();
    cohort_members(&app, json!({"table": "cohort_members"})).await;
    assert_members_exact(&app, sim).await;
    assert_eq!(cohorts_listed(sim, seen), all);
}

/// A merge that never fits in an invocation (the previous parts come from a storage that
/// stays slow) does not stall the table: after two merges cut short, the snapshot lists every
/// profile, which resumes across invocations, and commits exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_that_never_fits_an_invocation_becomes_a_full_listing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use support::proxy::{Action, Proxy, through};
    let mut cfg = sim_config("UTC", 3, 10);
    cfg.profiles = 3000;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let aws = Aws::start().await;
    aws.provision(
        "slow-out",
        "slow-state",
        "slow-secret",
        &project.secret_json(),
    )
    .await;
    let slow = Arc::new(AtomicBool::new(false));
    let slow_reads = slow.clone();
    let proxy = Proxy::start(
        &aws.moto.endpoint(),
        Box::new(move |r| {
            if slow_reads.load(Ordering::Relaxed)
                && r.method == "GET"
                && r.path.contains("/engage/snapshot=")
                && r.path.contains("/part-")
            {
                return Action::Delay(std::time::Duration::from_secs(4));
            }
            Action::Pass
        }),
    )
    .await;
    let mut settings = project
        .settings(&[
            ALWAYS,
            ("OUTPUT_BUCKET", "slow-out"),
            ("STATE_TABLE", "slow-state"),
        ])
        .unwrap();
    settings.output_dir = None;
    settings.state_file = None;
    let app = App::build(settings, Some(through(&proxy).await))
        .await
        .unwrap();
    assert_eq!(engage(&app).await.status, Status::Done);
    let first = assert_exact(&app, sim).await;
    sim.update_profiles(&every_20th(3000, 4));
    slow.store(true, Ordering::Relaxed);
    let mut partials = 0;
    loop {
        let short = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        let r = handler::handle(&app, json!({"table": "engage"}), short)
            .await
            .unwrap();
        match r.status {
            Status::Partial => {
                assert_eq!(r.failed, 0, "{r:?}");
                partials += 1;
            }
            Status::Done => break,
            other => panic!("unexpected {other:?}: {r:?}"),
        }
        assert!(partials < 8, "the snapshot stalled: {r:?}");
    }
    assert!(
        partials >= 2,
        "two merges were cut short ({partials} partial answers)"
    );
    let second = assert_exact(&app, sim).await;
    assert_ne!(second, first);
    assert_eq!(last_listing(&app).await, "full");
}

/// Mixpanel's answer to the profile count is never usable: the run cannot tell gone profiles,
/// so it lists every one, and does so again on the next runs while the count stays broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_count_mixpanel_never_answers_usably_falls_back_to_full_listings() {
    let mut cfg = sim_config("UTC", 3, 10);
    cfg.profiles = 2500;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (_dir, app) = project.temp_app(&[ALWAYS]).await;
    assert_eq!(engage(&app).await.status, Status::Done);
    // Only the count asks for `output_properties`: its every answer lacks `total`.
    sim.push_fault(
        FaultRule::new(
            "/api/2.0/engage",
            FaultRule::PERSISTENT,
            Fault::Status {
                status: 200,
                body: r#"{"page":0,"page_size":1,"status":"ok","results":[]}"#.into(),
            },
        )
        .with_param("output_properties"),
    );
    for round in 0..2 {
        sim.update_profiles(&every_20th(2500, round));
        sim.delete_profiles(&[100 + round]);
        let r = engage(&app).await;
        assert_eq!((r.status, r.failed), (Status::Done, 0), "{r:?}");
        assert_exact(&app, sim).await;
        assert_eq!(last_listing(&app).await, "full");
    }
}
