//! The coordinator daemon: the state store, the node gRPC service, the REST API, the clock.
//!
//! [`run`] opens the store in the data directory (resuming every deployment where it was),
//! binds the gRPC listener (nodes) and the HTTP listener (REST API, `/metrics`, `/healthz`),
//! writes `ready.json` into the data directory with both addresses, and runs until the
//! cancellation token fires. A ticker marks silent hosts lost, fires the rollout engines'
//! deadlines and looks at open analysis gates, committing each batch before it is acted on.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetwave_chunker::TrustedKeys;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::analysis::Buckets;
use crate::auth::{Principal, Role, Tokens, hash_token};
use crate::fleet::{Fleet, FleetConfig};
use crate::store::Store;

/// The time the coordinator runs on: since the Unix epoch.
#[allow(clippy::disallowed_methods, reason = "the one place the daemon reads the clock")]
pub fn now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// A token from the configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenConfig {
    /// Its name (shown in the audit log).
    pub name: String,
    /// SHA-256 of the token, hex (`fleetwave-coordinator token` prints it).
    pub sha256: String,
    /// Its role.
    #[serde(flatten)]
    pub role: Role,
}

/// The coordinator's configuration (TOML; see `coordinator/fleetwave-coordinator.example.toml`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the state store lives.
    pub data_dir: PathBuf,
    /// gRPC address (nodes).
    pub listen_grpc: SocketAddr,
    /// HTTP address (REST API, metrics).
    pub listen_api: SocketAddr,
    /// Trusted release public key files: versions are registered only with manifests signed
    /// by one of them.
    pub trust: Vec<PathBuf>,
    /// How often hosts heartbeat.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A host silent this long is lost.
    #[serde(with = "humantime_serde")]
    pub lost_after: Duration,
    /// How often the ticker runs (deadlines, lost hosts, gates).
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// How often an open analysis gate is looked at.
    #[serde(with = "humantime_serde")]
    pub analysis_interval: Duration,
    /// The latency histogram layout hosts report in: `native` (four buckets per doubling from
    /// 1 ms to 65 s, 66 counts), `prometheus` (the client libraries' default bounds, 5 ms to
    /// 10 s), or the bounds in seconds, comma-separated, increasing (`+Inf` implied).
    pub latency_buckets: String,
    /// SHA-256 (hex) of the join tokens hosts enroll with.
    pub join_token_sha256: Vec<String>,
    /// API tokens.
    pub tokens: Vec<TokenConfig>,
    /// URLs that receive every automatic decision (wave started or passed, gate verdict,
    /// host failed, hold, rollback, done) as a JSON POST of its audit record.
    pub webhooks: Vec<String>,
    /// Services whose canaries are judged on PromQL queries to a Prometheus server instead
    /// of the counters hosts report (see [`crate::promql`]).
    pub prometheus: Vec<crate::promql::SourceConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/fleetwave-coordinator"),
            listen_grpc: SocketAddr::from(([0, 0, 0, 0], 7500)),
            listen_api: SocketAddr::from(([0, 0, 0, 0], 7600)),
            trust: Vec::new(),
            heartbeat_interval: Duration::from_secs(5),
            lost_after: Duration::from_secs(30),
            tick: Duration::from_millis(200),
            analysis_interval: Duration::from_secs(10),
            latency_buckets: "native".into(),
            join_token_sha256: Vec::new(),
            tokens: Vec::new(),
            webhooks: Vec::new(),
            prometheus: Vec::new(),
        }
    }
}

