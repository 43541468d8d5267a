//! The chaos suite's machinery, shared by `tests/chaos.rs` and `benches/chaos_soak.rs`.
//!
//! One seed is one tiny simulated project (1–3 days, tens of events, a few profiles and
//! cohorts) and a plan drawn from a PRNG seeded by it: which tables, where the output goes (a
//! local folder and state file, or S3 and DynamoDB on moto behind the fault-injecting proxy),
//! which simulator faults, how often the proxy fails S3/DynamoDB calls, and how the replicator
//! runs — in-process rival workers invoking the handler on the same queue, or the real binary
//! (`sync`) killed with SIGKILL at random points (after a random delay, or exactly at a chosen
//! S3/DynamoDB call of a slice or a commit) and run again. Recovery is by re-invocation; leases
//! of workers that are gone are expired between rounds (what time would do).
//!
//! A watcher checks while it runs that `_latest.json` and the symlink manifests only ever point
//! to complete snapshots, that a day's manifest and symlink manifest never name a missing part,
//! and that bookmarks never move backwards nor pass an uncommitted day. At the end every table
//! must equal the simulator's ground truth exactly, every partition and snapshot folder must
//! hold exactly the parts its manifest lists (and its symlink manifest name exactly those), and
//! every bookmark must have reached today.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::civil::Date;
use mixpanel_replicator::app::App;
use mixpanel_replicator::config::{RunMode, Settings};
use mixpanel_replicator::handler::{self, Status};
use mixpanel_replicator::run::commit::{Manifest, key};
use mixpanel_replicator::sink::ObjectSink;
use mixpanel_replicator::sink::local::LocalSink;
use mixpanel_replicator::sink::s3::S3Sink;
use mixpanel_replicator::state::dynamo::DynamoStore;
use mixpanel_replicator::state::local::LocalStore;
use mixpanel_replicator::state::{SliceId, SliceRecord, SliceStatus, StateStore};
use mixpanel_replicator::tables::Table;
use mixpanel_sim::{Fault, FaultRule, SimConfig, Simulator};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::harness::{Aws, Project, canonical, days, minus, today_in};
use super::proxy::{Action, Proxy, RequestInfo, Schedule};

/// The replicator binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_mixpanel-replicator");

/// The credentials secret every AWS seed's in-process workers read (the simulator's secret).
pub const SECRET_ID: &str = "chaos/mixpanel";

/// A small PRNG (splitmix64): the same seed always gives the same plan.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0xA076_1D64_78BD_642F) ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// One of `items`.
    pub fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.range(0, items.len() as u64 - 1) as usize].clone()
    }

    /// A duration in `lo_ms..=hi_ms` milliseconds.
    pub fn millis(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(self.range(lo_ms, hi_ms))
    }
}

/// Where output and state go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A local folder and state file.
    Local,
    /// S3 and DynamoDB on moto, through the fault-injecting proxy.
    Aws,
}

/// How the replicator runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Driver {
    /// In-process workers invoking the handler (`{"table": T}`) on the same queue at once.
    Workers(usize),
    /// The real binary (`sync`), killed with SIGKILL at each of `kills` (with a rival process
    /// beside it when `rival`), then run again until everything is committed.
    Killed {
        /// Where each killed run is killed.
        kills: Vec<KillPoint>,
        /// A second process syncs the same queue during the killed runs.
        rival: bool,
    },
}

/// Where a killed run is killed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KillPoint {
    /// After this long.
    After(Duration),
    /// When the n-th S3/DynamoDB request (from 0) arrives, before moto sees it.
    NthRequest(u64),
    /// When a PUT of an object whose key ends with this name arrives, before moto sees it.
    BeforePut(&'static str),
    /// At the first request after a PUT of an object whose key ends with this name.
    AfterPut(&'static str),
    /// When the n-th DynamoDB UpdateItem (from 0) arrives: claims, fencing, completion, release.
    NthUpdate(u64),
    /// At the first request after the `nth` (from 0) DynamoDB call whose body contains `needle`
    /// (e.g. [`COMPLETION`]: right after a slice was marked committed).
    AfterState {
        /// Text of the call's JSON body.
        needle: &'static str,
        /// Which matching call.
        nth: u64,
    },
}

/// In the body of the DynamoDB call that marks a slice committed, and only there.
pub const COMPLETION: &str = "committed_at_ms = :now";
/// In the body of the DynamoDB call that moves a bookmark.
pub const BOOKMARK: &str = "SET #day = :day";

/// How often the proxy fails S3/DynamoDB requests.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProxyFaults {
    /// 500/503 answers.
    pub error: f64,
    /// Connections dropped before the request reached moto.
    pub drop_before: f64,
    /// Connections dropped after moto applied the request.
    pub drop_after: f64,
    /// Requests delayed by up to 300 ms.
    pub delay: f64,
}

/// Everything a seed does, drawn from its PRNG.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The seed.
    pub seed: u64,
    /// Output and state.
    pub target: Target,
    /// How the replicator runs.
    pub driver: Driver,
    /// The project's timezone.
    pub timezone: &'static str,
    /// Days of data (ending yesterday); today is replicated too.
    pub days: u32,
    /// Events per day.
    pub events_per_day: u32,
    /// Profiles (`engage`); above 1,000 the listing has several pages.
    pub profiles: u32,
    /// Cohorts.
    pub cohorts: u32,
    /// Funnels.
    pub funnels: u32,
    /// Annotations.
    pub annotations: u32,
    /// The tables replicated.
    pub tables: Vec<Table>,
    /// The time budget of one invocation.
    pub budget: Duration,
    /// Faults the simulator injects.
    pub sim_faults: Vec<FaultRule>,
    /// When (after the start) every engage session is expired.
    pub expire_sessions: Vec<Duration>,
    /// S3/DynamoDB faults (AWS only).
    pub proxy: ProxyFaults,
    /// An export day Mixpanel always rejects: it must end parked, and only it.
    pub parked_day: Option<Date>,
    /// Other settings.
    pub settings: Vec<(&'static str, String)>,
}

const SNAPSHOT_TABLES: [Table; 4] = [
    Table::Engage,
    Table::CohortMembers,
    Table::Cohorts,
    Table::Annotations,
];

fn path_of(rng: &mut Rng, table: Table) -> &'static str {
    match table {
        Table::Export => "/api/2.0/export",
        Table::Engage | Table::CohortMembers => "/api/2.0/engage",
        Table::Cohorts => "/api/2.0/cohorts/list",
        Table::Annotations => "/api/2.0/annotations",
        Table::Funnels => rng.pick(&["/api/2.0/funnels/list", "/api/2.0/funnels"]),
        Table::Revenue => "/api/2.0/engage/revenue",
    }
}

/// A 200 export body that must fail the attempt: a last line cut short without its newline,
/// an HTML page, an error object, lines of which none is an event. (Unusable lines among events
/// no longer fail a day: they are kept under `_rejected/`.) Its valid lines are events the
/// ground truth does not have, so committing any of it shows.
fn bad_export_body(rng: &mut Rng, day: Date) -> String {
    let t = day
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .map(|z| z.timestamp().as_second())
        .unwrap_or(0)
        + 3600;
    let valid = |i: u32| {
        format!(
            r#"{{"event":"Chaos","properties":{{"time":{t},"distinct_id":"chaos-{i}","$insert_id":"chaos-{i}","mp_processing_time_ms":{}}}}}"#,
            t * 1000
        )
    };
    match rng.range(0, 5) {
        0 => format!(
            "{}\n{{\"event\":\"Chaos\",\"properties\":{{\"time\":{t},",
            valid(1)
        ),
        1 => "this is not JSON\n{\"event\":\"Chaos\"}\n".to_string(),
        2 => format!("{}\n{}", valid(1), &valid(2)[..40]),
        3 => "<html><head><title>Mixpanel</title></head><body>Temporarily unavailable</body></html>\n"
            .to_string(),
        4 => "[1,2,3]\n".to_string(),
        _ => "{\"error\": \"Internal error\"}\n".to_string(),
    }
}

