//! The spill: transformed records on local disk between reading a slice and writing its parts,
//! split into buckets by dedup key so that deduplication needs memory for one bucket only.
//!
//! Mixpanel's dedup key includes the event's `time`, so duplicates always share a bucket. Memory
//! stays flat whatever the day's size: a bucket's index holds a fraction of the day's keys, and
//! the files are unlinked temporary files that vanish with the process.
//!
//! Several transform workers may fill a spill at once, each through its own [`SpillWriter`]
//! (a shard). Every record carries its delivery sequence number, so the winner among duplicates
//! (greatest processing time, on a tie the later delivery) does not depend on which shard
//! holds it. A bucket's key index is written beside its records, so finding the duplicates
//! reads only the index and the records are read once.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, Write};

use crate::error::{Error, Result};

/// Buckets of a spill: the index of one bucket holds about 1/BUCKETS of a slice's keys.
pub const BUCKETS: usize = 32;

/// Buffer of each bucket's record writer.
const WRITE_BUFFER: usize = 32 * 1024;

/// Buffer of each bucket's key writer.
const KEY_BUFFER: usize = 8 * 1024;

/// Buffer of the readers.
const READ_BUFFER: usize = 128 * 1024;

/// Key entry: key (u128), processing time (u64), delivery sequence (u64), record index (u32).
const KEY_ENTRY: usize = 16 + 8 + 8 + 4;

fn spill_err(e: std::io::Error) -> Error {
    Error::io("spill file (local temporary storage)", e)
}

/// One bucket of one shard: records (`len: u32` + bytes) and the key index of the keyed ones.
struct BucketFiles {
    records: BufWriter<File>,
    keys: BufWriter<File>,
    count: u32,
}

/// One shard of a spill, filled by one transform worker.
pub struct SpillWriter {
    buckets: Vec<BucketFiles>,
    next_keyless: usize,
    records: u64,
}

impl SpillWriter {
    /// Creates the shard's bucket files (unlinked temporary files).
    pub fn new() -> Result<SpillWriter> {
        SpillWriter::with_buckets(BUCKETS)
    }

    /// A shard of `n` buckets (a small day of a multi-day window needs one: its index is small,
    /// and thirty days of 32 buckets each would hold thousands of files open).
    pub fn with_buckets(n: usize) -> Result<SpillWriter> {
        let n = n.clamp(1, BUCKETS);
        let mut buckets = Vec::with_capacity(n);
        for _ in 0..n {
            buckets.push(BucketFiles {
                records: BufWriter::with_capacity(
                    WRITE_BUFFER,
                    tempfile::tempfile().map_err(spill_err)?,
                ),
                keys: BufWriter::with_capacity(
                    KEY_BUFFER,
                    tempfile::tempfile().map_err(spill_err)?,
                ),
                count: 0,
            });
        }
        Ok(SpillWriter {
            buckets,
            next_keyless: 0,
            records: 0,
        })
    }

    /// Adds a record with its dedup key (`None`: never deduplicated), processing time and
    /// delivery sequence number (greater is later; unique within the spill).
    pub fn push(
        &mut self,
        key: Option<u128>,
        processing_ms: u64,
        seq: u64,
        record: &[u8],
    ) -> Result<()> {
        let n = self.buckets.len();
        let bucket = match key {
            Some(k) => (k as usize) % n,
            None => {
                self.next_keyless = (self.next_keyless + 1) % n;
                self.next_keyless
            }
        };
        let len = u32::try_from(record.len()).map_err(|_| Error::storage("a record over 4 GiB"))?;
        let b = &mut self.buckets[bucket];
        b.records
            .write_all(&len.to_le_bytes())
            .and_then(|()| b.records.write_all(record))
            .map_err(spill_err)?;
        if let Some(k) = key {
            let mut entry = [0u8; KEY_ENTRY];
            entry[0..16].copy_from_slice(&k.to_le_bytes());
            entry[16..24].copy_from_slice(&processing_ms.to_le_bytes());
            entry[24..32].copy_from_slice(&seq.to_le_bytes());
            entry[32..36].copy_from_slice(&b.count.to_le_bytes());
            b.keys.write_all(&entry).map_err(spill_err)?;
        }
        b.count = b
            .count
            .checked_add(1)
            .ok_or_else(|| Error::storage("over 4 billion records in a spill bucket"))?;
        self.records += 1;
        Ok(())
    }

