//! The invocation: parse the event, plan, claim a slice, replicate it, answer.

pub mod sqs;

use std::time::{Duration, SystemTime};

use jiff::civil::Date;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use crate::app::App;
use crate::config::parse_date;
use crate::error::{Error, Result};
use crate::plan;
use crate::state::SliceId;
use crate::tables::Table;
use crate::tables::export::project_today;

use crate::run::drain;
pub use crate::run::{Response, Status, attempt_slice, lease_times, new_attempt_id, run_slice};

/// A validated invocation event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invocation {
    /// `{"table": T}`: plan, then replicate one pending slice (or the snapshot).
    Scheduled(Table),
    /// `{"table": T, "date": D}`: replicate exactly this day.
    Day(Table, Date),
    /// `{"table": T, "from": A, "to": B}`: queue one slice per day and answer with their events.
    Range(Table, Date, Date),
    /// `{"table": T, "retry_parked": true}`: a person's retry of every parked slice of the table
    /// (and of a remembered skip), then as scheduled.
    RetryParked(Table),
    /// `{"table": "engage", "full": true}`: a snapshot now that lists every profile, not only
    /// the changed ones (`cohort_members`: every cohort's members, none kept); then as
    /// scheduled.
    FullListing(Table),
    /// `{"check": true}`: test the settings, the credentials, the state store and each table's
    /// access, writing nothing (`check`).
    Check,
}

