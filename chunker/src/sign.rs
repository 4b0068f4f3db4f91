//! ed25519 signatures on manifests, and key files.
//!
//! A [`SignedManifest`] carries the manifest's canonical bytes exactly as signed, plus one or
//! more signatures. Each signature covers [`SIGNING_CONTEXT`] followed by those bytes, so a
//! Fleetwave manifest signature can never be replayed as a signature over anything else.
//! Verification succeeds only if at least one signature is by a trusted key and is valid under
//! the strict ed25519 rules (`verify_strict`: no small-order keys, no malleable signatures).
//!
//! Key files are PEM: the secret key as PKCS#8 (`BEGIN PRIVATE KEY`), written with mode 0600
//! and refused on load if anyone but the owner can read it (like OpenSSH); the public key as
//! SubjectPublicKeyInfo (`BEGIN PUBLIC KEY`). Both are the standard encodings, so `openssl pkey`
//! reads them.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer};
use prost::Message;

use fleetwave_proto::v1 as pb;

use crate::hash::ManifestId;
use crate::manifest::{MAX_MANIFEST_BYTES, Manifest, ManifestError};

/// Prefix of every signed message: domain separation for manifest signatures.
pub const SIGNING_CONTEXT: &[u8] = b"fleetwave manifest v1\0";

/// Most signatures one signed manifest may carry.
pub const MAX_SIGNATURES: usize = 16;

/// A secret ed25519 key that signs manifests.
pub struct SigningKey(ed25519_dalek::SigningKey);

/// A public ed25519 key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VerifyingKey(ed25519_dalek::VerifyingKey);

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the file failed.
    #[error("{}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Refusing to overwrite an existing key.
    #[error("{}: already exists (refusing to overwrite a key)", path.display())]
    Exists {
        /// The key file.
        path: PathBuf,
    },
    /// A secret key readable by group or others.
    #[error(
        "{}: secret key is readable by others (mode {mode:o}); run chmod 600 on it",
        path.display()
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not a PEM ed25519 key of the expected kind.
    #[error("{}: not an ed25519 {expected} key in PEM", path.display())]
    Parse {
        /// The key file.
        path: PathBuf,
        /// "secret" or "public".
        expected: &'static str,
    },
}

/// Why a signed manifest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// The envelope or the manifest inside it is malformed.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A signature or public key has the wrong length or is not a valid point.
    #[error("signed manifest has a malformed signature or key")]
    Malformed,
    /// More signatures than [`MAX_SIGNATURES`].
    #[error("signed manifest has {0} signatures, more than allowed")]
    TooManySignatures(usize),
    /// The manifest's id is not the one asked for.
    #[error("manifest id is {actual}, expected {expected}")]
    IdMismatch {
        /// The id that was asked for.
        expected: ManifestId,
        /// The id of the bytes received.
        actual: ManifestId,
    },
    /// No signature is by a trusted key.
    #[error("manifest is not signed by a trusted key (signed by: {})", fmt_keys(signers))]
    Untrusted {
        /// Keys that did sign it.
        signers: Vec<VerifyingKey>,
    },
    /// A trusted key's signature does not verify: the manifest was altered or forged.
    #[error("signature by trusted key {key} does not verify")]
    BadSignature {
        /// The trusted key whose signature failed.
        key: Box<VerifyingKey>,
    },
}

fn fmt_keys(keys: &[VerifyingKey]) -> String {
    if keys.is_empty() {
        return "nobody".to_owned();
    }
    keys.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ")
}

impl SigningKey {
    /// A fresh random key from the operating system's RNG.
    pub fn generate() -> Self {
        Self(ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// A key from a 32-byte seed (tests and deterministic fixtures).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// The matching public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey(self.0.verifying_key())
    }

    /// Signs `manifest`.
    pub fn sign(&self, manifest: Manifest) -> SignedManifest {
        let mut signed = SignedManifest::unsigned(manifest);
        signed.add_signature(self);
        signed
    }

    /// Writes the secret key to `path` (mode 0600, never overwriting) and the public key to
    /// `path.pub`.
    pub fn write_files(&self, path: &Path) -> Result<PathBuf, KeyError> {
        let pub_path = public_path(path);
        for p in [path, pub_path.as_path()] {
            if p.exists() {
                return Err(KeyError::Exists { path: p.to_owned() });
            }
        }
        let pem = self
            .0
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|_| KeyError::Parse { path: path.to_owned(), expected: "secret" })?;
        write_new(path, pem.as_bytes(), 0o600)?;
        let public = self.verifying_key().to_pem();
        write_new(&pub_path, public.as_bytes(), 0o644)?;
        Ok(pub_path)
    }

