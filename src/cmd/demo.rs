//! `fleetwave demo`: the product on one machine, with no configuration.
//!
//! Generates a sample service tree, publishes it to a temporary local origin, changes a few
//! files and publishes the second version (which reuses most chunks), verifies both against the
//! signing key, and unpacks the second version as a host would.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use indicatif::HumanBytes;
use rand::{RngCore, SeedableRng};

use fleetwave_chunker::{BuildInfo, ChunkerParams, SigningKey};

use super::{publish, verify};

pub(crate) fn run(keep: bool) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("fleetwave-demo-").tempdir()?;
    let root = tmp.path();
    println!("Fleetwave demo in {}", root.display());

    let src = root.join("src/web");
    let key_path = root.join("keys/release.key");
    let origin = root.join("origin");
    std::fs::create_dir_all(root.join("keys"))?;
    let key = SigningKey::generate();
    key.write_files(&key_path)?;
    println!("\n== signing key {}", key.verifying_key());

    generate_tree(&src)?;
    println!("\n== publish web 1.0.0 (a {} tree)", HumanBytes(tree_bytes(&src)?));
    let v1 = publish::run(&options(&src, "1.0.0", &key_path, &origin))?;
    v1.report_indented();

    edit_tree(&src)?;
    println!("\n== change 3 files, publish web 1.0.1");
    let v2 = publish::run(&options(&src, "1.0.1", &key_path, &origin))?;
    v2.report_indented();
    let total = v2.manifest.size;
    println!(
        "   => 1.0.1 moved {} of {} ({:.1}%); {} chunks reused from 1.0.0",
        HumanBytes(v2.new_bytes),
        HumanBytes(total),
        100.0 * v2.new_bytes as f64 / total.max(1) as f64,
        v2.reused_chunks
    );

    println!("\n== verify both against the public key");
    let store = super::open_store(&origin)?;
    let trust = vec![fleetwave_chunker::sign::public_path(&key_path)];
    for spec in ["web@1.0.0", "web@1.0.1"] {
        let r = verify::run(&store, spec, &trust, false)?;
        println!(
            "   {spec}: {} chunks and the whole {} re-hashed, signature valid",
            r.chunks,
            HumanBytes(r.size)
        );
    }

    println!("\n== unpack web 1.0.1 as a host would");
    let release = root.join("releases/web/1.0.1");
    std::fs::create_dir_all(root.join("releases/web"))?;
    let signed = super::load(&store, v2.id)?;
    let mut stream = Vec::with_capacity(signed.manifest().size as usize);
    for chunk in &signed.manifest().chunks {
        stream.extend_from_slice(&store.get(&chunk.hash)?);
    }
    let stats = fleetwave_chunker::unpack::unpack(&stream[..], &release)?;
    let mut repacked = Vec::new();
    fleetwave_chunker::pack::pack_tree(&release, &mut repacked)?;
    ensure!(repacked == stream, "unpacked release does not re-pack to the published stream");
    println!(
        "   {} files, {} dirs, {} symlinks in {}; re-packs to the identical stream",
        stats.files,
        stats.dirs,
        stats.symlinks,
        release.display()
    );

    if keep {
        let kept = tmp.keep();
        println!("\nkept {}", kept.display());
    } else {
        println!("\ncleaned up; demo complete");
    }
    Ok(())
}

fn options(src: &Path, version: &str, key: &Path, origin: &Path) -> publish::Options {
    publish::Options {
        path: src.to_owned(),
        service: "web".into(),
        version: version.into(),
        key: key.to_owned(),
        origin: origin.to_owned(),
        params: ChunkerParams::DEFAULT,
        build: BuildInfo {
            commit: format!("demo-{version}"),
            builder: "fleetwave-demo".into(),
            built_at_unix: publish::now_unix(),
            labels: Default::default(),
        },
        quiet: true,
    }
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![0u8; len];
    rng.fill_bytes(&mut out);
    out
}

fn write(path: &Path, data: &[u8], executable: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, data).with_context(|| format!("cannot write {}", path.display()))?;
    let mode = if executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// A service tree: a server binary, a shared library, static assets, config, a symlink.
fn generate_tree(src: &Path) -> Result<()> {
    write(&src.join("bin/web-server"), &random_bytes(1, 24 << 20), true)?;
    write(&src.join("lib/libweb.so"), &random_bytes(2, 8 << 20), false)?;
    for i in 0..200 {
        let page = format!(
            "<html><body><h1>page {i}</h1>{}</body></html>\n",
            "lorem ipsum ".repeat(i * 7)
        );
        write(&src.join(format!("static/page-{i:03}.html")), page.as_bytes(), false)?;
    }
    write(&src.join("etc/web.toml"), b"port = 8080\nworkers = 16\n", false)?;
    std::os::unix::fs::symlink("web-server", src.join("bin/web"))?;
    Ok(())
}

/// A small release: a patch in the binary, a config change, one new page.
fn edit_tree(src: &Path) -> Result<()> {
    let bin = src.join("bin/web-server");
    let mut data = std::fs::read(&bin)?;
    let mid = data.len() / 2;
    data[mid..mid + 4096].copy_from_slice(&random_bytes(3, 4096));
    write(&bin, &data, true)?;
    write(&src.join("etc/web.toml"), b"port = 8080\nworkers = 32\n", false)?;
    write(&src.join("static/new-feature.html"), b"<html>new</html>\n", false)?;
    Ok(())
}

fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() { tree_bytes(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}
