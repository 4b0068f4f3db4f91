//! One manifest's swarm on this daemon: the actor that owns its [`Scheduler`], the protocol
//! [`Session`] of every connection exchanging it, and the disk side (a host's [`StageJob`], or
//! the origin's and caches' [`ChunkStore`]).
//!
//! The actor is the only place decisions are made, and it makes none itself: it feeds the
//! scheduler and the sessions events and carries out their commands. Around it, per connection,
//! three kinds of small tasks move bytes: a reader of the control stream, a writer of it, and a
//! reader per incoming piece stream (which decodes the header, asks the actor whether the piece
//! was requested, then reads, caps and hashes the bytes off the actor). Uploads run as one task
//! per piece, bounded by the scheduler's upload slots.
//!
//! With `forward_arriving` (hosts), a chunk the scheduler passes on while it arrives gets an
//! [`Arriving`] buffer: the piece's reader appends the bytes as they come, and each upload of
//! the chunk streams them on, finishing once a copy is verified here (the actor checks that
//! what was passed on is its prefix) or resetting with `WITHDRAWN` if the copy fails
//! ([`Command::Withdraw`]). The buffer is dropped once the chunk is durable; the uploads under
//! way keep it until they end.
//!
//! Time is a [`Duration`] since the actor started (tokio's clock, so paused-time tests work).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetwave_chunker::{ChunkHash, Manifest, ManifestId, SignedManifest};
use libp2p_identity::PeerId as Identity;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::metrics::Metrics;
use crate::protocol::{
    ErrorCode, Event, Frame, Outbound, PieceData, PieceDecoder, PieceHeader, Session, SessionConfig,
};
use crate::stage::{StageArea, StageJob};
use crate::store::{ChunkStore, WriteBatch};
use crate::swarm::{
    Bitfield, ChunkIndex, ChunkTable, Command, PeerId, PeerKind, PieceAction, PieceOutcome,
    RejectReason, Scheduler, SwarmConfig,
};
use crate::transport::{Connection, RecvStream, SendStream};

/// Messages queued to one actor before senders wait.
const INBOX: usize = 1024;

/// Interns authenticated identities to the scheduler's `u64` peer handles, daemon-wide, so that
/// an identity keeps its handle (and its bans) across reconnections.
#[derive(Clone, Debug, Default)]
pub(crate) struct Interner {
    inner: Arc<Mutex<BTreeMap<Identity, u64>>>,
}

impl Interner {
    pub(crate) fn intern(&self, identity: Identity) -> PeerId {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let next = map.len() as u64;
        PeerId(*map.entry(identity).or_insert(next))
    }
}

/// Where an actor keeps chunks.
#[derive(Debug)]
pub(crate) enum Backend {
    /// A host staging the manifest.
    Staging(Box<StageJob>),
    /// A host that staged it and keeps serving it.
    Staged(StageArea),
    /// The origin or a cache: the content-addressed store. A cache pulling the manifest through
    /// writes into a batch made durable at each sync.
    Store { store: ChunkStore, batch: Option<WriteBatch>, pending: Vec<ChunkIndex> },
}

/// What the daemon tells an actor at creation.
#[derive(Debug)]
pub(crate) struct TransferSpec {
    pub(crate) signed: SignedManifest,
    pub(crate) backend: Backend,
    /// Chunks already held (durable).
    pub(crate) local: Bitfield,
    /// Our role in the swarm.
    pub(crate) role: PeerKind,
    pub(crate) swarm: SwarmConfig,
    pub(crate) seed: u64,
    pub(crate) sync_every: Duration,
    pub(crate) sync_bytes: u64,
    /// Test-only fault: flip a byte of every chunk served.
    pub(crate) corrupt_uploads: bool,
}

/// A connection handed to an actor, its control stream open.
#[derive(Debug)]
pub(crate) struct Attach {
    pub(crate) conn: Connection,
    pub(crate) send: SendStream,
    pub(crate) recv: RecvStream,
    /// The listener: the dialer's Hello, already decoded, and bytes read after it.
    pub(crate) hello: Option<(Frame, BytesMut)>,
    /// The role the remote must claim, when we know it.
    pub(crate) expect_role: Option<PeerKind>,
}

#[derive(Debug)]
enum Msg {
    Attach(Box<Attach>),
    Control {
        peer: PeerId,
        generation: u64,
        bytes: Bytes,
    },
    PieceHeader {
        peer: PeerId,
        generation: u64,
        header: PieceHeader,
        reply: oneshot::Sender<HeaderReply>,
    },
    /// A piece stream reset by its sender with `WITHDRAWN` after its header.
    Withdrawn {
        peer: PeerId,
        generation: u64,
        index: ChunkIndex,
    },
    Piece {
        peer: PeerId,
        generation: u64,
        index: ChunkIndex,
        data: Bytes,
        hash: ChunkHash,
    },
    StreamError {
        peer: PeerId,
        generation: u64,
        code: ErrorCode,
        what: String,
    },
    UploadDone {
        peer: PeerId,
        index: ChunkIndex,
        bytes: u64,
        to_cache: bool,
        sent: bool,
    },
    Closed {
        peer: PeerId,
        generation: u64,
    },
    Snapshot {
        reply: oneshot::Sender<Snapshot>,
    },
}

