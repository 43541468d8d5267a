//! The export pipeline stage by stage, then end to end on one and on two cores (issue 6,
//! targets 2 and 3), plus the parser and compressor measurements that chose the defaults.
//!
//! `cargo bench --bench stages`; `BENCH_EVENTS` sets the day (default 1,000,000 events, about
//! 560 MB of raw JSONL); `BENCH_ONLY=e2e` runs only the end-to-end runs, `BENCH_ONLY=compressors`
//! only the compressor comparison. Every speed is MB/s of the day's raw JSONL (MB = 10^6 bytes), so the
//! stages add up: the pipeline's bound is 1 / Σ(1/stage).
//!
//! Stages run in this process on core 0; a static server on core 1 sends the day gzip-compressed
//! from memory. End to end runs the release binary (`sync --table export` into a local folder)
//! under `taskset -c 0` (one core, the server on the other) and `taskset -c 0,1` (two cores,
//! shared with the server).

#[path = "common/mod.rs"]
mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use mixpanel_replicator::config::{Compression, ExportTimeMode};
use mixpanel_replicator::run::spill::{Spill, SpillWriter};
use mixpanel_replicator::sink::ObjectSink;
use mixpanel_replicator::sink::local::LocalSink;
use mixpanel_replicator::sink::part::{GZIP_LEVEL, PartEvent, PartWriter, ZSTD_LEVEL};
use mixpanel_replicator::state::SliceId;
use mixpanel_replicator::tables::export::{self, LineOutcome, Transformer};

/// Runs `f` `REPEAT` times and keeps the fastest (the least disturbed) run; end-to-end runs
/// are repeated likewise.
const REPEAT: usize = 3;

fn best<T>(mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best: Option<(f64, T)> = None;
    for _ in 0..REPEAT {
        let t = Instant::now();
        let v = f();
        let s = t.elapsed().as_secs_f64();
        if best.as_ref().is_none_or(|b| s < b.0) {
            best = Some((s, v));
        }
    }
    best.unwrap()
}

