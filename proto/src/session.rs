//! Heartbeat sessions: the identity key is proved once per session, heartbeats carry a MAC.
//!
//! An ed25519 verification costs the coordinator about 60 us, and 50,000 hosts heartbeating
//! every 5 s ask for 10,000 of them a second. A session moves the signature to once an hour:
//!
//! 1. **Open** (`OpenSessionRequest`). The host makes a fresh X25519 key pair ([`Exchange`]),
//!    and signs [`open_message`] (its PeerId, the X25519 public key, the time) with its
//!    identity key. The coordinator checks that the host is enrolled, the signature, and that
//!    the time is within 5 minutes of its own.
//! 2. **Answer** (`OpenSessionResponse`). The session id is its expiry (ms since the Unix
//!    epoch, coordinator clock). The session key is derived, not stored:
//!    `HMAC-SHA256(coordinator secret, "fleetwave-session-key-v1" || len32 peer_id || peer_id
//!    || session)` ([`SessionKey::derive`]); the coordinator's secret is 32 random bytes kept
//!    in its store. The key travels sealed ([`seal`]): the coordinator makes its own X25519 key
//!    pair, and seals the key with ChaCha20-Poly1305 under `HKDF-SHA256(salt
//!    "fleetwave-session-wrap-v1", X25519 shared secret, info = transcript)`, where the
//!    transcript is peer id, session, and both X25519 public keys. Only the holder of the
//!    host's X25519 private key, which never leaves the host's memory, can read it. A captured
//!    open request is worthless: replayed, its answer is sealed to a key the replayer lacks.
//! 3. **Heartbeat** (`HeartbeatRequest`). PeerId, encoded report, session id, and
//!    `HMAC-SHA256(HMAC-SHA256(session key, "fleetwave-heartbeat-v2"), report)`
//!    ([`SessionKey::mac`]; the inner HMAC gives heartbeats a key of their own).
//!    The coordinator derives the key again (the session id names it), refuses an expired
//!    session, checks the MAC in constant time ([`SessionKey::verify`]), and refuses a report
//!    whose sequence does not grow (a replay within the session).
//!
//! What it costs: two HMACs per heartbeat, a few microseconds. What it keeps: only a host that
//! proved its identity key within the session's lifetime is heard; a session key authenticates
//! only the PeerId it was derived for (the PeerId is in the derivation); a replay is refused.
//! What changes: a stolen session key is good until the session ends (at most its lifetime,
//! an hour by default), where a signature was good for one report; replacing the coordinator's
//! secret ends every session at once. The coordinator is not authenticated to the host by this
//! (as before: run the gRPC port on a private network or behind TLS); an active attacker who
//! can rewrite answers can deny service, not learn a session key.
//!
//! Keys never appear in logs: [`SessionKey`]'s `Debug` prints nothing of it.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::hkdf;
use ring::hmac;
use ring::rand::SystemRandom;

/// Domain of an open-session signature.
pub const OPEN_DOMAIN: &[u8] = b"fleetwave-open-session-v1";
/// Domain of the session key derivation.
pub const KEY_DOMAIN: &[u8] = b"fleetwave-session-key-v1";
/// HKDF salt of the key that seals a session key in transit.
pub const WRAP_SALT: &[u8] = b"fleetwave-session-wrap-v1";
/// Domain of the heartbeat MAC key (derived from the session key).
pub const MAC_DOMAIN: &[u8] = b"fleetwave-heartbeat-v2";
/// Length of a session key, of the coordinator's secret, and of a MAC.
pub const KEY_LEN: usize = 32;
/// Length of an X25519 public key.
pub const EXCHANGE_KEY_LEN: usize = 32;
/// Length of a sealed session key: the key and a 16-byte Poly1305 tag.
pub const SEALED_LEN: usize = KEY_LEN + 16;

/// A session operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// An X25519 public key is not 32 bytes or is of small order.
    #[error("the X25519 key does not agree")]
    Exchange,
    /// The sealed session key does not open (tampered with, or not for this exchange).
    #[error("the sealed session key does not open")]
    Sealed,
    /// The system's random source failed.
    #[error("no randomness")]
    Random,
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(b);
}

/// What an `OpenSessionRequest`'s signature covers.
pub fn open_message(peer_id: &[u8], exchange_key: &[u8], timestamp_ms: u64) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(OPEN_DOMAIN.len() + 8 + peer_id.len() + exchange_key.len() + 8);
    out.extend_from_slice(OPEN_DOMAIN);
    put_bytes(&mut out, peer_id);
    put_bytes(&mut out, exchange_key);
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    out
}

