//! [`Session`]: the protocol state of one connection.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::BytesMut;
use fleetwave_chunker::ManifestId;

use super::frame::{Frame, FrameError, FrameKind, Hello, PieceHeader, RejectKind};
use super::{DEFAULT_MAX_REQUESTS, ErrorCode, MAX_BATCH, VERSION};
use crate::swarm::{
    Bitfield, BitfieldError, ChunkIndex, ChunkTable, Command, EventError, PeerId, PeerKind,
    RejectReason, Scheduler,
};

/// What a [`Session`] needs to know about this side of the connection.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// The manifest exchanged.
    pub manifest: ManifestId,
    /// Its chunk lengths (the scheduler's table; shared, cheap to clone).
    pub table: ChunkTable,
    /// This daemon's role.
    pub role: PeerKind,
    /// Requests the peer may have open against us at once, offered in our Hello. Default
    /// [`DEFAULT_MAX_REQUESTS`]; 1 to [`MAX_REQUESTS_LIMIT`](super::MAX_REQUESTS_LIMIT).
    pub max_requests: u32,
    /// The role the peer must claim, when we know it (the rendezvous or the configuration says
    /// which identities are caches and the origin). `None` (the default) accepts any.
    pub expect_role: Option<PeerKind>,
}

impl SessionConfig {
    /// A configuration with the defaults: [`DEFAULT_MAX_REQUESTS`], no role expectation.
    pub fn new(manifest: ManifestId, table: ChunkTable, role: PeerKind) -> Self {
        Self { manifest, table, role, max_requests: DEFAULT_MAX_REQUESTS, expect_role: None }
    }
}

/// Something the peer said, in the scheduler's terms. Deliver each, in order, with
/// [`Event::deliver`] (or the matching `Scheduler::handle_*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The handshake is complete: the peer plays `role`.
    /// [`Scheduler::handle_connected`] with it, then [`Session::send_bitfield`] with
    /// [`Scheduler::bitfield`].
    Connected {
        /// The peer's role, as the scheduler's [`PeerKind`].
        role: PeerKind,
    },
    /// [`Scheduler::handle_bitfield`].
    Bitfield(Bitfield),
    /// [`Scheduler::handle_have`].
    Have(ChunkIndex),
    /// [`Scheduler::handle_request`]: the peer asks us for this chunk.
    Request(ChunkIndex),
    /// [`Scheduler::handle_cancel`]: the peer withdraws a request that was still open (not yet
    /// served or refused); the session has already queued its acknowledgement. A Cancel of a
    /// request that is being served is no event: the piece is the answer, and the uploader
    /// finishes it unless the peer stops the stream.
    Cancel(ChunkIndex),
    /// [`Scheduler::handle_rejected`]: the peer refused one of our requests. Also emitted by
    /// the session itself, as `Busy`, for a request it could not send (see
    /// [`Session::send_command`]).
    Rejected {
        /// The chunk.
        index: ChunkIndex,
        /// Why.
        reason: RejectReason,
    },
}

impl Event {
    /// Hands the event to the scheduler, from `peer` at `now`.
    ///
    /// An error means the scheduler refused it: close the connection with
    /// [`ErrorCode::from_event_error`] (for example `BANNED` for a banned peer reconnecting).
    pub fn deliver(
        self,
        scheduler: &mut Scheduler,
        now: Duration,
        peer: PeerId,
    ) -> Result<(), EventError> {
        match self {
            Event::Connected { role } => scheduler.handle_connected(now, peer, role),
            Event::Bitfield(bits) => scheduler.handle_bitfield(now, peer, bits),
            Event::Have(index) => scheduler.handle_have(now, peer, index),
            Event::Request(index) => scheduler.handle_request(now, peer, index),
            Event::Cancel(index) => scheduler.handle_cancel(now, peer, index),
            Event::Rejected { index, reason } => {
                scheduler.handle_rejected(now, peer, index, reason)
            }
        }
    }
}

