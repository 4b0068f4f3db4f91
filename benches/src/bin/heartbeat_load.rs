//! Heartbeat load on one coordinator: many simulated hosts enroll, then heartbeat at a fixed
//! rate over a small pool of HTTP/2 connections.
//!
//! Two modes:
//!
//! - **load** (default): generates `--hosts` ed25519 identities (default 50,000), enrolls them
//!   all (`--enroll-concurrency` requests in flight), opens a heartbeat session for each (as
//!   many in flight), then sends heartbeats open loop at
//!   `--rate` per second (default 10,000: every host every 5 s) for `--duration` seconds
//!   (default 30) over `--connections` tonic channels (default 32). Host `i` of the schedule is
//!   `i mod hosts`; its report grows in sequence, names one or two services (active release,
//!   health, request counters with a latency histogram) and two or three staged manifests.
//!   Every heartbeat is authenticated (its MAC under the host's session key) before the clock
//!   starts, so the generator's own CPU goes to sending. Latency runs from a request's *scheduled* send time to its answer, so a stalled
//!   coordinator shows up as latency of everything scheduled meanwhile (no coordinated
//!   omission). With `--pid`, the coordinator's CPU time (user + system, `/proc/PID/stat`) and
//!   resident memory over the load are printed too. With `--acked FILE`, the highest sequence
//!   the coordinator acknowledged per host is written to FILE.
//! - **verify** (`--verify STATE_DIR --acked FILE`): after the coordinator stopped, opens its
//!   sled store and checks that every host's stored report has at least the sequence it was
//!   acknowledged with: an acknowledged heartbeat was durable.
//!
//! ```text
//! heartbeat_load --grpc 127.0.0.1:PORT --join-token-file FILE [--pid PID] [--hosts N]
//!     [--rate PER_S] [--duration S] [--connections N] [--enroll-concurrency N] [--acked FILE]
//! heartbeat_load --verify DATA_DIR/state --acked FILE
//! ```
//!
//! `benches/scripts/heartbeat_load.sh` starts a coordinator and runs both. Every phase is
//! bounded: at most `hosts` enrollments and `rate x duration` heartbeats, each request under
//! [`REQUEST_TIMEOUT`], and the run as a whole under [`TOTAL_BUDGET`]. Talks to 127.0.0.1 only.

// A load generator's clocks are its I/O edge.
#![allow(clippy::disallowed_methods, reason = "a benchmark reads the clock: its I/O edge")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use fleetwave_proto::session::{self, Exchange, SessionKey};
use fleetwave_proto::signing;
use fleetwave_proto::v1 as pb;
use fleetwave_proto::v1::node_control_client::NodeControlClient;
use futures::StreamExt;
use libp2p_identity::Keypair;
use prost::Message;
use tokio::sync::Semaphore;
use tokio::time::{Instant, sleep_until, timeout};
use tonic::transport::{Channel, Endpoint};

/// Longest one request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the whole run (enrollment, load, drain) may take.
const TOTAL_BUDGET: Duration = Duration::from_secs(600);
/// Most heartbeats in flight; beyond it the schedule waits (and the wait counts as latency).
const MAX_IN_FLIGHT: usize = 20_000;

