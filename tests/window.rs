//! Multi-day export requests: contiguous small days fetched with one request and committed day
//! by day, in every timezone and time mode, with the fall-back to single days when a window
//! does not work out. The simulator over real HTTP, the local folder, and moto for the
//! scheduled Lambda handler.

mod support;

use std::time::Duration;

use jiff::civil::Date;
use mixpanel_replicator::app::App;
use mixpanel_replicator::cli::{sync, sync_concurrently};
use mixpanel_replicator::handler::{self, Status};
use mixpanel_replicator::state::{SliceId, SliceStatus};
use mixpanel_replicator::tables::Table;
use mixpanel_sim::{Fault, FaultRule, RequestRecord, SimConfig, Simulator, TimeMode};
use serde_json::json;
use support::harness::*;

fn d(s: &str) -> Date {
    s.parse().unwrap()
}

/// The export requests the simulator received, as (from_date, to_date).
fn export_requests(sim: &Simulator) -> Vec<(Date, Date)> {
    sim.requests()
        .iter()
        .filter(|r| r.path == "/api/2.0/export")
        .map(dates)
        .collect()
}

fn dates(r: &RequestRecord) -> (Date, Date) {
    let param = |name: &str| -> Date {
        r.query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} missing in {}", r.query))
            .parse()
            .unwrap()
    };
    (param("from_date"), param("to_date"))
}

/// Every day from `from` to `to` is committed once, with a manifest as the contract says (its
/// partition, its attempt's parts, their counts), a result recording its own raw bytes, and
/// no failure.
async fn assert_committed_by_contract(app: &App, from: Date, to: Date) {
    let slices = app.store.slices(Table::Export).await.unwrap();
    for day in days(from, to) {
        let (m, rows) = read_partition(&app.sink, &app.prefix, "export", day)
            .await
            .unwrap_or_else(|| panic!("{day} not committed"));
        assert_eq!(m.table, "export");
        assert_eq!(m.partition, format!("date={day}"));
        assert_eq!(m.records as usize, rows.len(), "{day}");
        assert_eq!(m.files.iter().map(|f| f.records).sum::<u64>(), m.records);
        assert!(
            m.files
                .iter()
                .all(|f| f.name.starts_with(&format!("part-{}-", m.attempt))),
            "{day}: {m:?}"
        );
        let r = slices
            .iter()
            .find(|r| r.slice == SliceId::Day(day))
            .unwrap();
        assert_eq!(
            (r.status, r.failures, r.progress.as_deref()),
            (SliceStatus::Committed, 0, None),
            "{day}"
        );
        let rec: serde_json::Value = serde_json::from_str(r.result.as_deref().unwrap()).unwrap();
        assert_eq!(rec["records"], m.records, "{day}: {rec}");
        // A day's raw bytes are its own lines': about 150 bytes or more per event.
        let raw = rec["raw_bytes"].as_u64().unwrap();
        assert!(
            (m.records == 0) == (raw == 0) && raw >= m.records * 100,
            "{day}: {rec}"
        );
    }
}

/// A project synced with `cli::sync` into a local folder (after `fault` was set, if any).
struct Synced {
    project: Project,
    _dir: tempfile::TempDir,
    app: App,
    first: Date,
    today: Date,
}

