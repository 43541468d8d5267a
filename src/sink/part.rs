//! The part writer: compresses records into parts that roll over at a size limit, as a stream
//! of events for an uploader, so that neither a part nor a slice is ever held whole in memory.

use bytes::Bytes;
use flate2::write::GzEncoder;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::config::Compression;

/// gzip level: chosen by measurement (see BENCHMARKS.md) for speed at a small size cost.
pub const GZIP_LEVEL: u32 = 3;

/// Compressed bytes gathered before they are handed to the uploader.
const CHUNK_BYTES: usize = 256 * 1024;

/// What the writer asks of the uploader, in order.
#[derive(Debug)]
pub enum PartEvent {
    /// Start a new object with this file name.
    Begin(String),
    /// Append these bytes to the current object.
    Data(Bytes),
    /// Complete the current object, holding `records` records.
    End {
        /// File name.
        name: String,
        /// Records in the part.
        records: u64,
    },
}

enum Encoder {
    Gzip(Box<GzEncoder<Vec<u8>>>),
    Plain(Vec<u8>),
}

impl Encoder {
    fn buf(&mut self) -> &mut Vec<u8> {
        match self {
            Encoder::Gzip(e) => e.get_mut(),
            Encoder::Plain(v) => v,
        }
    }
}

/// Where part numbers come from.
enum PartIndex {
    /// This writer numbers its parts.
    Own(u32),
    /// Writers of one partition share the numbers.
    Shared(Arc<AtomicU32>),
}

/// Splits a stream of records into compressed parts `{stem}-{NNNNN}.{ext}`.
pub struct PartWriter<F: FnMut(PartEvent) -> bool> {
    emit: F,
    stem: String,
    compression: Compression,
    max_raw_bytes: u64,
    index: PartIndex,
    current: Option<(String, Encoder, u64, u64)>,
    /// Set when the uploader went away: everything after is dropped.
    closed: bool,
}

impl<F: FnMut(PartEvent) -> bool> PartWriter<F> {
    /// A writer of parts `part-{attempt}-{NNNNN}` (date partitions, where several attempts may
    /// leave parts) that hands its events to `emit` (false when the uploader is gone).
    pub fn new(attempt: &str, compression: Compression, max_raw_bytes: u64, emit: F) -> Self {
        Self::with_stem(
            format!("part-{attempt}"),
            0,
            compression,
            max_raw_bytes,
            emit,
        )
    }

    /// A writer of parts `{stem}-{NNNNN}` numbered from `first_index` (snapshots: `part`).
    pub fn with_stem(
        stem: String,
        first_index: u32,
        compression: Compression,
        max_raw_bytes: u64,
        emit: F,
    ) -> Self {
        PartWriter {
            emit,
            stem,
            compression,
            max_raw_bytes,
            index: PartIndex::Own(first_index),
            current: None,
            closed: false,
        }
    }

    /// A writer of parts `part-{attempt}-{NNNNN}` whose numbers come from `next`, shared with
    /// other writers of the same partition (parallel workers), so names never collide.
    pub fn shared(
        attempt: &str,
        next: Arc<AtomicU32>,
        compression: Compression,
        max_raw_bytes: u64,
        emit: F,
    ) -> Self {
        PartWriter {
            emit,
            stem: format!("part-{attempt}"),
            compression,
            max_raw_bytes,
            index: PartIndex::Shared(next),
            current: None,
            closed: false,
        }
    }