/// The actor's answer to a piece stream's header.
#[derive(Debug)]
enum HeaderReply {
    /// Not wanted (or the connection is gone): stop the stream.
    Stop,
    /// Read the piece; with `Some`, pass its bytes there as they come: the chunk is passed on
    /// while it arrives.
    Read(Option<Arc<Arriving>>),
}

/// Where a chunk being passed on while it arrives stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    /// Bytes are coming.
    Receiving,
    /// Every byte is in and a copy was verified: finish the uploads.
    Verified,
    /// The copy failed before any was verified: reset the uploads (`WITHDRAWN`).
    Failed,
}

/// The bytes of a chunk arriving on one piece stream, for the uploads that pass it on
/// (`forward_arriving`). Append-only; the reader feeds it, the uploads read it, the actor
/// settles it.
#[derive(Debug)]
struct Arriving {
    parts: Mutex<Vec<Bytes>>,
    flow: watch::Sender<Flow>,
}

impl Arriving {
    fn new() -> Arc<Self> {
        Arc::new(Self { parts: Mutex::new(Vec::new()), flow: watch::Sender::new(Flow::Receiving) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Bytes>> {
        self.parts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// More bytes of the piece, while it is arriving.
    fn push(&self, bytes: Bytes) {
        let mut parts = self.lock();
        if *self.flow.borrow() == Flow::Receiving {
            parts.push(bytes);
            self.flow.send_modify(|_| {});
        }
    }

    /// A verified copy of the chunk is here. The bytes passed on so far must be its prefix
    /// (they may have come from another stream than the verified copy); then the rest is
    /// added and the uploads finish. Otherwise they are withdrawn.
    fn verified(&self, data: &Bytes) {
        let mut parts = self.lock();
        if *self.flow.borrow() != Flow::Receiving {
            return;
        }
        let mut at = 0;
        for p in parts.iter() {
            if data.get(at..at + p.len()) != Some(&p[..]) {
                self.flow.send_replace(Flow::Failed);
                return;
            }
            at += p.len();
        }
        if at < data.len() {
            parts.push(data.slice(at..));
        }
        self.flow.send_replace(Flow::Verified);
    }

    /// The copy failed before any was verified.
    fn fail(&self) {
        let _parts = self.lock();
        self.flow.send_if_modified(|f| {
            let failing = *f == Flow::Receiving;
            if failing {
                *f = Flow::Failed;
            }
            failing
        });
    }

    /// The parts from `from` on, and where the piece stands.
    fn parts_from(&self, from: usize) -> (Vec<Bytes>, Flow) {
        let parts = self.lock();
        (parts.get(from..).unwrap_or_default().to_vec(), *self.flow.borrow())
    }
}

/// A transfer's state, for status.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    /// The manifest.
    pub id: String,
    /// Every chunk held.
    pub complete: bool,
    /// Chunks and bytes held, from disk, peers, caches and the origin.
    pub progress: SourceTally,
    /// Connected peers, by identity, with their kind.
    pub peers: Vec<(String, String)>,
    /// Peers banned on this manifest.
    pub banned: usize,
}

/// Chunks and bytes by source.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SourceTally {
    /// Chunks held.
    pub chunks: u32,
    /// Chunks in the manifest.
    pub total_chunks: u32,
    /// Bytes held from this host's disk (resumed or deduplicated).
    pub disk_bytes: u64,
    /// Bytes from region peers.
    pub peer_bytes: u64,
    /// Bytes from caches.
    pub cache_bytes: u64,
    /// Bytes from the origin.
    pub origin_bytes: u64,
    /// Chunks from the network (peers, caches, origin).
    pub fetched_chunks: u32,
}

/// What a host does when an actor's scheduler completes:
/// `Some(backend)` to keep serving from, or `None` when the artifact failed its whole check.
pub(crate) type OnComplete = Box<dyn FnOnce(StageJob) -> Option<Backend> + Send>;

/// A handle to a running actor.
#[derive(Clone, Debug)]
pub(crate) struct TransferHandle {
    tx: mpsc::Sender<Msg>,
    pub(crate) id: ManifestId,
    done: CancellationToken,
}

impl TransferHandle {
    /// Hands a connection to the actor; `false` if it has stopped.
    pub(crate) async fn attach(&self, attach: Attach) -> bool {
        self.tx.send(Msg::Attach(Box::new(attach))).await.is_ok()
    }

    /// The actor's state, `None` if it stopped.
    pub(crate) async fn snapshot(&self) -> Option<Snapshot> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Snapshot { reply }).await.ok()?;
        rx.await.ok()
    }

    /// Whether the actor has stopped.
    pub(crate) fn is_stopped(&self) -> bool {
        self.done.is_cancelled()
    }
}

/// Context an actor shares with the daemon.
#[derive(Clone, Debug)]
pub(crate) struct Shared {
    /// This daemon's identity.
    pub(crate) local: Identity,
    /// Daemon-wide cap on the bytes received per second, if any.
    pub(crate) download_limit: Option<Arc<RateLimit>>,
    pub(crate) interner: Interner,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: CancellationToken,
}

struct Link {
    identity: Identity,
    generation: u64,
    conn: Connection,
    session: Session,
    control: mpsc::UnboundedSender<Bytes>,
    kind: Option<PeerKind>,
    rx_buf: BytesMut,
    dialed_by_us: bool,
}

