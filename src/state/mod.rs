//! Replication state: the slice queue with leases, bookmarks and discovered schemas.
//!
//! Two implementations with the same semantics: DynamoDB (conditional writes) for Lambda and a
//! locked JSON file for local use. The core only sees [`StateStore`].

pub mod dynamo;
pub mod local;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use jiff::civil::Date;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::tables::Table;

/// A unit of work of one table: a project-local day, some hours of one, or a whole snapshot.
///
/// Slices order by day, and a day's hour slices sit beside it (by first hour, then the day).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SliceId {
    /// One project-local day.
    Day(Date),
    /// Hours `[from_hour, to_hour)` of one project-local day (a day too big for one invocation).
    Hours {
        /// The day.
        day: Date,
        /// First hour, 0..=23.
        from_hour: u8,
        /// Hour after the last, 1..=24.
        to_hour: u8,
    },
    /// Minutes `[from, to)` of one hour of a project-local day, counted from the day's
    /// midnight: a piece of an hour Mixpanel could not export at once. Its instants are that
    /// share of the hour's real instants (so the pieces of an hour tile it across clock
    /// changes too).
    Minutes {
        /// The day.
        day: Date,
        /// First minute, 0..1440.
        from: u16,
        /// Minute after the last, within the same hour as `from`.
        to: u16,
    },
    /// A whole-table snapshot.
    Full,
}

impl SliceId {
    /// The project-local day of a date slice.
    pub fn day(&self) -> Option<Date> {
        match *self {
            SliceId::Day(d) | SliceId::Hours { day: d, .. } | SliceId::Minutes { day: d, .. } => {
                Some(d)
            }
            SliceId::Full => None,
        }
    }
}

impl SliceId {
    /// The sort key: the day, then the first and last minute (a whole day is minutes 0 to
    /// 1440).
    fn order_key(&self) -> (Option<Date>, u16, u16) {
        match *self {
            SliceId::Day(d) => (Some(d), 0, 1440),
            SliceId::Hours {
                day,
                from_hour,
                to_hour,
            } => (
                Some(day),
                u16::from(from_hour) * 60,
                u16::from(to_hour) * 60,
            ),
            SliceId::Minutes { day, from, to } => (Some(day), from, to),
            SliceId::Full => (None, 0, 0),
        }
    }

    /// The minutes `[from, to)` of its day a date slice covers.
    pub fn minutes(&self) -> Option<(u16, u16)> {
        match self.order_key() {
            (Some(_), from, to) => Some((from, to)),
            (None, ..) => None,
        }
    }
}

impl Ord for SliceId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order_key().cmp(&other.order_key())
    }
}

impl PartialOrd for SliceId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for SliceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SliceId::Day(d) => write!(f, "{d}"),
            SliceId::Hours {
                day,
                from_hour,
                to_hour,
            } => write!(f, "{day}T{from_hour:02}-{to_hour:02}"),
            SliceId::Minutes { day, from, to } => write!(
                f,
                "{day}T{:02}:{:02}-{:02}:{:02}",
                from / 60,
                from % 60,
                to / 60,
                to % 60
            ),
            SliceId::Full => f.write_str("full"),
        }
    }
}

impl FromStr for SliceId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "full" {
            return Ok(SliceId::Full);
        }
        let bad = || format!("not a slice id: {s:?}");
        match s.split_once('T') {
            None => Ok(SliceId::Day(s.parse().map_err(|_| bad())?)),
            Some((d, m)) if m.contains(':') => {
                let (a, b) = m.split_once('-').ok_or_else(bad)?;
                let minute = |t: &str| -> Result<u16, String> {
                    let (h, m) = t.split_once(':').ok_or_else(bad)?;
                    let (h, m): (u16, u16) =
                        (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
                    if m >= 60 {
                        return Err(bad());
                    }
                    Ok(h * 60 + m)
                };
                let (from, to) = (minute(a)?, minute(b)?);
                // A piece lies within one hour.
                if from >= to || to > 1440 || from / 60 != (to - 1) / 60 {
                    return Err(bad());
                }
                Ok(SliceId::Minutes {
                    day: d.parse().map_err(|_| bad())?,
                    from,
                    to,
                })
            }
            Some((d, h)) => {
                let (a, b) = h.split_once('-').ok_or_else(bad)?;
                let (from_hour, to_hour): (u8, u8) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if from_hour >= to_hour || to_hour > 24 {
                    return Err(bad());
                }
                Ok(SliceId::Hours {
                    day: d.parse().map_err(|_| bad())?,
                    from_hour,
                    to_hour,
                })
            }
        }
    }
}

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

