//! Big days (issue 6, targets 4 and 5): peak RSS and time for a 1 GB and a 5+ GB day (10
//! million events), on one and on two cores.
//!
//! `cargo bench --bench big_day`; `BENCH_DAYS` lists the days' event counts (default
//! `2000000,10000000`: 1.13 GB and 5.65 GB of raw JSONL), `BENCH_CORES` the core sets (default
//! `0;0,1`). A static server on core 1 sends each day gzip-compressed (level 6) from memory;
//! the release binary runs `sync --table export` into a local folder under `taskset`. Every run
//! must commit exactly the day's distinct events (dedup exact); the spill's peak size on disk
//! is sampled from the temporary folder's file system.

#[path = "common/mod.rs"]
mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;

fn main() {
    if !benching("big_day") {
        return;
    }
    let days: Vec<u32> = std::env::var("BENCH_DAYS")
        .unwrap_or_else(|_| "2000000,10000000".into())
        .split(',')
        .map(|n| n.trim().parse().unwrap())
        .collect();
    let cores: Vec<String> = std::env::var("BENCH_CORES")
        .unwrap_or_else(|_| "0;0,1".into())
        .split(';')
        .map(str::to_string)
        .collect();
    let day = bench_day();
    println!(
        "\n### Big days (local folder, gzip level {})\n",
        mixpanel_replicator::sink::part::GZIP_LEVEL
    );
    println!(
        "| events | raw GB | cores | seconds | MB/s raw | events/s | peak RSS MiB | spill peak GB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for events in days {
        let sim = simulator(day, events);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        let mut counted = Counted(&mut enc, 0);
        sim.write_export_body(day, day, None, None, &mut counted)
            .unwrap();
        let raw = counted.1;
        let gz = Arc::new(enc.finish().unwrap());
        eprintln!(
            "day of {events} events: {:.2} GB raw, {:.2} GB gzip",
            raw as f64 / 1e9,
            gz.len() as f64 / 1e9
        );
        let server = StaticServer::start(gz, day, vec![1]);
        for cpus in &cores {
            let tmp = std::env::temp_dir();
            let sampler = DiskSampler::start(&tmp);
            let (u, records) = run_replicator(&server.url, day, cpus, &[]);
            let spill = sampler.stop();
            assert_eq!(
                records, events as u64,
                "dedup must leave exactly the distinct events"
            );
            println!(
                "| {events} | {:.2} | {} | {:.1} | {:.0} | {:.0} | {:.1} | {:.2} |",
                raw as f64 / 1e9,
                cpus.split(',').count(),
                u.seconds,
                raw as f64 / 1e6 / u.seconds,
                events as f64 / u.seconds,
                u.max_rss_mib,
                spill as f64 / 1e9
            );
        }
    }
}

/// Counts the bytes written through it.
struct Counted<'a, W: Write>(&'a mut W, u64);

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.1 += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Samples the used bytes of a file system every 50 ms; reports the peak above the start.
struct DiskSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl DiskSampler {
    fn start(path: &std::path::Path) -> DiskSampler {
        let used = |p: &std::ffi::CString| -> u64 {
            // SAFETY: statvfs with a valid path and a zeroed out-struct.
            let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
            unsafe { libc::statvfs(p.as_ptr(), &mut s) };
            (s.f_blocks - s.f_bfree) as u64 * s.f_frsize as u64
        };
        let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let base = used(&p);
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, k) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                k.fetch_max(used(&p).saturating_sub(base), Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
        DiskSampler { stop, peak, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.peak.load(Ordering::Relaxed)
    }
}