struct Actor {
    id: ManifestId,
    manifest: Arc<Manifest>,
    role: PeerKind,
    scheduler: Scheduler,
    backend: Option<Backend>,
    links: BTreeMap<PeerId, Link>,
    generation: u64,
    epoch: Instant,
    tx: mpsc::Sender<Msg>,
    shared: Shared,
    sync_every: Duration,
    sync_bytes: u64,
    pending_bytes: u64,
    sync_due: Option<Instant>,
    corrupt_uploads: bool,
    banned: HashSet<PeerId>,
    /// Chunks passed on while they arrive, until written (`forward_arriving`).
    arriving: BTreeMap<ChunkIndex, Arc<Arriving>>,
    on_complete: Option<OnComplete>,
    done: CancellationToken,
    started: Instant,
    stopping: bool,
}

/// Starts the actor of one manifest.
pub(crate) fn spawn(
    spec: TransferSpec,
    shared: Shared,
    on_complete: Option<OnComplete>,
) -> Result<TransferHandle, crate::swarm::SetupError> {
    let id = spec.signed.id();
    let manifest = Arc::new(spec.signed.manifest().clone());
    let table = ChunkTable::new(&manifest.chunks)?;
    let epoch = Instant::now();
    let scheduler = Scheduler::new(Duration::ZERO, table, &spec.local, spec.swarm, spec.seed)?;
    let (tx, rx) = mpsc::channel(INBOX);
    let done = CancellationToken::new();
    let handle = TransferHandle { tx: tx.clone(), id, done: done.clone() };
    let actor = Actor {
        id,
        manifest,
        role: spec.role,
        scheduler,
        backend: Some(spec.backend),
        links: BTreeMap::new(),
        generation: 0,
        epoch,
        tx,
        shared,
        sync_every: spec.sync_every,
        sync_bytes: spec.sync_bytes,
        pending_bytes: 0,
        sync_due: None,
        corrupt_uploads: spec.corrupt_uploads,
        banned: HashSet::new(),
        arriving: BTreeMap::new(),
        on_complete,
        done,
        started: epoch,
        stopping: false,
    };
    let span = info_span!("transfer", manifest = %id.to_hex()[..16].to_owned());
    tokio::spawn(actor.run(rx).instrument(span));
    Ok(handle)
}

