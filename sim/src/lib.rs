//! A seeded, deterministic simulator of Mixpanel's Raw Event Export API and Query API, with
//! fault injection, a request log and the exact ground truth the replicator must produce.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde_json::{Map, Value};

mod api;
mod engage;
mod r#gen;
mod profiles;
mod query;
mod reports;
mod server;
mod templates;

use engage::{Overlay, Session};
use r#gen::{DayInfo, Filter, Gen, LateBatch, Sink, date_of, day_num, rfc3339};
use profiles::{Change, Profiles};
use reports::{Reports, ymd};

/// How the project's export `time` and from/to days are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeMode {
    /// Projects created on/after 2023-01-01: `time` is epoch seconds and days are UTC days.
    Utc,
    /// Older projects: `time` is the local wall clock encoded as if UTC, days are project-local.
    ProjectLocal,
}

/// Everything that defines a simulated project.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seed of all generated data.
    pub seed: u64,
    /// IANA project timezone, e.g. "America/Los_Angeles".
    pub timezone: String,
    /// How `time` and the from/to days are encoded.
    pub time_mode: TimeMode,
    /// First project-local day that has data.
    pub first_day: Date,
    /// Number of project-local days with data.
    pub days: u32,
    /// Base number of distinct events per day (before duplicates).
    pub events_per_day: u32,
    /// Accepted project API secret.
    pub api_secret: String,
    /// Accepted service account, if any.
    pub service_account: Option<ServiceAccount>,
    /// Request budget; beyond it requests get 429.
    pub rate_limit: Option<RateLimit>,
    /// Number of user profiles (`engage`) generated at the start; see
    /// [`Simulator::add_profiles`] and [`Simulator::delete_profiles`] for later changes.
    pub profiles: u32,
    /// Number of cohorts (`cohorts/list`); the last of two or more is empty.
    pub cohorts: u32,
    /// Number of funnels (`funnels/list`).
    pub funnels: u32,
    /// Number of annotations, spread over the data days.
    pub annotations: u32,
    /// How long an engage `session_id` stays valid after the page-0 request that created it.
    pub engage_session_ttl: Duration,
    /// `engage/revenue` answers 400 `Timeout Error.`, as EU projects do.
    pub eu_revenue_400: bool,
    /// Endpoints the plan does not allow (402), by name: "export", "engage", "cohorts/list",
    /// "funnels/list", "funnels", "annotations", "engage/revenue", "engage/properties",
    /// "events/properties/top", "app/annotations".
    pub plan_excludes: Vec<String>,
    /// Each day's body also carries the malformed lines of real exports: `time` as a float,
    /// a numeric string and milliseconds, events split over lines by raw line breaks in a
    /// string (one of about 600 KB), raw and escaped control bytes in strings, a line without
    /// `properties` and a line that is not JSON (see [`Simulator::export_rejected_truth`]).
    pub messy_lines: bool,
    /// Events carry properties whose column names collide, as real projects' do: a property
    /// named `event`; `Country` on the first day's events and `country` on later days'; a
    /// custom `mp_reserved_city` beside `$city`; an empty key; a 1,000-character key; and
    /// every fourth profile a property named `distinct_id`. Ground truth names them as the
    /// replicator's contract says (see [`collision_column`]; the profile's is `distinct_id__2`).
    pub column_collisions: bool,
    /// The most profiles an `engage` page holds whatever `page_size` asks; the answer's
    /// `page_size` then says the size served, as Mixpanel's does.
    pub engage_max_page_size: Option<u32>,
    /// Numeric distinct ids (about 6% of profiles) are sent as JSON integers (`1000003`), as
    /// some projects have them; ground truth keeps them integers.
    pub engage_integer_ids: bool,
    /// A profile without properties is sent without a `$properties` member at all.
    pub engage_omit_empty_properties: bool,
    /// `events/properties/top` requires `event` (400 without it), as Mixpanel's reference has it.
    pub event_properties_require_event: bool,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        let today = Clock::now_day();
        SimConfig {
            seed: 1,
            timezone: "UTC".into(),
            time_mode: TimeMode::Utc,
            first_day: date_of(today - 9).unwrap_or_default(),
            days: 10,
            events_per_day: 200,
            api_secret: "sim-secret".into(),
            service_account: None,
            rate_limit: None,
            profiles: 300,
            cohorts: 4,
            funnels: 3,
            annotations: 5,
            engage_session_ttl: Duration::from_secs(600),
            eu_revenue_400: false,
            plan_excludes: Vec::new(),
            messy_lines: false,
            column_collisions: false,
            engage_max_page_size: None,
            engage_integer_ids: false,
            engage_omit_empty_properties: false,
            event_properties_require_event: false,
        }
    }
}