/// What the shell does after [`Session::send_command`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outbound {
    /// Nothing to send: the command concerns no connection, or it is moot: an announcement
    /// before the handshake (the Bitfield sent on connecting covers it), a Reject of a request
    /// the peer has cancelled, a Cancel of a request already answered. For a Cancel whose
    /// piece is arriving, the shell may stop that piece stream (STOP_SENDING with
    /// [`ErrorCode::CANCELLED`]); it has read its header, so the answer is not lost.
    Nothing,
    /// Control frames are queued: write them with [`Session::write_frames`]. Also check
    /// [`Session::poll_event`]: requests that could not be sent come back as `Busy`.
    Queued,
    /// Open a unidirectional stream, write the header ([`Frame::Piece`], [`Frame::encode`]),
    /// then exactly `header.length` bytes of the chunk, then finish the stream; report
    /// [`Scheduler::handle_upload_done`] when done, or when the peer stopped the stream. The
    /// header commits to the whole piece, so give `Serve` to the session once the chunk's bytes
    /// are at hand; if reading them fails, give it a `Reject` with
    /// [`RejectReason::NotHave`] instead (and report the upload done). A failure after the
    /// header closes the connection with [`ErrorCode::INTERNAL_ERROR`].
    Piece(PieceHeader),
    /// Do not serve: the peer cancelled the request before it was served. Report
    /// [`Scheduler::handle_upload_done`] at once.
    Withdrawn,
    /// Close the connection with this code ([`Command::Ban`]: `BANNED`).
    Close(ErrorCode),
}

/// The peer broke the protocol; close the connection with [`code`](Self::code).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A frame could not be decoded.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer's first frame is not a Hello.
    #[error("expected hello, got a {got:?} frame")]
    HelloExpected {
        /// What it sent instead.
        got: FrameKind,
    },
    /// The peer sent a second Hello.
    #[error("second hello")]
    DuplicateHello,
    /// The peer speaks another protocol version.
    #[error("protocol version {theirs}, expected {ours}")]
    VersionMismatch {
        /// [`VERSION`].
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// The peer's Hello names another manifest.
    #[error("peer exchanges manifest {theirs}, expected {ours}")]
    ManifestMismatch {
        /// Ours.
        ours: ManifestId,
        /// The peer's.
        theirs: ManifestId,
    },
    /// The peer's Hello gives the manifest another chunk count.
    #[error("peer says the manifest has {theirs} chunks, it has {ours}")]
    ChunkCountMismatch {
        /// Ours.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// The peer claims a role it was not expected to have.
    #[error("peer claims role {got:?}, expected {expected:?}")]
    UnexpectedRole {
        /// The role it should have.
        expected: PeerKind,
        /// The role it claims.
        got: PeerKind,
    },
    /// A piece header arrived on the control stream.
    #[error("piece header on the control stream")]
    PieceOnControlStream,
    /// A frame names a chunk past the manifest's last.
    #[error("{kind:?} frame names chunk {index}, the manifest has {chunks}")]
    IndexOutOfRange {
        /// The frame kind.
        kind: FrameKind,
        /// The index.
        index: ChunkIndex,
        /// The manifest's chunk count.
        chunks: u32,
    },
    /// A Bitfield that does not fit the manifest.
    #[error("invalid bitfield")]
    Bitfield(#[source] BitfieldError),
    /// A Request for a chunk whose request is still open.
    #[error("chunk {index} requested while its request is open")]
    DuplicateRequest {
        /// The chunk.
        index: ChunkIndex,
    },
    /// A Request that takes the peer's open requests past our `max_requests`.
    #[error("peer would have {open} requests open, the limit is {limit}")]
    TooManyRequests {
        /// Open requests the frame would make.
        open: usize,
        /// Our `max_requests`.
        limit: u32,
    },
    /// A piece or Reject for a chunk we have no open request for.
    #[error("unsolicited {kind:?} for chunk {index}")]
    Unsolicited {
        /// [`FrameKind::Piece`] or [`FrameKind::Reject`].
        kind: FrameKind,
        /// The chunk.
        index: ChunkIndex,
    },
    /// A `Reject{CANCELLED}` for a request we did not cancel.
    #[error("chunk {index} rejected as cancelled, but it was not cancelled")]
    NotCancelled {
        /// The chunk.
        index: ChunkIndex,
    },
    /// A piece whose length is not the manifest's length of the chunk.
    #[error("piece {index} of {got} bytes, the manifest says {expected}")]
    PieceLength {
        /// The chunk.
        index: ChunkIndex,
        /// The manifest's length.
        expected: u32,
        /// The header's.
        got: u32,
    },
}

impl ProtocolError {
    /// The application error code to close the connection with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::Frame(err) => err.code(),
            ProtocolError::VersionMismatch { .. } => ErrorCode::VERSION_MISMATCH,
            ProtocolError::ManifestMismatch { .. } | ProtocolError::ChunkCountMismatch { .. } => {
                ErrorCode::MANIFEST_MISMATCH
            }
            ProtocolError::UnexpectedRole { .. } => ErrorCode::UNEXPECTED_ROLE,
            ProtocolError::TooManyRequests { .. } => ErrorCode::TOO_MANY_REQUESTS,
            ProtocolError::HelloExpected { .. }
            | ProtocolError::DuplicateHello
            | ProtocolError::PieceOnControlStream
            | ProtocolError::IndexOutOfRange { .. }
            | ProtocolError::Bitfield(_)
            | ProtocolError::DuplicateRequest { .. }
            | ProtocolError::Unsolicited { .. }
            | ProtocolError::NotCancelled { .. }
            | ProtocolError::PieceLength { .. } => ErrorCode::PROTOCOL_VIOLATION,
        }
    }
}

