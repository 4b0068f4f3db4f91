//! Behaviour of the swarm scheduler through its public API, on a virtual clock.
//!
//! Two harnesses:
//! - `Net`: several real schedulers (hosts, a cache, an origin) wired together in memory, with
//!   latency, upload and write times, a fleet-wide permit authority and fault injection (corrupt
//!   uploads, dropped requests, disconnects). Every command is checked against the scheduler's
//!   limits as it is emitted.
//! - Single-scheduler scenarios that feed crafted events and assert on the exact commands.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fleetwave_node::swarm::{
    BanReason, Bitfield, ChunkIndex, ChunkTable, Command, EventError, OriginPermit, PeerId,
    PeerKind, PieceAction, PieceOutcome, RejectReason, Scheduler, SetupError, Source, SwarmConfig,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CHUNK_LEN: u32 = 1000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn table(n: u32) -> ChunkTable {
    ChunkTable::from_lengths(vec![CHUNK_LEN; n as usize]).expect("table")
}

fn bits(n: u32, indices: impl IntoIterator<Item = ChunkIndex>) -> Bitfield {
    Bitfield::from_indices(n, indices).expect("indices in range")
}

// ---------------------------------------------------------------------------------------------
// The in-memory network of real schedulers.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PermitModel {
    None,
    Asked,
    Held,
}

#[derive(Debug)]
enum Msg {
    Bitfield(Bitfield),
    Have(ChunkIndex),
    Request(ChunkIndex),
    Cancel(ChunkIndex),
    Piece(ChunkIndex, PieceOutcome),
    Reject(ChunkIndex, RejectReason),
}

#[derive(Debug)]
enum Ev {
    Deliver { from: usize, to: usize, msg: Msg },
    Written { node: usize, index: ChunkIndex },
    UploadDone { node: usize, peer: usize, index: ChunkIndex },
    Permit { node: usize },
    Cut { a: usize, b: usize },
}

struct Node {
    kind: PeerKind,
    core: Scheduler,
    config: SwarmConfig,
    initial: Bitfield,
    /// Serves bytes that fail their hash.
    corrupt: bool,
    /// Fraction of incoming requests silently dropped.
    loss: f64,
    log: Vec<Command>,
    timer: Option<Duration>,
    served: u64,
    /// Uploads running, as the shell would track them; a dropped connection aborts its own.
    uploading: Vec<(usize, ChunkIndex)>,
    /// Our model of this node's outstanding requests, per peer, from its commands alone.
    outstanding: BTreeMap<usize, BTreeSet<ChunkIndex>>,
    bans: BTreeSet<usize>,
    permit: PermitModel,
    origin_requests: u64,
    completed_at: Option<Duration>,
}

struct Net {
    now: Duration,
    nodes: Vec<Node>,
    queue: BTreeMap<(Duration, u64), Ev>,
    seq: u64,
    links: BTreeSet<(usize, usize)>,
    latency: Duration,
    upload_time: Duration,
    write_time: Duration,
    permit_cap: usize,
    permit_holders: BTreeSet<usize>,
    permits_denied: u64,
    rng: ChaCha8Rng,
    steps: u64,
}

fn id(i: usize) -> PeerId {
    PeerId(i as u64)
}

fn index_of(peer: PeerId) -> usize {
    peer.0 as usize
}

impl Net {
    fn new(seed: u64) -> Self {
        Self {
            now: Duration::ZERO,
            nodes: Vec::new(),
            queue: BTreeMap::new(),
            seq: 0,
            links: BTreeSet::new(),
            // About a 256 KiB chunk on a 50 Mbit/s link, one LAN hop, one disk write.
            latency: ms(1),
            upload_time: ms(40),
            write_time: ms(2),
            permit_cap: 2,
            permit_holders: BTreeSet::new(),
            permits_denied: 0,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed),
            steps: 0,
        }
    }

    fn add(&mut self, n: u32, kind: PeerKind, local: Bitfield, config: SwarmConfig, seed: u64) {
        let core =
            Scheduler::new(self.now, table(n), &local, config, seed).expect("valid scheduler");
        self.nodes.push(Node {
            kind,
            core,
            config,
            initial: local,
            corrupt: false,
            loss: 0.0,
            log: Vec::new(),
            timer: None,
            served: 0,
            uploading: Vec::new(),
            outstanding: BTreeMap::new(),
            bans: BTreeSet::new(),
            permit: PermitModel::None,
            origin_requests: 0,
            completed_at: None,
        });
        let i = self.nodes.len() - 1;
        self.drain(i);
    }

    fn link(a: usize, b: usize) -> (usize, usize) {
        (a.min(b), a.max(b))
    }

    fn linked(&self, a: usize, b: usize) -> bool {
        self.links.contains(&Self::link(a, b))
    }

    fn connect(&mut self, a: usize, b: usize) {
        self.links.insert(Self::link(a, b));
        for (x, y) in [(a, b), (b, a)] {
            let kind = self.nodes[y].kind;
            self.nodes[x].core.handle_connected(self.now, id(y), kind).expect("connect");
            let bitfield = self.nodes[x].core.bitfield().clone();
            self.send(x, y, Msg::Bitfield(bitfield), self.latency);
            self.drain(x);
        }
    }

    fn connect_all(&mut self) {
        for a in 0..self.nodes.len() {
            for b in a + 1..self.nodes.len() {
                let seeders = [PeerKind::Cache, PeerKind::Origin];
                if seeders.contains(&self.nodes[a].kind) && seeders.contains(&self.nodes[b].kind) {
                    continue;
                }
                self.connect(a, b);
            }
        }
    }

    fn push(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg, delay: Duration) {
        self.push(self.now + delay, Ev::Deliver { from, to, msg });
    }

    /// Severs the link both ways, as a dropped connection does.
    fn cut(&mut self, a: usize, b: usize) {
        if !self.links.remove(&Self::link(a, b)) {
            return;
        }
        for (x, y) in [(a, b), (b, a)] {
            self.nodes[x].outstanding.remove(&y);
            self.nodes[x].uploading.retain(|&(peer, _)| peer != y);
            self.nodes[x].core.handle_disconnected(self.now, id(y)).expect("disconnect");
            self.drain(x);
        }
    }

    fn drain(&mut self, i: usize) {
        while let Some(cmd) = self.nodes[i].core.poll_command() {
            self.nodes[i].log.push(cmd.clone());
            self.apply(i, cmd);
        }
        self.check_in_flight(i);
        let timer = self.nodes[i].core.poll_timeout();
        if let Some(t) = timer {
            assert!(t > self.now || self.nodes[i].timer.is_none(), "timer at {t:?} is not ahead");
        }
        self.nodes[i].timer = timer;
    }

    /// The scheduler's own in-flight counts agree with what its commands say.
    fn check_in_flight(&self, i: usize) {
        let node = &self.nodes[i];
        let (mut total, mut to_region) = (0, 0);
        for (peer, score) in node.core.peer_scores() {
            let model = node.outstanding.get(&index_of(peer)).map_or(0, BTreeSet::len);
            assert_eq!(score.in_flight as usize, model, "node {i}: in flight to {peer}");
            total += model;
            if score.kind == PeerKind::Peer {
                to_region += model;
            }
        }
        assert_eq!(node.core.progress().in_flight as usize, total, "node {i}: total in flight");
        // The shared budget covers region peers; caches and the origin have their own limits.
        assert!(to_region <= node.config.max_in_flight_total as usize);
    }

    fn apply(&mut self, i: usize, cmd: Command) {
        let now = self.now;
        match cmd {
            Command::Request { peer, chunks } => {
                let j = index_of(peer);
                assert!(!chunks.is_empty(), "empty request");
                assert!(self.linked(i, j), "node {i} asks unconnected {j}");
                assert!(!self.nodes[i].bans.contains(&j), "node {i} asks banned {j}");
                let target = self.nodes[j].kind;
                if target == PeerKind::Origin {
                    assert_eq!(self.nodes[i].permit, PermitModel::Held, "origin without permit");
                    let cache_connected = (0..self.nodes.len())
                        .any(|k| self.nodes[k].kind == PeerKind::Cache && self.linked(i, k));
                    assert!(!cache_connected, "node {i} asks the origin while a cache is up");
                    self.nodes[i].origin_requests += chunks.len() as u64;
                }
                let limit = match target {
                    PeerKind::Peer => self.nodes[i].config.max_in_flight_per_peer,
                    _ => self.nodes[i].config.max_in_flight_back_to_source,
                };
                for &c in &chunks {
                    assert!(!self.nodes[i].initial.contains(c), "node {i} asks for disk chunk {c}");
                    assert!(!self.nodes[i].core.has(c), "node {i} asks for held chunk {c}");
                    assert!(self.nodes[j].core.has(c), "node {i} asks {j} for {c} it lacks");
                    let fresh = self.nodes[i].outstanding.entry(j).or_default().insert(c);
                    assert!(fresh, "node {i} asks {j} twice for {c}");
                    if self.rng.gen_bool(self.nodes[j].loss) {
                        continue;
                    }
                    self.send(i, j, Msg::Request(c), self.latency);
                }
                let to_peer = self.nodes[i].outstanding[&j].len();
                assert!(to_peer <= limit as usize, "node {i}: {to_peer} in flight to {j}");
            }
            Command::Cancel { peer, index } => {
                let j = index_of(peer);
                let removed = self.nodes[i].outstanding.entry(j).or_default().remove(&index);
                assert!(removed, "node {i} cancels {index} at {j}, never asked");
                self.send(i, j, Msg::Cancel(index), self.latency);
            }
            Command::Announce { index, peers } => {
                assert!(self.nodes[i].core.has(index));
                for peer in peers {
                    let j = index_of(peer);
                    assert!(j != i, "node {i} announces to itself");
                    if self.linked(i, j) {
                        self.send(i, j, Msg::Have(index), self.latency);
                    }
                }
            }
            Command::Serve { peer, index } => {
                let j = index_of(peer);
                assert!(self.nodes[i].core.has(index), "node {i} serves {index} it lacks");
                assert!(!self.nodes[i].bans.contains(&j), "node {i} serves banned {j}");
                self.nodes[i].uploading.push((j, index));
                let slots = self.nodes[i].config.upload_slots as usize;
                assert!(self.nodes[i].uploading.len() <= slots, "node {i} exceeds upload slots");
                self.nodes[i].served += 1;
                let outcome = if self.nodes[i].corrupt {
                    PieceOutcome::HashMismatch
                } else {
                    PieceOutcome::Verified
                };
                self.push(now + self.upload_time, Ev::UploadDone { node: i, peer: j, index });
                let delay = self.upload_time + self.latency;
                self.send(i, j, Msg::Piece(index, outcome), delay);
            }
            Command::Reject { peer, index, reason } => {
                let j = index_of(peer);
                self.send(i, j, Msg::Reject(index, reason), self.latency);
            }
            Command::Ban { peer, reason } => {
                let j = index_of(peer);
                assert!(matches!(reason, BanReason::HashMismatch { .. }));
                assert!(self.nodes[j].corrupt, "node {i} bans honest {j}");
                assert!(self.nodes[i].bans.insert(j), "node {i} bans {j} twice");
                // The shell drops the connection at once, aborting uploads to it.
                self.nodes[i].outstanding.remove(&j);
                self.nodes[i].uploading.retain(|&(peer, _)| peer != j);
                self.push(now, Ev::Cut { a: i, b: j });
            }
            Command::RequestOriginPermit => {
                assert_eq!(self.nodes[i].permit, PermitModel::None, "node {i} asks twice");
                self.nodes[i].permit = PermitModel::Asked;
                self.push(now + self.latency, Ev::Permit { node: i });
            }
            Command::ReleaseOriginPermit => {
                assert_eq!(self.nodes[i].permit, PermitModel::Held, "node {i} releases nothing");
                self.nodes[i].permit = PermitModel::None;
                self.permit_holders.remove(&i);
            }
            Command::Withdraw { index } => {
                panic!("node {i} withdraws chunk {index} without forward_arriving")
            }
            Command::Complete => {
                assert!(self.nodes[i].completed_at.is_none(), "node {i} completes twice");
                assert!(self.nodes[i].core.is_complete());
                self.nodes[i].completed_at = Some(now);
            }
        }
    }

    fn deliver(&mut self, from: usize, to: usize, msg: Msg) {
        // Messages already on the wire when a connection is dropped (or its peer banned) are lost.
        if !self.linked(from, to) || self.nodes[to].bans.contains(&from) {
            return;
        }
        let now = self.now;
        let peer = id(from);
        let core = &mut self.nodes[to].core;
        match msg {
            Msg::Bitfield(b) => core.handle_bitfield(now, peer, b).expect("bitfield"),
            Msg::Have(c) => core.handle_have(now, peer, c).expect("have"),
            Msg::Request(c) => core.handle_request(now, peer, c).expect("request"),
            Msg::Cancel(c) => core.handle_cancel(now, peer, c).expect("cancel"),
            Msg::Reject(c, reason) => {
                assert_ne!(reason, RejectReason::NotHave, "{to} asked {from} for missing {c}");
                self.nodes[to].outstanding.entry(from).or_default().remove(&c);
                let core = &mut self.nodes[to].core;
                core.handle_rejected(now, peer, c, reason).expect("rejected");
            }
            Msg::Piece(c, outcome) => {
                self.nodes[to].outstanding.entry(from).or_default().remove(&c);
                let core = &mut self.nodes[to].core;
                let action = core.handle_piece(now, peer, c, outcome).expect("piece");
                if outcome == PieceOutcome::HashMismatch {
                    assert_eq!(action, PieceAction::Discard, "a corrupt chunk was kept");
                }
                if action == PieceAction::Write {
                    self.push(now + self.write_time, Ev::Written { node: to, index: c });
                }
            }
        }
        self.drain(to);
    }

    fn step(&mut self) -> bool {
        self.steps += 1;
        assert!(self.steps < 2_000_000, "runaway simulation");
        let timer = (0..self.nodes.len()).filter_map(|i| self.nodes[i].timer.map(|t| (t, i))).min();
        let event = self.queue.first_key_value().map(|(&(t, _), _)| t);
        match (timer, event) {
            (None, None) => false,
            (Some((t, i)), e) if e.is_none_or(|e| t <= e) => {
                self.now = self.now.max(t);
                self.nodes[i].timer = None;
                self.nodes[i].core.handle_timeout(self.now);
                self.drain(i);
                true
            }
            _ => {
                let Some(((t, _), ev)) = self.queue.pop_first() else { return false };
                self.now = t;
                self.handle(ev);
                true
            }
        }
    }

    fn handle(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Deliver { from, to, msg } => self.deliver(from, to, msg),
            Ev::Written { node, index } => {
                self.nodes[node].core.handle_written(now, index).expect("written");
                self.drain(node);
            }
            Ev::UploadDone { node, peer, index } => {
                let uploads = &mut self.nodes[node].uploading;
                let Some(at) = uploads.iter().position(|&u| u == (peer, index)) else {
                    return; // aborted with its connection
                };
                uploads.swap_remove(at);
                self.nodes[node].core.handle_upload_done(now, id(peer), index).expect("done");
                self.drain(node);
            }
            Ev::Permit { node } => {
                if self.permit_holders.len() < self.permit_cap {
                    self.permit_holders.insert(node);
                    self.nodes[node].permit = PermitModel::Held;
                    self.nodes[node].core.handle_permit_granted(now);
                } else {
                    self.permits_denied += 1;
                    self.nodes[node].permit = PermitModel::None;
                    self.nodes[node].core.handle_permit_denied(now);
                }
                self.drain(node);
            }
            Ev::Cut { a, b } => self.cut(a, b),
        }
    }

    /// Runs until every node in `must` has completed (panics after `limit` of virtual time).
    fn run_until_complete(&mut self, must: &[usize], limit: Duration) {
        while !must.iter().all(|&i| self.nodes[i].core.is_complete()) {
            assert!(self.now <= limit, "not complete by {limit:?}: {:?}", self.report());
            assert!(self.step(), "stalled at {:?}: {:?}", self.now, self.report());
        }
    }

    fn report(&self) -> Vec<String> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{i}: {:?} {:?}", n.core, n.core.progress()))
            .collect()
    }
}

