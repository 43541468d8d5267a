//! Real export bodies hold lines that are not well formed: times as floats, strings or
//! milliseconds, events split over lines by raw line breaks, control bytes, lines without
//! `properties` or not JSON at all. None blocks its day and none is lost: the usable ones are
//! rows, the rest are kept raw under `_rejected/` and counted.

mod support;

use jiff::civil::Date;
use mixpanel_replicator::app::App;
use mixpanel_replicator::handler::Status;
use mixpanel_replicator::run::commit::Manifest;
use mixpanel_replicator::state::{SliceId, SliceStatus};
use mixpanel_replicator::tables::Table;
use mixpanel_sim::{Fault, SimConfig, Simulator};
use support::harness::*;

fn deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(120)
}

fn messy(tz: &str, days: u32, events_per_day: u32) -> SimConfig {
    SimConfig {
        messy_lines: true,
        ..sim_config(tz, days, events_per_day)
    }
}

/// The rejected-lines folder of a day.
fn rejected_folder(app: &App, day: Date) -> String {
    let rest = format!("export/_rejected/date={day}");
    if app.prefix.is_empty() {
        rest
    } else {
        format!("{}/{rest}", app.prefix)
    }
}

/// Asserts that the day's manifest counts and lists its rejected lines, that the folder holds
/// exactly those parts, and that they hold exactly the simulator's unusable lines, raw.
/// Returns the rejected parts' names.
async fn assert_rejected_exact(app: &App, sim: &Simulator, day: Date) -> Vec<String> {
    let (manifest, _) = read_partition(&app.sink, &app.prefix, "export", day)
        .await
        .unwrap_or_else(|| panic!("export {day} was not committed"));
    let truth = sim.export_rejected_truth(day);
    assert_eq!(manifest.rejected, Some(truth.len() as u64), "{day}");
    let listed_files = manifest.rejected_files.clone().unwrap_or_default();
    let folder = rejected_folder(app, day);
    let mut present: Vec<String> = app
        .sink
        .list(&format!("{folder}/"))
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    present.sort();
    let mut named: Vec<String> = listed_files
        .iter()
        .map(|f| format!("{folder}/{}", f.name))
        .collect();
    named.sort();
    assert_eq!(
        present, named,
        "the rejected folder of {day} holds what its manifest lists"
    );
    let mut lines = Vec::new();
    for f in &listed_files {
        let gz = app
            .sink
            .get(&format!("{folder}/{}", f.name))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(gz.len() as u64, f.bytes, "{}", f.name);
        let raw = decode_part(&f.name, &gz).unwrap();
        assert!(raw.ends_with(b"\n"), "one line per rejected line");
        let these: Vec<Vec<u8>> = raw[..raw.len() - 1]
            .split(|b| *b == b'\n')
            .map(<[u8]>::to_vec)
            .collect();
        assert_eq!(these.len() as u64, f.records, "{}", f.name);
        lines.extend(these);
    }
    lines.sort();
    assert_eq!(lines, truth, "the rejected lines of {day}, exactly as sent");
    listed_files.into_iter().map(|f| f.name).collect()
}

