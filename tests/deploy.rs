//! End to end: deployments through the coordinator onto real hosts (origin, cache,
//! coordinator and 8 hosts as processes on 127.0.0.1, temporary directories).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleetwave::local::{Api, ApiError, FleetSpec, LocalFleet};
use fleetwave_coordinator::view::{AuditView, DeploymentView, HostView};

const EXE: &str = env!("CARGO_BIN_EXE_fleetwave");

fn fleet(dir: &Path) -> LocalFleet {
    LocalFleet::start(Path::new(EXE), dir, &FleetSpec::default()).expect("fleet starts")
}

/// A small service tree whose hooks append `begin`/`end` lines with the release directory to
/// `events` (shared by every host), and whose health check runs `health`.
fn tree(dir: &Path, version: &str, events: &Path, health: &str) {
    tree_with(dir, version, events, health, "true");
}

/// [`tree`] with an `after_install` hook.
fn tree_with(dir: &Path, version: &str, events: &Path, health: &str, after_install: &str) {
    std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
    let body: Vec<u8> =
        (0..(512 * 1024u32)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(dir.join("bin/server"), &body).expect("write");
    std::fs::write(dir.join("VERSION"), version).expect("write");
    let events = events.display();
    let hooks = format!(
        "[hooks]\n\
         before_install = \"echo begin $PWD >> {events}\"\n\
         after_install = {after_install:?}\n\
         validate = \"sleep 0.3; echo end $PWD >> {events}\"\n\
         timeout = \"20s\"\n\
         [health]\ncommand = {health:?}\ntimeout = \"1s\"\n"
    );
    std::fs::write(dir.join("fleetwave.toml"), hooks).expect("write");
}

/// Publishes `dir` as web `version` to the fleet's origin and registers it, promoted to
/// `envs`; returns the manifest id.
fn publish(fleet: &LocalFleet, dir: &Path, version: &str, envs: &[&str]) -> String {
    let out = Command::new(EXE)
        .args(["publish", "--service", "web", "--version", version, "--key"])
        .arg(&fleet.key)
        .arg("--origin")
        .arg(fleet.origin_url())
        .arg(dir)
        .output()
        .expect("publish runs");
    assert!(out.status.success(), "publish: {}", common::stderr(&out));
    let text = common::stdout(&out);
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("manifest:"))
        .map(|s| s.trim().to_owned())
        .expect("manifest id printed");
    fleet.register(&id, envs).expect("register");
    id
}

fn deploy(api: &Api, spec: serde_json::Value) -> Result<DeploymentView, anyhow::Error> {
    api.post("/api/v1/deployments", &spec)
}

fn api_error(e: anyhow::Error) -> ApiError {
    e.downcast::<ApiError>().expect("an API error")
}

fn wait_final(fleet: &LocalFleet, id: u64, limit: Duration) -> DeploymentView {
    fleet
        .wait(&format!("deployment {id} to end"), limit, |f| {
            f.api.deployment(id).ok().filter(DeploymentView::is_final)
        })
        .expect("deployment ends")
}

fn versions_active(fleet: &LocalFleet) -> Vec<Option<String>> {
    let hosts: Vec<HostView> = fleet.api.get("/api/v1/hosts").expect("hosts");
    hosts
        .iter()
        .map(|h| h.services.iter().find(|s| s.service == "web").and_then(|s| s.active.clone()))
        .collect()
}

/// Most hosts between `begin` and `end` at once, replaying the hooks' shared log.
fn max_concurrent(events: &Path) -> usize {
    let text = std::fs::read_to_string(events).unwrap_or_default();
    let mut open = std::collections::HashSet::new();
    let mut most = 0;
    for line in text.lines() {
        let (what, dir) = line.split_once(' ').expect("event line");
        // The host is the directory above releases/.
        let host = dir.split("/releases/").next().expect("host dir").to_owned();
        match what {
            "begin" => {
                open.insert(host);
            }
            _ => {
                open.remove(&host);
            }
        }
        most = most.max(open.len());
    }
    most
}

