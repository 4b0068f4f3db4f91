//! Canary analysis evaluated on simulated traffic (issue "Canary analysis", docs/BENCHMARKS.md).
//!
//! 1,000 requests/s fleet-wide, the canary on 5% of hosts (50 requests/s) against as many
//! baseline hosts, 10 s windows, a 10 minute bake. For healthy canaries and regressions of
//! several sizes in the 5xx rate (baseline 0.5%) and in latency (lognormal, p99 about
//! 200 ms), it runs three judges on the very same streams: the Fleetwave judge
//! (`coordinator::analysis`, defaults), a fixed-threshold judge (Flagger style) and a
//! fixed-window Mann-Whitney judge looked at every interval (Kayenta style), and prints the
//! share detected within the bake, the median and p90 detection times, and the false-positive
//! rate. Then it rolls bad releases out with the real rollout engine gated by the judge and
//! reports how many hosts ever ran them. Seeded: the same figures on every run.
//!
//! `cargo run --release -p fleetwave-sim --bin canary-eval`

#![allow(clippy::print_stdout, reason = "a report printed to stdout is this binary's output")]

#[path = "canary-eval/deploy.rs"]
mod deploy;
#[path = "canary-eval/judges.rs"]
mod judges;
#[path = "canary-eval/traffic.rs"]
mod traffic;

use std::time::Duration;

use clap::Parser;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use fleetwave_coordinator::analysis::{Buckets, JudgeConfig, MetricKind};

use judges::{Fleetwave, Kayenta, Look, Threshold};
use traffic::{Model, Stream, Z99};

/// Evaluates the canary judge against fixed-threshold and fixed-window judges.
#[derive(Debug, Parser)]
struct Args {
    /// Healthy canaries (the false-positive runs).
    #[arg(long, default_value_t = 1000)]
    healthy: u32,
    /// Canaries per regression size.
    #[arg(long, default_value_t = 300)]
    per_regression: u32,
    /// Deployments per case driven through the rollout engine.
    #[arg(long, default_value_t = 50)]
    deployments: u32,
    /// Fleet-wide requests per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Share of the fleet's hosts on the canary.
    #[arg(long, default_value_t = 0.05)]
    canary_share: f64,
    /// Hosts in the fleet of the rollout runs.
    #[arg(long, default_value_t = 50_000)]
    hosts: u32,
    /// Critical increase of the error rate (judge default: 1.0, i.e. double).
    #[arg(long)]
    error_critical: Option<f64>,
    /// Seed of every stream.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Window length.
const INTERVAL: Duration = Duration::from_secs(10);
/// The bake: the Fleetwave judge decides by then; detection is counted within it.
const BAKE: Duration = Duration::from_secs(600);
/// Flagger-style thresholds: twice the baseline error rate, and p99 above 250 ms (the
/// baseline's is about 202 ms).
const MAX_ERROR_RATE: f64 = 0.01;
const MAX_P99: f64 = 0.25;
/// Kayenta-style level per metric and look.
const KAYENTA_ALPHA: f64 = 0.01;

#[derive(Clone, Copy, Debug)]
enum Regression {
    None,
    /// Percentage points of 5xx added.
    Errors(f64),
    /// p99 up by this fraction, the median unchanged (a heavier tail).
    Tail(f64),
    /// Every quantile up by this fraction.
    Scale(f64),
}

impl Regression {
    fn label(&self) -> String {
        match self {
            Regression::None => "healthy".to_owned(),
            Regression::Errors(pp) => format!("5xx +{pp} pp"),
            Regression::Tail(f) => format!("p99 +{:.0}% (tail)", f * 100.0),
            Regression::Scale(f) => format!("latency +{:.0}% (all)", f * 100.0),
        }
    }

    fn apply(&self, m: Model) -> Model {
        match *self {
            Regression::None => m,
            Regression::Errors(pp) => Model { error_rate: m.error_rate + pp / 100.0, ..m },
            Regression::Tail(f) => Model { sigma: m.sigma + (1.0 + f).ln() / Z99, ..m },
            Regression::Scale(f) => Model { median: m.median * (1.0 + f), ..m },
        }
    }
}

/// When each judge first failed one canary (`None`: not within the bake), and the Fleetwave
/// judge's final verdict.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    fleetwave: Option<Duration>,
    threshold: Option<Duration>,
    kayenta: Option<Duration>,
    passed: bool,
    inconclusive: bool,
}

