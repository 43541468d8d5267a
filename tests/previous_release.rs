//! State and output written by the previous release stay readable: this version's `sync`
//! continues a folder written by the release before it, with its state file or its DynamoDB
//! state items (`tests/fixtures/release-b83a123`, see its README), against a simulator of the
//! same project, without asking Mixpanel again for a day that release committed once the day
//! was over, without rewriting a byte of what it wrote but the day it committed while that day
//! was today (read again for its late events), and ends with every table exactly as the
//! simulator holds it.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use aws_sdk_dynamodb::types::AttributeValue;
use jiff::civil::{Date, date};
use mixpanel_replicator::app::App;
use mixpanel_replicator::state::{SliceId, SliceStatus};
use mixpanel_replicator::tables::Table;
use mixpanel_sim::SimConfig;
use serde_json::Value;
use support::harness::*;

/// The fixtures: the folder `mixpanel-data` as that release left it with its state file
/// inside, and another it wrote with its state in DynamoDB (the table's items beside it).
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/release-b83a123"
);
/// Stands for the folder's absolute path in the files that hold addresses (the symlink
/// manifests), which the fixture cannot know.
const FOLDER: &str = "@FOLDER@";
/// The days that release committed (it ran on 2026-11-19, UTC).
const COMMITTED: (Date, Date) = (date(2026, 11, 16), date(2026, 11, 19));
/// The day that release committed while it was today: read again for its late events (a day
/// is final only once committed after its attribution window had passed, here 0 days: the
/// runs below set `MIXPANEL_ATTRIBUTION_WINDOW_DAYS=0`, so that the days before it, committed
/// after they ended, are final, and are the ones never asked for again).
const UNSETTLED: Date = date(2026, 11, 19);
const WINDOW: (&str, &str) = ("MIXPANEL_ATTRIBUTION_WINDOW_DAYS", "0");

/// The project the fixture replicated (the fixture's README gives the simulator's flags).
fn project_config() -> SimConfig {
    SimConfig {
        seed: 7,
        timezone: "UTC".into(),
        first_day: date(2026, 11, 16),
        days: 6,
        events_per_day: 25,
        profiles: 12,
        cohorts: 2,
        funnels: 2,
        annotations: 3,
        ..SimConfig::default()
    }
}

/// Copies the fixture into `dir`, the folder's placeholder replaced by `dir`'s path; returns
/// every file copied (relative path → bytes).
fn copy_fixture(from: &Path, dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(from: &Path, rel: &str, to: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let target = to.join(&name);
            if e.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(&target).unwrap();
                walk(&e.path(), &rel, &target, out);
            } else {
                let mut bytes = std::fs::read(e.path()).unwrap();
                if let Ok(text) = std::str::from_utf8(&bytes)
                    && text.contains(FOLDER)
                {
                    let root = to_root(to, &rel);
                    bytes = text
                        .replace(FOLDER, &root.display().to_string())
                        .into_bytes();
                }
                std::fs::write(&target, &bytes).unwrap();
                out.insert(rel, bytes);
            }
        }
    }
    /// The folder `rel` (a path under it) was copied into, from `rel`'s own folder `to`.
    fn to_root(to: &Path, rel: &str) -> PathBuf {
        let mut root = to.to_path_buf();
        for _ in 1..rel.split('/').count() {
            root.pop();
        }
        root
    }
    let mut out = BTreeMap::new();
    walk(from, "", dir, &mut out);
    out
}

