//! Behaviour of the rollout engine through its public API, on a virtual clock.
//!
//! `Sim` is a small in-memory fleet: simulated hosts that reconcile the desired state the engine
//! hands out (stage, start beside, switch; each step takes a while and is reported back after a
//! network latency), a judge that answers gate requests, an operator that answers holds, and
//! faults (hosts lost for a while, a target that fails its health check or its activation on
//! some hosts). A `Checker` watches every command as it is emitted and asserts the engine's
//! invariants from what the engine had been told so far; the end state of the fleet is checked
//! when the run is quiet.

use std::collections::BTreeMap;
use std::time::Duration;

use fleetwave_coordinator::rollout::{
    Bake, Budget, CanaryStep, Command, Desired, EventError, FailReason, GateId, GateRequest, Gates,
    HealthGate, HoldReason, HostEvent, HostId, HostRole, HostSpec, Limit, ManifestId, Notice,
    Operator, Phase, Plan, PlanError, RegionIndex, RestoreError, RollbackReason, Rollout,
    SNAPSHOT_VERSION, Snapshot, StageAhead, Strategy, Timeouts, Verdict, WaveKind, WaveStage,
};
use proptest::prelude::*;
use proptest::strategy::Strategy as _;
use proptest::test_runner::FileFailurePersistence;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const V1: ManifestId = ManifestId([1; 32]);
const V2: ManifestId = ManifestId([2; 32]);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Host ids are spread out so that the engine's id lookup is exercised.
fn host_id(i: usize) -> HostId {
    HostId(i as u64 * 7 + 3)
}

fn host_index(id: HostId) -> usize {
    ((id.0 - 3) / 7) as usize
}

// ---------------------------------------------------------------------------------------------
// Scenarios

#[derive(Clone, Copy, Debug, PartialEq)]
enum Judge {
    Pass,
    Fail,
    Inconclusive,
    /// Fails when any canary host runs a bad target, passes otherwise.
    FromHealth,
    /// Never answers.
    Silent,
    /// Inconclusive on the first request, pass afterwards.
    InconclusiveOnce,
    Random,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bot {
    /// Promotes every hold.
    Promote,
    /// Resumes gate holds (asking the judge again), promotes approvals.
    Resume,
    /// Promotes, resumes (a bounded number of times) or rolls back, at random.
    Random,
}

#[derive(Clone, Copy, Debug)]
struct Loss {
    host: usize,
    at: Duration,
    down_for: Duration,
}

#[derive(Clone, Debug)]
struct Scenario {
    regions: Vec<u32>,
    strategy: Strategy,
    budget: Budget,
    health: HealthGate,
    bake: Bake,
    timeouts: Timeouts,
    stage_ahead: StageAhead,
    gate_sample: u32,
    plan_seed: u64,
    sim_seed: u64,
    /// Share of hosts on which the target fails its health check.
    bad_fraction: f64,
    /// Share of hosts on which activating (or starting) the target fails.
    fail_activation_fraction: f64,
    /// Share of hosts on which staging the target fails.
    fail_stage_fraction: f64,
    /// Deliver every report twice (reports are idempotent).
    duplicates: bool,
    judge: Judge,
    judge_delay: Duration,
    losses: Vec<Loss>,
    /// (at, for): an operator pauses, then resumes.
    pauses: Vec<(Duration, Duration)>,
    abort_at: Option<Duration>,
    rollback_at: Option<Duration>,
    bot: Bot,
    /// Check the per-command invariants (O(1) per host, on in every test).
    checks: bool,
}

impl Scenario {
    fn new(regions: Vec<u32>, strategy: Strategy) -> Self {
        Self {
            regions,
            strategy,
            budget: Budget::default(),
            health: HealthGate::default(),
            bake: Bake { first_region: secs(120), other_regions: secs(60), extensions: 0 },
            timeouts: Timeouts::default(),
            stage_ahead: StageAhead::All,
            gate_sample: 1000,
            plan_seed: 7,
            sim_seed: 11,
            bad_fraction: 0.0,
            fail_activation_fraction: 0.0,
            fail_stage_fraction: 0.0,
            duplicates: false,
            judge: Judge::Pass,
            judge_delay: secs(30),
            losses: Vec::new(),
            pauses: Vec::new(),
            abort_at: None,
            rollback_at: None,
            bot: Bot::Promote,
            checks: true,
        }
    }

    fn plan(&self) -> Plan {
        let names = (0..self.regions.len()).map(|r| format!("region-{r}")).collect();
        let mut hosts = Vec::new();
        for (r, &n) in self.regions.iter().enumerate() {
            for _ in 0..n {
                let i = hosts.len();
                hosts.push(HostSpec {
                    id: host_id(i),
                    region: RegionIndex(r as u16),
                    previous: Some(V1),
                });
            }
        }
        // The engine must not depend on the order hosts are listed in.
        hosts.reverse();
        let mut plan = Plan::new("web", V2, names, hosts, self.strategy.clone());
        plan.budget = self.budget;
        plan.health = self.health;
        plan.bake = self.bake;
        plan.timeouts = self.timeouts;
        plan.stage_ahead = self.stage_ahead;
        plan.gate_sample = self.gate_sample;
        plan.seed = self.plan_seed;
        plan
    }
}

// ---------------------------------------------------------------------------------------------
// The simulated fleet

#[derive(Clone, Copy, Debug)]
enum Action {
    Stage(ManifestId),
    Start(ManifestId),
    StopStandby,
    Switch(Option<ManifestId>),
}

#[derive(Clone, Debug)]
enum Ev {
    Deliver(HostId, HostEvent),
    Step(usize, Action),
    Verdict(GateId, Verdict),
    Operator(Operator),
    Lose(usize),
    Return(usize),
}

#[derive(Clone, Debug)]
struct SimHost {
    region: usize,
    previous: ManifestId,
    staged: Vec<ManifestId>,
    /// Releases whose activation failed here; not retried.
    failed: Vec<ManifestId>,
    active: Option<ManifestId>,
    standby: Option<ManifestId>,
    desired: Desired,
    lost: bool,
    busy: bool,
    bad: bool,
    fails_activation: bool,
    fails_stage: bool,
}

/// What the engine knows about a host (from the events delivered to it) and what it was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rep {
    Previous,
    Target,
    Other,
    Nothing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RepHealth {
    Healthy,
    Unhealthy,
    Unknown,
}

#[derive(Clone, Debug)]
struct Checker {
    disruptive: bool,
    gate_sample: usize,
    sizes: Vec<u32>,
    max_unavailable: Vec<u32>,
    min_healthy: Vec<u32>,
    lost: Vec<bool>,
    running: Vec<Rep>,
    health: Vec<RepHealth>,
    told_target: Vec<bool>,
    touched: Vec<bool>,
    unavailable: Vec<bool>,
    unavailable_count: Vec<u32>,
    cap: Vec<Option<u32>>,
    stragglers: Vec<u32>,
    touched_count: Vec<u32>,
    /// A wave started or the region is done.
    reached: Vec<bool>,
    done: Vec<bool>,
    paused: bool,
    rolling_back: bool,
    violations: Vec<String>,
}

impl Checker {
    fn new(s: &Scenario, host_regions: &[usize]) -> Self {
        let n = host_regions.len();
        let max_unavailable =
            s.regions.iter().map(|&k| s.budget.max_unavailable.floor_of(k).max(1)).collect();
        let min_healthy = s.regions.iter().map(|&k| s.budget.min_healthy.ceil_of(k)).collect();
        Self {
            disruptive: !matches!(s.strategy, Strategy::BlueGreen { .. }),
            gate_sample: s.gate_sample as usize,
            sizes: s.regions.clone(),
            max_unavailable,
            min_healthy,
            lost: vec![false; n],
            running: vec![Rep::Previous; n],
            health: vec![RepHealth::Healthy; n],
            told_target: vec![false; n],
            touched: vec![false; n],
            unavailable: vec![false; n],
            unavailable_count: vec![0; s.regions.len()],
            cap: vec![None; s.regions.len()],
            stragglers: vec![0; s.regions.len()],
            touched_count: vec![0; s.regions.len()],
            reached: vec![false; s.regions.len()],
            done: vec![false; s.regions.len()],
            paused: false,
            rolling_back: false,
            violations: Vec::new(),
        }
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(what);
        }
    }

