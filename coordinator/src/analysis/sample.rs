//! What the judge is fed: per host and per interval, request and error counts and a latency
//! histogram; summed per side (canary, baseline) into a [`Window`].

use serde::{Deserialize, Serialize};

/// Most finite bucket bounds of a latency histogram. Prometheus native histograms at schema 2
/// (four buckets per doubling) span 1 ms to 60 s in 64; 256 leaves room and bounds what one
/// report may make the coordinator allocate.
pub const MAX_BUCKETS: usize = 256;

/// The finite upper bounds (`le`, in seconds) of a latency histogram, strictly increasing and
/// positive; every histogram over them has one more count, for `+Inf`.
///
/// Resolution matters: the latency tests compare the canary above one bucket bound with the
/// baseline above another, and round each bound so that the test stays valid (see the module
/// docs), so a regression smaller than a bucket's width is seen only partly. Prometheus'
/// default buckets (each 2 to 2.5 times the last) hide a +50% p99; exponential buckets of
/// ratio `2^(1/4)` (native histograms, schema 2) resolve it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Vec<f64>", into = "Vec<f64>")]
pub struct Buckets {
    upper: Vec<f64>,
}

/// Why a bucket layout was refused.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
pub enum BucketsError {
    /// No finite bound.
    #[error("a latency histogram needs at least one finite bucket bound")]
    Empty,
    /// More than [`MAX_BUCKETS`].
    #[error("{count} bucket bounds, more than {MAX_BUCKETS}")]
    TooMany {
        /// How many.
        count: usize,
    },
    /// A bound is not finite and positive, or not above the one before.
    #[error("bucket bound {index} ({value}) is not finite, positive and increasing")]
    Invalid {
        /// Its position.
        index: usize,
        /// Its value.
        value: f64,
    },
}

impl Buckets {
    /// Buckets with these finite upper bounds.
    pub fn new(upper: Vec<f64>) -> Result<Self, BucketsError> {
        if upper.is_empty() {
            return Err(BucketsError::Empty);
        }
        if upper.len() > MAX_BUCKETS {
            return Err(BucketsError::TooMany { count: upper.len() });
        }
        let mut last = 0.0;
        for (index, &value) in upper.iter().enumerate() {
            if !(value.is_finite() && value > last) {
                return Err(BucketsError::Invalid { index, value });
            }
            last = value;
        }
        Ok(Self { upper })
    }

    /// `count` bounds from `start`, each `factor` times the last.
    pub fn exponential(start: f64, factor: f64, count: usize) -> Result<Self, BucketsError> {
        Self::new((0..count).map(|i| start * factor.powi(i as i32)).collect())
    }

    /// The default: four buckets per doubling from 1 ms to about 65 s (the layout of
    /// Prometheus native histograms at schema 2, as classic buckets).
    pub fn native_schema_2() -> Self {
        Self { upper: (0..=64).map(|i| 0.001 * 2f64.powf(f64::from(i) / 4.0)).collect() }
    }

    /// Prometheus client libraries' default buckets, 5 ms to 10 s.
    pub fn prometheus_default() -> Self {
        Self { upper: vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0] }
    }

    /// The finite upper bounds.
    pub fn upper(&self) -> &[f64] {
        &self.upper
    }

    /// Counts in a histogram over these buckets (bounds plus `+Inf`).
    pub fn counts(&self) -> usize {
        self.upper.len() + 1
    }

    /// The bucket an observation of `seconds` falls in (`le` semantics: a bound is inclusive).
    pub fn index_of(&self, seconds: f64) -> usize {
        self.upper.partition_point(|&u| u < seconds)
    }
}

impl Default for Buckets {
    fn default() -> Self {
        Self::native_schema_2()
    }
}

impl TryFrom<Vec<f64>> for Buckets {
    type Error = BucketsError;

    fn try_from(upper: Vec<f64>) -> Result<Self, Self::Error> {
        Self::new(upper)
    }
}

impl From<Buckets> for Vec<f64> {
    fn from(b: Buckets) -> Self {
        b.upper
    }
}

/// One host's traffic over one interval: what a node reports, the difference of two scrapes
/// of the service's counters (or what the service pushed to the node).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSample {
    /// Requests served.
    pub requests: u64,
    /// Of which failed (5xx, or whatever the service counts as an error).
    pub errors: u64,
    /// Latency histogram of the requests, per bucket (not cumulative), `+Inf` last; empty if
    /// the service exports no latency.
    pub latency: Vec<u64>,
}

/// Why a host's report is not used: a measurement error, counted apart from any verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    /// More errors than requests (a counter reset between scrapes, or mixed-up series).
    #[error("{errors} errors of {requests} requests")]
    ErrorsExceedRequests {
        /// Requests reported.
        requests: u64,
        /// Errors reported.
        errors: u64,
    },
    /// The histogram does not have one count per bucket of the configured layout.
    #[error("latency histogram has {found} buckets, the layout has {expected}")]
    BucketMismatch {
        /// Counts in the layout, `+Inf` included.
        expected: usize,
        /// Counts reported.
        found: usize,
    },
    /// A sum overflowed (absurd counts).
    #[error("counts overflow")]
    Overflow,
}

