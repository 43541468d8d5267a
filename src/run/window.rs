//! Multi-day export requests: contiguous small pending days fetched with one request.
//!
//! A claimed whole day whose following days are pending whole days too, and small (judged from
//! their own or the nearest recorded days' raw bytes), claims them as well (each with its own
//! lease, the same attempt id) up to `MIXPANEL_EXPORT_WINDOW_DAYS` and a raw size the measured
//! throughput reads in a share of the time left. One export request covers them
//! (`from_date..to_date`, a `where` on `$time` for the exact instant range); each line goes to
//! its local day by its instant as the body streams, with the day's own spill, so a day is
//! deduplicated alone (Mixpanel's key holds the event's second: a duplicate never crosses a
//! day). Then each day is written and committed on its own, exactly as a day fetched alone: its
//! manifest, parts, `_rejected/`, its record (its own lines' raw bytes) and the bookmark; one
//! day more at a time than there are cores, since a small day is written by one worker. A day
//! with no history near it is fetched alone first (the probe).
//!
//! A window whose body Mixpanel fails, or that does not end before the deadline, or outgrows
//! the disk, commits nothing: its days are given back marked to be fetched alone next, so a
//! heavy day among them is found (and split into hours) by the single-day path. The mark
//! (the slice's `progress`) goes with the day's next commit.

use std::time::Duration;

use futures_util::StreamExt;
use jiff::civil::Date;
use tokio::time::Instant;

use crate::app::App;
use crate::error::{ErrorKind, Result};
use crate::plan;
use crate::run::export::{self as replicate, DayBody, Fetch, Heavy, Recorded, SliceResult};
use crate::state::{Lease, SliceId, SliceRecord, SliceStatus};
use crate::tables::Table;
use crate::tables::export;

/// A day estimated above this many raw bytes is fetched alone (where its time is measured): at
/// most a quarter of a window, so that a window always carries several days.
const SMALL_DAY_BYTES: u64 = 64 << 20;

/// The most raw bytes one window asks for: about 45 MB on the wire, a body Mixpanel serves
/// in seconds. Under 60 exports an hour, a backfill of days of 11 MB goes 23 days a request
/// (about 1,400 days an hour) where it would go a day a request alone.
const WINDOW_MAX_BYTES: u64 = 256 << 20;

/// The share of the time left that a window's body may take at the measured throughput.
const WINDOW_TIME_SHARE: f64 = 0.3;

/// A day without a record of its own is judged from the nearest recorded day this close.
const NEAR_DAYS: i64 = 31;

/// The mark on a day that is next fetched alone (in its `progress`).
const ALONE: &str = r#"{"fetch_alone":true}"#;

/// How a window ended.
pub enum Windowed {
    /// Days were committed: their results (in order) and the label of what they covered.
    Done(SliceResult, String),
    /// Nothing was committed; every day is given back (the reason).
    Partial(String),
}

