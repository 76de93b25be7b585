//! Micro-benchmark of the storage node's ingest path without the network: verification of a
//! received blob (blake3) and durable group-committed writes into the chunk store (segment
//! append, one fsync per group, fjall index). Run: `cargo bench -p cairn-storage-node --bench store_ingest`.

use bytes::Bytes;
use cairn_proto::ChunkId;
use cairn_storage_node::chunkstore::{ChunkStore, PutItem};
use cairn_storage_node::replication::validate;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn stages(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let blob = Bytes::from(
        (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    );
    let hash = cairn_proto::blob_hash(&blob);
    let mut g = c.benchmark_group("storage ingest");
    g.throughput(Throughput::Bytes(blob.len() as u64));
    g.bench_function("verify 1 MiB blob (blake3)", |b| {
        b.iter(|| validate(&[1; 32], &blob, &hash).unwrap())
    });
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let mut n: u64 = 0;
    g.throughput(Throughput::Bytes(16 * blob.len() as u64));
    g.sample_size(10);
    g.bench_function("put 16 x 1 MiB, 8 concurrent writers (group commit)", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut tasks = Vec::new();
                for _ in 0..8 {
                    let items: Vec<PutItem> = (0..2)
                        .map(|_| {
                            n += 1;
                            let mut id = [0u8; 32];
                            id[..8].copy_from_slice(&n.to_be_bytes());
                            PutItem {
                                id: ChunkId(id),
                                hash,
                                blob: blob.clone(),
                            }
                        })
                        .collect();
                    let s = store.clone();
                    tasks.push(tokio::spawn(async move { s.put(items).await.unwrap() }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            })
        })
    });
    g.finish();
    rt.block_on(store.close());
}

criterion_group!(benches, stages);
criterion_main!(benches);
