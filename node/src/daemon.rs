//! The daemon: one process in one of three roles (origin, cache, host), wiring the store or the
//! stage area, the QUIC chunk endpoint, libp2p discovery, one swarm actor per manifest
//! (`transfer`), and the HTTP API.
//!
//! # Sockets
//!
//! - **API** (HTTP, `listen.api`): `GET /v1/info` (identity, role, region, the chunk and libp2p
//!   addresses), `GET /v1/status` (what is staged or served, with counters), `GET /metrics`
//!   (Prometheus); on the origin and caches the store API ([`crate::store_api`]: manifests, refs,
//!   uploads on the origin); on hosts the admin API: `POST /v1/admin/stage` `{"manifest": id}`.
//!   Errors are JSON `{"code", "message"}`.
//! - **Chunks** (QUIC, `listen.chunks`): the chunk protocol ([`crate::protocol`]) over
//!   connections authenticated by libp2p identity ([`crate::transport`]).
//! - **libp2p** (TCP, `listen.p2p`): discovery ([`crate::discovery`]): rendezvous served by the
//!   origin and caches, used by hosts to find the peers of their region staging the same
//!   manifest; a Kademlia DHT among all daemons when no rendezvous point answers.
//!
//! Once every socket is bound, the daemon writes `<data_dir>/ready.json` with the bound
//! addresses and its PeerId (atomically: temp file, flush, rename), which is how scripts and
//! tests that asked for port 0 find it.
//!
//! # Who connects to whom
//!
//! - A host staging a manifest dials its region's caches in order (the first that connects),
//!   or the origin when no cache answers, and the region peers that the rendezvous returns
//!   (a bounded random set; hosts that hold everything only accept). When two hosts dial each
//!   other at once, both keep the connection dialed by the smaller PeerId. Every dial names the
//!   identity it expects; the transport refuses any other.
//! - A cache asked for a manifest it does not hold fetches the signed manifest from the origin,
//!   checks its signature, and pulls every chunk through from the origin while serving its
//!   region what it already has.
//! - A listener grants the cache and origin roles only to the identities configured as such;
//!   any other authenticated peer is a host.

pub mod client;
pub mod config;
pub mod identity;
pub mod metrics;
mod reconcile;
pub(crate) mod transfer;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::BytesMut;
use fleetwave_chunker::{ManifestId, SignedManifest, TrustedKeys};
use libp2p_identity::{Keypair, PeerId as Identity};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex as AsyncMutex;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::discovery::{Discovery, DiscoveryConfig, RendezvousPoint};
use crate::protocol::{ErrorCode, Frame};
use crate::stage::{StageArea, StageError, StageStatus};
use crate::store::ChunkStore;
use crate::swarm::{Bitfield, PeerKind, SwarmConfig};
use crate::transport::{Endpoint, TransportConfig};
use config::{Config, Role, ScrapeSection, Upstream};
use metrics::{Metrics, Totals};
use transfer::{Attach, Backend, Shared, TransferHandle, TransferSpec};
pub use transfer::{Snapshot, SourceTally};

/// Name of the file written once the daemon serves.
pub const READY_FILE: &str = "ready.json";

/// Longest wait for a dialer's Hello on a new connection.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What a daemon serves and where, as written to `ready.json` and answered at `/v1/info`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Info {
    /// Its libp2p PeerId.
    pub peer_id: String,
    /// Its role.
    pub role: Role,
    /// Its region.
    pub region: String,
    /// The HTTP API.
    pub api: SocketAddr,
    /// The QUIC chunk endpoint, as advertised.
    pub chunks: SocketAddr,
    /// The libp2p swarm, as advertised.
    pub p2p: SocketAddr,
}

/// The daemon's status, at `/v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Who.
    pub info: Info,
    /// Counters.
    pub totals: Totals,
    /// Manifests this daemon stages or serves.
    pub manifests: Vec<ManifestStatus>,
    /// Hosts: each service's activation state.
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
}

/// One service at `/v1/status` (hosts).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    /// The service.
    pub service: String,
    /// Its activation state: active and previous release, activation running, last outcome.
    pub state: crate::activate::ServiceState,
}

/// One manifest at `/v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ManifestStatus {
    /// Manifest id (hex).
    pub id: String,
    /// Service.
    pub service: String,
    /// Version.
    pub version: String,
    /// `staging`, `staged`, `failed` (hosts) or `serving` (origin, cache).
    pub status: String,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// The release directory, once staged.
    pub release: Option<PathBuf>,
    /// The live transfer, if one runs.
    pub transfer: Option<Snapshot>,
}

