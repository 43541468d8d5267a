//! Prints one day of export body (for eyeballing): `cargo run -p mixpanel-sim --example dump`.
use mixpanel_sim::{Date, SimConfig, Simulator};

fn main() {
    let day: Date = std::env::args()
        .nth(1)
        .map_or(Date::new(2024, 3, 10).unwrap(), |s| s.parse().unwrap());
    let sim = Simulator::new(SimConfig {
        first_day: day,
        days: 1,
        ..SimConfig::default()
    });
    sim.write_export_body(day, day, None, None, &mut std::io::stdout().lock())
        .unwrap();
}