    /// Reads a secret key file, refusing one that group or others can read.
    pub fn read_file(path: &Path) -> Result<Self, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |source| KeyError::Io { path: path.to_owned(), source };
        let meta = std::fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: path.to_owned(), mode });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        ed25519_dalek::SigningKey::from_pkcs8_pem(&text)
            .map(Self)
            .map_err(|_| KeyError::Parse { path: path.to_owned(), expected: "secret" })
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print secret material.
        write!(f, "SigningKey(public {})", self.verifying_key())
    }
}

impl VerifyingKey {
    /// Parses a raw 32-byte public key.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        ed25519_dalek::VerifyingKey::from_bytes(&arr).ok().map(Self)
    }

    /// The raw 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// SubjectPublicKeyInfo PEM.
    pub fn to_pem(&self) -> String {
        // Encoding a valid key cannot fail.
        self.0.to_public_key_pem(LineEnding::LF).unwrap_or_default()
    }

    /// Reads a public key PEM file.
    pub fn read_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| KeyError::Io { path: path.to_owned(), source })?;
        ed25519_dalek::VerifyingKey::from_public_key_pem(&text)
            .map(Self)
            .map_err(|_| KeyError::Parse { path: path.to_owned(), expected: "public" })
    }
}

impl fmt::Display for VerifyingKey {
    /// The key as hex, which is how operators compare and pin keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.to_bytes()))
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({})", &hex::encode(self.to_bytes())[..16])
    }
}

/// The public-key path that goes with a secret key path: `FILE.pub`.
pub fn public_path(secret: &Path) -> PathBuf {
    let mut name = secret.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| KeyError::Io { path: path.to_owned(), source };
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(
            |e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyError::Exists { path: path.to_owned() }
                } else {
                    io(e)
                }
            },
        )?;
    let result = file.write_all(bytes).and_then(|()| file.sync_all());
    if let Err(e) = result {
        let _ = std::fs::remove_file(path);
        return Err(io(e));
    }
    Ok(())
}

/// The keys a verifier trusts.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys(Vec<VerifyingKey>);

