//! Parsing of the Raw Event Export parameters.

use jiff::civil::Date;

/// The most rows `limit` may ask for, as documented by Mixpanel.
pub(crate) const MAX_LIMIT: u64 = 100_000;

/// A validated export request.
#[derive(Clone, Debug)]
pub(crate) struct ExportParams {
    pub from: Date,
    pub to: Date,
    pub events: Option<Vec<String>>,
    /// Inclusive bounds on the exported `time`, in seconds.
    pub time_lo: i64,
    pub time_hi: i64,
    pub limit: Option<u64>,
    pub time_in_ms: bool,
}

/// Looks up a parameter (the first occurrence wins).
pub(crate) fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Parses a strict `YYYY-MM-DD`.
pub(crate) fn parse_date(s: &str) -> Option<Date> {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b.len() != 10
        || b[4] != b'-'
        || b[7] != b'-'
        || !digits(0..4)
        || !digits(5..7)
        || !digits(8..10)
    {
        return None;
    }
    let y = s[0..4].parse().ok()?;
    let m = s[5..7].parse().ok()?;
    let d = s[8..10].parse().ok()?;
    Date::new(y, m, d).ok()
}

fn required_date(params: &[(String, String)], name: &str) -> Result<Date, String> {
    let v = param(params, name).ok_or_else(|| format!("'{name}' is a required parameter"))?;
    parse_date(v)
        .ok_or_else(|| format!("'{name}' is not a valid date (expected YYYY-MM-DD): {v:?}"))
}

/// Validates everything but the "later than today" rule, which needs the clock.
pub(crate) fn parse_export(params: &[(String, String)]) -> Result<ExportParams, String> {
    let from = required_date(params, "from_date")?;
    let to = required_date(params, "to_date")?;
    if from > to {
        return Err("from_date cannot be later than to_date".into());
    }
    let events = match param(params, "event") {
        None => None,
        Some(v) => {
            let list: Vec<String> = serde_json::from_str(v)
                .map_err(|_| format!("'event' must be a JSON array of event names, got {v:?}"))?;
            if list.is_empty() {
                return Err("'event' must name at least one event (omit it for all events)".into());
            }
            Some(list)
        }
    };
    let (time_lo, time_hi) = match param(params, "where") {
        None => (i64::MIN, i64::MAX),
        Some(w) => parse_where(w)?,
    };
    let limit = match param(params, "limit") {
        None => None,
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Some(n),
            Ok(n) if n > MAX_LIMIT => return Err(format!("'limit' cannot be over {MAX_LIMIT}")),
            _ => return Err(format!("'limit' must be a positive integer, got {v:?}")),
        },
    };
    let time_in_ms = match param(params, "time_in_ms").map(|v| v.trim().to_ascii_lowercase()) {
        None => false,
        Some(v) if v == "true" || v == "1" => true,
        Some(v) if v == "false" || v == "0" || v.is_empty() => false,
        Some(v) => return Err(format!("'time_in_ms' must be true or false, got {v:?}")),
    };
    Ok(ExportParams {
        from,
        to,
        events,
        time_lo,
        time_hi,
        limit,
        time_in_ms,
    })
}

