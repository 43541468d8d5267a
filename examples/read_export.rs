//! The least a replicator built on this project's core (tokio + reqwest) can do with an export
//! day: read the body over HTTP, gunzip it, count its lines and discard them. No parsing,
//! transform, deduplication, compression or output.
//!
//! `benches/incumbent.rs` runs it beside the replicator and the incumbent to show the memory and
//! speed floor of that core: `cargo run --release --example read_export -- URL
//! [--current-thread]` (tokio's multi-thread runtime, as the replicator uses, unless
//! `--current-thread`).

use futures_util::StreamExt;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or("usage: read_export URL [--current-thread]")?;
    let runtime = match args.next().as_deref() {
        Some("--current-thread") => tokio::runtime::Builder::new_current_thread(),
        None => tokio::runtime::Builder::new_multi_thread(),
        Some(other) => return Err(format!("unknown argument {other:?}").into()),
    }
    .enable_all()
    .build()?;
    let (lines, bytes) = runtime.block_on(read(&url))?;
    println!("{lines} {bytes}");
    Ok(())
}

/// Reads the body at `url`: its lines and its (gunzipped) bytes.
async fn read(url: &str) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    let client = reqwest::Client::builder().build()?;
    let response = client.get(url).send().await?.error_for_status()?;
    let mut body = response.bytes_stream();
    let (mut lines, mut bytes) = (0u64, 0u64);
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        bytes += chunk.len() as u64;
        lines += memchr::memchr_iter(b'\n', &chunk).count() as u64;
    }
    Ok((lines, bytes))
}