/// The coordinator's secret, from which every session key is derived.
pub struct CoordinatorSecret(hmac::Key);

impl CoordinatorSecret {
    /// The secret from its 32 stored bytes.
    pub fn new(bytes: &[u8; KEY_LEN]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// 32 fresh random bytes for a new secret.
    pub fn generate() -> Result<[u8; KEY_LEN], SessionError> {
        ring::rand::generate(&SystemRandom::new())
            .map(|r| r.expose())
            .map_err(|_| SessionError::Random)
    }
}

impl std::fmt::Debug for CoordinatorSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CoordinatorSecret(..)")
    }
}

/// A session key (32 bytes). Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct SessionKey {
    bytes: [u8; KEY_LEN],
    mac: hmac::Key,
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        // The heartbeat MAC key, separated from other uses of the session key by its domain.
        let mac_key = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &bytes), MAC_DOMAIN);
        Self { mac: hmac::Key::new(hmac::HMAC_SHA256, mac_key.as_ref()), bytes }
    }

    /// The key of session `session` (its expiry, ms) of the host `peer_id` (PeerId bytes).
    pub fn derive(secret: &CoordinatorSecret, peer_id: &[u8], session: u64) -> Self {
        let mut ctx = hmac::Context::with_key(&secret.0);
        ctx.update(KEY_DOMAIN);
        ctx.update(&u32::try_from(peer_id.len()).unwrap_or(u32::MAX).to_le_bytes());
        ctx.update(peer_id);
        ctx.update(&session.to_le_bytes());
        let mut bytes = [0u8; KEY_LEN];
        bytes.copy_from_slice(ctx.sign().as_ref());
        Self::from_bytes(bytes)
    }

    /// The MAC of an encoded report.
    pub fn mac(&self, report: &[u8]) -> [u8; KEY_LEN] {
        let mut out = [0u8; KEY_LEN];
        out.copy_from_slice(hmac::sign(&self.mac, report).as_ref());
        out
    }

    /// Whether `mac` is the MAC of `report` (compared in constant time).
    pub fn verify(&self, report: &[u8], mac: &[u8]) -> bool {
        hmac::verify(&self.mac, report, mac).is_ok()
    }
}

/// The transcript an exchange's sealing key is bound to.
fn transcript(peer_id: &[u8], session: u64, host_key: &[u8], coordinator_key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + peer_id.len() + 8 + 8 + 2 * EXCHANGE_KEY_LEN);
    put_bytes(&mut out, peer_id);
    out.extend_from_slice(&session.to_le_bytes());
    put_bytes(&mut out, host_key);
    put_bytes(&mut out, coordinator_key);
    out
}

fn sealing_key(shared: &[u8], transcript: &[u8]) -> Result<LessSafeKey, SessionError> {
    let info = [transcript];
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, WRAP_SALT).extract(shared);
    let okm = prk.expand(&info, &aead::CHACHA20_POLY1305).map_err(|_| SessionError::Exchange)?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

/// Coordinator side: seals `key` (of session `session` of `peer_id`) to the host's X25519
/// public key. Returns the coordinator's X25519 public key and the sealed key.
pub fn seal(
    key: &SessionKey,
    peer_id: &[u8],
    session: u64,
    host_exchange_key: &[u8],
) -> Result<([u8; EXCHANGE_KEY_LEN], Vec<u8>), SessionError> {
    let rng = SystemRandom::new();
    let private = EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| SessionError::Random)?;
    let mut public = [0u8; EXCHANGE_KEY_LEN];
    public
        .copy_from_slice(private.compute_public_key().map_err(|_| SessionError::Random)?.as_ref());
    let transcript = transcript(peer_id, session, host_exchange_key, &public);
    let sealing = agreement::agree_ephemeral(
        private,
        &UnparsedPublicKey::new(&X25519, host_exchange_key),
        |shared| sealing_key(shared, &transcript),
    )
    .map_err(|_| SessionError::Exchange)??;
    let mut sealed = key.bytes.to_vec();
    // The sealing key is used once (fresh X25519 keys on both sides): a fixed nonce is safe.
    sealing
        .seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::empty(), &mut sealed)
        .map_err(|_| SessionError::Sealed)?;
    Ok((public, sealed))
}