#[test]
fn rolling_keeps_the_budget_and_a_failing_canary_rolls_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fleet = fleet(&tmp.path().join("fleet"));
    let events = tmp.path().join("events.log");
    let src = tmp.path().join("web");

    tree(&src, "1.0.0", &events, "true");
    publish(&fleet, &src, "1.0.0", &["staging", "prod"]);
    let d1 = deploy(
        &fleet.api,
        serde_json::json!({"service": "web", "version": "1.0.0", "environment": "prod",
            "strategy": "rolling", "max_unavailable": "25%", "bake": "200ms", "analysis": false}),
    )
    .expect("deploy 1.0.0");
    let done = wait_final(&fleet, d1.id, Duration::from_secs(90));
    assert_eq!(done.state, "succeeded", "{done:?}");
    assert!(versions_active(&fleet).iter().all(|v| v.as_deref() == Some("1.0.0")));
    let begins = std::fs::read_to_string(&events).expect("events").matches("begin").count();
    assert_eq!(begins, 8, "every host activated once");
    let most = max_concurrent(&events);
    assert!(most <= 2, "{most} hosts were activating at once; 25% of 8 is 2");
    assert!(most >= 1);

    // 1.0.1's health check fails: the first canary host fails, everything rolls back.
    std::fs::remove_file(&events).expect("reset events");
    tree(&src, "1.0.1", &events, "exit 1");
    publish(&fleet, &src, "1.0.1", &["staging", "prod"]);
    let d2 = deploy(
        &fleet.api,
        serde_json::json!({"service": "web", "version": "1.0.1", "environment": "prod",
            "strategy": "canary", "bake": "1s", "analysis": false}),
    )
    .expect("deploy 1.0.1");
    let done = wait_final(&fleet, d2.id, Duration::from_secs(90));
    assert_eq!(done.state, "rolled_back", "{done:?}");
    assert!(done.totals.assigned <= 1, "a 1% canary of 8 hosts is one host: {done:?}");
    fleet
        .wait("every host on 1.0.0", Duration::from_secs(30), |f| {
            versions_active(f).iter().all(|v| v.as_deref() == Some("1.0.0")).then_some(())
        })
        .expect("all back on 1.0.0");
    let audit: Vec<AuditView> = fleet.api.get("/api/v1/audit?service=web").expect("audit");
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    for wanted in [
        "version.register",
        "version.promote",
        "deployment.create",
        "rollout.host_failed",
        "rollout.rolling_back",
        "rollout.rolled_back",
    ] {
        assert!(actions.contains(&wanted), "audit lacks {wanted}: {actions:?}");
    }

    // A host killed while a hook runs reports that activation failed when it is back; the
    // hook is not run again, and the deployment rolls back.
    std::fs::remove_file(&events).expect("reset events");
    tree_with(&src, "1.0.2", &events, "true", "sleep 60");
    publish(&fleet, &src, "1.0.2", &["staging", "prod"]);
    let d3 = deploy(
        &fleet.api,
        serde_json::json!({"service": "web", "version": "1.0.2", "environment": "prod",
            "strategy": "rolling", "max_unavailable": "1", "bake": "200ms", "analysis": false}),
    )
    .expect("deploy 1.0.2");
    let host = fleet
        .wait("a host to run its hooks", Duration::from_secs(60), |_| {
            let text = std::fs::read_to_string(&events).ok()?;
            let line = text.lines().find(|l| l.starts_with("begin"))?.to_owned();
            let dir = line.split_once(' ')?.1.split("/releases/").next()?.to_owned();
            Some(Path::new(&dir).file_name()?.to_string_lossy().into_owned())
        })
        .expect("a hook runs");
    // Wait until the host's activation state records `after_install` as running.
    let state = tmp.path().join("fleet").join(&host).join("activation/web.json");
    fleet
        .wait("after_install to be running", Duration::from_secs(30), |_| {
            let text = std::fs::read_to_string(&state).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            (v["pending"]["running"] == "after_install").then_some(())
        })
        .expect("the hook runs");
    let mut fleet = fleet;
    let i = fleet.hosts.iter().position(|h| h.name == host).expect("the host");
    fleet.hosts[i].restart(Path::new(EXE)).expect("host killed and restarted");
    let done = wait_final(&fleet, d3.id, Duration::from_secs(90));
    assert_eq!(done.state, "rolled_back", "{done:?}");
    let audit: Vec<AuditView> = fleet.api.get("/api/v1/audit?service=web").expect("audit");
    assert!(
        audit.iter().any(|a| a.action == "rollout.host_failed"
            && a.deployment == Some(d3.id)
            && a.detail.contains("ActivationFailed")),
        "the interrupted activation is reported failed: {audit:?}"
    );
    let text = std::fs::read_to_string(&events).expect("events");
    assert_eq!(text.matches("begin").count(), 1, "the interrupted hook was not run again: {text}");
    fleet
        .wait("every host on 1.0.0", Duration::from_secs(30), |f| {
            versions_active(f).iter().all(|v| v.as_deref() == Some("1.0.0")).then_some(())
        })
        .expect("all on 1.0.0");
    fleet.stop().expect("fleet stops");
}

