//! One Mixpanel request budget for every invocation: a sliding-window ledger per API family kept
//! in the state store (one versioned document, updated by conditional writes), so that
//! concurrent invocations (fan-out) never cause a 429 storm.
//!
//! A request is granted when, over the window, fewer than `per_window` requests were granted,
//! fewer than `per_second` in the last second, and fewer than `concurrent` are in flight. When
//! the budget has no room, the caller waits for the earliest free slot, but never past its
//! deadline: it then stops cleanly with a `Deadline` error (the slice stays pending).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::state::StateStore;

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

#[derive(Debug, Default, Serialize, Deserialize)]
struct Ledger {
    /// When requests were granted, epoch ms.
    grants: Vec<u64>,
    /// Requests in flight.
    inflight: Vec<Inflight>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Inflight {
    id: String,
    until: u64,
}

/// The shared budget.
pub struct RequestBudget {
    store: Arc<dyn StateStore>,
    export: Limits,
    query: Limits,
}

/// A granted request; its in-flight slot is given back when released or dropped.
pub struct Permit {
    store: Arc<dyn StateStore>,
    family: Family,
    id: String,
    released: bool,
}

fn now_ms() -> u64 {
    jiff::Timestamp::now().as_millisecond() as u64
}

impl RequestBudget {
    /// A budget kept in `store`.
    pub fn new(store: Arc<dyn StateStore>, export: Limits, query: Limits) -> Self {
        RequestBudget {
            store,
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
        loop {
            let now = now_ms();
            let current = self.store.document(name).await?;
            let (mut ledger, version) = match &current {
                Some((body, v)) => (
                    serde_json::from_str::<Ledger>(body).unwrap_or_default(),
                    Some(*v),
                ),
                None => (Ledger::default(), None),
            };
            let window_start =
                now.saturating_sub(limits.window.as_millis() as u64 + limits.margin_ms());
            ledger.grants.retain(|g| *g > window_start);
            ledger.inflight.retain(|f| f.until > now);
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
            if !window_full && !second_full && !busy {
                ledger.grants.push(now);
                ledger.inflight.push(Inflight {
                    id: id.clone(),
                    until: now + limits.max_hold.as_millis() as u64,
                });
                let body = serde_json::to_string(&ledger).map_err(Error::state)?;
                if self.store.put_document(name, &body, version).await? {
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
            let wait = Duration::from_millis(wait_ms.clamp(10, 60_000));
            if Instant::now() + wait >= deadline {
                return Err(Error::new(
                    ErrorKind::Deadline,
                    format!(
                        "the shared Mixpanel {} request budget ({} per {} s) has no room before the deadline; the work stays pending",
                        match family {
                            Family::Export => "export",
                            Family::Query => "query",
                        },
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

async fn release(store: Arc<dyn StateStore>, family: Family, id: String) {
    let name = family.document();
    for _ in 0..16 {
        let Ok(Some((body, version))) = store.document(name).await else {
            return;
        };
        let Ok(mut ledger) = serde_json::from_str::<Ledger>(&body) else {
            return;
        };
        let before = ledger.inflight.len();
        ledger.inflight.retain(|f| f.id != id);
        if ledger.inflight.len() == before {
            return;
        }
        let Ok(body) = serde_json::to_string(&ledger) else {
            return;
        };
        match store.put_document(name, &body, Some(version)).await {
            Ok(true) | Err(_) => return,
            Ok(false) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::local::LocalStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_takers_never_exceed_the_window_and_wait_for_room() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> =
            Arc::new(LocalStore::open(dir.path().join("state.json")).unwrap());
        let limits = Limits {
            per_window: 5,
            window: Duration::from_millis(1500),
            per_second: None,
            concurrent: 100,
            max_hold: Duration::from_secs(60),
        };
        let budget = Arc::new(RequestBudget::new(store, limits, limits));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let b = budget.clone();
            tasks.push(tokio::spawn(async move {
                let mut times = Vec::new();
                for _ in 0..3 {
                    let p = b
                        .acquire(Family::Export, Instant::now() + Duration::from_secs(20))
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
        // Any window of 1.5 s holds at most 5 grants.
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .take_while(|u| **u < *t + Duration::from_millis(1500))
                .count();
            assert!(
                in_window <= 5,
                "{in_window} grants within 1.5 s from {t:?}: {times:?}"
            );
        }
        // 12 grants at 5 per window need at least two full windows of waiting.
        assert!(times[11] >= Duration::from_millis(3000), "{times:?}");
    }

    #[tokio::test]
    async fn no_room_before_the_deadline_is_a_clean_deadline_error() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> =
            Arc::new(LocalStore::open(dir.path().join("state.json")).unwrap());
        let limits = Limits {
            per_window: 1,
            window: Duration::from_secs(3600),
            per_second: None,
            concurrent: 5,
            max_hold: Duration::from_secs(60),
        };
        let budget = RequestBudget::new(store, limits, limits);
        let p = budget
            .acquire(Family::Query, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        p.release().await;
        let started = std::time::Instant::now();
        let e = budget
            .acquire(Family::Query, Instant::now() + Duration::from_secs(2))
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::Deadline);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "it did not sleep towards a deadline it cannot meet"
        );
        // The export family has its own budget.
        budget
            .acquire(Family::Export, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap()
            .release()
            .await;
    }
}
