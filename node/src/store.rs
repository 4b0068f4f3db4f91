//! The on-disk store of a node: content-addressed chunks, signed manifests and refs.
//!
//! The origin, the caches and the hosts all keep their data in one directory with this layout:
//!
//! ```text
//! <dir>/chunks/<2 hex>/<64 hex>   chunk bytes, named by their BLAKE3 hash, sharded by its 1st byte
//! <dir>/manifests/<64 hex>        raw bytes of a signed manifest, named by its manifest id
//! <dir>/refs/<service>/<version>  manifest id in hex and a newline: which manifest a release is
//! <dir>/tmp/                      files being written; anything here after a crash is garbage
//! <dir>/lock                      advisory lock saying which processes have the store open
//! ```
//!
//! # Integrity
//!
//! A chunk's name is its address, so the store can always check what it holds: [`ChunkStore::put`]
//! refuses bytes that do not hash to the hash the caller claims ([`StoreError::HashMismatch`]), and
//! [`ChunkStore::get`] and [`ChunkStore::verify`] re-hash what they read and report a file that
//! changed on disk as [`StoreError::Corrupt`], so a bad chunk is never served to a peer. Manifests
//! are not decoded here: a manifest id is the hash of the *canonical unsigned* encoding while the
//! file holds the signed manifest, so callers decode the bytes and check the id (and the
//! signatures) themselves.
//!
//! # Durability
//!
//! Every write goes to a fresh file in `tmp/`, is flushed to disk, and only then is renamed to its
//! final name, after which the directory that gained the entry is flushed too. A writer that dies
//! at any point leaves either nothing visible or a complete file; [`ChunkStore::open`] deletes the
//! leftovers in `tmp/`. Flushing every chunk on its own is far too slow when publishing tens of
//! thousands of chunks, so [`WriteBatch`] writes them all unflushed and makes them durable with a
//! single `syncfs(2)` before renaming them into place.
//!
//! # Concurrency
//!
//! A [`ChunkStore`] is cheap to clone and may be used from many threads. Several handles and
//! several processes may have the same directory open: every opener holds a shared `flock(2)` on
//! `lock` for as long as its handle lives, and only an opener that can take the lock exclusively
//! (nobody else has the store open) clears `tmp/`, so the in-flight files of a live writer are
//! never deleted. Writing the same chunk twice at once is harmless: both writers rename identical
//! bytes into place.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleetwave_chunker::{ChunkHash, ManifestId, ParseHashError};
use rustix::fs::FlockOperation;
use tempfile::{NamedTempFile, TempPath};

use crate::fsio::{IoFailure, ensure_dir, remove_file, sync_dir};

/// Largest chunk the store accepts, in bytes.
///
/// Equal to the largest maximum chunk size FastCDC v2020 allows (16 MiB), so any chunk the chunker
/// can cut fits. A chunk file bigger than this cannot have been written by the store, so reading
/// one reports [`StoreError::Corrupt`] instead of allocating an unbounded buffer.
pub const MAX_CHUNK_LEN: usize = 16 * 1024 * 1024;

/// Largest signed manifest the store accepts or reads, in bytes.
///
/// A chunk entry costs about 40 bytes, so 16 MiB holds some 400,000 chunks: a 25 GiB artifact at
/// 64 KiB average chunks. The cap is checked before allocating, so a huge or hostile file in
/// `manifests/` cannot exhaust memory.
pub const MAX_MANIFEST_LEN: usize = 16 * 1024 * 1024;

/// Fewest hex digits [`ChunkStore::resolve_manifest_prefix`] accepts.
///
/// Eight digits (32 bits) keep accidental collisions rare in a store with thousands of manifests
/// while staying short enough to type.
pub const MIN_PREFIX_LEN: usize = 8;

/// Longest service or version name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Largest ref file read: a 64-digit id and a newline, with room for stray whitespace.
const MAX_REF_FILE_LEN: u64 = 256;

const CHUNKS_DIR: &str = "chunks";
const MANIFESTS_DIR: &str = "manifests";
const REFS_DIR: &str = "refs";
const TMP_DIR: &str = "tmp";
const LOCK_FILE: &str = "lock";

/// Permission bits of chunk and manifest files (before the umask): read-only, like git objects,
/// because content-addressed files are never modified in place, only replaced or removed.
const IMMUTABLE_MODE: u32 = 0o444;
/// Permission bits of ref files (before the umask).
const REF_MODE: u32 = 0o644;