/// Fetches the claimed day with the small pending days after it as one window. `None`: no
/// window (the day alone is the next step; nothing was claimed or changed).
pub async fn run(app: &App, claim: &plan::Claim, deadline: Instant) -> Result<Option<Windowed>> {
    let lease = &claim.lease;
    let SliceId::Day(first) = lease.slice else {
        return Ok(None);
    };
    let now_ms = app.clock.now_ms();
    let left = deadline.saturating_duration_since(Instant::now());
    let slices = with_read_sizes(&claim.slices, &app.read_sizes.noted());
    let days = plan_window(
        &slices,
        first,
        app.settings.export_window_days,
        now_ms,
        left,
    );
    if days.len() < 2 {
        return Ok(None);
    }
    // The days after the first, each with its own lease; the window ends at the first taken.
    let (now_ms, until) = super::lease_times(app.clock.as_ref(), deadline);
    let mut leases = vec![lease.clone()];
    let after: Vec<SliceId> = days[1..].iter().map(|d| SliceId::Day(*d)).collect();
    leases.extend(
        app.store
            .claim_run(Table::Export, &after, &lease.owner, now_ms, until)
            .await?,
    );
    // The window has its days: the other workers may claim what is left.
    claim.gate.open();
    if leases.len() < 2 {
        return Ok(None);
    }
    let days: Vec<Date> = days[..leases.len()].to_vec();
    let last = days[days.len() - 1];
    let label = format!("{first}..{last}");
    let s = &app.settings;
    let today = export::export_today(&s.timezone, s.export_time_mode, app.clock.now());
    let (window, bounds) = match export::window_of_days(
        &days,
        &s.timezone,
        s.export_time_mode,
        today,
        s.export_events.clone(),
    ) {
        Ok(w) => w,
        Err(e) => {
            give_back(app, &leases[1..], false).await;
            return Err(e);
        }
    };
    let known = match replicate::known_schema(app).await {
        Ok(k) => k,
        Err(e) => {
            give_back(app, &leases[1..], false).await;
            return Err(e);
        }
    };
    let heavy = Heavy {
        signals: 0,
        split: false,
        whole_day: false,
    };
    tracing::info!(table = "export", window = %label, days = days.len(), "fetching small days with one request");
    let fetched = replicate::fetch(app, &label, &window, &bounds, &known, heavy, deadline).await;
    let fetched = match fetched {
        Ok(Fetch::Read(f)) => f,
        Ok(Fetch::TooBig(why)) => return Ok(Some(fall_back(app, &leases, &label, &why).await)),
        // Mixpanel failed the body (cut off, `terminated early`, a 5xx) twice: its days are
        // fetched alone next, where a heavy one is found and split.
        Err(e) if e.kind() == ErrorKind::Transient => {
            return Ok(Some(fall_back(app, &leases, &label, &e.to_string()).await));
        }
        // Any day of the window may be the one Mixpanel rejects: the error is the first
        // day's (recorded, so it goes alone next), and the others are fetched alone next too,
        // so that a day that always fails is found at once and parks alone.
        Err(e) => {
            give_back(app, &leases[1..], crate::park::counts(e.kind())).await;
            return Err(e);
        }
    };
    let observed = fetched.pass1.schema.clone();
    if let Err(e) = replicate::discover(app, known.stored().is_none(), &observed).await {
        give_back(app, &leases[1..], false).await;
        return Err(e);
    }
    let read_ms = fetched.body_began.elapsed().as_millis() as u64;
    let total_raw = fetched.pass1.raw_bytes.max(1);
    // Lines without a usable time belong to no day by their instant: they are kept with the
    // window's first day.
    let mut rejected = Some(fetched.pass1.rejected);
    let bodies = fetched.pass1.days;
    let given = bodies.len();
    // The days are written side by side, one more than there are cores (each small day by
    // one worker): a day waiting on its commit's syncs leaves its core to the extra one, and
    // an odd last day does not run alone. Each commits on its own once its parts are written.
    let mut jobs = Vec::new();
    for ((day, lease), (spill, raw_bytes)) in days.iter().zip(&leases).zip(bodies) {
        let body = DayBody {
            spill,
            raw_bytes,
            rejected: rejected.take().unwrap_or_default(),
        };
        let before = claim.slices.iter().find(|r| r.slice == SliceId::Day(*day));
        let guard = crate::run::commit::ShrinkGuard::for_slice(s.shrink_guard_percent, before);
        // The day's share of reading the body, then its own writing.
        let read = (u128::from(read_ms) * u128::from(raw_bytes) / u128::from(total_raw)) as u64;
        jobs.push(DayJob {
            day: *day,
            lease: lease.clone(),
            guard,
            body,
            read_ms: read,
        });
    }
    let written: Vec<Option<Result<SliceResult>>> = futures_util::stream::iter(jobs)
        .map(|job| write_window_day(app, &label, job, deadline))
        .buffered(replicate::workers() + 1)
        .collect()
        .await;
    let mut done: Vec<SliceResult> = Vec::new();
    let mut days_done = Vec::new();
    let mut first_error = None;
    let mut back = Vec::new();
    for (i, w) in written.into_iter().enumerate() {
        match w {
            Some(Ok(r)) => {
                done.push(r);
                days_done.push(days[i]);
            }
            // The first day's failure is the window's: its caller records it.
            Some(Err(e)) if i == 0 => first_error = Some(e),
            Some(Err(e)) => {
                tracing::warn!(table = "export", window = %label, day = %days[i], kind = %e.kind(), error = %e, "a day of the window did not commit; it stays pending");
                back.push(leases[i].clone());
            }
            None => back.push(leases[i].clone()),
        }
    }
    // Days the body held nothing for (it ended before them) are given back too.
    back.extend(leases.iter().skip(given).cloned());
    give_back(app, &back, false).await;
    if !done.is_empty()
        && let Err(e) =
            plan::advance_bookmark(app.store.as_ref(), Table::Export, s.start_date).await
    {
        // The days are committed; the next planning moves the bookmark over them.
        tracing::warn!(table = "export", window = %label, error = %e, "could not move the bookmark");
    }
    if let Some(e) = first_error {
        if !done.is_empty() {
            replicate::store_schema(app).await?;
        }
        return Err(e);
    }
    if done.is_empty() {
        return Ok(Some(Windowed::Partial(format!(
            "the deadline came before the days of {label} could be written; they stay pending"
        ))));
    }
    replicate::store_schema(app).await?;
    let mut total = SliceResult::default();
    for r in &done {
        total.add(r);
    }
    let label = label_of(&days_done);
    Ok(Some(Windowed::Done(total, label)))
}

