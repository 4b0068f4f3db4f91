//! The simulated fleet: daemons, their shells around the real schedulers, the coordinator's
//! shell around the real rollout engine, and the events between them.
//!
//! Everything a daemon's I/O does for its [`Scheduler`] is done here, the way the daemon
//! does it (`node/src/daemon.rs`, `daemon/transfer.rs`): dial a source (the region's caches in
//! order, then the origin), register at the rendezvous and dial a bounded random set of region
//! peers, send bitfields on connecting, carry requests, cancels, rejections and have
//! announcements, move pieces over the [network model](crate::net), check each piece's hash
//! against the manifest, make written chunks durable in group commits, verify the whole
//! artifact, and report to the coordinator. Nothing of the schedulers' or the engine's decisions
//! is reimplemented: the simulator only carries out their commands.

use std::collections::HashMap;
use std::time::Duration;

use fleetwave_coordinator::rollout::{
    Bake, Budget, CanaryStep, Command as RolloutCommand, Desired, GateId, Gates, HealthGate,
    HostEvent, HostId, HostSpec, Limit, ManifestId, Notice, Operator, Phase, Plan, RegionIndex,
    Rollout, StageAhead, Strategy, Timeouts, Verdict,
};
use fleetwave_node::daemon::upstream::{UpstreamBackoff, Upstreams};
use fleetwave_node::swarm::{
    Bitfield, Command, PeerId, PeerKind, PieceAction, PieceOutcome, Progress, RejectReason,
    Scheduler, SwarmConfig,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::artifact::Artifact;
use crate::engine::{Queue, Time, duration, nanos};
use crate::net::{FlowId, LinkId, NO_LINK, Net, Payload};
use crate::scenario::{FaultKind, Milestone, OperatorCommand, Scenario, StrategyKind};

/// What a daemon is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The origin.
    Origin,
    /// A regional cache.
    Cache,
    /// A host.
    Host,
}

/// A release, as hosts see them here: the one they ran before, or the one being deployed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rel {
    /// Nothing.
    None,
    /// The previous release.
    Previous,
    /// The target release.
    Target,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Want {
    active: Rel,
    standby: Rel,
    stage: Rel,
}

#[derive(Clone, Copy, Debug)]
enum Rep {
    Staged,
    StageFailed,
    Started,
    Active(Rel),
    Health { rel: Rel, healthy: bool },
    Lost,
}

#[derive(Clone, Copy, Debug)]
enum Wire {
    Connect,
    Accept(u32),
    Refuse,
    Bitfield(u32),
    /// A Request frame: the chunks in `World::batches` under this id.
    Request(u32),
    Cancel(u32),
    Reject(u32, RejectReason),
    Disconnect,
    Register,
}

#[derive(Clone, Copy, Debug)]
enum Ev {
    Tick,
    FlowDone(FlowId),
    Piece {
        from: u32,
        to: u32,
        inc: u32,
        index: u32,
        corrupt: bool,
    },
    /// The first bytes of chunk `index` reach `to` (`forward_arriving`).
    Started {
        from: u32,
        to: u32,
        inc: u32,
        index: u32,
    },
    Wire {
        from: u32,
        to: u32,
        inc: u32,
        msg: Wire,
    },
    Announce {
        from: u32,
        inc: u32,
        index: u32,
        list: u32,
    },
    Timer {
        node: u32,
        generation: u32,
    },
    Sync {
        node: u32,
        inc: u32,
    },
    SourceRound {
        node: u32,
        inc: u32,
    },
    PeerRound {
        node: u32,
        inc: u32,
    },
    DiscoverReply {
        node: u32,
        inc: u32,
    },
    DialTimeout {
        node: u32,
        inc: u32,
        peer: u32,
    },
    Verified {
        node: u32,
        inc: u32,
    },
    ActionDone {
        node: u32,
        generation: u32,
    },
    Report {
        host: u32,
        inc: u32,
        rep: Rep,
    },
    Desired {
        host: u32,
        inc: u32,
        want: Want,
    },
    RolloutTimer {
        generation: u32,
    },
    Verdict {
        gate: u32,
        fail: bool,
    },
    Fault(u32),
    Operator(u32),
    Restart(u32),
    Sample,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Idle,
    Staging,
    Verifying,
    Staged,
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    Idle,
    /// Dialing source `k` of `World::sources_of`, node `peer`.
    Trying {
        k: u32,
        peer: u32,
    },
    Connected {
        k: u32,
        peer: u32,
    },
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Goal {
    ActivateTarget,
    SwitchBack,
    Standby,
}

struct Node {
    role: Role,
    region: u16,
    class: u16,
    up: LinkId,
    down: LinkId,
    alive: bool,
    inc: u32,
    corrupt: bool,
    unhealthy: bool,
    sched: Option<Box<Scheduler>>,
    conns: Vec<u32>,
    dialing: Vec<u32>,
    timer_at: Time,
    timer_gen: u32,
    pending: Vec<u32>,
    pending_bytes: u64,
    sync_armed: bool,
    holds_permit: bool,
    stage: Stage,
    src: Src,
    /// The daemon's choice of source to dial (`keep_source`), over `World::sources_of`.
    ups: Upstreams,
    /// Chunks durable on disk when the process died (resumed from on restart).
    resume: Option<Bitfield>,
    /// XOR of the leading 16 bytes of the hashes of the chunks written durably.
    digest: u128,
    running: Rel,
    standby_up: bool,
    want: Want,
    action: Option<(Goal, u32)>,
    action_gen: u32,
    peer_round_armed: bool,
    host_conns: u32,
}

/// Raw results of a run, turned into a [`Report`](crate::report::Report).
#[derive(Debug, Default)]
pub struct Outcome {
    /// When the run ended (ns).
    pub end: Time,
    /// Events processed.
    pub events: u64,
    /// Per host (in node order): region, class, when every chunk was held, when staged, alive
    /// at the end, content verified, release running at the end.
    pub hosts: Vec<HostResult>,
    /// Per cache: region and when it held every chunk.
    pub caches: Vec<(u16, Option<Time>)>,
    /// Bytes the origin sent into each region.
    pub origin_to_region: Vec<u64>,
    /// Bytes each region's caches sent.
    pub cache_egress: Vec<u64>,
    /// Series, one entry per bucket.
    pub series: Series,
    /// Swarm counters summed over hosts.
    pub progress: Progress,
    /// Notices of the rollout engine, with their time.
    pub notices: Vec<(Time, Notice)>,
    /// The engine's final phase (None for stage-only scenarios).
    pub phase: Option<Phase>,
    /// The coordinator's final view: hosts it counts as updated.
    pub updated: u32,
    /// Errors the shells saw from the cores (unexpected events), by kind.
    pub core_errors: u64,
    /// Origin permits granted and denied.
    pub permits: (u64, u64),
    /// Hosts running the target when a rollback started.
    pub on_target_at_rollback: Option<u32>,
    /// Events by kind, and the messages they carried.
    pub traffic: Traffic,
}

/// What the events of a run were: where a run's cost goes (each event costs about the same,
/// plus the scheduler calls it makes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    /// Request frames delivered (one event each).
    pub request_frames: u64,
    /// Chunks those frames asked for.
    pub requested_chunks: u64,
    /// Rejections delivered with `Busy`.
    pub busy: u64,
    /// Rejections delivered with `SeededRecently`.
    pub seeded_recently: u64,
    /// Other rejections (`NotHave`, `Banned`).
    pub other_rejects: u64,
    /// Cancels delivered.
    pub cancels: u64,
    /// Pieces delivered (one event each, after the flow's `FlowDone`).
    pub pieces: u64,
    /// Flow completions.
    pub flows_done: u64,
    /// Network slot ticks.
    pub ticks: u64,
    /// Have broadcasts (one event each, however many peers it reaches).
    pub announces: u64,
    /// Haves handed to a staging scheduler (`handle_have` calls).
    pub haves_delivered: u64,
    /// Scheduler timers fired.
    pub timers: u64,
    /// Every other event (connections, bitfields, syncs, reports, the rollout).
    pub other: u64,
}

/// One host's result.
#[derive(Clone, Copy, Debug)]
pub struct HostResult {
    /// Region index.
    pub region: u16,
    /// Host class index.
    pub class: u16,
    /// When it held every chunk (ns).
    pub complete: Option<Time>,
    /// When it was staged (whole artifact verified).
    pub staged: Option<Time>,
    /// Alive at the end.
    pub alive: bool,
    /// Its written chunks hash to the manifest's (checked at staging).
    pub verified: bool,
    /// What it runs at the end.
    pub running: Rel,
}

/// Time series, one entry per bucket of the scenario's `run.bucket`.
#[derive(Debug, Default, Clone)]
pub struct Series {
    /// Origin bytes sent per bucket.
    pub origin: Vec<u64>,
    /// Cache bytes sent per bucket, per region.
    pub cache: Vec<Vec<u64>>,
    /// Hosts holding every chunk, at the end of each bucket.
    pub complete: Vec<u32>,
    /// Hosts staged.
    pub staged: Vec<u32>,
    /// Hosts the rollout counts updated (running the target, healthy).
    pub updated: Vec<u32>,
    /// Hosts running the target (as the simulator sees them).
    pub on_target: Vec<u32>,
    /// Mean downlink use of the live hosts still staging, at the end of each bucket (0 when
    /// none is).
    pub staging_down_use: Vec<f64>,
    /// Mean uplink use of the live hosts holding at least one chunk, at the end of each bucket.
    pub holder_up_use: Vec<f64>,
    /// Live hosts still staging that hold at least one chunk but use under half their uplink,
    /// at the end of each bucket: upload capacity idle while hosts still download.
    pub idle_holders: Vec<u32>,
}

