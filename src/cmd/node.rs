//! `fleetwave node`: talk to a daemon's admin API (stage a manifest, show status).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use fleetwave_node::daemon::client::AdminClient;
use fleetwave_node::daemon::{ManifestStatus, Status};
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often `stage --wait` polls.
const POLL: Duration = Duration::from_millis(250);

/// Asks the host to stage `manifest`; with `wait`, shows progress until it is staged (or
/// fails, which is an error).
pub(crate) fn stage(api: &str, manifest: &str, wait: bool, quiet: bool) -> Result<()> {
    let client = AdminClient::new(api);
    let state = client.stage(manifest).with_context(|| format!("cannot stage {manifest}"))?;
    println!("{manifest}: {state}");
    if !wait {
        return Ok(());
    }
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
    };
    if let Ok(style) = ProgressStyle::with_template("staging [{bar:32}] {pos}/{len} chunks") {
        bar.set_style(style.progress_chars("=> "));
    }
    loop {
        let status = client.status().context("cannot follow staging")?;
        if let Some(m) = status.manifests.iter().find(|m| m.id == manifest) {
            if let Some(t) = &m.transfer {
                bar.set_length(u64::from(t.progress.total_chunks));
                bar.set_position(u64::from(t.progress.chunks));
            }
            match m.status.as_str() {
                "staged" => {
                    bar.finish_and_clear();
                    print_one(m);
                    return Ok(());
                }
                "failed" => {
                    bar.finish_and_clear();
                    bail!("staging {manifest} failed: {}", m.error.as_deref().unwrap_or("unknown"));
                }
                _ => {}
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Activates a staged release; an activation whose hooks failed is an error.
pub(crate) fn activate(api: &str, service: &str, manifest: &str) -> Result<()> {
    let outcome = AdminClient::new(api)
        .activate(service, manifest)
        .with_context(|| format!("cannot activate {manifest}"))?;
    report(service, &outcome)
}

/// Switches a service back to its previous release.
pub(crate) fn rollback(api: &str, service: &str) -> Result<()> {
    let outcome = AdminClient::new(api)
        .rollback(service)
        .with_context(|| format!("cannot roll back {service}"))?;
    report(service, &outcome)
}

fn report(service: &str, outcome: &fleetwave_node::activate::Outcome) -> Result<()> {
    if outcome.ok {
        println!("{service}: {} active", &outcome.target[..16.min(outcome.target.len())]);
        return Ok(());
    }
    let hook = outcome.failed_hook.map_or("activation", |h| h.name());
    let back = if outcome.rolled_back { "; switched back to the previous release" } else { "" };
    bail!(
        "{service}: {hook} failed: {}{back}",
        outcome.reason.as_deref().unwrap_or("unknown reason")
    )
}

/// Prints the daemon's status.
pub(crate) fn status(api: &str) -> Result<()> {
    let status = AdminClient::new(api).status()?;
    print_status(&status);
    Ok(())
}

fn print_one(m: &ManifestStatus) {
    let mut line =
        format!("{} {}@{} {}", &m.id[..16.min(m.id.len())], m.service, m.version, m.status);
    if let Some(t) = &m.transfer {
        let p = &t.progress;
        line.push_str(&format!(
            "  {}/{} chunks; from disk {}, peers {}, cache {}, origin {}; {} peers",
            p.chunks,
            p.total_chunks,
            HumanBytes(p.disk_bytes),
            HumanBytes(p.peer_bytes),
            HumanBytes(p.cache_bytes),
            HumanBytes(p.origin_bytes),
            t.peers.len()
        ));
    }
    if let Some(release) = &m.release {
        line.push_str(&format!("  {}", release.display()));
    }
    if let Some(err) = &m.error {
        line.push_str(&format!("  error: {err}"));
    }
    println!("{line}");
}

fn print_status(status: &Status) {
    let i = &status.info;
    println!("{} {} in region {} (api {})", i.role.name(), i.peer_id, i.region, i.api);
    let t = &status.totals;
    println!(
        "served {}; verified {} chunks, rejected {}; {} peers connected, {} banned, {} refused",
        HumanBytes(t.served_bytes),
        t.chunks_verified,
        t.chunks_rejected,
        t.peers,
        t.peers_banned,
        t.peers_refused
    );
    for m in &status.manifests {
        print_one(m);
    }
    for s in &status.services {
        let active = s.state.active.as_ref().map_or("none".to_owned(), |a| a.version.clone());
        let mut line = format!("service {}: active {active}", s.service);
        if let Some(p) = &s.state.previous {
            line.push_str(&format!(", previous {}", p.version));
        }
        if let Some(p) = &s.state.pending {
            let hook = p.running.map_or("", |h| h.name());
            line.push_str(&format!(", activating {} {hook}", &p.target[..16.min(p.target.len())]));
        }
        if let Some(last) = &s.state.last {
            if !last.ok {
                line.push_str(&format!(
                    ", last activation failed: {}",
                    last.reason.as_deref().unwrap_or("")
                ));
            }
        }
        println!("{line}");
    }
}
