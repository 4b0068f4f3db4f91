//! Single-pair bulk throughput: plain TCP against QUIC with libp2p identities, quinn driven
//! directly (`fleetwave_node::transport`, with quinn's default and Fleetwave's tuned
//! configuration) and libp2p's own QUIC transport (swarm + `libp2p-stream`).
//!
//! Both ends run in this process on one two-worker tokio runtime, on 127.0.0.1 only. Two paths:
//!
//! - **loopback**: `--mib` MiB (default 1024) straight over 127.0.0.1. The RTT is tens of
//!   microseconds, so no window matters: this measures CPU cost per byte.
//! - **delayed**: `--delayed-mib` MiB (default 128) through [`DelayRelay`], a UDP relay on
//!   127.0.0.1 that holds every datagram for half of `--rtt-ms` (default 50) each way, standing
//!   in for netem, which this machine lacks. Here flow-control windows, socket buffers and
//!   congestion control decide. The relay is one task and costs CPU of its own (included in the
//!   CPU column); it tops out somewhere above 60 MB/s on this machine.
//!
//! Each run moves its bytes over one stream (the tuned quinn endpoint also as 64 KiB pieces, one
//! stream each: the chunk protocol's pattern). Connections are set up before the clock starts;
//! the time runs from the first byte written to the last byte read. CPU is the whole process
//! (both ends and the relay, user + system). Cases take turns within each round so machine noise
//! spreads over all of them; tables show medians and the best run.
//!
//! ```text
//! cargo run --release -p fleetwave-benches --bin transport_bench -- [--mib N] [--runs N] \
//!     [--delayed-mib N] [--rtt-ms N] [--only tcp,quinn-default,quinn-cubic,quinn-bbr,\
//!     quinn-osbuf,quinn-pieces,quinn-zerocopy,libp2p]
//! ```
//!
//! Every transfer is bounded by `TRANSFER_TIMEOUT`, and no round starts after `TOTAL_BUDGET`.

use std::collections::VecDeque;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use fleetwave_node::transport::{self, Congestion, Endpoint, TransportConfig};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol, SwarmBuilder};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until, timeout};

/// Size of every write and read buffer, and of one batch of bytes written.
const BUF: usize = 256 << 10;
/// Size of one piece in the stream-per-piece variant: the chunker's average chunk.
const PIECE: usize = 64 << 10;
/// Longest a single transfer may take before it is abandoned and reported as failed.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest connection setup may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// No new round starts after this much time.
const TOTAL_BUDGET: Duration = Duration::from_secs(170);
const PROTOCOL: StreamProtocol = StreamProtocol::new("/fleetwave/bench/1");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Tcp,
    QuinnDefault,
    QuinnTuned(Congestion),
    QuinnTunedOsBuffers,
    QuinnTunedPieces,
    QuinnTunedZeroCopy,
    Libp2pQuic,
}

impl Variant {
    const ALL: [Variant; 8] = [
        Variant::Tcp,
        Variant::QuinnDefault,
        Variant::QuinnTuned(Congestion::Cubic),
        Variant::QuinnTuned(Congestion::Bbr),
        Variant::QuinnTunedOsBuffers,
        Variant::QuinnTunedPieces,
        Variant::QuinnTunedZeroCopy,
        Variant::Libp2pQuic,
    ];

