//! The deployment plan: what the engine is asked to do, and its validation.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Opaque handle of a host in scope.
///
/// The daemon interns each enrolled node's identity to a `u64` and keeps the map; the simulator
/// uses host numbers directly. Eight bytes, `Copy` and `Ord`, so the engine can keep one per host
/// and look hosts up by binary search.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostId(pub u64);

impl fmt::Debug for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host#{}", self.0)
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host#{}", self.0)
    }
}

/// Position of a region in [`Plan::regions`], which is also the order regions are rolled out in.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RegionIndex(pub u16);

impl fmt::Debug for RegionIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region#{}", self.0)
    }
}

impl fmt::Display for RegionIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region#{}", self.0)
    }
}

/// A release, named by its manifest id (the BLAKE3 hash of the manifest's canonical encoding).
///
/// The engine never looks inside: it compares ids. It is the shell's job to turn a manifest id
/// into "fetch this signed manifest" for a host.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ManifestId(pub [u8; 32]);

impl fmt::Debug for ManifestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight bytes are plenty to tell releases apart in logs.
        f.write_str("manifest:")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for ManifestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A number of hosts, absolute or relative to a set of hosts (a region, or the hosts of a region
/// in the rollout so far).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Limit {
    /// That many hosts.
    Count(u32),
    /// That percentage (0-100) of the set.
    Percent(u32),
}

impl Limit {
    /// The limit over a set of `n` hosts, rounded down (used for allowances: "at most").
    pub fn floor_of(self, n: u32) -> u32 {
        match self {
            Limit::Count(c) => c.min(n),
            Limit::Percent(p) => (u64::from(n) * u64::from(p.min(100)) / 100) as u32,
        }
    }

    /// The limit over a set of `n` hosts, rounded up (used for requirements and step sizes: "at
    /// least", so that 1% of 50 hosts is one host, not none).
    pub fn ceil_of(self, n: u32) -> u32 {
        match self {
            Limit::Count(c) => c.min(n),
            Limit::Percent(p) => (u64::from(n) * u64::from(p.min(100))).div_ceil(100) as u32,
        }
    }

    fn is_valid(self) -> bool {
        match self {
            Limit::Count(_) => true,
            Limit::Percent(p) => p <= 100,
        }
    }
}

/// The disruption budget, per region, of the strategies that restart hosts (rolling and
/// canary): the engine starts an activation only if, afterwards, the region still satisfies
/// both limits. Blue-green switches are not disruptive (the new release is already running
/// beside the old) and ignore it; so does a rollback, which is a switch back to a release known
/// to work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Budget {
    /// Most hosts of a region unavailable at once (lost, unhealthy, failed or switching),
    /// rounded down but at least one (with none, nothing could ever be activated; there is no
    /// surge capacity to take up the slack). Default 25%, the Kubernetes default: a region
    /// keeps three quarters of its capacity while a rolling batch restarts.
    pub max_unavailable: Limit,
    /// Fewest hosts of a region that must stay available, rounded up. Default 0 (no floor
    /// beyond `max_unavailable`); set it when capacity, not a fraction, is what matters.
    pub min_healthy: Limit,
}

impl Default for Budget {
    fn default() -> Self {
        Self { max_unavailable: Limit::Percent(25), min_healthy: Limit::Count(0) }
    }
}

/// How many failed hosts the rollout tolerates before it rolls back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthGate {
    /// Most failed hosts per region, relative to the hosts of that region in the rollout so
    /// far (rounded down), before everything is rolled back. Default 1%: at 50,000 hosts a few
    /// activations fail for reasons of their own (a full disk, a dying machine), and each
    /// failed host is switched back on its own; but at the first canary step of a small region
    /// the allowance is zero, so one failure rolls back.
    pub max_failed: Limit,
}

impl Default for HealthGate {
    fn default() -> Self {
        Self { max_failed: Limit::Percent(1) }
    }
}

