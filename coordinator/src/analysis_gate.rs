//! Turns hosts' request counters into the samples an analysis gate judges, and asks the judge.

use serde::{Deserialize, Serialize};

use crate::rollout::Verdict;

/// A host's counters for one service, cumulative since its release became active.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCounters {
    /// Requests.
    pub requests: u64,
    /// Errors among them.
    pub errors: u64,
    /// Cumulative latency bucket counts.
    pub latency_buckets: Vec<u64>,
}

impl HostCounters {
    /// What happened between `start` and `self` (a reset, such as a restart of the service,
    /// counts from zero).
    pub fn since(&self, start: &HostCounters) -> HostCounters {
        if self.requests < start.requests || self.errors < start.errors {
            return self.clone();
        }
        let buckets = if self.latency_buckets.len() == start.latency_buckets.len() {
            self.latency_buckets
                .iter()
                .zip(&start.latency_buckets)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect()
        } else {
            self.latency_buckets.clone()
        };
        HostCounters {
            requests: self.requests - start.requests,
            errors: self.errors - start.errors,
            latency_buckets: buckets,
        }
    }
}

/// Canary and baseline hosts' counters over the gate's window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GateSamples {
    /// Canary hosts.
    pub canary: Vec<HostCounters>,
    /// Baseline hosts.
    pub baseline: Vec<HostCounters>,
}

/// The judge's answer at one look.
#[derive(Clone, Debug, PartialEq)]
pub struct Judged {
    /// `None`: keep looking.
    pub verdict: Option<Verdict>,
    /// What it saw.
    pub evidence: serde_json::Value,
}

/// Fewest canary requests for anything but inconclusive.
const MIN_REQUESTS: u64 = 200;

/// Judges the error rates of canary against baseline. `decide`: the bake is over, an answer
/// is due. Before that, only a clear regression answers (fail, early).
pub fn judge(samples: &GateSamples, decide: bool) -> Judged {
    let sum = |v: &[HostCounters]| {
        v.iter().fold((0u64, 0u64), |(r, e), c| (r + c.requests, e + c.errors.min(c.requests)))
    };
    let (cr, ce) = sum(&samples.canary);
    let (br, be) = sum(&samples.baseline);
    let rate = |e: u64, r: u64| if r == 0 { 0.0 } else { e as f64 / r as f64 };
    let (pc, pb) = (rate(ce, cr), rate(be, br));
    // One-sided two-proportion z statistic (pooled), looked at repeatedly: a strict critical
    // value keeps repeated looks from crying wolf.
    let pooled = rate(ce + be, cr + br);
    let se = (pooled * (1.0 - pooled) * (1.0 / cr.max(1) as f64 + 1.0 / br.max(1) as f64)).sqrt();
    let z = if se > 0.0 {
        (pc - pb) / se
    } else if pc > pb {
        f64::INFINITY
    } else {
        0.0
    };
    let evidence = serde_json::json!({
        "test": "two-proportion z (one-sided), critical 3.5",
        "canary": {"requests": cr, "errors": ce, "error_rate": pc},
        "baseline": {"requests": br, "errors": be, "error_rate": pb},
        "z": if z.is_finite() { z } else { 1e9 },
    });
    let enough = cr >= MIN_REQUESTS && br >= MIN_REQUESTS;
    let verdict = if enough && z > 3.5 {
        Some(Verdict::Fail)
    } else if !decide {
        None
    } else if enough {
        Some(Verdict::Pass)
    } else {
        Some(Verdict::Inconclusive)
    };
    Judged { verdict, evidence }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(n: usize, requests: u64, errors: u64) -> Vec<HostCounters> {
        vec![HostCounters { requests, errors, latency_buckets: Vec::new() }; n]
    }

    #[test]
    fn no_traffic_is_inconclusive_never_a_pass() {
        let s = GateSamples { canary: hosts(2, 0, 0), baseline: hosts(2, 0, 0) };
        assert_eq!(judge(&s, false).verdict, None);
        assert_eq!(judge(&s, true).verdict, Some(Verdict::Inconclusive));
    }

    #[test]
    fn a_clear_regression_fails_before_the_bake_ends() {
        let s = GateSamples { canary: hosts(2, 1000, 100), baseline: hosts(2, 1000, 5) };
        assert_eq!(judge(&s, false).verdict, Some(Verdict::Fail));
    }

    #[test]
    fn equal_rates_pass_when_due() {
        let s = GateSamples { canary: hosts(2, 1000, 5), baseline: hosts(2, 1000, 5) };
        assert_eq!(judge(&s, false).verdict, None);
        assert_eq!(judge(&s, true).verdict, Some(Verdict::Pass));
    }

    #[test]
    fn counters_since_handle_resets() {
        let start = HostCounters { requests: 100, errors: 3, latency_buckets: vec![1, 2] };
        let now = HostCounters { requests: 150, errors: 4, latency_buckets: vec![3, 5] };
        assert_eq!(
            now.since(&start),
            HostCounters { requests: 50, errors: 1, latency_buckets: vec![2, 3] }
        );
        let reset = HostCounters { requests: 10, errors: 0, latency_buckets: vec![] };
        assert_eq!(reset.since(&start), reset);
    }
}
