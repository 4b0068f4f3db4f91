//! `fleetwave publish`: pack, chunk, hash, sign, upload what the origin lacks.
//!
//! The origin is a store directory, written directly, or a running origin daemon's store API
//! (`http://HOST:PORT`, see `fleetwave_node::store_api`). Either way it is one streaming pass:
//! each chunk seen for the first time is checked against the origin (a `stat` in the directory,
//! or batched `missing` queries over HTTP), new chunks go through a bounded queue to writer
//! threads, and only once every chunk is durable are the manifest and then the ref written.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{Scope, ScopedJoinHandle};

use anyhow::{Context, Result, bail};
use indicatif::HumanBytes;

use fleetwave_chunker::cdc::chunk_stream;
use fleetwave_chunker::manifest::validate_name;
use fleetwave_chunker::pack::ArtifactStream;
use fleetwave_chunker::{BuildInfo, ChunkHash, ChunkerParams, Manifest, ManifestId, SigningKey};
use fleetwave_node::store::{ChunkStore, StoreError, WriteBatch};
use fleetwave_node::store_api::{StoreApiError, StoreClient, read_token_file};

use crate::cli::PublishArgs;
use crate::progress;

/// Everything publish needs, resolved from flags, environment and defaults.
#[derive(Debug)]
pub(crate) struct Options {
    pub(crate) path: PathBuf,
    pub(crate) service: String,
    pub(crate) version: String,
    pub(crate) key: PathBuf,
    /// The origin as given: a store directory, or the `http://` URL of its store API.
    pub(crate) origin: PathBuf,
    pub(crate) params: ChunkerParams,
    pub(crate) build: BuildInfo,
    pub(crate) quiet: bool,
}

/// A publish as the command line asks for it: the options and, for an origin URL, the file
/// holding the upload token.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) options: Options,
    pub(crate) upload_token_file: Option<PathBuf>,
}

/// What [`run`] publishes: bare [`Options`] (an origin without an upload token, as the demo's)
/// or a [`Request`] from the command line.
pub(crate) trait Publish {
    fn options(&self) -> &Options;
    fn upload_token_file(&self) -> Option<&Path>;
}

impl Publish for Options {
    fn options(&self) -> &Options {
        self
    }

    fn upload_token_file(&self) -> Option<&Path> {
        None
    }
}

impl Publish for Request {
    fn options(&self) -> &Options {
        &self.options
    }

    fn upload_token_file(&self) -> Option<&Path> {
        self.upload_token_file.as_deref()
    }
}

impl Options {
    pub(crate) fn from_args(args: PublishArgs) -> Result<Request> {
        let params = ChunkerParams::with_avg(args.chunk_avg);
        params.validate().context("bad --chunk-avg")?;
        let builder = args.builder.unwrap_or_else(default_builder);
        let built_at_unix = args.built_at.unwrap_or_else(now_unix);
        let options = Self {
            path: args.path,
            service: args.service,
            version: args.version,
            key: args.key,
            origin: args.origin.origin,
            params,
            build: BuildInfo {
                commit: args.commit,
                builder,
                built_at_unix,
                labels: args.labels.into_iter().collect(),
            },
            quiet: args.quiet,
        };
        Ok(Request { options, upload_token_file: args.origin.upload_token_file })
    }
}

fn default_builder() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
}

#[allow(clippy::disallowed_methods)] // The build time is read here, at the edge, once.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What a publish did.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) id: ManifestId,
    pub(crate) manifest: Manifest,
    /// The signed manifest envelope as stored on the origin (what the coordinator registers).
    pub(crate) envelope: Vec<u8>,
    pub(crate) new_chunks: u64,
    pub(crate) new_bytes: u64,
    /// Distinct chunks the origin already held.
    pub(crate) reused_chunks: u64,
    pub(crate) reused_bytes: u64,
    /// Occurrences of a chunk that appeared earlier in the same artifact.
    pub(crate) repeated_chunks: u64,
    pub(crate) repeated_bytes: u64,
}

