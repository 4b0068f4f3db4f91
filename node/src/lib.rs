//! The Fleetwave node: the daemon that runs on every machine of a fleet.
//!
//! One binary plays one of three roles:
//!
//! - **origin**: holds the authoritative copy of every published artifact (chunks, signed
//!   manifests and the refs that name releases) and serves each region about once.
//! - **cache**: a regional pull-through copy of the origin and the rendezvous point where hosts
//!   of its region find swarm peers.
//! - **host**: stages releases by fetching chunks from its own older releases, swarm peers, the
//!   regional cache and, last, the origin; verifies every chunk and the whole artifact; and
//!   activates releases when the coordinator says so.
//!
//! All three keep their data in the same on-disk [`store`]: a content-addressed chunk store with
//! crash-safe writes, a manifest store and named refs. The swarm scheduler (a sans-io state
//! machine) and the daemon that wraps it in I/O will live here too.

#![warn(missing_docs)]

pub mod store;
pub mod swarm;

pub use store::{BatchStats, ChunkIter, ChunkStore, StoreError, WriteBatch};
