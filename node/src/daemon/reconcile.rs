//! A host reconciling to the coordinator: enroll, heartbeat the actual state, do what the
//! desired state says (stage, activate, switch back).
//!
//! The loop enrolls with the join token (retrying with backoff while the coordinator is away),
//! then heartbeats every interval the coordinator asks for, and at once after an activation
//! or staging it started has finished, so a wave moves at the speed of the hosts, not of the
//! interval. Heartbeats are authenticated by a session (`fleetwave_proto::session`): the host
//! proves its identity key once when it opens one, and each heartbeat then carries the
//! session id and a MAC of the report under the session key (which lives in this process's
//! memory only, and is never logged). The host opens the next session at a random point
//! between 75% and 90% of the current one's lifetime (so hosts that started together do not
//! all renew together), and at once when a heartbeat is refused `UNAUTHENTICATED`; when the
//! coordinator refuses to open one because it does not know the host, the host enrolls
//! again. Each report carries a sequence that grows (the time in milliseconds, or the last
//! one plus one), so a restarted host is heard and a replayed report is not.
//!
//! Reconciling is idempotent: for each service in the answer, a release to stage that is not
//! staged (or staging) is staged; a release to run that is not active is staged first if
//! needed, then activated (one activation per service at a time; its hooks run to the end even
//! if the desired state changes meanwhile). An activation that fails switches back to the
//! previous release on its own (see [`crate::activate`]) and is reported; it is not retried
//! until the coordinator asks for another release and then for this one again.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetwave_chunker::ManifestId;
use fleetwave_proto::session::{self, Exchange, SessionKey};
use fleetwave_proto::signing;
use fleetwave_proto::v1 as pb;
use fleetwave_proto::v1::node_control_client::NodeControlClient;
use prost::Message;
use rand::Rng;
use tokio::sync::Notify;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::Inner;
use super::config::CoordinatorSection;
use crate::stage::StageStatus;

/// Most time between two heartbeats, whatever the coordinator says.
const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// Least time between two heartbeats.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Longest wait between retries of enrollment and session opening.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Waits `backoff`, then doubles it up to `max`.
async fn back_off(backoff: &mut Duration, max: Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(max);
}

#[allow(clippy::disallowed_methods, reason = "the wall clock stamps reports: the I/O edge")]
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "host".into())
}

/// An open heartbeat session.
struct Session {
    id: u64,
    key: SessionKey,
    /// When to open the next one.
    renew_at: tokio::time::Instant,
    /// A heartbeat was answered under it.
    heard: bool,
}

struct Reconciler {
    inner: Arc<Inner>,
    config: CoordinatorSection,
    token: String,
    client: NodeControlClient<Channel>,
    sequence: u64,
    session: Option<Session>,
    /// Services with an activation running.
    activating: Arc<std::sync::Mutex<HashSet<String>>>,
    /// Something finished: heartbeat now.
    wake: Arc<Notify>,
}

/// Runs the loop until the daemon shuts down.
pub(super) async fn run(inner: Arc<Inner>, config: CoordinatorSection) {
    let token = match std::fs::read_to_string(&config.join_token_file) {
        Ok(t) => t.trim().to_owned(),
        Err(err) => {
            warn!(file = %config.join_token_file.display(), %err, "cannot read the join token; not reconciling");
            return;
        }
    };
    let channel = match tonic::transport::Endpoint::from_shared(config.url.clone()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .tcp_nodelay(true)
            .connect_lazy(),
        Err(err) => {
            warn!(url = %config.url, %err, "bad coordinator URL; not reconciling");
            return;
        }
    };
    let client = NodeControlClient::new(channel)
        .max_decoding_message_size(1 << 20)
        .max_encoding_message_size(1 << 20);
    let shutdown = inner.shared.shutdown.clone();
    let mut r = Reconciler {
        inner,
        config,
        token,
        client,
        sequence: 0,
        session: None,
        activating: Default::default(),
        wake: Arc::new(Notify::new()),
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = r.run() => {}
    }
}

