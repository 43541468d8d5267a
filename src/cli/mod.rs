//! The local command: `sync`, `invoke`, `plan`, `demo`.

#[cfg(feature = "demo")]
pub mod demo;

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::time::Instant;

use crate::app::App;
use crate::config::{RunMode, Settings};
use crate::error::{Error, ErrorKind, Result};
use crate::handler::{self, Status};
use crate::plan;
use crate::tables::Table;

/// What `--help` says after the commands: the tables, the settings a run needs, the events.
const AFTER_HELP: &str = "\
Tables: annotations, cohort_members, cohorts, engage, export, funnels, revenue.

Settings (environment variables; the README lists every one):
  MIXPANEL_START_DATE       the first day to replicate, YYYY-MM-DD (required)
  MIXPANEL_API_SECRET       the project's API secret, or
  MIXPANEL_SERVICE_ACCOUNT_USERNAME, MIXPANEL_SERVICE_ACCOUNT_SECRET and MIXPANEL_PROJECT_ID,
                            or MIXPANEL_SECRET_ID (a Secrets Manager secret; required on Lambda)
  MIXPANEL_PROJECT_TIMEZONE the project's timezone (default UTC)
  MIXPANEL_REGION           us, eu or in (default us)
  OUTPUT_BUCKET, STATE_TABLE  write to S3 and keep state in DynamoDB (required on Lambda);
                            without them, a local folder and state file

Events (`invoke --event FILE`, and what Lambda is invoked with):
  {\"table\": \"export\"}                             replicate what is pending
  {\"table\": \"export\", \"date\": \"2026-11-01\"}       replicate one day again
  {\"table\": \"export\", \"from\": \"...\", \"to\": \"...\"}  queue a range (fanned out)
  {\"table\": \"export\", \"retry_parked\": true}       retry the parked slices
  {\"table\": \"engage\", \"full\": true}            list every profile now, not only the
                                                   changed ones (cohort_members: every cohort)
  {\"check\": true}                                test settings, credentials, state and each
                                                   table's access, writing nothing (as `check`)
  an SQS event of those (the fan-out queue)";

/// What a build without the `demo` feature (the Lambda function's) says to `demo`.
#[cfg(not(feature = "demo"))]
const NO_DEMO: &str = "error: this build has no `demo`: it was built without the bundled simulator \
(`--no-default-features`, as the Lambda function is); `cargo run --release -- demo` builds one with it";

/// Replicates a Mixpanel project into S3 (or a local folder) as gzip (or zstd) JSON Lines.
#[derive(Parser, Debug)]
#[command(name = "mixpanel-replicator", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replicate until nothing is pending (all tables by default).
    Sync {
        /// A table to replicate (repeatable).
        #[arg(long = "table", value_name = "NAME")]
        tables: Vec<Table>,
        /// Output folder (default: OUTPUT_BUCKET if set, else ./mixpanel-data).
        #[arg(long)]
        out: Option<PathBuf>,
        /// State file (default: STATE_TABLE if set, else <out>/.state.json).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Retry the parked slices (and the tables remembered as not allowed by the plan) first.
        #[arg(long)]
        retry_parked: bool,
        /// engage and cohort_members: list every profile (every cohort's members) again, not
        /// only what changed since the last snapshot.
        #[arg(long)]
        full: bool,
        /// Slices replicated at once (each with its own lease; one request budget for all).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
        concurrency: u32,
    },
    /// Run the Lambda handler once on an event (a file, or - for standard input).
    Invoke {
        /// The event file.
        #[arg(long, value_name = "FILE|-")]
        event: String,
    },
    /// Show the pending slices; change nothing.
    Plan {
        /// A table to show (repeatable).
        #[arg(long = "table", value_name = "NAME")]
        tables: Vec<Table>,
        /// State file (default: STATE_TABLE if set, else ./mixpanel-data/.state.json).
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Test the settings, the credentials, the state and each table's access to Mixpanel, one
    /// line each; write nothing. Exits non-zero when anything fails.
    Check,
    /// Start the bundled simulator and sync it into ./mixpanel-data.
    // A build without the simulator (the Lambda function's) does not list it, and refuses it.
    #[cfg_attr(not(feature = "demo"), command(hide = true))]
    Demo {
        /// Output folder.
        #[arg(long, default_value = "mixpanel-data")]
        out: PathBuf,
    },
}

/// Runs the command line; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Sync {
            tables,
            out,
            state,
            retry_parked,
            full,
            concurrency,
        } => match local_settings(out, state) {
            Ok(s) => {
                Box::pin(sync_command(
                    s,
                    tables,
                    retry_parked,
                    full,
                    concurrency as usize,
                ))
                .await
            }
            Err(e) => Err(e),
        },
        Command::Invoke { event } => Box::pin(invoke_command(&event)).await,
        Command::Plan { tables, state } => match local_settings(None, state) {
            Ok(s) => Box::pin(plan_command(s, tables)).await,
            Err(e) => Err(e),
        },
        #[cfg(feature = "demo")]
        Command::Demo { out } => Box::pin(crate::cli::demo::run(out)).await,
        #[cfg(not(feature = "demo"))]
        Command::Demo { .. } => {
            eprintln!("{NO_DEMO}");
            return ExitCode::from(2);
        }
        Command::Check => Box::pin(crate::check::command(local_settings(None, None))).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e} [{}]", e.kind());
            ExitCode::FAILURE
        }
    }
}

fn local_settings(out: Option<PathBuf>, state: Option<PathBuf>) -> Result<Settings> {
    let mut s = Settings::from_env(RunMode::Local)?;
    if let Some(out) = out {
        if state.is_none() && s.state_table.is_none() {
            s.state_file = Some(out.join(".state.json"));
        }
        s.output_dir = Some(out);
    }
    if state.is_some() {
        s.state_file = state;
    }
    Ok(s)
}

async fn sync_command(
    settings: Settings,
    tables: Vec<Table>,
    retry_parked: bool,
    full: bool,
    concurrency: usize,
) -> Result<ExitCode> {
    let app = App::build(settings, None).await?;
    if full {
        let listed = [Table::Engage, Table::CohortMembers];
        let chosen: Vec<Table> = listed
            .into_iter()
            .filter(|t| tables.is_empty() || tables.contains(t))
            .collect();
        if chosen.is_empty() {
            return Err(Error::event(
                "--full is for engage and cohort_members (every profile or member listed again): add --table engage or --table cohort_members",
            ));
        }
        for t in chosen {
            crate::run::snapshot::changed::start_full(&app, t).await?;
        }
    }
    let report = sync_concurrently(&app, &tables, retry_parked, concurrency).await?;
    for line in &report.parked {
        eprintln!("parked: {line}");
    }
    if report.failed == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "error: {} slice(s) not committed{}",
        report.failed,
        if report.parked.is_empty() {
            String::new()
        } else {
            "; retry the parked ones with `sync --retry-parked` once the cause is fixed".into()
        }
    );
    Ok(ExitCode::FAILURE)
}

