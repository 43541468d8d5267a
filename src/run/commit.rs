//! Committing a partition: fencing check, manifest, removal of other attempts' parts, queue and
//! bookmark update. After a commit the partition holds exactly the parts its manifest lists.

use bytes::Bytes;

use crate::clock::Clock;
use crate::error::{Cause, Error, ErrorKind, Result};
use crate::retry::{Decision, Policy};
use crate::sink::ObjectSink;
use crate::state::{Lease, Schema, SliceId, SliceRecord, SliceStatus, StateStore};
use crate::tables::Table;

pub use crate::sink::manifest::{FileEntry, Manifest};

/// An export day's rejected lines: their folder, how many, and the parts that hold them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RejectedParts {
    /// `{prefix}/{table}/_rejected/date=YYYY-MM-DD`.
    pub folder: String,
    /// Lines rejected.
    pub lines: u64,
    /// The parts.
    pub files: Vec<FileEntry>,
}

/// Joins key components, skipping an empty prefix.
pub fn key(prefix: &str, rest: &str) -> String {
    if prefix.is_empty() {
        rest.to_string()
    } else {
        format!("{prefix}/{rest}")
    }
}

/// The folder of a table's date partition: `{prefix}/{table}/date=YYYY-MM-DD`.
pub fn date_partition(prefix: &str, table: Table, slice: SliceId) -> Result<(String, String)> {
    let day = slice.day().ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidEvent,
            format!("{table} slice {slice} has no day"),
        )
    })?;
    let partition = format!("date={day}");
    Ok((key(prefix, &format!("{table}/{partition}")), partition))
}

/// The folder of a table's rejected source lines of a day:
/// `{prefix}/{table}/_rejected/date=YYYY-MM-DD`.
pub fn rejected_folder(prefix: &str, table: Table, slice: SliceId) -> Result<String> {
    let (_, partition) = date_partition(prefix, table, slice)?;
    Ok(key(prefix, &format!("{table}/_rejected/{partition}")))
}

/// How long the commit may take once the fencing check passed (the lease is extended by this).
const COMMIT_LEASE_MS: u64 = 120_000;

/// The shrink guard of a commit: a re-read with fewer than `percent` % of the rows of the
/// commit it replaces (the day's manifest, or the table's latest snapshot) is not committed —
/// an empty 200 during an incident must not replace a good day. A person forces it by retrying
/// the slice parked for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShrinkGuard {
    /// `SHRINK_GUARD_PERCENT`; 0 is off.
    pub percent: u32,
    /// The slice was parked by this guard and retried by a person: commit as read.
    pub forced: bool,
}

impl ShrinkGuard {
    /// No guard (a first commit, or a caller that replaces nothing).
    pub const OFF: ShrinkGuard = ShrinkGuard {
        percent: 0,
        forced: false,
    };

    /// The guard for a slice as it was when claimed (`before`).
    pub fn for_slice(percent: u32, before: Option<&SliceRecord>) -> ShrinkGuard {
        let forced = before.is_some_and(|r| {
            r.failures == 0
                && r.error
                    .as_ref()
                    .is_some_and(|e| e.kind == ErrorKind::Shrunk.as_str())
        });
        ShrinkGuard { percent, forced }
    }

    /// Fails with `Shrunk` when `records` is under the guard's share of `previous`.
    fn check(&self, what: &str, previous: Option<u64>, records: u64) -> Result<()> {
        let Some(previous) = previous else {
            return Ok(());
        };
        if self.forced
            || self.percent == 0
            || u128::from(records) * 100 >= u128::from(previous) * u128::from(self.percent)
        {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Shrunk,
            format!(
                "{what} shrunk from {previous} to {records} rows (under SHRINK_GUARD_PERCENT={}% of the commit it would replace): not committed; if Mixpanel really holds fewer now, retry the parked slice to commit it as read",
                self.percent
            ),
        ))
    }
}

