//! Peer discovery: the libp2p rendezvous protocol, with a Kademlia DHT as its fallback, run as a
//! tokio actor.
//!
//! # Participants
//!
//! - A **rendezvous point** is a daemon with [`DiscoveryConfig::server`] set: a region's cache,
//!   or the origin where a region has no cache. It stores registrations and answers discover
//!   requests; its rendezvous server never dials anyone.
//! - A **host** has [`DiscoveryConfig::points`]: the PeerIds and TCP addresses of its region's
//!   points. It dials each of them at start, stays connected, and redials with exponential
//!   back-off ([`REDIAL_MIN`] to [`REDIAL_MAX`]) whenever a connection closes or a dial fails.
//! - **Every daemon** is also a Kademlia node in server mode (it answers DHT requests), points
//!   and hosts alike, so that the region's DHT lives on in its hosts while its cache is away.
//!   A daemon's DHT is seeded with the addresses of its configured points; the points, which
//!   every host of the region is connected to, learn each host's listen addresses from identify
//!   and hand them out, so a host's first bootstrap through its point reaches the hosts the
//!   point knows. That is how peers learned via the rendezvous enter a host's routing table
//!   (rendezvous registrations themselves carry only chunk addresses, which TCP cannot dial).
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
//! Beside it run three more libp2p protocols on the same connections:
//!
//! - **Kademlia** (`/fleetwave/kad/1.0.0`, so a region's DHT never merges with the public IPFS
//!   one). A registered namespace is also a provider record under the key = the namespace's
//!   bytes (ADD_PROVIDER to the closest peers, GET_PROVIDERS to find them). A provider record
//!   names only the provider's PeerId (Fleetwave keeps the swarm's one external address, the
//!   chunk endpoint, out of its Kademlia records; the storing peers answer with the TCP
//!   addresses in their routing tables instead, as dialing hints).
//! - **identify**: each side of a connection tells the other its listen addresses (TCP) and its
//!   external address (the chunk endpoint). Identify is how the Kademlia fallback learns a
//!   provider's chunk address: see below.
//! - **ping**, every [`PING_INTERVAL`] on every connection, so that a peer that vanished
//!   without closing its connection is noticed.
//!
//! # Where a fallback peer's chunk address comes from
//!
//! A provider record says only "PeerId P provides namespace N", and it reaches us through
//! peers that may lie about anything. So the fallback never takes an address from the DHT: it
//! dials P itself (expecting P: the noise handshake proves the remote holds P's key, or the
//! connection fails) and takes the chunk address from the identify message that P sends over
//! that connection, which only P can have sent. The address is therefore exactly as
//! authenticated as a rendezvous registration's signed record, and needs no signature of its
//! own (a signed record would matter only if the address travelled through third parties, as
//! a DHT value would). Peers already connected are not dialed again: the identify info of the
//! connection is used. A lying DHT peer can at worst name PeerIds that do not provide the
//! namespace (we then dial peers that hold nothing of the manifest, which the chunk protocol
//! sorts out) or hide providers.
//!
//! # What the actor guarantees
//!
//! - [`Discovery::register`] makes a namespace *wanted*: it is registered at every point the
//!   actor is connected to, re-registered on every reconnect, and refreshed at half of the TTL
//!   the point granted, until [`Discovery::unregister`]. The call itself returns once one point
//!   has accepted the registration. It also publishes the namespace's provider record in the
//!   DHT at once, and Kademlia re-publishes it every [`PROVIDER_REPUBLISH`] (half of
//!   [`PROVIDER_TTL`]); a publication that reached nobody is repeated on the next connection to
//!   a point.
//! - [`Discovery::discover`] asks every connected point, merges the answers, drops ourselves,
//!   registrations without a usable chunk address, and duplicates, and returns a random subset
//!   of at most `limit` (capped at [`MAX_DISCOVER_LIMIT`]) peers. A point that fails is skipped.
//!   While any point answers, its answer is the whole answer (the DHT is not asked). When no
//!   point is connected (and the routing table holds some peer besides the points), or no
//!   connected point answered, it looks the namespace up in the DHT instead: GET_PROVIDERS,
//!   then each provider's chunk address as above, at most [`MAX_DHT_PEERS`] of them. The call
//!   fails only if neither a point nor any DHT peer answered.
//! - [`Discovery::unregister`] withdraws a namespace and then sends each connected point a
//!   small DISCOVER on the same connection as a barrier, returning when the barrier is answered.
//!   Requests on one connection are processed in order in practice (not by contract: the
//!   protocol has no acknowledgement), so once it returns, other hosts no longer see us there.
//!   It also stops re-publishing the provider record, but Kademlia has no withdrawal: peers
//!   holding the record hand us out of DHT lookups until it expires ([`PROVIDER_TTL`]).
//!
//! # Limits and failures
//!
//! Every wait is bounded: a call waits at most [`CONNECT_WAIT`] for a connection to some point
//! ([`DiscoveryError::NoRendezvous`] after that) and then at most [`ANSWER_WAIT`] for answers
//! ([`DiscoveryError::Timeout`]); a DHT lookup takes at most [`DHT_WAIT`] more (its query times
//! out then, and the call returns the providers resolved so far). A daemon keeps at most
//! [`MAX_NAMESPACES`] namespaces registered, and a point stores at most [`MAX_NAMESPACES`]
//! registrations per peer and [`MAX_REGISTRATIONS`] in all. Registrations that are not
//! refreshed expire at the point after their TTL ([`MIN_TTL`] to [`MAX_TTL`], default
//! [`DEFAULT_TTL`]): that is how a host that vanished without unregistering leaves the swarm.
//!
//! The DHT keeps libp2p's defaults where they bound memory: k-buckets of 20, at most 20
//! providers stored per key (the first ones to arrive) and 1,024 keys per peer, 20 providers
//! per answer. Provider records are the only thing stored: PUT_VALUE records are dropped, and
//! so are provider records under keys no namespace could have. A lookup of a namespace that
//! thousands of hosts provide therefore finds the few dozen whose records the storing peers
//! kept, plus any provider it happens to ask directly; for a fallback that keeps a swarm going
//! while its cache is away, that is enough. At most [`MAX_NAMESPACES`] lookups run at once
//! (concurrent calls for one namespace share one).
//!
//! A host's connections other than to its points close after [`PEER_IDLE_TIMEOUT`] without
//! traffic, so the DHT does not leave a host with a connection to every peer it ever asked;
//! connections to points stay open. A point keeps idle connections for an hour (every host of
//! its region is connected to it anyway).
//!
//! A point that vanishes without closing its connection (power loss, partition) is noticed by
//! ping: after two consecutive failed pings (libp2p ignores the first), which takes between
//! about 20 and 25 s with [`PING_INTERVAL`] and [`PING_TIMEOUT`], the connection is closed and
//! the point redialed with back-off. Until then calls fall back to the DHT once the point's
//! answer is overdue, and registration is retried on the old connection.
//!
//! Points are trusted infrastructure: libp2p's rendezvous client panics on a response of the
//! wrong message type, which would stop this actor (every call then fails with
//! [`DiscoveryError::Closed`]).
//!
//! [rendezvous protocol]: https://github.com/libp2p/specs/blob/master/rendezvous/README.md

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::DeniedUpgrade;
use libp2p::futures::StreamExt;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::multiaddr::Protocol;
use libp2p::rendezvous::{self, Cookie, ErrorCode, Namespace, Registration};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, DialError,
    FromSwarm, NetworkBehaviour, SubstreamProtocol, SwarmEvent, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{
    Multiaddr, StreamProtocol, Swarm, TransportError, identify, kad, noise, ping, tcp, yamux,
};
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

