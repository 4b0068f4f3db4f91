//! The codec: [`Frame`] to and from bytes, and [`PieceDecoder`] for piece streams.
//!
//! Context-free checks happen here (lengths, batch sizes, known enum values, a 32-byte manifest
//! id); checks that need the session (index ranges, the handshake, open requests) happen in
//! [`Session`](super::Session). Encoding refuses exactly what decoding refuses, so a frame that
//! encodes is one the peer accepts (as far as the codec is concerned).

use bytes::{Buf, Bytes, BytesMut};
use fleetwave_chunker::ManifestId;
use fleetwave_chunker::manifest::MAX_CHUNKS;
use fleetwave_proto::v1 as pb;
use prost::Message;

use super::{
    MAX_BATCH, MAX_BITFIELD_BYTES, MAX_CONTROL_FRAME, MAX_PIECE_HEADER_FRAME, MAX_PIECE_LEN,
    MAX_REQUESTS_LIMIT,
};
use crate::swarm::{ChunkIndex, PeerKind, RejectReason};

/// The kinds of [`Frame`], for errors and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// [`Frame::Hello`].
    Hello,
    /// [`Frame::Bitfield`].
    Bitfield,
    /// [`Frame::Have`].
    Have,
    /// [`Frame::Request`].
    Request,
    /// [`Frame::Cancel`].
    Cancel,
    /// [`Frame::Reject`].
    Reject,
    /// [`Frame::Piece`].
    Piece,
}

/// The first frame each side sends on the control stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Hello {
    /// Protocol version; [`VERSION`](super::VERSION) for this implementation. Any value decodes;
    /// the session refuses a different one ([`ProtocolError::VersionMismatch`]).
    ///
    /// [`ProtocolError::VersionMismatch`]: super::ProtocolError::VersionMismatch
    pub version: u32,
    /// The manifest whose chunks this connection exchanges.
    pub manifest: ManifestId,
    /// The sender's role. On the wire `NodeRole`: a host is [`PeerKind::Peer`].
    pub role: PeerKind,
    /// Chunks in the manifest; at most [`MAX_CHUNKS`].
    pub chunk_count: u32,
    /// Requests the receiver may have open against the sender at once; 1 to
    /// [`MAX_REQUESTS_LIMIT`].
    pub max_requests: u32,
}

/// How a request is answered without a piece: a [`RejectReason`] of the scheduler, or the
/// acknowledgement of the requester's own `Cancel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectKind {
    /// The uploader's scheduler refused the request.
    Refused(RejectReason),
    /// The request was cancelled by the requester before it was served.
    Cancelled,
}

/// The header of a piece stream: exactly `length` raw bytes of chunk `index` follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PieceHeader {
    /// The chunk.
    pub index: ChunkIndex,
    /// Its length, as the manifest lists it; at most [`MAX_PIECE_LEN`].
    pub length: u32,
}

/// One frame of the chunk protocol (see the [module docs](super) for each frame's meaning).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Frame {
    /// The handshake.
    Hello(Hello),
    /// Every chunk the sender holds, in the wire form of [`crate::swarm::Bitfield`]; at most
    /// [`MAX_BITFIELD_BYTES`].
    Bitfield(Vec<u8>),
    /// The sender now holds these chunks. 1 to [`MAX_BATCH`] indices.
    Have(Vec<ChunkIndex>),
    /// Please send these chunks, most wanted first. 1 to [`MAX_BATCH`] indices.
    Request(Vec<ChunkIndex>),
    /// Withdraw open requests for these chunks. 1 to [`MAX_BATCH`] indices.
    Cancel(Vec<ChunkIndex>),
    /// Answer one request without a piece.
    Reject {
        /// The chunk requested.
        index: ChunkIndex,
        /// Why.
        reason: RejectKind,
    },
    /// The first frame of a piece stream (never on the control stream).
    Piece(PieceHeader),
}