/// The daemon cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Invalid configuration.
    #[error("config: {field}: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store.
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    /// A listener cannot bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl Config {
    /// Checks what can be checked before anything binds.
    pub fn validate(&self) -> Result<(), DaemonError> {
        let bad = |field, reason: &str| Err(DaemonError::Config { field, reason: reason.into() });
        if self.heartbeat_interval.is_zero() || self.tick.is_zero() {
            return bad("heartbeat_interval", "intervals must be positive");
        }
        if self.lost_after <= self.heartbeat_interval {
            return bad("lost_after", "must be longer than heartbeat_interval");
        }
        if self.trust.is_empty() {
            return bad("trust", "at least one trusted release key is needed");
        }
        if let Err(reason) = parse_latency_buckets(&self.latency_buckets) {
            return bad("latency_buckets", &reason);
        }
        if self.webhooks.iter().any(|u| !u.starts_with("http://") && !u.starts_with("https://")) {
            return bad("webhooks", "must be http:// or https:// URLs");
        }
        let mut sources = std::collections::BTreeSet::new();
        for source in &self.prometheus {
            source
                .validate()
                .map_err(|reason| DaemonError::Config { field: "prometheus", reason })?;
            if !sources.insert(&source.service) {
                return bad(
                    "prometheus",
                    &format!("{}: two sources for one service", source.service),
                );
            }
        }
        for h in self.join_token_sha256.iter().chain(self.tokens.iter().map(|t| &t.sha256)) {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad("sha256", "token hashes are 64 hex digits (SHA-256)");
            }
        }
        Ok(())
    }
}

