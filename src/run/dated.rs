//! Date-sliced query tables (`funnels`, `revenue`): the oldest pending day and the pending days
//! right after it, up to a window, are claimed together and read with one query per window
//! (per funnel), then each day's partition is written and committed on its own lease. A funnels
//! window whose funnels do not all fit one invocation keeps per-funnel progress and completes
//! across invocations.

use std::collections::BTreeMap;

use bytes::Bytes;
use jiff::civil::Date;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::app::App;
use crate::config::Residency;
use crate::error::{Cause, Error, ErrorKind, Result};
use crate::plan;
use crate::run::commit::{self, FileEntry};
use crate::run::export::SliceResult;
use crate::sink::part;
use crate::state::{Lease, SliceId};
use crate::tables::{Table, funnels, revenue};

/// What an invocation did to a window.
pub enum Ran {
    /// Every day of the window committed: the total and the window (`from..to`).
    Done(SliceResult, String),
    /// Progress saved (funnels fetched so far); invoke again.
    Partial(String),
}

/// Where a funnels window stands, saved with its first day's slice so that the next invocation
/// goes on with the next funnel. A window with more funnels than one invocation (or one hour of
/// the query budget) can fetch thus completes across invocations; each day is still committed
/// once, with every funnel's rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FunnelsProgress {
    /// The window's last day, `YYYY-MM-DD` (its first is the slice's).
    to: String,
    /// The funnels to fetch, as listed when the window started: id and name (raw JSON).
    funnels: Vec<(u64, String)>,
    /// How many of them (in order) are fetched and written.
    done: usize,
    /// The parts written so far, by day (`YYYY-MM-DD`), in funnel order.
    parts: BTreeMap<String, Vec<FileEntry>>,
}

/// Replicates the window starting at `first` (already claimed).
pub async fn run(app: &App, first: &Lease, deadline: Instant) -> Result<Ran> {
    let saved = match first.table {
        Table::Funnels => saved_progress(app, first).await?,
        _ => None,
    };
    let until = saved.as_ref().and_then(|p| p.to.parse::<Date>().ok());
    let leases = claim_window(app, first, until).await?;
    let result = replicate(app, &leases, saved, deadline).await;
    if !matches!(result, Ok(Ran::Done(..))) {
        // The first lease is released by the caller; the others here.
        for l in leases.iter().skip(1) {
            let _ = app.store.release(l).await;
        }
    }
    result
}

/// The progress saved with the window's first day, if any.
async fn saved_progress(app: &App, first: &Lease) -> Result<Option<FunnelsProgress>> {
    let record = app
        .store
        .slices(first.table)
        .await?
        .into_iter()
        .find(|r| r.slice == first.slice);
    let Some(text) = record.and_then(|r| r.progress) else {
        return Ok(None);
    };
    let p: FunnelsProgress = serde_json::from_str(&text).map_err(|e| {
        Error::state(format!(
            "unreadable {} {} progress: {e}",
            first.table, first.slice
        ))
    })?;
    // Progress that names no window starting here is not this window's.
    let to = p.to.parse::<Date>().ok();
    Ok(first
        .slice
        .day()
        .filter(|d| to.is_some_and(|t| t >= *d))
        .map(|_| p))
}

/// The first lease plus the contiguous pending days after it, up to the window size (and up to
/// `until`, the end of a window in progress).
async fn claim_window(app: &App, first: &Lease, until: Option<Date>) -> Result<Vec<Lease>> {
    let mut leases = vec![first.clone()];
    let Some(mut day) = first.slice.day() else {
        return Err(Error::event(format!("{} slices are days", first.table)));
    };
    let now_ms = app.clock.now_ms();
    let slices = app.store.slices(first.table).await?;
    while leases.len() < app.settings.date_window_days as usize {
        let Ok(next) = day.tomorrow() else { break };
        if until.is_some_and(|u| next > u) {
            break;
        }
        let Some(rec) = slices.iter().find(|r| r.slice == SliceId::Day(next)) else {
            break;
        };
        if !plan::claimable(rec, now_ms) {
            break;
        }
        match app
            .store
            .claim(
                first.table,
                SliceId::Day(next),
                &first.owner,
                now_ms,
                first.expires_ms,
            )
            .await?
        {
            Some(l) => leases.push(l),
            None => break,
        }
        day = next;
    }
    Ok(leases)
}

