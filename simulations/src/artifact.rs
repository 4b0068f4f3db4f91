//! The simulated artifact: seeded pseudo-random bytes cut and hashed by the real chunker.
//!
//! The bytes are incompressible and never stored: they are generated block by block into
//! [`fleetwave_chunker::cdc::chunk_stream`], which cuts them with FastCDC v2020 and hashes
//! every chunk with BLAKE3, as `fleetwave publish` would. The simulation then carries chunk
//! *hashes* instead of bytes: a piece delivered by a peer is the hash of what that peer holds
//! for the chunk, and the receiving host's shell compares it with the manifest's, which is the
//! check the daemon makes on the real bytes.

use std::io::Read;

use fleetwave_chunker::cdc::{ChunkStreamError, chunk_stream};
use fleetwave_chunker::{ChunkHash, ChunkerParams, StreamSummary};
use fleetwave_coordinator::rollout::ManifestId;
use fleetwave_node::swarm::ChunkTable;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The chunked artifact and its release ids.
#[derive(Clone, Debug)]
pub struct Artifact {
    /// Size, whole-stream digests and the chunk list, from the real chunker.
    pub summary: StreamSummary,
    /// The chunk lengths, as the schedulers see them.
    pub table: ChunkTable,
    /// The release being deployed.
    pub target: ManifestId,
    /// The release every host runs before (and goes back to on rollback).
    pub previous: ManifestId,
}

/// The artifact cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The chunker refused.
    #[error("chunking the artifact")]
    Chunk(#[source] ChunkStreamError<std::convert::Infallible>),
    /// More chunks than a scheduler indexes.
    #[error("chunk table")]
    Table(#[from] fleetwave_node::swarm::SetupError),
}

struct Seeded {
    rng: ChaCha8Rng,
    left: u64,
}

impl Read for Seeded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        self.rng.fill_bytes(&mut buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

impl Artifact {
    /// `size` bytes from `seed`, chunked with average `chunk_avg` (min a quarter, max four
    /// times).
    pub fn generate(size: u64, chunk_avg: u32, seed: u64) -> Result<Self, ArtifactError> {
        let reader =
            Seeded { rng: ChaCha8Rng::seed_from_u64(seed ^ 0x4172_7469_6661_6374), left: size };
        let params = ChunkerParams::with_avg(chunk_avg);
        let summary = chunk_stream(reader, params, |_| Ok::<(), std::convert::Infallible>(()))
            .map_err(ArtifactError::Chunk)?;
        let table = ChunkTable::new(&summary.chunks)?;
        let mut id = blake3::Hasher::new();
        id.update(b"fleetwave-sim release");
        id.update(&summary.size.to_le_bytes());
        id.update(summary.blake3.as_bytes());
        for c in &summary.chunks {
            id.update(c.hash.as_bytes());
        }
        let target = ManifestId(*id.finalize().as_bytes());
        let previous = ManifestId(*blake3::hash(b"fleetwave-sim previous release").as_bytes());
        Ok(Self { summary, table, target, previous })
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        self.table.chunk_count()
    }

    /// Stream size in bytes.
    pub fn size(&self) -> u64 {
        self.summary.size
    }

    /// The manifest's hash of chunk `index`.
    pub fn hash(&self, index: u32) -> ChunkHash {
        self.summary.chunks[index as usize].hash
    }

    /// What a corrupt store holds instead of chunk `index`: bytes that hash differently.
    pub fn corrupt_hash(&self, index: u32) -> ChunkHash {
        let mut b = *self.hash(index).as_bytes();
        b[0] ^= 0xff;
        ChunkHash::from_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_artifact_is_a_function_of_its_seed() {
        let a = Artifact::generate(4 << 20, 64 << 10, 7).expect("chunks");
        let b = Artifact::generate(4 << 20, 64 << 10, 7).expect("chunks");
        let c = Artifact::generate(4 << 20, 64 << 10, 8).expect("chunks");
        assert_eq!(a.summary, b.summary);
        assert_ne!(a.summary.blake3, c.summary.blake3);
        assert_eq!(a.size(), 4 << 20);
        assert_eq!(a.table.total_bytes(), 4 << 20);
        // FastCDC with min = avg / 4 gives a mean near 1.3 x avg: tens of chunks here.
        assert!((30..=90).contains(&a.chunk_count()), "{} chunks", a.chunk_count());
        assert_ne!(a.hash(0), a.corrupt_hash(0));
    }
}
