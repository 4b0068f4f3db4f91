//! Command-line definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

mod ops;

pub(crate) use ops::{
    ApiArgs, AuditArgs, DeployArgs, OpsCommand, PromoteArgs, ReadArgs, Since, StrategyArg,
};

/// Ship build artifacts to fleets of hosts and roll them out safely.
#[derive(Debug, Parser)]
#[command(name = "fleetwave", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create an ed25519 signing key: the secret key in FILE (mode 0600), the public key in
    /// FILE.pub.
    Keygen {
        /// Where to write the secret key.
        #[arg(long, env = "FLEETWAVE_KEY_OUT")]
        out: PathBuf,
    },
    /// Pack, chunk, hash and sign an artifact, and upload the chunks the origin lacks.
    Publish(PublishArgs),
    /// Re-hash every chunk and the whole artifact of a stored manifest, and check its signature.
    Verify {
        /// Manifest id (or a unique prefix of at least 8 hex digits), or SERVICE@VERSION.
        manifest: String,
        #[command(flatten)]
        origin: OriginArg,
        /// Public key file(s) to trust; the manifest must be signed by one of them.
        #[arg(long = "trust", env = "FLEETWAVE_TRUST", value_delimiter = ',')]
        trust: Vec<PathBuf>,
    },
    /// Show a stored manifest: sizes, hashes, chunk-size distribution, build metadata, and what
    /// it shares with another manifest.
    Inspect {
        /// Manifest id (or a unique prefix), or SERVICE@VERSION.
        manifest: String,
        #[command(flatten)]
        origin: OriginArg,
        /// Another manifest to compare with: shared chunks and bytes.
        #[arg(long)]
        against: Option<String>,
    },
    #[command(flatten)]
    Ops(OpsCommand),
    /// Show what Fleetwave does, on this machine, with no configuration: publish two versions of
    /// a sample artifact to a temporary origin, show what the second reused, verify both.
    Demo {
        /// Keep the temporary directory instead of deleting it.
        #[arg(long)]
        keep: bool,
    },
    /// Run a daemon from a TOML config (what `fleetwave-node` and `fleetwave-coordinator`
    /// run; the demo and the end-to-end tests start them through this).
    #[command(hide = true)]
    Daemon {
        #[command(subcommand)]
        which: DaemonKind,
    },
    /// Talk to a running `fleetwave-node` daemon: stage a manifest on a host, show status.
    Node {
        /// The daemon's API.
        #[arg(
            long,
            env = "FLEETWAVE_NODE_API",
            default_value = "http://127.0.0.1:7400",
            global = true
        )]
        api: String,
        #[command(subcommand)]
        command: NodeCommand,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DaemonKind {
    /// A node (origin, cache or host).
    Node {
        /// Its config (TOML, as `fleetwave-node --config`).
        #[arg(long)]
        config: PathBuf,
    },
    /// The coordinator.
    Coordinator {
        /// Its config (TOML, as `fleetwave-coordinator --config`).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum NodeCommand {
    /// Stage a manifest on this host: fetch, verify and unpack it, ready to activate.
    Stage {
        /// The manifest id (64 hex digits).
        manifest: String,
        /// Wait until it is staged, showing progress; fail if staging fails.
        #[arg(long)]
        wait: bool,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Make a staged manifest the service's active release: switch `current/SERVICE`, run its
    /// hooks and health check; switch back if they fail (non-zero exit then).
    Activate {
        /// The manifest id (64 hex digits).
        manifest: String,
        /// The service.
        #[arg(long)]
        service: String,
    },
    /// Switch a service back to its previous release.
    Rollback {
        /// The service.
        service: String,
    },
    /// What the daemon stages or serves, where the bytes came from, and its counters.
    Status,
}

#[derive(Debug, Args)]
pub(crate) struct OriginArg {
    /// The origin's store directory.
    #[arg(long, env = "FLEETWAVE_ORIGIN")]
    pub(crate) origin: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct PublishOriginArg {
    /// The origin: its store directory, or the URL of a running origin daemon's store API
    /// (http://HOST:PORT), to which only the chunks it lacks are uploaded.
    #[arg(long, env = "FLEETWAVE_ORIGIN", value_name = "DIR|URL")]
    pub(crate) origin: PathBuf,
    /// File holding the origin's upload token, sent as a bearer token to an origin URL (not
    /// used with a directory). The token is never printed.
    #[arg(long, env = "FLEETWAVE_UPLOAD_TOKEN_FILE", value_name = "PATH")]
    pub(crate) upload_token_file: Option<PathBuf>,
}

/// Where `fleetwave publish` registers what it published.
#[derive(Debug, Args)]
pub(crate) struct RegisterArg {
    /// After publishing, register the version with the coordinator at this REST API (it is
    /// then in `dev`, ready to promote and deploy).
    #[arg(long, env = "FLEETWAVE_COORDINATOR_API", value_name = "URL")]
    pub(crate) coordinator: Option<String>,
    /// File holding the coordinator API token (default: the token in FLEETWAVE_TOKEN). The
    /// token is never printed.
    #[arg(long, env = "FLEETWAVE_TOKEN_FILE", value_name = "PATH")]
    pub(crate) token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// The artifact: a directory (packed deterministically) or a single file.
    pub(crate) path: PathBuf,
    /// Service name.
    #[arg(long, env = "FLEETWAVE_SERVICE")]
    pub(crate) service: String,
    /// Version name; a published version is immutable.
    #[arg(long, env = "FLEETWAVE_VERSION")]
    pub(crate) version: String,
    /// Secret signing key file (from `fleetwave keygen`).
    #[arg(long, env = "FLEETWAVE_KEY")]
    pub(crate) key: PathBuf,
    #[command(flatten)]
    pub(crate) origin: PublishOriginArg,
    #[command(flatten)]
    pub(crate) register: RegisterArg,
    /// Average chunk size in bytes, a power of two (min = avg/4, max = avg*4). The default was chosen by
    /// measurement; see docs/BENCHMARKS.md.
    #[arg(long, env = "FLEETWAVE_CHUNK_AVG", default_value_t = 64 * 1024)]
    pub(crate) chunk_avg: u32,
    /// Source revision recorded in the manifest.
    #[arg(long, env = "FLEETWAVE_COMMIT", default_value = "")]
    pub(crate) commit: String,
    /// Builder recorded in the manifest (default: USER@HOSTNAME).
    #[arg(long, env = "FLEETWAVE_BUILDER")]
    pub(crate) builder: Option<String>,
    /// Build time recorded in the manifest, seconds since the Unix epoch (default:
    /// SOURCE_DATE_EPOCH if set, else now).
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    pub(crate) built_at: Option<i64>,
    /// Free-form label KEY=VALUE recorded in the manifest; repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,
    /// Don't show a progress bar.
    #[arg(long, short)]
    pub(crate) quiet: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("label {s:?} is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn labels_parse() {
        assert_eq!(parse_label("team=edge"), Ok(("team".into(), "edge".into())));
        assert!(parse_label("=x").is_err());
        assert!(parse_label("novalue").is_err());
    }
}
