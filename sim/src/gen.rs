//! Deterministic event generation: every delivery is a pure function of
//! (seed, day, index), so a day of any size is streamed without being stored.

use std::sync::LazyLock;

use jiff::civil::Date;
use jiff::tz::{AmbiguousOffset, TimeZone};

use crate::TimeMode;
use crate::templates::{NAME_WEIGHTS, TEMPLATES, Templates};

const SECS_PER_DAY: i64 = 86_400;
const MS_PER_DAY: i64 = 86_400_000;

// Distinct streams so that unrelated decisions never share random bits.
const S_EVENT: u64 = 0x5EED_0001;
const S_DUP: u64 = 0x5EED_0002;
const S_IID: u64 = 0x5EED_0003;
const S_PERM: u64 = 0x5EED_0004;
const S_LATE: u64 = 0x5EED_0005;
const S_RETRY: u64 = 0x5EED_0006;
const S_USER: u64 = 0x5EED_0007;
const S_REDELIVER: u64 = 0x5EED_0008;
const S_MESSY: u64 = 0x5EED_0009;

/// The splitmix64 finalizer: a fast, well-mixed 64-bit hash.
#[inline]
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[inline]
pub(crate) fn hash4(seed: u64, stream: u64, day: i64, index: u64) -> u64 {
    mix(mix(mix(seed ^ stream) ^ day as u64) ^ index)
}

/// splitmix64 generator.
pub(crate) struct Rng(u64);

impl Rng {
    #[inline]
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    #[inline]
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, n) (n > 0) by multiply-shift, no division.
    #[inline]
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    #[inline]
    pub(crate) fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
pub(crate) fn day_num(d: Date) -> i64 {
    let (y, m, dd) = (d.year() as i64, d.month() as i64, d.day() as i64);
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Civil (year, month, day) of a day number.
pub(crate) fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d)
}

/// The Date of a day number, if jiff can represent it.
pub(crate) fn date_of(n: i64) -> Option<Date> {
    let (y, m, d) = civil(n);
    Date::new(i16::try_from(y).ok()?, m as i8, d as i8).ok()
}

/// RFC 3339 UTC at second precision, e.g. `2026-11-01T10:00:00Z`.
pub(crate) fn rfc3339(secs: i64) -> String {
    let (y, m, d) = civil(secs.div_euclid(SECS_PER_DAY));
    let s = secs.rem_euclid(SECS_PER_DAY);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        (s / 60) % 60,
        s % 60
    )
}

/// Per project-local day facts, computed once per day with jiff.
pub(crate) struct DayInfo {
    pub num: i64,
    /// Local midnight encoded as if UTC (the ProjectLocal `time` origin).
    pub wall0: i64,
    /// True instants of the start of this day and of the next one.
    pub s0: i64,
    pub s1: i64,
    /// For each local hour free of DST gaps and folds, its UTC offset.
    offsets: [Option<i32>; 24],
    /// For each hour, the clean hour events of that hour are moved to.
    clean_hour: [u8; 24],
}

fn start_of_day(tz: &TimeZone, d: Date) -> Result<i64, String> {
    let z = d
        .to_zoned_datetime(tz.clone())
        .and_then(|z| z.start_of_day())
        .map_err(|e| format!("day {d} in the project timezone: {e}"))?;
    Ok(z.timestamp().as_second())
}

impl DayInfo {
    pub(crate) fn new(tz: &TimeZone, num: i64) -> Result<DayInfo, String> {
        let date = date_of(num).ok_or_else(|| format!("day {num} out of range"))?;
        let next = date_of(num + 1).ok_or_else(|| format!("day {} out of range", num + 1))?;
        let s0 = start_of_day(tz, date)?;
        let s1 = start_of_day(tz, next)?;
        let mut offsets = [None; 24];
        for (h, slot) in offsets.iter_mut().enumerate() {
            let at = |m: i8, s: i8| {
                tz.to_ambiguous_timestamp(date.at(h as i8, m, s, 0))
                    .offset()
            };
            if let (
                AmbiguousOffset::Unambiguous { offset: a },
                AmbiguousOffset::Unambiguous { offset: b },
            ) = (at(0, 0), at(59, 59))
                && a == b
            {
                *slot = Some(a.seconds());
            }
        }
        let mut clean_hour = [0u8; 24];
        for (h, slot) in clean_hour.iter_mut().enumerate() {
            // Events never land in a DST gap or fold hour: they move to the next clean one.
            *slot = (0..24)
                .map(|k| ((h + k) % 24) as u8)
                .find(|&c| offsets[c as usize].is_some())
                .unwrap_or(h as u8);
        }
        Ok(DayInfo {
            num,
            wall0: num * SECS_PER_DAY,
            s0,
            s1,
            offsets,
            clean_hour,
        })
    }
}

/// Whose distinct_id an event carries.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Did {
    Missing,
    User(u64),
    Special(u8),
}

/// The random choices of one event, shared by all of its deliveries.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Core {
    pub name: u8,
    pub instant: i64,
    pub export_secs: i64,
    pub ms: u32,
    pub dup: bool,
    pub swapped: bool,
    pub did: Did,
    /// Seed of the $insert_id (another event's index when reused on purpose).
    pub iid: u64,
    /// Seed of the remaining properties.
    pub props: u64,
    pub proc0: i64,
    /// Index of a WEIRD fragment forced into this event, if any.
    pub forced_weird: Option<u8>,
}

