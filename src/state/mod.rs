//! Replication state: the slice queue with leases, bookmarks and discovered schemas.
//!
//! Two implementations with the same semantics: DynamoDB (conditional writes) for Lambda and a
//! locked JSON file for local use. The core only sees [`StateStore`].

pub mod dynamo;
pub mod local;

use std::str::FromStr;

use async_trait::async_trait;
use jiff::civil::Date;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::tables::Table;

pub use crate::schema::{Schema, folded, type_name};
pub use crate::slice::SliceId;

/// Where a slice stands in the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SliceStatus {
    /// Waiting to be claimed.
    Pending,
    /// Claimed by an attempt whose lease may have expired.
    Leased,
    /// Replicated and committed.
    Committed,
    /// Parked: it failed `MAX_SLICE_ATTEMPTS` times in a row. Claims skip it until a person
    /// retries it (an explicit day event, `sync --retry-parked`).
    Failed,
}

impl SliceStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            SliceStatus::Pending => "pending",
            SliceStatus::Leased => "leased",
            SliceStatus::Committed => "committed",
            SliceStatus::Failed => "failed",
        }
    }
}

impl FromStr for SliceStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pending" => Ok(SliceStatus::Pending),
            "leased" => Ok(SliceStatus::Leased),
            "committed" => Ok(SliceStatus::Committed),
            "failed" => Ok(SliceStatus::Failed),
            _ => Err(format!("unknown slice status {s:?}")),
        }
    }
}

/// A slice of one table as the state store holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceRecord {
    /// The table.
    pub table: Table,
    /// The slice.
    pub slice: SliceId,
    /// Queue status.
    pub status: SliceStatus,
    /// The attempt holding (or last holding) the lease.
    pub lease_owner: Option<String>,
    /// When the lease ends, epoch milliseconds.
    pub lease_expires_ms: Option<u64>,
    /// When the slice was last committed, epoch milliseconds.
    pub committed_at_ms: Option<u64>,
    /// How many times the slice was claimed.
    pub attempts: u32,
    /// Resumable progress of the current snapshot (engage pages), opaque JSON.
    pub progress: Option<String>,
    /// What the last commit recorded (an hour slice's parts; a day's size and time), opaque
    /// JSON. Kept when the slice is queued again, so the next round can plan from it.
    pub result: Option<String>,
    /// Failed attempts in a row since the slice last committed (or was retried by a person).
    pub failures: u32,
    /// A slice that failed is not claimed before this time, epoch milliseconds (backoff).
    pub retry_at_ms: Option<u64>,
    /// The last failure: why the slice is parked, or why its last attempt failed.
    pub error: Option<SliceError>,
}

/// A failed attempt as the slice keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceError {
    /// The error kind (`BadResponse`, `Transient`, ...).
    pub kind: String,
    /// The error message.
    pub message: String,
    /// When it failed, epoch milliseconds.
    pub at_ms: u64,
}

impl SliceError {
    /// The stored JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads the stored JSON; `None` when it is not one.
    pub fn parse(text: &str) -> Option<SliceError> {
        serde_json::from_str(text).ok()
    }
}

/// A failed attempt to record on a held slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Failed attempts in a row, this one included.
    pub failures: u32,
    /// Whether the slice is parked now (status `failed`) instead of pending again.
    pub park: bool,
    /// Not to be claimed again before this time (pending only).
    pub retry_at_ms: Option<u64>,
    /// What failed.
    pub error: SliceError,
}

/// A lease on a slice: proof that one attempt may write it until `expires_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The table.
    pub table: Table,
    /// The slice.
    pub slice: SliceId,
    /// The attempt id, also used in part names.
    pub owner: String,
    /// When the lease ends, epoch milliseconds.
    pub expires_ms: u64,
}

/// Small versioned JSON documents written by compare-and-swap: all that the request budget
/// (its ledger) and a person's requests need of the state store.
#[async_trait]
pub trait Ledger: Send + Sync {
    /// A small JSON document kept by the store (the request ledger), with its version.
    async fn document(&self, name: &str) -> Result<Option<(String, u64)>>;

    /// Writes a document only if its version is still `expected` (`None`: only if it does not
    /// exist yet); the new version is `expected + 1` (or 1). Returns whether it was written.
    async fn put_document(&self, name: &str, body: &str, expected: Option<u64>) -> Result<bool>;
}

