//! The `export` table: raw events, one project-local day per slice.
//!
//! Request plan ([`window`]) and record transform ([`Transformer`]): an export line
//! `{"event": E, "properties": {...}}` becomes `{"event": E, "distinct_id": D, "time": T, ...}`
//! with every property at the top level and a leading `$` renamed `mp_reserved_`. Values are
//! copied as raw JSON text, so numbers beyond 2^53, floats and nested values are kept exactly.

use std::borrow::Cow;
use std::fmt;
use std::hash::{BuildHasher, Hasher};

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::Deserializer;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::config::ExportTimeMode;
use crate::error::{Error, ErrorKind, Result};
use crate::schema::Schema;
use crate::slice::SliceId;
use crate::tables::json::{Columns, Key};
use crate::tables::{Runner, Spec, Table};

/// What the rest of the program knows of the table (its line in [`super::REGISTRY`]).
pub const SPEC: Spec = Spec {
    table: Table::Export,
    name: "export",
    runner: Runner::Export,
    fixed_keys: &FIXED_KEYS,
    glue_columns: &[
        ("event", "string"),
        ("distinct_id", "string"),
        ("time", "string"),
    ],
};

/// One raw export request (what the export API is asked for a slice).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportQuery {
    /// First day (inclusive), in the export API's day encoding.
    pub from_date: Date,
    /// Last day (inclusive).
    pub to_date: Date,
    /// Only these event names.
    pub events: Option<Vec<String>>,
    /// A `where` expression (time bounds of the slice).
    pub where_clause: Option<String>,
}

/// What one slice asks the export API for, and which true-UTC instants belong to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportWindow {
    /// The request.
    pub query: ExportQuery,
    /// First second of the slice (true UTC epoch seconds, inclusive).
    pub start: i64,
    /// End of the slice (exclusive).
    pub end: i64,
}

/// The export request and instant range of a date slice.
///
/// Modern projects number export days in UTC, so a project-local day may span two UTC days:
/// both are asked for and a `where` on `$time` keeps the slice's instants. `today` is the last
/// day the API accepts as `to_date`.
pub fn window(
    slice: SliceId,
    tz: &TimeZone,
    mode: ExportTimeMode,
    today: Date,
    events: Option<Vec<String>>,
) -> Result<ExportWindow> {
    let (day, from_minute, to_minute) = match slice {
        SliceId::Full => {
            return Err(Error::event(
                "the export table is sliced by day, not snapshotted",
            ));
        }
        other => match (other.day(), other.minutes()) {
            (Some(day), Some((from, to))) => (day, from, to),
            _ => return Err(Error::event("the export table is sliced by day")),
        },
    };
    // The instant of a local wall-clock time of the day (minute 1440: the next midnight).
    let wall_clock = |minute: u16| -> Result<i64> {
        let dt = if minute >= 1440 {
            day.tomorrow().map_err(time_err)?.at(0, 0, 0, 0)
        } else {
            day.at((minute / 60) as i8, (minute % 60) as i8, 0, 0)
        };
        Ok(dt
            .to_zoned_datetime(tz.clone())
            .map_err(time_err)?
            .timestamp()
            .as_second())
    };
    let local_instant = |minute: u16| -> Result<i64> {
        let (hour, into) = (minute / 60, i64::from(minute % 60));
        if into == 0 {
            return wall_clock(minute);
        }
        // Whole hours are the local wall clock's; a minute inside an hour is that share of the
        // hour's real instants, so that an hour's pieces tile it whatever the clock does (a
        // repeated hour's pieces are twice as long, a skipped hour's empty).
        let start = wall_clock(hour * 60)?;
        let end = wall_clock((hour + 1) * 60)?;
        Ok(start + (end - start) * into / 60)
    };
    let (start, end) =
        if mode == ExportTimeMode::ProjectLocal && from_minute % 60 + to_minute % 60 > 0 {
            // Events carry the wall clock, and the `where` on it is what picks a piece's events
            // (a repeated or skipped hour's wall-clock minutes are no share of its instants): a
            // piece keeps whatever its hour would.
            let hour = from_minute / 60;
            (wall_clock(hour * 60)?, wall_clock((hour + 1) * 60)?)
        } else {
            (local_instant(from_minute)?, local_instant(to_minute)?)
        };
    let whole_day = from_minute == 0 && to_minute == 1440;
    let (from_date, to_date, where_clause) = match mode {
        ExportTimeMode::Utc => {
            let from = Timestamp::from_second(start)
                .map_err(time_err)?
                .to_zoned_datetime(TimeZone::UTC)
                .date();
            let to = Timestamp::from_second(end - 1)
                .map_err(time_err)?
                .to_zoned_datetime(TimeZone::UTC)
                .date();
            let aligned = whole_day && from == to && *tz == TimeZone::UTC;
            // Mixpanel answers a `to_date` after its today with HTTP 400: an hour of today that
            // has not begun (LA's evening is tomorrow in UTC) is asked within today, where its
            // `where` on `$time` finds nothing yet.
            let from = from.min(today);
            let w = (!aligned).then(|| time_where(start, end));
            (from, to.min(today).max(from), w)
        }
        ExportTimeMode::ProjectLocal => {
            // `time` is the local wall clock encoded as if UTC.
            let enc = |minute: u16| -> Result<i64> {
                let base = day
                    .at(0, 0, 0, 0)
                    .to_zoned_datetime(TimeZone::UTC)
                    .map_err(time_err)?;
                Ok(base.timestamp().as_second() + i64::from(minute) * 60)
            };
            let w = (!whole_day)
                .then(|| -> Result<String> { Ok(time_where(enc(from_minute)?, enc(to_minute)?)) });
            (day, day, w.transpose()?)
        }
    };
    Ok(ExportWindow {
        query: ExportQuery {
            from_date,
            to_date,
            events,
            where_clause,
        },
        start,
        end,
    })
}

