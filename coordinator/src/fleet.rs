//! The coordinator's state and decisions: hosts, registry, deployments and their engines.
//!
//! [`Fleet`] is synchronous and takes the time as an argument; the gRPC and REST shells lock
//! it, call it, then wait for [`Store::commit`] before they answer, so every transition is
//! durable before anyone acts on it.
//!
//! # Deployments and persistence
//!
//! Each running deployment owns a [`Rollout`] engine. Every input of the engine (a host
//! event derived from a heartbeat, a verdict, an operator command, a timeout) is appended to the
//! deployment's log in the store *before* it is applied, with the `now` it was applied at
//! (whole milliseconds: the engine never sees finer times than its log keeps). The
//! engine's snapshot is written when the deployment starts and then every
//! [`FleetConfig::snapshot_every`] inputs (the log up to it is then trimmed). On start the
//! coordinator restores each deployment's last snapshot and replays its log: the engine is
//! deterministic, so it reaches exactly the state it had when the coordinator stopped, no wave
//! skipped or repeated. What the engine decided during the replay is re-applied idempotently
//! (audit records have the same keys; desired states are read from the engine).
//!
//! # Host reports
//!
//! A heartbeat carries the host's whole actual state. The coordinator diffs it with the last
//! report it holds and feeds the engines only what changed (the engine's events are
//! idempotent, so a full state after a restart or after the host was lost is harmless). A host
//! that has not reported for [`FleetConfig::lost_after`] is marked lost: unavailable and never
//! healthy for the engines, until its next report.
//!
//! # One deployment per service and environment
//!
//! While one is running (or rolling back), a new deployment of the same service and
//! environment is queued (hotfixes ahead of the others, then in order) or refused, as its spec
//! asks. The engine of the last deployment stays after it ends: it answers the hosts' desired
//! state (stragglers are still brought up to date) until the next deployment starts.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use libp2p_identity::{PeerId, PublicKey};

use crate::analysis::{Judge, JudgeConfig, MetricConfig, Sample, Window};
use crate::analysis_gate::HostCounters;
use crate::deploy::{Candidate, DeploymentSpec, OnConflict, SpecError, StrategyKind};
use crate::rollout::{
    Command, Desired, GateRequest, HostEvent, HostId, ManifestId, Notice, Operator, Phase, Rollout,
    WaveStage,
};
use crate::store::{
    AuditEntry, DeploymentRecord, DeploymentState, HostActual, HostRecord, Input, LogEntry,
    Promotion, Store, StoreError, VersionRecord,
};
use crate::view;

/// Tuning of the fleet logic.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// A host silent this long is lost.
    pub lost_after: Duration,
    /// Snapshot a deployment's engine every this many inputs.
    pub snapshot_every: u64,
    /// How often hosts heartbeat.
    pub heartbeat_interval: Duration,
    /// How often an open analysis gate is looked at (early failure).
    pub analysis_interval: Duration,
    /// Keep every automatic decision for [`Fleet::take_decisions`] (webhooks).
    pub keep_decisions: bool,
    /// The latency histogram layout hosts report in; a host's latency is judged only in it.
    pub latency_buckets: crate::analysis::Buckets,
    /// Services judged on counters from a Prometheus server ([`Fleet::put_external`]) instead
    /// of the hosts' reports, and how long fetched counters stand for the hosts.
    pub external: BTreeMap<String, Duration>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            lost_after: Duration::from_secs(30),
            snapshot_every: 1000,
            heartbeat_interval: Duration::from_secs(5),
            analysis_interval: Duration::from_secs(10),
            keep_decisions: false,
            latency_buckets: crate::analysis::Buckets::default(),
            external: BTreeMap::new(),
        }
    }
}

/// A request the fleet refuses.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Unknown thing.
    #[error("{what} not found")]
    NotFound {
        /// What.
        what: String,
    },
    /// Invalid request.
    #[error("{0}")]
    Invalid(String),
    /// The spec cannot become a plan.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The version was not promoted to the environment.
    #[error("{service} {version} was not promoted to {environment} (it is in: {allowed})")]
    NotPromoted {
        /// The service.
        service: String,
        /// The version.
        version: String,
        /// The environment.
        environment: String,
        /// Where it may go.
        allowed: String,
    },
    /// Another deployment is in progress and the spec asked to refuse.
    #[error("deployment {running} of {service} in {environment} is in progress")]
    InProgress {
        /// The service.
        service: String,
        /// The environment.
        environment: String,
        /// The running deployment.
        running: u64,
    },
    /// The operator command does not apply now.
    #[error("{0}")]
    NotApplicable(String),
    /// The thing exists already, differently.
    #[error("{0}")]
    Conflict(String),
    /// A heartbeat that replays or precedes one already seen.
    #[error("report sequence {got} is not after {last}")]
    Replay {
        /// The report's.
        got: u64,
        /// The last accepted.
        last: u64,
    },
}

/// What a host should run, per service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    /// The service.
    pub service: String,
    /// Its desired state.
    pub desired: Desired,
}

#[derive(Debug)]
struct HostMem {
    record: HostRecord,
    /// `record.public_key`, decoded once: every session opened is verified with it, and
    /// decoding an ed25519 key is a point decompression (a field exponentiation).
    key: Option<PublicKey>,
    actual: HostActual,
    /// A report was received since the coordinator started and the host was not lost since:
    /// the next report can be diffed with `actual`.
    fresh: bool,
}

/// A service's counters as a Prometheus server last gave them.
#[derive(Debug, Default)]
struct External {
    fetched: Duration,
    hosts: HashMap<u64, HostCounters>,
}

/// An open analysis gate: the judge and what it has seen.
#[derive(Debug)]
struct OpenGate {
    request: GateRequest,
    judge: Judge,
    /// Each canary and baseline host's counters at the last look.
    last: HashMap<u64, HostCounters>,
    next_look_ms: u64,
    /// Requests and errors of canary and baseline since the window started.
    totals: [u64; 4],
}

impl OpenGate {
    fn record(&self) -> crate::store::OpenGateRecord {
        crate::store::OpenGateRecord {
            request: self.request.clone(),
            judge: self.judge.snapshot(),
            last: self.last.iter().map(|(&h, c)| (h, c.clone())).collect(),
            totals: self.totals,
            next_look_ms: self.next_look_ms,
        }
    }

    /// The gate as kept in the store, if it is the gate of `request`.
    /// The engine resumes from its log at millisecond times: the requests are the same if
    /// they are at those times.
    fn restored(record: crate::store::OpenGateRecord, request: &GateRequest) -> Option<Self> {
        let at_ms = |r: &GateRequest| {
            let mut r = r.clone();
            r.window_start = Duration::from_millis(ms(r.window_start));
            r.decide_by = Duration::from_millis(ms(r.decide_by));
            r
        };
        if at_ms(&record.request) != at_ms(request) {
            return None;
        }
        let judge = Judge::restore(record.judge).ok()?;
        Some(Self {
            request: request.clone(),
            judge,
            last: record.last.into_iter().collect(),
            next_look_ms: record.next_look_ms,
            totals: record.totals,
        })
    }
}

#[derive(Debug)]
struct Live {
    id: u64,
    engine: Rollout,
    seq: u64,
    snap_seq: u64,
    gate: Option<OpenGate>,
}

