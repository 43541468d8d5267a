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
        advance_bookmark_over(store, table, settings.start_date, &existing).await?;
        let days = planned_days(store, settings, table, now).await?;
        let refresh_from = Some(refresh_from(settings, now));
        Ok(
            queue_days_over(store, settings, table, &days, now, &existing, refresh_from)
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

/// The first day whose commit planning refreshes: the attribution window before yesterday (as
/// from a bookmark at yesterday). A bookmark held back by a parked day keeps the days after it
/// planned, but those committed before this day are final and not read again every hour, if
/// they were committed once settled ([`settled`]).
fn refresh_from(settings: &Settings, now: Timestamp) -> Date {
    let today = project_today(&settings.timezone, now);
    days_before(today, settings.attribution_window_days.saturating_add(1))
}

/// Whether a day's last commit came after its late events could arrive: once the attribution
/// window had passed since the day ended. A day committed earlier (while it was today, before a
/// stop longer than the window) is read again, however old it is now.
fn settled(settings: &Settings, d: Date, rec: &SliceRecord) -> bool {
    let Some(at) = rec.committed_at_ms else {
        return false;
    };
    let settles = d
        .checked_add(jiff::Span::new().days(i64::from(settings.attribution_window_days) + 1))
        .ok()
        .and_then(|day| {
            day.at(0, 0, 0, 0)
                .to_zoned_datetime(settings.timezone.clone())
                .ok()
        })
        .map(|z| z.timestamp().as_millisecond());
    settles.is_some_and(|ms| i128::from(at) >= i128::from(ms))
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
    queue_days_over(store, settings, table, days, now, &existing, None).await
}

/// [`queue_days`] given the table's slices as just read; committed days before `refresh_from`
/// (when given) are left as they are.
async fn queue_days_over(
    store: &dyn StateStore,
    settings: &Settings,
    table: Table,
    days: &[Date],
    now: Timestamp,
    existing: &[SliceRecord],
    refresh_from: Option<Date>,
) -> Result<Vec<Date>> {
    let stale_before = stale_before_ms(settings, now);
    let mut queued = Vec::new();
    // Days never seen are queued together (one write of the local state file); a committed
    // day goes on its own, its hours first.
    let mut new_days = Vec::new();
    for &d in days {
        let rec = existing.iter().find(|r| r.slice == SliceId::Day(d));
        let final_day =
            rec.is_some_and(|r| settled(settings, d, r)) && refresh_from.is_some_and(|f| d < f);
        if final_day || !needs_queue(rec, stale_before) {
            continue;
        }
        if rec.is_none() {
            new_days.push(d);
        } else if requeue_day(store, existing, table, d, stale_before).await? {
            queued.push(d);
        }
    }
    let slices: Vec<SliceId> = new_days.iter().map(|d| SliceId::Day(*d)).collect();
    let now_pending = store
        .enqueue_many(table, &slices, Some(stale_before))
        .await?;
    queued.extend(
        new_days
            .iter()
            .zip(now_pending)
            .filter_map(|(d, q)| q.then_some(*d)),
    );
    queued.sort();
    Ok(queued)
}

/// The hour slices of day `d` (a day too big for one invocation), by first hour.
pub fn hours_of(slices: &[SliceRecord], d: Date) -> Vec<&SliceRecord> {
    slices
        .iter()
        .filter(|r| matches!(r.slice, SliceId::Hours { day, .. } if day == d))
        .collect()
}

/// The shortest piece: one that Mixpanel still cannot export is not split further (it fails,
/// and after its attempts it is parked).
pub const PIECE_FLOOR_MINUTES: u16 = 5;

/// The slices that replace `slice` when Mixpanel cannot export it at once: a day its 24 hours,
/// an hour its quarters, a quarter its 5-minute pieces; nothing below the floor.
pub fn pieces(slice: SliceId) -> Vec<SliceId> {
    match slice {
        SliceId::Day(day) => (0..24u8)
            .map(|h| SliceId::Hours {
                day,
                from_hour: h,
                to_hour: h + 1,
            })
            .collect(),
        SliceId::Hours {
            day,
            from_hour,
            to_hour,
        } if to_hour > from_hour + 1 => (from_hour..to_hour)
            .map(|h| SliceId::Hours {
                day,
                from_hour: h,
                to_hour: h + 1,
            })
            .collect(),
        SliceId::Full => Vec::new(),
        other => {
            let (Some(day), Some((from, to))) = (other.day(), other.minutes()) else {
                return Vec::new();
            };
            if to - from <= PIECE_FLOOR_MINUTES {
                return Vec::new();
            }
            let step = if to - from > 15 {
                15
            } else {
                PIECE_FLOOR_MINUTES
            };
            (from..to)
                .step_by(usize::from(step))
                .map(|m| SliceId::Minutes {
                    day,
                    from: m,
                    to: (m + step).min(to),
                })
                .collect()
        }
    }
}

/// The records of the pieces `slice` was split into (none when it was not).
pub fn pieces_of(slices: &[SliceRecord], slice: SliceId) -> Vec<&SliceRecord> {
    let pieces = pieces(slice);
    slices
        .iter()
        .filter(|r| pieces.contains(&r.slice))
        .collect()
}

/// Re-queues the pieces of `slice` (as read in `slices`) committed before `before_ms`, and
/// theirs in turn: the slice then waits for them and lists their new parts.
pub async fn requeue_pieces(
    store: &dyn StateStore,
    slices: &[SliceRecord],
    table: Table,
    slice: SliceId,
    before_ms: u64,
) -> Result<()> {
    for piece in pieces_of(slices, slice) {
        if piece.status == SliceStatus::Committed && piece.committed_at_ms.unwrap_or(0) < before_ms
        {
            let committed = piece.committed_at_ms.unwrap_or(0);
            Box::pin(requeue_pieces(
                store,
                slices,
                table,
                piece.slice,
                committed.saturating_add(1),
            ))
            .await?;
        }
        store.enqueue(table, piece.slice, Some(before_ms)).await?;
    }
    Ok(())
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
            requeue_pieces(
                store,
                slices,
                table,
                SliceId::Day(d),
                day_committed.saturating_add(1),
            )
            .await?;
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
    // Pending (also backing off after a failure) and parked slices, and expired leases.
    let mut out: Vec<SliceRecord> = existing
        .iter()
        .filter(|r| {
            (claimable(r, now_ms)
                || r.status == SliceStatus::Pending
                || r.status == SliceStatus::Failed)
                && !waits_for_hours(&existing, r)
        })
        .cloned()
        .collect();
    let refresh_from = refresh_from(settings, now);
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
        let final_day = slice
            .day()
            .is_some_and(|d| d < refresh_from && rec.is_some_and(|r| settled(settings, d, r)));
        if !final_day && needs_queue(rec, stale_before) && !out.iter().any(|r| r.slice == slice) {
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
                failures: 0,
                retry_at_ms: None,
                error: None,
            });
        }
    }
    out.sort_by_key(|r| r.slice);
    Ok(out)
}

