//! Storage ingest benchmark: chunk upload throughput into a real cluster on loopback with R=1
//! and R=3, printed beside the raw sequential write speed of the same disk, measured in the same
//! run. Run it with:
//!
//! ```sh
//! cargo build --release --workspace && cargo bench -p cairn-integration-tests --bench ingest
//! ```
//!
//! `CAIRN_BENCH_MB` sets the data volume per run (default 1024 MiB).

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use cairn_client::Blob;
use cairn_integration_tests::fixtures::random_bytes;
use cairn_integration_tests::{Spec, TestCluster};
use cairn_proto::ChunkId;
use tokio::sync::Mutex;

const CHUNK: usize = 1 << 20;
const BATCH: usize = 16;
const CLIENTS: usize = 4;

fn raw_disk_mb_s(dir: &std::path::Path, mb: usize) -> f64 {
    let path = dir.join("raw-write-test");
    let block = random_bytes(9, CHUNK);
    let start = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    for _ in 0..mb {
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
    let secs = start.elapsed().as_secs_f64();
    std::fs::remove_file(&path).unwrap();
    mb as f64 / secs
}

async fn ingest(replicas: u32, mb: usize) -> (f64, u64) {
    let c = TestCluster::start(Spec {
        coordinators: 1,
        nodes: 3,
        replicas,
        ..Default::default()
    })
    .await;
    let cluster = cairn_client::Cluster::connect(c.coordinator_addrs.clone())
        .await
        .unwrap();
    // Distinct blobs: a random base with a per-chunk prefix.
    let base = random_bytes(replicas as u64, CHUNK);
    let work: Vec<Blob> = (0..mb as u64)
        .map(|i| {
            let mut b = base.clone();
            b[..8].copy_from_slice(&i.to_le_bytes());
            Blob::new(ChunkId(*blake3::hash(&b[..64]).as_bytes()), Bytes::from(b))
        })
        .collect();
    let queue = Arc::new(Mutex::new(work));
    let start = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (queue, cluster) = (queue.clone(), cluster.clone());
            tokio::spawn(async move {
                loop {
                    let batch: Vec<_> = {
                        let mut q = queue.lock().await;
                        let n = q.len().min(BATCH);
                        q.drain(..n).collect()
                    };
                    if batch.is_empty() {
                        return;
                    }
                    cluster.put(batch).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let mut stored = 0;
    for i in 0..3 {
        stored += c.node_stats(i).await.unwrap().bytes_stored;
    }
    (mb as f64 / secs, stored)
}

fn main() {
    let mb: usize = std::env::var("CAIRN_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let raw = raw_disk_mb_s(tmp.path(), mb);
    let (r1, s1) = rt.block_on(ingest(1, mb));
    let (r3, s3) = rt.block_on(ingest(3, mb));
    let raw_after = raw_disk_mb_s(tmp.path(), mb);
    println!("ingest of {mb} MiB of 1 MiB chunks, {CLIENTS} concurrent clients, batches of {BATCH}, 3 nodes on loopback");
    println!("| measure | MiB/s of client data | bytes written by nodes |");
    println!("|---|---|---|");
    println!(
        "| raw sequential write, same disk (before) | {raw:.0} | {} |",
        mb << 20
    );
    println!("| cluster ingest R=1 | {r1:.0} | {s1} |");
    println!("| cluster ingest R=3 (3 fsynced copies) | {r3:.0} | {s3} |");
    println!(
        "| raw sequential write, same disk (after) | {raw_after:.0} | {} |",
        mb << 20
    );
}
