//! Column names SQL engines can read: one column per name when case is folded (DuckDB, Spark
//! and Athena's JSON SerDe fold it), none taking the record's own `event`, `distinct_id` or
//! `time`, and the same names on every day and every run, kept in the state store and in
//! `_schema.json`. The simulator's events carry the collisions of real projects
//! (`column_collisions`); the local folder, and S3 with DynamoDB on moto.

mod support;

use std::collections::BTreeMap;
use std::fmt;

use mixpanel_replicator::app::App;
use mixpanel_replicator::cli::sync;
use mixpanel_replicator::handler;
use mixpanel_replicator::tables::Table;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::json;
use support::harness::*;

/// The keys of a JSON object line, in order, duplicates kept.
fn keys_of(line: &str) -> Vec<String> {
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
            let mut keys = Vec::new();
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                keys.push(k);
            }
            Ok(keys)
        }
    }
    serde_json::Deserializer::from_str(line)
        .deserialize_map(Keys)
        .unwrap()
}

/// The keys of a line, none twice when case is folded.
fn unique_keys(line: &str) -> Vec<String> {
    let keys = keys_of(line);
    let mut folded: Vec<String> = keys.iter().map(|k| k.to_lowercase()).collect();
    folded.sort();
    let n = folded.len();
    folded.dedup();
    assert_eq!(folded.len(), n, "a key twice when case is folded: {keys:?}");
    keys
}

/// Every line of the committed parts of `folder`, as written.
async fn raw_lines(app: &App, folder: &str) -> Vec<String> {
    let (manifest, _) = read_manifest_rows(&app.sink, folder).await.unwrap();
    let mut lines = Vec::new();
    for f in &manifest.files {
        let stored = app
            .sink
            .get(&format!("{folder}/{}", f.name))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8(decode_part(&f.name, &stored).unwrap()).unwrap();
        lines.extend(text.lines().map(String::from));
    }
    lines
}

/// `_schema.json` of `table`: column name → (types, `source`: the property it holds, or
/// `None` for the record's own keys).
async fn schema_json(
    app: &App,
    table: &str,
) -> BTreeMap<String, (serde_json::Value, Option<String>)> {
    let key = if app.prefix.is_empty() {
        format!("{table}/_schema.json")
    } else {
        format!("{}/{table}/_schema.json", app.prefix)
    };
    let body = app.sink.get(&key).await.unwrap().expect("_schema.json");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                (
                    c["type"].clone(),
                    c.get("source").map(|s| s.as_str().unwrap().to_string()),
                ),
            )
        })
        .collect()
}