/// The judge's defaults, with the overrides given.
fn judge_config(args: &Args) -> JudgeConfig {
    let mut config = JudgeConfig::default();
    if let Some(c) = args.error_critical {
        for m in &mut config.metrics {
            if m.kind == MetricKind::ErrorRate {
                m.critical_increase = c;
            }
        }
    }
    config
}

fn run_stream(
    stream: &Stream,
    buckets: &Buckets,
    config: &JudgeConfig,
    seed: u64,
) -> anyhow::Result<Run> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut fw = Fleetwave::new(config.clone(), BAKE)?;
    let mut th = Threshold::new(MAX_ERROR_RATE, MAX_P99, INTERVAL, buckets);
    let mut ky = Kayenta::new(KAYENTA_ALPHA, buckets);
    let mut run = Run::default();
    let mut fw_done = false;
    let mut now = Duration::ZERO;
    while now < BAKE {
        now += INTERVAL;
        let w = stream.window(&mut rng, buckets, now, INTERVAL.as_secs_f64());
        if !fw_done {
            match fw.look(now, &w)? {
                Look::Wait => {}
                Look::Fail => run.fleetwave = Some(now),
                Look::Pass => run.passed = true,
                Look::Inconclusive => run.inconclusive = true,
            }
            fw_done = run.fleetwave.is_some() || run.passed || run.inconclusive;
        }
        if run.threshold.is_none() && th.look(&w) == Look::Fail {
            run.threshold = Some(now);
        }
        if run.kayenta.is_none() && ky.look(&w) == Look::Fail {
            run.kayenta = Some(now);
        }
    }
    Ok(run)
}

/// The `q` quantile of detection times, undetected canaries counted as never.
fn quantile(times: &[Option<Duration>], q: f64) -> Option<Duration> {
    let mut t: Vec<Option<Duration>> = times.to_vec();
    // `None` (never) sorts last.
    t.sort_by_key(|x| x.map_or(u128::MAX, |d| d.as_millis()));
    let i = ((q * t.len() as f64).ceil() as usize).clamp(1, t.len()) - 1;
    t[i]
}