/// The daemon cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The identity key.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The trusted keys cannot be read.
    #[error("cannot read trusted keys: {0}")]
    Trust(#[source] fleetwave_chunker::sign::KeyError),
    /// The store cannot be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The stage area cannot be opened.
    #[error("cannot open the stage area: {0}")]
    Stage(#[from] StageError),
    /// A socket cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The chunk endpoint cannot be bound.
    #[error("cannot bind the chunk endpoint: {0}")]
    Endpoint(#[from] crate::transport::BindError),
    /// Discovery cannot start.
    #[error("cannot start discovery: {0}")]
    Discovery(#[from] crate::discovery::DiscoveryError),
    /// Activation state or secrets are unusable.
    #[error(transparent)]
    Activate(#[from] crate::activate::ActivateError),
    /// The upload token file is unusable.
    #[error(transparent)]
    Token(#[from] crate::store_api::TokenError),
    /// `ready.json` cannot be written.
    #[error("cannot write {path}: {source}")]
    Ready {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Test-only faults, compiled in with the `test-utils` feature.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Flip a byte of every chunk this daemon serves.
    pub corrupt_uploads: bool,
}

/// An upstream daemon, resolved through its `/v1/info`.
#[derive(Clone, Debug)]
struct Resolved {
    config: Upstream,
    identity: Identity,
    info: Option<Info>,
}

struct Inner {
    config: Config,
    info: Info,
    keypair: Keypair,
    trusted: TrustedKeys,
    endpoint: Endpoint,
    discovery: Discovery,
    shared: Shared,
    store: Option<ChunkStore>,
    area: Option<StageArea>,
    activator: Option<crate::activate::Activator>,
    transfers: AsyncMutex<HashMap<ManifestId, TransferHandle>>,
    origin: Option<AsyncMutex<Resolved>>,
    caches: Vec<AsyncMutex<Resolved>>,
    http: reqwest::Client,
    /// Origin: permits of hosts fetching at once.
    origin_hosts: Arc<tokio::sync::Semaphore>,
    faults: Faults,
    /// Failures of stagings that are not running any more, by manifest.
    failures: std::sync::Mutex<HashMap<ManifestId, String>>,
    /// Host: request counters the services pushed, by service.
    service_metrics: std::sync::Mutex<HashMap<String, ServiceMetrics>>,
}

/// Body of `POST /v1/services/{service}/metrics`: a service's own counters, cumulative since
/// its active release started (a decrease is a restart: the coordinator counts from zero). The
/// host reports them with its heartbeats; canary analysis compares canary and baseline hosts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceMetrics {
    /// Requests served.
    pub requests: u64,
    /// Of which errors (5xx).
    pub errors: u64,
    /// Cumulative request counts at the latency bucket bounds the coordinator's analysis uses
    /// (its `latency_buckets`), `+Inf` last (at most 257).
    #[serde(default)]
    pub latency_buckets: Vec<u64>,
}

/// Runs a daemon until `shutdown` is cancelled, then stops gracefully: transfers make their
/// received chunks durable, peers are told `SHUTTING_DOWN`, sockets close.
pub async fn run(
    config: Config,
    faults: Faults,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    config.validate()?;
    let keypair = identity::load_or_create(&config.data_dir)?;
    let peer_id = keypair.public().to_peer_id();
    let trusted = TrustedKeys::read_files(&config.trust).map_err(DaemonError::Trust)?;
    let (store, area) = match config.role {
        Role::Origin | Role::Cache => {
            (Some(ChunkStore::open(config.data_dir.join("store"))?), None)
        }
        Role::Host => (None, Some(StageArea::open(&config.data_dir, config.stage.keep_releases)?)),
    };

    let activator = match &area {
        Some(area) => {
            let secrets = match &config.secrets_file {
                Some(path) => crate::activate::Secrets::read_file(path)?,
                None => crate::activate::Secrets::default(),
            };
            let (activator, interrupted) =
                crate::activate::Activator::open(&config.data_dir, area.clone(), secrets)?;
            for service in interrupted {
                warn!(service, "an activation was interrupted by the restart; reported failed");
            }
            Some(activator)
        }
        None => None,
    };
    let endpoint = Endpoint::bind(config.listen.chunks, &keypair, &TransportConfig::default())?;
    let chunks_bound = endpoint
        .local_addr()
        .map_err(|source| DaemonError::Listen { addr: config.listen.chunks, source })?;
    let chunks_addr = config.advertised(chunks_bound);
    let api_listener = tokio::net::TcpListener::bind(config.listen.api)
        .await
        .map_err(|source| DaemonError::Listen { addr: config.listen.api, source })?;
    let api_addr = api_listener
        .local_addr()
        .map_err(|source| DaemonError::Listen { addr: config.listen.api, source })?;

    let metrics = Metrics::new();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default();
    let resolve = |u: &Upstream| Resolved {
        config: u.clone(),
        // Checked by validate().
        identity: u.peer_id.parse().unwrap_or(peer_id),
        info: None,
    };
    let mut origin = config.origin.as_ref().map(resolve);
    let mut caches: Vec<Resolved> = config.caches.iter().map(resolve).collect();

    // Hosts register at their caches' (or, without caches, the origin's) rendezvous.
    let mut points = Vec::new();
    if config.role == Role::Host {
        if caches.is_empty() {
            if let Some(o) = origin.as_mut() {
                if let Some(info) = fetch_info(&http, o, &metrics).await {
                    points.push(RendezvousPoint { peer_id: o.identity, addr: info.p2p });
                }
            }
        } else {
            for c in caches.iter_mut() {
                if let Some(info) = fetch_info(&http, c, &metrics).await {
                    points.push(RendezvousPoint { peer_id: c.identity, addr: info.p2p });
                }
            }
        }
    }
    let discovery = Discovery::spawn(
        keypair.clone(),
        DiscoveryConfig {
            listen: config.listen.p2p,
            server: config.role != Role::Host,
            points,
            chunk_addr: chunks_addr,
            ttl: Duration::from_secs(120),
        },
    )
    .await?;
    let p2p_addr = config.advertised(discovery.local_addr());

    let info = Info {
        peer_id: peer_id.to_string(),
        role: config.role,
        region: config.region.clone(),
        api: api_addr,
        chunks: chunks_addr,
        p2p: p2p_addr,
    };
    let download_limit = match config.swarm.download_limit {
        0 => None,
        rate => Some(Arc::new(transfer::RateLimit::new(rate))),
    };
    let shared = Shared {
        local: peer_id,
        download_limit,
        interner: Default::default(),
        metrics,
        shutdown: shutdown.clone(),
    };
    let inner = Arc::new(Inner {
        info: info.clone(),
        keypair,
        trusted,
        endpoint: endpoint.clone(),
        discovery: discovery.clone(),
        shared,
        store,
        area,
        activator,
        transfers: AsyncMutex::new(HashMap::new()),
        origin: origin.map(AsyncMutex::new),
        caches: caches.into_iter().map(AsyncMutex::new).collect(),
        http,
        origin_hosts: Arc::new(tokio::sync::Semaphore::new(config.swarm.origin_max_hosts)),
        faults,
        failures: Default::default(),
        service_metrics: Default::default(),
        config,
    });

    let router = api_router(Arc::clone(&inner))?;
    let api_shutdown = shutdown.clone();
    let api = tokio::spawn(async move {
        let serve = axum::serve(api_listener, router)
            .with_graceful_shutdown(async move { api_shutdown.cancelled().await });
        if let Err(err) = serve.await {
            warn!(%err, "API server failed");
        }
    });
    let acceptor = tokio::spawn(accept_loop(Arc::clone(&inner)));
    if let Some(coordinator) = inner.config.coordinator.clone() {
        tokio::spawn(reconcile::run(Arc::clone(&inner), coordinator));
    }
    for entry in inner.config.scrape.clone() {
        tokio::spawn(scrape_loop(Arc::clone(&inner), entry, shutdown.clone()));
    }
    write_ready(&inner.config.data_dir, &info)?;
    info!(
        role = inner.config.role.name(),
        peer_id = %info.peer_id,
        api = %info.api,
        chunks = %info.chunks,
        p2p = %info.p2p,
        "serving"
    );

    shutdown.cancelled().await;
    info!("shutting down");
    acceptor.abort();
    let handles: Vec<TransferHandle> = inner.transfers.lock().await.values().cloned().collect();
    for handle in handles {
        handle.stopped().await;
    }
    let _ = api.await;
    discovery.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.close()).await;
    let _ = std::fs::remove_file(inner.config.data_dir.join(READY_FILE));
    info!("stopped");
    Ok(())
}

/// Reads an upstream's `/v1/info` (retrying briefly) and checks that it claims the configured
/// identity. The addresses it gives are only used to dial connections that are authenticated
/// against that identity anyway.
async fn fetch_info(
    http: &reqwest::Client,
    upstream: &mut Resolved,
    metrics: &Metrics,
) -> Option<Info> {
    if let Some(info) = &upstream.info {
        return Some(info.clone());
    }
    let url = format!("{}/v1/info", upstream.config.api.trim_end_matches('/'));
    for attempt in 0..10u32 {
        match http.get(&url).send().await {
            Ok(resp) if resp.status().is_success() => match resp.json::<Info>().await {
                Ok(info) if info.peer_id == upstream.identity.to_string() => {
                    upstream.info = Some(info.clone());
                    return Some(info);
                }
                Ok(info) => {
                    metrics.refused();
                    warn!(
                        url,
                        expected = %upstream.identity,
                        claimed = %info.peer_id,
                        "upstream claims another identity; not using it"
                    );
                    return None;
                }
                Err(err) => warn!(url, %err, "upstream info unreadable"),
            },
            Ok(resp) => warn!(url, status = %resp.status(), "upstream info refused"),
            Err(err) => debug!(url, %err, attempt, "upstream not reachable yet"),
        }
        tokio::time::sleep(Duration::from_millis(200 << attempt.min(4))).await;
    }
    warn!(url, "upstream unreachable");
    None
}

fn write_ready(dir: &Path, info: &Info) -> Result<(), DaemonError> {
    let path = dir.join(READY_FILE);
    let tmp = dir.join(format!(".{READY_FILE}.tmp"));
    let err = |source| DaemonError::Ready { path: path.clone(), source };
    let json = serde_json::to_vec_pretty(info).map_err(|e| err(std::io::Error::other(e)))?;
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&json)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(err)
}

impl Inner {
    fn our_kind(&self) -> PeerKind {
        match self.config.role {
            Role::Origin => PeerKind::Origin,
            Role::Cache => PeerKind::Cache,
            Role::Host => PeerKind::Peer,
        }
    }

    /// The role an identity must claim: the configured origin and caches theirs, anyone else
    /// host. The origin does not list the caches that pull from it, so it accepts any claim:
    /// it asks nobody for chunks, and a peer claiming to be a cache gains only an exemption
    /// from super-seeding.
    async fn role_of(&self, identity: Identity) -> Option<PeerKind> {
        if let Some(origin) = &self.origin {
            if origin.lock().await.identity == identity {
                return Some(PeerKind::Origin);
            }
        }
        for cache in &self.caches {
            if cache.lock().await.identity == identity {
                return Some(PeerKind::Cache);
            }
        }
        match self.config.role {
            Role::Origin => None,
            Role::Cache | Role::Host => Some(PeerKind::Peer),
        }
    }

    fn swarm_config(&self) -> SwarmConfig {
        let s = &self.config.swarm;
        let mut config = SwarmConfig {
            max_in_flight_per_peer: s.max_in_flight_per_peer,
            max_in_flight_back_to_source: s.max_in_flight_back_to_source,
            upload_slots: s.upload_slots,
            back_to_source_delay: s.back_to_source_delay,
            forward_arriving: s.forward_arriving && self.config.role == Role::Host,
            ..SwarmConfig::default()
        };
        if self.config.role != Role::Host {
            config.upload_slots = s.source_upload_slots;
            config.upload_slots_per_peer = s.source_upload_slots.max(1);
            config.upload_queue_len = s.source_upload_slots.saturating_mul(4);
            config.seed_window = s.seed_window;
        }
        if self.config.role == Role::Cache {
            config.max_in_flight_back_to_source = s.cache_pull_in_flight;
            // A cache pulls as soon as it is asked: no region peers' bitfields to wait for.
            config.back_to_source_delay = Duration::ZERO;
        }
        config
    }

    fn spec(&self, signed: SignedManifest, backend: Backend, local: Bitfield) -> TransferSpec {
        let id = signed.id();
        let seed = u64::from_le_bytes(id.as_bytes()[..8].try_into().unwrap_or([0; 8]))
            ^ u64::from_le_bytes(
                self.keypair.public().to_peer_id().to_bytes()[6..14].try_into().unwrap_or([0; 8]),
            );
        TransferSpec {
            signed,
            backend,
            local,
            role: self.our_kind(),
            swarm: self.swarm_config(),
            seed,
            sync_every: self.config.stage.sync_every,
            sync_bytes: self.config.stage.sync_bytes,
            corrupt_uploads: self.faults.corrupt_uploads,
        }
    }

    /// The running transfer of `id`, starting one where this role serves it without being
    /// asked to stage it: the origin (it holds the manifest), a cache (it pulls it through), a
    /// host (it staged it and keeps the artifact).
    async fn transfer_for(self: &Arc<Self>, id: ManifestId) -> Option<TransferHandle> {
        let mut transfers = self.transfers.lock().await;
        if let Some(handle) = transfers.get(&id) {
            if !handle.is_stopped() {
                return Some(handle.clone());
            }
        }
        let handle = match self.config.role {
            Role::Origin => self.serve_stored(id).await,
            Role::Cache => self.pull_through(id).await,
            Role::Host => self.seed_staged(id),
        }?;
        transfers.insert(id, handle.clone());
        Some(handle)
    }

    async fn serve_stored(self: &Arc<Self>, id: ManifestId) -> Option<TransferHandle> {
        let store = self.store.clone()?;
        let bytes = store.get_manifest(&id).ok()?;
        let signed = SignedManifest::decode_expecting(id, &bytes).ok()?;
        let local = held(&store, &signed);
        let backend = Backend::Store { store, batch: None, pending: Vec::new() };
        transfer::spawn(self.spec(signed, backend, local), self.shared.clone(), None).ok()
    }

    async fn pull_through(self: &Arc<Self>, id: ManifestId) -> Option<TransferHandle> {
        let store = self.store.clone()?;
        let signed = match store.get_manifest(&id) {
            Ok(bytes) => SignedManifest::decode_expecting(id, &bytes).ok()?,
            Err(_) => {
                let origin = self.origin.as_ref()?;
                let base = origin.lock().await.config.api.clone();
                let signed = crate::store_api::fetch_manifest(&self.http, &base, id).await.ok()?;
                if let Err(err) = signed.verify(&self.trusted) {
                    warn!(manifest = %id, %err, "origin served a manifest no trusted key signed");
                    return None;
                }
                let store2 = store.clone();
                let bytes = signed.encode();
                tokio::task::spawn_blocking(move || store2.put_manifest(&id, &bytes))
                    .await
                    .ok()?
                    .ok()?;
                signed
            }
        };
        if signed.verify(&self.trusted).is_err() {
            return None;
        }
        let local = held(&store, &signed);
        let complete = local.is_full();
        let backend = Backend::Store { store, batch: None, pending: Vec::new() };
        let handle =
            transfer::spawn(self.spec(signed, backend, local), self.shared.clone(), None).ok()?;
        if !complete {
            // Pull the rest through from the origin, reconnecting while it is incomplete.
            let inner = Arc::clone(self);
            let h = handle.clone();
            tokio::spawn(
                async move { inner.keep_source(h, true).await }
                    .instrument(info_span!("pull", manifest = %&id.to_hex()[..16])),
            );
        }
        Some(handle)
    }

    fn seed_staged(self: &Arc<Self>, id: ManifestId) -> Option<TransferHandle> {
        let area = self.area.clone()?;
        let entry = area.status_of(&id).ok()??;
        if entry.status != StageStatus::Staged {
            return None;
        }
        let signed = area.signed_manifest(&id).ok()??;
        let local = Bitfield::full(entry.total.chunks as u32);
        transfer::spawn(self.spec(signed, Backend::Staged(area), local), self.shared.clone(), None)
            .ok()
    }

    /// Keeps a connection to a source (the first cache that answers, else the origin) while the
    /// transfer is incomplete. `origin_only`: a cache, which pulls from the origin.
    ///
    /// Which source to dial is [`upstream::Upstreams`]' decision: one that cannot be reached
    /// or that closes the connection at once (a full cache) is backed off and the next one is
    /// dialed in the same round, so a refused host neither redials the cache that refused it
    /// every round nor waits for it while the origin would serve it.
    async fn keep_source(self: Arc<Self>, handle: TransferHandle, origin_only: bool) {
        const ROUND: Duration = Duration::from_millis(250);
        let mut sources: Vec<(&AsyncMutex<Resolved>, PeerKind)> = Vec::new();
        if !origin_only {
            sources.extend(self.caches.iter().map(|c| (c, PeerKind::Cache)));
        }
        sources.extend(self.origin.iter().map(|o| (o, PeerKind::Origin)));
        let mut upstreams = upstream::Upstreams::new(sources.len(), Default::default());
        let epoch = tokio::time::Instant::now();
        let now = || epoch.elapsed();
        // The source connected in the last round, if any.
        let mut current: Option<usize> = None;
        loop {
            if handle.is_stopped() || self.shared.shutdown.is_cancelled() {
                return;
            }
            let Some(snapshot) = handle.snapshot().await else { return };
            if snapshot.complete {
                return;
            }
            let connected = snapshot.peers.iter().any(|(_, k)| k == "cache" || k == "origin");
            let mut wait = ROUND;
            if !connected {
                if let Some(lost) = current.take() {
                    if upstreams.handle_lost(lost, now()) {
                        debug!(source = lost, "source closed the connection at once; next one");
                    }
                }
                let mut from = 0;
                while let Some(i) = upstreams.next(now(), from) {
                    let (upstream, kind) = sources[i];
                    if self.dial_upstream(&handle, upstream, kind).await {
                        upstreams.handle_connected(i, now());
                        current = Some(i);
                        break;
                    }
                    upstreams.handle_unreachable(i, now());
                    from = i + 1;
                }
                if current.is_none() {
                    // Every source is backed off: sleep until the first may be dialed again.
                    let retry = upstreams.next_retry().unwrap_or(now() + ROUND);
                    wait = retry.saturating_sub(now()).max(ROUND);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = handle.stopped() => return,
            }
        }
    }

    async fn dial_upstream(
        &self,
        handle: &TransferHandle,
        upstream: &AsyncMutex<Resolved>,
        kind: PeerKind,
    ) -> bool {
        let mut resolved = upstream.lock().await;
        let Some(info) = fetch_info(&self.http, &mut resolved, &self.shared.metrics).await else {
            return false;
        };
        let identity = resolved.identity;
        drop(resolved);
        match transfer::dial(&self.endpoint, handle, info.chunks, identity, kind).await {
            Ok(()) => true,
            Err(err) => {
                if err.is_wrong_identity() {
                    self.shared.metrics.refused();
                }
                warn!(upstream = %info.chunks, %err, "cannot connect to upstream");
                false
            }
        }
    }

    /// Host: finds region peers staging the same manifest and dials a bounded random set.
    async fn keep_peers(self: Arc<Self>, handle: TransferHandle) {
        let namespace = handle.id.to_hex();
        if let Err(err) = self.discovery.register(&namespace).await {
            warn!(%err, "cannot register at the rendezvous; staging from sources only");
        }
        let me = self.keypair.public().to_peer_id();
        let mut refused: std::collections::HashSet<Identity> = Default::default();
        loop {
            if handle.is_stopped() || self.shared.shutdown.is_cancelled() {
                break;
            }
            let Some(snapshot) = handle.snapshot().await else { break };
            if !snapshot.complete {
                let connected: std::collections::HashSet<String> =
                    snapshot.peers.iter().map(|(p, _)| p.clone()).collect();
                let hosts = snapshot.peers.iter().filter(|(_, k)| k == "host").count();
                let want = self.config.swarm.max_peers.saturating_sub(hosts);
                if want > 0 {
                    match self.discovery.discover(&namespace, 1000).await {
                        Ok(mut found) => {
                            found.retain(|p| {
                                p.peer_id != me
                                    && !refused.contains(&p.peer_id)
                                    && !connected.contains(&p.peer_id.to_string())
                            });
                            found.shuffle(&mut rand::thread_rng());
                            found.truncate(want);
                            for peer in found {
                                let r = transfer::dial(
                                    &self.endpoint,
                                    &handle,
                                    peer.chunk_addr,
                                    peer.peer_id,
                                    PeerKind::Peer,
                                )
                                .await;
                                if let Err(err) = r {
                                    debug!(peer = %peer.peer_id, %err, "cannot connect to peer");
                                    if err.is_wrong_identity() {
                                        self.shared.metrics.refused();
                                        refused.insert(peer.peer_id);
                                    }
                                }
                            }
                        }
                        Err(err) => debug!(%err, "discovery failed"),
                    }
                }
            }
            let every = if snapshot.complete {
                self.config.swarm.discover_every * 5
            } else {
                self.config.swarm.discover_every
            };
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = handle.stopped() => break,
            }
        }
        self.discovery.unregister(&namespace).await;
    }

    /// Host: starts (or resumes) staging `id`.
    async fn stage(self: &Arc<Self>, id: ManifestId) -> Result<&'static str, ApiError> {
        let area = self.area.clone().ok_or(ApiError::new(
            StatusCode::BAD_REQUEST,
            "not_a_host",
            "only hosts stage manifests",
        ))?;
        if self.transfers.lock().await.get(&id).is_some_and(|h| !h.is_stopped()) {
            return Ok("already staging or staged");
        }
        // Not under the transfers lock: fetching the manifest and gathering the chunks already
        // on disk can take a while, and status and incoming connections must not wait. A
        // concurrent request for the same manifest finds its job claimed (`Busy`).
        let signed = match area.signed_manifest(&id).map_err(ApiError::internal)? {
            Some(signed) => signed,
            None => self.fetch_manifest(id).await?,
        };
        let trusted = self.trusted.clone();
        let area2 = area.clone();
        let job = tokio::task::spawn_blocking(move || area2.begin(&signed, &trusted))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|err| match err {
                StageError::Untrusted { .. } => {
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "untrusted_manifest", err)
                }
                StageError::InvalidManifest { .. } => {
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_manifest", err)
                }
                StageError::Busy { .. } => {
                    ApiError::new(StatusCode::CONFLICT, "busy", "already being staged")
                }
                other => ApiError::internal(other),
            })?;
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        let local = job.local().clone();
        let signed = area
            .signed_manifest(&id)
            .map_err(ApiError::internal)?
            .ok_or_else(|| ApiError::internal("manifest vanished from the stage area"))?;
        let finish_area = area.clone();
        let inner = Arc::clone(self);
        let on_complete: transfer::OnComplete = Box::new(move |job| {
            let id = job.id();
            match job.finish() {
                Ok(finished) => {
                    info!(manifest = %id, release = %finished.release.path.display(), "staged");
                    if let Err(err) = finished.gc {
                        warn!(%err, "garbage collection failed; retried at the next staging");
                    }
                    Some(Backend::Staged(finish_area))
                }
                Err(err) => {
                    warn!(manifest = %id, %err, "staging failed");
                    inner
                        .failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id, err.to_string());
                    None
                }
            }
        });
        self.shared.metrics.transfer_started();
        let spec = self.spec(signed, Backend::Staging(Box::new(job)), local);
        let handle = transfer::spawn(spec, self.shared.clone(), Some(on_complete))
            .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_manifest", e))?;
        self.transfers.lock().await.insert(id, handle.clone());
        let span = info_span!("stage", manifest = %&id.to_hex()[..16]);
        tokio::spawn(Arc::clone(self).keep_source(handle.clone(), false).instrument(span.clone()));
        tokio::spawn(Arc::clone(self).keep_peers(handle).instrument(span));
        Ok("staging")
    }

    /// Fetches a signed manifest from the caches in order, then the origin.
    async fn fetch_manifest(&self, id: ManifestId) -> Result<SignedManifest, ApiError> {
        let mut last = String::from("no cache or origin configured");
        for upstream in self.caches.iter().chain(self.origin.iter()) {
            let base = upstream.lock().await.config.api.clone();
            match crate::store_api::fetch_manifest(&self.http, &base, id).await {
                Ok(signed) => return Ok(signed),
                Err(err) => last = format!("{base}: {err}"),
            }
        }
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "manifest_unavailable",
            format!("manifest {id} cannot be fetched: {last}"),
        ))
    }

    async fn status(&self) -> Status {
        let handles: Vec<(ManifestId, TransferHandle)> =
            self.transfers.lock().await.iter().map(|(k, v)| (*k, v.clone())).collect();
        let mut snapshots = HashMap::new();
        for (id, handle) in handles {
            if let Some(s) = handle.snapshot().await {
                snapshots.insert(id, s);
            }
        }
        let mut manifests = Vec::new();
        if let Some(area) = &self.area {
            let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for entry in area.status().unwrap_or_default() {
                let status = match &entry.status {
                    StageStatus::Staging => "staging",
                    StageStatus::Staged => "staged",
                    StageStatus::Failed { .. } => "failed",
                };
                let error = match &entry.status {
                    StageStatus::Failed { reason } => Some(format!("{reason:?}")),
                    _ => failures.get(&entry.id).cloned(),
                };
                manifests.push(ManifestStatus {
                    id: entry.id.to_hex(),
                    service: entry.service,
                    version: entry.version,
                    status: status.into(),
                    error,
                    release: entry.release,
                    transfer: snapshots.remove(&entry.id),
                });
            }
        }
        for (id, snapshot) in snapshots {
            manifests.push(ManifestStatus {
                id: id.to_hex(),
                service: String::new(),
                version: String::new(),
                status: "serving".into(),
                error: None,
                release: None,
                transfer: Some(snapshot),
            });
        }
        let services = self
            .activator
            .iter()
            .flat_map(|a| a.states())
            .map(|(service, state)| ServiceStatus { service, state })
            .collect();
        Status {
            info: self.info.clone(),
            totals: self.shared.metrics.totals(),
            manifests,
            services,
        }
    }
}

