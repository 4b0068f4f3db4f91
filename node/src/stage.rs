//! The host-side store of artifacts being staged and of staged releases.
//!
//! A host told to stage a manifest fetches its chunks from wherever the swarm scheduler
//! ([`crate::swarm`]) finds them, writes each one into place as it arrives, and, once all are in,
//! checks the whole artifact and unpacks it into a release directory. This module owns the disk
//! side of that; the scheduler and the network stay elsewhere. Layout under the data directory:
//!
//! ```text
//! <data>/artifacts/<manifest id hex>       the artifact stream, chunks written at their offsets
//! <data>/releases/<service>/<version>/     the unpacked release (see "Releases" below)
//! <data>/state/                            sled database: manifests, progress, status, actives
//! ```
//!
//! # Use
//!
//! The daemon's swarm shell drives one [`StageJob`] per manifest beside its
//! [`crate::swarm::Scheduler`]:
//!
//! 1. [`StageArea::begin`] checks the signature and returns the job; [`StageJob::local`] is the
//!    scheduler's `local` bitfield (chunks already on disk, never requested).
//! 2. For each piece the shell hashes the bytes, compares with the manifest and tells the
//!    scheduler; on [`crate::swarm::PieceAction::Write`] it calls
//!    [`StageJob::write_verified_chunk`] with the hash it computed.
//! 3. Every few milliseconds or megabytes it calls [`StageJob::sync`] and reports each returned
//!    index with [`crate::swarm::Scheduler::handle_written`]; the scheduler announces them.
//! 4. Peers' requests are served with [`StageJob::read_chunk`] (or, for any artifact on the
//!    host, [`StageArea::read_chunk`] and [`StageArea::read_chunk_by_hash`]).
//! 5. On [`crate::swarm::Command::Complete`], [`StageJob::finish`] verifies and unpacks.
//!
//! # Why the artifact file is kept
//!
//! The artifact file is preallocated to the manifest's size and every chunk is written at its
//! offset (`pwrite`), so chunks may arrive in any order and the finished file *is* the stream:
//! no reassembly pass. It is kept after staging, for two reasons: the host serves the chunks to
//! peers that are still staging (by manifest and index, or by hash), and the next version of the
//! service is deduplicated against it ([`StageArea::begin`] copies every chunk it can find in
//! artifacts already on this host, verifying each copy, instead of fetching it). It is removed
//! with its release by garbage collection.
//!
//! # Crash consistency
//!
//! The state database records, per manifest, the signed manifest, its status
//! ([`StageStatus`]), and which chunks are *durable*: verified against the manifest **and**
//! flushed to disk. A restart, even after `kill -9` or a power cut, resumes with exactly those
//! chunks and fetches only the rest. The invariant is that a chunk is never recorded durable
//! unless its bytes are; hence the order in [`StageJob::sync`]:
//!
//! 1. chunk bytes are written into the artifact file (page cache only) by
//!    [`StageJob::write_chunk`] and kept in a pending set in memory;
//! 2. one `fdatasync` of the artifact file makes every pending chunk's bytes durable;
//! 3. only then are they recorded in sled, in one atomic batch, and sled is flushed;
//! 4. only then does the shell tell the scheduler ([`crate::swarm::Scheduler::handle_written`]),
//!    which announces them to peers.
//!
//! A crash before 2 or between 2 and 3 loses the pending chunks (they are fetched again); a
//! crash after 3 loses nothing. Peers are never offered a chunk this host could lose.
//!
//! Flushing every chunk on its own would cost two `fsync`s per 64 KiB chunk; instead the shell
//! calls [`StageJob::sync`] for a group of chunks at once (group commit: every few milliseconds
//! or every few megabytes, its choice), which bounds both the re-fetch after a crash and the
//! delay before a chunk is announced.
//!
//! Unpacking follows the same rule: the claim on `releases/<service>/<version>` is recorded
//! before the tree is unpacked (unpacking itself writes into a temporary directory and renames
//! it into place), and "staged" only after; so a directory found there after a crash is known
//! to be complete and ours. Removal goes the other way: garbage collection deletes the sled
//! entries first and the files after, and [`StageArea::open`] deletes files no entry accounts
//! for.
//!
//! # Releases
//!
//! A tree artifact ([`ArtifactKind::Tree`]) is unpacked into `releases/<service>/<version>/` by
//! [`fleetwave_chunker::unpack::unpack`], which refuses anything unsafe. A single-file artifact
//! ([`ArtifactKind::File`]) becomes `releases/<service>/<version>/<service>`, mode 0755: a
//! release is always a directory (so `current/<service>` always points at a directory and
//! hooks and config can sit beside it), the file is named after the service because the
//! manifest records no file name, and it is executable because a single-file artifact is
//! almost always a binary (the stream does not carry modes).
//!
//! # Garbage collection
//!
//! After each staged release (and on [`StageArea::gc`]), per service, the last `keep_releases`
//! staged releases are kept, by the order in which they were staged (not by version string,
//! which has no reliable order), so that rolling back is a symlink switch; also kept: the
//! active release of each service ([`StageArea::set_active`]) and everything still staging.
//! Failed manifests are removed.
//!
//! # Concurrency
//!
//! A [`StageArea`] is cheap to clone and may be shared between threads. One [`StageJob`] at a
//! time may exist per manifest ([`StageError::Busy`] otherwise). The state database allows one
//! process at a time; a second [`StageArea::open`] of the same directory fails.

mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex, MutexGuard};

use fleetwave_chunker::manifest::{ManifestError, validate_name};
use fleetwave_chunker::sign::SignatureError;
use fleetwave_chunker::unpack::{Refusal, UnpackError, unpack};
use fleetwave_chunker::{
    ArtifactKind, Blake3Digest, ChunkHash, ChunkInfo, Manifest, ManifestId, Sha256Digest,
    SignedManifest, TrustedKeys,
};

use crate::fsio::{IoFailure, ensure_dir, remove_file, sync_dir};
use crate::store::IoOp;
use crate::swarm::{Bitfield, ChunkIndex, Tally};
use state::{DurableChunk, Record};

const ARTIFACTS_DIR: &str = "artifacts";
const RELEASES_DIR: &str = "releases";
const STATE_DIR: &str = "state";

/// Bytes read at a time when checking a whole artifact. Large enough that per-read overhead
/// vanishes, small enough that the queue to the SHA-256 thread stays a few megabytes.
const VERIFY_BLOCK: usize = 1 << 20;

/// Blocks that may wait for the SHA-256 thread before the reader blocks.
const VERIFY_QUEUE: usize = 4;

/// sled's page cache. The state is small (about 120 bytes per durable chunk), so the default of
/// 1 GiB would only be a ceiling nobody reaches; a host should not reserve it either way.
const STATE_CACHE_BYTES: u64 = 64 << 20;

/// Mode of a single-file release (see the module docs).
const FILE_RELEASE_MODE: u32 = 0o755;

/// Where a staged manifest is in its life on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StageStatus {
    /// Chunks are being fetched (or the job was interrupted and will resume).
    Staging,
    /// Verified and unpacked into its release directory: ready to activate.
    Staged,
    /// The whole artifact failed its check, or its tree was refused by the unpacker. Beginning
    /// again resets it to [`StageStatus::Staging`], keeping the chunks that still verify.
    Failed {
        /// What went wrong.
        reason: FailReason,
    },
}

