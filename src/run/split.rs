//! Export days too big for one invocation: hour slices, and the day's commit from them.
//!
//! A day whose body did not end, or whose parts could not be written, before the deadline is
//! abandoned cleanly (nothing of it is committed) and re-planned as 24 hour slices: the same
//! export request with a `where` on `properties["$time"]` for each local hour. A day whose
//! neighbours (or its own last round) took longer than this invocation has is split before it
//! is fetched at all. Each hour is replicated like a day: fetched, deduplicated (Mixpanel's key
//! holds the event's second, so a duplicate never crosses an hour) and written as parts; then
//! recorded, parts and all, in the state store. When every hour is, the day is committed from
//! them: one manifest listing every hour's parts, other parts removed, the bookmark moved. An
//! invocation that finishes an hour goes on with the next hours of the same day while its
//! time allows, so a day slightly too big takes two invocations, not twenty-four.

use std::collections::HashMap;
use std::time::Duration;

use jiff::civil::Date;
use tokio::time::Instant;

use crate::app::App;
use crate::error::{Error, Result};
use crate::plan;
use crate::run::commit::{self, FileEntry};
use crate::run::export::{self as replicate, Exported, Recorded, SliceResult};
use crate::state::{Lease, SliceId, SliceRecord, SliceStatus};
use crate::tables::Table;

/// How an export invocation ended.
pub enum Ran {
    /// Slices were committed: their results, and the label of what they covered.
    Done(SliceResult, String),
    /// Nothing was committed; the work stays pending (the reason).
    Partial(String),
}

/// A day is split before it is fetched when its neighbours took more than this share of the
/// time the invocation has.
const PREDICT_SHARE: f64 = 0.8;

/// Runs the export slice claimed, then, while time allows, the next slices of its day.
pub async fn run(app: &App, claim: &plan::Claim, deadline: Instant) -> Result<Ran> {
    let lease = &claim.lease;
    let day = lease
        .slice
        .day()
        .ok_or_else(|| Error::event("the export table is sliced by day, not snapshotted"))?;
    if claim.widen {
        match crate::run::window::run(app, claim, deadline).await? {
            Some(crate::run::window::Windowed::Done(r, label)) => {
                return Ok(Ran::Done(r, label));
            }
            Some(crate::run::window::Windowed::Partial(why)) => return Ok(Ran::Partial(why)),
            None => {}
        }
    }
    // No window: the day (or hour) goes alone, and the other workers may claim.
    claim.gate.open();
    let mut done: Vec<(SliceId, SliceResult)> = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut current = lease.clone();
    // The table's slices as read for the current slice's claim.
    let mut slices = claim.slices.clone();
    let mut predicted_hour = Duration::ZERO;
    let mut first = true;
    loop {
        let started = Instant::now();
        let step = step(app, &current, day, &slices, deadline).await;
        let outcome = match step {
            Ok(o) => o,
            // The first slice's failure is the invocation's (the scheduler gives it back); a
            // later one's goes back to the queue here, and what was done stays done.
            Err(e) if first => return Err(e),
            Err(e) => {
                let before = slices.iter().find(|r| r.slice == current.slice);
                match crate::park::record(app, &current, before, &e).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        tracing::warn!(table = "export", slice = %current.slice, kind = %e.kind(), error = %e, "slice stopped; it stays pending");
                    }
                    Err(re) => {
                        tracing::warn!(error = %re, "could not record the failed attempt; the lease will expire");
                    }
                }
                break;
            }
        };
        match outcome {
            Step::Done(r) => {
                slowest = slowest.max(started.elapsed());
                let whole_day = current.slice == SliceId::Day(day);
                done.push((current.slice, r));
                if whole_day {
                    break;
                }
            }
            Step::Split { predicted } => {
                predicted_hour = predicted / 24;
            }
            Step::Partial(why) => {
                if first {
                    return Ok(Ran::Partial(why));
                }
                give_back(app, &current).await;
                break;
            }
        }
        first = false;
        // The next slice of the same day, if one more surely fits.
        let estimate = slowest.max(predicted_hour).mul_f64(1.5) + Duration::from_millis(250);
        if Instant::now() + estimate > deadline {
            break;
        }
        // A fresh attempt id: it names the slice's parts.
        let (now_ms, until) = crate::run::lease_times(app.clock.as_ref(), deadline);
        let next = plan::claim_next_of(
            app.store.as_ref(),
            Table::Export,
            Some(day),
            &crate::run::new_attempt_id(),
            now_ms,
            until,
        )
        .await;
        match next {
            Ok(Some(next)) => (current, slices) = (next.lease, next.slices),
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(table = "export", error = %e, "could not claim the next slice of the day");
                break;
            }
        }
    }
    if done.is_empty() {
        return Ok(Ran::Partial(format!(
            "{day} was re-planned as hour slices; the next invocations replicate them"
        )));
    }
    let mut total = SliceResult::default();
    for (_, r) in &done {
        total.add(r);
    }
    // The day's commit reports the whole day; hours report themselves.
    let label = match done.last() {
        Some((SliceId::Day(d), r)) => {
            total = r.clone();
            d.to_string()
        }
        _ => done
            .iter()
            .map(|(s, _)| s.to_string())
            .collect::<Vec<_>>()
            .join(","),
    };
    Ok(Ran::Done(total, label))
}