/// What a sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Slices committed.
    pub slices: u64,
    /// Records written.
    pub records: u64,
    /// Stored bytes written.
    pub bytes: u64,
    /// Files written.
    pub files: u64,
    /// Tables skipped (plan or version does not allow them).
    pub skipped: Vec<String>,
    /// Slices left uncommitted.
    pub failed: u64,
    /// The parked slices, one line each: the slice, its attempts and its last error.
    pub parked: Vec<String>,
}

/// The first wait of `sync` after a slice failed on Mixpanel's rate limit; it doubles while
/// the limit holds, up to [`RATE_WAIT_MAX`].
const RATE_WAIT_FIRST: Duration = Duration::from_secs(5);
/// The longest wait of `sync` on Mixpanel's rate limit (its limits are per hour and per second).
const RATE_WAIT_MAX: Duration = Duration::from_secs(120);

/// Plans and replicates the tables (all supported ones when empty) until nothing is pending.
pub async fn sync(app: &App, tables: &[Table]) -> Result<SyncReport> {
    sync_with(app, tables, false).await
}

/// [`sync`], first retrying the parked slices when `retry_parked`.
///
/// A slice that fails is tried again after its backoff, while the others go on; after
/// `MAX_SLICE_ATTEMPTS` failures in a row it is parked and named in the report. Failures of
/// the settings, the credentials or the state store stop the sync at once: every slice would
/// fail the same way.
pub async fn sync_with(app: &App, tables: &[Table], retry_parked: bool) -> Result<SyncReport> {
    sync_concurrently(app, tables, retry_parked, 1).await
}

