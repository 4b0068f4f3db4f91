//! The statistics of the judge: special functions, the conditional test of two proportions, the
//! mixture e-process built on it, and the Mann-Whitney test with its Hodges-Lehmann interval on
//! bucketed data. Everything here is pure arithmetic on `f64`; the judge in the parent module
//! decides what to feed it.

use serde::{Deserialize, Serialize};

/// `ln(x)` of very small numbers stays finite: below this the log is clamped.
const LN_TINY: f64 = -745.0;

/// Terms of a sum smaller than the largest by this factor (in log) are dropped: e^-40 is about
/// 4e-18, below an `f64`'s resolution of the sum.
const LOG_NEGLIGIBLE: f64 = -40.0;

// -------------------------------------------------------------------------------------------
// Special functions

/// `ln Γ(x)` for `x > 0`: Stirling's series above 10, shifted up by the recurrence below it.
/// Absolute error below 1e-13 over the range the judge uses (counts up to about 1e12).
pub(crate) fn ln_gamma(x: f64) -> f64 {
    let mut x = x;
    let mut shift = 0.0;
    while x < 10.0 {
        shift -= x.ln();
        x += 1.0;
    }
    let inv = 1.0 / x;
    let inv2 = inv * inv;
    let series = inv
        * (1.0 / 12.0
            - inv2 * (1.0 / 360.0 - inv2 * (1.0 / 1260.0 - inv2 * (1.0 / 1680.0 - inv2 / 1188.0))));
    shift + (x - 0.5) * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI).ln() + series
}

/// `ln C(n, k)`.
pub(crate) fn ln_choose(n: f64, k: f64) -> f64 {
    ln_gamma(n + 1.0) - ln_gamma(k + 1.0) - ln_gamma(n - k + 1.0)
}

