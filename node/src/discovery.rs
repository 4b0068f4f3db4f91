//! Peer discovery: the libp2p rendezvous protocol, run as a tokio actor.
//!
//! # Participants
//!
//! - A **rendezvous point** is a daemon with [`DiscoveryConfig::server`] set: a region's cache,
//!   or the origin where a region has no cache. It stores registrations and answers discover
//!   requests; it never dials anyone.
//! - A **host** has [`DiscoveryConfig::points`]: the PeerIds and TCP addresses of its region's
//!   points. It dials each of them at start, stays connected, and redials with exponential
//!   back-off ([`REDIAL_MIN`] to [`REDIAL_MAX`]) whenever a connection closes or a dial fails.
//!
//! A daemon can be both: [`DiscoveryConfig::server`] and [`DiscoveryConfig::points`] are
//! independent (the origin is a server with no points).
//!
//! # Messages
//!
//! The libp2p swarm runs on TCP + noise + yamux (never QUIC, so it cannot collide with the chunk
//! endpoint's UDP socket, [`crate::transport`]). Over it the [rendezvous protocol] carries:
//!
//! - **REGISTER** `(namespace, signed peer record, ttl)`. The namespace is a manifest id in hex;
//!   the peer record, signed by the host's own identity key, lists exactly one address: the
//!   host's chunk endpoint as `/ip4/A/udp/P/quic-v1` (or `/ip6/..`). The point refuses a record
//!   that is not signed by the connection's own PeerId, so a registration can only ever speak
//!   for the host that made it.
//! - **DISCOVER** `(namespace, limit)` returns at most `limit` registrations of the namespace.
//!   Each is verified (signature and signer) as it is decoded, so a discoverer gets
//!   [`DiscoveredPeer`]s, pairs of PeerId and chunk address vouched for by the peer itself, and
//!   later dials the chunk endpoint expecting exactly that PeerId ([`crate::transport`]).
//! - **UNREGISTER** `(namespace)`, which the protocol never acknowledges.
//!
//! # What the actor guarantees
//!
//! - [`Discovery::register`] makes a namespace *wanted*: it is registered at every point the
//!   actor is connected to, re-registered on every reconnect, and refreshed at half of the TTL
//!   the point granted, until [`Discovery::unregister`]. The call itself returns once one point
//!   has accepted the registration.
//! - [`Discovery::discover`] asks every connected point, merges the answers, drops ourselves,
//!   registrations without a usable chunk address, and duplicates, and returns a random subset
//!   of at most `limit` (capped at [`MAX_DISCOVER_LIMIT`]) peers. A point that fails is skipped;
//!   the call fails only if none answered.
//! - [`Discovery::unregister`] withdraws a namespace and then sends each connected point a
//!   small DISCOVER on the same connection as a barrier, returning when the barrier is answered.
//!   Requests on one connection are processed in order in practice (not by contract: the
//!   protocol has no acknowledgement), so once it returns, other hosts no longer see us there.
//!
//! # Limits and failures
//!
//! Every wait is bounded: a call waits at most [`CONNECT_WAIT`] for a connection to some point
//! ([`DiscoveryError::NoRendezvous`] after that) and then at most [`ANSWER_WAIT`] for answers
//! ([`DiscoveryError::Timeout`]). A daemon keeps at most [`MAX_NAMESPACES`] namespaces
//! registered, and a point stores at most [`MAX_NAMESPACES`] registrations per peer and
//! [`MAX_REGISTRATIONS`] in all. Registrations that are not refreshed expire at the point after
//! their TTL ([`MIN_TTL`] to [`MAX_TTL`], default [`DEFAULT_TTL`]): that is how a host that
//! vanished without unregistering leaves the swarm.
//!
//! A point that vanishes without closing its connection (power loss, partition) is noticed only
//! when TCP gives up on the connection: until then calls fail with [`DiscoveryError::Timeout`]
//! and registration is retried on the old connection. (libp2p's ping, which would notice within
//! seconds, is not among the node's libp2p features.)
//!
//! Points are trusted infrastructure: libp2p's rendezvous client panics on a response of the
//! wrong message type, which would stop this actor (every call then fails with
//! [`DiscoveryError::Closed`]).
//!
//! [rendezvous protocol]: https://github.com/libp2p/specs/blob/master/rendezvous/README.md

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::Duration;

use libp2p::futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::rendezvous::{self, Cookie, ErrorCode, Namespace, Registration};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, Swarm, TransportError, noise, tcp, yamux};
use libp2p_identity::{Keypair, PeerId};
use rand::seq::SliceRandom;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout_at};
use tracing::{Instrument, debug, info, info_span, warn};

/// Default registration TTL. Short enough that a host that vanished without unregistering is
/// handed out for at most two minutes; long enough that refreshing (at half of it) costs a point
/// with 20,000 hosts per manifest about 330 small requests a second.
pub const DEFAULT_TTL: Duration = Duration::from_secs(120);

/// Shortest TTL a point accepts and [`Discovery::spawn`] allows. libp2p's own default minimum is
/// two hours, far too long for hosts that come and go with deployments.
pub const MIN_TTL: Duration = Duration::from_secs(10);

/// Longest TTL a point accepts and [`Discovery::spawn`] allows.
pub const MAX_TTL: Duration = Duration::from_secs(60 * 60);

/// Most peers one [`Discovery::discover`] call returns (and asks each point for), whatever the
/// caller's `limit`: a swarm needs a few dozen peers, and 1,000 registrations are about 200 KB,
/// well inside libp2p's 1 MiB message cap.
pub const MAX_DISCOVER_LIMIT: u32 = 1000;

/// Most namespaces (manifests being staged or served) one daemon keeps registered, and most
/// registrations a point stores per peer (libp2p's default is 32).
pub const MAX_NAMESPACES: usize = 64;

/// Most registrations a point stores in all: a region of 20,000 hosts with up to ten manifests
/// in flight each, at a few hundred bytes a registration (libp2p's default is 10,000).
pub const MAX_REGISTRATIONS: usize = 200_000;

/// How long a call waits for a connection to at least one point before it fails with
/// [`DiscoveryError::NoRendezvous`].
pub const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// How long a call waits for the points it asked to answer. libp2p's request-response times a
/// request out after 10 s (not configurable through the rendezvous client); this is a backstop
/// just above it.
pub const ANSWER_WAIT: Duration = Duration::from_secs(12);

/// First redial delay after a connection to a point closed or a dial failed.
pub const REDIAL_MIN: Duration = Duration::from_millis(500);

/// Longest redial delay; the delay doubles after every failed dial up to this.
pub const REDIAL_MAX: Duration = Duration::from_secs(30);

