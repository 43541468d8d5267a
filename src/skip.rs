//! Tables the Mixpanel plan does not allow (HTTP 402, EU `engage/revenue`), remembered for
//! `MIXPANEL_SKIP_RECHECK_HOURS` so that every run does not spend requests finding it out again.

use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::error::Result;
use crate::tables::Table;

/// What the state store keeps of a skipped table.
#[derive(Debug, Serialize, Deserialize)]
struct Skipped {
    /// Until when the table is answered `skipped` without a request, epoch milliseconds.
    until_ms: u64,
    /// Mixpanel's answer.
    reason: String,
}

fn document(table: Table) -> String {
    format!("skipped#{table}")
}

/// Why `table` is still known to be skipped, or `None` when it is to be asked again.
pub async fn remembered(app: &App, table: Table) -> Result<Option<String>> {
    let Some((body, _)) = app.store.document(&document(table)).await? else {
        return Ok(None);
    };
    let now = app.clock.now_ms();
    Ok(serde_json::from_str::<Skipped>(&body)
        .ok()
        .filter(|s| s.until_ms > now)
        .map(|s| s.reason))
}

/// Remembers that Mixpanel does not allow `table` (its answer: `reason`).
pub async fn remember(app: &App, table: Table, reason: &str) -> Result<()> {
    let recheck = app.settings.skip_recheck;
    if recheck.is_zero() {
        return Ok(());
    }
    let name = document(table);
    let until_ms = app.clock.now_ms() + recheck.as_millis() as u64;
    let body = serde_json::to_string(&Skipped {
        until_ms,
        reason: reason.to_string(),
    })
    .unwrap_or_default();
    // Last writer wins: every writer says the same thing.
    let version = app.store.document(&name).await?.map(|(_, v)| v);
    if !app.store.put_document(&name, &body, version).await? {
        tracing::debug!(table = %table, "another invocation remembered the skip first");
    }
    Ok(())
}

/// Forgets a remembered skip (a person's retry, or a plan that now allows the table).
pub async fn forget(app: &App, table: Table) -> Result<()> {
    let name = document(table);
    if let Some((_, version)) = app.store.document(&name).await? {
        let body = serde_json::to_string(&Skipped {
            until_ms: 0,
            reason: String::new(),
        })
        .unwrap_or_default();
        app.store.put_document(&name, &body, Some(version)).await?;
    }
    Ok(())
}