#[derive(Debug)]
struct Args {
    grpc: Option<SocketAddr>,
    join_token_file: Option<PathBuf>,
    pid: Option<u32>,
    hosts: usize,
    rate: u64,
    duration: Duration,
    connections: usize,
    enroll_concurrency: usize,
    acked: Option<PathBuf>,
    verify: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        grpc: None,
        join_token_file: None,
        pid: None,
        hosts: 50_000,
        rate: 10_000,
        duration: Duration::from_secs(30),
        connections: 32,
        enroll_concurrency: 512,
        acked: None,
        verify: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--grpc" => args.grpc = Some(value.parse()?),
            "--join-token-file" => args.join_token_file = Some(value.into()),
            "--pid" => args.pid = Some(value.parse()?),
            "--hosts" => args.hosts = value.parse::<usize>()?.clamp(1, 1_000_000),
            "--rate" => args.rate = value.parse::<u64>()?.clamp(1, 200_000),
            "--duration" => args.duration = Duration::from_secs(value.parse::<u64>()?.min(300)),
            "--connections" => args.connections = value.parse::<usize>()?.clamp(1, 1024),
            "--enroll-concurrency" => {
                args.enroll_concurrency = value.parse::<usize>()?.clamp(1, 10_000);
            }
            "--acked" => args.acked = Some(value.into()),
            "--verify" => args.verify = Some(value.into()),
            other => bail!("unknown flag {other}"),
        }
    }
    if let Some(addr) = args.grpc {
        ensure!(addr.ip().is_loopback(), "the load generator talks to 127.0.0.1 only");
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if let Some(state) = &args.verify {
        let acked = args.acked.as_ref().context("--verify needs --acked")?;
        return verify(state, acked);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match timeout(TOTAL_BUDGET, run(args)).await {
            Ok(result) => result,
            Err(_) => bail!("the run took longer than {TOTAL_BUDGET:?}"),
        }
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// A simulated host.
struct Host {
    keypair: Keypair,
    peer_id: Vec<u8>,
    /// One or two services.
    services: usize,
}

/// A deterministic 32-byte manifest id.
fn manifest(tag: u64) -> Vec<u8> {
    blake3::hash(&tag.to_le_bytes()).as_bytes().to_vec()
}

/// Host `index`'s `round`-th report, encoded and authenticated under `session`.
fn heartbeat(
    host: &Host,
    session: &(u64, SessionKey),
    index: usize,
    round: u64,
    base: u64,
) -> pb::HeartbeatRequest {
    let requests = 1_000 * (round + 1) + index as u64 % 97;
    let services = (0..host.services)
        .map(|s| pb::ServiceReport {
            service: ["web", "api"][s].into(),
            active: manifest(s as u64),
            standby: Vec::new(),
            health: pb::HealthState::Healthy as i32,
            standby_health: pb::HealthState::Unspecified as i32,
            activation_failed: Vec::new(),
            counters: Some(pb::RequestCounters {
                requests,
                errors: requests / 500,
                // Cumulative counts at eight bucket bounds.
                latency_buckets: (1..=8u64).map(|b| requests * b / 8).collect(),
            }),
        })
        .collect();
    let report = pb::HostReport {
        sequence: base + round,
        timestamp_ms: base + round,
        services,
        staged: (0..2 + index as u64 % 2).map(|m| manifest(100 + m)).collect(),
        stage_failed: Vec::new(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    }
    .encode_to_vec();
    let mac = session.1.mac(&report).to_vec();
    pb::HeartbeatRequest { peer_id: host.peer_id.clone(), report, session: session.0, mac }
}

/// CPU time (user + system) and resident set of a process.
#[derive(Clone, Copy, Debug)]
struct ProcStat {
    cpu: Duration,
    rss_kib: u64,
    hwm_kib: u64,
}

fn proc_stat(pid: &str) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = rustix::param::clock_ticks_per_second();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_default()
    };
    Some(ProcStat {
        cpu: Duration::from_secs_f64(ticks as f64 / hz as f64),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

/// What the requests of a phase came back with.
#[derive(Default)]
struct Outcome {
    /// Latency in microseconds of every answered request.
    latencies_us: Vec<u32>,
    /// Errors by gRPC code.
    errors: BTreeMap<String, u64>,
    /// When the last answer came.
    last: Option<Instant>,
}

impl Outcome {
    fn record(&mut self, scheduled: Instant, result: Result<(), String>) {
        let done = Instant::now();
        match result {
            Ok(()) => {
                let us = done.saturating_duration_since(scheduled).as_micros();
                self.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
            }
            Err(code) => *self.errors.entry(code).or_default() += 1,
        }
        self.last = Some(self.last.map_or(done, |l| l.max(done)));
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

async fn connect(addr: SocketAddr, n: usize) -> Result<Vec<NodeControlClient<Channel>>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        clients.push(NodeControlClient::new(channel));
    }
    Ok(clients)
}

fn code(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

#[allow(clippy::print_stdout, reason = "the report is this binary's output")]
async fn run(args: Args) -> Result<()> {
    let addr = args.grpc.context("--grpc is required")?;
    let token_file = args.join_token_file.as_ref().context("--join-token-file is required")?;
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("cannot read {}", token_file.display()))?
        .trim()
        .to_owned();
    let pid = args.pid.map(|p| p.to_string());

    // Identities.
    let started = Instant::now();
    let hosts: Arc<Vec<Host>> = Arc::new(
        (0..args.hosts)
            .map(|i| {
                let keypair = Keypair::generate_ed25519();
                let peer_id = keypair.public().to_peer_id().to_bytes();
                Host { keypair, peer_id, services: 1 + i % 2 }
            })
            .collect(),
    );
    println!("identities: {} in {:.2} s", hosts.len(), started.elapsed().as_secs_f64());

    let clients = connect(addr, args.connections).await?;
    println!("connections: {}", clients.len());

    // Enrollment.
    let started = Instant::now();
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    futures::stream::iter(0..hosts.len())
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let hosts = hosts.clone();
            let token = token.clone();
            let outcome = outcome.clone();
            async move {
                let host = &hosts[i];
                let (region, environment, name) =
                    (format!("region-{}", i % 4), "prod".to_owned(), format!("sim-{i}"));
                let timestamp_ms = now_ms();
                let message =
                    signing::enroll_message(&token, &region, &environment, &name, timestamp_ms);
                let scheduled = Instant::now();
                let result = match host.keypair.sign(&message) {
                    Ok(signature) => client
                        .enroll(pb::EnrollRequest {
                            join_token: token,
                            public_key: host.keypair.public().encode_protobuf(),
                            region,
                            environment,
                            name,
                            timestamp_ms,
                            signature,
                        })
                        .await
                        .map(drop)
                        .map_err(|s| code(&s)),
                    Err(e) => Err(format!("sign: {e}")),
                };
                if let Ok(mut o) = outcome.lock() {
                    o.record(scheduled, result);
                }
            }
        })
        .buffer_unordered(args.enroll_concurrency)
        .collect::<()>()
        .await;
    let enroll = std::mem::take(&mut *outcome.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let secs = started.elapsed().as_secs_f64();
    let mut lat = enroll.latencies_us.clone();
    lat.sort_unstable();
    println!(
        "enrolled: {} in {secs:.2} s ({:.0}/s), p50 {:.1} ms, p99 {:.1} ms, errors {:?}",
        lat.len(),
        lat.len() as f64 / secs,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        enroll.errors
    );
    ensure!(enroll.error_count() == 0, "enrollment failed: {:?}", enroll.errors);

    // A heartbeat session per host.
    let started = Instant::now();
    let sessions: Vec<Result<(u64, SessionKey), String>> = futures::stream::iter(0..hosts.len())
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let hosts = hosts.clone();
            async move {
                let host = &hosts[i];
                let exchange = Exchange::new().map_err(|e| e.to_string())?;
                let timestamp_ms = now_ms();
                let message =
                    session::open_message(&host.peer_id, exchange.public_key(), timestamp_ms);
                let signature = host.keypair.sign(&message).map_err(|e| e.to_string())?;
                let answer = client
                    .open_session(pb::OpenSessionRequest {
                        peer_id: host.peer_id.clone(),
                        exchange_key: exchange.public_key().to_vec(),
                        timestamp_ms,
                        signature,
                    })
                    .await
                    .map_err(|s| code(&s))?
                    .into_inner();
                let key = exchange
                    .open(&host.peer_id, answer.session, &answer.exchange_key, &answer.sealed_key)
                    .map_err(|e| e.to_string())?;
                Ok((answer.session, key))
            }
        })
        .buffered(args.enroll_concurrency)
        .collect()
        .await;
    let secs = started.elapsed().as_secs_f64();
    let failed = sessions.iter().filter(|s| s.is_err()).count();
    println!(
        "sessions opened: {} in {secs:.2} s ({:.0}/s), failed {failed}",
        sessions.len() - failed,
        (sessions.len() - failed) as f64 / secs
    );
    let sessions: Vec<(u64, SessionKey)> =
        sessions.into_iter().collect::<Result<_, _>>().map_err(|e| anyhow::anyhow!(e))?;

    // Every heartbeat of the run, signed ahead (on every core).
    let total = args.rate * args.duration.as_secs();
    let base = now_ms();
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    let n = hosts.len();
    let signed: Vec<pb::HeartbeatRequest> = std::thread::scope(|scope| {
        let parts: Vec<_> = (0..threads)
            .map(|t| {
                let (hosts, sessions) = (&hosts, &sessions);
                scope.spawn(move || {
                    (0..total)
                        .filter(|k| (*k as usize) % threads == t)
                        .map(|k| {
                            let index = (k as usize) % n;
                            let round = k / n as u64 + 1;
                            heartbeat(&hosts[index], &sessions[index], index, round, base)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut parts = parts
            .into_iter()
            .map(|p| p.join().map_err(|_| anyhow::anyhow!("a signing thread panicked")))
            .collect::<Result<Vec<_>>>()?;
        // Interleave back into schedule order.
        let mut out = Vec::with_capacity(total as usize);
        let mut iters: Vec<_> = parts.iter_mut().map(|p| p.drain(..)).collect();
        for k in 0..total as usize {
            out.extend(iters[k % threads].next());
        }
        Ok::<_, anyhow::Error>(out)
    })?;
    let bytes: usize = signed.iter().map(|h| h.encoded_len()).sum();
    println!(
        "heartbeats authenticated: {} ({} B average) in {:.2} s",
        signed.len(),
        bytes / signed.len().max(1),
        started.elapsed().as_secs_f64()
    );

    // The load, open loop.
    let before = pid.as_deref().and_then(proc_stat);
    let own_before = proc_stat("self");
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = Instant::now() + Duration::from_millis(100);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let acked: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(vec![0; n]));
    let mut late_sends = 0u64;
    let mut peak_rss_kib = before.map_or(0, |s| s.rss_kib);
    let mut next_sample = start;
    for (k, beat) in signed.into_iter().enumerate() {
        let scheduled = start + interval * k as u32;
        if Instant::now() < scheduled {
            sleep_until(scheduled).await;
        } else if Instant::now() > scheduled + Duration::from_millis(5) {
            late_sends += 1;
        }
        if scheduled >= next_sample {
            if let Some(s) = pid.as_deref().and_then(proc_stat) {
                peak_rss_kib = peak_rss_kib.max(s.rss_kib);
            }
            next_sample = scheduled + Duration::from_secs(1);
        }
        let permit = in_flight.clone().acquire_owned().await?;
        let mut client = clients[k % clients.len()].clone();
        let outcome = outcome.clone();
        let acked = acked.clone();
        let index = k % n;
        let sequence = base + (k / n) as u64 + 1;
        tasks.spawn(async move {
            let result = client.heartbeat(beat).await.map(drop).map_err(|s| code(&s));
            if result.is_ok() {
                if let Ok(mut a) = acked.lock() {
                    a[index] = a[index].max(sequence);
                }
            }
            if let Ok(mut o) = outcome.lock() {
                o.record(scheduled, result);
            }
            drop(permit);
        });
        // Reap finished tasks as we go, so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    let sent_by = Instant::now();
    while tasks.join_next().await.is_some() {}
    let after = pid.as_deref().and_then(proc_stat);
    let own_after = proc_stat("self");
    let load = std::mem::take(&mut *outcome.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);

    let mut lat = load.latencies_us.clone();
    lat.sort_unstable();
    let wall = load.last.unwrap_or(sent_by).saturating_duration_since(start).as_secs_f64();
    let schedule = args.duration.as_secs_f64();
    println!(
        "target: {} heartbeats/s for {:.0} s ({} hosts, each every {:.1} s), {} connections",
        args.rate,
        schedule,
        n,
        n as f64 / args.rate as f64,
        clients.len()
    );
    println!(
        "answered: {} of {total} in {wall:.2} s: {:.0}/s (sends more than 5 ms late: {late_sends})",
        lat.len(),
        lat.len() as f64 / wall
    );
    println!(
        "latency (from scheduled send): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, \
         max {:.2} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
        percentile(&lat, 1.0)
    );
    println!("errors: {} {:?}", load.error_count(), load.errors);
    if let (Some(b), Some(a)) = (before, after) {
        let cpu = a.cpu.saturating_sub(b.cpu).as_secs_f64();
        println!(
            "coordinator: CPU {cpu:.2} s over {wall:.2} s = {:.0}% of one core \
             ({:.1} us per heartbeat); RSS {:.0} MiB (peak during load {:.0} MiB, \
             high-water {:.0} MiB)",
            100.0 * cpu / wall,
            1e6 * cpu / lat.len().max(1) as f64,
            a.rss_kib as f64 / 1024.0,
            peak_rss_kib.max(a.rss_kib) as f64 / 1024.0,
            a.hwm_kib as f64 / 1024.0
        );
    }
    if let (Some(b), Some(a)) = (own_before, own_after) {
        let cpu = a.cpu.saturating_sub(b.cpu).as_secs_f64();
        println!("generator: CPU {cpu:.2} s = {:.0}% of one core", 100.0 * cpu / wall);
    }
    if let Some(path) = &args.acked {
        let acked = acked.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let mut text = String::with_capacity(n * 64);
        for (host, seq) in hosts.iter().zip(acked.iter()) {
            let peer = libp2p_identity::PeerId::from_bytes(&host.peer_id)?;
            text.push_str(&format!("{peer} {seq}\n"));
        }
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Checks that the stopped coordinator's store holds every acknowledged report.
#[allow(clippy::print_stdout, reason = "the report is this binary's output")]
fn verify(state: &std::path::Path, acked: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(acked)
        .with_context(|| format!("cannot read {}", acked.display()))?;
    let store = fleetwave_coordinator::store::Store::open(state)
        .with_context(|| format!("cannot open the store in {}", state.display()))?;
    let numbers: BTreeMap<String, u64> =
        store.hosts()?.into_iter().map(|h| (h.peer_id, h.number)).collect();
    let stored: BTreeMap<u64, u64> =
        store.host_states()?.into_iter().map(|(n, a)| (n, a.sequence)).collect();
    let (mut checked, mut missing) = (0u64, 0u64);
    for line in text.lines() {
        let Some((peer, seq)) = line.split_once(' ') else { continue };
        let seq: u64 = seq.parse()?;
        if seq == 0 {
            continue;
        }
        checked += 1;
        let have = numbers.get(peer).and_then(|n| stored.get(n)).copied().unwrap_or_default();
        if have < seq {
            missing += 1;
        }
    }
    println!(
        "persisted: {} of {checked} hosts' last acknowledged report in the store ({} hosts \
         enrolled)",
        checked - missing,
        numbers.len()
    );
    ensure!(missing == 0, "{missing} acknowledged reports are not in the store");
    Ok(())
}