/// Retry delay after a point could not take a registration (connection trouble, full).
const RETRY_UNAVAILABLE: Duration = Duration::from_secs(5);

/// Retry delay after a point refused a registration outright (TTL, namespace, signature): such
/// a refusal is a configuration mismatch and will not heal in seconds.
const RETRY_REFUSED: Duration = Duration::from_secs(60);

/// How long an idle libp2p connection stays open. Hosts refresh well inside it, so a host's
/// connection to its point stays up for as long as it has a registration; a discover-only host
/// reconnects on its next call after an hour of silence.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Discover cookies a point remembers. Fleetwave never sends cookies back, and libp2p walks
/// every stored cookie on every registration expiry (default 10,000 of them), so keep few.
const MAX_STORED_COOKIES: usize = 16;

/// Limit of the barrier DISCOVER sent after an UNREGISTER: its answer, not its content, counts.
const BARRIER_LIMIT: usize = 1;

/// How long [`Discovery::shutdown`] waits for the points to take our unregistrations.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Commands queued to the actor before callers wait.
const INBOX_CAPACITY: usize = 64;

/// How long [`Discovery::spawn`] waits for the listener to report its address.
const LISTEN_WAIT: Duration = Duration::from_secs(5);

/// Configuration of one daemon's discovery actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// TCP address the libp2p swarm listens on (`127.0.0.1:0` in tests).
    pub listen: SocketAddr,
    /// Serve the rendezvous protocol (origin and cache roles).
    pub server: bool,
    /// Rendezvous points to register at and discover from (host role).
    pub points: Vec<RendezvousPoint>,
    /// This daemon's chunk endpoint address, advertised in its signed peer record. It must name
    /// a specific IP and port (not `0.0.0.0`, not port 0) when [`DiscoveryConfig::points`] is
    /// not empty: peers dial exactly this address.
    pub chunk_addr: SocketAddr,
    /// Registration TTL (default [`DEFAULT_TTL`], [`MIN_TTL`] to [`MAX_TTL`], whole seconds);
    /// registrations are refreshed at half the TTL the point granted.
    pub ttl: Duration,
}

impl DiscoveryConfig {
    /// A host or point configuration listening on `listen` and advertising `chunk_addr`, with
    /// no points, no server and the default TTL.
    pub fn new(listen: SocketAddr, chunk_addr: SocketAddr) -> Self {
        Self { listen, server: false, points: Vec::new(), chunk_addr, ttl: DEFAULT_TTL }
    }
}

/// A rendezvous point a host registers at and discovers from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RendezvousPoint {
    /// The point's identity; the noise handshake must prove it, or the connection fails.
    pub peer_id: PeerId,
    /// The point's libp2p TCP address ([`Discovery::local_addr`] on the point).
    pub addr: SocketAddr,
}

/// A peer registered in a namespace, as its own signed peer record describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DiscoveredPeer {
    /// The peer's identity: its chunk endpoint must prove exactly this one.
    pub peer_id: PeerId,
    /// The peer's chunk endpoint (QUIC over UDP).
    pub chunk_addr: SocketAddr,
}

/// Why a discovery operation failed.
#[derive(Debug, Error)]
pub enum DiscoveryError {
    /// The libp2p listener could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address from [`DiscoveryConfig::listen`].
        addr: SocketAddr,
        /// What the operating system (or libp2p) said.
        #[source]
        source: io::Error,
    },
    /// The swarm's noise configuration could not be built from the identity key.
    #[error("cannot set up the libp2p transport")]
    Transport(#[source] noise::Error),
    /// [`DiscoveryConfig::chunk_addr`] cannot be advertised: unspecified IP or port 0.
    #[error("chunk endpoint address {addr} cannot be advertised to peers")]
    InvalidChunkAddr {
        /// The offending address.
        addr: SocketAddr,
    },
    /// [`DiscoveryConfig::ttl`] is outside [`MIN_TTL`]..=[`MAX_TTL`].
    #[error("registration TTL {ttl:?} is outside {MIN_TTL:?}..={MAX_TTL:?}")]
    InvalidTtl {
        /// The configured TTL.
        ttl: Duration,
    },
    /// A namespace is empty or longer than the protocol allows.
    #[error("namespace of {len} bytes is empty or longer than {max}")]
    InvalidNamespace {
        /// Its length in bytes.
        len: usize,
        /// The protocol's maximum.
        max: usize,
    },
    /// [`MAX_NAMESPACES`] namespaces are registered already.
    #[error("already {max} namespaces registered")]
    TooManyNamespaces {
        /// The limit.
        max: usize,
    },
    /// No rendezvous point is configured, or none was reachable within [`CONNECT_WAIT`] (or all
    /// dropped their connection before answering).
    #[error("no rendezvous point reachable")]
    NoRendezvous,
    /// Every point that answered refused the request.
    #[error("rendezvous point {point} refused the request: {code:?}")]
    Rejected {
        /// One of the refusing points.
        point: PeerId,
        /// Its reason.
        code: ErrorCode,
    },
    /// Points were connected but none answered within [`ANSWER_WAIT`].
    #[error("no rendezvous point answered in time")]
    Timeout,
    /// The namespace was unregistered before any point accepted it.
    #[error("namespace {namespace} was unregistered before any point accepted it")]
    Cancelled {
        /// The namespace.
        namespace: String,
    },
    /// The actor has stopped ([`Discovery::shutdown`], or it panicked).
    #[error("the discovery actor has stopped")]
    Closed,
}

/// A handle to a running discovery actor; clones share the actor.
#[derive(Debug, Clone)]
pub struct Discovery {
    inbox: mpsc::Sender<Command>,
    local_addr: SocketAddr,
    local_peer_id: PeerId,
}