/// Where a run stands: what [`simulate`]'s observer gets at every sample (every
/// `run.bucket` of simulated time). Simulated time and counters only, so watching a run never
/// changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunProgress {
    /// Simulated time (ns).
    pub at: Time,
    /// Events handled so far.
    pub events: u64,
    /// Hosts in the fleet.
    pub hosts: u32,
    /// Chunks in the artifact.
    pub chunks: u32,
    /// Pieces received so far, by hosts and caches (duplicates included).
    pub pieces: u64,
    /// Hosts holding every chunk.
    pub complete: u32,
    /// Hosts staged (every chunk verified, the release unpacked).
    pub staged: u32,
    /// Hosts the rollout counts as updated.
    pub updated: u32,
}

/// The whole simulated world.
pub struct World {
    /// Uploads of a chunk still arriving at their sender, sent in full and waiting for the
    /// sender's own copy to be verified: by (sender, chunk), the receivers (`forward_arriving`).
    waiting: HashMap<(u32, u32), Vec<u32>>,
    sc: Scenario,
    art: Artifact,
    q: Queue<Ev>,
    net: Net,
    rng: ChaCha8Rng,
    nodes: Vec<Node>,
    caches_of: Vec<Vec<u32>>,
    region_wan: Vec<LinkId>,
    registry: Vec<Vec<u32>>,
    bitfields: Vec<Option<Bitfield>>,
    free_bitfields: Vec<u32>,
    /// Chunk lists of Request frames in flight (one event per frame, as the daemon sends one
    /// frame per `Command::Request`), and the free entries.
    batches: Vec<Vec<u32>>,
    free_batches: Vec<u32>,
    host_cfg: SwarmConfig,
    cache_cfg: SwarmConfig,
    origin_cfg: SwarmConfig,
    expected_digest: u128,
    rollout: Option<Rollout>,
    rollout_timer: (Time, u32),
    bucket: Time,
    out: Outcome,
    permits_in_use: u32,
    milestones: Vec<Milestone>,
    /// Faults and operator commands that have fired (indexes into the scenario's lists): one
    /// scheduled after a milestone but not yet due still holds the run open.
    faults_fired: Vec<bool>,
    ops_fired: Vec<bool>,
    on_target: u32,
    complete_count: u32,
    staged_count: u32,
    hosts_total: u32,
    caches_done: u32,
    finished: bool,
    restarts_pending: u32,
    /// The last sample's progress, until the run loop hands it to the observer.
    sampled: Option<RunProgress>,
}

const NONE: Time = u64::MAX;
const SOURCE_RETRY: Time = 250_000_000;

fn digest_of(hash: &fleetwave_chunker::ChunkHash) -> u128 {
    let b = hash.as_bytes();
    let mut w = [0u8; 16];
    w.copy_from_slice(&b[..16]);
    u128::from_le_bytes(w)
}

