//! The Query API endpoints (`/api/2.0/...` and `/api/query/...`) and the App API annotations.

use std::collections::{HashMap, HashSet};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::Simulator;
use crate::engage::{Listing, Session, parse_where};
use crate::r#gen::{day_num, mix, push_u64, rfc3339};
use crate::query::{param, parse_date};
use crate::reports::ymd;

/// Endpoints the simulator answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Export,
    Engage,
    CohortsList,
    FunnelsList,
    Funnels,
    Annotations,
    Revenue,
    EngageProperties,
    EventProperties,
    EventNames,
    /// `/api/app/projects/{id}/annotations`, with the id as written.
    AppAnnotations(String),
}

const QUERY_ENDPOINTS: [(&str, Endpoint); 9] = [
    ("engage", Endpoint::Engage),
    ("cohorts/list", Endpoint::CohortsList),
    ("funnels/list", Endpoint::FunnelsList),
    ("funnels", Endpoint::Funnels),
    ("annotations", Endpoint::Annotations),
    ("engage/revenue", Endpoint::Revenue),
    ("engage/properties", Endpoint::EngageProperties),
    ("events/properties/top", Endpoint::EventProperties),
    ("events/names", Endpoint::EventNames),
];

impl Endpoint {
    /// The endpoint of a request path (one trailing slash tolerated).
    pub(crate) fn parse(path: &str) -> Option<Endpoint> {
        let path = path.strip_suffix('/').unwrap_or(path);
        if path == "/api/2.0/export" {
            return Some(Endpoint::Export);
        }
        if let Some(rest) = path.strip_prefix("/api/app/projects/")
            && let Some(id) = rest.strip_suffix("/annotations")
            && !id.is_empty()
            && !id.contains('/')
        {
            return Some(Endpoint::AppAnnotations(id.to_string()));
        }
        let name = path
            .strip_prefix("/api/2.0/")
            .or_else(|| path.strip_prefix("/api/query/"))?;
        QUERY_ENDPOINTS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, e)| e.clone())
    }

    /// The name `SimConfig::plan_excludes` uses.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Endpoint::Export => "export",
            Endpoint::AppAnnotations(_) => "app/annotations",
            e => QUERY_ENDPOINTS
                .iter()
                .find(|(_, q)| q == e)
                .map_or("", |(n, _)| n),
        }
    }

    /// The `/api/2.0/...` spelling of a request path (fault rules match either spelling).
    pub(crate) fn canonical_path(path: &str) -> String {
        let path = path.strip_suffix('/').unwrap_or(path);
        match path.strip_prefix("/api/query/") {
            Some(rest) => format!("/api/2.0/{rest}"),
            None => path.to_string(),
        }
    }
}

/// A JSON answer.
pub(crate) struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    fn ok(v: &Value) -> Reply {
        Reply {
            status: 200,
            body: serde_json::to_vec(v).unwrap_or_default(),
        }
    }
}

/// `{"request": "...", "error": "..."}`, the Query API's usual error.
pub(crate) fn request_error(status: u16, request: &str, error: &str) -> Reply {
    Reply {
        status,
        body: serde_json::to_vec(&json!({"request": request, "error": error})).unwrap_or_default(),
    }
}

/// `{"error": "...", "status": "error"}`, as engage and plan errors look.
pub(crate) fn status_error(status: u16, error: &str) -> Reply {
    Reply {
        status,
        body: serde_json::to_vec(&json!({"error": error, "status": "error"})).unwrap_or_default(),
    }
}

/// The answer of a query endpoint whose auth, plan, rate limit and faults have passed.
pub(crate) fn answer(
    sim: &Simulator,
    ep: &Endpoint,
    params: &[(String, String)],
    request: &str,
) -> Reply {
    let result = match ep {
        Endpoint::Engage => engage(sim, params),
        Endpoint::CohortsList => Ok(Reply::ok(&Value::Array(sim.inner.cohorts()))),
        Endpoint::FunnelsList => Ok(Reply::ok(&sim.inner.reports.funnels_list())),
        Endpoint::Funnels => funnels(sim, params),
        Endpoint::Annotations => {
            let (from, to) = match date_range(params, "from_date", "to_date", true) {
                Ok(r) => r,
                Err(e) => return request_error(400, request, &e),
            };
            Ok(Reply::ok(
                &json!({"annotations": sim.inner.reports.annotations(from, to)}),
            ))
        }
        Endpoint::Revenue => revenue(sim, params, request),
        Endpoint::EngageProperties => engage_properties(sim, params),
        Endpoint::EventProperties => event_properties(sim, params),
        Endpoint::EventNames => event_names(sim, params),
        Endpoint::AppAnnotations(_) => app_annotations(sim, params),
        Endpoint::Export => Err("the export is not a query endpoint".to_string()),
    };
    result.unwrap_or_else(|e| request_error(400, request, &e))
}

