//! Content-defined chunking of a byte stream, with every digest Fleetwave needs in one pass.
//!
//! [`chunk_stream`] reads a stream once and produces:
//!
//! - FastCDC v2020 cut points (the `fastcdc` crate's `cut` function and normalization level 1,
//!   byte-for-byte the same boundaries as `fastcdc::v2020::FastCDC` over the whole input; the
//!   golden vectors in this module's tests pin them);
//! - the BLAKE3 hash of every chunk, which is the chunk's address;
//! - the SHA-256 and BLAKE3 digests of the whole stream.
//!
//! # Threads and memory
//!
//! The stream is read in blocks of [`BLOCK_SIZE`] bytes. Each block is shared (by reference
//! count, never copied) with two hasher threads, one computing the whole-stream SHA-256 and one
//! the whole-stream BLAKE3, while the calling thread finds cut points, hashes chunks and hands
//! them to the caller's sink. SHA-256 is the slowest primitive and cannot be split, so giving it
//! a thread of its own is what lets the pass run at close to SHA-256 speed. The channels to the
//! hashers are bounded, so at most about `(2 * QUEUE_DEPTH + 2) * BLOCK_SIZE` bytes are buffered
//! whatever the input size.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use fastcdc::v2020::{self, Normalization};

use crate::hash::{Blake3Digest, ChunkHash, Sha256Digest};
use crate::manifest::ChunkInfo;

/// Identifier of the chunking algorithm recorded in manifests.
pub const ALGORITHM: &str = "fastcdc-v2020";

/// Bytes read from the input at a time and shared with the hasher threads.
pub const BLOCK_SIZE: usize = 4 << 20;

/// Blocks that may wait in each hasher's queue before the reader blocks.
const QUEUE_DEPTH: usize = 4;

/// FastCDC size parameters, in bytes.
///
/// Smaller chunks share more between versions of an artifact; larger chunks cost less per chunk
/// in the swarm (fewer requests, smaller manifests and bitfields). The default was chosen by
/// measurement on consecutive releases of real trees: see `docs/BENCHMARKS.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkerParams {
    /// No chunk is shorter than this, except the last one of a stream.
    pub min_size: u32,
    /// The size cut points aim for.
    pub avg_size: u32,
    /// No chunk is longer than this.
    pub max_size: u32,
}

/// Chunker parameters that FastCDC cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid chunker parameters min={min} avg={avg} max={max}: need even sizes with \
     64 <= min <= 1 MiB, avg a power of two from 256 to 4 MiB, 1 KiB <= max <= 16 MiB, \
     and min <= avg <= max"
)]
pub struct InvalidParams {
    /// Requested minimum size.
    pub min: u32,
    /// Requested average size.
    pub avg: u32,
    /// Requested maximum size.
    pub max: u32,
}

impl ChunkerParams {
    /// Fleetwave's default: 16 KiB / 64 KiB / 256 KiB.
    pub const DEFAULT: Self = Self { min_size: 16 << 10, avg_size: 64 << 10, max_size: 256 << 10 };

    /// Parameters with the given average size and min = avg / 4, max = avg * 4.
    pub fn with_avg(avg_size: u32) -> Self {
        Self { min_size: avg_size / 4, avg_size, max_size: avg_size.saturating_mul(4) }
    }

    /// Checks the sizes against what FastCDC v2020 supports. The average must be a power of two:
    /// FastCDC derives its cut masks from log2(avg), so any other value would silently behave
    /// like the power of two below it while the manifest recorded something else.
    pub fn validate(&self) -> Result<(), InvalidParams> {
        let (min, avg, max) =
            (self.min_size as usize, self.avg_size as usize, self.max_size as usize);
        let ok = (v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min)
            && (v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&avg)
            && (v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max)
            && avg.is_power_of_two()
            && min <= avg
            && avg <= max
            && min % 2 == 0
            && avg % 2 == 0
            && max % 2 == 0;
        if ok {
            Ok(())
        } else {
            Err(InvalidParams { min: self.min_size, avg: self.avg_size, max: self.max_size })
        }
    }
}

impl Default for ChunkerParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A cut-point finder for one set of parameters (the FastCDC v2020 masks, precomputed).
#[derive(Clone, Debug)]
pub struct Cutter {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
}

impl Cutter {
    /// Prepares a cutter; the parameters must be valid.
    pub fn new(params: ChunkerParams) -> Result<Self, InvalidParams> {
        params.validate()?;
        let avg = params.avg_size as usize;
        let (mask_s, mask_l) = v2020::select_masks(avg, Normalization::Level1);
        Ok(Self {
            min: params.min_size as usize,
            avg,
            max: params.max_size as usize,
            mask_s,
            mask_l,
        })
    }

    /// Length of the chunk that starts at `data[0]`, given that `data` holds either at least
    /// `max_size` bytes or everything up to the end of the stream.
    pub fn next_len(&self, data: &[u8]) -> usize {
        let (_, len) = v2020::cut(
            data,
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        len
    }

    /// Cut points of a whole in-memory buffer, as chunk lengths.
    pub fn lengths(&self, mut data: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let len = self.next_len(data);
            out.push(len);
            data = &data[len..];
        }
        out
    }
}

/// One chunk, handed to the sink of [`chunk_stream`] as soon as it is cut and hashed.
#[derive(Debug)]
pub struct Chunk<'a> {
    /// BLAKE3 of `data`.
    pub hash: ChunkHash,
    /// Offset of the chunk in the stream.
    pub offset: u64,
    /// The chunk's bytes.
    pub data: &'a [u8],
}

/// What one pass over a stream found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSummary {
    /// Stream length in bytes.
    pub size: u64,
    /// SHA-256 of the whole stream.
    pub sha256: Sha256Digest,
    /// BLAKE3 of the whole stream.
    pub blake3: Blake3Digest,
    /// The chunks, in stream order.
    pub chunks: Vec<ChunkInfo>,
}

