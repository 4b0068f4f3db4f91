//! End-to-end tests of the daemon: real `fleetwave-node` processes (origin, cache, hosts) on
//! 127.0.0.1 with ephemeral ports and temporary directories.
#![allow(clippy::unwrap_used)]

mod fleet;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet::{Node, make_tree, publish, snapshot, wait_for};
use fleetwave_chunker::{ManifestId, SigningKey};

const MIB: usize = 1 << 20;

struct Fleet {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    key: SigningKey,
    trust: PathBuf,
    origin: Node,
}

impl Fleet {
    /// A signing key and an origin holding nothing yet.
    fn new() -> Fleet {
        Self::with_origin_args(&[])
    }

    fn with_origin_args(extra: &[&str]) -> Fleet {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let key = SigningKey::generate();
        let trust = key.write_files(&root.join("release.key")).unwrap();
        let origin = Node::start(
            "origin",
            &root.join("origin"),
            &[args(&["--role", "origin", "--trust", trust.to_str().unwrap()]), args(extra)]
                .concat(),
        );
        Fleet { _tmp: tmp, root, key, trust, origin }
    }

    /// Publishes a tree into the origin's store (the origin serves whatever its store holds).
    fn publish(
        &self,
        name: &str,
        files: usize,
        file_len: usize,
        edited: &[usize],
    ) -> (ManifestId, PathBuf, u64) {
        let src = self.root.join(format!("src-{name}"));
        make_tree(&src, files, file_len, edited);
        let (id, manifest) = publish(&self.origin.dir.join("store"), &src, "web", name, &self.key);
        (id, src, manifest.size)
    }

    fn cache(&self, name: &str) -> Node {
        Node::start(
            name,
            &self.root.join(name),
            &args(&[
                "--role",
                "cache",
                "--trust",
                self.trust.to_str().unwrap(),
                "--origin",
                &self.origin.upstream_arg(),
            ]),
        )
    }

    fn host(&self, name: &str, cache: Option<&Node>, extra: &[&str]) -> Node {
        let mut a = args(&["--role", "host", "--trust", self.trust.to_str().unwrap()]);
        a.extend(args(&["--origin", &self.origin.upstream_arg()]));
        if let Some(cache) = cache {
            a.extend(args(&["--cache", &cache.upstream_arg()]));
        }
        a.extend(args(extra));
        Node::start(name, &self.root.join(name), &a)
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn assert_same_tree(expected: &Path, actual: &Path) {
    let (e, a) = (snapshot(expected), snapshot(actual));
    assert_eq!(e.keys().collect::<Vec<_>>(), a.keys().collect::<Vec<_>>(), "{}", actual.display());
    assert!(e == a, "contents of {} differ from {}", actual.display(), expected.display());
}

fn transfer<'a>(
    status: &'a fleetwave_node::daemon::Status,
    id: &ManifestId,
) -> &'a fleetwave_node::daemon::Snapshot {
    status
        .manifests
        .iter()
        .find(|m| m.id == id.to_hex())
        .and_then(|m| m.transfer.as_ref())
        .expect("a live transfer")
}

#[test]
fn a_cache_and_eight_hosts_stage_64_mib_and_a_second_version_moves_only_changed_chunks() {
    let fleet = Fleet::new();
    let (v1, src1, size1) = fleet.publish("1.0.0", 16, 4 * MIB, &[]);
    let cache = fleet.cache("cache");
    let hosts: Vec<Node> =
        (0..8).map(|i| fleet.host(&format!("host{i}"), Some(&cache), &[])).collect();
    for host in &hosts {
        let (code, body) = host.stage(&v1);
        assert_eq!(code, 202, "{body}");
    }
    for host in &hosts {
        let release = host.wait_staged(&v1);
        assert_same_tree(&src1, &release);
    }
    let origin_egress = fleet.origin.status().totals.served_bytes;
    assert!(
        origin_egress as f64 <= 1.2 * size1 as f64,
        "origin served {origin_egress} bytes for a {size1}-byte artifact"
    );
    // The hosts traded among themselves: the cache did not send everything to everyone.
    let cache_egress = cache.status().totals.served_bytes;
    let from_peers: u64 =
        hosts.iter().map(|h| transfer(&h.status(), &v1).progress.peer_bytes).sum();
    assert!(from_peers > 0, "no host took a chunk from a peer");
    assert!(cache_egress < 8 * size1, "cache served {cache_egress}");
    assert!(fleet.origin.metrics().contains("fleetwave_served_bytes_total"));

    // Version 2 changes two of the sixteen files: only their chunks move.
    let (v2, src2, _) = fleet.publish("1.0.1", 16, 4 * MIB, &[3, 11]);
    let before = fleet.origin.status().totals.served_bytes;
    for host in &hosts {
        assert_eq!(host.stage(&v2).0, 202);
    }
    let changed = 2 * 4 * MIB as u64;
    for host in &hosts {
        let release = host.wait_staged(&v2);
        assert_same_tree(&src2, &release);
        let t = transfer(&host.status(), &v2).progress;
        let fetched = t.peer_bytes + t.cache_bytes + t.origin_bytes;
        // The changed files' chunks, plus the chunks straddling their edges in the stream.
        assert!(fetched <= changed + 2 * 1024 * 1024, "{} fetched {fetched} bytes", host.name);
        assert!(fetched >= changed / 2, "{} fetched only {fetched} bytes", host.name);
        assert!(
            t.disk_bytes >= size1 - changed - 2 * 1024 * 1024,
            "{} reused {}",
            host.name,
            t.disk_bytes
        );
    }
    let v2_origin = fleet.origin.status().totals.served_bytes - before;
    assert!(
        v2_origin as f64 <= 1.2 * (changed + 2 * MIB as u64) as f64,
        "origin served {v2_origin} for v2"
    );
}

