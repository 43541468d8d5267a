//! Replicating one claimed export slice: fetch and transform into a spill file while
//! deduplicating (pass 1), then write the surviving records as parts (pass 2), then commit.
//!
//! Nothing reaches the sink before the whole body was read and every line parsed, so a
//! `terminated early` or cut body never leaves parts behind; the slice is simply fetched again.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::app::App;
use crate::error::{Cause, Error, ErrorKind, Result};
use crate::mixpanel::without_url;
use crate::retry::{Decision, Policy};
use crate::run::commit::{self, FileEntry};
use crate::run::setaside::{self, Aside, BodyShape, Rejected};
use crate::run::spill::{DayShards, Spill};
use crate::sink::part::{PartEvent, PartWriter};
use crate::sink::streaming::Uploads;
use crate::state::{Lease, Schema, SliceId, SliceRecord};
use crate::tables::Table;
use crate::tables::export::{self, LineOutcome, Transformer};

/// What a committed slice produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceResult {
    /// Records written (after deduplication).
    pub records: u64,
    /// Stored bytes of the parts.
    pub bytes: u64,
    /// Parts written.
    pub files: u64,
    /// Duplicate deliveries dropped.
    pub duplicates: u64,
    /// Raw (uncompressed) bytes of the export body.
    pub raw_bytes: u64,
    /// Source lines that could not be used, kept raw under `_rejected/`.
    pub rejected: u64,
}

impl SliceResult {
    /// Adds another slice's counts (the days of a window, the hours of a day).
    pub fn add(&mut self, other: &SliceResult) {
        self.records += other.records;
        self.bytes += other.bytes;
        self.files += other.files;
        self.duplicates += other.duplicates;
        self.raw_bytes += other.raw_bytes;
        self.rejected += other.rejected;
    }
}

/// What a committed export slice records in the state store (its `result`): how big and how
/// slow it was, which plans the next round of its day and its neighbours, and for an hour
/// slice the parts that its day's manifest will list once every hour is done.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// Raw bytes of the export body.
    pub raw_bytes: u64,
    /// Milliseconds of reading, deduplicating and writing.
    pub ms: u64,
    /// Records written.
    pub records: u64,
    /// Duplicate deliveries dropped.
    pub duplicates: u64,
    /// The parts of an hour slice (a day's parts are in its manifest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileEntry>,
    /// Source lines that could not be used, kept raw under `_rejected/`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rejected: u64,
    /// The parts of an hour slice's rejected lines (a day's are in its manifest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected_files: Vec<FileEntry>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Recorded {
    /// Reads a slice's recorded result; `None` when there is none or it is not ours.
    pub fn parse(result: Option<&str>) -> Option<Recorded> {
        serde_json::from_str(result?).ok()
    }

    /// The JSON the state store keeps.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// How an export slice ended.
#[derive(Debug)]
pub enum Exported {
    /// Written and committed (an hour slice: recorded for its day).
    Done(SliceResult),
    /// The deadline came while the body was flowing or the parts were written: the slice is too
    /// big for one invocation. Nothing was committed.
    TooBig(String),
}

/// Mixpanel's signs that a request is too heavy (`terminated early`, a cut body, `Timeout
/// Error`, a 5xx, no first byte), for the same whole-day request in a row, after which the day
/// is split into hours: the same request tends to fail the same way again.
const HEAVY_SIGNALS_TO_SPLIT: u32 = 2;

/// The longest wait for the first byte of an export (also at most a third of the time left):
/// Mixpanel thinking for minutes is a sign of a day too heavy to export at once.
const FIRST_BYTE_WAIT_MAX: Duration = Duration::from_secs(180);

/// The shortest such wait: a slow answer within it is only slow (and the deadline, when
/// nearer, ends the attempt as a deadline, not as Mixpanel's sign).
const FIRST_BYTE_WAIT_MIN: Duration = Duration::from_secs(30);

/// A slice that runs out of time while its parts are written is split into hours only from
/// this size on.
const SPLIT_ON_WRITE_MIN_BYTES: u64 = 1 << 20;

/// What pass 2 says when the deadline stopped it.
const WRITING: &str = "the invocation's deadline came while the parts were written";

/// Raw bytes per second that pass 2 (deduplicate, compress, upload) surely keeps up on one
/// slow core: a tenth of what it measures (BENCHMARKS.md).
const PASS2_SLOW_BYTES_PER_SEC: f64 = 25e6;

/// Below this much raw JSONL a slice's parts are written by one worker: one part (a file per
/// small day, not one per core) in a few tens of milliseconds more than on every core.
const PARALLEL_WRITE_MIN_BYTES: u64 = 32 << 20;