/// What the store was doing when an I/O error happened (the "reason" half of
/// [`StoreError::Io`], the OS error being the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOp {
    /// Creating a directory.
    CreateDir,
    /// Creating a file (temporary files, the lock file, the writability probe).
    CreateFile,
    /// Opening a file for reading.
    Open,
    /// Reading a file or its metadata.
    Read,
    /// Writing a file.
    Write,
    /// Flushing a file, a directory or the whole filesystem to disk.
    Sync,
    /// Renaming a finished temporary file to its final name.
    Rename,
    /// Removing a file or directory.
    Remove,
    /// Listing a directory.
    ListDir,
    /// Taking the store's advisory lock.
    Lock,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CreateDir => "create directory",
            Self::CreateFile => "create a file in",
            Self::Open => "open",
            Self::Read => "read",
            Self::Write => "write",
            Self::Sync => "sync",
            Self::Rename => "rename a file to",
            Self::Remove => "remove",
            Self::ListDir => "list directory",
            Self::Lock => "lock",
        })
    }
}

/// Which kind of name failed validation in [`StoreError::InvalidName`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NameKind {
    /// A service name (`refs/<service>`).
    Service,
    /// A version name (`refs/<service>/<version>`).
    Version,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Service => "service",
            Self::Version => "version",
        })
    }
}

/// Why a service or version name is not a safe path component.
///
/// Valid names are 1 to [`MAX_NAME_LEN`] characters from `[A-Za-z0-9._+-]` and do not start with
/// `.` (which also rules out `.` and `..`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("it is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("it is {len} bytes long, more than {max}")]
    TooLong {
        /// Length of the name in bytes.
        len: usize,
        /// The limit, [`MAX_NAME_LEN`].
        max: usize,
    },
    /// The name starts with `.`.
    #[error("it starts with '.'")]
    LeadingDot,
    /// The name contains a character outside `[A-Za-z0-9._+-]`.
    #[error("it contains {ch:?}; only A-Z, a-z, 0-9 and . _ + - are allowed")]
    BadChar {
        /// The first offending character.
        ch: char,
    },
}

/// Errors of the chunk, manifest and ref stores.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation on `path` failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What the store was doing.
        op: IoOp,
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A stored chunk's bytes do not hash to its address: the file changed on disk (bit rot, a
    /// truncated write outside the store's control, tampering). Remove it and fetch it again.
    #[error("chunk {hash} at {} is corrupt: its bytes do not hash to its address", path.display())]
    Corrupt {
        /// The chunk's address.
        hash: ChunkHash,
        /// Where the bad bytes are.
        path: PathBuf,
    },
    /// The caller handed over bytes that do not hash to the hash it claimed; nothing was written.
    #[error("data does not match its claimed hash: expected {expected}, it hashes to {actual}")]
    HashMismatch {
        /// The hash the caller claimed.
        expected: ChunkHash,
        /// The hash of the bytes given.
        actual: ChunkHash,
    },
    /// The chunk is not in the store.
    #[error("chunk {hash} is not in the store")]
    NotFound {
        /// The chunk asked for.
        hash: ChunkHash,
    },
    /// The caller tried to store a chunk larger than [`MAX_CHUNK_LEN`].
    #[error("chunk {hash} is {len} bytes, more than the limit of {limit}")]
    ChunkTooLarge {
        /// The chunk's claimed hash.
        hash: ChunkHash,
        /// Its length.
        len: usize,
        /// The limit, [`MAX_CHUNK_LEN`].
        limit: usize,
    },
    /// The manifest is not in the store.
    #[error("manifest {id} is not in the store")]
    ManifestNotFound {
        /// The manifest asked for.
        id: ManifestId,
    },
    /// The caller tried to store a manifest larger than [`MAX_MANIFEST_LEN`].
    #[error("manifest {id} is {len} bytes, more than the limit of {limit}")]
    ManifestTooLarge {
        /// The manifest's id.
        id: ManifestId,
        /// Its length.
        len: usize,
        /// The limit, [`MAX_MANIFEST_LEN`].
        limit: usize,
    },
    /// A file in the store is larger than any file the store writes there; it was not read.
    #[error("{} is {len} bytes, more than the limit of {limit}", path.display())]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The limit for files of its kind.
        limit: u64,
    },
    /// A service or version name is not a safe path component.
    #[error("invalid {kind} name {name:?}")]
    InvalidName {
        /// Service or version.
        kind: NameKind,
        /// The name as given.
        name: String,
        /// What is wrong with it.
        #[source]
        reason: NameError,
    },
    /// A ref file does not hold a manifest id.
    #[error("ref file {} does not hold a manifest id", path.display())]
    InvalidRef {
        /// The ref file.
        path: PathBuf,
        /// Why its content does not parse.
        #[source]
        source: ParseHashError,
    },
    /// A manifest id prefix has fewer than [`MIN_PREFIX_LEN`] hex digits.
    #[error("manifest id prefix {prefix:?} is too short: give at least {min} hex digits")]
    PrefixTooShort {
        /// The prefix as given.
        prefix: String,
        /// The minimum, [`MIN_PREFIX_LEN`].
        min: usize,
    },
    /// A manifest id prefix is not made of hex digits or is longer than a whole id.
    #[error("{prefix:?} is not a manifest id prefix: expected up to 64 hex digits")]
    InvalidPrefix {
        /// The prefix as given.
        prefix: String,
    },
    /// No stored manifest id starts with the prefix.
    #[error("no manifest id starts with {prefix}")]
    PrefixNotFound {
        /// The prefix, lower-cased.
        prefix: String,
    },
    /// Several stored manifest ids start with the prefix.
    #[error("manifest id prefix {prefix} is ambiguous: {} manifests match", candidates.len())]
    AmbiguousPrefix {
        /// The prefix, lower-cased.
        prefix: String,
        /// Every matching id, sorted.
        candidates: Vec<ManifestId>,
    },
}