impl Discovery {
    /// Validates `config`, binds the libp2p listener, starts dialing the configured points and
    /// returns once the listener is bound. The actor runs until [`Discovery::shutdown`] or until
    /// every handle is dropped.
    pub async fn spawn(keypair: Keypair, config: DiscoveryConfig) -> Result<Self, DiscoveryError> {
        validate(&config)?;
        probe_listen(config.listen)?;
        let local_peer_id = keypair.public().to_peer_id();

        let server = config.server.then(|| {
            let limits = rendezvous::server::Config::default()
                .with_min_ttl(MIN_TTL.as_secs())
                .with_max_ttl(MAX_TTL.as_secs())
                .with_max_registration_per_peer(MAX_NAMESPACES)
                .with_max_registration_total(MAX_REGISTRATIONS)
                .with_max_stored_cookies(MAX_STORED_COOKIES);
            rendezvous::server::Behaviour::new(limits)
        });
        let behaviour = Behaviour {
            client: rendezvous::client::Behaviour::new(keypair.clone()),
            server: Toggle::from(server),
        };
        let Ok(builder) = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
            .map_err(DiscoveryError::Transport)?
            .with_behaviour(|_| behaviour);
        let mut swarm =
            builder.with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_TIMEOUT)).build();

        swarm.listen_on(tcp_multiaddr(config.listen)).map_err(|error| DiscoveryError::Listen {
            addr: config.listen,
            source: match error {
                TransportError::Other(source) => source,
                TransportError::MultiaddrNotSupported(_) => io::ErrorKind::InvalidInput.into(),
            },
        })?;
        let local_addr = wait_listening(&mut swarm, config.listen).await?;
        // The only external address: the signed peer record then names the chunk endpoint and
        // nothing else (no identify or autonat runs to confirm others).
        swarm.add_external_address(quic_multiaddr(config.chunk_addr));

        let span = info_span!("discovery", peer = %local_peer_id, listen = %local_addr);
        let (inbox, commands) = mpsc::channel(INBOX_CAPACITY);
        let mut actor = Actor::new(swarm, local_peer_id, &config, commands);
        span.in_scope(|| actor.start(Instant::now()));
        tokio::spawn(actor.run().instrument(span));
        Ok(Self { inbox, local_addr, local_peer_id })
    }

    /// The bound TCP address of the libp2p listener: the address hosts configure for this
    /// daemon as a [`RendezvousPoint`].
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// This daemon's identity.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// Keeps this daemon registered under `namespace` at every point until
    /// [`Discovery::unregister`]: re-registered on every reconnect and refreshed before its TTL
    /// runs out. Returns once some point accepted the registration.
    ///
    /// An error other than [`DiscoveryError::InvalidNamespace`],
    /// [`DiscoveryError::TooManyNamespaces`], [`DiscoveryError::NoRendezvous`] with no point
    /// configured, [`DiscoveryError::Cancelled`] and [`DiscoveryError::Closed`] leaves the
    /// namespace wanted: the actor keeps trying, as it would after a reconnect.
    pub async fn register(&self, namespace: &str) -> Result<(), DiscoveryError> {
        let namespace = parse_namespace(namespace)?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::Register { namespace, reply }).await?;
        answer.await.map_err(|_| DiscoveryError::Closed)?
    }

    /// Stops registering under `namespace`, tells every connected point, and returns once they
    /// have answered a request sent after the withdrawal (or after [`ANSWER_WAIT`]). Points
    /// this daemon is not connected to forget the registration when its TTL runs out.
    pub async fn unregister(&self, namespace: &str) {
        let Ok(namespace) = parse_namespace(namespace) else {
            return; // never registered: it could not have been
        };
        let (reply, answer) = oneshot::channel();
        if self.send(Command::Unregister { namespace, reply }).await.is_ok() {
            let _ = answer.await;
        }
    }

    /// Up to `limit` (at most [`MAX_DISCOVER_LIMIT`]) peers registered under `namespace` at the
    /// connected points, in random order, without ourselves and without duplicates. Waits up to
    /// [`CONNECT_WAIT`] for a first connection to a point; points that fail are skipped, and the
    /// call fails only if none answered.
    pub async fn discover(
        &self,
        namespace: &str,
        limit: u32,
    ) -> Result<Vec<DiscoveredPeer>, DiscoveryError> {
        let namespace = parse_namespace(namespace)?;
        let limit = limit.min(MAX_DISCOVER_LIMIT);
        let (reply, answer) = oneshot::channel();
        self.send(Command::Discover { namespace, limit, reply }).await?;
        answer.await.map_err(|_| DiscoveryError::Closed)?
    }

    /// Unregisters every namespace at the connected points (waiting at most a couple of
    /// seconds for them), then stops the actor and closes its listener and connections. Other
    /// handles fail with [`DiscoveryError::Closed`] afterwards.
    pub async fn shutdown(self) {
        let (reply, done) = oneshot::channel();
        if self.inbox.send(Command::Shutdown { reply }).await.is_ok() {
            let _ = done.await;
        }
    }

    async fn send(&self, command: Command) -> Result<(), DiscoveryError> {
        self.inbox.send(command).await.map_err(|_| DiscoveryError::Closed)
    }
}

/// The libp2p behaviour: always a rendezvous client (it only acts when asked), a server when
/// configured. The server's request-response is inbound-only and the client's outbound-only,
/// so both share the protocol on one connection without stepping on each other.
#[derive(NetworkBehaviour)]
struct Behaviour {
    client: rendezvous::client::Behaviour,
    server: Toggle<rendezvous::server::Behaviour>,
}

#[derive(Debug)]
enum Command {
    Register { namespace: Namespace, reply: oneshot::Sender<Result<(), DiscoveryError>> },
    Unregister { namespace: Namespace, reply: oneshot::Sender<()> },
    Discover { namespace: Namespace, limit: u32, reply: DiscoverReply },
    Shutdown { reply: oneshot::Sender<()> },
}

type DiscoverReply = oneshot::Sender<Result<Vec<DiscoveredPeer>, DiscoveryError>>;

/// One configured point and our connection to it.
#[derive(Debug)]
struct Point {
    addr: Multiaddr,
    connected: bool,
    dialing: bool,
    /// When to dial next, while neither connected nor dialing.
    redial_at: Option<Instant>,
    /// The delay after the next failure.
    backoff: Duration,
}

/// Where a wanted namespace stands at one point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PointRegistration {
    /// Not connected, or not sent yet.
    Idle,
    /// REGISTER sent, no answer yet; `registered` if it refreshes an accepted registration.
    InFlight { registered: bool },
    /// Accepted; sent again at `refresh_at`.
    Registered { refresh_at: Instant },
    /// Refused or lost; sent again at `retry_at`.
    Failed { retry_at: Instant, code: ErrorCode },
}

impl PointRegistration {
    /// Whether the point holds our registration (possibly being refreshed).
    fn accepted(&self) -> bool {
        matches!(self, Self::Registered { .. } | Self::InFlight { registered: true })
    }
}

/// A namespace [`Discovery::register`] asked for.
#[derive(Debug)]
struct Wanted {
    at: HashMap<PeerId, PointRegistration>,
    /// Callers waiting for the first acceptance.
    waiters: Vec<(Instant, oneshot::Sender<Result<(), DiscoveryError>>)>,
}

