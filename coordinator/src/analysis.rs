//! The canary judge: baseline and canary samples in, pass, fail or inconclusive out, with the
//! evidence.
//!
//! [`Judge`] is a sans-io core (DESIGN.md, "Sans-io cores"), like the rollout engine it answers:
//! the coordinator daemon feeds it one [`Window`] per interval through
//! [`handle_window`](Judge::handle_window) and asks [`poll_verdict`](Judge::poll_verdict) for a
//! [`Verdict`] after each; the simulator drives the same code on a virtual clock. It never reads
//! a clock (time is the caller's `now`, on the rollout engine's clock), touches the network or a
//! file, and uses no randomness: the same windows give the same verdict. Its whole state
//! serializes ([`Judge::snapshot`], [`Judge::restore`]), so a coordinator that restarts during
//! a bake resumes the judgement where it was rather than starting the evidence over.
//!
//! # Participants and data
//!
//! A gate ([`GateRequest`]) names canary hosts (running the release under judgement) and as many
//! baseline hosts of the same region, still on the previous release. Canary and baseline are
//! always compared over the same interval, never with history: traffic, load and the
//! baseline's own error rate change through the day, and only a concurrent baseline cancels
//! that out.
//!
//! Every interval (10 to 30 s), each host's node reports a [`HostSample`]: the difference of
//! two scrapes of the service's counters (requests, errors) and of its latency histogram over
//! a fixed [`Buckets`] layout. The shell sums them per side into a [`Sample`]
//! ([`Sample::add_host`] validates each report; [`Sample::add_missing`] counts hosts that did
//! not answer) and hands both sides to the judge as one [`Window`].
//!
//! # Metrics and their configuration
//!
//! Each [`MetricConfig`] is one comparison:
//!
//! - [`MetricKind::ErrorRate`]: errors out of requests.
//! - [`MetricKind::Latency`]: the latency distribution, with attention to one tail quantile
//!   (default p99).
//!
//! and says which way is worse ([`Direction`]: an increase, a decrease, or either), how much
//! worse is still acceptable (`allowed_increase`) and how much worse must never pass
//! (`critical_increase`), both relative: `0.25` is 25% worse. Relative, because an absolute
//! margin means nothing across services whose error rates differ by orders of magnitude. For
//! error rates the scale is the odds ratio of an error (within 1% of the rate ratio below
//! 1% errors); for latency it is a factor on the latency itself. `min_samples` is the least
//! traffic (requests, or latency observations) each side must have served before the judge
//! may pass the canary.
//!
//! # The tests
//!
//! ## Error rates: a mixture SPRT on the conditional odds ratio
//!
//! In each interval, given how many errors canary and baseline made together, the canary's
//! share of them follows Fisher's noncentral hypergeometric law, whose only parameter is the
//! odds ratio `ψ` of an error on the canary against the baseline. Conditioning removes the
//! baseline's own error rate, which changes from interval to interval and is not known: the
//! test needs no model of it. For a null boundary `ψ0` and an alternative `ψ1 > ψ0` the
//! per-interval likelihood ratio `f(k; ψ1) / f(k; ψ0)` has expectation at most 1 whenever the
//! true `ψ ≤ ψ0` (the law has a monotone likelihood ratio in `k`), so their running product is
//! a nonnegative supermartingale under the whole composite null `ψ ≤ ψ0`. Averaging it over a
//! fixed grid of alternatives (10% to twentyfold beyond `ψ0`, uniform weights) keeps that
//! property and adapts to the actual size of the regression, at the price of `ln 12` nats
//! against a test that knew it. This mixture is the **e-value**.
//!
//! - **Harm**: null `ψ ≤ 1 + allowed_increase`. The canary **fails** as soon as the e-value
//!   reaches `1/α'`, where `α'` is the gate's `alpha` divided among its failing tests.
//! - **Safety**: null `ψ ≥ 1 + critical_increase`. A pass is given once, at the end of the
//!   bake, so this one needs no anytime validity, and a fixed-horizon test is the more
//!   powerful: the conditional score test stratified by interval (Mantel-Haenszel with the
//!   exact conditional mean and variance of each interval's canary errors at the null odds
//!   ratio). A critical regression is ruled out when its one-sided p-value is below
//!   `pass_alpha`.
//!
//! ## Why anytime-valid
//!
//! A fixed-horizon test (a z-test, Mann-Whitney, Fisher's exact test) is valid at one look
//! decided in advance. Looking every interval and stopping at the first rejection turns a
//! nominal 5% into about 30% false failures over a bake. By Ville's inequality a nonnegative
//! supermartingale started at 1 ever reaches `1/α` with probability at most `α`: the judge may
//! look after every interval, stop at the first crossing and still fail a healthy canary with
//! probability at most `α'`. Large regressions cross in a few intervals; small ones take the
//! whole bake; none needs a sample size fixed in advance. The e-value is reported with the
//! matching anytime-valid p-value, `1 / max e`.
//!
//! ## Latency: quantile exceedance, and ranks
//!
//! A p99 regression is a change in the tail, which a rank test of the whole distribution barely
//! sees (a +50% p99 with an unchanged median moves 1% of the pairs). So the sequential latency
//! test counts exceedances. Let `b` be the bucket bound at the baseline's p99, taken from the
//! baseline's histogram *before* the current interval (so that it is fixed before the
//! interval's data is seen: a predictable threshold keeps the supermartingale). If the canary
//! is no slower than `1 + allowed_increase` times the baseline (stochastically), then
//! `P(canary > b') ≤ P(baseline > b)` for any bound `b' ≥ (1 + allowed_increase) b`. So in each
//! interval the judge forms the table "canary requests above `b'`" against "baseline requests
//! above `b`", `b'` the first bucket bound at or above `(1 + allowed_increase) b`, and feeds
//! it to the same mixture SPRT with null odds ratio 1 (harm). Safety mirrors it, with the
//! score test at null odds ratio 1 and `b''` the last bound at or below
//! `(1 + critical_increase) b`. Rounding the bounds outward keeps both
//! tests valid on any bucket layout; coarse buckets only make them conservative (a +50% p99 is
//! invisible between Prometheus' default bounds at 0.25 and 0.5 s). The threshold needs
//! `10 / (1 - quantile)` baseline observations first (1,000 for p99).
//!
//! Beside it the judge runs a Mann-Whitney test of the whole distribution at the end of the
//! bake (one look: valid as it stands), with ties (observations in the same bucket) counted
//! half and the tie-corrected variance, and the Hodges-Lehmann estimate of the multiplicative
//! shift with Moses' distribution-free interval ([`RankTest`]), Kayenta style. Bucketing hides
//! where each observation lies within its bucket, so the interval's ends are taken over the
//! least and the greatest ratio each pair of buckets allows: valid, and up to a bucket wider
//! at each end than the exact one. It fails the canary when the whole interval lies above
//! `1 + allowed_increase`: a shift of the body of the distribution by more than a bucket
//! beyond the allowed one, which the tail test may see late.
//!
//! # Verdicts
//!
//! [`Judge::poll_verdict`] answers (and latches the answer):
//!
//! - [`Verdict::Fail`] as soon as any harm test crosses its threshold, at any look, or when the
//!   final rank test finds a shift: a regression, shown at the configured level.
//! - Nothing before `decide_by` otherwise: the rollout engine lets a wave pass only when its
//!   bake ends, and a verdict of pass given earlier would stop the judge from failing a late
//!   regression.
//! - At `decide_by`, [`Verdict::Inconclusive`] if intervals with measurement errors exceed
//!   `max_unusable` of all intervals, if any metric has fewer than `min_samples` on either
//!   side, or if any metric's safety test has not ruled out a critical regression;
//!   [`Verdict::Pass`] otherwise. Too little traffic is never a pass: "no evidence of harm"
//!   is not "evidence of no harm", and the safety test demands the latter.
//! - Unless looks remain: a gate may look for a pass up to `looks` times
//!   ([`GateRequest::looks`], one plus the plan's bake extensions), at `decide_by` and then
//!   every bake later. A look that finds too little data or a critical regression not yet
//!   ruled out gives no verdict and bakes again; the harm tests keep watching meanwhile. Each
//!   look's safety test runs at `pass_alpha / looks` and each look's rank test at its share of
//!   `alpha` divided by `looks` (Bonferroni over the looks), so the guarantees below hold over
//!   all of them. A thin step (1% of a quiet service) is thus judged on up to three bakes of
//!   traffic before a human is called.
//!
//! # Guard gates
//!
//! The promise is that a bad release reaches at most `guard_exposure` (default 5%) of a
//! deployment's hosts without a human. A gate's pass exposes the release to the next wave, so
//! a gate whose next wave would take the release beyond that share
//! ([`GateRequest::exposed_after_pass`] over [`GateRequest::hosts`]) is a guard gate: there each
//! metric's critical increase is its `guard_critical_increase` (error rates: +50% instead of
//! +100%). The earlier gates keep the wider margin, which their thin traffic can rule out in
//! a bake; the last gate before the release widens must rule out the narrower one, with the
//! guard step's larger traffic and, if need be, more bakes. A regression at or beyond the
//! guard's critical increase thus passes a guard gate with probability at most `pass_alpha`.
//!
//! Missing and invalid reports are measurement errors, never failures: an interval in which
//! fewer than `min_reporting` of either side's hosts reported valid data is left out of every
//! test and counted apart ([`Intervals`]); a host whose report does not validate is left out of
//! its side's sums ([`Sample::invalid`]). The rollout engine holds for a human on inconclusive.
//!
//! # False positives and power
//!
//! `alpha` bounds the probability that a healthy canary (every metric within its allowed
//! increase) is failed, over the whole gate, every look and every metric: it is divided among
//! the failing tests (one sequential test per metric and direction, plus the rank test of each
//! latency metric). `pass_alpha` bounds, per metric and direction, the probability that a
//! regression at or beyond its critical increase passes a gate. A regression between the
//! allowed and the critical increase may pass: it is failed only if the harm test crosses
//! within the bake, and held (inconclusive) if the safety test cannot rule the critical one
//! out. Both rest on the requests of an interval being independent
//! given the rates; traffic whose errors come in bursts shared by canary and baseline is
//! handled (conditioning), but bursts on one side only (one sick baseline host) look like a
//! difference and should be kept out by the health gate. Measured detection times and false
//! positive rates are in docs/BENCHMARKS.md ("Canary analysis").
//!
//! # Cost
//!
//! A window costs O(metrics × 12 × the spread of the interval's error count) for the
//! sequential tests (the normalizer of the conditional law is summed outward from its mode
//! until the terms vanish), and O(buckets) to fold the histograms. A report costs
//! O(buckets² log buckets) per latency metric (the pairwise differences of the rank
//! interval). The state is O(metrics × buckets): a few kilobytes.

