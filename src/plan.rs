//! Planning: which slices a table needs, queued idempotently, and claiming the oldest one.

use jiff::Timestamp;
use jiff::civil::Date;

use crate::config::Settings;
use crate::error::Result;
use crate::state::{Lease, SliceId, SliceRecord, SliceStatus, StateStore};
use crate::tables::Table;
use crate::tables::export::{days_before, project_today};

/// The days a date-sliced table should have queued now: from `max(start, bookmark - window)` to
/// today in the project's timezone.
pub async fn planned_days(
    store: &dyn StateStore,
    settings: &Settings,
    table: Table,
    now: Timestamp,
) -> Result<Vec<Date>> {
    let today = project_today(&settings.timezone, now);
    let from = match store.bookmark(table).await? {
        Some(b) => days_before(b, settings.attribution_window_days).max(settings.start_date),
        None => settings.start_date,
    };
    let mut days = Vec::new();
    let mut d = from;
    while d <= today {
        days.push(d);
        match d.tomorrow() {
            Ok(t) => d = t,
            Err(_) => break,
        }
    }
    Ok(days)
}

/// Plans a table: its days (date-sliced) or its snapshot (full tables). Returns how many slices
/// this call queued.
pub async fn queue_table(
    store: &dyn StateStore,
    settings: &Settings,
    table: Table,
    now: Timestamp,
) -> Result<u64> {
    if table.is_date_sliced() {
        // The bookmark moves after each commit; moving it here too makes up for an invocation
        // that stopped between its last commit and the bookmark.
        let existing = store.slices(table).await?;
        crate::commit::advance_bookmark_over(store, table, settings.start_date, &existing).await?;
        let days = planned_days(store, settings, table, now).await?;
        Ok(
            queue_days_over(store, settings, table, &days, now, &existing)
                .await?
                .len() as u64,
        )
    } else {
        let stale_before = stale_before_ms(settings, now);
        let existing = store.slices(table).await?;
        let rec = existing.iter().find(|r| r.slice == SliceId::Full);
        let queued = needs_queue(rec, stale_before)
            && store
                .enqueue(table, SliceId::Full, Some(stale_before))
                .await?;
        Ok(u64::from(queued))
    }
}

/// Whether planning would (re-)queue this day given its current record.
fn needs_queue(existing: Option<&SliceRecord>, stale_before_ms: u64) -> bool {
    match existing {
        None => true,
        Some(r) => {
            r.status == SliceStatus::Committed && r.committed_at_ms.unwrap_or(0) < stale_before_ms
        }
    }
}

/// Queues `days` of `table`: unknown days, and committed days last committed before the refresh
/// interval. Returns the days queued by this call.
pub async fn queue_days(
    store: &dyn StateStore,
    settings: &Settings,
    table: Table,
    days: &[Date],
    now: Timestamp,
) -> Result<Vec<Date>> {
    let existing = store.slices(table).await?;
    queue_days_over(store, settings, table, days, now, &existing).await
}

/// [`queue_days`] given the table's slices as just read.
async fn queue_days_over(
    store: &dyn StateStore,
    settings: &Settings,
    table: Table,
    days: &[Date],
    now: Timestamp,
    existing: &[SliceRecord],
) -> Result<Vec<Date>> {
    let stale_before = stale_before_ms(settings, now);
    let mut queued = Vec::new();
    for &d in days {
        let rec = existing.iter().find(|r| r.slice == SliceId::Day(d));
        if needs_queue(rec, stale_before)
            && requeue_day(store, existing, table, d, stale_before).await?
        {
            queued.push(d);
        }
    }
    Ok(queued)
}

/// The hour slices of day `d` (a day too big for one invocation), by first hour.
pub fn hours_of(slices: &[SliceRecord], d: Date) -> Vec<&SliceRecord> {
    slices
        .iter()
        .filter(|r| matches!(r.slice, SliceId::Hours { day, .. } if day == d))
        .collect()
}

/// Queues day `d` (unknown, or committed before `before_ms`) for another round. A day split into
/// hours gets its hours queued again first, those committed with the day's last commit or
/// before: the day then waits for them and lists their new parts. Returns whether the day is
/// now pending because of this call.
pub async fn requeue_day(
    store: &dyn StateStore,
    slices: &[SliceRecord],
    table: Table,
    d: Date,
    before_ms: u64,
) -> Result<bool> {
    let day = slices.iter().find(|r| r.slice == SliceId::Day(d));
    if let Some(day) = day.filter(|r| r.status == SliceStatus::Committed) {
        let day_committed = day.committed_at_ms.unwrap_or(0);
        if day_committed < before_ms {
            for hour in hours_of(slices, d) {
                store
                    .enqueue(table, hour.slice, Some(day_committed.saturating_add(1)))
                    .await?;
            }
        }
    }
    store.enqueue(table, SliceId::Day(d), Some(before_ms)).await
}

