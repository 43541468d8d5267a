//! Property tests: the parsers that face the outside world never panic, whatever they get.

use std::collections::HashMap;

use mixpanel_replicator::config::{ExportTimeMode, RunMode, Settings, VARIABLES};
use mixpanel_replicator::handler::parse_event;
use mixpanel_replicator::secrets::Credentials;
use mixpanel_replicator::state::SliceId;
use mixpanel_replicator::tables::export::{Transformer, window};
use proptest::prelude::*;
use serde_json::Value;

/// Arbitrary JSON values, nested a few levels.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("export"),
            Just("engage"),
            Just("2026-11-01"),
            Just("table"),
            Just("date"),
            Just("from"),
            Just("to")
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::hash_map(
                prop_oneof![
                    Just("table".to_string()),
                    Just("date".to_string()),
                    Just("from".to_string()),
                    Just("to".to_string()),
                    ".{0,6}"
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn the_event_parser_never_panics(v in json()) {
        let _ = parse_event(&v);
    }

    #[test]
    fn the_settings_parser_never_panics(values in prop::collection::vec(prop::option::of(".{0,20}"), VARIABLES.len())) {
        let map: HashMap<&str, String> = VARIABLES
            .iter()
            .zip(values)
            .filter_map(|(k, v)| v.map(|v| (*k, v)))
            .collect();
        for mode in [RunMode::Local, RunMode::Lambda] {
            let _ = Settings::from_lookup(mode, |k| map.get(k).cloned());
        }
    }

    #[test]
    fn the_secret_parser_never_panics(s in ".{0,64}") {
        let _ = Credentials::from_secret_string(&s);
    }

    #[test]
    fn the_export_line_parser_never_panics_on_bytes(line in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut t = transformer();
        let mut out = Vec::new();
        let _ = t.transform(&line, &mut out);
    }

    #[test]
    fn the_export_line_parser_never_panics_on_json(props in json(), event in json()) {
        let mut t = transformer();
        let mut out = Vec::new();
        let line = serde_json::json!({"event": event, "properties": props}).to_string();
        let _ = t.transform(line.as_bytes(), &mut out);
        // With a valid time too, so that the transform's later steps run.
        let mut props = props;
        if let Value::Object(m) = &mut props {
            m.insert("time".into(), Value::from(1_790_000_000));
        }
        let line = serde_json::json!({"event": event, "properties": props}).to_string();
        out.clear();
        if t.transform(line.as_bytes(), &mut out).is_ok() && !out.is_empty() {
            // Whatever is written is one valid JSON object per line.
            let text = String::from_utf8(out).unwrap();
            prop_assert!(serde_json::from_str::<serde_json::Map<String, Value>>(text.trim_end()).is_ok(), "{}", text);
        }
    }
}

fn transformer() -> Transformer {
    let tz = jiff::tz::TimeZone::get("America/Los_Angeles").unwrap();
    let day: jiff::civil::Date = "2026-09-21".parse().unwrap();
    let w = window(SliceId::Day(day), &tz, ExportTimeMode::Utc, day, None).unwrap();
    Transformer::new(tz, ExportTimeMode::Utc, &w, None)
}
