//! The local command as a user runs it: `plan`, `sync`, `invoke` and `demo` on the real binary.

mod support;

use std::process::Command;

use support::harness::*;

fn command(project: &Project, dir: &std::path::Path) -> Command {
    let mut cmd = project.command(None);
    cmd.current_dir(dir);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_lists_pending_days_without_changing_anything_then_sync_commits_them() {
    let cfg = sim_config("UTC", 3, 30);
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let dir = tempfile::tempdir().unwrap();

    let out = command(&project, dir.path())
        .args(["plan", "--table", "export"])
        .output()
        .unwrap();
    assert_success(&out);
    let expected: String = days(first, today_in("UTC"))
        .iter()
        .map(|d| format!("export\t{d}\tnew\n"))
        .collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    assert!(
        !dir.path().join("mixpanel-data").exists(),
        "plan wrote nothing"
    );
    assert!(
        project.simulator().requests().is_empty(),
        "plan asked Mixpanel nothing"
    );

    let out = command(&project, dir.path())
        .args(["sync"])
        .output()
        .unwrap();
    assert_success(&out);
    // One JSON summary line per slice on stdout (not a terminal).
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().all(|l| l["status"] == "done"), "{lines:?}");
    // Days with no history near them are fetched alone (two workers: one or two such
    // probes), the others as one window (`a..b`): every day is in exactly one line.
    let mut covered: Vec<jiff::civil::Date> = lines
        .iter()
        .filter(|l| l["table"] == "export")
        .flat_map(|l| {
            let label = l["slice"].as_str().unwrap();
            match label.split_once("..") {
                Some((a, b)) => days(a.parse().unwrap(), b.parse().unwrap()),
                None => vec![label.parse().unwrap()],
            }
        })
        .collect();
    covered.sort();
    assert_eq!(covered, days(first, today_in("UTC")), "{lines:#?}");
    assert!(
        lines.iter().filter(|l| l["table"] == "export").count() < 4,
        "{lines:#?}"
    );
    let tables: std::collections::BTreeSet<&str> =
        lines.iter().map(|l| l["table"].as_str().unwrap()).collect();
    assert_eq!(
        tables.len(),
        7,
        "sync without --table replicates every table: {tables:?}"
    );
    assert!(
        dir.path()
            .join(format!("mixpanel-data/export/date={first}/_manifest.json"))
            .exists()
    );
    assert!(dir.path().join("mixpanel-data/.state.json").exists());

    let out = command(&project, dir.path())
        .args(["plan"])
        .output()
        .unwrap();
    let expected: String = mixpanel_replicator::tables::Table::ALL
        .iter()
        .map(|t| format!("{t}: nothing pending\n"))
        .collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_prints_the_handler_response_on_stdout() {
    let cfg = sim_config("UTC", 1, 40);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let event = dir.path().join("day.json");
    std::fs::write(&event, format!(r#"{{"table": "export", "date": "{day}"}}"#)).unwrap();
    let out = command(&project, dir.path())
        .args(["invoke", "--event"])
        .arg(&event)
        .output()
        .unwrap();
    assert_success(&out);
    let resp: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = truth(project.simulator(), day, None).len() as u64;
    assert_eq!(resp["status"], "done");
    assert_eq!(resp["slice"], day.to_string());
    assert_eq!(resp["records"], rows);
    assert!(resp["files"].as_u64().unwrap() >= 1, "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicates_the_bundled_simulator_and_checks_it() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["demo"])
            .current_dir(cwd)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("every partition and snapshot matches the simulator's ground truth"),
        "{stdout}"
    );
    assert!(!stdout.contains("DIFFERS"), "{stdout}");
    // It ends with a DuckDB query over the folder it wrote.
    assert!(
        stdout.contains("duckdb -c \"SELECT date, event, count(*) AS events FROM read_json('mixpanel-data/export/date=*/part-*'"),
        "{stdout}"
    );
    assert!(
        dir.path()
            .join("mixpanel-data/export/_schema.json")
            .exists()
    );
    // Not only the demo's word: the folder holds every table of the demo's project exactly,
    // read here with the test's own readers against a simulator of the same project.
    let config = mixpanel_replicator::cli::demo::project(jiff::Timestamp::now()).unwrap();
    let project = Project::start(config).await;
    let app = project
        .local_app(&dir.path().join("mixpanel-data"), &[])
        .await;
    let sim = project.simulator();
    let (first, today) = (sim.config().first_day, today_in(&sim.config().timezone));
    assert_exact(&app, sim, first, today, None).await;
    for (table, truth) in [
        ("engage", sim.engage_ground_truth()),
        ("cohorts", sim.cohorts_ground_truth()),
        ("cohort_members", sim.cohort_members_ground_truth()),
        ("annotations", sim.annotations_ground_truth()),
    ] {
        let (_, rows) = read_latest_snapshot(&app, table)
            .await
            .unwrap_or_else(|| panic!("{table} has no snapshot"));
        assert!(!rows.is_empty(), "{table}");
        assert_eq!(rows, canonical(truth), "{table}");
    }
    for day in days(first, today) {
        for (table, truth) in [
            ("funnels", sim.funnels_ground_truth(day)),
            ("revenue", sim.revenue_ground_truth(day)),
        ] {
            let (_, rows) = read_manifest_rows(&app.sink, &format!("{table}/date={day}"))
                .await
                .unwrap_or_else(|| panic!("{table} {day} was not committed"));
            assert_eq!(rows, canonical(truth), "{table} {day}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_waits_out_a_rate_limit_that_outlasts_the_clients_retries_then_finishes() {
    let cfg = sim_config("UTC", 1, 30);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    // Six 429s in a row: every attempt of the first invocation's client.
    project.fault_export(
        Some(day),
        6,
        mixpanel_sim::Fault::RateLimited {
            retry_after_secs: Some(0),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let out = command(&project, dir.path())
        .args(["sync", "--table", "export"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let waits: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("waiting out Mixpanel's rate limit"))
        .collect();
    assert_eq!(waits.len(), 1, "{stderr}");
    assert!(waits[0].contains("wait_s=5"), "{}", waits[0]);
    let (_, rows) = read_manifest_rows(
        &local_sink(&dir.path().join("mixpanel-data")),
        &format!("export/date={day}"),
    )
    .await
    .unwrap();
    assert_eq!(rows, truth(project.simulator(), day, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_with_concurrency_replicates_days_at_once_each_exactly_once() {
    let cfg = sim_config("UTC", 5, 40);
    let first = cfg.first_day;
    let today = today_in("UTC");
    let project = Project::start(cfg).await;
    // Every day's body takes about a second to send.
    project.simulator().push_fault(mixpanel_sim::FaultRule::new(
        "/api/2.0/export",
        mixpanel_sim::FaultRule::PERSISTENT,
        mixpanel_sim::Fault::SlowBody {
            lines_per_second: 40,
        },
    ));
    let dir = tempfile::tempdir().unwrap();
    let out = command(&project, dir.path())
        .args(["sync", "--table", "export", "--concurrency", "3"])
        // A request per day, to see three at once (windows are tested apart).
        .env("MIXPANEL_EXPORT_WINDOW_DAYS", "1")
        .output()
        .unwrap();
    assert_success(&out);
    let requests: Vec<u64> = project
        .simulator()
        .requests()
        .iter()
        .filter(|r| r.path == "/api/2.0/export")
        .map(|r| r.at_ms)
        .collect();
    assert_eq!(requests.len(), 6, "each day once");
    // Three days were asked for while the first body was still being sent.
    assert!(
        requests[2] - requests[0] < 900,
        "three requests at once: {requests:?}"
    );
    let app = project
        .local_app(&dir.path().join("mixpanel-data"), &[])
        .await;
    assert_exact(&app, project.simulator(), first, today, None).await;

    // A count of workers that is not one is refused with one line naming the option.
    let out = command(&project, dir.path())
        .args(["sync", "--concurrency", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--concurrency"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_each_table_it_can_read_asks_little_and_writes_nothing() {
    let mut cfg = sim_config("UTC", 2, 30);
    cfg.plan_excludes = vec!["engage".into()];
    let project = Project::start(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().to_path_buf();
    let mut cmd = command(&project, &cwd);
    let out = tokio::task::spawn_blocking(move || cmd.arg("check").output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    let status = |what: &str| -> &str {
        lines
            .iter()
            .find(|l| l.split_whitespace().nth(1) == Some(what))
            .unwrap_or_else(|| panic!("no line for {what}: {stdout}"))
            .split_whitespace()
            .next()
            .unwrap()
    };
    for what in [
        "settings",
        "credentials",
        "state",
        "annotations",
        "cohort_members",
        "cohorts",
        "export",
        "funnels",
        "revenue",
    ] {
        assert_eq!(status(what), "ok", "{what}: {stdout}");
    }
    assert_eq!(status("engage"), "FAIL", "{stdout}");
    assert!(
        stdout.contains("not allowed by the Mixpanel plan"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(&project.simulator().config().api_secret),
        "{stdout}"
    );
    // A handful of requests, and nothing written.
    assert!(
        project.simulator().requests().len() <= 8,
        "{:?}",
        project.simulator().requests()
    );
    assert_eq!(
        files_under(dir.path()),
        Vec::<String>::new(),
        "check wrote something"
    );

    // A wrong secret: the credentials work for no table, and each says so.
    let mut cmd = command(&project, &cwd);
    cmd.env("MIXPANEL_API_SECRET", "wrong");
    let out = tokio::task::spawn_blocking(move || cmd.arg("check").output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.lines().filter(|l| l.starts_with("FAIL")).count() >= 6,
        "{stdout}"
    );
    assert!(!stdout.contains("wrong"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_region_when_the_project_is_in_another_cluster() {
    let project = Project::start(sim_config("UTC", 1, 5)).await;
    // What Mixpanel answers every request of a project asked on another cluster's hosts.
    project.fault_export(
        None,
        100,
        mixpanel_sim::Fault::Status {
            status: 400,
            body: r#"{"error": "request failed with error: invalid project id for cluster."}"#
                .into(),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command(&project, dir.path());
    let out = tokio::task::spawn_blocking(move || cmd.arg("check").output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let export = stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("export"))
        .unwrap_or_else(|| panic!("no export line: {stdout}"));
    assert!(
        export.starts_with("FAIL  export")
            && export.contains("MIXPANEL_REGION: ")
            && export.contains("set MIXPANEL_REGION to its region (us, eu or in)"),
        "{export}"
    );
    assert_eq!(files_under(dir.path()), Vec::<String>::new());
}

/// A plain-HTTP base URL whose server redirects to HTTPS, as Mixpanel answers `http://`: the
/// client (which loads no CA store for plain HTTP) does not follow it, and `check` names the
/// settings to change for each table, with nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_settings_when_a_plain_http_url_redirects_to_https() {
    use std::io::{Read, Write};
    let project = Project::start(sim_config("UTC", 1, 5)).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut head = [0u8; 8192];
            let _ = stream.read(&mut head);
            let _ = stream.write_all(
                b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://127.0.0.1:9/api/2.0/export?project_id=1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let url = format!("http://{addr}");
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command(&project, dir.path());
    cmd.env("MIXPANEL_API_URL", &url)
        .env("MIXPANEL_DATA_URL", &url);
    let out = tokio::task::spawn_blocking(move || cmd.arg("check").output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let export = stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("export"))
        .unwrap_or_else(|| panic!("no export line: {stdout}"));
    assert!(
        export.starts_with("FAIL  export")
            && export.contains("redirected a plain-HTTP request to https://127.0.0.1;")
            && export.contains("set MIXPANEL_API_URL and MIXPANEL_DATA_URL to its https:// URLs"),
        "{export}"
    );
    // The redirect's path and query are not repeated.
    assert!(!stdout.contains("project_id=1"), "{stdout}");
    assert_eq!(files_under(dir.path()), Vec::<String>::new());
}