/// The `latency_buckets` setting: a preset name or the bounds in seconds.
pub fn parse_latency_buckets(text: &str) -> Result<Buckets, String> {
    match text.trim() {
        "native" => Ok(Buckets::native_schema_2()),
        "prometheus" => Ok(Buckets::prometheus_default()),
        list => {
            let upper = list
                .split(',')
                .map(|b| b.trim().parse::<f64>().map_err(|_| format!("{b:?} is not a number")))
                .collect::<Result<Vec<f64>, String>>()?;
            Buckets::new(upper).map_err(|e| e.to_string())
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    service: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

/// The coordinator's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    heartbeats: Counter,
    heartbeat_seconds: Histogram,
    refused: Family<ReasonLabel, Counter>,
    hosts: Gauge,
    lost: Gauge,
    deployments: Gauge,
    promql: Family<SourceLabel, Counter>,
    promql_hosts: Family<ServiceLabel, Gauge>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("fleetwave_coordinator");
        let heartbeats = Counter::default();
        let heartbeat_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let refused = Family::<ReasonLabel, Counter>::default();
        let (hosts, lost, deployments) = (Gauge::default(), Gauge::default(), Gauge::default());
        registry.register("heartbeats", "Heartbeats answered", heartbeats.clone());
        registry.register(
            "heartbeat_seconds",
            "Time to answer a heartbeat, commit included",
            heartbeat_seconds.clone(),
        );
        registry.register("refused", "Node requests refused, by reason", refused.clone());
        registry.register("hosts", "Enrolled hosts", hosts.clone());
        registry.register("hosts_lost", "Hosts that missed their heartbeats", lost.clone());
        registry.register("deployments_running", "Deployments running", deployments.clone());
        let promql = Family::<SourceLabel, Counter>::default();
        let promql_hosts = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "promql_fetches",
            "Rounds of PromQL queries for a service's canary counters, by result",
            promql.clone(),
        );
        registry.register(
            "promql_hosts",
            "Enrolled hosts the last PromQL round had counters for",
            promql_hosts.clone(),
        );
        Self {
            registry,
            heartbeats,
            heartbeat_seconds,
            refused,
            hosts,
            lost,
            deployments,
            promql,
            promql_hosts,
        }
    }

    /// Counts a round of PromQL queries for `service`.
    fn promql_fetch(&self, service: &str, result: Result<usize, ()>) {
        let label = |result| SourceLabel { service: service.to_owned(), result };
        match result {
            Ok(hosts) => {
                self.promql.get_or_create(&label("ok")).inc();
                let service = ServiceLabel { service: service.to_owned() };
                self.promql_hosts.get_or_create(&service).set(hosts as i64);
            }
            Err(()) => {
                self.promql.get_or_create(&label("error")).inc();
            }
        }
    }

    /// Counts a refused node request.
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts an answered heartbeat.
    pub fn heartbeat(&self, took: Duration) {
        self.heartbeats.inc();
        self.heartbeat_seconds.observe(took.as_secs_f64());
    }

    /// The text exposition.
    pub fn encode(&self, fleet: &Fleet) -> String {
        let (hosts, lost) = fleet.host_counts();
        self.hosts.set(hosts as i64);
        self.lost.set(lost as i64);
        self.deployments.set(fleet.running_deployments() as i64);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What the gRPC and REST handlers share.
#[derive(Debug)]
pub struct Shared {
    /// The state, behind one lock (every critical section is short: no I/O but sled writes).
    pub fleet: Mutex<Fleet>,
    /// The store (for commits outside the lock).
    pub store: Store,
    /// Metrics.
    pub metrics: Metrics,
    /// Release keys trusted for registration.
    pub trusted: TrustedKeys,
    /// What heartbeat session keys are derived from (kept in the store; never logged).
    pub session_secret: fleetwave_proto::session::CoordinatorSecret,
    tokens: Tokens,
    join_hashes: Vec<String>,
    heartbeat_interval: Duration,
}

impl Shared {
    /// Whether `token` is a valid join token.
    pub fn join_token_ok(&self, token: &str) -> bool {
        let hash = hash_token(token);
        // Every hash is compared, so the time does not tell which one matched.
        self.join_hashes.iter().fold(false, |ok, h| ok | h.eq_ignore_ascii_case(&hash))
    }

    /// The principal of an API token.
    pub fn principal(&self, token: &str) -> Option<Principal> {
        let hash = hash_token(token);
        if let Some(p) = self.tokens.get(&hash) {
            return Some(p.clone());
        }
        self.store.token(&hash).ok().flatten().map(|t| Principal { name: t.name, role: t.role })
    }

    /// The heartbeat interval, in ms.
    pub fn heartbeat_interval_ms(&self) -> u32 {
        u32::try_from(self.heartbeat_interval.as_millis()).unwrap_or(u32::MAX)
    }
}

/// Where the daemon listens, written to `<data>/ready.json` once it does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// gRPC address.
    pub grpc: SocketAddr,
    /// HTTP address.
    pub api: SocketAddr,
}

/// Posts every decision to every webhook (JSON, 5 s timeout; failures are logged, not retried).
async fn send_webhooks(
    urls: Vec<String>,
    mut decisions: tokio::sync::mpsc::Receiver<crate::store::AuditEntry>,
) {
    let http =
        reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap_or_default();
    while let Some(entry) = decisions.recv().await {
        for url in &urls {
            match http.post(url).json(&entry).send().await {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => tracing::warn!(%url, status = %r.status(), "webhook refused a decision"),
                Err(e) => tracing::warn!(%url, error = %e, "webhook unreachable"),
            }
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DaemonError> {
    let io = |source| DaemonError::Io { path: path.to_owned(), source };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// Builds the shared state (opens the store, resumes deployments).
pub fn open(config: &Config) -> Result<Arc<Shared>, DaemonError> {
    config.validate()?;
    let trusted = TrustedKeys::read_files(&config.trust)
        .map_err(|e| DaemonError::Config { field: "trust", reason: e.to_string() })?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| DaemonError::Io { path: config.data_dir.clone(), source })?;
    let store =
        Store::open(&config.data_dir.join("state")).map_err(crate::fleet::FleetError::from)?;
    let fleet_config = FleetConfig {
        lost_after: config.lost_after,
        heartbeat_interval: config.heartbeat_interval,
        analysis_interval: config.analysis_interval,
        // Checked by validate().
        latency_buckets: parse_latency_buckets(&config.latency_buckets).unwrap_or_default(),
        keep_decisions: !config.webhooks.is_empty(),
        external: config.prometheus.iter().map(|s| (s.service.clone(), s.valid_for())).collect(),
        ..FleetConfig::default()
    };
    let fleet = Fleet::open(store.clone(), fleet_config, now())?;
    let session_secret = store.session_secret().map_err(crate::fleet::FleetError::from)?;
    let mut tokens = Tokens::default();
    for t in &config.tokens {
        tokens.insert(t.sha256.clone(), Principal { name: t.name.clone(), role: t.role.clone() });
    }
    Ok(Arc::new(Shared {
        fleet: Mutex::new(fleet),
        store,
        metrics: Metrics::new(),
        trusted,
        session_secret,
        tokens,
        join_hashes: config.join_token_sha256.clone(),
        heartbeat_interval: config.heartbeat_interval,
    }))
}

/// Fetches one service's canary counters from its Prometheus server every `every` while the
/// service has a deployment in progress, and hands them to the fleet. A failed round is
/// logged and counted; the counters it would have replaced go stale (and their hosts count
/// as missing, not failing) after [`crate::promql::SourceConfig::valid_for`].
async fn run_promql(shared: Arc<Shared>, source: crate::promql::Source, stop: CancellationToken) {
    let service = source.config.service.clone();
    let mut interval = tokio::time::interval(source.config.every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = interval.tick() => {}
        }
        let wanted = match shared.fleet.lock() {
            Ok(fleet) => fleet
                .services_in_progress()
                .contains(&service)
                .then(|| (fleet.host_names(), fleet.config().latency_buckets.clone())),
            Err(_) => break,
        };
        let Some((names, buckets)) = wanted else { continue };
        let asked = now();
        match source.fetch(&names, &buckets).await {
            Ok((hosts, unused)) => {
                if failing {
                    tracing::info!(%service, "prometheus answers again");
                    failing = false;
                }
                if unused.unmatched > 0 || unused.other_layout > 0 {
                    tracing::debug!(
                        %service,
                        unmatched = unused.unmatched,
                        other_layout = unused.other_layout,
                        "prometheus series left out"
                    );
                }
                shared.metrics.promql_fetch(&service, Ok(hosts.len()));
                match shared.fleet.lock() {
                    Ok(mut fleet) => fleet.put_external(&service, asked, hosts),
                    Err(_) => break,
                }
            }
            Err(e) => {
                shared.metrics.promql_fetch(&service, Err(()));
                if !failing {
                    tracing::warn!(%service, error = %e, "canary counters not fetched");
                    failing = true;
                }
            }
        }
    }
}

/// Runs the coordinator until `stop` fires.
pub async fn run(config: Config, stop: CancellationToken) -> Result<(), DaemonError> {
    let shared = open(&config)?;
    let committer = tokio::spawn(shared.store.clone().run_committer());
    let grpc = tokio::net::TcpListener::bind(config.listen_grpc)
        .await
        .map_err(|source| DaemonError::Bind { addr: config.listen_grpc, source })?;
    let api = tokio::net::TcpListener::bind(config.listen_api)
        .await
        .map_err(|source| DaemonError::Bind { addr: config.listen_api, source })?;
    let ready = Ready {
        grpc: grpc
            .local_addr()
            .map_err(|source| DaemonError::Bind { addr: config.listen_grpc, source })?,
        api: api
            .local_addr()
            .map_err(|source| DaemonError::Bind { addr: config.listen_api, source })?,
    };
    tracing::info!(grpc = %ready.grpc, api = %ready.api, "coordinator listening");

    let grpc_task = {
        let stop = stop.clone();
        let service = crate::nodes::NodeService::new(shared.clone()).server();
        let incoming = tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
        })
    };
    let api_task = {
        let stop = stop.clone();
        let router = crate::api::router(shared.clone());
        tokio::spawn(async move {
            axum::serve(api, router).with_graceful_shutdown(stop.cancelled_owned()).await
        })
    };
    let promql_tasks: Vec<_> = config
        .prometheus
        .iter()
        .map(|c| {
            let source = crate::promql::Source::new(c.clone());
            tokio::spawn(run_promql(shared.clone(), source, stop.clone()))
        })
        .collect();
    let (decisions_tx, decisions_rx) = tokio::sync::mpsc::channel(1024);
    let webhook_task = tokio::spawn(send_webhooks(config.webhooks.clone(), decisions_rx));
    let tick_task = {
        let stop = stop.clone();
        let shared = shared.clone();
        let every = config.tick;
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = interval.tick() => {}
                }
                let result = match shared.fleet.lock() {
                    Ok(mut fleet) => fleet.tick(now()),
                    Err(_) => break,
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "tick failed");
                }
                shared.store.commit().await;
                // Durable now: tell the webhooks.
                let decided =
                    shared.fleet.lock().map(|mut f| f.take_decisions()).unwrap_or_default();
                for entry in decided {
                    if decisions_tx.try_send(entry).is_err() {
                        tracing::warn!("webhook queue full: a decision was not sent");
                    }
                }
            }
        })
    };
    write_atomic(
        &config.data_dir.join("ready.json"),
        &serde_json::to_vec_pretty(&ready).unwrap_or_default(),
    )?;

    stop.cancelled().await;
    let _ = tick_task.await;
    for task in promql_tasks {
        let _ = task.await;
    }
    match grpc_task.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server"),
        Err(e) => tracing::warn!(error = %e, "gRPC task"),
        Ok(Ok(())) => {}
    }
    if let Ok(Err(e)) = api_task.await {
        tracing::warn!(error = %e, "API server");
    }
    webhook_task.abort();
    if let Err(e) = shared.store.flush() {
        tracing::error!(error = %e, "final flush");
    }
    drop(shared);
    committer.abort();
    tracing::info!("coordinator stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_sources_are_checked() {
        let text = "trust = [\"k\"]\n[[prometheus]]\nservice = \"web\"\nurl = \"http://127.0.0.1:9090\"\n\
                    latency = 'sum by ($host_label, le) (x_bucket)'\nevery = \"2s\"\n";
        let c: Config = toml::from_str(text).expect("parses");
        assert_eq!(c.validate().ok(), Some(()));
        let source = &c.prometheus[0];
        assert_eq!(source.host_label, "instance");
        assert_eq!(source.valid_for(), Duration::from_secs(6));
        let mut twice = c.clone();
        twice.prometheus.push(source.clone());
        assert!(matches!(twice.validate(), Err(DaemonError::Config { field: "prometheus", .. })));
        let mut bad = c.clone();
        bad.prometheus[0].url = "127.0.0.1:9090".into();
        let e = bad.validate().expect_err("refused");
        assert!(e.to_string().contains("web: url"), "{e}");
        assert!(
            toml::from_str::<Config>("[[prometheus]]\nservice = \"web\"\n").is_err(),
            "url is required"
        );
    }

    #[test]
    fn the_example_config_is_the_defaults() {
        let text = include_str!("../fleetwave-coordinator.example.toml");
        let parsed: Config = toml::from_str(text).expect("example parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn latency_layouts_are_presets_or_bounds() {
        assert_eq!(parse_latency_buckets("native"), Ok(Buckets::native_schema_2()));
        assert_eq!(parse_latency_buckets(" prometheus "), Ok(Buckets::prometheus_default()));
        let b = parse_latency_buckets("0.01, 0.1,1").expect("bounds");
        assert_eq!(b.upper(), [0.01, 0.1, 1.0]);
        for bad in ["", "fast", "0.1, 0.01", "0.1,,1", "inf"] {
            assert!(parse_latency_buckets(bad).is_err(), "{bad:?}");
        }
        let c =
            Config { latency_buckets: "1, 0".into(), trust: vec!["k".into()], ..Config::default() };
        assert!(matches!(c.validate(), Err(DaemonError::Config { field: "latency_buckets", .. })));
    }

    #[test]
    fn tokens_parse_with_their_roles() {
        let text = r#"
            trust = ["/k.pub"]
            [[tokens]]
            name = "ci"
            sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
            role = "deployer"
            services = ["web"]
            [[tokens]]
            name = "ops"
            sha256 = "1111111111111111111111111111111111111111111111111111111111111111"
            role = "approver"
        "#;
        let c: Config = toml::from_str(text).expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.tokens[0].role, Role::Deployer { services: vec!["web".into()] });
        assert_eq!(c.tokens[1].role, Role::Approver);
        let bad = Config {
            tokens: vec![TokenConfig { sha256: "xyz".into(), ..c.tokens[0].clone() }],
            ..c
        };
        assert!(bad.validate().is_err(), "a bad hash is refused before anything binds");
    }
}
