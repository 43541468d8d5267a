//! What a DuckDB user sees: every table of a replicated folder read by a real DuckDB (the
//! pinned Python package that `scripts/setup-tools` installs; `DUCKDB_PYTHON` names its
//! interpreter), with the row counts of the manifests and no row DuckDB refuses, on data whose
//! property names collide as real projects' do; and the README's DuckDB queries, run as
//! written.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use mixpanel_replicator::app::App;
use mixpanel_replicator::cli::sync;
use support::harness::*;

/// The Python interpreter that has the pinned `duckdb` package.
fn python() -> PathBuf {
    match std::env::var_os("DUCKDB_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "DUCKDB_PYTHON is not set: run the tests with scripts/test (which installs duckdb into \
             .tools/venv and sets DUCKDB_PYTHON)"
        ),
    }
}

/// Runs `script` (Python, with `duckdb` imported) in `dir`; its stdout, or the failure.
fn duckdb(dir: &Path, script: &str) -> Result<String, String> {
    let out = Command::new(python())
        .arg("-c")
        .arg(format!("import duckdb, json, sys\n{script}"))
        .current_dir(dir)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The rows DuckDB reads from `glob`: every column of every row, materialized (a row with a key
/// twice fails), and each row read as one JSON struct (a row with two keys that differ only in
/// case fails).
fn duckdb_rows(dir: &Path, glob: &str) -> Result<u64, String> {
    let script = format!(
        r#"
rows = duckdb.sql("SELECT * FROM read_json('{glob}', union_by_name = true, sample_size = -1)").fetchall()
structs = duckdb.sql("SELECT * FROM read_json('{glob}', records = false, sample_size = -1)").fetchall()
assert len(rows) == len(structs), (len(rows), len(structs))
print(len(rows))
"#
    );
    duckdb(dir, &script).map(|s| s.trim().parse().unwrap())
}

/// The committed rows of each table, from its manifests.
async fn manifest_rows(app: &App, project: &Project) -> Vec<(&'static str, String, u64)> {
    let sim = project.simulator();
    let (first, today) = (sim.config().first_day, today_in(&sim.config().timezone));
    let mut out = Vec::new();
    for table in ["export", "funnels", "revenue"] {
        let mut n = 0;
        for day in days(first, today) {
            let (m, _) = read_partition(&app.sink, &app.prefix, table, day)
                .await
                .unwrap_or_else(|| panic!("{table} {day} was not committed"));
            n += m.records;
        }
        out.push((table, format!("mixpanel-data/{table}/date=*/part-*"), n));
    }
    for table in ["engage", "cohorts", "cohort_members", "annotations"] {
        let (snapshot, rows) = read_latest_snapshot(app, table)
            .await
            .unwrap_or_else(|| panic!("{table} has no snapshot"));
        out.push((
            table,
            format!("mixpanel-data/{table}/{snapshot}/part-*"),
            rows.len() as u64,
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_reads_every_table_with_the_manifests_row_counts_and_the_readme_queries_run() {
    read_by_duckdb("gzip").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_reads_zstd_parts_as_it_reads_gzip_ones() {
    read_by_duckdb("zstd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_reads_uncompressed_parts_as_it_reads_gzip_ones() {
    read_by_duckdb("none").await;
}

async fn read_by_duckdb(compression: &str) {
    let mut cfg = sim_config("America/Los_Angeles", 4, 60);
    cfg.column_collisions = true;
    cfg.profiles = 60;
    let project = Project::start(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let app = project
        .local_app(
            &dir.path().join("mixpanel-data"),
            &[("OUTPUT_COMPRESSION", compression)],
        )
        .await;
    let report = sync(&app, &[]).await.unwrap();
    assert_eq!((report.failed, report.skipped.len()), (0, 0), "{report:?}");
    let extension = match compression {
        "zstd" => ".jsonl.zst",
        "none" => ".jsonl",
        _ => ".jsonl.gz",
    };
    let (m, _) = read_partition(
        &app.sink,
        &app.prefix,
        "export",
        project.simulator().config().first_day,
    )
    .await
    .unwrap();
    assert!(m.files.iter().all(|f| f.name.ends_with(extension)), "{m:?}");

    for (table, glob, expected) in manifest_rows(&app, &project).await {
        assert!(expected > 0, "{table} has no rows to read");
        let read = duckdb_rows(dir.path(), &glob)
            .unwrap_or_else(|e| panic!("DuckDB cannot read {table} ({glob}):\n{e}"));
        assert_eq!(read, expected, "{table}: DuckDB's rows vs the manifests'");
    }

    // What DuckDB refuses, so that the reads above check something: a key twice, and two keys
    // that differ only in case.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("dup.jsonl"), "{\"event\":\"a\",\"event\":124}\n").unwrap();
    std::fs::write(
        bad.join("case.jsonl"),
        "{\"Country\":\"FR\",\"country\":\"fr\"}\n",
    )
    .unwrap();
    for file in ["bad/dup.jsonl", "bad/case.jsonl"] {
        assert!(duckdb_rows(dir.path(), file).is_err(), "DuckDB read {file}");
    }

    // The README's DuckDB queries, as written, from the folder that holds `mixpanel-data`.
    let readme = include_str!("../README.md");
    let section = readme
        .split("### Querying the folder with DuckDB")
        .nth(1)
        .expect("README has a DuckDB section");
    let block = section
        .split("```sql\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sql block");
    let statements: Vec<&str> = block
        .split(';')
        .map(str::trim)
        .filter(|s| {
            s.lines()
                .any(|l| !l.trim().is_empty() && !l.trim().starts_with("--"))
        })
        .collect();
    assert_eq!(statements.len(), 6, "{statements:#?}");
    for statement in statements {
        let script = format!(
            "rows = duckdb.sql({}).fetchall()\nassert rows, 'no rows'\nprint(len(rows))",
            serde_json::to_string(statement).unwrap()
        );
        duckdb(dir.path(), &script)
            .unwrap_or_else(|e| panic!("the README query\n{statement}\nfails:\n{e}"));
    }
    // Its counts are the manifests'.
    let count = |sql: &str| -> u64 {
        duckdb(
            dir.path(),
            &format!(
                "print(duckdb.sql({}).fetchall()[0][0])",
                serde_json::to_string(sql).unwrap()
            ),
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap()
    };
    let engage = count(
        "SELECT count(*) FROM read_json('mixpanel-data/engage/snapshot=*/part-*', hive_partitioning = true, union_by_name = true) \
         WHERE 'snapshot=' || snapshot = (SELECT snapshot FROM read_json('mixpanel-data/engage/_latest.json'))",
    );
    assert_eq!(engage, 60);
}
