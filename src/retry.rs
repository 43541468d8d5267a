//! The retry policy: how many times an operation is tried, and how long to wait after each
//! failure, for every loop of the program that tries something again.
//!
//! A [`Policy`] is a bound on attempts and an exponential delay (first delay, factor, cap,
//! jitter); each use has its named constant. [`Policy::run`] tries an operation under it: after
//! each error the caller decides ([`Decision`]) whether to try again after the policy's delay,
//! after a wait of its own (Mixpanel's `Retry-After`), at once (another wait, such as the
//! shared request budget's, holds the next attempt back), or not at all; a deadline ends the
//! retries rather than sleeping past it. A loop that carries state from one attempt to the next
//! (a batch of which only the failed entries are sent again) takes its attempts from
//! [`Attempts`], the counter `run` is built on.
//!
//! Two loops of the request budget are not retries in this sense and stay hand-written:
//! waiting for room in the budget (`ratelimit`'s `acquire`) is bounded by the deadline, not by
//! a count of attempts, and re-stamping a grant after a slow ledger write repeats after a write
//! that succeeded too (until one is quick enough), not only after a failure.
//!
//! Written here rather than with a retry crate such as `backon`: its retry loop has no
//! deadline, decides only "retry or not" on an error (a `Retry-After` wait replaces its delay
//! only through a separate hook, and "at once, without counting the deadline" not at all), and
//! its operation is a closure that cannot borrow the state a partial batch retry changes
//! between attempts. What is needed is a few lines, and tested below.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::Error;

/// How many times an operation is tried and how long to wait between its attempts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Policy {
    /// Attempts in all, the first included (at least 1).
    pub attempts: u32,
    /// The wait after the first failed attempt.
    pub first_delay: Duration,
    /// How much longer each next wait is.
    pub factor: u32,
    /// The longest wait, before jitter.
    pub cap: Duration,
    /// The share of the wait that is random, either way: 0.25 waits from 75 % to 125 %.
    pub jitter: f64,
}

impl Policy {
    /// A Mixpanel request: rate limits (and for queries server errors and network failures)
    /// are tried six times, 0.5 s, 1 s, 2 s... apart (at most a minute), spread by ±25 %
    /// across concurrent invocations.
    pub const MIXPANEL: Policy = Policy {
        attempts: 6,
        first_delay: Duration::from_millis(500),
        factor: 2,
        cap: Duration::from_secs(60),
        jitter: 0.25,
    };

    /// An export body Mixpanel cut off (or failed): fetched twice in one invocation, so that a
    /// failing request never spends more of the hour's 60 exports than this.
    pub const EXPORT_FETCH: Policy = Policy {
        attempts: 2,
        ..Policy::MIXPANEL
    };

    /// Storage and state-store work after a commit's manifest is written (removing other
    /// attempts' parts, reading a slice back): three tries, 0.4 s and 0.8 s apart.
    pub const CLEANUP: Policy = Policy {
        attempts: 3,
        first_delay: Duration::from_millis(400),
        factor: 2,
        cap: Duration::from_secs(60),
        jitter: 0.0,
    };

    /// A SendMessageBatch to the fan-out queue: the entries SQS did not take are sent again,
    /// four sends in all, 0.2 s, 0.4 s and 0.8 s apart.
    pub const SQS_SEND: Policy = Policy {
        attempts: 4,
        first_delay: Duration::from_millis(200),
        factor: 2,
        cap: Duration::from_secs(60),
        jitter: 0.0,
    };

    /// A schema merge that lost a compare-and-swap race to another writer: read again and
    /// merged at once (the winner's write is there to read: waiting would not help), 32 tries
    /// before the merge fails.
    pub const SCHEMA_MERGE: Policy = Policy {
        attempts: 32,
        first_delay: Duration::ZERO,
        factor: 1,
        cap: Duration::ZERO,
        jitter: 0.0,
    };

