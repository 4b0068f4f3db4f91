//! QUIC transport for chunk bytes: quinn driven directly, peers authenticated by their libp2p
//! identity.
//!
//! # Participants
//!
//! Every daemon owns one ed25519 identity [`Keypair`]; its [`PeerId`] is what the region's
//! rendezvous hands out. An [`Endpoint`] is one UDP socket that both dials ([`Endpoint::connect`])
//! and accepts ([`Endpoint::accept`]) QUIC connections. A [`Connection`] carries the remote's
//! verified PeerId and multiplexes streams: the chunk protocol ([`crate::protocol`]) runs one
//! control stream and one stream per piece on it.
//!
//! # Authentication
//!
//! Certificates follow the [libp2p TLS spec] and come from `libp2p-tls`: each endpoint presents a
//! fresh self-signed certificate whose critical libp2p extension holds the identity public key and
//! the identity key's signature over the certificate key, and checks the remote's with the same
//! crate. The rustls configurations around them are built here (TLS 1.3 only, client
//! certificates mandatory, ring, AES-128-GCM preferred), so both sides prove their identity:
//!
//! - The **dialer** says which PeerId it expects (the one the rendezvous gave). Its certificate
//!   verifier checks the extension, the handshake signature, and that the PeerId the certificate
//!   proves is the expected one. On a mismatch the TLS handshake aborts before the dialer sends its
//!   Finished message: no connection exists on either side, no stream can be opened, and
//!   [`Endpoint::connect`] returns [`ConnectError::PeerIdMismatch`] naming both identities.
//! - The **listener** refuses any dialer without a valid libp2p certificate (none, a plain X.509
//!   certificate, a bad extension signature): [`Incoming::accept`] returns
//!   [`AcceptError::Handshake`]. Which PeerIds it wants to talk to (its swarm's members) is the
//!   caller's decision, made on [`Connection::remote_peer_id`].
//!
//! TLS session resumption is off on both sides: a resumed session skips certificate
//! verification, so a ticket issued by one peer could otherwise stand in for another expected
//! PeerId at the same address. The ALPN is [`ALPN`], not libp2p's `libp2p`, so a libp2p node and
//! a chunk endpoint can never mistake each other for their own protocol.
//!
//! # Why quinn directly
//!
//! `docs/BENCHMARKS.md` ("Transport") measures this module against libp2p's QUIC transport and a
//! plain TCP copy: quinn driven directly moved bytes faster and for less CPU on loopback and on
//! a 50 ms path, so chunk bytes travel here while identity, discovery and membership stay on
//! libp2p. Owning the endpoint is also what makes the winning settings possible: the
//! flow-control windows, the UDP socket buffers, the congestion controller and the cipher suite
//! order ([`TransportConfig`]), none of which but the windows libp2p's QUIC lets a caller set.
//!
//! [libp2p TLS spec]: https://github.com/libp2p/specs/blob/master/tls/tls.md

mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use libp2p_identity::{Keypair, PeerId};
use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};
use thiserror::Error;

pub use quinn::{ConnectionError, RecvStream, SendStream};

use tls::ExpectedPeer;

/// The ALPN protocol of Fleetwave's chunk connections.
pub const ALPN: &[u8] = b"fleetwave-chunk/1";

/// The TLS server name a dialer sends. Certificates name no host (the PeerId is the identity), so
/// any fixed valid name does; libp2p uses the same one.
const SERVER_NAME: &str = "l";

/// Application close code for a connection or endpoint closed on purpose.
const CLOSE_NORMAL: u32 = 0;

/// The congestion controller of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 9438), loss based; quinn's default and the Linux TCP default.
    Cubic,
    /// BBR (v1), model based: paces at the measured bottleneck rate rather than backing off on
    /// every loss. quinn marks its BBR experimental.
    Bbr,
    /// NewReno (RFC 9002's reference controller).
    NewReno,
}

