//! Canary start and rollback latency on the local fleet (origin, cache, coordinator and 8 hosts
//! as processes on 127.0.0.1, [`fleetwave::local::LocalFleet`]).
//!
//! Publishes and rolls out `1.0.0` (rolling), then `--runs` times (default 5): publishes a new
//! version, deploys it as a canary with a one-hour bake, and measures
//!
//! - **canary start**: from just before the deploy POST to the first host whose report (as the
//!   coordinator's `/api/v1/hosts` shows it) has the new version active: it staged the artifact
//!   (fetched through the cache, verified, unpacked), ran its hooks and passed its health check;
//! - **rollback**: from just before `POST /api/v1/deployments/{id}/rollback` to every host
//!   reporting `1.0.0` active again.
//!
//! The coordinator is polled every [`POLL`]; both figures include up to one heartbeat interval
//! (the fleet's default, `FleetSpec::default().heartbeat`) for the report to reach it. Every
//! wait is bounded ([`STEP_LIMIT`]).
//!
//! ```text
//! rollout_latency --fleetwave target/release/fleetwave [--runs N] [--dir DIR]
//! ```

// Waiting on processes is wall-clock work: this binary is the I/O edge.
#![allow(clippy::disallowed_methods, reason = "a benchmark reads the clock: its I/O edge")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fleetwave::local::{FleetSpec, LocalFleet};
use fleetwave_coordinator::view::{DeploymentView, HostView};

/// How often the coordinator is asked.
const POLL: Duration = Duration::from_millis(20);
/// Longest any one step may take.
const STEP_LIMIT: Duration = Duration::from_secs(90);

/// A small service tree: a 512 KiB pseudo-random binary, hooks that do nothing, a health check
/// that passes.
fn tree(dir: &Path, version: &str) -> Result<()> {
    std::fs::create_dir_all(dir.join("bin"))?;
    let mut body = vec![0u8; 512 * 1024];
    let mut hasher = blake3::Hasher::new();
    hasher.update(version.as_bytes());
    hasher.finalize_xof().fill(&mut body);
    std::fs::write(dir.join("bin/server"), &body)?;
    std::fs::write(dir.join("VERSION"), version)?;
    std::fs::write(
        dir.join("fleetwave.toml"),
        "[hooks]\ntimeout = \"20s\"\n[health]\ncommand = \"true\"\ntimeout = \"1s\"\n",
    )?;
    Ok(())
}

/// Publishes `dir` as web `version` and registers it, promoted to staging and prod.
fn publish(fleet: &LocalFleet, dir: &Path, version: &str) -> Result<()> {
    tree(dir, version)?;
    let out = Command::new(&fleet.exe)
        .args(["publish", "--service", "web", "--version", version, "--key"])
        .arg(&fleet.key)
        .arg("--origin")
        .arg(fleet.origin_url())
        .arg(dir)
        .output()
        .context("cannot run fleetwave publish")?;
    ensure!(out.status.success(), "publish: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("manifest:"))
        .map(|s| s.trim().to_owned())
        .context("publish printed no manifest id")?;
    fleet.register(&id, &["staging", "prod"])?;
    Ok(())
}

/// The active version of `web` on every host.
fn active(fleet: &LocalFleet) -> Result<Vec<Option<String>>> {
    let hosts: Vec<HostView> = fleet.api.get("/api/v1/hosts")?;
    Ok(hosts
        .iter()
        .map(|h| h.services.iter().find(|s| s.service == "web").and_then(|s| s.active.clone()))
        .collect())
}

/// Polls every [`POLL`] until `done` holds of the hosts' active versions; the time it took.
fn until(
    fleet: &LocalFleet,
    from: Instant,
    what: &str,
    done: impl Fn(&[Option<String>]) -> bool,
) -> Result<Duration> {
    loop {
        let versions = active(fleet)?;
        if done(&versions) {
            return Ok(from.elapsed());
        }
        if from.elapsed() > STEP_LIMIT {
            bail!("{what}: not after {STEP_LIMIT:?}: {versions:?}");
        }
        std::thread::sleep(POLL);
    }
}

fn wait_final(fleet: &LocalFleet, id: u64) -> Result<DeploymentView> {
    fleet.wait(&format!("deployment {id} to end"), STEP_LIMIT, |f| {
        f.api.deployment(id).ok().filter(DeploymentView::is_final)
    })
}

fn deploy(fleet: &LocalFleet, spec: serde_json::Value) -> Result<DeploymentView> {
    fleet.api.post("/api/v1/deployments", &spec)
}

fn stats(label: &str, samples: &[Duration]) -> String {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let median = ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN);
    let max = ms.last().copied().unwrap_or(f64::NAN);
    let all: Vec<String> = ms.iter().map(|m| format!("{m:.0}")).collect();
    format!("{label}: median {median:.0} ms, max {max:.0} ms (runs: {} ms)", all.join(", "))
}

