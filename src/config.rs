//! Settings, read once from the environment (or any lookup, for tests) and validated.

use std::path::PathBuf;
use std::time::Duration;

use jiff::civil::Date;
use jiff::tz::TimeZone;

use crate::error::{Error, Result};
use crate::secrets::{Credentials, CredentialsSource};

/// Mixpanel data residency: decides the API hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    /// United States (default).
    Us,
    /// European Union.
    Eu,
    /// India.
    In,
}

impl Residency {
    /// Query API host for this residency.
    pub fn api_url(self) -> &'static str {
        match self {
            Residency::Us => "https://mixpanel.com",
            Residency::Eu => "https://eu.mixpanel.com",
            Residency::In => "https://in.mixpanel.com",
        }
    }

    /// Raw export host for this residency.
    pub fn data_url(self) -> &'static str {
        match self {
            Residency::Us => "https://data.mixpanel.com",
            Residency::Eu => "https://data-eu.mixpanel.com",
            Residency::In => "https://data-in.mixpanel.com",
        }
    }
}

/// How the project's export encodes `time` and its from/to days.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportTimeMode {
    /// Projects created on or after 2023-01-01: `time` is epoch seconds, days are UTC days.
    Utc,
    /// Older projects: `time` is the project-local wall clock encoded as if UTC, days are local.
    ProjectLocal,
}

/// How parts are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// gzip (`.jsonl.gz`), the default.
    Gzip,
    /// zstd (`.jsonl.zst`): one standard frame per part, with its content checksum.
    Zstd,
    /// None (`.jsonl`).
    None,
}

impl Compression {
    /// File name extension of a part.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Gzip => "jsonl.gz",
            Compression::Zstd => "jsonl.zst",
            Compression::None => "jsonl",
        }
    }

    /// The `Content-Type` of a part. No `Content-Encoding` is set: a part is a compressed file
    /// to be read as one (by its extension), not JSON that a client should decompress.
    pub fn content_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/gzip",
            Compression::Zstd => "application/zstd",
            Compression::None => "application/x-ndjson",
        }
    }

    /// The compression of a part, from its file name's extension.
    pub fn of_name(name: &str) -> Option<Compression> {
        [Compression::Gzip, Compression::Zstd, Compression::None]
            .into_iter()
            .find(|c| {
                name.strip_suffix(c.extension())
                    .is_some_and(|stem| stem.ends_with('.'))
            })
    }
}

/// Where the process runs: the Lambda function needs its AWS resources named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// As the AWS Lambda function.
    Lambda,
    /// As the local command.
    Local,
}