mod sample;
mod stats;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use sample::{Buckets, BucketsError, HostSample, MAX_BUCKETS, Sample, SampleError, Window};
pub use stats::RankTest;

use crate::rollout::{GateId, GateRequest, Verdict};
use stats::{LogLayout, MixtureSprt, ScoreTest, Table, Tail};

/// Version of the [`JudgeSnapshot`] format; [`Judge::restore`] refuses any other.
pub const SNAPSHOT_VERSION: u32 = 1;

/// Confidence level of the intervals reported for display (error-rate ratios, quantiles).
const DISPLAY_LEVEL: f64 = 0.95;

/// Exceedance thresholds wait for this many expected exceedances in the baseline's history
/// (1,000 observations for p99): fewer and the bound at the quantile jumps from bucket to
/// bucket.
const MIN_EXPECTED_EXCEEDANCES: f64 = 10.0;

/// Relative slack when a bucket bound is compared with a scaled one, so that `1.25 * 0.2` is
/// found equal to a bound of `0.25` despite rounding.
const BOUND_SLACK: f64 = 1e-9;

// -------------------------------------------------------------------------------------------
// Configuration

/// Which way a metric gets worse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// Higher is worse (errors, latency).
    Increase,
    /// Lower is worse (a success or throughput metric).
    Decrease,
    /// Either way is worse (tested both ways, each at half the level).
    Either,
}

/// What a metric measures.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum MetricKind {
    /// Errors out of requests ([`Sample::errors`] of [`Sample::requests`]).
    ErrorRate,
    /// The latency histogram ([`Sample::latency`]), with attention to one quantile.
    Latency {
        /// The tail quantile the sequential test watches, in (0, 1). Default 0.99.
        quantile: f64,
    },
}

/// One metric's comparison. See the module docs for how each field is used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricConfig {
    /// Its name, in reports.
    pub name: String,
    /// What it measures.
    pub kind: MetricKind,
    /// Which way is worse.
    pub direction: Direction,
    /// How much worse the canary may be and still be healthy, relative (0.25: 25% more errors,
    /// in odds; or 25% slower). A regression beyond it is what the harm test looks for.
    pub allowed_increase: f64,
    /// How much worse must never pass, relative; above `allowed_increase`. The canary passes
    /// only once a regression this large is ruled out.
    pub critical_increase: f64,
    /// The critical increase at a guard gate (one whose pass would widen the release beyond
    /// [`JudgeConfig::guard_exposure`]), between `allowed_increase` and `critical_increase`;
    /// `None`: the same as `critical_increase`. See the module docs, "Guard gates".
    #[serde(default)]
    pub guard_critical_increase: Option<f64>,
    /// Least traffic each side must have served before a pass: requests (error rates) or
    /// latency observations.
    pub min_samples: u64,
}

impl MetricConfig {
    /// The error rate, higher is worse: allowed +25% (so 0.5% to 0.625% is healthy), critical
    /// +100% (0.5% to 1% must never pass), +50% at a guard gate (0.5% to 0.75% must not widen
    /// beyond the guard exposure), at least 2,000 requests each side.
    pub fn error_rate() -> Self {
        Self {
            name: "error-rate".to_owned(),
            kind: MetricKind::ErrorRate,
            direction: Direction::Increase,
            allowed_increase: 0.25,
            critical_increase: 1.0,
            guard_critical_increase: Some(0.5),
            min_samples: 2000,
        }
    }

    /// The latency, slower is worse, watching p99: allowed +10%, critical +25% (with buckets
    /// of ratio 1.19, the tail test resolves no finer), at least 2,000 observations each side.
    pub fn latency() -> Self {
        Self {
            name: "latency".to_owned(),
            kind: MetricKind::Latency { quantile: 0.99 },
            direction: Direction::Increase,
            allowed_increase: 0.1,
            critical_increase: 0.25,
            guard_critical_increase: None,
            min_samples: 2000,
        }
    }
}

/// The judge's configuration, per service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgeConfig {
    /// The comparisons. Default: [`MetricConfig::error_rate`] and [`MetricConfig::latency`].
    pub metrics: Vec<MetricConfig>,
    /// The latency histogram layout every host reports in. Default
    /// [`Buckets::native_schema_2`].
    pub buckets: Buckets,
    /// Most probability of failing a healthy canary, over the whole gate (all metrics, all
    /// looks). Default 1%: a fleet running 500 deployments a day sees a few false rollbacks a
    /// day at 5%, and at 1% the tests still catch the regressions that matter in minutes.
    pub alpha: f64,
    /// Most probability, per metric, of passing a regression beyond its critical increase.
    /// Default 5%: a canary that passes one step still faces the next step's gate.
    pub pass_alpha: f64,
    /// Least fraction of each side's hosts that must report valid data for an interval to be
    /// used. Default 0.5.
    pub min_reporting: f64,
    /// Most fraction of intervals with measurement errors before the verdict is inconclusive.
    /// Default 0.25.
    pub max_unusable: f64,
    /// Share of the deployment's hosts beyond which a release may not widen on a plain pass: a
    /// gate whose pass would put the release on more hosts than this is a guard gate, judged
    /// against each metric's `guard_critical_increase`. Default 5%, the most of a fleet a bad
    /// release may reach without a human.
    #[serde(default = "default_guard_exposure")]
    pub guard_exposure: f64,
}

fn default_guard_exposure() -> f64 {
    0.05
}

impl Default for JudgeConfig {
    fn default() -> Self {
        Self {
            metrics: vec![MetricConfig::error_rate(), MetricConfig::latency()],
            buckets: Buckets::default(),
            alpha: 0.01,
            pass_alpha: 0.05,
            min_reporting: 0.5,
            max_unusable: 0.25,
            guard_exposure: default_guard_exposure(),
        }
    }
}

impl JudgeConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.metrics.is_empty() {
            return Err(ConfigError::NoMetrics);
        }
        let probabilities = [
            ("alpha", self.alpha),
            ("pass_alpha", self.pass_alpha),
            ("min_reporting", self.min_reporting),
            ("max_unusable", self.max_unusable),
            ("guard_exposure", self.guard_exposure),
        ];
        for (field, value) in probabilities {
            let open = field.ends_with("alpha");
            let valid =
                if open { value > 0.0 && value < 1.0 } else { (0.0..=1.0).contains(&value) };
            if !valid {
                return Err(ConfigError::OutOfRange { field, value });
            }
        }
        for (i, m) in self.metrics.iter().enumerate() {
            if self.metrics[..i].iter().any(|o| o.name == m.name) {
                return Err(ConfigError::DuplicateMetric { name: m.name.clone() });
            }
            let increases_valid = m.allowed_increase.is_finite()
                && m.allowed_increase >= 0.0
                && m.critical_increase.is_finite()
                && m.critical_increase > m.allowed_increase;
            if !increases_valid {
                return Err(ConfigError::Increases {
                    metric: m.name.clone(),
                    allowed: m.allowed_increase,
                    critical: m.critical_increase,
                });
            }
            if let Some(guard) = m.guard_critical_increase {
                if !(guard > m.allowed_increase && guard <= m.critical_increase) {
                    return Err(ConfigError::GuardIncrease {
                        metric: m.name.clone(),
                        guard,
                        allowed: m.allowed_increase,
                        critical: m.critical_increase,
                    });
                }
            }
            if let MetricKind::Latency { quantile } = m.kind {
                if !(quantile > 0.0 && quantile < 1.0) {
                    return Err(ConfigError::Quantile { metric: m.name.clone(), quantile });
                }
            }
        }
        Ok(())
    }

    /// How many tests can fail the canary: one sequential test per metric and direction, and
    /// one rank test per latency metric and direction.
    fn failing_tests(&self) -> usize {
        self.metrics
            .iter()
            .map(|m| {
                let ways = if m.direction == Direction::Either { 2 } else { 1 };
                let tests = if matches!(m.kind, MetricKind::Latency { .. }) { 2 } else { 1 };
                ways * tests
            })
            .sum()
    }

    /// The level of each failing test.
    fn alpha_each(&self) -> f64 {
        self.alpha / self.failing_tests() as f64
    }
}

