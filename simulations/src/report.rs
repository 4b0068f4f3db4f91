//! What a run found: figures beside their lower bounds, for people ([`Report::summary`]) and
//! tools (serde JSON).
//!
//! # The lower bound
//!
//! For each region of `N` hosts and an artifact of `F` bytes:
//!
//! ```text
//! T_min = max( F / u_src, F / d_host, N * F / (u_src + sum of u_host), F / u_origin, F / wan )
//! ```
//!
//! `u_src` is the upload of the region's source (its caches together, or the origin for a
//! region without caches), `d_host` the download of the region's slowest host class, and
//! `sum of u_host` the upload of all its hosts: every host must receive `F`, through its own
//! downlink, from uploads that add up to at most `u_src + sum of u_host`. The last two terms are
//! the links every byte crosses to enter the region (the origin's upload and the region's WAN
//! link). For the fleet, the origin must also send each region fed by it at least one copy:
//! `R * F / u_origin`. The time compared with `T_min` is from the start of staging to the last
//! live host holding every chunk; the whole-artifact check that follows is reported apart.

use serde::Serialize;

use crate::artifact::Artifact;
use crate::engine::secs;
use crate::scenario::Scenario;
use crate::world::{Outcome, Rel, Traffic};

/// The lower bound of one region, with its terms (seconds).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bound {
    /// The bound: the largest term.
    pub t_min: f64,
    /// F / u_src.
    pub source: f64,
    /// F / d_host of the slowest class.
    pub host_down: f64,
    /// N F / (u_src + sum u_host).
    pub aggregate: f64,
    /// F / u_origin.
    pub origin: f64,
    /// F / WAN.
    pub wan: f64,
}

/// One region's figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RegionReport {
    /// Name.
    pub name: String,
    /// Hosts.
    pub hosts: u32,
    /// Caches.
    pub caches: u32,
    /// The lower bound.
    pub bound: Bound,
    /// Last live host holding every chunk (s); `None` if one never did.
    pub complete_last: Option<f64>,
    /// Median host.
    pub complete_p50: Option<f64>,
    /// 90th percentile host.
    pub complete_p90: Option<f64>,
    /// `complete_last / t_min`.
    pub ratio: Option<f64>,
    /// Last live host staged (whole artifact verified).
    pub staged_last: Option<f64>,
    /// Live hosts that never held every chunk.
    pub incomplete: u32,
    /// Hosts dead at the end.
    pub dead: u32,
    /// Origin bytes into the region, in artifacts (bytes / F).
    pub origin_egress_per_artifact: f64,
    /// The region's caches' bytes sent, in artifacts.
    pub cache_egress_per_artifact: f64,
    /// When each cache held every chunk (s).
    pub caches_complete: Vec<Option<f64>>,
}

/// Where the hosts' chunks came from, and what went wrong, over all live hosts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SwarmReport {
    /// Bytes from region peers.
    pub from_peers: u64,
    /// Bytes from caches.
    pub from_caches: u64,
    /// Bytes from the origin.
    pub from_origin: u64,
    /// Bytes already on disk.
    pub from_disk: u64,
    /// Verified duplicates discarded (endgame, late answers).
    pub duplicate_bytes: u64,
    /// Pieces that failed their hash.
    pub hash_mismatches: u64,
    /// Chunks passed on while arriving whose arriving copy failed (`forward_arriving`).
    pub withdrawn: u64,
    /// Peers banned.
    pub bans: u64,
    /// Requests timed out.
    pub timeouts: u64,
    /// Origin permits granted and denied.
    pub permits_granted: u64,
    /// Origin permits denied.
    pub permits_denied: u64,
}