async fn synced(cfg: SimConfig, fault: Option<FaultRule>) -> Synced {
    let (first, tz) = (cfg.first_day, cfg.timezone.clone());
    let project = Project::start(cfg).await;
    if let Some(rule) = fault {
        project.simulator().push_fault(rule);
    }
    let (dir, app) = project.temp_app(&[]).await;
    let report = sync(&app, &[Table::Export]).await.unwrap();
    let today = today_in(&tz);
    // Every day committed (a window counts each of its days), exact, and as the contract says.
    let n = days(first, today).len() as u64;
    assert_eq!((report.slices, report.failed), (n, 0), "{report:?}");
    assert_exact(&app, project.simulator(), first, today, None).await;
    assert_committed_by_contract(&app, first, today).await;
    Synced {
        project,
        _dir: dir,
        app,
        first,
        today,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_of_120_small_days_is_one_probe_and_windows_of_30_days_each_committed_exactly() {
    let cfg = sim_config("America/New_York", 120, 40);
    let s = synced(cfg, None).await;
    // One probe of the first day, then windows of 30 days.
    let requests = export_requests(s.project.simulator());
    assert_eq!(requests.len(), 5, "{requests:?}");
    assert_eq!(
        s.app.store.bookmark(Table::Export).await.unwrap(),
        Some(s.today)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_a_new_project_probe_one_day_then_take_every_other_day_in_one_window() {
    // Days of 10,000 events, about 5.6 MB of raw JSONL each.
    let cfg = sim_config("UTC", 5, 10_000);
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    // The probe takes its time: no other request may start before its body is read.
    let probe_wait = Duration::from_millis(700);
    project.simulator().push_fault(FaultRule {
        from_date: Some(first),
        ..FaultRule::new(
            "/api/2.0/export",
            1,
            Fault::SlowFirstByte { delay: probe_wait },
        )
    });
    let (_dir, app) = project.temp_app(&[]).await;
    let report = sync_concurrently(&app, &[Table::Export], false, 2)
        .await
        .unwrap();
    let today = today_in("UTC");
    assert_eq!(report.failed, 0, "{report:?}");
    assert_exact(&app, project.simulator(), first, today, None).await;
    assert_committed_by_contract(&app, first, today).await;
    let records: Vec<RequestRecord> = project
        .simulator()
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/2.0/export")
        .collect();
    let requests: Vec<(Date, Date)> = records.iter().map(dates).collect();
    // One probe, alone until its body was read; then every other day in one request: the workers
    // claim one at a time, so the second worker never takes a day of the first one's window.
    assert_eq!(requests[0], (first, first), "{requests:?}");
    assert!(
        records[1].at_ms >= records[0].at_ms + probe_wait.as_millis() as u64,
        "a second request started before the probe was read: {records:?}"
    );
    assert_eq!(
        requests,
        vec![(first, first), (first.tomorrow().unwrap(), today)],
        "{requests:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_across_both_clock_changes_of_los_angeles_commit_each_day_exactly() {
    // 2026-03-08 (23 hours) and 2026-11-01 (25 hours) inside windows.
    let cfg = SimConfig {
        first_day: d("2026-02-20"),
        days: minus(today_in("America/Los_Angeles"), 0)
            .since(d("2026-02-20"))
            .unwrap()
            .get_days() as u32,
        ..sim_config("America/Los_Angeles", 1, 12)
    };
    let s = synced(cfg, None).await;
    let requests = export_requests(s.project.simulator());
    let n = days(s.first, s.today).len();
    assert_eq!(requests.len(), 1 + (n - 1).div_ceil(30), "{requests:?}");
    // Each clock change and the days around it were asked for with one request (local days
    // span two UTC dates: the window asks for both ends).
    for change in ["2026-03-08", "2026-11-01"] {
        let c = d(change);
        let covering: Vec<_> = requests
            .iter()
            .filter(|(f, t)| *f <= c && c <= *t)
            .collect();
        assert_eq!(covering.len(), 1, "{change}: {requests:?}");
        let (f, t) = covering[0];
        assert!(
            *f < c.yesterday().unwrap() && c.tomorrow().unwrap() < *t,
            "{change}: {f}..{t}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_in_pacific_chatham_commits_each_day_exactly_with_one_request() {
    let cfg = sim_config("Pacific/Chatham", 20, 40);
    let s = synced(cfg, None).await;
    // The probe, then one window for the other 20 days; no `to_date` after Mixpanel's today.
    let requests = export_requests(s.project.simulator());
    assert_eq!(requests.len(), 2, "{requests:?}");
    let utc_today = today_in("UTC");
    assert!(
        requests.iter().all(|(_, t)| *t <= utc_today),
        "{requests:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_in_project_local_mode_asks_for_the_local_days_and_commits_each_exactly() {
    let cfg = SimConfig {
        time_mode: TimeMode::ProjectLocal,
        ..sim_config("America/Los_Angeles", 20, 40)
    };
    let s = synced(cfg, None).await;
    let requests = export_requests(s.project.simulator());
    assert_eq!(
        requests,
        vec![(s.first, s.first), (s.first.tomorrow().unwrap(), s.today)],
        "local days, as project-local projects number them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_mixpanel_fails_falls_back_to_single_days_that_all_commit_exactly() {
    let cfg = sim_config("UTC", 20, 40);
    let heavy = minus(today_in("UTC"), 10);
    // Every request wider than two days that covers `heavy` ends `terminated early`.
    let rule = FaultRule::export_day(
        heavy,
        Some(Duration::from_secs(2 * 86_400)),
        Fault::TerminatedEarly { after_lines: 5 },
    );
    let s = synced(cfg, Some(rule)).await;
    // The probe, the window twice, then its 20 days alone: bounded, and no day failed.
    let requests = export_requests(s.project.simulator());
    assert_eq!(requests.len(), 1 + 2 + 20, "{requests:?}");
    assert!(
        requests[3..].iter().all(|(f, t)| f == t),
        "single days after the fall-back: {requests:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_whose_body_does_not_end_in_time_falls_back_to_single_days() {
    let cfg = sim_config("UTC", 6, 40);
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let (_dir, app) = project.temp_app(&[]).await;
    // The first day is committed alone (a day event never opens a window): the probe.
    let r = handler::handle(
        &app,
        json!({"table": "export", "date": first.to_string()}),
        tokio::time::Instant::now() + Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(r.status, Status::Done);
    // The window's body trickles: the deadline comes while it flows.
    project.simulator().push_fault(FaultRule {
        wider_than: Some(Duration::from_secs(2 * 86_400)),
        ..FaultRule::new(
            "/api/2.0/export",
            FaultRule::PERSISTENT,
            Fault::SlowBody {
                lines_per_second: 20,
            },
        )
    });
    let r = handler::handle(
        &app,
        json!({"table": "export"}),
        tokio::time::Instant::now() + Duration::from_secs(4),
    )
    .await
    .unwrap();
    assert_eq!(r.status, Status::Partial, "{r:?}");
    let slices = app.store.slices(Table::Export).await.unwrap();
    let pending: Vec<_> = slices
        .iter()
        .filter(|s| s.status != SliceStatus::Committed)
        .collect();
    // A loaded machine may measure the first days slow and fetch one or two more alone
    // before the window: the window is whatever was left, two days or more.
    let n = pending.len();
    assert!(n >= 2, "{slices:?}");
    assert!(
        pending.iter().all(|s| s.status == SliceStatus::Pending
            && s.failures == 0
            && s.progress.is_some()
            && matches!(s.slice, SliceId::Day(_))),
        "given back whole, marked to be fetched alone, no hours: {pending:?}"
    );
    // Then single days, each of which fits.
    let report = sync(&app, &[Table::Export]).await.unwrap();
    assert_eq!((report.slices, report.failed), (n as u64, 0));
    let today = today_in("UTC");
    assert_exact(&app, project.simulator(), first, today, None).await;
    assert_committed_by_contract(&app, first, today).await;
    // One window request, then single days only: one per day it held.
    let requests = export_requests(project.simulator());
    let windows: Vec<usize> = (0..requests.len())
        .filter(|i| requests[*i].0 != requests[*i].1)
        .collect();
    assert_eq!(windows.len(), 1, "{requests:?}");
    assert!(
        requests[windows[0] + 1..].iter().all(|(f, t)| f == t),
        "{requests:?}"
    );
    assert_eq!(requests.len(), windows[0] + 1 + n, "{requests:?}");
}

/// Whether this machine lets an unprivileged process mount a small file system of its own
/// (a user and mount namespace): what the disk-full test needs.
fn can_mount_a_small_tmpfs() -> bool {
    std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_whose_spill_fills_the_temporary_storage_falls_back_to_single_days() {
    if !can_mount_a_small_tmpfs() {
        // Checked where it can be: this machine cannot give the binary a small /tmp.
        eprintln!("skipped: `unshare -rm` cannot mount a tmpfs here");
        return;
    }
    // Ten days of ~220 kB of raw JSONL each, and a temporary storage of 1 MiB: a day's spill
    // fits, the window's (the nine days after the probe, and today) does not.
    let cfg = sim_config("UTC", 10, 400);
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let (out, spill) = (dir.path().join("out"), dir.path().join("spill"));
    std::fs::create_dir_all(&spill).unwrap();
    // The binary with the project's environment, in its own mount namespace with a 1 MiB /tmp.
    let mut cmd = std::process::Command::new("unshare");
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&project.vars)
        .env("SPILL", &spill)
        .env("OUT", &out)
        .env("BIN", BIN)
        .env("RUST_LOG", "warn")
        .args([
            "-rm",
            "sh",
            "-c",
            r#"mount -t tmpfs -o size=1m tmpfs "$SPILL" && TMPDIR="$SPILL" exec "$BIN" sync --table export --concurrency 1 --out "$OUT""#,
        ]);
    let out_run = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out_run.stderr);
    assert!(out_run.status.success(), "{stderr}");
    assert!(
        stderr.contains("outgrew the temporary storage")
            && stderr.contains("No space left on device"),
        "the window's spill filled the storage: {stderr}"
    );
    // The probe, the window (stopped when the storage was full), then its days alone.
    let requests = export_requests(project.simulator());
    let today = today_in("UTC");
    assert_eq!(requests.len(), 1 + 1 + 10, "{requests:?}");
    assert_eq!(requests[1], (minus(first, -1), today), "{requests:?}");
    assert!(
        requests[2..].iter().all(|(f, t)| f == t),
        "single days after the fall-back: {requests:?}"
    );
    let app = project.local_app(&out, &[]).await;
    assert_exact(&app, project.simulator(), first, today, None).await;
    assert_committed_by_contract(&app, first, today).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_lambda_a_backfill_of_120_small_days_reaches_idle_in_two_scheduled_invocations() {
    let cfg = sim_config("UTC", 120, 40);
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let (_aws, app) = aws_app(&project, "out-bucket", "state", "mixpanel/creds", &[]).await;
    let mut invocations = 0;
    loop {
        invocations += 1;
        assert!(invocations <= 10, "no end in sight");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let r = handler::handle(&app, json!({"table": "export"}), deadline)
            .await
            .unwrap();
        if r.status == Status::Idle {
            break;
        }
        assert_eq!(r.status, Status::Done, "{r:?}");
    }
    // One invocation works through the probe and the four windows; the next is idle.
    assert_eq!(invocations, 2, "the probe and four windows, then idle");
    let today = today_in("UTC");
    assert_exact(&app, project.simulator(), first, today, None).await;
    assert_committed_by_contract(&app, first, today).await;
    assert_eq!(export_requests(project.simulator()).len(), 5);
}