impl Plan {
    /// The plan of `seed`.
    pub fn new(seed: u64) -> Plan {
        let mut rng = Rng::new(seed);
        let target = if rng.chance(0.5) {
            Target::Local
        } else {
            Target::Aws
        };
        let timezone = rng.pick(&["UTC", "America/Los_Angeles", "Asia/Kolkata"]);
        let days = rng.range(1, 3) as u32;
        let events_per_day = rng.range(10, 60) as u32;
        let profiles = if rng.chance(0.15) {
            rng.range(1001, 2200) as u32
        } else {
            rng.range(3, 40) as u32
        };
        let mut tables = vec![Table::Export];
        let snapshots = rng.range(1, 2);
        while (tables.len() as u64) < 1 + snapshots {
            let t = rng.pick(&SNAPSHOT_TABLES);
            if !tables.contains(&t) {
                tables.push(t);
            }
        }
        if rng.chance(0.25) {
            tables.push(rng.pick(&[Table::Funnels, Table::Revenue]));
        }
        let killed = rng.chance(0.4);
        // The binary takes whole seconds; its Mixpanel backoff is not shortened.
        let budget = if killed {
            Duration::from_secs(rng.range(3, 4))
        } else {
            rng.millis(1500, 3000)
        };
        let today = today_in(timezone);
        let first = minus(today, i64::from(days));

        let mut sim_faults = Vec::new();
        let mut per_path: BTreeMap<&str, u32> = BTreeMap::new();
        let mut heavy_export = false;
        for _ in 0..rng.range(0, 5) {
            let table = rng.pick(&tables);
            let path = path_of(&mut rng, table);
            // More failures in a row than the client retries would only fail invocations, and a
            // 429 left to `sync` makes it wait seconds: keep each path's run of faults short.
            let used = per_path.entry(path).or_default();
            if *used >= 3 {
                continue;
            }
            let from_date = (table == Table::Export && rng.chance(0.6))
                .then(|| minus(today, rng.range(0, u64::from(days)) as i64));
            let fault = match rng.range(0, 7) {
                // `sync` waits 5 s and more after a 429 the client gave up on (near a deadline):
                // 429s are for the in-process workers, which answer the error instead.
                0 if !killed => Fault::RateLimited {
                    retry_after_secs: rng.pick(&[None, Some(0), Some(1)]),
                },
                1 => Fault::ServerError {
                    status: rng.pick(&[500, 502, 503, 504]),
                },
                2 => Fault::TerminatedEarly {
                    after_lines: rng.range(0, 30) as usize,
                },
                3 => Fault::CutBody {
                    after_lines: rng.range(0, 30) as usize,
                },
                4 => Fault::SlowFirstByte {
                    delay: budget + Duration::from_millis(300),
                },
                5 if table == Table::Export => Fault::Status {
                    status: 200,
                    body: bad_export_body(&mut rng, from_date.unwrap_or(first)),
                },
                6 if path == "/api/2.0/engage" => Fault::Status {
                    status: 400,
                    body: r#"{"error": "Invalid session_id: session expired", "status": "error"}"#
                        .into(),
                },
                _ => Fault::Status {
                    status: 200,
                    body: "<html><body>Service temporarily unavailable</body></html>".into(),
                },
            };
            let mut times = rng.range(1, u64::from(3 - *used).min(2)) as u32;
            // Two of Mixpanel's heavy-day signs in a row split a day into 24 hours, and on the
            // one shared moto server 24 hours of state calls for 16 seeds at once outlast a
            // seed's time limit (as below): there, one such export fault a seed.
            let heavy = matches!(
                fault,
                Fault::ServerError { .. } | Fault::TerminatedEarly { .. } | Fault::CutBody { .. }
            );
            if target == Target::Aws && table == Table::Export && heavy {
                if heavy_export {
                    continue;
                }
                heavy_export = true;
                times = 1;
            }
            *used += times;
            sim_faults.push(FaultRule {
                path: path.into(),
                from_date,
                times,
                covering: None,
                wider_than: None,
                holding: None,
                param: None,
                fault,
            });
        }
        let expire_sessions = if profiles > 1000 || rng.chance(0.2) {
            (0..rng.range(1, 3)).map(|_| rng.millis(0, 2500)).collect()
        } else {
            Vec::new()
        };
        let proxy = if target == Target::Local {
            ProxyFaults::default()
        } else {
            // The binary keeps the SDK's default retries (backoff up to seconds per fault): its
            // seeds get the lighter mixes, the in-process workers the heavy one too.
            match rng.range(0, if killed { 2 } else { 3 }) {
                0 => ProxyFaults::default(),
                1 => ProxyFaults {
                    error: 0.03,
                    drop_before: 0.01,
                    drop_after: 0.01,
                    delay: 0.03,
                },
                _ => ProxyFaults {
                    error: 0.08,
                    drop_before: 0.03,
                    drop_after: 0.03,
                    delay: 0.05,
                },
            }
        };
        let driver = if killed {
            let kills = (0..rng.range(1, 2))
                .map(|_| match (target, rng.range(0, 6)) {
                    (Target::Local, _) | (_, 0) => KillPoint::After(rng.millis(30, 1500)),
                    (_, 1) => KillPoint::NthRequest(rng.range(0, 120)),
                    (_, 2) => KillPoint::NthUpdate(rng.range(0, 30)),
                    (_, 3) => KillPoint::BeforePut(rng.pick(&["_manifest.json", "_latest.json"])),
                    (_, 4) => KillPoint::AfterPut(rng.pick(&["_manifest.json", "_latest.json"])),
                    _ => KillPoint::AfterState {
                        needle: rng.pick(&[COMPLETION, BOOKMARK]),
                        nth: rng.range(0, 4),
                    },
                })
                .collect();
            Driver::Killed {
                kills,
                rival: rng.chance(0.3),
            }
        } else {
            Driver::Workers(rng.range(1, 4) as usize)
        };
        let settings = vec![
            ("SNAPSHOT_RETENTION", rng.pick(&["1", "2", "7"]).to_string()),
            (
                "MIXPANEL_DATE_WINDOW_DAYS",
                rng.pick(&["1", "2", "30"]).to_string(),
            ),
            (
                "OUTPUT_MAX_FILE_BYTES",
                // Tiny parts mean many objects: on moto, a few at most.
                match target {
                    Target::Local => rng.pick(&["1024", "4096", "134217728"]),
                    Target::Aws => rng.pick(&["16384", "134217728"]),
                }
                .to_string(),
            ),
            (
                "INVOCATION_TIME_BUDGET_SECONDS",
                budget.as_secs().max(1).to_string(),
            ),
            // The chaos is in the faults, not in the shared request budget.
            ("MIXPANEL_EXPORT_REQUESTS_PER_WINDOW", "100000".to_string()),
            ("MIXPANEL_QUERY_REQUESTS_PER_WINDOW", "100000".to_string()),
            // Its faults pass: a slice they fail is tried again at once, and never parked (the
            // parking of persistent faults is tested in tests/never_stall.rs).
            ("SLICE_RETRY_BACKOFF_SECONDS", "0".to_string()),
            ("MAX_SLICE_ATTEMPTS", "1000".to_string()),
        ];
        let mut plan = Plan {
            seed,
            target,
            driver,
            timezone,
            days,
            events_per_day,
            profiles,
            cohorts: rng.range(1, 3) as u32,
            funnels: rng.range(1, 2) as u32,
            annotations: rng.range(1, 4) as u32,
            tables,
            budget,
            sim_faults,
            expire_sessions,
            proxy,
            parked_day: None,
            settings,
        };
        // Drawn last, so the other draws of a seed stay what they were: a first day whose body
        // comes so slowly that it does not fit in one invocation, so it is split into hours.
        // (Local targets only: on the one shared moto server, 24 hours of state calls per day
        // for 16 seeds at once outlast a seed's time limit.)
        if plan.tables.contains(&Table::Export) && rng.chance(0.2) && target == Target::Local {
            let per_second = f64::from(events_per_day) / (1.3 * budget.as_secs_f64());
            plan.sim_faults.push(FaultRule {
                path: "/api/2.0/export".into(),
                from_date: Some(first),
                times: 100_000,
                covering: None,
                wider_than: None,
                holding: None,
                param: None,
                fault: Fault::SlowBody {
                    lines_per_second: (per_second as u32).max(1),
                },
            });
        }
        // Drawn after that: a persistent fault, an export day Mixpanel rejects on every request
        // (the in-process workers only: `sync` ends non-zero when it parks one). It must be
        // parked after MAX_SLICE_ATTEMPTS while every other slice still commits exactly.
        // (UTC projects only: a rule covers a request's UTC days, and a local day of another
        // timezone shares each of its UTC days with a neighbour. Local targets only: on moto
        // the proxy's storage faults could fail another slice that many times too.)
        if plan.tables.contains(&Table::Export)
            && matches!(plan.driver, Driver::Workers(_))
            && rng.chance(0.25)
            && timezone == "UTC"
            && target == Target::Local
        {
            let day = minus(today, rng.range(1, u64::from(days)) as i64);
            plan.sim_faults.push(FaultRule::export_day(
                day,
                None,
                Fault::Status {
                    status: 400,
                    body: r#"{"request": "/api/2.0/export", "error": "invalid request"}"#.into(),
                },
            ));
            plan.parked_day = Some(day);
            // Every other slice meets at most three of the passing faults (three a path): one
            // attempt more parks only the day that always fails.
            for (name, value) in plan.settings.iter_mut() {
                if *name == "MAX_SLICE_ATTEMPTS" {
                    *value = rng.range(4, 5).to_string();
                }
            }
        }
        plan
    }