/// The one export request of contiguous whole days `days` (a multi-day window) and each day's
/// instant range: the dates of its first and last day's requests (the same rules as
/// [`window`]), and a `where` on `$time` for the whole range when either day needs one.
pub fn window_of_days(
    days: &[Date],
    tz: &TimeZone,
    mode: ExportTimeMode,
    today: Date,
    events: Option<Vec<String>>,
) -> Result<(ExportWindow, Vec<i64>)> {
    let mut each = Vec::with_capacity(days.len());
    for d in days {
        each.push(window(SliceId::Day(*d), tz, mode, today, events.clone())?);
    }
    let (Some(first), Some(last)) = (each.first(), each.last()) else {
        return Err(Error::event("a window of no days"));
    };
    if each.windows(2).any(|w| w[0].end != w[1].start) {
        return Err(Error::event("the days of a window are not contiguous"));
    }
    let needs_where = each.iter().any(|w| w.query.where_clause.is_some());
    let (start, end) = (first.start, last.end);
    // (Whole local days need none in project-local mode: there `time` is the wall clock.)
    let where_clause = needs_where.then(|| time_where(start, end));
    let mut bounds: Vec<i64> = each.iter().map(|w| w.start).collect();
    bounds.push(end);
    Ok((
        ExportWindow {
            query: ExportQuery {
                from_date: first.query.from_date,
                to_date: last.query.to_date.max(first.query.from_date),
                events,
                where_clause,
            },
            start,
            end,
        },
        bounds,
    ))
}

fn time_where(start: i64, end: i64) -> String {
    format!(r#"properties["$time"] >= datetime({start}) and properties["$time"] < datetime({end})"#)
}

fn time_err(e: jiff::Error) -> Error {
    Error::new(ErrorKind::InvalidEvent, format!("date out of range: {e}"))
}

/// What became of one export line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineOutcome {
    /// A record was written to the output buffer.
    Record {
        /// Mixpanel's dedup key (event, distinct_id, time, `$insert_id`), hashed; `None` when
        /// the event has no `$insert_id` (Mixpanel does not deduplicate those).
        key: Option<u128>,
        /// `mp_processing_time_ms` (0 when absent): the latest processed version wins.
        processing_ms: u64,
    },
    /// The event's instant is outside the slice (another slice writes it).
    OutOfRange,
    /// An empty line.
    Blank,
    /// The line cannot be used as it is: not JSON, no `properties` object, no `event`, or no
    /// usable `time`. Nothing was written.
    Unusable(Unusable),
}

/// Why a line cannot be used as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unusable {
    /// What is wrong with it, e.g. `has no properties.time`.
    pub why: String,
    /// The line is JSON that breaks off before its end (the last line of a cut body).
    pub incomplete: bool,
}

/// `time` values from this one on are milliseconds: as seconds they would be after the year
/// 5138, and no second-resolution event is that far in the future.
pub const MS_FROM: i64 = 100_000_000_000;

/// Whether Mixpanel sets this property itself (`$insert_id`, `mp_processing_time_ms` and every
/// `mp_` or `$mp_` property): the known-columns filter keeps these whatever the discovered
/// schema lists, as `events/properties/top` does not always name them.
pub fn is_system_property(key: &str) -> bool {
    key == "$insert_id" || key.starts_with("mp_") || key.starts_with("$mp_")
}

/// Whether an output column holds a system property (see [`is_system_property`]).
pub fn is_system_column(column: &str) -> bool {
    is_system_property(&crate::tables::json::source_key(column))
}

/// Turns export lines into output records.
pub struct Transformer {
    tz: TimeZone,
    mode: ExportTimeMode,
    start: i64,
    end: i64,
    /// Column filter (`MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT=false`) and discovery.
    columns: Columns,
    /// The dedup key's seed: random, one per process (every fork of a transformer shares it,
    /// since their shards are deduplicated together).
    seed: u64,
    /// The bytes a dedup key is hashed from (reused).
    key_bytes: Vec<u8>,
    props: Vec<u8>,
    /// A multi-day window's day boundaries (first start, ..., last end); empty for one slice.
    bounds: std::sync::Arc<[i64]>,
    /// The window's day (index) of the last record.
    day: usize,
}

impl Transformer {
    /// A transformer for one slice window; `allowed` restricts the columns to a known schema
    /// (and Mixpanel's system properties, see [`is_system_property`]).
    pub fn new(
        tz: TimeZone,
        mode: ExportTimeMode,
        window: &ExportWindow,
        allowed: Option<&Schema>,
    ) -> Self {
        Transformer {
            tz,
            mode,
            start: window.start,
            end: window.end,
            columns: Columns::keeping(allowed, is_system_property),
            seed: std::hash::RandomState::new().build_hasher().finish(),
            key_bytes: Vec::with_capacity(256),
            props: Vec::with_capacity(4096),
            bounds: std::sync::Arc::new([]),
            day: 0,
        }
    }

    /// Names property columns as the table's stored schema did (see [`Columns`]): the
    /// record's own `event`, `distinct_id` and `time` are never a property's, nor the
    /// partition `date` readers add to each row.
    pub fn named(mut self, stored: Option<&Schema>) -> Self {
        self.columns = self
            .columns
            .named(stored, &FIXED_KEYS)
            .reserving(&[super::Table::Export.partition_key()]);
        self
    }

