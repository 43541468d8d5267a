//! Today, split into hours: Mixpanel is asked only for the hours that have begun, and never
//! for a `to_date` after its today, whatever the project's offset from UTC (UTC−8, UTC+5:30,
//! UTC+13:45). The simulator over real HTTP (which answers 400 to a `to_date` after its today)
//! and the local folder.

mod support;

use std::time::Duration;

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use mixpanel_replicator::cli::sync;
use mixpanel_replicator::state::{SliceId, SliceStatus};
use mixpanel_replicator::tables::Table;
use mixpanel_sim::{Fault, FaultRule, RequestRecord, SimConfig};
use support::harness::*;

/// The query string with its percent-encoding and `+` decoded.
fn decoded(query: &str) -> String {
    let bytes = query.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn param(r: &RequestRecord, name: &str) -> Option<String> {
    decoded(&r.query)
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_string))
}

/// The instant range of a request's `where` on `$time` (seconds), if it has one.
fn time_range(r: &RequestRecord) -> Option<(i64, i64)> {
    let w = param(r, "where")?;
    let mut bounds = w.split("datetime(").skip(1).map(|rest| {
        rest.split(')')
            .next()
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or_else(|| panic!("a bound of {w:?}"))
    });
    Some((bounds.next()?, bounds.next()?))
}

/// The instants at which today's local hours begin.
fn hour_starts(tz: &TimeZone, today: Date) -> Vec<i64> {
    (0..24)
        .map(|h| {
            today
                .at(h, 0, 0, 0)
                .to_zoned_datetime(tz.clone())
                .unwrap()
                .timestamp()
                .as_second()
        })
        .collect()
}

fn begun(starts: &[i64], at: i64) -> usize {
    starts.iter().filter(|s| **s <= at).count()
}

async fn today_split_into_hours(tz_name: &str) {
    let tz = TimeZone::get(tz_name).unwrap();
    let today = today_in(tz_name);
    // Events over the whole of today, the hours still to come included: a replicator that
    // asked for those hours would find them.
    let cfg = SimConfig {
        seed: 11,
        timezone: tz_name.into(),
        first_day: today,
        days: 1,
        events_per_day: 240,
        ..SimConfig::default()
    };
    let project = Project::start(cfg).await;
    // Mixpanel cuts off every request for more than an hour of today: today is split into
    // hours.
    // (By the instant today began: just after local midnight in UTC+13:45, today's requests
    // ask for yesterday's UTC date only.)
    let began = hour_starts(&tz, today)[0];
    project.simulator().push_fault(FaultRule::export_instant(
        began,
        Some(Duration::from_secs(3600)),
        Fault::TerminatedEarly { after_lines: 5 },
    ));
    let (_dir, app) = project
        .temp_app(&[("SLICE_RETRY_BACKOFF_SECONDS", "0")])
        .await;
    let before = Timestamp::now().as_second();
    let report = sync(&app, &[Table::Export]).await.unwrap();
    let after = Timestamp::now().as_second();
    assert_eq!(
        (report.failed, report.parked.len()),
        (0, 0),
        "{tz_name}: {report:?}"
    );

    let requests: Vec<RequestRecord> = project
        .simulator()
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/2.0/export")
        .collect();
    let utc_today = Timestamp::from_second(after)
        .unwrap()
        .to_zoned_datetime(TimeZone::UTC)
        .date();
    for r in &requests {
        let to: Date = param(r, "to_date").unwrap().parse().unwrap();
        assert!(to <= utc_today, "{tz_name}: a to_date after today: {r:?}");
        assert!(r.status == 200 || r.faulted, "{tz_name}: {r:?}");
    }

    // One request per hour that had begun when it was asked, in order, and none for an hour
    // still to come.
    let starts = hour_starts(&tz, today);
    let hours: Vec<(i64, i64)> = requests
        .iter()
        .filter(|r| !r.faulted)
        .map(|r| {
            let (from, to) = time_range(r).unwrap_or_else(|| panic!("{tz_name}: {r:?}"));
            assert!(
                from <= (r.at_ms / 1000) as i64,
                "{tz_name}: an hour asked before it began: {r:?}"
            );
            (from, to)
        })
        .collect();
    let asked: Vec<i64> = hours.iter().map(|h| h.0).collect();
    assert!(
        (begun(&starts, before)..=begun(&starts, after)).contains(&asked.len()),
        "{tz_name}: {} hour requests, {}..={} hours begun",
        asked.len(),
        begun(&starts, before),
        begun(&starts, after)
    );
    assert_eq!(asked, starts[..asked.len()], "{tz_name}");

    // Today is committed from its 24 hour slices, with the events of the hours asked.
    let slices = app.store.slices(Table::Export).await.unwrap();
    let day = slices
        .iter()
        .find(|r| r.slice == SliceId::Day(today))
        .unwrap();
    assert_eq!(day.status, SliceStatus::Committed, "{tz_name}");
    let hour_slices = slices
        .iter()
        .filter(|r| matches!(r.slice, SliceId::Hours { .. }))
        .count();
    assert_eq!(hour_slices, 24, "{tz_name}");
    let (_, rows) = read_partition(&app.sink, &app.prefix, "export", today)
        .await
        .unwrap_or_else(|| panic!("{tz_name}: today was not committed"));
    // Mixpanel is asked for nothing past its own (UTC) today: an hour that ends after UTC
    // midnight (a half- or quarter-hour zone's last hour of the UTC day) holds only the events
    // before it, until a later run asks for it again.
    let utc_end = utc_today
        .tomorrow()
        .unwrap()
        .at(0, 0, 0, 0)
        .to_zoned_datetime(TimeZone::UTC)
        .unwrap()
        .timestamp()
        .as_second();
    let cutoff = hours.last().map_or(starts[0], |h| h.1).min(utc_end);
    let expected: Vec<String> = truth(project.simulator(), today, None)
        .into_iter()
        .filter(|row| {
            let v: serde_json::Value = serde_json::from_str(row).unwrap();
            let t: Timestamp = v["time"].as_str().unwrap().parse().unwrap();
            t.as_second() < cutoff
        })
        .collect();
    assert_eq!(rows, expected, "{tz_name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn today_in_los_angeles_asks_only_for_hours_begun_and_never_after_today() {
    today_split_into_hours("America/Los_Angeles").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn today_in_kolkata_asks_only_for_hours_begun_and_never_after_today() {
    today_split_into_hours("Asia/Kolkata").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn today_in_chatham_asks_only_for_hours_begun_and_never_after_today() {
    today_split_into_hours("Pacific/Chatham").await;
}
