//! The judges compared on the same streams: the Fleetwave judge, a fixed-threshold judge
//! (Flagger style) and a fixed-window Mann-Whitney judge looked at every interval (Kayenta
//! style).

use std::collections::VecDeque;
use std::time::Duration;

use fleetwave_coordinator::analysis::{Buckets, Judge, JudgeConfig, Window, interpolated_quantile};
use fleetwave_coordinator::rollout::Verdict;

/// What a judge says after one more interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Look {
    /// Nothing yet.
    Wait,
    /// Fails the canary.
    Fail,
    /// The final verdict is pass (Fleetwave only).
    Pass,
    /// The final verdict is inconclusive (Fleetwave only).
    Inconclusive,
}

/// The Fleetwave judge with its defaults, to be decided at `decide_by`.
pub(crate) struct Fleetwave {
    judge: Judge,
}

impl Fleetwave {
    pub(crate) fn new(config: JudgeConfig, decide_by: Duration) -> anyhow::Result<Self> {
        Ok(Self { judge: Judge::new(config, Duration::ZERO, decide_by)? })
    }

    pub(crate) fn look(&mut self, now: Duration, w: &Window) -> anyhow::Result<Look> {
        self.judge.handle_window(now, w)?;
        Ok(match self.judge.poll_verdict(now) {
            None => Look::Wait,
            Some(Verdict::Fail) => Look::Fail,
            Some(Verdict::Pass) => Look::Pass,
            Some(Verdict::Inconclusive) => Look::Inconclusive,
        })
    }
}

/// Flagger style: each look queries the last minute of canary traffic and fails the canary
/// when its error rate or its p99 is above a fixed threshold.
pub(crate) struct Threshold {
    max_error_rate: f64,
    max_p99: f64,
    window: VecDeque<(u64, u64, Vec<u64>)>,
    intervals: usize,
    upper: Vec<f64>,
}

impl Threshold {
    pub(crate) fn new(
        max_error_rate: f64,
        max_p99: f64,
        interval: Duration,
        buckets: &Buckets,
    ) -> Self {
        let intervals = (60.0 / interval.as_secs_f64()).round().max(1.0) as usize;
        Self {
            max_error_rate,
            max_p99,
            window: VecDeque::new(),
            intervals,
            upper: buckets.upper().to_vec(),
        }
    }

    pub(crate) fn look(&mut self, w: &Window) -> Look {
        let c = &w.canary;
        self.window.push_back((c.requests, c.errors, c.latency.clone()));
        if self.window.len() > self.intervals {
            self.window.pop_front();
        }
        if self.window.len() < self.intervals {
            return Look::Wait;
        }
        let requests: u64 = self.window.iter().map(|x| x.0).sum();
        let errors: u64 = self.window.iter().map(|x| x.1).sum();
        let mut hist = vec![0u64; self.upper.len() + 1];
        for (_, _, h) in &self.window {
            for (s, c) in hist.iter_mut().zip(h) {
                *s += c;
            }
        }
        let rate = if requests > 0 { errors as f64 / requests as f64 } else { 0.0 };
        let p99 = interpolated_quantile(&hist, &self.upper, 0.99).unwrap_or(0.0);
        if rate > self.max_error_rate || p99 > self.max_p99 { Look::Fail } else { Look::Wait }
    }
}

/// Kayenta style: the metric's time series (one point per interval: the error rate, the p99)
/// of canary and baseline since the window started, compared by a one-sided Mann-Whitney test
/// at `alpha` per metric, at every look.
pub(crate) struct Kayenta {
    alpha: f64,
    canary_errors: Vec<f64>,
    baseline_errors: Vec<f64>,
    canary_p99: Vec<f64>,
    baseline_p99: Vec<f64>,
    upper: Vec<f64>,
}

impl Kayenta {
    pub(crate) fn new(alpha: f64, buckets: &Buckets) -> Self {
        Self {
            alpha,
            canary_errors: Vec::new(),
            baseline_errors: Vec::new(),
            canary_p99: Vec::new(),
            baseline_p99: Vec::new(),
            upper: buckets.upper().to_vec(),
        }
    }

    pub(crate) fn look(&mut self, w: &Window) -> Look {
        let rate = |r: u64, e: u64| if r > 0 { e as f64 / r as f64 } else { 0.0 };
        self.canary_errors.push(rate(w.canary.requests, w.canary.errors));
        self.baseline_errors.push(rate(w.baseline.requests, w.baseline.errors));
        let p99 = |h: &[u64]| interpolated_quantile(h, &self.upper, 0.99).unwrap_or(0.0);
        self.canary_p99.push(p99(&w.canary.latency));
        self.baseline_p99.push(p99(&w.baseline.latency));
        if self.canary_errors.len() < 3 {
            return Look::Wait;
        }
        let worse = |c: &[f64], b: &[f64]| mann_whitney_p_larger(c, b) < self.alpha;
        if worse(&self.canary_errors, &self.baseline_errors)
            || worse(&self.canary_p99, &self.baseline_p99)
        {
            Look::Fail
        } else {
            Look::Wait
        }
    }
}

/// One-sided p-value that `x` is stochastically larger than `y`: Mann-Whitney with midranks and
/// the tie-corrected normal approximation.
fn mann_whitney_p_larger(x: &[f64], y: &[f64]) -> f64 {
    let mut all: Vec<(f64, bool)> =
        x.iter().map(|&v| (v, true)).chain(y.iter().map(|&v| (v, false))).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = all.len() as f64;
    let (nx, ny) = (x.len() as f64, y.len() as f64);
    let mut rank_sum = 0.0;
    let mut ties = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let t = (j - i + 1) as f64;
        let mid = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += mid * all[i..=j].iter().filter(|a| a.1).count() as f64;
        ties += t * t * t - t;
        i = j + 1;
    }
    let u = rank_sum - nx * (nx + 1.0) / 2.0;
    let mean = nx * ny / 2.0;
    let var = nx * ny / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if var <= 0.0 {
        return 1.0;
    }
    let z = (u - mean) / var.sqrt();
    0.5 * crate::traffic::erfc(z / std::f64::consts::SQRT_2)
}
