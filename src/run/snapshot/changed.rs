//! Incremental `engage`: after a full listing, a snapshot lists only the profiles whose
//! `$last_seen` moved since the previous snapshot began, and merges them into that snapshot's
//! rows. Every snapshot is still complete: the previous rows, the changed profiles in place of
//! their old rows, and the new profiles.
//!
//! Mixpanel's `$last_seen` moves with every profile update (unless it was sent with
//! `$ignore_time`), so the profiles changed since the previous snapshot began are those whose
//! `$last_seen` is at or after that start (less a margin for clocks). The cursor is the
//! previous snapshot's start, never the largest `$last_seen` seen: a profile may carry an old
//! one. Deletions do not show in such a listing: after it, one request asks Mixpanel how many
//! profiles it holds, and when the merged rows are more, profiles have gone and the snapshot
//! lists every profile instead, on that very run. A full listing also runs every
//! `ENGAGE_FULL_REFRESH_DAYS`, and when a person asks for one.
//!
//! The merge streams the previous parts and the changed rows through a spill keyed by
//! distinct id (as export's deduplication does): memory stays bounded whatever the table.

use std::hash::{BuildHasher, Hasher};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::app::App;
use crate::error::{Error, ErrorKind, Result};
use crate::run::commit::{FileEntry, Manifest, key};
use crate::run::spill::Spill;
use crate::sink::part;
use crate::sink::streaming::StreamingParts;
use crate::state::SliceRecord;
use crate::tables::Table;
use crate::tables::json::Types;

/// How a snapshot's profiles are listed; kept in its progress.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Listing {
    /// Every profile.
    #[default]
    Full,
    /// The profiles changed since the previous snapshot began, merged into its rows.
    Changed(Changed),
}

/// An incremental listing and what it builds on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changed {
    /// The previous snapshot's folder name (`snapshot=...`).
    pub base: String,
    /// Its rows.
    pub base_records: u64,
    /// Its parts.
    pub base_files: Vec<FileEntry>,
    /// The `$last_seen` from which profiles are listed, epoch milliseconds.
    pub since_ms: i64,
    /// When the last full listing began, epoch milliseconds (carried to the commit).
    pub last_full_ms: u64,
    /// The changed profiles' parts, once their listing is complete.
    #[serde(default)]
    pub delta: Option<Vec<FileEntry>>,
    /// The profiles Mixpanel holds, asked once the listing is complete.
    #[serde(default)]
    pub current: Option<u64>,
    /// Merges the deadline cut short so far (after [`MAX_CUT_MERGES`], every profile is
    /// listed instead: a listing resumes across invocations, a merge does not).
    #[serde(default)]
    pub merges_cut: u32,
}

/// Merges cut short by the deadline after which a snapshot lists every profile instead.
pub const MAX_CUT_MERGES: u32 = 2;

impl Changed {
    /// The `$last_seen` from which profiles are listed.
    pub fn since(&self) -> Timestamp {
        Timestamp::from_millisecond(self.since_ms).unwrap_or(Timestamp::UNIX_EPOCH)
    }
}

/// What an engage commit records in its slice, for the next snapshot to build on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// The committed snapshot's folder name.
    pub snapshot: String,
    /// `full` or `changed`.
    pub listing: String,
    /// When the last full listing began, epoch milliseconds.
    pub last_full_ms: u64,
    /// When the committed snapshot's listing began, epoch milliseconds (0: unknown, then its
    /// name tells, to the second; a name may be a second or two later than the start when
    /// snapshots follow each other within a second).
    #[serde(default)]
    pub started_ms: u64,
}

/// When the listing of `snapshot` began: `started_ms` when known, else the snapshot's name.
pub fn listing_start(started_ms: u64, snapshot: &str) -> Option<Timestamp> {
    match started_ms {
        0 => snapshot_start(snapshot),
        ms => Timestamp::from_millisecond(ms as i64).ok(),
    }
}

/// The state store document where a person's request for a full listing is kept.
fn request_document(table: Table) -> String {
    format!("full-listing/{table}")
}

