//! Replicating one claimed export slice: fetch and transform into a spill file while
//! deduplicating (pass 1), then write the surviving records as parts (pass 2), then commit.
//!
//! Nothing reaches the sink before the whole body was read and every line parsed, so a
//! `terminated early` or cut body never leaves parts behind; the slice is simply fetched again.

use bytes::Bytes;
use futures_util::StreamExt;
use jiff::Timestamp;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::app::App;
use crate::commit::{self, FileEntry};
use crate::error::{Error, ErrorKind, Result};
use crate::mixpanel::without_url;
use crate::sink::part::{PartEvent, PartWriter};
use crate::spill::Spill;
use crate::state::{Lease, Schema};
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

/// How many times a slice's body is fetched again after a transient failure in one invocation.
const FETCH_ATTEMPTS: u32 = 3;

/// Replicates and commits the export slice held by `lease`, stopping before `deadline`.
pub async fn export_slice(app: &App, lease: &Lease, deadline: Instant) -> Result<SliceResult> {
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
    let pass1 = loop {
        attempt += 1;
        let transformer = Transformer::new(
            s.timezone.clone(),
            s.export_time_mode,
            &window,
            known.as_ref(),
        );
        match fetch_into_spill(app, &window.query, transformer, deadline).await {
            Ok(p) => break p,
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
    let (files, duplicates) = write_parts(app, &lease.owner, &folder, pass1.spill).await?;
    let result = SliceResult {
        records: files.iter().map(|f| f.records).sum(),
        bytes: files.iter().map(|f| f.bytes).sum(),
        files: files.len() as u64,
        duplicates,
        raw_bytes: pass1.raw_bytes,
    };
    let committed = commit::commit(
        app.store.as_ref(),
        app.sink.as_ref(),
        lease,
        &folder,
        &partition,
        files.clone(),
    )
    .await;
    if let Err(e) = committed {
        remove_parts(app, &folder, &files).await;
        return Err(e);
    }
    commit::advance_bookmark(app.store.as_ref(), Table::Export, s.start_date).await?;
    if s.select_properties_by_default {
        let schema = app.store.merge_schema(Table::Export, &observed).await?;
        commit::write_schema(app.sink.as_ref(), &app.prefix, Table::Export, &schema).await?;
    } else if let Some(schema) = app.store.schema(Table::Export).await? {
        commit::write_schema(app.sink.as_ref(), &app.prefix, Table::Export, &schema).await?;
    }
    Ok(result)
}

/// The spill and what pass 1 learned.
struct Pass1 {
    spill: Spill,
    raw_bytes: u64,
    schema: Schema,
}

/// Reads the export body, transforming each line into the spill file and indexing dedup keys.
async fn fetch_into_spill(
    app: &App,
    query: &crate::mixpanel::ExportQuery,
    transformer: Transformer,
    deadline: Instant,
) -> Result<Pass1> {
    let resp = tokio::time::timeout_at(deadline, app.mixpanel.export(query, deadline))
        .await
        .map_err(|_| deadline_error())??;
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let worker = tokio::task::spawn_blocking(move || pass1(rx, transformer));
    let mut body = resp.bytes_stream();
    let read = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                Error::transient(format!("the export body broke off: {}", without_url(&e)))
            })?;
            if tx.send(chunk).await.is_err() {
                // The worker stopped on a bad line; its error is the one to report.
                break;
            }
        }
        Ok::<(), Error>(())
    };
    let read = tokio::time::timeout_at(deadline, read).await;
    drop(tx);
    let joined = worker
        .await
        .map_err(|e| Error::transient(format!("export worker failed: {e}")));
    match read {
        Err(_) => Err(Error::new(
            ErrorKind::Deadline,
            "the invocation's deadline came before the export body ended",
        )),
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) => joined?,
    }
}

fn deadline_error() -> Error {
    Error::new(
        ErrorKind::Deadline,
        "the invocation's deadline came before the export body ended; the slice stays pending",
    )
}

/// Blocking half of pass 1: lines → records in the spill, bucketed by dedup key.
fn pass1(mut rx: mpsc::Receiver<Bytes>, mut t: Transformer) -> Result<Pass1> {
    let mut spill = Spill::new()?;
    let mut out = Vec::with_capacity(64 * 1024);
    let mut carry: Vec<u8> = Vec::new();
    let mut raw_bytes = 0u64;

    let mut handle = |line: &[u8], out: &mut Vec<u8>, spill: &mut Spill| -> Result<()> {
        out.clear();
        match t.transform(line, out)? {
            LineOutcome::Record { key, processing_ms } => spill.push(key, processing_ms, out),
            LineOutcome::OutOfRange | LineOutcome::Blank => Ok(()),
        }
    };

    while let Some(chunk) = rx.blocking_recv() {
        raw_bytes += chunk.len() as u64;
        let mut rest: &[u8] = &chunk;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            if carry.is_empty() {
                handle(&rest[..pos], &mut out, &mut spill)?;
            } else {
                carry.extend_from_slice(&rest[..pos]);
                handle(&carry, &mut out, &mut spill)?;
                carry.clear();
            }
            rest = &rest[pos + 1..];
        }
        carry.extend_from_slice(rest);
    }
    if !carry.is_empty() {
        // A last line without its newline must still be complete JSON.
        handle(&carry, &mut out, &mut spill)?;
    }
    Ok(Pass1 {
        spill,
        raw_bytes,
        schema: t.schema(),
    })
}

/// Pass 2: the spill's surviving records → compressed parts uploaded as they fill.
async fn write_parts(
    app: &App,
    attempt: &str,
    folder: &str,
    spill: Spill,
) -> Result<(Vec<FileEntry>, u64)> {
    let s = app.settings.clone();
    let attempt_id = attempt.to_string();
    let (tx, mut rx) = mpsc::channel::<PartEvent>(4);
    let producer = tokio::task::spawn_blocking(move || -> Result<u64> {
        let mut writer = PartWriter::new(&attempt_id, s.compression, s.max_file_bytes, |e| {
            tx.blocking_send(e).is_ok()
        });
        let mut open = true;
        let duplicates = spill.drain_deduplicated(|record| {
            open = writer.write(record);
            open
        })?;
        if open {
            writer.finish();
        }
        Ok(duplicates)
    });

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
            break;
        }
    }
    drop(rx);
    let produced = producer
        .await
        .map_err(|e| Error::storage(format!("part writer failed: {e}")));
    let (duplicates, failure) = match produced {
        Ok(Ok(d)) => (d, failure),
        Ok(Err(e)) | Err(e) => (0, failure.or(Some(e))),
    };
    if let Some(e) = failure {
        if let Some((_, up)) = current.take() {
            let _ = up.abort().await;
        }
        remove_parts(app, folder, &files).await;
        return Err(e);
    }
    Ok((files, duplicates))
}

fn content_type(name: &str) -> &'static str {
    if name.ends_with(".gz") {
        "application/gzip"
    } else {
        "application/x-ndjson"
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
