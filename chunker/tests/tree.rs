//! Packing and unpacking: determinism, round trips, small edits, and every refusal.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use fleetwave_chunker::cdc::chunk_stream;
use fleetwave_chunker::pack::{ArtifactStream, PackError, pack_tree};
use fleetwave_chunker::unpack::{Refusal, UnpackError, unpack};
use fleetwave_chunker::{ArtifactKind, ChunkHash, ChunkerParams};

fn packed(root: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    pack_tree(root, &mut out).expect("packs");
    out
}

fn sample_tree(root: &Path) {
    common::write_file(&root.join("bin/server"), b"#!/bin/sh\necho hi\n", true);
    common::write_file(&root.join("etc/config.toml"), b"port = 8080\n", false);
    common::write_file(&root.join("lib/data.bin"), &common::pseudo_random(3, 300_000), false);
    let long = "d".repeat(120);
    common::write_file(&root.join(format!("{long}/{long}/deep.txt")), b"long names", false);
    std::fs::create_dir_all(root.join("empty")).expect("mkdir");
    std::os::unix::fs::symlink("../lib/data.bin", root.join("bin/data")).expect("symlink");
}

#[test]
fn same_tree_same_bytes_whatever_the_noise() {
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    sample_tree(a.path());
    sample_tree(b.path());
    // Noise that must not matter: mtimes and non-exec permission bits.
    std::fs::set_permissions(b.path().join("etc/config.toml"), PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let f = std::fs::File::options().write(true).open(b.path().join("lib/data.bin")).expect("open");
    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(12345)).expect("mtime");
    assert_eq!(packed(a.path()), packed(b.path()));
    // The executable bit does matter.
    std::fs::set_permissions(b.path().join("etc/config.toml"), PermissionsExt::from_mode(0o700))
        .expect("chmod");
    assert_ne!(packed(a.path()), packed(b.path()));
}

#[test]
fn round_trip_through_the_chunker() {
    let src = tempfile::tempdir().expect("tempdir");
    sample_tree(src.path());
    let out = tempfile::tempdir().expect("tempdir");
    let dest = out.path().join("release");
    assert_round_trip(src.path(), &dest);
}

fn assert_round_trip(src: &Path, dest: &Path) {
    let mut stream = ArtifactStream::open(src).expect("opens");
    assert_eq!(stream.kind, ArtifactKind::Tree);
    let mut chunks: Vec<(ChunkHash, Vec<u8>)> = Vec::new();
    let summary = chunk_stream(&mut stream, ChunkerParams::with_avg(4096), |c| {
        chunks.push((c.hash, c.data.to_vec()));
        Ok::<(), std::io::Error>(())
    })
    .expect("chunks");
    stream.finish().expect("packer finished");
    let reassembled: Vec<u8> = chunks.iter().flat_map(|(_, d)| d.iter().copied()).collect();
    assert_eq!(reassembled.len() as u64, summary.size);
    unpack(&reassembled[..], dest).expect("unpacks");
    assert_eq!(common::snapshot(src), common::snapshot(dest));
}

#[test]
fn single_file_is_taken_as_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("app.bin");
    std::fs::write(&path, b"raw bytes").expect("write");
    let mut stream = ArtifactStream::open(&path).expect("opens");
    assert_eq!(stream.kind, ArtifactKind::File);
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut bytes).expect("reads");
    assert_eq!(bytes, b"raw bytes");
}

#[test]
fn missing_path_and_special_files_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(ArtifactStream::open(&dir.path().join("nope")), Err(PackError::Io { .. })));
    let _sock = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).expect("bind");
    let err = pack_tree(dir.path(), std::io::sink()).expect_err("refused");
    assert!(matches!(err, PackError::Unsupported { kind: "socket", .. }), "{err}");
}

#[test]
fn small_edit_in_large_tree_changes_few_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..40 {
        let data = common::pseudo_random(100 + i, 200_000);
        common::write_file(&dir.path().join(format!("f{i:02}.bin")), &data, false);
    }
    let params = ChunkerParams::with_avg(16 << 10);
    let before = hashes(dir.path(), params);
    // Change 100 bytes in the middle of one file.
    let target = dir.path().join("f17.bin");
    let mut data = std::fs::read(&target).expect("read");
    data[100_000..100_100].fill(0xAB);
    std::fs::write(&target, data).expect("write");
    let after = hashes(dir.path(), params);
    let changed = after.iter().filter(|h| !before.contains(h)).count();
    assert!(before.len() > 300, "{} chunks", before.len());
    assert!(changed <= 3, "{changed} of {} chunks changed", after.len());
}

fn hashes(root: &Path, params: ChunkerParams) -> Vec<ChunkHash> {
    let mut stream = ArtifactStream::open(root).expect("opens");
    let summary = chunk_stream(&mut stream, params, |_| Ok::<(), std::io::Error>(())).expect("ok");
    stream.finish().expect("packed");
    summary.chunks.iter().map(|c| c.hash).collect()
}

// ---- Refusals: hand-made hostile streams. ----

fn header(kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h
}

/// Writes raw header names, bypassing the tar crate's own path checks.
fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    name: &str,
    link: &str,
    data: &[u8],
) {
    let mut h = header(kind, data.len() as u64);
    let gnu = h.as_gnu_mut().expect("gnu header");
    gnu.name[..name.len()].copy_from_slice(name.as_bytes());
    gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_cksum();
    b.append(&h, data).expect("append");
}