/// One day of a window to write and commit.
struct DayJob {
    day: Date,
    lease: Lease,
    guard: crate::run::commit::ShrinkGuard,
    body: DayBody,
    /// The day's share of the time the body took to read.
    read_ms: u64,
}

/// Writes and commits one day of a window; `None` when the deadline is too near to start it
/// (it comes back).
async fn write_window_day(
    app: &App,
    label: &str,
    job: DayJob,
    deadline: Instant,
) -> Option<Result<SliceResult>> {
    if Instant::now() + replicate::pass2_at_least(job.body.raw_bytes) > deadline {
        tracing::warn!(table = "export", window = %label, day = %job.day, "deadline near; the day stays pending");
        return None;
    }
    let began = Instant::now();
    let read_ms = job.read_ms;
    let ms = move || read_ms + began.elapsed().as_millis() as u64;
    // The window moves the bookmark once, after all its days.
    let bookmark = replicate::Bookmark::Leave;
    Some(replicate::write_day(app, &job.lease, job.guard, job.body, ms, deadline, bookmark).await)
}

/// The window's days are marked to be fetched alone and given back (the first one by its
/// caller, which holds it).
async fn fall_back(app: &App, leases: &[Lease], label: &str, why: &str) -> Windowed {
    tracing::warn!(table = "export", window = %label, reason = %why, "the window did not work out; its days are fetched alone next");
    if let Some(first) = leases.first()
        && let Err(e) = app.store.save_progress(first, Some(ALONE)).await
    {
        tracing::warn!(error = %e, "could not mark the day to be fetched alone");
    }
    give_back(app, &leases[1..], true).await;
    Windowed::Partial(format!(
        "{why}; the days of {label} are fetched one by one next"
    ))
}

/// Gives held days back (marked to be fetched alone, when `alone`).
async fn give_back(app: &App, leases: &[Lease], alone: bool) {
    for l in leases {
        if alone && let Err(e) = app.store.save_progress(l, Some(ALONE)).await {
            tracing::warn!(error = %e, "could not mark the day to be fetched alone");
        }
        if let Err(e) = app.store.release(l).await {
            tracing::warn!(error = %e, slice = %l.slice, "could not give the day back; its lease will expire");
        }
    }
}

