//! The commands that operate deployments through the coordinator: deploy, status (and follow
//! a deployment to its end), promote, pause, resume, rollback, abort, and the read-only hosts,
//! audit, versions and services.
//!
//! What they decide is pure and tested here: flags to a [`DeploymentSpec`], views to tables,
//! a finished deployment to an exit status. Only [`run`] and the follow loop talk to the
//! coordinator and read the clock.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use humantime_serde::re::humantime;
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

use fleetwave_coordinator::deploy::{DeploymentSpec, OnConflict, SpecError, StrategyKind};
use fleetwave_coordinator::view::{
    AuditView, CountsView, DeploymentView, GateView, HostView, PromoteRequest, ServiceView,
    VersionView,
};

use super::coordinator::{AuditQuery, Client, Operate, Reply, TOKEN_ENV, resolve_token};
use crate::cli::{
    ApiArgs, AuditArgs, DeployArgs, OpsCommand, PromoteArgs, ReadArgs, Since, StrategyArg,
};

/// How long `status --watch` keeps retrying a coordinator it cannot reach (a restart, say)
/// before it gives up.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(60);

/// Hex digits of a manifest id shown in tables.
const SHORT_ID: usize = 16;

/// Deploy flags that do not make a valid request.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DeployArgsError {
    /// A flag's value is invalid.
    #[error("{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
}

/// A followed deployment that ended other than `succeeded`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("deployment {id} of {what} {state}: {outcome}")]
pub(crate) struct NotSucceeded {
    pub(crate) id: u64,
    /// `SERVICE VERSION to ENV`.
    pub(crate) what: String,
    pub(crate) state: String,
    pub(crate) outcome: String,
}

/// Runs one of the commands.
pub(crate) fn run(command: OpsCommand) -> Result<()> {
    match command {
        OpsCommand::Deploy(args) => deploy(&args),
        OpsCommand::Status(args) => {
            let client = connect(&args.read.api)?;
            match args.id {
                Some(id) if args.watch => follow(&client, id, args.follow.interval, args.read.json),
                Some(id) => {
                    let reply = client.deployment(id)?;
                    print_reply(&reply, args.read.json, render_deployment)
                }
                None => {
                    let mut reply = client.deployments(args.service.as_deref())?;
                    reply.value.truncate(args.limit);
                    let now = now_ms();
                    print_reply(&reply, args.read.json, |list| render_deployments(list, now))
                }
            }
        }
        OpsCommand::Promote(args) => promote(&args),
        OpsCommand::Pause(args) => operate(Operate::Pause, args.id, &args.comment, &args.read),
        OpsCommand::Resume(args) => operate(Operate::Resume, args.id, &args.comment, &args.read),
        OpsCommand::Rollback(args) => {
            operate(Operate::Rollback, args.id, &args.comment, &args.read)
        }
        OpsCommand::Abort(args) => operate(Operate::Abort, args.id, &args.comment, &args.read),
        OpsCommand::Hosts(args) => {
            let mut reply = connect(&args.read.api)?.hosts()?;
            if let Some(env) = &args.environment {
                reply.value.retain(|h| &h.environment == env);
            }
            let now = now_ms();
            print_reply(&reply, args.read.json, |hosts| render_hosts(hosts, now))
        }
        OpsCommand::Audit(args) => audit(&args),
        OpsCommand::Versions(args) => {
            let reply = connect(&args.read.api)?.versions(&args.service)?;
            print_reply(&reply, args.read.json, |v| render_versions(v))
        }
        OpsCommand::Services(args) => {
            let reply = connect(&args.api)?.services()?;
            print_reply(&reply, args.json, |s| render_services(s))
        }
    }
}

/// A client of the coordinator `api` names, with its token.
fn connect(api: &ApiArgs) -> Result<Client> {
    let token = resolve_token(api.token_file.as_deref(), std::env::var(TOKEN_ENV).ok())?;
    Ok(Client::new(&api.coordinator, token)?)
}

/// The client `fleetwave publish --coordinator URL` registers with, set up (and its token read)
/// before the publish starts.
pub(crate) fn registrar(coordinator: &str, token_file: Option<&std::path::Path>) -> Result<Client> {
    let token = resolve_token(token_file, std::env::var(TOKEN_ENV).ok())?;
    Ok(Client::new(coordinator, token)?)
}