    /// The simulator's configuration.
    pub fn sim_config(&self) -> SimConfig {
        SimConfig {
            seed: self.seed,
            timezone: self.timezone.into(),
            first_day: minus(today_in(self.timezone), i64::from(self.days)),
            days: self.days,
            events_per_day: self.events_per_day,
            profiles: self.profiles,
            cohorts: self.cohorts,
            funnels: self.funnels,
            annotations: self.annotations,
            ..SimConfig::default()
        }
    }

    /// The proxy's schedule of S3/DynamoDB faults.
    pub fn schedule(&self, salt: u64) -> Schedule {
        let faults = self.proxy;
        let mut rng = Rng::new(self.seed ^ salt.wrapping_mul(0x2545_F491_4F6C_DD1D));
        Box::new(move |_info: &RequestInfo| {
            let x = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let mut edge = faults.error;
            if x < edge {
                return Action::Error(if rng.chance(0.5) { 500 } else { 503 });
            }
            edge += faults.drop_before;
            if x < edge {
                return Action::DropBefore;
            }
            edge += faults.drop_after;
            if x < edge {
                return Action::DropAfter;
            }
            edge += faults.delay;
            if x < edge {
                return Action::Delay(rng.millis(20, 300));
            }
            Action::Pass
        })
    }
}

/// The shared servers of a chaos run: moto (when some seed writes to AWS).
pub struct ChaosEnv {
    /// moto, with the secret every AWS seed reads.
    pub aws: Option<Aws>,
}

impl ChaosEnv {
    /// Starts moto when `with_aws`.
    pub async fn start(with_aws: bool) -> ChaosEnv {
        let aws = if with_aws {
            let aws = Aws::start().await;
            super::aws::put_secret(
                &aws_sdk_secretsmanager::Client::new(&aws.sdk),
                SECRET_ID,
                &json!({"api_secret": SimConfig::default().api_secret}).to_string(),
            )
            .await;
            Some(aws)
        } else {
            None
        };
        ChaosEnv { aws }
    }
}

/// What a seed did.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Handler invocations (in-process workers).
    pub invocations: u64,
    /// Invocations that answered an error.
    pub failed_invocations: u64,
    /// Binary runs, and how many of them were killed.
    pub runs: u64,
    /// Binary runs killed with SIGKILL.
    pub kills: u64,
    /// Rounds until everything was committed.
    pub rounds: u64,
    /// Simulator faults that were served.
    pub sim_faults: u64,
    /// S3/DynamoDB faults the proxy injected.
    pub proxy_faults: u64,
    /// Leases of gone workers expired between rounds.
    pub expired_leases: u64,
    /// Watcher checks made while it ran.
    pub checks: u64,
    /// Invocations that answered after their deadline (more than 1 s late).
    pub overruns: u64,
    /// The latest answer after a deadline, in milliseconds.
    pub worst_overrun_ms: u64,
    /// The late answers: table, answer, how late.
    pub late: Vec<String>,
    /// Wall time of the seed, in milliseconds.
    pub elapsed_ms: u64,
    /// Temporary files left in the output folder (local) by killed processes.
    pub temp_files: u64,
}

/// Runs the seed; `Err` describes every invariant that failed, with the plan.
pub async fn run_seed(env: &ChaosEnv, seed: u64) -> Result<Outcome, String> {
    let plan = Plan::new(seed);
    // Sixteen seeds share two cores and one moto server: a seed with a day split into hours
    // runs dozens of invocations.
    let limit = Duration::from_secs(200);
    let started = Instant::now();
    match tokio::time::timeout(limit, run_plan(env, &plan)).await {
        Ok(r) => r.map(|mut o| {
            o.elapsed_ms = started.elapsed().as_millis() as u64;
            o
        }),
        Err(_) => Err(format!(
            "seed {seed}: did not finish within {limit:?}\nplan: {plan:#?}"
        )),
    }
}

/// Direct (fault-free) access to what a seed writes, for the watcher and the final checks.
#[derive(Clone)]
struct View {
    sink: Arc<dyn ObjectSink>,
    store: Arc<dyn StateStore>,
    prefix: String,
}

/// One seed's world: simulator, output, state, proxy.
struct World {
    plan: Plan,
    project: Project,
    dir: tempfile::TempDir,
    proxy: Option<Proxy>,
    bucket: String,
    table: String,
    view: View,
    aws_endpoint: Option<String>,
    direct_sdk: Option<aws_config::SdkConfig>,
    proxied_sdk: Option<aws_config::SdkConfig>,
}

