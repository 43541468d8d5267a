//! Export lines that pass 1 could not use as they came.
//!
//! The transform workers of pass 1 each take blocks of whole lines, so the two halves of an
//! event split by a raw line break inside a string may sit in different blocks, on different
//! workers. A worker therefore only sets such lines aside, with their position in the body (and
//! the blank lines next to them, which may be part of the same string). Once the body has ended,
//! one sequential fix-up reads every worker's lines back in body order, joins adjacent pieces
//! that parse as one event ([`export::repair`]) and transforms them into the spill under the
//! position of their first piece (so deduplication ties keep the delivery order); what still
//! cannot be used is rejected: kept raw, in body order, for `_rejected/`. The normal path costs
//! nothing more: only lines that failed to parse get here.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, Write};

use crate::error::{Error, Result};
use crate::run::spill::DayShards;
use crate::tables::export::{self, LineOutcome, Transformer, Unusable};

/// The most lines one event is joined from (a stack trace in a string is a few dozen lines).
pub const MAX_PIECES: usize = 64;

/// The most bytes a joined event may have (Mixpanel's events are at most about 1 MB).
const MAX_JOINED_BYTES: usize = 16 << 20;

fn io_err(e: std::io::Error) -> Error {
    Error::storage(format!("set-aside lines (local temporary storage): {e}"))
}

/// A worker's set-aside lines, `(position, bytes)` in position order, on local disk.
#[derive(Default)]
pub struct Aside {
    file: Option<BufWriter<File>>,
    entries: u64,
}

impl Aside {
    /// Sets a line aside (its exact bytes, `\r` included) at `pos` (block << 32 | line).
    pub fn push(&mut self, pos: u64, line: &[u8]) -> Result<()> {
        let file = match &mut self.file {
            Some(f) => f,
            None => self
                .file
                .insert(BufWriter::new(tempfile::tempfile().map_err(io_err)?)),
        };
        let len = u32::try_from(line.len()).map_err(|_| Error::storage("a line over 4 GiB"))?;
        file.write_all(&pos.to_le_bytes())
            .and_then(|()| file.write_all(&len.to_le_bytes()))
            .and_then(|()| file.write_all(line))
            .map_err(io_err)?;
        self.entries += 1;
        Ok(())
    }

    /// Lines set aside.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    fn into_reader(self) -> Result<Option<AsideReader>> {
        let Some(file) = self.file else {
            return Ok(None);
        };
        let mut file = file.into_inner().map_err(|e| io_err(e.into_error()))?;
        file.rewind().map_err(io_err)?;
        let mut r = AsideReader {
            reader: BufReader::with_capacity(64 * 1024, file),
            head: None,
        };
        r.advance()?;
        Ok(Some(r))
    }
}

struct AsideReader {
    reader: BufReader<File>,
    head: Option<(u64, Vec<u8>)>,
}

impl AsideReader {
    fn advance(&mut self) -> Result<()> {
        let mut header = [0u8; 12];
        match self.reader.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                self.head = None;
                return Ok(());
            }
            Err(e) => return Err(io_err(e)),
        }
        let mut pos = [0u8; 8];
        pos.copy_from_slice(&header[..8]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&header[8..]);
        let mut line = vec![0u8; u32::from_le_bytes(len) as usize];
        self.reader.read_exact(&mut line).map_err(io_err)?;
        self.head = Some((u64::from_le_bytes(pos), line));
        Ok(())
    }
}

/// Every worker's set-aside lines, merged in body order.
struct Merged {
    readers: Vec<AsideReader>,
}

impl Merged {
    fn next(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        let Some(i) = self
            .readers
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.head.as_ref().map(|(pos, _)| (*pos, i)))
            .min()
            .map(|(_, i)| i)
        else {
            return Ok(None);
        };
        let head = self.readers[i].head.take();
        self.readers[i].advance()?;
        Ok(head)
    }
}

/// Rejected lines, raw and in body order, on local disk until pass 2 writes them.
#[derive(Default)]
pub struct Rejected {
    file: Option<BufWriter<File>>,
    /// Lines rejected.
    pub count: u64,
    /// The first rejected line and why, for the error of a body that is not events.
    first: Option<(Vec<u8>, String)>,
}

impl Rejected {
    fn push(&mut self, line: &[u8], why: &Unusable) -> Result<()> {
        let file = match &mut self.file {
            Some(f) => f,
            None => self
                .file
                .insert(BufWriter::new(tempfile::tempfile().map_err(io_err)?)),
        };
        file.write_all(line)
            .and_then(|()| file.write_all(b"\n"))
            .map_err(io_err)?;
        if self.first.is_none() {
            self.first = Some((line.to_vec(), why.why.clone()));
        }
        self.count += 1;
        Ok(())
    }