/// A discover (or unregister barrier) call in progress.
#[derive(Debug)]
struct Op {
    namespace: Namespace,
    /// Peers wanted; requests ask one more since the point counts ourselves too.
    limit: usize,
    reply: OpReply,
    deadline: Instant,
    stage: OpStage,
}

#[derive(Debug)]
enum OpReply {
    Discover(DiscoverReply),
    Barrier(oneshot::Sender<()>),
}

#[derive(Debug)]
enum OpStage {
    /// Waiting for a connection to any point.
    Connecting,
    /// Asked the points in `waiting`; collecting their answers.
    Asked {
        waiting: HashSet<PeerId>,
        found: HashMap<PeerId, SocketAddr>,
        answered: bool,
        refused: Option<(PeerId, ErrorCode)>,
    },
}

/// DISCOVER requests for one (point, namespace). The rendezvous client reports answers by point
/// and namespace only, without request ids, so at most one request per pair is in flight: later
/// calls join it when it asks for enough peers, or wait in `queued` for a fresh one.
#[derive(Debug, Default)]
struct Queries {
    in_flight: Option<Query>,
    queued: Option<Query>,
}

#[derive(Debug)]
struct Query {
    limit: u64,
    ops: Vec<u64>,
    /// When it was sent (`None` while queued). An in-flight query that got no answer within
    /// [`ANSWER_WAIT`] is given up, so that a lost answer cannot block the pair for good.
    sent_at: Option<Instant>,
}

struct Actor {
    swarm: Swarm<Behaviour>,
    local: PeerId,
    ttl: u64,
    points: HashMap<PeerId, Point>,
    wanted: HashMap<Namespace, Wanted>,
    ops: HashMap<u64, Op>,
    next_op: u64,
    queries: HashMap<(PeerId, Namespace), Queries>,
    commands: mpsc::Receiver<Command>,
}

impl Actor {
    fn new(
        swarm: Swarm<Behaviour>,
        local: PeerId,
        config: &DiscoveryConfig,
        commands: mpsc::Receiver<Command>,
    ) -> Self {
        let mut points = HashMap::new();
        for point in &config.points {
            if point.peer_id == local {
                warn!(point = %point.peer_id, "ignoring ourselves as a rendezvous point");
                continue;
            }
            points.insert(
                point.peer_id,
                Point {
                    addr: tcp_multiaddr(point.addr),
                    connected: false,
                    dialing: false,
                    redial_at: None,
                    backoff: REDIAL_MIN,
                },
            );
        }
        Self {
            swarm,
            local,
            ttl: config.ttl.as_secs(),
            points,
            wanted: HashMap::new(),
            ops: HashMap::new(),
            next_op: 0,
            queries: HashMap::new(),
            commands,
        }
    }

    fn start(&mut self, now: Instant) {
        let ids: Vec<PeerId> = self.points.keys().copied().collect();
        for id in ids {
            self.dial(id, now);
        }
    }

