//! Profiles that change while the simulator runs, engage's `where`, and sessions that hold
//! their result set, over real HTTP on loopback.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use common::*;
use mixpanel_sim::{Fault, FaultRule, SimConfig, Simulator};
use serde_json::{Map, Value};

const ENGAGE: &str = "/api/2.0/engage";

async fn get_json(url: &str, path: &str, params: &[(&str, String)]) -> (u16, Value) {
    let r = raw_client()
        .get(format!("{url}{path}"))
        .query(params)
        .header("Authorization", basic(SECRET))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.bytes().await.unwrap();
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&body)));
    (status, v)
}

/// What a correct replicator makes of one engage result, computed independently.
fn engage_row(result: &Value) -> Value {
    let mut row = Map::new();
    row.insert("distinct_id".into(), result["$distinct_id"].clone());
    if let Some(props) = result.get("$properties").and_then(Value::as_object) {
        for (k, v) in props {
            let k = k
                .strip_prefix('$')
                .map_or(k.clone(), |r| format!("mp_reserved_{r}"));
            row.insert(k, v.clone());
        }
    }
    Value::Object(row)
}

/// One engage page.
async fn page(
    url: &str,
    page: u64,
    page_size: u64,
    session: Option<&str>,
    extra: &[(&str, String)],
) -> Value {
    let mut q: Vec<(&str, String)> = extra.to_vec();
    q.push(("page_size", page_size.to_string()));
    q.push(("page", page.to_string()));
    if let Some(s) = session {
        q.push(("session_id", s.to_string()));
    }
    let (status, v) = get_json(url, ENGAGE, &q).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["page"], page);
    v
}

/// Pages through a listing to the end; returns the rows and the `total` of every page that has
/// one (the even pages).
async fn page_through(
    url: &str,
    page_size: u64,
    extra: &[(&str, String)],
) -> (Vec<Value>, Vec<u64>) {
    let mut rows = Vec::new();
    let mut totals = Vec::new();
    let mut session: Option<String> = None;
    for p in 0.. {
        let v = page(url, p, page_size, session.as_deref(), extra).await;
        session = Some(v["session_id"].as_str().unwrap().to_string());
        if let Some(t) = v.get("total") {
            totals.push(t.as_u64().unwrap());
        } else {
            assert_eq!(p % 2, 1, "even pages carry total");
        }
        let results = v["results"].as_array().unwrap();
        rows.extend(results.iter().map(engage_row));
        if (results.len() as u64) < page_size {
            break;
        }
    }
    (rows, totals)
}

/// Rows by distinct id (as JSON text).
fn by_id(rows: &[Value]) -> HashMap<String, Value> {
    rows.iter()
        .map(|r| (r["distinct_id"].to_string(), r.clone()))
        .collect()
}

fn ids(values: &[Value]) -> Vec<String> {
    values.iter().map(Value::to_string).collect()
}

/// Now in UTC, as profile datetimes are written.
fn now_cursor() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S")
        .to_string()
}