/// Every setting of the replicator, validated.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where the Mixpanel credentials come from.
    pub credentials: CredentialsSource,
    /// Data residency.
    pub residency: Residency,
    /// Query API base URL (residency host or override).
    pub api_url: String,
    /// Export API base URL (residency host or override).
    pub data_url: String,
    /// The project's timezone: decides day boundaries and "today".
    pub timezone: TimeZone,
    /// The timezone's IANA name.
    pub timezone_name: String,
    /// How export `time` is encoded.
    pub export_time_mode: ExportTimeMode,
    /// First day replicated.
    pub start_date: Date,
    /// Days re-replicated on every incremental run.
    pub attribution_window_days: u32,
    /// Only these events are exported (all when `None`).
    pub export_events: Option<Vec<String>>,
    /// `true`: new properties are captured; `false`: only the first discovered ones.
    pub select_properties_by_default: bool,
    /// S3 bucket, when output goes to S3.
    pub output_bucket: Option<String>,
    /// Key prefix of every S3 object.
    pub output_prefix: String,
    /// Key prefix inside a local output folder: empty unless `OUTPUT_PREFIX` is set.
    pub local_prefix: String,
    /// DynamoDB state table, when state is kept there.
    pub state_table: Option<String>,
    /// Part compression.
    pub compression: Compression,
    /// Uncompressed bytes after which a part rolls over.
    pub max_file_bytes: u64,
    /// A committed day (or snapshot) is re-queued only when older than this.
    pub refresh: Duration,
    /// Export requests allowed per rate window, shared by all invocations.
    pub export_requests_per_window: u32,
    /// Query API requests allowed per rate window.
    pub query_requests_per_window: u32,
    /// Length of the rate window.
    pub rate_window: Duration,
    /// Export requests allowed per second.
    pub export_requests_per_second: u32,
    /// Export requests in flight at once.
    pub export_concurrency: u32,
    /// Query API requests in flight at once.
    pub query_concurrency: u32,
    /// Time budget of one invocation when no deadline is known.
    pub time_budget: Duration,
    /// Complete snapshots kept per full table.
    pub snapshot_retention: u32,
    /// Days read with one query by the date-sliced query tables (funnels, revenue).
    pub date_window_days: u32,
    /// Failed attempts in a row after which a slice is parked.
    pub max_slice_attempts: u32,
    /// Most contiguous small export days fetched with one request (1: every day alone).
    pub export_window_days: u32,
    /// The wait before a failed slice is tried again; it doubles with each failure in a row.
    pub slice_retry_backoff: Duration,
    /// How long a table found not allowed by the plan is answered `skipped` without asking.
    pub skip_recheck: Duration,
    /// A re-read with fewer than this percentage of the committed rows is not committed.
    pub shrink_guard_percent: u32,
    /// `ENGAGE_FULL_REFRESH_DAYS`: an engage snapshot lists every profile when the last full
    /// listing is this old (else only the profiles changed since the previous snapshot);
    /// `0`: every snapshot is a full listing.
    pub engage_full_refresh: Duration,
    /// `ENGAGE_LAST_SEEN_MARGIN_MINUTES`: an incremental engage listing asks for the profiles
    /// whose `$last_seen` is at or after the previous snapshot's start less this margin.
    pub engage_last_seen_margin: Duration,
    /// `FAN_OUT_QUEUE_URL`: the SQS queue a range event (and a scheduled invocation with more
    /// pending days than it can finish) sends its day events to, for the queue's event source
    /// mapping to run them on concurrent invocations. Unset (local runs): nothing is sent.
    pub fan_out_queue_url: Option<String>,
    /// `FAN_OUT_CONCURRENCY`: how many day events a scheduled invocation that cannot finish
    /// the pending days sends to the fan-out queue at most (the queue's concurrency).
    pub fan_out_concurrency: u32,
    /// `GLUE_DATABASE`: the Glue database whose tables (one per replicated table, created by the
    /// stack) are given every discovered column after a commit. Unset: no catalog is kept.
    pub glue_database: Option<String>,
    /// Local output folder (local mode).
    pub output_dir: Option<PathBuf>,
    /// Local state file (local mode).
    pub state_file: Option<PathBuf>,
}

/// Names of every setting variable, for documentation and checks.
pub const VARIABLES: &[&str] = &[
    "MIXPANEL_SECRET_ID",
    "MIXPANEL_API_SECRET",
    "MIXPANEL_SERVICE_ACCOUNT_USERNAME",
    "MIXPANEL_SERVICE_ACCOUNT_SECRET",
    "MIXPANEL_PROJECT_ID",
    "MIXPANEL_REGION",
    "MIXPANEL_PROJECT_TIMEZONE",
    "MIXPANEL_EXPORT_TIME_MODE",
    "MIXPANEL_START_DATE",
    "MIXPANEL_ATTRIBUTION_WINDOW_DAYS",
    "MIXPANEL_EXPORT_EVENTS",
    "MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT",
    "MIXPANEL_API_URL",
    "MIXPANEL_DATA_URL",
    "OUTPUT_BUCKET",
    "OUTPUT_PREFIX",
    "STATE_TABLE",
    "OUTPUT_COMPRESSION",
    "OUTPUT_MAX_FILE_BYTES",
    "MIXPANEL_REFRESH_MINUTES",
    "MIXPANEL_EXPORT_REQUESTS_PER_WINDOW",
    "MIXPANEL_QUERY_REQUESTS_PER_WINDOW",
    "MIXPANEL_RATE_WINDOW_SECONDS",
    "MIXPANEL_EXPORT_REQUESTS_PER_SECOND",
    "MIXPANEL_EXPORT_CONCURRENCY",
    "MIXPANEL_QUERY_CONCURRENCY",
    "INVOCATION_TIME_BUDGET_SECONDS",
    "SNAPSHOT_RETENTION",
    "MIXPANEL_DATE_WINDOW_DAYS",
    "MAX_SLICE_ATTEMPTS",
    "MIXPANEL_EXPORT_WINDOW_DAYS",
    "SLICE_RETRY_BACKOFF_SECONDS",
    "MIXPANEL_SKIP_RECHECK_HOURS",
    "SHRINK_GUARD_PERCENT",
    "ENGAGE_FULL_REFRESH_DAYS",
    "ENGAGE_LAST_SEEN_MARGIN_MINUTES",
    "FAN_OUT_QUEUE_URL",
    "FAN_OUT_CONCURRENCY",
    "GLUE_DATABASE",
];

