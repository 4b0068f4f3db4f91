//! Behaviour of the host's stage area through its public API, on real files in temp dirs:
//! staging in any order, refusals, crash resume, whole-artifact check, dedup, GC, status.

#![cfg(unix)]

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fleetwave_chunker::cdc::chunk_stream;
use fleetwave_chunker::pack::ArtifactStream;
use fleetwave_chunker::sign::SignatureError;
use fleetwave_chunker::{
    ArtifactKind, BuildInfo, ChunkHash, ChunkerParams, Manifest, ManifestId, SignedManifest,
    SigningKey, TrustedKeys,
};
use fleetwave_node::stage::{
    ChunkFault, FailReason, StageArea, StageError, StageJob, StageStatus, WholeCheck,
};
use fleetwave_node::swarm::{Bitfield, ChunkIndex};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Small chunks (256 B / 1 KiB / 4 KiB) so that a tree of a few hundred KB has a few hundred.
const PARAMS: ChunkerParams = ChunkerParams { min_size: 256, avg_size: 1024, max_size: 4096 };

const SERVICE: &str = "web";

/// A signed manifest and the bytes of its chunks, in order.
struct Artifact {
    signed: SignedManifest,
    chunks: Vec<Vec<u8>>,
}

impl Artifact {
    fn id(&self) -> ManifestId {
        self.signed.id()
    }

    fn manifest(&self) -> &Manifest {
        self.signed.manifest()
    }

    fn count(&self) -> u32 {
        self.chunks.len() as u32
    }

    fn stream(&self) -> Vec<u8> {
        self.chunks.concat()
    }
}

fn key() -> SigningKey {
    SigningKey::from_seed([7; 32])
}

fn trusted() -> TrustedKeys {
    TrustedKeys::new([key().verifying_key()])
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = vec![0u8; len];
    rng.fill(&mut out[..]);
    out
}

