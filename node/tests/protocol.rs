//! The chunk protocol through its public API: the codec (round trips, incremental decoding,
//! limits, garbage), the session (handshake, indices, request accounting, batching), real
//! schedulers trading a manifest over sessions in memory, and property tests.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use fleetwave_chunker::ManifestId;
use fleetwave_chunker::manifest::MAX_CHUNKS;
use fleetwave_node::protocol::{
    DEFAULT_MAX_REQUESTS, ErrorCode, Event, Frame, FrameError, FrameKind, Hello, MAX_BATCH,
    MAX_BITFIELD_BYTES, MAX_CONTROL_FRAME, MAX_PIECE_HEADER_FRAME, MAX_PIECE_LEN,
    MAX_REQUESTS_LIMIT, Outbound, PieceData, PieceDecoder, PieceHeader, ProtocolError, RejectKind,
    SendError, Session, SessionConfig, VERSION,
};
use fleetwave_node::swarm::{
    Bitfield, BitfieldError, ChunkIndex, ChunkTable, Command, PeerId, PeerKind, PieceAction,
    PieceOutcome, RejectReason, Scheduler, SwarmConfig,
};
use fleetwave_proto::v1 as pb;
use proptest::prelude::*;
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const N: u32 = 20;

fn manifest(n: u8) -> ManifestId {
    ManifestId::from_bytes([n; 32])
}

/// Chunk `i` is `100 + i` bytes long.
fn table(n: u32) -> ChunkTable {
    ChunkTable::from_lengths((0..n).map(|i| 100 + i)).expect("table")
}

fn config(role: PeerKind) -> SessionConfig {
    SessionConfig::new(manifest(7), table(N), role)
}

fn hello(role: PeerKind) -> Hello {
    Hello {
        version: VERSION,
        manifest: manifest(7),
        role,
        chunk_count: N,
        max_requests: DEFAULT_MAX_REQUESTS,
    }
}

fn encode(frames: &[Frame]) -> BytesMut {
    let mut buf = BytesMut::new();
    for frame in frames {
        frame.encode(&mut buf).expect("encodes");
    }
    buf
}

fn decode_all(buf: &mut BytesMut) -> Result<Vec<Frame>, FrameError> {
    let mut out = Vec::new();
    while let Some(frame) = Frame::decode(buf)? {
        out.push(frame);
    }
    Ok(out)
}

fn events(session: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| session.poll_event()).collect()
}

fn frames(session: &mut Session) -> Vec<Frame> {
    std::iter::from_fn(|| session.poll_frame()).collect()
}

/// Moves `from`'s queued control frames, as bytes, into `to`.
fn pump(from: &mut Session, to: &mut Session) -> Result<(), ProtocolError> {
    let mut buf = BytesMut::new();
    from.write_frames(&mut buf);
    to.handle_bytes(&mut buf)?;
    assert!(buf.is_empty(), "whole frames were written");
    Ok(())
}

/// A host (dialer) and a cache (listener) with the handshake done and its events drained.
fn pair_with(host: SessionConfig, cache: SessionConfig) -> (Session, Session) {
    let mut a = Session::new(host).expect("host session");
    let mut b = Session::new(cache).expect("cache session");
    pump(&mut a, &mut b).expect("dialer hello");
    pump(&mut b, &mut a).expect("listener hello");
    assert_eq!(events(&mut a), vec![Event::Connected { role: PeerKind::Cache }]);
    assert_eq!(events(&mut b), vec![Event::Connected { role: PeerKind::Peer }]);
    (a, b)
}

fn pair() -> (Session, Session) {
    pair_with(config(PeerKind::Peer), config(PeerKind::Cache))
}

fn request(chunks: &[ChunkIndex]) -> Command {
    Command::Request { peer: PeerId(1), chunks: chunks.to_vec() }
}

fn serve(index: ChunkIndex) -> Command {
    Command::Serve { peer: PeerId(1), index }
}

/// One frame of every kind and variant, with edge values.
fn sample_frames() -> Vec<Frame> {
    let mut frames = vec![
        Frame::Hello(hello(PeerKind::Peer)),
        Frame::Hello(Hello {
            version: u32::MAX,
            manifest: manifest(0xff),
            role: PeerKind::Origin,
            chunk_count: MAX_CHUNKS as u32,
            max_requests: MAX_REQUESTS_LIMIT,
        }),
        Frame::Hello(Hello {
            role: PeerKind::Cache,
            chunk_count: 0,
            max_requests: 1,
            ..hello(PeerKind::Peer)
        }),
        Frame::Bitfield(vec![]),
        Frame::Bitfield(vec![0b1010_0000, 0xff]),
        Frame::Have(vec![0]),
        Frame::Have(vec![u32::MAX, 0, 7]),
        Frame::Request(vec![3, 1, 2]),
        Frame::Cancel(vec![9]),
        Frame::Reject { index: 4, reason: RejectKind::Cancelled },
        Frame::Piece(PieceHeader { index: 0, length: 0 }),
        Frame::Piece(PieceHeader { index: u32::MAX, length: MAX_PIECE_LEN as u32 }),
    ];
    for reason in [
        RejectReason::Busy,
        RejectReason::NotHave,
        RejectReason::Banned,
        RejectReason::SeededRecently,
    ] {
        frames.push(Frame::Reject { index: 1, reason: RejectKind::Refused(reason) });
    }
    frames
}

// ---------------------------------------------------------------------------------------------
// Codec

#[test]
fn every_frame_round_trips() {
    let mut frames = sample_frames();
    frames.push(Frame::Bitfield(vec![0x55; MAX_BITFIELD_BYTES]));
    frames.push(Frame::Request((0..MAX_BATCH as u32).map(|i| i * 97).collect()));
    for frame in frames {
        let mut buf = encode(std::slice::from_ref(&frame));
        assert_eq!(buf.len(), frame.encoded_len(), "{frame:?}");
        assert_eq!(Frame::decode(&mut buf), Ok(Some(frame.clone())));
        assert!(buf.is_empty(), "{frame:?} consumed whole");
    }
}

#[test]
fn decoding_resumes_at_every_byte_boundary() {
    let frames = sample_frames();
    let wire = encode(&frames);
    for split in 0..=wire.len() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&wire[..split]);
        let mut got = decode_all(&mut buf).expect("prefix decodes");
        buf.extend_from_slice(&wire[split..]);
        got.extend(decode_all(&mut buf).expect("rest decodes"));
        assert_eq!(got, frames, "split at {split}");
        assert!(buf.is_empty());
    }
    // And one byte at a time.
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for &byte in wire.iter() {
        buf.put_u8(byte);
        got.extend(decode_all(&mut buf).expect("decodes"));
    }
    assert_eq!(got, frames);
}