/// Why staging a manifest failed for good (until it is begun again).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailReason {
    /// The artifact does not match the manifest's size or whole-stream digests.
    Whole(WholeCheck),
    /// The unpacker refused an entry of the tree.
    Refused {
        /// The entry's path as written in the stream.
        entry: PathBuf,
        /// Why.
        reason: Refusal,
    },
    /// The stream is not a valid packed tree.
    Malformed,
}

/// Which whole-artifact check failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WholeCheck {
    /// The file's length.
    Size {
        /// The manifest's size.
        expected: u64,
        /// The file's length.
        actual: u64,
    },
    /// The SHA-256 of the whole stream.
    Sha256 {
        /// The manifest's digest.
        expected: Sha256Digest,
        /// The file's digest.
        actual: Sha256Digest,
    },
    /// The BLAKE3 of the whole stream.
    Blake3 {
        /// The manifest's digest.
        expected: Blake3Digest,
        /// The file's digest.
        actual: Blake3Digest,
    },
}

/// How a received chunk differs from what the manifest says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkFault {
    /// Wrong length (the bytes were not hashed).
    Length {
        /// The manifest's length.
        expected: u32,
        /// The length received.
        actual: usize,
    },
    /// Right length, wrong BLAKE3.
    Hash {
        /// The manifest's hash.
        expected: ChunkHash,
        /// The hash of the bytes received.
        actual: ChunkHash,
    },
}

/// Errors of the stage area.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// An I/O operation on `path` failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What the stage area was doing.
        op: IoOp,
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The state database failed (includes: another process or handle has it open).
    #[error("state database {}", path.display())]
    State {
        /// The database directory.
        path: PathBuf,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// An entry of the state database does not decode.
    #[error("state database {}: entry {key} is corrupt: {what}", path.display())]
    CorruptState {
        /// The database directory.
        path: PathBuf,
        /// The entry's key, in hex.
        key: String,
        /// What is wrong with it.
        what: &'static str,
    },
    /// [`StageArea::open`] was asked to keep no releases, which would remove every release as
    /// soon as it is staged.
    #[error("keep_releases must be at least 1")]
    ZeroKeep,
    /// The manifest is not signed by a trusted key (or a trusted signature does not verify).
    /// Nothing was written.
    #[error("manifest {id} is refused")]
    Untrusted {
        /// The manifest.
        id: ManifestId,
        /// Why the signatures were refused.
        #[source]
        source: SignatureError,
    },
    /// The manifest breaks an invariant the store relies on. Nothing was written.
    #[error("manifest {id} is invalid")]
    InvalidManifest {
        /// The manifest.
        id: ManifestId,
        /// What is wrong.
        #[source]
        source: ManifestError,
    },
    /// A job for this manifest exists already.
    #[error("manifest {id} is already being staged")]
    Busy {
        /// The manifest.
        id: ManifestId,
    },
    /// The manifest is not known here.
    #[error("manifest {id} is not staged or being staged here")]
    UnknownManifest {
        /// The manifest.
        id: ManifestId,
    },
    /// Flushing the artifact file failed. The chunks written since the last sync are dropped
    /// from the pending set: after a failed `fsync` the kernel may have discarded their dirty
    /// pages and a retry could then report success without them, so they must be written again
    /// (the shell reports each to [`crate::swarm::Scheduler::handle_write_failed`]).
    #[error("cannot sync {}; {} written chunks are lost", path.display(), lost.len())]
    SyncFailed {
        /// The artifact file.
        path: PathBuf,
        /// The chunks that were pending, in index order.
        lost: Vec<ChunkIndex>,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Received chunk bytes do not match the manifest; nothing was written. The swarm shell
    /// reports this as [`crate::swarm::PieceOutcome::HashMismatch`].
    #[error("chunk {index} of manifest {id} does not match the manifest: {fault}")]
    ChunkMismatch {
        /// The manifest.
        id: ManifestId,
        /// The chunk.
        index: ChunkIndex,
        /// How it differs.
        fault: ChunkFault,
    },
    /// A chunk index past the end of the manifest's chunk list.
    #[error("chunk index {index} out of range: manifest {id} has {chunks} chunks")]
    IndexOutOfRange {
        /// The manifest.
        id: ManifestId,
        /// The index given.
        index: ChunkIndex,
        /// The manifest's chunk count.
        chunks: u32,
    },
    /// The chunk is not durable on this host, so it is not served.
    #[error("chunk {index} of manifest {id} is not durable here")]
    NotDurable {
        /// The manifest.
        id: ManifestId,
        /// The chunk.
        index: ChunkIndex,
    },
    /// No durable copy of a chunk with this hash is on this host.
    #[error("no copy of chunk {hash} here")]
    ChunkNotFound {
        /// The chunk's hash.
        hash: ChunkHash,
    },
    /// A durable chunk's bytes on disk no longer hash to its address (bit rot, or something
    /// wrote to the artifact file behind the store's back).
    #[error("chunk {index} of manifest {id} in {} is corrupt", path.display())]
    Corrupt {
        /// The manifest.
        id: ManifestId,
        /// The chunk.
        index: ChunkIndex,
        /// The artifact file.
        path: PathBuf,
    },
    /// [`StageJob::finish`] with chunks not yet durable (written but not synced counts as
    /// missing).
    #[error("manifest {id} is missing {missing} of its {chunks} chunks")]
    Incomplete {
        /// The manifest.
        id: ManifestId,
        /// Chunks not durable.
        missing: u32,
        /// All chunks.
        chunks: u32,
    },
    /// The assembled artifact fails its whole-stream check. The manifest's status is now
    /// [`StageStatus::Failed`]; the chunks that no longer verify are forgotten, so beginning
    /// again fetches just those.
    #[error(
        "artifact {} of manifest {id} fails its whole-artifact check ({check}); \
         {bad_chunks} chunks no longer verify",
        path.display()
    )]
    WholeMismatch {
        /// The manifest.
        id: ManifestId,
        /// The artifact file.
        path: PathBuf,
        /// Which check failed (boxed: it holds two digests, and errors travel by value).
        check: Box<WholeCheck>,
        /// Chunks whose bytes no longer match their hash (forgotten).
        bad_chunks: u32,
    },
    /// Unpacking the verified artifact failed. If the unpacker refused the tree, the status is
    /// now [`StageStatus::Failed`]; an I/O failure leaves it staging, to be retried.
    #[error("cannot unpack manifest {id} into {}", dest.display())]
    Unpack {
        /// The manifest.
        id: ManifestId,
        /// The release directory.
        dest: PathBuf,
        /// The unpacker's error.
        #[source]
        source: UnpackError,
    },
    /// The release directory exists and was not unpacked by this manifest (another manifest
    /// with the same service and version holds it).
    #[error("{} already holds a release that manifest {id} did not stage", path.display())]
    ReleaseConflict {
        /// The manifest being finished.
        id: ManifestId,
        /// The release directory.
        path: PathBuf,
    },
    /// Only staged releases can be activated.
    #[error("manifest {id} is not staged")]
    NotStaged {
        /// The manifest.
        id: ManifestId,
    },
    /// The manifest belongs to another service.
    #[error("manifest {id} is a release of {actual}, not of {service}")]
    WrongService {
        /// The manifest.
        id: ManifestId,
        /// The service it was to be activated for.
        service: String,
        /// Its own service.
        actual: String,
    },
    /// Not a valid service name.
    #[error("invalid service name {name:?}: {reason}")]
    InvalidService {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The active release of a service cannot be removed.
    #[error("manifest {id} is the active release of its service")]
    Active {
        /// The manifest.
        id: ManifestId,
    },
}