impl Settings {
    /// Reads the settings from the process environment.
    pub fn from_env(mode: RunMode) -> Result<Settings> {
        Settings::from_lookup(mode, |name| std::env::var(name).ok())
    }

    /// Reads the settings through `lookup` (a variable name to its value).
    pub fn from_lookup(mode: RunMode, lookup: impl Fn(&str) -> Option<String>) -> Result<Settings> {
        // An empty variable counts as unset: templates often pass "" for "not configured".
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };

        let credentials = credentials_source(mode, &get)?;

        let residency = match get("MIXPANEL_REGION")
            .as_deref()
            .map(str::to_ascii_lowercase)
        {
            None => Residency::Us,
            Some(r) => match r.as_str() {
                "us" => Residency::Us,
                "eu" => Residency::Eu,
                "in" => Residency::In,
                _ => {
                    return Err(Error::setting(
                        "MIXPANEL_REGION",
                        format!("{r:?} is not a data residency; use us, eu or in"),
                    ));
                }
            },
        };
        let api_url = match get("MIXPANEL_API_URL") {
            Some(u) => base_url("MIXPANEL_API_URL", &u)?,
            None => residency.api_url().to_string(),
        };
        let data_url = match get("MIXPANEL_DATA_URL") {
            Some(u) => base_url("MIXPANEL_DATA_URL", &u)?,
            None => residency.data_url().to_string(),
        };

        let timezone_name = get("MIXPANEL_PROJECT_TIMEZONE").unwrap_or_else(|| "UTC".into());
        let timezone = TimeZone::get(&timezone_name).map_err(|_| {
            Error::setting(
                "MIXPANEL_PROJECT_TIMEZONE",
                format!(
                    "{timezone_name:?} is not an IANA timezone name (e.g. America/Los_Angeles)"
                ),
            )
        })?;
        let export_time_mode = match get("MIXPANEL_EXPORT_TIME_MODE").as_deref() {
            None | Some("utc") => ExportTimeMode::Utc,
            Some("project_local") => ExportTimeMode::ProjectLocal,
            Some(other) => {
                return Err(Error::setting(
                    "MIXPANEL_EXPORT_TIME_MODE",
                    format!(
                        "{other:?} is not utc or project_local (project_local is for projects created before 2023-01-01)"
                    ),
                ));
            }
        };

        let start_date = match get("MIXPANEL_START_DATE") {
            None => {
                return Err(Error::setting(
                    "MIXPANEL_START_DATE",
                    "is required: the first day to replicate, as YYYY-MM-DD",
                ));
            }
            Some(s) => parse_date(&s).ok_or_else(|| {
                Error::setting(
                    "MIXPANEL_START_DATE",
                    format!("{s:?} is not a date YYYY-MM-DD"),
                )
            })?,
        };

        let attribution_window_days =
            number(&get, "MIXPANEL_ATTRIBUTION_WINDOW_DAYS", 5, 0, 366)? as u32;
        let export_events = get("MIXPANEL_EXPORT_EVENTS").map(|s| {
            s.split(',')
                .map(|e| e.trim().to_string())
                .filter(|e| !e.is_empty())
                .collect::<Vec<_>>()
        });
        let export_events = export_events.filter(|v| !v.is_empty());
        let select_properties_by_default =
            boolean(&get, "MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT", true)?;

