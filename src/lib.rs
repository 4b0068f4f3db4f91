//! The library half of the `fleetwave` package: what the command line, its demo and the
//! end-to-end tests share.
//!
//! - [`local`]: a whole fleet (origin, cache, coordinator, hosts) as real processes on this
//!   machine.

#![warn(missing_docs)]

pub mod local;
