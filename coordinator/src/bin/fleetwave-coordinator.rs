//! `fleetwave-coordinator`: the Fleetwave coordinator daemon.
//!
//! Configuration comes from a TOML file (`--config`, see
//! `coordinator/fleetwave-coordinator.example.toml`), then `FLEETWAVE_COORDINATOR_*`
//! environment variables and flags on top. SIGTERM or SIGINT stops it gracefully. Logs go to
//! stderr, filtered by `FLEETWAVE_LOG` (default `info`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fleetwave_coordinator::auth::{Role, generate_token, hash_token};
use fleetwave_coordinator::daemon::{self, Config, TokenConfig};
use tokio_util::sync::CancellationToken;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Fleetwave coordinator: deployments, waves, gates and the hosts' desired state.
#[derive(Debug, Parser)]
#[command(name = "fleetwave-coordinator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Configuration file (TOML).
    #[arg(long, env = "FLEETWAVE_COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (the state store).
    #[arg(long, env = "FLEETWAVE_COORDINATOR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC address (nodes).
    #[arg(long, env = "FLEETWAVE_COORDINATOR_LISTEN_GRPC")]
    listen_grpc: Option<SocketAddr>,
    /// HTTP address (REST API, metrics).
    #[arg(long, env = "FLEETWAVE_COORDINATOR_LISTEN_API")]
    listen_api: Option<SocketAddr>,
    /// Trusted release public key file(s).
    #[arg(long, env = "FLEETWAVE_COORDINATOR_TRUST", value_delimiter = ',')]
    trust: Vec<PathBuf>,
    /// File holding a join token hosts enroll with (its hash is kept, not the token).
    #[arg(long, env = "FLEETWAVE_COORDINATOR_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// File holding an admin API token (for bootstrapping; its hash is kept).
    #[arg(long, env = "FLEETWAVE_COORDINATOR_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// How often hosts heartbeat (for example `5s`).
    #[arg(long, env = "FLEETWAVE_COORDINATOR_HEARTBEAT_INTERVAL", value_parser = humantime_serde::re::humantime::parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// A host silent this long is lost (for example `30s`).
    #[arg(long, env = "FLEETWAVE_COORDINATOR_LOST_AFTER", value_parser = humantime_serde::re::humantime::parse_duration)]
    lost_after: Option<Duration>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Generate a new token and print it with the config entry that grants it (the token is
    /// shown once; only its hash goes into the config).
    Token {
        /// The token's name (shown in the audit log).
        #[arg(long)]
        name: String,
        /// viewer, deployer, approver, admin or join.
        #[arg(long)]
        role: String,
        /// Services of a deployer (repeatable; `*` for all).
        #[arg(long = "service")]
        services: Vec<String>,
    },
}

fn read_token(path: &PathBuf) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    let token = text.trim().to_owned();
    anyhow::ensure!(
        token.len() >= 16,
        "token file {}: a token has at least 16 characters",
        path.display()
    );
    Ok(token)
}

fn config(cli: &Cli) -> Result<Config> {
    let mut config = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("config {}", path.display()))?
        }
        None => Config::default(),
    };
    if let Some(d) = &cli.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(a) = cli.listen_grpc {
        config.listen_grpc = a;
    }
    if let Some(a) = cli.listen_api {
        config.listen_api = a;
    }
    if !cli.trust.is_empty() {
        config.trust = cli.trust.clone();
    }
    if let Some(d) = cli.heartbeat_interval {
        config.heartbeat_interval = d;
    }
    if let Some(d) = cli.lost_after {
        config.lost_after = d;
    }
    if let Some(f) = &cli.join_token_file {
        config.join_token_sha256.push(hash_token(&read_token(f)?));
    }
    if let Some(f) = &cli.admin_token_file {
        config.tokens.push(TokenConfig {
            name: "admin".into(),
            sha256: hash_token(&read_token(f)?),
            role: Role::Admin,
        });
    }
    Ok(config)
}

#[allow(clippy::print_stdout, reason = "the token command prints its result")]
fn token(name: &str, role: &str, services: &[String]) -> Result<()> {
    let token = generate_token();
    let hash = hash_token(&token);
    println!("token: {token}");
    if role == "join" {
        println!("\n# fleetwave-coordinator.toml\njoin_token_sha256 = [\"{hash}\"]");
        return Ok(());
    }
    let role = match role {
        "viewer" => Role::Viewer,
        "approver" => Role::Approver,
        "admin" => Role::Admin,
        "deployer" => {
            anyhow::ensure!(!services.is_empty(), "a deployer needs --service (repeatable, or *)");
            Role::Deployer { services: services.to_vec() }
        }
        other => anyhow::bail!("unknown role {other:?}: viewer, deployer, approver, admin or join"),
    };
    let entry = TokenConfig { name: name.to_owned(), sha256: hash, role };
    #[derive(serde::Serialize)]
    struct Wrap {
        tokens: Vec<TokenConfig>,
    }
    println!("\n# fleetwave-coordinator.toml\n{}", toml::to_string(&Wrap { tokens: vec![entry] })?);
    Ok(())
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEETWAVE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Sub::Token { name, role, services }) => token(name, role, services),
        None => run(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetwave-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    let config = config(cli)?;
    config.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let stop = CancellationToken::new();
        let signals = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                tracing::info!("stopping");
                stop.cancel();
                Ok::<_, std::io::Error>(())
            })
        };
        let result = daemon::run(config, stop).await;
        signals.abort();
        result.map_err(anyhow::Error::from)
    })
}
