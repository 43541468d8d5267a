//! The state store contract: the same cases run against DynamoDB (on moto) and the local file.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use jiff::civil::{Date, date};
use mixpanel_replicator::error::ErrorKind;
use mixpanel_replicator::state::dynamo::DynamoStore;
use mixpanel_replicator::state::local::LocalStore;
use mixpanel_replicator::state::{
    Failure, Lease, Schema, SliceError, SliceId, SliceStatus, StateStore,
};
use mixpanel_replicator::tables::Table;
use support::aws::create_state_table;
use support::moto::Moto;

/// A store under test and what keeps it alive.
struct Backend {
    store: Arc<dyn StateStore>,
    _moto: Option<Moto>,
    _dir: Option<tempfile::TempDir>,
}

async fn dynamodb() -> Backend {
    let moto = Moto::start();
    let client = aws_sdk_dynamodb::Client::new(&moto.sdk_config().await);
    create_state_table(&client, "replicator-state").await;
    Backend {
        store: Arc::new(DynamoStore::new(client, "replicator-state")),
        _moto: Some(moto),
        _dir: None,
    }
}

async fn local() -> Backend {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = LocalStore::open(dir.path().join("state/.state.json")).expect("open");
    Backend {
        store: Arc::new(store),
        _moto: None,
        _dir: Some(dir),
    }
}

/// Runs every listed case against both stores, each case on a fresh store.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod dynamodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let backend = super::dynamodb().await;
                    super::$case(backend.store.clone()).await;
                }
            )*
        }
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let backend = super::local().await;
                    super::$case(backend.store.clone()).await;
                }
            )*
        }
    };
}

conformance!(
    enqueue_queues_a_new_slice_once,
    enqueue_many_queues_each_slice_as_enqueue_would,
    claim_run_claims_in_order_up_to_the_first_taken,
    enqueue_requeues_only_committed_slices_older_than_the_threshold,
    slices_are_listed_in_slice_order_per_table,
    only_one_of_many_concurrent_claimers_wins,
    an_expired_lease_goes_to_another_owner_and_fences_the_first,
    confirm_and_complete_fail_once_the_lease_expired,
    release_returns_the_slice_and_keeps_its_progress,
    complete_commits_and_ends_the_work,
    complete_records_a_result_that_outlives_a_requeue,
    bookmark_never_moves_backwards,
    init_schema_keeps_the_first_schema,
    merge_schema_adds_missing_columns,
    concurrent_schema_merges_lose_no_column,
    a_failed_attempt_is_recorded_with_its_backoff_and_error,
    a_parked_slice_is_never_claimed_or_requeued_until_a_person_retries_it,
    fail_needs_the_lease,
    a_document_is_written_only_at_the_version_its_writer_read,
    concurrent_compare_and_swap_updates_of_a_document_lose_none,
);

const DAY: Date = date(2026, 11, 1);
const T: Table = Table::Export;

fn day(d: i8) -> SliceId {
    SliceId::Day(date(2026, 11, d))
}

fn schema(columns: &[(&str, &str)]) -> Schema {
    Schema {
        columns: columns
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        renamed: Default::default(),
    }
}

async fn record(store: &dyn StateStore, slice: SliceId) -> mixpanel_replicator::state::SliceRecord {
    store
        .slices(T)
        .await
        .expect("slices")
        .into_iter()
        .find(|r| r.slice == slice)
        .unwrap_or_else(|| panic!("slice {slice} is not queued"))
}

/// Claims `slice` of `table` for `owner` from `now_ms` until `until_ms`; the claim must succeed.
async fn claimed(
    store: &dyn StateStore,
    table: Table,
    slice: SliceId,
    owner: &str,
    now_ms: u64,
    until_ms: u64,
) -> Lease {
    store
        .claim(table, slice, owner, now_ms, until_ms)
        .await
        .unwrap()
        .unwrap()
}

fn failure(failures: u32, park: bool, retry_at_ms: Option<u64>) -> Failure {
    Failure {
        failures,
        park,
        retry_at_ms,
        error: SliceError {
            kind: "BadResponse".into(),
            message: format!("garbage, attempt {failures}"),
            at_ms: 1000 + u64::from(failures),
        },
    }
}