/// `from..=to` as day numbers; with `required` false a missing bound is unbounded.
fn date_range(
    params: &[(String, String)],
    from_name: &str,
    to_name: &str,
    required: bool,
) -> Result<(i64, i64), String> {
    let get = |name: &str, default: i64| match param(params, name) {
        None if !required => Ok(default),
        None => Err(format!("'{name}' is a required parameter")),
        Some(v) => parse_date(v)
            .map(day_num)
            .ok_or_else(|| format!("'{name}' is not a valid date (expected YYYY-MM-DD): {v:?}")),
    };
    let from = get(from_name, i64::MIN)?;
    let to = get(to_name, i64::MAX)?;
    if from > to {
        return Err(format!("{from_name} cannot be later than {to_name}"));
    }
    Ok((from, to))
}

fn unit_day(params: &[(String, String)]) -> Result<(), String> {
    match param(params, "unit") {
        None => Ok(()),
        Some(u) if u.trim().eq_ignore_ascii_case("day") => Ok(()),
        Some(u) => Err(format!(
            "'unit' {u:?} is not supported by the simulator (only unit=day)"
        )),
    }
}

fn limit(params: &[(String, String)]) -> Result<usize, String> {
    match param(params, "limit") {
        None => Ok(10),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("'limit' must be a positive integer, got {v:?}")),
        },
    }
}