fn where_since(cursor: &str) -> (&'static str, String) {
    (
        "where",
        format!(r#"properties["$last_seen"] >= "{cursor}""#),
    )
}

/// The ground-truth rows whose `$last_seen` is at or after `cursor`.
fn seen_since(truth: &[Value], cursor: &str) -> Vec<Value> {
    truth
        .iter()
        .filter(|r| {
            r["mp_reserved_last_seen"]
                .as_str()
                .is_some_and(|s| s >= cursor)
        })
        .cloned()
        .collect()
}

#[tokio::test]
async fn updated_added_and_deleted_profiles_are_served_as_ground_truth() {
    let sim = Simulator::new(recent(21, 10));
    let srv = sim.serve(0).await.unwrap();
    let url = srv.url();
    let before = sim.engage_ground_truth();
    assert_eq!(sim.profile_count(), 300);
    let cursor = now_cursor();

    // 11 has no property at all and 10 only a few; 50 is asked twice (updated once).
    let updated = sim.update_profiles(&[0, 10, 11, 50, 50, 400]);
    assert_eq!(updated.len(), 4);
    assert_eq!(
        ids(&updated),
        ids(&[0, 10, 11, 50].map(|i| before[i]["distinct_id"].clone()))
    );
    let quiet = sim.update_profiles_ignoring_time(&[60]);
    let added = sim.add_profiles(5);
    assert_eq!(added.len(), 5);
    let deleted = sim.delete_profiles(&[7, 100, 301, 100]);
    assert_eq!(deleted.len(), 2 + 1, "a repeated index is deleted once");
    assert_eq!(
        sim.delete_profiles(&[7]),
        Vec::<Value>::new(),
        "already deleted"
    );
    assert_eq!(
        sim.update_profiles(&[7]),
        Vec::<Value>::new(),
        "deleted: skipped"
    );
    assert_eq!(sim.profile_count(), 300 + 5 - 3);

    let after = sim.engage_ground_truth();
    assert_eq!(after.len() as u64, sim.profile_count());
    let (old, new) = (by_id(&before), by_id(&after));
    let touched: HashSet<String> = ids(&updated).into_iter().chain(ids(&quiet)).collect();
    let gone: HashSet<String> = ids(&deleted).into_iter().collect();
    for (id, row) in &old {
        if gone.contains(id) {
            assert!(!new.contains_key(id), "{id} was deleted");
        } else if touched.contains(id) {
            assert_ne!(&new[id], row, "{id} has a new version");
            assert_ne!(new[id]["plan"], Value::Null);
            assert!(new[id]["login_count"].is_u64());
        } else {
            assert_eq!(&new[id], row, "{id} is untouched");
        }
    }
    // The profile without properties gained some, `$last_seen` among them.
    let bare = &new[&before[11]["distinct_id"].to_string()];
    assert!(bare["mp_reserved_last_seen"].is_string(), "{bare}");
    assert!(bare.get("plan").is_some(), "{bare}");
    // Ignoring time: `$last_seen` did not move.
    let q = &quiet[0].to_string();
    assert_eq!(
        new[q]["mp_reserved_last_seen"],
        old[q]["mp_reserved_last_seen"]
    );
    // The added profiles come last, in order, with `$last_seen` now-ish.
    let tail: Vec<Value> = after[after.len() - 4..]
        .iter()
        .map(|r| r["distinct_id"].clone())
        .collect();
    let mut want_tail = added.clone();
    want_tail.remove(1); // index 301 was deleted
    assert_eq!(tail, want_tail);
    for r in &after[after.len() - 4..] {
        assert!(r["mp_reserved_last_seen"].as_str().unwrap() >= cursor.as_str());
    }

    // Served exactly as the ground truth says, in one page and in many.
    let (rows, totals) = page_through(&url, 1000, &[]).await;
    assert_eq!(rows, after);
    assert_eq!(totals, vec![sim.profile_count()]);
    let (rows, totals) = page_through(&url, 7, &[]).await;
    assert_eq!(rows, after);
    assert!(totals.iter().all(|t| *t == sim.profile_count()));

    // A second update is a new version again.
    let v2 = sim.engage_ground_truth();
    sim.update_profiles(&[0]);
    let v3 = sim.engage_ground_truth();
    assert_ne!(v2[0], v3[0]);
    assert_eq!(v2[1..], v3[1..]);
    let (rows, _) = page_through(&url, 1000, &[]).await;
    assert_eq!(rows, v3);
    assert_eq!(
        sim.engage_profiles_served(),
        3 * sim.profile_count(),
        "every profile served counts"
    );
}

#[tokio::test]
async fn where_on_last_seen_lists_what_changed_since_a_cursor() {
    let sim = Simulator::new(recent(22, 10));
    let srv = sim.serve(0).await.unwrap();
    let url = srv.url();
    let cursor = now_cursor();
    let updated = sim.update_profiles(&[3, 40, 41, 299]);
    let quiet = sim.update_profiles_ignoring_time(&[42]);
    let added = sim.add_profiles(4);
    sim.delete_profiles(&[41]);

    let truth = sim.engage_ground_truth();
    let want = seen_since(&truth, &cursor);
    let want_ids: HashSet<String> = want.iter().map(|r| r["distinct_id"].to_string()).collect();
    let gone = updated[2].to_string();
    for id in ids(&updated).iter().chain(&ids(&added)) {
        if *id != gone {
            assert!(want_ids.contains(id), "{id} changed since the cursor");
        }
    }
    assert!(!want_ids.contains(&updated[2].to_string()), "deleted");
    // The profile updated with $ignore_time is listed only if its own $last_seen says so.
    let q = &by_id(&truth)[&quiet[0].to_string()];
    assert_eq!(
        want_ids.contains(&quiet[0].to_string()),
        q["mp_reserved_last_seen"]
            .as_str()
            .is_some_and(|s| s >= cursor.as_str())
    );
    assert!(want.len() >= 7);

    for page_size in [2, 3] {
        let (rows, totals) = page_through(&url, page_size, &[where_since(&cursor)]).await;
        assert_eq!(rows, want, "page_size {page_size}");
        assert!(totals.len() >= 2, "several pages carry total");
        assert!(totals.iter().all(|t| *t == want.len() as u64));
    }

    // Combined with a cohort: the members that match.
    let members = sim.cohort_members_ground_truth();
    for id in sim.cohort_ids() {
        let in_cohort: HashSet<String> = members
            .iter()
            .filter(|m| m["cohort_id"] == id)
            .map(|m| m["distinct_id"].to_string())
            .collect();
        let want: Vec<Value> = want
            .iter()
            .filter(|r| in_cohort.contains(&r["distinct_id"].to_string()))
            .cloned()
            .collect();
        let (rows, totals) = page_through(
            &url,
            2,
            &[
                where_since(&cursor),
                ("filter_by_cohort", format!(r#"{{"id":{id}}}"#)),
            ],
        )
        .await;
        assert_eq!(rows, want, "cohort {id}");
        assert_eq!(totals[0], want.len() as u64);
    }

    // Other properties and operators filter as the ground truth says.
    for (w, pred) in [
        (
            r#"properties["login_count"] < 1000"#,
            Box::new(|r: &Value| r["login_count"].as_f64().is_some_and(|x| x < 1000.0))
                as Box<dyn Fn(&Value) -> bool>,
        ),
        (
            r#"properties["plan"] != "free""#,
            Box::new(|r: &Value| r["plan"].as_str().is_some_and(|p| p != "free")),
        ),
        (
            r#"properties["$last_seen"]<"2000-01-01T00:00:00""#,
            Box::new(|_: &Value| false),
        ),
    ] {
        let want: Vec<Value> = truth.iter().filter(|r| pred(r)).cloned().collect();
        let (rows, totals) = page_through(&url, 1000, &[("where", w.to_string())]).await;
        assert_eq!(rows, want, "{w}");
        assert_eq!(totals, vec![want.len() as u64]);
    }
}

#[tokio::test]
async fn a_session_pages_through_the_result_set_of_its_page_0() {
    let sim = Simulator::new(recent(23, 10));
    let srv = sim.serve(0).await.unwrap();
    let url = srv.url();
    let before = sim.engage_ground_truth();

    // Unfiltered, nothing mutated yet: page 0 lists 0..3, page 1 will list 3..6.
    let p0 = page(&url, 0, 3, None, &[]).await;
    let sid = p0["session_id"].as_str().unwrap().to_string();
    assert_eq!(p0["total"], 300);
    sim.update_profiles(&[4]);
    sim.delete_profiles(&[5]);
    sim.add_profiles(2);
    let now = sim.engage_ground_truth();
    let p1 = page(&url, 1, 3, Some(&sid), &[]).await;
    let rows: Vec<Value> = p1["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(engage_row)
        .collect();
    assert_eq!(rows[0], before[3]);
    assert_eq!(rows[1], now[4], "updated between pages: its new version");
    assert_ne!(rows[1], before[4]);
    assert_eq!(rows[2], before[5], "deleted between pages: still served");
    // Page 2 carries the total page 0 fixed; the last page is still page 99.
    let p2 = page(&url, 2, 3, Some(&sid), &[]).await;
    assert_eq!(p2["total"], 300);
    let last = page(&url, 99, 3, Some(&sid), &[]).await;
    assert_eq!(last["results"].as_array().unwrap().len(), 3);
    let past = page(&url, 100, 3, Some(&sid), &[]).await;
    assert_eq!(past["results"].as_array().unwrap().len(), 0);
    // A new listing no longer has the deleted profile, and has the added ones.
    let (rows, totals) = page_through(&url, 1000, &[]).await;
    assert_eq!(rows, now);
    assert_eq!(totals, vec![301]);
    assert!(!rows.contains(&before[5]));

    // The same for a filtered listing (its session holds an explicit result set).
    let cursor = "2000-01-01T00:00:00";
    let filtered = seen_since(&now, cursor);
    let p0 = page(&url, 0, 2, None, &[where_since(cursor)]).await;
    let sid = p0["session_id"].as_str().unwrap().to_string();
    assert_eq!(p0["total"], filtered.len() as u64);
    let (a, b) = (&filtered[2]["distinct_id"], &filtered[3]["distinct_id"]);
    // Both are generated profiles: their listing index is their place in the first truth.
    let index = |id: &Value| before.iter().position(|r| &r["distinct_id"] == id).unwrap() as u64;
    let (ia, ib) = (index(a), index(b));
    // The session ignores the filters of later pages: it holds its result set.
    sim.update_profiles_ignoring_time(&[ia]);
    sim.delete_profiles(&[ib]);
    let latest = by_id(&sim.engage_ground_truth());
    let p1 = page(&url, 1, 2, Some(&sid), &[]).await;
    let rows: Vec<Value> = p1["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(engage_row)
        .collect();
    assert_eq!(rows[0], latest[&a.to_string()]);
    assert_ne!(rows[0], filtered[2]);
    assert_eq!(rows[1], filtered[3], "deleted between pages: still served");
    let (rows, _) = page_through(&url, 1000, &[where_since(cursor)]).await;
    assert_eq!(rows.len(), filtered.len() - 1);
    assert!(!rows.iter().any(|r| &r["distinct_id"] == b));
}

#[tokio::test]
async fn page_size_1_counts_the_live_profiles() {
    let sim = Simulator::new(SimConfig {
        engage_max_page_size: Some(2),
        ..recent(24, 10)
    });
    let srv = sim.serve(0).await.unwrap();
    let url = srv.url();
    let count = |url: String| async move {
        let v = page(&url, 0, 1, None, &[]).await;
        assert_eq!(v["page_size"], 1);
        assert_eq!(v["results"].as_array().unwrap().len(), 1);
        v["total"].as_u64().unwrap()
    };
    assert_eq!(count(url.clone()).await, 300);
    sim.delete_profiles(&[0, 1, 2, 299]);
    assert_eq!(count(url.clone()).await, sim.profile_count());
    sim.add_profiles(10);
    sim.delete_profiles(&[305]);
    assert_eq!(sim.profile_count(), 300 - 4 + 10 - 1);
    assert_eq!(count(url.clone()).await, sim.profile_count());
    // engage_max_page_size still caps.
    let v = page(&url, 0, 1000, None, &[]).await;
    assert_eq!(v["page_size"], 2);
    assert_eq!(v["total"], sim.profile_count());
    assert_eq!(
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(engage_row)
            .collect::<Vec<_>>(),
        sim.engage_ground_truth()[..2]
    );
}

#[tokio::test]
async fn a_malformed_where_is_a_400_naming_where() {
    let sim = Simulator::new(recent(25, 10));
    let srv = sim.serve(0).await.unwrap();
    for w in [
        r#"properties["$last_seen" >= 3"#,
        "foo",
        r#"properties["$last_seen"] >= "#,
        r#"properties["$last_seen"] => "2026-01-01T00:00:00""#,
        r#"properties["$last_seen"] >= 2026-01-01"#,
        r#"properties["$last_seen"] >= "2026-01-01T00:00:00" and true"#,
        r#"datetime(properties["$last_seen"]) >= 3"#,
    ] {
        let (status, v) = get_json(&srv.url(), ENGAGE, &[("where", w.to_string())]).await;
        assert_eq!(status, 400, "{w}");
        assert_eq!(v["status"], "error", "{v}");
        assert!(v["error"].as_str().unwrap().contains("'where'"), "{v}");
    }
    // An empty `where` is no filter.
    let (status, v) = get_json(&srv.url(), ENGAGE, &[("where", " ".to_string())]).await;
    assert_eq!(status, 200);
    assert_eq!(v["total"], 300);
}

#[tokio::test]
async fn cohorts_follow_deleted_and_added_profiles() {
    let sim = Simulator::new(recent(26, 10));
    let srv = sim.serve(0).await.unwrap();
    let url = srv.url();
    let before = sim.cohort_members_ground_truth();
    sim.delete_profiles(&(0..40).collect::<Vec<u64>>());
    let added = sim.add_profiles(30);
    let members = sim.cohort_members_ground_truth();
    let live: HashSet<String> = sim
        .engage_ground_truth()
        .iter()
        .map(|r| r["distinct_id"].to_string())
        .collect();
    assert!(
        members
            .iter()
            .all(|m| live.contains(&m["distinct_id"].to_string())),
        "members are live profiles"
    );
    assert!(members.len() < before.len() + 30);
    let added: HashSet<String> = ids(&added).into_iter().collect();
    assert!(
        members
            .iter()
            .any(|m| added.contains(&m["distinct_id"].to_string())),
        "added profiles join cohorts"
    );

    let (status, list) = get_json(&url, "/api/2.0/cohorts/list", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(list, Value::Array(sim.cohorts_ground_truth()));
    for c in list.as_array().unwrap() {
        let id = c["id"].clone();
        let want: Vec<Value> = members
            .iter()
            .filter(|m| m["cohort_id"] == id)
            .map(|m| m["distinct_id"].clone())
            .collect();
        assert_eq!(c["count"], want.len() as u64, "{c}");
        let (rows, totals) = page_through(
            &url,
            3,
            &[("filter_by_cohort", format!(r#"{{"id":{id}}}"#))],
        )
        .await;
        let got: Vec<Value> = rows.iter().map(|r| r["distinct_id"].clone()).collect();
        assert_eq!(got, want, "cohort {id}");
        assert!(totals.iter().all(|t| *t == want.len() as u64));
    }
}

#[tokio::test]
async fn a_fault_with_a_param_hits_only_filtered_requests() {
    let sim = Simulator::new(recent(27, 10));
    let srv = sim.serve(0).await.unwrap();
    let url = srv.url();
    sim.push_fault(
        FaultRule::new(
            "/api/2.0/engage",
            FaultRule::PERSISTENT,
            Fault::ServerError { status: 503 },
        )
        .with_param("where"),
    );
    let filtered = [where_since("2000-01-01T00:00:00")];
    for _ in 0..2 {
        let (status, _) = get_json(&url, ENGAGE, &[]).await;
        assert_eq!(status, 200);
        let r = raw_client()
            .get(format!("{url}/api/query/engage"))
            .query(&filtered)
            .header("Authorization", basic(SECRET))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        let (status, _) = get_json(&url, ENGAGE, &[("where", String::new())]).await;
        assert_eq!(status, 200, "an empty where is no filter");
    }
    let log = sim.requests();
    assert_eq!(log.iter().filter(|r| r.faulted).count(), 2);
}

#[tokio::test]
async fn integer_ids_stay_integers_through_updates() {
    let sim = Simulator::new(SimConfig {
        engage_integer_ids: true,
        ..recent(28, 10)
    });
    let srv = sim.serve(0).await.unwrap();
    let truth = sim.engage_ground_truth();
    let ints: Vec<u64> = truth
        .iter()
        .enumerate()
        .filter(|(_, r)| r["distinct_id"].is_u64())
        .map(|(i, _)| i as u64)
        .collect();
    assert!(!ints.is_empty());
    let cursor = now_cursor();
    let updated = sim.update_profiles(&ints);
    assert!(updated.iter().all(Value::is_u64), "{updated:?}");
    let added = sim.add_profiles(40);
    let after = sim.engage_ground_truth();
    let (rows, _) = page_through(&srv.url(), 5, &[where_since(&cursor)]).await;
    assert_eq!(rows, seen_since(&after, &cursor));
    for id in updated.iter().chain(added.iter().filter(|v| v.is_u64())) {
        assert!(rows.iter().any(|r| &r["distinct_id"] == id), "{id}");
    }
    let removed = sim.delete_profiles(&ints[..1]);
    assert!(removed[0].is_u64());
}

/// A filtered page 0 over many profiles reads every `$last_seen` once, cheaply.
#[tokio::test]
async fn a_filtered_page_0_over_many_profiles_is_fast() {
    let sim = Simulator::new(SimConfig {
        profiles: 100_000,
        ..recent(29, 10)
    });
    let srv = sim.serve(0).await.unwrap();
    sim.update_profiles(&[5, 50_000]);
    sim.add_profiles(3);
    let cursor = now_cursor();
    sim.update_profiles(&[99_999]);
    let t = Instant::now();
    let v = page(&srv.url(), 0, 1000, None, &[where_since(&cursor)]).await;
    let took = t.elapsed();
    eprintln!("filtered page 0 over 100,003 profiles: {took:?}");
    let want = seen_since(&sim.engage_ground_truth(), &cursor);
    assert_eq!(v["total"], want.len() as u64);
    let limit = if cfg!(debug_assertions) { 5.0 } else { 1.0 };
    assert!(took.as_secs_f64() < limit, "{took:?}");
}
