//! The chunk protocol: how two Fleetwave daemons exchange the chunks of a manifest over QUIC.
//!
//! This module is the protocol's specification and its implementation without I/O: a codec
//! ([`Frame`], [`PieceDecoder`]) and a per-connection state machine ([`Session`]) that turns
//! received frames into [`swarm`](crate::swarm) events and the scheduler's commands into frames.
//! It reads no socket and no clock and does not depend on the QUIC library; the transport
//! (the `transport` module) moves its bytes, and tests move them through memory.
//!
//! # Participants
//!
//! Daemons in three roles: hosts, caches and the origin (on the wire `NodeRole`; in the swarm
//! [`PeerKind`], where a host is [`PeerKind::Peer`]). They connect host <-> host (region peers
//! trading chunks), host -> cache and host -> origin (back to source), and cache -> origin
//! (pull-through). The protocol is symmetric: either side may request chunks and serve them;
//! the roles only tell each side's scheduler whom to ask for what.
//!
//! The connection is already authenticated when the protocol starts: each side knows the
//! other's identity (the transport verified its libp2p certificate against the PeerId the
//! rendezvous gave). The protocol carries no identity and trusts none of the peer's bytes.
//!
//! One connection exchanges the chunks of **one manifest**, named in the handshake. Two daemons
//! exchanging two manifests open two connections: a QUIC handshake costs a round trip and a few
//! kilobytes, nothing next to an artifact, and a connection per manifest keeps every frame free
//! of a manifest tag and maps one-to-one onto the per-manifest swarm scheduler.
//!
//! # Stream layout
//!
//! - **The control stream**: one bidirectional stream, opened by the dialer right after the
//!   QUIC handshake. The dialer writes its Hello at once; the listener reads it, decides whether
//!   it takes part (does it serve this manifest?) and answers with its own Hello. Then both sides
//!   send every other control frame on it (Bitfield, Have, Request, Cancel, Reject) until the
//!   connection closes. It is the only bidirectional stream: the listener never opens one, and
//!   closes a connection whose dialer opens a second with `PROTOCOL_VIOLATION` (the transport
//!   sets the peer's bidirectional stream limit to 1). Control frames are small and ordered, so
//!   a Cancel always arrives before a Request sent after it.
//! - **Piece streams**: every piece (the answer to one Request) travels on its own
//!   unidirectional stream, opened by the side that serves it: a piece header frame, then
//!   exactly the header's `length` raw bytes of the chunk, then the end of the stream (FIN).
//!   A 16 MiB piece therefore never delays a control frame or another piece (no head-of-line
//!   blocking between streams), the receiver hashes and writes the bytes straight from its
//!   receive buffer (they are never copied into a protobuf message), and a piece the receiver
//!   no longer wants is stopped alone (STOP_SENDING). How many pieces one peer sends at once is
//!   bounded by its upload slots and by the receiver's limit on unidirectional streams.
//!
//! Once it has written a piece header, the uploader sends the whole piece: it never resets a
//! piece stream on its own (only by closing the connection), with one exception below. The
//! header is the answer to a request, and a reset could discard it before it arrives, leaving
//! the requester waiting for an answer that never comes. The requester may stop a piece stream
//! (STOP_SENDING with `CANCELLED`), but only after reading its header, for the same reason.
//!
//! The exception: an uploader that passes a chunk on while it arrives
//! ([`crate::swarm::SwarmConfig::forward_arriving`]) sends the bytes as they come and finishes
//! the stream only once its own copy is verified. If that copy fails it resets the stream with
//! `WITHDRAWN`: the requester takes it as `Reject{NOT_HAVE}` (or, if the reset discarded the
//! header, its request times out and goes elsewhere).
//!
//! # Framing
//!
//! Every frame is a length prefix (an unsigned protobuf varint, minimally encoded) followed by
//! that many bytes of a protobuf `fleetwave.v1.ChunkFrame` (`proto/proto/fleetwave/v1/
//! chunk.proto`) whose `body` holds exactly one message: prost's `encode_length_delimited`. The
//! receiver checks the prefix against the stream's limit *before* it reads or allocates the
//! body, and refuses a prefix as soon as enough of it has arrived to exceed the limit:
//!
//! - control stream: [`MAX_CONTROL_FRAME`] (64 KiB), so that a Bitfield of [`MAX_CHUNKS`]
//!   chunks ([`MAX_BITFIELD_BYTES`], 50,000 bytes) fits with its framing;
//! - piece stream: [`MAX_PIECE_HEADER_FRAME`] (32 bytes) for its header (two varints).
//!
//! Piece bytes are not a frame: their number is the header's `length`, at most
//! [`MAX_PIECE_LEN`] (16 MiB, the largest chunk the chunker cuts and the store keeps), and the
//! session checks it against the manifest's length of that chunk before any byte is read.
//!
//! # Messages
//!
//! Indices are positions in the manifest's chunk list (`0..chunk_count`, [`ChunkIndex`]).
//!
//! - **Hello** `{version, manifest_id, role, chunk_count, max_requests}` ([`Hello`]): the first
//!   frame each side sends. `version` is [`VERSION`]; `manifest_id` the 32-byte id of the
//!   manifest; `role` the sender's; `chunk_count` the manifest's number of chunks (at most
//!   [`MAX_CHUNKS`]); `max_requests` how many requests the receiver may have open against the
//!   sender at once (1 to [`MAX_REQUESTS_LIMIT`]; this implementation offers
//!   [`DEFAULT_MAX_REQUESTS`]).
//! - **Bitfield** `{bits}`: every chunk the sender holds, replacing anything it said before.
//!   Exactly `ceil(chunk_count / 8)` bytes, chunk `i` in bit `7 - i % 8` of byte `i / 8`, spare
//!   bits zero ([`Bitfield::to_bytes`]). Optional; this implementation sends one as soon as
//!   the handshake is complete. Only durably stored chunks are advertised.
//! - **Have** `{indices}`: the sender now holds these chunks too. 1 to [`MAX_BATCH`] indices;
//!   consecutive announcements are batched into one frame. A sender may leave out chunks the
//!   receiver has advertised itself (this implementation does, "have suppression"), so a
//!   receiver's view of a peer is complete only for the chunks it lacks, which are the ones it
//!   asks for.
//! - **Request** `{indices}`: please send these chunks, most wanted first. 1 to [`MAX_BATCH`]
//!   indices, none of them already open on this connection. Each index opens one request.
//! - **Cancel** `{indices}`: withdraw the open requests for these chunks. 1 to [`MAX_BATCH`]
//!   indices. Cancelling a request that is no longer open (its answer crossed the Cancel) is
//!   not an error; the Cancel is ignored then.
//! - **Reject** `{index, reason}`: answers one open request without a piece. Reasons: `BUSY`,
//!   `NOT_HAVE`, `BANNED`, `SEEDED_RECENTLY` (the scheduler's [`RejectReason`]s), and
//!   `CANCELLED`, which only ever answers the requester's own Cancel ([`RejectKind`]).
//! - **PieceHeader** `{index, length}` ([`PieceHeader`]): the first and only frame of a piece
//!   stream; answers the open request for `index`; `length` equals the manifest's length of
//!   that chunk. The bytes follow.
//!
//! An unset `body`, a message kind or enum value this version does not know, an empty or
//! oversized batch, or a malformed encoding is a protocol violation: new messages and values
//! need a new [`VERSION`]. Unknown fields inside known messages are ignored (protobuf rules).
//!
//! # Handshake
//!
//! Nothing precedes a side's Hello, and it sends only one. The receiver of a Hello checks:
//!
//! 1. `version` equals its own, else it closes with `VERSION_MISMATCH`;
//! 2. (the listener) it serves `manifest_id`, else it closes with `UNKNOWN_MANIFEST` without
//!    sending its own Hello;
//! 3. `manifest_id` and `chunk_count` equal its own (the listener echoes the dialer's manifest,
//!    so the dialer checks this), else `MANIFEST_MISMATCH`;
//! 4. `role` is what it expects of that identity, when it has an expectation (the rendezvous
//!    or the configuration says which identities are caches and the origin), else
//!    `UNEXPECTED_ROLE`.
//!
//! The receiver accepts any frame after the sender's Hello. This implementation sends its
//! Bitfield, Haves and Requests only once it has the peer's Hello (the listener: together with
//! its own): the number of Requests is bounded by the peer's `max_requests`, and an announcement
//! made before then is covered by the Bitfield.
//!
//! # Requests and answers
//!
//! A request is **open** from the moment the requester sends it until it is answered, and every
//! request is answered exactly once: by a piece (its header), or by a Reject. A Cancel does not
//! close a request: the uploader answers a Cancel of an open request with `Reject{CANCELLED}`
//! (or, when the piece had already started, the piece is the answer). So both sides always agree
//! on which requests are open, and the requester can tell an answer to a request it made from
//! an unsolicited one.
//!
//! - The requester has at most the uploader's `max_requests` requests open (cancelled ones
//!   included, until answered) and never two for the same chunk. The uploader closes the
//!   connection with `TOO_MANY_REQUESTS` when a Request would take the remote's open requests
//!   past its limit. The requester counts a request closed only when the answer arrives (or
//!   its header does), after the uploader counted it closed (when sending it), so a requester
//!   that stays within the limit can never be taken for a flooder.
//! - A piece or Reject for a chunk with no open request is a protocol violation, as is a
//!   `Reject{CANCELLED}` for a request that was not cancelled.
//! - A late answer to a cancelled request is still delivered: a piece is verified and kept if
//!   still wanted, a refusal still tells something about the uploader.
//!
//! # Error codes
//!
//! [`ErrorCode`]s are QUIC application error codes, used in CONNECTION_CLOSE (for the
//! connection) and in RESET_STREAM and STOP_SENDING (for one piece stream). What the side
//! receiving each one does:
//!
//! - 0 `NO_ERROR`: done, or no longer needed. Reconnect when needed again.
//! - 1 `PROTOCOL_VIOLATION`: a frame broke this spec. A bug or a hostile peer: log it, and do
//!   not reconnect to that peer for this manifest.
//! - 2 `FRAME_TOO_LARGE`: a frame, batch, bitfield or piece exceeded its limit. As
//!   `PROTOCOL_VIOLATION`.
//! - 3 `VERSION_MISMATCH`: the Hello's version is not supported. Do not retry that peer with
//!   this version.
//! - 4 `UNKNOWN_MANIFEST`: the listener does not serve the manifest (yet). Try other peers, and
//!   this one again later.
//! - 5 `MANIFEST_MISMATCH`: the Hellos disagree on the manifest or its chunk count. As
//!   `PROTOCOL_VIOLATION`.
//! - 6 `UNEXPECTED_ROLE`: the Hello claims a role the receiver does not grant that identity.
//!   Do not reconnect.
//! - 7 `TOO_MANY_REQUESTS`: more requests open than the Hello allowed. As
//!   `PROTOCOL_VIOLATION`.
//! - 8 `BANNED`: the peer banned us (we sent a chunk that failed its hash). Never reconnect to
//!   it for this manifest.
//! - 9 `SHUTTING_DOWN`: the peer is stopping. Its requests go elsewhere; reconnect later if
//!   still needed.
//! - 10 `CANCELLED` (piece streams only): the requester no longer wants the piece
//!   (STOP_SENDING, after reading its header; the uploader's RESET_STREAM in answer carries the
//!   same code). Not an error: the uploader reports the upload done.
//! - 11 `INTERNAL_ERROR`: a local failure (a chunk could not be read from disk, a bug).
//!   Reconnect later.
//! - 12 `TOO_MANY_PEERS`: the listener has no room for another peer. Try other peers.
//! - 13 `DUPLICATE_CONNECTION`: a connection between the two identities exists already. Use
//!   that one.
//! - 14 `WITHDRAWN` (piece streams only): the uploader's copy of a chunk it was passing on
//!   while it arrived failed. Not an error: as `Reject{NOT_HAVE}` for that chunk.
//!
//! # Errors, and what each side does
//!
//! - **Frame and session errors** ([`FrameError`], [`ProtocolError`]): the side that detects one
//!   closes the connection with [`ProtocolError::code`]. Nothing of the offending frame has been
//!   acted on (a frame is validated whole before any of its events is emitted); the scheduler is
//!   told the peer disconnected, which re-issues its requests elsewhere.
//! - **A broken piece stream**: a malformed header, bytes past the piece, a FIN before the
//!   header's `length` bytes, or a RESET_STREAM the requester did not ask for with STOP_SENDING.
//!   The bytes received are dropped and the connection is closed with `PROTOCOL_VIOLATION`
//!   ([`FrameError::code`]): the uploader broke its promise to send the whole piece.
//! - **A piece that fails its hash** is the scheduler's business ([`crate::swarm`]: the bytes
//!   are dropped and, by default, the peer banned: the connection is closed with `BANNED`).
//! - **A Cancel that crosses the piece**: the uploader finishes the piece, which is the answer.
//!   The requester, if it no longer wants it, may stop the stream with STOP_SENDING(`CANCELLED`)
//!   after reading the header; the uploader's stream is then reset with that code, which is not
//!   an error on either side, and it reports the upload done.
//! - **A chunk the uploader cannot read** (a disk failure after it was announced): the uploader
//!   reads the chunk before it commits to the piece; if that fails it answers
//!   `Reject{NOT_HAVE}`. A failure after the header is sent closes the connection with
//!   `INTERNAL_ERROR` (the header promised the bytes).
//! - **Silence**: a peer that stops answering is caught by the scheduler's request timeout (its
//!   requests are cancelled and re-issued elsewhere) and, if the connection goes quiet, by
//!   QUIC's idle timeout.
//!
//! # Resources one peer can make us hold
//!
//! Per connection: one control frame being assembled (at most [`MAX_CONTROL_FRAME`]); the
//! decoded frame (at most [`MAX_BATCH`] indices, or a [`MAX_BITFIELD_BYTES`] bitfield, which the
//! scheduler keeps as the peer's advertisement); as many open requests as our Hello's
//! `max_requests` allows ([`DEFAULT_MAX_REQUESTS`] by default); and per piece stream a 32-byte
//! header and the piece's bytes, bounded by the manifest's chunk length and QUIC flow control.
//!
//! # Using it
//!
//! [`Session`] documents the calls, from connecting to closing. In short, per connection:
//! frames in through [`Session::handle_bytes`] and piece headers through
//! [`Session::handle_piece_header`], [`Event`]s out to the scheduler with [`Event::deliver`];
//! the scheduler's commands in through [`Session::send_command`], control frames out with
//! [`Session::write_frames`] and pieces as [`Outbound::Piece`].
//!
//! [`MAX_CHUNKS`]: fleetwave_chunker::manifest::MAX_CHUNKS
//! [`ChunkIndex`]: crate::swarm::ChunkIndex
//! [`PeerKind`]: crate::swarm::PeerKind
//! [`PeerKind::Peer`]: crate::swarm::PeerKind::Peer
//! [`RejectReason`]: crate::swarm::RejectReason
//! [`RejectReason::Busy`]: crate::swarm::RejectReason::Busy
//! [`Bitfield::to_bytes`]: crate::swarm::Bitfield::to_bytes