impl World {
    async fn start(env: &ChaosEnv, plan: &Plan) -> Result<World, String> {
        let project = Project::start(plan.sim_config()).await;
        for rule in &plan.sim_faults {
            project.simulator().push_fault(rule.clone());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let bucket = format!("chaos-{}", plan.seed);
        let table = format!("chaos-state-{}", plan.seed);
        let mut world = World {
            plan: plan.clone(),
            project,
            view: View {
                sink: Arc::new(LocalSink::new(dir.path().join("out"))),
                store: Arc::new(
                    LocalStore::open(dir.path().join("out/.state.json"))
                        .map_err(|e| e.to_string())?,
                ),
                prefix: String::new(),
            },
            dir,
            proxy: None,
            bucket,
            table,
            aws_endpoint: None,
            direct_sdk: None,
            proxied_sdk: None,
        };
        if plan.target == Target::Aws {
            let aws = env
                .aws
                .as_ref()
                .ok_or("an AWS seed needs moto: start the ChaosEnv with AWS")?;
            super::aws::create_bucket(&aws_sdk_s3::Client::new(&aws.sdk), &world.bucket).await;
            super::aws::create_state_table(&aws_sdk_dynamodb::Client::new(&aws.sdk), &world.table)
                .await;
            let proxy = Proxy::start(&aws.moto.endpoint(), plan.schedule(0)).await;
            let proxied = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new("us-east-1"))
                .endpoint_url(proxy.endpoint())
                .credentials_provider(aws_sdk_s3::config::Credentials::new(
                    "testing", "testing", None, None, "chaos",
                ))
                .retry_config(
                    aws_config::retry::RetryConfig::standard()
                        .with_max_attempts(3)
                        .with_initial_backoff(Duration::from_millis(20)),
                )
                .load()
                .await;
            world.view = View {
                sink: Arc::new(S3Sink::new(
                    aws_sdk_s3::Client::new(&aws.sdk),
                    world.bucket.clone(),
                )),
                store: Arc::new(DynamoStore::new(
                    aws_sdk_dynamodb::Client::new(&aws.sdk),
                    world.table.clone(),
                )),
                prefix: "mixpanel".into(),
            };
            world.aws_endpoint = Some(proxy.endpoint());
            world.direct_sdk = Some(aws.sdk.clone());
            world.proxied_sdk = Some(proxied);
            world.proxy = Some(proxy);
        }
        Ok(world)
    }

    fn sim(&self) -> &Simulator {
        self.project.simulator()
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    fn vars(&self) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = self
            .project
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.extend(
            self.plan
                .settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone())),
        );
        vars
    }

    /// An in-process app, as one more Lambda container would be.
    async fn app(&self) -> Result<App, String> {
        let mut vars: BTreeMap<String, String> = self.vars().into_iter().collect();
        let (mode, sdk) = match self.plan.target {
            Target::Local => (RunMode::Local, None),
            Target::Aws => {
                vars.remove("MIXPANEL_API_SECRET");
                vars.insert("MIXPANEL_SECRET_ID".into(), SECRET_ID.into());
                vars.insert("OUTPUT_BUCKET".into(), self.bucket.clone());
                vars.insert("STATE_TABLE".into(), self.table.clone());
                (RunMode::Lambda, self.proxied_sdk.clone())
            }
        };
        let mut settings = Settings::from_lookup(mode, |k| vars.get(k).cloned())
            .map_err(|e| format!("settings: {e}"))?;
        if self.plan.target == Target::Local {
            settings.output_dir = Some(self.out());
            settings.state_file = Some(self.out().join(".state.json"));
        }
        let mut app = App::build(settings, sdk)
            .await
            .map_err(|e| format!("building the app: {e}"))?;
        app.mixpanel = app
            .mixpanel
            .clone()
            .with_base_backoff(Duration::from_millis(20));
        Ok(app)
    }

    /// The binary syncing this seed's tables.
    fn command(&self, log: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.arg("sync");
        for t in &self.plan.tables {
            cmd.args(["--table", t.as_str()]);
        }
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .envs(self.vars());
        match (&self.plan.target, &self.aws_endpoint) {
            (Target::Aws, Some(endpoint)) => {
                cmd.env("OUTPUT_BUCKET", &self.bucket)
                    .env("STATE_TABLE", &self.table)
                    .env("AWS_ENDPOINT_URL", endpoint)
                    .env("AWS_REGION", "us-east-1")
                    .env("AWS_ACCESS_KEY_ID", "testing")
                    .env("AWS_SECRET_ACCESS_KEY", "testing")
                    .env("AWS_EC2_METADATA_DISABLED", "true");
            }
            _ => {
                cmd.arg("--out").arg(self.out());
            }
        }
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map(std::process::Stdio::from)
            .unwrap_or_else(|_| std::process::Stdio::null());
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        cmd
    }

    /// Expires the leases of workers that are gone (none is running): what time would do.
    async fn expire_leases(&self) -> Result<u64, String> {
        match self.plan.target {
            Target::Local => expire_local_leases(&self.out().join(".state.json")),
            Target::Aws => {
                let sdk = self.direct_sdk.as_ref().ok_or("no moto")?;
                expire_dynamo_leases(&aws_sdk_dynamodb::Client::new(sdk), &self.table).await
            }
        }
    }

    /// The day of `table` that must end parked, if any.
    fn parked_day(&self, table: Table) -> Option<Date> {
        self.plan.parked_day.filter(|_| table == Table::Export)
    }

    /// Whether every slice of every table is committed (every day up to today), but the day
    /// that must end parked, which is parked.
    async fn complete(&self) -> Result<bool, String> {
        let today = today_in(self.plan.timezone);
        let first = self.sim().config().first_day;
        for &t in &self.plan.tables {
            let slices = self.view.store.slices(t).await.map_err(|e| e.to_string())?;
            let parked = self.parked_day(t);
            // The day Mixpanel always rejects is done once it is parked.
            let done = |s: &SliceRecord| {
                if s.slice.day().is_some() && s.slice.day() == parked {
                    s.status == SliceStatus::Failed
                } else {
                    s.status == SliceStatus::Committed
                }
            };
            let committed: BTreeSet<SliceId> =
                slices.iter().filter(|s| done(s)).map(|s| s.slice).collect();
            if slices.is_empty() || committed.len() != slices.len() {
                return Ok(false);
            }
            if t.is_date_sliced()
                && days(first, today)
                    .into_iter()
                    .any(|d| !committed.contains(&SliceId::Day(d)))
            {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn expire_local_leases(state: &Path) -> Result<u64, String> {
    if !state.exists() {
        return Ok(0);
    }
    let lock_path = state.with_file_name(format!(
        "{}.lock",
        state.file_name().unwrap_or_default().to_string_lossy()
    ));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| e.to_string())?;
    lock.lock().map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(state).map_err(|e| e.to_string())?;
    let mut v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let mut expired = 0;
    if let Some(tables) = v.get_mut("slices").and_then(Value::as_object_mut) {
        for slices in tables.values_mut().filter_map(Value::as_object_mut) {
            for slice in slices.values_mut() {
                if slice["status"] == "leased" {
                    slice["lease_expires_ms"] = json!(1);
                    expired += 1;
                }
            }
        }
    }
    if expired > 0 {
        let tmp = state.with_extension("chaos-tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&v).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, state).map_err(|e| e.to_string())?;
    }
    Ok(expired)
}

async fn expire_dynamo_leases(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
) -> Result<u64, String> {
    use aws_sdk_dynamodb::types::AttributeValue;
    let mut expired = 0;
    for t in Table::ALL {
        let items = client
            .query()
            .table_name(table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", AttributeValue::S(format!("slice#{t}")))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| format!("{}", aws_sdk_dynamodb::error::DisplayErrorContext(&e)))?;
        for item in items.items() {
            if item
                .get("status")
                .and_then(|s| s.as_s().ok())
                .map(String::as_str)
                != Some("leased")
            {
                continue;
            }
            let (Some(pk), Some(sk)) = (item.get("pk"), item.get("sk")) else {
                continue;
            };
            let expire = client
                .update_item()
                .table_name(table)
                .key("pk", pk.clone())
                .key("sk", sk.clone())
                .update_expression("SET lease_expires_ms = :one")
                .condition_expression("#status = :leased AND lease_owner = :owner")
                .expression_attribute_names("#status", "status")
                .expression_attribute_values(":one", AttributeValue::N("1".into()))
                .expression_attribute_values(":leased", AttributeValue::S("leased".into()))
                .expression_attribute_values(
                    ":owner",
                    item.get("lease_owner")
                        .cloned()
                        .unwrap_or(AttributeValue::Null(true)),
                )
                .send()
                .await;
            match expire {
                Ok(_) => {}
                // The slice moved on meanwhile: nothing to expire.
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
                {
                    continue;
                }
                Err(e) => {
                    return Err(format!(
                        "expiring a lease: {}",
                        aws_sdk_dynamodb::error::DisplayErrorContext(&e)
                    ));
                }
            }
            expired += 1;
        }
    }
    Ok(expired)
}

/// Invariants checked while the replicator runs.
struct Watcher {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<String>, u64)>,
}

impl Watcher {
    fn start(
        view: View,
        tables: Vec<Table>,
        start: Date,
        timezone: &'static str,
        every: Duration,
        pointer_every: u64,
    ) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            let mut violations = Vec::new();
            let mut bookmarks: BTreeMap<Table, Date> = BTreeMap::new();
            let mut checks: u64 = 0;
            loop {
                let last = stopping.load(Ordering::SeqCst);
                checks += 1;
                for &t in &tables {
                    let mut found = Vec::new();
                    if t.is_date_sliced() {
                        found.push(check_bookmark(&view, t, start, &mut bookmarks).await);
                        if last || checks.is_multiple_of(pointer_every) {
                            for day in days(start, today_in(timezone)) {
                                found.push(check_partition(&view, t, day).await);
                            }
                        }
                    } else {
                        found.push(check_latest(&view, t).await);
                    }
                    for v in found.into_iter().filter_map(Result::err) {
                        if !violations.contains(&v) && violations.len() < 10 {
                            violations.push(v);
                        }
                    }
                }
                if last {
                    return (violations, checks);
                }
                tokio::time::sleep(every).await;
            }
        });
        Watcher { stop, task }
    }

    async fn finish(self) -> (Vec<String>, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.task
            .await
            .unwrap_or_else(|e| (vec![format!("the watcher panicked: {e}")], 0))
    }
}

