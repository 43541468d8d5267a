//! The spill: transformed records on local disk between reading a slice and writing its parts,
//! split into buckets by dedup key so that deduplication needs memory for one bucket only.
//!
//! Mixpanel's dedup key includes the event's `time`, so duplicates always share a bucket. Memory
//! stays flat whatever the day's size: a bucket's index holds a fraction of the day's keys, and
//! the files are unlinked temporary files that vanish with the process.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};

use crate::error::{Error, Result};

/// Buckets of a spill: the index of one bucket holds about 1/BUCKETS of a slice's keys.
pub const BUCKETS: usize = 32;

/// Buffer of each bucket's writer.
const WRITE_BUFFER: usize = 128 * 1024;

/// Record header: has-key flag, key (u128), processing time (u64), length (u32).
const HEADER: usize = 1 + 16 + 8 + 4;

/// Records of one slice on disk, bucketed by dedup key.
pub struct Spill {
    buckets: Vec<BufWriter<File>>,
    next_keyless: usize,
    records: u64,
}

fn spill_err(e: std::io::Error) -> Error {
    Error::storage(format!("spill file (local temporary storage): {e}"))
}

impl Spill {
    /// Creates the bucket files (unlinked temporary files).
    pub fn new() -> Result<Spill> {
        let mut buckets = Vec::with_capacity(BUCKETS);
        for _ in 0..BUCKETS {
            buckets.push(BufWriter::with_capacity(
                WRITE_BUFFER,
                tempfile::tempfile().map_err(spill_err)?,
            ));
        }
        Ok(Spill {
            buckets,
            next_keyless: 0,
            records: 0,
        })
    }

    /// Adds a record with its dedup key (`None`: never deduplicated) and processing time.
    pub fn push(&mut self, key: Option<u128>, processing_ms: u64, record: &[u8]) -> Result<()> {
        let bucket = match key {
            Some(k) => (k as usize) % BUCKETS,
            None => {
                self.next_keyless = (self.next_keyless + 1) % BUCKETS;
                self.next_keyless
            }
        };
        let len = u32::try_from(record.len()).map_err(|_| Error::storage("a record over 4 GiB"))?;
        let mut header = [0u8; HEADER];
        header[0] = u8::from(key.is_some());
        header[1..17].copy_from_slice(&key.unwrap_or(0).to_le_bytes());
        header[17..25].copy_from_slice(&processing_ms.to_le_bytes());
        header[25..29].copy_from_slice(&len.to_le_bytes());
        let w = &mut self.buckets[bucket];
        w.write_all(&header).map_err(spill_err)?;
        w.write_all(record).map_err(spill_err)?;
        self.records += 1;
        Ok(())
    }

    /// Records pushed so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Calls `emit` with every record that survives deduplication (per key, the greatest
    /// processing time; on a tie the later one), bucket by bucket. Stops early when `emit`
    /// returns false. Returns the number of duplicates dropped.
    pub fn drain_deduplicated(self, mut emit: impl FnMut(&[u8]) -> bool) -> Result<u64> {
        let mut duplicates = 0u64;
        let mut body = Vec::with_capacity(64 * 1024);
        for w in self.buckets {
            let mut file = w.into_inner().map_err(|e| spill_err(e.into_error()))?;
            file.rewind().map_err(spill_err)?;
            // First read: the winner of every key.
            let mut winners: HashMap<u128, (u64, u32)> = HashMap::new();
            let mut losers: Vec<u64> = Vec::new();
            let mut reader = BufReader::with_capacity(1 << 20, &mut file);
            let mut header = [0u8; HEADER];
            let mut idx: u32 = 0;
            while read_header(&mut reader, &mut header)? {
                let (has_key, key, ptime, len) = parse_header(&header);
                if has_key {
                    match winners.get_mut(&key) {
                        None => {
                            winners.insert(key, (ptime, idx));
                        }
                        Some(w) if ptime >= w.0 => {
                            set_bit(&mut losers, w.1);
                            *w = (ptime, idx);
                        }
                        Some(_) => set_bit(&mut losers, idx),
                    }
                }
                reader.seek_relative(i64::from(len)).map_err(spill_err)?;
                idx += 1;
            }
            drop(winners);
            drop(reader);
            // Second read: the survivors.
            file.rewind().map_err(spill_err)?;
            let mut reader = BufReader::with_capacity(1 << 20, file);
            let mut idx: u32 = 0;
            while read_header(&mut reader, &mut header)? {
                let (_, _, _, len) = parse_header(&header);
                if get_bit(&losers, idx) {
                    duplicates += 1;
                    reader.seek_relative(i64::from(len)).map_err(spill_err)?;
                } else {
                    body.clear();
                    body.resize(len as usize, 0);
                    reader.read_exact(&mut body).map_err(spill_err)?;
                    if !emit(&body) {
                        return Ok(duplicates);
                    }
                }
                idx += 1;
            }
        }
        Ok(duplicates)
    }
}

fn read_header(r: &mut impl Read, header: &mut [u8; HEADER]) -> Result<bool> {
    let mut filled = 0;
    while filled < HEADER {
        let n = r.read(&mut header[filled..]).map_err(spill_err)?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(Error::storage("spill file truncated"));
        }
        filled += n;
    }
    Ok(true)
}

fn parse_header(h: &[u8; HEADER]) -> (bool, u128, u64, u32) {
    let mut k = [0u8; 16];
    k.copy_from_slice(&h[1..17]);
    let mut p = [0u8; 8];
    p.copy_from_slice(&h[17..25]);
    let mut l = [0u8; 4];
    l.copy_from_slice(&h[25..29]);
    (
        h[0] == 1,
        u128::from_le_bytes(k),
        u64::from_le_bytes(p),
        u32::from_le_bytes(l),
    )
}

fn set_bit(bits: &mut Vec<u64>, i: u32) {
    let w = (i / 64) as usize;
    if bits.len() <= w {
        bits.resize(w + 1, 0);
    }
    bits[w] |= 1 << (i % 64);
}

fn get_bit(bits: &[u64], i: u32) -> bool {
    bits.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_version_of_each_key_and_every_keyless_record() {
        let mut s = Spill::new().unwrap();
        s.push(Some(1), 10, b"a-old\n").unwrap();
        s.push(Some(2), 10, b"b\n").unwrap();
        s.push(Some(1), 30, b"a-new\n").unwrap();
        s.push(Some(1), 20, b"a-mid\n").unwrap();
        s.push(None, 0, b"x\n").unwrap();
        s.push(None, 0, b"x\n").unwrap();
        s.push(Some(3 + BUCKETS as u128), 5, b"c-first\n").unwrap();
        s.push(Some(3 + BUCKETS as u128), 5, b"c-tie-later\n")
            .unwrap();
        let mut out = Vec::new();
        let dups = s
            .drain_deduplicated(|r| {
                out.push(String::from_utf8(r.to_vec()).unwrap());
                true
            })
            .unwrap();
        out.sort();
        assert_eq!(out, ["a-new\n", "b\n", "c-tie-later\n", "x\n", "x\n"]);
        assert_eq!(dups, 3);
    }
}
