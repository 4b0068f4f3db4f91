//! The swarm scheduler: for one manifest being staged on one host, which chunk to ask whom for,
//! whom to serve, and what to do when a peer misbehaves.
//!
//! [`Scheduler`] is a sans-io state machine (DESIGN.md, "Sans-io cores"): the daemon feeds it
//! events through `handle_*(now, ..)` methods and carries out the [`Command`]s it takes from
//! [`Scheduler::poll_command`]; the simulator drives the very same code on a virtual clock. The
//! scheduler never reads a clock, opens a socket or a file, or hashes a byte. Time is a
//! [`Duration`] since an epoch the caller chooses (it must not go backwards; an earlier `now` is
//! treated as the latest one seen). Randomness comes from a ChaCha8 generator seeded at
//! construction, and every collection it iterates is ordered, so **the same seed and the same
//! event sequence give the same command sequence**, on every platform.
//!
//! # Model
//!
//! The manifest's chunks are numbered `0..n` ([`ChunkIndex`], the position in the manifest's
//! chunk list; [`ChunkTable`] keeps their lengths). On this host every chunk is in one state:
//!
//! - **wanted**: not here yet; zero or more requests for it are outstanding.
//! - **writing**: a copy arrived and the shell verified it ([`PieceAction::Write`]); the shell is
//!   writing it to disk.
//! - **held**: durable on disk ([`Scheduler::handle_written`]). Only held chunks are announced
//!   ([`Command::Announce`]) and served, so a peer never fetches a chunk this host could lose in
//!   a crash. [`Scheduler::bitfield`] is the held set, to send to each newly connected peer.
//!   With [`SwarmConfig::forward_arriving`], a wanted chunk is also announced and served from
//!   its first bytes in ([`Scheduler::handle_piece_started`]) until its copy fails
//!   ([`Command::Withdraw`]); the requesters verify what they receive as always.
//!   A chunk is announced to the connected peers not known to hold it already (have
//!   suppression: a region peer whose bitfield or haves show it is not told).
//!
//! # Sources
//!
//! Each chunk is taken from the cheapest place that has it ([`Source`], in order of preference):
//!
//! - `Disk`: chunks of older releases (dedup). Never asked for: given to [`Scheduler::new`] as
//!   held.
//! - `Peer`: hosts of the region staging the same manifest. Asked for any chunk they advertise,
//!   rarest first.
//! - `Cache`: the region's cache(s), pull-through. Asked only for chunks that no *live* region
//!   peer advertises.
//! - `Origin`: the authoritative store. The same, but only while no live cache is connected and
//!   only while holding the fleet-wide origin permit.
//!
//! A peer is *live* while it is connected, not banned, not refusing us, and not stalled (timed
//! out, see below); a peer that answered `Busy` is live (it has the chunks, it is saturated) but
//! is not asked until its back-off ends. Chunks that no live region peer advertises are
//! *region-rare*; only those go back to source, so a region's cache serves each chunk about once
//! and the hosts trade the rest. Caches and the origin are assumed to have every chunk (a cache
//! pulls through) until they say otherwise with a bitfield or a [`RejectReason::NotHave`].
//!
//! Hosts that pick the same region-rare chunk before any of them announces it each cost the
//! source a copy. Requesters keep few requests at a source
//! ([`SwarmConfig::max_in_flight_back_to_source`]); a source can also refuse a chunk it has just
//! sent to another host ([`SwarmConfig::seed_window`], "super-seeding"), and the refused host
//! ([`RejectReason::SeededRecently`]) waits for a peer to announce it, which makes it exactly
//! one copy per window.
//!
//! Back-to-source requests start only [`SwarmConfig::back_to_source_delay`] after the scheduler
//! was created, so that the region peers' bitfields (which arrive within round trips of
//! connecting) are known first; otherwise every host of a region starting at once would ask the
//! cache for its first chunks before learning that its neighbours have them.
//!
//! The origin permit caps how many hosts of the whole fleet fetch from the origin at once. The
//! scheduler asks for it with [`Command::RequestOriginPermit`] when it has region-rare chunks to
//! fetch, no live cache and a connected origin; it requests from the origin only between
//! [`Scheduler::handle_permit_granted`] and its own [`Command::ReleaseOriginPermit`], which it
//! emits as soon as it has nothing in flight to the origin and nothing more to ask it for. After
//! [`Scheduler::handle_permit_denied`] it asks again [`SwarmConfig::origin_permit_retry`] later.
//! How the cap is enforced (a coordinator lease, a semaphore in the simulator) is the shell's
//! business.
//!
//! # Events
//!
//! - [`handle_connected`](Scheduler::handle_connected): an authenticated peer of a
//!   [`PeerKind`] is connected; [`handle_disconnected`](Scheduler::handle_disconnected): it is
//!   gone, and its requests are re-issued elsewhere.
//! - [`handle_bitfield`](Scheduler::handle_bitfield): the full set of chunks a peer holds
//!   (replacing what it said before); [`handle_have`](Scheduler::handle_have): one more.
//! - [`handle_piece`](Scheduler::handle_piece): a chunk's bytes arrived and the shell hashed
//!   them ([`PieceOutcome`]); the answer ([`PieceAction`]) says whether to write them.
//! - [`handle_rejected`](Scheduler::handle_rejected): a peer refused one of our requests
//!   ([`RejectReason`]).
//! - [`handle_written`](Scheduler::handle_written): a chunk is durable on disk;
//!   [`handle_write_failed`](Scheduler::handle_write_failed): writing it failed.
//! - Upload side: [`handle_request`](Scheduler::handle_request) (a peer asks us for a chunk),
//!   [`handle_cancel`](Scheduler::handle_cancel) (it withdraws the request),
//!   [`handle_upload_done`](Scheduler::handle_upload_done) (an upload finished or failed).
//! - [`handle_permit_granted`](Scheduler::handle_permit_granted) and
//!   [`handle_permit_denied`](Scheduler::handle_permit_denied): the answer to
//!   `RequestOriginPermit`.
//! - [`handle_timeout`](Scheduler::handle_timeout): the deadline from
//!   [`poll_timeout`](Scheduler::poll_timeout) has passed.
//!
//! Events carrying peer data return [`EventError`] when they do not fit the state (unknown or
//! banned peer, index out of range, wrong bitfield length); the state is then unchanged and the
//! shell decides (usually: drop the connection).
//!
//! # Commands
//!
//! See [`Command`]: `Request` (batched per peer), `Cancel`, `Announce`, `Serve`, `Reject`, `Ban`,
//! `RequestOriginPermit`, `ReleaseOriginPermit`, `Complete`. After every event the shell drains
//! [`Scheduler::poll_command`], then arms a timer for [`Scheduler::poll_timeout`].
//!
//! **Request lifecycle.** Every requested (peer, chunk) pair ends in exactly one of: the piece
//! arrives from that peer, that peer rejects it, the scheduler emits `Cancel` for it (endgame
//! duplicate, timeout), or the peer disconnects or is banned. So the shell (and a test) can track
//! what is outstanding from the commands alone, and a remote peer's view matches ours. A piece
//! or rejection that crosses a `Cancel` on the wire is still accepted (a verified late piece of a
//! wanted chunk is kept, anything else is discarded).
//!
//! # Piece selection
//!
//! Requests go out whenever a peer that is not backed off has a free request slot and something
//! we want. The request counts are narrowed to byte limits for manifests of large chunks
//! ([`SwarmConfig::max_in_flight_bytes_per_peer`], [`SwarmConfig::max_in_flight_bytes_total`]).
//! Region peers compete for the shared budget ([`SwarmConfig::max_in_flight_total`]) by
//! score; caches and the origin have their own per-connection limit on top. Candidates are served
//! in order of kind (region peers, then caches, then the origin) and then score (measured
//! throughput, unmeasured peers first so that each gets tried; ties by a per-peer random number
//! so that hosts do not all favour the same peer).
//!
//! - **Rarest first**: a peer is asked for the wanted chunks it has that the fewest live region
//!   peers advertise, ties broken at random. Rare chunks are the ones the swarm could lose and the
//!   ones other hosts will want from us.
//! - **Random first**: until this host holds [`SwarmConfig::random_first_chunks`] chunks it picks
//!   at random instead: the rarest chunks are the slowest to get (few sources), and a fresh host
//!   should have something to trade quickly.
//! - **Endgame**: once at most [`SwarmConfig::endgame_threshold`] chunks (and
//!   [`SwarmConfig::endgame_bytes`]) are wanted, chunks that are already requested are also
//!   requested from other peers (and caches, for region-rare chunks; never the origin), up to
//!   [`SwarmConfig::endgame_max_requests`] outstanding requests per chunk, so that one slow
//!   peer does not hold up the finish. When a copy arrives, the others are cancelled
//!   (`Cancel`).
//!
//! # Failure handling
//!
//! - **Bad chunk**: a [`PieceOutcome::HashMismatch`] drops the bytes and counts against the peer;
//!   at [`BanPolicy::hash_mismatches`] (default: the first) the peer is banned: [`Command::Ban`]
//!   (the shell drops the connection), its bitfield and requests are forgotten, and it is never
//!   asked again, not even after reconnecting ([`EventError::Banned`]). Its requests to us are
//!   rejected with [`RejectReason::Banned`]. The chunk is requested elsewhere. Chunks travel over
//!   authenticated, integrity-protected QUIC, so a mismatch is a fault of the peer, not the wire.
//! - **Timeout**: when a request has been outstanding for [`SwarmConfig::request_timeout`], all
//!   of that peer's requests are cancelled and re-issued elsewhere, its throughput estimate is
//!   halved, and it is backed off for [`SwarmConfig::timeout_backoff`], doubling with each
//!   consecutive timeout up to [`SwarmConfig::timeout_backoff_max`]. A piece from it resets the
//!   streak. While stalled its chunks do not count as available, so if it alone had a chunk, the
//!   chunk goes to the cache.
//! - **Busy**: a [`RejectReason::Busy`] backs the peer off for [`SwarmConfig::busy_backoff`]
//!   (doubling with each consecutive `Busy` up to [`SwarmConfig::busy_backoff_max`]), halves
//!   the number of requests we keep at it (its window, which grows back by one per window of
//!   pieces it sends, up to [`SwarmConfig::max_in_flight_per_peer`]) and re-issues the chunk
//!   elsewhere; its chunks still count as available. So a host keeps at each peer about what
//!   that peer serves and queues for it, instead of finding its capacity by rejections.
//!   `NotHave` corrects our view of the peer's chunks. `Banned` (the peer refuses us) stops
//!   all requests to it and its chunks stop counting. `SeededRecently` keeps the chunk from
//!   caches and the origin for [`SwarmConfig::seeded_defer`], and after
//!   [`SwarmConfig::seeded_refusals`] of them in a row the refusing source is backed off like
//!   a `Busy` peer, the back-off doubling with each such streak until it sends a piece or
//!   announces a new chunk (it is seeding what we would ask it for; its chunks reach us from
//!   the peers it seeded).
//! - **Disconnect**: its outstanding requests are re-issued elsewhere.
//! - **Write failure**: the chunk becomes wanted again.
//!
//! # Upload side
//!
//! At most [`SwarmConfig::upload_slots`] uploads run at once, at most
//! [`SwarmConfig::upload_slots_per_peer`] of them to one peer (one greedy downloader cannot take
//! every slot). A request beyond that waits in a queue of [`SwarmConfig::upload_queue_len`]
//! entries for up to [`SwarmConfig::upload_queue_timeout`], and is rejected `Busy` when the queue
//! is full or its wait expires: the requester then backs off and asks someone else, which
//! spreads load better than a long queue. A full queue still takes a request from a peer with
//! nothing running or queued here: it displaces (`Busy`) the youngest queued request of the
//! peer holding the most places, so every asking peer gets a turn (a seeding source turns its
//! requesters over by its seed window instead). A free slot goes to the queued peer with the
//! fewest uploads running; among equals, to the one holding the fewest chunks (the furthest
//! behind), then to the oldest request. Only held (durable) chunks are
//! served; banned peers never are. A source with a [`SwarmConfig::seed_window`] also refuses
//! a chunk it has just sent to another host (see Sources).
//!
//! # Cost
//!
//! Per scheduler: the held set (n/8 bytes); while staging, 11 bytes per chunk for the rarest-first
//! order (released on completion); per peer under 224 bytes (with its bitfield, up to 256
//! chunks), its in-flight requests, and for more chunks its bitfield (n/8 bytes); a bitfield is
//! dropped when the peer is known to have everything (caches, the origin, and finished hosts
//! unless have suppression kept some of their chunks from us); with a
//! `seed_window` (sources only), 24 bytes per chunk. For 3,200 chunks and 50 half-done peers
//! that is about 75 KB while staging and 10 KB once complete.
//!
//! A have-announcement costs O(1); a piece costs O(requests picked) plus O(useful peers) (those
//! advertising a wanted chunk); passes over candidates (when the global request budget was
//! full, and after a disconnect, timeout or rejection) are O(useful peers · log) and skip the
//! hosts that have nothing for us, so a cache holding thousands of hosts pays for the few that
//! have a chunk it lacks. Nothing scans chunks x peers. [`Scheduler::poll_timeout`] is
//! O(1) (peer deadlines and deferrals are kept ordered) and [`Scheduler::handle_timeout`] visits
//! only the peers due. A deferred chunk costs about 40 bytes while deferred.