    fn recompute(&mut self, h: usize, region: usize) {
        let on_target_healthy =
            self.running[h] == Rep::Target && self.health[h] == RepHealth::Healthy;
        let now = self.lost[h]
            || self.health[h] != RepHealth::Healthy
            || (self.told_target[h] && !on_target_healthy);
        if now != self.unavailable[h] {
            self.unavailable[h] = now;
            if now {
                self.unavailable_count[region] += 1;
            } else {
                self.unavailable_count[region] -= 1;
            }
        }
    }

    /// Mirrors what the engine learns from `event`.
    fn delivered(&mut self, h: usize, region: usize, event: HostEvent) {
        let classify = |m: ManifestId| {
            if m == V2 {
                Rep::Target
            } else if m == V1 {
                Rep::Previous
            } else {
                Rep::Other
            }
        };
        self.lost[h] = event == HostEvent::Lost;
        match event {
            HostEvent::Lost => self.health[h] = RepHealth::Unknown,
            HostEvent::Active { manifest } if classify(manifest) != self.running[h] => {
                self.running[h] = classify(manifest);
                self.health[h] = RepHealth::Unknown;
            }
            HostEvent::Inactive if self.running[h] != Rep::Nothing => {
                self.running[h] = Rep::Nothing;
                self.health[h] = RepHealth::Unknown;
            }
            HostEvent::Health { manifest, healthy }
                if self.running[h] != Rep::Nothing && classify(manifest) == self.running[h] =>
            {
                self.health[h] = if healthy { RepHealth::Healthy } else { RepHealth::Unhealthy };
            }
            _ => {}
        }
        self.recompute(h, region);
    }

    fn command(&mut self, cmd: &Command, hosts: &[SimHost]) {
        match cmd {
            Command::SetDesired { desired, hosts: ids } => {
                if ids.is_empty() {
                    self.violation("empty SetDesired".into());
                }
                let mut regions_before: BTreeMap<usize, u32> = BTreeMap::new();
                for id in ids {
                    let r = hosts[host_index(*id)].region;
                    regions_before.entry(r).or_insert(self.unavailable_count[r]);
                }
                let to_target = desired.active == Some(V2) || desired.standby == Some(V2);
                for id in ids {
                    let h = host_index(*id);
                    let r = hosts[h].region;
                    if to_target {
                        if self.rolling_back {
                            self.violation(format!("{id} told the target during a rollback"));
                        }
                        if self.paused {
                            self.violation(format!("{id} told the target while paused"));
                        }
                        if desired.active == Some(V2)
                            && self.disruptive
                            && !hosts[h].staged.contains(&V2)
                        {
                            self.violation(format!("{id} activated before it staged"));
                        }
                        if !self.touched[h] {
                            self.touched[h] = true;
                            self.touched_count[r] += 1;
                            let cap = self.cap[r].unwrap_or(0) + self.stragglers[r];
                            if !self.reached[r] {
                                self.violation(format!(
                                    "{id} of region {r} told the target before its region"
                                ));
                            } else if self.touched_count[r] > cap {
                                self.violation(format!(
                                    "region {r}: {} hosts told the target, cap {cap}",
                                    self.touched_count[r]
                                ));
                            }
                        }
                    }
                    self.told_target[h] = desired.active == Some(V2);
                    self.recompute(h, r);
                }
                if self.disruptive && desired.active == Some(V2) {
                    for (r, before) in regions_before {
                        let after = self.unavailable_count[r];
                        if after > before && after > self.max_unavailable[r] {
                            self.violation(format!(
                                "region {r}: {after} unavailable, max {}",
                                self.max_unavailable[r]
                            ));
                        }
                        let available = self.sizes[r] - after;
                        if after > before && available < self.min_healthy[r] {
                            self.violation(format!(
                                "region {r}: {available} available, min {}",
                                self.min_healthy[r]
                            ));
                        }
                    }
                }
            }
            Command::EvaluateGate(req) => self.gate(req, hosts),
            Command::Notify(notice) => match notice {
                Notice::WaveStarted { region, cap, .. } => {
                    let r = usize::from(region.0);
                    if !self.done[..r].iter().all(|&d| d) || self.done[r] {
                        self.violation(format!("wave in region {r} out of order"));
                    }
                    if self.cap[r].is_some_and(|c| *cap < c) {
                        self.violation(format!("region {r}: cap went down to {cap}"));
                    }
                    self.reached[r] = true;
                    self.cap[r] = Some(*cap);
                }
                Notice::RegionDone { region } => {
                    let r = usize::from(region.0);
                    if !self.done[..r].iter().all(|&d| d) {
                        self.violation(format!("region {r} done out of order"));
                    }
                    self.reached[r] = true;
                    self.done[r] = true;
                }
                Notice::Straggler { region, .. } => self.stragglers[usize::from(region.0)] += 1,
                Notice::Paused => self.paused = true,
                Notice::Resumed => self.paused = false,
                Notice::RollingBack { .. } => self.rolling_back = true,
                _ => {}
            },
        }
    }

    fn gate(&mut self, req: &GateRequest, hosts: &[SimHost]) {
        let r = usize::from(req.region.0);
        if req.canary.is_empty() || req.baseline.is_empty() {
            self.violation("gate with an empty side".into());
        }
        if req.canary.len() > self.gate_sample || req.baseline.len() > req.canary.len() {
            self.violation(format!(
                "gate sizes {} / {}, sample {}",
                req.canary.len(),
                req.baseline.len(),
                self.gate_sample
            ));
        }
        for id in &req.canary {
            let h = host_index(*id);
            if hosts[h].region != r || !self.told_target[h] {
                self.violation(format!("canary {id} is not a target host of region {r}"));
            }
        }
        for id in &req.baseline {
            let h = host_index(*id);
            if hosts[h].region != r || self.touched[h] || req.canary.contains(id) {
                self.violation(format!("baseline {id} is not an untouched host of region {r}"));
            }
        }
    }
}

struct Sim {
    s: Scenario,
    engine: Rollout,
    now: Duration,
    queue: BTreeMap<(Duration, u64), Ev>,
    seq: u64,
    hosts: Vec<SimHost>,
    rng: ChaCha8Rng,
    log: Vec<Command>,
    checker: Checker,
    /// Calls into the engine.
    events: u64,
    /// Snapshot the engine (through JSON) and continue with the restored copy after this many
    /// calls.
    restore_after: Option<u64>,
    resumes_left: u32,
    gates: Vec<GateRequest>,
}

const LATENCY: Duration = Duration::from_millis(200);
const DETECT: Duration = Duration::from_secs(15);
const MAX_EVENTS: u64 = 5_000_000;

