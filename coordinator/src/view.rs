//! The REST API's JSON bodies: what the coordinator answers and the CLI reads.
//!
//! Manifest ids are 64 lowercase hex digits; times are milliseconds since the Unix epoch.

use serde::{Deserialize, Serialize};

/// An error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error's code and message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable, machine-readable (`unauthorized`, `forbidden`, `not_found`, `invalid_request`,
    /// `not_promoted`, `deployment_in_progress`, `not_applicable`, `untrusted_manifest`,
    /// `conflict`, `internal`).
    pub code: String,
    /// One line for people.
    pub message: String,
}

/// Host counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountsView {
    /// In scope.
    pub hosts: u32,
    /// Taken into a wave so far.
    pub assigned: u32,
    /// On the target and healthy.
    pub updated: u32,
    /// Failed.
    pub failed: u32,
    /// Unavailable.
    pub unavailable: u32,
    /// Lost.
    pub lost: u32,
    /// Activating or waiting in their wave.
    pub unsettled: u32,
    /// Reported the target staged.
    pub staged: u32,
}

/// One region of a deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionView {
    /// Its name.
    pub name: String,
    /// Its counts.
    pub counts: CountsView,
}

/// Error rates of canary and baseline in the last analysis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateView {
    /// The gate's number.
    pub gate: u32,
    /// Region and wave judged.
    pub region: String,
    /// The wave.
    pub wave: u16,
    /// `pass`, `fail`, `inconclusive`, or `pending`.
    pub verdict: String,
    /// Canary hosts and their requests and errors in the window.
    pub canary_hosts: u32,
    /// Requests of the canary hosts in the window.
    pub canary_requests: u64,
    /// Errors of the canary hosts in the window.
    pub canary_errors: u64,
    /// Baseline hosts.
    pub baseline_hosts: u32,
    /// Requests of the baseline hosts in the window.
    pub baseline_requests: u64,
    /// Errors of the baseline hosts in the window.
    pub baseline_errors: u64,
    /// The judge's evidence (statistic, p- or e-value, effect), as it gave it.
    pub evidence: serde_json::Value,
    /// When decided (ms), if it was.
    pub decided_ms: Option<u64>,
}

/// A deployment (`GET /api/v1/deployments/{id}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploymentView {
    /// Its id.
    pub id: u64,
    /// The service.
    pub service: String,
    /// The version.
    pub version: String,
    /// The environment.
    pub environment: String,
    /// `rolling`, `canary` or `blue_green`.
    pub strategy: String,
    /// The target manifest.
    pub manifest: String,
    /// `queued`, `running`, `succeeded`, `rolled_back`, `aborted`, `cancelled`.
    pub state: String,
    /// The engine's phase: `running`, `rolling_back`, `rolled_back`, `done`, `aborted` (absent
    /// while queued).
    pub phase: Option<String>,
    /// Paused by an operator.
    pub paused: bool,
    /// The current wave's stage: `waiting`, `activating`, `baking`, `awaiting_verdict`,
    /// `held`, `passed`.
    pub stage: Option<String>,
    /// Why it holds, if it does.
    pub held: Option<String>,
    /// The current region.
    pub region: Option<String>,
    /// Waves formed in the current region.
    pub wave: u16,
    /// The canary step (percent of each region) of the current wave, for canaries.
    pub step_percent: Option<u32>,
    /// Seconds until the current bake ends (or the gate's deadline), if any.
    pub remaining_s: Option<u64>,
    /// Per region, in rollout order.
    pub regions: Vec<RegionView>,
    /// Over every region.
    pub totals: CountsView,
    /// Gates judged, newest last.
    pub gates: Vec<GateView>,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_ms: u64,
    /// When it started.
    pub started_ms: Option<u64>,
    /// When it ended.
    pub finished_ms: Option<u64>,
    /// Why it ended, in words.
    pub outcome: Option<String>,
    /// A hotfix.
    pub hotfix: bool,
}

impl DeploymentView {
    /// Whether nothing more happens to it.
    pub fn is_final(&self) -> bool {
        !matches!(self.state.as_str(), "queued" | "running")
    }
}

/// A host (`GET /api/v1/hosts`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    /// Its PeerId.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its region.
    pub region: String,
    /// Its environment.
    pub environment: String,
    /// Missed its heartbeats.
    pub lost: bool,
    /// Last heartbeat (ms).
    pub seen_ms: u64,
    /// Its services.
    pub services: Vec<HostServiceView>,
    /// Staged manifests.
    pub staged: Vec<String>,
    /// The daemon's version.
    pub agent_version: String,
}

/// A service on a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostServiceView {
    /// The service.
    pub service: String,
    /// The active release's version (or manifest id if unknown to the registry).
    pub active: Option<String>,
    /// Healthy.
    pub healthy: Option<bool>,
    /// A standby release.
    pub standby: Option<String>,
}

/// A version of a service (`GET /api/v1/services/{service}/versions`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionView {
    /// The service.
    pub service: String,
    /// The version.
    pub version: String,
    /// Its manifest.
    pub manifest: String,
    /// Artifact size.
    pub size: u64,
    /// Who registered it.
    pub registered_by: String,
    /// When.
    pub registered_ms: u64,
    /// Environments it was promoted to, in order.
    pub environments: Vec<PromotionView>,
}

/// A promotion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionView {
    /// The environment.
    pub environment: String,
    /// Who.
    pub by: String,
    /// When.
    pub at_ms: u64,
    /// Why.
    pub comment: String,
}

/// A service (`GET /api/v1/services`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    /// The service.
    pub service: String,
    /// Versions registered.
    pub versions: u32,
    /// The newest version.
    pub latest: Option<String>,
    /// Per environment, the version of record (last successful deployment).
    pub deployed: Vec<(String, String)>,
}

/// An audit record (`GET /api/v1/audit`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditView {
    /// When (ms).
    pub at_ms: u64,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// The service.
    pub service: Option<String>,
    /// The deployment.
    pub deployment: Option<u64>,
    /// Details and why.
    pub detail: String,
}

/// `POST /api/v1/services/{service}/versions`: register a version (in `dev`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The signed manifest envelope (as `fleetwave publish` writes it), in hex.
    pub signed_manifest_hex: String,
}

/// `POST /api/v1/services/{service}/versions/{version}/promote`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// The environment.
    pub environment: String,
    /// Why.
    #[serde(default)]
    pub comment: String,
}

/// `POST /api/v1/deployments/{id}/{promote,pause,resume,rollback,abort}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperateRequest {
    /// Why (audit log).
    #[serde(default)]
    pub comment: String,
}