/// Replicates and commits the export slice held by `lease`, stopping before `deadline`.
///
/// A day is committed with its manifest; an hour slice of a day too big for one invocation is
/// recorded in the state store with its parts, and its day is committed when every hour is.
/// `before` is the slice as claimed: its failed attempts in a row that were Mixpanel's signs of
/// a request too heavy count towards splitting it, and its shrink guard is forced after a
/// person retried it.
pub async fn export_slice(
    app: &App,
    lease: &Lease,
    before: Option<&SliceRecord>,
    deadline: Instant,
) -> Result<Exported> {
    let prior_signals = heavy_signals(before);
    let guard = commit::ShrinkGuard::for_slice(app.settings.shrink_guard_percent, before);
    let s = &app.settings;
    let today = export::export_today(&s.timezone, s.export_time_mode, app.clock.now());
    let window = export::window(
        lease.slice,
        &s.timezone,
        s.export_time_mode,
        today,
        s.export_events.clone(),
    )?;
    let known = known_schema(app).await?;
    let heavy = Heavy {
        signals: prior_signals,
        split: !crate::plan::pieces(lease.slice).is_empty(),
        whole_day: matches!(lease.slice, SliceId::Day(_)),
    };
    let fetched = match fetch(app, lease.slice, &window, &[], &known, heavy, deadline).await? {
        Fetch::Read(f) => f,
        Fetch::TooBig(why) => return Ok(Exported::TooBig(why)),
    };
    let Fetched {
        pass1,
        started,
        body_began,
    } = fetched;
    let observed = pass1.schema.clone();
    discover(app, known.stored().is_none(), &observed).await?;

    let pass1_done = Instant::now();
    if let SliceId::Day(d) = lease.slice {
        // Its size is known now: another worker may plan a window after it while it is written.
        let ms = (pass1_done - body_began).as_millis() as u64;
        app.read_sizes.note(d, pass1.raw_bytes, ms);
    }
    // Writing the parts takes about as long as reading did when reading was bound by our CPU,
    // and less when Mixpanel's sending was slower (then at most the time of a slow writer):
    // when that no longer fits, the slice is too big for one invocation, and starting would
    // only leave parts to remove. (Should it still run late, pass 2 stops at the deadline.)
    let pass1_took = pass1_done - body_began;
    let pass2_needs = pass1_took.min(pass2_at_least(pass1.raw_bytes));
    if pass1_done + pass2_needs > deadline {
        if pass1_took < pass1_done.duration_since(started) / 2 {
            // Most of the time went to waiting (answers, retries, a busy machine), not to this
            // slice's data: it is tried again whole.
            return Err(Error::new(
                ErrorKind::Deadline,
                "the invocation's deadline is too near to write the slice; it stays pending",
            ));
        }
        return Ok(Exported::TooBig(format!(
            "{} took {:.1} s to read ({:.1} MB) and the invocation has {:.1} s left to write it",
            lease.slice,
            pass1_took.as_secs_f64(),
            pass1.raw_bytes as f64 / 1e6,
            deadline.saturating_duration_since(pass1_done).as_secs_f64()
        )));
    }
    let raw_bytes = pass1.raw_bytes;
    let Some((spill, _)) = pass1.days.into_iter().next() else {
        return Err(Error::transient("no spill of the slice"));
    };
    let day = DayBody {
        spill,
        raw_bytes,
        rejected: pass1.rejected,
    };
    // The time the size took (from the first byte on), not waits for answers or retries.
    let ms = || body_began.elapsed().as_millis() as u64;
    let result = match write_day(app, lease, guard, day, ms, deadline, Bookmark::Advance).await {
        Ok(r) => r,
        Err(e) if e.cause() == Some(Cause::DeadlineWhileWriting) => {
            // Writing a small slice late says the storage is slow, not that it is big:
            // smaller slices would only make more uploads.
            if body_began.elapsed() < started.elapsed() / 2 || raw_bytes < SPLIT_ON_WRITE_MIN_BYTES
            {
                return Err(e);
            }
            return Ok(Exported::TooBig(format!("{}: {e}", lease.slice)));
        }
        Err(e) => return Err(e),
    };
    tracing::debug!(
        table = "export",
        slice = %lease.slice,
        raw_bytes,
        pass1_ms = (pass1_done - started).as_millis() as u64,
        pass2_ms = pass1_done.elapsed().as_millis() as u64,
        workers = workers(),
        "slice read, deduplicated and written"
    );
    store_schema(app).await?;
    Ok(Exported::Done(result))
}

/// The export schema in the state store when a slice begins: the names its columns are
/// written under, and the columns kept when only known properties are
/// (`MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT=false`).
pub(crate) struct Known {
    stored: Option<Schema>,
    select_all: bool,
}

impl Known {
    /// The stored schema.
    pub fn stored(&self) -> Option<&Schema> {
        self.stored.as_ref()
    }

    /// The columns kept, when only known properties are.
    pub fn allowed(&self) -> Option<&Schema> {
        if self.select_all {
            None
        } else {
            self.stored.as_ref()
        }
    }
}

/// The export schema in the state store (see [`Known`]).
pub(crate) async fn known_schema(app: &App) -> Result<Known> {
    Ok(Known {
        stored: app.store.schema(Table::Export).await?,
        select_all: app.settings.select_properties_by_default,
    })
}

/// The slice's (or window's) count of Mixpanel's signs of a request too heavy, and whether
/// they may split it.
#[derive(Clone, Copy)]
pub(crate) struct Heavy {
    /// Failed attempts in a row that were such signs, before this invocation.
    pub signals: u32,
    /// Whether the slice is split into smaller pieces after [`HEAVY_SIGNALS_TO_SPLIT`].
    pub split: bool,
    /// Whether it is a whole day (for the message).
    pub whole_day: bool,
}

/// A body read whole (pass 1), and when.
pub(crate) struct Fetched {
    pub pass1: Pass1,
    /// When the first request was sent.
    pub started: Instant,
    /// When the body that was read began.
    pub body_began: Instant,
}

/// How fetching a slice's (or window's) body ended, short of an error.
pub(crate) enum Fetch {
    Read(Fetched),
    /// Too big for this invocation (the deadline or the disk); nothing was kept.
    TooBig(String),
}