async fn a_failed_attempt_is_recorded_with_its_backoff_and_error(store: Arc<dyn StateStore>) {
    let slice = day(1);
    store.enqueue(T, slice, None).await.unwrap();
    let lease = claimed(&*store, T, slice, "a", 0, 10_000).await;
    assert!(
        store
            .fail(&lease, &failure(1, false, Some(5000)))
            .await
            .unwrap()
    );
    let r = record(&*store, slice).await;
    assert_eq!(r.status, SliceStatus::Pending);
    assert_eq!((r.failures, r.retry_at_ms), (1, Some(5000)));
    assert_eq!(r.error, Some(failure(1, false, None).error));
    assert_eq!(r.lease_expires_ms, None);

    // The next attempt succeeds: failures, backoff and error are gone.
    let lease = claimed(&*store, T, slice, "b", 6000, 10_000).await;
    assert!(store.complete(&lease, 7000, None).await.unwrap());
    let r = record(&*store, slice).await;
    assert_eq!(r.status, SliceStatus::Committed);
    assert_eq!((r.failures, r.retry_at_ms, r.error), (0, None, None));
}

async fn a_parked_slice_is_never_claimed_or_requeued_until_a_person_retries_it(
    store: Arc<dyn StateStore>,
) {
    let slice = day(2);
    store.enqueue(T, slice, None).await.unwrap();
    let lease = claimed(&*store, T, slice, "a", 0, 10_000).await;
    assert!(
        store
            .fail(&lease, &failure(5, true, Some(9999)))
            .await
            .unwrap()
    );
    let r = record(&*store, slice).await;
    assert_eq!(r.status, SliceStatus::Failed);
    assert_eq!(
        (r.failures, r.retry_at_ms),
        (5, None),
        "a parked slice has no backoff"
    );
    assert_eq!(r.error.as_ref().unwrap().message, "garbage, attempt 5");

    assert!(
        store
            .claim(T, slice, "b", 20_000, 30_000)
            .await
            .unwrap()
            .is_none()
    );
    assert!(!store.enqueue(T, slice, Some(u64::MAX)).await.unwrap());
    assert_eq!(record(&*store, slice).await.status, SliceStatus::Failed);

    // A person's retry: pending, counting from zero, the error kept for whoever looks.
    assert!(store.reset_failures(T, slice).await.unwrap());
    let r = record(&*store, slice).await;
    assert_eq!(
        (r.status, r.failures, r.retry_at_ms),
        (SliceStatus::Pending, 0, None)
    );
    assert_eq!(r.error.as_ref().unwrap().message, "garbage, attempt 5");
    assert!(
        !store.reset_failures(T, slice).await.unwrap(),
        "nothing left to retry"
    );
    assert!(
        store
            .claim(T, slice, "c", 20_000, 30_000)
            .await
            .unwrap()
            .is_some()
    );

    // A committed slice or an unknown one is no person's retry.
    assert!(!store.reset_failures(T, day(9)).await.unwrap());
}

async fn fail_needs_the_lease(store: Arc<dyn StateStore>) {
    let slice = day(3);
    store.enqueue(T, slice, None).await.unwrap();
    let first = claimed(&*store, T, slice, "a", 0, 1000).await;
    let second = claimed(&*store, T, slice, "b", 2000, 3000).await;
    assert!(!store.fail(&first, &failure(1, true, None)).await.unwrap());
    let r = record(&*store, slice).await;
    assert_eq!((r.status, r.failures), (SliceStatus::Leased, 0));
    assert_eq!(r.lease_owner.as_deref(), Some("b"));
    assert!(
        store
            .fail(&second, &failure(1, false, Some(4000)))
            .await
            .unwrap()
    );
    assert_eq!(record(&*store, slice).await.status, SliceStatus::Pending);
}