    async fn run(mut self) {
        let shutdown = loop {
            let wake = self.next_deadline();
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event, Instant::now()),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown { reply }) => break Some(reply),
                    Some(command) => self.on_command(command, Instant::now()),
                    None => break None,
                },
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    self.on_timer(Instant::now());
                }
            }
        };
        if let Some(reply) = shutdown {
            self.drain(Instant::now() + SHUTDOWN_GRACE).await;
            drop(self); // closes the listener and the connections before the caller resumes
            let _ = reply.send(());
        }
        debug!("discovery actor stopped");
    }

    /// Withdraws every namespace and drives the swarm until the points answered the barriers
    /// or `deadline` passed.
    async fn drain(&mut self, deadline: Instant) {
        let namespaces: Vec<Namespace> = self.wanted.keys().cloned().collect();
        let mut barriers = Vec::new();
        for namespace in namespaces {
            let (reply, done) = oneshot::channel();
            self.unregister(namespace, reply, Instant::now());
            barriers.push(done);
        }
        let all = async {
            for barrier in barriers {
                let _ = barrier.await;
            }
        };
        tokio::pin!(all);
        let _ = timeout_at(deadline, async {
            loop {
                tokio::select! {
                    () = &mut all => return,
                    event = self.swarm.select_next_some() => {
                        self.on_swarm_event(event, Instant::now());
                    }
                }
            }
        })
        .await;
    }

    fn on_command(&mut self, command: Command, now: Instant) {
        match command {
            Command::Register { namespace, reply } => self.register(namespace, reply, now),
            Command::Unregister { namespace, reply } => self.unregister(namespace, reply, now),
            Command::Discover { namespace, limit, reply } => {
                self.discover(namespace, limit, reply, now);
            }
            Command::Shutdown { .. } => {} // handled by `run`
        }
    }

    fn register(
        &mut self,
        namespace: Namespace,
        reply: oneshot::Sender<Result<(), DiscoveryError>>,
        now: Instant,
    ) {
        if self.points.is_empty() {
            let _ = reply.send(Err(DiscoveryError::NoRendezvous));
            return;
        }
        if !self.wanted.contains_key(&namespace) && self.wanted.len() >= MAX_NAMESPACES {
            let _ = reply.send(Err(DiscoveryError::TooManyNamespaces { max: MAX_NAMESPACES }));
            return;
        }
        let points = &self.points;
        let wanted = self.wanted.entry(namespace.clone()).or_insert_with(|| Wanted {
            at: points.keys().map(|id| (*id, PointRegistration::Idle)).collect(),
            waiters: Vec::new(),
        });
        if wanted.at.values().any(PointRegistration::accepted) {
            let _ = reply.send(Ok(()));
            return;
        }
        let any_connected = self.points.values().any(|p| p.connected);
        let wait = if any_connected { ANSWER_WAIT } else { CONNECT_WAIT };
        wanted.waiters.push((now + wait, reply));
        // Idle, or refused earlier: asked again now that a caller wants it.
        let unsent: Vec<PeerId> = wanted
            .at
            .iter()
            .filter(|(_, r)| {
                matches!(r, PointRegistration::Idle | PointRegistration::Failed { .. })
            })
            .filter(|(id, _)| self.points.get(*id).is_some_and(|p| p.connected))
            .map(|(id, _)| *id)
            .collect();
        for point in unsent {
            self.send_register(point, &namespace, now);
        }
    }

    fn unregister(&mut self, namespace: Namespace, reply: oneshot::Sender<()>, now: Instant) {
        let Some(wanted) = self.wanted.remove(&namespace) else {
            let _ = reply.send(());
            return;
        };
        for (_, waiter) in wanted.waiters {
            let _ =
                waiter.send(Err(DiscoveryError::Cancelled { namespace: namespace.to_string() }));
        }
        let connected = self.connected_points();
        for point in &connected {
            debug!(point = %point, namespace = %namespace, "unregistering");
            self.swarm.behaviour_mut().client.unregister(namespace.clone(), *point);
        }
        if connected.is_empty() {
            let _ = reply.send(());
            return;
        }
        let op = Op {
            namespace,
            limit: BARRIER_LIMIT,
            reply: OpReply::Barrier(reply),
            deadline: now,
            stage: OpStage::Connecting,
        };
        self.start_op(op, connected, now);
    }

    fn discover(&mut self, namespace: Namespace, limit: u32, reply: DiscoverReply, now: Instant) {
        if self.points.is_empty() {
            let _ = reply.send(Err(DiscoveryError::NoRendezvous));
            return;
        }
        if limit == 0 {
            let _ = reply.send(Ok(Vec::new()));
            return;
        }
        let op = Op {
            namespace,
            limit: limit as usize,
            reply: OpReply::Discover(reply),
            deadline: now + CONNECT_WAIT,
            stage: OpStage::Connecting,
        };
        let connected = self.connected_points();
        if connected.is_empty() {
            let id = self.next_op_id();
            debug!(namespace = %op.namespace, "waiting for a rendezvous point");
            self.ops.insert(id, op);
        } else {
            self.start_op(op, connected, now);
        }
    }

    fn next_op_id(&mut self) -> u64 {
        self.next_op += 1;
        self.next_op
    }

    /// Asks `points` on behalf of `op`.
    fn start_op(&mut self, mut op: Op, points: Vec<PeerId>, now: Instant) {
        let id = self.next_op_id();
        op.deadline = now + ANSWER_WAIT;
        op.stage = OpStage::Asked {
            waiting: points.iter().copied().collect(),
            found: HashMap::new(),
            answered: false,
            refused: None,
        };
        let namespace = op.namespace.clone();
        // One more than wanted: the point counts our own registration too.
        let want = op.limit as u64 + 1;
        let fresh = matches!(op.reply, OpReply::Barrier(_));
        self.ops.insert(id, op);
        for point in points {
            self.enqueue(point, namespace.clone(), want, id, fresh, now);
        }
    }

    /// Adds op `id` to the DISCOVER of (`point`, `namespace`). A `fresh` op (a barrier) must not
    /// join a request sent before it.
    fn enqueue(
        &mut self,
        point: PeerId,
        namespace: Namespace,
        want: u64,
        id: u64,
        fresh: bool,
        now: Instant,
    ) {
        let queries = self.queries.entry((point, namespace.clone())).or_default();
        match &mut queries.in_flight {
            None => {
                self.swarm.behaviour_mut().client.discover(
                    Some(namespace),
                    None,
                    Some(want),
                    point,
                );
                queries.in_flight = Some(Query { limit: want, ops: vec![id], sent_at: Some(now) });
            }
            Some(query) if !fresh && query.limit >= want => query.ops.push(id),
            Some(_) => {
                let queued = queries.queued.get_or_insert(Query {
                    limit: 0,
                    ops: Vec::new(),
                    sent_at: None,
                });
                queued.limit = queued.limit.max(want);
                queued.ops.push(id);
            }
        }
    }

    /// A point answered the DISCOVER of `namespace` (registrations, or a refusal).
    fn on_answer(
        &mut self,
        point: PeerId,
        namespace: &Namespace,
        answer: Result<&[Registration], ErrorCode>,
        now: Instant,
    ) {
        let key = (point, namespace.clone());
        let Some(answered) = self.queries.get_mut(&key).and_then(|q| q.in_flight.take()) else {
            return;
        };
        let dropped = self.send_queued(key, now);

        let answer = answer.map(|registrations| peers_of(self.local, namespace, registrations));
        match &answer {
            Ok(peers) => {
                debug!(point = %point, namespace = %namespace, peers = peers.len(), "discovered")
            }
            Err(code) => debug!(point = %point, namespace = %namespace, ?code, "discover failed"),
        }
        for id in answered.ops {
            self.op_answer(id, point, answer.as_deref().map_err(|code| *code));
        }
        for id in dropped {
            self.op_answer(id, point, Err(ErrorCode::Unavailable));
        }
    }

    /// Sends the queued DISCOVER of `key`, if any, now that none is in flight; returns the ops
    /// of a queued request that cannot be sent (the point is gone).
    fn send_queued(&mut self, key: (PeerId, Namespace), now: Instant) -> Vec<u64> {
        let (point, namespace) = &key;
        let connected = self.points.get(point).is_some_and(|p| p.connected);
        let Some(queries) = self.queries.get_mut(&key) else {
            return Vec::new();
        };
        let mut dropped = Vec::new();
        if let Some(mut next) = queries.queued.take() {
            if connected {
                let client = &mut self.swarm.behaviour_mut().client;
                client.discover(Some(namespace.clone()), None, Some(next.limit), *point);
                next.sent_at = Some(now);
                queries.in_flight = Some(next);
            } else {
                dropped = next.ops;
            }
        }
        if queries.in_flight.is_none() {
            self.queries.remove(&key);
        }
        dropped
    }

    /// Gives up in-flight DISCOVERs that got no answer within [`ANSWER_WAIT`] (their ops have
    /// timed out by now or will) and sends what was queued behind them.
    fn expire_queries(&mut self, now: Instant) {
        let stale: Vec<(PeerId, Namespace)> = self
            .queries
            .iter()
            .filter(|(_, q)| q.in_flight.as_ref().is_some_and(|f| query_expired(f, now)))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            let point = key.0;
            warn!(point = %point, namespace = %key.1, "discover got no answer; giving up");
            let lost = self.queries.get_mut(&key).and_then(|q| q.in_flight.take());
            let mut ops = lost.map(|q| q.ops).unwrap_or_default();
            ops.extend(self.send_queued(key, now));
            for id in ops {
                self.op_answer(id, point, Err(ErrorCode::Unavailable));
            }
        }
    }

    fn op_answer(&mut self, id: u64, point: PeerId, answer: Result<&[DiscoveredPeer], ErrorCode>) {
        let Some(op) = self.ops.get_mut(&id) else {
            return; // timed out already
        };
        let OpStage::Asked { waiting, found, answered, refused } = &mut op.stage else {
            return;
        };
        if !waiting.remove(&point) {
            return;
        }
        match answer {
            Ok(peers) => {
                *answered = true;
                for peer in peers {
                    found.entry(peer.peer_id).or_insert(peer.chunk_addr);
                }
            }
            Err(ErrorCode::Unavailable) => {} // down or gone: skipped
            Err(code) => *refused = Some((point, code)),
        }
        if waiting.is_empty() {
            self.finish_op(id);
        }
    }

    /// Replies to op `id` with what it has: its deadline passed or every point answered.
    fn finish_op(&mut self, id: u64) {
        let Some(op) = self.ops.remove(&id) else {
            return;
        };
        let reply = match op.reply {
            OpReply::Barrier(reply) => {
                let _ = reply.send(());
                return;
            }
            OpReply::Discover(reply) => reply,
        };
        let result = match op.stage {
            OpStage::Connecting => Err(DiscoveryError::NoRendezvous),
            OpStage::Asked { found, answered: true, .. } => {
                let mut peers: Vec<DiscoveredPeer> = found
                    .into_iter()
                    .map(|(peer_id, chunk_addr)| DiscoveredPeer { peer_id, chunk_addr })
                    .collect();
                peers.shuffle(&mut rand::thread_rng());
                peers.truncate(op.limit);
                Ok(peers)
            }
            OpStage::Asked { refused: Some((point, code)), .. } => {
                Err(DiscoveryError::Rejected { point, code })
            }
            OpStage::Asked { waiting, .. } if waiting.is_empty() => {
                Err(DiscoveryError::NoRendezvous)
            }
            OpStage::Asked { .. } => Err(DiscoveryError::Timeout),
        };
        let _ = reply.send(result);
    }

    fn send_register(&mut self, point: PeerId, namespace: &Namespace, now: Instant) {
        let client = &mut self.swarm.behaviour_mut().client;
        let registered = self.wanted.get(namespace).is_some_and(|w| {
            matches!(
                w.at.get(&point),
                Some(
                    PointRegistration::Registered { .. }
                        | PointRegistration::InFlight { registered: true }
                )
            )
        });
        let state = match client.register(namespace.clone(), point, Some(self.ttl)) {
            Ok(()) => PointRegistration::InFlight { registered },
            Err(error) => {
                warn!(point = %point, namespace = %namespace, %error, "cannot register");
                let code = ErrorCode::InternalError;
                PointRegistration::Failed { retry_at: now + RETRY_REFUSED, code }
            }
        };
        if let Some(wanted) = self.wanted.get_mut(namespace) {
            wanted.at.insert(point, state);
        }
    }

    fn on_registered(&mut self, point: PeerId, namespace: Namespace, ttl: u64, now: Instant) {
        let Some(wanted) = self.wanted.get_mut(&namespace) else {
            // Unregistered while the REGISTER was in flight: withdraw it again.
            self.swarm.behaviour_mut().client.unregister(namespace, point);
            return;
        };
        let first = !wanted.at.get(&point).is_some_and(PointRegistration::accepted);
        let refresh = Duration::from_secs(ttl / 2).max(Duration::from_secs(1));
        wanted.at.insert(point, PointRegistration::Registered { refresh_at: now + refresh });
        for (_, waiter) in wanted.waiters.drain(..) {
            let _ = waiter.send(Ok(()));
        }
        if first {
            info!(point = %point, namespace = %namespace, ttl, "registered");
        } else {
            debug!(point = %point, namespace = %namespace, ttl, "registration refreshed");
        }
    }

    fn on_register_failed(
        &mut self,
        point: PeerId,
        namespace: Namespace,
        code: ErrorCode,
        now: Instant,
    ) {
        let connected = self.points.get(&point).is_some_and(|p| p.connected);
        let Some(wanted) = self.wanted.get_mut(&namespace) else {
            return;
        };
        warn!(point = %point, namespace = %namespace, ?code, "registration failed");
        let state = match code {
            _ if !connected => PointRegistration::Idle,
            ErrorCode::Unavailable => {
                PointRegistration::Failed { retry_at: now + RETRY_UNAVAILABLE, code }
            }
            _ => PointRegistration::Failed { retry_at: now + RETRY_REFUSED, code },
        };
        wanted.at.insert(point, state);
        // Every point refused outright: tell the waiters now rather than at their deadline.
        if let Some((point, code)) = state_refusal(&wanted.at) {
            for (_, waiter) in wanted.waiters.drain(..) {
                let _ = waiter.send(Err(DiscoveryError::Rejected { point, code }));
            }
        }
    }

    fn on_connected(&mut self, point: PeerId, now: Instant) {
        let Some(state) = self.points.get_mut(&point) else {
            return;
        };
        if state.connected {
            return;
        }
        info!(point = %point, "connected to rendezvous point");
        state.connected = true;
        state.dialing = false;
        state.redial_at = None;
        state.backoff = REDIAL_MIN;

        let idle: Vec<Namespace> = self
            .wanted
            .iter()
            .filter(|(_, w)| {
                !matches!(
                    w.at.get(&point),
                    Some(PointRegistration::InFlight { .. } | PointRegistration::Registered { .. })
                )
            })
            .map(|(namespace, _)| namespace.clone())
            .collect();
        for namespace in idle {
            self.send_register(point, &namespace, now);
        }
        // Waiters waited for a connection; now they wait for an answer.
        for wanted in self.wanted.values_mut() {
            for (deadline, _) in &mut wanted.waiters {
                *deadline = (*deadline).max(now + ANSWER_WAIT);
            }
        }

        let waiting: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, op)| matches!(op.stage, OpStage::Connecting))
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            if let Some(op) = self.ops.remove(&id) {
                self.start_op(op, vec![point], now);
            }
        }
    }

    fn on_disconnected(&mut self, point: PeerId, now: Instant) {
        let Some(state) = self.points.get_mut(&point) else {
            return;
        };
        state.connected = false;
        state.dialing = false;
        state.redial_at = Some(now + state.backoff);
        state.backoff = (state.backoff * 2).min(REDIAL_MAX);
        for wanted in self.wanted.values_mut() {
            wanted.at.insert(point, PointRegistration::Idle);
        }
        // In-flight requests fail through the client (connection closed); queued ones are
        // dropped when those answers arrive.
    }

    fn on_dial_failed(&mut self, point: PeerId, now: Instant) {
        let Some(state) = self.points.get_mut(&point) else {
            return;
        };
        if state.connected {
            return; // a redundant dial; the connection we have stands
        }
        state.dialing = false;
        state.redial_at = Some(now + state.backoff);
        state.backoff = (state.backoff * 2).min(REDIAL_MAX);
    }

    fn dial(&mut self, point: PeerId, now: Instant) {
        let Some(state) = self.points.get_mut(&point) else {
            return;
        };
        let opts = DialOpts::peer_id(point)
            .addresses(vec![state.addr.clone()])
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        state.redial_at = None;
        match self.swarm.dial(opts) {
            Ok(()) => {
                debug!(point = %point, "dialing rendezvous point");
                if let Some(state) = self.points.get_mut(&point) {
                    state.dialing = true;
                }
            }
            Err(error) => {
                debug!(point = %point, %error, "cannot dial rendezvous point");
                self.on_dial_failed(point, now);
            }
        }
    }

    fn on_timer(&mut self, now: Instant) {
        let due: Vec<PeerId> = self
            .points
            .iter()
            .filter(|(_, p)| !p.connected && !p.dialing && p.redial_at.is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for point in due {
            self.dial(point, now);
        }

        let mut resend = Vec::new();
        let connected = self.connected_points();
        for (namespace, wanted) in &mut self.wanted {
            for point in &connected {
                match wanted.at.get(point) {
                    Some(PointRegistration::Registered { refresh_at: at })
                    | Some(PointRegistration::Failed { retry_at: at, .. })
                        if *at <= now =>
                    {
                        resend.push((*point, namespace.clone()));
                    }
                    _ => {}
                }
            }
            let anyone = !connected.is_empty();
            let mut waiters = Vec::new();
            for (deadline, waiter) in std::mem::take(&mut wanted.waiters) {
                if deadline > now {
                    waiters.push((deadline, waiter));
                } else {
                    let error =
                        if anyone { DiscoveryError::Timeout } else { DiscoveryError::NoRendezvous };
                    let _ = waiter.send(Err(error));
                }
            }
            wanted.waiters = waiters;
        }
        for (point, namespace) in resend {
            self.send_register(point, &namespace, now);
        }

        let expired: Vec<u64> =
            self.ops.iter().filter(|(_, op)| op.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            self.finish_op(id);
        }
        self.expire_queries(now);
    }

    /// The earliest instant at which [`Actor::on_timer`] has something to do.
    fn next_deadline(&self) -> Option<Instant> {
        let redials =
            self.points.values().filter(|p| !p.connected && !p.dialing).filter_map(|p| p.redial_at);
        let registrations = self.wanted.values().flat_map(|wanted| {
            let refreshes = wanted.at.iter().filter_map(|(point, state)| {
                let connected = self.points.get(point).is_some_and(|p| p.connected);
                match state {
                    PointRegistration::Registered { refresh_at: at }
                    | PointRegistration::Failed { retry_at: at, .. }
                        if connected =>
                    {
                        Some(*at)
                    }
                    _ => None,
                }
            });
            refreshes.chain(wanted.waiters.iter().map(|(deadline, _)| *deadline))
        });
        let ops = self.ops.values().map(|op| op.deadline);
        let queries = self
            .queries
            .values()
            .filter_map(|q| q.in_flight.as_ref().and_then(|f| f.sent_at))
            .map(|sent_at| sent_at + ANSWER_WAIT);
        redials.chain(registrations).chain(ops).chain(queries).min()
    }

    fn connected_points(&self) -> Vec<PeerId> {
        self.points.iter().filter(|(_, p)| p.connected).map(|(id, _)| *id).collect()
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>, now: Instant) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Client(event)) => {
                self.on_client_event(event, now)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Server(event)) => on_server_event(event),
            SwarmEvent::ConnectionEstablished { peer_id, .. } => self.on_connected(peer_id, now),
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, cause, .. }
                if self.points.contains_key(&peer_id) =>
            {
                let cause = cause.map(|c| c.to_string());
                warn!(point = %peer_id, ?cause, "connection to rendezvous point closed");
                self.on_disconnected(peer_id, now);
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer_id), error, .. }
                if self.points.contains_key(&peer_id) =>
            {
                warn!(point = %peer_id, %error, "cannot connect to rendezvous point");
                self.on_dial_failed(peer_id, now);
            }
            SwarmEvent::ListenerClosed { reason: Err(error), .. }
            | SwarmEvent::ListenerError { error, .. } => {
                warn!(%error, "libp2p listener failed");
            }
            _ => {}
        }
    }

    fn on_client_event(&mut self, event: rendezvous::client::Event, now: Instant) {
        match event {
            rendezvous::client::Event::Registered { rendezvous_node, ttl, namespace } => {
                self.on_registered(rendezvous_node, namespace, ttl, now);
            }
            rendezvous::client::Event::RegisterFailed { rendezvous_node, namespace, error } => {
                self.on_register_failed(rendezvous_node, namespace, error, now);
            }
            rendezvous::client::Event::Discovered { rendezvous_node, registrations, cookie } => {
                // Answers carry no request id; the cookie names the namespace asked for.
                if let Some(namespace) = cookie_namespace(&cookie) {
                    self.on_answer(rendezvous_node, &namespace, Ok(&registrations), now);
                }
            }
            rendezvous::client::Event::DiscoverFailed {
                rendezvous_node,
                namespace: Some(namespace),
                error,
            } => self.on_answer(rendezvous_node, &namespace, Err(error), now),
            rendezvous::client::Event::DiscoverFailed { namespace: None, .. }
            | rendezvous::client::Event::Expired { .. } => {}
        }
    }
}

