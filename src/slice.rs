//! The unit of work: a slice of one table (a project-local day, some hours or minutes of one,
//! or a whole snapshot), as the queue, the runners and the output layout name it.

use std::fmt;
use std::str::FromStr;

use jiff::civil::Date;

/// A unit of work of one table: a project-local day, some hours of one, or a whole snapshot.
///
/// Slices order by day, and a day's hour slices sit beside it (by first hour, then the day).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SliceId {
    /// One project-local day.
    Day(Date),
    /// Hours `[from_hour, to_hour)` of one project-local day (a day too big for one invocation).
    Hours {
        /// The day.
        day: Date,
        /// First hour, 0..=23.
        from_hour: u8,
        /// Hour after the last, 1..=24.
        to_hour: u8,
    },
    /// Minutes `[from, to)` of one hour of a project-local day, counted from the day's
    /// midnight: a piece of an hour Mixpanel could not export at once. Its instants are that
    /// share of the hour's real instants (so the pieces of an hour tile it across clock
    /// changes too).
    Minutes {
        /// The day.
        day: Date,
        /// First minute, 0..1440.
        from: u16,
        /// Minute after the last, within the same hour as `from`.
        to: u16,
    },
    /// A whole-table snapshot.
    Full,
}

impl SliceId {
    /// The project-local day of a date slice.
    pub fn day(&self) -> Option<Date> {
        match *self {
            SliceId::Day(d) | SliceId::Hours { day: d, .. } | SliceId::Minutes { day: d, .. } => {
                Some(d)
            }
            SliceId::Full => None,
        }
    }
}

impl SliceId {
    /// The sort key: the day, then the first and last minute (a whole day is minutes 0 to
    /// 1440).
    fn order_key(&self) -> (Option<Date>, u16, u16) {
        match *self {
            SliceId::Day(d) => (Some(d), 0, 1440),
            SliceId::Hours {
                day,
                from_hour,
                to_hour,
            } => (
                Some(day),
                u16::from(from_hour) * 60,
                u16::from(to_hour) * 60,
            ),
            SliceId::Minutes { day, from, to } => (Some(day), from, to),
            SliceId::Full => (None, 0, 0),
        }
    }

    /// The minutes `[from, to)` of its day a date slice covers.
    pub fn minutes(&self) -> Option<(u16, u16)> {
        match self.order_key() {
            (Some(_), from, to) => Some((from, to)),
            (None, ..) => None,
        }
    }
}

impl Ord for SliceId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order_key().cmp(&other.order_key())
    }
}

impl PartialOrd for SliceId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for SliceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SliceId::Day(d) => write!(f, "{d}"),
            SliceId::Hours {
                day,
                from_hour,
                to_hour,
            } => write!(f, "{day}T{from_hour:02}-{to_hour:02}"),
            SliceId::Minutes { day, from, to } => write!(
                f,
                "{day}T{:02}:{:02}-{:02}:{:02}",
                from / 60,
                from % 60,
                to / 60,
                to % 60
            ),
            SliceId::Full => f.write_str("full"),
        }
    }
}

impl FromStr for SliceId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "full" {
            return Ok(SliceId::Full);
        }
        let bad = || format!("not a slice id: {s:?}");
        match s.split_once('T') {
            None => Ok(SliceId::Day(s.parse().map_err(|_| bad())?)),
            Some((d, m)) if m.contains(':') => {
                let (a, b) = m.split_once('-').ok_or_else(bad)?;
                let minute = |t: &str| -> Result<u16, String> {
                    let (h, m) = t.split_once(':').ok_or_else(bad)?;
                    let (h, m): (u16, u16) =
                        (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
                    if m >= 60 {
                        return Err(bad());
                    }
                    Ok(h * 60 + m)
                };
                let (from, to) = (minute(a)?, minute(b)?);
                // A piece lies within one hour.
                if from >= to || to > 1440 || from / 60 != (to - 1) / 60 {
                    return Err(bad());
                }
                Ok(SliceId::Minutes {
                    day: d.parse().map_err(|_| bad())?,
                    from,
                    to,
                })
            }
            Some((d, h)) => {
                let (a, b) = h.split_once('-').ok_or_else(bad)?;
                let (from_hour, to_hour): (u8, u8) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if from_hour >= to_hour || to_hour > 24 {
                    return Err(bad());
                }
                Ok(SliceId::Hours {
                    day: d.parse().map_err(|_| bad())?,
                    from_hour,
                    to_hour,
                })
            }
        }
    }
}

