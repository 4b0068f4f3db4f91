//! The rollout engine: one deployment's plan and events in, desired host state out.
//!
//! [`Rollout`] is a sans-io state machine (DESIGN.md, "Sans-io cores"): the coordinator daemon
//! feeds it events through `handle_*(now, ..)` methods and carries out the [`Command`]s it takes
//! from [`Rollout::poll_command`]; the fleet simulator drives the very same code on a virtual
//! clock. The engine never reads a clock, touches the network or a file. Time is a [`Duration`]
//! since an epoch the caller chooses (an earlier `now` than one already seen is treated as the
//! latest one seen). The only randomness is the order in which each region's hosts are taken
//! into waves, a ChaCha8 shuffle seeded by [`Plan::seed`], and every collection it iterates is
//! ordered, so **the same plan and the same events give the same commands**, on every platform.
//! Its whole state serializes ([`Rollout::snapshot`], [`Rollout::restore`]), so a coordinator
//! killed at any instant resumes exactly where it was (see Persistence).
//!
//! # Model
//!
//! A [`Plan`] names a service, a *target* release ([`ManifestId`]), the hosts in scope with
//! their region and *previous* release (what each runs now and goes back to), the regions in
//! rollout order, a [`Strategy`], a disruption [`Budget`], a failure tolerance
//! ([`HealthGate`]), [`Bake`] times and [`Timeouts`].
//!
//! The engine holds the **desired state** of every host ([`Desired`]: which release should be
//! active, which should run beside it as a standby, which should be staged ahead); hosts
//! reconcile to it (DESIGN.md, "Rollout path"). [`Rollout::desired`] answers a heartbeat;
//! [`Command::SetDesired`] says whose desired state just changed.
//!
//! Each region's hosts are shuffled once (seeded) into a fixed order, and regions are rolled
//! out one after the other, in plan order. Within the current region the rollout proceeds in
//! **waves**: a wave takes the next hosts of the order (its *cap* is the number of hosts of the
//! region in the rollout once it is formed), activates them, waits until every one of them has
//! *settled* (healthy on the target, or failed), bakes ([`Bake::first_region`] in the first
//! region, [`Bake::other_regions`] after), passes its gates, and the next wave forms. A region
//! is done when its last wave passes; the deployment is done when the last region is.
//!
//! Every host has a role ([`HostRole`]):
//!
//! ```text
//!  Untouched --assigned to a wave--> Queued --staged, budget allows--> Activating --> Updated
//!      ^                               |      (blue-green: Starting -> Ready -> Activating)
//!      +-------- lost while queued ----+        any of them --failure--> Failed
//! ```
//!
//! - **Untouched**: runs the previous release; may be told to stage the target.
//! - **Queued**: in the current wave, waiting for the target to be staged and for room in the
//!   budget. Still runs the previous release.
//! - **Starting**, **Ready** (blue-green): told to start the target beside the previous
//!   release; Ready once the standby reports healthy.
//! - **Activating**: told to run the target (blue-green: to switch to it, keeping the previous
//!   one running as standby); **Updated** once it reports the target active and healthy.
//! - **Failed**: staging, activation or health failed, or a deadline passed. A failed host is
//!   switched back to its previous release at once, on its own, and counts against the
//!   [`HealthGate`].
//!
//! # Strategies
//!
//! - **Rolling**: each wave (batch) is as large as the [`Budget`] allows when it forms; a
//!   region whose budget is used up (hosts lost or unhealthy) waits until hosts recover.
//! - **Canary**: wave *k* of a region brings the region's hosts on the target up to step *k*'s
//!   share ([`Strategy::canary`]: 1%, 5%, 25%, 50%, 100%), every region in turn. Within a step,
//!   hosts are activated as the budget allows (a sliding window), so a 50% step of a large
//!   region never takes half of it down at once. Steps that add no host to a small region are
//!   skipped there.
//! - **Blue-green**: one region at a time: every host starts the target beside the previous
//!   release (Starting -> Ready), then the whole region is switched at once (Activating ->
//!   Updated) with the previous release kept running, baked and gated. Starting a standby and
//!   switching are not disruptive, so the budget does not apply.
//!
//! Staging runs ahead of activation ([`StageAhead`]): by default every host is told to stage
//! the target when the rollout starts; with [`StageAhead::Waves`] the hosts of the next waves
//! are told while the current one bakes. A wave's host is activated only once it reports the
//! target staged, so a wave activates in seconds.
//!
//! # Gates
//!
//! After a wave settles:
//!
//! 1. **Health**, all the time, not only at the end of a bake: when the failed hosts of any
//!    region exceed [`HealthGate::max_failed`] of that region's hosts in the rollout, the whole
//!    deployment rolls back, every region ("a failure anywhere halts every region").
//! 2. **Analysis** ([`Gates::analysis`]): when the wave settles the engine emits
//!    [`Command::EvaluateGate`] with the region's hosts on the target (canary, newest first,
//!    at most [`Plan::gate_sample`]) and as many of its untouched healthy hosts (baseline,
//!    taken from the end of the region's order, the last to be touched). The judge may answer
//!    at any time: `Fail` rolls back at once (early stopping on a clear regression),
//!    `Inconclusive` holds the rollout for a human, `Pass` lets the wave pass when its bake
//!    ends. No verdict by the bake's end plus
//!    [`Timeouts::gate`] holds the rollout. A region's last wave has no baseline left in the
//!    region and is judged on health only (canaries are compared with their own region, never
//!    with history or with other regions).
//! 3. **Approval** ([`Gates::approval`]): the rollout holds until [`Operator::Promote`].
//!
//! # Events
//!
//! - [`handle_host`](Rollout::handle_host): what a host reports ([`HostEvent`]): target
//!   staged or not, standby started, which release is active, health, activation failed,
//!   lost. Reports are idempotent (a repeat changes nothing) and must arrive in the order the
//!   host made them (one heartbeat stream per host does that); reports about other releases
//!   are ignored. Any report from a lost host means it is back, and it should then report its
//!   whole state (it may have missed desired-state changes: answer with
//!   [`Rollout::desired`]).
//! - [`handle_verdict`](Rollout::handle_verdict): the judge's [`Verdict`] on an open gate.
//! - [`handle_operator`](Rollout::handle_operator): [`Operator`] commands.
//! - [`handle_timeout`](Rollout::handle_timeout): the deadline from
//!   [`poll_timeout`](Rollout::poll_timeout) has passed.
//!
//! Events that do not fit the state return [`EventError`] and change nothing.
//!
//! # Commands
//!
//! See [`Command`]: `SetDesired` (hosts whose desired state changed, grouped by the new
//! desired state), `EvaluateGate`, `Notify` ([`Notice`]: waves started and passed, regions
//! done, stragglers, hosts failed, holds, pauses, rollback, done; one per automatic decision,
//! for the audit log). After every event the shell drains
//! [`poll_command`](Rollout::poll_command), then arms a timer for
//! [`poll_timeout`](Rollout::poll_timeout).
//!
//! # Operator commands
//!
//! - `Pause`: no new activation and no new wave; hosts already activating settle, bakes run
//!   out, and health failures still roll back (safety does not pause). `Resume` undoes it.
//!   Both also apply once the deployment is done (to the activation of stragglers).
//! - `Resume` on a rollout held by an inconclusive or timed-out gate: bake again and ask the
//!   judge again (a second look with more data).
//! - `Promote`: pass the current wave now, skipping the rest of its bake and its pending gates
//!   (also the approval gate). Only once the wave has settled.
//! - `Rollback`: roll back now (also after the deployment is done, while its engine is kept).
//! - `Abort`: stop where it is: no further command; desired states stay as they are.
//!
//! # Invariants
//!
//! - **Budget**: in rolling and canary, an activation is started only if afterwards the region
//!   has at most `max_unavailable` hosts unavailable and at least `min_healthy` available. A
//!   host is unavailable when it is lost, not reported healthy, activating, or failed and not
//!   yet back on its previous release. Lost hosts are never healthy. Activating a host that is
//!   unavailable already costs nothing. (Hosts can still become unavailable on their own; the
//!   engine then starts nothing until they recover.)
//! - **Waves**: a host is told to run (or start) the target only as part of its region's
//!   current wave, or as an announced straggler ([`Notice::Straggler`]) once the region's last
//!   wave has formed; a region's hosts ever told the target never exceed the cap of the wave
//!   announced last ([`Notice::WaveStarted`]) plus its stragglers. Regions start and finish in
//!   plan order: no host of a region is touched before every earlier region is done.
//! - **Rollback**: every host ever told to run or start the target is told to run its previous
//!   release again; the rollback is done ([`Notice::RolledBack`]) when each of them that is not
//!   lost reports it active, or at [`Timeouts::rollback`]; lost hosts get the previous release
//!   when they come back and reconcile.
//!
//! # Failure handling
//!
//! - **Lost hosts** are unavailable and never healthy. A wave passes over hosts that are lost
//!   when it forms, and a host lost before it was activated is taken out of its wave (which
//!   goes on without it); either is taken first into the region's next wave once it is back.
//!   One that comes back after its region's last wave formed is a straggler, activated on its
//!   own within the budget (also after the deployment is done; [`Notice::Done`] counts those
//!   still missing). A host lost while activating keeps its place: it settles when it comes
//!   back, or fails at [`Timeouts::activation`].
//! - **Failed hosts** are switched back alone; too many of them roll the deployment back.
//! - **Gate failure** rolls back; an inconclusive verdict or a silent judge holds for a human.
//! - **Rollback** is a switch to a release still on disk, so it ignores the budget: speed wins.
//!
//! # Persistence
//!
//! [`Rollout::snapshot`] is the whole state, commands not yet polled included, and
//! [`Rollout::restore`] continues exactly from it (same commands afterwards as if never
//! stopped). A snapshot costs O(hosts) (about 200 bytes per host as JSON), so persisting one
//! per transition does not scale to 50,000 hosts; the intended use is an event log: append
//! every input (host report, verdict, operator command, timeout with its `now`) before acting
//! on the commands it produces, snapshot every so often, and on restart restore the last
//! snapshot and replay the log after it. Determinism makes the replay reproduce the same
//! commands; `SetDesired` is idempotent (hosts reconcile), so re-sending one is harmless.
//!
//! # Cost
//!
//! Memory: about 40 bytes per host (24 of state, 16 for the id index), plus a few bytes per
//! host of a wave in flight (ready queue, deadlines). For 50,000 hosts, about 2.5 MB.
//!
//! Time: a host report costs O(log hosts) (the id lookup) plus O(1) bookkeeping; per-region
//! counters are kept up to date by diffing each host's classification before and after a
//! change, so nothing is recounted on the hot path. An activation costs O(1). Forming a wave
//! costs O(hosts it adds, plus lost hosts it passes over); opening a gate O(gate sample, plus
//! failed or lost hosts it skips); a blue-green switch O(hosts of the region); a rollback, a
//! snapshot and a restore O(hosts), once each. Nothing is quadratic: lost hosts are not
//! rescanned per wave (those that come back are queued), and gates are capped whatever the
//! number of waves. [`Rollout::poll_timeout`] is O(1).

