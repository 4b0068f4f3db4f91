//! `fleetwave demo`: the whole product on one machine, with no configuration.
//!
//! Starts an origin, a regional cache, the coordinator and 8 hosts as real processes on
//! 127.0.0.1 (temporary directories, ephemeral ports), publishes `web 1.0.0`, registers and
//! promotes it, rolls it out (rolling, 25% at a time); then publishes `web 1.0.1`, whose
//! health check fails, deploys it as a canary and shows the canary rolled back on its own,
//! every host back on 1.0.0. Prints what happened, the audit trail, and cleans up.

// The demo reports elapsed wall time: it is the I/O edge.
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fleetwave::local::{FleetSpec, LocalFleet};
use fleetwave_chunker::{BuildInfo, ChunkerParams};
use fleetwave_coordinator::view::{self, DeploymentView};
use indicatif::HumanBytes;
use rand::{RngCore, SeedableRng};

use super::publish;

pub(crate) fn run(keep: bool) -> Result<()> {
    let started = Instant::now();
    let tmp = tempfile::Builder::new().prefix("fleetwave-demo-").tempdir()?;
    let root = tmp.path();
    println!("Fleetwave demo in {}", root.display());
    let exe = std::env::current_exe().context("cannot find the fleetwave binary")?;

    println!("\n== start a fleet: origin, cache, coordinator, 8 hosts (region local, env prod)");
    let fleet = LocalFleet::start(&exe, &root.join("fleet"), &FleetSpec::default())?;
    println!(
        "   coordinator API {}, every host enrolled with its identity key",
        fleet.coordinator.ready_str("api")
    );
    let result = scenario(&fleet, root);
    let stopped = fleet.stop();
    result?;
    stopped?;
    println!("\n== fleet stopped after {:.1} s", started.elapsed().as_secs_f64());
    if keep {
        let kept = tmp.keep();
        println!("kept {}", kept.display());
    } else {
        println!("cleaned up; demo complete");
    }
    Ok(())
}

fn scenario(fleet: &LocalFleet, root: &Path) -> Result<()> {
    let src = root.join("src/web");
    generate_tree(&src)?;
    hooks(&src, "test -f etc/web.toml")?;
    println!(
        "\n== publish web 1.0.0 (a {} tree) and promote it dev -> staging -> prod",
        HumanBytes(tree_bytes(&src)?)
    );
    let v1 = publish::run(&options(&src, "1.0.0", &fleet.key, &fleet.origin_url()))?;
    v1.report_indented();
    fleet.register(&v1.id.to_hex(), &["staging", "prod"])?;

    println!("\n== deploy web 1.0.0 to prod: rolling, at most 25% of hosts unavailable");
    let d1 = deploy(
        fleet,
        serde_json::json!({
            "service": "web", "version": "1.0.0", "environment": "prod", "strategy": "rolling",
            "max_unavailable": "25%", "bake": "1s", "analysis": false,
            "comment": "first release",
        }),
    )?;
    let done = watch(fleet, d1)?;
    ensure!(done.state == "succeeded", "deployment {d1} ended {}: {:?}", done.state, done.outcome);
    let on = hosts_on(fleet, "1.0.0")?;
    println!("   succeeded: {on} of {} hosts run web 1.0.0", fleet.hosts.len());
    ensure!(on == fleet.hosts.len(), "only {on} hosts run 1.0.0");

    edit_tree(&src)?;
    hooks(&src, "echo 'health check: /healthz answers 500' >&2; exit 1")?;
    println!("\n== publish web 1.0.1 (3 files changed; its health check fails)");
    let v2 = publish::run(&options(&src, "1.0.1", &fleet.key, &fleet.origin_url()))?;
    let total = v2.manifest.size;
    println!(
        "   1.0.1 moved {} of {} ({:.1}%) to the origin; {} chunks reused from 1.0.0",
        HumanBytes(v2.new_bytes),
        HumanBytes(total),
        100.0 * v2.new_bytes as f64 / total.max(1) as f64,
        v2.reused_chunks
    );
    fleet.register(&v2.id.to_hex(), &["staging", "prod"])?;

    println!("\n== deploy web 1.0.1 to prod as a canary (1% -> 5% -> 25% -> 50% -> 100%)");
    let d2 = deploy(
        fleet,
        serde_json::json!({
            "service": "web", "version": "1.0.1", "environment": "prod", "strategy": "canary",
            "bake": "2s", "analysis": false, "comment": "new feature",
        }),
    )?;
    let done = watch(fleet, d2)?;
    ensure!(
        done.state == "rolled_back",
        "deployment {d2} ended {}, expected a rollback",
        done.state
    );
    println!("   {}", done.outcome.clone().unwrap_or_default());
    let back = fleet.wait("every host back on 1.0.0", Duration::from_secs(30), |f| {
        let on = hosts_on(f, "1.0.0").ok()?;
        (on == f.hosts.len()).then_some(on)
    })?;
    println!(
        "   canary touched {} of {} hosts; {back} of {} hosts run web 1.0.0 again (1.0.1 never got past the canary)",
        done.totals.assigned,
        done.totals.hosts,
        fleet.hosts.len()
    );

    println!("\n== audit trail of web");
    let audit: Vec<view::AuditView> = fleet.api.get("/api/v1/audit?service=web&limit=200")?;
    for a in audit.iter().filter(|a| !a.action.starts_with("rollout.wave_passed")) {
        println!(
            "   {:<22} {:<12} {}{}",
            a.action,
            a.actor,
            a.deployment.map(|d| format!("#{d} ")).unwrap_or_default(),
            a.detail
        );
    }
    Ok(())
}