/// `hosts` empty hosts plus one full seeder of `seeder` kind (node 0) with `seeder_config`.
fn swarm_with(
    seed: u64,
    n: u32,
    hosts: usize,
    seeder: PeerKind,
    seeder_config: SwarmConfig,
) -> Net {
    let mut net = Net::new(seed);
    net.add(n, seeder, Bitfield::full(n), seeder_config, seed);
    for h in 0..hosts {
        net.add(n, PeerKind::Peer, Bitfield::new(n), SwarmConfig::default(), seed + 1 + h as u64);
    }
    net
}

fn swarm(seed: u64, n: u32, hosts: usize, seeder: PeerKind) -> Net {
    swarm_with(seed, n, hosts, seeder, SwarmConfig::default())
}

/// What the cache and origin roles configure: super-seeding.
fn source_config() -> SwarmConfig {
    SwarmConfig { seed_window: Duration::from_secs(1), ..SwarmConfig::default() }
}

#[test]
fn origin_and_six_hosts_complete_and_the_origin_serves_about_one_copy() {
    let n = 256;
    let mut net = swarm(7, n, 6, PeerKind::Origin);
    net.connect_all();
    let hosts: Vec<usize> = (1..=6).collect();
    net.run_until_complete(&hosts, Duration::from_secs(120));

    let origin_served = net.nodes[0].served;
    let mut from_origin = 0;
    let mut from_peers = 0;
    for &h in &hosts {
        let p = net.nodes[h].core.progress();
        assert_eq!(p.done().chunks, u64::from(n));
        assert_eq!(p.done().bytes, u64::from(n * CHUNK_LEN));
        assert_eq!(p.from_source(Source::Disk).chunks, 0);
        assert_eq!(p.cache.chunks, 0);
        from_origin += p.origin.chunks;
        from_peers += p.peer.chunks;
        assert_eq!(net.nodes[h].permit, PermitModel::None, "host {h} kept the permit");
    }
    assert!(from_origin <= origin_served);
    assert_eq!(from_origin + from_peers, 6 * u64::from(n));
    // The origin serves about one copy (without super-seeding, hosts that pick the same
    // region-rare chunk before either announces it both get it); the hosts trade the other five.
    assert!(origin_served >= u64::from(n), "every chunk leaves the origin at least once");
    assert!(
        origin_served <= u64::from(n) * 13 / 10,
        "origin served {origin_served} chunks for a {n}-chunk artifact"
    );
    let host_uploads: u64 = hosts.iter().map(|&h| net.nodes[h].served).sum();
    assert!(host_uploads >= 6 * u64::from(n) - origin_served);
    assert!(net.permit_holders.is_empty());
}

#[test]
fn a_super_seeding_cache_serves_the_region_exactly_once_and_the_origin_is_never_asked() {
    let n = 200;
    let mut net = swarm_with(11, n, 12, PeerKind::Cache, source_config());
    net.add(n, PeerKind::Origin, Bitfield::full(n), source_config(), 99);
    net.connect_all();
    let hosts: Vec<usize> = (1..=12).collect();
    net.run_until_complete(&hosts, Duration::from_secs(120));

    let origin = net.nodes.len() - 1;
    assert_eq!(net.nodes[origin].served, 0);
    for &h in &hosts {
        let node = &net.nodes[h];
        assert_eq!(node.origin_requests, 0);
        assert!(!node.log.contains(&Command::RequestOriginPermit));
        assert_eq!(node.core.progress().origin.chunks, 0);
    }
    // Every chunk left the cache exactly once; hosts that asked for a chunk it had just sent
    // elsewhere were told so and took it from a peer.
    assert_eq!(net.nodes[0].served, u64::from(n));
    let seeded = net.nodes[0]
        .log
        .iter()
        .filter(|c| matches!(c, Command::Reject { reason: RejectReason::SeededRecently, .. }))
        .count();
    assert!(seeded > 0);
    let from_cache: u64 = hosts.iter().map(|&h| net.nodes[h].core.progress().cache.chunks).sum();
    assert_eq!(from_cache, u64::from(n));
}

#[test]
fn the_origin_takes_over_under_a_permit_when_the_cache_goes_away() {
    let n = 200;
    let mut net = swarm(5, n, 4, PeerKind::Cache);
    net.add(n, PeerKind::Origin, Bitfield::full(n), SwarmConfig::default(), 55);
    net.permit_cap = 1;
    net.connect_all();
    // Let the hosts get a start from the cache, then take the cache away.
    while net.now < ms(600) {
        assert!(net.step());
    }
    for h in 1..=4 {
        net.push(net.now, Ev::Cut { a: 0, b: h });
    }
    let hosts: Vec<usize> = (1..=4).collect();
    net.run_until_complete(&hosts, Duration::from_secs(120));

    let origin = net.nodes.len() - 1;
    assert!(net.nodes[origin].served > 0, "nobody fell back to the origin");
    let asked = hosts.iter().filter(|&&h| net.nodes[h].log.contains(&Command::RequestOriginPermit));
    assert!(asked.count() > 1);
    // With a cap of one, hosts had to wait for the permit: denied, then asked again later.
    assert!(net.permits_denied > 0);
    let from_cache: u64 = hosts.iter().map(|&h| net.nodes[h].core.progress().cache.chunks).sum();
    let from_origin: u64 = hosts.iter().map(|&h| net.nodes[h].core.progress().origin.chunks).sum();
    assert!(from_cache > 0 && from_origin > 0);
    assert!(net.permit_holders.is_empty());
}

#[test]
fn a_corrupt_peer_is_banned_once_by_each_host_and_everyone_else_completes() {
    let n = 200;
    let mut net = swarm(3, n, 6, PeerKind::Origin);
    net.nodes[3].corrupt = true;
    net.connect_all();
    let honest: Vec<usize> = vec![1, 2, 4, 5, 6];
    net.run_until_complete(&honest, Duration::from_secs(120));

    let mut banned_by = 0;
    for &h in &honest {
        let node = &net.nodes[h];
        let bans: Vec<&Command> =
            node.log.iter().filter(|c| matches!(c, Command::Ban { .. })).collect();
        assert!(bans.len() <= 1, "host {h}: {bans:?}");
        if let Some(Command::Ban { peer, .. }) = bans.first() {
            assert_eq!(*peer, id(3));
            banned_by += 1;
            assert!(node.core.is_banned(id(3)));
            assert!(node.core.peer_score(id(3)).is_none(), "the banned peer is forgotten");
            assert_eq!(node.core.progress().bans, 1);
            // Nothing was requested from it after the ban.
            let after = node.log.iter().skip_while(|c| !matches!(c, Command::Ban { .. }));
            assert!(
                !after
                    .clone()
                    .any(|c| matches!(c, Command::Request { peer, .. } if *peer == id(3)))
            );
        }
        assert_eq!(node.core.progress().done().chunks, u64::from(n));
    }
    assert!(banned_by >= 1, "nobody caught the corrupt peer");
    // A banned peer cannot come back.
    let host = honest.iter().copied().find(|&h| net.nodes[h].bans.contains(&3)).expect("a ban");
    let now = net.now;
    let err = net.nodes[host].core.handle_connected(now, id(3), PeerKind::Peer);
    assert_eq!(err, Err(EventError::Banned { peer: id(3) }));
    net.nodes[host].core.handle_request(now, id(3), 0).expect("request from a banned peer");
    assert_eq!(
        net.nodes[host].core.poll_command(),
        Some(Command::Reject { peer: id(3), index: 0, reason: RejectReason::Banned })
    );
}

