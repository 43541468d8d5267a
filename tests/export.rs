//! The export table end to end: the simulator over real HTTP, the real replicator code, the
//! local folder and state file, and S3 + DynamoDB + Secrets Manager on moto.

mod support;

use mixpanel_replicator::cli::sync;
use mixpanel_replicator::error::ErrorKind;
use mixpanel_replicator::handler::{self, Status};
use mixpanel_replicator::state::{SliceId, SliceStatus};
use mixpanel_replicator::tables::Table;
use mixpanel_sim::{Fault, ServiceAccount, TimeMode};
use serde_json::json;
use support::harness::*;

/// Days fetched one request each: tests of per-day requests (faults met by a day's request,
/// one request per claimed slice) keep their shape with multi-day windows off.
const ONE_DAY_A_REQUEST: (&str, &str) = ("MIXPANEL_EXPORT_WINDOW_DAYS", "1");

fn deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(120)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_adversarial_days_replicate_exactly_into_a_local_folder() {
    let cfg = sim_config("UTC", 10, 300);
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let (dir, app) = project.temp_app(&[]).await;

    let report = sync(&app, &[Table::Export]).await.unwrap();
    let today = today_in("UTC");
    assert_eq!(report.slices, 11, "ten days of data and today");
    assert_eq!(report.failed, 0);
    assert_exact(&app, project.simulator(), first, today, None).await;
    assert_eq!(
        app.store.bookmark(Table::Export).await.unwrap(),
        Some(today)
    );
    // A small day is one file, however many cores wrote it.
    for day in days(first, today) {
        let (m, _) = read_partition(&app.sink, "", "export", day).await.unwrap();
        assert_eq!(m.files.len(), usize::from(m.records > 0), "{day}: {m:?}");
    }
    // The folder has the documented layout and a schema next to the data.
    let schema: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("export/_schema.json")).unwrap())
            .unwrap();
    let cols = schema["columns"].as_array().unwrap();
    assert!(
        cols.iter()
            .any(|c| c["name"] == "mp_reserved_insert_id" && c["type"] == "string"),
        "{schema}"
    );
    assert!(
        dir.path()
            .join(format!("export/date={first}/_manifest.json"))
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_adversarial_days_replicate_exactly_into_s3_with_dynamodb_state_and_a_secret() {
    let cfg = sim_config("UTC", 10, 300);
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let (aws, app) = aws_app(&project, "out-bucket", "state", "mixpanel/creds", &[]).await;

    let report = sync(&app, &[Table::Export]).await.unwrap();
    assert_eq!((report.slices, report.failed), (11, 0));
    assert_eq!(app.prefix, "mixpanel");
    assert_exact(&app, project.simulator(), first, today_in("UTC"), None).await;
    // gzip parts are application/gzip files, never a Content-Encoding a client would undo.
    let parts = aws
        .assert_part_headers(
            "out-bucket",
            "mixpanel/export",
            "jsonl.gz",
            "application/gzip",
        )
        .await;
    assert_eq!(parts, 10, "one part for each day with data");
    let slices = app.store.slices(Table::Export).await.unwrap();
    assert_eq!(slices.len(), 11);
    assert!(
        slices
            .iter()
            .all(|s| s.status == SliceStatus::Committed && s.attempts == 1)
    );
    assert!(
        app.sink
            .get("mixpanel/export/_schema.json")
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn days_replicate_exactly_as_zstd_into_a_local_folder_and_replace_gzip_parts() {
    let cfg = sim_config("UTC", 4, 300);
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    // Every day of the folder is read again by the second sync.
    let mut extra = vec![
        ("MIXPANEL_REFRESH_MINUTES", "0"),
        ("MIXPANEL_ATTRIBUTION_WINDOW_DAYS", "5"),
    ];
    let (dir, gzip_app) = project.temp_app(&extra).await;
    sync(&gzip_app, &[Table::Export]).await.unwrap();
    let today = today_in("UTC");
    assert_exact(&gzip_app, project.simulator(), first, today, None).await;
    drop(gzip_app);

    // The same folder, now as zstd: each day's gzip parts give way to its zstd parts.
    extra.push(("OUTPUT_COMPRESSION", "zstd"));
    let app = project.local_app(dir.path(), &extra).await;
    let report = sync(&app, &[Table::Export]).await.unwrap();
    assert_eq!((report.slices, report.failed), (5, 0), "{report:?}");
    // Each day's rows, decoded from its zstd parts, are exactly the ground truth (and the
    // manifests' sizes, record counts and symlink manifests match the parts).
    assert_exact(&app, project.simulator(), first, today, None).await;
    assert_layout(&app).await;
    let mut parts = Vec::new();
    for day in days(first, today) {
        let (m, _) = read_partition(&app.sink, "", "export", day).await.unwrap();
        for f in &m.files {
            assert!(f.name.ends_with(".jsonl.zst"), "{day}: {}", f.name);
            let path = dir.path().join(format!("export/date={day}/{}", f.name));
            parts.push(path);
        }
    }
    assert_eq!(parts.len(), 4, "one part for each day with data");
    // Nothing else in the folder is a part: the gzip parts were removed by the commits.
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                assert!(
                    !name.starts_with("part-") || parts.contains(&p),
                    "{} is not a committed zstd part",
                    p.display()
                );
            }
        }
    }
}

