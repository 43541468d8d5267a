//! A simulated Mixpanel project and a replicator app pointed at it, locally or on moto.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use jiff::civil::Date;
use mixpanel_replicator::app::App;
use mixpanel_replicator::config::{RunMode, Settings};
use mixpanel_replicator::handler::{self, Response};
use mixpanel_replicator::run::commit::Manifest;
use mixpanel_replicator::sink::ObjectSink;
use mixpanel_replicator::sink::local::LocalSink;
use mixpanel_sim::{Fault, FaultRule, RunningSim, SimConfig, Simulator};

use super::moto::Moto;

/// The replicator binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mixpanel-replicator");

/// The project-local "today" of a timezone.
pub fn today_in(tz: &str) -> Date {
    jiff::Timestamp::now()
        .to_zoned_datetime(jiff::tz::TimeZone::get(tz).unwrap())
        .date()
}

/// `n` days before `d`.
pub fn minus(d: Date, n: i64) -> Date {
    d.checked_sub(jiff::Span::new().days(n)).unwrap()
}

/// Simulator config: `days` days of data ending yesterday (project-local).
pub fn sim_config(tz: &str, days: u32, events_per_day: u32) -> SimConfig {
    SimConfig {
        seed: 7,
        timezone: tz.into(),
        first_day: minus(today_in(tz), i64::from(days)),
        days,
        events_per_day,
        ..SimConfig::default()
    }
}

/// A running simulator plus the settings that point at it.
pub struct Project {
    /// The simulator server.
    pub sim: RunningSim,
    /// Settings variables (without output/state, which each target adds).
    pub vars: HashMap<String, String>,
}

impl Project {
    /// Starts a simulator with `config` and the matching settings.
    pub async fn start(config: SimConfig) -> Project {
        let sim = Simulator::new(config.clone()).serve(0).await.unwrap();
        let mut vars = HashMap::new();
        vars.insert("MIXPANEL_API_SECRET".into(), config.api_secret.clone());
        vars.insert("MIXPANEL_START_DATE".into(), config.first_day.to_string());
        vars.insert("MIXPANEL_PROJECT_TIMEZONE".into(), config.timezone.clone());
        vars.insert("MIXPANEL_API_URL".into(), sim.url());
        vars.insert("MIXPANEL_DATA_URL".into(), sim.url());
        // The simulator enforces no rate limit unless a test configures one; the request
        // budget is tested on its own (tests/rate_budget.rs) with matching limits.
        vars.insert(
            "MIXPANEL_EXPORT_REQUESTS_PER_WINDOW".into(),
            "100000".into(),
        );
        vars.insert("MIXPANEL_QUERY_REQUESTS_PER_WINDOW".into(), "100000".into());
        vars.insert("MIXPANEL_EXPORT_REQUESTS_PER_SECOND".into(), "1000".into());
        if config.time_mode == mixpanel_sim::TimeMode::ProjectLocal {
            vars.insert("MIXPANEL_EXPORT_TIME_MODE".into(), "project_local".into());
        }
        Project { sim, vars }
    }

    /// The simulator.
    pub fn simulator(&self) -> &Simulator {
        self.sim.sim()
    }

    /// Settings from `vars` plus `extra`.
    pub fn settings(
        &self,
        extra: &[(&str, &str)],
    ) -> Result<Settings, mixpanel_replicator::error::Error> {
        let mut vars = self.vars.clone();
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        Settings::from_lookup(RunMode::Local, |k| vars.get(k).cloned())
    }

    /// An app writing into a local folder with a local state file.
    pub async fn local_app(&self, dir: &Path, extra: &[(&str, &str)]) -> App {
        local_app_in(self.settings(extra).unwrap(), dir).await
    }

    /// A local app in a new temporary folder; keep the folder for as long as the app is used.
    pub async fn temp_app(&self, extra: &[(&str, &str)]) -> (tempfile::TempDir, App) {
        let dir = tempfile::tempdir().unwrap();
        let app = self.local_app(dir.path(), extra).await;
        (dir, app)
    }

