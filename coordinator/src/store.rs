//! The coordinator's durable state, in sled.
//!
//! # Trees
//!
//! | tree          | key                                  | value               |
//! |---------------|--------------------------------------|---------------------|
//! | `meta`        | `"schema"`                           | [`SCHEMA`] (JSON)   |
//! | `meta`        | `"session_secret"`                   | 32 random bytes     |
//! | `hosts`       | host number (u64 big endian)         | [`HostRecord`]      |
//! | `host_state`  | host number                          | `StoredHostState`   |
//! | `versions`    | `service \0 version`                 | [`VersionRecord`]   |
//! | `deployments` | deployment id (u64 big endian)       | [`DeploymentRecord`]|
//! | `log`         | deployment id, sequence (u64 BE x 2) | [`LogEntry`]        |
//! | `audit`       | time in ms, sequence (u64 BE x 2)    | [`AuditEntry`]      |
//! | `tokens`      | SHA-256 of the token (hex)           | [`TokenRecord`]     |
//!
//! Values are JSON, except in `host_state`: every heartbeat writes one, so it is protobuf
//! (`fleetwave.v1.StoredHostState`: the report as the host encoded it, the time it was seen,
//! the lost flag), written without encoding the report again. A store of schema 1 (JSON host
//! states) is converted when it is opened.
//!
//! `session_secret` is the key every heartbeat session key is derived from
//! (`fleetwave_proto::session`); deleting it (coordinator stopped) ends every session, and the
//! hosts open new ones. Whoever can read the store can forge heartbeats, as whoever can write
//! it can rewrite the fleet's state: keep the data directory private.
//!
//! Writes go to sled's log; [`Store::commit`] makes everything written before it durable
//! (fsync). Callers write, commit, and only then act (answer a heartbeat with a new desired
//! state, reply to an API call): every transition is persisted before it is acted on. Commits
//! are grouped: many writers waiting at once share one fsync.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fleetwave_proto::session::{CoordinatorSecret, KEY_LEN};
use fleetwave_proto::v1 as pb;
use prost::Message;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::rollout::{HostEvent, ManifestId, Operator, Snapshot, Verdict};

/// Version of the stored format; a store of another version is refused (schema 1, whose host
/// states are JSON, is converted).
pub const SCHEMA: u32 = 2;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption).
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    /// A record does not decode.
    #[error("state store: record in {tree} does not decode: {reason}")]
    Corrupt {
        /// The tree.
        tree: &'static str,
        /// Why.
        reason: String,
    },
    /// The store was written by another version.
    #[error("state store has schema {found}, this coordinator reads {SCHEMA}")]
    Schema {
        /// Its schema.
        found: u32,
    },
}

/// An enrolled host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Its number: the rollout engine's `HostId`.
    pub number: u64,
    /// Its PeerId (base58).
    pub peer_id: String,
    /// Its identity public key, protobuf-encoded (libp2p).
    pub public_key: Vec<u8>,
    /// Its region.
    pub region: String,
    /// Its environment.
    pub environment: String,
    /// Its name.
    pub name: String,
    /// When it enrolled (ms since the Unix epoch).
    pub enrolled_ms: u64,
}

/// What a host last reported.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostActual {
    /// The report's sequence number (replays are refused).
    pub sequence: u64,
    /// When the coordinator received it (ms since the Unix epoch).
    pub seen_ms: u64,
    /// Marked lost (missed heartbeats).
    pub lost: bool,
    /// Per service.
    pub services: Vec<ServiceActual>,
    /// Staged manifests.
    pub staged: Vec<ManifestId>,
    /// Manifests whose staging failed.
    pub stage_failed: Vec<ManifestId>,
    /// The daemon's version.
    pub agent_version: String,
}

/// A report does not fit the coordinator's limits or types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// A list is longer than allowed.
    #[error("too many {what} in the report (at most {max})")]
    TooMany {
        /// What.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// A string is longer than 128 bytes.
    #[error("{field} is longer than 128 bytes")]
    TooLong {
        /// The field.
        field: &'static str,
    },
    /// A manifest id is not 32 bytes.
    #[error("{field}: a manifest id is 32 bytes")]
    ManifestId {
        /// The field.
        field: &'static str,
    },
}