/// One side's traffic (canary or baseline) over one interval, summed over its hosts, with the
/// hosts whose data is missing or invalid counted apart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Latency histogram (per bucket, `+Inf` last); all zero if no host reports latency.
    pub latency: Vec<u64>,
    /// Hosts whose report is counted in.
    pub hosts: u32,
    /// Hosts that were asked and did not answer (scrape failed or timed out).
    pub missing: u32,
    /// Hosts whose report was invalid ([`SampleError`]).
    pub invalid: u32,
}

impl Sample {
    /// An empty sample over `buckets`.
    pub fn new(buckets: &Buckets) -> Self {
        Self {
            requests: 0,
            errors: 0,
            latency: vec![0; buckets.counts()],
            hosts: 0,
            missing: 0,
            invalid: 0,
        }
    }

    /// Adds one host's report. An invalid one is counted in [`invalid`](Self::invalid) and
    /// otherwise left out; the error says why, for the log.
    pub fn add_host(&mut self, host: &HostSample) -> Result<(), SampleError> {
        let checked = self.check(host);
        if checked.is_err() {
            self.invalid += 1;
            return checked;
        }
        self.requests += host.requests;
        self.errors += host.errors;
        for (sum, &c) in self.latency.iter_mut().zip(&host.latency) {
            *sum += c;
        }
        self.hosts += 1;
        Ok(())
    }

    fn check(&self, host: &HostSample) -> Result<(), SampleError> {
        if host.errors > host.requests {
            return Err(SampleError::ErrorsExceedRequests {
                requests: host.requests,
                errors: host.errors,
            });
        }
        if !host.latency.is_empty() && host.latency.len() != self.latency.len() {
            return Err(SampleError::BucketMismatch {
                expected: self.latency.len(),
                found: host.latency.len(),
            });
        }
        let fits = self.requests.checked_add(host.requests).is_some()
            && self.latency.iter().zip(&host.latency).all(|(s, c)| s.checked_add(*c).is_some());
        if !fits {
            return Err(SampleError::Overflow);
        }
        Ok(())
    }

    /// Counts a host that was asked and did not answer.
    pub fn add_missing(&mut self) {
        self.missing += 1;
    }

    /// Latency observations.
    pub fn observations(&self) -> u64 {
        self.latency.iter().sum()
    }

    /// Whether enough of the side's hosts reported valid data for its figures to stand for the
    /// side: at least one, and at least `fraction` of those asked.
    pub(crate) fn is_usable(&self, fraction: f64) -> bool {
        let asked = f64::from(self.hosts) + f64::from(self.missing) + f64::from(self.invalid);
        self.hosts > 0 && f64::from(self.hosts) >= fraction * asked
    }
}

/// Canary and baseline over the same interval, ending at `end` (on the caller's clock, the one
/// the rollout engine uses).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// End of the interval.
    pub end: std::time::Duration,
    /// Hosts running the release under judgement.
    pub canary: Sample,
    /// Hosts of the same region still on the previous release.
    pub baseline: Sample,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_validated() {
        assert_eq!(Buckets::new(vec![]), Err(BucketsError::Empty));
        assert_eq!(
            Buckets::new(vec![0.1, 0.1]),
            Err(BucketsError::Invalid { index: 1, value: 0.1 })
        );
        assert_eq!(Buckets::new(vec![-1.0]), Err(BucketsError::Invalid { index: 0, value: -1.0 }));
        assert!(matches!(
            Buckets::new(vec![1.0; MAX_BUCKETS + 1]),
            Err(BucketsError::TooMany { .. })
        ));
        let b = Buckets::native_schema_2();
        assert_eq!(b.counts(), 66);
        assert_eq!(b.index_of(0.001), 0);
        assert_eq!(b.index_of(0.0011), 1);
        assert_eq!(b.index_of(1e9), 65);
        let json = serde_json::to_string(&Buckets::prometheus_default()).expect("serializes");
        assert!(serde_json::from_str::<Buckets>("[0.5, 0.1]").is_err());
        assert_eq!(
            serde_json::from_str::<Buckets>(&json).ok(),
            Some(Buckets::prometheus_default())
        );
    }

    #[test]
    fn invalid_reports_are_counted_apart() {
        let b = Buckets::new(vec![0.1, 1.0]).expect("valid");
        let mut s = Sample::new(&b);
        let ok = HostSample { requests: 10, errors: 1, latency: vec![5, 4, 1] };
        assert_eq!(s.add_host(&ok), Ok(()));
        let reset = HostSample { requests: 3, errors: 9, latency: vec![] };
        assert_eq!(
            s.add_host(&reset),
            Err(SampleError::ErrorsExceedRequests { requests: 3, errors: 9 })
        );
        let wrong = HostSample { requests: 3, errors: 0, latency: vec![1, 2] };
        assert_eq!(s.add_host(&wrong), Err(SampleError::BucketMismatch { expected: 3, found: 2 }));
        s.add_missing();
        assert_eq!((s.requests, s.errors, s.hosts, s.invalid, s.missing), (10, 1, 1, 2, 1));
        assert_eq!(s.latency, vec![5, 4, 1]);
        assert!(!s.is_usable(0.5));
        assert!(s.is_usable(0.25));
    }
}