/// Engage errors are replies already (their shape differs from the other endpoints).
///
/// Page 0 fixes the listing (`filter_by_cohort` and `where` combined, over the live profiles)
/// and stores it with its session: later pages page through it, serving each profile at its
/// current version (one deleted since is still served). An unfiltered listing is closed-form
/// (O(page)); a `where` reads every profile of the listing once, on page 0.
fn engage(sim: &Simulator, params: &[(String, String)]) -> Result<Reply, String> {
    let bad = |msg: String| Ok(status_error(400, &msg));
    let nonempty = |name: &str| param(params, name).filter(|v| !v.trim().is_empty());
    let page_size = match nonempty("page_size") {
        None => 1000,
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => {
                return bad(format!(
                    "'page_size' must be an integer from 1 to 1000, got {v:?}"
                ));
            }
        },
    };
    let page = match nonempty("page") {
        None => 0,
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) => n,
            _ => return bad(format!("'page' must be a non-negative integer, got {v:?}")),
        },
    };
    let reports = &sim.inner.reports;
    let cohort = match nonempty("filter_by_cohort") {
        None => None,
        Some(v) => {
            let id = match serde_json::from_str::<Value>(v) {
                Ok(Value::Object(o)) => o.get("id").and_then(json_u64),
                Ok(other) => json_u64(&other),
                Err(_) => None,
            };
            let Some(id) = id else {
                return bad(format!(
                    "'filter_by_cohort' must be JSON like {{\"id\": 12345}}, got {v:?}"
                ));
            };
            match reports.cohort_index(id) {
                Some(k) => Some(reports.cohort_rule(k)),
                None => return bad(format!("cohort {id} does not exist")),
            }
        }
    };
    let keep: Option<HashSet<String>> = match nonempty("output_properties") {
        None => None,
        Some(v) => match serde_json::from_str::<Vec<String>>(v) {
            Ok(list) => Some(list.into_iter().collect()),
            Err(_) => {
                return bad(format!(
                    "'output_properties' must be a JSON array of property names, got {v:?}"
                ));
            }
        },
    };
    let filter = match nonempty("where") {
        None => None,
        Some(w) => match parse_where(w) {
            Ok(f) => Some(f),
            Err(e) => return bad(e),
        },
    };
    // `include_all_users` is accepted and ignored.
    let (session_id, stored) = match nonempty("session_id") {
        Some(s) => {
            let st = sim.inner.lock();
            match st.sessions.get(s.trim()) {
                Some(sess) if Instant::now() < sess.expires => {
                    (Some(s.trim().to_string()), sess.listing.clone())
                }
                Some(_) => return bad("Invalid session_id: session expired".into()),
                None => return bad(format!("Invalid session_id: {s:?} is unknown")),
            }
        }
        None if page > 0 => {
            return bad("session_id is required when page is greater than 0".into());
        }
        None => (None, None),
    };
    let profiles = &sim.inner.profiles;
    let listing = match stored {
        Some(l) if page > 0 => l,
        _ => {
            let o = sim.inner.overlay();
            match &filter {
                None => o.live(cohort, profiles.n),
                Some(f) => o.filtered(cohort, f, profiles),
            }
        }
    };
    let session_id = match session_id {
        Some(id) => {
            if page == 0
                && let Some(sess) = sim.inner.lock().sessions.get_mut(&id)
            {
                sess.listing = Some(listing.clone());
            }
            id
        }
        None => new_session(sim, listing.clone()),
    };
    // A project may serve fewer profiles a page than asked; the answer says how many.
    let page_size = sim
        .inner
        .config
        .engage_max_page_size
        .map_or(page_size, |m| page_size.min(u64::from(m.max(1))));
    let total = listing.total();
    let start = page.saturating_mul(page_size).min(total);
    let end = start.saturating_add(page_size).min(total);
    let mut out = Vec::with_capacity(128 + (end - start) as usize * 900);
    out.extend_from_slice(b"{\"page\":");
    push_u64(&mut out, page);
    out.extend_from_slice(b",\"page_size\":");
    push_u64(&mut out, page_size);
    out.extend_from_slice(b",\"session_id\":");
    out.extend_from_slice(&serde_json::to_vec(&session_id).unwrap_or_default());
    out.extend_from_slice(b",\"status\":\"ok\"");
    // Mixpanel leaves `total` out after page 0 at times: here on every odd page.
    if page % 2 == 0 {
        out.extend_from_slice(b",\"total\":");
        push_u64(&mut out, total);
    }
    out.extend_from_slice(b",\"results\":[");
    {
        let o = sim.inner.overlay();
        for j in start..end {
            if j > start {
                out.push(b',');
            }
            let i = listing.index(j);
            profiles
                .at(i, o.changes.get(&i))
                .write(&mut out, keep.as_ref());
        }
    }
    sim.inner
        .engage_served
        .fetch_add(end - start, std::sync::atomic::Ordering::Relaxed);
    out.extend_from_slice(b"]}");
    Ok(Reply {
        status: 200,
        body: out,
    })
}

fn json_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Registers a new engage session holding `listing` and returns its id, e.g.
/// `1700000000-K3ZQ7A`.
fn new_session(sim: &Simulator, listing: Listing) -> String {
    let ttl = sim.inner.config.engage_session_ttl;
    let now = Instant::now();
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut st = sim.inner.lock();
    // Forget sessions that expired long ago so the table stays small.
    st.sessions.retain(|_, s| {
        now.saturating_duration_since(s.expires) < ttl.max(std::time::Duration::from_secs(60))
    });
    loop {
        st.session_counter += 1;
        let mut h = mix(sim.inner.config.seed ^ mix(st.session_counter));
        let code: String = (0..6)
            .map(|_| {
                let c = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[(h % 36) as usize] as char;
                h /= 36;
                c
            })
            .collect();
        let id = format!("{secs}-{code}");
        if !st.sessions.contains_key(&id) {
            st.sessions.insert(
                id.clone(),
                Session {
                    expires: now + ttl,
                    listing: Some(listing),
                },
            );
            return id;
        }
    }
}

fn funnels(sim: &Simulator, params: &[(String, String)]) -> Result<Reply, String> {
    let reports = &sim.inner.reports;
    let raw = param(params, "funnel_id").ok_or("'funnel_id' is a required parameter")?;
    let k = raw
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|id| reports.funnel_index(id))
        .ok_or_else(|| format!("funnel_id {raw:?} does not exist"))?;
    let (from, to) = date_range(params, "from_date", "to_date", true)?;
    unit_day(params)?;
    let mut dates = Vec::new();
    let mut data = serde_json::Map::new();
    for day in reports.days_in(from, to) {
        dates.push(Value::String(ymd(day)));
        data.insert(ymd(day), reports.funnel_day(k, day));
    }
    Ok(Reply::ok(&json!({"meta": {"dates": dates}, "data": data})))
}