/// Chunks a new job found already on this host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FromDisk {
    /// Recorded durable by an earlier run of this manifest (a resumed download).
    pub resumed: Tally,
    /// Copied, and verified, from the artifacts of other manifests (deduplication), or from
    /// another position of the same artifact holding the same bytes.
    pub copied: Tally,
}

impl FromDisk {
    /// Both together: what the scheduler gets as `local`.
    pub fn total(&self) -> Tally {
        Tally {
            chunks: self.resumed.chunks + self.copied.chunks,
            bytes: self.resumed.bytes + self.copied.bytes,
        }
    }
}

/// A staged release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// The manifest it was staged from.
    pub id: ManifestId,
    /// Service name.
    pub service: String,
    /// Version name.
    pub version: String,
    /// File or tree.
    pub kind: ArtifactKind,
    /// `releases/<service>/<version>` under the data directory.
    pub path: PathBuf,
}

/// What [`StageJob::finish`] did.
#[derive(Debug)]
pub struct Finished {
    /// The release, staged.
    pub release: Release,
    /// The garbage collection that followed. The release is staged whatever this says; a
    /// failed collection is retried at the next one.
    pub gc: Result<GcStats, StageError>,
}

/// What garbage collection removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Manifests whose artifact, release and state were removed, in id order.
    pub removed: Vec<ManifestId>,
    /// Bytes of artifact files deleted (release trees not counted).
    pub artifact_bytes: u64,
}

/// One manifest known to the stage area, for `fleetwave node status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageEntry {
    /// The manifest.
    pub id: ManifestId,
    /// Service name.
    pub service: String,
    /// Version name.
    pub version: String,
    /// File or tree.
    pub kind: ArtifactKind,
    /// Staging, staged or failed.
    pub status: StageStatus,
    /// Durable chunks (and their bytes).
    pub done: Tally,
    /// All chunks (and the artifact size).
    pub total: Tally,
    /// Whether it is its service's active release.
    pub active: bool,
    /// The release directory, once staged.
    pub release: Option<PathBuf>,
}

/// The host's stage area: artifacts, releases and their state (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct StageArea {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    artifacts: PathBuf,
    releases: PathBuf,
    state_path: PathBuf,
    db: sled::Db,
    keep_releases: usize,
    /// Manifests with a live [`StageJob`]. Garbage collection holds this lock while it decides
    /// and removes, so a job never starts on a manifest being removed.
    jobs: Mutex<BTreeSet<ManifestId>>,
}

/// Staging one manifest: write verified chunks, make them durable in groups, serve them, and
/// finish (see the [module docs](self)).
///
/// Dropping a job without finishing loses nothing durable: [`StageArea::begin`] on the same
/// manifest resumes. Chunks written but not synced are lost and must be written again.
#[derive(Debug)]
pub struct StageJob {
    area: StageArea,
    signed: SignedManifest,
    offsets: Vec<u64>,
    path: PathBuf,
    file: File,
    durable: Bitfield,
    pending: BTreeSet<ChunkIndex>,
    local: Bitfield,
    from_disk: FromDisk,
}

impl StageArea {
    /// Opens the stage area in `data_dir`, creating its directories and state database if
    /// missing, keeping the last `keep_releases` (at least 1) staged releases per service.
    ///
    /// Deletes what a crash may have left behind: artifact files and release directories that
    /// no state entry accounts for, and temporary unpack directories.
    pub fn open(data_dir: impl AsRef<Path>, keep_releases: usize) -> Result<Self, StageError> {
        if keep_releases == 0 {
            return Err(StageError::ZeroKeep);
        }
        let root = data_dir.as_ref().to_path_buf();
        fs::create_dir_all(&root).map_err(io_err(IoOp::CreateDir, &root))?;
        let artifacts = root.join(ARTIFACTS_DIR);
        let releases = root.join(RELEASES_DIR);
        let mut created = ensure_dir(&artifacts)?;
        created |= ensure_dir(&releases)?;
        if created {
            sync_dir(&root)?;
        }
        let state_path = root.join(STATE_DIR);
        let db = sled::Config::new()
            .path(&state_path)
            .cache_capacity(STATE_CACHE_BYTES)
            // Every write that matters is followed by an explicit flush; a background flusher
            // thread would only add wake-ups (and delay closing the database).
            .flush_every_ms(None)
            .open()
            .map_err(|source| StageError::State { path: state_path.clone(), source })?;
        let area = Self {
            inner: Arc::new(Inner {
                root,
                artifacts,
                releases,
                state_path,
                db,
                keep_releases,
                jobs: Mutex::new(BTreeSet::new()),
            }),
        };
        area.sweep()?;
        Ok(area)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.root
    }

    /// Where the artifact file of manifest `id` lives: `artifacts/<id hex>`.
    pub fn artifact_path(&self, id: &ManifestId) -> PathBuf {
        self.inner.artifacts.join(id.to_hex())
    }

    /// Starts or resumes staging `signed`.
    ///
    /// Refuses, before writing anything, a manifest that no trusted key signed
    /// ([`StageError::Untrusted`]). Otherwise records the manifest, creates (or reopens) its
    /// artifact file, and gathers every chunk already on this host: those recorded durable by
    /// an earlier run, and those found in other artifacts here (each copy verified as it is
    /// made; a bad copy is simply not used). Those are durable when this returns: they are the
    /// job's [`local`](StageJob::local) set, for [`crate::swarm::Scheduler::new`].
    ///
    /// A manifest whose staging failed starts over from its chunks that still verify; one
    /// already staged gives a job that [`finish`](StageJob::finish)es at once.
    pub fn begin(
        &self,
        signed: &SignedManifest,
        trusted: &TrustedKeys,
    ) -> Result<StageJob, StageError> {
        let id = signed.id();
        signed.verify(trusted).map_err(|source| StageError::Untrusted { id, source })?;
        let manifest = signed.manifest();
        manifest.validate().map_err(|source| StageError::InvalidManifest { id, source })?;
        self.claim_job(id)?;
        // From here on the claim must be given back on error; a job releases it when dropped.
        match self.begin_claimed(signed) {
            Ok(job) => Ok(job),
            Err(err) => {
                self.jobs().remove(&id);
                Err(err)
            }
        }
    }

