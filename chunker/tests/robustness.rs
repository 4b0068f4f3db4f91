//! Untrusted bytes never panic the decoders or the unpacker (the fuzz targets' properties, run
//! with random and mutated inputs on every `cargo test`).

mod common;

use proptest::prelude::*;

use fleetwave_chunker::cdc::chunk_stream;
use fleetwave_chunker::unpack::unpack;
use fleetwave_chunker::{
    ArtifactKind, BuildInfo, ChunkerParams, Manifest, SignedManifest, SigningKey,
};

fn valid_signed() -> Vec<u8> {
    let data = common::pseudo_random(11, 200_000);
    let params = ChunkerParams::with_avg(4096);
    let summary =
        chunk_stream(&data[..], params, |_| Ok::<(), std::io::Error>(())).expect("chunks");
    let manifest = Manifest::from_summary(
        "web".into(),
        "1.0.0".into(),
        ArtifactKind::File,
        params,
        summary,
        BuildInfo::default(),
    )
    .expect("valid");
    SigningKey::from_seed([3; 32]).sign(manifest).encode()
}

fn valid_tree_stream() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    common::write_file(&dir.path().join("a/b.txt"), b"hello", false);
    common::write_file(&dir.path().join("run.sh"), b"#!/bin/sh\n", true);
    std::os::unix::fs::symlink("a/b.txt", dir.path().join("link")).expect("symlink");
    let mut out = Vec::new();
    fleetwave_chunker::pack::pack_tree(dir.path(), &mut out).expect("packs");
    out
}

fn check_decoders(bytes: &[u8]) {
    if let Ok(m) = Manifest::decode(bytes) {
        assert_eq!(m.encode(), bytes, "accepted a non-canonical manifest");
    }
    if let Ok(s) = SignedManifest::decode(bytes) {
        assert_eq!(Manifest::decode(s.manifest_bytes()).ok().as_ref(), Some(s.manifest()));
    }
}

fn check_unpack(bytes: &[u8]) {
    let parent = tempfile::tempdir().expect("tempdir");
    let ok = unpack(bytes, &parent.path().join("release")).is_ok();
    let left = std::fs::read_dir(parent.path()).expect("ls").count();
    assert_eq!(left, usize::from(ok), "unpack left {left} entries (ok = {ok})");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        check_decoders(&bytes);
    }

    #[test]
    fn mutated_manifests_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let mut bytes = valid_signed();
        for (pos, val) in flips {
            let i = pos % bytes.len();
            bytes[i] ^= val;
        }
        check_decoders(&bytes);
        bytes.truncate(cut % (bytes.len() + 1));
        check_decoders(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn mutated_tree_streams_never_panic_or_leak(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>()) {
        let mut bytes = valid_tree_stream();
        for (pos, val) in flips {
            let i = pos % bytes.len();
            bytes[i] ^= val;
        }
        check_unpack(&bytes);
        bytes.truncate(cut % (bytes.len() + 1));
        check_unpack(&bytes);
    }
}