    /// Makes the next `times` export requests (only those of `from_date`, if given) meet `fault`.
    pub fn fault_export(&self, from_date: Option<Date>, times: u32, fault: Fault) {
        self.simulator().push_fault(FaultRule {
            path: "/api/2.0/export".into(),
            from_date,
            times,
            covering: None,
            wider_than: None,
            holding: None,
            param: None,
            fault,
        });
    }

    /// The credentials secret of the project as stored in Secrets Manager: `{"api_secret": …}`.
    pub fn secret_json(&self) -> String {
        serde_json::json!({"api_secret": self.simulator().config().api_secret}).to_string()
    }

    /// The binary with only `PATH` and the project's variables (less `drop_var`) in its
    /// environment.
    pub fn command(&self, drop_var: Option<&str>) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(
                self.vars
                    .iter()
                    .filter(|(k, _)| Some(k.as_str()) != drop_var),
            );
        cmd
    }
}

/// An app with `settings`, writing into `dir` with its state file there.
pub async fn local_app_in(mut settings: Settings, dir: &Path) -> App {
    settings.output_dir = Some(dir.to_path_buf());
    settings.state_file = Some(dir.join(".state.json"));
    App::build(settings, None).await.unwrap()
}

/// A local folder as an object sink.
pub fn local_sink(dir: &Path) -> Arc<dyn ObjectSink> {
    Arc::new(LocalSink::new(dir))
}

/// Runs `cmd` with `input` written to its stdin (closed at once without), capturing its output.
pub fn output_with_stdin(cmd: &mut Command, input: Option<&str>) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(input) = input {
        stdin.write_all(input.as_bytes()).unwrap();
    }
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// Asserts that a command succeeded, showing its stderr if not.
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The event that replicates the export table's `day`.
pub fn export_day(day: Date) -> serde_json::Value {
    serde_json::json!({"table": "export", "date": day.to_string()})
}

/// Handles the event that replicates the export table's `day`.
pub async fn handle_export_day(
    app: &App,
    day: Date,
    deadline: tokio::time::Instant,
) -> mixpanel_replicator::error::Result<Response> {
    handler::handle(app, export_day(day), deadline).await
}

/// AWS resources on moto: a bucket, a state table and the credentials secret.
pub struct Aws {
    /// The server.
    pub moto: Moto,
    /// Its SDK config.
    pub sdk: aws_config::SdkConfig,
}

impl Aws {
    /// Starts moto.
    pub async fn start() -> Aws {
        let moto = tokio::task::spawn_blocking(Moto::start).await.unwrap();
        let sdk = moto.sdk_config().await;
        Aws { moto, sdk }
    }

    /// Creates `bucket`, `table` and a secret `secret_id` holding `secret_value`.
    pub async fn provision(&self, bucket: &str, table: &str, secret_id: &str, secret_value: &str) {
        super::aws::create_bucket(&aws_sdk_s3::Client::new(&self.sdk), bucket).await;
        super::aws::create_state_table(&aws_sdk_dynamodb::Client::new(&self.sdk), table).await;
        super::aws::put_secret(
            &aws_sdk_secretsmanager::Client::new(&self.sdk),
            secret_id,
            secret_value,
        )
        .await;
    }

    /// Starts moto with `bucket`, `table` and a secret `secret_id` holding the project's secret.
    pub async fn start_for(project: &Project, bucket: &str, table: &str, secret_id: &str) -> Aws {
        let aws = Aws::start().await;
        aws.provision(bucket, table, secret_id, &project.secret_json())
            .await;
        aws
    }

    /// An app on S3 + DynamoDB + Secrets Manager (credentials come only from the secret).
    pub async fn app(
        &self,
        project: &Project,
        bucket: &str,
        table: &str,
        secret_id: &str,
        extra: &[(&str, &str)],
    ) -> App {
        let mut vars = project.vars.clone();
        vars.remove("MIXPANEL_API_SECRET");
        vars.insert("MIXPANEL_SECRET_ID".into(), secret_id.into());
        vars.insert("OUTPUT_BUCKET".into(), bucket.into());
        vars.insert("STATE_TABLE".into(), table.into());
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        let s = Settings::from_lookup(RunMode::Lambda, |k| vars.get(k).cloned()).unwrap();
        App::build(s, Some(self.sdk.clone())).await.unwrap()
    }
}