/// Pass 1 of `what`: the body of `window` read into the spill (per day of a multi-day window
/// when `bounds` are given), fetched again once when Mixpanel cuts it off.
pub(crate) async fn fetch(
    app: &App,
    what: impl std::fmt::Display,
    window: &export::ExportWindow,
    bounds: &[i64],
    known: &Known,
    heavy: Heavy,
    deadline: Instant,
) -> Result<Fetch> {
    let s = &app.settings;
    let mut signals = heavy.signals;
    let started = Instant::now();
    let read = AtomicU64::new(0);
    let read = &read;
    // Set when an error says the slice is too big rather than failed.
    let mut too_big = None;
    let fetched = Policy::EXPORT_FETCH
        .run(
            None,
            |_| async move {
                let began = OnceLock::new();
                let mut transformer = Transformer::new(
                    s.timezone.clone(),
                    s.export_time_mode,
                    window,
                    known.allowed(),
                )
                .named(known.stored());
                if bounds.len() > 2 {
                    transformer = transformer.routed(bounds);
                }
                // A slice that has not begun yet (an hour of today still to come), or that
                // holds no instant (the hour the clocks skip on a 23-hour day), holds no event:
                // Mixpanel is not asked, and the slice is written empty (a day of today is
                // refreshed later).
                let begun =
                    window.start <= app.clock.now().as_second() && window.start < window.end;
                match fetch_into_spill(
                    app,
                    &window.query,
                    begun,
                    transformer,
                    deadline,
                    read,
                    &began,
                )
                .await
                {
                    Ok(pass1) => Ok(Fetched {
                        pass1,
                        started,
                        body_began: began.get().copied().unwrap_or(started),
                    }),
                    Err(e) => Err((e, began.get().copied())),
                }
            },
            |(e, began), _| {
                // The body flowed for most of the invocation and did not end: too big. (A slow
                // answer, retries or rate-limit waits say nothing of the size: the slice is
                // then simply tried again whole.)
                if e.kind() == ErrorKind::Deadline
                    && read.load(Ordering::Relaxed) > 0
                    && began.is_some_and(|b| b.elapsed() >= started.elapsed() / 2)
                {
                    too_big = Some(format!(
                        "the export body of {what} did not end within the invocation ({:.1} MB read in {:.1} s)",
                        read.load(Ordering::Relaxed) as f64 / 1e6,
                        started.elapsed().as_secs_f64()
                    ));
                    return Decision::GiveUp;
                }
                // The spill (about the raw size) outgrew the temporary storage: an hour's fits.
                if e.cause() == Some(Cause::NoSpace) {
                    too_big = Some(format!(
                        "the spill of {what} outgrew the temporary storage ({:.1} MB read): {e}",
                        read.load(Ordering::Relaxed) as f64 / 1e6
                    ));
                    return Decision::GiveUp;
                }
                if e.kind() != ErrorKind::Transient {
                    return Decision::GiveUp;
                }
                signals += 1;
                if signals >= HEAVY_SIGNALS_TO_SPLIT && heavy.split {
                    let what_is = if heavy.whole_day {
                        "the whole day"
                    } else {
                        "the range"
                    };
                    too_big = Some(format!(
                        "Mixpanel failed the export of {what_is} {what} {signals} times in a row (last: {e})"
                    ));
                    return Decision::GiveUp;
                }
                // The attempts are the policy's, and none begins once the deadline has come.
                // (The policy is given no deadline: the wait before the next attempt is short,
                // and that attempt ends at the deadline if it comes meanwhile.)
                if Instant::now() >= deadline {
                    Decision::GiveUp
                } else {
                    Decision::Retry
                }
            },
            |(e, _), attempt, _| {
                tracing::warn!(table = "export", slice = %what, attempt, error = %e, "fetching the slice again");
            },
        )
        .await;
    match (fetched, too_big) {
        (Ok(fetched), _) => Ok(Fetch::Read(fetched)),
        (Err(_), Some(why)) => Ok(Fetch::TooBig(why)),
        (Err((e, _)), None) => Err(e),
    }
}

/// First discovery of the columns when only known properties are kept (`first`: none were
/// known when the body was read).
///
/// Then claims the column names the body was written with: the stored schema takes the new
/// ones unless another invocation named the same properties (or names folding to the same)
/// first, in which case nothing of the body is committed and the slice is fetched again with
/// the stored names.
pub(crate) async fn discover(app: &App, first: bool, observed: &Schema) -> Result<()> {
    if !app.settings.select_properties_by_default && first {
        first_discovery(app, observed).await?;
    }
    let stored = app.store.merge_schema(Table::Export, observed).await?;
    if !observed.agrees_with(&stored) {
        return Err(Error::transient(
            "another invocation named new export columns first; the slice will be fetched again with their names",
        ));
    }
    Ok(())
}

async fn first_discovery(app: &App, observed: &Schema) -> Result<()> {
    let stored = app.store.init_schema(Table::Export, observed).await?;
    // (System properties are kept whatever was discovered.)
    if observed
        .columns
        .keys()
        .any(|c| !stored.columns.contains_key(c) && !export::is_system_column(c))
    {
        return Err(Error::transient(
            "another invocation discovered the export columns first; the slice will be fetched again with them",
        ));
    }
    Ok(())
}

/// Writes `_schema.json` (and the Glue table) after a commit, from the schema as stored now:
/// [`discover`] merged this body's columns before its parts were written, and other
/// invocations may have added theirs since, which a schema kept from then would leave out.
pub(crate) async fn store_schema(app: &App) -> Result<()> {
    let schema = app.store.schema(Table::Export).await?.unwrap_or_default();
    commit::publish_schema(app, Table::Export, &schema).await
}

/// The time pass 2 surely takes for `raw_bytes` of a slice on one slow core.
pub(crate) fn pass2_at_least(raw_bytes: u64) -> Duration {
    Duration::from_secs_f64(raw_bytes as f64 / PASS2_SLOW_BYTES_PER_SEC)
        + Duration::from_millis(200)
}

/// One day's (or slice's) share of a body read whole: its records, raw bytes and rejected lines.
pub(crate) struct DayBody {
    pub spill: Spill,
    pub raw_bytes: u64,
    pub rejected: Rejected,
}

