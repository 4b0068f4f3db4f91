//! The layout of the stage area's sled database: keys and the binary encoding of values.
//!
//! Everything lives in sled's default tree, so that one [`sled::Batch`] can change a manifest's
//! record, its durable-chunk markers and the hash index together, atomically. Keys start with a
//! one-byte tag:
//!
//! ```text
//! m <manifest id>                       signed manifest envelope (SignedManifest::encode)
//! r <manifest id>                       Record: service, version, sizes, status, staging order
//! d <manifest id> <index u32 BE>        DurableChunk: this chunk's bytes are fsynced in the
//!                                       artifact file (hash, offset, length)
//! h <chunk hash> <manifest id> <index>  empty: hash index over the `d` entries (dedup, serving)
//! a <service>                           manifest id of the service's active release
//! ```
//!
//! Values are small hand-written big-endian encodings that start with a format byte, so a future
//! version can tell old records apart. A value that does not decode is reported as corrupt state,
//! never unwrapped.

use std::path::PathBuf;

use fleetwave_chunker::ArtifactKind;
use fleetwave_chunker::unpack::Refusal;
use fleetwave_chunker::{Blake3Digest, ChunkHash, ManifestId, Sha256Digest};

use super::{FailReason, StageStatus, WholeCheck};
use crate::swarm::ChunkIndex;

const TAG_MANIFEST: u8 = b'm';
const TAG_RECORD: u8 = b'r';
const TAG_DURABLE: u8 = b'd';
const TAG_HASH: u8 = b'h';
const TAG_ACTIVE: u8 = b'a';

/// Format byte of [`Record`] values.
const RECORD_FORMAT: u8 = 1;

pub(crate) fn manifest_key(id: &ManifestId) -> [u8; 33] {
    tagged(TAG_MANIFEST, id.as_bytes())
}

pub(crate) fn record_key(id: &ManifestId) -> [u8; 33] {
    tagged(TAG_RECORD, id.as_bytes())
}

/// Prefix of every record key.
pub(crate) const RECORD_PREFIX: [u8; 1] = [TAG_RECORD];

/// Prefix of every active-release key.
pub(crate) const ACTIVE_PREFIX: [u8; 1] = [TAG_ACTIVE];

pub(crate) fn durable_prefix(id: &ManifestId) -> [u8; 33] {
    tagged(TAG_DURABLE, id.as_bytes())
}

pub(crate) fn durable_key(id: &ManifestId, index: ChunkIndex) -> [u8; 37] {
    let mut key = [0u8; 37];
    key[..33].copy_from_slice(&durable_prefix(id));
    key[33..].copy_from_slice(&index.to_be_bytes());
    key
}

/// The chunk index at the end of a `d` key.
pub(crate) fn durable_key_index(key: &[u8]) -> Option<ChunkIndex> {
    let tail: [u8; 4] = key.get(33..)?.try_into().ok()?;
    Some(ChunkIndex::from_be_bytes(tail))
}

pub(crate) fn hash_prefix(hash: &ChunkHash) -> [u8; 33] {
    tagged(TAG_HASH, hash.as_bytes())
}

pub(crate) fn hash_key(hash: &ChunkHash, id: &ManifestId, index: ChunkIndex) -> [u8; 69] {
    let mut key = [0u8; 69];
    key[..33].copy_from_slice(&hash_prefix(hash));
    key[33..65].copy_from_slice(id.as_bytes());
    key[65..].copy_from_slice(&index.to_be_bytes());
    key
}

/// The manifest id and chunk index of an `h` key.
pub(crate) fn parse_hash_key(key: &[u8]) -> Option<(ManifestId, ChunkIndex)> {
    if key.len() != 69 {
        return None;
    }
    let id = ManifestId::from_slice(&key[33..65])?;
    let index: [u8; 4] = key[65..].try_into().ok()?;
    Some((id, ChunkIndex::from_be_bytes(index)))
}

pub(crate) fn active_key(service: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + service.len());
    key.push(TAG_ACTIVE);
    key.extend_from_slice(service.as_bytes());
    key
}

/// The service name of an `a` key.
pub(crate) fn active_key_service(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key.get(1..)?).ok()
}

/// The manifest id at the end of an `m` or `r` key.
pub(crate) fn key_id(key: &[u8]) -> Option<ManifestId> {
    ManifestId::from_slice(key.get(1..)?)
}

