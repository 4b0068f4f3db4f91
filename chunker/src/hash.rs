//! Content addresses: chunk hashes, manifest ids and whole-stream digests.

use std::fmt;
use std::str::FromStr;

/// Errors parsing a hex-encoded 32-byte digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseHashError {
    /// The text is not 64 hexadecimal digits.
    #[error("expected 64 hex digits, got {len} characters")]
    Length {
        /// Length of the text that was given.
        len: usize,
    },
    /// The text contains a character that is not a hexadecimal digit.
    #[error("not a hex digest")]
    NotHex,
}

macro_rules! digest_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Wraps raw digest bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// The raw digest bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Lower-case hex encoding (64 characters).
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// Parses a digest from a byte slice that must be exactly 32 bytes long.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                <[u8; 32]>::try_from(bytes).ok().map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), &self.to_hex()[..16])
            }
        }

        impl FromStr for $name {
            type Err = ParseHashError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                if s.len() != 64 {
                    return Err(ParseHashError::Length { len: s.len() });
                }
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|_| ParseHashError::NotHex)?;
                Ok(Self(out))
            }
        }
    };
}

digest_type!(
    /// BLAKE3 hash of one chunk's bytes: the chunk's address everywhere in Fleetwave (stores,
    /// the swarm protocol, manifests). Being a plain BLAKE3 hash, it is also a valid iroh-blobs
    /// hash.
    ChunkHash
);

digest_type!(
    /// Id of a manifest: the BLAKE3 hash of its canonical encoding.
    ManifestId
);

digest_type!(
    /// SHA-256 digest of a whole artifact stream.
    Sha256Digest
);

digest_type!(
    /// BLAKE3 digest of a whole artifact stream.
    Blake3Digest
);

impl ChunkHash {
    /// Hashes `data` into its chunk address.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }
}

impl ManifestId {
    /// Computes the id of a canonical manifest encoding.
    pub fn of(canonical: &[u8]) -> Self {
        Self(*blake3::hash(canonical).as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let h = ChunkHash::of(b"fleetwave");
        let parsed: ChunkHash = h.to_hex().parse().expect("parses");
        assert_eq!(parsed, h);
        assert_eq!(h.to_hex(), blake3::hash(b"fleetwave").to_hex().as_str());
    }

    #[test]
    fn rejects_bad_hex() {
        assert_eq!("abc".parse::<ManifestId>(), Err(ParseHashError::Length { len: 3 }));
        let bad = "z".repeat(64);
        assert_eq!(bad.parse::<ManifestId>(), Err(ParseHashError::NotHex));
    }
}