/// Pass 2 and the commit of the slice `lease` holds: its parts and rejected lines written,
/// then (a day) its manifest under the lease and the bookmark, or (an hour, a piece) its
/// record with its parts. `ms` is the time to record, asked once the parts are written.
pub(crate) async fn write_day(
    app: &App,
    lease: &Lease,
    guard: commit::ShrinkGuard,
    body: DayBody,
    ms: impl FnOnce() -> u64,
    deadline: Instant,
    bookmark: Bookmark,
) -> Result<SliceResult> {
    let s = &app.settings;
    let (folder, partition) = commit::date_partition(&app.prefix, Table::Export, lease.slice)?;
    let (files, duplicates) = write_parts(
        app,
        &lease.owner,
        &folder,
        body.spill,
        body.raw_bytes,
        deadline,
    )
    .await?;
    let rejected_folder = commit::rejected_folder(&app.prefix, Table::Export, lease.slice)?;
    let rejected_lines = body.rejected.count;
    let rejected = match write_rejected(app, &lease.owner, &rejected_folder, body.rejected).await {
        Ok(parts) => commit::RejectedParts {
            folder: rejected_folder,
            lines: rejected_lines,
            files: parts,
        },
        Err(e) => {
            remove_parts(app, &folder, &files).await;
            return Err(e);
        }
    };
    if rejected.lines > 0 {
        tracing::warn!(
            table = "export", slice = %lease.slice, rejected = rejected.lines, folder = %rejected.folder,
            "export lines that could not be used are kept raw"
        );
    }
    let result = SliceResult {
        records: files.iter().map(|f| f.records).sum(),
        bytes: files.iter().map(|f| f.bytes).sum(),
        files: files.len() as u64,
        duplicates,
        raw_bytes: body.raw_bytes,
        rejected: rejected.lines,
    };
    let mut recorded = Recorded {
        raw_bytes: result.raw_bytes,
        ms: ms(),
        records: result.records,
        duplicates,
        files: Vec::new(),
        rejected: rejected.lines,
        rejected_files: Vec::new(),
    };
    if !matches!(lease.slice, SliceId::Day(_)) {
        // An hour's (or a piece's) parts wait, recorded with it, for the day's manifest.
        recorded.files = files.clone();
        recorded.rejected_files = rejected.files.clone();
        if let Err(e) = commit::complete(
            app.store.as_ref(),
            app.clock.as_ref(),
            lease,
            Some(&recorded.to_json()),
        )
        .await
        {
            // Lost the lease: the hour is another attempt's, these parts are leftovers. Any
            // other failure may have recorded them after all: they stay, and the day's commit
            // removes whatever its manifest does not list.
            if commit::lease_lost(&e) {
                remove_parts(app, &folder, &files).await;
                remove_parts(app, &rejected.folder, &rejected.files).await;
            }
            return Err(e);
        }
    } else {
        let committed = commit::commit_with_rejected(
            app.store.as_ref(),
            app.sink.as_ref(),
            app.clock.as_ref(),
            lease,
            &folder,
            &partition,
            files.clone(),
            &rejected,
            Some(&recorded.to_json()),
            guard,
        )
        .await;
        if let Err(e) = committed {
            // Once this attempt's manifest is written its parts are what the day's readers
            // follow: they stay, whatever failed after (the slice is replicated again, and
            // that commit replaces them). Before that, they are this attempt's leftovers.
            if !manifest_is_ours(app, &folder, &lease.owner).await {
                remove_parts(app, &folder, &files).await;
                remove_parts(app, &rejected.folder, &rejected.files).await;
            }
            return Err(e);
        }
        if bookmark == Bookmark::Advance {
            crate::plan::advance_bookmark(app.store.as_ref(), Table::Export, s.start_date).await?;
        }
    }
    Ok(result)
}

/// Whether [`write_day`] moves the table's bookmark after a day's commit.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bookmark {
    /// After this day.
    Advance,
    /// Not: its caller does once for several days (a window's).
    Leave,
}

/// The slice's failed attempts in a row that were Mixpanel's signs of a request too heavy
/// (`Transient`: cut off, `terminated early`, `Timeout Error`, 5xx, no first byte).
fn heavy_signals(before: Option<&SliceRecord>) -> u32 {
    before
        .filter(|r| {
            r.error
                .as_ref()
                .is_some_and(|e| e.kind == ErrorKind::Transient.as_str())
        })
        .map_or(0, |r| r.failures)
}

/// The spill and what pass 1 learned.
pub(crate) struct Pass1 {
    /// Per day of the window (one for a single slice): its spill and its records' raw bytes.
    pub days: Vec<(Spill, u64)>,
    /// Raw bytes of the whole body.
    pub raw_bytes: u64,
    pub schema: Schema,
    /// Lines no event could be made of, raw, for `_rejected/`.
    pub rejected: Rejected,
}

/// Raw bytes of export lines handed to a transform worker at a time (cut at a line end).
const BLOCK_BYTES: usize = 256 * 1024;

/// The longest export line accepted.
const MAX_LINE_BYTES: usize = 16 << 20;

/// Blocks queued for each transform worker.
const BLOCKS_QUEUED: usize = 2;

/// Worker threads of each pass: one per available core (the CPU share on Lambda), at most 4.
pub fn workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