    fn begin_claimed(&self, signed: &SignedManifest) -> Result<StageJob, StageError> {
        let id = signed.id();
        let manifest = signed.manifest();
        let db = &self.inner.db;
        let mut record = match self.record(&id)? {
            Some(record) => record,
            None => Record {
                seq: 0,
                service: manifest.service.clone(),
                version: manifest.version.clone(),
                kind: manifest.kind,
                // validate() caps the chunk count far below u32::MAX.
                chunks: manifest.chunks.len() as u32,
                size: manifest.size,
                claimed: false,
                status: StageStatus::Staging,
            },
        };
        if record.status != StageStatus::Staged {
            record.status = StageStatus::Staging;
            record.seq = db.generate_id().map_err(self.state_err())?;
        }
        // The latest verified envelope replaces an older one (signatures may have changed).
        let mut batch = sled::Batch::default();
        batch.insert(&state::manifest_key(&id)[..], signed.encode());
        batch.insert(&state::record_key(&id)[..], record.encode());
        self.apply(batch)?;

        let path = self.artifact_path(&id);
        let (file, fresh) = open_artifact(&path, manifest.size)?;
        let offsets: Vec<u64> = manifest.offsets().map(|(offset, _)| offset).collect();
        let mut durable = self.load_durable(&id, manifest, &offsets)?;
        if fresh && durable.count_ones() > 0 {
            // The file vanished or shrank: whatever was recorded is gone with it.
            self.forget_durable(&id)?;
            durable = Bitfield::new(record.chunks);
        }
        let mut resumed = Tally::default();
        for index in durable.iter() {
            add(&mut resumed, manifest.chunks[index as usize].length);
        }
        let mut job = StageJob {
            area: self.clone(),
            signed: signed.clone(),
            offsets,
            path,
            file,
            local: durable.clone(),
            durable,
            pending: BTreeSet::new(),
            from_disk: FromDisk { resumed, copied: Tally::default() },
        };
        job.from_disk.copied = job.copy_from_disk()?;
        job.sync()?;
        job.local = job.durable.clone();
        Ok(job)
    }

    /// Makes manifest `id` (staged, of `service`) the service's active release. Its release is
    /// then never garbage-collected. (Switching `current/<service>` is the activation code's
    /// business; this records what it activated.)
    pub fn set_active(&self, service: &str, id: ManifestId) -> Result<(), StageError> {
        validate_name(service)
            .map_err(|reason| StageError::InvalidService { name: service.to_owned(), reason })?;
        // Serialized with garbage collection, which must not remove what becomes active.
        let _jobs = self.jobs();
        let record = self.record(&id)?.ok_or(StageError::UnknownManifest { id })?;
        if record.service != service {
            return Err(StageError::WrongService {
                id,
                service: service.to_owned(),
                actual: record.service,
            });
        }
        if record.status != StageStatus::Staged {
            return Err(StageError::NotStaged { id });
        }
        let db = &self.inner.db;
        db.insert(state::active_key(service), &id.as_bytes()[..]).map_err(self.state_err())?;
        db.flush().map_err(self.state_err())?;
        Ok(())
    }

    /// The active release of `service`, if one was set.
    pub fn active(&self, service: &str) -> Result<Option<ManifestId>, StageError> {
        let key = state::active_key(service);
        let value = self.inner.db.get(&key).map_err(self.state_err())?;
        value
            .map(|v| ManifestId::from_slice(&v).ok_or_else(|| self.corrupt(&key, "not an id")))
            .transpose()
    }

    /// Every manifest known here, by service and then staging order, with its progress.
    pub fn status(&self) -> Result<Vec<StageEntry>, StageError> {
        let actives = self.actives()?;
        let mut entries = Vec::new();
        for (id, record) in self.records()? {
            let seq = record.seq;
            entries.push((seq, self.entry(id, record, &actives)?));
        }
        entries.sort_by(|(a_seq, a), (b_seq, b)| (&a.service, a_seq).cmp(&(&b.service, b_seq)));
        Ok(entries.into_iter().map(|(_, entry)| entry).collect())
    }

    /// The status of one manifest, if known here.
    pub fn status_of(&self, id: &ManifestId) -> Result<Option<StageEntry>, StageError> {
        let Some(record) = self.record(id)? else { return Ok(None) };
        let actives = self.actives()?;
        self.entry(*id, record, &actives).map(Some)
    }

    /// The signed manifest of a manifest known here (to hand to peers).
    pub fn signed_manifest(&self, id: &ManifestId) -> Result<Option<SignedManifest>, StageError> {
        let key = state::manifest_key(id);
        let Some(bytes) = self.inner.db.get(key).map_err(self.state_err())? else {
            return Ok(None);
        };
        SignedManifest::decode_expecting(*id, &bytes)
            .map(Some)
            .map_err(|_| self.corrupt(&key, "signed manifest does not decode"))
    }

    /// Reads durable chunk `index` of manifest `id`, checking its hash: for serving peers from
    /// any artifact on this host, staged or staging.
    pub fn read_chunk(&self, id: &ManifestId, index: ChunkIndex) -> Result<Vec<u8>, StageError> {
        let key = state::durable_key(id, index);
        let Some(value) = self.inner.db.get(key).map_err(self.state_err())? else {
            return Err(StageError::NotDurable { id: *id, index });
        };
        let chunk = DurableChunk::decode(&value).map_err(|what| self.corrupt(&key, what))?;
        let path = self.artifact_path(id);
        let file = File::open(&path).map_err(io_err(IoOp::Open, &path))?;
        read_verified(&file, &path, *id, index, &chunk)
    }

    /// Reads a durable chunk by its hash from whichever artifact here has it, checking the
    /// hash. Fails with [`StageError::ChunkNotFound`] if no artifact has it, otherwise with the
    /// last copy's error if none could be read.
    pub fn read_chunk_by_hash(&self, hash: &ChunkHash) -> Result<Vec<u8>, StageError> {
        let mut last_err = None;
        for (id, index) in self.copies_of(hash)? {
            match self.read_chunk(&id, index) {
                Ok(data) => return Ok(data),
                Err(err) => last_err = Some(err),
            }
        }
        Err(last_err.unwrap_or(StageError::ChunkNotFound { hash: *hash }))
    }

    /// Garbage-collects: per service keeps the last `keep_releases` staged releases (by staging
    /// order), the active release, and everything staging or being worked on; removes the rest
    /// (failed manifests included): state entries first, then release directories and artifact
    /// files.
    pub fn gc(&self) -> Result<GcStats, StageError> {
        let jobs = self.jobs();
        let records = self.records()?;
        let actives: HashSet<ManifestId> = self.actives()?.into_values().collect();
        let mut staged: BTreeMap<&str, Vec<(u64, ManifestId)>> = BTreeMap::new();
        for (id, record) in &records {
            if record.status == StageStatus::Staged {
                staged.entry(&record.service).or_default().push((record.seq, *id));
            }
        }
        let mut keep = HashSet::new();
        for versions in staged.values_mut() {
            versions.sort_unstable_by(|a, b| b.cmp(a));
            keep.extend(versions.iter().take(self.inner.keep_releases).map(|(_, id)| *id));
        }
        let doomed: Vec<ManifestId> = records
            .iter()
            .filter(|(id, record)| {
                let spare = match record.status {
                    StageStatus::Staging => false,
                    StageStatus::Staged => !keep.contains(id),
                    StageStatus::Failed { .. } => true,
                };
                spare && !actives.contains(id) && !jobs.contains(id)
            })
            .map(|(id, _)| *id)
            .collect();
        self.remove_entries(&records, &doomed)
    }

    /// Removes manifest `id`: its state, artifact and release. Refuses the active release of
    /// its service ([`StageError::Active`]) and a manifest with a live job
    /// ([`StageError::Busy`]). Returns `false` if it was not known here.
    pub fn remove(&self, id: &ManifestId) -> Result<bool, StageError> {
        let jobs = self.jobs();
        if jobs.contains(id) {
            return Err(StageError::Busy { id: *id });
        }
        if self.actives()?.values().any(|active| active == id) {
            return Err(StageError::Active { id: *id });
        }
        let records = self.records()?;
        if !records.iter().any(|(known, _)| known == id) {
            return Ok(false);
        }
        self.remove_entries(&records, &[*id])?;
        Ok(true)
    }

    // -------------------------------------------------------------------------------------
    // Internals