/// Registers a just-published version with the coordinator (in `dev`).
pub(crate) fn register(
    client: &Client,
    service: &str,
    version: &str,
    envelope: &[u8],
) -> Result<()> {
    let reply = client.register(service, version, envelope)?;
    let envs: Vec<&str> = reply.value.environments.iter().map(|p| p.environment.as_str()).collect();
    println!("registered in {}", if envs.is_empty() { "dev".into() } else { envs.join(", ") });
    Ok(())
}

fn print_reply<T>(reply: &Reply<T>, json: bool, render: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        println!("{}", reply.json());
    } else {
        print!("{}", render(&reply.value));
    }
    Ok(())
}

fn deploy(args: &DeployArgs) -> Result<()> {
    let spec = deployment_spec(args)?;
    let client = connect(&args.read.api)?;
    let reply = client.deploy(&spec)?;
    let id = reply.value.id;
    if args.read.json {
        println!("{}", reply.json());
    } else {
        println!("{id}");
    }
    if args.wait {
        return follow(&client, id, args.watch.interval, args.read.json);
    }
    Ok(())
}

/// The request `fleetwave deploy` sends, checked as the coordinator will check it.
pub(crate) fn deployment_spec(args: &DeployArgs) -> Result<DeploymentSpec, DeployArgsError> {
    let spec = DeploymentSpec {
        service: args.service.clone(),
        version: args.version.clone(),
        environment: args.environment.clone(),
        strategy: match args.strategy {
            None => StrategyKind::default(),
            Some(StrategyArg::Rolling) => StrategyKind::Rolling,
            Some(StrategyArg::Canary) => StrategyKind::Canary,
            Some(StrategyArg::BlueGreen) => StrategyKind::BlueGreen,
        },
        canary_steps: args.steps.clone(),
        regions: args.regions.clone(),
        max_unavailable: args.max_unavailable.clone(),
        max_failed: args.max_failed.clone(),
        bake_first_region: args.bake_first_region,
        bake: args.bake,
        bake_extensions: args.bake_extensions,
        analysis: if args.no_analysis { Some(false) } else { None },
        approval: args.approval,
        activation_timeout: args.activation_timeout,
        stage_timeout: args.stage_timeout,
        hotfix: args.hotfix,
        on_conflict: if args.refuse_if_busy { OnConflict::Refuse } else { OnConflict::Queue },
        comment: args.comment.clone(),
    };
    if args.regions.iter().any(|r| r.trim().is_empty()) {
        return Err(DeployArgsError::Invalid { flag: "--regions", reason: "an empty name".into() });
    }
    match spec.validate() {
        Ok(()) => Ok(spec),
        Err(SpecError::Invalid { field, reason }) => {
            Err(DeployArgsError::Invalid { flag: flag_of(field), reason })
        }
        Err(other) => Err(DeployArgsError::Invalid { flag: "deploy", reason: other.to_string() }),
    }
}