/// Host side: a fresh X25519 key pair to open one session with.
pub struct Exchange {
    private: EphemeralPrivateKey,
    public: [u8; EXCHANGE_KEY_LEN],
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange").field("public", &self.public).finish_non_exhaustive()
    }
}

impl Exchange {
    /// A fresh key pair.
    pub fn new() -> Result<Self, SessionError> {
        let private = EphemeralPrivateKey::generate(&X25519, &SystemRandom::new())
            .map_err(|_| SessionError::Random)?;
        let mut public = [0u8; EXCHANGE_KEY_LEN];
        public.copy_from_slice(
            private.compute_public_key().map_err(|_| SessionError::Random)?.as_ref(),
        );
        Ok(Self { private, public })
    }

    /// The public key to send in `OpenSessionRequest.exchange_key`.
    pub fn public_key(&self) -> &[u8; EXCHANGE_KEY_LEN] {
        &self.public
    }

    /// Opens the session key the coordinator answered with.
    pub fn open(
        self,
        peer_id: &[u8],
        session: u64,
        coordinator_exchange_key: &[u8],
        sealed: &[u8],
    ) -> Result<SessionKey, SessionError> {
        if sealed.len() != SEALED_LEN {
            return Err(SessionError::Sealed);
        }
        let transcript = transcript(peer_id, session, &self.public, coordinator_exchange_key);
        let opening = agreement::agree_ephemeral(
            self.private,
            &UnparsedPublicKey::new(&X25519, coordinator_exchange_key),
            |shared| sealing_key(shared, &transcript),
        )
        .map_err(|_| SessionError::Exchange)??;
        let mut buf = sealed.to_vec();
        let plain = opening
            .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::empty(), &mut buf)
            .map_err(|_| SessionError::Sealed)?;
        let bytes: [u8; KEY_LEN] = (&*plain).try_into().map_err(|_| SessionError::Sealed)?;
        Ok(SessionKey::from_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> CoordinatorSecret {
        CoordinatorSecret::new(&[7; KEY_LEN])
    }

    #[test]
    fn the_host_opens_what_the_coordinator_sealed() {
        let peer = b"peer-a";
        let key = SessionKey::derive(&secret(), peer, 1_000);
        let exchange = Exchange::new().expect("exchange");
        let (coordinator, sealed) = seal(&key, peer, 1_000, exchange.public_key()).expect("seal");
        let opened = exchange.open(peer, 1_000, &coordinator, &sealed).expect("open");
        let mac = opened.mac(b"report");
        assert!(key.verify(b"report", &mac));
        assert!(!key.verify(b"other report", &mac));
        assert!(!key.verify(b"report", &mac[..31]), "a short MAC is refused");
    }

    #[test]
    fn a_sealed_key_opens_only_for_its_transcript() {
        let key = SessionKey::derive(&secret(), b"peer-a", 1_000);
        let exchange = Exchange::new().expect("exchange");
        let (coordinator, sealed) =
            seal(&key, b"peer-a", 1_000, exchange.public_key()).expect("seal");
        let mut tampered = sealed.clone();
        tampered[0] ^= 1;
        let fresh = || Exchange::new().expect("exchange");
        // Another host's exchange key (a replayed open request) cannot open it.
        assert_eq!(
            fresh().open(b"peer-a", 1_000, &coordinator, &sealed).map(drop),
            Err(SessionError::Sealed)
        );
        assert_eq!(
            exchange.open(b"peer-a", 1_000, &coordinator, &tampered).map(drop),
            Err(SessionError::Sealed)
        );
        // A small-order point does not agree.
        assert_eq!(
            fresh().open(b"peer-a", 1_000, &[0; 32], &sealed).map(drop),
            Err(SessionError::Exchange)
        );
    }

    #[test]
    fn keys_are_bound_to_peer_session_and_secret() {
        let k = SessionKey::derive(&secret(), b"peer-a", 1_000).mac(b"r");
        assert_ne!(k, SessionKey::derive(&secret(), b"peer-b", 1_000).mac(b"r"));
        assert_ne!(k, SessionKey::derive(&secret(), b"peer-a", 1_001).mac(b"r"));
        let other = CoordinatorSecret::new(&[8; KEY_LEN]);
        assert_ne!(k, SessionKey::derive(&other, b"peer-a", 1_000).mac(b"r"));
        assert_eq!(format!("{:?}", SessionKey::derive(&secret(), b"peer-a", 1)), "SessionKey(..)");
    }
}
