//! Executes collective engines over TCP: one sender and one receiver thread
//! per peer move bytes straight between the socket and the caller's buffer,
//! and the calling thread feeds completions back to the engine.
//!
//! **Invariant:** while an operation runs, the peer threads hold raw pointers
//! into the caller's buffer. [`Comm::run`] does not return until every job it
//! handed out has completed or failed, so the pointers never outlive the
//! borrow. On failure the sockets are shut down (which unblocks the threads)
//! and the `Comm` is poisoned: every later operation fails at once.
//! The engine guarantees that outstanding receive ranges are disjoint from
//! each other and from outstanding send ranges (see `collective`'s docs).

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::thread;
use std::time::{Duration, Instant};

use collective::{Collective, CollectiveConfig, Command, Event, Kind, RecvOp};

use crate::error::JobError;
use crate::net;

/// Jobs queued per peer and direction (the engine bounds what is in flight further).
const JOBS_QUEUED_MAX: usize = 256;
/// After a failure, how long the peer threads get to let go of the buffer.
const DRAIN_TIMEOUT_MS: u64 = 3_000;
/// Elements reduced per read on the receive path: fits in L2 beside the destination.
const REDUCE_PIECE_ELEMS: usize = 16 * 1024;

struct SendJob {
    tag: u64,
    ptr: *const f32,
    len: usize,
}

struct RecvJob {
    tag: u64,
    ptr: *mut f32,
    len: usize,
    op: RecvOp,
}

// SAFETY: the pointers refer to the buffer of the `Comm::run` call that issued
// the job, which waits for the job's completion before returning (module invariant).
unsafe impl Send for SendJob {}
unsafe impl Send for RecvJob {}

enum Completion {
    Sent { peer: u32, tag: u64 },
    Received { peer: u32, tag: u64 },
    Failed { peer: u32, why: String },
}

struct Peer {
    send: SyncSender<SendJob>,
    recv: SyncSender<RecvJob>,
    stream: TcpStream,
}

/// A worker's connections to its peers, ready to run collectives.
pub struct Comm {
    rank: u32,
    world: u32,
    peers: Vec<Option<Peer>>,
    done_rx: Receiver<Completion>,
    cfg: CollectiveConfig,
    timeout_ms: u64,
    next_op: u32,
    poisoned: Option<String>,
}

