//! The daemon's Prometheus metrics, served at `GET /metrics` in the text exposition format.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `fleetwave_received_bytes_total` | counter | `source` = disk, peer, cache, origin | chunk bytes staged, by where they came from |
//! | `fleetwave_served_bytes_total` | counter | `to` = host, cache | chunk bytes sent to peers (a source's egress) |
//! | `fleetwave_served_chunks_total` | counter | `to` | chunks sent to peers |
//! | `fleetwave_chunks_verified_total` | counter | | received chunks that matched their hash |
//! | `fleetwave_chunks_rejected_total` | counter | | received chunks that did not (dropped, sender banned) |
//! | `fleetwave_peers_banned_total` | counter | | peers banned for bad chunks |
//! | `fleetwave_peers_refused_total` | counter | | peers refused: they did not prove the identity expected of them |
//! | `fleetwave_peers` | gauge | | connected chunk-protocol peers |
//! | `fleetwave_active_transfers` | gauge | | manifests being staged |
//! | `fleetwave_stage_duration_seconds` | histogram | | from stage request to staged |
//! | `fleetwave_stages_total` | counter | `result` = staged, failed | finished stagings |
//! | `fleetwave_scrapes_total` | counter | `result` = ok, failed | reads of services' metrics pages (`[[scrape]]`) |

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::swarm::Source;

/// Label of a source.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// disk, peer, cache or origin.
    pub source: &'static str,
}

/// Label of a requester.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToLabel {
    /// host or cache.
    pub to: &'static str,
}

/// Label of a result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// staged or failed.
    pub result: &'static str,
}

/// Every metric of a daemon. Cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    received_bytes: Family<SourceLabel, Counter>,
    served_bytes: Family<ToLabel, Counter>,
    served_chunks: Family<ToLabel, Counter>,
    verified: Counter,
    rejected: Counter,
    forwarded: Counter,
    withdrawn: Counter,
    banned: Counter,
    refused: Counter,
    peers: Gauge,
    active: Gauge,
    stage_seconds: Histogram,
    stages: Family<ResultLabel, Counter>,
    scrapes: Family<ResultLabel, Counter>,
}

/// Counters of the status endpoint.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Totals {
    /// Chunk bytes served to peers.
    pub served_bytes: u64,
    /// Received chunks that matched their hash.
    pub chunks_verified: u64,
    /// Received chunks that did not.
    pub chunks_rejected: u64,
    /// Uploads that passed on a chunk still arriving (`forward_arriving`).
    pub chunks_forwarded: u64,
    /// Of those, uploads withdrawn because the arriving copy failed.
    pub chunks_withdrawn: u64,
    /// Peers banned.
    pub peers_banned: u64,
    /// Peers refused for not proving the identity expected of them.
    pub peers_refused: u64,
    /// Connected peers.
    pub peers: i64,
}