mod frame;
mod session;

use std::fmt;

use fleetwave_chunker::manifest::MAX_CHUNKS;

use crate::swarm::EventError;

pub use frame::{
    Frame, FrameError, FrameKind, Hello, PieceData, PieceDecoder, PieceHeader, RejectKind,
};
pub use session::{Event, Outbound, ProtocolError, SendError, Session, SessionConfig};

/// The protocol version this module speaks, sent in every Hello.
pub const VERSION: u32 = 1;

/// Largest control frame, in bytes, length prefix excluded.
///
/// The largest control frame is a Bitfield of a manifest with [`MAX_CHUNKS`] chunks:
/// [`MAX_BITFIELD_BYTES`] (50,000) plus a few bytes of protobuf framing. 64 KiB covers it with
/// room to spare, and is what a peer can make us buffer for one frame.
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;

/// Largest Bitfield, in bytes: one bit per chunk of the largest manifest ([`MAX_CHUNKS`]).
pub const MAX_BITFIELD_BYTES: usize = MAX_CHUNKS.div_ceil(8);

/// Largest piece header frame, in bytes, length prefix excluded. A header is two varints of at
/// most 5 bytes each plus 4 bytes of tags and lengths: 14 bytes.
pub const MAX_PIECE_HEADER_FRAME: usize = 32;