/// What a [`WriteBatch::commit`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Chunks made visible by the commit.
    pub chunks: u64,
    /// Total bytes of those chunks.
    pub bytes: u64,
}

/// A handle on a store directory: chunks, manifests and refs (see the [module docs](self)).
///
/// Cloning is cheap and clones share the directory lock; the lock is released when the last
/// clone (and the last [`WriteBatch`]) is dropped.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    chunks: PathBuf,
    manifests: PathBuf,
    refs: PathBuf,
    tmp: PathBuf,
    /// Holds a shared `flock` for the handle's lifetime; closing it releases the lock.
    _lock: File,
}

impl ChunkStore {
    /// Opens the store in `dir`, creating `dir` and its subdirectories if missing.
    ///
    /// If no other handle has the store open, files left in `tmp/` by a writer that crashed are
    /// deleted. Fails with [`StoreError::Io`] naming the directory if it cannot be created or is
    /// not writable (checked by creating a probe file in `tmp/`), so a misconfigured data
    /// directory is reported at startup rather than at the first write.
    pub fn open(dir: impl AsRef<Path>) -> Result<ChunkStore, StoreError> {
        let root = dir.as_ref().to_path_buf();
        fs::create_dir_all(&root).map_err(io_err(IoOp::CreateDir, &root))?;
        let mut created = false;
        for sub in [CHUNKS_DIR, MANIFESTS_DIR, REFS_DIR, TMP_DIR] {
            created |= ensure_dir(&root.join(sub))?;
        }
        if created {
            sync_dir(&root)?;
        }

        let lock_path = root.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err(IoOp::CreateFile, &lock_path))?;
        let tmp = root.join(TMP_DIR);
        match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                // Nobody else has the store open, so whatever is in tmp/ belongs to a dead
                // writer. Clear it, then let others in.
                clear_dir(&tmp)?;
                probe_writable(&tmp)?;
                flock(&lock, &lock_path, FlockOperation::LockShared)?;
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                // Others have it open: their temporary files may be live, leave them alone.
                // Blocks only while another opener is clearing tmp/.
                flock(&lock, &lock_path, FlockOperation::LockShared)?;
                probe_writable(&tmp)?;
            }
            Err(errno) => return Err(io_err(IoOp::Lock, &lock_path)(errno.into())),
        }

        Ok(ChunkStore {
            inner: Arc::new(Inner {
                chunks: root.join(CHUNKS_DIR),
                manifests: root.join(MANIFESTS_DIR),
                refs: root.join(REFS_DIR),
                tmp,
                root,
                _lock: lock,
            }),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.root
    }

    /// Where the chunk `hash` lives (or would live): `chunks/<first 2 hex>/<64 hex>`.
    pub fn path_of(&self, hash: &ChunkHash) -> PathBuf {
        let hex = hash.to_hex();
        self.inner.chunks.join(&hex[..2]).join(hex)
    }

    /// Whether the chunk is stored. Checks existence only; [`get`](Self::get) and
    /// [`verify`](Self::verify) check the content.
    pub fn has(&self, hash: &ChunkHash) -> bool {
        self.path_of(hash).is_file()
    }

    /// Reads a chunk and checks that its bytes hash to `hash`.
    ///
    /// Fails with [`StoreError::NotFound`] if it is not stored and [`StoreError::Corrupt`] if the
    /// stored bytes do not match their address (or the file is larger than [`MAX_CHUNK_LEN`]).
    pub fn get(&self, hash: &ChunkHash) -> Result<Vec<u8>, StoreError> {
        let data = self.get_unverified(hash)?;
        if ChunkHash::of(&data) != *hash {
            return Err(StoreError::Corrupt { hash: *hash, path: self.path_of(hash) });
        }
        Ok(data)
    }

    /// Reads a chunk without hashing it, still refusing files larger than [`MAX_CHUNK_LEN`].
    fn get_unverified(&self, hash: &ChunkHash) -> Result<Vec<u8>, StoreError> {
        let path = self.path_of(hash);
        read_capped(&path, MAX_CHUNK_LEN as u64).map_err(|err| match err {
            ReadError::NotFound => StoreError::NotFound { hash: *hash },
            ReadError::TooLarge(_) => StoreError::Corrupt { hash: *hash, path: path.clone() },
            ReadError::Io(op, source) => StoreError::Io { op, path: path.clone(), source },
        })
    }

    /// Re-hashes a stored chunk without holding it in memory: `Ok(())` if its bytes match its
    /// address, [`StoreError::Corrupt`] if not, [`StoreError::NotFound`] if it is not stored.
    pub fn verify(&self, hash: &ChunkHash) -> Result<(), StoreError> {
        let path = self.path_of(hash);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound { hash: *hash });
            }
            Err(err) => return Err(io_err(IoOp::Open, &path)(err)),
        };
        let len = file.metadata().map_err(io_err(IoOp::Read, &path))?.len();
        if len > MAX_CHUNK_LEN as u64 {
            return Err(StoreError::Corrupt { hash: *hash, path });
        }
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_reader(file.take(MAX_CHUNK_LEN as u64 + 1))
            .map_err(io_err(IoOp::Read, &path))?;
        if ChunkHash::from_bytes(*hasher.finalize().as_bytes()) != *hash {
            return Err(StoreError::Corrupt { hash: *hash, path });
        }
        Ok(())
    }

    /// Stores a chunk durably. Returns `false` if it was already stored (its content is not
    /// re-checked: use [`verify`](Self::verify), then [`remove`](Self::remove) to repair).
    ///
    /// The bytes are hashed first; if they do not hash to `hash` nothing is written and the
    /// result is [`StoreError::HashMismatch`]. The chunk is written to `tmp/`, flushed, renamed
    /// into place and its shard directory flushed, so it survives a crash once this returns and
    /// is never visible half-written. For many chunks at once use [`batch`](Self::batch).
    pub fn put(&self, hash: &ChunkHash, data: &[u8]) -> Result<bool, StoreError> {
        check_chunk(hash, data)?;
        if self.has(hash) {
            return Ok(false);
        }
        let shard = self.shard_dir(hash);
        if ensure_dir(&shard)? {
            sync_dir(&self.inner.chunks)?;
        }
        self.write_atomic(data, IMMUTABLE_MODE, &self.path_of(hash), &shard)?;
        Ok(true)
    }

    /// Removes a chunk. Returns `false` if it was not stored.
    ///
    /// The removal is not flushed: after a crash the chunk may reappear, which is harmless since
    /// its content is still valid (or still detectably corrupt).
    pub fn remove(&self, hash: &ChunkHash) -> Result<bool, StoreError> {
        Ok(remove_file(&self.path_of(hash))?)
    }

    /// Starts a batch of chunk writes, made durable together by [`WriteBatch::commit`].
    pub fn batch(&self) -> WriteBatch {
        WriteBatch { store: self.clone(), pending: HashMap::new(), bytes: 0 }
    }

    /// Iterates over the hashes of all stored chunks, lazily, in directory order.
    ///
    /// Files that do not follow the layout (wrong name, wrong shard) are skipped.
    pub fn iter(&self) -> ChunkIter {
        ChunkIter {
            chunks_dir: self.inner.chunks.clone(),
            shards: None,
            current: None,
            done: false,
        }
    }

    /// Counts the stored chunks by listing the shard directories (not cached: one directory scan).
    pub fn len(&self) -> Result<usize, StoreError> {
        self.iter().try_fold(0, |n, hash| hash.map(|_| n + 1))
    }

    /// Whether no chunk is stored.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        self.iter().next().transpose().map(|first| first.is_none())
    }

    /// Stores the raw bytes of a signed manifest under its id, atomically and durably, replacing
    /// any previous bytes for the same id (a manifest that gained a signature keeps its id).
    ///
    /// The bytes are not decoded: the caller must have checked that `id` is the id of the
    /// manifest they encode.
    pub fn put_manifest(&self, id: &ManifestId, bytes: &[u8]) -> Result<(), StoreError> {
        if bytes.len() > MAX_MANIFEST_LEN {
            return Err(StoreError::ManifestTooLarge {
                id: *id,
                len: bytes.len(),
                limit: MAX_MANIFEST_LEN,
            });
        }
        self.write_atomic(bytes, IMMUTABLE_MODE, &self.manifest_path(id), &self.inner.manifests)
    }

    /// Reads the raw bytes stored for a manifest.
    ///
    /// The store does not decode them: the caller must decode, check that they encode the
    /// manifest `id` names, and check the signatures. A file larger than [`MAX_MANIFEST_LEN`] is
    /// refused with [`StoreError::FileTooLarge`] before anything is allocated.
    pub fn get_manifest(&self, id: &ManifestId) -> Result<Vec<u8>, StoreError> {
        let path = self.manifest_path(id);
        read_capped(&path, MAX_MANIFEST_LEN as u64).map_err(|err| match err {
            ReadError::NotFound => StoreError::ManifestNotFound { id: *id },
            ReadError::TooLarge(len) => {
                StoreError::FileTooLarge { path: path.clone(), len, limit: MAX_MANIFEST_LEN as u64 }
            }
            ReadError::Io(op, source) => StoreError::Io { op, path: path.clone(), source },
        })
    }

    /// Whether a manifest is stored.
    pub fn has_manifest(&self, id: &ManifestId) -> bool {
        self.manifest_path(id).is_file()
    }

    /// Removes a manifest. Returns `false` if it was not stored. Refs naming it are left alone.
    pub fn remove_manifest(&self, id: &ManifestId) -> Result<bool, StoreError> {
        Ok(remove_file(&self.manifest_path(id))?)
    }

    /// Ids of all stored manifests, sorted. Files that are not named by an id are skipped.
    pub fn list_manifests(&self) -> Result<Vec<ManifestId>, StoreError> {
        let dir = &self.inner.manifests;
        let mut ids = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(IoOp::ListDir, dir))? {
            let entry = entry.map_err(io_err(IoOp::ListDir, dir))?;
            if let Some(id) = entry.file_name().to_str().and_then(parse_lower_hex::<ManifestId>) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Finds the one stored manifest whose id starts with `prefix` (at least [`MIN_PREFIX_LEN`]
    /// hex digits, any case), so operators can type short ids.
    ///
    /// Fails with [`StoreError::PrefixTooShort`], [`StoreError::InvalidPrefix`],
    /// [`StoreError::PrefixNotFound`] or [`StoreError::AmbiguousPrefix`] (listing the matches).
    pub fn resolve_manifest_prefix(&self, prefix: &str) -> Result<ManifestId, StoreError> {
        if prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::InvalidPrefix { prefix: prefix.to_owned() });
        }
        if prefix.len() < MIN_PREFIX_LEN {
            return Err(StoreError::PrefixTooShort {
                prefix: prefix.to_owned(),
                min: MIN_PREFIX_LEN,
            });
        }
        let prefix = prefix.to_ascii_lowercase();
        let mut candidates: Vec<ManifestId> = self
            .list_manifests()?
            .into_iter()
            .filter(|id| id.to_hex().starts_with(&prefix))
            .collect();
        match candidates.len() {
            0 => Err(StoreError::PrefixNotFound { prefix }),
            1 => Ok(candidates.remove(0)),
            _ => Err(StoreError::AmbiguousPrefix { prefix, candidates }),
        }
    }

    /// Points the ref `service`/`version` at a manifest, atomically and durably, replacing any
    /// previous target.
    ///
    /// Names must be 1 to [`MAX_NAME_LEN`] characters from `[A-Za-z0-9._+-]` and must not start
    /// with `.`; anything else is [`StoreError::InvalidName`]. The manifest need not be stored.
    pub fn set_ref(&self, service: &str, version: &str, id: &ManifestId) -> Result<(), StoreError> {
        let path = self.ref_path(service, version)?;
        let service_dir = self.inner.refs.join(service);
        if ensure_dir(&service_dir)? {
            sync_dir(&self.inner.refs)?;
        }
        let content = format!("{}\n", id.to_hex());
        self.write_atomic(content.as_bytes(), REF_MODE, &path, &service_dir)
    }

    /// The manifest the ref `service`/`version` points at, or `None` if there is no such ref.
    ///
    /// A ref file that does not hold a manifest id is [`StoreError::InvalidRef`] naming the file.
    pub fn resolve_ref(
        &self,
        service: &str,
        version: &str,
    ) -> Result<Option<ManifestId>, StoreError> {
        let path = self.ref_path(service, version)?;
        read_ref(&path)
    }

    /// Removes the ref `service`/`version`. Returns `false` if there was no such ref.
    pub fn remove_ref(&self, service: &str, version: &str) -> Result<bool, StoreError> {
        Ok(remove_file(&self.ref_path(service, version)?)?)
    }

    /// All refs as `(service, version, manifest id)`, sorted by service, then version, both as
    /// plain strings (so `1.10` sorts before `1.9`).
    ///
    /// Entries whose names are not valid service or version names are skipped; a ref file that
    /// does not parse fails the whole listing with [`StoreError::InvalidRef`].
    pub fn list_refs(&self) -> Result<Vec<(String, String, ManifestId)>, StoreError> {
        let refs_dir = &self.inner.refs;
        let mut refs = Vec::new();
        for service in fs::read_dir(refs_dir).map_err(io_err(IoOp::ListDir, refs_dir))? {
            let service = service.map_err(io_err(IoOp::ListDir, refs_dir))?;
            let Some(service_name) = valid_entry_name(&service, NameKind::Service) else {
                continue;
            };
            let service_dir = service.path();
            if !service_dir.is_dir() {
                continue;
            }
            for version in
                fs::read_dir(&service_dir).map_err(io_err(IoOp::ListDir, &service_dir))?
            {
                let version = version.map_err(io_err(IoOp::ListDir, &service_dir))?;
                let Some(version_name) = valid_entry_name(&version, NameKind::Version) else {
                    continue;
                };
                if let Some(id) = read_ref(&version.path())? {
                    refs.push((service_name.clone(), version_name, id));
                }
            }
        }
        refs.sort_unstable();
        Ok(refs)
    }

    fn shard_dir(&self, hash: &ChunkHash) -> PathBuf {
        self.inner.chunks.join(&hash.to_hex()[..2])
    }

    fn manifest_path(&self, id: &ManifestId) -> PathBuf {
        self.inner.manifests.join(id.to_hex())
    }

    fn ref_path(&self, service: &str, version: &str) -> Result<PathBuf, StoreError> {
        validate_name(NameKind::Service, service)?;
        validate_name(NameKind::Version, version)?;
        Ok(self.inner.refs.join(service).join(version))
    }

    /// A new empty file in `tmp/`, deleted when dropped unless persisted.
    fn temp_file(&self, mode: u32) -> Result<NamedTempFile, StoreError> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("w-");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(fs::Permissions::from_mode(mode));
        }
        #[cfg(not(unix))]
        let _ = mode;
        builder.tempfile_in(&self.inner.tmp).map_err(io_err(IoOp::CreateFile, &self.inner.tmp))
    }

    /// Writes `bytes` to `dest` so that a crash leaves either the old file or the new one: temp
    /// file, flush, rename, flush of `dest_dir` (the directory holding `dest`).
    fn write_atomic(
        &self,
        bytes: &[u8],
        mode: u32,
        dest: &Path,
        dest_dir: &Path,
    ) -> Result<(), StoreError> {
        let mut temp = self.temp_file(mode)?;
        temp.write_all(bytes).map_err(io_err(IoOp::Write, temp.path()))?;
        temp.as_file().sync_data().map_err(io_err(IoOp::Sync, temp.path()))?;
        temp.persist(dest).map_err(|err| io_err(IoOp::Rename, dest)(err.error))?;
        Ok(sync_dir(dest_dir)?)
    }

    /// Flushes the data of every file in `temps` to disk.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn sync_data_of(&self, _temps: &[(ChunkHash, TempPath)]) -> Result<(), StoreError> {
        // One syncfs(2) flushes everything on the filesystem, however many files: far cheaper
        // than an fsync per chunk. (Before Linux 5.8 it does not report writeback errors.)
        let root = &self.inner.root;
        let dir = File::open(root).map_err(io_err(IoOp::Open, root))?;
        rustix::fs::syncfs(&dir).map_err(|errno| io_err(IoOp::Sync, root)(errno.into()))
    }

    /// Flushes the data of every file in `temps` to disk.
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn sync_data_of(&self, temps: &[(ChunkHash, TempPath)]) -> Result<(), StoreError> {
        for (_, temp) in temps {
            let path: &Path = temp;
            let file = File::open(path).map_err(io_err(IoOp::Open, path))?;
            file.sync_data().map_err(io_err(IoOp::Sync, path))?;
        }
        Ok(())
    }
}