/// A service account: HTTP Basic `username:secret` plus `project_id`.
#[derive(Clone, Debug)]
pub struct ServiceAccount {
    /// Basic auth user name.
    pub username: String,
    /// Basic auth password.
    pub secret: String,
    /// The project the account may read.
    pub project_id: u64,
}

/// A sliding-window request budget over all requests.
#[derive(Clone, Copy, Debug)]
pub struct RateLimit {
    /// Requests admitted per window.
    pub requests: u32,
    /// Length of the sliding window.
    pub window: Duration,
}

/// A fault applied to the next matching requests.
#[derive(Clone, Debug)]
pub enum Fault {
    /// 429 with Mixpanel's body; a `Retry-After` header when `Some`.
    RateLimited {
        /// Seconds announced in `Retry-After`.
        retry_after_secs: Option<u64>,
    },
    /// A 5xx (or any status) with a small body.
    ServerError {
        /// The HTTP status.
        status: u16,
    },
    /// 200; after `after_lines` valid lines the body ends with `terminated early\n`. On a
    /// Query API endpoint: 200 with the first half of the JSON body and a clean end.
    TerminatedEarly {
        /// Valid lines sent first.
        after_lines: usize,
    },
    /// 200; after `after_lines` valid lines and half of the next one the connection breaks.
    /// On a Query API endpoint: the first half of the JSON body, then the break.
    CutBody {
        /// Valid lines sent first.
        after_lines: usize,
    },
    /// Headers and body only after `delay`.
    SlowFirstByte {
        /// Time before the first byte.
        delay: Duration,
    },
    /// An export body sent no faster than `lines_per_second` (a big day over a slow link).
    /// Query API endpoints answer normally.
    SlowBody {
        /// Lines sent per second.
        lines_per_second: u32,
    },
    /// Headers and body only once `gate` is open: a Mixpanel that has not answered yet,
    /// however long the client waits. A test holds a page or an hour with it until the
    /// client's deadline has certainly passed, whatever the machine's speed.
    Held {
        /// Opened by the test.
        gate: Gate,
    },
    /// An export body that stops after `after_lines` lines until `gate` is open, then goes
    /// on: a big day whose body has begun and has not ended when the client's deadline comes.
    /// Query API endpoints answer normally.
    HeldBody {
        /// Lines sent before the body stops.
        after_lines: usize,
        /// Opened by the test.
        gate: Gate,
    },
    /// Any literal answer.
    Status {
        /// The HTTP status.
        status: u16,
        /// The literal body.
        body: String,
    },
}

/// What holds the answers of [`Fault::Held`] and [`Fault::HeldBody`] until a test opens it.
/// Cheap to clone: clones share one gate. Once open it stays open.
#[derive(Clone, Debug)]
pub struct Gate {
    open: Arc<tokio::sync::watch::Sender<bool>>,
    held: Arc<AtomicU64>,
}

impl Default for Gate {
    fn default() -> Gate {
        Gate::new()
    }
}

