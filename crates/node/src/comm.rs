//! Executes collective engines over TCP with a single-threaded progress loop:
//! nonblocking sockets, `poll(2)`, and bytes moved straight between the
//! sockets and the caller's buffer (received frames are reduced piece by
//! piece from a small scratch buffer, or copied straight in).
//!
//! One thread, no hand-offs: on a 2-core machine every cross-thread wake-up
//! per segment costs more than the segment's bytes.
//!
//! **Invariant:** frames to one peer go out in command order and frames from
//! one peer are matched to `Recv` commands in order (the engines' contract);
//! at most one frame per peer is read ahead into staging before its `Recv` is
//! issued. Every wait is bounded by the collective's deadline, after which
//! the error names the rank the engine is waiting for.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use collective::{Collective, CollectiveConfig, Command, Event, Kind, RecvOp, Tag};
use wire::{FrameHeader, HEADER_BYTES, MessageType};

use crate::error::JobError;
use crate::net;

/// How long the progress loop keeps polling the sockets without sleeping.
const SPIN_BEFORE_POLL_US: u64 = 30;
/// Elements reduced per read on the receive path: fits in L2 beside the destination.
const REDUCE_PIECE_ELEMS: usize = 16 * 1024;

/// A frame being written.
struct Outgoing {
    tag: Tag,
    header: [u8; HEADER_BYTES],
    range: Range<usize>,
    /// Bytes of header + payload already written.
    done: usize,
}

/// Where the frame being read goes.
enum Into_ {
    /// Straight into the buffer (the head `Recv` is posted).
    Posted { tag: Tag, range: Range<usize>, op: RecvOp },
    /// Into staging: no `Recv` was posted yet when the header arrived.
    Staging,
}

/// The receive side of one peer.
struct Incoming {
    header: [u8; HEADER_BYTES],
    header_done: usize,
    /// The decoded header of the frame in progress, with its destination.
    frame: Option<(FrameHeader, Into_)>,
    payload_done: usize,
    crc: u32,
    /// A complete frame read ahead, waiting for its `Recv`.
    staged: Option<FrameHeader>,
    /// The peer closed its side between frames. Not an error until we need a frame from it.
    closed: bool,
    staging: Vec<f32>,
}

struct Peer {
    stream: TcpStream,
    sends: VecDeque<Outgoing>,
    recvs: VecDeque<(Tag, Range<usize>, RecvOp)>,
    incoming: Incoming,
}

/// A worker's connections to its peers, ready to run collectives.
pub struct Comm {
    rank: u32,
    world: u32,
    peers: Vec<Option<Peer>>,
    cfg: CollectiveConfig,
    timeout_ms: u64,
    next_op: u32,
    poisoned: Option<String>,
    piece: Vec<f32>,
    /// Whether tensor payloads carry a crc32c (headers always do).
    tensor_crc: bool,
}