/// Which chunks of `signed` the store holds.
fn held(store: &ChunkStore, signed: &SignedManifest) -> Bitfield {
    let chunks = &signed.manifest().chunks;
    let mut bits = Bitfield::new(chunks.len() as u32);
    for (i, c) in chunks.iter().enumerate() {
        if store.has(&c.hash) {
            bits.insert(i as u32);
        }
    }
    bits
}

/// Accepts chunk connections: authenticates, reads the Hello, hands the connection to the
/// manifest's transfer (or refuses it with `UNKNOWN_MANIFEST`).
async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        let inner = Arc::clone(&inner);
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            let conn = match incoming.accept().await {
                Ok(conn) => conn,
                Err(err) => {
                    inner.shared.metrics.refused();
                    info!(%addr, %err, "refused a connection");
                    return;
                }
            };
            let span = info_span!("incoming", peer = %conn.remote_peer_id());
            async move {
                let hello = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&conn)).await;
                let (send, recv, frame, rest) = match hello {
                    Ok(Ok(parts)) => parts,
                    Ok(Err(code)) => {
                        conn.close(code.into(), b"bad hello");
                        return;
                    }
                    Err(_) => {
                        conn.close(ErrorCode::PROTOCOL_VIOLATION.into(), b"no hello");
                        return;
                    }
                };
                let Frame::Hello(hello) = &frame else {
                    conn.close(ErrorCode::PROTOCOL_VIOLATION.into(), b"hello expected");
                    return;
                };
                let Some(handle) = inner.transfer_for(hello.manifest).await else {
                    debug!(manifest = %hello.manifest, "asked for a manifest not served here");
                    conn.close(ErrorCode::UNKNOWN_MANIFEST.into(), b"unknown manifest");
                    return;
                };
                let expect_role = inner.role_of(conn.remote_peer_id()).await;
                let claims_cache = hello.role == PeerKind::Cache;
                if inner.config.role == Role::Origin && !claims_cache {
                    // The fleet-wide cap on hosts fetching from the origin: a permit per host
                    // connection, given back when the connection closes.
                    let Ok(permit) = Arc::clone(&inner.origin_hosts).try_acquire_owned() else {
                        debug!("origin host cap reached; refusing");
                        conn.close(ErrorCode::TOO_MANY_PEERS.into(), b"origin busy");
                        return;
                    };
                    let watched = conn.clone();
                    tokio::spawn(async move {
                        watched.closed().await;
                        drop(permit);
                    });
                }
                let attach = Attach { conn, send, recv, hello: Some((frame, rest)), expect_role };
                handle.attach(attach).await;
            }
            .instrument(span)
            .await;
        });
    }
}

