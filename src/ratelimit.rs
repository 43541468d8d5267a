//! One Mixpanel request budget for every invocation: a sliding-window ledger per API family kept
//! in the state store through its [`Ledger`] side only (one versioned document, updated by
//! compare-and-swap), so that concurrent invocations (fan-out) never cause a 429 storm.
//!
//! A request is granted when, over the window, fewer than `per_window` requests were granted,
//! fewer than `per_second` in the last second, and fewer than `concurrent` are in flight. When
//! the budget has no room, the caller waits for the earliest free slot, but never past its
//! deadline: it then stops cleanly with a `Deadline` error (the slice stays pending).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::error::{Error, ErrorKind, Result};
use crate::retry::{Decision, Policy};
use crate::state::Ledger;

/// The two request families Mixpanel limits separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Raw event export.
    Export,
    /// Query API (and App API).
    Query,
}

impl Family {
    fn document(self) -> &'static str {
        match self {
            Family::Export => "requests#export",
            Family::Query => "requests#query",
        }
    }
}

/// The limits of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Requests per window.
    pub per_window: u32,
    /// The sliding window.
    pub window: Duration,
    /// Requests per second (export: 3).
    pub per_second: Option<u32>,
    /// Requests in flight at once.
    pub concurrent: u32,
    /// How long an in-flight request counts at most (a crashed holder's slot comes back then).
    pub max_hold: Duration,
}

impl Limits {
    /// Extra time a grant is counted, so that the arrival-time window Mixpanel counts in never
    /// sees more than the limit (a request reaches Mixpanel a little after it is granted).
    fn margin_ms(&self) -> u64 {
        (self.window.as_millis() as u64 / 50).max(250)
    }
}

/// The ledger document of one request family: the grants within the sliding window, the
/// requests in flight and the paging tables' shares.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Window {
    /// When requests were granted, epoch ms.
    grants: Vec<u64>,
    /// Requests in flight.
    inflight: Vec<Inflight>,
    /// Mixpanel answered 429: no request is granted before this time, epoch ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blocked_until: Option<u64>,
    /// How long the last 429 without `Retry-After` held requests back, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    penalty_ms: Option<u64>,
    /// The grants made under a [`Share`], by its tag (a table), epoch ms; also in `grants`.
    /// Absent from ledgers written before shares existed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    shares: BTreeMap<String, Vec<u64>>,
}

/// What a request counts against besides the budget: a table's share of it. Requests made
/// inside [`with_share`] are tagged with `tag` in the shared ledger, so a share holds across
/// invocations; with a `cap`, they wait (never past the deadline) while the grants of the
/// capped tags in the window have reached it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// The tag of the grants (the table's name).
    pub tag: &'static str,
    /// At most `max` grants of these tags per window, when set.
    pub cap: Option<ShareCap>,
}

/// A limit on the grants of some tags per window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareCap {
    /// The tags counted together.
    pub tags: Vec<&'static str>,
    /// Grants per window.
    pub max: u32,
}

tokio::task_local! {
    static SHARE: Share;
}

/// Runs `f` with its Mixpanel requests counted against `share`.
pub async fn with_share<F: std::future::Future>(share: Share, f: F) -> F::Output {
    SHARE.scope(share, f).await
}

#[derive(Debug, Serialize, Deserialize)]
struct Inflight {
    id: String,
    until: u64,
}

/// How many requests of the `tags` shares the ledger of `family` holds within the last
/// `window` (as [`RequestBudget::acquire`] counts them): a cheap read of one document.
pub async fn share_used(
    store: &dyn Ledger,
    clock: &dyn Clock,
    family: Family,
    tags: &[&str],
    window: Duration,
) -> Result<usize> {
    let Some((body, _)) = store.document(family.document()).await? else {
        return Ok(0);
    };
    let ledger = serde_json::from_str::<Window>(&body).unwrap_or_default();
    let limits = Limits {
        per_window: 0,
        window,
        per_second: None,
        concurrent: 0,
        max_hold: Duration::ZERO,
    };
    let window_start = clock
        .now_ms()
        .saturating_sub(window.as_millis() as u64 + limits.margin_ms());
    Ok(tags
        .iter()
        .filter_map(|t| ledger.shares.get(*t))
        .flatten()
        .filter(|g| **g > window_start)
        .count())
}