fn scenario_logs(seed: u64) -> Vec<Vec<Command>> {
    let n = 120;
    let mut net = swarm(seed, n, 5, PeerKind::Origin);
    net.nodes[2].corrupt = true;
    net.nodes[4].loss = 0.2;
    net.connect_all();
    net.run_until_complete(&[1, 3, 4, 5], Duration::from_secs(300));
    net.nodes.into_iter().map(|n| n.log).collect()
}

#[test]
fn same_seed_and_events_give_the_same_commands() {
    let a = scenario_logs(42);
    let b = scenario_logs(42);
    assert!(a.iter().map(Vec::len).sum::<usize>() > 500);
    assert_eq!(a, b);
    assert_ne!(a, scenario_logs(43), "the seed should matter");
}

#[test]
fn chunks_on_disk_are_never_requested() {
    let n = 160;
    let mut net = Net::new(9);
    net.add(n, PeerKind::Origin, Bitfield::full(n), SwarmConfig::default(), 9);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for h in 0..4 {
        let local = bits(n, (0..n).filter(|_| rng.gen_bool(0.5)));
        net.add(n, PeerKind::Peer, local, SwarmConfig::default(), 100 + h);
    }
    net.connect_all();
    net.run_until_complete(&[1, 2, 3, 4], Duration::from_secs(120));
    for h in 1..=4 {
        let node = &net.nodes[h];
        let p = node.core.progress();
        assert_eq!(p.disk.chunks, u64::from(node.initial.count_ones()));
        assert_eq!(p.done().chunks, u64::from(n));
        // (Net::apply asserts on every request that no disk chunk is asked for.)
        let announced = node.log.iter().filter(|c| matches!(c, Command::Announce { .. })).count();
        assert_eq!(announced as u32, n - node.initial.count_ones(), "disk chunks not announced");
    }
}

#[test]
fn lossy_hosts_time_out_and_everyone_still_completes() {
    let n = 120;
    let mut net = swarm(21, n, 5, PeerKind::Origin);
    net.nodes[2].loss = 0.5;
    net.connect_all();
    net.run_until_complete(&[1, 2, 3, 4, 5], Duration::from_secs(600));
    let timeouts: u64 = (1..=5).map(|h| net.nodes[h].core.progress().timeouts).sum();
    assert!(timeouts > 0);
    let score = net.nodes[1].core.peer_score(id(2)).expect("still connected");
    assert!(score.timeouts > 0);
}

// ---------------------------------------------------------------------------------------------
// Single-scheduler scenarios.

fn drain(core: &mut Scheduler) -> Vec<Command> {
    std::iter::from_fn(|| core.poll_command()).collect()
}

#[test]
fn a_chunk_is_announced_only_to_the_peers_not_known_to_hold_it() {
    let n = 2;
    let mut core =
        Scheduler::new(ms(0), table(n), &Bitfield::new(n), quiet_config(), 4).expect("new");
    // a and b hold chunk 0 (a's bitfield, b's have), c has said nothing yet, d holds chunk 1;
    // the cache is assumed to have everything, which is no reason to keep it uninformed.
    let (a, b, c, d, cache) = (PeerId(1), PeerId(2), PeerId(3), PeerId(4), PeerId(9));
    for p in [a, b, c, d] {
        core.handle_connected(ms(0), p, PeerKind::Peer).expect("connect");
    }
    core.handle_bitfield(ms(0), a, bits(n, [0])).expect("bits");
    core.handle_bitfield(ms(0), b, bits(n, [])).expect("bits");
    core.handle_bitfield(ms(0), d, bits(n, [1])).expect("bits");
    core.handle_have(ms(1), b, 0).expect("have");
    // Connected once no chunk is region-rare, so it is asked for nothing.
    core.handle_connected(ms(1), cache, PeerKind::Cache).expect("connect");
    let asked = requests(&drain(&mut core));
    let (from, _) = asked.iter().find(|(_, chunks)| chunks.contains(&0)).expect("0 asked");
    assert!(*from == a || *from == b, "chunk 0 asked of {from:?}");
    let action = core.handle_piece(ms(2), *from, 0, PieceOutcome::Verified).expect("piece");
    assert_eq!(action, PieceAction::Write);
    drain(&mut core);
    core.handle_written(ms(3), 0).expect("written");
    let announced: Vec<_> = drain(&mut core)
        .into_iter()
        .filter_map(|cmd| match cmd {
            Command::Announce { index, peers } => Some((index, peers)),
            _ => None,
        })
        .collect();
    assert_eq!(announced, vec![(0, vec![c, d, cache])]);
}

fn quiet_config() -> SwarmConfig {
    SwarmConfig {
        random_first_chunks: 0,
        endgame_max_requests: 1,
        back_to_source_delay: Duration::ZERO,
        ..SwarmConfig::default()
    }
}