type HelloParts = (crate::transport::SendStream, crate::transport::RecvStream, Frame, BytesMut);

async fn read_hello(conn: &crate::transport::Connection) -> Result<HelloParts, ErrorCode> {
    let (send, mut recv) = conn.accept_bi().await.map_err(|_| ErrorCode::NO_ERROR)?;
    let mut buf = BytesMut::new();
    loop {
        match Frame::decode(&mut buf) {
            Ok(Some(frame)) => return Ok((send, recv, frame, buf)),
            Ok(None) => {}
            Err(err) => return Err(err.code()),
        }
        match recv.read_chunk(crate::protocol::MAX_CONTROL_FRAME, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) | Err(_) => return Err(ErrorCode::PROTOCOL_VIOLATION),
        }
    }
}

/// An API error: a status and a JSON body `{"code", "message"}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl std::fmt::Display) -> Self {
        Self { status, code, message: message.to_string() }
    }

    fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.code, "message": self.message });
        (self.status, Json(body)).into_response()
    }
}

/// Body of `POST /v1/admin/stage`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StageRequest {
    /// The manifest id (64 hex digits).
    pub manifest: String,
}

fn api_router(inner: Arc<Inner>) -> Result<Router, DaemonError> {
    let mut router = Router::new()
        .route("/v1/info", get(|State(i): State<Arc<Inner>>| async move { Json(i.info.clone()) }))
        .route(
            "/v1/status",
            get(|State(i): State<Arc<Inner>>| async move { Json(i.status().await) }),
        )
        .route(
            "/metrics",
            get(|State(i): State<Arc<Inner>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    i.shared.metrics.encode(),
                )
            }),
        );
    if inner.config.role == Role::Host {
        router = router
            .route("/v1/admin/stage", post(stage_handler))
            .route("/v1/admin/activate", post(activate_handler))
            .route("/v1/admin/rollback", post(rollback_handler))
            .route("/v1/services/{service}/metrics", post(service_metrics_handler));
    }
    let mut router = router.with_state(Arc::clone(&inner));
    if let Some(store) = &inner.store {
        let token = match &inner.config.upload_token_file {
            Some(path) => Some(crate::store_api::read_token_file(path)?),
            None => None,
        };
        let upstream = match inner.config.role {
            Role::Cache => inner.config.origin.as_ref().map(|o| o.api.clone()),
            _ => None,
        };
        let api = crate::store_api::StoreApi::new(store.clone())
            .with_upload_token(if inner.config.role == Role::Origin { token } else { None })
            .with_trusted(if inner.trusted.is_empty() { None } else { Some(inner.trusted.clone()) })
            .with_upstream(upstream)
            .read_only(inner.config.role != Role::Origin);
        router = router.merge(crate::store_api::router(api));
    }
    Ok(router)
}