fn write_file(path: &Path, data: &[u8], executable: bool) {
    fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
    fs::write(path, data).expect("write");
    let mode = if executable { 0o755 } else { 0o644 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A tree of about 200 KB. `edit` changes a few small things (a config line, a few bytes in
/// the middle of the large file, one new file) so that most chunks stay the same.
fn make_tree(root: &Path, edit: u32) {
    write_file(&root.join("bin/server"), &random_bytes(1, 60_000), true);
    let mut data = random_bytes(2, 120_000);
    if edit > 0 {
        data[60_000..60_016].copy_from_slice(&[edit as u8; 16]);
        write_file(&root.join(format!("notes/v{edit}.txt")), b"what changed", false);
    }
    write_file(&root.join("lib/data.bin"), &data, false);
    write_file(
        &root.join("etc/config.toml"),
        format!("port = {}\n", 8080 + edit).as_bytes(),
        false,
    );
    write_file(&root.join("README"), b"fleetwave test tree\n", false);
    fs::create_dir_all(root.join("var/empty")).expect("mkdir");
    std::os::unix::fs::symlink("../lib/data.bin", root.join("bin/data")).expect("symlink");
    std::os::unix::fs::symlink("bin/server", root.join("run")).expect("symlink");
}

/// Packs, chunks and signs `path` (a tree or a single file) as `SERVICE`/`version`.
fn build(path: &Path, version: &str, key: &SigningKey) -> Artifact {
    let mut stream = ArtifactStream::open(path).expect("opens");
    let mut chunks = Vec::new();
    let summary = chunk_stream(&mut stream, PARAMS, |c| {
        chunks.push(c.data.to_vec());
        Ok::<(), std::io::Error>(())
    })
    .expect("chunks");
    let kind = stream.kind;
    stream.finish().expect("packed");
    let manifest = Manifest::from_summary(
        SERVICE.into(),
        version.into(),
        kind,
        PARAMS,
        summary,
        BuildInfo::default(),
    )
    .expect("valid manifest");
    Artifact { signed: key.sign(manifest), chunks }
}

fn tree_artifact(edit: u32, version: &str) -> (tempfile::TempDir, Artifact) {
    let src = tempfile::tempdir().expect("tempdir");
    make_tree(src.path(), edit);
    let artifact = build(src.path(), version, &key());
    (src, artifact)
}

fn shuffled(indices: impl IntoIterator<Item = ChunkIndex>, seed: u64) -> Vec<ChunkIndex> {
    let mut v: Vec<ChunkIndex> = indices.into_iter().collect();
    v.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    v
}

/// Writes every chunk the job lacks, in a shuffled order, syncing every `group` chunks, and
/// checks that each sync returns exactly the chunks written since the last one.
fn write_missing(job: &mut StageJob, artifact: &Artifact, group: usize) {
    let missing: Vec<ChunkIndex> =
        (0..artifact.count()).filter(|&i| !job.durable().contains(i)).collect();
    for batch in shuffled(missing, 42).chunks(group) {
        for &index in batch {
            job.write_chunk(index, &artifact.chunks[index as usize]).expect("write");
        }
        let mut expected = batch.to_vec();
        expected.sort_unstable();
        assert_eq!(job.sync().expect("sync"), expected);
    }
}

fn stage(area: &StageArea, artifact: &Artifact) -> PathBuf {
    let mut job = area.begin(&artifact.signed, &trusted()).expect("begin");
    write_missing(&mut job, artifact, 64);
    let finished = job.finish().expect("finish");
    finished.gc.expect("gc");
    finished.release.path
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()))
        .into_iter()
        .flatten()
        .collect();
    names.sort();
    names
}

/// Asserts that two trees hold the same entries: file contents, executable bits, symlink
/// targets, directories.
fn assert_same_tree(expected: &Path, actual: &Path) {
    assert_eq!(entries(expected), entries(actual), "entries of {}", actual.display());
    for name in entries(expected) {
        let (e, a) = (expected.join(&name), actual.join(&name));
        let (em, am) =
            (fs::symlink_metadata(&e).expect("stat"), fs::symlink_metadata(&a).expect("stat"));
        assert_eq!(em.file_type(), am.file_type(), "type of {}", a.display());
        if em.is_dir() {
            assert_same_tree(&e, &a);
        } else if em.file_type().is_symlink() {
            assert_eq!(fs::read_link(&e).expect("link"), fs::read_link(&a).expect("link"));
        } else {
            assert_eq!(fs::read(&e).expect("read"), fs::read(&a).expect("read"), "{}", a.display());
            let exec = |m: &fs::Metadata| m.permissions().mode() & 0o111 != 0;
            assert_eq!(exec(&em), exec(&am), "executable bit of {}", a.display());
        }
    }
}

/// Opens the stage area. A test that drops one and opens it again (a crash, a restart) may
/// find its state database still locked for a moment: sled's background flusher holds the
/// lock until its thread ends. Retried up to 500 times, 10 ms apart.
fn open(dir: &Path, keep: usize) -> StageArea {
    let mut tries = 0;
    loop {
        match StageArea::open(dir, keep) {
            Ok(area) => return area,
            Err(e) if tries < 500 && format!("{e:?}").contains("lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("open stage area: {e:?}"),
        }
    }
}

fn status_of(area: &StageArea, id: &ManifestId) -> StageStatus {
    area.status_of(id).expect("status").expect("known").status
}

#[test]
fn stages_chunks_in_any_order_and_unpacks_the_tree() {
    let (src, artifact) = tree_artifact(0, "1.0.0");
    let data = tempfile::tempdir().expect("tempdir");
    let area = open(data.path(), 3);
    assert!(artifact.count() > 100, "want many chunks, got {}", artifact.count());

    let mut job = area.begin(&artifact.signed, &trusted()).expect("begin");
    assert_eq!(job.local().count_ones(), 0);
    assert_eq!(job.from_disk().total().chunks, 0);
    assert_eq!(
        fs::metadata(area.artifact_path(&artifact.id())).expect("stat").len(),
        artifact.manifest().size
    );

    // A written chunk is not served until synced.
    job.write_chunk(3, &artifact.chunks[3]).expect("write");
    assert!(matches!(job.read_chunk(3), Err(StageError::NotDurable { index: 3, .. })));
    assert!(matches!(area.read_chunk(&artifact.id(), 3), Err(StageError::NotDurable { .. })));
    assert_eq!(job.pending(), 1);
    assert_eq!(job.sync().expect("sync"), vec![3]);
    assert_eq!(job.sync().expect("empty sync"), Vec::<ChunkIndex>::new());
    assert_eq!(job.read_chunk(3).expect("read"), artifact.chunks[3]);
    assert_eq!(area.read_chunk(&artifact.id(), 3).expect("read"), artifact.chunks[3]);
    let hash = ChunkHash::of(&artifact.chunks[3]);
    assert_eq!(area.read_chunk_by_hash(&hash).expect("read by hash"), artifact.chunks[3]);
    assert!(matches!(
        area.read_chunk_by_hash(&ChunkHash::of(b"nope")),
        Err(StageError::ChunkNotFound { .. })
    ));
    // Rewriting a durable chunk is a no-op.
    job.write_chunk(3, &artifact.chunks[3]).expect("rewrite");
    assert_eq!(job.pending(), 0);

    write_missing(&mut job, &artifact, 50);
    assert!(job.is_complete());
    let finished = job.finish().expect("finish");
    assert!(finished.gc.expect("gc").removed.is_empty());
    let release = finished.release;
    assert_eq!(release.path, data.path().join("releases/web/1.0.0"));
    assert_eq!(release.kind, ArtifactKind::Tree);
    assert_same_tree(src.path(), &release.path);

    // The artifact is kept, byte for byte the stream, and served.
    let artifact_file = fs::read(area.artifact_path(&artifact.id())).expect("artifact");
    assert_eq!(artifact_file, artifact.stream());
    assert_eq!(area.read_chunk(&artifact.id(), 7).expect("serve"), artifact.chunks[7]);

    let status = area.status().expect("status");
    assert_eq!(status.len(), 1);
    let entry = &status[0];
    assert_eq!((entry.service.as_str(), entry.version.as_str()), ("web", "1.0.0"));
    assert_eq!(entry.status, StageStatus::Staged);
    assert_eq!(entry.done, entry.total);
    assert_eq!(entry.total.chunks, u64::from(artifact.count()));
    assert_eq!(entry.release.as_deref(), Some(release.path.as_path()));
    assert!(!entry.active);
    assert_eq!(
        area.signed_manifest(&artifact.id()).expect("manifest"),
        Some(artifact.signed.clone())
    );

    // Beginning a staged manifest again finishes at once with the same release.
    let again = area.begin(&artifact.signed, &trusted()).expect("begin again");
    assert!(again.is_complete());
    assert_eq!(again.finish().expect("finish again").release, release);
}

#[test]
fn untrusted_signer_is_refused_before_touching_disk() {
    let (_src, artifact) = tree_artifact(0, "1.0.0");
    let data = tempfile::tempdir().expect("tempdir");
    let area = open(data.path(), 3);
    let stranger = TrustedKeys::new([SigningKey::from_seed([9; 32]).verifying_key()]);
    match area.begin(&artifact.signed, &stranger) {
        Err(StageError::Untrusted { id, source: SignatureError::Untrusted { signers } }) => {
            assert_eq!(id, artifact.id());
            assert_eq!(signers, vec![key().verifying_key()]);
        }
        other => panic!("expected Untrusted, got {other:?}"),
    }
    let unsigned = SignedManifest::unsigned(artifact.manifest().clone());
    assert!(matches!(area.begin(&unsigned, &trusted()), Err(StageError::Untrusted { .. })));
    assert!(entries(&data.path().join("artifacts")).is_empty());
    assert!(entries(&data.path().join("releases")).is_empty());
    assert!(area.status().expect("status").is_empty());
    assert_eq!(area.signed_manifest(&artifact.id()).expect("lookup"), None);
}

#[test]
fn wrong_chunk_bytes_are_refused_and_nothing_is_recorded() {
    let (_src, artifact) = tree_artifact(0, "1.0.0");
    let data = tempfile::tempdir().expect("tempdir");
    let area = open(data.path(), 3);
    let mut job = area.begin(&artifact.signed, &trusted()).expect("begin");

    let mut bad = artifact.chunks[5].clone();
    bad[10] ^= 0xff;
    match job.write_chunk(5, &bad) {
        Err(StageError::ChunkMismatch {
            index: 5,
            fault: ChunkFault::Hash { expected, actual },
            ..
        }) => {
            assert_eq!(expected, ChunkHash::of(&artifact.chunks[5]));
            assert_eq!(actual, ChunkHash::of(&bad));
        }
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
    let short = &artifact.chunks[5][1..];
    assert!(matches!(
        job.write_chunk(5, short),
        Err(StageError::ChunkMismatch { fault: ChunkFault::Length { .. }, .. })
    ));
    // The shell hashed the bytes itself: a hash that is not the manifest's is refused too.
    let hash = ChunkHash::of(&bad);
    assert!(matches!(
        job.write_verified_chunk(5, &bad, hash),
        Err(StageError::ChunkMismatch { fault: ChunkFault::Hash { .. }, .. })
    ));
    assert!(matches!(
        job.write_chunk(artifact.count(), &artifact.chunks[0]),
        Err(StageError::IndexOutOfRange { .. })
    ));
    assert_eq!(job.pending(), 0);
    assert!(job.sync().expect("sync").is_empty());
    let entry = area.status_of(&artifact.id()).expect("status").expect("known");
    assert_eq!(entry.done.chunks, 0);

    // The right bytes, prehashed by the caller, are accepted.
    let good = &artifact.chunks[5];
    job.write_verified_chunk(5, good, ChunkHash::of(good)).expect("write verified");
    assert_eq!(job.sync().expect("sync"), vec![5]);
}

#[test]
fn resume_after_a_crash_keeps_exactly_the_synced_chunks() {
    let (src, artifact) = tree_artifact(0, "1.0.0");
    let data = tempfile::tempdir().expect("tempdir");
    let order = shuffled(0..artifact.count(), 7);
    let half = order.len() / 2;
    let synced: BTreeSet<ChunkIndex> = order[..half].iter().copied().collect();
    {
        let area = open(data.path(), 3);
        let mut job = area.begin(&artifact.signed, &trusted()).expect("begin");
        for group in order[..half].chunks(20) {
            for &index in group {
                job.write_chunk(index, &artifact.chunks[index as usize]).expect("write");
            }
            job.sync().expect("sync");
        }
        // Written, never synced: the crash comes first.
        for &index in &order[half..half + 10] {
            job.write_chunk(index, &artifact.chunks[index as usize]).expect("write");
        }
        assert_eq!(job.pending(), 10);
        // Dropping everything without a sync stands in for kill -9.
    }
    let area = open(data.path(), 3);
    let entry = area.status_of(&artifact.id()).expect("status").expect("known");
    assert_eq!(entry.status, StageStatus::Staging);
    assert_eq!(entry.done.chunks, synced.len() as u64);
    let mut job = area.begin(&artifact.signed, &trusted()).expect("resume");
    let expected = Bitfield::from_indices(artifact.count(), synced.iter().copied()).expect("bits");
    assert_eq!(job.local(), &expected, "local must be exactly the synced chunks");
    assert_eq!(job.from_disk().resumed.chunks, synced.len() as u64);
    assert_eq!(job.from_disk().copied.chunks, 0);
    write_missing(&mut job, &artifact, 64);
    let release = job.finish().expect("finish").release;
    assert_same_tree(src.path(), &release.path);
}

/// Where [`crash_helper_aborts_mid_staging`] works when the parent test runs it as a child.
const CRASH_DIR_VAR: &str = "FLEETWAVE_TEST_STAGE_CRASH_DIR";

/// The chunks the crash helper syncs, and the ones it writes without syncing.
fn crash_plan(artifact: &Artifact) -> (Vec<ChunkIndex>, Vec<ChunkIndex>) {
    let order = shuffled(0..artifact.count(), 11);
    let half = order.len() / 2;
    (order[..half].to_vec(), order[half..half + 10].to_vec())
}

/// Not a test on its own: run as a child process by
/// [`an_aborted_process_resumes_with_exactly_the_synced_chunks`], it stages half the chunks,
/// writes ten more without syncing, and aborts (no destructors, no flush on drop), as a
/// `kill -9` would. Without the variable set it does nothing.
#[test]
fn crash_helper_aborts_mid_staging() {
    let Some(dir) = std::env::var_os(CRASH_DIR_VAR) else { return };
    let (_src, artifact) = tree_artifact(0, "1.0.0");
    let (synced, unsynced) = crash_plan(&artifact);
    let area = open(Path::new(&dir), 3);
    let mut job = area.begin(&artifact.signed, &trusted()).expect("begin");
    for group in synced.chunks(20) {
        for &index in group {
            job.write_chunk(index, &artifact.chunks[index as usize]).expect("write");
        }
        job.sync().expect("sync");
    }
    for &index in &unsynced {
        job.write_chunk(index, &artifact.chunks[index as usize]).expect("write");
    }
    std::process::abort();
}

#[test]
fn an_aborted_process_resumes_with_exactly_the_synced_chunks() {
    let data = tempfile::tempdir().expect("tempdir");
    let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "crash_helper_aborts_mid_staging", "--test-threads=1", "--quiet"])
        .env(CRASH_DIR_VAR, data.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run the crash helper");
    // SIGABRT, not a test failure (exit code 101): the helper got to its abort.
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(6),
        "helper ended with {status}"
    );

    let (src, artifact) = tree_artifact(0, "1.0.0");
    let (synced, _) = crash_plan(&artifact);
    let area = open(data.path(), 3);
    let mut job = area.begin(&artifact.signed, &trusted()).expect("resume");
    let expected = Bitfield::from_indices(artifact.count(), synced.iter().copied()).expect("bits");
    assert_eq!(job.local(), &expected, "local must be exactly the synced chunks");
    write_missing(&mut job, &artifact, 64);
    assert_same_tree(src.path(), &job.finish().expect("finish").release.path);
}

#[test]
fn a_corrupted_artifact_fails_the_whole_check_and_refetches_only_the_bad_chunk() {
    let (src, artifact) = tree_artifact(0, "1.0.0");
    let data = tempfile::tempdir().expect("tempdir");
    let area = open(data.path(), 3);
    let mut job = area.begin(&artifact.signed, &trusted()).expect("begin");
    write_missing(&mut job, &artifact, 64);

    // Damage chunk 9 behind the store's back.
    let offset: u64 = artifact.chunks[..9].iter().map(|c| c.len() as u64).sum();
    let file = fs::OpenOptions::new()
        .write(true)
        .open(area.artifact_path(&artifact.id()))
        .expect("open artifact");
    file.write_all_at(b"garbage", offset + 3).expect("damage");
    assert!(matches!(job.read_chunk(9), Err(StageError::Corrupt { index: 9, .. })));

    match job.finish() {
        Err(StageError::WholeMismatch { check, bad_chunks: 1, .. })
            if matches!(*check, WholeCheck::Sha256 { .. }) => {}
        other => panic!("expected WholeMismatch, got {other:?}"),
    }
    assert!(matches!(
        status_of(&area, &artifact.id()),
        StageStatus::Failed { reason: FailReason::Whole(WholeCheck::Sha256 { .. }) }
    ));
    assert!(!data.path().join("releases/web/1.0.0").exists());

    // Beginning again wants just the damaged chunk.
    let mut job = area.begin(&artifact.signed, &trusted()).expect("begin again");
    assert_eq!(status_of(&area, &artifact.id()), StageStatus::Staging);
    assert_eq!(job.local().count_ones(), artifact.count() - 1);
    assert!(!job.local().contains(9));
    write_missing(&mut job, &artifact, 64);
    assert_same_tree(src.path(), &job.finish().expect("finish").release.path);
}

#[test]
fn a_new_version_takes_unchanged_chunks_from_disk() {
    let (_src1, v1) = tree_artifact(0, "1.0.0");
    let (src2, v2) = tree_artifact(1, "1.1.0");
    let data = tempfile::tempdir().expect("tempdir");
    let area = open(data.path(), 3);
    stage(&area, &v1);

    let mut job = area.begin(&v2.signed, &trusted()).expect("begin v2");
    let from_disk = job.from_disk();
    assert_eq!(from_disk.resumed.chunks, 0);
    let total = u64::from(v2.count());
    assert!(
        from_disk.copied.chunks * 10 >= total * 9,
        "only {} of {total} chunks came from disk",
        from_disk.copied.chunks
    );
    assert_eq!(job.local().count_ones() as u64, from_disk.copied.chunks);
    // Every chunk copied is exactly v2's chunk, and durable.
    for index in job.local().iter() {
        assert_eq!(job.read_chunk(index).expect("read"), v2.chunks[index as usize]);
    }
    let needed = v2.count() - job.local().count_ones();
    assert!(needed > 0, "the edit must change some chunks");
    let before = job.durable().count_ones();
    write_missing(&mut job, &v2, 64);
    assert_eq!(job.durable().count_ones() - before, needed);
    let release = job.finish().expect("finish").release;
    assert_same_tree(src2.path(), &release.path);
    assert!(data.path().join("releases/web/1.0.0").is_dir(), "v1 is kept for rollback");
}

#[test]
fn a_bad_local_copy_is_not_used_for_dedup() {
    let (_src1, v1) = tree_artifact(0, "1.0.0");
    let (_src2, v2) = tree_artifact(1, "1.1.0");
    let data = tempfile::tempdir().expect("tempdir");
    let area = open(data.path(), 3);
    stage(&area, &v1);
    // Damage v1's first chunk, which v2 shares.
    assert_eq!(v1.chunks[0], v2.chunks[0]);
    let file = fs::OpenOptions::new()
        .write(true)
        .open(area.artifact_path(&v1.id()))
        .expect("open artifact");
    file.write_all_at(b"rot", 0).expect("damage");
    let job = area.begin(&v2.signed, &trusted()).expect("begin v2");
    assert!(!job.local().contains(0), "a corrupt copy must not count");
    assert!(job.local().contains(1));
}

#[test]
fn a_single_file_artifact_is_released_as_the_service_binary() {
    let src = tempfile::tempdir().expect("tempdir");
    let path = src.path().join("server");
    write_file(&path, &random_bytes(5, 50_000), false);
    let artifact = build(&path, "2.0.0", &key());
    assert_eq!(artifact.manifest().kind, ArtifactKind::File);
    let data = tempfile::tempdir().expect("tempdir");
    let area = open(data.path(), 3);
    let release = stage(&area, &artifact);
    assert_eq!(entries(&release), vec![SERVICE.to_owned()]);
    let binary = release.join(SERVICE);
    assert_eq!(fs::read(&binary).expect("read"), artifact.stream());
    assert_ne!(fs::metadata(&binary).expect("stat").permissions().mode() & 0o111, 0);
}

#[test]
fn gc_keeps_the_last_staged_by_order_and_the_active_release() {
    let src = tempfile::tempdir().expect("tempdir");
    make_tree(src.path(), 0);
    // Same tree, different versions: after the first, every chunk comes from disk.
    let art = |version: &str| build(src.path(), version, &key());
    let data = tempfile::tempdir().expect("tempdir");
    let area = open(data.path(), 2);
    let release = |v: &str| data.path().join("releases/web").join(v);

    // Staged in this order; version-string order would be 1.10 < 1.2 < 1.9.
    let (v19, v110, v12) = (art("1.9"), art("1.10"), art("1.2"));
    stage(&area, &v19);
    stage(&area, &v110);
    stage(&area, &v12);
    assert!(!release("1.9").exists(), "the oldest staged goes");
    assert!(!area.artifact_path(&v19.id()).exists());
    assert_eq!(area.status_of(&v19.id()).expect("status"), None);
    assert!(release("1.10").is_dir() && release("1.2").is_dir());

    // The active release stays whatever its age; so does anything still staging.
    area.set_active(SERVICE, v110.id()).expect("activate");
    assert_eq!(area.active(SERVICE).expect("active"), Some(v110.id()));
    let v14 = art("1.4");
    drop(area.begin(&v14.signed, &trusted()).expect("begin 1.4"));
    assert!(matches!(area.set_active(SERVICE, v14.id()), Err(StageError::NotStaged { .. })));
    assert!(matches!(area.set_active("db", v12.id()), Err(StageError::WrongService { .. })));
    assert!(matches!(area.set_active("../x", v12.id()), Err(StageError::InvalidService { .. })));
    let (v13, v15) = (art("1.3"), art("1.5"));
    stage(&area, &v13);
    assert!(release("1.2").is_dir() && release("1.3").is_dir() && release("1.10").is_dir());
    stage(&area, &v15);
    assert!(!release("1.2").exists());
    assert!(release("1.3").is_dir() && release("1.5").is_dir() && release("1.10").is_dir());
    assert_eq!(entries(&data.path().join("releases/web")), vec!["1.10", "1.3", "1.5"]);

    let status = area.status().expect("status");
    let listed: Vec<(&str, bool, bool)> = status
        .iter()
        .map(|e| (e.version.as_str(), e.status == StageStatus::Staged, e.active))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("1.10", true, true),
            ("1.4", false, false),
            ("1.3", true, false),
            ("1.5", true, false)
        ]
    );
    let mut artifacts = entries(&data.path().join("artifacts"));
    let mut expected: Vec<String> =
        [&v110, &v14, &v13, &v15].iter().map(|a| a.id().to_hex()).collect();
    artifacts.sort();
    expected.sort();
    assert_eq!(artifacts, expected);

    assert!(matches!(area.remove(&v110.id()), Err(StageError::Active { .. })));
    assert!(area.remove(&v14.id()).expect("remove"));
    assert!(!area.remove(&v14.id()).expect("remove again"));
}