impl Report {
    /// Short form for the demo.
    pub(crate) fn report_indented(&self) {
        let m = &self.manifest;
        println!("   manifest {}", self.id);
        println!(
            "   {} in {} chunks; uploaded {} new chunks ({}), reused {} ({})",
            HumanBytes(m.size),
            m.chunks.len(),
            self.new_chunks,
            HumanBytes(self.new_bytes),
            self.reused_chunks,
            HumanBytes(self.reused_bytes)
        );
    }

    pub(crate) fn print(&self) {
        let m = &self.manifest;
        println!("published {}@{}", m.service, m.version);
        println!("manifest:  {}", self.id);
        println!("size:      {} ({} bytes)", HumanBytes(m.size), m.size);
        println!("chunks:    {} ({} distinct)", m.chunks.len(), m.unique_chunks().len());
        println!(
            "uploaded:  {} new chunks, {} ({} bytes)",
            self.new_chunks,
            HumanBytes(self.new_bytes),
            self.new_bytes
        );
        println!(
            "reused:    {} chunks, {} ({} bytes) already on the origin",
            self.reused_chunks,
            HumanBytes(self.reused_bytes),
            self.reused_bytes
        );
        if self.repeated_chunks > 0 {
            println!(
                "repeated:  {} chunks, {} ({} bytes) repeat earlier chunks of this artifact",
                self.repeated_chunks,
                HumanBytes(self.repeated_bytes),
                self.repeated_bytes
            );
        }
    }
}

/// Bytes of new chunks that may wait for the writers before chunking blocks.
///
/// Enough to ride out a slow file creation or upload without stalling the chunker, small against
/// the memory bound of a publish (peak RSS <= 256 MiB whatever the input size). Publishing to an
/// origin URL holds up to as much again in the batch waiting for its `missing` answer.
const WRITE_QUEUE_BYTES: usize = 32 << 20;

/// Chunks that fit in [`WRITE_QUEUE_BYTES`] at the largest chunk size (at least one).
fn write_queue_depth(params: ChunkerParams) -> usize {
    (WRITE_QUEUE_BYTES / (params.max_size as usize).max(1)).max(1)
}

/// Chunks asked about per `missing` query to an origin URL (or fewer, if they hold more than
/// [`WRITE_QUEUE_BYTES`]): one round trip per 16 MiB of 64 KiB chunks, so the pass waits on the
/// network for a small fraction of its time.
const MISSING_BATCH: usize = 256;

/// Chunk uploads in flight at once to an origin URL. Each `PUT` waits for the origin to flush
/// the chunk to disk, so a few in flight keep the link busy; four stay well under the origin's
/// limit on concurrent writes when several publishers upload at once.
const UPLOAD_WORKERS: usize = 4;

/// A chunk on its way to the writers.
type NewChunk = (ChunkHash, Vec<u8>);

/// Why the chunking pass stopped taking chunks.
#[derive(Debug, thiserror::Error)]
enum IntakeError {
    /// The chunk writers stopped; their own error says why.
    #[error("the chunk writer stopped")]
    WriterStopped,
    /// The origin could not say which chunks it lacks.
    #[error("cannot ask the origin which chunks it lacks")]
    Query(#[source] StoreApiError),
}

/// Where a publish writes.
enum Origin {
    /// A store directory, written directly.
    Dir(ChunkStore),
    /// A running origin's store API.
    Remote(StoreClient),
}

impl Origin {
    /// Opens `--origin`: an `http://` URL, or else a directory.
    fn open(origin: &Path, token_file: Option<&Path>) -> Result<Self> {
        let text = origin.to_str().unwrap_or_default();
        let is_http = text.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://"));
        if is_http {
            let token = token_file.map(read_token_file).transpose()?;
            return Ok(Self::Remote(StoreClient::new(text, token)?));
        }
        if let Some((scheme, _)) = text.split_once("://") {
            bail!(
                "origin {text:?}: {scheme}:// is not supported; give a directory or an \
                 http://HOST:PORT URL"
            );
        }
        Ok(Self::Dir(super::open_store(origin)?))
    }