/// The flag that sets a [`DeploymentSpec`] field.
fn flag_of(field: &'static str) -> &'static str {
    match field {
        "service" => "SERVICE",
        "version" => "VERSION",
        "environment" => "--env",
        "canary_steps" => "--steps",
        "regions" => "--regions",
        "max_unavailable" => "--max-unavailable",
        "max_failed" => "--max-failed",
        "activation_timeout" => "--activation-timeout",
        "stage_timeout" => "--stage-timeout",
        "comment" => "--comment",
        other => other,
    }
}

fn promote(args: &PromoteArgs) -> Result<()> {
    let client = connect(&args.read.api)?;
    if let Some(id) = args.deployment {
        let before = client.deployment(id)?.value;
        if let Some(expected) = args.wave {
            if before.wave != expected {
                bail!(
                    "promote deployment {id} refused: its current wave is {} in {}, not {expected}",
                    before.wave,
                    before.region.as_deref().unwrap_or("no region")
                );
            }
        }
        let reply = client.operate(id, Operate::Promote, &args.comment)?;
        if args.read.json {
            println!("{}", reply.json());
            return Ok(());
        }
        println!(
            "deployment {id}: passed wave {} in {}; {}",
            before.wave,
            before.region.as_deref().unwrap_or("-"),
            where_it_is(&reply.value)
        );
        return Ok(());
    }
    // clap requires SERVICE, VERSION and --to without --deployment.
    let (Some(service), Some(version), Some(to)) = (&args.service, &args.version, &args.to) else {
        bail!("promote needs SERVICE VERSION --to ENV, or --deployment ID");
    };
    let request = PromoteRequest { environment: to.clone(), comment: args.comment.clone() };
    let reply = client.promote_version(service, version, &request)?;
    if args.read.json {
        println!("{}", reply.json());
        return Ok(());
    }
    println!("promoted {service} {version} to {to} (now in: {})", environments(&reply.value));
    Ok(())
}

fn operate(command: Operate, id: u64, comment: &str, read: &ReadArgs) -> Result<()> {
    let reply = connect(&read.api)?.operate(id, command, comment)?;
    if read.json {
        println!("{}", reply.json());
        return Ok(());
    }
    let done = match command {
        Operate::Pause => "paused",
        Operate::Resume => "resumed",
        Operate::Promote => "promoted",
        Operate::Rollback => "rolling back",
        Operate::Abort => "aborted",
    };
    println!("deployment {id} {done}; {}", where_it_is(&reply.value));
    Ok(())
}

fn audit(args: &AuditArgs) -> Result<()> {
    let now = now_ms();
    let since_ms = args.since.map(|since| match since {
        Since::Ago(d) => now.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        Since::At(ms) => ms,
    });
    let query = AuditQuery { service: args.service.clone(), since_ms, limit: Some(args.limit) };
    let reply = connect(&args.read.api)?.audit(&query)?;
    print_reply(&reply, args.read.json, |records| render_audit(records))
}

/// Follows deployment `id` until it is final: a live table on a terminal, else the table (or
/// a line of JSON) again each time something but the countdown changed. Fails unless the
/// deployment succeeded.
fn follow(client: &Client, id: u64, interval: Duration, json: bool) -> Result<()> {
    let live = !json && std::io::stdout().is_terminal();
    let bar = if live {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
        bar.set_style(
            ProgressStyle::with_template("{msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let max_failures = (UNREACHABLE_GRACE.as_millis() / interval.as_millis().max(1)).max(3);
    let (mut failures, mut shown, mut last) = (0u128, None::<DeploymentView>, String::new());
    loop {
        match client.deployment(id) {
            Ok(reply) => {
                failures = 0;
                let view = &reply.value;
                last = render_deployment(view);
                if live {
                    bar.set_message(last.trim_end().to_owned());
                } else {
                    let key = without_countdown(view);
                    if shown.as_ref() != Some(&key) {
                        if json {
                            println!("{}", reply.body_line());
                        } else {
                            println!("{last}");
                        }
                        shown = Some(key);
                    }
                }
                if view.is_final() {
                    if live {
                        bar.finish_and_clear();
                        print!("{last}");
                    }
                    return Ok(outcome(view)?);
                }
            }
            Err(err) if err.is_unreachable() && failures < max_failures => {
                failures += 1;
                if live {
                    bar.set_message(format!(
                        "{}\n(coordinator unreachable; retrying)",
                        last.trim_end()
                    ));
                }
                tracing::warn!(error = %err, "coordinator unreachable; retrying");
            }
            Err(err) => {
                bar.finish_and_clear();
                return Err(err).context(format!("cannot follow deployment {id}"));
            }
        }
        std::thread::sleep(interval);
    }
}

/// What a followed deployment's end means for the command: success only if it succeeded.
pub(crate) fn outcome(view: &DeploymentView) -> Result<(), NotSucceeded> {
    if view.state == "succeeded" {
        return Ok(());
    }
    Err(NotSucceeded {
        id: view.id,
        what: format!("{} {} to {}", view.service, view.version, view.environment),
        state: view.state.replace('_', " "),
        outcome: reason(view).unwrap_or("no outcome recorded").to_owned(),
    })
}

/// Why a deployment ended, without the state its outcome may start with (`rolled back: ...`).
fn reason(view: &DeploymentView) -> Option<&str> {
    let outcome = view.outcome.as_deref()?;
    let state = view.state.replace('_', " ");
    Some(outcome.strip_prefix(state.as_str()).and_then(|r| r.strip_prefix(": ")).unwrap_or(outcome))
}

/// The view as far as a redraw is concerned: the countdown alone changes every poll.
fn without_countdown(view: &DeploymentView) -> DeploymentView {
    DeploymentView { remaining_s: None, ..view.clone() }
}

/// One line: where a deployment is now.
fn where_it_is(v: &DeploymentView) -> String {
    if v.is_final() {
        return match reason(v) {
            Some(o) => format!("{}: {o}", v.state.replace('_', " ")),
            None => v.state.replace('_', " "),
        };
    }
    let mut line = v.state.clone();
    if v.paused {
        line.push_str(", paused");
    }
    if let Some(region) = &v.region {
        let _ = write!(line, ", region {region} wave {}", v.wave);
    }
    if let Some(stage) = &v.stage {
        let _ = write!(line, ", {}", stage.replace('_', " "));
    }
    line
}

/// A deployment in detail: what it is, where it is, per-region counts, gates, outcome.
pub(crate) fn render_deployment(v: &DeploymentView) -> String {
    let mut out = String::new();
    let hotfix = if v.hotfix { ", hotfix" } else { "" };
    let _ = writeln!(
        out,
        "deployment {}: {} {} to {}, {}{hotfix}",
        v.id,
        v.service,
        v.version,
        v.environment,
        v.strategy.replace('_', "-")
    );
    let mut state = v.state.replace('_', " ");
    if let Some(phase) = &v.phase {
        if phase.replace('_', " ") != state {
            let _ = write!(state, " (phase {})", phase.replace('_', " "));
        }
    }
    if v.paused {
        state.push_str(", paused");
    }
    let _ = writeln!(out, "state:     {state}");
    if !v.is_final() && v.phase.is_some() {
        let mut now = String::new();
        if let Some(region) = &v.region {
            let _ = write!(now, "region {region}, ");
        }
        let _ = write!(now, "wave {}", v.wave);
        if let Some(p) = v.step_percent {
            let _ = write!(now, " (step {p}%)");
        }
        match (&v.held, &v.stage) {
            (Some(held), _) => {
                let _ = write!(now, ", held: {held}");
            }
            (None, Some(stage)) => {
                let _ = write!(now, ", {}", stage.replace('_', " "));
            }
            (None, None) => {}
        }
        if let Some(s) = v.remaining_s {
            let _ = write!(now, ", {} left", humantime::format_duration(Duration::from_secs(s)));
        }
        let _ = writeln!(out, "now:       {now}");
    }
    let mut when = format!("created {} by {}", time(v.created_ms), v.created_by);
    if let Some(ms) = v.started_ms {
        let _ = write!(when, ", started {}", time(ms));
    }
    if let Some(ms) = v.finished_ms {
        let _ = write!(when, ", finished {}", time(ms));
    }
    let _ = writeln!(out, "time:      {when}");
    let _ = writeln!(out, "manifest:  {}", v.manifest);
    if !v.regions.is_empty() {
        out.push('\n');
        let mut table = Table::new(&[
            "REGION",
            "HOSTS",
            "STAGED",
            "ASSIGNED",
            "UPDATED",
            "FAILED",
            "UNAVAILABLE",
            "LOST",
        ]);
        table.right_align(1..8);
        let current = v.region.as_deref().filter(|_| !v.is_final());
        for r in &v.regions {
            let mark = if Some(r.name.as_str()) == current { " *" } else { "" };
            table.row(counts_row(format!("{}{mark}", r.name), &r.counts));
        }
        if v.regions.len() > 1 {
            table.row(counts_row("total".into(), &v.totals));
        }
        out.push_str(&table.render());
    }
    if !v.gates.is_empty() {
        out.push('\n');
        let mut table =
            Table::new(&["GATE", "REGION", "WAVE", "CANARY ERRORS", "BASELINE ERRORS", "VERDICT"]);
        table.right_align(0..1);
        table.right_align(2..3);
        for g in &v.gates {
            table.row(gate_row(g));
        }
        out.push_str(&table.render());
    }
    if let Some(outcome) = &v.outcome {
        let _ = writeln!(out, "\noutcome:   {outcome}");
    }
    out
}

fn counts_row(name: String, c: &CountsView) -> Vec<String> {
    let n = [c.hosts, c.staged, c.assigned, c.updated, c.failed, c.unavailable, c.lost];
    std::iter::once(name).chain(n.iter().map(u32::to_string)).collect()
}

fn gate_row(g: &GateView) -> Vec<String> {
    vec![
        g.gate.to_string(),
        g.region.clone(),
        g.wave.to_string(),
        error_rate(g.canary_errors, g.canary_requests, g.canary_hosts),
        error_rate(g.baseline_errors, g.baseline_requests, g.baseline_hosts),
        g.verdict.clone(),
    ]
}

/// `0.20% (2/1000, 1 host)`.
fn error_rate(errors: u64, requests: u64, hosts: u32) -> String {
    let hosts = if hosts == 1 { "1 host".to_owned() } else { format!("{hosts} hosts") };
    if requests == 0 {
        return format!("- (0 requests, {hosts})");
    }
    let rate = errors as f64 * 100.0 / requests as f64;
    format!("{rate:.2}% ({errors}/{requests}, {hosts})")
}

/// The latest deployments, newest first.
pub(crate) fn render_deployments(list: &[DeploymentView], now_ms: u64) -> String {
    if list.is_empty() {
        return "no deployments\n".into();
    }
    let mut table = Table::new(&[
        "ID", "SERVICE", "VERSION", "ENV", "STRATEGY", "STATE", "UPDATED", "WHERE", "CREATED", "BY",
    ]);
    table.right_align(0..1);
    for v in list {
        let place = match (&v.region, v.is_final()) {
            (Some(region), false) => format!("{region} wave {}", v.wave),
            _ => "-".into(),
        };
        let mut state = v.state.replace('_', " ");
        if v.paused {
            state.push_str(" (paused)");
        }
        table.row(vec![
            v.id.to_string(),
            v.service.clone(),
            v.version.clone(),
            v.environment.clone(),
            v.strategy.replace('_', "-"),
            state,
            format!("{}/{}", v.totals.updated, v.totals.hosts),
            place,
            ago(now_ms, v.created_ms),
            v.created_by.clone(),
        ]);
    }
    table.render()
}

/// The enrolled hosts, by environment, region and name.
pub(crate) fn render_hosts(hosts: &[HostView], now_ms: u64) -> String {
    if hosts.is_empty() {
        return "no hosts\n".into();
    }
    let mut sorted: Vec<&HostView> = hosts.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.environment, &a.region, &a.name).cmp(&(&b.environment, &b.region, &b.name))
    });
    let mut table =
        Table::new(&["NAME", "ENV", "REGION", "STATUS", "SEEN", "SERVICES", "STAGED", "AGENT"]);
    table.right_align(6..7);
    for h in sorted {
        let services: Vec<String> = h
            .services
            .iter()
            .map(|s| {
                let mut text = format!("{} {}", s.service, s.active.as_deref().map_or("-", short));
                if s.healthy == Some(false) {
                    text.push_str(" (unhealthy)");
                }
                text
            })
            .collect();
        table.row(vec![
            h.name.clone(),
            h.environment.clone(),
            h.region.clone(),
            if h.lost { "lost".into() } else { "up".into() },
            ago(now_ms, h.seen_ms),
            if services.is_empty() { "-".into() } else { services.join(", ") },
            h.staged.len().to_string(),
            h.agent_version.clone(),
        ]);
    }
    table.render()
}

/// The versions of a service, oldest first, as the coordinator lists them.
pub(crate) fn render_versions(versions: &[VersionView]) -> String {
    if versions.is_empty() {
        return "no versions registered\n".into();
    }
    let mut table =
        Table::new(&["VERSION", "MANIFEST", "SIZE", "REGISTERED", "BY", "ENVIRONMENTS"]);
    table.right_align(2..3);
    for v in versions {
        table.row(vec![
            v.version.clone(),
            short(&v.manifest).to_owned(),
            HumanBytes(v.size).to_string(),
            time(v.registered_ms),
            v.registered_by.clone(),
            environments(v),
        ]);
    }
    table.render()
}

/// The services and what each environment runs.
pub(crate) fn render_services(services: &[ServiceView]) -> String {
    if services.is_empty() {
        return "no services registered\n".into();
    }
    let mut table = Table::new(&["SERVICE", "VERSIONS", "LATEST", "DEPLOYED"]);
    table.right_align(1..2);
    for s in services {
        let deployed: Vec<String> =
            s.deployed.iter().map(|(env, v)| format!("{env}={v}")).collect();
        table.row(vec![
            s.service.clone(),
            s.versions.to_string(),
            s.latest.clone().unwrap_or_else(|| "-".into()),
            if deployed.is_empty() { "-".into() } else { deployed.join(" ") },
        ]);
    }
    table.render()
}

/// Audit records, as the coordinator orders them.
pub(crate) fn render_audit(records: &[AuditView]) -> String {
    if records.is_empty() {
        return "no audit records\n".into();
    }
    let mut table = Table::new(&["TIME", "ACTOR", "ACTION", "SERVICE", "DEPLOYMENT", "DETAIL"]);
    table.right_align(4..5);
    for r in records {
        table.row(vec![
            time(r.at_ms),
            r.actor.clone(),
            r.action.clone(),
            r.service.clone().unwrap_or_else(|| "-".into()),
            r.deployment.map_or("-".into(), |d| d.to_string()),
            one_line(&r.detail),
        ]);
    }
    table.render()
}

fn environments(v: &VersionView) -> String {
    if v.environments.is_empty() {
        return "-".into();
    }
    let envs: Vec<&str> = v.environments.iter().map(|p| p.environment.as_str()).collect();
    envs.join(", ")
}

/// The first hex digits of a manifest id; anything else (a version name) as it is.
fn short(id: &str) -> &str {
    if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) { &id[..SHORT_ID] } else { id }
}