    /// Routes records to the days of a multi-day window: `bounds` are the days' starts and the
    /// last day's end (from [`window_of_days`]); see [`Transformer::day`].
    pub fn routed(mut self, bounds: &[i64]) -> Self {
        self.bounds = bounds.into();
        self
    }

    /// Days the records are routed to (1 for one slice).
    pub fn days(&self) -> usize {
        self.bounds.len().saturating_sub(1).max(1)
    }

    /// The window's day (0 for the first) of the record the last [`Transformer::transform`] made.
    pub fn day(&self) -> usize {
        self.day
    }

    /// A transformer for another worker of the same slice: same window, column filter and dedup
    /// key hashing, nothing seen yet. Merge it back with [`Transformer::merge`].
    pub fn fork(&self) -> Self {
        Transformer {
            tz: self.tz.clone(),
            mode: self.mode,
            start: self.start,
            end: self.end,
            columns: self.columns.fork(),
            seed: self.seed,
            key_bytes: Vec::with_capacity(256),
            props: Vec::with_capacity(4096),
            bounds: self.bounds.clone(),
            day: 0,
        }
    }

    /// Adds the columns a forked transformer saw.
    pub fn merge(&mut self, other: Transformer) {
        self.columns.merge(other.columns);
    }

    /// Transforms one line (without its newline) and appends the record and a `\n` to `out`.
    ///
    /// A line that cannot be used is [`LineOutcome::Unusable`]; the only error is the line
    /// with which Mixpanel ends a body it could not finish (`terminated early`).
    pub fn transform(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<LineOutcome> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(LineOutcome::Blank);
        }
        let Ok(text) = std::str::from_utf8(line) else {
            return unusable(line, "is not UTF-8", false);
        };
        self.props.clear();
        let mut found = Found::default();
        let mut de = serde_json::Deserializer::from_str(text);
        let parsed = EventSeed {
            props: &mut self.props,
            found: &mut found,
            columns: &mut self.columns,
        }
        .deserialize(&mut de)
        .and_then(|()| de.end());
        if let Err(e) = parsed {
            let incomplete = e.classify() == serde_json::error::Category::Eof;
            return unusable(line, &e.to_string(), incomplete);
        }
        let Some(event) = found.event else {
            return unusable(line, "has no \"event\"", false);
        };
        let Some(time_raw) = found.time else {
            return unusable(line, "has no properties.time", false);
        };
        let Some(encoded) = event_second(time_raw) else {
            return unusable(
                line,
                "has a properties.time that is not a number of seconds or milliseconds",
                false,
            );
        };
        let instant = match self.mode {
            ExportTimeMode::Utc => encoded,
            ExportTimeMode::ProjectLocal => {
                // A time no calendar holds is in no slice.
                let Some(instant) = Timestamp::from_second(encoded).ok().and_then(|t| {
                    t.to_zoned_datetime(TimeZone::UTC)
                        .datetime()
                        .to_zoned_datetime(self.tz.clone())
                        .ok()
                }) else {
                    return Ok(LineOutcome::OutOfRange);
                };
                instant.timestamp().as_second()
            }
        };
        if instant < self.start || instant >= self.end {
            return Ok(LineOutcome::OutOfRange);
        }
        let Ok(ts) = Timestamp::from_second(instant) else {
            return Ok(LineOutcome::OutOfRange);
        };
        if self.bounds.len() > 2 {
            self.day = self
                .bounds
                .partition_point(|b| *b <= instant)
                .saturating_sub(1);
        }

        out.extend_from_slice(b"{\"event\":");
        out.extend_from_slice(event.get().as_bytes());
        out.extend_from_slice(b",\"distinct_id\":");
        match found.distinct_id {
            Some(d) => out.extend_from_slice(d.get().as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"time\":\"");
        write_rfc3339(out, ts);
        out.push(b'"');
        out.extend_from_slice(&self.props);
        out.extend_from_slice(b"}\n");

        let key = match found.insert_id {
            None => None,
            Some(insert_id) => {
                // One 128-bit hash of the key's fields, each ended by a byte no UTF-8 text
                // holds (the insert id, last, needs none).
                let k = &mut self.key_bytes;
                k.clear();
                k.extend_from_slice(canonical(event).as_bytes());
                k.push(0xff);
                match found.distinct_id {
                    Some(d) => {
                        k.push(1);
                        k.extend_from_slice(canonical(d).as_bytes());
                    }
                    None => k.push(0),
                }
                k.push(0xff);
                // The normalized second: `1602611311`, `1602611311.5`, `"1602611311"` and
                // `1602611311500` are one time.
                k.extend_from_slice(&encoded.to_le_bytes());
                k.extend_from_slice(canonical(insert_id).as_bytes());
                Some(xxhash_rust::xxh3::xxh3_128_with_seed(k, self.seed))
            }
        };
        let processing_ms = found
            .processing
            .and_then(|p| parse_u64(p.get()))
            .unwrap_or(0);
        Ok(LineOutcome::Record { key, processing_ms })
    }

    /// The columns seen so far (output names, JSON types), `event`, `distinct_id` and `time` included.
    pub fn schema(&self) -> Schema {
        self.columns.schema(&[
            ("event", "string"),
            ("distinct_id", "string"),
            ("time", "timestamp"),
        ])
    }
}

/// The keys of an export record that no property column may take.
pub const FIXED_KEYS: [&str; 3] = ["event", "distinct_id", "time"];

fn unusable(line: &[u8], why: &str, incomplete: bool) -> Result<LineOutcome> {
    if is_terminated_early(line) {
        return Err(Error::transient(
            "the export body ended with \"terminated early\"; the slice will be fetched again",
        ));
    }
    Ok(LineOutcome::Unusable(Unusable {
        why: why.to_string(),
        incomplete,
    }))
}