/// Most services in a report.
pub const MAX_SERVICES: usize = 256;
/// Most manifests in a report's staged and failed lists.
pub const MAX_MANIFESTS: usize = 1024;
/// Most latency buckets of a service.
pub const MAX_BUCKETS: usize = crate::analysis::MAX_BUCKETS + 1;
/// Longest string in a report.
pub const MAX_STRING: usize = 128;

fn manifest_of(bytes: &[u8], field: &'static str) -> Result<Option<ManifestId>, ReportError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let arr: [u8; 32] = bytes.try_into().map_err(|_| ReportError::ManifestId { field })?;
    Ok(Some(ManifestId(arr)))
}

fn health_of(value: i32) -> Option<bool> {
    match pb::HealthState::try_from(value) {
        Ok(pb::HealthState::Healthy) => Some(true),
        Ok(pb::HealthState::Unhealthy) => Some(false),
        _ => None,
    }
}

fn health_to(value: Option<bool>) -> i32 {
    match value {
        Some(true) => pb::HealthState::Healthy as i32,
        Some(false) => pb::HealthState::Unhealthy as i32,
        None => pb::HealthState::Unspecified as i32,
    }
}

fn short(field: &'static str, s: &str) -> Result<(), ReportError> {
    if s.len() > MAX_STRING {
        return Err(ReportError::TooLong { field });
    }
    Ok(())
}

impl TryFrom<&pb::HostReport> for HostActual {
    type Error = ReportError;

    /// The coordinator's record of a report, checking its limits (`seen_ms` and `lost` are
    /// left for the caller).
    fn try_from(report: &pb::HostReport) -> Result<Self, ReportError> {
        if report.services.len() > MAX_SERVICES {
            return Err(ReportError::TooMany { what: "services", max: MAX_SERVICES });
        }
        if report.staged.len() + report.stage_failed.len() > MAX_MANIFESTS {
            return Err(ReportError::TooMany { what: "manifests", max: MAX_MANIFESTS });
        }
        short("agent_version", &report.agent_version)?;
        let mut services = Vec::with_capacity(report.services.len());
        for s in &report.services {
            short("service", &s.service)?;
            let (requests, errors, latency_buckets) = match &s.counters {
                Some(c) => {
                    if c.latency_buckets.len() > MAX_BUCKETS {
                        return Err(ReportError::TooMany {
                            what: "latency buckets",
                            max: MAX_BUCKETS,
                        });
                    }
                    (c.requests, c.errors, c.latency_buckets.clone())
                }
                None => (0, 0, Vec::new()),
            };
            services.push(ServiceActual {
                service: s.service.clone(),
                active: manifest_of(&s.active, "active")?,
                standby: manifest_of(&s.standby, "standby")?,
                healthy: health_of(s.health),
                standby_healthy: health_of(s.standby_health),
                activation_failed: manifest_of(&s.activation_failed, "activation_failed")?,
                requests,
                errors,
                latency_buckets,
            });
        }
        let ids = |list: &[Vec<u8>], field| -> Result<Vec<ManifestId>, ReportError> {
            list.iter().filter_map(|b| manifest_of(b, field).transpose()).collect()
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
}

impl HostActual {
    /// The report this record was read from (its time stamp aside).
    pub fn to_report(&self) -> pb::HostReport {
        let id = |m: &Option<ManifestId>| m.map(|m| m.0.to_vec()).unwrap_or_default();
        pb::HostReport {
            sequence: self.sequence,
            timestamp_ms: 0,
            services: self
                .services
                .iter()
                .map(|s| pb::ServiceReport {
                    service: s.service.clone(),
                    active: id(&s.active),
                    standby: id(&s.standby),
                    health: health_to(s.healthy),
                    standby_health: health_to(s.standby_healthy),
                    activation_failed: id(&s.activation_failed),
                    counters: Some(pb::RequestCounters {
                        requests: s.requests,
                        errors: s.errors,
                        latency_buckets: s.latency_buckets.clone(),
                    }),
                })
                .collect(),
            staged: self.staged.iter().map(|m| m.0.to_vec()).collect(),
            stage_failed: self.stage_failed.iter().map(|m| m.0.to_vec()).collect(),
            agent_version: self.agent_version.clone(),
        }
    }
}

fn encode_state(report: &[u8], seen_ms: u64, lost: bool) -> Vec<u8> {
    pb::StoredHostState { report: report.to_vec(), seen_ms, lost }.encode_to_vec()
}

fn decode_state(bytes: &[u8]) -> Result<HostActual, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { tree: "host_state", reason };
    let state = pb::StoredHostState::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    let report =
        pb::HostReport::decode(state.report.as_slice()).map_err(|e| corrupt(e.to_string()))?;
    let mut actual = HostActual::try_from(&report).map_err(|e| corrupt(e.to_string()))?;
    actual.seen_ms = state.seen_ms;
    actual.lost = state.lost;
    Ok(actual)
}

/// One service on a host, as reported.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceActual {
    /// The service.
    pub service: String,
    /// Its active release.
    pub active: Option<ManifestId>,
    /// A release running beside it without traffic.
    pub standby: Option<ManifestId>,
    /// Health of the active release (`None`: not reported).
    pub healthy: Option<bool>,
    /// Health of the standby release.
    pub standby_healthy: Option<bool>,
    /// The last activation that failed.
    pub activation_failed: Option<ManifestId>,
    /// Requests served by the active release.
    pub requests: u64,
    /// Errors among them.
    pub errors: u64,
    /// Cumulative latency bucket counts.
    pub latency_buckets: Vec<u64>,
}