impl Sim {
    fn new(s: Scenario) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(s.sim_seed);
        let mut hosts = Vec::new();
        for (r, &n) in s.regions.iter().enumerate() {
            for _ in 0..n {
                hosts.push(SimHost {
                    region: r,
                    previous: V1,
                    staged: vec![V1],
                    failed: Vec::new(),
                    active: Some(V1),
                    standby: None,
                    desired: Desired { active: Some(V1), standby: None, stage: None },
                    lost: false,
                    busy: false,
                    bad: rng.gen_bool(s.bad_fraction),
                    fails_activation: rng.gen_bool(s.fail_activation_fraction),
                    fails_stage: rng.gen_bool(s.fail_stage_fraction),
                });
            }
        }
        let regions: Vec<usize> = hosts.iter().map(|h| h.region).collect();
        let checker = Checker::new(&s, &regions);
        let engine = Rollout::new(Duration::ZERO, s.plan()).expect("valid plan");
        let mut sim = Self {
            engine,
            now: Duration::ZERO,
            queue: BTreeMap::new(),
            seq: 0,
            hosts,
            rng,
            log: Vec::new(),
            checker,
            events: 0,
            restore_after: None,
            resumes_left: 2,
            gates: Vec::new(),
            s,
        };
        for loss in sim.s.losses.clone() {
            sim.at(loss.at, Ev::Lose(loss.host));
            sim.at(loss.at + DETECT + secs(1) + loss.down_for, Ev::Return(loss.host));
        }
        for (at, len) in sim.s.pauses.clone() {
            sim.at(at, Ev::Operator(Operator::Pause));
            sim.at(at + len, Ev::Operator(Operator::Resume));
        }
        if let Some(at) = sim.s.abort_at {
            sim.at(at, Ev::Operator(Operator::Abort));
        }
        if let Some(at) = sim.s.rollback_at {
            sim.at(at, Ev::Operator(Operator::Rollback));
        }
        sim
    }

    fn at(&mut self, t: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.insert((t, self.seq), ev);
    }

    fn report(&mut self, h: usize, event: HostEvent, after: Duration) {
        if !self.hosts[h].lost {
            let t = self.now + after + LATENCY;
            self.at(t, Ev::Deliver(host_id(h), event));
            if self.s.duplicates {
                self.at(t, Ev::Deliver(host_id(h), event));
            }
        }
    }

    fn between(&mut self, lo: u64, hi: u64) -> Duration {
        ms(self.rng.gen_range(lo..=hi))
    }

    /// Runs until nothing is left to do.
    fn run(&mut self) {
        loop {
            self.drain();
            let next_event = self.queue.first_key_value().map(|(k, _)| k.0);
            let timer = self.engine.poll_timeout();
            let take_timer = match (next_event, timer) {
                (None, None) => return,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some(e), Some(t)) => t <= e,
            };
            self.events += 1;
            assert!(self.events < MAX_EVENTS, "the run does not end");
            if take_timer {
                let t = timer.expect("timer").max(self.now);
                self.now = t;
                self.engine.handle_timeout(t);
            } else {
                let Some(((t, _), ev)) = self.queue.pop_first() else { return };
                self.now = t;
                self.event(ev);
            }
            if self.restore_after == Some(self.events) {
                self.drain();
                let json = serde_json::to_string(&self.engine.snapshot()).expect("serialize");
                let snapshot: Snapshot = serde_json::from_str(&json).expect("deserialize");
                self.engine = Rollout::restore(snapshot).expect("restore");
            }
        }
    }

    fn event(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver(id, event) => {
                let h = host_index(id);
                self.checker.delivered(h, self.hosts[h].region, event);
                self.engine.handle_host(self.now, id, event).expect("known host");
            }
            Ev::Step(h, action) => self.step(h, action),
            Ev::Verdict(gate, verdict) => match self.engine.handle_verdict(self.now, gate, verdict)
            {
                Ok(()) | Err(EventError::StaleVerdict { .. }) => {}
                Err(e) => self.checker.violation(format!("verdict refused: {e}")),
            },
            Ev::Operator(op) => match self.engine.handle_operator(self.now, op) {
                Ok(()) | Err(EventError::NotApplicable { .. }) => {}
                Err(e) => self.checker.violation(format!("operator command refused: {e}")),
            },
            Ev::Lose(h) => {
                self.hosts[h].lost = true;
                self.at(self.now + DETECT, Ev::Deliver(host_id(h), HostEvent::Lost));
            }
            Ev::Return(h) => {
                self.hosts[h].lost = false;
                self.hosts[h].busy = false;
                // The first heartbeat after coming back carries the whole state.
                let host = self.hosts[h].clone();
                match host.active {
                    Some(m) => {
                        self.report(h, HostEvent::Active { manifest: m }, ms(0));
                        let healthy = !(m == V2 && host.bad);
                        self.report(h, HostEvent::Health { manifest: m, healthy }, ms(0));
                    }
                    None => self.report(h, HostEvent::Inactive, ms(0)),
                }
                if host.staged.contains(&V2) {
                    self.report(h, HostEvent::Staged { manifest: V2 }, ms(0));
                }
                if host.standby == Some(V2) {
                    self.report(h, HostEvent::Started { manifest: V2 }, ms(0));
                    let healthy = !host.bad;
                    self.report(h, HostEvent::Health { manifest: V2, healthy }, ms(0));
                }
                self.hosts[h].desired = self.engine.desired(host_id(h)).expect("known host");
                self.reconcile(h);
            }
        }
    }

    fn drain(&mut self) {
        while let Some(cmd) = self.engine.poll_command() {
            if self.s.checks {
                self.checker.command(&cmd, &self.hosts);
            }
            match &cmd {
                Command::SetDesired { desired, hosts } => {
                    for id in hosts {
                        let h = host_index(*id);
                        if self.hosts[h].lost {
                            continue;
                        }
                        self.hosts[h].desired = *desired;
                        self.reconcile(h);
                    }
                }
                Command::EvaluateGate(req) => {
                    self.gates.push(req.clone());
                    let verdict = match self.s.judge {
                        Judge::Pass => Some(Verdict::Pass),
                        Judge::Fail => Some(Verdict::Fail),
                        Judge::Inconclusive => Some(Verdict::Inconclusive),
                        Judge::Silent => None,
                        Judge::InconclusiveOnce if self.gates.len() == 1 => {
                            Some(Verdict::Inconclusive)
                        }
                        Judge::InconclusiveOnce => Some(Verdict::Pass),
                        Judge::FromHealth => {
                            let bad = req.canary.iter().any(|id| self.hosts[host_index(*id)].bad);
                            Some(if bad { Verdict::Fail } else { Verdict::Pass })
                        }
                        Judge::Random => Some(match self.rng.gen_range(0..4) {
                            0 => Verdict::Fail,
                            1 => Verdict::Inconclusive,
                            _ => Verdict::Pass,
                        }),
                    };
                    if let Some(v) = verdict {
                        let at = self.now + self.s.judge_delay;
                        self.at(at, Ev::Verdict(req.gate, v));
                    }
                }
                Command::Notify(Notice::Held { reason }) => {
                    let op = match self.s.bot {
                        Bot::Promote => Operator::Promote,
                        Bot::Resume if *reason == HoldReason::Approval => Operator::Promote,
                        Bot::Resume => Operator::Resume,
                        Bot::Random => match self.rng.gen_range(0..4) {
                            0 => Operator::Rollback,
                            // Resume re-runs a gate; an approval needs a promote.
                            1 if self.resumes_left > 0 && *reason != HoldReason::Approval => {
                                self.resumes_left -= 1;
                                Operator::Resume
                            }
                            _ => Operator::Promote,
                        },
                    };
                    self.at(self.now + secs(5), Ev::Operator(op));
                }
                Command::Notify(_) => {}
            }
            self.log.push(cmd);
        }
    }

    /// Starts the host's next step towards its desired state, if it is idle.
    fn reconcile(&mut self, h: usize) {
        let host = &self.hosts[h];
        if host.busy || host.lost {
            return;
        }
        let d = host.desired;
        let usable = |m: &ManifestId| !host.failed.contains(m);
        let missing = [d.stage, d.active, d.standby]
            .into_iter()
            .flatten()
            .find(|m| usable(m) && !host.staged.contains(m));
        let action = if let Some(m) = missing {
            Some((Action::Stage(m), (2_000, 20_000)))
        } else if d.standby != host.standby && d.standby.is_none_or(|m| usable(&m)) {
            match d.standby {
                Some(m) => Some((Action::Start(m), (1_000, 3_000))),
                None => Some((Action::StopStandby, (0, 0))),
            }
        } else if d.active != host.active && d.active.is_none_or(|m| usable(&m)) {
            Some((Action::Switch(d.active), (500, 3_000)))
        } else {
            None
        };
        if let Some((action, (lo, hi))) = action {
            self.hosts[h].busy = true;
            let t = self.now + self.between(lo, hi);
            self.at(t, Ev::Step(h, action));
        }
    }

    fn step(&mut self, h: usize, action: Action) {
        if self.hosts[h].lost {
            // Interrupted; it starts over when it comes back.
            return;
        }
        self.hosts[h].busy = false;
        let health_delay = ms(1_000);
        match action {
            Action::Stage(m) => {
                if m == V2 && self.hosts[h].fails_stage {
                    self.hosts[h].failed.push(m);
                    self.report(h, HostEvent::StageFailed { manifest: m }, ms(0));
                } else {
                    self.hosts[h].staged.push(m);
                    self.report(h, HostEvent::Staged { manifest: m }, ms(0));
                }
            }
            Action::Start(m) => {
                if m == V2 && self.hosts[h].fails_activation {
                    self.hosts[h].failed.push(m);
                    self.report(h, HostEvent::ActivationFailed { manifest: m }, ms(0));
                } else {
                    self.hosts[h].standby = Some(m);
                    self.report(h, HostEvent::Started { manifest: m }, ms(0));
                    let healthy = !(m == V2 && self.hosts[h].bad);
                    self.report(h, HostEvent::Health { manifest: m, healthy }, health_delay);
                }
            }
            Action::StopStandby => self.hosts[h].standby = None,
            Action::Switch(a) => {
                if a == Some(V2) && self.hosts[h].fails_activation {
                    self.hosts[h].failed.push(V2);
                    self.report(h, HostEvent::ActivationFailed { manifest: V2 }, ms(0));
                } else {
                    if self.hosts[h].standby == a {
                        // The standby is promoted; the old active one is restarted as standby
                        // if the desired state says so.
                        self.hosts[h].standby = None;
                    }
                    self.hosts[h].active = a;
                    match a {
                        Some(m) => {
                            self.report(h, HostEvent::Active { manifest: m }, ms(0));
                            let healthy = !(m == V2 && self.hosts[h].bad);
                            self.report(
                                h,
                                HostEvent::Health { manifest: m, healthy },
                                health_delay,
                            );
                        }
                        None => self.report(h, HostEvent::Inactive, ms(0)),
                    }
                }
            }
        }
        self.reconcile(h);
    }

    fn notices(&self) -> impl Iterator<Item = &Notice> + '_ {
        self.log.iter().filter_map(|c| match c {
            Command::Notify(n) => Some(n),
            _ => None,
        })
    }

    /// Checks the end state; returns every problem found.
    fn verdict(&self) -> Vec<String> {
        let mut problems = self.checker.violations.clone();
        let phase = self.engine.phase();
        for (h, host) in self.hosts.iter().enumerate() {
            let id = host_id(h);
            if host.lost {
                problems.push(format!("{id} still lost at the end"));
                continue;
            }
            match phase {
                Phase::Done => {
                    let status = self.engine.host(id).expect("known host");
                    let expected = if status.role == HostRole::Failed { V1 } else { V2 };
                    if host.active != Some(expected) {
                        problems.push(format!(
                            "done, but {id} ({:?}) runs {:?}",
                            status.role, host.active
                        ));
                    }
                    if !matches!(status.role, HostRole::Updated | HostRole::Failed) {
                        problems.push(format!("done, but {id} is {:?}", status.role));
                    }
                }
                Phase::RolledBack { .. } => {
                    if host.active != Some(host.previous) || host.standby == Some(V2) {
                        problems.push(format!(
                            "rolled back, but {id} runs {:?} (standby {:?})",
                            host.active, host.standby
                        ));
                    }
                }
                Phase::Aborted => {}
                Phase::Running | Phase::RollingBack { .. } => {
                    problems.push(format!("the run ended in phase {phase:?}"));
                    break;
                }
            }
        }
        if matches!(phase, Phase::RolledBack { .. })
            && !self.notices().any(|n| matches!(n, Notice::RolledBack { .. }))
        {
            problems.push("rolled back without a RolledBack notice".into());
        }
        problems
    }
}