fn requests(cmds: &[Command]) -> Vec<(PeerId, Vec<ChunkIndex>)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Request { peer, chunks } => Some((*peer, chunks.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn rarest_first_picks_the_rarest_chunks() {
    let n = 64;
    let config = SwarmConfig { max_in_flight_per_peer: 4, ..quiet_config() };
    let mut core = Scheduler::new(ms(0), table(n), &Bitfield::new(n), config, 1).expect("new");
    // Peer k holds the chunks c with c % 4 < k: class 0 is everywhere, class 3 only at peer 4.
    // Each peer connects after those with fewer chunks, so when it arrives the chunks only it
    // has are the rarest: class k - 1.
    for k in 1..=4u32 {
        let peer = PeerId(u64::from(k));
        core.handle_connected(ms(1), peer, PeerKind::Peer).expect("connect");
        core.handle_bitfield(ms(1), peer, bits(n, (0..n).filter(|c| c % 4 < k))).expect("bits");
        let reqs = requests(&drain(&mut core));
        assert_eq!(reqs.len(), 1);
        let (to, chunks) = &reqs[0];
        assert_eq!(*to, peer);
        assert_eq!(chunks.len(), 4);
        assert!(chunks.iter().all(|c| c % 4 == k - 1), "peer {k} asked for {chunks:?}");
    }
    let score = core.peer_score(PeerId(4)).expect("connected");
    assert_eq!(score.in_flight, 4);
    assert_eq!(score.advertised, n);
}

#[test]
fn a_have_brings_a_request_only_for_a_chunk_nobody_was_asked_for() {
    let n = 8;
    let config = SwarmConfig { max_in_flight_per_peer: 1, ..quiet_config() };
    let mut core = Scheduler::new(ms(0), table(n), &Bitfield::new(n), config, 2).expect("new");
    let (a, b) = (PeerId(1), PeerId(2));
    core.handle_connected(ms(0), a, PeerKind::Peer).expect("connect");
    core.handle_connected(ms(0), b, PeerKind::Peer).expect("connect");
    core.handle_bitfield(ms(0), b, bits(n, [5, 6])).expect("bits");
    let first = requests(&drain(&mut core));
    assert_eq!(first.len(), 1);
    let taken = first[0].1[0];
    let other = if taken == 5 { 6 } else { 5 };
    // Peer a announces the chunk already asked of b: nothing new to ask. Then the other one,
    // which nobody was asked for yet: a is asked at once.
    core.handle_have(ms(1), a, taken).expect("have");
    assert!(requests(&drain(&mut core)).is_empty(), "taken chunk is already requested");
    core.handle_have(ms(1), a, other).expect("have");
    assert_eq!(requests(&drain(&mut core)), vec![(a, vec![other])]);
}

#[test]
fn ties_break_by_the_seed() {
    let n = 64;
    let first_request = |seed| {
        let mut core =
            Scheduler::new(ms(0), table(n), &Bitfield::new(n), quiet_config(), seed).expect("new");
        core.handle_connected(ms(0), PeerId(1), PeerKind::Peer).expect("connect");
        core.handle_bitfield(ms(0), PeerId(1), Bitfield::full(n)).expect("bits");
        requests(&drain(&mut core))
    };
    assert_eq!(first_request(1), first_request(1));
    assert!((2..6).any(|seed| first_request(seed) != first_request(1)));
}

#[test]
fn endgame_requests_duplicates_and_cancels_them() {
    let n = 4;
    let config = SwarmConfig { endgame_threshold: 4, endgame_max_requests: 2, ..quiet_config() };
    let mut core = Scheduler::new(ms(0), table(n), &Bitfield::new(n), config, 3).expect("new");
    let (a, b, c) = (PeerId(1), PeerId(2), PeerId(3));
    for p in [a, b, c] {
        core.handle_connected(ms(0), p, PeerKind::Peer).expect("connect");
    }
    core.handle_bitfield(ms(0), a, Bitfield::full(n)).expect("bits");
    let to_a = requests(&drain(&mut core));
    assert_eq!(to_a.len(), 1);
    assert_eq!(to_a[0].1.len(), 4);
    core.handle_bitfield(ms(0), b, Bitfield::full(n)).expect("bits");
    let to_b = requests(&drain(&mut core));
    assert_eq!(to_b.len(), 1, "endgame duplicates go to b");
    let mut dup: Vec<ChunkIndex> = to_b[0].1.clone();
    dup.sort_unstable();
    assert_eq!(dup, vec![0, 1, 2, 3]);
    // Two requests per chunk at most: c gets nothing.
    core.handle_bitfield(ms(0), c, Bitfield::full(n)).expect("bits");
    assert!(requests(&drain(&mut core)).is_empty());

    let got = core.handle_piece(ms(5), a, 2, PieceOutcome::Verified).expect("piece");
    assert_eq!(got, PieceAction::Write);
    assert_eq!(drain(&mut core), vec![Command::Cancel { peer: b, index: 2 }]);
    let got = core.handle_piece(ms(6), b, 0, PieceOutcome::Verified).expect("piece");
    assert_eq!(got, PieceAction::Write);
    assert_eq!(drain(&mut core), vec![Command::Cancel { peer: a, index: 0 }]);
    // A copy that crossed the cancel is discarded, and counted.
    let late = core.handle_piece(ms(7), b, 2, PieceOutcome::Verified).expect("piece");
    assert_eq!(late, PieceAction::Discard);
    assert_eq!(core.progress().duplicates.chunks, 1);
}

#[test]
fn large_chunks_start_the_endgame_at_its_byte_limit() {
    let n = 4;
    let config = SwarmConfig {
        endgame_threshold: 4,
        endgame_bytes: u64::from(2 * CHUNK_LEN),
        endgame_max_requests: 2,
        ..quiet_config()
    };
    let mut core = Scheduler::new(ms(0), table(n), &Bitfield::new(n), config, 3).expect("new");
    let (a, b) = (PeerId(1), PeerId(2));
    for p in [a, b] {
        core.handle_connected(ms(0), p, PeerKind::Peer).expect("connect");
    }
    core.handle_bitfield(ms(0), a, Bitfield::full(n)).expect("bits");
    assert_eq!(requests(&drain(&mut core))[0].1.len(), 4);
    // Four chunks wanted is within the count but over the bytes: no duplicates.
    core.handle_bitfield(ms(0), b, Bitfield::full(n)).expect("bits");
    assert!(requests(&drain(&mut core)).is_empty());
    for index in [0, 1] {
        core.handle_piece(ms(5), a, index, PieceOutcome::Verified).expect("piece");
    }
    // Two chunks (2,000 bytes) wanted: the endgame asks b for them too.
    let dup = requests(&drain(&mut core));
    let to_b: Vec<ChunkIndex> =
        dup.iter().filter(|(p, _)| *p == b).flat_map(|(_, c)| c.clone()).collect();
    assert_eq!(to_b.len(), 2, "{dup:?}");
}

/// Chunks requested by the commands `core` emits now, from any peer.
fn asked(core: &mut Scheduler) -> Vec<ChunkIndex> {
    requests(&drain(core)).into_iter().flat_map(|(_, c)| c).collect()
}

/// Eight requests to region peers in all, `per_peer` at one, a 10 s request timeout.
fn budget_config(per_peer: u32) -> SwarmConfig {
    SwarmConfig {
        max_in_flight_per_peer: per_peer,
        max_in_flight_total: 8,
        request_timeout: ms(10_000),
        ..quiet_config()
    }
}

#[test]
fn late_pieces_with_a_backlog_shrink_the_requests_in_flight() {
    let n = 64;
    let config = budget_config(8);
    let mut core = Scheduler::new(ms(0), table(n), &Bitfield::new(n), config, 5).expect("new");
    let a = PeerId(1);
    core.handle_connected(ms(0), a, PeerKind::Peer).expect("connect");
    core.handle_bitfield(ms(0), a, Bitfield::full(n)).expect("bits");
    let mut outstanding = asked(&mut core);
    assert_eq!(outstanding.len(), 8);
    // One piece a second: 1,000 bytes/s taken in, with 8,000 bytes in flight (8 s of intake).
    // Pieces asked for at 0 s arrive later and later; past 5 s (half the timeout), the budget
    // is cut once (7 requests are left outstanding and 6 allowed: nothing new goes out).
    let mut asked_after = Vec::new();
    for second in 1..=6 {
        let index = outstanding.remove(0);
        let at = ms(second * 1000);
        core.handle_piece(at, a, index, PieceOutcome::Verified).expect("piece");
        core.handle_written(at, index).expect("written");
        let new = asked(&mut core);
        asked_after.push(new.len());
        outstanding.extend(new);
    }
    // Seconds 1-5: each piece frees a slot that is taken again. Second 6: late, cut.
    assert_eq!(asked_after, vec![1, 1, 1, 1, 1, 0], "{outstanding:?}");
    assert_eq!(outstanding.len(), 7);
}

#[test]
fn a_late_piece_from_a_slow_peer_leaves_a_fast_host_its_requests() {
    let n = 512;
    let config = budget_config(4);
    let mut core = Scheduler::new(ms(0), table(n), &Bitfield::new(n), config, 5).expect("new");
    let (fast, slow) = (PeerId(1), PeerId(2));
    for p in [fast, slow] {
        core.handle_connected(ms(0), p, PeerKind::Peer).expect("connect");
        core.handle_bitfield(ms(0), p, Bitfield::full(n)).expect("bits");
    }
    let mut at: BTreeMap<PeerId, Vec<ChunkIndex>> = BTreeMap::new();
    for (p, c) in requests(&drain(&mut core)) {
        at.entry(p).or_default().extend(c);
    }
    // The fast peer answers 40 pieces a second for 6 s; the slow one only at 6 s.
    for tick in 1..=240u64 {
        let now = ms(tick * 25);
        let index = at.get_mut(&fast).expect("asked").remove(0);
        core.handle_piece(now, fast, index, PieceOutcome::Verified).expect("piece");
        for (p, c) in requests(&drain(&mut core)) {
            at.entry(p).or_default().extend(c);
        }
        if at[&fast].is_empty() {
            break;
        }
    }
    let index = at.get_mut(&slow).expect("asked").remove(0);
    core.handle_piece(ms(6000), slow, index, PieceOutcome::Verified).expect("piece");
    for (p, c) in requests(&drain(&mut core)) {
        at.entry(p).or_default().extend(c);
    }
    let outstanding: usize = at.values().map(Vec::len).sum();
    assert_eq!(outstanding, 8, "the budget stays whole: {at:?}");
}

#[test]
fn a_timed_out_request_is_cancelled_and_reissued_elsewhere() {
    let n = 1;
    let config = SwarmConfig { max_in_flight_total: 1, ..quiet_config() };
    let mut core = Scheduler::new(ms(0), table(n), &Bitfield::new(n), config, 4).expect("new");
    let (a, b) = (PeerId(1), PeerId(2));
    for p in [a, b] {
        core.handle_connected(ms(0), p, PeerKind::Peer).expect("connect");
        core.handle_bitfield(ms(0), p, Bitfield::full(n)).expect("bits");
    }
    assert_eq!(requests(&drain(&mut core)), vec![(a, vec![0])]);
    let deadline = core.poll_timeout().expect("a deadline");
    assert_eq!(deadline, config.request_timeout);
    core.handle_timeout(deadline - ms(1));
    assert!(drain(&mut core).is_empty(), "not yet");
    core.handle_timeout(deadline);
    assert_eq!(
        drain(&mut core),
        vec![Command::Cancel { peer: a, index: 0 }, Command::Request { peer: b, chunks: vec![0] }]
    );
    let score = core.peer_score(a).expect("connected");
    assert_eq!((score.timeouts, score.consecutive_timeouts, score.usable), (1, 1, false));
    assert_eq!(core.progress().timeouts, 1);
    // The back-off ends later; the slow peer's late answer is still welcome, and the request to
    // b is then withdrawn.
    assert_eq!(core.poll_timeout(), Some(deadline + config.timeout_backoff));
    let late = core.handle_piece(deadline + ms(3), a, 0, PieceOutcome::Verified).expect("piece");
    assert_eq!(late, PieceAction::Write);
    assert_eq!(drain(&mut core), vec![Command::Cancel { peer: b, index: 0 }]);
    core.handle_written(deadline + ms(4), 0).expect("written");
    // Both peers advertise every chunk: nobody needs the Have.
    assert_eq!(
        drain(&mut core),
        vec![Command::Announce { index: 0, peers: vec![] }, Command::Complete]
    );
    assert_eq!(core.progress().peer.chunks, 1);
}

#[test]
fn a_hash_mismatch_bans_the_peer_and_refetches_elsewhere() {
    let n = 2;
    let config = SwarmConfig { max_in_flight_total: 1, ..quiet_config() };
    let mut core = Scheduler::new(ms(0), table(n), &bits(n, [1]), config, 5).expect("new");
    let (bad, good) = (PeerId(1), PeerId(2));
    for p in [bad, good] {
        core.handle_connected(ms(0), p, PeerKind::Peer).expect("connect");
        core.handle_bitfield(ms(0), p, Bitfield::full(n)).expect("bits");
    }
    assert_eq!(requests(&drain(&mut core)), vec![(bad, vec![0])]);
    let got = core.handle_piece(ms(5), bad, 0, PieceOutcome::HashMismatch).expect("piece");
    assert_eq!(got, PieceAction::Discard);
    assert_eq!(
        drain(&mut core),
        vec![
            Command::Ban { peer: bad, reason: BanReason::HashMismatch { index: 0 } },
            Command::Request { peer: good, chunks: vec![0] },
        ]
    );
    assert!(core.is_banned(bad));
    assert_eq!(core.progress().hash_mismatches, 1);
    // Whatever else arrives from it is refused; it cannot reconnect; its disconnect is a no-op.
    let banned = Err(EventError::Banned { peer: bad });
    let late = core.handle_piece(ms(6), bad, 0, PieceOutcome::Verified);
    assert_eq!(late, Err(EventError::Banned { peer: bad }));
    assert_eq!(core.handle_have(ms(6), bad, 0), banned);
    assert_eq!(core.handle_connected(ms(6), bad, PeerKind::Peer), banned);
    assert_eq!(core.handle_disconnected(ms(6), bad), Ok(()));
    core.handle_request(ms(6), bad, 1).expect("request");
    assert_eq!(
        drain(&mut core),
        vec![Command::Reject { peer: bad, index: 1, reason: RejectReason::Banned }]
    );
    assert_eq!(core.handle_piece(ms(7), good, 0, PieceOutcome::Verified), Ok(PieceAction::Write));
    core.handle_written(ms(8), 0).expect("written");
    assert!(core.is_complete());
    assert_eq!(core.progress().bans, 1);
}

#[test]
fn busy_and_not_have_rejections_steer_requests_elsewhere() {
    let n = 2;
    let config = SwarmConfig { max_in_flight_total: 1, ..quiet_config() };
    let mut core = Scheduler::new(ms(0), table(n), &bits(n, [1]), config, 6).expect("new");
    let (a, b) = (PeerId(1), PeerId(2));
    for p in [a, b] {
        core.handle_connected(ms(0), p, PeerKind::Peer).expect("connect");
        core.handle_bitfield(ms(0), p, Bitfield::full(n)).expect("bits");
    }
    assert_eq!(requests(&drain(&mut core)), vec![(a, vec![0])]);
    core.handle_rejected(ms(1), a, 0, RejectReason::Busy).expect("rejected");
    assert_eq!(requests(&drain(&mut core)), vec![(b, vec![0])]);
    assert_eq!(core.poll_timeout(), Some(ms(1) + config.busy_backoff));
    core.handle_rejected(ms(2), b, 0, RejectReason::NotHave).expect("rejected");
    assert!(requests(&drain(&mut core)).is_empty(), "a is backed off, b lacks it");
    assert_eq!(core.peer_score(b).expect("b").advertised, 1);
    core.handle_timeout(ms(1) + config.busy_backoff);
    assert_eq!(requests(&drain(&mut core)), vec![(a, vec![0])]);
}

#[test]
fn upload_slots_bound_serving_then_queue_then_reject() {
    let n = 4;
    let config = SwarmConfig {
        upload_slots: 2,
        upload_slots_per_peer: 1,
        upload_queue_len: 1,
        upload_queue_timeout: ms(100),
        ..SwarmConfig::default()
    };
    let mut core = Scheduler::new(ms(0), table(n), &bits(n, [0, 1, 2]), config, 7).expect("new");
    let (x, y, z) = (PeerId(1), PeerId(2), PeerId(3));
    for p in [x, y, z] {
        core.handle_connected(ms(0), p, PeerKind::Peer).expect("connect");
    }
    core.handle_request(ms(1), x, 0).expect("request");
    core.handle_request(ms(1), x, 1).expect("request"); // x is at its per-peer limit: queued
    core.handle_request(ms(1), y, 0).expect("request");
    // Slots and queue full, but z has no place here: it takes that of x's queued request.
    core.handle_request(ms(1), z, 0).expect("request");
    core.handle_request(ms(1), z, 1).expect("request"); // z has its place: refused
    core.handle_request(ms(1), z, 3).expect("request"); // not held
    assert_eq!(
        drain(&mut core),
        vec![
            Command::Serve { peer: x, index: 0 },
            Command::Serve { peer: y, index: 0 },
            Command::Reject { peer: x, index: 1, reason: RejectReason::Busy },
            Command::Reject { peer: z, index: 1, reason: RejectReason::Busy },
            Command::Reject { peer: z, index: 3, reason: RejectReason::NotHave },
        ]
    );
    core.handle_upload_done(ms(5), x, 0).expect("done");
    assert_eq!(drain(&mut core), vec![Command::Serve { peer: z, index: 0 }]);
    core.handle_request(ms(6), z, 2).expect("request"); // queued
    assert!(drain(&mut core).is_empty());
    assert_eq!(core.poll_timeout(), Some(ms(106)));
    core.handle_timeout(ms(106));
    assert_eq!(
        drain(&mut core),
        vec![Command::Reject { peer: z, index: 2, reason: RejectReason::Busy }]
    );
    assert_eq!(
        core.handle_upload_done(ms(7), z, 2),
        Err(EventError::NotServing { peer: z, index: 2 })
    );
    assert_eq!(core.progress().uploaded.chunks, 3);
}

/// A scheduler holding all `n` chunks (complete), with `peers` connected as region peers.
fn seeder(n: u32, config: SwarmConfig, peers: &[PeerId]) -> Scheduler {
    let all: Vec<ChunkIndex> = (0..n).collect();
    let mut core = Scheduler::new(ms(0), table(n), &bits(n, all), config, 7).expect("new");
    for &p in peers {
        core.handle_connected(ms(0), p, PeerKind::Peer).expect("connect");
    }
    assert_eq!(drain(&mut core), vec![Command::Complete]);
    core
}

#[test]
fn a_full_queue_takes_a_peer_with_no_place_in_it_from_the_peer_holding_the_most() {
    let n = 8;
    let config = SwarmConfig {
        upload_slots: 1,
        upload_slots_per_peer: 1,
        upload_queue_len: 3,
        ..SwarmConfig::default()
    };
    let (v, w, x, y, z) = (PeerId(1), PeerId(2), PeerId(3), PeerId(4), PeerId(5));
    let mut core = seeder(n, config, &[v, w, x, y, z]);
    core.handle_request(ms(1), w, 0).expect("request"); // served
    core.handle_request(ms(2), x, 1).expect("request"); // queued
    core.handle_request(ms(3), x, 2).expect("request"); // queued
    core.handle_request(ms(4), w, 3).expect("request"); // queued: the queue is full
    assert_eq!(drain(&mut core), vec![Command::Serve { peer: w, index: 0 }]);
    // w and x hold two places each; w has one running: its (only, so youngest) queued
    // request makes room.
    core.handle_request(ms(5), y, 4).expect("request");
    assert_eq!(
        drain(&mut core),
        vec![Command::Reject { peer: w, index: 3, reason: RejectReason::Busy }]
    );
    // Now x holds the most: its youngest request goes.
    core.handle_request(ms(6), z, 5).expect("request");
    assert_eq!(
        drain(&mut core),
        vec![Command::Reject { peer: x, index: 2, reason: RejectReason::Busy }]
    );
    // Every queued peer holds one place: no one is displaced for v.
    core.handle_request(ms(7), v, 6).expect("request");
    assert_eq!(
        drain(&mut core),
        vec![Command::Reject { peer: v, index: 6, reason: RejectReason::Busy }]
    );
    // The queue is x's, y's and z's requests, in the order they came.
    core.handle_upload_done(ms(10), w, 0).expect("done");
    assert_eq!(drain(&mut core), vec![Command::Serve { peer: x, index: 1 }]);
    core.handle_upload_done(ms(20), x, 1).expect("done");
    assert_eq!(drain(&mut core), vec![Command::Serve { peer: y, index: 4 }]);
    core.handle_upload_done(ms(30), y, 4).expect("done");
    assert_eq!(drain(&mut core), vec![Command::Serve { peer: z, index: 5 }]);
}

#[test]
fn a_seeding_source_displaces_no_queued_request() {
    let n = 4;
    let config = SwarmConfig {
        upload_slots: 1,
        upload_slots_per_peer: 1,
        upload_queue_len: 2,
        seed_window: ms(1000),
        ..SwarmConfig::default()
    };
    let (w, x, y) = (PeerId(1), PeerId(2), PeerId(3));
    let mut core = seeder(n, config, &[w, x, y]);
    core.handle_request(ms(1), w, 0).expect("request"); // served
    core.handle_request(ms(2), x, 1).expect("request"); // queued
    core.handle_request(ms(3), x, 2).expect("request"); // queued: the queue is full
    core.handle_request(ms(4), y, 3).expect("request");
    assert_eq!(
        drain(&mut core),
        vec![
            Command::Serve { peer: w, index: 0 },
            Command::Reject { peer: y, index: 3, reason: RejectReason::Busy },
        ]
    );
}

#[test]
fn a_free_slot_goes_to_the_peer_served_least_then_to_the_oldest_request() {
    let n = 8;
    let config = SwarmConfig {
        upload_slots: 3,
        upload_slots_per_peer: 2,
        upload_queue_len: 8,
        ..SwarmConfig::default()
    };
    let (w, x, y, z) = (PeerId(1), PeerId(2), PeerId(3), PeerId(4));
    let mut core = seeder(n, config, &[w, x, y, z]);
    core.handle_request(ms(1), x, 0).expect("request");
    core.handle_request(ms(1), y, 1).expect("request");
    core.handle_request(ms(1), z, 2).expect("request");
    core.handle_request(ms(2), x, 3).expect("request"); // queued first
    core.handle_request(ms(3), y, 4).expect("request"); // queued second
    core.handle_request(ms(4), w, 5).expect("request"); // queued last
    assert_eq!(
        drain(&mut core),
        vec![
            Command::Serve { peer: x, index: 0 },
            Command::Serve { peer: y, index: 1 },
            Command::Serve { peer: z, index: 2 },
        ]
    );
    // x and y have an upload running, w none: w goes first though it asked last.
    core.handle_upload_done(ms(10), z, 2).expect("done");
    assert_eq!(drain(&mut core), vec![Command::Serve { peer: w, index: 5 }]);
    // x and y have one each, w none and nothing queued: the oldest request, x's.
    core.handle_upload_done(ms(20), w, 5).expect("done");
    assert_eq!(drain(&mut core), vec![Command::Serve { peer: x, index: 3 }]);
    core.handle_upload_done(ms(30), x, 0).expect("done");
    assert_eq!(drain(&mut core), vec![Command::Serve { peer: y, index: 4 }]);
}

#[test]
fn among_peers_served_alike_a_free_slot_goes_to_the_one_holding_the_fewest_chunks() {
    let n = 8;
    let config = SwarmConfig {
        upload_slots: 1,
        upload_slots_per_peer: 1,
        upload_queue_len: 8,
        ..SwarmConfig::default()
    };
    // Still staging (chunk 0 is missing): a complete scheduler forgets what peers hold.
    let mut core = Scheduler::new(ms(0), table(n), &bits(n, 1..n), config, 7).expect("new");
    let (w, x, y, z) = (PeerId(1), PeerId(2), PeerId(3), PeerId(4));
    for p in [w, x, y, z] {
        core.handle_connected(ms(0), p, PeerKind::Peer).expect("connect");
    }
    core.handle_bitfield(ms(0), x, bits(n, [0, 1, 2])).expect("bits");
    core.handle_bitfield(ms(0), y, bits(n, [3])).expect("bits");
    core.handle_bitfield(ms(0), z, bits(n, [4, 5])).expect("bits");
    drain(&mut core); // the requests for chunk 0
    core.handle_request(ms(1), w, 1).expect("request"); // served
    core.handle_request(ms(2), x, 3).expect("request"); // queued first
    core.handle_request(ms(3), z, 6).expect("request"); // queued second
    core.handle_request(ms(4), y, 7).expect("request"); // queued last
    assert_eq!(drain(&mut core), vec![Command::Serve { peer: w, index: 1 }]);
    // None of them has an upload running: y holds one chunk, z two, x three.
    core.handle_upload_done(ms(10), w, 1).expect("done");
    assert_eq!(drain(&mut core), vec![Command::Serve { peer: y, index: 7 }]);
    // z announces two more chunks: x, with three, is now the furthest behind.
    core.handle_have(ms(11), z, 1).expect("have");
    core.handle_have(ms(11), z, 2).expect("have");
    core.handle_upload_done(ms(20), y, 7).expect("done");
    assert_eq!(drain(&mut core), vec![Command::Serve { peer: x, index: 3 }]);
    core.handle_upload_done(ms(30), x, 3).expect("done");
    assert_eq!(drain(&mut core), vec![Command::Serve { peer: z, index: 6 }]);
}

#[test]
fn large_chunks_narrow_the_request_counts_to_the_byte_limits() {
    let n = 64;
    let config = SwarmConfig {
        max_in_flight_per_peer: 8,
        max_in_flight_bytes_per_peer: u64::from(3 * CHUNK_LEN),
        max_in_flight_total: 64,
        max_in_flight_bytes_total: u64::from(5 * CHUNK_LEN),
        ..quiet_config()
    };
    let mut core = Scheduler::new(ms(0), table(n), &Bitfield::new(n), config, 7).expect("new");
    let (x, y) = (PeerId(1), PeerId(2));
    for p in [x, y] {
        core.handle_connected(ms(0), p, PeerKind::Peer).expect("connect");
        core.handle_bitfield(ms(0), p, Bitfield::full(n)).expect("bitfield");
    }
    let asked = requests(&drain(&mut core));
    let at = |peer| asked.iter().filter(|(p, _)| *p == peer).map(|(_, c)| c.len()).sum::<usize>();
    // Three chunks' worth at one peer, five in all: not 8 and 64.
    assert!(at(x) <= 3 && at(y) <= 3, "{asked:?}");
    assert_eq!(at(x) + at(y), 5, "{asked:?}");
}

#[test]
fn the_origin_is_used_only_with_a_permit_and_only_without_a_cache() {
    let n = 8;
    let config = SwarmConfig { back_to_source_delay: ms(500), ..quiet_config() };
    let mut core = Scheduler::new(ms(0), table(n), &Bitfield::new(n), config, 8).expect("new");
    let (origin, cache) = (PeerId(100), PeerId(200));
    core.handle_connected(ms(0), origin, PeerKind::Origin).expect("connect");
    assert!(drain(&mut core).is_empty(), "back-to-source waits for peers' bitfields");
    assert_eq!(core.poll_timeout(), Some(ms(500)));
    core.handle_timeout(ms(500));
    assert_eq!(drain(&mut core), vec![Command::RequestOriginPermit]);
    assert_eq!(core.origin_permit(), OriginPermit::Requested);
    core.handle_permit_denied(ms(510));
    assert!(drain(&mut core).is_empty());
    assert_eq!(core.poll_timeout(), Some(ms(1510)));
    core.handle_timeout(ms(1510));
    assert_eq!(drain(&mut core), vec![Command::RequestOriginPermit]);
    core.handle_permit_granted(ms(1520));
    let reqs = requests(&drain(&mut core));
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].0, origin);
    assert_eq!(reqs[0].1.len(), config.max_in_flight_back_to_source as usize);
    let from_origin = reqs[0].1.clone();

    // A cache appears: it takes over, the origin gets nothing new, and the permit goes back
    // once the origin's requests are answered.
    core.handle_connected(ms(1530), cache, PeerKind::Cache).expect("connect");
    let reqs = requests(&drain(&mut core));
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].0, cache);
    for (i, &c) in from_origin.iter().enumerate() {
        let t = ms(1540 + i as u64);
        core.handle_piece(t, origin, c, PieceOutcome::Verified).expect("piece");
        let cmds = drain(&mut core);
        assert!(requests(&cmds).iter().all(|(p, _)| *p != origin));
        let last = i + 1 == from_origin.len();
        assert_eq!(cmds.contains(&Command::ReleaseOriginPermit), last, "{cmds:?}");
    }
    assert_eq!(core.origin_permit(), OriginPermit::Idle);
    // An unrequested grant is handed straight back.
    core.handle_permit_granted(ms(1600));
    assert_eq!(drain(&mut core), vec![Command::ReleaseOriginPermit]);
}