fn deploy(fleet: &LocalFleet, spec: serde_json::Value) -> Result<u64> {
    let v: DeploymentView = fleet.api.post("/api/v1/deployments", &spec)?;
    println!("   deployment #{} created ({})", v.id, v.state);
    Ok(v.id)
}

/// Prints the deployment's progress until it ends.
fn watch(fleet: &LocalFleet, id: u64) -> Result<DeploymentView> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let v = fleet.api.deployment(id)?;
        let line = format!(
            "{:<12} {:<14} wave {} | staged {}/{} updated {} failed {} unavailable {}",
            v.phase.clone().unwrap_or_else(|| v.state.clone()),
            v.stage.clone().unwrap_or_default(),
            v.wave,
            v.totals.staged,
            v.totals.hosts,
            v.totals.updated,
            v.totals.failed,
            v.totals.unavailable,
        );
        if line != last {
            println!("   {:>5.1}s  {line}", started.elapsed().as_secs_f64());
            last = line;
        }
        if v.is_final() {
            return Ok(v);
        }
        if started.elapsed() > Duration::from_secs(45) {
            bail!("deployment {id} did not end within 45 s (last: {last})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn hosts_on(fleet: &LocalFleet, version: &str) -> Result<usize> {
    let hosts: Vec<view::HostView> = fleet.api.get("/api/v1/hosts")?;
    Ok(hosts
        .iter()
        .filter(|h| {
            h.services.iter().any(|s| s.service == "web" && s.active.as_deref() == Some(version))
        })
        .count())
}

fn hooks(src: &Path, health: &str) -> Result<()> {
    let text = format!(
        "[hooks]\nstart = \"true\"\ntimeout = \"10s\"\n\n[health]\ncommand = {}\ntimeout = \"1s\"\n",
        toml::Value::String(health.into())
    );
    write(&src.join("fleetwave.toml"), text.as_bytes(), false)
}

fn options(src: &Path, version: &str, key: &Path, origin: &str) -> publish::Options {
    publish::Options {
        path: src.to_owned(),
        service: "web".into(),
        version: version.into(),
        key: key.to_owned(),
        origin: origin.into(),
        params: ChunkerParams::DEFAULT,
        build: BuildInfo {
            commit: format!("demo-{version}"),
            builder: "fleetwave-demo".into(),
            built_at_unix: publish::now_unix(),
            labels: Default::default(),
        },
        quiet: true,
    }
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![0u8; len];
    rng.fill_bytes(&mut out);
    out
}

fn write(path: &Path, data: &[u8], executable: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, data).with_context(|| format!("cannot write {}", path.display()))?;
    let mode = if executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// A service tree: a server binary, a shared library, static assets, config, a symlink.
fn generate_tree(src: &Path) -> Result<()> {
    write(&src.join("bin/web-server"), &random_bytes(1, 12 << 20), true)?;
    write(&src.join("lib/libweb.so"), &random_bytes(2, 4 << 20), false)?;
    for i in 0..200 {
        let page = format!(
            "<html><body><h1>page {i}</h1>{}</body></html>\n",
            "lorem ipsum ".repeat(i * 7)
        );
        write(&src.join(format!("static/page-{i:03}.html")), page.as_bytes(), false)?;
    }
    write(&src.join("etc/web.toml"), b"port = 8080\nworkers = 16\n", false)?;
    std::os::unix::fs::symlink("web-server", src.join("bin/web"))?;
    Ok(())
}

/// A small release: a patch in the binary, a config change, one new page.
fn edit_tree(src: &Path) -> Result<()> {
    let bin = src.join("bin/web-server");
    let mut data = std::fs::read(&bin)?;
    let mid = data.len() / 2;
    data[mid..mid + 4096].copy_from_slice(&random_bytes(3, 4096));
    write(&bin, &data, true)?;
    write(&src.join("etc/web.toml"), b"port = 8080\nworkers = 32\n", false)?;
    write(&src.join("static/new-feature.html"), b"<html>new</html>\n", false)?;
    Ok(())
}

fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() { tree_bytes(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}
