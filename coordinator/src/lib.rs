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
//!
//! Around them, the daemon (`fleetwave-coordinator`):
//!
//! - [`fleet`]: hosts, registry, deployments and their engines, fed in order and persisted
//!   before they are acted on; [`store`]: the sled state; [`deploy`]: deployment specs;
//!   [`auth`]: tokens and roles; [`view`]: the API's JSON bodies.
//! - [`nodes`]: the gRPC service hosts enroll and heartbeat with; [`api`]: the REST API;
//!   [`daemon`]: configuration and the process that runs them.

#![warn(missing_docs)]

pub mod analysis;
pub mod analysis_gate;
pub mod api;
pub mod auth;
pub mod daemon;
pub mod deploy;
pub mod fleet;
pub mod nodes;
pub mod promql;
pub mod rollout;
pub mod store;
pub mod view;