async fn manifest_of(app: &App, day: Date) -> Manifest {
    read_partition(&app.sink, &app.prefix, "export", day)
        .await
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_messy_day_commits_every_good_row_and_keeps_the_unusable_lines_raw() {
    // Los Angeles: each day is asked for over two UTC days with a `where` on its hours.
    let cfg = messy("America/Los_Angeles", 2, 300);
    let (first, last) = (cfg.first_day, cfg.first_day.tomorrow().unwrap());
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (_dir, app) = project.temp_app(&[]).await;
    for day in [first, last] {
        let r = handle_export_day(&app, day, deadline()).await.unwrap();
        assert_eq!(r.status, Status::Done, "{r:?}");
        assert_eq!(r.records, truth(sim, day, None).len() as u64);
        assert_eq!(r.rejected, 2, "a line without properties and one not JSON");
        let answer = serde_json::to_value(&r).unwrap();
        assert_eq!(answer["rejected"], 2, "{answer}");
    }
    // Times as floats, strings and milliseconds, split and repaired events (one of about
    // 560 KB whose halves the reader's blocks cut apart), all exact.
    assert_exact(&app, sim, first, last, None).await;
    for day in [first, last] {
        assert_rejected_exact(&app, sim, day).await;
        let rows = read_partition(&app.sink, "", "export", day)
            .await
            .unwrap()
            .1;
        for kind in [
            "float time",
            "string time",
            "ms time",
            "raw newline",
            "raw crlf",
            "big split",
        ] {
            assert!(
                rows.iter()
                    .any(|r| r.contains(&format!("\"messy\":\"{kind}\""))),
                "{day}: the {kind} event is a row"
            );
        }
    }
    assert_layout(&app).await;

    // A day without such lines has none, and its answer no `rejected`.
    let cfg = sim_config("UTC", 1, 20);
    let day = cfg.first_day;
    let plain = Project::start(cfg).await;
    let (_dir, app) = plain.temp_app(&[]).await;
    let r = handle_export_day(&app, day, deadline()).await.unwrap();
    let answer = serde_json::to_value(&r).unwrap();
    assert!(answer.get("rejected").is_none(), "{answer}");
    assert_rejected_exact(&app, plain.simulator(), day).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_split_into_hours_records_each_hours_rejected_lines_and_commits_them_once() {
    let cfg = messy("UTC", 1, 400);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (_dir, app) = project.temp_app(&[]).await;
    // The day was split into hours (as a day too big for one invocation is).
    for h in 0..24u8 {
        app.store
            .enqueue(
                Table::Export,
                SliceId::Hours {
                    day,
                    from_hour: h,
                    to_hour: h + 1,
                },
                None,
            )
            .await
            .unwrap();
    }
    let r = handle_export_day(&app, day, deadline()).await.unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    assert_eq!(r.slice.as_deref(), Some(day.to_string().as_str()), "{r:?}");
    assert_eq!(
        (r.records, r.rejected),
        (truth(sim, day, None).len() as u64, 2)
    );
    assert_exact(&app, sim, day, day, None).await;
    let names = assert_rejected_exact(&app, sim, day).await;
    // Each hour recorded its own rejected lines; the day's manifest lists them all.
    let mut recorded = Vec::new();
    let mut count = 0;
    for s in app.store.slices(Table::Export).await.unwrap() {
        if let SliceId::Hours { .. } = s.slice {
            assert_eq!(s.status, SliceStatus::Committed);
            let v: serde_json::Value = serde_json::from_str(s.result.as_deref().unwrap()).unwrap();
            count += v["rejected"].as_u64().unwrap_or(0);
            for f in v["rejected_files"].as_array().into_iter().flatten() {
                recorded.push(f["name"].as_str().unwrap().to_string());
            }
        }
    }
    recorded.sort();
    assert_eq!((recorded, count), (names, 2));
    assert_layout(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_a_messy_day_commits_and_a_reread_replaces_its_rows_and_its_rejected_lines() {
    let cfg = messy("America/Los_Angeles", 1, 300);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (_aws, app) = aws_app(
        &project,
        "messy-bucket",
        "messy-state",
        "mixpanel/creds",
        &[],
    )
    .await;
    let r = handle_export_day(&app, day, deadline()).await.unwrap();
    assert_eq!((r.status, r.rejected), (Status::Done, 2), "{r:?}");
    assert_exact(&app, sim, day, day, None).await;
    let before = assert_rejected_exact(&app, sim, day).await;
    let first = manifest_of(&app, day).await;

    // Late events arrive; the day is read again: rows and rejected lines are replaced.
    sim.add_late_events(day, 7);
    let r = handle_export_day(&app, day, deadline()).await.unwrap();
    assert_eq!((r.status, r.rejected), (Status::Done, 2), "{r:?}");
    assert_exact(&app, sim, day, day, None).await;
    let after = assert_rejected_exact(&app, sim, day).await;
    let second = manifest_of(&app, day).await;
    assert_ne!(first.attempt, second.attempt);
    assert!(
        after.iter().all(|n| n.contains(&second.attempt))
            && before.iter().all(|n| !after.contains(n)),
        "only the new attempt's rejected parts remain: {before:?} -> {after:?}"
    );
    assert_layout(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_a_messy_day_split_into_hours_commits_exactly() {
    let cfg = messy("UTC", 1, 300);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (_aws, app) = aws_app(
        &project,
        "messy-hours",
        "messy-hours-state",
        "mixpanel/creds",
        &[],
    )
    .await;
    for h in 0..24u8 {
        app.store
            .enqueue(
                Table::Export,
                SliceId::Hours {
                    day,
                    from_hour: h,
                    to_hour: h + 1,
                },
                None,
            )
            .await
            .unwrap();
    }
    let r = handle_export_day(&app, day, deadline()).await.unwrap();
    assert_eq!((r.status, r.rejected), (Status::Done, 2), "{r:?}");
    assert_eq!(r.slice.as_deref(), Some(day.to_string().as_str()));
    assert_exact(&app, sim, day, day, None).await;
    assert_rejected_exact(&app, sim, day).await;
    assert_layout(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_messy_body_cut_off_or_terminated_early_commits_nothing_and_is_fetched_again() {
    let cfg = messy("UTC", 1, 300);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    // A body whose last line breaks off without its newline, then one that ends with
    // `terminated early` after some messy lines: both are fetched again.
    project.fault_export(
        None,
        1,
        Fault::Status {
            status: 200,
            body:
                "{\"event\":\"a\",\"properties\":{\"time\":1}}\nnot json\n{\"event\":\"b\",\"prop"
                    .into(),
        },
    );
    let (_dir, app) = project.temp_app(&[]).await;
    let exports = || {
        sim.requests()
            .iter()
            .filter(|r| r.path == "/api/2.0/export")
            .count()
    };
    let r = handle_export_day(&app, day, deadline()).await.unwrap();
    assert_eq!((r.status, r.rejected), (Status::Done, 2), "{r:?}");
    assert_eq!(exports(), 2, "fetched again once");
    assert_exact(&app, sim, day, day, None).await;
    assert_rejected_exact(&app, sim, day).await;
    // (Two such answers in a row for the same day would split it into hours: one at a time.)
    project.fault_export(None, 1, Fault::TerminatedEarly { after_lines: 200 });
    let r = handle_export_day(&app, day, deadline()).await.unwrap();
    assert_eq!((r.status, r.rejected), (Status::Done, 2), "{r:?}");
    assert_eq!(exports(), 4, "fetched again once more");
    assert_exact(&app, sim, day, day, None).await;
    assert_rejected_exact(&app, sim, day).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_split_between_tokens_and_invalid_lines_among_events_do_not_block_the_day() {
    let cfg = sim_config("UTC", 1, 5);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    let t = jiff::civil::Date::at(day, 10, 0, 0, 0)
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .unwrap()
        .timestamp()
        .as_second();
    // A break between two tokens (whitespace once joined), then an event whose end is missing.
    let body = format!(
        "{{\"event\":\"a\",\"properties\":{{\"time\":{t},\n\"distinct_id\":\"u\"}}}}\n{{\"event\":\"b\",\"properties\":{{\"time\":\n{{\"event\":\"c\",\"properties\":{{\"time\":\"{t}\"}}}}\n"
    );
    project.fault_export(None, 1, Fault::Status { status: 200, body });
    let (_dir, app) = project.temp_app(&[]).await;
    let r = handle_export_day(&app, day, deadline()).await.unwrap();
    assert_eq!(
        (r.status, r.records, r.rejected),
        (Status::Done, 2, 1),
        "{r:?}"
    );
    let (m, rows) = read_partition(&app.sink, "", "export", day).await.unwrap();
    let time = jiff::Timestamp::from_second(t)
        .unwrap()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    assert_eq!(
        rows,
        canonical(vec![
            serde_json::json!({"event": "a", "distinct_id": "u", "time": time}),
            serde_json::json!({"event": "c", "distinct_id": null, "time": time}),
        ])
    );
    assert_eq!(m.rejected, Some(1));
}
