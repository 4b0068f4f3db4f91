//! The manifest: what an artifact version is made of.
//!
//! [`Manifest`] is the domain type; the protobuf message `fleetwave.v1.Manifest` is only its wire
//! and storage form, converted at the edge. Decoding validates everything a receiver relies on
//! (digest lengths, chunk sizes adding up, names safe to use as path components, limits) and
//! rejects encodings that are not canonical, so a manifest has exactly one encoding and one id.

use std::collections::BTreeMap;

use prost::Message;

use fleetwave_proto::v1 as pb;

use crate::cdc::{self, ChunkerParams, InvalidParams, StreamSummary};
use crate::hash::{Blake3Digest, ChunkHash, ManifestId, Sha256Digest};

/// Format number of the manifests this crate writes and reads.
pub const FORMAT: u32 = 1;

/// Largest encoded manifest accepted, checked before decoding. A 4 GiB artifact at the default
/// 64 KiB average chunk size has about 65,000 chunks, about 2.4 MB of manifest.
pub const MAX_MANIFEST_BYTES: usize = 16 << 20;

/// Most chunks one manifest may list.
pub const MAX_CHUNKS: usize = 400_000;

/// Longest service or version name; both are used as path components on hosts.
pub const MAX_NAME_LEN: usize = 128;

/// Most build labels, and the longest label key or value.
pub const MAX_LABELS: usize = 64;
const MAX_LABEL_LEN: usize = 1024;
const MAX_TEXT_LEN: usize = 1024;

/// How the artifact stream was made from the publisher's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArtifactKind {
    /// A single file, byte for byte.
    File,
    /// A directory packed by [`crate::pack`]; unpack with [`crate::unpack`].
    Tree,
}

/// One chunk of a manifest's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkInfo {
    /// BLAKE3 of the chunk's bytes.
    pub hash: ChunkHash,
    /// Length in bytes.
    pub length: u32,
}

/// Where and from what an artifact was built.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildInfo {
    /// Source revision (a git commit id, for example).
    pub commit: String,
    /// Who or what built it.
    pub builder: String,
    /// Build time, seconds since the Unix epoch.
    pub built_at_unix: i64,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
}

/// A version of a service's artifact: the whole stream and the chunks it is cut into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Service name (a safe path component).
    pub service: String,
    /// Version name (a safe path component).
    pub version: String,
    /// File or packed tree.
    pub kind: ArtifactKind,
    /// Stream length in bytes (the sum of the chunk lengths).
    pub size: u64,
    /// SHA-256 of the whole stream.
    pub sha256: Sha256Digest,
    /// BLAKE3 of the whole stream.
    pub blake3: Blake3Digest,
    /// Parameters the stream was chunked with.
    pub chunker: ChunkerParams,
    /// Chunks in stream order; a chunk hash may repeat.
    pub chunks: Vec<ChunkInfo>,
    /// Build metadata.
    pub build: BuildInfo,
    /// Deployment configuration version the artifact expects (may be empty).
    pub config_version: String,
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The encoding is larger than [`MAX_MANIFEST_BYTES`].
    #[error("manifest is {len} bytes, more than the {max} allowed")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The bytes are not a protobuf manifest.
    #[error("manifest does not decode")]
    Decode(#[from] prost::DecodeError),
    /// A format this version does not know.
    #[error("unsupported manifest format {0} (this build reads format {FORMAT})")]
    Format(u32),
    /// A field is missing or out of range.
    #[error("manifest field `{field}` is invalid: {reason}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The chunk lengths do not add up to the declared size.
    #[error("manifest chunks add up to {sum} bytes but its size is {size}")]
    SizeMismatch {
        /// Declared size.
        size: u64,
        /// Sum of chunk lengths.
        sum: u64,
    },
    /// The bytes decode, but are not the canonical encoding of what they decode to.
    #[error("manifest encoding is not canonical")]
    NonCanonical,
    /// The chunker parameters are unusable.
    #[error(transparent)]
    Params(#[from] InvalidParams),
}

fn invalid(field: &'static str, reason: &'static str) -> ManifestError {
    ManifestError::Invalid { field, reason }
}

/// Checks that `name` is safe to use as a single path component and readable in logs:
/// 1 to [`MAX_NAME_LEN`] characters from `[A-Za-z0-9._+-]`, not starting with `.`.
pub fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("longer than 128 characters");
    }
    if name.starts_with('.') {
        return Err("must not start with '.'");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-')) {
        return Err("may only contain A-Z a-z 0-9 . _ + -");
    }
    Ok(())
}