/// A configuration that cannot be used, or a gate that makes no sense.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// No metric to compare.
    #[error("the judge has no metric to compare")]
    NoMetrics,
    /// Two metrics share a name.
    #[error("metric {name:?} is configured twice")]
    DuplicateMetric {
        /// The name.
        name: String,
    },
    /// A probability outside its range.
    #[error("{field} = {value} is out of range")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// Negative or non-finite increases, or a critical increase not above the allowed one.
    #[error(
        "metric {metric:?}: allowed increase {allowed} must be >= 0 and below the critical {critical}"
    )]
    Increases {
        /// The metric.
        metric: String,
        /// Its allowed increase.
        allowed: f64,
        /// Its critical increase.
        critical: f64,
    },
    /// A guard critical increase not above the allowed one, or above the critical one.
    #[error(
        "metric {metric:?}: guard critical increase {guard} must be above the allowed {allowed} and at most the critical {critical}"
    )]
    GuardIncrease {
        /// The metric.
        metric: String,
        /// Its guard critical increase.
        guard: f64,
        /// Its allowed increase.
        allowed: f64,
        /// Its critical increase.
        critical: f64,
    },
    /// A latency quantile outside (0, 1).
    #[error("metric {metric:?}: quantile {quantile} is not in (0, 1)")]
    Quantile {
        /// The metric.
        metric: String,
        /// The quantile.
        quantile: f64,
    },
    /// `decide_by` before the window's start.
    #[error("the gate must be decided by {decide_by:?}, before its window starts at {start:?}")]
    DecideBeforeStart {
        /// Start of the window.
        start: Duration,
        /// Decision time.
        decide_by: Duration,
    },
}

/// A window the judge refuses; nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// The window does not end after the last one (it would be counted twice).
    #[error("window ending at {end:?} does not follow the last one, ending at {last:?}")]
    OutOfOrder {
        /// Its end.
        end: Duration,
        /// The last window's end.
        last: Duration,
    },
    /// A side's histogram is not over the configured buckets (a bug in the shell: reports are
    /// checked one by one by [`Sample::add_host`]).
    #[error("a latency histogram has {found} buckets, the layout has {expected}")]
    BucketMismatch {
        /// Counts in the layout.
        expected: usize,
        /// Counts in the window.
        found: usize,
    },
}

/// A [`JudgeSnapshot`] that cannot be restored.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RestoreError {
    /// Written by another version.
    #[error("judge snapshot format {found}, this judge reads {expected}")]
    Version {
        /// [`SNAPSHOT_VERSION`].
        expected: u32,
        /// The snapshot's.
        found: u32,
    },
    /// Its configuration is invalid.
    #[error("judge snapshot configuration: {0}")]
    Config(#[from] ConfigError),
    /// Internally inconsistent (corrupt, or edited).
    #[error("judge snapshot is inconsistent: {what}")]
    Corrupt {
        /// What does not fit.
        what: &'static str,
    },
}

// -------------------------------------------------------------------------------------------
// Reports

/// Where the judgement stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// Still judging.
    Pending,
    /// No regression, and every critical regression ruled out.
    Pass,
    /// A regression.
    Fail {
        /// The metric.
        metric: String,
        /// Which test showed it.
        test: TestKind,
    },
    /// Not enough evidence either way.
    Inconclusive {
        /// Why.
        reason: InconclusiveReason,
    },
}

impl Outcome {
    /// The verdict for the rollout engine, once there is one.
    pub fn verdict(&self) -> Option<Verdict> {
        match self {
            Outcome::Pending => None,
            Outcome::Pass => Some(Verdict::Pass),
            Outcome::Fail { .. } => Some(Verdict::Fail),
            Outcome::Inconclusive { .. } => Some(Verdict::Inconclusive),
        }
    }
}

/// A test that can fail the canary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TestKind {
    /// The sequential test (error odds ratio, or latency exceedance), in this direction.
    Sequential {
        /// Increase or decrease.
        direction: Direction,
    },
    /// The final rank test of a latency metric.
    Rank {
        /// Increase or decrease.
        direction: Direction,
    },
}

/// Why a verdict is inconclusive (the first reason found, in this order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum InconclusiveReason {
    /// Too many intervals had measurement errors.
    MeasurementErrors {
        /// Intervals with measurement errors.
        unusable: u32,
        /// All intervals.
        intervals: u32,
    },
    /// A side served less than the metric's `min_samples`.
    NotEnoughData {
        /// The metric.
        metric: String,
        /// The smaller side's samples.
        samples: u64,
        /// The minimum.
        required: u64,
    },
    /// The data does not rule out a critical regression of the metric.
    NotShownSafe {
        /// The metric.
        metric: String,
    },
}

/// Intervals seen, by what became of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intervals {
    /// Used by every test.
    pub used: u32,
    /// Left out: too few hosts of a side reported valid data (missing or invalid reports).
    pub measurement_errors: u32,
    /// Left out: no host of a side was asked (nothing to measure).
    pub no_data: u32,
    /// Invalid host reports, summed over used and unused intervals.
    pub invalid_reports: u64,
    /// Missing host reports, likewise.
    pub missing_reports: u64,
}

/// An estimate with its interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Effect {
    /// The point estimate.
    pub estimate: f64,
    /// Lower end.
    pub lower: f64,
    /// Upper end.
    pub upper: f64,
    /// Confidence level (two-sided) of the interval; fixed-horizon, for display.
    pub level: f64,
}

/// One sequential test's standing.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SequentialReport {
    /// Which way it looks for harm.
    pub direction: Direction,
    /// The harm test's e-value now (its mixture likelihood ratio).
    pub harm_e_value: f64,
    /// The most it has been: the anytime-valid p-value is its inverse.
    pub harm_e_max: f64,
    /// `min(1, 1 / harm_e_max)`.
    pub harm_p_value: f64,
    /// The e-value at which it fails the canary (`1/α'`).
    pub harm_threshold: f64,
    /// When it crossed the threshold, if it did.
    pub harm_crossed_at: Option<Duration>,
    /// The safety test's standardized score (negative: fewer canary events than a critical
    /// regression would make).
    pub safety_z: f64,
    /// Its one-sided p-value of "the regression is critical" (fixed horizon: it decides once,
    /// at the end of the bake).
    pub safety_p_value: f64,
    /// The p-value below which a critical regression is ruled out (`pass_alpha`, split over
    /// the looks).
    pub safety_threshold: f64,
}

/// Where one metric stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MetricStatus {
    /// A test found a regression.
    Regression,
    /// Enough data, and every critical regression ruled out.
    Safe,
    /// Enough data, no regression shown, critical regression not ruled out (yet).
    Undecided,
    /// Below `min_samples` on a side.
    NotEnoughData,
}

/// One metric's evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricReport {
    /// Its name.
    pub name: String,
    /// What it measures.
    pub kind: MetricKind,
    /// Its standing.
    pub status: MetricStatus,
    /// Canary samples used: requests, or latency observations.
    pub canary_samples: u64,
    /// Baseline samples used.
    pub baseline_samples: u64,
    /// Canary errors (error rates; zero for latency).
    pub canary_events: u64,
    /// Baseline errors.
    pub baseline_events: u64,
    /// The effect, canary over baseline: the error rate ratio (Katz interval), or the
    /// Hodges-Lehmann latency shift factor (Moses interval). `None` without data.
    pub effect: Option<Effect>,
    /// Latency: the watched quantile of the baseline and of the canary, in seconds, from the
    /// histograms (interpolated within a bucket, as Prometheus' `histogram_quantile`).
    pub quantiles: Option<(f64, f64)>,
    /// Latency: the Mann-Whitney test at the configured `alpha` share (its interval is the
    /// one the final look decides on).
    pub rank: Option<RankTest>,
    /// The sequential tests, one per direction.
    pub sequential: Vec<SequentialReport>,
}

/// The judge's evidence: stored with the verdict and shown in status and the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The outcome.
    pub outcome: Outcome,
    /// When it was decided, if it was.
    pub decided_at: Option<Duration>,
    /// Start of the comparison window.
    pub window_start: Duration,
    /// End of the last window used.
    pub last_window: Option<Duration>,
    /// When a pass or inconclusive verdict is given (the next look for one).
    pub decide_by: Duration,
    /// Looks for a pass allowed, in all.
    pub looks: u16,
    /// Looks taken that could not decide (each baked again).
    pub looked: u16,
    /// A guard gate: a pass would widen the release beyond the guard exposure, so each
    /// metric's critical increase is its guard one.
    pub guard: bool,
    /// Intervals seen.
    pub intervals: Intervals,
    /// Per metric.
    pub metrics: Vec<MetricReport>,
}

// -------------------------------------------------------------------------------------------
// State

