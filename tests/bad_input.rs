//! Bad input gets one clear error naming the problem, of the kind that says whether retrying
//! helps, and changes nothing.

mod support;

use std::collections::HashMap;

use mixpanel_replicator::config::{RunMode, Settings};
use mixpanel_replicator::error::ErrorKind;
use mixpanel_replicator::handler::{self, Status};
use mixpanel_replicator::state::SliceStatus;
use mixpanel_replicator::tables::Table;
use mixpanel_sim::Fault;
use support::harness::*;

fn deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(60)
}

/// Replicates `day` with the simulator answering `body` (status 200) to the export request;
/// returns the error and checks that nothing was committed.
async fn export_answering(status: u16, body: &str) -> (ErrorKind, String) {
    let cfg = sim_config("UTC", 1, 5);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    project.fault_export(
        None,
        100,
        Fault::Status {
            status,
            body: body.into(),
        },
    );
    let (_dir, app) = project.temp_app(&[]).await;
    let e = handle_export_day(&app, day, deadline()).await.unwrap_err();
    let slices = app.store.slices(Table::Export).await.unwrap();
    assert_eq!(
        slices[0].status,
        SliceStatus::Pending,
        "the day stays pending"
    );
    assert!(
        read_partition(&app.sink, "", "export", day).await.is_none(),
        "nothing committed"
    );
    let parts: Vec<_> = app
        .sink
        .list("")
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.key.contains("part-"))
        .collect();
    assert!(parts.is_empty(), "no part left behind: {parts:?}");
    (e.kind(), e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixpanel_answering_html_with_200_is_a_bad_response() {
    let (kind, msg) =
        export_answering(200, "<html><body>Service Unavailable</body></html>\n").await;
    assert_eq!(kind, ErrorKind::BadResponse);
    assert_eq!(
        msg,
        "unusable export line (expected value at line 1 column 1): \"<html><body>Service Unavailable</body></html>\""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixpanel_answering_an_error_object_with_200_is_a_bad_response() {
    let (kind, msg) = export_answering(200, "{\"error\": \"Internal error\"}\n").await;
    assert_eq!(kind, ErrorKind::BadResponse);
    assert_eq!(
        msg,
        "unusable export line (no \"properties\" object at line 1 column 27): \"{\\\"error\\\": \\\"Internal error\\\"}\""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_lines_that_are_no_events_is_a_bad_response() {
    let body = "{\"event\":\"a\",\"properties\":{\"time\":\nnot an event\n";
    let (kind, msg) = export_answering(200, body).await;
    assert_eq!(kind, ErrorKind::BadResponse);
    assert!(
        msg.starts_with("unusable export line (EOF while parsing"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_date_later_than_today_is_named() {
    let body = r#"{"request": "/api/2.0/export?from_date=2026-11-29&to_date=2026-11-30", "error": "to_date cannot be later than today"}"#;
    let (kind, msg) = export_answering(400, body).await;
    assert_eq!(kind, ErrorKind::BadResponse);
    assert_eq!(
        msg,
        "Mixpanel answered HTTP 400 on /api/2.0/export: to_date cannot be later than today"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_body_is_an_empty_day() {
    let cfg = sim_config("UTC", 1, 5);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    project.fault_export(
        None,
        1,
        Fault::Status {
            status: 200,
            body: String::new(),
        },
    );
    let (_dir, app) = project.temp_app(&[]).await;
    let r = handle_export_day(&app, day, deadline()).await.unwrap();
    assert_eq!((r.status, r.records, r.files), (Status::Done, 0, 0));
    let (m, rows) = read_partition(&app.sink, "", "export", day).await.unwrap();
    assert!(m.files.is_empty() && rows.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_the_gzip_it_claims_fails_clearly() {
    // A server that says gzip and sends plain text.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = sock.read(&mut buf).await;
                let body = "{\"event\":\"a\",\"properties\":{\"time\":1}}\n";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    let day = minus(today_in("UTC"), 1);
    let vars: HashMap<&str, String> = HashMap::from([
        ("MIXPANEL_API_SECRET", "s".to_string()),
        ("MIXPANEL_START_DATE", day.to_string()),
        ("MIXPANEL_DATA_URL", url.clone()),
        ("MIXPANEL_API_URL", url),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let s = Settings::from_lookup(RunMode::Local, |k| vars.get(k).cloned()).unwrap();
    let app = local_app_in(s, dir.path()).await;
    let e = handle_export_day(&app, day, deadline()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadResponse);
    assert!(
        e.to_string()
            .starts_with("the export body cannot be decoded: error decoding response body"),
        "{e}"
    );
    assert!(read_partition(&app.sink, "", "export", day).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_that_do_not_exist_or_have_the_wrong_shape_are_named_without_their_value() {
    let cfg = sim_config("UTC", 1, 5);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    let aws = Aws::start().await;
    aws.provision(
        "bad-secret-bucket",
        "bad-secret-state",
        "shaped-wrong",
        r#"{"user": "hunter2-value"}"#,
    )
    .await;
    let event = export_day(day);

    let app = aws
        .app(
            &project,
            "bad-secret-bucket",
            "bad-secret-state",
            "no-such-secret",
            &[],
        )
        .await;
    let e = handler::handle(&app, event.clone(), deadline())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Secret);
    assert!(
        e.to_string().starts_with("cannot read the Mixpanel credentials secret \"no-such-secret\": ResourceNotFoundException"),
        "{e}"
    );

    let app = aws
        .app(
            &project,
            "bad-secret-bucket",
            "bad-secret-state",
            "shaped-wrong",
            &[],
        )
        .await;
    let e = handler::handle(&app, event, deadline()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Secret);
    assert_eq!(
        e.to_string(),
        "the Mixpanel credentials secret has neither an \"api_secret\" nor \"username\", \"secret\" and \"project_id\""
    );
    assert!(
        project.simulator().requests().is_empty(),
        "Mixpanel was never asked"
    );
}

#[test]
fn every_malformed_setting_is_named_with_what_is_expected() {
    let base = [
        ("MIXPANEL_API_SECRET", "s"),
        ("MIXPANEL_START_DATE", "2026-11-01"),
    ];
    let cases: &[(&str, &str, &str)] = &[
        (
            "MIXPANEL_REGION",
            "mars",
            "MIXPANEL_REGION: \"mars\" is not a data residency; use us, eu or in",
        ),
        (
            "MIXPANEL_PROJECT_TIMEZONE",
            "Mars/Base",
            "MIXPANEL_PROJECT_TIMEZONE: \"Mars/Base\" is not an IANA timezone name (e.g. America/Los_Angeles)",
        ),
        (
            "MIXPANEL_EXPORT_TIME_MODE",
            "local",
            "MIXPANEL_EXPORT_TIME_MODE: \"local\" is not utc or project_local (project_local is for projects created before 2023-01-01)",
        ),
        (
            "MIXPANEL_START_DATE",
            "2026-02-30",
            "MIXPANEL_START_DATE: \"2026-02-30\" is not a date YYYY-MM-DD",
        ),
        (
            "MIXPANEL_ATTRIBUTION_WINDOW_DAYS",
            "five",
            "MIXPANEL_ATTRIBUTION_WINDOW_DAYS: \"five\" is not a whole number",
        ),
        (
            "MIXPANEL_ATTRIBUTION_WINDOW_DAYS",
            "400",
            "MIXPANEL_ATTRIBUTION_WINDOW_DAYS: 400 is out of range 0..=366",
        ),
        (
            "MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT",
            "maybe",
            "MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT: \"maybe\" is not true or false",
        ),
        (
            "MIXPANEL_API_URL",
            "http://mixpanel.example",
            "MIXPANEL_API_URL: \"http://mixpanel.example\" must use https (plain http only to a loopback address)",
        ),
        (
            "MIXPANEL_DATA_URL",
            "ftp://x",
            "MIXPANEL_DATA_URL: \"ftp://x\" is not an http(s) URL",
        ),
        (
            "OUTPUT_PREFIX",
            "a/../b",
            "OUTPUT_PREFIX: must not contain . or .. components",
        ),
        (
            "OUTPUT_COMPRESSION",
            "lz4",
            "OUTPUT_COMPRESSION: \"lz4\" is not gzip, zstd or none",
        ),
        (
            "OUTPUT_MAX_FILE_BYTES",
            "12",
            "OUTPUT_MAX_FILE_BYTES: 12 is out of range 1024..=18446744073709551615",
        ),
        (
            "MIXPANEL_REFRESH_MINUTES",
            "-1",
            "MIXPANEL_REFRESH_MINUTES: \"-1\" is not a whole number",
        ),
        (
            "MIXPANEL_EXPORT_REQUESTS_PER_WINDOW",
            "0",
            "MIXPANEL_EXPORT_REQUESTS_PER_WINDOW: 0 is out of range 1..=1000000",
        ),
        (
            "MIXPANEL_QUERY_REQUESTS_PER_WINDOW",
            "x",
            "MIXPANEL_QUERY_REQUESTS_PER_WINDOW: \"x\" is not a whole number",
        ),
        (
            "MIXPANEL_RATE_WINDOW_SECONDS",
            "0",
            "MIXPANEL_RATE_WINDOW_SECONDS: 0 is out of range 1..=86400",
        ),
        (
            "MIXPANEL_EXPORT_REQUESTS_PER_SECOND",
            "0",
            "MIXPANEL_EXPORT_REQUESTS_PER_SECOND: 0 is out of range 1..=10000",
        ),
        (
            "MIXPANEL_EXPORT_CONCURRENCY",
            "0",
            "MIXPANEL_EXPORT_CONCURRENCY: 0 is out of range 1..=10000",
        ),
        (
            "MIXPANEL_QUERY_CONCURRENCY",
            "many",
            "MIXPANEL_QUERY_CONCURRENCY: \"many\" is not a whole number",
        ),
        (
            "INVOCATION_TIME_BUDGET_SECONDS",
            "0",
            "INVOCATION_TIME_BUDGET_SECONDS: 0 is out of range 1..=86400",
        ),
        (
            "SNAPSHOT_RETENTION",
            "0",
            "SNAPSHOT_RETENTION: 0 is out of range 1..=10000",
        ),
        (
            "MIXPANEL_DATE_WINDOW_DAYS",
            "0",
            "MIXPANEL_DATE_WINDOW_DAYS: 0 is out of range 1..=366",
        ),
        (
            "MIXPANEL_PROJECT_ID",
            "abc",
            "MIXPANEL_PROJECT_ID: \"abc\" is not a numeric project id",
        ),
    ];
    for (var, value, message) in cases {
        let mut vars: HashMap<&str, &str> = base.into_iter().collect();
        if *var == "MIXPANEL_PROJECT_ID" {
            vars.insert("MIXPANEL_SERVICE_ACCOUNT_USERNAME", "u");
            vars.insert("MIXPANEL_SERVICE_ACCOUNT_SECRET", "x");
        }
        vars.insert(var, value);
        let e = Settings::from_lookup(RunMode::Local, |k| vars.get(k).map(|v| v.to_string()))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidSetting, "{var}");
        assert_eq!(e.to_string(), *message, "{var}={value}");
    }
    // Missing ones.
    type Case<'a> = (&'a [(&'a str, &'a str)], RunMode, &'a str);
    let missing: &[Case] = &[
        (
            &[("MIXPANEL_API_SECRET", "s")],
            RunMode::Local,
            "MIXPANEL_START_DATE: is required: the first day to replicate, as YYYY-MM-DD",
        ),
        (
            &[("MIXPANEL_START_DATE", "2026-11-01")],
            RunMode::Local,
            "MIXPANEL_API_SECRET: no Mixpanel credentials: set MIXPANEL_API_SECRET, or MIXPANEL_SERVICE_ACCOUNT_USERNAME, MIXPANEL_SERVICE_ACCOUNT_SECRET and MIXPANEL_PROJECT_ID, or MIXPANEL_SECRET_ID",
        ),
        (
            &[("MIXPANEL_START_DATE", "2026-11-01")],
            RunMode::Lambda,
            "MIXPANEL_SECRET_ID: is required on Lambda: the Secrets Manager id or ARN of the Mixpanel credentials",
        ),
        (
            &[
                ("MIXPANEL_START_DATE", "2026-11-01"),
                ("MIXPANEL_SECRET_ID", "x"),
            ],
            RunMode::Lambda,
            "OUTPUT_BUCKET: is required on Lambda: the S3 bucket to write to",
        ),
        (
            &[
                ("MIXPANEL_START_DATE", "2026-11-01"),
                ("MIXPANEL_SECRET_ID", "x"),
                ("OUTPUT_BUCKET", "b"),
            ],
            RunMode::Lambda,
            "STATE_TABLE: is required on Lambda: the DynamoDB table (pk, sk strings) that keeps the state",
        ),
        (
            &[
                ("MIXPANEL_START_DATE", "2026-11-01"),
                ("MIXPANEL_SERVICE_ACCOUNT_USERNAME", "u"),
            ],
            RunMode::Local,
            "MIXPANEL_SERVICE_ACCOUNT_SECRET: is required with MIXPANEL_SERVICE_ACCOUNT_USERNAME",
        ),
    ];
    for (vars, mode, message) in missing {
        let map: HashMap<&str, &str> = vars.iter().copied().collect();
        let e = Settings::from_lookup(*mode, |k| map.get(k).map(|v| v.to_string())).unwrap_err();
        assert_eq!(e.to_string(), *message);
    }
}

/// The error a line too long to be an event gets (its memory: the binary's test below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_line_is_refused() {
    let body = format!(
        "{{\"event\":\"a\",\"properties\":{{\"time\":1,\"pad\":\"{}\"}}}}\n",
        "x".repeat(50 << 20)
    );
    let (kind, msg) = export_answering(200, &body).await;
    assert_eq!(kind, ErrorKind::BadResponse);
    assert_eq!(
        msg,
        "the export body has a line longer than 16 MiB; no Mixpanel event is that large"
    );
}

/// Runs `cmd` (the binary) under Python's `resource` module and returns its output and its peak
/// resident memory in MiB. (The child's own high-water mark: a child spawned from this process
/// directly would count this process's memory at its exec, which holds the body served.)
fn peak_rss_mib(cmd: &std::process::Command) -> (std::process::Output, f64) {
    let python = std::env::var("MOTO_PYTHON")
        .unwrap_or_else(|_| format!("{}/.tools/venv/bin/python", env!("CARGO_MANIFEST_DIR")));
    let script = "import resource, subprocess, sys\n\
        r = subprocess.run(sys.argv[1:])\n\
        sys.stdout.flush()\n\
        print('RC', r.returncode, 'MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n";
    let mut py = std::process::Command::new(&python);
    py.env_clear()
        .arg("-c")
        .arg(script)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            py.env(k, v);
        }
    }
    let out = py
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (run scripts/test, which installs it)"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let line = stdout
        .lines()
        .rfind(|l| l.starts_with("RC "))
        .unwrap_or_else(|| panic!("no RC line: {stdout}"));
    let kib: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    (out, kib / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_line_is_refused_by_the_binary_in_a_fraction_of_its_size() {
    let cfg = sim_config("UTC", 1, 5);
    let project = Project::start(cfg).await;
    let line = format!(
        "{{\"event\":\"a\",\"properties\":{{\"time\":1,\"pad\":\"{}\"}}}}\n",
        "x".repeat(200 << 20)
    );
    project.fault_export(
        None,
        100,
        Fault::Status {
            status: 200,
            body: line,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = project.command(None);
    // Parked at the first failure: one read of the line per day.
    cmd.env("MAX_SLICE_ATTEMPTS", "1")
        .args(["sync", "--table", "export", "--out"])
        .arg(dir.path());
    let (out, peak) = tokio::task::spawn_blocking(move || peak_rss_mib(&cmd))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("RC 1 "),
        "the failed day makes sync fail: {stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("a line longer than 16 MiB")
            || stdout.contains("a line longer than 16 MiB"),
        "{stdout}\n{stderr}"
    );
    // It reads at most 16 MiB of the line: far from holding it.
    assert!(peak < 100.0, "peak RSS {peak:.1} MiB for a 200 MiB line");
    let parts = files_under(dir.path());
    assert!(
        parts.iter().all(|p| !p.contains("part-")),
        "no part written: {parts:?}"
    );
}