/// A local caller asked the session for something it cannot send (a bug in the caller, not the
/// peer's fault). The session is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The handshake is not complete: the peer's limits are unknown.
    #[error("the handshake is not complete")]
    NotEstablished,
    /// The session failed with a protocol error; the connection is closing.
    #[error("the session failed")]
    Failed,
    /// The chunk index is past the manifest's last.
    #[error("chunk {index} out of range for {chunks} chunks")]
    IndexOutOfRange {
        /// The index.
        index: ChunkIndex,
        /// The manifest's chunk count.
        chunks: u32,
    },
    /// A request for this chunk is already open at the peer.
    #[error("chunk {index} is already requested")]
    AlreadyRequested {
        /// The chunk.
        index: ChunkIndex,
    },
    /// A bitfield over another number of chunks.
    #[error("bitfield covers {got} chunks, the manifest has {expected}")]
    BitfieldLength {
        /// The manifest's chunk count.
        expected: u32,
        /// The bitfield's.
        got: u32,
    },
}

/// Where one of our requests stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ours {
    /// Sent, not answered.
    Open,
    /// Sent, then cancelled; its answer (a piece or `Reject{CANCELLED}`) is still to come.
    Cancelling,
}

#[derive(Clone, Debug)]
enum State {
    /// Waiting for the peer's Hello.
    Handshake,
    /// Both Hellos are exchanged.
    Established {
        /// The peer's Hello.
        remote: Hello,
    },
    /// The peer broke the protocol; the connection is closing.
    Failed(ProtocolError),
}