#[test]
fn caches_are_asked_only_for_chunks_no_region_peer_has() {
    let n = 16;
    let config = SwarmConfig { max_in_flight_back_to_source: 4, ..quiet_config() };
    let mut core = Scheduler::new(ms(0), table(n), &Bitfield::new(n), config, 9).expect("new");
    let (peer, cache) = (PeerId(1), PeerId(2));
    core.handle_connected(ms(0), peer, PeerKind::Peer).expect("connect");
    core.handle_bitfield(ms(0), peer, bits(n, 0..12)).expect("bits");
    core.handle_connected(ms(0), cache, PeerKind::Cache).expect("connect");
    let reqs = requests(&drain(&mut core));
    let to_cache: Vec<ChunkIndex> =
        reqs.iter().filter(|(p, _)| *p == cache).flat_map(|(_, c)| c.clone()).collect();
    let mut sorted = to_cache.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![12, 13, 14, 15]);
    // The peer disconnects: its chunks become region-rare and go to the cache.
    let to_cache_before = core.peer_score(cache).expect("cache").in_flight;
    assert_eq!(to_cache_before, 4);
    core.handle_disconnected(ms(1), peer).expect("disconnect");
    core.handle_piece(ms(2), cache, to_cache[0], PieceOutcome::Verified).expect("piece");
    let reqs = requests(&drain(&mut core));
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].0, cache);
    assert!(reqs[0].1.iter().all(|&c| c < 12));
}