impl Actor {
    fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.epoch)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        self.drive();
        let shutdown = self.shared.shutdown.clone();
        loop {
            let timer = self.scheduler.poll_timeout().map(|t| self.epoch + t);
            let sync_due = self.sync_due;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                _ = sleep_opt(sync_due) => self.sync(),
                _ = sleep_opt(timer) => {
                    let now = self.now();
                    self.scheduler.handle_timeout(now);
                }
            }
            if self.pending_bytes >= self.sync_bytes {
                self.sync();
            }
            self.drive();
            if self.stopping {
                break;
            }
        }
        self.sync();
        for (_, link) in std::mem::take(&mut self.links) {
            link.conn.close(ErrorCode::SHUTTING_DOWN.into(), b"shutting down");
            if link.kind.is_some() {
                self.shared.metrics.peer_disconnected();
            }
        }
        self.done.cancel();
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Attach(attach) => self.attach(*attach),
            Msg::Control { peer, generation, bytes } => {
                let Some(link) = self.link(peer, generation) else { return };
                // A frame split across reads stays in the link's buffer until its rest comes.
                link.rx_buf.extend_from_slice(&bytes);
                let mut buf = std::mem::take(&mut link.rx_buf);
                let result = link.session.handle_bytes(&mut buf);
                link.rx_buf = buf;
                if let Err(err) = result {
                    let code = err.code();
                    self.close(peer, code, &err.to_string());
                }
            }
            Msg::PieceHeader { peer, generation, header, reply } => {
                let ok = match self.link(peer, generation) {
                    Some(link) => match link.session.handle_piece_header(header) {
                        Ok(()) => true,
                        Err(err) => {
                            let code = err.code();
                            self.close(peer, code, &err.to_string());
                            false
                        }
                    },
                    None => false,
                };
                let answer = if ok {
                    HeaderReply::Read(self.piece_started(peer, header.index))
                } else {
                    HeaderReply::Stop
                };
                let _ = reply.send(answer);
            }
            Msg::Withdrawn { peer, generation, index } => {
                if self.link(peer, generation).is_some() {
                    let now = self.now();
                    let reason = RejectReason::NotHave;
                    let _ = self.scheduler.handle_rejected(now, peer, index, reason);
                }
            }
            Msg::Piece { peer, generation, index, data, hash } => {
                if self.link(peer, generation).is_none() {
                    // The connection is gone (closed, or the peer banned); its request was
                    // re-issued elsewhere already.
                    return;
                }
                self.piece(peer, index, data, hash);
            }
            Msg::StreamError { peer, generation, code, what } => {
                if self.link(peer, generation).is_some() {
                    self.close(peer, code, &what);
                }
            }
            Msg::UploadDone { peer, index, bytes, to_cache, sent } => {
                if sent {
                    self.shared.metrics.served(to_cache, bytes);
                }
                let now = self.now();
                let _ = self.scheduler.handle_upload_done(now, peer, index);
            }
            Msg::Closed { peer, generation } => {
                if self.link(peer, generation).is_some() {
                    self.close(peer, ErrorCode::NO_ERROR, "connection closed");
                }
            }
            Msg::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let p = self.scheduler.progress();
        let done = p.done();
        Snapshot {
            id: self.id.to_hex(),
            complete: self.scheduler.is_complete(),
            progress: SourceTally {
                chunks: done.chunks as u32,
                total_chunks: self.manifest.chunks.len() as u32,
                disk_bytes: p.disk.bytes,
                peer_bytes: p.peer.bytes,
                cache_bytes: p.cache.bytes,
                origin_bytes: p.origin.bytes,
                fetched_chunks: (p.peer.chunks + p.cache.chunks + p.origin.chunks) as u32,
            },
            peers: self
                .links
                .values()
                .map(|l| (l.identity.to_string(), l.kind.map_or("connecting", kind_name).into()))
                .collect(),
            banned: self.banned.len(),
        }
    }

    fn link(&mut self, peer: PeerId, generation: u64) -> Option<&mut Link> {
        self.links.get_mut(&peer).filter(|l| l.generation == generation)
    }

    fn attach(&mut self, attach: Attach) {
        let Attach { conn, send, recv, hello, expect_role } = attach;
        let identity = conn.remote_peer_id();
        let peer = self.shared.interner.intern(identity);
        if self.scheduler.is_banned(peer) {
            conn.close(ErrorCode::BANNED.into(), b"banned");
            return;
        }
        if let Some(existing) = self.links.get(&peer) {
            // Two hosts that dialed each other at once: both keep the connection dialed by the
            // smaller identity, so they agree without a word.
            let me = self.shared.local;
            let new_dialed_by_us = hello.is_none();
            let preferred_dialer_is_us = me < identity;
            // A connection in the same direction as the old one replaces it (the peer
            // reconnected, the old one is dead).
            let crossed = existing.dialed_by_us != new_dialed_by_us;
            if crossed && new_dialed_by_us != preferred_dialer_is_us {
                conn.close(ErrorCode::DUPLICATE_CONNECTION.into(), b"duplicate connection");
                return;
            }
            self.close(peer, ErrorCode::DUPLICATE_CONNECTION, "replaced by a newer connection");
        }
        let mut config = SessionConfig::new(self.id, table_of(&self.scheduler), self.role);
        config.expect_role = expect_role;
        let mut session = match Session::new(config) {
            Ok(s) => s,
            Err(err) => {
                warn!(%err, "cannot start a session");
                conn.close(ErrorCode::INTERNAL_ERROR.into(), b"internal error");
                return;
            }
        };
        self.generation += 1;
        let generation = self.generation;
        let dialed_by_us = hello.is_none();
        let mut leftover = BytesMut::new();
        if let Some((frame, rest)) = hello {
            if let Err(err) = session.handle_frame(frame) {
                conn.close(err.code().into(), err.to_string().as_bytes());
                return;
            }
            leftover = rest;
        }
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let span = info_span!("peer", peer = %identity);
        tokio::spawn(write_control(send, control_rx).instrument(span.clone()));
        let tx = self.tx.clone();
        tokio::spawn(read_control(recv, tx.clone(), peer, generation).instrument(span.clone()));
        let piece_conn = conn.clone();
        let limit = self.shared.download_limit.clone();
        tokio::spawn(accept_pieces(piece_conn, tx, peer, generation, limit).instrument(span));
        self.links.insert(
            peer,
            Link {
                identity,
                generation,
                conn,
                session,
                control: control_tx,
                kind: None,
                rx_buf: leftover,
                dialed_by_us,
            },
        );
        if let Some(link) = self.links.get_mut(&peer) {
            if !link.rx_buf.is_empty() {
                let mut buf = std::mem::take(&mut link.rx_buf);
                let result = link.session.handle_bytes(&mut buf);
                link.rx_buf = buf;
                if let Err(err) = result {
                    self.close(peer, err.code(), &err.to_string());
                }
            }
        }
    }

    /// Drops a connection: tells the scheduler (its requests go elsewhere) and the peer.
    fn close(&mut self, peer: PeerId, code: ErrorCode, why: &str) {
        let Some(link) = self.links.remove(&peer) else { return };
        if code != ErrorCode::NO_ERROR {
            info!(peer = %link.identity, %code, why, "closing connection");
        } else {
            debug!(peer = %link.identity, why, "connection ended");
        }
        link.conn.close(code.into(), why.as_bytes());
        if link.kind.is_some() {
            self.shared.metrics.peer_disconnected();
            let now = self.now();
            let _ = self.scheduler.handle_disconnected(now, peer);
        }
    }

    /// The first bytes of a piece from `peer` are coming: the scheduler decides whether the
    /// chunk is passed on meanwhile; if so, the reader feeds the returned buffer.
    fn piece_started(&mut self, peer: PeerId, index: ChunkIndex) -> Option<Arc<Arriving>> {
        let now = self.now();
        let _ = self.scheduler.handle_piece_started(now, peer, index);
        if self.scheduler.arriving_from(index) != Some(peer) || self.arriving.contains_key(&index) {
            return None;
        }
        let arriving = Arriving::new();
        self.arriving.insert(index, arriving.clone());
        Some(arriving)
    }

    fn piece(&mut self, peer: PeerId, index: ChunkIndex, data: Bytes, hash: ChunkHash) {
        let Some(info) = self.manifest.chunks.get(index as usize) else { return };
        let outcome = if info.hash == hash && info.length as usize == data.len() {
            self.shared.metrics.verified();
            PieceOutcome::Verified
        } else {
            self.shared.metrics.rejected();
            warn!(index, "chunk failed its hash");
            PieceOutcome::HashMismatch
        };
        let now = self.now();
        let kind = self.links.get(&peer).and_then(|l| l.kind);
        match self.scheduler.handle_piece(now, peer, index, outcome) {
            Ok(PieceAction::Write) => {
                if let Some(arriving) = self.arriving.get(&index) {
                    arriving.verified(&data);
                }
                let written = self.write(index, &data, hash);
                match written {
                    Ok(()) => {
                        if let Some(kind) = kind {
                            self.shared.metrics.received(kind.source(), data.len() as u64);
                        }
                        self.pending_bytes += data.len() as u64;
                        if self.sync_due.is_none() {
                            self.sync_due = Some(Instant::now() + self.sync_every);
                        }
                    }
                    Err(err) => {
                        warn!(index, %err, "cannot write chunk");
                        let _ = self.scheduler.handle_write_failed(now, index);
                    }
                }
            }
            Ok(PieceAction::Discard) | Err(_) => {}
        }
    }

    fn write(&mut self, index: ChunkIndex, data: &[u8], hash: ChunkHash) -> Result<(), String> {
        match self.backend.as_mut() {
            Some(Backend::Staging(job)) => {
                job.write_verified_chunk(index, data, hash).map_err(|e| e.to_string())
            }
            Some(Backend::Store { store, batch, pending }) => {
                let batch = batch.get_or_insert_with(|| store.batch());
                batch.put_prehashed(hash, data).map_err(|e| e.to_string())?;
                pending.push(index);
                Ok(())
            }
            Some(Backend::Staged(_)) | None => Err("not accepting chunks".into()),
        }
    }

    /// Group commit: makes written chunks durable, then tells the scheduler (which announces
    /// them).
    fn sync(&mut self) {
        self.sync_due = None;
        self.pending_bytes = 0;
        let now = self.now();
        let result: Result<Vec<ChunkIndex>, (Vec<ChunkIndex>, String)> = match self.backend.as_mut()
        {
            Some(Backend::Staging(job)) => {
                if job.pending() == 0 {
                    return;
                }
                tokio::task::block_in_place(|| job.sync()).map_err(|err| {
                    let lost = match &err {
                        crate::stage::StageError::SyncFailed { lost, .. } => lost.clone(),
                        _ => Vec::new(),
                    };
                    (lost, err.to_string())
                })
            }
            Some(Backend::Store { batch, pending, .. }) => match batch.take() {
                None => return,
                Some(b) => {
                    let indices = std::mem::take(pending);
                    match tokio::task::block_in_place(|| b.commit()) {
                        Ok(_) => Ok(indices),
                        Err(err) => Err((indices, err.to_string())),
                    }
                }
            },
            _ => return,
        };
        match result {
            Ok(done) => {
                for index in done {
                    // Served from disk from now on; uploads under way finish from memory.
                    self.arriving.remove(&index);
                    let _ = self.scheduler.handle_written(now, index);
                }
            }
            Err((lost, err)) => {
                warn!(%err, chunks = lost.len(), "cannot make chunks durable");
                for index in lost {
                    self.arriving.remove(&index);
                    let _ = self.scheduler.handle_write_failed(now, index);
                }
            }
        }
    }

    /// Runs the scheduler and the sessions until neither has anything more to say, then
    /// flushes every control stream.
    fn drive(&mut self) {
        loop {
            let mut progressed = false;
            let peers: Vec<PeerId> = self.links.keys().copied().collect();
            for peer in peers {
                while let Some(event) =
                    self.links.get_mut(&peer).and_then(|l| l.session.poll_event())
                {
                    progressed = true;
                    self.deliver(peer, event);
                }
            }
            while let Some(command) = self.scheduler.poll_command() {
                progressed = true;
                self.execute(command);
            }
            if !progressed {
                break;
            }
        }
        for link in self.links.values_mut() {
            let mut out = BytesMut::new();
            if link.session.write_frames(&mut out) > 0 {
                let _ = link.control.send(out.freeze());
            }
        }
    }

    fn deliver(&mut self, peer: PeerId, event: Event) {
        let now = self.now();
        let connected = match &event {
            Event::Connected { role } => Some(*role),
            _ => None,
        };
        if let Err(err) = event.deliver(&mut self.scheduler, now, peer) {
            let code = ErrorCode::from_event_error(&err);
            self.close(peer, code, &err.to_string());
            return;
        }
        if let Some(role) = connected {
            let bits = self.scheduler.bitfield().clone();
            if let Some(link) = self.links.get_mut(&peer) {
                link.kind = Some(role);
                self.shared.metrics.peer_connected();
                debug!(peer = %link.identity, role = kind_name(role), "peer connected");
                let _ = link.session.send_bitfield(&bits);
            }
        }
    }

    fn execute(&mut self, command: Command) {
        let now = self.now();
        match &command {
            Command::Announce { peers, .. } => {
                // The peers the scheduler knows are the sessions past their handshake; a
                // session still in it gets the chunk in its bitfield.
                for peer in peers {
                    if let Some(link) = self.links.get_mut(peer) {
                        let _ = link.session.send_command(&command);
                    }
                }
            }
            &Command::Serve { peer, index } => self.serve(peer, index),
            Command::Request { peer, .. }
            | Command::Cancel { peer, .. }
            | Command::Reject { peer, .. } => {
                if let Some(link) = self.links.get_mut(peer) {
                    let _ = link.session.send_command(&command);
                }
            }
            &Command::Ban { peer, reason } => {
                self.banned.insert(peer);
                self.shared.metrics.banned();
                if let Some(link) = self.links.remove(&peer) {
                    warn!(peer = %link.identity, ?reason, "peer banned");
                    link.conn.close(ErrorCode::BANNED.into(), b"banned: bad chunk");
                    if link.kind.is_some() {
                        self.shared.metrics.peer_disconnected();
                    }
                }
            }
            Command::RequestOriginPermit => {
                // The fleet-wide cap on origin fetches is granted by the coordinator once it
                // exists; until then every request is granted and the origin's upload slots
                // bound what it serves at once.
                self.scheduler.handle_permit_granted(now);
            }
            Command::ReleaseOriginPermit => {}
            &Command::Withdraw { index } => {
                if let Some(arriving) = self.arriving.remove(&index) {
                    arriving.fail();
                }
            }
            Command::Complete => self.complete(),
        }
    }

    fn serve(&mut self, peer: PeerId, index: ChunkIndex) {
        let now = self.now();
        let Some(link) = self.links.get_mut(&peer) else {
            let _ = self.scheduler.handle_upload_done(now, peer, index);
            return;
        };
        if let Some(arriving) = self.arriving.get(&index).cloned() {
            // Passed on while it arrives: streamed from memory as the bytes come.
            match link.session.send_command(&Command::Serve { peer, index }) {
                Ok(Outbound::Piece(header)) => {
                    self.shared.metrics.forwarded();
                    let upload = Upload {
                        conn: link.conn.clone(),
                        header,
                        tx: self.tx.clone(),
                        peer,
                        to_cache: link.kind == Some(PeerKind::Cache),
                    };
                    let metrics = self.shared.metrics.clone();
                    tokio::spawn(upload_arriving(upload, arriving, metrics));
                }
                _ => {
                    let _ = self.scheduler.handle_upload_done(now, peer, index);
                }
            }
            return;
        }
        let read = match self.backend.as_ref() {
            Some(Backend::Staging(job)) => job.read_chunk(index).map_err(|e| e.to_string()),
            Some(Backend::Staged(area)) => {
                area.read_chunk(&self.id, index).map_err(|e| e.to_string())
            }
            Some(Backend::Store { store, .. }) => match self.manifest.chunks.get(index as usize) {
                Some(info) => store.get(&info.hash).map_err(|e| e.to_string()),
                None => Err("no such chunk".into()),
            },
            None => Err("no backend".into()),
        };
        let mut data = match read {
            Ok(data) => data,
            Err(err) => {
                warn!(index, %err, "cannot read a chunk to serve");
                let reject = Command::Reject { peer, index, reason: RejectReason::NotHave };
                let _ = link.session.send_command(&reject);
                let _ = self.scheduler.handle_upload_done(now, peer, index);
                return;
            }
        };
        match link.session.send_command(&Command::Serve { peer, index }) {
            Ok(Outbound::Piece(header)) => {
                if self.corrupt_uploads {
                    if let Some(b) = data.first_mut() {
                        *b ^= 0xff;
                    }
                }
                let conn = link.conn.clone();
                let tx = self.tx.clone();
                let to_cache = link.kind == Some(PeerKind::Cache);
                tokio::spawn(upload(conn, header, data, tx, peer, to_cache));
            }
            _ => {
                let _ = self.scheduler.handle_upload_done(now, peer, index);
            }
        }
    }

    fn complete(&mut self) {
        if self.role == PeerKind::Peer {
            // A host with everything needs nothing from its sources: free their slots (the
            // origin counts the hosts connected to it).
            let sources: Vec<PeerId> = self
                .links
                .iter()
                .filter(|(_, l)| matches!(l.kind, Some(PeerKind::Cache | PeerKind::Origin)))
                .map(|(&p, _)| p)
                .collect();
            for peer in sources {
                self.close(peer, ErrorCode::NO_ERROR, "complete");
            }
        }
        let elapsed = Instant::now().saturating_duration_since(self.started).as_secs_f64();
        match self.backend.take() {
            Some(Backend::Staging(job)) => {
                let job = *job;
                let on_complete = self.on_complete.take();
                let backend = match on_complete {
                    Some(f) => tokio::task::block_in_place(|| f(job)),
                    None => Some(Backend::Staging(Box::new(job))),
                };
                let staged = backend.is_some();
                self.shared.metrics.transfer_ended(staged, elapsed);
                self.backend = backend;
                if !staged {
                    // The whole artifact failed its check: nothing here may be served.
                    self.stopping = true;
                }
            }
            other => {
                info!(seconds = elapsed, "every chunk held");
                self.backend = other;
            }
        }
    }
}