fn run(s: Scenario) -> Sim {
    let mut sim = Sim::new(s);
    sim.run();
    sim
}

fn assert_clean(sim: &Sim) {
    let problems = sim.verdict();
    assert!(problems.is_empty(), "{problems:#?}");
}

fn waves(sim: &Sim) -> Vec<(u16, u16, WaveKind, u32)> {
    sim.notices()
        .filter_map(|n| match n {
            Notice::WaveStarted { region, wave, kind, cap, .. } => {
                Some((region.0, *wave, *kind, *cap))
            }
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Happy paths

#[test]
fn rolling_happy_path_goes_region_by_region_in_budget_sized_batches() {
    let mut s = Scenario::new(vec![8, 8, 8], Strategy::rolling());
    s.budget.max_unavailable = Limit::Percent(25);
    let sim = run(s);
    assert_clean(&sim);
    assert_eq!(sim.engine.phase(), Phase::Done);
    let waves = waves(&sim);
    // 25% of 8 hosts: batches of two, four per region, regions in order.
    let expected: Vec<(u16, u16, WaveKind, u32)> = (0..3)
        .flat_map(|r| (0..4).map(move |w| (r, w, WaveKind::Activate, 2 * (u32::from(w) + 1))))
        .collect();
    assert_eq!(waves, expected);
    assert!(sim.hosts.iter().all(|h| h.active == Some(V2)));
    assert!(matches!(sim.notices().last(), Some(Notice::Done { stragglers: 0 })));
    assert!(sim.gates.is_empty());
}

#[test]
fn canary_happy_path_steps_through_each_region_with_gates_per_step() {
    let s = Scenario::new(vec![200, 100], Strategy::canary());
    let sim = run(s);
    assert_clean(&sim);
    assert_eq!(sim.engine.phase(), Phase::Done);
    let caps: Vec<(u16, u32)> = waves(&sim).iter().map(|w| (w.0, w.3)).collect();
    assert_eq!(
        caps,
        vec![
            (0, 2),
            (0, 10),
            (0, 50),
            (0, 100),
            (0, 200),
            (1, 1),
            (1, 5),
            (1, 25),
            (1, 50),
            (1, 100)
        ]
    );
    // Analysis on every step but the last of each region; canary and baseline of one size
    // until the baseline runs short.
    assert_eq!(sim.gates.len(), 8);
    for g in &sim.gates {
        assert_eq!(g.canary.len(), g.baseline.len());
        assert_eq!(
            g.decide_by,
            g.window_start + if g.region.0 == 0 { secs(120) } else { secs(60) }
        );
    }
    assert!(sim.hosts.iter().all(|h| h.active == Some(V2)));
    let counts = sim.engine.status().totals;
    assert_eq!((counts.updated, counts.failed, counts.unavailable), (300, 0, 0));
}

#[test]
fn blue_green_happy_path_switches_each_region_at_once_and_keeps_the_old_release() {
    let s = Scenario::new(vec![10, 6], Strategy::blue_green());
    let sim = run(s);
    assert_clean(&sim);
    assert_eq!(sim.engine.phase(), Phase::Done);
    let kinds: Vec<(u16, WaveKind)> = waves(&sim).iter().map(|w| (w.0, w.2)).collect();
    assert_eq!(
        kinds,
        vec![
            (0, WaveKind::Standby),
            (0, WaveKind::Switch),
            (1, WaveKind::Standby),
            (1, WaveKind::Switch)
        ]
    );
    // Each region's switch is one command covering the whole region.
    let switches: Vec<usize> = sim
        .log
        .iter()
        .filter_map(|c| match c {
            Command::SetDesired { desired, hosts } if desired.active == Some(V2) => {
                assert_eq!(desired.standby, Some(V1), "the old release stays as standby");
                Some(hosts.len())
            }
            _ => None,
        })
        .collect();
    assert_eq!(switches, vec![10, 6]);
    assert!(sim.hosts.iter().all(|h| h.active == Some(V2) && h.standby == Some(V1)));
}

#[test]
fn blue_green_rollback_after_done_is_a_switch_back() {
    let mut s = Scenario::new(vec![6, 6], Strategy::blue_green());
    s.rollback_at = Some(secs(3_600));
    let sim = run(s);
    assert_clean(&sim);
    assert_eq!(sim.engine.phase(), Phase::RolledBack { reason: RollbackReason::Operator });
    assert!(sim.hosts.iter().all(|h| h.active == Some(V1) && h.standby.is_none()));
    assert!(sim.notices().any(|n| *n == Notice::RolledBack { unconfirmed: 0 }));
}

// ---------------------------------------------------------------------------------------------
// Failures

#[test]
fn canary_with_a_failing_gate_rolls_back_from_the_first_step() {
    let mut s = Scenario::new(vec![300, 300], Strategy::canary());
    s.judge = Judge::Fail;
    let sim = run(s);
    assert_clean(&sim);
    let Phase::RolledBack { reason: RollbackReason::GateFailed { gate } } = sim.engine.phase()
    else {
        panic!("expected a rollback on the gate, got {:?}", sim.engine.phase());
    };
    assert_eq!(gate, sim.gates[0].gate);
    // Only the first 1% of the first region ever ran the target, and it is back on V1.
    let touched: Vec<HostId> = sim.engine.touched().collect();
    assert_eq!(touched.len(), 3);
    assert!(touched.iter().all(|id| sim.hosts[host_index(*id)].region == 0));
    assert!(sim.hosts.iter().all(|h| h.active == Some(V1)));
    // Staging is cancelled too.
    assert!(
        sim.hosts
            .iter()
            .all(|h| h.desired == Desired { active: Some(V1), standby: None, stage: None })
    );
}

#[test]
fn an_unhealthy_target_is_rolled_back_by_the_health_gate() {
    let mut s = Scenario::new(vec![100, 100], Strategy::canary());
    s.bad_fraction = 1.0;
    s.judge = Judge::Silent;
    let sim = run(s);
    assert_clean(&sim);
    assert!(
        matches!(
            sim.engine.phase(),
            Phase::RolledBack {
                reason: RollbackReason::TooManyFailures { region: RegionIndex(0), .. }
            }
        ),
        "{:?}",
        sim.engine.phase()
    );
    assert!(sim.notices().any(|n| matches!(n, Notice::HostFailed { .. })));
    assert!(sim.hosts.iter().all(|h| h.active == Some(V1)));
}

#[test]
fn a_few_failed_activations_are_tolerated_and_switched_back_alone() {
    let mut s = Scenario::new(vec![400], Strategy::canary());
    s.health.max_failed = Limit::Percent(5);
    s.fail_activation_fraction = 0.01;
    s.sim_seed = 3;
    let sim = run(s);
    assert_clean(&sim);
    assert_eq!(sim.engine.phase(), Phase::Done);
    let failed = sim.engine.status().totals.failed;
    assert!(failed > 0, "the scenario should have failures");
    for (h, host) in sim.hosts.iter().enumerate() {
        let expected = if host.fails_activation { V1 } else { V2 };
        assert_eq!(host.active, Some(expected), "{}", host_id(h));
    }
}

#[test]
fn an_inconclusive_gate_holds_until_a_human_promotes() {
    let mut s = Scenario::new(vec![100], Strategy::canary());
    s.judge = Judge::Inconclusive;
    let sim = run(s);
    assert_clean(&sim);
    assert_eq!(sim.engine.phase(), Phase::Done);
    let held = sim.notices().filter(|n| matches!(n, Notice::Held { .. })).count();
    let promoted =
        sim.notices().filter(|n| matches!(n, Notice::WavePassed { promoted: true, .. })).count();
    assert_eq!((held, promoted), (4, 4));
}

#[test]
fn a_silent_judge_holds_the_rollout_after_the_gate_timeout() {
    let mut s = Scenario::new(vec![50], Strategy::canary());
    s.judge = Judge::Silent;
    let mut sim = Sim::new(s);
    // Run until the first hold, and check when it came.
    sim.drain();
    while !sim.notices().any(|n| matches!(n, Notice::Held { .. })) {
        let t = sim.engine.poll_timeout();
        let e = sim.queue.first_key_value().map(|(k, _)| k.0);
        match (t, e) {
            (Some(t), e) if e.is_none_or(|e| t <= e) => {
                sim.now = t;
                sim.engine.handle_timeout(t);
            }
            _ => {
                let ((t, _), ev) = sim.queue.pop_first().expect("events left");
                sim.now = t;
                sim.event(ev);
            }
        }
        sim.drain();
    }
    let gate = sim.gates[0].clone();
    assert_eq!(sim.now, gate.decide_by + Timeouts::default().gate);
    assert!(matches!(sim.engine.status().stage, WaveStage::Held { .. }));
    // A late verdict is refused, the state unchanged.
    assert_eq!(
        sim.engine.handle_verdict(sim.now, gate.gate, Verdict::Pass),
        Err(EventError::StaleVerdict { gate: gate.gate })
    );
}

#[test]
fn approval_gates_wait_for_promote() {
    let approve = Gates { analysis: false, approval: true };
    let strategy = Strategy::Canary {
        steps: vec![
            CanaryStep { size: Limit::Percent(10), gates: approve },
            CanaryStep { size: Limit::Percent(100), gates: Gates::default() },
        ],
    };
    let mut sim = Sim::new(Scenario::new(vec![20], strategy));
    sim.s.bot = Bot::Promote;
    sim.run();
    assert_clean(&sim);
    assert!(sim.notices().any(|n| *n == Notice::Held { reason: HoldReason::Approval }));
    assert_eq!(sim.engine.phase(), Phase::Done);
}

// ---------------------------------------------------------------------------------------------
// Staging, losses, pauses

#[test]
fn staging_ahead_by_one_wave_tells_the_next_wave_while_the_current_one_bakes() {
    let mut s = Scenario::new(vec![100, 100], Strategy::canary());
    s.stage_ahead = StageAhead::Waves(1);
    let sim = run(s);
    assert_clean(&sim);
    assert_eq!(sim.engine.phase(), Phase::Done);
    let first_stage = sim
        .log
        .iter()
        .find_map(|c| match c {
            Command::SetDesired { desired, hosts } if desired.stage == Some(V2) => {
                Some(hosts.len())
            }
            _ => None,
        })
        .expect("a staging command");
    // The first wave (1 host) and the next (up to 5%).
    assert_eq!(first_stage, 5);
}

#[test]
fn lost_hosts_are_unavailable_deferred_and_caught_up_when_they_return() {
    let mut s = Scenario::new(vec![40], Strategy::rolling());
    s.budget.max_unavailable = Limit::Count(4);
    s.bake = Bake { first_region: secs(10), other_regions: secs(10), extensions: 0 };
    // Three hosts lost while staging (before any wave could activate them), back much later.
    s.losses = (0..3).map(|i| Loss { host: i * 7, at: secs(1), down_for: secs(4_000) }).collect();
    let sim = run(s);
    assert_clean(&sim);
    assert_eq!(sim.engine.phase(), Phase::Done);
    let stragglers = sim.notices().filter(|n| matches!(n, Notice::Straggler { .. })).count();
    let done = sim.notices().find_map(|n| match n {
        Notice::Done { stragglers } => Some(*stragglers),
        _ => None,
    });
    assert_eq!(done, Some(3));
    assert_eq!(stragglers, 3);
    assert!(sim.hosts.iter().all(|h| h.active == Some(V2)));
    // Lost hosts count as unavailable: once the losses were known, they took three of the four
    // slots, and every later batch was one host.
    let added: Vec<u32> = sim
        .notices()
        .filter_map(|n| match n {
            Notice::WaveStarted { added, .. } => Some(*added),
            _ => None,
        })
        .collect();
    assert_eq!(added[0], 4);
    assert!(added[1..].iter().all(|&a| a == 1), "{added:?}");
}

#[test]
fn the_seed_picks_the_canary_sample() {
    let first_wave = |seed| {
        let mut s = Scenario::new(vec![1000], Strategy::canary());
        s.plan_seed = seed;
        let mut engine = Rollout::new(secs(0), s.plan()).expect("plan");
        while engine.poll_command().is_some() {}
        // The first wave's ten hosts: Queued, the rest untouched.
        let mut wave: Vec<HostId> = (0..1000)
            .map(host_id)
            .filter(|&id| engine.host(id).expect("known").role == HostRole::Queued)
            .collect();
        wave.sort();
        wave
    };
    assert_eq!(first_wave(1).len(), 10);
    assert_eq!(first_wave(1), first_wave(1));
    assert_ne!(first_wave(1), first_wave(2));
    // Not simply the lowest ids.
    assert_ne!(first_wave(1), (0..10).map(host_id).collect::<Vec<_>>());
}

#[test]
fn a_blue_green_host_whose_standby_is_unhealthy_is_not_switched() {
    let mut s = Scenario::new(vec![10], Strategy::blue_green());
    s.health.max_failed = Limit::Count(1);
    let mut sim = Sim::new(s);
    sim.hosts[4].bad = true;
    sim.run();
    assert_clean(&sim);
    assert_eq!(sim.engine.phase(), Phase::Done);
    let switch = sim
        .log
        .iter()
        .find_map(|c| match c {
            Command::SetDesired { desired, hosts } if desired.active == Some(V2) => Some(hosts),
            _ => None,
        })
        .expect("a switch");
    assert_eq!(switch.len(), 9);
    assert!(!switch.contains(&host_id(4)));
    assert_eq!(sim.hosts[4].active, Some(V1));
    assert!(
        sim.notices()
            .any(|n| matches!(n, Notice::HostFailed { reason: FailReason::Unhealthy, .. }))
    );
}

#[test]
fn resume_on_an_inconclusive_gate_asks_the_judge_again() {
    let mut s = Scenario::new(vec![100], Strategy::canary());
    s.judge = Judge::InconclusiveOnce;
    s.bot = Bot::Resume;
    let sim = run(s);
    assert_clean(&sim);
    assert_eq!(sim.engine.phase(), Phase::Done);
    // The first wave was judged twice (a new gate id the second time), then passed on its own.
    assert_eq!(sim.gates.len(), 5);
    assert_eq!((sim.gates[0].wave, sim.gates[1].wave), (0, 0));
    assert_ne!(sim.gates[0].gate, sim.gates[1].gate);
    assert!(sim.gates[1].window_start > sim.gates[0].window_start);
    assert!(!sim.notices().any(|n| matches!(n, Notice::WavePassed { promoted: true, .. })));
}

#[test]
fn pause_stops_new_activations_and_resume_continues() {
    let mut s = Scenario::new(vec![30, 30], Strategy::rolling());
    s.pauses = vec![(secs(40), secs(600))];
    let sim = run(s);
    // The checker asserts that nothing is told the target while paused.
    assert_clean(&sim);
    assert_eq!(sim.engine.phase(), Phase::Done);
    assert!(sim.notices().any(|n| *n == Notice::Paused));
}

#[test]
fn abort_stops_without_touching_anything_else() {
    let mut s = Scenario::new(vec![100], Strategy::canary());
    s.abort_at = Some(secs(200));
    let sim = run(s);
    assert_clean(&sim);
    assert_eq!(sim.engine.phase(), Phase::Aborted);
    let after_abort =
        sim.log.iter().skip_while(|c| **c != Command::Notify(Notice::Aborted)).skip(1).count();
    assert_eq!(after_abort, 0);
    assert!(sim.engine.is_finished());
}

// ---------------------------------------------------------------------------------------------
// Errors

fn small_plan() -> Plan {
    Scenario::new(vec![4, 4], Strategy::canary()).plan()
}

#[test]
fn bad_plans_are_refused_with_the_reason() {
    let mut p = small_plan();
    p.hosts.push(p.hosts[0]);
    assert_eq!(Rollout::new(secs(0), p).err(), Some(PlanError::DuplicateHost { host: host_id(7) }));

    let mut p = small_plan();
    p.hosts[0].region = RegionIndex(9);
    assert!(matches!(Rollout::new(secs(0), p).err(), Some(PlanError::UnknownRegion { .. })));

    let mut p = small_plan();
    p.strategy = Strategy::Canary {
        steps: vec![CanaryStep { size: Limit::Percent(50), gates: Gates::default() }],
    };
    assert_eq!(
        Rollout::new(secs(0), p).err(),
        Some(PlanError::LastStepNotFull { last: Limit::Percent(50) })
    );

    let mut p = small_plan();
    p.budget.max_unavailable = Limit::Percent(101);
    assert!(matches!(Rollout::new(secs(0), p).err(), Some(PlanError::InvalidLimit { .. })));

    let mut p = small_plan();
    p.budget.min_healthy = Limit::Percent(100);
    assert!(matches!(Rollout::new(secs(0), p).err(), Some(PlanError::MinHealthyTooHigh { .. })));

    let mut p = small_plan();
    p.hosts.clear();
    assert_eq!(Rollout::new(secs(0), p).err(), Some(PlanError::NoHosts));

    let mut p = small_plan();
    p.regions.push("region-0".into());
    assert!(matches!(Rollout::new(secs(0), p).err(), Some(PlanError::DuplicateRegion { .. })));

    let mut p = small_plan();
    p.timeouts.activation = Duration::ZERO;
    assert_eq!(
        Rollout::new(secs(0), p).err(),
        Some(PlanError::NotPositive { field: "timeouts.activation" })
    );
}

#[test]
fn events_that_do_not_fit_are_refused_and_change_nothing() {
    let mut engine = Rollout::new(secs(0), small_plan()).expect("plan");
    while engine.poll_command().is_some() {}
    let before = engine.snapshot();
    assert_eq!(
        engine.handle_host(secs(1), HostId(1), HostEvent::Lost),
        Err(EventError::UnknownHost { host: HostId(1) })
    );
    assert_eq!(
        engine.handle_verdict(secs(1), GateId(5), Verdict::Pass),
        Err(EventError::StaleVerdict { gate: GateId(5) })
    );
    assert!(matches!(
        engine.handle_operator(secs(1), Operator::Promote),
        Err(EventError::NotApplicable { command: Operator::Promote, phase: Phase::Running, .. })
    ));
    assert!(matches!(
        engine.handle_operator(secs(1), Operator::Resume),
        Err(EventError::NotApplicable { command: Operator::Resume, .. })
    ));
    assert_eq!(engine.snapshot(), before);
    assert_eq!(engine.poll_command(), None);
    engine.handle_operator(secs(1), Operator::Pause).expect("pause");
    assert!(matches!(
        engine.handle_operator(secs(1), Operator::Pause),
        Err(EventError::NotApplicable { command: Operator::Pause, .. })
    ));
    engine.handle_operator(secs(1), Operator::Abort).expect("abort");
    assert!(matches!(
        engine.handle_operator(secs(2), Operator::Rollback),
        Err(EventError::NotApplicable { phase: Phase::Aborted, .. })
    ));
}

#[test]
fn snapshots_of_another_version_or_tampered_are_refused() {
    let engine = Rollout::new(secs(0), small_plan()).expect("plan");
    let mut json: serde_json::Value = serde_json::to_value(engine.snapshot()).expect("serialize");
    json["version"] = serde_json::json!(SNAPSHOT_VERSION + 1);
    let snapshot: Snapshot = serde_json::from_value(json.clone()).expect("deserialize");
    assert_eq!(
        Rollout::restore(snapshot).err(),
        Some(RestoreError::Version { expected: SNAPSHOT_VERSION, found: SNAPSHOT_VERSION + 1 })
    );
    json["version"] = serde_json::json!(SNAPSHOT_VERSION);
    json["state"]["hosts"][0]["lost"] = serde_json::json!(true);
    let snapshot: Snapshot = serde_json::from_value(json).expect("deserialize");
    assert_eq!(Rollout::restore(snapshot).err(), Some(RestoreError::Corrupt { what: "counters" }));
}

#[test]
fn desired_state_answers_heartbeats() {
    let mut engine = Rollout::new(secs(0), small_plan()).expect("plan");
    while engine.poll_command().is_some() {}
    let d = engine.desired(host_id(0)).expect("known");
    assert_eq!(d.active, Some(V1));
    assert_eq!(d.stage, Some(V2));
    assert_eq!(engine.desired(HostId(2)), Err(EventError::UnknownHost { host: HostId(2) }));
}

// ---------------------------------------------------------------------------------------------
// Snapshot and determinism

#[test]
fn restoring_mid_rollout_gives_the_same_commands_as_not_stopping() {
    let mut s = Scenario::new(vec![60, 40], Strategy::canary());
    s.losses = vec![Loss { host: 5, at: secs(30), down_for: secs(300) }];
    s.fail_activation_fraction = 0.02;
    s.health.max_failed = Limit::Percent(10);
    let straight = run(s.clone());
    assert_clean(&straight);
    for cut in [1, 10, 100, 500, straight.events / 2, straight.events - 1] {
        let mut sim = Sim::new(s.clone());
        sim.restore_after = Some(cut);
        sim.run();
        assert_eq!(sim.log, straight.log, "restored after {cut} events");
    }
}

#[test]
fn the_host_order_in_the_plan_does_not_matter() {
    let s = Scenario::new(vec![30, 30], Strategy::canary());
    let a = Rollout::new(secs(0), s.plan()).expect("plan");
    let mut plan = s.plan();
    plan.hosts.reverse();
    let b = Rollout::new(secs(0), plan).expect("plan");
    assert_eq!(a.snapshot(), b.snapshot());
}

// ---------------------------------------------------------------------------------------------
// Scale

/// 50,000 hosts in three regions through the default canary. No timing assertion: the count of
/// events says what the engine handled (CPU time is measured by benchmarks, not tests).
#[test]
fn fifty_thousand_hosts_complete_a_canary() {
    let mut s = Scenario::new(vec![20_000, 20_000, 10_000], Strategy::canary());
    s.losses =
        (0..50).map(|i| Loss { host: i * 997, at: secs(i as u64), down_for: secs(600) }).collect();
    let sim = run(s);
    assert_clean(&sim);
    assert_eq!(sim.engine.phase(), Phase::Done);
    let totals = sim.engine.status().totals;
    assert_eq!(totals.updated, 50_000);
    // Three reports per host at least (staged, active, healthy), plus steps and timers.
    assert!(sim.events > 150_000, "{} events", sim.events);
    assert_eq!(waves(&sim).len(), 15);
    assert_eq!(sim.gates.len(), 12);
}

// ---------------------------------------------------------------------------------------------
// Properties

fn limit_strategy() -> impl proptest::strategy::Strategy<Value = Limit> {
    prop_oneof![(1u32..6).prop_map(Limit::Count), (5u32..60).prop_map(Limit::Percent)]
}

fn rollout_strategy() -> impl proptest::strategy::Strategy<Value = Strategy> {
    let gates = (any::<bool>(), proptest::bool::weighted(0.2))
        .prop_map(|(analysis, approval)| Gates { analysis, approval });
    let steps = proptest::collection::btree_set(1u32..100, 0..4).prop_flat_map(move |cuts| {
        let n = cuts.len() + 1;
        proptest::collection::vec(gates.clone(), n).prop_map(move |g| {
            let mut sizes: Vec<Limit> = cuts.iter().map(|&p| Limit::Percent(p)).collect();
            sizes.push(Limit::Percent(100));
            Strategy::Canary {
                steps: sizes
                    .into_iter()
                    .zip(g)
                    .map(|(size, gates)| CanaryStep { size, gates })
                    .collect(),
            }
        })
    });
    let rolling = (any::<bool>(), proptest::bool::weighted(0.2))
        .prop_map(|(analysis, approval)| Strategy::Rolling { gates: Gates { analysis, approval } });
    let blue_green = proptest::bool::weighted(0.2)
        .prop_map(|approval| Strategy::BlueGreen { gates: Gates { analysis: false, approval } });
    prop_oneof![2 => steps, 1 => rolling, 1 => blue_green, 1 => Just(Strategy::canary())]
}

fn scenario_strategy(judges: Vec<Judge>) -> impl proptest::strategy::Strategy<Value = Scenario> {
    let judge = proptest::sample::select(judges);
    (
        proptest::collection::vec(1u32..40, 1..4),
        rollout_strategy(),
        (limit_strategy(), prop_oneof![Just(Limit::Count(0)), (0u32..40).prop_map(Limit::Percent)]),
        prop_oneof![(0u32..3).prop_map(Limit::Count), (0u32..30).prop_map(Limit::Percent)],
        (
            any::<u64>(),
            any::<u64>(),
            prop_oneof![Just(StageAhead::All), (0u16..3).prop_map(StageAhead::Waves)],
        ),
        prop_oneof![
            // Most runs healthy, so that whole rollouts (late waves, stragglers) are covered.
            3 => Just((0.0, 0.0, false)),
            1 => (0.0f64..0.3, 0.0f64..0.1, proptest::bool::weighted(0.2)),
        ],
        (
            prop_oneof![3 => Just(0.0), 1 => 0.0f64..0.1],
            any::<bool>(),
            prop_oneof![Just(1000u32), 1u32..6],
        ),
        judge,
        proptest::collection::vec((0usize..1000, 0u64..2_000, 0u64..1_000), 0..6),
        proptest::collection::vec((0u64..2_000, 1u64..600), 0..2),
    )
        .prop_map(
            |(
                regions,
                strategy,
                (max_unavailable, min_healthy),
                max_failed,
                seeds,
                faults,
                (fail_stage, duplicates, gate_sample),
                judge,
                losses,
                pauses,
            )| {
                let total: u32 = regions.iter().sum();
                let mut s = Scenario::new(regions, strategy);
                s.budget = Budget { max_unavailable, min_healthy };
                s.health = HealthGate { max_failed };
                s.bake = Bake { first_region: secs(90), other_regions: secs(30), extensions: 0 };
                (s.plan_seed, s.sim_seed, s.stage_ahead) = seeds;
                let (bad, fail_activation, all_bad) = faults;
                s.bad_fraction = if all_bad { 1.0 } else { bad };
                s.fail_activation_fraction = fail_activation;
                s.fail_stage_fraction = fail_stage;
                s.duplicates = duplicates;
                s.gate_sample = gate_sample;
                s.judge = judge;
                s.bot = Bot::Random;
                s.losses = losses
                    .into_iter()
                    .map(|(h, at, down)| Loss {
                        host: h % total as usize,
                        at: secs(at),
                        down_for: secs(down),
                    })
                    .collect();
                // One loss per host, so that a host never returns before it was lost.
                s.losses.sort_by_key(|l| l.host);
                s.losses.dedup_by_key(|l| l.host);
                s.pauses = pauses.into_iter().map(|(at, len)| (secs(at), secs(len))).collect();
                s
            },
        )
        .prop_filter("min_healthy leaves room", |s| {
            s.regions.iter().all(|&n| s.budget.min_healthy.ceil_of(n) < n)
        })
}

/// 160 cases per property, or `PROPTEST_CASES` (to run many more by hand).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(160)
}

const ALL_JUDGES: [Judge; 6] = [
    Judge::Pass,
    Judge::Fail,
    Judge::Inconclusive,
    Judge::FromHealth,
    Judge::Silent,
    Judge::Random,
];

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // Integration tests have no lib.rs beside them for proptest's default location.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/rollout.txt"
        )))),
        ..ProptestConfig::default()
    })]

    /// Never more unavailable than the budget allows, never a host touched outside its wave,
    /// never an activation before staging or while paused; and the run ends done (every host on
    /// the target but the failed ones) or rolled back (every host on its previous release).
    #[test]
    fn invariants_hold_and_every_run_ends_cleanly(s in scenario_strategy(ALL_JUDGES.to_vec())) {
        let sim = run(s);
        let problems = sim.verdict();
        prop_assert!(problems.is_empty(), "{:#?}", problems);
    }

    /// A failed gate always ends with every touched host back on its previous release.
    #[test]
    fn a_failed_gate_always_rolls_every_touched_host_back(
        mut s in scenario_strategy(vec![Judge::Fail]),
    ) {
        // Analysis on every wave that can have a baseline, and a first wave that has one
        // (a region of two or more hosts, a first step short of 100%).
        s.strategy = match s.strategy {
            Strategy::Canary { mut steps } => {
                if steps.len() == 1 {
                    let size = Limit::Percent(10);
                    steps.insert(0, CanaryStep { size, gates: Gates::default() });
                }
                for step in &mut steps { step.gates.analysis = true; }
                Strategy::Canary { steps }
            }
            Strategy::Rolling { gates } => {
                Strategy::Rolling { gates: Gates { analysis: true, ..gates } }
            }
            Strategy::BlueGreen { .. } => Strategy::canary(),
        };
        s.regions[0] = s.regions[0].max(2);
        let sim = run(s);
        let problems = sim.verdict();
        prop_assert!(problems.is_empty(), "{:#?}", problems);
        let phase = sim.engine.phase();
        // Every run where the judge was asked ends rolled back (the verdict is always Fail;
        // a rollback for failures or by the operator may come first). Runs whose waves never
        // had a baseline (a batch covering a whole small region) never ask.
        if !sim.gates.is_empty() {
            prop_assert!(matches!(phase, Phase::RolledBack { .. }), "{:?}", phase);
            for id in sim.engine.touched() {
                let host = &sim.hosts[host_index(id)];
                prop_assert_eq!(host.active, Some(host.previous), "{}", id);
            }
        }
    }

    /// The same plan, seed and events give the same commands.
    #[test]
    fn same_seed_and_events_same_commands(s in scenario_strategy(ALL_JUDGES.to_vec())) {
        let a = run(s.clone());
        let b = run(s);
        prop_assert_eq!(a.events, b.events);
        prop_assert!(a.log == b.log);
    }

    /// Snapshotting through JSON and restoring at any point changes nothing.
    #[test]
    fn restore_at_any_point_continues_identically(
        s in scenario_strategy(ALL_JUDGES.to_vec()),
        cut in 0.0f64..1.0,
    ) {
        let straight = run(s.clone());
        let mut sim = Sim::new(s);
        sim.restore_after = Some(((straight.events as f64 * cut) as u64).max(1));
        sim.run();
        prop_assert!(sim.log == straight.log);
    }
}