/// Reads the export body, transforming each line into the spill file and indexing dedup keys.
///
/// The async reader (HTTP and gunzip) cuts the body into blocks of whole lines and deals them
/// out to one transform worker per core; each worker fills its own shard of the spill, and the
/// block and line numbers keep the delivery order that deduplication needs for ties.
async fn fetch_into_spill(
    app: &App,
    query: &crate::mixpanel::ExportQuery,
    ask: bool,
    transformer: Transformer,
    deadline: Instant,
    read_so_far: &AtomicU64,
    body_began: &OnceLock<Instant>,
) -> Result<Pass1> {
    let mut body = if ask {
        let first_byte_wait = (deadline.saturating_duration_since(Instant::now()) / 3)
            .clamp(FIRST_BYTE_WAIT_MIN, FIRST_BYTE_WAIT_MAX);
        let resp = tokio::time::timeout_at(
            deadline,
            app.mixpanel.export(query, first_byte_wait, deadline),
        )
        .await
        .map_err(|_| deadline_error())??;
        resp.bytes_stream().boxed()
    } else {
        futures_util::stream::empty().boxed()
    };
    let _ = body_began.set(Instant::now());
    let n = workers();
    // One queue that every worker takes from, so that a busy worker never holds up the others.
    let (sender, rx) = mpsc::channel::<(u64, Bytes)>(BLOCKS_QUEUED * n);
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::with_capacity(n);
    let mut transformer = Some(transformer);
    for w in 0..n {
        let t = match transformer.as_ref() {
            Some(t) if w + 1 < n => t.fork(),
            _ => transformer
                .take()
                .ok_or_else(|| Error::transient("no transformer"))?,
        };
        let rx = rx.clone();
        workers.push(tokio::task::spawn_blocking(move || {
            transform_blocks(&rx, t)
        }));
    }
    drop(rx);
    let read = async {
        let mut raw_bytes = 0u64;
        let mut block = BytesMut::with_capacity(BLOCK_BYTES + 64 * 1024);
        let mut seq = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                if e.is_decode() && raw_bytes == 0 {
                    // Not one byte decoded: not a body cut off, a body that is not what its
                    // encoding says (not the gzip it claims).
                    Error::new(
                        ErrorKind::BadResponse,
                        format!("the export body cannot be decoded: {}", without_url(&e)),
                    )
                } else {
                    Error::transient(format!("the export body broke off: {}", without_url(&e)))
                }
            })?;
            raw_bytes += chunk.len() as u64;
            read_so_far.store(raw_bytes, Ordering::Relaxed);
            block.extend_from_slice(&chunk);
            // Mixpanel events are at most about 1 MB: a line past the cap is garbage, and
            // reading on would hold it whole in memory.
            if block.len() > MAX_LINE_BYTES && memchr::memchr(b'\n', &block).is_none() {
                return Err(Error::new(
                    ErrorKind::BadResponse,
                    format!(
                        "the export body has a line longer than {} MiB; no Mixpanel event is that large",
                        MAX_LINE_BYTES >> 20
                    ),
                ));
            }
            if block.len() >= BLOCK_BYTES
                && let Some(end) = memchr::memrchr(b'\n', &block)
            {
                let whole = block.split_to(end + 1).freeze();
                block.reserve(BLOCK_BYTES + 64 * 1024);
                if sender.send((seq, whole)).await.is_err() {
                    // A worker stopped (`terminated early`); its error is the one to report.
                    return Ok((raw_bytes, None));
                }
                seq += 1;
            }
        }
        let mut unterminated = None;
        if !block.is_empty() {
            // The last line may lack its newline: if it then breaks off, the body was cut.
            if !block.ends_with(b"\n") {
                let lines = memchr::memchr_iter(b'\n', &block).count() as u64;
                unterminated = Some((seq << 32) | lines);
            }
            let _ = sender.send((seq, block.freeze())).await;
        }
        Ok::<(u64, Option<u64>), Error>((raw_bytes, unterminated))
    };
    let read = tokio::time::timeout_at(deadline, read).await;
    drop(sender);
    let mut shards = Vec::with_capacity(n + 1);
    let mut asides = Vec::new();
    let mut lines: Vec<u32> = Vec::new();
    let mut used = 0u64;
    let mut merged: Option<Transformer> = None;
    let mut failure = None;
    for w in workers {
        match w.await {
            Ok(Ok(worked)) => {
                shards.push(worked.spill);
                used += worked.used;
                if worked.aside.entries() > 0 {
                    asides.push(worked.aside);
                }
                for (block, n) in worked.blocks {
                    let i = block as usize;
                    if lines.len() <= i {
                        lines.resize(i + 1, 0);
                    }
                    lines[i] = n;
                }
                match merged.as_mut() {
                    Some(m) => m.merge(worked.transformer),
                    None => merged = Some(worked.transformer),
                }
            }
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(e) => {
                failure.get_or_insert(Error::transient(format!("export worker failed: {e}")));
            }
        }
    }
    let (raw_bytes, unterminated_last) = match read {
        Err(_) => {
            return Err(Error::new(
                ErrorKind::Deadline,
                "the invocation's deadline came before the export body ended",
            ));
        }
        Ok(Err(e)) => return Err(e),
        Ok(Ok(read)) => read,
    };
    if let Some(e) = failure {
        return Err(e);
    }
    let Some(mut t) = merged else {
        return Err(Error::transient("no export worker ran"));
    };
    let mut rejected = Rejected::default();
    if !asides.is_empty() {
        // The body is complete: join the pieces of split events, reject what is left.
        let shape = BodyShape {
            lines,
            unterminated_last,
        };
        let (fixed, back) = tokio::task::spawn_blocking(move || {
            let fixed = setaside::fix_up(&mut t, asides, &shape);
            (fixed, t)
        })
        .await
        .map_err(|e| Error::transient(format!("export fix-up failed: {e}")))?;
        t = back;
        let fixed = fixed?;
        tracing::debug!(
            table = "export",
            joined = fixed.joined,
            rejected = fixed.rejected.count,
            "lines that did not parse: events joined from several lines, lines rejected"
        );
        used += fixed.used;
        shards.push(fixed.spill);
        rejected = fixed.rejected;
    }
    // A body in which no line is an event is not an export (an HTML page, an error object
    // answered with 200): one clear error, nothing committed. (A real body's unusable lines
    // sit among events; an hour may have few events, so no share of them decides.)
    if rejected.count > 0 && used == 0 {
        return Err(rejected.error());
    }
    Ok(Pass1 {
        days: DayShards::into_days(shards),
        raw_bytes,
        schema: t.schema(),
        rejected,
    })
}

fn deadline_error() -> Error {
    Error::new(
        ErrorKind::Deadline,
        "the invocation's deadline came before the export body ended; the slice stays pending",
    )
}

/// What a transform worker of pass 1 leaves.
struct Worked {
    spill: DayShards,
    transformer: Transformer,
    /// Lines it could not use, with the blank lines next to them.
    aside: Aside,
    /// (block number, lines) of each block it took.
    blocks: Vec<(u64, u32)>,
    /// Lines that became records or fell outside the slice.
    used: u64,
}

