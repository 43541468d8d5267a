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

/// zstd level: chosen by measurement (see BENCHMARKS.md). On the simulated export records
/// level 1 is the fastest (2.8× gzip level 3 through this writer) and also stores the fewest
/// bytes of levels 1 to 4 (14 % fewer than gzip level 3); level 6 stores 6 % less at a fifth
/// of the speed, slower even than gzip level 3, whose compression is already the pipeline's
/// slowest stage.
pub const ZSTD_LEVEL: i32 = 1;

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
    Zstd(Box<zstd::stream::write::Encoder<'static, Vec<u8>>>),
    Plain(Vec<u8>),
}

impl Encoder {
    fn new(compression: Compression, buf: Vec<u8>) -> std::io::Result<Encoder> {
        Ok(match compression {
            Compression::Gzip => Encoder::Gzip(Box::new(GzEncoder::new(
                buf,
                flate2::Compression::new(GZIP_LEVEL),
            ))),
            Compression::Zstd => {
                // One standard frame per part, ending with the checksum of its content, so that
                // a decoder can tell a damaged part from a good one.
                let mut e = zstd::stream::write::Encoder::new(buf, ZSTD_LEVEL)?;
                e.include_checksum(true)?;
                Encoder::Zstd(Box::new(e))
            }
            Compression::None => Encoder::Plain(buf),
        })
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.write_all(data),
            Encoder::Zstd(e) => e.write_all(data),
            Encoder::Plain(v) => {
                v.extend_from_slice(data);
                Ok(())
            }
        }
    }

    fn buf(&mut self) -> &mut Vec<u8> {
        match self {
            Encoder::Gzip(e) => e.get_mut(),
            Encoder::Zstd(e) => e.get_mut(),
            Encoder::Plain(v) => v,
        }
    }

    /// Ends the stream (the gzip trailer, the zstd frame's last block and checksum): the bytes
    /// not yet taken with [`Self::buf`].
    fn finish(self) -> std::io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Plain(v) => Ok(v),
        }
    }
}

/// `body` (JSON lines) compressed whole as one part.
pub fn compress(compression: Compression, body: Vec<u8>) -> std::io::Result<Vec<u8>> {
    if compression == Compression::None {
        return Ok(body);
    }
    let mut enc = Encoder::new(compression, Vec::with_capacity(body.len() / 4 + 64))?;
    enc.write(&body)?;
    enc.finish()
}

/// The JSON lines of a whole part named `name`, decompressed as its extension says.
pub fn decompress(name: &str, data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(data.len() * 4);
    match Compression::of_name(name) {
        Some(Compression::Gzip) => {
            // Every member, not only the first (a gzip file may hold several).
            flate2::read::MultiGzDecoder::new(data).read_to_end(&mut out)?;
        }
        Some(Compression::Zstd) => {
            zstd::stream::read::Decoder::new(data)?.read_to_end(&mut out)?;
        }
        Some(Compression::None) => out.extend_from_slice(data),
        None => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{name} is not a part (.jsonl, .jsonl.gz or .jsonl.zst)"),
            ));
        }
    }
    Ok(out)
}

/// Calls `f` with each line (newline included) of the part `name` holding `data`.
pub fn for_each_line(
    name: &str,
    data: &[u8],
    mut f: impl FnMut(&[u8]) -> crate::error::Result<()>,
) -> crate::error::Result<()> {
    use crate::error::Error;
    use std::io::{BufRead, BufReader, Read};
    let io = |e: std::io::Error| Error::io(format!("the part {name}"), e);
    let reader: Box<dyn Read + '_> = match Compression::of_name(name) {
        Some(Compression::Gzip) => Box::new(flate2::read::MultiGzDecoder::new(data)),
        Some(Compression::Zstd) => Box::new(zstd::stream::read::Decoder::new(data).map_err(io)?),
        Some(Compression::None) => Box::new(data),
        None => {
            return Err(Error::storage(format!(
                "{name} is not a part (.jsonl, .jsonl.gz or .jsonl.zst)"
            )));
        }
    };
    let mut reader = BufReader::with_capacity(256 * 1024, reader);
    let mut line = Vec::with_capacity(8 * 1024);
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(io)? == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        f(&line)?;
    }
}