impl Aws {
    /// Asserts that every part under `prefix/` in `bucket` has the extension `.{extension}`
    /// and the `Content-Type` `content_type`, and no `Content-Encoding` (a part is a compressed
    /// file, not a body for a client to decompress); returns how many parts there are.
    pub async fn assert_part_headers(
        &self,
        bucket: &str,
        prefix: &str,
        extension: &str,
        content_type: &str,
    ) -> usize {
        let s3 = aws_sdk_s3::Client::new(&self.sdk);
        let mut keys = Vec::new();
        let mut pages = s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(format!("{prefix}/"))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            for o in page.unwrap().contents() {
                keys.push(o.key().unwrap().to_string());
            }
        }
        let parts: Vec<&String> = keys
            .iter()
            .filter(|k| k.rsplit('/').next().is_some_and(|n| n.starts_with("part-")))
            .collect();
        for key in &parts {
            assert!(key.ends_with(&format!(".{extension}")), "{key}");
            let head = s3
                .head_object()
                .bucket(bucket)
                .key(*key)
                .send()
                .await
                .unwrap();
            assert_eq!(head.content_type(), Some(content_type), "{key}");
            assert_eq!(head.content_encoding(), None, "{key}");
        }
        parts.len()
    }
}

/// Moto provisioned for `project` (see [`Aws::start_for`]) and an app on it.
pub async fn aws_app(
    project: &Project,
    bucket: &str,
    table: &str,
    secret_id: &str,
    extra: &[(&str, &str)],
) -> (Aws, App) {
    let aws = Aws::start_for(project, bucket, table, secret_id).await;
    let app = aws.app(project, bucket, table, secret_id, extra).await;
    (aws, app)
}

/// Reads a committed date partition: its manifest and its rows (canonical JSON strings, sorted).
pub async fn read_partition(
    sink: &Arc<dyn ObjectSink>,
    prefix: &str,
    table: &str,
    day: Date,
) -> Option<(Manifest, Vec<String>)> {
    let folder = if prefix.is_empty() {
        format!("{table}/date={day}")
    } else {
        format!("{prefix}/{table}/date={day}")
    };
    read_manifest_rows(sink, &folder).await
}

/// The Athena symlink manifest of a date partition lists exactly its committed parts.
pub async fn assert_symlink(sink: &Arc<dyn ObjectSink>, folder: &str, manifest: &Manifest) {
    let (parent, last) = folder.rsplit_once('/').unwrap_or(("", folder));
    if !last.starts_with("date=") {
        return;
    }
    let key = if parent.is_empty() {
        format!("_symlink/{last}/manifest")
    } else {
        format!("{parent}/_symlink/{last}/manifest")
    };
    let body = sink
        .get(&key)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{key} is missing"));
    let listed: Vec<String> = String::from_utf8(body.to_vec())
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let expected: Vec<String> = manifest
        .files
        .iter()
        .map(|f| sink.url(&format!("{folder}/{}", f.name)))
        .collect();
    assert_eq!(listed, expected, "{key}");
}

/// The simulator's ground truth of a day, as sorted canonical JSON strings.
pub fn truth(sim: &Simulator, day: Date, events: Option<&[String]>) -> Vec<String> {
    let mut t: Vec<String> = sim
        .export_ground_truth(day, events)
        .iter()
        .map(|v| v.to_string())
        .collect();
    t.sort();
    t
}

/// `values` with only the properties `keep` accepts, as sorted canonical JSON strings.
pub fn canonical_keeping(
    values: Vec<serde_json::Value>,
    keep: impl Fn(&str) -> bool,
) -> Vec<String> {
    canonical(
        values
            .into_iter()
            .map(|mut v| {
                v.as_object_mut().unwrap().retain(|k, _| keep(k));
                v
            })
            .collect(),
    )
}