/// The whole state of a [`Judge`], serializable. Restore it with [`Judge::restore`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgeSnapshot {
    version: u32,
    state: State,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct State {
    config: JudgeConfig,
    gate: Option<GateId>,
    window_start: Duration,
    decide_by: Duration,
    /// Looks for a pass allowed in all (`decide_by`, then every `look_every`).
    #[serde(default = "crate::rollout::one_look")]
    looks: u16,
    /// Looks for a pass already taken and found undecided.
    #[serde(default)]
    looked: u16,
    #[serde(default)]
    look_every: Duration,
    /// A guard gate: its critical increases are the guard ones.
    #[serde(default)]
    guard: bool,
    last_window: Option<Duration>,
    intervals: Intervals,
    metrics: Vec<MetricState>,
    decided: Option<(Duration, Outcome)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct MetricState {
    canary: Totals,
    baseline: Totals,
    /// Latency: cumulative histograms of the gate so far (empty for error rates).
    canary_hist: Vec<u64>,
    baseline_hist: Vec<u64>,
    tests: Vec<OneSided>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Totals {
    samples: u64,
    events: u64,
}

/// The sequential tests of one metric in one direction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct OneSided {
    direction: Direction,
    harm: MixtureSprt,
    harm_ln_max: f64,
    harm_crossed_at: Option<Duration>,
    safety: ScoreTest,
}

impl OneSided {
    fn new(direction: Direction, kind: MetricKind, allowed: f64, critical: f64) -> Self {
        // Error rates: the null boundaries are odds ratios. Latency: the bounds are scaled
        // instead, and the null odds ratio of the exceedance tables is 1.
        let (harm_null, safety_null) = match kind {
            MetricKind::ErrorRate => ((1.0 + allowed).ln(), (1.0 + critical).ln()),
            MetricKind::Latency { .. } => (0.0, 0.0),
        };
        Self {
            direction,
            harm: MixtureSprt::new(harm_null, Tail::Above),
            harm_ln_max: 0.0,
            harm_crossed_at: None,
            safety: ScoreTest::new(safety_null),
        }
    }
}

/// The canary judge of one gate. See the [module docs](self).
#[derive(Debug)]
pub struct Judge {
    s: State,
    /// The bucket layout on a log scale (derived from the config).
    layout: LogLayout,
}

impl Judge {
    /// A judge for a comparison window from `window_start`, to be decided by `decide_by`.
    pub fn new(
        config: JudgeConfig,
        window_start: Duration,
        decide_by: Duration,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        if decide_by < window_start {
            return Err(ConfigError::DecideBeforeStart { start: window_start, decide_by });
        }
        let metrics = config.metrics.iter().map(|m| MetricState::new(m, &config.buckets)).collect();
        let layout = LogLayout::new(config.buckets.upper());
        Ok(Self {
            s: State {
                config,
                gate: None,
                window_start,
                decide_by,
                looks: 1,
                looked: 0,
                look_every: decide_by - window_start,
                guard: false,
                last_window: None,
                intervals: Intervals::default(),
                metrics,
                decided: None,
            },
            layout,
        })
    }

    /// A judge for the rollout engine's gate request: up to `request.looks` looks for a pass,
    /// and a guard gate if a pass would expose the release to more than
    /// [`JudgeConfig::guard_exposure`] of the deployment's hosts.
    pub fn for_gate(mut config: JudgeConfig, request: &GateRequest) -> Result<Self, ConfigError> {
        config.validate()?;
        let exposed = f64::from(request.exposed_after_pass);
        let guard =
            request.hosts == 0 || exposed > config.guard_exposure * f64::from(request.hosts);
        if guard {
            for m in &mut config.metrics {
                m.critical_increase = m.guard_critical_increase.unwrap_or(m.critical_increase);
            }
        }
        let mut judge = Self::new(config, request.window_start, request.decide_by)?;
        judge.s.gate = Some(request.gate);
        judge.s.looks = request.looks.max(1);
        judge.s.guard = guard;
        Ok(judge)
    }

    /// Restores a judge from [`snapshot`](Self::snapshot), exactly as it was.
    pub fn restore(snapshot: JudgeSnapshot) -> Result<Self, RestoreError> {
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(RestoreError::Version {
                expected: SNAPSHOT_VERSION,
                found: snapshot.version,
            });
        }
        let s = snapshot.state;
        s.config.validate()?;
        let corrupt = |what| Err(RestoreError::Corrupt { what });
        if s.looks == 0 || s.looked >= s.looks {
            return corrupt("looks");
        }
        if s.metrics.len() != s.config.metrics.len() {
            return corrupt("metric count");
        }
        let counts = s.config.buckets.counts();
        for (m, c) in s.metrics.iter().zip(&s.config.metrics) {
            let ways = if c.direction == Direction::Either { 2 } else { 1 };
            let latency = matches!(c.kind, MetricKind::Latency { .. });
            let hist_len = if latency { counts } else { 0 };
            if m.canary_hist.len() != hist_len || m.baseline_hist.len() != hist_len {
                return corrupt("histograms");
            }
            if m.tests.len() != ways
                || !m.tests.iter().all(|t| t.harm.is_consistent() && t.safety.is_consistent())
            {
                return corrupt("sequential tests");
            }
        }
        let layout = LogLayout::new(s.config.buckets.upper());
        Ok(Self { s, layout })
    }

    /// The whole state, to persist. Its floats are restored bit for bit by an exact encoding
    /// (serde_json with its `float_roundtrip` feature, or any binary one); without it a
    /// restored judge may differ in the last bit of its accumulated evidence.
    pub fn snapshot(&self) -> JudgeSnapshot {
        JudgeSnapshot { version: SNAPSHOT_VERSION, state: self.s.clone() }
    }

    /// The gate it judges, if made by [`for_gate`](Self::for_gate).
    pub fn gate(&self) -> Option<GateId> {
        self.s.gate
    }

    /// Its configuration.
    pub fn config(&self) -> &JudgeConfig {
        &self.s.config
    }

    /// When [`poll_verdict`](Self::poll_verdict) next looks for a pass (`decide_by`, later
    /// after each look that could not decide); `None` once decided.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.s.decided.is_none().then_some(self.s.decide_by)
    }

    /// One interval's canary and baseline samples, at `now`. Windows must come in order of
    /// their `end`; those ending at or before the window's start, and any after the verdict,
    /// are ignored.
    pub fn handle_window(&mut self, now: Duration, window: &Window) -> Result<(), WindowError> {
        let expected = self.s.config.buckets.counts();
        for side in [&window.canary, &window.baseline] {
            if side.latency.len() != expected {
                return Err(WindowError::BucketMismatch { expected, found: side.latency.len() });
            }
        }
        if let Some(last) = self.s.last_window {
            if window.end <= last {
                return Err(WindowError::OutOfOrder { end: window.end, last });
            }
        }
        if window.end <= self.s.window_start || self.s.decided.is_some() {
            return Ok(());
        }
        self.s.last_window = Some(window.end);
        let iv = &mut self.s.intervals;
        for side in [&window.canary, &window.baseline] {
            iv.invalid_reports += u64::from(side.invalid);
            iv.missing_reports += u64::from(side.missing);
        }
        let fraction = self.s.config.min_reporting;
        if !(window.canary.is_usable(fraction) && window.baseline.is_usable(fraction)) {
            let nobody = |s: &Sample| s.hosts + s.missing + s.invalid == 0;
            if nobody(&window.canary) || nobody(&window.baseline) {
                iv.no_data += 1;
            } else {
                iv.measurement_errors += 1;
            }
            return Ok(());
        }
        iv.used += 1;
        let alpha_each = self.s.config.alpha_each();
        let upper = self.s.config.buckets.upper().to_vec();
        for (m, config) in self.s.metrics.iter_mut().zip(&self.s.config.metrics) {
            m.update(config, &upper, window, now, alpha_each);
        }
        Ok(())
    }

    /// The verdict at `now`, once there is one; the first one given is kept (later calls
    /// repeat it). See the module docs, "Verdicts".
    pub fn poll_verdict(&mut self, now: Duration) -> Option<Verdict> {
        if let Some((_, outcome)) = &self.s.decided {
            return outcome.verdict();
        }
        let outcome = self.outcome(now);
        let undecided = matches!(
            outcome,
            Outcome::Inconclusive {
                reason: InconclusiveReason::NotShownSafe { .. }
                    | InconclusiveReason::NotEnoughData { .. }
            }
        );
        if undecided && self.s.looked + 1 < self.s.looks && !self.s.look_every.is_zero() {
            // Bake again: more traffic may show the canary safe, or harmful.
            self.s.looked += 1;
            self.s.decide_by += self.s.look_every;
            return None;
        }
        let verdict = outcome.verdict();
        if verdict.is_some() {
            self.s.decided = Some((now, outcome));
        }
        verdict
    }

    /// The level of each look of a safety test: `pass_alpha` split over the looks.
    fn safety_alpha(&self) -> f64 {
        self.s.config.pass_alpha / f64::from(self.s.looks)
    }

    /// The level of each look of a rank test: its share of `alpha` split over the looks.
    fn rank_alpha(&self) -> f64 {
        self.s.config.alpha_each() / f64::from(self.s.looks)
    }

    /// The evidence, as of the last window (and the verdict, if given).
    pub fn report(&self) -> Report {
        let config = &self.s.config;
        let final_look = self.s.decided.is_some();
        let metrics = self
            .s
            .metrics
            .iter()
            .zip(&config.metrics)
            .map(|(m, c)| self.metric_report(m, c, final_look))
            .collect();
        let (decided_at, outcome) = match &self.s.decided {
            Some((at, o)) => (Some(*at), o.clone()),
            None => (None, Outcome::Pending),
        };
        Report {
            outcome,
            decided_at,
            window_start: self.s.window_start,
            last_window: self.s.last_window,
            decide_by: self.s.decide_by,
            looks: self.s.looks,
            looked: self.s.looked,
            guard: self.s.guard,
            intervals: self.s.intervals,
            metrics,
        }
    }

    /// What the outcome would be at `now`, without latching it.
    fn outcome(&self, now: Duration) -> Outcome {
        let config = &self.s.config;
        for (m, c) in self.s.metrics.iter().zip(&config.metrics) {
            if let Some(t) = m.tests.iter().find(|t| t.harm_crossed_at.is_some()) {
                let test = TestKind::Sequential { direction: t.direction };
                return Outcome::Fail { metric: c.name.clone(), test };
            }
        }
        if now < self.s.decide_by {
            return Outcome::Pending;
        }
        // A look for a pass: the rank tests, once per look.
        let rank_alpha = self.rank_alpha();
        for (m, c) in self.s.metrics.iter().zip(&config.metrics) {
            if let Some(direction) = m.rank_regression(c, &self.layout, rank_alpha) {
                return Outcome::Fail {
                    metric: c.name.clone(),
                    test: TestKind::Rank { direction },
                };
            }
        }
        let iv = &self.s.intervals;
        let intervals = iv.used + iv.measurement_errors + iv.no_data;
        let unusable = iv.measurement_errors;
        if f64::from(unusable) > config.max_unusable * f64::from(intervals) {
            let reason = InconclusiveReason::MeasurementErrors { unusable, intervals };
            return Outcome::Inconclusive { reason };
        }
        for (m, c) in self.s.metrics.iter().zip(&config.metrics) {
            let samples = m.canary.samples.min(m.baseline.samples);
            if samples < c.min_samples || samples == 0 {
                let reason = InconclusiveReason::NotEnoughData {
                    metric: c.name.clone(),
                    samples,
                    required: c.min_samples,
                };
                return Outcome::Inconclusive { reason };
            }
        }
        let safety_alpha = self.safety_alpha();
        for (m, c) in self.s.metrics.iter().zip(&config.metrics) {
            if !m.shown_safe(safety_alpha) {
                let reason = InconclusiveReason::NotShownSafe { metric: c.name.clone() };
                return Outcome::Inconclusive { reason };
            }
        }
        Outcome::Pass
    }

    fn metric_report(&self, m: &MetricState, c: &MetricConfig, final_look: bool) -> MetricReport {
        let config = &self.s.config;
        let alpha_each = config.alpha_each();
        let rank_alpha = self.rank_alpha();
        let safety_alpha = self.safety_alpha();
        let rank = m.rank(&self.layout, rank_alpha);
        let regression = m.tests.iter().any(|t| t.harm_crossed_at.is_some())
            || (final_look && m.rank_regression(c, &self.layout, rank_alpha).is_some());
        let samples = m.canary.samples.min(m.baseline.samples);
        let status = if regression {
            MetricStatus::Regression
        } else if samples < c.min_samples || samples == 0 {
            MetricStatus::NotEnoughData
        } else if m.shown_safe(safety_alpha) {
            MetricStatus::Safe
        } else {
            MetricStatus::Undecided
        };
        let effect = match c.kind {
            MetricKind::ErrorRate => rate_ratio(m.canary, m.baseline),
            MetricKind::Latency { .. } => rank.map(|r| Effect {
                estimate: r.shift,
                lower: r.shift_lower,
                upper: r.shift_upper,
                level: r.level,
            }),
        };
        let quantiles = match c.kind {
            MetricKind::ErrorRate => None,
            MetricKind::Latency { quantile } => {
                let upper = config.buckets.upper();
                let b = interpolated_quantile(&m.baseline_hist, upper, quantile);
                let k = interpolated_quantile(&m.canary_hist, upper, quantile);
                b.zip(k)
            }
        };
        let harm_threshold = 1.0 / alpha_each;
        let sequential = m
            .tests
            .iter()
            .map(|t| SequentialReport {
                direction: t.direction,
                harm_e_value: t.harm.ln_e().exp(),
                harm_e_max: t.harm_ln_max.exp(),
                harm_p_value: (-t.harm_ln_max).exp().min(1.0),
                harm_threshold,
                harm_crossed_at: t.harm_crossed_at,
                safety_z: t.safety.z(),
                safety_p_value: stats::normal_sf(-t.safety.z()),
                safety_threshold: safety_alpha,
            })
            .collect();
        MetricReport {
            name: c.name.clone(),
            kind: c.kind,
            status,
            canary_samples: m.canary.samples,
            baseline_samples: m.baseline.samples,
            canary_events: m.canary.events,
            baseline_events: m.baseline.events,
            effect,
            quantiles,
            rank,
            sequential,
        }
    }
}