        let output_bucket = get("OUTPUT_BUCKET");
        let local_prefix = get("OUTPUT_PREFIX")
            .map(|p| p.trim_matches('/').to_string())
            .unwrap_or_default();
        let output_prefix = if local_prefix.is_empty() {
            "mixpanel".to_string()
        } else {
            local_prefix.clone()
        };
        if output_prefix.split('/').any(|c| c == ".." || c == ".") {
            return Err(Error::setting(
                "OUTPUT_PREFIX",
                "must not contain . or .. components",
            ));
        }
        let state_table = get("STATE_TABLE");
        if mode == RunMode::Lambda {
            if output_bucket.is_none() {
                return Err(Error::setting(
                    "OUTPUT_BUCKET",
                    "is required on Lambda: the S3 bucket to write to",
                ));
            }
            if state_table.is_none() {
                return Err(Error::setting(
                    "STATE_TABLE",
                    "is required on Lambda: the DynamoDB table (pk, sk strings) that keeps the state",
                ));
            }
        }
        let compression = match get("OUTPUT_COMPRESSION")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("gzip") => Compression::Gzip,
            Some("zstd") => Compression::Zstd,
            Some("none") => Compression::None,
            Some(other) => {
                return Err(Error::setting(
                    "OUTPUT_COMPRESSION",
                    format!("{other:?} is not gzip, zstd or none"),
                ));
            }
        };
        let max_file_bytes = number(&get, "OUTPUT_MAX_FILE_BYTES", 134_217_728, 1024, u64::MAX)?;
        let refresh =
            Duration::from_secs(60 * number(&get, "MIXPANEL_REFRESH_MINUTES", 60, 0, 525_600)?);
        let export_requests_per_window = number(
            &get,
            "MIXPANEL_EXPORT_REQUESTS_PER_WINDOW",
            60,
            1,
            1_000_000,
        )? as u32;
        let query_requests_per_window =
            number(&get, "MIXPANEL_QUERY_REQUESTS_PER_WINDOW", 60, 1, 1_000_000)? as u32;
        let rate_window = Duration::from_secs(number(
            &get,
            "MIXPANEL_RATE_WINDOW_SECONDS",
            3600,
            1,
            86_400,
        )?);
        let export_requests_per_second =
            number(&get, "MIXPANEL_EXPORT_REQUESTS_PER_SECOND", 3, 1, 10_000)? as u32;
        let export_concurrency =
            number(&get, "MIXPANEL_EXPORT_CONCURRENCY", 100, 1, 10_000)? as u32;
        let query_concurrency = number(&get, "MIXPANEL_QUERY_CONCURRENCY", 5, 1, 10_000)? as u32;
        let time_budget = Duration::from_secs(number(
            &get,
            "INVOCATION_TIME_BUDGET_SECONDS",
            840,
            1,
            86_400,
        )?);
        let snapshot_retention = number(&get, "SNAPSHOT_RETENTION", 7, 1, 10_000)? as u32;
        let date_window_days = number(&get, "MIXPANEL_DATE_WINDOW_DAYS", 30, 1, 366)? as u32;
        let max_slice_attempts = number(&get, "MAX_SLICE_ATTEMPTS", 5, 1, 1000)? as u32;
        let export_window_days = number(&get, "MIXPANEL_EXPORT_WINDOW_DAYS", 30, 1, 366)? as u32;
        // On Lambda the schedule spaces attempts anyway: five minutes, doubling, so that a
        // Mixpanel incident of an hour parks nothing. `sync` is watched by a person: seconds.
        let backoff_default = match mode {
            RunMode::Lambda => 300,
            RunMode::Local => 2,
        };
        let slice_retry_backoff = Duration::from_secs(number(
            &get,
            "SLICE_RETRY_BACKOFF_SECONDS",
            backoff_default,
            0,
            86_400,
        )?);
        let skip_recheck =
            Duration::from_secs(3600 * number(&get, "MIXPANEL_SKIP_RECHECK_HOURS", 24, 0, 8760)?);
        let shrink_guard_percent = number(&get, "SHRINK_GUARD_PERCENT", 50, 0, 100)? as u32;
        let engage_full_refresh =
            Duration::from_secs(86_400 * number(&get, "ENGAGE_FULL_REFRESH_DAYS", 7, 0, 3650)?);
        let engage_last_seen_margin = Duration::from_secs(
            60 * number(&get, "ENGAGE_LAST_SEEN_MARGIN_MINUTES", 60, 0, 10_080)?,
        );
        // An SQS queue URL (`https://sqs.REGION.amazonaws.com/ACCOUNT/NAME`); plain http only to
        // a loopback endpoint (tests).
        let fan_out_concurrency = number(&get, "FAN_OUT_CONCURRENCY", 3, 1, 1000)? as u32;
        // Athena's database names: lowercase letters, digits and underscores.
        let glue_database = match get("GLUE_DATABASE") {
            None => None,
            Some(name)
                if name.len() <= 255
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') =>
            {
                Some(name)
            }
            Some(name) => {
                return Err(Error::setting(
                    "GLUE_DATABASE",
                    format!(
                        "{name:?} is not a Glue database name Athena can query (lowercase letters, digits and underscores, at most 255)"
                    ),
                ));
            }
        };
        let fan_out_queue_url = match get("FAN_OUT_QUEUE_URL") {
            None => None,
            Some(u) => {
                let url = base_url("FAN_OUT_QUEUE_URL", &u)?;
                let path = url
                    .split_once("://")
                    .and_then(|(_, rest)| rest.split_once('/'))
                    .map(|(_, path)| path)
                    .unwrap_or("");
                if path.split('/').filter(|p| !p.is_empty()).count() != 2 {
                    return Err(Error::setting(
                        "FAN_OUT_QUEUE_URL",
                        format!(
                            "{url:?} is not an SQS queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME)"
                        ),
                    ));
                }
                Some(url)
            }
        };

        Ok(Settings {
            credentials,
            residency,
            api_url,
            data_url,
            timezone,
            timezone_name,
            export_time_mode,
            start_date,
            attribution_window_days,
            export_events,
            select_properties_by_default,
            output_bucket,
            output_prefix,
            local_prefix,
            state_table,
            compression,
            max_file_bytes,
            refresh,
            export_requests_per_window,
            query_requests_per_window,
            rate_window,
            export_requests_per_second,
            export_concurrency,
            query_concurrency,
            time_budget,
            snapshot_retention,
            date_window_days,
            max_slice_attempts,
            export_window_days,
            slice_retry_backoff,
            skip_recheck,
            shrink_guard_percent,
            engage_full_refresh,
            engage_last_seen_margin,
            fan_out_queue_url,
            fan_out_concurrency,
            glue_database,
            output_dir: None,
            state_file: None,
        })
    }
}