/// Why a chunking pass failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunkStreamError<E: std::error::Error + 'static> {
    /// The chunker parameters are unusable.
    #[error(transparent)]
    Params(#[from] InvalidParams),
    /// Reading the input failed.
    #[error("reading the input")]
    Read(#[source] io::Error),
    /// The caller's sink refused a chunk.
    #[error(transparent)]
    Sink(E),
    /// A hasher thread died (a bug; the pass is abandoned).
    #[error("hasher thread failed")]
    Hasher,
}

type Block = Arc<Vec<u8>>;
type Span = (Block, usize);

/// Reads `reader` to the end, cutting it into chunks with `params`, and calls `sink` for every
/// chunk in order. Returns the stream's size, whole-stream digests and chunk list.
///
/// Memory stays bounded (see the module docs) whatever the input size. The sink runs on the
/// calling thread; an error from it stops the pass.
pub fn chunk_stream<R, E, F>(
    mut reader: R,
    params: ChunkerParams,
    mut sink: F,
) -> Result<StreamSummary, ChunkStreamError<E>>
where
    R: Read,
    E: std::error::Error + 'static,
    F: FnMut(Chunk<'_>) -> Result<(), E>,
{
    let cutter = Cutter::new(params)?;
    std::thread::scope(|scope| {
        let (sha_tx, sha_rx) = sync_channel::<Span>(QUEUE_DEPTH);
        let (b3_tx, b3_rx) = sync_channel::<Span>(QUEUE_DEPTH);
        let sha = scope.spawn(move || sha256_worker(sha_rx));
        let b3 = scope.spawn(move || blake3_worker(b3_rx));
        let chunks = cut_blocks(&mut reader, &cutter, &mut sink, &sha_tx, &b3_tx);
        drop((sha_tx, b3_tx));
        let sha = sha.join().map_err(|_| ChunkStreamError::Hasher)?;
        let b3 = b3.join().map_err(|_| ChunkStreamError::Hasher)?;
        let (chunks, size) = chunks?;
        Ok(StreamSummary { size, sha256: sha, blake3: b3, chunks })
    })
}

fn cut_blocks<R, E, F>(
    reader: &mut R,
    cutter: &Cutter,
    sink: &mut F,
    sha_tx: &SyncSender<Span>,
    b3_tx: &SyncSender<Span>,
) -> Result<(Vec<ChunkInfo>, u64), ChunkStreamError<E>>
where
    R: Read,
    E: std::error::Error + 'static,
    F: FnMut(Chunk<'_>) -> Result<(), E>,
{
    let mut chunks = Vec::new();
    let mut offset = 0u64;
    let mut pool: Vec<Block> = Vec::new();
    // The previous block and where its not-yet-chunked tail starts.
    let mut prev: Option<(Block, usize)> = None;
    loop {
        // Next block: the tail of the previous block, then fresh input.
        let tail_len = prev.as_ref().map_or(0, |(b, p)| b.len() - p);
        debug_assert!(tail_len < cutter.max);
        let mut buf = take_buffer(&mut pool, cutter.max + BLOCK_SIZE);
        if let Some((block, pos)) = prev.take() {
            buf.extend_from_slice(&block[pos..]);
            pool.push(block);
        }
        let fresh_start = buf.len();
        (&mut *reader)
            .take(BLOCK_SIZE as u64)
            .read_to_end(&mut buf)
            .map_err(ChunkStreamError::Read)?;
        let eof = buf.len() - fresh_start < BLOCK_SIZE;
        let current = Arc::new(buf);
        if current.len() > fresh_start {
            let span = (Arc::clone(&current), fresh_start);
            sha_tx.send(span.clone()).map_err(|_| ChunkStreamError::Hasher)?;
            b3_tx.send(span).map_err(|_| ChunkStreamError::Hasher)?;
        }
        let data = current.as_slice();
        let mut pos = 0;
        while pos < data.len() {
            let rest = &data[pos..];
            if !eof && rest.len() < cutter.max {
                break;
            }
            let len = cutter.next_len(rest);
            let piece = &rest[..len];
            let hash = ChunkHash::of(piece);
            sink(Chunk { hash, offset, data: piece }).map_err(ChunkStreamError::Sink)?;
            // A chunk is at most max_size (<= 16 MiB) long, so its length fits in u32.
            chunks.push(ChunkInfo { hash, length: len as u32 });
            offset += len as u64;
            pos += len;
        }
        if eof {
            return Ok((chunks, offset));
        }
        prev = Some((current, pos));
    }
}

/// A cleared buffer of at least `capacity` bytes, reusing a block the hashers are done with.
fn take_buffer(pool: &mut Vec<Block>, capacity: usize) -> Vec<u8> {
    if let Some(i) = pool.iter_mut().position(|b| Arc::get_mut(b).is_some()) {
        let mut block = pool.swap_remove(i);
        if let Some(buf) = Arc::get_mut(&mut block) {
            let mut buf = std::mem::take(buf);
            if buf.capacity() >= capacity {
                buf.clear();
                return buf;
            }
        }
    }
    Vec::with_capacity(capacity)
}

fn sha256_worker(rx: Receiver<Span>) -> Sha256Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (block, start) in rx {
        ctx.update(&block[start..]);
    }
    let digest = ctx.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    Sha256Digest::from_bytes(out)
}

fn blake3_worker(rx: Receiver<Span>) -> Blake3Digest {
    let mut hasher = blake3::Hasher::new();
    for (block, start) in rx {
        hasher.update(&block[start..]);
    }
    Blake3Digest::from_bytes(*hasher.finalize().as_bytes())
}