/// [`sync_with`] with `concurrency` workers per table, each claiming its own slices (leases
/// keep them apart; the one request budget in the state store holds for all of them).
pub async fn sync_concurrently(
    app: &App,
    tables: &[Table],
    retry_parked: bool,
    concurrency: usize,
) -> Result<SyncReport> {
    let chosen: Vec<Table> = if tables.is_empty() {
        Table::ALL.to_vec()
    } else {
        tables.to_vec()
    };
    let mut report = SyncReport::default();
    let json_lines = !std::io::stdout().is_terminal();
    let store = app.store.as_ref();
    for table in chosen {
        if retry_parked {
            crate::skip::forget(app, table).await?;
            crate::park::retry_all(store, table).await?;
        }
        if let Some(reason) = crate::skip::remembered(app, table).await? {
            tracing::warn!(table = %table, reason = %reason, "table skipped (remembered); `sync --retry-parked` asks again");
            report.skipped.push(table.to_string());
            continue;
        }
        plan::queue_table(store, &app.settings, table, app.clock.now()).await?;
        let progress = Progress::new(table, plan::outstanding(store, table).await? as u64);
        let progress = std::sync::Arc::new(progress);
        // A worker that fails (settings, credentials, state store: every slice would fail the
        // same way) stops the others after their current slice, which each gives back or
        // commits: none is dropped while it holds a lease.
        let stop = std::sync::atomic::AtomicBool::new(false);
        let gate = std::sync::Arc::new(tokio::sync::Mutex::new(()));
        // An export table without one measured day first fetches a day alone (the probe whose
        // size plans the multi-day windows after it): the other workers wait until its body
        // is read (or its attempt ends), so that they do not each probe a day of their own, one
        // export request (of 60 an hour) apiece; then one of them plans the window while the
        // probe's parts are still written. Without windows (`MIXPANEL_EXPORT_WINDOW_DAYS=1`)
        // there is nothing to plan: all start at once.
        let probe = table == Table::Export
            && concurrency > 1
            && app.settings.export_window_days > 1
            && !crate::run::window::measured(store).await?;
        let workers = (0..concurrency.max(1)).map(|i| {
            let (progress, stop, gate) = (progress.clone(), &stop, &gate);
            async move {
                let first = probe && i == 0;
                if probe && i > 0 {
                    app.read_sizes.ready().await;
                }
                let worked = work(app, table, progress, json_lines, stop, first, gate).await;
                if first {
                    app.read_sizes.open();
                }
                if worked.is_err() {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                worked
            }
        });
        let done = futures_util::future::join_all(workers).await;
        let done: Vec<Worked> = done.into_iter().collect::<Result<_>>()?;
        for worked in done {
            report.slices += worked.slices;
            report.records += worked.records;
            report.bytes += worked.bytes;
            report.files += worked.files;
            if worked.skipped && !report.skipped.iter().any(|s| s == table.as_str()) {
                report.skipped.push(table.to_string());
            }
        }
        if !report.skipped.iter().any(|s| s == table.as_str()) {
            let slices = store.slices(table).await?;
            report
                .parked
                .extend(crate::park::parked(&slices).map(crate::park::describe));
            report.failed += slices
                .iter()
                .filter(|r| r.status != crate::state::SliceStatus::Committed)
                .count() as u64;
        }
    }
    Ok(report)
}

/// What one sync worker did on a table.
#[derive(Default)]
struct Worked {
    slices: u64,
    records: u64,
    bytes: u64,
    files: u64,
    skipped: bool,
}

/// One sync worker on `table`: claims and replicates slices until none is claimable (waiting
/// out backoffs and rate limits). The probe's worker (`probe`) lets the waiting workers go
/// once its first slice has ended, whether or not its size was read.
async fn work(
    app: &App,
    table: Table,
    progress: std::sync::Arc<Progress>,
    json_lines: bool,
    stop: &std::sync::atomic::AtomicBool,
    probe: bool,
    gate: &std::sync::Arc<tokio::sync::Mutex<()>>,
) -> Result<Worked> {
    let store = app.store.as_ref();
    let mut worked = Worked::default();
    // A snapshot answers partial after every budget's worth of pages, and a funnels window
    // after every budget's worth of funnels: that is progress. An export day that answers
    // partial three times in a row does not fit the budget (a slice split into smaller
    // pieces answers partial too, but the next claim is another slice: that is progress).
    let partial_limit = if table == Table::Export { 3 } else { 100_000 };
    let mut partial_in_a_row = 0;
    let mut last_partial = None;
    // Mixpanel still said 429 after the client's own waits: wait, longer each time in a
    // row, before the next slice.
    let mut rate_wait = RATE_WAIT_FIRST;
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let deadline = Instant::now() + app.settings.time_budget;
        let owner = handler::new_attempt_id();
        let now_ms = app.clock.now_ms();
        let until = now_ms + app.settings.time_budget.as_millis() as u64 + 60_000;
        // The workers claim one at a time, each until its claim's window has its days.
        let held = gate.clone().lock_owned().await;
        let (claim, slices) =
            plan::claim_next_seeing(store, table, None, &owner, now_ms, until).await?;
        let claim = claim.map(|mut c| {
            c.gate = plan::ClaimGate::holding(held);
            c
        });
        let Some(claim) = claim else {
            // Only slices backing off after a failure are left: wait for the first.
            match plan::next_retry_ms(&slices) {
                Some(at) => {
                    let wait = Duration::from_millis(at.saturating_sub(now_ms));
                    tracing::info!(table = %table, wait_s = wait.as_secs(), "waiting to try a failed slice again");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                None => break,
            }
        };
        let attempted = handler::attempt_slice(app, &claim, deadline).await;
        if probe {
            // The probe ended: the waiting workers go, sized or not.
            app.read_sizes.open();
        }
        let (resp, failure) = attempted?;
        progress.slice_done(json_lines, &resp);
        match resp.status {
            Status::Done => {
                partial_in_a_row = 0;
                last_partial = None;
                rate_wait = RATE_WAIT_FIRST;
                // (A multi-day window commits each of its days.)
                worked.slices += resp
                    .slice
                    .as_deref()
                    .map_or(1, crate::run::window::days_in_label);
                worked.records += resp.records;
                worked.bytes += resp.bytes;
                worked.files += resp.files;
            }
            Status::Skipped => {
                worked.skipped = true;
                break;
            }
            // Recorded on the slice: it is tried again after its backoff, or parked.
            _ if failure.is_some() => {}
            _ if resp.rate_limited => {
                tracing::warn!(
                    wait_s = rate_wait.as_secs(),
                    "waiting out Mixpanel's rate limit"
                );
                tokio::time::sleep(rate_wait).await;
                rate_wait = (rate_wait * 2).min(RATE_WAIT_MAX);
            }
            _ => {
                if last_partial != Some(claim.lease.slice) {
                    partial_in_a_row = 0;
                    last_partial = Some(claim.lease.slice);
                }
                partial_in_a_row += 1;
                if partial_in_a_row >= partial_limit {
                    return Err(Error::new(
                        ErrorKind::Deadline,
                        format!(
                            "{table} {} did not finish within INVOCATION_TIME_BUDGET_SECONDS three times",
                            claim.lease.slice
                        ),
                    ));
                }
            }
        }
    }
    Ok(worked)
}

/// Progress of a sync: on a terminal, a bar per table (above which log lines and the slices
/// that did not finish are written), left as one line when the table is done; otherwise one
/// JSON line per slice.
struct Progress {
    table: Table,
    bar: Option<indicatif::ProgressBar>,
    records: std::sync::atomic::AtomicU64,
}

/// The width of a bar, in characters.
const BAR_WIDTH: u64 = 30;

impl Progress {
    fn new(table: Table, slices: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = crate::logging::bars().add(indicatif::ProgressBar::new(slices));
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{prefix:>15} [{bar:30}] {pos}/{len} slices {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(table.to_string());
            bar
        });
        Progress {
            table,
            bar,
            records: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn slice_done(&self, json: bool, resp: &handler::Response) {
        let Some(bar) = &self.bar else {
            print_line(json, resp);
            return;
        };
        if resp.status == Status::Done {
            // A multi-day export window commits each of its days.
            bar.inc(
                resp.slice
                    .as_deref()
                    .map_or(1, crate::run::window::days_in_label),
            );
        } else {
            // Why a slice did not finish is worth a line; a finished one is the bar's.
            let line = human_line(resp);
            crate::logging::bars().suspend(|| eprintln!("{line}"));
        }
        let records = self
            .records
            .fetch_add(resp.records, std::sync::atomic::Ordering::Relaxed)
            + resp.records;
        bar.set_message(format!("{records} records"));
    }
}

/// A finished table's line: its bar as it ended.
fn bar_line(table: Table, done: u64, slices: u64, records: u64) -> String {
    let filled = (done.min(slices) * BAR_WIDTH)
        .checked_div(slices)
        .unwrap_or(BAR_WIDTH) as usize;
    format!(
        "{:>15} [{}{}] {done}/{slices} slices {records} records",
        table.as_str(),
        "=".repeat(filled),
        " ".repeat(BAR_WIDTH as usize - filled)
    )
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            // Its line is printed for good above the bars still running, and the bar leaves
            // them: once every table is done, what follows on the terminal is never redrawn.
            let line = bar_line(
                self.table,
                bar.position(),
                bar.length().unwrap_or(0),
                self.records.load(std::sync::atomic::Ordering::Relaxed),
            );
            bar.finish_and_clear();
            crate::logging::bars().remove(bar);
            let _ = crate::logging::bars().println(line);
        }
    }
}