/// The rows of the commit that one in `folder` replaces: the date partition's manifest, or the
/// latest snapshot of the table (the folder's parent) for a snapshot.
async fn replaced_records(
    sink: &dyn ObjectSink,
    folder: &str,
    partition: &str,
) -> Result<Option<u64>> {
    let manifest_key = if partition.starts_with("date=") {
        format!("{folder}/_manifest.json")
    } else {
        let parent = folder.rsplit_once('/').map_or("", |(p, _)| p);
        let latest = key(parent, "_latest.json");
        let Some(body) = sink.get(&latest).await? else {
            return Ok(None);
        };
        match serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("manifest")?.as_str().map(String::from))
        {
            Some(k) => k,
            None => return Ok(None),
        }
    };
    let Some(body) = sink.get(&manifest_key).await? else {
        return Ok(None);
    };
    Ok(serde_json::from_slice::<Manifest>(&body)
        .ok()
        .map(|m| m.records))
}

/// Commits the parts of `lease`'s attempt in `folder`: [`write_manifest`], then [`complete`].
/// Returns an error of kind `State` when the lease was lost (another attempt owns the slice
/// now): nothing is committed then.
#[allow(clippy::too_many_arguments)]
pub async fn commit(
    store: &dyn StateStore,
    sink: &dyn ObjectSink,
    clock: &dyn Clock,
    lease: &Lease,
    folder: &str,
    partition: &str,
    files: Vec<FileEntry>,
    result: Option<&str>,
    guard: ShrinkGuard,
) -> Result<Manifest> {
    let manifest =
        write_manifest(store, sink, clock, lease, folder, partition, files, guard).await?;
    complete(store, clock, lease, result).await?;
    Ok(manifest)
}

/// [`commit`] of an export day, whose manifest also counts and lists its rejected lines; the
/// rejected parts of other attempts are removed too.
#[allow(clippy::too_many_arguments)]
pub async fn commit_with_rejected(
    store: &dyn StateStore,
    sink: &dyn ObjectSink,
    clock: &dyn Clock,
    lease: &Lease,
    folder: &str,
    partition: &str,
    files: Vec<FileEntry>,
    rejected: &RejectedParts,
    result: Option<&str>,
    guard: ShrinkGuard,
) -> Result<Manifest> {
    let manifest = write_manifest_with(
        store,
        sink,
        clock,
        lease,
        folder,
        partition,
        files,
        Some(rejected),
        guard,
    )
    .await?;
    complete(store, clock, lease, result).await?;
    Ok(manifest)
}

/// The first half of a commit: the fencing check, the manifest (and a date partition's symlink
/// manifest), then the removal of other attempts' parts. The slice is not marked committed yet:
/// whatever must be visible before it is (a snapshot's `_latest.json`) goes next, then
/// [`complete`]. A crash in between leaves the slice to be replicated again. `guard` refuses a
/// re-read far smaller than what it replaces (nothing is written then).
#[allow(clippy::too_many_arguments)]
pub async fn write_manifest(
    store: &dyn StateStore,
    sink: &dyn ObjectSink,
    clock: &dyn Clock,
    lease: &Lease,
    folder: &str,
    partition: &str,
    files: Vec<FileEntry>,
    guard: ShrinkGuard,
) -> Result<Manifest> {
    write_manifest_with(
        store, sink, clock, lease, folder, partition, files, None, guard,
    )
    .await
}