/// Chunk writes that become durable together.
///
/// Each [`put`](Self::put) writes the chunk to a temporary file in `tmp/` without flushing it, so
/// nothing is visible yet. [`commit`](Self::commit) flushes the whole filesystem once, renames
/// every chunk into place and flushes each touched shard directory once: durability for tens of
/// thousands of chunks at the cost of a handful of syncs. Dropping a batch without committing it
/// deletes its temporary files; if the process dies instead, the next [`ChunkStore::open`] does.
///
/// Temporary files are closed as soon as they are written, so a batch holds no file descriptors.
#[derive(Debug)]
pub struct WriteBatch {
    store: ChunkStore,
    pending: HashMap<ChunkHash, TempPath>,
    bytes: u64,
}

impl WriteBatch {
    /// Adds a chunk after checking that `data` hashes to `hash` ([`StoreError::HashMismatch`]
    /// otherwise). Returns `false`, writing nothing, if the chunk is already stored or already in
    /// this batch.
    pub fn put(&mut self, hash: &ChunkHash, data: &[u8]) -> Result<bool, StoreError> {
        check_chunk(hash, data)?;
        self.insert(*hash, data)
    }

    /// Adds a chunk whose hash the caller has just computed from `data` itself, skipping the
    /// second hash (a publisher that chunks and hashes an artifact needs no re-check).
    ///
    /// Never pass a hash that came from elsewhere (a peer, a manifest): use [`put`](Self::put).
    /// A wrong hash here stores bytes under the wrong address, which [`ChunkStore::get`] later
    /// reports as [`StoreError::Corrupt`]. Debug builds assert that the hash matches.
    pub fn put_prehashed(&mut self, hash: ChunkHash, data: &[u8]) -> Result<bool, StoreError> {
        debug_assert_eq!(ChunkHash::of(data), hash, "put_prehashed given a wrong hash");
        if data.len() > MAX_CHUNK_LEN {
            return Err(StoreError::ChunkTooLarge { hash, len: data.len(), limit: MAX_CHUNK_LEN });
        }
        self.insert(hash, data)
    }