/// The coordinator's state. See the module docs.
#[derive(Debug)]
pub struct Fleet {
    store: Store,
    config: FleetConfig,
    hosts: BTreeMap<u64, HostMem>,
    /// PeerId (as bytes, not base58: looked up on every heartbeat) -> host number.
    by_peer: HashMap<PeerId, u64>,
    records: BTreeMap<u64, DeploymentRecord>,
    /// Engines: running deployments, and the last one of each service and environment.
    live: BTreeMap<u64, Live>,
    /// (service, environment) -> the deployment whose engine answers.
    current: BTreeMap<(String, String), u64>,
    /// Gate results, per deployment.
    gates: BTreeMap<u64, Vec<view::GateView>>,
    /// Automatic decisions not yet taken by [`Fleet::take_decisions`].
    decisions: Vec<AuditEntry>,
    /// Counters of the services in `config.external`, by service.
    external: HashMap<String, External>,
}

fn ms(now: Duration) -> u64 {
    u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
}

/// The time an engine is given: whole milliseconds, as its log keeps it. An engine that saw
/// the nanoseconds would decide at other inputs than its replay (a host's report 0.2 ms before
/// a bake ends passes the wave in the replay only).
fn engine_time(now: Duration) -> Duration {
    Duration::from_millis(ms(now))
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Running => "running",
        Phase::RollingBack { .. } => "rolling_back",
        Phase::RolledBack { .. } => "rolled_back",
        Phase::Done => "done",
        Phase::Aborted => "aborted",
    }
}

fn state_name(state: DeploymentState) -> &'static str {
    match state {
        DeploymentState::Queued => "queued",
        DeploymentState::Running => "running",
        DeploymentState::Succeeded => "succeeded",
        DeploymentState::RolledBack => "rolled_back",
        DeploymentState::Aborted => "aborted",
        DeploymentState::Cancelled => "cancelled",
    }
}

fn strategy_name(kind: StrategyKind) -> &'static str {
    match kind {
        StrategyKind::Rolling => "rolling",
        StrategyKind::Canary => "canary",
        StrategyKind::BlueGreen => "blue_green",
    }
}

/// Host events that turn `prev` (none: unknown) into `next`, about `target` of `service`.
pub fn host_events(
    prev: Option<&HostActual>,
    next: &HostActual,
    service: &str,
    target: ManifestId,
) -> Vec<HostEvent> {
    let mut out = Vec::new();
    let had =
        |list: fn(&HostActual) -> &Vec<ManifestId>| prev.is_some_and(|p| list(p).contains(&target));
    if next.staged.contains(&target) && !had(|a| &a.staged) {
        out.push(HostEvent::Staged { manifest: target });
    }
    if next.stage_failed.contains(&target) && !had(|a| &a.stage_failed) {
        out.push(HostEvent::StageFailed { manifest: target });
    }
    let find = |a: &HostActual| a.services.iter().find(|s| s.service == service).cloned();
    let before = prev.and_then(find);
    let now = find(next).unwrap_or_default();
    let first = before.is_none();
    let before = before.unwrap_or_default();
    if now.activation_failed.is_some()
        && (first || now.activation_failed != before.activation_failed)
    {
        if let Some(m) = now.activation_failed {
            out.push(HostEvent::ActivationFailed { manifest: m });
        }
    }
    if first || now.standby != before.standby {
        if let Some(m) = now.standby {
            out.push(HostEvent::Started { manifest: m });
        }
    }
    if first || now.active != before.active {
        out.push(match now.active {
            Some(m) => HostEvent::Active { manifest: m },
            None => HostEvent::Inactive,
        });
    }
    if let (Some(m), Some(h)) = (now.active, now.healthy) {
        if first || now.active != before.active || now.healthy != before.healthy {
            out.push(HostEvent::Health { manifest: m, healthy: h });
        }
    }
    if let (Some(m), Some(h)) = (now.standby, now.standby_healthy) {
        if first || now.standby != before.standby || now.standby_healthy != before.standby_healthy {
            out.push(HostEvent::Health { manifest: m, healthy: h });
        }
    }
    out
}

impl Fleet {
    /// Loads the state from `store` and resumes every deployment where it was.
    pub fn open(store: Store, config: FleetConfig, now: Duration) -> Result<Self, FleetError> {
        let states: HashMap<u64, HostActual> = store.host_states()?.into_iter().collect();
        let mut fleet = Fleet {
            config,
            hosts: BTreeMap::new(),
            by_peer: HashMap::new(),
            records: BTreeMap::new(),
            live: BTreeMap::new(),
            current: BTreeMap::new(),
            gates: BTreeMap::new(),
            decisions: Vec::new(),
            external: HashMap::new(),
            store,
        };
        for record in fleet.store.hosts()? {
            let mut actual = states.get(&record.number).cloned().unwrap_or_default();
            // The coordinator was away: nobody is lost for it until `lost_after` from now.
            actual.seen_ms = ms(now);
            match record.peer_id.parse::<PeerId>() {
                Ok(peer) => {
                    fleet.by_peer.insert(peer, record.number);
                }
                Err(_) => tracing::warn!(host = record.number, "stored PeerId does not parse"),
            }
            let key = PublicKey::try_decode_protobuf(&record.public_key).ok();
            fleet.hosts.insert(record.number, HostMem { record, key, actual, fresh: false });
        }
        for record in fleet.store.deployments()? {
            if !record.gates.is_empty() {
                fleet.gates.insert(record.id, record.gates.clone());
            }
            fleet.records.insert(record.id, record);
        }
        // The engine of each service and environment's latest started deployment.
        let mut latest: BTreeMap<(String, String), u64> = BTreeMap::new();
        for r in fleet.records.values() {
            if r.snapshot.is_some() {
                latest.insert((r.spec.service.clone(), r.spec.environment.clone()), r.id);
            }
        }
        for ((service, env), id) in latest {
            fleet.resume(id)?;
            fleet.current.insert((service, env), id);
        }
        Ok(fleet)
    }

