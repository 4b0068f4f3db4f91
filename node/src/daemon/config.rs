//! The daemon's configuration: a TOML file, then `FLEETWAVE_*` environment variables and flags
//! (the binary's clap layer) on top, then [`Config::validate`], then sockets are bound.
//!
//! Every field has a default (see `node/fleetwave-node.example.toml`, which a test checks
//! parses to exactly [`Config::default`]); an operator sets the role, the data directory, the
//! trusted release keys and, for caches and hosts, where the origin and the caches are.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Most bytes of a configuration file read before parsing.
const MAX_CONFIG_LEN: u64 = 1 << 20;

/// What a daemon is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The authoritative store of every published artifact.
    Origin,
    /// A regional pull-through cache and the region's rendezvous point.
    Cache,
    /// A machine of the fleet that stages and runs releases.
    #[default]
    Host,
}

impl Role {
    /// The role's name, as in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Role::Origin => "origin",
            Role::Cache => "cache",
            Role::Host => "host",
        }
    }
}

/// Another daemon this one talks to: its HTTP API and the identity it must prove.
///
/// The addresses of its chunk endpoint and libp2p swarm are read from its API (`/v1/info`);
/// they need not be trusted, because every connection to them is authenticated against
/// `peer_id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Base URL of its HTTP API, e.g. `http://10.0.0.5:7400`.
    pub api: String,
    /// Its libp2p PeerId (`fleetwave-node id` prints it).
    pub peer_id: String,
}

/// The daemon's configuration (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `origin`, `cache` or `host`. Default `host`.
    pub role: Role,
    /// Region name; hosts only trade with peers registered at their region's rendezvous point.
    /// Default `default`.
    pub region: String,
    /// Data directory: identity key, store or stage area, state. Default `/var/lib/fleetwave`.
    pub data_dir: PathBuf,
    /// Public key files of release keys to trust (PEM, from `fleetwave keygen`). Hosts stage
    /// and caches relay only manifests signed by one of them; an origin with keys refuses
    /// uploads of manifests not signed by one. Default none (required for hosts and caches).
    pub trust: Vec<PathBuf>,
    /// Sockets.
    pub listen: Listen,
    /// Address to advertise for the chunk endpoint and libp2p swarm when they listen on an
    /// unspecified address (`0.0.0.0`). Default none: the listen address is advertised.
    pub advertise: Option<std::net::IpAddr>,
    /// The origin (caches; hosts without a reachable cache). Default none.
    pub origin: Option<Upstream>,
    /// The caches of this host's region, tried in order. Default none.
    pub caches: Vec<Upstream>,
    /// Swarm behaviour.
    pub swarm: SwarmSection,
    /// Host staging.
    pub stage: StageSection,
    /// File holding the bearer token that uploads to an origin must present. Default none:
    /// uploads are open (only for a test origin).
    pub upload_token_file: Option<PathBuf>,
    /// Host: the secrets injected into activation hooks, a `KEY=VALUE` file only its owner
    /// may read. Default none.
    pub secrets_file: Option<PathBuf>,
    /// Host: the coordinator it enrolls with and reconciles to. Default none: the host is
    /// driven through its admin API only.
    pub coordinator: Option<CoordinatorSection>,
    /// Host: services whose request counters are read from their own Prometheus endpoint
    /// (`[[scrape]]`), for canary analysis. Default none (services may push them instead).
    pub scrape: Vec<ScrapeSection>,
}

/// One service's Prometheus endpoint, scraped for its request counters (see
/// [`crate::scrape`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrapeSection {
    /// The service, as deployed.
    pub service: String,
    /// Its metrics page, e.g. `http://127.0.0.1:9102/metrics`.
    pub url: String,
    /// Selector of the requests counter. Default `http_requests_total`.
    #[serde(default = "default_requests")]
    pub requests: String,
    /// Selector of the errors among them. Default `http_requests_total{code=~"5.."}`.
    #[serde(default = "default_errors")]
    pub errors: String,
    /// Selector of the request-duration histogram (seconds; its name without `_bucket`).
    /// Default none: latency is not reported.
    #[serde(default)]
    pub latency: Option<String>,
    /// How often. Default 10 s.
    #[serde(default = "default_scrape_every", with = "humantime_serde")]
    pub every: Duration,
}

