//! The Query API (and the App API annotations) over real HTTP on loopback.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::*;
use mixpanel_sim::{Fault, FaultRule, ServiceAccount, SimConfig, Simulator};
use serde_json::{Map, Value, json};

async fn get(url: &str, path: &str, params: &[(&str, String)]) -> reqwest::Response {
    raw_client()
        .get(format!("{url}{path}"))
        .query(params)
        .header("Authorization", basic(SECRET))
        .send()
        .await
        .unwrap()
}

async fn get_json(url: &str, path: &str, params: &[(&str, String)]) -> (u16, Value) {
    let r = get(url, path, params).await;
    let status = r.status().as_u16();
    let body = r.bytes().await.unwrap();
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&body)));
    (status, v)
}

fn range(sim: &Simulator) -> Vec<(&'static str, String)> {
    let first = sim.config().first_day;
    let last = add_days(first, sim.config().days as i64 - 1);
    vec![
        ("from_date", first.to_string()),
        ("to_date", last.to_string()),
    ]
}

/// What a correct replicator makes of one engage result, computed independently.
fn engage_row(result: &Value) -> Value {
    let mut row = Map::new();
    row.insert("distinct_id".into(), result["$distinct_id"].clone());
    for (k, v) in result["$properties"].as_object().unwrap() {
        let k = k
            .strip_prefix('$')
            .map_or(k.clone(), |r| format!("mp_reserved_{r}"));
        row.insert(k, v.clone());
    }
    Value::Object(row)
}

/// Pages through engage to the end (a page shorter than page_size); returns the results and
/// whether `total` was present on each page.
async fn page_through(
    url: &str,
    path: &str,
    page_size: u64,
    extra: &[(&str, String)],
) -> (Vec<Value>, Vec<Option<u64>>) {
    let mut results = Vec::new();
    let mut totals = Vec::new();
    let mut session: Option<String> = None;
    for page in 0.. {
        let mut q: Vec<(&str, String)> = extra.to_vec();
        q.push(("page_size", page_size.to_string()));
        q.push(("page", page.to_string()));
        if let Some(s) = &session {
            q.push(("session_id", s.clone()));
        }
        let (status, v) = get_json(url, path, &q).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["status"], "ok");
        assert_eq!(v["page"], page);
        assert_eq!(v["page_size"], page_size);
        let sid = v["session_id"].as_str().unwrap().to_string();
        if let Some(s) = &session {
            assert_eq!(&sid, s, "the session carries over");
        }
        session = Some(sid);
        totals.push(v.get("total").map(|t| t.as_u64().unwrap()));
        let page_results = v["results"].as_array().unwrap();
        results.extend(page_results.iter().cloned());
        if (page_results.len() as u64) < page_size {
            break;
        }
    }
    (results, totals)
}