fn main() {
    if !benching("stages") {
        return;
    }
    let events: u32 = env_or("BENCH_EVENTS", 1_000_000);
    let day = bench_day();
    let sim = simulator(day, events);
    let raw = raw_body(&sim, day);
    let mb = raw.len() as f64 / 1e6;
    let gz = Arc::new(gzip(&raw, 6));
    eprintln!(
        "day {day}: {events} events + duplicates, {mb:.1} MB raw JSONL, {:.1} MB gzip-6 on the wire",
        gz.len() as f64 / 1e6
    );
    let server = StaticServer::start(gz.clone(), day, vec![1]);
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "e2e") {
        for cpus in ["0", "0,1"] {
            let (u, _) = run_replicator(&server.url, day, cpus, &[]);
            println!(
                "cores {cpus}: {:.2} s, {:.0} MB/s, CPU {:.2} s, peak RSS {:.1} MiB",
                u.seconds,
                mb / u.seconds,
                u.cpu_seconds,
                u.max_rss_mib
            );
        }
        return;
    }
    pin_thread(&[0]);
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "compressors") {
        compressors(&survivors_of(&raw, day), mb);
        return;
    }
    let rate = |secs: f64| mb / secs;
    let mut rows: Vec<(String, f64)> = Vec::new();

    // 1. HTTP read + gunzip, as the replicator reads (reqwest with gzip, one thread).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::builder().build().unwrap();
    let url = format!(
        "{}/api/2.0/export?from_date={day}&to_date={day}",
        server.url
    );
    let (s, n) = best(|| {
        rt.block_on(async {
            let resp = client.get(&url).send().await.unwrap();
            let mut body = resp.bytes_stream();
            let mut n = 0usize;
            while let Some(c) = body.next().await {
                n += c.unwrap().len();
            }
            n
        })
    });
    assert_eq!(n, raw.len());
    rows.push(("HTTP read + gunzip".into(), rate(s)));

    // 2. Split + parse + transform + dedup: lines → spill (pass 1), spill → survivors (pass 2).
    let window = export::window(
        SliceId::Day(day),
        &jiff::tz::TimeZone::UTC,
        ExportTimeMode::Utc,
        day,
        None,
    )
    .unwrap();
    let transformer =
        || Transformer::new(jiff::tz::TimeZone::UTC, ExportTimeMode::Utc, &window, None);
    let transform_into_spill = |t: &mut Transformer| -> SpillWriter {
        let mut spill = SpillWriter::new().unwrap();
        let mut out = Vec::with_capacity(64 * 1024);
        for (seq, line) in lines(&raw).enumerate() {
            out.clear();
            if let LineOutcome::Record { key, processing_ms } = t.transform(line, &mut out).unwrap()
            {
                spill.push(key, processing_ms, seq as u64, &out).unwrap();
            }
        }
        spill
    };
    let (s_parse_only, _) = best(|| {
        let mut t = transformer();
        let mut out = Vec::with_capacity(64 * 1024);
        let mut n = 0u64;
        for line in lines(&raw) {
            out.clear();
            if let LineOutcome::Record { .. } = t.transform(line, &mut out).unwrap() {
                n += 1;
            }
        }
        n
    });
    let (s_pass1, _) = best(|| {
        let mut t = transformer();
        transform_into_spill(&mut t)
    });
    let mut survivors = Vec::with_capacity(raw.len());
    let (s_pass2, dups) = best(|| {
        let mut t = transformer();
        let spill = Spill::from_shards(vec![transform_into_spill(&mut t)]);
        survivors.clear();
        let t0 = Instant::now();
        let d = spill
            .drain_deduplicated(|r| {
                survivors.extend_from_slice(r);
                true
            })
            .unwrap();
        (t0.elapsed().as_secs_f64(), d)
    });
    let s_pass2 = dups.0.min(s_pass2);
    let s_transform = s_pass1 + s_pass2;
    eprintln!(
        "  transform alone (no spill) {:.0} MB/s; into the spill {:.0} MB/s; dedup drain {:.0} MB/s; {} duplicates dropped",
        rate(s_parse_only),
        rate(s_pass1),
        rate(s_pass2),
        dups.1
    );
    rows.push((
        "split + parse + transform + dedup".into(),
        rate(s_transform),
    ));

    // 3. Compress at the default level through the part writer.
    let records: Vec<&[u8]> = survivors
        .split_inclusive(|&b| b == b'\n')
        .collect::<Vec<_>>();
    let (s, chunks) = best(|| {
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut w = PartWriter::new("bench", Compression::Gzip, u64::MAX, |e| {
            if let PartEvent::Data(b) = e {
                chunks.push(b);
            }
            true
        });
        for r in &records {
            w.write(r);
        }
        w.finish();
        chunks
    });
    let stored: usize = chunks.iter().map(|c| c.len()).sum();
    rows.push((format!("gzip level {GZIP_LEVEL} (part writer)"), rate(s)));

    // 4. Sink: the local folder (temporary file, fsync, rename).
    let dir = tempfile::tempdir().unwrap();
    let sink = LocalSink::new(dir.path());
    let (s, _) = best(|| {
        rt.block_on(async {
            let mut up = sink
                .start_upload("export/part.jsonl.gz", "application/gzip")
                .await
                .unwrap();
            for c in &chunks {
                up.write(c.clone()).await.unwrap();
            }
            up.finish().await.unwrap()
        })
    });
    rows.push(("sink: local folder".into(), rate(s)));

    let bound = 1.0 / rows.iter().map(|(_, r)| 1.0 / r).sum::<f64>();

    // End to end: the release binary.
    let fastest = |cpus: &str| {
        (0..REPEAT)
            .map(|_| run_replicator(&server.url, day, cpus, &[]))
            .min_by(|a, b| a.0.seconds.total_cmp(&b.0.seconds))
            .unwrap()
    };
    let (one, records1) = fastest("0");
    let (two, records2) = fastest("0,1");
    assert_eq!(records1, records2);
    assert_eq!(records1, events as u64);

    println!(
        "\n### Stages, one core ({mb:.0} MB raw JSONL, {events} events + {} duplicates; output {:.1} MB gzip)\n",
        dups.1,
        stored as f64 / 1e6
    );
    println!("| stage | MB/s raw JSONL |");
    println!("|---|---|");
    for (name, r) in &rows {
        println!("| {name} | {r:.0} |");
    }
    println!("| **bound 1/Σ(1/stage)** | **{bound:.0}** |");
    println!("\n### End to end (`mixpanel-replicator sync --table export`, local folder)\n");
    println!(
        "| cores | seconds | MB/s raw | events/s | CPU s | peak RSS MiB | vs bound | vs one core |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (cores, u) in [("1 (taskset -c 0)", one), ("2 (taskset -c 0,1)", two)] {
        println!(
            "| {cores} | {:.2} | {:.0} | {:.0} | {:.2} | {:.1} | {:.0} % | {:.2}× |",
            u.seconds,
            mb / u.seconds,
            records1 as f64 / u.seconds,
            u.cpu_seconds,
            u.max_rss_mib,
            100.0 * (mb / u.seconds) / bound,
            one.seconds / u.seconds
        );
    }

    cost_table(records1 as f64 / one.seconds, records1 as f64 / two.seconds);

    // The choices: parsers and compressors on the same data.
    parsers(&raw, mb);
    compressors(&survivors, mb);
}