mod bitfield;
mod deferred;
mod picker;

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fleetwave_chunker::ChunkInfo;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use bitfield::{Bitfield, BitfieldError, Ones};
use deferred::Deferred;
use picker::Picker;

/// Index of a chunk in its manifest's ordered chunk list.
pub type ChunkIndex = u32;

/// Most peers one scheduler tracks at once: what the 16-bit availability counters can count.
/// A host keeps a bounded random set of peers (tens) per manifest, but a cache holds one
/// connection per host of its region (17,000 in the 50,000-host simulation), so the scheduler's
/// passes are over the peers that have something for it, never over every connected peer.
pub const MAX_PEERS: usize = u16::MAX as usize;

/// Opaque handle of a connected peer.
///
/// The daemon interns each authenticated libp2p `PeerId` (a multihash of up to 64 bytes) to a
/// `u64` and keeps the map; the simulator uses host numbers directly. Eight bytes, `Copy` and
/// `Ord`: cheap to keep in every in-flight request and iterated in a deterministic order. The
/// same identity must get the same id when it reconnects: bans are keyed on it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub u64);

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer#{}", self.0)
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer#{}", self.0)
    }
}

/// What a connected peer is, which decides what it is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerKind {
    /// A host of the same region staging the same manifest.
    Peer,
    /// A cache of the region: pulls through from the origin, serves region-rare chunks.
    Cache,
    /// The origin: the last resort, under the fleet-wide permit.
    Origin,
}

impl PeerKind {
    /// The source a chunk from this kind of peer is counted under.
    pub fn source(self) -> Source {
        match self {
            PeerKind::Peer => Source::Peer,
            PeerKind::Cache => Source::Cache,
            PeerKind::Origin => Source::Origin,
        }
    }
}

/// Where a chunk came from, in order of preference (cheapest first). Progress counters are kept
/// per source; which peer delivered which chunk is not kept (it would cost memory per chunk).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// Already on this host's disk (an older release had it).
    Disk,
    /// A region peer.
    Peer,
    /// A regional cache.
    Cache,
    /// The origin.
    Origin,
}

/// The shell's verdict on a received chunk: it hashed the bytes against the manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PieceOutcome {
    /// The BLAKE3 hash matches the manifest's.
    Verified,
    /// It does not: the bytes are dropped and the sender is penalised.
    HashMismatch,
}

/// What the shell does with a received chunk's bytes, returned by [`Scheduler::handle_piece`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PieceAction {
    /// Write them at the chunk's offset, then report [`Scheduler::handle_written`] (or
    /// [`Scheduler::handle_write_failed`]).
    Write,
    /// Drop them: a bad chunk, or a copy of a chunk already here or being written.
    Discard,
}

/// Why a chunk request is refused; used in both directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Upload slots and queue are full, or the request waited too long in the queue. Transient.
    Busy,
    /// The chunk is not held (durably) by the peer asked.
    NotHave,
    /// The requester is banned by the peer asked.
    Banned,
    /// A cache or origin just sent this chunk to another host (within its
    /// [`SwarmConfig::seed_window`]): get it from that host once it announces it. The requester
    /// does not ask any cache or the origin for it again for [`SwarmConfig::seeded_defer`].
    SeededRecently,
}

/// Why a peer is banned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BanReason {
    /// It sent bytes that did not match the manifest's hash, the last time for this chunk.
    HashMismatch {
        /// The chunk of the mismatch that triggered the ban.
        index: ChunkIndex,
    },
}

/// Something the shell must do, from [`Scheduler::poll_command`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// Ask `peer` for these chunks (in order of preference), in one message.
    Request {
        /// Whom to ask.
        peer: PeerId,
        /// Chunks to ask for; never empty, never more than the peer's free request slots.
        chunks: Vec<ChunkIndex>,
    },
    /// Withdraw an earlier request (another copy arrived, or the request timed out).
    Cancel {
        /// Who was asked.
        peer: PeerId,
        /// The chunk.
        index: ChunkIndex,
    },
    /// Tell these connected peers that this chunk is now held (durably): a Have to each.
    ///
    /// **Have suppression**: region peers whose bitfield or haves already show the chunk are
    /// left out (they gain nothing from it: a held chunk is never wanted again, and what they
    /// know of our chunks matters to them only for the chunks they want), as BitTorrent clients
    /// do. Caches and the origin are always told: that they have every chunk is only our
    /// assumption. May be empty (every peer has it); emitted once per chunk held either way.
    Announce {
        /// The chunk.
        index: ChunkIndex,
        /// Whom to tell, in id order.
        peers: Vec<PeerId>,
    },
    /// Send this chunk to `peer`; report [`Scheduler::handle_upload_done`] when finished.
    Serve {
        /// The requester.
        peer: PeerId,
        /// The chunk, held durably.
        index: ChunkIndex,
    },
    /// Refuse `peer`'s request for this chunk.
    Reject {
        /// The requester.
        peer: PeerId,
        /// The chunk.
        index: ChunkIndex,
        /// Why.
        reason: RejectReason,
    },
    /// Drop the connection to `peer` and refuse it from now on. Emitted once per peer.
    Ban {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: BanReason,
    },
    /// The arriving copy of this chunk failed (corrupt, or its sender stalled or went away)
    /// before any copy was verified: abort every upload of it running (each reported with
    /// [`Scheduler::handle_upload_done`]); the peers served ask again elsewhere. Only with
    /// [`SwarmConfig::forward_arriving`].
    Withdraw {
        /// The chunk.
        index: ChunkIndex,
    },
    /// Ask the fleet-wide origin cap for a permit; answer with
    /// [`Scheduler::handle_permit_granted`] or [`Scheduler::handle_permit_denied`].
    RequestOriginPermit,
    /// Give the origin permit back.
    ReleaseOriginPermit,
    /// Every chunk is verified and durable. Emitted once.
    Complete,
}

/// Where this scheduler stands with the fleet-wide origin permit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OriginPermit {
    /// Not held, not asked for.
    Idle,
    /// Asked for, no answer yet.
    Requested,
    /// Held: requests to the origin are allowed.
    Granted,
    /// Refused; asked again from `retry_at` if still needed.
    Denied {
        /// When to ask again.
        retry_at: Duration,
    },
}

/// When to ban a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BanPolicy {
    /// Hash mismatches from one peer before it is banned. Default 1: chunks travel over
    /// authenticated, integrity-checked QUIC, so a single mismatch already proves that the
    /// peer's store or software is broken (or hostile), and every bad chunk costs a re-fetch.
    pub hash_mismatches: u32,
}

impl Default for BanPolicy {
    fn default() -> Self {
        Self { hash_mismatches: 1 }
    }
}

/// Limits and timings of a [`Scheduler`]. Every field has a default sized for 64 KiB - 1 MiB
/// chunks (256 KiB average) on LAN-to-WAN links; the comments say why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SwarmConfig {
    /// Requests outstanding to one region peer. Default 8: about 2 MiB in flight, enough to keep
    /// a 1 Gbit/s link to a peer 10 ms away busy, few enough that a stalled peer holds little.
    /// Lowered for manifests of large chunks by
    /// [`max_in_flight_bytes_per_peer`](Self::max_in_flight_bytes_per_peer).
    pub max_in_flight_per_peer: u32,
    /// Bytes outstanding to one region peer, counted in mean-sized chunks of the manifest: the
    /// scheduler takes the smaller of this and
    /// [`max_in_flight_per_peer`](Self::max_in_flight_per_peer) (at least one request). Default
    /// 4 MiB: three times what 1 Gbit/s at 10 ms keeps in flight. With 1 MiB chunks, 8 requests
    /// at each peer queued 8 s of a 100 Mbit/s host's download behind peers that were busy,
    /// while peers that had just received chunks went unasked.
    pub max_in_flight_bytes_per_peer: u64,
    /// Requests outstanding to one cache or origin connection. Default 2: back-to-source
    /// requests are only for region-rare chunks, and two hosts that pick the same one before
    /// either announces it cost the source a second copy; the more requests outstanding at the
    /// source, the more such collisions (without a [`seed_window`](Self::seed_window) at the
    /// source, measured in the in-memory swarm: 6 hosts behind one cache, 1.20x the artifact at
    /// 2, 1.32x at 4). Two keep a source with a handful of hosts busy; many hosts keep it busy
    /// anyway.
    pub max_in_flight_back_to_source: u32,
    /// Requests outstanding to region peers, over all of them. Default 64: 16 MiB of chunks in
    /// flight (and about that much memory waiting for the disk), enough for 1 Gbit/s at 100 ms;
    /// it also makes the best-scored peers win when slots are scarce. Requests to caches and the
    /// origin come on top, bounded per connection: they do not compete with region peers, so
    /// region-rare chunks keep flowing into the region however busy the host is trading.
    /// Lowered for manifests of large chunks by
    /// [`max_in_flight_bytes_total`](Self::max_in_flight_bytes_total).
    pub max_in_flight_total: u32,
    /// Bytes outstanding to region peers, over all of them, counted in mean-sized chunks (as
    /// [`max_in_flight_bytes_per_peer`](Self::max_in_flight_bytes_per_peer)). Default 32 MiB:
    /// with 1 MiB chunks, 64 requests were 8 s of a 100 Mbit/s download waiting in other
    /// hosts' upload queues. In the 3,000-host simulation (1.3 MB chunks) 24 requests in all and
    /// 3 per peer took the last host from 1.60x to 1.40x T_min; 16 in all starved the median
    /// host (21.9 s against 19.7 s).
    pub max_in_flight_bytes_total: u64,
    /// Chunks picked at random (not rarest first) until this many are held. Default 4: enough to
    /// have something to trade after the first round trip.
    pub random_first_chunks: u32,
    /// Endgame starts when at most this many chunks are wanted. Default 16: a few seconds of
    /// transfer at the tail, where one slow peer would otherwise set the finish time. Lowered
    /// for manifests of large chunks by [`endgame_bytes`](Self::endgame_bytes).
    pub endgame_threshold: u32,
    /// Endgame starts when at most this many bytes are wanted, counted in mean-sized chunks (the
    /// scheduler takes the smaller of this and [`endgame_threshold`](Self::endgame_threshold),
    /// at least one chunk). Default 4 MiB: a third of a second at 100 Mbit/s. Every duplicate
    /// request spends a peer's upload that another host was waiting for; with 1.3 MB chunks,
    /// 16 chunks (21 MB) of endgame took the 3,000-host simulation's last host from 1.27x to
    /// 1.36x T_min (seeds 1 and 2), and its 10 Mbit/s hosts' from 2.62x to 2.79x.
    pub endgame_bytes: u64,
    /// Most outstanding requests for one chunk in endgame (1 disables endgame). Default 2: a
    /// second copy routes around one slow peer; more copies mostly waste peers' upload.
    pub endgame_max_requests: u8,
    /// How long a request may stay outstanding. Default 10 s: a 1 MiB chunk queued behind seven
    /// others on a busy 10 Mbit/s upload still makes it; anything slower is better fetched
    /// elsewhere.
    pub request_timeout: Duration,
    /// Back-off after a peer's first timeout, doubled per consecutive timeout. Default 2 s.
    pub timeout_backoff: Duration,
    /// Longest timeout back-off. Default 60 s: a peer that recovers is used again.
    pub timeout_backoff_max: Duration,
    /// Back-off after a `Busy` rejection. Default 250 ms: upload slots free up in about one
    /// chunk transfer time (a 256 KiB chunk in one of 8 slots of a 50 Mbit/s uplink: ~330 ms).
    /// A busy peer's chunks still count as available: it is saturated, not gone.
    pub busy_backoff: Duration,
    /// Longest `Busy` back-off: each consecutive `Busy` from a peer (no piece from it in
    /// between) doubles [`busy_backoff`](Self::busy_backoff) up to this. Default 2 s, the
    /// upload queue's own timeout: a peer that keeps refusing is saturated by other
    /// requesters, and asking it four times a second only adds rejections. It also bounds
    /// the pauses of a source that keeps refusing as seeded recently
    /// ([`seeded_refusals`](Self::seeded_refusals)).
    pub busy_backoff_max: Duration,
    /// How long after creation caches and the origin may be asked. Default 500 ms: enough for
    /// the region peers' bitfields to arrive, so that back-to-source requests are only for
    /// chunks that no peer has.
    pub back_to_source_delay: Duration,
    /// How long after a denied origin permit to ask again. Default 1 s.
    pub origin_permit_retry: Duration,
    /// Uploads served at once (0: serve nobody). Default 8.
    pub upload_slots: u32,
    /// Uploads served at once to one peer. Default 4: at least two peers share the slots.
    pub upload_slots_per_peer: u32,
    /// Announce and serve a chunk from its first bytes in ([`Scheduler::handle_piece_started`])
    /// instead of once it is durable: the copy is passed on while it arrives (cut-through), so
    /// a chunk crosses the swarm in about a transfer time, not a transfer time a hop. The
    /// shell streams the arriving bytes to the peers served, finishes each such upload only
    /// once a verified copy of the chunk is here, and aborts them at [`Command::Withdraw`].
    /// Default off.
    pub forward_arriving: bool,
    /// Requests waiting for an upload slot. Default 32.
    pub upload_queue_len: u32,
    /// Longest wait in the upload queue before a `Busy` rejection. Default 2 s, well below the
    /// requester's `request_timeout`: a quick `Busy` lets it ask elsewhere at once.
    pub upload_queue_timeout: Duration,
    /// Source side ("super-seeding"): a chunk sent to one host is refused to other hosts
    /// ([`RejectReason::SeededRecently`]) for this long, so that they take it from that host.
    /// The window starts when the upload is accepted and starts again when it ends
    /// ([`Scheduler::handle_upload_done`]), so a long upload queue does not eat it.
    /// Caches asking are always served (they pull through for a whole region). Zero (the
    /// default) turns it off, which is right for hosts: they should share freely. The cache and
    /// origin roles set it to about the time a chunk takes to spread through the region (1 s):
    /// without it, hosts that pick the same region-rare chunk before anyone announced it each
    /// get a copy from the source, and that grows with the number of hosts asking at once. With
    /// it, the in-memory swarm tests measure exactly one copy from the source.
    pub seed_window: Duration,
    /// Requester side: after a [`RejectReason::SeededRecently`], how long the chunk is not asked
    /// of a cache or the origin. Default 1 s; peers may still be asked.
    pub seeded_defer: Duration,
    /// Requester side: after this many [`RejectReason::SeededRecently`] in a row from one cache
    /// or the origin (no piece from it in between), it is not asked for
    /// [`busy_backoff`](Self::busy_backoff) (0: never backed off). Default 4. A source that
    /// refused that many chunks is seeding about everything we could ask it for; early in a
    /// rollout, when every chunk is region-rare, asking for the rest one at a time walked the
    /// whole manifest through its refusals once per deferral (a request and a rejection per
    /// chunk per host per second), while the chunks it had just seeded reach us from peers.
    /// The first pause is short because someone must ask for each chunk as its window ends: a
    /// first pause of `seeded_defer` (1 s) made the median host of the 3,000-host simulation up
    /// to 2 s slower, 250 ms made it no slower. Each further pause in a row doubles, up to
    /// [`busy_backoff_max`](Self::busy_backoff_max), as `Busy` back-offs do, until the source
    /// sends us a piece or announces a chunk it did not have (a cache still pulling the
    /// manifest from the origin: what it refused says little about what comes next). Once
    /// the region's peers hold what a full source seeded, it refuses nearly everything: at
    /// 250 ms every time, each of 50,000 simulated hosts sent the caches 110 refused
    /// requests (5.5 M, 9 % of all events). In the 12,000-host simulation (seeds 1-3) the
    /// doubling took the refusals from 1.01-1.04 M to 0.49-0.50 M and the events by 8 %,
    /// with the median host no later in any region; without the reset on a new chunk, the
    /// median host of the region furthest from the origin came 0.1-0.17 s later.
    pub seeded_refusals: u32,
    /// When to ban a peer.
    pub ban: BanPolicy,
}