impl Manifest {
    /// Builds a manifest from a chunking pass.
    pub fn from_summary(
        service: String,
        version: String,
        kind: ArtifactKind,
        chunker: ChunkerParams,
        summary: StreamSummary,
        build: BuildInfo,
    ) -> Result<Self, ManifestError> {
        let manifest = Self {
            service,
            version,
            kind,
            size: summary.size,
            sha256: summary.sha256,
            blake3: summary.blake3,
            chunker,
            chunks: summary.chunks,
            build,
            config_version: String::new(),
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks every invariant a receiver relies on.
    pub fn validate(&self) -> Result<(), ManifestError> {
        validate_name(&self.service).map_err(|r| invalid("service", r))?;
        validate_name(&self.version).map_err(|r| invalid("version", r))?;
        self.chunker.validate()?;
        if self.chunks.len() > MAX_CHUNKS {
            return Err(invalid("chunks", "more chunks than allowed"));
        }
        let mut sum = 0u64;
        for (i, chunk) in self.chunks.iter().enumerate() {
            if chunk.length == 0 || chunk.length > self.chunker.max_size {
                return Err(invalid("chunks", "chunk length is 0 or above the chunker maximum"));
            }
            let last = i + 1 == self.chunks.len();
            if !last && chunk.length < self.chunker.min_size {
                return Err(invalid("chunks", "chunk shorter than the chunker minimum"));
            }
            sum += u64::from(chunk.length);
        }
        if sum != self.size {
            return Err(ManifestError::SizeMismatch { size: self.size, sum });
        }
        let b = &self.build;
        if b.commit.len() > MAX_TEXT_LEN || b.builder.len() > MAX_TEXT_LEN {
            return Err(invalid("build", "commit or builder longer than 1024 bytes"));
        }
        if self.config_version.len() > MAX_TEXT_LEN {
            return Err(invalid("config_version", "longer than 1024 bytes"));
        }
        if b.labels.len() > MAX_LABELS {
            return Err(invalid("build.labels", "more than 64 labels"));
        }
        for (k, v) in &b.labels {
            if k.is_empty() || k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN {
                return Err(invalid("build.labels", "empty key, or key or value over 1024 bytes"));
            }
        }
        Ok(())
    }

    /// The canonical encoding: the bytes that are signed and hashed into the id.
    pub fn encode(&self) -> Vec<u8> {
        pb::Manifest::from(self).encode_to_vec()
    }

    /// The manifest's id (BLAKE3 of [`Manifest::encode`]).
    pub fn id(&self) -> ManifestId {
        ManifestId::of(&self.encode())
    }

    /// Decodes and validates a canonical encoding.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { len: bytes.len(), max: MAX_MANIFEST_BYTES });
        }
        let msg = pb::Manifest::decode(bytes)?;
        let manifest = Self::try_from(msg)?;
        if manifest.encode() != bytes {
            return Err(ManifestError::NonCanonical);
        }
        Ok(manifest)
    }

    /// Offset of every chunk in the stream, in order.
    pub fn offsets(&self) -> impl Iterator<Item = (u64, &ChunkInfo)> + '_ {
        self.chunks.iter().scan(0u64, |off, c| {
            let here = *off;
            *off += u64::from(c.length);
            Some((here, c))
        })
    }

    /// Distinct chunk hashes with their lengths, in first-appearance order.
    pub fn unique_chunks(&self) -> Vec<ChunkInfo> {
        let mut seen = std::collections::HashSet::with_capacity(self.chunks.len());
        self.chunks.iter().filter(|c| seen.insert(c.hash)).copied().collect()
    }
}

impl From<&Manifest> for pb::Manifest {
    fn from(m: &Manifest) -> Self {
        pb::Manifest {
            format: FORMAT,
            service: m.service.clone(),
            version: m.version.clone(),
            kind: match m.kind {
                ArtifactKind::File => pb::ArtifactKind::File,
                ArtifactKind::Tree => pb::ArtifactKind::Tree,
            } as i32,
            size: m.size,
            sha256: m.sha256.as_bytes().to_vec(),
            blake3: m.blake3.as_bytes().to_vec(),
            chunker: Some(pb::ChunkerParams {
                algorithm: cdc::ALGORITHM.to_owned(),
                min_size: m.chunker.min_size,
                avg_size: m.chunker.avg_size,
                max_size: m.chunker.max_size,
            }),
            chunks: m
                .chunks
                .iter()
                .map(|c| pb::Chunk { hash: c.hash.as_bytes().to_vec(), length: c.length })
                .collect(),
            build: Some(pb::BuildInfo {
                commit: m.build.commit.clone(),
                builder: m.build.builder.clone(),
                built_at_unix: m.build.built_at_unix,
                labels: m
                    .build
                    .labels
                    .iter()
                    .map(|(k, v)| pb::Label { key: k.clone(), value: v.clone() })
                    .collect(),
            }),
            config_version: m.config_version.clone(),
        }
    }
}

impl TryFrom<pb::Manifest> for Manifest {
    type Error = ManifestError;