/// An environment a version was promoted to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    /// The environment.
    pub environment: String,
    /// Who promoted it.
    pub by: String,
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
    /// Why.
    pub comment: String,
}

/// A registered version of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// The service.
    pub service: String,
    /// The version.
    pub version: String,
    /// The signed manifest's id.
    pub manifest: ManifestId,
    /// Artifact size in bytes.
    pub size: u64,
    /// Who registered it.
    pub registered_by: String,
    /// When (ms since the Unix epoch).
    pub registered_ms: u64,
    /// Environments it may be deployed to, in the order it reached them (`dev` first).
    pub promotions: Vec<Promotion>,
}

impl VersionRecord {
    /// Whether it was promoted to `environment`.
    pub fn allowed_in(&self, environment: &str) -> bool {
        self.promotions.iter().any(|p| p.environment == environment)
    }
}

/// Where a deployment stands, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    /// Waiting for the running deployment of its service and environment to finish.
    Queued,
    /// Its engine is running (includes rolling back).
    Running,
    /// Every region done.
    Succeeded,
    /// Rolled back.
    RolledBack,
    /// Stopped by an operator.
    Aborted,
    /// Replaced while queued, or could not start.
    Cancelled,
}

impl DeploymentState {
    /// Whether nothing more happens to it.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }
}

/// A deployment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// Its id.
    pub id: u64,
    /// What was asked for.
    pub spec: crate::deploy::DeploymentSpec,
    /// The target release.
    pub manifest: ManifestId,
    /// Who asked.
    pub created_by: String,
    /// When (ms since the Unix epoch).
    pub created_ms: u64,
    /// When it started running.
    pub started_ms: Option<u64>,
    /// When it reached a final state.
    pub finished_ms: Option<u64>,
    /// Where it stands.
    pub state: DeploymentState,
    /// Why it ended, in words (rolled back because ..., cancelled because ...).
    pub outcome: Option<String>,
    /// The engine's snapshot, with the log sequence it includes (entries up to it).
    pub snapshot: Option<(u64, Snapshot)>,
    /// Gates judged, with the judge's evidence, oldest first.
    #[serde(default)]
    pub gates: Vec<crate::view::GateView>,
}

/// One input of a deployment's engine, logged before it is applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// `now` given to the engine (ms since the Unix epoch).
    pub now_ms: u64,
    /// The input.
    pub input: Input,
}

/// An input of the rollout engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Input {
    /// A host report.
    Host {
        /// The host number.
        host: u64,
        /// What it reported.
        event: HostEvent,
    },
    /// The judge's verdict.
    Verdict {
        /// The gate.
        gate: u32,
        /// The verdict.
        verdict: Verdict,
    },
    /// An operator command.
    Operator {
        /// The command.
        command: Operator,
    },
    /// The engine's deadline passed.
    Timeout,
}

/// One audit record: who did what, when, why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
    /// Who: a token's name, a host's PeerId, or `coordinator` for automatic decisions.
    pub actor: String,
    /// What, as a dotted name (`deployment.create`, `deployment.rollback`, `auth.refused`, ..).
    pub action: String,
    /// The service concerned, if any.
    pub service: Option<String>,
    /// The deployment concerned, if any.
    pub deployment: Option<u64>,
    /// Details and why.
    pub detail: String,
}