impl Comm {
    /// Takes one authenticated stream per peer (`None` at our own rank).
    pub fn new(
        rank: u32,
        streams: Vec<Option<TcpStream>>,
        cfg: CollectiveConfig,
        timeout_ms: u64,
        tensor_crc: bool,
    ) -> Result<Self, JobError> {
        let world = streams.len() as u32;
        let mut peers = Vec::with_capacity(streams.len());
        for s in streams {
            peers.push(match s {
                None => None,
                Some(s) => {
                    net::tune_data_stream(&s)?;
                    s.set_nonblocking(true)
                        .map_err(|e| JobError::io("nonblocking peer stream", e))?;
                    Some(Peer {
                        stream: s,
                        sends: VecDeque::new(),
                        recvs: VecDeque::new(),
                        incoming: Incoming {
                            header: [0; HEADER_BYTES],
                            header_done: 0,
                            frame: None,
                            payload_done: 0,
                            crc: 0,
                            staged: None,
                            closed: false,
                            staging: Vec::new(),
                        },
                    })
                }
            });
        }
        Ok(Self {
            rank,
            world,
            peers,
            cfg,
            timeout_ms,
            next_op: 0,
            poisoned: None,
            piece: vec![0.0; REDUCE_PIECE_ELEMS],
            tensor_crc,
        })
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    pub fn world(&self) -> u32 {
        self.world
    }

    /// All-reduce (sum) of `buf`, choosing the algorithm by size.
    pub fn all_reduce(&mut self, buf: &mut [f32], step: u64, what: &str) -> Result<(), JobError> {
        let alg = self.cfg.all_reduce_algorithm(buf.len() * 4, self.world);
        self.run(Kind::AllReduce(alg), buf, step, what)
    }

    /// Runs one collective over `buf` (the same `kind` and length on every rank, in the
    /// same order). `step` and `what` only label errors.
    pub fn run(&mut self, kind: Kind, buf: &mut [f32], step: u64, what: &str) -> Result<(), JobError> {
        if let Some(why) = &self.poisoned {
            return Err(JobError::Peer {
                rank: self.rank,
                why: format!("communication already failed: {why}"),
            });
        }
        let op = self.next_op;
        self.next_op = self.next_op.wrapping_add(1);
        let mut engine = Collective::new(kind, op, self.rank, self.world, buf.len(), &self.cfg)?;
        let deadline = Instant::now() + Duration::from_millis(self.timeout_ms);
        let r = self.drive(&mut engine, buf, deadline).map_err(|f| match f {
            Failure::Peer(rank, why) => JobError::Peer {
                rank,
                why: format!("{what} (op {op}) at step {step}: {why}"),
            },
            Failure::Timeout => {
                let rank = engine.waiting_on().first().map_or(self.rank, |(r, _)| *r);
                JobError::Stalled {
                    op: what.to_string(),
                    step,
                    rank,
                    waited_ms: self.timeout_ms,
                }
            }
            Failure::Engine(e) => e.into(),
        });
        if let Err(e) = &r {
            self.poisoned = Some(e.to_string());
            for p in self.peers.iter().flatten() {
                let _ = p.stream.shutdown(Shutdown::Both);
            }
        }
        r
    }

    fn drive(&mut self, engine: &mut Collective, buf: &mut [f32], deadline: Instant) -> Result<(), Failure> {
        let mut events: Vec<Event> = Vec::new();
        let mut done = false;
        let mut idle_since: Option<Instant> = None;
        self.issue(engine.start(), buf, &mut done)?;
        loop {
            if done {
                return Ok(());
            }
            let mut progressed = false;
            for i in 0..self.peers.len() {
                let Some(peer) = self.peers[i].as_mut() else { continue };
                let rank = i as u32;
                progressed |= pump_sends(peer, rank, buf, &mut events)?;
                progressed |= pump_recvs(peer, rank, buf, &mut self.piece, self.cfg.segment_elems, &mut events)?;
            }
            for ev in events.drain(..) {
                let cmds = engine.on_event(ev).map_err(Failure::Engine)?;
                self.issue(cmds, buf, &mut done)?;
            }
            if progressed || done {
                idle_since = None;
                continue;
            }
            let now = Instant::now();
            // Spin a little before sleeping: a frame due in microseconds arrives sooner than
            // poll(2) wakes a sleeping thread. Yielding, not busy-waiting, so that a peer
            // sharing this core gets to send that frame.
            if now.duration_since(*idle_since.get_or_insert(now)) < Duration::from_micros(SPIN_BEFORE_POLL_US) {
                std::thread::yield_now();
                continue;
            }
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Err(Failure::Timeout);
            }
            self.wait(left)?;
            idle_since = None;
        }
    }

    /// Queues the engine's commands. A send's header (with the payload crc) is made
    /// now: the engine issues a send only once its range holds the data to send.
    fn issue(&mut self, cmds: Vec<Command>, buf: &[f32], done: &mut bool) -> Result<(), Failure> {
        let len = buf.len();
        for c in cmds {
            match c {
                Command::Send { peer, tag, range } => {
                    assert!(range.end <= len, "engine range {range:?} outside buffer of {len}");
                    let payload = net::as_bytes(&buf[range.clone()]);
                    let h = if self.tensor_crc {
                        FrameHeader::tensor(tag.to_u64(), self.rank, payload)
                    } else {
                        FrameHeader::tensor_unchecked(tag.to_u64(), self.rank, payload.len())
                    }
                    .map_err(|e| Failure::Peer(peer, format!("framing a send: {e}")))?;
                    let p = self.peers[peer as usize]
                        .as_mut()
                        .expect("engines never address their own rank");
                    p.sends.push_back(Outgoing {
                        tag,
                        header: h.encode(),
                        range,
                        done: 0,
                    });
                }
                Command::Recv { peer, tag, range, op } => {
                    assert!(range.end <= len, "engine range {range:?} outside buffer of {len}");
                    let p = self.peers[peer as usize]
                        .as_mut()
                        .expect("engines never address their own rank");
                    p.recvs.push_back((tag, range, op));
                }
                Command::Done => *done = true,
            }
        }
        Ok(())
    }