#[test]
fn refusals_promotion_tokens_and_one_deployment_at_a_time() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fleet = fleet(&tmp.path().join("fleet"));
    let events = tmp.path().join("events.log");
    let src = tmp.path().join("web");
    tree(&src, "1.0.0", &events, "true");
    publish(&fleet, &src, "1.0.0", &[]);
    let spec = serde_json::json!({"service": "web", "version": "1.0.0", "environment": "prod",
        "strategy": "canary", "bake": "1h", "analysis": false});

    // Only in dev: prod is refused.
    let e = api_error(deploy(&fleet.api, spec.clone()).expect_err("not promoted"));
    assert_eq!((e.status, e.code.as_str()), (403, "not_promoted"), "{e}");

    // No token, an unknown token, a viewer token.
    let e = api_error(deploy(&fleet.api.with_token(""), spec.clone()).expect_err("no token"));
    assert_eq!((e.status, e.code.as_str()), (401, "unauthorized"));
    let e = api_error(
        deploy(&fleet.api.with_token("fwt_nope_nope_nope"), spec.clone()).expect_err("unknown"),
    );
    assert_eq!(e.status, 401);
    let viewer = fleet.api.with_token(&fleet.viewer_token);
    let e = api_error(deploy(&viewer, spec.clone()).expect_err("viewer"));
    assert_eq!((e.status, e.code.as_str()), (403, "forbidden"));
    let e = api_error(
        viewer
            .post::<serde_json::Value, _>(
                "/api/v1/services/web/versions/1.0.0/promote",
                &serde_json::json!({"environment": "prod"}),
            )
            .expect_err("viewer promotes"),
    );
    assert_eq!(e.status, 403);
    let listed: Vec<HostView> = viewer.get("/api/v1/hosts").expect("a viewer reads");
    assert_eq!(listed.len(), 8);

    // Promoted: the first runs (its 1 h bake keeps it running), a second is refused or queued.
    fleet.register(&publish_id(&fleet), &["staging", "prod"]).expect("promote");
    let first = deploy(&fleet.api, spec.clone()).expect("first deployment");
    assert_eq!(first.state, "running");
    let mut refuse = spec.clone();
    refuse["on_conflict"] = "refuse".into();
    let e = api_error(deploy(&fleet.api, refuse).expect_err("second refused"));
    assert_eq!((e.status, e.code.as_str()), (409, "deployment_in_progress"), "{e}");
    let queued = deploy(&fleet.api, spec.clone()).expect("second queued");
    assert_eq!(queued.state, "queued");
    let mut hotfix = spec.clone();
    hotfix["hotfix"] = true.into();
    let hot = deploy(&fleet.api, hotfix).expect("hotfix queued");
    // Rolling the first back (a first release: its canary host takes the service off) ends
    // it and starts the hotfix, ahead of the earlier queued one.
    fleet
        .wait("the canary host updated", Duration::from_secs(60), |f| {
            f.api.deployment(first.id).ok().filter(|d| d.totals.updated == 1)
        })
        .expect("canary up");
    let _: DeploymentView = fleet
        .api
        .post(
            &format!("/api/v1/deployments/{}/rollback", first.id),
            &serde_json::json!({"comment": "test"}),
        )
        .expect("rollback");
    let rolled = wait_final(&fleet, first.id, Duration::from_secs(30));
    assert_eq!(rolled.state, "rolled_back", "{rolled:?}");
    let audit: Vec<AuditView> = fleet.api.get("/api/v1/audit").expect("audit");
    assert!(
        audit.iter().any(|a| a.deployment == Some(first.id)
            && a.action == "rollout.rolled_back"
            && a.detail.starts_with("0 hosts")),
        "every touched host confirmed: {audit:?}"
    );
    let started = fleet
        .wait("the hotfix to start", Duration::from_secs(30), |f| {
            f.api.deployment(hot.id).ok().filter(|d| d.state == "running")
        })
        .expect("hotfix runs");
    assert_eq!(started.id, hot.id);
    assert_eq!(fleet.api.deployment(queued.id).expect("queued").state, "queued");
    let audit: Vec<AuditView> = fleet.api.get("/api/v1/audit").expect("audit");
    assert!(
        audit.iter().any(|a| a.action == "auth.refused" && a.actor == "viewer"),
        "refusals are audited"
    );
    fleet.stop().expect("fleet stops");
}