    /// A request-ledger write that lost a compare-and-swap race (recording a 429's block,
    /// giving an in-flight slot back): read again and written at once, 16 tries.
    pub const LEDGER_WRITE: Policy = Policy {
        attempts: 16,
        ..Policy::SCHEMA_MERGE
    };

    /// A Glue UpdateTable that lost to a concurrent modification: the table is read again
    /// and written at once, three tries before the commit's catalog update fails.
    pub const GLUE_UPDATE: Policy = Policy {
        attempts: 3,
        ..Policy::SCHEMA_MERGE
    };

    /// The same policy with another first delay (tests shorten Mixpanel's).
    pub const fn with_first_delay(self, first_delay: Duration) -> Policy {
        Policy {
            first_delay,
            ..self
        }
    }

    /// The wait after failed attempt `attempt` (from 1): `first_delay * factor^(attempt - 1)`,
    /// at most `cap`, then jittered.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_at(attempt, unit_random())
    }

    /// [`Policy::delay`] with the random draw `unit` (in `[0, 1)`) given.
    fn delay_at(&self, attempt: u32, unit: f64) -> Duration {
        let growth = self
            .factor
            .saturating_pow(attempt.clamp(1, 16).saturating_sub(1));
        let capped = self.first_delay.saturating_mul(growth).min(self.cap);
        if self.jitter <= 0.0 {
            return capped;
        }
        capped.mul_f64(1.0 - self.jitter + 2.0 * self.jitter * unit.clamp(0.0, 1.0))
    }

    /// A counter of the attempts of one operation under this policy; with a `deadline`, no
    /// wait that would end at or after it.
    pub fn start(self, deadline: Option<Instant>) -> Attempts {
        Attempts {
            policy: self,
            deadline,
            made: 0,
        }
    }

    /// Runs `op` (given the attempt's number, from 1) until it succeeds or the policy, the
    /// deadline or `decide` (given each error and its attempt's number) ends the retries;
    /// then returns the last error. `on_retry` is called before each next attempt, with the
    /// error, the failed attempt's number and the wait (`None`: at once).
    pub async fn run<T, E, Fut>(
        self,
        deadline: Option<Instant>,
        mut op: impl FnMut(u32) -> Fut,
        mut decide: impl FnMut(&E, u32) -> Decision,
        mut on_retry: impl FnMut(&E, u32, Option<Duration>),
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempts = self.start(deadline);
        loop {
            let attempt = attempts.begin();
            // Boxed: an operation's future can be deep (a request within a slice within an
            // invocation); behind a pointer it nests no deeper in its caller's future, whose
            // type the compiler lays out only to a limited depth.
            let err = match Box::pin(op(attempt)).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            match attempts.after(decide(&err, attempt)) {
                Next::GiveUp => return Err(err),
                Next::AtOnce => on_retry(&err, attempt, None),
                Next::Wait(wait) => {
                    on_retry(&err, attempt, Some(wait));
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
    }
}

impl Policy {
    /// A compare-and-swap loop under the policy: `op` answers `Err(None)` when another writer
    /// came first (read again and tried again, at once or after the policy's delay) and
    /// `Err(Some(e))` when the store failed, which ends it.
    pub async fn run_cas<T, Fut>(self, mut op: impl FnMut(u32) -> Fut) -> Result<T, Option<Error>>
    where
        Fut: Future<Output = Result<T, Option<Error>>>,
    {
        self.run(
            None,
            &mut op,
            |failed: &Option<Error>, _| {
                if failed.is_some() {
                    Decision::GiveUp
                } else {
                    Decision::Retry
                }
            },
            |_, _, _| {},
        )
        .await
    }
}

/// The caller's decision on a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Try again after the policy's delay.
    Retry,
    /// Try again after this wait instead (a `Retry-After`).
    RetryAfter(Duration),
    /// Try again without waiting, whatever the deadline: something else holds the next attempt
    /// back (the shared request budget) and ends it at the deadline.
    RetryAtOnce,
    /// Do not try again: the error is returned as it is.
    GiveUp,
}

/// What follows a failed attempt under the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Wait this long, then try again.
    Wait(Duration),
    /// Try again now.
    AtOnce,
    /// The error is final.
    GiveUp,
}

