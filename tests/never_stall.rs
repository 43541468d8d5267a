//! Faults that do not go away on retry never stall a table: a slice that keeps failing is
//! parked after `MAX_SLICE_ATTEMPTS` and the rest of its table and the other tables go on; a
//! day Mixpanel keeps cutting off is split into hours; a rate limit answers `partial`; a table
//! the plan does not allow is remembered as skipped.

mod support;

use std::time::Duration;

use jiff::civil::{Date, date};
use mixpanel_replicator::app::App;
use mixpanel_replicator::cli;
use mixpanel_replicator::handler::{self, Status};
use mixpanel_replicator::state::{SliceId, SliceRecord, SliceStatus};
use mixpanel_replicator::tables::Table;
use mixpanel_sim::{Fault, FaultRule, Simulator};
use serde_json::json;
use support::harness::*;

fn deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(60)
}

/// The answer Mixpanel gives, for every request covering the day, to a request it rejects.
fn persistent_bad_answer(day: Date) -> FaultRule {
    FaultRule::export_day(
        day,
        None,
        Fault::Status {
            status: 400,
            body: r#"{"request": "/api/2.0/export", "error": "invalid request: unexpected parameter combination"}"#.into(),
        },
    )
}

/// Export requests the simulator saw for `day` (`from_date` = `day`).
fn export_requests(sim: &Simulator, day: Date) -> Vec<mixpanel_sim::RequestRecord> {
    sim.requests()
        .into_iter()
        .filter(|r| r.path == "/api/2.0/export" && r.query.contains(&format!("from_date={day}")))
        .collect()
}

async fn record_of(app: &App, table: Table, slice: SliceId) -> SliceRecord {
    app.store
        .slices(table)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.slice == slice)
        .unwrap_or_else(|| panic!("{table} {slice} is not queued"))
}