fn table_of(scheduler: &Scheduler) -> ChunkTable {
    scheduler.table().clone()
}

fn kind_name(kind: PeerKind) -> &'static str {
    match kind {
        PeerKind::Peer => "host",
        PeerKind::Cache => "cache",
        PeerKind::Origin => "origin",
    }
}

async fn sleep_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn write_control(mut send: SendStream, mut rx: mpsc::UnboundedReceiver<Bytes>) {
    while let Some(bytes) = rx.recv().await {
        if send.write_all(&bytes).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

async fn read_control(mut recv: RecvStream, tx: mpsc::Sender<Msg>, peer: PeerId, generation: u64) {
    while let Ok(Some(chunk)) = recv.read_chunk(crate::protocol::MAX_CONTROL_FRAME, true).await {
        let msg = Msg::Control { peer, generation, bytes: chunk.bytes };
        if tx.send(msg).await.is_err() {
            return;
        }
    }
    let _ = tx.send(Msg::Closed { peer, generation }).await;
}

async fn accept_pieces(
    conn: Connection,
    tx: mpsc::Sender<Msg>,
    peer: PeerId,
    generation: u64,
    limit: Option<Arc<RateLimit>>,
) {
    while let Ok(stream) = conn.accept_uni().await {
        tokio::spawn(read_piece(stream, tx.clone(), peer, generation, limit.clone()));
    }
    let _ = tx.send(Msg::Closed { peer, generation }).await;
}

async fn read_piece(
    mut recv: RecvStream,
    tx: mpsc::Sender<Msg>,
    peer: PeerId,
    generation: u64,
    limit: Option<Arc<RateLimit>>,
) {
    let fail = |code: ErrorCode, what: String| Msg::StreamError { peer, generation, code, what };
    let mut decoder = PieceDecoder::new();
    let mut buf = BytesMut::new();
    let mut header: Option<PieceHeader> = None;
    let mut feed: Option<Arc<Arriving>> = None;
    let mut data = BytesMut::new();
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(None) => break,
                Ok(Some(PieceData::Header(h))) => {
                    let (reply, answer) = oneshot::channel();
                    let msg = Msg::PieceHeader { peer, generation, header: h, reply };
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                    match answer.await {
                        Ok(HeaderReply::Read(f)) => feed = f,
                        Ok(HeaderReply::Stop) | Err(_) => {
                            let _ = recv.stop(ErrorCode::CANCELLED.0.into());
                            return;
                        }
                    }
                    // The session checked the length against the manifest: at most 16 MiB.
                    data.reserve(h.length as usize);
                    header = Some(h);
                }
                Ok(Some(PieceData::Bytes(bytes))) => {
                    data.extend_from_slice(&bytes);
                    if let Some(feed) = &feed {
                        feed.push(bytes);
                    }
                }
                Err(err) => {
                    let _ = tx.send(fail(err.code(), err.to_string())).await;
                    return;
                }
            }
        }
        match recv.read_chunk(1 << 20, true).await {
            Ok(Some(chunk)) => {
                if let Some(limit) = &limit {
                    limit.take(chunk.bytes.len() as u64).await;
                }
                if !(buf.is_empty() && decoder.in_body()) {
                    buf.extend_from_slice(&chunk.bytes);
                    continue;
                }
                // The chunk's bytes go from QUIC's buffer into the piece: one copy, not two.
                let mut bytes = chunk.bytes;
                loop {
                    match decoder.decode_bytes(&mut bytes) {
                        Ok(Some(part)) => {
                            data.extend_from_slice(&part);
                            if let Some(feed) = &feed {
                                feed.push(part);
                            }
                        }
                        Ok(None) => break,
                        Err(err) => {
                            let _ = tx.send(fail(err.code(), err.to_string())).await;
                            return;
                        }
                    }
                }
            }
            Ok(None) => break,
            Err(quinn::ReadError::Reset(code)) if code == ErrorCode::WITHDRAWN.0.into() => {
                // A piece passed on while it arrived, whose sender's copy failed.
                if let Some(h) = header {
                    let _ = tx.send(Msg::Withdrawn { peer, generation, index: h.index }).await;
                }
                return;
            }
            Err(err) => {
                // A reset we did not ask for, or the connection went away.
                let _ = tx.send(fail(ErrorCode::PROTOCOL_VIOLATION, err.to_string())).await;
                return;
            }
        }
    }
    if let Err(err) = decoder.finish() {
        let _ = tx.send(fail(err.code(), err.to_string())).await;
        return;
    }
    let Some(header) = header else { return };
    // Hashed whole, once: BLAKE3 hashes many 1 KiB blocks at once (SIMD) only when it has
    // them, and QUIC hands the bytes over a packet (about 1.2 KB) at a time.
    let hash = ChunkHash::of(&data);
    let msg = Msg::Piece { peer, generation, index: header.index, data: data.freeze(), hash };
    let _ = tx.send(msg).await;
}

