//! `check`: tests the settings, the credentials, the data residency and the tables the plan
//! allows, one line each, before anything is replicated. It writes nothing (no output, no
//! state) and asks Mixpanel one small request per table family: an export of one second,
//! and the cheapest query of each Query API table. The Lambda function answers
//! `{"check": true}` with the same lines ([`answer`]).

use std::fmt::Write as _;
use std::time::Duration;

use futures_util::StreamExt;
use jiff::Timestamp;
use serde::Serialize;
use tokio::time::Instant;

use crate::app::App;
use crate::config::Settings;
use crate::error::{ErrorKind, Result};
use crate::mixpanel::{ExportQuery, MixpanelClient};
use crate::tables::Table;
use crate::tables::{annotations, cohorts, export, funnels, revenue};

/// One line of the check: what was checked, and how it went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// What was checked (`settings`, `credentials`, a table name, `state`).
    pub what: String,
    /// `None` when it is fine; the problem otherwise.
    pub problem: Option<String>,
    /// What was found (when fine).
    pub detail: String,
}

impl Line {
    fn ok(what: &str, detail: impl Into<String>) -> Line {
        Line {
            what: what.into(),
            problem: None,
            detail: detail.into(),
        }
    }

    fn fail(what: &str, problem: impl std::fmt::Display) -> Line {
        Line {
            what: what.into(),
            problem: Some(problem.to_string()),
            detail: String::new(),
        }
    }

    /// The line as the command prints it.
    pub fn render(&self) -> String {
        match &self.problem {
            None => format!("ok    {:<15} {}", self.what, self.detail),
            Some(p) => format!("FAIL  {:<15} {p}", self.what),
        }
    }
}

/// Runs the checks with `settings` (already read: a setting that cannot be read fails before).
pub async fn run(mut settings: Settings) -> Result<Vec<Line>> {
    let mut lines = vec![Line::ok("settings", describe(&settings))];
    // A local state file that does not exist yet is not created: nothing is replicated, and a
    // check writes nothing (the store is opened on an empty one of its own).
    let local_state = settings.state_file.clone().unwrap_or_else(|| {
        settings
            .output_dir
            .clone()
            .unwrap_or_else(|| "mixpanel-data".into())
            .join(".state.json")
    });
    let missing_state =
        (settings.state_table.is_none() && !local_state.exists()).then_some(local_state);
    let scratch = match &missing_state {
        Some(_) => Some(tempfile::tempdir().map_err(crate::error::Error::storage)?),
        None => None,
    };
    if let Some(dir) = &scratch {
        settings.state_file = Some(dir.path().join(".state.json"));
    }
    let app = match App::build(settings, None).await {
        Ok(app) => app,
        Err(e) => {
            lines.push(Line::fail("storage", &e));
            return Ok(lines);
        }
    };
    lines.extend(checks(&app, missing_state.as_deref()).await);
    Ok(lines)
}

/// The checks after the settings, with the app they built: the credentials, the state store,
/// then each table. `missing_state` is the local state file that does not exist yet.
async fn checks(app: &App, missing_state: Option<&std::path::Path>) -> Vec<Line> {
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Not from the shared request budget: a check writes nothing (the budget's ledger is in
    // the state store), and asks Mixpanel a handful of requests.
    let mc = app.mixpanel.without_budget();
    let from = match &app.settings.credentials {
        crate::secrets::CredentialsSource::SecretsManager { secret_id } => {
            format!(", from Secrets Manager secret {secret_id}")
        }
        crate::secrets::CredentialsSource::Static(_) => String::new(),
    };
    let creds = match mc.reload_credentials().await {
        Ok(c) => c,
        Err(e) => {
            lines.push(Line::fail("credentials", &e));
            return lines;
        }
    };
    lines.push(Line::ok(
        "credentials",
        match creds.project_id() {
            Some(id) => format!("a service account of project {id}{from}"),
            None => format!("a project API secret{from}"),
        },
    ));
    lines.push(match app.store.bookmark(Table::Export).await {
        Ok(_) if missing_state.is_some() => Line::ok(
            "state",
            format!(
                "no state file yet at {} (nothing replicated)",
                missing_state.map_or(String::new(), |f| f.display().to_string())
            ),
        ),
        Ok(b) => Line::ok(
            "state",
            match b {
                Some(day) => format!("readable; export is replicated up to {day}"),
                None => "readable; nothing replicated yet".to_string(),
            },
        ),
        Err(e) => Line::fail("state", &e),
    });
    for table in Table::ALL {
        lines.push(
            match ask(&mc, &app.settings, table, app.clock.now(), deadline).await {
                Ok(detail) => Line::ok(table.as_str(), detail),
                Err(e) if e.kind() == ErrorKind::PaymentRequired => Line::fail(
                    table.as_str(),
                    format!("not allowed by the Mixpanel plan: {e}"),
                ),
                Err(e) => Line::fail(table.as_str(), &e),
            },
        );
    }
    lines
}

/// How a check went, as the Lambda function answers `{"check": true}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every check passed.
    Ok,
    /// At least one failed.
    Failed,
}