/// A transform worker of pass 1: blocks of whole lines → records in its shard of the spill;
/// lines that cannot be used as they are go aside for the fix-up ([`setaside`]).
fn transform_blocks(rx: &Mutex<mpsc::Receiver<(u64, Bytes)>>, t: Transformer) -> Result<Worked> {
    let mut w = Worked {
        spill: DayShards::new(t.days()),
        transformer: t,
        aside: Aside::default(),
        blocks: Vec::new(),
        used: 0,
    };
    let mut out = Vec::with_capacity(64 * 1024);
    let mut run = || -> Result<()> {
        loop {
            let next = match rx.lock() {
                Ok(mut rx) => rx.blocking_recv(),
                Err(_) => None,
            };
            let Some((block_seq, block)) = next else {
                return Ok(());
            };
            let base = block_seq << 32;
            let mut start = 0usize;
            let mut line_no = 0u64;
            // Blank lines are kept next to set-aside ones (a string may hold "\n\n"), and at
            // the start of a block (the previous block may end inside a string).
            let mut after_aside = true;
            let mut blanks = 0usize;
            let mut handle = |line: &[u8], line_no: u64| -> Result<()> {
                out.clear();
                match w.transformer.transform(line, &mut out)? {
                    LineOutcome::Record { key, processing_ms } => {
                        w.used += 1;
                        after_aside = false;
                        let day = w.transformer.day();
                        w.spill
                            .push(day, key, processing_ms, base | line_no, &out, line.len())
                    }
                    LineOutcome::OutOfRange => {
                        w.used += 1;
                        after_aside = false;
                        Ok(())
                    }
                    LineOutcome::Blank => {
                        if after_aside && blanks < setaside::MAX_PIECES {
                            blanks += 1;
                            return w.aside.push(base | line_no, line);
                        }
                        after_aside = false;
                        Ok(())
                    }
                    LineOutcome::Unusable(_) => {
                        after_aside = true;
                        blanks = 0;
                        w.aside.push(base | line_no, line)
                    }
                }
            };
            for end in memchr::memchr_iter(b'\n', &block) {
                handle(&block[start..end], line_no)?;
                line_no += 1;
                start = end + 1;
            }
            if start < block.len() {
                handle(&block[start..], line_no)?;
                line_no += 1;
            }
            w.blocks.push((block_seq, line_no as u32));
        }
    };
    if let Err(e) = run() {
        // Stop the reader and the other workers: the slice has failed.
        if let Ok(mut rx) = rx.lock() {
            rx.close();
        }
        return Err(e);
    }
    Ok(w)
}

/// Pass 2: the spill's surviving records → compressed parts uploaded as they fill.
///
/// One worker per core takes buckets in turn, deduplicates each and compresses its survivors
/// into its own parts (numbered from one shared counter); each worker's parts are uploaded by
/// their own loop, so the uploads of several workers overlap. A slice of less than
/// [`PARALLEL_WRITE_MIN_BYTES`] (`raw_bytes`) has one worker.
async fn write_parts(
    app: &App,
    attempt: &str,
    folder: &str,
    spill: Spill,
    raw_bytes: u64,
    deadline: Instant,
) -> Result<(Vec<FileEntry>, u64)> {
    let buckets = tokio::task::spawn_blocking(move || spill.into_buckets())
        .await
        .map_err(|e| Error::storage(format!("spill failed: {e}")))??;
    let cores = if raw_bytes < PARALLEL_WRITE_MIN_BYTES {
        1
    } else {
        workers()
    };
    let n = cores.min(buckets.len()).max(1);
    let queue = Arc::new(Mutex::new(buckets.into_iter()));
    let next_index = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // At the deadline every writer stops; the parts written so far are then removed.
    let timed_out = Arc::new(AtomicBool::new(false));
    let watchdog = tokio::spawn({
        let stop = stop.clone();
        let timed_out = timed_out.clone();
        async move {
            tokio::time::sleep_until(deadline).await;
            timed_out.store(true, Ordering::SeqCst);
            stop.store(true, Ordering::SeqCst);
        }
    });
    let mut producers = Vec::with_capacity(n);
    let mut receivers = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = mpsc::channel::<PartEvent>(4);
        receivers.push(rx);
        let s = app.settings.clone();
        let attempt_id = attempt.to_string();
        let queue = queue.clone();
        let next_index = next_index.clone();
        let stop = stop.clone();
        producers.push(tokio::task::spawn_blocking(
            move || -> Result<(u64, bool)> {
                let compress = || -> Result<(u64, bool)> {
                    let emit = |e| !stop.load(Ordering::Relaxed) && tx.blocking_send(e).is_ok();
                    let mut writer = PartWriter::shared(
                        &attempt_id,
                        next_index,
                        s.compression,
                        s.max_file_bytes,
                        emit,
                    );
                    let mut open = true;
                    let mut duplicates = 0;
                    loop {
                        let bucket = queue.lock().map(|mut q| q.next()).unwrap_or(None);
                        let Some(bucket) = bucket else { break };
                        duplicates += bucket.drain_deduplicated(|record| {
                            open = writer.write(record);
                            open
                        })?;
                        if !open {
                            break;
                        }
                    }
                    if open {
                        // A refused end (the uploader stopped) leaves the last part unfinished.
                        open = writer.finish();
                    }
                    // Whether every record of this worker's buckets went into a finished part.
                    Ok((duplicates, open))
                };
                let result = compress();
                if result.is_err() {
                    // The other workers stop too; this worker's open part is aborted by its loop.
                    stop.store(true, Ordering::Relaxed);
                }
                result
            },
        ));
    }

    let uploads = receivers
        .into_iter()
        .map(|rx| upload_parts(app, folder, rx, &stop));
    let outcomes = futures_util::future::join_all(uploads).await;
    let mut files = Vec::new();
    let mut failure = None;
    for (done, err) in outcomes {
        files.extend(done);
        if let Some(e) = err {
            failure.get_or_insert(e);
        }
    }
    let mut duplicates = 0;
    let mut complete = true;
    for p in producers {
        match p.await {
            Ok(Ok((d, whole))) => {
                duplicates += d;
                complete &= whole;
            }
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(e) => {
                failure.get_or_insert(Error::storage(format!("part writer failed: {e}")));
            }
        }
    }
    watchdog.abort();
    // Once the stop was given, a writer may have lost its last part's end (its events are then
    // refused): whatever seems written, the slice is incomplete.
    if failure.is_none() && (!complete || timed_out.load(Ordering::SeqCst)) {
        failure =
            Some(Error::new(ErrorKind::Deadline, WRITING).with_cause(Cause::DeadlineWhileWriting));
    }
    if let Some(e) = failure {
        remove_parts(app, folder, &files).await;
        return Err(e);
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((files, duplicates))
}