/// `ln(Σ exp(xs))`, without overflow. `-inf` for an empty slice.
pub(crate) fn log_sum_exp(xs: impl IntoIterator<Item = f64> + Clone) -> f64 {
    let max = xs.clone().into_iter().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + xs.into_iter().map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// The complementary error function, `erfc(x)`, with relative error below 1.2e-7 everywhere
/// (the Chebyshev fit of Numerical Recipes, section 6.2): plenty for p-values and intervals.
pub(crate) fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// The standard normal upper tail, `P(Z > z)`.
pub(crate) fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The standard normal quantile, `Φ⁻¹(p)` for `0 < p < 1` (Acklam's rational approximation,
/// relative error below 1.2e-9).
pub(crate) fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.024_25 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.024_25 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

// -------------------------------------------------------------------------------------------
// Two proportions, conditionally on the events

/// One interval's counts for a comparison of two proportions: `canary_events` of
/// `canary_trials` against `baseline_events` of `baseline_trials`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Table {
    pub(crate) canary_trials: u64,
    pub(crate) canary_events: u64,
    pub(crate) baseline_trials: u64,
    pub(crate) baseline_events: u64,
}

impl Table {
    /// Whether the table says anything about the odds ratio: both sides have trials and there
    /// is at least one event and one non-event.
    pub(crate) fn informative(&self) -> bool {
        let trials = self.canary_trials + self.baseline_trials;
        let events = self.canary_events + self.baseline_events;
        self.canary_trials > 0 && self.baseline_trials > 0 && events > 0 && events < trials
    }
}

/// `t(j + 1) / t(j)` of Fisher's noncentral hypergeometric law, `t(j) = C(m1, j) C(m2, n - j)
/// ω^j`: decreasing in `j`.
fn term_ratio(m1: f64, m2: f64, n: f64, ln_omega: f64) -> impl Fn(f64) -> f64 {
    let omega = ln_omega.exp();
    move |j| (m1 - j) * (n - j) * omega / ((j + 1.0) * (m2 - n + j + 1.0))
}

/// The mode over `[lo, hi]`: the first `j` where the term ratio drops below 1 (binary search).
fn mode_of(lo: f64, hi: f64, ratio: &impl Fn(f64) -> f64) -> f64 {
    let (mut a, mut b) = (lo, hi);
    while a < b {
        let mid = ((a + b) / 2.0).floor();
        if ratio(mid) >= 1.0 {
            a = mid + 1.0;
        } else {
            b = mid;
        }
    }
    a
}

/// `ln Z(ω)` of Fisher's noncentral hypergeometric distribution: the law of the canary's
/// events `k` given the total events `n`, with `Z(ω) = Σ_j C(m1, j) C(m2, n - j) ω^j` over the
/// support. Summed outward from the mode until the terms are negligible, so it costs about
/// the distribution's spread (a few standard deviations), not its support.
fn ln_fnch_normalizer(m1: f64, m2: f64, n: f64, ln_omega: f64) -> f64 {
    let lo = (n - m2).max(0.0);
    let hi = n.min(m1);
    let ratio = term_ratio(m1, m2, n, ln_omega);
    let mode = mode_of(lo, hi, &ratio);
    let ln_term = |j: f64| ln_choose(m1, j) + ln_choose(m2, n - j) + j * ln_omega;
    let ln_mode = ln_term(mode);
    let mut sum = 1.0;
    let mut rel = 0.0;
    let mut j = mode;
    while j < hi {
        rel += ratio(j).ln();
        j += 1.0;
        if rel < LOG_NEGLIGIBLE {
            break;
        }
        sum += rel.exp();
    }
    rel = 0.0;
    j = mode;
    while j > lo {
        rel -= ratio(j - 1.0).ln();
        j -= 1.0;
        if rel < LOG_NEGLIGIBLE {
            break;
        }
        sum += rel.exp();
    }
    ln_mode + sum.ln()
}

/// Mean and variance of the canary's events under Fisher's noncentral hypergeometric law with
/// odds ratio `e^ln_omega`, summed outward from the mode like the normalizer.
fn fnch_moments(m1: f64, m2: f64, n: f64, ln_omega: f64) -> (f64, f64) {
    let lo = (n - m2).max(0.0);
    let hi = n.min(m1);
    let ratio = term_ratio(m1, m2, n, ln_omega);
    let mode = mode_of(lo, hi, &ratio);
    // Weights relative to the mode's; moments about the mode, for precision.
    let (mut w, mut s1, mut s2) = (1.0, 0.0, 0.0);
    for step in [1.0f64, -1.0] {
        let mut rel = 0.0;
        let mut j = mode;
        loop {
            if (step > 0.0 && j >= hi) || (step < 0.0 && j <= lo) {
                break;
            }
            rel += if step > 0.0 { ratio(j).ln() } else { -ratio(j - 1.0).ln() };
            j += step;
            if rel < LOG_NEGLIGIBLE {
                break;
            }
            let t = rel.exp();
            let d = j - mode;
            w += t;
            s1 += t * d;
            s2 += t * d * d;
        }
    }
    let mean = s1 / w;
    (mode + mean, (s2 / w - mean * mean).max(0.0))
}

/// A fixed-horizon conditional score test of the odds ratio, stratified by interval (the
/// Mantel-Haenszel idea, with the exact conditional moments at the null odds ratio): the
/// canary's events minus their expectation under the null, summed over the intervals, over
/// the square root of the summed variances. Looked at once (at the end of a bake) it is valid
/// as it stands; it is the judge's test for a *pass*, which is only ever given once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ScoreTest {
    ln_null: f64,
    deviation: f64,
    variance: f64,
}

impl ScoreTest {
    pub(crate) fn new(ln_null: f64) -> Self {
        Self { ln_null, deviation: 0.0, variance: 0.0 }
    }

    pub(crate) fn update(&mut self, t: &Table) {
        if !t.informative() {
            return;
        }
        let n = (t.canary_events + t.baseline_events) as f64;
        let (mean, var) =
            fnch_moments(t.canary_trials as f64, t.baseline_trials as f64, n, self.ln_null);
        self.deviation += t.canary_events as f64 - mean;
        self.variance += var;
    }