async fn stage_handler(
    State(inner): State<Arc<Inner>>,
    Json(req): Json<StageRequest>,
) -> Result<Response, ApiError> {
    let id = parse_manifest_id(&req.manifest)?;
    let state = inner.stage(id).await?;
    let body = serde_json::json!({ "id": id.to_hex(), "state": state });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Body of `POST /v1/admin/activate`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ActivateRequest {
    /// The service.
    pub service: String,
    /// The staged manifest to make active (64 hex digits).
    pub manifest: String,
}

/// Body of `POST /v1/admin/rollback`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// The service.
    pub service: String,
}

fn activation_error(err: crate::activate::ActivateError) -> ApiError {
    use crate::activate::ActivateError as E;
    match err {
        E::NotStaged { .. } => ApiError::new(StatusCode::CONFLICT, "not_staged", err),
        E::WrongService { .. } => ApiError::new(StatusCode::BAD_REQUEST, "wrong_service", err),
        E::Busy { .. } => ApiError::new(StatusCode::CONFLICT, "busy", err),
        E::NothingToRollBack { .. } => {
            ApiError::new(StatusCode::CONFLICT, "nothing_to_roll_back", err)
        }
        E::HooksFile { .. } => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_hooks", err),
        other => ApiError::internal(other),
    }
}

