//! `cohort_members` across snapshots: a cohort whose `cohorts/list` entry (its `count` and
//! every other field, as returned) is unchanged since the previous snapshot, and whose members
//! were listed less than `ENGAGE_FULL_REFRESH_DAYS` ago, keeps its previous members instead of
//! being listed again. The others are listed in full, as always.
//!
//! This is exact for every cohort whose membership change moves its count or its entry. A
//! cohort whose members change at an equal count (one in, one out) and whose entry does not
//! change keeps the previous members until its members are listed again: at most
//! `ENGAGE_FULL_REFRESH_DAYS` later, or at once on `{"table": "cohort_members", "full": true}`.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::app::App;
use crate::error::{Error, Result};
use crate::run::commit::{FileEntry, key};
use crate::sink::part;
use crate::sink::streaming::StreamingParts;
use crate::state::SliceRecord;
use crate::tables::Table;
use crate::tables::json::Types;

/// A cohort as one snapshot saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The FNV-1a hash of its `cohorts/list` entry as returned (hex).
    pub fingerprint: String,
    /// When its members were last listed, epoch milliseconds.
    pub listed_ms: u64,
}

/// What a `cohort_members` snapshot reuses from the previous one; kept in its progress.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reuse {
    /// Every cohort of this snapshot, by id.
    pub cohorts: BTreeMap<u64, Mark>,
    /// The cohorts whose members are copied from the previous snapshot.
    pub copied: Vec<u64>,
    /// The previous snapshot's folder name, when some are.
    pub base: Option<String>,
    /// Its parts.
    pub base_files: Vec<FileEntry>,
    /// Whether the copy is done (its rows are in this snapshot's parts).
    pub done: bool,
    /// Copies the deadline cut short so far (see [`MAX_CUT_COPIES`]).
    #[serde(default)]
    pub copies_cut: u32,
}

/// What a `cohort_members` commit records in its slice, for the next snapshot to build on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// The committed snapshot's folder name.
    pub snapshot: String,
    /// Its cohorts, by id.
    pub cohorts: BTreeMap<u64, Mark>,
    /// When it began, epoch milliseconds (0: unknown, then its name tells).
    #[serde(default)]
    pub started_ms: u64,
}

/// The FNV-1a hash of a `cohorts/list` entry, as hex.
pub fn fingerprint(entry: &[u8]) -> String {
    let h = entry.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// Which of `entries` (each cohort's id and fingerprint, as `cohorts/list` returned them now)
/// keep their previous members, and which are listed. Returns the plan and why (for the log).
pub async fn plan(
    app: &App,
    record: Option<&SliceRecord>,
    entries: &[(u64, String)],
    now: Timestamp,
) -> Result<(Reuse, String)> {
    let now_ms = now.as_millisecond() as u64;
    let fresh = |why: String| {
        let cohorts = entries
            .iter()
            .map(|(id, f)| {
                (
                    *id,
                    Mark {
                        fingerprint: f.clone(),
                        listed_ms: now_ms,
                    },
                )
            })
            .collect();
        Ok((
            Reuse {
                cohorts,
                ..Reuse::default()
            },
            why,
        ))
    };
    let refresh = app.settings.engage_full_refresh;
    if refresh.is_zero() {
        return fresh("ENGAGE_FULL_REFRESH_DAYS is 0".into());
    }
    let Some(prev) = record
        .and_then(|r| r.result.as_deref())
        .and_then(|t| serde_json::from_str::<Committed>(t).ok())
    else {
        return fresh("no committed snapshot to build on".into());
    };
    let prev_start = super::changed::listing_start(prev.started_ms, &prev.snapshot)
        .map_or(0, |t| t.as_millisecond() as u64);
    if super::changed::full_requested_ms(app, Table::CohortMembers)
        .await?
        .is_some_and(|at| at > prev_start)
    {
        return fresh("a full listing was asked for".into());
    }
    let manifest = match super::changed::committed_manifest(
        app,
        Table::CohortMembers,
        &prev.snapshot,
    )
    .await?
    {
        Ok(m) => m,
        Err(why) => return fresh(why),
    };
    let (mut reuse, _) = fresh(String::new())?;
    for (id, f) in entries {
        if let Some(old) = prev.cohorts.get(id)
            && old.fingerprint == *f
            && u128::from(now_ms.saturating_sub(old.listed_ms)) < refresh.as_millis()
        {
            reuse.copied.push(*id);
            reuse.cohorts.insert(*id, old.clone());
        }
    }
    let why = format!(
        "{} of {} cohorts unchanged since {}: their members are kept",
        reuse.copied.len(),
        entries.len(),
        prev.snapshot
    );
    if !reuse.copied.is_empty() {
        reuse.base = Some(prev.snapshot);
        reuse.base_files = manifest.files;
    }
    Ok((reuse, why))
}

/// How a copy of the kept cohorts' members ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Copied {
    /// Every kept row written: this many.
    Rows(u64),
    /// The deadline came first: nothing of it is kept, the copy starts over next time.
    Deadline,
    /// A part of the previous snapshot is missing, unreadable or not what its manifest says:
    /// every cohort is listed instead.
    Unusable(String),
}

