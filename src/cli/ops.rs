//! Command-line definitions of the commands that talk to the coordinator.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

use crate::cmd::coordinator::DEFAULT_API;

/// The commands that operate deployments through the coordinator's REST API.
#[derive(Debug, Subcommand)]
pub(crate) enum OpsCommand {
    /// Deploy a registered version of a service to an environment, in gated waves; print the
    /// deployment's id (with --wait, follow it as `status --watch` does).
    Deploy(DeployArgs),
    /// Show the latest deployments, or one in detail; with --watch, follow it until it ends
    /// and exit non-zero unless it succeeded.
    Status(StatusArgs),
    /// Promote a version to an environment (SERVICE VERSION --to ENV), or pass the current
    /// wave of a deployment now (--deployment ID), as an approver does.
    Promote(PromoteArgs),
    /// Pause a deployment: no activation or wave starts until it is resumed.
    Pause(OperateArgs),
    /// Resume a paused deployment, or re-run the gate that holds it.
    Resume(OperateArgs),
    /// Roll a deployment back: every host it updated returns to its previous release.
    Rollback(OperateArgs),
    /// Abort a deployment: stop where it is, without rolling back.
    Abort(OperateArgs),
    /// List the enrolled hosts: region, environment, last heartbeat and what they run.
    Hosts(HostsArgs),
    /// Show the audit log: who did what to which service and deployment, when, and why.
    Audit(AuditArgs),
    /// List the registered versions of a service and the environments each is promoted to.
    Versions(VersionsArgs),
    /// List the services: versions registered, the newest, and what each environment runs.
    Services(ReadArgs),
}

/// Where the coordinator is and how to authenticate to it.
#[derive(Debug, Args)]
pub(crate) struct ApiArgs {
    /// The coordinator's REST API.
    #[arg(long, env = "FLEETWAVE_COORDINATOR_API", default_value = DEFAULT_API, value_name = "URL")]
    pub(crate) coordinator: String,
    /// File holding the API token, sent as a bearer token (default: the token in
    /// FLEETWAVE_TOKEN). The token is never printed.
    #[arg(long, env = "FLEETWAVE_TOKEN_FILE", value_name = "PATH")]
    pub(crate) token_file: Option<PathBuf>,
}

/// The common flags of commands that only read.
#[derive(Debug, Args)]
pub(crate) struct ReadArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    /// Print the coordinator's JSON answer instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// A deployment strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum StrategyArg {
    /// Batches within the disruption budget.
    Rolling,
    /// Steps of a growing share of each region, each judged against the rest.
    Canary,
    /// The new release started beside the old one, then a switch.
    #[value(alias = "blue_green")]
    BlueGreen,
}

/// `fleetwave deploy`.
#[derive(Debug, Args)]
pub(crate) struct DeployArgs {
    /// The service.
    pub(crate) service: String,
    /// The version: registered, and promoted to the environment.
    pub(crate) version: String,
    /// The environment.
    #[arg(long = "env", value_name = "ENV")]
    pub(crate) environment: String,
    /// The strategy [default: canary].
    #[arg(long, value_enum)]
    pub(crate) strategy: Option<StrategyArg>,
    /// Canary steps: cumulative percentages of each region, ending at 100 [default:
    /// 1,5,25,50,100].
    #[arg(long, value_delimiter = ',', value_name = "PERCENT,...")]
    pub(crate) steps: Vec<u32>,
    /// Regions in rollout order [default: every region of the environment, by name].
    #[arg(long, value_delimiter = ',', value_name = "REGION,...")]
    pub(crate) regions: Vec<String>,
    /// Most hosts of a region unavailable at once: a count or a percentage [default: 10%].
    #[arg(long, value_name = "N|N%")]
    pub(crate) max_unavailable: Option<String>,
    /// Most failed hosts of a region before everything rolls back: a count or a percentage
    /// [default: 0, the first failure rolls back].
    #[arg(long, value_name = "N|N%")]
    pub(crate) max_failed: Option<String>,
    /// How long every wave bakes outside the first region [default: 5m].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) bake: Option<Duration>,
    /// How long every wave bakes in the first region [default: --bake if given, else 10m].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) bake_first_region: Option<Duration>,
    /// More bakes the canary judge may take when a wave's traffic cannot yet decide its gate,
    /// before the deployment is held for a human [default: 2].
    #[arg(long, value_name = "N")]
    pub(crate) bake_extensions: Option<u16>,
    /// Do not judge waves against the baseline (canary analysis is on by default for canary).
    #[arg(long)]
    pub(crate) no_analysis: bool,
    /// Wait for an approver's `fleetwave promote --deployment ID` after every wave.
    #[arg(long)]
    pub(crate) approval: bool,
    /// A host must activate (and be healthy) within this [default: 2m].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) activation_timeout: Option<Duration>,
    /// A host must stage the release within this of joining its wave [default: 10m].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) stage_timeout: Option<Duration>,
    /// A hotfix: queued ahead of other deployments waiting for the service and environment.
    #[arg(long)]
    pub(crate) hotfix: bool,
    /// Refuse instead of queueing when a deployment of the service to the environment is in
    /// progress.
    #[arg(long)]
    pub(crate) refuse_if_busy: bool,
    /// Why (recorded in the audit log).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub(crate) comment: String,
    /// Follow the deployment until it ends, as `status --watch`; exit non-zero unless it
    /// succeeded.
    #[arg(long, short)]
    pub(crate) wait: bool,
    #[command(flatten)]
    pub(crate) watch: WatchArgs,
    #[command(flatten)]
    pub(crate) read: ReadArgs,
}