/// The bookmark never moves backwards and every day up to it is committed. (Errors reading
/// are not violations: the next check reads again.)
async fn check_bookmark(
    view: &View,
    table: Table,
    start: Date,
    seen: &mut BTreeMap<Table, Date>,
) -> Result<(), String> {
    let Ok(Some(bookmark)) = view.store.bookmark(table).await else {
        return Ok(());
    };
    if let Some(&before) = seen.get(&table)
        && bookmark < before
    {
        return Err(format!(
            "the {table} bookmark moved backwards from {before} to {bookmark}"
        ));
    }
    seen.insert(table, bookmark);
    // Days never leave the committed state during a seed, so slices read after the bookmark
    // show every day the bookmark passed.
    let Ok(slices) = view.store.slices(table).await else {
        return Ok(());
    };
    for day in days(start, bookmark) {
        let status = slices
            .iter()
            .find(|s| s.slice == SliceId::Day(day))
            .map(|s| s.status);
        if status != Some(SliceStatus::Committed) {
            return Err(format!(
                "the {table} bookmark {bookmark} passes {day}, which is {status:?}"
            ));
        }
    }
    Ok(())
}

/// `_latest.json` and the snapshot's symlink manifest (`_symlink/latest/manifest`), when they
/// exist, point to a complete snapshot: its manifest exists and every part it lists exists with
/// the listed size. A pointer that moved on while it was checked is checked again next time.
async fn check_latest(view: &View, table: Table) -> Result<(), String> {
    let base = key(&view.prefix, table.as_str());
    let pointer = format!("{base}/_latest.json");
    let symlink = format!("{base}/_symlink/latest/manifest");
    let (Ok(latest), Ok(links)) = (view.sink.get(&pointer).await, view.sink.get(&symlink).await)
    else {
        return Ok(());
    };
    let mut problems = Vec::new();
    if let Some(latest) = &latest {
        match latest_problem(view, &base, latest).await {
            Ok(Some(p)) => problems.push(format!(
                "{pointer} points to an incomplete snapshot: {p} ({})",
                String::from_utf8_lossy(latest)
            )),
            Ok(None) => {}
            Err(_) => return Ok(()),
        }
    }
    if let Some(links) = &links {
        match symlink_problem(view, links).await {
            Ok(Some(p)) => problems.push(format!("{symlink} {p}")),
            Ok(None) => {}
            Err(_) => return Ok(()),
        }
    }
    confirmed(view, &[(&pointer, &latest), (&symlink, &links)], problems).await
}

/// A date partition's manifest and symlink manifest, when they exist, list only parts that
/// exist (with the listed sizes): a reader trusting either never misses a part.
async fn check_partition(view: &View, table: Table, day: Date) -> Result<(), String> {
    let base = key(&view.prefix, table.as_str());
    let folder = format!("{base}/date={day}");
    let pointer = format!("{folder}/_manifest.json");
    let symlink = format!("{base}/_symlink/date={day}/manifest");
    let (Ok(manifest), Ok(links)) = (view.sink.get(&pointer).await, view.sink.get(&symlink).await)
    else {
        return Ok(());
    };
    let mut problems = Vec::new();
    if let Some(body) = &manifest {
        match manifest_problem(view, &folder, body).await {
            Ok(Some(p)) => problems.push(format!("{pointer}: {p}")),
            Ok(None) => {}
            Err(_) => return Ok(()),
        }
    }
    if let Some(links) = &links {
        match symlink_problem(view, links).await {
            Ok(Some(p)) => problems.push(format!("{symlink} {p}")),
            Ok(None) => {}
            Err(_) => return Ok(()),
        }
    }
    confirmed(view, &[(&pointer, &manifest), (&symlink, &links)], problems).await
}

/// `problems` as a violation, unless one of the pointers changed while it was checked (a
/// reader racing a commit; the next check looks again).
async fn confirmed(
    view: &View,
    pointers: &[(&String, &Option<bytes::Bytes>)],
    problems: Vec<String>,
) -> Result<(), String> {
    if problems.is_empty() {
        return Ok(());
    }
    for (key, seen) in pointers {
        match view.sink.get(key).await {
            Ok(now) if now == **seen => {}
            _ => return Ok(()),
        }
    }
    Err(problems.join("; "))
}

type SinkResult<T> = Result<T, mixpanel_replicator::error::Error>;

async fn latest_problem(view: &View, base: &str, latest: &[u8]) -> SinkResult<Option<String>> {
    let Ok(v) = serde_json::from_slice::<Value>(latest) else {
        return Ok(Some("it is not JSON".into()));
    };
    let Some(snapshot) = v["snapshot"].as_str() else {
        return Ok(Some("no `snapshot`".into()));
    };
    let folder = format!("{base}/{snapshot}");
    if v["manifest"] != format!("{folder}/_manifest.json") {
        return Ok(Some(format!("`manifest` is not {folder}/_manifest.json")));
    }
    let Some(body) = view.sink.get(&format!("{folder}/_manifest.json")).await? else {
        return Ok(Some("its manifest does not exist".into()));
    };
    manifest_problem(view, &folder, &body).await
}