    /// Short name for `--only`.
    fn id(self) -> &'static str {
        match self {
            Variant::Tcp => "tcp",
            Variant::QuinnDefault => "quinn-default",
            Variant::QuinnTuned(Congestion::Cubic) => "quinn-cubic",
            Variant::QuinnTuned(Congestion::Bbr) => "quinn-bbr",
            Variant::QuinnTuned(Congestion::NewReno) => "quinn-newreno",
            Variant::QuinnTunedOsBuffers => "quinn-osbuf",
            Variant::QuinnTunedPieces => "quinn-pieces",
            Variant::QuinnTunedZeroCopy => "quinn-zerocopy",
            Variant::Libp2pQuic => "libp2p",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Tcp => "TCP (tokio, one connection)",
            Variant::QuinnDefault => "quinn + libp2p-tls, quinn defaults",
            Variant::QuinnTuned(Congestion::Cubic) => "quinn + libp2p-tls, tuned, Cubic",
            Variant::QuinnTuned(Congestion::Bbr) => "quinn + libp2p-tls, tuned, BBR",
            Variant::QuinnTuned(Congestion::NewReno) => "quinn + libp2p-tls, tuned, NewReno",
            Variant::QuinnTunedOsBuffers => "quinn tuned Cubic, OS UDP buffers",
            Variant::QuinnTunedPieces => "quinn tuned Cubic, 64 KiB piece/stream",
            Variant::QuinnTunedZeroCopy => "quinn tuned Cubic, Bytes chunks (no copy)",
            Variant::Libp2pQuic => "libp2p QUIC defaults + libp2p-stream",
        }
    }
}

/// Where the bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// 127.0.0.1 directly.
    Loopback,
    /// Through a [`DelayRelay`] on 127.0.0.1 that holds every datagram for `rtt / 2` each way.
    Delayed { rtt: Duration },
}

/// The variants that also run on the delayed path: the ones whose windows and congestion
/// control differ. TCP has no relay, and the no-copy variant only saves CPU.
const DELAYED: [Variant; 6] = [
    Variant::QuinnDefault,
    Variant::QuinnTuned(Congestion::Cubic),
    Variant::QuinnTuned(Congestion::Bbr),
    Variant::QuinnTunedOsBuffers,
    Variant::QuinnTunedPieces,
    Variant::Libp2pQuic,
];

/// One transfer's figures.
#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: Duration,
    cpu: Duration,
    /// Packets the sending QUIC stack declared lost (quinn rows only).
    lost: Option<u64>,
}

#[derive(Debug)]
struct Args {
    bytes: u64,
    delayed_bytes: u64,
    rtt: Duration,
    runs: usize,
    variants: Vec<Variant>,
}

const USAGE: &str = "flags: --mib N (loopback MiB per transfer, 1..=8192, default 1024), \
--delayed-mib N (1..=8192, default 128), --rtt-ms N (delayed path RTT, 0 skips it, default 50), \
--runs N (1..=15, default 3), --only ID,ID,...";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        bytes: 1024 << 20,
        delayed_bytes: 128 << 20,
        rtt: Duration::from_millis(50),
        runs: 3,
        variants: Variant::ALL.to_vec(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--mib" => args.bytes = value.parse::<u64>()?.clamp(1, 8192) << 20,
            "--delayed-mib" => args.delayed_bytes = value.parse::<u64>()?.clamp(1, 8192) << 20,
            "--rtt-ms" => args.rtt = Duration::from_millis(value.parse::<u64>()?.min(1000)),
            "--runs" => args.runs = value.parse::<usize>()?.clamp(1, 15),
            "--only" => {
                let ids: Vec<&str> = value.split(',').collect();
                args.variants =
                    Variant::ALL.into_iter().filter(|v| ids.contains(&v.id())).collect();
                if args.variants.is_empty() {
                    let known: Vec<&str> = Variant::ALL.iter().map(|v| v.id()).collect();
                    bail!("--only takes a comma-separated list of {}", known.join(", "));
                }
            }
            _ => bail!("unknown flag {flag}; {USAGE}"),
        }
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(args))
}

/// One table row in the making.
#[derive(Debug)]
struct Case {
    variant: Variant,
    path: Path,
    bytes: u64,
    samples: Vec<Sample>,
}

