//! The secret never appears in logs, errors, responses or output: the binary is run through
//! every command and failure with tracing at its most verbose, and everything it printed or
//! wrote is searched for the secret in every form it takes on the wire.

mod support;

use std::path::Path;

use base64::Engine as _;
use mixpanel_sim::{Fault, FaultRule};
use support::harness::*;

fn run(project: &Project, dir: &Path, secret: &str, args: &[&str], stdin: Option<&str>) -> String {
    let out = output_with_stdin(
        project
            .command(Some("MIXPANEL_API_SECRET"))
            .args(args)
            .current_dir(dir)
            .env("MIXPANEL_API_SECRET", secret)
            .env("RUST_LOG", "trace"),
        stdin,
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn files_under(dir: &Path, out: &mut Vec<Vec<u8>>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            let bytes = std::fs::read(&path).unwrap();
            // Parts are compressed: search their content too.
            let name = path.file_name().unwrap().to_string_lossy();
            if name.ends_with(".jsonl.gz") || name.ends_with(".jsonl.zst") {
                out.push(decode_part(&name, &bytes).unwrap());
            }
            out.push(bytes);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_or_failure_ever_shows_the_secret() {
    let mut cfg = sim_config("America/New_York", 2, 40);
    let secret = "Sup3r-S3cret-Value-0xC0FFEE";
    cfg.api_secret = secret.into();
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let mut printed = String::new();
    // Every table, with faults on the way.
    let sim = project.simulator();
    for (path, fault) in [
        ("/api/2.0/export", Fault::TerminatedEarly { after_lines: 3 }),
        ("/api/2.0/export", Fault::ServerError { status: 503 }),
        (
            "/api/2.0/engage",
            Fault::RateLimited {
                retry_after_secs: Some(0),
            },
        ),
        ("/api/2.0/cohorts/list", Fault::CutBody { after_lines: 0 }),
    ] {
        sim.push_fault(FaultRule {
            path: path.into(),
            from_date: None,
            times: 1,
            covering: None,
            wider_than: None,
            holding: None,
            param: None,
            fault,
        });
    }
    printed += &run(&project, dir.path(), secret, &["sync"], None);
    printed += &run(&project, dir.path(), secret, &["plan"], None);
    printed += &run(&project, dir.path(), secret, &["check"], None);
    printed += &run(
        &project,
        dir.path(),
        "Wr0ng-S3cret-Value-0xBAD",
        &["check"],
        None,
    );
    let event = format!(r#"{{"table": "export", "date": "{day}"}}"#);
    let invoke = |secret: &str, event: &str| {
        run(
            &project,
            dir.path(),
            secret,
            &["invoke", "--event", "-"],
            Some(event),
        )
    };
    printed += &invoke(secret, &event);
    printed += &invoke(secret, r#"{"table": "nope"}"#);
    // The Lambda function's check, with the right secret and a wrong one.
    printed += &invoke(secret, r#"{"check": true}"#);
    printed += &invoke("Wr0ng-S3cret-Value-0xBAD", r#"{"check": true}"#);
    // Mixpanel rejecting a wrong secret, and rejecting the right one (an answer quoting the request).
    printed += &invoke("Wr0ng-S3cret-Value-0xBAD", &event);
    project.fault_export(
        None,
        10,
        Fault::Status {
            status: 403,
            body: r#"{"error": "Forbidden"}"#.into(),
        },
    );
    printed += &invoke(secret, &event);
    assert!(
        printed.contains("slice committed"),
        "the runs did real work:\n{printed}"
    );
    assert!(
        printed.contains("Unauthorized"),
        "the failures were met:\n{printed}"
    );

    let std = base64::engine::general_purpose::STANDARD;
    let forms = [
        secret.to_string(),
        "Wr0ng-S3cret-Value-0xBAD".to_string(),
        std.encode(format!("{secret}:")),
        std.encode(secret),
        std.encode("Wr0ng-S3cret-Value-0xBAD:"),
    ];
    let mut written = Vec::new();
    files_under(dir.path(), &mut written);
    assert!(written.len() > 10, "the output was written");
    for form in &forms {
        assert!(
            !printed.contains(form.as_str()),
            "{form} appears in what was printed"
        );
        for f in &written {
            assert!(
                !String::from_utf8_lossy(f).contains(form.as_str()),
                "{form} appears in an output file"
            );
        }
    }
}