/// Publishes 16 MiB; a cache; a host ("bad") that stages it honestly, then serves every chunk
/// with a flipped byte; and four hosts (with `extra` flags) told to stage it. The nodes are
/// returned to keep them running: the cache and the bad host come first.
fn four_hosts_beside_a_corrupt_one(
    fleet: &Fleet,
    extra: &[&str],
) -> (ManifestId, PathBuf, [Node; 2], Vec<Node>) {
    let (v1, src1, _) = fleet.publish("1.0.0", 8, 2 * MIB, &[]);
    let cache = fleet.cache("cache");
    let bad = fleet.host("bad", Some(&cache), &["--fault-corrupt-uploads"]);
    assert_eq!(bad.stage(&v1).0, 202);
    bad.wait_staged(&v1);
    let hosts: Vec<Node> =
        (0..4).map(|i| fleet.host(&format!("host{i}"), Some(&cache), extra)).collect();
    for host in &hosts {
        assert_eq!(host.stage(&v1).0, 202);
    }
    (v1, src1, [cache, bad], hosts)
}

#[test]
fn hosts_pass_chunks_on_while_they_arrive_and_stage_verified_content() {
    let fleet = Fleet::new();
    let (v1, src1, _) = fleet.publish("1.0.0", 8, 2 * MIB, &[]);
    let cache = fleet.cache("cache");
    // Capped downloads keep pieces in flight long enough for peers to ask for them.
    let forward = ["--forward-arriving", "--download-limit", "4000000"];
    let hosts: Vec<Node> =
        (0..4).map(|i| fleet.host(&format!("host{i}"), Some(&cache), &forward)).collect();
    for host in &hosts {
        assert_eq!(host.stage(&v1).0, 202);
    }
    let mut forwarded = 0;
    for host in &hosts {
        assert_same_tree(&src1, &host.wait_staged(&v1));
        let totals = host.status().totals;
        assert_eq!(totals.chunks_rejected, 0, "{}", host.name);
        forwarded += totals.chunks_forwarded;
    }
    assert!(forwarded > 0, "no host passed a chunk on while it arrived");
    assert!(hosts[0].metrics().contains("fleetwave_chunks_forwarded_total"));
}

#[test]
fn a_corrupt_copy_passed_on_while_it_arrives_is_withdrawn_and_nobody_stages_it() {
    let fleet = Fleet::new();
    let forward = ["--forward-arriving", "--download-limit", "4000000"];
    let (v1, src1, _cache, hosts) = four_hosts_beside_a_corrupt_one(&fleet, &forward);
    let (mut rejected, mut withdrawn) = (0, 0);
    for host in &hosts {
        assert_same_tree(&src1, &host.wait_staged(&v1));
        let totals = host.status().totals;
        rejected += totals.chunks_rejected;
        withdrawn += totals.chunks_withdrawn;
    }
    assert!(rejected > 0, "no host was offered a corrupt chunk");
    // A host bans the corrupt peer at its first bad chunk; the other chunks arriving from it
    // that it was passing on are withdrawn, and their receivers ask elsewhere.
    assert!(withdrawn > 0, "no upload of a failed copy was withdrawn");
}