/// The rollout's course.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RolloutReport {
    /// The engine's final phase.
    pub phase: String,
    /// When it reported done (s).
    pub done: Option<f64>,
    /// When the rollback started and ended (s), and how many hosts it had to switch back.
    pub rollback: Option<RollbackReport>,
    /// Hosts the engine counts as updated at the end.
    pub updated: u32,
    /// Hosts running the target at the end.
    pub on_target: u32,
    /// Hosts running the previous release at the end.
    pub on_previous: u32,
    /// Every notice, with its time (s).
    pub notices: Vec<(f64, String)>,
}

/// A rollback.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RollbackReport {
    /// Why (the engine's reason).
    pub reason: String,
    /// Start (s).
    pub started: f64,
    /// Every touched host confirmed on its previous release, or the engine's timeout (s).
    pub finished: Option<f64>,
    /// `finished - started`.
    pub duration: Option<f64>,
    /// Hosts running the target when it started.
    pub hosts_on_target_at_start: u32,
    /// Touched hosts not confirmed back.
    pub unconfirmed: Option<u32>,
}

/// Checks a run must pass; the CI test asserts them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Invariants {
    /// Every live host holds every chunk.
    pub all_live_complete: bool,
    /// Every host that finished has the manifest's content (its written chunks' hashes).
    pub all_verified: bool,
    /// After a rollback: every live host runs the previous release.
    pub rolled_back_to_previous: Option<bool>,
    /// Events the cores refused (should be none).
    pub core_errors: u64,
}

/// Series for tools and plots, one value per bucket.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SeriesReport {
    /// Bucket width (s).
    pub bucket: f64,
    /// Origin egress, bytes per second.
    pub origin_bytes_per_sec: Vec<f64>,
    /// Cache egress per region, bytes per second.
    pub cache_bytes_per_sec: Vec<Vec<f64>>,
    /// Hosts holding every chunk.
    pub complete: Vec<u32>,
    /// Hosts staged.
    pub staged: Vec<u32>,
    /// Hosts running the target.
    pub on_target: Vec<u32>,
    /// Hosts the rollout counts updated.
    pub updated: Vec<u32>,
    /// Mean downlink use (0-1) of the live hosts still staging, sampled at each bucket's end
    /// (the rates of that instant, not a mean over the bucket).
    pub staging_down_use: Vec<f64>,
    /// Mean uplink use (0-1) of the live hosts holding at least one chunk, sampled likewise.
    pub holder_up_use: Vec<f64>,
    /// Live hosts still staging that hold a chunk but use under half their uplink, sampled
    /// likewise: upload capacity idle while the fleet still downloads.
    pub idle_holders: Vec<u32>,
}

impl SeriesReport {
    /// Where the staging time went, from the link-use series: when the staging hosts'
    /// downlinks first reached half and 90 % use, their median use from then until the first
    /// host held every chunk, and the most hosts holding chunks with idle uplinks (and when).
    /// `None` if no host was sampled staging.
    pub fn staging_use(&self) -> Option<StagingUse> {
        let at = |i: usize| i as f64 * self.bucket;
        let reached = |x: f64| self.staging_down_use.iter().position(|&u| u >= x);
        let ninety = reached(0.9);
        let first_done = self.complete.iter().position(|&n| n > 0).unwrap_or(self.complete.len());
        let mut steady: Vec<f64> = match ninety {
            Some(i) if i < first_done => self.staging_down_use[i..first_done].to_vec(),
            _ => Vec::new(),
        };
        steady.sort_by(f64::total_cmp);
        let (peak, when) = self
            .idle_holders
            .iter()
            .enumerate()
            .max_by_key(|&(i, &n)| (n, std::cmp::Reverse(i)))
            .map_or((0, 0.0), |(i, &n)| (n, at(i)));
        self.staging_down_use.iter().any(|&u| u > 0.0).then(|| StagingUse {
            half_at: reached(0.5).map(at),
            ninety_at: ninety.map(at),
            steady_median: steady.get(steady.len() / 2).copied(),
            idle_holders_peak: peak,
            idle_holders_peak_at: when,
        })
    }
}