/// What is wrong with a manifest: a part it lists is missing or has another size.
async fn manifest_problem(view: &View, folder: &str, body: &[u8]) -> SinkResult<Option<String>> {
    let Ok(manifest) = serde_json::from_slice::<Manifest>(body) else {
        return Ok(Some("the manifest is not a manifest".into()));
    };
    let listed: BTreeMap<String, u64> = view
        .sink
        .list(&format!("{folder}/"))
        .await?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    for f in &manifest.files {
        match listed.get(&format!("{folder}/{}", f.name)) {
            Some(&size) if size == f.bytes => {}
            Some(&size) => {
                return Ok(Some(format!(
                    "part {} has {size} bytes, the manifest says {}",
                    f.name, f.bytes
                )));
            }
            None => return Ok(Some(format!("lists {}, which is missing", f.name))),
        }
    }
    Ok(None)
}

/// What is wrong with a symlink manifest: an address that is not an existing object.
async fn symlink_problem(view: &View, links: &[u8]) -> SinkResult<Option<String>> {
    let root = view.sink.url("");
    for url in String::from_utf8_lossy(links).lines() {
        let Some(k) = url.strip_prefix(&root) else {
            return Ok(Some(format!("lists {url}, outside the output")));
        };
        if view.sink.get(k).await?.is_none() {
            return Ok(Some(format!("lists {url}, which is missing")));
        }
    }
    Ok(None)
}

/// The symlink manifest `key` lists exactly the parts of the manifest in `folder`.
async fn check_symlink(view: &View, key: &str, folder: &str) -> Result<(), String> {
    let manifest: Manifest = match view.sink.get(&format!("{folder}/_manifest.json")).await {
        Ok(Some(body)) => serde_json::from_slice(&body).map_err(|e| e.to_string())?,
        other => return Err(format!("{folder}/_manifest.json: {other:?}")),
    };
    let links = match view.sink.get(key).await {
        Ok(Some(body)) => String::from_utf8_lossy(&body).into_owned(),
        Ok(None) => return Err(format!("{key} does not exist")),
        Err(e) => return Err(e.to_string()),
    };
    let listed: Vec<&str> = links.lines().collect();
    let expected: Vec<String> = manifest
        .files
        .iter()
        .map(|f| view.sink.url(&format!("{folder}/{}", f.name)))
        .collect();
    if listed != expected {
        return Err(format!(
            "{key} lists {listed:?}, the committed parts are {expected:?}"
        ));
    }
    Ok(())
}

/// Reads a committed folder: its manifest's parts, checked against the listing (exactly the
/// manifest and its parts), their sizes and record counts. Rows as sorted canonical JSON.
async fn read_folder(view: &View, folder: &str) -> Result<Option<Vec<String>>, String> {
    let sink = &view.sink;
    let Some(body) = sink
        .get(&format!("{folder}/_manifest.json"))
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let manifest: Manifest = serde_json::from_slice(&body)
        .map_err(|e| format!("{folder}/_manifest.json is not a manifest: {e}"))?;
    let mut rows = Vec::new();
    for f in &manifest.files {
        let part = format!("{folder}/{}", f.name);
        let gz = sink
            .get(&part)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{part}, listed by its manifest, is missing"))?;
        if gz.len() as u64 != f.bytes {
            return Err(format!(
                "{part} has {} bytes, its manifest says {}",
                gz.len(),
                f.bytes
            ));
        }
        let text = super::harness::decode_part(&part, &gz)?;
        let text =
            String::from_utf8(text).map_err(|e| format!("{part} is not UTF-8 JSON Lines: {e}"))?;
        if text.lines().count() as u64 != f.records {
            return Err(format!(
                "{part} has {} records, its manifest says {}",
                text.lines().count(),
                f.records
            ));
        }
        for line in text.lines() {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| format!("{part} holds a line that is not JSON: {e}"))?;
            rows.push(v.to_string());
        }
    }
    if manifest.records != rows.len() as u64 {
        return Err(format!(
            "{folder}: the manifest says {} records, its parts hold {}",
            manifest.records,
            rows.len()
        ));
    }
    let listed: Vec<String> = sink
        .list(&format!("{folder}/"))
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|o| o.key)
        .collect();
    let mut expected: Vec<String> = manifest
        .files
        .iter()
        .map(|f| format!("{folder}/{}", f.name))
        .collect();
    expected.push(format!("{folder}/_manifest.json"));
    expected.sort();
    if listed != expected {
        let extra: Vec<&String> = listed.iter().filter(|k| !expected.contains(k)).collect();
        return Err(format!(
            "{folder} holds objects outside its manifest: {extra:?} (listed {listed:?})"
        ));
    }
    rows.sort();
    Ok(Some(rows))
}

fn diff(what: &str, rows: &[String], truth: &[String]) -> Result<(), String> {
    if rows == truth {
        return Ok(());
    }
    let missing: Vec<&String> = truth.iter().filter(|r| !rows.contains(r)).take(2).collect();
    let extra: Vec<&String> = rows.iter().filter(|r| !truth.contains(r)).take(2).collect();
    Err(format!(
        "{what}: {} rows, ground truth {} (missing e.g. {missing:?}, extra e.g. {extra:?})",
        rows.len(),
        truth.len()
    ))
}

/// The end state: every table equals the ground truth, folders hold exactly their manifests'
/// parts, bookmarks reached today.
async fn final_checks(world: &World) -> Vec<String> {
    let mut problems = Vec::new();
    let view = &world.view;
    let sim = world.sim();
    let first = sim.config().first_day;
    let today = today_in(world.plan.timezone);
    for &t in &world.plan.tables {
        let base = key(&view.prefix, t.as_str());
        let listed = match view.sink.list(&format!("{base}/")).await {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!("listing {base}: {e}"));
                continue;
            }
        };
        let folders: BTreeSet<String> = listed
            .iter()
            .filter_map(|o| {
                o.key[base.len() + 1..]
                    .split_once('/')
                    .map(|(f, _)| f.to_string())
            })
            .filter(|f| f.starts_with("date=") || f.starts_with("snapshot="))
            .collect();
        if t.is_date_sliced() {
            let parked = world.parked_day(t);
            // The bookmark stops before the parked day.
            let bookmark = match parked {
                Some(p) if p == first => None,
                Some(p) => Some(minus(p, 1)),
                None => Some(today),
            };
            match view.store.bookmark(t).await {
                Ok(b) if b == bookmark => {}
                other => problems.push(format!("the {t} bookmark is {other:?}, not {bookmark:?}")),
            }
            if let Some(p) = parked {
                match view.store.slices(t).await {
                    Ok(slices) => {
                        let rec = slices.iter().find(|r| r.slice == SliceId::Day(p));
                        let parked_right = rec.is_some_and(|r| {
                            r.status == SliceStatus::Failed
                                && r.error.as_ref().is_some_and(|e| e.kind == "BadResponse")
                        });
                        if !parked_right {
                            problems.push(format!("{t} {p} is not parked: {rec:?}"));
                        }
                    }
                    Err(e) => problems.push(e.to_string()),
                }
            }
            let live: Vec<Date> = days(first, today)
                .into_iter()
                .filter(|d| Some(*d) != parked)
                .collect();
            let expected: BTreeSet<String> = live.iter().map(|d| format!("date={d}")).collect();
            if folders != expected {
                problems.push(format!("{t} partitions are {folders:?}, not {expected:?}"));
            }
            for day in live {
                let truth = canonical(match t {
                    Table::Export => sim.export_ground_truth(day, None),
                    Table::Funnels => sim.funnels_ground_truth(day),
                    _ => sim.revenue_ground_truth(day),
                });
                let folder = format!("{base}/date={day}");
                match read_folder(view, &folder).await {
                    Ok(Some(rows)) => {
                        if let Err(e) = diff(&format!("{t} {day}"), &rows, &truth) {
                            problems.push(e);
                        }
                        let symlink = format!("{base}/_symlink/date={day}/manifest");
                        if let Err(e) = check_symlink(view, &symlink, &folder).await {
                            problems.push(e);
                        }
                    }
                    Ok(None) => problems.push(format!("{t} {day} has no manifest")),
                    Err(e) => problems.push(e),
                }
            }
        } else {
            let truth = canonical(match t {
                Table::Engage => sim.engage_ground_truth(),
                Table::CohortMembers => sim.cohort_members_ground_truth(),
                Table::Cohorts => sim.cohorts_ground_truth(),
                _ => sim.annotations_ground_truth(),
            });
            match view.sink.get(&format!("{base}/_latest.json")).await {
                Ok(Some(latest)) => {
                    let v: Value = serde_json::from_slice(&latest).unwrap_or_default();
                    let snapshot = v["snapshot"].as_str().unwrap_or_default().to_string();
                    match read_folder(view, &format!("{base}/{snapshot}")).await {
                        Ok(Some(rows)) => {
                            if let Err(e) = diff(&format!("{t} {snapshot}"), &rows, &truth) {
                                problems.push(e);
                            }
                            let symlink = format!("{base}/_symlink/latest/manifest");
                            let folder = format!("{base}/{snapshot}");
                            if let Err(e) = check_symlink(view, &symlink, &folder).await {
                                problems.push(e);
                            }
                        }
                        Ok(None) => problems.push(format!(
                            "{base}/_latest.json points to {snapshot}, which has no manifest"
                        )),
                        Err(e) => problems.push(e),
                    }
                }
                Ok(None) => problems.push(format!("{base}/_latest.json does not exist")),
                Err(e) => problems.push(e.to_string()),
            }
            for f in folders.iter().filter(|f| f.starts_with("snapshot=")) {
                match read_folder(view, &format!("{base}/{f}")).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        problems.push(format!("{base}/{f} has no manifest but was left behind"))
                    }
                    Err(e) => problems.push(e),
                }
            }
        }
    }
    problems
}