    /// The standardized score: negative when the canary has fewer events than the null says.
    pub(crate) fn z(&self) -> f64 {
        if self.variance > 0.0 { self.deviation / self.variance.sqrt() } else { 0.0 }
    }

    pub(crate) fn is_consistent(&self) -> bool {
        self.ln_null.is_finite()
            && self.deviation.is_finite()
            && self.variance.is_finite()
            && self.variance >= 0.0
    }
}

/// `ln` of the likelihood ratio of odds ratio `e^ln_alt` against `e^ln_null` for one table,
/// conditionally on its margins (Fisher's noncentral hypergeometric law). Zero when the table
/// is not informative.
///
/// Conditioning on the total number of events removes the baseline's own rate, a nuisance that
/// changes from interval to interval: the law of the canary's share of the events depends on
/// the odds ratio alone. The family has a monotone likelihood ratio in `k`, so for
/// `ln_alt > ln_null` the ratio has expectation at most 1 under every odds ratio at or below
/// the null one (and symmetrically for `ln_alt < ln_null`): a composite null is covered by its
/// boundary.
pub(crate) fn ln_likelihood_ratio(t: &Table, ln_alt: f64, ln_null: f64) -> f64 {
    if !t.informative() {
        return 0.0;
    }
    let m1 = t.canary_trials as f64;
    let m2 = t.baseline_trials as f64;
    let n = (t.canary_events + t.baseline_events) as f64;
    let k = t.canary_events as f64;
    k * (ln_alt - ln_null) - ln_fnch_normalizer(m1, m2, n, ln_alt)
        + ln_fnch_normalizer(m1, m2, n, ln_null)
}

/// Spacing of the mixture's alternatives, in `ln` odds ratio away from the null: from a 10%
/// change to a twentyfold one. A uniform mixture over them loses `ln 12` (2.5 nats) against a
/// test that knew the true effect in advance, and adapts to whichever is true.
const MIXTURE_OFFSETS: [f64; 12] = [0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0];

/// Which way an e-process looks for evidence: odds ratios above its null, or below.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) enum Tail {
    /// Evidence that the odds ratio is above the null.
    Above,
    /// Evidence that the odds ratio is below the null.
    Below,
}

/// A mixture sequential probability ratio test of an odds ratio: the running product of
/// per-interval conditional likelihood ratios, averaged over a grid of alternatives. Under the
/// null it is a nonnegative supermartingale starting at 1, so by Ville's inequality it ever
/// reaches `1/α` with probability at most `α`, however often it is looked at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct MixtureSprt {
    /// `ln` of the null odds ratio (the boundary of the composite null).
    ln_null: f64,
    tail: Tail,
    /// Accumulated `ln` likelihood ratio of each alternative of [`MIXTURE_OFFSETS`].
    ln_lr: Vec<f64>,
}

impl MixtureSprt {
    pub(crate) fn new(ln_null: f64, tail: Tail) -> Self {
        Self { ln_null, tail, ln_lr: vec![0.0; MIXTURE_OFFSETS.len()] }
    }

    pub(crate) fn update(&mut self, table: &Table) {
        if !table.informative() {
            return;
        }
        let sign = match self.tail {
            Tail::Above => 1.0,
            Tail::Below => -1.0,
        };
        for (acc, offset) in self.ln_lr.iter_mut().zip(MIXTURE_OFFSETS) {
            *acc += ln_likelihood_ratio(table, self.ln_null + sign * offset, self.ln_null);
        }
    }

    /// `ln` of the e-value: the mixture's likelihood ratio so far.
    pub(crate) fn ln_e(&self) -> f64 {
        let ln_w = -(MIXTURE_OFFSETS.len() as f64).ln();
        log_sum_exp(self.ln_lr.iter().map(|l| l + ln_w)).max(LN_TINY)
    }

    /// Whether the state fits the grid (a restored judge checks it).
    pub(crate) fn is_consistent(&self) -> bool {
        self.ln_lr.len() == MIXTURE_OFFSETS.len()
            && self.ln_null.is_finite()
            && self.ln_lr.iter().all(|l| l.is_finite())
    }
}

