//! Scenario files: a fleet, its network, the artifact, the deployment and the faults, in TOML.
//!
//! Every field has a default, so a scenario states only what it is about. The swarm limits
//! default to the daemon's own defaults (`fleetwave_node::daemon::config`), and are turned into
//! the scheduler's [`SwarmConfig`] per role exactly as the daemon does (see [`SwarmParams`]).
//! Loading is two steps: [`Scenario::from_toml`] parses, [`Scenario::validate`] checks what
//! parsing cannot (shares add up, indices exist).

use std::path::Path;
use std::time::Duration;

use fleetwave_node::daemon::config::{StageSection, SwarmSection};
use fleetwave_node::swarm::SwarmConfig;
use serde::{Deserialize, Serialize};

use crate::units::{Bytes, Rate};

/// Why a scenario cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or not a scenario.
    #[error("invalid scenario")]
    Parse(#[from] toml::de::Error),
    /// A value that does not make sense.
    #[error("scenario field {field}: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// One simulated situation: see the module docs and `simulations/scenarios/`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, used for output file names.
    pub name: String,
    /// What it shows.
    #[serde(default)]
    pub description: String,
    /// Seed of everything random in the run (artifact bytes, host classes, peer sets, every
    /// scheduler's RNG, the rollout's host order).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The artifact being distributed.
    #[serde(default)]
    pub artifact: ArtifactSpec,
    /// Links and latencies.
    #[serde(default)]
    pub network: NetworkSpec,
    /// Regions in rollout order, with their hosts and caches.
    pub regions: Vec<RegionSpec>,
    /// Host classes by share of the fleet. Default: one class, 100 Mbit/s both ways.
    #[serde(default = "default_classes")]
    pub host_classes: Vec<HostClass>,
    /// Swarm limits (the daemon's configuration section of the same name).
    #[serde(default)]
    pub swarm: SwarmParams,
    /// How hosts behave outside the swarm: verification, activation, failure detection.
    #[serde(default)]
    pub node: NodeParams,
    /// The deployment.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// The release being deployed.
    #[serde(default)]
    pub release: ReleaseSpec,
    /// Faults injected during the run.
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// Operator commands issued during the run.
    #[serde(default)]
    pub operator: Vec<OperatorAction>,
    /// The run itself.
    #[serde(default)]
    pub run: RunSpec,
}

fn default_seed() -> u64 {
    1
}

fn default_classes() -> Vec<HostClass> {
    vec![HostClass::default()]
}

/// The artifact: seeded pseudo-random bytes, cut by the real chunker.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArtifactSpec {
    /// Stream size. Default 200 MB.
    pub size: Bytes,
    /// FastCDC average chunk size (a power of two); min is a quarter, max four times. Default
    /// 1 MiB: the simulator pays per chunk per host, so its large scenarios use larger chunks
    /// than the publish default (64 KiB); see the crate docs.
    pub chunk_avg: Bytes,
}

impl Default for ArtifactSpec {
    fn default() -> Self {
        Self { size: Bytes(200_000_000), chunk_avg: Bytes(1 << 20) }
    }
}

/// The origin and the simulation's time step.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSpec {
    /// The origin's upload. Default 10 Gbit/s.
    pub origin_up: Rate,
    /// The origin's download. Default 10 Gbit/s.
    pub origin_down: Rate,
    /// Rate-sharing period of the network model (see the crate docs: its error is about one
    /// period per transfer). Default 10 ms.
    #[serde(with = "humantime_serde")]
    pub slot: Duration,
    /// One-way latency between the coordinator and any host. Default 20 ms.
    #[serde(with = "humantime_serde")]
    pub coordinator_latency: Duration,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        Self {
            origin_up: Rate(1.25e9),
            origin_down: Rate(1.25e9),
            slot: Duration::from_millis(10),
            coordinator_latency: Duration::from_millis(20),
        }
    }
}

/// One region.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSpec {
    /// Its name.
    pub name: String,
    /// Hosts in it.
    pub hosts: u32,
    /// Caches in it (0: hosts fetch back-to-source from the origin). Default 1.
    #[serde(default = "one")]
    pub caches: u32,
    /// Each cache's upload. Default 10 Gbit/s.
    #[serde(default = "ten_gbit")]
    pub cache_up: Rate,
    /// Each cache's download. Default 10 Gbit/s.
    #[serde(default = "ten_gbit")]
    pub cache_down: Rate,
    /// One-way latency between any two daemons of the region. Default 0.5 ms.
    #[serde(default = "half_ms", with = "humantime_serde")]
    pub latency: Duration,
    /// One-way latency between the origin and the region. Default 20 ms.
    #[serde(default = "twenty_ms", with = "humantime_serde")]
    pub wan_latency: Duration,
    /// Capacity of the link from the origin into the region, shared by every transfer from
    /// the origin to the region's daemons. Default 10 Gbit/s.
    #[serde(default = "ten_gbit")]
    pub wan: Rate,
}

