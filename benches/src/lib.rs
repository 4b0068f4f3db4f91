//! Fleetwave benchmarks.
//!
//! Criterion benches live in `benches/benches/`; benchmark scripts that compare Fleetwave with
//! reference tools (openssl, casync, dd) live in `benches/scripts/`. Measured figures and the
//! commands that produced them are recorded in `docs/BENCHMARKS.md`.
//!
//! This library holds only what the criterion benches share: deterministic input data.

/// `len` bytes of deterministic pseudo-random data (the BLAKE3 extendable output of `seed`).
///
/// Incompressible and without repeats, like a release binary at its worst, and the same on every
/// run so that the cut points (and so the chunk count) do not vary between runs.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"fleetwave-benches");
    hasher.update(&seed.to_le_bytes());
    hasher.finalize_xof().fill(&mut data);
    data
}
