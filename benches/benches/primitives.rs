//! The primitives a publish is built from, each on one core: FastCDC cut points, BLAKE3 per
//! chunk, and the whole-stream SHA-256 and BLAKE3.
//!
//! `cargo bench -p fleetwave-benches --bench primitives`. Every bench reports throughput in bytes
//! of input, so the figures compare directly with `openssl dgst -sha256` and with each other.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fleetwave_benches::pseudo_random;
use fleetwave_chunker::ChunkerParams;
use fleetwave_chunker::cdc::Cutter;

/// Input size of the stream benches: large against the caches, small enough to sample quickly.
const STREAM_LEN: usize = 64 << 20;

/// Chunk size of the per-chunk BLAKE3 bench: the default average chunk.
const CHUNK_LEN: usize = 64 << 10;

fn configure(c: &mut Criterion) -> criterion::BenchmarkGroup<'_, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group("primitives");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(STREAM_LEN as u64));
    group
}

fn primitives(c: &mut Criterion) {
    let data = pseudo_random(1, STREAM_LEN);
    let mut group = configure(c);

    let cutter = Cutter::new(ChunkerParams::DEFAULT).expect("default chunker params are valid");
    group.bench_function("fastcdc_cut_points_64MiB", |b| {
        b.iter(|| cutter.lengths(black_box(&data)))
    });

    // Fixed 64 KiB pieces: the per-chunk cost (hasher setup and finalization) at the default
    // average size, without the cut-point search.
    group.bench_function("blake3_per_64KiB_chunk_64MiB", |b| {
        b.iter(|| {
            let mut acc = 0u8;
            for chunk in black_box(&data).chunks(CHUNK_LEN) {
                acc ^= blake3::hash(chunk).as_bytes()[0];
            }
            acc
        })
    });

    group.bench_function("blake3_whole_stream_64MiB", |b| {
        b.iter(|| {
            let mut hasher = blake3::Hasher::new();
            hasher.update(black_box(&data));
            hasher.finalize()
        })
    });

    group.bench_function("sha256_ring_64MiB", |b| {
        b.iter(|| ring::digest::digest(&ring::digest::SHA256, black_box(&data)))
    });
    group.finish();
}

criterion_group!(benches, primitives);
criterion_main!(benches);
