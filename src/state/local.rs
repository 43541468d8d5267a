//! The state store in one local JSON file (the local command).
//!
//! Same semantics as the DynamoDB store. Several processes may share the file: every operation
//! holds a lock on a sidecar `<file>.lock` while it reads, changes and rewrites the state, and a
//! rewrite goes to a temporary file renamed over the old one, so a crash never leaves a torn
//! file. A file that cannot be read as state is an error, never silently reset.
//!
//! Every rewrite's content is synced before its rename. The rename itself is forced to disk
//! (the folder synced) for the schemas, documents (the request ledger) and bookmarks, but not
//! for changes to slice records (queueing, claims, progress, commits, failures): on ext4 that
//! sync commits the whole journal, spill and parts included, and cost a tenth of a ten-day
//! backfill's time. After an OS crash or power loss the file may then come back with its last
//! slice changes undone, never torn: a day it calls pending is read again (its commit replaces
//! the parts found), a lease it still holds runs out; nothing it says is false of the output,
//! whose parts and manifests are forced before their commit is recorded. A process crash loses
//! nothing either way.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use jiff::civil::Date;
use serde::{Deserialize, Serialize};

use super::{
    Failure, Lease, Ledger, Schema, SliceError, SliceId, SliceRecord, SliceStatus, StateStore,
};
use crate::error::{Error, Result};
use crate::tables::Table;

/// The local file state store.
#[derive(Clone, Debug)]
pub struct LocalStore {
    path: PathBuf,
}

/// The file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    /// Table name → slice id → slice.
    #[serde(default)]
    slices: BTreeMap<String, BTreeMap<String, SliceEntry>>,
    /// Table name → bookmark day (`YYYY-MM-DD`).
    #[serde(default)]
    bookmarks: BTreeMap<String, String>,
    /// Table name → discovered schema.
    #[serde(default)]
    schemas: BTreeMap<String, Schema>,
    /// Small versioned documents (the request ledger).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    documents: BTreeMap<String, Document>,
    /// Whatever else the file holds (kept as is, so nothing written by others is lost).
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

/// A versioned document in the file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Document {
    body: String,
    version: u64,
}

/// One slice in the file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SliceEntry {
    status: SliceStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease_owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease_expires_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    committed_at_ms: Option<u64>,
    #[serde(default)]
    attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    progress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<SliceError>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl SliceEntry {
    fn pending() -> Self {
        SliceEntry {
            status: SliceStatus::Pending,
            lease_owner: None,
            lease_expires_ms: None,
            committed_at_ms: None,
            attempts: 0,
            progress: None,
            result: None,
            failures: 0,
            retry_at_ms: None,
            error: None,
        }
    }

    /// Whether `lease` still holds this slice (and, with `now_ms`, has not expired then).
    fn held_by(&self, lease: &Lease, now_ms: Option<u64>) -> bool {
        self.status == SliceStatus::Leased
            && self.lease_owner.as_deref() == Some(lease.owner.as_str())
            && now_ms.is_none_or(|now| self.lease_expires_ms.is_some_and(|e| e >= now))
    }
}

impl StateFile {
    fn slice_mut(&mut self, table: Table, slice: SliceId) -> Option<&mut SliceEntry> {
        self.slices
            .get_mut(table.as_str())?
            .get_mut(&slice.to_string())
    }

    /// Queues a new slice, or re-queues a committed one last committed before
    /// `requeue_committed_before_ms`; returns whether it is now pending because of this call.
    fn enqueue(
        &mut self,
        table: Table,
        slice: SliceId,
        requeue_committed_before_ms: Option<u64>,
    ) -> bool {
        let slices = self.slices.entry(table.as_str().to_owned()).or_default();
        match slices.get_mut(&slice.to_string()) {
            None => {
                slices.insert(slice.to_string(), SliceEntry::pending());
                true
            }
            Some(entry)
                if entry.status == SliceStatus::Committed
                    && requeue_committed_before_ms.is_some_and(|before| {
                        entry.committed_at_ms.is_some_and(|at| at < before)
                    }) =>
            {
                // A re-queued slice starts a new round: attempts and progress start over.
                entry.status = SliceStatus::Pending;
                entry.attempts = 0;
                entry.lease_expires_ms = None;
                entry.progress = None;
                true
            }
            Some(_) => false,
        }
    }

