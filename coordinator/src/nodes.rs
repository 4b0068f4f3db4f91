//! The gRPC service hosts talk to: enrollment and heartbeats (`fleetwave.v1.NodeControl`).
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
//! - **Heartbeat** (`SignedHeartbeat`): the host's PeerId, an encoded `HostReport` and the
//!   identity key's signature over `heartbeat_message(report)`. Only enrolled hosts are heard
//!   (`UNAUTHENTICATED` otherwise: the host should enroll again), and only reports whose
//!   `sequence` grows (`FAILED_PRECONDITION` for a replay or a stale report; hosts use the
//!   time in milliseconds, so a restarted host still grows). The answer, given only once the
//!   report and every transition it caused are durable, is the host's desired state per
//!   service and the interval until the next heartbeat. Repeating a report, or a host
//!   restarting, is harmless: reconciling is idempotent on both sides.
//!
//! # Limits
//!
//! A message is at most [`MAX_MESSAGE`] bytes (tonic refuses larger ones before decoding);
//! a report names at most [`MAX_SERVICES`] services and [`MAX_MANIFESTS`] manifests; strings
//! are at most 128 bytes.

use std::sync::Arc;
use std::time::Duration;

use fleetwave_proto::signing;
use fleetwave_proto::v1 as pb;
use libp2p_identity::{PeerId, PublicKey};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::daemon::Shared;
use crate::fleet::FleetError;
use crate::rollout::ManifestId;
use crate::store::{HostActual, ServiceActual};

/// Largest gRPC message accepted.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Most services in a report.
pub const MAX_SERVICES: usize = 256;
/// Most manifests in a report's staged and failed lists.
pub const MAX_MANIFESTS: usize = 1024;
/// How far an enrollment's time may be from the coordinator's.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

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

fn manifest(bytes: &[u8], field: &str) -> Result<Option<ManifestId>, Status> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| Status::invalid_argument(format!("{field}: a manifest id is 32 bytes")))?;
    Ok(Some(ManifestId(arr)))
}

fn health(value: i32) -> Option<bool> {
    match pb::HealthState::try_from(value) {
        Ok(pb::HealthState::Healthy) => Some(true),
        Ok(pb::HealthState::Unhealthy) => Some(false),
        _ => None,
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
    if report.services.len() > MAX_SERVICES {
        return Err(Status::invalid_argument("too many services in the report"));
    }
    if report.staged.len() + report.stage_failed.len() > MAX_MANIFESTS {
        return Err(Status::invalid_argument("too many manifests in the report"));
    }
    short("agent_version", &report.agent_version)?;
    let mut services = Vec::with_capacity(report.services.len());
    for s in &report.services {
        short("service", &s.service)?;
        let counters = s.counters.clone().unwrap_or_default();
        if counters.latency_buckets.len() > 64 {
            return Err(Status::invalid_argument("too many latency buckets"));
        }
        services.push(ServiceActual {
            service: s.service.clone(),
            active: manifest(&s.active, "active")?,
            standby: manifest(&s.standby, "standby")?,
            healthy: health(s.health),
            standby_healthy: health(s.standby_health),
            activation_failed: manifest(&s.activation_failed, "activation_failed")?,
            requests: counters.requests,
            errors: counters.errors,
            latency_buckets: counters.latency_buckets,
        });
    }
    let ids = |list: &[Vec<u8>], field: &str| -> Result<Vec<ManifestId>, Status> {
        list.iter().filter_map(|b| manifest(b, field).transpose()).collect()
    };
    Ok(HostActual {
        sequence: report.sequence,
        seen_ms: 0,
        lost: false,
        services,
        staged: ids(&report.staged, "staged")?,
        stage_failed: ids(&report.stage_failed, "stage_failed")?,
        agent_version: report.agent_version.clone(),
    })
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
        let now = crate::daemon::now();
        let then = Duration::from_millis(r.timestamp_ms);
        if now.abs_diff(then) > MAX_CLOCK_SKEW {
            metrics.refused("enroll_clock");
            return Err(Status::unauthenticated(format!(
                "enrollment time is {}s away from the coordinator's clock",
                now.abs_diff(then).as_secs()
            )));
        }
        let peer = key.to_peer_id().to_base58();
        let record = {
            let mut fleet = self.shared.fleet.lock().map_err(|_| Status::internal("poisoned"))?;
            fleet
                .enroll(now, peer.clone(), r.public_key.clone(), r.region, r.environment, r.name)
                .map_err(fleet_status)?
        };
        self.shared.store.commit().await;
        tracing::info!(host = %peer, region = %record.region, env = %record.environment, "host enrolled");
        Ok(Response::new(pb::EnrollResponse {
            host_id: peer,
            heartbeat_interval_ms: self.shared.heartbeat_interval_ms(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::SignedHeartbeat>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let started = tokio::time::Instant::now();
        let r = request.into_inner();
        let metrics = &self.shared.metrics;
        let peer = PeerId::from_bytes(&r.peer_id)
            .map_err(|_| Status::invalid_argument("peer_id does not decode"))?
            .to_base58();
        let found = {
            let fleet = self.shared.fleet.lock().map_err(|_| Status::internal("poisoned"))?;
            fleet.host_by_peer(&peer)
        };
        let Some((number, key)) = found else {
            metrics.refused("heartbeat_unknown");
            return Err(Status::unauthenticated(format!("{peer} is not enrolled")));
        };
        let key = key.ok_or_else(|| Status::internal("stored key"))?;
        if !key.verify(&signing::heartbeat_message(&r.report), &r.signature) {
            metrics.refused("heartbeat_signature");
            tracing::warn!(host = %peer, "heartbeat signature does not verify");
            return Err(Status::unauthenticated("heartbeat signature does not verify"));
        }
        let report = pb::HostReport::decode(r.report.as_slice())
            .map_err(|e| Status::invalid_argument(format!("report does not decode: {e}")))?;
        let actual = actual_from_report(&report)?;
        let desired = {
            let mut fleet = self.shared.fleet.lock().map_err(|_| Status::internal("poisoned"))?;
            fleet.heartbeat(crate::daemon::now(), number, actual).map_err(|e| {
                metrics.refused("heartbeat_stale");
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
