//! The six other tables end to end against the simulator, locally and on moto.

mod support;

use mixpanel_replicator::cli::sync;
use mixpanel_replicator::handler::{self, Status};
use mixpanel_replicator::tables::Table;
use serde_json::json;
use support::harness::*;

fn deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(120)
}

async fn assert_all_tables_exact(app: &mixpanel_replicator::app::App, project: &Project) {
    let sim = project.simulator();
    let first = sim.config().first_day;
    let today = today_in(&sim.config().timezone);
    for (table, truth) in [
        ("engage", sim.engage_ground_truth()),
        ("cohorts", sim.cohorts_ground_truth()),
        ("cohort_members", sim.cohort_members_ground_truth()),
        ("annotations", sim.annotations_ground_truth()),
    ] {
        let (_, rows) = read_latest_snapshot(app, table)
            .await
            .unwrap_or_else(|| panic!("{table} has no snapshot"));
        let truth = canonical(truth);
        assert!(!truth.is_empty(), "{table} ground truth is empty");
        assert_eq!(rows.len(), truth.len(), "{table} rows");
        assert_eq!(rows, truth, "{table}");
    }
    for day in days(first, today) {
        for (table, truth) in [
            ("funnels", sim.funnels_ground_truth(day)),
            ("revenue", sim.revenue_ground_truth(day)),
        ] {
            let base = if app.prefix.is_empty() {
                String::new()
            } else {
                format!("{}/", app.prefix)
            };
            let (_, rows) = read_manifest_rows(&app.sink, &format!("{base}{table}/date={day}"))
                .await
                .unwrap_or_else(|| panic!("{table} {day} was not committed"));
            assert_eq!(rows, canonical(truth), "{table} {day}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_without_tables_replicates_all_seven_exactly_into_a_local_folder() {
    let cfg = sim_config("UTC", 6, 100);
    let project = Project::start(cfg).await;
    let (dir, app) = project
        .temp_app(&[("MIXPANEL_DATE_WINDOW_DAYS", "3")])
        .await;
    let report = sync(&app, &[]).await.unwrap();
    assert_eq!((report.failed, report.skipped.len()), (0, 0), "{report:?}");
    assert_all_tables_exact(&app, &project).await;
    assert_exact(
        &app,
        project.simulator(),
        project.simulator().config().first_day,
        today_in("UTC"),
        None,
    )
    .await;
    // Funnels: one query per funnel per window of three days (7 days → 3 windows).
    let funnel_queries = project
        .simulator()
        .requests()
        .iter()
        .filter(|r| r.path == "/api/2.0/funnels")
        .count();
    assert_eq!(funnel_queries, project.simulator().funnel_ids().len() * 3);
    // Every table has a schema file next to its data.
    for table in Table::ALL {
        let schema: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join(format!("{table}/_schema.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(schema["table"], table.as_str());
        assert!(
            !schema["columns"].as_array().unwrap().is_empty(),
            "{schema}"
        );
    }
    let cohorts: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("cohorts/_schema.json")).unwrap())
            .unwrap();
    assert!(
        cohorts["columns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "id" && c["type"] == "integer"),
        "{cohorts}"
    );
}

/// On S3 in zstd (gzip on S3 is the export tests' default): every table's parts, the streamed
/// snapshots, the whole-body date partitions and the export's parts, read back exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_seven_tables_replicate_exactly_into_s3_as_zstd() {
    all_seven_tables_into_s3("zstd", "jsonl.zst", "application/zstd").await;
}

/// The same uncompressed (`OUTPUT_COMPRESSION=none`): `.jsonl` parts, read back as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_seven_tables_replicate_exactly_into_s3_uncompressed() {
    all_seven_tables_into_s3("none", "jsonl", "application/x-ndjson").await;
}

async fn all_seven_tables_into_s3(compression: &str, extension: &str, content_type: &str) {
    let cfg = sim_config("UTC", 3, 60);
    let project = Project::start(cfg).await;
    let bucket = format!("all-tables-{compression}");
    let (aws, app) = aws_app(
        &project,
        &bucket,
        "all-state",
        "creds",
        &[("OUTPUT_COMPRESSION", compression)],
    )
    .await;
    let report = sync(&app, &[]).await.unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    assert_all_tables_exact(&app, &project).await;
    assert_exact(
        &app,
        project.simulator(),
        project.simulator().config().first_day,
        today_in("UTC"),
        None,
    )
    .await;
    assert_layout(&app).await;
    for table in Table::ALL {
        let parts = aws
            .assert_part_headers(
                &bucket,
                &format!("{}/{table}", app.prefix),
                extension,
                content_type,
            )
            .await;
        assert!(parts > 0, "{table} has no part");
    }
}

/// A rule for the next `times` engage pages: answered as they are, or held at `gate`.
fn engage_pages(times: u32, gate: Option<&mixpanel_sim::Gate>) -> mixpanel_sim::FaultRule {
    let fault = match gate {
        Some(gate) => mixpanel_sim::Fault::Held { gate: gate.clone() },
        // A rule that changes nothing: it counts the pages before the next rule.
        None => mixpanel_sim::Fault::SlowFirstByte {
            delay: std::time::Duration::ZERO,
        },
    };
    mixpanel_sim::FaultRule::new("/api/2.0/engage", times, fault)
}

/// The `page` of each engage request answered 200, from index `from` of the request log.
fn pages_read(sim: &mixpanel_sim::Simulator, from: usize) -> Vec<u64> {
    sim.requests()
        .into_iter()
        .skip(from)
        .filter(|r| r.path == "/api/2.0/engage" && r.status == 200)
        .filter_map(|r| {
            r.query
                .split('&')
                .find_map(|kv| kv.strip_prefix("page="))
                .and_then(|p| p.parse().ok())
        })
        .collect()
}

// Where an invocation stops does not rest on how fast the machine is: Mixpanel holds the page
// at which it must stop ([`mixpanel_sim::Fault::Held`]) until the invocation has answered, so
// its deadline certainly comes while that page is asked; the pages before it take a fraction
// of the seconds it has. The held page is never answered (its gate stays shut): each
// invocation's pages are exactly those the log shows answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engage_of_100k_profiles_resumes_across_many_short_invocations_and_survives_an_expired_session()
 {
    let mut cfg = sim_config("UTC", 1, 10);
    cfg.profiles = 100_000;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    let (_dir, app) = project.temp_app(&[]).await;
    // Pages 5, 10 and 15 are held the first time they are asked.
    let gates = [(); 3].map(|_| mixpanel_sim::Gate::new());
    for gate in &gates {
        sim.push_fault(engage_pages(5, None));
        sim.push_fault(engage_pages(1, Some(gate)));
    }
    let short = || tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    for (i, gate) in gates.iter().enumerate() {
        let seen = sim.requests().len();
        let r = handler::handle(&app, json!({"table": "engage"}), short())
            .await
            .unwrap();
        assert_eq!(r.status, Status::Partial, "{r:?}");
        // Each invocation goes on from the page the previous one saved, up to its held page.
        let from = 5 * i as u64;
        assert_eq!(pages_read(sim, seen), (from..from + 5).collect::<Vec<_>>());
        assert_eq!(gate.held(), 1);
        // No half snapshot is ever visible.
        assert!(read_latest_snapshot(&app, "engage").await.is_none());
    }
    // Mixpanel forgets the session: page 15 is refused, and the listing restarts once, from
    // page 0, in the same invocation.
    sim.expire_engage_sessions();
    let seen = sim.requests().len();
    let r = handler::handle(&app, json!({"table": "engage"}), deadline())
        .await
        .unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    assert_eq!(pages_read(sim, seen), (0..=100).collect::<Vec<_>>());
    let (_, rows) = read_latest_snapshot(&app, "engage").await.unwrap();
    assert_eq!(rows.len(), 100_000);
    assert_eq!(rows, canonical(sim.engage_ground_truth()));
    let refused: Vec<_> = sim
        .requests()
        .into_iter()
        .skip(seen)
        .filter(|r| r.status == 400)
        .collect();
    assert_eq!(refused.len(), 1, "one expired session, one clean restart");
    assert!(refused[0].query.contains("page=15"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_without_engage_skips_it_and_the_other_tables_replicate() {
    let mut cfg = sim_config("UTC", 2, 30);
    cfg.plan_excludes = vec!["engage".into()];
    let project = Project::start(cfg).await;
    let (_dir, app) = project.temp_app(&[]).await;
    let r = handler::handle(&app, json!({"table": "engage"}), deadline())
        .await
        .unwrap();
    assert_eq!(r.status, Status::Skipped);
    assert!(
        r.reason.as_deref().unwrap().contains("plan does not allow"),
        "{r:?}"
    );
    let report = sync(&app, &[]).await.unwrap();
    // cohort_members is read through engage, so the plan excludes it too.
    assert_eq!(report.skipped, ["cohort_members", "engage"]);
    assert_eq!(report.failed, 0);
    assert!(read_latest_snapshot(&app, "engage").await.is_none());
    let (_, rows) = read_latest_snapshot(&app, "cohorts").await.unwrap();
    assert_eq!(rows, canonical(project.simulator().cohorts_ground_truth()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eu_project_skips_revenue_with_an_explanation() {
    let mut cfg = sim_config("UTC", 2, 30);
    cfg.eu_revenue_400 = true;
    let project = Project::start(cfg).await;
    let (_dir, app) = project.temp_app(&[("MIXPANEL_REGION", "eu")]).await;
    let r = handler::handle(&app, json!({"table": "revenue"}), deadline())
        .await
        .unwrap();
    assert_eq!(r.status, Status::Skipped, "{r:?}");
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("EU servers do not serve engage/revenue"),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn funnels_rerun_their_attribution_window_and_snapshots_keep_the_retention() {
    let cfg = sim_config("UTC", 8, 30);
    let project = Project::start(cfg).await;
    let extra = [
        ("MIXPANEL_REFRESH_MINUTES", "0"),
        ("MIXPANEL_ATTRIBUTION_WINDOW_DAYS", "2"),
        ("SNAPSHOT_RETENTION", "2"),
    ];
    let (_dir, app) = project.temp_app(&extra).await;
    sync(&app, &[Table::Funnels, Table::Cohorts]).await.unwrap();
    let before = project.simulator().requests().len();
    // A second run re-reads only the window (today and the two days before) and re-snapshots.
    let report = sync(&app, &[Table::Funnels, Table::Cohorts]).await.unwrap();
    assert_eq!(report.failed, 0);
    let second: Vec<_> = project
        .simulator()
        .requests()
        .into_iter()
        .skip(before)
        .collect();
    let today = today_in("UTC");
    let from = minus(today, 2).to_string();
    assert!(
        second
            .iter()
            .filter(|r| r.path == "/api/2.0/funnels")
            .all(|r| r.query.contains(&format!("from_date={from}"))),
        "{second:?}"
    );
    assert_all_funnels_exact(&app, &project).await;
    // Three snapshots of cohorts were made over three runs; two are kept.
    sync(&app, &[Table::Cohorts]).await.unwrap();
    let snapshots: std::collections::BTreeSet<String> = app
        .sink
        .list("cohorts/")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|o| {
            o.key
                .split('/')
                .nth(1)
                .filter(|f| f.starts_with("snapshot="))
                .map(String::from)
        })
        .collect();
    assert_eq!(snapshots.len(), 2, "{snapshots:?}");
    // The latest of them is the one published, and exact.
    let (latest, rows) = read_latest_snapshot(&app, "cohorts").await.unwrap();
    assert_eq!(
        Some(latest.as_str()),
        snapshots.last().map(String::as_str),
        "{snapshots:?}"
    );
    assert_eq!(rows, canonical(project.simulator().cohorts_ground_truth()));
}

async fn assert_all_funnels_exact(app: &mixpanel_replicator::app::App, project: &Project) {
    let sim = project.simulator();
    for day in days(sim.config().first_day, today_in("UTC")) {
        let (_, rows) = read_manifest_rows(&app.sink, &format!("funnels/date={day}"))
            .await
            .unwrap();
        assert_eq!(
            rows,
            canonical(sim.funnels_ground_truth(day)),
            "funnels {day}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_select_properties_off_engage_keeps_the_properties_known_at_first_discovery() {
    let cfg = sim_config("UTC", 1, 10);
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    // First discovery asks Mixpanel which properties exist, and keeps them all.
    let (_dir, app) = project
        .temp_app(&[("MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT", "false")])
        .await;
    sync(&app, &[Table::Engage]).await.unwrap();
    assert!(
        sim.requests()
            .iter()
            .any(|r| r.path == "/api/2.0/engage/properties")
    );
    let (_, rows) = read_latest_snapshot(&app, "engage").await.unwrap();
    assert_eq!(rows, canonical(sim.engage_ground_truth()));
    let stored = app.store.schema(Table::Engage).await.unwrap().unwrap();
    assert!(
        stored.columns.contains_key("mp_reserved_email"),
        "{stored:?}"
    );

    // A table first discovered with fewer properties keeps only those.
    let (_dir, app) = project
        .temp_app(&[("MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT", "false")])
        .await;
    let mut known = mixpanel_replicator::state::Schema::default();
    known.columns.insert("distinct_id".into(), "string".into());
    known
        .columns
        .insert("mp_reserved_email".into(), "string".into());
    app.store.init_schema(Table::Engage, &known).await.unwrap();
    sync(&app, &[Table::Engage]).await.unwrap();
    let (_, rows) = read_latest_snapshot(&app, "engage").await.unwrap();
    let expected = canonical_keeping(sim.engage_ground_truth(), |k| {
        k == "distinct_id" || k == "mp_reserved_email"
    });
    assert_eq!(rows, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engage_page_slower_than_the_deadline_answers_partial_on_time_and_resumes() {
    let mut cfg = sim_config("UTC", 1, 10);
    cfg.profiles = 2500;
    let project = Project::start(cfg).await;
    let sim = project.simulator();
    // Page 0 at once; page 1 is never answered (its gate stays shut).
    let gate = mixpanel_sim::Gate::new();
    sim.push_fault(engage_pages(1, None));
    sim.push_fault(engage_pages(1, Some(&gate)));
    let (_dir, app) = project.temp_app(&[]).await;
    let short = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    // The invocation answers by its deadline without Mixpanel's answer: waiting for it would
    // never end (the bound below is only there so that a hang fails rather than blocks).
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        handler::handle(&app, json!({"table": "engage"}), short),
    )
    .await
    .expect("answered by its deadline, though page 1 never came")
    .unwrap();
    assert_eq!(r.status, Status::Partial, "{r:?}");
    assert_eq!(gate.held(), 1);
    assert!(!gate.is_open());
    assert_eq!(pages_read(sim, 0), [0]);
    let seen = sim.requests().len();
    let r = handler::handle(&app, json!({"table": "engage"}), deadline())
        .await
        .unwrap();
    assert_eq!(r.status, Status::Done, "{r:?}");
    let (_, rows) = read_latest_snapshot(&app, "engage").await.unwrap();
    assert_eq!(rows, canonical(sim.engage_ground_truth()));
    // The second invocation resumed at page 1 of the saved session: page 0 was read once.
    assert_eq!(pages_read(sim, seen), [1, 2]);
}
