//! A worker's side of the parameter server: routes the keys of each batch to
//! their shards, pulls the rows it needs into its local copy of the
//! parameters, and pushes its gradients.
//!
//! The worker keeps a full-size parameter buffer and fills in, before each
//! step, the dense part and the table rows its batch touches; the rest of
//! the buffer is stale and never read. (Limit: a table must fit in one
//! worker's memory; the servers hold only their shards.)
//!
//! Latency hiding: the trainer asks for step k+1's rows before it computes
//! step k ([`PsExchange::pull_start`] then [`PsExchange::pull_finish`]), so the
//! round trip overlaps the compute. Pushes are pipelined too: up to
//! [`PUSH_WINDOW`] unacknowledged pushes per shard.
//!
//! One reader thread per server drains replies into a channel, so neither
//! side can block the other with a full socket buffer. Every wait has the
//! collective deadline and names the shard it waits for.
//!
//! Replicated shards ([`PsExchange::enable_failover`]): the exchange keeps
//! the bytes of every push not yet acknowledged and of the pull in flight.
//! When a shard's connection breaks (or the coordinator promotes its backup)
//! it waits, with a deadline, for the coordinator's `Promote`, connects to
//! the new primary, and resends those pushes (same clocks: the shard applies
//! a push it already has only once) and the pull. What was retried and what
//! was given up is logged with the rank, the role and the step.
//!
//! Compressed pushes with error feedback keep one residual per shard, which
//! is training state: at a checkpoint every worker hands its residuals to the
//! shards that own their elements (a `WorkerState` message after its last
//! push of the step, on the push's own ordered stream), and rank 0, which
//! writes the checkpoint, reads every worker's back from the shards — the
//! workers of a parameter-server job share no collective and no filesystem.
//! The checkpoint holds them per tensor as `rank{r}.{tensor}.ef_residual` in
//! the `compress` group (the names `compress` uses), so a resume on another
//! number of shards re-splits them and one on another number of workers
//! starts the ranks that have none from zero, with a warning.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::net::TcpStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use ps::{Message, Placement, PlacementSpec};
use tensor::{Gradient, Layout, ParamKind};
use wire::msg::{FromCoordinator, PeerHello};
use wire::{FrameHeader, HEADER_BYTES, MessageType, PeerInfo, Role, Secret};

use crate::error::JobError;
use crate::net;
use crate::report::Traffic;
use crate::server::{INIT_CHUNK_VALUES, PsInit, PsReady, write_frame};
use crate::worker::RENDEZVOUS_TIMEOUT_MS;

/// Unacknowledged pushes allowed per shard before a push waits.
pub const PUSH_WINDOW: u64 = 2;
/// Attempts to connect to a promoted primary before giving up.
const RECONNECT_ATTEMPTS_MAX: u32 = 20;
/// Pause between attempts to connect to a promoted primary.
const RECONNECT_BACKOFF_MS: u64 = 20;
/// Compressed pushes without error feedback: the relative error is measured
/// on the pushes of every this many steps (a decode of the worker's own
/// message each), not on all of them.
const ERROR_SAMPLE_EVERY_PUSHES: u64 = 8;
/// With failover on, how often a wait for a reply looks for the coordinator's promotions.
const NOTICE_POLL_MS: u64 = 20;

/// A reply from a shard's reader thread: shard, connection epoch, message.
type Reply = (u32, u64, Result<Message, String>);

/// One failover seen by this worker, for reports and tests.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct FailoverRecord {
    pub shard: u32,
    /// The step the worker was at.
    pub step: u64,
    /// Wall-clock times (ms since the Unix epoch): the broken link seen, the
    /// new primary connected, and its first acknowledged push.
    pub detected_unix_ms: u64,
    pub reconnected_unix_ms: u64,
    pub first_ack_unix_ms: Option<u64>,
    pub resent_pushes: usize,
    pub resent_pull: bool,
}

/// What failover needs: the coordinator's promotions and how to reconnect.
struct Failover {
    notices: Receiver<FromCoordinator>,
    secret: Secret,
    generation: u64,
    /// How long to wait for a promotion and reconnect.
    wait_ms: u64,
    /// Promotions received: shard → new primary's address.
    promoted: BTreeMap<u32, String>,
    /// Per shard: the record whose first acknowledgement is awaited.
    awaiting_ack: Vec<Option<usize>>,
}

