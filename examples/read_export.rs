//! The least a replicator built on this project's core (tokio + reqwest) can do with an export
//! day: read the body over HTTP, gunzip it, count its lines and discard them. No parsing,
//! transform, deduplication, compression or output.
//!
//! `benches/incumbent.rs` runs it beside the replicator and the incumbent to show the memory and
//! speed floor of that core: `cargo run --release --example read_export -- URL`.

use futures_util::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .ok_or("usage: read_export URL (an export request's full URL)")?;
    let client = reqwest::Client::builder().build()?;
    let response = client.get(url).send().await?.error_for_status()?;
    let mut body = response.bytes_stream();
    let (mut lines, mut bytes) = (0u64, 0u64);
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        bytes += chunk.len() as u64;
        lines += memchr::memchr_iter(b'\n', &chunk).count() as u64;
    }
    println!("{lines} {bytes}");
    Ok(())
}
