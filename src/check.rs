//! `check`: tests the settings, the credentials, the data residency and the tables the plan
//! allows, one line each, before anything is replicated. It writes nothing (no output, no
//! state) and asks Mixpanel one small request per table family: an export of one second,
//! and the cheapest query of each Query API table.

use std::fmt::Write as _;
use std::time::Duration;

use futures_util::StreamExt;
use jiff::Timestamp;
use tokio::time::Instant;

use crate::app::App;
use crate::config::Settings;
use crate::error::{ErrorKind, Result};
use crate::mixpanel::ExportQuery;
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
    let deadline = Instant::now() + Duration::from_secs(60);
    match app.mixpanel.credentials().await {
        Ok(c) => lines.push(Line::ok(
            "credentials",
            match c.project_id() {
                Some(id) => format!("a service account of project {id}"),
                None => "a project API secret".to_string(),
            },
        )),
        Err(e) => {
            lines.push(Line::fail("credentials", &e));
            return Ok(lines);
        }
    }
    lines.push(match app.store.bookmark(Table::Export).await {
        Ok(_) if missing_state.is_some() => Line::ok(
            "state",
            format!(
                "no state file yet at {} (nothing replicated)",
                missing_state
                    .as_ref()
                    .map_or(String::new(), |f| f.display().to_string())
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
        lines.push(match ask(&app, table, deadline).await {
            Ok(detail) => Line::ok(table.as_str(), detail),
            Err(e) if e.kind() == ErrorKind::PaymentRequired => Line::fail(
                table.as_str(),
                format!("not allowed by the Mixpanel plan: {e}"),
            ),
            Err(e) => Line::fail(table.as_str(), &e),
        });
    }
    Ok(lines)
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

/// One small request that only this table's plan and access allow.
async fn ask(app: &App, table: Table, deadline: Instant) -> Result<String> {
    let mc = &app.mixpanel;
    let s = &app.settings;
    let now = Timestamp::now();
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
