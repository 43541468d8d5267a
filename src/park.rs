//! Bounded attempts: a failed attempt is recorded on its slice with a backoff, and a slice that
//! keeps failing is parked (status `failed`, with its error) where a person sees and retries
//! it. Claims skip a parked slice and the bookmark does not pass it, so one bad day never stops
//! the rest of its table, nor the other tables.

use std::time::Duration;

use jiff::Timestamp;

use crate::app::App;
use crate::error::{Error, ErrorKind, Result};
use crate::state::{Failure, Lease, SliceError, SliceId, SliceRecord, SliceStatus, StateStore};
use crate::tables::Table;

/// The longest wait between two attempts of a failing slice.
const BACKOFF_MAX: Duration = Duration::from_secs(3600);

/// Whether a failure is the slice's own, counted towards parking it. Failures of the
/// configuration, the credentials or the state store are everyone's: they fail the invocation
/// and leave the slice as it was; a deadline or a rate limit is no failure at all.
pub fn counts(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Transient | ErrorKind::BadResponse | ErrorKind::Storage | ErrorKind::Shrunk
    )
}

/// Whether a failure parks the slice at once: only a person can say that it is right.
fn parks_at_once(kind: ErrorKind) -> bool {
    kind == ErrorKind::Shrunk
}

/// The wait after `failures` failed attempts in a row: `base`, doubling, at most an hour.
pub fn backoff(base: Duration, failures: u32) -> Duration {
    base.saturating_mul(1u32 << failures.clamp(1, 16).saturating_sub(1))
        .min(BACKOFF_MAX)
}

/// What became of a slice after a failed attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Pending again, not before `retry_at_ms`.
    Retry {
        /// Failed attempts in a row.
        failures: u32,
        /// When it may be claimed again, epoch milliseconds.
        retry_at_ms: u64,
    },
    /// Parked after `failures` failed attempts in a row.
    Parked {
        /// Failed attempts in a row.
        failures: u32,
    },
    /// The lease was lost meanwhile: the slice is another attempt's now.
    LeaseLost,
}

impl Recorded {
    /// A phrase for answers and logs: "attempt 2 of 5, retried after 10 s" or "parked after 5
    /// attempts"; the wait is counted from `now_ms` (the app's clock, epoch milliseconds).
    pub fn describe(&self, max: u32, now_ms: u64) -> String {
        match self {
            Recorded::Retry {
                failures,
                retry_at_ms,
            } => {
                let now = now_ms;
                let wait = Duration::from_millis(retry_at_ms.saturating_sub(now));
                format!(
                    "failed attempt {failures} of {max}; tried again after {} s",
                    wait.as_secs()
                )
            }
            Recorded::Parked { failures } => format!(
                "parked after {failures} failed attempt{}; retry it with an explicit event or `sync --retry-parked`",
                if *failures == 1 { "" } else { "s" }
            ),
            Recorded::LeaseLost => "its lease was taken over meanwhile".into(),
        }
    }
}

/// Records that the attempt holding `lease` failed with `err`. `before` is the slice as it was
/// when claimed (its failures so far). Only failures that [`counts`] are recorded; others
/// give the slice back unchanged and return `None`.
pub async fn record(
    app: &App,
    lease: &Lease,
    before: Option<&SliceRecord>,
    err: &Error,
) -> Result<Option<Recorded>> {
    if !counts(err.kind()) {
        app.store.release(lease).await?;
        return Ok(None);
    }
    let now_ms = app.clock.now_ms();
    let failures = before.map_or(0, |r| r.failures).saturating_add(1);
    let max = app.settings.max_slice_attempts;
    let park = failures >= max || parks_at_once(err.kind());
    let retry_at_ms =
        now_ms + backoff(app.settings.slice_retry_backoff, failures).as_millis() as u64;
    let failure = Failure {
        failures,
        park,
        retry_at_ms: (!park).then_some(retry_at_ms),
        error: SliceError {
            kind: err.kind().as_str().to_string(),
            message: err.message().to_string(),
            at_ms: now_ms,
        },
    };
    if !app.store.fail(lease, &failure).await? {
        return Ok(Some(Recorded::LeaseLost));
    }
    let recorded = if park {
        Recorded::Parked { failures }
    } else {
        Recorded::Retry {
            failures,
            retry_at_ms,
        }
    };
    if park {
        tracing::error!(
            table = %lease.table, slice = %lease.slice, kind = %err.kind(), error = %err, failures,
            "slice parked: it is skipped until retried"
        );
    } else {
        tracing::warn!(
            table = %lease.table, slice = %lease.slice, kind = %err.kind(), error = %err, failures,
            retry_in_s = (retry_at_ms - now_ms) / 1000, "slice failed; it is tried again later"
        );
    }
    Ok(Some(recorded))
}