#[test]
fn a_host_serving_corrupt_chunks_is_banned_and_nobody_stages_corruption() {
    let fleet = Fleet::new();
    let (v1, src1, _cache, hosts) = four_hosts_beside_a_corrupt_one(&fleet, &[]);
    let mut rejected = 0;
    let mut banned = 0;
    for host in &hosts {
        let release = host.wait_staged(&v1);
        assert_same_tree(&src1, &release);
        let totals = host.status().totals;
        rejected += totals.chunks_rejected;
        banned += totals.peers_banned;
    }
    assert!(rejected > 0, "no host was offered a corrupt chunk");
    assert!(banned > 0, "nobody banned the corrupting host");
    // A bad chunk never counts as verified and is never written: every host's tree is right
    // (checked above), and each host rejected at most one chunk per ban.
    assert_eq!(rejected, banned);
}

#[test]
fn a_host_killed_mid_transfer_resumes_without_refetching_durable_chunks() {
    let fleet = Fleet::new();
    let (v1, src1, _) = fleet.publish("1.0.0", 16, 4 * MIB, &[]);
    // No cache, no peers: one host pulls from the origin, at 16 MB/s so that it can be caught
    // midway.
    let mut host = fleet.host("host", None, &["--download-limit", "16000000"]);
    assert_eq!(host.stage(&v1).0, 202);
    let durable_before = wait_for("a partial transfer", Duration::from_secs(120), || {
        let status = host.status();
        let t = status.manifests.iter().find(|m| m.id == v1.to_hex())?.transfer.clone()?;
        let p = t.progress;
        (p.chunks > p.total_chunks / 10 && p.chunks < p.total_chunks * 9 / 10).then_some(p)
    });
    host.kill9();
    host.restart();
    // Staging resumes on request (the coordinator repeats desired state; here we ask again).
    assert_eq!(host.stage(&v1).0, 202);
    let release = host.wait_staged(&v1);
    assert_same_tree(&src1, &release);
    let after = transfer(&host.status(), &v1).progress;
    assert!(
        after.disk_bytes
            >= durable_before.disk_bytes
                + durable_before.peer_bytes
                + durable_before.cache_bytes
                + durable_before.origin_bytes,
        "resumed {} bytes from disk, {:?} were durable before the kill",
        after.disk_bytes,
        durable_before
    );
    assert!(after.fetched_chunks <= durable_before.total_chunks - durable_before.chunks);
}

#[test]
fn hosts_complete_from_the_cache_after_the_origin_stops() {
    let mut fleet = Fleet::new();
    let (v1, src1, _) = fleet.publish("1.0.0", 8, 2 * MIB, &[]);
    let cache = fleet.cache("cache");
    let first = fleet.host("first", Some(&cache), &[]);
    assert_eq!(first.stage(&v1).0, 202);
    first.wait_staged(&v1);
    // Once the cache holds every chunk, the origin may go.
    wait_for("the cache to hold everything", Duration::from_secs(60), || {
        let status = cache.status();
        status
            .manifests
            .iter()
            .find(|m| m.id == v1.to_hex())?
            .transfer
            .as_ref()?
            .complete
            .then_some(())
    });
    let exit = fleet.origin.terminate();
    assert!(exit.success(), "origin exited with {exit} on SIGTERM");
    let hosts: Vec<Node> =
        (0..3).map(|i| fleet.host(&format!("host{i}"), Some(&cache), &[])).collect();
    for host in &hosts {
        assert_eq!(host.stage(&v1).0, 202);
    }
    for host in &hosts {
        assert_same_tree(&src1, &host.wait_staged(&v1));
        assert_eq!(transfer(&host.status(), &v1).progress.origin_bytes, 0);
    }
}