/// The attempts of one operation under a [`Policy`].
#[derive(Debug)]
pub(crate) struct Attempts {
    policy: Policy,
    deadline: Option<Instant>,
    made: u32,
}

impl Attempts {
    /// Counts an attempt that begins; returns its number, from 1.
    pub fn begin(&mut self) -> u32 {
        self.made = self.made.saturating_add(1);
        self.made
    }

    /// What follows the failure of the last attempt begun, given the caller's `decision`: none
    /// after the policy's last attempt, nor a wait that would end at or after the deadline.
    pub fn after(&self, decision: Decision) -> Next {
        let wait = match decision {
            Decision::GiveUp => return Next::GiveUp,
            _ if self.made >= self.policy.attempts => return Next::GiveUp,
            Decision::RetryAtOnce => return Next::AtOnce,
            Decision::Retry => self.policy.delay(self.made),
            Decision::RetryAfter(wait) => wait,
        };
        match self.deadline {
            Some(deadline)
                if Instant::now()
                    .checked_add(wait)
                    .is_none_or(|t| t >= deadline) =>
            {
                Next::GiveUp
            }
            _ => Next::Wait(wait),
        }
    }
}

/// A number in `[0, 1)` from the clock's nanoseconds: enough to spread concurrent invocations.
fn unit_random() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const PLAIN: Policy = Policy {
        attempts: 5,
        first_delay: Duration::from_millis(100),
        factor: 3,
        cap: Duration::from_secs(2),
        jitter: 0.0,
    };

    #[test]
    fn delays_grow_by_the_factor_and_stop_at_the_cap() {
        let ms = |a| PLAIN.delay(a).as_millis();
        assert_eq!([ms(1), ms(2), ms(3), ms(4)], [100, 300, 900, 2000]);
        assert_eq!(ms(40), 2000);
        assert_eq!(PLAIN.delay(u32::MAX), Duration::from_secs(2));
        // The named policies wait as their loops always did.
        let ms = |p: Policy, a| p.delay_at(a, 0.5).as_millis();
        assert_eq!(
            (1..=8).map(|a| ms(Policy::MIXPANEL, a)).collect::<Vec<_>>(),
            [500, 1000, 2000, 4000, 8000, 16000, 32000, 60000]
        );
        assert_eq!(ms(Policy::EXPORT_FETCH, 1), 500);
        assert_eq!([ms(Policy::CLEANUP, 1), ms(Policy::CLEANUP, 2)], [400, 800]);
        assert_eq!([1, 2, 3].map(|a| ms(Policy::SQS_SEND, a)), [200, 400, 800]);
        assert_eq!(Policy::SCHEMA_MERGE.delay(7), Duration::ZERO);
        assert_eq!(
            (Policy::LEDGER_WRITE.attempts, Policy::LEDGER_WRITE.delay(3)),
            (16, Duration::ZERO)
        );
        assert_eq!(
            (Policy::GLUE_UPDATE.attempts, Policy::GLUE_UPDATE.delay(2)),
            (3, Duration::ZERO)
        );
        assert_eq!(
            Policy::MIXPANEL
                .with_first_delay(Duration::from_millis(20))
                .delay_at(3, 0.5),
            Duration::from_millis(80)
        );
    }

    #[test]
    fn jitter_stays_within_its_share_either_way() {
        let p = Policy::MIXPANEL;
        assert_eq!(p.delay_at(1, 0.0), Duration::from_millis(375));
        let most = p.delay_at(1, 0.999);
        assert!(most > Duration::from_millis(624) && most < Duration::from_millis(625));
        // Applied after the cap: a capped wait is spread too.
        assert_eq!(p.delay_at(20, 0.0), Duration::from_secs(45));
        for attempt in 1..=10 {
            let base = p.delay_at(attempt, 0.5);
            for _ in 0..50 {
                let d = p.delay(attempt);
                assert!(d >= base.mul_f64(0.75) && d < base.mul_f64(1.25), "{d:?}");
            }
        }
    }

    #[tokio::test]
    async fn attempts_are_bounded_and_the_last_error_is_returned() {
        let calls = Cell::new(0);
        let retried = Cell::new(0);
        let p = PLAIN.with_first_delay(Duration::from_millis(1));
        let out: Result<(), u32> = p
            .run(
                None,
                |attempt| {
                    calls.set(calls.get() + 1);
                    async move { Err(attempt) }
                },
                |_, _| Decision::Retry,
                |_, _, wait| {
                    assert!(wait.is_some());
                    retried.set(retried.get() + 1);
                },
            )
            .await;
        assert_eq!(out, Err(5));
        assert_eq!((calls.get(), retried.get()), (5, 4));
        // Success ends the attempts.
        let out: Result<u32, u32> = p
            .run(
                None,
                |attempt| async move {
                    if attempt < 3 {
                        Err(attempt)
                    } else {
                        Ok(attempt)
                    }
                },
                |_, _| Decision::Retry,
                |_, _, _| {},
            )
            .await;
        assert_eq!(out, Ok(3));
        // At once counts as an attempt too.
        let at_once = Policy {
            attempts: 32,
            first_delay: Duration::ZERO,
            ..PLAIN
        };
        let mut attempts = at_once.start(None);
        for _ in 0..31 {
            attempts.begin();
            assert_eq!(attempts.after(Decision::Retry), Next::Wait(Duration::ZERO));
            assert_eq!(attempts.after(Decision::RetryAtOnce), Next::AtOnce);
        }
        attempts.begin();
        assert_eq!(attempts.after(Decision::RetryAtOnce), Next::GiveUp);
    }

    #[tokio::test]
    async fn a_deadline_stops_the_retries_before_a_wait_that_passes_it() {
        let started = Instant::now();
        let calls = Cell::new(0);
        // The first wait (2 s, the cap) would end after the deadline.
        let p = PLAIN.with_first_delay(Duration::from_secs(10));
        let out: Result<(), &str> = p
            .run(
                Some(started + Duration::from_secs(1)),
                |_| {
                    calls.set(calls.get() + 1);
                    async { Err("down") }
                },
                |_, _| Decision::Retry,
                |_, _, _| panic!("no retry past the deadline"),
            )
            .await;
        assert_eq!((out, calls.get()), (Err("down"), 1));
        assert!(started.elapsed() < Duration::from_millis(500));
        // A wait of the caller's own is held to the deadline too; a wait that ends before it
        // is not.
        let mut attempts = PLAIN.start(Some(Instant::now() + Duration::from_secs(5)));
        attempts.begin();
        assert_eq!(
            attempts.after(Decision::RetryAfter(Duration::from_secs(5))),
            Next::GiveUp
        );
        assert_eq!(
            attempts.after(Decision::RetryAfter(Duration::from_secs(1))),
            Next::Wait(Duration::from_secs(1))
        );
        assert_eq!(
            attempts.after(Decision::Retry),
            Next::Wait(Duration::from_millis(100))
        );
        // At once is left to whatever holds the next attempt back, deadline or not.
        let mut attempts = PLAIN.start(Some(Instant::now()));
        attempts.begin();
        assert_eq!(attempts.after(Decision::RetryAtOnce), Next::AtOnce);
        assert_eq!(attempts.after(Decision::Retry), Next::GiveUp);
    }

    #[tokio::test]
    async fn giving_up_returns_the_error_at_once() {
        let started = Instant::now();
        let calls = Cell::new(0);
        let out: Result<(), &str> = PLAIN
            .with_first_delay(Duration::from_secs(10))
            .run(
                None,
                |_| {
                    calls.set(calls.get() + 1);
                    async { Err("unauthorized") }
                },
                |e, attempt| {
                    assert_eq!((*e, attempt), ("unauthorized", 1));
                    Decision::GiveUp
                },
                |_, _, _| panic!("no retry after giving up"),
            )
            .await;
        assert_eq!((out, calls.get()), (Err("unauthorized"), 1));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