fn default_requests() -> String {
    "http_requests_total".into()
}

fn default_errors() -> String {
    r#"http_requests_total{code=~"5.."}"#.into()
}

fn default_scrape_every() -> Duration {
    Duration::from_secs(10)
}

/// Most `[[scrape]]` entries.
const MAX_SCRAPES: usize = 64;

/// The coordinator a host reconciles to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSection {
    /// Its gRPC address, e.g. `http://coordinator.example:7500`.
    pub url: String,
    /// File holding the join token (read at enrollment; never logged).
    pub join_token_file: PathBuf,
    /// The environment this host belongs to (`dev`, `staging`, `prod`, ..).
    pub environment: String,
    /// The name shown in listings. Default: the host name.
    #[serde(default)]
    pub name: Option<String>,
}

/// Listening sockets. Port 0 asks the system for a free port; the bound addresses are written
/// to `<data_dir>/ready.json` once the daemon serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// HTTP API: store endpoints (origin, cache), admin endpoints (host), `/metrics`.
    /// Default `127.0.0.1:7400`: a host's admin API must not be reachable from the network.
    pub api: SocketAddr,
    /// QUIC chunk endpoint (UDP). Default `0.0.0.0:7401`.
    pub chunks: SocketAddr,
    /// libp2p swarm (TCP): rendezvous. Default `0.0.0.0:7402`.
    pub p2p: SocketAddr,
}

/// How the swarm is driven.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SwarmSection {
    /// Most region peers one host connects to per manifest (a bounded random set of those
    /// registered). Default 12.
    pub max_peers: usize,
    /// How often a staging host asks the rendezvous point for more peers. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub discover_every: Duration,
    /// Requests outstanding to one region peer. Default 8.
    pub max_in_flight_per_peer: u32,
    /// Requests outstanding to one cache or the origin. Default 4 for hosts. A cache pulling
    /// through from the origin uses `cache_pull_in_flight`.
    pub max_in_flight_back_to_source: u32,
    /// Requests a cache keeps outstanding at the origin while pulling a manifest through.
    /// Default 32: a cache fills its region from one connection, so it must keep a long path
    /// busy (32 x 64 KiB = 2 MiB in flight: 40 MB/s at 50 ms).
    pub cache_pull_in_flight: u32,
    /// Uploads served at once. Default 8 (hosts), caches and the origin use `source_upload_slots`.
    pub upload_slots: u32,
    /// Uploads served at once by a cache or the origin. Default 32.
    pub source_upload_slots: u32,
    /// Hosts only: pass a chunk on to the peers that ask for it while it arrives, instead of
    /// once it is verified and durable (each receiver still verifies it; a failed copy is
    /// withdrawn). A chunk then crosses the swarm in about one transfer time instead of one a
    /// hop. Hosts much slower than their peers hold those peers to their pace; see
    /// docs/BENCHMARKS.md. Default false.
    pub forward_arriving: bool,
    /// Super-seeding window of caches and the origin: a chunk just sent to one host is refused
    /// to other hosts for this long, so that they take it from that host. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub seed_window: Duration,
    /// How long to wait for region peers' bitfields before asking a cache or the origin.
    /// Default 500 ms.
    #[serde(with = "humantime_serde")]
    pub back_to_source_delay: Duration,
    /// Origin only: most hosts fetching from the origin at once, fleet-wide (caches do not
    /// count). Hosts go to the origin only when no cache of their region answers; this cap
    /// keeps a cold start or a lost cache from stampeding it. A host beyond the cap is refused
    /// (`TOO_MANY_PEERS`) and retries while it trades with its peers. Default 256.
    pub origin_max_hosts: usize,
    /// Most chunk bytes received per second, over all transfers (0: no limit), so that staging
    /// never crowds out the traffic of the services running on the host. Default 0.
    pub download_limit: u64,
}