#[test]
fn status_reports_progress_and_one_job_per_manifest() {
    let (_src, artifact) = tree_artifact(0, "1.0.0");
    let data = tempfile::tempdir().expect("tempdir");
    let area = open(data.path(), 3);
    let mut job = area.begin(&artifact.signed, &trusted()).expect("begin");
    assert!(matches!(area.begin(&artifact.signed, &trusted()), Err(StageError::Busy { .. })));
    let mut bytes = 0;
    for index in 0..5 {
        job.write_chunk(index, &artifact.chunks[index as usize]).expect("write");
        bytes += artifact.chunks[index as usize].len() as u64;
    }
    job.sync().expect("sync");
    job.write_chunk(5, &artifact.chunks[5]).expect("write unsynced");
    let entry = area.status_of(&artifact.id()).expect("status").expect("known");
    assert_eq!(entry.status, StageStatus::Staging);
    assert_eq!((entry.done.chunks, entry.done.bytes), (5, bytes));
    assert_eq!(entry.total.chunks, u64::from(artifact.count()));
    assert_eq!(entry.total.bytes, artifact.manifest().size);
    assert_eq!(entry.release, None);
    let left = artifact.count() - 5;
    assert!(matches!(job.finish(), Err(StageError::Incomplete { missing, .. }) if missing == left));
    // The job is gone; a new one may start.
    area.begin(&artifact.signed, &trusted()).expect("begin after the job ended");
}