/// How long each wave bakes once all its hosts run the release, before its gates are judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Bake {
    /// Bake of each wave in the first region. Default 10 minutes: the first region is the one
    /// that finds problems, so it is given time to.
    pub first_region: Duration,
    /// Bake of each wave in every later region. Default 5 minutes.
    pub other_regions: Duration,
    /// How many more bakes the analysis judge may take when it cannot decide at the end of
    /// one (too little traffic yet to pass, and no regression shown). Default 2: a thin canary
    /// step is judged over up to three bakes before it is held for a human.
    #[serde(default = "default_extensions")]
    pub extensions: u16,
}

fn default_extensions() -> u16 {
    2
}

impl Default for Bake {
    fn default() -> Self {
        Self {
            first_region: Duration::from_secs(10 * 60),
            other_regions: Duration::from_secs(5 * 60),
            extensions: default_extensions(),
        }
    }
}

/// Deadlines. Each must be positive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Timeouts {
    /// A host assigned to a wave must report the target staged within this, or it fails.
    /// Default 10 minutes: staging normally runs ahead and is done long before the wave starts;
    /// this only catches hosts that cannot fetch at all.
    pub stage: Duration,
    /// A host told to run the target (or, blue-green, to start it beside the old one) must
    /// report it active (started) and healthy within this, or it fails. Default 2 minutes:
    /// hooks, a restart and a few health checks.
    pub activation: Duration,
    /// After a wave's bake, how long to wait for the analysis verdict before holding the
    /// rollout for a human. Default 10 minutes.
    pub gate: Duration,
    /// How long a rollback waits for every touched host to confirm the previous release before
    /// it is declared finished with the rest unconfirmed. Default 2 minutes (a rollback is a
    /// symlink switch: seconds).
    pub rollback: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            stage: Duration::from_secs(10 * 60),
            activation: Duration::from_secs(2 * 60),
            gate: Duration::from_secs(10 * 60),
            rollback: Duration::from_secs(2 * 60),
        }
    }
}

/// Which hosts are told to stage the target, ahead of their wave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StageAhead {
    /// Every host in scope, at once, when the rollout starts (the default). Staging changes
    /// nothing that runs; the swarm is most efficient when all hosts of a region fetch together
    /// (the origin serves each chunk about once per region); and every wave then activates in
    /// seconds.
    All,
    /// The hosts of the current wave and of this many waves after it (crossing into the next
    /// regions), for fleets short of disk or bandwidth: the next wave stages while the current
    /// one bakes.
    Waves(u16),
}

/// Gates of a wave, judged after its bake. Health is always a gate (see [`HealthGate`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Gates {
    /// Ask the analysis judge to compare the wave's region's hosts on the target with baseline
    /// hosts of the same region still on the previous release. Skipped when the region has no
    /// baseline left (its last wave).
    pub analysis: bool,
    /// Wait for an operator's [`Operator::Promote`](super::Operator::Promote).
    pub approval: bool,
}

/// One canary step: the share of each region's hosts running the target once it is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CanaryStep {
    /// Cumulative size, rounded up, at least one host. Steps that add no host to a region (1%
    /// and 5% of 20 hosts are both one host) are skipped there.
    pub size: Limit,
    /// Gates judged after the step's bake.
    pub gates: Gates,
}

/// How waves are formed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Strategy {
    /// Batches as large as the [`Budget`] allows at the time each is formed, one at a time,
    /// each baked and gated, region after region.
    Rolling {
        /// Gates after each batch.
        gates: Gates,
    },
    /// Cumulative steps per region, each baked and gated. The last must be 100%.
    Canary {
        /// The steps, applied in each region in turn.
        steps: Vec<CanaryStep>,
    },
    /// Per region: start the target beside the old release on every host, health-check it,
    /// switch the whole region at once, keep the old release running for an instant switch
    /// back, bake, gate, next region.
    BlueGreen {
        /// Gates after each region's switch and bake.
        gates: Gates,
    },
}