/// The shared budget.
pub struct RequestBudget {
    store: Arc<dyn Ledger>,
    clock: Arc<dyn Clock>,
    export: Limits,
    query: Limits,
}

/// A granted request; its in-flight slot is given back when released or dropped.
pub struct Permit {
    store: Arc<dyn Ledger>,
    family: Family,
    id: String,
    released: bool,
}

impl RequestBudget {
    /// A budget kept in `store`, its grants stamped by `clock`.
    pub fn new(
        store: Arc<dyn Ledger>,
        clock: Arc<dyn Clock>,
        export: Limits,
        query: Limits,
    ) -> Self {
        RequestBudget {
            store,
            clock,
            export,
            query,
        }
    }

    fn limits(&self, family: Family) -> Limits {
        match family {
            Family::Export => self.export,
            Family::Query => self.query,
        }
    }

    /// Waits for room in the budget, at most until `deadline`.
    pub async fn acquire(&self, family: Family, deadline: Instant) -> Result<Permit> {
        let limits = self.limits(family);
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = family.document();
        let share = SHARE.try_with(Share::clone).ok();
        loop {
            let current = self.store.document(name).await?;
            // Stamped after the read: the grant's time is as close to the request as it can be.
            let now = self.clock.now_ms();
            let (mut ledger, version) = match &current {
                Some((body, v)) => (
                    serde_json::from_str::<Window>(body).unwrap_or_default(),
                    Some(*v),
                ),
                None => (Window::default(), None),
            };
            let window_start =
                now.saturating_sub(limits.window.as_millis() as u64 + limits.margin_ms());
            ledger.grants.retain(|g| *g > window_start);
            ledger.inflight.retain(|f| f.until > now);
            for grants in ledger.shares.values_mut() {
                grants.retain(|g| *g > window_start);
            }
            ledger.shares.retain(|_, grants| !grants.is_empty());
            let capped: Vec<u64> = match share.as_ref().and_then(|s| s.cap.as_ref()) {
                Some(cap) => cap
                    .tags
                    .iter()
                    .filter_map(|t| ledger.shares.get(*t))
                    .flatten()
                    .copied()
                    .collect(),
                None => Vec::new(),
            };
            let share_full = share
                .as_ref()
                .and_then(|s| s.cap.as_ref())
                .is_some_and(|cap| capped.len() >= cap.max as usize);
            let last_second: Vec<u64> = ledger
                .grants
                .iter()
                .copied()
                .filter(|g| *g + 1000 + 100 > now)
                .collect();
            let window_full = ledger.grants.len() >= limits.per_window as usize;
            let second_full = limits
                .per_second
                .is_some_and(|p| last_second.len() >= p as usize);
            let busy = ledger.inflight.len() >= limits.concurrent as usize;
            let blocked = ledger.blocked_until.filter(|b| *b > now);
            if let Some(until) = blocked {
                let wait = Duration::from_millis(until - now);
                if Instant::now() + wait >= deadline {
                    return Err(Error::new(
                        ErrorKind::RateLimited,
                        format!(
                            "Mixpanel answered 429 for the {} API: its hourly quota is spent; the shared budget grants no request before {} (after this invocation's deadline), so the work stays pending",
                            family_name(family),
                            jiff::Timestamp::from_millisecond(until as i64)
                                .map(|t| t.to_string())
                                .unwrap_or_default()
                        ),
                    ));
                }
                tracing::info!(
                    wait_ms = wait.as_millis() as u64,
                    "waiting for the slot Mixpanel's rate limit leaves"
                );
                tokio::time::sleep(wait).await;
                continue;
            }
            if !window_full && !second_full && !busy && !share_full {
                ledger.grants.push(now);
                if let Some(share) = &share {
                    ledger
                        .shares
                        .entry(share.tag.to_string())
                        .or_default()
                        .push(now);
                }
                ledger.inflight.push(Inflight {
                    id: id.clone(),
                    until: now + limits.max_hold.as_millis() as u64,
                });
                let body = serde_json::to_string(&ledger).map_err(Error::state)?;
                if self.store.put_document(name, &body, version).await? {
                    self.restamp_if_late(name, limits, now, share.as_ref().map(|s| s.tag))
                        .await?;
                    return Ok(Permit {
                        store: self.store.clone(),
                        family,
                        id,
                        released: false,
                    });
                }
                // Another invocation wrote first: read again.
                continue;
            }
            let mut wait_ms = 0u64;
            if window_full && let Some(oldest) = ledger.grants.iter().min() {
                wait_ms = wait_ms.max((oldest + 1).saturating_sub(window_start));
            }
            if second_full && let Some(oldest) = last_second.iter().min() {
                wait_ms = wait_ms.max((oldest + 1100).saturating_sub(now));
            }
            if busy {
                wait_ms = wait_ms.max(100);
            }
            if share_full && let Some(oldest) = capped.iter().min() {
                wait_ms = wait_ms.max((oldest + 1).saturating_sub(window_start));
            }
            let wait = Duration::from_millis(wait_ms.clamp(10, 60_000));
            if share_full
                && Instant::now() + Duration::from_millis(wait_ms) >= deadline
                && let (Some(share), Some(cap)) =
                    (&share, share.as_ref().and_then(|s| s.cap.as_ref()))
            {
                return Err(Error::new(
                    ErrorKind::Deadline,
                    format!(
                        "{} has used its share of the Mixpanel query budget ({} of {} requests per {} s) while other query tables have work pending",
                        share.tag,
                        cap.max,
                        limits.per_window,
                        limits.window.as_secs()
                    ),
                ));
            }
            if Instant::now() + wait >= deadline {
                return Err(Error::new(
                    ErrorKind::Deadline,
                    format!(
                        "the shared Mixpanel {} request budget ({} per {} s) has no room before the deadline; the work stays pending",
                        family_name(family),
                        limits.per_window,
                        limits.window.as_secs()
                    ),
                ));
            }
            tracing::debug!(
                wait_ms = wait.as_millis() as u64,
                "waiting for the shared request budget"
            );
            tokio::time::sleep(wait).await;
        }
    }
}

