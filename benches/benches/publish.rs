//! The one-pass chunking pipeline and publish end to end.
//!
//! `cargo bench -p fleetwave-benches --bench publish`.
//!
//! - `chunk_stream_64MiB`: [`chunk_stream`] with a sink that keeps nothing: reading, FastCDC,
//!   per-chunk BLAKE3 and the whole-stream SHA-256 and BLAKE3 on their own threads. This is what
//!   a publish costs when the origin already holds every chunk.
//! - `publish_64MiB/<fs>`: the same pass writing every chunk into a fresh [`ChunkStore`] through a
//!   [`WriteBatch`](fleetwave_node::WriteBatch), then `commit` (one `syncfs`, renames, directory
//!   flushes), as `fleetwave publish` does for an artifact the origin has never seen. Run on the
//!   temp directory's filesystem (`disk`) and, when `/dev/shm` exists, on tmpfs (`tmpfs`), which
//!   separates the cost of the store's file handling from the cost of the disk.
//!
//! Both report throughput in bytes of input. The signing and manifest steps of a publish take
//! microseconds and are left out.

use std::convert::Infallible;
use std::hint::black_box;
use std::io::Cursor;
use std::path::Path;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use fleetwave_benches::pseudo_random;
use fleetwave_chunker::ChunkerParams;
use fleetwave_chunker::cdc::chunk_stream;
use fleetwave_node::{ChunkStore, StoreError};

const STREAM_LEN: usize = 64 << 20;

fn pipeline(c: &mut Criterion) {
    let data = pseudo_random(2, STREAM_LEN);
    let mut group = c.benchmark_group("pipeline");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(STREAM_LEN as u64));

    group.bench_function("chunk_stream_64MiB", |b| {
        b.iter(|| {
            chunk_stream(Cursor::new(black_box(&data[..])), ChunkerParams::DEFAULT, |chunk| {
                black_box(chunk.hash);
                Ok::<(), Infallible>(())
            })
            .expect("chunking an in-memory buffer cannot fail")
        })
    });

    let mut targets = vec![("disk", std::env::temp_dir())];
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        targets.push(("tmpfs", shm.to_path_buf()));
    }
    // Every sample writes 64 MiB of new files and syncs the filesystem: keep the count low.
    group.measurement_time(Duration::from_secs(10));
    for (name, parent) in targets {
        group.bench_function(format!("publish_64MiB/{name}"), |b| {
            b.iter_batched(
                || {
                    let dir = tempfile::Builder::new()
                        .prefix("fleetwave-bench-")
                        .tempdir_in(&parent)
                        .expect("cannot create a temp dir for the bench store");
                    let store = ChunkStore::open(dir.path()).expect("cannot open the bench store");
                    (dir, store)
                },
                |(dir, store)| {
                    publish(&data, &store);
                    dir
                },
                // The store (a fresh directory) and the TempDir returned are dropped, and the
                // directory deleted, outside the timed routine.
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// What `fleetwave publish` does with the chunks of an artifact: keep the new ones, commit.
fn publish(data: &[u8], store: &ChunkStore) {
    let mut batch = store.batch();
    let summary = chunk_stream(Cursor::new(data), ChunkerParams::DEFAULT, |chunk| {
        if !store.has(&chunk.hash) {
            batch.put_prehashed(chunk.hash, chunk.data)?;
        }
        Ok::<(), StoreError>(())
    })
    .expect("publish pass failed");
    black_box(summary);
    black_box(batch.commit().expect("commit failed"));
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