#[test]
fn a_host_refuses_untrusted_manifests_and_peers_with_the_wrong_identity() {
    let fleet = Fleet::new();
    // Signed by a key the host does not trust.
    let rogue = SigningKey::generate();
    let src = fleet.root.join("src-rogue");
    make_tree(&src, 2, 64 * 1024, &[]);
    let (rogue_id, _) = publish(&fleet.origin.dir.join("store"), &src, "web", "6.6.6", &rogue);
    let host = fleet.host("host", None, &[]);
    let (code, body) = host.stage(&rogue_id);
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["code"], "untrusted_manifest");
    assert!(host.status().manifests.is_empty(), "an untrusted manifest left state behind");

    // A cache configured with another identity than the one it proves is never used.
    let (v1, _, _) = fleet.publish("1.0.0", 2, 256 * 1024, &[]);
    let cache = fleet.cache("cache");
    let impostor = SigningKey::generate();
    let _ = impostor;
    let other_id = libp2p_identity::Keypair::generate_ed25519().public().to_peer_id();
    let wrong = format!("http://{}={other_id}", cache.info.api);
    let picky = Node::start(
        "picky",
        &fleet.root.join("picky"),
        &args(&["--role", "host", "--trust", fleet.trust.to_str().unwrap(), "--cache", &wrong]),
    );
    assert_eq!(picky.stage(&v1).0, 202);
    wait_for("the refusal", Duration::from_secs(60), || {
        (picky.status().totals.peers_refused > 0).then_some(())
    });
    let t = transfer(&picky.status(), &v1).progress;
    assert_eq!(t.cache_bytes + t.origin_bytes + t.peer_bytes, 0, "took chunks from an impostor");
    assert_eq!(cache.status().totals.served_bytes, 0);
}

#[test]
fn the_origin_serves_a_bounded_number_of_hosts_and_the_rest_trade() {
    let fleet = Fleet::with_origin_args(&["--origin-max-hosts", "1"]);
    let (v1, src1, size1) = fleet.publish("1.0.0", 8, 2 * MIB, &[]);
    // No cache: every host would go to the origin; only one at a time may.
    let hosts: Vec<Node> = (0..4).map(|i| fleet.host(&format!("host{i}"), None, &[])).collect();
    for host in &hosts {
        assert_eq!(host.stage(&v1).0, 202);
    }
    for host in &hosts {
        assert_same_tree(&src1, &host.wait_staged(&v1));
    }
    let from_origin: Vec<u64> =
        hosts.iter().map(|h| transfer(&h.status(), &v1).progress.origin_bytes).collect();
    let egress = fleet.origin.status().totals.served_bytes;
    assert!(from_origin.iter().filter(|&&b| b > 0).count() < hosts.len(), "{from_origin:?}");
    assert!(egress as f64 <= 1.5 * size1 as f64, "origin served {egress} for {size1}");
}

#[test]
fn the_origin_takes_uploads_over_the_network_and_only_missing_chunks_move() {
    use fleetwave_chunker::ChunkHash;
    use fleetwave_node::store_api::StoreClient;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let key = SigningKey::generate();
    let trust = key.write_files(&root.join("release.key")).unwrap();
    let token = root.join("upload.token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let origin = Node::start(
        "origin",
        &root.join("origin"),
        &args(&[
            "--role",
            "origin",
            "--trust",
            trust.to_str().unwrap(),
            "--upload-token-file",
            token.to_str().unwrap(),
        ]),
    );
    let base = format!("http://{}", origin.info.api);
    // Build both versions in a scratch store, then upload what the origin lacks, as
    // `fleetwave publish --origin URL` does.
    let scratch = root.join("scratch");
    let upload = |name: &str, edited: &[usize]| -> (ManifestId, usize, usize) {
        let src = root.join(format!("src-{name}"));
        make_tree(&src, 8, 512 * 1024, edited);
        let (id, manifest) = publish(&scratch, &src, "web", name, &key);
        let store = fleetwave_node::store::ChunkStore::open(&scratch).unwrap();
        let client = StoreClient::new(&base, Some("s3cret-token".into())).unwrap();
        let hashes: Vec<ChunkHash> = manifest.unique_chunks().iter().map(|c| c.hash).collect();
        let missing = client.missing(&hashes).unwrap();
        for hash in &missing {
            client.put_chunk(hash, &store.get(hash).unwrap()).unwrap();
        }
        client.put_manifest(&id, &store.get_manifest(&id).unwrap()).unwrap();
        client.set_ref("web", name, &id).unwrap();
        (id, hashes.len(), missing.len())
    };
    let (v1, total1, moved1) = upload("1.0.0", &[]);
    assert_eq!(moved1, total1, "a fresh origin lacks every chunk");
    let (v2, total2, moved2) = upload("1.0.1", &[5]);
    assert!(moved2 > 0 && moved2 * 4 < total2, "v2 moved {moved2} of {total2} chunks");

    // Without the token nothing is written.
    let anonymous = StoreClient::new(&base, None).unwrap();
    let err = anonymous.put_chunk(&ChunkHash::of(b"x"), b"x").unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(401));

    // A host stages what was uploaded.
    let host = Node::start(
        "host",
        &root.join("host"),
        &args(&[
            "--role",
            "host",
            "--trust",
            trust.to_str().unwrap(),
            "--origin",
            &origin.upstream_arg(),
        ]),
    );
    for id in [v1, v2] {
        assert_eq!(host.stage(&id).0, 202);
        host.wait_staged(&id);
    }
}

