//! The `funnels` table: every funnel's daily results, one row per funnel and day, in the
//! day's partition. One query per funnel per date window.

use std::collections::BTreeMap;

use jiff::civil::Date;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{Error, ErrorKind, Result};
use crate::tables::{Runner, Spec, Table};

/// What the rest of the program knows of the table (its line in [`super::REGISTRY`]).
pub const SPEC: Spec = Spec {
    table: Table::Funnels,
    name: "funnels",
    runner: Runner::Dated,
    fixed_keys: &[],
    glue_columns: &[
        ("funnel_id", "bigint"),
        ("name", "string"),
        ("steps", "string"),
        ("analysis", "string"),
    ],
};

/// The table's columns, every row has them all (`date` also names the partition).
pub fn schema() -> crate::schema::Schema {
    crate::tables::json::fixed_schema(&[
        ("funnel_id", "integer"),
        ("name", "string"),
        ("date", "date"),
        ("steps", "array"),
        ("analysis", "object"),
    ])
}

/// The query API path of the funnel list.
pub const LIST_PATH: &str = "funnels/list";
/// The query API path of one funnel's results.
pub const PATH: &str = "funnels";

/// A funnel as listed.
pub struct Funnel {
    /// Its id.
    pub id: u64,
    /// Its name, raw JSON.
    pub name: String,
}

/// Parses `funnels/list`.
pub fn parse_list(body: &[u8]) -> Result<Vec<Funnel>> {
    #[derive(Deserialize)]
    struct Item<'a> {
        funnel_id: u64,
        #[serde(borrow)]
        name: Option<&'a RawValue>,
    }
    let items: Vec<Item> =
        serde_json::from_slice(body).map_err(|e| bad("funnels/list", body, &e.to_string()))?;
    Ok(items
        .into_iter()
        .map(|i| Funnel {
            id: i.funnel_id,
            name: i
                .name
                .map(|n| n.get().to_string())
                .unwrap_or_else(|| "null".into()),
        })
        .collect())
}

/// The query parameters of one funnel over a window.
pub fn params(funnel_id: u64, from: Date, to: Date) -> Vec<(&'static str, String)> {
    vec![
        ("funnel_id", funnel_id.to_string()),
        ("from_date", from.to_string()),
        ("to_date", to.to_string()),
        ("unit", "day".to_string()),
    ]
}

/// Rows of one funnel's answer, by day: `{"funnel_id", "name", "date", "steps", "analysis"}`.
pub fn rows(funnel: &Funnel, body: &[u8]) -> Result<BTreeMap<Date, Vec<u8>>> {
    #[derive(Deserialize)]
    struct Day<'a> {
        #[serde(borrow)]
        steps: &'a RawValue,
        #[serde(borrow)]
        analysis: &'a RawValue,
    }
    #[derive(Deserialize)]
    struct Answer<'a> {
        #[serde(borrow)]
        data: BTreeMap<String, Day<'a>>,
    }
    let a: Answer =
        serde_json::from_slice(body).map_err(|e| bad("funnels", body, &e.to_string()))?;
    let mut out = BTreeMap::new();
    for (date, day) in a.data {
        let d: Date = date.parse().map_err(|_| {
            bad(
                "funnels",
                body,
                &format!("a day that is not a date: {date:?}"),
            )
        })?;
        let line = format!(
            "{{\"funnel_id\":{},\"name\":{},\"date\":\"{d}\",\"steps\":{},\"analysis\":{}}}\n",
            funnel.id,
            funnel.name,
            day.steps.get(),
            day.analysis.get()
        );
        out.insert(d, line.into_bytes());
    }
    Ok(out)
}

fn bad(path: &str, body: &[u8], why: &str) -> Error {
    let excerpt: String = String::from_utf8_lossy(body).chars().take(120).collect();
    Error::new(
        ErrorKind::BadResponse,
        format!("{path} answered something unusable ({why}): {excerpt:?}"),
    )
}