/// The chunk protocol's state of one connection (see the [module docs](super) for the spec).
///
/// Sans-io: it is fed frames and commands and produces events and frames; the shell moves the
/// bytes. One per connection, beside the manifest's [`Scheduler`] (which serves every
/// connection of that manifest).
///
/// # Use
///
/// 1. Connect. The dialer opens the control stream; it creates the session with
///    [`Session::new`] (which queues our Hello) and writes [`Session::write_frames`]. The
///    listener accepts the control stream, decodes the first frame with [`Frame::decode`] (not a
///    Hello: close with `PROTOCOL_VIOLATION`), looks up the manifest it names (unknown: close
///    with `UNKNOWN_MANIFEST`), creates the session and passes the Hello to
///    [`Session::handle_frame`].
/// 2. Control stream in: append received bytes to a buffer and call [`Session::handle_bytes`].
///    Then drain [`Session::poll_event`] into the scheduler ([`Event::deliver`]); on
///    [`Event::Connected`] send our bitfield ([`Session::send_bitfield`]).
/// 3. Scheduler out: give each [`Command`] to the session of its peer (`Announce` to the
///    session of each peer it names) with [`Session::send_command`] and act on the
///    [`Outbound`]; drain [`Session::poll_event`] again (requests that could not be sent
///    come back as `Busy`); then write [`Session::write_frames`] to the control stream. Draining every command before
///    writing batches consecutive Requests, Haves and Cancels into one frame each.
/// 4. Piece streams in: feed a [`PieceDecoder`](super::PieceDecoder); hand its header to
///    [`Session::handle_piece_header`] before reading on, then hash the bytes and report them
///    with `Scheduler::handle_piece`. A stream that breaks ([`FrameError`], or a reset we did
///    not ask for) closes the connection with `PROTOCOL_VIOLATION`.
/// 5. Any [`ProtocolError`]: close the connection with [`ProtocolError::code`] and report
///    `Scheduler::handle_disconnected`.
///
/// After a protocol error every `handle_*` call returns the same error and `send_command`
/// returns [`SendError::Failed`].
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: State,
    /// Requests the peer has open against us.
    theirs: BTreeSet<ChunkIndex>,
    /// Our requests open at the peer.
    ours: BTreeMap<ChunkIndex, Ours>,
    events: VecDeque<Event>,
    outbound: VecDeque<Frame>,
}

