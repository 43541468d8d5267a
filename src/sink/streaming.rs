//! Parts written from async code page by page (snapshots): the part writer's events are
//! queued and uploaded when the caller pumps them, so at most a page's compressed bytes wait.

use std::sync::Arc;
use std::sync::mpsc;

use crate::config::Compression;
use crate::error::{Error, Result};
use crate::sink::manifest::FileEntry;
use crate::sink::part::{PartEvent, PartWriter, content_type};
use crate::sink::{ObjectSink, Upload};

type Emit = Box<dyn FnMut(PartEvent) -> bool + Send>;

/// Parts `{stem}-{NNNNN}` in one folder, uploaded as they are written.
pub struct StreamingParts {
    writer: PartWriter<Emit>,
    events: mpsc::Receiver<PartEvent>,
    sink: Arc<dyn ObjectSink>,
    folder: String,
    current: Option<(String, Box<dyn Upload>)>,
    /// Set when the writer refused a record: the queue is ours, so only its compressor failed.
    failed: bool,
    /// Parts finished so far.
    pub files: Vec<FileEntry>,
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
            sink,
            folder,
            current: None,
            failed: false,
            files,
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
            match event {
                PartEvent::Begin(name) => {
                    let key = format!("{}/{name}", self.folder);
                    let upload = self.sink.start_upload(&key, content_type(&name)).await?;
                    self.current = Some((name, upload));
                }
                PartEvent::Data(bytes) => {
                    if let Some((_, up)) = self.current.as_mut() {
                        up.write(bytes).await?;
                    }
                }
                PartEvent::End { name, records } => {
                    if let Some((_, up)) = self.current.take() {
                        let bytes = up.finish().await?;
                        self.files.push(FileEntry {
                            name,
                            records,
                            bytes,
                        });
                    }
                }
            }
        }
        if self.failed {
            return Err(Error::storage(format!(
                "the part writer of {} failed (see the log)",
                self.folder
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
        &self.folder
    }

    /// The index of the next part.
    pub fn next_index(&self) -> u32 {
        self.writer.next_index()
    }

    /// Discards the open part (after a failure): nothing of it remains.
    pub async fn abort(&mut self) {
        while self.events.try_recv().is_ok() {}
        if let Some((_, up)) = self.current.take() {
            let _ = up.abort().await;
        }
    }
}