mod plan;

use std::collections::{BTreeMap, VecDeque};
use std::mem;
use std::time::Duration;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use plan::{
    Bake, Budget, CanaryStep, Gates, HealthGate, HostId, HostSpec, Limit, ManifestId, Plan,
    PlanError, RegionIndex, StageAhead, Strategy, Timeouts,
};

/// Version of the [`Snapshot`] format; [`Rollout::restore`] refuses any other.
pub const SNAPSHOT_VERSION: u32 = 1;

/// Index into the interned previous releases meaning "runs nothing of this service".
const NO_RELEASE: u16 = u16::MAX;

// -------------------------------------------------------------------------------------------
// Events

/// What a host reports about itself. Every variant is idempotent; the daemon turns each
/// heartbeat into the events that changed since the last one (and into its full state when
/// the host comes back after being lost).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HostEvent {
    /// The release is staged: fetched, verified and unpacked, ready to activate.
    Staged {
        /// The release.
        manifest: ManifestId,
    },
    /// Staging the release failed (download, verification or unpacking).
    StageFailed {
        /// The release.
        manifest: ManifestId,
    },
    /// The release was started beside the active one, without traffic (blue-green).
    Started {
        /// The release.
        manifest: ManifestId,
    },
    /// The release is the active one (it serves).
    Active {
        /// The release.
        manifest: ManifestId,
    },
    /// Nothing of the service is active.
    Inactive,
    /// Activating (or starting) the release failed: a hook or the start failed. The host
    /// stays on what it ran before.
    ActivationFailed {
        /// The release.
        manifest: ManifestId,
    },
    /// The health check of the release, active or standby.
    Health {
        /// The release.
        manifest: ManifestId,
        /// Whether it passed.
        healthy: bool,
    },
    /// The host missed its heartbeats. Any later report means it is back.
    Lost,
}

/// A command from an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operator {
    /// Stop starting activations and waves.
    Pause,
    /// Undo a pause; or re-run the gate that held the rollout.
    Resume,
    /// Pass the current (settled) wave now.
    Promote,
    /// Roll everything back now.
    Rollback,
    /// Stop without rolling back.
    Abort,
}

/// Identifies one gate evaluation; a verdict must name the open one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GateId(pub u32);

/// The analysis judge's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Verdict {
    /// No regression: the wave may pass (when its bake ends).
    Pass,
    /// A regression: roll back now.
    Fail,
    /// Not enough evidence either way: hold for a human.
    Inconclusive,
}

// -------------------------------------------------------------------------------------------
// Commands

/// What one host should run: the answer to its heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Desired {
    /// The release that should be active (serving); `None`: nothing of the service.
    pub active: Option<ManifestId>,
    /// A release that should run beside it without traffic (blue-green), if any.
    pub standby: Option<ManifestId>,
    /// A release to stage (fetch, verify, unpack) ahead of activation, if any.
    pub stage: Option<ManifestId>,
}

/// A request to the analysis judge: compare `canary` with `baseline` from `window_start`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GateRequest {
    /// Name it in the verdict.
    pub gate: GateId,
    /// The region; canary and baseline are both in it.
    pub region: RegionIndex,
    /// The wave of the region being judged.
    pub wave: u16,
    /// Hosts of the region running the target, healthy: the newest first (this wave's, then
    /// the earlier waves', which show slow regressions first), at most [`Plan::gate_sample`].
    pub canary: Vec<HostId>,
    /// As many hosts of the region still on the previous release and healthy, those last in
    /// the region's order (fewer if the region has fewer left).
    pub baseline: Vec<HostId>,
    /// Start of the comparison window: when the wave settled.
    pub window_start: Duration,
    /// When the bake ends; a verdict is wanted by then.
    pub decide_by: Duration,
    /// How many times the judge may look for a pass: at `decide_by`, then once more every
    /// bake (`decide_by - window_start`) later while it cannot decide, `1 +`
    /// [`Bake::extensions`] looks in all. The rollout holds [`Timeouts::gate`] after the
    /// last.
    #[serde(default = "one_look")]
    pub looks: u16,
    /// Hosts of the deployment that run the target once the wave after a pass is formed:
    /// what the pass would expose. See the judge's guard gates.
    #[serde(default)]
    pub exposed_after_pass: u32,
    /// Hosts in the deployment.
    #[serde(default)]
    pub hosts: u32,
}

/// The serde default of a gate's looks (and of a judge's, restored from before looks).
pub(crate) fn one_look() -> u16 {
    1
}

/// Something the shell must do, from [`Rollout::poll_command`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Command {
    /// These hosts' desired state is now `desired`: tell them (or let their next heartbeat).
    SetDesired {
        /// The new desired state.
        desired: Desired,
        /// The hosts; never empty.
        hosts: Vec<HostId>,
    },
    /// Ask the analysis judge; answer with [`Rollout::handle_verdict`].
    EvaluateGate(GateRequest),
    /// Tell people (audit log, status, webhooks).
    Notify(Notice),
}

/// What a wave does to its hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WaveKind {
    /// Run the target (rolling, canary).
    Activate,
    /// Start the target beside the previous release (blue-green).
    Standby,
    /// Switch the whole region to the target (blue-green).
    Switch,
}

/// Why a host failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailReason {
    /// It reported that staging the target failed.
    StageFailed,
    /// It did not stage the target within [`Timeouts::stage`] of joining its wave.
    StageTimeout,
    /// It reported that activating (or starting) the target failed.
    ActivationFailed,
    /// It did not report the target active (or started) and healthy within
    /// [`Timeouts::activation`].
    ActivationTimeout,
    /// The target's health check failed on it.
    Unhealthy,
    /// It reported another release active after running the target.
    LeftTarget,
}

/// Why the rollout waits for a human.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HoldReason {
    /// The judge answered inconclusive.
    Inconclusive {
        /// The gate.
        gate: GateId,
    },
    /// The judge did not answer in time.
    GateTimeout {
        /// The gate.
        gate: GateId,
    },
    /// The wave requires approval.
    Approval,
}

/// Why the rollout is rolled back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RollbackReason {
    /// The judge found a regression.
    GateFailed {
        /// The gate.
        gate: GateId,
    },
    /// Too many hosts of a region failed.
    TooManyFailures {
        /// The region.
        region: RegionIndex,
        /// Its failed hosts.
        failed: u32,
        /// The most it may have.
        allowed: u32,
    },
    /// An operator asked for it.
    Operator,
}

/// A notification, for the audit log, status and webhooks.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Notice {
    /// A wave formed.
    WaveStarted {
        /// Its region.
        region: RegionIndex,
        /// Its number within the region, from 0.
        wave: u16,
        /// What it does.
        kind: WaveKind,
        /// Its cap: the most hosts of the region on the target once it is done.
        cap: u32,
        /// Hosts it added.
        added: u32,
    },
    /// A wave passed its gates (or was promoted).
    WavePassed {
        /// Its region.
        region: RegionIndex,
        /// Its number.
        wave: u16,
        /// By an operator's `Promote`, not by its gates.
        promoted: bool,
    },
    /// A region's last wave passed.
    RegionDone {
        /// The region.
        region: RegionIndex,
    },
    /// A host that was lost when its region's waves formed came back after the last of them
    /// and is taken into the rollout on its own (within the budget). It raises the region's
    /// cap by one.
    Straggler {
        /// The host.
        host: HostId,
        /// Its region.
        region: RegionIndex,
    },
    /// A host failed and is switched back to its previous release.
    HostFailed {
        /// The host.
        host: HostId,
        /// Its region.
        region: RegionIndex,
        /// Why.
        reason: FailReason,
    },
    /// The rollout waits for a human.
    Held {
        /// Why.
        reason: HoldReason,
    },
    /// Paused by an operator.
    Paused,
    /// Resumed by an operator.
    Resumed,
    /// Rolling back.
    RollingBack {
        /// Why.
        reason: RollbackReason,
    },
    /// The rollback is over.
    RolledBack {
        /// Touched hosts not confirmed back on their previous release (lost, or silent until
        /// [`Timeouts::rollback`]). Their desired state is the previous release.
        unconfirmed: u32,
    },
    /// Every region is done.
    Done {
        /// Hosts still on the previous release because they were lost when their region's
        /// waves formed; each is activated when it comes back.
        stragglers: u32,
    },
    /// Stopped by an operator without rolling back.
    Aborted,
}

