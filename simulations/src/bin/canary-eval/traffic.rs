//! Simulated request streams: per interval, canary and baseline request counts (Poisson),
//! errors (binomial) and a latency histogram (lognormal latencies, bucketed).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use fleetwave_coordinator::analysis::{Buckets, HostSample, Sample, Window};

/// One side's traffic law.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Model {
    /// Requests per second.
    pub(crate) rate: f64,
    /// Share of requests that fail.
    pub(crate) error_rate: f64,
    /// Median latency, seconds.
    pub(crate) median: f64,
    /// Log-scale spread of the latency.
    pub(crate) sigma: f64,
}

/// `z` of the 99th percentile of a standard normal.
pub(crate) const Z99: f64 = 2.326_347_874;

impl Model {
    /// The baseline: 0.5% errors, median 50 ms, sigma 0.6 (p99 about 202 ms).
    pub(crate) fn baseline(rate: f64) -> Self {
        Self { rate, error_rate: 0.005, median: 0.05, sigma: 0.6 }
    }

    /// The latency's 99th percentile.
    pub(crate) fn p99(&self) -> f64 {
        self.median * (self.sigma * Z99).exp()
    }
}

/// Bucket probabilities of a model's latency over a layout.
pub(crate) fn bucket_probabilities(m: &Model, buckets: &Buckets) -> Vec<f64> {
    let cdf = |x: f64| normal_cdf((x / m.median).ln() / m.sigma);
    let mut probs = Vec::with_capacity(buckets.counts());
    let mut last = 0.0;
    for &u in buckets.upper() {
        let c = cdf(u);
        probs.push((c - last).max(0.0));
        last = c;
    }
    probs.push((1.0 - last).max(0.0));
    probs
}

/// `Φ(x)`.
fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// `erfc(x)`, from the Abramowitz-Stegun 7.1.26 fit of erf (absolute error below 1.5e-7,
/// ample for bucket probabilities and the baselines' p-values).
pub(crate) fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let r = poly * (-z * z).exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// `ln Γ(x)` by Stirling's series (shifted above 10), for the Poisson sampler.
fn ln_gamma(mut x: f64) -> f64 {
    let mut shift = 0.0;
    while x < 10.0 {
        shift -= x.ln();
        x += 1.0;
    }
    let inv2 = 1.0 / (x * x);
    shift + (x - 0.5) * x.ln() - x
        + 0.918_938_533_204_672_8
        + (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 / 1260.0)) / x
}

/// A Poisson variate: multiplication below a mean of 12, Hörmann's PTRS above.
pub(crate) fn poisson(rng: &mut ChaCha8Rng, mean: f64) -> u64 {
    if mean <= 0.0 {
        return 0;
    }
    if mean < 12.0 {
        let limit = (-mean).exp();
        let mut k = 0;
        let mut p: f64 = rng.r#gen();
        while p > limit {
            k += 1;
            p *= rng.r#gen::<f64>();
        }
        return k;
    }
    let slam = mean.sqrt();
    let loglam = mean.ln();
    let b = 0.931 + 2.53 * slam;
    let a = -0.059 + 0.024_83 * b;
    let inv_alpha = 1.1239 + 1.1328 / (b - 3.4);
    let vr = 0.9277 - 3.6224 / (b - 2.0);
    loop {
        let u = rng.r#gen::<f64>() - 0.5;
        let v: f64 = rng.r#gen();
        let us = 0.5 - u.abs();
        let k = ((2.0 * a / us + b) * u + mean + 0.43).floor();
        if us >= 0.07 && v <= vr {
            return k as u64;
        }
        if k < 0.0 || (us < 0.013 && v > us) {
            continue;
        }
        if v.ln() + inv_alpha.ln() - (a / (us * us) + b).ln()
            <= -mean + k * loglam - ln_gamma(k + 1.0)
        {
            return k as u64;
        }
    }
}

/// A binomial variate by geometric skips: O(n p) draws.
pub(crate) fn binomial(rng: &mut ChaCha8Rng, n: u64, p: f64) -> u64 {
    if p <= 0.0 || n == 0 {
        return 0;
    }
    if p >= 1.0 {
        return n;
    }
    let lq = (1.0 - p).ln();
    let mut x = 0;
    let mut pos = 0.0;
    loop {
        let u: f64 = rng.r#gen::<f64>().max(f64::MIN_POSITIVE);
        pos += (u.ln() / lq).floor() + 1.0;
        if pos > n as f64 {
            return x;
        }
        x += 1;
    }
}

/// One side's traffic over `seconds`, as the nodes of `hosts` hosts would report it.
pub(crate) fn side(
    rng: &mut ChaCha8Rng,
    model: &Model,
    probs: &[f64],
    buckets: &Buckets,
    seconds: f64,
    hosts: u32,
) -> Sample {
    let mean = model.rate * seconds;
    let latency: Vec<u64> = probs.iter().map(|&p| poisson(rng, mean * p)).collect();
    let requests = latency.iter().sum();
    let errors = binomial(rng, requests, model.error_rate);
    let mut s = Sample::new(buckets);
    // The sum of a side's reports: one report carries it (the judge only sees sums).
    let report = HostSample { requests, errors, latency };
    if s.add_host(&report).is_ok() {
        s.hosts = hosts.max(1);
    }
    s
}

/// A stream of windows: canary and baseline with their laws.
#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) canary: Model,
    pub(crate) baseline: Model,
    canary_probs: Vec<f64>,
    baseline_probs: Vec<f64>,
}

impl Stream {
    pub(crate) fn new(canary: Model, baseline: Model, buckets: &Buckets) -> Self {
        Self {
            canary,
            baseline,
            canary_probs: bucket_probabilities(&canary, buckets),
            baseline_probs: bucket_probabilities(&baseline, buckets),
        }
    }

    pub(crate) fn window(
        &self,
        rng: &mut ChaCha8Rng,
        buckets: &Buckets,
        end: std::time::Duration,
        seconds: f64,
    ) -> Window {
        let canary = side(rng, &self.canary, &self.canary_probs, buckets, seconds, 1);
        let baseline = side(rng, &self.baseline, &self.baseline_probs, buckets, seconds, 1);
        Window { end, canary, baseline }
    }
}