/// A source holding all `n` chunks, with a seed window, `peers` connected at 0 ms.
fn seeding_source(n: u32, peers: &[(PeerId, PeerKind)]) -> Scheduler {
    let mut source =
        Scheduler::new(ms(0), table(n), &Bitfield::full(n), source_config(), 12).expect("new");
    assert_eq!(drain(&mut source), vec![Command::Complete]);
    for &(peer, kind) in peers {
        source.handle_connected(ms(0), peer, kind).expect("connect");
    }
    source
}

#[test]
fn super_seeding_refuses_a_chunk_just_sent_and_the_refused_host_waits_for_peers() {
    let n = 4;
    // The source side.
    let (a, b, region_cache) = (PeerId(1), PeerId(2), PeerId(3));
    let peers = [(a, PeerKind::Peer), (b, PeerKind::Peer), (region_cache, PeerKind::Cache)];
    let mut source = seeding_source(n, &peers);
    source.handle_request(ms(10), a, 0).expect("request");
    source.handle_request(ms(20), b, 0).expect("request");
    source.handle_request(ms(30), region_cache, 0).expect("request");
    source.handle_request(ms(1010), b, 0).expect("request");
    assert_eq!(
        drain(&mut source),
        vec![
            Command::Serve { peer: a, index: 0 },
            Command::Reject { peer: b, index: 0, reason: RejectReason::SeededRecently },
            Command::Serve { peer: region_cache, index: 0 },
            Command::Serve { peer: b, index: 0 },
        ]
    );

    // The requester side: the chunk is not asked of a cache again until the deferral ends, but
    // a peer that announces it is asked at once.
    let config = SwarmConfig { max_in_flight_back_to_source: 1, ..quiet_config() };
    let mut host = Scheduler::new(ms(0), table(n), &bits(n, [1, 2, 3]), config, 13).expect("new");
    let (cache, peer) = (PeerId(10), PeerId(11));
    host.handle_connected(ms(0), cache, PeerKind::Cache).expect("connect");
    assert_eq!(requests(&drain(&mut host)), vec![(cache, vec![0])]);
    host.handle_rejected(ms(5), cache, 0, RejectReason::SeededRecently).expect("rejected");
    assert!(requests(&drain(&mut host)).is_empty());
    assert!(host.peer_score(cache).expect("cache").usable, "no back-off for the cache");
    assert_eq!(host.poll_timeout(), Some(ms(5) + config.seeded_defer));
    host.handle_connected(ms(6), peer, PeerKind::Peer).expect("connect");
    host.handle_bitfield(ms(6), peer, bits(n, [])).expect("bits");
    host.handle_have(ms(7), peer, 0).expect("have");
    assert_eq!(requests(&drain(&mut host)), vec![(peer, vec![0])]);
    // Had the peer not had it, the cache is asked again after the deferral.
    host.handle_disconnected(ms(8), peer).expect("disconnect");
    assert!(requests(&drain(&mut host)).is_empty());
    host.handle_timeout(ms(5) + config.seeded_defer);
    assert_eq!(requests(&drain(&mut host)), vec![(cache, vec![0])]);
}

#[test]
fn the_seed_window_runs_from_the_end_of_the_upload() {
    let (a, b) = (PeerId(1), PeerId(2));
    let mut source = seeding_source(2, &[(a, PeerKind::Peer), (b, PeerKind::Peer)]);
    source.handle_request(ms(0), a, 0).expect("request");
    // Sending the chunk to `a` took 900 ms (a long queue at the source): `a` holds it only
    // from then, so the window of 1 s counts from there, not from the request.
    source.handle_upload_done(ms(900), a, 0).expect("done");
    source.handle_request(ms(1_500), b, 0).expect("request");
    source.handle_request(ms(1_901), b, 0).expect("request");
    assert_eq!(
        drain(&mut source),
        vec![
            Command::Serve { peer: a, index: 0 },
            Command::Reject { peer: b, index: 0, reason: RejectReason::SeededRecently },
            Command::Serve { peer: b, index: 0 },
        ]
    );
}

#[test]
fn a_write_failure_fetches_the_chunk_again() {
    let n = 1;
    let mut core =
        Scheduler::new(ms(0), table(n), &Bitfield::new(n), quiet_config(), 10).expect("new");
    let a = PeerId(1);
    core.handle_connected(ms(0), a, PeerKind::Peer).expect("connect");
    core.handle_bitfield(ms(0), a, Bitfield::full(n)).expect("bits");
    assert_eq!(requests(&drain(&mut core)), vec![(a, vec![0])]);
    assert_eq!(core.handle_piece(ms(1), a, 0, PieceOutcome::Verified), Ok(PieceAction::Write));
    assert_eq!(core.progress().writing, 1);
    core.handle_write_failed(ms(2), 0).expect("write failed");
    assert_eq!(requests(&drain(&mut core)), vec![(a, vec![0])]);
    assert!(!core.has(0), "a chunk is held only once durable");
    assert_eq!(core.handle_written(ms(3), 0), Err(EventError::NotWriting { index: 0 }));
    assert_eq!(core.progress().write_failures, 1);
}

#[test]
fn a_host_with_everything_on_disk_is_complete_at_once() {
    let n = 5;
    let mut core = Scheduler::new(ms(0), table(n), &Bitfield::full(n), SwarmConfig::default(), 11)
        .expect("new");
    assert!(core.is_complete());
    assert_eq!(drain(&mut core), vec![Command::Complete]);
    assert_eq!(core.progress().disk.bytes, u64::from(5 * CHUNK_LEN));
    assert_eq!(core.poll_timeout(), None);
    let empty =
        Scheduler::new(ms(0), table(0), &Bitfield::new(0), SwarmConfig::default(), 0).expect("new");
    assert!(empty.is_complete());
}

#[test]
fn bad_input_gets_typed_errors() {
    let n = 4;
    let config = SwarmConfig { max_in_flight_per_peer: 0, ..SwarmConfig::default() };
    assert_eq!(
        Scheduler::new(ms(0), table(n), &Bitfield::new(n), config, 0).map(|_| ()),
        Err(SetupError::ZeroLimit { field: "max_in_flight_per_peer" })
    );
    assert_eq!(
        Scheduler::new(ms(0), table(n), &Bitfield::new(3), SwarmConfig::default(), 0).map(|_| ()),
        Err(SetupError::LocalLength { expected: 4, got: 3 })
    );
    let mut core =
        Scheduler::new(ms(0), table(n), &Bitfield::new(n), SwarmConfig::default(), 0).expect("new");
    let p = PeerId(1);
    assert_eq!(core.handle_have(ms(0), p, 0), Err(EventError::UnknownPeer { peer: p }));
    core.handle_connected(ms(0), p, PeerKind::Peer).expect("connect");
    assert_eq!(
        core.handle_connected(ms(0), p, PeerKind::Peer),
        Err(EventError::AlreadyConnected { peer: p })
    );
    assert_eq!(
        core.handle_have(ms(0), p, 4),
        Err(EventError::IndexOutOfRange { index: 4, chunks: 4 })
    );
    assert_eq!(
        core.handle_bitfield(ms(0), p, Bitfield::new(5)),
        Err(EventError::BitfieldLength { expected: 4, got: 5 })
    );
    assert_eq!(core.handle_written(ms(0), 1), Err(EventError::NotWriting { index: 1 }));
}

// ---------------------------------------------------------------------------------------------
// Property: against scripted peers with random holdings, losses, rejections, corruption and
// disconnects, the scheduler completes whenever one live honest source has every chunk, and
// never exceeds its bounds.

#[derive(Clone, Debug)]
struct Script {
    kind: PeerKind,
    has: Vec<bool>,
    corrupt: bool,
    /// Percent of requests never answered.
    loss: u8,
    /// Percent of requests rejected `Busy`.
    busy: u8,
    latency_ms: u64,
    /// Disconnect at this many ms, and reconnect some ms later (if `Some`).
    flap: Option<(u64, u64)>,
}

#[derive(Clone, Debug)]
struct Case {
    n: u32,
    local: Vec<bool>,
    config: SwarmConfig,
    seed: u64,
    scripts: Vec<Script>,
}

fn config_strategy() -> impl Strategy<Value = SwarmConfig> {
    (1u32..6, 1u32..4, 1u32..12, 0u32..4, 0u32..6, 1u8..4).prop_map(
        |(per_peer, back_to_source, total, random_first, endgame, endgame_max)| SwarmConfig {
            max_in_flight_per_peer: per_peer,
            max_in_flight_back_to_source: back_to_source,
            max_in_flight_total: total,
            random_first_chunks: random_first,
            endgame_threshold: endgame,
            endgame_max_requests: endgame_max,
            request_timeout: ms(300),
            timeout_backoff: ms(200),
            timeout_backoff_max: ms(2000),
            busy_backoff: ms(50),
            back_to_source_delay: ms(20),
            origin_permit_retry: ms(100),
            ..SwarmConfig::default()
        },
    )
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (2u32..64).prop_flat_map(|n| {
        let partial =
            (
                proptest::collection::vec(any::<bool>(), n as usize),
                proptest::bool::weighted(0.25),
                0u8..90,
                0u8..50,
                1u64..20,
                proptest::option::weighted(0.3, (1u64..400, 1u64..400)),
                prop_oneof![4 => Just(PeerKind::Peer), 1 => Just(PeerKind::Cache)],
            )
                .prop_map(|(has, corrupt, loss, busy, latency_ms, flap, kind)| {
                    Script { kind, has, corrupt, loss, busy, latency_ms, flap }
                });
        let honest = (
            prop_oneof![Just(PeerKind::Peer), Just(PeerKind::Cache), Just(PeerKind::Origin)],
            0u8..40,
            1u64..20,
        )
            .prop_map(move |(kind, busy, latency_ms)| Script {
                kind,
                has: vec![true; n as usize],
                corrupt: false,
                loss: 0,
                busy,
                latency_ms,
                flap: None,
            });
        (
            Just(n),
            proptest::collection::vec(proptest::bool::weighted(0.2), n as usize),
            config_strategy(),
            any::<u64>(),
            proptest::collection::vec(partial, 0..6),
            honest,
        )
            .prop_map(|(n, local, config, seed, mut scripts, honest)| {
                scripts.push(honest);
                Case { n, local, config, seed, scripts }
            })
    })
}

#[derive(Debug)]
enum ScriptEv {
    Piece(usize, ChunkIndex, PieceOutcome),
    Reject(usize, ChunkIndex),
    Written(ChunkIndex),
    Permit(bool),
    Down(usize),
    Up(usize),
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let n = case.n;
    let local = bits(n, (0..n).filter(|&c| case.local[c as usize]));
    let mut core = Scheduler::new(ms(0), table(n), &local, case.config, case.seed).expect("new");
    let mut rng = ChaCha8Rng::seed_from_u64(case.seed);
    let mut queue: BTreeMap<(Duration, u64), ScriptEv> = BTreeMap::new();
    let mut seq = 0u64;
    let mut push = |queue: &mut BTreeMap<(Duration, u64), ScriptEv>, at: Duration, ev| {
        seq += 1;
        queue.insert((at, seq), ev);
    };
    let mut connected = vec![false; case.scripts.len()];
    let mut banned = vec![false; case.scripts.len()];
    let mut outstanding: Vec<BTreeSet<ChunkIndex>> = vec![BTreeSet::new(); case.scripts.len()];
    let mut permit_held = false;
    let mut now = Duration::ZERO;

