//! `fleetwave publish`: pack, chunk, hash, sign, upload what the origin lacks.

use std::collections::HashSet;
use std::path::PathBuf;

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
    pub(crate) reused_chunks: u64,
    pub(crate) reused_bytes: u64,
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
    }
}

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

    let mut batch = store.batch();
    let mut seen: HashSet<ChunkHash> = HashSet::new();
    let (mut new_chunks, mut new_bytes, mut reused_chunks, mut reused_bytes) = (0, 0, 0, 0);
    let summary = chunk_stream(&mut stream, opts.params, |chunk| {
        bar.set_position(chunk.offset + chunk.data.len() as u64);
        let len = chunk.data.len() as u64;
        if !seen.insert(chunk.hash) || store.has(&chunk.hash) {
            reused_chunks += 1;
            reused_bytes += len;
            return Ok::<(), StoreError>(());
        }
        batch.put_prehashed(chunk.hash, chunk.data)?;
        new_chunks += 1;
        new_bytes += len;
        Ok(())
    });
    // A packing error ends the stream early: check the packer before trusting the summary.
    let packed = stream.finish();
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
    })
}