fn one() -> u32 {
    1
}

fn ten_gbit() -> Rate {
    Rate(1.25e9)
}

fn half_ms() -> Duration {
    Duration::from_micros(500)
}

fn twenty_ms() -> Duration {
    Duration::from_millis(20)
}

/// A class of hosts: a share of each region with its own link rates.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostClass {
    /// Name, for reports. Default "standard".
    pub name: String,
    /// Share of every region's hosts (the shares must add up to 1).
    pub share: f64,
    /// Upload. Default 100 Mbit/s.
    pub up: Rate,
    /// Download. Default 100 Mbit/s.
    pub down: Rate,
}

impl Default for HostClass {
    fn default() -> Self {
        Self { name: "standard".into(), share: 1.0, up: Rate(12.5e6), down: Rate(12.5e6) }
    }
}

/// Swarm limits: the daemon's `[swarm]` and `[stage]` sections. Defaults are the daemon's.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SwarmParams {
    /// Region peers a host dials per manifest (it also accepts those that dial it).
    pub max_peers: usize,
    /// How often a staging host asks the rendezvous point for more peers.
    #[serde(with = "humantime_serde")]
    pub discover_every: Duration,
    /// Requests outstanding to one region peer.
    pub max_in_flight_per_peer: u32,
    /// Requests a host keeps outstanding at a cache or the origin.
    pub max_in_flight_back_to_source: u32,
    /// Requests a cache keeps outstanding at the origin.
    pub cache_pull_in_flight: u32,
    /// Uploads a host serves at once.
    pub upload_slots: u32,
    /// Uploads a cache or the origin serves at once.
    pub source_upload_slots: u32,
    /// Hosts pass a chunk on while it arrives.
    pub forward_arriving: bool,
    /// Super-seeding window of caches and the origin.
    #[serde(with = "humantime_serde")]
    pub seed_window: Duration,
    /// How long a host waits for its peers' bitfields before asking a cache or the origin.
    #[serde(with = "humantime_serde")]
    pub back_to_source_delay: Duration,
    /// Most host connections the origin accepts at once (caches do not count).
    pub origin_max_hosts: usize,
    /// Origin permits handed out at once, fleet-wide (0: every request granted, as the daemon
    /// does until the coordinator leases them).
    pub origin_permits: u32,
    /// Group commit: received chunks become durable (and are announced) this often...
    #[serde(with = "humantime_serde")]
    pub sync_every: Duration,
    /// ... or as soon as this many bytes wait.
    pub sync_bytes: u64,
}

impl Default for SwarmParams {
    fn default() -> Self {
        let s = SwarmSection::default();
        let stage = StageSection::default();
        Self {
            max_peers: s.max_peers,
            discover_every: s.discover_every,
            max_in_flight_per_peer: s.max_in_flight_per_peer,
            max_in_flight_back_to_source: s.max_in_flight_back_to_source,
            cache_pull_in_flight: s.cache_pull_in_flight,
            upload_slots: s.upload_slots,
            source_upload_slots: s.source_upload_slots,
            forward_arriving: s.forward_arriving,
            seed_window: s.seed_window,
            back_to_source_delay: s.back_to_source_delay,
            origin_max_hosts: s.origin_max_hosts,
            origin_permits: 0,
            sync_every: stage.sync_every,
            sync_bytes: stage.sync_bytes,
        }
    }
}

impl SwarmParams {
    /// The scheduler configuration of a host, as the daemon builds it.
    pub fn host(&self) -> SwarmConfig {
        SwarmConfig {
            max_in_flight_per_peer: self.max_in_flight_per_peer,
            max_in_flight_back_to_source: self.max_in_flight_back_to_source,
            upload_slots: self.upload_slots,
            back_to_source_delay: self.back_to_source_delay,
            forward_arriving: self.forward_arriving,
            ..SwarmConfig::default()
        }
    }

    /// The scheduler configuration of the origin, as the daemon builds it.
    pub fn origin(&self) -> SwarmConfig {
        let mut c = self.host();
        c.upload_slots = self.source_upload_slots;
        c.upload_slots_per_peer = self.source_upload_slots.max(1);
        c.upload_queue_len = self.source_upload_slots.saturating_mul(4);
        c.seed_window = self.seed_window;
        // Sources have every chunk (a cache pulls through); they pass nothing on early.
        c.forward_arriving = false;
        c
    }

    /// The scheduler configuration of a cache, as the daemon builds it.
    pub fn cache(&self) -> SwarmConfig {
        let mut c = self.origin();
        c.max_in_flight_back_to_source = self.cache_pull_in_flight;
        c.back_to_source_delay = Duration::ZERO;
        c
    }
}