/// Every committed day equals the ground truth (which names the colliding properties as the
/// contract says), no line holds a key twice once case is folded, and `_schema.json` names
/// each renamed column's property.
async fn assert_unique_columns(app: &App, project: &Project) {
    let sim = project.simulator();
    let (first, today) = (sim.config().first_day, today_in(&sim.config().timezone));
    assert_exact(app, sim, first, today, None).await;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for day in days(first, today) {
        let folder = if app.prefix.is_empty() {
            format!("export/date={day}")
        } else {
            format!("{}/export/date={day}", app.prefix)
        };
        for line in raw_lines(app, &folder).await {
            let keys = keys_of(&line);
            let mut folded: Vec<String> = keys.iter().map(|k| k.to_lowercase()).collect();
            folded.sort();
            let n = folded.len();
            folded.dedup();
            assert_eq!(
                folded.len(),
                n,
                "{day}: a key twice when case is folded: {keys:?}"
            );
            for k in keys {
                *seen.entry(k).or_default() += 1;
            }
        }
    }
    // The collisions were there to be named.
    for column in [
        "event__2",
        "Country",
        "country__2",
        "mp_reserved_city",
        "mp_reserved_city__2",
        "date__2",
        "_blank",
    ] {
        assert!(
            seen.get(column).is_some_and(|n| *n > 0),
            "{column}: {seen:?}"
        );
    }
    assert!(!seen.contains_key("country"), "{seen:?}");
    // Readers add the partition `date` from the folder name: no row holds one.
    assert!(!seen.contains_key("date"), "{seen:?}");
    let long: Vec<&String> = seen.keys().filter(|k| k.starts_with("long_key_")).collect();
    assert_eq!(long.len(), 1, "{long:?}");
    assert_eq!(long[0].chars().count(), 200, "{long:?}");

    let schema = schema_json(app, "export").await;
    // The record's own keys hold no property.
    for own in ["event", "distinct_id", "time"] {
        assert_eq!(schema[own].1, None, "{own}: {schema:?}");
    }
    for (column, property, types) in [
        ("event__2", "event", json!("integer")),
        ("Country", "Country", json!("string")),
        ("country__2", "country", json!("string")),
        ("mp_reserved_city", "$city", json!("string")),
        ("mp_reserved_city__2", "mp_reserved_city", json!("string")),
        ("date__2", "date", json!("string")),
        ("_blank", "", json!("integer")),
    ] {
        let (ty, name) = schema
            .get(column)
            .unwrap_or_else(|| panic!("{column} not in _schema.json: {schema:?}"));
        assert_eq!((name.as_deref(), ty), (Some(property), &types), "{column}");
    }
    assert_eq!(
        schema[long[0].as_str()].1,
        Some(format!("long_key_{}", "k".repeat(991)))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colliding_property_names_get_unique_columns_that_stay_across_days_and_runs() {
    let mut cfg = sim_config("America/Los_Angeles", 6, 80);
    cfg.column_collisions = true;
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let (_dir, app) = project.temp_app(&[]).await;
    let report = sync(&app, &[Table::Export]).await.unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    assert_unique_columns(&app, &project).await;

    // The first day again, alone: its `Country` keeps the plain name, the later days'
    // `country` keeps `country__2`, whatever order a body brings them in.
    let r = handler::handle(
        &app,
        json!({"table": "export", "date": first.to_string()}),
        tokio::time::Instant::now() + std::time::Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(r.status, handler::Status::Done, "{r:?}");
    assert_unique_columns(&app, &project).await;
    let stored = app.store.schema(Table::Export).await.unwrap().unwrap();
    assert_eq!(stored.source_of("country__2"), "country");
    assert_eq!(stored.source_of("Country"), "Country");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_and_dynamodb_the_column_names_are_kept_in_the_state_table() {
    let mut cfg = sim_config("UTC", 3, 80);
    cfg.column_collisions = true;
    let project = Project::start(cfg).await;
    let (_aws, app) = aws_app(&project, "columns", "columns-state", "columns/creds", &[]).await;
    let report = sync(&app, &[Table::Export]).await.unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    assert_unique_columns(&app, &project).await;
    let stored = app.store.schema(Table::Export).await.unwrap().unwrap();
    assert_eq!(
        (
            stored.source_of("country__2"),
            stored.source_of("event__2"),
            stored.source_of("mp_reserved_city__2"),
            stored.source_of("_blank"),
        ),
        (
            "country".to_string(),
            "event".to_string(),
            "mp_reserved_city".to_string(),
            String::new()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_property_named_distinct_id_gets_its_own_column() {
    let mut cfg = sim_config("UTC", 1, 10);
    cfg.column_collisions = true;
    cfg.profiles = 40;
    let project = Project::start(cfg).await;
    let (_dir, app) = project.temp_app(&[]).await;
    let report = sync(&app, &[Table::Engage]).await.unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    let (snapshot, rows) = read_latest_snapshot(&app, "engage").await.unwrap();
    assert_eq!(rows, canonical(project.simulator().engage_ground_truth()));
    let mut renamed = 0;
    for line in raw_lines(&app, &format!("engage/{snapshot}")).await {
        if unique_keys(&line).iter().any(|k| k == "distinct_id__2") {
            renamed += 1;
        }
    }
    assert_eq!(renamed, 10, "every fourth of 40 profiles");
    let schema = schema_json(&app, "engage").await;
    assert_eq!(
        schema["distinct_id__2"],
        (json!("string"), Some("distinct_id".to_string()))
    );
    assert_eq!(schema["distinct_id"].1, None);
}