/// The label of the committed days of a window (in order): its runs of consecutive days,
/// `a..b` each (a lone day as itself), joined by commas. The days are written side by side, so
/// a day that failed may lie between two that committed.
fn label_of(days: &[Date]) -> String {
    let mut runs: Vec<(Date, Date)> = Vec::new();
    for d in days {
        match runs.last_mut() {
            Some((_, end)) if end.tomorrow().ok() == Some(*d) => *end = *d,
            _ => runs.push((*d, *d)),
        }
    }
    runs.iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}..{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The days a committed slice's label covers: a window's runs (`a..b`, comma-separated) day by
/// day; anything else is one slice.
pub fn days_in_label(label: &str) -> u64 {
    label
        .split(',')
        .map(|run| {
            let Some((a, b)) = run.split_once("..") else {
                return 1;
            };
            match (a.parse::<Date>(), b.parse::<Date>()) {
                (Ok(a), Ok(b)) => a.until(b).map_or(1, |s| s.get_days().max(0) as u64 + 1),
                _ => 1,
            }
        })
        .sum()
}

/// Whether any export day has a recorded size (else the next day fetched is a probe).
pub async fn measured(store: &dyn crate::state::StateStore) -> Result<bool> {
    Ok(store.slices(Table::Export).await?.iter().any(|r| {
        matches!(r.slice, SliceId::Day(_)) && Recorded::parse(r.result.as_deref()).is_some()
    }))
}

/// `slices` with the sizes this process has read of days not yet recorded (a day another
/// worker is still writing) as their results, for [`plan_window`]'s estimates.
fn with_read_sizes<'a>(
    slices: &'a [SliceRecord],
    read: &[(Date, u64, u64)],
) -> std::borrow::Cow<'a, [SliceRecord]> {
    let unrecorded = |r: &SliceRecord| Recorded::parse(r.result.as_deref()).is_none();
    let mut out = std::borrow::Cow::Borrowed(slices);
    for (day, raw_bytes, ms) in read {
        let Some(i) = slices
            .iter()
            .position(|r| r.slice == SliceId::Day(*day) && unrecorded(r))
        else {
            continue;
        };
        let result = Recorded {
            raw_bytes: *raw_bytes,
            ms: *ms,
            records: 0,
            duplicates: 0,
            files: Vec::new(),
            rejected: 0,
            rejected_files: Vec::new(),
        };
        out.to_mut()[i].result = Some(result.to_json());
    }
    out
}

/// Whether a day is marked to be fetched alone.
fn alone(r: &SliceRecord) -> bool {
    r.progress.as_deref() == Some(ALONE)
}