/// Which delivery of an event is being written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Version {
    First,
    Retry,
    Late(u32),
    /// A re-delivery sent with its `time` in milliseconds (messy lines).
    InMs,
}

/// One call of `add_late_events`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LateBatch {
    pub batch: u32,
    pub first: u64,
    pub count: u32,
    pub redeliver: Option<u64>,
}

/// Which deliveries a body keeps.
#[derive(Clone, Debug)]
pub(crate) struct Filter {
    pub names: u32,
    pub export_lo: i64,
    pub export_hi: i64,
    pub time_in_ms: bool,
    /// Messy lines as Mixpanel holds them (the ground truth), not as the wire carries them;
    /// lines that hold no usable event are then left out.
    pub truth: bool,
}

impl Filter {
    pub(crate) fn all() -> Filter {
        Filter {
            names: u32::MAX,
            export_lo: i64::MIN,
            export_hi: i64::MAX,
            time_in_ms: false,
            truth: false,
        }
    }
}

/// The malformed lines of real export bodies, one of each per day when messy lines are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Messy {
    /// `time` as a float, `1602611311.123`.
    FloatTime,
    /// `time` as a numeric string, `"1602611311"`.
    StringTime,
    /// `time` in milliseconds.
    MsTime,
    /// A re-delivery of a regular event with `time` in milliseconds (and a later processing time).
    MsDuplicate,
    /// A raw line break inside a string: one event over two lines.
    RawNewline,
    /// A raw `\r\n\r\n` inside a string: one event over three lines, one of them empty.
    CrLf,
    /// Escaped control characters (valid JSON, kept exactly).
    EscapedControls,
    /// Raw control bytes (a tab, 0x01, 0x1f) inside a string.
    RawControls,
    /// An event of about 600 KB split by a raw line break in the middle.
    BigSplit,
    /// No `properties` object (its properties at the top level): rejected.
    NoProperties,
    /// A line that is not JSON: rejected.
    NotJson,
}

/// Every messy kind, in the order their lines appear in a day's body.
pub(crate) const MESSY_KINDS: [Messy; 11] = [
    Messy::FloatTime,
    Messy::NotJson,
    Messy::RawNewline,
    Messy::StringTime,
    Messy::BigSplit,
    Messy::MsTime,
    Messy::NoProperties,
    Messy::CrLf,
    Messy::MsDuplicate,
    Messy::EscapedControls,
    Messy::RawControls,
];

impl Messy {
    fn name(self) -> &'static str {
        match self {
            Messy::FloatTime => "float time",
            Messy::StringTime => "string time",
            Messy::MsTime => "ms time",
            Messy::MsDuplicate => "ms duplicate",
            Messy::RawNewline => "raw newline",
            Messy::CrLf => "raw crlf",
            Messy::EscapedControls => "escaped controls",
            Messy::RawControls => "raw controls",
            Messy::BigSplit => "big split",
            Messy::NoProperties => "no properties",
            Messy::NotJson => "not json",
        }
    }
}

/// One messy line: the event under it, its wire bytes, and what Mixpanel holds (if anything).
pub(crate) struct MessyLine {
    pub core: Core,
    pub wire: Vec<u8>,
    pub truth: Option<Vec<u8>>,
}

/// `hay` with the first `from` replaced by `to`.
fn replace_once(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    match hay.windows(from.len()).position(|w| w == from) {
        Some(i) => [&hay[..i], to, &hay[i + from.len()..]].concat(),
        None => hay.to_vec(),
    }
}

/// Called after each line is appended: gets the buffer and the line's start; false stops.
pub(crate) type Sink<'a> = dyn FnMut(&mut Vec<u8>, usize) -> bool + 'a;

/// The generator of one simulator configuration.
pub(crate) struct Gen {
    pub seed: u64,
    pub mode: TimeMode,
    pub tz: TimeZone,
    pub n: u64,
    pub first: i64,
    pub last: i64,
    /// Each day's body carries the malformed lines of real exports (see [`Messy`]).
    pub messy: bool,
    /// Events carry properties whose column names collide (see `SimConfig::column_collisions`).
    pub collisions: bool,
    users: u64,
    t: &'static Templates,
}

impl Gen {
    pub(crate) fn new(
        seed: u64,
        mode: TimeMode,
        tz: TimeZone,
        n: u64,
        first: i64,
        days: u32,
    ) -> Gen {
        Gen {
            seed,
            mode,
            tz,
            n,
            first,
            last: first + days as i64 - 1,
            messy: false,
            collisions: false,
            users: (n / 4).max(20),
            t: &TEMPLATES,
        }
    }

    /// Bit mask of the known event names among `names` (unknown names match nothing).
    pub(crate) fn name_mask(&self, names: Option<&[String]>) -> u32 {
        match names {
            None => u32::MAX,
            Some(list) => list
                .iter()
                .filter_map(|n| self.t.names.iter().position(|k| k == n))
                .fold(0, |m, i| m | (1 << i)),
        }
    }

    fn is_dup(&self, day: i64, i: u64) -> bool {
        match i {
            5 | 6 => true,
            0..=7 => false,
            _ => mix(hash4(self.seed, S_DUP, day, i)) % 1000 < 30,
        }
    }