/// An upload's ends: where it goes, and whom to tell when it is over.
struct Upload {
    conn: Connection,
    header: PieceHeader,
    tx: mpsc::Sender<Msg>,
    peer: PeerId,
    to_cache: bool,
}

/// Streams a chunk that is still arriving, as its bytes come: finished once a copy of it is
/// verified here, reset with `WITHDRAWN` if the copy fails.
async fn upload_arriving(up: Upload, arriving: Arc<Arriving>, metrics: Metrics) {
    let Upload { conn, header, tx, peer, to_cache } = up;
    let mut flow = arriving.flow.subscribe();
    let sent = async {
        let mut send = conn.open_uni().await.ok()?;
        let mut head = BytesMut::new();
        Frame::Piece(header).encode(&mut head).ok()?;
        send.write_all_chunks(&mut [head.freeze()]).await.ok()?;
        let mut next = 0;
        loop {
            flow.borrow_and_update();
            let (mut parts, state) = arriving.parts_from(next);
            next += parts.len();
            send.write_all_chunks(&mut parts).await.ok()?;
            match state {
                Flow::Verified => {
                    send.finish().ok()?;
                    return Some(true);
                }
                Flow::Failed => {
                    metrics.withdrawn();
                    let _ = send.reset(ErrorCode::WITHDRAWN.0.into());
                    return Some(false);
                }
                Flow::Receiving => {
                    if flow.changed().await.is_err() {
                        return Some(false);
                    }
                }
            }
        }
    }
    .await
    .unwrap_or(false);
    let bytes = u64::from(header.length);
    let msg = Msg::UploadDone { peer, index: header.index, bytes, to_cache, sent };
    let _ = tx.send(msg).await;
}