#[test]
fn a_host_killed_mid_hook_reports_the_activation_failed_after_restart() {
    use fleetwave_node::activate::Hook;
    use fleetwave_node::daemon::client::AdminClient;
    let fleet = Fleet::new();
    let publish_with_hooks = |version: &str, validate: &str| {
        let src = fleet.root.join(format!("src-hooks-{version}"));
        make_tree(&src, 2, 64 * 1024, &[]);
        let hooks = format!(
            "[hooks]\nstart = \"echo start $FLEETWAVE_VERSION >> $TRAIL\"\nvalidate = \"{validate}\"\ntimeout = \"120s\"\n"
        );
        std::fs::write(src.join("fleetwave.toml"), hooks).unwrap();
        publish(&fleet.origin.dir.join("store"), &src, "web", version, &fleet.key).0
    };
    let v1 = publish_with_hooks("1.0.0", "true");
    let v2 = publish_with_hooks("2.0.0", "echo validating >> $TRAIL; sleep 120");
    let secrets = fleet.root.join("secrets.env");
    let trail = fleet.root.join("trail");
    std::fs::write(&secrets, format!("TRAIL={}\n", trail.display())).unwrap();
    std::fs::set_permissions(&secrets, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    let mut host = fleet.host("host", None, &["--secrets-file", secrets.to_str().unwrap()]);
    for id in [v1, v2] {
        assert_eq!(host.stage(&id).0, 202);
        host.wait_staged(&id);
    }
    let api = format!("http://{}", host.info.api);
    let outcome = AdminClient::new(&api).activate("web", &v1.to_hex()).unwrap();
    assert!(outcome.ok, "{outcome:?}");
    // Activate v2 in the background; its validate hook hangs.
    let background = {
        let api = api.clone();
        std::thread::spawn(move || AdminClient::new(&api).activate("web", &v2.to_hex()))
    };
    wait_for("validate to run", Duration::from_secs(60), || {
        let status = host.status();
        let pending = status.services.iter().find(|s| s.service == "web")?.state.pending.clone()?;
        let ran = std::fs::read_to_string(&trail).unwrap_or_default().contains("validating");
        (pending.running == Some(Hook::Validate) && ran).then_some(())
    });
    host.kill9();
    assert!(background.join().unwrap().is_err(), "the killed daemon answered");
    host.restart();
    let status = host.status();
    let web = &status.services.iter().find(|s| s.service == "web").unwrap().state;
    let last = web.last.as_ref().unwrap();
    assert!(!last.ok);
    assert_eq!(last.failed_hook, Some(Hook::Validate));
    assert!(last.rolled_back);
    assert_eq!(web.active.as_ref().unwrap().id, v1.to_hex());
    let current = std::fs::canonicalize(host.dir.join("current/web")).unwrap();
    assert!(current.ends_with("releases/web/1.0.0"), "{}", current.display());
    // The hook was not run again.
    let validations =
        std::fs::read_to_string(&trail).unwrap().lines().filter(|l| *l == "validating").count();
    assert_eq!(validations, 1);
}

#[test]
#[ignore = "slow: 24 processes and 3 GiB of loopback traffic; run with --ignored"]
fn stress_twenty_four_hosts_stage_128_mib_through_one_cache() {
    let fleet = Fleet::new();
    let (v1, src1, size1) = fleet.publish("1.0.0", 32, 4 * MIB, &[]);
    let cache = fleet.cache("cache");
    let hosts: Vec<Node> =
        (0..24).map(|i| fleet.host(&format!("host{i}"), Some(&cache), &[])).collect();
    for host in &hosts {
        assert_eq!(host.stage(&v1).0, 202);
    }
    for host in &hosts {
        assert_same_tree(&src1, &host.wait_staged(&v1));
    }
    let origin_egress = fleet.origin.status().totals.served_bytes;
    assert!(origin_egress as f64 <= 1.2 * size1 as f64, "origin served {origin_egress}");
    let cache_egress = cache.status().totals.served_bytes;
    assert!(cache_egress < 24 * size1 / 2, "cache served {cache_egress} of {}", 24 * size1);
}