    /// Places an event inside its day: (true instant, exported seconds).
    fn place(&self, day: &DayInfo, rng: &mut Rng, forced: Option<bool>) -> (i64, i64) {
        match self.mode {
            TimeMode::Utc => {
                let len = (day.s1 - day.s0).max(1);
                let off = match forced {
                    Some(false) => 0,
                    Some(true) => len - 1,
                    None => rng.below(len as u64) as i64,
                };
                (day.s0 + off, day.s0 + off)
            }
            TimeMode::ProjectLocal => {
                let tod = match forced {
                    Some(false) => 0,
                    Some(true) => SECS_PER_DAY - 1,
                    None => rng.below(SECS_PER_DAY as u64) as i64,
                };
                let h = day.clean_hour[(tod / 3600) as usize] as usize;
                let wall = day.wall0 + h as i64 * 3600 + tod % 3600;
                let off = day.offsets[h].unwrap_or(0) as i64;
                (wall - off, wall)
            }
        }
    }

    fn pick_name(rng: &mut Rng) -> u8 {
        let total: u32 = NAME_WEIGHTS.iter().sum();
        let mut r = rng.below(total as u64) as u32;
        for (i, w) in NAME_WEIGHTS.iter().enumerate() {
            if r < *w {
                return i as u8;
            }
            r -= w;
        }
        0
    }

    fn pick_did(&self, rng: &mut Rng) -> Did {
        if rng.chance(20) {
            Did::Missing
        } else {
            Did::User(rng.below(self.users))
        }
    }

    /// The i-th regular event of a day.
    pub(crate) fn regular(&self, day: &DayInfo, i: u64) -> Core {
        let mut rng = Rng::new(hash4(self.seed, S_EVENT, day.num, i));
        let names = self.t.names.len() as u64;
        let name = if i < names {
            i as u8
        } else {
            Self::pick_name(&mut rng)
        };
        let forced = match i {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        };
        let (instant, export_secs) = self.place(day, &mut rng, forced);
        let ms = rng.below(1000) as u32;
        let did = match i {
            2 => Did::Missing,
            3 => Did::Special(0),
            4 => Did::Special(1),
            _ => self.pick_did(&mut rng),
        };
        let dup = self.is_dup(day.num, i);
        let swapped = match i {
            5 => false,
            6 => true,
            _ => rng.chance(333),
        };
        // A few events reuse another event's $insert_id: the key is the whole tuple.
        let iid = if i == 7 || (i > 8 && rng.chance(3)) {
            i + 1
        } else {
            i
        };
        let props = rng.next_u64();
        let proc0 = instant * 1000 + ms as i64 + 1000 + rng.below(6 * 3_600_000) as i64;
        let forced_weird =
            (i >= 8 && ((i - 8) as usize) < self.t.weird.len()).then(|| (i - 8) as u8);
        Core {
            name,
            instant,
            export_secs,
            ms,
            dup,
            swapped,
            did,
            iid: hash4(self.seed, S_IID, day.num, iid),
            props,
            proc0,
            forced_weird,
        }
    }

    /// The j-th late event of a day (counted over all its batches).
    pub(crate) fn late(&self, day: &DayInfo, j: u64, batch: u32) -> Core {
        let mut rng = Rng::new(hash4(self.seed, S_LATE, day.num, j));
        let name = Self::pick_name(&mut rng);
        let (instant, export_secs) = self.place(day, &mut rng, None);
        let ms = rng.below(1000) as u32;
        let did = self.pick_did(&mut rng);
        let props = rng.next_u64();
        Core {
            name,
            instant,
            export_secs,
            ms,
            dup: false,
            swapped: false,
            did,
            iid: hash4(self.seed, S_LATE ^ S_IID, day.num, j),
            props,
            proc0: late_proc(day, batch, props),
            forced_weird: None,
        }
    }

    /// Which regular event batch `batch` of a day re-delivers.
    pub(crate) fn redeliver_index(&self, day: i64, batch: u32) -> Option<u64> {
        (self.n > 0).then(|| mix(hash4(self.seed, S_REDELIVER, day, batch as u64)) % self.n)
    }

    /// Affine permutation of the regular events of a day, and the delay of second copies.
    fn day_order(&self, day: i64) -> (u64, u64, u64) {
        let n = self.n.max(1);
        let h = hash4(self.seed, S_PERM, day, 0);
        let mut a = (mix(h) % n) | 1;
        while gcd(a, n) != 1 {
            a = (a + 2) % n.max(2);
            a = a.max(1);
        }
        let c = mix(h ^ 1) % n;
        let lag = (1 + mix(h ^ 2) % 40).min(n);
        (a, c, lag)
    }

    fn proc_ms(&self, day: &DayInfo, core: &Core, v: Version) -> i64 {
        match v {
            Version::First => core.proc0,
            Version::Retry => core.proc0 + 1 + (mix(core.props ^ S_RETRY) % 7_200_000) as i64,
            Version::Late(b) => late_proc(day, b, core.props ^ S_RETRY),
            // After the first delivery and its retry.
            Version::InMs => core.proc0 + 7_200_001 + (mix(core.props ^ S_MESSY) % 1000) as i64,
        }
    }