/// Host behaviour outside the swarm.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeParams {
    /// Whole-artifact check (SHA-256 and BLAKE3 of the stream) and unpacking, after the last
    /// chunk: the artifact size divided by this. Default 360 MB/s (`openssl dgst -sha256` on
    /// this machine; SHA-256 is the slowest step).
    pub verify_rate: Rate,
    /// Activating a release (hooks, restart, first health check). Default 5 s.
    #[serde(with = "humantime_serde")]
    pub activate: Duration,
    /// Switching back to the previous release (a symlink switch and a restart). Default 2 s.
    #[serde(with = "humantime_serde")]
    pub switch_back: Duration,
    /// Switching between a running standby and the active release (blue-green). Default
    /// 200 ms.
    #[serde(with = "humantime_serde")]
    pub switch: Duration,
    /// Each of the above is stretched by a uniform random factor in `[1, 1 + jitter]`.
    pub jitter: f64,
    /// How long a connection to a dead peer lingers (QUIC idle timeout). Default 30 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a dial to an unreachable daemon takes to fail. Default 3 s.
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// How long after a host dies the coordinator reports it lost (missed heartbeats).
    /// Default 30 s.
    #[serde(with = "humantime_serde")]
    pub lost_after: Duration,
    /// Extra latency of a DHT lookup, used for discovery while a region has no live cache.
    /// Default 1 s.
    #[serde(with = "humantime_serde")]
    pub dht_latency: Duration,
}

impl Default for NodeParams {
    fn default() -> Self {
        Self {
            verify_rate: Rate(360e6),
            activate: Duration::from_secs(5),
            switch_back: Duration::from_secs(2),
            switch: Duration::from_millis(200),
            jitter: 0.5,
            idle_timeout: Duration::from_secs(30),
            dial_timeout: Duration::from_secs(3),
            lost_after: Duration::from_secs(30),
            dht_latency: Duration::from_secs(1),
        }
    }
}

/// The rollout strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// Canary steps ([`RolloutSpec::steps`]), each judged.
    Canary,
    /// Rolling batches within the budget.
    Rolling,
    /// Blue-green, region by region.
    BlueGreen,
    /// No rollout engine: every host stages, nothing is activated (swarm-only scenarios).
    StageOnly,
}

/// The deployment, as a rollout [`Plan`](fleetwave_coordinator::rollout::Plan).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutSpec {
    /// Strategy. Default canary.
    pub strategy: StrategyKind,
    /// Canary steps, cumulative percent of each region. Default 1, 5, 25, 50, 100.
    pub steps: Vec<u32>,
    /// Analysis gate on each wave (canary: every step but the last). Default true.
    pub analysis: bool,
    /// Bake in the first region. Default 60 s (the engine's default is 10 minutes; scenarios
    /// shorten it: nothing happens while a wave bakes).
    #[serde(with = "humantime_serde")]
    pub bake_first_region: Duration,
    /// Bake in the other regions. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub bake_other_regions: Duration,
    /// Budget: most hosts of a region unavailable at once, percent. Default 25.
    pub max_unavailable_percent: u32,
    /// Most failed hosts per region, percent, before rolling back. Default 1.
    pub max_failed_percent: u32,
    /// How long the simulated judge takes to answer a gate. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub judge_delay: Duration,
    /// A host must stage within this of joining its wave. Default 10 minutes.
    #[serde(with = "humantime_serde")]
    pub stage_timeout: Duration,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            strategy: StrategyKind::Canary,
            steps: vec![1, 5, 25, 50, 100],
            analysis: true,
            bake_first_region: Duration::from_secs(60),
            bake_other_regions: Duration::from_secs(30),
            max_unavailable_percent: 25,
            max_failed_percent: 1,
            judge_delay: Duration::from_secs(5),
            stage_timeout: Duration::from_secs(600),
        }
    }
}

/// How the release behaves once active.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReleaseSpec {
    /// The release regresses: the judge fails the first gate it is asked.
    pub bad: bool,
    /// Share of hosts whose health check fails on the release.
    pub unhealthy_share: f64,
}

/// A fault: what happens, and when.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// What.
    pub kind: FaultKind,
    /// `kill-cache`: the region's index. Default 0.
    #[serde(default)]
    pub region: u16,
    /// `kill-cache`: the cache's index within the region. Default 0.
    #[serde(default)]
    pub index: u32,
    /// `kill-hosts`, `corrupt-hosts`: the share of the fleet, drawn at random.
    #[serde(default)]
    pub share: f64,
    /// `kill-hosts`: each comes back this much later and resumes from what it had made
    /// durable. Default: they stay dead.
    #[serde(default, with = "humantime_serde::option")]
    pub restart_after: Option<Duration>,
    /// When: at this simulated time, or this long after [`Fault::after`].
    #[serde(default, with = "humantime_serde")]
    pub at: Duration,
    /// Counted from this milestone instead of from the start.
    #[serde(default)]
    pub after: Option<Milestone>,
}