/// Errors decoding (or encoding) a frame. Every one of them ends the connection: after an error
/// the stream's position is unknown. [`FrameError::code`] is the code to close it with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the stream's frame limit. `len` is the announced
    /// length, or a lower bound of it when the prefix was refused before its last byte.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length (or a lower bound).
        len: u64,
        /// The limit on this stream.
        max: usize,
    },
    /// The length prefix is not a minimal varint (it ends in a zero byte).
    #[error("length prefix is not minimally encoded")]
    NonMinimalPrefix,
    /// The frame body is not a valid `ChunkFrame` protobuf encoding.
    #[error("malformed frame")]
    Malformed(#[source] prost::DecodeError),
    /// The frame's `body` is unset or of a kind this version does not know.
    #[error("frame has no body of a known kind")]
    MissingBody,
    /// A Hello's manifest id is not 32 bytes.
    #[error("manifest id of {len} bytes, expected 32")]
    ManifestIdLength {
        /// Its length.
        len: usize,
    },
    /// A Hello's role is unset or unknown.
    #[error("unknown node role {value}")]
    UnknownRole {
        /// The wire value.
        value: i32,
    },
    /// A Hello announces more chunks than a manifest may have.
    #[error("hello announces {count} chunks, more than {max}")]
    TooManyChunks {
        /// The announced count.
        count: u32,
        /// [`MAX_CHUNKS`].
        max: usize,
    },
    /// A Hello's `max_requests` is 0 or above [`MAX_REQUESTS_LIMIT`].
    #[error("hello allows {value} open requests, expected 1 to {max}")]
    MaxRequests {
        /// The announced value.
        value: u32,
        /// [`MAX_REQUESTS_LIMIT`].
        max: u32,
    },
    /// A Reject's reason is unset or unknown.
    #[error("unknown reject reason {value}")]
    UnknownRejectReason {
        /// The wire value.
        value: i32,
    },
    /// A Have, Request or Cancel without indices.
    #[error("empty {kind:?} frame")]
    EmptyBatch {
        /// The frame kind.
        kind: FrameKind,
    },
    /// A Have, Request or Cancel with more than [`MAX_BATCH`] indices.
    #[error("{kind:?} frame with {len} indices, more than {max}")]
    BatchTooLarge {
        /// The frame kind.
        kind: FrameKind,
        /// Its number of indices.
        len: usize,
        /// [`MAX_BATCH`].
        max: usize,
    },
    /// A Bitfield longer than any manifest's ([`MAX_BITFIELD_BYTES`]).
    #[error("bitfield of {len} bytes, more than {max}")]
    BitfieldTooLarge {
        /// Its length.
        len: usize,
        /// [`MAX_BITFIELD_BYTES`].
        max: usize,
    },
    /// A piece longer than any chunk ([`MAX_PIECE_LEN`]).
    #[error("piece of {len} bytes, more than {max}")]
    PieceTooLarge {
        /// The announced length.
        len: u32,
        /// [`MAX_PIECE_LEN`].
        max: usize,
    },
    /// A piece stream starts with a frame other than a piece header.
    #[error("piece stream starts with a {got:?} frame")]
    NotAPiece {
        /// What it starts with.
        got: FrameKind,
    },
    /// Bytes follow a piece's last byte on its stream.
    #[error("{extra} bytes after the end of piece {index}")]
    TrailingBytes {
        /// The chunk.
        index: ChunkIndex,
        /// How many extra bytes were seen (at least).
        extra: usize,
    },
    /// A piece stream ended before its header was complete.
    #[error("piece stream ended before its header")]
    MissingPieceHeader,
    /// A piece stream ended before the piece's last byte.
    #[error("piece {index} ended {missing} bytes short")]
    PieceTruncated {
        /// The chunk.
        index: ChunkIndex,
        /// Bytes missing.
        missing: u32,
    },
}

impl FrameError {
    /// The application error code to close the connection (or reset the piece stream) with:
    /// [`FRAME_TOO_LARGE`](super::ErrorCode::FRAME_TOO_LARGE) for the size limits,
    /// [`PROTOCOL_VIOLATION`](super::ErrorCode::PROTOCOL_VIOLATION) for everything else.
    pub fn code(&self) -> super::ErrorCode {
        match self {
            FrameError::TooLarge { .. }
            | FrameError::BatchTooLarge { .. }
            | FrameError::BitfieldTooLarge { .. }
            | FrameError::PieceTooLarge { .. } => super::ErrorCode::FRAME_TOO_LARGE,
            _ => super::ErrorCode::PROTOCOL_VIOLATION,
        }
    }
}