impl SwarmConfig {
    /// The back-off after the `streak`-th pause in a row (1 for the first):
    /// [`busy_backoff`](Self::busy_backoff) doubled per earlier pause, at most
    /// [`busy_backoff_max`](Self::busy_backoff_max) (never less than `busy_backoff`).
    fn busy_backoff_after(&self, streak: u8) -> Duration {
        let factor = 1u32 << streak.saturating_sub(1).min(16);
        (self.busy_backoff * factor).min(self.busy_backoff_max.max(self.busy_backoff))
    }
}

impl Default for SwarmConfig {
    fn default() -> Self {
        Self {
            max_in_flight_per_peer: 8,
            max_in_flight_bytes_per_peer: 4 << 20,
            max_in_flight_back_to_source: 2,
            max_in_flight_total: 64,
            max_in_flight_bytes_total: 32 << 20,
            random_first_chunks: 4,
            endgame_threshold: 16,
            endgame_bytes: 4 << 20,
            endgame_max_requests: 2,
            request_timeout: Duration::from_secs(10),
            timeout_backoff: Duration::from_secs(2),
            timeout_backoff_max: Duration::from_secs(60),
            busy_backoff: Duration::from_millis(250),
            busy_backoff_max: Duration::from_secs(2),
            back_to_source_delay: Duration::from_millis(500),
            origin_permit_retry: Duration::from_secs(1),
            upload_slots: 8,
            upload_slots_per_peer: 4,
            forward_arriving: false,
            upload_queue_len: 32,
            upload_queue_timeout: Duration::from_secs(2),
            seed_window: Duration::ZERO,
            seeded_defer: Duration::from_secs(1),
            seeded_refusals: 4,
            ban: BanPolicy::default(),
        }
    }
}

impl SwarmConfig {
    /// Lowers the request counts and the endgame threshold to their byte limits, for chunks of
    /// `mean` bytes.
    fn narrow_to_chunk_size(&mut self, mean: u64) {
        let fit = |bytes: u64, count: u32| {
            let n = bytes.checked_div(mean).unwrap_or(u64::MAX).max(1);
            count.min(u32::try_from(n).unwrap_or(u32::MAX))
        };
        self.max_in_flight_per_peer =
            fit(self.max_in_flight_bytes_per_peer, self.max_in_flight_per_peer);
        self.max_in_flight_total = fit(self.max_in_flight_bytes_total, self.max_in_flight_total);
        self.endgame_threshold = fit(self.endgame_bytes, self.endgame_threshold);
    }

    fn validate(&self) -> Result<(), SetupError> {
        let zero = |field| Err(SetupError::ZeroLimit { field });
        if self.max_in_flight_per_peer == 0 {
            return zero("max_in_flight_per_peer");
        }
        if self.max_in_flight_back_to_source == 0 {
            return zero("max_in_flight_back_to_source");
        }
        if self.max_in_flight_total == 0 {
            return zero("max_in_flight_total");
        }
        if self.endgame_max_requests == 0 {
            return zero("endgame_max_requests");
        }
        if self.request_timeout.is_zero() {
            return zero("request_timeout");
        }
        if self.upload_slots_per_peer == 0 {
            return zero("upload_slots_per_peer");
        }
        if self.ban.hash_mismatches == 0 {
            return zero("ban.hash_mismatches");
        }
        Ok(())
    }
}

/// Errors creating a [`Scheduler`] or a [`ChunkTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    /// A limit that must be positive is zero.
    #[error("swarm config: {field} must be positive")]
    ZeroLimit {
        /// The [`SwarmConfig`] field.
        field: &'static str,
    },
    /// The manifest has more chunks than a [`ChunkIndex`] can number.
    #[error("manifest has {count} chunks, more than the swarm can index")]
    TooManyChunks {
        /// Its chunk count.
        count: usize,
    },
    /// The locally present chunks are given over a different chunk count.
    #[error("local bitfield covers {got} chunks, the manifest has {expected}")]
    LocalLength {
        /// The manifest's chunk count.
        expected: u32,
        /// The bitfield's length.
        got: u32,
    },
}

/// Errors from events that do not fit the scheduler's state; the state is left unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The peer is not connected.
    #[error("{peer} is not connected")]
    UnknownPeer {
        /// The peer.
        peer: PeerId,
    },
    /// The peer is banned; drop whatever it sent.
    #[error("{peer} is banned")]
    Banned {
        /// The peer.
        peer: PeerId,
    },
    /// The peer is connected already.
    #[error("{peer} is already connected")]
    AlreadyConnected {
        /// The peer.
        peer: PeerId,
    },
    /// [`MAX_PEERS`] peers are connected already.
    #[error("already tracking the maximum of {max} peers")]
    TooManyPeers {
        /// [`MAX_PEERS`].
        max: usize,
    },
    /// The chunk index is not below the manifest's chunk count.
    #[error("chunk index {index} out of range for {chunks} chunks")]
    IndexOutOfRange {
        /// The index.
        index: ChunkIndex,
        /// The manifest's chunk count.
        chunks: u32,
    },
    /// A bitfield over the wrong number of chunks.
    #[error("bitfield covers {got} chunks, the manifest has {expected}")]
    BitfieldLength {
        /// The manifest's chunk count.
        expected: u32,
        /// The bitfield's length.
        got: u32,
    },
    /// The chunk is not waiting to be written.
    #[error("chunk {index} is not being written")]
    NotWriting {
        /// The chunk.
        index: ChunkIndex,
    },
    /// No such upload is running.
    #[error("no upload of chunk {index} to {peer} is running")]
    NotServing {
        /// The peer.
        peer: PeerId,
        /// The chunk.
        index: ChunkIndex,
    },
}

/// The lengths of a manifest's chunks, in manifest order. Cheap to clone (shared), so the
/// simulator's many schedulers of one manifest share one table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkTable {
    lengths: Arc<[u32]>,
    total_bytes: u64,
}

impl ChunkTable {
    /// The table of a manifest's chunk list.
    pub fn new(chunks: &[ChunkInfo]) -> Result<Self, SetupError> {
        Self::from_lengths(chunks.iter().map(|c| c.length))
    }

    /// A table from chunk lengths alone (the simulator needs no hashes).
    pub fn from_lengths(lengths: impl IntoIterator<Item = u32>) -> Result<Self, SetupError> {
        let lengths: Arc<[u32]> = lengths.into_iter().collect();
        // u32::MAX is the picker's "not wanted" marker.
        if lengths.len() >= u32::MAX as usize {
            return Err(SetupError::TooManyChunks { count: lengths.len() });
        }
        let total_bytes = lengths.iter().map(|&l| u64::from(l)).sum();
        Ok(Self { lengths, total_bytes })
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        self.lengths.len() as u32
    }

    /// Length of chunk `index` (0 when out of range).
    pub fn length(&self, index: ChunkIndex) -> u32 {
        self.lengths.get(index as usize).copied().unwrap_or(0)
    }

    /// Sum of all chunk lengths.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Mean chunk length (0 for an empty table): what the byte limits of [`SwarmConfig`] are
    /// counted in.
    pub fn mean_length(&self) -> u64 {
        self.total_bytes.checked_div(u64::from(self.chunk_count())).unwrap_or(0)
    }
}

/// A count of chunks and their bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tally {
    /// Chunks.
    pub chunks: u64,
    /// Bytes.
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u32) {
        self.chunks += 1;
        self.bytes += u64::from(bytes);
    }

    fn plus(self, other: Tally) -> Tally {
        Tally { chunks: self.chunks + other.chunks, bytes: self.bytes + other.bytes }
    }
}

/// Counters and gauges of one scheduler, for the metrics endpoint and tests. Chunks count under
/// a source once durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Progress {
    /// The whole manifest.
    pub total: Tally,
    /// Held chunks that were on disk at the start.
    pub disk: Tally,
    /// Held chunks that came from region peers.
    pub peer: Tally,
    /// Held chunks that came from caches.
    pub cache: Tally,
    /// Held chunks that came from the origin.
    pub origin: Tally,
    /// Chunks this host started serving to others.
    pub uploaded: Tally,
    /// Verified chunks received but discarded: already here or being written (endgame copies,
    /// late answers to cancelled requests).
    pub duplicates: Tally,
    /// Pieces that failed their hash.
    pub hash_mismatches: u64,
    /// Chunks passed on while arriving whose arriving copy then failed
    /// ([`Command::Withdraw`]).
    pub withdrawn: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// Chunks whose write failed.
    pub write_failures: u64,
    /// Peers banned.
    pub bans: u64,
    /// Requests outstanding now.
    pub in_flight: u32,
    /// Chunks verified and being written now.
    pub writing: u32,
}

impl Progress {
    /// Held chunks, from every source.
    pub fn done(&self) -> Tally {
        self.disk.plus(self.peer).plus(self.cache).plus(self.origin)
    }

    /// Held chunks from one source.
    pub fn from_source(&self, source: Source) -> Tally {
        match source {
            Source::Disk => self.disk,
            Source::Peer => self.peer,
            Source::Cache => self.cache,
            Source::Origin => self.origin,
        }
    }
}

/// What the scheduler knows and thinks about one connected peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerScore {
    /// Its kind.
    pub kind: PeerKind,
    /// Estimated throughput to us in bytes per second (moving average over pieces; halved per
    /// timeout), `None` until a piece arrived. Higher is preferred.
    pub rate: Option<u64>,
    /// Whether it may be asked now (not backed off, stalled or refusing us).
    pub usable: bool,
    /// Chunks it advertises (as far as we know).
    pub advertised: u32,
    /// Our requests outstanding to it.
    pub in_flight: u32,
    /// Pieces received from it (verified, including duplicates).
    pub chunks_received: u64,
    /// Bytes of those pieces.
    pub bytes_received: u64,
    /// Timeouts so far.
    pub timeouts: u32,
    /// Timeouts since its last piece.
    pub consecutive_timeouts: u32,
    /// `Busy` rejections so far.
    pub busy_rejections: u32,
    /// Hash mismatches so far (below the ban threshold, or it would be gone).
    pub hash_mismatches: u32,
    /// Uploads to it running now.
    pub uploads: u32,
}