    /// Records pushed so far.
    pub fn records(&self) -> u64 {
        self.records
    }
}

/// One transform worker's shards of a multi-day window: a shard per day, made when the day's
/// first record comes, and the raw bytes of the lines that became each day's records.
/// A window of one day is the single-slice spill exactly (its shard has every bucket).
pub struct DayShards {
    days: Vec<Option<SpillWriter>>,
    raw_bytes: Vec<u64>,
}

impl DayShards {
    /// Shards for a window of `days` days.
    pub fn new(days: usize) -> DayShards {
        DayShards {
            days: (0..days.max(1)).map(|_| None).collect(),
            raw_bytes: vec![0; days.max(1)],
        }
    }

    /// Adds a record of day `day` (see [`SpillWriter::push`]) that came from `raw_len` bytes.
    pub fn push(
        &mut self,
        day: usize,
        key: Option<u128>,
        processing_ms: u64,
        seq: u64,
        record: &[u8],
        raw_len: usize,
    ) -> Result<()> {
        let buckets = if self.days.len() == 1 { BUCKETS } else { 1 };
        let slot = self
            .days
            .get_mut(day)
            .ok_or_else(|| Error::storage("a record routed to no day of the window"))?;
        if slot.is_none() {
            *slot = Some(SpillWriter::with_buckets(buckets)?);
        }
        if let Some(w) = slot.as_mut() {
            w.push(key, processing_ms, seq, record)?;
        }
        self.raw_bytes[day] += raw_len as u64 + 1;
        Ok(())
    }

    /// Each day's spill (from every worker's shard of it) and its records' raw bytes.
    pub fn into_days(workers: Vec<DayShards>) -> Vec<(Spill, u64)> {
        let n = workers.iter().map(|w| w.days.len()).max().unwrap_or(1);
        let mut out: Vec<(Vec<SpillWriter>, u64)> = (0..n).map(|_| (Vec::new(), 0)).collect();
        for w in workers {
            for (i, (shard, bytes)) in w.days.into_iter().zip(w.raw_bytes).enumerate() {
                out[i].0.extend(shard);
                out[i].1 += bytes;
            }
        }
        out.into_iter()
            .map(|(shards, bytes)| (Spill::from_shards(shards), bytes))
            .collect()
    }
}

/// Records of one slice on disk, bucketed by dedup key, in one or more shards.
pub struct Spill {
    shards: Vec<SpillWriter>,
}

impl Spill {
    /// A spill of one shard.
    pub fn new() -> Result<Spill> {
        Ok(Spill {
            shards: vec![SpillWriter::new()?],
        })
    }

    /// A spill made of the shards that transform workers filled.
    pub fn from_shards(shards: Vec<SpillWriter>) -> Spill {
        Spill { shards }
    }

    /// Adds a record to the first shard; delivery order is the order of the calls.
    pub fn push(&mut self, key: Option<u128>, processing_ms: u64, record: &[u8]) -> Result<()> {
        let shard = &mut self.shards[0];
        let seq = shard.records;
        shard.push(key, processing_ms, seq, record)
    }

    /// Records pushed so far.
    pub fn records(&self) -> u64 {
        self.shards.iter().map(|s| s.records).sum()
    }

    /// The buckets, each to be drained on its own (by one worker or several in turn).
    pub fn into_buckets(self) -> Result<Vec<Bucket>> {
        let mut buckets: Vec<Bucket> = (0..BUCKETS).map(|_| Bucket { parts: Vec::new() }).collect();
        // (Every shard of one spill has the same number of buckets: a key's bucket is one.)
        for shard in self.shards {
            for (i, b) in shard.buckets.into_iter().enumerate() {
                if b.count == 0 {
                    continue;
                }
                let records = b
                    .records
                    .into_inner()
                    .map_err(|e| spill_err(e.into_error()))?;
                let keys = b.keys.into_inner().map_err(|e| spill_err(e.into_error()))?;
                buckets[i].parts.push((records, keys, b.count));
            }
        }
        buckets.retain(|b| !b.parts.is_empty());
        Ok(buckets)
    }

