//! `fleetwave publish`: pack, chunk, hash, sign, upload what the origin lacks.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::mpsc::sync_channel;

use anyhow::{Context, Result, bail};
use indicatif::HumanBytes;

use fleetwave_chunker::cdc::chunk_stream;
use fleetwave_chunker::manifest::validate_name;
use fleetwave_chunker::pack::ArtifactStream;
use fleetwave_chunker::{BuildInfo, ChunkHash, ChunkerParams, Manifest, ManifestId, SigningKey};
use fleetwave_node::store::StoreError;

use crate::cli::PublishArgs;
use crate::progress;

/// Everything publish needs, resolved from flags, environment and defaults.
#[derive(Debug)]
pub(crate) struct Options {
    pub(crate) path: PathBuf,
    pub(crate) service: String,
    pub(crate) version: String,
    pub(crate) key: PathBuf,
    pub(crate) origin: PathBuf,
    pub(crate) params: ChunkerParams,
    pub(crate) build: BuildInfo,
    pub(crate) quiet: bool,
}

impl Options {
    pub(crate) fn from_args(args: PublishArgs) -> Result<Self> {
        let params = ChunkerParams::with_avg(args.chunk_avg);
        params.validate().context("bad --chunk-avg")?;
        let builder = args.builder.unwrap_or_else(default_builder);
        let built_at_unix = args.built_at.unwrap_or_else(now_unix);
        Ok(Self {
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
        })
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

/// Bytes of new chunks that may wait for the writer thread before chunking blocks.
///
/// Enough to ride out a slow file creation without stalling the chunker, small against the
/// memory bound of a publish (peak RSS <= 256 MiB whatever the input size).
const WRITE_QUEUE_BYTES: usize = 32 << 20;

/// Chunks that fit in [`WRITE_QUEUE_BYTES`] at the largest chunk size (at least one).
fn write_queue_depth(params: ChunkerParams) -> usize {
    (WRITE_QUEUE_BYTES / (params.max_size as usize).max(1)).max(1)
}

/// The chunk writer thread stopped taking chunks; its own error says why.
#[derive(Debug, thiserror::Error)]
#[error("the chunk writer stopped")]
struct WriterStopped;

pub(crate) fn run(opts: &Options) -> Result<Report> {
    validate_name(&opts.service)
        .map_err(|reason| anyhow::anyhow!("invalid service name {:?}: {reason}", opts.service))?;
    validate_name(&opts.version)
        .map_err(|reason| anyhow::anyhow!("invalid version name {:?}: {reason}", opts.version))?;
    let key = SigningKey::read_file(&opts.key).context("cannot load signing key")?;
    let mut stream = ArtifactStream::open(&opts.path).context("cannot read artifact")?;
    let store = super::open_store(&opts.origin)?;
    if let Some(existing) = store.resolve_ref(&opts.service, &opts.version)? {
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
    let (mut new_chunks, mut new_bytes, mut reused_chunks, mut reused_bytes) = (0, 0, 0, 0);
    let (mut repeated_chunks, mut repeated_bytes) = (0, 0);
    let (summary, written) = std::thread::scope(|scope| -> Result<_> {
        // New chunks go to a writer thread through a bounded queue, so that creating and
        // writing one file per chunk (kernel time that dominates a first publish) overlaps
        // with chunking and hashing instead of stalling them.
        let (tx, rx) = sync_channel::<(ChunkHash, Vec<u8>)>(write_queue_depth(opts.params));
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
        let summary = chunk_stream(&mut stream, opts.params, |chunk| {
            bar.set_position(chunk.offset + chunk.data.len() as u64);
            let len = chunk.data.len() as u64;
            if !seen.insert(chunk.hash) {
                // A repeat within this artifact: counted once, stored once.
                repeated_chunks += 1;
                repeated_bytes += len;
                return Ok::<(), WriterStopped>(());
            }
            if store.has(&chunk.hash) {
                reused_chunks += 1;
                reused_bytes += len;
                return Ok(());
            }
            tx.send((chunk.hash, chunk.data.to_vec())).map_err(|_| WriterStopped)?;
            new_chunks += 1;
            new_bytes += len;
            Ok(())
        });
        drop(tx);
        let written = writer.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok((summary, written))
    })?;
    // A packing error ends the stream early: check the packer before trusting the summary.
    let packed = stream.finish();
    // The writer's error is the cause when it stopped the pass (`WriterStopped`).
    let batch = written.context("publish failed")?;
    let summary = summary.context("publish failed")?;
    packed.with_context(|| format!("cannot pack {}", opts.path.display()))?;
    bar.set_message("syncing");
    batch.commit().context("cannot write chunks to the origin")?;
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
    store.put_manifest(&id, &signed.encode())?;
    store.set_ref(&opts.service, &opts.version, &id)?;
    tracing::info!(manifest = %id, service = %opts.service, version = %opts.version, "published");
    Ok(Report {
        id,
        manifest: signed.manifest().clone(),
        new_chunks,
        new_bytes,
        reused_chunks,
        reused_bytes,
        repeated_chunks,
        repeated_bytes,
    })
}