    /// Adds one record (a JSON line with its newline). Returns false once the uploader is gone.
    pub fn write(&mut self, record: &[u8]) -> bool {
        if self.closed {
            return false;
        }
        if self.current.is_none() {
            let index = match &mut self.index {
                PartIndex::Own(i) => {
                    *i += 1;
                    *i - 1
                }
                PartIndex::Shared(next) => next.fetch_add(1, Ordering::Relaxed),
            };
            let name = format!(
                "{}-{:05}.{}",
                self.stem,
                index,
                self.compression.extension()
            );
            let enc = match self.compression {
                Compression::Gzip => Encoder::Gzip(Box::new(GzEncoder::new(
                    Vec::with_capacity(CHUNK_BYTES + 64 * 1024),
                    flate2::Compression::new(GZIP_LEVEL),
                ))),
                Compression::None => Encoder::Plain(Vec::with_capacity(CHUNK_BYTES + 64 * 1024)),
            };
            if !(self.emit)(PartEvent::Begin(name.clone())) {
                self.closed = true;
                return false;
            }
            self.current = Some((name, enc, 0, 0));
        }
        let Some((_, enc, raw, records)) = self.current.as_mut() else {
            return false;
        };
        match enc {
            // Writing into a Vec cannot fail.
            Encoder::Gzip(e) => {
                let _ = e.write_all(record);
            }
            Encoder::Plain(v) => v.extend_from_slice(record),
        }
        *raw += record.len() as u64;
        *records += 1;
        let full = *raw >= self.max_raw_bytes;
        if enc.buf().len() >= CHUNK_BYTES {
            let chunk = Bytes::from(std::mem::replace(
                enc.buf(),
                Vec::with_capacity(CHUNK_BYTES + 64 * 1024),
            ));
            if !(self.emit)(PartEvent::Data(chunk)) {
                self.closed = true;
                return false;
            }
        }
        if full {
            return self.end_part();
        }
        true
    }

    fn end_part(&mut self) -> bool {
        let Some((name, enc, _, records)) = self.current.take() else {
            return true;
        };
        let rest = match enc {
            Encoder::Gzip(e) => e.finish().unwrap_or_default(),
            Encoder::Plain(v) => v,
        };
        let ok = (rest.is_empty() || (self.emit)(PartEvent::Data(Bytes::from(rest))))
            && (self.emit)(PartEvent::End { name, records });
        if !ok {
            self.closed = true;
        }
        ok
    }

    /// Completes the last part. Returns false if the uploader went away.
    pub fn finish(mut self) -> bool {
        !self.closed && self.end_part()
    }

    /// Completes the current part, if any, so that everything written so far is in finished
    /// parts (a checkpoint). Returns false if the uploader went away.
    pub fn flush_part(&mut self) -> bool {
        !self.closed && self.end_part()
    }

    /// The index the next part will get.
    pub fn next_index(&self) -> u32 {
        match &self.index {
            PartIndex::Own(i) => *i,
            PartIndex::Shared(next) => next.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn rolls_over_and_round_trips() {
        let mut events = Vec::new();
        let mut w = PartWriter::new("a1", Compression::Gzip, 100, |e| {
            events.push(e);
            true
        });
        for i in 0..10 {
            assert!(w.write(format!("{{\"i\":{i},\"pad\":\"{}\"}}\n", "x".repeat(45)).as_bytes()));
        }
        assert!(w.finish());
        let mut parts: Vec<(String, Vec<u8>, u64)> = Vec::new();
        for e in events {
            match e {
                PartEvent::Begin(n) => parts.push((n, Vec::new(), 0)),
                PartEvent::Data(b) => parts.last_mut().unwrap().1.extend_from_slice(&b),
                PartEvent::End { records, .. } => parts.last_mut().unwrap().2 = records,
            }
        }
        assert_eq!(
            parts.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
            [
                "part-a1-00000.jsonl.gz",
                "part-a1-00001.jsonl.gz",
                "part-a1-00002.jsonl.gz",
                "part-a1-00003.jsonl.gz",
                "part-a1-00004.jsonl.gz"
            ]
        );
        let mut all = String::new();
        for p in &parts {
            assert_eq!(p.2, 2);
            flate2::read::GzDecoder::new(&p.1[..])
                .read_to_string(&mut all)
                .unwrap();
        }
        assert_eq!(all.lines().count(), 10);
        assert!(all.starts_with("{\"i\":0,"));
    }
}