/// The columns discovered for a table: output column name to JSON type name, and the
/// Mixpanel property of each column renamed to keep names unique when case is folded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schema {
    /// Column name → JSON type (`string`, `integer`, `number`, `boolean`, `object`, `array`, `null`),
    /// or several joined by `|` (`integer|string`) when the column held several.
    pub columns: BTreeMap<String, String>,
    /// Column name → the property key (as Mixpanel sent it) of a column whose name is not the
    /// key's own output name (`country__2` for `country` beside `Country`). Every other
    /// column holds the property its name says (`mp_reserved_x` holds `$x`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub renamed: BTreeMap<String, String>,
}

/// A column name as SQL engines compare names: case folded.
pub fn folded(name: &str) -> String {
    name.to_lowercase()
}

impl Schema {
    /// The property key a column holds.
    pub fn source_of(&self, column: &str) -> String {
        match self.renamed.get(column) {
            Some(key) => key.clone(),
            None => match column.strip_prefix("mp_reserved_") {
                Some(rest) => format!("${rest}"),
                None => column.to_string(),
            },
        }
    }

    /// `self` (the stored schema) plus what `new` brings. A column both have holds the union of
    /// their types. A new column is left out when its name folds to the name of a column already
    /// there, or its property already has a column: the one who brought it named it without
    /// knowing, and must use the stored names (see [`Schema::agrees_with`]).
    ///
    /// `fixed` are the table's own keys (export's `event`, `distinct_id`, `time`): columns that
    /// hold no property, so that a property of the same name (`event__2`) is not taken for
    /// theirs.
    pub fn merged(&self, new: &Schema, fixed: &[&str]) -> Schema {
        let mut merged = self.clone();
        let mut taken: std::collections::HashSet<String> =
            merged.columns.keys().map(|c| folded(c)).collect();
        let mut sources: std::collections::HashSet<String> = merged
            .columns
            .keys()
            .filter(|c| !fixed.contains(&c.as_str()))
            .map(|c| merged.source_of(c))
            .collect();
        for (name, kind) in &new.columns {
            if let Some(stored) = merged.columns.get_mut(name) {
                if self.source_of(name) == new.source_of(name) {
                    *stored = union_types(stored, kind);
                }
                continue;
            }
            let source = new.source_of(name);
            let property = !fixed.contains(&name.as_str());
            if !taken.insert(folded(name)) || (property && !sources.insert(source.clone())) {
                continue;
            }
            merged.columns.insert(name.clone(), kind.clone());
            if let Some(key) = new.renamed.get(name) {
                merged.renamed.insert(name.clone(), key.clone());
            }
        }
        merged
    }

    /// Whether every column of `self` is in `stored` under the same name for the same property:
    /// what was written with `self`'s names can be committed beside what `stored` describes.
    pub fn agrees_with(&self, stored: &Schema) -> bool {
        self.columns
            .keys()
            .all(|c| stored.columns.contains_key(c) && stored.source_of(c) == self.source_of(c))
    }
}

/// The union of two type names (`integer` and `string` → `integer|string`), see [`type_name`].
fn union_types(a: &str, b: &str) -> String {
    if a == b {
        return a.to_string();
    }
    type_name(a.split('|').chain(b.split('|')))
}

/// The type name of a column that held values of these JSON types: one type, or several joined
/// by `|` in name order. Nulls count only in a column of nothing else (every column may be
/// null); integers in a column that also held other numbers are numbers; `json` (a column
/// discovered before any value was seen) gives way to the types its values have.
pub fn type_name<'a>(types: impl IntoIterator<Item = &'a str>) -> String {
    let mut all: Vec<&str> = types.into_iter().filter(|t| !t.is_empty()).collect();
    all.sort_unstable();
    all.dedup();
    for placeholder in ["null", "json"] {
        if all.len() > 1 {
            all.retain(|t| *t != placeholder);
        }
    }
    if all.contains(&"number") {
        all.retain(|t| *t != "integer");
    }
    if all.is_empty() {
        return "string".into();
    }
    all.join("|")
}

/// The state store: every method is atomic on its own (conditional writes).
#[async_trait]
pub trait StateStore: Send + Sync {
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

    /// A small JSON document kept by the store (the request ledger), with its version.
    async fn document(&self, name: &str) -> Result<Option<(String, u64)>>;

