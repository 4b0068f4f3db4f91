//! Golden cut-point vectors: chunk boundaries are part of the artifact format. If these change,
//! every published chunk id changes, so a change here is a format change, never a refactor.

mod common;

use fleetwave_chunker::cdc::{Cutter, chunk_stream};
use fleetwave_chunker::{ChunkHash, ChunkerParams};

fn lengths(params: ChunkerParams, data: &[u8]) -> Vec<usize> {
    Cutter::new(params).expect("valid params").lengths(data)
}

#[test]
fn golden_default_params() {
    let data = common::pseudo_random(0x5eed, 2 << 20);
    let got = lengths(ChunkerParams::DEFAULT, &data);
    assert_eq!(got, GOLDEN_DEFAULT);
}

#[test]
fn golden_small_params() {
    let data = common::pseudo_random(42, 64 << 10);
    let got = lengths(ChunkerParams::with_avg(4096), &data);
    assert_eq!(got, GOLDEN_4K);
}

#[test]
fn matches_reference_fastcdc_implementation() {
    for (seed, params) in [
        (1, ChunkerParams::DEFAULT),
        (2, ChunkerParams::with_avg(16 << 10)),
        (3, ChunkerParams::with_avg(256 << 10)),
    ] {
        let data = common::pseudo_random(seed, 3 << 20);
        let reference: Vec<usize> = fastcdc::v2020::FastCDC::new(
            &data,
            params.min_size as usize,
            params.avg_size as usize,
            params.max_size as usize,
        )
        .map(|c| c.length)
        .collect();
        assert_eq!(lengths(params, &data), reference, "seed {seed}");
    }
}

/// A reader that returns data in small, odd-sized pieces, to exercise block boundaries.
struct Dribble<'a>(&'a [u8], usize);

impl std::io::Read for Dribble<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.1 = (self.1 * 7 + 3) % 100_003 + 1;
        let n = self.1.min(buf.len()).min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn streaming_pass_equals_whole_buffer_pass() {
    // Larger than several read blocks, not a multiple of anything.
    let data = common::pseudo_random(7, 13 * 1024 * 1024 + 12_345);
    let mut seen = Vec::new();
    let summary = chunk_stream(Dribble(&data, 1), ChunkerParams::DEFAULT, |c| {
        assert_eq!(c.hash, ChunkHash::of(c.data));
        seen.push((c.offset, c.data.len()));
        Ok::<(), std::io::Error>(())
    })
    .expect("chunks");
    let expected = lengths(ChunkerParams::DEFAULT, &data);
    let got: Vec<usize> = summary.chunks.iter().map(|c| c.length as usize).collect();
    assert_eq!(got, expected);
    assert_eq!(seen.len(), expected.len());
    let mut off = 0u64;
    for (o, l) in &seen {
        assert_eq!(*o, off);
        off += *l as u64;
    }
    assert_eq!(summary.size, data.len() as u64);
    assert_eq!(summary.blake3.as_bytes(), blake3::hash(&data).as_bytes());
    let sha = ring::digest::digest(&ring::digest::SHA256, &data);
    assert_eq!(summary.sha256.as_bytes().as_slice(), sha.as_ref());
}

#[test]
fn empty_stream_has_no_chunks() {
    let summary = chunk_stream(&[][..], ChunkerParams::DEFAULT, |_| Ok::<(), std::io::Error>(()))
        .expect("chunks");
    assert_eq!(summary.size, 0);
    assert!(summary.chunks.is_empty());
    assert_eq!(summary.blake3.as_bytes(), blake3::hash(b"").as_bytes());
}

#[test]
fn sink_error_stops_the_pass() {
    let data = common::pseudo_random(9, 1 << 20);
    let mut calls = 0;
    let err = chunk_stream(&data[..], ChunkerParams::DEFAULT, |_| {
        calls += 1;
        Err(std::io::Error::other("disk full"))
    })
    .expect_err("fails");
    assert_eq!(calls, 1);
    assert!(matches!(err, fleetwave_chunker::cdc::ChunkStreamError::Sink(_)));
}

#[test]
fn invalid_params_are_refused() {
    let bad = ChunkerParams { min_size: 8, avg_size: 16, max_size: 32 };
    assert!(Cutter::new(bad).is_err());
    let inverted = ChunkerParams { min_size: 1 << 20, avg_size: 64 << 10, max_size: 256 << 10 };
    assert!(inverted.validate().is_err());
    assert!(ChunkerParams::with_avg(48 << 10).validate().is_err(), "avg not a power of two");
}

const GOLDEN_DEFAULT: &[usize] = &[
    70860, 32337, 69488, 147106, 80103, 19470, 35570, 67267, 41465, 26848, 68082, 83047, 140936,
    216461, 86767, 72455, 130483, 45945, 35398, 62093, 42331, 113856, 43231, 42272, 70884, 16592,
    22440, 132241, 27559, 53565,
];
const GOLDEN_4K: &[usize] =
    &[7833, 5360, 8201, 1185, 9045, 7192, 4811, 4506, 5133, 4528, 5574, 2168];