    /// Sleeps in poll(2) until some socket can make progress or `left` passes.
    fn wait(&self, left: Duration) -> Result<(), Failure> {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.peers.len());
        for p in self.peers.iter().flatten() {
            let mut events = if p.incoming.closed { 0 } else { libc::POLLIN };
            if !p.sends.is_empty() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd: p.stream.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(Failure::Peer(self.rank, format!("poll: {e}")));
            }
        }
        Ok(())
    }
}

enum Failure {
    Peer(u32, String),
    Timeout,
    Engine(collective::CollectiveError),
}

/// Writes as much of the peer's send queue as the socket takes.
fn pump_sends(peer: &mut Peer, rank: u32, buf: &[f32], events: &mut Vec<Event>) -> Result<bool, Failure> {
    let mut progressed = false;
    while let Some(out) = peer.sends.front_mut() {
        let payload = net::as_bytes(&buf[out.range.clone()]);
        let total = HEADER_BYTES + payload.len();
        while out.done < total {
            let r = if out.done < HEADER_BYTES {
                peer.stream
                    .write_vectored(&[IoSlice::new(&out.header[out.done..]), IoSlice::new(payload)])
            } else {
                peer.stream.write(&payload[out.done - HEADER_BYTES..])
            };
            match moved(r, rank, "sending to")? {
                Io::Moved(n) => {
                    out.done += n;
                    progressed = true;
                }
                Io::Closed => return Err(closed(rank, "sending to", "")),
                Io::Again => return Ok(progressed),
                Io::Retry => {}
            }
        }
        events.push(Event::Sent {
            peer: rank,
            tag: out.tag,
        });
        peer.sends.pop_front();
    }
    Ok(progressed)
}

