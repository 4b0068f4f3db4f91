//! Fleetwave coordinator.
//!
//! The coordinator is what operators talk to. It holds the desired state of every host, turns a
//! deployment ("web 1.4.2 to prod as a canary") into waves, gates each wave on health and canary
//! analysis, and rolls back automatically when a gate fails. Its decision logic lives in sans-io
//! cores (`rollout`, `analysis`) that take time as an argument, so the simulator drives the very
//! same code as the daemon.
//!
//! This crate is the home of that work; the foundation only reserves its place in the workspace.