fn credentials_source(
    mode: RunMode,
    get: &impl Fn(&str) -> Option<String>,
) -> Result<CredentialsSource> {
    if let Some(id) = get("MIXPANEL_SECRET_ID") {
        return Ok(CredentialsSource::SecretsManager { secret_id: id });
    }
    if mode == RunMode::Lambda {
        return Err(Error::setting(
            "MIXPANEL_SECRET_ID",
            "is required on Lambda: the Secrets Manager id or ARN of the Mixpanel credentials",
        ));
    }
    let user = get("MIXPANEL_SERVICE_ACCOUNT_USERNAME");
    let secret = get("MIXPANEL_SERVICE_ACCOUNT_SECRET");
    match (user, secret) {
        (Some(username), Some(secret)) => {
            let project_id = match get("MIXPANEL_PROJECT_ID") {
                None => {
                    return Err(Error::setting(
                        "MIXPANEL_PROJECT_ID",
                        "is required with a service account",
                    ));
                }
                Some(p) => p.parse::<u64>().map_err(|_| {
                    Error::setting(
                        "MIXPANEL_PROJECT_ID",
                        format!("{p:?} is not a numeric project id"),
                    )
                })?,
            };
            Ok(CredentialsSource::Static(Credentials::service_account(
                username, secret, project_id,
            )))
        }
        (Some(_), None) => Err(Error::setting(
            "MIXPANEL_SERVICE_ACCOUNT_SECRET",
            "is required with MIXPANEL_SERVICE_ACCOUNT_USERNAME",
        )),
        (None, Some(_)) => Err(Error::setting(
            "MIXPANEL_SERVICE_ACCOUNT_USERNAME",
            "is required with MIXPANEL_SERVICE_ACCOUNT_SECRET",
        )),
        (None, None) => match get("MIXPANEL_API_SECRET") {
            Some(s) => Ok(CredentialsSource::Static(Credentials::api_secret(s))),
            None => Err(Error::setting(
                "MIXPANEL_API_SECRET",
                "no Mixpanel credentials: set MIXPANEL_API_SECRET, or MIXPANEL_SERVICE_ACCOUNT_USERNAME, \
                 MIXPANEL_SERVICE_ACCOUNT_SECRET and MIXPANEL_PROJECT_ID, or MIXPANEL_SECRET_ID",
            )),
        },
    }
}