    /// Number of chunks written to this batch and not yet committed.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether the batch holds no chunk.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Makes every chunk of the batch durable and visible: one `syncfs(2)` of the store's
    /// filesystem, a rename per chunk, one flush per touched shard directory.
    ///
    /// If it fails part-way, chunks already renamed stay visible (each is complete and flushed)
    /// and the temporary files of the others are deleted.
    pub fn commit(mut self) -> Result<BatchStats, StoreError> {
        let stats = BatchStats { chunks: self.pending.len() as u64, bytes: self.bytes };
        if self.pending.is_empty() {
            return Ok(stats);
        }
        let mut temps: Vec<(ChunkHash, TempPath)> = self.pending.drain().collect();
        // Sorting by hash groups chunks by shard directory.
        temps.sort_unstable_by_key(|(hash, _)| *hash);
        let store = &self.store;
        store.sync_data_of(&temps)?;

        let mut shards = BTreeSet::new();
        let mut created_shard = false;
        for (hash, temp) in temps {
            let shard = store.shard_dir(&hash);
            if !shards.contains(&shard) {
                created_shard |= ensure_dir(&shard)?;
                shards.insert(shard);
            }
            let dest = store.path_of(&hash);
            temp.persist(&dest).map_err(|err| io_err(IoOp::Rename, &dest)(err.error))?;
        }
        for shard in &shards {
            sync_dir(shard)?;
        }
        if created_shard {
            sync_dir(&store.inner.chunks)?;
        }
        Ok(stats)
    }

