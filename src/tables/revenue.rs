//! The `revenue` table: revenue by day (`engage/revenue`), one row per day; the `$overall`
//! entry is not a row.

use std::collections::BTreeMap;

use jiff::civil::Date;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{Error, ErrorKind, Result};
use crate::tables::{Runner, Spec, Table};

/// What the rest of the program knows of the table (its line in [`super::REGISTRY`]).
pub const SPEC: Spec = Spec {
    table: Table::Revenue,
    name: "revenue",
    runner: Runner::Dated,
    fixed_keys: &[],
    glue_columns: &[
        ("amount", "double"),
        ("count", "bigint"),
        ("paid_count", "bigint"),
    ],
};

/// The table's columns, every row has them all (`date` also names the partition).
pub fn schema() -> crate::schema::Schema {
    crate::tables::json::fixed_schema(&[
        ("date", "date"),
        ("amount", "number"),
        ("count", "integer"),
        ("paid_count", "integer"),
    ])
}

/// The query API path.
pub const PATH: &str = "engage/revenue";

/// The query parameters over a window.
pub fn params(from: Date, to: Date) -> Vec<(&'static str, String)> {
    vec![
        ("from_date", from.to_string()),
        ("to_date", to.to_string()),
        ("unit", "day".to_string()),
    ]
}

/// Rows by day: `{"date", "amount", "count", "paid_count"}`.
pub fn rows(body: &[u8]) -> Result<BTreeMap<Date, Vec<u8>>> {
    #[derive(Deserialize)]
    struct Day<'a> {
        #[serde(borrow)]
        amount: Option<&'a RawValue>,
        #[serde(borrow)]
        count: Option<&'a RawValue>,
        #[serde(borrow)]
        paid_count: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Answer<'a> {
        #[serde(borrow)]
        results: BTreeMap<String, Day<'a>>,
    }
    let a: Answer = serde_json::from_slice(body).map_err(|e| bad(body, &e.to_string()))?;
    let raw = |v: Option<&RawValue>| {
        v.map(|r| r.get().to_string())
            .unwrap_or_else(|| "null".into())
    };
    let mut out = BTreeMap::new();
    for (key, day) in a.results {
        if key == "$overall" {
            continue;
        }
        let d: Date = key
            .parse()
            .map_err(|_| bad(body, &format!("a day that is not a date: {key:?}")))?;
        let line = format!(
            "{{\"date\":\"{d}\",\"amount\":{},\"count\":{},\"paid_count\":{}}}\n",
            raw(day.amount),
            raw(day.count),
            raw(day.paid_count)
        );
        out.insert(d, line.into_bytes());
    }
    Ok(out)
}

fn bad(body: &[u8], why: &str) -> Error {
    let excerpt: String = String::from_utf8_lossy(body).chars().take(120).collect();
    Error::new(
        ErrorKind::BadResponse,
        format!("engage/revenue answered something unusable ({why}): {excerpt:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overall_is_not_a_row() {
        let r = rows(br#"{"status":"ok","results":{"$overall":{"amount":1.5,"count":2,"paid_count":1},"2021-06-01":{"amount":0.0,"count":124,"paid_count":0}}}"#).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(
            String::from_utf8(r[&"2021-06-01".parse::<Date>().unwrap()].clone()).unwrap(),
            "{\"date\":\"2021-06-01\",\"amount\":0.0,\"count\":124,\"paid_count\":0}\n"
        );
    }
}