/// Every file under `dir`, relative path → bytes.
fn read_all(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    files_under(dir)
        .into_iter()
        .filter(|p| !p.ends_with('/'))
        .map(|p| {
            let rel = Path::new(&p)
                .strip_prefix(dir)
                .unwrap()
                .display()
                .to_string();
            (rel, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// The files a later run may rewrite: the state, the schemas, and the pointers to the newest
/// snapshot. Every other file of a commit is written once.
fn may_change(rel: &str) -> bool {
    rel.contains(&format!("/date={UNSETTLED}/"))
        || rel == ".state.json"
        || rel.ends_with("/_schema.json")
        || rel.ends_with("/_latest.json")
        || rel.ends_with("/_symlink/latest/manifest")
}

/// The days `from_date..=to_date` a request asks for, for the requests that read days
/// (export, funnels, revenue).
fn requested_days(r: &mixpanel_sim::RequestRecord) -> Option<(Date, Date)> {
    let reads_days = ["/export", "/funnels", "/engage/revenue"]
        .iter()
        .any(|p| r.path.trim_end_matches('/').ends_with(p));
    if !reads_days {
        return None;
    }
    let param = |name: &str| -> Date {
        r.query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{} without {name}: {}", r.path, r.query))
            .parse()
            .unwrap()
    };
    Some((param("from_date"), param("to_date")))
}

/// A JSON value's type name, as `_schema.json` names types.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Column → types (`integer|string`) of `rows`, as `_schema.json` should list them: a null
/// counts only in a column of nothing else, an integer beside other numbers is a number.
fn columns_of(rows: &[String]) -> BTreeMap<String, String> {
    let mut types: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
    for row in rows {
        let v: Value = serde_json::from_str(row).unwrap();
        for (k, v) in v.as_object().unwrap() {
            types.entry(k.clone()).or_default().insert(type_name(v));
        }
    }
    types
        .into_iter()
        .map(|(k, mut t)| {
            if t.len() > 1 {
                t.remove("null");
            }
            if t.contains("number") {
                t.remove("integer");
            }
            (k, t.into_iter().collect::<Vec<_>>().join("|"))
        })
        .collect()
}

/// `_schema.json` of `table` in `dir`: column → (type, source).
fn schema_json(dir: &Path, table: &str) -> BTreeMap<String, (String, Option<String>)> {
    let body = std::fs::read(dir.join(table).join("_schema.json")).unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                (
                    // One type's name, or the names of several as a list.
                    match &c["type"] {
                        Value::Array(names) => names
                            .iter()
                            .map(|n| n.as_str().unwrap())
                            .collect::<Vec<_>>()
                            .join("|"),
                        name => name.as_str().unwrap().to_string(),
                    },
                    c.get("source").map(|s| s.as_str().unwrap().to_string()),
                ),
            )
        })
        .collect()
}

/// Where the state of a fixture is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// The folder's `.state.json`.
    File,
    /// A DynamoDB table (on moto) loaded with the items that release wrote.
    Dynamo,
}

/// A DynamoDB item attribute from its JSON form (`{"S": "..."}`, `{"N": "3"}`, `{"M": {...}}`).
fn attribute(v: &Value) -> AttributeValue {
    let (kind, x) = v.as_object().unwrap().iter().next().unwrap();
    match kind.as_str() {
        "S" => AttributeValue::S(x.as_str().unwrap().into()),
        "N" => AttributeValue::N(x.as_str().unwrap().into()),
        "BOOL" => AttributeValue::Bool(x.as_bool().unwrap()),
        "NULL" => AttributeValue::Null(true),
        "M" => AttributeValue::M(
            x.as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), attribute(v)))
                .collect(),
        ),
        "L" => AttributeValue::L(x.as_array().unwrap().iter().map(attribute).collect()),
        other => panic!("an attribute of type {other}: {v}"),
    }
}

/// The DynamoDB table the fixture's items go into.
const STATE_TABLE: &str = "replica-state";

/// Each committed slice that release recorded, `(table, slice)` → (commit time, attempt).
type Commits = BTreeMap<(String, String), (Option<u64>, Option<String>)>;

/// The slices of the state file, read as the JSON it is.
fn file_commits(state: &[u8]) -> Commits {
    let state: Value = serde_json::from_slice(state).unwrap();
    let mut out = Commits::new();
    for (table, slices) in state["slices"].as_object().unwrap() {
        for (slice, rec) in slices.as_object().unwrap() {
            assert_eq!(rec["status"], "committed", "{table} {slice}");
            out.insert(
                (table.clone(), slice.clone()),
                (
                    rec["committed_at_ms"].as_u64(),
                    rec["lease_owner"].as_str().map(String::from),
                ),
            );
        }
    }
    out
}