async fn enqueue_queues_a_new_slice_once(store: Arc<dyn StateStore>) {
    let slice = SliceId::Day(DAY);
    assert!(store.enqueue(T, slice, None).await.unwrap());
    assert!(!store.enqueue(T, slice, None).await.unwrap());
    assert!(!store.enqueue(T, slice, Some(u64::MAX)).await.unwrap());

    let slices = store.slices(T).await.unwrap();
    assert_eq!(slices.len(), 1);
    let r = &slices[0];
    assert_eq!(
        (r.table, r.slice, r.status),
        (T, slice, SliceStatus::Pending)
    );
    assert_eq!(r.attempts, 0);
    assert_eq!((r.lease_owner.as_deref(), r.lease_expires_ms), (None, None));
    assert_eq!((r.committed_at_ms, r.progress.as_deref()), (None, None));
}

async fn enqueue_many_queues_each_slice_as_enqueue_would(store: Arc<dyn StateStore>) {
    let (done, fresh, busy, new) = (day(1), day(2), day(3), day(4));
    for slice in [done, fresh, busy] {
        store.enqueue(T, slice, None).await.unwrap();
    }
    let lease = claimed(&*store, T, done, "a", 100, 200).await;
    assert!(store.complete(&lease, 150, None).await.unwrap());
    let lease = claimed(&*store, T, fresh, "a", 100, 200).await;
    assert!(store.complete(&lease, 160, None).await.unwrap());
    claimed(&*store, T, busy, "b", 100, 10_000).await;

    // Committed before 155: queued again; after it, or leased: untouched; unknown: queued.
    let queued = store
        .enqueue_many(T, &[done, fresh, busy, new], Some(155))
        .await
        .unwrap();
    assert_eq!(queued, vec![true, false, false, true]);
    let status = |slices: &[mixpanel_replicator::state::SliceRecord], s: SliceId| {
        slices.iter().find(|r| r.slice == s).map(|r| r.status)
    };
    let slices = store.slices(T).await.unwrap();
    assert_eq!(
        [done, fresh, busy, new].map(|s| status(&slices, s)),
        [
            Some(SliceStatus::Pending),
            Some(SliceStatus::Committed),
            Some(SliceStatus::Leased),
            Some(SliceStatus::Pending)
        ]
    );
    let r = record(&*store, done).await;
    assert_eq!((r.attempts, r.committed_at_ms), (0, Some(150)));
    // Nothing new: every answer is false.
    assert_eq!(
        store.enqueue_many(T, &[new, busy], None).await.unwrap(),
        vec![false, false]
    );
    assert!(store.enqueue_many(T, &[], None).await.unwrap().is_empty());
}