fn publish_id(fleet: &LocalFleet) -> String {
    let versions: Vec<fleetwave_coordinator::view::VersionView> =
        fleet.api.get("/api/v1/services/web/versions").expect("versions");
    versions[0].manifest.clone()
}

#[test]
fn a_coordinator_killed_mid_rollout_resumes_where_it_was_then_blue_green_switches_and_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut fleet = fleet(&tmp.path().join("fleet"));
    let events = tmp.path().join("events.log");
    let src = tmp.path().join("web");
    tree(&src, "2.0.0", &events, "true");
    publish(&fleet, &src, "2.0.0", &["staging", "prod"]);
    let d = deploy(
        &fleet.api,
        serde_json::json!({"service": "web", "version": "2.0.0", "environment": "prod",
            "strategy": "rolling", "max_unavailable": "1", "bake": "300ms", "analysis": false}),
    )
    .expect("deploy");
    // Kill it once a few hosts are done, mid-rollout.
    fleet
        .wait("three hosts updated", Duration::from_secs(60), |f| {
            f.api.deployment(d.id).ok().filter(|v| v.totals.updated >= 3)
        })
        .expect("progress");
    fleet.coordinator.kill9();
    fleet.restart_coordinator().expect("coordinator restarts");
    let done = wait_final(&fleet, d.id, Duration::from_secs(90));
    assert_eq!(done.state, "succeeded", "{done:?}");
    assert_eq!(done.totals.updated, 8);
    assert!(versions_active(&fleet).iter().all(|v| v.as_deref() == Some("2.0.0")));
    // No wave formed twice, none skipped: every host activated exactly once.
    let text = std::fs::read_to_string(&events).expect("events");
    assert_eq!(text.matches("begin").count(), 8, "{text}");
    let audit: Vec<AuditView> = fleet.api.get("/api/v1/audit?service=web").expect("audit");
    let mut waves: Vec<&str> = audit
        .iter()
        .filter(|a| a.action == "rollout.wave_started")
        .map(|a| a.detail.split(':').next().unwrap_or_default())
        .collect();
    let n = waves.len();
    waves.sort_unstable();
    waves.dedup();
    assert_eq!(waves.len(), n, "a wave was started twice: {audit:?}");
    assert!(max_concurrent(&events) <= 1);

    // Blue-green: 3.0.0 starts beside 2.0.0 everywhere, the region switches at once, 2.0.0
    // stays running as the standby; rolling back is a switch back.
    tree(&src, "3.0.0", &events, "true");
    publish(&fleet, &src, "3.0.0", &["staging", "prod"]);
    let bg = deploy(
        &fleet.api,
        serde_json::json!({"service": "web", "version": "3.0.0", "environment": "prod",
            "strategy": "blue_green", "bake": "300ms", "analysis": false}),
    )
    .expect("blue-green deploy");
    let done = wait_final(&fleet, bg.id, Duration::from_secs(90));
    assert_eq!(done.state, "succeeded", "{done:?}");
    let hosts: Vec<HostView> = fleet.api.get("/api/v1/hosts").expect("hosts");
    for h in &hosts {
        let web = h.services.iter().find(|s| s.service == "web").expect("web");
        assert_eq!(web.active.as_deref(), Some("3.0.0"), "{h:?}");
        assert_eq!(web.standby.as_deref(), Some("2.0.0"), "the old release stays beside: {h:?}");
    }
    let _: DeploymentView = fleet
        .api
        .post(&format!("/api/v1/deployments/{}/rollback", bg.id), &serde_json::json!({}))
        .expect("switch back");
    fleet
        .wait("every host back on 2.0.0", Duration::from_secs(30), |f| {
            versions_active(f).iter().all(|v| v.as_deref() == Some("2.0.0")).then_some(())
        })
        .expect("switched back");
    fleet.stop().expect("fleet stops");
}