fn hostile(entries: &[(tar::EntryType, &str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (kind, name, link) in entries {
        let data: &[u8] = if *kind == tar::EntryType::Regular { b"x" } else { b"" };
        raw_entry(&mut b, *kind, name, link, data);
    }
    b.into_inner().expect("finish")
}

fn assert_refused(stream: &[u8], expected: Refusal) {
    let parent = tempfile::tempdir().expect("tempdir");
    let dest = parent.path().join("release");
    match unpack(stream, &dest) {
        Err(UnpackError::Refused { reason, .. }) => assert_eq!(reason, expected),
        other => panic!("expected refusal {expected:?}, got {other:?}"),
    }
    // Nothing half-written: no destination, no temporary directory.
    let left: Vec<PathBuf> =
        std::fs::read_dir(parent.path()).expect("ls").map(|e| e.expect("e").path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

use tar::EntryType as T;

#[test]
fn refuses_absolute_paths() {
    assert_refused(&hostile(&[(T::Regular, "/etc/evil", "")]), Refusal::Absolute);
}

#[test]
fn refuses_parent_components() {
    assert_refused(&hostile(&[(T::Regular, "../evil", "")]), Refusal::ParentDir);
    assert_refused(
        &hostile(&[(T::Directory, "a/", ""), (T::Regular, "a/../../evil", "")]),
        Refusal::ParentDir,
    );
}

#[test]
fn refuses_escaping_symlinks() {
    assert_refused(&hostile(&[(T::Symlink, "link", "/etc/passwd")]), Refusal::SymlinkEscapes);
    assert_refused(&hostile(&[(T::Symlink, "link", "../outside")]), Refusal::SymlinkEscapes);
}

#[test]
fn refuses_writing_through_a_symlink() {
    // `a` points inside the tree, but a file under `a/` would be written through the link.
    assert_refused(
        &hostile(&[(T::Directory, "d/", ""), (T::Symlink, "a", "d"), (T::Regular, "a/f", "")]),
        Refusal::BadParent,
    );
}

#[test]
fn refuses_device_files_fifos_and_hard_links() {
    assert_refused(&hostile(&[(T::Char, "tty", "")]), Refusal::UnsupportedType);
    assert_refused(&hostile(&[(T::Block, "sda", "")]), Refusal::UnsupportedType);
    assert_refused(&hostile(&[(T::Fifo, "pipe", "")]), Refusal::UnsupportedType);
    assert_refused(
        &hostile(&[(T::Regular, "f", ""), (T::Link, "g", "f")]),
        Refusal::UnsupportedType,
    );
}

#[test]
fn refuses_duplicate_entries() {
    assert_refused(&hostile(&[(T::Regular, "f", ""), (T::Regular, "f", "")]), Refusal::Duplicate);
    assert_refused(&hostile(&[(T::Regular, "f", ""), (T::Regular, "./f", "")]), Refusal::Duplicate);
}

#[test]
fn refuses_existing_destination_and_garbage() {
    let parent = tempfile::tempdir().expect("tempdir");
    assert!(matches!(unpack(&b""[..], parent.path()), Err(UnpackError::DestinationExists { .. })));
    let dest = parent.path().join("release");
    let garbage = vec![0x41u8; 1024];
    assert!(matches!(unpack(&garbage[..], &dest), Err(UnpackError::Malformed(_))));
    assert!(!dest.exists());
}

// ---- Property: any tree survives pack -> chunk -> reassemble -> unpack. ----

#[derive(Debug, Clone)]
enum Gen {
    File(Vec<u8>, bool),
    Dir(Vec<(String, Gen)>),
    Link(usize),
}

fn gen_tree() -> impl Strategy<Value = Vec<(String, Gen)>> {
    let leaf = prop_oneof![
        4 => (proptest::collection::vec(any::<u8>(), 0..20_000), any::<bool>())
            .prop_map(|(d, x)| Gen::File(d, x)),
        1 => (0usize..8).prop_map(Gen::Link),
    ];
    let node = leaf.prop_recursive(3, 24, 6, |inner| {
        proptest::collection::vec(("[a-z]{1,8}", inner), 0..6).prop_map(Gen::Dir)
    });
    proptest::collection::vec(("[a-zA-Z0-9_.-]{1,12}", node), 1..8)
}

fn materialize(dir: &Path, entries: &[(String, Gen)], depth: usize) {
    let mut used = std::collections::HashSet::new();
    for (name, node) in entries {
        if name.starts_with('.') || !used.insert(name.clone()) {
            continue;
        }
        let path = dir.join(name);
        match node {
            Gen::File(data, x) => common::write_file(&path, data, *x),
            Gen::Dir(children) => {
                std::fs::create_dir_all(&path).expect("mkdir");
                materialize(&path, children, depth + 1);
            }
            // A relative link that stays inside the tree (dangling is fine).
            Gen::Link(n) => {
                let up = "../".repeat(depth.min(*n));
                std::os::unix::fs::symlink(format!("{up}target{n}"), &path).expect("symlink");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_tree_round_trips(entries in gen_tree()) {
        let src = tempfile::tempdir().expect("tempdir");
        materialize(src.path(), &entries, 0);
        let out = tempfile::tempdir().expect("tempdir");
        assert_round_trip(src.path(), &out.path().join("release"));
    }
}
