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
use crate::mixpanel::ExportQuery;
use crate::state::{Schema, SliceId};
use crate::tables::json::{Columns, Key};

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
    let (day, from_hour, to_hour) = match slice {
        SliceId::Day(d) => (d, 0u8, 24u8),
        SliceId::Hours {
            day,
            from_hour,
            to_hour,
        } => (day, from_hour, to_hour),
        SliceId::Full => {
            return Err(Error::event(
                "the export table is sliced by day, not snapshotted",
            ));
        }
    };
    let local_instant = |hour: u8| -> Result<Timestamp> {
        let dt = if hour == 24 {
            day.tomorrow().map_err(time_err)?.at(0, 0, 0, 0)
        } else {
            day.at(hour as i8, 0, 0, 0)
        };
        Ok(dt
            .to_zoned_datetime(tz.clone())
            .map_err(time_err)?
            .timestamp())
    };
    let start = local_instant(from_hour)?.as_second();
    let end = local_instant(to_hour)?.as_second();
    let whole_day = from_hour == 0 && to_hour == 24;
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
            let w = (!aligned).then(|| time_where(start, end));
            (from, to.min(today).max(from), w)
        }
        ExportTimeMode::ProjectLocal => {
            // `time` is the local wall clock encoded as if UTC.
            let enc = |hour: u8| -> Result<i64> {
                let base = day
                    .at(0, 0, 0, 0)
                    .to_zoned_datetime(TimeZone::UTC)
                    .map_err(time_err)?;
                Ok(base.timestamp().as_second() + i64::from(hour) * 3600)
            };
            let w = (!whole_day)
                .then(|| -> Result<String> { Ok(time_where(enc(from_hour)?, enc(to_hour)?)) });
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

fn time_where(start: i64, end: i64) -> String {
    format!(r#"properties["$time"] >= datetime({start}) and properties["$time"] < datetime({end})"#)
}

fn time_err(e: jiff::Error) -> Error {
    Error::new(ErrorKind::InvalidEvent, format!("date out of range: {e}"))
}

/// What became of one export line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

/// Turns export lines into output records.
pub struct Transformer {
    tz: TimeZone,
    mode: ExportTimeMode,
    start: i64,
    end: i64,
    /// Column filter (`MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT=false`) and discovery.
    columns: Columns,
    hasher: (std::hash::RandomState, std::hash::RandomState),
    props: Vec<u8>,
}

impl Transformer {
    /// A transformer for one slice window; `allowed` restricts the columns to a known schema.
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
            columns: Columns::new(allowed),
            hasher: (std::hash::RandomState::new(), std::hash::RandomState::new()),
            props: Vec::with_capacity(4096),
        }
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
            hasher: self.hasher.clone(),
            props: Vec::with_capacity(4096),
        }
    }

    /// Adds the columns a forked transformer saw.
    pub fn merge(&mut self, other: Transformer) {
        self.columns.merge(other.columns);
    }

    /// Transforms one line (without its newline) and appends the record and a `\n` to `out`.
    pub fn transform(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<LineOutcome> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(LineOutcome::Blank);
        }
        let text = std::str::from_utf8(line).map_err(|_| bad_line(line, "is not UTF-8"))?;
        self.props.clear();
        let mut found = Found::default();
        let mut de = serde_json::Deserializer::from_str(text);
        EventSeed {
            props: &mut self.props,
            found: &mut found,
            columns: &mut self.columns,
        }
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| bad_line(line, &e.to_string()))?;

        let event = found
            .event
            .ok_or_else(|| bad_line(line, "has no \"event\""))?;
        let time_raw = found
            .time
            .ok_or_else(|| bad_line(line, "has no properties.time"))?;
        let encoded = parse_seconds(time_raw.get())
            .ok_or_else(|| bad_line(line, "has a properties.time that is not a number"))?;
        let instant = match self.mode {
            ExportTimeMode::Utc => encoded,
            ExportTimeMode::ProjectLocal => {
                let civil = Timestamp::from_second(encoded)
                    .map_err(|_| bad_line(line, "has a time out of range"))?
                    .to_zoned_datetime(TimeZone::UTC)
                    .datetime();
                civil
                    .to_zoned_datetime(self.tz.clone())
                    .map_err(|_| bad_line(line, "has a time out of range"))?
                    .timestamp()
                    .as_second()
            }
        };
        if instant < self.start || instant >= self.end {
            return Ok(LineOutcome::OutOfRange);
        }
        let ts = Timestamp::from_second(instant)
            .map_err(|_| bad_line(line, "has a time out of range"))?;

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
                let mut a = self.hasher.0.build_hasher();
                let mut b = self.hasher.1.build_hasher();
                for h in [&mut a, &mut b] {
                    h.write(canonical(event).as_bytes());
                    h.write_u8(0xff);
                    match found.distinct_id {
                        Some(d) => {
                            h.write_u8(1);
                            h.write(canonical(d).as_bytes());
                        }
                        None => h.write_u8(0),
                    }
                    h.write_u8(0xff);
                    h.write_i64(encoded);
                    h.write(canonical(insert_id).as_bytes());
                }
                Some((u128::from(a.finish()) << 64) | u128::from(b.finish()))
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

fn bad_line(line: &[u8], why: &str) -> Error {
    let text = String::from_utf8_lossy(line);
    if text.contains("terminated early") {
        return Error::transient(
            "the export body ended with \"terminated early\"; the slice will be fetched again",
        );
    }
    let excerpt: String = text.chars().take(120).collect();
    Error::new(
        ErrorKind::BadResponse,
        format!("unusable export line ({why}): {excerpt:?}"),
    )
}

/// A JSON string's value without its quotes when it has no escapes (the common case), else decoded.
fn canonical(raw: &RawValue) -> Cow<'_, str> {
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

fn parse_seconds(raw: &str) -> Option<i64> {
    raw.parse::<i64>().ok().or_else(|| {
        raw.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(|f| f.floor() as i64)
    })
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

    #[test]
    fn missing_distinct_id_is_null_and_bad_lines_fail() {
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
        let mut out = Vec::new();
        t.transform(
            br#"{"event":"e","properties":{"time":1602611311}}"#,
            &mut out,
        )
        .unwrap();
        assert!(String::from_utf8_lossy(&out).contains("\"distinct_id\":null"));
        assert_eq!(
            t.transform(b"terminated early", &mut out)
                .unwrap_err()
                .kind(),
            ErrorKind::Transient
        );
        assert_eq!(
            t.transform(b"{\"event\":\"e\",\"prop", &mut out)
                .unwrap_err()
                .kind(),
            ErrorKind::BadResponse
        );
        assert_eq!(
            t.transform(b"<html>", &mut out).unwrap_err().kind(),
            ErrorKind::BadResponse
        );
        assert_eq!(
            t.transform(br#"{"event":"e","properties":{}}"#, &mut out)
                .unwrap_err()
                .kind(),
            ErrorKind::BadResponse
        );
        assert_eq!(t.transform(b"  ", &mut out).unwrap(), LineOutcome::Blank);
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
}