/// A stored API token (the token itself is never stored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Its name (shown in the audit log).
    pub name: String,
    /// What it may do.
    pub role: crate::auth::Role,
}

/// The store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    hosts: sled::Tree,
    host_state: sled::Tree,
    versions: sled::Tree,
    deployments: sled::Tree,
    log: sled::Tree,
    audit: sled::Tree,
    tokens: sled::Tree,
    gates: sled::Tree,
    commits: Arc<Commits>,
}

/// A deployment's open analysis gate as of its last look: what a restarted coordinator
/// continues from instead of starting the gate's evidence over.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpenGateRecord {
    /// The engine's request (the gate continues only if the resumed engine asks the same).
    pub request: crate::rollout::GateRequest,
    /// The judge.
    pub judge: crate::analysis::JudgeSnapshot,
    /// Each host's counters at the last look.
    pub last: Vec<(u64, crate::analysis_gate::HostCounters)>,
    /// Requests and errors of canary and baseline so far.
    pub totals: [u64; 4],
    /// When the next look is due (ms).
    pub next_look_ms: u64,
}

#[derive(Debug, Default)]
struct Commits {
    /// Incremented by every writer that wants a commit.
    requested: AtomicU64,
    /// Every request up to this one is durable.
    done: AtomicU64,
    /// Wakes the committer.
    wake: Notify,
    /// Wakes waiters.
    finished: Notify,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own plain records cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { tree, reason: e.to_string() })
}

fn key2(a: u64, b: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&b.to_be_bytes());
    k
}