fn query_expired(query: &Query, now: Instant) -> bool {
    query.sent_at.is_some_and(|sent_at| sent_at + ANSWER_WAIT <= now)
}

/// The refusal to report when every point of a registration refused it outright, if so.
fn state_refusal(at: &HashMap<PeerId, PointRegistration>) -> Option<(PeerId, ErrorCode)> {
    let mut last = None;
    for (point, state) in at {
        match state {
            PointRegistration::Failed { code, .. } if *code != ErrorCode::Unavailable => {
                last = Some((*point, *code));
            }
            _ => return None,
        }
    }
    last
}

fn on_server_event(event: rendezvous::server::Event) {
    use rendezvous::server::Event;
    match event {
        Event::PeerRegistered { peer, registration } => {
            debug!(%peer, namespace = %registration.namespace, ttl = registration.ttl, "peer registered");
        }
        Event::PeerNotRegistered { peer, namespace, error } => {
            warn!(%peer, %namespace, ?error, "registration refused");
        }
        Event::PeerUnregistered { peer, namespace } => {
            debug!(%peer, %namespace, "peer unregistered");
        }
        Event::DiscoverServed { enquirer, registrations } => {
            debug!(peer = %enquirer, registrations = registrations.len(), "discover served");
        }
        Event::DiscoverNotServed { enquirer, error } => {
            debug!(peer = %enquirer, ?error, "discover refused");
        }
        Event::RegistrationExpired(registration) => {
            let peer = registration.record.peer_id();
            debug!(%peer, namespace = %registration.namespace, "registration expired");
        }
    }
}