async fn claim_run_claims_in_order_up_to_the_first_taken(store: Arc<dyn StateStore>) {
    let days: Vec<SliceId> = (1..=5).map(day).collect();
    for slice in &days {
        store.enqueue(T, *slice, None).await.unwrap();
    }
    // Day 4 is someone else's: the run stops before it, day 5 stays pending.
    claimed(&*store, T, days[3], "b", 100, 10_000).await;
    let leases = store.claim_run(T, &days, "a", 1000, 61_000).await.unwrap();
    assert_eq!(
        leases
            .iter()
            .map(|l| (l.slice, l.owner.as_str(), l.expires_ms))
            .collect::<Vec<_>>(),
        days[..3]
            .iter()
            .map(|s| (*s, "a", 61_000))
            .collect::<Vec<_>>()
    );
    for (slice, owner, status) in [
        (days[0], Some("a"), SliceStatus::Leased),
        (days[2], Some("a"), SliceStatus::Leased),
        (days[3], Some("b"), SliceStatus::Leased),
        (days[4], None, SliceStatus::Pending),
    ] {
        let r = record(&*store, slice).await;
        assert_eq!(
            (r.status, r.lease_owner.as_deref()),
            (status, owner),
            "{slice}"
        );
    }
    assert_eq!(record(&*store, days[0]).await.attempts, 1);
    // A run whose first slice is taken claims nothing.
    assert!(
        store
            .claim_run(T, &days[3..], "c", 1000, 61_000)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(record(&*store, days[4]).await.status, SliceStatus::Pending);
}

async fn enqueue_requeues_only_committed_slices_older_than_the_threshold(
    store: Arc<dyn StateStore>,
) {
    let (done, busy) = (day(1), day(2));
    for slice in [done, busy] {
        store.enqueue(T, slice, None).await.unwrap();
    }
    let lease = claimed(&*store, T, done, "a", 100, 200).await;
    assert!(store.complete(&lease, 150, None).await.unwrap());
    claimed(&*store, T, busy, "b", 100, 10_000).await;

    // Committed at 150: not before 150, and never without a threshold.
    assert!(!store.enqueue(T, done, Some(150)).await.unwrap());
    assert!(!store.enqueue(T, done, None).await.unwrap());
    assert_eq!(record(&*store, done).await.status, SliceStatus::Committed);
    // A leased slice is never touched.
    assert!(!store.enqueue(T, busy, Some(u64::MAX)).await.unwrap());
    let r = record(&*store, busy).await;
    assert_eq!(
        (r.status, r.lease_owner.as_deref()),
        (SliceStatus::Leased, Some("b"))
    );

    assert!(store.enqueue(T, done, Some(151)).await.unwrap());
    let r = record(&*store, done).await;
    assert_eq!(r.status, SliceStatus::Pending);
    assert_eq!(r.committed_at_ms, Some(150), "the last commit stays known");
    assert_eq!(r.attempts, 0, "a re-queued slice starts a new round");
    // Pending again: a second re-queue is no news.
    assert!(!store.enqueue(T, done, Some(151)).await.unwrap());
    assert!(store.claim(T, done, "c", 300, 400).await.unwrap().is_some());
}

async fn slices_are_listed_in_slice_order_per_table(store: Arc<dyn StateStore>) {
    let hours = |from_hour, to_hour| SliceId::Hours {
        day: DAY,
        from_hour,
        to_hour,
    };
    let queued = [day(10), hours(12, 24), day(2), hours(0, 12), day(1), day(9)];
    for slice in queued {
        store.enqueue(T, slice, None).await.unwrap();
    }
    store
        .enqueue(Table::Engage, SliceId::Full, None)
        .await
        .unwrap();

    let listed: Vec<SliceId> = store
        .slices(T)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.slice)
        .collect();
    // By day; a day's hour slices beside it, by first hour.
    let expected = [hours(0, 12), day(1), hours(12, 24), day(2), day(9), day(10)];
    assert_eq!(listed, expected);

    let engage = store.slices(Table::Engage).await.unwrap();
    assert_eq!(engage.len(), 1);
    assert_eq!(
        (engage[0].table, engage[0].slice),
        (Table::Engage, SliceId::Full)
    );
    assert!(store.slices(Table::Funnels).await.unwrap().is_empty());
}

async fn only_one_of_many_concurrent_claimers_wins(store: Arc<dyn StateStore>) {
    let slice = SliceId::Day(DAY);
    store.enqueue(T, slice, None).await.unwrap();
    let claimers: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .claim(T, slice, &format!("owner-{i}"), 1000, 61_000)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut leases = Vec::new();
    for claimer in claimers {
        leases.extend(claimer.await.unwrap());
    }
    assert_eq!(leases.len(), 1, "exactly one lease: {leases:?}");
    let lease = &leases[0];
    assert_eq!(
        (lease.table, lease.slice, lease.expires_ms),
        (T, slice, 61_000)
    );

    let r = record(&*store, slice).await;
    assert_eq!(r.status, SliceStatus::Leased);
    assert_eq!(r.lease_owner.as_deref(), Some(lease.owner.as_str()));
    assert_eq!((r.lease_expires_ms, r.attempts), (Some(61_000), 1));
}