/// How a deployment is followed.
#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// How often to ask the coordinator while following a deployment.
    #[arg(long, value_parser = parse_interval, default_value = "1s", value_name = "DURATION")]
    pub(crate) interval: Duration,
}

/// `fleetwave status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The deployment to show; without it, the latest deployments.
    pub(crate) id: Option<u64>,
    /// Only deployments of this service (without ID).
    #[arg(long, conflicts_with = "id")]
    pub(crate) service: Option<String>,
    /// How many deployments to list (without ID), newest first.
    #[arg(long, default_value_t = 20, conflicts_with = "id")]
    pub(crate) limit: usize,
    /// Follow the deployment, redrawing its waves, until it ends; exit non-zero unless it
    /// succeeded.
    #[arg(long, short, requires = "id")]
    pub(crate) watch: bool,
    #[command(flatten)]
    pub(crate) follow: WatchArgs,
    #[command(flatten)]
    pub(crate) read: ReadArgs,
}

/// `fleetwave promote`.
#[derive(Debug, Args)]
pub(crate) struct PromoteArgs {
    /// The service (with VERSION and --to).
    #[arg(required_unless_present = "deployment", requires_all = ["version", "to"])]
    pub(crate) service: Option<String>,
    /// The version.
    pub(crate) version: Option<String>,
    /// The environment to promote the version to.
    #[arg(long, value_name = "ENV")]
    pub(crate) to: Option<String>,
    /// Pass the current wave of this deployment now instead (skipping what is left of its
    /// bake and gate).
    #[arg(long, value_name = "ID", conflicts_with_all = ["service", "version", "to"])]
    pub(crate) deployment: Option<u64>,
    /// With --deployment: refuse unless the current wave is this one (as `status` shows it),
    /// so that a wave that started meanwhile is not passed unseen.
    #[arg(long, requires = "deployment", conflicts_with_all = ["service", "version", "to"])]
    pub(crate) wave: Option<u16>,
    /// Why (recorded in the audit log).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub(crate) comment: String,
    #[command(flatten)]
    pub(crate) read: ReadArgs,
}

/// `fleetwave pause|resume|rollback|abort`.
#[derive(Debug, Args)]
pub(crate) struct OperateArgs {
    /// The deployment.
    pub(crate) id: u64,
    /// Why (recorded in the audit log).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub(crate) comment: String,
    #[command(flatten)]
    pub(crate) read: ReadArgs,
}

/// `fleetwave hosts`.
#[derive(Debug, Args)]
pub(crate) struct HostsArgs {
    /// Only hosts of this environment.
    #[arg(long = "env", value_name = "ENV")]
    pub(crate) environment: Option<String>,
    #[command(flatten)]
    pub(crate) read: ReadArgs,
}

/// `fleetwave audit`.
#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    /// Only records about this service.
    #[arg(long)]
    pub(crate) service: Option<String>,
    /// Only records since this long ago (`1h`, `30m`), or since this time (RFC 3339, UTC).
    #[arg(long, value_parser = parse_since, value_name = "DURATION|TIME")]
    pub(crate) since: Option<Since>,
    /// At most this many records, the oldest first from --since (the coordinator caps it at
    /// 10000).
    #[arg(long, default_value_t = 100)]
    pub(crate) limit: usize,
    #[command(flatten)]
    pub(crate) read: ReadArgs,
}

/// `fleetwave versions`.
#[derive(Debug, Args)]
pub(crate) struct VersionsArgs {
    /// The service.
    pub(crate) service: String,
    #[command(flatten)]
    pub(crate) read: ReadArgs,
}

/// The start of an audit range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Since {
    /// This long before now.
    Ago(Duration),
    /// This time, ms since the Unix epoch.
    At(u64),
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 30s, 5m or 1h ({e})"))
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(100) {
        return Err(format!("{s:?} is shorter than 100ms"));
    }
    Ok(d)
}

fn parse_since(s: &str) -> Result<Since, String> {
    use humantime_serde::re::humantime;
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(Since::Ago(d));
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
        format!("{s:?} is neither a duration (1h) nor a time (2026-12-01T10:00:00Z)")
    })?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{s:?} is before 1970"))?
        .as_millis();
    Ok(Since::At(u64::try_from(ms).unwrap_or(u64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_a_duration_or_a_time() {
        assert_eq!(parse_since("1h"), Ok(Since::Ago(Duration::from_secs(3600))));
        assert_eq!(parse_since("1970-01-01T00:00:01Z"), Ok(Since::At(1000)));
        assert!(parse_since("yesterday").is_err());
        assert!(parse_interval("10ms").is_err());
        assert_eq!(parse_interval("2s"), Ok(Duration::from_secs(2)));
    }
}