impl RequestBudget {
    /// Others count a grant from its stamp, so a request sent well after it could reach
    /// Mixpanel inside a window the ledger sees as free. When the ledger write took more than
    /// half the margin (a slow store), the grant is stamped again with the time it is really
    /// used, until a write is quick enough. Nobody can have counted on the old stamp yet: a
    /// grant is only made a whole window after the one it follows.
    async fn restamp_if_late(
        &self,
        name: &str,
        limits: Limits,
        mut stamp: u64,
        tag: Option<&str>,
    ) -> Result<()> {
        for _ in 0..16 {
            if self.clock.now_ms().saturating_sub(stamp) <= limits.margin_ms() / 2 {
                return Ok(());
            }
            let Some((body, version)) = self.store.document(name).await? else {
                return Ok(());
            };
            let mut ledger = serde_json::from_str::<Window>(&body).unwrap_or_default();
            let now = self.clock.now_ms();
            let mut moved = false;
            if let Some(g) = ledger.grants.iter_mut().find(|g| **g == stamp) {
                *g = now;
                moved = true;
            }
            if let Some(g) = tag
                .and_then(|t| ledger.shares.get_mut(t))
                .and_then(|grants| grants.iter_mut().find(|g| **g == stamp))
            {
                *g = now;
            }
            if !moved {
                return Ok(());
            }
            let body = serde_json::to_string(&ledger).map_err(Error::state)?;
            if self.store.put_document(name, &body, Some(version)).await? {
                tracing::debug!(
                    late_ms = now - stamp,
                    "a slow ledger write: the grant is stamped again"
                );
                stamp = now;
            }
        }
        Ok(())
    }

