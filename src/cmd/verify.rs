//! `fleetwave verify`: re-hash every chunk and the whole artifact, check the signature.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use indicatif::HumanBytes;

use fleetwave_chunker::{ManifestId, TrustedKeys, VerifyingKey};
use fleetwave_node::store::ChunkStore;

use crate::progress;

#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) id: ManifestId,
    pub(crate) label: String,
    pub(crate) size: u64,
    pub(crate) chunks: usize,
    pub(crate) signer: Option<VerifyingKey>,
}

impl Report {
    pub(crate) fn print(&self) {
        println!("verified {} ({})", self.label, self.id);
        println!("chunks:    {} re-hashed, all match", self.chunks);
        println!(
            "whole:     {} ({} bytes), SHA-256 and BLAKE3 match",
            HumanBytes(self.size),
            self.size
        );
        match &self.signer {
            Some(key) => println!("signature: valid, by trusted key {key}"),
            None => println!("signature: NOT CHECKED (give --trust KEY.pub to check it)"),
        }
    }
}

pub(crate) fn run(
    store: &ChunkStore,
    spec: &str,
    trust: &[PathBuf],
    show_progress: bool,
) -> Result<Report> {
    let id = super::resolve(store, spec)?;
    let signed = super::load(store, id)?;
    let signer = if trust.is_empty() {
        None
    } else {
        let keys = TrustedKeys::read_files(trust).context("cannot load trusted keys")?;
        Some(signed.verify(&keys).with_context(|| format!("manifest {id} refused"))?)
    };
    let m = signed.manifest();
    let bar = progress::bytes(m.size, "verifying", !show_progress);
    let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
    let mut b3 = blake3::Hasher::new();
    let mut done = 0u64;
    for chunk in &m.chunks {
        let data = store.get(&chunk.hash).with_context(|| format!("manifest {id} is broken"))?;
        if data.len() != chunk.length as usize {
            bail!(
                "manifest {id} is broken: chunk {} is {} bytes, the manifest says {}",
                chunk.hash,
                data.len(),
                chunk.length
            );
        }
        sha.update(&data);
        b3.update(&data);
        done += data.len() as u64;
        bar.set_position(done);
    }
    bar.finish_and_clear();
    if sha.finish().as_ref() != m.sha256.as_bytes() {
        bail!("manifest {id} is broken: the whole artifact's SHA-256 does not match");
    }
    if b3.finalize().as_bytes() != m.blake3.as_bytes() {
        bail!("manifest {id} is broken: the whole artifact's BLAKE3 does not match");
    }
    Ok(Report {
        id,
        label: format!("{}@{}", m.service, m.version),
        size: m.size,
        chunks: m.chunks.len(),
        signer,
    })
}
