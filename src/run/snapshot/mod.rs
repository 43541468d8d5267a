//! Full-table snapshots (`engage`, `cohort_members`, `cohorts`, `annotations`): written part by
//! part into `snapshot=YYYYMMDDTHHMMSSZ/`, resumable across invocations, and made visible only
//! when complete (manifest, then `_latest.json`). Older snapshots beyond the retention go.
//! After a full listing, `engage` lists only the profiles changed since ([`changed`]).

pub mod changed;
pub mod members;

use std::collections::BTreeMap;

use bytes::Bytes;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::app::App;
use crate::error::{Cause, Error, ErrorKind, Result};
use crate::plan;
use crate::ratelimit::{Family, Share, ShareCap, with_share};
use crate::run::commit::{self, FileEntry, key};
use crate::run::export::SliceResult;
use crate::sink::streaming::StreamingParts;
use crate::state::{Lease, Schema, SliceId, SliceStatus};
use crate::tables::json::{Columns, Types, write_object};
use crate::tables::{Table, annotations, cohort_members, cohorts, engage};

use changed::{Listing, Merged};

/// Where a snapshot stands, saved with the slice so that the next invocation resumes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The snapshot folder name, `snapshot=YYYYMMDDTHHMMSSZ`.
    pub snapshot: String,
    /// Parts finished so far.
    pub files: Vec<FileEntry>,
    /// The next part's index.
    pub next_part: u32,
    /// Where the listing continues.
    pub cursor: Cursor,
    /// Columns seen so far (engage).
    #[serde(default)]
    pub columns: Schema,
    /// The JSON types of the distinct ids written so far (strings, integers).
    #[serde(default)]
    pub ids: Types,
    /// engage: how the profiles are listed (every one, or those changed since the previous
    /// snapshot, merged into it).
    #[serde(default)]
    pub listing: Listing,
    /// engage: when the current listing began, epoch milliseconds (0: unknown).
    #[serde(default)]
    pub listing_started_ms: u64,
    /// cohort_members: each cohort, and the unchanged ones whose members are kept.
    #[serde(default)]
    pub members: Option<members::Reuse>,
}

/// The position in a paged listing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// `cohort_members`: the cohorts to list, fixed when the snapshot starts.
    pub cohorts: Option<Vec<u64>>,
    /// `cohort_members`: the cohort being listed.
    pub cohort_pos: usize,
    /// `cohort_members`: parts finished before this cohort started (kept when it restarts).
    pub files_at_cohort_start: usize,
    /// The listing's session.
    pub session_id: Option<String>,
    /// The next page.
    pub page: u64,
    /// The profiles page 0 of the listing announced (`total`), when it did.
    #[serde(default)]
    pub total: Option<u64>,
    /// Profiles listed so far in this listing.
    #[serde(default)]
    pub listed: u64,
    /// Whether this listing has restarted once already after its session was refused.
    #[serde(default)]
    pub restarted: bool,
}

/// What an invocation did to a snapshot.
pub enum Outcome {
    /// Committed.
    Done(SliceResult),
    /// Progress saved; invoke again.
    Partial(String),
}

/// Pages between durable checkpoints, so a crash loses little.
const CHECKPOINT_PAGES: u64 = 25;