    fn try_from(msg: pb::Manifest) -> Result<Self, ManifestError> {
        if msg.format != FORMAT {
            return Err(ManifestError::Format(msg.format));
        }
        let kind = match pb::ArtifactKind::try_from(msg.kind) {
            Ok(pb::ArtifactKind::File) => ArtifactKind::File,
            Ok(pb::ArtifactKind::Tree) => ArtifactKind::Tree,
            _ => return Err(invalid("kind", "unknown artifact kind")),
        };
        let sha256 = Sha256Digest::from_slice(&msg.sha256)
            .ok_or_else(|| invalid("sha256", "must be 32 bytes"))?;
        let blake3 = Blake3Digest::from_slice(&msg.blake3)
            .ok_or_else(|| invalid("blake3", "must be 32 bytes"))?;
        let params = msg.chunker.ok_or_else(|| invalid("chunker", "missing"))?;
        if params.algorithm != cdc::ALGORITHM {
            return Err(invalid("chunker.algorithm", "unknown chunking algorithm"));
        }
        let chunker = ChunkerParams {
            min_size: params.min_size,
            avg_size: params.avg_size,
            max_size: params.max_size,
        };
        if msg.chunks.len() > MAX_CHUNKS {
            return Err(invalid("chunks", "more chunks than allowed"));
        }
        let chunks = msg
            .chunks
            .into_iter()
            .map(|c| {
                let hash = ChunkHash::from_slice(&c.hash)
                    .ok_or_else(|| invalid("chunks.hash", "must be 32 bytes"))?;
                Ok(ChunkInfo { hash, length: c.length })
            })
            .collect::<Result<Vec<_>, ManifestError>>()?;
        let build = msg.build.unwrap_or_default();
        let mut labels = BTreeMap::new();
        let mut last: Option<String> = None;
        for label in build.labels {
            if last.as_ref().is_some_and(|prev| *prev >= label.key) {
                return Err(invalid("build.labels", "keys must be unique and sorted"));
            }
            last = Some(label.key.clone());
            labels.insert(label.key, label.value);
        }
        let manifest = Manifest {
            service: msg.service,
            version: msg.version,
            kind,
            size: msg.size,
            sha256,
            blake3,
            chunker,
            chunks,
            build: BuildInfo {
                commit: build.commit,
                builder: build.builder,
                built_at_unix: build.built_at_unix,
                labels,
            },
            config_version: msg.config_version,
        };
        manifest.validate()?;
        Ok(manifest)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        let data = b"hello fleet".repeat(10_000);
        let lengths =
            cdc::Cutter::new(ChunkerParams::with_avg(4096)).expect("params").lengths(&data);
        let mut off = 0;
        let chunks = lengths
            .iter()
            .map(|&l| {
                let c = ChunkInfo { hash: ChunkHash::of(&data[off..off + l]), length: l as u32 };
                off += l;
                c
            })
            .collect();
        Manifest {
            service: "web".into(),
            version: "1.4.2".into(),
            kind: ArtifactKind::File,
            size: data.len() as u64,
            sha256: Sha256Digest::from_bytes([7; 32]),
            blake3: Blake3Digest::from_bytes(*blake3::hash(&data).as_bytes()),
            chunker: ChunkerParams::with_avg(4096),
            chunks,
            build: BuildInfo {
                commit: "abc123".into(),
                builder: "ci@build-1".into(),
                built_at_unix: 1_700_000_000,
                labels: [("team".to_owned(), "edge".to_owned())].into_iter().collect(),
            },
            config_version: String::new(),
        }
    }

    #[test]
    fn round_trips_and_id_is_stable() {
        let m = sample();
        let bytes = m.encode();
        let back = Manifest::decode(&bytes).expect("decodes");
        assert_eq!(back, m);
        assert_eq!(back.id(), ManifestId::of(&bytes));
    }

    #[test]
    fn rejects_non_canonical_encoding() {
        let m = sample();
        let mut bytes = m.encode();
        // Append a duplicate `format` field: valid protobuf (last one wins), not canonical.
        bytes.extend_from_slice(&[0x08, 0x01]);
        assert_eq!(Manifest::decode(&bytes), Err(ManifestError::NonCanonical));
    }

    #[test]
    fn rejects_size_mismatch_and_bad_names() {
        let mut m = sample();
        m.size += 1;
        let mut msg = pb::Manifest::from(&m);
        assert!(matches!(
            Manifest::decode(&msg.encode_to_vec()),
            Err(ManifestError::SizeMismatch { .. })
        ));
        m.size -= 1;
        msg = pb::Manifest::from(&m);
        msg.service = "../etc".into();
        assert!(matches!(
            Manifest::decode(&msg.encode_to_vec()),
            Err(ManifestError::Invalid { field: "service", .. })
        ));
    }

    #[test]
    fn rejects_garbage_and_oversize() {
        assert!(matches!(Manifest::decode(&[0xff, 0xff, 0xff]), Err(ManifestError::Decode(_))));
        let big = vec![0u8; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(Manifest::decode(&big), Err(ManifestError::TooLarge { .. })));
    }

    #[test]
    fn rejects_unknown_format_and_short_digests() {
        let m = sample();
        let mut msg = pb::Manifest::from(&m);
        msg.format = 2;
        assert_eq!(Manifest::decode(&msg.encode_to_vec()), Err(ManifestError::Format(2)));
        let mut msg = pb::Manifest::from(&m);
        msg.sha256.pop();
        assert!(matches!(
            Manifest::decode(&msg.encode_to_vec()),
            Err(ManifestError::Invalid { field: "sha256", .. })
        ));
    }

    #[test]
    fn name_rules() {
        assert!(validate_name("web-api_2.1+build").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", "..", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