async fn upload(
    conn: Connection,
    header: PieceHeader,
    data: Vec<u8>,
    tx: mpsc::Sender<Msg>,
    peer: PeerId,
    to_cache: bool,
) {
    let bytes = data.len() as u64;
    let sent = async {
        let mut send = conn.open_uni().await.ok()?;
        let mut head = BytesMut::new();
        Frame::Piece(header).encode(&mut head).ok()?;
        // Handed to QUIC as they are: `write_all` would copy the chunk into its buffer.
        send.write_all_chunks(&mut [head.freeze(), Bytes::from(data)]).await.ok()?;
        send.finish().ok()?;
        Some(())
    }
    .await
    .is_some();
    let msg = Msg::UploadDone { peer, index: header.index, bytes, to_cache, sent };
    let _ = tx.send(msg).await;
}

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    /// The QUIC connection (or its authentication) failed.
    #[error(transparent)]
    Connect(#[from] crate::transport::ConnectError),
    /// The control stream could not be opened.
    #[error("cannot open the control stream: {0}")]
    Stream(#[from] crate::transport::ConnectionError),
    /// The transfer stopped meanwhile.
    #[error("the transfer stopped")]
    Stopped,
}

impl DialError {
    /// Whether the remote proved another identity than the one expected.
    pub(crate) fn is_wrong_identity(&self) -> bool {
        matches!(
            self,
            DialError::Connect(
                crate::transport::ConnectError::PeerIdMismatch { .. }
                    | crate::transport::ConnectError::MissingIdentity { .. }
            )
        )
    }
}

/// Dials `addr`, authenticating the remote as `expected`, opens the control stream and hands
/// the connection to `handle`.
pub(crate) async fn dial(
    endpoint: &crate::transport::Endpoint,
    handle: &TransferHandle,
    addr: SocketAddr,
    expected: Identity,
    expect_role: PeerKind,
) -> Result<(), DialError> {
    let conn = endpoint.connect(addr, expected).await?;
    let (send, recv) = conn.open_bi().await?;
    let attach = Attach { conn, send, recv, hello: None, expect_role: Some(expect_role) };
    if handle.attach(attach).await { Ok(()) } else { Err(DialError::Stopped) }
}

impl TransferHandle {
    /// Waits until the actor has stopped.
    pub(crate) async fn stopped(&self) {
        self.done.cancelled().await;
    }
}

/// A byte-rate cap shared by every piece reader of the daemon: a reader that takes bytes past
/// the rate sleeps until they are due, which stops reading the stream, so QUIC flow control
/// slows the sender. Bursts up to a tenth of a second of the rate go through at once.
#[derive(Debug)]
pub(crate) struct RateLimit {
    bytes_per_sec: u64,
    /// When the bytes taken so far are paid for.
    paid_until: Mutex<Instant>,
}

impl RateLimit {
    pub(crate) fn new(bytes_per_sec: u64) -> Self {
        Self { bytes_per_sec: bytes_per_sec.max(1), paid_until: Mutex::new(Instant::now()) }
    }

    async fn take(&self, bytes: u64) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        let due = {
            let mut paid = self.paid_until.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            *paid = (*paid).max(now) + cost;
            *paid
        };
        let burst = Duration::from_millis(100);
        if let Some(wait) = due.checked_duration_since(Instant::now() + burst) {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_paces_bytes_to_the_rate_after_a_burst() {
        let limit = RateLimit::new(1_000_000);
        let start = Instant::now();
        // A tenth of a second of the rate passes at once.
        limit.take(100_000).await;
        assert_eq!(Instant::now(), start);
        // Ten megabytes take ten seconds, less the burst.
        for _ in 0..100 {
            limit.take(100_000).await;
        }
        let elapsed = Instant::now() - start;
        assert!(elapsed >= Duration::from_millis(9_990), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(10_010), "{elapsed:?}");
    }

    #[test]
    fn identities_keep_their_handle() {
        let interner = Interner::default();
        let a = libp2p_identity::Keypair::generate_ed25519().public().to_peer_id();
        let b = libp2p_identity::Keypair::generate_ed25519().public().to_peer_id();
        let (ha, hb) = (interner.intern(a), interner.intern(b));
        assert_ne!(ha, hb);
        assert_eq!(interner.intern(a), ha);
    }
}