/// The host's activator, run in a task of its own: activation outlives a dropped request, so a
/// client that gives up does not kill a hook half way.
async fn with_activator<F, Fut>(inner: &Inner, f: F) -> Result<Response, ApiError>
where
    F: FnOnce(crate::activate::Activator) -> Fut,
    Fut: std::future::Future<
            Output = Result<crate::activate::Outcome, crate::activate::ActivateError>,
        > + Send
        + 'static,
{
    let activator = inner.activator.clone().ok_or(ApiError::new(
        StatusCode::BAD_REQUEST,
        "not_a_host",
        "only hosts activate and roll back releases",
    ))?;
    let outcome =
        tokio::spawn(f(activator)).await.map_err(ApiError::internal)?.map_err(activation_error)?;
    Ok(Json(outcome).into_response())
}

/// Activates a staged release; answers with the outcome (200 whether the hooks passed or the
/// previous release was switched back: the outcome says which).
async fn activate_handler(
    State(inner): State<Arc<Inner>>,
    Json(req): Json<ActivateRequest>,
) -> Result<Response, ApiError> {
    let id = parse_manifest_id(&req.manifest)?;
    with_activator(&inner, move |a| async move { a.activate(&req.service, id, None).await }).await
}

async fn rollback_handler(
    State(inner): State<Arc<Inner>>,
    Json(req): Json<RollbackRequest>,
) -> Result<Response, ApiError> {
    with_activator(&inner, move |a| async move { a.rollback(&req.service).await }).await
}

