//! Replication of claimed slices: the scheduler and each kind of table's runner.
//!
//! The scheduler (this module) spends an invocation's time on a table's slice queue: it claims
//! the oldest claimable slice (never-committed first, see [`plan::claim_next_seeing`]), runs it
//! with its table's runner under its lease, records a failure on the slice, works through the
//! queue while the deadline allows ([`drain`]) and sends what it cannot finish to the fan-out
//! queue (`fan_out`); a day the queue delivers back is looked at by [`queued_day`].
//! Planning and claiming are [`plan`]'s.
//!
//! The runners: [`export`] (one day or hour: fetch, [`spill`] deduplication, parts;
//! [`setaside`] keeps unusable lines), [`split`] (days too heavy for one request, in hours),
//! [`window`] (small days in one request), [`dated`] (funnels and revenue in date windows),
//! [`snapshot`] (the full tables), [`discovery`] (the properties a table has). [`commit`]
//! makes a slice's parts visible with its manifest. The handler and the command call this
//! module, and no module here calls them.

pub mod commit;
pub mod dated;
pub mod discovery;
pub mod export;
pub mod setaside;
pub mod snapshot;
pub mod spill;
pub mod split;
pub mod window;

use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

use crate::app::App;
use crate::clock::Clock;
use crate::error::{Error, ErrorKind, Result};
use crate::plan;
use crate::run::export::SliceResult;
use crate::state::{SliceId, SliceRecord, SliceStatus};
use crate::tables::export::project_today;
use crate::tables::{Runner, Table};

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
    /// Export source lines that could not be used, kept raw under `_rejected/`.
    #[serde(skip_serializing_if = "is_zero")]
    pub rejected: u64,
    /// Slices queued by this invocation.
    #[serde(skip_serializing_if = "is_zero")]
    pub queued: u64,
    /// Slices whose attempt failed in this invocation (they are tried again later, or parked).
    #[serde(skip_serializing_if = "is_zero")]
    pub failed: u64,
    /// Slices of the table parked after failing `MAX_SLICE_ATTEMPTS` times (as far as this
    /// invocation saw).
    #[serde(skip_serializing_if = "is_zero")]
    pub parked: u64,
    /// Slices committed by this invocation (a scheduled one works through several).
    #[serde(skip_serializing_if = "is_zero")]
    pub slices: u64,
    /// The per-day events of a fan-out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<Value>>,
    /// Why it was skipped, partial or idle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Partial because Mixpanel's rate limit left no room before the deadline (for `sync`,
    /// which then waits).
    #[serde(skip)]
    pub rate_limited: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Response {
    /// An answer with `status` and nothing counted yet.
    pub(crate) fn new(status: Status, table: Table) -> Self {
        Response {
            status,
            table: table.to_string(),
            slice: None,
            records: 0,
            bytes: 0,
            files: 0,
            duplicates: 0,
            rejected: 0,
            queued: 0,
            failed: 0,
            parked: 0,
            slices: 0,
            events: None,
            reason: None,
            rate_limited: false,
        }
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

/// Now and the end of a lease that outlives this invocation (so it is never taken while we run).
pub fn lease_times(clock: &dyn Clock, deadline: Instant) -> (u64, u64) {
    let now_ms = clock.now_ms();
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
    let discovered = crate::run::discovery::discover(app, Table::Export, deadline).await?;
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

/// Works through the pending slices of `table`, oldest first, while the deadline allows one
/// more (judged by the slowest so far) and the shared request budget grants requests. Answers
/// `done` with every slice committed (`slice` lists them) when nothing claimable is left,
/// `partial` when work remains (the deadline, a rate limit, a slice's own partial answer) or a
/// slice failed (it is recorded; it backs off, so the next invocation goes on with the others),
/// `idle` when there was nothing to do.
pub async fn drain(app: &App, table: Table, deadline: Instant) -> Result<Response> {
    let store = app.store.as_ref();
    let mut total: Option<Response> = None;
    let mut labels: Vec<String> = Vec::new();
    let mut slowest = Duration::ZERO;
    loop {
        let owner = new_attempt_id();
        let (now_ms, until) = lease_times(app.clock.as_ref(), deadline);
        let (claim, slices) =
            plan::claim_next_seeing(store, table, None, &owner, now_ms, until).await?;
        let parked = crate::park::parked(&slices).count() as u64;
        let Some(claim) = claim else {
            return Ok(match total {
                Some(mut r) => {
                    r.parked = r.parked.max(parked);
                    r
                }
                None => {
                    let mut r = Response::new(Status::Idle, table);
                    r.parked = parked;
                    r.reason = Some(if parked > 0 {
                        format!("nothing pending but {parked} parked slice(s); see `plan`")
                    } else {
                        "nothing pending".into()
                    });
                    r
                }
            });
        };
        let began = Instant::now();
        let (r, _) = attempt_slice(app, &claim, deadline).await?;
        slowest = slowest.max(began.elapsed());
        let acc = total.get_or_insert_with(|| Response::new(Status::Done, table));
        acc.records += r.records;
        acc.bytes += r.bytes;
        acc.files += r.files;
        acc.duplicates += r.duplicates;
        acc.rejected += r.rejected;
        acc.failed += r.failed;
        acc.parked = acc.parked.max(parked) + r.parked;
        if r.status == Status::Done {
            acc.slices += r.slices;
            labels.extend(r.slice.clone());
            acc.slice = Some(labels.join(","));
        } else {
            // Partial (deadline, rate limit, progress saved) or failed (recorded): what was
            // committed stays committed; the next invocation goes on.
            acc.status = r.status;
            acc.reason = r.reason;
            acc.rate_limited = r.rate_limited;
            if labels.is_empty() {
                acc.slice = r.slice;
            }
            return Ok(total.unwrap_or_else(|| Response::new(Status::Partial, table)));
        }
        // Another slice only when one as slow as the slowest so far surely fits.
        let needs = slowest.mul_f64(1.5) + Duration::from_secs(1);
        if Instant::now() + needs > deadline {
            // Read again: the slice just run may have been a window that committed the days
            // after it too (export, funnels, revenue).
            let slices = store.slices(table).await?;
            let now_ms = app.clock.now_ms();
            let left = slices
                .iter()
                .filter(|s| plan::claimable(s, now_ms) && !plan::waits_for_hours(&slices, s))
                .count();
            if left > 0 {
                acc.status = Status::Partial;
                acc.reason = Some(format!(
                    "the deadline is near: {left} slice(s) stay pending for the next invocation"
                ));
                // What was committed stays committed: a queue that cannot be reached only
                // leaves the days to the next scheduled invocations.
                match dispatch(app, table, &slices, &claim, now_ms).await {
                    Ok(Some(sent)) => {
                        acc.reason = Some(format!(
                            "the deadline is near: {left} slice(s) stay pending; {} day event(s) sent to the fan-out queue",
                            sent.len()
                        ));
                        acc.events = Some(sent);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(table = %table, error = %e, "could not send the pending days to the fan-out queue; scheduled invocations go on with them");
                    }
                }
            }
            return Ok(total.unwrap_or_else(|| Response::new(Status::Partial, table)));
        }
    }
}

/// A scheduled invocation that cannot finish the pending days sends the oldest of them (days
/// not split, claimable, not the one it just did) to the fan-out queue, at most
/// `FAN_OUT_CONCURRENCY`, so that the queue's concurrent invocations take them. A day that
/// another invocation claims first finds its message a no-op. Returns the events sent; `None`
/// without a queue.
async fn dispatch(
    app: &App,
    table: Table,
    slices: &[crate::state::SliceRecord],
    done: &plan::Claim,
    now_ms: u64,
) -> Result<Option<Vec<Value>>> {
    let Some(queue) = &app.fan_out else {
        return Ok(None);
    };
    if !table.is_date_sliced() {
        return Ok(None);
    }
    let events: Vec<Value> = slices
        .iter()
        .filter(|s| s.slice.day() != done.lease.slice.day())
        .filter(|s| plan::claimable(s, now_ms) && !plan::waits_for_hours(slices, s))
        .filter_map(|s| match s.slice {
            SliceId::Day(d) => Some(d),
            _ => None,
        })
        .take(app.settings.fan_out_concurrency as usize)
        .map(|d| serde_json::json!({"table": table.as_str(), "date": d.to_string()}))
        .collect();
    if events.is_empty() {
        return Ok(None);
    }
    queue.send(&events).await?;
    Ok(Some(events))
}

pub async fn run_slice(app: &App, claim: &plan::Claim, deadline: Instant) -> Result<Response> {
    match attempt_slice(app, claim, deadline).await? {
        (_, Some(e)) => Err(e),
        (resp, None) => Ok(resp),
    }
}

/// Replicates a claimed slice. A failure of the slice's own (see `park::counts`) is
/// recorded on it and comes back as a `partial` answer (`failed` 1, `parked` 1 when it parked
/// it) with the error; other failures (settings, credentials, state store) are the `Err`.
pub async fn attempt_slice(
    app: &App,
    claim: &plan::Claim,
    deadline: Instant,
) -> Result<(Response, Option<Error>)> {
    let lease = &claim.lease;
    let started = Instant::now();
    let work_deadline = deadline - margin(deadline.saturating_duration_since(started));
    if lease.table.spec().runner != Runner::Export {
        // Only an export day starts a window that claims more.
        claim.gate.open();
    }
    let result = match lease.table.spec().runner {
        Runner::Export => match first_discovery(app, work_deadline).await {
            Ok(()) => crate::run::split::run(app, claim, work_deadline)
                .await
                .map(|r| match r {
                    crate::run::split::Ran::Done(r, label) => Ran::Done(r, Some(label)),
                    crate::run::split::Ran::Partial(why) => Ran::Partial(why),
                }),
            Err(e) => Err(e),
        },
        Runner::Dated => crate::run::dated::run(app, lease, work_deadline)
            .await
            .map(|r| match r {
                crate::run::dated::Ran::Done(r, label) => Ran::Done(r, Some(label)),
                crate::run::dated::Ran::Partial(why) => Ran::Partial(why),
            }),
        Runner::Snapshot => crate::run::snapshot::run(app, lease, work_deadline)
            .await
            .map(|o| match o {
                crate::run::snapshot::Outcome::Done(r) => Ran::Done(r, None),
                crate::run::snapshot::Outcome::Partial(why) => Ran::Partial(why),
            }),
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
                rejected,
            },
            label,
        )) => {
            if let Some(label) = label {
                resp.slice = Some(label);
            }
            // A multi-day window (`a..b`) committed each of its days.
            resp.slices = resp.slice.as_deref().map_or(1, window::days_in_label);
            resp.records = records;
            resp.bytes = bytes;
            resp.files = files;
            resp.duplicates = duplicates;
            resp.rejected = rejected;
            tracing::info!(
                table = %lease.table, slice = resp.slice.as_deref().unwrap_or_default(), status = "done", records, bytes, files, duplicates, rejected, raw_bytes,
                duration_ms = started.elapsed().as_millis() as u64, "slice committed"
            );
            Ok((resp, None))
        }
        Ok(Ran::Partial(why)) => {
            give_back(app, lease).await;
            resp.status = Status::Partial;
            resp.reason = Some(why);
            tracing::info!(table = %lease.table, slice = %lease.slice, status = "partial", "progress saved");
            Ok((resp, None))
        }
        Err(e) if crate::park::counts(e.kind()) => {
            let before = claim.slices.iter().find(|r| r.slice == lease.slice);
            let recorded = match crate::park::record(app, lease, before, &e).await {
                Ok(r) => r,
                Err(re) => {
                    tracing::warn!(error = %re, "could not record the failed attempt; the lease will expire");
                    None
                }
            };
            let what = recorded
                .as_ref()
                .map(|r| r.describe(app.settings.max_slice_attempts, app.clock.now_ms()))
                .unwrap_or_else(|| "its lease will expire".into());
            resp.status = Status::Partial;
            resp.failed = 1;
            if matches!(recorded, Some(crate::park::Recorded::Parked { .. })) {
                resp.parked = 1;
            }
            resp.reason = Some(format!("{} {what}: {}: {e}", lease.slice, e.kind()));
            Ok((resp, Some(e)))
        }
        Err(e) => {
            give_back(app, lease).await;
            match e.kind() {
                ErrorKind::Deadline => {
                    resp.status = Status::Partial;
                    resp.reason = Some(e.to_string());
                    tracing::warn!(table = %lease.table, slice = %lease.slice, status = "partial", error = %e, "slice left pending");
                    Ok((resp, None))
                }
                // Mixpanel's quota is spent beyond this invocation's time: progress is kept,
                // and a later invocation goes on (a Lambda error would only be retried sooner).
                ErrorKind::RateLimited => {
                    resp.status = Status::Partial;
                    resp.reason = Some(format!("RateLimited: {e}"));
                    resp.rate_limited = true;
                    tracing::warn!(table = %lease.table, slice = %lease.slice, status = "partial", error = %e, "rate limited; slice left pending");
                    Ok((resp, None))
                }
                ErrorKind::PaymentRequired => {
                    if let Err(re) = crate::skip::remember(app, lease.table, e.message()).await {
                        tracing::warn!(error = %re, "could not remember that the table is skipped");
                    }
                    resp.status = Status::Skipped;
                    resp.reason = Some(e.to_string());
                    tracing::warn!(table = %lease.table, status = "skipped", error = %e, "table skipped");
                    Ok((resp, None))
                }
                _ => {
                    tracing::error!(table = %lease.table, slice = %lease.slice, kind = %e.kind(), error = %e, "slice failed");
                    Err(e)
                }
            }
        }
    }
}