    /// Calls `emit` with every record that survives deduplication (per key, the greatest
    /// processing time; on a tie the later delivery), bucket by bucket. Stops early when `emit`
    /// returns false. Returns the number of duplicates dropped.
    pub fn drain_deduplicated(self, mut emit: impl FnMut(&[u8]) -> bool) -> Result<u64> {
        let mut duplicates = 0;
        let mut stopped = false;
        for b in self.into_buckets()? {
            duplicates += b.drain_deduplicated(|r| {
                let go = emit(r);
                stopped |= !go;
                go
            })?;
            if stopped {
                break;
            }
        }
        Ok(duplicates)
    }
}

/// One bucket of a spill: its files in every shard.
pub struct Bucket {
    /// Per shard: records, key index, record count.
    parts: Vec<(File, File, u32)>,
}

impl Bucket {
    /// Calls `emit` with every record of this bucket that survives deduplication. Stops early
    /// when `emit` returns false. Returns the number of duplicates dropped.
    pub fn drain_deduplicated(self, mut emit: impl FnMut(&[u8]) -> bool) -> Result<u64> {
        let mut parts = self.parts;
        let losers = find_losers(&mut parts)?;
        let mut duplicates = 0u64;
        let mut body = Vec::with_capacity(64 * 1024);
        for (shard, (records, _, count)) in parts.into_iter().enumerate() {
            let mut file = records;
            file.rewind().map_err(spill_err)?;
            let mut reader = BufReader::with_capacity(READ_BUFFER, file);
            let mut len = [0u8; 4];
            for idx in 0..count {
                if !read_exact_or_end(&mut reader, &mut len)? {
                    return Err(Error::storage("spill file truncated"));
                }
                let len = u32::from_le_bytes(len);
                if get_bit(&losers[shard], idx) {
                    duplicates += 1;
                    reader.seek_relative(i64::from(len)).map_err(spill_err)?;
                    continue;
                }
                let buffered = reader.buffer();
                if buffered.len() >= len as usize {
                    // The common case: the record is in the reader's buffer, no copy.
                    let go = emit(&buffered[..len as usize]);
                    reader.consume(len as usize);
                    if !go {
                        return Ok(duplicates);
                    }
                } else {
                    body.clear();
                    body.resize(len as usize, 0);
                    reader.read_exact(&mut body).map_err(spill_err)?;
                    if !emit(&body) {
                        return Ok(duplicates);
                    }
                }
            }
        }
        Ok(duplicates)
    }
}

/// Most key entries held in memory at once while finding duplicates (40 bytes each): a bucket
/// with more is processed in several rounds, each taking the keys of one range of hash values,
/// so memory stays bounded however big the day.
const MAX_ENTRIES: usize = if cfg!(test) { 64 } else { 1 << 16 };

/// A key entry in memory: sorted by key, then processing time, then delivery sequence.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    key: u128,
    ptime: u64,
    seq: u64,
    shard: u32,
    idx: u32,
}

