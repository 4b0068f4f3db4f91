//! The QUIC transport on loopback: bytes flow between authenticated peers, and a peer that cannot
//! prove the expected identity (or any libp2p identity) gets no connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fleetwave_node::transport::{
    ALPN, AcceptError, ConnectError, Connection, Endpoint, Incoming, TransportConfig,
};
use libp2p_identity::{Keypair, PeerId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::time::timeout;

/// Upper bound on any single await: loopback handshakes take milliseconds, so only a hang hits it.
const BOUND: Duration = Duration::from_secs(20);

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The tuned defaults with an idle timeout well inside [`BOUND`], so that even a handshake whose
/// last packet got lost ends in a typed error rather than in the test's timeout.
fn config() -> TransportConfig {
    TransportConfig { max_idle_timeout: Some(Duration::from_secs(5)), ..TransportConfig::default() }
}

fn endpoint(keypair: &Keypair) -> Result<Endpoint> {
    Ok(Endpoint::bind(loopback(), keypair, &config())?)
}

async fn next_incoming(endpoint: &Endpoint) -> Result<Incoming> {
    timeout(BOUND, endpoint.accept()).await?.context("endpoint closed")
}

/// Connects `client` to `server`, expecting `server`'s identity, and returns both ends.
async fn pair(client: &Endpoint, server: &Endpoint) -> Result<(Connection, Connection)> {
    let addr = server.local_addr()?;
    let (dialed, accepted) =
        tokio::join!(timeout(BOUND, client.connect(addr, server.local_peer_id())), async {
            anyhow::Ok(timeout(BOUND, next_incoming(server).await?.accept()).await?)
        });
    Ok((dialed??, accepted??))
}

#[tokio::test]
async fn peers_exchange_bytes_on_bi_and_uni_streams() -> Result<()> {
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let (client, server) = (endpoint(&a)?, endpoint(&b)?);
    let (dialed, accepted) = pair(&client, &server).await?;

    assert_eq!(dialed.remote_peer_id(), b.public().to_peer_id());
    assert_eq!(accepted.remote_peer_id(), a.public().to_peer_id());
    assert_eq!(accepted.remote_address(), client.local_addr()?);

    // Request on a bidirectional stream, the server answers on the same stream.
    let request: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let (mut send, mut recv) = dialed.open_bi().await?;
    send.write_all(&request).await?;
    send.finish()?;
    let (mut server_send, mut server_recv) = timeout(BOUND, accepted.accept_bi()).await??;
    let got = timeout(BOUND, server_recv.read_to_end(1 << 20)).await??;
    assert_eq!(got, request);
    server_send.write_all(b"piece").await?;
    server_send.finish()?;
    assert_eq!(timeout(BOUND, recv.read_to_end(1024)).await??, b"piece");

    // A piece pushed by the server on a unidirectional stream, larger than one packet window.
    let piece: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
    let mut push = accepted.open_uni().await?;
    push.write_all(&piece).await?;
    push.finish()?;
    let mut pushed = timeout(BOUND, dialed.accept_uni()).await??;
    assert_eq!(timeout(BOUND, pushed.read_to_end(4 << 20)).await??, piece);

    dialed.close(0, b"done");
    timeout(BOUND, accepted.closed()).await?;
    timeout(BOUND, client.close()).await?;
    timeout(BOUND, server.close()).await?;
    Ok(())
}

#[tokio::test]
async fn quinn_default_tuning_also_connects() -> Result<()> {
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let config = TransportConfig {
        max_idle_timeout: Some(Duration::from_secs(5)),
        ..TransportConfig::quinn_defaults()
    };
    let client = Endpoint::bind(loopback(), &a, &config)?;
    let server = Endpoint::bind(loopback(), &b, &config)?;
    let (dialed, accepted) = pair(&client, &server).await?;
    let mut send = dialed.open_uni().await?;
    send.write_all(b"hello").await?;
    send.finish()?;
    let mut recv = timeout(BOUND, accepted.accept_uni()).await??;
    assert_eq!(timeout(BOUND, recv.read_to_end(64)).await??, b"hello");
    Ok(())
}

#[tokio::test]
async fn wrong_expected_peer_id_is_refused_before_any_data() -> Result<()> {
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let (client, server) = (endpoint(&a)?, endpoint(&b)?);
    let addr = server.local_addr()?;
    let expected = PeerId::random();

    let (dialed, accepted) = tokio::join!(timeout(BOUND, client.connect(addr, expected)), async {
        let incoming = next_incoming(&server).await?;
        Ok::<_, anyhow::Error>(timeout(BOUND, incoming.accept()).await?)
    });
    match dialed? {
        Err(ConnectError::PeerIdMismatch { addr: got_addr, expected: got_expected, actual }) => {
            assert_eq!(got_addr, addr);
            assert_eq!(got_expected, expected);
            assert_eq!(actual, b.public().to_peer_id());
        }
        other => bail!("expected PeerIdMismatch, got {other:?}"),
    }
    // The dialer aborted inside the TLS handshake, so the listener never had a connection on
    // which a stream could be opened or a byte read.
    match accepted? {
        Err(AcceptError::Handshake { addr: got_addr, .. }) => {
            assert_eq!(got_addr, client.local_addr()?)
        }
        other => bail!("expected the listener's handshake to fail, got {other:?}"),
    }

    // The same endpoints still connect when the dialer expects the right identity.
    let (dialed, accepted) = pair(&client, &server).await?;
    assert_eq!(dialed.remote_peer_id(), b.public().to_peer_id());
    assert_eq!(accepted.remote_peer_id(), a.public().to_peer_id());
    Ok(())
}

/// A dialer that trusts any server and presents `client_auth` (or nothing).
fn plain_rustls_dialer(
    client_auth: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustAnything));
    let mut crypto = match client_auth {
        Some((certificate, key)) => builder.with_client_auth_cert(vec![certificate], key)?,
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?;
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(5).try_into()?));
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client(loopback())?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Dials `server` with `dialer` and returns what each side got.
async fn dial_plain(
    dialer: &quinn::Endpoint,
    server: &Endpoint,
) -> Result<(Result<quinn::Connection, quinn::ConnectionError>, Result<Connection, AcceptError>)> {
    let connecting = dialer.connect(server.local_addr()?, "l")?;
    let (dialed, accepted) = tokio::join!(timeout(BOUND, connecting), async {
        Ok::<_, anyhow::Error>(timeout(BOUND, next_incoming(server).await?.accept()).await?)
    });
    Ok((dialed?, accepted?))
}

