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
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::app::App;
use crate::commit::{self, FileEntry};
use crate::error::{Error, ErrorKind, Result};
use crate::mixpanel::without_url;
use crate::sink::part::{PartEvent, PartWriter};
use crate::spill::{Spill, SpillWriter};
use crate::state::{Lease, Schema, SliceId};
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

/// How many times a slice's body is fetched again after a transient failure in one invocation.
const FETCH_ATTEMPTS: u32 = 3;

/// A slice that runs out of time while its parts are written is split into hours only from
/// this size on.
const SPLIT_ON_WRITE_MIN_BYTES: u64 = 1 << 20;

/// How the OS says that a file system is full (ENOSPC).
const NO_SPACE: &str = "No space left on device";

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
pub async fn export_slice(app: &App, lease: &Lease, deadline: Instant) -> Result<Exported> {
    let s = &app.settings;
    let now = Timestamp::now();
    let today = export::export_today(&s.timezone, s.export_time_mode, now);
    let window = export::window(
        lease.slice,
        &s.timezone,
        s.export_time_mode,
        today,
        s.export_events.clone(),
    )?;
    let known = if s.select_properties_by_default {
        None
    } else {
        app.store.schema(Table::Export).await?
    };

    let mut attempt = 0;
    let started = Instant::now();
    let read = AtomicU64::new(0);
    let (pass1, body_began) = loop {
        let began = OnceLock::new();
        attempt += 1;
        let transformer = Transformer::new(
            s.timezone.clone(),
            s.export_time_mode,
            &window,
            known.as_ref(),
        );
        match fetch_into_spill(app, &window.query, transformer, deadline, &read, &began).await {
            Ok(p) => break (p, began.get().copied().unwrap_or(started)),
            // The body flowed for most of the invocation and did not end: too big. (A slow
            // answer, retries or rate-limit waits say nothing of the size: the slice is then
            // simply tried again whole.)
            Err(e)
                if e.kind() == ErrorKind::Deadline
                    && read.load(Ordering::Relaxed) > 0
                    && began
                        .get()
                        .is_some_and(|b| b.elapsed() >= started.elapsed() / 2) =>
            {
                return Ok(Exported::TooBig(format!(
                    "the export body of {} did not end within the invocation ({:.1} MB read in {:.1} s)",
                    lease.slice,
                    read.load(Ordering::Relaxed) as f64 / 1e6,
                    started.elapsed().as_secs_f64()
                )));
            }
            // The spill (about the raw size) outgrew the temporary storage: an hour's fits.
            Err(e) if e.kind() == ErrorKind::Storage && e.message().contains(NO_SPACE) => {
                return Ok(Exported::TooBig(format!(
                    "the spill of {} outgrew the temporary storage ({:.1} MB read): {e}",
                    lease.slice,
                    read.load(Ordering::Relaxed) as f64 / 1e6
                )));
            }
            Err(e)
                if e.kind() == ErrorKind::Transient
                    && attempt < FETCH_ATTEMPTS
                    && Instant::now() < deadline =>
            {
                tracing::warn!(table = "export", slice = %lease.slice, attempt, error = %e, "fetching the slice again");
                tokio::time::sleep(crate::mixpanel::backoff(
                    std::time::Duration::from_millis(500),
                    attempt,
                ))
                .await;
            }
            Err(e) => return Err(e),
        }
    };

    // First discovery of the columns when only known properties are kept.
    let observed = pass1.schema.clone();
    if !s.select_properties_by_default && known.is_none() {
        let stored = app.store.init_schema(Table::Export, &observed).await?;
        if observed
            .columns
            .keys()
            .any(|c| !stored.columns.contains_key(c))
        {
            return Err(Error::transient(
                "another invocation discovered the export columns first; the slice will be fetched again with them",
            ));
        }
    }

    let (folder, partition) = commit::date_partition(&app.prefix, Table::Export, lease.slice)?;
    let pass1_done = Instant::now();
    // Writing the parts takes about as long as reading did when reading was bound by our CPU,
    // and less when Mixpanel's sending was slower (then at most the time of a slow writer):
    // when that no longer fits, the slice is too big for one invocation, and starting would
    // only leave parts to remove. (Should it still run late, pass 2 stops at the deadline.)
    let pass1_took = pass1_done - body_began;
    let pass2_needs = pass1_took.min(
        Duration::from_secs_f64(pass1.raw_bytes as f64 / PASS2_SLOW_BYTES_PER_SEC)
            + Duration::from_millis(200),
    );
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
    let (files, duplicates) = match write_parts(
        app,
        &lease.owner,
        &folder,
        pass1.spill,
        pass1.raw_bytes,
        deadline,
    )
    .await
    {
        Ok(written) => written,
        Err(e) if e.kind() == ErrorKind::Deadline => {
            // Writing a small slice late says the storage is slow, not that it is big:
            // smaller slices would only make more uploads.
            if body_began.elapsed() < started.elapsed() / 2
                || pass1.raw_bytes < SPLIT_ON_WRITE_MIN_BYTES
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
        raw_bytes = pass1.raw_bytes,
        pass1_ms = (pass1_done - started).as_millis() as u64,
        pass2_ms = pass1_done.elapsed().as_millis() as u64,
        workers = workers(),
        "slice read, deduplicated and written"
    );
    let result = SliceResult {
        records: files.iter().map(|f| f.records).sum(),
        bytes: files.iter().map(|f| f.bytes).sum(),
        files: files.len() as u64,
        duplicates,
        raw_bytes: pass1.raw_bytes,
    };
    let mut recorded = Recorded {
        raw_bytes: result.raw_bytes,
        // The time the size took (from the first byte on), not waits for answers or retries.
        ms: body_began.elapsed().as_millis() as u64,
        records: result.records,
        duplicates,
        files: Vec::new(),
    };
    if let SliceId::Hours { .. } = lease.slice {
        // An hour's parts wait, recorded with the hour, for the day's manifest.
        recorded.files = files.clone();
        if let Err(e) = commit::complete(app.store.as_ref(), lease, Some(&recorded.to_json())).await
        {
            // Lost the lease: the hour is another attempt's, these parts are leftovers. Any
            // other failure may have recorded them after all: they stay, and the day's commit
            // removes whatever its manifest does not list.
            if commit::lease_lost(&e) {
                remove_parts(app, &folder, &files).await;
            }
            return Err(e);
        }
    } else {
        let committed = commit::commit(
            app.store.as_ref(),
            app.sink.as_ref(),
            lease,
            &folder,
            &partition,
            files.clone(),
            Some(&recorded.to_json()),
        )
        .await;
        if let Err(e) = committed {
            // Once this attempt's manifest is written its parts are what the day's readers
            // follow: they stay, whatever failed after (the slice is replicated again, and
            // that commit replaces them). Before that, they are this attempt's leftovers.
            if !manifest_is_ours(app, &folder, &lease.owner).await {
                remove_parts(app, &folder, &files).await;
            }
            return Err(e);
        }
        commit::advance_bookmark(app.store.as_ref(), Table::Export, s.start_date).await?;
    }
    if s.select_properties_by_default {
        let schema = app.store.merge_schema(Table::Export, &observed).await?;
        commit::write_schema(app.sink.as_ref(), &app.prefix, Table::Export, &schema).await?;
    } else if let Some(schema) = app.store.schema(Table::Export).await? {
        commit::write_schema(app.sink.as_ref(), &app.prefix, Table::Export, &schema).await?;
    }
    Ok(Exported::Done(result))
}

/// The spill and what pass 1 learned.
struct Pass1 {
    spill: Spill,
    raw_bytes: u64,
    schema: Schema,
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
    transformer: Transformer,
    deadline: Instant,
    read_so_far: &AtomicU64,
    body_began: &OnceLock<Instant>,
) -> Result<Pass1> {
    let resp = tokio::time::timeout_at(deadline, app.mixpanel.export(query, deadline))
        .await
        .map_err(|_| deadline_error())??;
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
    let mut body = resp.bytes_stream();
    let read = async {
        let mut raw_bytes = 0u64;
        let mut block = BytesMut::with_capacity(BLOCK_BYTES + 64 * 1024);
        let mut seq = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                Error::transient(format!("the export body broke off: {}", without_url(&e)))
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
                    // A worker stopped on a bad line; its error is the one to report.
                    return Ok(raw_bytes);
                }
                seq += 1;
            }
        }
        if !block.is_empty() {
            // The last line may lack its newline; it must still be complete JSON.
            let _ = sender.send((seq, block.freeze())).await;
        }
        Ok::<u64, Error>(raw_bytes)
    };
    let read = tokio::time::timeout_at(deadline, read).await;
    drop(sender);
    let mut shards = Vec::with_capacity(n);
    let mut merged: Option<Transformer> = None;
    let mut failure = None;
    for w in workers {
        match w.await {
            Ok(Ok((shard, t))) => {
                shards.push(shard);
                match merged.as_mut() {
                    Some(m) => m.merge(t),
                    None => merged = Some(t),
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
    match read {
        Err(_) => Err(Error::new(
            ErrorKind::Deadline,
            "the invocation's deadline came before the export body ended",
        )),
        Ok(Err(e)) => Err(e),
        Ok(Ok(raw_bytes)) => match (failure, merged) {
            (Some(e), _) => Err(e),
            (None, Some(t)) => Ok(Pass1 {
                spill: Spill::from_shards(shards),
                raw_bytes,
                schema: t.schema(),
            }),
            (None, None) => Err(Error::transient("no export worker ran")),
        },
    }
}

fn deadline_error() -> Error {
    Error::new(
        ErrorKind::Deadline,
        "the invocation's deadline came before the export body ended; the slice stays pending",
    )
}

/// A transform worker of pass 1: blocks of whole lines → records in its shard of the spill.
fn transform_blocks(
    rx: &Mutex<mpsc::Receiver<(u64, Bytes)>>,
    mut t: Transformer,
) -> Result<(SpillWriter, Transformer)> {
    let mut spill = SpillWriter::new()?;
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
            let mut handle = |line: &[u8], line_no: u64| -> Result<()> {
                out.clear();
                match t.transform(line, &mut out)? {
                    LineOutcome::Record { key, processing_ms } => {
                        spill.push(key, processing_ms, base | line_no, &out)
                    }
                    LineOutcome::OutOfRange | LineOutcome::Blank => Ok(()),
                }
            };
            for end in memchr::memchr_iter(b'\n', &block) {
                handle(&block[start..end], line_no)?;
                line_no += 1;
                start = end + 1;
            }
            if start < block.len() {
                handle(&block[start..], line_no)?;
            }
        }
    };
    if let Err(e) = run() {
        // Stop the reader and the other workers: the slice has failed.
        if let Ok(mut rx) = rx.lock() {
            rx.close();
        }
        return Err(e);
    }
    Ok((spill, t))
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
        failure = Some(Error::new(
            ErrorKind::Deadline,
            "the invocation's deadline came while the parts were written",
        ));
    }
    if let Some(e) = failure {
        remove_parts(app, folder, &files).await;
        return Err(e);
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((files, duplicates))
}

/// Uploads one part writer's parts in order; on a failure it aborts the open part, tells every
/// writer to stop, and returns the parts finished so far with the error.
async fn upload_parts(
    app: &App,
    folder: &str,
    mut rx: mpsc::Receiver<PartEvent>,
    stop: &AtomicBool,
) -> (Vec<FileEntry>, Option<Error>) {
    let mut files = Vec::new();
    let mut current: Option<(String, Box<dyn crate::sink::Upload>)> = None;
    let mut failure = None;
    while let Some(event) = rx.recv().await {
        let step: Result<()> = async {
            match event {
                PartEvent::Begin(name) => {
                    let upload = app
                        .sink
                        .start_upload(&format!("{folder}/{name}"), content_type(&name))
                        .await?;
                    current = Some((name, upload));
                }
                PartEvent::Data(bytes) => {
                    if let Some((_, up)) = current.as_mut() {
                        up.write(bytes).await?;
                    }
                }
                PartEvent::End { name, records } => {
                    if let Some((_, up)) = current.take() {
                        let bytes = up.finish().await?;
                        files.push(FileEntry {
                            name,
                            records,
                            bytes,
                        });
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = step {
            failure = Some(e);
            stop.store(true, Ordering::Relaxed);
            break;
        }
    }
    drop(rx);
    // A part still open was left unfinished (a failure somewhere): nothing of it may remain.
    if let Some((_, up)) = current.take() {
        let _ = up.abort().await;
    }
    (files, failure)
}

fn content_type(name: &str) -> &'static str {
    if name.ends_with(".gz") {
        "application/gzip"
    } else {
        "application/x-ndjson"
    }
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