/// Tuning of the QUIC connections an [`Endpoint`] makes and accepts.
///
/// [`TransportConfig::default`] is tuned for bulk transfer on fast links, sized by the
/// bandwidth-delay product (BDP) of 1 Gbit/s x 50 ms, a fast path between regions: 125 MB/s x
/// 0.05 s = 6.25 MB. A sender keeps such a path full only if every window on the way holds at
/// least one BDP. See each field for its number and why, and `docs/BENCHMARKS.md` ("Transport")
/// for what each choice measured. [`TransportConfig::quinn_defaults`] reproduces quinn's own
/// defaults, for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportConfig {
    /// Bytes one stream may have in flight towards us before we read them (QUIC
    /// `initial_max_stream_data`). Default 8 MiB, above one BDP, so that one stream alone can fill
    /// a 1 Gbit/s x 50 ms path; quinn's default, 1.25 MB, caps a stream at 25 MB/s (200 Mbit/s)
    /// on it. Pieces of the default chunker (at most 256 KiB) never wait on this window; only
    /// pieces near [`crate::protocol::MAX_PIECE_LEN`] (16 MiB) would.
    pub stream_receive_window: u64,
    /// Bytes all streams of one connection may have in flight towards us before we read them
    /// (QUIC `initial_max_data`), saturating at 2^62 - 1. Default 16 MiB, about 2.7 BDPs, so the
    /// pieces in flight on one connection fill the path with room for the reader to fall one
    /// scheduling slice behind. It is also the most one peer can make us buffer, which is why
    /// it is bounded (quinn's default is unbounded and relies on the per-stream windows).
    pub receive_window: u64,
    /// Bytes we buffer for sending on one connection, across streams. Default 16 MiB, matching
    /// the receive window, so the sender is never the bottleneck on a 1 Gbit/s x 50 ms path.
    pub send_window: u64,
    /// The congestion controller. Default [`Congestion::Cubic`]: BBR measured no faster and
    /// cost more CPU, and quinn calls its BBR experimental.
    pub congestion: Congestion,
    /// Bidirectional streams the remote may have open at once. Default 1: the chunk protocol's
    /// one control stream ([`crate::protocol`]), so a peer cannot open a second.
    pub max_concurrent_bidi_streams: u32,
    /// Unidirectional streams the remote may have open at once: the chunk protocol sends every
    /// piece on its own. Default 256, the requests a peer may have open at once by default
    /// ([`crate::protocol::DEFAULT_MAX_REQUESTS`]); a BDP of 64 KiB pieces is about 96.
    pub max_concurrent_uni_streams: u32,
    /// A connection silent this long is closed, which is how a vanished peer is detected. Default
    /// 30 s (RFC 9308 section 3.2). `None` never times out.
    pub max_idle_timeout: Option<Duration>,
    /// Interval of keep-alive packets on an otherwise idle connection, so a swarm connection
    /// survives the pauses between pieces and NAT bindings stay open. Default 10 s, a third of the
    /// idle timeout. `None` sends none.
    pub keep_alive_interval: Option<Duration>,
    /// `SO_RCVBUF` of the UDP socket, in bytes. Default 4 MiB: a burst of datagrams arriving
    /// while the receiving task is descheduled must fit, or the kernel drops them and the sender
    /// reads congestion where there is none. With the system default (about 200 KiB) the tuned
    /// windows lost a thousand packets per 128 MiB on a 50 ms path and ran at a third of the
    /// speed. The kernel caps it at `net.core.rmem_max` (then doubles it for its bookkeeping);
    /// raise that sysctl on hosts where it is lower. `None` keeps the system default.
    pub udp_receive_buffer: Option<usize>,
    /// `SO_SNDBUF` of the UDP socket, in bytes. Default 4 MiB, for the same bursts on the way
    /// out; capped by `net.core.wmem_max`. `None` keeps the system default.
    pub udp_send_buffer: Option<usize>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            stream_receive_window: 8 << 20,
            receive_window: 16 << 20,
            send_window: 16 << 20,
            congestion: Congestion::Cubic,
            max_concurrent_bidi_streams: 1,
            max_concurrent_uni_streams: 256,
            max_idle_timeout: Some(Duration::from_secs(30)),
            keep_alive_interval: Some(Duration::from_secs(10)),
            udp_receive_buffer: Some(4 << 20),
            udp_send_buffer: Some(4 << 20),
        }
    }
}