/// The most days [`ReadSizes`] keeps.
const READ_SIZES_KEPT: usize = 64;

/// The raw sizes of export days this process has read and not yet committed, so that another
/// worker can plan a multi-day window from a day still being written (its commit records the
/// size for every later invocation).
#[derive(Debug)]
pub struct ReadSizes {
    /// Day → (raw bytes, milliseconds its body took to read).
    days: std::sync::Mutex<std::collections::BTreeMap<Date, (u64, u64)>>,
    /// Whether a size was noted, or the waiters were let go without one.
    ready: tokio::sync::watch::Sender<bool>,
}

impl Default for ReadSizes {
    fn default() -> Self {
        ReadSizes {
            days: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            ready: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl ReadSizes {
    /// Notes that `day`'s body held `raw_bytes`, read in `ms`; lets the waiters go.
    pub fn note(&self, day: Date, raw_bytes: u64, ms: u64) {
        if let Ok(mut days) = self.days.lock() {
            days.insert(day, (raw_bytes, ms));
            // Only the newest matter (a window is planned from days near it, and a committed
            // day's record holds its own size): a long backfill keeps this small.
            while days.len() > READ_SIZES_KEPT {
                days.pop_first();
            }
        }
        self.open();
    }

    /// Lets the waiters go, with or without a size.
    pub fn open(&self) {
        self.ready.send_replace(true);
    }

    /// Waits until a size is noted or [`ReadSizes::open`] is called.
    pub async fn ready(&self) {
        let mut rx = self.ready.subscribe();
        // The sender lives as long as `self`: the wait ends only on `true`.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// The sizes noted: (day, raw bytes, ms).
    pub fn noted(&self) -> Vec<(Date, u64, u64)> {
        self.days
            .lock()
            .map(|days| days.iter().map(|(d, (b, ms))| (*d, *b, *ms)).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_sizes_keep_the_newest_days_only() {
        let sizes = ReadSizes::default();
        let first = jiff::civil::date(2020, 1, 1);
        let mut d = first;
        for n in 0..100u64 {
            sizes.note(d, n, 1);
            d = d.tomorrow().unwrap();
        }
        let noted = sizes.noted();
        assert_eq!(noted.len(), READ_SIZES_KEPT);
        assert_eq!(noted[0].1, 100 - READ_SIZES_KEPT as u64);
        assert_eq!(noted.last().map(|n| n.1), Some(99));
    }

    #[test]
    fn slice_ids_read_back_as_written_and_pieces_sort_beside_their_hour() {
        let day: Date = "2026-11-01".parse().unwrap();
        let ids = [
            SliceId::Day(day),
            SliceId::Hours {
                day,
                from_hour: 23,
                to_hour: 24,
            },
            SliceId::Minutes {
                day,
                from: 13 * 60 + 15,
                to: 13 * 60 + 30,
            },
            SliceId::Minutes {
                day,
                from: 23 * 60 + 55,
                to: 1440,
            },
            SliceId::Full,
        ];
        for id in ids {
            assert_eq!(id.to_string().parse::<SliceId>(), Ok(id), "{id}");
        }
        assert_eq!(ids[2].to_string(), "2026-11-01T13:15-13:30");
        assert_eq!(ids[3].to_string(), "2026-11-01T23:55-24:00");
        // A piece lies within one hour, and is not empty.
        for bad in [
            "2026-11-01T13:50-14:10",
            "2026-11-01T13:30-13:30",
            "2026-11-01T13:60-14:00",
            "2026-11-01T23:55-24:05",
        ] {
            assert!(bad.parse::<SliceId>().is_err(), "{bad}");
        }
        let hour = SliceId::Hours {
            day,
            from_hour: 13,
            to_hour: 14,
        };
        let quarter = |q: u16| SliceId::Minutes {
            day,
            from: 13 * 60 + q * 15,
            to: 13 * 60 + q * 15 + 15,
        };
        let before = SliceId::Hours {
            day,
            from_hour: 12,
            to_hour: 13,
        };
        let after = SliceId::Hours {
            day,
            from_hour: 14,
            to_hour: 15,
        };
        for q in 0..4 {
            assert!(before < quarter(q) && quarter(q) < after, "{}", quarter(q));
        }
        assert!(quarter(0) < hour && hour < quarter(1));
        assert_eq!(quarter(1).minutes(), Some((795, 810)));
    }
}
