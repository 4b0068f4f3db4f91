//! Fleetwave wire and storage formats.
//!
//! The `.proto` files under `proto/proto/` are the source of truth. The Rust code generated from
//! them by prost is checked in under `src/gen/`, so building Fleetwave needs no `protoc`; the test
//! `tests/bootstrap.rs` regenerates it (with the `protoc` shipped by `protoc-bin-vendored`) and
//! fails on any difference. To update the checked-in code after editing a `.proto` file, run
//! `FLEETWAVE_BLESS_PROTO=1 cargo test -p fleetwave-proto --test bootstrap`.
//!
//! These types stop at the edge: the rest of Fleetwave converts them into domain types (for
//! example `fleetwave_chunker::Manifest`) with `TryFrom` and never passes `Option<pb::Foo>` around.

/// Version 1 of the Fleetwave protocol.
pub mod v1 {
    #![allow(missing_docs, unreachable_pub, clippy::all, missing_debug_implementations)]
    include!("gen/fleetwave.v1.rs");
}

pub mod session;

/// The bytes a host signs with its identity key to enroll with the coordinator (see
/// `coordinator.proto`; heartbeats are authenticated by a [`session`]).
pub mod signing {
    /// Domain of an enrollment signature.
    pub const ENROLL_DOMAIN: &[u8] = b"fleetwave-enroll-v1";

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// What an `EnrollRequest`'s signature covers.
    pub fn enroll_message(
        join_token: &str,
        region: &str,
        environment: &str,
        name: &str,
        timestamp_ms: u64,
    ) -> Vec<u8> {
        let mut out = ENROLL_DOMAIN.to_vec();
        for s in [join_token, region, environment, name] {
            put_str(&mut out, s);
        }
        out.extend_from_slice(&timestamp_ms.to_le_bytes());
        out
    }
}