#[tokio::test]
async fn dialer_with_plain_self_signed_certificate_is_refused() -> Result<()> {
    let server = endpoint(&Keypair::generate_ed25519())?;
    // A valid X.509 certificate, but without the libp2p extension that binds it to a PeerId.
    let certified = rcgen::generate_simple_self_signed(vec!["intruder".to_owned()])?;
    let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let dialer = plain_rustls_dialer(Some((certified.cert.der().clone(), key)))?;

    let (dialed, accepted) = dial_plain(&dialer, &server).await?;
    assert!(matches!(accepted, Err(AcceptError::Handshake { .. })), "got {accepted:?}");
    // TLS 1.3 lets a client finish before the server has checked its certificate; whatever the
    // dialer saw, the connection cannot carry data.
    if let Ok(connection) = dialed {
        let error = timeout(BOUND, connection.closed()).await?;
        assert!(matches!(error, quinn::ConnectionError::ConnectionClosed(_)), "got {error:?}");
    }
    Ok(())
}

#[tokio::test]
async fn dialer_without_certificate_is_refused() -> Result<()> {
    let server = endpoint(&Keypair::generate_ed25519())?;
    let dialer = plain_rustls_dialer(None)?;
    let (dialed, accepted) = dial_plain(&dialer, &server).await?;
    assert!(matches!(accepted, Err(AcceptError::Handshake { .. })), "got {accepted:?}");
    if let Ok(connection) = dialed {
        let error = timeout(BOUND, connection.closed()).await?;
        assert!(matches!(error, quinn::ConnectionError::ConnectionClosed(_)), "got {error:?}");
    }
    Ok(())
}

#[tokio::test]
async fn closed_endpoint_accepts_nothing_and_cannot_dial() -> Result<()> {
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let (client, server) = (endpoint(&a)?, endpoint(&b)?);
    let addr = server.local_addr()?;
    timeout(BOUND, client.close()).await?;
    assert!(timeout(BOUND, client.accept()).await?.is_none());
    let result = timeout(BOUND, client.connect(addr, b.public().to_peer_id())).await?;
    assert!(matches!(result, Err(ConnectError::Start { .. })), "got {result:?}");
    Ok(())
}

/// Accepts any server certificate: the tests above are about what the listener checks.
#[derive(Debug)]
struct TrustAnything;

impl ServerCertVerifier for TrustAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