/// Parses `YYYY-MM-DD` strictly.
pub fn parse_date(s: &str) -> Option<Date> {
    if s.len() != 10 {
        return None;
    }
    s.parse::<Date>().ok()
}

/// A base URL override: https, or http only to a loopback host (the simulator, tests).
fn base_url(name: &str, value: &str) -> Result<String> {
    let v = value.trim_end_matches('/');
    let rest = if let Some(r) = v.strip_prefix("https://") {
        r
    } else if let Some(r) = v.strip_prefix("http://") {
        let host = r.split(['/', ':']).next().unwrap_or("");
        let host = if r.starts_with('[') {
            r.split(']').next().unwrap_or("").trim_start_matches('[')
        } else {
            host
        };
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .map(|ip| ip.is_loopback())
                .unwrap_or(false);
        if !loopback {
            return Err(Error::setting(
                name,
                format!("{v:?} must use https (plain http only to a loopback address)"),
            ));
        }
        r
    } else {
        return Err(Error::setting(name, format!("{v:?} is not an http(s) URL")));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(Error::setting(name, format!("{v:?} has no host")));
    }
    Ok(v.to_string())
}

fn number(
    get: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64> {
    match get(name) {
        None => Ok(default),
        Some(s) => match s.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            Ok(n) => Err(Error::setting(
                name,
                format!("{n} is out of range {min}..={max}"),
            )),
            Err(_) => Err(Error::setting(name, format!("{s:?} is not a whole number"))),
        },
    }
}