/// The answer to `{"check": true}`: the lines `mixpanel-replicator check` prints, and whether
/// all passed. A failed check is an answer, not an invocation error, so that every line shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Answer {
    /// `ok`, or `failed` when any line failed.
    pub status: Status,
    /// The lines that failed.
    #[serde(skip_serializing_if = "is_zero")]
    pub failed: u64,
    /// One line per check, as the command prints them.
    pub lines: Vec<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Answer {
    fn of(lines: &[Line]) -> Answer {
        let failed = lines.iter().filter(|l| l.problem.is_some()).count() as u64;
        Answer {
            status: if failed == 0 {
                Status::Ok
            } else {
                Status::Failed
            },
            failed,
            lines: lines.iter().map(Line::render).collect(),
        }
    }
}

/// `{"check": true}` on Lambda: the checks with the function's own settings and clients
/// (the credentials read again, not from the cache), writing nothing; each line logged.
pub async fn answer(app: &App) -> Answer {
    let mut lines = vec![Line::ok("settings", describe(&app.settings))];
    lines.extend(checks(app, None).await);
    for l in &lines {
        match &l.problem {
            None => tracing::info!(check = %l.what, detail = %l.detail, "check passed"),
            Some(p) => tracing::warn!(check = %l.what, problem = %p, "check failed"),
        }
    }
    let answer = Answer::of(&lines);
    tracing::info!(status = ?answer.status, failed = answer.failed, "check summary");
    answer
}

/// The settings a run uses, without any secret.
fn describe(s: &Settings) -> String {
    let mut d = format!(
        "start {}, timezone {}, residency {}",
        s.start_date,
        s.timezone_name,
        format!("{:?}", s.residency).to_lowercase()
    );
    match (&s.output_bucket, &s.output_dir) {
        (Some(b), _) => {
            let _ = write!(d, ", output s3://{b}/{}", s.output_prefix);
        }
        (None, Some(dir)) => {
            let _ = write!(d, ", output {}", dir.display());
        }
        (None, None) => d.push_str(", output mixpanel-data"),
    }
    d
}

/// One small request that only this table's plan and access allow, asked `now` (the app's
/// clock: its today and its last second).
async fn ask(
    mc: &MixpanelClient,
    s: &Settings,
    table: Table,
    now: Timestamp,
    deadline: Instant,
) -> Result<String> {
    let today = export::project_today(&s.timezone, now);
    match table {
        Table::Export => {
            // One second of today: the smallest body the export API sends.
            let second = now.as_second() - 1;
            let q = ExportQuery {
                from_date: export::export_today(&s.timezone, s.export_time_mode, now),
                to_date: export::export_today(&s.timezone, s.export_time_mode, now),
                events: None,
                where_clause: Some(format!(
                    r#"properties["$time"] >= datetime({second}) and properties["$time"] < datetime({})"#,
                    second + 1
                )),
            };
            let resp = mc.export(&q, Duration::from_secs(30), deadline).await?;
            let mut body = resp.bytes_stream();
            let mut bytes = 0;
            while let Some(chunk) = body.next().await {
                bytes += chunk
                    .map_err(|e| {
                        crate::error::Error::transient(format!(
                            "the export answer broke off: {}",
                            crate::mixpanel::without_url(&e)
                        ))
                    })?
                    .len();
            }
            Ok(format!(
                "the export API answers ({bytes} bytes for one second)"
            ))
        }
        Table::Engage => {
            mc.query("engage", &[("page_size", "1".to_string())], deadline)
                .await?;
            Ok("the engage API answers".into())
        }
        Table::CohortMembers | Table::Cohorts => {
            let body = mc.query(cohorts::PATH, &[], deadline).await?;
            let n = cohorts::rows(&body, |_| {})?.len();
            Ok(format!("{n} cohorts listed"))
        }
        Table::Funnels => {
            let body = mc.query(funnels::LIST_PATH, &[], deadline).await?;
            let n = funnels::parse_list(&body)?.len();
            Ok(format!("{n} funnels listed"))
        }
        Table::Revenue => {
            mc.query(revenue::PATH, &revenue::params(today, today), deadline)
                .await?;
            Ok("the revenue API answers".into())
        }
        Table::Annotations => {
            let creds = mc.credentials().await?;
            match creds.project_id() {
                Some(id) => {
                    mc.app_api(
                        &format!("projects/{id}/annotations"),
                        &annotations::app_params(today, today),
                        deadline,
                    )
                    .await?;
                }
                None => {
                    mc.query("annotations", &annotations::params(today, today), deadline)
                        .await?;
                }
            }
            Ok("the annotations API answers".into())
        }
    }
}

/// `check` on the command line: settings from the environment (local mode).
pub async fn command(settings: Result<Settings>) -> Result<std::process::ExitCode> {
    let settings = match settings {
        Ok(s) => s,
        Err(e) => {
            println!("{}", Line::fail("settings", &e).render());
            return Ok(std::process::ExitCode::FAILURE);
        }
    };
    let lines = run(settings).await?;
    for l in &lines {
        println!("{}", l.render());
    }
    Ok(if lines.iter().all(|l| l.problem.is_none()) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