/// What one slice of the chain did.
enum Step {
    Done(SliceResult),
    /// The day was split into hours before any work (the time its neighbours predict).
    Split {
        predicted: Duration,
    },
    /// Nothing committed; the slice is to be given back.
    Partial(String),
}

async fn step(
    app: &App,
    lease: &Lease,
    day: Date,
    slices: &[SliceRecord],
    deadline: Instant,
) -> Result<Step> {
    let split = !plan::hours_of(slices, day).is_empty();
    match lease.slice {
        SliceId::Day(_) if split => assemble(app, lease, day, slices).await,
        SliceId::Day(_) => {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(predicted) = predicted(slices, day)
                && predicted.as_secs_f64() > left.as_secs_f64() * PREDICT_SHARE
            {
                split_day(app, lease, day).await?;
                tracing::info!(
                    table = "export", slice = %day, predicted_s = predicted.as_secs_f64(), left_s = left.as_secs_f64(),
                    "day predicted too big for one invocation; split into hour slices"
                );
                return Ok(Step::Split { predicted });
            }
            match replicate::export_slice(app, lease, before(slices, lease), deadline).await? {
                Exported::Done(r) => Ok(Step::Done(r)),
                Exported::TooBig(why) => {
                    split_day(app, lease, day).await?;
                    tracing::warn!(table = "export", slice = %day, reason = %why, "day too big for one invocation; split into hour slices");
                    Ok(Step::Partial(format!(
                        "{why}; the day is re-planned as 24 hour slices"
                    )))
                }
            }
        }
        SliceId::Full => Err(Error::event(
            "the export table is sliced by day, not snapshotted",
        )),
        piece if !plan::pieces_of(slices, piece).is_empty() => {
            assemble_piece(app, lease, slices).await
        }
        piece => {
            match replicate::export_slice(app, lease, before(slices, lease), deadline).await? {
                Exported::Done(r) => Ok(Step::Done(r)),
                Exported::TooBig(why) => {
                    let pieces = plan::pieces(piece);
                    if pieces.is_empty() {
                        // At the floor: a failure like any other, counted, and in the end parked.
                        tracing::error!(
                            table = "export", slice = %piece, reason = %why,
                            "a piece at the floor does not fit in one invocation: give the function more time or memory"
                        );
                        return Err(Error::transient(format!(
                            "{why}; {piece} is the smallest piece a day is split into"
                        )));
                    }
                    if let Some(tried) = smaller_never_helped(slices, day, &pieces) {
                        return Err(Error::transient(format!(
                            "{why}; smaller pieces of {day} ({tried}) fail as well, so {piece} is not split further"
                        )));
                    }
                    split_into(app, lease, &pieces).await?;
                    tracing::warn!(table = "export", slice = %piece, reason = %why, pieces = pieces.len(), "slice too big for one request; split into smaller pieces");
                    Ok(Step::Partial(format!(
                        "{why}; {piece} is re-planned as {} pieces",
                        pieces.len()
                    )))
                }
            }
        }
    }
}

/// The record of the slice `lease` holds, as it was when claimed.
fn before<'a>(slices: &'a [SliceRecord], lease: &Lease) -> Option<&'a SliceRecord> {
    slices.iter().find(|r| r.slice == lease.slice)
}

/// Days smaller than this predict nothing: their time is mostly latency, not size.
const PREDICT_MIN_BYTES: u64 = 1 << 20;

/// The longest time that the day itself (last round) or a neighbour took, from their records.
fn predicted(slices: &[SliceRecord], day: Date) -> Option<Duration> {
    let near = [day.yesterday().ok(), Some(day), day.tomorrow().ok()];
    slices
        .iter()
        .filter(|r| matches!(r.slice, SliceId::Day(d) if near.contains(&Some(d))))
        .filter_map(|r| Recorded::parse(r.result.as_deref()))
        .filter(|rec| rec.raw_bytes >= PREDICT_MIN_BYTES)
        .map(|rec| Duration::from_millis(rec.ms))
        .max()
}