/// The parked slices among `slices`.
pub fn parked(slices: &[SliceRecord]) -> impl Iterator<Item = &SliceRecord> {
    slices.iter().filter(|r| r.status == SliceStatus::Failed)
}

/// A person's retry of every parked (or backing-off) slice of `table`; returns those retried.
pub async fn retry_all(store: &dyn StateStore, table: Table) -> Result<Vec<SliceId>> {
    let mut retried = Vec::new();
    for r in store.slices(table).await? {
        let waiting = r.status == SliceStatus::Failed
            || (r.status == SliceStatus::Pending && (r.failures > 0 || r.retry_at_ms.is_some()));
        if waiting && store.reset_failures(table, r.slice).await? {
            retried.push(r.slice);
        }
    }
    Ok(retried)
}

/// One line for a parked slice: `export 2026-11-03: parked after 5 failed attempts (BadResponse
/// at 2026-11-04T10:00:00Z): <message>`.
pub fn describe(r: &SliceRecord) -> String {
    let (kind, at, message) = match &r.error {
        Some(e) => (
            e.kind.as_str(),
            Timestamp::from_millisecond(e.at_ms as i64)
                .map(|t| t.to_string())
                .unwrap_or_default(),
            e.message.as_str(),
        ),
        None => ("unknown", String::new(), "no error recorded"),
    };
    format!(
        "{} {}: parked after {} failed attempt{} ({kind} at {at}): {message}",
        r.table,
        r.slice,
        r.failures,
        if r.failures == 1 { "" } else { "s" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ShiftedClock};

    #[test]
    fn the_retry_phrase_counts_the_wait_from_the_clock_given() {
        let retry = Recorded::Retry {
            failures: 2,
            retry_at_ms: 1_772_967_600_000,
        };
        assert_eq!(
            retry.describe(5, 1_772_967_590_000),
            "failed attempt 2 of 5; tried again after 10 s"
        );
        // A clock past the retry time: at once.
        assert_eq!(
            retry.describe(5, 1_772_967_600_500),
            "failed attempt 2 of 5; tried again after 0 s"
        );
        // The app's clock, not the system's: an hour on, a wait of two hours has one left.
        let clock = ShiftedClock::new();
        let retry = Recorded::Retry {
            failures: 1,
            retry_at_ms: clock.now_ms() + 7_200_000,
        };
        clock.advance(Duration::from_secs(3600));
        let phrase = retry.describe(5, clock.now_ms());
        assert!(
            phrase == "failed attempt 1 of 5; tried again after 3599 s"
                || phrase == "failed attempt 1 of 5; tried again after 3600 s",
            "{phrase}"
        );
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        let base = Duration::from_secs(300);
        assert_eq!(backoff(base, 1), Duration::from_secs(300));
        assert_eq!(backoff(base, 2), Duration::from_secs(600));
        assert_eq!(backoff(base, 4), Duration::from_secs(2400));
        assert_eq!(backoff(base, 5), BACKOFF_MAX);
        assert_eq!(backoff(base, 40), BACKOFF_MAX);
        assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
    }

    #[test]
    fn only_the_slices_own_failures_count() {
        for kind in [
            ErrorKind::Transient,
            ErrorKind::BadResponse,
            ErrorKind::Storage,
            ErrorKind::Shrunk,
        ] {
            assert!(counts(kind), "{kind}");
        }
        for kind in [
            ErrorKind::Deadline,
            ErrorKind::RateLimited,
            ErrorKind::PaymentRequired,
            ErrorKind::Unauthorized,
            ErrorKind::Secret,
            ErrorKind::InvalidSetting,
            ErrorKind::InvalidEvent,
            ErrorKind::State,
        ] {
            assert!(!counts(kind), "{kind}");
        }
    }
}