fn cookie_namespace(cookie: &Cookie) -> Option<Namespace> {
    cookie.namespace().cloned()
}

/// The usable registrations of `namespace`: not ourselves, with a chunk address.
fn peers_of(
    local: PeerId,
    namespace: &Namespace,
    registrations: &[Registration],
) -> Vec<DiscoveredPeer> {
    registrations
        .iter()
        .filter(|r| r.namespace == *namespace && r.record.peer_id() != local)
        .filter_map(|r| {
            let peer_id = r.record.peer_id();
            let chunk_addr = r.record.addresses().iter().find_map(|a| chunk_addr_of(a, peer_id))?;
            Some(DiscoveredPeer { peer_id, chunk_addr })
        })
        .collect()
}

/// The socket address of `/ip4|ip6/A/udp/P/quic-v1` (optionally followed by `/p2p/<peer>`), the
/// only form a chunk endpoint is advertised in; `None` for anything else.
fn chunk_addr_of(addr: &Multiaddr, peer: PeerId) -> Option<SocketAddr> {
    let mut parts = addr.iter();
    let ip = match parts.next()? {
        Protocol::Ip4(ip) => IpAddr::V4(ip),
        Protocol::Ip6(ip) => IpAddr::V6(ip),
        _ => return None,
    };
    let Protocol::Udp(port) = parts.next()? else {
        return None;
    };
    let Protocol::QuicV1 = parts.next()? else {
        return None;
    };
    match parts.next() {
        None => {}
        Some(Protocol::P2p(id)) if id == peer && parts.next().is_none() => {}
        Some(_) => return None,
    }
    let addr = SocketAddr::new(ip, port);
    advertisable(addr).then_some(addr)
}