impl MetricState {
    fn new(config: &MetricConfig, buckets: &Buckets) -> Self {
        let directions: &[Direction] = match config.direction {
            Direction::Increase => &[Direction::Increase],
            Direction::Decrease => &[Direction::Decrease],
            Direction::Either => &[Direction::Increase, Direction::Decrease],
        };
        let tests = directions
            .iter()
            .map(|&d| {
                OneSided::new(d, config.kind, config.allowed_increase, config.critical_increase)
            })
            .collect();
        let hist = match config.kind {
            MetricKind::ErrorRate => Vec::new(),
            MetricKind::Latency { .. } => vec![0; buckets.counts()],
        };
        Self {
            canary: Totals::default(),
            baseline: Totals::default(),
            canary_hist: hist.clone(),
            baseline_hist: hist,
            tests,
        }
    }

    fn update(
        &mut self,
        config: &MetricConfig,
        upper: &[f64],
        window: &Window,
        now: Duration,
        alpha_each: f64,
    ) {
        match config.kind {
            MetricKind::ErrorRate => {
                let (c, b) = (&window.canary, &window.baseline);
                for t in &mut self.tests {
                    let table = match t.direction {
                        Direction::Decrease => Table {
                            canary_trials: b.requests,
                            canary_events: b.errors,
                            baseline_trials: c.requests,
                            baseline_events: c.errors,
                        },
                        _ => Table {
                            canary_trials: c.requests,
                            canary_events: c.errors,
                            baseline_trials: b.requests,
                            baseline_events: b.errors,
                        },
                    };
                    t.harm.update(&table);
                    t.safety.update(&table);
                }
                self.canary.samples += c.requests;
                self.canary.events += c.errors;
                self.baseline.samples += b.requests;
                self.baseline.events += b.errors;
            }
            MetricKind::Latency { quantile } => {
                let min_history = MIN_EXPECTED_EXCEEDANCES / (1.0 - quantile);
                for t in &mut self.tests {
                    // The side suspected of being slower, and the reference whose quantile
                    // sets the bounds (from its history only: the bounds are predictable).
                    let (slow, reference, reference_now) = match t.direction {
                        Direction::Decrease => {
                            (&window.baseline.latency, &self.canary_hist, &window.canary.latency)
                        }
                        _ => {
                            (&window.canary.latency, &self.baseline_hist, &window.baseline.latency)
                        }
                    };
                    let history: u64 = reference.iter().sum();
                    if (history as f64) < min_history {
                        continue;
                    }
                    let Some(q) = quantile_bucket(reference, quantile) else { continue };
                    if q >= upper.len() {
                        continue;
                    }
                    let bound = upper[q];
                    let reference_above = above(reference_now, q);
                    let reference_total: u64 = reference_now.iter().sum();
                    let slow_total: u64 = slow.iter().sum();
                    let table = |slow_bound: usize| Table {
                        canary_trials: slow_total,
                        canary_events: above(slow, slow_bound),
                        baseline_trials: reference_total,
                        baseline_events: reference_above,
                    };
                    let harm_scaled = bound * (1.0 + config.allowed_increase) * (1.0 - BOUND_SLACK);
                    let harm_bound = upper.partition_point(|&u| u < harm_scaled);
                    if harm_bound < upper.len() {
                        t.harm.update(&table(harm_bound));
                    }
                    let safe_scaled =
                        bound * (1.0 + config.critical_increase) * (1.0 + BOUND_SLACK);
                    let safe_bound = upper.partition_point(|&u| u <= safe_scaled) - 1;
                    t.safety.update(&table(safe_bound));
                }
                for (sum, &c) in self.canary_hist.iter_mut().zip(&window.canary.latency) {
                    *sum += c;
                }
                for (sum, &b) in self.baseline_hist.iter_mut().zip(&window.baseline.latency) {
                    *sum += b;
                }
                self.canary.samples = self.canary_hist.iter().sum();
                self.baseline.samples = self.baseline_hist.iter().sum();
            }
        }
        for t in &mut self.tests {
            let ln_e = t.harm.ln_e();
            t.harm_ln_max = t.harm_ln_max.max(ln_e);
            if t.harm_crossed_at.is_none() && ln_e >= -alpha_each.ln() {
                t.harm_crossed_at = Some(now);
            }
        }
    }

    /// The rank test of the whole histograms at the failing tests' level (latency only).
    fn rank(&self, layout: &LogLayout, alpha_each: f64) -> Option<RankTest> {
        stats::rank_test(&self.canary_hist, &self.baseline_hist, layout, 1.0 - 2.0 * alpha_each)
    }

    /// The direction in which the final rank test shows a shift beyond the allowed one.
    fn rank_regression(
        &self,
        c: &MetricConfig,
        layout: &LogLayout,
        alpha_each: f64,
    ) -> Option<Direction> {
        let r = self.rank(layout, alpha_each)?;
        let allowed = 1.0 + c.allowed_increase;
        let ways = if c.direction == Direction::Either { 2.0 } else { 1.0 };
        // Either direction: each way at half the level.
        let r = if ways > 1.0 {
            stats::rank_test(&self.canary_hist, &self.baseline_hist, layout, 1.0 - alpha_each)?
        } else {
            r
        };
        let up = matches!(c.direction, Direction::Increase | Direction::Either);
        let down = matches!(c.direction, Direction::Decrease | Direction::Either);
        if up && r.shift_lower > allowed {
            return Some(Direction::Increase);
        }
        if down && r.shift_upper < 1.0 / allowed {
            return Some(Direction::Decrease);
        }
        None
    }

    /// Whether every critical regression of the metric is ruled out, at `pass_alpha`.
    fn shown_safe(&self, pass_alpha: f64) -> bool {
        let z = stats::normal_quantile(1.0 - pass_alpha);
        self.tests.iter().all(|t| t.safety.z() <= -z)
    }
}

/// Observations above bucket `i`'s upper bound.
fn above(hist: &[u64], i: usize) -> u64 {
    hist.get(i + 1..).map_or(0, |tail| tail.iter().sum())
}

