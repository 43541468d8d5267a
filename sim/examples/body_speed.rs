//! Measures `write_export_body` throughput:
//! `cargo run --release -p mixpanel-sim --example body_speed -- [EVENTS_PER_DAY] [TIMEZONE]`.
use std::time::Instant;

use mixpanel_sim::{Date, SimConfig, Simulator};

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let tz = std::env::args().nth(2).unwrap_or_else(|| "UTC".into());
    let day = Date::new(2024, 6, 1).unwrap();
    let sim = Simulator::new(SimConfig {
        first_day: day,
        days: 1,
        events_per_day: n,
        timezone: tz,
        ..SimConfig::default()
    });
    let start = Instant::now();
    let bytes = sim
        .write_export_body(day, day, None, None, &mut std::io::sink())
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{n} events/day: {bytes} bytes in {secs:.2} s = {:.0} MB/s",
        bytes as f64 / secs / 1e6
    );
}