async fn give_back(app: &App, lease: &crate::state::Lease) {
    if let Err(re) = app.store.release(lease).await {
        tracing::warn!(error = %re, "could not give the slice back; its lease will expire");
    }
}

/// A day event from the queue: claims the day's pending slices and replicates them, or, when
/// the day is committed, leased or parked, does nothing. Unlike a day event invoked by a
/// person, it never re-queues a committed day nor retries a parked one: a message may be a
/// duplicate or late, and the state store decides.
pub async fn queued_day(
    app: &App,
    table: Table,
    day: jiff::civil::Date,
    deadline: Instant,
) -> Result<(Response, bool)> {
    let today = project_today(&app.settings.timezone, app.clock.now());
    if day > today {
        return Err(Error::event(format!(
            "`date` {day} is after today ({today}) in the project's timezone"
        )));
    }
    if let Some(reason) = crate::skip::remembered(app, table).await? {
        let mut r = Response::new(Status::Skipped, table);
        r.slice = Some(day.to_string());
        r.reason = Some(reason);
        return Ok((r, true));
    }
    let store = app.store.as_ref();
    let slices = store.slices(table).await?;
    // A message for a day the store does not know (sent by hand, or after the state was reset)
    // queues it, as a range event would have.
    if !slices.iter().any(|r| r.slice.day() == Some(day)) {
        store.enqueue(table, SliceId::Day(day), None).await?;
    }
    let owner = new_attempt_id();
    let (now_ms, until) = lease_times(app.clock.as_ref(), deadline);
    let resp = match plan::claim_next_of(store, table, Some(day), &owner, now_ms, until).await? {
        Some(claim) => match attempt_slice(app, &claim, deadline).await? {
            // The failure is recorded on the slice (tried again, or parked).
            (resp, Some(_)) => return Ok((resp, false)),
            (resp, None) => resp,
        },
        None => {
            let mut r = Response::new(Status::Idle, table);
            r.slice = Some(day.to_string());
            r
        }
    };
    let now_ms = app.clock.now_ms();
    let slices = store.slices(table).await?;
    let (finished, why) = settled(&slices, day, now_ms);
    let mut resp = resp;
    if resp.status == Status::Idle {
        resp.reason = Some(why.into());
    }
    let finished = finished && resp.status != Status::Partial;
    Ok((resp, finished))
}