impl TrustedKeys {
    /// Trusts exactly `keys`.
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        Self(keys.into_iter().collect())
    }

    /// Reads public key files.
    pub fn read_files<P: AsRef<Path>>(paths: &[P]) -> Result<Self, KeyError> {
        paths
            .iter()
            .map(|p| VerifyingKey::read_file(p.as_ref()))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Whether `key` is trusted.
    pub fn contains(&self, key: &VerifyingKey) -> bool {
        self.0.contains(key)
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A manifest with its exact signed bytes and its signatures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedManifest {
    manifest: Manifest,
    bytes: Vec<u8>,
    id: ManifestId,
    signatures: Vec<(VerifyingKey, Signature)>,
}

impl SignedManifest {
    /// Wraps a manifest with no signature yet.
    pub fn unsigned(manifest: Manifest) -> Self {
        let bytes = manifest.encode();
        let id = ManifestId::of(&bytes);
        Self { manifest, bytes, id, signatures: Vec::new() }
    }

    /// Adds a signature by `key`.
    pub fn add_signature(&mut self, key: &SigningKey) {
        let sig = key.0.sign(&signed_message(&self.bytes));
        self.signatures.push((key.verifying_key(), sig));
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest's id.
    pub fn id(&self) -> ManifestId {
        self.id
    }

    /// The canonical manifest bytes that were signed.
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Keys that signed (valid or not; see [`SignedManifest::verify`]).
    pub fn signers(&self) -> Vec<VerifyingKey> {
        self.signatures.iter().map(|(k, _)| *k).collect()
    }

    /// Encodes the envelope for storage or the wire.
    pub fn encode(&self) -> Vec<u8> {
        pb::SignedManifest {
            manifest: self.bytes.clone(),
            signatures: self
                .signatures
                .iter()
                .map(|(k, s)| pb::Signature {
                    public_key: k.to_bytes().to_vec(),
                    signature: s.to_bytes().to_vec(),
                })
                .collect(),
        }
        .encode_to_vec()
    }

    /// Decodes an envelope and the manifest inside it. Signatures are parsed, not verified.
    pub fn decode(bytes: &[u8]) -> Result<Self, SignatureError> {
        // The envelope is the manifest plus at most MAX_SIGNATURES * ~100 bytes.
        let cap = MAX_MANIFEST_BYTES + 64 * 1024;
        if bytes.len() > cap {
            return Err(ManifestError::TooLarge { len: bytes.len(), max: cap }.into());
        }
        let msg = pb::SignedManifest::decode(bytes).map_err(ManifestError::Decode)?;
        if msg.signatures.len() > MAX_SIGNATURES {
            return Err(SignatureError::TooManySignatures(msg.signatures.len()));
        }
        let manifest = Manifest::decode(&msg.manifest)?;
        let signatures = msg
            .signatures
            .iter()
            .map(|s| {
                let key =
                    VerifyingKey::from_bytes(&s.public_key).ok_or(SignatureError::Malformed)?;
                let sig =
                    Signature::from_slice(&s.signature).map_err(|_| SignatureError::Malformed)?;
                Ok((key, sig))
            })
            .collect::<Result<Vec<_>, SignatureError>>()?;
        let id = ManifestId::of(&msg.manifest);
        Ok(Self { manifest, bytes: msg.manifest, id, signatures })
    }

    /// Decodes an envelope that must hold the manifest `expected`.
    pub fn decode_expecting(expected: ManifestId, bytes: &[u8]) -> Result<Self, SignatureError> {
        let signed = Self::decode(bytes)?;
        if signed.id != expected {
            return Err(SignatureError::IdMismatch { expected, actual: signed.id });
        }
        Ok(signed)
    }

    /// Checks that a trusted key signed this manifest. Returns that key.
    ///
    /// Signatures by keys that are not trusted are ignored; a trusted key's signature that
    /// does not verify is an error (the manifest was tampered with), even if another trusted
    /// signature verifies.
    pub fn verify(&self, trusted: &TrustedKeys) -> Result<VerifyingKey, SignatureError> {
        let message = signed_message(&self.bytes);
        let mut good = None;
        for (key, sig) in &self.signatures {
            if !trusted.contains(key) {
                continue;
            }
            key.0
                .verify_strict(&message, sig)
                .map_err(|_| SignatureError::BadSignature { key: Box::new(*key) })?;
            good.get_or_insert(*key);
        }
        good.ok_or_else(|| SignatureError::Untrusted { signers: self.signers() })
    }
}

fn signed_message(manifest_bytes: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + manifest_bytes.len());
    msg.extend_from_slice(SIGNING_CONTEXT);
    msg.extend_from_slice(manifest_bytes);
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;

    #[test]
    fn sign_encode_decode_verify() {
        let key = SigningKey::from_seed([1; 32]);
        let signed = key.sign(sample());
        let back =
            SignedManifest::decode_expecting(signed.id(), &signed.encode()).expect("decodes");
        assert_eq!(back, signed);
        let trusted = TrustedKeys::new([key.verifying_key()]);
        assert_eq!(back.verify(&trusted), Ok(key.verifying_key()));
    }

    #[test]
    fn untrusted_signer_is_refused() {
        let key = SigningKey::from_seed([1; 32]);
        let other = SigningKey::from_seed([2; 32]);
        let signed = key.sign(sample());
        let trusted = TrustedKeys::new([other.verifying_key()]);
        assert_eq!(
            signed.verify(&trusted),
            Err(SignatureError::Untrusted { signers: vec![key.verifying_key()] })
        );
        assert!(matches!(
            SignedManifest::unsigned(sample()).verify(&trusted),
            Err(SignatureError::Untrusted { .. })
        ));
    }

    #[test]
    fn tampered_manifest_fails_verification() {
        let key = SigningKey::from_seed([1; 32]);
        let signed = key.sign(sample());
        let mut env = pb::SignedManifest::decode(signed.encode().as_slice()).expect("decodes");
        let mut m = sample();
        m.version = "6.6.6".into();
        env.manifest = m.encode();
        let forged = SignedManifest::decode(&env.encode_to_vec()).expect("still decodes");
        let trusted = TrustedKeys::new([key.verifying_key()]);
        assert_eq!(
            forged.verify(&trusted),
            Err(SignatureError::BadSignature { key: Box::new(key.verifying_key()) })
        );
    }

    #[test]
    fn wrong_id_is_refused() {
        let signed = SigningKey::from_seed([1; 32]).sign(sample());
        let other = ManifestId::from_bytes([9; 32]);
        assert!(matches!(
            SignedManifest::decode_expecting(other, &signed.encode()),
            Err(SignatureError::IdMismatch { .. })
        ));
    }

    #[test]
    fn key_files_round_trip_with_private_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("release.key");
        let key = SigningKey::generate();
        let pub_path = key.write_files(&path).expect("writes");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = SigningKey::read_file(&path).expect("reads");
        assert_eq!(back.verifying_key(), key.verifying_key());
        assert_eq!(VerifyingKey::read_file(&pub_path).expect("reads"), key.verifying_key());
        assert!(matches!(key.write_files(&path), Err(KeyError::Exists { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(SigningKey::read_file(&path), Err(KeyError::Permissions { .. })));
        assert!(matches!(VerifyingKey::read_file(&path), Err(KeyError::Parse { .. })));
    }
}