#[test]
fn open_sweeps_leftovers_and_refuses_keeping_nothing() {
    let data = tempfile::tempdir().expect("tempdir");
    assert!(matches!(StageArea::open(data.path(), 0), Err(StageError::ZeroKeep)));
    drop(open(data.path(), 1));
    let orphan = data.path().join("artifacts").join(ManifestId::from_bytes([1; 32]).to_hex());
    fs::write(&orphan, b"left by a crash").expect("write");
    fs::create_dir_all(data.path().join("releases/web/.1.0.unpack-x/bin")).expect("mkdir");
    fs::create_dir_all(data.path().join("releases/web/0.9")).expect("mkdir");
    let _area = open(data.path(), 1);
    assert!(!orphan.exists());
    assert!(entries(&data.path().join("releases/web")).is_empty());
    // One handle at a time: the state database is locked.
    assert!(matches!(StageArea::open(data.path(), 1), Err(StageError::State { .. })));
}

#[test]
fn a_release_directory_held_by_another_manifest_is_not_overwritten() {
    let (src, first) = tree_artifact(0, "1.0.0");
    // Republished under the same version with different content.
    let (_src2, second) = tree_artifact(1, "1.0.0");
    let data = tempfile::tempdir().expect("tempdir");
    let area = open(data.path(), 3);
    let path = stage(&area, &first);
    let mut job = area.begin(&second.signed, &trusted()).expect("begin");
    write_missing(&mut job, &second, 64);
    match job.finish() {
        Err(StageError::ReleaseConflict { id, path: conflict }) => {
            assert_eq!(id, second.id());
            assert_eq!(conflict, path);
        }
        other => panic!("expected ReleaseConflict, got {other:?}"),
    }
    assert_same_tree(src.path(), &path);
}
