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