    fn insert(&mut self, hash: ChunkHash, data: &[u8]) -> Result<bool, StoreError> {
        if self.pending.contains_key(&hash) || self.store.has(&hash) {
            return Ok(false);
        }
        let mut temp = self.store.temp_file(IMMUTABLE_MODE)?;
        temp.write_all(data).map_err(io_err(IoOp::Write, temp.path()))?;
        // Close the file now: a batch may hold tens of thousands of chunks.
        self.pending.insert(hash, temp.into_temp_path());
        self.bytes += data.len() as u64;
        Ok(true)
    }
}

/// Lazy iterator over the hashes of stored chunks, from [`ChunkStore::iter`].
///
/// Yields an error for a directory that cannot be listed and then carries on with the next one.
#[derive(Debug)]
pub struct ChunkIter {
    chunks_dir: PathBuf,
    shards: Option<fs::ReadDir>,
    /// The shard being listed: its two-digit name, its path and its entries.
    current: Option<(String, PathBuf, fs::ReadDir)>,
    done: bool,
}

impl Iterator for ChunkIter {
    type Item = Result<ChunkHash, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((shard_name, shard_path, entries)) = &mut self.current {
                match entries.next() {
                    Some(Ok(entry)) => {
                        let name = entry.file_name();
                        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
                        let hash = name
                            .to_str()
                            .filter(|name| name.starts_with(shard_name.as_str()))
                            .and_then(parse_lower_hex::<ChunkHash>);
                        match hash {
                            Some(hash) if is_file => return Some(Ok(hash)),
                            _ => continue,
                        }
                    }
                    Some(Err(err)) => {
                        let path = shard_path.clone();
                        self.current = None;
                        return Some(Err(io_err(IoOp::ListDir, path)(err)));
                    }
                    None => self.current = None,
                }
            }
            if self.done {
                return None;
            }
            let shards = match &mut self.shards {
                Some(shards) => shards,
                None => match fs::read_dir(&self.chunks_dir) {
                    Ok(shards) => self.shards.insert(shards),
                    Err(err) => {
                        self.done = true;
                        return Some(Err(io_err(IoOp::ListDir, &self.chunks_dir)(err)));
                    }
                },
            };
            match shards.next() {
                None => {
                    self.done = true;
                    self.shards = None;
                    return None;
                }
                Some(Err(err)) => {
                    self.done = true;
                    return Some(Err(io_err(IoOp::ListDir, &self.chunks_dir)(err)));
                }
                Some(Ok(entry)) => {
                    let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                        continue;
                    };
                    if name.len() != 2 || !is_lower_hex(&name) {
                        continue;
                    }
                    if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                        continue;
                    }
                    let path = entry.path();
                    match fs::read_dir(&path) {
                        Ok(entries) => self.current = Some((name, path, entries)),
                        Err(err) => return Some(Err(io_err(IoOp::ListDir, path)(err))),
                    }
                }
            }
        }
    }
}