// -------------------------------------------------------------------------------------------
// Status

/// Where the deployment stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Rolling out.
    Running,
    /// Every touched host is being switched back.
    RollingBack {
        /// Why.
        reason: RollbackReason,
    },
    /// Rolled back (final).
    RolledBack {
        /// Why.
        reason: RollbackReason,
    },
    /// Every region is done. Stragglers are still activated when they come back; a
    /// [`Operator::Rollback`] is still possible.
    Done,
    /// Stopped by an operator (final).
    Aborted,
}

/// Where the current wave stands (meaningful while [`Phase::Running`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WaveStage {
    /// The next wave has not formed: paused, or (rolling) no room in the budget.
    Waiting,
    /// Hosts are being activated; waits until all have settled.
    Activating,
    /// Settled; baking until then.
    Baking {
        /// End of the bake.
        until: Duration,
    },
    /// Baked; waiting for the judge.
    AwaitingVerdict {
        /// The open gate.
        gate: GateId,
        /// When the rollout holds instead.
        deadline: Duration,
    },
    /// Waiting for a human.
    Held {
        /// Why.
        reason: HoldReason,
    },
    /// Passed; the next wave forms unless paused.
    Passed,
}

/// A host's part in the rollout (see the module docs' model).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HostRole {
    /// Not in a wave.
    Untouched,
    /// In the current wave, waiting to be staged and for the budget.
    Queued,
    /// Told to start the target beside the previous release (blue-green).
    Starting,
    /// Its standby target is healthy (blue-green).
    Ready,
    /// Told to run the target.
    Activating,
    /// Runs the target, healthy.
    Updated,
    /// Failed; told to run its previous release.
    Failed,
}

/// Which release a host last reported active.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Running {
    /// Its previous release.
    Previous,
    /// The target.
    Target,
    /// Some other release.
    Other,
    /// Nothing.
    Nothing,
}

/// The last health a host reported for a release.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Health {
    /// Passed.
    Healthy,
    /// Failed.
    Unhealthy,
    /// Not reported since the release changed or the host came back.
    Unknown,
}

/// One host as the engine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostStatus {
    /// Its region.
    pub region: RegionIndex,
    /// Its role.
    pub role: HostRole,
    /// What it runs.
    pub running: Running,
    /// The health of what it runs.
    pub health: Health,
    /// Whether it is lost.
    pub lost: bool,
    /// Whether it reported the target staged.
    pub staged: bool,
}

/// Host counts of a region (or of the whole deployment).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Counts {
    /// Hosts in scope.
    pub hosts: u32,
    /// In the rollout so far (not untouched).
    pub assigned: u32,
    /// Running the target, healthy.
    pub updated: u32,
    /// Failed.
    pub failed: u32,
    /// Unavailable (see the budget invariant).
    pub unavailable: u32,
    /// Lost.
    pub lost: u32,
    /// Queued or activating: not settled.
    pub unsettled: u32,
}

impl Counts {
    fn add(&mut self, c: Class) {
        self.assigned += u32::from(c.assigned);
        self.updated += u32::from(c.updated);
        self.failed += u32::from(c.failed);
        self.unavailable += u32::from(c.unavailable);
        self.lost += u32::from(c.lost);
        self.unsettled += u32::from(c.unsettled);
    }

    fn sub(&mut self, c: Class) {
        self.assigned -= u32::from(c.assigned);
        self.updated -= u32::from(c.updated);
        self.failed -= u32::from(c.failed);
        self.unavailable -= u32::from(c.unavailable);
        self.lost -= u32::from(c.lost);
        self.unsettled -= u32::from(c.unsettled);
    }

    fn plus(mut self, other: Counts) -> Counts {
        self.hosts += other.hosts;
        self.assigned += other.assigned;
        self.updated += other.updated;
        self.failed += other.failed;
        self.unavailable += other.unavailable;
        self.lost += other.lost;
        self.unsettled += other.unsettled;
        self
    }
}

/// A summary of the deployment, for status pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Status {
    /// The phase.
    pub phase: Phase,
    /// Paused by an operator.
    pub paused: bool,
    /// The current region.
    pub region: RegionIndex,
    /// Waves formed in the current region so far.
    pub waves: u16,
    /// The current wave's stage.
    pub stage: WaveStage,
    /// Counts over every region.
    pub totals: Counts,
}

// -------------------------------------------------------------------------------------------
// Errors

/// An event that does not fit the engine's state; nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The host is not in scope.
    #[error("{host} is not in this deployment")]
    UnknownHost {
        /// The host.
        host: HostId,
    },
    /// No such gate is open (answered already, superseded, or never asked).
    #[error("gate {gate:?} is not open")]
    StaleVerdict {
        /// The gate named.
        gate: GateId,
    },
    /// The operator command does not apply now (resume when not paused or held, promote
    /// before the wave settled, anything after the end).
    #[error("{command:?} does not apply in phase {phase:?}, wave stage {stage:?}")]
    NotApplicable {
        /// The command.
        command: Operator,
        /// The phase.
        phase: Phase,
        /// The current wave's stage.
        stage: WaveStage,
    },
}

/// A [`Snapshot`] that cannot be restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// Written by another version of the engine.
    #[error("snapshot format {found}, this engine reads {expected}")]
    Version {
        /// [`SNAPSHOT_VERSION`].
        expected: u32,
        /// The snapshot's.
        found: u32,
    },
    /// Internally inconsistent (corrupt, or edited).
    #[error("snapshot is inconsistent: {what}")]
    Corrupt {
        /// What does not fit.
        what: &'static str,
    },
}

// -------------------------------------------------------------------------------------------
// State

/// The whole state of a [`Rollout`], serializable (serde). Persist it, and restore it with
/// [`Rollout::restore`]. It includes the commands not yet polled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    version: u32,
    state: State,
}

