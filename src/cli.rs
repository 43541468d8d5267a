//! The local command: `sync`, `invoke`, `plan`, `demo`.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use jiff::Timestamp;
use tokio::time::Instant;

use crate::app::App;
use crate::config::{RunMode, Settings};
use crate::error::{Error, ErrorKind, Result};
use crate::handler::{self, Status};
use crate::plan;
use crate::tables::Table;

/// Replicates a Mixpanel project into S3 (or a local folder) as gzip JSON Lines.
#[derive(Parser, Debug)]
#[command(name = "mixpanel-replicator", version, about)]
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
    /// Start the bundled simulator and sync it into ./mixpanel-data.
    Demo {
        /// Output folder.
        #[arg(long, default_value = "mixpanel-data")]
        out: PathBuf,
    },
}

/// Runs the command line; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Sync { tables, out, state } => match local_settings(out, state) {
            Ok(s) => sync_command(s, tables).await,
            Err(e) => Err(e),
        },
        Command::Invoke { event } => invoke_command(&event).await,
        Command::Plan { tables, state } => match local_settings(None, state) {
            Ok(s) => plan_command(s, tables).await,
            Err(e) => Err(e),
        },
        Command::Demo { out } => crate::demo::run(out).await,
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

async fn sync_command(settings: Settings, tables: Vec<Table>) -> Result<ExitCode> {
    let app = App::build(settings, None).await?;
    let report = sync(&app, &tables).await?;
    Ok(if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
}

/// The first wait of `sync` after a slice failed on Mixpanel's rate limit; it doubles while
/// the limit holds, up to [`RATE_WAIT_MAX`].
const RATE_WAIT_FIRST: Duration = Duration::from_secs(5);
/// The longest wait of `sync` on Mixpanel's rate limit (its limits are per hour and per second).
const RATE_WAIT_MAX: Duration = Duration::from_secs(120);

/// Plans and replicates the tables (all supported ones when empty) until nothing is pending.
pub async fn sync(app: &App, tables: &[Table]) -> Result<SyncReport> {
    let chosen: Vec<Table> = if tables.is_empty() {
        Table::ALL.to_vec()
    } else {
        tables.to_vec()
    };
    let mut report = SyncReport::default();
    let json_lines = !std::io::stdout().is_terminal();
    for table in chosen {
        plan::queue_table(app.store.as_ref(), &app.settings, table, Timestamp::now()).await?;
        let progress = Progress::new(
            table,
            plan::outstanding(app.store.as_ref(), table).await? as u64,
        );
        // A snapshot answers partial after every budget's worth of pages: that is progress. A
        // day that answers partial three times in a row does not fit the budget.
        let partial_limit = if table.is_date_sliced() { 3 } else { 100_000 };
        let mut partial_in_a_row = 0;
        // Mixpanel still said 429 after the client's own retries (which honour Retry-After):
        // wait, longer each time in a row, before the next slice.
        let mut rate_wait = RATE_WAIT_FIRST;
        loop {
            let deadline = Instant::now() + app.settings.time_budget;
            let owner = handler::new_attempt_id();
            let now_ms = Timestamp::now().as_millisecond() as u64;
            let until = now_ms + app.settings.time_budget.as_millis() as u64 + 60_000;
            let Some(claim) =
                plan::claim_next(app.store.as_ref(), table, &owner, now_ms, until).await?
            else {
                break;
            };
            match handler::run_slice(app, &claim, deadline).await {
                Ok(resp) => {
                    progress.slice_done(json_lines, &resp);
                    match resp.status {
                        Status::Done => {
                            partial_in_a_row = 0;
                            rate_wait = RATE_WAIT_FIRST;
                            report.slices += 1;
                            report.records += resp.records;
                            report.bytes += resp.bytes;
                            report.files += resp.files;
                        }
                        Status::Skipped => {
                            report.skipped.push(table.to_string());
                            break;
                        }
                        _ => {
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
                Err(e) if e.kind() == ErrorKind::RateLimited => {
                    tracing::warn!(error = %e, wait_s = rate_wait.as_secs(), "waiting out Mixpanel's rate limit");
                    tokio::time::sleep(rate_wait).await;
                    rate_wait = (rate_wait * 2).min(RATE_WAIT_MAX);
                }
                Err(e) => return Err(e),
            }
        }
        if !report.skipped.iter().any(|s| s == table.as_str()) {
            report.failed += plan::outstanding(app.store.as_ref(), table).await? as u64;
        }
    }
    Ok(report)
}

/// Progress of a sync: a bar per table on a terminal; otherwise one JSON line per slice.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(table: Table, slices: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(slices);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{prefix:>15} [{bar:30}] {pos}/{len} slices {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(table.to_string());
            bar
        });
        Progress { bar }
    }

    fn slice_done(&self, json: bool, resp: &handler::Response) {
        match &self.bar {
            Some(bar) => {
                bar.println(human_line(resp));
                if resp.status == Status::Done {
                    bar.inc(1);
                }
                bar.set_message(format!("{} records", resp.records));
            }
            None => print_line(json, resp),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
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
    handler::parse_event(&value)?;
    let settings = local_settings(None, None)?;
    let app = App::build(settings, None).await?;
    let deadline = handler::effective_deadline(None, app.settings.time_budget);
    match handler::handle_reported(&app, value, deadline, false).await {
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
    let now = Timestamp::now();
    for table in chosen {
        let pending = plan::preview(app.store.as_ref(), &app.settings, table, now).await?;
        if pending.is_empty() {
            println!("{table}: nothing pending");
        }
        for r in pending {
            let why = match (r.status, r.committed_at_ms) {
                (crate::state::SliceStatus::Leased, _) => "lease expired",
                (_, Some(_)) => "refresh (attribution window)",
                _ if r.attempts > 0 => "retry",
                _ => "new",
            };
            println!("{table}\t{}\t{why}", r.slice);
        }
    }
    Ok(ExitCode::SUCCESS)
}