    fn jobs(&self) -> MutexGuard<'_, BTreeSet<ManifestId>> {
        // The set stays consistent even if a holder panicked: every change is one insert or
        // remove.
        self.inner.jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn claim_job(&self, id: ManifestId) -> Result<(), StageError> {
        if self.jobs().insert(id) { Ok(()) } else { Err(StageError::Busy { id }) }
    }

    fn release_dir(&self, service: &str, version: &str) -> PathBuf {
        self.inner.releases.join(service).join(version)
    }

    fn state_err(&self) -> impl FnOnce(sled::Error) -> StageError + '_ {
        move |source| StageError::State { path: self.inner.state_path.clone(), source }
    }

    fn corrupt(&self, key: &[u8], what: &'static str) -> StageError {
        StageError::CorruptState {
            path: self.inner.state_path.clone(),
            key: hex::encode(key),
            what,
        }
    }

    /// Applies a batch atomically and flushes the database.
    fn apply(&self, batch: sled::Batch) -> Result<(), StageError> {
        self.inner.db.apply_batch(batch).map_err(self.state_err())?;
        self.inner.db.flush().map_err(self.state_err())?;
        Ok(())
    }

    fn record(&self, id: &ManifestId) -> Result<Option<Record>, StageError> {
        let key = state::record_key(id);
        let value = self.inner.db.get(key).map_err(self.state_err())?;
        value.map(|v| Record::decode(&v).map_err(|what| self.corrupt(&key, what))).transpose()
    }

    fn put_record(&self, id: &ManifestId, record: &Record) -> Result<(), StageError> {
        let mut batch = sled::Batch::default();
        batch.insert(&state::record_key(id)[..], record.encode());
        self.apply(batch)
    }

    fn records(&self) -> Result<Vec<(ManifestId, Record)>, StageError> {
        let mut out = Vec::new();
        for item in self.inner.db.scan_prefix(state::RECORD_PREFIX) {
            let (key, value) = item.map_err(self.state_err())?;
            let id = state::key_id(&key).ok_or_else(|| self.corrupt(&key, "bad record key"))?;
            let record = Record::decode(&value).map_err(|what| self.corrupt(&key, what))?;
            out.push((id, record));
        }
        Ok(out)
    }

    fn actives(&self) -> Result<BTreeMap<String, ManifestId>, StageError> {
        let mut out = BTreeMap::new();
        for item in self.inner.db.scan_prefix(state::ACTIVE_PREFIX) {
            let (key, value) = item.map_err(self.state_err())?;
            let service = state::active_key_service(&key)
                .ok_or_else(|| self.corrupt(&key, "bad active key"))?;
            let id =
                ManifestId::from_slice(&value).ok_or_else(|| self.corrupt(&key, "not an id"))?;
            out.insert(service.to_owned(), id);
        }
        Ok(out)
    }

    /// The durable chunks of `id` (index and location), in index order.
    fn durable_chunks(
        &self,
        id: &ManifestId,
    ) -> Result<Vec<(ChunkIndex, DurableChunk)>, StageError> {
        let mut out = Vec::new();
        for item in self.inner.db.scan_prefix(state::durable_prefix(id)) {
            let (key, value) = item.map_err(self.state_err())?;
            let index = state::durable_key_index(&key)
                .ok_or_else(|| self.corrupt(&key, "bad durable-chunk key"))?;
            let chunk = DurableChunk::decode(&value).map_err(|what| self.corrupt(&key, what))?;
            out.push((index, chunk));
        }
        Ok(out)
    }

    /// The durable set of `id`, checked against its manifest's chunks and their `offsets`.
    fn load_durable(
        &self,
        id: &ManifestId,
        manifest: &Manifest,
        offsets: &[u64],
    ) -> Result<Bitfield, StageError> {
        let mut durable = Bitfield::new(offsets.len() as u32);
        for (index, chunk) in self.durable_chunks(id)? {
            let i = index as usize;
            let matches = manifest.chunks.get(i).is_some_and(|info| {
                chunk.offset == offsets[i] && chunk.hash == info.hash && chunk.len == info.length
            });
            if !matches {
                return Err(self.corrupt(
                    &state::durable_key(id, index),
                    "durable chunk does not match the manifest",
                ));
            }
            durable.insert(index);
        }
        Ok(durable)
    }

    /// Forgets every durable chunk of `id`.
    fn forget_durable(&self, id: &ManifestId) -> Result<(), StageError> {
        let mut batch = sled::Batch::default();
        for (index, chunk) in self.durable_chunks(id)? {
            forget_chunk(&mut batch, id, index, &chunk.hash);
        }
        self.apply(batch)
    }

    /// Every (manifest, index) recorded durable with this hash.
    fn copies_of(&self, hash: &ChunkHash) -> Result<Vec<(ManifestId, ChunkIndex)>, StageError> {
        let mut out = Vec::new();
        for item in self.inner.db.scan_prefix(state::hash_prefix(hash)) {
            let (key, _) = item.map_err(self.state_err())?;
            out.push(
                state::parse_hash_key(&key).ok_or_else(|| self.corrupt(&key, "bad hash key"))?,
            );
        }
        Ok(out)
    }

    fn entry(
        &self,
        id: ManifestId,
        record: Record,
        actives: &BTreeMap<String, ManifestId>,
    ) -> Result<StageEntry, StageError> {
        let mut done = Tally::default();
        for (_, chunk) in self.durable_chunks(&id)? {
            add(&mut done, chunk.len);
        }
        let release = (record.status == StageStatus::Staged)
            .then(|| self.release_dir(&record.service, &record.version));
        Ok(StageEntry {
            id,
            active: actives.get(&record.service) == Some(&id),
            kind: record.kind,
            done,
            total: Tally { chunks: u64::from(record.chunks), bytes: record.size },
            release,
            status: record.status,
            service: record.service,
            version: record.version,
        })
    }

    /// Removes the state of `doomed` in one batch, then their files. `records` is every record,
    /// so that a release directory another surviving manifest claims is left alone.
    fn remove_entries(
        &self,
        records: &[(ManifestId, Record)],
        doomed: &[ManifestId],
    ) -> Result<GcStats, StageError> {
        let mut stats = GcStats::default();
        if doomed.is_empty() {
            return Ok(stats);
        }
        let doomed_set: HashSet<&ManifestId> = doomed.iter().collect();
        let mut batch = sled::Batch::default();
        for id in doomed {
            batch.remove(&state::manifest_key(id)[..]);
            batch.remove(&state::record_key(id)[..]);
            for (index, chunk) in self.durable_chunks(id)? {
                forget_chunk(&mut batch, id, index, &chunk.hash);
            }
        }
        self.apply(batch)?;
        let survivors_claim: HashSet<(&str, &str)> = records
            .iter()
            .filter(|(id, r)| r.claimed && !doomed_set.contains(id))
            .map(|(_, r)| (r.service.as_str(), r.version.as_str()))
            .collect();
        for (id, record) in records.iter().filter(|(id, _)| doomed_set.contains(id)) {
            let claimed_by_other =
                survivors_claim.contains(&(record.service.as_str(), record.version.as_str()));
            if record.claimed && !claimed_by_other {
                remove_tree(&self.release_dir(&record.service, &record.version))?;
            }
            let artifact = self.artifact_path(id);
            let len = fs::metadata(&artifact).map(|m| m.len()).unwrap_or(0);
            if remove_file(&artifact)? {
                stats.artifact_bytes += len;
            }
            stats.removed.push(*id);
        }
        stats.removed.sort_unstable();
        Ok(stats)
    }

    /// Deletes files that no state entry accounts for (see [`StageArea::open`]).
    fn sweep(&self) -> Result<(), StageError> {
        let records = self.records()?;
        let known: HashSet<String> = records.iter().map(|(id, _)| id.to_hex()).collect();
        let dir = &self.inner.artifacts;
        for entry in fs::read_dir(dir).map_err(io_err(IoOp::ListDir, dir))? {
            let entry = entry.map_err(io_err(IoOp::ListDir, dir))?;
            if !entry.file_name().to_str().is_some_and(|name| known.contains(name)) {
                remove_tree(&entry.path())?;
            }
        }
        let claimed: HashSet<(&str, &str)> = records
            .iter()
            .filter(|(_, r)| r.claimed)
            .map(|(_, r)| (r.service.as_str(), r.version.as_str()))
            .collect();
        let dir = &self.inner.releases;
        for service in fs::read_dir(dir).map_err(io_err(IoOp::ListDir, dir))? {
            let service = service.map_err(io_err(IoOp::ListDir, dir))?;
            let service_dir = service.path();
            if !service.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let service_name = service.file_name().to_string_lossy().into_owned();
            for version in
                fs::read_dir(&service_dir).map_err(io_err(IoOp::ListDir, &service_dir))?
            {
                let version = version.map_err(io_err(IoOp::ListDir, &service_dir))?;
                let name = version.file_name().to_string_lossy().into_owned();
                // Names starting with '.' are unpack temporaries; versions never start so.
                if name.starts_with('.') || !claimed.contains(&(&*service_name, &*name)) {
                    remove_tree(&version.path())?;
                }
            }
        }
        Ok(())
    }
}