/// See [`SeriesReport::staging_use`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StagingUse {
    /// First sample with the staging hosts' downlinks at least half used (s).
    pub half_at: Option<f64>,
    /// First sample with them at least 90 % used (s).
    pub ninety_at: Option<f64>,
    /// Their median use from `ninety_at` until the first host held every chunk.
    pub steady_median: Option<f64>,
    /// The most staging hosts holding a chunk with their uplink under half used.
    pub idle_holders_peak: u32,
    /// When that was (s).
    pub idle_holders_peak_at: f64,
}

/// A run's report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Seed.
    pub seed: u64,
    /// Hosts.
    pub hosts: u64,
    /// Artifact bytes.
    pub artifact_bytes: u64,
    /// Chunks.
    pub chunks: u32,
    /// Simulated time at the end (s).
    pub simulated: f64,
    /// Events processed.
    pub events: u64,
    /// Per region.
    pub regions: Vec<RegionReport>,
    /// The fleet's lower bound: the regions' and `R * F / u_origin`.
    pub fleet_t_min: f64,
    /// Last live host holding every chunk, fleet-wide (s).
    pub fleet_complete_last: Option<f64>,
    /// `fleet_complete_last / fleet_t_min`.
    pub fleet_ratio: Option<f64>,
    /// Origin egress over all regions, in artifacts.
    pub origin_egress_per_artifact: f64,
    /// Host completion times (s), percentiles 0..=100, live hosts that completed.
    pub completion_percentiles: Vec<f64>,
    /// Swarm counters.
    pub swarm: SwarmReport,
    /// Events by kind (what a run costs).
    pub traffic: Traffic,
    /// The rollout, if one ran.
    pub rollout: Option<RolloutReport>,
    /// Checks.
    pub invariants: Invariants,
    /// Series.
    pub series: SeriesReport,
    /// Completion times of every live host that completed, by region (s); not serialized.
    #[serde(skip)]
    pub completion_by_region: Vec<Vec<f64>>,
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted.get(i.min(sorted.len() - 1)).copied()
}

/// The lower bound of region `r` (see the module docs).
pub fn bound(sc: &Scenario, art: &Artifact, r: usize) -> Bound {
    let f = art.size() as f64;
    let region = &sc.regions[r];
    let n = f64::from(region.hosts);
    let origin_up = sc.network.origin_up.bytes_per_sec();
    let u_src = if region.caches > 0 {
        region.cache_up.bytes_per_sec() * f64::from(region.caches)
    } else {
        origin_up
    };
    let d_min = sc
        .host_classes
        .iter()
        .filter(|c| c.share > 0.0)
        .map(|c| c.down.bytes_per_sec())
        .fold(f64::INFINITY, f64::min);
    let sum_up: f64 = sc.host_classes.iter().map(|c| c.share * n * c.up.bytes_per_sec()).sum();
    let b = Bound {
        t_min: 0.0,
        source: f / u_src,
        host_down: f / d_min,
        aggregate: n * f / (u_src + sum_up),
        origin: f / origin_up,
        wan: f / region.wan.bytes_per_sec(),
    };
    let t_min =
        [b.source, b.host_down, b.aggregate, b.origin, b.wan].into_iter().fold(0.0, f64::max);
    Bound { t_min, ..b }
}