/// Hour `h` (0 to 23) of `day` as a slice.
fn hour(day: Date, h: u8) -> SliceId {
    SliceId::Hours {
        day,
        from_hour: h,
        to_hour: h + 1,
    }
}

/// Queues the day's 24 hour slices, then gives the day back: it now waits for them.
async fn split_day(app: &App, lease: &Lease, day: Date) -> Result<()> {
    split_into(app, lease, &plan::pieces(SliceId::Day(day))).await
}

/// When pieces as long as `pieces` were already tried for `day` and none of them committed
/// while some failed, one of those that failed: Mixpanel fails the day at that size too (a
/// fault of the day, not of its size), and splitting more would only multiply the failing
/// requests. Returns `None` when smaller pieces may help.
fn smaller_never_helped(slices: &[SliceRecord], day: Date, pieces: &[SliceId]) -> Option<SliceId> {
    let len = |s: &SliceId| s.minutes().map(|(from, to)| to - from);
    let size = len(pieces.first()?)?;
    let same: Vec<&SliceRecord> = slices
        .iter()
        .filter(|r| r.slice.day() == Some(day) && !pieces.contains(&r.slice))
        .filter(|r| len(&r.slice) == Some(size))
        .collect();
    if same.iter().any(|r| r.status == SliceStatus::Committed) {
        return None;
    }
    same.iter()
        .find(|r| r.failures > 0 || r.status == SliceStatus::Failed)
        .map(|r| r.slice)
}

/// Queues `pieces` of the held slice, then gives the slice back: it now waits for them.
async fn split_into(app: &App, lease: &Lease, pieces: &[SliceId]) -> Result<()> {
    for piece in pieces {
        app.store.enqueue(Table::Export, *piece, None).await?;
    }
    app.store.release(lease).await
}

async fn give_back(app: &App, lease: &Lease) {
    if let Err(e) = app.store.release(lease).await {
        tracing::warn!(error = %e, "could not give the slice back; its lease will expire");
    }
}

