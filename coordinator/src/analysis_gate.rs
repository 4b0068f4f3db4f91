//! Turns hosts' request counters (cumulative, from their heartbeats) into the per-interval
//! samples the canary judge ([`crate::analysis`]) compares.

use serde::{Deserialize, Serialize};

use crate::analysis::{Buckets, HostSample};

/// A host's counters for one service, cumulative since its release became active.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCounters {
    /// Requests.
    pub requests: u64,
    /// Errors among them.
    pub errors: u64,
    /// Cumulative latency counts at the coordinator's bucket bounds (`le`, Prometheus style,
    /// `+Inf` last), empty when the service exports no latency.
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

    /// The interval's sample for the judge: the cumulative latency counts turned into counts
    /// per bucket. A layout other than `buckets` gives no latency (the judge counts that
    /// host's report invalid for latency only if it is the wrong length).
    pub fn sample(&self, buckets: &Buckets) -> HostSample {
        let latency = if self.latency_buckets.len() == buckets.counts() {
            let mut prev = 0;
            self.latency_buckets
                .iter()
                .map(|&c| {
                    let n = c.saturating_sub(prev);
                    prev = prev.max(c);
                    n
                })
                .collect()
        } else {
            Vec::new()
        };
        HostSample { requests: self.requests, errors: self.errors.min(self.requests), latency }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn cumulative_buckets_become_per_bucket_counts() {
        let buckets = Buckets::default();
        let n = buckets.counts();
        let mut cumulative: Vec<u64> = (0..n as u64).collect();
        cumulative[n - 1] = 1000;
        let c = HostCounters { requests: 1000, errors: 2, latency_buckets: cumulative };
        let s = c.sample(&buckets);
        assert_eq!(s.latency.len(), n);
        assert_eq!(s.latency.iter().sum::<u64>(), 1000);
        let other = HostCounters { latency_buckets: vec![1, 2, 3], ..c };
        assert!(other.sample(&buckets).latency.is_empty());
    }
}