/// The swarm scheduler of one manifest on one host. See the [module docs](self).
pub struct Scheduler {
    config: SwarmConfig,
    table: ChunkTable,
    rng: ChaCha8Rng,
    started: Duration,
    now: Duration,
    /// Durable chunks.
    have: Bitfield,
    /// Verified chunks being written, and where they came from.
    writing: BTreeMap<ChunkIndex, Source>,
    /// With `forward_arriving`: wanted chunks whose first bytes are in, and from whom.
    arriving: BTreeMap<ChunkIndex, PeerId>,
    /// Chunks announced before they were held (arriving or being written).
    announced_early: BTreeSet<ChunkIndex>,
    picker: Picker,
    peers: BTreeMap<PeerId, Peer>,
    /// Peers with requests outstanding or a back-off running: the only ones whose deadlines
    /// [`poll_timeout`](Self::poll_timeout) and [`handle_timeout`](Self::handle_timeout) look
    /// at, so a source with thousands of connected hosts pays for the few it waits on.
    timed: BTreeSet<PeerId>,
    /// The next deadline of each peer in `timed` (its oldest request's timeout or the end of
    /// its back-off), ordered: the earliest is [`poll_timeout`](Self::poll_timeout)'s answer
    /// without walking anything, and [`handle_timeout`](Self::handle_timeout) visits only the
    /// peers that are due.
    deadlines: BTreeSet<(Duration, PeerId)>,
    banned: BTreeSet<PeerId>,
    /// Active region peers that advertise every chunk (counted here, not per chunk).
    full_region: u32,
    /// Connected caches that are live (keep the origin out).
    live_caches: u32,
    in_flight: InFlightCounts,
    /// Requests region peers may have outstanding now, over all of them: at most
    /// [`SwarmConfig::max_in_flight_total`]; cut by a quarter when a request to a region peer
    /// timed out, or when a piece took longer than half the request timeout while what is in
    /// flight would take longer than that to take in at our measured intake rate (once per such
    /// period: only for a request sent after the last cut); grown by one per budget's worth of
    /// timely pieces. A host on a slow link thus keeps only what it can take in well within the
    /// timeout, instead of timing out peers that were only sharing its link with each other.
    budget: Budget,
    permit: OriginPermit,
    back_to_source_open: bool,
    /// Chunks not to ask caches or the origin for until the given time (`SeededRecently`).
    deferred: Deferred,
    /// Peers that advertise a wanted chunk (see [`Peer::useful`]): with the caches and the
    /// origin, the only peers a pick can find anything at, so the passes over candidates
    /// ([`schedule`](Self::schedule), [`clear_exhausted`](Self::clear_exhausted)) skip the
    /// hosts that have nothing for us (most of a pulling cache's thousands of hosts).
    useful: BTreeSet<PeerId>,
    /// Connected caches and origins.
    sources: BTreeSet<PeerId>,
    /// Candidates of a scheduling pass, in order of preference (kept to reuse its memory).
    candidates: Vec<(CandidateKey, PeerId)>,
    uploads: Uploads,
    commands: VecDeque<Command>,
    progress: Progress,
    /// Scheduling pass counter, to visit each peer once per pass.
    round: u32,
    /// [`poll_timeout`](Self::poll_timeout)'s last answer, kept until an event may have
    /// changed what it depends on (`None`: ask again). The shell asks after every event, and
    /// the commonest event, a `Have` that needs no request, changes none of it: the answer
    /// then costs no look at the deadlines, the deferrals or the upload queue.
    next_timeout: Cell<Option<Option<Duration>>>,
    scratch: Vec<(u16, u32, ChunkIndex)>,
}

/// Preference of a candidate peer (smaller first): kind, then rate (faster first, unmeasured
/// first of all), then the per-peer random tiebreak; the id breaks the remaining ties.
type CandidateKey = (PeerKind, Reverse<u64>, u32);

#[derive(Debug)]
struct Peer {
    kind: PeerKind,
    bits: Bits,
    state: Activity,
    in_flight: VecDeque<InFlight>,
    /// The last pick for it found nothing; skip it until something changes.
    exhausted: bool,
    /// Wanted chunks it advertises, while its bits are `Partial` (with `Full` bits it has every
    /// wanted chunk; with `Unknown`, none).
    useful: u32,
    /// Its entry in `Scheduler::deadlines`.
    deadline: Option<Duration>,
    /// The scheduling pass (`Scheduler::round`) that last visited it. Only compared
    /// for equality with the current pass; a staging scheduler makes far fewer than 2^32.
    visited: u32,
    tiebreak: u32,
    rate: Option<u64>,
    last_piece_at: Option<Duration>,
    chunks_received: u64,
    bytes_received: u64,
    timeouts: u32,
    consecutive_timeouts: u32,
    busy_rejections: u32,
    hash_mismatches: u32,
    uploads: u32,
    /// Requests it may have outstanding now (region peers; at most
    /// [`SwarmConfig::max_in_flight_per_peer`], and at most 255): halved by a `Busy`, grown by
    /// one per window of pieces from it, so that we keep about as many requests at a peer as
    /// it serves and queues for us instead of learning its capacity from rejections.
    window: u8,
    /// Pieces since `window` last grew.
    window_credit: u8,
    /// Back-offs in a row since its last piece (the next one doubles with each): one per
    /// `Busy` rejection, and for a source one per streak of
    /// [`SwarmConfig::seeded_refusals`]; a source's announcement of a new chunk clears it.
    busy_streak: u8,
    /// `SeededRecently` rejections since its last piece (a source: see
    /// [`SwarmConfig::seeded_refusals`]).
    seeded_streak: u8,
}

#[derive(Debug)]
enum Bits {
    /// No bitfield yet.
    Unknown,
    Partial(Bitfield),
    /// Every chunk (no bitset kept).
    Full,
}

impl Bits {
    fn has(&self, c: ChunkIndex) -> bool {
        match self {
            Bits::Unknown => false,
            Bits::Partial(b) => b.contains(c),
            Bits::Full => true,
        }
    }

    /// Chunks held (`u32::MAX` for `Full`, which asks for none).
    fn held(&self) -> u32 {
        match self {
            Bits::Unknown => 0,
            Bits::Partial(b) => b.count_ones(),
            Bits::Full => u32::MAX,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activity {
    Active,
    /// Rejected us `Busy`: not asked until `until`, but its chunks still count as available
    /// (it has them, it is just saturated; that is no reason to go back to source).
    Busy {
        until: Duration,
    },
    /// Timed out: not asked until `until`, and its chunks do not count (if it alone has a
    /// chunk, a cache is asked).
    Stalled {
        until: Duration,
    },
    /// It banned us, or it is being removed.
    Refused,
}

impl Activity {
    /// May be asked for chunks now.
    fn is_active(self) -> bool {
        self == Activity::Active
    }

    /// Its chunks count towards availability (and a cache in this state keeps the origin out).
    fn counts(self) -> bool {
        matches!(self, Activity::Active | Activity::Busy { .. })
    }

    fn until(self) -> Option<Duration> {
        match self {
            Activity::Busy { until } | Activity::Stalled { until } => Some(until),
            Activity::Active | Activity::Refused => None,
        }
    }
}

/// The region budget (see [`Scheduler::budget`]).
#[derive(Clone, Copy, Debug)]
struct Budget {
    limit: u32,
    credit: u32,
    /// Bytes of region pieces taken in since `window_start`, and the intake rate (bytes/s)
    /// measured over such windows.
    window_bytes: u64,
    window_start: Duration,
    rate: Option<u64>,
    /// When it was last cut: late pieces of requests sent before that do not cut it again.
    cut_at: Option<Duration>,
}

/// Requests outstanding: all of them, and those to region peers (which share
/// `max_in_flight_total`; back-to-source requests are bounded per connection instead).
#[derive(Clone, Copy, Debug, Default)]
struct InFlightCounts {
    all: u32,
    region: u32,
}

impl InFlightCounts {
    fn add(&mut self, kind: PeerKind) {
        self.all += 1;
        self.region += u32::from(kind == PeerKind::Peer);
    }

    fn remove(&mut self, kind: PeerKind) {
        self.all -= 1;
        self.region -= u32::from(kind == PeerKind::Peer);
    }
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    index: ChunkIndex,
    sent: Duration,
}

#[derive(Debug, Default)]
struct Uploads {
    active: Vec<(PeerId, ChunkIndex)>,
    queue: VecDeque<Queued>,
    /// With a `seed_window`: when each chunk was last accepted for, or sent to, a host
    /// (allocated on first use, so only sources pay for it).
    seeded: Vec<Option<Duration>>,
}

#[derive(Clone, Copy, Debug)]
struct Queued {
    peer: PeerId,
    index: ChunkIndex,
    deadline: Duration,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("now", &self.now)
            .field("have", &self.have)
            .field("writing", &self.writing.len())
            .field("wanted", &self.picker.wanted_len())
            .field("peers", &self.peers.len())
            .field("banned", &self.banned.len())
            .field("in_flight", &self.in_flight.all)
            .field("permit", &self.permit)
            .field("uploads", &self.uploads.active.len())
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// A scheduler for the manifest whose chunks `table` lists, created at `now`.
    ///
    /// `local` holds the chunks already on this host's disk (from older releases): they count as
    /// held from the start, under [`Source::Disk`], and are never requested. If that is all of
    /// them, [`Command::Complete`] is the first command.
    pub fn new(
        now: Duration,
        table: ChunkTable,
        local: &Bitfield,
        mut config: SwarmConfig,
        seed: u64,
    ) -> Result<Self, SetupError> {
        config.validate()?;
        let n = table.chunk_count();
        if local.bit_len() != n {
            return Err(SetupError::LocalLength { expected: n, got: local.bit_len() });
        }
        config.narrow_to_chunk_size(table.mean_length());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut progress = Progress::default();
        for c in 0..n {
            progress.total.add(table.length(c));
        }
        for c in local {
            progress.disk.add(table.length(c));
        }
        let mut wanted: Vec<ChunkIndex> = (0..n).filter(|&c| !local.contains(c)).collect();
        wanted.shuffle(&mut rng);
        let mut scheduler = Self {
            config,
            table,
            rng,
            started: now,
            now,
            have: local.clone(),
            writing: BTreeMap::new(),
            arriving: BTreeMap::new(),
            announced_early: BTreeSet::new(),
            picker: Picker::new(n, wanted),
            peers: BTreeMap::new(),
            timed: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            banned: BTreeSet::new(),
            full_region: 0,
            live_caches: 0,
            in_flight: InFlightCounts::default(),
            budget: Budget {
                limit: config.max_in_flight_total,
                credit: 0,
                window_bytes: 0,
                window_start: now,
                rate: None,
                cut_at: None,
            },
            permit: OriginPermit::Idle,
            back_to_source_open: config.back_to_source_delay.is_zero(),
            deferred: Deferred::default(),
            useful: BTreeSet::new(),
            sources: BTreeSet::new(),
            candidates: Vec::new(),
            uploads: Uploads::default(),
            commands: VecDeque::new(),
            progress,
            round: 0,
            next_timeout: Cell::new(None),
            scratch: Vec::new(),
        };
        if scheduler.have.is_full() {
            scheduler.finish();
        }
        Ok(scheduler)
    }

    // ---------------------------------------------------------------------------------------
    // Queries

    /// The next command for the shell, in the order they were decided.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next due, if anything is waiting on time.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if let Some(next) = self.next_timeout.get() {
            return next;
        }
        let next = self.compute_timeout();
        self.next_timeout.set(Some(next));
        next
    }

    fn compute_timeout(&self) -> Option<Duration> {
        let mut next: Option<Duration> = None;
        let mut consider = |t: Duration| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(&(deadline, _)) = self.deadlines.first() {
            consider(deadline);
        }
        if !self.is_complete() {
            if let OriginPermit::Denied { retry_at } = self.permit {
                consider(retry_at);
            }
            if !self.back_to_source_open {
                consider(self.started + self.config.back_to_source_delay);
            }
            if let Some(until) = self.deferred.next_deadline() {
                consider(until);
            }
        }
        if let Some(q) = self.uploads.queue.front() {
            consider(q.deadline);
        }
        next
    }

    /// Whether every chunk is held (verified and durable).
    pub fn is_complete(&self) -> bool {
        self.have.is_full()
    }

    /// The peer whose copy of chunk `index` is arriving and passed on meanwhile, if any
    /// ([`SwarmConfig::forward_arriving`]).
    pub fn arriving_from(&self, index: ChunkIndex) -> Option<PeerId> {
        self.arriving.get(&index).copied()
    }

    /// Whether a verified copy of chunk `index` is here: held, or being written.
    pub fn has_copy(&self, index: ChunkIndex) -> bool {
        self.have.contains(index) || self.writing.contains_key(&index)
    }

    /// Counters by source and gauges.
    pub fn progress(&self) -> Progress {
        Progress {
            in_flight: self.in_flight.all,
            writing: self.writing.len() as u32,
            ..self.progress
        }
    }

    /// The held (durable) chunks: what to send a newly connected peer as our bitfield.
    pub fn bitfield(&self) -> &Bitfield {
        &self.have
    }

    /// Whether chunk `index` is held (durable).
    pub fn has(&self, index: ChunkIndex) -> bool {
        self.have.contains(index)
    }

    /// The chunk table.
    pub fn table(&self) -> &ChunkTable {
        &self.table
    }

    /// The configuration.
    pub fn config(&self) -> &SwarmConfig {
        &self.config
    }

    /// Where this scheduler stands with the origin permit.
    pub fn origin_permit(&self) -> OriginPermit {
        self.permit
    }

    /// Whether `peer` is banned.
    pub fn is_banned(&self, peer: PeerId) -> bool {
        self.banned.contains(&peer)
    }

    /// Score and counters of a connected peer.
    pub fn peer_score(&self, peer: PeerId) -> Option<PeerScore> {
        self.peers.get(&peer).map(|p| self.score_of(p))
    }

    /// Scores of all connected peers, by id.
    pub fn peer_scores(&self) -> impl Iterator<Item = (PeerId, PeerScore)> + '_ {
        self.peers.iter().map(|(&id, p)| (id, self.score_of(p)))
    }

