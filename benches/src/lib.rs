//! Fleetwave benchmarks.
//!
//! Criterion benches live in `benches/benches/`; benchmark scripts that compare Fleetwave with
//! reference tools (openssl, casync) live in `benches/scripts/`. Measured figures and the commands
//! that produced them are recorded in `docs/BENCHMARKS.md`.
