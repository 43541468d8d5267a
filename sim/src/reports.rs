//! Cohorts, funnels, annotations and revenue: small deterministic JSON documents, built the
//! same way for the HTTP answers and for the ground truth.

use serde_json::{Map, Value, json};

use crate::r#gen::{Rng, civil, hash4};
use crate::profiles::CohortRule;
use crate::templates::TEMPLATES;

const S_FUNNEL: u64 = 0x5EED_0201;
const S_REVENUE: u64 = 0x5EED_0202;
const S_ANNOTATION: u64 = 0x5EED_0203;
const S_COHORT_CREATED: u64 = 0x5EED_0204;

const COHORT_NAMES: [&str; 3] = [
    "Power users",
    "Churn risk — 30 days",
    "Ünïcode cohort 🎉 \"quoted\"",
];
const COHORT_DESCRIPTIONS: [&str; 4] = [
    "Users with more than 10 sessions",
    "",
    "Line one\nline two",
    "Ωμέγα & <b>html</b>",
];
const FUNNEL_NAMES: [&str; 3] = [
    "Signup funnel",
    "Purchase — checkout 🛒",
    "Ünïcode \"funnel\" Ω",
];
const ANNOTATION_TEXTS: [&str; 5] = [
    "Looks good",
    "Deployed v2.3 — new checkout 🚀",
    "Campaign \"Black Friday\"\nsecond line",
    "Ünïcode: Ωμέγα, 東京, café",
    "Outage: 50% of events delayed \\ back",
];