    fn score_of(&self, p: &Peer) -> PeerScore {
        PeerScore {
            kind: p.kind,
            rate: p.rate,
            usable: p.state.is_active(),
            advertised: match &p.bits {
                Bits::Unknown => 0,
                Bits::Partial(b) => b.count_ones(),
                Bits::Full => self.table.chunk_count(),
            },
            in_flight: p.in_flight.len() as u32,
            chunks_received: p.chunks_received,
            bytes_received: p.bytes_received,
            timeouts: p.timeouts,
            consecutive_timeouts: p.consecutive_timeouts,
            busy_rejections: p.busy_rejections,
            hash_mismatches: p.hash_mismatches,
            uploads: p.uploads,
        }
    }

    // ---------------------------------------------------------------------------------------
    // Connections and advertisements

    /// An authenticated peer is connected. Region peers are asked for nothing until their
    /// bitfield arrives; caches and the origin are assumed to have every chunk.
    pub fn handle_connected(
        &mut self,
        now: Duration,
        peer: PeerId,
        kind: PeerKind,
    ) -> Result<(), EventError> {
        let now = self.advance(now);
        if self.banned.contains(&peer) {
            return Err(EventError::Banned { peer });
        }
        if self.peers.contains_key(&peer) {
            return Err(EventError::AlreadyConnected { peer });
        }
        if self.peers.len() >= MAX_PEERS {
            return Err(EventError::TooManyPeers { max: MAX_PEERS });
        }
        let bits = match kind {
            PeerKind::Peer => Bits::Unknown,
            PeerKind::Cache | PeerKind::Origin if self.is_complete() => Bits::Unknown,
            PeerKind::Cache | PeerKind::Origin => Bits::Full,
        };
        let tiebreak = self.rng.r#gen();
        self.peers.insert(
            peer,
            Peer {
                kind,
                bits,
                state: Activity::Active,
                in_flight: VecDeque::new(),
                exhausted: false,
                useful: 0,
                deadline: None,
                visited: 0,
                tiebreak,
                rate: None,
                last_piece_at: None,
                chunks_received: 0,
                bytes_received: 0,
                timeouts: 0,
                consecutive_timeouts: 0,
                busy_rejections: 0,
                hash_mismatches: 0,
                uploads: 0,
                window: self.max_window(),
                window_credit: 0,
                busy_streak: 0,
                seeded_streak: 0,
            },
        );
        if kind == PeerKind::Cache {
            self.live_caches += 1;
        }
        if kind != PeerKind::Peer {
            self.sources.insert(peer);
        }
        self.recount_useful(peer);
        self.schedule(now, Some(peer));
        Ok(())
    }

    /// The connection to `peer` is gone. Its requests are re-issued elsewhere, its uploads and
    /// queued requests dropped. A no-op for a banned peer (the ban already forgot it).
    pub fn handle_disconnected(&mut self, now: Duration, peer: PeerId) -> Result<(), EventError> {
        let now = self.advance(now);
        if self.banned.contains(&peer) {
            return Ok(());
        }
        if !self.peers.contains_key(&peer) {
            return Err(EventError::UnknownPeer { peer });
        }
        self.remove_peer(now, peer);
        self.schedule(now, None);
        Ok(())
    }

    /// `peer` holds exactly the chunks in `bits` (replacing what it said before).
    pub fn handle_bitfield(
        &mut self,
        now: Duration,
        peer: PeerId,
        bits: Bitfield,
    ) -> Result<(), EventError> {
        let now = self.advance(now);
        self.check_peer(peer)?;
        let expected = self.table.chunk_count();
        if bits.bit_len() != expected {
            return Err(EventError::BitfieldLength { expected, got: bits.bit_len() });
        }
        if self.is_complete() {
            return Ok(());
        }
        let Some(p) = self.peers.get_mut(&peer) else { return Ok(()) };
        let counted = p.kind == PeerKind::Peer && p.state.counts();
        let new = if bits.is_full() { Bits::Full } else { Bits::Partial(bits) };
        let old = std::mem::replace(&mut p.bits, new);
        if counted {
            contribute(&mut self.picker, &mut self.full_region, &old, false);
            contribute(&mut self.picker, &mut self.full_region, &p.bits, true);
        }
        p.exhausted = false;
        self.recount_useful(peer);
        if matches!(old, Bits::Unknown) {
            self.schedule(now, Some(peer));
        } else {
            // It may have dropped chunks, making some region-rare: caches get a new look.
            self.clear_exhausted();
            self.schedule(now, None);
        }
        Ok(())
    }

    /// `peer` now holds chunk `index`.
    pub fn handle_have(
        &mut self,
        now: Duration,
        peer: PeerId,
        index: ChunkIndex,
    ) -> Result<(), EventError> {
        // A Have changes only the peer's bits, availability and usefulness, none of which
        // `poll_timeout` reads, unless it leads to a scheduling pass (requests, the permit).
        let now = self.advance_clock(now);
        self.check_index(index)?;
        self.check_peer(peer)?;
        if self.is_complete() {
            return Ok(());
        }
        if !self.peer_gains(peer, index) {
            return Ok(());
        }
        let endgame = self.endgame();
        let useful = self.picker.is_wanted(index)
            && (self.picker.requests(index) == 0
                || (endgame && self.picker.requests(index) < self.config.endgame_max_requests));
        if useful {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.exhausted = false;
            }
            self.next_timeout.set(None);
            self.schedule(now, Some(peer));
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Download side

    /// The bytes of chunk `index` arrived from `peer` and the shell hashed them: `outcome`.
    ///
    /// Returns what to do with the bytes. A verified copy of a wanted chunk is kept even if it
    /// was not requested from this peer (a late answer after a timeout, say), and every other
    /// outstanding request for it is cancelled.
    pub fn handle_piece(
        &mut self,
        now: Duration,
        peer: PeerId,
        index: ChunkIndex,
        outcome: PieceOutcome,
    ) -> Result<PieceAction, EventError> {
        let now = self.advance(now);
        self.check_index(index)?;
        self.check_peer(peer)?;
        // A region peer's piece frees a slot of the shared budget; if that was full, every
        // region peer may now be asked (not just this one).
        let saturated = self.in_flight.region >= self.budget.limit;
        let sent = self.forget_request(peer, index);
        if let Some(sent) = sent {
            if self.peers.get(&peer).is_some_and(|p| p.kind == PeerKind::Peer) {
                self.pace(now, sent, self.table.length(index));
            }
        }
        match outcome {
            PieceOutcome::HashMismatch => {
                self.progress.hash_mismatches += 1;
                self.arrival_lost(peer, index);
                let Some(p) = self.peers.get_mut(&peer) else { return Ok(PieceAction::Discard) };
                p.hash_mismatches += 1;
                if p.hash_mismatches >= self.config.ban.hash_mismatches {
                    self.ban(now, peer, BanReason::HashMismatch { index });
                } else {
                    self.clear_exhausted();
                }
                self.schedule(now, None);
                Ok(PieceAction::Discard)
            }
            PieceOutcome::Verified => {
                let len = self.table.length(index);
                let max_window = self.max_window();
                let Some(p) = self.peers.get_mut(&peer) else { return Ok(PieceAction::Discard) };
                p.chunks_received += 1;
                p.bytes_received += u64::from(len);
                p.consecutive_timeouts = 0;
                p.busy_streak = 0;
                p.seeded_streak = 0;
                p.window_credit = p.window_credit.saturating_add(1);
                if p.window_credit >= p.window {
                    p.window_credit = 0;
                    p.window = p.window.saturating_add(1).min(max_window);
                }
                if let Some(sent) = sent {
                    let since = p.last_piece_at.map_or(sent, |last| last.max(sent));
                    let micros = now.saturating_sub(since).as_micros().max(1);
                    let sample = (u128::from(len) * 1_000_000 / micros) as u64;
                    p.rate = Some(match p.rate {
                        None => sample,
                        Some(rate) => rate - rate / 4 + sample / 4,
                    });
                }
                p.last_piece_at = Some(now);
                let source = p.kind.source();
                if !self.picker.is_wanted(index) {
                    self.progress.duplicates.add(len);
                    self.schedule(now, if saturated { None } else { Some(peer) });
                    return Ok(PieceAction::Discard);
                }
                // Uploads passing on an arriving copy finish from this one.
                self.arriving.remove(&index);
                let endgame_before = self.endgame();
                let cancelled = self.cancel_requests(index);
                self.picker.remove(index);
                self.no_longer_wanted(index);
                self.deferred.remove(index);
                self.writing.insert(index, source);
                let entered_endgame = !endgame_before && self.endgame();
                if entered_endgame {
                    // Peers with nothing new may now take duplicates.
                    self.clear_exhausted();
                }
                let scope =
                    if saturated || cancelled || entered_endgame { None } else { Some(peer) };
                self.schedule(now, scope);
                Ok(PieceAction::Write)
            }
        }
    }

    /// `peer` refused our request for chunk `index`.
    pub fn handle_rejected(
        &mut self,
        now: Duration,
        peer: PeerId,
        index: ChunkIndex,
        reason: RejectReason,
    ) -> Result<(), EventError> {
        let now = self.advance(now);
        self.check_index(index)?;
        self.check_peer(peer)?;
        let requested = self.forget_request(peer, index).is_some();
        self.arrival_lost(peer, index);
        match reason {
            RejectReason::Busy if requested => {
                let mut backoff = self.config.busy_backoff;
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.busy_rejections += 1;
                    p.busy_streak = p.busy_streak.saturating_add(1);
                    p.window = (p.window / 2).max(1);
                    p.window_credit = 0;
                    backoff = self.config.busy_backoff_after(p.busy_streak);
                }
                self.back_off(peer, Activity::Busy { until: now + backoff });
            }
            RejectReason::Busy => {}
            RejectReason::NotHave => self.peer_loses(peer, index),
            RejectReason::Banned => self.set_state(peer, Activity::Refused),
            RejectReason::SeededRecently => {
                if self.picker.is_wanted(index) {
                    let chunks = self.table.chunk_count();
                    self.deferred.insert(chunks, index, now + self.config.seeded_defer);
                }
                // Deferral only keeps the chunk from caches and the origin; a region host that
                // seeds (hosts normally do not) is backed off instead of being asked again at once,
                // and so is a source that keeps refusing.
                let limit = self.config.seeded_refusals;
                let backoff = match self.peers.get_mut(&peer) {
                    Some(p) if requested && p.kind == PeerKind::Peer => {
                        Some(self.config.busy_backoff)
                    }
                    Some(p) if requested => {
                        p.seeded_streak = p.seeded_streak.saturating_add(1);
                        let due = limit > 0 && u32::from(p.seeded_streak) >= limit;
                        if due {
                            p.seeded_streak = 0;
                            p.busy_streak = p.busy_streak.saturating_add(1);
                        }
                        due.then(|| self.config.busy_backoff_after(p.busy_streak))
                    }
                    _ => None,
                };
                if let Some(backoff) = backoff {
                    self.back_off(peer, Activity::Busy { until: now + backoff });
                }
            }
        }
        // The chunk is unrequested again: the peers that have it get a new look.
        self.clear_exhausted_for(index);
        self.schedule(now, None);
        Ok(())
    }

    /// Chunk `index` (after [`PieceAction::Write`]) is durable: it is announced and served.
    pub fn handle_written(&mut self, now: Duration, index: ChunkIndex) -> Result<(), EventError> {
        self.advance(now);
        self.check_index(index)?;
        let Some(source) = self.writing.remove(&index) else {
            return Err(EventError::NotWriting { index });
        };
        self.have.insert(index);
        let len = self.table.length(index);
        match source {
            Source::Disk => self.progress.disk.add(len),
            Source::Peer => self.progress.peer.add(len),
            Source::Cache => self.progress.cache.add(len),
            Source::Origin => self.progress.origin.add(len),
        }
        // Have suppression (see `Command::Announce`): before `finish` forgets the bitfields.
        let peers =
            if self.announced_early.remove(&index) { Vec::new() } else { self.unaware_of(index) };
        self.commands.push_back(Command::Announce { index, peers });
        if self.have.is_full() {
            self.finish();
        }
        Ok(())
    }