    /// The error of a body that is not events, naming its first rejected line.
    pub fn error(&self) -> Error {
        match &self.first {
            Some((line, why)) => export::unusable_error(line, why),
            None => Error::transient("no export line was rejected"),
        }
    }

    /// Calls `each` with every rejected line (its exact bytes and a `\n`), in body order; stops
    /// when it returns false.
    pub fn drain(self, mut each: impl FnMut(&[u8]) -> bool) -> Result<()> {
        let Some(file) = self.file else {
            return Ok(());
        };
        let mut file = file.into_inner().map_err(|e| io_err(e.into_error()))?;
        file.rewind().map_err(io_err)?;
        let mut reader = BufReader::with_capacity(128 * 1024, file);
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line).map_err(io_err)? == 0 {
                return Ok(());
            }
            if !each(&line) {
                return Ok(());
            }
        }
    }
}

/// The shape of the body that the fix-up needs to know which lines are adjacent.
pub struct BodyShape {
    /// Lines of each block, by block number.
    pub lines: Vec<u32>,
    /// The position of the body's last line when it lacks its newline.
    pub unterminated_last: Option<u64>,
}

impl BodyShape {
    /// The position of the line after `pos`.
    fn next_line(&self, pos: u64) -> u64 {
        let (block, line) = (pos >> 32, pos & 0xffff_ffff);
        match self.lines.get(block as usize) {
            Some(&n) if line + 1 < u64::from(n) => pos + 1,
            _ => (block + 1) << 32,
        }
    }
}

/// What the fix-up made of the set-aside lines.
pub struct FixedUp {
    /// The records of joined (or repaired) events, a shard of the spill (per day of a window).
    pub spill: DayShards,
    /// Lines that became records or fell outside the slice (each joined event counts once).
    pub used: u64,
    /// Events joined from several lines.
    pub joined: u64,
    /// Lines still unusable.
    pub rejected: Rejected,
}

/// Joins what parses as one event and rejects the rest (see the module's description).
///
/// Fails (transient) when the body's last line lacks its newline and breaks off: the body
/// was cut, not sent whole.
pub fn fix_up(t: &mut Transformer, asides: Vec<Aside>, shape: &BodyShape) -> Result<FixedUp> {
    let mut readers = Vec::new();
    for a in asides {
        if let Some(r) = a.into_reader()? {
            readers.push(r);
        }
    }
    let mut merged = Merged { readers };
    let mut spill = DayShards::new(t.days());
    let mut rejected = Rejected::default();
    let mut used = 0u64;
    let mut joins = 0u64;
    let mut window: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let mut text = Vec::new();
    let mut out = Vec::new();
    loop {
        if window.is_empty() {
            match merged.next()? {
                Some(e) => window.push_back(e),
                None => break,
            }
        }
        // The first line alone (its raw control bytes escaped), then joined with the next
        // lines of the body while the event is still open.
        let mut k = 0;
        let mut alone = None;
        let joined = loop {
            text.clear();
            out.clear();
            let pieces: Vec<&[u8]> = window.iter().take(k + 1).map(|(_, l)| &l[..]).collect();
            let outcome = match export::repair(&pieces, &mut text) {
                Some(()) => t.transform(&text, &mut out)?,
                None => LineOutcome::Unusable(Unusable {
                    why: "has a control byte after a backslash".into(),
                    incomplete: false,
                }),
            };
            if k == 0 {
                alone = Some(outcome.clone());
            }
            let open = matches!(&outcome, LineOutcome::Unusable(u) if u.incomplete);
            if !open || k + 1 >= MAX_PIECES || text.len() > MAX_JOINED_BYTES {
                break outcome;
            }
            if window.len() <= k + 1
                && let Some(e) = merged.next()?
            {
                window.push_back(e);
            }
            match window.get(k + 1) {
                Some((pos, _)) if *pos == shape.next_line(window[k].0) => k += 1,
                _ => break outcome,
            }
        };
        match joined {
            LineOutcome::Record { key, processing_ms } => {
                if k > 0 {
                    joins += 1;
                }
                spill.push(t.day(), key, processing_ms, window[0].0, &out, text.len())?;
                used += 1;
                window.drain(..=k);
                continue;
            }
            LineOutcome::OutOfRange => {
                used += 1;
                window.drain(..=k);
                continue;
            }
            _ => {}
        }
        let Some((pos, line)) = window.pop_front() else {
            continue;
        };
        // (A blank line that no event continued through is only a blank line.)
        if let Some(LineOutcome::Unusable(u)) = alone {
            if u.incomplete && shape.unterminated_last == Some(pos) {
                return Err(Error::transient(
                    "the export body ended inside a line (cut off); the slice will be fetched again",
                ));
            }
            rejected.push(&line, &u)?;
        }
    }
    Ok(FixedUp {
        spill,
        used,
        joined: joins,
        rejected,
    })
}
