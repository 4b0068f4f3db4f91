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
//! The pieces:
//!
//! - [`store`]: the content-addressed chunk store with crash-safe writes, a manifest store and
//!   named refs; the origin's and the caches' data.
//! - [`store_api`]: the store over HTTP (manifests, refs, missing-chunk queries, uploads),
//!   mounted by the origin and caches, and the client `fleetwave publish` uploads with.
//! - [`stage`]: a host's artifacts being staged (chunks written at their offsets, progress in
//!   sled so a restart resumes), whole-artifact verification, unpacked releases and their GC.
//! - [`protocol`]: the chunk protocol spoken between daemons (framing, limits, handshake, error
//!   codes) and a per-connection session that maps frames to and from the scheduler.
//! - [`transport`]: QUIC endpoints (quinn) whose certificates prove the libp2p PeerId of each
//!   side; a connection to the wrong identity never completes its handshake.
//! - [`discovery`]: finding swarm peers (PeerId, chunk address): rendezvous at the region's
//!   cache or the origin, Kademlia when no rendezvous point answers.
//! - [`activate`]: switching a host's service to a staged release: lifecycle hooks, health
//!   checks, crash-safe state, rollback as a switch back, secrets injected into hooks.
//! - [`daemon`]: the daemon itself: configuration, identity, metrics, one swarm actor per
//!   manifest, the HTTP API; the `fleetwave-node` binary runs it.
//! - [`swarm`]: the sans-io chunk scheduler (rarest first, endgame, bans, upload slots), driven
//!   by the daemon's I/O and, unchanged, by the fleet simulator.

#![warn(missing_docs)]

pub mod activate;
pub mod daemon;
pub mod discovery;
mod fsio;
pub mod protocol;
pub mod scrape;
pub mod stage;
pub mod store;
pub mod store_api;
pub mod swarm;
pub mod transport;

pub use store::{BatchStats, ChunkIter, ChunkStore, StoreError, WriteBatch};