impl Report {
    /// The report of `outcome`.
    pub fn new(sc: &Scenario, art: &Artifact, outcome: &Outcome) -> Self {
        let f = art.size() as f64;
        let mut regions = Vec::new();
        let mut by_region: Vec<Vec<f64>> = vec![Vec::new(); sc.regions.len()];
        let mut all = Vec::new();
        let mut incomplete = vec![0u32; sc.regions.len()];
        let mut dead = vec![0u32; sc.regions.len()];
        let mut staged_last = vec![None::<f64>; sc.regions.len()];
        for h in &outcome.hosts {
            let r = usize::from(h.region);
            if !h.alive {
                dead[r] += 1;
                continue;
            }
            match h.complete {
                Some(t) => {
                    by_region[r].push(secs(t));
                    all.push(secs(t));
                }
                None => incomplete[r] += 1,
            }
            if let Some(t) = h.staged {
                let s = secs(t);
                staged_last[r] = Some(staged_last[r].map_or(s, |m: f64| m.max(s)));
            }
        }
        for v in &mut by_region {
            v.sort_by(f64::total_cmp);
        }
        all.sort_by(f64::total_cmp);
        for (r, spec) in sc.regions.iter().enumerate() {
            let b = bound(sc, art, r);
            let times = &by_region[r];
            let last = if incomplete[r] == 0 { times.last().copied() } else { None };
            let caches_complete = outcome
                .caches
                .iter()
                .filter(|c| usize::from(c.0) == r)
                .map(|c| c.1.map(secs))
                .collect();
            regions.push(RegionReport {
                name: spec.name.clone(),
                hosts: spec.hosts,
                caches: spec.caches,
                ratio: last.map(|l| l / b.t_min),
                bound: b,
                complete_last: last,
                complete_p50: percentile(times, 50.0),
                complete_p90: percentile(times, 90.0),
                staged_last: staged_last[r],
                incomplete: incomplete[r],
                dead: dead[r],
                origin_egress_per_artifact: outcome.origin_to_region[r] as f64 / f,
                cache_egress_per_artifact: outcome.cache_egress[r] as f64 / f,
                caches_complete,
            });
        }
        let fed_by_origin = sc.regions.iter().filter(|r| r.hosts > 0).count() as f64;
        let origin_term = fed_by_origin * f / sc.network.origin_up.bytes_per_sec();
        let fleet_t_min = regions.iter().map(|r| r.bound.t_min).fold(origin_term, f64::max);
        let all_done = incomplete.iter().all(|&i| i == 0);
        let fleet_last = if all_done { all.last().copied() } else { None };
        let p = &outcome.progress;
        let swarm = SwarmReport {
            from_peers: p.peer.bytes,
            from_caches: p.cache.bytes,
            from_origin: p.origin.bytes,
            from_disk: p.disk.bytes,
            duplicate_bytes: p.duplicates.bytes,
            hash_mismatches: p.hash_mismatches,
            withdrawn: p.withdrawn,
            bans: p.bans,
            timeouts: p.timeouts,
            permits_granted: outcome.permits.0,
            permits_denied: outcome.permits.1,
        };
        let on_target = outcome.hosts.iter().filter(|h| h.running == Rel::Target).count() as u32;
        let on_previous =
            outcome.hosts.iter().filter(|h| h.running == Rel::Previous).count() as u32;
        let rollout =
            outcome.phase.map(|phase| rollout_report(outcome, phase, on_target, on_previous));
        let rolled_back = rollout
            .as_ref()
            .and_then(|r| r.rollback.as_ref())
            .map(|_| outcome.hosts.iter().filter(|h| h.alive).all(|h| h.running == Rel::Previous));
        let invariants = Invariants {
            all_live_complete: all_done,
            all_verified: outcome.hosts.iter().filter(|h| h.staged.is_some()).all(|h| h.verified),
            rolled_back_to_previous: rolled_back,
            core_errors: outcome.core_errors,
        };
        let bucket = sc.run.bucket.as_secs_f64();
        let rate = |v: &Vec<u64>| v.iter().map(|&b| b as f64 / bucket).collect::<Vec<f64>>();
        let s = &outcome.series;
        let series = SeriesReport {
            bucket,
            origin_bytes_per_sec: rate(&s.origin),
            cache_bytes_per_sec: s.cache.iter().map(rate).collect(),
            complete: s.complete.clone(),
            staged: s.staged.clone(),
            on_target: s.on_target.clone(),
            updated: s.updated.clone(),
            staging_down_use: s.staging_down_use.clone(),
            holder_up_use: s.holder_up_use.clone(),
            idle_holders: s.idle_holders.clone(),
        };
        let origin_total: u64 = outcome.origin_to_region.iter().sum();
        Report {
            scenario: sc.name.clone(),
            seed: sc.seed,
            hosts: sc.host_count(),
            artifact_bytes: art.size(),
            chunks: art.chunk_count(),
            simulated: secs(outcome.end),
            events: outcome.events,
            fleet_ratio: fleet_last.map(|l| l / fleet_t_min),
            regions,
            fleet_t_min,
            fleet_complete_last: fleet_last,
            origin_egress_per_artifact: origin_total as f64 / f,
            completion_percentiles: (0..=100)
                .filter_map(|p| percentile(&all, f64::from(p)))
                .collect(),
            swarm,
            traffic: outcome.traffic,
            rollout,
            invariants,
            series,
            completion_by_region: by_region,
        }
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let _ = writeln!(
            s,
            "scenario {} (seed {}): {} hosts, {:.1} MB in {} chunks; simulated {:.1} s, {} events",
            self.scenario,
            self.seed,
            self.hosts,
            self.artifact_bytes as f64 / 1e6,
            self.chunks,
            self.simulated,
            self.events
        );
        let _ = writeln!(
            s,
            "{:<12} {:>6} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8} {:>7}",
            "region",
            "hosts",
            "T_min s",
            "last s",
            "p50 s",
            "p90 s",
            "ratio",
            "staged s",
            "origin/F",
            "cache/F"
        );
        for r in &self.regions {
            let _ = writeln!(
                s,
                "{:<12} {:>6} {:>8.2} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8.3} {:>7.2}",
                r.name,
                r.hosts,
                r.bound.t_min,
                opt(r.complete_last),
                opt(r.complete_p50),
                opt(r.complete_p90),
                r.ratio.map_or("-".into(), |v| format!("{v:.3}")),
                opt(r.staged_last),
                r.origin_egress_per_artifact,
                r.cache_egress_per_artifact
            );
            let b = &r.bound;
            let _ = writeln!(
                s,
                "{:<12} T_min terms: F/u_src {:.2}, F/d_host {:.2}, N*F/(u_src+sum u_host) {:.2}, \
                 F/u_origin {:.2}, F/wan {:.2}{}{}",
                "",
                b.source,
                b.host_down,
                b.aggregate,
                b.origin,
                b.wan,
                if r.incomplete > 0 {
                    format!("; {} live hosts incomplete", r.incomplete)
                } else {
                    String::new()
                },
                if r.dead > 0 { format!("; {} hosts dead", r.dead) } else { String::new() },
            );
        }
        let _ = writeln!(
            s,
            "fleet: T_min {:.2} s, last host {} s, ratio {}; origin egress {:.3} x F \
             ({:.3} x F per region)",
            self.fleet_t_min,
            opt(self.fleet_complete_last),
            self.fleet_ratio.map_or("-".into(), |v| format!("{v:.3}")),
            self.origin_egress_per_artifact,
            self.origin_egress_per_artifact / self.regions.len().max(1) as f64
        );
        if let Some(u) = self.series.staging_use() {
            let secs = |v: Option<f64>| v.map_or("never".to_string(), |v| format!("at {v:.1} s"));
            let _ = writeln!(
                s,
                "staging hosts' downlinks (sampled every {} s): half used {}, 90 % {}; median {} \
                 from then until the first host completed; most hosts holding chunks with idle \
                 uplinks: {} at {:.1} s",
                self.series.bucket,
                secs(u.half_at),
                secs(u.ninety_at),
                u.steady_median.map_or("-".to_string(), |m| format!("{:.1} %", 100.0 * m)),
                u.idle_holders_peak,
                u.idle_holders_peak_at
            );
        }
        let w = &self.swarm;
        let total = (w.from_peers + w.from_caches + w.from_origin).max(1) as f64;
        let _ = writeln!(
            s,
            "hosts got {:.1} % from peers, {:.2} % from caches, {:.3} % from the origin; \
             duplicates {:.2} %, {} hash mismatches, {} withdrawn, {} bans, {} timeouts",
            100.0 * w.from_peers as f64 / total,
            100.0 * w.from_caches as f64 / total,
            100.0 * w.from_origin as f64 / total,
            100.0 * w.duplicate_bytes as f64 / total,
            w.hash_mismatches,
            w.withdrawn,
            w.bans,
            w.timeouts
        );
        let t = &self.traffic;
        let m = |v: u64| v as f64 / 1e6;
        let _ = writeln!(
            s,
            "events (M): {:.2} request frames ({:.2} chunks), {:.2} Busy, {:.2} SeededRecently, \
             {:.2} other rejects, {:.2} cancels, {:.2} pieces, {:.2} flows done, {:.2} ticks, \
             {:.2} have broadcasts ({:.2} haves delivered), {:.2} timers, {:.2} other",
            m(t.request_frames),
            m(t.requested_chunks),
            m(t.busy),
            m(t.seeded_recently),
            m(t.other_rejects),
            m(t.cancels),
            m(t.pieces),
            m(t.flows_done),
            m(t.ticks),
            m(t.announces),
            m(t.haves_delivered),
            m(t.timers),
            m(t.other)
        );
        if let Some(r) = &self.rollout {
            let _ = writeln!(
                s,
                "rollout: {} (done at {} s); {} updated, {} on target, {} on previous",
                r.phase,
                opt(r.done),
                r.updated,
                r.on_target,
                r.on_previous
            );
            if let Some(b) = &r.rollback {
                let _ = writeln!(
                    s,
                    "rollback ({}): started {:.2} s with {} hosts on the target, finished {} s, \
                     took {} s, {} unconfirmed",
                    b.reason,
                    b.started,
                    b.hosts_on_target_at_start,
                    opt(b.finished),
                    opt(b.duration),
                    b.unconfirmed.map_or("-".into(), |u| u.to_string())
                );
            }
        }
        let i = &self.invariants;
        let _ = writeln!(
            s,
            "invariants: all live hosts complete {}, content verified {}, rolled back to \
             previous {}, core errors {}",
            i.all_live_complete,
            i.all_verified,
            i.rolled_back_to_previous.map_or("n/a".into(), |b| b.to_string()),
            i.core_errors
        );
        s
    }
}