/// Kinds of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// A cache dies (`index` of `region`).
    KillCache,
    /// The origin dies.
    KillOrigin,
    /// A random `share` of all hosts dies (and comes back after `restart_after`, if set).
    KillHosts,
    /// A random `share` of all hosts has a corrupt store: every chunk it serves fails its hash
    /// at the receiver.
    CorruptHosts,
}

/// Points in a run that faults and operator commands can be timed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Milestone {
    /// Every cache holds the whole artifact.
    CachesComplete,
    /// Half the hosts hold the whole artifact.
    HalfStaged,
    /// The rollout reported done.
    RolloutDone,
}

/// An operator command.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorAction {
    /// The command: pause, resume, promote, rollback or abort.
    pub command: OperatorCommand,
    /// When (see [`Fault::at`]).
    #[serde(default, with = "humantime_serde")]
    pub at: Duration,
    /// Counted from this milestone.
    #[serde(default)]
    pub after: Option<Milestone>,
}

/// Operator commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OperatorCommand {
    /// Pause.
    Pause,
    /// Resume.
    Resume,
    /// Promote the current wave.
    Promote,
    /// Roll back.
    Rollback,
    /// Abort.
    Abort,
}

/// The run.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSpec {
    /// Stop at this simulated time whatever is left. Default 4 hours.
    #[serde(with = "humantime_serde")]
    pub stop_after: Duration,
    /// Width of the time buckets of the egress and progress series. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub bucket: Duration,
}

impl Default for RunSpec {
    fn default() -> Self {
        Self { stop_after: Duration::from_secs(4 * 3600), bucket: Duration::from_secs(1) }
    }
}

impl Scenario {
    /// Parses a scenario (not yet validated).
    pub fn from_toml(text: &str) -> Result<Self, ScenarioError> {
        Ok(toml::from_str(text)?)
    }

    /// Reads, parses and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ScenarioError::Read { path: path.display().to_string(), source })?;
        let s = Self::from_toml(&text)?;
        s.validate()?;
        Ok(s)
    }

    /// Total hosts.
    pub fn host_count(&self) -> u64 {
        self.regions.iter().map(|r| u64::from(r.hosts)).sum()
    }

    /// Checks what parsing cannot.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let invalid = |field, why: String| Err(ScenarioError::Invalid { field, why });
        if self.regions.is_empty() || self.host_count() == 0 {
            return invalid("regions", "at least one region with hosts".into());
        }
        if self.host_count() > 1_000_000 {
            return invalid("regions", "at most 1,000,000 hosts".into());
        }
        if self.artifact.size.0 == 0 {
            return invalid("artifact.size", "must be positive".into());
        }
        let params = fleetwave_chunker::ChunkerParams::with_avg(self.artifact.chunk_avg.0 as u32);
        if let Err(e) = params.validate() {
            return invalid("artifact.chunk_avg", e.to_string());
        }
        let shares: f64 = self.host_classes.iter().map(|c| c.share).sum();
        if self.host_classes.is_empty()
            || self.host_classes.iter().any(|c| c.share < 0.0)
            || (shares - 1.0).abs() > 1e-6
        {
            return invalid(
                "host_classes",
                format!("shares must be >= 0 and add up to 1 ({shares})"),
            );
        }
        if self.network.slot.is_zero() {
            return invalid("network.slot", "must be positive".into());
        }
        if self.run.bucket.is_zero() {
            return invalid("run.bucket", "must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.release.unhealthy_share) {
            return invalid("release.unhealthy_share", "between 0 and 1".into());
        }
        if self.swarm.max_peers == 0 || self.swarm.sync_every.is_zero() {
            return invalid("swarm", "max_peers and sync_every must be positive".into());
        }
        if self.rollout.strategy == StrategyKind::Canary
            && (self.rollout.steps.last() != Some(&100)
                || self.rollout.steps.iter().any(|&p| p == 0 || p > 100))
        {
            return invalid("rollout.steps", "percentages in 1..=100, the last 100".into());
        }
        for f in &self.faults {
            match f.kind {
                FaultKind::KillCache => {
                    let r = self.regions.get(usize::from(f.region));
                    if r.is_none_or(|r| f.index >= r.caches) {
                        let why = format!("no cache {} in region {}", f.index, f.region);
                        return invalid("faults", why);
                    }
                }
                FaultKind::KillHosts | FaultKind::CorruptHosts
                    if !(0.0..=1.0).contains(&f.share) =>
                {
                    return invalid("faults", "host shares between 0 and 1".into());
                }
                _ => {}
            }
        }
        Ok(())
    }
}
