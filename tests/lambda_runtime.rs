//! The real binary as a Lambda function: `cargo lambda watch --only-lambda-apis` emulates the
//! Lambda Runtime API, `mixpanel-replicator` built as the function is (without the default
//! features: no simulator, no `demo`) serves it (as on Lambda, with `AWS_LAMBDA_RUNTIME_API`
//! set), and `cargo lambda invoke --data-file` sends it every file in
//! `events/`, against the simulator and S3 + DynamoDB + Secrets Manager on moto. An SQS event
//! file (the fan-out queue's delivery) holds invocation events in its records' bodies.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jiff::civil::Date;
use mixpanel_replicator::handler::sqs::{is_sqs_event, parse_sqs_event};
use mixpanel_replicator::handler::{Invocation, check_event, parse_event};
use mixpanel_replicator::tables::Table;
use serde_json::{Value, json};
use support::harness::*;
use support::moto::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_mixpanel-replicator");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BUCKET: &str = "replica-bucket";
const STATE_TABLE: &str = "replicator-state";
const SECRET_ID: &str = "mixpanel/credentials";
/// The function name `cargo lambda watch` serves when none is given (`cargo lambda invoke`'s default).
const FUNCTION_NAME: &str = "_";
/// How long one invocation may take before the test gives up on it.
const INVOKE_TIMEOUT: Duration = Duration::from_secs(180);

/// The pinned `cargo-lambda` binary (installed by `scripts/setup-tools`).
fn cargo_lambda() -> PathBuf {
    let path = match std::env::var_os("CARGO_LAMBDA") {
        Some(p) => PathBuf::from(p),
        None => Path::new(ROOT).join(".tools/venv/bin/cargo-lambda"),
    };
    assert!(
        path.is_file(),
        "cargo-lambda not found at {}: run scripts/test (it installs the pinned cargo-lambda into \
         .tools/venv and sets CARGO_LAMBDA)",
        path.display()
    );
    path
}

/// Runs cargo with `args` for the profile and target folder this test was built with.
fn cargo(args: &[&str]) {
    // BIN is <target dir>[/<triple>]/<profile dir>/mixpanel-replicator.
    let profile_dir = Path::new(BIN).parent().unwrap();
    let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => "dev",
        other => other,
    };
    let above = profile_dir.parent().unwrap();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(args).args(["--profile", profile]);
    if above.join("CACHEDIR.TAG").exists() {
        cmd.arg("--target-dir").arg(above);
    } else {
        cmd.arg("--target-dir").arg(above.parent().unwrap());
        cmd.arg("--target").arg(above.file_name().unwrap());
    }
    let out = cmd.current_dir(ROOT).output().unwrap();
    assert!(
        out.status.success(),
        "cargo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The function's binary as Lambda runs it: built without the default features, as
/// `cargo lambda build` (and `sam build`) builds it (`package.metadata.lambda` in Cargo.toml),
/// and copied to `dir`. Cargo links every build of the binary to the same path, whatever its
/// features, so the test's own (with them, which the other test files run) is linked back.
fn lambda_function_binary(dir: &Path) -> PathBuf {
    let build = ["test", "--no-run", "--test", "lambda_runtime"];
    cargo(&[&build[..], &["--no-default-features"]].concat());
    let function = dir.join("bootstrap");
    std::fs::copy(BIN, &function).unwrap();
    cargo(&build);
    // Without the simulator: no `demo`, refused with one line.
    let out = Command::new(&function).arg("demo").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with(
            "error: this build has no `demo`: it was built without the bundled simulator"
        ),
        "{out:?}"
    );
    let help = Command::new(BIN).arg("--help").output().unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("demo"),
        "the test's own binary is linked back: {help:?}"
    );
    function
}

/// The files of `events/`, sorted by name, with their JSON.
fn event_files() -> Vec<(String, Value)> {
    let dir = Path::new(ROOT).join("events");
    let mut files: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                name.ends_with(".json"),
                "events/{name}: only .json event files belong here"
            );
            let text = std::fs::read_to_string(&p).unwrap();
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("events/{name} is not JSON: {e}"));
            (name, v)
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}