impl Comm {
    /// Takes one authenticated stream per peer (`None` at our own rank).
    pub fn new(rank: u32, streams: Vec<Option<TcpStream>>, cfg: CollectiveConfig, timeout_ms: u64) -> Result<Self, JobError> {
        let world = streams.len() as u32;
        let (done_tx, done_rx) = mpsc::channel();
        let mut peers = Vec::with_capacity(streams.len());
        for (peer, s) in streams.into_iter().enumerate() {
            let Some(s) = s else {
                peers.push(None);
                continue;
            };
            let peer = peer as u32;
            net::tune_data_stream(&s)?;
            let (send_tx, send_rx) = mpsc::sync_channel(JOBS_QUEUED_MAX);
            let (recv_tx, recv_rx) = mpsc::sync_channel(JOBS_QUEUED_MAX);
            let w = s.try_clone().map_err(|e| JobError::io("cloning a peer stream", e))?;
            let r = s.try_clone().map_err(|e| JobError::io("cloning a peer stream", e))?;
            let tx = done_tx.clone();
            thread::Builder::new()
                .name(format!("send-{peer}"))
                .spawn(move || sender(rank, peer, w, send_rx, tx))
                .map_err(|e| JobError::io("spawning a sender thread", e))?;
            let tx = done_tx.clone();
            let max = cfg.segment_elems;
            thread::Builder::new()
                .name(format!("recv-{peer}"))
                .spawn(move || receiver(peer, r, recv_rx, tx, max))
                .map_err(|e| JobError::io("spawning a receiver thread", e))?;
            peers.push(Some(Peer { send: send_tx, recv: recv_tx, stream: s }));
        }
        Ok(Self { rank, world, peers, done_rx, cfg, timeout_ms, next_op: 0, poisoned: None })
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
            return Err(JobError::Peer { rank: self.rank, why: format!("communication already failed: {why}") });
        }
        let op = self.next_op;
        self.next_op = self.next_op.wrapping_add(1);
        let mut engine = Collective::new(kind, op, self.rank, self.world, buf.len(), &self.cfg)?;
        let mut outstanding = 0usize;
        let base = buf.as_mut_ptr();
        let deadline = Instant::now() + Duration::from_millis(self.timeout_ms);
        let mut cmds = engine.start();
        let result = loop {
            let mut done = false;
            for c in cmds.drain(..) {
                match c {
                    Command::Send { peer, tag, range } => {
                        assert!(range.end <= buf.len(), "engine range {range:?} outside buffer of {}", buf.len());
                        // SAFETY: in bounds (asserted); see the module invariant for lifetime.
                        let ptr = unsafe { base.add(range.start) };
                        let job = SendJob { tag: tag.to_u64(), ptr, len: range.len() };
                        if self.peer(peer).send.send(job).is_err() {
                            break;
                        }
                        outstanding += 1;
                    }
                    Command::Recv { peer, tag, range, op } => {
                        assert!(range.end <= buf.len(), "engine range {range:?} outside buffer of {}", buf.len());
                        // SAFETY: as above.
                        let ptr = unsafe { base.add(range.start) };
                        if self.peer(peer).recv.send(RecvJob { tag: tag.to_u64(), ptr, len: range.len(), op }).is_err() {
                            break;
                        }
                        outstanding += 1;
                    }
                    Command::Done => done = true,
                }
            }
            if done {
                assert_eq!(outstanding, 0, "engine finished with jobs outstanding");
                break Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match self.done_rx.recv_timeout(left) {
                Ok(Completion::Sent { peer, tag }) => Event::Sent { peer, tag: issued(tag) },
                Ok(Completion::Received { peer, tag }) => Event::Received { peer, tag: issued(tag) },
                Ok(Completion::Failed { peer, why }) => {
                    outstanding -= 1;
                    break Err(JobError::Peer { rank: peer, why: format!("{what} (op {op}) at step {step}: {why}") });
                }
                Err(RecvTimeoutError::Timeout) => {
                    let rank = engine.waiting_on().first().map_or(self.rank, |(r, _)| *r);
                    break Err(JobError::Stalled { op: what.to_string(), step, rank, waited_ms: self.timeout_ms });
                }
                Err(RecvTimeoutError::Disconnected) => unreachable!("Comm holds a sender of its own channel"),
            };
            outstanding -= 1;
            match engine.on_event(event) {
                Ok(c) => cmds = c,
                Err(e) => break Err(e.into()),
            }
        };
        if let Err(e) = &result {
            self.poison(e.to_string(), outstanding);
        }
        result
    }

    fn peer(&self, rank: u32) -> &Peer {
        self.peers[rank as usize].as_ref().expect("engines never address their own rank")
    }

    /// Shuts every stream down and waits until the peer threads hold no pointer into the buffer.
    fn poison(&mut self, why: String, mut outstanding: usize) {
        self.poisoned = Some(why);
        for p in self.peers.iter().flatten() {
            let _ = p.stream.shutdown(Shutdown::Both);
        }
        let deadline = Instant::now() + Duration::from_millis(DRAIN_TIMEOUT_MS);
        while outstanding > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.done_rx.recv_timeout(left) {
                Ok(_) => outstanding -= 1,
                Err(_) => {
                    // A peer thread still holds a pointer into a buffer we are about to release:
                    // continuing could corrupt memory, so stop the process.
                    tracing::error!(outstanding, "peer threads did not let go of the buffer; aborting");
                    std::process::abort();
                }
            }
        }
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        for p in self.peers.iter().flatten() {
            let _ = p.stream.shutdown(Shutdown::Both);
        }
    }
}

fn sender(rank: u32, peer: u32, mut s: TcpStream, jobs: Receiver<SendJob>, done: Sender<Completion>) {
    let mut failed: Option<String> = None;
    for job in jobs {
        if let Some(why) = &failed {
            let _ = done.send(Completion::Failed { peer, why: why.clone() });
            continue;
        }
        // SAFETY: the module invariant keeps the buffer alive and unwritten in this range until we report.
        let values = unsafe { std::slice::from_raw_parts(job.ptr, job.len) };
        let c = match net::write_tensor(&mut s, job.tag, rank, values) {
            Ok(()) => Completion::Sent { peer, tag: job.tag },
            Err(e) => {
                let why = format!("sending to rank {peer}: {}", describe(&e));
                failed = Some(why.clone());
                Completion::Failed { peer, why }
            }
        };
        if done.send(c).is_err() {
            return;
        }
    }
}