    fn resolve_ref(&self, service: &str, version: &str) -> Result<Option<ManifestId>> {
        Ok(match self {
            Self::Dir(store) => store.resolve_ref(service, version)?,
            Self::Remote(client) => client.resolve_ref(service, version)?,
        })
    }

    /// Starts the writer threads in `scope` and the intake that feeds them.
    fn start<'scope, 'env>(
        &'env self,
        scope: &'scope Scope<'scope, 'env>,
        params: ChunkerParams,
    ) -> Result<(Intake<'env>, Writers<'scope>)> {
        // New chunks go to writer threads through a bounded queue, so that creating one file
        // per chunk (kernel time that dominates a first publish) or uploading it overlaps with
        // chunking and hashing instead of stalling them.
        let (tx, rx) = sync_channel::<NewChunk>(write_queue_depth(params));
        match self {
            Self::Dir(store) => {
                let mut batch = store.batch();
                let writer = std::thread::Builder::new()
                    .name("chunk-writer".into())
                    .spawn_scoped(scope, move || {
                        for (hash, data) in rx {
                            batch.put_prehashed(hash, &data)?;
                        }
                        Ok::<_, StoreError>(batch)
                    })
                    .context("cannot start the chunk writer thread")?;
                Ok((Intake::Dir { store, tx }, Writers::Dir(writer)))
            }
            Self::Remote(client) => {
                let failed = Arc::new(AtomicBool::new(false));
                let rx = Arc::new(Mutex::new(rx));
                let mut workers = Vec::with_capacity(UPLOAD_WORKERS);
                for n in 0..UPLOAD_WORKERS {
                    let (rx, failed) = (Arc::clone(&rx), Arc::clone(&failed));
                    let worker = std::thread::Builder::new()
                        .name(format!("chunk-upload-{n}"))
                        .spawn_scoped(scope, move || upload(client, &rx, &failed))
                        .context("cannot start the chunk upload threads")?;
                    workers.push(worker);
                }
                let intake = Intake::Remote(RemoteIntake {
                    client,
                    tx,
                    failed,
                    pending: Vec::with_capacity(MISSING_BATCH),
                    pending_bytes: 0,
                });
                Ok((intake, Writers::Remote(workers)))
            }
        }
    }

    /// What the progress bar says while the last chunks are made durable.
    fn finishing(&self) -> &'static str {
        match self {
            Self::Dir(_) => "syncing",
            Self::Remote(_) => "uploading",
        }
    }

    fn put_manifest(&self, id: &ManifestId, bytes: &[u8]) -> Result<()> {
        match self {
            Self::Dir(store) => store.put_manifest(id, bytes)?,
            Self::Remote(client) => {
                client.put_manifest(id, bytes).context("cannot upload the manifest")?
            }
        }
        Ok(())
    }

    fn set_ref(&self, service: &str, version: &str, id: &ManifestId) -> Result<()> {
        match self {
            Self::Dir(store) => store.set_ref(service, version, id)?,
            Self::Remote(client) => client
                .set_ref(service, version, id)
                .with_context(|| format!("cannot publish {service}@{version}"))?,
        }
        Ok(())
    }
}

/// Uploads chunks from the shared queue until it closes or any upload fails.
fn upload(
    client: &StoreClient,
    rx: &Mutex<Receiver<NewChunk>>,
    failed: &AtomicBool,
) -> Result<(), StoreApiError> {
    while !failed.load(Ordering::Relaxed) {
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok((hash, data)) = next else { break };
        if let Err(err) = client.put_chunk(&hash, &data) {
            // The others stop too; once they all have, the queue refuses chunks.
            failed.store(true, Ordering::Relaxed);
            return Err(err);
        }
    }
    Ok(())
}

