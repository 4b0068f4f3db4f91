//! Behaviour of the on-disk chunk, manifest and ref store, through its public API only.

#![cfg(unix)]

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use fleetwave_chunker::{ChunkHash, ManifestId};
use fleetwave_node::store::{
    ChunkStore, MAX_CHUNK_LEN, MAX_MANIFEST_LEN, MIN_PREFIX_LEN, NameError, NameKind, StoreError,
};

fn store() -> (tempfile::TempDir, ChunkStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ChunkStore::open(dir.path().join("store")).expect("open store");
    (dir, store)
}

fn chunk(seed: u32) -> (ChunkHash, Vec<u8>) {
    let data: Vec<u8> = format!("chunk number {seed} ").repeat(50).into_bytes();
    (ChunkHash::of(&data), data)
}

fn tmp_entries(store: &ChunkStore) -> Vec<String> {
    fs::read_dir(store.dir().join("tmp"))
        .expect("list tmp")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// Makes a stored (read-only) file writable so a test can damage it.
fn make_writable(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).expect("chmod");
}

#[test]
fn put_get_has_round_trip() {
    let (_dir, store) = store();
    let (hash, data) = chunk(1);
    assert!(!store.has(&hash));
    assert!(store.put(&hash, &data).expect("put"), "first put writes");
    assert!(store.has(&hash));
    assert_eq!(store.get(&hash).expect("get"), data);
    store.verify(&hash).expect("verify");
    assert!(!store.put(&hash, &data).expect("second put"), "second put is a no-op");

    let hex = hash.to_hex();
    let expected = store.dir().join("chunks").join(&hex[..2]).join(&hex);
    assert_eq!(store.path_of(&hash), expected);
    assert!(expected.is_file());
    assert!(tmp_entries(&store).is_empty());

    let empty = ChunkHash::of(b"");
    assert!(store.put(&empty, b"").expect("put empty chunk"));
    assert_eq!(store.get(&empty).expect("get empty chunk"), Vec::<u8>::new());
}

#[test]
fn put_with_wrong_hash_is_refused_and_leaves_nothing() {
    let (_dir, store) = store();
    let (claimed, _) = chunk(1);
    let (actual, data) = chunk(2);
    match store.put(&claimed, &data) {
        Err(StoreError::HashMismatch { expected, actual: got }) => {
            assert_eq!(expected, claimed);
            assert_eq!(got, actual);
        }
        other => panic!("expected HashMismatch, got {other:?}"),
    }
    assert!(!store.has(&claimed));
    assert!(!store.has(&actual));
    assert!(!store.path_of(&claimed).exists());
    assert!(tmp_entries(&store).is_empty());
    assert_eq!(store.len().expect("len"), 0);
}

#[test]
fn oversized_chunk_is_refused() {
    let (_dir, store) = store();
    let data = vec![7u8; MAX_CHUNK_LEN + 1];
    let hash = ChunkHash::of(&data);
    assert!(matches!(
        store.put(&hash, &data),
        Err(StoreError::ChunkTooLarge { len, limit: MAX_CHUNK_LEN, .. }) if len == data.len()
    ));
    let mut batch = store.batch();
    assert!(matches!(batch.put(&hash, &data), Err(StoreError::ChunkTooLarge { .. })));
    assert!(!store.has(&hash));
}

