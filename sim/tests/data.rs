//! Generated data and ground truth, through the library API.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use jiff::tz::TimeZone;
use mixpanel_sim::{Date, SimConfig, Simulator, TimeMode};
use serde_json::Value;

fn cfg(seed: u64, tz: &str, mode: TimeMode, first: Date, days: u32) -> SimConfig {
    SimConfig {
        seed,
        timezone: tz.into(),
        time_mode: mode,
        first_day: first,
        days,
        events_per_day: 200,
        ..SimConfig::default()
    }
}

fn d(y: i16, m: i8, day: i8) -> Date {
    Date::new(y, m, day).unwrap()
}

#[test]
fn same_seed_same_bytes() {
    let c = cfg(7, "America/Los_Angeles", TimeMode::Utc, d(2024, 6, 1), 3);
    let a = body(
        &Simulator::new(c.clone()),
        d(2024, 5, 31),
        d(2024, 6, 4),
        None,
        None,
    );
    let b = body(
        &Simulator::new(c.clone()),
        d(2024, 5, 31),
        d(2024, 6, 4),
        None,
        None,
    );
    assert!(a.len() > 100_000);
    assert_eq!(a, b);
    let other = body(
        &Simulator::new(SimConfig { seed: 8, ..c }),
        d(2024, 5, 31),
        d(2024, 6, 4),
        None,
        None,
    );
    assert_ne!(a, other);
}