/// The invocation events of an SQS event file's records.
fn bodies(v: &Value) -> Vec<Invocation> {
    parse_sqs_event(v)
        .unwrap()
        .iter()
        .map(|r| parse_event(&serde_json::from_str(&r.body).unwrap()).unwrap())
        .collect()
}

#[test]
fn every_event_file_is_a_valid_event_and_every_use_has_one() {
    let files = event_files();
    for (name, v) in &files {
        if let Err(e) = check_event(v) {
            panic!("events/{name} is not a valid event: {e}");
        }
        if is_sqs_event(v) {
            for r in parse_sqs_event(v).unwrap() {
                let body: Value = serde_json::from_str(&r.body)
                    .unwrap_or_else(|e| panic!("events/{name}: a body is not JSON: {e}"));
                if let Err(e) = parse_event(&body) {
                    panic!("events/{name}: a body is not a valid event: {e}");
                }
            }
        }
    }
    let sqs = &files
        .iter()
        .find(|(n, _)| n == "export-sqs.json")
        .expect("events/export-sqs.json is missing")
        .1;
    assert!(
        matches!(bodies(sqs).as_slice(), [Invocation::Day(Table::Export, _)]),
        "events/export-sqs.json: the fan-out queue's delivery of one export day"
    );
    let get = |name: &str| -> Invocation {
        let v = &files
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("events/{name} is missing"))
            .1;
        parse_event(v).unwrap()
    };
    for table in Table::ALL {
        assert_eq!(
            get(&format!("{table}-scheduled.json")),
            Invocation::Scheduled(table),
            "events/{table}-scheduled.json is the schedule's event"
        );
    }
    assert_eq!(
        get("engage-resume.json"),
        Invocation::Scheduled(Table::Engage)
    );
    assert!(matches!(
        get("export-day.json"),
        Invocation::Day(Table::Export, _)
    ));
    assert!(matches!(
        get("export-range.json"),
        Invocation::Range(Table::Export, _, _)
    ));
    assert_eq!(
        get("engage-full.json"),
        Invocation::FullListing(Table::Engage)
    );
    assert_eq!(get("check.json"), Invocation::Check);
}

/// A child process killed (and reaped) when dropped, its output kept in files.
struct Proc {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { child, name, log }
    }

    fn output(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        format!("--- {} output ---\n{s}", self.name)
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited ({status})\n{}", self.name, self.output());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `port` accepts connections while `proc` runs.
fn wait_for_port(proc: &mut Proc, port: u16) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        proc.assert_running();
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} did not listen on {port} within 60 s\n{}",
            proc.name,
            proc.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `cargo lambda invoke --data-file FILE`: the response JSON, or the error output.
fn invoke(cargo_lambda: &Path, port: u16, file: &Path) -> Result<Value, String> {
    let mut child = Command::new(cargo_lambda)
        .args([
            "lambda",
            "invoke",
            "--invoke-address",
            "127.0.0.1",
            "--invoke-port",
        ])
        .arg(port.to_string())
        .args(["--color", "never", "--data-file"])
        .arg(file)
        .arg(FUNCTION_NAME)
        .current_dir(ROOT)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start cargo lambda invoke");
    // Read both pipes on threads so a full pipe never blocks the child.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > INVOKE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no answer within {INVOKE_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    if status.success() {
        serde_json::from_str(out.trim())
            .map_err(|e| format!("the answer is not JSON ({e}): {out:?}\nstderr: {err}"))
    } else {
        Err(format!("{err}{out}"))
    }
}

/// The event sent for a file: its own JSON, with dates moved into the simulator's data (the
/// day of an SQS record's body to `sqs_day`).
fn to_send(event: &Value, day: Date, from: Date, to: Date, sqs_day: Date) -> Value {
    let mut e = event.clone();
    if is_sqs_event(&e) {
        for r in e["Records"].as_array_mut().unwrap() {
            let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
            let moved = to_send(&body, sqs_day, from, to, sqs_day);
            r["body"] = json!(moved.to_string());
        }
        return e;
    }
    let obj = e.as_object_mut().unwrap();
    if obj.contains_key("date") {
        obj.insert("date".into(), json!(day.to_string()));
    }
    if obj.contains_key("from") {
        obj.insert("from".into(), json!(from.to_string()));
        obj.insert("to".into(), json!(to.to_string()));
    }
    e
}

