//! The chaos soak: the chaos suite of `tests/chaos.rs` over thousands of seeds, many at once.
//!
//! Every seed is a tiny simulated project replicated under its own seeded mix of Mixpanel
//! faults, S3/DynamoDB faults (the proxy in front of moto), rival workers and SIGKILLs of the
//! real binary; after recovery it must equal the ground truth exactly, with every invariant of
//! the suite held (see `tests/support/chaos.rs`).
//!
//! `cargo bench --bench chaos_soak` (moto from `scripts/setup-tools`). `CHAOS_SOAK_SEEDS`
//! (default 2000) seeds from `CHAOS_SOAK_FIRST` (default 1,000,000, past the test's seeds),
//! `CHAOS_CONCURRENCY` at once (default 16). A failed seed is printed in full as it fails and
//! reproduces alone with `CHAOS_SEED=S cargo test --test chaos every_seed`. Exits 1 if any
//! seed failed.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Instant;

use support::chaos::{ChaosEnv, Plan, Target, run_seeds, summary};

fn var(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo test --all-targets` runs bench targets too: only `cargo bench` (which passes
    // `--bench`) soaks.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("chaos_soak: run with `cargo bench --bench chaos_soak`");
        return;
    }
    let first = var("CHAOS_SOAK_FIRST", 1_000_000);
    let count = var("CHAOS_SOAK_SEEDS", 2000);
    let concurrency = var("CHAOS_CONCURRENCY", 16) as usize;
    let seeds: Vec<u64> = (first..first + count).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let (outcomes, failures, elapsed) = runtime.block_on(async {
        let with_aws = seeds.iter().any(|&s| Plan::new(s).target == Target::Aws);
        let env = Arc::new(ChaosEnv::start(with_aws).await);
        let started = Instant::now();
        let (outcomes, failures) = run_seeds(env, seeds, concurrency, 100).await;
        (outcomes, failures, started.elapsed())
    });
    let aws = outcomes
        .iter()
        .filter(|o| Plan::new(o.seed).target == Target::Aws)
        .count();
    let killed = outcomes
        .iter()
        .filter(|o| {
            matches!(
                Plan::new(o.seed).driver,
                support::chaos::Driver::Killed { .. }
            )
        })
        .count();
    println!(
        "chaos soak: seeds {first}..{}, {concurrency} at once: {}",
        first + count,
        summary(&outcomes, failures.len(), elapsed)
    );
    println!(
        "  of the seeds that passed: {aws} on S3 + DynamoDB (moto behind the proxy), {} on a local folder and state file; {killed} ran the binary under SIGKILL, {} ran rival in-process workers",
        outcomes.len() - aws,
        outcomes.len() - killed
    );
    if !failures.is_empty() {
        let seeds: Vec<&str> = failures
            .iter()
            .filter_map(|f| f.split(':').next())
            .collect();
        println!("  failed: {seeds:?}");
        // The first broken invariant of each failed seed, numbers and dates blurred.
        let mut causes: std::collections::BTreeMap<String, usize> = Default::default();
        for f in &failures {
            let first = f
                .lines()
                .find_map(|l| l.strip_prefix("  - "))
                .unwrap_or("(no invariant line)");
            let blurred: String = first
                .chars()
                .map(|c| if c.is_ascii_digit() { '#' } else { c })
                .take(160)
                .collect();
            *causes.entry(blurred).or_default() += 1;
        }
        for (cause, n) in causes {
            println!("  {n} × {cause}");
        }
        std::process::exit(1);
    }
}