async fn service_metrics_handler(
    State(inner): State<Arc<Inner>>,
    axum::extract::Path(service): axum::extract::Path<String>,
    Json(m): Json<ServiceMetrics>,
) -> Result<Response, ApiError> {
    if fleetwave_chunker::manifest::validate_name(&service).is_err() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_service", "not a service name"));
    }
    if m.errors > m.requests || m.latency_buckets.len() > MAX_REPORTED_BUCKETS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_metrics",
            "errors exceed requests, or more than 257 latency buckets",
        ));
    }
    let mut all = inner.service_metrics.lock().unwrap_or_else(|p| p.into_inner());
    if all.len() >= 256 && !all.contains_key(&service) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_service", "too many services"));
    }
    all.insert(service, m);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Most latency buckets a host reports per service (what the coordinator accepts: 256 bounds
/// and `+Inf`).
const MAX_REPORTED_BUCKETS: usize = 257;

/// Reads one service's metrics page every `entry.every` into its counters, until shutdown.
/// A failed read keeps the last counters (the coordinator sees no progress, never a drop)
/// and is logged when the state changes, not at every attempt.
async fn scrape_loop(inner: Arc<Inner>, entry: ScrapeSection, shutdown: CancellationToken) {
    let selector = |s: &str| crate::scrape::Selector::parse(s);
    // Validated with the configuration.
    let scrape = match (
        selector(&entry.requests),
        selector(&entry.errors),
        entry.latency.as_deref().map(selector).transpose(),
    ) {
        (Ok(requests), Ok(errors), Ok(latency)) => {
            crate::scrape::Scrape { requests, errors, latency }
        }
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            warn!(service = %entry.service, error = %e, "scrape disabled");
            return;
        }
    };
    let mut ticker = tokio::time::interval(entry.every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let timeout = entry.every.min(Duration::from_secs(5));
        let result = fetch_page(&inner.http, &entry.url, timeout)
            .await
            .and_then(|page| scrape.read(&page).map_err(|e| e.to_string()));
        inner.shared.metrics.scraped(result.is_ok());
        match result {
            Ok(reading) => {
                if failing {
                    info!(service = %entry.service, url = %entry.url, "scrape recovered");
                    failing = false;
                }
                let mut latency_buckets = reading.latency_buckets;
                if latency_buckets.len() > MAX_REPORTED_BUCKETS {
                    latency_buckets.clear();
                }
                let m = ServiceMetrics {
                    requests: reading.requests,
                    errors: reading.errors,
                    latency_buckets,
                };
                let mut all = inner.service_metrics.lock().unwrap_or_else(|p| p.into_inner());
                all.insert(entry.service.clone(), m);
            }
            Err(error) => {
                if !failing {
                    warn!(service = %entry.service, url = %entry.url, %error, "scrape failed");
                    failing = true;
                }
            }
        }
    }
}

/// GETs a metrics page, at most [`crate::scrape::MAX_PAGE`] bytes.
async fn fetch_page(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<String, String> {
    let mut response = http
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| format!("GET {url}: {e}"))?;
    let mut page = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("GET {url}: {e}"))? {
        if page.len() + chunk.len() > crate::scrape::MAX_PAGE {
            return Err(format!("GET {url}: the page is larger than 8 MiB"));
        }
        page.extend_from_slice(&chunk);
    }
    String::from_utf8(page).map_err(|_| format!("GET {url}: the page is not UTF-8"))
}

fn parse_manifest_id(text: &str) -> Result<ManifestId, ApiError> {
    text.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_manifest_id",
            format!("{text:?} is not a manifest id (64 hex digits)"),
        )
    })
}