/// Host staging.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StageSection {
    /// Staged releases kept per service (besides the active one), so that rollback is a
    /// switch. Default 3.
    pub keep_releases: usize,
    /// Group commit: received chunks are made durable (and announced) at least this often.
    /// Default 20 ms.
    #[serde(with = "humantime_serde")]
    pub sync_every: Duration,
    /// ... or as soon as this many bytes wait. Default 8 MiB.
    pub sync_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            role: Role::Host,
            region: "default".into(),
            data_dir: PathBuf::from("/var/lib/fleetwave"),
            trust: Vec::new(),
            listen: Listen::default(),
            advertise: None,
            origin: None,
            caches: Vec::new(),
            swarm: SwarmSection::default(),
            stage: StageSection::default(),
            upload_token_file: None,
            secrets_file: None,
            coordinator: None,
            scrape: Vec::new(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            api: SocketAddr::from(([127, 0, 0, 1], 7400)),
            chunks: SocketAddr::from(([0, 0, 0, 0], 7401)),
            p2p: SocketAddr::from(([0, 0, 0, 0], 7402)),
        }
    }
}

impl Default for SwarmSection {
    fn default() -> Self {
        Self {
            max_peers: 12,
            discover_every: Duration::from_secs(2),
            max_in_flight_per_peer: 8,
            max_in_flight_back_to_source: 4,
            cache_pull_in_flight: 32,
            upload_slots: 8,
            source_upload_slots: 32,
            forward_arriving: false,
            seed_window: Duration::from_secs(1),
            back_to_source_delay: Duration::from_millis(500),
            origin_max_hosts: 256,
            download_limit: 0,
        }
    }
}