impl Gate {
    /// A closed gate.
    pub fn new() -> Gate {
        Gate {
            open: Arc::new(tokio::sync::watch::Sender::new(false)),
            held: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Opens the gate: every answer held at it goes on, and none is held again.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// Whether the gate is open.
    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    /// How many answers have been held at the gate so far (those released included).
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    /// Counts an answer held here, and waits until the gate opens.
    pub(crate) async fn hold(&self) {
        self.held.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.subscribe();
        // The sender lives as long as this gate: waiting cannot fail.
        let _ = open.wait_for(|o| *o).await;
    }

    /// [`Gate::hold`] on a blocking thread: waits until the gate opens or `gone` says the
    /// client went away (its answer is then never sent). Returns whether the gate opened.
    pub(crate) fn hold_blocking(&self, gone: impl Fn() -> bool) -> bool {
        self.held.fetch_add(1, Ordering::SeqCst);
        loop {
            if self.is_open() {
                return true;
            }
            if gone() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Which requests a fault applies to, and how many times.
#[derive(Clone, Debug)]
pub struct FaultRule {
    /// Request path, e.g. "/api/2.0/export" or "/api/2.0/engage" (which also matches
    /// "/api/query/engage").
    pub path: String,
    /// Only requests whose `from_date` is this day (requests without one never match).
    pub from_date: Option<Date>,
    /// How many matching requests get the fault ([`FaultRule::PERSISTENT`]: every one).
    pub times: u32,
    /// The fault.
    pub fault: Fault,
    /// Only requests whose `from_date..=to_date` covers this day (a multi-day request too).
    pub covering: Option<Date>,
    /// Only requests whose time range (the days, narrowed by a `where` on `$time`) is wider
    /// than this: Mixpanel fails a heavy day's whole-day export, while its hours go through.
    pub wider_than: Option<Duration>,
    /// Only requests whose time range holds this second (epoch, as the export counts it):
    /// Mixpanel fails the requests of a heavy hour, while the rest of its day goes through.
    pub holding: Option<i64>,
    /// Only requests that carry this parameter, non-empty (e.g. `where`: only filtered engage
    /// listings fail).
    pub param: Option<String>,
}

impl FaultRule {
    /// `times` for a fault that never wears off.
    pub const PERSISTENT: u32 = u32::MAX;

    /// A rule for the next `times` requests of `path`.
    pub fn new(path: &str, times: u32, fault: Fault) -> FaultRule {
        FaultRule {
            path: path.into(),
            from_date: None,
            times,
            fault,
            covering: None,
            wider_than: None,
            holding: None,
            param: None,
        }
    }

    /// The same rule, only for requests that carry the parameter `name` with a non-empty value
    /// (e.g. `"where"`: an engage listing filtered by an expression).
    pub fn with_param(self, name: &str) -> FaultRule {
        FaultRule {
            param: Some(name.to_string()),
            ..self
        }
    }

    /// The same fault for every export request whose range holds the second `at` and is
    /// wider than `wider_than` (when given), as Mixpanel fails an hour too heavy to export.
    pub fn export_instant(at: i64, wider_than: Option<Duration>, fault: Fault) -> FaultRule {
        FaultRule {
            holding: Some(at),
            wider_than,
            ..FaultRule::new("/api/2.0/export", FaultRule::PERSISTENT, fault)
        }
    }

    /// The same fault for every export request that covers `day`, as Mixpanel fails a day it
    /// cannot export (`wider_than`: only requests wider than that, e.g. the whole day).
    pub fn export_day(day: Date, wider_than: Option<Duration>, fault: Fault) -> FaultRule {
        FaultRule {
            covering: Some(day),
            wider_than,
            ..FaultRule::new("/api/2.0/export", FaultRule::PERSISTENT, fault)
        }
    }
}

/// One request as the simulator saw it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// URL path.
    pub path: String,
    /// Raw query string (for POST, followed by the form body; a JSON body is logged
    /// form-encoded, values that are not strings as JSON text).
    pub query: String,
    /// How the request authenticated.
    pub auth: AuthKind,
    /// Status answered.
    pub status: u16,
    /// Arrival, in milliseconds since the Unix epoch (monotonic within a simulator).
    pub at_ms: u64,
    /// Whether an injected fault was applied.
    pub faulted: bool,
}

/// How a request authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum AuthKind {
    /// `Basic base64(secret)`.
    SecretNoColon,
    /// `Basic base64(secret + ":")`.
    SecretWithColon,
    /// `Basic base64(username:secret)` of the configured service account.
    ServiceAccount,
    /// No Authorization header.
    Missing,
    /// Anything else.
    Invalid,
}

/// A simulated Mixpanel project; cheap to clone, thread-safe.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

struct Inner {
    config: SimConfig,
    generator: Gen,
    /// The generated profiles; what changed since is in `overlay`.
    profiles: Profiles,
    /// Profiles updated, added and deleted while running.
    overlay: RwLock<Overlay>,
    /// Profiles served in all engage answers.
    engage_served: AtomicU64,
    reports: Reports,
    /// `engage/properties`, computed on first use (a scan of every generated profile; profiles
    /// mutated later do not change it).
    profile_stats: OnceLock<Vec<(String, u64, &'static str)>>,
    started: Instant,
    started_epoch_ms: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    late: HashMap<i64, Vec<LateBatch>>,
    faults: Vec<FaultRule>,
    requests: Vec<RequestRecord>,
    window: VecDeque<Instant>,
    /// Engage session id -> expiry and the listing its page 0 fixed.
    sessions: HashMap<String, Session>,
    session_counter: u64,
}

/// Dedup key (event, distinct_id as JSON, time, $insert_id as JSON) -> (processing ms, properties, event).
type Latest = HashMap<(String, String, i64, String), (i64, Map<String, Value>, String)>;

/// The column of an export property when `column_collisions` is on: names unique when case
/// is folded and never one of the record's own keys. The first spelling seen keeps the plain
/// name and a later one is `{name}__2`: `event` (the record's own key), `country` (after the
/// first day's `Country`) and a custom `mp_reserved_city` (after `$city`, on every event)
/// become `event__2`, `country__2` and `mp_reserved_city__2`; a property named `date` (the
/// partition readers take from the `date=` folders) is `date__2`; an empty key is `_blank`; a
/// key longer than 200 characters is cut to 182 and given `__` and the 16 hex digits of its
/// 64-bit FNV-1a hash. Every other key is its output name (`$x` → `mp_reserved_x`).
pub fn collision_column(key: &str) -> String {
    match key {
        "event" => "event__2".into(),
        "country" => "country__2".into(),
        "mp_reserved_city" => "mp_reserved_city__2".into(),
        // The partition of `date=` folders, which readers add to each row.
        "date" => "date__2".into(),
        k if k.trim().is_empty() => "_blank".into(),
        k if k.chars().count() > 200 => {
            let head: String = k.chars().take(182).collect();
            let hash = k.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
            format!("{head}__{hash:016x}")
        }
        k => match k.strip_prefix('$') {
            Some(rest) => format!("mp_reserved_{rest}"),
            None => k.to_string(),
        },
    }
}

/// Clock helpers.
struct Clock;

impl Clock {
    /// Today's UTC day number.
    fn now_day() -> i64 {
        jiff::Timestamp::now().as_second().div_euclid(86_400)
    }
}

/// Uncompressed bytes buffered before a chunk is handed on.
pub(crate) const CHUNK: usize = 64 * 1024;

impl Simulator {
    /// Creates a simulator; panics on an unknown timezone (a test setup error).
    pub fn new(config: SimConfig) -> Simulator {
        let tz = TimeZone::get(&config.timezone).unwrap_or_else(|e| {
            panic!("mixpanel-sim: unknown timezone {:?}: {e}", config.timezone)
        });
        r#gen::warm();
        let mut generator = Gen::new(
            config.seed,
            config.time_mode,
            tz,
            config.events_per_day as u64,
            day_num(config.first_day),
            config.days,
        );
        generator.messy = config.messy_lines;
        generator.collisions = config.column_collisions;
        let started_epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let first = day_num(config.first_day);
        let profiles = Profiles::new(
            config.seed,
            config.profiles as u64,
            first,
            first + config.days as i64 - 1,
        )
        .with_shapes(
            config.engage_integer_ids,
            config.engage_omit_empty_properties,
        )
        .with_collisions(config.column_collisions);
        let reports = Reports::new(
            config.seed,
            config.service_account.as_ref().map_or(1, |s| s.project_id),
            first,
            config.days,
            config.profiles as u64,
            config.cohorts as u64,
            config.funnels as u64,
            config.annotations as u64,
        );
        Simulator {
            inner: Arc::new(Inner {
                config,
                generator,
                profiles,
                overlay: RwLock::new(Overlay::default()),
                engage_served: AtomicU64::new(0),
                reports,
                profile_stats: OnceLock::new(),
                started: Instant::now(),
                started_epoch_ms,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The configuration this simulator was built with.
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// Adds `count` new events to a project-local day, delivered (and processed) later than all
    /// existing ones; also re-delivers one existing event of that day with a later
    /// mp_processing_time_ms and one property changed (so the late version must win).
    pub fn add_late_events(&self, day: Date, count: u32) {
        let d = day_num(day);
        let mut st = self.inner.lock();
        let batches = st.late.entry(d).or_default();
        let batch = batches.len() as u32 + 1;
        let first = batches.last().map_or(0, |b| b.first + b.count as u64);
        batches.push(LateBatch {
            batch,
            first,
            count,
            redeliver: self.inner.generator.redeliver_index(d, batch),
        });
    }

    /// Queues a fault rule (rules are matched in the order pushed).
    pub fn push_fault(&self, rule: FaultRule) {
        self.inner.lock().faults.push(rule);
    }

    /// Removes every queued fault rule.
    pub fn clear_faults(&self) {
        self.inner.lock().faults.clear();
    }

    /// Every API request received so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.inner.lock().requests.clone()
    }

    /// The rows the replicator must produce for one project-local day of the export table
    /// (order not significant), optionally only for the given event names.
    pub fn export_ground_truth(&self, day: Date, events: Option<&[String]>) -> Vec<Value> {
        let g = &self.inner.generator;
        let d = day_num(day);
        let target = DayInfo::new(&g.tz, d).unwrap_or_else(|e| panic!("mixpanel-sim: {e}"));
        let mut filter = Filter::all();
        filter.names = g.name_mask(events);
        filter.truth = true;
        let late = self.inner.late_snapshot(d - 1, d + 1);
        // Key -> (mp_processing_time_ms, delivery); the latest processed delivery wins.
        let mut best = Latest::new();
        let mut buf = Vec::new();
        for n in (d - 1).max(g.first)..=(d + 1).min(g.last) {
            let info = DayInfo::new(&g.tz, n).unwrap_or_else(|e| panic!("mixpanel-sim: {e}"));
            let mut sink = |buf: &mut Vec<u8>, start: usize| {
                let line: Value = serde_json::from_slice(&buf[start..]).unwrap_or_else(|e| {
                    panic!(
                        "mixpanel-sim generated invalid JSON ({e}): {:?}",
                        String::from_utf8_lossy(&buf[start..])
                    )
                });
                buf.clear();
                let Value::Object(mut line) = line else {
                    panic!("mixpanel-sim: line is not an object")
                };
                let event = line
                    .get("event")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let Some(Value::Object(props)) = line.remove("properties") else {
                    panic!("mixpanel-sim: line without properties")
                };
                let time = props
                    .get("time")
                    .and_then(Value::as_i64)
                    .unwrap_or_default();
                let instant = self.inner.true_instant(time);
                if instant < target.s0 || instant >= target.s1 {
                    return true;
                }
                let did = props
                    .get("distinct_id")
                    .map_or("null".to_string(), Value::to_string);
                let iid = props
                    .get("$insert_id")
                    .map_or("null".to_string(), Value::to_string);
                let proc = props
                    .get("mp_processing_time_ms")
                    .and_then(Value::as_i64)
                    .unwrap_or_default();
                let key = (event.clone(), did, time, iid);
                match best.get(&key) {
                    Some((p, _, _)) if *p >= proc => {}
                    _ => {
                        best.insert(key, (proc, props, event));
                    }
                }
                true
            };
            g.emit_day(
                &info,
                late.get(&n).map_or(&[], Vec::as_slice),
                &filter,
                None,
                &mut buf,
                &mut sink,
            );
        }
        best.into_values()
            .map(|(_, props, event)| {
                let mut row = Map::new();
                let time = props
                    .get("time")
                    .and_then(Value::as_i64)
                    .unwrap_or_default();
                row.insert("event".into(), Value::String(event));
                row.insert(
                    "distinct_id".into(),
                    props.get("distinct_id").cloned().unwrap_or(Value::Null),
                );
                row.insert(
                    "time".into(),
                    Value::String(rfc3339(self.inner.true_instant(time))),
                );
                for (k, v) in props {
                    if k == "time" || k == "distinct_id" {
                        continue;
                    }
                    let k = if self.inner.config.column_collisions {
                        collision_column(&k)
                    } else {
                        match k.strip_prefix('$') {
                            Some(rest) => format!("mp_reserved_{rest}"),
                            None => k,
                        }
                    };
                    row.insert(k, v);
                }
                Value::Object(row)
            })
            .collect()
    }

    /// The lines of one project-local day's body from which no event can be read (with
    /// `messy_lines`: a line without `properties`, a line that is not JSON), exactly as sent,
    /// without their newline, sorted. Mixpanel stored an event under each, at a time inside
    /// the day, and a `where` on `$time` filters them by that time; an event filter by its name.
    pub fn export_rejected_truth(&self, day: Date) -> Vec<Vec<u8>> {
        let g = &self.inner.generator;
        let d = day_num(day);
        if !g.messy || g.n == 0 || d < g.first || d > g.last {
            return Vec::new();
        }
        let info = DayInfo::new(&g.tz, d).unwrap_or_else(|e| panic!("mixpanel-sim: {e}"));
        let mut lines: Vec<Vec<u8>> = (0..r#gen::MESSY_KINDS.len())
            .map(|m| g.messy_line(&info, m))
            .filter(|l| l.truth.is_none() && !l.wire.is_empty())
            .map(|l| l.wire.strip_suffix(b"\n").unwrap_or(&l.wire).to_vec())
            .collect();
        lines.sort();
        lines
    }

    /// Writes the raw export body (NDJSON, uncompressed) that /api/2.0/export would send for
    /// these parameters; used by benchmarks. `where_clause` as in the API.
    pub fn write_export_body(
        &self,
        from: Date,
        to: Date,
        events: Option<&[String]>,
        where_clause: Option<&str>,
        out: &mut dyn std::io::Write,
    ) -> std::io::Result<u64> {
        let (lo, hi) = match where_clause {
            Some(w) => query::parse_where(w)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            None => (i64::MIN, i64::MAX),
        };
        let filter = Filter {
            names: self.inner.generator.name_mask(events),
            export_lo: lo,
            export_hi: hi,
            time_in_ms: false,
            truth: false,
        };
        let mut total = 0u64;
        let mut err = None;
        let mut buf = Vec::with_capacity(CHUNK + 16 * 1024);
        let mut sink = |buf: &mut Vec<u8>, _start: usize| {
            if buf.len() >= CHUNK {
                if let Err(e) = out.write_all(buf) {
                    err = Some(e);
                    return false;
                }
                total += buf.len() as u64;
                buf.clear();
            }
            true
        };
        self.inner
            .emit_range(day_num(from), day_num(to), &filter, &mut buf, &mut sink)
            .map_err(std::io::Error::other)?;
        if let Some(e) = err {
            return Err(e);
        }
        out.write_all(&buf)?;
        Ok(total + buf.len() as u64)
    }

    /// Makes every engage `session_id` handed out so far expired: the next request using one
    /// gets 400 `Invalid session_id: session expired`.
    pub fn expire_engage_sessions(&self) {
        let now = Instant::now();
        for s in self.inner.lock().sessions.values_mut() {
            s.expires = now;
        }
    }

    /// Gives each live profile at these listing indices (`0..profiles`, then the added ones) a
    /// new version: `plan` and `login_count` change (a profile without them gains them),
    /// `Total Spent` and `is_paying` too where present, and `$last_seen` becomes now (UTC,
    /// `YYYY-MM-DDTHH:MM:SS`), as a profile update through Mixpanel's ingestion does. Every
    /// call makes a new version. Deleted and unknown indices are skipped, a repeated one is
    /// updated once. Returns the distinct ids (as sent: string or integer) updated, in order.
    /// Callable at any time, between two pages of one listing too.
    pub fn update_profiles(&self, indices: &[u64]) -> Vec<Value> {
        self.inner.update(indices, Some(Inner::now_datetime()))
    }

    /// As [`Simulator::update_profiles`], but `$last_seen` does not move (an update sent with
    /// Mixpanel's `$ignore_time`): a `where` on `$last_seen` does not see it.
    pub fn update_profiles_ignoring_time(&self, indices: &[u64]) -> Vec<Value> {
        self.inner.update(indices, None)
    }

    /// Adds `count` profiles after every existing one (the next listing indices), each with
    /// `$last_seen` now; they join cohorts by the same rule as the others. Returns their
    /// distinct ids.
    pub fn add_profiles(&self, count: u64) -> Vec<Value> {
        let now = Inner::now_datetime();
        let inner = &self.inner;
        let mut o = inner.overlay_mut();
        (0..count)
            .map(|_| {
                let i = o.universe(inner.profiles.n);
                o.added += 1;
                o.changes.insert(
                    i,
                    Change {
                        version: 0,
                        last_seen: Some(now.clone()),
                    },
                );
                inner.profiles.id_value(i)
            })
            .collect()
    }

    /// Deletes the live profiles at these listing indices: no later listing, cohort or count
    /// has them (a session whose page 0 listed one still serves it, as it was). Returns the
    /// distinct ids deleted.
    pub fn delete_profiles(&self, indices: &[u64]) -> Vec<Value> {
        let inner = &self.inner;
        let n = inner.profiles.n;
        let mut o = inner.overlay_mut();
        let mut out = Vec::new();
        for &i in indices {
            if o.is_live(i, n) {
                o.deleted.insert(i);
                out.push(inner.profiles.id_value(i));
            }
        }
        out
    }

    /// Number of live profiles (what an unfiltered engage listing's `total` says).
    pub fn profile_count(&self) -> u64 {
        self.inner.overlay().live_count(self.inner.profiles.n)
    }

    /// Profiles served in all engage answers so far (for benchmarks).
    pub fn engage_profiles_served(&self) -> u64 {
        self.inner.engage_served.load(Ordering::Relaxed)
    }

    /// The engage table: one row per live profile at its current version, in listing order,
    /// `{"distinct_id": .., ..every $properties entry with a leading `$` replaced by
    /// `mp_reserved_`}`.
    pub fn engage_ground_truth(&self) -> Vec<Value> {
        let p = &self.inner.profiles;
        let o = self.inner.overlay();
        (0..o.universe(p.n))
            .filter(|i| !o.deleted.contains(i))
            .map(|i| p.at(i, o.changes.get(&i)).row())
            .collect()
    }

    /// The cohorts table: the objects exactly as `cohorts/list` returns them (`count`: live
    /// members).
    pub fn cohorts_ground_truth(&self) -> Vec<Value> {
        self.inner.cohorts().into_iter().map(as_read).collect()
    }

    /// The cohort_members table: `{"cohort_id": N, "distinct_id": ".."}` per membership of a
    /// live profile, cohort by cohort, members in listing order.
    pub fn cohort_members_ground_truth(&self) -> Vec<Value> {
        let (p, r) = (&self.inner.profiles, &self.inner.reports);
        let o = self.inner.overlay();
        let mut rows = Vec::new();
        for (k, id) in r.cohort_ids().into_iter().enumerate() {
            let listing = o.live(Some(r.cohort_rule(k as u64)), p.n);
            for j in 0..listing.total() {
                rows.push(serde_json::json!({
                    "cohort_id": id,
                    "distinct_id": p.id_value(listing.index(j)),
                }));
            }
        }
        rows
    }

    /// The funnels table rows of one day: `{"funnel_id", "name", "date", "steps", "analysis"}`
    /// per funnel; empty for a day outside the data range (the API leaves such days out).
    pub fn funnels_ground_truth(&self, day: Date) -> Vec<Value> {
        let r = &self.inner.reports;
        let d = day_num(day);
        if !r.has_day(d) {
            return Vec::new();
        }
        r.funnel_ids()
            .into_iter()
            .enumerate()
            .map(|(k, id)| {
                let mut row = Map::new();
                row.insert("funnel_id".into(), id.into());
                row.insert("name".into(), r.funnel_name(k as u64).into());
                row.insert("date".into(), ymd(d).into());
                if let Value::Object(entry) = r.funnel_day(k as u64, d) {
                    row.extend(entry);
                }
                as_read(Value::Object(row))
            })
            .collect()
    }

    /// The revenue table row of one day (`date`, `amount`, `count`, `paid_count`); empty for a
    /// day without an entry. `$overall` is never a row.
    pub fn revenue_ground_truth(&self, day: Date) -> Vec<Value> {
        let r = &self.inner.reports;
        let d = day_num(day);
        if !r.has_day(d) {
            return Vec::new();
        }
        let mut row = Map::new();
        row.insert("date".into(), ymd(d).into());
        if let Value::Object(entry) = r.revenue_entry(d) {
            row.extend(entry);
        }
        vec![as_read(Value::Object(row))]
    }

    /// The annotations table: the objects of `annotations` over the whole data range.
    pub fn annotations_ground_truth(&self) -> Vec<Value> {
        self.inner
            .reports
            .annotations(i64::MIN, i64::MAX)
            .into_iter()
            .map(as_read)
            .collect()
    }

    /// The annotations table read through the App API (a service account): its objects as
    /// returned, `date` with the project's offset (`2023-01-15T12:00:00+01:00`).
    pub fn app_annotations_ground_truth(&self) -> Vec<Value> {
        self.inner
            .reports
            .app_annotations(i64::MIN, i64::MAX, &self.inner.generator.tz)
            .into_iter()
            .map(as_read)
            .collect()
    }

    /// The event names `events/names` lists: every name the export has, most common first.
    pub fn event_names(&self) -> Vec<String> {
        self.inner.event_names()
    }

    /// The funnel ids `funnels/list` returns, in order.
    pub fn funnel_ids(&self) -> Vec<u64> {
        self.inner.reports.funnel_ids()
    }

    /// The cohort ids `cohorts/list` returns, in order.
    pub fn cohort_ids(&self) -> Vec<u64> {
        self.inner.reports.cohort_ids()
    }

    /// Binds 127.0.0.1:port (0 = any free port) and serves in a tokio task.
    pub async fn serve(&self, port: u16) -> std::io::Result<RunningSim> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = server::router(self.clone());
        tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                eprintln!("mixpanel-sim: server stopped: {e}");
            }
        });
        Ok(RunningSim {
            sim: self.clone(),
            addr,
            shutdown: Some(tx),
        })
    }
}

/// A value as a client reads it from the wire: serialized, then parsed. serde_json's default
/// float parsing may differ from the generated f64 in the last bit; ground truth is what a
/// parser reads (as for the export), so comparisons with parsed output hold.
fn as_read(v: Value) -> Value {
    serde_json::to_vec(&v)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(v)
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not wedge the server.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn overlay(&self) -> RwLockReadGuard<'_, Overlay> {
        self.overlay.read().unwrap_or_else(|p| p.into_inner())
    }

    fn overlay_mut(&self) -> RwLockWriteGuard<'_, Overlay> {
        self.overlay.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Now in UTC as Mixpanel writes profile datetimes: `YYYY-MM-DDTHH:MM:SS`.
    fn now_datetime() -> String {
        jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%S")
            .to_string()
    }

    /// A new version of each live profile of `indices` (once each); `$last_seen` set when
    /// `seen` is given.
    fn update(&self, indices: &[u64], seen: Option<String>) -> Vec<Value> {
        let n = self.profiles.n;
        let mut o = self.overlay_mut();
        let mut done = std::collections::HashSet::new();
        let mut out = Vec::new();
        for &i in indices {
            if !o.is_live(i, n) || !done.insert(i) {
                continue;
            }
            let c = o.changes.entry(i).or_default();
            c.version += 1;
            if let Some(s) = &seen {
                c.last_seen = Some(s.clone());
            }
            out.push(self.profiles.id_value(i));
        }
        out
    }

    /// The objects of `cohorts/list`, with live member counts.
    fn cohorts(&self) -> Vec<Value> {
        let o = self.overlay();
        self.reports
            .cohorts(|rule| o.cohort_count(rule, self.profiles.n))
    }

    fn now_ms(&self) -> u64 {
        self.started_epoch_ms + self.started.elapsed().as_millis() as u64
    }

    /// Today's day number in the clock that bounds `to_date`.
    fn today(&self) -> i64 {
        match self.config.time_mode {
            TimeMode::Utc => Clock::now_day(),
            TimeMode::ProjectLocal => {
                day_num(self.generator.tz.to_datetime(jiff::Timestamp::now()).date())
            }
        }
    }

    /// The true UTC instant of an exported `time` (seconds).
    fn true_instant(&self, time: i64) -> i64 {
        match self.config.time_mode {
            TimeMode::Utc => time,
            TimeMode::ProjectLocal => jiff::Timestamp::from_second(time)
                .ok()
                .and_then(|ts| {
                    self.generator
                        .tz
                        .to_timestamp(TimeZone::UTC.to_datetime(ts))
                        .ok()
                })
                .map_or(time, |ts| ts.as_second()),
        }
    }

    /// Profile property keys with counts and types, most common first.
    fn profile_stats(&self) -> &[(String, u64, &'static str)] {
        self.profile_stats
            .get_or_init(|| self.profiles.property_stats())
    }

    /// Property keys of the export and how many deliveries have them: a sample of the first
    /// 5,000 deliveries of the last data day (all events, or the one named).
    fn export_property_counts(&self, event: Option<&str>) -> HashMap<String, u64> {
        let g = &self.generator;
        let mut counts: HashMap<String, u64> = HashMap::new();
        let Ok(info) = DayInfo::new(&g.tz, g.last) else {
            return counts;
        };
        if g.last < g.first {
            return counts;
        }
        let mut filter = Filter::all();
        filter.names = g.name_mask(event.map(|e| vec![e.to_string()]).as_deref());
        let mut seen = 0;
        let mut buf = Vec::new();
        let mut sink = |buf: &mut Vec<u8>, start: usize| {
            if let Ok(Value::Object(line)) = serde_json::from_slice::<Value>(&buf[start..])
                && let Some(Value::Object(props)) = line.get("properties")
            {
                for k in props.keys() {
                    *counts.entry(k.clone()).or_default() += 1;
                }
            }
            buf.clear();
            seen += 1;
            seen < 5000
        };
        let late = self.late_snapshot(g.last, g.last);
        g.emit_day(
            &info,
            late.get(&g.last).map_or(&[], Vec::as_slice),
            &filter,
            None,
            &mut buf,
            &mut sink,
        );
        counts
    }

    /// The event names of the export, most common first (counted over the same sample as the
    /// property counts), as `events/names` lists them.
    fn event_names(&self) -> Vec<String> {
        let g = &self.generator;
        let mut counts: HashMap<String, u64> = HashMap::new();
        let Ok(info) = DayInfo::new(&g.tz, g.last) else {
            return Vec::new();
        };
        if g.last < g.first {
            return Vec::new();
        }
        let mut seen = 0;
        let mut buf = Vec::new();
        let mut sink = |buf: &mut Vec<u8>, start: usize| {
            if let Ok(Value::Object(line)) = serde_json::from_slice::<Value>(&buf[start..])
                && let Some(Value::String(name)) = line.get("event")
            {
                *counts.entry(name.clone()).or_default() += 1;
            }
            buf.clear();
            seen += 1;
            seen < 5000
        };
        let late = self.late_snapshot(g.last, g.last);
        g.emit_day(
            &info,
            late.get(&g.last).map_or(&[], Vec::as_slice),
            &Filter::all(),
            None,
            &mut buf,
            &mut sink,
        );
        let mut list: Vec<(String, u64)> = counts.into_iter().collect();
        list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        list.into_iter().map(|(n, _)| n).collect()
    }

    fn late_snapshot(&self, from: i64, to: i64) -> HashMap<i64, Vec<LateBatch>> {
        self.lock()
            .late
            .iter()
            .filter(|(d, _)| **d >= from && **d <= to)
            .map(|(d, b)| (*d, b.clone()))
            .collect()
    }

    /// Emits the body for API days `from..=to` (UTC days or local days, per the time mode).
    fn emit_range(
        &self,
        from: i64,
        to: i64,
        f: &Filter,
        buf: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> Result<(), String> {
        let g = &self.generator;
        let late = self.late_snapshot(from - 1, to + 1);
        let batches = |n: i64| late.get(&n).map_or(&[][..], Vec::as_slice);
        match self.config.time_mode {
            TimeMode::ProjectLocal => {
                for n in from.max(g.first)..=to.min(g.last) {
                    let info = DayInfo::new(&g.tz, n)?;
                    if !g.emit_day(&info, batches(n), f, None, buf, sink) {
                        break;
                    }
                }
            }
            TimeMode::Utc => {
                // A local day can straddle UTC days: cover neighbours, keep instants in range.
                let (lo, hi) = (from * 86_400, (to + 1) * 86_400);
                for n in (from - 1).max(g.first)..=(to + 1).min(g.last) {
                    let info = DayInfo::new(&g.tz, n)?;
                    if info.s1 <= lo || info.s0 >= hi {
                        continue;
                    }
                    let range = (info.s0 < lo || info.s1 > hi).then_some((lo, hi));
                    if !g.emit_day(&info, batches(n), f, range, buf, sink) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// A simulator serving on loopback; dropping it stops the server.
pub struct RunningSim {
    sim: Simulator,
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RunningSim {
    /// Base URL, e.g. "http://127.0.0.1:PORT".
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The simulator being served.
    pub fn sim(&self) -> &Simulator {
        &self.sim
    }
}

impl Drop for RunningSim {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