/// How the played service hands its counters to its host.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Report {
    /// `POST /v1/services/web/metrics` on the host's API.
    Push,
    /// A Prometheus page the host scrapes (`[[scrape]]`).
    Scrape,
    /// The same pages scraped by a Prometheus server the coordinator queries (`[[prometheus]]`);
    /// the hosts report no counters at all.
    Promql,
}

/// A real Prometheus server (Debian's `prometheus`, or `$FLEETWAVE_PROMETHEUS`) on 127.0.0.1,
/// scraping every host's page every second as job `web` with the label `host="host-N"`.
/// Killed when dropped.
struct Prometheus {
    child: std::process::Child,
    url: String,
}

impl Prometheus {
    fn start(dir: &Path, pages: &str, hosts: usize) -> Prometheus {
        let exe = std::env::var("FLEETWAVE_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let (addr, path) =
            pages.strip_prefix("http://").and_then(|r| r.split_once('/')).expect("page URL");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n\
             scrape_configs:\n  - job_name: web\n    static_configs:\n",
        );
        for i in 0..hosts {
            let path = format!("/{}", path.replace("{host}", &i.to_string()));
            config.push_str(&format!(
                "      - targets: [\"{addr}\"]\n        labels: {{host: host-{i}, __metrics_path__: \"{path}\"}}\n"
            ));
        }
        std::fs::create_dir_all(dir).expect("prometheus dir");
        std::fs::write(dir.join("prometheus.yml"), config).expect("prometheus.yml");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new(&exe)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {exe}: {e} (apt-get install prometheus, or set FLEETWAVE_PROMETHEUS)")
            });
        let server = Prometheus { child, url: format!("http://127.0.0.1:{port}") };
        let http = reqwest::blocking::Client::new();
        fleetwave::local::poll_until("prometheus to be ready", Duration::from_secs(30), || {
            let ready = http.get(format!("{}/-/ready", server.url)).send();
            ready.is_ok_and(|r| r.status().is_success()).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: see {}", dir.join("prometheus.log").display()));
        server
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Plays the service on every host: every 100 ms, counts what `current/web` runs: 100
/// requests, of which 0.5% fail on 1.0.0 and 10% on 1.1.0 (a bad release that answers 5xx),
/// and pushes them to the host's API (`Report::Push`) or keeps them for `counters`
/// (`Report::Scrape`). Stops when `stop` is set.
fn play_service(
    hosts: Vec<(PathBuf, String)>,
    report: Report,
    counters: Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let http = reqwest::blocking::Client::new();
        let mut versions = vec![String::new(); hosts.len()];
        let mut tick = 0u64;
        while !stop.load(Ordering::Relaxed) && tick < 20_000 {
            tick += 1;
            for (i, (dir, api)) in hosts.iter().enumerate() {
                let version =
                    std::fs::read_to_string(dir.join("current/web/VERSION")).unwrap_or_default();
                let c = {
                    let mut all = counters.lock().expect("lock");
                    if versions[i] != version {
                        // A new release starts counting from zero.
                        all[i] = (0, 0);
                        versions[i] = version.clone();
                    }
                    if version.is_empty() {
                        continue;
                    }
                    let bad =
                        if version == "1.1.0" { 10 } else { u64::from(tick.is_multiple_of(2)) };
                    all[i].0 += 100;
                    all[i].1 += bad;
                    all[i]
                };
                if report == Report::Push {
                    let _ = http
                        .post(format!("http://{api}/v1/services/web/metrics"))
                        .json(&serde_json::json!({"requests": c.0, "errors": c.1}))
                        .send();
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// Serves `GET /host-N/metrics` on 127.0.0.1: host N's counters as a Prometheus page (200s
/// and 503s of `http_requests_total`, among other series). Returns the URL template.
fn metrics_pages(counters: Arc<std::sync::Mutex<Vec<(u64, u64)>>>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/host-{{host}}/metrics", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for stream in listener.incoming().take(100_000) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request = String::new();
            let _ = reader.read_line(&mut request);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let host: Option<usize> = request
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.strip_prefix("/host-"))
                .and_then(|p| p.strip_suffix("/metrics"))
                .and_then(|n| n.parse().ok());
            let c = host.and_then(|h| counters.lock().expect("lock").get(h).copied());
            let response = match c {
                Some((requests, errors)) => {
                    // Every request answered within 25 to 50 ms, on the Prometheus default
                    // bounds.
                    let mut page = format!(
                        "# TYPE http_requests_total counter\n\
                         http_requests_total{{code=\"200\",method=\"get\"}} {}\n\
                         http_requests_total{{code=\"503\",method=\"get\"}} {errors}\n\
                         process_open_fds 12\n\
                         # TYPE http_request_duration_seconds histogram\n",
                        requests - errors
                    );
                    for le in ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1"] {
                        let n = if le.parse::<f64>().unwrap_or(0.0) < 0.05 { 0 } else { requests };
                        page.push_str(&format!(
                            "http_request_duration_seconds_bucket{{le=\"{le}\"}} {n}\n"
                        ));
                    }
                    for le in ["2.5", "5", "10", "+Inf"] {
                        page.push_str(&format!(
                            "http_request_duration_seconds_bucket{{le=\"{le}\"}} {requests}\n"
                        ));
                    }
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{page}",
                        page.len()
                    )
                }
                None => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_owned(),
            };
            let _ = stream.write_all(response.as_bytes());
        }
    });
    url
}