fn one_line(text: &str) -> String {
    let joined: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if joined.is_empty() { "-".into() } else { joined.join(" / ") }
}

/// A time in UTC, to the second.
fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// How long before `now_ms` `ms` was, to the second (`3m 12s ago`).
fn ago(now_ms: u64, ms: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let secs = now_ms.saturating_sub(ms) / 1000;
    format!("{} ago", humantime::format_duration(Duration::from_secs(secs)))
}

#[allow(clippy::disallowed_methods)] // Ages in tables are relative to now, read here at the edge.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A plain text table: a header, columns two spaces apart, some right-aligned.
#[derive(Debug)]
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    right: Vec<bool>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
            right: vec![false; header.len()],
        }
    }

    fn right_align(&mut self, columns: std::ops::Range<usize>) {
        for c in columns {
            if let Some(r) = self.right.get_mut(c) {
                *r = true;
            }
        }
    }

    fn row(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let width = widths.get(i).copied().unwrap_or(0);
                let last = i + 1 == row.len();
                if i > 0 {
                    line.push_str("  ");
                }
                if self.right.get(i).copied().unwrap_or(false) {
                    let _ = write!(line, "{cell:>width$}");
                } else if last {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<width$}");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use fleetwave_coordinator::view::{HostServiceView, PromotionView, RegionView};

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> OpsCommand {
        let cli = Cli::try_parse_from(std::iter::once("fleetwave").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match cli.command {
            Command::Ops(c) => c,
            other => panic!("{other:?}"),
        }
    }

    fn deploy_args(args: &[&str]) -> DeployArgs {
        let mut all = vec!["deploy"];
        all.extend_from_slice(args);
        match parse(&all) {
            OpsCommand::Deploy(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deploy_flags_become_the_spec() {
        let args = deploy_args(&[
            "web",
            "2.0",
            "--env",
            "prod",
            "--steps",
            "1,10,50,100",
            "--regions",
            "eu,us",
            "--max-unavailable",
            "25%",
            "--max-failed",
            "2",
            "--bake",
            "30s",
            "--bake-first-region",
            "1m",
            "--no-analysis",
            "--approval",
            "--hotfix",
            "--refuse-if-busy",
            "--comment",
            "fix the login",
            "-w",
        ]);
        assert!(args.wait);
        let spec = deployment_spec(&args).expect("spec");
        assert_eq!(
            spec,
            DeploymentSpec {
                service: "web".into(),
                version: "2.0".into(),
                environment: "prod".into(),
                strategy: StrategyKind::Canary,
                canary_steps: vec![1, 10, 50, 100],
                regions: vec!["eu".into(), "us".into()],
                max_unavailable: Some("25%".into()),
                max_failed: Some("2".into()),
                bake_first_region: Some(Duration::from_secs(60)),
                bake: Some(Duration::from_secs(30)),
                bake_extensions: None,
                analysis: Some(false),
                approval: true,
                activation_timeout: None,
                stage_timeout: None,
                hotfix: true,
                on_conflict: OnConflict::Refuse,
                comment: "fix the login".into(),
            }
        );
    }

    #[test]
    fn deploy_defaults_are_left_to_the_coordinator() {
        let spec = deployment_spec(&deploy_args(&["web", "2.0", "--env", "prod"])).expect("spec");
        let json = serde_json::to_value(&spec).expect("json");
        let minimal: DeploymentSpec =
            serde_json::from_str(r#"{"service":"web","version":"2.0","environment":"prod"}"#)
                .expect("minimal");
        assert_eq!(spec, minimal, "{json}");
        for (flag, kind) in [
            ("rolling", StrategyKind::Rolling),
            ("blue-green", StrategyKind::BlueGreen),
            ("blue_green", StrategyKind::BlueGreen),
        ] {
            let args = deploy_args(&["web", "2.0", "--env", "prod", "--strategy", flag]);
            assert_eq!(deployment_spec(&args).expect("spec").strategy, kind);
        }
    }

    #[test]
    fn bad_deploy_flags_name_the_flag() {
        let cases: [(&[&str], &str); 4] = [
            (&["--steps", "5,1,100"], "--steps"),
            (&["--strategy", "rolling", "--steps", "50,100"], "--steps"),
            (&["--max-unavailable", "150%"], "--max-unavailable"),
            (&["--regions", "eu,,us"], "--regions"),
        ];
        for (extra, flag) in cases {
            let mut args = vec!["web", "2.0", "--env", "prod"];
            args.extend_from_slice(extra);
            match deployment_spec(&deploy_args(&args)) {
                Err(DeployArgsError::Invalid { flag: f, .. }) => assert_eq!(f, flag, "{extra:?}"),
                other => panic!("{extra:?}: {other:?}"),
            }
        }
        let err = Cli::try_parse_from([
            "fleetwave",
            "deploy",
            "web",
            "2.0",
            "--env",
            "p",
            "--bake",
            "soon",
        ]);
        assert!(err.is_err());
    }

    #[test]
    fn promote_is_a_version_or_a_deployment() {
        match parse(&["promote", "web", "2.0", "--to", "prod", "--comment", "ok"]) {
            OpsCommand::Promote(a) => {
                assert_eq!(
                    (a.service.as_deref(), a.version.as_deref(), a.to.as_deref(), a.deployment),
                    (Some("web"), Some("2.0"), Some("prod"), None)
                );
            }
            other => panic!("{other:?}"),
        }
        match parse(&["promote", "--deployment", "7", "--wave", "2"]) {
            OpsCommand::Promote(a) => assert_eq!((a.deployment, a.wave), (Some(7), Some(2))),
            other => panic!("{other:?}"),
        }
        for bad in [
            &["promote", "web", "2.0"][..],
            &["promote"],
            &["promote", "web", "2.0", "--to", "prod", "--deployment", "7"],
            &["promote", "web", "2.0", "--to", "prod", "--wave", "1"],
        ] {
            assert!(
                Cli::try_parse_from(std::iter::once("fleetwave").chain(bad.iter().copied()))
                    .is_err(),
                "{bad:?}"
            );
        }
        assert!(Cli::try_parse_from(["fleetwave", "status", "-w"]).is_err(), "-w needs an id");
        assert!(Cli::try_parse_from(["fleetwave", "status", "3", "--service", "web"]).is_err());
    }

    fn counts(hosts: u32, updated: u32, failed: u32) -> CountsView {
        CountsView {
            hosts,
            assigned: updated + failed,
            updated,
            failed,
            staged: hosts,
            ..Default::default()
        }
    }

    fn deployment() -> DeploymentView {
        DeploymentView {
            id: 7,
            service: "web".into(),
            version: "2.0".into(),
            environment: "prod".into(),
            strategy: "canary".into(),
            manifest: "ab".repeat(32),
            state: "running".into(),
            phase: Some("running".into()),
            paused: false,
            stage: Some("baking".into()),
            held: None,
            region: Some("eu".into()),
            wave: 2,
            step_percent: Some(5),
            remaining_s: Some(250),
            regions: vec![
                RegionView { name: "eu".into(), counts: counts(20, 1, 0) },
                RegionView { name: "us".into(), counts: counts(10, 0, 0) },
            ],
            totals: counts(30, 1, 0),
            gates: vec![GateView {
                gate: 1,
                region: "eu".into(),
                wave: 1,
                verdict: "pass".into(),
                canary_hosts: 1,
                canary_requests: 1000,
                canary_errors: 2,
                baseline_hosts: 19,
                baseline_requests: 19_000,
                baseline_errors: 40,
                evidence: serde_json::Value::Null,
                decided_ms: Some(1_000),
            }],
            created_by: "alice".into(),
            created_ms: 0,
            started_ms: Some(1_000),
            finished_ms: None,
            outcome: None,
            hotfix: false,
        }
    }

    #[test]
    fn a_running_deployment_renders_its_waves_counts_and_gates() {
        let text = render_deployment(&deployment());
        let expected = "\
deployment 7: web 2.0 to prod, canary
state:     running
now:       region eu, wave 2 (step 5%), baking, 4m 10s left
time:      created 1970-01-01T00:00:00Z by alice, started 1970-01-01T00:00:01Z
manifest:  abababababababababababababababababababababababababababababababab

REGION  HOSTS  STAGED  ASSIGNED  UPDATED  FAILED  UNAVAILABLE  LOST
eu *       20      20         1        1       0            0     0
us         10      10         0        0       0            0     0
total      30      30         1        1       0            0     0

GATE  REGION  WAVE  CANARY ERRORS           BASELINE ERRORS             VERDICT
   1  eu         1  0.20% (2/1000, 1 host)  0.21% (40/19000, 19 hosts)  pass
";
        assert_eq!(text, expected, "\n{text}");
        let held = DeploymentView {
            stage: Some("held".into()),
            held: Some("Approval".into()),
            remaining_s: None,
            ..deployment()
        };
        let text = render_deployment(&held);
        assert!(
            text.contains("now:       region eu, wave 2 (step 5%), held: Approval\n"),
            "{text}"
        );
    }

    #[test]
    fn a_finished_deployment_shows_its_outcome_and_no_current_wave() {
        let mut v = deployment();
        v.state = "rolled_back".into();
        v.phase = Some("rolled_back".into());
        v.finished_ms = Some(61_000);
        v.outcome = Some("rolled back: gate 2 failed in eu".into());
        let text = render_deployment(&v);
        assert!(text.contains("state:     rolled back\n"), "{text}");
        assert!(!text.contains("now:"), "{text}");
        assert!(!text.contains('*'), "{text}");
        assert!(text.ends_with("\noutcome:   rolled back: gate 2 failed in eu\n"), "{text}");
        assert_eq!(where_it_is(&v), "rolled back: gate 2 failed in eu");
    }

    #[test]
    fn only_a_success_exits_zero() {
        let mut v = deployment();
        v.state = "succeeded".into();
        assert_eq!(outcome(&v), Ok(()));
        for state in ["rolled_back", "aborted", "cancelled"] {
            v.state = state.into();
            v.outcome = Some("why".into());
            let err = outcome(&v).expect_err(state);
            assert_eq!(err.state, state.replace('_', " "));
            assert_eq!(err.id, 7);
        }
        v.state = "rolled_back".into();
        assert_eq!(
            outcome(&v).expect_err("rolled back").to_string(),
            "deployment 7 of web 2.0 to prod rolled back: why"
        );
    }

    #[test]
    fn a_redraw_ignores_the_countdown_alone() {
        let a = deployment();
        let b = DeploymentView { remaining_s: Some(3), ..a.clone() };
        assert_eq!(without_countdown(&a), without_countdown(&b));
        let c = DeploymentView { wave: 3, ..a.clone() };
        assert_ne!(without_countdown(&a), without_countdown(&c));
    }

    #[test]
    fn list_tables_render() {
        let list =
            render_deployments(&[DeploymentView { created_ms: 5_000, ..deployment() }], 130_000);
        assert_eq!(
            list,
            "\
ID  SERVICE  VERSION  ENV   STRATEGY  STATE    UPDATED  WHERE      CREATED    BY
 7  web      2.0      prod  canary    running  1/30     eu wave 2  2m 5s ago  alice
"
        );
        let host = HostView {
            id: "12D3".into(),
            name: "web-1".into(),
            region: "eu".into(),
            environment: "prod".into(),
            lost: false,
            seen_ms: 120_000,
            services: vec![HostServiceView {
                service: "web".into(),
                active: Some("2.0".into()),
                healthy: Some(false),
                standby: None,
            }],
            staged: vec!["ab".repeat(32)],
            agent_version: "0.1.0".into(),
        };
        let hosts = render_hosts(&[host], 125_000);
        assert!(
            hosts.contains("web-1  prod  eu      up      5s ago  web 2.0 (unhealthy)"),
            "{hosts}"
        );
        let version = VersionView {
            service: "web".into(),
            version: "2.0".into(),
            manifest: "cd".repeat(32),
            size: 2048,
            registered_by: "ci".into(),
            registered_ms: 0,
            environments: ["dev", "prod"]
                .iter()
                .map(|e| PromotionView {
                    environment: (*e).into(),
                    by: "ci".into(),
                    at_ms: 0,
                    comment: String::new(),
                })
                .collect(),
        };
        let versions = render_versions(&[version]);
        assert!(
            versions.contains(
                "2.0      cdcdcdcdcdcdcdcd  2.00 KiB  1970-01-01T00:00:00Z  ci  dev, prod"
            ),
            "{versions}"
        );
        let audit = render_audit(&[AuditView {
            at_ms: 0,
            actor: "alice".into(),
            action: "deployment.pause".into(),
            service: Some("web".into()),
            deployment: Some(7),
            detail: "looks\nwrong".into(),
        }]);
        assert!(
            audit.ends_with("alice  deployment.pause  web               7  looks / wrong\n"),
            "{audit}"
        );
        let services = render_services(&[ServiceView {
            service: "web".into(),
            versions: 2,
            latest: Some("2.0".into()),
            deployed: vec![("prod".into(), "1.0".into())],
        }]);
        assert!(services.contains("web             2  2.0     prod=1.0"), "{services}");
        assert_eq!(render_deployments(&[], 0), "no deployments\n");
    }
}