    /// The connected peers not known to hold chunk `index` (have suppression, see
    /// [`Command::Announce`]).
    fn unaware_of(&self, index: ChunkIndex) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.kind != PeerKind::Peer || !p.bits.has(index))
            .map(|(&id, _)| id)
            .collect()
    }

    /// The first bytes of chunk `index` arrived from `peer`, which we asked for it. With
    /// [`SwarmConfig::forward_arriving`] the chunk is announced now and served from here on;
    /// otherwise nothing changes.
    pub fn handle_piece_started(
        &mut self,
        now: Duration,
        peer: PeerId,
        index: ChunkIndex,
    ) -> Result<(), EventError> {
        self.advance(now);
        self.check_index(index)?;
        self.check_peer(peer)?;
        let asked =
            self.peers.get(&peer).is_some_and(|p| p.in_flight.iter().any(|f| f.index == index));
        if !self.config.forward_arriving
            || !asked
            || !self.picker.is_wanted(index)
            || self.arriving.contains_key(&index)
        {
            return Ok(());
        }
        self.arriving.insert(index, peer);
        if self.announced_early.insert(index) {
            let peers = self.unaware_of(index);
            self.commands.push_back(Command::Announce { index, peers });
        }
        Ok(())
    }

    /// Whether chunk `index` may be served: held, or (with `forward_arriving`) arriving or
    /// being written.
    fn servable(&self, index: ChunkIndex) -> bool {
        self.have.contains(index)
            || (self.config.forward_arriving
                && (self.writing.contains_key(&index) || self.arriving.contains_key(&index)))
    }

    /// The request for `index` to `peer` ended without a verified copy: if that was the copy
    /// arriving, the uploads passing it on are withdrawn.
    fn arrival_lost(&mut self, peer: PeerId, index: ChunkIndex) {
        if self.arriving.get(&index) != Some(&peer) {
            return;
        }
        self.arriving.remove(&index);
        if !self.picker.is_wanted(index) {
            return;
        }
        self.announced_early.remove(&index);
        self.progress.withdrawn += 1;
        let reason = RejectReason::NotHave;
        let commands = &mut self.commands;
        self.uploads.queue.retain(|q| {
            let keep = q.index != index;
            if !keep {
                commands.push_back(Command::Reject { peer: q.peer, index, reason });
            }
            keep
        });
        self.commands.push_back(Command::Withdraw { index });
    }

    /// Writing chunk `index` failed: it is wanted again.
    pub fn handle_write_failed(
        &mut self,
        now: Duration,
        index: ChunkIndex,
    ) -> Result<(), EventError> {
        let now = self.advance(now);
        self.check_index(index)?;
        if self.writing.remove(&index).is_none() {
            return Err(EventError::NotWriting { index });
        }
        self.progress.write_failures += 1;
        // Announced while it arrived: it is announced again once held.
        self.announced_early.remove(&index);
        self.picker.insert(index);
        self.wanted_again(index);
        self.clear_exhausted();
        self.schedule(now, None);
        Ok(())
    }

    /// The origin permit asked for is granted (an unrequested or unneeded grant is given back
    /// at once with [`Command::ReleaseOriginPermit`]).
    pub fn handle_permit_granted(&mut self, now: Duration) {
        let now = self.advance(now);
        if self.permit == OriginPermit::Granted {
            return;
        }
        self.permit = OriginPermit::Granted;
        if self.is_complete() {
            self.release_permit();
            return;
        }
        for id in &self.sources {
            if let Some(p) = self.peers.get_mut(id).filter(|p| p.kind == PeerKind::Origin) {
                p.exhausted = false;
            }
        }
        self.schedule(now, None);
    }

    /// The origin permit asked for is refused for now.
    pub fn handle_permit_denied(&mut self, now: Duration) {
        let now = self.advance(now);
        if self.permit == OriginPermit::Requested {
            self.permit = OriginPermit::Denied { retry_at: now + self.config.origin_permit_retry };
        }
    }

    /// Time has reached a deadline from [`poll_timeout`](Self::poll_timeout) (calling it early or
    /// late is harmless): expires requests, back-offs, permit retries and queued uploads.
    pub fn handle_timeout(&mut self, now: Duration) {
        let now = self.advance(now);
        // `changed`: chunks or sources may be eligible again, every peer gets a new look;
        // `rescheduled`: only back-offs ended.
        let (mut changed, mut rescheduled) = (false, false);
        let timeout = self.config.request_timeout;
        // The peers due, in id order (the order of their commands).
        let mut ids: Vec<PeerId> =
            self.deadlines.iter().take_while(|&&(d, _)| d <= now).map(|&(_, id)| id).collect();
        ids.sort_unstable();
        for id in ids {
            let Some(p) = self.peers.get_mut(&id) else { continue };
            let expired = p.in_flight.iter().take_while(|f| f.sent + timeout <= now).count();
            if expired > 0 {
                // The peer is stalled: withdraw everything it holds for us, not just the
                // expired requests, and ask elsewhere.
                let stalled: Vec<InFlight> = p.in_flight.drain(..).collect();
                p.timeouts += expired as u32;
                p.consecutive_timeouts += 1;
                p.rate = p.rate.map(|r| r / 2);
                let (streak, kind) = (p.consecutive_timeouts, p.kind);
                let oldest = stalled.first().map(|f| f.sent);
                for f in stalled {
                    self.picker.remove_request(f.index);
                    self.in_flight.remove(kind);
                    self.commands.push_back(Command::Cancel { peer: id, index: f.index });
                    self.arrival_lost(id, f.index);
                }
                self.progress.timeouts += expired as u64;
                if kind == PeerKind::Peer {
                    self.cut_budget(now, oldest);
                }
                let factor = 1u32 << (streak - 1).min(16);
                let backoff =
                    (self.config.timeout_backoff * factor).min(self.config.timeout_backoff_max);
                self.back_off(id, Activity::Stalled { until: now + backoff });
                self.retime(id);
                changed = true;
            } else if p.state.until().is_some_and(|until| until <= now) {
                // Only this peer may be asked again (`set_state` clears its mark).
                self.set_state(id, Activity::Active);
                rescheduled = true;
            }
        }
        if let OriginPermit::Denied { retry_at } = self.permit {
            if retry_at <= now {
                self.permit = OriginPermit::Idle;
                changed = true;
            }
        }
        // Deferral keeps chunks only from caches and the origin: its end concerns them alone.
        let undeferred = self.deferred.expire(now);
        if !self.back_to_source_open && now >= self.started + self.config.back_to_source_delay {
            self.back_to_source_open = true;
            changed = true;
        }
        while self.uploads.queue.front().is_some_and(|q| q.deadline <= now) {
            if let Some(q) = self.uploads.queue.pop_front() {
                let reject =
                    Command::Reject { peer: q.peer, index: q.index, reason: RejectReason::Busy };
                self.commands.push_back(reject);
            }
        }
        if changed {
            self.clear_exhausted();
        } else if undeferred {
            self.clear_exhausted_sources();
        }
        if changed || rescheduled || undeferred {
            self.schedule(now, None);
        }
    }

    // ---------------------------------------------------------------------------------------
    // Upload side

    /// `peer` asks for chunk `index`: served now ([`Command::Serve`]), queued, or rejected
    /// ([`Command::Reject`]). A repeated request for a chunk already served or queued to it is
    /// ignored.
    pub fn handle_request(
        &mut self,
        now: Duration,
        peer: PeerId,
        index: ChunkIndex,
    ) -> Result<(), EventError> {
        let now = self.advance(now);
        self.check_index(index)?;
        if self.banned.contains(&peer) {
            let reason = RejectReason::Banned;
            self.commands.push_back(Command::Reject { peer, index, reason });
            return Ok(());
        }
        let Some(p) = self.peers.get(&peer) else {
            return Err(EventError::UnknownPeer { peer });
        };
        if !self.servable(index) {
            let reason = RejectReason::NotHave;
            self.commands.push_back(Command::Reject { peer, index, reason });
            return Ok(());
        }
        let uploads = &mut self.uploads;
        if uploads.active.contains(&(peer, index))
            || uploads.queue.iter().any(|q| q.peer == peer && q.index == index)
        {
            return Ok(());
        }
        let window = self.config.seed_window;
        let seeding = !window.is_zero() && p.kind != PeerKind::Cache;
        if seeding {
            let seeded = uploads.seeded.get(index as usize).copied().flatten();
            if seeded.is_some_and(|at| now < at + window) {
                let reason = RejectReason::SeededRecently;
                self.commands.push_back(Command::Reject { peer, index, reason });
                return Ok(());
            }
        }
        let accepted = if (uploads.active.len() as u32) < self.config.upload_slots
            && p.uploads < self.config.upload_slots_per_peer
        {
            self.start_upload(peer, index);
            true
        } else if (uploads.queue.len() as u32) < self.config.upload_queue_len
            || (!seeding && self.make_room(peer))
        {
            let deadline = now + self.config.upload_queue_timeout;
            self.uploads.queue.push_back(Queued { peer, index, deadline });
            true
        } else {
            let reason = RejectReason::Busy;
            self.commands.push_back(Command::Reject { peer, index, reason });
            false
        };
        if seeding && accepted {
            let seeded = &mut self.uploads.seeded;
            if seeded.is_empty() {
                seeded.resize(self.table.chunk_count() as usize, None);
            }
            seeded[index as usize] = Some(now);
        }
        Ok(())
    }

    /// `peer` withdrew its request for chunk `index`: dropped from the upload queue. An upload
    /// already running is the shell's to abort; it reports
    /// [`handle_upload_done`](Self::handle_upload_done) either way.
    pub fn handle_cancel(
        &mut self,
        now: Duration,
        peer: PeerId,
        index: ChunkIndex,
    ) -> Result<(), EventError> {
        self.advance(now);
        self.check_index(index)?;
        if self.banned.contains(&peer) {
            return Ok(());
        }
        if !self.peers.contains_key(&peer) {
            return Err(EventError::UnknownPeer { peer });
        }
        self.uploads.queue.retain(|q| !(q.peer == peer && q.index == index));
        Ok(())
    }

    /// The upload of chunk `index` to `peer` finished (or failed): its slot is free.
    pub fn handle_upload_done(
        &mut self,
        now: Duration,
        peer: PeerId,
        index: ChunkIndex,
    ) -> Result<(), EventError> {
        self.advance(now);
        let Some(at) = self.uploads.active.iter().position(|&u| u == (peer, index)) else {
            return Err(EventError::NotServing { peer, index });
        };
        self.uploads.active.swap_remove(at);
        let kind = self.peers.get_mut(&peer).map(|p| {
            p.uploads -= 1;
            p.kind
        });
        // The seed window runs from when the host has the chunk, not from when its upload was
        // accepted: a source with a long queue would otherwise let the window lapse before
        // the first host could announce it.
        if !self.config.seed_window.is_zero() && kind.is_some_and(|k| k != PeerKind::Cache) {
            if let Some(at) = self.uploads.seeded.get_mut(index as usize) {
                *at = Some(now);
            }
        }
        self.serve_queue();
        Ok(())
    }

    /// Frees a place in the full upload queue for `peer` by refusing (`Busy`) the request
    /// [`displaced_by`](Self::displaced_by) it; false if there is none.
    fn make_room(&mut self, peer: PeerId) -> bool {
        let Some(q) = self.displaced_by(peer).and_then(|at| self.uploads.queue.remove(at)) else {
            return false;
        };
        let reason = RejectReason::Busy;
        self.commands.push_back(Command::Reject { peer: q.peer, index: q.index, reason });
        true
    }

    /// The upload queue is full and `peer` asks: the position of the queued request it
    /// displaces, if any. A peer with nothing running or queued here takes the place of the
    /// youngest queued request of the peer holding the most places (running plus queued; among
    /// equals, the one with the most running), if that peer keeps at least one. Not at a
    /// seeding source (`seed_window`): it turns its hosts over by refusing what it has just
    /// sent, and displacing as well only cost requests (stage-3k: 48 % more `SeededRecently`,
    /// the same staging time).
    ///
    /// Without this, peers that ask again the moment a piece arrives keep a full queue to
    /// themselves: a peer that came late is refused `Busy` on every try, backs off, halves its
    /// window, and never gets in. In the simulation of the 8-host network-namespace benchmark
    /// two of the hosts got 12 % of their downlink for 20 s that way: the last host at
    /// 1.92-1.97x T_min, against 1.21-1.25x measured. With this, 1.18-1.19x simulated and
    /// 1.19-1.20x measured.
    ///
    /// O(queue · log queue), and only while the queue is full.
    fn displaced_by(&self, peer: PeerId) -> Option<usize> {
        let queue = &self.uploads.queue;
        let running = |id: PeerId| self.peers.get(&id).map_or(0, |p| p.uploads);
        if running(peer) > 0 || queue.iter().any(|q| q.peer == peer) {
            return None;
        }
        let mut queued: Vec<PeerId> = queue.iter().map(|q| q.peer).collect();
        queued.sort_unstable();
        // Per queued peer, by id: (places held, uploads running).
        let held: Vec<(PeerId, (u32, u32))> = queued
            .chunk_by(|a, b| a == b)
            .map(|run| {
                let r = running(run[0]);
                (run[0], (r + run.len() as u32, r))
            })
            .collect();
        let most = held.iter().map(|&(_, h)| h).max().filter(|&(places, _)| places >= 2)?;
        queue.iter().rposition(|q| {
            held.binary_search_by_key(&q.peer, |&(id, _)| id).is_ok_and(|i| held[i].1 == most)
        })
    }

    fn start_upload(&mut self, peer: PeerId, index: ChunkIndex) {
        self.uploads.active.push((peer, index));
        if let Some(p) = self.peers.get_mut(&peer) {
            p.uploads += 1;
        }
        self.progress.uploaded.add(self.table.length(index));
        self.commands.push_back(Command::Serve { peer, index });
    }

    /// Starts queued uploads while slots are free, skipping peers at their per-peer limit.
    ///
    /// The queued request of the peer with the fewest uploads from us goes first: the slots
    /// spread over as many peers as ask, so no requester waits behind another that already
    /// has a slot. First come first served let a peer that asked early hold several slots
    /// while others timed out into `Busy`; in the 3,000-host simulation this ordering (with
    /// the byte limits on requests in flight) took the last host from 1.68-1.76x to
    /// 1.39-1.43x T_min.
    ///
    /// Among peers served alike, the one holding the fewest chunks (as far as its bitfield
    /// and haves tell) goes first, then the oldest request: every host's download is its own
    /// bound, so a host that fell behind early (few peers, a slow start) never catches up
    /// unless it is served ahead of the others. Passing chunks on while they arrive, this
    /// took the 3,000-host simulation (seeds 1, 2) from 1.160 / 1.162x to 1.141 / 1.142x
    /// T_min and the 12,000-host one from 1.222x to 1.157x, the median host no later. First
    /// by chunks held, then by uploads running, made every host later (1.23-1.24x). A
    /// complete scheduler no longer tracks what peers hold; ordering its queue by it as well
    /// changed nothing measurable there.
    fn serve_queue(&mut self) {
        while (self.uploads.active.len() as u32) < self.config.upload_slots {
            let per_peer = self.config.upload_slots_per_peer;
            let peers = &self.peers;
            let next = self
                .uploads
                .queue
                .iter()
                .enumerate()
                .filter_map(|(i, q)| {
                    let p = peers.get(&q.peer).filter(|p| p.uploads < per_peer)?;
                    Some((p.uploads, p.bits.held(), i))
                })
                .min()
                .map(|(_, _, i)| i);
            let Some(at) = next else { break };
            let Some(q) = self.uploads.queue.remove(at) else { break };
            self.start_upload(q.peer, q.index);
        }
    }

    // ---------------------------------------------------------------------------------------
    // Internals

    /// Every event handler starts here: moves the clock and forgets
    /// [`poll_timeout`](Self::poll_timeout)'s answer (the event may change it).
    fn advance(&mut self, now: Duration) -> Duration {
        self.next_timeout.set(None);
        self.advance_clock(now)
    }

    /// Moves the clock only, for a handler that forgets the timeout itself where it may change.
    fn advance_clock(&mut self, now: Duration) -> Duration {
        self.now = self.now.max(now);
        self.now
    }

    fn check_index(&self, index: ChunkIndex) -> Result<(), EventError> {
        let chunks = self.table.chunk_count();
        if index >= chunks {
            return Err(EventError::IndexOutOfRange { index, chunks });
        }
        Ok(())
    }

    fn check_peer(&self, peer: PeerId) -> Result<(), EventError> {
        if self.banned.contains(&peer) {
            return Err(EventError::Banned { peer });
        }
        if !self.peers.contains_key(&peer) {
            return Err(EventError::UnknownPeer { peer });
        }
        Ok(())
    }

    fn endgame(&self) -> bool {
        self.config.endgame_max_requests > 1
            && self.picker.wanted_len() <= self.config.endgame_threshold as usize
    }

    /// Something changed (a chunk is unrequested or wanted again, availability fell, endgame
    /// began): every peer that could have something for us gets a new look. The others (no
    /// wanted chunk advertised) stay skipped; they get a look when they advertise one.
    fn clear_exhausted(&mut self) {
        for id in self.useful.iter().chain(&self.sources) {
            if let Some(p) = self.peers.get_mut(id) {
                p.exhausted = false;
            }
        }
    }

    /// Deferred chunks may be asked of sources again: the caches and the origin get a new look
    /// (region peers are never kept from a deferred chunk, so nothing changed for them).
    fn clear_exhausted_sources(&mut self) {
        for id in &self.sources {
            if let Some(p) = self.peers.get_mut(id) {
                p.exhausted = false;
            }
        }
    }

    /// Chunk `index` may be eligible again (its request was refused): the peers that advertise
    /// it, and the caches and origin (for which it may now be region-rare), get a new look.
    fn clear_exhausted_for(&mut self, index: ChunkIndex) {
        for id in self.useful.iter().chain(&self.sources) {
            if let Some(p) = self.peers.get_mut(id) {
                if p.kind != PeerKind::Peer || p.bits.has(index) {
                    p.exhausted = false;
                }
            }
        }
    }

    /// Recomputes `id`'s count of advertised wanted chunks and its place in `useful` from its
    /// bits: O(its chunks) for partial bits.
    fn recount_useful(&mut self, id: PeerId) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let picker = &self.picker;
        p.useful = match &p.bits {
            Bits::Unknown | Bits::Full => 0,
            Bits::Partial(b) if b.count_ones() as usize <= picker.wanted_len() => {
                b.iter().filter(|&c| picker.is_wanted(c)).count() as u32
            }
            Bits::Partial(b) => picker.order().iter().filter(|&&c| b.contains(c)).count() as u32,
        };
        let useful = match p.bits {
            Bits::Unknown => false,
            Bits::Partial(_) => p.useful > 0,
            Bits::Full => picker.wanted_len() > 0,
        };
        if useful {
            if self.useful.insert(id) {
                p.exhausted = false;
            }
        } else {
            self.useful.remove(&id);
        }
    }

    /// Chunk `index` left the wanted set: the peers that advertised it have one wanted chunk
    /// fewer. O(useful peers · log), or O(peers) when most peers are useful: both sets are
    /// ordered by id, and walking the peers alongside costs less than looking each one up.
    fn no_longer_wanted(&mut self, index: ChunkIndex) {
        let none_wanted = self.picker.wanted_len() == 0;
        // Whether `p` stays useful.
        let keep = |p: &mut Peer| match &p.bits {
            Bits::Unknown => false,
            Bits::Full => !none_wanted,
            Bits::Partial(b) => {
                if b.contains(index) {
                    p.useful -= 1;
                }
                p.useful > 0
            }
        };
        if self.useful.len() * 4 >= self.peers.len() {
            let mut peers = self.peers.iter_mut().peekable();
            self.useful.retain(|id| {
                while peers.next_if(|(p, _)| *p < id).is_some() {}
                peers.next_if(|(p, _)| *p == id).is_some_and(|(_, p)| keep(p))
            });
        } else {
            let peers = &mut self.peers;
            self.useful.retain(|id| peers.get_mut(id).is_some_and(keep));
        }
    }

    /// Chunk `index` is wanted again (its write failed): the peers that advertise it have one
    /// wanted chunk more. O(peers), but write failures are rare.
    fn wanted_again(&mut self, index: ChunkIndex) {
        let ids: Vec<PeerId> =
            self.peers.iter().filter(|(_, p)| p.bits.has(index)).map(|(&id, _)| id).collect();
        for id in ids {
            self.recount_useful(id);
        }
    }

    /// Removes the request for `index` from `peer`'s in-flight list; returns when it was sent.
    fn forget_request(&mut self, peer: PeerId, index: ChunkIndex) -> Option<Duration> {
        let p = self.peers.get_mut(&peer)?;
        let at = p.in_flight.iter().position(|f| f.index == index)?;
        let f = p.in_flight.remove(at)?;
        self.picker.remove_request(index);
        self.in_flight.remove(p.kind);
        self.retime(peer);
        Some(f.sent)
    }

    /// Cancels every outstanding request for `index` (a copy arrived); returns whether any was.
    fn cancel_requests(&mut self, index: ChunkIndex) -> bool {
        if self.picker.requests(index) == 0 {
            return false;
        }
        let mut cancelled = Vec::new();
        // Only peers waited on (`timed`) have requests outstanding.
        for &id in &self.timed {
            let Some(p) = self.peers.get_mut(&id) else { continue };
            if let Some(at) = p.in_flight.iter().position(|f| f.index == index) {
                p.in_flight.remove(at);
                self.picker.remove_request(index);
                self.in_flight.remove(p.kind);
                self.commands.push_back(Command::Cancel { peer: id, index });
                cancelled.push(id);
            }
        }
        for id in cancelled {
            self.retime(id);
        }
        true
    }

    /// Changes a peer's activity, keeping availability and the usable-cache count in step.
    fn set_state(&mut self, id: PeerId, state: Activity) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let (was_active, was_counted) = (p.state.is_active(), p.state.counts());
        p.state = state;
        let (is_active, is_counted) = (state.is_active(), state.counts());
        if was_counted != is_counted {
            match p.kind {
                PeerKind::Peer => {
                    contribute(&mut self.picker, &mut self.full_region, &p.bits, is_counted)
                }
                PeerKind::Cache if is_counted => self.live_caches += 1,
                PeerKind::Cache => self.live_caches -= 1,
                PeerKind::Origin => {}
            }
        }
        if is_active && !was_active {
            p.exhausted = false;
        }
        if was_counted && !is_counted {
            // Its chunks may now be region-rare: caches and the origin get a new look.
            self.clear_exhausted();
        }
        self.retime(id);
    }

    /// Keeps `timed` and `deadlines` in step with `id`'s requests and back-off.
    fn retime(&mut self, id: PeerId) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let timeout = p.in_flight.front().map(|f| f.sent + self.config.request_timeout);
        let deadline = match (timeout, p.state.until()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if deadline != p.deadline {
            if let Some(old) = p.deadline {
                self.deadlines.remove(&(old, id));
            }
            if let Some(new) = deadline {
                self.deadlines.insert((new, id));
            }
            p.deadline = deadline;
        }
        if deadline.is_some() {
            self.timed.insert(id);
        } else {
            self.timed.remove(&id);
        }
    }

    /// Backs a peer off (`Busy` or `Stalled`), never shortening a longer back-off, never turning
    /// a stall into a mere `Busy`, never lifting a refusal.
    fn back_off(&mut self, id: PeerId, state: Activity) {
        let Some(p) = self.peers.get(&id) else { return };
        let until = state.until().unwrap_or_default();
        let state = match (p.state, state) {
            (Activity::Refused, _) => return,
            // A stall outranks a busy back-off; within a kind, the later deadline wins.
            (Activity::Stalled { until: current }, _) => {
                Activity::Stalled { until: current.max(until) }
            }
            (Activity::Busy { until: current }, Activity::Busy { .. }) => {
                Activity::Busy { until: current.max(until) }
            }
            (_, state) => state,
        };
        self.set_state(id, state);
    }

    /// `peer` advertises chunk `index`; returns whether that is news (news from a source ends
    /// its run of refusal pauses).
    fn peer_gains(&mut self, id: PeerId, index: ChunkIndex) -> bool {
        let n = self.table.chunk_count();
        let Some(p) = self.peers.get_mut(&id) else { return false };
        let counted = p.kind == PeerKind::Peer && p.state.counts();
        if matches!(p.bits, Bits::Unknown) {
            p.bits = Bits::Partial(Bitfield::new(n));
        }
        let Bits::Partial(b) = &mut p.bits else { return false };
        if !b.insert(index) {
            return false;
        }
        if p.kind != PeerKind::Peer {
            // A source still filling up: its refusals so far say nothing about what it will
            // have next, so the next pause is short again.
            p.busy_streak = 0;
        }
        if counted {
            self.picker.inc(index);
        }
        if self.picker.is_wanted(index) {
            p.useful += 1;
            if self.useful.insert(id) {
                p.exhausted = false;
            }
        }
        if b.is_full() {
            // Count it once in `full_region` instead of once per chunk, and drop the bitset.
            if counted {
                for c in b.iter() {
                    self.picker.dec(c);
                }
                self.full_region += 1;
            }
            p.bits = Bits::Full;
        }
        true
    }

    /// `peer` does not have chunk `index` after all.
    fn peer_loses(&mut self, id: PeerId, index: ChunkIndex) {
        let n = self.table.chunk_count();
        let Some(p) = self.peers.get_mut(&id) else { return };
        let counted = p.kind == PeerKind::Peer && p.state.counts();
        match &mut p.bits {
            Bits::Unknown => {}
            Bits::Partial(b) => {
                if b.remove(index) {
                    if counted {
                        self.picker.dec(index);
                    }
                    if self.picker.is_wanted(index) {
                        p.useful -= 1;
                        if p.useful == 0 {
                            self.useful.remove(&id);
                        }
                    }
                }
            }
            Bits::Full => {
                let mut b = Bitfield::full(n);
                b.remove(index);
                if counted {
                    self.full_region -= 1;
                    for c in b.iter() {
                        self.picker.inc(c);
                    }
                }
                p.bits = Bits::Partial(b);
                self.recount_useful(id);
            }
        }
    }

    /// Forgets a peer: its availability, requests (re-issued elsewhere) and uploads.
    fn remove_peer(&mut self, _now: Duration, id: PeerId) {
        self.set_state(id, Activity::Refused);
        self.timed.remove(&id);
        self.useful.remove(&id);
        self.sources.remove(&id);
        let Some(p) = self.peers.remove(&id) else { return };
        if let Some(deadline) = p.deadline {
            self.deadlines.remove(&(deadline, id));
        }
        for f in p.in_flight {
            self.picker.remove_request(f.index);
            self.in_flight.remove(p.kind);
            self.arrival_lost(id, f.index);
        }
        self.uploads.active.retain(|&(peer, _)| peer != id);
        self.uploads.queue.retain(|q| q.peer != id);
        self.clear_exhausted();
        self.serve_queue();
    }

    fn ban(&mut self, now: Duration, id: PeerId, reason: BanReason) {
        if !self.banned.insert(id) {
            return;
        }
        self.progress.bans += 1;
        self.commands.push_back(Command::Ban { peer: id, reason });
        self.remove_peer(now, id);
    }

    fn release_permit(&mut self) {
        self.permit = OriginPermit::Idle;
        self.commands.push_back(Command::ReleaseOriginPermit);
    }

    /// Every chunk is held: free the download state and tell the shell.
    fn finish(&mut self) {
        debug_assert_eq!(self.in_flight.all, 0);
        self.picker.release();
        self.deferred.clear();
        self.full_region = 0;
        self.useful.clear();
        for p in self.peers.values_mut() {
            p.bits = Bits::Unknown;
            p.useful = 0;
        }
        match self.permit {
            OriginPermit::Granted => self.release_permit(),
            OriginPermit::Denied { .. } => self.permit = OriginPermit::Idle,
            OriginPermit::Idle | OriginPermit::Requested => {}
        }
        self.commands.push_back(Command::Complete);
    }

    /// A region peer's largest request window.
    fn max_window(&self) -> u8 {
        self.config.max_in_flight_per_peer.min(u32::from(u8::MAX)) as u8
    }

    /// Requests `p` may have outstanding: a region peer's window, a source's fixed limit.
    fn request_limit(&self, p: &Peer) -> u32 {
        match p.kind {
            PeerKind::Peer => u32::from(p.window),
            PeerKind::Cache | PeerKind::Origin => self.config.max_in_flight_back_to_source,
        }
    }

    /// Requests `p` could take now: its own limit, and for a region peer the shared budget.
    fn free_slots(&self, p: &Peer) -> u32 {
        let own = self.request_limit(p).saturating_sub(p.in_flight.len() as u32);
        match p.kind {
            PeerKind::Peer => own.min(self.budget.limit.saturating_sub(self.in_flight.region)),
            PeerKind::Cache | PeerKind::Origin => own,
        }
    }

    /// A region peer's piece of `len` bytes arrived, requested at `sent`: adjust the region
    /// budget. A late piece cuts it only if what is in flight would take us more than half
    /// the request timeout to take in at our measured intake rate: a piece late because its
    /// sender is slow says nothing about our own link.
    fn pace(&mut self, now: Duration, sent: Duration, len: u32) {
        let b = &mut self.budget;
        b.window_bytes += u64::from(len);
        let elapsed = now.saturating_sub(b.window_start);
        if elapsed >= Duration::from_secs(1) {
            let sample = (u128::from(b.window_bytes) * 1_000_000 / elapsed.as_micros()) as u64;
            b.rate = Some(b.rate.map_or(sample, |r| r / 2 + sample / 2));
            b.window_bytes = 0;
            b.window_start = now;
        }
        let half = self.config.request_timeout / 2;
        if now.saturating_sub(sent) > half && self.backlogged(half) {
            self.cut_budget(now, Some(sent));
            return;
        }
        let b = &mut self.budget;
        b.credit += 1;
        if b.credit >= b.limit {
            b.credit = 0;
            b.limit = (b.limit + 1).min(self.config.max_in_flight_total);
        }
    }

    /// What is in flight to region peers would take longer than `horizon` to take in at the
    /// measured intake rate (false while unmeasured).
    fn backlogged(&self, horizon: Duration) -> bool {
        let Some(rate) = self.budget.rate else { return false };
        let bytes = u128::from(self.in_flight.region) * u128::from(self.table.mean_length());
        bytes * 1_000_000 > u128::from(rate) * horizon.as_micros()
    }

    /// Cuts the region budget by a quarter (at least two requests stay), unless the late
    /// request (sent at `sent`) went out before the last cut.
    fn cut_budget(&mut self, now: Duration, sent: Option<Duration>) {
        let b = &mut self.budget;
        if b.cut_at.is_some_and(|cut| sent.is_none_or(|sent| sent < cut)) {
            return;
        }
        b.limit = (b.limit - b.limit / 4).max(2.min(self.config.max_in_flight_total));
        b.credit = 0;
        b.cut_at = Some(now);
    }

    fn is_candidate(&self, p: &Peer) -> bool {
        if !p.state.is_active() || p.exhausted || self.free_slots(p) == 0 {
            return false;
        }
        match p.kind {
            PeerKind::Peer => !matches!(p.bits, Bits::Unknown),
            PeerKind::Cache => self.back_to_source_open,
            PeerKind::Origin => self.back_to_source_open && self.live_caches == 0,
        }
    }

    /// The candidates of a pass over every peer, in order of preference: region peers before
    /// caches before the origin, then the fastest (unmeasured first, so each gets tried), then
    /// a per-peer random tiebreak. Only peers that advertise a wanted chunk, the caches and the
    /// origin are looked at: O(those · log) however many hosts are connected.
    fn candidates(&mut self, out: &mut Vec<(CandidateKey, PeerId)>) {
        out.clear();
        for &id in self.useful.iter().chain(&self.sources) {
            let Some(p) = self.peers.get(&id) else { continue };
            if self.is_candidate(p) {
                out.push(((p.kind, Reverse(p.rate.unwrap_or(u64::MAX)), p.tiebreak), id));
            }
        }
        out.sort_unstable();
        // A source that is also useful was pushed twice.
        out.dedup_by_key(|&mut (_, id)| id);
    }

    /// Hands out free request slots: to `only`, or to every candidate in order of preference.
    ///
    /// Preference keys do not change during a pass and nobody becomes a candidate during one
    /// (requests only take slots), so walking the candidates sorted once, each checked again
    /// when its turn comes, is the same as picking the best remaining one at every step.
    fn schedule(&mut self, now: Duration, only: Option<PeerId>) {
        if self.is_complete() {
            return;
        }
        self.round = self.round.wrapping_add(1);
        let round = self.round;
        let mut order = std::mem::take(&mut self.candidates);
        match only {
            Some(id) => {
                order.clear();
                order.push(((PeerKind::Peer, Reverse(0), 0), id));
            }
            None => self.candidates(&mut order),
        }
        for &(_, id) in &order {
            if !self.peers.get(&id).is_some_and(|p| p.visited != round && self.is_candidate(p)) {
                continue;
            }
            let Some(p) = self.peers.get_mut(&id) else { continue };
            p.visited = round;
            let kind = p.kind;
            if kind == PeerKind::Origin && self.permit != OriginPermit::Granted {
                self.ask_for_permit(now, id);
                continue;
            }
            let want = self.peers.get(&id).map_or(0, |p| self.free_slots(p)) as usize;
            let chunks = self.pick(id, want);
            let Some(p) = self.peers.get_mut(&id) else { continue };
            // Fewer than asked for: it has nothing more for us until something changes (and
            // whatever changes that clears the mark), so the next event need not pick again.
            p.exhausted = chunks.len() < want;
            if chunks.is_empty() {
                continue;
            }
            for &c in &chunks {
                p.in_flight.push_back(InFlight { index: c, sent: now });
                self.picker.add_request(c);
                self.in_flight.add(kind);
            }
            self.retime(id);
            self.commands.push_back(Command::Request { peer: id, chunks });
        }
        self.candidates = order;
        self.settle_permit();
    }

    /// The origin `id` is a candidate but we hold no permit: ask for one if there is work for
    /// it (and we may ask now).
    fn ask_for_permit(&mut self, now: Duration, id: PeerId) {
        let may_ask = match self.permit {
            OriginPermit::Idle => true,
            OriginPermit::Denied { retry_at } => retry_at <= now,
            OriginPermit::Requested | OriginPermit::Granted => false,
        };
        if may_ask && !self.pick(id, 1).is_empty() {
            self.permit = OriginPermit::Requested;
            self.commands.push_back(Command::RequestOriginPermit);
        }
        if let Some(p) = self.peers.get_mut(&id) {
            p.exhausted = true;
        }
    }

    /// Gives the permit back once nothing is in flight to the origin and it has nothing more to
    /// offer (every origin exhausted, backed off, or trumped by a live cache).
    fn settle_permit(&mut self) {
        if self.permit != OriginPermit::Granted {
            return;
        }
        let mut needed = false;
        let origins = self.sources.iter().filter_map(|id| self.peers.get(id));
        for p in origins.filter(|p| p.kind == PeerKind::Origin) {
            if !p.in_flight.is_empty() {
                return;
            }
            needed |= p.state.is_active() && !p.exhausted && self.live_caches == 0;
        }
        if !needed {
            self.release_permit();
        }
    }

    /// Up to `want` chunks to request from `id`, most preferred first.
    fn pick(&mut self, id: PeerId, want: usize) -> Vec<ChunkIndex> {
        let mut out = Vec::new();
        if want == 0 {
            return out;
        }
        let endgame = self.endgame();
        let held = self.have.count_ones() as usize + self.writing.len();
        let random_first = held < self.config.random_first_chunks as usize;
        let Some(p) = self.peers.get(&id) else { return out };
        let picker = &self.picker;
        let rng = &mut self.rng;
        let region_rare_only = p.kind != PeerKind::Peer;
        let deferred = &self.deferred;
        if region_rare_only {
            if self.full_region == 0 {
                pick_region_rare(picker, rng, &p.bits, deferred, want, &mut out);
            }
        } else {
            pick_rarest(picker, rng, &mut self.scratch, &p.bits, want, random_first, &mut out);
        }
        if endgame && out.len() < want && p.kind != PeerKind::Origin {
            let rare_only = region_rare_only.then_some((self.full_region, deferred));
            let limit = self.config.endgame_max_requests;
            pick_duplicates(picker, rng, p, want, limit, rare_only, &mut out);
        }
        out
    }
}