#[test]
fn a_day_covers_the_awkward_cases() {
    let day = d(2024, 6, 2);
    let sim = Simulator::new(cfg(3, "UTC", TimeMode::Utc, day, 1));
    let raw = body(&sim, day, day, None, None);
    let text = std::str::from_utf8(&raw).unwrap();
    let ls = lines(&raw);
    assert!(ls.len() > 200, "duplicates add lines: {}", ls.len());

    let names: HashSet<&str> = ls.iter().map(|l| l["event"].as_str().unwrap()).collect();
    for n in [
        "Signed Up",
        "Page Viewed",
        "Purchase",
        "App Open",
        "Ünïcode Évent 🎉",
        "$mp_web_page_view",
    ] {
        assert!(names.contains(n), "{n} missing");
    }
    let props: Vec<&serde_json::Map<String, Value>> = ls
        .iter()
        .map(|l| l["properties"].as_object().unwrap())
        .collect();
    let has = |k: &str| props.iter().any(|p| p.contains_key(k));
    for k in [
        "$city",
        "$browser",
        "$os",
        "$current_url",
        "$mp_api_endpoint",
        "mp_lib",
        "price$usd",
        "nested",
        "big_int",
        "u64_max",
        "i64_min",
        "tiny",
        "neg_half",
        "pi",
        "empty_string",
        "empty_object",
        "empty_array",
        "null_value",
        "flag_true",
        "control_chars",
        "escaped_unicode",
        "multiline",
    ] {
        assert!(has(k), "no event has {k}");
    }
    assert_eq!(
        props
            .iter()
            .find_map(|p| p.get("u64_max"))
            .unwrap()
            .as_u64(),
        Some(u64::MAX)
    );
    assert_eq!(
        props
            .iter()
            .find_map(|p| p.get("i64_min"))
            .unwrap()
            .as_i64(),
        Some(i64::MIN)
    );
    assert!(text.contains(r"\u00e9") && text.contains(r"\ud83c\udf89") && text.contains(r#"\""#));
    assert!(text.contains("🎉") && text.contains(r"\n") && text.contains(r"\t"));

    assert!(
        props.iter().any(|p| !p.contains_key("distinct_id")),
        "an event without distinct_id"
    );
    let dids: Vec<&str> = props
        .iter()
        .filter_map(|p| p.get("distinct_id")?.as_str())
        .collect();
    assert!(dids.iter().any(|d| d.contains('/') && d.contains(' ')));
    assert!(dids.iter().any(|d| !d.is_ascii()));
    for p in &props {
        let iid = p["$insert_id"].as_str().unwrap();
        assert!(
            iid.len() <= 36 && iid.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'),
            "{iid}"
        );
        assert!(p["time"].is_i64() && p["mp_processing_time_ms"].is_i64());
    }
    // Not sorted by time.
    let times: Vec<i64> = props.iter().map(|p| p["time"].as_i64().unwrap()).collect();
    assert!(times.windows(2).any(|w| w[0] > w[1]));

    // Duplicates: same key, later processing time, one property changed; sometimes later first.
    let mut by_key: HashMap<String, Vec<&serde_json::Map<String, Value>>> = HashMap::new();
    for l in &ls {
        let p = l["properties"].as_object().unwrap();
        let key = format!(
            "{}|{:?}|{}|{}",
            l["event"],
            p.get("distinct_id"),
            p["time"],
            p["$insert_id"]
        );
        by_key.entry(key).or_default().push(p);
    }
    let dups: Vec<_> = by_key.values().filter(|v| v.len() > 1).collect();
    assert!(dups.len() >= 3, "some duplicates: {}", dups.len());
    let mut later_first = 0;
    for v in &dups {
        assert_eq!(v.len(), 2);
        let (a, b) = (v[0], v[1]);
        let diff: Vec<&String> = a.keys().filter(|k| a[*k] != b[*k]).collect();
        assert_eq!(
            diff.len(),
            2,
            "mp_processing_time_ms and one property differ: {diff:?}"
        );
        if a["mp_processing_time_ms"].as_i64() > b["mp_processing_time_ms"].as_i64() {
            later_first += 1;
        }
    }
    assert!(later_first >= 1, "sometimes the later delivery comes first");
}

/// Checks the ground truth of `day` against an independent replica of the raw body.
fn check_truth(c: &SimConfig, day: Date) -> Vec<Value> {
    let sim = Simulator::new(c.clone());
    let (from, to) = match c.time_mode {
        TimeMode::Utc => (add_days(day, -1), add_days(day, 1)),
        TimeMode::ProjectLocal => (day, day),
    };
    let raw = lines(&body(&sim, from, to, None, None));
    let truth = sim.export_ground_truth(day, None);
    assert_eq!(
        canon(&truth),
        canon(&reference_rows(c, &raw, day)),
        "ground truth of {day}"
    );
    assert!(truth.len() >= c.events_per_day as usize - 1);

    let tz = TimeZone::get(&c.timezone).unwrap();
    let start = day
        .to_zoned_datetime(tz.clone())
        .unwrap()
        .start_of_day()
        .unwrap()
        .timestamp();
    let end = add_days(day, 1)
        .to_zoned_datetime(tz)
        .unwrap()
        .start_of_day()
        .unwrap()
        .timestamp();
    let fmt = |t: jiff::Timestamp| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let times: HashSet<String> = truth
        .iter()
        .map(|r| r["time"].as_str().unwrap().to_string())
        .collect();
    assert!(
        times.contains(&fmt(start)),
        "an event at 00:00:00 local on {day}"
    );
    assert!(
        times.contains(&fmt(end - jiff::SignedDuration::from_secs(1))),
        "an event at 23:59:59 local on {day}"
    );
    for r in &truth {
        let o = r.as_object().unwrap();
        assert!(
            o.keys().all(|k| !k.starts_with('$')),
            "{k:?}",
            k = o.keys().collect::<Vec<_>>()
        );
        assert!(o.contains_key("mp_reserved_insert_id") && o.contains_key("mp_processing_time_ms"));
        assert!(o.contains_key("distinct_id"));
        let t: jiff::Timestamp = o["time"].as_str().unwrap().parse().unwrap();
        assert!(t >= start && t < end);
    }
    assert!(truth.iter().any(|r| r["distinct_id"].is_null()));
    assert!(truth.iter().any(|r| r.get("price$usd").is_some()));
    assert!(
        truth
            .iter()
            .any(|r| r.get("mp_reserved_custom_dollar").is_some())
    );
    truth
}

#[test]
fn ground_truth_utc_mode() {
    let c = cfg(11, "America/Los_Angeles", TimeMode::Utc, d(2024, 3, 9), 4);
    for day in [
        d(2024, 3, 9),
        d(2024, 3, 10),
        d(2024, 3, 11),
        d(2024, 3, 12),
    ] {
        check_truth(&c, day);
    }
    // East of UTC too.
    let c = cfg(12, "Asia/Kolkata", TimeMode::Utc, d(2024, 1, 1), 2);
    check_truth(&c, d(2024, 1, 2));
}

#[test]
fn ground_truth_project_local_mode_avoids_dst_hours() {
    // Los Angeles skips 02:00-02:59 on 2024-03-10 and repeats 01:00-01:59 on 2024-11-03.
    for (first, gap_or_fold, bad_hour) in [
        (d(2024, 3, 9), d(2024, 3, 10), 2),
        (d(2024, 11, 2), d(2024, 11, 3), 1),
    ] {
        let c = cfg(13, "America/Los_Angeles", TimeMode::ProjectLocal, first, 3);
        for day in [first, add_days(first, 1), add_days(first, 2)] {
            check_truth(&c, day);
        }
        // The exported wall clock never falls in the transition hour.
        let sim = Simulator::new(c);
        for l in lines(&body(&sim, gap_or_fold, gap_or_fold, None, None)) {
            let t = l["properties"]["time"].as_i64().unwrap();
            let hour = t.rem_euclid(86_400) / 3600;
            assert_ne!(hour, bad_hour, "event in a DST hour: {l}");
        }
    }
}

#[test]
fn duplicates_collapse_to_the_latest() {
    let day = d(2024, 6, 2);
    let c = cfg(5, "Europe/Berlin", TimeMode::Utc, day, 1);
    let sim = Simulator::new(c.clone());
    let raw = lines(&body(&sim, add_days(day, -1), add_days(day, 1), None, None));
    let truth = sim.export_ground_truth(day, None);
    assert!(raw.len() > truth.len());
    let iids: HashMap<(String, String), i64> = truth
        .iter()
        .map(|r| {
            let key = (
                r["mp_reserved_insert_id"].to_string(),
                r["time"].to_string(),
            );
            (key, r["mp_processing_time_ms"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(
        iids.len(),
        truth.len(),
        "one row per key (insert ids are unique within a second)"
    );
    for l in &raw {
        let p = &l["properties"];
        let t = instant(&c, p["time"].as_i64().unwrap())
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        if let Some(best) = iids.get(&(p["$insert_id"].to_string(), Value::String(t).to_string())) {
            assert!(*best >= p["mp_processing_time_ms"].as_i64().unwrap());
        }
    }
    // Every retried delivery carries the changed property, and the truth keeps it.
    assert!(truth.iter().any(|r| {
        r["mp_reserved_lib_version"]
            .as_str()
            .unwrap()
            .ends_with("-retry")
    }));
}

#[test]
fn ground_truth_event_filter() {
    let day = d(2024, 6, 2);
    let sim = Simulator::new(cfg(5, "UTC", TimeMode::Utc, day, 1));
    let names = vec!["Purchase".to_string(), "Ünïcode Évent 🎉".to_string()];
    let all = sim.export_ground_truth(day, None);
    let some = sim.export_ground_truth(day, Some(&names));
    let expected: Vec<Value> = all
        .into_iter()
        .filter(|r| names.iter().any(|n| r["event"] == n.as_str()))
        .collect();
    assert!(!some.is_empty());
    assert_eq!(canon(&some), canon(&expected));
    assert!(
        sim.export_ground_truth(add_days(day, 1), None).is_empty(),
        "no data outside the range"
    );
}

#[test]
fn late_events_change_truth_and_body() {
    let day = d(2024, 6, 2);
    let c = cfg(21, "America/New_York", TimeMode::Utc, day, 1);
    let sim = Simulator::new(c.clone());
    let before = sim.export_ground_truth(day, None);
    let body_before = body(&sim, day, add_days(day, 1), None, None);
    sim.add_late_events(day, 3);
    let after = sim.export_ground_truth(day, None);
    let body_after = body(&sim, day, add_days(day, 1), None, None);
    assert_eq!(after.len(), before.len() + 3);
    assert!(body_after.len() > body_before.len());
    assert!(
        body_after.starts_with(&body_before),
        "late deliveries come after the rest"
    );
    let changed: Vec<&Value> = after
        .iter()
        .filter(|r| {
            r["mp_reserved_lib_version"]
                .as_str()
                .unwrap()
                .ends_with("-late1")
        })
        .collect();
    assert_eq!(changed.len(), 1, "the re-delivered event wins");
    let max_before = before
        .iter()
        .map(|r| r["mp_processing_time_ms"].as_i64().unwrap())
        .max()
        .unwrap();
    assert!(changed[0]["mp_processing_time_ms"].as_i64().unwrap() > max_before);
    let raw = lines(&body(&sim, add_days(day, -1), add_days(day, 1), None, None));
    assert_eq!(canon(&after), canon(&reference_rows(&c, &raw, day)));

    // A second batch again wins over everything before it.
    sim.add_late_events(day, 2);
    let again = sim.export_ground_truth(day, None);
    assert_eq!(again.len(), after.len() + 2);
    assert!(again.iter().any(|r| {
        r["mp_reserved_lib_version"]
            .as_str()
            .unwrap()
            .ends_with("-late2")
    }));
}

#[test]
fn where_and_event_filters_in_body() {
    let day = d(2024, 6, 2);
    let sim = Simulator::new(cfg(9, "UTC", TimeMode::Utc, day, 1));
    let all = lines(&body(&sim, day, day, None, None));
    let start = day
        .to_zoned_datetime(TimeZone::UTC)
        .unwrap()
        .timestamp()
        .as_second()
        + 3 * 3600;
    let w = format!(
        r#"properties["$time"] >= datetime({start}) and properties["$time"] < datetime({})"#,
        start + 3600
    );
    let hour = lines(&body(&sim, day, day, None, Some(&w)));
    let expected: Vec<&Value> = all
        .iter()
        .filter(|l| (start..start + 3600).contains(&l["properties"]["time"].as_i64().unwrap()))
        .collect();
    assert!(!hour.is_empty());
    assert_eq!(hour.iter().collect::<Vec<_>>(), expected);

    let names = vec!["App Open".to_string()];
    let only = lines(&body(&sim, day, day, Some(&names), None));
    assert!(!only.is_empty() && only.iter().all(|l| l["event"] == "App Open"));
    assert_eq!(
        only.len(),
        all.iter().filter(|l| l["event"] == "App Open").count()
    );
    assert!(body(&sim, day, day, Some(&["Nope".to_string()]), None).is_empty());

    let mut sink = Vec::new();
    let err = sim.write_export_body(
        day,
        day,
        None,
        Some("properties[\"$city\"] == 1"),
        &mut sink,
    );
    assert_eq!(err.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
}

#[test]
fn big_days_stream_in_chunks() {
    // A writer that fails after some bytes proves the body is written incrementally.
    struct Limited(usize);
    impl std::io::Write for Limited {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.0 < b.len() {
                return Err(std::io::Error::other("full"));
            }
            self.0 -= b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let day = d(2024, 6, 2);
    let sim = Simulator::new(SimConfig {
        events_per_day: 3_000_000,
        ..cfg(1, "UTC", TimeMode::Utc, day, 1)
    });
    let err = sim
        .write_export_body(day, day, None, None, &mut Limited(1 << 20))
        .unwrap_err();
    assert_eq!(err.to_string(), "full");
}