// -------------------------------------------------------------------------------------------
// Ranks on bucketed data

/// A Mann-Whitney comparison of the canary's distribution with the baseline's, on bucketed
/// data, and the Hodges-Lehmann estimate of the shift between them with its interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankTest {
    /// Observations of the canary.
    pub canary: u64,
    /// Observations of the baseline.
    pub baseline: u64,
    /// The Mann-Whitney `U` of the canary: pairs where the canary is larger, ties counted half.
    pub u: f64,
    /// `U` standardized with the tie-corrected variance; positive when the canary is larger.
    pub z: f64,
    /// One-sided p-value of "the canary is not larger" (normal approximation): small when the
    /// canary is larger (slower).
    pub p_larger: f64,
    /// One-sided p-value of "the canary is not smaller".
    pub p_smaller: f64,
    /// Hodges-Lehmann estimate of the multiplicative shift (canary / baseline): the weighted
    /// median of the pairwise ratios of bucket representatives.
    pub shift: f64,
    /// Lower end of the two-sided interval on the shift at `level` (valid despite the
    /// bucketing: see the module docs).
    pub shift_lower: f64,
    /// Upper end.
    pub shift_upper: f64,
    /// Confidence level of the interval (two-sided).
    pub level: f64,
}

/// A bucket layout on a log scale, for the rank test: each bucket's representative value
/// (the geometric middle of its bounds; the first bucket and the overflow bucket are given the
/// width of their neighbour) and its bounds (`-inf` below the first, `+inf` above the last).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LogLayout {
    reps: Vec<f64>,
    lo: Vec<f64>,
    hi: Vec<f64>,
}

impl LogLayout {
    pub(crate) fn new(upper: &[f64]) -> Self {
        let n = upper.len();
        let ln: Vec<f64> = upper.iter().map(|u| u.ln()).collect();
        let mut reps = Vec::with_capacity(n + 1);
        for i in 0..=n {
            let half = |a: usize, b: usize| {
                if n == 1 { std::f64::consts::LN_2 } else { 0.5 * (ln[b] - ln[a]) }
            };
            let r = if i == 0 {
                ln[0] - half(0, 1.min(n - 1))
            } else if i == n {
                ln[n - 1] + half(n.saturating_sub(2), n - 1)
            } else {
                0.5 * (ln[i - 1] + ln[i])
            };
            reps.push(r);
        }
        let mut lo = vec![f64::NEG_INFINITY];
        lo.extend_from_slice(&ln);
        let mut hi = ln;
        hi.push(f64::INFINITY);
        Self { reps, lo, hi }
    }
}