/// Replicates (or resumes) the snapshot of a full table held by `lease`.
pub async fn run(app: &App, lease: &Lease, deadline: Instant) -> Result<Outcome> {
    let table = lease.table;
    let record = app
        .store
        .slices(table)
        .await?
        .into_iter()
        .find(|r| r.slice == SliceId::Full);
    let guard = commit::ShrinkGuard::for_slice(app.settings.shrink_guard_percent, record.as_ref());
    let resumed = record.as_ref().and_then(|r| r.progress.clone());
    let mut progress: Progress = match &resumed {
        Some(p) => serde_json::from_str(p)
            .map_err(|e| Error::state(format!("unreadable {table} snapshot progress: {e}")))?,
        None => {
            let now = app.clock.now();
            let listing = if table == Table::Engage {
                let (listing, why) = changed::choose(app, record.as_ref(), now).await?;
                let kind = match listing {
                    Listing::Full => "every profile",
                    Listing::Changed(_) => "changed profiles",
                };
                tracing::info!(table = %table, listing = kind, why = %why, "a new engage snapshot");
                listing
            } else {
                Listing::Full
            };
            Progress {
                snapshot: new_snapshot_name(app, table).await?,
                listing,
                listing_started_ms: now.as_millisecond() as u64,
                ..Progress::default()
            }
        }
    };
    let folder = key(&app.prefix, &format!("{table}/{}", progress.snapshot));
    // A crash after the manifest was written: the snapshot is complete, finish the commit.
    if resumed.is_some()
        && let Some(body) = app.sink.get(&format!("{folder}/_manifest.json")).await?
    {
        let m: commit::Manifest = serde_json::from_slice(&body).map_err(Error::storage)?;
        return finish(app, lease, &folder, &progress, m.files, guard).await;
    }
    let s = &app.settings;
    // An incremental listing writes the changed profiles as `delta-` parts, which the merge
    // then reads; the snapshot's own parts are `part-`.
    let stem = match &progress.listing {
        Listing::Changed(c) if c.delta.is_none() => "delta",
        _ => "part",
    };
    let mut parts = StreamingParts::new(
        app.sink.clone(),
        folder.clone(),
        stem,
        progress.next_part,
        std::mem::take(&mut progress.files),
        s.compression,
        s.max_file_bytes,
    );
    let result = fill(app, lease, deadline, &mut progress, &mut parts).await;
    match result {
        Ok(None) => {
            parts.checkpoint().await?;
            let files = std::mem::take(&mut parts.uploads.files);
            finish(app, lease, &folder, &progress, files, guard).await
        }
        Ok(Some(why)) => {
            parts.checkpoint().await?;
            progress.files = std::mem::take(&mut parts.uploads.files);
            progress.next_part = parts.next_index();
            save(app, lease, &progress).await?;
            let records: u64 = progress.files.iter().map(|f| f.records).sum();
            Ok(Outcome::Partial(format!(
                "{why} ({records} records in {} parts so far); progress saved, invoke again to resume",
                progress.files.len()
            )))
        }
        Err(e) => {
            parts.abort().await;
            Err(e)
        }
    }
}

/// `snapshot=YYYYMMDDTHHMMSSZ` of now, or of the next free second when a snapshot of this
/// second exists already (two snapshots within one second).
async fn new_snapshot_name(app: &App, table: Table) -> Result<String> {
    let mut ts = app.clock.now();
    loop {
        let name = format!("snapshot={}", ts.strftime("%Y%m%dT%H%M%SZ"));
        if app
            .sink
            .list(&format!(
                "{}/",
                key(&app.prefix, &format!("{table}/{name}"))
            ))
            .await?
            .is_empty()
        {
            return Ok(name);
        }
        ts += jiff::SignedDuration::from_secs(1);
    }
}

async fn save(app: &App, lease: &Lease, progress: &Progress) -> Result<()> {
    let text = serde_json::to_string(progress).map_err(Error::state)?;
    if !app.store.save_progress(lease, Some(&text)).await? {
        return Err(Error::new(
            ErrorKind::State,
            format!(
                "lost the lease on {} while saving progress; another invocation continues",
                lease.table
            ),
        )
        .with_cause(Cause::LeaseLost));
    }
    Ok(())
}