/// First-seen chunks of the artifact, by what the origin already had.
#[derive(Debug, Default)]
struct Tally {
    new_chunks: u64,
    new_bytes: u64,
    reused_chunks: u64,
    reused_bytes: u64,
}

/// Decides which first-seen chunks the origin lacks and queues those for the writers.
enum Intake<'a> {
    Dir { store: &'a ChunkStore, tx: SyncSender<NewChunk> },
    Remote(RemoteIntake<'a>),
}

/// Chunks waiting for the answer to their `missing` query.
struct RemoteIntake<'a> {
    client: &'a StoreClient,
    tx: SyncSender<NewChunk>,
    failed: Arc<AtomicBool>,
    pending: Vec<NewChunk>,
    pending_bytes: usize,
}

impl Intake<'_> {
    fn offer(
        &mut self,
        hash: ChunkHash,
        data: &[u8],
        tally: &mut Tally,
    ) -> Result<(), IntakeError> {
        let len = data.len() as u64;
        match self {
            Self::Dir { store, tx } => {
                if store.has(&hash) {
                    tally.reused_chunks += 1;
                    tally.reused_bytes += len;
                    return Ok(());
                }
                tx.send((hash, data.to_vec())).map_err(|_| IntakeError::WriterStopped)?;
                tally.new_chunks += 1;
                tally.new_bytes += len;
                Ok(())
            }
            Self::Remote(remote) => {
                if remote.failed.load(Ordering::Relaxed) {
                    return Err(IntakeError::WriterStopped);
                }
                remote.pending.push((hash, data.to_vec()));
                remote.pending_bytes += data.len();
                if remote.pending.len() >= MISSING_BATCH
                    || remote.pending_bytes >= WRITE_QUEUE_BYTES
                {
                    remote.flush(tally)?;
                }
                Ok(())
            }
        }
    }

    /// Queues what is still pending after a complete pass; dropping the intake closes the queue.
    fn finish(self, tally: &mut Tally) -> Result<(), IntakeError> {
        match self {
            Self::Dir { .. } => Ok(()),
            Self::Remote(mut remote) => remote.flush(tally),
        }
    }
}

impl RemoteIntake<'_> {
    /// Asks the origin which pending chunks it lacks and queues those.
    fn flush(&mut self, tally: &mut Tally) -> Result<(), IntakeError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let hashes: Vec<ChunkHash> = self.pending.iter().map(|(hash, _)| *hash).collect();
        let lacking: HashSet<ChunkHash> =
            self.client.missing(&hashes).map_err(IntakeError::Query)?.into_iter().collect();
        for (hash, data) in self.pending.drain(..) {
            let len = data.len() as u64;
            if !lacking.contains(&hash) {
                tally.reused_chunks += 1;
                tally.reused_bytes += len;
                continue;
            }
            self.tx.send((hash, data)).map_err(|_| IntakeError::WriterStopped)?;
            tally.new_chunks += 1;
            tally.new_bytes += len;
        }
        self.pending_bytes = 0;
        Ok(())
    }
}

/// The threads storing new chunks.
enum Writers<'scope> {
    /// One thread writing a batch into the directory, committed after the pass.
    Dir(ScopedJoinHandle<'scope, Result<WriteBatch, StoreError>>),
    /// Threads uploading to the store API; each chunk is durable once its upload returns.
    Remote(Vec<ScopedJoinHandle<'scope, Result<(), StoreApiError>>>),
}

/// What the writers leave to do once the pass is known to be good.
enum Stored {
    Dir(WriteBatch),
    Remote,
}

impl Writers<'_> {
    /// Waits for the writers (the queue must be closed) and returns the first error.
    fn join(self) -> Result<Stored> {
        fn join<T>(thread: ScopedJoinHandle<'_, T>) -> T {
            thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }
        match self {
            Self::Dir(writer) => Ok(Stored::Dir(join(writer).context("publish failed")?)),
            Self::Remote(workers) => {
                let results: Vec<_> = workers.into_iter().map(join).collect();
                for result in results {
                    result.context("cannot upload chunks to the origin")?;
                }
                Ok(Stored::Remote)
            }
        }
    }
}