/// How long a point keeps an idle libp2p connection open. Its hosts hold their side open for
/// good ([`Hold`]), and refresh their registrations well inside it anyway; a discover-only
/// host that the point dropped after an hour of silence redials at once.
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

/// How long provider records live at the peers that store them: a host that vanished without
/// unregistering is handed out by DHT lookups for at most this long (by the rendezvous for at
/// most its TTL). Ten minutes keeps re-publication cheap (one DHT query per namespace and host
/// every [`PROVIDER_REPUBLISH`]) while a stale provider costs a lookup one failed dial.
pub const PROVIDER_TTL: Duration = Duration::from_secs(10 * 60);

/// How often Kademlia re-publishes our provider records: half of [`PROVIDER_TTL`], so one lost
/// re-publication never lets a record expire.
pub const PROVIDER_REPUBLISH: Duration = Duration::from_secs(5 * 60);

/// How long a DHT lookup (GET_PROVIDERS, then dialing and identifying the providers) may take
/// before it answers with the providers resolved so far; also the timeout of every Kademlia
/// query (libp2p's default is a minute). A region's DHT is a few hops deep, each a LAN round
/// trip; a peer that does not answer is skipped after libp2p's 10 s request timeout.
pub const DHT_WAIT: Duration = Duration::from_secs(10);

/// Most providers one DHT lookup resolves (dials, if not connected, and identifies): a swarm
/// wants a few dozen peers, and each resolution may cost a connection.
pub const MAX_DHT_PEERS: usize = 64;

/// How often every connection is pinged, from both ends (libp2p's default is 15 s). A point
/// that vanished is noticed after two consecutive failures, 20 to 25 s (see the module docs).
/// The price: a point with 20,000 hosts exchanges about 8,000 small pings a second.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);

/// How long a ping waits for its pong (libp2p's default is 20 s). Loopback and LAN round trips
/// take milliseconds; this only has to ride out a stalled peer, not a slow one.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a host keeps an idle connection that is not to one of its points: the DHT's
/// connections, to whatever peers a lookup or re-publication asked. Long enough that a lookup
/// and the dials that resolve its providers share connections; short enough that a host does
/// not accumulate a connection to every peer of its region.
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The Kademlia protocol of Fleetwave's region DHTs: not IPFS's, so that a region's DHT never
/// merges with the public one.
const DHT_PROTOCOL: StreamProtocol = StreamProtocol::new("/fleetwave/kad/1.0.0");

/// Identify's protocol version string (informational: identify does not compare it).
const IDENTIFY_VERSION: &str = "/fleetwave/1.0.0";