/// Mixpanel's last line of a body it could not finish: `terminated early` (also seen as
/// `export terminated early`), plain text, not JSON.
fn is_terminated_early(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    !text.starts_with('{') && text.contains("terminated early")
}

/// The error of an export body that is not events, naming its first unusable line.
pub fn unusable_error(line: &[u8], why: &str) -> Error {
    let text = String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(line));
    let excerpt: String = text.chars().take(120).collect();
    Error::new(
        ErrorKind::BadResponse,
        format!("unusable export line ({why}): {excerpt:?}"),
    )
}

/// Whether a line holds a raw control byte that [`repair`] would escape (a trailing `\r` is the
/// line end of a CRLF body, not content).
pub fn has_raw_control(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.iter().any(|&b| b < 0x20)
}

/// Joins the lines of one event that raw line breaks inside its strings split (`pieces`, in
/// body order, each without its `\n`), with every raw control byte inside a string — the
/// breaks too — written as its JSON escape (`\n`, `\r`, `\t`, `\u00XX`), so the value is
/// exactly what was sent. Raw bytes outside strings are kept (a break between two tokens is
/// whitespace). `None` when a control byte follows a backslash (no escape can stand for that).
pub fn repair(pieces: &[&[u8]], out: &mut Vec<u8>) -> Option<()> {
    let mut in_string = false;
    let mut escaped = false;
    for (i, piece) in pieces.iter().enumerate() {
        let last = i + 1 == pieces.len();
        let piece = if last {
            piece.strip_suffix(b"\r").unwrap_or(piece)
        } else {
            piece
        };
        let breaks: &[u8] = if last { b"" } else { b"\n" };
        for &b in piece.iter().chain(breaks) {
            if !in_string {
                in_string = b == b'"';
                out.push(b);
                continue;
            }
            if escaped {
                if b < 0x20 {
                    return None;
                }
                escaped = false;
                out.push(b);
                continue;
            }
            match b {
                b'\\' => {
                    escaped = true;
                    out.push(b);
                }
                b'"' => {
                    in_string = false;
                    out.push(b);
                }
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0..=0x1f => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 15)]);
                }
                _ => out.push(b),
            }
        }
    }
    Some(())
}

/// A JSON string's value without its quotes when it has no escapes (the common case), else decoded.
pub(crate) fn canonical(raw: &RawValue) -> Cow<'_, str> {
    let s = raw.get();
    if let Some(inner) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"'))
        && !inner.contains('\\')
    {
        return Cow::Borrowed(inner);
    }
    if s.starts_with('"')
        && let Ok(v) = serde_json::from_str::<String>(s)
    {
        return Cow::Owned(v);
    }
    Cow::Borrowed(s)
}

/// The second a `properties.time` means: epoch seconds as an integer, a float (`1602611311.5`)
/// or a numeric string (`"1602611311"`), and milliseconds from [`MS_FROM`] on
/// (`1602611311500`). A fraction of a second is cut (floor): Mixpanel's dedup key and the
/// output's `time` are in seconds. `None` for anything else (`true`, `"yesterday"`, `null`).
fn event_second(raw: &RawValue) -> Option<i64> {
    let s = raw.get();
    let text = if s.starts_with('"') {
        canonical(raw)
    } else {
        Cow::Borrowed(s)
    };
    if let Ok(n) = text.parse::<i64>() {
        return Some(if n >= MS_FROM { n.div_euclid(1000) } else { n });
    }
    let f = text.parse::<f64>().ok().filter(|f| f.is_finite())?;
    let secs = if f >= MS_FROM as f64 { f / 1000.0 } else { f };
    // A cast saturates: a time beyond i64 is out of every slice.
    Some(secs.floor() as i64)
}

fn parse_u64(raw: &str) -> Option<u64> {
    raw.parse::<u64>().ok().or_else(|| {
        raw.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    })
}

/// `YYYY-MM-DDTHH:MM:SSZ`.
fn write_rfc3339(out: &mut Vec<u8>, ts: Timestamp) {
    let dt = ts.to_zoned_datetime(TimeZone::UTC).datetime();
    let year = dt.year();
    if !(0..=9999).contains(&year) {
        use std::io::Write;
        let _ = write!(
            out,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            year,
            dt.month(),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second()
        );
        return;
    }
    let two = |n: i8| [b'0' + (n / 10) as u8, b'0' + (n % 10) as u8];
    let y = year as u16;
    let mut b = [0u8; 20];
    b[0] = b'0' + (y / 1000) as u8;
    b[1] = b'0' + (y / 100 % 10) as u8;
    b[2] = b'0' + (y / 10 % 10) as u8;
    b[3] = b'0' + (y % 10) as u8;
    b[4] = b'-';
    b[5..7].copy_from_slice(&two(dt.month()));
    b[7] = b'-';
    b[8..10].copy_from_slice(&two(dt.day()));
    b[10] = b'T';
    b[11..13].copy_from_slice(&two(dt.hour()));
    b[13] = b':';
    b[14..16].copy_from_slice(&two(dt.minute()));
    b[16] = b':';
    b[17..19].copy_from_slice(&two(dt.second()));
    b[19] = b'Z';
    out.extend_from_slice(&b);
}

/// The parts of an event line kept by reference into the line.
#[derive(Default)]
struct Found<'de> {
    event: Option<&'de RawValue>,
    time: Option<&'de RawValue>,
    distinct_id: Option<&'de RawValue>,
    insert_id: Option<&'de RawValue>,
    processing: Option<&'de RawValue>,
}

struct EventSeed<'s, 'de> {
    props: &'s mut Vec<u8>,
    found: &'s mut Found<'de>,
    columns: &'s mut Columns,
}