/// [`write_manifest`], with an export day's rejected lines when given.
#[allow(clippy::too_many_arguments)]
async fn write_manifest_with(
    store: &dyn StateStore,
    sink: &dyn ObjectSink,
    clock: &dyn Clock,
    lease: &Lease,
    folder: &str,
    partition: &str,
    files: Vec<FileEntry>,
    rejected: Option<&RejectedParts>,
    guard: ShrinkGuard,
) -> Result<Manifest> {
    if guard.percent > 0 && !guard.forced {
        let records: u64 = files.iter().map(|f| f.records).sum();
        let previous = replaced_records(sink, folder, partition).await?;
        guard.check(&format!("{} {partition}", lease.table), previous, records)?;
    }
    let now = clock.now();
    let now_ms = now.as_millisecond() as u64;
    // Fencing: only the attempt that still holds the lease may write the manifest.
    if !store
        .confirm(lease, now_ms, now_ms + COMMIT_LEASE_MS)
        .await?
    {
        return Err(lost(lease));
    }
    let records = files.iter().map(|f| f.records).sum();
    let manifest = Manifest {
        table: lease.table.to_string(),
        partition: partition.to_string(),
        attempt: lease.owner.clone(),
        committed_at: now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        records,
        files,
        rejected: rejected.map(|r| r.lines),
        rejected_files: rejected.map(|r| r.files.clone()),
    };
    let body = serde_json::to_vec_pretty(&manifest).map_err(Error::storage)?;
    sink.put(
        &format!("{folder}/_manifest.json"),
        Bytes::from(body),
        "application/json",
    )
    .await?;
    if partition.starts_with("date=") {
        write_symlink(sink, folder, None, &manifest.files).await?;
    }
    // Parts of other attempts (failed, abandoned or replaced) go. The manifest is written: a
    // passing storage failure here is worth a few more tries rather than failing the commit.
    Policy::CLEANUP
        .run(
            None,
            |_| async {
                remove_other_parts(sink, folder, &manifest.files).await?;
                match rejected {
                    Some(r) => remove_other_parts(sink, &r.folder, &r.files).await,
                    None => Ok(()),
                }
            },
            |e: &Error, _| {
                if e.kind().retryable() {
                    Decision::Retry
                } else {
                    Decision::GiveUp
                }
            },
            |e, attempt, _| {
                tracing::warn!(folder, attempt, error = %e, "removing other attempts' parts again");
            },
        )
        .await?;
    Ok(manifest)
}

/// Deletes the parts (and `delta-` parts) in `folder` that `files` does not list.
async fn remove_other_parts(
    sink: &dyn ObjectSink,
    folder: &str,
    files: &[FileEntry],
) -> Result<()> {
    let keep: std::collections::HashSet<String> = files
        .iter()
        .map(|f| format!("{folder}/{}", f.name))
        .collect();
    let stale: Vec<String> = sink
        .list(&format!("{folder}/"))
        .await?
        .into_iter()
        .map(|o| o.key)
        .filter(|k| {
            // `delta-` parts: an incremental engage listing's changed profiles, merged into
            // the snapshot's own parts before its commit.
            !keep.contains(k)
                && k.rsplit('/')
                    .next()
                    .is_some_and(|n| n.starts_with("part-") || n.starts_with("delta-"))
        })
        .collect();
    if !stale.is_empty() {
        sink.delete(&stale).await?;
    }
    // What killed writers left half written goes too (a local folder; S3 has its lifecycle).
    if let Err(e) = sink.sweep(folder).await {
        tracing::warn!(folder, error = %e, "could not remove temporary files of killed runs");
    }
    Ok(())
}

/// The second half of a commit: marks the slice committed, with `result`, if `lease` still
/// holds it.
///
/// A completion whose answer was lost (a dropped connection after DynamoDB applied it, retried
/// by the SDK into a failed condition or an error) is recognised by reading the slice back:
/// committed with this attempt as its last owner means this attempt committed it, since only a
/// completion under this lease sets that.
pub async fn complete(
    store: &dyn StateStore,
    clock: &dyn Clock,
    lease: &Lease,
    result: Option<&str>,
) -> Result<()> {
    let outcome = store.complete(lease, clock.now_ms(), result).await;
    if matches!(outcome, Ok(true)) {
        return Ok(());
    }
    let ours = Policy::CLEANUP
        .run(
            None,
            |_| store.slices(lease.table),
            |e, attempt| {
                tracing::warn!(attempt, error = %e, "cannot read the slice back after its completion failed");
                Decision::Retry
            },
            |_, _, _| {},
        )
        .await
        .is_ok_and(|slices| {
            slices.iter().any(|r| {
                r.slice == lease.slice
                    && r.status == SliceStatus::Committed
                    && r.lease_owner.as_deref() == Some(lease.owner.as_str())
            })
        });
    match outcome {
        _ if ours => Ok(()),
        Err(e) => Err(e),
        Ok(_) => Err(lost(lease)),
    }
}