/// Whether nothing of `day` is left for this message to do, and in what state the day is.
fn settled(slices: &[SliceRecord], day: jiff::civil::Date, now_ms: u64) -> (bool, &'static str) {
    let of_day: Vec<&SliceRecord> = slices
        .iter()
        .filter(|r| r.slice.day() == Some(day))
        .collect();
    if of_day.is_empty() {
        return (false, "not queued");
    }
    let mut why = "committed";
    for r in of_day {
        match r.status {
            SliceStatus::Committed => {}
            SliceStatus::Failed => why = "parked: retry it with a day event",
            SliceStatus::Leased if r.lease_expires_ms.is_some_and(|e| e >= now_ms) => {
                if why == "committed" {
                    why = "another invocation is replicating it";
                }
            }
            SliceStatus::Leased | SliceStatus::Pending => {
                return (false, "pending: backing off after a failed attempt");
            }
        }
    }
    (true, why)
}

/// How old the newest replicated data of a table is, in seconds, from its slices: for a table
/// by day, now minus the latest instant its committed days hold (a day's end, or the time it
/// was committed when that came first: today committed at 10:00 holds data up to 10:00); for a
/// snapshot, now minus its last commit. A slice re-queued for a refresh still holds what it
/// last committed. `None` before anything was committed.
pub fn freshness_lag_seconds(
    slices: &[SliceRecord],
    tz: &jiff::tz::TimeZone,
    now: Timestamp,
) -> Option<u64> {
    let held_until_ms = slices
        .iter()
        .filter_map(|r| {
            let committed = r.committed_at_ms?;
            match r.slice {
                SliceId::Full => Some(committed),
                SliceId::Day(day) => {
                    let end = day
                        .tomorrow()
                        .ok()?
                        .to_zoned_datetime(tz.clone())
                        .ok()?
                        .timestamp()
                        .as_millisecond();
                    Some(committed.min(u64::try_from(end).unwrap_or(0)))
                }
                _ => None,
            }
        })
        .max()?;
    let now_ms = u64::try_from(now.as_millisecond()).unwrap_or(0);
    Some(now_ms.saturating_sub(held_until_ms) / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::SliceStatus;

    fn record(slice: SliceId, status: SliceStatus, committed_at: Option<&str>) -> SliceRecord {
        SliceRecord {
            table: Table::Export,
            slice,
            status,
            lease_owner: None,
            lease_expires_ms: None,
            committed_at_ms: committed_at
                .map(|t| t.parse::<Timestamp>().unwrap().as_millisecond() as u64),
            attempts: 0,
            progress: None,
            result: None,
            failures: 0,
            retry_at_ms: None,
            error: None,
        }
    }

    #[test]
    fn the_freshness_lag_counts_from_the_newest_data_a_commit_holds() {
        let la = jiff::tz::TimeZone::get("America/Los_Angeles").unwrap();
        let now: Timestamp = "2026-12-02T20:00:00Z".parse().unwrap();
        let day = |s: &str| SliceId::Day(s.parse().unwrap());
        // Nothing committed yet: no lag to tell.
        let pending = [record(day("2026-12-01"), SliceStatus::Pending, None)];
        assert_eq!(freshness_lag_seconds(&pending, &la, now), None);
        // Yesterday (Los Angeles) committed after its end: its data ends at its midnight,
        // 08:00 UTC today; today committed at 18:00 UTC holds data up to then: 2 hours.
        let mut slices = vec![
            record(
                day("2026-11-30"),
                SliceStatus::Committed,
                Some("2026-12-02T09:00:00Z"),
            ),
            record(
                day("2026-12-01"),
                SliceStatus::Committed,
                Some("2026-12-02T09:30:00Z"),
            ),
        ];
        assert_eq!(freshness_lag_seconds(&slices, &la, now), Some(12 * 3600));
        // Re-queued for a refresh, today still holds what it last committed.
        slices.push(record(
            day("2026-12-02"),
            SliceStatus::Pending,
            Some("2026-12-02T18:00:00Z"),
        ));
        assert_eq!(freshness_lag_seconds(&slices, &la, now), Some(2 * 3600));
        // Hour slices say nothing of their own; a snapshot's lag is its age.
        let snapshot = [record(
            SliceId::Full,
            SliceStatus::Leased,
            Some("2026-12-02T19:59:00Z"),
        )];
        assert_eq!(freshness_lag_seconds(&snapshot, &la, now), Some(60));
        // A commit stamped after now (clocks apart) is no negative lag.
        let ahead = [record(
            SliceId::Full,
            SliceStatus::Committed,
            Some("2026-12-02T20:00:05Z"),
        )];
        assert_eq!(freshness_lag_seconds(&ahead, &la, now), Some(0));
    }

    /// The handler and the command call the core; no core module calls them back.
    #[test]
    fn no_core_module_calls_the_handler_or_the_command() {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        walk(&src, &mut files);
        // The callers: the Lambda handler, the command line (and its demo), the binary.
        let callers = ["handler", "cli", "main.rs", "lib.rs"];
        let mut offenders = Vec::new();
        for f in &files {
            let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
            if callers.iter().any(|c| rel.starts_with(c)) {
                continue;
            }
            let text = std::fs::read_to_string(f).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                if code.contains(concat!("crate::", "handler"))
                    || code.contains(concat!("crate::", "cli"))
                {
                    offenders.push(format!("src/{rel}:{}: {}", n + 1, line.trim()));
                }
            }
        }
        assert!(files.len() > 30, "{} files under src", files.len());
        assert!(offenders.is_empty(), "{offenders:#?}");
    }

    /// The top-level modules depend on each other without cycles, tables never see the state
    /// store, and the request budget sees only its ledger: a reader can follow the layers.
    #[test]
    fn the_top_level_modules_form_layers_without_cycles() {
        use std::collections::{BTreeMap, BTreeSet};
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut stack = vec![src.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let rel = path
                    .strip_prefix(&src)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                let module = rel
                    .split('/')
                    .next()
                    .unwrap()
                    .trim_end_matches(".rs")
                    .to_string();
                if module == "lib" || module == "main" {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                // Code only: not the tests, not comments.
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                for line in code.lines() {
                    let line = line.split("//").next().unwrap_or_default();
                    for (i, _) in line.match_indices("crate::") {
                        let name: String = line[i + 7..]
                            .chars()
                            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                            .collect();
                        if !name.is_empty() && name != module {
                            deps.entry(module.clone()).or_default().insert(name);
                        }
                    }
                    if module == "tables" && line.contains("crate::state") {
                        panic!("src/{rel}: a table imports the state store: {line}");
                    }
                    if module == "ratelimit" && line.contains("StateStore") {
                        panic!("src/{rel}: the request budget names the state store: {line}");
                    }
                }
            }
        }
        assert!(deps.len() > 15, "{deps:?}");
        // Depth-first search for a cycle.
        fn visit(
            m: &str,
            deps: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) {
            if let Some(at) = path.iter().position(|p| p == m) {
                panic!("a cycle of modules: {} -> {m}", path[at..].join(" -> "));
            }
            if done.contains(m) {
                return;
            }
            path.push(m.to_string());
            for d in deps.get(m).into_iter().flatten() {
                visit(d, deps, path, done);
            }
            path.pop();
            done.insert(m.to_string());
        }
        let mut done = BTreeSet::new();
        for m in deps.keys() {
            visit(m, &deps, &mut Vec::new(), &mut done);
        }
    }
}
