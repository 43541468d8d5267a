//! The wall clock that leases, the request budget's ledger, backoffs and schedules read.
//!
//! Deadlines and waits are on tokio's clock (`tokio::time::Instant`, `sleep`), which a test
//! pauses and advances. Wall time (epoch milliseconds, kept in the state store so that other
//! invocations read it) comes from a [`Clock`]: the system's in a run, or [`TokioClock`] in a
//! test, whose wall time moves with tokio's clock. Under `tokio::time::pause` a test of a
//! one-hour rate window or a lease that runs out then takes no real time, and nothing in it
//! depends on how fast the machine is.
//!
//! Everything that reads wall time and can reach an app reads its clock. Two reads stay on the
//! system's: Lambda's deadline (`handler::effective_deadline`), which the runtime gives as
//! the system's time, and the retry jitter's nanoseconds, which are a random draw, not a time.
//!
//! Tests that run real HTTP to the simulator (and to moto, another process) cannot pause
//! tokio's clock: it would jump to the next timer, a deadline, whenever every task waits on a
//! socket. Where such a test needs an invocation to stop at a given page or hour, the
//! simulator holds that answer until the test opens its gate (`mixpanel_sim::Gate`): the
//! deadline then falls there on any machine, and the work before it has seconds to spare.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use jiff::Timestamp;
use tokio::time::Instant;

/// A source of wall time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now.
    fn now(&self) -> Timestamp;

    /// Now, in epoch milliseconds (0 before 1970).
    fn now_ms(&self) -> u64 {
        self.now().as_millisecond().max(0) as u64
    }
}

/// The system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// The clock of a run: the system's.
pub fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// Wall time that moves with tokio's clock: the system's time when it was made, plus the time
/// tokio's clock has moved since. With tokio's clock paused, it stands still until every task
/// waits and then jumps to the next timer (or by `tokio::time::advance`), as tokio's does.
#[derive(Clone, Copy, Debug)]
pub struct TokioClock {
    wall: Timestamp,
    at: Instant,
}

impl TokioClock {
    /// A clock that reads the system's time now.
    pub fn new() -> Self {
        TokioClock::starting_at(Timestamp::now())
    }

    /// A clock that reads `wall` now.
    pub fn starting_at(wall: Timestamp) -> Self {
        TokioClock {
            wall,
            at: Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        let moved = Instant::now().saturating_duration_since(self.at);
        let span = jiff::SignedDuration::try_from(moved).unwrap_or(jiff::SignedDuration::MAX);
        self.wall.saturating_add(span).unwrap_or(Timestamp::MAX)
    }
}

/// The system's time plus an offset that only grows: a test moves it forward at once ("an
/// hour later") where tokio's clock cannot be paused, as when real HTTP is in flight. Every
/// app built on one shares the jumps.
#[derive(Debug, Default)]
pub struct ShiftedClock {
    ahead_ms: AtomicU64,
}

impl ShiftedClock {
    /// A clock that reads the system's time until moved.
    pub fn new() -> Arc<ShiftedClock> {
        Arc::new(ShiftedClock::default())
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: std::time::Duration) {
        self.ahead_ms
            .fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> Timestamp {
        let ahead = self.ahead_ms.load(Ordering::SeqCst) as i64;
        let now = Timestamp::now();
        now.checked_add(jiff::SignedDuration::from_millis(ahead))
            .unwrap_or(Timestamp::MAX)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_only_with_tokios_clock() {
        let start: Timestamp = "2026-03-08T09:59:59.5Z".parse().unwrap();
        let clock = TokioClock::starting_at(start);
        assert_eq!(clock.now(), start);
        // A paused clock: real time passing moves nothing.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(clock.now(), start);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(clock.now(), "2026-03-08T10:59:59.5Z".parse().unwrap());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(clock.now_ms(), 1_772_967_600_000);
    }

    #[test]
    fn a_shifted_clock_runs_with_the_system_clock_and_jumps_when_moved() {
        let clock = ShiftedClock::new();
        let before = Timestamp::now();
        assert!(clock.now() >= before && clock.now() <= Timestamp::now());
        clock.advance(Duration::from_secs(3600));
        let read = clock.now();
        assert!(
            read >= before + jiff::SignedDuration::from_secs(3600),
            "{read}"
        );
        assert!(
            read <= Timestamp::now() + jiff::SignedDuration::from_secs(3600),
            "{read}"
        );
    }

    #[test]
    fn the_system_clock_reads_the_system_time() {
        let before = Timestamp::now();
        let read = SystemClock.now();
        assert!(read >= before && read <= Timestamp::now());
        assert_eq!(
            SystemClock.now_ms() / 100_000,
            read.as_millisecond() as u64 / 100_000
        );
    }
}