/// Reads what the socket has: headers, payloads into the buffer or staging,
/// and completes `Recv`s (including one satisfied from staging).
fn pump_recvs(
    peer: &mut Peer,
    rank: u32,
    buf: &mut [f32],
    piece: &mut [f32],
    segment_elems: usize,
    events: &mut Vec<Event>,
) -> Result<bool, Failure> {
    let mut progressed = false;
    loop {
        // A staged frame completes the head Recv as soon as it is posted.
        if let Some(h) = peer.incoming.staged {
            let Some((tag, range, op)) = peer.recvs.pop_front() else {
                return Ok(progressed);
            };
            check_frame(rank, &h, tag, range.len())?;
            let src = &peer.incoming.staging[..range.len()];
            apply(&mut buf[range], src, op);
            peer.incoming.staged = None;
            events.push(Event::Received { peer: rank, tag });
            progressed = true;
            continue;
        }
        let inc = &mut peer.incoming;
        if inc.closed {
            return match peer.recvs.front() {
                Some(_) => Err(closed(rank, "receiving from", "")),
                None => Ok(progressed),
            };
        }
        if inc.frame.is_none() {
            // Read the header.
            while inc.header_done < HEADER_BYTES {
                match moved(
                    peer.stream.read(&mut inc.header[inc.header_done..]),
                    rank,
                    "receiving from",
                )? {
                    Io::Moved(n) => {
                        inc.header_done += n;
                        progressed = true;
                    }
                    // A close between frames is an error only once a frame is expected from this peer.
                    Io::Closed if inc.header_done == 0 => {
                        inc.closed = true;
                        return match peer.recvs.front() {
                            Some(_) => Err(closed(rank, "receiving from", "")),
                            None => Ok(true),
                        };
                    }
                    Io::Closed => return Err(closed(rank, "receiving from", " mid-frame")),
                    Io::Again => return Ok(progressed),
                    Io::Retry => {}
                }
            }
            let h =
                FrameHeader::decode(&inc.header).map_err(|e| Failure::Peer(rank, format!("from rank {rank}: {e}")))?;
            if h.kind != MessageType::Tensor {
                return Err(Failure::Peer(
                    rank,
                    format!("rank {rank} sent a {} frame during a collective", h.kind),
                ));
            }
            let into = match peer.recvs.pop_front() {
                Some((tag, range, op)) => {
                    check_frame(rank, &h, tag, range.len())?;
                    Into_::Posted { tag, range, op }
                }
                None => {
                    let elems = h.payload_bytes as usize / 4;
                    if elems > segment_elems {
                        return Err(Failure::Peer(
                            rank,
                            format!("rank {rank} sent an unexpected frame of {} bytes", h.payload_bytes),
                        ));
                    }
                    inc.staging.resize(elems, 0.0);
                    Into_::Staging
                }
            };
            inc.frame = Some((h, into));
            inc.payload_done = 0;
            inc.crc = 0;
        }
        // Read the payload.
        let (h, into) = inc.frame.as_ref().expect("set above");
        let total = h.payload_bytes as usize;
        while inc.payload_done < total {
            let r = match into {
                Into_::Staging => {
                    let dst = net::as_bytes_mut(&mut inc.staging);
                    peer.stream.read(&mut dst[inc.payload_done..])
                }
                Into_::Posted {
                    range,
                    op: RecvOp::Copy,
                    ..
                } => {
                    let dst = net::as_bytes_mut(&mut buf[range.clone()]);
                    peer.stream.read(&mut dst[inc.payload_done..])
                }
                Into_::Posted {
                    range,
                    op: RecvOp::Reduce,
                    ..
                } => {
                    // Reduce whole f32s only: read into the piece up to a 4-byte boundary.
                    let at = inc.payload_done;
                    let elem0 = at / 4;
                    let n_elems = (range.len() - elem0).min(piece.len());
                    let piece_bytes = net::as_bytes_mut(&mut piece[..n_elems]);
                    let off = at % 4;
                    match peer.stream.read(&mut piece_bytes[off..]) {
                        Ok(n) if n > 0 => {
                            let have = off + n;
                            let whole = have / 4;
                            if h.payload_checked() {
                                inc.crc = wire::payload_crc_append(inc.crc, &piece_bytes[off..off + n]);
                            }
                            let dst = &mut buf[range.start + elem0..range.start + elem0 + whole];
                            add_into(dst, &piece[..whole]);
                            // Keep a partial trailing f32 at the front of the piece for the next read.
                            let rem = have % 4;
                            if rem > 0 {
                                let pb = net::as_bytes_mut(piece);
                                pb.copy_within(whole * 4..whole * 4 + rem, 0);
                            }
                            Ok(n)
                        }
                        other => other,
                    }
                }
            };
            match moved(r, rank, "receiving from")? {
                Io::Moved(n) => {
                    if h.payload_checked() && !matches!(into, Into_::Posted { op: RecvOp::Reduce, .. }) {
                        let dst: &[u8] = match into {
                            Into_::Staging => net::as_bytes(&inc.staging),
                            Into_::Posted { range, .. } => net::as_bytes(&buf[range.clone()]),
                        };
                        inc.crc = wire::payload_crc_append(inc.crc, &dst[inc.payload_done..inc.payload_done + n]);
                    }
                    inc.payload_done += n;
                    progressed = true;
                }
                Io::Closed => return Err(closed(rank, "receiving from", " mid-frame")),
                Io::Again => return Ok(progressed),
                Io::Retry => {}
            }
        }
        h.check_payload_crc(inc.crc)
            .map_err(|e| Failure::Peer(rank, format!("from rank {rank}: {e}")))?;
        let (h, into) = inc.frame.take().expect("set above");
        inc.header_done = 0;
        match into {
            Into_::Posted { tag, .. } => events.push(Event::Received { peer: rank, tag }),
            Into_::Staging => inc.staged = Some(h),
        }
    }
}

/// What one nonblocking read or write did.
enum Io {
    Moved(usize),
    /// The peer closed the connection (a read or write of 0 bytes).
    Closed,
    /// The socket would block: wait in poll(2).
    Again,
    /// Interrupted by a signal: try again at once.
    Retry,
}

fn moved(r: io::Result<usize>, rank: u32, doing: &str) -> Result<Io, Failure> {
    match r {
        Ok(0) => Ok(Io::Closed),
        Ok(n) => Ok(Io::Moved(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Io::Again),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Io::Retry),
        Err(e) => Err(Failure::Peer(rank, format!("{doing} rank {rank}: {}", describe(&e)))),
    }
}

fn closed(rank: u32, doing: &str, when: &str) -> Failure {
    Failure::Peer(rank, format!("{doing} rank {rank}: connection closed{when}"))
}

