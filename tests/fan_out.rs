//! Fan-out on SQS, against the simulator and moto (S3, DynamoDB, Secrets Manager, SQS): a range
//! event sends one day event per message to the fan-out queue; the queue's deliveries, fed back
//! as SQS events, commit each day exactly; duplicates do nothing; a record that fails or is not
//! an event is named in `batchItemFailures`; concurrent workers share one request budget.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::civil::Date;
use mixpanel_replicator::app::App;
use mixpanel_replicator::handler::sqs::{BatchItemFailure, BatchResponse};
use mixpanel_replicator::handler::{self, Answer, Status};
use mixpanel_replicator::state::{SliceId, SliceStatus};
use mixpanel_replicator::tables::Table;
use mixpanel_sim::{Fault, FaultRule, RateLimit};
use serde_json::{Value, json};
use support::aws::{create_queue, delete, receive, receive_all, sqs_event, sqs_record};
use support::harness::*;

const BUCKET: &str = "fan-out-bucket";
const STATE: &str = "fan-out-state";
const SECRET: &str = "mixpanel/fan-out";

fn deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(120)
}

/// Moto with the bucket, state table, secret and a fan-out queue; the queue's URL.
async fn provision(project: &Project) -> (Aws, aws_sdk_sqs::Client, String) {
    let aws = Aws::start_for(project, BUCKET, STATE, SECRET).await;
    let sqs = aws_sdk_sqs::Client::new(&aws.sdk);
    let url = create_queue(&sqs, "fan-out").await;
    (aws, sqs, url)
}

/// The batch answer to an SQS event.
async fn batch(app: &App, event: Value) -> BatchResponse {
    match handler::answer(app, event, deadline(), false)
        .await
        .unwrap()
    {
        Answer::Batch(b) => b,
        other => panic!("an SQS event answered as an invocation: {other:?}"),
    }
}

/// Every object of the output with its stored bytes: what a no-op must leave as it is.
async fn objects(app: &App) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for o in app.sink.list("").await.unwrap() {
        let body = app.sink.get(&o.key).await.unwrap().unwrap();
        out.insert(o.key, body.to_vec());
    }
    out
}

/// The same objects with the same bytes (names the first that differs, not its bytes).
fn assert_same_objects(before: &BTreeMap<String, Vec<u8>>, after: &BTreeMap<String, Vec<u8>>) {
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the same files"
    );
    for (key, body) in before {
        assert!(after[key] == *body, "{key} was rewritten");
    }
}