fn revenue(sim: &Simulator, params: &[(String, String)], request: &str) -> Result<Reply, String> {
    if sim.inner.config.eu_revenue_400 {
        return Ok(request_error(400, request, "Timeout Error."));
    }
    let (from, to) = date_range(params, "from_date", "to_date", true)?;
    unit_day(params)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let computed_at = format!(
        "{}.{:06}+00:00",
        rfc3339(now.as_secs() as i64).trim_end_matches('Z'),
        now.subsec_micros()
    );
    Ok(Reply::ok(&json!({
        "computed_at": computed_at,
        "status": "ok",
        "session_id": format!("{}-REV{:03}", now.as_secs(), now.subsec_millis()),
        "results": sim.inner.reports.revenue_results(from, to),
    })))
}

fn engage_properties(sim: &Simulator, params: &[(String, String)]) -> Result<Reply, String> {
    let limit = limit(params)?;
    let stats = sim.inner.profile_stats();
    let results: serde_json::Map<String, Value> = stats
        .iter()
        .take(limit)
        .map(|(k, count, ty)| (k.clone(), json!({"count": count, "type": ty})))
        .collect();
    Ok(Reply::ok(&json!({"status": "ok", "results": results})))
}

fn event_properties(sim: &Simulator, params: &[(String, String)]) -> Result<Reply, String> {
    if sim.inner.config.event_properties_require_event && param(params, "event").is_none() {
        return Err("'event' is a required parameter".into());
    }
    let limit = limit(params)?;
    let counts: HashMap<String, u64> = sim.inner.export_property_counts(param(params, "event"));
    let mut list: Vec<(String, u64)> = counts.into_iter().collect();
    list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let out: serde_json::Map<String, Value> = list
        .into_iter()
        .take(limit)
        .map(|(k, n)| (k, json!({"count": n})))
        .collect();
    Ok(Reply::ok(&Value::Object(out)))
}

/// The App API's filters are `fromDate`/`toDate` (optional); other parameters, such as the
/// Query API's `from_date`, are ignored, as Mixpanel ignores them.
fn app_annotations(sim: &Simulator, params: &[(String, String)]) -> Result<Reply, String> {
    let (from, to) = date_range(params, "fromDate", "toDate", false)?;
    Ok(Reply::ok(&json!({
        "status": "ok",
        "results": sim.inner.reports.app_annotations(from, to, &sim.inner.generator.tz),
    })))
}

/// `events/names`: the event names, most common first, as a JSON array of strings. `type`
/// (`general`, `unique` or `average`) is required; `limit` defaults to 255.
fn event_names(sim: &Simulator, params: &[(String, String)]) -> Result<Reply, String> {
    match param(params, "type").map(str::trim) {
        Some("general" | "unique" | "average") => {}
        Some(t) => {
            return Err(format!(
                "'type' must be one of general, unique, average, got {t:?}"
            ));
        }
        None => return Err("'type' is a required parameter".into()),
    }
    let limit = match param(params, "limit") {
        None => 255,
        Some(_) => limit(params)?,
    };
    let names: Vec<Value> = sim
        .inner
        .event_names()
        .into_iter()
        .take(limit)
        .map(Value::String)
        .collect();
    Ok(Reply::ok(&Value::Array(names)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(Endpoint::parse("/api/2.0/engage"), Some(Endpoint::Engage));
        assert_eq!(
            Endpoint::parse("/api/query/engage/"),
            Some(Endpoint::Engage)
        );
        assert_eq!(
            Endpoint::parse("/api/query/events/properties/top"),
            Some(Endpoint::EventProperties)
        );
        assert_eq!(Endpoint::parse("/api/query/export"), None);
        assert_eq!(
            Endpoint::parse("/api/app/projects/42/annotations"),
            Some(Endpoint::AppAnnotations("42".into()))
        );
        assert_eq!(Endpoint::parse("/api/app/projects//annotations"), None);
        assert_eq!(Endpoint::Revenue.name(), "engage/revenue");
        assert_eq!(
            Endpoint::canonical_path("/api/query/cohorts/list"),
            "/api/2.0/cohorts/list"
        );
    }
}