impl Frame {
    /// Its kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello(_) => FrameKind::Hello,
            Frame::Bitfield(_) => FrameKind::Bitfield,
            Frame::Have(_) => FrameKind::Have,
            Frame::Request(_) => FrameKind::Request,
            Frame::Cancel(_) => FrameKind::Cancel,
            Frame::Reject { .. } => FrameKind::Reject,
            Frame::Piece(_) => FrameKind::Piece,
        }
    }

    /// Decodes one frame from the front of a control stream's receive buffer, consuming it.
    ///
    /// `Ok(None)`: the buffer holds no complete frame yet; read more and call again. When the
    /// length prefix is complete and acceptable, the buffer's capacity is grown to hold the whole
    /// frame (at most [`MAX_CONTROL_FRAME`] bytes), so the reads that follow do not reallocate.
    /// A prefix above the limit is refused ([`FrameError::TooLarge`]) as soon as it is read, or
    /// as soon as enough of it is read to know, and nothing is allocated for it.
    ///
    /// After an error the buffer is left as it was; the connection must be closed with
    /// [`FrameError::code`].
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        decode_capped(buf, MAX_CONTROL_FRAME)
    }

    /// Appends the frame, length prefix first, to `out`.
    ///
    /// Fails on a frame the peer would refuse: a batch that is empty or above [`MAX_BATCH`], an
    /// oversized bitfield or piece, a Hello with out-of-range fields. `out` is unchanged then.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), FrameError> {
        self.validate()?;
        let msg = self.to_pb();
        let len = msg.encoded_len();
        let max = match self {
            Frame::Piece(_) => MAX_PIECE_HEADER_FRAME,
            _ => MAX_CONTROL_FRAME,
        };
        if len > max {
            return Err(FrameError::TooLarge { len: len as u64, max });
        }
        out.reserve(prost::length_delimiter_len(len) + len);
        // prost fails only when the buffer cannot grow to fit, and this one was just grown.
        msg.encode_length_delimited(out)
            .map_err(|_| FrameError::TooLarge { len: len as u64, max: out.capacity() })
    }

    /// The frame's size on the wire, length prefix included.
    pub fn encoded_len(&self) -> usize {
        let len = self.to_pb().encoded_len();
        prost::length_delimiter_len(len) + len
    }

    /// The context-free rules every frame obeys, applied by both [`encode`](Self::encode) and
    /// [`decode`](Self::decode).
    fn validate(&self) -> Result<(), FrameError> {
        let batch = |kind, indices: &[ChunkIndex]| {
            if indices.is_empty() {
                Err(FrameError::EmptyBatch { kind })
            } else if indices.len() > MAX_BATCH {
                Err(FrameError::BatchTooLarge { kind, len: indices.len(), max: MAX_BATCH })
            } else {
                Ok(())
            }
        };
        match self {
            Frame::Hello(hello) => {
                if hello.chunk_count as usize > MAX_CHUNKS {
                    return Err(FrameError::TooManyChunks {
                        count: hello.chunk_count,
                        max: MAX_CHUNKS,
                    });
                }
                if hello.max_requests == 0 || hello.max_requests > MAX_REQUESTS_LIMIT {
                    return Err(FrameError::MaxRequests {
                        value: hello.max_requests,
                        max: MAX_REQUESTS_LIMIT,
                    });
                }
                Ok(())
            }
            Frame::Bitfield(bits) if bits.len() > MAX_BITFIELD_BYTES => {
                Err(FrameError::BitfieldTooLarge { len: bits.len(), max: MAX_BITFIELD_BYTES })
            }
            Frame::Bitfield(_) | Frame::Reject { .. } => Ok(()),
            Frame::Have(indices) => batch(FrameKind::Have, indices),
            Frame::Request(indices) => batch(FrameKind::Request, indices),
            Frame::Cancel(indices) => batch(FrameKind::Cancel, indices),
            Frame::Piece(header) if header.length as usize > MAX_PIECE_LEN => {
                Err(FrameError::PieceTooLarge { len: header.length, max: MAX_PIECE_LEN })
            }
            Frame::Piece(_) => Ok(()),
        }
    }

    fn to_pb(&self) -> pb::ChunkFrame {
        use pb::chunk_frame::Body;
        let body = match self {
            Frame::Hello(h) => Body::Hello(pb::ChunkHello {
                version: h.version,
                manifest_id: h.manifest.as_bytes().to_vec(),
                role: role_to_pb(h.role) as i32,
                chunk_count: h.chunk_count,
                max_requests: h.max_requests,
            }),
            Frame::Bitfield(bits) => Body::Bitfield(pb::ChunkBitfield { bits: bits.clone() }),
            Frame::Have(indices) => Body::Have(pb::ChunkHave { indices: indices.clone() }),
            Frame::Request(indices) => Body::Request(pb::ChunkRequest { indices: indices.clone() }),
            Frame::Cancel(indices) => Body::Cancel(pb::ChunkCancel { indices: indices.clone() }),
            Frame::Reject { index, reason } => Body::Reject(pb::ChunkReject {
                index: *index,
                reason: reason_to_pb(*reason) as i32,
            }),
            Frame::Piece(h) => Body::Piece(pb::PieceHeader { index: h.index, length: h.length }),
        };
        pb::ChunkFrame { body: Some(body) }
    }
}