    /// Leases a pending slice, or one whose lease expired before `now_ms`, to `owner`.
    fn claim(
        &mut self,
        table: Table,
        slice: SliceId,
        owner: &str,
        now_ms: u64,
        lease_until_ms: u64,
    ) -> Option<Lease> {
        let entry = self.slice_mut(table, slice)?;
        let claimable = match entry.status {
            SliceStatus::Pending => true,
            SliceStatus::Leased => entry.lease_expires_ms.is_some_and(|e| e < now_ms),
            SliceStatus::Committed | SliceStatus::Failed => false,
        };
        if !claimable {
            return None;
        }
        entry.status = SliceStatus::Leased;
        entry.lease_owner = Some(owner.to_owned());
        entry.lease_expires_ms = Some(lease_until_ms);
        entry.attempts = entry.attempts.saturating_add(1);
        Some(Lease {
            table,
            slice,
            owner: owner.to_owned(),
            expires_ms: lease_until_ms,
        })
    }

    /// Applies `change` to the slice held by `lease`; returns whether it was held.
    fn with_held(
        &mut self,
        lease: &Lease,
        now_ms: Option<u64>,
        change: impl FnOnce(&mut SliceEntry),
    ) -> (bool, bool) {
        match self.slice_mut(lease.table, lease.slice) {
            Some(entry) if entry.held_by(lease, now_ms) => {
                change(entry);
                (true, true)
            }
            _ => (false, false),
        }
    }
}

impl LocalStore {
    /// A store in the JSON file at `path`; creates its folder (the file appears on first write).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        if path.file_name().is_none() {
            return Err(Error::state(format!(
                "state file {}: not a file path",
                path.display()
            )));
        }
        // The folder is created by the first write, so that reading (`plan`) changes nothing.
        Ok(LocalStore { path })
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the state under a shared lock.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&StateFile) -> Result<T> + Send + 'static,
    {
        self.blocking(move |path| {
            // No state yet: nothing to lock, and nothing is created by looking.
            if !path.exists() {
                return f(&StateFile::default());
            }
            let _lock = lock(path, false)?;
            f(&load(path)?)
        })
        .await
    }

    /// Reads, changes and (if `f` says it changed something) rewrites the state under an
    /// exclusive lock, the rename forced to disk. `f` returns its answer and whether it changed
    /// the state.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut StateFile) -> Result<(T, bool)> + Send + 'static,
    {
        self.write_as(Rename::Forced, f).await
    }

    /// [`LocalStore::write`] of a change to slice records only: the new file's content is
    /// synced, its rename is not forced (see the module's doc).
    async fn write_records<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut StateFile) -> Result<(T, bool)> + Send + 'static,
    {
        self.write_as(Rename::MayRollBack, f).await
    }

    async fn write_as<T, F>(&self, rename: Rename, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut StateFile) -> Result<(T, bool)> + Send + 'static,
    {
        self.blocking(move |path| {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir)
                    .map_err(|e| state_io(path, "cannot create its folder", e))?;
            }
            let _lock = lock(path, true)?;
            let mut state = load(path)?;
            let (answer, changed) = f(&mut state)?;
            if changed {
                save(path, &state, rename)?;
            }
            Ok(answer)
        })
        .await
    }

    /// Runs file work off the async threads.
    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Path) -> Result<T> + Send + 'static,
    {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || f(&path))
            .await
            .map_err(|e| {
                Error::state(format!(
                    "state file {}: the file task failed: {e}",
                    self.path.display()
                ))
            })?
    }
}