/// Every day from `from` to `to`, inclusive.
pub fn days(from: Date, to: Date) -> Vec<Date> {
    let mut out = Vec::new();
    let mut d = from;
    while d <= to {
        out.push(d);
        d = d.tomorrow().unwrap();
    }
    out
}

/// Asserts that every day from `from` to `to` is committed and equals the ground truth.
pub async fn assert_exact(
    app: &App,
    sim: &Simulator,
    from: Date,
    to: Date,
    events: Option<&[String]>,
) {
    for day in days(from, to) {
        let (_, rows) = read_partition(&app.sink, &app.prefix, "export", day)
            .await
            .unwrap_or_else(|| panic!("export {day} was not committed"));
        let expected = truth(sim, day, events);
        if rows != expected {
            let missing: Vec<_> = expected
                .iter()
                .filter(|r| !rows.contains(r))
                .take(3)
                .collect();
            let extra: Vec<_> = rows
                .iter()
                .filter(|r| !expected.contains(r))
                .take(3)
                .collect();
            panic!(
                "export {day}: {} rows, ground truth {}\nmissing e.g. {missing:#?}\nextra e.g. {extra:#?}",
                rows.len(),
                expected.len()
            );
        }
    }
}

/// The bytes of a part named `name`, decoded as its extension says (`.jsonl.gz` one gzip member,
/// `.jsonl.zst` one zstd frame, `.jsonl` as is); `Err` when they are not what the name says.
pub fn decode_part(name: &str, data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    if name.ends_with(".jsonl.gz") {
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .map_err(|e| format!("{name} is not gzip: {e}"))?;
    } else if name.ends_with(".jsonl.zst") {
        // One frame exactly: what a reader that stops after the first frame sees is everything.
        match zstd::zstd_safe::find_frame_compressed_size(data) {
            Ok(n) if n == data.len() => {}
            other => return Err(format!("{name} is not one zstd frame: {other:?}")),
        }
        zstd::stream::read::Decoder::new(data)
            .and_then(|mut d| d.read_to_end(&mut out))
            .map_err(|e| format!("{name} is not zstd: {e}"))?;
    } else if name.ends_with(".jsonl") {
        out.extend_from_slice(data);
    } else {
        return Err(format!("{name} is not a part"));
    }
    Ok(out)
}

/// The part file name extensions the replicator writes.
pub const PART_EXTENSIONS: [&str; 3] = [".jsonl.gz", ".jsonl.zst", ".jsonl"];

/// `name` without its part extension, if it has one.
pub fn strip_part_extension(name: &str) -> Option<&str> {
    PART_EXTENSIONS.iter().find_map(|e| name.strip_suffix(e))
}

/// Reads rows of the objects listed by a manifest, as sorted canonical JSON strings.
pub async fn read_manifest_rows(
    sink: &Arc<dyn ObjectSink>,
    folder: &str,
) -> Option<(Manifest, Vec<String>)> {
    let body = sink
        .get(&format!("{folder}/_manifest.json"))
        .await
        .unwrap()?;
    let manifest: Manifest = serde_json::from_slice(&body).unwrap();
    let mut rows = Vec::new();
    for f in &manifest.files {
        let data = sink
            .get(&format!("{folder}/{}", f.name))
            .await
            .unwrap()
            .expect("a listed part is missing");
        assert_eq!(data.len() as u64, f.bytes, "manifest bytes of {}", f.name);
        let text = String::from_utf8(decode_part(&f.name, &data).unwrap()).unwrap();
        assert_eq!(
            text.lines().count() as u64,
            f.records,
            "manifest records of {}",
            f.name
        );
        for line in text.lines() {
            rows.push(
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap()
                    .to_string(),
            );
        }
    }
    let listed: Vec<String> = sink
        .list(&format!("{folder}/"))
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    let mut expected: Vec<String> = manifest
        .files
        .iter()
        .map(|f| format!("{folder}/{}", f.name))
        .collect();
    expected.push(format!("{folder}/_manifest.json"));
    expected.sort();
    assert_eq!(listed, expected, "objects of {folder}");
    assert_symlink(sink, folder, &manifest).await;
    rows.sort();
    Some((manifest, rows))
}

