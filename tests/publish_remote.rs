//! `fleetwave publish --origin http://...` against the store API served in-process over a
//! temporary store: only missing chunks move, the result equals a directory publish, and the
//! upload token is required and never shown.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{assert_fails_with, field, paren_field, stderr, stdout};

use fleetwave_chunker::{ManifestId, SignedManifest};
use fleetwave_node::store::ChunkStore;
use fleetwave_node::store_api::{BackgroundServer, StoreApi, UploadAuth, spawn_server};

const TOKEN: &str = "publish-token-4f2a9c";

struct Env {
    dir: tempfile::TempDir,
    store: ChunkStore,
    server: BackgroundServer,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(dir.path().join("origin")).expect("open store");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let auth = UploadAuth::new(TOKEN).expect("token");
        let api = StoreApi::new(store.clone()).with_upload_auth(Some(auth));
        let server = spawn_server(listener, api).expect("serve");
        let env = Self { dir, store, server };
        std::fs::write(env.token_file(), format!("{TOKEN}\n")).expect("write token");
        std::fs::set_permissions(env.token_file(), PermissionsExt::from_mode(0o600))
            .expect("chmod");
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

    fn token_file(&self) -> PathBuf {
        self.path("upload-token")
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_fleetwave"))
            .args(args)
            .env_remove("SOURCE_DATE_EPOCH")
            .env_remove("FLEETWAVE_ORIGIN")
            .env_remove("FLEETWAVE_UPLOAD_TOKEN_FILE")
            .output()
            .expect("runs fleetwave")
    }

    /// Publishes `src` as web@`version` to `origin` (a URL or a directory), with a fixed build
    /// time so that the same tree gives the same manifest wherever it goes.
    fn publish(&self, src: &Path, version: &str, origin: &str, token: Option<&Path>) -> Output {
        let key = self.key();
        let mut args = vec![
            "publish",
            src.to_str().expect("utf8"),
            "--service",
            "web",
            "--version",
            version,
            "--key",
            key.to_str().expect("utf8"),
            "--origin",
            origin,
            "--built-at",
            "1700000000",
            "--builder",
            "test",
            "--quiet",
        ];
        let token = token.map(|t| t.to_str().expect("utf8").to_owned());
        if let Some(token) = &token {
            args.extend(["--upload-token-file", token.as_str()]);
        }
        self.run(&args)
    }
}

fn manifest_id(out: &Output) -> ManifestId {
    let text = stdout(out);
    let hex = text.lines().find_map(|l| l.strip_prefix("manifest:  ")).expect("manifest line");
    hex.trim().parse().expect("manifest id")
}

fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("bin")).expect("mkdir");
    std::fs::create_dir_all(root.join("etc")).expect("mkdir");
    let mut data = vec![0u8; 3 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
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

/// Checks that the store holds the manifest `id` as `web@version`, and every chunk it names.
fn assert_published(store: &ChunkStore, version: &str, id: ManifestId) -> SignedManifest {
    assert_eq!(store.resolve_ref("web", version).expect("ref"), Some(id));
    let bytes = store.get_manifest(&id).expect("manifest stored");
    let signed = SignedManifest::decode_expecting(id, &bytes).expect("decodes");
    assert_eq!(signed.manifest().version, version);
    for chunk in signed.manifest().unique_chunks() {
        store.verify(&chunk.hash).expect("chunk stored intact");
    }
    signed
}

#[test]
fn publish_to_an_origin_url_uploads_only_missing_chunks() {
    let env = Env::new();
    let url = env.server.url();
    let src = env.path("src");
    make_tree(&src);

    let v1 = env.publish(&src, "1.0.0", &url, Some(&env.token_file()));
    assert!(v1.status.success(), "{}", stderr(&v1));
    let id1 = manifest_id(&v1);
    let distinct1 = paren_field(&v1, "chunks:");
    assert_eq!(field(&v1, "uploaded:"), distinct1, "a first publish uploads every chunk");
    assert_eq!(field(&v1, "reused:"), 0);
    assert_eq!(paren_field(&v1, "uploaded:"), paren_field(&v1, "size:"));
    assert_published(&env.store, "1.0.0", id1);
    assert_eq!(env.store.len().expect("len") as u64, distinct1);

    // One file changes: only its chunks move.
    std::fs::write(src.join("etc/app.toml"), b"port = 8080\n").expect("write");
    let v2 = env.publish(&src, "1.0.1", &url, Some(&env.token_file()));
    assert!(v2.status.success(), "{}", stderr(&v2));
    let id2 = manifest_id(&v2);
    let (distinct2, uploaded, reused) =
        (paren_field(&v2, "chunks:"), field(&v2, "uploaded:"), field(&v2, "reused:"));
    assert_eq!(uploaded + reused, distinct2);
    assert!(uploaded >= 1 && uploaded * 4 < distinct2, "uploaded {uploaded} of {distinct2}");
    assert!(paren_field(&v2, "uploaded:") * 4 < paren_field(&v2, "size:"));
    assert_published(&env.store, "1.0.1", id2);
    assert_eq!(env.store.len().expect("len") as u64, distinct1 + uploaded);
    assert_published(&env.store, "1.0.0", id1);

    // The same tree published to a directory gives the very same manifest.
    let dir = env.path("dir-origin");
    let local = env.publish(&src, "1.0.1", dir.to_str().expect("utf8"), None);
    assert!(local.status.success(), "{}", stderr(&local));
    assert_eq!(manifest_id(&local), id2);

    // The token never shows.
    for out in [&v1, &v2] {
        assert!(!stdout(out).contains(TOKEN) && !stderr(out).contains(TOKEN));
    }
}

#[test]
fn publish_to_an_origin_url_refuses_existing_versions_and_missing_tokens() {
    let env = Env::new();
    let url = env.server.url();
    let src = env.path("src");
    make_tree(&src);
    let v1 = env.publish(&src, "1.0.0", &url, Some(&env.token_file()));
    assert!(v1.status.success(), "{}", stderr(&v1));
    let chunks = env.store.len().expect("len");

    // Refused up front, with the directory path's message.
    std::fs::write(src.join("etc/app.toml"), b"port = 9090\n").expect("write");
    let again = env.publish(&src, "1.0.0", &url, Some(&env.token_file()));
    let existing = manifest_id(&v1).to_string();
    assert_fails_with(&again, &["web@1.0.0 is already published as manifest", &existing]);

    // No token, or a wrong one: refused, nothing written.
    let none = env.publish(&src, "1.0.1", &url, None);
    assert_fails_with(&none, &["401", "upload token"]);
    let wrong = env.path("wrong-token");
    std::fs::write(&wrong, "not-the-token\n").expect("write");
    let out = env.publish(&src, "1.0.1", &url, Some(&wrong));
    assert_fails_with(&out, &["401"]);
    assert!(!stderr(&out).contains("not-the-token"));
    let missing_file = env.path("no-such-token");
    let out = env.publish(&src, "1.0.1", &url, Some(&missing_file));
    assert_fails_with(&out, &["no-such-token"]);
    assert_eq!(env.store.len().expect("len"), chunks);
    assert_eq!(env.store.resolve_ref("web", "1.0.1").expect("ref"), None);

    // Unsupported schemes are refused, not taken for a directory.
    let out = env.publish(&src, "1.0.1", "https://origin.invalid", None);
    assert_fails_with(&out, &["https://origin.invalid"]);
    assert!(!Path::new("https:").exists());
}