impl TransportConfig {
    /// quinn 0.11's own defaults (sized for 100 Mbit/s x 100 ms) and the system's socket
    /// buffers: the baseline the tuned default is measured against.
    pub fn quinn_defaults() -> Self {
        Self {
            stream_receive_window: 1_250_000,
            receive_window: VarInt::MAX.into_inner(),
            send_window: 10_000_000,
            congestion: Congestion::Cubic,
            max_concurrent_bidi_streams: 100,
            max_concurrent_uni_streams: 100,
            max_idle_timeout: Some(Duration::from_secs(30)),
            keep_alive_interval: None,
            udp_receive_buffer: None,
            udp_send_buffer: None,
        }
    }

    /// The quinn transport configuration these settings describe.
    fn to_quinn(&self) -> quinn::TransportConfig {
        let mut config = quinn::TransportConfig::default();
        config
            .stream_receive_window(saturating_varint(self.stream_receive_window))
            .receive_window(saturating_varint(self.receive_window))
            .send_window(self.send_window)
            .max_concurrent_bidi_streams(self.max_concurrent_bidi_streams.into())
            .max_concurrent_uni_streams(self.max_concurrent_uni_streams.into())
            .max_idle_timeout(self.max_idle_timeout.map(|timeout| {
                IdleTimeout::try_from(timeout).unwrap_or_else(|_| VarInt::MAX.into())
            }))
            .keep_alive_interval(self.keep_alive_interval);
        match self.congestion {
            Congestion::Cubic => config
                .congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
            Congestion::Bbr => config
                .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
            Congestion::NewReno => config.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            )),
        };
        config
    }
}

/// The tuned windows are stated in bytes; QUIC carries them as 62-bit integers.
fn saturating_varint(value: u64) -> VarInt {
    VarInt::from_u64(value).unwrap_or(VarInt::MAX)
}