    fn resume(&mut self, id: u64) -> Result<(), FleetError> {
        let Some(record) = self.records.get(&id) else { return Ok(()) };
        let Some((snap_seq, snapshot)) = record.snapshot.clone() else { return Ok(()) };
        let engine = Rollout::restore(snapshot)
            .map_err(|e| FleetError::Invalid(format!("deployment {id}: {e}")))?;
        let log = self.store.log_after(id, snap_seq)?;
        self.live.insert(id, Live { id, engine, seq: snap_seq, snap_seq, gate: None });
        tracing::info!(deployment = id, replayed = log.len(), "resuming deployment");
        // Commands the snapshot holds unpolled (the first snapshot is taken before its
        // commands are carried out), under the log position they had.
        self.drain(id, Duration::from_millis(record_now(&self.records, id)), snap_seq)?;
        for (seq, entry) in log {
            let now = Duration::from_millis(entry.now_ms);
            if let Some(live) = self.live.get_mut(&id) {
                live.seq = seq;
                apply(&mut live.engine, now, &entry.input);
            }
            self.drain(id, now, seq)?;
        }
        Ok(())
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    /// Writes an audit record.
    pub fn audit(
        &mut self,
        now: Duration,
        actor: &str,
        action: &str,
        service: Option<&str>,
        deployment: Option<u64>,
        detail: impl Into<String>,
    ) -> Result<(), FleetError> {
        // Operator and API records take small sequence numbers, so they sort before what the
        // engine decided in the same millisecond, and never collide with the engine's (keyed
        // by deployment and log position, from 2^62).
        let seq = self.store.next_audit_seq()? & ((1 << 62) - 1);
        let entry = AuditEntry {
            at_ms: ms(now),
            actor: actor.to_owned(),
            action: action.to_owned(),
            service: service.map(str::to_owned),
            deployment,
            detail: detail.into(),
        };
        self.store.audit(seq, &entry)?;
        self.decided(entry);
        Ok(())
    }

    fn decided(&mut self, entry: AuditEntry) {
        if self.config.keep_decisions && entry.actor == "coordinator" {
            // Bounded: a stuck webhook never grows the coordinator without limit.
            if self.decisions.len() < 10_000 {
                self.decisions.push(entry);
            }
        }
    }

    /// The automatic decisions (waves, gate verdicts, failures, rollbacks, ..) made since the
    /// last call, oldest first, once they are durable: call after [`Store::commit`]. A
    /// deployment resumed after a restart repeats the decisions of its replay (at least once).
    pub fn take_decisions(&mut self) -> Vec<AuditEntry> {
        std::mem::take(&mut self.decisions)
    }

    // ---------------------------------------------------------------------------------------
    // Hosts

    /// Enrolls a host (or updates the labels of one enrolled with the same key).
    pub fn enroll(
        &mut self,
        now: Duration,
        peer: PeerId,
        public_key: Vec<u8>,
        region: String,
        environment: String,
        name: String,
    ) -> Result<HostRecord, FleetError> {
        for (field, v) in [("region", &region), ("environment", &environment), ("name", &name)] {
            if v.is_empty() || v.len() > 128 {
                return Err(FleetError::Invalid(format!("{field} must be 1 to 128 characters")));
            }
        }
        let peer_id = peer.to_base58();
        let number = match self.by_peer.get(&peer) {
            Some(&n) => n,
            None => self.hosts.keys().next_back().map_or(1, |n| n + 1),
        };
        let mut record = HostRecord {
            number,
            peer_id: peer_id.clone(),
            public_key,
            region,
            environment,
            name,
            enrolled_ms: ms(now),
        };
        if let Some(existing) = self.hosts.get(&number) {
            record.enrolled_ms = existing.record.enrolled_ms;
            if existing.record == record {
                return Ok(record);
            }
        }
        self.store.put_host(&record)?;
        let detail = format!("{} in {}/{}", record.name, record.region, record.environment);
        self.audit(now, &peer_id, "host.enroll", None, None, detail)?;
        let actual = self
            .hosts
            .remove(&number)
            .map(|h| h.actual)
            .unwrap_or_else(|| HostActual { seen_ms: ms(now), ..HostActual::default() });
        self.by_peer.insert(peer, number);
        let key = PublicKey::try_decode_protobuf(&record.public_key).ok();
        self.hosts.insert(number, HostMem { record: record.clone(), key, actual, fresh: false });
        Ok(record)
    }

    /// The enrolled host with this PeerId: its number and public key (`None`: the stored key
    /// does not decode).
    pub fn host_by_peer(&self, peer: &PeerId) -> Option<(u64, Option<PublicKey>)> {
        let n = *self.by_peer.get(peer)?;
        self.hosts.get(&n).map(|h| (n, h.key.clone()))
    }

    /// Takes the report of the host `peer` (`encoded`: the `HostReport` it was read from,
    /// stored as it is) and answers its desired state.
    pub fn heartbeat(
        &mut self,
        now: Duration,
        peer: &PeerId,
        mut report: HostActual,
        encoded: &[u8],
    ) -> Result<Vec<DesiredService>, FleetError> {
        let Some(&number) = self.by_peer.get(peer) else {
            return Err(FleetError::NotFound { what: format!("host {peer}") });
        };
        let Some(host) = self.hosts.get_mut(&number) else {
            return Err(FleetError::NotFound { what: format!("host #{number}") });
        };
        if report.sequence <= host.actual.sequence {
            return Err(FleetError::Replay { got: report.sequence, last: host.actual.sequence });
        }
        report.seen_ms = ms(now);
        report.lost = false;
        let before = std::mem::replace(&mut host.actual, report);
        let prev = if host.fresh && !before.lost { Some(before) } else { None };
        host.fresh = true;
        self.store.put_host_report(number, encoded, &host.actual)?;
        let environment = &host.record.environment;
        let ids: Vec<u64> = self
            .current
            .iter()
            .filter(|((_, env), _)| env == environment)
            .map(|(_, &id)| id)
            .collect();
        for id in ids {
            let events = {
                let Some(live) = self.live.get(&id) else { continue };
                if live.engine.host(HostId(number)).is_err() {
                    continue;
                }
                let Some(host) = self.hosts.get(&number) else { continue };
                host_events(
                    prev.as_ref(),
                    &host.actual,
                    live.engine.service(),
                    live.engine.target(),
                )
            };
            for event in events {
                self.input(id, now, Input::Host { host: number, event })?;
            }
        }
        Ok(self.desired_for(number))
    }

    /// What host `number` should run.
    pub fn desired_for(&self, number: u64) -> Vec<DesiredService> {
        let Some(host) = self.hosts.get(&number) else { return Vec::new() };
        let mut out = Vec::new();
        for ((service, env), id) in &self.current {
            if *env != host.record.environment {
                continue;
            }
            let Some(live) = self.live.get(id) else { continue };
            let desired = match live.engine.desired(HostId(number)) {
                Ok(d) => d,
                // Not in the deployment's scope (enrolled since): the release of record.
                Err(_) => match self.release_of_record(service, env) {
                    Some(m) => Desired { active: Some(m), standby: None, stage: None },
                    None => continue,
                },
            };
            out.push(DesiredService { service: service.clone(), desired });
        }
        out
    }

    fn release_of_record(&self, service: &str, env: &str) -> Option<ManifestId> {
        self.records
            .values()
            .rev()
            .find(|r| {
                r.spec.service == service
                    && r.spec.environment == env
                    && r.state == DeploymentState::Succeeded
            })
            .map(|r| r.manifest)
    }

    /// Marks silent hosts lost, fires engine deadlines, looks at open gates.
    pub fn tick(&mut self, now: Duration) -> Result<(), FleetError> {
        let lost_before = ms(now).saturating_sub(ms(self.config.lost_after));
        let newly_lost: Vec<u64> = self
            .hosts
            .iter()
            .filter(|(_, h)| !h.actual.lost && h.actual.seen_ms < lost_before)
            .map(|(&n, _)| n)
            .collect();
        for number in newly_lost {
            let Some(host) = self.hosts.get_mut(&number) else { continue };
            host.actual.lost = true;
            let actual = host.actual.clone();
            let env = host.record.environment.clone();
            let peer = host.record.peer_id.clone();
            self.store.put_host_state(number, &actual)?;
            tracing::warn!(host = %peer, "host missed its heartbeats: lost");
            let ids: Vec<u64> =
                self.current.iter().filter(|((_, e), _)| *e == env).map(|(_, &id)| id).collect();
            for id in ids {
                if self.live.get(&id).is_some_and(|l| l.engine.host(HostId(number)).is_ok()) {
                    self.input(id, now, Input::Host { host: number, event: HostEvent::Lost })?;
                }
            }
        }
        let due: Vec<u64> = self
            .live
            .values()
            .filter(|l| l.engine.poll_timeout().is_some_and(|t| t <= now))
            .map(|l| l.id)
            .collect();
        for id in due {
            self.input(id, now, Input::Timeout)?;
        }
        let gates: Vec<u64> = self
            .live
            .values()
            .filter(|l| l.gate.as_ref().is_some_and(|g| g.next_look_ms <= ms(now)))
            .map(|l| l.id)
            .collect();
        for id in gates {
            self.look_at_gate(id, now)?;
        }
        Ok(())
    }

    /// Host `number`'s counters for `service` as of `now`: from its reports, or from the
    /// service's Prometheus source. `None` when there are none to judge (the host is lost,
    /// does not report the service, or the source has nothing recent for it).
    fn observed(&self, number: u64, service: &str, now: Duration) -> Option<HostCounters> {
        let host = self.hosts.get(&number).filter(|h| !h.actual.lost)?;
        if let Some(valid_for) = self.config.external.get(service) {
            let source = self.external.get(service)?;
            if now.saturating_sub(source.fetched) > *valid_for {
                return None;
            }
            return source.hosts.get(&number).cloned();
        }
        host.actual.services.iter().find(|s| s.service == service).map(|s| HostCounters {
            requests: s.requests,
            errors: s.errors,
            latency_buckets: s.latency_buckets.clone(),
        })
    }

    /// Services with a deployment in progress: what a Prometheus source queries for.
    pub fn services_in_progress(&self) -> std::collections::BTreeSet<String> {
        self.records
            .values()
            .filter(|r| r.state == DeploymentState::Running)
            .map(|r| r.spec.service.clone())
            .collect()
    }

    /// Every enrolled host's name and number (how Prometheus series are attributed).
    pub fn host_names(&self) -> HashMap<String, u64> {
        self.hosts.iter().map(|(&n, h)| (h.record.name.clone(), n)).collect()
    }

    /// Takes `service`'s counters, fetched from its Prometheus source at `now`.
    pub fn put_external(
        &mut self,
        service: &str,
        now: Duration,
        hosts: HashMap<u64, HostCounters>,
    ) {
        self.external.insert(service.to_owned(), External { fetched: now, hosts });
    }

    /// The judge's configuration for a gate whose hosts' counters are `observed`: latency is
    /// judged only when the service reports it, in the coordinator's layout.
    fn judge_config(&self, observed: &HashMap<u64, HostCounters>) -> JudgeConfig {
        let buckets = self.config.latency_buckets.clone();
        if observed.values().any(|c| c.latency_buckets.len() == buckets.counts()) {
            JudgeConfig { buckets, ..JudgeConfig::default() }
        } else {
            JudgeConfig {
                metrics: vec![MetricConfig::error_rate()],
                buckets,
                ..JudgeConfig::default()
            }
        }
    }

    fn look_at_gate(&mut self, id: u64, now: Duration) -> Result<(), FleetError> {
        let Some(live) = self.live.get(&id) else { return Ok(()) };
        let Some(gate) = &live.gate else { return Ok(()) };
        let service = live.engine.service().to_owned();
        let request = gate.request.clone();
        let buckets = gate.judge.config().buckets.clone();
        // One window: what each host did since the last look.
        let mut seen = HashMap::new();
        let mut sides = [Sample::new(&buckets), Sample::new(&buckets)];
        let mut totals = gate.totals;
        for (side, hosts) in [&request.canary, &request.baseline].into_iter().enumerate() {
            for h in hosts {
                let Some(now_c) = self.observed(h.0, &service, now) else {
                    sides[side].add_missing();
                    continue;
                };
                let Some(before) = gate.last.get(&h.0) else {
                    // First seen since the gate opened: its counts so far predate the window.
                    sides[side].add_missing();
                    seen.insert(h.0, now_c);
                    continue;
                };
                let delta = now_c.since(before);
                totals[side * 2] += delta.requests;
                totals[side * 2 + 1] += delta.errors;
                if let Err(e) = sides[side].add_host(&delta.sample(&buckets)) {
                    tracing::debug!(host = h.0, error = %e, "invalid analysis sample");
                }
                seen.insert(h.0, now_c);
            }
        }
        let [canary, baseline] = sides;
        let window = Window { end: now, canary, baseline };
        let interval = ms(self.config.analysis_interval);
        let region =
            live.engine.regions().nth(usize::from(request.region.0)).unwrap_or_default().to_owned();
        // Nothing was observed when the gate opened (a Prometheus source not yet asked): what
        // the hosts report is known only now, and this look starts the window.
        let rejudge = gate.last.is_empty() && !seen.is_empty();
        let rejudged =
            if rejudge { Judge::for_gate(self.judge_config(&seen), &request).ok() } else { None };
        let Some(gate) = self.live.get_mut(&id).and_then(|l| l.gate.as_mut()) else {
            return Ok(());
        };
        if let Some(judge) = rejudged {
            gate.judge = judge;
            gate.last = seen;
            gate.next_look_ms = (ms(now) + interval).min(ms(request.decide_by)).max(ms(now) + 1);
            let record = gate.record();
            self.store.put_gate(id, &record)?;
            return Ok(());
        }
        if let Err(e) = gate.judge.handle_window(now, &window) {
            tracing::warn!(deployment = id, error = %e, "analysis window refused");
        }
        gate.last.extend(seen);
        gate.totals = totals;
        let verdict = gate.judge.poll_verdict(now);
        let evidence = serde_json::to_value(gate.judge.report()).unwrap_or_default();
        gate.next_look_ms = (ms(now) + interval).min(ms(request.decide_by)).max(ms(now) + 1);
        let mut gate_view = view::GateView {
            gate: request.gate.0,
            region,
            wave: request.wave,
            verdict: "pending".into(),
            canary_hosts: request.canary.len() as u32,
            canary_requests: totals[0],
            canary_errors: totals[1],
            baseline_hosts: request.baseline.len() as u32,
            baseline_requests: totals[2],
            baseline_errors: totals[3],
            evidence,
            decided_ms: None,
        };
        let Some(verdict) = verdict else {
            // The evidence so far survives a restart of the coordinator.
            let record = gate.record();
            self.store.put_gate(id, &record)?;
            self.record_gate(id, gate_view);
            return Ok(());
        };
        self.store.remove_gate(id)?;
        gate_view.verdict = match verdict {
            crate::rollout::Verdict::Pass => "pass",
            crate::rollout::Verdict::Fail => "fail",
            crate::rollout::Verdict::Inconclusive => "inconclusive",
        }
        .into();
        gate_view.decided_ms = Some(ms(now));
        // The verdict and its evidence are kept with the deployment.
        if let Some(record) = self.records.get_mut(&id) {
            record.gates.push(gate_view.clone());
            self.store.put_deployment(record)?;
        }
        let rate = |e: u64, r: u64| if r == 0 { 0.0 } else { 100.0 * e as f64 / r as f64 };
        let detail = format!(
            "gate {} {}: canary {} errors / {} requests ({:.2}%), baseline {} / {} ({:.2}%)",
            request.gate.0,
            gate_view.verdict,
            totals[1],
            totals[0],
            rate(totals[1], totals[0]),
            totals[3],
            totals[2],
            rate(totals[3], totals[2]),
        );
        self.record_gate(id, gate_view);
        if let Some(live) = self.live.get_mut(&id) {
            live.gate = None;
        }
        self.audit(now, "coordinator", "gate.verdict", Some(&service), Some(id), detail)?;
        self.input(id, now, Input::Verdict { gate: request.gate.0, verdict })
    }

    fn record_gate(&mut self, id: u64, gate: view::GateView) {
        let list = self.gates.entry(id).or_default();
        match list.last_mut() {
            Some(last) if last.gate == gate.gate => *last = gate,
            _ => list.push(gate),
        }
    }

    /// Logs `input`, applies it to deployment `id`'s engine and carries out what it decides.
    fn input(&mut self, id: u64, now: Duration, input: Input) -> Result<(), FleetError> {
        let now = engine_time(now);
        let Some(live) = self.live.get_mut(&id) else { return Ok(()) };
        live.seq += 1;
        let seq = live.seq;
        self.store.append_log(id, seq, &LogEntry { now_ms: ms(now), input: input.clone() })?;
        apply(&mut live.engine, now, &input);
        self.drain(id, now, seq)?;
        self.maybe_snapshot(id)?;
        Ok(())
    }

    fn maybe_snapshot(&mut self, id: u64) -> Result<(), FleetError> {
        let Some(live) = self.live.get_mut(&id) else { return Ok(()) };
        if live.seq - live.snap_seq < self.config.snapshot_every {
            return Ok(());
        }
        let snap = (live.seq, live.engine.snapshot());
        live.snap_seq = live.seq;
        if let Some(record) = self.records.get_mut(&id) {
            record.snapshot = Some(snap.clone());
            self.store.put_deployment(record)?;
            self.store.trim_log(id, snap.0)?;
        }
        Ok(())
    }

    /// Carries out the engine's commands after input `seq`.
    fn drain(&mut self, id: u64, now: Duration, seq: u64) -> Result<(), FleetError> {
        let mut k = 0u64;
        loop {
            let Some(live) = self.live.get_mut(&id) else { return Ok(()) };
            let Some(command) = live.engine.poll_command() else { break };
            let service = live.engine.service().to_owned();
            match command {
                // Hosts read their desired state from the engine at every heartbeat.
                Command::SetDesired { .. } => {}
                Command::EvaluateGate(request) => {
                    let hosts: Vec<u64> =
                        request.canary.iter().chain(&request.baseline).map(|h| h.0).collect();
                    let look = ms(request.window_start) + ms(self.config.analysis_interval);
                    let last: HashMap<u64, HostCounters> = hosts
                        .iter()
                        .filter_map(|&h| Some((h, self.observed(h, &service, now)?)))
                        .collect();
                    let config = self.judge_config(&last);
                    // A coordinator restarted during the gate continues its evidence.
                    let kept = self.store.gate(id)?.and_then(|g| OpenGate::restored(g, &request));
                    match (kept, Judge::for_gate(config, &request)) {
                        (Some(gate), _) => {
                            tracing::info!(
                                deployment = id,
                                gate = request.gate.0,
                                "gate evidence restored"
                            );
                            if let Some(live) = self.live.get_mut(&id) {
                                live.gate = Some(gate);
                            }
                        }
                        (None, Ok(judge)) => {
                            if let Some(live) = self.live.get_mut(&id) {
                                live.gate = Some(OpenGate {
                                    request,
                                    judge,
                                    last,
                                    next_look_ms: look,
                                    totals: [0; 4],
                                });
                            }
                        }
                        // No verdict: the engine holds the rollout at the gate's deadline.
                        (None, Err(e)) => {
                            tracing::error!(deployment = id, error = %e, "cannot judge the gate")
                        }
                    }
                }
                Command::Notify(notice) => {
                    k += 1;
                    let regions: Vec<String> = live.engine.regions().map(str::to_owned).collect();
                    let (action, detail) = describe_notice(&notice, &regions);
                    // Keyed by deployment and log position: a replay writes the same records.
                    let audit_seq = (1 << 62)
                        | ((id & 0x3f_ffff) << 40)
                        | ((seq & 0xffff_ffff) << 8)
                        | (k & 0xff);
                    let entry = AuditEntry {
                        at_ms: ms(now),
                        actor: "coordinator".into(),
                        action: action.into(),
                        service: Some(service.clone()),
                        deployment: Some(id),
                        detail,
                    };
                    self.store.audit(audit_seq, &entry)?;
                    self.decided(entry);
                    if matches!(notice, Notice::RollingBack { .. } | Notice::Aborted) {
                        if let Some(live) = self.live.get_mut(&id) {
                            live.gate = None;
                        }
                    }
                }
            }
        }
        self.settle(id, now)
    }

    /// Records a deployment's end and starts the next queued one.
    fn settle(&mut self, id: u64, now: Duration) -> Result<(), FleetError> {
        let Some(live) = self.live.get(&id) else { return Ok(()) };
        let phase = live.engine.phase();
        let (state, outcome) = match phase {
            Phase::Done => (DeploymentState::Succeeded, "every region done".to_owned()),
            Phase::RolledBack { reason } => {
                let regions: Vec<String> = live.engine.regions().map(str::to_owned).collect();
                (
                    DeploymentState::RolledBack,
                    format!("rolled back: {}", describe_reason(&reason, &regions)),
                )
            }
            Phase::Aborted => (DeploymentState::Aborted, "aborted by an operator".to_owned()),
            Phase::Running | Phase::RollingBack { .. } => return Ok(()),
        };
        let snapshot = (live.seq, live.engine.snapshot());
        let Some(record) = self.records.get_mut(&id) else { return Ok(()) };
        if record.state != DeploymentState::Running {
            return Ok(());
        }
        record.state = state;
        record.finished_ms = Some(ms(now));
        record.outcome = Some(outcome.clone());
        record.snapshot = Some(snapshot.clone());
        let (service, env) = (record.spec.service.clone(), record.spec.environment.clone());
        self.store.put_deployment(record)?;
        self.store.trim_log(id, snapshot.0)?;
        self.store.remove_gate(id)?;
        if let Some(live) = self.live.get_mut(&id) {
            live.snap_seq = snapshot.0;
            live.gate = None;
        }
        tracing::info!(deployment = id, %service, %env, %outcome, "deployment ended");
        self.start_next(now, &service, &env)
    }

    fn start_next(&mut self, now: Duration, service: &str, env: &str) -> Result<(), FleetError> {
        let next = self
            .records
            .values()
            .filter(|r| {
                r.state == DeploymentState::Queued
                    && r.spec.service == service
                    && r.spec.environment == env
            })
            .min_by_key(|r| (!r.spec.hotfix, r.id))
            .map(|r| r.id);
        if let Some(id) = next {
            self.start(now, id)?;
        }
        Ok(())
    }

    fn candidates(&self, service: &str) -> Vec<Candidate> {
        self.hosts
            .values()
            .map(|h| Candidate {
                number: h.record.number,
                region: h.record.region.clone(),
                environment: h.record.environment.clone(),
                active: h
                    .actual
                    .services
                    .iter()
                    .find(|s| s.service == service)
                    .and_then(|s| s.active),
            })
            .collect()
    }

    fn start(&mut self, now: Duration, id: u64) -> Result<(), FleetError> {
        let Some(record) = self.records.get(&id).cloned() else { return Ok(()) };
        let candidates = self.candidates(&record.spec.service);
        let plan = record.spec.plan(record.manifest, &candidates, id).and_then(|plan| {
            Rollout::new(engine_time(now), plan)
                .map_err(|e| SpecError::Invalid { field: "plan", reason: e.to_string() })
        });
        let mut record = record;
        let engine = match plan {
            Ok(engine) => engine,
            Err(e) => {
                record.state = DeploymentState::Cancelled;
                record.finished_ms = Some(ms(now));
                record.outcome = Some(format!("could not start: {e}"));
                self.store.put_deployment(&record)?;
                let (s, env) = (record.spec.service.clone(), record.spec.environment.clone());
                self.audit(
                    now,
                    "coordinator",
                    "deployment.cancel",
                    Some(&s),
                    Some(id),
                    e.to_string(),
                )?;
                self.records.insert(id, record);
                return self.start_next(now, &s, &env);
            }
        };
        record.state = DeploymentState::Running;
        record.started_ms = Some(ms(now));
        record.snapshot = Some((0, engine.snapshot()));
        self.store.put_deployment(&record)?;
        let key = (record.spec.service.clone(), record.spec.environment.clone());
        // The previous deployment's engine stops answering.
        if let Some(old) = self.current.insert(key.clone(), id) {
            self.live.remove(&old);
        }
        let hosts = engine.status().totals.hosts;
        self.live.insert(id, Live { id, engine, seq: 0, snap_seq: 0, gate: None });
        self.records.insert(id, record);
        let detail = format!("{} hosts", hosts);
        self.audit(now, "coordinator", "deployment.start", Some(&key.0), Some(id), detail)?;
        self.drain(id, now, 0)?;
        // Hosts already lost are lost for the engine too; the others report at their next
        // heartbeat (their whole state: the engine has not heard from them).
        let lost: Vec<u64> =
            self.hosts.iter().filter(|(_, h)| h.actual.lost).map(|(&n, _)| n).collect();
        for n in lost {
            if self.live.get(&id).is_some_and(|l| l.engine.host(HostId(n)).is_ok()) {
                self.input(id, now, Input::Host { host: n, event: HostEvent::Lost })?;
            }
        }
        let reported: Vec<u64> = self
            .hosts
            .iter()
            .filter(|(_, h)| !h.actual.lost && h.actual.sequence > 0)
            .map(|(&n, _)| n)
            .collect();
        for n in reported {
            let Some(live) = self.live.get(&id) else { break };
            if live.engine.host(HostId(n)).is_err() {
                continue;
            }
            let Some(actual) = self.hosts.get(&n).map(|h| h.actual.clone()) else { continue };
            let events = host_events(None, &actual, live.engine.service(), live.engine.target());
            for event in events {
                self.input(id, now, Input::Host { host: n, event })?;
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Registry

    /// Registers a version in `dev`.
    pub fn register_version(
        &mut self,
        now: Duration,
        actor: &str,
        service: &str,
        version: &str,
        manifest: ManifestId,
        size: u64,
    ) -> Result<VersionRecord, FleetError> {
        if let Some(existing) = self.store.version(service, version)? {
            if existing.manifest == manifest {
                return Ok(existing);
            }
            return Err(FleetError::Conflict(format!(
                "{service} {version} is registered with another manifest ({})",
                existing.manifest
            )));
        }
        let record = VersionRecord {
            service: service.to_owned(),
            version: version.to_owned(),
            manifest,
            size,
            registered_by: actor.to_owned(),
            registered_ms: ms(now),
            promotions: vec![Promotion {
                environment: "dev".into(),
                by: actor.to_owned(),
                at_ms: ms(now),
                comment: "registered".into(),
            }],
        };
        self.store.put_version(&record)?;
        self.audit(
            now,
            actor,
            "version.register",
            Some(service),
            None,
            format!("{version} {manifest}"),
        )?;
        Ok(record)
    }

    /// Promotes a version to an environment.
    pub fn promote_version(
        &mut self,
        now: Duration,
        actor: &str,
        service: &str,
        version: &str,
        environment: &str,
        comment: &str,
    ) -> Result<VersionRecord, FleetError> {
        if environment.is_empty() || environment.len() > 128 {
            return Err(FleetError::Invalid("environment must be 1 to 128 characters".into()));
        }
        let Some(mut record) = self.store.version(service, version)? else {
            return Err(FleetError::NotFound { what: format!("{service} {version}") });
        };
        if record.allowed_in(environment) {
            return Ok(record);
        }
        record.promotions.push(Promotion {
            environment: environment.to_owned(),
            by: actor.to_owned(),
            at_ms: ms(now),
            comment: comment.to_owned(),
        });
        self.store.put_version(&record)?;
        let detail = format!("{version} to {environment}: {comment}");
        self.audit(now, actor, "version.promote", Some(service), None, detail)?;
        Ok(record)
    }

    // ---------------------------------------------------------------------------------------
    // Deployments

    /// Creates a deployment: starts it, queues it, or refuses it.
    pub fn create_deployment(
        &mut self,
        now: Duration,
        actor: &str,
        spec: DeploymentSpec,
    ) -> Result<u64, FleetError> {
        spec.validate()?;
        let Some(version) = self.store.version(&spec.service, &spec.version)? else {
            return Err(FleetError::NotFound {
                what: format!("{} {}", spec.service, spec.version),
            });
        };
        if !version.allowed_in(&spec.environment) {
            let allowed: Vec<&str> =
                version.promotions.iter().map(|p| p.environment.as_str()).collect();
            return Err(FleetError::NotPromoted {
                service: spec.service.clone(),
                version: spec.version.clone(),
                environment: spec.environment.clone(),
                allowed: allowed.join(", "),
            });
        }
        let running = self
            .records
            .values()
            .find(|r| {
                r.state == DeploymentState::Running
                    && r.spec.service == spec.service
                    && r.spec.environment == spec.environment
            })
            .map(|r| r.id);
        if let (Some(running), OnConflict::Refuse) = (running, spec.on_conflict) {
            return Err(FleetError::InProgress {
                service: spec.service.clone(),
                environment: spec.environment.clone(),
                running,
            });
        }
        // A plan that cannot be made is refused now rather than queued.
        spec.plan(version.manifest, &self.candidates(&spec.service), 0)?;
        let id = self
            .store
            .next_deployment_id()?
            .max(self.records.keys().next_back().map_or(1, |k| k + 1));
        let record = DeploymentRecord {
            id,
            manifest: version.manifest,
            created_by: actor.to_owned(),
            created_ms: ms(now),
            started_ms: None,
            finished_ms: None,
            state: DeploymentState::Queued,
            outcome: None,
            snapshot: None,
            gates: Vec::new(),
            spec,
        };
        self.store.put_deployment(&record)?;
        let detail = format!(
            "{} {} to {} ({}){}",
            record.spec.service,
            record.spec.version,
            record.spec.environment,
            strategy_name(record.spec.strategy),
            if record.spec.comment.is_empty() {
                String::new()
            } else {
                format!(": {}", record.spec.comment)
            }
        );
        let service = record.spec.service.clone();
        self.records.insert(id, record);
        self.audit(now, actor, "deployment.create", Some(&service), Some(id), detail)?;
        if running.is_none() {
            self.start(now, id)?;
        } else {
            self.audit(
                now,
                "coordinator",
                "deployment.queue",
                Some(&service),
                Some(id),
                format!("behind deployment {}", running.unwrap_or_default()),
            )?;
        }
        Ok(id)
    }

    /// An operator command on a deployment.
    pub fn operate(
        &mut self,
        now: Duration,
        actor: &str,
        id: u64,
        command: Operator,
        comment: &str,
    ) -> Result<(), FleetError> {
        let Some(record) = self.records.get(&id).cloned() else {
            return Err(FleetError::NotFound { what: format!("deployment {id}") });
        };
        let action = match command {
            Operator::Pause => "deployment.pause",
            Operator::Resume => "deployment.resume",
            Operator::Promote => "deployment.promote",
            Operator::Rollback => "deployment.rollback",
            Operator::Abort => "deployment.abort",
        };
        if record.state == DeploymentState::Queued {
            if matches!(command, Operator::Abort | Operator::Rollback) {
                let mut record = record;
                record.state = DeploymentState::Cancelled;
                record.finished_ms = Some(ms(now));
                record.outcome = Some(format!("cancelled while queued by {actor}"));
                self.store.put_deployment(&record)?;
                self.records.insert(id, record.clone());
                return self.audit(
                    now,
                    actor,
                    action,
                    Some(&record.spec.service),
                    Some(id),
                    comment,
                );
            }
            return Err(FleetError::NotApplicable(format!("deployment {id} is queued")));
        }
        let Some(live) = self.live.get_mut(&id) else {
            return Err(FleetError::NotApplicable(format!(
                "deployment {id} is {} and replaced by a later one",
                state_name(record.state)
            )));
        };
        // Check first, without changing anything, so a refused command is not logged.
        let mut probe = Rollout::restore(live.engine.snapshot())
            .map_err(|e| FleetError::Invalid(e.to_string()))?;
        probe
            .handle_operator(engine_time(now), command)
            .map_err(|e| FleetError::NotApplicable(e.to_string()))?;
        self.audit(now, actor, action, Some(&record.spec.service), Some(id), comment)?;
        self.input(id, now, Input::Operator { command })
    }

    // ---------------------------------------------------------------------------------------
    // Views

    fn version_name(&self, service: &str, manifest: ManifestId) -> String {
        self.store
            .versions(Some(service))
            .ok()
            .and_then(|v| v.into_iter().find(|r| r.manifest == manifest).map(|r| r.version))
            .unwrap_or_else(|| manifest.to_string())
    }

    /// A deployment's view.
    pub fn deployment_view(&self, id: u64, now: Duration) -> Option<view::DeploymentView> {
        let r = self.records.get(&id)?;
        let mut v = view::DeploymentView {
            id,
            service: r.spec.service.clone(),
            version: r.spec.version.clone(),
            environment: r.spec.environment.clone(),
            strategy: strategy_name(r.spec.strategy).into(),
            manifest: r.manifest.to_string(),
            state: state_name(r.state).into(),
            phase: None,
            paused: false,
            stage: None,
            held: None,
            region: None,
            wave: 0,
            step_percent: None,
            remaining_s: None,
            regions: Vec::new(),
            totals: view::CountsView::default(),
            gates: self.gates.get(&id).cloned().unwrap_or_default(),
            created_by: r.created_by.clone(),
            created_ms: r.created_ms,
            started_ms: r.started_ms,
            finished_ms: r.finished_ms,
            outcome: r.outcome.clone(),
            hotfix: r.spec.hotfix,
        };
        let restored;
        let engine = match self.live.get(&id) {
            Some(live) => &live.engine,
            None => match r.snapshot.clone().and_then(|(_, s)| Rollout::restore(s).ok()) {
                Some(e) => {
                    restored = e;
                    &restored
                }
                None => return Some(v),
            },
        };
        let status = engine.status();
        v.phase = Some(phase_name(status.phase).into());
        v.paused = status.paused;
        let (stage, until, held) = match status.stage {
            WaveStage::Waiting => ("waiting", None, None),
            WaveStage::Activating => ("activating", None, None),
            WaveStage::Baking { until } => ("baking", Some(until), None),
            WaveStage::AwaitingVerdict { deadline, .. } => {
                ("awaiting_verdict", Some(deadline), None)
            }
            WaveStage::Held { reason } => ("held", None, Some(hold_name(&reason))),
            WaveStage::Passed => ("passed", None, None),
        };
        v.stage = Some(stage.into());
        v.held = held;
        v.remaining_s = until.map(|u| u.saturating_sub(now).as_secs());
        let regions: Vec<String> = engine.regions().map(str::to_owned).collect();
        v.region = regions.get(usize::from(status.region.0)).cloned();
        v.wave = status.waves;
        if r.spec.strategy == StrategyKind::Canary {
            let steps = if r.spec.canary_steps.is_empty() {
                vec![1, 5, 25, 50, 100]
            } else {
                r.spec.canary_steps.clone()
            };
            v.step_percent =
                status.waves.checked_sub(1).and_then(|w| steps.get(usize::from(w)).copied());
        }
        let staged = |region: Option<u16>| -> u32 {
            self.hosts
                .values()
                .filter(|h| {
                    engine
                        .host(HostId(h.record.number))
                        .is_ok_and(|s| s.staged && region.is_none_or(|r| s.region.0 == r))
                })
                .count() as u32
        };
        let counts = |c: crate::rollout::Counts, staged: u32| view::CountsView {
            hosts: c.hosts,
            assigned: c.assigned,
            updated: c.updated,
            failed: c.failed,
            unavailable: c.unavailable,
            lost: c.lost,
            unsettled: c.unsettled,
            staged,
        };
        for (i, name) in regions.iter().enumerate() {
            let index = crate::rollout::RegionIndex(i as u16);
            if let Some(c) = engine.region_counts(index) {
                v.regions.push(view::RegionView {
                    name: name.clone(),
                    counts: counts(c, staged(Some(index.0))),
                });
            }
        }
        v.totals = counts(status.totals, staged(None));
        Some(v)
    }

    /// Every deployment, newest first, optionally of one service.
    pub fn deployments(&self, service: Option<&str>, now: Duration) -> Vec<view::DeploymentView> {
        self.records
            .keys()
            .rev()
            .filter(|id| service.is_none_or(|s| self.records[id].spec.service == s))
            .filter_map(|&id| self.deployment_view(id, now))
            .collect()
    }

    /// The service of a deployment.
    pub fn deployment_service(&self, id: u64) -> Option<&str> {
        self.records.get(&id).map(|r| r.spec.service.as_str())
    }

    /// Every host.
    pub fn hosts_view(&self) -> Vec<view::HostView> {
        self.hosts
            .values()
            .map(|h| view::HostView {
                id: h.record.peer_id.clone(),
                name: h.record.name.clone(),
                region: h.record.region.clone(),
                environment: h.record.environment.clone(),
                lost: h.actual.lost,
                seen_ms: h.actual.seen_ms,
                services: h
                    .actual
                    .services
                    .iter()
                    .map(|s| view::HostServiceView {
                        service: s.service.clone(),
                        active: s.active.map(|m| self.version_name(&s.service, m)),
                        healthy: s.healthy,
                        standby: s.standby.map(|m| self.version_name(&s.service, m)),
                    })
                    .collect(),
                staged: h.actual.staged.iter().map(ManifestId::to_string).collect(),
                agent_version: h.actual.agent_version.clone(),
            })
            .collect()
    }

    /// Every service.
    pub fn services_view(&self) -> Result<Vec<view::ServiceView>, FleetError> {
        let mut out: BTreeMap<String, view::ServiceView> = BTreeMap::new();
        for v in self.store.versions(None)? {
            let entry = out.entry(v.service.clone()).or_insert_with(|| view::ServiceView {
                service: v.service.clone(),
                versions: 0,
                latest: None,
                deployed: Vec::new(),
            });
            entry.versions += 1;
            entry.latest = Some(v.version.clone());
        }
        for (service, env) in self.current.keys() {
            if let (Some(entry), Some(m)) =
                (out.get_mut(service), self.release_of_record(service, env))
            {
                entry.deployed.push((env.clone(), self.version_name(service, m)));
            }
        }
        Ok(out.into_values().collect())
    }

    /// Number of enrolled hosts and of lost ones.
    pub fn host_counts(&self) -> (usize, usize) {
        (self.hosts.len(), self.hosts.values().filter(|h| h.actual.lost).count())
    }

    /// Number of deployments running.
    pub fn running_deployments(&self) -> usize {
        self.records.values().filter(|r| r.state == DeploymentState::Running).count()
    }
}

/// When deployment `id` started (its first snapshot's time), in ms.
fn record_now(records: &BTreeMap<u64, DeploymentRecord>, id: u64) -> u64 {
    records.get(&id).and_then(|r| r.started_ms).unwrap_or_default()
}

fn apply(engine: &mut Rollout, now: Duration, input: &Input) {
    let result = match *input {
        Input::Host { host, event } => engine.handle_host(now, HostId(host), event),
        Input::Verdict { gate, verdict } => {
            engine.handle_verdict(now, crate::rollout::GateId(gate), verdict)
        }
        Input::Operator { command } => engine.handle_operator(now, command),
        Input::Timeout => {
            engine.handle_timeout(now);
            Ok(())
        }
    };
    if let Err(e) = result {
        // Stale verdicts and the like change nothing; they are logged for the record.
        tracing::debug!(error = %e, "rollout engine refused an input");
    }
}

fn hold_name(reason: &crate::rollout::HoldReason) -> String {
    use crate::rollout::HoldReason::*;
    match reason {
        Inconclusive { gate } => format!("inconclusive: gate {} could not decide", gate.0),
        GateTimeout { gate } => format!("gate_timeout: gate {} gave no verdict in time", gate.0),
        Approval => "approval: waiting for an approver to promote".into(),
    }
}

fn region_name(regions: &[String], r: crate::rollout::RegionIndex) -> String {
    regions.get(usize::from(r.0)).cloned().unwrap_or_else(|| format!("#{}", r.0))
}

fn hosts(n: u32) -> String {
    if n == 1 { "1 host".into() } else { format!("{n} hosts") }
}

fn describe_reason(reason: &crate::rollout::RollbackReason, regions: &[String]) -> String {
    use crate::rollout::RollbackReason::*;
    match reason {
        GateFailed { gate } => format!("analysis gate {} failed", gate.0),
        TooManyFailures { region, failed, allowed } => format!(
            "{} failed in region {} (at most {allowed} allowed)",
            hosts(*failed),
            region_name(regions, *region)
        ),
        Operator => "an operator asked for it".into(),
    }
}

fn describe_notice(notice: &Notice, regions: &[String]) -> (&'static str, String) {
    let name = |r: &crate::rollout::RegionIndex| region_name(regions, *r);
    match notice {
        Notice::WaveStarted { region, wave, kind, cap, added } => (
            "rollout.wave_started",
            format!(
                "region {} wave {wave} ({kind:?}): {} added, cap {cap}",
                name(region),
                hosts(*added)
            ),
        ),
        Notice::WavePassed { region, wave, promoted } => (
            "rollout.wave_passed",
            format!(
                "region {} wave {wave}{}",
                name(region),
                if *promoted { " (promoted)" } else { "" }
            ),
        ),
        Notice::RegionDone { region } => {
            ("rollout.region_done", format!("region {}", name(region)))
        }
        Notice::Straggler { host, region } => {
            ("rollout.straggler", format!("host #{} in region {}", host.0, name(region)))
        }
        Notice::HostFailed { host, region, reason } => (
            "rollout.host_failed",
            format!("host #{} in region {}: {reason:?}", host.0, name(region)),
        ),
        Notice::Held { reason } => ("rollout.held", hold_name(reason)),
        Notice::Paused => ("rollout.paused", String::new()),
        Notice::Resumed => ("rollout.resumed", String::new()),
        Notice::RollingBack { reason } => {
            ("rollout.rolling_back", describe_reason(reason, regions))
        }
        Notice::RolledBack { unconfirmed } => {
            ("rollout.rolled_back", format!("{} unconfirmed", hosts(*unconfirmed)))
        }
        Notice::Done { stragglers } => ("rollout.done", format!("{stragglers} stragglers")),
        Notice::Aborted => ("rollout.aborted", String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ServiceActual;

    /// The release deployed, and the one the hosts run before.
    const M: ManifestId = ManifestId([7; 32]);
    const OLD: ManifestId = ManifestId([6; 32]);

    struct Host {
        peer: PeerId,
        sequence: u64,
    }

    /// `host` reports `M` staged and `active` serving, with that health.
    fn report(
        fleet: &mut Fleet,
        now: Duration,
        host: &mut Host,
        active: ManifestId,
        healthy: Option<bool>,
    ) {
        host.sequence += 1;
        let actual = HostActual {
            sequence: host.sequence,
            staged: vec![M],
            services: vec![ServiceActual {
                service: "web".into(),
                active: Some(active),
                healthy,
                ..ServiceActual::default()
            }],
            ..HostActual::default()
        };
        fleet.heartbeat(now, &host.peer, actual, &[]).expect("heartbeat");
    }

    /// The engine state as the live coordinator holds it.
    fn state(fleet: &Fleet, id: u64) -> String {
        serde_json::to_string(&fleet.live[&id].engine.snapshot()).expect("json")
    }

    #[test]
    fn operator_records_written_after_a_restart_keep_those_written_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Duration::from_millis(1_800_000_000_000);
        let config = FleetConfig::default();
        let open = || {
            Fleet::open(Store::open(dir.path()).expect("store"), config.clone(), now)
                .expect("fleet")
        };
        let mut fleet = open();
        fleet.audit(now, "alice", "pause", Some("web"), None, "before").expect("audit");
        fleet.store().flush().expect("flush");
        drop(fleet);
        // The clock shows the same millisecond after the restart (it stepped back).
        let mut fleet = open();
        fleet.audit(now, "bob", "resume", Some("web"), None, "after").expect("audit");
        let ms = u64::try_from(now.as_millis()).expect("ms");
        let records = fleet.store().audit_range(ms, ms, None, 10).expect("audit");
        let actors: Vec<&str> = records.iter().map(|r| r.actor.as_str()).collect();
        assert_eq!(actors, ["alice", "bob"]);
    }

    /// Inputs arrive at any nanosecond, but the log keeps milliseconds: the engine must have
    /// seen the time the log replays, or a restarted coordinator decides at another input
    /// (a wave passed twice). Here a host outside the wave reports its health 0.2 ms before
    /// the bake of the wave ends, within the same millisecond.
    #[test]
    fn a_reopened_fleet_replays_to_the_state_it_had_at_sub_millisecond_times() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = Duration::from_millis(1_800_000_000_000);
        let at = |ms: u64, us: u64| base + Duration::from_millis(ms) + Duration::from_micros(us);
        let config = FleetConfig::default();
        let mut fleet =
            Fleet::open(Store::open(dir.path()).expect("store"), config.clone(), at(0, 0))
                .expect("fleet");
        let mut hosts: Vec<Host> = (0..4)
            .map(|i| {
                let key = libp2p_identity::Keypair::generate_ed25519();
                let peer = key.public().to_peer_id();
                let public = key.public().encode_protobuf();
                fleet
                    .enroll(at(0, 0), peer, public, "r1".into(), "prod".into(), format!("h{i}"))
                    .expect("enroll");
                Host { peer, sequence: 0 }
            })
            .collect();
        fleet.register_version(at(1, 0), "admin", "web", "1.0.0", M, 1).expect("register");
        fleet.promote_version(at(1, 0), "admin", "web", "1.0.0", "prod", "").expect("promote");
        let spec: DeploymentSpec = serde_json::from_value(serde_json::json!({
            "service": "web", "version": "1.0.0", "environment": "prod", "strategy": "rolling",
            "max_unavailable": "1", "bake": "300ms", "bake_first_region": "300ms",
            "analysis": false
        }))
        .expect("spec");
        let id = fleet.create_deployment(at(2, 500), "admin", spec).expect("deployment");
        for h in &mut hosts {
            report(&mut fleet, at(10, 500), h, OLD, None);
        }
        let first = (0..4)
            .find(|&i| {
                let number = fleet.host_by_peer(&hosts[i].peer).expect("enrolled").0;
                fleet.desired_for(number).iter().any(|d| d.desired.active == Some(M))
            })
            .expect("a first wave");
        // Settles at 100.5 ms: the bake ends at 400.5 ms.
        report(&mut fleet, at(100, 500), &mut hosts[first], M, Some(true));
        fleet.tick(at(200, 0)).expect("tick");
        let other = (first + 1) % 4;
        report(&mut fleet, at(400, 300), &mut hosts[other], OLD, Some(true));
        let live = state(&fleet, id);
        let view = fleet.deployment_view(id, at(401, 0)).expect("view");
        // The engine counts whole milliseconds: the report in the bake's last one passes it.
        assert_eq!(view.wave, 1, "{view:?}");
        fleet.store().flush().expect("flush");
        drop(fleet);
        let fleet = Fleet::open(Store::open(dir.path()).expect("store"), config, at(401, 0))
            .expect("reopened");
        let again = fleet.deployment_view(id, at(401, 0)).expect("view");
        assert_eq!((again.wave, &again.stage), (view.wave, &view.stage), "{again:?}");
        assert_eq!(state(&fleet, id), live, "the replay reaches the state the engine had");
    }
}