#[async_trait]
impl StateStore for LocalStore {
    async fn slices(&self, table: Table) -> Result<Vec<SliceRecord>> {
        let file = self.path.clone();
        self.read(move |state| {
            let Some(slices) = state.slices.get(table.as_str()) else {
                return Ok(Vec::new());
            };
            let mut records = slices
                .iter()
                .map(|(id, e)| {
                    let slice = id.parse::<SliceId>().map_err(|reason| {
                        Error::state(format!(
                            "state file {}: table {table}: {reason}",
                            file.display()
                        ))
                    })?;
                    Ok(SliceRecord {
                        table,
                        slice,
                        status: e.status,
                        lease_owner: e.lease_owner.clone(),
                        lease_expires_ms: e.lease_expires_ms,
                        committed_at_ms: e.committed_at_ms,
                        attempts: e.attempts,
                        progress: e.progress.clone(),
                        result: e.result.clone(),
                        failures: e.failures,
                        retry_at_ms: e.retry_at_ms,
                        error: e.error.clone(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            records.sort_by_key(|r| r.slice);
            Ok(records)
        })
        .await
    }

    async fn enqueue(
        &self,
        table: Table,
        slice: SliceId,
        requeue_committed_before_ms: Option<u64>,
    ) -> Result<bool> {
        self.write_records(move |state| {
            let queued = state.enqueue(table, slice, requeue_committed_before_ms);
            Ok((queued, queued))
        })
        .await
    }

    async fn enqueue_many(
        &self,
        table: Table,
        slices: &[SliceId],
        requeue_committed_before_ms: Option<u64>,
    ) -> Result<Vec<bool>> {
        let slices = slices.to_vec();
        self.write_records(move |state| {
            let queued: Vec<bool> = slices
                .iter()
                .map(|s| state.enqueue(table, *s, requeue_committed_before_ms))
                .collect();
            let changed = queued.contains(&true);
            Ok((queued, changed))
        })
        .await
    }

    async fn claim(
        &self,
        table: Table,
        slice: SliceId,
        owner: &str,
        now_ms: u64,
        lease_until_ms: u64,
    ) -> Result<Option<Lease>> {
        let owner = owner.to_owned();
        self.write_records(move |state| {
            let lease = state.claim(table, slice, &owner, now_ms, lease_until_ms);
            let changed = lease.is_some();
            Ok((lease, changed))
        })
        .await
    }

    async fn claim_run(
        &self,
        table: Table,
        slices: &[SliceId],
        owner: &str,
        now_ms: u64,
        lease_until_ms: u64,
    ) -> Result<Vec<Lease>> {
        let (slices, owner) = (slices.to_vec(), owner.to_owned());
        self.write_records(move |state| {
            let leases: Vec<Lease> = slices
                .iter()
                .map_while(|s| state.claim(table, *s, &owner, now_ms, lease_until_ms))
                .collect();
            let changed = !leases.is_empty();
            Ok((leases, changed))
        })
        .await
    }

    async fn confirm(&self, lease: &Lease, now_ms: u64, until_ms: u64) -> Result<bool> {
        let lease = lease.clone();
        self.write_records(move |state| {
            Ok(state.with_held(&lease, Some(now_ms), |e| {
                e.lease_expires_ms = Some(until_ms)
            }))
        })
        .await
    }

    async fn save_progress(&self, lease: &Lease, progress: Option<&str>) -> Result<bool> {
        let lease = lease.clone();
        let progress = progress.map(str::to_owned);
        self.write_records(
            move |state| Ok(state.with_held(&lease, None, |e| e.progress = progress)),
        )
        .await
    }

    async fn complete(&self, lease: &Lease, now_ms: u64, result: Option<&str>) -> Result<bool> {
        let lease = lease.clone();
        let result = result.map(str::to_owned);
        self.write_records(move |state| {
            Ok(state.with_held(&lease, Some(now_ms), |e| {
                e.status = SliceStatus::Committed;
                e.committed_at_ms = Some(now_ms);
                e.lease_expires_ms = None;
                e.progress = None;
                e.result = result;
                e.failures = 0;
                e.retry_at_ms = None;
                e.error = None;
            }))
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let lease = lease.clone();
        self.write_records(move |state| {
            let (_, changed) = state.with_held(&lease, None, |e| {
                e.status = SliceStatus::Pending;
                e.lease_expires_ms = None;
            });
            Ok(((), changed))
        })
        .await
    }

    async fn fail(&self, lease: &Lease, failure: &Failure) -> Result<bool> {
        let (lease, failure) = (lease.clone(), failure.clone());
        self.write_records(move |state| {
            Ok(state.with_held(&lease, None, |e| {
                e.status = if failure.park {
                    SliceStatus::Failed
                } else {
                    SliceStatus::Pending
                };
                e.lease_expires_ms = None;
                e.failures = failure.failures;
                e.retry_at_ms = failure.retry_at_ms.filter(|_| !failure.park);
                e.error = Some(failure.error);
            }))
        })
        .await
    }

    async fn reset_failures(&self, table: Table, slice: SliceId) -> Result<bool> {
        self.write(move |state| {
            let Some(e) = state.slice_mut(table, slice) else {
                return Ok((false, false));
            };
            let backing_off =
                e.status == SliceStatus::Pending && (e.failures > 0 || e.retry_at_ms.is_some());
            if e.status != SliceStatus::Failed && !backing_off {
                return Ok((false, false));
            }
            e.status = SliceStatus::Pending;
            e.failures = 0;
            e.retry_at_ms = None;
            Ok((true, true))
        })
        .await
    }

    async fn bookmark(&self, table: Table) -> Result<Option<Date>> {
        let file = self.path.clone();
        self.read(move |state| {
            state
                .bookmarks
                .get(table.as_str())
                .map(|day| {
                    day.parse().map_err(|e| {
                        Error::state(format!(
                            "state file {}: bookmark of {table} {day:?}: {e}",
                            file.display()
                        ))
                    })
                })
                .transpose()
        })
        .await
    }

    async fn advance_bookmark(&self, table: Table, day: Date) -> Result<()> {
        self.write(move |state| {
            let new = day.to_string();
            // ISO dates compare as strings, as in the DynamoDB store.
            if state
                .bookmarks
                .get(table.as_str())
                .is_some_and(|old| *old >= new)
            {
                return Ok(((), false));
            }
            state.bookmarks.insert(table.as_str().to_owned(), new);
            Ok(((), true))
        })
        .await
    }

    async fn schema(&self, table: Table) -> Result<Option<Schema>> {
        self.read(move |state| Ok(state.schemas.get(table.as_str()).cloned()))
            .await
    }

    async fn init_schema(&self, table: Table, schema: &Schema) -> Result<Schema> {
        let schema = schema.clone();
        self.write(move |state| {
            if let Some(stored) = state.schemas.get(table.as_str()) {
                return Ok((stored.clone(), false));
            }
            state
                .schemas
                .insert(table.as_str().to_owned(), schema.clone());
            Ok((schema, true))
        })
        .await
    }

    async fn merge_schema(&self, table: Table, columns: &Schema) -> Result<Schema> {
        let columns = columns.clone();
        self.write(move |state| {
            let created = !state.schemas.contains_key(table.as_str());
            let stored = state.schemas.entry(table.as_str().to_owned()).or_default();
            let merged = stored.merged(&columns, table.fixed_keys());
            let changed = created || merged != *stored;
            *stored = merged.clone();
            Ok((merged, changed))
        })
        .await
    }
}

#[async_trait]
impl Ledger for LocalStore {
    async fn document(&self, name: &str) -> Result<Option<(String, u64)>> {
        let name = name.to_owned();
        self.read(move |state| {
            Ok(state
                .documents
                .get(&name)
                .map(|d| (d.body.clone(), d.version)))
        })
        .await
    }

    async fn put_document(&self, name: &str, body: &str, expected: Option<u64>) -> Result<bool> {
        let (name, body) = (name.to_owned(), body.to_owned());
        self.write(move |state| {
            let current = state.documents.get(&name).map(|d| d.version);
            if current != expected {
                return Ok((false, false));
            }
            let version = expected.map_or(1, |v| v + 1);
            state.documents.insert(name, Document { body, version });
            Ok((true, true))
        })
        .await
    }
}

/// Takes the sidecar lock of `path`, held until the returned file is dropped.
fn lock(path: &Path, exclusive: bool) -> Result<File> {
    let lock_path = sibling(path, "", ".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| state_io(path, &format!("cannot open {}", lock_path.display()), e))?;
    let locked = if exclusive {
        file.lock()
    } else {
        file.lock_shared()
    };
    locked.map_err(|e| state_io(path, &format!("cannot lock {}", lock_path.display()), e))?;
    Ok(file)
}

/// Reads the state; a missing file is an empty state, an unreadable one an error.
fn load(path: &Path) -> Result<StateFile> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(StateFile::default()),
        Err(e) => return Err(state_io(path, "cannot read it", e)),
    };
    serde_json::from_str(&text).map_err(|e| {
        Error::state(format!(
            "state file {} is not valid replication state ({e}); fix it or move it away to \
             start over",
            path.display()
        ))
    })
}

/// Whether a rewrite's rename is forced to disk (the state file's directory synced).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rename {
    Forced,
    /// Slice records: after an OS crash the file may come back some of these writes older.
    MayRollBack,
}

/// Replaces the file with `state`: a synced temporary file renamed over it.
fn save(path: &Path, state: &StateFile, rename: Rename) -> Result<()> {
    let mut text = serde_json::to_string_pretty(state)
        .map_err(|e| Error::state(format!("state file {}: cannot encode: {e}", path.display())))?;
    text.push('\n');
    let tmp = sibling(
        path,
        ".",
        &format!(".tmp-{}", uuid::Uuid::new_v4().simple()),
    );
    let written = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(state_io(path, "cannot write it", e));
    }
    // Make the rename itself durable; a failure here loses nothing already visible.
    if rename == Rename::Forced
        && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(dir) = File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// `{dir}/{before}{file name}{after}`.
fn sibling(path: &Path, before: &str, after: &str) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("{before}{name}{after}"))
}

fn state_io(path: &Path, what: &str, e: io::Error) -> Error {
    Error::state(format!("state file {}: {what}: {e}", path.display()))
}