/// Why [`Endpoint::bind`] failed.
#[derive(Debug, Error)]
pub enum BindError {
    /// No tokio runtime is running on this thread; quinn needs one for its I/O driver.
    #[error("no tokio runtime to drive the QUIC endpoint")]
    NoRuntime,
    /// libp2p-tls could not make the certificate for this identity: the certificate key could
    /// not be generated, or the identity key could not sign the libp2p extension.
    #[error("failed to generate the libp2p TLS certificate for this identity")]
    Certificate(#[source] libp2p_tls::certificate::GenError),
    /// rustls refused the TLS configuration (e.g. the certificate key cannot be loaded).
    #[error("invalid TLS configuration")]
    Tls(#[source] rustls::Error),
    /// The TLS configuration offers no cipher suite QUIC can use for its initial packets.
    #[error("the TLS configuration has no cipher suite usable by QUIC")]
    CipherSuite(#[source] NoInitialCipherSuite),
    /// The UDP socket could not be bound or configured.
    #[error("failed to bind the UDP socket on {addr}")]
    Socket {
        /// The address asked for.
        addr: SocketAddr,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// Why [`Endpoint::connect`] failed.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The connection could not even start: the endpoint is closing, or the address is
    /// unusable (e.g. port 0, or an IPv6 address on an IPv4 socket).
    #[error("cannot start a connection to {addr}")]
    Start {
        /// The address dialed.
        addr: SocketAddr,
        /// quinn's reason.
        #[source]
        source: quinn::ConnectError,
    },
    /// The TLS configuration offers no cipher suite QUIC can use. [`Endpoint::bind`] checks the
    /// same configuration, so this does not happen on an endpoint that bound.
    #[error("the TLS configuration has no cipher suite usable by QUIC")]
    CipherSuite(#[source] NoInitialCipherSuite),
    /// The peer at `addr` proved, with a valid libp2p certificate, an identity other than the
    /// expected one. The connection was aborted before any application data was exchanged.
    #[error("peer at {addr} is {actual}, expected {expected}")]
    PeerIdMismatch {
        /// The address dialed.
        addr: SocketAddr,
        /// The PeerId the caller asked for.
        expected: PeerId,
        /// The PeerId the remote's certificate proved.
        actual: PeerId,
    },
    /// The handshake failed for another reason: no answer before the idle timeout, the remote
    /// refused us, or its certificate is not a valid libp2p certificate.
    #[error("QUIC handshake with {addr} failed")]
    Handshake {
        /// The address dialed.
        addr: SocketAddr,
        /// quinn's reason.
        #[source]
        source: ConnectionError,
    },
    /// The handshake completed but the remote's identity could not be read back (a resumed
    /// session or a certificate chain that is not libp2p-tls's; neither should happen).
    #[error("peer at {addr} completed the handshake without a libp2p identity")]
    MissingIdentity {
        /// The address dialed.
        addr: SocketAddr,
    },
}

/// Why [`Incoming::accept`] failed.
#[derive(Debug, Error)]
pub enum AcceptError {
    /// The handshake failed: the dialer presented no valid libp2p certificate, went silent, or
    /// the endpoint is closing.
    #[error("QUIC handshake with {addr} failed")]
    Handshake {
        /// The dialer's address.
        addr: SocketAddr,
        /// quinn's reason.
        #[source]
        source: ConnectionError,
    },
    /// The handshake completed but the dialer's identity could not be read back (should not
    /// happen: client certificates are mandatory and verified).
    #[error("peer at {addr} completed the handshake without a libp2p identity")]
    MissingIdentity {
        /// The dialer's address.
        addr: SocketAddr,
    },
}

/// A QUIC endpoint on one UDP socket that dials and accepts authenticated connections.
///
/// Cheap to clone: clones share the socket and its connections.
#[derive(Debug, Clone)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    local_peer_id: PeerId,
    /// The client TLS configuration for our identity; each dial clones it and installs a
    /// verifier for the PeerId it expects.
    client_crypto: Arc<rustls::ClientConfig>,
    transport: Arc<quinn::TransportConfig>,
}

impl Endpoint {
    /// Binds a UDP socket on `addr` and starts accepting connections on it as `keypair`.
    ///
    /// Must run inside a tokio runtime. Bind `127.0.0.1:0` in tests and read the port back with
    /// [`Endpoint::local_addr`].
    pub fn bind(
        addr: SocketAddr,
        keypair: &Keypair,
        config: &TransportConfig,
    ) -> Result<Self, BindError> {
        let runtime = quinn::default_runtime().ok_or(BindError::NoRuntime)?;
        let transport = Arc::new(config.to_quinn());

        let (server_crypto, client_crypto) = tls::configs(keypair)?;
        let server_crypto =
            QuicServerConfig::try_from(server_crypto).map_err(BindError::CipherSuite)?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server_config.transport_config(Arc::clone(&transport));
        // Checked here once rather than failing every dial.
        QuicClientConfig::try_from(client_crypto.clone()).map_err(BindError::CipherSuite)?;

        let socket_error = |source| BindError::Socket { addr, source };
        let socket = std::net::UdpSocket::bind(addr).map_err(socket_error)?;
        if config.udp_receive_buffer.is_some() || config.udp_send_buffer.is_some() {
            let state = quinn::udp::UdpSocketState::new((&socket).into()).map_err(socket_error)?;
            if let Some(bytes) = config.udp_receive_buffer {
                state.set_recv_buffer_size((&socket).into(), bytes).map_err(socket_error)?;
            }
            if let Some(bytes) = config.udp_send_buffer {
                state.set_send_buffer_size((&socket).into(), bytes).map_err(socket_error)?;
            }
        }
        let inner = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            runtime,
        )
        .map_err(socket_error)?;

        Ok(Self {
            inner,
            local_peer_id: keypair.public().to_peer_id(),
            client_crypto: Arc::new(client_crypto),
            transport,
        })
    }

    /// The address the socket is bound to (with the port the system chose for port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// This endpoint's identity.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// Dials `addr` and authenticates the remote as `expected`.
    ///
    /// Fails with [`ConnectError::PeerIdMismatch`] if the remote proves another identity; the
    /// handshake is aborted before any application data can flow. Bounded by the idle timeout
    /// when the remote does not answer.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: PeerId,
    ) -> Result<Connection, ConnectError> {
        let verifier = Arc::new(ExpectedPeer::new(expected));
        let mut crypto = rustls::ClientConfig::clone(&self.client_crypto);
        crypto.dangerous().set_certificate_verifier(Arc::clone(&verifier) as _);
        let crypto = QuicClientConfig::try_from(crypto).map_err(ConnectError::CipherSuite)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::clone(&self.transport));

        let connecting = self
            .inner
            .connect_with(config, addr, SERVER_NAME)
            .map_err(|source| ConnectError::Start { addr, source })?;
        let inner = match connecting.await {
            Ok(inner) => inner,
            Err(source) => {
                return Err(match verifier.presented() {
                    Some(actual) if actual != expected => {
                        ConnectError::PeerIdMismatch { addr, expected, actual }
                    }
                    _ => ConnectError::Handshake { addr, source },
                });
            }
        };
        // Belt and braces: read the identity back from the certificate the session holds.
        let Some(remote) = remote_peer_id(&inner) else {
            inner.close(CLOSE_NORMAL.into(), b"no identity");
            return Err(ConnectError::MissingIdentity { addr });
        };
        if remote != expected {
            inner.close(CLOSE_NORMAL.into(), b"unexpected identity");
            return Err(ConnectError::PeerIdMismatch { addr, expected, actual: remote });
        }
        Ok(Connection { inner, remote_peer_id: remote })
    }

    /// The next connection attempt from a dialer, or `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<Incoming> {
        self.inner.accept().await.map(|inner| Incoming { inner })
    }