/// How long a worker waits for a lost primary's backup to be promoted and
/// reachable: the coordinator may need a heartbeat timeout to see a hung primary.
pub fn failover_wait_ms(heartbeat_timeout_ms: u64) -> u64 {
    2 * heartbeat_timeout_ms + 2_000
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What rank 0 sends the servers to start them.
pub struct InitArgs<'a> {
    pub params: &'a [f32],
    pub optim: &'a optim::OptimConfig,
    /// Resuming: the optimizer state to start the shards from, and the step to resume at.
    pub resume: Option<(&'a optim::Optimizer, u64)>,
    pub consistency: ps::Consistency,
    pub placement: PlacementSpec,
    /// `cluster.elastic`: the shards take lost workers' replacements.
    pub elastic: bool,
}

/// Pull and push latencies seen by this worker, in microseconds.
#[derive(Clone, Debug, Default)]
pub struct Latencies {
    pub pull_us: Vec<f64>,
    pub push_us: Vec<f64>,
}

struct PendingPull {
    req: u64,
    clock: u64,
    keys: Vec<Vec<u64>>,
    dense: bool,
    /// Which shards were asked (a shard with no key and no dense part is not).
    asked: Vec<bool>,
    got: Vec<Option<(Vec<f32>, Vec<f32>)>>,
    waiting: usize,
    started: Instant,
    /// With failover: the encoded request per shard, to resend to a new primary.
    sent: Vec<Vec<u8>>,
}

pub struct PsExchange {
    rank: u32,
    world: u32,
    layout: Layout,
    placement: Placement,
    /// Tensor indices of the layout's tables.
    tables: Vec<usize>,
    streams: Vec<TcpStream>,
    /// Each shard's (primary's) address and connection epoch.
    addrs: Vec<String>,
    epochs: Vec<u64>,
    replies: Receiver<Reply>,
    reply_tx: Sender<Reply>,
    timeout_ms: u64,
    /// Each gradient is multiplied by this before it is pushed.
    weight: f32,
    pull: Option<PendingPull>,
    next_req: u64,
    /// Per shard: pushes acknowledged, and the send times of those in flight.
    acked: Vec<u64>,
    /// The step this worker started at (see [`PsExchange::connect`]).
    start_step: u64,
    in_flight: Vec<VecDeque<Instant>>,
    /// With failover: the bytes of each push in flight, per shard.
    unacked: Vec<VecDeque<Vec<u8>>>,
    failover: Option<Failover>,
    /// Every failover this worker went through.
    pub failovers: Vec<FailoverRecord>,
    pub latencies: Latencies,
    buf: Vec<u8>,
    keys: Vec<Vec<u64>>,
    values: Vec<Vec<f32>>,
    dense: Vec<f32>,
    /// `compress.codec` for the dense part of pushes (see [`PsExchange::compress_pushes`]).
    push_codec: Option<PushCodec>,
    /// Frames sent to and received from each shard since the trainer last asked.
    traffic: Traffic,
}

/// How pushes compress their dense part: one message per shard, with that
/// shard's error-feedback residual.
struct PushCodec {
    spec: codec::CodecSpec,
    residuals: Vec<Option<codec::ErrorFeedback>>,
    seed: u64,
    msg: Vec<u8>,
    decoded: Vec<f32>,
}

impl PsExchange {
    /// Connects to every shard; rank 0 also starts them (`init`). Returns once
    /// every shard is ready, with the placement they agreed on.
    ///
    /// `start_step` is the step this worker starts at (0, or a checkpoint's);
    /// `None` for a lost worker's replacement, which continues from the lowest
    /// of the shards' clocks for its rank ([`PsExchange::start_step`]).
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        rank: u32,
        world: u32,
        generation: u64,
        servers: &[String],
        secret: &Secret,
        layout: &Layout,
        weight: f32,
        timeout_ms: u64,
        start_step: Option<u64>,
        init: Option<InitArgs<'_>>,
    ) -> Result<Self, JobError> {
        let own = PeerInfo {
            role: Role::Worker,
            rank,
        };
        let mut streams = Vec::with_capacity(servers.len());
        for (i, addr) in servers.iter().enumerate() {
            let mut s = net::connect(addr, RENDEZVOUS_TIMEOUT_MS)?;
            let them = net::connect_handshake(&mut s, secret, own)?;
            if them.role != Role::Server || them.rank != i as u32 {
                return Err(JobError::Server {
                    server: i as u32,
                    why: format!("{addr} answered as {them}"),
                });
            }
            net::send_control(
                &mut s,
                rank,
                &PeerHello {
                    generation,
                    rank,
                    host: None,
                },
            )?;
            net::tune_data_stream(&s)?;
            streams.push(s);
        }
        if let Some(init) = &init {
            let placement = Placement::new(init.placement.clone(), layout)?;
            let optim_json = serde_json::to_string(init.optim).map_err(|e| JobError::Config {
                path: "<config>".into(),
                why: format!("optimizer config: {e}"),
            })?;
            let mut local = Vec::new();
            for (i, s) in streams.iter_mut().enumerate() {
                let ll = ps::LocalLayout::new(layout, &placement, i as u32);
                ll.gather(layout, init.params, &mut local);
                if let Some((opt, _)) = init.resume {
                    append_state(&ll, layout, init.optim, opt, &mut local)?;
                }
                let chunks: Vec<&[f32]> = local.chunks(INIT_CHUNK_VALUES).collect();
                let msg = PsInit {
                    layout: layout.clone(),
                    optim_json: optim_json.clone(),
                    consistency: init.consistency,
                    placement: init.placement.clone(),
                    init_frames: chunks.len() as u32,
                    resume_at: init.resume.map(|(_, step)| step),
                    elastic: init.elastic,
                };
                net::send_control(s, rank, &msg)?;
                for c in chunks {
                    net::write_tensor(s, 0, rank, c).map_err(|e| JobError::Server {
                        server: i as u32,
                        why: format!("sending initial values: {e}"),
                    })?;
                }
            }
        }
        let mut spec: Option<PlacementSpec> = None;
        let mut clocks = Vec::with_capacity(streams.len());
        for (i, s) in streams.iter_mut().enumerate() {
            let ready: PsReady = net::recv_control_exact(s, RENDEZVOUS_TIMEOUT_MS)?;
            if ready.shard != i as u32 || spec.as_ref().is_some_and(|p| *p != ready.placement) {
                return Err(JobError::Server {
                    server: i as u32,
                    why: "disagrees with the other shards about the placement".into(),
                });
            }
            if start_step.is_some_and(|step| step != ready.clock) {
                return Err(JobError::Server {
                    server: i as u32,
                    why: format!(
                        "counts worker {rank}'s pushes from step {}, not {}",
                        ready.clock,
                        start_step.unwrap_or(0)
                    ),
                });
            }
            clocks.push(ready.clock);
            spec = Some(ready.placement);
        }
        // A replacement resends the steps some shards already have from its
        // predecessor; those shards acknowledge them without applying them again.
        let start_step = clocks.iter().copied().min().unwrap_or(0);
        let spec = spec.ok_or_else(|| JobError::Config {
            path: "<config>".into(),
            why: "a parameter-server job needs at least one server".into(),
        })?;
        let placement = Placement::new(spec, layout)?;
        let (tx, replies) = mpsc::channel();
        for (i, s) in streams.iter().enumerate() {
            spawn_reader(i as u32, 0, s, &tx)?;
        }
        let n = streams.len();
        let tables = layout
            .tensors()
            .iter()
            .enumerate()
            .filter(|(_, t)| t.kind == ParamKind::Table)
            .map(|(i, _)| i)
            .collect();
        Ok(Self {
            rank,
            world,
            layout: layout.clone(),
            placement,
            tables,
            streams,
            addrs: servers.to_vec(),
            epochs: vec![0; n],
            replies,
            reply_tx: tx,
            timeout_ms,
            weight,
            pull: None,
            next_req: 0,
            // The shards count this worker's pushes from the step it (re)starts at.
            start_step,
            acked: vec![start_step; n],
            in_flight: vec![VecDeque::new(); n],
            unacked: vec![VecDeque::new(); n],
            failover: None,
            failovers: Vec::new(),
            latencies: Latencies::default(),
            buf: Vec::new(),
            keys: vec![Vec::new(); n],
            values: vec![Vec::new(); n],
            dense: Vec::new(),
            push_codec: None,
            traffic: Traffic::new(n as u32),
        })
    }

    /// The step this worker (re)started at: 0, a checkpoint's, or for a lost
    /// worker's replacement the first step not every shard has from its rank.
    pub fn start_step(&self) -> u64 {
        self.start_step
    }

    /// Compresses the dense part of every push with `spec` (the server decodes
    /// it before its optimizer step), keeping an error-feedback residual per
    /// shard when `error_feedback`. `seed` is the job's.
    pub fn compress_pushes(&mut self, spec: codec::CodecSpec, error_feedback: bool, seed: u64) {
        let residuals = (0..self.shards() as u32)
            .map(|s| {
                let len = self.placement.dense_ranges(s).iter().map(|r| r.len()).sum();
                error_feedback.then(|| codec::ErrorFeedback::new(len))
            })
            .collect();
        self.push_codec = Some(PushCodec {
            spec,
            residuals,
            seed,
            msg: Vec::new(),
            decoded: Vec::new(),
        });
    }

    /// Checkpoint at step `clock` (every push of it sent): hands this worker's
    /// error-feedback residuals to the shards, and on rank 0 reads every
    /// worker's back, as the `compress` group of the checkpoint (see the
    /// module docs). Empty without error feedback. Called on every worker;
    /// rank 0's read waits until each worker's residuals are in, or it has
    /// pushed past `clock` without any.
    pub fn checkpoint_residuals(&mut self, clock: u64) -> Result<Vec<(String, Vec<f32>)>, JobError> {
        if !self
            .push_codec
            .as_ref()
            .is_some_and(|c| c.residuals.iter().any(Option::is_some))
        {
            return Ok(Vec::new());
        }
        let owning: Vec<usize> = (0..self.shards())
            .filter(|&s| self.placement.dense_len(s as u32) > 0)
            .collect();
        for &s in &owning {
            if let Some(c) = &self.push_codec {
                let state = c.residuals[s].as_ref().map_or(&[][..], |ef| ef.state());
                ps::msg::encode_worker_state(clock, state, &mut self.buf);
            }
            self.send(s)?;
        }
        if self.rank != 0 {
            return Ok(Vec::new());
        }
        let dense = DenseIndex::new(&self.layout);
        let world = self.world as usize;
        let mut residuals: Vec<Option<Vec<f32>>> = vec![Some(vec![0.0; dense.len]); world];
        let mut missing: Vec<(usize, usize)> = Vec::new();
        for &s in &owning {
            let base = ps::msg::WORKER_STATE_OFFSET;
            let flags = self.fetch_image(s, clock, base, world)?;
            let mut here = Vec::new();
            for (w, f) in flags.iter().enumerate() {
                match *f {
                    1.0 => here.push(w),
                    0.0 => missing.push((w, s)),
                    other => {
                        return Err(JobError::Server {
                            server: s as u32,
                            why: format!("flagged worker {w}'s checkpoint state with {other}, not 0 or 1"),
                        });
                    }
                }
            }
            let len = self.placement.dense_len(s as u32);
            let states = self.fetch_image(s, clock, base + world as u64, here.len() * len)?;
            let ranges = self.placement.dense_ranges(s as u32);
            for (&w, state) in here.iter().zip(states.chunks_exact(len)) {
                if let Some(buf) = residuals[w].as_mut() {
                    dense.pieces(ranges, |d, local| buf[d].copy_from_slice(&state[local]));
                }
            }
        }
        for &(w, s) in &missing {
            if residuals[w].take().is_some() {
                tracing::warn!(
                    rank = w,
                    shard = s,
                    step = clock,
                    "the shard holds no error-feedback residual of this worker for the checkpoint \
                     (lost in a failover, or the worker was replaced); a resume starts its residuals from zero"
                );
            }
        }
        let suffix = codec::ErrorFeedback::STATE_SUFFIX;
        let mut out = Vec::new();
        for (w, buf) in residuals.iter().enumerate() {
            let Some(buf) = buf else { continue };
            for (name, d) in dense.tensors() {
                out.push((format!("rank{w}.{name}.{suffix}"), buf[d].to_vec()));
            }
        }
        Ok(out)
    }

    /// Resuming: takes this worker's push residuals from a checkpoint's
    /// `compress` group (written by [`PsExchange::checkpoint_residuals`], on
    /// any number of shards), re-split over this job's shards. A tensor
    /// without one starts from zero, with a warning; one of the wrong length
    /// is an error naming it. Call after [`PsExchange::compress_pushes`].
    pub fn load_push_residuals(&mut self, restored: &[(String, Vec<f32>)]) -> Result<(), JobError> {
        let Some(c) = self.push_codec.as_mut() else {
            return Ok(());
        };
        if restored.is_empty() || c.residuals.iter().all(Option::is_none) {
            return Ok(());
        }
        let suffix = codec::ErrorFeedback::STATE_SUFFIX;
        let saved_ranks = restored
            .iter()
            .filter(|(n, _)| n.ends_with(suffix))
            .filter_map(|(n, _)| n.strip_prefix("rank")?.split_once('.')?.0.parse::<u32>().ok())
            .max()
            .map_or(0, |r| r + 1);
        if saved_ranks != self.world {
            tracing::warn!(
                saved_ranks,
                world = self.world,
                rank = self.rank,
                "the checkpoint holds push residuals of a different number of workers; ranks without one start from zero"
            );
        }
        let dense = DenseIndex::new(&self.layout);
        let mut buf = vec![0f32; dense.len];
        let mut absent = Vec::new();
        for (tensor, d) in dense.tensors() {
            let name = format!("rank{}.{tensor}.{suffix}", self.rank);
            match restored.iter().find(|(n, _)| *n == name) {
                Some((_, v)) if v.len() == d.len() => buf[d].copy_from_slice(v),
                Some((_, v)) => {
                    return Err(JobError::Resume {
                        path: "<checkpoint>".into(),
                        why: format!(
                            "{}/{name}: {} values, the tensor has {}",
                            crate::compress::STATE_GROUP,
                            v.len(),
                            d.len()
                        ),
                    });
                }
                None => absent.push(name),
            }
        }
        if !absent.is_empty() {
            tracing::warn!(rank = self.rank, tensors = ?absent, "no push residual in the checkpoint; starting from zero");
        }
        let mut local = Vec::new();
        for (s, ef) in c.residuals.iter_mut().enumerate() {
            let Some(ef) = ef else { continue };
            local.clear();
            local.resize(ef.len(), 0.0);
            dense.pieces(self.placement.dense_ranges(s as u32), |d, l| {
                local[l].copy_from_slice(&buf[d])
            });
            ef.load_state(&local).map_err(|e| JobError::Resume {
                path: "<checkpoint>".into(),
                why: format!("push residual of shard {s}: {e}"),
            })?;
        }
        Ok(())
    }

    /// Replicated shards: on a broken shard connection, wait up to `wait_ms`
    /// for the coordinator's promotion of its backup (`notices` carries the
    /// coordinator's messages), reconnect and resend what was not acknowledged.
    pub fn enable_failover(
        &mut self,
        notices: Receiver<FromCoordinator>,
        secret: Secret,
        generation: u64,
        wait_ms: u64,
    ) {
        self.failover = Some(Failover {
            notices,
            secret,
            generation,
            wait_ms,
            promoted: BTreeMap::new(),
            awaiting_ack: vec![None; self.shards()],
        });
    }

    /// What went to and came from each shard since the last call (peers are shards).
    pub fn take_traffic(&mut self) -> Option<Traffic> {
        let n = self.shards() as u32;
        Some(std::mem::replace(&mut self.traffic, Traffic::new(n)))
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    pub fn world(&self) -> u32 {
        self.world
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    fn shards(&self) -> usize {
        self.streams.len()
    }

    fn send(&mut self, shard: usize) -> Result<(), JobError> {
        let bytes = (HEADER_BYTES + self.buf.len()) as u64;
        self.traffic.sent[shard] += bytes;
        self.traffic.uncompressed += bytes;
        match write_frame(&mut self.streams[shard], self.rank, &self.buf) {
            Ok(()) => Ok(()),
            // The reader sees the link break too; the failover resends what this was.
            Err(e) if self.failover.is_some() => {
                tracing::warn!(rank = self.rank, role = "worker", shard, error = %e, "sending to a server failed; waiting for its failover");
                Ok(())
            }
            Err(e) => Err(JobError::Server {
                server: shard as u32,
                why: format!("sending: {e}"),
            }),
        }
    }

    /// Asks every shard for the rows `rows` of every table (and the dense part
    /// when `dense`) for step `clock`. `wait_all`: answered only once every
    /// worker has pushed `clock` steps (evaluation).
    pub fn pull_start(&mut self, clock: u64, rows: &[u32], dense: bool, wait_all: bool) -> Result<(), JobError> {
        if self.pull.is_some() {
            return Err(JobError::Server {
                server: 0,
                why: "a pull started before the previous one finished".into(),
            });
        }
        let n = self.shards();
        let mut keys = vec![Vec::new(); n];
        for &t in &self.tables {
            for &r in rows {
                let k = ps::key(t, r);
                keys[self.placement.shard_of(k) as usize].push(k);
            }
        }
        let req = self.next_req;
        self.next_req += 1;
        let mut asked = vec![false; n];
        let mut sent = vec![Vec::new(); n];
        for (s, k) in keys.iter().enumerate() {
            let want_dense = dense && self.placement.dense_len(s as u32) > 0;
            if k.is_empty() && !want_dense {
                continue;
            }
            if k.len() > ps::msg::KEYS_PER_MESSAGE_MAX {
                return Err(JobError::Server {
                    server: s as u32,
                    why: format!(
                        "a pull of {} keys exceeds {} per message",
                        k.len(),
                        ps::msg::KEYS_PER_MESSAGE_MAX
                    ),
                });
            }
            let p = ps::Pull {
                req,
                clock,
                wait_all,
                dense: want_dense,
                keys: Vec::new(),
                snapshot: None,
            };
            ps::msg::encode_pull(&p, k, &mut self.buf);
            if self.failover.is_some() {
                sent[s] = self.buf.clone();
            }
            self.send(s)?;
            asked[s] = true;
        }
        let waiting = asked.iter().filter(|a| **a).count();
        self.pull = Some(PendingPull {
            req,
            clock,
            keys,
            dense,
            asked,
            got: vec![None; n],
            waiting,
            started: Instant::now(),
            sent,
        });
        Ok(())
    }

    /// Waits for the pull in flight and writes what came into `params`.
    pub fn pull_finish(&mut self, params: &mut [f32]) -> Result<(), JobError> {
        let Some(clock) = self.pull.as_ref().map(|p| p.clock) else {
            return Ok(());
        };
        while self.pull.as_ref().is_some_and(|p| p.waiting > 0) {
            let waiting_on = self
                .pull
                .as_ref()
                .and_then(|p| (0..p.got.len()).find(|&s| p.asked[s] && p.got[s].is_none()))
                .unwrap_or(0);
            self.handle_reply("pull", clock, waiting_on as u32)?;
        }
        let p = self.pull.take().expect("checked above");
        self.latencies.pull_us.push(p.started.elapsed().as_secs_f64() * 1e6);
        for (s, got) in p.got.into_iter().enumerate() {
            let Some((dense, values)) = got else { continue };
            let ranges = self.placement.dense_ranges(s as u32);
            let want: usize = if p.dense {
                ranges.iter().map(|r| r.len()).sum()
            } else {
                0
            };
            let want_values: usize = p.keys[s]
                .iter()
                .map(|&k| self.layout.tensors()[ps::split_key(k).0].row_len())
                .sum();
            if dense.len() != want || values.len() != want_values {
                return Err(JobError::Server {
                    server: s as u32,
                    why: format!(
                        "answered step {clock} with {} dense and {} row values; expected {want} and {want_values}",
                        dense.len(),
                        values.len()
                    ),
                });
            }
            let mut at = 0;
            for r in ranges.iter().filter(|_| p.dense) {
                params[r.clone()].copy_from_slice(&dense[at..at + r.len()]);
                at += r.len();
            }
            let mut at = 0;
            for &k in &p.keys[s] {
                let (t, row) = ps::split_key(k);
                let tensor = &self.layout.tensors()[t];
                let len = tensor.row_len();
                let dst = tensor.offset + row as usize * len;
                params[dst..dst + len].copy_from_slice(&values[at..at + len]);
                at += len;
            }
        }
        Ok(())
    }

    /// Sends this worker's gradient for step `clock` to every shard (an empty
    /// push still advances the shard's clock for this worker).
    pub fn push(&mut self, clock: u64, grad: &Gradient) -> Result<(), JobError> {
        let n = self.shards();
        for s in 0..n {
            // Bounded pipelining: wait for old acknowledgements first.
            while self.acked[s] + PUSH_WINDOW <= clock {
                self.handle_reply("push", clock, s as u32)?;
            }
        }
        for v in &mut self.keys {
            v.clear();
        }
        for v in &mut self.values {
            v.clear();
        }
        let w = self.weight;
        for sr in &grad.sparse {
            for (i, &row) in sr.rows.iter().enumerate() {
                let k = ps::key(sr.tensor, row);
                let s = self.placement.shard_of(k) as usize;
                self.keys[s].push(k);
                self.values[s].extend(sr.row(i).iter().map(|g| g * w));
            }
        }
        for s in 0..n {
            self.dense.clear();
            for r in self.placement.dense_ranges(s as u32) {
                self.dense.extend(grad.dense[r.clone()].iter().map(|g| g * w));
            }
            match self.push_codec.as_mut() {
                Some(c) if !self.dense.is_empty() => {
                    let seed = tensor::Rng::derive(
                        c.seed ^ 0x9B5C_0DE0,
                        (clock << 20) ^ (u64::from(self.rank) << 8) ^ s as u64,
                    )
                    .next_u64();
                    let failed = |e: codec::CodecError| JobError::Server {
                        server: s as u32,
                        why: format!("compressing a push: {e}"),
                    };
                    let g = &self.dense;
                    match &mut c.residuals[s] {
                        Some(ef) => {
                            self.traffic.norm2 += g
                                .iter()
                                .zip(ef.state())
                                .map(|(a, r)| f64::from(a + r).powi(2))
                                .sum::<f64>();
                            ef.compress(&c.spec, g, seed, &mut c.msg).map_err(failed)?;
                            self.traffic.err2 += ef.state().iter().map(|r| f64::from(*r).powi(2)).sum::<f64>();
                        }
                        None => {
                            codec::encode(&c.spec, g, seed, &mut c.msg).map_err(failed)?;
                            // Without error feedback the error takes a decode of our own
                            // message, which the shard does anyway: measured on a sample.
                            if clock.is_multiple_of(ERROR_SAMPLE_EVERY_PUSHES) {
                                c.decoded.clear();
                                c.decoded.resize(g.len(), 0.0);
                                codec::decode(&c.msg, &mut c.decoded).map_err(failed)?;
                                self.traffic.norm2 += g.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>();
                                self.traffic.err2 += g
                                    .iter()
                                    .zip(&c.decoded)
                                    .map(|(a, d)| f64::from(a - d).powi(2))
                                    .sum::<f64>();
                            }
                        }
                    }
                    ps::msg::encode_push_coded(clock, &c.msg, &self.keys[s], &self.values[s], &mut self.buf);
                    // Counted as what the plain push would have been.
                    let saved = 4 * self.dense.len() - c.msg.len().min(4 * self.dense.len());
                    if self.failover.is_some() {
                        self.unacked[s].push_back(self.buf.clone());
                    }
                    self.send(s)?;
                    self.traffic.uncompressed += saved as u64;
                }
                _ => {
                    ps::msg::encode_push(clock, &self.dense, &self.keys[s], &self.values[s], &mut self.buf);
                    if self.failover.is_some() {
                        self.unacked[s].push_back(self.buf.clone());
                    }
                    self.send(s)?;
                }
            }
            self.in_flight[s].push_back(Instant::now());
        }
        Ok(())
    }

    /// The whole model as of step `clock` (once every worker has pushed it):
    /// parameters and optimizer state gathered from every shard, laid out as
    /// on a single process, so a checkpoint of it resumes on any number of
    /// shards and workers. The optimizer's step count is shard 0's.
    pub fn snapshot(&mut self, clock: u64, cfg: &optim::OptimConfig) -> Result<(Vec<f32>, optim::Optimizer), JobError> {
        let layout = self.layout.clone();
        let mut params = vec![0.0f32; layout.len()];
        let mut state: std::collections::BTreeMap<String, Vec<f32>> = std::collections::BTreeMap::new();
        let full = optim::Optimizer::new(cfg, &layout)?;
        for (name, t) in full.state_tensors() {
            state.insert(name, vec![0.0; t.len()]);
        }
        for shard in 0..self.shards() {
            let ll = ps::LocalLayout::new(&layout, &self.placement, shard as u32);
            let local_opt = optim::Optimizer::new(cfg, &ll.local)?;
            let parts: Vec<(String, usize)> = local_opt
                .state_tensors()
                .into_iter()
                .map(|(n, t)| (n, t.len()))
                .collect();
            let total = ll.local.len() + parts.iter().map(|(_, n)| n).sum::<usize>();
            let image = self.fetch_image(shard, clock, 0, total)?;
            ll.scatter(&layout, &image[..ll.local.len()], &mut params);
            let mut at = ll.local.len();
            for (name, n) in parts {
                let part = &image[at..at + n];
                at += n;
                if name == optim::STEP_STATE_NAME {
                    if shard == 0 {
                        state.insert(name, part.to_vec());
                    }
                    continue;
                }
                let (param, _) = name.rsplit_once('.').unwrap_or((&name, ""));
                let global = state.get_mut(&name).ok_or_else(|| JobError::Server {
                    server: shard as u32,
                    why: format!("holds optimizer state `{name}`, which the model does not have"),
                })?;
                ll.scatter_tensor(&layout, param, part, global);
            }
        }
        let mut opt = full;
        opt.load_state(state.iter().map(|(n, v)| (n.as_str(), &v[..])))?;
        Ok((params, opt))
    }

    /// Reads shard `shard`'s image (see `ps::Shard::image`) in parts that fit a frame.
    /// `base` is where the read starts: 0, or [`ps::msg::WORKER_STATE_OFFSET`]
    /// and on for the workers' states (see `ps::Shard::worker_state_image`).
    fn fetch_image(&mut self, shard: usize, clock: u64, base: u64, total: usize) -> Result<Vec<f32>, JobError> {
        let mut image = Vec::with_capacity(total);
        while image.len() < total {
            let len = (total - image.len()).min(INIT_CHUNK_VALUES);
            let values = self.read_snapshot(shard, clock, base + image.len() as u64, len)?;
            image.extend_from_slice(&values);
        }
        Ok(image)
    }

    /// SSP and async, at a checkpoint's step `clock`, before this worker
    /// pushes that step: waits until every worker's first `clock` steps are in
    /// on every shard, which saves the shards' consistent cut of that step
    /// (see `ps::shard`). The checkpoint's snapshot is then read from the cut.
    pub fn cut(&mut self, clock: u64) -> Result<(), JobError> {
        for shard in 0..self.shards() {
            self.read_snapshot(shard, clock, ps::CUT_BARRIER, 0)?;
        }
        Ok(())
    }

    /// One snapshot read of `len` values at `offset` from shard `shard`, once
    /// every worker has pushed `clock` steps there.
    fn read_snapshot(&mut self, shard: usize, clock: u64, offset: u64, len: usize) -> Result<Vec<f32>, JobError> {
        let req = self.next_req;
        self.next_req += 1;
        let p = ps::Pull {
            req,
            clock,
            wait_all: true,
            dense: false,
            keys: Vec::new(),
            snapshot: Some((offset, len as u64)),
        };
        ps::msg::encode_pull(&p, &[], &mut self.buf);
        let n = self.shards();
        let mut sent = vec![Vec::new(); n];
        if self.failover.is_some() {
            sent[shard] = self.buf.clone();
        }
        self.send(shard)?;
        let mut asked = vec![false; n];
        asked[shard] = true;
        self.pull = Some(PendingPull {
            req,
            clock,
            keys: vec![Vec::new(); n],
            dense: false,
            asked,
            got: vec![None; n],
            waiting: 1,
            started: Instant::now(),
            sent,
        });
        while self.pull.as_ref().is_some_and(|p| p.waiting > 0) {
            self.handle_reply("checkpoint snapshot", clock, shard as u32)?;
        }
        let p = self.pull.take().expect("waited above");
        let (_, values) = p.got.into_iter().nth(shard).flatten().expect("answered");
        if values.len() != len {
            return Err(JobError::Server {
                server: shard as u32,
                why: format!("sent {} snapshot values, asked for {len}", values.len()),
            });
        }
        Ok(values)
    }

    /// Waits until every push is acknowledged (the end of training).
    pub fn flush(&mut self, clock: u64) -> Result<(), JobError> {
        for s in 0..self.shards() {
            while !self.in_flight[s].is_empty() {
                self.handle_reply("final push", clock, s as u32)?;
            }
        }
        Ok(())
    }

    /// Takes one reply off the channel, within the deadline. With failover,
    /// a broken shard connection (or a promotion) is handled here instead.
    fn handle_reply(&mut self, what: &str, clock: u64, waiting_on: u32) -> Result<(), JobError> {
        let deadline = Instant::now() + Duration::from_millis(self.timeout_ms);
        let (s, msg) = loop {
            let slice = match self.failover.is_some() {
                true => {
                    if let Some(shard) = self.promoted_elsewhere() {
                        return self.fail_over(shard, clock, "the coordinator promoted its backup".into());
                    }
                    Duration::from_millis(NOTICE_POLL_MS)
                }
                false => Duration::from_millis(self.timeout_ms),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(slice.min(left)) {
                Ok((s, epoch, _)) if epoch != self.epochs[s as usize] => {}
                Ok((s, _, Err(why))) if self.failover.is_some() => return self.fail_over(s, clock, why),
                Ok((s, _, msg)) => break (s, msg),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(JobError::Server {
                        server: waiting_on,
                        why: format!("{what} for step {clock} timed out after {} ms", self.timeout_ms),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(JobError::Server {
                        server: waiting_on,
                        why: "every server connection is gone".into(),
                    });
                }
            }
        };
        let msg = msg.map_err(|why| JobError::Server { server: s, why })?;
        let su = s as usize;
        let payload = match &msg {
            Message::Pulled { dense, values, .. } => 4 * (dense.len() + values.len()),
            _ => 0,
        };
        self.traffic.received[su] += (HEADER_BYTES + ps::msg::HEAD_BYTES + payload) as u64;
        match msg {
            Message::Pushed { clock: c } => {
                if c != self.acked[su] {
                    return Err(JobError::Server {
                        server: s,
                        why: format!("acknowledged step {c}, expected {}", self.acked[su]),
                    });
                }
                self.acked[su] += 1;
                self.unacked[su].pop_front();
                if let Some(t) = self.in_flight[su].pop_front() {
                    self.latencies.push_us.push(t.elapsed().as_secs_f64() * 1e6);
                }
                if let Some(i) = self.failover.as_mut().and_then(|f| f.awaiting_ack[su].take()) {
                    self.failovers[i].first_ack_unix_ms = Some(unix_ms());
                }
            }
            Message::Pulled { req, dense, values, .. } => {
                let Some(p) = self
                    .pull
                    .as_mut()
                    .filter(|p| p.req == req && p.asked[su] && p.got[su].is_none())
                else {
                    return Err(JobError::Server {
                        server: s,
                        why: format!("answered pull {req}, which is not waiting"),
                    });
                };
                p.got[su] = Some((dense, values));
                p.waiting -= 1;
            }
            other => {
                return Err(JobError::Server {
                    server: s,
                    why: format!("sent a request to a worker: {other:?}"),
                });
            }
        }
        Ok(())
    }
}

impl PsExchange {
    /// Takes the coordinator's news; returns a shard whose primary moved.
    fn promoted_elsewhere(&mut self) -> Option<u32> {
        let f = self.failover.as_mut()?;
        while let Ok(m) = f.notices.try_recv() {
            match m {
                FromCoordinator::Promote { shard, addr } => {
                    f.promoted.insert(shard, addr);
                }
                other => tracing::warn!(rank = self.rank, ?other, "unexpected message from the coordinator"),
            }
        }
        f.promoted
            .iter()
            .find(|(s, a)| self.addrs.get(**s as usize).is_some_and(|cur| cur != *a))
            .map(|(s, _)| *s)
    }

    /// Shard `s`'s primary is gone (`why`): waits for the promotion of its
    /// backup, connects to it and resends every unacknowledged push and the
    /// pull in flight. Gives up, naming the shard, after the failover deadline.
    fn fail_over(&mut self, s: u32, step: u64, why: String) -> Result<(), JobError> {
        let (rank, su) = (self.rank, s as usize);
        let detected = unix_ms();
        let started = Instant::now();
        let Some(f) = self.failover.as_mut() else {
            return Err(JobError::Server { server: s, why });
        };
        let deadline = started + Duration::from_millis(f.wait_ms);
        let give_up = |what: String| {
            tracing::error!(rank, role = "worker", step, shard = s, "{what}; giving up");
            JobError::Server {
                server: s,
                why: format!("rank {rank} (worker) gave up at step {step}: {what} (the link broke: {why})"),
            }
        };
        tracing::warn!(
            rank,
            role = "worker",
            step,
            shard = s,
            why,
            "lost a parameter server; waiting for the promotion of its backup"
        );
        let addr = loop {
            if let Some(a) = f.promoted.get(&s).filter(|a| **a != self.addrs[su]) {
                break a.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(give_up(format!(
                    "no promotion of shard {s}'s backup within {} ms",
                    f.wait_ms
                )));
            }
            match f.notices.recv_timeout(left) {
                Ok(FromCoordinator::Promote { shard, addr }) => {
                    f.promoted.insert(shard, addr);
                }
                Ok(other) => tracing::warn!(rank, ?other, "unexpected message from the coordinator"),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(give_up("lost the coordinator".into())),
            }
        };
        let own = PeerInfo {
            role: Role::Worker,
            rank,
        };
        let (secret, generation) = (f.secret.clone(), f.generation);
        let mut attempt = 0;
        let stream = loop {
            attempt += 1;
            let r = net::connect(&addr, net::HANDSHAKE_TIMEOUT_MS).and_then(|mut c| {
                let them = net::connect_handshake(&mut c, &secret, own)?;
                if them.role != Role::Server || them.rank != s {
                    return Err(JobError::Server {
                        server: s,
                        why: format!("{addr} answered as {them}"),
                    });
                }
                net::send_control(
                    &mut c,
                    rank,
                    &PeerHello {
                        generation,
                        rank,
                        host: None,
                    },
                )?;
                net::tune_data_stream(&c)?;
                // The new primary says it serves this shard with the placement this worker routes by.
                let ready: PsReady = net::recv_control_exact(&mut c, net::HANDSHAKE_TIMEOUT_MS)?;
                if ready.shard != s || ready.placement != *self.placement.spec() {
                    return Err(JobError::Server {
                        server: s,
                        why: format!("{addr} serves shard {} with another placement", ready.shard),
                    });
                }
                Ok(c)
            });
            match r {
                Ok(c) => break c,
                Err(e) if attempt < RECONNECT_ATTEMPTS_MAX && Instant::now() < deadline => {
                    tracing::warn!(rank, role = "worker", step, shard = s, attempt, error = %e, "connecting to the promoted primary failed; retrying");
                    thread::sleep(Duration::from_millis(RECONNECT_BACKOFF_MS));
                }
                Err(e) => {
                    return Err(give_up(format!(
                        "cannot connect to shard {s}'s new primary {addr} after {attempt} attempts: {e}"
                    )));
                }
            }
        };
        self.addrs[su] = addr.clone();
        self.epochs[su] += 1;
        spawn_reader(s, self.epochs[su], &stream, &self.reply_tx)?;
        self.streams[su] = stream;
        // Resend, in order: the shard acknowledges a push it already applied without applying it again.
        let pushes: Vec<Vec<u8>> = self.unacked[su].iter().cloned().collect();
        for b in &pushes {
            self.buf.clone_from(b);
            self.send(su)?;
        }
        let pull = self
            .pull
            .as_ref()
            .filter(|p| p.asked[su] && p.got[su].is_none())
            .map(|p| p.sent[su].clone());
        if let Some(b) = &pull {
            self.buf.clone_from(b);
            self.send(su)?;
        }
        let record = FailoverRecord {
            shard: s,
            step,
            detected_unix_ms: detected,
            reconnected_unix_ms: unix_ms(),
            first_ack_unix_ms: None,
            resent_pushes: pushes.len(),
            resent_pull: pull.is_some(),
        };
        tracing::warn!(
            rank,
            role = "worker",
            step,
            shard = s,
            addr,
            resent_pushes = pushes.len(),
            resent_pull = pull.is_some(),
            waited_ms = started.elapsed().as_millis() as u64,
            "reconnected to the promoted primary; resent what was not acknowledged"
        );
        self.failovers.push(record);
        if let Some(f) = self.failover.as_mut() {
            f.awaiting_ack[su] = Some(self.failovers.len() - 1);
        }
        Ok(())
    }
}

/// Starts the thread that reads shard `shard`'s replies (connection `epoch`).
fn spawn_reader(shard: u32, epoch: u64, s: &TcpStream, tx: &Sender<Reply>) -> Result<(), JobError> {
    let s = s.try_clone().map_err(|e| JobError::io("cloning a server stream", e))?;
    let tx = tx.clone();
    thread::Builder::new()
        .name(format!("ps-reply-{shard}"))
        .spawn(move || read_replies(shard, epoch, s, tx))
        .map(|_| ())
        .map_err(|e| JobError::io("spawning a reply reader", e))
}

/// Appends shard `ll`'s part of the optimizer state `opt` (over the whole
/// layout) in the order the shard's own optimizer lists it: the tail of a
/// shard image (see `ps::Shard::image`).
fn append_state(
    ll: &ps::LocalLayout,
    layout: &Layout,
    cfg: &optim::OptimConfig,
    opt: &optim::Optimizer,
    out: &mut Vec<f32>,
) -> Result<(), JobError> {
    let global: std::collections::BTreeMap<String, &[f32]> = opt.state_tensors().into_iter().collect();
    let mut part = Vec::new();
    for (name, _) in optim::Optimizer::new(cfg, &ll.local)?.state_tensors() {
        let whole = global.get(&name).ok_or_else(|| JobError::Config {
            path: "<checkpoint>".into(),
            why: format!("no optimizer state `{name}` to resume the shards from"),
        })?;
        if name == optim::STEP_STATE_NAME {
            out.extend_from_slice(whole);
            continue;
        }
        let (param, _) = name.rsplit_once('.').unwrap_or((&name, ""));
        ll.gather_tensor(layout, param, whole, &mut part);
        out.extend_from_slice(&part);
    }
    Ok(())
}

/// Reads whole `Ps` frames from one server and decodes them.
fn read_replies(shard: u32, epoch: u64, mut s: TcpStream, tx: Sender<Reply>) {
    loop {
        let mut h = [0u8; HEADER_BYTES];
        if let Err(e) = s.read_exact(&mut h) {
            let _ = tx.send((shard, epoch, Err(format!("connection closed: {e}"))));
            return;
        }
        let r = FrameHeader::decode(&h).map_err(|e| e.to_string()).and_then(|h| {
            if h.kind != MessageType::Ps {
                return Err(format!("expected a parameter-server frame, got {}", h.kind));
            }
            let mut payload = vec![0u8; h.payload_bytes as usize];
            s.read_exact(&mut payload)
                .map_err(|e| format!("reading a reply: {e}"))?;
            h.check_payload(&payload).map_err(|e| e.to_string())?;
            ps::msg::decode(&payload, None).map_err(|e| e.to_string())
        });
        let stop = r.is_err();
        if tx.send((shard, epoch, r)).is_err() || stop {
            return;
        }
    }
}

/// The trainer sees the parameter servers through [`Exchange::remote`]; the
/// all-reduce methods are not used with servers.
impl crate::train::Exchange for PsExchange {
    fn rank(&self) -> u32 {
        self.rank
    }
    fn world(&self) -> u32 {
        self.world
    }
    fn gradient_ready(&mut self, _: u64, _: std::ops::Range<usize>, _: &[f32]) -> Result<(), JobError> {
        Err(not_allreduce())
    }
    fn finish_gradients(&mut self, _: u64, _: &mut [f32]) -> Result<(), JobError> {
        Err(not_allreduce())
    }
    fn allreduce_gradient(&mut self, _: u64, _: &mut [f32]) -> Result<(), JobError> {
        Err(not_allreduce())
    }
    fn average_params(&mut self, _: u64, _: &mut [f32]) -> Result<(), JobError> {
        Err(not_allreduce())
    }
    /// Workers' local copies differ by design (each holds the rows it last
    /// pulled); the servers hold the one model.
    fn verify_identical(&mut self, _: u32, _: u64) -> Result<(), JobError> {
        Ok(())
    }
    /// The push residuals of every worker (rank 0), see [`PsExchange::checkpoint_residuals`].
    fn checkpoint_state(&mut self, step: u64) -> Result<Vec<(String, Vec<f32>)>, JobError> {
        self.checkpoint_residuals(step)
    }
    fn remote(&mut self) -> Option<&mut PsExchange> {
        Some(self)
    }
}

/// The dense tensors' elements back to back, in buffer order: a residual
/// indexed this way does not depend on how the shards split the elements.
struct DenseIndex {
    /// Per dense tensor: its name, its range in the buffer, and where it starts here.
    tensors: Vec<(String, std::ops::Range<usize>, usize)>,
    len: usize,
}

impl DenseIndex {
    fn new(layout: &Layout) -> Self {
        let mut len = 0;
        let mut tensors = Vec::new();
        for t in layout.tensors().iter().filter(|t| t.kind == ParamKind::Dense) {
            tensors.push((t.name.clone(), t.range(), len));
            len += t.range().len();
        }
        Self { tensors, len }
    }

    /// Each tensor's name and its range here.
    fn tensors(&self) -> impl Iterator<Item = (&str, std::ops::Range<usize>)> + '_ {
        self.tensors.iter().map(|(n, r, at)| (n.as_str(), *at..*at + r.len()))
    }

    /// Calls `f(here, local)` for every piece of `ranges` (buffer ranges of
    /// dense elements, laid back to back in a shard's local order): where
    /// it is in this index, and where in the shard's local buffer.
    fn pieces(
        &self,
        ranges: &[std::ops::Range<usize>],
        mut f: impl FnMut(std::ops::Range<usize>, std::ops::Range<usize>),
    ) {
        let mut local = 0;
        for g in ranges {
            let mut covered = 0;
            for (_, t, at) in &self.tensors {
                let (start, end) = (g.start.max(t.start), g.end.min(t.end));
                if start < end {
                    let here = at + (start - t.start);
                    let from = local + (start - g.start);
                    f(here..here + (end - start), from..from + (end - start));
                    covered += end - start;
                }
            }
            assert_eq!(
                covered,
                g.len(),
                "a placement's dense range {g:?} is not all dense elements"
            );
            local += g.len();
        }
    }
}

fn not_allreduce() -> JobError {
    JobError::Config {
        path: "<config>".into(),
        why: "an all-reduce operation was asked of a parameter-server exchange".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        let mut l = Layout::new();
        l.push("a", &[5], ParamKind::Dense);
        l.push("emb", &[4, 2], ParamKind::Table);
        l.push("b", &[3, 3], ParamKind::Dense);
        l
    }

    /// What each shard's push residual holds when element i of the dense index holds `v[i]`.
    fn split(dense: &DenseIndex, placement: &Placement, v: &[f32]) -> Vec<Vec<f32>> {
        (0..placement.shards())
            .map(|s| {
                let mut local = vec![f32::NAN; placement.dense_len(s)];
                dense.pieces(placement.dense_ranges(s), |d, l| local[l].copy_from_slice(&v[d]));
                local
            })
            .collect()
    }

    #[test]
    fn push_residuals_move_between_shard_counts_through_the_per_tensor_index() {
        let l = layout();
        let dense = DenseIndex::new(&l);
        assert_eq!(dense.len, 14);
        let names: Vec<(&str, std::ops::Range<usize>)> = dense.tensors().collect();
        assert_eq!(names, [("a", 0..5), ("b", 5..14)]);
        let v: Vec<f32> = (0..14).map(|i| i as f32).collect();
        let two = Placement::new(PlacementSpec::hashed(2, 8), &l).expect("placement");
        let three = Placement::new(PlacementSpec::hashed(3, 8), &l).expect("placement");
        let by_two = split(&dense, &two, &v);
        // A shard's residual lines up with the dense part of its pushes: its ranges back to back.
        for (s, local) in by_two.iter().enumerate() {
            let want: Vec<f32> = two
                .dense_ranges(s as u32)
                .iter()
                .flat_map(|r| r.clone())
                .map(|g| {
                    let (_, t, at) = dense.tensors.iter().find(|(_, t, _)| t.contains(&g)).expect("dense");
                    (at + g - t.start) as f32
                })
                .collect();
            assert_eq!(local, &want, "shard {s}");
        }
        // Gathered from two shards (as rank 0 does), split over three (as a resume does).
        let mut gathered = vec![f32::NAN; dense.len];
        for (s, local) in by_two.iter().enumerate() {
            dense.pieces(two.dense_ranges(s as u32), |d, lr| {
                gathered[d].copy_from_slice(&local[lr])
            });
        }
        assert_eq!(gathered, v);
        let by_three = split(&dense, &three, &gathered);
        assert_eq!(by_three.iter().map(Vec::len).sum::<usize>(), 14);
        assert!(by_three.iter().flatten().all(|x| !x.is_nan()), "every element placed");
        let mut again = vec![f32::NAN; dense.len];
        for (s, local) in by_three.iter().enumerate() {
            dense.pieces(three.dense_ranges(s as u32), |d, lr| {
                again[d].copy_from_slice(&local[lr])
            });
        }
        assert_eq!(again, v);
    }
}