    /// Emits every delivery of one local day that passes `f`; false when the sink stopped.
    pub(crate) fn emit_day(
        &self,
        day: &DayInfo,
        late: &[LateBatch],
        f: &Filter,
        instant_range: Option<(i64, i64)>,
        buf: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> bool {
        let n = self.n;
        let messy: Vec<MessyLine> = if self.messy && n > 0 {
            (0..MESSY_KINDS.len())
                .map(|m| self.messy_line(day, m))
                .collect()
        } else {
            Vec::new()
        };
        let pass = |core: &Core| {
            f.names & (1 << core.name) != 0
                && core.export_secs >= f.export_lo
                && core.export_secs <= f.export_hi
                && instant_range.is_none_or(|(lo, hi)| core.instant >= lo && core.instant < hi)
        };
        let emit = |core: &Core, v: Version, buf: &mut Vec<u8>, sink: &mut Sink<'_>| -> bool {
            if !pass(core) {
                return true;
            }
            let start = buf.len();
            self.write_line(buf, day, core, v, f.time_in_ms);
            sink(buf, start)
        };
        // Messy line m goes after regular delivery (m + 1) * n / (kinds + 1): spread out.
        let mut next_messy = 0usize;
        let mut emit_messy = |upto: u64, buf: &mut Vec<u8>, sink: &mut Sink<'_>| -> bool {
            while let Some(line) = messy.get(next_messy) {
                if (next_messy as u64 + 1) * n / (messy.len() as u64 + 1) > upto {
                    break;
                }
                next_messy += 1;
                if !pass(&line.core) {
                    continue;
                }
                let bytes = if f.truth {
                    line.truth.as_deref()
                } else {
                    Some(&line.wire[..])
                };
                if let Some(bytes) = bytes {
                    let start = buf.len();
                    buf.extend_from_slice(bytes);
                    if !sink(buf, start) {
                        return false;
                    }
                }
            }
            true
        };
        if n > 0 {
            let (a, c, lag) = self.day_order(day.num);
            let perm = |k: u64| (a.wrapping_mul(k).wrapping_add(c)) % n;
            for k in 0..n + lag {
                if !emit_messy(k, buf, sink) {
                    return false;
                }
                if k < n {
                    let core = self.regular(day, perm(k));
                    let v = if core.dup && core.swapped {
                        Version::Retry
                    } else {
                        Version::First
                    };
                    if !emit(&core, v, buf, sink) {
                        return false;
                    }
                }
                if k >= lag {
                    let e = perm(k - lag);
                    if self.is_dup(day.num, e) {
                        let core = self.regular(day, e);
                        let v = if core.swapped {
                            Version::First
                        } else {
                            Version::Retry
                        };
                        if !emit(&core, v, buf, sink) {
                            return false;
                        }
                    }
                }
            }
            if !emit_messy(u64::MAX, buf, sink) {
                return false;
            }
        }
        for b in late {
            if let Some(e) = b.redeliver
                && !emit(&self.regular(day, e), Version::Late(b.batch), buf, sink)
            {
                return false;
            }
            for j in b.first..b.first + b.count as u64 {
                if !emit(&self.late(day, j, b.batch), Version::First, buf, sink) {
                    return false;
                }
            }
        }
        true
    }

    /// The messy line `m` of a day: its underlying event (which `where` and the event filter
    /// see, as Mixpanel filters on what it stored), its bytes on the wire, and the line as
    /// Mixpanel holds it (`None` when no event can be read from the wire: it is rejected).
    pub(crate) fn messy_line(&self, day: &DayInfo, m: usize) -> MessyLine {
        let kind = MESSY_KINDS[m];
        let mut rng = Rng::new(hash4(self.seed, S_MESSY, day.num, m as u64));
        let t = self.t;
        if kind == Messy::MsDuplicate {
            // A re-delivery of a regular event with its time in milliseconds: the same key,
            // processed later, so this version must win.
            let core = self.regular(day, (rng.below(self.n.min(16))) % self.n);
            let mut truth = Vec::new();
            self.write_line(&mut truth, day, &core, Version::InMs, false);
            let mut clean_time = b"\"time\":".to_vec();
            push_i64(&mut clean_time, core.export_secs);
            let mut ms_time = b"\"time\":".to_vec();
            push_i64(&mut ms_time, core.export_secs * 1000 + core.ms as i64);
            let wire = replace_once(&truth, &clean_time, &ms_time);
            return MessyLine {
                core,
                wire,
                truth: Some(truth),
            };
        }
        let name = Self::pick_name(&mut rng);
        let (instant, export_secs) = self.place(day, &mut rng, None);
        let ms = rng.below(1000) as u32;
        let did = self.pick_did(&mut rng);
        let core = Core {
            name,
            instant,
            export_secs,
            ms,
            dup: false,
            swapped: false,
            did,
            iid: hash4(self.seed, S_MESSY ^ S_IID, day.num, m as u64),
            props: rng.next_u64(),
            proc0: instant * 1000 + ms as i64 + 1000 + rng.below(3_600_000) as i64,
            forced_weird: None,
        };
        // `{"event":E,"properties":{"time":T,<ids>,<rest>}}` with T and one value per kind.
        let line = |time: &[u8], extra: &[u8]| {
            let mut b = b"{\"event\":".to_vec();
            b.extend_from_slice(&t.names_json[name as usize]);
            b.extend_from_slice(b",\"properties\":{\"time\":");
            b.extend_from_slice(time);
            self.messy_ids(&mut b, &core, kind);
            b.extend_from_slice(extra);
            b.extend_from_slice(b"}}\n");
            b
        };
        let mut secs = Vec::new();
        push_i64(&mut secs, export_secs);
        let usable = |wire_time: Vec<u8>, wire: &[u8], truth: &[u8]| MessyLine {
            core,
            wire: line(&wire_time, wire),
            truth: Some(line(&secs, truth)),
        };
        match kind {
            Messy::FloatTime => {
                let mut time = secs.clone();
                time.extend_from_slice(format!(".{ms:03}").as_bytes());
                usable(time, b"", b"")
            }
            Messy::StringTime => {
                let mut time = b"\"".to_vec();
                time.extend_from_slice(&secs);
                time.push(b'"');
                usable(time, b"", b"")
            }
            Messy::MsTime => {
                let mut time = Vec::new();
                push_i64(&mut time, export_secs * 1000 + ms as i64);
                usable(time, b"", b"")
            }
            Messy::RawNewline => usable(
                secs.clone(),
                b",\"comment\":\"first line\nsecond line\"",
                b",\"comment\":\"first line\\nsecond line\"",
            ),
            Messy::CrLf => usable(
                secs.clone(),
                b",\"address\":\"221B Baker Street\r\n\r\nLondon\"",
                b",\"address\":\"221B Baker Street\\r\\n\\r\\nLondon\"",
            ),
            Messy::EscapedControls => {
                let v = b",\"controls\":\"bel\\u0007 esc\\u001b nul\\u0000 tab\\t nl\\n\"";
                usable(secs.clone(), v, v)
            }
            Messy::RawControls => usable(
                secs.clone(),
                b",\"pasted\":\"a\tb\x01c\x1fd\"",
                b",\"pasted\":\"a\\tb\\u0001c\\u001fd\"",
            ),
            Messy::BigSplit => {
                // About 600 KB (Mixpanel takes events up to 1 MB), split in the middle: a
                // reader that cuts bodies into blocks of a few hundred KB cuts between them.
                let half: String = (0..40_000u32).map(|i| format!("w{i:05} ")).collect();
                let (wire, truth) = (
                    format!(",\"transcript\":\"{half}\n{half}\""),
                    format!(",\"transcript\":\"{half}\\n{half}\""),
                );
                usable(secs.clone(), wire.as_bytes(), truth.as_bytes())
            }
            Messy::NoProperties => {
                let mut b = b"{\"event\":".to_vec();
                b.extend_from_slice(&t.names_json[name as usize]);
                b.extend_from_slice(b",\"time\":");
                b.extend_from_slice(&secs);
                self.messy_ids(&mut b, &core, kind);
                b.extend_from_slice(b"}\n");
                MessyLine {
                    core,
                    wire: b,
                    truth: None,
                }
            }
            Messy::NotJson => {
                let mut b = b"event=".to_vec();
                b.extend_from_slice(t.names[name as usize].as_bytes());
                b.extend_from_slice(b" time=");
                b.extend_from_slice(&secs);
                b.extend_from_slice(b" (truncated record)\n");
                MessyLine {
                    core,
                    wire: b,
                    truth: None,
                }
            }
            Messy::MsDuplicate => MessyLine {
                core,
                wire: Vec::new(),
                truth: None,
            },
        }
    }

    /// `,"distinct_id":…,"$insert_id":…,"mp_processing_time_ms":…,"messy":"<kind>"`.
    fn messy_ids(&self, b: &mut Vec<u8>, c: &Core, kind: Messy) {
        match c.did {
            Did::Missing => {}
            Did::Special(k) => {
                b.extend_from_slice(b",\"distinct_id\":");
                b.extend_from_slice(&self.t.special_ids[k as usize % self.t.special_ids.len()]);
            }
            Did::User(u) => {
                b.extend_from_slice(b",\"distinct_id\":");
                self.write_user(b, u);
            }
        }
        b.extend_from_slice(b",\"$insert_id\":\"");
        write_insert_id(b, c.iid);
        b.extend_from_slice(b"\",\"mp_processing_time_ms\":");
        push_i64(b, c.proc0);
        b.extend_from_slice(b",\"messy\":\"");
        b.extend_from_slice(kind.name().as_bytes());
        b.push(b'"');
    }

    /// Appends one export line (with its trailing newline).
    pub(crate) fn write_line(
        &self,
        buf: &mut Vec<u8>,
        day: &DayInfo,
        c: &Core,
        v: Version,
        time_in_ms: bool,
    ) {
        let t = self.t;
        let mut r = Rng::new(c.props);
        // Rare layouts: time/distinct_id last, or "properties" before "event".
        let layout = r.below(100);
        let event_last = layout == 0;
        let tail_ids = layout < 6 && !event_last;
        if event_last {
            buf.extend_from_slice(b"{\"properties\":{");
        } else {
            buf.extend_from_slice(b"{\"event\":");
            buf.extend_from_slice(&t.names_json[c.name as usize]);
            buf.extend_from_slice(b",\"properties\":{");
        }
        if !tail_ids {
            self.write_ids(buf, c, time_in_ms);
            buf.push(b',');
        }
        buf.extend_from_slice(b"\"$insert_id\":\"");
        write_insert_id(buf, c.iid);
        buf.extend_from_slice(b"\",\"mp_processing_time_ms\":");
        push_i64(buf, self.proc_ms(day, c, v));
        self.write_props(buf, c, v, &mut r);
        if tail_ids {
            buf.push(b',');
            self.write_ids(buf, c, time_in_ms);
        }
        if event_last {
            buf.extend_from_slice(b"},\"event\":");
            buf.extend_from_slice(&t.names_json[c.name as usize]);
            buf.extend_from_slice(b"}\n");
        } else {
            buf.extend_from_slice(b"}}\n");
        }
    }

    fn write_ids(&self, buf: &mut Vec<u8>, c: &Core, time_in_ms: bool) {
        buf.extend_from_slice(b"\"time\":");
        if time_in_ms {
            push_i64(buf, c.export_secs * 1000 + c.ms as i64);
        } else {
            push_i64(buf, c.export_secs);
        }
        match c.did {
            Did::Missing => {}
            Did::Special(k) => {
                buf.extend_from_slice(b",\"distinct_id\":");
                buf.extend_from_slice(&self.t.special_ids[k as usize % self.t.special_ids.len()]);
            }
            Did::User(u) => {
                buf.extend_from_slice(b",\"distinct_id\":");
                self.write_user(buf, u);
            }
        }
    }

    fn write_user(&self, buf: &mut Vec<u8>, u: u64) {
        let h = hash4(self.seed, S_USER, 0, u);
        match h % 100 {
            0..=54 => {
                buf.push(b'"');
                write_uuid(buf, mix(h), mix(h ^ 1));
                buf.push(b'"');
            }
            55..=79 => {
                buf.extend_from_slice(b"\"user_");
                push_u64(buf, u);
                buf.extend_from_slice(b"@example.com\"");
            }
            80..=91 => {
                buf.extend_from_slice(b"\"$device:");
                write_uuid(buf, mix(h ^ 2), mix(h ^ 3));
                buf.push(b'"');
            }
            92..=96 => {
                buf.push(b'"');
                push_u64(buf, 1_000_000 + u);
                buf.push(b'"');
            }
            _ => buf.extend_from_slice(
                &self.t.special_ids[(mix(h) % self.t.special_ids.len() as u64) as usize],
            ),
        }
    }

    fn write_props(&self, buf: &mut Vec<u8>, c: &Core, v: Version, r: &mut Rng) {
        let t = self.t;
        // Common properties.
        let city = r.below(t.cities.len() as u64 + 1) as usize;
        if city == t.cities.len() {
            buf.extend_from_slice(b",\"$city\":null");
        } else {
            buf.extend_from_slice(b",\"$city\":");
            buf.extend_from_slice(&t.cities[city]);
            buf.extend_from_slice(b",\"mp_country_code\":");
            buf.extend_from_slice(&t.countries[city]);
        }
        let lib = r.below(t.libs.len() as u64) as usize;
        buf.extend_from_slice(b",\"mp_lib\":");
        buf.extend_from_slice(&t.libs[lib]);
        buf.extend_from_slice(b",\"$lib_version\":\"");
        buf.extend_from_slice(t.lib_versions[lib]);
        match v {
            Version::First => {}
            Version::Retry => buf.extend_from_slice(b"-retry"),
            Version::Late(b) => {
                buf.extend_from_slice(b"-late");
                push_u64(buf, b as u64);
            }
            Version::InMs => buf.extend_from_slice(b"-ms"),
        }
        buf.push(b'"');
        buf.extend_from_slice(b",\"$mp_api_endpoint\":");
        buf.extend_from_slice(if r.chance(700) {
            b"\"api.mixpanel.com\""
        } else {
            b"\"api-js.mixpanel.com\""
        });
        let name = t.names[c.name as usize];
        let mobile = name == "App Open";
        buf.extend_from_slice(b",\"$os\":");
        if mobile {
            buf.extend_from_slice(if r.chance(500) {
                b"\"iOS\""
            } else {
                b"\"Android\""
            });
        } else {
            buf.extend_from_slice(&t.oses[r.below(t.oses.len() as u64) as usize]);
            buf.extend_from_slice(b",\"$browser\":");
            buf.extend_from_slice(&t.browsers[r.below(t.browsers.len() as u64) as usize]);
            buf.extend_from_slice(b",\"$current_url\":\"https://www.example.com");
            buf.extend_from_slice(&t.paths[r.below(t.paths.len() as u64) as usize]);
            buf.extend_from_slice(b"?session=");
            push_u64(buf, r.below(100_000));
            buf.push(b'"');
            buf.extend_from_slice(b",\"$screen_width\":");
            push_u64(buf, 320 + r.below(2240));
        }
        // Event specific properties.
        match name {
            "Page Viewed" => {
                buf.extend_from_slice(b",\"page_title\":");
                buf.extend_from_slice(&t.titles[r.below(t.titles.len() as u64) as usize]);
                buf.extend_from_slice(b",\"$referrer\":");
                if r.chance(400) {
                    buf.extend_from_slice(b"\"$direct\"");
                } else {
                    buf.extend_from_slice(b"\"https://www.google.com/search?q=mixpanel+");
                    push_u64(buf, r.below(1000));
                    buf.push(b'"');
                }
                buf.extend_from_slice(b",\"load_time_ms\":");
                push_decimal(buf, 50 + r.below(50_000), 10);
            }
            "$mp_web_page_view" => {
                buf.extend_from_slice(b",\"current_page_title\":");
                buf.extend_from_slice(&t.titles[r.below(t.titles.len() as u64) as usize]);
                buf.extend_from_slice(b",\"current_domain\":\"www.example.com\",\"utm_source\":");
                buf.extend_from_slice(match r.below(3) {
                    0 => b"null".as_slice(),
                    1 => b"\"google\"",
                    _ => b"\"newsletter\"",
                });
            }
            "Signed Up" => {
                buf.extend_from_slice(b",\"plan\":");
                let p = r.below(t.plans.len() as u64 + 1) as usize;
                buf.extend_from_slice(t.plans.get(p).map_or(b"null".as_slice(), |v| v.as_slice()));
                buf.extend_from_slice(b",\"referral_code\":");
                if r.chance(500) {
                    buf.extend_from_slice(b"null");
                } else {
                    buf.extend_from_slice(b"\"REF-");
                    push_u64(buf, r.below(1_000_000));
                    buf.push(b'"');
                }
                buf.extend_from_slice(b",\"marketing_opt_in\":");
                buf.extend_from_slice(if r.chance(500) { b"true" } else { b"false" });
                buf.extend_from_slice(b",\"age\":");
                if r.chance(200) {
                    buf.extend_from_slice(b"null");
                } else {
                    push_u64(buf, 13 + r.below(80));
                }
            }
            "Purchase" => {
                let items = 1 + r.below(3);
                let mut total = 0;
                let mut qty_total = 0;
                buf.extend_from_slice(b",\"items\":[");
                for k in 0..items {
                    if k > 0 {
                        buf.push(b',');
                    }
                    let qty = 1 + r.below(4);
                    let cents = 99 + r.below(20_000);
                    total += qty * cents;
                    qty_total += qty;
                    buf.extend_from_slice(b"{\"sku\":\"SKU-");
                    push_u64(buf, r.below(10_000));
                    buf.extend_from_slice(b"\",\"qty\":");
                    push_u64(buf, qty);
                    buf.extend_from_slice(b",\"price\":");
                    push_decimal(buf, cents, 100);
                    buf.push(b'}');
                }
                buf.extend_from_slice(b"],\"price\":");
                push_decimal(buf, total, 100);
                buf.extend_from_slice(b",\"quantity\":");
                push_u64(buf, qty_total);
                buf.extend_from_slice(b",\"currency\":");
                buf.extend_from_slice(&t.currencies[r.below(t.currencies.len() as u64) as usize]);
                buf.extend_from_slice(b",\"coupon\":");
                buf.extend_from_slice(if r.chance(700) {
                    b"null"
                } else {
                    b"\"SAVE10\""
                });
            }
            "App Open" => {
                buf.extend_from_slice(b",\"$app_version_string\":\"3.");
                push_u64(buf, r.below(20));
                buf.push(b'.');
                push_u64(buf, r.below(10));
                buf.extend_from_slice(b"\",\"$device_id\":\"");
                write_uuid(buf, r.next_u64(), r.next_u64());
                buf.extend_from_slice(b"\",\"offline\":");
                buf.extend_from_slice(if r.chance(100) { b"true" } else { b"false" });
                buf.extend_from_slice(b",\"session_length\":");
                push_decimal(buf, r.below(360_000), 10);
                buf.extend_from_slice(b",\"battery_level\":");
                push_decimal(buf, r.below(101), 100);
            }
            "Button \"Clicked\"" => {
                buf.extend_from_slice(b",\"button_id\":\"buy-now-");
                push_u64(buf, r.below(20));
                buf.extend_from_slice(b"\",\"position\":{\"x\":");
                push_u64(buf, r.below(1920));
                buf.extend_from_slice(b",\"y\":");
                push_i64(buf, r.below(2000) as i64 - 100);
                buf.extend_from_slice(b"},\"is_primary\":");
                buf.extend_from_slice(if r.chance(500) { b"true" } else { b"false" });
            }
            "Logged Out" => {
                buf.extend_from_slice(b",\"reason\":");
                buf.extend_from_slice(if r.chance(500) {
                    b"\"timeout\""
                } else {
                    b"\"user\""
                });
            }
            _ => {
                buf.extend_from_slice(b",\"message\":");
                buf.extend_from_slice(&t.messages[r.below(t.messages.len() as u64) as usize]);
                buf.extend_from_slice(b",\"emoji_count\":");
                push_u64(buf, r.below(12));
            }
        }
        if self.collisions {
            self.write_collisions(buf, c);
        }
        // Adversarial fragments: each once in the first events of a day, then ~8% of events.
        let w = &t.weird;
        if let Some(k) = c.forced_weird {
            buf.push(b',');
            buf.extend_from_slice(&w[k as usize]);
        } else if r.chance(80) {
            let start = r.below(w.len() as u64) as usize;
            for k in 0..1 + r.below(3) as usize {
                buf.push(b',');
                buf.extend_from_slice(&w[(start + k) % w.len()]);
            }
        }
    }
}