impl StageJob {
    /// The manifest being staged.
    pub fn id(&self) -> ManifestId {
        self.signed.id()
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        self.signed.manifest()
    }

    /// The chunks that were on this host when the job began (resumed and copied): pass it as
    /// `local` to [`crate::swarm::Scheduler::new`]. All of them are durable.
    pub fn local(&self) -> &Bitfield {
        &self.local
    }

    /// How many chunks, and bytes, came from this host's disk rather than the network.
    pub fn from_disk(&self) -> FromDisk {
        self.from_disk
    }

    /// The durable chunks: [`local`](Self::local) plus every chunk synced since.
    pub fn durable(&self) -> &Bitfield {
        &self.durable
    }

    /// Chunks written and not yet synced.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether every chunk is durable, so that [`finish`](Self::finish) may proceed.
    pub fn is_complete(&self) -> bool {
        self.durable.is_full()
    }

    /// Checks `data` against the manifest's length and BLAKE3 for chunk `index`, then writes it
    /// at the chunk's offset. It is durable only after the next [`sync`](Self::sync).
    ///
    /// Bytes that do not match are refused with [`StageError::ChunkMismatch`] and nothing is
    /// written. Writing a chunk that is already durable does nothing.
    pub fn write_chunk(&mut self, index: ChunkIndex, data: &[u8]) -> Result<(), StageError> {
        let info = self.check_length(index, data)?;
        let actual = ChunkHash::of(data);
        self.check_hash(index, &info, actual)?;
        self.write_at(index, data)
    }

    /// Like [`write_chunk`](Self::write_chunk), for a caller that has just hashed `data` itself
    /// (the swarm shell hashes every piece to tell the scheduler its [`PieceOutcome`]), so the
    /// bytes are not hashed twice. `hash` must be `ChunkHash::of(data)`, computed here and now
    /// from these very bytes, never a hash that came with them from a peer. Debug builds
    /// assert it.
    ///
    /// [`PieceOutcome`]: crate::swarm::PieceOutcome
    pub fn write_verified_chunk(
        &mut self,
        index: ChunkIndex,
        data: &[u8],
        hash: ChunkHash,
    ) -> Result<(), StageError> {
        debug_assert_eq!(ChunkHash::of(data), hash, "write_verified_chunk given a wrong hash");
        let info = self.check_length(index, data)?;
        self.check_hash(index, &info, hash)?;
        self.write_at(index, data)
    }