impl<'de> DeserializeSeed<'de> for EventSeed<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EventSeed<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an export event object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        let mut had_props = false;
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match &*k {
                "event" => self.found.event = Some(map.next_value::<&'de RawValue>()?),
                "properties" => {
                    had_props = true;
                    map.next_value_seed(PropsSeed {
                        props: &mut *self.props,
                        found: &mut *self.found,
                        columns: &mut *self.columns,
                    })?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !had_props {
            return Err(de::Error::custom("no \"properties\" object"));
        }
        Ok(())
    }
}

struct PropsSeed<'s, 'de> {
    props: &'s mut Vec<u8>,
    found: &'s mut Found<'de>,
    columns: &'s mut Columns,
}

impl<'de> DeserializeSeed<'de> for PropsSeed<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PropsSeed<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a properties object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            let v: &'de RawValue = map.next_value()?;
            match &*k {
                "time" => {
                    self.found.time = Some(v);
                    continue;
                }
                "distinct_id" => {
                    self.found.distinct_id = Some(v);
                    continue;
                }
                "$insert_id" => self.found.insert_id = Some(v),
                "mp_processing_time_ms" => self.found.processing = Some(v),
                _ => {}
            }
            self.columns.push(self.props, &k, v);
        }
        Ok(())
    }
}

/// The project-local day of `now`.
pub fn project_today(tz: &TimeZone, now: Timestamp) -> Date {
    now.to_zoned_datetime(tz.clone()).date()
}

/// The last day the export API accepts as `to_date`: today in UTC for modern projects, in the
/// project's timezone for older ones.
pub fn export_today(tz: &TimeZone, mode: ExportTimeMode, now: Timestamp) -> Date {
    match mode {
        ExportTimeMode::Utc => now.to_zoned_datetime(TimeZone::UTC).date(),
        ExportTimeMode::ProjectLocal => project_today(tz, now),
    }
}