/// The bucket holding the `q` quantile: the first whose cumulative count reaches `q` of the
/// total. `None` for an empty histogram.
fn quantile_bucket(hist: &[u64], q: f64) -> Option<usize> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let target = q * total as f64;
    let mut acc = 0u64;
    for (i, &c) in hist.iter().enumerate() {
        acc += c;
        if acc as f64 >= target {
            return Some(i);
        }
    }
    Some(hist.len() - 1)
}

/// The `q` quantile of a histogram, linearly interpolated within its bucket (as Prometheus'
/// `histogram_quantile`; the lowest bucket starts at 0, the overflow bucket answers its lower
/// bound).
pub fn interpolated_quantile(hist: &[u64], upper: &[f64], q: f64) -> Option<f64> {
    let total: u64 = hist.iter().sum();
    if total == 0 || hist.len() != upper.len() + 1 {
        return None;
    }
    let target = q * total as f64;
    let mut acc = 0.0;
    for (i, &c) in hist.iter().enumerate() {
        let c = c as f64;
        if acc + c >= target && c > 0.0 {
            let Some(&hi) = upper.get(i) else { return upper.last().copied() };
            let lo = if i == 0 { 0.0 } else { upper[i - 1] };
            return Some(lo + (hi - lo) * ((target - acc) / c).clamp(0.0, 1.0));
        }
        acc += c;
    }
    upper.last().copied()
}