/// Largest piece, in bytes: the largest chunk the store accepts ([`crate::store::MAX_CHUNK_LEN`],
/// FastCDC's 16 MiB maximum chunk size).
pub const MAX_PIECE_LEN: usize = crate::store::MAX_CHUNK_LEN;

/// Most indices in one Have, Request or Cancel frame.
///
/// 4,096 varints of at most 5 bytes stay well within [`MAX_CONTROL_FRAME`], and a burst of that
/// many announcements (a host that just verified a group of chunks) costs one frame. It also
/// bounds the events one frame turns into.
pub const MAX_BATCH: usize = 4096;

/// Largest `max_requests` a Hello may offer: bounds the open-request state a peer can be asked
/// to keep.
pub const MAX_REQUESTS_LIMIT: u32 = 4096;

/// The `max_requests` this implementation offers by default.
///
/// The scheduler keeps at most 8 requests open at one region peer and 2 at a cache or the origin
/// by default ([`crate::swarm::SwarmConfig`]); cancelled requests count until answered. 256
/// leaves room for larger configurations and a burst of cancellations, while a flooding peer can
/// make us hold at most 256 entries.
pub const DEFAULT_MAX_REQUESTS: u32 = 256;

const _: () = assert!(MAX_BITFIELD_BYTES + 16 <= MAX_CONTROL_FRAME);
const _: () = assert!(MAX_BATCH * 5 + 16 <= MAX_CONTROL_FRAME);
const _: () = assert!(MAX_REQUESTS_LIMIT as usize <= MAX_BATCH);