/// The Mann-Whitney test and Hodges-Lehmann interval of `canary` against `baseline`, both
/// bucket counts over `layout`. `None` when either side is empty.
///
/// Ties are a bucket's worth of observations: each pair in the same bucket counts half, and
/// the variance of `U` carries the usual tie correction, `Σ (t³ - t) / (N (N - 1))`. The
/// interval is the distribution-free one of Moses: the pairwise log-ratios ordered, cut at
/// `n_c n_b / 2 ∓ z σ_U`. Bucketing hides where in its bucket each observation lies, so the
/// ends are taken over the least (for the lower end) and the greatest (for the upper end)
/// pairwise ratio each pair of buckets allows: the true order statistics lie between them,
/// which keeps the interval valid at the price of up to a bucket's width at each end. The
/// point estimate uses the representatives.
pub(crate) fn rank_test(
    canary: &[u64],
    baseline: &[u64],
    layout: &LogLayout,
    level: f64,
) -> Option<RankTest> {
    let nc: u64 = canary.iter().sum();
    let nb: u64 = baseline.iter().sum();
    if nc == 0 || nb == 0 {
        return None;
    }
    let (ncf, nbf) = (nc as f64, nb as f64);
    let total = ncf + nbf;
    let mut below = 0.0;
    let mut u = 0.0;
    let mut ties = 0.0;
    for (&c, &b) in canary.iter().zip(baseline) {
        let (c, b) = (c as f64, b as f64);
        u += c * (below + 0.5 * b);
        below += b;
        let t = c + b;
        ties += t * t * t - t;
    }
    let pairs = ncf * nbf;
    let mean = pairs / 2.0;
    let var = pairs / 12.0 * ((total + 1.0) - ties / (total * (total - 1.0)).max(1.0));
    let sd = var.max(0.0).sqrt();
    let z = if sd > 0.0 { (u - mean) / sd } else { 0.0 };
    // Weighted pairwise differences: representative, least and greatest.
    let mut mid = Vec::new();
    let mut least = Vec::new();
    let mut greatest = Vec::new();
    for (i, &c) in canary.iter().enumerate() {
        if c == 0 {
            continue;
        }
        for (j, &b) in baseline.iter().enumerate() {
            if b > 0 {
                let w = c as f64 * b as f64;
                mid.push((layout.reps[i] - layout.reps[j], w));
                least.push((layout.lo[i] - layout.hi[j], w));
                greatest.push((layout.hi[i] - layout.lo[j], w));
            }
        }
    }
    let at_weight = |diffs: &mut Vec<(f64, f64)>, w: f64| {
        diffs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut acc = 0.0;
        for &(d, wt) in diffs.iter() {
            acc += wt;
            if acc >= w {
                return d;
            }
        }
        diffs.last().map_or(0.0, |d| d.0)
    };
    let zq = normal_quantile(0.5 + level / 2.0);
    let k = (mean - zq * sd).max(0.0).max(f64::MIN_POSITIVE);
    let lower = at_weight(&mut least, k);
    let upper = at_weight(&mut greatest, (pairs - k).max(f64::MIN_POSITIVE));
    let shift = at_weight(&mut mid, mean);
    Some(RankTest {
        canary: nc,
        baseline: nb,
        u,
        z,
        p_larger: normal_sf(z),
        p_smaller: normal_sf(-z),
        shift: shift.exp(),
        shift_lower: lower.exp(),
        shift_upper: upper.exp(),
        level,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1.0)
    }

    #[test]
    fn ln_gamma_matches_factorials() {
        let mut fact = 1.0f64;
        for n in 1..30u32 {
            fact *= f64::from(n);
            assert!(close(ln_gamma(f64::from(n) + 1.0), fact.ln(), 1e-13), "n = {n}");
        }
        // Γ(1/2) = √π.
        assert!(close(ln_gamma(0.5), std::f64::consts::PI.sqrt().ln(), 1e-12));
    }

    #[test]
    fn normal_tail_and_quantile_agree() {
        assert!(close(normal_sf(0.0), 0.5, 1e-7));
        assert!(close(normal_sf(1.959_963_985), 0.025, 1e-6));
        assert!(close(normal_sf(-2.326_347_874), 0.99, 1e-6));
        for p in [1e-6, 0.001, 0.01, 0.2, 0.5, 0.8, 0.975, 0.999_999] {
            let z = normal_quantile(p);
            assert!(close(normal_sf(-z), p, 1e-5), "p = {p}");
        }
    }

    /// The normalizer summed from the mode equals the plain sum over the whole support.
    #[test]
    fn fnch_normalizer_matches_the_full_sum() {
        for &(m1, m2, n, ln_omega) in &[
            (50.0f64, 70.0f64, 12.0f64, 0.0f64),
            (500.0, 480.0, 9.0, 0.7),
            (10.0, 3000.0, 40.0, -1.2),
            (1e6, 1e6, 300.0, 0.3),
        ] {
            let lo = (n - m2).max(0.0) as u64;
            let hi = n.min(m1) as u64;
            let full = log_sum_exp(
                (lo..=hi)
                    .map(|j| j as f64)
                    .map(|j| ln_choose(m1, j) + ln_choose(m2, n - j) + j * ln_omega),
            );
            let fast = ln_fnch_normalizer(m1, m2, n, ln_omega);
            assert!(close(fast, full, 1e-10), "{m1} {m2} {n} {ln_omega}: {fast} vs {full}");
        }
    }

    /// Under the null the likelihood ratio's expectation is exactly one: sum it over the law.
    #[test]
    fn likelihood_ratio_is_a_martingale_under_the_null() {
        let (m1, m2, n) = (40u64, 55u64, 7u64);
        let ln_null = 0.2f64;
        let ln_z = ln_fnch_normalizer(m1 as f64, m2 as f64, n as f64, ln_null);
        let mut expectation = 0.0;
        for k in 0..=n {
            let kf = k as f64;
            let ln_p =
                ln_choose(m1 as f64, kf) + ln_choose(m2 as f64, (n - k) as f64) + kf * ln_null
                    - ln_z;
            let table = Table {
                canary_trials: m1,
                canary_events: k,
                baseline_trials: m2,
                baseline_events: n - k,
            };
            expectation += (ln_p + ln_likelihood_ratio(&table, ln_null + 0.8, ln_null)).exp();
        }
        assert!(close(expectation, 1.0, 1e-10), "{expectation}");
    }

    /// The summed moments match the plain sums over the whole support.
    #[test]
    fn fnch_moments_match_the_full_sums() {
        for &(m1, m2, n, ln_omega) in &[
            (50.0f64, 70.0f64, 12.0f64, 0.0f64),
            (500.0, 480.0, 9.0, 0.7),
            (10.0, 3000.0, 40.0, -1.2),
        ] {
            let lo = (n - m2).max(0.0) as u64;
            let hi = n.min(m1) as u64;
            let ln_t = |j: f64| ln_choose(m1, j) + ln_choose(m2, n - j) + j * ln_omega;
            let ln_z = log_sum_exp((lo..=hi).map(|j| ln_t(j as f64)));
            let p = |j: u64| (ln_t(j as f64) - ln_z).exp();
            let mean: f64 = (lo..=hi).map(|j| j as f64 * p(j)).sum();
            let var: f64 = (lo..=hi).map(|j| (j as f64 - mean).powi(2) * p(j)).sum();
            let (m, v) = fnch_moments(m1, m2, n, ln_omega);
            assert!(close(m, mean, 1e-10) && close(v, var, 1e-9), "{m} {v} vs {mean} {var}");
        }
    }

    #[test]
    fn rank_test_of_identical_histograms_is_null() {
        let h = [0, 10, 40, 30, 15, 5];
        let layout = LogLayout::new(&[1.0, 2.0, 4.0, 8.0, 16.0]);
        let t = rank_test(&h, &h, &layout, 0.95).expect("non-empty");
        assert!(t.z.abs() < 1e-9);
        assert!(close(t.shift, 1.0, 1e-12));
        assert!(t.shift_lower <= 1.0 && t.shift_upper >= 1.0);
        assert!(close(t.p_larger, 0.5, 1e-6));
    }

    #[test]
    fn rank_test_sees_a_one_bucket_shift() {
        let baseline = [0, 100, 400, 300, 150, 50, 0];
        let canary = [0, 0, 100, 400, 300, 150, 50];
        let layout = LogLayout::new(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0]);
        let t = rank_test(&canary, &baseline, &layout, 0.95).expect("non-empty");
        assert!(t.z > 10.0 && t.p_larger < 1e-9, "{t:?}");
        assert!(close(t.shift, 2.0, 1e-9), "{t:?}");
        // One bucket of shift is all the bucketing can vouch for: the interval spans it.
        assert!(t.shift_lower <= 1.0 + 1e-9 && t.shift_upper >= 4.0 - 1e-9, "{t:?}");
        let far = [0, 0, 0, 100, 400, 300, 200];
        let t = rank_test(&far, &baseline, &layout, 0.95).expect("non-empty");
        assert!(t.shift_lower > 1.5, "{t:?}");
        assert!(rank_test(&[0; 7], &baseline, &layout, 0.95).is_none());
    }
}