/// The error rate ratio canary / baseline with Katz' log interval, continuity-corrected by
/// half an event when a side has none.
fn rate_ratio(canary: Totals, baseline: Totals) -> Option<Effect> {
    if canary.samples == 0 || baseline.samples == 0 {
        return None;
    }
    let correction = if canary.events == 0 || baseline.events == 0 { 0.5 } else { 0.0 };
    let (xc, nc) = (canary.events as f64 + correction, canary.samples as f64 + correction);
    let (xb, nb) = (baseline.events as f64 + correction, baseline.samples as f64 + correction);
    let ln_ratio = (xc / nc).ln() - (xb / nb).ln();
    let se = (1.0 / xc - 1.0 / nc + 1.0 / xb - 1.0 / nb).max(0.0).sqrt();
    let z = stats::normal_quantile(0.5 + DISPLAY_LEVEL / 2.0);
    Some(Effect {
        estimate: ln_ratio.exp(),
        lower: (ln_ratio - z * se).exp(),
        upper: (ln_ratio + z * se).exp(),
        level: DISPLAY_LEVEL,
    })
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    const INTERVAL: Duration = Duration::from_secs(10);

    /// One side's traffic: requests per interval, error rate, lognormal latency.
    #[derive(Clone, Copy, Debug)]
    struct Model {
        requests: u64,
        error_rate: f64,
        median: f64,
        sigma: f64,
    }

    impl Model {
        /// 50 requests/s (5% of 1,000), 0.5% errors, median 50 ms, p99 about 200 ms.
        fn healthy() -> Self {
            Self { requests: 500, error_rate: 0.005, median: 0.05, sigma: 0.6 }
        }
    }

    struct Traffic {
        rng: ChaCha8Rng,
        buckets: Buckets,
    }

    impl Traffic {
        fn new(seed: u64) -> Self {
            Self { rng: ChaCha8Rng::seed_from_u64(seed), buckets: Buckets::default() }
        }

        fn side(&mut self, m: Model, hosts: u32) -> Sample {
            let mut s = Sample::new(&self.buckets);
            let mut host = HostSample {
                requests: m.requests,
                errors: 0,
                latency: vec![0; self.buckets.counts()],
            };
            for _ in 0..m.requests {
                if self.rng.r#gen::<f64>() < m.error_rate {
                    host.errors += 1;
                }
                let u1: f64 = self.rng.r#gen::<f64>().max(f64::MIN_POSITIVE);
                let u2: f64 = self.rng.r#gen();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                host.latency[self.buckets.index_of(m.median * (m.sigma * z).exp())] += 1;
            }
            // One report stands for the side's hosts; the judge only sees the sums.
            s.add_host(&host).expect("valid report");
            s.hosts = hosts;
            s
        }

        fn window(&mut self, end: Duration, canary: Model, baseline: Model) -> Window {
            Window { end, canary: self.side(canary, 50), baseline: self.side(baseline, 50) }
        }
    }

    /// Runs a gate of `looks` intervals, polling after each; returns the verdict and when.
    fn run(
        judge: &mut Judge,
        traffic: &mut Traffic,
        looks: u32,
        canary: Model,
        baseline: Model,
    ) -> (Option<Verdict>, Duration) {
        let mut now = Duration::ZERO;
        for _ in 0..looks {
            now += INTERVAL;
            let w = traffic.window(now, canary, baseline);
            judge.handle_window(now, &w).expect("window in order");
            if let Some(v) = judge.poll_verdict(now) {
                return (Some(v), now);
            }
        }
        (None, now)
    }

    fn judge(minutes: u64) -> Judge {
        Judge::new(JudgeConfig::default(), Duration::ZERO, Duration::from_secs(minutes * 60))
            .expect("valid config")
    }

    #[test]
    fn identical_streams_pass_at_the_end_of_the_bake() {
        let mut j = judge(10);
        let mut t = Traffic::new(1);
        let (v, at) = run(&mut j, &mut t, 60, Model::healthy(), Model::healthy());
        assert_eq!(v, Some(Verdict::Pass));
        assert_eq!(at, Duration::from_secs(600), "a pass waits for decide_by");
        let r = j.report();
        assert_eq!(r.outcome, Outcome::Pass);
        assert_eq!(r.intervals.used, 60);
        for m in &r.metrics {
            assert_eq!(m.status, MetricStatus::Safe, "{m:?}");
            let e = m.effect.expect("effect");
            assert!(e.lower <= 1.0 && 1.0 <= e.upper, "{m:?}");
            assert!(m.sequential[0].harm_p_value > 0.01, "{m:?}");
        }
        let latency = &r.metrics[1];
        let (b, c) = latency.quantiles.expect("quantiles");
        assert!((b / c - 1.0).abs() < 0.15, "p99s {b} and {c}");
    }

    #[test]
    fn a_clear_error_regression_fails_early() {
        let mut j = judge(10);
        let mut t = Traffic::new(2);
        let bad = Model { error_rate: 0.015, ..Model::healthy() };
        let (v, at) = run(&mut j, &mut t, 60, bad, Model::healthy());
        assert_eq!(v, Some(Verdict::Fail));
        assert!(at <= Duration::from_secs(300), "failed at {at:?}");
        let r = j.report();
        assert_eq!(
            r.outcome,
            Outcome::Fail {
                metric: "error-rate".to_owned(),
                test: TestKind::Sequential { direction: Direction::Increase }
            }
        );
        let m = &r.metrics[0];
        assert_eq!(m.status, MetricStatus::Regression);
        let s = m.sequential[0];
        assert_eq!(s.harm_crossed_at, Some(at));
        assert!(s.harm_e_value >= s.harm_threshold && s.harm_p_value <= 1.0 / s.harm_threshold);
        assert!(m.effect.expect("effect").estimate > 1.5, "{m:?}");
        // The verdict is latched: more windows change nothing.
        let w = t.window(at + INTERVAL, Model::healthy(), Model::healthy());
        j.handle_window(at + INTERVAL, &w).expect("in order");
        assert_eq!(j.poll_verdict(Duration::from_secs(3600)), Some(Verdict::Fail));
    }

    #[test]
    fn a_p99_regression_fails_on_the_tail_test() {
        let mut j = judge(10);
        let mut t = Traffic::new(3);
        // The same median, p99 +50%: sigma grows by ln(1.5) / z(0.99).
        let healthy = Model::healthy();
        let bad = Model { sigma: healthy.sigma + 1.5f64.ln() / 2.326, ..healthy };
        let (v, at) = run(&mut j, &mut t, 60, bad, healthy);
        assert_eq!(v, Some(Verdict::Fail));
        assert!(at <= Duration::from_secs(300), "failed at {at:?}");
        assert_eq!(
            j.report().outcome,
            Outcome::Fail {
                metric: "latency".to_owned(),
                test: TestKind::Sequential { direction: Direction::Increase }
            }
        );
    }

    #[test]
    fn a_shift_of_the_whole_distribution_fails() {
        let mut j = judge(10);
        let mut t = Traffic::new(4);
        let bad = Model { median: 0.05 * 1.6, ..Model::healthy() };
        let (v, _) = run(&mut j, &mut t, 60, bad, Model::healthy());
        assert_eq!(v, Some(Verdict::Fail));
        let r = j.report();
        let rank = r.metrics[1].rank.expect("rank test");
        assert!(rank.shift_lower > 1.1 && rank.p_larger < 1e-6, "{rank:?}");
    }

    #[test]
    fn sparse_traffic_is_inconclusive_never_a_pass() {
        let mut j = judge(10);
        let mut t = Traffic::new(5);
        let sparse = Model { requests: 2, ..Model::healthy() };
        let (v, _) = run(&mut j, &mut t, 60, sparse, sparse);
        assert_eq!(v, Some(Verdict::Inconclusive));
        assert!(matches!(
            j.report().outcome,
            Outcome::Inconclusive { reason: InconclusiveReason::NotEnoughData { .. } }
        ));
        // No data at all: inconclusive too.
        let mut empty = judge(1);
        assert_eq!(empty.poll_verdict(Duration::from_secs(30)), None);
        assert_eq!(empty.poll_verdict(Duration::from_secs(60)), Some(Verdict::Inconclusive));
    }

    #[test]
    fn enough_requests_but_no_evidence_of_safety_is_inconclusive() {
        let mut config = JudgeConfig::default();
        config.metrics[0].min_samples = 100;
        config.metrics[1].min_samples = 100;
        let mut j = Judge::new(config, Duration::ZERO, Duration::from_secs(10)).expect("valid");
        let mut t = Traffic::new(6);
        // 500 requests a side, a few errors: too few to rule out a doubling.
        let (v, _) = run(&mut j, &mut t, 1, Model::healthy(), Model::healthy());
        assert_eq!(v, Some(Verdict::Inconclusive));
        assert!(matches!(
            j.report().outcome,
            Outcome::Inconclusive { reason: InconclusiveReason::NotShownSafe { .. } }
        ));
    }

    /// A gate request over `hosts` hosts of which `exposed` would run the release after a pass.
    fn request(decide_by: Duration, looks: u16, exposed: u32, hosts: u32) -> GateRequest {
        GateRequest {
            gate: GateId(7),
            region: crate::rollout::RegionIndex(0),
            wave: 0,
            canary: Vec::new(),
            baseline: Vec::new(),
            window_start: Duration::ZERO,
            decide_by,
            looks,
            exposed_after_pass: exposed,
            hosts,
        }
    }

    #[test]
    fn a_gate_that_cannot_decide_bakes_again_before_it_holds() {
        let mut config = JudgeConfig::default();
        // 500 requests a window: 30,000 a side in a 10-minute bake, 60,000 in two.
        for m in &mut config.metrics {
            m.min_samples = 40_000;
        }
        let bake = Duration::from_secs(600);
        let mut j = Judge::for_gate(config.clone(), &request(bake, 3, 1, 100)).expect("valid");
        assert_eq!(j.poll_timeout(), Some(bake));
        let mut t = Traffic::new(21);
        let (v, at) = run(&mut j, &mut t, 180, Model::healthy(), Model::healthy());
        assert_eq!(v, Some(Verdict::Pass));
        assert_eq!(at, 2 * bake, "passed at the second look, not the first");
        let r = j.report();
        assert_eq!((r.looks, r.looked, r.decide_by), (3, 1, 2 * bake));
        // Each look's safety test runs at a third of pass_alpha.
        let threshold = r.metrics[0].sequential[0].safety_threshold;
        assert!((threshold - config.pass_alpha / 3.0).abs() < 1e-12, "{threshold}");

        // Traffic that never suffices: held after the last look, not before.
        let mut j = Judge::for_gate(config, &request(bake, 2, 1, 100)).expect("valid");
        let sparse = Model { requests: 20, ..Model::healthy() };
        let (v, at) = run(&mut j, &mut t, 180, sparse, sparse);
        assert_eq!(v, Some(Verdict::Inconclusive));
        assert_eq!(at, 2 * bake);
        assert_eq!(j.poll_timeout(), None);
    }

    #[test]
    fn a_guard_gate_must_rule_out_the_narrower_critical_increase() {
        let bake = Duration::from_secs(120);
        // 5 of 100 hosts after a pass: within the 5% guard exposure; 25 of 100: beyond it.
        let plain = Judge::for_gate(JudgeConfig::default(), &request(bake, 1, 5, 100));
        let guard = Judge::for_gate(JudgeConfig::default(), &request(bake, 1, 25, 100));
        let (mut plain, mut guard) = (plain.expect("valid"), guard.expect("valid"));
        assert_eq!(guard.config().metrics[0].critical_increase, 0.5);
        assert_eq!(plain.config().metrics[0].critical_increase, 1.0);
        // The same two minutes of healthy traffic (about 30 errors a side) rule out a doubling
        // of the error rate, not +50%.
        let (v, _) = run(&mut plain, &mut Traffic::new(22), 12, Model::healthy(), Model::healthy());
        assert_eq!(v, Some(Verdict::Pass));
        let (v, _) = run(&mut guard, &mut Traffic::new(22), 12, Model::healthy(), Model::healthy());
        assert_eq!(v, Some(Verdict::Inconclusive));
        let r = guard.report();
        assert!(r.guard && !plain.report().guard);
        assert_eq!(
            r.outcome,
            Outcome::Inconclusive {
                reason: InconclusiveReason::NotShownSafe { metric: "error-rate".to_owned() }
            }
        );
        // A deployment of unknown size is guarded.
        let unknown = Judge::for_gate(JudgeConfig::default(), &request(bake, 1, 0, 0));
        assert!(unknown.expect("valid").report().guard);
    }

    #[test]
    fn measurement_errors_are_counted_apart_and_never_fail() {
        let mut j = judge(10);
        let mut t = Traffic::new(7);
        let bad = Model { error_rate: 0.2, ..Model::healthy() };
        let mut now = Duration::ZERO;
        for _ in 0..60 {
            now += INTERVAL;
            // The canary's data is a mess: most of its hosts time out or send garbage, and
            // what does arrive looks terrible.
            let mut w = t.window(now, bad, Model::healthy());
            w.canary.hosts = 10;
            w.canary.missing = 30;
            let reset = HostSample { requests: 1, errors: 5, latency: vec![] };
            assert!(w.canary.add_host(&reset).is_err());
            j.handle_window(now, &w).expect("in order");
            assert_ne!(j.poll_verdict(now), Some(Verdict::Fail));
        }
        assert_eq!(j.poll_verdict(now), Some(Verdict::Inconclusive));
        let r = j.report();
        assert_eq!(
            r.outcome,
            Outcome::Inconclusive {
                reason: InconclusiveReason::MeasurementErrors { unusable: 60, intervals: 60 }
            }
        );
        assert_eq!(r.intervals.measurement_errors, 60);
        assert_eq!(r.intervals.missing_reports, 60 * 30);
        assert_eq!(r.intervals.invalid_reports, 60);
        assert_eq!(r.metrics[0].canary_samples, 0, "unusable intervals are left out");
    }

    #[test]
    fn a_few_unusable_intervals_do_not_stop_a_pass() {
        let mut j = judge(10);
        let mut t = Traffic::new(8);
        let mut now = Duration::ZERO;
        for i in 0..60 {
            now += INTERVAL;
            let mut w = t.window(now, Model::healthy(), Model::healthy());
            if i % 10 == 0 {
                w.baseline = Sample::new(&t.buckets);
                w.baseline.missing = 50;
            }
            j.handle_window(now, &w).expect("in order");
            assert_eq!(j.poll_verdict(now).filter(|_| now < Duration::from_secs(600)), None);
        }
        assert_eq!(j.poll_verdict(now), Some(Verdict::Pass));
        assert_eq!(j.report().intervals.measurement_errors, 6);
    }

    #[test]
    fn windows_out_of_order_or_over_other_buckets_are_refused() {
        let mut j = judge(10);
        let mut t = Traffic::new(9);
        let w = t.window(Duration::from_secs(20), Model::healthy(), Model::healthy());
        j.handle_window(Duration::from_secs(20), &w).expect("first");
        let before = j.snapshot();
        assert_eq!(
            j.handle_window(Duration::from_secs(20), &w),
            Err(WindowError::OutOfOrder {
                end: Duration::from_secs(20),
                last: Duration::from_secs(20)
            })
        );
        let mut other = t.window(Duration::from_secs(30), Model::healthy(), Model::healthy());
        other.canary.latency.pop();
        assert_eq!(
            j.handle_window(Duration::from_secs(30), &other),
            Err(WindowError::BucketMismatch { expected: 66, found: 65 })
        );
        assert_eq!(j.snapshot(), before, "a refused window changes nothing");
    }

    #[test]
    fn a_restored_judge_continues_exactly() {
        let bad = Model { error_rate: 0.009, ..Model::healthy() };
        let mut whole = judge(10);
        let mut t = Traffic::new(10);
        let (v, at) = run(&mut whole, &mut t, 60, bad, Model::healthy());
        assert_eq!(v, Some(Verdict::Fail));

        let mut first = judge(10);
        let mut t = Traffic::new(10);
        let mut now = Duration::ZERO;
        for _ in 0..5 {
            now += INTERVAL;
            let w = t.window(now, bad, Model::healthy());
            first.handle_window(now, &w).expect("in order");
            assert_eq!(first.poll_verdict(now), None);
        }
        let json = serde_json::to_string(&first.snapshot()).expect("serializes");
        let snapshot: JudgeSnapshot = serde_json::from_str(&json).expect("parses");
        let mut resumed = Judge::restore(snapshot).expect("restores");
        let verdict = loop {
            now += INTERVAL;
            let w = t.window(now, bad, Model::healthy());
            resumed.handle_window(now, &w).expect("in order");
            if let Some(v) = resumed.poll_verdict(now) {
                break (v, now);
            }
        };
        assert_eq!(verdict, (Verdict::Fail, at));
        assert_eq!(resumed.report(), whole.report());
    }

    #[test]
    fn corrupt_snapshots_are_refused() {
        let j = judge(10);
        let mut s = j.snapshot();
        s.version = 99;
        assert_eq!(
            Judge::restore(s).err(),
            Some(RestoreError::Version { expected: SNAPSHOT_VERSION, found: 99 })
        );
        let mut s = j.snapshot();
        s.state.metrics[1].canary_hist.pop();
        assert_eq!(Judge::restore(s).err(), Some(RestoreError::Corrupt { what: "histograms" }));
        let mut s = j.snapshot();
        s.state.config.alpha = 2.0;
        assert!(matches!(
            Judge::restore(s),
            Err(RestoreError::Config(ConfigError::OutOfRange { field: "alpha", .. }))
        ));
    }

    #[test]
    fn configurations_are_validated() {
        let new = |c: JudgeConfig| Judge::new(c, Duration::ZERO, Duration::from_secs(60)).err();
        assert_eq!(
            new(JudgeConfig { metrics: vec![], ..JudgeConfig::default() }),
            Some(ConfigError::NoMetrics)
        );
        let mut c = JudgeConfig::default();
        c.metrics[1].name = "error-rate".to_owned();
        assert_eq!(new(c), Some(ConfigError::DuplicateMetric { name: "error-rate".to_owned() }));
        let mut c = JudgeConfig::default();
        c.metrics[0].critical_increase = 0.1;
        assert!(matches!(new(c), Some(ConfigError::Increases { .. })));
        let mut c = JudgeConfig::default();
        c.metrics[1].kind = MetricKind::Latency { quantile: 1.0 };
        assert!(matches!(new(c), Some(ConfigError::Quantile { .. })));
        let c = JudgeConfig { pass_alpha: 0.0, ..JudgeConfig::default() };
        assert!(matches!(new(c), Some(ConfigError::OutOfRange { field: "pass_alpha", .. })));
        assert_eq!(
            Judge::new(JudgeConfig::default(), Duration::from_secs(5), Duration::from_secs(4))
                .err(),
            Some(ConfigError::DecideBeforeStart {
                start: Duration::from_secs(5),
                decide_by: Duration::from_secs(4)
            })
        );
        let json = serde_json::to_string(&JudgeConfig::default()).expect("serializes");
        let back: JudgeConfig = serde_json::from_str(&json).expect("parses");
        let default = JudgeConfig::default();
        assert_eq!(back.metrics, default.metrics);
        // serde_json parses floats to within an ulp (exactly with its float_roundtrip feature).
        let bounds = back.buckets.upper().iter().zip(default.buckets.upper());
        assert!(bounds.into_iter().all(|(a, b)| (a / b - 1.0).abs() < 1e-15));
    }

    #[test]
    fn direction_decides_which_way_is_worse() {
        // A "success" metric: fewer events on the canary is the regression.
        let mut config = JudgeConfig::default();
        config.metrics.truncate(1);
        config.metrics[0].direction = Direction::Decrease;
        let mut down =
            Judge::new(config.clone(), Duration::ZERO, Duration::from_secs(600)).expect("valid");
        let mut t = Traffic::new(11);
        let lower = Model { error_rate: 0.002, ..Model::healthy() };
        assert_eq!(run(&mut down, &mut t, 60, lower, Model::healthy()).0, Some(Verdict::Fail));

        let mut up =
            Judge::new(config.clone(), Duration::ZERO, Duration::from_secs(600)).expect("valid");
        let higher = Model { error_rate: 0.02, ..Model::healthy() };
        assert_ne!(run(&mut up, &mut t, 60, higher, Model::healthy()).0, Some(Verdict::Fail));

        config.metrics[0].direction = Direction::Either;
        let mut either =
            Judge::new(config, Duration::ZERO, Duration::from_secs(600)).expect("valid");
        assert_eq!(run(&mut either, &mut t, 60, lower, Model::healthy()).0, Some(Verdict::Fail));
        assert_eq!(
            either.report().outcome,
            Outcome::Fail {
                metric: "error-rate".to_owned(),
                test: TestKind::Sequential { direction: Direction::Decrease }
            }
        );
    }

    /// Under the null (canary and baseline alike), the share of healthy canaries the
    /// sequential tests ever fail, over 60 looks each, stays within `alpha`, whatever the
    /// error rate, traffic and latency spread (seeded draws of them).
    #[test]
    fn anytime_valid_tests_keep_their_level_across_looks() {
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        let config = Config { cases: 4, failure_persistence: None, ..Config::default() };
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]);
        let mut runner = TestRunner::new_with_rng(config, rng);
        let params = (0.002f64..0.03, 100u64..600, 0.3f64..0.9, 0u64..u64::MAX);
        runner
            .run(&params, |(error_rate, requests, sigma, seed)| {
                let alpha = 0.05;
                let streams = 100;
                let mut failed = 0;
                for s in 0..streams {
                    let config = JudgeConfig { alpha, ..JudgeConfig::default() };
                    let mut j = Judge::new(config, Duration::ZERO, Duration::from_secs(3600))
                        .expect("valid");
                    let mut t = Traffic::new(seed ^ s);
                    let m = Model { requests, error_rate, median: 0.05, sigma };
                    let (v, _) = run(&mut j, &mut t, 60, m, m);
                    failed += u32::from(v == Some(Verdict::Fail));
                }
                // At most alpha in expectation; allow binomial noise of three sigmas.
                let bound = alpha * streams as f64 + 3.0 * (alpha * streams as f64).sqrt();
                proptest::prop_assert!(f64::from(failed) <= bound, "{failed} of {streams} failed");
                Ok(())
            })
            .expect("level kept");
    }

    /// The judge's verdicts drive the rollout engine: a failing canary is rolled back before
    /// it grows past its first step.
    #[test]
    fn the_gate_before_the_release_widens_beyond_5_percent_is_a_guard_gate() {
        use crate::rollout::{
            Command, HostEvent, HostId, HostSpec, ManifestId, Plan, RegionIndex, Rollout, Strategy,
        };
        let (v1, v2) = (ManifestId([1; 32]), ManifestId([2; 32]));
        let hosts = (0..400)
            .map(|i| HostSpec { id: HostId(i), region: RegionIndex(0), previous: Some(v1) })
            .collect();
        let plan = Plan::new("web", v2, vec!["eu".to_owned()], hosts, Strategy::canary());
        let mut now = Duration::ZERO;
        let mut rollout = Rollout::new(now, plan).expect("valid plan");
        for i in 0..400 {
            rollout.handle_host(now, HostId(i), HostEvent::Staged { manifest: v2 }).expect("host");
        }
        let mut requests = Vec::new();
        while requests.len() < 3 && now < Duration::from_secs(4 * 3600) {
            while let Some(c) = rollout.poll_command() {
                match c {
                    Command::SetDesired { desired, hosts } if desired.active == Some(v2) => {
                        for h in hosts {
                            let active = HostEvent::Active { manifest: v2 };
                            rollout.handle_host(now, h, active).expect("host");
                            let health = HostEvent::Health { manifest: v2, healthy: true };
                            rollout.handle_host(now, h, health).expect("host");
                        }
                    }
                    Command::EvaluateGate(request) => requests.push(request),
                    _ => {}
                }
            }
            // Every gate passes as soon as the bake ends.
            now += INTERVAL;
            rollout.handle_timeout(now);
            if let Some(r) = requests.last() {
                if now >= r.decide_by {
                    let _ = rollout.handle_verdict(now, r.gate, Verdict::Pass);
                }
            }
        }
        let seen: Vec<(u16, u32, u32, bool)> = requests
            .iter()
            .map(|r| {
                let j = Judge::for_gate(JudgeConfig::default(), r).expect("valid");
                (r.looks, r.exposed_after_pass, r.hosts, j.report().guard)
            })
            .collect();
        // 1% (4 hosts) would widen to 5% (20): not guarded; 5% to 25% (100) and 25% to 50%
        // (200): guarded.
        assert_eq!(seen, [(3, 20, 400, false), (3, 100, 400, true), (3, 200, 400, true)]);
    }

    #[test]
    fn a_failing_gate_rolls_the_canary_back() {
        use crate::rollout::{
            Bake, Command, HostEvent, HostId, HostSpec, ManifestId, Phase, Plan, RegionIndex,
            RollbackReason, Rollout, Strategy,
        };
        let (v1, v2) = (ManifestId([1; 32]), ManifestId([2; 32]));
        let hosts = (0..400)
            .map(|i| HostSpec { id: HostId(i), region: RegionIndex(0), previous: Some(v1) })
            .collect();
        let mut plan = Plan::new("web", v2, vec!["eu".to_owned()], hosts, Strategy::canary());
        plan.bake = Bake {
            first_region: Duration::from_secs(600),
            other_regions: Duration::from_secs(300),
            extensions: 0,
        };
        let mut now = Duration::ZERO;
        let mut rollout = Rollout::new(now, plan).expect("valid plan");
        for i in 0..400 {
            rollout.handle_host(now, HostId(i), HostEvent::Staged { manifest: v2 }).expect("host");
        }
        let mut judge = None;
        let mut t = Traffic::new(12);
        let bad = Model { error_rate: 0.05, ..Model::healthy() };
        for _ in 0..120 {
            while let Some(c) = rollout.poll_command() {
                match c {
                    Command::SetDesired { desired, hosts } if desired.active == Some(v2) => {
                        for h in hosts {
                            rollout
                                .handle_host(now, h, HostEvent::Active { manifest: v2 })
                                .expect("host");
                            let health = HostEvent::Health { manifest: v2, healthy: true };
                            rollout.handle_host(now, h, health).expect("host");
                        }
                    }
                    Command::EvaluateGate(request) => {
                        judge =
                            Some(Judge::for_gate(JudgeConfig::default(), &request).expect("valid"));
                    }
                    _ => {}
                }
            }
            now += INTERVAL;
            rollout.handle_timeout(now);
            if let Some(j) = &mut judge {
                let w = t.window(now, bad, Model::healthy());
                j.handle_window(now, &w).expect("in order");
                if let Some(v) = j.poll_verdict(now) {
                    let gate = j.gate().expect("made for a gate");
                    rollout.handle_verdict(now, gate, v).expect("gate open");
                    break;
                }
            }
        }
        let gate = judge.and_then(|j| j.gate()).expect("a gate was opened");
        assert_eq!(
            rollout.phase(),
            Phase::RollingBack { reason: RollbackReason::GateFailed { gate } }
        );
        assert_eq!(rollout.touched().count(), 4, "only the 1% step ran the target");
    }
}
