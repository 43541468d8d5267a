//! What makes `engage` more than a pure function of (seed, index): profiles updated, added and
//! deleted while the simulator runs (a small overlay over the generated ones), the `where`
//! expressions engage filters by, and the result set an engage session holds.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use crate::profiles::{Change, CohortRule, Profiles};

/// The mutations since the simulator started. Empty, every listing is closed-form.
#[derive(Default)]
pub(crate) struct Overlay {
    /// Profiles added after the generated ones: indices `n..n + added`.
    pub added: u64,
    /// Per index: its version and `$last_seen` (every added profile has one).
    pub changes: HashMap<u64, Change>,
    /// Deleted indices. Their changes are kept: a session that listed one still serves it.
    pub deleted: BTreeSet<u64>,
}

impl Overlay {
    /// Indices that exist or existed: `0..n + added`.
    pub(crate) fn universe(&self, n: u64) -> u64 {
        n + self.added
    }

    /// Whether index `i` is a live profile.
    pub(crate) fn is_live(&self, i: u64, n: u64) -> bool {
        i < self.universe(n) && !self.deleted.contains(&i)
    }

    /// Number of live profiles.
    pub(crate) fn live_count(&self, n: u64) -> u64 {
        self.universe(n) - self.deleted.len() as u64
    }

    /// Number of live members of a cohort.
    pub(crate) fn cohort_count(&self, rule: &CohortRule, n: u64) -> u64 {
        let gone = self.deleted.iter().filter(|d| rule.contains(**d)).count();
        rule.count(self.universe(n)) - gone as u64
    }

    /// The live indices of a listing (of one cohort, or of every profile), in listing order.
    pub(crate) fn live(&self, cohort: Option<CohortRule>, n: u64) -> Listing {
        let universe = self.universe(n);
        // Positions of the deleted members in the sequence of members, ascending.
        let skip: Vec<u64> = match cohort {
            None => self.deleted.iter().copied().collect(),
            Some(c) => self
                .deleted
                .iter()
                .filter(|d| c.contains(**d))
                .map(|d| c.count(*d))
                .collect(),
        };
        let members = cohort.map_or(universe, |c| c.count(universe));
        Listing::Rule {
            cohort,
            total: members - skip.len() as u64,
            skip: Arc::new(skip),
        }
    }

    /// The live indices of a listing that match `filter`, in listing order: every index is read
    /// once (a base profile's `$last_seen` without generating the profile).
    pub(crate) fn filtered(
        &self,
        cohort: Option<CohortRule>,
        filter: &Where,
        profiles: &Profiles,
    ) -> Listing {
        let universe = self.universe(profiles.n);
        let matches = |i: u64| {
            if let Some(c) = self.changes.get(&i) {
                return filter.matches(profiles.at(i, Some(c)).property(&filter.property));
            }
            if filter.property == "$last_seen" {
                return profiles
                    .base_last_seen(i)
                    .is_some_and(|s| filter.matches_str(&s));
            }
            filter.matches(profiles.get(i).property(&filter.property))
        };
        let keep = |i: &u64| !self.deleted.contains(i) && matches(*i);
        let set: Vec<u64> = match cohort {
            None => (0..universe).filter(keep).collect(),
            Some(c) => (0..c.count(universe))
                .map(|j| c.nth(j))
                .filter(keep)
                .collect(),
        };
        Listing::Set(Arc::new(set))
    }
}

/// The profiles one listing (one engage session) pages through, fixed by its page 0.
#[derive(Clone, Debug)]
pub(crate) enum Listing {
    /// The members of `cohort` (or every index) but those at the `skip` positions of the member
    /// sequence (ascending): closed-form, O(skip) a profile.
    Rule {
        cohort: Option<CohortRule>,
        total: u64,
        skip: Arc<Vec<u64>>,
    },
    /// An explicit result set.
    Set(Arc<Vec<u64>>),
}

impl Listing {
    /// Number of profiles listed.
    pub(crate) fn total(&self) -> u64 {
        match self {
            Listing::Rule { total, .. } => *total,
            Listing::Set(s) => s.len() as u64,
        }
    }