async fn an_expired_lease_goes_to_another_owner_and_fences_the_first(store: Arc<dyn StateStore>) {
    let slice = SliceId::Day(DAY);
    store.enqueue(T, slice, None).await.unwrap();
    let first = claimed(&*store, T, slice, "first", 1000, 2000).await;

    // Held until 2000 inclusive.
    assert!(
        store
            .claim(T, slice, "second", 1500, 3000)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .claim(T, slice, "second", 2000, 3000)
            .await
            .unwrap()
            .is_none()
    );
    let second = claimed(&*store, T, slice, "second", 2001, 5000).await;
    assert_eq!(second.owner, "second");

    // The first owner is fenced out, whatever time it believes it is.
    assert!(!store.confirm(&first, 1500, 9000).await.unwrap());
    assert!(!store.save_progress(&first, Some("page 9")).await.unwrap());
    assert!(!store.complete(&first, 1500, None).await.unwrap());
    store.release(&first).await.unwrap();
    let r = record(&*store, slice).await;
    assert_eq!(
        (r.status, r.lease_owner.as_deref()),
        (SliceStatus::Leased, Some("second"))
    );
    assert_eq!(
        (r.lease_expires_ms, r.attempts, r.progress),
        (Some(5000), 2, None)
    );

    // The second owner still holds it.
    assert!(store.confirm(&second, 2500, 6000).await.unwrap());
    assert_eq!(record(&*store, slice).await.lease_expires_ms, Some(6000));
    assert!(store.complete(&second, 5500, None).await.unwrap());
    let r = record(&*store, slice).await;
    assert_eq!(
        (r.status, r.committed_at_ms),
        (SliceStatus::Committed, Some(5500))
    );
}

async fn confirm_and_complete_fail_once_the_lease_expired(store: Arc<dyn StateStore>) {
    let slice = SliceId::Day(DAY);
    store.enqueue(T, slice, None).await.unwrap();
    let lease = claimed(&*store, T, slice, "a", 1000, 2000).await;

    assert!(
        store.confirm(&lease, 2000, 3000).await.unwrap(),
        "held at its last millisecond"
    );
    assert!(!store.confirm(&lease, 3001, 9000).await.unwrap());
    assert!(!store.complete(&lease, 3001, None).await.unwrap());
    assert_eq!(record(&*store, slice).await.status, SliceStatus::Leased);
    // Nobody else claimed it, so it is still this attempt's to complete in time.
    assert!(store.complete(&lease, 2999, None).await.unwrap());
}