/// Hidden temporary files under `dir` (objects a killed process never finished).
fn temp_files(dir: &Path) -> u64 {
    let mut n = 0;
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                folders.push(path);
            } else if e.file_name().to_string_lossy().contains(".tmp-") {
                n += 1;
            }
        }
    }
    n
}

/// Runs one plan (a seed's, or one a test made) and checks every invariant.
pub async fn run_plan(env: &ChaosEnv, plan: &Plan) -> Result<Outcome, String> {
    let world = World::start(env, plan).await?;
    let mut outcome = Outcome {
        seed: plan.seed,
        ..Outcome::default()
    };
    let every = match plan.target {
        Target::Local => Duration::from_millis(20),
        Target::Aws => Duration::from_millis(300),
    };
    // Date partitions are many objects to read: on moto, every fourth check.
    let pointer_every = match plan.target {
        Target::Local => 1,
        Target::Aws => 4,
    };
    let watcher = Watcher::start(
        world.view.clone(),
        plan.tables.clone(),
        world.sim().config().first_day,
        plan.timezone,
        every,
        pointer_every,
    );
    // Engage sessions expire under the listing's feet.
    let expiries = {
        let sim = world.sim().clone();
        let at = plan.expire_sessions.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut at = at;
            at.sort();
            for t in at {
                tokio::time::sleep_until(started + t).await;
                sim.expire_engage_sessions();
            }
        })
    };
    let log = world.dir.path().join("replicator.log");
    let driven = match &plan.driver {
        Driver::Workers(n) => drive_workers(&world, *n, &mut outcome).await,
        Driver::Killed { kills, rival } => {
            drive_killed(&world, kills, *rival, &log, &mut outcome).await
        }
    };
    expiries.abort();
    let (mut violations, checks) = watcher.finish().await;
    outcome.checks = checks;
    if let Err(e) = driven {
        violations.push(e);
    }
    violations.extend(final_checks(&world).await);
    outcome.sim_faults = world.sim().requests().iter().filter(|r| r.faulted).count() as u64;
    if let Some(p) = &world.proxy {
        let s = p.stats();
        outcome.proxy_faults = s.errors.load(Ordering::Relaxed)
            + s.dropped_before.load(Ordering::Relaxed)
            + s.dropped_after.load(Ordering::Relaxed)
            + s.delayed.load(Ordering::Relaxed);
    }
    if plan.target == Target::Local {
        outcome.temp_files = temp_files(&world.out());
    }
    if violations.is_empty() {
        return Ok(outcome);
    }
    let mut report = format!(
        "seed {}: {} invariant(s) failed:\n",
        plan.seed,
        violations.len()
    );
    for v in &violations {
        let _ = writeln!(report, "  - {v}");
    }
    let _ = writeln!(report, "outcome: {outcome:?}\nplan: {plan:#?}");
    let served: Vec<String> = world
        .sim()
        .requests()
        .iter()
        .filter(|r| r.faulted)
        .map(|r| format!("{} {} {}", r.status, r.path, r.query))
        .collect();
    let _ = writeln!(report, "simulator faults served: {served:#?}");
    if let Some(p) = &world.proxy {
        let _ = writeln!(report, "proxy faults: {:#?}", p.log());
    }
    if let Ok(text) = std::fs::read_to_string(&log) {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let _ = writeln!(
            report,
            "binary stderr (last lines, newest first): {tail:#?}"
        );
    }
    Err(report)
}

/// In-process rival workers invoke the handler until every table is committed.
async fn drive_workers(world: &World, n: usize, outcome: &mut Outcome) -> Result<(), String> {
    let mut apps = Vec::new();
    for _ in 0..n {
        apps.push(world.app().await?);
    }
    let stats = Arc::new(Mutex::new(Outcome::default()));
    for round in 0..20u64 {
        outcome.rounds = round + 1;
        let mut workers = Vec::new();
        for (i, app) in apps.iter().enumerate() {
            let app = app.clone();
            let tables = world.plan.tables.clone();
            let budget = world.plan.budget;
            let stats = stats.clone();
            let mut rng = Rng::new(world.plan.seed ^ (round << 8 | i as u64) ^ 0x5eed);
            workers.push(tokio::spawn(async move {
                let mut idle: BTreeSet<Table> = BTreeSet::new();
                for _ in 0..40 {
                    let busy: Vec<Table> = tables
                        .iter()
                        .copied()
                        .filter(|t| !idle.contains(t))
                        .collect();
                    if busy.is_empty() {
                        break;
                    }
                    let t = rng.pick(&busy);
                    let deadline = Instant::now() + budget;
                    let answer =
                        handler::handle(&app, json!({"table": t.as_str()}), deadline).await;
                    let late = Instant::now().saturating_duration_since(deadline);
                    let mut s = stats.lock().unwrap();
                    s.invocations += 1;
                    if late > Duration::from_secs(1) {
                        s.overruns += 1;
                        let what = match &answer {
                            Ok(r) => format!("{:?} {:?}", r.status, r.reason),
                            Err(e) => format!("{} {e}", e.kind()),
                        };
                        s.late
                            .push(format!("{t} {} ms late: {what}", late.as_millis()));
                    }
                    s.worst_overrun_ms = s.worst_overrun_ms.max(late.as_millis() as u64);
                    match answer {
                        Ok(r) if r.status == Status::Idle => {
                            idle.insert(t);
                        }
                        Ok(_) => {}
                        Err(_) => s.failed_invocations += 1,
                    }
                }
            }));
        }
        for w in workers {
            w.await.map_err(|e| format!("a worker panicked: {e}"))?;
        }
        if world.complete().await? {
            let s = stats.lock().unwrap();
            outcome.invocations = s.invocations;
            outcome.failed_invocations = s.failed_invocations;
            outcome.overruns = s.overruns;
            outcome.worst_overrun_ms = s.worst_overrun_ms;
            outcome.late = s.late.clone();
            return Ok(());
        }
        // Every worker returned: leases still held belong to attempts that are gone.
        outcome.expired_leases += world.expire_leases().await?;
    }
    let s = stats.lock().unwrap();
    outcome.invocations = s.invocations;
    outcome.failed_invocations = s.failed_invocations;
    Err("not everything was committed after 20 rounds of invocations".into())
}

