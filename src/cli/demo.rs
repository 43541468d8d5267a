//! `demo`: the bundled simulator on a free loopback port, synced into a local folder, with a
//! summary checked against the simulator's ground truth.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use mixpanel_sim::{SimConfig, Simulator};

use crate::app::App;
use crate::config::{RunMode, Settings};
use crate::error::{Error, Result};
use crate::run::commit::Manifest;
use crate::tables::Table;

/// The rows of a committed partition or snapshot, as canonical JSON strings.
async fn read_rows(app: &App, folder: &str, m: &Manifest) -> Result<Vec<String>> {
    let mut rows = Vec::new();
    for f in &m.files {
        let Some(data) = app.sink.get(&format!("{folder}/{}", f.name)).await? else {
            continue;
        };
        let text = crate::sink::part::decompress(&f.name, &data)?;
        let text = std::str::from_utf8(&text).map_err(Error::storage)?;
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).map_err(Error::storage)?;
            rows.push(v.to_string());
        }
    }
    Ok(rows)
}

/// The demo's project: ten whole days of 2,000 events that ended yesterday in Los Angeles
/// (today's events are not all in the past yet, so no day of the ground truth may lie partly
/// in the future).
pub fn project(now: jiff::Timestamp) -> Result<SimConfig> {
    const TIMEZONE: &str = "America/Los_Angeles";
    const DAYS: u32 = 10;
    let today = now
        .to_zoned_datetime(
            jiff::tz::TimeZone::get(TIMEZONE).map_err(|e| Error::setting("timezone", e))?,
        )
        .date();
    let first_day = today
        .checked_sub(jiff::Span::new().days(i64::from(DAYS)))
        .map_err(|e| Error::setting("start date", e))?;
    Ok(SimConfig {
        timezone: TIMEZONE.into(),
        events_per_day: 2000,
        first_day,
        days: DAYS,
        ..SimConfig::default()
    })
}

/// Runs the demo into `out`.
pub async fn run(out: PathBuf) -> Result<ExitCode> {
    // One clock for the simulated project's days and the replicator's.
    let clock = crate::clock::system();
    let config = project(clock.now())?;
    let sim = Simulator::new(config.clone());
    let running = sim
        .serve(0)
        .await
        .map_err(|e| Error::storage(format!("cannot start the simulator: {e}")))?;
    eprintln!(
        "simulator: {} ({} days from {}, {} events a day, timezone {})",
        running.url(),
        config.days,
        config.first_day,
        config.events_per_day,
        config.timezone
    );
    let vars: HashMap<&str, String> = HashMap::from([
        ("MIXPANEL_API_SECRET", config.api_secret.clone()),
        ("MIXPANEL_START_DATE", config.first_day.to_string()),
        ("MIXPANEL_PROJECT_TIMEZONE", config.timezone.clone()),
        ("MIXPANEL_API_URL", running.url()),
        ("MIXPANEL_DATA_URL", running.url()),
        // The simulator has no rate limit: the demo need not pace itself like a real project.
        ("MIXPANEL_EXPORT_REQUESTS_PER_WINDOW", "100000".into()),
        ("MIXPANEL_QUERY_REQUESTS_PER_WINDOW", "100000".into()),
        ("MIXPANEL_EXPORT_REQUESTS_PER_SECOND", "1000".into()),
    ]);
    let mut settings = Settings::from_lookup(RunMode::Local, |k| vars.get(k).cloned())?;
    settings.output_dir = Some(out.clone());
    settings.state_file = Some(out.join(".state.json"));
    let app = App::build_with_clock(settings, None, clock).await?;
    let report = crate::cli::sync(&app, &[]).await?;

    println!();
    println!("Replicated into {}:", out.display());
    println!(
        "{:<15} {:<26} {:>8} {:>6} {:>10}  check",
        "table", "partition", "rows", "files", "bytes"
    );
    let mut all_exact = true;
    for table in Table::ALL {
        let manifests: Vec<String> = app
            .sink
            .list(&format!("{table}/"))
            .await?
            .into_iter()
            .map(|o| o.key)
            .filter(|k| k.ends_with("/_manifest.json"))
            .collect();
        for key in manifests {
            let Some(body) = app.sink.get(&key).await? else {
                continue;
            };
            let m: Manifest = serde_json::from_slice(&body).map_err(Error::storage)?;
            let folder = key.trim_end_matches("/_manifest.json");
            let mut rows = read_rows(&app, folder, &m).await?;
            let day = m
                .partition
                .strip_prefix("date=")
                .and_then(|d| d.parse::<jiff::civil::Date>().ok());
            let truth = match (table, day) {
                (Table::Export, Some(d)) => sim.export_ground_truth(d, None),
                (Table::Funnels, Some(d)) => sim.funnels_ground_truth(d),
                (Table::Revenue, Some(d)) => sim.revenue_ground_truth(d),
                (Table::Engage, None) => sim.engage_ground_truth(),
                (Table::Cohorts, None) => sim.cohorts_ground_truth(),
                (Table::CohortMembers, None) => sim.cohort_members_ground_truth(),
                (Table::Annotations, None) => sim.annotations_ground_truth(),
                _ => Vec::new(),
            };
            let mut truth: Vec<String> = truth.iter().map(|v| v.to_string()).collect();
            rows.sort();
            truth.sort();
            let exact = rows == truth;
            all_exact &= exact;
            let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
            println!(
                "{:<15} {:<26} {:>8} {:>6} {:>10}  {}",
                table.as_str(),
                m.partition,
                m.records,
                m.files.len(),
                bytes,
                if exact {
                    "exact"
                } else {
                    "DIFFERS from ground truth"
                }
            );
        }
    }
    println!(
        "{} slices, {} rows, {} files, {} bytes; every partition and snapshot {} the simulator's ground truth.",
        report.slices,
        report.records,
        report.files,
        report.bytes,
        if all_exact {
            "matches"
        } else {
            "does NOT match"
        }
    );
    println!();
    println!("Query it with DuckDB (more queries, one per table, in the README):");
    println!(
        "  duckdb -c \"SELECT date, event, count(*) AS events FROM read_json('{}/export/date=*/part-*', hive_partitioning = true, union_by_name = true) GROUP BY ALL ORDER BY date, events DESC\"",
        out.display()
    );
    Ok(if all_exact && report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