/// Writes the rejected lines, raw and one per line, as parts of `folder` (the table's
/// compression; rolling over at the same size). Nothing when there are none.
async fn write_rejected(
    app: &App,
    attempt: &str,
    folder: &str,
    rejected: Rejected,
) -> Result<Vec<FileEntry>> {
    if rejected.count == 0 {
        return Ok(Vec::new());
    }
    let (tx, rx) = mpsc::channel::<PartEvent>(4);
    let (compression, max) = (app.settings.compression, app.settings.max_file_bytes);
    let attempt = attempt.to_string();
    let producer = tokio::task::spawn_blocking(move || -> Result<bool> {
        let mut writer =
            PartWriter::new(&attempt, compression, max, |e| tx.blocking_send(e).is_ok());
        let mut open = true;
        rejected.drain(|line| {
            open = writer.write(line);
            open
        })?;
        Ok(open && writer.finish())
    });
    let stop = AtomicBool::new(false);
    let (files, failure) = upload_parts(app, folder, rx, &stop).await;
    let written = match producer.await {
        Ok(Ok(whole)) => whole,
        Ok(Err(e)) => {
            remove_parts(app, folder, &files).await;
            return Err(e);
        }
        Err(e) => {
            remove_parts(app, folder, &files).await;
            return Err(Error::storage(format!("rejected-lines writer failed: {e}")));
        }
    };
    if let Some(e) = failure {
        remove_parts(app, folder, &files).await;
        return Err(e);
    }
    if !written {
        remove_parts(app, folder, &files).await;
        return Err(Error::storage(
            "the rejected lines' parts were not all written",
        ));
    }
    Ok(files)
}

/// Uploads one part writer's parts in order; on a failure it aborts the open part, tells every
/// writer to stop, and returns the parts finished so far with the error.
async fn upload_parts(
    app: &App,
    folder: &str,
    mut rx: mpsc::Receiver<PartEvent>,
    stop: &AtomicBool,
) -> (Vec<FileEntry>, Option<Error>) {
    let mut uploads = Uploads::new(app.sink.clone(), folder.to_string(), Vec::new());
    let mut failure = None;
    while let Some(event) = rx.recv().await {
        if let Err(e) = uploads.apply(event).await {
            failure = Some(e);
            stop.store(true, Ordering::Relaxed);
            break;
        }
    }
    drop(rx);
    // A part still open was left unfinished (a failure somewhere): nothing of it may remain.
    uploads.abort().await;
    (uploads.files, failure)
}