#[allow(clippy::print_stdout)] // The report is this binary's output.
async fn run(args: Args) -> Result<()> {
    let started = now();
    let mut cases: Vec<Case> = args
        .variants
        .iter()
        .map(|&variant| Case { variant, path: Path::Loopback, bytes: args.bytes, samples: vec![] })
        .collect();
    if !args.rtt.is_zero() {
        let delayed = args.variants.iter().filter(|variant| DELAYED.contains(variant));
        cases.extend(delayed.map(|&variant| Case {
            variant,
            path: Path::Delayed { rtt: args.rtt },
            bytes: args.delayed_bytes,
            samples: vec![],
        }));
    }
    let mut failures = 0;
    for round in 0..args.runs {
        if started.elapsed() > TOTAL_BUDGET {
            println!("time budget spent after {round} rounds");
            break;
        }
        for case in &mut cases {
            let label = match case.path {
                Path::Loopback => "loopback".to_owned(),
                Path::Delayed { rtt } => format!("RTT {} ms", rtt.as_millis()),
            };
            match measure(case.variant, case.bytes, case.path).await {
                Ok(sample) => {
                    let lost = sample.lost.map_or_else(String::new, |n| format!("  lost {n}"));
                    println!(
                        "round {round} {label:<9} {:<42} {:>7.1} MB/s  cpu {:>5.2} s{lost}",
                        case.variant.name(),
                        mb_per_s(case.bytes, sample.wall),
                        sample.cpu.as_secs_f64()
                    );
                    case.samples.push(sample);
                }
                Err(error) => {
                    println!(
                        "round {round} {label:<9} {:<42} FAILED: {error:#}",
                        case.variant.name()
                    );
                    failures += 1;
                }
            }
        }
    }
    println!();
    println!("rounds: {}, total time {:.0} s", args.runs, started.elapsed().as_secs_f64());

    let loopback: Vec<&Case> = cases.iter().filter(|case| case.path == Path::Loopback).collect();
    let tcp = loopback
        .iter()
        .find(|case| case.variant == Variant::Tcp)
        .and_then(|case| median_wall(&case.samples).map(|wall| mb_per_s(case.bytes, wall)));
    println!();
    println!("Loopback, {} MiB per transfer, one connection:", args.bytes >> 20);
    table(&loopback, tcp);
    let delayed: Vec<&Case> = cases.iter().filter(|case| case.path != Path::Loopback).collect();
    if !delayed.is_empty() {
        println!();
        println!(
            "Delayed path (relay on 127.0.0.1, RTT {} ms), {} MiB per transfer:",
            args.rtt.as_millis(),
            args.delayed_bytes >> 20
        );
        table(&delayed, None);
    }
    if failures > 0 {
        bail!("{failures} transfers failed");
    }
    Ok(())
}

/// Prints one markdown table: medians (and the best run) of each case.
#[allow(clippy::print_stdout)] // The report is this binary's output.
fn table(cases: &[&Case], tcp: Option<f64>) {
    println!();
    println!(
        "| transport | MB/s (median) | MB/s (best) | vs TCP | CPU s per GiB | cores busy | \
         packets lost | runs |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for case in cases {
        let name = case.variant.name();
        let (Some(wall), Some(best)) =
            (median_wall(&case.samples), case.samples.iter().map(|s| s.wall).min())
        else {
            println!("| {name} | - | - | - | - | - | - | 0 |");
            continue;
        };
        let rate = mb_per_s(case.bytes, wall);
        let ratio = tcp.map_or_else(|| "-".to_owned(), |tcp| format!("{:.2}", rate / tcp));
        let gib = case.bytes as f64 / f64::from(1u32 << 30);
        let cpu_per_gib = median_f64(case.samples.iter().map(|s| s.cpu.as_secs_f64() / gib));
        let busy =
            median_f64(case.samples.iter().map(|s| s.cpu.as_secs_f64() / s.wall.as_secs_f64()));
        let lost = median_f64(case.samples.iter().filter_map(|s| s.lost.map(|n| n as f64)));
        let lost = if lost.is_nan() { "-".to_owned() } else { format!("{lost:.0}") };
        println!(
            "| {name} | {rate:.0} | {:.0} | {ratio} | {cpu_per_gib:.2} | {busy:.2} | {lost} | {} |",
            mb_per_s(case.bytes, best),
            case.samples.len()
        );
    }
}