async fn replicate(
    app: &App,
    leases: &[Lease],
    saved: Option<FunnelsProgress>,
    deadline: Instant,
) -> Result<Ran> {
    let table = leases[0].table;
    let days: Vec<Date> = leases.iter().filter_map(|l| l.slice.day()).collect();
    let (from, to) = (days[0], days[days.len() - 1]);
    // This invocation's rows, by day; parts written by earlier invocations are in `written`.
    let mut rows: BTreeMap<Date, Vec<u8>> = BTreeMap::new();
    let mut written: BTreeMap<Date, Vec<FileEntry>> = BTreeMap::new();
    let mc = &app.mixpanel;
    match table {
        Table::Funnels => {
            let mut progress = match saved {
                Some(p) => p,
                None => {
                    let list =
                        funnels::parse_list(&mc.query(funnels::LIST_PATH, &[], deadline).await?)?;
                    FunnelsProgress {
                        to: to.to_string(),
                        funnels: list.into_iter().map(|f| (f.id, f.name)).collect(),
                        done: 0,
                        parts: BTreeMap::new(),
                    }
                }
            };
            // A window resumed shorter (a later day is no longer pending) keeps its days only.
            progress.to = to.to_string();
            progress
                .parts
                .retain(|d, _| d.parse::<Date>().is_ok_and(|d| days.contains(&d)));
            let fetched = fetch_funnels(app, &mut progress, &mut rows, from, to, deadline).await;
            let stopped = match fetched {
                Ok(stopped) => stopped,
                Err(e) => {
                    // What was fetched is kept: the next attempt goes on from the next funnel.
                    if let Err(se) = save_funnels(app, leases, &mut progress, &mut rows).await {
                        tracing::warn!(error = %se, "could not save the funnels fetched so far");
                    }
                    return Err(e);
                }
            };
            if let Some(why) = stopped {
                save_funnels(app, leases, &mut progress, &mut rows).await?;
                return Ok(Ran::Partial(format!(
                    "funnels {}: {} of {} funnels fetched; {why}; progress saved, invoke again to go on with the next funnel",
                    window_label(from, to),
                    progress.done,
                    progress.funnels.len()
                )));
            }
            written = progress
                .parts
                .into_iter()
                .filter_map(|(d, files)| d.parse::<Date>().ok().map(|d| (d, files)))
                .collect();
        }
        Table::Revenue => {
            let body = match mc
                .query(revenue::PATH, &revenue::params(from, to), deadline)
                .await
            {
                Err(e) if eu_400(app, &e) => {
                    return Err(Error::new(
                        ErrorKind::PaymentRequired,
                        format!(
                            "Mixpanel's EU servers do not serve engage/revenue (they answer HTTP 400); the revenue table is skipped ({})",
                            e.message()
                        ),
                    ));
                }
                other => other?,
            };
            for (d, line) in revenue::rows(&body)? {
                rows.entry(d).or_default().extend_from_slice(&line);
            }
        }
        other => {
            return Err(Error::event(format!(
                "{other} is not a date-sliced query table"
            )));
        }
    }
    let mut total = SliceResult::default();
    // The days as claimed: a day parked by the shrink guard and retried by a person is
    // committed as read.
    let claimed = app.store.slices(table).await?;
    for lease in leases {
        let Some(day) = lease.slice.day() else {
            continue;
        };
        let before = claimed.iter().find(|r| r.slice == lease.slice);
        let guard = commit::ShrinkGuard::for_slice(app.settings.shrink_guard_percent, before);
        let (folder, _) = commit::date_partition(&app.prefix, table, lease.slice)?;
        let mut files = written.remove(&day).unwrap_or_default();
        let body = rows.remove(&day).unwrap_or_default();
        if let Some(f) = write_part(app, lease, &folder, files.len(), body).await? {
            files.push(f);
        }
        let (_, partition) = commit::date_partition(&app.prefix, table, lease.slice)?;
        let committed = commit::commit(
            app.store.as_ref(),
            app.sink.as_ref(),
            app.clock.as_ref(),
            lease,
            &folder,
            &partition,
            files,
            None,
            guard,
        )
        .await;
        let m = match committed {
            Ok(m) => m,
            // That day parks (for a person to judge); the window's other days go on.
            Err(e) if e.kind() == ErrorKind::Shrunk => {
                crate::park::record(app, lease, before, &e).await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        total.records += m.records;
        total.files += m.files.len() as u64;
        total.bytes += m.files.iter().map(|f| f.bytes).sum::<u64>();
    }
    crate::plan::advance_bookmark(app.store.as_ref(), table, app.settings.start_date).await?;
    let columns = match table {
        Table::Funnels => crate::tables::funnels::schema(),
        _ => crate::tables::revenue::schema(),
    };
    let schema = app.store.merge_schema(table, &columns).await?;
    commit::publish_schema(app, table, &schema).await?;
    Ok(Ran::Done(total, window_label(from, to)))
}

/// `from` or `from..to`.
fn window_label(from: Date, to: Date) -> String {
    if from == to {
        from.to_string()
    } else {
        format!("{from}..{to}")
    }
}

/// Fetches the funnels after `progress.done` into `rows`, one query per funnel over the window.
/// Returns why it stopped before the last one (the deadline, or no room left in the query
/// budget before it), or `None` when every funnel is fetched.
async fn fetch_funnels(
    app: &App,
    progress: &mut FunnelsProgress,
    rows: &mut BTreeMap<Date, Vec<u8>>,
    from: Date,
    to: Date,
    deadline: Instant,
) -> Result<Option<String>> {
    while let Some((id, name)) = progress.funnels.get(progress.done).cloned() {
        if Instant::now() >= deadline {
            return Ok(Some("deadline reached".into()));
        }
        let body = match app
            .mixpanel
            .query(funnels::PATH, &funnels::params(id, from, to), deadline)
            .await
        {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::Deadline => return Ok(Some(e.message().to_string())),
            Err(e) => return Err(e),
        };
        for (d, line) in funnels::rows(&funnels::Funnel { id, name }, &body)? {
            // A day outside the window (Mixpanel answers only the days asked) has no slice here.
            if d >= from && d <= to {
                rows.entry(d).or_default().extend_from_slice(&line);
            }
        }
        progress.done += 1;
    }
    Ok(None)
}

/// Writes this invocation's rows as a part of each day and saves the progress naming them with
/// the window's first day (under its lease).
async fn save_funnels(
    app: &App,
    leases: &[Lease],
    progress: &mut FunnelsProgress,
    rows: &mut BTreeMap<Date, Vec<u8>>,
) -> Result<()> {
    for lease in leases {
        let Some(day) = lease.slice.day() else {
            continue;
        };
        let body = rows.remove(&day).unwrap_or_default();
        let (folder, _) = commit::date_partition(&app.prefix, lease.table, lease.slice)?;
        let index = progress.parts.get(&day.to_string()).map_or(0, Vec::len);
        if let Some(f) = write_part(app, lease, &folder, index, body).await? {
            progress.parts.entry(day.to_string()).or_default().push(f);
        }
    }
    let text = serde_json::to_string(progress).map_err(Error::state)?;
    if !app.store.save_progress(&leases[0], Some(&text)).await? {
        return Err(Error::new(
            ErrorKind::State,
            format!(
                "lost the lease on {} {} while saving progress; another invocation continues",
                leases[0].table, leases[0].slice
            ),
        )
        .with_cause(Cause::LeaseLost));
    }
    Ok(())
}

/// Writes `body` (JSON lines) as the part `part-{attempt}-{index}` of a day; nothing when empty.
async fn write_part(
    app: &App,
    lease: &Lease,
    folder: &str,
    index: usize,
    body: Vec<u8>,
) -> Result<Option<FileEntry>> {
    let records = body.iter().filter(|b| **b == b'\n').count() as u64;
    if records == 0 {
        return Ok(None);
    }
    let name = format!(
        "part-{}-{index:05}.{}",
        lease.owner,
        app.settings.compression.extension()
    );
    let data = part::compress(app.settings.compression, body)?;
    let bytes = data.len() as u64;
    app.sink
        .put(
            &format!("{folder}/{name}"),
            Bytes::from(data),
            app.settings.compression.content_type(),
        )
        .await?;
    Ok(Some(FileEntry {
        name,
        records,
        bytes,
    }))
}

/// EU projects answer `engage/revenue` with HTTP 400 (often `Timeout Error`, which elsewhere is
/// a passing failure): there it means the endpoint is not served.
fn eu_400(app: &App, e: &Error) -> bool {
    app.settings.residency == Residency::Eu && e.cause() == Some(Cause::Http(400))
}