fn human_line(resp: &handler::Response) -> String {
    format!(
        "{} {} {:?}: {} records, {} files, {} bytes{}",
        resp.table,
        resp.slice.as_deref().unwrap_or("-"),
        resp.status,
        resp.records,
        resp.files,
        resp.bytes,
        resp.reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    )
}

fn print_line(json: bool, resp: &handler::Response) {
    if json {
        if let Ok(s) = serde_json::to_string(resp) {
            println!("{s}");
        }
    } else {
        eprintln!("{}", human_line(resp));
    }
}

async fn invoke_command(event: &str) -> Result<ExitCode> {
    let text = if event == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Error::event(format!("cannot read the event from standard input: {e}")))?;
        s
    } else {
        std::fs::read_to_string(event)
            .map_err(|e| Error::event(format!("cannot read the event file {event}: {e}")))?
    };
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::event(format!("the event is not JSON: {e}")))?;
    // Validate the event before touching settings, so a bad event changes nothing.
    handler::check_event(&value)?;
    let settings = local_settings(None, None)?;
    let app = App::build(settings, None).await?;
    let deadline = handler::effective_deadline(None, app.settings.time_budget);
    match handler::answer(&app, value, deadline, false).await {
        Ok(resp) => {
            println!("{}", serde_json::to_string(&resp).unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({"errorType": e.kind().as_str(), "errorMessage": e.message()})
            );
            Err(e)
        }
    }
}