fn boolean(get: &impl Fn(&str) -> Option<String>, name: &str, default: bool) -> Result<bool> {
    match get(name).as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => Ok(default),
        Some("true" | "1" | "yes") => Ok(true),
        Some("false" | "0" | "no") => Ok(false),
        Some(other) => Err(Error::setting(
            name,
            format!("{other:?} is not true or false"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(RunMode::Local, |k| map.get(k).cloned())
    }

    #[test]
    fn missing_start_date_names_the_variable() {
        let e = settings(&[("MIXPANEL_API_SECRET", "s")]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("MIXPANEL_START_DATE: is required"),
            "{e}"
        );
    }

    #[test]
    fn region_picks_hosts_and_overrides_replace_them() {
        let base = [
            ("MIXPANEL_API_SECRET", "s"),
            ("MIXPANEL_START_DATE", "2026-11-01"),
        ];
        let s = settings(&base).unwrap();
        assert_eq!(
            (s.api_url.as_str(), s.data_url.as_str()),
            ("https://mixpanel.com", "https://data.mixpanel.com")
        );
        let s = settings(&[base[0], base[1], ("MIXPANEL_REGION", "EU")]).unwrap();
        assert_eq!(
            (s.api_url.as_str(), s.data_url.as_str()),
            ("https://eu.mixpanel.com", "https://data-eu.mixpanel.com")
        );
        let s = settings(&[base[0], base[1], ("MIXPANEL_REGION", "in")]).unwrap();
        assert_eq!(
            (s.api_url.as_str(), s.data_url.as_str()),
            ("https://in.mixpanel.com", "https://data-in.mixpanel.com")
        );
        let s = settings(&[
            base[0],
            base[1],
            ("MIXPANEL_REGION", "eu"),
            ("MIXPANEL_DATA_URL", "http://127.0.0.1:9000/"),
        ])
        .unwrap();
        assert_eq!(
            (s.api_url.as_str(), s.data_url.as_str()),
            ("https://eu.mixpanel.com", "http://127.0.0.1:9000")
        );
    }

    #[test]
    fn plain_http_is_refused_except_to_loopback() {
        let e = settings(&[
            ("MIXPANEL_API_SECRET", "s"),
            ("MIXPANEL_START_DATE", "2026-11-01"),
            ("MIXPANEL_API_URL", "http://example.com"),
        ])
        .unwrap_err();
        assert!(e.to_string().starts_with("MIXPANEL_API_URL: "), "{e}");
    }

    #[test]
    fn malformed_values_name_their_variable() {
        for (var, value) in [
            ("MIXPANEL_REGION", "mars"),
            ("MIXPANEL_PROJECT_TIMEZONE", "Mars/Olympus"),
            ("MIXPANEL_START_DATE", "2026-13-01"),
            ("MIXPANEL_ATTRIBUTION_WINDOW_DAYS", "-1"),
            ("MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT", "maybe"),
            ("OUTPUT_COMPRESSION", "zip"),
            ("OUTPUT_MAX_FILE_BYTES", "big"),
            ("MIXPANEL_EXPORT_TIME_MODE", "local"),
            (
                "FAN_OUT_QUEUE_URL",
                "https://sqs.us-east-1.amazonaws.com/fan-out",
            ),
            (
                "FAN_OUT_QUEUE_URL",
                "http://sqs.us-east-1.amazonaws.com/1/fan-out",
            ),
        ] {
            let mut vars = vec![
                ("MIXPANEL_API_SECRET", "s"),
                ("MIXPANEL_START_DATE", "2026-11-01"),
            ];
            vars.retain(|(k, _)| *k != var);
            vars.push((var, value));
            let e = settings(&vars).unwrap_err();
            assert!(e.to_string().starts_with(&format!("{var}: ")), "{var}: {e}");
        }
    }

    #[test]
    fn output_compression_is_gzip_zstd_or_none() {
        let base = [
            ("MIXPANEL_API_SECRET", "s"),
            ("MIXPANEL_START_DATE", "2026-11-01"),
        ];
        assert_eq!(settings(&base).unwrap().compression, Compression::Gzip);
        for (value, expected, extension) in [
            ("gzip", Compression::Gzip, "jsonl.gz"),
            ("zstd", Compression::Zstd, "jsonl.zst"),
            ("ZSTD", Compression::Zstd, "jsonl.zst"),
            ("none", Compression::None, "jsonl"),
        ] {
            let s = settings(&[base[0], base[1], ("OUTPUT_COMPRESSION", value)]).unwrap();
            assert_eq!(s.compression, expected, "{value}");
            assert_eq!(s.compression.extension(), extension, "{value}");
            let name = format!("part-a-00000.{extension}");
            assert_eq!(Compression::of_name(&name), Some(expected), "{name}");
        }
        assert_eq!(Compression::of_name("part-a-00000.json"), None);
        assert_eq!(Compression::of_name("_manifest.json"), None);
        let e = settings(&[base[0], base[1], ("OUTPUT_COMPRESSION", "brotli")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "OUTPUT_COMPRESSION: \"brotli\" is not gzip, zstd or none"
        );
    }

    #[test]
    fn the_fan_out_queue_is_optional_and_a_queue_url() {
        let base = [
            ("MIXPANEL_API_SECRET", "s"),
            ("MIXPANEL_START_DATE", "2026-11-01"),
        ];
        assert_eq!(settings(&base).unwrap().fan_out_queue_url, None);
        let url = "https://sqs.eu-west-1.amazonaws.com/123456789012/replicator-FanOutQueue-AB";
        let s = settings(&[base[0], base[1], ("FAN_OUT_QUEUE_URL", url)]).unwrap();
        assert_eq!(s.fan_out_queue_url.as_deref(), Some(url));
    }

    #[test]
    fn lambda_needs_its_resources() {
        let e = Settings::from_lookup(RunMode::Lambda, |k| {
            (k == "MIXPANEL_START_DATE").then(|| "2026-11-01".to_string())
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("MIXPANEL_SECRET_ID: "), "{e}");
    }

    #[test]
    fn service_account_needs_a_numeric_project_id() {
        let e = settings(&[
            ("MIXPANEL_SERVICE_ACCOUNT_USERNAME", "u.mp-service-account"),
            ("MIXPANEL_SERVICE_ACCOUNT_SECRET", "x"),
            ("MIXPANEL_START_DATE", "2026-11-01"),
        ])
        .unwrap_err();
        assert!(e.to_string().starts_with("MIXPANEL_PROJECT_ID: "), "{e}");
    }
}
