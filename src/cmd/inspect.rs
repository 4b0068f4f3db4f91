//! `fleetwave inspect`: what a manifest holds, and what it shares with another.

use anyhow::Result;
use indicatif::HumanBytes;

use fleetwave_chunker::ArtifactKind;
use fleetwave_chunker::diff::diff;
use fleetwave_node::store::ChunkStore;

pub(crate) fn run(store: &ChunkStore, spec: &str, against: Option<&str>) -> Result<()> {
    let id = super::resolve(store, spec)?;
    let signed = super::load(store, id)?;
    let m = signed.manifest();
    println!("manifest:  {id}");
    println!("service:   {}", m.service);
    println!("version:   {}", m.version);
    let kind = match m.kind {
        ArtifactKind::File => "file",
        ArtifactKind::Tree => "tree (packed directory)",
    };
    println!("kind:      {kind}");
    println!("size:      {} ({} bytes)", HumanBytes(m.size), m.size);
    println!("sha256:    {}", m.sha256);
    println!("blake3:    {}", m.blake3);
    println!(
        "chunker:   fastcdc-v2020 min {} avg {} max {}",
        HumanBytes(m.chunker.min_size.into()),
        HumanBytes(m.chunker.avg_size.into()),
        HumanBytes(m.chunker.max_size.into())
    );
    let unique = m.unique_chunks();
    println!("chunks:    {} ({} distinct)", m.chunks.len(), unique.len());
    print_distribution(&m.chunks.iter().map(|c| u64::from(c.length)).collect::<Vec<_>>());
    let b = &m.build;
    println!("commit:    {}", if b.commit.is_empty() { "-" } else { &b.commit });
    println!("builder:   {}", b.builder);
    println!("built at:  {} (unix seconds)", b.built_at_unix);
    for (k, v) in &b.labels {
        println!("label:     {k}={v}");
    }
    for key in signed.signers() {
        println!("signed by: {key}");
    }
    if let Some(other_spec) = against {
        let other_id = super::resolve(store, other_spec)?;
        let other = super::load(store, other_id)?;
        let d = diff(m, [other.manifest()]);
        let o = other.manifest();
        println!("against:   {}@{} ({other_id})", o.service, o.version);
        println!(
            "shared:    {} chunks, {} ({} bytes)",
            d.reused_chunks,
            HumanBytes(d.reused_bytes),
            d.reused_bytes
        );
        println!(
            "new:       {} chunks, {} ({} bytes)",
            d.missing.len(),
            HumanBytes(d.missing_bytes),
            d.missing_bytes
        );
    }
    Ok(())
}

fn print_distribution(lengths: &[u64]) {
    if lengths.is_empty() {
        return;
    }
    let mut sorted = lengths.to_vec();
    sorted.sort_unstable();
    let pct = |p: usize| sorted[(sorted.len() - 1) * p / 100];
    let mean = sorted.iter().sum::<u64>() / sorted.len() as u64;
    println!(
        "sizes:     min {} p10 {} p50 {} mean {} p90 {} max {}",
        HumanBytes(sorted[0]),
        HumanBytes(pct(10)),
        HumanBytes(pct(50)),
        HumanBytes(mean),
        HumanBytes(pct(90)),
        HumanBytes(sorted[sorted.len() - 1])
    );
    // Histogram by power-of-two buckets.
    let mut buckets: std::collections::BTreeMap<u32, usize> = Default::default();
    for &l in &sorted {
        *buckets.entry(63 - l.max(1).leading_zeros()).or_default() += 1;
    }
    let most = buckets.values().copied().max().unwrap_or(1);
    for (bit, count) in buckets {
        let bar = "#".repeat((count * 40).div_ceil(most));
        println!("  >= {:>9}: {count:>7} {bar}", HumanBytes(1u64 << bit).to_string());
    }
}