#[derive(Serialize, Deserialize)]
struct Request {
    requested_at_ms: u64,
}

/// Records that the next snapshot of `table` (or the one in progress, if it is still listing
/// only changed profiles) is to list every profile.
pub async fn request_full(app: &App, table: Table) -> Result<()> {
    let name = request_document(table);
    let body = serde_json::to_string(&Request {
        requested_at_ms: app.clock.now_ms(),
    })
    .map_err(Error::state)?;
    for _ in 0..10 {
        let version = app.store.document(&name).await?.map(|(_, v)| v);
        if app.store.put_document(&name, &body, version).await? {
            return Ok(());
        }
    }
    Err(Error::state(format!(
        "could not record the request for a full {table} listing: the state store document {name} kept changing"
    )))
}

/// A person's request for a full listing of `table` now: recorded, and the table's snapshot
/// queued even if the last one is fresh (one in progress lists every profile from now on).
/// Returns whether a snapshot was queued by this call.
pub async fn start_full(app: &App, table: Table) -> Result<bool> {
    request_full(app, table).await?;
    app.store
        .enqueue(table, crate::state::SliceId::Full, Some(u64::MAX))
        .await
}

/// When a full listing of `table` was last asked for, epoch milliseconds.
pub async fn full_requested_ms(app: &App, table: Table) -> Result<Option<u64>> {
    Ok(app
        .store
        .document(&request_document(table))
        .await?
        .and_then(|(body, _)| serde_json::from_str::<Request>(&body).ok())
        .map(|r| r.requested_at_ms))
}

/// How the snapshot starting now lists the profiles of `engage`, and why (for the log).
pub async fn choose(
    app: &App,
    record: Option<&SliceRecord>,
    now: Timestamp,
) -> Result<(Listing, String)> {
    let full = |why: String| Ok((Listing::Full, why));
    let s = &app.settings;
    if s.engage_full_refresh.is_zero() {
        return full("ENGAGE_FULL_REFRESH_DAYS is 0".into());
    }
    let Some(prev) = record
        .and_then(|r| r.result.as_deref())
        .and_then(|t| serde_json::from_str::<Committed>(t).ok())
    else {
        return full("no committed snapshot to build on".into());
    };
    let now_ms = now.as_millisecond() as u64;
    let age_ms = now_ms.saturating_sub(prev.last_full_ms);
    if u128::from(age_ms) >= s.engage_full_refresh.as_millis() {
        return full(format!(
            "the last full listing began {} hours ago (ENGAGE_FULL_REFRESH_DAYS={})",
            age_ms / 3_600_000,
            s.engage_full_refresh.as_secs() / 86_400
        ));
    }
    if full_requested_ms(app, Table::Engage)
        .await?
        .is_some_and(|at| at > prev.last_full_ms)
    {
        return full("a full listing was asked for".into());
    }
    let manifest = match committed_manifest(app, Table::Engage, &prev.snapshot).await? {
        Ok(m) => m,
        Err(why) => return full(why),
    };
    let Some(started) = listing_start(prev.started_ms, &prev.snapshot) else {
        return full(format!("{} is not a snapshot name", prev.snapshot));
    };
    let margin = jiff::SignedDuration::try_from(s.engage_last_seen_margin).unwrap_or_default();
    let since = started - margin;
    let why = format!(
        "profiles whose $last_seen is at or after {since}, merged into {} ({} rows)",
        prev.snapshot, manifest.records
    );
    Ok((
        Listing::Changed(Changed {
            base: prev.snapshot,
            base_records: manifest.records,
            base_files: manifest.files,
            since_ms: since.as_millisecond(),
            last_full_ms: prev.last_full_ms,
            delta: None,
            current: None,
            merges_cut: 0,
        }),
        why,
    ))
}