/// The newest complete snapshot of a full table through `_latest.json`: its rows, sorted.
pub async fn read_latest_snapshot(app: &App, table: &str) -> Option<(String, Vec<String>)> {
    let base = if app.prefix.is_empty() {
        table.to_string()
    } else {
        format!("{}/{table}", app.prefix)
    };
    let latest = app
        .sink
        .get(&format!("{base}/_latest.json"))
        .await
        .unwrap()?;
    let latest: serde_json::Value = serde_json::from_slice(&latest).unwrap();
    let snapshot = latest["snapshot"].as_str().unwrap().to_string();
    assert_eq!(
        latest["manifest"],
        format!("{base}/{snapshot}/_manifest.json")
    );
    let (_, rows) = read_manifest_rows(&app.sink, &format!("{base}/{snapshot}"))
        .await
        .expect("_latest.json points to a committed snapshot");
    Some((snapshot, rows))
}

/// Values as sorted canonical JSON strings.
pub fn canonical(values: Vec<serde_json::Value>) -> Vec<String> {
    let mut v: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    v.sort();
    v
}

/// Asserts that every object key follows the documented layout, so no key was built from a data
/// value (a `distinct_id` or an event name).
pub async fn assert_layout(app: &App) {
    let tables = [
        "annotations",
        "cohort_members",
        "cohorts",
        "engage",
        "export",
        "funnels",
        "revenue",
    ];
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    for o in app.sink.list("").await.unwrap() {
        let key = if app.prefix.is_empty() {
            o.key.as_str()
        } else {
            o.key
                .strip_prefix(&format!("{}/", app.prefix))
                .unwrap_or("")
        };
        let parts: Vec<&str> = key.split('/').collect();
        let ok = match parts.as_slice() {
            [t, f] => tables.contains(t) && (*f == "_latest.json" || *f == "_schema.json"),
            // Source lines that could not be used, kept raw per day.
            [t, "_rejected", folder, name] if tables.contains(t) => {
                folder
                    .strip_prefix("date=")
                    .is_some_and(|d| d.parse::<Date>().is_ok())
                    && name
                        .strip_prefix("part-")
                        .and_then(strip_part_extension)
                        .and_then(|r| r.split_once('-'))
                        .is_some_and(|(a, n)| {
                            a.len() == 12
                                && a.bytes().all(|b| b.is_ascii_hexdigit())
                                && digits(n, 5)
                        })
            }
            [t, "_symlink", p, "manifest"] => {
                tables.contains(t)
                    && (*p == "latest"
                        || p.strip_prefix("date=")
                            .is_some_and(|d| d.parse::<Date>().is_ok()))
            }
            [t, folder, name] if tables.contains(t) => {
                if let Some(d) = folder.strip_prefix("date=") {
                    d.parse::<Date>().is_ok()
                        && (*name == "_manifest.json"
                            || name
                                .strip_prefix("part-")
                                .and_then(strip_part_extension)
                                .and_then(|r| r.split_once('-'))
                                .is_some_and(|(a, n)| {
                                    a.len() == 12
                                        && a.bytes().all(|b| b.is_ascii_hexdigit())
                                        && digits(n, 5)
                                }))
                } else if let Some(s) = folder.strip_prefix("snapshot=") {
                    s.len() == 16
                        && s.ends_with('Z')
                        && (*name == "_manifest.json"
                            || name
                                .strip_prefix("part-")
                                .and_then(strip_part_extension)
                                .is_some_and(|n| digits(n, 5)))
                } else {
                    false
                }
            }
            _ => false,
        };
        assert!(ok, "an object outside the documented layout: {}", o.key);
    }
}

/// Every file under `dir` (its path), folders walked; empty when `dir` does not exist.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
            out.push(format!("{}/", p.display()));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}
