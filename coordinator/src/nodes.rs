//! The gRPC service hosts talk to: enrollment, sessions and heartbeats
//! (`fleetwave.v1.NodeControl`).
//!
//! # Protocol
//!
//! - **Enroll** (`EnrollRequest`): the host sends a join token, its identity public key
//!   (libp2p protobuf encoding; ed25519), its region, environment and name, the time, and a
//!   signature by that key over `fleetwave_proto::signing::enroll_message(..)`. The coordinator
//!   checks the token against the hashes it was configured with (never storing the token), the
//!   signature, and that the time is within [`MAX_CLOCK_SKEW`] of its own (a captured request
//!   cannot be replayed later). The host's id is its PeerId. Enrolling again with the same key
//!   is idempotent (labels are updated). Errors: `UNAUTHENTICATED` (token or signature),
//!   `INVALID_ARGUMENT` (fields).
//! - **OpenSession** (`OpenSessionRequest`): the host proves its identity key once per
//!   [`SESSION_LIFETIME`]: a signature over `fleetwave_proto::session::open_message(peer_id,
//!   X25519 key, time)`, the time within [`MAX_CLOCK_SKEW`]. The answer is the session id (its
//!   expiry, ms since the Unix epoch) and the session key sealed to the host's X25519 key (see
//!   [`fleetwave_proto::session`] for the derivation: the coordinator keeps no per-session
//!   state, the key is an HMAC of the session id and PeerId under the secret in its store, so
//!   sessions survive a restart). Errors: `UNAUTHENTICATED` (the host is not enrolled: it
//!   enrolls again; or the signature or time is wrong), `INVALID_ARGUMENT` (fields).
//! - **Heartbeat** (`HeartbeatRequest`): the host's PeerId, an encoded `HostReport`, the
//!   session id and the report's MAC under the session key. Refused `UNAUTHENTICATED` when the
//!   session has expired, names an expiry the coordinator would not have given, or the MAC
//!   does not verify (a forged report, or a session of a replaced coordinator secret): the
//!   host opens a new session. Only enrolled hosts are heard (`UNAUTHENTICATED` otherwise: the
//!   host's next session opening tells it to enroll again), and only reports whose `sequence`
//!   grows (`FAILED_PRECONDITION` for a replay or a stale report; hosts use the time in
//!   milliseconds, so a restarted host still grows). The answer, given only once the report
//!   and every transition it caused are durable, is the host's desired state per service and
//!   the interval until the next heartbeat. Repeating a report, or a host restarting, is
//!   harmless: reconciling is idempotent on both sides.
//!
//! The MAC is checked and the report decoded before the fleet's lock is taken: under it, a
//! heartbeat costs a map lookup, the replay check, one sled insert of the report as received,
//! and the rollout engines' events when a deployment is running in the host's environment.
//!
//! # Limits
//!
//! A message is at most [`MAX_MESSAGE`] bytes (tonic refuses larger ones before decoding);
//! a report names at most [`MAX_SERVICES`] services and [`MAX_MANIFESTS`] manifests; strings
//! are at most 128 bytes.

use std::sync::Arc;
use std::time::Duration;

use fleetwave_proto::session::{self, EXCHANGE_KEY_LEN, SessionKey};
use fleetwave_proto::signing;
use fleetwave_proto::v1 as pb;
use libp2p_identity::{PeerId, PublicKey};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::daemon::{Metrics, Shared};
use crate::fleet::FleetError;
use crate::rollout::ManifestId;
use crate::store::{HostActual, ReportError};
pub use crate::store::{MAX_MANIFESTS, MAX_SERVICES};

/// Largest gRPC message accepted.
pub const MAX_MESSAGE: usize = 1 << 20;
/// How far an enrollment's or session opening's time may be from the coordinator's.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
/// How long a heartbeat session lasts: the longest a stolen session key is any good, against
/// one identity-key verification per host per session (50,000 hosts: 14 a second).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(3600);

/// The NodeControl service.
#[derive(Debug, Clone)]
pub struct NodeService {
    shared: Arc<Shared>,
}