/// The manifest of `snapshot`, the table's committed snapshot, if a next snapshot may build on
/// it: `_latest.json` names it and its manifest reads. Otherwise why not (for the log).
pub async fn committed_manifest(
    app: &App,
    table: Table,
    snapshot: &str,
) -> Result<std::result::Result<Manifest, String>> {
    let table_key = key(&app.prefix, table.as_str());
    let latest: Option<String> = app
        .sink
        .get(&format!("{table_key}/_latest.json"))
        .await?
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("snapshot")?.as_str().map(String::from));
    if latest.as_deref() != Some(snapshot) {
        return Ok(Err(format!(
            "_latest.json names {}, not the committed {snapshot}",
            latest.as_deref().unwrap_or("no snapshot")
        )));
    }
    Ok(app
        .sink
        .get(&format!("{table_key}/{snapshot}/_manifest.json"))
        .await?
        .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
        .ok_or_else(|| format!("the manifest of {snapshot} is missing or unreadable")))
}

/// The start of the snapshot `snapshot=YYYYMMDDTHHMMSSZ`.
pub fn snapshot_start(name: &str) -> Option<Timestamp> {
    let stamp = name.strip_prefix("snapshot=")?;
    jiff::fmt::strtime::parse("%Y%m%dT%H%M%SZ", stamp)
        .ok()?
        .to_datetime()
        .ok()
        .and_then(|dt| jiff::tz::TimeZone::UTC.to_timestamp(dt).ok())
}

/// The profiles Mixpanel holds now (page 0's `total` of an unfiltered one-profile page).
pub fn count_of(body: &[u8]) -> Result<u64> {
    let page = crate::tables::engage::parse_page(body)?;
    page.total.ok_or_else(|| {
        Error::new(
            ErrorKind::BadResponse,
            "engage answered page 0 of the profile count without a `total`",
        )
    })
}

/// How a merge ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Merged {
    /// Every row written: this many.
    Rows(u64),
    /// The deadline came first: nothing of it is kept, the merge starts over next time.
    Deadline,
    /// A part to merge is missing, unreadable, or not what its manifest says: the snapshot
    /// cannot be built on, and every profile is listed instead.
    Unusable(String),
}

/// Merges the previous snapshot's parts (in `base_folder`) and the changed profiles' parts
/// (in `delta_folder`) into `parts`: one row per distinct id, a changed profile's row in place
/// of its old one. An error is the spill's or the storage's (retried like any failure); a part
/// that can never be merged is [`Merged::Unusable`].
#[allow(clippy::too_many_arguments)]
pub async fn merge(
    app: &App,
    deadline: Instant,
    base_folder: &str,
    base: &[FileEntry],
    delta_folder: &str,
    delta: &[FileEntry],
    parts: &mut StreamingParts,
    ids: &mut Types,
) -> Result<Merged> {
    let mut spill = Spill::new()?;
    let keys = KeyHasher::default();
    // The previous rows lose to the changed ones (processing time 0 < 1); among the changed
    // rows of one profile, the last listed wins (the spill's delivery order).
    for (folder, files, newer) in [(base_folder, base, 0u64), (delta_folder, delta, 1)] {
        for f in files {
            let object = format!("{folder}/{}", f.name);
            let url = app.sink.url(&object);
            let Ok(body) = tokio::time::timeout_at(deadline, app.sink.get(&object)).await else {
                return Ok(Merged::Deadline);
            };
            let Some(body) = body? else {
                return Ok(Merged::Unusable(format!("{url} is missing")));
            };
            let (mut rows, mut bad, mut failed) = (0u64, None, None);
            let read = part::for_each_line(&f.name, &body, |line| {
                let Some(id) = row_id(line) else {
                    let excerpt: String = String::from_utf8_lossy(line).chars().take(120).collect();
                    bad = Some(format!("a row of {url} has no distinct_id: {excerpt:?}"));
                    return Err(Error::storage("stopped"));
                };
                ids.add(id.get());
                if let Err(e) = spill.push(Some(keys.key(id)), newer, line) {
                    failed = Some(e);
                    return Err(Error::storage("stopped"));
                }
                rows += 1;
                Ok(())
            });
            if let Some(e) = failed {
                return Err(e);
            }
            if let Some(why) = bad {
                return Ok(Merged::Unusable(why));
            }
            if let Err(e) = read {
                return Ok(Merged::Unusable(format!("{url} cannot be read: {e}")));
            }
            if rows != f.records {
                return Ok(Merged::Unusable(format!(
                    "{url} holds {rows} rows where its manifest says {}",
                    f.records
                )));
            }
        }
    }
    let mut records = 0u64;
    for bucket in spill.into_buckets()? {
        if Instant::now() >= deadline {
            return Ok(Merged::Deadline);
        }
        bucket.drain_deduplicated(|row| {
            parts.write(row);
            records += 1;
            true
        })?;
        parts.pump().await?;
    }
    Ok(Merged::Rows(records))
}