/// Reads the table into `parts`. Returns `None` when complete, or why it stopped first (the
/// deadline, or the table's share of the query budget); the cursor then says where to resume.
async fn fill(
    app: &App,
    lease: &Lease,
    deadline: Instant,
    progress: &mut Progress,
    parts: &mut StreamingParts,
) -> Result<Option<String>> {
    let table = lease.table;
    let mc = &app.mixpanel;
    match table {
        Table::Cohorts => {
            let body = mc.query(cohorts::PATH, &[], deadline).await?;
            let mut columns = as_returned_columns(app, table).await?;
            cohorts::rows(&body, as_returned(parts, &mut columns))?;
            parts.pump().await?;
            merge(&mut progress.columns, columns.schema(&[]));
            Ok(None)
        }
        Table::Annotations => {
            let today =
                crate::tables::export::project_today(&app.settings.timezone, app.clock.now());
            let creds = mc.credentials().await?;
            let body = match creds.project_id() {
                Some(id) => {
                    mc.app_api(
                        &format!("projects/{id}/annotations"),
                        &annotations::app_params(app.settings.start_date, today),
                        deadline,
                    )
                    .await?
                }
                None => {
                    mc.query(
                        "annotations",
                        &annotations::params(app.settings.start_date, today),
                        deadline,
                    )
                    .await?
                }
            };
            let mut columns = as_returned_columns(app, table).await?;
            annotations::rows(&body, as_returned(parts, &mut columns))?;
            parts.pump().await?;
            merge(&mut progress.columns, columns.schema(&[]));
            Ok(None)
        }
        Table::Engage => {
            let stored = app.store.schema(table).await?;
            let known = if app.settings.select_properties_by_default {
                None
            } else {
                match stored.clone() {
                    Some(known) => Some(known),
                    // First discovery: every property Mixpanel knows now is selected.
                    None => {
                        let discovered =
                            crate::run::discovery::discover(app, table, deadline).await?;
                        Some(app.store.init_schema(table, &discovered).await?)
                    }
                }
            };
            // Columns are named as the table's were, and as this snapshot's earlier
            // invocations named them (one writer at a time: the snapshot's lease).
            let fixed = table.fixed_keys();
            let names = stored
                .or_else(|| known.clone())
                .unwrap_or_default()
                .merged(&progress.columns, fixed);
            let mut columns = Columns::new(known.as_ref())
                .named(Some(&names), fixed)
                .reserving(&[table.partition_key()]);
            let mut fair = Fairness::new(table);
            let stopped = list_profiles(
                app,
                lease,
                deadline,
                progress,
                parts,
                &mut columns,
                &mut fair,
            )
            .await?;
            progress.columns = progress.columns.merged(&columns.schema(&[]), fixed);
            // Every invocation's ids count: a later page may bring the first integer.
            progress
                .columns
                .columns
                .insert("distinct_id".into(), progress.ids.name());
            Ok(stopped)
        }
        Table::CohortMembers => {
            let mut fair = Fairness::new(table);
            if progress.cursor.cohorts.is_none() {
                let share = fair.share(app).await?;
                let body = match with_share(share, mc.query(cohorts::PATH, &[], deadline)).await {
                    Ok(b) => b,
                    Err(e) if e.kind() == ErrorKind::Deadline => {
                        return Ok(Some(e.message().to_string()));
                    }
                    Err(e) => return Err(e),
                };
                let mut prints = Vec::new();
                let ids = cohorts::rows(&body, |line| {
                    prints.push(members::fingerprint(line.trim_ascii_end()));
                })?;
                let entries: Vec<(u64, String)> = ids.iter().copied().zip(prints).collect();
                let record = app
                    .store
                    .slices(table)
                    .await?
                    .into_iter()
                    .find(|r| r.slice == SliceId::Full);
                let (reuse, why) =
                    members::plan(app, record.as_ref(), &entries, app.clock.now()).await?;
                tracing::info!(table = %table, why = %why, "a new cohort_members snapshot");
                let kept: std::collections::BTreeSet<u64> = reuse.copied.iter().copied().collect();
                progress.cursor.cohorts =
                    Some(ids.into_iter().filter(|id| !kept.contains(id)).collect());
                progress.members = Some(reuse);
            }
            if let Some(reuse) = progress.members.clone().filter(|r| !r.done) {
                let copied = members::copy(app, deadline, &reuse, parts, &mut progress.ids).await?;
                // Nothing of a copy that did not end is kept.
                parts.checkpoint().await?;
                let give_up = match copied {
                    members::Copied::Rows(rows) => {
                        tracing::info!(table = %table, cohorts = reuse.copied.len(), rows, "members of unchanged cohorts kept");
                        if let Some(m) = progress.members.as_mut() {
                            m.done = true;
                        }
                        None
                    }
                    members::Copied::Deadline if reuse.copies_cut + 1 < members::MAX_CUT_COPIES => {
                        parts.uploads.files.clear();
                        if let Some(m) = progress.members.as_mut() {
                            m.copies_cut += 1;
                        }
                        return Ok(Some(
                            "deadline reached while keeping the unchanged cohorts' members".into(),
                        ));
                    }
                    members::Copied::Deadline => Some(format!(
                        "keeping the unchanged cohorts' members did not fit in an invocation {} times",
                        reuse.copies_cut + 1
                    )),
                    members::Copied::Unusable(why) => {
                        Some(format!("the previous snapshot cannot be built on: {why}"))
                    }
                };
                if let Some(why) = give_up {
                    tracing::warn!(table = %table, why = %why, "listing every cohort's members");
                    parts.uploads.files.clear();
                    if let Some(m) = progress.members.as_mut() {
                        progress.cursor.cohorts = Some(m.list_all(app.clock.now()));
                    }
                }
                progress.cursor.files_at_cohort_start = parts.uploads.files.len();
                save_place(app, lease, progress, parts).await?;
            }
            let ids = progress.cursor.cohorts.clone().unwrap_or_default();
            let mut columns = Columns::new(None);
            let mut stopped = None;
            while progress.cursor.cohort_pos < ids.len() {
                let id = ids[progress.cursor.cohort_pos];
                stopped = page_through(
                    app,
                    lease,
                    deadline,
                    progress,
                    parts,
                    Some(id),
                    None,
                    &mut columns,
                    &mut fair,
                )
                .await?;
                if stopped.is_some() {
                    break;
                }
                // Each cohort ends a part, so a restarted cohort drops only its own parts.
                parts.checkpoint().await?;
                progress.cursor.cohort_pos += 1;
                progress.cursor = Cursor {
                    cohorts: progress.cursor.cohorts.take(),
                    cohort_pos: progress.cursor.cohort_pos,
                    files_at_cohort_start: parts.uploads.files.len(),
                    ..Cursor::default()
                };
            }
            progress.columns = cohort_members::schema(progress.ids);
            Ok(stopped)
        }
        other => Err(Error::event(format!("{other} is not a full table"))),
    }
}