/// Commits a split day from its hours: every hour recorded with its parts, the parts present,
/// then one manifest listing them all.
async fn assemble(app: &App, lease: &Lease, day: Date, slices: &[SliceRecord]) -> Result<Step> {
    let hours = plan::hours_of(slices, day);
    if let Some(h) = hours.iter().find(|h| h.status != SliceStatus::Committed) {
        return Ok(Step::Partial(format!(
            "{day} waits for its hour slice {} to be committed",
            h.slice
        )));
    }
    // The hours must be the day's 24 hours: a split cut short (a crash, a failed write) is
    // completed first, and the day waits for the hours it adds.
    if let Some(other) = hours
        .iter()
        .find(|r| !(0..24).any(|h| r.slice == hour(day, h)))
    {
        return Err(Error::state(format!(
            "{} is not one hour of {day}: the day's hour slices are {day}T00-01 to {day}T23-24",
            other.slice
        )));
    }
    if hours.len() < 24 {
        split_day(app, lease, day).await?;
        return Ok(Step::Partial(format!(
            "the split of {day} into hours was cut short; its missing hours are queued now"
        )));
    }
    let (folder, partition) = commit::date_partition(&app.prefix, Table::Export, lease.slice)?;
    let rejected_folder = commit::rejected_folder(&app.prefix, Table::Export, lease.slice)?;
    let mut present: std::collections::HashMap<String, u64> = HashMap::new();
    for f in [&folder, &rejected_folder] {
        present.extend(
            app.sink
                .list(&format!("{f}/"))
                .await?
                .into_iter()
                .map(|o| (o.key, o.size)),
        );
    }
    let mut files: Vec<FileEntry> = Vec::new();
    let mut rejected_files: Vec<FileEntry> = Vec::new();
    let mut total = Recorded::default();
    let mut again = Vec::new();
    for h in &hours {
        let rec = Recorded::parse(h.result.as_deref());
        let all_in = |folder: &str, parts: &[FileEntry]| {
            parts
                .iter()
                .all(|f| present.get(&format!("{folder}/{}", f.name)) == Some(&f.bytes))
        };
        let whole = rec.as_ref().is_some_and(|rec| {
            all_in(&folder, &rec.files) && all_in(&rejected_folder, &rec.rejected_files)
        });
        match rec {
            Some(rec) if whole => {
                total.raw_bytes += rec.raw_bytes;
                total.ms += rec.ms;
                total.records += rec.records;
                total.duplicates += rec.duplicates;
                total.rejected += rec.rejected;
                files.extend(rec.files);
                rejected_files.extend(rec.rejected_files);
            }
            // Its record or its parts are gone: that hour is replicated again.
            _ => again.push(h.slice),
        }
    }
    if !again.is_empty() {
        for h in &again {
            // An hour split into pieces lists their parts: they are replicated again too.
            plan::requeue_pieces(app.store.as_ref(), slices, Table::Export, *h, u64::MAX).await?;
            app.store.enqueue(Table::Export, *h, Some(u64::MAX)).await?;
        }
        let named: Vec<String> = again.iter().map(ToString::to_string).collect();
        tracing::warn!(table = "export", slice = %day, hours = %named.join(","), "hour parts missing; those hours are replicated again");
        return Ok(Step::Partial(format!(
            "the parts of {} were missing; those hours are replicated again",
            named.join(", ")
        )));
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    rejected_files.sort_by(|a, b| a.name.cmp(&b.name));
    let result = SliceResult {
        records: total.records,
        bytes: files.iter().map(|f| f.bytes).sum(),
        files: files.len() as u64,
        duplicates: total.duplicates,
        raw_bytes: total.raw_bytes,
        rejected: total.rejected,
    };
    let rejected = commit::RejectedParts {
        folder: rejected_folder,
        lines: total.rejected,
        files: rejected_files,
    };
    commit::commit_with_rejected(
        app.store.as_ref(),
        app.sink.as_ref(),
        app.clock.as_ref(),
        lease,
        &folder,
        &partition,
        files,
        &rejected,
        Some(&total.to_json()),
        commit::ShrinkGuard::for_slice(app.settings.shrink_guard_percent, before(slices, lease)),
    )
    .await?;
    crate::plan::advance_bookmark(app.store.as_ref(), Table::Export, app.settings.start_date)
        .await?;
    Ok(Step::Done(result))
}

/// Records a slice split into pieces (an hour into quarters, ...) from its pieces once every
/// one is committed: the slice's record lists all their parts, so the day's commit finds them
/// as it finds an hour's.
async fn assemble_piece(app: &App, lease: &Lease, slices: &[SliceRecord]) -> Result<Step> {
    let expected = plan::pieces(lease.slice);
    let pieces = plan::pieces_of(slices, lease.slice);
    if let Some(p) = pieces.iter().find(|p| p.status != SliceStatus::Committed) {
        return Ok(Step::Partial(format!(
            "{} waits for its piece {} to be committed",
            lease.slice, p.slice
        )));
    }
    if pieces.len() < expected.len() {
        // A split cut short (a crash, a failed write): its missing pieces are queued now.
        split_into(app, lease, &expected).await?;
        return Ok(Step::Partial(format!(
            "the split of {} was cut short; its missing pieces are queued now",
            lease.slice
        )));
    }
    let mut total = Recorded::default();
    let mut again = Vec::new();
    for p in &pieces {
        match Recorded::parse(p.result.as_deref()) {
            Some(rec) => {
                total.raw_bytes += rec.raw_bytes;
                total.ms += rec.ms;
                total.records += rec.records;
                total.duplicates += rec.duplicates;
                total.rejected += rec.rejected;
                total.files.extend(rec.files);
                total.rejected_files.extend(rec.rejected_files);
            }
            None => again.push(p.slice),
        }
    }
    if !again.is_empty() {
        for p in &again {
            app.store.enqueue(Table::Export, *p, Some(u64::MAX)).await?;
        }
        let named: Vec<String> = again.iter().map(ToString::to_string).collect();
        return Ok(Step::Partial(format!(
            "the records of {} were missing; those pieces are replicated again",
            named.join(", ")
        )));
    }
    total.files.sort_by(|a, b| a.name.cmp(&b.name));
    total.rejected_files.sort_by(|a, b| a.name.cmp(&b.name));
    let result = SliceResult {
        records: total.records,
        bytes: total.files.iter().map(|f| f.bytes).sum(),
        files: total.files.len() as u64,
        duplicates: total.duplicates,
        raw_bytes: total.raw_bytes,
        rejected: total.rejected,
    };
    commit::complete(
        app.store.as_ref(),
        app.clock.as_ref(),
        lease,
        Some(&total.to_json()),
    )
    .await?;
    Ok(Step::Done(result))
}