fn version_key(service: &str, version: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(service.len() + version.len() + 1);
    k.extend_from_slice(service.as_bytes());
    k.push(0);
    k.extend_from_slice(version.as_bytes());
    k
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &std::path::Path) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir).flush_every_ms(Some(1000)).open()?;
        let meta = db.open_tree("meta")?;
        let host_state = db.open_tree("host_state")?;
        match meta.get("schema")? {
            Some(v) => {
                let found: u32 = decode("meta", &v)?;
                if found == 1 {
                    Self::convert_host_states(&host_state)?;
                    meta.insert("schema", encode(&SCHEMA))?;
                    db.flush()?;
                } else if found != SCHEMA {
                    return Err(StoreError::Schema { found });
                }
            }
            None => {
                meta.insert("schema", encode(&SCHEMA))?;
                db.flush()?;
            }
        }
        Ok(Self {
            hosts: db.open_tree("hosts")?,
            host_state,
            versions: db.open_tree("versions")?,
            deployments: db.open_tree("deployments")?,
            log: db.open_tree("log")?,
            audit: db.open_tree("audit")?,
            tokens: db.open_tree("tokens")?,
            gates: db.open_tree("gates")?,
            commits: Arc::default(),
            db,
        })
    }

    /// Schema 1 to 2: JSON host states to `StoredHostState`.
    fn convert_host_states(tree: &sled::Tree) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for kv in tree.iter() {
            let (k, v) = kv?;
            let actual: HostActual = decode("host_state", &v)?;
            let report = actual.to_report().encode_to_vec();
            batch.insert(k, encode_state(&report, actual.seen_ms, actual.lost));
        }
        tree.apply_batch(batch)?;
        Ok(())
    }

    /// The secret heartbeat session keys are derived from, made (and made durable) the first
    /// time it is asked for.
    pub fn session_secret(&self) -> Result<CoordinatorSecret, StoreError> {
        let meta = self.db.open_tree("meta")?;
        let bad = || StoreError::Corrupt { tree: "meta", reason: "session secret".into() };
        if let Some(v) = meta.get("session_secret")? {
            let bytes: [u8; KEY_LEN] = v.as_ref().try_into().map_err(|_| bad())?;
            return Ok(CoordinatorSecret::new(&bytes));
        }
        let bytes = CoordinatorSecret::generate().map_err(|_| bad())?;
        meta.insert("session_secret", bytes.to_vec())?;
        self.db.flush()?;
        Ok(CoordinatorSecret::new(&bytes))
    }

    /// Runs the group committer until the store is dropped by every other holder. Spawn it
    /// once per store.
    pub async fn run_committer(self) {
        loop {
            let wanted = self.commits.requested.load(Ordering::Acquire);
            if wanted > self.commits.done.load(Ordering::Acquire) {
                let db = self.db.clone();
                match tokio::task::spawn_blocking(move || db.flush()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "state store flush failed"),
                    Err(e) => tracing::error!(error = %e, "state store flush task failed"),
                }
                self.commits.done.store(wanted, Ordering::Release);
                self.commits.finished.notify_waiters();
                continue;
            }
            if Arc::strong_count(&self.commits) == 1 {
                return;
            }
            let woken = self.commits.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.commits.requested.load(Ordering::Acquire)
                > self.commits.done.load(Ordering::Acquire)
            {
                continue;
            }
            // Wake up now and then to notice the other holders are gone.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), woken).await;
        }
    }

    /// Waits until everything written before the call is durable (one fsync shared by every
    /// caller waiting at the same time). Needs [`Store::run_committer`] running.
    pub async fn commit(&self) {
        let ticket = self.commits.requested.fetch_add(1, Ordering::AcqRel) + 1;
        loop {
            let finished = self.commits.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if self.commits.done.load(Ordering::Acquire) >= ticket {
                return;
            }
            self.commits.wake.notify_one();
            finished.await;
        }
    }

    /// Makes everything durable now (blocking), for shutdown and tools.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    // ---- hosts

    /// Every enrolled host.
    pub fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.hosts.iter().values().map(|v| decode("hosts", &v?)).collect()
    }

    /// Writes a host record.
    pub fn put_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        self.hosts.insert(host.number.to_be_bytes(), encode(host))?;
        Ok(())
    }

    /// Every host's last report.
    pub fn host_states(&self) -> Result<Vec<(u64, HostActual)>, StoreError> {
        self.host_state
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let number = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| {
                    StoreError::Corrupt { tree: "host_state", reason: "bad key".into() }
                })?);
                Ok((number, decode_state(&v)?))
            })
            .collect()
    }

    /// Writes a host's last report: `report` is the encoded `HostReport` `actual` was read
    /// from (stored as it is, not encoded again).
    pub fn put_host_report(
        &self,
        number: u64,
        report: &[u8],
        actual: &HostActual,
    ) -> Result<(), StoreError> {
        self.host_state
            .insert(number.to_be_bytes(), encode_state(report, actual.seen_ms, actual.lost))?;
        Ok(())
    }

    /// Writes a host's state (encoding its report from `actual`).
    pub fn put_host_state(&self, number: u64, actual: &HostActual) -> Result<(), StoreError> {
        self.put_host_report(number, &actual.to_report().encode_to_vec(), actual)
    }

    // ---- registry

    /// A version of a service.
    pub fn version(
        &self,
        service: &str,
        version: &str,
    ) -> Result<Option<VersionRecord>, StoreError> {
        self.versions
            .get(version_key(service, version))?
            .map(|v| decode("versions", &v))
            .transpose()
    }

    /// Every version of a service (`None`: of every service), ordered by service, then by
    /// registration time.
    pub fn versions(&self, service: Option<&str>) -> Result<Vec<VersionRecord>, StoreError> {
        let iter = match service {
            Some(s) => {
                let mut prefix = s.as_bytes().to_vec();
                prefix.push(0);
                self.versions.scan_prefix(prefix)
            }
            None => self.versions.iter(),
        };
        let mut out: Vec<VersionRecord> =
            iter.values().map(|v| decode("versions", &v?)).collect::<Result<_, _>>()?;
        out.sort_by(|a, b| {
            (a.service.as_str(), a.registered_ms, a.version.as_str()).cmp(&(
                b.service.as_str(),
                b.registered_ms,
                b.version.as_str(),
            ))
        });
        Ok(out)
    }

    /// Writes a version record.
    pub fn put_version(&self, record: &VersionRecord) -> Result<(), StoreError> {
        self.versions.insert(version_key(&record.service, &record.version), encode(record))?;
        Ok(())
    }

    // ---- deployments

    /// A deployment.
    pub fn deployment(&self, id: u64) -> Result<Option<DeploymentRecord>, StoreError> {
        self.deployments.get(id.to_be_bytes())?.map(|v| decode("deployments", &v)).transpose()
    }

    /// Every deployment, oldest first.
    pub fn deployments(&self) -> Result<Vec<DeploymentRecord>, StoreError> {
        self.deployments.iter().values().map(|v| decode("deployments", &v?)).collect()
    }

    /// The next deployment id.
    pub fn next_deployment_id(&self) -> Result<u64, StoreError> {
        Ok(self.deployments.last()?.map_or(Ok(0), |(k, _)| {
            k.as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt { tree: "deployments", reason: "bad key".into() })
        })? + 1)
    }

    /// Writes a deployment record.
    pub fn put_deployment(&self, record: &DeploymentRecord) -> Result<(), StoreError> {
        self.deployments.insert(record.id.to_be_bytes(), encode(record))?;
        Ok(())
    }

    /// Keeps deployment `deployment`'s open gate.
    pub fn put_gate(&self, deployment: u64, gate: &OpenGateRecord) -> Result<(), StoreError> {
        self.gates.insert(deployment.to_be_bytes(), encode(gate))?;
        Ok(())
    }

    /// Deployment `deployment`'s open gate, if one was kept.
    pub fn gate(&self, deployment: u64) -> Result<Option<OpenGateRecord>, StoreError> {
        self.gates.get(deployment.to_be_bytes())?.map(|v| decode("gates", &v)).transpose()
    }

    /// Forgets deployment `deployment`'s open gate (decided, or the deployment ended).
    pub fn remove_gate(&self, deployment: u64) -> Result<(), StoreError> {
        self.gates.remove(deployment.to_be_bytes())?;
        Ok(())
    }

    /// Appends an engine input to a deployment's log.
    pub fn append_log(
        &self,
        deployment: u64,
        seq: u64,
        entry: &LogEntry,
    ) -> Result<(), StoreError> {
        self.log.insert(key2(deployment, seq), encode(entry))?;
        Ok(())
    }

    /// A deployment's log entries after `after`, in order.
    pub fn log_after(
        &self,
        deployment: u64,
        after: u64,
    ) -> Result<Vec<(u64, LogEntry)>, StoreError> {
        let start = key2(deployment, after.saturating_add(1));
        let end = key2(deployment, u64::MAX);
        self.log
            .range(start..=end)
            .map(|kv| {
                let (k, v) = kv?;
                let seq =
                    u64::from_be_bytes(k[8..16].try_into().map_err(|_| StoreError::Corrupt {
                        tree: "log",
                        reason: "bad key".into(),
                    })?);
                Ok((seq, decode("log", &v)?))
            })
            .collect()
    }

    /// Drops a deployment's log entries up to `upto` (they are in a snapshot).
    pub fn trim_log(&self, deployment: u64, upto: u64) -> Result<(), StoreError> {
        let start = key2(deployment, 0);
        let end = key2(deployment, upto);
        let mut batch = sled::Batch::default();
        for k in self.log.range(start..=end).keys() {
            batch.remove(k?);
        }
        self.log.apply_batch(batch)?;
        Ok(())
    }

    // ---- audit

    /// A sequence number for an operator's or the API's audit record: increasing across
    /// restarts of the coordinator (sled's persistent id generator), so that a record written
    /// after a restart never takes the key of one written before it in the same millisecond
    /// (as after the clock stepped back).
    pub fn next_audit_seq(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    /// Appends an audit record. `seq` tells apart records of the same millisecond; the same
    /// (time, seq) written twice is one record (replays after a restart are idempotent).
    pub fn audit(&self, seq: u64, entry: &AuditEntry) -> Result<(), StoreError> {
        self.audit.insert(key2(entry.at_ms, seq), encode(entry))?;
        Ok(())
    }

    /// Audit records from `since` to `until` (ms, inclusive), optionally of one service, at
    /// most `limit`, oldest first.
    pub fn audit_range(
        &self,
        since: u64,
        until: u64,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        for v in self.audit.range(key2(since, 0)..=key2(until, u64::MAX)).values() {
            let entry: AuditEntry = decode("audit", &v?)?;
            if service.is_some_and(|s| entry.service.as_deref() != Some(s)) {
                continue;
            }
            out.push(entry);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    // ---- tokens

    /// The token whose SHA-256 is `hash`.
    pub fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.tokens.get(hash)?.map(|v| decode("tokens", &v)).transpose()
    }

    /// Stores a token by its hash.
    pub fn put_token(&self, hash: &str, record: &TokenRecord) -> Result<(), StoreError> {
        self.tokens.insert(hash, encode(record))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at_ms: u64, service: &str) -> AuditEntry {
        AuditEntry {
            at_ms,
            actor: "ci".into(),
            action: "deployment.create".into(),
            service: Some(service.into()),
            deployment: Some(1),
            detail: String::new(),
        }
    }

    #[tokio::test]
    async fn records_survive_reopen_after_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            let committer = tokio::spawn(store.clone().run_committer());
            store.append_log(7, 1, &LogEntry { now_ms: 5, input: Input::Timeout }).expect("append");
            store.audit(0, &entry(10, "web")).expect("audit");
            store.commit().await;
            // The committer ends once it holds the last handle (and releases sled's lock).
            drop(store);
            committer.await.expect("committer ends");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let log = store.log_after(7, 0).expect("log");
        assert_eq!(log, vec![(1, LogEntry { now_ms: 5, input: Input::Timeout })]);
        assert_eq!(store.audit_range(0, u64::MAX, None, 10).expect("audit").len(), 1);
    }

    #[test]
    fn log_ranges_are_per_deployment_and_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        for d in [1, 2] {
            for seq in 1..=5 {
                store
                    .append_log(d, seq, &LogEntry { now_ms: seq, input: Input::Timeout })
                    .expect("append");
            }
        }
        store.trim_log(1, 3).expect("trim");
        let seqs: Vec<u64> = store.log_after(1, 0).expect("log").into_iter().map(|e| e.0).collect();
        assert_eq!(seqs, vec![4, 5]);
        assert_eq!(store.log_after(2, 2).expect("log").len(), 3);
    }

    #[test]
    fn audit_filters_by_time_and_service() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store.audit(0, &entry(10, "web")).expect("audit");
        store.audit(1, &entry(10, "db")).expect("audit");
        store.audit(0, &entry(20, "web")).expect("audit");
        store.audit(0, &entry(20, "web")).expect("same record twice");
        assert_eq!(store.audit_range(0, 100, Some("web"), 10).expect("q").len(), 2);
        assert_eq!(store.audit_range(15, 100, None, 10).expect("q").len(), 1);
        assert_eq!(store.audit_range(0, 100, None, 2).expect("q").len(), 2);
    }

    fn actual() -> HostActual {
        HostActual {
            sequence: 9,
            seen_ms: 1_234,
            lost: true,
            services: vec![ServiceActual {
                service: "web".into(),
                active: Some(ManifestId([1; 32])),
                standby: None,
                healthy: Some(true),
                standby_healthy: Some(false),
                activation_failed: Some(ManifestId([2; 32])),
                requests: 100,
                errors: 3,
                latency_buckets: vec![1, 2, 3],
            }],
            staged: vec![ManifestId([3; 32])],
            stage_failed: vec![ManifestId([4; 32])],
            agent_version: "0.1.0".into(),
        }
    }

    #[test]
    fn host_states_round_trip_in_protobuf() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store.put_host_state(5, &actual()).expect("put");
        let report = actual().to_report().encode_to_vec();
        let fresh = HostActual { lost: false, ..actual() };
        store.put_host_report(6, &report, &fresh).expect("put");
        assert_eq!(store.host_states().expect("states"), vec![(5, actual()), (6, fresh)]);
    }

    #[test]
    fn a_schema_1_store_is_converted() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = sled::open(dir.path()).expect("sled");
            db.open_tree("meta").expect("meta").insert("schema", b"1".to_vec()).expect("put");
            let json = serde_json::to_vec(&actual()).expect("json");
            db.open_tree("host_state")
                .expect("tree")
                .insert(7u64.to_be_bytes(), json)
                .expect("put");
            db.flush().expect("flush");
        }
        {
            let store = Store::open(dir.path()).expect("open converts");
            assert_eq!(store.host_states().expect("states"), vec![(7, actual())]);
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.host_states().expect("states"), vec![(7, actual())]);
    }

    #[test]
    fn the_session_secret_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mac = |store: &Store| {
            let secret = store.session_secret().expect("secret");
            fleetwave_proto::session::SessionKey::derive(&secret, b"peer", 1).mac(b"r")
        };
        let first = mac(&Store::open(dir.path()).expect("open"));
        assert_eq!(mac(&Store::open(dir.path()).expect("reopen")), first);
    }

    #[test]
    fn a_store_of_another_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = sled::open(dir.path()).expect("sled");
            db.open_tree("meta").expect("meta").insert("schema", b"99".to_vec()).expect("put");
            db.flush().expect("flush");
        }
        assert!(matches!(Store::open(dir.path()), Err(StoreError::Schema { found: 99 })));
    }
}