/// Until a table is implemented it answers `InvalidEvent` "not supported by this version yet";
/// once it is, any successful answer — but never another error.
/// A scheduled invocation of a table other than export: `done`, or `idle` when an earlier event
/// file already replicated it; either way the table's output is then exactly the simulator's
/// (the latest snapshot, or every day from `first` to `today`).
async fn assert_answered(
    name: &str,
    table: Table,
    answer: &Result<Value, String>,
    app: &mixpanel_replicator::app::App,
    sim: &mixpanel_sim::Simulator,
    (first, today): (jiff::civil::Date, jiff::civil::Date),
) {
    let r = answer
        .as_ref()
        .unwrap_or_else(|e| panic!("events/{name}: an error: {e}"));
    let status = r["status"].as_str().unwrap_or("");
    assert!(
        ["done", "idle"].contains(&status),
        "events/{name}: unexpected answer {r}"
    );
    assert_eq!(r["table"], table.as_str(), "events/{name}: {r}");
    let snapshot_truth = match table {
        Table::Engage => Some(sim.engage_ground_truth()),
        Table::Cohorts => Some(sim.cohorts_ground_truth()),
        Table::CohortMembers => Some(sim.cohort_members_ground_truth()),
        Table::Annotations => Some(sim.annotations_ground_truth()),
        _ => None,
    };
    if let Some(truth) = snapshot_truth {
        let (_, rows) = read_latest_snapshot(app, table.as_str())
            .await
            .unwrap_or_else(|| panic!("events/{name}: {table} has no snapshot ({r})"));
        let truth = canonical(truth);
        assert!(!truth.is_empty(), "{table}: the simulator has no rows");
        assert_eq!(rows, truth, "events/{name}: {table} vs the ground truth");
        return;
    }
    for day in days(first, today) {
        let truth = match table {
            Table::Funnels => sim.funnels_ground_truth(day),
            Table::Revenue => sim.revenue_ground_truth(day),
            other => panic!("events/{name}: {other} is not a table by day besides export"),
        };
        let (_, rows) =
            read_manifest_rows(&app.sink, &format!("{}/{table}/date={day}", app.prefix))
                .await
                .unwrap_or_else(|| panic!("events/{name}: {table} {day} was not committed ({r})"));
        assert_eq!(rows, canonical(truth), "events/{name}: {table} {day}");
    }
}

/// An attribute value as text, its maps' keys in order.
fn attribute_text(v: &aws_sdk_dynamodb::types::AttributeValue) -> String {
    use aws_sdk_dynamodb::types::AttributeValue;
    match v {
        AttributeValue::M(m) => {
            let sorted: std::collections::BTreeMap<_, _> =
                m.iter().map(|(k, v)| (k, attribute_text(v))).collect();
            format!("M({sorted:?})")
        }
        AttributeValue::L(l) => {
            format!("L({:?})", l.iter().map(attribute_text).collect::<Vec<_>>())
        }
        other => format!("{other:?}"),
    }
}