#[test]
fn corrupted_chunk_is_detected_by_get_and_verify() {
    let (_dir, store) = store();
    let (hash, data) = chunk(3);
    store.put(&hash, &data).expect("put");
    let path = store.path_of(&hash);
    make_writable(&path);
    let mut file = OpenOptions::new().write(true).open(&path).expect("open chunk file");
    file.seek(SeekFrom::Start(10)).expect("seek");
    file.write_all(&[data[10] ^ 0xff]).expect("flip a byte");
    drop(file);

    match store.get(&hash) {
        Err(StoreError::Corrupt { hash: h, path: p }) => {
            assert_eq!(h, hash);
            assert_eq!(p, path);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(store.verify(&hash), Err(StoreError::Corrupt { hash: h, .. }) if h == hash));
    // Existence is all `has` and `put` look at; repair is remove + put.
    assert!(store.has(&hash));
    assert!(!store.put(&hash, &data).expect("put over corrupt"));
    assert!(store.remove(&hash).expect("remove"));
    assert!(store.put(&hash, &data).expect("re-put"));
    assert_eq!(store.get(&hash).expect("get repaired"), data);

    // Truncation is corruption too.
    let path = store.path_of(&hash);
    make_writable(&path);
    OpenOptions::new().write(true).open(&path).expect("open").set_len(5).expect("truncate");
    assert!(matches!(store.get(&hash), Err(StoreError::Corrupt { .. })));
    assert!(matches!(store.verify(&hash), Err(StoreError::Corrupt { .. })));
}

#[test]
fn chunk_file_larger_than_the_cap_is_corrupt_not_read() {
    let (_dir, store) = store();
    let (hash, data) = chunk(4);
    store.put(&hash, &data).expect("put");
    let path = store.path_of(&hash);
    make_writable(&path);
    OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(MAX_CHUNK_LEN as u64 + 1)
        .expect("grow sparse");
    assert!(matches!(store.get(&hash), Err(StoreError::Corrupt { .. })));
    assert!(matches!(store.verify(&hash), Err(StoreError::Corrupt { .. })));
}

#[test]
fn missing_chunk_is_not_found() {
    let (_dir, store) = store();
    let (hash, _) = chunk(5);
    assert!(matches!(store.get(&hash), Err(StoreError::NotFound { hash: h }) if h == hash));
    assert!(matches!(store.verify(&hash), Err(StoreError::NotFound { .. })));
    assert!(!store.remove(&hash).expect("remove missing"));
}

#[test]
fn open_clears_leftovers_of_a_crashed_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("store");
    let (hash, data) = chunk(6);
    {
        let store = ChunkStore::open(&root).expect("open");
        store.put(&chunk(7).0, &chunk(7).1).expect("put");
    }
    // A writer died after writing the temporary file and before renaming it into place.
    fs::write(root.join("tmp").join(".tmpAbC123"), &data).expect("write leftover");
    fs::create_dir(root.join("tmp").join("half-done")).expect("leftover dir");
    fs::write(root.join("tmp").join("half-done").join("x"), b"x").expect("leftover in dir");

    let store = ChunkStore::open(&root).expect("reopen");
    assert!(tmp_entries(&store).is_empty(), "tmp/ cleared: {:?}", tmp_entries(&store));
    assert!(!store.has(&hash));
    assert!(store.has(&chunk(7).0), "committed chunks survive a reopen");
}

#[test]
fn a_second_open_leaves_live_temp_files_alone() {
    let (_dir, store) = store();
    let mut batch = store.batch();
    let (hash, data) = chunk(8);
    assert!(batch.put(&hash, &data).expect("batch put"));

    // Another handle (same process here; another process behaves the same) opens the store
    // while the batch is in flight: it must not delete the batch's temporary file.
    let other = ChunkStore::open(store.dir()).expect("second open");
    assert_eq!(tmp_entries(&other).len(), 1);
    let stats = batch.commit().expect("commit");
    assert_eq!(stats.chunks, 1);
    assert!(other.has(&hash));
}

#[test]
fn batch_commit_makes_every_chunk_visible() {
    let (_dir, store) = store();
    let (present, present_data) = chunk(100);
    store.put(&present, &present_data).expect("put");

    let mut batch = store.batch();
    let chunks: Vec<_> = (0..300).map(chunk).collect();
    let mut expected_bytes = 0u64;
    for (i, (hash, data)) in chunks.iter().enumerate() {
        let fresh = if i % 2 == 0 {
            batch.put(hash, data).expect("batch put")
        } else {
            batch.put_prehashed(*hash, data).expect("batch put_prehashed")
        };
        assert_eq!(fresh, *hash != present, "chunk {i}");
        if fresh {
            expected_bytes += data.len() as u64;
            assert!(!store.has(hash), "nothing visible before commit");
        }
    }
    assert!(!batch.put(&chunks[0].0, &chunks[0].1).expect("duplicate"), "dedup within batch");
    assert!(matches!(batch.put(&chunks[0].0, &chunks[1].1), Err(StoreError::HashMismatch { .. })));
    assert_eq!(batch.len(), 299);

    let stats = batch.commit().expect("commit");
    assert_eq!(stats.chunks, 299);
    assert_eq!(stats.bytes, expected_bytes);
    for (hash, data) in &chunks {
        assert_eq!(&store.get(hash).expect("get"), data);
    }
    assert!(tmp_entries(&store).is_empty());
    assert_eq!(store.len().expect("len"), 300);

    let empty = store.batch().commit().expect("empty commit");
    assert_eq!(empty.chunks, 0);
}

