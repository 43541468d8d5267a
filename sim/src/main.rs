//! `mixpanel-sim`: serves a simulated Mixpanel project on loopback until killed.

use std::io::Write;
use std::time::Duration;

use clap::Parser;
use mixpanel_sim::{Date, RateLimit, ServiceAccount, SimConfig, Simulator, TimeMode};

/// Serves a seeded, deterministic Mixpanel Raw Event Export and Query API on 127.0.0.1.
#[derive(Parser, Debug)]
#[command(name = "mixpanel-sim", version)]
struct Args {
    /// Port to bind on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Seed of all generated data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// IANA project timezone.
    #[arg(long, default_value = "UTC")]
    timezone: String,
    /// How `time` and from/to days are encoded: utc or project-local.
    #[arg(long, default_value = "utc", value_parser = ["utc", "project-local"])]
    time_mode: String,
    /// First project-local day with data (default: so that the last day is today, UTC).
    #[arg(long)]
    first_day: Option<Date>,
    /// Number of days with data.
    #[arg(long, default_value_t = 10)]
    days: u32,
    /// Distinct events per day (before duplicates).
    #[arg(long, default_value_t = 200)]
    events_per_day: u32,
    /// Accepted project API secret.
    #[arg(long, default_value = "sim-secret")]
    api_secret: String,
    /// Accepted service account as USERNAME:SECRET:PROJECT_ID.
    #[arg(long)]
    service_account: Option<String>,
    /// Rate limit as REQUESTS/SECONDS (sliding window), e.g. 60/3600.
    #[arg(long)]
    rate_limit: Option<String>,
    /// Number of user profiles (engage).
    #[arg(long, default_value_t = 300)]
    profiles: u32,
    /// Number of cohorts (the last of two or more is empty).
    #[arg(long, default_value_t = 4)]
    cohorts: u32,
    /// Number of funnels.
    #[arg(long, default_value_t = 3)]
    funnels: u32,
    /// Number of annotations.
    #[arg(long, default_value_t = 5)]
    annotations: u32,
    /// Seconds an engage session_id stays valid.
    #[arg(long, default_value_t = 600)]
    engage_session_ttl_secs: u64,
    /// engage/revenue answers 400 "Timeout Error." as EU projects do.
    #[arg(long)]
    eu_revenue_400: bool,
    /// Comma-separated endpoints the plan does not allow (402), e.g. engage,export.
    #[arg(long, value_delimiter = ',')]
    plan_excludes: Vec<String>,
    /// Each day's export also carries the malformed lines of real exports (odd `time`s, events
    /// split by raw line breaks, control bytes, a line without properties, one not JSON).
    #[arg(long)]
    messy_lines: bool,
    /// Events carry properties whose column names collide (`event`, `Country`/`country`, a
    /// custom `mp_reserved_city`, an empty key, a 1,000-character key).
    #[arg(long)]
    column_collisions: bool,
    /// Most profiles an engage page holds whatever page_size asks (the answer says the size).
    #[arg(long)]
    engage_max_page_size: Option<u32>,
    /// Numeric distinct ids are sent as JSON integers.
    #[arg(long)]
    engage_integer_ids: bool,
    /// Profiles without properties are sent without `$properties`.
    #[arg(long)]
    engage_omit_empty_properties: bool,
    /// events/properties/top answers 400 without `event`.
    #[arg(long)]
    event_properties_require_event: bool,
}

fn parse_service_account(s: &str) -> Result<ServiceAccount, String> {
    let mut it = s.rsplitn(2, ':');
    let project = it.next().unwrap_or("");
    let user_secret = it.next().ok_or("expected USERNAME:SECRET:PROJECT_ID")?;
    let (username, secret) = user_secret
        .split_once(':')
        .ok_or("expected USERNAME:SECRET:PROJECT_ID")?;
    let project_id = project
        .parse()
        .map_err(|_| format!("bad project id {project:?}"))?;
    Ok(ServiceAccount {
        username: username.into(),
        secret: secret.into(),
        project_id,
    })
}

fn parse_rate_limit(s: &str) -> Result<RateLimit, String> {
    let (n, secs) = s.split_once('/').ok_or("expected REQUESTS/SECONDS")?;
    Ok(RateLimit {
        requests: n
            .trim()
            .parse()
            .map_err(|_| format!("bad request count {n:?}"))?,
        window: Duration::from_secs(
            secs.trim()
                .parse()
                .map_err(|_| format!("bad window {secs:?}"))?,
        ),
    })
}

fn config(args: Args) -> Result<SimConfig, String> {
    jiff::tz::TimeZone::get(&args.timezone)
        .map_err(|e| format!("--timezone {:?}: {e}", args.timezone))?;
    let first_day = match args.first_day {
        Some(d) => d,
        None => {
            let today = jiff::Timestamp::now()
                .to_zoned_datetime(jiff::tz::TimeZone::UTC)
                .date();
            today
                .checked_sub(jiff::Span::new().days(i64::from(args.days.max(1)) - 1))
                .map_err(|e| e.to_string())?
        }
    };
    Ok(SimConfig {
        seed: args.seed,
        timezone: args.timezone,
        time_mode: if args.time_mode == "utc" {
            TimeMode::Utc
        } else {
            TimeMode::ProjectLocal
        },
        first_day,
        days: args.days,
        events_per_day: args.events_per_day,
        api_secret: args.api_secret,
        service_account: args
            .service_account
            .as_deref()
            .map(parse_service_account)
            .transpose()?,
        rate_limit: args
            .rate_limit
            .as_deref()
            .map(parse_rate_limit)
            .transpose()?,
        profiles: args.profiles,
        cohorts: args.cohorts,
        funnels: args.funnels,
        annotations: args.annotations,
        engage_session_ttl: Duration::from_secs(args.engage_session_ttl_secs),
        eu_revenue_400: args.eu_revenue_400,
        plan_excludes: args
            .plan_excludes
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        messy_lines: args.messy_lines,
        column_collisions: args.column_collisions,
        engage_max_page_size: args.engage_max_page_size,
        engage_integer_ids: args.engage_integer_ids,
        engage_omit_empty_properties: args.engage_omit_empty_properties,
        event_properties_require_event: args.event_properties_require_event,
    })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let port = args.port;
    let cfg = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mixpanel-sim: {e}");
            std::process::exit(2);
        }
    };
    let running = match Simulator::new(cfg).serve(port).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mixpanel-sim: cannot listen: {e}");
            std::process::exit(1);
        }
    };
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "listening on {}", running.url());
    let _ = stdout.flush();
    std::future::pending::<()>().await;
}