impl World {
    /// Builds the fleet of `sc` around `art`.
    pub fn new(sc: Scenario, art: Artifact) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(sc.seed ^ 0x0005_eedf_1ee7);
        let mut net = Net::new(nanos(sc.network.slot));
        let mut nodes = Vec::new();
        let blank = |role, region, up, down| Node {
            role,
            region,
            class: 0,
            up,
            down,
            alive: true,
            inc: 0,
            corrupt: false,
            unhealthy: false,
            sched: None,
            conns: Vec::new(),
            dialing: Vec::new(),
            timer_at: NONE,
            timer_gen: 0,
            pending: Vec::new(),
            pending_bytes: 0,
            sync_armed: false,
            holds_permit: false,
            stage: Stage::Idle,
            src: Src::Idle,
            ups: Upstreams::new(0, UpstreamBackoff::default()),
            resume: None,
            digest: 0,
            running: Rel::Previous,
            standby_up: false,
            want: Want { active: Rel::Previous, standby: Rel::None, stage: Rel::None },
            action: None,
            action_gen: 0,
            peer_round_armed: false,
            host_conns: 0,
        };
        let up = net.add_link(sc.network.origin_up.bytes_per_sec());
        let down = net.add_link(sc.network.origin_down.bytes_per_sec());
        nodes.push(blank(Role::Origin, u16::MAX, up, down));
        let mut region_wan = Vec::new();
        let mut caches_of = Vec::new();
        for (r, spec) in sc.regions.iter().enumerate() {
            region_wan.push(net.add_link(spec.wan.bytes_per_sec()));
            let mut list = Vec::new();
            for _ in 0..spec.caches {
                let up = net.add_link(spec.cache_up.bytes_per_sec());
                let down = net.add_link(spec.cache_down.bytes_per_sec());
                list.push(nodes.len() as u32);
                nodes.push(blank(Role::Cache, r as u16, up, down));
            }
            caches_of.push(list);
        }
        let mut hosts_total = 0;
        for (r, spec) in sc.regions.iter().enumerate() {
            let n = spec.hosts as usize;
            let mut classes = Vec::with_capacity(n);
            let mut given = 0usize;
            for (c, class) in sc.host_classes.iter().enumerate() {
                let k = if c + 1 == sc.host_classes.len() {
                    n - given
                } else {
                    ((class.share * n as f64).round() as usize).min(n - given)
                };
                given += k;
                classes.extend(std::iter::repeat_n(c as u16, k));
            }
            classes.shuffle(&mut rng);
            for c in classes {
                let class = &sc.host_classes[usize::from(c)];
                let up = net.add_link(class.up.bytes_per_sec());
                let down = net.add_link(class.down.bytes_per_sec());
                let mut node = blank(Role::Host, r as u16, up, down);
                node.class = c;
                node.unhealthy = rng.r#gen::<f64>() < sc.release.unhealthy_share;
                nodes.push(node);
                hosts_total += 1;
            }
        }
        let expected_digest =
            art.summary.chunks.iter().fold(0u128, |acc, c| acc ^ digest_of(&c.hash));
        let regions = sc.regions.len();
        let bucket = nanos(sc.run.bucket);
        let out = Outcome {
            origin_to_region: vec![0; regions],
            cache_egress: vec![0; regions],
            series: Series { cache: vec![Vec::new(); regions], ..Series::default() },
            ..Outcome::default()
        };
        let host_cfg = sc.swarm.host();
        let cache_cfg = sc.swarm.cache();
        let origin_cfg = sc.swarm.origin();
        Self {
            waiting: HashMap::new(),
            art,
            q: Queue::default(),
            net,
            rng,
            nodes,
            caches_of,
            region_wan,
            registry: vec![Vec::new(); regions],
            bitfields: Vec::new(),
            free_bitfields: Vec::new(),
            batches: Vec::new(),
            free_batches: Vec::new(),
            host_cfg,
            cache_cfg,
            origin_cfg,
            expected_digest,
            rollout: None,
            rollout_timer: (NONE, 0),
            bucket,
            out,
            permits_in_use: 0,
            milestones: Vec::new(),
            faults_fired: vec![false; sc.faults.len()],
            ops_fired: vec![false; sc.operator.len()],
            on_target: 0,
            complete_count: 0,
            staged_count: 0,
            hosts_total,
            caches_done: 0,
            finished: false,
            restarts_pending: 0,
            sampled: None,
            sc,
        }
    }

    fn host_ids(&self) -> std::ops::Range<u32> {
        let first = 1 + self.caches_of.iter().map(|c| c.len() as u32).sum::<u32>();
        first..self.nodes.len() as u32
    }

    /// Runs the scenario to its end and returns what happened, handing `observer` the progress
    /// at every sample.
    pub fn run(mut self, observer: &mut dyn FnMut(&RunProgress)) -> Outcome {
        // The origin serves what it stores from the start.
        let full = Bitfield::full(self.art.chunk_count());
        let seed = self.seed_of(0);
        match Scheduler::new(Duration::ZERO, self.art.table.clone(), &full, self.origin_cfg, seed) {
            Ok(s) => self.nodes[0].sched = Some(Box::new(s)),
            Err(_) => self.out.core_errors += 1,
        }
        for (i, f) in self.sc.faults.iter().enumerate() {
            if f.after.is_none() {
                self.q.at(nanos(f.at), Ev::Fault(i as u32));
            }
        }
        for (i, o) in self.sc.operator.iter().enumerate() {
            if o.after.is_none() {
                self.q.at(nanos(o.at), Ev::Operator(i as u32));
            }
        }
        self.q.at(0, Ev::Sample);
        self.start_rollout();
        let stop = nanos(self.sc.run.stop_after);
        while let Some((now, ev)) = self.q.pop() {
            if now > stop || self.finished {
                break;
            }
            self.handle(now, ev);
            if let Some(p) = self.sampled.take() {
                observer(&p);
            }
        }
        self.finish()
    }

    fn count(&mut self, ev: &Ev) {
        let t = &mut self.out.traffic;
        match ev {
            Ev::Tick => t.ticks += 1,
            Ev::FlowDone(_) => t.flows_done += 1,
            Ev::Piece { .. } => t.pieces += 1,
            Ev::Wire { msg: Wire::Request(id), .. } => {
                t.request_frames += 1;
                t.requested_chunks += self.batches[*id as usize].len() as u64;
            }
            Ev::Wire { msg: Wire::Reject(_, RejectReason::Busy), .. } => t.busy += 1,
            Ev::Wire { msg: Wire::Reject(_, RejectReason::SeededRecently), .. } => {
                t.seeded_recently += 1;
            }
            Ev::Wire { msg: Wire::Reject(..), .. } => t.other_rejects += 1,
            Ev::Wire { msg: Wire::Cancel(_), .. } => t.cancels += 1,
            Ev::Announce { .. } => t.announces += 1,
            Ev::Timer { .. } => t.timers += 1,
            _ => t.other += 1,
        }
    }

    fn seed_of(&self, node: u32) -> u64 {
        let inc = self.nodes.get(node as usize).map_or(0, |n| n.inc);
        let mut h = blake3::Hasher::new();
        h.update(&self.sc.seed.to_le_bytes());
        h.update(&node.to_le_bytes());
        h.update(&inc.to_le_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&h.finalize().as_bytes()[..8]);
        u64::from_le_bytes(b)
    }

    // -----------------------------------------------------------------------------------
    // The coordinator

    fn start_rollout(&mut self) {
        let now = self.q.now();
        let hosts = self.host_ids();
        if self.sc.rollout.strategy == StrategyKind::StageOnly {
            let want = Want { active: Rel::Previous, standby: Rel::None, stage: Rel::Target };
            for h in hosts {
                let inc = self.nodes[h as usize].inc;
                self.q.at(now + self.coord_latency(), Ev::Desired { host: h, inc, want });
            }
            return;
        }
        let spec = &self.sc.rollout;
        let gates = Gates { analysis: spec.analysis, approval: false };
        let strategy = match spec.strategy {
            StrategyKind::Canary => {
                let last = spec.steps.len().saturating_sub(1);
                Strategy::Canary {
                    steps: spec
                        .steps
                        .iter()
                        .enumerate()
                        .map(|(i, &p)| CanaryStep {
                            size: Limit::Percent(p),
                            gates: Gates { analysis: spec.analysis && i < last, approval: false },
                        })
                        .collect(),
                }
            }
            StrategyKind::Rolling => Strategy::Rolling { gates },
            StrategyKind::BlueGreen | StrategyKind::StageOnly => Strategy::BlueGreen { gates },
        };
        let specs: Vec<HostSpec> = hosts
            .map(|h| HostSpec {
                id: HostId(u64::from(h)),
                region: RegionIndex(self.nodes[h as usize].region),
                previous: Some(self.art.previous),
            })
            .collect();
        let mut plan = Plan::new(
            "sim",
            self.art.target,
            self.sc.regions.iter().map(|r| r.name.clone()).collect(),
            specs,
            strategy,
        );
        plan.budget = Budget {
            max_unavailable: Limit::Percent(spec.max_unavailable_percent),
            min_healthy: Limit::Count(0),
        };
        plan.health = HealthGate { max_failed: Limit::Percent(spec.max_failed_percent) };
        plan.bake = Bake {
            first_region: spec.bake_first_region,
            other_regions: spec.bake_other_regions,
            ..Bake::default()
        };
        plan.timeouts = Timeouts { stage: spec.stage_timeout, ..Timeouts::default() };
        plan.stage_ahead = StageAhead::All;
        plan.seed = self.sc.seed;
        match Rollout::new(duration(now), plan) {
            Ok(r) => self.rollout = Some(r),
            Err(_) => {
                self.out.core_errors += 1;
                return;
            }
        }
        self.drain_rollout();
    }

    fn coord_latency(&self) -> Time {
        nanos(self.sc.network.coordinator_latency)
    }

    fn drain_rollout(&mut self) {
        let now = self.q.now();
        let lat = self.coord_latency();
        loop {
            let Some(r) = self.rollout.as_mut() else { return };
            let Some(cmd) = r.poll_command() else { break };
            match cmd {
                RolloutCommand::SetDesired { desired, hosts } => {
                    let want = self.compact(desired);
                    for h in hosts {
                        let host = h.0 as u32;
                        let inc = self.nodes[host as usize].inc;
                        self.q.at(now + lat, Ev::Desired { host, inc, want });
                    }
                }
                RolloutCommand::EvaluateGate(req) => {
                    let at = now + nanos(self.sc.rollout.judge_delay);
                    self.q.at(at, Ev::Verdict { gate: req.gate.0, fail: self.sc.release.bad });
                }
                RolloutCommand::Notify(notice) => {
                    if matches!(notice, Notice::Done { .. }) {
                        self.milestone(Milestone::RolloutDone);
                    }
                    if matches!(notice, Notice::RollingBack { .. }) {
                        self.out.on_target_at_rollback.get_or_insert(self.on_target);
                    }
                    self.out.notices.push((now, notice));
                }
            }
        }
        let next = self.rollout.as_ref().and_then(|r| r.poll_timeout()).map(nanos);
        let next = next.unwrap_or(NONE);
        if next != self.rollout_timer.0 {
            self.rollout_timer.1 += 1;
            self.rollout_timer.0 = next;
            if next != NONE {
                self.q.at(next, Ev::RolloutTimer { generation: self.rollout_timer.1 });
            }
        }
    }

    fn compact(&self, d: Desired) -> Want {
        let rel = |m: Option<ManifestId>| match m {
            None => Rel::None,
            Some(m) if m == self.art.target => Rel::Target,
            Some(_) => Rel::Previous,
        };
        Want { active: rel(d.active), standby: rel(d.standby), stage: rel(d.stage) }
    }

    fn report(&mut self, host: u32, rep: Rep) {
        if self.rollout.is_none() {
            return;
        }
        let inc = self.nodes[host as usize].inc;
        self.q.after(self.coord_latency(), Ev::Report { host, inc, rep });
    }

    fn on_report(&mut self, now: Time, host: u32, inc: u32, rep: Rep) {
        if matches!(rep, Rep::Lost) && self.nodes[host as usize].inc != inc {
            // It came back before its heartbeats were missed.
            return;
        }
        let manifest = |rel: Rel, art: &Artifact| match rel {
            Rel::Target => art.target,
            _ => art.previous,
        };
        let event = match rep {
            Rep::Staged => HostEvent::Staged { manifest: self.art.target },
            Rep::StageFailed => HostEvent::StageFailed { manifest: self.art.target },
            Rep::Started => HostEvent::Started { manifest: self.art.target },
            Rep::Active(Rel::None) => HostEvent::Inactive,
            Rep::Active(rel) => HostEvent::Active { manifest: manifest(rel, &self.art) },
            Rep::Health { rel, healthy } => {
                HostEvent::Health { manifest: manifest(rel, &self.art), healthy }
            }
            Rep::Lost => HostEvent::Lost,
        };
        let Some(r) = self.rollout.as_mut() else { return };
        if r.handle_host(duration(now), HostId(u64::from(host)), event).is_err() {
            self.out.core_errors += 1;
        }
        self.drain_rollout();
    }

    // -----------------------------------------------------------------------------------
    // Events

    fn handle(&mut self, now: Time, ev: Ev) {
        self.count(&ev);
        match ev {
            Ev::Tick => {
                if self.net.slot_end() == Some(now) {
                    let mut finishes = Vec::new();
                    if self.net.tick(now, &mut finishes) {
                        if let Some(end) = self.net.slot_end() {
                            self.q.at(end, Ev::Tick);
                        }
                    }
                    for f in finishes {
                        self.q.at(f.at, Ev::FlowDone(f.flow));
                    }
                }
            }
            Ev::FlowDone(id) => self.flow_done(now, id),
            Ev::Started { from, to, inc, index } => {
                if self.live(to, inc) && self.connected(to, from) {
                    if let Some(s) = self.nodes[to as usize].sched.as_mut() {
                        if s.handle_piece_started(duration(now), PeerId(u64::from(from)), index)
                            .is_err()
                        {
                            self.out.core_errors += 1;
                        }
                    }
                    self.drain(to);
                }
            }
            Ev::Piece { from, to, inc, index, corrupt } => {
                if self.live(to, inc) {
                    self.piece(now, from, to, index, corrupt);
                }
            }
            Ev::Wire { from, to, inc, msg } => {
                if self.live(to, inc) {
                    self.wire(now, from, to, msg);
                } else if let Wire::Request(id) = msg {
                    // Lost with its receiver: free the frame's entry.
                    let chunks = std::mem::take(&mut self.batches[id as usize]);
                    self.unbatch(id, chunks);
                }
            }
            Ev::Announce { from, inc, index, list } => self.announce(now, from, inc, index, list),
            Ev::Timer { node, generation } => {
                let n = &self.nodes[node as usize];
                if n.alive && n.timer_gen == generation {
                    self.nodes[node as usize].timer_at = NONE;
                    if let Some(s) = self.nodes[node as usize].sched.as_mut() {
                        s.handle_timeout(duration(now));
                    }
                    self.drain(node);
                }
            }
            Ev::Sync { node, inc } => {
                if self.live(node, inc) {
                    self.sync(now, node);
                }
            }
            Ev::SourceRound { node, inc } => {
                if self.live(node, inc) {
                    self.source_round(node);
                }
            }
            Ev::PeerRound { node, inc } => {
                if self.live(node, inc) {
                    self.peer_round(node);
                }
            }
            Ev::DiscoverReply { node, inc } => {
                if self.live(node, inc) {
                    self.discovered(node);
                }
            }
            Ev::DialTimeout { node, inc, peer } => {
                if self.live(node, inc) {
                    self.dial_failed(node, peer, true);
                }
            }
            Ev::Verified { node, inc } => {
                if self.live(node, inc) {
                    self.verified(now, node);
                }
            }
            Ev::ActionDone { node, generation } => self.action_done(node, generation),
            Ev::Report { host, inc, rep } => self.on_report(now, host, inc, rep),
            Ev::Desired { host, inc, want } => {
                if self.live(host, inc) {
                    self.nodes[host as usize].want = want;
                    self.reconcile(host);
                }
            }
            Ev::RolloutTimer { generation } => {
                if generation == self.rollout_timer.1 {
                    self.rollout_timer.0 = NONE;
                    if let Some(r) = self.rollout.as_mut() {
                        r.handle_timeout(duration(now));
                    }
                    self.drain_rollout();
                }
            }
            Ev::Verdict { gate, fail } => {
                let verdict = if fail { Verdict::Fail } else { Verdict::Pass };
                if let Some(r) = self.rollout.as_mut() {
                    // A verdict on a gate that closed meanwhile (promoted, rolled back) is stale.
                    let _ = r.handle_verdict(duration(now), GateId(gate), verdict);
                }
                self.drain_rollout();
            }
            Ev::Fault(i) => {
                self.faults_fired[i as usize] = true;
                self.fault(now, i as usize);
            }
            Ev::Operator(i) => {
                self.ops_fired[i as usize] = true;
                let cmd = match self.sc.operator[i as usize].command {
                    OperatorCommand::Pause => Operator::Pause,
                    OperatorCommand::Resume => Operator::Resume,
                    OperatorCommand::Promote => Operator::Promote,
                    OperatorCommand::Rollback => Operator::Rollback,
                    OperatorCommand::Abort => Operator::Abort,
                };
                if let Some(r) = self.rollout.as_mut() {
                    if r.handle_operator(duration(now), cmd).is_err() {
                        self.out.core_errors += 1;
                    }
                }
                self.drain_rollout();
            }
            Ev::Restart(node) => {
                self.restarts_pending = self.restarts_pending.saturating_sub(1);
                self.restart(now, node);
            }
            Ev::Sample => self.sample(now),
        }
    }

    fn live(&self, node: u32, inc: u32) -> bool {
        let n = &self.nodes[node as usize];
        n.alive && n.inc == inc
    }

    fn latency(&self, a: u32, b: u32) -> Time {
        let (na, nb) = (&self.nodes[a as usize], &self.nodes[b as usize]);
        let wan = |r: u16| nanos(self.sc.regions[usize::from(r)].wan_latency);
        match (na.role, nb.role) {
            (Role::Origin, _) => wan(nb.region),
            (_, Role::Origin) => wan(na.region),
            _ if na.region == nb.region => nanos(self.sc.regions[usize::from(na.region)].latency),
            _ => wan(na.region) + wan(nb.region),
        }
    }

    fn send(&mut self, from: u32, to: u32, msg: Wire) {
        let lat = self.latency(from, to);
        let inc = self.nodes[to as usize].inc;
        self.q.after(lat, Ev::Wire { from, to, inc, msg });
    }

    fn kind_of(&self, peer: u32) -> PeerKind {
        match self.nodes[peer as usize].role {
            Role::Origin => PeerKind::Origin,
            Role::Cache => PeerKind::Cache,
            Role::Host => PeerKind::Peer,
        }
    }

    fn connected(&self, a: u32, b: u32) -> bool {
        self.nodes[a as usize].conns.binary_search(&b).is_ok()
    }

    fn add_conn(&mut self, a: u32, b: u32) -> bool {
        let role_b = self.nodes[b as usize].role;
        let n = &mut self.nodes[a as usize];
        match n.conns.binary_search(&b) {
            Ok(_) => false,
            Err(at) => {
                n.conns.insert(at, b);
                if role_b == Role::Host {
                    n.host_conns += 1;
                }
                true
            }
        }
    }

    fn remove_conn(&mut self, a: u32, b: u32) -> bool {
        let role_b = self.nodes[b as usize].role;
        let n = &mut self.nodes[a as usize];
        match n.conns.binary_search(&b) {
            Ok(at) => {
                n.conns.remove(at);
                if role_b == Role::Host {
                    n.host_conns -= 1;
                }
                true
            }
            Err(_) => false,
        }
    }

    fn store_bits(&mut self, node: u32) -> u32 {
        let bits = match self.nodes[node as usize].sched.as_ref() {
            Some(s) => s.bitfield().clone(),
            None => Bitfield::new(self.art.chunk_count()),
        };
        match self.free_bitfields.pop() {
            Some(i) => {
                self.bitfields[i as usize] = Some(bits);
                i
            }
            None => {
                self.bitfields.push(Some(bits));
                (self.bitfields.len() - 1) as u32
            }
        }
    }

    fn take_bits(&mut self, id: u32) -> Option<Bitfield> {
        let b = self.bitfields.get_mut(id as usize)?.take();
        if b.is_some() {
            self.free_bitfields.push(id);
        }
        b
    }

    // -----------------------------------------------------------------------------------
    // Schedulers

    /// Carries out every command `node`'s scheduler has, then re-arms its timer.
    fn drain(&mut self, node: u32) {
        while let Some(cmd) =
            self.nodes[node as usize].sched.as_mut().and_then(|s| s.poll_command())
        {
            self.execute(node, cmd);
        }
        let next = self.nodes[node as usize]
            .sched
            .as_ref()
            .and_then(|s| s.poll_timeout())
            .map_or(NONE, nanos);
        let n = &mut self.nodes[node as usize];
        if next != n.timer_at {
            n.timer_gen = n.timer_gen.wrapping_add(1);
            n.timer_at = next;
            if next != NONE {
                let generation = n.timer_gen;
                self.q.at(next, Ev::Timer { node, generation });
            }
        }
    }

    fn execute(&mut self, node: u32, cmd: Command) {
        let now = self.q.now();
        match cmd {
            Command::Request { peer, chunks } => {
                let id = self.batch(chunks);
                self.send(node, peer.0 as u32, Wire::Request(id));
            }
            Command::Cancel { peer, index } => self.send(node, peer.0 as u32, Wire::Cancel(index)),
            Command::Reject { peer, index, reason } => {
                self.send(node, peer.0 as u32, Wire::Reject(index, reason));
            }
            Command::Announce { index, peers } => {
                if peers.is_empty() {
                    return;
                }
                let lat = match self.nodes[node as usize].role {
                    Role::Origin => 0,
                    _ => nanos(
                        self.sc.regions[usize::from(self.nodes[node as usize].region)].latency,
                    ),
                };
                let inc = self.nodes[node as usize].inc;
                let list = self.batch(peers.iter().map(|p| p.0 as u32));
                self.q.after(lat, Ev::Announce { from: node, inc, index, list });
            }
            Command::Serve { peer, index } => self.serve(now, node, peer.0 as u32, index),
            Command::Ban { peer, .. } => {
                let p = peer.0 as u32;
                // The scheduler forgot the peer already; close the connection on both ends.
                if self.remove_conn(node, p) {
                    self.abort_flows_between(now, node, p);
                    self.send(node, p, Wire::Disconnect);
                }
            }
            Command::RequestOriginPermit => {
                let cap = self.sc.swarm.origin_permits;
                let t = duration(now);
                if cap == 0 || self.permits_in_use < cap {
                    self.permits_in_use += u32::from(cap > 0);
                    self.nodes[node as usize].holds_permit = cap > 0;
                    self.out.permits.0 += 1;
                    if let Some(s) = self.nodes[node as usize].sched.as_mut() {
                        s.handle_permit_granted(t);
                    }
                } else {
                    self.out.permits.1 += 1;
                    if let Some(s) = self.nodes[node as usize].sched.as_mut() {
                        s.handle_permit_denied(t);
                    }
                }
            }
            Command::ReleaseOriginPermit => {
                let n = &mut self.nodes[node as usize];
                if n.holds_permit {
                    n.holds_permit = false;
                    self.permits_in_use -= 1;
                }
            }
            Command::Withdraw { index } => self.withdraw(now, node, index),
            Command::Complete => self.complete(now, node),
        }
    }

    /// Whether `node` has a verified copy of chunk `index` to finish an upload from: sources
    /// always (a cache pulls through), hosts once it is verified (written or being written).
    fn has_copy(&self, node: u32, index: u32) -> bool {
        let n = &self.nodes[node as usize];
        n.role != Role::Host || n.sched.as_ref().is_none_or(|s| s.has_copy(index))
    }

    /// `node`'s arriving copy of chunk `index` failed: the uploads passing it on are reset
    /// (their receivers see the chunk refused, `NotHave`) and their slots freed.
    fn withdraw(&mut self, now: Time, node: u32, index: u32) {
        let mut receivers = self.waiting.remove(&(node, index)).unwrap_or_default();
        let (up, down) = (self.nodes[node as usize].up, self.nodes[node as usize].down);
        for id in self.net.flows_of(up, down) {
            if self.net.payload(id).is_some_and(|p| p.from == node && p.index == index) {
                if let Some((p, sent)) = self.net.remove(now, id) {
                    self.count_egress(now, p.from, p.to, sent);
                    receivers.push(p.to);
                }
            }
        }
        for to in receivers {
            if let Some(s) = self.nodes[node as usize].sched.as_mut() {
                let _ = s.handle_upload_done(duration(now), PeerId(u64::from(to)), index);
            }
            self.send(node, to, Wire::Reject(index, RejectReason::NotHave));
        }
        self.drain(node);
    }

    /// Keeps `items` (a Request frame's chunks, a have broadcast's receivers) in `batches`
    /// until its event is delivered; [`unbatch`](Self::unbatch) frees the entry.
    fn batch(&mut self, items: impl IntoIterator<Item = u32>) -> u32 {
        match self.free_batches.pop() {
            Some(id) => {
                self.batches[id as usize].extend(items);
                id
            }
            None => {
                self.batches.push(items.into_iter().collect());
                (self.batches.len() - 1) as u32
            }
        }
    }

    /// Frees a `batches` entry, keeping its memory for the next one.
    fn unbatch(&mut self, id: u32, mut items: Vec<u32>) {
        items.clear();
        self.batches[id as usize] = items;
        self.free_batches.push(id);
    }

    fn serve(&mut self, now: Time, node: u32, to: u32, index: u32) {
        if !self.connected(node, to) || !self.nodes[to as usize].alive {
            if let Some(s) = self.nodes[node as usize].sched.as_mut() {
                let _ = s.handle_upload_done(duration(now), PeerId(u64::from(to)), index);
            }
            return;
        }
        let bytes = self.art.table.length(index);
        let wan = if self.nodes[node as usize].role == Role::Origin {
            self.region_wan[usize::from(self.nodes[to as usize].region)]
        } else {
            NO_LINK
        };
        let (up, down) = (self.nodes[node as usize].up, self.nodes[to as usize].down);
        if self.sc.swarm.forward_arriving && self.nodes[to as usize].role == Role::Host {
            let inc = self.nodes[to as usize].inc;
            let lat = self.latency(node, to);
            self.q.after(lat, Ev::Started { from: node, to, inc, index });
        }
        let payload = Payload { from: node, to, index, bytes };
        let (_, new_slot, finish) = self.net.start(now, up, down, wan, payload);
        if new_slot {
            if let Some(end) = self.net.slot_end() {
                self.q.at(end, Ev::Tick);
            }
        }
        if let Some(f) = finish {
            self.q.at(f.at, Ev::FlowDone(f.flow));
        }
    }

    fn count_egress(&mut self, now: Time, from: u32, to: u32, bytes: u64) {
        let b = (now / self.bucket) as usize;
        match self.nodes[from as usize].role {
            Role::Origin => {
                let r = self.nodes[to as usize].region;
                if let Some(v) = self.out.origin_to_region.get_mut(usize::from(r)) {
                    *v += bytes;
                }
                grow(&mut self.out.series.origin, b)[b] += bytes;
            }
            Role::Cache => {
                let r = usize::from(self.nodes[from as usize].region);
                self.out.cache_egress[r] += bytes;
                grow(&mut self.out.series.cache[r], b)[b] += bytes;
            }
            Role::Host => {}
        }
    }

    fn flow_done(&mut self, now: Time, id: FlowId) {
        let Some((p, sent)) = self.net.remove(now, id) else { return };
        self.count_egress(now, p.from, p.to, sent);
        if self.nodes[p.from as usize].alive && !self.has_copy(p.from, p.index) {
            // Passed on while arriving: it ends when the sender's own copy is verified.
            self.waiting.entry((p.from, p.index)).or_default().push(p.to);
            return;
        }
        self.upload_finished(now, p.from, p.to, p.index);
    }

    /// The upload of chunk `index` from `from` to `to` is over: the sender's slot is free,
    /// the piece reaches the receiver a latency later.
    fn upload_finished(&mut self, now: Time, from: u32, to: u32, index: u32) {
        if self.nodes[from as usize].alive {
            if let Some(s) = self.nodes[from as usize].sched.as_mut() {
                let _ = s.handle_upload_done(duration(now), PeerId(u64::from(to)), index);
            }
            self.drain(from);
        }
        if self.nodes[to as usize].alive {
            let lat = self.latency(from, to);
            let corrupt = self.nodes[from as usize].corrupt;
            let inc = self.nodes[to as usize].inc;
            self.q.after(lat, Ev::Piece { from, to, inc, index, corrupt });
        }
    }

    fn abort_flows_between(&mut self, now: Time, a: u32, b: u32) {
        let (up, down) = (self.nodes[a as usize].up, self.nodes[a as usize].down);
        for id in self.net.flows_of(up, down) {
            if let Some(p) = self.net.payload(id) {
                if (p.from == a && p.to == b) || (p.from == b && p.to == a) {
                    if let Some((p, sent)) = self.net.remove(now, id) {
                        self.count_egress(now, p.from, p.to, sent);
                    }
                }
            }
        }
    }

    fn piece(&mut self, now: Time, from: u32, to: u32, index: u32, corrupt: bool) {
        if !self.connected(to, from) {
            return;
        }
        // The daemon's check: the bytes' BLAKE3 against the manifest's chunk hash.
        let got = if corrupt { self.art.corrupt_hash(index) } else { self.art.hash(index) };
        let outcome = if got == self.art.hash(index) {
            PieceOutcome::Verified
        } else {
            PieceOutcome::HashMismatch
        };
        let Some(s) = self.nodes[to as usize].sched.as_mut() else { return };
        match s.handle_piece(duration(now), PeerId(u64::from(from)), index, outcome) {
            Ok(PieceAction::Write) => {
                // The uploads that passed the copy on while it arrived finish now.
                for d in self.waiting.remove(&(to, index)).unwrap_or_default() {
                    self.upload_finished(now, to, d, index);
                }
                let len = u64::from(self.art.table.length(index));
                let n = &mut self.nodes[to as usize];
                n.pending.push(index);
                n.pending_bytes += len;
                if n.pending_bytes >= self.sc.swarm.sync_bytes {
                    self.sync(now, to);
                } else if !n.sync_armed {
                    n.sync_armed = true;
                    let inc = n.inc;
                    self.q.after(nanos(self.sc.swarm.sync_every), Ev::Sync { node: to, inc });
                }
            }
            Ok(PieceAction::Discard) => {}
            Err(_) => self.out.core_errors += 1,
        }
        self.drain(to);
    }

    fn sync(&mut self, now: Time, node: u32) {
        let pending = std::mem::take(&mut self.nodes[node as usize].pending);
        let n = &mut self.nodes[node as usize];
        n.pending_bytes = 0;
        n.sync_armed = false;
        for index in pending {
            let d = digest_of(&self.art.hash(index));
            let n = &mut self.nodes[node as usize];
            if let Some(s) = n.sched.as_mut() {
                if s.handle_written(duration(now), index).is_ok() {
                    n.digest ^= d;
                } else {
                    self.out.core_errors += 1;
                }
            }
        }
        self.drain(node);
    }

    /// `Ev::Announce`: the Haves of chunk `index` to the peers in `batches` under `list`.
    fn announce(&mut self, now: Time, from: u32, inc: u32, index: u32, list: u32) {
        let peers = std::mem::take(&mut self.batches[list as usize]);
        if self.nodes[from as usize].inc == inc {
            self.deliver_haves(now, from, index, &peers);
        }
        self.unbatch(list, peers);
    }

    /// One have broadcast: the Haves a daemon sends to several peers at one instant arrive
    /// together (same latency), so one event hands them all to their schedulers.
    fn deliver_haves(&mut self, now: Time, from: u32, index: u32, peers: &[u32]) {
        let t = duration(now);
        let peer = PeerId(u64::from(from));
        for &p in peers {
            if !self.connected(from, p) {
                continue;
            }
            let n = &mut self.nodes[p as usize];
            if !n.alive || n.conns.binary_search(&from).is_err() {
                continue;
            }
            let Some(s) = n.sched.as_mut() else { continue };
            if s.is_complete() {
                // What the scheduler would do with it: nothing (it answers Ok at once).
                continue;
            }
            self.out.traffic.haves_delivered += 1;
            if s.handle_have(t, peer, index).is_err() {
                self.out.core_errors += 1;
            }
            self.drain(p);
        }
    }

    fn complete(&mut self, now: Time, node: u32) {
        match self.nodes[node as usize].role {
            Role::Host => {
                if self.nodes[node as usize].stage != Stage::Staging {
                    return;
                }
                let idx = self.host_index(node);
                if self.out.hosts[idx].complete.is_none() {
                    self.out.hosts[idx].complete = Some(now);
                    self.complete_count += 1;
                }
                // A host with everything needs nothing from its sources.
                let sources: Vec<u32> = self.nodes[node as usize]
                    .conns
                    .iter()
                    .copied()
                    .filter(|&p| self.nodes[p as usize].role != Role::Host)
                    .collect();
                for p in sources {
                    self.close(now, node, p);
                }
                self.nodes[node as usize].src = Src::Done;
                self.nodes[node as usize].stage = Stage::Verifying;
                let verify = self.art.size() as f64 / self.sc.node.verify_rate.bytes_per_sec();
                let inc = self.nodes[node as usize].inc;
                self.q.after((verify * 1e9) as Time, Ev::Verified { node, inc });
            }
            Role::Cache => {
                let c = self.cache_index(node);
                if self.out.caches[c].1.is_none() {
                    self.out.caches[c].1 = Some(now);
                    self.caches_done += 1;
                    let live = self
                        .caches_of
                        .iter()
                        .flatten()
                        .filter(|&&c| self.nodes[c as usize].alive)
                        .count();
                    if self.caches_done as usize >= live {
                        self.milestone(Milestone::CachesComplete);
                    }
                }
            }
            Role::Origin => {}
        }
    }

    fn host_index(&self, node: u32) -> usize {
        (node - self.host_ids().start) as usize
    }

    fn cache_index(&self, node: u32) -> usize {
        (node - 1) as usize
    }

    /// Closes the connection `a`-`b` from `a`'s side: `a`'s scheduler forgets `b` now, `b`'s
    /// when the close reaches it.
    fn close(&mut self, now: Time, a: u32, b: u32) {
        if !self.remove_conn(a, b) {
            return;
        }
        self.abort_flows_between(now, a, b);
        if let Some(s) = self.nodes[a as usize].sched.as_mut() {
            let _ = s.handle_disconnected(duration(now), PeerId(u64::from(b)));
        }
        self.send(a, b, Wire::Disconnect);
        self.after_disconnect(a, b);
    }

    fn after_disconnect(&mut self, a: u32, b: u32) {
        let now = duration(self.q.now());
        let n = &mut self.nodes[a as usize];
        if let Src::Connected { k, peer } = n.src {
            if peer == b {
                // Closed at once counts as a refusal, as in the daemon.
                n.ups.handle_lost(k as usize, now);
                n.src = Src::Idle;
                let inc = n.inc;
                self.q.after(SOURCE_RETRY, Ev::SourceRound { node: a, inc });
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Wire

    fn wire(&mut self, now: Time, from: u32, to: u32, msg: Wire) {
        let t = duration(now);
        let peer = PeerId(u64::from(from));
        match msg {
            Wire::Connect => self.accept(now, from, to),
            Wire::Accept(bits) => {
                let bits = self.take_bits(bits);
                self.nodes[to as usize].dialing.retain(|&p| p != from);
                let staging = self.nodes[to as usize].sched.is_some();
                if !staging {
                    self.send(to, from, Wire::Disconnect);
                    return;
                }
                if self.add_conn(to, from) {
                    let kind = self.kind_of(from);
                    let ok = self.nodes[to as usize]
                        .sched
                        .as_mut()
                        .map(|s| s.handle_connected(t, peer, kind));
                    if !matches!(ok, Some(Ok(()))) {
                        self.remove_conn(to, from);
                        self.send(to, from, Wire::Disconnect);
                        self.dial_failed(to, from, false);
                        return;
                    }
                    let mine = self.store_bits(to);
                    self.send(to, from, Wire::Bitfield(mine));
                }
                if let Src::Trying { k, peer: p } = self.nodes[to as usize].src {
                    if p == from {
                        let n = &mut self.nodes[to as usize];
                        n.src = Src::Connected { k, peer: from };
                        n.ups.handle_connected(k as usize, t);
                    }
                }
                if let Some(bits) = bits {
                    if let Some(s) = self.nodes[to as usize].sched.as_mut() {
                        if s.handle_bitfield(t, peer, bits).is_err() {
                            self.out.core_errors += 1;
                        }
                    }
                }
                self.drain(to);
            }
            Wire::Refuse => self.dial_failed(to, from, false),
            Wire::Bitfield(bits) => {
                let bits = self.take_bits(bits);
                if !self.connected(to, from) {
                    return;
                }
                if let (Some(bits), Some(s)) = (bits, self.nodes[to as usize].sched.as_mut()) {
                    if s.handle_bitfield(t, peer, bits).is_err() {
                        self.out.core_errors += 1;
                    }
                }
                self.drain(to);
            }
            Wire::Request(id) => {
                let chunks = std::mem::take(&mut self.batches[id as usize]);
                if self.connected(to, from) {
                    if let Some(s) = self.nodes[to as usize].sched.as_mut() {
                        for &index in &chunks {
                            if s.handle_request(t, peer, index).is_err() {
                                self.out.core_errors += 1;
                            }
                        }
                    }
                    self.drain(to);
                }
                self.unbatch(id, chunks);
            }
            Wire::Cancel(index) => {
                if !self.connected(to, from) {
                    return;
                }
                if let Some(s) = self.nodes[to as usize].sched.as_mut() {
                    let _ = s.handle_cancel(t, peer, index);
                }
                self.drain(to);
            }
            Wire::Reject(index, reason) => {
                if !self.connected(to, from) {
                    return;
                }
                if let Some(s) = self.nodes[to as usize].sched.as_mut() {
                    // A rejection crossing our own cancel is not an error.
                    let _ = s.handle_rejected(t, peer, index, reason);
                }
                self.drain(to);
            }
            Wire::Disconnect => {
                if self.remove_conn(to, from) {
                    self.abort_flows_between(now, to, from);
                    if let Some(s) = self.nodes[to as usize].sched.as_mut() {
                        let _ = s.handle_disconnected(t, peer);
                    }
                    self.after_disconnect(to, from);
                    self.drain(to);
                }
            }
            Wire::Register => {
                // `to` is the rendezvous point of `from`'s region.
                let r = usize::from(self.nodes[from as usize].region);
                self.registry[r].push(from);
            }
        }
    }

    fn accept(&mut self, now: Time, from: u32, to: u32) {
        let t = duration(now);
        let role = self.nodes[to as usize].role;
        let from_role = self.nodes[from as usize].role;
        // The transfer for the manifest: the origin serves what it stores, a cache pulls it
        // through, a host serves only what it is staging or has staged.
        if role == Role::Cache && self.nodes[to as usize].sched.is_none() {
            let local = Bitfield::new(self.art.chunk_count());
            let seed = self.seed_of(to);
            match Scheduler::new(t, self.art.table.clone(), &local, self.cache_cfg, seed) {
                Ok(s) => {
                    self.nodes[to as usize].sched = Some(Box::new(s));
                    self.nodes[to as usize].stage = Stage::Staging;
                    let inc = self.nodes[to as usize].inc;
                    self.q.after(0, Ev::SourceRound { node: to, inc });
                }
                Err(_) => self.out.core_errors += 1,
            }
        }
        if self.nodes[to as usize].sched.is_none() {
            self.send(to, from, Wire::Refuse);
            return;
        }
        if role == Role::Origin
            && from_role == Role::Host
            && !self.connected(to, from)
            && self.nodes[to as usize].host_conns as usize >= self.sc.swarm.origin_max_hosts
        {
            self.send(to, from, Wire::Refuse);
            return;
        }
        if self.add_conn(to, from) {
            let kind = self.kind_of(from);
            let peer = PeerId(u64::from(from));
            let ok =
                self.nodes[to as usize].sched.as_mut().map(|s| s.handle_connected(t, peer, kind));
            if !matches!(ok, Some(Ok(()))) {
                self.remove_conn(to, from);
                self.send(to, from, Wire::Refuse);
                self.drain(to);
                return;
            }
        }
        let bits = self.store_bits(to);
        self.send(to, from, Wire::Accept(bits));
        self.drain(to);
    }

    fn dial(&mut self, a: u32, b: u32) {
        if a == b || self.connected(a, b) || self.nodes[a as usize].dialing.contains(&b) {
            return;
        }
        self.nodes[a as usize].dialing.push(b);
        self.send(a, b, Wire::Connect);
        let inc = self.nodes[a as usize].inc;
        let t = nanos(self.sc.node.dial_timeout);
        self.q.after(t, Ev::DialTimeout { node: a, inc, peer: b });
    }

    /// A dial from `a` to `b` failed: refused, or (`timeout`) no answer.
    fn dial_failed(&mut self, a: u32, b: u32, timeout: bool) {
        let n = &mut self.nodes[a as usize];
        let was = n.dialing.len();
        n.dialing.retain(|&p| p != b);
        if timeout && n.dialing.len() == was {
            return;
        }
        if let Src::Trying { k, peer } = n.src {
            if peer == b {
                // Unreachable or refused, the daemon backs the source off and goes on to the
                // next one in the same round (`Upstreams`).
                let now = duration(self.q.now());
                if timeout {
                    n.ups.handle_unreachable(k as usize, now);
                } else {
                    n.ups.handle_refused(k as usize, now);
                }
                self.try_source(a, k + 1);
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Sources and peers

    fn sources_of(&self, node: u32) -> Vec<u32> {
        let n = &self.nodes[node as usize];
        match n.role {
            Role::Host => {
                let mut v = self.caches_of[usize::from(n.region)].clone();
                v.push(0);
                v
            }
            Role::Cache => vec![0],
            Role::Origin => Vec::new(),
        }
    }

    fn source_round(&mut self, node: u32) {
        let n = &self.nodes[node as usize];
        let incomplete = n.sched.as_ref().is_some_and(|s| !s.is_complete());
        if !incomplete || matches!(n.src, Src::Trying { .. } | Src::Done) {
            return;
        }
        if let Src::Connected { peer, .. } = n.src {
            if self.connected(node, peer) {
                return;
            }
        }
        self.try_source(node, 0);
    }

    /// Dials the first source at or after `from` that is not backed off; when there is none,
    /// tries again when the first back-off ends (at the earliest in a round).
    fn try_source(&mut self, node: u32, from: u32) {
        let now = self.q.now();
        let sources = self.sources_of(node);
        let n = &mut self.nodes[node as usize];
        if n.ups.len() != sources.len() {
            n.ups = Upstreams::new(sources.len(), UpstreamBackoff::default());
        }
        let Some(k) = n.ups.next(duration(now), from as usize) else {
            n.src = Src::Idle;
            let inc = n.inc;
            let retry = n.ups.next_retry().map_or(0, nanos).saturating_sub(now);
            self.q.after(retry.max(SOURCE_RETRY), Ev::SourceRound { node, inc });
            return;
        };
        let (k, peer) = (k as u32, sources[k]);
        self.nodes[node as usize].src = Src::Trying { k, peer };
        self.dial(node, peer);
        if self.connected(node, peer) {
            let n = &mut self.nodes[node as usize];
            n.src = Src::Connected { k, peer };
            n.ups.handle_connected(k as usize, duration(now));
        }
    }

    fn rendezvous_delay(&self, node: u32) -> Time {
        let r = usize::from(self.nodes[node as usize].region);
        let lat = nanos(self.sc.regions[r].latency);
        let cache_up = self.caches_of[r].iter().any(|&c| self.nodes[c as usize].alive);
        if cache_up { 2 * lat } else { nanos(self.sc.node.dht_latency) + 2 * lat }
    }

    fn peer_round(&mut self, node: u32) {
        let n = &mut self.nodes[node as usize];
        n.peer_round_armed = false;
        let incomplete = n.sched.as_ref().is_some_and(|s| !s.is_complete());
        if !incomplete || n.role != Role::Host {
            return;
        }
        let inc = n.inc;
        if (n.host_conns as usize) < self.sc.swarm.max_peers {
            let d = self.rendezvous_delay(node);
            self.q.after(d, Ev::DiscoverReply { node, inc });
        }
        self.nodes[node as usize].peer_round_armed = true;
        self.q.after(nanos(self.sc.swarm.discover_every), Ev::PeerRound { node, inc });
    }

    fn discovered(&mut self, node: u32) {
        let n = &self.nodes[node as usize];
        if n.sched.as_ref().is_none_or(|s| s.is_complete()) {
            return;
        }
        let want = self.sc.swarm.max_peers.saturating_sub(n.host_conns as usize);
        let r = usize::from(n.region);
        let registered = self.registry[r].len();
        if want == 0 || registered == 0 {
            return;
        }
        // A bounded random set of the region's registered hosts.
        let mut picked: Vec<u32> = Vec::with_capacity(want);
        let mut tries = 0;
        while picked.len() < want && tries < want * 4 + 8 {
            tries += 1;
            let p = self.registry[r][self.rng.gen_range(0..registered)];
            let n = &self.nodes[node as usize];
            if p == node || picked.contains(&p) || n.dialing.contains(&p) || self.connected(node, p)
            {
                continue;
            }
            picked.push(p);
        }
        for p in picked {
            self.dial(node, p);
        }
    }

    // -----------------------------------------------------------------------------------
    // Hosts: staging, activation

    fn start_staging(&mut self, now: Time, node: u32) {
        let t = duration(now);
        let n = &mut self.nodes[node as usize];
        if n.sched.is_some() || matches!(n.stage, Stage::Staged | Stage::Verifying) {
            return;
        }
        let local = n.resume.take().unwrap_or_else(|| Bitfield::new(self.art.chunk_count()));
        let seed = self.seed_of(node);
        match Scheduler::new(t, self.art.table.clone(), &local, self.host_cfg, seed) {
            Ok(s) => self.nodes[node as usize].sched = Some(Box::new(s)),
            Err(_) => {
                self.out.core_errors += 1;
                return;
            }
        }
        let n = &mut self.nodes[node as usize];
        n.stage = Stage::Staging;
        n.src = Src::Idle;
        n.ups = Upstreams::new(0, UpstreamBackoff::default());
        let inc = n.inc;
        let r = usize::from(n.region);
        // Register at the rendezvous (the first live cache; the DHT otherwise), then discover.
        let point = self.caches_of[r].iter().copied().find(|&c| self.nodes[c as usize].alive);
        match point {
            Some(c) => self.send(node, c, Wire::Register),
            None => self.registry[r].push(node),
        }
        self.q.after(0, Ev::SourceRound { node, inc });
        let d = self.rendezvous_delay(node);
        self.nodes[node as usize].peer_round_armed = true;
        self.q.after(d, Ev::PeerRound { node, inc });
        self.drain(node);
    }

    fn verified(&mut self, now: Time, node: u32) {
        let ok = self.nodes[node as usize].digest == self.expected_digest;
        let idx = self.host_index(node);
        self.out.hosts[idx].verified = ok;
        if ok {
            self.nodes[node as usize].stage = Stage::Staged;
            if self.out.hosts[idx].staged.is_none() {
                self.out.hosts[idx].staged = Some(now);
                self.staged_count += 1;
            }
            if self.staged_count * 2 >= self.hosts_total {
                self.milestone(Milestone::HalfStaged);
            }
            self.report(node, Rep::Staged);
        } else {
            self.nodes[node as usize].stage = Stage::Failed;
            self.report(node, Rep::StageFailed);
        }
        self.reconcile(node);
    }

    /// The host's shell applies its desired state (what the daemon's reconcile loop does).
    fn reconcile(&mut self, node: u32) {
        let now = self.q.now();
        let n = &self.nodes[node as usize];
        let w = n.want;
        let needs_target =
            w.stage == Rel::Target || w.active == Rel::Target || w.standby == Rel::Target;
        if needs_target && n.stage == Stage::Idle {
            self.start_staging(now, node);
        }
        let n = &self.nodes[node as usize];
        let staged = n.stage == Stage::Staged;
        let goal = if w.active == Rel::Target && n.running != Rel::Target && staged {
            Some(Goal::ActivateTarget)
        } else if w.active == Rel::Previous && n.running != Rel::Previous {
            Some(Goal::SwitchBack)
        } else if w.standby == Rel::Target && !n.standby_up && staged && n.running != Rel::Target {
            Some(Goal::Standby)
        } else {
            None
        };
        let drop_standby = w.standby == Rel::None && n.standby_up && n.running != Rel::Target;
        if drop_standby {
            self.nodes[node as usize].standby_up = false;
        }
        let n = &self.nodes[node as usize];
        let Some(goal) = goal else { return };
        if n.action.is_some_and(|(g, _)| g == goal) {
            return;
        }
        let p = &self.sc.node;
        let base = match goal {
            Goal::ActivateTarget if n.standby_up => p.switch,
            Goal::SwitchBack if n.standby_up => p.switch,
            Goal::ActivateTarget | Goal::Standby => p.activate,
            Goal::SwitchBack => p.switch_back,
        };
        let stretch = 1.0 + self.rng.r#gen::<f64>() * p.jitter.max(0.0);
        let after = (nanos(base) as f64 * stretch) as Time;
        let n = &mut self.nodes[node as usize];
        n.action_gen = n.action_gen.wrapping_add(1);
        n.action = Some((goal, n.action_gen));
        let generation = n.action_gen;
        self.q.after(after, Ev::ActionDone { node, generation });
    }

    fn action_done(&mut self, node: u32, generation: u32) {
        let n = &mut self.nodes[node as usize];
        let Some((goal, g)) = n.action else { return };
        if g != generation || !n.alive {
            return;
        }
        n.action = None;
        let healthy = !n.unhealthy;
        match goal {
            Goal::ActivateTarget => {
                // Blue-green keeps the previous release running as the standby.
                n.standby_up = n.standby_up || self.sc.rollout.strategy == StrategyKind::BlueGreen;
                n.running = Rel::Target;
                self.on_target += 1;
                self.report(node, Rep::Active(Rel::Target));
                self.report(node, Rep::Health { rel: Rel::Target, healthy });
            }
            Goal::SwitchBack => {
                if n.running == Rel::Target {
                    self.on_target -= 1;
                }
                n.running = Rel::Previous;
                n.standby_up = false;
                self.report(node, Rep::Active(Rel::Previous));
                self.report(node, Rep::Health { rel: Rel::Previous, healthy: true });
            }
            Goal::Standby => {
                n.standby_up = true;
                self.report(node, Rep::Started);
                self.report(node, Rep::Health { rel: Rel::Target, healthy });
            }
        }
        self.reconcile(node);
    }

    // -----------------------------------------------------------------------------------
    // Faults

    fn milestone(&mut self, m: Milestone) {
        if self.milestones.contains(&m) {
            return;
        }
        self.milestones.push(m);
        let now = self.q.now();
        for (i, f) in self.sc.faults.iter().enumerate() {
            if f.after == Some(m) {
                self.q.at(now + nanos(f.at), Ev::Fault(i as u32));
            }
        }
        for (i, o) in self.sc.operator.iter().enumerate() {
            if o.after == Some(m) {
                self.q.at(now + nanos(o.at), Ev::Operator(i as u32));
            }
        }
    }

    fn fault(&mut self, now: Time, i: usize) {
        let f = self.sc.faults[i].clone();
        match f.kind {
            FaultKind::KillCache => {
                let c = self.caches_of[usize::from(f.region)][f.index as usize];
                self.kill(now, c);
            }
            FaultKind::KillOrigin => self.kill(now, 0),
            FaultKind::KillHosts => {
                let mut alive: Vec<u32> =
                    self.host_ids().filter(|&h| self.nodes[h as usize].alive).collect();
                alive.shuffle(&mut self.rng);
                let k = ((f.share * f64::from(self.hosts_total)).round() as usize).min(alive.len());
                for &h in &alive[..k] {
                    self.kill(now, h);
                    if let Some(d) = f.restart_after {
                        self.restarts_pending += 1;
                        self.q.at(now + nanos(d), Ev::Restart(h));
                    }
                }
            }
            FaultKind::CorruptHosts => {
                let mut hosts: Vec<u32> = self.host_ids().collect();
                hosts.shuffle(&mut self.rng);
                let k = (f.share * f64::from(self.hosts_total)).round() as usize;
                for &h in hosts.iter().take(k) {
                    self.nodes[h as usize].corrupt = true;
                }
            }
        }
    }

    fn kill(&mut self, now: Time, node: u32) {
        if !self.nodes[node as usize].alive {
            return;
        }
        let idle = nanos(self.sc.node.idle_timeout);
        let conns = std::mem::take(&mut self.nodes[node as usize].conns);
        let (up, down) = (self.nodes[node as usize].up, self.nodes[node as usize].down);
        for id in self.net.flows_of(up, down) {
            if let Some((p, sent)) = self.net.remove(now, id) {
                self.count_egress(now, p.from, p.to, sent);
            }
        }
        for p in conns {
            // Peers see the connection die at the idle timeout.
            let inc = self.nodes[p as usize].inc;
            self.q.after(idle, Ev::Wire { from: node, to: p, inc, msg: Wire::Disconnect });
        }
        self.waiting.retain(|&(from, _), _| from != node);
        let n = &mut self.nodes[node as usize];
        n.alive = false;
        n.inc += 1;
        n.host_conns = 0;
        n.dialing.clear();
        n.pending.clear();
        n.pending_bytes = 0;
        n.sync_armed = false;
        n.action = None;
        if n.holds_permit {
            n.holds_permit = false;
            self.permits_in_use -= 1;
        }
        let sched = n.sched.take();
        match n.stage {
            Stage::Staging => {
                // What was durable survives on disk; the rest is fetched again.
                n.resume = sched.map(|s| s.bitfield().clone());
                n.stage = Stage::Idle;
            }
            Stage::Verifying => {
                n.resume = Some(Bitfield::full(self.art.chunk_count()));
                n.stage = Stage::Idle;
            }
            Stage::Idle | Stage::Staged | Stage::Failed => {}
        }
        if n.role == Role::Host && self.rollout.is_some() {
            let inc = n.inc - 1;
            let lost = nanos(self.sc.node.lost_after);
            self.q.at(now + lost, Ev::Report { host: node, inc, rep: Rep::Lost });
        }
    }

    fn restart(&mut self, now: Time, node: u32) {
        let n = &mut self.nodes[node as usize];
        if n.alive {
            return;
        }
        n.alive = true;
        n.timer_at = NONE;
        n.src = Src::Idle;
        n.ups = Upstreams::new(0, UpstreamBackoff::default());
        if n.role != Role::Host {
            return;
        }
        // It reports its whole state on its first heartbeat, and gets its desired state back.
        let running = n.running;
        let staged = n.stage == Stage::Staged;
        self.report(node, Rep::Active(running));
        let healthy = running != Rel::Target || !self.nodes[node as usize].unhealthy;
        self.report(node, Rep::Health { rel: running, healthy });
        if staged {
            self.report(node, Rep::Staged);
        }
        let want = match self.rollout.as_ref() {
            Some(r) => r.desired(HostId(u64::from(node))).ok().map(|d| self.compact(d)),
            None => Some(Want { active: Rel::Previous, standby: Rel::None, stage: Rel::Target }),
        };
        if let Some(want) = want {
            let inc = self.nodes[node as usize].inc;
            self.q.at(now + 2 * self.coord_latency(), Ev::Desired { host: node, inc, want });
        }
    }

    // -----------------------------------------------------------------------------------
    // Measurement and the end

    fn sample(&mut self, now: Time) {
        let b = (now / self.bucket) as usize;
        let (down, up, idle) = self.link_use();
        let s = &mut self.out.series;
        grow(&mut s.origin, b);
        for c in &mut s.cache {
            grow(c, b);
        }
        grow(&mut s.complete, b)[b] = self.complete_count;
        grow(&mut s.staged, b)[b] = self.staged_count;
        let updated = self.rollout.as_ref().map_or(0, |r| r.status().totals.updated);
        grow(&mut s.updated, b)[b] = updated;
        grow(&mut s.on_target, b)[b] = self.on_target;
        grow(&mut s.staging_down_use, b)[b] = down;
        grow(&mut s.holder_up_use, b)[b] = up;
        grow(&mut s.idle_holders, b)[b] = idle;
        self.sampled = Some(RunProgress {
            at: now,
            events: self.q.popped(),
            hosts: self.hosts_total,
            chunks: self.art.chunk_count(),
            pieces: self.out.traffic.pieces,
            complete: self.complete_count,
            staged: self.staged_count,
            updated,
        });
        if self.quiescent() {
            self.finished = true;
            return;
        }
        self.q.after(self.bucket, Ev::Sample);
    }

    /// The hosts' links now: the mean downlink use of the hosts still staging, the mean uplink
    /// use of the hosts holding a chunk, and how many staging hosts hold a chunk but use under
    /// half their uplink. O(hosts), once per bucket.
    fn link_use(&self) -> (f64, f64, u32) {
        let (mut down, mut staging, mut up, mut holders, mut idle) = (0.0, 0u32, 0.0, 0u32, 0);
        for n in &self.nodes {
            let Some(s) = n.sched.as_ref().filter(|_| n.role == Role::Host && n.alive) else {
                continue;
            };
            let holds = s.bitfield().count_ones() > 0;
            let up_use = self.net.link_use(n.up);
            if holds {
                holders += 1;
                up += up_use;
            }
            if !s.is_complete() {
                staging += 1;
                down += self.net.link_use(n.down);
                if holds && up_use < 0.5 {
                    idle += 1;
                }
            }
        }
        let mean = |sum: f64, n: u32| if n == 0 { 0.0 } else { sum / f64::from(n) };
        (mean(down, staging), mean(up, holders), idle)
    }

    /// Nothing more can happen that the scenario is about.
    fn quiescent(&self) -> bool {
        // Milestones that never come do not hold the run forever: stop_after does.
        let pending_faults = self.faults_fired.iter().any(|&f| !f);
        let pending_ops = self.ops_fired.iter().any(|&f| !f);
        if pending_faults || pending_ops {
            return false;
        }
        let rollout_over = match self.rollout.as_ref() {
            // Stage-only: over once every live host is staged (or failed).
            None => self.host_ids().all(|h| {
                let n = &self.nodes[h as usize];
                !n.alive || matches!(n.stage, Stage::Staged | Stage::Failed)
            }),
            Some(r) => matches!(r.phase(), Phase::Done | Phase::RolledBack { .. } | Phase::Aborted),
        };
        let staging = self.host_ids().any(|h| {
            let n = &self.nodes[h as usize];
            n.alive && matches!(n.stage, Stage::Staging | Stage::Verifying)
        });
        let restarts_pending = self.restarts_pending > 0;
        let acting = self.host_ids().any(|h| self.nodes[h as usize].action.is_some());
        rollout_over && !staging && !restarts_pending && !acting
    }

    fn finish(mut self) -> Outcome {
        self.out.end = self.q.now();
        self.out.events = self.q.popped();
        let hosts = self.host_ids();
        for h in hosts {
            let n = &self.nodes[h as usize];
            let idx = self.host_index(h);
            let r = &mut self.out.hosts[idx];
            r.alive = n.alive;
            r.running = n.running;
            if let Some(s) = n.sched.as_ref() {
                let p = s.progress();
                let t = &mut self.out.progress;
                t.peer.chunks += p.peer.chunks;
                t.peer.bytes += p.peer.bytes;
                t.cache.chunks += p.cache.chunks;
                t.cache.bytes += p.cache.bytes;
                t.origin.chunks += p.origin.chunks;
                t.origin.bytes += p.origin.bytes;
                t.disk.chunks += p.disk.chunks;
                t.disk.bytes += p.disk.bytes;
                t.duplicates.chunks += p.duplicates.chunks;
                t.duplicates.bytes += p.duplicates.bytes;
                t.hash_mismatches += p.hash_mismatches;
                t.withdrawn += p.withdrawn;
                t.timeouts += p.timeouts;
                t.bans += p.bans;
            }
        }
        self.out.phase = self.rollout.as_ref().map(|r| r.phase());
        self.out.updated = self.rollout.as_ref().map_or(0, |r| r.status().totals.updated);
        self.out
    }

    /// Sets up the per-host and per-cache result slots (called by [`simulate`]).
    fn prepare(&mut self) {
        let hosts: Vec<HostResult> = self
            .host_ids()
            .map(|h| {
                let n = &self.nodes[h as usize];
                HostResult {
                    region: n.region,
                    class: n.class,
                    complete: None,
                    staged: None,
                    alive: true,
                    verified: false,
                    running: Rel::Previous,
                }
            })
            .collect();
        self.out.hosts = hosts;
        self.out.caches = self
            .caches_of
            .iter()
            .flatten()
            .map(|&c| (self.nodes[c as usize].region, None))
            .collect();
    }
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("scenario", &self.sc.name)
            .field("now", &self.q.now())
            .field("nodes", &self.nodes.len())
            .field("flows", &self.net.live())
            .finish_non_exhaustive()
    }
}

fn grow<T: Default + Clone>(v: &mut Vec<T>, i: usize) -> &mut Vec<T> {
    if v.len() <= i {
        v.resize(i + 1, T::default());
    }
    v
}

/// Runs `sc` over `art`, handing `observer` the run's progress at every sample (for a progress
/// line on long runs).
pub fn simulate(sc: Scenario, art: Artifact, observer: &mut dyn FnMut(&RunProgress)) -> Outcome {
    let mut w = World::new(sc, art);
    w.prepare();
    w.run(observer)
}

/// Seconds of `d`.
pub fn dsecs(d: Duration) -> f64 {
    d.as_secs_f64()
}