#[allow(clippy::print_stdout, reason = "the report is this binary's output")]
fn main() -> Result<()> {
    let mut exe: Option<PathBuf> = None;
    let mut runs = 5usize;
    let mut dir: Option<PathBuf> = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--fleetwave" => exe = Some(value.into()),
            "--runs" => runs = value.parse::<usize>()?.clamp(1, 20),
            "--dir" => dir = Some(value.into()),
            other => bail!("unknown flag {other}"),
        }
    }
    let exe = std::fs::canonicalize(exe.context("--fleetwave PATH (the fleetwave binary)")?)?;
    let tmp = tempfile::Builder::new()
        .prefix("fleetwave-rollout-latency.")
        .tempdir_in(dir.unwrap_or_else(std::env::temp_dir))?;
    let spec = FleetSpec::default();
    let started = Instant::now();
    let fleet = LocalFleet::start(&exe, &tmp.path().join("fleet"), &spec)?;
    println!(
        "fleet: {} hosts up in {:.1} s, heartbeat every {} ms, coordinator polled every {} ms",
        spec.hosts,
        started.elapsed().as_secs_f64(),
        spec.heartbeat.as_millis(),
        POLL.as_millis()
    );
    let src = tmp.path().join("web");

    publish(&fleet, &src, "1.0.0")?;
    let started = Instant::now();
    let d = deploy(
        &fleet,
        serde_json::json!({"service": "web", "version": "1.0.0", "environment": "prod",
            "strategy": "rolling", "max_unavailable": "25%", "bake": "200ms", "analysis": false}),
    )?;
    let done = wait_final(&fleet, d.id)?;
    ensure!(done.state == "succeeded", "1.0.0 did not roll out: {done:?}");
    println!("1.0.0 rolled out (rolling, 25%) in {:.1} s", started.elapsed().as_secs_f64());

    let (mut canary, mut rollback) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let version = format!("2.0.{run}");
        publish(&fleet, &src, &version)?;
        let from = Instant::now();
        let d = deploy(
            &fleet,
            serde_json::json!({"service": "web", "version": version, "environment": "prod",
                "strategy": "canary", "bake": "1h", "analysis": false}),
        )?;
        let c = until(&fleet, from, "a canary host on the new version", |v| {
            v.iter().any(|a| a.as_deref() == Some(version.as_str()))
        })?;
        let from = Instant::now();
        let _: DeploymentView = fleet.api.post(
            &format!("/api/v1/deployments/{}/rollback", d.id),
            &serde_json::json!({"comment": "rollout_latency"}),
        )?;
        let r = until(&fleet, from, "every host back on 1.0.0", |v| {
            v.iter().all(|a| a.as_deref() == Some("1.0.0"))
        })?;
        let done = wait_final(&fleet, d.id)?;
        ensure!(done.state == "rolled_back", "{version} did not roll back: {done:?}");
        println!(
            "run {run}: {version}: canary start {:.0} ms, rollback {:.0} ms",
            c.as_secs_f64() * 1e3,
            r.as_secs_f64() * 1e3
        );
        canary.push(c);
        rollback.push(r);
    }
    println!("{}", stats("canary start (bar < 5 s)", &canary));
    println!("{}", stats("rollback (bar < 2 s)", &rollback));
    fleet.stop()?;
    Ok(())
}