/// The distinct id of an engage row (`{"distinct_id": ..., ...}`, as this table writes it).
fn row_id(line: &[u8]) -> Option<&RawValue> {
    const PREFIX: &[u8] = b"{\"distinct_id\":";
    if let Some(rest) = line.strip_prefix(PREFIX) {
        let mut de = serde_json::Deserializer::from_slice(rest);
        if let Ok(v) = <&RawValue as Deserialize>::deserialize(&mut de) {
            return Some(v);
        }
    }
    #[derive(Deserialize)]
    struct Row<'a> {
        #[serde(borrow)]
        distinct_id: &'a RawValue,
    }
    serde_json::from_slice::<Row>(line)
        .ok()
        .map(|r| r.distinct_id)
}

/// 128-bit keys of distinct ids: the one profile whether its id came as `4` or `"4"`, or with
/// its characters escaped differently.
struct KeyHasher(foldhash::fast::FixedState, foldhash::fast::FixedState);

impl Default for KeyHasher {
    fn default() -> Self {
        KeyHasher(
            foldhash::fast::FixedState::with_seed(0x5EED_0E6A_6E01),
            foldhash::fast::FixedState::with_seed(0x5EED_0E6A_6E02),
        )
    }
}

impl KeyHasher {
    fn key(&self, id: &RawValue) -> u128 {
        let text = crate::tables::export::canonical(id);
        let mut a = self.0.build_hasher();
        let mut b = self.1.build_hasher();
        a.write(text.as_bytes());
        b.write(text.as_bytes());
        (u128::from(a.finish()) << 64) | u128::from(b.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_name_is_its_start() {
        assert_eq!(
            snapshot_start("snapshot=20261201T093000Z").map(|t| t.to_string()),
            Some("2026-12-01T09:30:00Z".to_string())
        );
        assert_eq!(snapshot_start("snapshot=2026-12-01"), None);
        assert_eq!(snapshot_start("date=2026-12-01"), None);
    }

    #[test]
    fn a_row_id_is_read_in_either_key_order_and_one_profile_has_one_key() {
        let a = row_id(b"{\"distinct_id\":4,\"x\":1}\n").unwrap();
        assert_eq!(a.get(), "4");
        let b = row_id(b"{\"x\":1,\"distinct_id\":\"4\"}\n").unwrap();
        assert_eq!(b.get(), "\"4\"");
        let k = KeyHasher::default();
        assert_eq!(k.key(a), k.key(b));
        let escaped = row_id(b"{\"distinct_id\":\"a\\/b\"}\n").unwrap();
        let plain = row_id(b"{\"distinct_id\":\"a/b\"}\n").unwrap();
        assert_eq!(k.key(escaped), k.key(plain));
        assert_ne!(k.key(plain), k.key(a));
        assert!(row_id(b"{\"x\":1}\n").is_none());
    }

    #[test]
    fn the_where_of_changed_profiles_names_last_seen_in_utc() {
        let since: Timestamp = "2026-12-01T09:30:05Z".parse().unwrap();
        assert_eq!(
            crate::tables::engage::changed_since(since),
            "properties[\"$last_seen\"] >= \"2026-12-01T09:30:05\""
        );
    }
}