#[test]
fn oversized_length_prefix_is_refused_without_allocating() {
    // Announces one byte more than the limit, with no body behind it.
    let mut buf = BytesMut::with_capacity(8);
    prost::encode_length_delimiter(MAX_CONTROL_FRAME + 1, &mut buf).expect("prefix");
    let capacity = buf.capacity();
    assert_eq!(
        Frame::decode(&mut buf),
        Err(FrameError::TooLarge { len: MAX_CONTROL_FRAME as u64 + 1, max: MAX_CONTROL_FRAME })
    );
    assert_eq!(buf.capacity(), capacity, "nothing reserved for the refused frame");
    assert_eq!(FrameError::TooLarge { len: 0, max: 0 }.code(), ErrorCode::FRAME_TOO_LARGE);

    // A prefix still going after the bytes any allowed length needs is refused before it ends.
    let mut buf = BytesMut::with_capacity(8);
    buf.extend_from_slice(&[0xff, 0xff]);
    assert_eq!(Frame::decode(&mut buf), Ok(None), "could still be a 3-byte length <= 64 KiB");
    buf.put_u8(0xff);
    let err = Frame::decode(&mut buf);
    assert!(
        matches!(err, Err(FrameError::TooLarge { len, .. }) if len > MAX_CONTROL_FRAME as u64),
        "{err:?}"
    );
    assert_eq!(buf.capacity(), 8);

    // An acceptable prefix reserves room for its frame, so the reads that follow fit.
    let mut buf = BytesMut::with_capacity(8);
    prost::encode_length_delimiter(60_000, &mut buf).expect("prefix");
    assert_eq!(Frame::decode(&mut buf), Ok(None));
    assert!(buf.capacity() >= 60_003);

    // Piece streams have a much smaller header limit.
    let mut decoder = PieceDecoder::new();
    let mut buf = BytesMut::with_capacity(8);
    prost::encode_length_delimiter(MAX_PIECE_HEADER_FRAME + 1, &mut buf).expect("prefix");
    assert_eq!(
        decoder.decode(&mut buf),
        Err(FrameError::TooLarge { len: 33, max: MAX_PIECE_HEADER_FRAME })
    );
    let mut buf = BytesMut::from(&[0x80][..]);
    assert!(matches!(PieceDecoder::new().decode(&mut buf), Err(FrameError::TooLarge { .. })));
}

/// Encodes a raw `ChunkFrame` with a length prefix, bypassing the codec's checks.
fn raw(body: pb::chunk_frame::Body) -> BytesMut {
    let msg = pb::ChunkFrame { body: Some(body) };
    BytesMut::from(&msg.encode_length_delimited_to_vec()[..])
}

fn raw_hello(f: impl FnOnce(&mut pb::ChunkHello)) -> BytesMut {
    let mut h = pb::ChunkHello {
        version: VERSION,
        manifest_id: vec![7; 32],
        role: pb::NodeRole::Host as i32,
        chunk_count: N,
        max_requests: 16,
    };
    f(&mut h);
    raw(pb::chunk_frame::Body::Hello(h))
}

#[test]
fn garbage_is_refused_with_typed_errors() {
    use pb::chunk_frame::Body;
    let decode = |bytes: &[u8]| Frame::decode(&mut BytesMut::from(bytes));

    assert_eq!(decode(&[0x81, 0x00]), Err(FrameError::NonMinimalPrefix));
    assert!(matches!(decode(&[0x02, 0xff, 0xff]), Err(FrameError::Malformed(_))));
    assert_eq!(decode(&[0x00]), Err(FrameError::MissingBody), "empty frame");
    // Field 15, varint 1: a body kind this version does not know.
    assert_eq!(decode(&[0x02, 0x78, 0x01]), Err(FrameError::MissingBody));
    // A Have whose packed indices end mid-varint.
    assert!(matches!(decode(&[0x04, 0x1a, 0x02, 0x0a, 0x80]), Err(FrameError::Malformed(_))));

    let cases: Vec<(BytesMut, FrameError)> = vec![
        (raw_hello(|h| h.manifest_id = vec![7; 31]), FrameError::ManifestIdLength { len: 31 }),
        (raw_hello(|h| h.role = 0), FrameError::UnknownRole { value: 0 }),
        (raw_hello(|h| h.role = 9), FrameError::UnknownRole { value: 9 }),
        (
            raw_hello(|h| h.chunk_count = MAX_CHUNKS as u32 + 1),
            FrameError::TooManyChunks { count: MAX_CHUNKS as u32 + 1, max: MAX_CHUNKS },
        ),
        (
            raw_hello(|h| h.max_requests = 0),
            FrameError::MaxRequests { value: 0, max: MAX_REQUESTS_LIMIT },
        ),
        (
            raw_hello(|h| h.max_requests = MAX_REQUESTS_LIMIT + 1),
            FrameError::MaxRequests { value: MAX_REQUESTS_LIMIT + 1, max: MAX_REQUESTS_LIMIT },
        ),
        (
            raw(Body::Reject(pb::ChunkReject { index: 1, reason: 0 })),
            FrameError::UnknownRejectReason { value: 0 },
        ),
        (
            raw(Body::Reject(pb::ChunkReject { index: 1, reason: 77 })),
            FrameError::UnknownRejectReason { value: 77 },
        ),
        (
            raw(Body::Have(pb::ChunkHave { indices: vec![] })),
            FrameError::EmptyBatch { kind: FrameKind::Have },
        ),
        (
            raw(Body::Cancel(pb::ChunkCancel { indices: vec![] })),
            FrameError::EmptyBatch { kind: FrameKind::Cancel },
        ),
        (
            raw(Body::Request(pb::ChunkRequest { indices: vec![1; MAX_BATCH + 1] })),
            FrameError::BatchTooLarge {
                kind: FrameKind::Request,
                len: MAX_BATCH + 1,
                max: MAX_BATCH,
            },
        ),
        (
            raw(Body::Bitfield(pb::ChunkBitfield { bits: vec![0; MAX_BITFIELD_BYTES + 1] })),
            FrameError::BitfieldTooLarge { len: MAX_BITFIELD_BYTES + 1, max: MAX_BITFIELD_BYTES },
        ),
        (
            raw(Body::Piece(pb::PieceHeader { index: 0, length: MAX_PIECE_LEN as u32 + 1 })),
            FrameError::PieceTooLarge { len: MAX_PIECE_LEN as u32 + 1, max: MAX_PIECE_LEN },
        ),
    ];
    for (mut bytes, expected) in cases {
        let before = bytes.clone();
        assert_eq!(Frame::decode(&mut bytes), Err(expected.clone()));
        assert_eq!(bytes, before, "buffer untouched on error");
        let code = expected.code();
        assert!(code == ErrorCode::PROTOCOL_VIOLATION || code == ErrorCode::FRAME_TOO_LARGE);
    }
}

