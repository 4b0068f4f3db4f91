//! A fleet of real `fleetwave-node` processes on 127.0.0.1, for end-to-end tests: ephemeral
//! ports, temporary directories, every process killed when its handle drops.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleetwave_chunker::cdc::chunk_stream;
use fleetwave_chunker::pack::ArtifactStream;
use fleetwave_chunker::{BuildInfo, ChunkerParams, Manifest, ManifestId, SigningKey};
use fleetwave_node::daemon::{Info, Status};
use fleetwave_node::store::ChunkStore;

pub const BIN: &str = env!("CARGO_BIN_EXE_fleetwave-node");

/// Polls `f` every 20 ms until it returns `Some`, for at most `limit` (a bound against hangs,
/// not an assertion about speed).
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let polls = limit.as_millis() / 20;
    for _ in 0..polls {
        if let Some(v) = f() {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

/// xorshift64*: deterministic test bytes.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a service tree of `files` files of `file_len` pseudo-random bytes each; files in
/// `edited` get different contents.
pub fn make_tree(root: &Path, files: usize, file_len: usize, edited: &[usize]) {
    for i in 0..files {
        let dir = root.join(format!("lib/part{}", i % 4));
        fs::create_dir_all(&dir).unwrap();
        let seed = if edited.contains(&i) { 1_000_000 + i as u64 } else { i as u64 + 1 };
        let path = dir.join(format!("blob{i:03}.bin"));
        fs::write(&path, pseudo_random(seed, file_len)).unwrap();
    }
    fs::create_dir_all(root.join("bin")).unwrap();
    let bin = root.join("bin/server");
    fs::write(&bin, b"#!/bin/sh\necho serving\n").unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Publishes `src` into an origin store directory as `service@version`, the way
/// `fleetwave publish` does: chunks, then the manifest, then the ref.
pub fn publish(
    store_dir: &Path,
    src: &Path,
    service: &str,
    version: &str,
    key: &SigningKey,
) -> (ManifestId, Manifest) {
    let store = ChunkStore::open(store_dir).unwrap();
    let params = ChunkerParams::default();
    let mut stream = ArtifactStream::open(src).unwrap();
    let mut batch = store.batch();
    let summary =
        chunk_stream(&mut stream, params, |c| batch.put_prehashed(c.hash, c.data).map(|_| ()))
            .unwrap();
    let kind = stream.kind;
    stream.finish().unwrap();
    batch.commit().unwrap();
    let manifest = Manifest::from_summary(
        service.into(),
        version.into(),
        kind,
        params,
        summary,
        BuildInfo::default(),
    )
    .unwrap();
    let signed = key.sign(manifest);
    let id = signed.id();
    store.put_manifest(&id, &signed.encode()).unwrap();
    store.set_ref(service, version, &id).unwrap();
    (id, signed.manifest().clone())
}

/// One daemon process.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub args: Vec<String>,
    pub child: Option<Child>,
    pub info: Info,
}

impl Node {
    /// Starts `fleetwave-node` with `args` (plus data dir and ephemeral loopback sockets) and
    /// waits until it serves.
    pub fn start(name: &str, dir: &Path, args: &[String]) -> Node {
        fs::create_dir_all(dir).unwrap();
        let mut node = Node {
            name: name.into(),
            dir: dir.to_owned(),
            args: args.to_vec(),
            child: None,
            info: Info {
                peer_id: String::new(),
                role: fleetwave_node::daemon::config::Role::Host,
                region: String::new(),
                api: "127.0.0.1:0".parse().unwrap(),
                chunks: "127.0.0.1:0".parse().unwrap(),
                p2p: "127.0.0.1:0".parse().unwrap(),
            },
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let ready = self.dir.join("ready.json");
        let _ = fs::remove_file(&ready);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))
            .unwrap();
        let child = Command::new(BIN)
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen-api", "127.0.0.1:0"])
            .args(["--listen-chunks", "127.0.0.1:0"])
            .args(["--listen-p2p", "127.0.0.1:0"])
            .args(&self.args)
            .env("FLEETWAVE_LOG", "info,fleetwave_node=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let name = self.name.clone();
        let info: Info = wait_for(&format!("{name} to serve"), Duration::from_secs(60), || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{name} exited with {status}: {}", self.log_tail());
            }
            let text = fs::read_to_string(&ready).ok()?;
            serde_json::from_str(&text).ok()
        });
        self.info = info;
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.dir.join("node.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `API_URL=PEER_ID`, as `--origin` and `--cache` take it.
    pub fn upstream_arg(&self) -> String {
        format!("http://{}={}", self.info.api, self.info.peer_id)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.info.api)
    }

    pub fn status(&self) -> Status {
        reqwest::blocking::get(self.url("/v1/status")).unwrap().json().unwrap()
    }

    pub fn metrics(&self) -> String {
        reqwest::blocking::get(self.url("/metrics")).unwrap().text().unwrap()
    }

    /// Asks the host to stage `id`; the response status and JSON body.
    pub fn stage(&self, id: &ManifestId) -> (u16, serde_json::Value) {
        let client = reqwest::blocking::Client::new();
        let resp = client
            .post(self.url("/v1/admin/stage"))
            .json(&serde_json::json!({ "manifest": id.to_hex() }))
            .send()
            .unwrap();
        let code = resp.status().as_u16();
        (code, resp.json().unwrap_or(serde_json::Value::Null))
    }

    /// The release directory once `id` is staged, `None` while staging; panics if it failed.
    pub fn staged(&self, id: &ManifestId) -> Option<PathBuf> {
        let status = self.status();
        let m = status.manifests.iter().find(|m| m.id == id.to_hex())?;
        match m.status.as_str() {
            "staged" => m.release.clone(),
            "failed" => panic!("{} failed to stage: {:?}", self.name, m.error),
            _ => None,
        }
    }

    pub fn wait_staged(&self, id: &ManifestId) -> PathBuf {
        wait_for(&format!("{} to stage", self.name), Duration::from_secs(120), || self.staged(id))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let ok = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
        assert!(ok.success());
        wait_for("graceful exit", Duration::from_secs(30), || child.try_wait().unwrap())
    }

    /// Starts the process again with the same arguments and data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A file tree: relative path -> (bytes, executable).
pub fn snapshot(root: &Path) -> BTreeMap<String, (Vec<u8>, bool)> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (Vec<u8>, bool)>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.insert(rel + "/", (Vec::new(), false));
                walk(root, &path, out);
            } else {
                let exec = meta.permissions().mode() & 0o111 != 0;
                out.insert(rel, (fs::read(&path).unwrap(), exec));
            }
        }
    }
    walk(root, root, &mut out);
    out
}