/// Adds (`add`) or removes an active region peer's advertised chunks to or from availability.
fn contribute(picker: &mut Picker, full_region: &mut u32, bits: &Bits, add: bool) {
    match bits {
        Bits::Unknown => {}
        Bits::Full if add => *full_region += 1,
        Bits::Full => *full_region -= 1,
        Bits::Partial(b) => {
            for c in b.iter() {
                if add {
                    picker.inc(c);
                } else {
                    picker.dec(c);
                }
            }
        }
    }
}

/// Rarest first (or random while `random_first`) among the unrequested wanted chunks `bits` has.
fn pick_rarest(
    picker: &Picker,
    rng: &mut ChaCha8Rng,
    scratch: &mut Vec<(u16, u32, ChunkIndex)>,
    bits: &Bits,
    want: usize,
    random_first: bool,
    out: &mut Vec<ChunkIndex>,
) {
    let eligible = |c: ChunkIndex| picker.requests(c) == 0 && bits.has(c);
    let order = picker.order();
    match bits {
        Bits::Unknown => {}
        // A peer with few of the wanted chunks: walking the order would mostly skip, so walk its
        // bits instead, O(n/64 + its chunks), and sort the candidates.
        Bits::Partial(b) if (b.count_ones() as usize) * 4 < order.len() => {
            scratch.clear();
            for c in b.iter() {
                if picker.is_wanted(c) && picker.requests(c) == 0 {
                    let rarity = if random_first { 0 } else { picker.avail(c) };
                    scratch.push((rarity, rng.r#gen(), c));
                }
            }
            scratch.sort_unstable();
            out.extend(scratch.iter().take(want).map(|&(_, _, c)| c));
        }
        _ if random_first => scan(order, 0..order.len(), rng, want, eligible, out),
        _ => {
            for b in 0..picker.bucket_count() {
                scan(order, picker.bucket(b), rng, want, eligible, out);
                if out.len() >= want {
                    break;
                }
            }
        }
    }
}

/// Chunks no active region peer advertises (bucket 0) and not deferred, for a cache or the
/// origin.
fn pick_region_rare(
    picker: &Picker,
    rng: &mut ChaCha8Rng,
    bits: &Bits,
    deferred: &Deferred,
    want: usize,
    out: &mut Vec<ChunkIndex>,
) {
    if picker.bucket_count() == 0 {
        return;
    }
    let eligible = |c: ChunkIndex| picker.requests(c) == 0 && bits.has(c) && !deferred.contains(c);
    scan(picker.order(), picker.bucket(0), rng, want, eligible, out);
}

/// Endgame: chunks already requested elsewhere (fewest requests first) that `p` has and was not
/// asked for. For a cache, `region_rare` holds `full_region` and the deferred chunks, and
/// restricts the picks to region-rare chunks that are not deferred.
fn pick_duplicates(
    picker: &Picker,
    rng: &mut ChaCha8Rng,
    p: &Peer,
    want: usize,
    limit: u8,
    region_rare: Option<(u32, &Deferred)>,
    out: &mut Vec<ChunkIndex>,
) {
    if region_rare.is_some_and(|(full, _)| full > 0) {
        return;
    }
    let order = picker.order();
    for level in 1..limit {
        let eligible = |c: ChunkIndex| {
            picker.requests(c) == level
                && p.bits.has(c)
                && region_rare
                    .is_none_or(|(_, deferred)| picker.avail(c) == 0 && !deferred.contains(c))
                && !p.in_flight.iter().any(|f| f.index == c)
        };
        scan(order, 0..order.len(), rng, want, eligible, out);
        if out.len() >= want {
            return;
        }
    }
}

/// Appends eligible chunks of `order[range]` to `out` until it holds `want`, starting at a random
/// offset and wrapping around, so that ties break randomly.
fn scan(
    order: &[ChunkIndex],
    range: std::ops::Range<usize>,
    rng: &mut ChaCha8Rng,
    want: usize,
    eligible: impl Fn(ChunkIndex) -> bool,
    out: &mut Vec<ChunkIndex>,
) {
    let len = range.len();
    if len == 0 || out.len() >= want {
        return;
    }
    let offset = rng.gen_range(0..len);
    for i in 0..len {
        let c = order[range.start + (offset + i) % len];
        if eligible(c) && !out.contains(&c) {
            out.push(c);
            if out.len() >= want {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps the "Cost" figures in the module docs honest.
    #[test]
    fn per_peer_state_stays_small() {
        let size = std::mem::size_of::<Peer>();
        assert!(size < 224, "Peer is {size} bytes");
    }
}