    /// Closes every connection and stops accepting, then waits until the peers have been told
    /// (or the close timed out, at three probe timeouts). Streams still open fail with
    /// [`ConnectionError::LocallyClosed`].
    pub async fn close(&self) {
        self.inner.close(CLOSE_NORMAL.into(), b"endpoint closed");
        self.inner.wait_idle().await;
    }
}

/// A dialer's connection attempt, not yet authenticated.
#[derive(Debug)]
pub struct Incoming {
    inner: quinn::Incoming,
}

impl Incoming {
    /// The dialer's address (not yet validated).
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Runs the handshake; the dialer must present a valid libp2p certificate.
    pub async fn accept(self) -> Result<Connection, AcceptError> {
        let addr = self.inner.remote_address();
        let inner = match self.inner.accept() {
            Ok(connecting) => connecting.await,
            Err(source) => Err(source),
        }
        .map_err(|source| AcceptError::Handshake { addr, source })?;
        let Some(remote) = remote_peer_id(&inner) else {
            inner.close(CLOSE_NORMAL.into(), b"no identity");
            return Err(AcceptError::MissingIdentity { addr });
        };
        Ok(Connection { inner, remote_peer_id: remote })
    }

    /// Refuses the attempt without a handshake (e.g. the node is at its connection limit).
    pub fn refuse(self) {
        self.inner.refuse();
    }
}

/// An authenticated QUIC connection to one peer.
///
/// Cheap to clone: clones are handles to the same connection. Dropping every handle closes it.
#[derive(Debug, Clone)]
pub struct Connection {
    inner: quinn::Connection,
    remote_peer_id: PeerId,
}

impl Connection {
    /// The remote's identity, proved by its certificate during the handshake.
    pub fn remote_peer_id(&self) -> PeerId {
        self.remote_peer_id
    }

    /// The remote's current address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Opens a bidirectional stream. The remote learns of it when the first byte is sent.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        self.inner.open_bi().await
    }

    /// Opens a unidirectional stream. The remote learns of it when the first byte is sent.
    pub async fn open_uni(&self) -> Result<SendStream, ConnectionError> {
        self.inner.open_uni().await
    }

    /// Waits for the remote to open a bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        self.inner.accept_bi().await
    }

    /// Waits for the remote to open a unidirectional stream.
    pub async fn accept_uni(&self) -> Result<RecvStream, ConnectionError> {
        self.inner.accept_uni().await
    }

    /// Closes the connection at once with an application `code` and `reason` for the remote;
    /// unacknowledged stream data is abandoned (finish and await the streams first to deliver it).
    pub fn close(&self, code: u32, reason: &[u8]) {
        self.inner.close(code.into(), reason);
    }

    /// Waits until the connection is closed, by either side or a timeout, and says why.
    pub async fn closed(&self) -> ConnectionError {
        self.inner.closed().await
    }

    /// The quinn connection underneath, for statistics (RTT, congestion window, bytes lost).
    pub fn quic(&self) -> &quinn::Connection {
        &self.inner
    }
}

/// The PeerId proved by the certificate the remote presented in this connection's handshake.
fn remote_peer_id(connection: &quinn::Connection) -> Option<PeerId> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    let [certificate] = chain.as_slice() else {
        return None;
    };
    libp2p_tls::certificate::parse(certificate).ok().map(|certificate| certificate.peer_id())
}