/// The records of a bucket that lose to a later version of their key: one bit per record, per
/// shard. Per key the winner is the greatest (processing time, delivery sequence).
fn find_losers(parts: &mut [(File, File, u32)]) -> Result<Vec<Vec<u64>>> {
    let mut total = 0usize;
    for (_, keys, _) in parts.iter_mut() {
        total += keys.stream_position().map_err(spill_err)? as usize / KEY_ENTRY;
    }
    let rounds = total.div_ceil(MAX_ENTRIES).max(1);
    let mut losers: Vec<Vec<u64>> = parts
        .iter()
        .map(|(_, _, count)| vec![0u64; (*count as usize).div_ceil(64)])
        .collect();
    let expected = total / rounds;
    let mut entries: Vec<Entry> = Vec::with_capacity(expected + expected / 8 + 64);
    let mut raw = [0u8; KEY_ENTRY];
    for round in 0..rounds {
        entries.clear();
        for (shard, (_, keys, _)) in parts.iter_mut().enumerate() {
            keys.rewind().map_err(spill_err)?;
            let mut reader = BufReader::with_capacity(READ_BUFFER / 4, &mut *keys);
            while read_exact_or_end(&mut reader, &mut raw)? {
                let key = u128::from_le_bytes(field(&raw[0..16]));
                // The bucket was chosen by the key's low bits; rounds split by its high bits.
                if rounds > 1 && ((key >> 64) as u64 % rounds as u64) as usize != round {
                    continue;
                }
                entries.push(Entry {
                    key,
                    ptime: u64::from_le_bytes(field(&raw[16..24])),
                    seq: u64::from_le_bytes(field(&raw[24..32])),
                    shard: shard as u32,
                    idx: u32::from_le_bytes(field(&raw[32..36])),
                });
            }
        }
        entries.sort_unstable();
        for pair in entries.windows(2) {
            if pair[0].key == pair[1].key {
                // Not the last of its key: a later version wins.
                let loser = &pair[0];
                losers[loser.shard as usize][(loser.idx / 64) as usize] |= 1 << (loser.idx % 64);
            }
        }
    }
    Ok(losers)
}

/// A fixed-size field of a key entry.
fn field<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut f = [0u8; N];
    f.copy_from_slice(bytes);
    f
}

/// Fills `buf` completely; false at a clean end of file before its first byte.
fn read_exact_or_end(r: &mut impl Read, buf: &mut [u8]) -> Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).map_err(spill_err)?;
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

fn get_bit(bits: &[u64], i: u32) -> bool {
    bits.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(s: Spill) -> (Vec<String>, u64) {
        let mut out = Vec::new();
        let dups = s
            .drain_deduplicated(|r| {
                out.push(String::from_utf8(r.to_vec()).unwrap());
                true
            })
            .unwrap();
        out.sort();
        (out, dups)
    }

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
        let (out, dups) = drain(s);
        assert_eq!(out, ["a-new\n", "b\n", "c-tie-later\n", "x\n", "x\n"]);
        assert_eq!(dups, 3);
    }

    #[test]
    fn a_bucket_bigger_than_the_memory_bound_is_deduplicated_in_rounds() {
        let mut a = SpillWriter::new().unwrap();
        let mut b = SpillWriter::new().unwrap();
        let mut seq = 0;
        // 1,000 keys in one bucket (far over the 64 entries of a round in tests), each key
        // delivered three times across both shards; the version with processing time 2 wins.
        for version in [1u64, 2, 0] {
            for k in 0..1000u128 {
                let key = (k.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) << 5) | 3;
                let w = if (k + u128::from(version)) % 2 == 0 {
                    &mut a
                } else {
                    &mut b
                };
                w.push(
                    Some(key),
                    version,
                    seq,
                    format!("{k}-{version}\n").as_bytes(),
                )
                .unwrap();
                seq += 1;
            }
        }
        let (out, dups) = drain(Spill::from_shards(vec![a, b]));
        assert_eq!(dups, 2000);
        assert_eq!(out.len(), 1000);
        assert!(out.iter().all(|r| r.ends_with("-2\n")), "{out:?}");
    }

    #[test]
    fn shards_decide_ties_by_delivery_sequence() {
        let mut a = SpillWriter::new().unwrap();
        let mut b = SpillWriter::new().unwrap();
        // Delivery order: seq 1 (shard b), 2 (shard a), 3 (shard b), 4 (shard a).
        b.push(Some(7), 5, 1, b"k-1\n").unwrap();
        a.push(Some(7), 5, 2, b"k-2\n").unwrap();
        b.push(Some(9), 6, 3, b"m-3\n").unwrap();
        a.push(Some(9), 5, 4, b"m-4-older\n").unwrap();
        a.push(None, 0, 5, b"z\n").unwrap();
        let big = "r".repeat(300_000) + "\n";
        b.push(Some(11), 1, 6, big.as_bytes()).unwrap();
        let (out, dups) = drain(Spill::from_shards(vec![a, b]));
        assert_eq!(out, ["k-2\n", "m-3\n", big.as_str(), "z\n"]);
        assert_eq!(dups, 2);
    }
}
