//! Executes collective engines over each peer's link — TCP, or for a rank on
//! the same machine a shared-memory ring pair (`shm`) carrying the very same
//! frames — with a single-threaded progress loop: nonblocking links, bytes
//! moved straight between the links and the caller's buffer (received frames
//! are reduced piece by piece from a small scratch buffer, or copied straight
//! in). A [`Link`] reads and writes like a nonblocking socket ("would block"
//! included), so sending, receiving, staging, crc and error naming are one
//! code path for both transports.
//!
//! One thread, no hand-offs: on a 2-core machine every cross-thread wake-up
//! per segment costs more than the segment's bytes.
//!
//! When nothing moves, the loop yields for `SPIN_BEFORE_SLEEP_US`, then sleeps
//! (at once, after `LONG_GAPS_BEFORE_NO_SPIN` gaps in a row longer than the spin):
//! - all peers on shared memory: in a futex on this rank's bell word of each
//!   segment (`FUTEX_WAIT`, or `futex_waitv` for several), which the peer bumps
//!   only if we declared ourselves asleep, so a busy pair makes no syscalls.
//!   The sleep lasts at most `LIVENESS_CHECK_MS`; at most that often the pairs'
//!   TCP streams (open beside the rings, carrying no frames) are read, without
//!   blocking, for EOF: a killed peer is noticed within that, not at the deadline.
//! - any peer on TCP: in `poll(2)` on every stream. Shared-memory peers then
//!   wake us with a doorbell byte on their TCP stream instead of the futex (our
//!   bell says which), so we never sleep in a futex while a socket has data, nor
//!   in poll while a ring does.
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
use crate::shm;

/// How long the progress loop keeps trying the links (yielding) before it sleeps.
const SPIN_BEFORE_SLEEP_US: u64 = 30;
/// Gaps in a row longer than the spin after which the loop stops spinning (until a short one).
const LONG_GAPS_BEFORE_NO_SPIN: u32 = 4;
/// The longest a futex sleep lasts before the shared-memory peers' TCP streams are
/// checked for EOF: how late a killed co-located peer may be noticed.
const LIVENESS_CHECK_MS: u64 = 10;
/// Doorbell bytes drained per read from a shared-memory peer's TCP stream.
const DOORBELL_DRAIN_BYTES: usize = 64;
/// Elements reduced per read on the receive path: fits in L2 beside the destination.
const REDUCE_PIECE_ELEMS: usize = 16 * 1024;

/// A frame being written.
struct Outgoing {
    tag: Tag,
    /// Made when the frame reaches the head of the queue, not when it is issued: the
    /// payload crc is then computed just before the bytes go out, instead of for every
    /// queued segment before the first one moves.
    header: Option<[u8; HEADER_BYTES]>,
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

/// One peer's connection as the mesh made it: the authenticated TCP stream, and
/// beside it the shared-memory endpoint when the two ranks are co-located.
pub struct Connection {
    pub stream: TcpStream,
    pub shm: Option<shm::Endpoint>,
}

impl From<TcpStream> for Connection {
    fn from(stream: TcpStream) -> Self {
        Self { stream, shm: None }
    }
}

/// How frames travel to and from one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Tcp,
    Shm,
}

impl LinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Tcp => "tcp",
            LinkKind::Shm => "shm",
        }
    }
}

/// A peer's link, with the nonblocking semantics of a socket: `Ok(0)` is the end
/// of the stream, `WouldBlock` means try again after a wait.
enum Link {
    Tcp(TcpStream),
    Shm(ShmLink),
}

struct ShmLink {
    ep: shm::Endpoint,
    /// The pair's TCP stream: carries no frames; its EOF tells that the peer has
    /// gone, and a byte on it wakes us from poll(2).
    stream: TcpStream,
    /// The stream has ended: once the ring is drained, reads see the end of the stream.
    gone: bool,
}

