//! The daemon's persistent identity: an ed25519 libp2p keypair in `<data_dir>/identity.key`,
//! created on first start (mode 0600, written to a temporary file, flushed, then renamed, so a
//! crash never leaves half a key) and loaded on every later start.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p_identity::Keypair;

/// File name of the identity key in the data directory.
pub const IDENTITY_FILE: &str = "identity.key";

/// Most bytes of an identity file read (an ed25519 key is 68 bytes in protobuf).
const MAX_IDENTITY_LEN: u64 = 4096;

/// The identity key cannot be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error("identity key {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file does not hold a key.
    #[error("identity key {path} is not a libp2p ed25519 key")]
    Invalid {
        /// The key file.
        path: PathBuf,
    },
    /// Others may read the key file.
    #[error("identity key {path} is readable by others (mode {mode:o}); chmod 600 it")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

/// Loads the identity in `data_dir`, creating it (and the directory) on first start.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(IDENTITY_FILE);
    let io = |source| IdentityError::Io { path: path.clone(), source };
    match fs::File::open(&path) {
        Ok(file) => {
            let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::Permissions { path, mode });
            }
            let mut bytes = Vec::new();
            file.take(MAX_IDENTITY_LEN).read_to_end(&mut bytes).map_err(io)?;
            let key = Keypair::from_protobuf_encoding(&bytes)
                .map_err(|_| IdentityError::Invalid { path: path.clone() })?;
            if key.key_type() != libp2p_identity::KeyType::Ed25519 {
                return Err(IdentityError::Invalid { path });
            }
            Ok(key)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(data_dir).map_err(io)?;
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|_| IdentityError::Invalid { path: path.clone() })?;
            let tmp = data_dir.join(format!(".{IDENTITY_FILE}.tmp"));
            let tmp_io = |source| IdentityError::Io { path: tmp.clone(), source };
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(tmp_io)?;
            file.write_all(&bytes).map_err(tmp_io)?;
            file.sync_all().map_err(tmp_io)?;
            fs::rename(&tmp, &path).map_err(io)?;
            fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(io)?;
            Ok(key)
        }
        Err(err) => Err(io(err)),
    }
}