/// `YYYY-MM-DD` of a day number.
pub(crate) fn ymd(day: i64) -> String {
    let (y, m, d) = civil(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD HH:MM:SS`.
fn ymd_hms(day: i64, secs: u64) -> String {
    format!(
        "{} {:02}:{:02}:{:02}",
        ymd(day),
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// `YYYY-MM-DDTHH:MM:SS+HH:MM`: a local time of `tz` with its offset, as the App API writes dates.
fn with_offset(day: i64, secs: u64, tz: &jiff::tz::TimeZone) -> String {
    let (y, m, d) = civil(day);
    let offset: i32 = jiff::civil::DateTime::new(
        y as i16,
        m as i8,
        d as i8,
        (secs / 3600) as i8,
        ((secs / 60) % 60) as i8,
        (secs % 60) as i8,
        0,
    )
    .ok()
    .and_then(|dt| tz.to_ambiguous_zoned_datetime(dt).compatible().ok())
    .map_or(0, |z| z.offset().seconds());
    let sign = if offset < 0 { '-' } else { '+' };
    let abs = offset.unsigned_abs();
    format!(
        "{}T{:02}:{:02}:{:02}{sign}{:02}:{:02}",
        ymd(day),
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        abs / 3600,
        (abs / 60) % 60
    )
}

/// The data of everything but events and profiles.
pub(crate) struct Reports {
    seed: u64,
    project_id: u64,
    first: i64,
    /// Last day with data; `first - 1` when there is none.
    last: i64,
    /// The number of generated profiles (revenue scales with it).
    profiles: u64,
    cohorts: u64,
    funnels: u64,
    annotations: u64,
}

impl Reports {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        seed: u64,
        project_id: u64,
        first: i64,
        days: u32,
        profiles: u64,
        cohorts: u64,
        funnels: u64,
        annotations: u64,
    ) -> Reports {
        Reports {
            seed,
            project_id,
            first,
            last: first + days as i64 - 1,
            profiles,
            cohorts,
            funnels,
            annotations,
        }
    }

    /// Whether `day` has data.
    pub(crate) fn has_day(&self, day: i64) -> bool {
        day >= self.first && day <= self.last
    }

    // ---- cohorts ----

    pub(crate) fn cohort_ids(&self) -> Vec<u64> {
        (0..self.cohorts).map(|k| 1000 + 37 * k).collect()
    }

    /// Position of a cohort id.
    pub(crate) fn cohort_index(&self, id: u64) -> Option<u64> {
        (id >= 1000 && (id - 1000).is_multiple_of(37) && (id - 1000) / 37 < self.cohorts)
            .then(|| (id - 1000) / 37)
    }

    pub(crate) fn cohort_rule(&self, k: u64) -> CohortRule {
        CohortRule::new(self.seed, k, self.cohorts)
    }

    /// The objects of `cohorts/list`; `count` gives a cohort's number of live members.
    pub(crate) fn cohorts(&self, count: impl Fn(&CohortRule) -> u64) -> Vec<Value> {
        (0..self.cohorts)
            .map(|k| {
                let empty = self.cohorts >= 2 && k == self.cohorts - 1;
                let name = if empty {
                    "Empty cohort".to_string()
                } else {
                    COHORT_NAMES
                        .get(k as usize)
                        .map_or_else(|| format!("Cohort {k}"), |s| s.to_string())
                };
                let secs = hash4(self.seed, S_COHORT_CREATED, 0, k) % 86_400;
                json!({
                    "count": count(&self.cohort_rule(k)),
                    "is_visible": if k == 1 { 0 } else { 1 },
                    "description": COHORT_DESCRIPTIONS[k as usize % COHORT_DESCRIPTIONS.len()],
                    "created": ymd_hms(self.first - 30 * (k as i64 + 1), secs),
                    "project_id": self.project_id,
                    "id": 1000 + 37 * k,
                    "name": name,
                    "data_group_id": null,
                })
            })
            .collect()
    }

    // ---- funnels ----

    pub(crate) fn funnel_ids(&self) -> Vec<u64> {
        (0..self.funnels).map(|k| 7509 + 1013 * k).collect()
    }

    pub(crate) fn funnel_index(&self, id: u64) -> Option<u64> {
        (id >= 7509 && (id - 7509).is_multiple_of(1013) && (id - 7509) / 1013 < self.funnels)
            .then(|| (id - 7509) / 1013)
    }

    pub(crate) fn funnel_name(&self, k: u64) -> String {
        FUNNEL_NAMES
            .get(k as usize)
            .map_or_else(|| format!("Funnel {k}"), |s| s.to_string())
    }

    /// `funnels/list`.
    pub(crate) fn funnels_list(&self) -> Value {
        Value::Array(
            (0..self.funnels)
                .map(|k| json!({"funnel_id": 7509 + 1013 * k, "name": self.funnel_name(k)}))
                .collect(),
        )
    }

    /// (event, step label) of each step of funnel `k`.
    fn funnel_steps(&self, k: u64) -> Vec<(&'static str, String)> {
        let names = &TEMPLATES.names;
        let plain = |e: &'static str| (e, e.to_string());
        match k {
            0 => vec![plain("App Open"), plain("Signed Up"), plain("Purchase")],
            1 => vec![
                plain("Page Viewed"),
                plain("Button \"Clicked\""),
                ("Purchase", "Bought 🛍️ (any item)".to_string()),
                plain("Logged Out"),
            ],
            2 => vec![plain("Ünïcode Évent 🎉"), plain("$mp_web_page_view")],
            _ => {
                let h = hash4(self.seed, S_FUNNEL, 0, k);
                (0..2 + k % 3)
                    .map(|s| plain(names[((h >> (s * 8)) % names.len() as u64) as usize]))
                    .collect()
            }
        }
    }

    /// The `data[day]` entry of funnel `k`: `{"steps": [...], "analysis": {...}}`.
    pub(crate) fn funnel_day(&self, k: u64, day: i64) -> Value {
        let mut r = Rng::new(hash4(self.seed, S_FUNNEL, day, k));
        let defs = self.funnel_steps(k);
        // The last funnel has no one entering it on the first day: zeros, not absence.
        let start = if k + 1 == self.funnels && day == self.first {
            0
        } else {
            50 + r.below(5000)
        };
        let mut steps = Vec::with_capacity(defs.len());
        let (mut prev, mut from_start) = (start, 0.0f64);
        let (mut worst, mut worst_ratio) = (1u64, f64::INFINITY);
        for (s, (event, label)) in defs.iter().enumerate() {
            let count = if s == 0 {
                start
            } else {
                prev * (20 + r.below(76)) / 100
            };
            let ratio = |num: u64, den: u64| {
                if den == 0 {
                    json!(0)
                } else if num == den {
                    json!(1)
                } else {
                    json!(num as f64 / den as f64)
                }
            };
            let (avg_time, avg_from_start) = if s == 0 || count == 0 {
                (Value::Null, Value::Null)
            } else {
                let t = (60 + r.below(200_000)) as f64 / 10.0;
                from_start += t;
                (json!(t), json!(from_start))
            };
            let step_ratio = if s == 0 {
                ratio(count, start)
            } else {
                ratio(count, prev)
            };
            if s > 0 {
                let v = step_ratio.as_f64().unwrap_or(0.0);
                if v < worst_ratio {
                    (worst, worst_ratio) = (s as u64, v);
                }
            }
            steps.push(json!({
                "count": count,
                "avg_time": avg_time,
                "avg_time_from_start": avg_from_start,
                "step_conv_ratio": step_ratio,
                "goal": event,
                "overall_conv_ratio": ratio(count, start),
                "event": event,
                "step_label": label,
            }));
            prev = count;
        }
        json!({
            "steps": steps,
            "analysis": {
                "completion": prev,
                "starting_amount": start,
                "steps": defs.len(),
                "worst": worst,
            },
        })
    }

    /// The days of `from..=to` that have data.
    pub(crate) fn days_in(&self, from: i64, to: i64) -> std::ops::RangeInclusive<i64> {
        from.max(self.first)..=to.min(self.last)
    }

    // ---- annotations ----

    /// (id, day, second of the day, description) of every annotation, by date.
    fn annotation_list(&self) -> Vec<(u64, i64, u64, String)> {
        let days = (self.last - self.first + 1).max(1) as u64;
        (0..self.annotations)
            .map(|j| {
                let day = self.first + (j * days / self.annotations.max(1)) as i64;
                let secs = if j == 0 {
                    0
                } else {
                    hash4(self.seed, S_ANNOTATION, day, j) % 86_400 / 60 * 60
                };
                let text = ANNOTATION_TEXTS
                    .get(j as usize)
                    .map_or_else(|| format!("Annotation {j}"), |s| s.to_string());
                (640_999 + 17 * j, day, secs, text)
            })
            .collect()
    }

    /// The objects of `annotations?from_date&to_date` (days inclusive).
    pub(crate) fn annotations(&self, from: i64, to: i64) -> Vec<Value> {
        self.annotation_list()
            .into_iter()
            .filter(|(_, day, _, _)| (from..=to).contains(day))
            .map(|(id, day, secs, description)| {
                json!({"id": id, "project_id": self.project_id, "date": ymd_hms(day, secs), "description": description})
            })
            .collect()
    }

    /// The objects of the App API's annotation list (`date` with the offset of `tz`).
    pub(crate) fn app_annotations(
        &self,
        from: i64,
        to: i64,
        tz: &jiff::tz::TimeZone,
    ) -> Vec<Value> {
        self.annotation_list()
            .into_iter()
            .filter(|(_, day, _, _)| (from..=to).contains(day))
            .map(|(id, day, secs, description)| {
                let date = with_offset(day, secs, tz);
                let tags = if id % 2 == 0 {
                    json!([{"id": 11, "name": "release"}])
                } else {
                    json!([])
                };
                json!({
                    "id": id,
                    "date": date,
                    "description": description,
                    "user": {"id": 4242, "first_name": "Ada", "last_name": "Lovelace 🧮", "email": "ada@example.com"},
                    "tags": tags,
                })
            })
            .collect()
    }

    // ---- revenue ----

    /// (amount in cents, count, paid_count) of a day with data.
    fn revenue_cents(&self, day: i64) -> (u64, u64, u64) {
        let mut r = Rng::new(hash4(self.seed, S_REVENUE, day, 0));
        let count = self.profiles / 3 + r.below(self.profiles / 10 + 1);
        if day == self.first {
            // Nobody paid: amount 0.0.
            return (0, count, 0);
        }
        let paid = r.below(count / 4 + 1);
        let each = if day % 3 == 0 {
            // A whole amount: 120.0.
            100 * (5 + r.below(200))
        } else {
            99 + r.below(20_000)
        };
        (paid * each, count, paid)
    }

    /// `{"amount": .., "count": .., "paid_count": ..}` of a day with data.
    pub(crate) fn revenue_entry(&self, day: i64) -> Value {
        let (cents, count, paid) = self.revenue_cents(day);
        json!({"amount": cents as f64 / 100.0, "count": count, "paid_count": paid})
    }

    /// `results` of `engage/revenue`: `$overall` plus one entry per day with data.
    pub(crate) fn revenue_results(&self, from: i64, to: i64) -> Value {
        let mut results = Map::new();
        let (mut cents, mut count, mut paid) = (0, 0, 0);
        for day in self.days_in(from, to) {
            let (c, n, p) = self.revenue_cents(day);
            (cents, count, paid) = (cents + c, count + n, paid + p);
            results.insert(ymd(day), self.revenue_entry(day));
        }
        results.insert(
            "$overall".into(),
            json!({"amount": cents as f64 / 100.0, "count": count, "paid_count": paid}),
        );
        Value::Object(results)
    }
}