/// The columns of a table written as Mixpanel returns it: each key under its own name, unless
/// that name is taken (case folded) or unusable, named as the table's stored schema names them.
async fn as_returned_columns(app: &App, table: Table) -> Result<Columns> {
    let stored = app.store.schema(table).await?;
    Ok(Columns::new(None)
        .verbatim(stored.as_ref())
        .reserving(&[table.partition_key()]))
}

/// Writes objects as returned (keys renamed only where [`as_returned_columns`] says),
/// discovering their columns.
fn as_returned<'a>(
    parts: &'a mut StreamingParts,
    columns: &'a mut Columns,
) -> impl FnMut(&[u8]) + 'a {
    let mut line_out = Vec::new();
    move |line| {
        line_out.clear();
        write_object(line, columns, &mut line_out);
        parts.write(&line_out);
    }
}

fn merge(into: &mut Schema, more: Schema) {
    for (k, v) in more.columns {
        into.columns.entry(k).or_insert(v);
    }
    for (k, v) in more.renamed {
        into.renamed.entry(k).or_insert(v);
    }
}

/// Lists the profiles of `engage` into `parts`: every one, or (incremental) those changed since
/// the previous snapshot, merged into its rows. An incremental listing that Mixpanel answers
/// with something unusable, or that finds profiles gone, becomes a full listing at once.
/// Returns `None` when complete, or why it stopped first.
async fn list_profiles(
    app: &App,
    lease: &Lease,
    deadline: Instant,
    progress: &mut Progress,
    parts: &mut StreamingParts,
    columns: &mut Columns,
    fair: &mut Fairness,
) -> Result<Option<String>> {
    loop {
        let Listing::Changed(c) = &progress.listing else {
            return page_through(
                app, lease, deadline, progress, parts, None, None, columns, fair,
            )
            .await;
        };
        let c = c.clone();
        // A person's request for a full listing, made since this listing began, wins.
        if changed::full_requested_ms(app, Table::Engage)
            .await?
            .is_some_and(|at| at > progress.listing_started_ms)
        {
            to_full(app, progress, parts, "a full listing was asked for").await?;
            continue;
        }
        let Some(delta) = c.delta.clone() else {
            let filter = engage::changed_since(c.since());
            match page_through(
                app,
                lease,
                deadline,
                progress,
                parts,
                None,
                Some(&filter),
                columns,
                fair,
            )
            .await
            {
                Ok(Some(why)) => return Ok(Some(why)),
                Ok(None) => {
                    parts.checkpoint().await?;
                    let delta = std::mem::take(&mut parts.uploads.files);
                    if let Listing::Changed(c) = &mut progress.listing {
                        c.delta = Some(delta);
                    }
                    *parts = fresh_parts(app, parts, "part");
                    save_place(app, lease, progress, parts).await?;
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::BadResponse => {
                    let why = format!("the listing of changed profiles failed ({e})");
                    to_full(app, progress, parts, &why).await?;
                    continue;
                }
                Err(e) => return Err(e),
            }
        };
        let Some(current) = c.current else {
            let share = fair.share(app).await?;
            let counted = with_share(
                share,
                app.mixpanel
                    .query("engage", &engage::count_params(), deadline),
            )
            .await
            .and_then(|body| changed::count_of(&body));
            match counted {
                Ok(n) => {
                    if let Listing::Changed(c) = &mut progress.listing {
                        c.current = Some(n);
                    }
                    save_place(app, lease, progress, parts).await?;
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Deadline => {
                    return Ok(Some(e.message().to_string()));
                }
                Err(e) if e.kind() == ErrorKind::BadResponse => {
                    let why = format!("the profile count failed ({e})");
                    to_full(app, progress, parts, &why).await?;
                    continue;
                }
                Err(e) => return Err(e),
            }
        };
        let base_folder = key(&app.prefix, &format!("{}/{}", Table::Engage, c.base));
        let folder = parts.folder().to_string();
        let merged = changed::merge(
            app,
            deadline,
            &base_folder,
            &c.base_files,
            &folder,
            &delta,
            parts,
            &mut progress.ids,
        )
        .await?;
        match merged {
            Merged::Deadline => {
                // The merged parts so far are not kept: the merge starts over next time, or,
                // cut short again, every profile is listed (a listing resumes, a merge not).
                parts.checkpoint().await?;
                parts.uploads.files.clear();
                let cut = c.merges_cut + 1;
                if cut >= changed::MAX_CUT_MERGES {
                    let why = format!(
                        "the merge into {} did not fit in an invocation {cut} times",
                        c.base
                    );
                    to_full(app, progress, parts, &why).await?;
                    continue;
                }
                if let Listing::Changed(c) = &mut progress.listing {
                    c.merges_cut = cut;
                }
                return Ok(Some(
                    "deadline reached while merging the changed profiles".into(),
                ));
            }
            Merged::Unusable(why) => {
                let why = format!("the snapshot cannot be built on: {why}");
                to_full(app, progress, parts, &why).await?;
            }
            // More rows than Mixpanel holds profiles: some are gone, list every one.
            Merged::Rows(rows) if rows > current => {
                let why = format!(
                    "{rows} profiles after the merge, but Mixpanel holds {current}: {} gone",
                    rows - current
                );
                to_full(app, progress, parts, &why).await?;
            }
            Merged::Rows(rows) => {
                tracing::info!(
                    table = %Table::Engage,
                    base = %c.base,
                    changed = delta.iter().map(|f| f.records).sum::<u64>(),
                    rows,
                    "changed profiles merged into the previous snapshot"
                );
                return Ok(None);
            }
        }
    }
}

/// Turns the snapshot's listing into a full one, from page 0, dropping what it wrote.
async fn to_full(
    app: &App,
    progress: &mut Progress,
    parts: &mut StreamingParts,
    why: &str,
) -> Result<()> {
    tracing::warn!(table = %Table::Engage, why, "listing every profile instead of the changed ones");
    restart(progress, parts).await?;
    progress.cursor.restarted = false;
    progress.listing = Listing::Full;
    progress.listing_started_ms = app.clock.now_ms();
    *parts = fresh_parts(app, parts, "part");
    Ok(())
}

/// New parts `{stem}-…` in the folder of `parts`, numbered after them.
fn fresh_parts(app: &App, parts: &StreamingParts, stem: &str) -> StreamingParts {
    StreamingParts::new(
        app.sink.clone(),
        parts.folder().to_string(),
        stem,
        parts.next_index(),
        Vec::new(),
        app.settings.compression,
        app.settings.max_file_bytes,
    )
}

/// Pages through `engage` (one cohort's members when `cohort`), writing rows. Returns `None`
/// when the listing is complete, or why it stopped first (the cursor then says where to resume).
///
/// Pages follow while a page holds its answer's `page_size` (Mixpanel may serve fewer profiles
/// a page than asked); a listing that ends short of the `total` page 0 announced fails. A
/// session refused on a later page restarts the listing once; refused again, the slice fails.
#[allow(clippy::too_many_arguments)]
async fn page_through(
    app: &App,
    lease: &Lease,
    deadline: Instant,
    progress: &mut Progress,
    parts: &mut StreamingParts,
    cohort: Option<u64>,
    filter: Option<&str>,
    columns: &mut Columns,
    fair: &mut Fairness,
) -> Result<Option<String>> {
    let listing = match (cohort, filter) {
        (None, None) => "the engage listing".to_string(),
        (None, Some(_)) => "the engage listing of changed profiles".to_string(),
        (Some(id), _) => format!("the cohort_members listing of cohort {id}"),
    };
    let mut out = Vec::with_capacity(1 << 20);
    let mut props = Vec::with_capacity(4096);
    let mut pages = 0u64;
    loop {
        if Instant::now() >= deadline {
            return Ok(Some("deadline reached".into()));
        }
        let page_no = progress.cursor.page;
        let params = engage::page_params(
            progress.cursor.session_id.as_deref(),
            page_no,
            cohort,
            filter,
        );
        let share = fair.share(app).await?;
        let body = match with_share(share, app.mixpanel.query("engage", &params, deadline)).await {
            Ok(b) => b,
            Err(e) if engage::is_expired_session(&e) && progress.cursor.session_id.is_some() => {
                if progress.cursor.restarted {
                    // The next attempt lists afresh from page 0; this one fails, once.
                    restart(progress, parts).await?;
                    progress.cursor.restarted = false;
                    save_place(app, lease, progress, parts).await?;
                    return Err(Error::new(
                        ErrorKind::BadResponse,
                        format!(
                            "{listing}: Mixpanel refused the session again on page {page_no} after the listing had restarted once ({}); the snapshot is not published, and the next attempt lists from page 0",
                            e.message()
                        ),
                    ));
                }
                tracing::warn!(table = %lease.table, cohort, page = page_no, error = %e, "the engage session was refused; restarting the listing once");
                restart(progress, parts).await?;
                progress.cursor.restarted = true;
                continue;
            }
            // Out of time (or of the table's budget) before the page came: save the place.
            Err(e) if e.kind() == ErrorKind::Deadline => return Ok(Some(e.message().to_string())),
            Err(e) => return Err(e),
        };
        let page = engage::parse_page(&body)?;
        if page_no == 0 {
            progress.cursor.total = page.total;
            progress.cursor.listed = 0;
        }
        for profile in &page.results {
            out.clear();
            match cohort {
                None => {
                    engage::profile_row(profile, &mut out, &mut props, columns, &mut progress.ids)?
                }
                Some(id) => cohort_members::member_row(id, profile, &mut out, &mut progress.ids)?,
            }
            parts.write(&out);
        }
        parts.pump().await?;
        progress.cursor.listed += page.results.len() as u64;
        let full = page.is_full();
        progress.cursor.session_id = page
            .session_id
            .clone()
            .or(progress.cursor.session_id.take());
        progress.cursor.page += 1;
        if !full {
            let listed = progress.cursor.listed;
            if let Some(total) = progress.cursor.total
                && listed < total
            {
                let served = page.page_size.unwrap_or(engage::PAGE_SIZE as u64);
                restart(progress, parts).await?;
                save_place(app, lease, progress, parts).await?;
                return Err(Error::new(
                    ErrorKind::BadResponse,
                    format!(
                        "{listing} ended after {listed} of the {total} profiles its page 0 announced (page {page_no} held {} of a page size of {served}); the snapshot is not published, and the next attempt lists from page 0",
                        page.results.len()
                    ),
                ));
            }
            return Ok(None);
        }
        pages += 1;
        if pages.is_multiple_of(CHECKPOINT_PAGES) {
            save_place(app, lease, progress, parts).await?;
        }
    }
}

/// A durable checkpoint: the parts so far are complete and the progress names them.
async fn save_place(
    app: &App,
    lease: &Lease,
    progress: &Progress,
    parts: &mut StreamingParts,
) -> Result<()> {
    parts.checkpoint().await?;
    let mut saved = progress.clone();
    saved.files = parts.uploads.files.clone();
    saved.next_part = parts.next_index();
    save(app, lease, &saved).await
}

/// Drops what the current listing wrote (the whole snapshot, or the current cohort's parts)
/// and starts it again from page 0 with a new session.
async fn restart(progress: &mut Progress, parts: &mut StreamingParts) -> Result<()> {
    parts.checkpoint().await?;
    let keep = if progress.cursor.cohorts.is_some() {
        progress.cursor.files_at_cohort_start
    } else {
        0
    };
    // The dropped parts are not deleted: the saved progress may still name them (if this
    // invocation fails before saving again, the next one resumes from it). The snapshot's
    // commit removes every part its manifest does not list; new parts get new numbers.
    parts
        .uploads
        .files
        .truncate(keep.min(parts.uploads.files.len()));
    progress.cursor.session_id = None;
    progress.cursor.page = 0;
    progress.cursor.total = None;
    progress.cursor.listed = 0;
    Ok(())
}

/// How long a paging table's view of the other tables' pending work is trusted.
const FAIRNESS_RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// The query tables that are not paging tables.
const ONE_SHOT_QUERY_TABLES: [Table; 4] = [
    Table::Funnels,
    Table::Revenue,
    Table::Cohorts,
    Table::Annotations,
];

/// A paging table's (engage, cohort_members) share of the query budget: at most half of the
/// window while other query tables have work pending, so that a long listing never starves
/// them; all of it otherwise. Its grants are tagged in the shared ledger, so the share holds
/// across invocations.
struct Fairness {
    table: Table,
    share: Option<(Instant, Share)>,
}

impl Fairness {
    fn new(table: Table) -> Self {
        Fairness { table, share: None }
    }

    /// The share to count the next request against (the pending work is re-read now and then).
    async fn share(&mut self, app: &App) -> Result<Share> {
        // Below half of the window no cap can bind: the other tables' pending work (several
        // reads of the state store) need not be looked at, and the widest cap is kept so that
        // the ledger's conditional write still decides at the boundary.
        let widest = ShareCap {
            tags: vec![Table::Engage.as_str(), Table::CohortMembers.as_str()],
            max: half_window(app),
        };
        let used = crate::ratelimit::share_used(
            app.store.as_ref(),
            app.clock.as_ref(),
            Family::Query,
            &widest.tags,
            app.settings.rate_window,
        )
        .await?;
        if used < widest.max as usize {
            return Ok(Share {
                tag: self.table.as_str(),
                cap: Some(widest),
            });
        }
        if let Some((at, share)) = &self.share
            && at.elapsed() < FAIRNESS_RECHECK
        {
            return Ok(share.clone());
        }
        let share = fair_share(app, self.table).await?;
        self.share = Some((Instant::now(), share.clone()));
        Ok(share)
    }
}

/// The share of `table` (a paging table) given the other tables' pending work. When a table
/// that is not a paging table waits, both paging tables together take at most half; when only
/// the other paging table waits, each takes at most half.
async fn fair_share(app: &App, table: Table) -> Result<Share> {
    let now = app.clock.now();
    let other_paging = if table == Table::Engage {
        Table::CohortMembers
    } else {
        Table::Engage
    };
    let mut tags = None;
    for t in ONE_SHOT_QUERY_TABLES {
        if has_pending_work(app, t, now).await? {
            tags = Some(vec![Table::Engage.as_str(), Table::CohortMembers.as_str()]);
            break;
        }
    }
    if tags.is_none() && has_pending_work(app, other_paging, now).await? {
        tags = Some(vec![table.as_str()]);
    }
    Ok(Share {
        tag: table.as_str(),
        cap: tags.map(|tags| ShareCap {
            tags,
            max: half_window(app),
        }),
    })
}

/// Half of the query window's requests (at least one).
fn half_window(app: &App) -> u32 {
    (app.settings.query_requests_per_window / 2).max(1)
}

/// Whether `table` has work waiting for the query budget: a slice being replicated or
/// claimable, or one planning would queue now. A table never planned (its schedule may well be
/// disabled) has none: it would otherwise halve the paging tables' budget for good.
async fn has_pending_work(app: &App, table: Table, now: Timestamp) -> Result<bool> {
    let slices = app.store.slices(table).await?;
    if slices.is_empty() {
        return Ok(false);
    }
    let now_ms = now.as_millisecond() as u64;
    if slices
        .iter()
        .any(|r| r.status == SliceStatus::Leased && !plan::claimable(r, now_ms))
    {
        return Ok(true);
    }
    // A table the plan does not allow has nothing to do; parked slices wait for a person and
    // slices backing off after a failure for their time: none of them is work for this hour.
    if crate::skip::remembered(app, table).await?.is_some() {
        return Ok(false);
    }
    Ok(plan::preview(app.store.as_ref(), &app.settings, table, now)
        .await?
        .iter()
        .any(|r| {
            r.status != SliceStatus::Failed
                && (r.status != SliceStatus::Pending || plan::claimable(r, now_ms))
        }))
}

/// Commits a complete snapshot: fencing check, manifest, stray parts removed, `_latest.json`,
/// old snapshots removed, slice completed, schema.
async fn finish(
    app: &App,
    lease: &Lease,
    folder: &str,
    progress: &Progress,
    files: Vec<FileEntry>,
    guard: commit::ShrinkGuard,
) -> Result<Outcome> {
    let table = lease.table;
    let snapshot = progress.snapshot.as_str();
    let columns = &progress.columns;
    // The slice is marked committed only once `_latest.json` points to the snapshot: a crash in
    // between leaves it leased, and the next invocation finds the manifest and publishes it.
    let manifest = commit::write_manifest(
        app.store.as_ref(),
        app.sink.as_ref(),
        app.clock.as_ref(),
        lease,
        folder,
        snapshot,
        files,
        guard,
    )
    .await?;
    let latest = serde_json::json!({
        "snapshot": snapshot,
        "manifest": format!("{folder}/_manifest.json"),
        "committed_at": manifest.committed_at,
    });
    app.sink
        .put(
            &key(&app.prefix, &format!("{table}/_latest.json")),
            Bytes::from(serde_json::to_vec_pretty(&latest).map_err(Error::storage)?),
            "application/json",
        )
        .await?;
    commit::write_symlink(app.sink.as_ref(), folder, Some("latest"), &manifest.files).await?;
    // Only engage's columns are subject to MIXPANEL_SELECT_PROPERTIES_BY_DEFAULT.
    let schema = if table == Table::Engage && !app.settings.select_properties_by_default {
        app.store.init_schema(table, columns).await?
    } else {
        app.store.merge_schema(table, columns).await?
    };
    commit::publish_schema(app, table, &schema).await?;
    // Abandoned and old snapshots go before the completion: a failure or a crash before it
    // leaves the slice to an invocation that prunes again.
    prune(app, table, snapshot).await?;
    let result = committed(table, progress)?;
    commit::complete(
        app.store.as_ref(),
        app.clock.as_ref(),
        lease,
        result.as_deref(),
    )
    .await?;
    Ok(Outcome::Done(SliceResult {
        records: manifest.records,
        bytes: manifest.files.iter().map(|f| f.bytes).sum(),
        files: manifest.files.len() as u64,
        ..SliceResult::default()
    }))
}

/// What an engage or cohort_members commit records for the next snapshot to build on (nothing
/// for the other tables).
fn committed(table: Table, progress: &Progress) -> Result<Option<String>> {
    if table == Table::CohortMembers
        && let Some(reuse) = &progress.members
    {
        return serde_json::to_string(&members::Committed {
            snapshot: progress.snapshot.clone(),
            cohorts: reuse.cohorts.clone(),
            started_ms: progress.listing_started_ms,
        })
        .map(Some)
        .map_err(Error::state);
    }
    if table != Table::Engage {
        return Ok(None);
    }
    let (listing, last_full_ms) = match &progress.listing {
        Listing::Full => (
            "full",
            match progress.listing_started_ms {
                // A listing resumed from an older release: its snapshot began it.
                0 => changed::snapshot_start(&progress.snapshot)
                    .map_or(0, |t| t.as_millisecond() as u64),
                ms => ms,
            },
        ),
        Listing::Changed(c) => ("changed", c.last_full_ms),
    };
    serde_json::to_string(&changed::Committed {
        snapshot: progress.snapshot.clone(),
        listing: listing.into(),
        last_full_ms,
        started_ms: progress.listing_started_ms,
    })
    .map(Some)
    .map_err(Error::state)
}

/// Keeps the newest `SNAPSHOT_RETENTION` complete snapshots; removes older ones and abandoned
/// (never committed) ones.
async fn prune(app: &App, table: Table, current: &str) -> Result<()> {
    let base = key(&app.prefix, &format!("{table}/"));
    let objects = app.sink.list(&base).await?;
    let mut folders: BTreeMap<String, (bool, Vec<String>)> = BTreeMap::new();
    for o in objects {
        let rest = &o.key[base.len()..];
        let Some((folder, name)) = rest.split_once('/') else {
            continue;
        };
        if !folder.starts_with("snapshot=") {
            continue;
        }
        let entry = folders.entry(folder.to_string()).or_default();
        entry.0 |= name == "_manifest.json";
        entry.1.push(o.key.clone());
    }
    let mut complete: Vec<&String> = folders
        .iter()
        .filter(|(f, (m, _))| *m && f.as_str() != current)
        .map(|(f, _)| f)
        .collect();
    complete.sort();
    complete.reverse();
    let keep = app.settings.snapshot_retention.saturating_sub(1) as usize;
    let mut doomed: Vec<String> = Vec::new();
    for f in complete.into_iter().skip(keep) {
        doomed.extend(folders[f].1.iter().cloned());
    }
    for (f, (has_manifest, keys)) in &folders {
        if !has_manifest && f.as_str() != current {
            doomed.extend(keys.iter().cloned());
        }
    }
    if !doomed.is_empty() {
        app.sink.delete(&doomed).await?;
    }
    Ok(())
}