impl Gen {
    /// Properties whose column names collide, drawn from the event's own seed (a re-delivery
    /// carries the same): see `SimConfig::column_collisions`.
    fn write_collisions(&self, buf: &mut Vec<u8>, c: &Core) {
        let h = mix(c.props ^ 0xC011_1510);
        if h.is_multiple_of(7) {
            buf.extend_from_slice(b",\"event\":");
            push_u64(buf, h % 1000);
        }
        if h % 5 == 1 {
            let first_day = DayInfo::new(&self.tz, self.first).map_or(i64::MIN, |d| d.s1);
            buf.extend_from_slice(if c.instant < first_day {
                b",\"Country\":\"FR\""
            } else {
                b",\"country\":\"fr\""
            });
        }
        if h % 6 == 2 {
            buf.extend_from_slice(b",\"mp_reserved_city\":\"custom\"");
        }
        if h % 11 == 3 {
            buf.extend_from_slice(b",\"\":1");
        }
        if h % 17 == 5 {
            // A property named as the partition readers add to each row (`date=` folders).
            buf.extend_from_slice(b",\"date\":\"2020-01-01\"");
        }
        if h % 13 == 4 {
            buf.extend_from_slice(b",\"long_key_");
            buf.extend_from_slice("k".repeat(991).as_bytes());
            buf.extend_from_slice(b"\":true");
        }
    }
}