impl Link {
    fn stream(&self) -> &TcpStream {
        match self {
            Link::Tcp(s) => s,
            Link::Shm(l) => &l.stream,
        }
    }

    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => s.read(dst),
            Link::Shm(l) => match l.ep.read(dst)? {
                0 if l.gone => Ok(0),
                0 => Err(io::ErrorKind::WouldBlock.into()),
                n => {
                    l.woke();
                    Ok(n)
                }
            },
        }
    }

    /// Writes from `bufs` in order, as much as the link takes.
    fn write(&mut self, bufs: &[&[u8]]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => match bufs {
                [one] => s.write(one),
                [a, b] => s.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]),
                _ => s.write_vectored(&bufs.iter().map(|b| IoSlice::new(b)).collect::<Vec<_>>()),
            },
            Link::Shm(l) if l.gone => Ok(0),
            Link::Shm(l) => match l.ep.write(bufs)? {
                0 => Err(io::ErrorKind::WouldBlock.into()),
                n => {
                    l.woke();
                    Ok(n)
                }
            },
        }
    }

    fn transport(&self) -> LinkKind {
        match self {
            Link::Tcp(_) => LinkKind::Tcp,
            Link::Shm(_) => LinkKind::Shm,
        }
    }
}

impl ShmLink {
    /// After moving bytes: wakes the peer if it sleeps.
    fn woke(&self) {
        if self.ep.notify() == shm::Wake::Doorbell {
            // The peer sleeps in poll(2) on this stream. A full socket buffer already
            // holds doorbell bytes, and a broken stream is seen by its own EOF check.
            let _ = (&self.stream).write(&[0]);
        }
    }

    /// Adds up to `elems_max` f32s of the frame being read into `dst` straight from the ring
    /// (appending them to `crc` when given); returns the bytes consumed, as `read` would.
    fn reduce_into(&mut self, dst: &mut [f32], elems_max: usize, crc: Option<&mut u32>) -> io::Result<usize> {
        let bytes = self.ep.peek(dst.len().min(elems_max) * 4)?;
        let whole = bytes.len() / 4;
        if whole == 0 {
            return if self.gone {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let b = &bytes[..whole * 4];
        if !b.as_ptr().cast::<f32>().is_aligned() {
            // Payloads start 4-aligned in the ring (see `shm`): only a corrupt stream lands here.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "misaligned payload in the ring",
            ));
        }
        if let Some(c) = crc {
            *c = wire::payload_crc_append(*c, b);
        }
        // SAFETY: `b` is `whole` f32s long and aligned for f32 (checked above); every bit pattern
        // is an f32; the producer does not write these bytes before we consume them.
        let src = unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<f32>(), whole) };
        add_into(&mut dst[..whole], src);
        self.ep.consume(whole * 4);
        self.woke();
        Ok(whole * 4)
    }

    /// Reads what the TCP stream holds (doorbell bytes, or the end of the stream).
    fn drain(&mut self) {
        let mut b = [0u8; DOORBELL_DRAIN_BYTES];
        loop {
            match (&self.stream).read(&mut b) {
                Ok(0) => {
                    self.gone = true;
                    return;
                }
                Ok(n) if n < b.len() => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.gone = true;
                    return;
                }
            }
        }
    }
}

/// How the progress loop sleeps when nothing moves (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sleep {
    Poll,
    Futex,
}

struct Peer {
    link: Link,
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
    sleep: Sleep,
    /// When the shared-memory peers' streams were last checked for EOF.
    liveness_checked: Instant,
}