/// Copies made before the deadline cut them short, after which every cohort is listed.
pub const MAX_CUT_COPIES: u32 = 2;

impl Reuse {
    /// Keeps nothing: every cohort is listed (its members listed now). Returns the cohorts.
    pub fn list_all(&mut self, now: Timestamp) -> Vec<u64> {
        let now_ms = now.as_millisecond() as u64;
        for mark in self.cohorts.values_mut() {
            mark.listed_ms = now_ms;
        }
        self.copied.clear();
        self.base = None;
        self.base_files.clear();
        self.done = true;
        self.cohorts.keys().copied().collect()
    }
}

/// Copies the rows of the cohorts `reuse` keeps from the previous snapshot into `parts`. An
/// error is the storage's (retried like any failure).
pub async fn copy(
    app: &App,
    deadline: Instant,
    reuse: &Reuse,
    parts: &mut StreamingParts,
    ids: &mut Types,
) -> Result<Copied> {
    let Some(base) = &reuse.base else {
        return Ok(Copied::Rows(0));
    };
    let keep: BTreeSet<u64> = reuse.copied.iter().copied().collect();
    let folder = key(
        &app.prefix,
        &format!("{}/{base}", Table::CohortMembers.as_str()),
    );
    let mut copied = 0u64;
    for f in &reuse.base_files {
        let object = format!("{folder}/{}", f.name);
        let url = app.sink.url(&object);
        let Ok(body) = tokio::time::timeout_at(deadline, app.sink.get(&object)).await else {
            return Ok(Copied::Deadline);
        };
        let Some(body) = body? else {
            return Ok(Copied::Unusable(format!("{url} is missing")));
        };
        let (mut rows, mut bad) = (0u64, None);
        let read = part::for_each_line(&f.name, &body, |line| {
            #[derive(Deserialize)]
            struct Row<'a> {
                cohort_id: u64,
                #[serde(borrow)]
                distinct_id: &'a RawValue,
            }
            let row: Row = match serde_json::from_slice(line) {
                Ok(r) => r,
                Err(e) => {
                    bad = Some(format!("a row of {url} is not a cohort membership ({e})"));
                    return Err(Error::storage("stopped"));
                }
            };
            rows += 1;
            if keep.contains(&row.cohort_id) {
                ids.add(row.distinct_id.get());
                parts.write(line);
                copied += 1;
            }
            Ok(())
        });
        if let Some(why) = bad {
            return Ok(Copied::Unusable(why));
        }
        if let Err(e) = read {
            return Ok(Copied::Unusable(format!("{url} cannot be read: {e}")));
        }
        if rows != f.records {
            return Ok(Copied::Unusable(format!(
                "{url} holds {rows} rows where its manifest says {}",
                f.records
            )));
        }
        parts.pump().await?;
    }
    Ok(Copied::Rows(copied))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_is_stable_and_tells_entries_apart() {
        let a = br#"{"count":150,"id":1000,"name":"Cohort One"}"#;
        let b = br#"{"count":151,"id":1000,"name":"Cohort One"}"#;
        assert_eq!(fingerprint(a), fingerprint(a));
        assert_ne!(fingerprint(a), fingerprint(b));
        // The FNV-1a of the empty string: the same in every process and release.
        assert_eq!(fingerprint(b""), "cbf29ce484222325");
    }
}