    /// Makes every written chunk durable: one `fdatasync` of the artifact file, then one atomic
    /// batch recording them in the state database, then a flush of the database, in that order
    /// (see the module docs). Returns the chunks that became durable, in index order, for
    /// [`crate::swarm::Scheduler::handle_written`].
    ///
    /// On error nothing new is recorded. If the file could not be flushed, the pending chunks
    /// are dropped ([`StageError::SyncFailed`] lists them); if the database failed after the
    /// flush, they stay pending and a later `sync` retries.
    pub fn sync(&mut self) -> Result<Vec<ChunkIndex>, StageError> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        if let Err(source) = self.file.sync_data() {
            let lost = std::mem::take(&mut self.pending).into_iter().collect();
            return Err(StageError::SyncFailed { path: self.path.clone(), lost, source });
        }
        let id = self.id();
        let mut batch = sled::Batch::default();
        for &index in &self.pending {
            let chunk = self.durable_chunk(index);
            batch.insert(&state::durable_key(&id, index)[..], &chunk.encode()[..]);
            batch.insert(&state::hash_key(&chunk.hash, &id, index)[..], &[][..]);
        }
        self.area.apply(batch)?;
        let done: Vec<ChunkIndex> = std::mem::take(&mut self.pending).into_iter().collect();
        for &index in &done {
            self.durable.insert(index);
        }
        Ok(done)
    }

    /// Reads durable chunk `index` (to serve a peer), checking its hash.
    pub fn read_chunk(&self, index: ChunkIndex) -> Result<Vec<u8>, StageError> {
        self.info(index)?;
        if !self.durable.contains(index) {
            return Err(StageError::NotDurable { id: self.id(), index });
        }
        read_verified(&self.file, &self.path, self.id(), index, &self.durable_chunk(index))
    }

    /// Checks the assembled artifact against the manifest (size, SHA-256 and BLAKE3 of the
    /// whole), unpacks it into `releases/<service>/<version>/`, records it staged, and
    /// garbage-collects.
    ///
    /// Requires every chunk durable ([`StageError::Incomplete`]). A failed whole check is
    /// [`StageError::WholeMismatch`]: the status becomes [`StageStatus::Failed`], no release
    /// directory is created, and the chunks that no longer verify are forgotten. A release
    /// directory already there is accepted if this manifest claimed it earlier (a finish that
    /// crashed after unpacking), refused otherwise ([`StageError::ReleaseConflict`]).
    pub fn finish(self) -> Result<Finished, StageError> {
        let id = self.id();
        let area = &self.area;
        let manifest = self.manifest();
        let mut record = area.record(&id)?.ok_or(StageError::UnknownManifest { id })?;
        let dest = area.release_dir(&manifest.service, &manifest.version);
        let exists = fs::symlink_metadata(&dest).is_ok();
        if record.status == StageStatus::Staged && record.claimed && exists {
            return Ok(Finished { release: self.release(dest), gc: area.gc() });
        }
        let missing = self.durable.bit_len() - self.durable.count_ones();
        if missing > 0 {
            return Err(StageError::Incomplete { id, missing, chunks: self.durable.bit_len() });
        }
        if let Some(check) = verify_whole(&self.path, manifest)? {
            let mut batch = sled::Batch::default();
            let bad_chunks = self.forget_bad_chunks(&mut batch);
            record.status = StageStatus::Failed { reason: FailReason::Whole(check) };
            batch.insert(&state::record_key(&id)[..], record.encode());
            area.apply(batch)?;
            return Err(StageError::WholeMismatch {
                id,
                path: self.path.clone(),
                check: Box::new(check),
                bad_chunks,
            });
        }
        if exists {
            if !record.claimed {
                return Err(StageError::ReleaseConflict { id, path: dest });
            }
        } else {
            if !record.claimed {
                record.claimed = true;
                area.put_record(&id, &record)?;
            }
            if let Err(err) = self.install(&dest) {
                if let StageError::Unpack { source, .. } = &err {
                    let reason = match source {
                        UnpackError::Refused { entry, reason } => {
                            Some(FailReason::Refused { entry: entry.clone(), reason: *reason })
                        }
                        UnpackError::Malformed(_) => Some(FailReason::Malformed),
                        _ => None,
                    };
                    if let Some(reason) = reason {
                        record.claimed = false;
                        record.status = StageStatus::Failed { reason };
                        area.put_record(&id, &record)?;
                    }
                }
                return Err(err);
            }
        }
        record.status = StageStatus::Staged;
        record.seq = area.inner.db.generate_id().map_err(area.state_err())?;
        area.put_record(&id, &record)?;
        Ok(Finished { release: self.release(dest), gc: area.gc() })
    }

    // -------------------------------------------------------------------------------------
    // Internals

    fn info(&self, index: ChunkIndex) -> Result<ChunkInfo, StageError> {
        let chunks = &self.manifest().chunks;
        chunks.get(index as usize).copied().ok_or(StageError::IndexOutOfRange {
            id: self.id(),
            index,
            chunks: chunks.len() as u32,
        })
    }

    fn check_length(&self, index: ChunkIndex, data: &[u8]) -> Result<ChunkInfo, StageError> {
        let info = self.info(index)?;
        if data.len() != info.length as usize {
            let fault = ChunkFault::Length { expected: info.length, actual: data.len() };
            return Err(StageError::ChunkMismatch { id: self.id(), index, fault });
        }
        Ok(info)
    }

    fn check_hash(
        &self,
        index: ChunkIndex,
        info: &ChunkInfo,
        actual: ChunkHash,
    ) -> Result<(), StageError> {
        if actual != info.hash {
            let fault = ChunkFault::Hash { expected: info.hash, actual };
            return Err(StageError::ChunkMismatch { id: self.id(), index, fault });
        }
        Ok(())
    }

    fn write_at(&mut self, index: ChunkIndex, data: &[u8]) -> Result<(), StageError> {
        if self.durable.contains(index) {
            return Ok(());
        }
        let offset = self.offsets[index as usize];
        self.file.write_all_at(data, offset).map_err(io_err(IoOp::Write, &self.path))?;
        self.pending.insert(index);
        Ok(())
    }

    fn durable_chunk(&self, index: ChunkIndex) -> DurableChunk {
        let info = self.manifest().chunks[index as usize];
        DurableChunk { hash: info.hash, offset: self.offsets[index as usize], len: info.length }
    }

    /// Copies every missing chunk that some artifact on this host has, verifying each copy.
    /// The copies are pending (not yet durable) when this returns.
    fn copy_from_disk(&mut self) -> Result<Tally, StageError> {
        let id = self.id();
        let n = self.durable.bit_len();
        let mut copied = Tally::default();
        // Chunks of this artifact already in place, by hash: a manifest may repeat a chunk.
        let mut own: HashMap<ChunkHash, ChunkIndex> = HashMap::new();
        for index in self.durable.iter() {
            own.entry(self.manifest().chunks[index as usize].hash).or_insert(index);
        }
        let mut sources: HashMap<ManifestId, Option<File>> = HashMap::new();
        let mut buf = Vec::new();
        for index in 0..n {
            if self.durable.contains(index) {
                continue;
            }
            let info = self.manifest().chunks[index as usize];
            buf.resize(info.length as usize, 0);
            let found = match own.get(&info.hash) {
                Some(&src) => read_matching(&self.file, self.offsets[src as usize], &mut buf, info),
                None => self.find_elsewhere(id, info, &mut sources, &mut buf)?,
            };
            if !found {
                continue;
            }
            let offset = self.offsets[index as usize];
            self.file.write_all_at(&buf, offset).map_err(io_err(IoOp::Write, &self.path))?;
            self.pending.insert(index);
            own.entry(info.hash).or_insert(index);
            add(&mut copied, info.length);
        }
        Ok(copied)
    }

    /// Reads a verified copy of chunk `info` into `buf` from another artifact on this host.
    fn find_elsewhere(
        &self,
        id: ManifestId,
        info: ChunkInfo,
        sources: &mut HashMap<ManifestId, Option<File>>,
        buf: &mut [u8],
    ) -> Result<bool, StageError> {
        let area = &self.area;
        for (other, index) in area.copies_of(&info.hash)? {
            if other == id {
                continue;
            }
            let key = state::durable_key(&other, index);
            let Some(value) = area.inner.db.get(key).map_err(area.state_err())? else {
                continue;
            };
            let Ok(chunk) = DurableChunk::decode(&value) else { continue };
            let file =
                sources.entry(other).or_insert_with(|| File::open(area.artifact_path(&other)).ok());
            if let Some(file) = file {
                if read_matching(file, chunk.offset, buf, info) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Re-reads every chunk and adds the removal of those that no longer verify to `batch`.
    /// Returns how many.
    fn forget_bad_chunks(&self, batch: &mut sled::Batch) -> u32 {
        let id = self.id();
        let mut bad = 0;
        let mut buf = Vec::new();
        for (index, info) in self.manifest().chunks.iter().enumerate() {
            let index = index as ChunkIndex;
            buf.resize(info.length as usize, 0);
            if !read_matching(&self.file, self.offsets[index as usize], &mut buf, *info) {
                forget_chunk(batch, &id, index, &info.hash);
                bad += 1;
            }
        }
        bad
    }

    /// Puts the verified artifact into place at `dest` (which does not exist).
    fn install(&self, dest: &Path) -> Result<(), StageError> {
        let manifest = self.manifest();
        let service_dir = self.area.inner.releases.join(&manifest.service);
        if ensure_dir(&service_dir)? {
            sync_dir(&self.area.inner.releases)?;
        }
        match manifest.kind {
            ArtifactKind::Tree => {
                let file = File::open(&self.path).map_err(io_err(IoOp::Open, &self.path))?;
                unpack(BufReader::with_capacity(VERIFY_BLOCK, file), dest).map_err(|source| {
                    StageError::Unpack { id: self.id(), dest: dest.to_owned(), source }
                })?;
                Ok(())
            }
            ArtifactKind::File => install_file(&self.path, dest, &service_dir, manifest),
        }
    }

    fn release(&self, path: PathBuf) -> Release {
        let manifest = self.manifest();
        Release {
            id: self.id(),
            service: manifest.service.clone(),
            version: manifest.version.clone(),
            kind: manifest.kind,
            path,
        }
    }
}

impl Drop for StageJob {
    fn drop(&mut self) {
        let id = self.id();
        self.area.jobs().remove(&id);
    }
}

impl fmt::Display for ChunkFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length { expected, actual } => {
                write!(f, "{actual} bytes where the manifest says {expected}")
            }
            Self::Hash { expected, actual } => {
                write!(f, "it hashes to {actual} where the manifest says {expected}")
            }
        }
    }
}