impl Comm {
    /// Takes one authenticated connection (a [`Connection`] or a bare `TcpStream`)
    /// per peer (`None` at our own rank).
    pub fn new<C: Into<Connection>>(
        rank: u32,
        conns: Vec<Option<C>>,
        cfg: CollectiveConfig,
        timeout_ms: u64,
        tensor_crc: bool,
    ) -> Result<Self, JobError> {
        let world = conns.len() as u32;
        let mut peers = Vec::with_capacity(conns.len());
        for c in conns {
            peers.push(match c.map(Into::into) {
                None => None,
                Some(Connection { stream, shm }) => {
                    net::tune_data_stream(&stream)?;
                    stream
                        .set_nonblocking(true)
                        .map_err(|e| JobError::io("nonblocking peer stream", e))?;
                    let link = match shm {
                        None => Link::Tcp(stream),
                        Some(ep) => Link::Shm(ShmLink {
                            ep,
                            stream,
                            gone: false,
                        }),
                    };
                    Some(Peer {
                        link,
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
        let links = || peers.iter().flatten().map(|p| p.link.transport());
        let all_shm = links().count() > 0 && links().all(|t| t == LinkKind::Shm);
        Ok(Self {
            rank,
            world,
            cfg,
            timeout_ms,
            next_op: 0,
            poisoned: None,
            piece: vec![0.0; REDUCE_PIECE_ELEMS],
            tensor_crc,
            sleep: if all_shm && links().count() <= shm::FUTEX_WAITV_MAX {
                Sleep::Futex
            } else {
                Sleep::Poll
            },
            liveness_checked: Instant::now(),
            peers,
        })
    }

    /// Each peer's transport, by rank (`None` at our own rank).
    pub fn transports(&self) -> Vec<Option<LinkKind>> {
        self.peers
            .iter()
            .map(|p| p.as_ref().map(|p| p.link.transport()))
            .collect()
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    pub fn world(&self) -> u32 {
        self.world
    }

    /// Sets how long each collective waits for a peer; returns the previous
    /// deadline. For a wait that is not a training step's (the first one,
    /// while the workers finish reading their data).
    pub fn set_timeout_ms(&mut self, timeout_ms: u64) -> u64 {
        std::mem::replace(&mut self.timeout_ms, timeout_ms)
    }

    /// All-reduce (sum) of `buf`, choosing the algorithm by size.
    pub fn all_reduce(&mut self, buf: &mut [f32], step: u64, what: &str) -> Result<(), JobError> {
        let alg = self.cfg.all_reduce_algorithm(buf.len() * 4, self.world);
        self.run(Kind::AllReduce(alg), buf, step, what)
    }

    /// Copies `root`'s `buf` to every rank, choosing the algorithm by size.
    pub fn broadcast(&mut self, buf: &mut [f32], root: u32, step: u64, what: &str) -> Result<(), JobError> {
        let algorithm = self.cfg.broadcast_algorithm(buf.len() * 4, self.world);
        self.run(Kind::Broadcast { root, algorithm }, buf, step, what)
    }

    /// Handles on every peer's TCP stream (shared-memory links included: their
    /// stream tells liveness). Shutting one down fails the collective that waits on it.
    pub fn stream_handles(&self) -> Vec<TcpStream> {
        self.peers
            .iter()
            .flatten()
            .filter_map(|p| p.link.stream().try_clone().ok())
            .collect()
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
                let _ = p.link.stream().shutdown(Shutdown::Both);
            }
        }
        r
    }

    fn drive(&mut self, engine: &mut Collective, buf: &mut [f32], deadline: Instant) -> Result<(), Failure> {
        let mut events: Vec<Event> = Vec::new();
        let mut done = false;
        // Since when nothing has moved; kept across sleeps, so that it measures the whole gap.
        let mut idle_since: Option<Instant> = None;
        // Gaps in a row that outlasted the spin: from `LONG_GAPS_BEFORE_NO_SPIN`, sleep at once.
        let mut long_gaps = 0u32;
        self.issue(engine.start(), buf, &mut done)?;
        loop {
            if done {
                return Ok(());
            }
            let mut progressed = false;
            for i in 0..self.peers.len() {
                let Some(peer) = self.peers[i].as_mut() else { continue };
                let rank = i as u32;
                progressed |= pump_sends(peer, rank, (self.rank, self.tensor_crc), buf, &mut events)?;
                progressed |= pump_recvs(peer, rank, buf, &mut self.piece, self.cfg.segment_elems, &mut events)?;
            }
            for ev in events.drain(..) {
                let cmds = engine.on_event(ev).map_err(Failure::Engine)?;
                self.issue(cmds, buf, &mut done)?;
            }
            let spin_for = Duration::from_micros(SPIN_BEFORE_SLEEP_US);
            if progressed || done {
                if let Some(since) = idle_since.take() {
                    long_gaps = if since.elapsed() < spin_for {
                        0
                    } else {
                        long_gaps.saturating_add(1)
                    };
                }
                continue;
            }
            let now = Instant::now();
            // Spin a little before sleeping: a frame due in microseconds arrives sooner than
            // poll(2) or a futex wakes a sleeping thread. Yielding, not busy-waiting, so that a
            // peer sharing this core (after a wake-up, the scheduler often puts it here) gets
            // to send that frame; measured: busy-waiting even 5 µs doubles the 4 KiB latency.
            // Not after a few gaps in a row that outlasted it: on a slow link, where packets
            // arrive 100 µs apart, every spin runs out, and spinning before each sleep cost 20 ms
            // of CPU per 1 MB all-reduce at 100 Mbit/s (measured 2026-12-06).
            if long_gaps < LONG_GAPS_BEFORE_NO_SPIN && now.duration_since(*idle_since.get_or_insert(now)) < spin_for {
                std::thread::yield_now();
                continue;
            }
            idle_since.get_or_insert(now);
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Err(Failure::Timeout);
            }
            self.wait(left)?;
        }
    }

    /// Queues the engine's commands. A send's header is made when it reaches the head of
    /// its queue (`pump_sends`).
    fn issue(&mut self, cmds: Vec<Command>, buf: &[f32], done: &mut bool) -> Result<(), Failure> {
        let len = buf.len();
        for c in cmds {
            match c {
                Command::Send { peer, tag, range } => {
                    assert!(range.end <= len, "engine range {range:?} outside buffer of {len}");
                    let p = self.peers[peer as usize]
                        .as_mut()
                        .expect("engines never address their own rank");
                    p.sends.push_back(Outgoing {
                        tag,
                        header: None,
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

    /// Sleeps until some link may make progress, or at most `left` (see the module docs).
    fn wait(&mut self, left: Duration) -> Result<(), Failure> {
        match self.sleep {
            Sleep::Futex => self.wait_futex(left),
            Sleep::Poll => self.wait_poll(left),
        }
    }

    /// Every peer is on shared memory: sleeps on our bells, for at most `LIVENESS_CHECK_MS`.
    fn wait_futex(&mut self, left: Duration) -> Result<(), Failure> {
        let now = Instant::now();
        if now.duration_since(self.liveness_checked) >= Duration::from_millis(LIVENESS_CHECK_MS) {
            self.liveness_checked = now;
            if self.check_streams() {
                return Ok(());
            }
        }
        let mut bells: Vec<(&std::sync::atomic::AtomicU32, u32)> = Vec::with_capacity(self.peers.len());
        let mut ready = false;
        for p in self.peers.iter().flatten() {
            if let Link::Shm(l) = &p.link {
                bells.push((l.ep.bell(), l.ep.arm(shm::SLEEP_FUTEX)));
            }
        }
        // Armed, then checked: a peer that moved bytes before seeing our bell armed is seen
        // here; one that moves them after sees it and wakes us.
        for p in self.peers.iter().flatten() {
            ready |= p.may_progress();
        }
        let timeout = left.min(Duration::from_millis(LIVENESS_CHECK_MS));
        let r = match (ready, &bells[..]) {
            (true, _) => Ok(()),
            (false, [(word, seen)]) => shm::futex_wait(word, *seen, timeout),
            (false, _) => shm::futex_waitv(&bells, timeout),
        };
        for p in self.peers.iter().flatten() {
            if let Link::Shm(l) = &p.link {
                l.ep.disarm();
            }
        }
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                tracing::debug!(rank = self.rank, "no futex_waitv (Linux < 5.16); sleeping in poll(2)");
                self.sleep = Sleep::Poll;
                Ok(())
            }
            Err(e) => Err(Failure::Peer(self.rank, format!("futex: {e}"))),
        }
    }

    /// Polls the shared-memory peers' streams without waiting: drains doorbell bytes and
    /// notes an ended stream. Returns whether some peer has gone.
    fn check_streams(&mut self) -> bool {
        let mut gone = false;
        for p in self.peers.iter_mut().flatten() {
            if let Link::Shm(l) = &mut p.link
                && !l.gone
            {
                l.drain();
                gone |= l.gone;
            }
        }
        gone
    }

    /// Some peer is on TCP: sleeps in poll(2) on every stream; shared-memory peers ring a
    /// doorbell byte on theirs.
    fn wait_poll(&mut self, left: Duration) -> Result<(), Failure> {
        let mut ready = false;
        for p in self.peers.iter().flatten() {
            if let Link::Shm(l) = &p.link {
                l.ep.arm(shm::SLEEP_POLL);
            }
        }
        for p in self.peers.iter().flatten() {
            ready |= p.may_progress();
        }
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.peers.len());
        for p in self.peers.iter().flatten() {
            let (fd, events) = match &p.link {
                Link::Tcp(s) => {
                    let mut events = if p.incoming.closed { 0 } else { libc::POLLIN };
                    if !p.sends.is_empty() {
                        events |= libc::POLLOUT;
                    }
                    (s.as_raw_fd(), events)
                }
                // An ended stream stays readable: leave it out (fd -1), or poll returns at once.
                Link::Shm(l) if l.gone => (-1, 0),
                Link::Shm(l) => (l.stream.as_raw_fd(), libc::POLLIN),
            };
            fds.push(libc::pollfd { fd, events, revents: 0 });
        }
        let ms = if ready {
            0
        } else {
            left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int
        };
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        let polled = if rc < 0 { Some(io::Error::last_os_error()) } else { None };
        for (p, fd) in self.peers.iter_mut().flatten().zip(&fds) {
            if let Link::Shm(l) = &mut p.link {
                l.ep.disarm();
                if fd.revents != 0 {
                    l.drain();
                }
            }
        }
        match polled {
            Some(e) if e.kind() != io::ErrorKind::Interrupted => Err(Failure::Peer(self.rank, format!("poll: {e}"))),
            _ => Ok(()),
        }
    }
}

impl Peer {
    /// Whether a shared-memory link has bytes for us, or room for a send we have queued:
    /// checked after arming a sleep, so a peer that moved bytes meanwhile is not slept through.
    fn may_progress(&self) -> bool {
        match &self.link {
            Link::Tcp(_) => false,
            Link::Shm(l) => l.ep.readable() || (!self.sends.is_empty() && l.ep.writable()),
        }
    }
}

enum Failure {
    Peer(u32, String),
    Timeout,
    Engine(collective::CollectiveError),
}

/// Writes as much of the peer's send queue as the link takes. `me` is our rank and
/// whether payloads carry a crc.
fn pump_sends(
    peer: &mut Peer,
    rank: u32,
    (me, tensor_crc): (u32, bool),
    buf: &[f32],
    events: &mut Vec<Event>,
) -> Result<bool, Failure> {
    let mut progressed = false;
    while let Some(out) = peer.sends.front_mut() {
        let payload = net::as_bytes(&buf[out.range.clone()]);
        let total = HEADER_BYTES + payload.len();
        // The engine does not write a range it is sending until `Sent`, so the header
        // (with the payload crc) may be made now rather than when the send was issued.
        let header = match out.header {
            Some(h) => h,
            None => {
                let h = if tensor_crc {
                    FrameHeader::tensor(out.tag.to_u64(), me, payload)
                } else {
                    FrameHeader::tensor_unchecked(out.tag.to_u64(), me, payload.len())
                }
                .map_err(|e| Failure::Peer(rank, format!("framing a send: {e}")))?
                .encode();
                *out.header.insert(h)
            }
        };
        while out.done < total {
            let r = if out.done < HEADER_BYTES {
                peer.link.write(&[&header[out.done..], payload])
            } else {
                peer.link.write(&[&payload[out.done - HEADER_BYTES..]])
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
                    peer.link.read(&mut inc.header[inc.header_done..]),
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
                    peer.link.read(&mut dst[inc.payload_done..])
                }
                Into_::Posted {
                    range,
                    op: RecvOp::Copy,
                    ..
                } => {
                    let dst = net::as_bytes_mut(&mut buf[range.clone()]);
                    peer.link.read(&mut dst[inc.payload_done..])
                }
                Into_::Posted {
                    range,
                    op: RecvOp::Reduce,
                    ..
                } if inc.payload_done.is_multiple_of(4)
                    && let Link::Shm(l) = &mut peer.link =>
                {
                    // Shared memory: add straight out of the ring, no copy into the piece.
                    let dst = &mut buf[range.start + inc.payload_done / 4..range.end];
                    let crc = h.payload_checked().then_some(&mut inc.crc);
                    l.reduce_into(dst, piece.len(), crc)
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
                    match peer.link.read(&mut piece_bytes[off..]) {
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
    /// The link would block: wait.
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
            let _ = p.link.stream().shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A full mesh of loopback connections between `n` ranks (no handshake: that is `net`'s job);
    /// the pairs for which `shm` gives a ring size also get a shared-memory link.
    fn mesh(n: usize, shm: impl Fn(usize, usize) -> Option<usize>) -> Vec<Vec<Option<Connection>>> {
        let mut m: Vec<Vec<Option<Connection>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for (i, j) in (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))) {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
            let (b, _) = l.accept().expect("accept");
            let (ea, eb) = match shm(i, j) {
                Some(ring_bytes) => {
                    let (x, y) = shm::Endpoint::pair(ring_bytes).expect("shared memory");
                    (Some(x), Some(y))
                }
                None => (None, None),
            };
            m[i][j] = Some(Connection { stream: a, shm: ea });
            m[j][i] = Some(Connection { stream: b, shm: eb });
        }
        m
    }

    fn comms_over(
        n: usize,
        segment_elems: usize,
        timeout_ms: u64,
        crc: bool,
        shm: impl Fn(usize, usize) -> Option<usize>,
    ) -> Vec<Comm> {
        let cfg = CollectiveConfig {
            segment_elems,
            ..CollectiveConfig::default()
        };
        mesh(n, shm)
            .into_iter()
            .enumerate()
            .map(|(r, s)| Comm::new(r as u32, s, cfg.clone(), timeout_ms, crc).expect("comm"))
            .collect()
    }

    fn comms(n: usize, segment_elems: usize, timeout_ms: u64, crc: bool) -> Vec<Comm> {
        comms_over(n, segment_elems, timeout_ms, crc, |_, _| None)
    }

    /// Runs two all-reduces on every rank in its own thread and checks the sums.
    fn assert_all_reduce_sums(cs: Vec<Comm>, len: usize, what: &str) {
        let n = cs.len();
        let handles: Vec<_> = cs
            .into_iter()
            .map(|mut c| {
                let what = what.to_string();
                std::thread::spawn(move || {
                    let r = c.rank();
                    let mut buf: Vec<f32> = (0..len).map(|i| ((i % 13) as u32 * (r + 1)) as f32).collect();
                    // Two ops back to back: the second must not see frames of the first.
                    c.all_reduce(&mut buf, 0, "test")
                        .unwrap_or_else(|e| panic!("{what}: first all-reduce: {e}"));
                    c.all_reduce(&mut buf, 1, "test")
                        .unwrap_or_else(|e| panic!("{what}: second all-reduce: {e}"));
                    buf
                })
            })
            .collect();
        let sum_ranks: u32 = (1..=n as u32).sum();
        for h in handles {
            let buf = h.join().expect("rank thread");
            for (i, v) in buf.iter().enumerate() {
                let once = ((i % 13) as u32 * sum_ranks) as f32;
                assert_eq!(*v, once * n as f32, "{what}: index {i}");
            }
        }
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
            let cs = comms(n, seg, 10_000, crc);
            assert_all_reduce_sums(cs, len, &format!("tcp n {n} len {len} seg {seg}"));
        }
    }

    #[test]
    fn all_reduce_over_shared_memory_equals_the_sequential_sum() {
        // Rings smaller than a frame (256 bytes against 16 KiB segments) stream frames through
        // in pieces and wrap at every offset; the default ring is the production case.
        for (n, len, seg, crc, ring) in [
            (2, 1, 64, true, 256),
            (2, 100_003, 4096, false, 256),
            (2, 1 << 20, collective::SEGMENT_ELEMS_DEFAULT, true, shm::RING_BYTES),
            (3, 70_001, 1000, true, 4096),
            (4, 5000, 256, false, 1024),
            (4, 9, 64, true, 64),
        ] {
            let cs = comms_over(n, seg, 10_000, crc, |_, _| Some(ring));
            for c in &cs {
                assert!(c.transports().iter().flatten().all(|t| *t == LinkKind::Shm));
                assert_eq!(c.sleep, Sleep::Futex);
            }
            assert_all_reduce_sums(cs, len, &format!("shm n {n} len {len} seg {seg} ring {ring}"));
        }
    }

    #[test]
    fn all_reduce_over_mixed_links_equals_the_sequential_sum() {
        // Ranks 0 and 1 share memory, every other pair talks TCP: both kinds in one loop,
        // sleeping in poll(2) with shared-memory peers ringing doorbells.
        for (n, len, seg) in [(3, 70_001, 1000), (4, 300_000, 4096)] {
            let cs = comms_over(n, seg, 10_000, true, |i, j| (i == 0 && j == 1).then_some(1024));
            assert_eq!(cs[0].transports()[1], Some(LinkKind::Shm));
            assert_eq!(cs[0].transports()[2], Some(LinkKind::Tcp));
            assert_eq!(cs[0].sleep, Sleep::Poll);
            assert_all_reduce_sums(cs, len, &format!("mixed n {n} len {len}"));
        }
    }

    #[test]
    fn a_rank_that_arrives_late_wakes_its_sleeping_peer() {
        for mixed in [false, true] {
            let mut cs = comms_over(3, 4096, 10_000, true, |i, j| {
                (!mixed || (i, j) == (0, 1)).then_some(4096)
            });
            let late = cs.pop().expect("rank 2");
            let handles: Vec<_> = cs
                .into_iter()
                .map(|mut c| {
                    std::thread::spawn(move || {
                        let mut buf = vec![1.0f32; 100_000];
                        c.all_reduce(&mut buf, 0, "test").expect("all-reduce");
                        buf
                    })
                })
                .collect();
            // Not synchronisation: the result is the same whether or not the others were
            // asleep by the time rank 2 starts; the pause only makes it likely that they were.
            std::thread::sleep(Duration::from_millis(50));
            let mut c = late;
            let mut buf = vec![1.0f32; 100_000];
            c.all_reduce(&mut buf, 0, "test").expect("all-reduce");
            assert!(buf.iter().all(|v| *v == 3.0));
            for h in handles {
                assert!(h.join().expect("rank").iter().all(|v| *v == 3.0), "mixed {mixed}");
            }
        }
    }

    /// Copies `from` to `to` at most `chunk` bytes per `every`, as a slow link carries them,
    /// until either end closes.
    fn pace(mut from: TcpStream, mut to: TcpStream, chunk: usize, every: Duration) {
        let mut bytes = vec![0u8; chunk];
        loop {
            match from.read(&mut bytes) {
                Ok(0) | Err(_) => return,
                Ok(n) if to.write_all(&bytes[..n]).is_err() => return,
                Ok(_) => std::thread::sleep(every), // the link's rate, not synchronisation
            }
        }
    }

    #[test]
    fn waiting_on_a_slow_link_costs_little_cpu() {
        // Two ranks through a relay that passes 1,448 bytes every 150 µs each way (77 Mbit/s,
        // one packet at a time, as a shaped link delivers them): nearly every gap outlasts the
        // spin. Spinning before each sleep cost 32-39 µs of CPU per gap (2026-12-06); sleeping
        // at once, the wake-ups cost 9-12 µs each.
        const CHUNK: usize = 1448;
        let every = Duration::from_micros(150);
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let end = |l: &TcpListener| {
            let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
            let (b, _) = l.accept().expect("accept");
            a.set_nodelay(true).expect("nodelay");
            b.set_nodelay(true).expect("nodelay");
            (a, b)
        };
        let ((r0, relay0), (r1, relay1)) = (end(&l), end(&l));
        for (from, to) in [(&relay0, &relay1), (&relay1, &relay0)] {
            let (from, to) = (from.try_clone().expect("clone"), to.try_clone().expect("clone"));
            std::thread::spawn(move || pace(from, to, CHUNK, every));
        }
        let cfg = CollectiveConfig::default();
        let mk = |r: u32, s: TcpStream| {
            let mut m: Vec<Option<Connection>> = vec![None, None];
            m[1 - r as usize] = Some(Connection { stream: s, shm: None });
            Comm::new(r, m, cfg.clone(), 30_000, true).expect("comm")
        };
        let (mut c0, mut c1) = (mk(0, r0), mk(1, r1));
        let len = 64 * 1024;
        let peer = std::thread::spawn(move || {
            let mut buf = vec![1.0f32; len];
            c1.all_reduce(&mut buf, 0, "test").expect("rank 1");
        });
        let cpu = || crate::train::cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID);
        let mut buf = vec![1.0f32; len];
        let before = cpu();
        c0.all_reduce(&mut buf, 0, "test").expect("rank 0");
        let used = cpu() - before;
        peer.join().expect("rank 1 thread");
        assert!(buf.iter().all(|v| *v == 2.0));
        // Rank 0 receives half the buffer (plus frames) in the reduce-scatter and half in the all-gather.
        let gaps = (len * 4).div_ceil(CHUNK) as u32;
        let per_gap = used / gaps;
        assert!(
            per_gap < Duration::from_micros(25),
            "{per_gap:?} of CPU per packet gap ({used:?} over {gaps} gaps)"
        );
        drop((relay0, relay1));
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

    #[test]
    fn a_silent_shared_memory_peer_is_named_after_the_deadline() {
        let mut cs = comms_over(2, 1024, 300, true, |_, _| Some(4096));
        let silent = cs.pop().expect("rank 1");
        let mut c0 = cs.pop().expect("rank 0");
        let started = Instant::now();
        match c0.all_reduce(&mut [1.0; 1000], 7, "gradient all-reduce") {
            Err(JobError::Stalled { rank, step, .. }) => assert_eq!((rank, step), (1, 7)),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(silent);
    }

    #[test]
    fn a_shared_memory_peer_that_goes_away_is_named_long_before_the_deadline() {
        let mut cs = comms_over(2, 1024, 20_000, true, |_, _| Some(4096));
        drop(cs.pop());
        let mut c0 = cs.pop().expect("rank 0");
        let started = Instant::now();
        match c0.all_reduce(&mut [1.0; 100_000], 3, "gradient all-reduce") {
            Err(JobError::Peer { rank: 1, why }) => assert!(why.contains("closed"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }

    #[test]
    fn a_shared_memory_peer_that_dies_mid_frame_is_named_long_before_the_deadline() {
        // A ring that holds all of rank 0's sends, so it is the receive that finds rank 1 gone.
        let mut m = mesh(2, |_, _| Some(shm::RING_BYTES));
        let Connection { stream, shm } = m[1][0].take().expect("rank 1's end");
        let mut c0 = Comm::new(0, m.swap_remove(0), CollectiveConfig::default(), 20_000, true).expect("comm");
        let dying = std::thread::spawn(move || {
            // Part of a frame header, then gone, as a process killed in the middle of a write.
            let mut ep = shm.expect("shared memory");
            let h = FrameHeader::tensor_unchecked(0, 1, 4).expect("header").encode();
            assert_eq!(ep.write(&[&h[..10]]).expect("write"), 10);
            ep.notify();
            drop(stream);
        });
        let started = Instant::now();
        let r = c0.all_reduce(&mut [1.0; 100_000], 3, "gradient all-reduce");
        dying.join().expect("rank 1");
        match r {
            Err(JobError::Peer { rank: 1, why }) => assert!(why.contains("closed mid-frame"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }
}