fn show(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{}:{:02}", d.as_secs() / 60, d.as_secs() % 60),
        None => "> 10:00".to_owned(),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let buckets = Buckets::default();
    let config = judge_config(&args);
    let canary_rate = args.rate * args.canary_share;
    let base = Model::baseline(canary_rate);
    println!(
        "Traffic: {:.0} requests/s fleet-wide, canary {:.0}% of hosts ({canary_rate:.0} requests/s) \
         against as many baseline hosts; {}s windows; {}-minute bake. Baseline: {:.1}% 5xx, \
         latency lognormal, median {:.0} ms, p99 {:.0} ms.",
        args.rate,
        args.canary_share * 100.0,
        INTERVAL.as_secs(),
        BAKE.as_secs() / 60,
        base.error_rate * 100.0,
        base.median * 1e3,
        base.p99() * 1e3,
    );
    println!(
        "Judges: Fleetwave (defaults: alpha 1%); threshold (error rate > {:.0}% or p99 > {:.0} ms \
         over the last minute, at any look); fixed-window Mann-Whitney (per-interval error rate \
         and p99 series since the start, one-sided p < {KAYENTA_ALPHA} per metric, at every look).\n",
        MAX_ERROR_RATE * 100.0,
        MAX_P99 * 1e3,
    );
    let mut cases = vec![(Regression::None, args.healthy)];
    for pp in [0.25, 0.5, 1.0, 2.0] {
        cases.push((Regression::Errors(pp), args.per_regression));
    }
    for f in [0.1, 0.25, 0.5, 1.0] {
        cases.push((Regression::Tail(f), args.per_regression));
    }
    for f in [0.1, 0.25, 0.5, 1.0] {
        cases.push((Regression::Scale(f), args.per_regression));
    }
    println!(
        "| case | canaries | judge | failed within the bake | median detection | p90 detection |"
    );
    println!("|---|---:|---|---:|---:|---:|");
    for (ci, &(regression, n)) in cases.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let stream = Stream::new(regression.apply(base), base, &buckets);
        let mut runs = Vec::with_capacity(n as usize);
        for s in 0..n {
            let seed = args.seed.wrapping_mul(1_000_003) ^ ((ci as u64) << 32 | u64::from(s));
            runs.push(run_stream(&stream, &buckets, &config, seed)?);
        }
        let judges: [(&str, Vec<Option<Duration>>); 3] = [
            ("Fleetwave", runs.iter().map(|r| r.fleetwave).collect()),
            ("threshold", runs.iter().map(|r| r.threshold).collect()),
            ("fixed-window MW", runs.iter().map(|r| r.kayenta).collect()),
        ];
        for (name, times) in &judges {
            let failed = times.iter().filter(|t| t.is_some()).count();
            let share = 100.0 * failed as f64 / f64::from(n);
            let (median, p90) = match regression {
                Regression::None => ("-".to_owned(), "-".to_owned()),
                _ => (show(quantile(times, 0.5)), show(quantile(times, 0.9))),
            };
            println!("| {} | {n} | {name} | {share:.1}% | {median} | {p90} |", regression.label());
        }
        if matches!(regression, Regression::None) {
            let passed = runs.iter().filter(|r| r.passed).count();
            let held = runs.iter().filter(|r| r.inconclusive).count();
            println!(
                "| healthy | {n} | Fleetwave verdicts at the bake's end | pass {passed}, \
                 inconclusive {held} | - | - |"
            );
        }
    }

    println!(
        "\nRollouts: {} hosts in one region, {:.0} requests/s fleet-wide, canary steps 1% -> 5% -> \
         25% -> 50% -> 100%, 10-minute bakes, the Fleetwave judge as the analysis gate \
         (rollout engine and judge as in the coordinator); {} deployments per case.\n",
        args.hosts, args.rate, args.deployments,
    );
    let fleet = deploy::Fleet {
        hosts: args.hosts,
        rate: args.rate,
        interval: INTERVAL,
        buckets: buckets.clone(),
        config: judge_config(&args),
    };
    println!(
        "| case | rolled back | held (at most hosts on the release) | done | max hosts ever on the release | median time to rollback |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (ci, &(regression, _)) in cases.iter().enumerate() {
        let mut outcomes = Vec::new();
        for d in 0..args.deployments {
            let seed = args.seed.wrapping_mul(7_919) ^ ((ci as u64) << 32 | u64::from(d));
            let base_fleet = Model::baseline(0.0);
            outcomes.push(deploy::run(&fleet, regression.apply(base_fleet), base_fleet, seed)?);
        }
        let count = |e| outcomes.iter().filter(|o| o.end == e).count();
        let max = outcomes.iter().map(|o| o.ever_ran).max().unwrap_or(0);
        let rollback_times: Vec<Option<Duration>> = outcomes
            .iter()
            .filter(|o| o.end == deploy::End::RolledBack)
            .map(|o| Some(o.at))
            .collect();
        let median = if rollback_times.is_empty() {
            "-".to_owned()
        } else {
            quantile(&rollback_times, 0.5)
                .map_or("-".to_owned(), |d| format!("{}:{:02}", d.as_secs() / 60, d.as_secs() % 60))
        };
        let held_on = outcomes
            .iter()
            .filter(|o| o.end == deploy::End::Held)
            .map(|o| o.ever_ran)
            .max()
            .map_or("-".to_owned(), |h| {
                format!("{:.0}%", 100.0 * f64::from(h) / f64::from(args.hosts))
            });
        let running = count(deploy::End::Running);
        let held = count(deploy::End::Held);
        println!(
            "| {} | {} | {}{} (at {held_on}) | {} | {} ({:.2}%) | {median} |",
            regression.label(),
            count(deploy::End::RolledBack),
            held,
            if running > 0 { format!(" (+{running} still running)") } else { String::new() },
            count(deploy::End::Done),
            max,
            100.0 * f64::from(max) / f64::from(args.hosts),
        );
    }
    Ok(())
}
