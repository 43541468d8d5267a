//! Date-sliced query tables (`funnels`, `revenue`): the oldest pending day and the pending days
//! right after it, up to a window, are claimed together and read with one query per window
//! (per funnel), then each day's partition is written and committed on its own lease.

use std::collections::BTreeMap;
use std::io::Write;

use bytes::Bytes;
use flate2::write::GzEncoder;
use jiff::Timestamp;
use jiff::civil::Date;
use tokio::time::Instant;

use crate::app::App;
use crate::commit::{self, FileEntry};
use crate::config::{Compression, Residency};
use crate::error::{Error, ErrorKind, Result};
use crate::plan;
use crate::replicate::SliceResult;
use crate::sink::part::GZIP_LEVEL;
use crate::state::{Lease, SliceId};
use crate::tables::json::fixed_schema;
use crate::tables::{Table, funnels, revenue};

/// Replicates the window starting at `first` (already claimed); returns the total and the
/// window's description (`from..to`).
pub async fn run(app: &App, first: &Lease, deadline: Instant) -> Result<(SliceResult, String)> {
    let leases = claim_window(app, first).await?;
    let result = replicate(app, &leases, deadline).await;
    if result.is_err() {
        // The first lease is released by the caller; the others here.
        for l in leases.iter().skip(1) {
            let _ = app.store.release(l).await;
        }
    }
    result
}

/// The first lease plus the contiguous pending days after it, up to the window size.
async fn claim_window(app: &App, first: &Lease) -> Result<Vec<Lease>> {
    let mut leases = vec![first.clone()];
    let Some(mut day) = first.slice.day() else {
        return Err(Error::event(format!("{} slices are days", first.table)));
    };
    let now_ms = Timestamp::now().as_millisecond() as u64;
    let slices = app.store.slices(first.table).await?;
    while leases.len() < app.settings.date_window_days as usize {
        let Ok(next) = day.tomorrow() else { break };
        let Some(rec) = slices.iter().find(|r| r.slice == SliceId::Day(next)) else {
            break;
        };
        if !plan::claimable(rec, now_ms) {
            break;
        }
        match app
            .store
            .claim(
                first.table,
                SliceId::Day(next),
                &first.owner,
                now_ms,
                first.expires_ms,
            )
            .await?
        {
            Some(l) => leases.push(l),
            None => break,
        }
        day = next;
    }
    Ok(leases)
}

async fn replicate(
    app: &App,
    leases: &[Lease],
    deadline: Instant,
) -> Result<(SliceResult, String)> {
    let table = leases[0].table;
    let days: Vec<Date> = leases.iter().filter_map(|l| l.slice.day()).collect();
    let (from, to) = (days[0], days[days.len() - 1]);
    let mut rows: BTreeMap<Date, Vec<u8>> = BTreeMap::new();
    let mc = &app.mixpanel;
    match table {
        Table::Funnels => {
            let list = funnels::parse_list(&mc.query(funnels::LIST_PATH, &[], deadline).await?)?;
            for f in &list {
                let body = mc
                    .query(funnels::PATH, &funnels::params(f.id, from, to), deadline)
                    .await?;
                for (d, line) in funnels::rows(f, &body)? {
                    rows.entry(d).or_default().extend_from_slice(&line);
                }
            }
        }
        Table::Revenue => {
            let body = match mc
                .query(revenue::PATH, &revenue::params(from, to), deadline)
                .await
            {
                Err(e) if eu_400(app, &e) => {
                    return Err(Error::new(
                        ErrorKind::PaymentRequired,
                        format!(
                            "Mixpanel's EU servers do not serve engage/revenue (they answer HTTP 400); the revenue table is skipped ({})",
                            e.message()
                        ),
                    ));
                }
                other => other?,
            };
            for (d, line) in revenue::rows(&body)? {
                rows.entry(d).or_default().extend_from_slice(&line);
            }
        }
        other => {
            return Err(Error::event(format!(
                "{other} is not a date-sliced query table"
            )));
        }
    }
    let mut total = SliceResult::default();
    for lease in leases {
        let Some(day) = lease.slice.day() else {
            continue;
        };
        let (folder, partition) = commit::date_partition(&app.prefix, table, lease.slice)?;
        let body = rows.remove(&day).unwrap_or_default();
        let records = body.iter().filter(|b| **b == b'\n').count() as u64;
        let mut files = Vec::new();
        if records > 0 {
            let name = format!(
                "part-{}-00000.{}",
                lease.owner,
                app.settings.compression.extension()
            );
            let data = match app.settings.compression {
                Compression::Gzip => {
                    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::new(GZIP_LEVEL));
                    enc.write_all(&body)?;
                    enc.finish()?
                }
                Compression::None => body,
            };
            let bytes = data.len() as u64;
            app.sink
                .put(
                    &format!("{folder}/{name}"),
                    Bytes::from(data),
                    "application/gzip",
                )
                .await?;
            files.push(FileEntry {
                name,
                records,
                bytes,
            });
        }
        let m = commit::commit(
            app.store.as_ref(),
            app.sink.as_ref(),
            lease,
            &folder,
            &partition,
            files,
            None,
        )
        .await?;
        total.records += m.records;
        total.files += m.files.len() as u64;
        total.bytes += m.files.iter().map(|f| f.bytes).sum::<u64>();
    }
    commit::advance_bookmark(app.store.as_ref(), table, app.settings.start_date).await?;
    let columns = match table {
        Table::Funnels => fixed_schema(&[
            ("funnel_id", "integer"),
            ("name", "string"),
            ("date", "date"),
            ("steps", "array"),
            ("analysis", "object"),
        ]),
        _ => fixed_schema(&[
            ("date", "date"),
            ("amount", "number"),
            ("count", "integer"),
            ("paid_count", "integer"),
        ]),
    };
    let schema = app.store.merge_schema(table, &columns).await?;
    commit::write_schema(app.sink.as_ref(), &app.prefix, table, &schema).await?;
    Ok((
        total,
        if from == to {
            from.to_string()
        } else {
            format!("{from}..{to}")
        },
    ))
}

/// EU projects answer `engage/revenue` with HTTP 400 (often `Timeout Error`, which elsewhere is
/// a passing failure): there it means the endpoint is not served.
fn eu_400(app: &App, e: &Error) -> bool {
    app.settings.residency == Residency::Eu && e.message().contains("HTTP 400")
}
