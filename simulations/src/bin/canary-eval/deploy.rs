//! A canary deployment driven end to end: the real rollout engine (`coordinator::rollout`)
//! with the real judge as its analysis gate, over a simulated fleet whose canary hosts serve
//! the bad release's traffic.

use std::time::Duration;

use anyhow::Context as _;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use fleetwave_coordinator::analysis::{Buckets, Judge, JudgeConfig};
use fleetwave_coordinator::rollout::{
    Command, HostEvent, HostId, HostSpec, ManifestId, Notice, Plan, RegionIndex, Rollout, Strategy,
};

use crate::traffic::{Model, Stream};

const PREVIOUS: ManifestId = ManifestId([1; 32]);
const TARGET: ManifestId = ManifestId([2; 32]);

/// How a deployment ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Rolled back on the judge's verdict.
    RolledBack,
    /// Held for a human (inconclusive, or the judge silent).
    Held,
    /// Every step passed.
    Done,
    /// Still running at the time limit.
    Running,
}

/// One deployment's result.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Outcome {
    pub(crate) end: End,
    /// Hosts that ever ran the target.
    pub(crate) ever_ran: u32,
    /// Time from the deployment's start to its end.
    pub(crate) at: Duration,
}

/// The fleet and its traffic.
#[derive(Clone, Debug)]
pub(crate) struct Fleet {
    pub(crate) hosts: u32,
    /// Requests per second over the whole fleet.
    pub(crate) rate: f64,
    pub(crate) interval: Duration,
    pub(crate) buckets: Buckets,
    pub(crate) config: JudgeConfig,
}

/// Rolls `target` (whose hosts serve `canary` traffic) out over the fleet, canary strategy
/// 1% -> 5% -> 25% -> 50% -> 100% with the default bakes (10 minutes per step).
pub(crate) fn run(
    fleet: &Fleet,
    canary: Model,
    baseline: Model,
    seed: u64,
) -> anyhow::Result<Outcome> {
    let specs = (0..u64::from(fleet.hosts))
        .map(|i| HostSpec { id: HostId(i), region: RegionIndex(0), previous: Some(PREVIOUS) })
        .collect();
    let mut plan = Plan::new("web", TARGET, vec!["region-0".to_owned()], specs, Strategy::canary());
    // Judge the whole 5% step (2,500 hosts of 50,000), not the default sample of 1,000.
    plan.gate_sample = fleet.hosts.div_ceil(20);
    plan.seed = seed;
    let per_host = fleet.rate / f64::from(fleet.hosts);
    let seconds = fleet.interval.as_secs_f64();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut now = Duration::ZERO;
    let mut rollout = Rollout::new(now, plan).context("plan")?;
    for i in 0..u64::from(fleet.hosts) {
        rollout.handle_host(now, HostId(i), HostEvent::Staged { manifest: TARGET })?;
    }
    let mut ever = vec![false; fleet.hosts as usize];
    let mut pending: Vec<(HostId, ManifestId)> = Vec::new();
    let mut gate: Option<(Judge, Stream)> = None;
    let limit = Duration::from_secs(4 * 3600);
    let end = loop {
        // Hosts told to switch report the release active and healthy one interval later.
        for (host, manifest) in std::mem::take(&mut pending) {
            if manifest == TARGET {
                ever[host.0 as usize] = true;
            }
            rollout.handle_host(now, host, HostEvent::Active { manifest })?;
            rollout.handle_host(now, host, HostEvent::Health { manifest, healthy: true })?;
        }
        if rollout.poll_timeout().is_some_and(|t| t <= now) {
            rollout.handle_timeout(now);
        }
        if let Some((judge, stream)) = &mut gate {
            let w = stream.window(&mut rng, &fleet.buckets, now, seconds);
            judge.handle_window(now, &w)?;
            if let Some(v) = judge.poll_verdict(now) {
                let id = judge.gate().context("judge made for a gate")?;
                gate = None;
                // A verdict on a gate the engine closed meanwhile (promoted, timed out) is
                // stale: nothing to do.
                let _ = rollout.handle_verdict(now, id, v);
            }
        }
        let mut finished = None;
        while let Some(c) = rollout.poll_command() {
            match c {
                Command::SetDesired { desired, hosts } => {
                    if let Some(m) = desired.active {
                        pending.extend(hosts.into_iter().map(|h| (h, m)));
                    }
                }
                Command::EvaluateGate(request) => {
                    let judge = Judge::for_gate(fleet.config.clone(), &request)?;
                    let c = Model { rate: per_host * request.canary.len() as f64, ..canary };
                    let b = Model { rate: per_host * request.baseline.len() as f64, ..baseline };
                    gate = Some((judge, Stream::new(c, b, &fleet.buckets)));
                }
                Command::Notify(notice) => match notice {
                    Notice::RolledBack { .. } => finished = Some(End::RolledBack),
                    Notice::Held { .. } => finished = Some(End::Held),
                    Notice::Done { .. } => finished = Some(End::Done),
                    _ => {}
                },
            }
        }
        if let Some(end) = finished {
            break end;
        }
        if now >= limit {
            break End::Running;
        }
        now += fleet.interval;
    };
    // Told to run the target, whether or not it had reported it active yet.
    let told = rollout.touched().count() as u32;
    let ever_ran = told.max(ever.iter().filter(|&&e| e).count() as u32);
    Ok(Outcome { end, ever_ran, at: now })
}