fn day_events(from: Date, to: Date) -> Vec<Value> {
    days(from, to)
        .into_iter()
        .map(|d| json!({"table": "export", "date": d.to_string()}))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_sends_one_message_per_day_whose_delivery_commits_it_and_a_duplicate_does_nothing()
{
    let cfg = sim_config("UTC", 4, 30);
    let first = cfg.first_day;
    let last = minus(today_in("UTC"), 1);
    let project = Project::start(cfg).await;
    let (aws, sqs, url) = provision(&project).await;
    let app = aws
        .app(
            &project,
            BUCKET,
            STATE,
            SECRET,
            &[("FAN_OUT_QUEUE_URL", &url)],
        )
        .await;

    let r = handler::handle(
        &app,
        json!({"table": "export", "from": first.to_string(), "to": last.to_string()}),
        deadline(),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.queued), (Status::FanOut, 4));
    let expected = day_events(first, last);
    assert_eq!(
        r.events.as_deref(),
        Some(&expected[..]),
        "the contract's events"
    );

    // Exactly one message per day, its body the day's event.
    let messages = receive_all(&sqs, &url).await;
    let mut bodies: Vec<String> = messages
        .iter()
        .map(|m| m.body().unwrap().to_string())
        .collect();
    bodies.sort();
    let mut wanted: Vec<String> = expected.iter().map(Value::to_string).collect();
    wanted.sort();
    assert_eq!(bodies, wanted);
    assert!(
        project.simulator().requests().is_empty(),
        "sending asks Mixpanel nothing"
    );

    // The queue's deliveries commit every day exactly, one export request each.
    let delivery = sqs_event(&url, &messages);
    assert_eq!(
        batch(&app, delivery.clone()).await,
        BatchResponse::default()
    );
    assert_exact(&app, project.simulator(), first, last, None).await;
    assert_layout(&app).await;
    let requests = project.simulator().requests();
    assert_eq!(requests.len(), 4, "one export request per day");
    let slices = app.store.slices(Table::Export).await.unwrap();
    assert_eq!(
        slices
            .iter()
            .map(|s| (s.slice, s.status, s.attempts))
            .collect::<Vec<_>>(),
        days(first, last)
            .into_iter()
            .map(|d| (SliceId::Day(d), SliceStatus::Committed, 1))
            .collect::<Vec<_>>()
    );

    // The same deliveries again (SQS delivers at least once): finished, nothing changes.
    let before = objects(&app).await;
    assert_eq!(batch(&app, delivery).await, BatchResponse::default());
    assert_same_objects(&before, &objects(&app).await);
    assert_eq!(
        project.simulator().requests().len(),
        requests.len(),
        "no Mixpanel request"
    );
    assert_eq!(app.store.slices(Table::Export).await.unwrap(), slices);

    // Without FAN_OUT_QUEUE_URL (local runs) a range sends nothing.
    let quiet = aws.app(&project, BUCKET, STATE, SECRET, &[]).await;
    let r = handler::handle(
        &quiet,
        json!({"table": "export", "from": first.to_string(), "to": last.to_string()}),
        deadline(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, Status::FanOut);
    assert!(receive(&sqs, &url, 10, 600).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_that_cannot_reach_its_queue_fails_naming_the_queue_and_keeps_its_days_queued() {
    let cfg = sim_config("UTC", 2, 30);
    let (first, last) = (cfg.first_day, minus(today_in("UTC"), 1));
    let project = Project::start(cfg).await;
    let (aws, _sqs, url) = provision(&project).await;
    let missing = format!("{}-missing", url);
    let app = aws
        .app(
            &project,
            BUCKET,
            STATE,
            SECRET,
            &[("FAN_OUT_QUEUE_URL", &missing)],
        )
        .await;
    let e = handler::handle(
        &app,
        json!({"table": "export", "from": first.to_string(), "to": last.to_string()}),
        deadline(),
    )
    .await
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with(&format!(
            "cannot send the day events to the fan-out queue {missing}: "
        )),
        "{text}"
    );
    assert!(text.contains("NonExistentQueue"), "what SQS said: {text}");
    assert!(!text.contains(&project.simulator().config().api_secret));
    assert_eq!(
        app_slices(&app).await,
        days(first, last)
            .into_iter()
            .map(|d| (SliceId::Day(d), SliceStatus::Pending, 0))
            .collect::<Vec<_>>(),
        "the days stay queued for scheduled invocations"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_record_is_a_batch_item_failure_and_stays_pending_while_the_other_commits() {
    let cfg = sim_config("UTC", 2, 30);
    let (bad, good) = (cfg.first_day, minus(today_in("UTC"), 1));
    let project = Project::start(cfg).await;
    // Mixpanel rejects every request covering the bad day.
    project.simulator().push_fault(FaultRule::export_day(
        bad,
        None,
        Fault::Status {
            status: 400,
            body: r#"{"request": "/api/2.0/export", "error": "invalid request"}"#.into(),
        },
    ));
    let (aws, _sqs, url) = provision(&project).await;
    let app = aws
        .app(
            &project,
            BUCKET,
            STATE,
            SECRET,
            &[("FAN_OUT_QUEUE_URL", &url)],
        )
        .await;

    let event = json!({"Records": [
        sqs_record("m-bad", &json!({"table": "export", "date": bad.to_string()}).to_string()),
        sqs_record("m-good", &json!({"table": "export", "date": good.to_string()}).to_string()),
    ]});
    assert_eq!(
        batch(&app, event).await,
        BatchResponse {
            batch_item_failures: vec![BatchItemFailure {
                item_identifier: "m-bad".into()
            }]
        }
    );
    assert_exact(&app, project.simulator(), good, good, None).await;
    assert!(
        read_partition(&app.sink, &app.prefix, "export", bad)
            .await
            .is_none()
    );
    let slices = app.store.slices(Table::Export).await.unwrap();
    let failed = slices
        .iter()
        .find(|r| r.slice == SliceId::Day(bad))
        .unwrap();
    assert_eq!(
        (failed.status, failed.failures),
        (SliceStatus::Pending, 1),
        "pending again, its failure recorded: {failed:?}"
    );
    assert_eq!(failed.error.as_ref().unwrap().kind, "BadResponse");
    assert!(failed.retry_at_ms.is_some(), "backing off: {failed:?}");

    // Delivered again while it backs off: not finished, nothing asked.
    let asked = project.simulator().requests().len();
    let again = json!({"Records": [sqs_record(
        "m-bad",
        &json!({"table": "export", "date": bad.to_string()}).to_string()
    )]});
    assert_eq!(batch(&app, again).await.batch_item_failures.len(), 1);
    assert_eq!(project.simulator().requests().len(), asked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_body_is_not_an_event_is_a_batch_item_failure_logged_once_and_changes_nothing()
 {
    let cfg = sim_config("UTC", 2, 30);
    let day = cfg.first_day;
    let project = Project::start(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let event = json!({"Records": [
        sqs_record("m-garbage", "{not json"),
        sqs_record("m-unknown", r#"{"table": "exports", "date": "2026-11-01"}"#),
    ]});
    let mut cmd = project.command(None);
    cmd.current_dir(dir.path()).args(["invoke", "--event", "-"]);
    let out = output_with_stdin(&mut cmd, Some(&event.to_string()));
    assert_success(&out);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let answer: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        answer,
        json!({"batchItemFailures": [{"itemIdentifier": "m-garbage"}, {"itemIdentifier": "m-unknown"}]})
    );
    for id in ["m-garbage", "m-unknown"] {
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("ERROR") && l.contains(id))
            .collect();
        assert_eq!(lines.len(), 1, "one error line for {id}:\n{stderr}");
        assert!(lines[0].contains("InvalidEvent"), "{}", lines[0]);
    }
    assert!(stderr.contains("is not JSON"), "{stderr}");
    assert!(
        stderr.contains("unknown table \\\"exports\\\"")
            || stderr.contains("unknown table \"exports\""),
        "{stderr}"
    );
    let secret = &project.simulator().config().api_secret;
    assert!(!stdout.contains(secret.as_str()) && !stderr.contains(secret.as_str()));
    // Nothing asked, nothing written, nothing queued.
    assert!(project.simulator().requests().is_empty());
    let data = dir.path().join("mixpanel-data");
    let written: Vec<String> = files_under(&data)
        .into_iter()
        .filter(|p| !p.ends_with(".state.json") && !p.ends_with(".state.json.lock"))
        .collect();
    assert!(written.is_empty(), "{written:?}");
    let plan = project
        .command(None)
        .current_dir(dir.path())
        .args(["plan", "--table", "export"])
        .output()
        .unwrap();
    assert_success(&plan);
    // `plan` lists what planning would queue: every day from the start, none of them queued
    // by the invalid records.
    let listed = String::from_utf8_lossy(&plan.stdout);
    assert!(listed.lines().all(|l| l.ends_with("\tnew")), "{listed}");
    assert!(listed.contains(&format!("export\t{day}\tnew")), "{listed}");
}

/// Files under `dir`, relative, recursively (none when it does not exist).

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_fed_by_the_queue_never_claim_the_same_day_and_meet_no_429() {
    const LIMIT: u32 = 4;
    const WINDOW_SECS: u64 = 4;
    let mut cfg = sim_config("UTC", 8, 20);
    cfg.rate_limit = Some(RateLimit {
        requests: LIMIT,
        window: Duration::from_secs(WINDOW_SECS),
    });
    let first = cfg.first_day;
    let last = minus(today_in("UTC"), 1);
    let project = Project::start(cfg).await;
    let (aws, sqs, url) = provision(&project).await;
    let limits = [
        ("MIXPANEL_EXPORT_REQUESTS_PER_WINDOW", LIMIT.to_string()),
        ("MIXPANEL_RATE_WINDOW_SECONDS", WINDOW_SECS.to_string()),
        ("MIXPANEL_EXPORT_REQUESTS_PER_SECOND", "1000".to_string()),
        ("FAN_OUT_QUEUE_URL", url.clone()),
    ];
    let extra: Vec<(&str, &str)> = limits.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let planner = aws.app(&project, BUCKET, STATE, SECRET, &extra).await;
    let r = handler::handle(
        &planner,
        json!({"table": "export", "from": first.to_string(), "to": last.to_string()}),
        deadline(),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.queued), (Status::FanOut, 8));

    // Two workers, each its own process state (app, clients), as two Lambda invocations: each
    // takes one message at a time, runs it, and deletes it unless it is named as not finished.
    let mut workers = Vec::new();
    for w in 0..2 {
        let app = aws.app(&project, BUCKET, STATE, SECRET, &extra).await;
        let (sqs, url) = (sqs.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            loop {
                let messages = receive(&sqs, &url, 1, 300).await;
                if messages.is_empty() {
                    return committed;
                }
                let answer = batch(&app, sqs_event(&url, &messages)).await;
                assert_eq!(answer, BatchResponse::default(), "worker {w}");
                for m in &messages {
                    delete(&sqs, &url, m).await;
                    committed.push(m.body().unwrap().to_string());
                }
            }
        }));
    }
    let mut done: Vec<String> = Vec::new();
    let mut per_worker = Vec::new();
    for w in workers {
        let c = w.await.unwrap();
        per_worker.push(c.len());
        done.extend(c);
    }
    done.sort();
    let mut wanted: Vec<String> = day_events(first, last)
        .iter()
        .map(Value::to_string)
        .collect();
    wanted.sort();
    assert_eq!(done, wanted, "every day's message finished once");
    assert!(
        per_worker.iter().all(|n| *n > 0),
        "both workers worked: {per_worker:?}"
    );

    // One request per day, never a day twice, never a 429, never more than the budget.
    let requests = project.simulator().requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    for d in days(first, last) {
        let of_day = requests
            .iter()
            .filter(|r| r.query.contains(&format!("from_date={d}")))
            .count();
        assert_eq!(of_day, 1, "export requests of {d}");
    }
    assert_eq!(requests.len(), 8);
    let at: Vec<u64> = requests.iter().map(|r| r.at_ms).collect();
    for j in LIMIT as usize..at.len() {
        assert!(
            at[j] - at[j - LIMIT as usize] >= WINDOW_SECS * 1000,
            "more than {LIMIT} requests within {WINDOW_SECS} s: {at:?}"
        );
    }
    for s in app_slices(&planner).await {
        assert_eq!(
            (s.1, s.2),
            (SliceStatus::Committed, 1),
            "{} committed by one claim",
            s.0
        );
    }
    assert_exact(&planner, project.simulator(), first, last, None).await;
}

async fn app_slices(app: &App) -> Vec<(SliceId, SliceStatus, u32)> {
    app.store
        .slices(Table::Export)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.slice, r.status, r.attempts))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_invocation_that_cannot_finish_sends_the_next_pending_days_to_the_queue() {
    let cfg = sim_config("UTC", 10, 40);
    let first = cfg.first_day;
    let today = today_in("UTC");
    let project = Project::start(cfg).await;
    // Every body takes about a second: a few days fit in a short invocation, not eleven.
    project.simulator().push_fault(FaultRule::new(
        "/api/2.0/export",
        FaultRule::PERSISTENT,
        Fault::SlowBody {
            lines_per_second: 40,
        },
    ));
    let (aws, sqs, url) = provision(&project).await;
    let app = aws
        .app(
            &project,
            BUCKET,
            STATE,
            SECRET,
            &[("FAN_OUT_QUEUE_URL", &url), ("FAN_OUT_CONCURRENCY", "2")],
        )
        .await;
    let short = tokio::time::Instant::now() + Duration::from_secs(6);
    let r = handler::handle(&app, json!({"table": "export"}), short)
        .await
        .unwrap();
    assert_eq!(r.status, Status::Partial, "{r:?}");
    let done = r.slices as usize;
    assert!((1..11).contains(&done), "{r:?}");
    // The two oldest days it left are sent, and nothing else.
    let all = days(first, today);
    let expected: Vec<Value> = all[done..done + 2]
        .iter()
        .map(|d| json!({"table": "export", "date": d.to_string()}))
        .collect();
    assert_eq!(r.events.as_deref(), Some(&expected[..]), "{r:?}");
    assert!(
        r.reason.as_deref().unwrap().contains("2 day event(s) sent"),
        "{r:?}"
    );
    let messages = receive_all(&sqs, &url).await;
    let bodies: Vec<Value> = messages
        .iter()
        .map(|m| serde_json::from_str(m.body().unwrap()).unwrap())
        .collect();
    assert_eq!(bodies, expected);
    // Their delivery commits those days; scheduled invocations do the rest, exactly.
    assert_eq!(
        batch(&app, sqs_event(&url, &messages)).await,
        BatchResponse::default()
    );
    for d in &all[done..done + 2] {
        assert_exact(&app, project.simulator(), *d, *d, None).await;
    }
    for _ in 0..10 {
        let r = handler::handle(&app, json!({"table": "export"}), deadline())
            .await
            .unwrap();
        if r.status == Status::Idle {
            break;
        }
    }
    assert_exact(&app, project.simulator(), first, today, None).await;
    let requests = project
        .simulator()
        .requests()
        .iter()
        .filter(|q| q.path == "/api/2.0/export")
        .count();
    assert!(
        requests < all.len(),
        "small days are asked for in windows: {requests} requests for {} days",
        all.len()
    );
}