/// Checks a chunk's size and that its bytes hash to `hash`.
fn check_chunk(hash: &ChunkHash, data: &[u8]) -> Result<(), StoreError> {
    if data.len() > MAX_CHUNK_LEN {
        return Err(StoreError::ChunkTooLarge {
            hash: *hash,
            len: data.len(),
            limit: MAX_CHUNK_LEN,
        });
    }
    let actual = ChunkHash::of(data);
    if actual != *hash {
        return Err(StoreError::HashMismatch { expected: *hash, actual });
    }
    Ok(())
}

/// Checks that `name` is a safe single path component for a ref.
fn validate_name(kind: NameKind, name: &str) -> Result<(), StoreError> {
    let reason = if name.is_empty() {
        Some(NameError::Empty)
    } else if name.len() > MAX_NAME_LEN {
        Some(NameError::TooLong { len: name.len(), max: MAX_NAME_LEN })
    } else if name.starts_with('.') {
        Some(NameError::LeadingDot)
    } else {
        name.chars()
            .find(|&ch| !(ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '+' | '-')))
            .map(|ch| NameError::BadChar { ch })
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(StoreError::InvalidName { kind, name: name.to_owned(), reason }),
    }
}

/// The entry's name if it is a valid name of the given kind.
fn valid_entry_name(entry: &fs::DirEntry, kind: NameKind) -> Option<String> {
    let name = entry.file_name().into_string().ok()?;
    validate_name(kind, &name).is_ok().then_some(name)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Parses a file name that must be exactly the lower-case hex form of a digest.
fn parse_lower_hex<T: std::str::FromStr>(name: &str) -> Option<T> {
    if name.len() != 64 || !is_lower_hex(name) {
        return None;
    }
    name.parse().ok()
}

/// Reads a ref file: `Ok(None)` if it does not exist.
fn read_ref(path: &Path) -> Result<Option<ManifestId>, StoreError> {
    let bytes = match read_capped(path, MAX_REF_FILE_LEN) {
        Ok(bytes) => bytes,
        Err(ReadError::NotFound) => return Ok(None),
        Err(ReadError::TooLarge(len)) => {
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            let source = ParseHashError::Length { len };
            return Err(StoreError::InvalidRef { path: path.to_owned(), source });
        }
        Err(ReadError::Io(op, source)) => {
            return Err(StoreError::Io { op, path: path.to_owned(), source });
        }
    };
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| StoreError::InvalidRef {
            path: path.to_owned(),
            source: ParseHashError::NotHex,
        })?
        .trim();
    text.parse()
        .map(Some)
        .map_err(|source| StoreError::InvalidRef { path: path.to_owned(), source })
}