/// A QUIC application error code of the chunk protocol: the reason in a CONNECTION_CLOSE,
/// RESET_STREAM or STOP_SENDING. See the [module docs](self#error-codes) for what each means and
/// what the receiver does. Codes this version does not know are kept as they are.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// Done, or no longer needed.
    pub const NO_ERROR: Self = Self(0);
    /// A frame broke the protocol.
    pub const PROTOCOL_VIOLATION: Self = Self(1);
    /// A frame, batch, bitfield or piece exceeded its limit.
    pub const FRAME_TOO_LARGE: Self = Self(2);
    /// The Hello's protocol version is not supported.
    pub const VERSION_MISMATCH: Self = Self(3);
    /// The listener does not serve the manifest the dialer asked for.
    pub const UNKNOWN_MANIFEST: Self = Self(4);
    /// The two Hellos disagree on the manifest or its chunk count.
    pub const MANIFEST_MISMATCH: Self = Self(5);
    /// The Hello claims a role the receiver does not grant that identity.
    pub const UNEXPECTED_ROLE: Self = Self(6);
    /// More requests open than the Hello allowed.
    pub const TOO_MANY_REQUESTS: Self = Self(7);
    /// The peer is banned.
    pub const BANNED: Self = Self(8);
    /// The daemon is stopping.
    pub const SHUTTING_DOWN: Self = Self(9);
    /// A piece is no longer wanted, or no longer sent.
    pub const CANCELLED: Self = Self(10);
    /// A local failure.
    pub const INTERNAL_ERROR: Self = Self(11);
    /// The listener has no room for another peer.
    pub const TOO_MANY_PEERS: Self = Self(12);
    /// A connection between the two identities exists already.
    pub const DUPLICATE_CONNECTION: Self = Self(13);
    /// A piece passed on while it arrived is withdrawn: its sender's copy failed.
    pub const WITHDRAWN: Self = Self(14);

    /// The code's name, if this version defines it.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::NO_ERROR => "NO_ERROR",
            Self::PROTOCOL_VIOLATION => "PROTOCOL_VIOLATION",
            Self::FRAME_TOO_LARGE => "FRAME_TOO_LARGE",
            Self::VERSION_MISMATCH => "VERSION_MISMATCH",
            Self::UNKNOWN_MANIFEST => "UNKNOWN_MANIFEST",
            Self::MANIFEST_MISMATCH => "MANIFEST_MISMATCH",
            Self::UNEXPECTED_ROLE => "UNEXPECTED_ROLE",
            Self::TOO_MANY_REQUESTS => "TOO_MANY_REQUESTS",
            Self::BANNED => "BANNED",
            Self::SHUTTING_DOWN => "SHUTTING_DOWN",
            Self::CANCELLED => "CANCELLED",
            Self::INTERNAL_ERROR => "INTERNAL_ERROR",
            Self::TOO_MANY_PEERS => "TOO_MANY_PEERS",
            Self::DUPLICATE_CONNECTION => "DUPLICATE_CONNECTION",
            Self::WITHDRAWN => "WITHDRAWN",
            _ => return None,
        })
    }

    /// The code to close a connection with when the scheduler refuses an event from it (which,
    /// after the session's checks, means a refused peer or a bug).
    pub fn from_event_error(err: &EventError) -> Self {
        match err {
            EventError::Banned { .. } => Self::BANNED,
            EventError::TooManyPeers { .. } => Self::TOO_MANY_PEERS,
            EventError::AlreadyConnected { .. } => Self::DUPLICATE_CONNECTION,
            EventError::IndexOutOfRange { .. } | EventError::BitfieldLength { .. } => {
                Self::PROTOCOL_VIOLATION
            }
            EventError::UnknownPeer { .. }
            | EventError::NotWriting { .. }
            | EventError::NotServing { .. } => Self::INTERNAL_ERROR,
        }
    }
}

impl From<ErrorCode> for u32 {
    fn from(code: ErrorCode) -> u32 {
        code.0
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "ERROR_CODE({})", self.0),
        }
    }
}
