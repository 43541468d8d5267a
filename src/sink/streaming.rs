//! The one upload of parts: [`Uploads`] turns the part writer's events into uploads through the
//! sink, for the export's pass 2 (events from its writer threads) and for [`StreamingParts`],
//! parts written from async code page by page (snapshots), whose events are queued and
//! uploaded when the caller pumps them, so at most a page's compressed bytes wait.

use std::sync::Arc;
use std::sync::mpsc;

use crate::config::Compression;
use crate::error::{Error, Result};
use crate::sink::manifest::FileEntry;
use crate::sink::part::{PartEvent, PartWriter, content_type};
use crate::sink::{ObjectSink, Upload};

type Emit = Box<dyn FnMut(PartEvent) -> bool + Send>;

/// The parts of one folder being uploaded: the open one and those finished.
pub struct Uploads {
    sink: Arc<dyn ObjectSink>,
    folder: String,
    current: Option<Box<dyn Upload>>,
    /// Parts finished so far.
    pub files: Vec<FileEntry>,
}

impl Uploads {
    /// Uploads into `folder`, after the already finished `files`.
    pub fn new(sink: Arc<dyn ObjectSink>, folder: String, files: Vec<FileEntry>) -> Self {
        Uploads {
            sink,
            folder,
            current: None,
            files,
        }
    }

    /// Applies one event of the part writer: a part begins, gets bytes, or ends (and is listed).
    pub async fn apply(&mut self, event: PartEvent) -> Result<()> {
        match event {
            PartEvent::Begin(name) => {
                let key = format!("{}/{name}", self.folder);
                let upload = self.sink.start_upload(&key, content_type(&name)).await?;
                self.current = Some(upload);
            }
            PartEvent::Data(bytes) => {
                if let Some(up) = self.current.as_mut() {
                    up.write(bytes).await?;
                }
            }
            PartEvent::End { name, records } => {
                if let Some(up) = self.current.take() {
                    let bytes = up.finish().await?;
                    self.files.push(FileEntry {
                        name,
                        records,
                        bytes,
                    });
                }
            }
        }
        Ok(())
    }

    /// Discards the open part (after a failure): nothing of it remains.
    pub async fn abort(&mut self) {
        if let Some(up) = self.current.take() {
            let _ = up.abort().await;
        }
    }

    /// The folder the parts go to.
    pub fn folder(&self) -> &str {
        &self.folder
    }
}

/// Parts `{stem}-{NNNNN}` in one folder, uploaded as they are written.
pub struct StreamingParts {
    writer: PartWriter<Emit>,
    events: mpsc::Receiver<PartEvent>,
    /// The uploads, with the parts finished so far (`uploads.files`).
    pub uploads: Uploads,
    /// Set when the writer refused a record: the queue is ours, so only its compressor failed.
    failed: bool,
}

impl StreamingParts {
    /// Parts in `folder` numbered from `first_index`, after the already finished `files`.
    pub fn new(
        sink: Arc<dyn ObjectSink>,
        folder: String,
        stem: &str,
        first_index: u32,
        files: Vec<FileEntry>,
        compression: Compression,
        max_raw_bytes: u64,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let emit: Emit = Box::new(move |e| tx.send(e).is_ok());
        StreamingParts {
            writer: PartWriter::with_stem(
                stem.to_string(),
                first_index,
                compression,
                max_raw_bytes,
                emit,
            ),
            events: rx,
            uploads: Uploads::new(sink, folder, files),
            failed: false,
        }
    }

    /// Adds a record (one JSON line with its newline); call [`Self::pump`] after a batch.
    pub fn write(&mut self, record: &[u8]) {
        if !self.writer.write(record) {
            self.failed = true;
        }
    }

    /// Uploads what the writer produced so far.
    pub async fn pump(&mut self) -> Result<()> {
        while let Ok(event) = self.events.try_recv() {
            self.uploads.apply(event).await?;
        }
        if self.failed {
            return Err(Error::storage(format!(
                "the part writer of {} failed (see the log)",
                self.uploads.folder()
            )));
        }
        Ok(())
    }

    /// Finishes the open part so that everything written so far is in finished parts.
    pub async fn checkpoint(&mut self) -> Result<()> {
        if !self.writer.flush_part() {
            self.failed = true;
        }
        self.pump().await
    }

    /// The folder the parts go to.
    pub fn folder(&self) -> &str {
        self.uploads.folder()
    }

    /// The index of the next part.
    pub fn next_index(&self) -> u32 {
        self.writer.next_index()
    }

    /// Discards the open part (after a failure): nothing of it remains.
    pub async fn abort(&mut self) {
        while self.events.try_recv().is_ok() {}
        self.uploads.abort().await;
    }
}