/// Parses `properties["$time"] OP datetime(N)` (or a bare N) terms joined by `and`
/// into inclusive bounds on the exported `time` in seconds.
pub(crate) fn parse_where(s: &str) -> Result<(i64, i64), String> {
    let unsupported = |why: &str| {
        format!(
            "unsupported 'where' expression {s:?}: {why}; the simulator supports only \
             properties[\"$time\"] compared (>=, >, <=, <, ==) with datetime(N) or N, joined by 'and'"
        )
    };
    let mut lo = i64::MIN;
    let mut hi = i64::MAX;
    let mut p = Cursor { s, i: 0 };
    p.ws();
    if p.done() {
        return Ok((lo, hi));
    }
    loop {
        p.ws();
        if !p.eat("properties[") {
            return Err(unsupported("expected properties[\"$time\"]"));
        }
        let quote = if p.eat("\"") {
            "\""
        } else if p.eat("'") {
            "'"
        } else {
            return Err(unsupported("expected a quoted property name"));
        };
        if !p.eat("$time") || !p.eat(quote) || !p.eat("]") {
            return Err(unsupported("only the $time property can be filtered"));
        }
        p.ws();
        let op = ["==", ">=", "<=", ">", "<"]
            .into_iter()
            .find(|op| p.eat(op))
            .ok_or_else(|| unsupported("expected a comparison operator"))?;
        p.ws();
        let n = if p.eat("datetime(") {
            p.ws();
            let n = p
                .int()
                .ok_or_else(|| unsupported("expected epoch seconds in datetime()"))?;
            p.ws();
            if !p.eat(")") {
                return Err(unsupported("expected ')'"));
            }
            n
        } else {
            p.int()
                .ok_or_else(|| unsupported("expected datetime(N) or an integer"))?
        };
        match op {
            ">=" => lo = lo.max(n),
            ">" => lo = lo.max(n.saturating_add(1)),
            "<=" => hi = hi.min(n),
            "<" => hi = hi.min(n.saturating_sub(1)),
            _ => {
                lo = lo.max(n);
                hi = hi.min(n);
            }
        }
        let had_ws = p.ws();
        if p.done() {
            return Ok((lo, hi));
        }
        if !had_ws || !p.eat_ci("and") || !p.ws() {
            return Err(unsupported("terms must be joined by ' and '"));
        }
    }
}

struct Cursor<'a> {
    s: &'a str,
    i: usize,
}

impl Cursor<'_> {
    fn rest(&self) -> &str {
        &self.s[self.i..]
    }
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }
    /// Skips whitespace; true if any was skipped.
    fn ws(&mut self) -> bool {
        let n = self.rest().len() - self.rest().trim_start().len();
        self.i += n;
        n > 0
    }
    fn eat(&mut self, t: &str) -> bool {
        let ok = self.rest().starts_with(t);
        if ok {
            self.i += t.len();
        }
        ok
    }
    fn eat_ci(&mut self, t: &str) -> bool {
        let ok = self
            .rest()
            .get(..t.len())
            .is_some_and(|h| h.eq_ignore_ascii_case(t));
        if ok {
            self.i += t.len();
        }
        ok
    }
    fn int(&mut self) -> Option<i64> {
        let r = self.rest();
        let len = r
            .char_indices()
            .take_while(|&(k, c)| c.is_ascii_digit() || (k == 0 && c == '-'))
            .count();
        let v = r[..len].parse().ok()?;
        self.i += len;
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_forms() {
        assert_eq!(
            parse_where(r#"properties["$time"]>=datetime(100)"#),
            Ok((100, i64::MAX))
        );
        assert_eq!(
            parse_where(
                r#"properties["$time"] >= datetime(100) and properties["$time"] < datetime(200)"#
            ),
            Ok((100, 199))
        );
        assert_eq!(
            parse_where(r#"properties['$time'] > 5 AND properties["$time"] <= 9"#),
            Ok((6, 9))
        );
        assert_eq!(parse_where("  "), Ok((i64::MIN, i64::MAX)));
        assert!(parse_where(r#"properties["$city"] == "x""#).is_err());
        assert!(
            parse_where(r#"properties["$time"] >= datetime(1) or properties["$time"] < 3"#)
                .is_err()
        );
        assert!(
            parse_where(r#"properties["$time"] >= datetime(1)and properties["$time"] < 3"#)
                .is_err()
        );
        assert!(parse_where(r#"properties["$time"] >= datetime("2024-01-01")"#).is_err());
    }

    #[test]
    fn dates() {
        assert!(parse_date("2024-02-29").is_some());
        assert!(parse_date("2023-02-29").is_none());
        assert!(parse_date("2024-2-01").is_none());
        assert!(parse_date("20240201").is_none());
    }
}
