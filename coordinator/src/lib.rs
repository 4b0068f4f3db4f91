//! Fleetwave coordinator.
//!
//! The coordinator is what operators talk to. It holds the desired state of every host, turns a
//! deployment ("web 1.4.2 to prod as a canary") into waves, gates each wave on health and canary
//! analysis, and rolls back automatically when a gate fails. Its decision logic lives in sans-io
//! cores that take time as an argument, so the simulator drives the very same code as the daemon:
//!
//! - [`rollout`]: the rollout engine. A deployment plan and events (host reports, ticks,
//!   operator commands, gate verdicts) in; desired host state, gate requests and notifications
//!   out. Rolling, canary and blue-green; serializable state for resuming after a crash.
//! - [`analysis`]: the canary judge. Canary and baseline samples per interval (request and
//!   error counts, latency histograms) in; pass, fail or inconclusive out, with the evidence.
//!   Anytime-valid sequential tests, so it may look every interval; serializable state.

#![warn(missing_docs)]

pub mod analysis;
pub mod rollout;