impl Session {
    /// A session in the handshake, with our Hello queued to send.
    ///
    /// Fails if our own Hello would be refused: a manifest of more than
    /// [`MAX_CHUNKS`](fleetwave_chunker::manifest::MAX_CHUNKS) chunks, or `max_requests`
    /// out of range.
    pub fn new(config: SessionConfig) -> Result<Self, FrameError> {
        let hello = Frame::Hello(Hello {
            version: VERSION,
            manifest: config.manifest,
            role: config.role,
            chunk_count: config.table.chunk_count(),
            max_requests: config.max_requests,
        });
        // The same checks the peer will apply.
        hello.encode(&mut BytesMut::new())?;
        Ok(Self {
            config,
            state: State::Handshake,
            theirs: BTreeSet::new(),
            ours: BTreeMap::new(),
            events: VecDeque::new(),
            outbound: VecDeque::from([hello]),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// The peer's Hello, once received.
    pub fn remote(&self) -> Option<&Hello> {
        match &self.state {
            State::Established { remote } => Some(remote),
            State::Handshake | State::Failed(_) => None,
        }
    }

    /// Whether both Hellos are exchanged (and no error happened since).
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established { .. })
    }

    /// The protocol error the session failed with, if any.
    pub fn error(&self) -> Option<&ProtocolError> {
        match &self.state {
            State::Failed(err) => Some(err),
            State::Handshake | State::Established { .. } => None,
        }
    }

    /// Our requests open at the peer (cancelled ones included until answered).
    pub fn open_requests(&self) -> usize {
        self.ours.len()
    }

    /// The peer's requests open against us.
    pub fn peer_open_requests(&self) -> usize {
        self.theirs.len()
    }

    /// The next event for the scheduler.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next control frame to send, batched.
    pub fn poll_frame(&mut self) -> Option<Frame> {
        self.outbound.pop_front()
    }

    /// Encodes every queued control frame onto `out`, in order; returns how many.
    pub fn write_frames(&mut self, out: &mut BytesMut) -> usize {
        let mut n = 0;
        while let Some(frame) = self.outbound.pop_front() {
            // Queued frames are built within the codec's limits; one that is not would be a
            // bug, and the peer would refuse it anyway.
            if frame.encode(out).is_ok() {
                n += 1;
            } else {
                debug_assert!(false, "session queued a frame the codec refuses: {frame:?}");
            }
        }
        n
    }

    // ---------------------------------------------------------------------------------------
    // From the peer

    /// Decodes and handles every complete frame at the front of the control stream's receive
    /// buffer, leaving an incomplete one there.
    pub fn handle_bytes(&mut self, buf: &mut BytesMut) -> Result<(), ProtocolError> {
        self.check_failed()?;
        loop {
            match Frame::decode(buf) {
                Ok(Some(frame)) => self.handle_frame(frame)?,
                Ok(None) => return Ok(()),
                Err(err) => return Err(self.fail(err.into())),
            }
        }
    }

    /// Handles one frame from the control stream. Either the whole frame is accepted (its
    /// events queued) or none of it is.
    pub fn handle_frame(&mut self, frame: Frame) -> Result<(), ProtocolError> {
        self.check_failed()?;
        match self.on_frame(frame) {
            Ok(()) => Ok(()),
            Err(err) => Err(self.fail(err)),
        }
    }

    /// Handles the header of a piece stream ([`PieceData::Header`](super::PieceData::Header)):
    /// it answers our open request for the chunk, and the length must be the manifest's. On
    /// success, read the piece's bytes; on error close the connection.
    pub fn handle_piece_header(&mut self, header: PieceHeader) -> Result<(), ProtocolError> {
        self.check_failed()?;
        match self.on_piece_header(header) {
            Ok(()) => Ok(()),
            Err(err) => Err(self.fail(err)),
        }
    }

    fn check_failed(&self) -> Result<(), ProtocolError> {
        match &self.state {
            State::Failed(err) => Err(err.clone()),
            State::Handshake | State::Established { .. } => Ok(()),
        }
    }

    fn fail(&mut self, err: ProtocolError) -> ProtocolError {
        self.state = State::Failed(err.clone());
        err
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), ProtocolError> {
        if matches!(self.state, State::Handshake) {
            let Frame::Hello(hello) = frame else {
                return Err(ProtocolError::HelloExpected { got: frame.kind() });
            };
            return self.on_hello(hello);
        }
        let n = self.config.table.chunk_count();
        let check = |kind, indices: &[ChunkIndex]| match indices.iter().find(|&&i| i >= n) {
            Some(&index) => Err(ProtocolError::IndexOutOfRange { kind, index, chunks: n }),
            None => Ok(()),
        };
        match frame {
            Frame::Hello(_) => Err(ProtocolError::DuplicateHello),
            Frame::Piece(_) => Err(ProtocolError::PieceOnControlStream),
            Frame::Bitfield(bytes) => {
                let bits = Bitfield::from_bytes(n, &bytes).map_err(ProtocolError::Bitfield)?;
                self.events.push_back(Event::Bitfield(bits));
                Ok(())
            }
            Frame::Have(indices) => {
                check(FrameKind::Have, &indices)?;
                self.events.extend(indices.into_iter().map(Event::Have));
                Ok(())
            }
            Frame::Request(indices) => {
                check(FrameKind::Request, &indices)?;
                self.on_request(indices)
            }
            Frame::Cancel(indices) => {
                check(FrameKind::Cancel, &indices)?;
                for index in indices {
                    if self.theirs.remove(&index) {
                        self.queue(Frame::Reject { index, reason: RejectKind::Cancelled });
                        self.events.push_back(Event::Cancel(index));
                    }
                }
                Ok(())
            }
            Frame::Reject { index, reason } => {
                check(FrameKind::Reject, &[index])?;
                self.on_reject(index, reason)
            }
        }
    }

    fn on_hello(&mut self, hello: Hello) -> Result<(), ProtocolError> {
        if hello.version != VERSION {
            return Err(ProtocolError::VersionMismatch { ours: VERSION, theirs: hello.version });
        }
        if hello.manifest != self.config.manifest {
            return Err(ProtocolError::ManifestMismatch {
                ours: self.config.manifest,
                theirs: hello.manifest,
            });
        }
        let ours = self.config.table.chunk_count();
        if hello.chunk_count != ours {
            return Err(ProtocolError::ChunkCountMismatch { ours, theirs: hello.chunk_count });
        }
        if let Some(expected) = self.config.expect_role {
            if hello.role != expected {
                return Err(ProtocolError::UnexpectedRole { expected, got: hello.role });
            }
        }
        self.events.push_back(Event::Connected { role: hello.role });
        self.state = State::Established { remote: hello };
        Ok(())
    }

    fn on_request(&mut self, indices: Vec<ChunkIndex>) -> Result<(), ProtocolError> {
        let mut new = BTreeSet::new();
        for &index in &indices {
            if self.theirs.contains(&index) || !new.insert(index) {
                return Err(ProtocolError::DuplicateRequest { index });
            }
        }
        let open = self.theirs.len() + new.len();
        if open > self.config.max_requests as usize {
            return Err(ProtocolError::TooManyRequests { open, limit: self.config.max_requests });
        }
        self.theirs.extend(new);
        self.events.extend(indices.into_iter().map(Event::Request));
        Ok(())
    }

    fn on_reject(&mut self, index: ChunkIndex, reason: RejectKind) -> Result<(), ProtocolError> {
        let Some(&state) = self.ours.get(&index) else {
            return Err(ProtocolError::Unsolicited { kind: FrameKind::Reject, index });
        };
        match (state, reason) {
            (Ours::Open, RejectKind::Cancelled) => Err(ProtocolError::NotCancelled { index }),
            (_, RejectKind::Cancelled) => {
                self.ours.remove(&index);
                Ok(())
            }
            (_, RejectKind::Refused(reason)) => {
                self.ours.remove(&index);
                self.events.push_back(Event::Rejected { index, reason });
                Ok(())
            }
        }
    }

    fn on_piece_header(&mut self, header: PieceHeader) -> Result<(), ProtocolError> {
        if !self.is_established() {
            return Err(ProtocolError::HelloExpected { got: FrameKind::Piece });
        }
        let PieceHeader { index, length } = header;
        let chunks = self.config.table.chunk_count();
        if index >= chunks {
            return Err(ProtocolError::IndexOutOfRange { kind: FrameKind::Piece, index, chunks });
        }
        let expected = self.config.table.length(index);
        if length != expected {
            return Err(ProtocolError::PieceLength { index, expected, got: length });
        }
        if self.ours.remove(&index).is_none() {
            return Err(ProtocolError::Unsolicited { kind: FrameKind::Piece, index });
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // To the peer

    /// Turns one scheduler command for this peer into frames (queued, batched with the
    /// previous ones when possible) or a piece to send; see [`Outbound`].
    ///
    /// - `Request`: each chunk opens a request. A chunk that would exceed the peer's
    ///   `max_requests`, or whose cancelled request is still unanswered, is not sent: it comes
    ///   back at once as [`Event::Rejected`] with [`RejectReason::Busy`], so the scheduler backs
    ///   off and asks elsewhere. Fails (sending nothing) for a chunk already requested.
    /// - `Cancel`: sent if the request is still open. Its answer is still to come.
    /// - `Announce`: a Have, once the handshake is complete (before, it is moot: the bitfield
    ///   sent on connecting includes it).
    /// - `Serve`: the piece's header, if the peer's request is still open, else
    ///   [`Outbound::Withdrawn`].
    /// - `Reject`: sent if the peer's request is still open.
    /// - `Ban`: [`Outbound::Close`] with [`ErrorCode::BANNED`].
    /// - The others concern no connection: [`Outbound::Nothing`].
    ///
    /// The command's peer is not checked: routing commands to sessions is the caller's job.
    pub fn send_command(&mut self, command: &Command) -> Result<Outbound, SendError> {
        if matches!(self.state, State::Failed(_)) {
            return Err(SendError::Failed);
        }
        match command {
            Command::Request { chunks, .. } => self.send_request(chunks),
            &Command::Cancel { index, .. } => {
                self.established()?;
                self.check_index(index)?;
                match self.ours.get_mut(&index) {
                    Some(state @ Ours::Open) => {
                        *state = Ours::Cancelling;
                        self.queue(Frame::Cancel(vec![index]));
                        Ok(Outbound::Queued)
                    }
                    Some(Ours::Cancelling) | None => Ok(Outbound::Nothing),
                }
            }
            &Command::Announce { index, .. } => {
                self.check_index(index)?;
                if !self.is_established() {
                    return Ok(Outbound::Nothing);
                }
                self.queue(Frame::Have(vec![index]));
                Ok(Outbound::Queued)
            }
            &Command::Serve { index, .. } => {
                self.established()?;
                self.check_index(index)?;
                if !self.theirs.remove(&index) {
                    return Ok(Outbound::Withdrawn);
                }
                let length = self.config.table.length(index);
                Ok(Outbound::Piece(PieceHeader { index, length }))
            }
            &Command::Reject { index, reason, .. } => {
                self.established()?;
                self.check_index(index)?;
                if !self.theirs.remove(&index) {
                    return Ok(Outbound::Nothing);
                }
                self.queue(Frame::Reject { index, reason: RejectKind::Refused(reason) });
                Ok(Outbound::Queued)
            }
            Command::Ban { .. } => Ok(Outbound::Close(ErrorCode::BANNED)),
            Command::RequestOriginPermit
            | Command::ReleaseOriginPermit
            | Command::Withdraw { .. }
            | Command::Complete => Ok(Outbound::Nothing),
        }
    }

    /// Queues a Bitfield: every chunk we hold. Send [`Scheduler::bitfield`] on
    /// [`Event::Connected`].
    pub fn send_bitfield(&mut self, bits: &Bitfield) -> Result<(), SendError> {
        if matches!(self.state, State::Failed(_)) {
            return Err(SendError::Failed);
        }
        self.established()?;
        let expected = self.config.table.chunk_count();
        if bits.bit_len() != expected {
            return Err(SendError::BitfieldLength { expected, got: bits.bit_len() });
        }
        self.queue(Frame::Bitfield(bits.to_bytes()));
        Ok(())
    }

    fn send_request(&mut self, chunks: &[ChunkIndex]) -> Result<Outbound, SendError> {
        self.established()?;
        let mut seen = BTreeSet::new();
        for &index in chunks {
            self.check_index(index)?;
            if self.ours.get(&index) == Some(&Ours::Open) || !seen.insert(index) {
                return Err(SendError::AlreadyRequested { index });
            }
        }
        let limit = self.remote().map_or(0, |r| r.max_requests) as usize;
        let mut sent = Vec::with_capacity(chunks.len());
        for &index in chunks {
            if self.ours.len() >= limit || self.ours.contains_key(&index) {
                let reason = RejectReason::Busy;
                self.events.push_back(Event::Rejected { index, reason });
            } else {
                self.ours.insert(index, Ours::Open);
                sent.push(index);
            }
        }
        for batch in sent.chunks(MAX_BATCH) {
            self.queue(Frame::Request(batch.to_vec()));
        }
        Ok(if sent.is_empty() { Outbound::Nothing } else { Outbound::Queued })
    }

    fn established(&self) -> Result<(), SendError> {
        match self.state {
            State::Established { .. } => Ok(()),
            State::Handshake => Err(SendError::NotEstablished),
            State::Failed(_) => Err(SendError::Failed),
        }
    }

    fn check_index(&self, index: ChunkIndex) -> Result<(), SendError> {
        let chunks = self.config.table.chunk_count();
        if index >= chunks {
            return Err(SendError::IndexOutOfRange { index, chunks });
        }
        Ok(())
    }

    /// Queues a frame, merging a Have, Request or Cancel into the last queued frame when that
    /// is of the same kind and has room: order is kept, bursts become one frame.
    fn queue(&mut self, frame: Frame) {
        match (self.outbound.back_mut(), frame) {
            (Some(Frame::Have(last)), Frame::Have(more))
            | (Some(Frame::Request(last)), Frame::Request(more))
            | (Some(Frame::Cancel(last)), Frame::Cancel(more))
                if last.len() + more.len() <= MAX_BATCH =>
            {
                last.extend(more);
            }
            (_, frame) => self.outbound.push_back(frame),
        }
    }
}
