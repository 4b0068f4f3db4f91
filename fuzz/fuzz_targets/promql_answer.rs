//! Untrusted Prometheus query answers: parsing must never panic, and every value accepted is
//! a finite count.
#![no_main]

use fleetwave_coordinator::promql::parse_vector;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(points) = parse_vector(data, "instance") {
        assert!(points.iter().all(|p| p.value.is_finite() && p.value >= 0.0));
    }
});