    let advertised = |s: &Script| bits(n, (0..n).filter(|&c| s.has[c as usize]));
    for (k, s) in case.scripts.iter().enumerate() {
        core.handle_connected(now, PeerId(k as u64), s.kind).expect("connect");
        if s.kind == PeerKind::Peer {
            core.handle_bitfield(now, PeerId(k as u64), advertised(s)).expect("bits");
        }
        connected[k] = true;
        if let Some((down, up)) = s.flap {
            push(&mut queue, ms(down), ScriptEv::Down(k));
            push(&mut queue, ms(down + up), ScriptEv::Up(k));
        }
    }
    let limit = Duration::from_secs(3600);
    let mut steps = 0;
    loop {
        // Carry out every command, checking it.
        while let Some(cmd) = core.poll_command() {
            match cmd {
                Command::Request { peer, chunks } => {
                    let k = peer.0 as usize;
                    let s = &case.scripts[k];
                    prop_assert!(connected[k] && !banned[k], "request to {k}, gone or banned");
                    if s.kind == PeerKind::Origin {
                        prop_assert!(permit_held, "origin asked without a permit");
                        let answering_cache = case.scripts.iter().enumerate().any(|(j, c)| {
                            c.kind == PeerKind::Cache
                                && connected[j]
                                && !banned[j]
                                && c.loss == 0
                                && c.busy == 0
                                && !c.corrupt
                        });
                        prop_assert!(!answering_cache, "origin asked while a cache answers");
                    }
                    let limit = if s.kind == PeerKind::Peer {
                        case.config.max_in_flight_per_peer
                    } else {
                        case.config.max_in_flight_back_to_source
                    };
                    for &c in &chunks {
                        prop_assert!(!local.contains(c), "disk chunk {c} requested");
                        prop_assert!(!core.has(c), "held chunk {c} requested");
                        prop_assert!(s.kind != PeerKind::Peer || s.has[c as usize]);
                        prop_assert!(outstanding[k].insert(c), "{c} asked twice at {k}");
                        let lat = ms(s.latency_ms);
                        if rng.gen_range(0..100) < s.loss {
                            continue;
                        }
                        if rng.gen_range(0..100) < s.busy {
                            push(&mut queue, now + lat * 2, ScriptEv::Reject(k, c));
                            continue;
                        }
                        let outcome = if s.corrupt {
                            PieceOutcome::HashMismatch
                        } else {
                            PieceOutcome::Verified
                        };
                        push(&mut queue, now + lat * 2 + ms(5), ScriptEv::Piece(k, c, outcome));
                    }
                    prop_assert!(outstanding[k].len() <= limit as usize);
                    let to_region: usize = (0..case.scripts.len())
                        .filter(|&j| case.scripts[j].kind == PeerKind::Peer)
                        .map(|j| outstanding[j].len())
                        .sum();
                    prop_assert!(to_region <= case.config.max_in_flight_total as usize);
                }
                Command::Cancel { peer, index } => {
                    prop_assert!(outstanding[peer.0 as usize].remove(&index));
                }
                Command::Ban { peer, .. } => {
                    let k = peer.0 as usize;
                    prop_assert!(case.scripts[k].corrupt, "honest {k} banned");
                    prop_assert!(!banned[k], "{k} banned twice");
                    banned[k] = true;
                    connected[k] = false;
                    outstanding[k].clear();
                }
                Command::RequestOriginPermit => {
                    prop_assert!(!permit_held);
                    let granted = rng.gen_bool(0.7);
                    push(&mut queue, now + ms(3), ScriptEv::Permit(granted));
                }
                Command::ReleaseOriginPermit => {
                    prop_assert!(permit_held);
                    permit_held = false;
                }
                Command::Complete => {
                    prop_assert!(core.is_complete());
                }
                Command::Withdraw { .. } => prop_assert!(false, "withdrawn without forwarding"),
                Command::Announce { index, .. } => prop_assert!(core.has(index)),
                Command::Serve { .. } | Command::Reject { .. } => {
                    prop_assert!(false, "nobody asked to be served")
                }
            }
        }
        for (k, s) in core.peer_scores() {
            prop_assert_eq!(s.in_flight as usize, outstanding[k.0 as usize].len());
        }
        if core.is_complete() {
            prop_assert!(!permit_held, "permit kept after completion");
            prop_assert_eq!(core.progress().done().chunks, u64::from(n));
            prop_assert_eq!(core.progress().disk.chunks, u64::from(local.count_ones()));
            return Ok(());
        }
        steps += 1;
        prop_assert!(steps < 200_000, "runaway");
        let timer = core.poll_timeout();
        let event = queue.first_key_value().map(|(&(t, _), _)| t);
        match (timer, event) {
            (None, None) => {
                return Err(TestCaseError::fail(format!("stalled at {now:?}: {core:?}")));
            }
            (Some(t), e) if e.is_none_or(|e| t <= e) => {
                prop_assert!(t >= now);
                now = t;
                core.handle_timeout(now);
                prop_assert!(core.poll_timeout().is_none_or(|next| next > now), "timer spins");
            }
            _ => {
                let Some(((t, _), ev)) = queue.pop_first() else { unreachable!() };
                now = t;
                match ev {
                    ScriptEv::Piece(k, c, outcome) => {
                        if connected[k] {
                            outstanding[k].remove(&c);
                            let action = core
                                .handle_piece(now, PeerId(k as u64), c, outcome)
                                .expect("piece");
                            if action == PieceAction::Write {
                                prop_assert_eq!(outcome, PieceOutcome::Verified);
                                push(&mut queue, now + ms(1), ScriptEv::Written(c));
                            }
                        }
                    }
                    ScriptEv::Reject(k, c) => {
                        if connected[k] {
                            outstanding[k].remove(&c);
                            core.handle_rejected(now, PeerId(k as u64), c, RejectReason::Busy)
                                .expect("rejected");
                        }
                    }
                    ScriptEv::Written(c) => core.handle_written(now, c).expect("written"),
                    ScriptEv::Permit(granted) => {
                        if granted {
                            permit_held = true;
                            core.handle_permit_granted(now);
                        } else {
                            core.handle_permit_denied(now);
                        }
                    }
                    ScriptEv::Down(k) => {
                        if connected[k] {
                            connected[k] = false;
                            outstanding[k].clear();
                            core.handle_disconnected(now, PeerId(k as u64)).expect("disconnect");
                        }
                    }
                    ScriptEv::Up(k) => {
                        let peer = PeerId(k as u64);
                        let s = &case.scripts[k];
                        match core.handle_connected(now, peer, s.kind) {
                            Ok(()) => {
                                connected[k] = true;
                                if s.kind == PeerKind::Peer {
                                    core.handle_bitfield(now, peer, advertised(s)).expect("bits");
                                }
                            }
                            Err(e) => {
                                prop_assert_eq!(e, EventError::Banned { peer });
                                prop_assert!(banned[k]);
                            }
                        }
                    }
                }
            }
        }
        prop_assert!(now <= limit, "not complete after an hour: {:?}", core);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn completes_with_one_honest_source_and_stays_within_bounds(case in case_strategy()) {
        run_case(&case)?;
    }
}

#[test]
fn a_cache_tracks_a_whole_region_and_asks_only_the_host_that_has_something() {
    let n = 16;
    let config = SwarmConfig { max_in_flight_per_peer: 2, ..quiet_config() };
    let mut cache = Scheduler::new(ms(0), table(n), &Bitfield::new(n), config, 21).expect("new");
    let origin = PeerId(0);
    cache.handle_connected(ms(0), origin, PeerKind::Origin).expect("connect");
    cache.handle_permit_granted(ms(0));
    let first = requests(&drain(&mut cache));
    assert_eq!(first.len(), 1, "the origin is asked for region-rare chunks: {first:?}");
    // A region's worth of hosts (far above the old 4,096), every one with nothing yet.
    let hosts = 20_000u64;
    for h in 1..=hosts {
        cache.handle_connected(ms(1), PeerId(h), PeerKind::Peer).expect("connect");
        cache.handle_bitfield(ms(1), PeerId(h), bits(n, [])).expect("bits");
    }
    assert!(requests(&drain(&mut cache)).is_empty());
    // One host announces a chunk nobody was asked for: it alone is asked.
    let asked: BTreeSet<ChunkIndex> = first[0].1.iter().copied().collect();
    let chunk = (0..n).find(|c| !asked.contains(c)).expect("an unrequested chunk");
    cache.handle_have(ms(2), PeerId(777), chunk).expect("have");
    assert_eq!(requests(&drain(&mut cache)), vec![(PeerId(777), vec![chunk])]);
    // A rejection gives every host that has the chunk, and only those, a new look.
    cache.handle_have(ms(3), PeerId(778), chunk).expect("have");
    cache.handle_rejected(ms(4), PeerId(777), chunk, RejectReason::Busy).expect("rejected");
    assert_eq!(requests(&drain(&mut cache)), vec![(PeerId(778), vec![chunk])]);
}

#[test]
fn a_scheduler_tracks_up_to_max_peers() {
    let n = 4;
    let mut core =
        Scheduler::new(ms(0), table(n), &Bitfield::new(n), quiet_config(), 22).expect("new");
    for p in 0..fleetwave_node::swarm::MAX_PEERS as u64 {
        core.handle_connected(ms(0), PeerId(p), PeerKind::Peer).expect("connect");
    }
    assert_eq!(fleetwave_node::swarm::MAX_PEERS, usize::from(u16::MAX));
    assert_eq!(
        core.handle_connected(ms(0), PeerId(u64::MAX), PeerKind::Peer),
        Err(EventError::TooManyPeers { max: fleetwave_node::swarm::MAX_PEERS })
    );
    // Every one of them advertising a chunk still fits the availability counters.
    for p in 0..fleetwave_node::swarm::MAX_PEERS as u64 {
        core.handle_have(ms(1), PeerId(p), 1).expect("have");
    }
    assert!(core.peer_score(PeerId(0)).is_some());
}

/// A host staging `n` chunks with one cache connected, asking it one chunk at a time.
fn host_behind_one_cache(n: u32) -> (Scheduler, PeerId) {
    let config = SwarmConfig { max_in_flight_back_to_source: 1, ..quiet_config() };
    let mut host = Scheduler::new(ms(0), table(n), &Bitfield::new(n), config, 29).expect("new");
    let cache = PeerId(10);
    host.handle_connected(ms(0), cache, PeerKind::Cache).expect("connect");
    (host, cache)
}

#[test]
fn a_source_that_keeps_refusing_as_seeded_recently_is_paused_then_asked_again() {
    let (mut host, cache) = host_behind_one_cache(8);
    let config = *host.config();
    // The first refusals are each followed at once by a request for another chunk.
    let mut t = 0;
    for _ in 1..config.seeded_refusals {
        t += 1;
        let reqs = requests(&drain(&mut host));
        assert_eq!(reqs.len(), 1, "{reqs:?}");
        host.handle_rejected(ms(t), cache, reqs[0].1[0], RejectReason::SeededRecently)
            .expect("reject");
    }
    // The last of the streak pauses the source, though chunks are left to ask it for.
    t += 1;
    let reqs = requests(&drain(&mut host));
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    host.handle_rejected(ms(t), cache, reqs[0].1[0], RejectReason::SeededRecently).expect("reject");
    assert!(requests(&drain(&mut host)).is_empty(), "paused");
    assert!(!host.peer_score(cache).expect("connected").usable);
    let resume = ms(t) + config.busy_backoff;
    assert_eq!(host.poll_timeout(), Some(resume));
    host.handle_timeout(resume);
    let reqs = requests(&drain(&mut host));
    assert_eq!(reqs.len(), 1, "asked again: {reqs:?}");
    assert_eq!(reqs[0].0, cache);
}

#[test]
fn a_have_that_leads_to_a_request_moves_the_next_timeout_and_one_that_does_not_leaves_it() {
    let n = 4;
    let config = quiet_config();
    let mut core = Scheduler::new(ms(0), table(n), &Bitfield::new(n), config, 31).expect("new");
    let (a, b) = (PeerId(1), PeerId(2));
    for p in [a, b] {
        core.handle_connected(ms(0), p, PeerKind::Peer).expect("connect");
        core.handle_bitfield(ms(0), p, Bitfield::new(n)).expect("bits");
    }
    assert!(requests(&drain(&mut core)).is_empty(), "nobody has anything");
    // Asked (and its answer kept) before the Have.
    let before = core.poll_timeout();
    core.handle_have(ms(5), a, 0).expect("have");
    assert_eq!(requests(&drain(&mut core)), vec![(a, vec![0])]);
    let deadline = ms(5) + config.request_timeout;
    let after = Some(before.map_or(deadline, |t| t.min(deadline)));
    assert_eq!(core.poll_timeout(), after, "the request's deadline counts");
    // The same chunk from another peer: already requested, so nothing changes.
    core.handle_have(ms(6), b, 0).expect("have");
    assert!(drain(&mut core).is_empty());
    assert_eq!(core.poll_timeout(), after);
    // The request times out at its deadline: the answer moves on.
    core.handle_timeout(deadline);
    drain(&mut core);
    assert_ne!(core.poll_timeout(), Some(deadline));
}

#[test]
fn deferred_chunks_come_back_to_the_cache_in_deadline_order() {
    let n = 6;
    let config = SwarmConfig { max_in_flight_back_to_source: 1, ..quiet_config() };
    let mut host = Scheduler::new(ms(0), table(n), &bits(n, [3, 4, 5]), config, 23).expect("new");
    let cache = PeerId(10);
    host.handle_connected(ms(0), cache, PeerKind::Cache).expect("connect");
    // The cache refuses the three wanted chunks one after the other, at 10, 20 and 30 ms.
    let mut refused = Vec::new();
    for t in [10, 20, 30] {
        let reqs = requests(&drain(&mut host));
        assert_eq!(reqs.len(), 1, "{reqs:?}");
        let chunk = reqs[0].1[0];
        host.handle_rejected(ms(t), cache, chunk, RejectReason::SeededRecently).expect("reject");
        refused.push((ms(t) + config.seeded_defer, chunk));
    }
    assert!(requests(&drain(&mut host)).is_empty(), "everything is deferred");
    // They come back one at a time, the earliest deadline first.
    for (deadline, chunk) in refused {
        assert_eq!(host.poll_timeout(), Some(deadline));
        host.handle_timeout(deadline);
        assert_eq!(requests(&drain(&mut host)), vec![(cache, vec![chunk])]);
        host.handle_piece(deadline, cache, chunk, PieceOutcome::Verified).expect("piece");
        drain(&mut host);
    }
    assert_eq!(host.poll_timeout(), None);
}

/// Refuses a whole streak of requests from `cache` as seeded recently, then steps through the
/// timeouts until the host asks it again (into `pending`): returns how long it was paused.
fn refuse_streak(
    host: &mut Scheduler,
    cache: PeerId,
    t: &mut Duration,
    pending: &mut Vec<(PeerId, Vec<ChunkIndex>)>,
) -> Duration {
    for _ in 0..host.config().seeded_refusals {
        assert_eq!(pending.len(), 1, "{pending:?}");
        assert_eq!(pending[0].0, cache);
        *t += ms(1);
        let chunk = pending[0].1[0];
        host.handle_rejected(*t, cache, chunk, RejectReason::SeededRecently).expect("reject");
        *pending = requests(&drain(host));
    }
    assert!(pending.is_empty(), "paused: {pending:?}");
    let refused_at = *t;
    while pending.is_empty() {
        *t = host.poll_timeout().expect("a pause ends");
        host.handle_timeout(*t);
        *pending = requests(&drain(host));
    }
    *t - refused_at
}

#[test]
fn a_source_refusing_streak_after_streak_is_paused_longer_each_time_until_it_sends_a_piece() {
    let n = 64;
    let (mut host, cache) = host_behind_one_cache(n);
    let config = *host.config();
    let mut t = ms(0);
    let mut pending = requests(&drain(&mut host));
    let pauses: Vec<Duration> =
        (0..5).map(|_| refuse_streak(&mut host, cache, &mut t, &mut pending)).collect();
    let b = config.busy_backoff;
    assert_eq!(pauses, vec![b, b * 2, b * 4, config.busy_backoff_max, config.busy_backoff_max]);
    // A piece from the source ends the run of pauses: the next streak pauses it briefly again.
    let chunk = pending[0].1[0];
    assert_eq!(
        host.handle_piece(t, cache, chunk, PieceOutcome::Verified).expect("piece"),
        PieceAction::Write
    );
    pending = requests(&drain(&mut host));
    assert_eq!(refuse_streak(&mut host, cache, &mut t, &mut pending), b);
}

#[test]
fn a_source_that_announces_a_new_chunk_is_paused_briefly_again() {
    let n = 64;
    let (mut host, cache) = host_behind_one_cache(n);
    let config = *host.config();
    // A cache still pulling the manifest from the origin: it lacks the last chunk.
    let mut bits = Bitfield::full(n);
    bits.remove(n - 1);
    host.handle_bitfield(ms(0), cache, bits).expect("bitfield");
    let mut t = ms(0);
    let mut pending = requests(&drain(&mut host));
    let b = config.busy_backoff;
    assert_eq!(refuse_streak(&mut host, cache, &mut t, &mut pending), b);
    assert_eq!(refuse_streak(&mut host, cache, &mut t, &mut pending), b * 2);
    // It got a new chunk from the origin: what it refused says little about what comes next.
    host.handle_have(t, cache, n - 1).expect("have");
    pending.extend(requests(&drain(&mut host)));
    assert_eq!(refuse_streak(&mut host, cache, &mut t, &mut pending), b);
    assert_eq!(refuse_streak(&mut host, cache, &mut t, &mut pending), b * 2);
}

// ---------------------------------------------------------------------------------------------
// Passing chunks on while they arrive (`forward_arriving`).

/// A scheduler wanting 2 chunks that region peer `a` holds; `b` and `c` hold nothing. Returns
/// it with the chunk asked of `a` first.
fn forwarding(on: bool) -> (Scheduler, ChunkIndex) {
    let n = 2;
    let config = SwarmConfig { forward_arriving: on, ..quiet_config() };
    let mut core = Scheduler::new(ms(0), table(n), &Bitfield::new(n), config, 4).expect("new");
    for p in [PeerId(1), PeerId(2), PeerId(3)] {
        core.handle_connected(ms(0), p, PeerKind::Peer).expect("connect");
    }
    core.handle_bitfield(ms(0), PeerId(1), bits(n, [0, 1])).expect("bits");
    core.handle_bitfield(ms(0), PeerId(2), bits(n, [])).expect("bits");
    core.handle_bitfield(ms(0), PeerId(3), bits(n, [])).expect("bits");
    let asked = requests(&drain(&mut core));
    let index = asked.iter().find(|(p, _)| *p == PeerId(1)).expect("a asked").1[0];
    (core, index)
}

fn announces(cmds: &[Command]) -> Vec<(ChunkIndex, Vec<PeerId>)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Announce { index, peers } => Some((*index, peers.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn an_arriving_chunk_is_announced_and_served_from_its_first_bytes() {
    let (a, b, c) = (PeerId(1), PeerId(2), PeerId(3));
    let (mut core, index) = forwarding(true);
    core.handle_piece_started(ms(1), a, index).expect("started");
    // Told to the peers that lack it, once.
    assert_eq!(announces(&drain(&mut core)), vec![(index, vec![b, c])]);
    core.handle_piece_started(ms(1), a, index).expect("again");
    assert!(drain(&mut core).is_empty());
    core.handle_request(ms(2), b, index).expect("request");
    assert_eq!(drain(&mut core), vec![Command::Serve { peer: b, index }]);
    // Verified and written: not announced a second time.
    assert_eq!(core.handle_piece(ms(3), a, index, PieceOutcome::Verified), Ok(PieceAction::Write));
    drain(&mut core);
    core.handle_request(ms(3), c, index).expect("request while written");
    assert_eq!(drain(&mut core), vec![Command::Serve { peer: c, index }]);
    core.handle_written(ms(4), index).expect("written");
    assert_eq!(announces(&drain(&mut core)), vec![(index, vec![])]);
}

#[test]
fn without_forwarding_an_arriving_chunk_is_neither_announced_nor_served() {
    let (a, b) = (PeerId(1), PeerId(2));
    let (mut core, index) = forwarding(false);
    core.handle_piece_started(ms(1), a, index).expect("started");
    assert!(drain(&mut core).is_empty());
    core.handle_request(ms(2), b, index).expect("request");
    let reason = RejectReason::NotHave;
    assert_eq!(drain(&mut core), vec![Command::Reject { peer: b, index, reason }]);
}

#[test]
fn a_failed_arrival_withdraws_what_passes_it_on() {
    let (a, b, c) = (PeerId(1), PeerId(2), PeerId(3));
    let (mut core, index) = forwarding(true);
    core.handle_piece_started(ms(1), a, index).expect("started");
    drain(&mut core);
    core.handle_request(ms(2), b, index).expect("request");
    assert_eq!(drain(&mut core), vec![Command::Serve { peer: b, index }]);
    // The copy from a fails its hash: the upload to b is withdrawn, c is refused.
    let action = core.handle_piece(ms(3), a, index, PieceOutcome::HashMismatch).expect("piece");
    assert_eq!(action, PieceAction::Discard);
    let cmds = drain(&mut core);
    assert!(cmds.contains(&Command::Withdraw { index }), "{cmds:?}");
    core.handle_upload_done(ms(3), b, index).expect("aborted upload ends");
    core.handle_request(ms(4), c, index).expect("request");
    let reason = RejectReason::NotHave;
    assert!(drain(&mut core).contains(&Command::Reject { peer: c, index, reason }));
}

#[test]
fn a_sender_lost_mid_piece_withdraws_and_a_verified_copy_from_elsewhere_does_not() {
    let (a, b) = (PeerId(1), PeerId(2));
    // Lost: a disconnects while the chunk arrives from it.
    let (mut core, index) = forwarding(true);
    core.handle_piece_started(ms(1), a, index).expect("started");
    core.handle_request(ms(2), b, index).expect("request");
    drain(&mut core);
    core.handle_disconnected(ms(3), a).expect("gone");
    assert!(drain(&mut core).contains(&Command::Withdraw { index }));
    // Not lost: the copy arriving from a is overtaken by a verified one from b (which
    // announced it meanwhile); the uploads finish from that copy.
    let (mut core, index) = forwarding(true);
    core.handle_piece_started(ms(1), a, index).expect("started");
    core.handle_have(ms(1), b, index).expect("have");
    drain(&mut core);
    core.handle_piece(ms(2), b, index, PieceOutcome::Verified).ok();
    core.handle_disconnected(ms(3), a).expect("gone");
    let cmds = drain(&mut core);
    assert!(!cmds.iter().any(|c| matches!(c, Command::Withdraw { .. })), "{cmds:?}");
}

#[test]
fn a_chunk_announced_early_whose_write_fails_is_announced_again_once_held() {
    let (a, b, c) = (PeerId(1), PeerId(2), PeerId(3));
    let (mut core, index) = forwarding(true);
    core.handle_piece_started(ms(1), a, index).expect("started");
    core.handle_piece(ms(2), a, index, PieceOutcome::Verified).expect("piece");
    drain(&mut core);
    core.handle_write_failed(ms(3), index).expect("write failed");
    // Asked again (of a, the only holder), arriving, written: b and c are told again.
    assert!(
        requests(&drain(&mut core)).iter().any(|(p, chunks)| *p == a && chunks.contains(&index))
    );
    core.handle_piece(ms(4), a, index, PieceOutcome::Verified).expect("piece again");
    drain(&mut core);
    core.handle_written(ms(5), index).expect("written");
    assert_eq!(announces(&drain(&mut core)), vec![(index, vec![b, c])]);
}