impl TryFrom<pb::ChunkFrame> for Frame {
    type Error = FrameError;

    fn try_from(msg: pb::ChunkFrame) -> Result<Self, FrameError> {
        use pb::chunk_frame::Body;
        let frame = match msg.body.ok_or(FrameError::MissingBody)? {
            Body::Hello(h) => {
                let manifest = ManifestId::from_slice(&h.manifest_id)
                    .ok_or(FrameError::ManifestIdLength { len: h.manifest_id.len() })?;
                let role = match pb::NodeRole::try_from(h.role) {
                    Ok(pb::NodeRole::Host) => PeerKind::Peer,
                    Ok(pb::NodeRole::Cache) => PeerKind::Cache,
                    Ok(pb::NodeRole::Origin) => PeerKind::Origin,
                    Ok(pb::NodeRole::Unspecified) | Err(_) => {
                        return Err(FrameError::UnknownRole { value: h.role });
                    }
                };
                Frame::Hello(Hello {
                    version: h.version,
                    manifest,
                    role,
                    chunk_count: h.chunk_count,
                    max_requests: h.max_requests,
                })
            }
            Body::Bitfield(b) => Frame::Bitfield(b.bits),
            Body::Have(h) => Frame::Have(h.indices),
            Body::Request(r) => Frame::Request(r.indices),
            Body::Cancel(c) => Frame::Cancel(c.indices),
            Body::Reject(r) => {
                let reason = match pb::RejectReason::try_from(r.reason) {
                    Ok(pb::RejectReason::Busy) => RejectKind::Refused(RejectReason::Busy),
                    Ok(pb::RejectReason::NotHave) => RejectKind::Refused(RejectReason::NotHave),
                    Ok(pb::RejectReason::Banned) => RejectKind::Refused(RejectReason::Banned),
                    Ok(pb::RejectReason::SeededRecently) => {
                        RejectKind::Refused(RejectReason::SeededRecently)
                    }
                    Ok(pb::RejectReason::Cancelled) => RejectKind::Cancelled,
                    Ok(pb::RejectReason::Unspecified) | Err(_) => {
                        return Err(FrameError::UnknownRejectReason { value: r.reason });
                    }
                };
                Frame::Reject { index: r.index, reason }
            }
            Body::Piece(p) => Frame::Piece(PieceHeader { index: p.index, length: p.length }),
        };
        frame.validate()?;
        Ok(frame)
    }
}

fn role_to_pb(role: PeerKind) -> pb::NodeRole {
    match role {
        PeerKind::Peer => pb::NodeRole::Host,
        PeerKind::Cache => pb::NodeRole::Cache,
        PeerKind::Origin => pb::NodeRole::Origin,
    }
}

fn reason_to_pb(reason: RejectKind) -> pb::RejectReason {
    match reason {
        RejectKind::Refused(RejectReason::Busy) => pb::RejectReason::Busy,
        RejectKind::Refused(RejectReason::NotHave) => pb::RejectReason::NotHave,
        RejectKind::Refused(RejectReason::Banned) => pb::RejectReason::Banned,
        RejectKind::Refused(RejectReason::SeededRecently) => pb::RejectReason::SeededRecently,
        RejectKind::Cancelled => pb::RejectReason::Cancelled,
    }
}

/// Reads the varint length prefix at the front of `buf`: `Ok(None)` while incomplete, else the
/// prefix's length and the frame length it announces (at most `max`).
fn read_prefix(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, FrameError> {
    // Bytes of the longest prefix a frame within the limit can have. A prefix that continues
    // past them announces at least 2^(7 * longest) > max bytes: refuse it without waiting.
    let longest = prost::length_delimiter_len(max);
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().enumerate().take(longest) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 != 0 {
            if i + 1 == longest {
                return Err(FrameError::TooLarge { len: 1 << (7 * longest), max });
            }
            continue;
        }
        if byte == 0 && i > 0 {
            return Err(FrameError::NonMinimalPrefix);
        }
        if value > max as u64 {
            return Err(FrameError::TooLarge { len: value, max });
        }
        return Ok(Some((i + 1, value as usize)));
    }
    Ok(None)
}

/// [`Frame::decode`] with a given frame limit.
fn decode_capped(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    let Some((prefix, len)) = read_prefix(buf, max)? else { return Ok(None) };
    let total = prefix + len;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let msg = pb::ChunkFrame::decode(&buf[prefix..total]).map_err(FrameError::Malformed)?;
    let frame = Frame::try_from(msg)?;
    buf.advance(total);
    Ok(Some(frame))
}