impl fmt::Display for WholeCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Size { expected, actual } => {
                write!(f, "{actual} bytes where the manifest says {expected}")
            }
            Self::Sha256 { expected, actual } => {
                write!(f, "SHA-256 is {actual} where the manifest says {expected}")
            }
            Self::Blake3 { expected, actual } => {
                write!(f, "BLAKE3 is {actual} where the manifest says {expected}")
            }
        }
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Whole(check) => write!(f, "whole-artifact check failed: {check}"),
            Self::Refused { entry, reason } => {
                write!(f, "unpacker refused entry {}: {reason}", entry.display())
            }
            Self::Malformed => f.write_str("not a valid packed tree"),
        }
    }
}

impl fmt::Display for StageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Staging => f.write_str("staging"),
            Self::Staged => f.write_str("staged"),
            Self::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

/// Opens (creating if missing) an artifact file and gives it length `size`. Returns the file
/// and whether its earlier content is gone (it was created, or was shorter than `size`).
fn open_artifact(path: &Path, size: u64) -> Result<(File, bool), StageError> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    let (file, created) = match options.clone().create_new(true).open(path) {
        Ok(file) => (file, true),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            (options.open(path).map_err(io_err(IoOp::Open, path))?, false)
        }
        Err(err) => return Err(io_err(IoOp::CreateFile, path)(err)),
    };
    let len = file.metadata().map_err(io_err(IoOp::Read, path))?.len();
    if len != size {
        // Preallocates the stream's length (sparse), so chunks can land in any order. The
        // next sync's fdatasync makes the length durable along with the chunks.
        file.set_len(size).map_err(io_err(IoOp::Write, path))?;
    }
    if created {
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
    }
    Ok((file, created || len < size))
}

/// Reads `buf.len()` bytes at `offset` and reports whether they are chunk `info`. Read errors
/// (a short or unreadable file) count as a mismatch.
fn read_matching(file: &File, offset: u64, buf: &mut [u8], info: ChunkInfo) -> bool {
    buf.len() == info.length as usize
        && file.read_exact_at(buf, offset).is_ok()
        && ChunkHash::of(buf) == info.hash
}

/// Reads a durable chunk and checks its hash.
fn read_verified(
    file: &File,
    path: &Path,
    id: ManifestId,
    index: ChunkIndex,
    chunk: &DurableChunk,
) -> Result<Vec<u8>, StageError> {
    let mut buf = vec![0u8; chunk.len as usize];
    file.read_exact_at(&mut buf, chunk.offset).map_err(|err| {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            StageError::Corrupt { id, index, path: path.to_owned() }
        } else {
            io_err(IoOp::Read, path)(err)
        }
    })?;
    if ChunkHash::of(&buf) != chunk.hash {
        return Err(StageError::Corrupt { id, index, path: path.to_owned() });
    }
    Ok(buf)
}

/// Adds the removal of a durable chunk's marker and hash-index entry to `batch`.
fn forget_chunk(batch: &mut sled::Batch, id: &ManifestId, index: ChunkIndex, hash: &ChunkHash) {
    batch.remove(&state::durable_key(id, index)[..]);
    batch.remove(&state::hash_key(hash, id, index)[..]);
}

/// Reads the whole artifact once and checks its length, SHA-256 and BLAKE3 against the
/// manifest. SHA-256, the slowest, runs on its own thread while this one reads and runs
/// BLAKE3. Returns the first check that failed.
fn verify_whole(path: &Path, manifest: &Manifest) -> Result<Option<WholeCheck>, StageError> {
    let mut file = File::open(path).map_err(io_err(IoOp::Open, path))?;
    let len = file.metadata().map_err(io_err(IoOp::Read, path))?.len();
    if len != manifest.size {
        return Ok(Some(WholeCheck::Size { expected: manifest.size, actual: len }));
    }
    let (read, sha256, blake3) = std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<Vec<u8>>(VERIFY_QUEUE);
        let sha = scope.spawn(move || {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            for block in rx {
                ctx.update(&block);
            }
            let mut out = [0u8; 32];
            out.copy_from_slice(ctx.finish().as_ref());
            Sha256Digest::from_bytes(out)
        });
        let mut hasher = blake3::Hasher::new();
        let mut read = 0u64;
        let result = loop {
            let mut block = Vec::with_capacity(VERIFY_BLOCK);
            match (&mut file).take(VERIFY_BLOCK as u64).read_to_end(&mut block) {
                Ok(0) => break Ok(()),
                Ok(n) => read += n as u64,
                Err(err) => break Err(io_err(IoOp::Read, path)(err)),
            }
            hasher.update(&block);
            if tx.send(block).is_err() {
                // The SHA-256 thread is gone: it panicked, and join() below says so.
                break Ok(());
            }
        };
        drop(tx);
        let sha = sha.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        result.map(|()| (read, sha, Blake3Digest::from_bytes(*hasher.finalize().as_bytes())))
    })?;
    Ok(if read != manifest.size {
        Some(WholeCheck::Size { expected: manifest.size, actual: read })
    } else if sha256 != manifest.sha256 {
        Some(WholeCheck::Sha256 { expected: manifest.sha256, actual: sha256 })
    } else if blake3 != manifest.blake3 {
        Some(WholeCheck::Blake3 { expected: manifest.blake3, actual: blake3 })
    } else {
        None
    })
}

/// Installs a single-file artifact as `dest/<service>` (see the module docs), the way the
/// unpacker installs a tree: into a temporary directory beside `dest`, flushed, then renamed.
fn install_file(
    artifact: &Path,
    dest: &Path,
    service_dir: &Path,
    manifest: &Manifest,
) -> Result<(), StageError> {
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.unpack-", manifest.version))
        .tempdir_in(service_dir)
        .map_err(io_err(IoOp::CreateDir, service_dir))?;
    let target = tmp.path().join(&manifest.service);
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_RELEASE_MODE)
        .open(&target)
        .map_err(io_err(IoOp::CreateFile, &target))?;
    let mut input = File::open(artifact).map_err(io_err(IoOp::Open, artifact))?;
    io::copy(&mut input, &mut out).map_err(io_err(IoOp::Write, &target))?;
    out.sync_all().map_err(io_err(IoOp::Sync, &target))?;
    sync_dir(tmp.path())?;
    let tmp_path = tmp.keep();
    if let Err(err) = fs::rename(&tmp_path, dest) {
        let _ = fs::remove_dir_all(&tmp_path);
        return Err(io_err(IoOp::Rename, dest)(err));
    }
    Ok(sync_dir(service_dir)?)
}

fn add(tally: &mut Tally, len: u32) {
    tally.chunks += 1;
    tally.bytes += u64::from(len);
}

/// Removes a file, symlink or directory tree; a missing one is fine.
fn remove_tree(path: &Path) -> Result<(), StageError> {
    let is_dir = fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
    let result = if is_dir { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    match result {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(io_err(IoOp::Remove, path)(err)),
    }
}

impl From<IoFailure> for StageError {
    fn from(f: IoFailure) -> Self {
        StageError::Io { op: f.op, path: f.path, source: f.source }
    }
}

/// Builds the mapper from an `io::Error` to [`StageError::Io`] for `op` on `path`.
fn io_err(op: IoOp, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> StageError {
    let path = path.as_ref().to_path_buf();
    move |source| StageError::Io { op, path, source }
}
