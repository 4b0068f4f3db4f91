//! End-to-end tests of the `fleetwave` binary: real processes, temp dirs, and every kind of bad
//! input the operator can hand it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{assert_fails_with, field, paren_field, stderr, stdout};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let env = Self { dir: tempfile::tempdir().expect("tempdir") };
        let out = env.run(&["keygen", "--out", env.key().to_str().expect("utf8")]);
        assert!(out.status.success(), "keygen: {}", stderr(&out));
        env
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn key(&self) -> PathBuf {
        self.path("release.key")
    }

    fn origin(&self) -> PathBuf {
        self.path("origin")
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_fleetwave"))
            .args(args)
            .env_remove("SOURCE_DATE_EPOCH")
            .output()
            .expect("runs fleetwave")
    }

    fn publish(&self, src: &Path, version: &str) -> Output {
        self.run(&[
            "publish",
            src.to_str().expect("utf8"),
            "--service",
            "web",
            "--version",
            version,
            "--key",
            self.key().to_str().expect("utf8"),
            "--origin",
            self.origin().to_str().expect("utf8"),
            "--quiet",
        ])
    }

    fn verify(&self, spec: &str, trust: &Path) -> Output {
        self.run(&[
            "verify",
            spec,
            "--origin",
            self.origin().to_str().expect("utf8"),
            "--trust",
            trust.to_str().expect("utf8"),
        ])
    }

    fn trust(&self) -> PathBuf {
        self.path("release.key.pub")
    }

    fn files_under(&self, rel: &str) -> usize {
        walkdir_count(&self.origin().join(rel))
    }
}

fn walkdir_count(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .map(|e| {
            let p = e.expect("entry").path();
            if p.is_dir() { walkdir_count(&p) } else { 1 }
        })
        .sum()
}

fn make_tree(root: &Path, seed: u8) {
    std::fs::create_dir_all(root.join("bin")).expect("mkdir");
    std::fs::create_dir_all(root.join("etc")).expect("mkdir");
    let mut data = vec![0u8; 3 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(root.join("bin/server"), &data).expect("write");
    std::fs::set_permissions(root.join("bin/server"), PermissionsExt::from_mode(0o755))
        .expect("chmod");
    std::fs::write(root.join("etc/app.toml"), b"port = 80\n").expect("write");
}

#[test]
fn publish_verify_inspect_and_reuse() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src, 1);
    let v1 = env.publish(&src, "1.0.0");
    assert!(v1.status.success(), "{}", stderr(&v1));
    let size = paren_field(&v1, "size:");
    assert_eq!(paren_field(&v1, "uploaded:"), size, "first publish uploads everything");

    // A small change: only a few chunks move.
    std::fs::write(src.join("etc/app.toml"), b"port = 8080\n").expect("write");
    let v2 = env.publish(&src, "1.0.1");
    assert!(v2.status.success(), "{}", stderr(&v2));
    let uploaded = paren_field(&v2, "uploaded:");
    assert!(uploaded > 0 && uploaded * 4 < size, "uploaded {uploaded} of {size}");
    let distinct = {
        let text = stdout(&v2);
        let line = text.lines().find(|l| l.starts_with("chunks:")).expect("chunks line");
        let inner = &line[line.find('(').expect("paren") + 1..];
        inner.split(' ').next().and_then(|n| n.parse::<u64>().ok()).expect("distinct")
    };
    assert_eq!(field(&v2, "uploaded:") + field(&v2, "reused:"), distinct);

    for spec in ["web@1.0.0", "web@1.0.1"] {
        let out = env.verify(spec, &env.trust());
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains("signature: valid"), "{}", stdout(&out));
    }
    // A short id prefix works too.
    let id =
        stdout(&v1).lines().find_map(|l| l.strip_prefix("manifest:  ")).expect("id").to_owned();
    let out = env.verify(&id[..12], &env.trust());
    assert!(out.status.success(), "{}", stderr(&out));

    let origin = env.origin();
    let out = env.run(&[
        "inspect",
        "web@1.0.1",
        "--origin",
        origin.to_str().expect("utf8"),
        "--against",
        "web@1.0.0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("kind:      tree"), "{text}");
    assert_eq!(paren_field(&out, "new:"), uploaded, "{text}");
}

#[test]
fn missing_path_fails_and_writes_nothing() {
    let env = Env::new();
    let out = env.publish(&env.path("no-such-dir"), "1.0.0");
    assert_fails_with(&out, &["no-such-dir", "No such file"]);
    assert_eq!(env.files_under("manifests"), 0);
    assert_eq!(env.files_under("refs"), 0);
    assert_eq!(env.files_under("chunks"), 0);
}

#[test]
fn a_version_is_published_once() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src, 2);
    assert!(env.publish(&src, "1.0.0").status.success());
    assert_fails_with(&env.publish(&src, "1.0.0"), &["web@1.0.0", "already published"]);
}