/// Whether the partition's manifest is this attempt's (a commit that failed after writing it).
/// When the manifest cannot be read, the parts are kept: a later commit removes leftovers.
async fn manifest_is_ours(app: &App, folder: &str, attempt: &str) -> bool {
    match app.sink.get(&format!("{folder}/_manifest.json")).await {
        Ok(Some(body)) => {
            serde_json::from_slice::<commit::Manifest>(&body).is_ok_and(|m| m.attempt == attempt)
        }
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Best-effort removal of an attempt's parts after a failure (a later commit removes leftovers).
async fn remove_parts(app: &App, folder: &str, files: &[FileEntry]) {
    let keys: Vec<String> = files
        .iter()
        .map(|f| format!("{folder}/{}", f.name))
        .collect();
    if !keys.is_empty()
        && let Err(e) = app.sink.delete(&keys).await
    {
        tracing::warn!(error = %e, "could not remove the parts of a failed attempt; the next commit removes them");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExportTimeMode;
    use crate::state::SliceId;
    use jiff::tz::TimeZone;

    /// Runs pass 1's workers and fix-up on `blocks` as the reader would have cut them.
    pub(super) fn pass1_of(
        blocks: &[&[u8]],
        workers: usize,
    ) -> Result<(Vec<String>, Vec<Vec<u8>>)> {
        let day: jiff::civil::Date = "2020-10-13".parse().unwrap();
        let w = export::window(
            SliceId::Day(day),
            &TimeZone::UTC,
            ExportTimeMode::Utc,
            day,
            None,
        )
        .unwrap();
        let t = Transformer::new(TimeZone::UTC, ExportTimeMode::Utc, &w, None);
        let (tx, rx) = mpsc::channel::<(u64, Bytes)>(blocks.len().max(1));
        for (i, b) in blocks.iter().enumerate() {
            tx.try_send((i as u64, Bytes::copy_from_slice(b))).unwrap();
        }
        drop(tx);
        let rx = Mutex::new(rx);
        let done: Vec<Result<Worked>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    let t = t.fork();
                    let rx = &rx;
                    s.spawn(move || transform_blocks(rx, t))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut t = t;
        let (mut shards, mut asides, mut lines) = (Vec::new(), Vec::new(), vec![0; blocks.len()]);
        for worked in done {
            let worked = worked?;
            shards.push(worked.spill);
            asides.push(worked.aside);
            for (b, n) in worked.blocks {
                lines[b as usize] = n;
            }
        }
        let last = blocks.last().filter(|b| !b.ends_with(b"\n")).map(|b| {
            ((blocks.len() as u64 - 1) << 32) | memchr::memchr_iter(b'\n', b).count() as u64
        });
        let fixed = setaside::fix_up(
            &mut t,
            asides,
            &BodyShape {
                lines,
                unterminated_last: last,
            },
        )?;
        shards.push(fixed.spill);
        let mut rows = Vec::new();
        let mut days = DayShards::into_days(shards);
        days.remove(0).0.drain_deduplicated(|r| {
            rows.push(String::from_utf8(r.to_vec()).unwrap());
            true
        })?;
        rows.sort();
        let mut rejected = Vec::new();
        fixed.rejected.drain(|l| {
            rejected.push(l.to_vec());
            true
        })?;
        Ok((rows, rejected))
    }

    pub(super) fn row(event: &str, extra: &str) -> String {
        format!(
            "{{\"event\":\"{event}\",\"distinct_id\":null,\"time\":\"2020-10-13T17:48:31Z\"{extra}}}\n"
        )
    }

    /// An event split by raw line breaks is joined whichever blocks (and workers) its pieces
    /// went to; a `\r\n` and an empty line inside the string come back exactly; what no event
    /// can be made of is rejected raw, in body order.
    #[test]
    fn pieces_of_an_event_in_different_blocks_are_joined() {
        let blocks: [&[u8]; 5] = [
            b"{\"event\":\"a\",\"properties\":{\"time\":1602611311}}\n{\"event\":\"split\",\"properties\":{\"time\":1602611311,\"note\":\"first\n",
            b"second\"}}\nnot json\r\n{\"event\":\"crlf\",\"properties\":{\"time\":1602611311,\"note\":\"p1\r\n\n",
            b"p2\"}}\n\n{\"event\":\"tab\",\"properties\":{\"time\":1602611311,\"t\":\"x\ty\"}}\n{\"event\":\"inner\",\"properties\":{\"time\":1602611311,\"n\":\"1\n2\n3\"}}\n",
            b"{\"event\":\"no properties\"}\n{\"event\":\"dangling\",\"properties\":{\"time\":1602611311,\"s\":\"x\n",
            b"{\"event\":\"last\",\"properties\":{\"time\":1602611311}}",
        ];
        let expected = vec![
            row("a", ""),
            row("crlf", ",\"note\":\"p1\\r\\n\\np2\""),
            row("inner", ",\"n\":\"1\\n2\\n3\""),
            row("last", ""),
            row("split", ",\"note\":\"first\\nsecond\""),
            row("tab", ",\"t\":\"x\\ty\""),
        ];
        let rejected: Vec<Vec<u8>> = vec![
            b"not json\r\n".to_vec(),
            b"{\"event\":\"no properties\"}\n".to_vec(),
            b"{\"event\":\"dangling\",\"properties\":{\"time\":1602611311,\"s\":\"x\n".to_vec(),
        ];
        for workers in [1, 2, 3] {
            let (rows, rej) = pass1_of(&blocks, workers).unwrap();
            assert_eq!(rows, expected, "{workers} workers");
            assert_eq!(rej, rejected, "{workers} workers");
        }
    }

    /// A body whose last line lacks its newline and breaks off was cut, not sent whole.
    #[test]
    fn a_last_line_that_breaks_off_is_a_cut_body() {
        let e = pass1_of(
            &[b"{\"event\":\"a\",\"properties\":{\"time\":1602611311}}\n{\"event\":\"b\",\"prop"],
            2,
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Transient);
        assert!(e.message().contains("cut off"), "{e}");
    }
}

#[cfg(test)]
mod no_line_is_lost {
    use super::tests::pass1_of;
    use proptest::prelude::*;

    /// A line that is no event and cannot become part of one (no `properties` in it).
    fn garbage() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>().prop_filter("one line", |b| *b != b'\n'), 0..60)
            .prop_filter("no event", |l| {
                !l.windows(10).any(|w| w == b"properties")
                    && !String::from_utf8_lossy(l).contains("terminated early")
            })
    }

    fn is_blank(l: &[u8]) -> bool {
        l.strip_suffix(b"\r")
            .unwrap_or(l)
            .iter()
            .all(u8::is_ascii_whitespace)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]

        /// Whatever the bytes and wherever the body is cut into blocks, every line is a
        /// record, blank, or rejected exactly as it came: none panics, none is lost.
        #[test]
        fn every_line_is_a_record_blank_or_rejected(
            lines in prop::collection::vec(prop_oneof![garbage(), Just(Vec::new()), Just(b"good".to_vec())], 0..40),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
            workers in 1..4usize,
        ) {
            let mut body = Vec::new();
            let mut rows = Vec::new();
            let mut rejected = Vec::new();
            for (i, l) in lines.iter().enumerate() {
                let line = if l == b"good" {
                    let r = format!(r#"{{"event":"e{i}","properties":{{"time":1602611311}}}}"#);
                    rows.push(super::tests::row(&format!("e{i}"), ""));
                    r.into_bytes()
                } else {
                    if !is_blank(l) {
                        rejected.push([&l[..], b"\n"].concat());
                    }
                    l.clone()
                };
                body.extend_from_slice(&line);
                body.push(b'\n');
            }
            rows.sort();
            // Blocks end at line ends, as the reader cuts them.
            let ends: Vec<usize> = memchr::memchr_iter(b'\n', &body).map(|e| e + 1).collect();
            let mut at: Vec<usize> = cuts.iter().filter(|_| !ends.is_empty()).map(|c| ends[c.index(ends.len())]).collect();
            at.push(0);
            at.push(body.len());
            at.sort();
            at.dedup();
            let blocks: Vec<&[u8]> = at.windows(2).map(|w| &body[w[0]..w[1]]).collect();
            match pass1_of(&blocks, workers) {
                Ok((got_rows, got_rejected)) => {
                    prop_assert_eq!(got_rows, rows);
                    prop_assert_eq!(got_rejected, rejected);
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
        }
    }
}