async fn release_returns_the_slice_and_keeps_its_progress(store: Arc<dyn StateStore>) {
    let slice = SliceId::Full;
    let table = Table::Engage;
    store.enqueue(table, slice, None).await.unwrap();
    let lease = claimed(&*store, table, slice, "a", 0, 1000).await;
    assert!(
        store
            .save_progress(&lease, Some(r#"{"page":3}"#))
            .await
            .unwrap()
    );
    store.release(&lease).await.unwrap();

    let r = &store.slices(table).await.unwrap()[0];
    assert_eq!((r.status, r.lease_expires_ms), (SliceStatus::Pending, None));
    assert_eq!(r.progress.as_deref(), Some(r#"{"page":3}"#));
    // A released lease is no longer held.
    assert!(!store.save_progress(&lease, None).await.unwrap());
    assert!(!store.confirm(&lease, 10, 1000).await.unwrap());

    // The next attempt claims it at once and resumes.
    let next = claimed(&*store, table, slice, "b", 10, 1000).await;
    let r = &store.slices(table).await.unwrap()[0];
    assert_eq!(
        (r.attempts, r.progress.as_deref()),
        (2, Some(r#"{"page":3}"#))
    );
    assert!(store.save_progress(&next, None).await.unwrap());
    assert_eq!(store.slices(table).await.unwrap()[0].progress, None);
}

async fn complete_commits_and_ends_the_work(store: Arc<dyn StateStore>) {
    let slice = SliceId::Full;
    let table = Table::Cohorts;
    store.enqueue(table, slice, None).await.unwrap();
    let lease = claimed(&*store, table, slice, "a", 0, 1000).await;
    store.save_progress(&lease, Some("halfway")).await.unwrap();
    assert!(store.complete(&lease, 500, None).await.unwrap());

    let r = &store.slices(table).await.unwrap()[0];
    assert_eq!(
        (r.status, r.committed_at_ms),
        (SliceStatus::Committed, Some(500))
    );
    assert_eq!((r.progress.as_deref(), r.attempts), (None, 1));
    assert!(
        store
            .claim(table, slice, "b", 2000, 3000)
            .await
            .unwrap()
            .is_none()
    );
    assert!(!store.complete(&lease, 600, None).await.unwrap());
    store.release(&lease).await.unwrap();
    assert_eq!(
        store.slices(table).await.unwrap()[0].status,
        SliceStatus::Committed
    );
}

async fn complete_records_a_result_that_outlives_a_requeue(store: Arc<dyn StateStore>) {
    let slice = day(3);
    store.enqueue(T, slice, None).await.unwrap();
    let lease = claimed(&*store, T, slice, "a", 0, 1000).await;
    let first = r#"{"raw_bytes":10,"ms":5}"#;
    assert!(store.complete(&lease, 100, Some(first)).await.unwrap());
    assert_eq!(
        record(store.as_ref(), slice).await.result.as_deref(),
        Some(first)
    );

    // Queued again: the new round starts with the last round's result still readable.
    assert!(store.enqueue(T, slice, Some(200)).await.unwrap());
    let r = record(store.as_ref(), slice).await;
    assert_eq!(
        (r.status, r.result.as_deref()),
        (SliceStatus::Pending, Some(first))
    );
    let lease = claimed(&*store, T, slice, "b", 300, 1000).await;
    store.release(&lease).await.unwrap();
    assert_eq!(
        record(store.as_ref(), slice).await.result.as_deref(),
        Some(first)
    );

    // The next commit replaces it; a commit without one removes it.
    let lease = claimed(&*store, T, slice, "c", 400, 1000).await;
    let second = r#"{"raw_bytes":20,"ms":9}"#;
    assert!(store.complete(&lease, 500, Some(second)).await.unwrap());
    assert_eq!(
        record(store.as_ref(), slice).await.result.as_deref(),
        Some(second)
    );
    assert!(store.enqueue(T, slice, Some(600)).await.unwrap());
    let lease = claimed(&*store, T, slice, "d", 700, 1000).await;
    assert!(store.complete(&lease, 800, None).await.unwrap());
    assert_eq!(record(store.as_ref(), slice).await.result, None);
}

async fn bookmark_never_moves_backwards(store: Arc<dyn StateStore>) {
    assert_eq!(store.bookmark(T).await.unwrap(), None);
    store.advance_bookmark(T, date(2026, 11, 5)).await.unwrap();
    assert_eq!(store.bookmark(T).await.unwrap(), Some(date(2026, 11, 5)));
    store.advance_bookmark(T, date(2026, 11, 3)).await.unwrap();
    store.advance_bookmark(T, date(2026, 11, 5)).await.unwrap();
    assert_eq!(store.bookmark(T).await.unwrap(), Some(date(2026, 11, 5)));
    store.advance_bookmark(T, date(2027, 1, 2)).await.unwrap();
    assert_eq!(store.bookmark(T).await.unwrap(), Some(date(2027, 1, 2)));
    assert_eq!(store.bookmark(Table::Revenue).await.unwrap(), None);
}

async fn init_schema_keeps_the_first_schema(store: Arc<dyn StateStore>) {
    assert_eq!(store.schema(T).await.unwrap(), None);
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let mine = schema(&[("event", "string"), (&format!("col_{i}"), "integer")]);
                store.init_schema(T, &mine).await.unwrap()
            })
        })
        .collect();
    let mut answers = BTreeSet::new();
    for racer in racers {
        answers.insert(format!("{:?}", racer.await.unwrap()));
    }
    assert_eq!(
        answers.len(),
        1,
        "every racer sees the winner's schema: {answers:?}"
    );
    let stored = store.schema(T).await.unwrap().unwrap();
    assert_eq!(answers.pop_first(), Some(format!("{stored:?}")));

    let later = store
        .init_schema(T, &schema(&[("other", "string")]))
        .await
        .unwrap();
    assert_eq!(later, stored);
    assert_eq!(store.schema(Table::Funnels).await.unwrap(), None);
}

async fn merge_schema_adds_missing_columns(store: Arc<dyn StateStore>) {
    let first = schema(&[("event", "string"), ("time", "string")]);
    assert_eq!(store.merge_schema(T, &first).await.unwrap(), first);
    let merged = store
        .merge_schema(
            T,
            &schema(&[("time", "integer"), ("mp_reserved_city", "string")]),
        )
        .await
        .unwrap();
    let expected = schema(&[
        ("event", "string"),
        ("mp_reserved_city", "string"),
        ("time", "integer|string"),
    ]);
    assert_eq!(
        merged, expected,
        "a column holds every type it was seen with"
    );
    assert_eq!(store.schema(T).await.unwrap(), Some(expected.clone()));
    assert_eq!(
        store
            .merge_schema(T, &schema(&[("event", "string")]))
            .await
            .unwrap(),
        expected
    );

    // Names are the store's: a column whose name folds to a stored one's is left out (its
    // writer must name it again); a renamed column joins with the property it holds, and a
    // property named like the table's own `event` may take `event__2`.
    let mut renamed = schema(&[
        ("MP_RESERVED_CITY", "string"),
        ("country__2", "string"),
        ("event__2", "integer"),
    ]);
    renamed.renamed = [
        ("country__2".to_string(), "country".to_string()),
        ("event__2".to_string(), "event".to_string()),
    ]
    .into();
    let merged = store.merge_schema(T, &renamed).await.unwrap();
    assert!(
        !merged.columns.contains_key("MP_RESERVED_CITY"),
        "{merged:?}"
    );
    assert!(!renamed.agrees_with(&merged));
    assert_eq!(
        (merged.source_of("country__2"), merged.source_of("event__2")),
        ("country".to_string(), "event".to_string())
    );
    assert_eq!(store.schema(T).await.unwrap(), Some(merged));
}

async fn concurrent_schema_merges_lose_no_column(store: Arc<dyn StateStore>) {
    store
        .init_schema(T, &schema(&[("event", "string")]))
        .await
        .unwrap();
    let mergers: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                for j in 0..3 {
                    let column = format!("col_{i}_{j}");
                    store
                        .merge_schema(T, &schema(&[(&column, "number")]))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for merger in mergers {
        merger.await.unwrap();
    }
    let columns = store.schema(T).await.unwrap().unwrap().columns;
    assert_eq!(columns.len(), 1 + 8 * 3, "{columns:?}");
}

/// The request ledger's compare-and-swap: a document is created once, and replaced only by a
/// writer that read its current version; each write moves the version on by one.
async fn a_document_is_written_only_at_the_version_its_writer_read(store: Arc<dyn StateStore>) {
    let name = "ratelimit/test";
    assert_eq!(store.document(name).await.unwrap(), None);
    assert!(store.put_document(name, "{\"n\":1}", None).await.unwrap());
    assert!(
        !store.put_document(name, "{\"n\":9}", None).await.unwrap(),
        "created only once"
    );
    assert_eq!(
        store.document(name).await.unwrap(),
        Some(("{\"n\":1}".to_string(), 1))
    );
    assert!(
        !store
            .put_document(name, "{\"n\":9}", Some(7))
            .await
            .unwrap(),
        "a stale version is refused"
    );
    assert!(
        store
            .put_document(name, "{\"n\":2}", Some(1))
            .await
            .unwrap()
    );
    assert!(
        !store
            .put_document(name, "{\"n\":9}", Some(1))
            .await
            .unwrap(),
        "the version it read is gone"
    );
    assert_eq!(
        store.document(name).await.unwrap(),
        Some(("{\"n\":2}".to_string(), 2))
    );
    // Documents are independent of each other and of the slices.
    assert_eq!(store.document("ratelimit/other").await.unwrap(), None);
    assert!(store.slices(T).await.unwrap().is_empty());
}

/// Eight writers each add 1 five times by read, modify, compare-and-swap: no increment is lost.
async fn concurrent_compare_and_swap_updates_of_a_document_lose_none(store: Arc<dyn StateStore>) {
    let name = "ratelimit/counter";
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    loop {
                        let current = store.document(name).await.unwrap();
                        let (n, version) = match &current {
                            Some((body, v)) => (body.parse::<u64>().unwrap(), Some(*v)),
                            None => (0, None),
                        };
                        if store
                            .put_document(name, &(n + 1).to_string(), version)
                            .await
                            .unwrap()
                        {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(
        store.document(name).await.unwrap(),
        Some(("40".to_string(), 40))
    );
}

// ---- The local file only ----

/// Set in a child process of this test binary: `{state file}|{owner}`.
const WORKER_ENV: &str = "STATE_STORE_TEST_WORKER";
const WORKER_SLICES: i8 = 24;

/// Not a test on its own: the worker of
/// `local_store_stays_consistent_across_processes`, run in a child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the worker of local_store_stays_consistent_across_processes, run only by it"]
async fn local_store_process_worker() {
    let spec = std::env::var(WORKER_ENV)
        .unwrap_or_else(|_| panic!("run by local_store_stays_consistent_across_processes"));
    let (path, owner) = spec.split_once('|').expect("worker spec");
    let store = LocalStore::open(path).expect("open");
    for i in 1..=WORKER_SLICES {
        let slice = day(i);
        if let Some(lease) = store.claim(T, slice, owner, 0, u64::MAX).await.unwrap() {
            assert!(store.complete(&lease, 1, None).await.unwrap());
            println!("CLAIMED {slice}");
        }
        let column = format!("{owner}_{i}");
        store
            .merge_schema(T, &schema(&[(&column, "string")]))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn local_store_stays_consistent_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".state.json");
    let store = LocalStore::open(&path).unwrap();
    for i in 1..=WORKER_SLICES {
        store.enqueue(T, day(i), None).await.unwrap();
    }

    let workers: Vec<_> = ["p1", "p2", "p3"]
        .into_iter()
        .map(|owner| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "local_store_process_worker",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                ])
                .env(WORKER_ENV, format!("{}|{owner}", path.display()))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut claimed: BTreeMap<String, usize> = BTreeMap::new();
    for worker in workers {
        let out = worker.wait_with_output().unwrap();
        assert!(out.status.success(), "a worker failed");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(slice) = line.strip_prefix("CLAIMED ") {
                *claimed.entry(slice.to_string()).or_default() += 1;
            }
        }
    }

    assert_eq!(
        claimed.len(),
        WORKER_SLICES as usize,
        "every slice claimed: {claimed:?}"
    );
    assert!(
        claimed.values().all(|&n| n == 1),
        "each slice claimed once: {claimed:?}"
    );
    let slices = store.slices(T).await.unwrap();
    assert!(
        slices
            .iter()
            .all(|r| r.status == SliceStatus::Committed && r.attempts == 1)
    );
    let columns = store.schema(T).await.unwrap().unwrap().columns;
    assert_eq!(
        columns.len(),
        3 * WORKER_SLICES as usize,
        "no lost schema update"
    );
}

#[tokio::test]
async fn a_corrupt_local_state_file_is_a_clear_error_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".state.json");
    std::fs::write(&path, "{\"slices\": {\"export\": [oops").unwrap();
    let store = LocalStore::open(&path).unwrap();

    let read = store.slices(T).await.unwrap_err();
    assert_eq!(read.kind(), ErrorKind::State);
    assert!(
        read.message().contains(&path.display().to_string()),
        "{read}"
    );
    assert!(read.message().contains("not valid"), "{read}");
    let write = store.enqueue(T, day(1), None).await.unwrap_err();
    assert_eq!(write.kind(), ErrorKind::State);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "{\"slices\": {\"export\": [oops",
        "never reset"
    );
}