    /// Mixpanel answered 429 although the budget had room (another client of the project, or
    /// limits set above the plan's): no request of `family` is granted, by any invocation,
    /// before `Retry-After` when Mixpanel sent one, else before the budget's next slot: one
    /// slot's share of the window (a minute at 60 an hour), doubling while Mixpanel keeps
    /// answering 429 right after each wait, up to the whole window. Retrying within seconds
    /// does not help against an hourly quota.
    pub async fn rate_limited(&self, family: Family, retry_after: Option<Duration>) -> Result<u64> {
        let limits = self.limits(family);
        let name = family.document();
        let window_ms = limits.window.as_millis() as u64;
        let policy = Policy::LEDGER_WRITE;
        let recorded = policy
            .run_cas(|_| async move {
                let now = self.clock.now_ms();
                let current = self.store.document(name).await.map_err(Some)?;
                let (mut ledger, version) = match &current {
                    Some((body, v)) => (
                        serde_json::from_str::<Window>(body).unwrap_or_default(),
                        Some(*v),
                    ),
                    None => (Window::default(), None),
                };
                let until = match retry_after {
                    Some(d) => now + d.as_millis() as u64,
                    None => {
                        let slot = (window_ms / u64::from(limits.per_window.max(1))).max(1);
                        // A 429 soon after the last wait ended: the quota is spent for longer.
                        let penalty = match (ledger.blocked_until, ledger.penalty_ms) {
                            (Some(b), Some(p)) if now < b.saturating_add(p) => p.saturating_mul(2),
                            _ => slot,
                        }
                        .min(window_ms);
                        ledger.penalty_ms = Some(penalty);
                        now + penalty
                    }
                };
                if ledger.blocked_until.is_some_and(|b| b >= until) {
                    return Ok(ledger.blocked_until.unwrap_or(until));
                }
                ledger.blocked_until = Some(until);
                let body = serde_json::to_string(&ledger).map_err(|e| Some(Error::state(e)))?;
                if self
                    .store
                    .put_document(name, &body, version)
                    .await
                    .map_err(Some)?
                {
                    return Ok(until);
                }
                // Another invocation wrote first.
                Err(None)
            })
            .await;
        recorded.map_err(|failed| {
            failed.unwrap_or_else(|| {
                Error::state(format!(
                    "the request ledger {name} changed {} times while a rate limit was recorded",
                    policy.attempts
                ))
            })
        })
    }
}

fn family_name(family: Family) -> &'static str {
    match family {
        Family::Export => "export",
        Family::Query => "query",
    }
}

impl Permit {
    /// Gives the in-flight slot back.
    pub async fn release(mut self) {
        self.released = true;
        release(self.store.clone(), self.family, self.id.clone()).await;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(release(
                self.store.clone(),
                self.family,
                std::mem::take(&mut self.id),
            ));
        }
    }
}