impl Strategy {
    /// The default canary: 1% -> 5% -> 25% -> 50% -> 100% of each region, each step but the
    /// last judged by analysis (the last has no baseline left in its region).
    pub fn canary() -> Self {
        let step = |p, analysis| CanaryStep {
            size: Limit::Percent(p),
            gates: Gates { analysis, approval: false },
        };
        Strategy::Canary {
            steps: vec![
                step(1, true),
                step(5, true),
                step(25, true),
                step(50, true),
                step(100, false),
            ],
        }
    }

    /// Rolling with a health gate only.
    pub fn rolling() -> Self {
        Strategy::Rolling { gates: Gates::default() }
    }

    /// Blue-green with a health gate only.
    pub fn blue_green() -> Self {
        Strategy::BlueGreen { gates: Gates::default() }
    }

    /// Whether activating a host takes it out of service (everything but blue-green).
    pub(crate) fn is_disruptive(&self) -> bool {
        !matches!(self, Strategy::BlueGreen { .. })
    }
}

/// One host in scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostSpec {
    /// The host.
    pub id: HostId,
    /// Its region.
    pub region: RegionIndex,
    /// The release it runs now and goes back to on rollback; `None` if it runs nothing of this
    /// service (a rollback then stops the service there).
    pub previous: Option<ManifestId>,
}

/// A deployment: roll `target` of `service` out over `hosts`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Plan {
    /// The service being deployed (carried for the shell; the engine does not interpret it).
    pub service: String,
    /// The release to roll out.
    pub target: ManifestId,
    /// Region names, in rollout order. The first gets [`Bake::first_region`].
    pub regions: Vec<String>,
    /// The hosts in scope, in any order (the engine sorts them by id, so the order given does
    /// not change the rollout).
    pub hosts: Vec<HostSpec>,
    /// How waves are formed.
    pub strategy: Strategy,
    /// Disruption budget per region.
    pub budget: Budget,
    /// Failure tolerance.
    pub health: HealthGate,
    /// Bake times.
    pub bake: Bake,
    /// Deadlines.
    pub timeouts: Timeouts,
    /// Which hosts stage ahead of their wave.
    pub stage_ahead: StageAhead,
    /// Most hosts on each side (canary, baseline) of a gate request. Default 1,000: plenty of
    /// traffic for any test at fleet scale, and it bounds what a gate costs (and the size of
    /// the request) whatever the size of the wave.
    pub gate_sample: u32,
    /// Seed of the order in which each region's hosts are taken into waves (a seeded shuffle,
    /// so that a canary is a random sample of its region, not its lowest host ids).
    pub seed: u64,
}

impl Plan {
    /// A plan with default budget, health gate, bakes, timeouts and staging, and seed 0.
    pub fn new(
        service: impl Into<String>,
        target: ManifestId,
        regions: Vec<String>,
        hosts: Vec<HostSpec>,
        strategy: Strategy,
    ) -> Self {
        Self {
            service: service.into(),
            target,
            regions,
            hosts,
            strategy,
            budget: Budget::default(),
            health: HealthGate::default(),
            bake: Bake::default(),
            timeouts: Timeouts::default(),
            stage_ahead: StageAhead::All,
            gate_sample: 1000,
            seed: 0,
        }
    }