#[tokio::test]
async fn the_local_state_file_is_readable_json_that_keeps_unknown_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep/folder/state.json");
    let store = LocalStore::open(&path).unwrap();
    store.enqueue(T, day(1), None).await.unwrap();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["ledger"] = serde_json::json!({"export": [1, 2]});
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();

    store.advance_bookmark(T, DAY).await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("\n  \"bookmarks\": {\n    \"export\": \"2026-11-01\""),
        "{text}"
    );
    assert!(text.contains("\"status\": \"pending\""), "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["ledger"], serde_json::json!({"export": [1, 2]}));
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn dynamodb_failures_name_the_operation_and_the_table() {
    let moto = Moto::start();
    let client = aws_sdk_dynamodb::Client::new(&moto.sdk_config().await);
    let store = DynamoStore::new(client, "no-such-table");

    let error = store.slices(T).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::State);
    let message = error.message();
    assert!(
        message.contains("listing the slices of export"),
        "{message}"
    );
    assert!(message.contains("no-such-table"), "{message}");
    assert!(message.len() < 600, "short enough to read: {message}");
    let error = store.enqueue(T, day(1), None).await.unwrap_err();
    assert!(
        error
            .message()
            .contains("queueing slice 2026-11-01 of export"),
        "{error}"
    );
}