/// Settings that make failures quick to repeat: no backoff between attempts.
const NO_BACKOFF: (&str, &str) = ("SLICE_RETRY_BACKOFF_SECONDS", "0");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_parks_a_persistently_bad_day_and_commits_every_other_day_and_table() {
    let cfg = sim_config("UTC", 7, 40);
    let (first, last) = (cfg.first_day, minus(today_in("UTC"), 1));
    let bad = minus(last, 4);
    let project = Project::start(cfg).await;
    project.simulator().push_fault(persistent_bad_answer(bad));
    let (_dir, app) = project.temp_app(&[NO_BACKOFF]).await;

    let report = cli::sync(&app, &[Table::Export, Table::Cohorts])
        .await
        .unwrap();

    // Every other day is exact; the bad day is parked with its error, after 5 attempts.
    for day in days(first, last).into_iter().filter(|d| *d != bad) {
        assert_exact(&app, project.simulator(), day, day, None).await;
    }
    assert!(read_partition(&app.sink, "", "export", bad).await.is_none());
    let parked = record_of(&app, Table::Export, SliceId::Day(bad)).await;
    assert_eq!(parked.status, SliceStatus::Failed);
    assert_eq!(parked.failures, 5);
    let error = parked.error.unwrap();
    assert_eq!(error.kind, "BadResponse");
    assert_eq!(
        error.message,
        "Mixpanel answered HTTP 400 on /api/2.0/export: invalid request: unexpected parameter combination"
    );
    assert_eq!(export_requests(project.simulator(), bad).len(), 5);
    // The bookmark stops before the parked day.
    assert_eq!(
        app.store.bookmark(Table::Export).await.unwrap(),
        Some(minus(bad, 1))
    );
    // The other table was reached and committed.
    let (_, cohorts) = read_latest_snapshot(&app, "cohorts").await.unwrap();
    assert_eq!(
        cohorts,
        canonical(project.simulator().cohorts_ground_truth())
    );
    // The report names the parked day and why; every other slice committed.
    assert_eq!(report.failed, 1);
    assert_eq!(report.parked.len(), 1);
    assert!(
        report.parked[0].starts_with(&format!(
            "export {bad}: parked after 5 failed attempts (BadResponse at "
        )),
        "{}",
        report.parked[0]
    );
    assert!(report.parked[0].ends_with("unexpected parameter combination"));

    // Once Mixpanel answers again, an explicit day event (a person's retry) commits it.
    project.simulator().clear_faults();
    let r = handle_export_day(&app, bad, deadline()).await.unwrap();
    assert_eq!(r.status, Status::Done);
    assert_exact(&app, project.simulator(), bad, bad, None).await;
    let done = record_of(&app, Table::Export, SliceId::Day(bad)).await;
    assert_eq!(
        (done.status, done.failures, done.error),
        (SliceStatus::Committed, 0, None)
    );
    assert_eq!(
        app.store.bookmark(Table::Export).await.unwrap(),
        Some(today_in("UTC")),
        "today committed too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistently_bad_day_inside_a_window_parks_alone_and_every_other_day_commits() {
    let cfg = sim_config("UTC", 8, 40);
    let first = cfg.first_day;
    let bad = minus(first, -4);
    let today = today_in("UTC");
    let project = Project::start(cfg).await;
    project.simulator().push_fault(persistent_bad_answer(bad));
    let (_dir, app) = project
        .temp_app(&[NO_BACKOFF, ("MAX_SLICE_ATTEMPTS", "3")])
        .await;
    let report = cli::sync(&app, &[Table::Export]).await.unwrap();
    assert_eq!(report.parked.len(), 1, "{report:?}");
    assert!(
        report.parked[0].starts_with(&format!("export {bad}")),
        "{report:?}"
    );
    for day in days(first, today).into_iter().filter(|d| *d != bad) {
        assert_exact(&app, project.simulator(), day, day, None).await;
        let rec = record_of(&app, Table::Export, SliceId::Day(day)).await;
        assert_eq!(
            (rec.status, rec.failures),
            (SliceStatus::Committed, 0),
            "{day}"
        );
    }
    let parked = record_of(&app, Table::Export, SliceId::Day(bad)).await;
    assert_eq!((parked.status, parked.failures), (SliceStatus::Failed, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_invocations_on_aws_go_past_a_persistently_bad_day_and_park_it() {
    let cfg = sim_config("UTC", 7, 40);
    let (first, last) = (cfg.first_day, minus(today_in("UTC"), 1));
    let bad = first;
    let project = Project::start(cfg).await;
    project.simulator().push_fault(persistent_bad_answer(bad));
    let (_aws, app) = aws_app(
        &project,
        "park-bucket",
        "park-state",
        "park-secret",
        &[NO_BACKOFF, ("MAX_SLICE_ATTEMPTS", "3")],
    )
    .await;

    let event = json!({"table": "export"});
    let mut answers = Vec::new();
    for _ in 0..20 {
        let r = handler::handle(&app, event.clone(), deadline())
            .await
            .unwrap();
        let idle = r.status == Status::Idle;
        answers.push(r);
        if idle {
            break;
        }
    }
    // 7 days and today: 3 failed attempts of the bad day (each answered `partial`: it is the
    // oldest, so each invocation meets it first), then one invocation works through the 7
    // others, then idle with the parked day counted.
    let statuses: Vec<Status> = answers.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [
            Status::Partial,
            Status::Partial,
            Status::Partial,
            Status::Done,
            Status::Idle
        ]
    );
    assert_eq!(answers[3].slices, 7, "{:?}", answers[3]);
    let failed: Vec<_> = answers.iter().filter(|r| r.failed == 1).collect();
    assert_eq!(failed.len(), 3);
    assert!(failed.iter().all(
        |r| r.status == Status::Partial && r.slice.as_deref() == Some(bad.to_string().as_str())
    ));
    assert!(
        failed[2]
            .reason
            .as_deref()
            .unwrap()
            .starts_with(&format!("{bad} parked after 3 failed attempts")),
        "{:?}",
        failed[2].reason
    );
    assert_eq!(failed[2].parked, 1);
    let idle = answers.last().unwrap();
    assert_eq!((idle.status, idle.parked), (Status::Idle, 1));

    for day in days(minus(bad, -1), last) {
        assert_exact(&app, project.simulator(), day, day, None).await;
    }
    let parked = record_of(&app, Table::Export, SliceId::Day(bad)).await;
    assert_eq!((parked.status, parked.failures), (SliceStatus::Failed, 3));
    assert_eq!(export_requests(project.simulator(), bad).len(), 3);
    // The bookmark does not pass the parked day (it is the first).
    assert_eq!(app.store.bookmark(Table::Export).await.unwrap(), None);

    // Idle invocations ask Mixpanel nothing more about it.
    let before = project.simulator().requests().len();
    let r = handler::handle(&app, event.clone(), deadline())
        .await
        .unwrap();
    assert_eq!((r.status, r.parked), (Status::Idle, 1));
    assert_eq!(project.simulator().requests().len(), before);

    // `retry_parked` is a person's retry: with the fault gone the day commits.
    project.simulator().clear_faults();
    let r = handler::handle(
        &app,
        json!({"table": "export", "retry_parked": true}),
        deadline(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    assert_exact(&app, project.simulator(), bad, bad, None).await;
    assert_eq!(
        app.store.bookmark(Table::Export).await.unwrap(),
        Some(today_in("UTC")),
        "today committed too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_names_each_parked_slice_and_retries_them_on_request() {
    let cfg = sim_config("UTC", 3, 20);
    let bad = cfg.first_day;
    let project = Project::start(cfg).await;
    project.simulator().push_fault(persistent_bad_answer(bad));
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        project
            .command(None)
            .env("SLICE_RETRY_BACKOFF_SECONDS", "0")
            .env("MAX_SLICE_ATTEMPTS", "2")
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["sync", "--table", "export"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let parked: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("parked: "))
        .collect();
    assert_eq!(parked.len(), 1, "{stderr}");
    assert!(
        parked[0].starts_with(&format!(
            "parked: export {bad}: parked after 2 failed attempts (BadResponse at "
        )),
        "{}",
        parked[0]
    );
    assert!(
        stderr.contains(
            "error: 1 slice(s) not committed; retry the parked ones with `sync --retry-parked`"
        ),
        "{stderr}"
    );

    // `plan` lists it with its error, and changes nothing.
    let out = run(&["plan", "--table", "export"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with(&format!(
            "export\t{bad}\tparked after 2 failed attempts (BadResponse at "
        )),
        "{stdout}"
    );
    assert!(
        stdout
            .trim_end()
            .ends_with("unexpected parameter combination"),
        "{stdout}"
    );

    // Without --retry-parked nothing is asked again; with it, the day commits.
    let before = export_requests(project.simulator(), bad).len();
    let out = run(&["sync", "--table", "export"]);
    assert!(!out.status.success());
    assert_eq!(export_requests(project.simulator(), bad).len(), before);
    project.simulator().clear_faults();
    let out = run(&["sync", "--table", "export", "--retry-parked"]);
    assert_success(&out);
    let (_, rows) = read_manifest_rows(
        &local_sink(&dir.path().join("mixpanel-data")),
        &format!("export/date={bad}"),
    )
    .await
    .unwrap();
    assert_eq!(rows, truth(project.simulator(), bad, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_mixpanel_always_cuts_off_whole_is_split_into_hours_and_commits_exactly() {
    let cfg = sim_config("UTC", 2, 200);
    let heavy = cfg.first_day;
    let project = Project::start(cfg).await;
    // Every whole-day request of the day ends `terminated early`; its hours go through.
    project.simulator().push_fault(FaultRule::export_day(
        heavy,
        Some(Duration::from_secs(3600)),
        Fault::TerminatedEarly { after_lines: 30 },
    ));
    let (_dir, app) = project.temp_app(&[NO_BACKOFF]).await;
    let report = cli::sync(&app, &[Table::Export]).await.unwrap();
    assert_eq!((report.failed, report.parked.len()), (0, 0), "{report:?}");
    assert_exact(
        &app,
        project.simulator(),
        heavy,
        minus(today_in("UTC"), 1),
        None,
    )
    .await;

    // Two whole-day requests, then one per hour.
    let requests = export_requests(project.simulator(), heavy);
    let whole: Vec<_> = requests
        .iter()
        .filter(|r| !r.query.contains("where="))
        .collect();
    assert_eq!(whole.len(), 2);
    assert!(whole.iter().all(|r| r.faulted));
    let hours: Vec<_> = requests
        .iter()
        .filter(|r| r.query.contains("where="))
        .collect();
    assert_eq!(hours.len(), 24);
    assert!(hours.iter().all(|r| !r.faulted && r.status == 200));
    assert_eq!(
        app.store
            .slices(Table::Export)
            .await
            .unwrap()
            .iter()
            .filter(|r| matches!(r.slice, SliceId::Hours { .. }))
            .count(),
        24
    );
}

/// A day whose clocks change (23 or 25 hours in Los Angeles) that Mixpanel cannot export
/// whole is split into its 24 hour slices, which tile its instants: every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_of_23_or_25_hours_mixpanel_cannot_export_whole_commits_exactly_from_its_hours() {
    for (heavy, hours_asked) in [(date(2026, 3, 8), 23), (date(2026, 11, 1), 24)] {
        let mut cfg = sim_config("America/Los_Angeles", 3, 240);
        cfg.first_day = heavy.yesterday().unwrap();
        let project = Project::start(cfg).await;
        let sim = project.simulator();
        // Every request of the day wider than two hours ends `terminated early`: the whole
        // day fails, its hours (the 25-hour day's repeated hour is two hours long) go through.
        sim.push_fault(FaultRule::export_day(
            heavy,
            Some(Duration::from_secs(7200)),
            Fault::TerminatedEarly { after_lines: 30 },
        ));
        let (_dir, app) = project
            .temp_app(&[NO_BACKOFF, ("MIXPANEL_ATTRIBUTION_WINDOW_DAYS", "0")])
            .await;
        let report = cli::sync(&app, &[Table::Export]).await.unwrap();
        assert_eq!(
            (report.failed, report.parked.len()),
            (0, 0),
            "{heavy}: {report:?}"
        );
        let day_truth = truth(sim, heavy, None);
        assert!(day_truth.len() > 200, "{heavy}: {} events", day_truth.len());
        let (manifest, rows) = read_partition(&app.sink, &app.prefix, "export", heavy)
            .await
            .unwrap();
        assert_eq!(rows, day_truth, "{heavy}");
        assert_eq!(manifest.records, day_truth.len() as u64);
        assert_exact(
            &app,
            sim,
            heavy.yesterday().unwrap(),
            heavy.tomorrow().unwrap(),
            None,
        )
        .await;
        let slices = app.store.slices(Table::Export).await.unwrap();
        let hours: Vec<_> = slices
            .iter()
            .filter(|r| r.slice.day() == Some(heavy) && matches!(r.slice, SliceId::Hours { .. }))
            .collect();
        assert_eq!(hours.len(), 24, "{heavy}");
        assert!(hours.iter().all(|r| r.status == SliceStatus::Committed));
        // The day's hour requests all went through (the 23-hour day's missing hour asks
        // nothing); only requests wider than two hours met the fault.
        let la = jiff::tz::TimeZone::get("America/Los_Angeles").unwrap();
        let start_of = |d: Date| {
            d.to_zoned_datetime(la.clone())
                .unwrap()
                .timestamp()
                .as_second()
        };
        let (start, end) = (start_of(heavy), start_of(heavy.tomorrow().unwrap()));
        assert_eq!(
            (end - start) / 3600,
            if hours_asked == 23 { 23 } else { 25 }
        );
        let ranges: Vec<(i64, i64, bool)> = sim
            .requests()
            .into_iter()
            .filter(|r| r.path == "/api/2.0/export")
            .filter_map(|r| {
                let bound = |key: &str| -> Option<i64> {
                    let at = r.query.find(key)? + key.len();
                    r.query[at..].split("%29").next()?.parse().ok()
                };
                let from = bound("%3E%3D+datetime%28")?;
                let to = bound("%3C+datetime%28")?;
                Some((from, to, r.faulted || r.status != 200))
            })
            .collect();
        // (A neighbour's requests name the day in their UTC dates too: only those asking
        // for the day's own instants are the day's.)
        let of_the_day: Vec<&(i64, i64, bool)> = ranges
            .iter()
            .filter(|(a, b, _)| *a < end && *b > start)
            .collect();
        assert!(
            of_the_day
                .iter()
                .all(|(a, b, failed)| *failed == (b - a > 7200)),
            "{heavy}: {of_the_day:?}"
        );
        assert!(
            ranges.iter().all(|(a, b, _)| a < b),
            "no request for an hour without instants: {ranges:?}"
        );
        let hour_requests = ranges
            .iter()
            .filter(|(a, b, _)| *a >= start && *b <= end && b - a <= 7200)
            .count();
        assert_eq!(hour_requests, hours_asked, "{heavy}: {ranges:?}");
    }
}

/// A project whose hour 13 of its first day is too heavy for Mixpanel.
async fn heavy_hour_project() -> Project {
    let cfg = sim_config("UTC", 2, 400);
    let heavy = cfg.first_day;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    // Whole-day requests of the day end `terminated early`, and so does every request wider
    // than five minutes that holds 13:20: the hour, then its quarter, are too heavy.
    sim.push_fault(FaultRule::export_day(
        heavy,
        Some(Duration::from_secs(3600)),
        Fault::TerminatedEarly { after_lines: 30 },
    ));
    let at = heavy
        .at(13, 20, 0, 0)
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .unwrap()
        .timestamp()
        .as_second();
    sim.push_fault(FaultRule::export_instant(
        at,
        Some(Duration::from_secs(300)),
        Fault::TerminatedEarly { after_lines: 2 },
    ));
    project
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_mixpanel_always_cuts_off_is_split_into_quarters_then_five_minutes() {
    let project = heavy_hour_project().await;
    let (_dir, app) = project.temp_app(&[NO_BACKOFF]).await;
    the_heavy_hour_commits_from_its_pieces(&app, &project).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_split_into_pieces_commits_exactly_on_aws() {
    let project = heavy_hour_project().await;
    let (_aws, app) = aws_app(
        &project,
        "piece-bucket",
        "piece-state",
        "piece-secret",
        &[NO_BACKOFF],
    )
    .await;
    the_heavy_hour_commits_from_its_pieces(&app, &project).await;
}

/// Every day commits exactly; the heavy hour from its quarters, the heavy quarter from its
/// five-minute pieces, each request that Mixpanel failed made twice and no more.
async fn the_heavy_hour_commits_from_its_pieces(app: &App, project: &Project) {
    let sim = project.simulator();
    let heavy = sim.config().first_day;
    let report = cli::sync(app, &[Table::Export]).await.unwrap();
    assert_eq!((report.failed, report.parked.len()), (0, 0), "{report:?}");
    assert_exact(app, sim, heavy, minus(today_in("UTC"), 1), None).await;

    let requests = export_requests(sim, heavy);
    let faulted = requests.iter().filter(|r| r.faulted).count();
    let fine = requests
        .iter()
        .filter(|r| !r.faulted && r.status == 200)
        .count();
    // Twice the day, twice hour 13 and twice its second quarter; then 23 hours, 3 quarters
    // and 3 five-minute pieces.
    assert_eq!((faulted, fine), (6, 23 + 3 + 3), "{requests:?}");
    let pieces: Vec<String> = app
        .store
        .slices(Table::Export)
        .await
        .unwrap()
        .iter()
        .filter(|r| matches!(r.slice, SliceId::Minutes { .. }))
        .map(|r| {
            assert_eq!(r.status, SliceStatus::Committed, "{}", r.slice);
            r.slice.to_string()
        })
        .collect();
    let t = |s: &str| format!("{heavy}T{s}");
    assert_eq!(
        pieces,
        [
            t("13:00-13:15"),
            t("13:15-13:20"),
            t("13:15-13:30"),
            t("13:20-13:25"),
            t("13:25-13:30"),
            t("13:30-13:45"),
            t("13:45-14:00"),
        ]
    );
    // A person's day event reads the day again from the same pieces: no request is wider than
    // the pieces were, none is faulted, and the day is as exact as before.
    let before = export_requests(sim, heavy).len();
    let asked_at = jiff::Timestamp::now().as_millisecond() as u64;
    for _ in 0..10 {
        let r = handler::handle(
            app,
            json!({"table": "export", "date": heavy.to_string()}),
            deadline(),
        )
        .await
        .unwrap();
        if r.status == Status::Done && r.slice.as_deref() == Some(heavy.to_string().as_str()) {
            break;
        }
    }
    let again = &export_requests(sim, heavy)[before..];
    assert_eq!(again.len(), 23 + 3 + 3, "{again:?}");
    assert!(again.iter().all(|r| !r.faulted && r.status == 200));
    let day = record_of(app, Table::Export, SliceId::Day(heavy)).await;
    assert_eq!(day.status, SliceStatus::Committed);
    assert!(
        day.committed_at_ms.unwrap() > asked_at,
        "the day was committed again"
    );
    assert_exact(app, sim, heavy, heavy, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_mixpanel_cuts_off_at_every_size_is_split_then_parked_with_bounded_requests() {
    let cfg = sim_config("UTC", 2, 100);
    let heavy = cfg.first_day;
    let next = minus(today_in("UTC"), 1);
    let project = Project::start(cfg).await;
    project.simulator().push_fault(FaultRule::export_day(
        heavy,
        None,
        Fault::ServerError { status: 504 },
    ));
    let (_dir, app) = project
        .temp_app(&[NO_BACKOFF, ("MAX_SLICE_ATTEMPTS", "2")])
        .await;
    let report = cli::sync(&app, &[Table::Export]).await.unwrap();

    // The next day is not held up.
    assert_exact(&app, project.simulator(), next, next, None).await;
    assert!(
        read_partition(&app.sink, "", "export", heavy)
            .await
            .is_none()
    );
    // The day split into 24 hours, the first hour into quarters, the first quarter into five
    // minutes, which failed at the floor and parked. Every other slice, seeing that smaller
    // pieces fail as well (a fault of the day, not of its size), was not split but parked.
    let slices = app.store.slices(Table::Export).await.unwrap();
    let of_day: Vec<_> = slices
        .iter()
        .filter(|r| r.slice.day() == Some(heavy))
        .map(|r| (r.slice.to_string(), r.status, r.failures))
        .collect();
    let t = |s: &str| format!("{heavy}T{s}");
    let mut expected = vec![
        (t("00:00-00:05"), SliceStatus::Failed, 2),
        (t("00:00-00:15"), SliceStatus::Pending, 0),
        (t("00-01"), SliceStatus::Pending, 0),
        // Slices sort by first minute, then last: the day (0 to 1440) after its first hour.
        (heavy.to_string(), SliceStatus::Pending, 0),
        (t("00:05-00:10"), SliceStatus::Failed, 2),
        (t("00:10-00:15"), SliceStatus::Failed, 2),
        (t("00:15-00:30"), SliceStatus::Failed, 2),
        (t("00:30-00:45"), SliceStatus::Failed, 2),
        (t("00:45-01:00"), SliceStatus::Failed, 2),
    ];
    expected.extend((1..24).map(|h| (t(&format!("{h:02}-{:02}", h + 1)), SliceStatus::Failed, 2)));
    assert_eq!(of_day, expected);
    let error = |slice: &str| {
        slices
            .iter()
            .find(|r| r.slice.to_string() == slice)
            .and_then(|r| r.error.clone())
            .unwrap()
            .message
    };
    let floor = error(&t("00:05-00:10"));
    assert!(floor.contains("HTTP 504"), "{floor}");
    let hour = error(&t("05-06"));
    assert!(
        hour.contains("HTTP 504")
            && hour.contains("fail as well")
            && hour.contains("not split further"),
        "{hour}"
    );
    assert_eq!(report.parked.len(), 3 + 3 + 23);
    // The bound on requests: 2 for the day, 2 for the first hour, 2 for its first quarter,
    // 2 attempts of 2 for each five minutes at the floor; then each slice not split: 2 to
    // learn it, 1 more to park it.
    let requests = export_requests(project.simulator(), heavy);
    assert_eq!(requests.len(), 2 + 2 + 2 + 3 * 4 + 3 * 3 + 23 * 3);
    assert_eq!(
        app.store.bookmark(Table::Export).await.unwrap(),
        None,
        "the bookmark does not pass the parked day"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_without_retry_after_answers_partial_and_holds_every_request_back() {
    let cfg = sim_config("UTC", 1, 20);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    project.fault_export(
        None,
        FaultRule::PERSISTENT,
        Fault::RateLimited {
            retry_after_secs: None,
        },
    );
    // The plan's real budget: 60 exports an hour, so one slot is a minute.
    let (_dir, app) = project
        .temp_app(&[
            ("MIXPANEL_EXPORT_REQUESTS_PER_WINDOW", "60"),
            ("MIXPANEL_RATE_WINDOW_SECONDS", "3600"),
        ])
        .await;
    let short = || tokio::time::Instant::now() + Duration::from_secs(10);
    let r = handler::handle(&app, json!({"table": "export"}), short())
        .await
        .unwrap();
    assert_eq!(r.status, Status::Partial, "{r:?}");
    let reason = r.reason.unwrap();
    assert!(
        reason.starts_with("RateLimited: Mixpanel answered 429 for the export API"),
        "{reason}"
    );
    assert_eq!(r.failed, 0, "a rate limit is no failure of the slice");
    assert_eq!(export_requests(project.simulator(), day).len(), 1);

    // The next invocation (another one, the same minute) sends nothing: the budget waits.
    let r = handler::handle(&app, json!({"table": "export"}), short())
        .await
        .unwrap();
    assert_eq!(r.status, Status::Partial);
    assert_eq!(export_requests(project.simulator(), day).len(), 1);
    let rec = record_of(&app, Table::Export, SliceId::Day(day)).await;
    assert_eq!((rec.status, rec.failures), (SliceStatus::Pending, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_the_plan_does_not_allow_is_remembered_as_skipped() {
    let mut cfg = sim_config("UTC", 1, 5);
    cfg.plan_excludes = vec!["engage".into()];
    let project = Project::start(cfg).await;
    let (_dir, app) = project.temp_app(&[]).await;
    let engage_requests = || {
        project
            .simulator()
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/engage") || r.path.ends_with("/engage/properties"))
            .count()
    };
    let event = json!({"table": "engage"});
    let r = handler::handle(&app, event.clone(), deadline())
        .await
        .unwrap();
    assert_eq!(r.status, Status::Skipped);
    assert!(r.reason.as_deref().unwrap().contains("HTTP 402"), "{r:?}");
    let asked = engage_requests();
    assert!(asked >= 1);

    for _ in 0..3 {
        let r = handler::handle(&app, event.clone(), deadline())
            .await
            .unwrap();
        assert_eq!(r.status, Status::Skipped);
        assert!(r.reason.as_deref().unwrap().contains("remembered"), "{r:?}");
    }
    assert_eq!(
        engage_requests(),
        asked,
        "no request while the skip is remembered"
    );
    let report = cli::sync(&app, &[Table::Engage]).await.unwrap();
    assert_eq!(report.skipped, vec!["engage".to_string()]);
    assert_eq!(engage_requests(), asked);

    // `retry_parked` asks again.
    let r = handler::handle(
        &app,
        json!({"table": "engage", "retry_parked": true}),
        deadline(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, Status::Skipped);
    assert!(!r.reason.as_deref().unwrap().contains("remembered"));
    assert_eq!(engage_requests(), 2 * asked);
}

/// Mixpanel answering an empty 200 for every request covering `day` (an incident).
fn persistent_empty_answer(day: Date) -> FaultRule {
    FaultRule::export_day(
        day,
        None,
        Fault::Status {
            status: 200,
            body: String::new(),
        },
    )
}

async fn a_reread_that_shrinks_parks_and_a_day_event_forces_it(app: &App, project: &Project) {
    let day = project.simulator().config().first_day;
    let report = cli::sync(app, &[Table::Export]).await.unwrap();
    assert_eq!(report.failed, 0);
    let rows = truth(project.simulator(), day, None).len() as u64;
    assert!(rows > 20);

    project.simulator().push_fault(persistent_empty_answer(day));
    let r = handler::handle(app, json!({"table": "export"}), deadline())
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.failed, r.parked),
        (Status::Partial, 1, 1),
        "{r:?}"
    );
    let reason = r.reason.unwrap();
    assert!(
        reason.contains(&format!("export date={day} shrunk from {rows} to 0 rows")),
        "{reason}"
    );
    // The good day stays as it was; the slice is parked at once, for a person to judge.
    assert_exact(app, project.simulator(), day, day, None).await;
    let parked = record_of(app, Table::Export, SliceId::Day(day)).await;
    assert_eq!(parked.status, SliceStatus::Failed);
    assert_eq!(parked.error.unwrap().kind, "Shrunk");

    // Mixpanel really holds nothing now: the day event commits the day as read.
    let r = handle_export_day(app, day, deadline()).await.unwrap();
    assert_eq!((r.status, r.records), (Status::Done, 0), "{r:?}");
    let (manifest, rows) = read_partition(&app.sink, &app.prefix, "export", day)
        .await
        .unwrap();
    assert_eq!((manifest.records, rows.len()), (0, 0));
    let done = record_of(app, Table::Export, SliceId::Day(day)).await;
    assert_eq!((done.status, done.error), (SliceStatus::Committed, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrinking_reread_of_a_day_parks_locally() {
    let project = Project::start(sim_config("UTC", 1, 60)).await;
    let (_dir, app) = project
        .temp_app(&[NO_BACKOFF, ("MIXPANEL_REFRESH_MINUTES", "0")])
        .await;
    a_reread_that_shrinks_parks_and_a_day_event_forces_it(&app, &project).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrinking_reread_of_a_day_parks_on_aws() {
    let project = Project::start(sim_config("UTC", 1, 60)).await;
    let (_aws, app) = aws_app(
        &project,
        "shrink-bucket",
        "shrink-state",
        "shrink-secret",
        &[NO_BACKOFF, ("MIXPANEL_REFRESH_MINUTES", "0")],
    )
    .await;
    a_reread_that_shrinks_parks_and_a_day_event_forces_it(&app, &project).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_comes_back_empty_does_not_replace_the_latest_one() {
    let project = Project::start(sim_config("UTC", 1, 5)).await;
    let (_dir, app) = project
        .temp_app(&[NO_BACKOFF, ("MIXPANEL_REFRESH_MINUTES", "0")])
        .await;
    let event = json!({"table": "engage"});
    let r = handler::handle(&app, event.clone(), deadline())
        .await
        .unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    let (first, rows) = read_latest_snapshot(&app, "engage").await.unwrap();
    let profiles = project.simulator().engage_ground_truth().len();
    assert_eq!(rows.len(), profiles);

    // Mixpanel answers an empty, well-formed listing (an incident).
    project.simulator().push_fault(FaultRule::new(
        "/api/2.0/engage",
        FaultRule::PERSISTENT,
        Fault::Status {
            status: 200,
            body: r#"{"page": 0, "page_size": 1000, "session_id": "s-empty", "status": "ok", "total": 0, "results": []}"#.into(),
        },
    ));
    let r = handler::handle(&app, event.clone(), deadline())
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.failed, r.parked),
        (Status::Partial, 1, 1),
        "{r:?}"
    );
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains(&format!("shrunk from {profiles} to 0 rows")),
        "{r:?}"
    );
    let (latest, rows) = read_latest_snapshot(&app, "engage").await.unwrap();
    assert_eq!((latest.as_str(), rows.len()), (first.as_str(), profiles));

    // A person's retry publishes what Mixpanel now says.
    let r = handler::handle(
        &app,
        json!({"table": "engage", "retry_parked": true}),
        deadline(),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.records), (Status::Done, 0), "{r:?}");
    let (latest, rows) = read_latest_snapshot(&app, "engage").await.unwrap();
    assert_ne!(latest, first);
    assert!(rows.is_empty());
}