/// The state store: every method is atomic on its own (conditional writes).
#[async_trait]
pub trait StateStore: Ledger {
    /// Every slice of the table, ordered by slice id.
    async fn slices(&self, table: Table) -> Result<Vec<SliceRecord>>;

    /// Queues a slice that is not known yet (as pending), or re-queues a committed slice whose
    /// last commit is before `requeue_committed_before_ms`. Returns whether it is now pending
    /// because of this call. Leased slices are never touched.
    async fn enqueue(
        &self,
        table: Table,
        slice: SliceId,
        requeue_committed_before_ms: Option<u64>,
    ) -> Result<bool>;

    /// Claims a slice that is pending, or leased with a lease expired at `now_ms`. Returns the
    /// lease, or `None` when someone else holds it or it is committed.
    async fn claim(
        &self,
        table: Table,
        slice: SliceId,
        owner: &str,
        now_ms: u64,
        lease_until_ms: u64,
    ) -> Result<Option<Lease>>;

    /// [`StateStore::enqueue`] of each of `slices`, in order: whether each is now pending
    /// because of this call. A store may do it in one write.
    async fn enqueue_many(
        &self,
        table: Table,
        slices: &[SliceId],
        requeue_committed_before_ms: Option<u64>,
    ) -> Result<Vec<bool>> {
        let mut queued = Vec::with_capacity(slices.len());
        for slice in slices {
            queued.push(
                self.enqueue(table, *slice, requeue_committed_before_ms)
                    .await?,
            );
        }
        Ok(queued)
    }

    /// [`StateStore::claim`] of `slices` in order, up to the first that cannot be claimed: the
    /// leases of the claimed ones (a multi-day window's days after its first). A store may do
    /// it in one write.
    async fn claim_run(
        &self,
        table: Table,
        slices: &[SliceId],
        owner: &str,
        now_ms: u64,
        lease_until_ms: u64,
    ) -> Result<Vec<Lease>> {
        let mut leases = Vec::with_capacity(slices.len());
        for slice in slices {
            match self
                .claim(table, *slice, owner, now_ms, lease_until_ms)
                .await?
            {
                Some(lease) => leases.push(lease),
                None => break,
            }
        }
        Ok(leases)
    }

    /// Fencing check before a commit: extends the lease to `until_ms` only if `lease` is still
    /// held (same owner, not expired at `now_ms`). Returns whether it is held.
    async fn confirm(&self, lease: &Lease, now_ms: u64, until_ms: u64) -> Result<bool>;

    /// Saves resumable progress under a held lease. Returns whether the lease was still held.
    async fn save_progress(&self, lease: &Lease, progress: Option<&str>) -> Result<bool>;

    /// Marks the slice committed at `now_ms` with `result` (replacing the previous one) if
    /// `lease` is still held; its failures, backoff and error are cleared. Returns whether it was.
    async fn complete(&self, lease: &Lease, now_ms: u64, result: Option<&str>) -> Result<bool>;

    /// Gives a held slice back to the queue as pending (an attempt that ran out of time or
    /// waited on a rate limit). Does nothing if the lease is no longer held.
    async fn release(&self, lease: &Lease) -> Result<()>;

    /// Records a failed attempt on a held slice: pending again with its failure count, backoff
    /// and error, or parked (`failed`). Returns whether the lease was still held.
    async fn fail(&self, lease: &Lease, failure: &Failure) -> Result<bool>;

    /// A person's retry: a parked slice becomes pending again, and a pending one loses its
    /// backoff; either way its failure count starts over (the last error is kept). Returns
    /// whether the slice was parked or backing off.
    async fn reset_failures(&self, table: Table, slice: SliceId) -> Result<bool>;

    /// The table's bookmark: the last day D such that every slice up to D is committed.
    async fn bookmark(&self, table: Table) -> Result<Option<Date>>;

    /// Moves the bookmark forward to `day`; never moves it backwards.
    async fn advance_bookmark(&self, table: Table, day: Date) -> Result<()>;

    /// The table's discovered schema.
    async fn schema(&self, table: Table) -> Result<Option<Schema>>;

    /// Stores `schema` as the table's first discovered schema unless one exists; returns the
    /// schema now stored (the existing one if another attempt was first).
    async fn init_schema(&self, table: Table, schema: &Schema) -> Result<Schema>;

    /// Adds columns to the table's schema (union); returns the schema now stored.
    async fn merge_schema(&self, table: Table, columns: &Schema) -> Result<Schema>;
}