#[test]
fn encoding_refuses_what_decoding_refuses() {
    let mut out = BytesMut::new();
    assert_eq!(
        Frame::Have(vec![]).encode(&mut out),
        Err(FrameError::EmptyBatch { kind: FrameKind::Have })
    );
    assert!(matches!(
        Frame::Cancel(vec![0; MAX_BATCH + 1]).encode(&mut out),
        Err(FrameError::BatchTooLarge { .. })
    ));
    assert!(matches!(
        Frame::Bitfield(vec![0; MAX_BITFIELD_BYTES + 1]).encode(&mut out),
        Err(FrameError::BitfieldTooLarge { .. })
    ));
    assert!(matches!(
        Frame::Piece(PieceHeader { index: 0, length: u32::MAX }).encode(&mut out),
        Err(FrameError::PieceTooLarge { .. })
    ));
    assert!(matches!(
        Frame::Hello(Hello { max_requests: 0, ..hello(PeerKind::Peer) }).encode(&mut out),
        Err(FrameError::MaxRequests { .. })
    ));
    assert!(out.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Piece streams

fn piece_stream(index: ChunkIndex, body: &[u8]) -> BytesMut {
    let header = PieceHeader { index, length: body.len() as u32 };
    let mut wire = encode(&[Frame::Piece(header)]);
    wire.extend_from_slice(body);
    wire
}

/// Feeds `wire` to a piece decoder in two parts; returns the header and the body it produced.
/// `direct`: once the header is taken, parts go to `decode_bytes` as the daemon feeds them
/// (no buffer); otherwise every part goes through the buffer and `decode`.
fn read_piece(
    wire: &[u8],
    split: usize,
    direct: bool,
) -> Result<(PieceHeader, Vec<u8>), FrameError> {
    let mut decoder = PieceDecoder::new();
    let mut buf = BytesMut::new();
    let mut header = None;
    let mut body = Vec::new();
    for part in [&wire[..split], &wire[split..]] {
        if direct && buf.is_empty() && decoder.in_body() {
            let mut bytes = Bytes::copy_from_slice(part);
            while let Some(data) = decoder.decode_bytes(&mut bytes)? {
                body.extend_from_slice(&data);
            }
            continue;
        }
        buf.extend_from_slice(part);
        while let Some(data) = decoder.decode(&mut buf)? {
            match data {
                PieceData::Header(h) => {
                    assert!(header.is_none() && body.is_empty(), "header first, once");
                    header = Some(h);
                }
                PieceData::Bytes(bytes) => body.extend_from_slice(&bytes),
            }
        }
    }
    decoder.finish()?;
    assert!(decoder.is_complete());
    Ok((header.ok_or(FrameError::MissingPieceHeader)?, body))
}

#[test]
fn piece_streams_decode_at_every_byte_boundary() {
    let body: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
    let wire = piece_stream(5, &body);
    for direct in [false, true] {
        for split in 0..=wire.len() {
            let (header, got) = read_piece(&wire, split, direct).expect("piece decodes");
            assert_eq!(header, PieceHeader { index: 5, length: 300 });
            assert_eq!(got, body, "split at {split}, direct {direct}");
        }
        let empty = piece_stream(3, &[]);
        let got = read_piece(&empty, 1, direct);
        assert_eq!(got, Ok((PieceHeader { index: 3, length: 0 }, vec![])));
    }
    // Before its header, a piece stream's bytes cannot be taken as its body.
    let mut bytes = Bytes::from_static(&[1, 2, 3]);
    assert_eq!(PieceDecoder::new().decode_bytes(&mut bytes), Err(FrameError::MissingPieceHeader));
    assert_eq!(bytes.len(), 3, "nothing taken");
}

#[test]
fn broken_piece_streams_are_refused() {
    // Extra bytes after the piece.
    let mut wire = piece_stream(2, &[1, 2, 3]);
    wire.extend_from_slice(&[9, 9]);
    for (split, direct) in (0..=wire.len()).flat_map(|s| [(s, false), (s, true)]) {
        assert!(
            matches!(
                read_piece(&wire, split, direct),
                Err(FrameError::TrailingBytes { index: 2, .. })
            ),
            "split at {split}, direct {direct}"
        );
    }
    // The stream ends early.
    let wire = piece_stream(2, &[1, 2, 3]);
    let mut decoder = PieceDecoder::new();
    let mut buf = BytesMut::from(&wire[..wire.len() - 2]);
    while decoder.decode(&mut buf).expect("valid so far").is_some() {}
    assert_eq!(decoder.finish(), Err(FrameError::PieceTruncated { index: 2, missing: 2 }));
    assert_eq!(PieceDecoder::new().finish(), Err(FrameError::MissingPieceHeader));
    // A control frame where the header belongs.
    let mut buf = encode(&[Frame::Have(vec![1])]);
    assert_eq!(
        PieceDecoder::new().decode(&mut buf),
        Err(FrameError::NotAPiece { got: FrameKind::Have })
    );
}

// ---------------------------------------------------------------------------------------------
// Handshake

#[test]
fn handshake_exchanges_hellos() {
    let mut a = Session::new(config(PeerKind::Peer)).expect("session");
    assert!(!a.is_established());
    assert_eq!(frames(&mut a), vec![Frame::Hello(hello(PeerKind::Peer))], "our hello is first");
    let (a, b) = pair();
    assert!(a.is_established() && b.is_established());
    assert_eq!(a.remote(), Some(&hello(PeerKind::Cache)));
    assert_eq!(b.remote(), Some(&hello(PeerKind::Peer)));
}

#[test]
fn nothing_may_precede_hello() {
    for frame in sample_frames().into_iter().filter(|f| f.kind() != FrameKind::Hello) {
        let kind = frame.kind();
        let mut s = Session::new(config(PeerKind::Cache)).expect("session");
        let err = s.handle_frame(frame).expect_err("refused before hello");
        assert_eq!(err, ProtocolError::HelloExpected { got: kind });
        assert_eq!(err.code(), ErrorCode::PROTOCOL_VIOLATION);
        // The session stays failed.
        assert_eq!(s.handle_frame(Frame::Hello(hello(PeerKind::Peer))), Err(err.clone()));
        assert_eq!(s.error(), Some(&err));
        assert_eq!(s.send_command(&request(&[1])), Err(SendError::Failed));
        assert!(events(&mut s).is_empty());
    }
    let mut s = Session::new(config(PeerKind::Cache)).expect("session");
    let header = PieceHeader { index: 0, length: 100 };
    assert_eq!(
        s.handle_piece_header(header),
        Err(ProtocolError::HelloExpected { got: FrameKind::Piece })
    );
}

#[test]
fn a_second_hello_is_a_violation() {
    let (_, mut b) = pair();
    let err = b.handle_frame(Frame::Hello(hello(PeerKind::Peer))).expect_err("second hello");
    assert_eq!(err, ProtocolError::DuplicateHello);
    assert_eq!(err.code(), ErrorCode::PROTOCOL_VIOLATION);
    assert!(!b.is_established());
}

#[test]
fn mismatched_hellos_are_refused_with_their_codes() {
    let cases = [
        (
            Hello { version: 2, ..hello(PeerKind::Peer) },
            ProtocolError::VersionMismatch { ours: VERSION, theirs: 2 },
            ErrorCode::VERSION_MISMATCH,
        ),
        (
            Hello { manifest: manifest(8), ..hello(PeerKind::Peer) },
            ProtocolError::ManifestMismatch { ours: manifest(7), theirs: manifest(8) },
            ErrorCode::MANIFEST_MISMATCH,
        ),
        (
            Hello { chunk_count: N + 1, ..hello(PeerKind::Peer) },
            ProtocolError::ChunkCountMismatch { ours: N, theirs: N + 1 },
            ErrorCode::MANIFEST_MISMATCH,
        ),
        (
            hello(PeerKind::Origin),
            ProtocolError::UnexpectedRole { expected: PeerKind::Peer, got: PeerKind::Origin },
            ErrorCode::UNEXPECTED_ROLE,
        ),
    ];
    for (their_hello, error, code) in cases {
        let mut cfg = config(PeerKind::Cache);
        cfg.expect_role = Some(PeerKind::Peer);
        let mut s = Session::new(cfg).expect("session");
        let mut wire = encode(&[Frame::Hello(their_hello)]);
        assert_eq!(s.handle_bytes(&mut wire), Err(error.clone()));
        assert_eq!(error.code(), code);
        assert!(events(&mut s).is_empty(), "no Connected for a refused hello");
        assert_eq!(s.send_command(&request(&[0])), Err(SendError::Failed));
    }
}

#[test]
fn our_own_hello_must_be_valid() {
    let mut cfg = config(PeerKind::Peer);
    cfg.max_requests = MAX_REQUESTS_LIMIT + 1;
    assert!(matches!(Session::new(cfg), Err(FrameError::MaxRequests { .. })));
}

// ---------------------------------------------------------------------------------------------
// Indices

#[test]
fn out_of_range_indices_are_violations_and_nothing_of_the_frame_is_applied() {
    let cases = [
        (Frame::Have(vec![1, N]), FrameKind::Have),
        (Frame::Request(vec![0, 1, N + 5]), FrameKind::Request),
        (Frame::Cancel(vec![u32::MAX]), FrameKind::Cancel),
        (Frame::Reject { index: N, reason: RejectKind::Cancelled }, FrameKind::Reject),
    ];
    for (frame, kind) in cases {
        let (_, mut b) = pair();
        let err = b.handle_frame(frame).expect_err("out of range");
        assert!(
            matches!(err, ProtocolError::IndexOutOfRange { kind: k, chunks: N, .. } if k == kind),
            "{err:?}"
        );
        assert_eq!(err.code(), ErrorCode::PROTOCOL_VIOLATION);
        assert!(events(&mut b).is_empty(), "valid indices of the frame were not applied");
        assert_eq!(b.peer_open_requests(), 0);
    }
    let (mut a, _) = pair();
    let header = PieceHeader { index: N, length: 1 };
    assert_eq!(
        a.handle_piece_header(header),
        Err(ProtocolError::IndexOutOfRange { kind: FrameKind::Piece, index: N, chunks: N })
    );
    // Bitfields must cover exactly the manifest.
    let (_, mut b) = pair();
    assert_eq!(
        b.handle_frame(Frame::Bitfield(vec![0; 2])),
        Err(ProtocolError::Bitfield(BitfieldError::Length { expected: 3, got: 2 }))
    );
    let (_, mut b) = pair();
    assert_eq!(
        b.handle_frame(Frame::Bitfield(vec![0, 0, 0x01])),
        Err(ProtocolError::Bitfield(BitfieldError::SpareBits))
    );
    // Our side refuses to send them.
    let (mut a, _) = pair();
    assert_eq!(
        a.send_command(&request(&[N])),
        Err(SendError::IndexOutOfRange { index: N, chunks: N })
    );
    assert_eq!(
        a.send_bitfield(&Bitfield::new(N + 1)),
        Err(SendError::BitfieldLength { expected: N, got: N + 1 })
    );
}

#[test]
fn bitfields_and_haves_become_scheduler_events() {
    let (mut a, mut b) = pair();
    let bits = Bitfield::from_indices(N, [0, 3, 19]).expect("bits");
    a.send_bitfield(&bits).expect("bitfield");
    a.send_command(&Command::Announce { index: 4, peers: vec![] }).expect("announce");
    a.send_command(&Command::Announce { index: 5, peers: vec![] }).expect("announce");
    pump(&mut a, &mut b).expect("delivered");
    assert_eq!(events(&mut b), vec![Event::Bitfield(bits), Event::Have(4), Event::Have(5)]);
}

// ---------------------------------------------------------------------------------------------
// Requests and answers

#[test]
fn a_request_flood_beyond_the_limit_is_a_violation() {
    let mut cache = config(PeerKind::Cache);
    cache.max_requests = 4;
    let (a, mut b) = pair_with(config(PeerKind::Peer), cache);
    assert_eq!(a.remote().map(|h| h.max_requests), Some(4));
    b.handle_frame(Frame::Request(vec![0, 1, 2])).expect("within the limit");
    b.handle_frame(Frame::Request(vec![3])).expect("at the limit");
    assert_eq!(events(&mut b), (0..4).map(Event::Request).collect::<Vec<_>>());

    // Answers free slots: a piece, a rejection, and an acknowledged cancel.
    assert_eq!(
        b.send_command(&serve(0)),
        Ok(Outbound::Piece(PieceHeader { index: 0, length: 100 }))
    );
    let reject = Command::Reject { peer: PeerId(1), index: 1, reason: RejectReason::Busy };
    assert_eq!(b.send_command(&reject), Ok(Outbound::Queued));
    b.handle_frame(Frame::Cancel(vec![2])).expect("cancel");
    assert_eq!(b.peer_open_requests(), 1);
    b.handle_frame(Frame::Request(vec![0, 1, 2])).expect("slots freed");

    let err = b.handle_frame(Frame::Request(vec![5])).expect_err("flood");
    assert_eq!(err, ProtocolError::TooManyRequests { open: 5, limit: 4 });
    assert_eq!(err.code(), ErrorCode::TOO_MANY_REQUESTS);

    // A requester that follows the limit never trips it: the extra request comes back as Busy.
    let (mut a2, mut b2) = {
        let mut cache = config(PeerKind::Cache);
        cache.max_requests = 4;
        pair_with(config(PeerKind::Peer), cache)
    };
    assert_eq!(a2.send_command(&request(&[0, 1, 2, 3, 4, 5])), Ok(Outbound::Queued));
    assert_eq!(
        events(&mut a2),
        vec![
            Event::Rejected { index: 4, reason: RejectReason::Busy },
            Event::Rejected { index: 5, reason: RejectReason::Busy },
        ]
    );
    assert_eq!(a2.open_requests(), 4);
    pump(&mut a2, &mut b2).expect("within the limit");
    assert_eq!(b2.peer_open_requests(), 4);
}

#[test]
fn duplicate_requests_are_refused() {
    let (mut a, mut b) = pair();
    assert_eq!(
        b.handle_frame(Frame::Request(vec![1, 2, 1])),
        Err(ProtocolError::DuplicateRequest { index: 1 })
    );
    let (_, mut b) = pair();
    b.handle_frame(Frame::Request(vec![1])).expect("request");
    assert_eq!(
        b.handle_frame(Frame::Request(vec![1])),
        Err(ProtocolError::DuplicateRequest { index: 1 })
    );
    // Asking again after the answer is fine.
    let (_, mut b) = pair();
    b.handle_frame(Frame::Request(vec![1])).expect("request");
    assert!(matches!(b.send_command(&serve(1)), Ok(Outbound::Piece(_))));
    b.handle_frame(Frame::Request(vec![1])).expect("asked again");
    // Our side never sends a duplicate.
    a.send_command(&request(&[3])).expect("request");
    assert_eq!(a.send_command(&request(&[3])), Err(SendError::AlreadyRequested { index: 3 }));
    assert_eq!(a.send_command(&request(&[4, 4])), Err(SendError::AlreadyRequested { index: 4 }));
    assert_eq!(a.open_requests(), 1, "a refused batch sends nothing");
}

#[test]
fn requests_are_answered_exactly_once() {
    let (mut a, mut b) = pair();
    a.send_command(&request(&[0, 1, 2, 3])).expect("request");
    pump(&mut a, &mut b).expect("requests");
    assert_eq!(events(&mut b), (0..4).map(Event::Request).collect::<Vec<_>>());

    // 0 is served; 1 is refused; 2 is cancelled before it is served; 3 is served while the
    // cancel for it is on the way.
    let Ok(Outbound::Piece(header0)) = b.send_command(&serve(0)) else { panic!("serve 0") };
    let refuse = Command::Reject { peer: PeerId(1), index: 1, reason: RejectReason::NotHave };
    assert_eq!(b.send_command(&refuse), Ok(Outbound::Queued));
    let Ok(Outbound::Piece(header3)) = b.send_command(&serve(3)) else { panic!("serve 3") };
    let cancel = |index| Command::Cancel { peer: PeerId(1), index };
    assert_eq!(a.send_command(&cancel(2)), Ok(Outbound::Queued));
    assert_eq!(a.send_command(&cancel(3)), Ok(Outbound::Queued));
    assert_eq!(frames(&mut a), vec![Frame::Cancel(vec![2, 3])], "cancels batched");
    a.send_command(&cancel(2)).expect("again");
    a.send_command(&cancel(3)).expect("again");
    assert!(frames(&mut a).is_empty(), "a cancelled request is cancelled once");
    b.handle_frame(Frame::Cancel(vec![2, 3])).expect("cancel");
    assert_eq!(events(&mut b), vec![Event::Cancel(2)], "3 is being served: the piece answers it");
    assert_eq!(b.peer_open_requests(), 0);
    // The scheduler's late answers to the cancelled request are dropped.
    assert_eq!(b.send_command(&serve(2)), Ok(Outbound::Withdrawn));
    let late = Command::Reject { peer: PeerId(1), index: 2, reason: RejectReason::Busy };
    assert_eq!(b.send_command(&late), Ok(Outbound::Nothing));
    assert_eq!(
        frames(&mut b),
        vec![
            Frame::Reject { index: 1, reason: RejectKind::Refused(RejectReason::NotHave) },
            Frame::Reject { index: 2, reason: RejectKind::Cancelled },
        ]
    );

    // Back at the requester.
    assert_eq!(a.open_requests(), 4);
    a.handle_piece_header(header0).expect("piece 0");
    a.handle_frame(Frame::Reject { index: 1, reason: RejectKind::Refused(RejectReason::NotHave) })
        .expect("reject 1");
    a.handle_frame(Frame::Reject { index: 2, reason: RejectKind::Cancelled }).expect("ack 2");
    a.handle_piece_header(header3).expect("late piece 3 is still an answer");
    assert_eq!(a.open_requests(), 0);
    assert_eq!(
        events(&mut a),
        vec![Event::Rejected { index: 1, reason: RejectReason::NotHave }],
        "the cancel acknowledgement is not the scheduler's business"
    );
}

#[test]
fn unsolicited_answers_are_violations() {
    let piece = |index| PieceHeader { index, length: 100 + index };
    let (mut a, _) = pair();
    let err = a.handle_piece_header(piece(1)).expect_err("unsolicited");
    assert_eq!(err, ProtocolError::Unsolicited { kind: FrameKind::Piece, index: 1 });
    assert_eq!(err.code(), ErrorCode::PROTOCOL_VIOLATION);

    let (mut a, _) = pair();
    let busy = RejectKind::Refused(RejectReason::Busy);
    assert_eq!(
        a.handle_frame(Frame::Reject { index: 1, reason: busy }),
        Err(ProtocolError::Unsolicited { kind: FrameKind::Reject, index: 1 })
    );

    let (mut a, _) = pair();
    a.send_command(&request(&[1])).expect("request");
    assert_eq!(
        a.handle_frame(Frame::Reject { index: 1, reason: RejectKind::Cancelled }),
        Err(ProtocolError::NotCancelled { index: 1 })
    );

    let (mut a, _) = pair();
    a.send_command(&request(&[1])).expect("request");
    a.handle_piece_header(piece(1)).expect("the answer");
    assert_eq!(
        a.handle_piece_header(piece(1)),
        Err(ProtocolError::Unsolicited { kind: FrameKind::Piece, index: 1 }),
        "a second answer"
    );

    let (mut a, _) = pair();
    a.send_command(&request(&[2])).expect("request");
    assert_eq!(
        a.handle_piece_header(PieceHeader { index: 2, length: 5 }),
        Err(ProtocolError::PieceLength { index: 2, expected: 102, got: 5 })
    );

    let (_, mut b) = pair();
    assert_eq!(b.handle_frame(Frame::Piece(piece(0))), Err(ProtocolError::PieceOnControlStream));
}

#[test]
fn a_re_request_waits_for_the_cancelled_answer() {
    let (mut a, _) = pair();
    a.send_command(&request(&[6])).expect("request");
    a.send_command(&Command::Cancel { peer: PeerId(1), index: 6 }).expect("cancel");
    // Asking again before the answer to the cancelled request: refused locally as Busy, so the
    // two answers can never be confused.
    assert_eq!(a.send_command(&request(&[6, 7])), Ok(Outbound::Queued));
    assert_eq!(events(&mut a), vec![Event::Rejected { index: 6, reason: RejectReason::Busy }]);
    a.handle_frame(Frame::Reject { index: 6, reason: RejectKind::Cancelled }).expect("ack");
    assert_eq!(a.send_command(&request(&[6])), Ok(Outbound::Queued));
}

#[test]
fn commands_are_batched_in_order() {
    let (mut a, mut b) = pair();
    for command in [
        Command::Announce { index: 1, peers: vec![] },
        Command::Announce { index: 2, peers: vec![] },
        request(&[3]),
        request(&[4, 5]),
        Command::Cancel { peer: PeerId(1), index: 3 },
        Command::Cancel { peer: PeerId(1), index: 4 },
        Command::Announce { index: 6, peers: vec![] },
        Command::RequestOriginPermit,
        Command::Complete,
    ] {
        a.send_command(&command).expect("sent");
    }
    let mut wire = BytesMut::new();
    assert_eq!(a.write_frames(&mut wire), 4);
    assert_eq!(
        decode_all(&mut wire),
        Ok(vec![
            Frame::Have(vec![1, 2]),
            Frame::Request(vec![3, 4, 5]),
            Frame::Cancel(vec![3, 4]),
            Frame::Have(vec![6]),
        ])
    );
    // Batches stay within MAX_BATCH.
    for index in 0..N {
        a.send_command(&Command::Announce { index, peers: vec![] }).expect("announce");
    }
    assert_eq!(frames(&mut a), vec![Frame::Have((0..N).collect())]);
    assert_eq!(
        b.send_command(&Command::Ban {
            peer: PeerId(1),
            reason: fleetwave_node::swarm::BanReason::HashMismatch { index: 0 }
        }),
        Ok(Outbound::Close(ErrorCode::BANNED))
    );
}

#[test]
fn before_the_handshake_only_announcements_are_tolerated() {
    let mut a = Session::new(config(PeerKind::Peer)).expect("session");
    assert_eq!(
        a.send_command(&Command::Announce { index: 1, peers: vec![] }),
        Ok(Outbound::Nothing)
    );
    assert_eq!(a.send_command(&request(&[1])), Err(SendError::NotEstablished));
    assert_eq!(a.send_command(&serve(1)), Err(SendError::NotEstablished));
    assert_eq!(a.send_bitfield(&Bitfield::new(N)), Err(SendError::NotEstablished));
    assert_eq!(frames(&mut a), vec![Frame::Hello(hello(PeerKind::Peer))]);
}

#[test]
fn error_codes_have_names() {
    let named: Vec<ErrorCode> = (0..=13).map(ErrorCode).collect();
    for code in &named {
        assert!(code.name().is_some(), "{code:?}");
    }
    assert_eq!(ErrorCode::BANNED.to_string(), "BANNED");
    assert_eq!(ErrorCode(99).to_string(), "ERROR_CODE(99)");
    assert_eq!(u32::from(ErrorCode::TOO_MANY_REQUESTS), 7);
    let err = fleetwave_node::swarm::EventError::Banned { peer: PeerId(3) };
    assert_eq!(ErrorCode::from_event_error(&err), ErrorCode::BANNED);
}

// ---------------------------------------------------------------------------------------------
// Real schedulers over sessions

/// One direction of a connection: control bytes and piece streams in flight.
#[derive(Default)]
struct Pipe {
    control: BytesMut,
    pieces: VecDeque<BytesMut>,
}

struct Daemon {
    role: PeerKind,
    core: Scheduler,
    /// Sessions by peer (every other daemon).
    sessions: BTreeMap<usize, Session>,
    /// Bytes of the chunks this daemon holds.
    store: BTreeMap<ChunkIndex, Vec<u8>>,
}

struct Swarm {
    now: Duration,
    daemons: Vec<Daemon>,
    /// `(from, to)` -> what is on the way.
    pipes: BTreeMap<(usize, usize), Pipe>,
    chunks: Vec<Vec<u8>>,
    rng: ChaCha8Rng,
    pieces_sent: u64,
    /// Cancels that went on the wire (endgame duplicates).
    cancels_sent: u64,
}

impl Swarm {
    /// A cache holding every chunk and `hosts` empty hosts, all connected to each other.
    fn new(hosts: usize, n: u32, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let chunks: Vec<Vec<u8>> = (0..n)
            .map(|_| {
                let len = rng.gen_range(1..4000);
                (0..len).map(|_| rng.r#gen()).collect()
            })
            .collect();
        let table = ChunkTable::from_lengths(chunks.iter().map(|c| c.len() as u32)).expect("t");
        let mut daemons = Vec::new();
        for d in 0..=hosts {
            let role = if d == 0 { PeerKind::Cache } else { PeerKind::Peer };
            let local = if d == 0 { Bitfield::full(n) } else { Bitfield::new(n) };
            let core = Scheduler::new(
                Duration::ZERO,
                table.clone(),
                &local,
                SwarmConfig::default(),
                seed + d as u64,
            )
            .expect("scheduler");
            let store = if d == 0 {
                chunks.iter().cloned().enumerate().map(|(i, c)| (i as u32, c)).collect()
            } else {
                BTreeMap::new()
            };
            daemons.push(Daemon { role, core, sessions: BTreeMap::new(), store });
        }
        let mut swarm = Swarm {
            now: Duration::ZERO,
            daemons,
            pipes: BTreeMap::new(),
            chunks,
            rng,
            pieces_sent: 0,
            cancels_sent: 0,
        };
        for a in 0..=hosts {
            for b in a + 1..=hosts {
                swarm.connect(a, b, &table);
            }
        }
        swarm
    }

    fn connect(&mut self, dialer: usize, listener: usize, table: &ChunkTable) {
        for (me, peer) in [(dialer, listener), (listener, dialer)] {
            let role = self.daemons[me].role;
            let session =
                Session::new(SessionConfig::new(manifest(1), table.clone(), role)).expect("s");
            self.daemons[me].sessions.insert(peer, session);
            self.pipes.insert((me, peer), Pipe::default());
        }
    }

    fn is_done(&self) -> bool {
        self.daemons.iter().all(|d| d.core.is_complete())
    }

    /// Carries out `d`'s scheduler commands, then flushes its sessions.
    fn run_commands(&mut self, d: usize) {
        let now = self.now;
        while let Some(command) = self.daemons[d].core.poll_command() {
            let targets: Vec<usize> = match &command {
                Command::Announce { peers, .. } => peers.iter().map(|p| p.0 as usize).collect(),
                Command::Request { peer, .. }
                | Command::Cancel { peer, .. }
                | Command::Serve { peer, .. }
                | Command::Reject { peer, .. }
                | Command::Ban { peer, .. } => vec![peer.0 as usize],
                _ => vec![],
            };
            for peer in targets {
                let daemon = &mut self.daemons[d];
                let session = daemon.sessions.get_mut(&peer).expect("session");
                match session.send_command(&command).expect("command fits the session") {
                    Outbound::Queued if matches!(command, Command::Cancel { .. }) => {
                        self.cancels_sent += 1;
                    }
                    Outbound::Nothing | Outbound::Queued => {}
                    Outbound::Piece(header) => {
                        let mut stream = encode(&[Frame::Piece(header)]);
                        stream.extend_from_slice(&daemon.store[&header.index]);
                        self.pipes.get_mut(&(d, peer)).expect("pipe").pieces.push_back(stream);
                        self.pieces_sent += 1;
                        daemon
                            .core
                            .handle_upload_done(now, PeerId(peer as u64), header.index)
                            .expect("upload done");
                    }
                    Outbound::Withdrawn => daemon
                        .core
                        .handle_upload_done(now, PeerId(peer as u64), command_index(&command))
                        .expect("withdrawn"),
                    Outbound::Close(code) => panic!("closed with {code}"),
                }
                self.deliver_events(d, peer);
            }
        }
        let daemon = &mut self.daemons[d];
        for (&peer, session) in daemon.sessions.iter_mut() {
            session.write_frames(&mut self.pipes.get_mut(&(d, peer)).expect("pipe").control);
        }
    }

    fn deliver_events(&mut self, d: usize, peer: usize) {
        let now = self.now;
        let daemon = &mut self.daemons[d];
        let session = daemon.sessions.get_mut(&peer).expect("session");
        while let Some(event) = session.poll_event() {
            let connected = matches!(event, Event::Connected { .. });
            event.deliver(&mut daemon.core, now, PeerId(peer as u64)).expect("scheduler takes it");
            if connected {
                session.send_bitfield(daemon.core.bitfield()).expect("bitfield");
            }
        }
    }

    /// Delivers what is in flight to `d`, control bytes and pieces, in random slices.
    fn receive(&mut self, d: usize) {
        let now = self.now;
        let peers: Vec<usize> = self.daemons[d].sessions.keys().copied().collect();
        for peer in peers {
            let pipe = self.pipes.get_mut(&(peer, d)).expect("pipe");
            let mut control = std::mem::take(&mut pipe.control);
            let pieces = std::mem::take(&mut pipe.pieces);
            // Control bytes arrive in random slices.
            let mut buf = BytesMut::new();
            while !control.is_empty() {
                let take = self.rng.gen_range(1..=control.len());
                buf.extend_from_slice(&control.split_to(take));
                let session = self.daemons[d].sessions.get_mut(&peer).expect("session");
                session.handle_bytes(&mut buf).expect("valid control stream");
                self.deliver_events(d, peer);
            }
            assert!(buf.is_empty());
            for mut stream in pieces {
                let mut decoder = PieceDecoder::new();
                let mut buf = BytesMut::new();
                let mut header = None;
                let mut hasher = blake3::Hasher::new();
                while !stream.is_empty() {
                    let take = self.rng.gen_range(1..=stream.len());
                    buf.extend_from_slice(&stream.split_to(take));
                    while let Some(data) = decoder.decode(&mut buf).expect("valid piece stream") {
                        match data {
                            PieceData::Header(h) => {
                                let session =
                                    self.daemons[d].sessions.get_mut(&peer).expect("session");
                                session.handle_piece_header(h).expect("solicited piece");
                                header = Some(h);
                            }
                            PieceData::Bytes(bytes) => {
                                hasher.update(&bytes);
                            }
                        }
                    }
                }
                decoder.finish().expect("complete piece");
                let header = header.expect("header");
                let index = header.index;
                let outcome = if hasher.finalize() == blake3::hash(&self.chunks[index as usize]) {
                    PieceOutcome::Verified
                } else {
                    PieceOutcome::HashMismatch
                };
                let daemon = &mut self.daemons[d];
                let action = daemon.core.handle_piece(now, PeerId(peer as u64), index, outcome);
                if action.expect("piece accepted") == PieceAction::Write {
                    daemon.store.insert(index, self.chunks[index as usize].clone());
                    daemon.core.handle_written(now, index).expect("written");
                }
            }
        }
    }

    fn step(&mut self) {
        for d in 0..self.daemons.len() {
            self.run_commands(d);
        }
        for d in 0..self.daemons.len() {
            self.receive(d);
        }
        self.now += Duration::from_millis(5);
        for daemon in &mut self.daemons {
            if daemon.core.poll_timeout().is_some_and(|t| t <= self.now) {
                daemon.core.handle_timeout(self.now);
            }
        }
    }
}

fn command_index(command: &Command) -> ChunkIndex {
    match command {
        Command::Serve { index, .. } => *index,
        other => panic!("no index in {other:?}"),
    }
}

#[test]
fn schedulers_trade_a_manifest_over_sessions() {
    let n = 120;
    let mut cancels = 0;
    for seed in 0..10 {
        let mut swarm = Swarm::new(3, n, seed);
        let mut steps = 0;
        while !swarm.is_done() {
            swarm.step();
            steps += 1;
            assert!(steps < 10_000, "seed {seed} stalls: {:?}", swarm.daemons[1].core.progress());
        }
        for daemon in &swarm.daemons {
            assert_eq!(daemon.store.len(), n as usize);
            for (i, bytes) in &daemon.store {
                assert_eq!(bytes, &swarm.chunks[*i as usize]);
            }
            for session in daemon.sessions.values() {
                assert!(session.error().is_none());
            }
            assert_eq!(daemon.core.progress().hash_mismatches, 0);
        }
        // Hosts traded among themselves: the cache did not send every host every chunk.
        let from_cache: u64 =
            swarm.daemons[1..].iter().map(|d| d.core.progress().cache.chunks).sum();
        assert!(from_cache < 3 * u64::from(n), "seed {seed}: cache sent {from_cache}");
        assert!(swarm.pieces_sent >= 3 * u64::from(n));
        cancels += swarm.cancels_sent;
    }
    assert!(cancels > 0, "endgame cancels crossed the wire and were answered");
}

// ---------------------------------------------------------------------------------------------
// Properties

fn any_index() -> impl Strategy<Value = ChunkIndex> {
    prop_oneof![0..64u32, any::<u32>()]
}

fn any_role() -> impl Strategy<Value = PeerKind> {
    prop_oneof![Just(PeerKind::Peer), Just(PeerKind::Cache), Just(PeerKind::Origin)]
}

fn any_reason() -> impl Strategy<Value = RejectKind> {
    prop_oneof![
        Just(RejectKind::Cancelled),
        Just(RejectKind::Refused(RejectReason::Busy)),
        Just(RejectKind::Refused(RejectReason::NotHave)),
        Just(RejectKind::Refused(RejectReason::Banned)),
        Just(RejectKind::Refused(RejectReason::SeededRecently)),
    ]
}

fn any_frame() -> impl Strategy<Value = Frame> {
    let batch = || proptest::collection::vec(any_index(), 1..200);
    prop_oneof![
        (
            any::<u32>(),
            any::<[u8; 32]>(),
            any_role(),
            0..=MAX_CHUNKS as u32,
            1..=MAX_REQUESTS_LIMIT
        )
            .prop_map(|(version, id, role, chunk_count, max_requests)| {
                Frame::Hello(Hello {
                    version,
                    manifest: ManifestId::from_bytes(id),
                    role,
                    chunk_count,
                    max_requests,
                })
            }),
        proptest::collection::vec(any::<u8>(), 0..600).prop_map(Frame::Bitfield),
        batch().prop_map(Frame::Have),
        batch().prop_map(Frame::Request),
        batch().prop_map(Frame::Cancel),
        (any_index(), any_reason()).prop_map(|(index, reason)| Frame::Reject { index, reason }),
        (any_index(), 0..=MAX_PIECE_LEN as u32)
            .prop_map(|(index, length)| Frame::Piece(PieceHeader { index, length })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frames_survive_encoding_and_any_split(
        frames in proptest::collection::vec(any_frame(), 1..8),
        split in any::<prop::sample::Index>(),
    ) {
        let wire = encode(&frames);
        let split = split.index(wire.len() + 1);
        let mut buf = BytesMut::from(&wire[..split]);
        let mut got = decode_all(&mut buf).expect("decodes");
        buf.extend_from_slice(&wire[split..]);
        got.extend(decode_all(&mut buf).expect("decodes"));
        prop_assert_eq!(got, frames);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn random_bytes_never_panic_the_decoders(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut buf = BytesMut::from(&bytes[..]);
        // Either frames, then an incomplete tail or an error; never a panic or a loop.
        while let Ok(Some(_)) = Frame::decode(&mut buf) {}

        let mut decoder = PieceDecoder::new();
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decoder.decode(&mut buf) {}
        let _ = decoder.finish();

        // A session in either state takes them (or refuses them) without panicking.
        let mut fresh = Session::new(config(PeerKind::Cache)).expect("session");
        let _ = fresh.handle_bytes(&mut BytesMut::from(&bytes[..]));
        let (mut a, _) = pair();
        a.send_command(&request(&[0, 1, 2])).expect("request");
        let _ = a.handle_bytes(&mut BytesMut::from(&bytes[..]));
        while a.poll_event().is_some() {}
    }

    #[test]
    fn random_frames_never_panic_an_established_session(
        frames in proptest::collection::vec(any_frame(), 1..20),
    ) {
        let (mut a, mut b) = pair();
        a.send_command(&request(&[0, 1, 2])).expect("request");
        for frame in frames {
            let header = match &frame { Frame::Piece(h) => Some(*h), _ => None };
            if a.handle_frame(frame.clone()).is_err() { break; }
            if let Some(h) = header { let _ = b.handle_piece_header(h); }
            let _ = b.handle_frame(frame);
            // Whatever happened, the requester never has more open than the peer allows.
            prop_assert!(a.open_requests() <= DEFAULT_MAX_REQUESTS as usize);
            prop_assert!(b.peer_open_requests() <= DEFAULT_MAX_REQUESTS as usize);
        }
    }
}
