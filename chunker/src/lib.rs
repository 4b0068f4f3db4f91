//! Fleetwave's artifact format: deterministic packing, content-defined chunking, manifests and
//! signatures.
//!
//! Publishing an artifact is a single streaming pass:
//!
//! 1. [`pack`] turns a directory into one deterministic tar stream (sorted entries, normalized
//!    owners, times and modes, only the executable bit kept), so the same tree always yields the
//!    same bytes; a single file is taken as it is.
//! 2. [`cdc`] cuts the stream into content-defined chunks with FastCDC v2020, hashes every chunk
//!    with BLAKE3 (its address), and computes SHA-256 and BLAKE3 of the whole stream in the same
//!    pass, with memory bounded whatever the input size. SHA-256 runs on its own thread because it
//!    is the slowest primitive.
//! 3. [`Manifest`] records the result (service, version, sizes, whole-stream digests, the ordered
//!    chunk list, chunker parameters, build metadata). Its canonical protobuf encoding is hashed
//!    into its [`ManifestId`].
//! 4. [`sign`] signs manifests with ed25519 and verifies them against a set of trusted keys.
//!
//! On the receiving side, [`diff`] says which chunks a holder of older releases still lacks, and
//! [`unpack`] safely turns a verified stream back into a directory.
//!
//! This crate does no networking and uses no async runtime; the node and the CLI drive it.

pub mod cdc;
pub mod diff;
mod hash;
pub mod manifest;
pub mod pack;
pub mod sign;
pub mod unpack;

pub use cdc::{ChunkerParams, StreamSummary};
pub use hash::{Blake3Digest, ChunkHash, ManifestId, ParseHashError, Sha256Digest};
pub use manifest::{ArtifactKind, BuildInfo, ChunkInfo, Manifest, ManifestError};
pub use sign::{SignedManifest, SigningKey, TrustedKeys, VerifyingKey};
