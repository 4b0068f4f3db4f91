//! A whole Fleetwave fleet on this machine: origin, cache, coordinator and hosts as real
//! processes on 127.0.0.1 with ephemeral ports and their own directories. `fleetwave demo`
//! runs one; the end-to-end tests drive one.
//!
//! Every daemon is the `fleetwave` binary itself (`fleetwave daemon node|coordinator
//! --config FILE`), the same code as `fleetwave-node` and `fleetwave-coordinator`. Each
//! writes its log to `<dir>/<name>.log`. Dropping the fleet kills what is still running.

// Waiting for processes is wall-clock work by nature: this is the I/O edge.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use fleetwave_coordinator::view;
use serde::de::DeserializeOwned;

/// What to start.
#[derive(Clone, Debug)]
pub struct FleetSpec {
    /// Hosts (all in region `local`, environment `prod`).
    pub hosts: usize,
    /// How often hosts heartbeat.
    pub heartbeat: Duration,
    /// A host silent this long is lost.
    pub lost_after: Duration,
    /// A webhook URL the coordinator posts its decisions to.
    pub webhook: Option<String>,
    /// The Prometheus page each host scrapes for service `web`'s counters, `{host}` replaced
    /// by the host's index. Default none: services push their counters.
    pub scrape_web: Option<String>,
    /// The coordinator's `latency_buckets`. Default its own.
    pub latency_buckets: Option<String>,
    /// More of the coordinator's configuration (TOML tables, such as `[[prometheus]]`),
    /// appended to the file.
    pub coordinator_extra: String,
}

impl Default for FleetSpec {
    fn default() -> Self {
        Self {
            hosts: 8,
            heartbeat: Duration::from_millis(300),
            lost_after: Duration::from_secs(5),
            webhook: None,
            scrape_web: None,
            latency_buckets: None,
            coordinator_extra: String::new(),
        }
    }
}

/// One daemon process.
#[derive(Debug)]
pub struct Proc {
    /// Its name (`origin`, `cache`, `coordinator`, `host-3`).
    pub name: String,
    /// Its data directory.
    pub dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// `node` or `coordinator`.
    kind: &'static str,
    child: Option<Child>,
    /// Its `ready.json`.
    pub ready: serde_json::Value,
}