/// The days of the window that begins with the claimed `first`: `first` alone when it has no
/// history near it (the probe) or is not small, else the contiguous pending small whole days
/// after it within `max_days` and the target size.
pub fn plan_window(
    slices: &[SliceRecord],
    first: Date,
    max_days: u32,
    now_ms: u64,
    left: Duration,
) -> Vec<Date> {
    let mut days = vec![first];
    let record = |d: Date| slices.iter().find(|r| r.slice == SliceId::Day(d));
    let whole = |d: Date| plan::hours_of(slices, d).is_empty();
    if max_days < 2 || !whole(first) || record(first).is_none_or(|r| alone(r) || r.failures > 0) {
        return days;
    }
    let recorded: Vec<(Date, Recorded)> = slices
        .iter()
        .filter_map(|r| match r.slice {
            SliceId::Day(d) => Recorded::parse(r.result.as_deref()).map(|rec| (d, rec)),
            _ => None,
        })
        .collect();
    let estimate = |d: Date| -> Option<u64> {
        let mut best: Option<(i64, u64)> = None;
        for (day, rec) in &recorded {
            let gap = (day.since(d).ok()?.get_days() as i64).abs();
            if gap > NEAR_DAYS {
                continue;
            }
            best = match best {
                Some((g, b)) if g < gap => Some((g, b)),
                Some((g, b)) if g == gap => Some((g, b.max(rec.raw_bytes))),
                _ => Some((gap, rec.raw_bytes)),
            };
        }
        best.map(|(_, b)| b)
    };
    let Some(first_bytes) = estimate(first).filter(|b| *b <= SMALL_DAY_BYTES) else {
        return days;
    };
    // Raw bytes that the measured throughput reads in a share of the time left.
    let (bytes, ms) = recorded
        .iter()
        .filter(|(_, r)| r.ms > 0)
        .fold((0u64, 0u64), |(b, m), (_, r)| (b + r.raw_bytes, m + r.ms));
    let target = if ms > 0 {
        let per_s = bytes as f64 * 1000.0 / ms as f64;
        ((per_s * left.as_secs_f64() * WINDOW_TIME_SHARE) as u64).min(WINDOW_MAX_BYTES)
    } else {
        WINDOW_MAX_BYTES
    };
    let mut sum = first_bytes;
    let mut d = first;
    while days.len() < max_days as usize {
        let Ok(next) = d.tomorrow() else { break };
        let Some(r) = record(next) else { break };
        let pending = r.status == SliceStatus::Pending || r.status == SliceStatus::Leased;
        if !pending
            || !plan::claimable(r, now_ms)
            || r.failures > 0
            || r.retry_at_ms.is_some()
            || alone(r)
            || !whole(next)
        {
            break;
        }
        let Some(b) = estimate(next).filter(|b| *b <= SMALL_DAY_BYTES) else {
            break;
        };
        if sum + b > target {
            break;
        }
        sum += b;
        days.push(next);
        d = next;
    }
    days
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(day: &str, raw_bytes: Option<u64>) -> SliceRecord {
        let result = raw_bytes.map(|b| {
            Recorded {
                raw_bytes: b,
                ms: 1000,
                records: 1,
                duplicates: 0,
                files: Vec::new(),
                rejected: 0,
                rejected_files: Vec::new(),
            }
            .to_json()
        });
        SliceRecord {
            table: Table::Export,
            slice: SliceId::Day(day.parse().unwrap()),
            status: SliceStatus::Pending,
            lease_owner: None,
            lease_expires_ms: None,
            committed_at_ms: None,
            attempts: 0,
            progress: None,
            result,
            failures: 0,
            retry_at_ms: None,
            error: None,
        }
    }

    fn planned(slices: &[SliceRecord]) -> Vec<String> {
        let first = match slices[0].slice {
            SliceId::Day(d) => d,
            _ => unreachable!(),
        };
        // Ample time: only the sizes bound the window.
        plan_window(slices, first, 30, 0, Duration::from_secs(3600))
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_windows_label_counts_exactly_the_days_it_committed() {
        let d = |s: &str| s.parse::<Date>().unwrap();
        let days = [
            d("2026-03-01"),
            d("2026-03-02"),
            d("2026-03-04"),
            d("2026-03-06"),
        ];
        let label = label_of(&days);
        assert_eq!(label, "2026-03-01..2026-03-02,2026-03-04,2026-03-06");
        assert_eq!(days_in_label(&label), 4);
        assert_eq!(days_in_label(&label_of(&days[..2])), 2);
        assert_eq!(label_of(&days[..2]), "2026-03-01..2026-03-02");
        assert_eq!(days_in_label("2026-03-05"), 1);
        assert_eq!(days_in_label("2026-03-05T10"), 1);
    }

    #[test]
    fn days_of_sixty_mib_go_four_to_a_window_and_a_day_past_sixty_four_mib_alone() {
        const MIB: u64 = 1 << 20;
        let days: Vec<SliceRecord> = (1..=6)
            .map(|i| pending(&format!("2026-03-0{i}"), Some(60 * MIB)))
            .collect();
        // 4 × 60 MiB = 240 MiB fits the 256 MiB of a request; a fifth day does not.
        assert_eq!(
            planned(&days),
            ["2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04"]
        );
        // Days of 11 MB (above the 4 MB a day once was) go 23 to a request.
        let days: Vec<SliceRecord> = (1..=28)
            .map(|i| pending(&format!("2026-03-{i:02}"), Some(11_000_000)))
            .collect();
        assert_eq!(planned(&days).len(), 24);
        // A day estimated above 64 MiB goes alone, and a window stops before one.
        let mut days = vec![pending("2026-03-01", Some(65 * MIB))];
        days.push(pending("2026-03-02", Some(MIB)));
        assert_eq!(planned(&days), ["2026-03-01"]);
        let days = vec![
            pending("2026-03-01", Some(MIB)),
            pending("2026-03-02", Some(MIB)),
            pending("2026-03-03", Some(65 * MIB)),
        ];
        assert_eq!(planned(&days), ["2026-03-01", "2026-03-02"]);
        // A day without a size near it is fetched alone (the probe).
        let days = vec![pending("2026-03-01", None), pending("2026-03-02", None)];
        assert_eq!(planned(&days), ["2026-03-01"]);
    }
}
