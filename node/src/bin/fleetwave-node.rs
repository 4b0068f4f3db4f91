//! `fleetwave-node`: the Fleetwave daemon, in the origin, cache or host role.
//!
//! Configuration comes from a TOML file (`--config`, see `node/fleetwave-node.example.toml`),
//! then `FLEETWAVE_*` environment variables and flags on top. SIGTERM or SIGINT stops it
//! gracefully. Logs go to stderr, filtered by `FLEETWAVE_LOG` (default `info`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use fleetwave_node::daemon::config::{Config, CoordinatorSection, Role, Upstream};
use fleetwave_node::daemon::{self, Faults};
use tokio_util::sync::CancellationToken;

/// The Fleetwave daemon: origin, regional cache or host.
#[derive(Debug, Parser)]
#[command(name = "fleetwave-node", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Print this daemon's PeerId (creating its identity key on first use) and exit.
    Id,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, env = "FLEETWAVE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Role: origin, cache or host.
    #[arg(long, env = "FLEETWAVE_ROLE")]
    role: Option<Role>,
    /// Data directory.
    #[arg(long, env = "FLEETWAVE_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Region name.
    #[arg(long, env = "FLEETWAVE_REGION")]
    region: Option<String>,
    /// Trusted release public key file(s).
    #[arg(long, env = "FLEETWAVE_TRUST", value_delimiter = ',')]
    trust: Vec<PathBuf>,
    /// HTTP API address.
    #[arg(long, env = "FLEETWAVE_LISTEN_API")]
    listen_api: Option<SocketAddr>,
    /// QUIC chunk endpoint address.
    #[arg(long, env = "FLEETWAVE_LISTEN_CHUNKS")]
    listen_chunks: Option<SocketAddr>,
    /// libp2p address (TCP).
    #[arg(long, env = "FLEETWAVE_LISTEN_P2P")]
    listen_p2p: Option<SocketAddr>,
    /// Address advertised for sockets bound to 0.0.0.0.
    #[arg(long, env = "FLEETWAVE_ADVERTISE")]
    advertise: Option<IpAddr>,
    /// The origin, as API_URL=PEER_ID.
    #[arg(long, env = "FLEETWAVE_ORIGIN_NODE")]
    origin: Option<String>,
    /// A cache of this region, as API_URL=PEER_ID (repeatable, or comma-separated).
    #[arg(long = "cache", env = "FLEETWAVE_CACHES", value_delimiter = ',')]
    caches: Vec<String>,
    /// File holding the bearer token uploads must present (origin).
    #[arg(long, env = "FLEETWAVE_UPLOAD_TOKEN_FILE")]
    upload_token_file: Option<PathBuf>,
    /// Host: secrets for activation hooks (KEY=VALUE file, mode 0600).
    #[arg(long, env = "FLEETWAVE_SECRETS_FILE")]
    secrets_file: Option<PathBuf>,
    /// Host: the coordinator's gRPC URL (with --join-token-file and --environment).
    #[arg(long, env = "FLEETWAVE_COORDINATOR")]
    coordinator: Option<String>,
    /// Host: file holding the coordinator's join token.
    #[arg(long, env = "FLEETWAVE_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// Host: the environment it belongs to (dev, staging, prod, ..).
    #[arg(long, env = "FLEETWAVE_ENVIRONMENT")]
    environment: Option<String>,
    /// Host: the name shown by the coordinator (default: the host name).
    #[arg(long, env = "FLEETWAVE_NAME")]
    name: Option<String>,
    /// Staged releases kept per service.
    #[arg(long, env = "FLEETWAVE_KEEP_RELEASES")]
    keep_releases: Option<usize>,
    /// Most chunk bytes received per second (0: no limit).
    #[arg(long, env = "FLEETWAVE_DOWNLOAD_LIMIT")]
    download_limit: Option<u64>,
    /// Origin: most hosts fetching from it at once.
    #[arg(long, env = "FLEETWAVE_ORIGIN_MAX_HOSTS")]
    origin_max_hosts: Option<usize>,
    /// Most region peers dialed per manifest.
    #[arg(long, env = "FLEETWAVE_MAX_PEERS")]
    max_peers: Option<usize>,
    /// Hosts: pass chunks on while they arrive (`[swarm] forward_arriving`).
    #[arg(long, env = "FLEETWAVE_FORWARD_ARRIVING")]
    forward_arriving: bool,
    /// Test fault: corrupt every chunk served (test builds only).
    #[cfg(feature = "test-utils")]
    #[arg(long, hide = true)]
    fault_corrupt_uploads: bool,
}