#[tokio::test]
async fn engage_pages_to_the_end_and_matches_ground_truth() {
    let sim = Simulator::new(recent(11, 10));
    let srv = sim.serve(0).await.unwrap();
    let truth = sim.engage_ground_truth();
    assert_eq!(truth.len(), 300);

    // 300 = 3 x 100: the listing ends with an empty page; total only on even pages.
    let (results, totals) = page_through(&srv.url(), "/api/2.0/engage", 100, &[]).await;
    assert_eq!(totals, vec![Some(300), None, Some(300), None]);
    let rows: Vec<Value> = results.iter().map(engage_row).collect();
    assert_eq!(rows, truth, "stable order, exact rows");

    // 300 = 250 + 50: ends with a short page.
    let (results, totals) = page_through(&srv.url(), "/api/query/engage", 250, &[]).await;
    assert_eq!(totals, vec![Some(300), None]);
    assert_eq!(results.iter().map(engage_row).collect::<Vec<_>>(), truth);

    // Default page size: 1000.
    let (status, v) = get_json(&srv.url(), "/api/2.0/engage", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(v["page_size"], 1000);
    assert_eq!(v["results"].as_array().unwrap().len(), 300);

    // The data is as awkward as the export's.
    let ids: Vec<&str> = truth
        .iter()
        .map(|r| r["distinct_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
    assert!(ids.iter().any(|i| i.contains('/') && i.contains(' ')));
    assert!(ids.iter().any(|i| i.contains('🚀')));
    let all_keys: HashSet<&str> = truth
        .iter()
        .flat_map(|r| r.as_object().unwrap().keys().map(String::as_str))
        .collect();
    for k in [
        "mp_reserved_email",
        "mp_reserved_created",
        "mp_reserved_last_seen",
        "mp_reserved_city",
        "mp_reserved_transactions",
        "mp_reserved_custom_dollar",
        "Total Spent",
        "u64_max",
        "nested",
        "control_chars",
    ] {
        assert!(all_keys.contains(k), "{k}");
    }
    assert!(truth.iter().any(|r| r.as_object().unwrap().len() == 1));
    let first = &truth[0];
    assert_eq!(first["external_id_big"], json!(9_007_199_254_740_993u64));
    assert!(
        first["mp_reserved_created"]
            .as_str()
            .unwrap()
            .chars()
            .nth(10)
            == Some('T')
    );
    assert!(first["score"].is_f64());
    assert!(first["mp_reserved_transactions"][0]["$amount"].is_f64());
}

#[tokio::test]
async fn engage_sessions_and_bad_parameters() {
    let sim = Simulator::new(SimConfig {
        engage_session_ttl: Duration::from_millis(300),
        ..recent(12, 10)
    });
    let srv = sim.serve(0).await.unwrap();
    let url = srv.url();
    let path = "/api/2.0/engage";
    let q = |page: u64, session: Option<&str>| {
        let mut q = vec![("page_size", "10".to_string()), ("page", page.to_string())];
        if let Some(s) = session {
            q.push(("session_id", s.to_string()));
        }
        q
    };

    // page > 0 without a session.
    let (status, v) = get_json(&url, path, &q(1, None)).await;
    assert_eq!(status, 400);
    assert_eq!(v["status"], "error");
    assert!(v["error"].as_str().unwrap().contains("session_id"));

    // Unknown session.
    let (status, v) = get_json(&url, path, &q(1, Some("1234567890-EXAMPL"))).await;
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("session_id"));

    // The TTL runs from the session's creation.
    let (_, v) = get_json(&url, path, &q(0, None)).await;
    let sid = v["session_id"].as_str().unwrap().to_string();
    let (status, _) = get_json(&url, path, &q(1, Some(&sid))).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (status, v) = get_json(&url, path, &q(2, Some(&sid))).await;
    assert_eq!(status, 400);
    assert_eq!(
        v,
        json!({"error": "Invalid session_id: session expired", "status": "error"})
    );

    // expire_engage_sessions: every session handed out so far is expired now.
    let (_, v) = get_json(&url, path, &q(0, None)).await;
    let sid = v["session_id"].as_str().unwrap().to_string();
    sim.expire_engage_sessions();
    let (status, v) = get_json(&url, path, &q(1, Some(&sid))).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"], "Invalid session_id: session expired");
    // A new listing works.
    let (status, v) = get_json(&url, path, &q(0, None)).await;
    assert_eq!(status, 200);
    assert_ne!(v["session_id"].as_str().unwrap(), sid);

    for bad in [
        vec![("page_size", "0".to_string())],
        vec![("page_size", "1001".to_string())],
        vec![("page_size", "ten".to_string())],
        vec![("page", "-1".to_string())],
        vec![("filter_by_cohort", "{\"id\": 999999}".to_string())],
        vec![("filter_by_cohort", "not json".to_string())],
        vec![("output_properties", "$email".to_string())],
    ] {
        let (status, v) = get_json(&url, path, &bad).await;
        assert_eq!(status, 400, "{bad:?}");
        assert!(v["error"].is_string());
    }

    // A `where` of the form properties["NAME"] OP VALUE filters (include_all_users is
    // accepted and ignored); any other expression is a 400 that names `where`.
    let with = |w: &str| {
        vec![
            ("where", w.to_string()),
            ("include_all_users", "true".into()),
        ]
    };
    let (status, v) = get_json(&url, path, &with(r#"properties["$email"] == "a@b.c""#)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["total"], 0);
    let (status, v) = get_json(&url, path, &with(r#"properties["login_count"] >= 0"#)).await;
    assert_eq!(status, 200, "{v}");
    let with_logins = sim
        .engage_ground_truth()
        .iter()
        .filter(|r| r["login_count"].is_number())
        .count();
    assert_eq!(v["total"], with_logins as u64);
    for w in [
        r#"defined(properties["$last_seen"])"#,
        "user[\"$city\"] in [\"Zürich\"] and not defined(user[\"x\"])",
    ] {
        let (status, v) = get_json(&url, path, &with(w)).await;
        assert_eq!(status, 400, "{w}");
        assert_eq!(v["status"], "error");
        assert!(v["error"].as_str().unwrap().contains("'where'"), "{v}");
    }
}

#[tokio::test]
async fn cohorts_and_members() {
    let sim = Simulator::new(recent(13, 10));
    let srv = sim.serve(0).await.unwrap();
    let url = srv.url();

    let (status, list) = get_json(&url, "/api/2.0/cohorts/list", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(list, Value::Array(sim.cohorts_ground_truth()));
    let ids: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, sim.cohort_ids());
    assert_eq!(ids.len(), 4);
    for c in list.as_array().unwrap() {
        for k in [
            "count",
            "is_visible",
            "description",
            "created",
            "project_id",
            "id",
            "name",
            "data_group_id",
        ] {
            assert!(c.get(k).is_some(), "{k} in {c}");
        }
        assert!(c["data_group_id"].is_null());
        assert_eq!(c["created"].as_str().unwrap().len(), 19);
    }
    // POST works too.
    let r = raw_client()
        .post(format!("{url}/api/query/cohorts/list"))
        .header("Authorization", basic(SECRET))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).unwrap(),
        list
    );

    let mut want: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for m in sim.cohort_members_ground_truth() {
        assert_eq!(m.as_object().unwrap().len(), 2);
        want.entry(m["cohort_id"].as_u64().unwrap())
            .or_default()
            .push(m["distinct_id"].as_str().unwrap().to_string());
    }
    let mut membership: HashMap<String, usize> = HashMap::new();
    for c in list.as_array().unwrap() {
        let id = c["id"].as_u64().unwrap();
        let (results, totals) = page_through(
            &url,
            "/api/2.0/engage",
            40,
            &[
                ("filter_by_cohort", format!("{{\"id\": {id}}}")),
                ("include_all_users", "false".into()),
            ],
        )
        .await;
        let got: Vec<String> = results
            .iter()
            .map(|r| r["$distinct_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            got,
            want.get(&id).cloned().unwrap_or_default(),
            "cohort {id}"
        );
        assert_eq!(c["count"].as_u64().unwrap(), got.len() as u64);
        assert_eq!(totals[0], Some(got.len() as u64));
        for g in got {
            *membership.entry(g).or_default() += 1;
        }
    }
    assert!(
        list.as_array().unwrap().iter().any(|c| c["count"] == 0),
        "one cohort is empty"
    );
    assert!(membership.values().any(|n| *n >= 2), "overlapping cohorts");
    assert!(membership.len() < 300, "some profiles are in no cohort");
    // Members are full profiles: the same as in the unfiltered listing.
    let truth = sim.engage_ground_truth();
    let (first, _) = page_through(
        &url,
        "/api/2.0/engage",
        1000,
        &[("filter_by_cohort", format!("{{\"id\":\"{}\"}}", ids[0]))],
    )
    .await;
    let by_id: HashMap<&Value, &Value> = truth.iter().map(|r| (&r["distinct_id"], r)).collect();
    for r in &first {
        assert_eq!(&engage_row(r), by_id[&r["$distinct_id"]]);
    }
}

#[tokio::test]
async fn output_properties_and_request_forms_agree() {
    let sim = Simulator::new(recent(14, 10));
    let srv = sim.serve(0).await.unwrap();
    let url = srv.url();
    let c = raw_client();
    let cohort = sim.cohort_ids()[1];
    let props = r#"["$email","$last_seen","Total Spent","ключ"]"#;
    let params = vec![
        ("page_size", "50".to_string()),
        ("filter_by_cohort", format!("{{\"id\":{cohort}}}")),
        ("output_properties", props.to_string()),
    ];

    let r = get(&url, "/api/2.0/engage", &params).await;
    let via_get: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let results = via_get["results"].as_array().unwrap();
    assert_eq!(results.len(), 50);
    let allowed: HashSet<&str> = ["$email", "$last_seen", "Total Spent", "ключ"].into();
    for r in results {
        assert!(
            r["$properties"]
                .as_object()
                .unwrap()
                .keys()
                .all(|k| allowed.contains(k.as_str())),
            "{r}"
        );
    }
    assert!(
        results
            .iter()
            .any(|r| r["$properties"].get("$email").is_some())
    );

    let form = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&params)
        .finish();
    let r = c
        .post(format!("{url}/api/2.0/engage"))
        .header("Authorization", basic(SECRET))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let via_form: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();

    let body = json!({
        "page_size": 50,
        "filter_by_cohort": {"id": cohort},
        "output_properties": ["$email", "$last_seen", "Total Spent", "ключ"],
    });
    let r = c
        .post(format!("{url}/api/query/engage"))
        .header("Authorization", basic(SECRET))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let via_json: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();

    // Query string and form body mixed: the session of the first listing, page 1.
    let sid = via_get["session_id"].as_str().unwrap();
    let r = c
        .post(format!("{url}/api/2.0/engage?session_id={sid}&page=1"))
        .header("Authorization", basic(SECRET))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&params)
                .finish(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let page1: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(page1["session_id"], sid);
    assert!(page1.get("total").is_none());

    for v in [&via_form, &via_json] {
        assert_eq!(v["results"], via_get["results"]);
        assert_eq!(v["total"], via_get["total"]);
        assert_eq!(v["page_size"], 50);
    }
    assert_ne!(page1["results"], via_get["results"]);

    // The log keeps a parseable form of every request, JSON bodies included.
    let log = sim.requests();
    assert_eq!(log.len(), 4);
    assert!(
        log[2].query.contains("filter_by_cohort="),
        "{}",
        log[2].query
    );
    assert_eq!(log[2].method, "POST");
    assert_eq!(log[2].path, "/api/query/engage");

    // A broken JSON body is a 400.
    let r = c
        .post(format!("{url}/api/2.0/engage"))
        .header("Authorization", basic(SECRET))
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn many_profiles_page_through() {
    // 100,000 in release takes well under a second per direction; debug builds use fewer.
    let n: u32 = if cfg!(debug_assertions) {
        20_000
    } else {
        100_000
    };
    let sim = Simulator::new(SimConfig {
        profiles: n,
        ..recent(15, 10)
    });
    let srv = sim.serve(0).await.unwrap();
    let (results, totals) = page_through(&srv.url(), "/api/2.0/engage", 1000, &[]).await;
    assert_eq!(results.len(), n as usize);
    assert_eq!(totals.len(), n as usize / 1000 + 1);
    assert_eq!(totals[0], Some(n as u64));
    let ids: HashSet<&str> = results
        .iter()
        .map(|r| r["$distinct_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), n as usize);
}

#[tokio::test]
async fn funnels_match_ground_truth() {
    let sim = Simulator::new(recent(16, 10));
    let srv = sim.serve(0).await.unwrap();
    let url = srv.url();
    let first = sim.config().first_day;
    let last = add_days(first, 9);

    let (status, list) = get_json(&url, "/api/2.0/funnels/list", &[]).await;
    assert_eq!(status, 200);
    let ids: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["funnel_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, sim.funnel_ids());
    assert_eq!(ids.len(), 3);
    assert!(list[0]["name"].is_string());

    // A window reaching before the data: those days are absent.
    let from = add_days(first, -2);
    let mut rows: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for f in list.as_array().unwrap() {
        let id = f["funnel_id"].as_u64().unwrap();
        let (status, v) = get_json(
            &url,
            "/api/query/funnels",
            &[
                ("funnel_id", id.to_string()),
                ("from_date", from.to_string()),
                ("to_date", last.to_string()),
                ("unit", "day".into()),
            ],
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let dates: Vec<&str> = v["meta"]["dates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap())
            .collect();
        assert_eq!(dates.len(), 10);
        assert_eq!(dates[0], first.to_string());
        let data = v["data"].as_object().unwrap();
        assert_eq!(data.len(), 10);
        for (date, entry) in data {
            let steps = entry["steps"].as_array().unwrap();
            assert!(steps[0]["avg_time"].is_null());
            assert_eq!(entry["analysis"]["steps"], steps.len());
            rows.entry(date.clone()).or_default().push(json!({
                "funnel_id": id,
                "name": f["name"],
                "date": date,
                "steps": entry["steps"],
                "analysis": entry["analysis"],
            }));
        }
    }
    for n in -2..12 {
        let day = add_days(first, n);
        let truth = sim.funnels_ground_truth(day);
        assert_eq!(
            canon(&truth),
            canon(rows.get(&day.to_string()).map_or(&[][..], Vec::as_slice)),
            "{day}"
        );
    }
    let all: Vec<Value> = rows.values().flatten().cloned().collect();
    let text = serde_json::to_string(&all).unwrap();
    assert!(text.contains("Ünïcode"));
    assert!(
        all.iter()
            .flat_map(|r| r["steps"].as_array().unwrap())
            .any(|s| s["step_conv_ratio"].is_f64())
    );
    assert!(
        all.iter().any(|r| r["analysis"]["starting_amount"] == 0),
        "a day with zero counts"
    );

    for bad in [
        vec![
            ("funnel_id", "1".to_string()),
            ("from_date", first.to_string()),
            ("to_date", last.to_string()),
        ],
        vec![
            ("from_date", first.to_string()),
            ("to_date", last.to_string()),
        ],
        vec![
            ("funnel_id", ids[0].to_string()),
            ("from_date", last.to_string()),
            ("to_date", first.to_string()),
        ],
        vec![("funnel_id", ids[0].to_string())],
    ] {
        let (status, v) = get_json(&url, "/api/2.0/funnels", &bad).await;
        assert_eq!(status, 400, "{bad:?}");
        assert!(v["error"].is_string());
    }
}

#[tokio::test]
async fn revenue_annotations_and_properties() {
    let sim = Simulator::new(recent(17, 50));
    let srv = sim.serve(0).await.unwrap();
    let url = srv.url();
    let first = sim.config().first_day;

    // Revenue: `$overall` is in the body, never in the ground truth.
    let mut q = range(&sim);
    q[0].1 = add_days(first, -3).to_string();
    q.push(("unit", "day".into()));
    let r = get(&url, "/api/2.0/engage/revenue", &q).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("\"amount\":0.0"), "integers as floats");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["status"], "ok");
    assert!(v["computed_at"].is_string() && v["session_id"].is_string());
    let results = v["results"].as_object().unwrap();
    assert!(results.contains_key("$overall"));
    assert_eq!(results.len(), 11);
    let mut rows = Vec::new();
    for (date, e) in results {
        assert!(e["amount"].is_f64() && e["count"].is_u64() && e["paid_count"].is_u64());
        if date != "$overall" {
            rows.push(json!({"date": date, "amount": e["amount"], "count": e["count"], "paid_count": e["paid_count"]}));
        }
    }
    let mut truth = Vec::new();
    for n in -3..12 {
        truth.extend(sim.revenue_ground_truth(add_days(first, n)));
    }
    assert_eq!(canon(&truth), canon(&rows));
    assert!(truth.iter().all(|r| r["date"] != "$overall"));
    let sum: u64 = rows.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(results["$overall"]["count"], sum);

    // Annotations: the whole range, then a sub-range.
    let (status, v) = get_json(&url, "/api/2.0/annotations", &range(&sim)).await;
    assert_eq!(status, 200);
    assert_eq!(
        v["annotations"],
        Value::Array(sim.annotations_ground_truth())
    );
    assert_eq!(sim.annotations_ground_truth().len(), 5);
    for a in sim.annotations_ground_truth() {
        assert_eq!(a.as_object().unwrap().len(), 4);
        assert_eq!(a["date"].as_str().unwrap().len(), 19);
        assert_eq!(a["project_id"], 1);
    }
    let day = add_days(first, 4).to_string();
    let (_, v) = get_json(
        &url,
        "/api/query/annotations",
        &[("from_date", day.clone()), ("to_date", day.clone())],
    )
    .await;
    let some = v["annotations"].as_array().unwrap();
    assert_eq!(some.len(), 1);
    assert!(some[0]["date"].as_str().unwrap().starts_with(&day));
    let (status, _) = get_json(&url, "/api/2.0/annotations", &[]).await;
    assert_eq!(status, 400);

    // Property discovery.
    let (status, v) = get_json(
        &url,
        "/api/2.0/engage/properties",
        &[("limit", "2000".into())],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["status"], "ok");
    let props = v["results"].as_object().unwrap();
    assert_eq!(props["$browser"]["type"], "string");
    assert_eq!(props["$last_seen"]["type"], "datetime");
    assert_eq!(props["Total Spent"]["type"], "number");
    assert_eq!(props["is_paying"]["type"], "boolean");
    assert_eq!(props["address"]["type"], "object");
    assert_eq!(props["tags"]["type"], "list");
    let truth = sim.engage_ground_truth();
    let with_email = truth
        .iter()
        .filter(|r| r.get("mp_reserved_email").is_some())
        .count();
    assert_eq!(props["$email"]["count"], with_email);
    let (_, v) = get_json(&url, "/api/2.0/engage/properties", &[("limit", "3".into())]).await;
    assert_eq!(v["results"].as_object().unwrap().len(), 3);

    let (status, v) = get_json(
        &url,
        "/api/2.0/events/properties/top",
        &[("limit", "2000".into())],
    )
    .await;
    assert_eq!(status, 200);
    let top = v.as_object().unwrap();
    for k in ["$browser", "mp_lib", "$insert_id", "time", "distinct_id"] {
        assert!(top[k]["count"].as_u64().unwrap() > 0, "{k}");
    }
    let (_, v) = get_json(
        &url,
        "/api/2.0/events/properties/top",
        &[("event", "Purchase".into()), ("limit", "2000".into())],
    )
    .await;
    assert!(v.get("items").is_some() && v.get("page_title").is_none());
}

#[tokio::test]
async fn plan_and_region_errors() {
    let sim = Simulator::new(SimConfig {
        plan_excludes: vec!["engage".into(), "export".into()],
        eu_revenue_400: true,
        ..recent(18, 10)
    });
    let srv = sim.serve(0).await.unwrap();
    let url = srv.url();
    let upgrade = json!({"error": "Your plan does not allow API calls. Upgrade at mixpanel.com/pricing", "status": "error"});
    for path in ["/api/2.0/engage", "/api/query/engage", "/api/2.0/export"] {
        let (status, v) = get_json(&url, path, &range(&sim)).await;
        assert_eq!(status, 402, "{path}");
        assert_eq!(v, upgrade);
    }
    let (status, _) = get_json(&url, "/api/2.0/cohorts/list", &[]).await;
    assert_eq!(status, 200);
    let (status, _) = get_json(&url, "/api/2.0/engage/properties", &[]).await;
    assert_eq!(status, 200, "names match exactly");

    let mut q = range(&sim);
    q.push(("unit", "day".into()));
    let (status, v) = get_json(&url, "/api/2.0/engage/revenue", &q).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"], "Timeout Error.");
}

#[tokio::test]
async fn service_accounts_and_the_app_api() {
    let sa = ServiceAccount {
        username: "bot.abc123.mp-service-account".into(),
        secret: "sa-secret".into(),
        project_id: 4242,
    };
    let sim = Simulator::new(SimConfig {
        service_account: Some(sa),
        ..recent(19, 10)
    });
    let srv = sim.serve(0).await.unwrap();
    let url = srv.url();
    let c = raw_client();
    let sa_auth = basic("bot.abc123.mp-service-account:sa-secret");
    let send = |path: &str, auth: String, q: Vec<(&'static str, String)>| {
        c.get(format!("{url}{path}"))
            .query(&q)
            .header("Authorization", auth)
            .send()
    };

    let r = send(
        "/api/app/projects/4242/annotations",
        sa_auth.clone(),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["status"], "ok");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results, &sim.app_annotations_ground_truth());
    let truth = sim.annotations_ground_truth();
    assert_eq!(results.len(), truth.len());
    for (a, t) in results.iter().zip(&truth) {
        assert_eq!(a["id"], t["id"]);
        // The App API writes the same local time with its offset: `2023-01-15T12:00:00+00:00`.
        let (day, time) = t["date"].as_str().unwrap().split_once(' ').unwrap();
        assert_eq!(a["date"], format!("{day}T{time}+00:00"));
        assert_eq!(a["description"], t["description"]);
        assert!(a["user"].is_object() && a["tags"].is_array());
        assert_eq!(t["project_id"], 4242);
    }
    // Its filters are camelCase; the Query API's names are ignored.
    let first = truth[1]["date"].as_str().unwrap()[..10].to_string();
    let r = send(
        "/api/app/projects/4242/annotations",
        sa_auth.clone(),
        vec![("fromDate", first.clone()), ("toDate", first.clone())],
    )
    .await
    .unwrap();
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert!(
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["date"].as_str().unwrap().starts_with(&first))
    );
    let r = send(
        "/api/app/projects/4242/annotations",
        sa_auth.clone(),
        vec![("from_date", first.clone()), ("to_date", first)],
    )
    .await
    .unwrap();
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), truth.len());
    let r = send(
        "/api/app/projects/4243/annotations",
        sa_auth.clone(),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let r = send("/api/app/projects/4242/annotations", basic(SECRET), vec![])
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Query endpoints with a service account need project_id, like the export.
    let r = send("/api/2.0/cohorts/list", sa_auth.clone(), vec![])
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = send(
        "/api/2.0/cohorts/list",
        sa_auth.clone(),
        vec![("project_id", "1".into())],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let r = send(
        "/api/2.0/cohorts/list",
        sa_auth.clone(),
        vec![("project_id", "4242".into())],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v, Value::Array(sim.cohorts_ground_truth()));
    // Both secret forms work on the query endpoints.
    for auth in [basic(SECRET), basic(&format!("{SECRET}:"))] {
        let r = send("/api/query/funnels/list", auth, vec![]).await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = send("/api/2.0/funnels/list", basic("wrong"), vec![])
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn faults_on_query_paths() {
    let sim = Simulator::new(recent(20, 10));
    let srv = sim.serve(0).await.unwrap();
    let url = srv.url();
    let c = raw_client();
    let rule = |path: &str, fault: Fault| FaultRule {
        path: path.into(),
        from_date: None,
        times: 1,
        covering: None,
        wider_than: None,
        holding: None,
        param: None,
        fault,
    };

    // A rule for /api/2.0/engage also catches /api/query/engage.
    sim.push_fault(rule(
        "/api/2.0/engage",
        Fault::RateLimited {
            retry_after_secs: Some(3),
        },
    ));
    let r = get(&url, "/api/query/engage", &[]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "3");
    assert_eq!(get(&url, "/api/query/engage", &[]).await.status(), 200);

    sim.push_fault(rule(
        "/api/2.0/cohorts/list",
        Fault::ServerError { status: 503 },
    ));
    assert_eq!(get(&url, "/api/2.0/cohorts/list", &[]).await.status(), 503);

    // A stale session, injected once.
    sim.push_fault(rule(
        "/api/2.0/engage",
        Fault::Status {
            status: 400,
            body: r#"{"error": "Invalid session_id: session expired", "status": "error"}"#.into(),
        },
    ));
    let (status, v) = get_json(&url, "/api/2.0/engage", &[]).await;
    assert_eq!(status, 400);
    assert_eq!(v["status"], "error");

    // Cut and truncated JSON bodies.
    sim.push_fault(rule("/api/2.0/engage", Fault::CutBody { after_lines: 0 }));
    let r = get(&url, "/api/2.0/engage", &[]).await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "a cut body is an error");
    sim.push_fault(rule(
        "/api/2.0/engage",
        Fault::TerminatedEarly { after_lines: 0 },
    ));
    let r = get(&url, "/api/2.0/engage", &[]).await;
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert!(!body.is_empty() && serde_json::from_slice::<Value>(&body).is_err());

    // from_date narrows a rule on a dated endpoint.
    let first = sim.config().first_day;
    let id = sim.funnel_ids()[0];
    let q = |day: mixpanel_sim::Date| {
        vec![
            ("funnel_id", id.to_string()),
            ("from_date", day.to_string()),
            ("to_date", day.to_string()),
        ]
    };
    sim.push_fault(FaultRule {
        from_date: Some(add_days(first, 1)),
        ..rule(
            "/api/2.0/funnels",
            Fault::Status {
                status: 400,
                body: r#"{"error": "Timeout Error."}"#.into(),
            },
        )
    });
    assert_eq!(get(&url, "/api/2.0/funnels", &q(first)).await.status(), 200);
    assert_eq!(
        get(&url, "/api/2.0/funnels", &q(add_days(first, 1)))
            .await
            .status(),
        400
    );
    assert_eq!(
        get(&url, "/api/2.0/funnels", &q(add_days(first, 1)))
            .await
            .status(),
        200
    );

    // Slow first byte, and gzip when asked.
    sim.push_fault(rule(
        "/api/2.0/annotations",
        Fault::SlowFirstByte {
            delay: Duration::from_millis(200),
        },
    ));
    let t = std::time::Instant::now();
    let r = c
        .get(format!("{url}/api/2.0/annotations"))
        .query(&range(&sim))
        .header("Authorization", basic(SECRET))
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(200));
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let gz = r.bytes().await.unwrap();
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut plain).unwrap();
    let v: Value = serde_json::from_slice(&plain).unwrap();
    assert_eq!(
        v["annotations"],
        Value::Array(sim.annotations_ground_truth())
    );

    let faulted: Vec<(String, u16)> = sim
        .requests()
        .iter()
        .filter(|r| r.faulted)
        .map(|r| (r.path.clone(), r.status))
        .collect();
    assert_eq!(
        faulted,
        vec![
            ("/api/query/engage".to_string(), 429),
            ("/api/2.0/cohorts/list".to_string(), 503),
            ("/api/2.0/engage".to_string(), 400),
            ("/api/2.0/engage".to_string(), 200),
            ("/api/2.0/engage".to_string(), 200),
            ("/api/2.0/funnels".to_string(), 400),
            ("/api/2.0/annotations".to_string(), 200),
        ]
    );
}

#[test]
fn binary_flags_for_counts() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mixpanel-sim"))
        .args([
            "--port",
            "0",
            "--profiles",
            "7",
            "--cohorts",
            "2",
            "--funnels",
            "1",
            "--annotations",
            "0",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got = rt.block_on(async {
        let (_, engage) = get_json(&url, "/api/2.0/engage", &[]).await;
        let (_, cohorts) = get_json(&url, "/api/2.0/cohorts/list", &[]).await;
        let (_, funnels) = get_json(&url, "/api/2.0/funnels/list", &[]).await;
        (engage["total"].clone(), cohorts, funnels)
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got.0, 7);
    assert_eq!(got.1.as_array().unwrap().len(), 2);
    assert_eq!(got.2.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn smaller_pages_persistent_faults_and_events_names_behave_as_configured() {
    let sim = Simulator::new(SimConfig {
        profiles: 1200,
        engage_max_page_size: Some(500),
        event_properties_require_event: true,
        ..recent(19, 10)
    });
    let srv = sim.serve(0).await.unwrap();
    let url = srv.url();
    // Asked for 1,000, served 500: the answer says so.
    let (status, v) = get_json(&url, "/api/2.0/engage", &[("page_size", "1000".into())]).await;
    assert_eq!(status, 200);
    assert_eq!(v["page_size"], 500);
    assert_eq!(v["total"], 1200);
    assert_eq!(v["results"].as_array().unwrap().len(), 500);
    // A persistent fault meets every matching request until cleared.
    sim.push_fault(FaultRule {
        path: "/api/2.0/cohorts/list".into(),
        from_date: None,
        times: FaultRule::PERSISTENT,
        covering: None,
        wider_than: None,
        holding: None,
        param: None,
        fault: Fault::ServerError { status: 503 },
    });
    for _ in 0..3 {
        assert_eq!(get(&url, "/api/2.0/cohorts/list", &[]).await.status(), 503);
    }
    sim.clear_faults();
    assert_eq!(get(&url, "/api/2.0/cohorts/list", &[]).await.status(), 200);
    // events/properties/top needs `event` here; events/names lists the names.
    let (status, _) = get_json(&url, "/api/2.0/events/properties/top", &[]).await;
    assert_eq!(status, 400);
    let (status, names) =
        get_json(&url, "/api/2.0/events/names", &[("type", "general".into())]).await;
    assert_eq!(status, 200);
    assert_eq!(names, json!(sim.event_names()));
    let first = sim.event_names()[0].clone();
    let (status, props) =
        get_json(&url, "/api/2.0/events/properties/top", &[("event", first)]).await;
    assert_eq!(status, 200);
    assert!(props.as_object().is_some_and(|o| !o.is_empty()), "{props}");
    let (status, _) = get_json(&url, "/api/2.0/events/names", &[]).await;
    assert_eq!(status, 400, "type is required");
}