/// Everything stored in the bucket and the state table: object keys with their ETags, and
/// every item, so that a check can be shown to write nothing.
async fn stored(sdk: &aws_config::SdkConfig) -> (Vec<String>, Vec<String>) {
    let s3 = aws_sdk_s3::Client::new(sdk);
    let mut objects = Vec::new();
    let mut pages = s3.list_objects_v2().bucket(BUCKET).into_paginator().send();
    while let Some(page) = pages.next().await {
        for o in page.unwrap().contents() {
            objects.push(format!("{} {}", o.key().unwrap(), o.e_tag().unwrap_or("")));
        }
    }
    objects.sort();
    let dynamo = aws_sdk_dynamodb::Client::new(sdk);
    let mut items = Vec::new();
    let mut pages = dynamo
        .scan()
        .table_name(STATE_TABLE)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        for item in page.unwrap().items() {
            let sorted: std::collections::BTreeMap<_, _> =
                item.iter().map(|(k, v)| (k, attribute_text(v))).collect();
            items.push(format!("{sorted:?}"));
        }
    }
    items.sort();
    (objects, items)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_file_runs_under_the_lambda_runtime_api() {
    let cargo_lambda = cargo_lambda();
    let dir = tempfile::tempdir().unwrap();
    let function_bin = lambda_function_binary(dir.path());

    // Five days of data ending yesterday, a secret, a bucket and a state table.
    let cfg = sim_config("UTC", 5, 120);
    let first = cfg.first_day;
    let today = today_in("UTC");
    let yesterday = minus(today, 1);
    let project = Project::start(cfg).await;
    let aws = Aws::start_for(&project, BUCKET, STATE_TABLE, SECRET_ID).await;
    let sqs = aws_sdk_sqs::Client::new(&aws.sdk);
    let queue = support::aws::create_queue(&sqs, "fan-out").await;

    // The Runtime API emulator, without building or starting a function.
    let port = free_port();
    let mut watch_cmd = Command::new(&cargo_lambda);
    watch_cmd
        .args([
            "lambda",
            "watch",
            "--only-lambda-apis",
            "--invoke-address",
            "127.0.0.1",
        ])
        .args(["--invoke-port", &port.to_string()])
        .current_dir(ROOT);
    let mut watch = Proc::spawn("cargo lambda watch", watch_cmd, dir.path());
    wait_for_port(&mut watch, port);

    // The function: the already-built binary, with the environment the SAM template gives it
    // (credentials only through the secret), plus what Lambda sets.
    let mut function_cmd = Command::new(&function_bin);
    function_cmd.env_clear();
    for (k, v) in &project.vars {
        if k != "MIXPANEL_API_SECRET" {
            function_cmd.env(k, v);
        }
    }
    for (k, v) in aws.moto.env() {
        function_cmd.env(k, v);
    }
    function_cmd
        .env(
            "AWS_LAMBDA_RUNTIME_API",
            format!("http://127.0.0.1:{port}/.rt"),
        )
        .env("AWS_LAMBDA_FUNCTION_NAME", FUNCTION_NAME)
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1769")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("MIXPANEL_SECRET_ID", SECRET_ID)
        .env("OUTPUT_BUCKET", BUCKET)
        .env("STATE_TABLE", STATE_TABLE)
        .env("FAN_OUT_QUEUE_URL", &queue)
        // `cargo lambda watch` sends a deadline in the past: the program falls back to this.
        .env("INVOCATION_TIME_BUDGET_SECONDS", "120")
        .current_dir(dir.path());
    let mut function = Proc::spawn(
        "mixpanel-replicator (Lambda mode)",
        function_cmd,
        dir.path(),
    );

    // To read what the function wrote.
    let app = aws.app(&project, BUCKET, STATE_TABLE, SECRET_ID, &[]).await;
    let sim = project.simulator();

    // `{"check": true}` before anything is replicated, as a person deploying tries it: every
    // line, each ok, and nothing written (not even the request budget's ledger).
    let secret = sim.config().api_secret.clone();
    let secrets = aws_sdk_secretsmanager::Client::new(&aws.sdk);
    let check = |tag: &str| {
        let file = dir.path().join(format!("check-{tag}.json"));
        std::fs::write(&file, r#"{"check": true}"#).unwrap();
        let cl = cargo_lambda.clone();
        async move {
            tokio::task::spawn_blocking(move || invoke(&cl, port, &file))
                .await
                .unwrap()
        }
    };
    let lines = |answer: &Value| -> Vec<String> {
        answer["lines"]
            .as_array()
            .unwrap_or_else(|| panic!("no lines: {answer}"))
            .iter()
            .map(|l| l.as_str().unwrap().to_string())
            .collect()
    };
    let settings_line = format!(
        "ok    settings        start {first}, timezone UTC, residency us, output s3://{BUCKET}/mixpanel"
    );
    let credentials_line = format!(
        "ok    credentials     a project API secret, from Secrets Manager secret {SECRET_ID}"
    );
    let before = stored(&aws.sdk).await;
    assert_eq!(before, (vec![], vec![]), "nothing is stored yet");
    let answer = check("good")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", function.output()));
    assert_eq!(answer["status"], "ok", "{answer:#}\n{}", function.output());
    assert_eq!(
        answer.as_object().unwrap().len(),
        2,
        "status and lines: {answer}"
    );
    assert_eq!(
        lines(&answer),
        [
            settings_line.clone(),
            credentials_line.clone(),
            "ok    state           readable; nothing replicated yet".into(),
            "ok    annotations     the annotations API answers".into(),
            "ok    cohort_members  4 cohorts listed".into(),
            "ok    cohorts         4 cohorts listed".into(),
            "ok    engage          the engage API answers".into(),
            "ok    export          the export API answers (0 bytes for one second)".into(),
            "ok    funnels         3 funnels listed".into(),
            "ok    revenue         the revenue API answers".into(),
        ]
    );
    assert_eq!(stored(&aws.sdk).await, before, "the check wrote nothing");

    // A wrong secret: read (the check does not trust the cache), then refused for each table.
    support::aws::put_secret(&secrets, SECRET_ID, r#"{"api_secret": "Wr0ng-S3cret"}"#).await;
    let answer = check("wrong")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", function.output()));
    let unauthorized = |table: &str, path: &str| {
        format!(
            "FAIL  {table:<15} Mixpanel rejected the credentials (HTTP 401 on /api/2.0/{path}: Invalid \
             credentials); check the API secret or service account and its project"
        )
    };
    assert_eq!(
        (&answer["status"], &answer["failed"]),
        (&json!("failed"), &json!(7)),
        "{answer:#}"
    );
    assert_eq!(
        lines(&answer),
        [
            settings_line.clone(),
            credentials_line.clone(),
            "ok    state           readable; nothing replicated yet".into(),
            unauthorized("annotations", "annotations"),
            unauthorized("cohort_members", "cohorts/list"),
            unauthorized("cohorts", "cohorts/list"),
            unauthorized("engage", "engage"),
            unauthorized("export", "export"),
            unauthorized("funnels", "funnels/list"),
            unauthorized("revenue", "engage/revenue"),
        ],
        "{answer:#}"
    );
    assert_eq!(stored(&aws.sdk).await, before, "the check wrote nothing");

    // No secret at all: the credentials line says which, and the check stops there (moto
    // answers HTTP 404 where Secrets Manager answers 400).
    secrets
        .delete_secret()
        .secret_id(SECRET_ID)
        .force_delete_without_recovery(true)
        .send()
        .await
        .unwrap();
    let answer = check("missing")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", function.output()));
    assert_eq!(
        answer,
        json!({"status": "failed", "failed": 1, "lines": [
            settings_line,
            format!("FAIL  credentials     cannot read the Mixpanel credentials secret \"{SECRET_ID}\": \
                     ResourceNotFoundException: Secrets Manager can't find the specified secret. (HTTP 404)"),
        ]}),
        "{answer:#}"
    );
    assert_eq!(stored(&aws.sdk).await, before, "the check wrote nothing");
    support::aws::put_secret(&secrets, SECRET_ID, &project.secret_json()).await;

    // The scheduled export first (it takes the oldest day), then days, ranges, the rest.
    let mut files = event_files();
    // The SQS delivery after the range, which queued its day.
    let rank = |v: &Value| match parse_event(v) {
        Err(_) if is_sqs_event(v) => 3,
        Err(e) => panic!("{e}"),
        Ok(inv) => match inv {
            Invocation::Scheduled(Table::Export) => 0,
            Invocation::Day(Table::Export, _) => 1,
            Invocation::Range(Table::Export, _, _) => 2,
            _ => 4,
        },
    };
    files.sort_by_key(|(name, v)| (rank(v), name.clone()));

    let day = minus(today, 2);
    let sqs_day = minus(today, 3);
    let mut timings = Vec::new();
    for (name, event) in &files {
        let sent = to_send(event, day, first, yesterday, sqs_day);
        let is_check = parse_event(&sent).is_ok_and(|i| i == Invocation::Check);
        let before = if is_check {
            Some(stored(&aws.sdk).await)
        } else {
            None
        };
        let file = dir.path().join(name);
        std::fs::write(&file, sent.to_string()).unwrap();
        let cl = cargo_lambda.clone();
        let started = Instant::now();
        let answer = tokio::task::spawn_blocking(move || invoke(&cl, port, &file))
            .await
            .unwrap();
        let took = started.elapsed();
        timings.push(match &answer {
            Ok(r) if is_sqs_event(&sent) => format!("{name}: {took:?} {r}"),
            Ok(r) => format!("{name}: {took:?} {} {}", r["status"], r["records"]),
            Err(e) => format!("{name}: {took:?} error {}", e.lines().next().unwrap_or("")),
        });
        function.assert_running();
        let context = || {
            format!(
                "events/{name} sent as {sent}\n{}\n{}",
                function.output(),
                watch.output()
            )
        };

        if is_sqs_event(&sent) {
            // Every record finished: its day committed, exactly.
            let r = answer.unwrap_or_else(|e| panic!("{e}\n{}", context()));
            assert_eq!(r, json!({"batchItemFailures": []}), "{}", context());
            for inv in bodies(&sent) {
                let Invocation::Day(Table::Export, d) = inv else {
                    panic!("events/{name}: {inv:?}");
                };
                assert_eq!(d, sqs_day);
                let (_, rows) = read_partition(&app.sink, &app.prefix, "export", d)
                    .await
                    .unwrap_or_else(|| panic!("export {d} was not committed"));
                assert_eq!(
                    rows,
                    truth(sim, d, None),
                    "export {d} in S3 vs the simulator's ground truth"
                );
            }
            continue;
        }
        match parse_event(&sent).unwrap() {
            Invocation::Scheduled(Table::Export) => {
                // It works through every pending day, oldest first, within its time.
                let r = answer.unwrap_or_else(|e| panic!("{e}\n{}", context()));
                let all = days(first, today);
                assert_eq!(r["status"], "done", "{r}\n{}", context());
                assert_eq!(r["table"], "export", "{r}");
                // The oldest day alone (it has no history near it), then one window of the rest.
                assert_eq!(
                    r["slice"],
                    format!("{first},{}..{today}", all[1]),
                    "every pending day: {r}"
                );
                assert_eq!(r["slices"], all.len(), "{r}");
                let truth_rows: usize = all.iter().map(|d| truth(sim, *d, None).len()).sum();
                assert_eq!(r["records"], truth_rows, "{r}");
                assert_exact(&app, sim, first, today, None).await;
            }
            Invocation::Day(Table::Export, d) => {
                let r = answer.unwrap_or_else(|e| panic!("{e}\n{}", context()));
                let truth_rows = truth(sim, d, None);
                assert_eq!(r["status"], "done", "{r}\n{}", context());
                assert_eq!(r["slice"], d.to_string(), "{r}");
                assert_eq!(r["records"], truth_rows.len(), "{r}");
                assert!(r["files"].as_u64().unwrap() >= 1, "{r}");
                let (manifest, rows) = read_partition(&app.sink, &app.prefix, "export", d)
                    .await
                    .unwrap_or_else(|| panic!("export {d} was not committed"));
                assert_eq!(manifest.records, truth_rows.len() as u64);
                assert_eq!(
                    rows, truth_rows,
                    "export {d} in S3 vs the simulator's ground truth"
                );
            }
            Invocation::Range(Table::Export, from, to) => {
                let r = answer.unwrap_or_else(|e| panic!("{e}\n{}", context()));
                assert_eq!(r["status"], "fan_out", "{r}\n{}", context());
                let expected: Vec<Value> = days(from, to)
                    .into_iter()
                    .map(|d| json!({"table": "export", "date": d.to_string()}))
                    .collect();
                assert_eq!(r["events"], json!(expected), "one event per day");
                // ... each sent to the fan-out queue as one message.
                let mut sent: Vec<Value> = support::aws::receive_all(&sqs, &queue)
                    .await
                    .iter()
                    .map(|m| serde_json::from_str(m.body().unwrap()).unwrap())
                    .collect();
                sent.sort_by_key(|v| v["date"].as_str().unwrap().to_string());
                assert_eq!(sent, expected, "the fan-out queue's messages");
            }
            Invocation::Check => {
                // With replicated data: every line ok, and still nothing written.
                let r = answer.unwrap_or_else(|e| panic!("{e}\n{}", context()));
                assert_eq!(r["status"], "ok", "{r:#}\n{}", context());
                let lines = lines(&r);
                assert_eq!(lines.len(), 10, "{r:#}");
                assert!(lines.iter().all(|l| l.starts_with("ok    ")), "{r:#}");
                assert!(
                    lines[2]
                        .starts_with("ok    state           readable; export is replicated up to "),
                    "{r:#}"
                );
                assert_eq!(
                    Some(stored(&aws.sdk).await),
                    before,
                    "the check wrote nothing"
                );
            }
            other => {
                let table = other.table().unwrap();
                assert_answered(name, table, &answer, &app, sim, (first, today)).await
            }
        }
    }
    function.assert_running();
    eprintln!("invocations: {timings:#?}");

    // The EMF lines the function prints are what the template's RateLimitedAlarm reads.
    // One EMF document per invocation event (the SQS file's one record included); a check has
    // no table to measure.
    let log = std::fs::read_to_string(&function.log).unwrap();
    let emf_lines: Vec<&str> = log.lines().filter(|l| l.contains("\"_aws\"")).collect();
    let checks = files
        .iter()
        .filter(|(_, v)| parse_event(v).is_ok_and(|i| i == Invocation::Check))
        .count();
    assert_eq!(checks, 1, "events/check.json");
    assert_eq!(
        emf_lines.len(),
        timings.len() - checks,
        "one EMF line per invocation:\n{log}"
    );
    // The checks logged their lines, never the secret (right or wrong).
    assert!(log.contains("check failed"), "{log}");
    for form in [secret.as_str(), "Wr0ng-S3cret"] {
        assert!(!log.contains(form), "{form} appears in the function's log");
    }
    // Once export has committed days up to today, every export invocation tells how fresh its
    // data is: less than a day old (today's commit holds data up to the minute it was made).
    let export_lags: Vec<u64> = emf_lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["Table"] == "export")
        .filter_map(|e| e["FreshnessLagSeconds"].as_u64())
        .collect();
    assert!(
        !export_lags.is_empty() && export_lags.iter().all(|lag| *lag < 86_400),
        "FreshnessLagSeconds of export: {export_lags:?}\n{log}"
    );
    for line in emf_lines {
        let emf: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("EMF line {line}: {e}"));
        let directive = &emf["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(
            directive["Namespace"],
            mixpanel_replicator::metrics::NAMESPACE,
            "{line}"
        );
        assert_eq!(directive["Dimensions"], json!([["Table"]]), "{line}");
        let names: Vec<&str> = directive["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap())
            .collect();
        for metric in [
            "Records",
            "Bytes",
            "Files",
            "Retries",
            "RateLimited",
            "DurationMs",
            // On every invocation, idle and failed ones too (src/metrics.rs).
            "ParkedSlices",
        ] {
            assert!(
                names.contains(&metric),
                "EMF metric {metric} missing: {line}"
            );
            assert!(emf[metric].is_u64(), "EMF value of {metric}: {line}");
        }
        assert!(
            Table::ALL.iter().any(|t| emf["Table"] == t.as_str()),
            "{line}"
        );
        // Declared exactly when it is there (before a table's first commit it is left out).
        assert_eq!(
            names.contains(&"FreshnessLagSeconds"),
            emf["FreshnessLagSeconds"].is_u64(),
            "{line}"
        );
    }
}