fn upstream(spec: &str) -> Result<Upstream> {
    let Some((api, peer_id)) = spec.rsplit_once('=') else {
        bail!("{spec:?} is not API_URL=PEER_ID");
    };
    Ok(Upstream { api: api.to_owned(), peer_id: peer_id.to_owned() })
}

impl RunArgs {
    fn config(&self) -> Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(role) = self.role {
            config.role = role;
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(region) = &self.region {
            config.region = region.clone();
        }
        if !self.trust.is_empty() {
            config.trust = self.trust.clone();
        }
        if let Some(addr) = self.listen_api {
            config.listen.api = addr;
        }
        if let Some(addr) = self.listen_chunks {
            config.listen.chunks = addr;
        }
        if let Some(addr) = self.listen_p2p {
            config.listen.p2p = addr;
        }
        if self.advertise.is_some() {
            config.advertise = self.advertise;
        }
        if let Some(spec) = &self.origin {
            config.origin = Some(upstream(spec).context("bad --origin")?);
        }
        if !self.caches.is_empty() {
            config.caches = self
                .caches
                .iter()
                .map(|s| upstream(s))
                .collect::<Result<_>>()
                .context("bad --cache")?;
        }
        if let Some(path) = &self.upload_token_file {
            config.upload_token_file = Some(path.clone());
        }
        if let Some(path) = &self.secrets_file {
            config.secrets_file = Some(path.clone());
        }
        if let Some(url) = &self.coordinator {
            let current = config.coordinator.take();
            config.coordinator = Some(CoordinatorSection {
                url: url.clone(),
                join_token_file: self
                    .join_token_file
                    .clone()
                    .or_else(|| current.as_ref().map(|c| c.join_token_file.clone()))
                    .context("--coordinator needs --join-token-file")?,
                environment: self
                    .environment
                    .clone()
                    .or_else(|| current.as_ref().map(|c| c.environment.clone()))
                    .context("--coordinator needs --environment")?,
                name: self.name.clone().or_else(|| current.and_then(|c| c.name)),
            });
        } else if let Some(c) = config.coordinator.as_mut() {
            if let Some(f) = &self.join_token_file {
                c.join_token_file = f.clone();
            }
            if let Some(e) = &self.environment {
                c.environment = e.clone();
            }
            if let Some(n) = &self.name {
                c.name = Some(n.clone());
            }
        }
        if let Some(n) = self.keep_releases {
            config.stage.keep_releases = n;
        }
        if let Some(n) = self.download_limit {
            config.swarm.download_limit = n;
        }
        if let Some(n) = self.origin_max_hosts {
            config.swarm.origin_max_hosts = n;
        }
        if let Some(n) = self.max_peers {
            config.swarm.max_peers = n;
        }
        if self.forward_arriving {
            config.swarm.forward_arriving = true;
        }
        Ok(config)
    }

    fn faults(&self) -> Faults {
        #[allow(unused_mut)]
        let mut faults = Faults::default();
        #[cfg(feature = "test-utils")]
        {
            faults.corrupt_uploads = self.fault_corrupt_uploads;
        }
        faults
    }
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEETWAVE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the chain of causes, each once.
            let mut line = err.to_string();
            for cause in err.chain().skip(1) {
                let cause = cause.to_string();
                if !line.contains(&cause) {
                    line.push_str(": ");
                    line.push_str(&cause);
                }
            }
            eprintln!("fleetwave-node: {line}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let config = cli.run.config()?;
    if let Some(Sub::Id) = cli.command {
        let key = daemon::identity::load_or_create(&config.data_dir)?;
        #[allow(clippy::print_stdout)]
        {
            println!("{}", key.public().to_peer_id());
        }
        return Ok(());
    }
    let faults = cli.run.faults();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fleetwave-node")
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) =
                (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
            else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            signals.cancel();
        });
        daemon::run(config, faults, shutdown).await
    })?;
    Ok(())
}