async fn plan_command(settings: Settings, tables: Vec<Table>) -> Result<ExitCode> {
    let app = App::build(settings, None).await?;
    let chosen: Vec<Table> = if tables.is_empty() {
        Table::ALL.to_vec()
    } else {
        tables
    };
    let now = app.clock.now();
    for table in chosen {
        let pending = plan::preview(app.store.as_ref(), &app.settings, table, now).await?;
        if pending.is_empty() {
            println!("{table}: nothing pending");
        }
        for r in pending {
            let why = match (r.status, r.committed_at_ms) {
                (crate::state::SliceStatus::Failed, _) => crate::park::describe(&r)
                    .split_once(": ")
                    .map(|(_, rest)| rest.to_string())
                    .unwrap_or_default(),
                (crate::state::SliceStatus::Leased, _) => "lease expired".into(),
                _ if r.failures > 0 => format!(
                    "retry after failed attempt {} of {}{}",
                    r.failures,
                    app.settings.max_slice_attempts,
                    r.error
                        .as_ref()
                        .map(|e| format!(" ({}: {})", e.kind, e.message))
                        .unwrap_or_default()
                ),
                (_, Some(_)) => "refresh (attribution window)".into(),
                _ if r.attempts > 0 => "retry".into(),
                _ => "new".into(),
            };
            println!("{table}\t{}\t{why}", r.slice);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod help_tests {
    use super::*;

    #[test]
    fn a_finished_tables_line_is_its_bar_as_it_ended() {
        assert_eq!(
            bar_line(Table::Export, 11, 11, 22_000),
            "         export [==============================] 11/11 slices 22000 records"
        );
        assert_eq!(
            bar_line(Table::Engage, 0, 1, 0),
            "         engage [                              ] 0/1 slices 0 records"
        );
        assert_eq!(
            bar_line(Table::Funnels, 5, 10, 30),
            "        funnels [===============               ] 5/10 slices 30 records"
        );
        assert_eq!(
            bar_line(Table::Cohorts, 0, 0, 0),
            "        cohorts [==============================] 0/0 slices 0 records"
        );
    }

    /// `--help` names every table, and only settings the program reads.
    #[test]
    fn the_help_names_every_table_and_only_real_settings() {
        for t in Table::ALL {
            assert!(AFTER_HELP.contains(t.as_str()), "{t}");
        }
        let names: Vec<&str> = AFTER_HELP
            .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .filter(|w| w.len() > 4 && w.contains('_'))
            .collect();
        assert!(names.len() >= 9, "{names:?}");
        for n in names {
            assert!(
                crate::config::VARIABLES.contains(&n),
                "{n} is not a setting"
            );
        }
        // Each event shown parses as one.
        for line in AFTER_HELP
            .lines()
            .filter(|l| l.trim_start().starts_with('{'))
        {
            let event = line.trim_start().split("  ").next().unwrap();
            if event.contains("...") {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(event).unwrap();
            crate::handler::parse_event(&v).unwrap_or_else(|e| panic!("{event}: {e}"));
        }
    }
}