/// A schedule that holds the request at `point` (after the plan's faults decide the rest).
fn kill_schedule(plan: &Plan, salt: u64, point: &KillPoint) -> Schedule {
    let mut faults = plan.schedule(salt);
    let point = point.clone();
    let mut seen = 0u64;
    let mut armed = false;
    Box::new(move |info: &RequestInfo| {
        if armed {
            return Action::Hold;
        }
        let is_update = info
            .target
            .as_deref()
            .is_some_and(|t| t.ends_with(".UpdateItem"));
        let put_of =
            |name: &str| info.target.is_none() && info.method == "PUT" && info.path.ends_with(name);
        match &point {
            KillPoint::NthRequest(n) if info.index == *n => return Action::Hold,
            KillPoint::NthUpdate(n) if is_update => {
                if seen == *n {
                    return Action::Hold;
                }
                seen += 1;
            }
            KillPoint::BeforePut(name) if put_of(name) => return Action::Hold,
            KillPoint::AfterPut(name) if put_of(name) => {
                armed = true;
                return Action::Pass;
            }
            KillPoint::AfterState { needle, nth } if info.body.contains(needle) => {
                if seen == *nth {
                    armed = true;
                    return Action::Pass;
                }
                seen += 1;
            }
            _ => {}
        }
        faults(info)
    })
}

/// Runs the binary `kills.len()` times, killing it at each point, then until it completes.
async fn drive_killed(
    world: &World,
    kills: &[KillPoint],
    rival: bool,
    log: &Path,
    outcome: &mut Outcome,
) -> Result<(), String> {
    for (i, point) in kills.iter().enumerate() {
        if let Some(p) = &world.proxy {
            p.set_schedule(kill_schedule(&world.plan, i as u64 + 1, point));
        }
        let mut children = vec![world.command(log).spawn().map_err(|e| e.to_string())?];
        if rival {
            children.push(world.command(log).spawn().map_err(|e| e.to_string())?);
        }
        outcome.runs += children.len() as u64;
        let after = match point {
            KillPoint::After(d) => *d,
            // The point may never come (the run ends first): then it is not killed.
            _ => Duration::from_secs(60),
        };
        let held = async {
            match &world.proxy {
                Some(p) if !matches!(point, KillPoint::After(_)) => p.wait_held().await,
                _ => std::future::pending().await,
            }
        };
        let all_exit = async {
            for c in children.iter_mut() {
                let _ = c.wait().await;
            }
        };
        let kill = tokio::select! {
            _ = all_exit => false,
            _ = tokio::time::sleep(after) => true,
            _ = held => true,
        };
        if kill {
            for c in children.iter_mut() {
                if c.try_wait().ok().flatten().is_none() {
                    let _ = c.start_kill();
                    outcome.kills += 1;
                }
                let _ = c.wait().await;
            }
        }
        if let Some(p) = &world.proxy {
            p.release();
            p.settle().await;
            p.set_schedule(world.plan.schedule(100 + i as u64));
        }
        // The killed processes are gone: their leases would expire in time.
        outcome.expired_leases += world.expire_leases().await?;
    }
    for attempt in 0..12u64 {
        outcome.rounds += 1;
        let mut child = world.command(log).spawn().map_err(|e| e.to_string())?;
        outcome.runs += 1;
        let status = match tokio::time::timeout(Duration::from_secs(90), child.wait()).await {
            Ok(s) => s.map_err(|e| e.to_string())?,
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(format!("sync run {attempt} did not end within 90 s"));
            }
        };
        if status.success() && world.complete().await? {
            return Ok(());
        }
        outcome.expired_leases += world.expire_leases().await?;
    }
    Err("sync did not complete everything in 12 runs".into())
}

/// Runs `seeds` with at most `concurrency` at once; returns every outcome and every failure.
pub async fn run_seeds(
    env: Arc<ChaosEnv>,
    seeds: Vec<u64>,
    concurrency: usize,
    report_every: u64,
) -> (Vec<Outcome>, Vec<String>) {
    use futures_util::StreamExt;
    let total = seeds.len() as u64;
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let results: Vec<Result<Outcome, String>> = futures_util::stream::iter(seeds)
        .map(|seed| {
            let env = env.clone();
            let done = done.clone();
            let failed = failed.clone();
            async move {
                let r = tokio::spawn(async move { run_seed(&env, seed).await })
                    .await
                    .unwrap_or_else(|e| Err(format!("seed {seed}: panicked: {e}")));
                if let Err(e) = &r {
                    failed.fetch_add(1, Ordering::Relaxed);
                    if report_every > 0 {
                        eprintln!("{e}");
                    }
                }
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if report_every > 0 && (n.is_multiple_of(report_every) || n == total) {
                    eprintln!(
                        "chaos: {n}/{total} seeds, {} failed, {:.0} s",
                        failed.load(Ordering::Relaxed),
                        started.elapsed().as_secs_f64()
                    );
                }
                r
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(o) => outcomes.push(o),
            Err(e) => failures.push(e),
        }
    }
    outcomes.sort_by_key(|o| o.seed);
    (outcomes, failures)
}

/// Totals of a run, one line.
pub fn summary(outcomes: &[Outcome], failures: usize, elapsed: Duration) -> String {
    let sum = |f: fn(&Outcome) -> u64| outcomes.iter().map(f).sum::<u64>();
    format!(
        "{} seeds in {:.1} s: {} failed; {} handler invocations ({} answered an error), {} binary runs ({} killed with SIGKILL), {} simulator faults served, {} S3/DynamoDB faults injected, {} orphaned leases expired, {} watcher checks, {} invocations answered over 1 s after their deadline (worst {} ms), {} temporary files left by killed processes{}",
        outcomes.len() + failures,
        elapsed.as_secs_f64(),
        failures,
        sum(|o| o.invocations),
        sum(|o| o.failed_invocations),
        sum(|o| o.runs),
        sum(|o| o.kills),
        sum(|o| o.sim_faults),
        sum(|o| o.proxy_faults),
        sum(|o| o.expired_leases),
        sum(|o| o.checks),
        sum(|o| o.overruns),
        outcomes
            .iter()
            .map(|o| o.worst_overrun_ms)
            .max()
            .unwrap_or(0),
        sum(|o| o.temp_files),
        {
            let late: Vec<u64> = outcomes
                .iter()
                .filter(|o| o.overruns > 0)
                .map(|o| o.seed)
                .collect();
            match late.len() {
                0 => String::new(),
                n if n <= 12 => format!(" (late answers in seeds {late:?})"),
                n => format!(" (late answers in {n} seeds, e.g. {:?})", &late[..12]),
            }
        },
    )
}