#[test]
fn bad_names_and_keys_are_refused() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src, 3);
    assert_fails_with(&env.publish(&src, "../1.0"), &["invalid version name"]);
    std::fs::set_permissions(env.key(), PermissionsExt::from_mode(0o644)).expect("chmod");
    assert_fails_with(&env.publish(&src, "1.0.0"), &["release.key", "readable by others"]);
    let out = env.run(&["keygen", "--out", env.key().to_str().expect("utf8")]);
    assert_fails_with(&out, &["release.key", "already exists"]);
}

#[test]
fn untrusted_signer_is_refused() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src, 4);
    assert!(env.publish(&src, "1.0.0").status.success());
    let other = env.path("other.key");
    assert!(env.run(&["keygen", "--out", other.to_str().expect("utf8")]).status.success());
    let out = env.verify("web@1.0.0", &env.path("other.key.pub"));
    assert_fails_with(&out, &["not signed by a trusted key"]);
}

#[test]
fn corrupt_chunk_and_corrupt_manifest_are_named() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src, 5);
    let out = env.publish(&src, "1.0.0");
    assert!(out.status.success(), "{}", stderr(&out));
    let id =
        stdout(&out).lines().find_map(|l| l.strip_prefix("manifest:  ")).expect("id").to_owned();

    // Flip a byte in one stored chunk.
    let shard = std::fs::read_dir(env.origin().join("chunks")).expect("ls").next().expect("shard");
    let chunk = std::fs::read_dir(shard.expect("e").path()).expect("ls").next().expect("chunk");
    let chunk = chunk.expect("e").path();
    std::fs::set_permissions(&chunk, PermissionsExt::from_mode(0o644)).expect("chmod");
    let mut bytes = std::fs::read(&chunk).expect("read");
    bytes[0] ^= 0xff;
    std::fs::write(&chunk, bytes).expect("write");
    let name = chunk.file_name().expect("name").to_string_lossy().into_owned();
    assert_fails_with(&env.verify("web@1.0.0", &env.trust()), &[&name, "corrupt"]);

    // Replace the manifest with garbage.
    let manifest = env.origin().join("manifests").join(&id);
    std::fs::set_permissions(&manifest, PermissionsExt::from_mode(0o644)).expect("chmod");
    std::fs::write(&manifest, b"not a manifest").expect("write");
    assert_fails_with(&env.verify("web@1.0.0", &env.trust()), &[&id, "does not decode"]);
}

#[test]
fn unwritable_origin_is_named() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src, 6);
    // A path under a regular file cannot be created, even by root.
    std::fs::write(env.path("plain-file"), b"x").expect("write");
    let origin = env.path("plain-file/origin");
    let out = env.run(&[
        "publish",
        src.to_str().expect("utf8"),
        "--service",
        "web",
        "--version",
        "1.0.0",
        "--key",
        env.key().to_str().expect("utf8"),
        "--origin",
        origin.to_str().expect("utf8"),
    ]);
    assert_fails_with(&out, &["plain-file/origin"]);
}

#[test]
fn single_file_artifacts_round_trip() {
    let env = Env::new();
    let file = env.path("app.bin");
    std::fs::write(&file, vec![7u8; 1 << 20]).expect("write");
    let out = env.publish(&file, "1.0.0");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(paren_field(&out, "size:"), 1 << 20);
    // Identical bytes cut into identical max-size chunks: stored once, not "already on origin".
    assert_eq!(field(&out, "uploaded:"), 1);
    assert_eq!(field(&out, "reused:"), 0);
    assert_eq!(field(&out, "repeated:"), 3);
    let out = env.verify("web@1.0.0", &env.trust());
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn node_commands_name_an_unreachable_daemon() {
    let env = Env::new();
    // A port nobody listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let api = format!("http://127.0.0.1:{port}");
    let out = env.run(&["node", "--api", &api, "status"]);
    assert_fails_with(&out, &["cannot reach the daemon", &api]);
    let out = env.run(&["node", "--api", &api, "stage", &"ab".repeat(32)]);
    assert_fails_with(&out, &["cannot stage", &api]);
}
