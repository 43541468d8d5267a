//! The Query API tables as real projects serve them: engage pages smaller than asked, listings
//! that end short, refused sessions, integer distinct ids, more funnels than an hour's budget,
//! a fair share of the query budget, the App API annotations and per-event discovery.

mod support;

use std::time::Duration;

use mixpanel_replicator::app::App;
use mixpanel_replicator::cli::sync;
use mixpanel_replicator::handler::{self, Status};
use mixpanel_replicator::tables::Table;
use mixpanel_sim::{Fault, FaultRule, RateLimit, ServiceAccount};
use serde_json::{Value, json};
use support::harness::*;

/// The decoded parameters of a logged query string.
fn query_params(query: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://sim/?{query}"))
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

/// One parameter of a logged query string.
fn query_param(query: &str, name: &str) -> Option<String> {
    query_params(query)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn deadline(secs: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(secs)
}

/// The engage requests the simulator saw, as (page, status).
fn engage_pages(project: &Project) -> Vec<(u64, u16)> {
    project
        .simulator()
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/2.0/engage" && !r.query.contains("filter_by_cohort"))
        .map(|r| {
            let page = query_param(&r.query, "page")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            (page, r.status)
        })
        .collect()
}

/// The `_schema.json` type of `column` in `table`.
async fn schema_type(app: &App, table: &str, column: &str) -> Value {
    let key = if app.prefix.is_empty() {
        format!("{table}/_schema.json")
    } else {
        format!("{}/{table}/_schema.json", app.prefix)
    };
    let schema: Value =
        serde_json::from_slice(&app.sink.get(&key).await.unwrap().expect("_schema.json")).unwrap();
    schema["columns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == column)
        .unwrap_or_else(|| panic!("no {column} in {schema}"))["type"]
        .clone()
}

/// 2,345 profiles served 500 to a page, some with integer ids and some without `$properties`.
fn small_pages_project_config() -> mixpanel_sim::SimConfig {
    let mut cfg = sim_config("UTC", 1, 10);
    cfg.profiles = 2345;
    cfg.engage_max_page_size = Some(500);
    cfg.engage_integer_ids = true;
    cfg.engage_omit_empty_properties = true;
    cfg
}

async fn assert_small_pages_complete(project: &Project, app: &App) {
    let sim = project.simulator();
    let report = sync(app, &[Table::Engage, Table::CohortMembers])
        .await
        .unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    let (_, rows) = read_latest_snapshot(app, "engage").await.unwrap();
    assert_eq!(rows.len(), 2345);
    assert_eq!(rows, canonical(sim.engage_ground_truth()));
    // Five pages of 500 (the last one of 345), each asked once.
    assert_eq!(
        engage_pages(project),
        (0..5).map(|p| (p, 200)).collect::<Vec<_>>()
    );
    let (_, members) = read_latest_snapshot(app, "cohort_members").await.unwrap();
    assert_eq!(members, canonical(sim.cohort_members_ground_truth()));
    // Some ids are integers (`1000003`), kept so in rows and typed so in the schema.
    let truth = sim.engage_ground_truth();
    assert!(truth.iter().any(|r| r["distinct_id"].is_u64()));
    assert!(truth.iter().any(|r| r.as_object().unwrap().len() == 1));
    assert!(
        rows.iter()
            .any(|r| serde_json::from_str::<Value>(r).unwrap()["distinct_id"].is_u64())
    );
    assert_eq!(
        schema_type(app, "engage", "distinct_id").await,
        json!(["integer", "string"])
    );
    assert_eq!(
        schema_type(app, "cohort_members", "distinct_id").await,
        json!(["integer", "string"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engage_served_in_500_profile_pages_is_complete_and_exact_with_integer_ids() {
    let project = Project::start(small_pages_project_config()).await;
    let (_dir, app) = project.temp_app(&[]).await;
    assert_small_pages_complete(&project, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engage_served_in_500_profile_pages_is_complete_and_exact_on_s3() {
    let project = Project::start(small_pages_project_config()).await;
    let (_aws, app) = aws_app(&project, "pages-bucket", "pages-state", "creds", &[]).await;
    assert_small_pages_complete(&project, &app).await;
    assert_layout(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_short_of_its_total_is_not_published() {
    let mut cfg = sim_config("UTC", 1, 10);
    cfg.profiles = 2345;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let engage = |fault| FaultRule {
        path: "/api/2.0/engage".into(),
        from_date: None,
        times: 1,
        covering: None,
        wider_than: None,
        holding: None,
        param: None,
        fault,
    };
    // Page 0 as served (total 2345), then an empty page 1: the listing ends at 1,000.
    sim.push_fault(engage(Fault::SlowFirstByte {
        delay: Duration::ZERO,
    }));
    sim.push_fault(engage(Fault::Status {
        status: 200,
        body: r#"{"page":1,"page_size":1000,"status":"ok","results":[]}"#.into(),
    }));
    // A failed attempt is tried again at once here (no backoff).
    let (_dir, app) = project
        .temp_app(&[("SLICE_RETRY_BACKOFF_SECONDS", "0")])
        .await;
    // A scheduled invocation records the failure on the slice and answers `partial`.
    let r = handler::handle(&app, json!({"table": "engage"}), deadline(60))
        .await
        .unwrap();
    assert_eq!((r.status, r.failed), (Status::Partial, 1), "{r:?}");
    let reason = r.reason.unwrap();
    assert!(reason.contains("BadResponse: "), "{reason}");
    assert!(
        reason.contains("the engage listing ended after 1000 of the 2345 profiles"),
        "{reason}"
    );
    assert!(read_latest_snapshot(&app, "engage").await.is_none());
    // The next attempt lists afresh from page 0 and publishes the whole table.
    let r = handler::handle(&app, json!({"table": "engage"}), deadline(60))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    let (_, rows) = read_latest_snapshot(&app, "engage").await.unwrap();
    assert_eq!(rows, canonical(sim.engage_ground_truth()));
    assert_eq!(
        engage_pages(&project),
        [(0, 200), (1, 200), (0, 200), (1, 200), (2, 200)]
    );

    // One cohort's listing short of its total: the error names the table and the cohort.
    let cohort = sim.cohort_ids()[0];
    sim.push_fault(FaultRule {
        path: "/api/2.0/engage".into(),
        from_date: None,
        times: 1,
        covering: None,
        wider_than: None,
        holding: None,
        param: None,
        fault: Fault::Status {
            status: 200,
            body: r#"{"page":0,"page_size":1000,"session_id":"1-X","status":"ok","total":5,"results":[{"$distinct_id":"a"}]}"#.into(),
        },
    });
    let r = handler::handle(&app, json!({"table": "cohort_members"}), deadline(60))
        .await
        .unwrap();
    assert_eq!((r.status, r.failed), (Status::Partial, 1), "{r:?}");
    let reason = r.reason.unwrap();
    assert!(
        reason.contains(&format!(
            "BadResponse: the cohort_members listing of cohort {cohort} ended after 1 of the 5 profiles"
        )),
        "{reason}"
    );
    assert!(read_latest_snapshot(&app, "cohort_members").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_refused_on_a_later_page_restarts_the_listing_once_then_the_slice_fails() {
    let mut cfg = sim_config("UTC", 1, 10);
    cfg.profiles = 2500;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let expired = || Fault::Status {
        status: 400,
        body: r#"{"error": "Invalid session_id: session expired", "status": "error"}"#.into(),
    };
    // Page 0, then an expired session on page 1; again after the restart.
    for fault in [
        Fault::SlowFirstByte {
            delay: Duration::ZERO,
        },
        expired(),
        Fault::SlowFirstByte {
            delay: Duration::ZERO,
        },
        expired(),
    ] {
        sim.push_fault(FaultRule {
            path: "/api/2.0/engage".into(),
            from_date: None,
            times: 1,
            covering: None,
            wider_than: None,
            holding: None,
            param: None,
            fault,
        });
    }
    // A failed attempt is tried again at once here (no backoff).
    let (_dir, app) = project
        .temp_app(&[("SLICE_RETRY_BACKOFF_SECONDS", "0")])
        .await;
    // A scheduled invocation records the failure on the slice and answers `partial`.
    let r = handler::handle(&app, json!({"table": "engage"}), deadline(60))
        .await
        .unwrap();
    assert_eq!((r.status, r.failed), (Status::Partial, 1), "{r:?}");
    let reason = r.reason.unwrap();
    assert!(reason.contains("BadResponse: "), "{reason}");
    assert!(
        reason.contains("refused the session again on page 1 after the listing had restarted once"),
        "{reason}"
    );
    assert_eq!(
        engage_pages(&project),
        [(0, 200), (1, 400), (0, 200), (1, 400)]
    );
    assert!(read_latest_snapshot(&app, "engage").await.is_none());
    // The slice's next attempt lists from page 0 and completes.
    let r = handler::handle(&app, json!({"table": "engage"}), deadline(60))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    let (_, rows) = read_latest_snapshot(&app, "engage").await.unwrap();
    assert_eq!(rows, canonical(sim.engage_ground_truth()));
    assert_eq!(engage_pages(&project)[4..], [(0, 200), (1, 200), (2, 200)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eighty_funnels_under_a_60_request_budget_commit_each_day_exactly_within_a_few_invocations()
{
    const WINDOW_SECS: u64 = 8;
    let mut cfg = sim_config("UTC", 3, 10);
    cfg.funnels = 80;
    // Mixpanel's own limit, scaled down in time: a 429 would show in the request log.
    cfg.rate_limit = Some(RateLimit {
        requests: 60,
        window: Duration::from_secs(WINDOW_SECS),
    });
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let window = WINDOW_SECS.to_string();
    let (_dir, app) = project
        .temp_app(&[
            ("MIXPANEL_QUERY_REQUESTS_PER_WINDOW", "60"),
            ("MIXPANEL_RATE_WINDOW_SECONDS", &window),
        ])
        .await;
    let mut answers = Vec::new();
    let mut productive = 0;
    loop {
        let before = sim.requests().len();
        // Shorter than the window: an invocation cannot wait for the budget to come back.
        let r = handler::handle(&app, json!({"table": "funnels"}), deadline(5))
            .await
            .unwrap();
        if sim.requests().len() > before {
            productive += 1;
        }
        answers.push((r.status, r.reason.clone()));
        match r.status {
            Status::Done => break,
            Status::Partial => tokio::time::sleep(Duration::from_millis(250)).await,
            other => panic!("unexpected {other:?}: {r:?} after {answers:?}"),
        }
        assert!(answers.len() < 200, "funnels never finished: {answers:?}");
    }
    let first_reason = answers[0].1.as_deref().unwrap_or_default();
    assert_eq!(answers[0].0, Status::Partial, "{answers:?}");
    assert!(
        first_reason.contains("of 80 funnels fetched"),
        "{first_reason}"
    );
    assert!(productive <= 4, "{productive} invocations: {answers:?}");
    let requests = sim.requests();
    assert!(
        requests.iter().all(|r| r.status == 200),
        "never beyond the budget"
    );
    let count = |path: &str| requests.iter().filter(|r| r.path == path).count();
    // One list and one query per funnel for the whole window, each funnel resumed from where it
    // stopped: only a request the deadline cut short (at most one per stopped invocation) is
    // asked again.
    let stopped = answers.len() - 1;
    assert_eq!(count("/api/2.0/funnels/list"), 1);
    let asked = count("/api/2.0/funnels");
    assert!(
        (80..=80 + stopped).contains(&asked),
        "{asked} funnel queries for 80 funnels over {stopped} stopped invocations"
    );
    let ids: std::collections::BTreeSet<u64> = requests
        .iter()
        .filter(|r| r.path == "/api/2.0/funnels")
        .filter_map(|r| query_param(&r.query, "funnel_id")?.parse().ok())
        .collect();
    assert_eq!(
        ids,
        sim.funnel_ids()
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
    );
    for day in days(sim.config().first_day, today_in("UTC")) {
        let (manifest, rows) = read_manifest_rows(&app.sink, &format!("funnels/date={day}"))
            .await
            .unwrap_or_else(|| panic!("funnels {day} was not committed"));
        assert_eq!(rows, canonical(sim.funnels_ground_truth(day)), "{day}");
        if !rows.is_empty() {
            assert_eq!(rows.len(), 80);
            assert!(manifest.files.len() >= 2, "{manifest:?}");
        }
    }
    let slices = app.store.slices(Table::Funnels).await.unwrap();
    assert!(slices.iter().all(|s| s.progress.is_none()), "{slices:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engage_with_pending_funnels_stops_at_half_the_window_and_funnels_then_run() {
    let mut cfg = sim_config("UTC", 2, 10);
    cfg.profiles = 14_500;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (_dir, app) = project
        .temp_app(&[
            ("MIXPANEL_QUERY_REQUESTS_PER_WINDOW", "20"),
            ("MIXPANEL_RATE_WINDOW_SECONDS", "600"),
        ])
        .await;
    // Funnels have days queued: they wait for the same query budget.
    let now = jiff::Timestamp::now();
    mixpanel_replicator::plan::queue_table(app.store.as_ref(), &app.settings, Table::Funnels, now)
        .await
        .unwrap();
    let r = handler::handle(&app, json!({"table": "engage"}), deadline(30))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Partial, "{r:?}");
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("engage has used its share of the Mixpanel query budget (10 of 20"),
        "{r:?}"
    );
    assert_eq!(engage_pages(&project).len(), 10);
    assert!(read_latest_snapshot(&app, "engage").await.is_none());
    // The other half is there for funnels.
    let r = handler::handle(&app, json!({"table": "funnels"}), deadline(30))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    for day in days(sim.config().first_day, today_in("UTC")) {
        let (_, rows) = read_manifest_rows(&app.sink, &format!("funnels/date={day}"))
            .await
            .unwrap();
        assert_eq!(rows, canonical(sim.funnels_ground_truth(day)), "{day}");
    }
    // Nothing else waits now: engage takes what is left of the window and completes.
    let r = handler::handle(&app, json!({"table": "engage"}), deadline(30))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    let (_, rows) = read_latest_snapshot(&app, "engage").await.unwrap();
    assert_eq!(rows, canonical(sim.engage_ground_truth()));
    assert_eq!(
        engage_pages(&project),
        (0..15).map(|p| (p, 200)).collect::<Vec<_>>(),
        "pages of 1,000, the last one of 500"
    );
    assert!(sim.requests().iter().all(|r| r.status == 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_api_annotations_are_asked_with_camel_case_dates_and_kept_as_returned() {
    let mut cfg = sim_config("Europe/Berlin", 3, 10);
    cfg.service_account = Some(ServiceAccount {
        username: "replicator.abc123.mp-service-account".into(),
        secret: "sa-secret-xyz".into(),
        project_id: 4242,
    });
    let first = cfg.first_day;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (_dir, app) = project
        .temp_app(&[
            (
                "MIXPANEL_SERVICE_ACCOUNT_USERNAME",
                "replicator.abc123.mp-service-account",
            ),
            ("MIXPANEL_SERVICE_ACCOUNT_SECRET", "sa-secret-xyz"),
            ("MIXPANEL_PROJECT_ID", "4242"),
        ])
        .await;
    let r = handler::handle(&app, json!({"table": "annotations"}), deadline(60))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    let (_, rows) = read_latest_snapshot(&app, "annotations").await.unwrap();
    let truth = sim.app_annotations_ground_truth();
    assert_eq!(rows, canonical(truth.clone()));
    // Dates come back with the project's offset, and are kept so.
    assert!(
        truth
            .iter()
            .all(|a| a["date"].as_str().unwrap().ends_with(":00+01:00")
                || a["date"].as_str().unwrap().ends_with(":00+02:00")),
        "{truth:?}"
    );
    let asked: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/app/projects/4242/annotations")
        .collect();
    assert_eq!(asked.len(), 1);
    let today = today_in("Europe/Berlin");
    let params = query_params(&asked[0].query);
    assert!(
        params.contains(&("fromDate".into(), first.to_string()))
            && params.contains(&("toDate".into(), today.to_string()))
            && !params
                .iter()
                .any(|(k, _)| k == "from_date" || k == "to_date"),
        "{params:?}"
    );
}

/// The `event` parameters of the `events/properties/top` requests, in order (`None`: without).
fn property_requests(project: &Project) -> Vec<(Option<String>, u16)> {
    project
        .simulator()
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/2.0/events/properties/top")
        .map(|r| (query_param(&r.query, "event"), r.status))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_asks_per_event_when_the_properties_endpoint_requires_an_event() {
    let mut cfg = sim_config("UTC", 2, 100);
    cfg.event_properties_require_event = true;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let day = sim.config().first_day;
    let names = sim.event_names();
    assert!(names.len() >= 3, "{names:?}");
    let (_dir, app) = project
        .temp_app(&[("MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT", "false")])
        .await;
    let r = handle_export_day(&app, day, deadline(60)).await.unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    // Without `event`: 400; then the names from events/names, one request each.
    let mut expected = vec![(None, 400)];
    expected.extend(names.iter().map(|n| (Some(n.clone()), 200)));
    assert_eq!(property_requests(&project), expected);
    let listed = sim
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/2.0/events/names")
        .collect::<Vec<_>>();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].query.contains("type=general"), "{:?}", listed[0]);
    let schema = app.store.schema(Table::Export).await.unwrap().unwrap();
    for column in ["mp_reserved_insert_id", "mp_processing_time_ms", "mp_lib"] {
        assert!(schema.columns.contains_key(column), "{column}: {schema:?}");
    }

    // With MIXPANEL_EXPORT_EVENTS, those names are asked, and events/names is not.
    let before = sim.requests().len();
    let chosen = format!("{},{}", names[0], names[1]);
    let (_dir2, app) = project
        .temp_app(&[
            ("MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT", "false"),
            ("MIXPANEL_EXPORT_EVENTS", &chosen),
        ])
        .await;
    let r = handle_export_day(&app, day, deadline(60)).await.unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    let later: Vec<_> = sim.requests().into_iter().skip(before).collect();
    let asked: Vec<Option<String>> = later
        .iter()
        .filter(|r| r.path == "/api/2.0/events/properties/top")
        .map(|r| query_param(&r.query, "event"))
        .collect();
    assert_eq!(
        asked,
        [None, Some(names[0].clone()), Some(names[1].clone())]
    );
    assert!(!later.iter().any(|r| r.path == "/api/2.0/events/names"));
}
