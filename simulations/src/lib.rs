//! Fleetwave simulator: fleets of tens of thousands of hosts on a virtual clock, driving the
//! real cores.
//!
//! Every simulated daemon runs the real swarm scheduler ([`fleetwave_node::swarm::Scheduler`]:
//! the origin's, every cache's and every host's), and the deployment runs the real rollout
//! engine ([`fleetwave_coordinator::rollout::Rollout`]). The simulator implements only their
//! I/O, the way the daemons do ([`world`]), over a modelled network ([`net`]). So its figures
//! are worth something: they come from the same decisions the daemons make.
//!
//! # Engine
//!
//! A discrete-event simulation ([`engine`]): a priority queue of timed events, a virtual clock
//! that jumps to the next one, ties broken by the order events were scheduled. Randomness comes
//! from ChaCha8 generators seeded from the scenario's seed (the artifact's bytes, host classes,
//! peer sets, every scheduler's seed, the rollout's host order), and nothing iterates a hashed
//! collection, so the same scenario and seed give the same report, bit for bit. Nothing in the
//! model reads a wall clock.
//!
//! # Fleet and network model
//!
//! - **Daemons.** One origin; per region its caches (0 or more) and hosts. Each daemon has an
//!   uplink and a downlink of its own capacity: the origin's, each cache's, and each host's by
//!   *host class* (a share of every region with its own rates, for example 10 % of hosts at a
//!   tenth of the bandwidth).
//! - **Inter-region links.** The origin reaches each region over that region's WAN link (a
//!   capacity shared by every transfer from the origin into the region, and a one-way latency).
//!   Daemons of one region see each other at the region's latency. The coordinator reaches
//!   every host at one latency.
//! - **Transfers.** A piece is a flow through the sender's uplink, the receiver's downlink and,
//!   from the origin, the WAN link. Concurrent flows share links by per-slot max-min
//!   approximation (see [`net`] for the algorithm): rates are recomputed for all flows every
//!   slot (10 ms by default), a flow started within a slot takes the capacity its links have
//!   left, a flow finishing within a slot finishes at its exact time. **Error:** up to about one
//!   slot per transfer, both ways (a flow may wait up to a slot for capacity that finished
//!   flows freed elsewhere; capacity freed within a slot and not taken by a new flow is lost
//!   until the next slot); with 10 ms slots and 1 MiB pieces at 100 Mbit/s (0.08-0.7 s each)
//!   that is a few per cent, which the validation scenario measures by re-running at smaller
//!   slots. Flows with two bottlenecks at once get an approximation of their max-min share.
//!   Slow start, loss, retransmission and protocol overhead are not modelled (every flow runs
//!   at its share from its first byte, and a piece is exactly its chunk's bytes); control
//!   messages (requests, haves, bitfields) cost latency, not bandwidth.
//! - **Passing chunks on while they arrive** (`[swarm] forward_arriving`, the daemon's option,
//!   off by default). A host announces a chunk when its first bytes arrive (a
//!   latency after the sender started) and serves it from then on. Such an upload is a flow
//!   like any other; if it has carried the chunk's bytes before the sender's own copy is
//!   verified, the receiver gets the piece a latency after that copy is (and the sender's
//!   upload slot stays taken until then). If the sender's copy fails, its uploads of the chunk
//!   are aborted and their receivers see the request refused (`NotHave`). **Error:** such a
//!   flow runs at its fair share, not at the pace of the copy it passes on, so the sender's
//!   uplink looks free from when the flow has carried its bytes until the copy is in.
//! - **CPU and disk** are not modelled, except as fixed times: the whole-artifact check runs
//!   at a configured rate after the last chunk, group commits every `sync_every`, and
//!   activation and switching take configured times. Where the real system is CPU-bound (the
//!   network-namespace benchmark on this 2-core machine), the simulator is optimistic; see
//!   docs/BENCHMARKS.md.
//! - **Artifact.** Seeded pseudo-random bytes cut and hashed by the real chunker
//!   ([`artifact`]); pieces carry the chunk's BLAKE3 hash, which the receiver's shell checks
//!   against the manifest, as the daemon checks the bytes. A host whose store is corrupt
//!   serves hashes that do not match.
//! - **Chunk size.** The cost of a run is per chunk per host (requests, pieces, and a have to
//!   each connected peer not known to hold the chunk), so the large scenarios use 1 MiB
//!   average chunks (about 150 chunks per 200 MB) instead of the publish default of 64 KiB
//!   (about 2,350): 50,000 hosts at 64 KiB would be 118 million host-chunks and billions of
//!   have deliveries. Larger chunks make pipelining coarser, so if anything they lengthen the
//!   simulated staging time.
//!
//! # What the shells do
//!
//! See [`world`]: sources (caches in order, then the origin, with the origin's host cap),
//! rendezvous (a uniform random sample of the hosts registered in the region, per query),
//! bitfields on connect, haves to the peers the scheduler names (one event per broadcast),
//! group commit, whole-artifact check, reports to the coordinator, desired state applied by
//! each host, failure detection by timeouts (QUIC idle timeout for peers, missed heartbeats
//! for the coordinator).
//!
//! # Scenarios and output
//!
//! A scenario is a TOML file ([`scenario`]); `simulations/scenarios/` holds the standard ones.
//! A run gives a [`report::Report`]: a human summary, JSON, and SVG plots ([`plot`]), every
//! figure beside its lower bound `T_min`. Where a staging time lands above `T_min`, the
//! link-use series say where it went: how long the staging hosts' downlinks took to fill (the
//! ramp), how full they stayed, and how many hosts held chunks while their uplinks sat idle
//! ([`report::SeriesReport::staging_use`], the `-links.svg` plot).

pub mod artifact;
pub mod engine;
pub mod net;
pub mod plot;
pub mod report;
pub mod scenario;
pub mod units;
pub mod world;

use artifact::{Artifact, ArtifactError};
use report::Report;
use scenario::Scenario;
pub use world::RunProgress;

/// Runs `scenario` and reports.
pub fn run(scenario: &Scenario) -> Result<Report, ArtifactError> {
    run_observed(scenario, |_| {})
}

/// [`run`], handing `observer` the run's progress at every sample of the series (the
/// scenario's `run.bucket` of simulated time); the report is the same as [`run`]'s.
pub fn run_observed(
    scenario: &Scenario,
    mut observer: impl FnMut(&RunProgress),
) -> Result<Report, ArtifactError> {
    let art = Artifact::generate(
        scenario.artifact.size.0,
        scenario.artifact.chunk_avg.0 as u32,
        scenario.seed,
    )?;
    let outcome = world::simulate(scenario.clone(), art.clone(), &mut observer);
    Ok(Report::new(scenario, &art, &outcome))
}