/// Most TCP addresses of one peer (from its identify info) added to the routing table.
const MAX_PEER_ADDRS: usize = 4;

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
    /// dropped their connection before answering), and no DHT peer answered in their stead.
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
    /// Points were connected but none answered within [`ANSWER_WAIT`] (and the DHT had no one
    /// else to ask), or a DHT lookup in their stead got no answer within [`DHT_WAIT`].
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
        let points: HashSet<PeerId> =
            config.points.iter().map(|p| p.peer_id).filter(|id| *id != local_peer_id).collect();
        let mut dht = dht_behaviour(local_peer_id);
        for point in config.points.iter().filter(|p| p.peer_id != local_peer_id) {
            dht.add_address(&point.peer_id, tcp_multiaddr(point.addr));
        }
        let identify = identify::Config::new(IDENTIFY_VERSION.to_owned(), keypair.public())
            .with_agent_version(format!("fleetwave-node/{}", env!("CARGO_PKG_VERSION")))
            // Addresses for dials come from the routing table; identify's cache would add the
            // chunk endpoints, which TCP cannot dial.
            .with_cache_size(0);
        let behaviour = Behaviour {
            client: rendezvous::client::Behaviour::new(keypair.clone()),
            server: Toggle::from(server),
            dht: Dht(dht),
            identify: identify::Behaviour::new(identify),
            ping: ping::Behaviour::new(
                ping::Config::new().with_interval(PING_INTERVAL).with_timeout(PING_TIMEOUT),
            ),
            hold: Hold { points },
        };
        let idle = if config.server { IDLE_TIMEOUT } else { PEER_IDLE_TIMEOUT };
        let Ok(builder) = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
            .map_err(DiscoveryError::Transport)?
            .with_behaviour(|_| behaviour);
        let mut swarm = builder.with_swarm_config(|c| c.with_idle_connection_timeout(idle)).build();

        swarm.listen_on(tcp_multiaddr(config.listen)).map_err(|error| DiscoveryError::Listen {
            addr: config.listen,
            source: match error {
                TransportError::Other(source) => source,
                TransportError::MultiaddrNotSupported(_) => io::ErrorKind::InvalidInput.into(),
            },
        })?;
        let local_addr = wait_listening(&mut swarm, config.listen).await?;
        // The only external address: the signed peer record then names the chunk endpoint and
        // nothing else (identify reports observed addresses only as candidates, and nothing
        // here confirms candidates). Identify sends it to peers beside the listen addresses;
        // Kademlia never sees it ([`Dht`]).
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
    /// [`CONNECT_WAIT`] for a first connection to a point; points that fail are skipped.
    ///
    /// When no point is connected (and the DHT knows some peer besides the points), or none of
    /// the connected points answered, the peers come from a DHT lookup of `namespace` instead:
    /// up to `limit` (at most [`MAX_DHT_PEERS`]) providers, each with the chunk address it told
    /// us itself over identify. The call fails only if no point and no DHT peer answered.
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

    /// Up to `limit` (at most [`MAX_DHT_PEERS`]) providers of `namespace` from a DHT lookup,
    /// whatever the points would say: the fallback path of [`Discovery::discover`], for tests.
    #[cfg(feature = "test-utils")]
    pub async fn discover_dht(
        &self,
        namespace: &str,
        limit: u32,
    ) -> Result<Vec<DiscoveredPeer>, DiscoveryError> {
        let namespace = parse_namespace(namespace)?;
        let limit = limit.min(MAX_DISCOVER_LIMIT);
        let (reply, answer) = oneshot::channel();
        self.send(Command::DiscoverDht { namespace, limit, reply }).await?;
        answer.await.map_err(|_| DiscoveryError::Closed)?
    }

    /// Closes every connection except those to points and returns once they are closed (as
    /// [`PEER_IDLE_TIMEOUT`] eventually would), so that the next DHT lookup has to dial and
    /// identify its providers afresh; for tests.
    #[cfg(feature = "test-utils")]
    pub async fn disconnect_peers(&self) -> Result<(), DiscoveryError> {
        let (reply, done) = oneshot::channel();
        self.send(Command::DisconnectPeers { reply }).await?;
        done.await.map_err(|_| DiscoveryError::Closed)
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
/// so both share the protocol on one connection without stepping on each other. Beside them,
/// on every daemon: the DHT, identify, ping, and [`Hold`].
#[derive(NetworkBehaviour)]
struct Behaviour {
    client: rendezvous::client::Behaviour,
    server: Toggle<rendezvous::server::Behaviour>,
    dht: Dht,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    hold: Hold,
}

/// The Kademlia behaviour of a daemon: server mode, provider records only, queries bounded by
/// [`DHT_WAIT`], our own records re-published every [`PROVIDER_REPUBLISH`] and others' kept for
/// [`PROVIDER_TTL`]; libp2p's default k-buckets and store limits.
fn dht_behaviour(local: PeerId) -> kad::Behaviour<MemoryStore> {
    let mut config = kad::Config::new(DHT_PROTOCOL);
    config
        .set_query_timeout(DHT_WAIT)
        .set_provider_record_ttl(Some(PROVIDER_TTL))
        .set_provider_publication_interval(Some(PROVIDER_REPUBLISH))
        // Inbound records are checked by the actor ([`Actor::on_dht_inbound`]) before they are
        // stored: provider records under namespace-like keys are, values never.
        .set_record_filtering(kad::StoreInserts::FilterBoth)
        .set_caching(kad::Caching::Disabled)
        .set_publication_interval(None)
        .set_replication_interval(None);
    let store = MemoryStore::with_config(local, MemoryStoreConfig::default());
    let mut dht = kad::Behaviour::with_config(local, store, config);
    dht.set_mode(Some(kad::Mode::Server));
    dht
}

/// Kademlia without the swarm's external addresses. Our only external address is the chunk
/// endpoint (QUIC, for the rendezvous peer record), which Kademlia would put into our provider
/// records as the address to reach us by; the DHT runs on TCP, so that address would make the
/// storing peers hand out an undialable address and shadow the TCP ones a lookup learns from
/// closer peers. Without it our records carry no address, and whoever answers with them fills
/// in the TCP addresses from its routing table; when we answer for ourselves, Kademlia sends
/// our listen addresses.
struct Dht(kad::Behaviour<MemoryStore>);

type DhtInner = kad::Behaviour<MemoryStore>;

impl NetworkBehaviour for Dht {
    type ConnectionHandler = <DhtInner as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = kad::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.0.handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0.handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.0.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match event {
            FromSwarm::ExternalAddrConfirmed(_) | FromSwarm::ExternalAddrExpired(_) => {}
            event => self.0.on_swarm_event(event),
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.0.on_connection_handler_event(peer_id, connection_id, event);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<kad::Event, THandlerInEvent<Self>>> {
        self.0.poll(cx)
    }
}

/// Keeps a host's connections to its points open however idle they are: the swarm's idle
/// timeout is short on hosts ([`PEER_IDLE_TIMEOUT`], for the DHT's connections), and a host is
/// meant to stay connected to its points. Every other connection gets a handler that does not
/// care.
struct Hold {
    points: HashSet<PeerId>,
}

impl NetworkBehaviour for Hold {
    type ConnectionHandler = HoldHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(HoldHandler { keep_alive: self.points.contains(&peer) })
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(HoldHandler { keep_alive: self.points.contains(&peer) })
    }

    fn on_swarm_event(&mut self, _: FromSwarm<'_>) {}

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: Infallible) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Infallible, Infallible>> {
        Poll::Pending
    }
}

/// [`Hold`]'s connection handler: speaks no protocol, only votes on keep-alive.
struct HoldHandler {
    keep_alive: bool,
}

impl ConnectionHandler for HoldHandler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = DeniedUpgrade;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<DeniedUpgrade> {
        SubstreamProtocol::new(DeniedUpgrade, ())
    }

    fn connection_keep_alive(&self) -> bool {
        self.keep_alive
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<DeniedUpgrade, (), Infallible>> {
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, event: Infallible) {
        match event {}
    }

    fn on_connection_event(&mut self, _: ConnectionEvent<'_, DeniedUpgrade, DeniedUpgrade>) {
        // DeniedUpgrade never negotiates; the rest is of no interest.
    }
}

#[derive(Debug)]
enum Command {
    Register {
        namespace: Namespace,
        reply: oneshot::Sender<Result<(), DiscoveryError>>,
    },
    Unregister {
        namespace: Namespace,
        reply: oneshot::Sender<()>,
    },
    Discover {
        namespace: Namespace,
        limit: u32,
        reply: DiscoverReply,
    },
    #[cfg(feature = "test-utils")]
    DiscoverDht {
        namespace: Namespace,
        limit: u32,
        reply: DiscoverReply,
    },
    #[cfg(feature = "test-utils")]
    DisconnectPeers {
        reply: oneshot::Sender<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
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
    /// Whether a publication of the provider record reached some DHT peer; until then it is
    /// repeated on every connection to a point (Kademlia itself repeats it only every
    /// [`PROVIDER_REPUBLISH`]).
    published: bool,
    /// Whether a publication is under way (a repeat then waits for its outcome).
    publishing: bool,
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
    /// Waiting for the DHT lookup of its namespace ([`Actor::lookups`]).
    Dht,
}

/// A DHT lookup of one namespace, shared by the discover calls that fell back to it.
#[derive(Debug)]
struct Lookup {
    /// The GET_PROVIDERS query, until it finished.
    query: Option<kad::QueryId>,
    /// The most peers any waiting op wants (at most [`MAX_DHT_PEERS`]).
    limit: usize,
    ops: Vec<u64>,
    /// Providers seen, resolved or not (at most [`MAX_DHT_PEERS`]).
    seen: HashSet<PeerId>,
    /// Providers being dialed or identified.
    resolving: HashSet<PeerId>,
    /// Resolved providers and the chunk address each gave us over identify.
    found: HashMap<PeerId, SocketAddr>,
    /// Whether any DHT peer answered (possibly with nothing), or we knew providers ourselves.
    reached: bool,
    deadline: Instant,
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
    /// Connected peers that identified themselves, with the chunk address they gave (`None`:
    /// they advertise none). Forgotten when the last connection to the peer closes.
    identified: HashMap<PeerId, Option<SocketAddr>>,
    lookups: HashMap<Namespace, Lookup>,
    /// The lookup each running GET_PROVIDERS query serves.
    lookup_queries: HashMap<kad::QueryId, Namespace>,
    /// [`Discovery::disconnect_peers`] callers, with the peers still to close.
    #[cfg(feature = "test-utils")]
    disconnecting: Vec<(HashSet<PeerId>, oneshot::Sender<()>)>,
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
            identified: HashMap::new(),
            lookups: HashMap::new(),
            lookup_queries: HashMap::new(),
            #[cfg(feature = "test-utils")]
            disconnecting: Vec::new(),
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
            #[cfg(feature = "test-utils")]
            Command::DiscoverDht { namespace, limit, reply } => {
                if limit == 0 {
                    let _ = reply.send(Ok(Vec::new()));
                    return;
                }
                let op = Op {
                    namespace,
                    limit: limit as usize,
                    reply: OpReply::Discover(reply),
                    deadline: now,
                    stage: OpStage::Connecting,
                };
                if !self.can_look_up(&op.namespace) {
                    if let OpReply::Discover(reply) = op.reply {
                        let _ = reply.send(Err(DiscoveryError::NoRendezvous));
                    }
                    return;
                }
                let id = self.next_op_id();
                self.start_lookup(id, op, now);
            }
            #[cfg(feature = "test-utils")]
            Command::DisconnectPeers { reply } => {
                let peers: HashSet<PeerId> = self
                    .swarm
                    .connected_peers()
                    .filter(|peer| !self.points.contains_key(peer))
                    .copied()
                    .collect();
                for peer in &peers {
                    let _ = self.swarm.disconnect_peer_id(*peer);
                }
                if peers.is_empty() {
                    let _ = reply.send(());
                } else {
                    self.disconnecting.push((peers, reply));
                }
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
        if !self.wanted.contains_key(&namespace) {
            let at = self.points.keys().map(|id| (*id, PointRegistration::Idle)).collect();
            let wanted = Wanted { at, waiters: Vec::new(), published: false, publishing: false };
            self.wanted.insert(namespace.clone(), wanted);
            self.provide(&namespace);
        }
        let Some(wanted) = self.wanted.get_mut(&namespace) else {
            return; // inserted just above
        };
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
        self.swarm.behaviour_mut().dht.0.stop_providing(&dht_key(&namespace));
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
            if self.can_look_up(&op.namespace) {
                debug!(namespace = %op.namespace, "no rendezvous point connected; asking the DHT");
                self.start_lookup(id, op, now);
            } else {
                debug!(namespace = %op.namespace, "waiting for a rendezvous point");
                self.ops.insert(id, op);
            }
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
            self.op_answer(id, point, answer.as_deref().map_err(|code| *code), now);
        }
        for id in dropped {
            self.op_answer(id, point, Err(ErrorCode::Unavailable), now);
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
                self.op_answer(id, point, Err(ErrorCode::Unavailable), now);
            }
        }
    }

    fn op_answer(
        &mut self,
        id: u64,
        point: PeerId,
        answer: Result<&[DiscoveredPeer], ErrorCode>,
        now: Instant,
    ) {
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
            self.finish_op(id, now);
        }
    }

    /// Replies to op `id` with what it has: its deadline passed or every point answered. A
    /// discover that no point answered falls back to the DHT instead, if the DHT knows anyone.
    fn finish_op(&mut self, id: u64, now: Instant) {
        let Some(op) = self.ops.remove(&id) else {
            return;
        };
        let unanswered = match &op.stage {
            OpStage::Connecting => true,
            OpStage::Asked { answered, refused, .. } => !answered && refused.is_none(),
            OpStage::Dht => false,
        };
        if unanswered && matches!(op.reply, OpReply::Discover(_)) && self.can_look_up(&op.namespace)
        {
            debug!(namespace = %op.namespace, "no rendezvous point answered; asking the DHT");
            self.start_lookup(id, op, now);
            return;
        }
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
            OpStage::Asked { .. } | OpStage::Dht => Err(DiscoveryError::Timeout),
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
        let unpublished: Vec<Namespace> = self
            .wanted
            .iter()
            .filter(|(_, w)| !w.published && !w.publishing)
            .map(|(namespace, _)| namespace.clone())
            .collect();
        for namespace in unpublished {
            self.provide(&namespace);
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

        // Lookups first: their ops share their deadline and are answered by them.
        let lookups: Vec<Namespace> = self
            .lookups
            .iter()
            .filter(|(_, lookup)| lookup.deadline <= now)
            .map(|(namespace, _)| namespace.clone())
            .collect();
        for namespace in lookups {
            self.check_lookup(&namespace, now);
        }
        let expired: Vec<u64> =
            self.ops.iter().filter(|(_, op)| op.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            self.finish_op(id, now);
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
        let lookups = self.lookups.values().map(|lookup| lookup.deadline);
        redials.chain(registrations).chain(ops).chain(queries).chain(lookups).min()
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
            SwarmEvent::Behaviour(BehaviourEvent::Dht(event)) => self.on_dht_event(event, now),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => {
                self.on_identify_event(event, now)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(event)) => self.on_ping_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Hold(never)) => match never {},
            SwarmEvent::ConnectionEstablished { peer_id, .. } => self.on_connected(peer_id, now),
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, cause, .. } => {
                self.identified.remove(&peer_id);
                #[cfg(feature = "test-utils")]
                self.disconnected(peer_id);
                self.unresolvable(peer_id, now);
                if self.points.contains_key(&peer_id) {
                    let cause = cause.map(|c| c.to_string());
                    warn!(point = %peer_id, ?cause, "connection to rendezvous point closed");
                    self.on_disconnected(peer_id, now);
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer_id), error, .. } => {
                if !self.swarm.is_connected(&peer_id) {
                    self.unresolvable(peer_id, now);
                }
                if self.points.contains_key(&peer_id) {
                    warn!(point = %peer_id, %error, "cannot connect to rendezvous point");
                    self.on_dial_failed(peer_id, now);
                } else {
                    debug!(peer = %peer_id, %error, "cannot connect to peer");
                }
            }
            SwarmEvent::ListenerClosed { reason: Err(error), .. }
            | SwarmEvent::ListenerError { error, .. } => {
                warn!(%error, "libp2p listener failed");
            }
            _ => {}
        }
    }

    /// Answers the [`Discovery::disconnect_peers`] callers that waited for `peer` last.
    #[cfg(feature = "test-utils")]
    fn disconnected(&mut self, peer: PeerId) {
        for (mut peers, reply) in std::mem::take(&mut self.disconnecting) {
            peers.remove(&peer);
            if peers.is_empty() {
                let _ = reply.send(());
            } else {
                self.disconnecting.push((peers, reply));
            }
        }
    }

    /// Publishes our provider record of wanted `namespace` in the DHT (Kademlia re-publishes it
    /// until [`kad::Behaviour::stop_providing`]).
    fn provide(&mut self, namespace: &Namespace) {
        let Some(wanted) = self.wanted.get_mut(namespace) else {
            return;
        };
        match self.swarm.behaviour_mut().dht.0.start_providing(dht_key(namespace)) {
            Ok(_) => {
                debug!(%namespace, "publishing provider record");
                wanted.publishing = true;
            }
            Err(error) => warn!(%namespace, %error, "cannot store our provider record"),
        }
    }

    /// Whether a DHT lookup has anyone to ask besides the points: a peer the points did not
    /// hand us is what makes the DHT a fallback rather than a detour to the same points.
    fn dht_usable(&mut self) -> bool {
        let points = &self.points;
        self.swarm
            .behaviour_mut()
            .dht
            .0
            .kbuckets()
            .any(|bucket| bucket.iter().any(|e| !points.contains_key(e.node.key.preimage())))
    }

    /// Whether a discover of `namespace` can fall back to the DHT: it has someone to ask, and a
    /// lookup of the namespace runs already or another may start.
    fn can_look_up(&mut self, namespace: &Namespace) -> bool {
        if !self.dht_usable() {
            return false;
        }
        if !self.lookups.contains_key(namespace) && self.lookups.len() >= MAX_NAMESPACES {
            warn!(%namespace, "too many DHT lookups running");
            return false;
        }
        true
    }

    /// Moves discover op `id` to the DHT lookup of its namespace, starting one if none runs
    /// (the caller checked [`Actor::can_look_up`]).
    fn start_lookup(&mut self, id: u64, mut op: Op, now: Instant) {
        let want = op.limit.min(MAX_DHT_PEERS);
        let namespace = op.namespace.clone();
        let deadline = match self.lookups.get_mut(&namespace) {
            Some(lookup) => {
                lookup.limit = lookup.limit.max(want);
                lookup.ops.push(id);
                lookup.deadline
            }
            None => {
                let query = self.swarm.behaviour_mut().dht.0.get_providers(dht_key(&namespace));
                debug!(%namespace, ?query, "looking up providers");
                self.lookup_queries.insert(query, namespace.clone());
                let lookup = Lookup {
                    query: Some(query),
                    limit: want,
                    ops: vec![id],
                    seen: HashSet::new(),
                    resolving: HashSet::new(),
                    found: HashMap::new(),
                    reached: false,
                    deadline: now + DHT_WAIT,
                };
                self.lookups.insert(namespace.clone(), lookup);
                now + DHT_WAIT
            }
        };
        op.deadline = deadline;
        op.stage = OpStage::Dht;
        self.ops.insert(id, op);
        self.check_lookup(&namespace, now); // one that has enough already answers at once
    }

    /// Learns the chunk address of `provider` for the lookup of `namespace`: from its identify
    /// info if connected, else by dialing it (the routing table, or the running query, knows
    /// its TCP addresses) and waiting for identify.
    fn resolve(&mut self, namespace: &Namespace, provider: PeerId) {
        let Some(lookup) = self.lookups.get_mut(namespace) else {
            return;
        };
        if provider == self.local
            || lookup.seen.contains(&provider)
            || lookup.seen.len() >= MAX_DHT_PEERS
        {
            return;
        }
        lookup.seen.insert(provider);
        match self.identified.get(&provider) {
            Some(Some(chunk_addr)) => {
                lookup.found.insert(provider, *chunk_addr);
            }
            Some(None) => {} // identified, without a chunk endpoint
            None if self.swarm.is_connected(&provider) => {
                lookup.resolving.insert(provider); // identify is under way
            }
            None => {
                let opts = DialOpts::peer_id(provider)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                match self.swarm.dial(opts) {
                    Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {
                        lookup.resolving.insert(provider);
                    }
                    Err(error) => debug!(peer = %provider, %error, "cannot dial provider"),
                }
            }
        }
    }

    /// `peer` cannot be identified (its connection closed, or the dial failed): lookups stop
    /// waiting for it.
    fn unresolvable(&mut self, peer: PeerId, now: Instant) {
        let waiting: Vec<Namespace> = self
            .lookups
            .iter_mut()
            .filter_map(|(namespace, lookup)| {
                lookup.resolving.remove(&peer).then(|| namespace.clone())
            })
            .collect();
        for namespace in waiting {
            self.check_lookup(&namespace, now);
        }
    }

    /// Answers the lookup of `namespace` if it is done: enough providers resolved, or the query
    /// finished and every provider resolved or failed, or its deadline passed.
    fn check_lookup(&mut self, namespace: &Namespace, now: Instant) {
        let Some(lookup) = self.lookups.get(namespace) else {
            return;
        };
        let expired = lookup.deadline <= now;
        let settled = lookup.query.is_none() && lookup.resolving.is_empty();
        if lookup.found.len() < lookup.limit && !settled && !expired {
            return;
        }
        let Some(lookup) = self.lookups.remove(namespace) else {
            return;
        };
        if let Some(query) = lookup.query {
            self.lookup_queries.remove(&query);
            if let Some(mut running) = self.swarm.behaviour_mut().dht.0.query_mut(&query) {
                running.finish();
            }
        }
        debug!(
            %namespace,
            found = lookup.found.len(),
            reached = lookup.reached,
            expired,
            "DHT lookup done"
        );
        let peers: Vec<DiscoveredPeer> = lookup
            .found
            .into_iter()
            .map(|(peer_id, chunk_addr)| DiscoveredPeer { peer_id, chunk_addr })
            .collect();
        for id in lookup.ops {
            let Some(op) = self.ops.remove(&id) else {
                continue;
            };
            let OpReply::Discover(reply) = op.reply else {
                continue;
            };
            let result = if lookup.reached || !peers.is_empty() {
                let mut peers = peers.clone();
                peers.shuffle(&mut rand::thread_rng());
                peers.truncate(op.limit);
                Ok(peers)
            } else if expired {
                Err(DiscoveryError::Timeout)
            } else {
                Err(DiscoveryError::NoRendezvous)
            };
            let _ = reply.send(result);
        }
    }

    fn on_dht_event(&mut self, event: kad::Event, now: Instant) {
        match event {
            kad::Event::OutboundQueryProgressed { id, result, stats, step } => match result {
                kad::QueryResult::GetProviders(result) => {
                    self.on_providers(id, result, stats.num_successes() > 0, step.last, now);
                }
                kad::QueryResult::StartProviding(result)
                | kad::QueryResult::RepublishProvider(result) => {
                    let reached = stats.num_successes();
                    match result {
                        Ok(kad::AddProviderOk { key }) => self.on_published(&key, reached),
                        Err(error) => {
                            debug!(%error, reached, "provider record publication timed out");
                            self.on_published(error.key(), reached);
                        }
                    }
                }
                kad::QueryResult::Bootstrap(Err(error)) => debug!(%error, "DHT bootstrap"),
                _ => {}
            },
            kad::Event::InboundRequest { request } => self.on_dht_inbound(request),
            kad::Event::RoutingUpdated { peer, is_new_peer: true, .. } => {
                debug!(%peer, "DHT peer added");
            }
            _ => {}
        }
    }

    fn on_providers(
        &mut self,
        query: kad::QueryId,
        result: kad::GetProvidersResult,
        answered: bool,
        last: bool,
        now: Instant,
    ) {
        let Some(namespace) = self.lookup_queries.get(&query).cloned() else {
            return; // a lookup that is done already
        };
        if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result {
            // Our own record (from our store) is no news.
            let others = providers.iter().any(|p| *p != self.local);
            if let Some(lookup) = self.lookups.get_mut(&namespace) {
                lookup.reached |= others;
            }
            for provider in providers {
                self.resolve(&namespace, provider);
            }
        }
        if last {
            self.lookup_queries.remove(&query);
            if let Some(lookup) = self.lookups.get_mut(&namespace) {
                lookup.query = None;
                lookup.reached |= answered;
            }
        }
        self.check_lookup(&namespace, now);
    }

    /// A publication of our provider record under `key` finished, having reached `reached` peers.
    fn on_published(&mut self, key: &kad::RecordKey, reached: u32) {
        let wanted = self.wanted.iter_mut().find(|(namespace, _)| dht_key(namespace) == *key);
        if let Some((namespace, wanted)) = wanted {
            wanted.publishing = false;
            if reached > 0 {
                debug!(%namespace, reached, "provider record published");
                wanted.published = true;
            }
        }
    }

    /// With [`kad::StoreInserts::FilterBoth`], inbound records wait for us: provider records
    /// under a key a namespace could be are stored (the libp2p store bounds them), values are
    /// dropped.
    fn on_dht_inbound(&mut self, request: kad::InboundRequest) {
        let kad::InboundRequest::AddProvider { record: Some(record) } = request else {
            return;
        };
        let len = record.key.as_ref().len();
        if len == 0 || len > rendezvous::MAX_NAMESPACE {
            debug!(peer = %record.provider, len, "dropping provider record with a foreign key");
            return;
        }
        if let Err(error) = self.swarm.behaviour_mut().dht.0.store_mut().add_provider(record) {
            debug!(%error, "provider record not stored");
        }
    }

    fn on_identify_event(&mut self, event: identify::Event, now: Instant) {
        match event {
            identify::Event::Received { peer_id, info, .. } => {
                // The info came over a connection authenticated as `peer_id`: its addresses
                // are the ones the peer itself claims.
                let chunk_addr = info.listen_addrs.iter().find_map(|a| chunk_addr_of(a, peer_id));
                self.identified.insert(peer_id, chunk_addr);
                if info.protocols.contains(&DHT_PROTOCOL) {
                    let dht = &mut self.swarm.behaviour_mut().dht.0;
                    for addr in dht_addrs(&info.listen_addrs) {
                        dht.add_address(&peer_id, addr);
                    }
                }
                let waiting: Vec<Namespace> = self
                    .lookups
                    .iter_mut()
                    .filter_map(|(namespace, lookup)| {
                        if !lookup.resolving.remove(&peer_id) {
                            return None;
                        }
                        if let Some(chunk_addr) = chunk_addr {
                            lookup.found.insert(peer_id, chunk_addr);
                        }
                        Some(namespace.clone())
                    })
                    .collect();
                for namespace in waiting {
                    self.check_lookup(&namespace, now);
                }
            }
            identify::Event::Error { peer_id, error, .. } => {
                debug!(peer = %peer_id, %error, "identify failed");
                if !self.identified.contains_key(&peer_id) {
                    self.unresolvable(peer_id, now);
                }
            }
            identify::Event::Sent { .. } | identify::Event::Pushed { .. } => {}
        }
    }

    /// Closes a connection whose pings fail: the peer vanished without closing it (the first
    /// failure is forgiven by libp2p). For a point, the close then triggers the redial.
    fn on_ping_event(&mut self, event: ping::Event) {
        let ping::Event { peer, connection, result } = event;
        match result {
            Ok(_) | Err(ping::Failure::Unsupported) => {}
            Err(failure) => {
                if self.points.contains_key(&peer) {
                    warn!(point = %peer, %failure, "rendezvous point does not answer pings");
                } else {
                    debug!(%peer, %failure, "peer does not answer pings");
                }
                self.swarm.close_connection(connection);
            }
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

/// The DHT key of a namespace: its bytes.
fn dht_key(namespace: &Namespace) -> kad::RecordKey {
    kad::RecordKey::new(&namespace.to_string())
}

/// The addresses of `listen_addrs` (a peer's identify info) worth putting into the routing
/// table: `/ip4|ip6/A/tcp/P` (optionally `/p2p/..`), the ones the swarm can dial; loopback ones
/// only if the peer has no others (a daemon listening on all interfaces lists loopback too,
/// which would lead other machines to dial themselves); at most [`MAX_PEER_ADDRS`].
fn dht_addrs(listen_addrs: &[Multiaddr]) -> Vec<Multiaddr> {
    let tcp_ip = |addr: &Multiaddr| -> Option<IpAddr> {
        let mut parts = addr.iter();
        let ip = match parts.next()? {
            Protocol::Ip4(ip) => IpAddr::V4(ip),
            Protocol::Ip6(ip) => IpAddr::V6(ip),
            _ => return None,
        };
        let Protocol::Tcp(port) = parts.next()? else {
            return None;
        };
        let tail_ok =
            matches!(parts.next(), None | Some(Protocol::P2p(_))) && parts.next().is_none();
        (tail_ok && port != 0 && !ip.is_unspecified() && !ip.is_multicast()).then_some(ip)
    };
    let tcp: Vec<(IpAddr, &Multiaddr)> =
        listen_addrs.iter().filter_map(|a| tcp_ip(a).map(|ip| (ip, a))).collect();
    let only_loopback = tcp.iter().all(|(ip, _)| ip.is_loopback());
    tcp.into_iter()
        .filter(|(ip, _)| only_loopback || !ip.is_loopback())
        .map(|(_, addr)| addr.clone())
        .take(MAX_PEER_ADDRS)
        .collect()
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
    fn the_dht_gets_dialable_tcp_addresses_and_loopback_only_as_a_last_resort() {
        let addr = |s: &str| -> Multiaddr { s.parse().expect("literal") };
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let lan = addr("/ip4/10.0.0.7/tcp/4001");
        let lan_p2p = lan.clone().with(Protocol::P2p(peer));
        let listed = [
            addr("/ip4/127.0.0.1/tcp/4001"),
            lan.clone(),
            addr("/ip4/10.0.0.7/udp/4433/quic-v1"),
            addr("/ip4/0.0.0.0/tcp/4001"),
            addr("/ip4/10.0.0.7/tcp/0"),
            addr("/ip4/10.0.0.7/tcp/4001/ws"),
            lan_p2p.clone(),
        ];
        assert_eq!(dht_addrs(&listed), vec![lan, lan_p2p]);
        let local = [addr("/ip4/127.0.0.1/tcp/4001"), addr("/ip4/127.0.0.1/udp/4433/quic-v1")];
        assert_eq!(dht_addrs(&local), vec![addr("/ip4/127.0.0.1/tcp/4001")]);
        let many: Vec<Multiaddr> =
            (1..=10).map(|i| addr(&format!("/ip4/10.0.0.{i}/tcp/4001"))).collect();
        assert_eq!(dht_addrs(&many).len(), MAX_PEER_ADDRS);
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