/// `day` minus `n` days, saturating at the earliest date.
pub fn days_before(day: Date, n: u32) -> Date {
    day.checked_sub(i64::from(n).days()).unwrap_or(Date::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn la() -> TimeZone {
        TimeZone::get("America/Los_Angeles").unwrap()
    }

    fn d(s: &str) -> Date {
        s.parse().unwrap()
    }

    #[test]
    fn utc_day_in_utc_project_needs_no_where() {
        let w = window(
            SliceId::Day(d("2026-11-01")),
            &TimeZone::UTC,
            ExportTimeMode::Utc,
            d("2026-11-20"),
            None,
        )
        .unwrap();
        assert_eq!(
            (w.query.from_date, w.query.to_date, w.query.where_clause),
            (d("2026-11-01"), d("2026-11-01"), None)
        );
    }

    #[test]
    fn local_day_spans_two_utc_days_with_a_time_filter() {
        let w = window(
            SliceId::Day(d("2026-11-01")),
            &la(),
            ExportTimeMode::Utc,
            d("2026-11-20"),
            None,
        )
        .unwrap();
        // 2026-11-01 is the DST end in Los Angeles: the day lasts 25 hours, 07:00Z to 08:00Z.
        assert_eq!(w.start, 1_793_516_400);
        assert_eq!(w.end - w.start, 25 * 3600);
        assert_eq!(
            (w.query.from_date, w.query.to_date),
            (d("2026-11-01"), d("2026-11-02"))
        );
        assert_eq!(
            w.query.where_clause.as_deref(),
            Some(
                r#"properties["$time"] >= datetime(1793516400) and properties["$time"] < datetime(1793606400)"#
            )
        );
        // Never asks past the last day the API accepts.
        let w = window(
            SliceId::Day(d("2026-11-01")),
            &la(),
            ExportTimeMode::Utc,
            d("2026-11-01"),
            None,
        )
        .unwrap();
        assert_eq!(w.query.to_date, d("2026-11-01"));
    }

    /// The 24 hour slices of a day tile the day's instants exactly, on the days the clocks
    /// change too (23 and 25 hours): no instant is in two hours or in none.
    #[test]
    fn hour_slices_tile_their_day_across_clock_changes() {
        let today = d("2027-01-01");
        for (tz, day, hours) in [
            (la(), "2026-03-08", 23),
            (la(), "2026-11-01", 25),
            (la(), "2026-07-01", 24),
            (TimeZone::UTC, "2026-11-01", 24),
        ] {
            let whole =
                window(SliceId::Day(d(day)), &tz, ExportTimeMode::Utc, today, None).unwrap();
            assert_eq!(whole.end - whole.start, hours * 3600, "{day}");
            let mut next = whole.start;
            for h in 0..24u8 {
                let w = window(
                    SliceId::Hours {
                        day: d(day),
                        from_hour: h,
                        to_hour: h + 1,
                    },
                    &tz,
                    ExportTimeMode::Utc,
                    today,
                    None,
                )
                .unwrap();
                assert_eq!(
                    w.start, next,
                    "{day} hour {h} starts where hour {h} - 1 ended"
                );
                assert!(w.end >= w.start, "{day} hour {h}");
                // Every hour asks with its own `where`, for UTC days that hold its instants.
                assert_eq!(
                    w.query.where_clause.as_deref(),
                    Some(time_where(w.start, w.end).as_str())
                );
                let utc_day = |s: i64| {
                    Timestamp::from_second(s)
                        .unwrap()
                        .to_zoned_datetime(TimeZone::UTC)
                        .date()
                };
                assert!(w.query.from_date <= utc_day(w.start), "{day} hour {h}");
                assert!(
                    w.query.to_date >= utc_day((w.end - 1).max(w.start)),
                    "{day} hour {h}"
                );
                next = w.end;
            }
            assert_eq!(next, whole.end, "{day}: the last hour ends the day");
        }
        // A legacy project's local `time`: the hours of a 25-hour day are 24 wall-clock hours.
        let mut next = None;
        for h in 0..24u8 {
            let w = window(
                SliceId::Hours {
                    day: d("2026-11-01"),
                    from_hour: h,
                    to_hour: h + 1,
                },
                &la(),
                ExportTimeMode::ProjectLocal,
                today,
                None,
            )
            .unwrap();
            assert_eq!(
                (w.query.from_date, w.query.to_date),
                (d("2026-11-01"), d("2026-11-01"))
            );
            let enc = 1_793_491_200 + i64::from(h) * 3600; // 2026-11-01T00:00 encoded as UTC
            assert_eq!(
                w.query.where_clause.as_deref(),
                Some(time_where(enc, enc + 3600).as_str())
            );
            if let Some(n) = next {
                assert_eq!(w.start, n, "hour {h}");
            }
            next = Some(w.end);
        }
    }

    #[test]
    fn transform_flattens_renames_and_keeps_raw_values() {
        let tz = TimeZone::UTC;
        let w = window(
            SliceId::Day(d("2020-10-13")),
            &tz,
            ExportTimeMode::Utc,
            d("2026-01-01"),
            None,
        )
        .unwrap();
        let mut t = Transformer::new(tz, ExportTimeMode::Utc, &w, None);
        let line = br#"{"event":"Signed up","properties":{"time":1602611311,"distinct_id":"user 1/2","$insert_id":"abc","mp_processing_time_ms":1602625711874,"big":12345678901234567890,"f":1.50,"n":null,"o":{"$x":[1,"\n"]},"k\"q":true}}"#;
        let mut out = Vec::new();
        let r = t.transform(line, &mut out).unwrap();
        assert!(matches!(
            r,
            LineOutcome::Record {
                key: Some(_),
                processing_ms: 1602625711874
            }
        ));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"event\":\"Signed up\",\"distinct_id\":\"user 1/2\",\"time\":\"2020-10-13T17:48:31Z\",\"mp_reserved_insert_id\":\"abc\",\"mp_processing_time_ms\":1602625711874,\"big\":12345678901234567890,\"f\":1.50,\"n\":null,\"o\":{\"$x\":[1,\"\\n\"]},\"k\\\"q\":true}\n"
        );
    }

    fn oct13() -> Transformer {
        let tz = TimeZone::UTC;
        let w = window(
            SliceId::Day(d("2020-10-13")),
            &tz,
            ExportTimeMode::Utc,
            d("2026-01-01"),
            None,
        )
        .unwrap();
        Transformer::new(tz, ExportTimeMode::Utc, &w, None)
    }

    fn why(outcome: LineOutcome) -> String {
        match outcome {
            LineOutcome::Unusable(u) => u.why,
            other => panic!("usable: {other:?}"),
        }
    }

    #[test]
    fn missing_distinct_id_is_null_and_bad_lines_are_unusable() {
        let mut t = oct13();
        let mut out = Vec::new();
        t.transform(
            br#"{"event":"e","properties":{"time":1602611311}}"#,
            &mut out,
        )
        .unwrap();
        assert!(String::from_utf8_lossy(&out).contains("\"distinct_id\":null"));
        out.clear();
        for line in [b"terminated early".as_slice(), b"export terminated early\r"] {
            assert_eq!(
                t.transform(line, &mut out).unwrap_err().kind(),
                ErrorKind::Transient
            );
        }
        let cut = t.transform(b"{\"event\":\"e\",\"prop", &mut out).unwrap();
        assert!(
            matches!(&cut, LineOutcome::Unusable(u) if u.incomplete),
            "{cut:?}"
        );
        for (line, says) in [
            (b"<html>".as_slice(), "expected value at line 1 column 1"),
            (
                br#"{"event":"e","properties":{}}"#,
                "has no properties.time",
            ),
            (
                br#"{"event":"e","time":1602611311}"#,
                "no \"properties\" object at line 1 column 31",
            ),
            (br#"{"properties":{"time":1602611311}}"#, "has no \"event\""),
            (
                br#"{"event":"e","properties":{"time":"yesterday"}}"#,
                "has a properties.time that is not a number of seconds or milliseconds",
            ),
            (
                br#"{"event":"e","properties":{"time":true}}"#,
                "has a properties.time that is not a number of seconds or milliseconds",
            ),
            (b"{\"event\":\"\xff\"}", "is not UTF-8"),
        ] {
            assert_eq!(why(t.transform(line, &mut out).unwrap()), says);
            assert!(out.is_empty(), "nothing written for an unusable line");
        }
        assert_eq!(t.transform(b"  ", &mut out).unwrap(), LineOutcome::Blank);
        assert_eq!(t.transform(b"\r", &mut out).unwrap(), LineOutcome::Blank);
    }

    /// `time` as an integer, a float, a numeric string or milliseconds is one instant, cut to
    /// the second, and one dedup key.
    #[test]
    fn time_is_the_instant_it_means_to_the_second() {
        let mut t = oct13();
        let mut keys = Vec::new();
        for time in [
            "1602611311",
            "1602611311.5",
            "1602611311.999",
            "1.602611311e9",
            "\"1602611311\"",
            "\"1602611311.25\"",
            "1602611311000",
            "1602611311999",
            "1602611311999.9",
            "\"1602611311500\"",
        ] {
            let line = format!(
                r#"{{"event":"e","properties":{{"time":{time},"distinct_id":"u","$insert_id":"i"}}}}"#
            );
            let mut out = Vec::new();
            let LineOutcome::Record { key, .. } = t.transform(line.as_bytes(), &mut out).unwrap()
            else {
                panic!("{time} is no record");
            };
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "{\"event\":\"e\",\"distinct_id\":\"u\",\"time\":\"2020-10-13T17:48:31Z\",\"mp_reserved_insert_id\":\"i\"}\n",
                "{time}"
            );
            keys.push(key.unwrap());
        }
        assert!(keys.windows(2).all(|k| k[0] == k[1]), "one dedup key");
        // The last second below the milliseconds threshold is seconds; the threshold is ms.
        assert_eq!(event_second(raw("99999999999")), Some(99_999_999_999));
        assert_eq!(event_second(raw("100000000000")), Some(100_000_000));
        assert_eq!(event_second(raw("-1.5")), Some(-2));
        assert_eq!(event_second(raw("1e400")), None);
        assert_eq!(event_second(raw("\"NaN\"")), None);
        assert_eq!(event_second(raw("null")), None);
        // A time beyond any calendar is in no slice, not an error.
        let mut out = Vec::new();
        for time in ["1e300", "9223372036854775807", "-9223372036854775808"] {
            let line = format!(r#"{{"event":"e","properties":{{"time":{time}}}}}"#);
            assert_eq!(
                t.transform(line.as_bytes(), &mut out).unwrap(),
                LineOutcome::OutOfRange,
                "{time}"
            );
        }
    }

    fn raw(s: &str) -> &RawValue {
        serde_json::from_str::<&RawValue>(s).unwrap()
    }

    fn repaired(pieces: &[&[u8]]) -> Option<String> {
        let mut out = Vec::new();
        repair(pieces, &mut out).map(|()| String::from_utf8(out).unwrap())
    }

    #[test]
    fn repair_escapes_raw_breaks_and_control_bytes_inside_strings_only() {
        assert_eq!(
            repaired(&[b"{\"a\":\"one", b"two\r", b"", b"three\"}\r"]).unwrap(),
            "{\"a\":\"one\\ntwo\\r\\n\\nthree\"}"
        );
        // Between tokens a break is whitespace and stays.
        assert_eq!(
            repaired(&[b"{\"a\":1,", b"\"b\":\"x\ty\x01\\\"\"}"]).unwrap(),
            "{\"a\":1,\n\"b\":\"x\\ty\\u0001\\\"\"}"
        );
        // Escapes already there are kept as they are.
        assert_eq!(
            repaired(&[br#"{"a":"\u0001\n\\"}"#]).unwrap(),
            r#"{"a":"\u0001\n\\"}"#
        );
        assert_eq!(repaired(&[b"{\"a\":\"x\\", b"\"}"]), None);
    }

    #[test]
    fn system_properties_pass_the_known_columns_filter() {
        assert!(is_system_property("$insert_id"));
        assert!(is_system_property("mp_processing_time_ms"));
        assert!(is_system_property("mp_lib"));
        assert!(is_system_property("$mp_api_endpoint"));
        assert!(!is_system_property("$city"));
        assert!(!is_system_property("plan"));
        let tz = TimeZone::UTC;
        let w = window(
            SliceId::Day(d("2020-10-13")),
            &tz,
            ExportTimeMode::Utc,
            d("2026-01-01"),
            None,
        )
        .unwrap();
        let mut known = Schema::default();
        known.columns.insert("plan".into(), "string".into());
        let mut t = Transformer::new(tz, ExportTimeMode::Utc, &w, Some(&known));
        let mut out = Vec::new();
        t.transform(
            br#"{"event":"e","properties":{"time":1602611311,"$insert_id":"i","mp_processing_time_ms":5,"mp_lib":"web","$mp_api_endpoint":"api.mixpanel.com","$city":"Paris","plan":"pro","new":1}}"#,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"event\":\"e\",\"distinct_id\":null,\"time\":\"2020-10-13T17:48:31Z\",\"mp_reserved_insert_id\":\"i\",\"mp_processing_time_ms\":5,\"mp_lib\":\"web\",\"mp_reserved_mp_api_endpoint\":\"api.mixpanel.com\",\"plan\":\"pro\"}\n"
        );
    }

    #[test]
    fn project_local_time_becomes_true_utc() {
        let tz = la();
        let w = window(
            SliceId::Day(d("2026-06-01")),
            &tz,
            ExportTimeMode::ProjectLocal,
            d("2026-07-01"),
            None,
        )
        .unwrap();
        assert_eq!(
            (
                w.query.from_date,
                w.query.to_date,
                w.query.where_clause.clone()
            ),
            (d("2026-06-01"), d("2026-06-01"), None)
        );
        let mut t = Transformer::new(tz, ExportTimeMode::ProjectLocal, &w, None);
        // 2026-06-01 23:59:59 local, encoded as if UTC; in true UTC it is 06:59:59 the next day.
        let enc = d("2026-06-01")
            .at(23, 59, 59, 0)
            .to_zoned_datetime(TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_second();
        let mut out = Vec::new();
        t.transform(
            format!(r#"{{"event":"e","properties":{{"time":{enc}}}}}"#).as_bytes(),
            &mut out,
        )
        .unwrap();
        assert!(String::from_utf8_lossy(&out).contains("\"time\":\"2026-06-02T06:59:59Z\""));
    }

    #[test]
    fn schema_filter_drops_unknown_properties() {
        let tz = TimeZone::UTC;
        let w = window(
            SliceId::Day(d("2020-10-13")),
            &tz,
            ExportTimeMode::Utc,
            d("2026-01-01"),
            None,
        )
        .unwrap();
        let mut known = Schema::default();
        known
            .columns
            .insert("mp_reserved_city".into(), "string".into());
        let mut t = Transformer::new(tz, ExportTimeMode::Utc, &w, Some(&known));
        let mut out = Vec::new();
        t.transform(
            br#"{"event":"e","properties":{"time":1602611311,"$city":"Paris","new":1}}"#,
            &mut out,
        )
        .unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("\"mp_reserved_city\":\"Paris\"") && !s.contains("\"new\""),
            "{s}"
        );
    }

    /// At every moment of a day, no request for today (its hours, the whole day, or the
    /// attribution window ending today) has a `to_date` after Mixpanel's today, in UTC−8,
    /// UTC+5:30 and UTC+13:45 and in both time modes: Mixpanel answers such a request 400.
    #[test]
    fn no_request_of_today_asks_for_a_date_after_mixpanels_today_at_any_moment() {
        let zones = ["America/Los_Angeles", "Asia/Kolkata", "Pacific/Chatham"];
        // Two UTC days, in five-minute steps: every local hour of today in each zone.
        let start = d("2026-12-01")
            .to_zoned_datetime(TimeZone::UTC)
            .unwrap()
            .timestamp();
        for name in zones {
            let tz = TimeZone::get(name).unwrap();
            for mode in [ExportTimeMode::Utc, ExportTimeMode::ProjectLocal] {
                for step in 0..(2 * 24 * 12) {
                    let now = start + jiff::SignedDuration::from_mins(5 * step);
                    let today = project_today(&tz, now);
                    let api_today = export_today(&tz, mode, now);
                    let mut slices = crate::plan::pieces(SliceId::Day(today));
                    slices.push(SliceId::Day(today));
                    for slice in slices {
                        let w = window(slice, &tz, mode, api_today, None).unwrap();
                        assert!(
                            w.query.from_date <= w.query.to_date && w.query.to_date <= api_today,
                            "{name} {mode:?} at {now}: {slice} asks {}..{} (Mixpanel's today {api_today})",
                            w.query.from_date,
                            w.query.to_date
                        );
                    }
                    let days: Vec<Date> = (0..6).rev().map(|n| days_before(today, n)).collect();
                    let (w, _) = window_of_days(&days, &tz, mode, api_today, None).unwrap();
                    assert!(
                        w.query.to_date <= api_today,
                        "{name} {mode:?} at {now}: the window ending today asks for {}",
                        w.query.to_date
                    );
                }
            }
        }
    }

    /// The pieces of every hour (quarters, then five minutes) tile the hour's instants on
    /// clock-change days too: a repeated hour's pieces are longer, a skipped hour's empty,
    /// Lord Howe's half-hour change included; a legacy project's pieces tile its wall clock.
    #[test]
    fn pieces_of_an_hour_tile_it_across_clock_changes() {
        let today = d("2027-01-01");
        let mut cases = vec![
            (la(), "2026-03-08"),
            (la(), "2026-11-01"),
            (TimeZone::get("Australia/Lord_Howe").unwrap(), "2026-04-05"),
            (TimeZone::get("Australia/Lord_Howe").unwrap(), "2026-10-04"),
            (TimeZone::get("Pacific/Chatham").unwrap(), "2026-09-27"),
            (TimeZone::get("Asia/Kolkata").unwrap(), "2026-07-01"),
        ];
        cases.push((TimeZone::UTC, "2026-11-01"));
        for (tz, day) in cases {
            for mode in [ExportTimeMode::Utc, ExportTimeMode::ProjectLocal] {
                let w = |s: SliceId| window(s, &tz, mode, today, None).unwrap();
                for hour in crate::plan::pieces(SliceId::Day(d(day))) {
                    let whole = w(hour);
                    let mut next = whole.start;
                    let mut next_where: Option<i64> = None;
                    for quarter in crate::plan::pieces(hour) {
                        for five in crate::plan::pieces(quarter) {
                            let mut p = w(five);
                            if mode == ExportTimeMode::ProjectLocal {
                                // A legacy project's pieces are told apart by their `where`
                                // on the wall clock alone; each keeps its hour's instants.
                                assert_eq!(
                                    (p.start, p.end),
                                    (whole.start, whole.end),
                                    "{day} {five}"
                                );
                                p.start = next;
                                p.end = whole.end;
                            }
                            assert_eq!(
                                p.start, next,
                                "{day} {mode:?} {five} starts where the last ended"
                            );
                            assert!(p.end >= p.start, "{day} {five}");
                            next = p.end;
                            // The `where` clauses tile too: no instant in two pieces or none.
                            let clause = p.query.where_clause.clone().unwrap();
                            let bounds: Vec<i64> = clause
                                .split("datetime(")
                                .skip(1)
                                .map(|t| t.split(')').next().unwrap().parse().unwrap())
                                .collect();
                            if let Some(n) = next_where {
                                assert_eq!(bounds[0], n, "{day} {mode:?} {five}: {clause}");
                            }
                            next_where = Some(bounds[1]);
                        }
                    }
                    assert_eq!(
                        next, whole.end,
                        "{day} {mode:?} {hour}: the last piece ends the hour"
                    );
                }
            }
        }
        // An ordinary quarter is its wall-clock quarter.
        let q = window(
            SliceId::Minutes {
                day: d("2026-07-01"),
                from: 13 * 60 + 15,
                to: 13 * 60 + 30,
            },
            &la(),
            ExportTimeMode::Utc,
            today,
            None,
        )
        .unwrap();
        // 2026-07-01T13:15-07:00 = 20:15Z.
        assert_eq!((q.start, q.end), (1_782_936_900, 1_782_937_800));
        assert_eq!(
            (q.query.from_date, q.query.to_date),
            (d("2026-07-01"), d("2026-07-01"))
        );
    }
}