/// The attribution window: settings that re-read today and the five days before at once.
const LATE_WINDOW: [(&str, &str); 2] = [
    ("MIXPANEL_REFRESH_MINUTES", "0"),
    ("MIXPANEL_ATTRIBUTION_WINDOW_DAYS", "5"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_events_replace_their_days_and_leave_older_days_untouched() {
    let project = Project::start(sim_config("UTC", 10, 200)).await;
    let (_dir, app) = project.temp_app(&LATE_WINDOW).await;
    late_events_replace_their_days(&project, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_and_dynamodb_late_events_replace_their_days_and_leave_older_days_untouched() {
    let project = Project::start(sim_config("UTC", 10, 200)).await;
    let (_aws, app) = aws_app(
        &project,
        "late-out",
        "late-state",
        "late-secret",
        &LATE_WINDOW,
    )
    .await;
    late_events_replace_their_days(&project, &app).await;
}

async fn late_events_replace_their_days(project: &Project, app: &mixpanel_replicator::app::App) {
    let first = project.simulator().config().first_day;
    sync(app, &[Table::Export]).await.unwrap();

    let today = today_in("UTC");
    let old_day = minus(today, 8);
    let late_day = minus(today, 3);
    let (old_manifest, _) = read_partition(&app.sink, &app.prefix, "export", old_day)
        .await
        .unwrap();
    let (late_before, _) = read_partition(&app.sink, &app.prefix, "export", late_day)
        .await
        .unwrap();
    let before = truth(project.simulator(), late_day, None);
    project.simulator().add_late_events(late_day, 25);
    let after = truth(project.simulator(), late_day, None);
    assert_eq!(after.len(), before.len() + 25);

    let report = sync(app, &[Table::Export]).await.unwrap();
    assert_eq!(
        report.slices, 6,
        "the attribution window: today and the five days before"
    );
    assert_exact(app, project.simulator(), first, today, None).await;
    // (read_partition checks that the folder holds nothing but the new commit's parts)
    let (late_manifest, rows) = read_partition(&app.sink, &app.prefix, "export", late_day)
        .await
        .unwrap();
    assert_eq!(rows, after);
    assert_eq!(late_manifest.records, after.len() as u64);
    assert_ne!(late_manifest.attempt, late_before.attempt, "a new commit");
    // Outside the window nothing was touched.
    let (old_again, _) = read_partition(&app.sink, &app.prefix, "export", old_day)
        .await
        .unwrap();
    assert_eq!(old_again, old_manifest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_early_and_cut_bodies_are_fetched_again_and_end_exact() {
    let cfg = sim_config("UTC", 4, 300);
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let early_day = first;
    let cut_day = first.tomorrow().unwrap();
    project.fault_export(
        Some(early_day),
        1,
        Fault::TerminatedEarly { after_lines: 50 },
    );
    project.fault_export(Some(cut_day), 1, Fault::CutBody { after_lines: 80 });
    project.fault_export(
        Some(minus(today_in("UTC"), 1)),
        2,
        Fault::ServerError { status: 503 },
    );
    let (_dir, app) = project.temp_app(&[ONE_DAY_A_REQUEST]).await;
    let report = sync(&app, &[Table::Export]).await.unwrap();
    assert_eq!(report.failed, 0);
    assert_exact(&app, sim, first, today_in("UTC"), None).await;
    let faulted: Vec<_> = sim.requests().into_iter().filter(|r| r.faulted).collect();
    assert_eq!(
        faulted.len(),
        4,
        "every injected fault was met once: {faulted:?}"
    );
    // The failed attempts left no parts behind.
    for day in [early_day, cut_day] {
        // (read_partition checks that the folder holds nothing but the manifest's parts)
        let (m, _) = read_partition(&app.sink, "", "export", day).await.unwrap();
        assert!(!m.files.is_empty());
        assert!(
            m.files
                .iter()
                .all(|f| f.name.starts_with(&format!("part-{}-", m.attempt))),
            "{m:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_on_one_queue_replicate_each_slice_once() {
    let cfg = sim_config("UTC", 10, 200);
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let (aws, a) = aws_app(
        &project,
        "shared-bucket",
        "shared-state",
        "creds",
        &[ONE_DAY_A_REQUEST],
    )
    .await;
    let b = aws
        .app(
            &project,
            "shared-bucket",
            "shared-state",
            "creds",
            &[ONE_DAY_A_REQUEST],
        )
        .await;
    let (ra, rb) = tokio::join!(sync(&a, &[Table::Export]), sync(&b, &[Table::Export]));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(
        ra.slices + rb.slices,
        11,
        "each slice replicated by exactly one worker: {ra:?} {rb:?}"
    );
    assert_exact(&a, project.simulator(), first, today_in("UTC"), None).await;
    let slices = a.store.slices(Table::Export).await.unwrap();
    assert!(
        slices
            .iter()
            .all(|s| s.status == SliceStatus::Committed && s.attempts == 1),
        "{slices:?}"
    );
    let exports = project.simulator().requests().len();
    assert_eq!(exports, 11, "one export request per slice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_fails_clearly_commits_nothing_and_never_shows_the_secret() {
    let cfg = sim_config("UTC", 2, 50);
    let project = Project::start(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = "wr0ng-S3CRET-value-123";
    let out = project
        .command(Some("MIXPANEL_API_SECRET"))
        .args(["sync", "--table", "export", "--out"])
        .arg(dir.path())
        .env("MIXPANEL_API_SECRET", wrong)
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    let last = errors[0];
    assert!(
        last.starts_with("error: Mixpanel rejected the credentials (HTTP 401 on /api/2.0/export: Invalid credentials)")
            && last.ends_with("[Unauthorized]"),
        "{last}"
    );
    for text in [&stdout, &stderr] {
        assert!(!text.contains(wrong), "the secret leaked:\n{text}");
        assert!(
            !text.contains("d3IwbmctUzNDUkVU"),
            "the secret leaked base64-encoded:\n{text}"
        );
    }
    // Nothing committed: no manifest anywhere, no committed slice.
    let app = project.local_app(dir.path(), &[]).await;
    let slices = app.store.slices(Table::Export).await.unwrap();
    assert!(
        slices.iter().all(|s| s.status == SliceStatus::Pending),
        "{slices:?}"
    );
    let objects = app.sink.list("").await.unwrap();
    assert!(
        objects.iter().all(|o| !o.key.contains("export/")),
        "{objects:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_midnight_and_last_second_land_in_their_los_angeles_days() {
    let tz = "America/Los_Angeles";
    let cfg = sim_config(tz, 4, 200);
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let (_dir, app) = project.temp_app(&[]).await;
    sync(&app, &[Table::Export]).await.unwrap();
    let yesterday = minus(today_in(tz), 1);
    assert_exact(&app, project.simulator(), first, yesterday, None).await;
    let zone = jiff::tz::TimeZone::get(tz).unwrap();
    for day in days(first, yesterday) {
        let (_, rows) = read_partition(&app.sink, "", "export", day).await.unwrap();
        let local_times: Vec<String> = rows
            .iter()
            .map(|r| {
                let v: serde_json::Value = serde_json::from_str(r).unwrap();
                let ts: jiff::Timestamp = v["time"].as_str().unwrap().parse().unwrap();
                let z = ts.to_zoned_datetime(zone.clone());
                assert_eq!(z.date(), day, "{r}");
                z.time().to_string()
            })
            .collect();
        assert!(
            local_times.iter().any(|t| t == "00:00:00"),
            "{day} has an event at local midnight"
        );
        assert!(
            local_times.iter().any(|t| t == "23:59:59"),
            "{day} has an event at 23:59:59 local"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_project_local_time_is_converted_to_true_utc() {
    let tz = "America/Los_Angeles";
    let mut cfg = sim_config(tz, 3, 200);
    cfg.time_mode = TimeMode::ProjectLocal;
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let (_dir, app) = project.temp_app(&[]).await;
    sync(&app, &[Table::Export]).await.unwrap();
    assert_exact(
        &app,
        project.simulator(),
        first,
        minus(today_in(tz), 1),
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_sends_project_id_and_an_event_filter_is_applied() {
    let mut cfg = sim_config("UTC", 2, 200);
    cfg.service_account = Some(ServiceAccount {
        username: "replicator.abc123.mp-service-account".into(),
        secret: "sa-secret-xyz".into(),
        project_id: 4242,
    });
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let s = project
        .settings(&[
            (
                "MIXPANEL_SERVICE_ACCOUNT_USERNAME",
                "replicator.abc123.mp-service-account",
            ),
            ("MIXPANEL_SERVICE_ACCOUNT_SECRET", "sa-secret-xyz"),
            ("MIXPANEL_PROJECT_ID", "4242"),
            ("MIXPANEL_EXPORT_EVENTS", "Purchase, Signed Up"),
        ])
        .unwrap();
    // The service account wins over the API secret the project variables also hold.
    let app = local_app_in(s, dir.path()).await;
    sync(&app, &[Table::Export]).await.unwrap();
    let events = vec!["Purchase".to_string(), "Signed Up".to_string()];
    assert_exact(
        &app,
        project.simulator(),
        first,
        today_in("UTC"),
        Some(&events),
    )
    .await;
    let reqs = project.simulator().requests();
    assert!(!reqs.is_empty());
    for r in reqs {
        assert_eq!(r.auth, mixpanel_sim::AuthKind::ServiceAccount);
        assert!(r.query.contains("project_id=4242"), "{}", r.query);
        assert!(
            r.query
                .contains("event=%5B%22Purchase%22%2C%22Signed+Up%22%5D"),
            "{}",
            r.query
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_event_fans_out_one_event_per_day_and_replanning_queues_nothing_twice() {
    let cfg = sim_config("UTC", 5, 50);
    let project = Project::start(cfg).await;
    let (_dir, app) = project.temp_app(&[]).await;
    let from = minus(today_in("UTC"), 4);
    let to = minus(today_in("UTC"), 2);
    let event = json!({"table": "export", "from": from.to_string(), "to": to.to_string()});
    let r = handler::handle(&app, event.clone(), deadline())
        .await
        .unwrap();
    assert_eq!(r.status, Status::FanOut);
    assert_eq!(r.queued, 3);
    let expected: Vec<_> = days(from, to)
        .iter()
        .map(|d| json!({"table": "export", "date": d.to_string()}))
        .collect();
    assert_eq!(r.events.as_ref().unwrap(), &expected);
    let r2 = handler::handle(&app, event, deadline()).await.unwrap();
    assert_eq!((r2.status, r2.queued), (Status::FanOut, 0));
    let slices = app.store.slices(Table::Export).await.unwrap();
    assert_eq!(
        slices.iter().map(|s| s.slice).collect::<Vec<_>>(),
        days(from, to)
            .into_iter()
            .map(SliceId::Day)
            .collect::<Vec<_>>()
    );
    // Each fanned-out event replicates its day.
    for e in expected {
        let r = handler::handle(&app, e, deadline()).await.unwrap();
        assert_eq!(r.status, Status::Done);
    }
    assert_exact(&app, project.simulator(), from, to, None).await;
    // A scheduled invocation then plans the rest and works through it, oldest day first.
    let r = handler::handle(&app, json!({"table": "export"}), deadline())
        .await
        .unwrap();
    assert_eq!(r.status, Status::Done);
    let first = project.simulator().config().first_day;
    let today = today_in("UTC");
    let rest: Vec<jiff::civil::Date> = days(first, today)
        .into_iter()
        .filter(|d| !(from..=to).contains(d))
        .collect();
    // The oldest day alone (the days after it are committed), then the days after the range
    // as one window.
    assert_eq!(
        r.slice.as_deref(),
        Some(format!("{first},{}..{today}", minus(to, -1)).as_str())
    );
    assert_eq!(r.slices, rest.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_and_settings_fail_clearly_and_change_nothing() {
    let cfg = sim_config("UTC", 1, 10);
    let project = Project::start(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let run = |event: &str, drop_var: Option<&str>| {
        let out = output_with_stdin(
            project
                .command(drop_var)
                .args(["invoke", "--event", "-"])
                .current_dir(dir.path()),
            Some(event),
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    };
    for (event, says) in [
        (
            r#"{"table": "exports"}"#,
            "error: invalid event: unknown table \"exports\"",
        ),
        (
            r#"{"table": "export", "date": "2026-02-30"}"#,
            "error: invalid event: `date` must be a date YYYY-MM-DD, got \"2026-02-30\"",
        ),
        (
            r#"{"table": "export", "from": "2026-11-02", "to": "2026-11-01"}"#,
            "error: invalid event: `from` (2026-11-02) is after `to` (2026-11-01)",
        ),
        (
            r#"{"table": "export", "hour": 3}"#,
            "error: invalid event: unknown field `hour`",
        ),
        (
            r#"{"table": "export""#,
            "error: invalid event: the event is not JSON",
        ),
    ] {
        let (code, stderr) = run(event, None);
        assert_eq!(code, Some(1), "{event}: {stderr}");
        assert!(
            stderr.starts_with(says) && stderr.ends_with("[InvalidEvent]"),
            "{event}: {stderr}"
        );
    }
    let (code, stderr) = run(r#"{"table": "export"}"#, Some("MIXPANEL_START_DATE"));
    assert_eq!(code, Some(1));
    assert_eq!(
        stderr,
        "error: MIXPANEL_START_DATE: is required: the first day to replicate, as YYYY-MM-DD [InvalidSetting]"
    );
    // Nothing was created: no state file, no output.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert!(project.simulator().requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_server_errors_are_retried_honouring_retry_after() {
    let cfg = sim_config("UTC", 1, 50);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    project.fault_export(
        Some(day),
        1,
        Fault::RateLimited {
            retry_after_secs: Some(2),
        },
    );
    project.fault_export(Some(day), 1, Fault::ServerError { status: 502 });
    let (_dir, app) = project.temp_app(&[]).await;
    let r = handle_export_day(&app, day, deadline()).await.unwrap();
    assert_eq!(
        (r.status, r.records),
        (Status::Done, truth(sim, day, None).len() as u64)
    );
    let reqs: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.query.contains(&format!("from_date={day}")))
        .collect();
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        [429, 502, 200]
    );
    assert!(
        reqs[1].at_ms - reqs[0].at_ms >= 2000,
        "Retry-After: 2 was honoured: {reqs:?}"
    );
    assert_exact(&app, sim, day, day, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_without_export_gives_skipped_and_keeps_the_day_pending() {
    let cfg = sim_config("UTC", 1, 20);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    project.fault_export(
        None,
        1,
        Fault::Status {
            status: 402,
            body: r#"{"error": "Your plan does not allow API calls. Upgrade at mixpanel.com/pricing"}"#.into(),
        },
    );
    let (_dir, app) = project.temp_app(&[]).await;
    let r = handle_export_day(&app, day, deadline()).await.unwrap();
    assert_eq!(r.status, Status::Skipped);
    assert!(
        r.reason.as_deref().unwrap().contains("plan does not allow"),
        "{r:?}"
    );
    let slices = app.store.slices(Table::Export).await.unwrap();
    assert_eq!(slices[0].status, SliceStatus::Pending);
    assert!(read_partition(&app.sink, "", "export", day).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_slower_than_the_budget_answers_partial_and_the_next_invocation_finishes() {
    let cfg = sim_config("UTC", 1, 50);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    project.fault_export(
        Some(day),
        1,
        Fault::SlowFirstByte {
            delay: std::time::Duration::from_secs(5),
        },
    );
    let (_dir, app) = project.temp_app(&[]).await;
    let event = export_day(day);
    let short = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    let r = handler::handle(&app, event.clone(), short).await.unwrap();
    assert_eq!(r.status, Status::Partial, "{r:?}");
    assert_eq!(
        app.store.slices(Table::Export).await.unwrap()[0].status,
        SliceStatus::Pending
    );
    assert!(read_partition(&app.sink, "", "export", day).await.is_none());
    let r = handler::handle(&app, event, deadline()).await.unwrap();
    assert_eq!(r.status, Status::Done);
    assert_exact(&app, project.simulator(), day, day, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_is_picked_up_after_mixpanel_rejects_the_old_one() {
    let cfg = sim_config("UTC", 1, 20);
    let day = cfg.first_day;
    let good = cfg.api_secret.clone();
    let project = Project::start(cfg).await;
    let aws = Aws::start().await;
    aws.provision(
        "rotation-bucket",
        "rotation-state",
        "creds",
        r#"{"api_secret": "stale-secret"}"#,
    )
    .await;
    let app = aws
        .app(&project, "rotation-bucket", "rotation-state", "creds", &[])
        .await;
    let event = export_day(day);
    let e = handler::handle(&app, event.clone(), deadline())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized);
    assert!(!e.to_string().contains("stale-secret"));
    aws_sdk_secretsmanager::Client::new(&aws.sdk)
        .put_secret_value()
        .secret_id("creds")
        .secret_string(json!({"api_secret": good}).to_string())
        .send()
        .await
        .unwrap();
    let r = handler::handle(&app, event, deadline()).await.unwrap();
    assert_eq!(r.status, Status::Done);
    assert_exact(&app, project.simulator(), day, day, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_select_properties_off_only_the_first_discovered_columns_are_kept() {
    let cfg = sim_config("UTC", 2, 100);
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let (_dir, app) = project
        .temp_app(&[("MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT", "false")])
        .await;
    // The table was first discovered with only these properties.
    let mut known = mixpanel_replicator::state::Schema::default();
    for c in [
        "mp_reserved_insert_id",
        "mp_processing_time_ms",
        "mp_reserved_city",
    ] {
        known.columns.insert(c.to_string(), "string".to_string());
    }
    app.store.init_schema(Table::Export, &known).await.unwrap();
    sync(&app, &[Table::Export]).await.unwrap();
    let keep = [
        "event",
        "distinct_id",
        "time",
        "mp_reserved_insert_id",
        "mp_processing_time_ms",
        "mp_reserved_city",
    ];
    for day in days(first, minus(today_in("UTC"), 1)) {
        let (_, rows) = read_partition(&app.sink, "", "export", day).await.unwrap();
        // Mixpanel's own properties are kept whatever was discovered.
        let system = |k: &str| {
            (k.starts_with("mp_") && !k.starts_with("mp_reserved_"))
                || k.starts_with("mp_reserved_mp_")
        };
        let expected = canonical_keeping(project.simulator().export_ground_truth(day, None), |k| {
            keep.contains(&k) || system(k)
        });
        assert_eq!(rows, expected, "{day}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_select_properties_off_the_first_discovery_asks_mixpanel_which_properties_exist() {
    let cfg = sim_config("UTC", 2, 100);
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let (_dir, app) = project
        .temp_app(&[("MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT", "false")])
        .await;
    sync(&app, &[Table::Export]).await.unwrap();
    let sim = project.simulator();
    assert_eq!(
        sim.requests()
            .iter()
            .filter(|r| r.path == "/api/2.0/events/properties/top")
            .count(),
        1,
        "discovered once"
    );
    let schema = app.store.schema(Table::Export).await.unwrap().unwrap();
    assert!(
        schema.columns.contains_key("mp_reserved_insert_id"),
        "{schema:?}"
    );
    for day in days(first, minus(today_in("UTC"), 1)) {
        let (_, rows) = read_partition(&app.sink, "", "export", day).await.unwrap();
        let expected = canonical_keeping(sim.export_ground_truth(day, None), |k| {
            schema.columns.contains_key(k)
        });
        assert_eq!(rows, expected, "{day}");
    }
}

/// Every `part-` object in a date partition, by name.
async fn parts_in(app: &mixpanel_replicator::app::App, day: jiff::civil::Date) -> Vec<String> {
    let mut names: Vec<String> = app
        .sink
        .list(&format!("export/date={day}/"))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|o| o.key.rsplit('/').next().map(String::from))
        .filter(|n| n.starts_with("part-"))
        .collect();
    names.sort();
    names
}

/// The first second of hour `h` of the UTC day `day`, as the export counts it.
fn hour_start(day: jiff::civil::Date, h: i8) -> i64 {
    let days = i64::from((day - jiff::civil::date(1970, 1, 1)).get_days());
    days * 86_400 + i64::from(h) * 3600
}

/// A rule for the requests of `day`'s hour `h` (and of any range holding it).
fn at_hour(day: jiff::civil::Date, h: i8, times: u32, fault: Fault) -> mixpanel_sim::FaultRule {
    mixpanel_sim::FaultRule {
        times,
        ..mixpanel_sim::FaultRule::export_instant(hour_start(day, h), None, fault)
    }
}

/// The export requests the simulator saw from index `from` on that name `day`.
fn export_asked(sim: &mixpanel_sim::Simulator, from: usize, day: jiff::civil::Date) -> Vec<String> {
    sim.requests()
        .into_iter()
        .skip(from)
        .filter(|q| q.path == "/api/2.0/export" && q.query.contains(&day.to_string()))
        .map(|q| q.query)
        .collect()
}

/// The hour labels `from..to` of `day`.
fn hour_labels(day: jiff::civil::Date, hours: std::ops::Range<u8>) -> Vec<String> {
    hours
        .map(|h| format!("{day}T{h:02}-{:02}", h + 1))
        .collect()
}

// Which invocation reads which hour does not rest on how fast the machine is. Where an
// invocation must stop, Mixpanel holds an answer ([`Fault::Held`], [`Fault::HeldBody`]) until the
// test has its answer, so its deadline certainly comes while that hour (or the day) is being
// read; the work before it is a few fast requests against seconds. Where the replicator must
// judge a day or an invocation slow (the split before the fetch, the stop after a commit), the
// hours are paced ([`Fault::SlowBody`]): a body takes at least its lines over the rate, on any
// machine, and the deadlines are set against that lower bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_too_big_for_one_invocation_is_replicated_in_hour_slices_and_committed_once() {
    let cfg = sim_config("UTC", 2, 4800);
    let (d1, d2) = (cfg.first_day, cfg.first_day.tomorrow().unwrap());
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    // The whole day's body stops after 1,000 lines until the first invocation has answered.
    let day_gate = mixpanel_sim::Gate::new();
    sim.push_fault(mixpanel_sim::FaultRule {
        times: 1,
        ..mixpanel_sim::FaultRule::export_day(
            d1,
            Some(std::time::Duration::from_secs(3600)),
            Fault::HeldBody {
                after_lines: 1000,
                gate: day_gate.clone(),
            },
        )
    });
    // Hour 12's first answer is held until the second invocation has answered.
    let hour_gate = mixpanel_sim::Gate::new();
    sim.push_fault(at_hour(
        d1,
        12,
        1,
        Fault::Held {
            gate: hour_gate.clone(),
        },
    ));
    // Hours 12 to 23 come paced: at least 4.5 s together, whatever the machine.
    let late_rows = sim
        .export_ground_truth(d1, None)
        .iter()
        .filter(|v| {
            let ts: jiff::Timestamp = v["time"].as_str().unwrap().parse().unwrap();
            ts.as_second() >= hour_start(d1, 12)
        })
        .count() as u32;
    let pace_late_hours = || {
        for h in 12..24 {
            sim.push_fault(at_hour(
                d1,
                h,
                mixpanel_sim::FaultRule::PERSISTENT,
                Fault::SlowBody {
                    lines_per_second: late_rows * 2 / 9,
                },
            ));
        }
    };
    pace_late_hours();
    let (_dir, app) = project.temp_app(&[]).await;
    let within = |secs| tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    let scheduled = json!({"table": "export"});
    let labels_of = |r: &mixpanel_replicator::handler::Response| -> Vec<String> {
        r.slice
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(String::from)
            .collect()
    };

    // 1. The first day's body does not end: abandoned cleanly and re-planned as 24 hours.
    let r = handler::handle(&app, scheduled.clone(), within(6))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Partial, "{r:?}");
    assert_eq!(r.slice.as_deref(), Some(d1.to_string().as_str()));
    let reason = r.reason.unwrap();
    assert!(
        reason.contains("did not end within the invocation")
            && reason.contains("re-planned as 24 hour slices"),
        "{reason}"
    );
    assert_eq!(day_gate.held(), 1);
    assert_eq!(export_asked(sim, 0, d1).len(), 1, "the whole day, once");
    let slices = app.store.slices(Table::Export).await.unwrap();
    let hours: Vec<String> = slices
        .iter()
        .filter(|s| matches!(s.slice, SliceId::Hours { .. }))
        .map(|s| s.slice.to_string())
        .collect();
    assert_eq!(hours, hour_labels(d1, 0..24));
    assert!(slices.iter().all(|s| s.status == SliceStatus::Pending));
    assert!(
        parts_in(&app, d1).await.is_empty(),
        "nothing of the day is written"
    );
    assert!(read_partition(&app.sink, "", "export", d1).await.is_none());

    // 2. The next invocation goes on from hour to hour while its time allows: hours 0 to 11,
    // until Mixpanel has not answered hour 12 by its deadline.
    let seen = sim.requests().len();
    let r = handler::handle(&app, scheduled.clone(), within(5))
        .await
        .unwrap();
    assert_eq!((r.status, r.failed), (Status::Partial, 0), "{r:?}");
    assert_eq!(labels_of(&r), hour_labels(d1, 0..12), "{r:?}");
    assert_eq!(hour_gate.held(), 1);
    assert_eq!(export_asked(sim, seen, d1).len(), 12, "hour 12 is held");
    assert!(read_partition(&app.sink, "", "export", d1).await.is_none());

    // 3. The next one reads hours 12 to 23 and commits the day from its hours. Its one slice
    // took more than 4.5 s: another as slow does not fit its 10 s, so it answers then.
    let seen = sim.requests().len();
    let r = handler::handle(&app, scheduled.clone(), within(10))
        .await
        .unwrap();
    assert_eq!((r.status, r.failed), (Status::Partial, 0), "{r:?}");
    // (The invocation that commits the day answers for the day, not for its hours.)
    assert_eq!(labels_of(&r), [d1.to_string()], "{r:?}");
    assert_eq!(export_asked(sim, seen, d1).len(), 12);
    assert!(export_asked(sim, seen, d2).is_empty());
    // Committed once, from its hours: exactly the manifest's parts are in the folder.
    let (manifest, _) = read_partition(&app.sink, "", "export", d1).await.unwrap();
    let listed: Vec<String> = manifest.files.iter().map(|f| f.name.clone()).collect();
    assert_eq!(
        parts_in(&app, d1).await,
        listed,
        "exactly the manifest's parts"
    );

    // 4. The second day is split before it is fetched: its neighbour took longer (4.5 s at
    // least) than most of the 4.8 s this invocation has for work. No whole-day request of it
    // is made; its hours are quick, and the day is committed from them.
    let seen = sim.requests().len();
    let r = handler::handle(&app, scheduled.clone(), within(6))
        .await
        .unwrap();
    assert!(
        matches!(r.status, Status::Done | Status::Partial) && r.failed == 0,
        "{r:?}"
    );
    let labels = labels_of(&r);
    assert_eq!(labels[0], d2.to_string(), "{r:?}");
    // Then, time allowing, today (which has no events).
    let today = d2.tomorrow().unwrap();
    assert!(labels[1..].iter().all(|l| *l == today.to_string()), "{r:?}");
    let asked = export_asked(sim, seen, d2);
    assert_eq!(asked.len(), 24, "one request per hour: {asked:#?}");
    assert!(asked.iter().all(|q| q.contains("where=")));
    let slices = app.store.slices(Table::Export).await.unwrap();
    for d in [d1, d2] {
        let hours: Vec<_> = slices
            .iter()
            .filter(|r| matches!(r.slice, SliceId::Hours { day, .. } if day == d))
            .collect();
        assert_eq!(hours.len(), 24, "{d}");
        assert!(
            hours.iter().all(|h| h.status == SliceStatus::Committed),
            "{d}"
        );
    }
    assert_eq!(
        export_asked(sim, 0, d1).len(),
        25,
        "the whole day once, then each hour once"
    );
    assert_exact(&app, sim, d1, d2, None).await;
    assert_symlink(&app.sink, &format!("export/date={d1}"), &manifest).await;
    // The bookmark is at the second day, or at today when that invocation had time left to
    // commit today as well.
    let today_committed = labels.contains(&today.to_string());
    assert_eq!(
        app.store.bookmark(Table::Export).await.unwrap(),
        Some(if today_committed { today } else { d2 })
    );

    // 5. Replicating the first day again (an explicit event) runs its hours again and replaces
    // the day's parts with theirs in one commit: hours 0 to 11 first (hour 12 is held again)...
    let old = parts_in(&app, d1).await;
    let event = export_day(d1);
    // (The first matching rule applies: the hold goes before the pacing.)
    sim.clear_faults();
    let hour_gate = mixpanel_sim::Gate::new();
    sim.push_fault(at_hour(
        d1,
        12,
        1,
        Fault::Held {
            gate: hour_gate.clone(),
        },
    ));
    pace_late_hours();
    let r = handler::handle(&app, event.clone(), within(5))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    assert_eq!(labels_of(&r), hour_labels(d1, 0..12), "{r:?}");
    assert_eq!(hour_gate.held(), 1);
    // Until the day is committed again, its readers keep the previous commit (the new hours'
    // parts wait beside it, listed by no manifest yet).
    let body = app
        .sink
        .get(&format!("export/date={d1}/_manifest.json"))
        .await
        .unwrap()
        .unwrap();
    let m: mixpanel_replicator::run::commit::Manifest = serde_json::from_slice(&body).unwrap();
    assert_eq!(m, manifest);
    // ... then hours 12 to 23 and the day's commit.
    let r = handler::handle(&app, event.clone(), within(10))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    assert_eq!(labels_of(&r), [d1.to_string()], "{r:?}");
    let new = parts_in(&app, d1).await;
    assert!(new.iter().all(|n| !old.contains(n)), "old parts removed");
    assert_exact(&app, sim, d1, d2, None).await;
    assert_layout(&app).await;
    day_gate.open();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_removes_temporary_files_that_a_killed_run_left_in_the_folder() {
    let cfg = sim_config("UTC", 1, 20);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    let (dir, app) = project.temp_app(&[]).await;
    let folder = dir.path().join(format!("export/date={day}"));
    std::fs::create_dir_all(&folder).unwrap();
    let left = folder.join(".part-0123456789ab-00000.jsonl.gz.tmp-0f0f0f");
    let writing = folder.join(".part-ba9876543210-00000.jsonl.gz.tmp-1e1e1e");
    for f in [&left, &writing] {
        std::fs::write(f, b"half a part").unwrap();
    }
    // Untouched for two hours: its writer is gone. The other one is still being written.
    std::fs::File::options()
        .write(true)
        .open(&left)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
        .unwrap();

    let r = handle_export_day(&app, day, deadline()).await.unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    assert!(!left.exists(), "the abandoned temporary file is removed");
    assert!(
        writing.exists(),
        "a temporary file still being written stays"
    );
    assert_exact(&app, project.simulator(), day, day, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_split_into_hours_commits_exactly_on_s3_with_its_hours_recorded_in_dynamodb() {
    let cfg = sim_config("UTC", 1, 4800);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    // The whole day's body stops after 1,000 lines until the first invocation has answered:
    // its deadline comes while the body is being read, on any machine (see the local test).
    let gate = mixpanel_sim::Gate::new();
    project.simulator().push_fault(mixpanel_sim::FaultRule {
        times: 1,
        ..mixpanel_sim::FaultRule::export_day(
            day,
            Some(std::time::Duration::from_secs(3600)),
            Fault::HeldBody {
                after_lines: 1000,
                gate: gate.clone(),
            },
        )
    });
    let (_aws, app) = aws_app(&project, "out-bucket", "state", "mixpanel/creds", &[]).await;
    let event = export_day(day);

    let short = tokio::time::Instant::now() + std::time::Duration::from_secs(6);
    let r = handler::handle(&app, event.clone(), short).await.unwrap();
    assert_eq!(r.status, Status::Partial, "{r:?}");
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("re-planned as 24 hour slices"),
        "{r:?}"
    );
    assert_eq!(gate.held(), 1);
    // The next invocation has the time for every hour: it reads the 24 of them and commits
    // the day from them.
    let r = handler::handle(&app, event.clone(), deadline())
        .await
        .unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    assert_eq!(r.slice.as_deref(), Some(day.to_string().as_str()), "{r:?}");
    assert_eq!(
        r.records,
        truth(project.simulator(), day, None).len() as u64
    );
    assert_eq!(
        export_asked(project.simulator(), 0, day).len(),
        25,
        "the whole day once, then each hour once"
    );
    gate.open();
    assert_exact(&app, project.simulator(), day, day, None).await;
    let (manifest, _) = read_partition(&app.sink, &app.prefix, "export", day)
        .await
        .unwrap();

    // DynamoDB holds each hour with the parts it recorded: together, the manifest's parts.
    let slices = app.store.slices(Table::Export).await.unwrap();
    let mut recorded: Vec<String> = Vec::new();
    for s in slices
        .iter()
        .filter(|s| matches!(s.slice, SliceId::Hours { .. }))
    {
        assert_eq!(s.status, SliceStatus::Committed, "{s:?}");
        let r: serde_json::Value = serde_json::from_str(s.result.as_deref().unwrap()).unwrap();
        for f in r["files"].as_array().into_iter().flatten() {
            recorded.push(f["name"].as_str().unwrap().to_string());
        }
    }
    recorded.sort();
    let listed: Vec<String> = manifest.files.iter().map(|f| f.name.clone()).collect();
    assert_eq!(recorded, listed);
    let day_record = slices
        .iter()
        .find(|s| s.slice == SliceId::Day(day))
        .unwrap();
    let r: serde_json::Value = serde_json::from_str(day_record.result.as_deref().unwrap()).unwrap();
    assert_eq!(r["records"], manifest.records);
    assert!(r["raw_bytes"].as_u64().unwrap() > 1 << 20, "{r}");
    assert_eq!(app.store.bookmark(Table::Export).await.unwrap(), Some(day));
    assert_layout(&app).await;
}