/// What a [`PieceDecoder`] took from the buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PieceData {
    /// The piece header (first); hand it to [`Session::handle_piece_header`] before anything
    /// else.
    ///
    /// [`Session::handle_piece_header`]: super::Session::handle_piece_header
    Header(PieceHeader),
    /// The next bytes of the chunk, in order, split off the receive buffer without copying.
    Bytes(Bytes),
}

/// Incremental decoder of one piece stream: a header frame of at most
/// [`MAX_PIECE_HEADER_FRAME`] bytes, then exactly the announced number of raw bytes, then the
/// end of the stream.
///
/// Feed it the stream's receive buffer with [`decode`](Self::decode) until it returns
/// `Ok(None)`; when the stream ends (FIN), call [`finish`](Self::finish). The chunk's bytes come
/// out as they arrive, so the receiver can hash and write them without assembling the chunk.
#[derive(Clone, Debug, Default)]
pub struct PieceDecoder {
    state: PieceState,
}

#[derive(Clone, Copy, Debug, Default)]
enum PieceState {
    #[default]
    Header,
    Body {
        index: ChunkIndex,
        remaining: u32,
    },
    Done {
        index: ChunkIndex,
    },
}

impl PieceDecoder {
    /// A decoder at the start of a piece stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the header, then the chunk's bytes, from the front of `buf`. `Ok(None)`: nothing
    /// more to take until more bytes arrive.
    ///
    /// Fails if the stream does not start with a piece header within its limits
    /// ([`FrameError::NotAPiece`], [`FrameError::TooLarge`], ...) or carries bytes past the
    /// piece ([`FrameError::TrailingBytes`]).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<PieceData>, FrameError> {
        match self.state {
            PieceState::Header => match decode_capped(buf, MAX_PIECE_HEADER_FRAME)? {
                None => Ok(None),
                Some(Frame::Piece(header)) => {
                    self.state = match header.length {
                        0 => PieceState::Done { index: header.index },
                        remaining => PieceState::Body { index: header.index, remaining },
                    };
                    Ok(Some(PieceData::Header(header)))
                }
                Some(other) => Err(FrameError::NotAPiece { got: other.kind() }),
            },
            PieceState::Body { .. } | PieceState::Done { .. } => {
                Ok(self.take_body(buf.len())?.map(|n| PieceData::Bytes(buf.split_to(n).freeze())))
            }
        }
    }

    /// Whether the header has been taken: what follows is the chunk's bytes, which
    /// [`decode_bytes`](Self::decode_bytes) takes without copying them.
    pub fn in_body(&self) -> bool {
        !matches!(self.state, PieceState::Header)
    }

    /// Takes the chunk's bytes from the front of `bytes` once the header has been taken (as
    /// [`decode`](Self::decode) does, without copying them into a buffer). Before the header it
    /// takes nothing and fails with [`FrameError::MissingPieceHeader`].
    pub fn decode_bytes(&mut self, bytes: &mut Bytes) -> Result<Option<Bytes>, FrameError> {
        if !self.in_body() {
            return Err(FrameError::MissingPieceHeader);
        }
        Ok(self.take_body(bytes.len())?.map(|n| bytes.split_to(n)))
    }

    /// How many of `available` body bytes to take (`None`: none are available), advancing
    /// the state; past the piece's end, [`FrameError::TrailingBytes`].
    fn take_body(&mut self, available: usize) -> Result<Option<usize>, FrameError> {
        match self.state {
            PieceState::Header => Ok(None),
            _ if available == 0 => Ok(None),
            PieceState::Body { index, remaining } => {
                let take = available.min(remaining as usize);
                let remaining = remaining - take as u32;
                self.state = match remaining {
                    0 => PieceState::Done { index },
                    remaining => PieceState::Body { index, remaining },
                };
                Ok(Some(take))
            }
            PieceState::Done { index } => {
                Err(FrameError::TrailingBytes { index, extra: available })
            }
        }
    }

    /// Whether the header and every byte of the piece have been taken.
    pub fn is_complete(&self) -> bool {
        matches!(self.state, PieceState::Done { .. })
    }

    /// The stream ended (FIN): fails unless the piece is complete.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.state {
            PieceState::Header => Err(FrameError::MissingPieceHeader),
            PieceState::Body { index, remaining } => {
                Err(FrameError::PieceTruncated { index, missing: remaining })
            }
            PieceState::Done { .. } => Ok(()),
        }
    }
}