/// Lambda arm64 prices (us-east-1): per GB-second and per request.
const PRICE_GB_SECOND: f64 = 0.0000133334;
const PRICE_REQUEST: f64 = 0.20 / 1e6;

/// GB-seconds and dollars per million events for three function sizes, from the measured one-
/// and two-core speeds (events/s). Lambda gives a function CPU in proportion to its memory, one
/// full vCPU at 1,769 MB; above that a second vCPU, 3,008/1,769 = 1.70 vCPUs in all at 3,008 MB.
fn cost_table(one_core: f64, two_cores: f64) {
    println!(
        "\n### Cost per million events (arm64: ${PRICE_GB_SECOND} per GB-s, $0.20 per million requests)\n"
    );
    println!(
        "| memory MB | vCPU share | events/s | seconds per 1M events | GB-s per 1M events | $ per 1M events | seconds for a 10M-event day |"
    );
    println!("|---|---|---|---|---|---|---|");
    for mb in [512.0f64, 1769.0, 3008.0] {
        let share = mb / 1769.0;
        let speed = if share <= 1.0 {
            one_core * share
        } else {
            two_cores.min(one_core * share)
        };
        let secs = 1e6 / speed;
        let gb_s = mb / 1024.0 * secs;
        // One invocation per day slice; a day of 1M events or more needs at most one per million.
        let dollars = gb_s * PRICE_GB_SECOND + PRICE_REQUEST;
        println!(
            "| {mb:.0} | {share:.2} | {speed:.0} | {secs:.1} | {gb_s:.1} | {dollars:.6} | {:.0} |",
            10.0 * secs
        );
    }
}

/// The lines of a body (split with memchr, as the replicator's workers do).
fn lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', raw).map(move |end| {
        let line = &raw[start..end];
        start = end + 1;
        line
    })
}