fn tagged(tag: u8, bytes: &[u8; 32]) -> [u8; 33] {
    let mut key = [0u8; 33];
    key[0] = tag;
    key[1..].copy_from_slice(bytes);
    key
}

/// What the store knows about one manifest on this host (the `r` value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    /// Staging order: a sled-generated number, renewed when staging begins and when the release
    /// becomes staged. GC keeps the highest per service.
    pub(crate) seq: u64,
    pub(crate) service: String,
    pub(crate) version: String,
    pub(crate) kind: ArtifactKind,
    pub(crate) chunks: u32,
    pub(crate) size: u64,
    /// Whether `releases/<service>/<version>` belongs to this manifest: set (durably) before
    /// unpacking starts, so that a directory found there after a crash is known to be ours.
    pub(crate) claimed: bool,
    pub(crate) status: StageStatus,
}

/// A durable chunk (the `d` value): where its verified bytes are in the artifact file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DurableChunk {
    pub(crate) hash: ChunkHash,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

impl DurableChunk {
    pub(crate) fn encode(&self) -> [u8; 44] {
        let mut out = [0u8; 44];
        out[..32].copy_from_slice(self.hash.as_bytes());
        out[32..40].copy_from_slice(&self.offset.to_be_bytes());
        out[40..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, &'static str> {
        let mut r = Reader(bytes);
        let chunk =
            Self { hash: ChunkHash::from_bytes(r.array()?), offset: r.u64()?, len: r.u32()? };
        r.end()?;
        Ok(chunk)
    }
}

impl Record {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(64 + self.service.len() + self.version.len());
        w.push(RECORD_FORMAT);
        w.extend_from_slice(&self.seq.to_be_bytes());
        w.extend_from_slice(&self.chunks.to_be_bytes());
        w.extend_from_slice(&self.size.to_be_bytes());
        w.push(match self.kind {
            ArtifactKind::File => 0,
            ArtifactKind::Tree => 1,
        });
        w.push(u8::from(self.claimed));
        put_str(&mut w, &self.service);
        put_str(&mut w, &self.version);
        match &self.status {
            StageStatus::Staging => w.push(0),
            StageStatus::Staged => w.push(1),
            StageStatus::Failed { reason } => {
                w.push(2);
                encode_reason(&mut w, reason);
            }
        }
        w
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, &'static str> {
        let mut r = Reader(bytes);
        if r.u8()? != RECORD_FORMAT {
            return Err("unknown record format");
        }
        let seq = r.u64()?;
        let chunks = r.u32()?;
        let size = r.u64()?;
        let kind = match r.u8()? {
            0 => ArtifactKind::File,
            1 => ArtifactKind::Tree,
            _ => return Err("unknown artifact kind"),
        };
        let claimed = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err("bad release claim flag"),
        };
        let service = r.string()?;
        let version = r.string()?;
        let status = match r.u8()? {
            0 => StageStatus::Staging,
            1 => StageStatus::Staged,
            2 => StageStatus::Failed { reason: decode_reason(&mut r)? },
            _ => return Err("unknown status"),
        };
        r.end()?;
        Ok(Self { seq, service, version, kind, chunks, size, claimed, status })
    }
}

fn encode_reason(w: &mut Vec<u8>, reason: &FailReason) {
    match reason {
        FailReason::Whole(WholeCheck::Size { expected, actual }) => {
            w.push(0);
            w.extend_from_slice(&expected.to_be_bytes());
            w.extend_from_slice(&actual.to_be_bytes());
        }
        FailReason::Whole(WholeCheck::Sha256 { expected, actual }) => {
            w.push(1);
            w.extend_from_slice(expected.as_bytes());
            w.extend_from_slice(actual.as_bytes());
        }
        FailReason::Whole(WholeCheck::Blake3 { expected, actual }) => {
            w.push(2);
            w.extend_from_slice(expected.as_bytes());
            w.extend_from_slice(actual.as_bytes());
        }
        FailReason::Refused { entry, reason } => {
            w.push(3);
            w.push(refusal_code(*reason));
            put_str(w, &entry.to_string_lossy());
        }
        FailReason::Malformed => w.push(4),
    }
}