fn stale_before_ms(settings: &Settings, now: Timestamp) -> u64 {
    (now.as_millisecond() as u64).saturating_sub(settings.refresh.as_millis() as u64)
}

/// Whether a slice can be claimed now: pending and not backing off after a failure, or leased
/// with its lease expired. A parked slice never is.
pub fn claimable(r: &SliceRecord, now_ms: u64) -> bool {
    match r.status {
        SliceStatus::Pending => r.retry_at_ms.is_none_or(|at| at <= now_ms),
        SliceStatus::Leased => r.lease_expires_ms.is_some_and(|e| e < now_ms),
        SliceStatus::Committed | SliceStatus::Failed => false,
    }
}

/// When the earliest slice of `slices` that backs off after a failure may be claimed again.
pub fn next_retry_ms(slices: &[SliceRecord]) -> Option<u64> {
    slices
        .iter()
        .filter(|r| r.status == SliceStatus::Pending && !waits_for_hours(slices, r))
        .filter_map(|r| r.retry_at_ms)
        .min()
}

/// Whether `r` is a slice split into pieces (a day into hours, an hour into quarters, ...)
/// that are not all committed yet: its commit (of every piece's parts) waits for them.
pub fn waits_for_hours(slices: &[SliceRecord], r: &SliceRecord) -> bool {
    pieces_of(slices, r.slice)
        .iter()
        .any(|h| h.status != SliceStatus::Committed)
}

/// A claimed slice, with the table's slices as read for the claim (the claimed one as it was
/// before), so that the work which follows need not read them again.
pub struct Claim {
    pub lease: Lease,
    pub slices: Vec<SliceRecord>,
    /// Claimed as the table's oldest (not a given day's): the small days after it may join
    /// it in one export request ([`crate::run::window`]).
    pub widen: bool,
    /// Held by the claimer until the claim's window has its days (see [`ClaimGate`]).
    pub gate: ClaimGate,
}

