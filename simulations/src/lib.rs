//! Fleetwave simulator.
//!
//! A discrete-event simulator of fleets of tens of thousands of hosts. It drives the real swarm
//! scheduler (`fleetwave_node::swarm`) and rollout engine (`fleetwave_coordinator::rollout`) on a
//! virtual clock over a modelled network, so that its figures are worth something: they come from
//! the same logic the daemons run.
//!
//! This crate is the home of that work; the foundation only reserves its place in the workspace.