#[test]
fn a_rolling_first_install_takes_hosts_running_nothing_in_budget_sized_batches() {
    // Hosts that run nothing of the service are unavailable from the start; activating them
    // costs nothing, so the budget (which they use up) must not stall the rollout.
    let hosts: Vec<HostSpec> = (0..8)
        .map(|i| HostSpec { id: host_id(i), region: RegionIndex(0), previous: None })
        .collect();
    let mut plan = Plan::new("web", V2, vec!["eu".into()], hosts, Strategy::rolling());
    plan.budget = Budget { max_unavailable: Limit::Percent(25), ..Budget::default() };
    plan.bake = Bake { first_region: secs(1), other_regions: secs(1), extensions: 0 };
    let mut engine = Rollout::new(secs(0), plan).expect("plan");
    let mut now = secs(0);
    for i in 0..8 {
        engine.handle_host(now, host_id(i), HostEvent::Inactive).expect("report");
        engine.handle_host(now, host_id(i), HostEvent::Staged { manifest: V2 }).expect("report");
    }
    let mut active = [false; 8];
    let mut batches = Vec::new();
    for _ in 0..100 {
        let mut told = Vec::new();
        while let Some(c) = engine.poll_command() {
            if let Command::SetDesired { desired, hosts } = c {
                if desired.active == Some(V2) {
                    told.extend(hosts.iter().map(|h| host_index(*h)).filter(|&i| !active[i]));
                }
            }
        }
        if !told.is_empty() {
            batches.push(told.len());
        }
        now += ms(100);
        for i in told {
            active[i] = true;
            engine.handle_host(now, host_id(i), HostEvent::Active { manifest: V2 }).expect("r");
            engine
                .handle_host(now, host_id(i), HostEvent::Health { manifest: V2, healthy: true })
                .expect("r");
        }
        if let Some(t) = engine.poll_timeout() {
            if t <= now + secs(1) {
                now = now.max(t);
                engine.handle_timeout(now);
            }
        }
        if engine.phase() == Phase::Done {
            break;
        }
    }
    assert_eq!(engine.phase(), Phase::Done);
    assert!(active.iter().all(|a| *a));
    assert_eq!(batches, vec![2, 2, 2, 2], "batches of 25% of 8 hosts");
}