/// The slice items among the DynamoDB items, read as the JSON they are.
fn item_commits(items: &[Value]) -> Commits {
    let mut out = Commits::new();
    for item in items {
        let Some(table) = item["pk"]["S"].as_str().unwrap().strip_prefix("slice#") else {
            continue;
        };
        let slice = item["sk"]["S"].as_str().unwrap();
        assert_eq!(item["status"]["S"], "committed", "{table} {slice}");
        out.insert(
            (table.to_string(), slice.to_string()),
            (
                item["committed_at_ms"]["N"]
                    .as_str()
                    .map(|n| n.parse().unwrap()),
                item["lease_owner"]["S"].as_str().map(String::from),
            ),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_version_continues_the_previous_releases_folder_and_state_file() {
    continues(State::File).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_version_continues_the_previous_releases_folder_and_dynamodb_state() {
    continues(State::Dynamo).await;
}

/// Runs this version's `sync` on a copy of the fixture with state `state`, and checks it.
async fn continues(state: State) {
    let project = Project::start(project_config()).await;
    let sim = project.simulator();
    let today = today_in("UTC");
    assert!(
        today > COMMITTED.1.checked_add(jiff::Span::new().days(6)).unwrap(),
        "the fixture's days lie outside the attribution window from today on"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mixpanel-data");
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = Path::new(FIXTURE);

    // The fixture in place, and what that release recorded of its commits.
    let (before, old_commits, aws) = match state {
        State::File => {
            let before = copy_fixture(&fixture.join("mixpanel-data"), &dir);
            let commits = file_commits(&before[".state.json"]);
            (before, commits, None)
        }
        State::Dynamo => {
            let fixture = fixture.join("dynamodb");
            let before = copy_fixture(&fixture.join("mixpanel-data"), &dir);
            assert!(!before.contains_key(".state.json"));
            let aws = Aws::start().await;
            let client = aws_sdk_dynamodb::Client::new(&aws.sdk);
            support::aws::create_state_table(&client, STATE_TABLE).await;
            let items: Vec<Value> = std::fs::read_to_string(fixture.join("state-items.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            for item in &items {
                let attributes = item
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), attribute(v)))
                    .collect();
                client
                    .put_item()
                    .table_name(STATE_TABLE)
                    .set_item(Some(attributes))
                    .send()
                    .await
                    .unwrap();
            }
            (before, item_commits(&items), Some(aws))
        }
    };
    for table in ["export", "funnels", "revenue"] {
        assert!(
            old_commits.keys().any(|(t, _)| t == table),
            "the fixture has commits of {table}"
        );
    }
    // This version's `sync`, as a user runs it on the folder (and the state table).
    let sync = || {
        let mut cmd = project.command(None);
        cmd.env(WINDOW.0, WINDOW.1)
            .args(["sync", "--out"])
            .arg(&dir);
        if let Some(aws) = &aws {
            cmd.envs(aws.moto.env()).env("STATE_TABLE", STATE_TABLE);
        }
        cmd
    };
    let mut cmd = sync();
    let out = tokio::task::spawn_blocking(move || output_with_stdin(&mut cmd, None))
        .await
        .unwrap();
    assert_success(&out);
    if state == State::Dynamo {
        assert!(
            !dir.join(".state.json").exists(),
            "the state stayed in DynamoDB"
        );
    }

    // No day that release committed once it was over was asked for again; the day it committed
    // while it was today was, and the days after them.
    let mut asked: BTreeSet<Date> = BTreeSet::new();
    for r in sim.requests() {
        if let Some((from, to)) = requested_days(&r) {
            assert!(
                to < COMMITTED.0 || from >= UNSETTLED,
                "{} asked again for days the previous release committed: {}",
                r.path,
                r.query
            );
            asked.extend(days(from, to));
        }
    }
    assert!(asked.contains(&UNSETTLED), "{UNSETTLED} was not read again");
    let new_days = days(COMMITTED.1.tomorrow().unwrap(), today);
    for d in &new_days {
        assert!(asked.contains(d), "{d} was not asked for");
    }

    // Not a byte the previous release wrote was rewritten, but for the files meant to change.
    let after = read_all(&dir);
    for (rel, bytes) in &before {
        if may_change(rel) {
            continue;
        }
        let now = after
            .get(rel)
            .unwrap_or_else(|| panic!("{rel}, written by the previous release, is gone"));
        assert!(
            now == bytes,
            "{rel}, written by the previous release, was rewritten"
        );
    }

    // Every table is exactly the simulator's, old days and new, read through this version's
    // readers: the manifests, parts and symlink manifests of both releases.
    let app = match &aws {
        None => project.local_app(&dir, &[WINDOW]).await,
        Some(aws) => {
            let mut settings = project
                .settings(&[("STATE_TABLE", STATE_TABLE), WINDOW])
                .unwrap();
            settings.output_dir = Some(dir.clone());
            settings.state_file = None;
            App::build(settings, Some(aws.sdk.clone())).await.unwrap()
        }
    };
    assert_layout(&app).await;
    assert_exact(&app, sim, COMMITTED.0, today, None).await;
    let mut rows_of: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for day in days(COMMITTED.0, today) {
        rows_of
            .entry("export")
            .or_default()
            .extend(truth(sim, day, None));
        for (table, truth) in [
            ("funnels", sim.funnels_ground_truth(day)),
            ("revenue", sim.revenue_ground_truth(day)),
        ] {
            let (_, rows) = read_manifest_rows(&app.sink, &format!("{table}/date={day}"))
                .await
                .unwrap_or_else(|| panic!("{table} {day} was not committed"));
            let truth = canonical(truth);
            assert_eq!(rows, truth, "{table} {day}");
            rows_of.entry(table).or_default().extend(truth);
        }
    }

    // The full tables: a new snapshot beside the previous release's (which stays readable and
    // whole), `_latest.json` pointing to the new one.
    for (table, truth) in [
        ("engage", sim.engage_ground_truth()),
        ("cohorts", sim.cohorts_ground_truth()),
        ("cohort_members", sim.cohort_members_ground_truth()),
        ("annotations", sim.annotations_ground_truth()),
    ] {
        let truth = canonical(truth);
        let old_snapshot = before
            .keys()
            .find_map(|k| {
                k.strip_prefix(&format!("{table}/"))
                    .and_then(|k| k.strip_suffix("/_manifest.json"))
                    .filter(|s| s.starts_with("snapshot="))
            })
            .unwrap_or_else(|| panic!("the fixture has a snapshot of {table}"))
            .to_string();
        let (_, old_rows) = read_manifest_rows(&app.sink, &format!("{table}/{old_snapshot}"))
            .await
            .unwrap();
        // Annotations are read up to the day of the snapshot: that release's had none later.
        let old_truth: Vec<String> = if table == "annotations" {
            let last = COMMITTED.1.to_string();
            truth
                .iter()
                .filter(|r| {
                    let v: Value = serde_json::from_str(r).unwrap();
                    v["date"].as_str().unwrap()[..10] <= *last
                })
                .cloned()
                .collect()
        } else {
            truth.clone()
        };
        assert_eq!(old_rows, old_truth, "{table} {old_snapshot}");
        let (latest, rows) = read_latest_snapshot(&app, table)
            .await
            .unwrap_or_else(|| panic!("{table} has no snapshot"));
        assert_ne!(latest, old_snapshot, "{table}: a new snapshot");
        assert_eq!(rows, truth, "{table} {latest}");
        rows_of.insert(table, truth);
    }

    // `_schema.json` of every table: exactly the columns and types of its rows, each
    // property column naming its source.
    for (table, rows) in &rows_of {
        let schema = schema_json(&dir, table);
        let listed: BTreeMap<String, String> = schema
            .iter()
            .map(|(c, (t, _))| (c.clone(), t.clone()))
            .collect();
        let mut expected = columns_of(rows);
        // The strings a table declares: the event's instant (RFC 3339), the day of a row.
        match *table {
            "export" => expected.insert("time".into(), "timestamp".into()),
            "funnels" | "revenue" => expected.insert("date".into(), "date".into()),
            _ => None,
        };
        assert_eq!(listed, expected, "{table}/_schema.json");
        if *table == "export" {
            for (column, (_, source)) in &schema {
                let expected = match column.as_str() {
                    "event" | "distinct_id" | "time" => None,
                    c => Some(match c.strip_prefix("mp_reserved_") {
                        Some(rest) => format!("${rest}"),
                        None => c.to_string(),
                    }),
                };
                assert_eq!(source, &expected, "export/_schema.json {column}");
            }
        }
    }

    // This version reads the previous release's state: its commits are kept as they were
    // (same time, same attempt), the new days are committed beside them, nothing pending.
    for table in Table::ALL {
        let slices = app.store.slices(table).await.unwrap();
        let by_id: BTreeMap<String, _> = slices.iter().map(|r| (r.slice.to_string(), r)).collect();
        for ((t, slice), (at, owner)) in &old_commits {
            if t != table.as_str() {
                continue;
            }
            let now = by_id
                .get(slice)
                .unwrap_or_else(|| panic!("{table} {slice} is no longer in the state"));
            assert_eq!(now.status, SliceStatus::Committed, "{table} {slice}");
            if *slice == SliceId::Day(UNSETTLED).to_string() {
                assert!(now.committed_at_ms > *at, "{table} {slice} read again");
            } else if table.is_date_sliced() {
                assert_eq!(
                    now.committed_at_ms, *at,
                    "{table} {slice} was committed again"
                );
                assert_eq!(now.lease_owner.as_ref(), owner.as_ref(), "{table} {slice}");
            } else {
                assert!(now.committed_at_ms > *at, "{table}: a new snapshot");
            }
        }
        for r in &slices {
            assert_eq!(r.status, SliceStatus::Committed, "{table} {}", r.slice);
        }
        if table == Table::Export {
            for d in &new_days {
                assert!(
                    by_id.contains_key(&SliceId::Day(*d).to_string()),
                    "export {d} is not in the state"
                );
            }
        }
    }

    // And a second run finds nothing to do: not one request for a day.
    let seen = sim.requests().len();
    let mut cmd = sync();
    let out = tokio::task::spawn_blocking(move || output_with_stdin(&mut cmd, None))
        .await
        .unwrap();
    assert_success(&out);
    let again: Vec<_> = sim.requests()[seen..]
        .iter()
        .filter(|r| requested_days(r).is_some())
        .map(|r| format!("{} {}", r.path, r.query))
        .collect();
    assert!(again.is_empty(), "{again:#?}");
}