fn check_frame(rank: u32, h: &FrameHeader, tag: Tag, elems: usize) -> Result<(), Failure> {
    if h.tag != tag.to_u64() || h.payload_bytes as usize != elems * 4 {
        return Err(Failure::Peer(
            rank,
            format!(
                "rank {rank} sent a frame tagged {} with {} bytes; expected tag {tag} with {} bytes",
                show_tag(h.tag),
                h.payload_bytes,
                elems * 4
            ),
        ));
    }
    Ok(())
}

fn apply(dst: &mut [f32], src: &[f32], op: RecvOp) {
    match op {
        RecvOp::Copy => dst.copy_from_slice(src),
        RecvOp::Reduce => add_into(dst, src),
    }
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
            format!("connection closed ({e})")
        }
        _ => e.to_string(),
    }
}

fn show_tag(bits: u64) -> String {
    Tag::from_u64(bits).map_or_else(|| format!("{bits:#018x} (invalid)"), |t| t.to_string())
}

impl Drop for Comm {
    fn drop(&mut self) {
        for p in self.peers.iter().flatten() {
            let _ = p.stream.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A full mesh of loopback connections between `n` ranks (no handshake: that is `net`'s job).
    fn mesh(n: usize) -> Vec<Vec<Option<TcpStream>>> {
        let mut m: Vec<Vec<Option<TcpStream>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for (i, j) in (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))) {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
            let (b, _) = l.accept().expect("accept");
            m[i][j] = Some(a);
            m[j][i] = Some(b);
        }
        m
    }

    fn comms(n: usize, segment_elems: usize, timeout_ms: u64, crc: bool) -> Vec<Comm> {
        let cfg = CollectiveConfig {
            segment_elems,
            ..CollectiveConfig::default()
        };
        mesh(n)
            .into_iter()
            .enumerate()
            .map(|(r, s)| Comm::new(r as u32, s, cfg.clone(), timeout_ms, crc).expect("comm"))
            .collect()
    }

    #[test]
    fn all_reduce_over_tcp_equals_the_sequential_sum() {
        for (n, len, seg, crc) in [
            (2, 1, 64, true),
            (2, 100_003, 4096, false),
            (3, 70_001, 1000, true),
            (4, 5000, 256, true),
            (4, 9, 64, false),
        ] {
            let handles: Vec<_> = comms(n, seg, 10_000, crc)
                .into_iter()
                .map(|mut c| {
                    std::thread::spawn(move || {
                        let r = c.rank();
                        let mut buf: Vec<f32> = (0..len).map(|i| ((i % 13) as u32 * (r + 1)) as f32).collect();
                        // Two ops back to back: the second must not see frames of the first.
                        c.all_reduce(&mut buf, 0, "test")
                            .unwrap_or_else(|e| panic!("n {n} len {len} seg {seg}: first all-reduce: {e}"));
                        c.all_reduce(&mut buf, 1, "test")
                            .unwrap_or_else(|e| panic!("n {n} len {len} seg {seg}: second all-reduce: {e}"));
                        buf
                    })
                })
                .collect();
            let sum_ranks: u32 = (1..=n as u32).sum();
            for h in handles {
                let buf = h.join().expect("rank thread");
                for (i, v) in buf.iter().enumerate() {
                    let once = ((i % 13) as u32 * sum_ranks) as f32;
                    assert_eq!(*v, once * n as f32, "n {n} len {len} index {i}");
                }
            }
        }
    }

    #[test]
    fn a_silent_peer_is_named_after_the_deadline() {
        let mut cs = comms(2, 1024, 300, true);
        let silent = cs.pop().expect("rank 1");
        let mut c0 = cs.pop().expect("rank 0");
        let started = Instant::now();
        let err = c0
            .all_reduce(&mut [1.0; 1000], 7, "gradient all-reduce")
            .expect_err("rank 1 never joins");
        assert!(started.elapsed() < Duration::from_secs(5));
        match err {
            JobError::Stalled { rank, step, .. } => assert_eq!((rank, step), (1, 7)),
            other => panic!("{other}"),
        }
        drop(silent);
        assert!(
            c0.all_reduce(&mut [1.0; 10], 8, "x").is_err(),
            "a failed Comm stays failed"
        );
    }

    #[test]
    fn a_peer_that_goes_away_is_named() {
        let mut cs = comms(2, 1024, 5_000, true);
        drop(cs.pop());
        let mut c0 = cs.pop().expect("rank 0");
        match c0.all_reduce(&mut [1.0; 1000], 3, "gradient all-reduce") {
            Err(JobError::Peer { rank: 1, why }) => assert!(why.contains("closed"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