    /// Checks everything that does not depend on the hosts' states.
    pub(crate) fn validate(&self) -> Result<(), PlanError> {
        if self.regions.is_empty() {
            return Err(PlanError::NoRegions);
        }
        if self.regions.len() > usize::from(u16::MAX) {
            return Err(PlanError::TooManyRegions { count: self.regions.len() });
        }
        let mut names: Vec<&str> = self.regions.iter().map(String::as_str).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(PlanError::DuplicateRegion { name: w[0].to_owned() });
        }
        if self.hosts.is_empty() {
            return Err(PlanError::NoHosts);
        }
        if u32::try_from(self.hosts.len()).is_err() {
            return Err(PlanError::TooManyHosts { count: self.hosts.len() });
        }
        let limits = [
            ("budget.max_unavailable", self.budget.max_unavailable),
            ("budget.min_healthy", self.budget.min_healthy),
            ("health.max_failed", self.health.max_failed),
        ];
        for (field, limit) in limits {
            if !limit.is_valid() {
                return Err(PlanError::InvalidLimit { field, limit });
            }
        }
        let timeouts = [
            ("timeouts.stage", self.timeouts.stage),
            ("timeouts.activation", self.timeouts.activation),
            ("timeouts.gate", self.timeouts.gate),
            ("timeouts.rollback", self.timeouts.rollback),
        ];
        for (field, value) in timeouts {
            if value.is_zero() {
                return Err(PlanError::NotPositive { field });
            }
        }
        if self.gate_sample == 0 {
            return Err(PlanError::NotPositive { field: "gate_sample" });
        }
        if let Strategy::Canary { steps } = &self.strategy {
            let Some(last) = steps.last() else {
                return Err(PlanError::NoCanarySteps);
            };
            for step in steps {
                let valid = match step.size {
                    Limit::Count(c) => c > 0,
                    Limit::Percent(p) => (1..=100).contains(&p),
                };
                if !valid {
                    return Err(PlanError::InvalidLimit { field: "canary step", limit: step.size });
                }
            }
            if last.size != Limit::Percent(100) {
                return Err(PlanError::LastStepNotFull { last: last.size });
            }
        }
        Ok(())
    }
}

/// Why a [`Plan`] (or a [`Snapshot`](super::Snapshot)) was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No regions are listed.
    #[error("the plan lists no regions")]
    NoRegions,
    /// More regions than a [`RegionIndex`] can number.
    #[error("the plan lists {count} regions, more than the engine can index")]
    TooManyRegions {
        /// How many.
        count: usize,
    },
    /// A region is listed twice.
    #[error("region {name:?} is listed twice")]
    DuplicateRegion {
        /// Its name.
        name: String,
    },
    /// No hosts are in scope.
    #[error("the plan has no hosts in scope")]
    NoHosts,
    /// More hosts than the engine can index.
    #[error("the plan has {count} hosts, more than the engine can index")]
    TooManyHosts {
        /// How many.
        count: usize,
    },
    /// A host is listed twice.
    #[error("{host} is listed twice")]
    DuplicateHost {
        /// The host.
        host: HostId,
    },
    /// A host's region is not in [`Plan::regions`].
    #[error("{host} is in {region}, which the plan does not list")]
    UnknownRegion {
        /// The host.
        host: HostId,
        /// Its region.
        region: RegionIndex,
    },
    /// More distinct previous releases than the engine interns (65,535).
    #[error("the hosts run {count} distinct previous releases, more than the engine tracks")]
    TooManyPreviousReleases {
        /// How many.
        count: usize,
    },
    /// A percentage above 100, or a canary step of zero hosts.
    #[error("{field}: {limit:?} is not a valid limit")]
    InvalidLimit {
        /// The plan field.
        field: &'static str,
        /// Its value.
        limit: Limit,
    },
    /// A timeout or the gate sample is zero.
    #[error("{field} must be positive")]
    NotPositive {
        /// The plan field.
        field: &'static str,
    },
    /// A canary with no steps.
    #[error("a canary needs at least one step")]
    NoCanarySteps,
    /// The last canary step is not 100%: the rollout would never finish.
    #[error("the last canary step is {last:?}, not 100%")]
    LastStepNotFull {
        /// The last step's size.
        last: Limit,
    },
    /// `min_healthy` leaves no room to activate a single host of a region.
    #[error("{region} has {hosts} hosts and min_healthy {min_healthy}: no host could be activated")]
    MinHealthyTooHigh {
        /// The region.
        region: RegionIndex,
        /// Its host count.
        hosts: u32,
        /// The resolved minimum.
        min_healthy: u32,
    },
}