impl Invocation {
    /// The table the event is about (none for a check).
    pub fn table(&self) -> Option<Table> {
        match *self {
            Invocation::Scheduled(t)
            | Invocation::Day(t, _)
            | Invocation::Range(t, _, _)
            | Invocation::RetryParked(t)
            | Invocation::FullListing(t) => Some(t),
            Invocation::Check => None,
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
    retry_parked: Option<Value>,
    full: Option<Value>,
    check: Option<Value>,
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
    match raw.check {
        None => {}
        Some(Value::Bool(true)) => {
            return match v.as_object().map_or(0, |o| o.len()) {
                1 => Ok(Invocation::Check),
                _ => Err(Error::event(
                    "`check` takes no other field: the event is {\"check\": true}",
                )),
            };
        }
        Some(other) => {
            return Err(Error::event(format!("`check` must be true, got {other}")));
        }
    }
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
    let retry_parked = match raw.retry_parked {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(other) => {
            return Err(Error::event(format!(
                "`retry_parked` must be true or false, got {}",
                kind_of(&other)
            )));
        }
    };
    let full = match raw.full {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(other) => {
            return Err(Error::event(format!(
                "`full` must be true or false, got {}",
                kind_of(&other)
            )));
        }
    };
    if full {
        if !matches!(table, Table::Engage | Table::CohortMembers) {
            return Err(Error::event(format!(
                "`full` is for engage and cohort_members (every profile or member listed again); {table} is always read whole"
            )));
        }
        if retry_parked {
            return Err(Error::event(
                "`full` cannot be combined with `retry_parked`",
            ));
        }
        return Ok(Invocation::FullListing(table));
    }
    if retry_parked {
        return match (day, from, to) {
            (None, None, None) => Ok(Invocation::RetryParked(table)),
            _ => Err(Error::event(
                "`retry_parked` takes no `date`, `from` or `to` (a day event retries its day)",
            )),
        };
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

/// The deadline to work to: the runtime's when it is in the future, else now + `budget`
/// (`cargo lambda watch` sends one in the past).
pub fn effective_deadline(runtime_deadline: Option<SystemTime>, budget: Duration) -> Instant {
    let now = Instant::now();
    match runtime_deadline.and_then(|d| d.duration_since(SystemTime::now()).ok()) {
        Some(left) if left > Duration::from_secs(1) => now + left,
        _ => now + budget,
    }
}

/// The answer to what Lambda delivered: an invocation's, or an SQS event's batch answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    /// The answer to an invocation event.
    Invocation(Response),
    /// The answer to an SQS event of the fan-out queue: the records not finished.
    Batch(crate::handler::sqs::BatchResponse),
    /// The answer to `{"check": true}`: each check's line, and whether all passed.
    Check(crate::check::Answer),
}

/// Handles what Lambda delivered, an invocation event or an SQS event of them, and reports it
/// (per invocation event: a summary log line, and EMF metrics when `emf`; a check logs its
/// lines and has no table to measure).
pub async fn answer(app: &App, event: Value, deadline: Instant, emf: bool) -> Result<Answer> {
    if crate::handler::sqs::is_sqs_event(&event) {
        crate::handler::sqs::handle_batch(app, &event, deadline, emf)
            .await
            .map(Answer::Batch)
    } else if matches!(parse_event(&event), Ok(Invocation::Check)) {
        Ok(Answer::Check(crate::check::answer(app).await))
    } else {
        handle_reported(app, event, deadline, emf)
            .await
            .map(Answer::Invocation)
    }
}

/// Checks an event before anything is built: an invocation event, or the envelope of an SQS
/// event (its bodies are checked record by record when it runs).
pub fn check_event(v: &Value) -> Result<()> {
    if crate::handler::sqs::is_sqs_event(v) {
        crate::handler::sqs::parse_sqs_event(v).map(|_| ())
    } else {
        parse_event(v).map(|_| ())
    }
}

/// Handles one invocation event and reports it: a summary log line, and EMF metrics when `emf`.
pub async fn handle_reported(
    app: &App,
    event: Value,
    deadline: Instant,
    emf: bool,
) -> Result<Response> {
    // Only a valid table name becomes a metric dimension.
    let table = parse_event(&event)
        .ok()
        .and_then(|i| i.table())
        .map_or("invalid", Table::as_str);
    reported(app, table, emf, handle(app, event, deadline), |r| r).await
}

/// Runs `work` (an invocation of `table`) and reports it: a summary log line with what it
/// asked of Mixpanel, and EMF metrics when `emf`. `response` is the invocation's answer in
/// what `work` returns.
pub(crate) async fn reported<T>(
    app: &App,
    table: &str,
    emf: bool,
    work: impl Future<Output = Result<T>>,
    response: fn(&T) -> &Response,
) -> Result<T> {
    let started = Instant::now();
    let before = crate::metrics::StatsSnapshot::take(app.mixpanel.stats());
    let result = work.await;
    let after = crate::metrics::StatsSnapshot::take(app.mixpanel.stats());
    // The table's freshness and parked slices, as the store says after the invocation.
    let (lag, parked_now) = match table.parse::<Table>() {
        Ok(t) => match app.store.slices(t).await {
            Ok(slices) => (
                crate::run::freshness_lag_seconds(&slices, &app.settings.timezone, app.clock.now()),
                Some(
                    slices
                        .iter()
                        .filter(|r| r.status == crate::state::SliceStatus::Failed)
                        .count() as u64,
                ),
            ),
            Err(e) => {
                tracing::warn!(table, error = %e, "could not read the slices to tell the freshness lag and parked slices");
                (None, None)
            }
        },
        Err(_) => (None, None),
    };
    crate::metrics::report(
        &crate::metrics::Summary {
            table,
            outcome: result.as_ref().map(response),
            duration_ms: started.elapsed().as_millis() as u64,
            requests: (before, after),
            freshness_lag_s: lag,
            parked_now,
        },
        emf,
        app.clock.as_ref(),
    );
    result
}

/// Handles one invocation event.
pub async fn handle(app: &App, event: Value, deadline: Instant) -> Result<Response> {
    let inv = parse_event(&event)?;
    let now = app.clock.now();
    let today = project_today(&app.settings.timezone, now);
    let store = app.store.as_ref();
    match inv {
        Invocation::RetryParked(t) => {
            crate::skip::forget(app, t).await?;
            let retried = crate::park::retry_all(store, t).await?;
            tracing::info!(table = %t, slices = retried.len(), "parked slices retried");
        }
        Invocation::Scheduled(t) | Invocation::Day(t, _) | Invocation::FullListing(t) => {
            if let Some(reason) = crate::skip::remembered(app, t).await? {
                let mut r = Response::new(Status::Skipped, t);
                r.reason = Some(format!(
                    "{reason} (remembered: asked again after MIXPANEL_SKIP_RECHECK_HOURS, or with {{\"table\": \"{t}\", \"retry_parked\": true}})"
                ));
                return Ok(r);
            }
        }
        Invocation::Range(..) | Invocation::Check => {}
    }
    match inv {
        // `answer` runs it; only an SQS record's body would come here.
        Invocation::Check => Err(Error::event(
            "{\"check\": true} is answered by the function itself, not through the fan-out queue",
        )),
        Invocation::FullListing(t) => {
            let queued = crate::run::snapshot::changed::start_full(app, t).await?;
            let mut resp = drain(app, t, deadline).await?;
            resp.queued = u64::from(queued);
            Ok(resp)
        }
        Invocation::Scheduled(t) | Invocation::RetryParked(t) => {
            let queued = plan::queue_table(store, &app.settings, t, now).await?;
            let mut resp = drain(app, t, deadline).await?;
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
            // hours: its hours, then the day's commit from them), and even if it was parked:
            // it is a person's retry.
            let slices = store.slices(t).await?;
            for r in slices
                .iter()
                .filter(|r| r.slice.day() == Some(d) && r.slice != SliceId::Full)
            {
                store.reset_failures(t, r.slice).await?;
            }
            plan::requeue_day(store, &slices, t, d, u64::MAX).await?;
            let owner = new_attempt_id();
            let (now_ms, until) = lease_times(app.clock.as_ref(), deadline);
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
            let events: Vec<Value> = days
                .iter()
                .map(|d| serde_json::json!({"table": t.as_str(), "date": d.to_string()}))
                .collect();
            // Every day's event, queued or not: a message for a day committed or leased does
            // nothing, and a day pending since an earlier range gets its worker.
            if let Some(queue) = &app.fan_out {
                queue.send(&events).await?;
            }
            let mut r = Response::new(Status::FanOut, t);
            r.queued = queued.len() as u64;
            r.events = Some(events);
            Ok(r)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
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
        assert_eq!(
            parse_event(&json!({"table": "engage", "full": true})).unwrap(),
            Invocation::FullListing(Table::Engage)
        );
        assert_eq!(
            parse_event(&json!({"table": "engage", "full": false})).unwrap(),
            Invocation::Scheduled(Table::Engage)
        );
        assert_eq!(
            parse_event(&json!({"check": true})).unwrap(),
            Invocation::Check
        );
        assert_eq!(Invocation::Check.table(), None);
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
                json!({"table": "export", "full": true}),
                "`full` is for engage and cohort_members",
            ),
            (
                json!({"table": "engage", "full": "yes"}),
                "`full` must be true or false, got a string",
            ),
            (
                json!({"table": "engage", "full": true, "retry_parked": true}),
                "`full` cannot be combined with `retry_parked`",
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
            (json!({"check": false}), "`check` must be true, got false"),
            (
                json!({"check": true, "table": "export"}),
                "`check` takes no other field",
            ),
            (json!({"check": true, "nope": 1}), "unknown field `nope`"),
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