fn late_proc(day: &DayInfo, batch: u32, h: u64) -> i64 {
    // Each batch is processed a day after the previous one: strictly later than all before it.
    day.s1 * 1000 + batch as i64 * MS_PER_DAY + (mix(h ^ batch as u64) % 3_600_000) as i64
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

static HEX: &[u8; 16] = b"0123456789abcdef";
static B62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

pub(crate) fn write_uuid(buf: &mut Vec<u8>, a: u64, b: u64) {
    let mut out = [0u8; 36];
    let mut j = 0;
    for i in 0..32 {
        if matches!(i, 8 | 12 | 16 | 20) {
            out[j] = b'-';
            j += 1;
        }
        let word = if i < 16 { a } else { b };
        out[j] = HEX[((word >> ((i % 16) * 4)) & 15) as usize];
        j += 1;
    }
    buf.extend_from_slice(&out);
}

/// `$insert_id`: at most 36 chars of [A-Za-z0-9-] in the shapes SDKs send.
fn write_insert_id(buf: &mut Vec<u8>, h: u64) {
    let (a, b, c) = (mix(h), mix(h ^ 0xA), mix(h ^ 0xB));
    match h % 10 {
        0..=5 => write_uuid(buf, a, b),
        6..=8 => {
            // Mixpanel JS style: 36 letters and digits.
            let mut out = [0u8; 36];
            for (i, o) in out.iter_mut().enumerate() {
                let w = [a, b, c][i / 12];
                *o = B62[(((w >> ((i % 12) * 5)) & 0x3FF) % 62) as usize];
            }
            buf.extend_from_slice(&out);
        }
        _ => {
            // Short server-side ids with dashes.
            let len = 12 + (c % 13) as usize;
            let mut out = [0u8; 24];
            for (i, o) in out.iter_mut().enumerate().take(len) {
                *o = if i % 6 == 5 {
                    b'-'
                } else {
                    B62[(((a >> (i % 12 * 5)) ^ (b >> i)) % 62) as usize]
                };
            }
            buf.extend_from_slice(&out[..len]);
        }
    }
}

#[inline]
pub(crate) fn push_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&tmp[i..]);
}