/// Receives frames from one peer. A frame whose job has not been posted yet is
/// read ahead into a staging buffer (the engines need one frame of read-ahead).
fn receiver(peer: u32, mut s: TcpStream, jobs: Receiver<RecvJob>, done: Sender<Completion>, segment_elems: usize) {
    let mut staging: Vec<f32> = Vec::new();
    let mut piece = vec![0f32; REDUCE_PIECE_ELEMS];
    let mut failed: Option<String> = None;
    loop {
        if let Some(why) = &failed {
            // Fail every job still posted, then stop when the Comm goes away.
            match jobs.recv() {
                Ok(_) => {
                    if done.send(Completion::Failed { peer, why: why.clone() }).is_err() {
                        return;
                    }
                    continue;
                }
                Err(_) => return,
            }
        }
        let header = match net::read_header(&mut s) {
            Ok(h) => h,
            Err(e) => {
                // No job may be waiting; a failure is reported when one is posted (or at once if one is).
                failed = Some(format!("receiving from rank {peer}: {}", describe(&e)));
                continue;
            }
        };
        let check = |job: &RecvJob| -> Result<(), String> {
            if header.kind != wire::MessageType::Tensor || header.tag != job.tag || header.payload_bytes as usize != job.len * 4 {
                return Err(format!(
                    "rank {peer} sent a {} frame tagged {} with {} bytes; expected tag {} with {} bytes",
                    header.kind,
                    show_tag(header.tag),
                    header.payload_bytes,
                    show_tag(job.tag),
                    job.len * 4
                ));
            }
            Ok(())
        };
        let (job, result) = match jobs.try_recv() {
            Ok(job) => {
                let r = check(&job).and_then(|()| read_into(&mut s, &header, &job, &mut piece));
                (job, r)
            }
            Err(mpsc::TryRecvError::Disconnected) => return,
            Err(mpsc::TryRecvError::Empty) => {
                let elems = header.payload_bytes as usize / 4;
                if header.kind != wire::MessageType::Tensor || elems > segment_elems {
                    failed = Some(format!("rank {peer} sent an unexpected {} frame of {} bytes", header.kind, header.payload_bytes));
                    continue;
                }
                staging.resize(elems, 0.0);
                let r = s
                    .read_exact(net::as_bytes_mut(&mut staging))
                    .map_err(|e| format!("receiving from rank {peer}: {}", describe(&e)))
                    .and_then(|()| header.check_payload_crc(wire::payload_crc(net::as_bytes(&staging))).map_err(|e| e.to_string()));
                let Ok(job) = jobs.recv() else { return };
                let r = r.and_then(|()| check(&job)).map(|()| apply(&job, &staging));
                (job, r)
            }
        };
        let c = match result {
            Ok(()) => Completion::Received { peer, tag: job.tag },
            Err(why) => {
                failed = Some(why.clone());
                Completion::Failed { peer, why }
            }
        };
        if done.send(c).is_err() {
            return;
        }
    }
}

/// Reads a frame's payload straight into (Copy) or onto (Reduce) the job's range.
fn read_into(s: &mut TcpStream, header: &wire::FrameHeader, job: &RecvJob, piece: &mut [f32]) -> Result<(), String> {
    // SAFETY: the module invariant: this range is ours alone until we report.
    let dst = unsafe { std::slice::from_raw_parts_mut(job.ptr, job.len) };
    let io_err = |e: io::Error| format!("receiving: {}", describe(&e));
    match job.op {
        RecvOp::Copy => {
            s.read_exact(net::as_bytes_mut(dst)).map_err(io_err)?;
            header.check_payload_crc(wire::payload_crc(net::as_bytes(dst))).map_err(|e| e.to_string())
        }
        RecvOp::Reduce => {
            let mut crc = 0;
            for d in dst.chunks_mut(piece.len()) {
                let p = &mut piece[..d.len()];
                s.read_exact(net::as_bytes_mut(p)).map_err(io_err)?;
                crc = wire::payload_crc_append(crc, net::as_bytes(p));
                add_into(d, p);
            }
            // The sum is already in the buffer; a bad crc fails the whole operation (and the job).
            header.check_payload_crc(crc).map_err(|e| e.to_string())
        }
    }
}

fn apply(job: &RecvJob, src: &[f32]) {
    // SAFETY: as in `read_into`.
    let dst = unsafe { std::slice::from_raw_parts_mut(job.ptr, job.len) };
    match job.op {
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

/// A tag this process issued and got back from its own peer thread.
fn issued(bits: u64) -> collective::Tag {
    collective::Tag::from_u64(bits).expect("peer threads echo the tags they were given")
}

fn show_tag(bits: u64) -> String {
    collective::Tag::from_u64(bits).map_or_else(|| format!("{bits:#018x} (invalid)"), |t| t.to_string())
}