impl Proc {
    fn spawn(
        exe: &Path,
        kind: &'static str,
        name: &str,
        dir: &Path,
        config: &Path,
    ) -> Result<Self> {
        let log = std::fs::File::create(dir.with_extension("log"))
            .with_context(|| format!("cannot create the log of {name}"))?;
        let _ = std::fs::remove_file(dir.join("ready.json"));
        let child = Command::new(exe)
            .args(["daemon", kind, "--config"])
            .arg(config)
            .env(
                "FLEETWAVE_LOG",
                std::env::var("FLEETWAVE_DAEMON_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let mut proc = Proc {
            name: name.to_owned(),
            dir: dir.to_owned(),
            config: config.to_owned(),
            kind,
            child: Some(child),
            ready: serde_json::Value::Null,
        };
        proc.wait_ready(exe)?;
        Ok(proc)
    }

    fn wait_ready(&mut self, _exe: &Path) -> Result<()> {
        let ready = self.dir.join("ready.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if let Ok(v) = serde_json::from_str(&text) {
                    self.ready = v;
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{} exited ({status}) before it was ready; see {}",
                        self.name,
                        self.dir.with_extension("log").display()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("{} not ready after 30 s", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A field of `ready.json` as a string.
    pub fn ready_str(&self, field: &str) -> String {
        self.ready.get(field).and_then(|v| v.as_str()).unwrap_or_default().to_owned()
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: dies at once, mid-whatever.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for it to exit (SIGKILL after 10 s).
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let pid = rustix::process::Pid::from_child(&child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("{} did not stop within 10 s of SIGTERM", self.name)
    }

    /// Starts it again with the same config and data directory.
    pub fn restart(&mut self, exe: &Path) -> Result<()> {
        self.kill9();
        let again = Proc::spawn(exe, self.kind, &self.name, &self.dir, &self.config)?;
        *self = again;
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The fleet.
#[derive(Debug)]
pub struct LocalFleet {
    /// The root directory.
    pub dir: PathBuf,
    /// The binary every daemon runs.
    pub exe: PathBuf,
    /// The release signing key (secret; `.pub` beside it).
    pub key: PathBuf,
    /// The origin.
    pub origin: Proc,
    /// The region's cache.
    pub cache: Proc,
    /// The coordinator.
    pub coordinator: Proc,
    /// The hosts.
    pub hosts: Vec<Proc>,
    /// The admin API token.
    pub admin_token: String,
    /// A viewer API token (read only).
    pub viewer_token: String,
    /// The coordinator's REST API.
    pub api: Api,
}

fn write_config(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn toml_str(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

impl LocalFleet {
    /// Starts origin, cache, coordinator and `spec.hosts` hosts under `dir`, running `exe`.
    pub fn start(exe: &Path, dir: &Path, spec: &FleetSpec) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let key = dir.join("release.key");
        let signing = fleetwave_chunker::SigningKey::generate();
        let public = signing.write_files(&key).context("cannot write the release key")?;
        let join = dir.join("join.token");
        let admin = dir.join("admin.token");
        let admin_token = fleetwave_coordinator::auth::generate_token();
        let viewer_token = fleetwave_coordinator::auth::generate_token();
        write_config(&join, &fleetwave_coordinator::auth::generate_token())?;
        write_config(&admin, &admin_token)?;
        let listen =
            "[listen]\napi = \"127.0.0.1:0\"\nchunks = \"127.0.0.1:0\"\np2p = \"127.0.0.1:0\"\n";

        let odir = dir.join("origin");
        std::fs::create_dir_all(&odir)?;
        let oconf = dir.join("origin.toml");
        write_config(
            &oconf,
            &format!(
                "role = \"origin\"\nregion = \"local\"\ndata_dir = {}\ntrust = [{}]\n{listen}",
                toml_str(&odir),
                toml_str(&public)
            ),
        )?;
        let origin = Proc::spawn(exe, "node", "origin", &odir, &oconf)?;
        let upstream = |p: &Proc| {
            format!(
                "api = \"http://{}\"\npeer_id = \"{}\"\n",
                p.ready_str("api"),
                p.ready_str("peer_id")
            )
        };

        let cdir = dir.join("cache");
        std::fs::create_dir_all(&cdir)?;
        let cconf = dir.join("cache.toml");
        write_config(
            &cconf,
            &format!(
                "role = \"cache\"\nregion = \"local\"\ndata_dir = {}\ntrust = [{}]\n[origin]\n{}{listen}",
                toml_str(&cdir),
                toml_str(&public),
                upstream(&origin)
            ),
        )?;
        let cache = Proc::spawn(exe, "node", "cache", &cdir, &cconf)?;

        let kdir = dir.join("coordinator");
        std::fs::create_dir_all(&kdir)?;
        let kconf = dir.join("coordinator.toml");
        let join_hash =
            fleetwave_coordinator::auth::hash_token(std::fs::read_to_string(&join)?.trim());
        write_config(
            &kconf,
            &format!(
                "data_dir = {}\nlisten_grpc = \"127.0.0.1:0\"\nlisten_api = \"127.0.0.1:0\"\n\
                 trust = [{}]\nheartbeat_interval = \"{}ms\"\nlost_after = \"{}ms\"\ntick = \"50ms\"\n\
                 analysis_interval = \"1s\"\njoin_token_sha256 = [\"{join_hash}\"]\n\
                 webhooks = [{}]\n{}\
                 [[tokens]]\nname = \"admin\"\nsha256 = \"{}\"\nrole = \"admin\"\n\
                 [[tokens]]\nname = \"viewer\"\nsha256 = \"{}\"\nrole = \"viewer\"\n{}",
                toml_str(&kdir),
                toml_str(&public),
                spec.heartbeat.as_millis(),
                spec.lost_after.as_millis(),
                spec.webhook
                    .as_ref()
                    .map(|w| toml::Value::String(w.clone()).to_string())
                    .unwrap_or_default(),
                spec.latency_buckets
                    .as_ref()
                    .map(|b| format!("latency_buckets = {}\n", toml::Value::String(b.clone())))
                    .unwrap_or_default(),
                fleetwave_coordinator::auth::hash_token(&admin_token),
                fleetwave_coordinator::auth::hash_token(&viewer_token),
                spec.coordinator_extra,
            ),
        )?;
        let coordinator = Proc::spawn(exe, "coordinator", "coordinator", &kdir, &kconf)?;
        let grpc = coordinator.ready_str("grpc");
        let api = Api::new(&format!("http://{}", coordinator.ready_str("api")), &admin_token);

        let mut hosts = Vec::new();
        for i in 0..spec.hosts {
            let name = format!("host-{i}");
            let hdir = dir.join(&name);
            std::fs::create_dir_all(&hdir)?;
            let hconf = dir.join(format!("{name}.toml"));
            write_config(
                &hconf,
                &format!(
                    "role = \"host\"\nregion = \"local\"\ndata_dir = {}\ntrust = [{}]\n\
                     [origin]\n{}[[caches]]\n{}\
                     [coordinator]\nurl = \"http://{grpc}\"\njoin_token_file = {}\n\
                     environment = \"prod\"\nname = \"{name}\"\n{listen}",
                    toml_str(&hdir),
                    toml_str(&public),
                    upstream(&origin),
                    upstream(&cache),
                    toml_str(&join),
                ),
            )?;
            if let Some(url) = &spec.scrape_web {
                let url = url.replace("{host}", &i.to_string());
                let entry = format!(
                    "\n[[scrape]]\nservice = \"web\"\nurl = \"{url}\"\nevery = \"1s\"\n\
                     latency = \"http_request_duration_seconds\"\n"
                );
                let mut text = std::fs::read_to_string(&hconf)?;
                text.push_str(&entry);
                write_config(&hconf, &text)?;
            }
            hosts.push(Proc::spawn(exe, "node", &name, &hdir, &hconf)?);
        }
        let fleet = LocalFleet {
            dir: dir.to_owned(),
            exe: exe.to_owned(),
            key,
            origin,
            cache,
            coordinator,
            hosts,
            admin_token,
            viewer_token,
            api,
        };
        fleet.wait("every host enrolled", Duration::from_secs(30), |f| {
            let hosts: Vec<view::HostView> = f.api.get("/api/v1/hosts").ok()?;
            (hosts.len() == spec.hosts).then_some(())
        })?;
        Ok(fleet)
    }

    /// The origin's store API URL.
    pub fn origin_url(&self) -> String {
        format!("http://{}", self.origin.ready_str("api"))
    }

    /// Restarts the coordinator (after [`Proc::kill9`] or not): same state directory.
    pub fn restart_coordinator(&mut self) -> Result<()> {
        // On the same ports: the hosts know its address.
        let config = std::fs::read_to_string(&self.coordinator.config)?
            .replace(
                "listen_grpc = \"127.0.0.1:0\"",
                &format!("listen_grpc = \"{}\"", self.coordinator.ready_str("grpc")),
            )
            .replace(
                "listen_api = \"127.0.0.1:0\"",
                &format!("listen_api = \"{}\"", self.coordinator.ready_str("api")),
            );
        write_config(&self.coordinator.config, &config)?;
        self.coordinator.restart(&self.exe)?;
        self.api =
            Api::new(&format!("http://{}", self.coordinator.ready_str("api")), &self.admin_token);
        Ok(())
    }

    /// The last `lines` lines of a daemon's log (for failure messages).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Polls `f` every 50 ms until it answers, for at most `limit`.
    pub fn wait<T>(
        &self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&Self) -> Option<T>,
    ) -> Result<T> {
        poll_until(what, limit, || f(self))
            .map_err(|e| anyhow!("{e}; coordinator log:\n{}", self.log_tail("coordinator", 30)))
    }

    /// Registers a published version with the coordinator (fetching its signed manifest from
    /// the origin) and promotes it to `environments` in order.
    pub fn register(&self, manifest_hex: &str, environments: &[&str]) -> Result<view::VersionView> {
        let bytes =
            reqwest::blocking::get(format!("{}/v1/manifests/{manifest_hex}", self.origin_url()))
                .and_then(|r| r.error_for_status())
                .and_then(|r| r.bytes())
                .context("cannot fetch the manifest from the origin")?;
        let signed = fleetwave_chunker::SignedManifest::decode(&bytes)?;
        let service = signed.manifest().service.clone();
        let version = signed.manifest().version.clone();
        let mut v: view::VersionView = self.api.post(
            &format!("/api/v1/services/{service}/versions"),
            &view::RegisterRequest { signed_manifest_hex: hex::encode(signed.encode()) },
        )?;
        for env in environments {
            v = self.api.post(
                &format!("/api/v1/services/{service}/versions/{version}/promote"),
                &view::PromoteRequest { environment: (*env).into(), comment: "local fleet".into() },
            )?;
        }
        Ok(v)
    }

    /// Stops everything (SIGTERM), hosts first.
    pub fn stop(mut self) -> Result<()> {
        let mut failed = Vec::new();
        for h in &mut self.hosts {
            if let Err(e) = h.stop() {
                failed.push(e.to_string());
            }
        }
        for p in [&mut self.coordinator, &mut self.cache, &mut self.origin] {
            if let Err(e) = p.stop() {
                failed.push(e.to_string());
            }
        }
        if !failed.is_empty() {
            bail!("{}", failed.join("; "));
        }
        Ok(())
    }
}

/// A blocking client of the coordinator's REST API.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
}

/// An API answer that is not a success.
#[derive(Debug, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// The error code.
    pub code: String,
    /// The message.
    pub message: String,
}

impl Api {
    /// A client of `base` with `token`.
    pub fn new(base: &str, token: &str) -> Self {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        Self { base: base.trim_end_matches('/').to_owned(), token: token.to_owned(), http }
    }

    /// The same API with another token (empty: none).
    pub fn with_token(&self, token: &str) -> Self {
        Self { token: token.to_owned(), ..self.clone() }
    }

    fn send<T: DeserializeOwned>(&self, req: reqwest::blocking::RequestBuilder) -> Result<T> {
        let req = if self.token.is_empty() { req } else { req.bearer_auth(&self.token) };
        let resp =
            req.send().with_context(|| format!("cannot reach the coordinator at {}", self.base))?;
        let status = resp.status();
        let bytes = resp.bytes()?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<view::ErrorBody>(&bytes) {
                Ok(b) => (b.error.code, b.error.message),
                Err(_) => ("http".into(), String::from_utf8_lossy(&bytes).into_owned()),
            };
            return Err(ApiError { status: status.as_u16(), code, message }.into());
        }
        serde_json::from_slice(&bytes).context("unreadable answer from the coordinator")
    }

    /// GET `path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
    }

    /// POST `body` to `path`.
    pub fn post<T: DeserializeOwned, B: serde::Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
    }

    /// A deployment.
    pub fn deployment(&self, id: u64) -> Result<view::DeploymentView> {
        self.get(&format!("/api/v1/deployments/{id}"))
    }
}

/// Polls `f` every 50 ms until it answers `Some`, for at most `limit`; the error names `what`.
pub fn poll_until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