async fn release(store: Arc<dyn Ledger>, family: Family, id: String) {
    let name = family.document();
    let (store, id) = (&store, &id);
    // Best effort: a slot not given back runs out at its `until`. `Err(())` is a lost race.
    let _ = Policy::LEDGER_WRITE
        .run(
            None,
            |_| async move {
                let Ok(Some((body, version))) = store.document(name).await else {
                    return Ok(());
                };
                let Ok(mut ledger) = serde_json::from_str::<Window>(&body) else {
                    return Ok(());
                };
                let before = ledger.inflight.len();
                ledger.inflight.retain(|f| f.id != *id);
                if ledger.inflight.len() == before {
                    return Ok(());
                }
                let Ok(body) = serde_json::to_string(&ledger) else {
                    return Ok(());
                };
                match store.put_document(name, &body, Some(version)).await {
                    Ok(true) | Err(_) => Ok(()),
                    Ok(false) => Err(()),
                }
            },
            |_: &(), _| Decision::Retry,
            |_, _, _| {},
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TokioClock;
    use crate::state::local::LocalStore;

    fn ledger() -> (tempfile::TempDir, Arc<dyn Ledger>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Ledger> =
            Arc::new(LocalStore::open(dir.path().join("state.json")).unwrap());
        (dir, store)
    }

    /// Limits of `per_window` requests an hour.
    fn hourly(per_window: u32, per_second: Option<u32>, concurrent: u32) -> Limits {
        Limits {
            per_window,
            window: Duration::from_secs(3600),
            per_second,
            concurrent,
            max_hold: Duration::from_secs(60),
        }
    }

    /// A clock that moves with tokio's paused clock: the waits below take no real time.
    fn clock() -> Arc<dyn Clock> {
        Arc::new(TokioClock::new())
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_takers_never_exceed_the_window_and_wait_for_room() {
        let (_dir, store) = ledger();
        let limits = hourly(5, None, 100);
        let budget = Arc::new(RequestBudget::new(store, clock(), limits, limits));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let b = budget.clone();
            tasks.push(tokio::spawn(async move {
                let mut times = Vec::new();
                for _ in 0..3 {
                    let p = b
                        .acquire(
                            Family::Export,
                            Instant::now() + Duration::from_secs(4 * 3600),
                        )
                        .await
                        .unwrap();
                    times.push(started.elapsed());
                    p.release().await;
                }
                times
            }));
        }
        let mut times: Vec<Duration> = Vec::new();
        for t in tasks {
            times.extend(t.await.unwrap());
        }
        times.sort();
        assert_eq!(times.len(), 12);
        // Any hour holds at most 5 grants.
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .take_while(|u| **u < *t + Duration::from_secs(3600))
                .count();
            assert!(
                in_window <= 5,
                "{in_window} grants within an hour from {t:?}: {times:?}"
            );
        }
        // Five at once, five when the first hour (and its margin of 72 s) has passed, and the
        // last two an hour later again: never sooner, and not a second later.
        let margin = Duration::from_secs(72);
        let hour = Duration::from_secs(3600) + margin;
        assert!(times[..5].iter().all(|t| *t == Duration::ZERO), "{times:?}");
        assert!(
            times[5..10]
                .iter()
                .all(|t| *t >= hour && *t <= hour + Duration::from_secs(1)),
            "{times:?}"
        );
        assert!(
            times[10..]
                .iter()
                .all(|t| *t >= hour * 2 && *t <= hour * 2 + Duration::from_secs(1)),
            "{times:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn three_a_second_go_at_once_and_the_fourth_waits_for_the_second_to_pass() {
        let (_dir, store) = ledger();
        let limits = hourly(60, Some(3), 100);
        let budget = RequestBudget::new(store, clock(), limits, limits);
        let started = Instant::now();
        let mut times = Vec::new();
        for _ in 0..7 {
            budget
                .acquire(Family::Export, Instant::now() + Duration::from_secs(60))
                .await
                .unwrap()
                .release()
                .await;
            times.push(started.elapsed());
        }
        // Three at once; then three more once the first three are more than a second (and
        // the 100 ms Mixpanel's arrival times may add) old; then the seventh.
        assert!(times[..3].iter().all(|t| *t == Duration::ZERO), "{times:?}");
        let second = Duration::from_millis(1100);
        assert!(
            times[3..6].iter().all(|t| *t >= second && *t < second * 2),
            "{times:?}"
        );
        assert!(times[6] >= second * 2, "{times:?}");
    }

    #[tokio::test]
    async fn a_capped_share_is_counted_across_budgets_and_leaves_the_rest_to_others() {
        let (_dir, store) = ledger();
        let limits = hourly(4, None, 5);
        let share = Share {
            tag: "engage",
            cap: Some(ShareCap {
                tags: vec!["engage"],
                max: 2,
            }),
        };
        let soon = || Instant::now() + Duration::from_secs(5);
        // Two budgets on one store stand for two invocations: the share holds across them.
        for _ in 0..2 {
            let budget = RequestBudget::new(store.clone(), clock(), limits, limits);
            let p = with_share(share.clone(), budget.acquire(Family::Query, soon()))
                .await
                .unwrap();
            p.release().await;
        }
        let budget = RequestBudget::new(store.clone(), clock(), limits, limits);
        let e = with_share(share.clone(), budget.acquire(Family::Query, soon()))
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::Deadline);
        assert!(e.message().contains("engage has used its share"), "{e}");
        // The other half is there for everyone else.
        for _ in 0..2 {
            budget
                .acquire(Family::Query, soon())
                .await
                .unwrap()
                .release()
                .await;
        }
        let ledger: Window =
            serde_json::from_str(&store.document("requests#query").await.unwrap().unwrap().0)
                .unwrap();
        assert_eq!((ledger.grants.len(), ledger.shares["engage"].len()), (4, 2));
        // A ledger written before shares existed is read as it was.
        let old: Window = serde_json::from_str(r#"{"grants":[1],"inflight":[]}"#).unwrap();
        assert!(old.shares.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn no_room_before_the_deadline_is_a_clean_deadline_error() {
        let (_dir, store) = ledger();
        let limits = hourly(1, None, 5);
        let budget = RequestBudget::new(store, clock(), limits, limits);
        let p = budget
            .acquire(Family::Query, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        p.release().await;
        let started = Instant::now();
        let e = budget
            .acquire(Family::Query, Instant::now() + Duration::from_secs(2))
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::Deadline);
        // Not a millisecond spent sleeping towards a deadline it cannot meet.
        assert_eq!(started.elapsed(), Duration::ZERO);
        // The export family has its own budget.
        budget
            .acquire(Family::Export, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap()
            .release()
            .await;
    }
}