impl Stored {
    fn commit(self) -> Result<()> {
        if let Self::Dir(batch) = self {
            batch.commit().context("cannot write chunks to the origin")?;
        }
        Ok(())
    }
}

pub(crate) fn run(publish: &impl Publish) -> Result<Report> {
    let opts = publish.options();
    validate_name(&opts.service)
        .map_err(|reason| anyhow::anyhow!("invalid service name {:?}: {reason}", opts.service))?;
    validate_name(&opts.version)
        .map_err(|reason| anyhow::anyhow!("invalid version name {:?}: {reason}", opts.version))?;
    let key = SigningKey::read_file(&opts.key).context("cannot load signing key")?;
    let mut stream = ArtifactStream::open(&opts.path).context("cannot read artifact")?;
    let origin = Origin::open(&opts.origin, publish.upload_token_file())?;
    if let Some(existing) = origin.resolve_ref(&opts.service, &opts.version)? {
        bail!(
            "{}@{} is already published as manifest {existing}; versions are immutable, \
             publish a new version",
            opts.service,
            opts.version
        );
    }
    let kind = stream.kind;
    let bar = progress::bytes(stream.size_hint, "publishing", opts.quiet);

    let mut seen: HashSet<ChunkHash> = HashSet::new();
    let mut tally = Tally::default();
    let (mut repeated_chunks, mut repeated_bytes) = (0, 0);
    let (summary, flushed, stored) = std::thread::scope(|scope| -> Result<_> {
        let (mut intake, writers) = origin.start(scope, opts.params)?;
        let summary = chunk_stream(&mut stream, opts.params, |chunk| {
            bar.set_position(chunk.offset + chunk.data.len() as u64);
            if !seen.insert(chunk.hash) {
                // A repeat within this artifact: counted once, stored once.
                repeated_chunks += 1;
                repeated_bytes += chunk.data.len() as u64;
                return Ok(());
            }
            intake.offer(chunk.hash, chunk.data, &mut tally)
        });
        // Only a complete pass queues its last chunks; either way the queue closes here.
        let flushed = if summary.is_ok() {
            intake.finish(&mut tally)
        } else {
            drop(intake);
            Ok(())
        };
        bar.set_message(origin.finishing());
        let stored = writers.join();
        Ok((summary, flushed, stored))
    })?;
    // A packing error ends the stream early: check the packer before trusting the summary.
    let packed = stream.finish();
    // The writers' error is the cause when they stopped the pass (`WriterStopped`).
    let stored = stored?;
    let summary = summary.context("publish failed")?;
    flushed.context("publish failed")?;
    packed.with_context(|| format!("cannot pack {}", opts.path.display()))?;
    stored.commit()?;
    bar.finish_and_clear();

    let manifest = Manifest::from_summary(
        opts.service.clone(),
        opts.version.clone(),
        kind,
        opts.params,
        summary,
        opts.build.clone(),
    )
    .context("cannot build manifest")?;
    let signed = key.sign(manifest);
    let id = signed.id();
    // Chunks are durable before the manifest that names them becomes visible, and the manifest
    // before the ref that names it.
    let envelope = signed.encode();
    origin.put_manifest(&id, &envelope)?;
    origin.set_ref(&opts.service, &opts.version, &id)?;
    tracing::info!(manifest = %id, service = %opts.service, version = %opts.version, "published");
    let Tally { new_chunks, new_bytes, reused_chunks, reused_bytes } = tally;
    Ok(Report {
        id,
        manifest: signed.manifest().clone(),
        envelope,
        new_chunks,
        new_bytes,
        reused_chunks,
        reused_bytes,
        repeated_chunks,
        repeated_bytes,
    })
}