/// Why [`read_capped`] failed, before the caller attaches its own context.
enum ReadError {
    NotFound,
    TooLarge(u64),
    Io(IoOp, io::Error),
}

/// Reads a whole file of at most `limit` bytes, checking the size before allocating.
fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Err(ReadError::NotFound),
        Err(err) => return Err(ReadError::Io(IoOp::Open, err)),
    };
    let len = file.metadata().map_err(|err| ReadError::Io(IoOp::Read, err))?.len();
    if len > limit {
        return Err(ReadError::TooLarge(len));
    }
    // `len <= limit`, a small constant, so the cast is lossless.
    let mut buf = Vec::with_capacity(len as usize);
    // The file may grow after the check: never read more than one byte past the limit.
    file.take(limit + 1).read_to_end(&mut buf).map_err(|err| ReadError::Io(IoOp::Read, err))?;
    if buf.len() as u64 > limit {
        return Err(ReadError::TooLarge(buf.len() as u64));
    }
    Ok(buf)
}

/// Deletes everything inside `dir`.
fn clear_dir(dir: &Path) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).map_err(io_err(IoOp::ListDir, dir))? {
        let entry = entry.map_err(io_err(IoOp::ListDir, dir))?;
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let removed = if is_dir { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        match removed {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_err(IoOp::Remove, &path)(err)),
        }
    }
    Ok(())
}

/// Fails if no file can be created in `dir`; the probe file is deleted at once.
fn probe_writable(dir: &Path) -> Result<(), StoreError> {
    tempfile::Builder::new()
        .prefix("probe-")
        .tempfile_in(dir)
        .map(drop)
        .map_err(io_err(IoOp::CreateFile, dir))
}

fn flock(lock: &File, path: &Path, op: FlockOperation) -> Result<(), StoreError> {
    rustix::fs::flock(lock, op).map_err(|errno| io_err(IoOp::Lock, path)(errno.into()))
}

impl From<IoFailure> for StoreError {
    fn from(f: IoFailure) -> Self {
        StoreError::Io { op: f.op, path: f.path, source: f.source }
    }
}

/// Builds the mapper from an `io::Error` to [`StoreError::Io`] for `op` on `path`.
fn io_err(op: IoOp, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.as_ref().to_path_buf();
    move |source| StoreError::Io { op, path, source }
}
