//! Micro-benchmarks of the backup pipeline's hot stages, one at a time, so a regression shows
//! at the stage that caused it: chunking, the chunk id (keyed BLAKE3), compression + encryption
//! (sealing) and opening. Run: `cargo bench -p cairn-client --bench stages`.

use cairn_client::{chunk_stream, ChunkerOptions, Keys};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn text(len: usize) -> Vec<u8> {
    let words = [
        "cairn ",
        "backup ",
        "chunk ",
        "value=42 ",
        "INFO ",
        "error\n",
        "node ",
    ];
    let mut v = Vec::with_capacity(len + 16);
    let mut x: u32 = 1;
    while v.len() < len {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        v.extend_from_slice(words[(x >> 28) as usize % words.len()].as_bytes());
    }
    v.truncate(len);
    v
}

fn random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn stages(c: &mut Criterion) {
    let keys = Keys::from_master_key(&[7; 32]);
    let big = random(64 << 20);
    let mut g = c.benchmark_group("chunking");
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.sample_size(10);
    g.bench_function("fastcdc 256K/1M/4M, 64 MiB", |b| {
        b.iter(|| {
            chunk_stream(
                big.as_slice(),
                big.len() as u64,
                ChunkerOptions::default(),
                |_| true,
            )
            .unwrap()
        })
    });
    g.finish();

    let chunk_text = text(1 << 20);
    let chunk_rand = random(1 << 20);
    let mut g = c.benchmark_group("per 1 MiB chunk");
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("chunk id (keyed blake3)", |b| {
        b.iter(|| keys.chunk_id(&chunk_rand))
    });
    let id_t = keys.chunk_id(&chunk_text);
    let id_r = keys.chunk_id(&chunk_rand);
    g.bench_function("seal text (zstd 3 + aes-gcm)", |b| {
        let mut s = keys.sealer();
        b.iter(|| s.seal(&id_t, &chunk_text).unwrap())
    });
    g.bench_function("seal random (zstd 3 + aes-gcm)", |b| {
        let mut s = keys.sealer();
        b.iter(|| s.seal(&id_r, &chunk_rand).unwrap())
    });
    let plain = keys.clone().with_zstd_level(0);
    g.bench_function("seal, encryption only (aes-gcm)", |b| {
        let mut s = plain.sealer();
        b.iter(|| s.seal(&id_r, &chunk_rand).unwrap())
    });
    let sealed = keys.seal(&id_t, &chunk_text).unwrap();
    g.bench_function("open text (aes-gcm + zstd + id check)", |b| {
        b.iter(|| keys.open(&id_t, &sealed, 16 << 20).unwrap())
    });
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