/// The `Content-Type` of the part named `name`.
pub fn content_type(name: &str) -> &'static str {
    Compression::of_name(name).map_or("application/octet-stream", Compression::content_type)
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
            let enc = match Encoder::new(
                self.compression,
                Vec::with_capacity(CHUNK_BYTES + 64 * 1024),
            ) {
                Ok(enc) => enc,
                Err(e) => {
                    // Only a zstd context that cannot be allocated: the part cannot be written.
                    tracing::error!(error = %e, "cannot start a compressed part");
                    self.closed = true;
                    return false;
                }
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
        if let Err(e) = enc.write(record) {
            // Writing into a Vec fails only if the compressor does (zstd out of memory).
            tracing::error!(error = %e, "cannot compress a part");
            self.current = None;
            self.closed = true;
            return false;
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
        let rest = match enc.finish() {
            Ok(rest) => rest,
            Err(e) => {
                // The part would be truncated: it is never ended, so nothing of it is kept.
                tracing::error!(error = %e, "cannot finish a compressed part");
                self.closed = true;
                return false;
            }
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
    #[test]
    fn lines_are_read_from_every_compression() {
        let body = b"{\"distinct_id\":1}\n{\"distinct_id\":2}".to_vec();
        for (name, c) in [
            ("part-00000.jsonl.gz", Compression::Gzip),
            ("part-00000.jsonl.zst", Compression::Zstd),
            ("part-00000.jsonl", Compression::None),
        ] {
            let data = compress(c, body.clone()).unwrap();
            let mut lines = Vec::new();
            for_each_line(name, &data, |l| {
                lines.push(String::from_utf8(l.to_vec()).unwrap());
                Ok(())
            })
            .unwrap();
            assert_eq!(
                lines,
                ["{\"distinct_id\":1}\n", "{\"distinct_id\":2}\n"],
                "{name}"
            );
        }
        assert!(for_each_line("part.csv", b"", |_| Ok(())).is_err());
    }

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

    /// Parts as (name, bytes, records) from the writer's events.
    fn collect(events: Vec<PartEvent>) -> Vec<(String, Vec<u8>, u64)> {
        let mut parts: Vec<(String, Vec<u8>, u64)> = Vec::new();
        for e in events {
            match e {
                PartEvent::Begin(n) => parts.push((n, Vec::new(), 0)),
                PartEvent::Data(b) => parts.last_mut().unwrap().1.extend_from_slice(&b),
                PartEvent::End { records, .. } => parts.last_mut().unwrap().2 = records,
            }
        }
        parts
    }

    #[test]
    fn a_zstd_part_is_one_checksummed_frame_of_exactly_the_lines_written() {
        // Lines with escapes, unicode, big integers and a hard-to-compress token, so that a
        // part's compressed bytes pass the writer's 256 KiB hand-over mid-frame.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let lines: Vec<String> = (0..12000)
            .map(|i| {
                let token: String = (0..6)
                    .map(|_| {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        format!("{x:016x}")
                    })
                    .collect();
                format!(
                    "{{\"event\":\"e{}\",\"properties\":{{\"i\":{i},\"s\":\"caf\\u00e9 \\\"q\\\" {}\",\"n\":{},\"t\":\"{token}\"}}}}\n",
                    i % 7,
                    "é".repeat(i % 13),
                    u64::MAX - i as u64
                )
            })
            .collect();
        let mut events = Vec::new();
        let mut w = PartWriter::new("z1", Compression::Zstd, 1_200_000, |e| {
            events.push(e);
            true
        });
        for l in &lines {
            assert!(w.write(l.as_bytes()));
        }
        assert!(w.finish());
        let parts = collect(events);
        assert!(parts.len() >= 2, "{} parts", parts.len());
        assert!(parts[0].1.len() > CHUNK_BYTES, "{} bytes", parts[0].1.len());
        let mut all = Vec::new();
        for (i, (name, data, records)) in parts.iter().enumerate() {
            assert_eq!(name, &format!("part-z1-{i:05}.jsonl.zst"));
            // A standard frame: the magic number, then a header whose descriptor has the
            // content-checksum flag; the frame spans the whole part (one frame, nothing after).
            assert_eq!(data[..4], [0x28, 0xb5, 0x2f, 0xfd], "{name}");
            assert_ne!(data[4] & 0b100, 0, "{name}: no content checksum");
            assert_eq!(
                zstd::zstd_safe::find_frame_compressed_size(data),
                Ok(data.len()),
                "{name}"
            );
            let mut text = Vec::new();
            zstd::stream::read::Decoder::new(&data[..])
                .unwrap()
                .read_to_end(&mut text)
                .unwrap();
            assert_eq!(decompress(name, data).unwrap(), text);
            assert_eq!(
                text.iter().filter(|b| **b == b'\n').count() as u64,
                *records,
                "{name}"
            );
            all.extend_from_slice(&text);
        }
        assert_eq!(all, lines.concat().into_bytes());
        // A damaged part is refused, not read short.
        let (name, data, _) = &parts[0];
        let mut bad = data.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(decompress(name, &bad).is_err());
    }

    #[test]
    fn whole_bodies_compress_and_decompress_by_extension() {
        let body = b"{\"a\":1}\n{\"b\":\"\\u00e9\"}\n".to_vec();
        for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
            let name = format!("part-a-00000.{}", c.extension());
            let data = compress(c, body.clone()).unwrap();
            assert_eq!(decompress(&name, &data).unwrap(), body, "{name}");
            assert_eq!(content_type(&name), c.content_type());
        }
        assert_eq!(content_type("part-a-00000.jsonl.zst"), "application/zstd");
        assert!(decompress("_manifest.json", b"{}").is_err());
    }
}