#[inline]
pub(crate) fn push_i64(buf: &mut Vec<u8>, n: i64) {
    if n < 0 {
        buf.push(b'-');
    }
    push_u64(buf, n.unsigned_abs());
}

/// Writes v/scale (scale 10 or 100) in the shortest form serde_json would print.
pub(crate) fn push_decimal(buf: &mut Vec<u8>, v: u64, scale: u64) {
    push_u64(buf, v / scale);
    buf.push(b'.');
    let frac = v % scale;
    if scale == 100 && frac >= 10 {
        buf.push(b'0' + (frac / 10) as u8);
        if !frac.is_multiple_of(10) {
            buf.push(b'0' + (frac % 10) as u8);
        }
    } else if scale == 100 && frac > 0 {
        buf.extend_from_slice(&[b'0', b'0' + frac as u8]);
    } else {
        buf.push(b'0' + frac as u8);
    }
}

/// Forces the templates at start-up so the first request does not pay for them.
pub(crate) fn warm() {
    LazyLock::force(&TEMPLATES);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_numbers_round_trip() {
        for n in [-1000, -1, 0, 1, 19_000, 20_000, 25_000, 60_000] {
            let d = date_of(n).unwrap();
            assert_eq!(day_num(d), n);
        }
        assert_eq!(day_num(Date::new(1970, 1, 1).unwrap()), 0);
        assert_eq!(rfc3339(1_602_611_311), "2020-10-13T17:48:31Z");
    }

    #[test]
    fn decimals_match_serde_json() {
        for (v, s) in [
            (1234u64, 100u64),
            (1230, 100),
            (1200, 100),
            (1205, 100),
            (7, 100),
            (0, 100),
            (45, 10),
            (40, 10),
        ] {
            let mut b = Vec::new();
            push_decimal(&mut b, v, s);
            let f: f64 = std::str::from_utf8(&b).unwrap().parse().unwrap();
            assert_eq!(
                serde_json::to_string(&f).unwrap(),
                std::str::from_utf8(&b).unwrap()
            );
        }
    }

    #[test]
    fn insert_ids_are_short_and_safe() {
        for h in 0..2000u64 {
            let mut b = Vec::new();
            write_insert_id(&mut b, mix(h));
            assert!(!b.is_empty() && b.len() <= 36);
            assert!(
                b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-'),
                "{:?}",
                String::from_utf8_lossy(&b)
            );
        }
    }

    #[test]
    fn integers() {
        let mut b = Vec::new();
        push_i64(&mut b, i64::MIN);
        b.push(b' ');
        push_u64(&mut b, u64::MAX);
        b.push(b' ');
        push_i64(&mut b, 0);
        assert_eq!(b, b"-9223372036854775808 18446744073709551615 0");
    }
}