impl Snapshot {
    /// The format version it was written in.
    pub fn version(&self) -> u32 {
        self.version
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct State {
    service: String,
    target: ManifestId,
    strategy: Strategy,
    budget: Budget,
    health: HealthGate,
    bake: Bake,
    timeouts: Timeouts,
    stage_ahead: StageAhead,
    gate_sample: u32,
    seed: u64,
    /// Distinct previous releases; hosts refer to them by index.
    previous: Vec<ManifestId>,
    regions: Vec<Region>,
    /// Region after region, each in its shuffled order.
    hosts: Vec<Host>,
    /// The first region with hosts (the one with the long bake).
    first_region: u16,
    now: Duration,
    phase: Phase,
    paused: bool,
    wave: Wave,
    /// Hosts before this index (global order) have been considered for stage-ahead.
    stage_cursor: u32,
    activation_deadlines: VecDeque<Deadline>,
    stage_deadlines: VecDeque<Deadline>,
    next_gate: u32,
    rollback_pending: u32,
    rollback_deadline: Option<Duration>,
    commands: VecDeque<Command>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Host {
    id: HostId,
    region: u16,
    /// Index into `State::previous`, or `NO_RELEASE`.
    previous: u16,
    role: HostRole,
    running: Running,
    health: Health,
    /// Health of the target running as standby (blue-green), once started.
    standby: Health,
    standby_up: bool,
    lost: bool,
    staged: bool,
    told_stage: bool,
    /// Ever told to run or start the target: rolled back.
    touched: bool,
    /// Bumped at each timed role change, so that a stale deadline is recognised.
    epoch: u8,
    /// Its desired state changed during the current call (a `SetDesired` is pending).
    #[serde(skip)]
    dirty: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Region {
    name: String,
    start: u32,
    end: u32,
    /// Next host (global index) not yet considered for a wave.
    cursor: u32,
    /// Hosts passed over because they were lost, in the order they came back (entries may be
    /// stale: lost again, or assigned since; checked when taken).
    returned: VecDeque<u32>,
    /// Untouched hosts behind the cursor that are not lost: passed-over hosts that came back.
    live_deferred: u32,
    /// Queued hosts that are staged, in order.
    ready: VecDeque<u32>,
    max_unavailable: u32,
    min_healthy: u32,
    counts: Counts,
    waves: u16,
    next_step: u16,
    final_formed: bool,
    switched: bool,
}

impl Region {
    fn size(&self) -> u32 {
        self.end - self.start
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Wave {
    region: u16,
    number: u16,
    kind: WaveKind,
    stage: WaveStage,
    gates: Gates,
    gate: Option<OpenGate>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct OpenGate {
    id: GateId,
    passed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct Deadline {
    at: Duration,
    host: u32,
    epoch: u8,
}

/// What a host counts as, for the per-region counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Class {
    assigned: bool,
    updated: bool,
    failed: bool,
    unavailable: bool,
    lost: bool,
    unsettled: bool,
    rollback_pending: bool,
}

/// What one host event did, beyond the host's own fields.
#[derive(Clone, Copy, Debug, Default)]
struct Effect {
    returned: bool,
    went_lost: bool,
    newly_staged: bool,
    unassigned: bool,
    failed: Option<FailReason>,
}

/// One deployment's rollout engine. See the [module docs](self).
#[derive(Debug)]
pub struct Rollout {
    s: State,
    /// Host ids, sorted, with their index in `s.hosts`.
    index: Vec<(HostId, u32)>,
    /// Hosts whose desired state changed during the current call.
    pending: Vec<u32>,
}

impl Rollout {
    /// Starts the rollout of `plan` at `now`. The first commands (staging, the first wave) are
    /// ready to poll.
    pub fn new(now: Duration, plan: Plan) -> Result<Self, PlanError> {
        plan.validate()?;
        let Plan {
            service,
            target,
            regions: names,
            mut hosts,
            strategy,
            budget,
            health,
            bake,
            timeouts,
            stage_ahead,
            gate_sample,
            seed,
        } = plan;
        hosts.sort_unstable_by_key(|h| h.id);
        if let Some(w) = hosts.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(PlanError::DuplicateHost { host: w[0].id });
        }
        let mut previous: BTreeMap<ManifestId, u16> = BTreeMap::new();
        let mut by_region: Vec<Vec<(HostId, u16)>> = vec![Vec::new(); names.len()];
        for h in &hosts {
            let Some(list) = by_region.get_mut(usize::from(h.region.0)) else {
                return Err(PlanError::UnknownRegion { host: h.id, region: h.region });
            };
            let prev = match h.previous {
                None => NO_RELEASE,
                Some(m) => {
                    let next = previous.len();
                    if next >= usize::from(NO_RELEASE) {
                        return Err(PlanError::TooManyPreviousReleases { count: next + 1 });
                    }
                    *previous.entry(m).or_insert(next as u16)
                }
            };
            list.push((h.id, prev));
        }
        let mut interned = vec![ManifestId([0; 32]); previous.len()];
        for (m, i) in previous {
            interned[usize::from(i)] = m;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut all = Vec::with_capacity(hosts.len());
        let mut regions = Vec::with_capacity(names.len());
        let disruptive = strategy.is_disruptive();
        for (r, (name, mut list)) in names.into_iter().zip(by_region).enumerate() {
            list.shuffle(&mut rng);
            let start = all.len() as u32;
            for (id, prev) in list {
                let running = if prev == NO_RELEASE {
                    Running::Nothing
                } else if interned[usize::from(prev)] == target {
                    Running::Target
                } else {
                    Running::Previous
                };
                // Hosts that run nothing serve nothing: unavailable from the start.
                let health =
                    if running == Running::Nothing { Health::Unknown } else { Health::Healthy };
                all.push(Host {
                    id,
                    region: r as u16,
                    previous: prev,
                    role: HostRole::Untouched,
                    running,
                    health,
                    standby: Health::Unknown,
                    standby_up: false,
                    lost: false,
                    staged: false,
                    told_stage: false,
                    touched: false,
                    epoch: 0,
                    dirty: false,
                });
            }
            let end = all.len() as u32;
            let size = end - start;
            let max_unavailable = budget.max_unavailable.floor_of(size).max(1);
            let min_healthy = budget.min_healthy.ceil_of(size);
            if disruptive && size > 0 && min_healthy >= size {
                return Err(PlanError::MinHealthyTooHigh {
                    region: RegionIndex(r as u16),
                    hosts: size,
                    min_healthy,
                });
            }
            regions.push(Region {
                name,
                start,
                end,
                cursor: start,
                returned: VecDeque::new(),
                live_deferred: 0,
                ready: VecDeque::new(),
                max_unavailable,
                min_healthy,
                counts: Counts { hosts: size, ..Counts::default() },
                waves: 0,
                next_step: 0,
                final_formed: false,
                switched: false,
            });
        }
        let first_region = regions.iter().position(|r| r.size() > 0).unwrap_or(0) as u16;
        let index = Self::build_index(&all);
        let s = State {
            service,
            target,
            strategy,
            budget,
            health,
            bake,
            timeouts,
            stage_ahead,
            gate_sample,
            seed,
            previous: interned,
            regions,
            hosts: all,
            first_region,
            now,
            phase: Phase::Running,
            paused: false,
            wave: Wave::new(first_region),
            stage_cursor: 0,
            activation_deadlines: VecDeque::new(),
            stage_deadlines: VecDeque::new(),
            next_gate: 0,
            rollback_pending: 0,
            rollback_deadline: None,
            commands: VecDeque::new(),
        };
        let mut rollout = Self { s, index, pending: Vec::new() };
        rollout.recount_all();
        if rollout.s.stage_ahead == StageAhead::All {
            let n = rollout.s.hosts.len() as u32;
            for i in 0..n {
                rollout.update(i, |h| h.told_stage = true);
            }
            rollout.s.stage_cursor = n;
        }
        rollout.drive();
        rollout.flush();
        Ok(rollout)
    }

    /// Restores an engine from [`snapshot`](Self::snapshot), exactly as it was.
    pub fn restore(snapshot: Snapshot) -> Result<Self, RestoreError> {
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(RestoreError::Version {
                expected: SNAPSHOT_VERSION,
                found: snapshot.version,
            });
        }
        let s = snapshot.state;
        let corrupt = |what| Err(RestoreError::Corrupt { what });
        let n = s.hosts.len() as u32;
        if n == 0 || s.regions.is_empty() {
            return corrupt("no hosts or no regions");
        }
        let mut next = 0;
        for (r, region) in s.regions.iter().enumerate() {
            if region.start != next || region.end < region.start || region.end > n {
                return corrupt("region ranges");
            }
            if region.cursor < region.start || region.cursor > region.end {
                return corrupt("region cursor");
            }
            let in_range = |&i: &u32| i < n;
            if !region.returned.iter().all(in_range) || !region.ready.iter().all(in_range) {
                return corrupt("region queues");
            }
            let hosts = &s.hosts[region.start as usize..region.end as usize];
            if hosts.iter().any(|h| usize::from(h.region) != r) {
                return corrupt("host regions");
            }
            next = region.end;
        }
        if next != n {
            return corrupt("region ranges");
        }
        let previous_ok =
            |h: &Host| h.previous == NO_RELEASE || usize::from(h.previous) < s.previous.len();
        if !s.hosts.iter().all(previous_ok) {
            return corrupt("previous releases");
        }
        let deadlines_ok =
            s.activation_deadlines.iter().chain(&s.stage_deadlines).all(|d| d.host < n);
        if !deadlines_ok || s.stage_cursor > n {
            return corrupt("deadlines");
        }
        if usize::from(s.wave.region) >= s.regions.len()
            || usize::from(s.first_region) >= s.regions.len()
        {
            return corrupt("current region");
        }
        let index = Self::build_index(&s.hosts);
        if index.windows(2).any(|w| w[0].0 == w[1].0) {
            return corrupt("duplicate hosts");
        }
        let mut rollout = Self { s, index, pending: Vec::new() };
        let stored: Vec<(Counts, u32)> =
            rollout.s.regions.iter().map(|r| (r.counts, r.live_deferred)).collect();
        let stored_pending = rollout.s.rollback_pending;
        rollout.recount_all();
        let recounted = rollout.s.regions.iter().map(|r| (r.counts, r.live_deferred));
        if !recounted.eq(stored) || rollout.s.rollback_pending != stored_pending {
            return corrupt("counters");
        }
        Ok(rollout)
    }

    /// The whole state, to persist. O(hosts).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot { version: SNAPSHOT_VERSION, state: self.s.clone() }
    }

    // ---------------------------------------------------------------------------------------
    // Queries

    /// The next command for the shell, in the order they were decided.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.s.commands.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next due, if anything waits on time.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let s = &self.s;
        match s.phase {
            Phase::Running | Phase::Done => {
                let mut next: Option<Duration> = None;
                let mut consider = |t: Duration| next = Some(next.map_or(t, |n| n.min(t)));
                if let Some(d) = s.activation_deadlines.front() {
                    consider(d.at);
                }
                if let Some(d) = s.stage_deadlines.front() {
                    consider(d.at);
                }
                if s.phase == Phase::Running {
                    match s.wave.stage {
                        WaveStage::Baking { until } => consider(until),
                        WaveStage::AwaitingVerdict { deadline, .. } => consider(deadline),
                        _ => {}
                    }
                }
                next
            }
            Phase::RollingBack { .. } => s.rollback_deadline,
            Phase::RolledBack { .. } | Phase::Aborted => None,
        }
    }

    /// The deployment's phase.
    pub fn phase(&self) -> Phase {
        self.s.phase
    }

    /// Whether the engine has nothing more to do but answer heartbeats: rolled back or aborted.
    /// (A done deployment still activates stragglers and can be rolled back.)
    pub fn is_finished(&self) -> bool {
        matches!(self.s.phase, Phase::RolledBack { .. } | Phase::Aborted)
    }

    /// A summary. O(regions).
    pub fn status(&self) -> Status {
        let s = &self.s;
        let totals = s.regions.iter().fold(Counts::default(), |acc, r| acc.plus(r.counts));
        Status {
            phase: s.phase,
            paused: s.paused,
            region: RegionIndex(s.wave.region),
            waves: s.regions[usize::from(s.wave.region)].waves,
            stage: s.wave.stage,
            totals,
        }
    }

    /// Host counts of a region.
    pub fn region_counts(&self, region: RegionIndex) -> Option<Counts> {
        self.s.regions.get(usize::from(region.0)).map(|r| r.counts)
    }

    /// Region names, in rollout order.
    pub fn regions(&self) -> impl Iterator<Item = &str> + '_ {
        self.s.regions.iter().map(|r| r.name.as_str())
    }

    /// The service.
    pub fn service(&self) -> &str {
        &self.s.service
    }

    /// The target release.
    pub fn target(&self) -> ManifestId {
        self.s.target
    }

    /// What `host` should run: the answer to its heartbeat.
    pub fn desired(&self, host: HostId) -> Result<Desired, EventError> {
        let i = self.lookup(host)?;
        Ok(self.desired_of(&self.s.hosts[i as usize], self.rolled_back()))
    }

    /// How the engine sees `host`.
    pub fn host(&self, host: HostId) -> Result<HostStatus, EventError> {
        let h = &self.s.hosts[self.lookup(host)? as usize];
        Ok(HostStatus {
            region: RegionIndex(h.region),
            role: h.role,
            running: h.running,
            health: h.health,
            lost: h.lost,
            staged: h.staged,
        })
    }

    /// Hosts that were told to run or start the target (and so are rolled back), in no
    /// particular order. O(hosts).
    pub fn touched(&self) -> impl Iterator<Item = HostId> + '_ {
        self.s.hosts.iter().filter(|h| h.touched).map(|h| h.id)
    }

    // ---------------------------------------------------------------------------------------
    // Events

    /// A host reports something about itself.
    pub fn handle_host(
        &mut self,
        now: Duration,
        host: HostId,
        event: HostEvent,
    ) -> Result<(), EventError> {
        let i = self.lookup(host)?;
        self.advance(now);
        let target = self.s.target;
        let previous = self.previous_of(i);
        let transitions = matches!(self.s.phase, Phase::Running | Phase::Done);
        let mut effect = Effect::default();
        self.update(i, |h| {
            let was_lost = h.lost;
            h.lost = event == HostEvent::Lost;
            effect.returned = was_lost && !h.lost;
            effect.went_lost = !was_lost && h.lost;
            let running_of = |m: ManifestId| {
                if m == target {
                    Running::Target
                } else if Some(m) == previous {
                    Running::Previous
                } else {
                    Running::Other
                }
            };
            let mut activation_failed = false;
            let mut stage_failed = false;
            match event {
                HostEvent::Lost => {
                    // Whatever it reported before is no longer known.
                    h.health = Health::Unknown;
                    h.standby = Health::Unknown;
                }
                HostEvent::Staged { manifest } => {
                    if manifest == target && !h.staged {
                        h.staged = true;
                        effect.newly_staged = true;
                    }
                }
                HostEvent::StageFailed { manifest } => {
                    if manifest == target {
                        h.staged = false;
                        stage_failed = true;
                    }
                }
                HostEvent::Started { manifest } => {
                    if manifest == target && !h.standby_up {
                        h.standby_up = true;
                        h.standby = Health::Unknown;
                    }
                }
                HostEvent::Active { manifest } => {
                    let running = running_of(manifest);
                    if running != h.running {
                        h.running = running;
                        h.health = Health::Unknown;
                    }
                }
                HostEvent::Inactive => {
                    if h.running != Running::Nothing {
                        h.running = Running::Nothing;
                        h.health = Health::Unknown;
                    }
                }
                HostEvent::ActivationFailed { manifest } => {
                    activation_failed = manifest == target;
                }
                HostEvent::Health { manifest, healthy } => {
                    let health = if healthy { Health::Healthy } else { Health::Unhealthy };
                    if h.running != Running::Nothing && running_of(manifest) == h.running {
                        h.health = health;
                    } else if manifest == target && h.standby_up {
                        h.standby = health;
                    }
                }
            }
            if !transitions {
                return;
            }
            if h.role == HostRole::Queued && h.lost {
                h.role = HostRole::Untouched;
                effect.unassigned = true;
                return;
            }
            effect.failed = transition(h, activation_failed, stage_failed);
        });
        let r = usize::from(self.s.hosts[i as usize].region);
        let role = self.s.hosts[i as usize].role;
        // A host passed over (or taken out of its wave) while lost: behind the cursor, untouched.
        let passed_over = role == HostRole::Untouched && i < self.s.regions[r].cursor;
        if passed_over && effect.returned {
            self.s.regions[r].live_deferred += 1;
        } else if passed_over && effect.went_lost && !effect.unassigned {
            self.s.regions[r].live_deferred -= 1;
        }
        if effect.newly_staged && role == HostRole::Queued {
            self.s.regions[r].ready.push_back(i);
        }
        if let Some(reason) = effect.failed {
            self.failed(i, reason);
        }
        if passed_over && effect.returned && transitions {
            if self.s.regions[r].final_formed {
                // No later wave will take it: activate it on its own.
                self.s.regions[r].live_deferred -= 1;
                self.notify(Notice::Straggler { host, region: RegionIndex(r as u16) });
                self.assign(i);
            } else {
                self.s.regions[r].returned.push_back(i);
            }
        }
        self.after_change(r);
        self.flush();
        Ok(())
    }

    /// The judge's verdict on gate `gate`.
    pub fn handle_verdict(
        &mut self,
        now: Duration,
        gate: GateId,
        verdict: Verdict,
    ) -> Result<(), EventError> {
        let open = self.s.phase == Phase::Running
            && matches!(
                self.s.wave.stage,
                WaveStage::Baking { .. } | WaveStage::AwaitingVerdict { .. }
            )
            && self.s.wave.gate.is_some_and(|g| g.id == gate && !g.passed);
        if !open {
            return Err(EventError::StaleVerdict { gate });
        }
        self.advance(now);
        match verdict {
            Verdict::Fail => self.start_rollback(RollbackReason::GateFailed { gate }),
            Verdict::Inconclusive => {
                self.s.wave.gate = None;
                self.hold(HoldReason::Inconclusive { gate });
            }
            Verdict::Pass => {
                if let Some(g) = &mut self.s.wave.gate {
                    g.passed = true;
                }
                if matches!(self.s.wave.stage, WaveStage::AwaitingVerdict { .. }) {
                    self.gates_passed();
                }
            }
        }
        self.drive();
        self.flush();
        Ok(())
    }

    /// An operator command. See the module docs for what each does when.
    pub fn handle_operator(&mut self, now: Duration, command: Operator) -> Result<(), EventError> {
        let not_applicable =
            EventError::NotApplicable { command, phase: self.s.phase, stage: self.s.wave.stage };
        let running = self.s.phase == Phase::Running;
        // A done deployment still activates stragglers: pausing applies to them too.
        let active = matches!(self.s.phase, Phase::Running | Phase::Done);
        match command {
            Operator::Pause => {
                if !active || self.s.paused {
                    return Err(not_applicable);
                }
                self.advance(now);
                self.s.paused = true;
                self.notify(Notice::Paused);
            }
            Operator::Resume => {
                if !active {
                    return Err(not_applicable);
                }
                if self.s.paused {
                    self.advance(now);
                    self.s.paused = false;
                    self.notify(Notice::Resumed);
                    let regions: Vec<usize> = (0..self.s.regions.len())
                        .filter(|&r| !self.s.regions[r].ready.is_empty())
                        .collect();
                    for r in regions {
                        self.activate_ready(r);
                    }
                } else if let (
                    true,
                    WaveStage::Held {
                        reason: HoldReason::Inconclusive { .. } | HoldReason::GateTimeout { .. },
                    },
                ) = (running, self.s.wave.stage)
                {
                    self.advance(now);
                    self.notify(Notice::Resumed);
                    self.bake_and_judge();
                } else {
                    return Err(not_applicable);
                }
            }
            Operator::Promote => {
                let settled = matches!(
                    self.s.wave.stage,
                    WaveStage::Baking { .. }
                        | WaveStage::AwaitingVerdict { .. }
                        | WaveStage::Held { .. }
                );
                if !running || !settled {
                    return Err(not_applicable);
                }
                self.advance(now);
                self.s.wave.gate = None;
                self.s.wave.stage = WaveStage::Passed;
                self.pass_wave(true);
            }
            Operator::Rollback => {
                if !active {
                    return Err(not_applicable);
                }
                self.advance(now);
                self.start_rollback(RollbackReason::Operator);
            }
            Operator::Abort => {
                if !matches!(self.s.phase, Phase::Running | Phase::RollingBack { .. }) {
                    return Err(not_applicable);
                }
                self.advance(now);
                self.s.phase = Phase::Aborted;
                self.s.wave.gate = None;
                self.s.activation_deadlines.clear();
                self.s.stage_deadlines.clear();
                self.s.rollback_deadline = None;
                self.recount_all();
                self.notify(Notice::Aborted);
            }
        }
        self.drive();
        self.flush();
        Ok(())
    }

    /// Time has reached `now` (at least [`poll_timeout`](Self::poll_timeout)).
    pub fn handle_timeout(&mut self, now: Duration) {
        let now = self.advance(now);
        match self.s.phase {
            Phase::Running | Phase::Done => {
                while let Some(d) = self.s.activation_deadlines.front().copied() {
                    if d.at > now {
                        break;
                    }
                    self.s.activation_deadlines.pop_front();
                    let h = &self.s.hosts[d.host as usize];
                    let waiting = matches!(h.role, HostRole::Starting | HostRole::Activating);
                    if waiting && h.epoch == d.epoch {
                        self.update(d.host, |h| h.role = HostRole::Failed);
                        self.failed(d.host, FailReason::ActivationTimeout);
                        let r = usize::from(self.s.hosts[d.host as usize].region);
                        self.after_change(r);
                    }
                }
                while let Some(d) = self.s.stage_deadlines.front().copied() {
                    if d.at > now {
                        break;
                    }
                    self.s.stage_deadlines.pop_front();
                    let h = &self.s.hosts[d.host as usize];
                    if h.role == HostRole::Queued && !h.staged && h.epoch == d.epoch {
                        self.update(d.host, |h| h.role = HostRole::Failed);
                        self.failed(d.host, FailReason::StageTimeout);
                        let r = usize::from(self.s.hosts[d.host as usize].region);
                        self.after_change(r);
                    }
                }
                self.drive();
            }
            Phase::RollingBack { .. } => {
                if self.s.rollback_deadline.is_some_and(|d| d <= now) {
                    self.finish_rollback();
                }
            }
            Phase::RolledBack { .. } | Phase::Aborted => {}
        }
        self.flush();
    }

    // ---------------------------------------------------------------------------------------
    // Progress

    /// Moves the current wave along as far as it can go now.
    fn drive(&mut self) {
        while self.s.phase == Phase::Running {
            let progressed = match self.s.wave.stage {
                WaveStage::Waiting => !self.s.paused && self.form_wave(),
                WaveStage::Activating => {
                    let region = &self.s.regions[usize::from(self.s.wave.region)];
                    // A blue-green switch is an activation: not while paused.
                    let settled = region.counts.unsettled == 0
                        && !(self.s.paused && self.s.wave.kind == WaveKind::Standby);
                    if settled {
                        self.on_settled();
                    }
                    settled
                }
                WaveStage::Baking { until } => {
                    let over = self.s.now >= until;
                    if over {
                        self.after_bake();
                    }
                    over
                }
                WaveStage::AwaitingVerdict { gate, deadline } => {
                    let over = self.s.now >= deadline;
                    if over {
                        self.s.wave.gate = None;
                        self.hold(HoldReason::GateTimeout { gate });
                    }
                    over
                }
                WaveStage::Held { .. } => false,
                WaveStage::Passed => {
                    if !self.s.paused {
                        self.pass_wave(false);
                    }
                    !self.s.paused
                }
            };
            if !progressed {
                return;
            }
        }
    }

    /// Forms the next wave of the current region (or finishes the region). Returns whether
    /// anything changed.
    fn form_wave(&mut self) -> bool {
        let r = usize::from(self.s.wave.region);
        let size = self.s.regions[r].size();
        let (cap, gates, kind, added) = match &self.s.strategy {
            Strategy::Canary { steps } => {
                let steps = steps.clone();
                loop {
                    let k = usize::from(self.s.regions[r].next_step);
                    let Some(step) = steps.get(k) else {
                        self.s.regions[r].final_formed = true;
                        self.complete_region();
                        return true;
                    };
                    self.s.regions[r].next_step += 1;
                    let last = k + 1 == steps.len();
                    if last {
                        self.s.regions[r].final_formed = true;
                    }
                    let cap = step.size.ceil_of(size).max(1).min(size);
                    if cap <= self.s.regions[r].counts.assigned {
                        continue;
                    }
                    let added = self.assign_up_to(r, cap);
                    if added > 0 {
                        break (cap, step.gates, WaveKind::Activate, added);
                    }
                }
            }
            Strategy::Rolling { gates } => {
                let gates = *gates;
                self.skip_lost(r);
                let region = &self.s.regions[r];
                if region.cursor == region.end && region.live_deferred == 0 {
                    self.s.regions[r].final_formed = true;
                    self.complete_region();
                    return true;
                }
                // Hosts already unavailable (running nothing yet, or unhealthy) cost nothing to
                // activate: the next ones in order are taken even when the budget is used up
                // (a first install), at most `max_unavailable` of them per batch.
                let slots = self.free_slots(r).max(self.unavailable_ahead(r));
                if slots == 0 {
                    return false;
                }
                let cap = self.s.regions[r].counts.assigned + slots;
                let added = self.assign_up_to(r, cap);
                if added == 0 {
                    return false;
                }
                self.skip_lost(r);
                let region = &self.s.regions[r];
                if region.cursor == region.end && region.live_deferred == 0 {
                    self.s.regions[r].final_formed = true;
                }
                (cap, gates, WaveKind::Activate, added)
            }
            Strategy::BlueGreen { gates } => {
                let gates = *gates;
                let added = self.assign_up_to(r, size);
                self.s.regions[r].final_formed = true;
                if added == 0 {
                    self.complete_region();
                    return true;
                }
                (size, gates, WaveKind::Standby, added)
            }
        };
        let region = &mut self.s.regions[r];
        let number = region.waves;
        region.waves += 1;
        self.s.wave = Wave { number, kind, gates, ..Wave::new(r as u16) };
        self.s.wave.stage = WaveStage::Activating;
        // The wave's own hosts and the next waves' are told to stage in the same commands.
        self.stage_lookahead();
        self.notify(Notice::WaveStarted {
            region: RegionIndex(r as u16),
            wave: number,
            kind,
            cap,
            added,
        });
        self.activate_ready(r);
        true
    }

    /// Takes untouched live hosts of region `r` into the current wave until `cap` hosts of the
    /// region are assigned: first those passed over while lost that came back, then the next
    /// in order (passing over lost ones: they join a later wave when they come back).
    fn assign_up_to(&mut self, r: usize, cap: u32) -> u32 {
        let mut added = 0;
        while self.s.regions[r].counts.assigned < cap {
            let Some(i) = self.s.regions[r].returned.pop_front() else { break };
            let h = &self.s.hosts[i as usize];
            if h.role != HostRole::Untouched || h.lost {
                continue;
            }
            self.s.regions[r].live_deferred -= 1;
            self.assign(i);
            added += 1;
        }
        while self.s.regions[r].counts.assigned < cap
            && self.s.regions[r].cursor < self.s.regions[r].end
        {
            let i = self.s.regions[r].cursor;
            self.s.regions[r].cursor += 1;
            let h = &self.s.hosts[i as usize];
            if h.role != HostRole::Untouched || h.lost {
                continue;
            }
            self.assign(i);
            added += 1;
        }
        added
    }

    /// Untouched hosts of region `r` next in order (from its cursor) that are unavailable
    /// already, and not lost: at most the region's `max_unavailable`.
    fn unavailable_ahead(&self, r: usize) -> u32 {
        let region = &self.s.regions[r];
        let mut n = 0;
        let mut i = region.cursor;
        while i < region.end && n < region.max_unavailable {
            let h = &self.s.hosts[i as usize];
            if h.role != HostRole::Untouched || h.lost || !self.class(i).unavailable {
                break;
            }
            n += 1;
            i += 1;
        }
        n
    }

    /// Moves the cursor of region `r` past lost hosts.
    fn skip_lost(&mut self, r: usize) {
        loop {
            let region = &self.s.regions[r];
            if region.cursor == region.end {
                return;
            }
            let i = region.cursor;
            let h = &self.s.hosts[i as usize];
            if !(h.lost && h.role == HostRole::Untouched) {
                return;
            }
            self.s.regions[r].cursor += 1;
        }
    }

    /// Puts host `i` in its region's current wave.
    fn assign(&mut self, i: u32) {
        self.update(i, |h| {
            h.role = HostRole::Queued;
            h.epoch = h.epoch.wrapping_add(1);
            h.told_stage = true;
        });
        let h = &self.s.hosts[i as usize];
        let r = usize::from(h.region);
        if h.staged {
            self.s.regions[r].ready.push_back(i);
        } else {
            let at = self.s.now + self.s.timeouts.stage;
            self.s.stage_deadlines.push_back(Deadline { at, host: i, epoch: h.epoch });
        }
    }

    /// How many more hosts of region `r` may become unavailable now.
    fn free_slots(&self, r: usize) -> u32 {
        let region = &self.s.regions[r];
        let unavailable = region.counts.unavailable;
        let available = region.size() - unavailable;
        let by_max = region.max_unavailable.saturating_sub(unavailable);
        let by_min = available.saturating_sub(region.min_healthy);
        by_max.min(by_min)
    }

    /// Activates ready hosts of region `r` while the budget allows.
    fn activate_ready(&mut self, r: usize) {
        if !matches!(self.s.phase, Phase::Running | Phase::Done) || self.s.paused {
            return;
        }
        let disruptive = self.s.strategy.is_disruptive();
        while let Some(&i) = self.s.regions[r].ready.front() {
            let h = &self.s.hosts[i as usize];
            if h.role != HostRole::Queued || !h.staged {
                self.s.regions[r].ready.pop_front();
                continue;
            }
            if disruptive && !self.class(i).unavailable && self.free_slots(r) == 0 {
                break;
            }
            self.s.regions[r].ready.pop_front();
            let role = if !disruptive && !self.s.regions[r].switched {
                HostRole::Starting
            } else {
                HostRole::Activating
            };
            let mut failed = None;
            self.update(i, |h| {
                h.role = role;
                h.touched = true;
                h.epoch = h.epoch.wrapping_add(1);
                // It may run the target already (a host whose previous release is the target).
                failed = transition(h, false, false);
            });
            let h = &self.s.hosts[i as usize];
            if matches!(h.role, HostRole::Starting | HostRole::Activating) {
                let at = self.s.now + self.s.timeouts.activation;
                self.s.activation_deadlines.push_back(Deadline { at, host: i, epoch: h.epoch });
            }
            if let Some(reason) = failed {
                self.failed(i, reason);
                if !matches!(self.s.phase, Phase::Running | Phase::Done) {
                    return;
                }
            }
        }
    }

    /// The current wave has settled.
    fn on_settled(&mut self) {
        let r = usize::from(self.s.wave.region);
        if self.s.wave.kind == WaveKind::Standby {
            // Switch the whole region at once.
            self.s.regions[r].switched = true;
            let (start, end) = (self.s.regions[r].start, self.s.regions[r].end);
            let mut switched = 0;
            for i in start..end {
                if self.s.hosts[i as usize].role != HostRole::Ready {
                    continue;
                }
                self.update(i, |h| {
                    h.role = HostRole::Activating;
                    h.epoch = h.epoch.wrapping_add(1);
                });
                let at = self.s.now + self.s.timeouts.activation;
                let epoch = self.s.hosts[i as usize].epoch;
                self.s.activation_deadlines.push_back(Deadline { at, host: i, epoch });
                switched += 1;
            }
            let region = &mut self.s.regions[r];
            let number = region.waves;
            region.waves += 1;
            self.s.wave.number = number;
            self.s.wave.kind = WaveKind::Switch;
            self.notify(Notice::WaveStarted {
                region: RegionIndex(r as u16),
                wave: number,
                kind: WaveKind::Switch,
                cap: self.s.regions[r].size(),
                added: switched,
            });
            return;
        }
        self.bake_and_judge();
    }

    /// Starts the current wave's bake, and opens its analysis gate if it has one.
    fn bake_and_judge(&mut self) {
        let r = usize::from(self.s.wave.region);
        let until = self.s.now + self.bake_of(r);
        self.s.wave.stage = WaveStage::Baking { until };
        self.s.wave.gate = None;
        if self.s.wave.gates.analysis {
            self.request_gate(r, until);
        }
    }

    /// The bake of each wave of region `r`.
    fn bake_of(&self, r: usize) -> Duration {
        if r == usize::from(self.s.first_region) {
            self.s.bake.first_region
        } else {
            self.s.bake.other_regions
        }
    }

    /// Hosts of the deployment that run the target once the wave after the current one (of
    /// region `r`) is formed: the current ones, and as many as the next wave takes (the next
    /// step or batch of the region, or the first of the next region).
    fn exposed_after_pass(&self, r: usize) -> u32 {
        let assigned: u32 = self.s.regions.iter().map(|g| g.counts.assigned).sum();
        let region = &self.s.regions[r];
        let next_region = self.s.regions[r + 1..].iter().find(|g| g.size() > 0);
        let added = match &self.s.strategy {
            Strategy::Canary { steps } => {
                let cap = |step: &CanaryStep, g: &Region| {
                    step.size.ceil_of(g.size()).max(1).min(g.size())
                };
                let from = usize::from(region.next_step).min(steps.len());
                steps[from..]
                    .iter()
                    .map(|st| cap(st, region))
                    .find(|&c| c > region.counts.assigned)
                    .map(|c| c - region.counts.assigned)
                    .or_else(|| next_region.and_then(|g| steps.first().map(|st| cap(st, g))))
            }
            Strategy::Rolling { .. } if region.cursor < region.end => {
                Some(region.max_unavailable.min(region.end - region.cursor))
            }
            Strategy::Rolling { .. } => next_region.map(|g| g.max_unavailable.min(g.size())),
            Strategy::BlueGreen { .. } => next_region.map(Region::size),
        };
        assigned + added.unwrap_or(0)
    }

    fn request_gate(&mut self, r: usize, decide_by: Duration) {
        let region = &self.s.regions[r];
        let sample = self.s.gate_sample as usize;
        // Assigned hosts are all behind the cursor, the newest wave right behind it; untouched
        // ones in front of it, the last to be touched at the end. Both scans stop at `sample`.
        let (behind, ahead) = self.s.hosts[region.start as usize..region.end as usize]
            .split_at((region.cursor - region.start) as usize);
        let canary: Vec<HostId> = behind
            .iter()
            .rev()
            .filter(|h| h.role == HostRole::Updated)
            .take(sample)
            .map(|h| h.id)
            .collect();
        let baseline: Vec<HostId> = ahead
            .iter()
            .rev()
            .filter(|h| {
                h.role == HostRole::Untouched
                    && !h.lost
                    && h.running == Running::Previous
                    && h.health == Health::Healthy
            })
            .take(canary.len())
            .map(|h| h.id)
            .collect();
        if canary.is_empty() || baseline.is_empty() {
            return;
        }
        let gate = GateId(self.s.next_gate);
        self.s.next_gate += 1;
        self.s.wave.gate = Some(OpenGate { id: gate, passed: false });
        self.push(Command::EvaluateGate(GateRequest {
            gate,
            region: RegionIndex(r as u16),
            wave: self.s.wave.number,
            canary,
            baseline,
            window_start: self.s.now,
            decide_by,
            looks: 1 + self.s.bake.extensions,
            exposed_after_pass: self.exposed_after_pass(r),
            hosts: self.s.hosts.len() as u32,
        }));
    }

    fn after_bake(&mut self) {
        if let Some(g) = self.s.wave.gate {
            if !g.passed {
                // The judge may bake again before it decides.
                let r = usize::from(self.s.wave.region);
                let extensions = self.bake_of(r) * u32::from(self.s.bake.extensions);
                let deadline = self.s.now + extensions + self.s.timeouts.gate;
                self.s.wave.stage = WaveStage::AwaitingVerdict { gate: g.id, deadline };
                return;
            }
        }
        self.gates_passed();
    }

    /// Health and analysis passed: approval, or pass.
    fn gates_passed(&mut self) {
        self.s.wave.gate = None;
        if self.s.wave.gates.approval {
            self.hold(HoldReason::Approval);
        } else {
            self.s.wave.stage = WaveStage::Passed;
        }
    }

    fn hold(&mut self, reason: HoldReason) {
        self.s.wave.stage = WaveStage::Held { reason };
        self.notify(Notice::Held { reason });
    }

    /// The current wave (in stage `Passed`) passed: next wave, next region, or done.
    fn pass_wave(&mut self, promoted: bool) {
        let r = usize::from(self.s.wave.region);
        self.notify(Notice::WavePassed {
            region: RegionIndex(r as u16),
            wave: self.s.wave.number,
            promoted,
        });
        if self.s.regions[r].final_formed {
            self.complete_region();
        } else {
            self.s.wave.stage = WaveStage::Waiting;
        }
    }

    fn complete_region(&mut self) {
        let mut r = usize::from(self.s.wave.region);
        loop {
            let region = &mut self.s.regions[r];
            region.final_formed = true;
            // Blue-green: a straggler of a finished region has no standby wave to wait for; it
            // switches on its own.
            region.switched = true;
            self.notify(Notice::RegionDone { region: RegionIndex(r as u16) });
            r += 1;
            if r == self.s.regions.len() {
                self.s.phase = Phase::Done;
                self.s.wave.stage = WaveStage::Passed;
                let stragglers =
                    self.s.regions.iter().map(|g| g.counts.hosts - g.counts.assigned).sum();
                self.notify(Notice::Done { stragglers });
                return;
            }
            if self.s.regions[r].size() > 0 {
                self.s.wave = Wave::new(r as u16);
                return;
            }
        }
    }

    /// Tells the hosts of the next waves to stage (with [`StageAhead::Waves`]).
    fn stage_lookahead(&mut self) {
        let StageAhead::Waves(n) = self.s.stage_ahead else { return };
        let end = self.lookahead_end(n);
        while self.s.stage_cursor < end {
            let i = self.s.stage_cursor;
            self.s.stage_cursor += 1;
            let h = &self.s.hosts[i as usize];
            if !h.told_stage && h.role == HostRole::Untouched {
                self.update(i, |h| h.told_stage = true);
            }
        }
    }

    /// Global index up to which the next `n` waves would reach, if no host were lost.
    fn lookahead_end(&self, n: u16) -> u32 {
        let s = &self.s;
        let mut r = usize::from(s.wave.region);
        let mut pos = s.regions[r].cursor;
        let mut step = usize::from(s.regions[r].next_step);
        let mut left = n;
        while left > 0 {
            let region = &s.regions[r];
            let size = region.size();
            let next = match &s.strategy {
                Strategy::Canary { steps } => {
                    let mut found = None;
                    while let Some(st) = steps.get(step) {
                        step += 1;
                        let cap = region.start + st.size.ceil_of(size).max(1).min(size);
                        if cap > pos {
                            found = Some(cap);
                            break;
                        }
                    }
                    found
                }
                Strategy::Rolling { .. } => {
                    (pos < region.end).then(|| (pos + region.max_unavailable).min(region.end))
                }
                Strategy::BlueGreen { .. } => (pos < region.end).then_some(region.end),
            };
            match next {
                Some(e) => {
                    pos = e;
                    left -= 1;
                }
                None => {
                    r += 1;
                    let Some(next_region) = s.regions.get(r) else { break };
                    pos = next_region.start;
                    step = 0;
                }
            }
        }
        pos
    }

    // ---------------------------------------------------------------------------------------
    // Failure and rollback

    /// Host `i` has just become `Failed`.
    fn failed(&mut self, i: u32, reason: FailReason) {
        let h = &self.s.hosts[i as usize];
        let (host, region) = (h.id, RegionIndex(h.region));
        self.notify(Notice::HostFailed { host, region, reason });
    }

    /// Something about region `r` changed: roll back if it failed too much, activate more.
    fn after_change(&mut self, r: usize) {
        match self.s.phase {
            Phase::Running => {
                let counts = self.s.regions[r].counts;
                let allowed = self.s.health.max_failed.floor_of(counts.assigned);
                if counts.failed > allowed {
                    self.start_rollback(RollbackReason::TooManyFailures {
                        region: RegionIndex(r as u16),
                        failed: counts.failed,
                        allowed,
                    });
                    return;
                }
                self.activate_ready(r);
                self.drive();
            }
            Phase::Done => self.activate_ready(r),
            Phase::RollingBack { .. } => {
                if self.s.rollback_pending == 0 {
                    self.finish_rollback();
                }
            }
            Phase::RolledBack { .. } | Phase::Aborted => {}
        }
    }

    fn start_rollback(&mut self, reason: RollbackReason) {
        self.notify(Notice::RollingBack { reason });
        let n = self.s.hosts.len() as u32;
        for i in 0..n {
            let h = &self.s.hosts[i as usize];
            if self.desired_of(h, false) != self.desired_of(h, true) {
                self.mark(i);
            }
        }
        self.s.phase = Phase::RollingBack { reason };
        self.s.wave.gate = None;
        self.s.activation_deadlines.clear();
        self.s.stage_deadlines.clear();
        for region in &mut self.s.regions {
            region.ready.clear();
        }
        self.s.rollback_deadline = Some(self.s.now + self.s.timeouts.rollback);
        self.recount_all();
        if self.s.rollback_pending == 0 {
            self.finish_rollback();
        }
    }

    fn finish_rollback(&mut self) {
        let Phase::RollingBack { reason } = self.s.phase else { return };
        let unconfirmed = self.s.hosts.iter().filter(|h| h.touched && !self.on_previous(h)).count();
        self.s.phase = Phase::RolledBack { reason };
        self.s.rollback_deadline = None;
        self.recount_all();
        self.notify(Notice::RolledBack { unconfirmed: unconfirmed as u32 });
    }

    // ---------------------------------------------------------------------------------------
    // Bookkeeping

    fn advance(&mut self, now: Duration) -> Duration {
        self.s.now = self.s.now.max(now);
        self.s.now
    }

    fn lookup(&self, host: HostId) -> Result<u32, EventError> {
        match self.index.binary_search_by_key(&host, |&(id, _)| id) {
            Ok(k) => Ok(self.index[k].1),
            Err(_) => Err(EventError::UnknownHost { host }),
        }
    }

    fn build_index(hosts: &[Host]) -> Vec<(HostId, u32)> {
        let mut index: Vec<(HostId, u32)> =
            hosts.iter().enumerate().map(|(i, h)| (h.id, i as u32)).collect();
        index.sort_unstable();
        index
    }

    fn previous_of(&self, i: u32) -> Option<ManifestId> {
        let p = self.s.hosts[i as usize].previous;
        (p != NO_RELEASE).then(|| self.s.previous[usize::from(p)])
    }

    fn previous_of_host(&self, h: &Host) -> Option<ManifestId> {
        (h.previous != NO_RELEASE).then(|| self.s.previous[usize::from(h.previous)])
    }

    fn on_previous(&self, h: &Host) -> bool {
        match h.running {
            Running::Previous => true,
            Running::Target => self.previous_of_host(h) == Some(self.s.target),
            Running::Nothing => h.previous == NO_RELEASE,
            Running::Other => false,
        }
    }

    fn rolled_back(&self) -> bool {
        matches!(self.s.phase, Phase::RollingBack { .. } | Phase::RolledBack { .. })
    }

    fn desired_of(&self, h: &Host, rolled_back: bool) -> Desired {
        let previous = self.previous_of_host(h);
        let target = Some(self.s.target);
        let back = Desired { active: previous, standby: None, stage: None };
        if rolled_back {
            return back;
        }
        match h.role {
            HostRole::Untouched | HostRole::Queued => Desired {
                active: previous,
                standby: None,
                stage: if h.told_stage { target } else { None },
            },
            HostRole::Starting | HostRole::Ready => {
                Desired { active: previous, standby: target, stage: None }
            }
            HostRole::Activating | HostRole::Updated => {
                let standby = if self.s.strategy.is_disruptive() { None } else { previous };
                Desired { active: target, standby, stage: None }
            }
            HostRole::Failed => back,
        }
    }

    fn class(&self, i: u32) -> Class {
        let h = &self.s.hosts[i as usize];
        let on_previous = self.on_previous(h);
        let switching = match h.role {
            HostRole::Activating => self.s.strategy.is_disruptive(),
            HostRole::Failed => !on_previous,
            _ => false,
        };
        Class {
            assigned: h.role != HostRole::Untouched,
            updated: h.role == HostRole::Updated,
            failed: h.role == HostRole::Failed,
            unavailable: h.lost || h.health != Health::Healthy || switching,
            lost: h.lost,
            unsettled: matches!(
                h.role,
                HostRole::Queued | HostRole::Starting | HostRole::Activating
            ),
            rollback_pending: matches!(self.s.phase, Phase::RollingBack { .. })
                && h.touched
                && !h.lost
                && !on_previous,
        }
    }

    /// Changes host `i` with `f`, keeping the counters and the pending commands up to date.
    fn update(&mut self, i: u32, f: impl FnOnce(&mut Host)) {
        let rolled_back = self.rolled_back();
        let before = self.class(i);
        let desired_before = self.desired_of(&self.s.hosts[i as usize], rolled_back);
        f(&mut self.s.hosts[i as usize]);
        let after = self.class(i);
        if before != after {
            let r = usize::from(self.s.hosts[i as usize].region);
            let counts = &mut self.s.regions[r].counts;
            counts.sub(before);
            counts.add(after);
            self.s.rollback_pending -= u32::from(before.rollback_pending);
            self.s.rollback_pending += u32::from(after.rollback_pending);
        }
        if desired_before != self.desired_of(&self.s.hosts[i as usize], rolled_back) {
            self.mark(i);
        }
    }

    fn recount_all(&mut self) {
        for region in &mut self.s.regions {
            region.counts = Counts { hosts: region.size(), ..Counts::default() };
            region.live_deferred = 0;
        }
        self.s.rollback_pending = 0;
        for i in 0..self.s.hosts.len() as u32 {
            let c = self.class(i);
            let h = &self.s.hosts[i as usize];
            let r = usize::from(h.region);
            let deferred_live = h.role == HostRole::Untouched && !h.lost;
            let region = &mut self.s.regions[r];
            region.counts.add(c);
            region.live_deferred += u32::from(deferred_live && i < region.cursor);
            self.s.rollback_pending += u32::from(c.rollback_pending);
        }
    }

    /// Host `i`'s desired state changed: it goes into the next `SetDesired`.
    fn mark(&mut self, i: u32) {
        let h = &mut self.s.hosts[i as usize];
        if !h.dirty {
            h.dirty = true;
            self.pending.push(i);
        }
    }

    /// Turns the hosts whose desired state changed into `SetDesired` commands, grouped by
    /// desired state (in a fixed order), each group in the order the hosts changed.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let rolled_back = self.rolled_back();
        let mut groups: BTreeMap<Desired, Vec<HostId>> = BTreeMap::new();
        for i in mem::take(&mut self.pending) {
            let h = &mut self.s.hosts[i as usize];
            h.dirty = false;
            let h = &self.s.hosts[i as usize];
            groups.entry(self.desired_of(h, rolled_back)).or_default().push(h.id);
        }
        for (desired, hosts) in groups {
            self.s.commands.push_back(Command::SetDesired { desired, hosts });
        }
    }

    /// Queues a command after the pending desired-state changes.
    fn push(&mut self, command: Command) {
        self.flush();
        self.s.commands.push_back(command);
    }

    fn notify(&mut self, notice: Notice) {
        self.push(Command::Notify(notice));
    }
}

impl Wave {
    fn new(region: u16) -> Self {
        Self {
            region,
            number: 0,
            kind: WaveKind::Activate,
            stage: WaveStage::Waiting,
            gates: Gates::default(),
            gate: None,
        }
    }
}

/// The role change a host's reports imply; returns why it failed, if it did.
fn transition(h: &mut Host, activation_failed: bool, stage_failed: bool) -> Option<FailReason> {
    let on_target = h.running == Running::Target;
    let fail = match h.role {
        HostRole::Queued if stage_failed => Some(FailReason::StageFailed),
        HostRole::Starting if activation_failed => Some(FailReason::ActivationFailed),
        HostRole::Starting | HostRole::Ready if h.standby_up && h.standby == Health::Unhealthy => {
            Some(FailReason::Unhealthy)
        }
        HostRole::Starting if h.standby_up && h.standby == Health::Healthy => {
            h.role = HostRole::Ready;
            None
        }
        HostRole::Activating if activation_failed => Some(FailReason::ActivationFailed),
        HostRole::Activating if on_target && h.health == Health::Healthy => {
            h.role = HostRole::Updated;
            None
        }
        HostRole::Activating if on_target && h.health == Health::Unhealthy => {
            Some(FailReason::Unhealthy)
        }
        HostRole::Updated if !on_target => Some(FailReason::LeftTarget),
        HostRole::Updated if h.health == Health::Unhealthy => Some(FailReason::Unhealthy),
        _ => None,
    };
    if fail.is_some() {
        h.role = HostRole::Failed;
    }
    fail
}