/// Parse-only walks of every line (each property's value as raw JSON text) with the parsers
/// that can give raw value text: serde_json (`RawValue`, what the transform uses) and sonic-rs
/// (lazy iteration). simd-json is not a candidate: its values are decoded numbers and strings,
/// so copying them raw (exact float spelling, big integers) would need a second scan.
fn parsers(raw: &[u8], mb: f64) {
    use mixpanel_replicator::tables::json::Key;
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    use serde_json::value::RawValue;
    struct Walk<'a>(&'a mut usize);
    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
            while let Some(Key(k)) = m.next_key::<Key<'de>>()? {
                if k == "properties" {
                    m.next_value_seed(Props(&mut *self.0))?;
                } else {
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(())
        }
    }
    struct Props<'a>(&'a mut usize);
    impl<'de> DeserializeSeed<'de> for Props<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Props<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("properties")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
            while let Some(Key(k)) = m.next_key::<Key<'de>>()? {
                let v: &'de RawValue = m.next_value()?;
                std::hint::black_box((k, v));
                *self.0 += 1;
            }
            Ok(())
        }
    }
    let lines: Vec<&[u8]> = raw
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let (s_serde, n1) = best(|| {
        let mut n = 0usize;
        for l in &lines {
            let mut de = serde_json::Deserializer::from_slice(l);
            Walk(&mut n).deserialize(&mut de).unwrap();
        }
        n
    });
    let (s_sonic, n2) = best(|| {
        let mut n = 0usize;
        for l in &lines {
            for item in sonic_rs::to_object_iter(*l) {
                let (k, v) = item.unwrap();
                if k == "properties" {
                    for p in sonic_rs::to_object_iter(v.as_raw_str()) {
                        let (_, pv) = p.unwrap();
                        std::hint::black_box(pv.as_raw_str());
                        n += 1;
                    }
                }
            }
        }
        n
    });
    println!("\n### Parsers: parse-only walk of every line, raw value text of every property\n");
    println!("| parser | MB/s | properties seen |");
    println!("|---|---|---|");
    println!(
        "| serde_json 1 (borrowed keys, RawValue) | {:.0} | {n1} |",
        mb / s_serde
    );
    println!(
        "| sonic-rs 0.5 (to_object_iter, lazy) | {:.0} | {n2} |",
        mb / s_sonic
    );
}

/// The day's records as the part writer gets them: transformed, then deduplicated (one pass
/// each, unmeasured).
fn survivors_of(raw: &[u8], day: mixpanel_sim::Date) -> Vec<u8> {
    let window = export::window(
        SliceId::Day(day),
        &jiff::tz::TimeZone::UTC,
        ExportTimeMode::Utc,
        day,
        None,
    )
    .unwrap();
    let mut t = Transformer::new(jiff::tz::TimeZone::UTC, ExportTimeMode::Utc, &window, None);
    let mut spill = SpillWriter::new().unwrap();
    let mut out = Vec::with_capacity(64 * 1024);
    for (seq, line) in lines(raw).enumerate() {
        out.clear();
        if let LineOutcome::Record { key, processing_ms } = t.transform(line, &mut out).unwrap() {
            spill.push(key, processing_ms, seq as u64, &out).unwrap();
        }
    }
    let mut survivors = Vec::with_capacity(raw.len());
    Spill::from_shards(vec![spill])
        .drain_deduplicated(|r| {
            survivors.extend_from_slice(r);
            true
        })
        .unwrap();
    survivors
}

/// The fastest of `REPEAT` decompressions of `z` (gzip, or zstd when `zstd`), checked against
/// `records`: MB/s of the day's raw JSONL. One call over the whole part, in the compression
/// libraries' own code (zlib-rs's inflate, zstd's `ZSTD_decompress`), so that the figure is the
/// format's and not that of a generic reader wrapper compiled into this bench.
fn read_back(records: &[u8], mb: f64, z: &[u8], zstd: bool) -> f64 {
    let mut out: Vec<u8> = Vec::with_capacity(records.len());
    let (s, _) = best(|| {
        out.clear();
        if zstd {
            zstd::zstd_safe::decompress(&mut out, z).unwrap();
        } else {
            // The 10-byte header flate2 writes (no name, no extra), the deflate stream, then
            // the 8-byte CRC-32 and length trailer.
            assert_eq!(z[..4], [0x1f, 0x8b, 8, 0]);
            let mut inflate = flate2::Decompress::new(false);
            let status = inflate
                .decompress_vec(&z[10..], &mut out, flate2::FlushDecompress::Finish)
                .unwrap();
            assert_eq!(status, flate2::Status::StreamEnd);
        }
    });
    assert!(out == records, "read back differs");
    mb / s
}

