//! Messy lines: the malformed shapes of real export bodies, deterministic, filtered by the
//! time Mixpanel stored, and in the ground truth.

use mixpanel_sim::{Date, SimConfig, Simulator, TimeMode};
use serde_json::Value;

fn messy(tz: &str, mode: TimeMode) -> (Simulator, Date) {
    let day = Date::new(2026, 3, 8).unwrap();
    let sim = Simulator::new(SimConfig {
        seed: 3,
        timezone: tz.into(),
        time_mode: mode,
        first_day: day,
        days: 1,
        events_per_day: 120,
        messy_lines: true,
        ..SimConfig::default()
    });
    (sim, day)
}

fn body(sim: &Simulator, from: Date, to: Date, where_clause: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    sim.write_export_body(from, to, None, where_clause, &mut out)
        .unwrap();
    out
}

fn lines(body: &[u8]) -> Vec<&[u8]> {
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn a_messy_day_carries_every_shape_and_the_same_bytes_each_time() {
    let (sim, day) = messy("UTC", TimeMode::Utc);
    let b = body(&sim, day, day, None);
    assert_eq!(b, body(&sim, day, day, None), "deterministic");
    let text = String::from_utf8_lossy(&b);
    for wire in [
        "\"messy\":\"float time\"",
        "\"messy\":\"string time\"",
        "\"messy\":\"ms time\"",
        "first line\nsecond line",
        "221B Baker Street\r\n\r\nLondon",
        "bel\\u0007 esc\\u001b nul\\u0000",
        "a\tb\u{1}c\u{1f}d",
        "(truncated record)",
        "-ms\"",
    ] {
        assert_eq!(text.matches(wire).count(), 1, "{wire:?}");
    }
    let rejected = sim.export_rejected_truth(day);
    assert_eq!(
        rejected.len(),
        2,
        "a line without properties and one not JSON"
    );
    let all = lines(&b);
    for r in &rejected {
        assert_eq!(all.iter().filter(|l| **l == &r[..]).count(), 1);
        assert!(serde_json::from_slice::<Value>(r).map_or(true, |v| v.get("properties").is_none()));
    }
    // The big event is split in the middle, each half over 256 KiB.
    let big = all
        .iter()
        .position(|l| l.windows(14).any(|w| w == b"\"transcript\":\""))
        .unwrap();
    assert!(all[big].len() > 270_000 && all[big + 1].len() > 270_000);
    // The ground truth holds the usable ones as Mixpanel stored them.
    let truth = sim.export_ground_truth(day, None);
    let kinds: Vec<&str> = truth.iter().filter_map(|r| r["messy"].as_str()).collect();
    for k in [
        "float time",
        "string time",
        "ms time",
        "raw newline",
        "raw crlf",
        "escaped controls",
        "raw controls",
        "big split",
    ] {
        assert_eq!(kinds.iter().filter(|x| **x == k).count(), 1, "{k}");
    }
    let by = |k: &str, f: &str| {
        truth
            .iter()
            .find(|r| r["messy"] == k)
            .map(|r| r[f].clone())
            .unwrap()
    };
    assert_eq!(by("raw newline", "comment"), "first line\nsecond line");
    assert_eq!(by("raw crlf", "address"), "221B Baker Street\r\n\r\nLondon");
    assert_eq!(by("raw controls", "pasted"), "a\tb\u{1}c\u{1f}d");
    assert_eq!(
        by("escaped controls", "controls"),
        "bel\u{7} esc\u{1b} nul\u{0} tab\t nl\n"
    );
    assert!(
        truth.iter().any(|r| r["mp_reserved_lib_version"]
            .as_str()
            .is_some_and(|v| v.ends_with("-ms"))),
        "the re-delivery in milliseconds wins its key"
    );
    // Without the option, none of it.
    let plain = Simulator::new(SimConfig {
        messy_lines: false,
        ..sim.config().clone()
    });
    assert!(plain.export_rejected_truth(day).is_empty());
    assert!(!String::from_utf8_lossy(&body(&plain, day, day, None)).contains("messy"));
}

/// Every messy line, rejected ones included, is in exactly one hour of its day: Mixpanel
/// filters on the time it stored, whatever the wire shows.
#[test]
fn hour_filters_place_every_messy_line_in_one_hour() {
    for (tz, mode) in [
        ("America/Los_Angeles", TimeMode::Utc),
        ("America/Los_Angeles", TimeMode::ProjectLocal),
    ] {
        let (sim, day) = messy(tz, mode);
        let zone = jiff::tz::TimeZone::get(tz).unwrap();
        let at = |h: i8| {
            let civil = day.at(h, 0, 0, 0);
            match mode {
                TimeMode::Utc => civil
                    .to_zoned_datetime(zone.clone())
                    .unwrap()
                    .timestamp()
                    .as_second(),
                TimeMode::ProjectLocal => civil
                    .to_zoned_datetime(jiff::tz::TimeZone::UTC)
                    .unwrap()
                    .timestamp()
                    .as_second(),
            }
        };
        let (from, to) = match mode {
            TimeMode::Utc => (day, day.tomorrow().unwrap()),
            TimeMode::ProjectLocal => (day, day),
        };
        let mut seen = Vec::new();
        for h in 0..24 {
            let end = if h == 23 {
                match mode {
                    TimeMode::Utc => day
                        .tomorrow()
                        .unwrap()
                        .at(0, 0, 0, 0)
                        .to_zoned_datetime(zone.clone())
                        .unwrap()
                        .timestamp()
                        .as_second(),
                    TimeMode::ProjectLocal => at(23) + 3600,
                }
            } else {
                at(h + 1)
            };
            let w = format!(
                r#"properties["$time"] >= datetime({}) and properties["$time"] < datetime({end})"#,
                at(h)
            );
            let b = body(&sim, from, to, Some(&w));
            for l in lines(&b) {
                if sim.export_rejected_truth(day).iter().any(|r| &r[..] == l) {
                    seen.push(l.to_vec());
                }
            }
        }
        seen.sort();
        assert_eq!(seen, sim.export_rejected_truth(day), "{tz} {mode:?}");
    }
}