fn rollout_report(
    outcome: &Outcome,
    phase: fleetwave_coordinator::rollout::Phase,
    on_target: u32,
    on_previous: u32,
) -> RolloutReport {
    use fleetwave_coordinator::rollout::Notice;
    let mut done = None;
    let mut rollback: Option<RollbackReport> = None;
    for (t, n) in &outcome.notices {
        match n {
            Notice::Done { .. } => done = Some(secs(*t)),
            Notice::RollingBack { reason } => {
                rollback = Some(RollbackReport {
                    reason: format!("{reason:?}"),
                    started: secs(*t),
                    finished: None,
                    duration: None,
                    hosts_on_target_at_start: outcome.on_target_at_rollback.unwrap_or(0),
                    unconfirmed: None,
                });
            }
            Notice::RolledBack { unconfirmed } => {
                if let Some(r) = &mut rollback {
                    r.finished = Some(secs(*t));
                    r.duration = Some(secs(*t) - r.started);
                    r.unconfirmed = Some(*unconfirmed);
                }
            }
            _ => {}
        }
    }
    RolloutReport {
        phase: format!("{phase:?}"),
        done,
        rollback,
        updated: outcome.updated,
        on_target,
        on_previous,
        notices: outcome.notices.iter().map(|(t, n)| (secs(*t), format!("{n:?}"))).collect(),
    }
}
