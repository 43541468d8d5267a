//! The invocation: parse the event, plan, claim a slice, replicate it, answer.

use std::time::{Duration, SystemTime};

use jiff::Timestamp;
use jiff::civil::Date;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use crate::app::App;
use crate::config::parse_date;
use crate::error::{Error, ErrorKind, Result};
use crate::plan;
use crate::replicate::SliceResult;
use crate::tables::Table;
use crate::tables::export::project_today;

/// A validated invocation event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invocation {
    /// `{"table": T}`: plan, then replicate one pending slice (or the snapshot).
    Scheduled(Table),
    /// `{"table": T, "date": D}`: replicate exactly this day.
    Day(Table, Date),
    /// `{"table": T, "from": A, "to": B}`: queue one slice per day and answer with their events.
    Range(Table, Date, Date),
}

impl Invocation {
    /// The table the event is about.
    pub fn table(&self) -> Table {
        match *self {
            Invocation::Scheduled(t) | Invocation::Day(t, _) | Invocation::Range(t, _, _) => t,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    table: Option<Value>,
    date: Option<Value>,
    from: Option<Value>,
    to: Option<Value>,
}

/// Parses an invocation event; anything else is an `InvalidEvent` error that names the problem.
pub fn parse_event(v: &Value) -> Result<Invocation> {
    if !v.is_object() {
        return Err(Error::event(format!(
            "expected a JSON object like {{\"table\": \"export\"}}, got {}",
            kind_of(v)
        )));
    }
    let raw: RawEvent =
        serde_json::from_value(v.clone()).map_err(|e| Error::event(e.to_string()))?;
    let table = match raw.table {
        None => return Err(Error::event("missing field `table`")),
        Some(Value::String(s)) => s.parse::<Table>().map_err(Error::event)?,
        Some(other) => {
            return Err(Error::event(format!(
                "`table` must be a string, got {}",
                kind_of(&other)
            )));
        }
    };
    let date = |name: &str, v: Option<Value>| -> Result<Option<Date>> {
        match v {
            None => Ok(None),
            Some(Value::String(s)) => parse_date(&s).map(Some).ok_or_else(|| {
                Error::event(format!("`{name}` must be a date YYYY-MM-DD, got {s:?}"))
            }),
            Some(other) => Err(Error::event(format!(
                "`{name}` must be a date string, got {}",
                kind_of(&other)
            ))),
        }
    };
    let (day, from, to) = (
        date("date", raw.date)?,
        date("from", raw.from)?,
        date("to", raw.to)?,
    );
    if (day.is_some() || from.is_some() || to.is_some()) && !table.is_date_sliced() {
        return Err(Error::event(format!(
            "{table} is a full table: it takes no `date`, `from` or `to`"
        )));
    }
    match (day, from, to) {
        (None, None, None) => Ok(Invocation::Scheduled(table)),
        (Some(d), None, None) => Ok(Invocation::Day(table, d)),
        (None, Some(f), Some(t)) if f <= t => Ok(Invocation::Range(table, f, t)),
        (None, Some(f), Some(t)) => Err(Error::event(format!("`from` ({f}) is after `to` ({t})"))),
        (Some(_), _, _) => Err(Error::event("`date` cannot be combined with `from`/`to`")),
        (None, Some(_), None) => Err(Error::event("`from` needs `to`")),
        (None, None, Some(_)) => Err(Error::event("`to` needs `from`")),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The status of an invocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// A slice was replicated and committed.
    Done,
    /// A range was queued as per-day slices.
    FanOut,
    /// The deadline came first; progress was saved; invoke again.
    Partial,
    /// Nothing was pending.
    Idle,
    /// The plan does not allow this table.
    Skipped,
}

/// The JSON answer of an invocation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Response {
    /// What happened.
    pub status: Status,
    /// The table.
    pub table: String,
    /// The slice worked on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slice: Option<String>,
    /// Records written.
    pub records: u64,
    /// Stored bytes written.
    pub bytes: u64,
    /// Files written.
    pub files: u64,
    /// Duplicate deliveries dropped.
    #[serde(skip_serializing_if = "is_zero")]
    pub duplicates: u64,
    /// Slices queued by this invocation.
    #[serde(skip_serializing_if = "is_zero")]
    pub queued: u64,
    /// The per-day events of a fan-out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<Value>>,
    /// Why it was skipped, partial or idle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Response {
    fn new(status: Status, table: Table) -> Self {
        Response {
            status,
            table: table.to_string(),
            slice: None,
            records: 0,
            bytes: 0,
            files: 0,
            duplicates: 0,
            queued: 0,
            events: None,
            reason: None,
        }
    }
}

/// The deadline to work to: the runtime's when it is in the future, else now + `budget`
/// (`cargo lambda watch` sends one in the past).
pub fn effective_deadline(runtime_deadline: Option<SystemTime>, budget: Duration) -> Instant {
    let now = Instant::now();
    match runtime_deadline.and_then(|d| d.duration_since(SystemTime::now()).ok()) {
        Some(left) if left > Duration::from_secs(1) => now + left,
        _ => now + budget,
    }
}

/// Time kept back from the deadline for committing and answering.
fn margin(total: Duration) -> Duration {
    (total / 5).min(Duration::from_secs(30))
}

/// A fresh attempt id (also the part file name stem).
pub fn new_attempt_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// Handles one invocation event and reports it: a summary log line, and EMF metrics when `emf`.
pub async fn handle_reported(
    app: &App,
    event: Value,
    deadline: Instant,
    emf: bool,
) -> Result<Response> {
    let started = Instant::now();
    let before = crate::metrics::StatsSnapshot::take(app.mixpanel.stats());
    // Only a valid table name becomes a metric dimension.
    let table = parse_event(&event)
        .map(|i| i.table().as_str())
        .unwrap_or("invalid");
    let result = handle(app, event, deadline).await;
    let after = crate::metrics::StatsSnapshot::take(app.mixpanel.stats());
    crate::metrics::report(
        table,
        result.as_ref(),
        started.elapsed().as_millis() as u64,
        before,
        after,
        emf,
    );
    result
}

/// Handles one invocation event.
pub async fn handle(app: &App, event: Value, deadline: Instant) -> Result<Response> {
    let inv = parse_event(&event)?;
    let now = Timestamp::now();
    let today = project_today(&app.settings.timezone, now);
    let store = app.store.as_ref();
    match inv {
        Invocation::Scheduled(t) => {
            let queued = plan::queue_table(store, &app.settings, t, now).await?;
            let owner = new_attempt_id();
            let (now_ms, until) = lease_times(deadline);
            let mut resp = match plan::claim_next(store, t, &owner, now_ms, until).await? {
                None => {
                    let mut r = Response::new(Status::Idle, t);
                    r.reason = Some("nothing pending".into());
                    r
                }
                Some(claim) => run_slice(app, &claim, deadline).await?,
            };
            resp.queued = queued;
            Ok(resp)
        }
        Invocation::Day(t, d) => {
            if d > today {
                return Err(Error::event(format!(
                    "`date` {d} is after today ({today}) in the project's timezone"
                )));
            }
            // An explicit day is replicated again even if it was committed (a day split into
            // hours: its hours, then the day's commit from them).
            let slices = store.slices(t).await?;
            plan::requeue_day(store, &slices, t, d, u64::MAX).await?;
            let owner = new_attempt_id();
            let (now_ms, until) = lease_times(deadline);
            match plan::claim_next_of(store, t, Some(d), &owner, now_ms, until).await? {
                Some(claim) => run_slice(app, &claim, deadline).await,
                None => {
                    let mut r = Response::new(Status::Idle, t);
                    r.slice = Some(d.to_string());
                    r.reason = Some("another invocation is replicating this day".into());
                    Ok(r)
                }
            }
        }
        Invocation::Range(t, from, to) => {
            if to > today {
                return Err(Error::event(format!(
                    "`to` {to} is after today ({today}) in the project's timezone"
                )));
            }
            let mut days = Vec::new();
            let mut d = from;
            while d <= to {
                days.push(d);
                d = d.tomorrow().map_err(|e| Error::event(e.to_string()))?;
            }
            let queued = plan::queue_days(store, &app.settings, t, &days, now).await?;
            let mut r = Response::new(Status::FanOut, t);
            r.queued = queued.len() as u64;
            r.events = Some(
                days.iter()
                    .map(|d| serde_json::json!({"table": t.as_str(), "date": d.to_string()}))
                    .collect(),
            );
            Ok(r)
        }
    }
}

/// Now and the end of a lease that outlives this invocation (so it is never taken while we run).
pub(crate) fn lease_times(deadline: Instant) -> (u64, u64) {
    let now_ms = Timestamp::now().as_millisecond() as u64;
    let left = deadline.saturating_duration_since(Instant::now());
    (now_ms, now_ms + left.as_millis() as u64 + 60_000)
}

/// With `MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT=false`, the export columns are those Mixpanel
/// lists when the table is first discovered (`events/properties/top`).
async fn first_discovery(app: &App, deadline: Instant) -> Result<()> {
    if app.settings.select_properties_by_default || app.store.schema(Table::Export).await?.is_some()
    {
        return Ok(());
    }
    let discovered = crate::discovery::discover(&app.mixpanel, Table::Export, deadline).await?;
    app.store.init_schema(Table::Export, &discovered).await?;
    Ok(())
}

/// What a table's runner did.
enum Ran {
    /// Committed (with the slice label when it covered several days).
    Done(SliceResult, Option<String>),
    /// Progress saved before the deadline.
    Partial(String),
}

/// Replicates a claimed slice; on failure the slice goes back to the queue.
pub async fn run_slice(app: &App, claim: &plan::Claim, deadline: Instant) -> Result<Response> {
    let lease = &claim.lease;
    let started = Instant::now();
    let work_deadline = deadline - margin(deadline.saturating_duration_since(started));
    let result = match lease.table {
        Table::Export => match first_discovery(app, work_deadline).await {
            Ok(()) => crate::split::run(app, claim, work_deadline)
                .await
                .map(|r| match r {
                    crate::split::Ran::Done(r, label) => Ran::Done(r, Some(label)),
                    crate::split::Ran::Partial(why) => Ran::Partial(why),
                }),
            Err(e) => Err(e),
        },
        Table::Funnels | Table::Revenue => crate::dated::run(app, lease, work_deadline)
            .await
            .map(|(r, label)| Ran::Done(r, Some(label))),
        Table::Engage | Table::CohortMembers | Table::Cohorts | Table::Annotations => {
            crate::snapshot::run(app, lease, work_deadline)
                .await
                .map(|o| match o {
                    crate::snapshot::Outcome::Done(r) => Ran::Done(r, None),
                    crate::snapshot::Outcome::Partial(why) => Ran::Partial(why),
                })
        }
    };
    let mut resp = Response::new(Status::Done, lease.table);
    resp.slice = Some(lease.slice.to_string());
    match result {
        Ok(Ran::Done(
            SliceResult {
                records,
                bytes,
                files,
                duplicates,
                raw_bytes,
            },
            label,
        )) => {
            if let Some(label) = label {
                resp.slice = Some(label);
            }
            resp.records = records;
            resp.bytes = bytes;
            resp.files = files;
            resp.duplicates = duplicates;
            tracing::info!(
                table = %lease.table, slice = resp.slice.as_deref().unwrap_or_default(), status = "done", records, bytes, files, duplicates, raw_bytes,
                duration_ms = started.elapsed().as_millis() as u64, "slice committed"
            );
            Ok(resp)
        }
        Ok(Ran::Partial(why)) => {
            if let Err(re) = app.store.release(lease).await {
                tracing::warn!(error = %re, "could not give the slice back; its lease will expire");
            }
            resp.status = Status::Partial;
            resp.reason = Some(why);
            tracing::info!(table = %lease.table, slice = %lease.slice, status = "partial", "progress saved");
            Ok(resp)
        }
        Err(e) => {
            if let Err(re) = app.store.release(lease).await {
                tracing::warn!(error = %re, "could not give the slice back; its lease will expire");
            }
            match e.kind() {
                ErrorKind::Deadline => {
                    resp.status = Status::Partial;
                    resp.reason = Some(e.to_string());
                    tracing::warn!(table = %lease.table, slice = %lease.slice, status = "partial", error = %e, "slice left pending");
                    Ok(resp)
                }
                ErrorKind::PaymentRequired => {
                    resp.status = Status::Skipped;
                    resp.reason = Some(e.to_string());
                    tracing::warn!(table = %lease.table, status = "skipped", error = %e, "table skipped");
                    Ok(resp)
                }
                _ => {
                    tracing::error!(table = %lease.table, slice = %lease.slice, kind = %e.kind(), error = %e, "slice failed");
                    Err(e)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_of_the_contract_parse() {
        let d = |s: &str| s.parse::<Date>().unwrap();
        assert_eq!(
            parse_event(&json!({"table": "export"})).unwrap(),
            Invocation::Scheduled(Table::Export)
        );
        assert_eq!(
            parse_event(&json!({"table": "export", "date": "2026-11-01"})).unwrap(),
            Invocation::Day(Table::Export, d("2026-11-01"))
        );
        assert_eq!(
            parse_event(&json!({"table": "export", "from": "2026-10-01", "to": "2026-10-31"}))
                .unwrap(),
            Invocation::Range(Table::Export, d("2026-10-01"), d("2026-10-31"))
        );
        assert_eq!(
            parse_event(&json!({"table": "engage"})).unwrap(),
            Invocation::Scheduled(Table::Engage)
        );
    }

    #[test]
    fn bad_events_say_what_is_wrong() {
        for (ev, says) in [
            (json!({"table": "exports"}), "unknown table \"exports\""),
            (
                json!({"table": "export", "date": "2026-11-31"}),
                "`date` must be a date YYYY-MM-DD, got \"2026-11-31\"",
            ),
            (
                json!({"table": "export", "from": "2026-11-02", "to": "2026-11-01"}),
                "`from` (2026-11-02) is after `to` (2026-11-01)",
            ),
            (
                json!({"table": "export", "day": "2026-11-01"}),
                "unknown field `day`",
            ),
            (
                json!({"table": "export", "from": "2026-11-01"}),
                "`from` needs `to`",
            ),
            (
                json!({"table": "engage", "date": "2026-11-01"}),
                "engage is a full table",
            ),
            (json!({}), "missing field `table`"),
            (json!([1]), "expected a JSON object"),
            (json!({"table": 7}), "`table` must be a string"),
        ] {
            let e = parse_event(&ev).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidEvent);
            assert!(e.to_string().contains(says), "{ev}: {e}");
        }
    }

    #[test]
    fn a_past_deadline_falls_back_to_the_budget() {
        let budget = Duration::from_secs(840);
        let past = SystemTime::now() - Duration::from_secs(5);
        let d = effective_deadline(Some(past), budget);
        assert!(d > Instant::now() + Duration::from_secs(800));
        let soon = SystemTime::now() + Duration::from_secs(100);
        let d = effective_deadline(Some(soon), budget);
        assert!(d < Instant::now() + Duration::from_secs(101));
    }
}