/// What planning would queue, without changing anything.
pub async fn preview(
    store: &dyn StateStore,
    settings: &Settings,
    table: Table,
    now: Timestamp,
) -> Result<Vec<SliceRecord>> {
    let stale_before = stale_before_ms(settings, now);
    let existing = store.slices(table).await?;
    let now_ms = now.as_millisecond() as u64;
    let mut out: Vec<SliceRecord> = existing
        .iter()
        .filter(|r| claimable(r, now_ms) && !waits_for_hours(&existing, r))
        .cloned()
        .collect();
    let wanted: Vec<SliceId> = if table.is_date_sliced() {
        planned_days(store, settings, table, now)
            .await?
            .into_iter()
            .map(SliceId::Day)
            .collect()
    } else {
        vec![SliceId::Full]
    };
    for slice in wanted {
        let rec = existing.iter().find(|r| r.slice == slice);
        if needs_queue(rec, stale_before) && !out.iter().any(|r| r.slice == slice) {
            out.push(SliceRecord {
                table,
                slice,
                status: SliceStatus::Pending,
                lease_owner: None,
                lease_expires_ms: None,
                committed_at_ms: rec.and_then(|r| r.committed_at_ms),
                attempts: rec.map(|r| r.attempts).unwrap_or(0),
                progress: None,
                result: rec.and_then(|r| r.result.clone()),
            });
        }
    }
    out.sort_by_key(|r| r.slice);
    Ok(out)
}

fn stale_before_ms(settings: &Settings, now: Timestamp) -> u64 {
    (now.as_millisecond() as u64).saturating_sub(settings.refresh.as_millis() as u64)
}

/// Whether a slice can be claimed now.
pub fn claimable(r: &SliceRecord, now_ms: u64) -> bool {
    match r.status {
        SliceStatus::Pending => true,
        SliceStatus::Leased => r.lease_expires_ms.is_some_and(|e| e < now_ms),
        SliceStatus::Committed => false,
    }
}

/// Whether `r` is a day split into hour slices that are not all committed yet: its commit
/// (the manifest of every hour's parts) waits for them.
pub fn waits_for_hours(slices: &[SliceRecord], r: &SliceRecord) -> bool {
    match r.slice {
        SliceId::Day(d) => hours_of(slices, d)
            .iter()
            .any(|h| h.status != SliceStatus::Committed),
        _ => false,
    }
}

/// A claimed slice, with the table's slices as read for the claim (the claimed one as it was
/// before), so that the work which follows need not read them again.
pub struct Claim {
    pub lease: Lease,
    pub slices: Vec<SliceRecord>,
}

/// Claims the oldest claimable slice of `table`; concurrent callers each get a different one.
pub async fn claim_next(
    store: &dyn StateStore,
    table: Table,
    owner: &str,
    now_ms: u64,
    lease_until_ms: u64,
) -> Result<Option<Claim>> {
    claim_next_of(store, table, None, owner, now_ms, lease_until_ms).await
}

/// Claims the oldest claimable slice of `table` (of `day` only, when given).
pub async fn claim_next_of(
    store: &dyn StateStore,
    table: Table,
    day: Option<Date>,
    owner: &str,
    now_ms: u64,
    lease_until_ms: u64,
) -> Result<Option<Claim>> {
    let slices = store.slices(table).await?;
    for r in slices.iter().filter(|r| {
        claimable(r, now_ms)
            && day.is_none_or(|d| r.slice.day() == Some(d))
            && !waits_for_hours(&slices, r)
    }) {
        if let Some(lease) = store
            .claim(table, r.slice, owner, now_ms, lease_until_ms)
            .await?
        {
            return Ok(Some(Claim { lease, slices }));
        }
    }
    Ok(None)
}

/// Counts the slices of `table` that are not committed.
pub async fn outstanding(store: &dyn StateStore, table: Table) -> Result<usize> {
    Ok(store
        .slices(table)
        .await?
        .iter()
        .filter(|r| r.status != SliceStatus::Committed)
        .count())
}