#[test]
fn dropped_batch_leaves_nothing() {
    let (_dir, store) = store();
    let chunks: Vec<_> = (0..20).map(chunk).collect();
    {
        let mut batch = store.batch();
        for (hash, data) in &chunks {
            assert!(batch.put(hash, data).expect("batch put"));
        }
        assert_eq!(tmp_entries(&store).len(), 20);
    }
    assert!(tmp_entries(&store).is_empty());
    for (hash, _) in &chunks {
        assert!(!store.has(hash));
    }
    assert!(store.is_empty().expect("is_empty"));
}

#[test]
fn iter_lists_stored_chunks_and_skips_strays() {
    let (_dir, store) = store();
    let mut hashes: Vec<ChunkHash> = (0..50)
        .map(|i| {
            let (hash, data) = chunk(i);
            store.put(&hash, &data).expect("put");
            hash
        })
        .collect();
    hashes.sort();
    // Things that are not chunks at the right place.
    let chunks = store.dir().join("chunks");
    fs::write(chunks.join("README"), b"hi").expect("stray file");
    fs::create_dir_all(chunks.join("zz")).expect("stray shard");
    let misplaced = chunk(999).0;
    let wrong_shard = if misplaced.to_hex().starts_with("00") { "01" } else { "00" };
    fs::create_dir_all(chunks.join(wrong_shard)).expect("shard");
    fs::write(chunks.join(wrong_shard).join(misplaced.to_hex()), b"x").expect("misplaced");
    fs::write(chunks.join(&hashes[0].to_hex()[..2]).join("notes.txt"), b"x").expect("stray");

    let mut listed: Vec<ChunkHash> = store.iter().collect::<Result<_, _>>().expect("iter");
    listed.sort();
    assert_eq!(listed, hashes);
    assert_eq!(store.len().expect("len"), 50);
    assert!(!store.is_empty().expect("is_empty"));
}