fn source_name(source: Source) -> &'static str {
    match source {
        Source::Disk => "disk",
        Source::Peer => "peer",
        Source::Cache => "cache",
        Source::Origin => "origin",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fleetwave");
        let received_bytes = Family::<SourceLabel, Counter>::default();
        registry.register(
            "received_bytes",
            "Chunk bytes staged, by source",
            received_bytes.clone(),
        );
        let served_bytes = Family::<ToLabel, Counter>::default();
        registry.register("served_bytes", "Chunk bytes sent to peers", served_bytes.clone());
        let served_chunks = Family::<ToLabel, Counter>::default();
        registry.register("served_chunks", "Chunks sent to peers", served_chunks.clone());
        let verified = Counter::default();
        registry.register(
            "chunks_verified",
            "Received chunks matching their hash",
            verified.clone(),
        );
        let rejected = Counter::default();
        registry.register(
            "chunks_rejected",
            "Received chunks failing their hash",
            rejected.clone(),
        );
        let forwarded = Counter::default();
        registry.register(
            "chunks_forwarded",
            "Uploads passing on a chunk still arriving",
            forwarded.clone(),
        );
        let withdrawn = Counter::default();
        registry.register(
            "chunks_withdrawn",
            "Uploads of an arriving chunk withdrawn because its copy failed",
            withdrawn.clone(),
        );
        let banned = Counter::default();
        registry.register("peers_banned", "Peers banned for bad chunks", banned.clone());
        let refused = Counter::default();
        registry.register(
            "peers_refused",
            "Peers refused for not proving the expected identity",
            refused.clone(),
        );
        let peers = Gauge::default();
        registry.register("peers", "Connected chunk-protocol peers", peers.clone());
        let active = Gauge::default();
        registry.register("active_transfers", "Manifests being staged", active.clone());
        let stage_seconds = Histogram::new(exponential_buckets(0.25, 2.0, 14));
        registry.register(
            "stage_duration_seconds",
            "From stage request to staged",
            stage_seconds.clone(),
        );
        let stages = Family::<ResultLabel, Counter>::default();
        registry.register("stages", "Finished stagings", stages.clone());
        let scrapes = Family::<ResultLabel, Counter>::default();
        registry.register("scrapes", "Reads of services' metrics pages", scrapes.clone());
        Self {
            inner: Arc::new(Inner {
                registry,
                received_bytes,
                served_bytes,
                served_chunks,
                verified,
                rejected,
                forwarded,
                withdrawn,
                banned,
                refused,
                peers,
                active,
                stage_seconds,
                stages,
                scrapes,
            }),
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }

    /// Totals for the status endpoint.
    pub fn totals(&self) -> Totals {
        Totals {
            served_bytes: ["host", "cache"]
                .into_iter()
                .map(|to| self.inner.served_bytes.get_or_create(&ToLabel { to }).get())
                .sum(),
            chunks_verified: self.inner.verified.get(),
            chunks_rejected: self.inner.rejected.get(),
            chunks_forwarded: self.inner.forwarded.get(),
            chunks_withdrawn: self.inner.withdrawn.get(),
            peers_banned: self.inner.banned.get(),
            peers_refused: self.inner.refused.get(),
            peers: self.inner.peers.get(),
        }
    }

    pub(crate) fn received(&self, source: Source, bytes: u64) {
        let label = SourceLabel { source: source_name(source) };
        self.inner.received_bytes.get_or_create(&label).inc_by(bytes);
    }

    pub(crate) fn served(&self, to_cache: bool, bytes: u64) {
        let label = ToLabel { to: if to_cache { "cache" } else { "host" } };
        self.inner.served_bytes.get_or_create(&label).inc_by(bytes);
        self.inner.served_chunks.get_or_create(&label).inc();
    }

    pub(crate) fn scraped(&self, ok: bool) {
        let label = ResultLabel { result: if ok { "ok" } else { "failed" } };
        self.inner.scrapes.get_or_create(&label).inc();
    }

    pub(crate) fn verified(&self) {
        self.inner.verified.inc();
    }

    pub(crate) fn rejected(&self) {
        self.inner.rejected.inc();
    }

    pub(crate) fn forwarded(&self) {
        self.inner.forwarded.inc();
    }

    pub(crate) fn withdrawn(&self) {
        self.inner.withdrawn.inc();
    }

    pub(crate) fn banned(&self) {
        self.inner.banned.inc();
    }

    pub(crate) fn refused(&self) {
        self.inner.refused.inc();
    }

    pub(crate) fn peer_connected(&self) {
        self.inner.peers.inc();
    }

    pub(crate) fn peer_disconnected(&self) {
        self.inner.peers.dec();
    }

    pub(crate) fn transfer_started(&self) {
        self.inner.active.inc();
    }

    pub(crate) fn transfer_ended(&self, staged: bool, seconds: f64) {
        self.inner.active.dec();
        let result = if staged { "staged" } else { "failed" };
        self.inner.stages.get_or_create(&ResultLabel { result }).inc();
        if staged {
            self.inner.stage_seconds.observe(seconds);
        }
    }
}