    /// Writes a document only if its version is still `expected` (`None`: only if it does not
    /// exist yet); the new version is `expected + 1` (or 1). Returns whether it was written.
    async fn put_document(&self, name: &str, body: &str, expected: Option<u64>) -> Result<bool>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(columns: &[(&str, &str)], renamed: &[(&str, &str)]) -> Schema {
        Schema {
            columns: columns
                .iter()
                .map(|(c, t)| (c.to_string(), t.to_string()))
                .collect(),
            renamed: renamed
                .iter()
                .map(|(c, k)| (c.to_string(), k.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_merge_keeps_the_stored_names_and_the_union_of_the_types() {
        let stored = schema(
            &[("Country", "string"), ("n", "integer"), ("x", "null")],
            &[],
        );
        // Named without knowing: `country` folds to the stored `Country`.
        let theirs = schema(
            &[
                ("country", "string"),
                ("n", "string"),
                ("x", "boolean"),
                ("new", "number"),
            ],
            &[],
        );
        let merged = stored.merged(&theirs, &[]);
        assert_eq!(
            merged,
            schema(
                &[
                    ("Country", "string"),
                    ("n", "integer|string"),
                    ("x", "boolean"),
                    ("new", "number")
                ],
                &[]
            )
        );
        assert!(
            !theirs.agrees_with(&merged),
            "`country` must be named again"
        );
        // Named with the stored names: the renamed column joins, and a property that already
        // has a column cannot take a second one.
        let ours = schema(
            &[("country__2", "string"), ("n", "number")],
            &[("country__2", "country")],
        );
        let merged = stored.merged(&ours, &[]);
        assert!(ours.agrees_with(&merged), "{merged:?}");
        assert_eq!(merged.columns["n"], "number");
        assert_eq!(merged.source_of("country__2"), "country");
        let again = schema(&[("country__3", "string")], &[("country__3", "country")]);
        let merged = merged.merged(&again, &[]);
        assert!(!again.agrees_with(&merged), "{merged:?}");
        assert_eq!(merged.source_of("mp_reserved_city"), "$city");
        // A table's own key holds no property: a property named like it has its own column.
        let own = schema(
            &[("distinct_id", "string"), ("distinct_id__2", "string")],
            &[("distinct_id__2", "distinct_id")],
        );
        assert_eq!(Schema::default().merged(&own, &["distinct_id"]), own);
        assert_ne!(Schema::default().merged(&own, &[]), own);
    }

    #[test]
    fn slice_ids_read_back_as_written_and_pieces_sort_beside_their_hour() {
        let day: Date = "2026-11-01".parse().unwrap();
        let ids = [
            SliceId::Day(day),
            SliceId::Hours {
                day,
                from_hour: 23,
                to_hour: 24,
            },
            SliceId::Minutes {
                day,
                from: 13 * 60 + 15,
                to: 13 * 60 + 30,
            },
            SliceId::Minutes {
                day,
                from: 23 * 60 + 55,
                to: 1440,
            },
            SliceId::Full,
        ];
        for id in ids {
            assert_eq!(id.to_string().parse::<SliceId>(), Ok(id), "{id}");
        }
        assert_eq!(ids[2].to_string(), "2026-11-01T13:15-13:30");
        assert_eq!(ids[3].to_string(), "2026-11-01T23:55-24:00");
        // A piece lies within one hour, and is not empty.
        for bad in [
            "2026-11-01T13:50-14:10",
            "2026-11-01T13:30-13:30",
            "2026-11-01T13:60-14:00",
            "2026-11-01T23:55-24:05",
        ] {
            assert!(bad.parse::<SliceId>().is_err(), "{bad}");
        }
        let hour = SliceId::Hours {
            day,
            from_hour: 13,
            to_hour: 14,
        };
        let quarter = |q: u16| SliceId::Minutes {
            day,
            from: 13 * 60 + q * 15,
            to: 13 * 60 + q * 15 + 15,
        };
        let before = SliceId::Hours {
            day,
            from_hour: 12,
            to_hour: 13,
        };
        let after = SliceId::Hours {
            day,
            from_hour: 14,
            to_hour: 15,
        };
        for q in 0..4 {
            assert!(before < quarter(q) && quarter(q) < after, "{}", quarter(q));
        }
        assert!(quarter(0) < hour && hour < quarter(1));
        assert_eq!(quarter(1).minutes(), Some((795, 810)));
    }
}