impl NodeService {
    /// A service over the coordinator's shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The tonic server, with the message limit.
    pub fn server(self) -> pb::node_control_server::NodeControlServer<Self> {
        pb::node_control_server::NodeControlServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

fn short(field: &str, s: &str) -> Result<(), Status> {
    if s.len() > 128 {
        return Err(Status::invalid_argument(format!("{field} is longer than 128 bytes")));
    }
    Ok(())
}

/// Converts a report into the coordinator's record, checking its limits.
pub fn actual_from_report(report: &pb::HostReport) -> Result<HostActual, Status> {
    HostActual::try_from(report).map_err(|e: ReportError| Status::invalid_argument(e.to_string()))
}

/// The coordinator's time, if a signed request's `timestamp_ms` is within [`MAX_CLOCK_SKEW`]
/// of it (a captured request cannot be replayed later); refused and counted under `reason`
/// otherwise.
fn clock_checked(
    metrics: &Metrics,
    reason: &'static str,
    what: &str,
    timestamp_ms: u64,
) -> Result<Duration, Status> {
    let now = crate::daemon::now();
    let skew = now.abs_diff(Duration::from_millis(timestamp_ms));
    if skew > MAX_CLOCK_SKEW {
        metrics.refused(reason);
        return Err(Status::unauthenticated(format!(
            "{what} time is {}s away from the coordinator's clock",
            skew.as_secs()
        )));
    }
    Ok(now)
}

fn ms(t: Duration) -> u64 {
    u64::try_from(t.as_millis()).unwrap_or(u64::MAX)
}

fn fleet_status(e: FleetError) -> Status {
    match e {
        FleetError::Replay { .. } => Status::failed_precondition(e.to_string()),
        FleetError::NotFound { .. } => Status::unauthenticated(e.to_string()),
        FleetError::Invalid(_) => Status::invalid_argument(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

#[tonic::async_trait]
impl pb::node_control_server::NodeControl for NodeService {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let r = request.into_inner();
        let metrics = &self.shared.metrics;
        for (field, s) in
            [("region", &r.region), ("environment", &r.environment), ("name", &r.name)]
        {
            short(field, s)?;
        }
        if !self.shared.join_token_ok(&r.join_token) {
            metrics.refused("enroll_token");
            tracing::warn!(region = %r.region, name = %r.name, "enrollment refused: bad join token");
            return Err(Status::unauthenticated("join token refused"));
        }
        let key = PublicKey::try_decode_protobuf(&r.public_key)
            .map_err(|_| Status::invalid_argument("public_key does not decode"))?;
        let message = signing::enroll_message(
            &r.join_token,
            &r.region,
            &r.environment,
            &r.name,
            r.timestamp_ms,
        );
        if !key.verify(&message, &r.signature) {
            metrics.refused("enroll_signature");
            return Err(Status::unauthenticated("enrollment signature does not verify"));
        }
        let now = clock_checked(metrics, "enroll_clock", "enrollment", r.timestamp_ms)?;
        let peer = key.to_peer_id();
        let record = {
            let mut fleet = self.shared.fleet.lock().map_err(|_| Status::internal("poisoned"))?;
            fleet
                .enroll(now, peer, r.public_key.clone(), r.region, r.environment, r.name)
                .map_err(fleet_status)?
        };
        let peer = peer.to_base58();
        self.shared.store.commit().await;
        tracing::info!(host = %peer, region = %record.region, env = %record.environment, "host enrolled");
        Ok(Response::new(pb::EnrollResponse {
            host_id: peer,
            heartbeat_interval_ms: self.shared.heartbeat_interval_ms(),
        }))
    }

    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        let r = request.into_inner();
        let metrics = &self.shared.metrics;
        let peer = PeerId::from_bytes(&r.peer_id)
            .map_err(|_| Status::invalid_argument("peer_id does not decode"))?;
        if r.exchange_key.len() != EXCHANGE_KEY_LEN {
            return Err(Status::invalid_argument("exchange_key is 32 bytes (X25519)"));
        }
        let found = {
            let fleet = self.shared.fleet.lock().map_err(|_| Status::internal("poisoned"))?;
            fleet.host_by_peer(&peer)
        };
        let Some((_, key)) = found else {
            metrics.refused("session_unknown_host");
            return Err(Status::unauthenticated(format!("{peer} is not enrolled")));
        };
        let key = key.ok_or_else(|| Status::internal("stored key"))?;
        let message = session::open_message(&r.peer_id, &r.exchange_key, r.timestamp_ms);
        if !key.verify(&message, &r.signature) {
            metrics.refused("session_signature");
            tracing::warn!(host = %peer, "session opening signature does not verify");
            return Err(Status::unauthenticated("session opening signature does not verify"));
        }
        let now = clock_checked(metrics, "session_clock", "session opening", r.timestamp_ms)?;
        let id = ms(now + SESSION_LIFETIME);
        let session_key = SessionKey::derive(&self.shared.session_secret, &r.peer_id, id);
        let (exchange_key, sealed_key) =
            session::seal(&session_key, &r.peer_id, id, &r.exchange_key)
                .map_err(|e| Status::invalid_argument(format!("exchange_key: {e}")))?;
        tracing::debug!(host = %peer, session = id, "session opened");
        Ok(Response::new(pb::OpenSessionResponse {
            session: id,
            expires_in_ms: ms(SESSION_LIFETIME),
            exchange_key: exchange_key.to_vec(),
            sealed_key,
            heartbeat_interval_ms: self.shared.heartbeat_interval_ms(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let started = tokio::time::Instant::now();
        let r = request.into_inner();
        let metrics = &self.shared.metrics;
        let peer = PeerId::from_bytes(&r.peer_id)
            .map_err(|_| Status::invalid_argument("peer_id does not decode"))?;
        let now = crate::daemon::now();
        if r.session <= ms(now) {
            metrics.refused("heartbeat_session_expired");
            return Err(Status::unauthenticated("session expired: open a new one"));
        }
        if r.session > ms(now + SESSION_LIFETIME + MAX_CLOCK_SKEW) {
            metrics.refused("heartbeat_session_unknown");
            return Err(Status::unauthenticated("unknown session: open a new one"));
        }
        let key = SessionKey::derive(&self.shared.session_secret, &r.peer_id, r.session);
        if !key.verify(&r.report, &r.mac) {
            metrics.refused("heartbeat_mac");
            tracing::warn!(host = %peer, "heartbeat MAC does not verify");
            return Err(Status::unauthenticated(
                "heartbeat MAC does not verify under its session: open a new one",
            ));
        }
        let report = pb::HostReport::decode(r.report.as_slice())
            .map_err(|e| Status::invalid_argument(format!("report does not decode: {e}")))?;
        let actual = actual_from_report(&report)?;
        drop(report);
        let desired = {
            let mut fleet = self.shared.fleet.lock().map_err(|_| Status::internal("poisoned"))?;
            fleet.heartbeat(now, &peer, actual, &r.report).map_err(|e| {
                metrics.refused(match e {
                    FleetError::NotFound { .. } => "heartbeat_unknown",
                    _ => "heartbeat_stale",
                });
                fleet_status(e)
            })?
        };
        // Durable before anyone acts on it.
        self.shared.store.commit().await;
        metrics.heartbeat(started.elapsed());
        let id = |m: Option<ManifestId>| m.map(|m| m.0.to_vec()).unwrap_or_default();
        Ok(Response::new(pb::HeartbeatResponse {
            desired: desired
                .into_iter()
                .map(|d| pb::DesiredService {
                    service: d.service,
                    active: id(d.desired.active),
                    standby: id(d.desired.standby),
                    stage: id(d.desired.stage),
                })
                .collect(),
            heartbeat_interval_ms: self.shared.heartbeat_interval_ms(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use fleetwave_proto::session::{Exchange, SessionKey};
    use fleetwave_proto::v1::node_control_server::NodeControl;
    use libp2p_identity::Keypair;
    use tonic::Code;

    use super::*;

    const TOKEN: &str = "a-join-token-only-for-tests";

    struct Fixture {
        _dir: tempfile::TempDir,
        shared: Arc<Shared>,
        service: NodeService,
    }

    fn now_ms() -> u64 {
        ms(crate::daemon::now())
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let release = fleetwave_chunker::SigningKey::generate()
            .write_files(&dir.path().join("release.key"))
            .expect("release key");
        let config = crate::daemon::Config {
            data_dir: dir.path().join("data"),
            trust: vec![release],
            join_token_sha256: vec![crate::auth::hash_token(TOKEN)],
            ..crate::daemon::Config::default()
        };
        let shared = crate::daemon::open(&config).expect("open");
        tokio::spawn(shared.store.clone().run_committer());
        let service = NodeService::new(shared.clone());
        Fixture { _dir: dir, shared, service }
    }

    async fn enroll(service: &NodeService, host: &Keypair) {
        let timestamp_ms = now_ms();
        let message = signing::enroll_message(TOKEN, "eu", "prod", "h1", timestamp_ms);
        service
            .enroll(Request::new(pb::EnrollRequest {
                join_token: TOKEN.into(),
                public_key: host.public().encode_protobuf(),
                region: "eu".into(),
                environment: "prod".into(),
                name: "h1".into(),
                timestamp_ms,
                signature: host.sign(&message).expect("sign"),
            }))
            .await
            .expect("enrolled");
    }

    fn open_request(
        host: &Keypair,
        exchange: &Exchange,
        timestamp_ms: u64,
    ) -> pb::OpenSessionRequest {
        let peer_id = host.public().to_peer_id().to_bytes();
        let message = session::open_message(&peer_id, exchange.public_key(), timestamp_ms);
        pb::OpenSessionRequest {
            peer_id,
            exchange_key: exchange.public_key().to_vec(),
            timestamp_ms,
            signature: host.sign(&message).expect("sign"),
        }
    }

    async fn open(service: &NodeService, host: &Keypair) -> (u64, SessionKey) {
        let exchange = Exchange::new().expect("exchange");
        let answer = service
            .open_session(Request::new(open_request(host, &exchange, now_ms())))
            .await
            .expect("session opened")
            .into_inner();
        let peer_id = host.public().to_peer_id().to_bytes();
        let key = exchange
            .open(&peer_id, answer.session, &answer.exchange_key, &answer.sealed_key)
            .expect("the sealed key opens");
        (answer.session, key)
    }

    fn beat(host: &Keypair, session: u64, key: &SessionKey, sequence: u64) -> pb::HeartbeatRequest {
        let report = pb::HostReport { sequence, agent_version: "t".into(), ..Default::default() }
            .encode_to_vec();
        pb::HeartbeatRequest {
            peer_id: host.public().to_peer_id().to_bytes(),
            mac: key.mac(&report).to_vec(),
            session,
            report,
        }
    }

    async fn code_of(service: &NodeService, request: pb::HeartbeatRequest) -> Code {
        match service.heartbeat(Request::new(request)).await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        }
    }

    #[tokio::test]
    async fn heartbeats_in_a_session_are_heard_and_replays_refused() {
        let f = fixture().await;
        let host = Keypair::generate_ed25519();
        enroll(&f.service, &host).await;
        let (session, key) = open(&f.service, &host).await;
        assert_eq!(code_of(&f.service, beat(&host, session, &key, 1)).await, Code::Ok);
        assert_eq!(
            code_of(&f.service, beat(&host, session, &key, 1)).await,
            Code::FailedPrecondition
        );
        assert_eq!(code_of(&f.service, beat(&host, session, &key, 2)).await, Code::Ok);
        // A second session of the same host continues the same sequence.
        let (session2, key2) = open(&f.service, &host).await;
        assert_eq!(
            code_of(&f.service, beat(&host, session2, &key2, 2)).await,
            Code::FailedPrecondition
        );
        assert_eq!(code_of(&f.service, beat(&host, session2, &key2, 3)).await, Code::Ok);
    }

    #[tokio::test]
    async fn a_bad_mac_is_refused() {
        let f = fixture().await;
        let (host, other) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        enroll(&f.service, &host).await;
        enroll(&f.service, &other).await;
        let (session, key) = open(&f.service, &host).await;
        let mut tampered = beat(&host, session, &key, 1);
        tampered.report =
            pb::HostReport { sequence: 1, agent_version: "x".into(), ..Default::default() }
                .encode_to_vec();
        assert_eq!(code_of(&f.service, tampered).await, Code::Unauthenticated);
        let mut truncated = beat(&host, session, &key, 1);
        truncated.mac.truncate(16);
        assert_eq!(code_of(&f.service, truncated).await, Code::Unauthenticated);
        // One host's session key does not speak for another host.
        let mut borrowed = beat(&host, session, &key, 1);
        borrowed.peer_id = other.public().to_peer_id().to_bytes();
        assert_eq!(code_of(&f.service, borrowed).await, Code::Unauthenticated);
        // Naming another session id changes the key.
        assert_eq!(
            code_of(&f.service, beat(&host, session - 1, &key, 1)).await,
            Code::Unauthenticated
        );
        assert_eq!(code_of(&f.service, beat(&host, session, &key, 1)).await, Code::Ok);
    }

    #[tokio::test]
    async fn expired_and_unknown_sessions_are_refused() {
        let f = fixture().await;
        let host = Keypair::generate_ed25519();
        enroll(&f.service, &host).await;
        let peer_id = host.public().to_peer_id().to_bytes();
        // Keys the coordinator would derive for sessions that ended, or that it never gave
        // (beyond the longest lifetime): MACs that verify, refused for the session alone.
        let derive = |session| SessionKey::derive(&f.shared.session_secret, &peer_id, session);
        let ended = now_ms() - 1;
        assert_eq!(
            code_of(&f.service, beat(&host, ended, &derive(ended), 1)).await,
            Code::Unauthenticated
        );
        let beyond = now_ms() + ms(SESSION_LIFETIME + MAX_CLOCK_SKEW) + 60_000;
        assert_eq!(
            code_of(&f.service, beat(&host, beyond, &derive(beyond), 1)).await,
            Code::Unauthenticated
        );
        let current = now_ms() + ms(SESSION_LIFETIME);
        assert_eq!(code_of(&f.service, beat(&host, current, &derive(current), 1)).await, Code::Ok);
    }

    #[tokio::test]
    async fn sessions_are_opened_only_for_enrolled_hosts_proving_their_key() {
        let f = fixture().await;
        let host = Keypair::generate_ed25519();
        let refused = |r: Result<Response<pb::OpenSessionResponse>, Status>| {
            r.map(drop).map_err(|s| s.code())
        };
        let exchange = Exchange::new().expect("exchange");
        let unknown =
            f.service.open_session(Request::new(open_request(&host, &exchange, now_ms())));
        assert_eq!(refused(unknown.await), Err(Code::Unauthenticated));
        enroll(&f.service, &host).await;
        let mut forged = open_request(&host, &exchange, now_ms());
        forged.signature = Keypair::generate_ed25519().sign(b"something else").expect("sign");
        assert_eq!(
            refused(f.service.open_session(Request::new(forged)).await),
            Err(Code::Unauthenticated)
        );
        let stale = open_request(&host, &exchange, now_ms() - ms(MAX_CLOCK_SKEW) - 60_000);
        assert_eq!(
            refused(f.service.open_session(Request::new(stale)).await),
            Err(Code::Unauthenticated)
        );
        let mut short = open_request(&host, &exchange, now_ms());
        short.exchange_key.truncate(31);
        assert_eq!(
            refused(f.service.open_session(Request::new(short)).await),
            Err(Code::InvalidArgument)
        );
        let fine = open_request(&host, &exchange, now_ms());
        assert_eq!(refused(f.service.open_session(Request::new(fine)).await), Ok(()));
    }
}
