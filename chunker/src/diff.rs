//! Which chunks of a manifest a holder of other manifests still lacks.
//!
//! Between two versions of an artifact, content-defined chunking keeps most chunks identical;
//! only the chunks a host does not already hold from older releases need to move.

use std::collections::HashSet;

use crate::hash::ChunkHash;
use crate::manifest::{ChunkInfo, Manifest};

/// The result of [`diff`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Distinct chunks of the target that none of the held manifests contain, in
    /// first-appearance order.
    pub missing: Vec<ChunkInfo>,
    /// Bytes of `missing`.
    pub missing_bytes: u64,
    /// Distinct chunks of the target that a held manifest already contains.
    pub reused_chunks: u64,
    /// Bytes of those chunks.
    pub reused_bytes: u64,
}

/// Compares `target` against the manifests already held.
pub fn diff<'a>(target: &Manifest, held: impl IntoIterator<Item = &'a Manifest>) -> Diff {
    let have: HashSet<ChunkHash> =
        held.into_iter().flat_map(|m| m.chunks.iter().map(|c| c.hash)).collect();
    let mut out = Diff::default();
    for chunk in target.unique_chunks() {
        if have.contains(&chunk.hash) {
            out.reused_chunks += 1;
            out.reused_bytes += u64::from(chunk.length);
        } else {
            out.missing_bytes += u64::from(chunk.length);
            out.missing.push(chunk);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;

    #[test]
    fn identical_manifest_needs_nothing() {
        let m = sample();
        let d = diff(&m, [&m]);
        assert!(d.missing.is_empty());
        assert_eq!(d.reused_chunks as usize, m.unique_chunks().len());
    }

    #[test]
    fn empty_holder_needs_every_distinct_chunk_once() {
        let mut m = sample();
        let first = m.chunks[0];
        m.chunks.push(first);
        let d = diff(&m, []);
        assert_eq!(d.missing.len(), m.unique_chunks().len());
        assert_eq!(d.reused_bytes, 0);
        let distinct: u64 = m.unique_chunks().iter().map(|c| u64::from(c.length)).sum();
        assert_eq!(d.missing_bytes, distinct);
    }
}