    /// The index of the `j`-th profile listed (`j < total`).
    pub(crate) fn index(&self, j: u64) -> u64 {
        match self {
            Listing::Rule { cohort, skip, .. } => {
                let mut k = j;
                for s in skip.iter() {
                    if *s > k {
                        break;
                    }
                    k += 1;
                }
                cohort.map_or(k, |c| c.nth(k))
            }
            Listing::Set(s) => s[j as usize],
        }
    }
}

/// An engage session: when it expires, and the listing its page 0 fixed.
pub(crate) struct Session {
    pub expires: Instant,
    pub listing: Option<Listing>,
}

/// A comparison operator of a `where`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Ge,
    Gt,
    Le,
    Lt,
    Eq,
    Ne,
}

impl Op {
    fn holds(self, o: Ordering) -> bool {
        match self {
            Op::Ge => o != Ordering::Less,
            Op::Gt => o == Ordering::Greater,
            Op::Le => o != Ordering::Greater,
            Op::Lt => o == Ordering::Less,
            Op::Eq => o == Ordering::Equal,
            Op::Ne => o != Ordering::Equal,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Literal {
    Str(String),
    Num(f64),
}

/// An engage `where`: `properties["NAME"] OP VALUE`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Where {
    /// The property compared.
    pub property: String,
    op: Op,
    value: Literal,
}

impl Where {
    /// Whether a property's raw JSON value (`None`: the profile has no such property)
    /// matches. A string is compared with a string (byte order, which is how
    /// `YYYY-MM-DDTHH:MM:SS` datetimes order), a number with a number; a value of another type
    /// (null included) never matches, nor does a missing property.
    pub(crate) fn matches(&self, raw: Option<&[u8]>) -> bool {
        let Some(raw) = raw else { return false };
        match &self.value {
            Literal::Str(_) => match serde_json::from_slice::<String>(raw) {
                Ok(s) => self.matches_str(&s),
                Err(_) => false,
            },
            Literal::Num(want) => match serde_json::from_slice::<serde_json::Value>(raw) {
                Ok(serde_json::Value::Number(n)) => n
                    .as_f64()
                    .and_then(|x| x.partial_cmp(want))
                    .is_some_and(|o| self.op.holds(o)),
                _ => false,
            },
        }
    }

    /// Whether a string property value matches.
    pub(crate) fn matches_str(&self, s: &str) -> bool {
        match &self.value {
            Literal::Str(want) => self.op.holds(s.cmp(want.as_str())),
            Literal::Num(_) => false,
        }
    }
}

/// Parses `properties["NAME"] OP VALUE` (OP one of `>=`, `>`, `<=`, `<`, `==`, `!=`; VALUE a
/// double-quoted JSON string or a number; whitespace between tokens free). The error names
/// `where` and the problem.
pub(crate) fn parse_where(s: &str) -> Result<Where, String> {
    let bad = |what: &str| {
        Err(format!(
            "'where' must be properties[\"NAME\"] OP VALUE (OP one of >=, >, <=, <, ==, !=; \
             VALUE a double-quoted string or a number): {what}, got {s:?}"
        ))
    };
    let rest = s.trim_start();
    let Some(rest) = rest.strip_prefix("properties") else {
        return bad("expected properties[\"NAME\"]");
    };
    let Some(rest) = rest.trim_start().strip_prefix('[') else {
        return bad("expected [ after properties");
    };
    let rest = rest.trim_start();
    let Some((property, rest)) = json_string(rest) else {
        return bad("the property name must be a double-quoted string");
    };
    let Some(rest) = rest.trim_start().strip_prefix(']') else {
        return bad("expected ] after the property name");
    };
    let rest = rest.trim_start();
    let ops = [
        (">=", Op::Ge),
        ("<=", Op::Le),
        ("==", Op::Eq),
        ("!=", Op::Ne),
        (">", Op::Gt),
        ("<", Op::Lt),
    ];
    let Some((rest, op)) = ops
        .iter()
        .find_map(|(t, op)| rest.strip_prefix(t).map(|r| (r, *op)))
    else {
        return bad("expected an operator");
    };
    let rest = rest.trim_start();
    let value = if rest.starts_with('"') {
        let Some((v, tail)) = json_string(rest) else {
            return bad("the value is not a valid double-quoted string");
        };
        if !tail.trim().is_empty() {
            return bad("unexpected text after the value");
        }
        Literal::Str(v)
    } else {
        match rest.trim_end().parse::<f64>() {
            Ok(x) if x.is_finite() && !rest.trim_end().is_empty() => Literal::Num(x),
            _ => return bad("the value must be a double-quoted string or a number"),
        }
    };
    Ok(Where {
        property,
        op,
        value,
    })
}

/// A JSON string at the start of `s` (decoded) and what follows it.
fn json_string(s: &str) -> Option<(String, &str)> {
    let b = s.as_bytes();
    if b.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => {
                let v = serde_json::from_str::<String>(&s[..=i]).ok()?;
                return Some((v, &s[i + 1..]));
            }
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_parses_and_compares() {
        let w = parse_where(r#"properties["$last_seen"] >= "2026-12-01T09:00:00""#).unwrap();
        assert_eq!(w.property, "$last_seen");
        assert!(w.matches(Some(br#""2026-12-01T09:00:00""#)));
        assert!(w.matches(Some(br#""2026-12-02T00:00:00""#)));
        assert!(!w.matches(Some(br#""2026-11-30T23:59:59""#)));
        assert!(!w.matches(None));
        assert!(!w.matches(Some(b"null")));
        assert!(!w.matches(Some(b"5")));
        let w = parse_where(r#"properties["login_count"]<12"#).unwrap();
        assert!(w.matches(Some(b"11")) && !w.matches(Some(b"12")) && !w.matches(Some(b"\"1\"")));
        let w = parse_where(r#"  properties [ "a\"b" ] != -1.5  "#).unwrap();
        assert_eq!(w.property, "a\"b");
        assert!(w.matches(Some(b"2")) && !w.matches(Some(b"-1.5")));
        for (s, o) in [("==", "x"), (">", "y"), ("<=", "x")] {
            let w = parse_where(&format!(r#"properties["p"] {s} "x""#)).unwrap();
            assert!(w.matches(Some(format!("\"{o}\"").as_bytes())), "{s}");
        }
        for bad in [
            r#"properties["$last_seen" >= 3"#,
            "foo",
            "",
            r#"properties["x"] >= "#,
            r#"properties["x"] = 3"#,
            r#"properties["x"] >= "open"#,
            r#"properties["x"] >= 3 and 4"#,
            r#"properties["x"] >= "a" "b""#,
            r#"properties["x"] >= nan"#,
        ] {
            let e = parse_where(bad).unwrap_err();
            assert!(e.contains("'where'"), "{bad}: {e}");
        }
    }

    #[test]
    fn listings_skip_deleted_members() {
        let p = Profiles::new(3, 100, 19_000, 19_009);
        let mut o = Overlay {
            added: 10,
            ..Overlay::default()
        };
        o.deleted.extend([0, 5, 6, 50, 109]);
        let all = o.live(None, p.n);
        let want: Vec<u64> = (0..110).filter(|i| !o.deleted.contains(i)).collect();
        assert_eq!(all.total(), want.len() as u64);
        let got: Vec<u64> = (0..all.total()).map(|j| all.index(j)).collect();
        assert_eq!(got, want);
        for k in 0..3 {
            let rule = CohortRule::new(3, k, 4);
            let l = o.live(Some(rule), p.n);
            let want: Vec<u64> = (0..110)
                .filter(|i| rule.contains(*i) && !o.deleted.contains(i))
                .collect();
            assert_eq!(l.total(), o.cohort_count(&rule, p.n));
            let got: Vec<u64> = (0..l.total()).map(|j| l.index(j)).collect();
            assert_eq!(got, want, "cohort {k}");
        }
    }
}