fn median_wall(samples: &[Sample]) -> Option<Duration> {
    let mut walls: Vec<Duration> = samples.iter().map(|sample| sample.wall).collect();
    walls.sort();
    walls.get(walls.len() / 2).copied()
}

fn median_f64(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn mb_per_s(bytes: u64, wall: Duration) -> f64 {
    bytes as f64 / 1e6 / wall.as_secs_f64()
}

#[allow(clippy::disallowed_methods)] // A benchmark's timer is its I/O edge.
fn now() -> std::time::Instant {
    std::time::Instant::now()
}

fn cpu_time() -> Duration {
    let time = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Runs one transfer of `bytes` and times the data phase only.
async fn measure(variant: Variant, bytes: u64, path: Path) -> Result<Sample> {
    match variant {
        Variant::Tcp => tcp(bytes).await,
        Variant::QuinnDefault => {
            quinn(bytes, TransportConfig::quinn_defaults(), Pattern::OneStream, path).await
        }
        Variant::QuinnTuned(congestion) => {
            let config = TransportConfig { congestion, ..TransportConfig::default() };
            quinn(bytes, config, Pattern::OneStream, path).await
        }
        Variant::QuinnTunedOsBuffers => {
            let config = TransportConfig {
                udp_receive_buffer: None,
                udp_send_buffer: None,
                ..TransportConfig::default()
            };
            quinn(bytes, config, Pattern::OneStream, path).await
        }
        Variant::QuinnTunedPieces => {
            quinn(bytes, TransportConfig::default(), Pattern::StreamPerPiece, path).await
        }
        Variant::QuinnTunedZeroCopy => {
            quinn(bytes, TransportConfig::default(), Pattern::ZeroCopy, path).await
        }
        Variant::Libp2pQuic => libp2p_quic(bytes, path).await,
    }
}

/// A UDP relay on 127.0.0.1 between one dialer and `server` that holds every datagram for
/// `one_way` before forwarding it: a path with RTT = 2 x `one_way`, no loss until
/// `RELAY_QUEUE` bytes wait in one direction (then tail drop, like a router), and no rate limit
/// but the CPU. It is what netem would do, which this machine lacks. It receives with GRO and
/// forwards with GSO (quinn-udp), so one system call moves up to 64 datagrams.
#[derive(Debug)]
struct DelayRelay {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// Bytes the relay holds at most, per direction.
const RELAY_QUEUE: usize = 64 << 20;

/// Datagrams received together, waiting for their time.
#[derive(Debug)]
struct Held {
    due: Instant,
    to: SocketAddr,
    /// The datagrams back to back, each `stride` bytes but the last.
    data: Vec<u8>,
    stride: usize,
}

impl DelayRelay {
    fn start(server: SocketAddr, one_way: Duration) -> Result<Self> {
        let socket = std::net::UdpSocket::bind(loopback())?;
        socket.set_nonblocking(true)?;
        let state = quinn::udp::UdpSocketState::new((&socket).into())?;
        state.set_recv_buffer_size((&socket).into(), 8 << 20)?;
        state.set_send_buffer_size((&socket).into(), 8 << 20)?;
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        let addr = socket.local_addr()?;
        let task = tokio::spawn(async move {
            // Each direction is a FIFO: a constant delay never reorders.
            let mut queues: [VecDeque<Held>; 2] = Default::default();
            let mut queued = [0_usize; 2];
            let mut client = None;
            let mut buf = vec![0_u8; 256 << 10];
            loop {
                let due = queues.iter().filter_map(|queue| queue.front().map(|h| h.due)).min();
                tokio::select! {
                    readable = socket.readable() => {
                        if readable.is_err() {
                            return;
                        }
                        // Drain what is there, then let the timer branch run.
                        for _ in 0..64 {
                            let mut meta = [quinn::udp::RecvMeta::default()];
                            let received = socket.try_io(Interest::READABLE, || {
                                let mut bufs = [IoSliceMut::new(&mut buf)];
                                state.recv((&socket).into(), &mut bufs, &mut meta)
                            });
                            if received.is_err() {
                                break;
                            }
                            let meta = meta[0];
                            let (direction, to) = if meta.addr == server {
                                let Some(client) = client else { continue };
                                (1, client)
                            } else {
                                client = Some(meta.addr);
                                (0, server)
                            };
                            if queued[direction] + meta.len > RELAY_QUEUE {
                                continue;
                            }
                            queued[direction] += meta.len;
                            queues[direction].push_back(Held {
                                due: Instant::now() + one_way,
                                to,
                                data: buf[..meta.len].to_vec(),
                                stride: meta.stride,
                            });
                        }
                    }
                    () = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                        let now = Instant::now();
                        for (queue, queued) in queues.iter_mut().zip(&mut queued) {
                            while queue.front().is_some_and(|held| held.due <= now) {
                                let Some(held) = queue.pop_front() else { break };
                                *queued -= held.data.len();
                                relay_send(&socket, &state, &held).await;
                            }
                        }
                    }
                }
            }
        });
        Ok(Self { addr, task })
    }
}

/// Forwards `held` with GSO, in as few system calls as the socket allows.
async fn relay_send(
    socket: &tokio::net::UdpSocket,
    state: &quinn::udp::UdpSocketState,
    held: &Held,
) {
    let batch = held.stride.max(1) * state.max_gso_segments().max(1);
    for contents in held.data.chunks(batch) {
        let transmit = quinn::udp::Transmit {
            destination: held.to,
            ecn: None,
            contents,
            segment_size: (contents.len() > held.stride).then_some(held.stride),
            src_ip: None,
        };
        loop {
            if socket.writable().await.is_err() {
                return;
            }
            let sent = socket.try_io(Interest::WRITABLE, || state.send(socket.into(), &transmit));
            // quinn-udp reports only "would block"; other errors are logged and dropped.
            if sent.is_ok() {
                break;
            }
        }
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The address to dial for `path` to reach `server`, and the relay to keep alive meanwhile.
fn route(server: SocketAddr, path: Path) -> Result<(SocketAddr, Option<DelayRelay>)> {
    match path {
        Path::Loopback => Ok((server, None)),
        Path::Delayed { rtt } => {
            let relay = DelayRelay::start(server, rtt / 2)?;
            Ok((relay.addr, Some(relay)))
        }
    }
}

/// Starts the clocks, runs `transfer` under the timeout, stops the clocks.
async fn timed<F>(transfer: F) -> Result<Sample>
where
    F: Future<Output = Result<()>>,
{
    let (wall, cpu) = (now(), cpu_time());
    timeout(TRANSFER_TIMEOUT, transfer).await.context("transfer timed out")??;
    Ok(Sample { wall: wall.elapsed(), cpu: cpu_time().saturating_sub(cpu), lost: None })
}

fn check_received(received: u64, bytes: u64) -> Result<()> {
    if received != bytes {
        bail!("received {received} bytes, sent {bytes}");
    }
    Ok(())
}

async fn tcp(bytes: u64) -> Result<Sample> {
    let listener = TcpListener::bind(loopback()).await?;
    let addr = listener.local_addr()?;
    let (sender, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (mut sender, (mut receiver, _)) = (sender?, accepted?);
    timed(async move {
        let send = tokio::spawn(async move {
            let buf = vec![0x5a_u8; BUF];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(BUF as u64) as usize;
                sender.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            sender.shutdown().await?;
            anyhow::Ok(())
        });
        let mut buf = vec![0_u8; BUF];
        let mut received = 0;
        loop {
            let n = receiver.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            received += n as u64;
        }
        send.await??;
        check_received(received, bytes)
    })
    .await
}

/// How the quinn variants move their bytes.
#[derive(Debug, Clone, Copy)]
enum Pattern {
    /// One stream, `write_all` / `read` through buffers (copies, like the TCP and libp2p rows).
    OneStream,
    /// One stream per 64 KiB piece.
    StreamPerPiece,
    /// One stream, `write_chunk` of shared `Bytes` and `read_chunk` (quinn's no-copy API).
    ZeroCopy,
}

async fn quinn(
    bytes: u64,
    config: TransportConfig,
    pattern: Pattern,
    path: Path,
) -> Result<Sample> {
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let sender_end = Endpoint::bind(loopback(), &a, &config)?;
    let receiver_end = Endpoint::bind(loopback(), &b, &config)?;
    let (addr, _relay) = route(receiver_end.local_addr()?, path)?;
    let (dialed, accepted) =
        tokio::join!(sender_end.connect(addr, receiver_end.local_peer_id()), async {
            let incoming = receiver_end.accept().await.context("endpoint closed")?;
            anyhow::Ok(incoming.accept().await?)
        });
    let (sender, receiver) = timeout(SETUP_TIMEOUT, async { anyhow::Ok((dialed?, accepted?)) })
        .await
        .context("setup timed out")??;

    let stats = sender.clone();
    let sample = match pattern {
        Pattern::OneStream => timed(quinn_one_stream(sender, receiver, bytes)).await,
        Pattern::StreamPerPiece => timed(quinn_pieces(sender, receiver, bytes)).await,
        Pattern::ZeroCopy => timed(quinn_zero_copy(sender, receiver, bytes)).await,
    };
    let lost = stats.quic().stats().path.lost_packets;
    sender_end.close().await;
    receiver_end.close().await;
    Ok(Sample { lost: Some(lost), ..sample? })
}

async fn quinn_one_stream(
    sender: transport::Connection,
    receiver: transport::Connection,
    bytes: u64,
) -> Result<()> {
    let send = tokio::spawn(async move {
        let mut stream = sender.open_uni().await?;
        let buf = vec![0x5a_u8; BUF];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(BUF as u64) as usize;
            stream.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        stream.finish()?;
        // Keep the connection until the receiver has everything.
        stream.stopped().await?;
        anyhow::Ok(())
    });
    let mut stream = receiver.accept_uni().await?;
    let mut buf = vec![0_u8; BUF];
    let mut received = 0;
    while let Some(n) = stream.read(&mut buf).await? {
        received += n as u64;
    }
    drop(stream);
    send.await??;
    check_received(received, bytes)
}

async fn quinn_zero_copy(
    sender: transport::Connection,
    receiver: transport::Connection,
    bytes: u64,
) -> Result<()> {
    let send = tokio::spawn(async move {
        let mut stream = sender.open_uni().await?;
        let buf = Bytes::from(vec![0x5a_u8; BUF]);
        let mut left = bytes;
        while left > 0 {
            let n = left.min(BUF as u64) as usize;
            stream.write_chunk(buf.slice(..n)).await?;
            left -= n as u64;
        }
        stream.finish()?;
        stream.stopped().await?;
        anyhow::Ok(())
    });
    let mut stream = receiver.accept_uni().await?;
    let mut received = 0;
    while let Some(chunk) = stream.read_chunk(usize::MAX, true).await? {
        received += chunk.bytes.len() as u64;
    }
    drop(stream);
    send.await??;
    check_received(received, bytes)
}

/// One unidirectional stream per 64 KiB piece; the stream limit bounds the pieces in flight.
async fn quinn_pieces(
    sender: transport::Connection,
    receiver: transport::Connection,
    bytes: u64,
) -> Result<()> {
    let count = bytes.div_ceil(PIECE as u64);
    let send = tokio::spawn(async move {
        let piece = vec![0x5a_u8; PIECE];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(PIECE as u64) as usize;
            let mut stream = sender.open_uni().await?;
            stream.write_all(&piece[..n]).await?;
            stream.finish()?;
            left -= n as u64;
        }
        // Keep the connection until the receiver has everything.
        sender.closed().await;
        anyhow::Ok(())
    });
    let mut readers = JoinSet::new();
    let mut received = 0;
    for _ in 0..count {
        let mut stream = receiver.accept_uni().await?;
        readers.spawn(async move {
            let mut buf = vec![0_u8; PIECE];
            let mut got = 0_u64;
            while let Some(n) = stream.read(&mut buf).await? {
                got += n as u64;
            }
            anyhow::Ok(got)
        });
        while let Some(done) = readers.try_join_next() {
            received += done??;
        }
    }
    while let Some(done) = readers.join_next().await {
        received += done??;
    }
    receiver.close(0, b"done");
    send.await??;
    check_received(received, bytes)
}

/// libp2p's QUIC transport with its default `libp2p_quic::Config`, in a swarm whose only
/// behaviour is `libp2p-stream`; the stream is a multistream-select-negotiated QUIC stream.
async fn libp2p_quic(bytes: u64, path: Path) -> Result<Sample> {
    let mut receiver_swarm = swarm(Keypair::generate_ed25519())?;
    let mut sender_swarm = swarm(Keypair::generate_ed25519())?;
    let receiver_id = *receiver_swarm.local_peer_id();
    let mut incoming = receiver_swarm.behaviour().new_control().accept(PROTOCOL)?;
    let mut control = sender_swarm.behaviour().new_control();

    receiver_swarm.listen_on("/ip4/127.0.0.1/udp/0/quic-v1".parse::<Multiaddr>()?)?;
    let listen_addr = timeout(SETUP_TIMEOUT, async {
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } =
                receiver_swarm.select_next_some().await
            {
                return address;
            }
        }
    })
    .await
    .context("listen timed out")?;
    let receiver_task = tokio::spawn(async move {
        loop {
            receiver_swarm.select_next_some().await;
        }
    });
    let listen_socket = multiaddr_to_socket(&listen_addr)?;
    let (dial_socket, _relay) = route(listen_socket, path)?;
    let dial_addr = Multiaddr::from(dial_socket.ip())
        .with(Protocol::Udp(dial_socket.port()))
        .with(Protocol::QuicV1)
        .with(Protocol::P2p(receiver_id));
    sender_swarm.dial(dial_addr)?;
    timeout(SETUP_TIMEOUT, async {
        loop {
            match sender_swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { .. } => return Ok(()),
                SwarmEvent::OutgoingConnectionError { error, .. } => return Err(error),
                _ => {}
            }
        }
    })
    .await
    .context("dial timed out")??;
    let sender_task = tokio::spawn(async move {
        loop {
            sender_swarm.select_next_some().await;
        }
    });

    let mut stream = timeout(SETUP_TIMEOUT, control.open_stream(receiver_id, PROTOCOL))
        .await
        .context("open_stream timed out")??;
    let sample = timed(async move {
        let send = tokio::spawn(async move {
            let buf = vec![0x5a_u8; BUF];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(BUF as u64) as usize;
                stream.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            stream.close().await?;
            anyhow::Ok(stream)
        });
        let (_, mut inbound) = incoming.next().await.context("no inbound stream")?;
        let mut buf = vec![0_u8; BUF];
        let mut received = 0;
        loop {
            let n = inbound.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            received += n as u64;
        }
        drop(send.await??);
        check_received(received, bytes)
    })
    .await;
    receiver_task.abort();
    sender_task.abort();
    sample
}

/// The UDP socket address of a `/ip4/A/udp/P/quic-v1` listen address.
fn multiaddr_to_socket(addr: &Multiaddr) -> Result<SocketAddr> {
    let mut ip = None;
    let mut port = None;
    for protocol in addr {
        match protocol {
            Protocol::Ip4(found) => ip = Some(found),
            Protocol::Udp(found) => port = Some(found),
            _ => {}
        }
    }
    match (ip, port) {
        (Some(ip), Some(port)) => Ok(SocketAddr::from((ip, port))),
        _ => bail!("listen address {addr} is not /ip4/../udp/.."),
    }
}

fn swarm(keypair: Keypair) -> Result<libp2p::Swarm<libp2p_stream::Behaviour>> {
    Ok(SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())?
        .with_swarm_config(|config| config.with_idle_connection_timeout(Duration::from_secs(60)))
        .build())
}