impl Reconciler {
    async fn run(&mut self) {
        let mut interval = Duration::from_secs(5);
        let mut backoff = Duration::from_millis(200);
        let mut enrolled = false;
        loop {
            if !enrolled {
                match self.enroll().await {
                    Ok(every) => {
                        enrolled = true;
                        interval = every;
                        backoff = Duration::from_millis(200);
                    }
                    Err(status) => {
                        warn!(url = %self.config.url, code = ?status.code(), message = status.message(), "enrollment failed; retrying");
                        back_off(&mut backoff, MAX_BACKOFF).await;
                        continue;
                    }
                }
            }
            let renew =
                self.session.as_ref().is_none_or(|s| tokio::time::Instant::now() >= s.renew_at);
            if renew {
                match self.open_session().await {
                    Ok(every) => interval = every,
                    Err(status) if status.code() == tonic::Code::Unauthenticated => {
                        warn!(
                            message = status.message(),
                            "the coordinator refuses a session; enrolling again"
                        );
                        enrolled = false;
                        back_off(&mut backoff, MAX_BACKOFF).await;
                        continue;
                    }
                    Err(status) => {
                        debug!(code = ?status.code(), message = status.message(), "cannot open a session");
                        back_off(&mut backoff, MAX_BACKOFF).await;
                        continue;
                    }
                }
            }
            match self.heartbeat().await {
                Ok(every) => {
                    interval = every;
                    backoff = Duration::from_millis(200);
                }
                Err(status) if status.code() == tonic::Code::Unauthenticated => {
                    warn!(message = status.message(), "heartbeat refused; opening a new session");
                    // A session that was heard is replaced at once; one refused from the
                    // start waits (something else is wrong: do not spin).
                    if !self.session.take().is_some_and(|s| s.heard) {
                        back_off(&mut backoff, MAX_BACKOFF).await;
                    }
                    continue;
                }
                Err(status) => {
                    debug!(code = ?status.code(), message = status.message(), "heartbeat failed");
                    back_off(&mut backoff, interval.max(MIN_INTERVAL)).await;
                    continue;
                }
            }
            let wake = self.wake.clone();
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = wake.notified() => {}
            }
        }
    }

    async fn enroll(&mut self) -> Result<Duration, tonic::Status> {
        let keypair = &self.inner.keypair;
        let name = self.config.name.clone().unwrap_or_else(host_name);
        let region = self.inner.config.region.clone();
        let environment = self.config.environment.clone();
        let timestamp_ms = now_ms();
        let message =
            signing::enroll_message(&self.token, &region, &environment, &name, timestamp_ms);
        let signature = keypair
            .sign(&message)
            .map_err(|e| tonic::Status::internal(format!("cannot sign: {e}")))?;
        let answer = self
            .client
            .enroll(pb::EnrollRequest {
                join_token: self.token.clone(),
                public_key: keypair.public().encode_protobuf(),
                region: region.clone(),
                environment: environment.clone(),
                name,
                timestamp_ms,
                signature,
            })
            .await?
            .into_inner();
        info!(url = %self.config.url, host_id = %answer.host_id, %region, %environment, "enrolled with the coordinator");
        Ok(clamp(answer.heartbeat_interval_ms))
    }

    /// Opens a heartbeat session (see the module docs).
    async fn open_session(&mut self) -> Result<Duration, tonic::Status> {
        let keypair = &self.inner.keypair;
        let peer_id = keypair.public().to_peer_id().to_bytes();
        let exchange = Exchange::new()
            .map_err(|e| tonic::Status::internal(format!("cannot open a session: {e}")))?;
        let timestamp_ms = now_ms();
        let message = session::open_message(&peer_id, exchange.public_key(), timestamp_ms);
        let signature = keypair
            .sign(&message)
            .map_err(|e| tonic::Status::internal(format!("cannot sign: {e}")))?;
        let answer = self
            .client
            .open_session(pb::OpenSessionRequest {
                peer_id: peer_id.clone(),
                exchange_key: exchange.public_key().to_vec(),
                timestamp_ms,
                signature,
            })
            .await?
            .into_inner();
        let key = exchange
            .open(&peer_id, answer.session, &answer.exchange_key, &answer.sealed_key)
            .map_err(|e| tonic::Status::internal(format!("session answer: {e}")))?;
        let lifetime = Duration::from_millis(answer.expires_in_ms);
        let renew_after = lifetime.mul_f64(rand::thread_rng().gen_range(0.75..0.9));
        debug!(session = answer.session, lifetime_ms = answer.expires_in_ms, "session opened");
        self.session = Some(Session {
            id: answer.session,
            key,
            renew_at: tokio::time::Instant::now() + renew_after,
            heard: false,
        });
        Ok(clamp(answer.heartbeat_interval_ms))
    }

    fn report(&mut self) -> pb::HostReport {
        self.sequence = now_ms().max(self.sequence + 1);
        let mut staged = Vec::new();
        let mut stage_failed = Vec::new();
        if let Some(area) = &self.inner.area {
            for entry in area.status().unwrap_or_default() {
                match entry.status {
                    StageStatus::Staged => staged.push(entry.id.as_bytes().to_vec()),
                    StageStatus::Failed { .. } => stage_failed.push(entry.id.as_bytes().to_vec()),
                    StageStatus::Staging => {}
                }
            }
        }
        let id_of = |text: &str| -> Vec<u8> {
            text.parse::<ManifestId>().map(|m| m.as_bytes().to_vec()).unwrap_or_default()
        };
        let mut services = Vec::new();
        let pushed = self.inner.service_metrics.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(activator) = &self.inner.activator {
            for (service, state) in activator.states() {
                let active = state.active.as_ref().map(|r| id_of(&r.id)).unwrap_or_default();
                let (health, failed) = match &state.last {
                    // The last activation failed: the previous release was switched back and
                    // runs (healthy, as far as the node knows); the failure is reported.
                    Some(last) if !last.ok => (pb::HealthState::Healthy, id_of(&last.target)),
                    Some(_) => (pb::HealthState::Healthy, Vec::new()),
                    None => (pb::HealthState::Unspecified, Vec::new()),
                };
                let health = if active.is_empty() { pb::HealthState::Unspecified } else { health };
                let (standby, standby_health) = match &state.standby {
                    Some((r, ok)) => (
                        id_of(&r.id),
                        if *ok { pb::HealthState::Healthy } else { pb::HealthState::Unhealthy },
                    ),
                    None => (Vec::new(), pb::HealthState::Unspecified),
                };
                services.push(pb::ServiceReport {
                    service: service.clone(),
                    active,
                    standby,
                    health: health as i32,
                    standby_health: standby_health as i32,
                    activation_failed: failed,
                    counters: pushed.get(&service).map(|m| pb::RequestCounters {
                        requests: m.requests,
                        errors: m.errors,
                        latency_buckets: m.latency_buckets.clone(),
                    }),
                });
            }
        }
        pb::HostReport {
            sequence: self.sequence,
            timestamp_ms: now_ms(),
            services,
            staged,
            stage_failed,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    async fn heartbeat(&mut self) -> Result<Duration, tonic::Status> {
        let report = self.report().encode_to_vec();
        let Some(session) = &self.session else {
            return Err(tonic::Status::unauthenticated("no session"));
        };
        let request = pb::HeartbeatRequest {
            peer_id: self.inner.keypair.public().to_peer_id().to_bytes(),
            mac: session.key.mac(&report).to_vec(),
            session: session.id,
            report,
        };
        let answer = self.client.heartbeat(request).await?.into_inner();
        if let Some(s) = &mut self.session {
            s.heard = true;
        }
        for desired in answer.desired {
            self.reconcile(desired).await;
        }
        Ok(clamp(answer.heartbeat_interval_ms))
    }

    async fn reconcile(&self, desired: pb::DesiredService) {
        let id = |b: &[u8]| -> Option<ManifestId> {
            <[u8; 32]>::try_from(b).ok().map(ManifestId::from_bytes)
        };
        let service = desired.service;
        let Some(area) = self.inner.area.clone() else { return };
        let staged = |m: &ManifestId| matches!(area.status_of(m), Ok(Some(e)) if e.status == StageStatus::Staged);
        for m in
            [id(&desired.stage), id(&desired.active), id(&desired.standby)].into_iter().flatten()
        {
            if !staged(&m) {
                self.stage(m).await;
            }
        }
        let Some(activator) = self.inner.activator.clone() else { return };
        let state = activator.state(&service).unwrap_or_default();
        let active = state.active.as_ref().and_then(|r| r.id.parse::<ManifestId>().ok());
        let standby = state.standby.as_ref().and_then(|(r, _)| r.id.parse::<ManifestId>().ok());
        // Blue-green: start the release beside the active one first.
        if let Some(want) = id(&desired.standby) {
            if standby != Some(want) && active != Some(want) && staged(&want) {
                self.spawn_activation(activator.clone(), service.clone(), want, true);
                return;
            }
        }
        let Some(target) = id(&desired.active) else {
            // Nothing of the service should run here (the rollback of its first release).
            if active.is_some() && id(&desired.standby).is_none() {
                self.spawn_deactivation(activator, service);
            }
            return;
        };
        if active == Some(target) || !staged(&target) {
            return;
        }
        // A failed activation is not retried until another release is asked for.
        if state.last.as_ref().is_some_and(|l| !l.ok && l.target == target.to_hex()) {
            return;
        }
        self.spawn_activation(activator, service, target, false);
    }

    /// Takes the service off this host, in a task of its own.
    fn spawn_deactivation(&self, activator: crate::activate::Activator, service: String) {
        let name = service.clone();
        self.spawn_exclusive(name, async move {
            if let Err(err) = activator.deactivate(&service).await {
                warn!(%service, %err, "cannot take the service off this host");
            }
        });
    }

    /// Activates `target` (or starts it as the standby) in a task of its own.
    fn spawn_activation(
        &self,
        activator: crate::activate::Activator,
        service: String,
        target: ManifestId,
        standby: bool,
    ) {
        let name = service.clone();
        self.spawn_exclusive(name, async move {
            info!(%service, manifest = %target, standby, "activating (desired by the coordinator)");
            let result = if standby {
                activator.start_standby(&service, target).await
            } else {
                activator.activate(&service, target, None).await
            };
            match result {
                Ok(outcome) if outcome.ok => info!(%service, manifest = %target, "active"),
                Ok(outcome) => warn!(
                    %service,
                    manifest = %target,
                    reason = outcome.reason.as_deref().unwrap_or(""),
                    "activation failed; previous release switched back"
                ),
                Err(err) => warn!(%service, manifest = %target, %err, "cannot activate"),
            }
        });
    }

    /// Runs `work` on `service` in a task of its own, unless work on it is running already;
    /// heartbeats at once when it ends.
    fn spawn_exclusive(
        &self,
        service: String,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        {
            let mut busy = self.activating.lock().unwrap_or_else(|p| p.into_inner());
            if !busy.insert(service.clone()) {
                return;
            }
        }
        let busy = self.activating.clone();
        let wake = self.wake.clone();
        tokio::spawn(async move {
            work.await;
            busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&service);
            wake.notify_one();
        });
    }

    async fn stage(&self, m: ManifestId) {
        match self.inner.stage(m).await {
            Ok("staging") => {
                debug!(manifest = %m, "staging (desired by the coordinator)");
                // Report the end of the staging at once.
                let (area, wake) = (self.inner.area.clone(), self.wake.clone());
                tokio::spawn(async move {
                    let Some(area) = area else { return };
                    for _ in 0..(4 * 3600) {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        match area.status_of(&m) {
                            Ok(Some(e)) if e.status == StageStatus::Staging => continue,
                            _ => break,
                        }
                    }
                    wake.notify_one();
                });
            }
            Ok(state) => debug!(manifest = %m, state, "staging"),
            Err(err) => debug!(manifest = %m, ?err, "cannot stage yet"),
        }
    }
}

fn clamp(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms)).clamp(MIN_INTERVAL, MAX_INTERVAL)
}