/// Whether `e` says that the lease was lost (another attempt owns the slice now).
pub fn lease_lost(e: &Error) -> bool {
    e.cause() == Some(Cause::LeaseLost)
}

fn lost(lease: &Lease) -> Error {
    Error::new(
        ErrorKind::State,
        format!(
            "lost the lease on {} {} (attempt {}): another invocation owns it now; nothing was committed by this attempt",
            lease.table, lease.slice, lease.owner
        ),
    )
    .with_cause(Cause::LeaseLost)
}

/// Writes the table's `_schema.json` for its stored `schema`, then brings its Glue table up to
/// it when `GLUE_DATABASE` is set. The rows are committed already, so a catalog that cannot be
/// updated does not fail the commit: it is logged, and the next commit tries again.
pub async fn publish_schema(app: &crate::app::App, table: Table, schema: &Schema) -> Result<()> {
    write_schema(app.sink.as_ref(), &app.prefix, table, schema).await?;
    if let Some(catalog) = &app.catalog
        && let Err(e) = catalog.publish(table, schema).await
    {
        tracing::warn!(
            table = table.as_str(),
            error = %e,
            "the Glue table was not brought up to date with the discovered columns; the next commit tries again"
        );
    }
    Ok(())
}

/// Writes `{prefix}/{table}/_schema.json`: column names, JSON types and original names.
pub async fn write_schema(
    sink: &dyn ObjectSink,
    prefix: &str,
    table: Table,
    schema: &Schema,
) -> Result<()> {
    let body = serde_json::json!({
        "table": table.as_str(),
        "columns": schema
            .columns
            .iter()
            .map(|(name, ty)| {
                // `source`: the Mixpanel property a column of flattened properties holds (`$city`
                // for `mp_reserved_city`, `country` for a `country__2` renamed beside
                // `Country`); the record's own keys and the other tables' columns hold none.
                let holds_property = matches!(table, Table::Export | Table::Engage)
                    && !table.fixed_keys().contains(&name.as_str());
                let mut column = serde_json::json!({"name": name, "type": type_json(ty)});
                if holds_property {
                    column["source"] = serde_json::json!(schema.source_of(name));
                }
                column
            })
            .collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec_pretty(&body).map_err(Error::storage)?;
    sink.put(
        &key(prefix, &format!("{table}/_schema.json")),
        Bytes::from(bytes),
        "application/json",
    )
    .await
}

/// A column's type as `_schema.json` writes it: one JSON type, or the list of them when a
/// column holds several (stored as `integer|string`).
fn type_json(ty: &str) -> serde_json::Value {
    if ty.contains('|') {
        serde_json::json!(ty.split('|').collect::<Vec<_>>())
    } else {
        serde_json::json!(ty)
    }
}

/// The Athena symlink manifest of a committed partition or snapshot: one address per committed
/// part, at `{table}/_symlink/{partition}/manifest` (or `{table}/_symlink/latest/manifest` for
/// the newest snapshot). A table read through it (`SymlinkTextInputFormat`) sees exactly the
/// committed parts, and a re-replicated day switches to its new parts in one write — never a
/// mix of attempts, never parts of an attempt still running.
pub async fn write_symlink(
    sink: &dyn ObjectSink,
    folder: &str,
    name: Option<&str>,
    files: &[FileEntry],
) -> Result<()> {
    let (parent, last) = folder.rsplit_once('/').unwrap_or(("", folder));
    let partition = name.unwrap_or(last);
    let key = if parent.is_empty() {
        format!("_symlink/{partition}/manifest")
    } else {
        format!("{parent}/_symlink/{partition}/manifest")
    };
    let mut body = String::new();
    for f in files {
        body.push_str(&sink.url(&format!("{folder}/{}", f.name)));
        body.push('\n');
    }
    sink.put(&key, Bytes::from(body), "text/plain").await
}