/// Keeps the other workers of one process (`sync`'s) from claiming, from a claim until the
/// multi-day window it starts has claimed its days: a worker claiming at the same moment would
/// otherwise take the window's second day, and the days after the first would go as two
/// requests, or the first day alone. Opened (released) once the window is claimed, or at once
/// when no window follows; dropping the claim opens it too.
#[derive(Default)]
pub struct ClaimGate(std::sync::Mutex<Option<tokio::sync::OwnedMutexGuard<()>>>);

impl ClaimGate {
    /// A gate held by `guard`.
    pub fn holding(guard: tokio::sync::OwnedMutexGuard<()>) -> Self {
        ClaimGate(std::sync::Mutex::new(Some(guard)))
    }

    /// Lets the other workers claim again.
    pub fn open(&self) {
        if let Ok(mut held) = self.0.lock() {
            held.take();
        }
    }
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
    Ok(
        claim_next_seeing(store, table, day, owner, now_ms, lease_until_ms)
            .await?
            .0,
    )
}

/// [`claim_next_of`], also returning the table's slices as read for the claim (when nothing
/// was claimable too: parked slices are counted from them).
pub async fn claim_next_seeing(
    store: &dyn StateStore,
    table: Table,
    day: Option<Date>,
    owner: &str,
    now_ms: u64,
    lease_until_ms: u64,
) -> Result<(Option<Claim>, Vec<SliceRecord>)> {
    let slices = store.slices(table).await?;
    let mut candidates: Vec<&SliceRecord> = slices
        .iter()
        .filter(|r| {
            claimable(r, now_ms)
                && day.is_none_or(|d| r.slice.day() == Some(d))
                && !waits_for_hours(&slices, r)
        })
        .collect();
    // Freshness first: slices never committed (new days, their hours) before refreshes of
    // committed ones, so that a big project's newest day is never starved by its attribution
    // window; oldest first within each.
    candidates.sort_by_key(|r| r.committed_at_ms.is_some());
    for r in candidates {
        if let Some(lease) = store
            .claim(table, r.slice, owner, now_ms, lease_until_ms)
            .await?
        {
            return Ok((
                Some(Claim {
                    lease,
                    slices: slices.clone(),
                    widen: day.is_none(),
                    gate: ClaimGate::default(),
                }),
                slices,
            ));
        }
    }
    Ok((None, slices))
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

/// Moves the bookmark of a date-sliced table to the last day D such that every day from the
/// start date to D is committed.
pub async fn advance_bookmark(
    store: &dyn StateStore,
    table: Table,
    start: jiff::civil::Date,
) -> Result<()> {
    let slices = store.slices(table).await?;
    advance_bookmark_over(store, table, start, &slices).await
}

/// [`advance_bookmark`] given the table's slices as just read.
pub async fn advance_bookmark_over(
    store: &dyn StateStore,
    table: Table,
    start: jiff::civil::Date,
    slices: &[SliceRecord],
) -> Result<()> {
    let mut committed: Vec<jiff::civil::Date> = slices
        .iter()
        .filter(|s| s.status == SliceStatus::Committed)
        .filter_map(|s| match s.slice {
            SliceId::Day(d) => Some(d),
            _ => None,
        })
        .filter(|d| *d >= start)
        .collect();
    committed.sort();
    let mut last = None;
    let mut expect = start;
    for d in committed {
        if d != expect {
            break;
        }
        last = Some(d);
        match d.tomorrow() {
            Ok(t) => expect = t,
            Err(_) => break,
        }
    }
    if let Some(d) = last {
        let current = store.bookmark(table).await?;
        if current.is_none_or(|c| c < d) {
            store.advance_bookmark(table, d).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::local::LocalStore;

    #[tokio::test]
    async fn days_never_committed_are_claimed_before_refreshes_of_committed_days() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().join("state.json")).unwrap();
        let day = |s: &str| s.parse::<Date>().unwrap();
        let (old, new) = (day("2026-11-20"), day("2026-11-25"));
        for d in [old, day("2026-11-21"), new] {
            store
                .enqueue(Table::Export, SliceId::Day(d), None)
                .await
                .unwrap();
        }
        // The two older days were committed; a refresh queues them again.
        for _ in 0..2 {
            let c = claim_next(&store, Table::Export, "a", 1, 10_000)
                .await
                .unwrap()
                .unwrap();
            assert_ne!(c.lease.slice, SliceId::Day(new));
            assert!(store.complete(&c.lease, 2, None).await.unwrap());
        }
        for d in [old, day("2026-11-21")] {
            assert!(
                store
                    .enqueue(Table::Export, SliceId::Day(d), Some(u64::MAX))
                    .await
                    .unwrap()
            );
        }
        let order: Vec<SliceId> = {
            let mut v = Vec::new();
            while let Some(c) = claim_next(&store, Table::Export, "b", 3, 10_000)
                .await
                .unwrap()
            {
                v.push(c.lease.slice);
            }
            v
        };
        assert_eq!(
            order,
            [
                SliceId::Day(new),
                SliceId::Day(old),
                SliceId::Day(day("2026-11-21"))
            ]
        );
    }

    #[test]
    fn a_day_splits_into_hours_an_hour_into_quarters_a_quarter_into_five_minutes_then_no_more() {
        let day: Date = "2026-03-08".parse().unwrap();
        let hours = pieces(SliceId::Day(day));
        assert_eq!(hours.len(), 24);
        assert_eq!(hours[0].to_string(), "2026-03-08T00-01");
        assert_eq!(hours[23].to_string(), "2026-03-08T23-24");
        let quarters: Vec<String> = pieces(hours[23]).iter().map(ToString::to_string).collect();
        assert_eq!(
            quarters,
            [
                "2026-03-08T23:00-23:15",
                "2026-03-08T23:15-23:30",
                "2026-03-08T23:30-23:45",
                "2026-03-08T23:45-24:00"
            ]
        );
        let fives: Vec<String> = pieces(pieces(hours[23])[3])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            fives,
            [
                "2026-03-08T23:45-23:50",
                "2026-03-08T23:50-23:55",
                "2026-03-08T23:55-24:00"
            ]
        );
        assert!(pieces(pieces(pieces(hours[23])[3])[2]).is_empty());
        assert!(pieces(SliceId::Full).is_empty());
        // Each level tiles the one above it.
        for h in &hours {
            let qs = pieces(*h);
            assert_eq!(
                qs.first().unwrap().minutes().unwrap().0,
                h.minutes().unwrap().0
            );
            assert_eq!(
                qs.last().unwrap().minutes().unwrap().1,
                h.minutes().unwrap().1
            );
            for w in qs.windows(2) {
                assert_eq!(w[0].minutes().unwrap().1, w[1].minutes().unwrap().0);
            }
        }
    }

    #[tokio::test]
    async fn a_day_committed_while_it_was_today_is_read_again_after_a_long_stop() {
        let vars: std::collections::HashMap<&str, &str> = [
            ("MIXPANEL_API_SECRET", "s"),
            ("MIXPANEL_START_DATE", "2026-11-01"),
            ("MIXPANEL_PROJECT_TIMEZONE", "America/Los_Angeles"),
        ]
        .into();
        let settings = Settings::from_lookup(crate::config::RunMode::Local, |k| {
            vars.get(k).map(|v| v.to_string())
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().join("state.json")).unwrap();
        let at = |s: &str| s.parse::<Timestamp>().unwrap().as_millisecond() as u64;
        let day = |s: &str| s.parse::<Date>().unwrap();
        // Every day up to the 10th committed; the 10th at its noon (it was today), the 9th
        // after its window had passed (five days after it ended, Los Angeles time).
        let mut d = day("2026-11-01");
        while d <= day("2026-11-10") {
            let committed = match d.to_string().as_str() {
                "2026-11-10" => at("2026-11-10T20:00:00Z"),
                "2026-11-09" => at("2026-11-15T08:00:01Z"),
                _ => at("2026-11-20T00:00:00Z"),
            };
            store
                .enqueue(Table::Export, SliceId::Day(d), None)
                .await
                .unwrap();
            let lease = store
                .claim(Table::Export, SliceId::Day(d), "a", 0, u64::MAX)
                .await
                .unwrap()
                .unwrap();
            assert!(store.complete(&lease, committed, None).await.unwrap());
            d = d.tomorrow().unwrap();
        }
        store
            .advance_bookmark(Table::Export, day("2026-11-10"))
            .await
            .unwrap();
        // Three weeks later.
        let now: Timestamp = "2026-12-01T18:00:00Z".parse().unwrap();
        let previewed: Vec<SliceId> = preview(&store, &settings, Table::Export, now)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.slice)
            .filter(|s| s.day().is_some_and(|d| d <= day("2026-11-10")))
            .collect();
        assert_eq!(previewed, [SliceId::Day(day("2026-11-10"))]);
        queue_table(&store, &settings, Table::Export, now)
            .await
            .unwrap();
        let pending: Vec<SliceId> = store
            .slices(Table::Export)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.status == SliceStatus::Pending)
            .map(|r| r.slice)
            .filter(|s| s.day().is_some_and(|d| d <= day("2026-11-10")))
            .collect();
        assert_eq!(pending, [SliceId::Day(day("2026-11-10"))]);
    }
}