fn advertisable(addr: SocketAddr) -> bool {
    !addr.ip().is_unspecified() && !addr.ip().is_multicast() && addr.port() != 0
}

fn validate(config: &DiscoveryConfig) -> Result<(), DiscoveryError> {
    let ttl = Duration::from_secs(config.ttl.as_secs());
    if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
        return Err(DiscoveryError::InvalidTtl { ttl: config.ttl });
    }
    if !config.points.is_empty() && !advertisable(config.chunk_addr) {
        return Err(DiscoveryError::InvalidChunkAddr { addr: config.chunk_addr });
    }
    Ok(())
}

/// Fails if something already listens on `addr`. libp2p's TCP listeners set `SO_REUSEPORT`, so
/// a second daemon on the same port would otherwise bind too and silently take a share of the
/// first one's connections; a plain socket (no `SO_REUSEPORT`) cannot bind beside it.
fn probe_listen(addr: SocketAddr) -> Result<(), DiscoveryError> {
    if addr.port() == 0 {
        return Ok(());
    }
    TcpListener::bind(addr).map(drop).map_err(|source| DiscoveryError::Listen { addr, source })
}

/// Drives `swarm` until its listener reports its address.
async fn wait_listening(
    swarm: &mut Swarm<Behaviour>,
    listen: SocketAddr,
) -> Result<SocketAddr, DiscoveryError> {
    let listening = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => {
                    if let Some(port) = address.iter().find_map(|p| match p {
                        Protocol::Tcp(port) => Some(port),
                        _ => None,
                    }) {
                        return Ok(SocketAddr::new(listen.ip(), port));
                    }
                }
                SwarmEvent::ListenerClosed { reason: Err(source), .. }
                | SwarmEvent::ListenerError { error: source, .. } => {
                    return Err(DiscoveryError::Listen { addr: listen, source });
                }
                SwarmEvent::ListenerClosed { reason: Ok(()), .. } => {
                    let source = io::ErrorKind::NotConnected.into();
                    return Err(DiscoveryError::Listen { addr: listen, source });
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(LISTEN_WAIT, listening).await.map_err(|_| DiscoveryError::Timeout)?
}

fn parse_namespace(namespace: &str) -> Result<Namespace, DiscoveryError> {
    let invalid = || DiscoveryError::InvalidNamespace {
        len: namespace.len(),
        max: rendezvous::MAX_NAMESPACE,
    };
    if namespace.is_empty() {
        return Err(invalid());
    }
    Namespace::new(namespace.to_owned()).map_err(|_| invalid())
}

fn tcp_multiaddr(addr: SocketAddr) -> Multiaddr {
    Multiaddr::empty().with(Protocol::from(addr.ip())).with(Protocol::Tcp(addr.port()))
}

fn quic_multiaddr(addr: SocketAddr) -> Multiaddr {
    Multiaddr::empty()
        .with(Protocol::from(addr.ip()))
        .with(Protocol::Udp(addr.port()))
        .with(Protocol::QuicV1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_quic_v1_addresses_are_chunk_addresses() {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let ok: SocketAddr = "10.0.0.7:4433".parse().expect("literal");
        let v6: SocketAddr = "[2001:db8::1]:4433".parse().expect("literal");
        assert_eq!(chunk_addr_of(&quic_multiaddr(ok), peer), Some(ok));
        assert_eq!(chunk_addr_of(&quic_multiaddr(v6), peer), Some(v6));
        let with_p2p = quic_multiaddr(ok).with(Protocol::P2p(peer));
        assert_eq!(chunk_addr_of(&with_p2p, peer), Some(ok));
        let wrong_p2p = quic_multiaddr(ok).with(Protocol::P2p(other));
        assert_eq!(chunk_addr_of(&wrong_p2p, peer), None);
        assert_eq!(chunk_addr_of(&tcp_multiaddr(ok), peer), None);
        let quic_draft = Multiaddr::empty()
            .with(Protocol::from(ok.ip()))
            .with(Protocol::Udp(4433))
            .with(Protocol::Quic);
        assert_eq!(chunk_addr_of(&quic_draft, peer), None);
        let unspecified: SocketAddr = "0.0.0.0:4433".parse().expect("literal");
        assert_eq!(chunk_addr_of(&quic_multiaddr(unspecified), peer), None);
        let port0: SocketAddr = "10.0.0.7:0".parse().expect("literal");
        assert_eq!(chunk_addr_of(&quic_multiaddr(port0), peer), None);
    }

    #[test]
    fn namespaces_are_bounded() {
        assert!(parse_namespace(&"ab".repeat(32)).is_ok());
        assert!(matches!(
            parse_namespace(""),
            Err(DiscoveryError::InvalidNamespace { len: 0, .. })
        ));
        let long = "x".repeat(rendezvous::MAX_NAMESPACE + 1);
        assert!(matches!(parse_namespace(&long), Err(DiscoveryError::InvalidNamespace { .. })));
    }
}
