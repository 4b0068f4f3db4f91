//! The TLS side of the transport: libp2p-tls certificates inside rustls configurations built
//! here, and the certificate checks of both handshake roles.
//!
//! libp2p-tls has configurations and verifiers of its own, but its verifiers are private to that
//! crate, say only "application verification failure" when the identity differs, and come inside
//! configurations that put ChaCha20-Poly1305 first (see [`crypto_provider`]). The verifiers here
//! do the same checks with [`libp2p_tls::certificate::parse`] (the libp2p extension, its
//! signature by the identity key, the validity period) and
//! [`P2pCertificate::verify_signature`] (the TLS handshake signature by the certificate key),
//! and the dialer's verifier records which PeerId it saw so that `Endpoint::connect` can name
//! both identities in its error.
//!
//! [`P2pCertificate::verify_signature`]: libp2p_tls::certificate::P2pCertificate::verify_signature

use std::sync::{Arc, OnceLock};

use libp2p_identity::{Keypair, PeerId};
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, PeerIncompatible, SignatureScheme,
};

use super::{ALPN, BindError};

/// The crypto provider of every handshake: ring, TLS 1.3 suites only, AES-128-GCM first.
///
/// libp2p-tls's own configurations put ChaCha20-Poly1305 first, and on loopback that cipher was
/// a quarter of all CPU time (perf). AES-GCM runs on the AES and carry-less multiply instructions
/// every server CPU of the last decade has, and AES-128-GCM is also the suite QUIC's Initial
/// packets use. ChaCha20-Poly1305 stays acceptable for peers that prefer it.
fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites =
        vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256];
    Arc::new(provider)
}

/// The TLS configurations of an endpoint with `keypair`'s identity: a libp2p-tls certificate,
/// TLS 1.3, mandatory client certificates, ALPN [`ALPN`], no session resumption. The client
/// configuration is a template whose verifier refuses everything until a dial installs the
/// [`ExpectedPeer`] it wants.
pub(super) fn configs(
    keypair: &Keypair,
) -> Result<(rustls::ServerConfig, rustls::ClientConfig), BindError> {
    let (certificate, key) =
        libp2p_tls::certificate::generate(keypair).map_err(BindError::Certificate)?;
    let provider = crypto_provider();
    // Not `with_single_cert`: rustls would parse the certificate with webpki to match it against
    // the key, and webpki rejects the libp2p extension it does not know (which is critical).
    let signing_key = provider.key_provider.load_private_key(key).map_err(BindError::Tls)?;
    let own = Arc::new(OwnCertificate(Arc::new(CertifiedKey::new(vec![certificate], signing_key))));
    let versions = &[&rustls::version::TLS13];

    let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(BindError::Tls)?
        .with_client_cert_verifier(Arc::new(AnyLibp2pPeer))
        .with_cert_resolver(Arc::clone(&own) as _);
    server.alpn_protocols = vec![ALPN.to_vec()];
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;

    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(BindError::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoPeerExpected))
        .with_client_cert_resolver(own);
    client.alpn_protocols = vec![ALPN.to_vec()];
    client.resumption = rustls::client::Resumption::disabled();
    Ok((server, client))
}

/// Our certificate, presented in both roles whatever the remote asks for (libp2p peers have
/// no CA to choose by).
#[derive(Debug)]
struct OwnCertificate(Arc<CertifiedKey>);

impl ResolvesClientCert for OwnCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for OwnCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// The dialer's verifier: accepts exactly one server, one whose libp2p certificate proves
/// `expected`.
#[derive(Debug)]
pub(crate) struct ExpectedPeer {
    expected: PeerId,
    /// The PeerId the server's certificate proved, set once the certificate parsed and its
    /// libp2p extension verified, whether or not it was the expected one.
    presented: OnceLock<PeerId>,
}

impl ExpectedPeer {
    pub(crate) fn new(expected: PeerId) -> Self {
        Self { expected, presented: OnceLock::new() }
    }

    /// The PeerId the server's certificate proved, if the handshake got that far.
    pub(crate) fn presented(&self) -> Option<PeerId> {
        self.presented.get().copied()
    }
}

impl ServerCertVerifier for ExpectedPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = verify_presented(end_entity, intermediates)?;
        // A verifier serves one connection attempt, so this is the only certificate it sees.
        let _ = self.presented.set(presented);
        // The libp2p TLS spec: the dialer MUST abort if the PeerId differs from the one it
        // intended to connect to.
        if presented != self.expected {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// The placeholder verifier of an endpoint's template client configuration: it refuses every
/// server, so a dial that forgot to install an [`ExpectedPeer`] fails closed.
#[derive(Debug)]
pub(crate) struct NoPeerExpected;

impl ServerCertVerifier for NoPeerExpected {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// The listener's verifier: a client certificate is mandatory and must be a valid libp2p
/// certificate; which PeerIds are welcome is the caller's decision after the handshake.
#[derive(Debug)]
pub(crate) struct AnyLibp2pPeer;

impl ClientCertVerifier for AnyLibp2pPeer {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_presented(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// Checks a presented chain: exactly one self-signed libp2p certificate, no intermediates (the
/// libp2p TLS spec). Returns the PeerId it proves.
fn verify_presented(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<PeerId, rustls::Error> {
    if !intermediates.is_empty() {
        return Err(rustls::Error::InvalidCertificate(CertificateError::BadEncoding));
    }
    Ok(libp2p_tls::certificate::parse(end_entity)?.peer_id())
}

/// Checks the handshake signature against the certificate's key.
fn verify_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    libp2p_tls::certificate::parse(cert)?.verify_signature(dss.scheme, message, dss.signature())?;
    Ok(HandshakeSignatureValid::assertion())
}

/// Only TLS 1.3 is configured, so rustls never asks for a TLS 1.2 signature; refuse if it does.
fn refuse_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(PeerIncompatible::Tls13RequiredForQuic))
}

/// The schemes libp2p-tls can verify with ring, most preferred first (its own list).
fn schemes() -> Vec<SignatureScheme> {
    vec![
        SignatureScheme::ECDSA_NISTP384_SHA384,
        SignatureScheme::ECDSA_NISTP256_SHA256,
        SignatureScheme::ED25519,
        SignatureScheme::RSA_PSS_SHA512,
        SignatureScheme::RSA_PSS_SHA384,
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PKCS1_SHA512,
        SignatureScheme::RSA_PKCS1_SHA384,
        SignatureScheme::RSA_PKCS1_SHA256,
    ]
}