fn decode_reason(r: &mut Reader<'_>) -> Result<FailReason, &'static str> {
    Ok(match r.u8()? {
        0 => FailReason::Whole(WholeCheck::Size { expected: r.u64()?, actual: r.u64()? }),
        1 => FailReason::Whole(WholeCheck::Sha256 {
            expected: Sha256Digest::from_bytes(r.array()?),
            actual: Sha256Digest::from_bytes(r.array()?),
        }),
        2 => FailReason::Whole(WholeCheck::Blake3 {
            expected: Blake3Digest::from_bytes(r.array()?),
            actual: Blake3Digest::from_bytes(r.array()?),
        }),
        3 => {
            let reason = refusal_from_code(r.u8()?)?;
            FailReason::Refused { reason, entry: PathBuf::from(r.string()?) }
        }
        4 => FailReason::Malformed,
        _ => return Err("unknown failure reason"),
    })
}

fn refusal_code(reason: Refusal) -> u8 {
    match reason {
        Refusal::Absolute => 0,
        Refusal::ParentDir => 1,
        Refusal::Empty => 2,
        Refusal::SymlinkEscapes => 3,
        Refusal::BadParent => 4,
        Refusal::UnsupportedType => 5,
        Refusal::Duplicate => 6,
    }
}

fn refusal_from_code(code: u8) -> Result<Refusal, &'static str> {
    Ok(match code {
        0 => Refusal::Absolute,
        1 => Refusal::ParentDir,
        2 => Refusal::Empty,
        3 => Refusal::SymlinkEscapes,
        4 => Refusal::BadParent,
        5 => Refusal::UnsupportedType,
        6 => Refusal::Duplicate,
        _ => return Err("unknown unpack refusal"),
    })
}

/// Appends a string with a 16-bit length. Names are at most 128 bytes and unpack entry paths are
/// cut at 4 KiB, so the length always fits.
fn put_str(w: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(4096);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    w.extend_from_slice(&(end as u16).to_be_bytes());
    w.extend_from_slice(&s.as_bytes()[..end]);
}

/// A cursor over a value being decoded.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated value");
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        self.take(N)?.try_into().map_err(|_| "truncated value")
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, &'static str> {
        let len = u16::from_be_bytes(self.array()?);
        let bytes = self.take(usize::from(len))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "string is not UTF-8")
    }

    fn end(&self) -> Result<(), &'static str> {
        if self.0.is_empty() { Ok(()) } else { Err("trailing bytes") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let base = Record {
            seq: 7,
            service: "web".into(),
            version: "1.4.2".into(),
            kind: ArtifactKind::Tree,
            chunks: 3,
            size: 12345,
            claimed: true,
            status: StageStatus::Staging,
        };
        let statuses = [
            StageStatus::Staging,
            StageStatus::Staged,
            StageStatus::Failed {
                reason: FailReason::Whole(WholeCheck::Size { expected: 10, actual: 9 }),
            },
            StageStatus::Failed {
                reason: FailReason::Whole(WholeCheck::Sha256 {
                    expected: Sha256Digest::from_bytes([1; 32]),
                    actual: Sha256Digest::from_bytes([2; 32]),
                }),
            },
            StageStatus::Failed {
                reason: FailReason::Whole(WholeCheck::Blake3 {
                    expected: Blake3Digest::from_bytes([3; 32]),
                    actual: Blake3Digest::from_bytes([4; 32]),
                }),
            },
            StageStatus::Failed {
                reason: FailReason::Refused {
                    entry: PathBuf::from("a/../b"),
                    reason: Refusal::ParentDir,
                },
            },
            StageStatus::Failed { reason: FailReason::Malformed },
        ];
        for status in statuses {
            let record = Record { status, ..base.clone() };
            assert_eq!(Record::decode(&record.encode()), Ok(record));
        }
        let mut bytes = base.encode();
        bytes.push(0);
        assert!(Record::decode(&bytes).is_err());
        assert!(Record::decode(&bytes[..10]).is_err());
    }

    #[test]
    fn keys_parse_back() {
        let id = ManifestId::from_bytes([5; 32]);
        let hash = ChunkHash::of(b"x");
        assert_eq!(durable_key_index(&durable_key(&id, 258)), Some(258));
        assert_eq!(parse_hash_key(&hash_key(&hash, &id, 9)), Some((id, 9)));
        assert_eq!(key_id(&record_key(&id)), Some(id));
        assert_eq!(active_key_service(&active_key("web")), Some("web"));
        let chunk = DurableChunk { hash, offset: 1 << 40, len: 65536 };
        assert_eq!(DurableChunk::decode(&chunk.encode()), Ok(chunk));
    }
}