/// A webhook receiver on 127.0.0.1: collects the JSON bodies posted to it.
fn webhook() -> (String, Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(10_000) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len.min(1 << 20)];
            if reader.read_exact(&mut body).is_ok() {
                if let Ok(v) = serde_json::from_slice(&body) {
                    sink.lock().expect("lock").push(v);
                }
            }
            let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n");
        }
    });
    (url, got)
}

/// Publishes `1.0.0` (healthy), promotes it to prod and rolls it out to every host: the
/// baseline the canary tests judge their new release against.
fn roll_out_baseline(fleet: &LocalFleet, src: &Path, events: &Path) {
    tree(src, "1.0.0", events, "true");
    publish(fleet, src, "1.0.0", &["staging", "prod"]);
    let d1 = deploy(
        &fleet.api,
        serde_json::json!({"service": "web", "version": "1.0.0", "environment": "prod",
            "strategy": "rolling", "max_unavailable": "50%", "bake": "200ms", "analysis": false}),
    )
    .expect("deploy 1.0.0");
    assert_eq!(wait_final(fleet, d1.id, Duration::from_secs(90)).state, "succeeded");
}

#[test]
fn the_judge_rolls_back_a_canary_that_answers_errors() {
    judge_rolls_back(Report::Push);
}

#[test]
fn the_judge_rolls_back_a_canary_whose_prometheus_page_shows_errors() {
    judge_rolls_back(Report::Scrape);
}