/// zstd of `records` at `level`, streamed 64 KiB at a time into one frame with its checksum
/// (what the part writer makes, without its per-record calls).
fn zstd_stream(records: &[u8], level: i32) -> Vec<u8> {
    let mut e =
        zstd::stream::write::Encoder::new(Vec::with_capacity(records.len() / 4), level).unwrap();
    e.include_checksum(true).unwrap();
    for c in records.chunks(64 * 1024) {
        e.write_all(c).unwrap();
    }
    e.finish().unwrap()
}

/// The part writer's compressed bytes of `records`, fed one record at a time.
fn through_part_writer(records: &[&[u8]], compression: Compression) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = PartWriter::new("bench", compression, u64::MAX, |e| {
        if let PartEvent::Data(b) = e {
            out.extend_from_slice(&b);
        }
        true
    });
    for r in records {
        w.write(r);
    }
    w.finish();
    out
}

/// gzip and zstd backends and levels on the transformed records (what the part writer
/// compresses): compression MB/s on one core, the stored size, and how fast it reads back.
fn compressors(records: &[u8], mb: f64) {
    println!(
        "\n### Compressors on the transformed records ({:.1} MB; MB/s of the day's raw JSONL, {mb:.1} MB)\n",
        records.len() as f64 / 1e6
    );
    println!("| backend | level | MB/s | output / transformed | read back MB/s |");
    println!("|---|---|---|---|---|");
    for level in 1..=6u32 {
        let (s, z) = best(|| {
            let mut e = flate2::write::GzEncoder::new(
                Vec::with_capacity(records.len() / 4),
                flate2::Compression::new(level),
            );
            for c in records.chunks(64 * 1024) {
                e.write_all(c).unwrap();
            }
            e.finish().unwrap()
        });
        println!(
            "| flate2 + zlib-rs (streaming) | {level} | {:.0} | {:.3} | {:.0} |",
            mb / s,
            z.len() as f64 / records.len() as f64,
            read_back(records, mb, &z, false)
        );
    }
    for level in [1, 3, 6] {
        let (s, z) = best(|| {
            // libdeflate compresses whole buffers only: 1 MiB gzip members, concatenated.
            let mut c =
                libdeflater::Compressor::new(libdeflater::CompressionLvl::new(level).unwrap());
            let mut out = vec![0u8; c.gzip_compress_bound(1 << 20)];
            let mut total = 0;
            for chunk in records.chunks(1 << 20) {
                total += c.gzip_compress(chunk, &mut out).unwrap();
            }
            total
        });
        println!(
            "| libdeflate 1.x (1 MiB members) | {level} | {:.0} | {:.3} | — |",
            mb / s,
            z as f64 / records.len() as f64
        );
    }
    for level in [1, 2, 3, 4, 6, 9] {
        let (s, z) = best(|| zstd_stream(records, level));
        println!(
            "| zstd 1.5 (streaming, one frame, checksum) | {level} | {:.0} | {:.3} | {:.0} |",
            mb / s,
            z.len() as f64 / records.len() as f64,
            read_back(records, mb, &z, true)
        );
    }
    // The part writer is given one record (~490 bytes) at a time: the cost of that, at the
    // default levels, against the 64 KiB writes above.
    let split: Vec<&[u8]> = records.split_inclusive(|&b| b == b'\n').collect();
    for (compression, level) in [
        (Compression::Gzip, GZIP_LEVEL.to_string()),
        (Compression::Zstd, ZSTD_LEVEL.to_string()),
    ] {
        let (s, z) = best(|| through_part_writer(&split, compression));
        let back = read_back(records, mb, &z, compression == Compression::Zstd);
        println!(
            "| part writer, record by record ({}) | {level} | {:.0} | {:.3} | {back:.0} |",
            compression.extension(),
            mb / s,
            z.len() as f64 / records.len() as f64
        );
    }
}