/// Whether this process can create files in a read-only directory (root, CAP_DAC_OVERRIDE).
fn bypasses_permissions(scratch: &Path) -> bool {
    let dir = scratch.join("ro-probe");
    fs::create_dir(&dir).expect("mkdir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o555)).expect("chmod");
    let writable = fs::write(dir.join("x"), b"x").is_ok();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod back");
    writable
}

#[test]
fn store_under_a_regular_file_fails_with_io_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file.txt");
    fs::write(&file, b"not a directory").expect("write");
    let root = file.join("store");
    match ChunkStore::open(&root) {
        Err(StoreError::Io { path, .. }) => {
            assert!(root.starts_with(&path) || path.starts_with(&root), "path {path:?}")
        }
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn unwritable_store_dir_fails_with_io_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    if bypasses_permissions(dir.path()) {
        // chmod does not stop this process; the regular-file test above covers the error path.
        return;
    }
    // A fresh directory that cannot be written to.
    let fresh = dir.path().join("fresh");
    fs::create_dir(&fresh).expect("mkdir");
    fs::set_permissions(&fresh, fs::Permissions::from_mode(0o555)).expect("chmod");
    let fresh_result = ChunkStore::open(&fresh);

    // An existing store whose directories were made read-only afterwards: only the probe in
    // tmp/ notices.
    let existing = dir.path().join("existing");
    drop(ChunkStore::open(&existing).expect("create store"));
    for sub in ["", "tmp", "chunks", "manifests", "refs"] {
        fs::set_permissions(existing.join(sub), fs::Permissions::from_mode(0o555)).expect("chmod");
    }
    let existing_result = ChunkStore::open(&existing);

    // Restore permissions so the tempdir can be deleted, then check.
    fs::set_permissions(&fresh, fs::Permissions::from_mode(0o755)).expect("chmod");
    for sub in ["", "tmp", "chunks", "manifests", "refs"] {
        fs::set_permissions(existing.join(sub), fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    for (root, result) in [(&fresh, fresh_result), (&existing, existing_result)] {
        match result {
            Err(err @ StoreError::Io { .. }) => {
                let StoreError::Io { path, source, .. } = &err else { unreachable!() };
                assert!(path.starts_with(root), "{path:?} not under {root:?}");
                assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied);
                let message = err.to_string();
                assert!(message.contains(&*root.to_string_lossy()), "{message}");
            }
            other => panic!("expected Io for {root:?}, got {other:?}"),
        }
    }
}

#[test]
fn manifests_round_trip() {
    let (_dir, store) = store();
    let id = ManifestId::of(b"canonical manifest");
    assert!(!store.has_manifest(&id));
    assert!(
        matches!(store.get_manifest(&id), Err(StoreError::ManifestNotFound { id: i }) if i == id)
    );

    store.put_manifest(&id, b"signed manifest v1").expect("put");
    assert!(store.has_manifest(&id));
    assert_eq!(store.get_manifest(&id).expect("get"), b"signed manifest v1");
    // Same id, one more signature: replaced.
    store.put_manifest(&id, b"signed manifest v1 + sig").expect("replace");
    assert_eq!(store.get_manifest(&id).expect("get"), b"signed manifest v1 + sig");

    let other = ManifestId::of(b"another");
    store.put_manifest(&other, b"x").expect("put");
    fs::write(store.dir().join("manifests").join("not-an-id"), b"x").expect("stray");
    let mut expected = vec![id, other];
    expected.sort();
    assert_eq!(store.list_manifests().expect("list"), expected);
    assert!(tmp_entries(&store).is_empty());

    assert!(store.remove_manifest(&other).expect("remove"));
    assert!(!store.remove_manifest(&other).expect("remove again"));
    assert_eq!(store.list_manifests().expect("list"), vec![id]);
}

#[test]
fn oversized_manifests_are_refused() {
    let (_dir, store) = store();
    let id = ManifestId::of(b"big");
    let big = vec![0u8; MAX_MANIFEST_LEN + 1];
    assert!(matches!(
        store.put_manifest(&id, &big),
        Err(StoreError::ManifestTooLarge { len, limit: MAX_MANIFEST_LEN, .. }) if len == big.len()
    ));
    assert!(!store.has_manifest(&id));

    // A file that got there some other way is refused before it is read.
    let path = store.dir().join("manifests").join(id.to_hex());
    fs::File::create(&path)
        .expect("create")
        .set_len(MAX_MANIFEST_LEN as u64 + 1)
        .expect("grow sparse");
    match store.get_manifest(&id) {
        Err(StoreError::FileTooLarge { path: p, len, limit }) => {
            assert_eq!(p, path);
            assert_eq!(len, MAX_MANIFEST_LEN as u64 + 1);
            assert_eq!(limit, MAX_MANIFEST_LEN as u64);
        }
        other => panic!("expected FileTooLarge, got {other:?}"),
    }

    let max = vec![1u8; MAX_MANIFEST_LEN];
    store.put_manifest(&id, &max).expect("a manifest at the cap fits");
    assert_eq!(store.get_manifest(&id).expect("get").len(), MAX_MANIFEST_LEN);
}

#[test]
fn refs_set_resolve_list() {
    let (_dir, store) = store();
    let a = ManifestId::of(b"a");
    let b = ManifestId::of(b"b");
    assert_eq!(store.resolve_ref("web", "1.4.2").expect("resolve"), None);
    assert_eq!(store.list_refs().expect("list"), vec![]);

    store.set_ref("web", "1.4.2", &a).expect("set");
    store.set_ref("web", "1.10.0+build_7", &b).expect("set");
    store.set_ref("api-gw", "2024.06.01-rc1", &a).expect("set");
    assert_eq!(store.resolve_ref("web", "1.4.2").expect("resolve"), Some(a));
    let raw = fs::read_to_string(store.dir().join("refs/web/1.4.2")).expect("read ref");
    assert_eq!(raw, format!("{}\n", a.to_hex()));

    store.set_ref("web", "1.4.2", &b).expect("move ref");
    assert_eq!(store.resolve_ref("web", "1.4.2").expect("resolve"), Some(b));

    fs::write(store.dir().join("refs/web/.hidden"), b"junk").expect("stray");
    assert_eq!(
        store.list_refs().expect("list"),
        vec![
            ("api-gw".to_owned(), "2024.06.01-rc1".to_owned(), a),
            ("web".to_owned(), "1.10.0+build_7".to_owned(), b),
            ("web".to_owned(), "1.4.2".to_owned(), b),
        ]
    );
    assert!(tmp_entries(&store).is_empty());

    assert!(store.remove_ref("web", "1.4.2").expect("remove"));
    assert!(!store.remove_ref("web", "1.4.2").expect("remove again"));
    assert_eq!(store.resolve_ref("web", "1.4.2").expect("resolve"), None);
}

#[test]
fn unparsable_ref_is_invalid_ref_naming_the_file() {
    let (_dir, store) = store();
    store.set_ref("web", "1", &ManifestId::of(b"a")).expect("set");
    let path = store.dir().join("refs/web/1");
    for junk in [&b"not a manifest id\n"[..], b"", &[0xff; 64], &[b'a'; 300]] {
        fs::write(&path, junk).expect("overwrite ref");
        match store.resolve_ref("web", "1") {
            Err(StoreError::InvalidRef { path: p, .. }) => assert_eq!(p, path),
            other => panic!("expected InvalidRef for {junk:?}, got {other:?}"),
        }
        assert!(matches!(store.list_refs(), Err(StoreError::InvalidRef { .. })));
    }
}

#[test]
fn unsafe_ref_names_are_rejected() {
    let (_dir, store) = store();
    let id = ManifestId::of(b"a");
    let long = "a".repeat(129);
    let cases: [(&str, &str, NameKind, NameError); 8] = [
        ("", "1", NameKind::Service, NameError::Empty),
        ("web", "", NameKind::Version, NameError::Empty),
        ("..", "1", NameKind::Service, NameError::LeadingDot),
        ("web", ".hidden", NameKind::Version, NameError::LeadingDot),
        ("a/b", "1", NameKind::Service, NameError::BadChar { ch: '/' }),
        ("web", "1 2", NameKind::Version, NameError::BadChar { ch: ' ' }),
        ("wéb", "1", NameKind::Service, NameError::BadChar { ch: 'é' }),
        ("web", &long, NameKind::Version, NameError::TooLong { len: 129, max: 128 }),
    ];
    for (service, version, kind, reason) in cases {
        let expect_invalid = |result: Result<(), StoreError>| match result {
            Err(StoreError::InvalidName { kind: k, reason: r, .. }) => {
                assert_eq!((k, &r), (kind, &reason), "{service:?}/{version:?}")
            }
            other => panic!("expected InvalidName for {service:?}/{version:?}, got {other:?}"),
        };
        expect_invalid(store.set_ref(service, version, &id));
        expect_invalid(store.resolve_ref(service, version).map(drop));
        expect_invalid(store.remove_ref(service, version).map(drop));
    }
    assert!(store.set_ref(&"s".repeat(128), "v", &id).is_ok(), "128 characters is fine");
    assert_eq!(fs::read_dir(store.dir().join("refs")).expect("list").count(), 1);
}

#[test]
fn manifest_prefixes_resolve() {
    let (_dir, store) = store();
    let with_prefix = |head: [u8; 5], fill: u8| {
        let mut bytes = [fill; 32];
        bytes[..5].copy_from_slice(&head);
        ManifestId::from_bytes(bytes)
    };
    let a = with_prefix([0xab, 0xcd, 0xef, 0x01, 0x11], 0x00);
    let b = with_prefix([0xab, 0xcd, 0xef, 0x01, 0x22], 0x00);
    let c = with_prefix([0x12, 0x34, 0x56, 0x78, 0x9a], 0xff);
    for id in [a, b, c] {
        store.put_manifest(&id, b"m").expect("put");
    }

    assert_eq!(store.resolve_manifest_prefix("12345678").expect("unique"), c);
    assert_eq!(store.resolve_manifest_prefix("ABCDEF0111").expect("upper case"), a);
    assert_eq!(store.resolve_manifest_prefix(&b.to_hex()).expect("whole id"), b);
    match store.resolve_manifest_prefix("abcdef01") {
        Err(StoreError::AmbiguousPrefix { prefix, candidates }) => {
            assert_eq!(prefix, "abcdef01");
            assert_eq!(candidates, vec![a, b]);
        }
        other => panic!("expected AmbiguousPrefix, got {other:?}"),
    }
    assert!(matches!(
        store.resolve_manifest_prefix("00000000"),
        Err(StoreError::PrefixNotFound { .. })
    ));
    assert!(matches!(
        store.resolve_manifest_prefix(&"a".repeat(MIN_PREFIX_LEN - 1)),
        Err(StoreError::PrefixTooShort { min: MIN_PREFIX_LEN, .. })
    ));
    for bad in ["xyzxyzxy", "abcdef01-", &"a".repeat(65)] {
        assert!(
            matches!(store.resolve_manifest_prefix(bad), Err(StoreError::InvalidPrefix { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn store_handles_are_shareable_across_threads() {
    let (_dir, store) = store();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                // Every thread writes the same chunks: concurrent puts of one chunk are harmless.
                for i in 0..25 {
                    let (hash, data) = chunk(i);
                    store.put(&hash, &data).expect("put");
                }
                t
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("thread");
    }
    assert_eq!(store.len().expect("len"), 25);
    for i in 0..25 {
        store.verify(&chunk(i).0).expect("verify");
    }
    assert!(tmp_entries(&store).is_empty());
}