#[test]
fn the_judge_rolls_back_a_canary_whose_errors_a_prometheus_server_shows() {
    judge_rolls_back(Report::Promql);
}

fn judge_rolls_back(report: Report) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (hook, posted) = webhook();
    let hosts = FleetSpec::default().hosts;
    let counters = Arc::new(std::sync::Mutex::new(vec![(0, 0); hosts]));
    let pages = (report != Report::Push).then(|| metrics_pages(counters.clone()));
    let prometheus = (report == Report::Promql).then(|| {
        Prometheus::start(&tmp.path().join("prometheus"), pages.as_deref().unwrap_or(""), hosts)
    });
    // Scraped latency comes on the Prometheus default bounds: the coordinator judges it there.
    let latency_buckets = pages.as_ref().map(|_| "prometheus".to_owned());
    let coordinator_extra = prometheus
        .as_ref()
        .map(|p| {
            format!(
                "[[prometheus]]\nservice = \"web\"\nurl = \"{}\"\nhost_label = \"host\"\n\
                 latency = 'sum by ($host_label, le) (http_request_duration_seconds_bucket{{job=\"$service\"}})'\n\
                 every = \"1s\"\n",
                p.url
            )
        })
        .unwrap_or_default();
    let scrape_web = pages.filter(|_| report == Report::Scrape);
    let spec = FleetSpec {
        webhook: Some(hook),
        scrape_web,
        latency_buckets,
        coordinator_extra,
        ..FleetSpec::default()
    };
    let fleet =
        LocalFleet::start(Path::new(EXE), &tmp.path().join("fleet"), &spec).expect("fleet starts");
    let events = tmp.path().join("events.log");
    let src = tmp.path().join("web");
    let stop = Arc::new(AtomicBool::new(false));
    let hosts = fleet.hosts.iter().map(|h| (h.dir.clone(), h.ready_str("api"))).collect();
    let service = play_service(hosts, report, counters, stop.clone());

    roll_out_baseline(&fleet, &src, &events);

    tree(&src, "1.1.0", &events, "true");
    publish(&fleet, &src, "1.1.0", &["staging", "prod"]);
    // Healthy by its health check, but 10% of its requests fail (0.5% on 1.0.0): only the
    // judge can tell, comparing the canary with the baseline hosts over the same windows.
    let d2 = deploy(
        &fleet.api,
        serde_json::json!({"service": "web", "version": "1.1.0", "environment": "prod",
            "strategy": "canary", "bake": "60s", "analysis": true}),
    )
    .expect("deploy 1.1.0");
    let done = wait_final(&fleet, d2.id, Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    let _ = service.join();
    assert_eq!(done.state, "rolled_back", "{done:?}");
    assert!(done.outcome.as_deref().unwrap_or_default().contains("analysis gate"), "{done:?}");
    assert_eq!(done.totals.assigned, 1, "only the 1% canary ran the bad release: {done:?}");
    let gate = done.gates.last().expect("a gate was judged");
    assert_eq!(gate.verdict, "fail", "{gate:?}");
    assert!(gate.canary_errors * 20 > gate.canary_requests, "{gate:?}");
    let judged = gate.evidence["metrics"].as_array().map(Vec::len);
    // Pushed counters carry no latency; the scraped page's histogram is judged too.
    let expected = if report == Report::Push { 1 } else { 2 };
    assert_eq!(judged, Some(expected), "the judge's evidence is kept: {gate:?}");
    if report == Report::Promql {
        // The hosts reported nothing: the verdict came from the Prometheus server's answers.
        let url = format!("http://{}/metrics", fleet.coordinator.ready_str("api"));
        let metrics = reqwest::blocking::get(url).and_then(|r| r.text()).expect("metrics");
        let fetched = metrics
            .lines()
            .find(|l| {
                l.starts_with("fleetwave_coordinator_promql_fetches_total{")
                    && l.contains("result=\"ok\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
        assert!(fetched.is_some_and(|n| n > 0), "{metrics}");
        assert!(
            metrics.contains("fleetwave_coordinator_promql_hosts{service=\"web\"} 8"),
            "{metrics}"
        );
    }
    fleet
        .wait("every host on 1.0.0", Duration::from_secs(30), |f| {
            versions_active(f).iter().all(|v| v.as_deref() == Some("1.0.0")).then_some(())
        })
        .expect("all back on 1.0.0");
    // Every automatic decision was posted to the webhook, the verdict among them.
    fleet
        .wait("the webhook to hear the rollback", Duration::from_secs(10), |_| {
            let got = posted.lock().expect("lock");
            let actions: Vec<&str> = got.iter().filter_map(|v| v["action"].as_str()).collect();
            (actions.contains(&"gate.verdict") && actions.contains(&"rollout.rolled_back"))
                .then_some(())
        })
        .expect("webhook notified");
    fleet.stop().expect("fleet stops");
}

#[test]
fn a_coordinator_killed_during_a_gate_continues_its_evidence() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut fleet = fleet(&tmp.path().join("fleet"));
    let counters = Arc::new(std::sync::Mutex::new(vec![(0, 0); fleet.hosts.len()]));
    let stop = Arc::new(AtomicBool::new(false));
    let hosts = fleet.hosts.iter().map(|h| (h.dir.clone(), h.ready_str("api"))).collect();
    let service = play_service(hosts, Report::Push, counters, stop.clone());
    let events = tmp.path().join("events.log");
    let src = tmp.path().join("web");
    roll_out_baseline(&fleet, &src, &events);
    // A healthy release (0.5% errors, like 1.0.0), judged over a long bake.
    tree(&src, "1.0.1", &events, "true");
    publish(&fleet, &src, "1.0.1", &["staging", "prod"]);
    let d2 = deploy(
        &fleet.api,
        serde_json::json!({"service": "web", "version": "1.0.1", "environment": "prod",
            "strategy": "canary", "bake": "120s", "analysis": true}),
    )
    .expect("deploy 1.0.1");
    let pending = |f: &LocalFleet| {
        let d = f.api.deployment(d2.id).ok()?;
        d.gates.last().filter(|g| g.verdict == "pending").cloned()
    };
    // Several looks' worth of evidence (the canary serves about 1,000 requests a second).
    let before = fleet
        .wait("the canary's gate to gather evidence", Duration::from_secs(60), |f| {
            pending(f).filter(|g| g.canary_requests >= 5_000)
        })
        .expect("gate evidence");
    fleet.coordinator.kill9();
    fleet.restart_coordinator().expect("coordinator restarts");
    let after = fleet
        .wait("the gate to be looked at again", Duration::from_secs(30), pending)
        .expect("gate after restart");
    stop.store(true, Ordering::Relaxed);
    let _ = service.join();
    assert_eq!(after.gate, before.gate, "the same gate: {after:?}");
    // Started over, the window would hold one look's requests; it holds every one so far.
    assert!(after.canary_requests >= before.canary_requests, "{before:?}\n{after:?}");
    assert!(after.baseline_requests >= before.baseline_requests, "{before:?}\n{after:?}");
    fleet.stop().expect("fleet stops");
}