impl Default for StageSection {
    fn default() -> Self {
        Self { keep_releases: 3, sync_every: Duration::from_millis(20), sync_bytes: 8 << 20 }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is larger than any sane configuration.
    #[error("config {path} is larger than {MAX_CONFIG_LEN} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not valid TOML for this schema.
    #[error("config {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's one-line message.
        message: String,
    },
    /// A field has a value that cannot work.
    #[error("config: {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl Config {
    /// Reads and parses a configuration file (not yet validated).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let read = |source| ConfigError::Read { path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(read)?;
        let mut text = String::new();
        file.take(MAX_CONFIG_LEN + 1).read_to_string(&mut text).map_err(read)?;
        if text.len() as u64 > MAX_CONFIG_LEN {
            return Err(ConfigError::TooLarge { path: path.to_owned() });
        }
        Self::parse(&text).map_err(|message| ConfigError::Parse { path: path.to_owned(), message })
    }

    /// Parses TOML text; the error is a one-line message.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|err| err.message().replace('\n', " "))
    }

    /// The address peers reach a socket bound to `bound` at.
    pub fn advertised(&self, bound: SocketAddr) -> SocketAddr {
        match self.advertise {
            Some(ip) if bound.ip().is_unspecified() => SocketAddr::new(ip, bound.port()),
            _ => bound,
        }
    }

    /// Checks what the types cannot: what each role needs, and limits that must be positive.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |field, reason: &str| Err(ConfigError::Invalid { field, reason: reason.to_owned() });
        if fleetwave_chunker::manifest::validate_name(&self.region).is_err() {
            return invalid("region", "must be a short name of letters, digits, '.', '_', '-'");
        }
        match self.role {
            Role::Origin => {}
            Role::Cache => {
                if self.origin.is_none() {
                    return invalid("origin", "a cache needs its origin");
                }
                if self.trust.is_empty() {
                    return invalid("trust", "a cache needs at least one trusted release key");
                }
            }
            Role::Host => {
                if self.origin.is_none() && self.caches.is_empty() {
                    return invalid("origin", "a host needs an origin or at least one cache");
                }
                if self.trust.is_empty() {
                    return invalid("trust", "a host needs at least one trusted release key");
                }
            }
        }
        for upstream in self.origin.iter().chain(&self.caches) {
            if !upstream.api.starts_with("http://") {
                return invalid("origin/caches.api", "must be an http:// URL");
            }
            if upstream.peer_id.parse::<libp2p_identity::PeerId>().is_err() {
                return invalid("origin/caches.peer_id", "not a libp2p PeerId");
            }
        }
        if let Some(c) = &self.coordinator {
            if self.role != Role::Host {
                return invalid("coordinator", "only hosts reconcile to a coordinator");
            }
            if !c.url.starts_with("http://") && !c.url.starts_with("https://") {
                return invalid("coordinator.url", "must be an http:// URL");
            }
            if c.environment.is_empty() || c.environment.len() > 128 {
                return invalid("coordinator.environment", "must be 1 to 128 characters");
            }
        }
        if !self.scrape.is_empty() && self.role != Role::Host {
            return invalid("scrape", "only hosts scrape their services");
        }
        if self.scrape.len() > MAX_SCRAPES {
            return invalid("scrape", "at most 64 entries");
        }
        for (i, s) in self.scrape.iter().enumerate() {
            if fleetwave_chunker::manifest::validate_name(&s.service).is_err() {
                return invalid("scrape.service", "must be a service name");
            }
            if self.scrape[..i].iter().any(|o| o.service == s.service) {
                return invalid("scrape.service", &format!("{:?} is listed twice", s.service));
            }
            if !s.url.starts_with("http://") && !s.url.starts_with("https://") {
                return invalid("scrape.url", "must be an http:// URL");
            }
            if s.every < Duration::from_secs(1) {
                return invalid("scrape.every", "must be at least 1s");
            }
            let selectors = [Some(&s.requests), Some(&s.errors), s.latency.as_ref()];
            for sel in selectors.into_iter().flatten() {
                if let Err(e) = crate::scrape::Selector::parse(sel) {
                    return invalid("scrape", &e.to_string());
                }
            }
        }
        if self.swarm.origin_max_hosts == 0 {
            return invalid("swarm.origin_max_hosts", "must be positive");
        }
        if self.swarm.max_peers == 0 {
            return invalid("swarm.max_peers", "must be positive");
        }
        if self.swarm.max_in_flight_per_peer == 0
            || self.swarm.max_in_flight_back_to_source == 0
            || self.swarm.cache_pull_in_flight == 0
        {
            return invalid("swarm.max_in_flight_*", "must be positive");
        }
        if self.stage.keep_releases == 0 {
            return invalid("stage.keep_releases", "must be at least 1");
        }
        if self.stage.sync_every.is_zero() {
            return invalid("stage.sync_every", "must be positive");
        }
        for (field, addr) in
            [("listen.chunks", self.listen.chunks), ("listen.p2p", self.listen.p2p)]
        {
            if addr.ip().is_unspecified() && self.advertise.is_none() {
                return Err(ConfigError::Invalid {
                    field,
                    reason: format!(
                        "{addr} is unspecified: set `advertise` to this machine's address"
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_to_the_defaults() {
        let text = include_str!("../../fleetwave-node.example.toml");
        let parsed = Config::parse(text).expect("example parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(Config::parse("rolee = \"host\"").is_err());
        assert!(Config::parse("role = \"printer\"").is_err());
        assert!(Config::parse("[swarm]\ndiscover_every = \"soon\"").is_err());
    }

    #[test]
    fn roles_need_what_they_use() {
        let host = Config::default();
        assert!(matches!(host.validate(), Err(ConfigError::Invalid { field: "origin", .. })));
        let origin = Config {
            role: Role::Origin,
            advertise: Some([127, 0, 0, 1].into()),
            ..Config::default()
        };
        origin.validate().expect("an origin needs nothing else");
        let unspecified = Config { advertise: None, ..origin.clone() };
        assert!(matches!(
            unspecified.validate(),
            Err(ConfigError::Invalid { field: "listen.chunks", .. })
        ));
        let cache = Config { role: Role::Cache, ..origin };
        assert!(matches!(cache.validate(), Err(ConfigError::Invalid { field: "origin", .. })));
    }
}
