//! Scale prediction: the step time of a data-parallel job on a cluster that
//! need not exist, from the real protocol engines over the modelled network.
//!
//! # The model
//!
//! - **Step.** Every worker computes for `compute_ns` (forward, backward and
//!   optimizer of its local batch, as a real step of the job measures it: the
//!   `step_time` of a worker's epoch line; on a shared host, its CPU time,
//!   `compute_cpu_ms`), then
//!   exchanges, as `node` does by default: **no overlap** of communication
//!   with compute (the inline exchange after the backward pass). Synchronous
//!   all-reduce steps are identical without faults, so one step is simulated;
//!   parameter-server jobs run [`PS_STEPS`] steps (the pull of step k+1 is
//!   sent before step k computes, pushes are pipelined two deep) and report
//!   the mean of all steps but the first.
//! - **Network.** [`crate::net`]: one full-duplex NIC per node at the link
//!   rate, a latency, TCP/IP framing at 1448/1514, a 32-byte frame header per
//!   message, optionally a token bucket per NIC (`tbf`'s burst); a
//!   non-blocking switch (no core congestion). Collectives send on one stream
//!   at a time, through FIFO NICs ([`Network`]); a parameter server talks to
//!   every worker at once, and its streams share each NIC fairly, as TCP
//!   flows do ([`SharedNetwork`]).
//! - **CPU.** Per frame, each end spends `frame_overhead_ns` (syscall, crc32c
//!   of the header) plus the payload at `copy_gbps` (sender: crc32c and copy
//!   into the socket; receiver of a copy) or `reduce_gbps` (receiver that
//!   adds). One thread per node does the communication, and the codec work
//!   of a compressed exchange: the codec itself (`encode_gbps`,
//!   `decode_gbps`) and what the runtime does around it (`feedback_gbps`).
//!   With [`PredictConfig::host_cores`], every node's compute and
//!   communication work shares that many cores (a job whose processes all
//!   run on one machine).
//! - **All-reduce** uses the algorithm `node` picks (recursive doubling up to
//!   64 KiB, else the ring with 64 Ki-f32 segments and 4 frames in flight).
//!   **Compressed** exchanges follow `node::compress`: encode this worker's
//!   gradient, all-gather the message lengths (one f32 per worker), all-gather
//!   the messages padded to the longest, decode every worker's message.
//! - **Parameter server:** dense parameters cut into equal ranges, one per
//!   shard, each on its own node; a shard applies each push (async and SSP)
//!   or each step's sum (BSP) at `apply_gbps`; compressed pushes are decoded
//!   by the shard; pulls are answered in f32, to every waiting worker at once.
//!
//! `bench/issue7.sh` checks the model against the real runtime between
//! network namespaces (`bench/results/*-issue7.md`).
//!
//! # Scaling down the engines
//!
//! The engines run on a buffer scaled down to one element per *message*,
//! with every message's byte count scaled back up: each element stands for
//! `real bytes / scaled elements` bytes. A ring all-reduce keeps its real
//! message count (2(N−1) steps per rank, times the real segments per chunk)
//! as long as all ranks together plan at most [`COMMANDS_BUDGET`] commands;
//! beyond, several real segments travel as one message (the output says by
//! how much), which keeps the bytes and loses only pipelining inside a chunk.
//! The parameter-server shards run the real [`ps::Shard`] on a few elements
//! per shard, with message bytes scaled the same way.

use std::collections::{BTreeMap, VecDeque};

pub use codec::CodecSpec;
use collective::{
    Algorithm, Collective, CollectiveConfig, Command as CCmd, Event as CEv, GatherAlgorithm, Kind, RecvOp, Tag,
};
use tensor::{Layout, ParamKind, Rng};

use crate::net::{EgressDone, LinkSpec, Network, Scheduled, SharedNetwork};
use crate::queue::{Nanos, Queue};

/// Most commands all engines of one collective may plan together, beyond
/// which real segments are coarsened (never below one message per chunk and
/// ring step). Engines keep only the commands in flight, so this bounds time,
/// not memory: about 0.5 µs per command here. A 4,096-rank ring all-reduce
/// with one segment per chunk needs 67 M whatever the budget; the compressed
/// exchange's all-gather of 4,096 3.3 MB messages, 13 segments each, is held
/// to one segment per chunk (34 M), which moves its predicted step by less
/// than 0.1%: the ring pipelines across chunks, not inside them.
pub const COMMANDS_BUDGET: u64 = 70_000_000;
/// Steps a parameter-server prediction runs.
pub const PS_STEPS: u64 = 4;
/// Most workers a prediction takes.
pub const WORKERS_MAX: u32 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    AllReduce,
    Ps,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allreduce" | "all-reduce" | "ring" => Ok(Strategy::AllReduce),
            "ps" | "server" => Ok(Strategy::Ps),
            _ => Err(format!("unknown strategy `{s}` (allreduce or ps)")),
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::AllReduce => "allreduce",
            Strategy::Ps => "ps",
        })
    }
}

/// Costs on the nodes' CPUs.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuModel {
    pub frame_overhead_ns: Nanos,
    pub copy_gbps: f64,
    pub reduce_gbps: f64,
    /// Server-side optimizer, in GB/s of f32 gradient.
    pub apply_gbps: f64,
    /// Codec encode and decode, in GB/s of f32 input (`sinter bench codec`).
    pub encode_gbps: f64,
    pub decode_gbps: f64,
    /// What the runtime does around the codec, in GB/s of f32 gradient: the
    /// error-feedback residual (accumulate, subtract what was sent), the
    /// passes that account the compression error, framing (`node::compress`,
    /// `node::ps_client`). [`CpuModel::with_exchange`] derives it from
    /// `sinter bench codec`'s exchange figure, which times all of that with
    /// the codec and the decoding of the rank's own message.
    pub feedback_gbps: f64,
}

impl CpuModel {
    /// This model with the codec's speeds and `feedback_gbps` set so that
    /// encode + feedback + one decode take as long as the runtime's whole
    /// exchange measured at `exchange_gbps` (each in GB/s of f32 gradient).
    pub fn with_exchange(self, encode_gbps: f64, decode_gbps: f64, exchange_gbps: f64) -> CpuModel {
        let around = 1.0 / exchange_gbps - 1.0 / encode_gbps - 1.0 / decode_gbps;
        CpuModel {
            encode_gbps,
            decode_gbps,
            // A codec that is all of its exchange leaves nothing around it.
            feedback_gbps: if around > 0.0 { 1.0 / around } else { f64::INFINITY },
            ..self
        }
    }

    /// This model on cores `factor` times slower: every cost times `factor`.
    /// For a host other than the one whose `sinter bench codec` figures the
    /// defaults are, or this one when its cores are shared and slowed (a
    /// job's own `compute_cpu_ms` against the same compute alone measures it).
    pub fn slower(self, factor: f64) -> CpuModel {
        CpuModel {
            frame_overhead_ns: (self.frame_overhead_ns as f64 * factor).round() as Nanos,
            copy_gbps: self.copy_gbps / factor,
            reduce_gbps: self.reduce_gbps / factor,
            apply_gbps: self.apply_gbps / factor,
            encode_gbps: self.encode_gbps / factor,
            decode_gbps: self.decode_gbps / factor,
            feedback_gbps: self.feedback_gbps / factor,
        }
    }
}

impl Default for CpuModel {
    fn default() -> Self {
        CpuModel {
            frame_overhead_ns: 2_000,
            copy_gbps: 4.0,
            reduce_gbps: 2.0,
            apply_gbps: 2.0,
            encode_gbps: 5.0,
            decode_gbps: 20.0,
            feedback_gbps: 4.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PredictConfig {
    /// Parameters (f32s).
    pub params: u64,
    /// One worker's compute per step: wall time, or with `host_cores` its
    /// CPU time (which then waits for a free core like the rest).
    pub compute_ns: Nanos,
    /// Samples per worker per step (for throughput).
    pub batch: u64,
    pub workers: u32,
    /// Parameter-server shards (strategy `ps`).
    pub servers: u32,
    pub link: LinkSpec,
    pub strategy: Strategy,
    pub codec: CodecSpec,
    pub consistency: ps::Consistency,
    pub cpu: CpuModel,
    /// Cores all nodes share, for their compute and communication (every
    /// process of the job on one machine); 0: each node has its own.
    pub host_cores: u32,
    /// Most commands one collective's engines plan together before real
    /// segments are coarsened ([`COMMANDS_BUDGET`] unless told).
    pub commands_budget: u64,
}

impl PredictConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=WORKERS_MAX).contains(&self.workers) {
            return Err(format!("--workers {} is outside 1..={WORKERS_MAX}", self.workers));
        }
        if self.params == 0 || self.params > 1 << 40 {
            return Err(format!("--params {} is outside 1..=2^40", self.params));
        }
        if self.strategy == Strategy::Ps && !(1..=ps::placement::SHARDS_MAX).contains(&self.servers) {
            return Err(format!(
                "--servers {} is outside 1..={}",
                self.servers,
                ps::placement::SHARDS_MAX
            ));
        }
        if self.link.bandwidth_bits_per_s.is_nan() || self.link.bandwidth_bits_per_s <= 0.0 {
            return Err("the link bandwidth must be positive".into());
        }
        if matches!(self.codec, CodecSpec::PowerSgd { .. }) {
            return Err("powersgd is not modelled by the predictor (its cost depends on the tensor shapes)".into());
        }
        self.codec
            .validate()
            .map_err(|e| format!("codec {}: {e}", self.codec))?;
        Ok(())
    }
}

/// What a prediction found.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub step_ns: Nanos,
    pub compute_ns: Nanos,
    /// Bytes one worker sends per step (payload and frame headers, worker 0).
    pub sent_bytes: u64,
    pub samples_per_s: f64,
    /// Compute time over step time: the share of perfect linear scaling.
    pub efficiency: f64,
    /// Real segments carried per simulated message (1: the real message count).
    pub coarsening: u64,
    /// Engine commands executed, and events processed.
    pub commands: u64,
    pub events: u64,
}

/// Predicts one configuration.
pub fn predict(cfg: &PredictConfig) -> Result<Prediction, String> {
    cfg.validate()?;
    let mut p = match cfg.strategy {
        Strategy::AllReduce => predict_all_reduce(cfg)?,
        Strategy::Ps => predict_ps(cfg)?,
    };
    p.compute_ns = cfg.compute_ns;
    p.efficiency = cfg.compute_ns as f64 / p.step_ns.max(1) as f64;
    p.samples_per_s = (cfg.batch * u64::from(cfg.workers)) as f64 / (p.step_ns.max(1) as f64 / 1e9);
    Ok(p)
}

/// Bytes of a codec message for `elems` f32s; sparse codecs are measured on
/// a sample of Gaussian values (deterministic), scaled to `elems`.
pub fn message_bytes(spec: &CodecSpec, elems: u64) -> Result<u64, String> {
    if let Some(n) = usize::try_from(elems).ok().and_then(|n| codec::compressed_len(spec, n)) {
        return Ok(n as u64);
    }
    let sample = elems.min(1 << 20) as usize;
    let mut rng = Rng::new(7);
    let values: Vec<f32> = (0..sample).map(|_| rng.normal() as f32).collect();
    let mut out = Vec::new();
    codec::encode(spec, &values, 7, &mut out).map_err(|e| format!("codec {spec}: {e}"))?;
    let header = codec::compressed_len(&CodecSpec::None, 0).unwrap_or(0) as u64;
    let body = out.len() as u64 - header.min(out.len() as u64);
    Ok(header + (body as f64 * elems as f64 / sample as f64).ceil() as u64)
}

fn ns_for(bytes: f64, gbps: f64) -> Nanos {
    (bytes / gbps).ceil() as Nanos
}

/// Where the nodes' CPU work runs. Each node's communication thread does one
/// thing at a time; with `host_cores` > 0 the work of every node (compute,
/// frames, copies, reductions, codecs, the server's optimizer) shares
/// that many cores (a job's processes on one machine, as in
/// `bench/issue7.sh`), each piece taking the core that is free first. With 0,
/// every node has cores of its own.
struct Cpus {
    node_free: Vec<Nanos>,
    core_free: Vec<Nanos>,
}

impl Cpus {
    fn new(nodes: usize, host_cores: u32) -> Cpus {
        Cpus {
            node_free: vec![0; nodes],
            core_free: vec![0; host_cores as usize],
        }
    }

    /// A core for `dur_ns` from `ready` on: when the work can start.
    fn core(&mut self, ready: Nanos, dur_ns: Nanos) -> Nanos {
        let Some((core, &free)) = self.core_free.iter().enumerate().min_by_key(|&(i, &free)| (free, i)) else {
            return ready;
        };
        let start = ready.max(free);
        self.core_free[core] = start + dur_ns;
        start
    }

    /// `dur_ns` of `node`'s communication thread, ready at `ready`: when it ends.
    fn run(&mut self, node: u32, ready: Nanos, dur_ns: Nanos) -> Nanos {
        let ready = ready.max(self.node_free[node as usize]);
        let end = self.core(ready, dur_ns) + dur_ns;
        self.node_free[node as usize] = end;
        end
    }

    /// Compute (forward, backward, optimizer), ready at `ready`: when it
    /// ends. It leaves the communication thread free (a parameter server's
    /// replies are taken while the worker computes). On a shared host it
    /// takes a core from the pool like any other work, so `dur_ns` is then
    /// the compute's CPU time; otherwise the node has a core of its own.
    fn compute(&mut self, ready: Nanos, dur_ns: Nanos) -> Nanos {
        self.core(ready, dur_ns) + dur_ns
    }

    fn free_at(&self, node: u32) -> Nanos {
        self.node_free[node as usize]
    }
}

// --- collectives, timing only ----------------------------------------------------------------

enum Ev {
    Arrive { to: u32, from: u32, tag: Tag },
    SendDone { node: u32, peer: u32, tag: Tag },
    RecvDone { node: u32, peer: u32, tag: Tag },
}

struct RankState {
    engine: Collective,
    /// Per peer (a ring has two, recursive doubling log2(n)): receives issued, frames arrived.
    lanes: Vec<Lane>,
}

struct Lane {
    peer: u32,
    recvs: VecDeque<(Tag, RecvOp)>,
    arrived: VecDeque<Tag>,
}

impl RankState {
    fn lane(&mut self, peer: u32) -> &mut Lane {
        let i = match self.lanes.iter().position(|l| l.peer == peer) {
            Some(i) => i,
            None => {
                self.lanes.push(Lane {
                    peer,
                    recvs: VecDeque::new(),
                    arrived: VecDeque::new(),
                });
                self.lanes.len() - 1
            }
        };
        &mut self.lanes[i]
    }
}

/// What one timed collective did.
struct Timed {
    /// When each rank finished.
    done_at: Vec<Nanos>,
    sent_bytes_rank0: u64,
    commands: u64,
    events: u64,
    coarsening: u64,
}

/// Runs `kind` over `world` ranks on a buffer of `real_elems` f32s (each
/// rank's part of an all-gather for `AllGather`), every rank starting at
/// `start[r]`, on `net` with node `r` = rank `r`.
#[allow(clippy::too_many_arguments)]
fn time_collective(
    kind: Kind,
    world: u32,
    real_bytes: f64,
    real_elems: u64,
    start: &[Nanos],
    net: &mut Network,
    cpus: &mut Cpus,
    cpu: &CpuModel,
    commands_budget: u64,
) -> Result<Timed, String> {
    if world == 1 {
        return Ok(Timed {
            done_at: start.to_vec(),
            sent_bytes_rank0: 0,
            commands: 0,
            events: 0,
            coarsening: 1,
        });
    }
    let seg = collective::SEGMENT_ELEMS_DEFAULT as u64;
    let n = u64::from(world);
    // The engine's own buffer: one element per real segment of a chunk.
    let (len, segment_elems, coarsening) = match kind {
        Kind::AllReduce(Algorithm::RecursiveDoubling) | Kind::AllGather(GatherAlgorithm::Bruck) => {
            (real_elems, collective::SEGMENT_ELEMS_DEFAULT, 1)
        }
        _ => {
            let chunk = if matches!(kind, Kind::AllGather(_)) {
                real_elems / n
            } else {
                real_elems.div_ceil(n)
            };
            let segs = chunk.div_ceil(seg).max(1);
            let per_seg_cmds = match kind {
                Kind::AllGather(_) => 2 * (n - 1),
                _ => 4 * (n - 1),
            };
            let fit = (commands_budget / (n * per_seg_cmds)).max(1);
            let coarsening = segs.div_ceil(fit);
            ((segs.div_ceil(coarsening)) * n, 1usize, coarsening)
        }
    };
    let len = usize::try_from(len).map_err(|_| "buffer too large".to_string())?;
    let bytes_per_elem = real_bytes / len as f64;
    let cc = CollectiveConfig {
        segment_elems,
        ..CollectiveConfig::default()
    };
    let mut ranks = Vec::with_capacity(world as usize);
    for r in 0..world {
        let engine = Collective::new(kind, 0, r, world, len, &cc).map_err(|e| e.to_string())?;
        ranks.push(RankState {
            engine,
            lanes: Vec::new(),
        });
    }
    let mut q: Queue<Ev> = Queue::new();
    let mut done_at = vec![0; world as usize];
    let mut sent0 = 0u64;
    let (mut commands, mut events) = (0u64, 0u64);

    // Issues commands of `node` at `now`.
    #[allow(clippy::too_many_arguments)]
    fn issue(
        node: u32,
        now: Nanos,
        cmds: Vec<CCmd>,
        ranks: &mut [RankState],
        q: &mut Queue<Ev>,
        net: &mut Network,
        cpu: &CpuModel,
        cpus: &mut Cpus,
        done_at: &mut [Nanos],
        sent0: &mut u64,
        commands: &mut u64,
        bytes_per_elem: f64,
    ) {
        for c in cmds {
            *commands += 1;
            match c {
                CCmd::Send { peer, tag, range } => {
                    let bytes = range.len() as f64 * bytes_per_elem;
                    let t0 = cpus.run(node, now, cpu.frame_overhead_ns + ns_for(bytes, cpu.copy_gbps));
                    let t = net.transmit(t0, node, peer, bytes as u64, 0);
                    if node == 0 {
                        *sent0 += bytes as u64 + wire::HEADER_BYTES as u64;
                    }
                    q.push(t.sent, Ev::SendDone { node, peer, tag });
                    q.push(
                        t.arrive,
                        Ev::Arrive {
                            to: peer,
                            from: node,
                            tag,
                        },
                    );
                }
                CCmd::Recv { peer, tag, op, .. } => {
                    ranks[node as usize].lane(peer).recvs.push_back((tag, op));
                    try_match(node, peer, now, ranks, q, cpu, cpus, bytes_per_elem);
                }
                CCmd::Done => done_at[node as usize] = now,
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn try_match(
        node: u32,
        peer: u32,
        now: Nanos,
        ranks: &mut [RankState],
        q: &mut Queue<Ev>,
        cpu: &CpuModel,
        cpus: &mut Cpus,
        bytes_per_elem: f64,
    ) {
        let lane = ranks[node as usize].lane(peer);
        loop {
            if lane.recvs.is_empty() || lane.arrived.is_empty() {
                return;
            }
            let (tag, op) = lane.recvs.pop_front().expect("checked");
            let arrived = lane.arrived.pop_front().expect("checked");
            assert_eq!(tag, arrived, "frames arrive in order on a stream");
            // Each scaled element is one segment's bytes; ranges here are one element.
            let gbps = if op == RecvOp::Reduce {
                cpu.reduce_gbps
            } else {
                cpu.copy_gbps
            };
            let at = cpus.run(node, now, cpu.frame_overhead_ns + ns_for(bytes_per_elem, gbps));
            q.push(at, Ev::RecvDone { node, peer, tag });
        }
    }

    for r in 0..world {
        let first = ranks[r as usize].engine.start();
        let at = start[r as usize];
        issue(
            r,
            at,
            first,
            &mut ranks,
            &mut q,
            net,
            cpu,
            cpus,
            &mut done_at,
            &mut sent0,
            &mut commands,
            bytes_per_elem,
        );
    }
    while let Some((now, ev)) = q.pop() {
        events += 1;
        let (node, more) = match ev {
            Ev::Arrive { to, from, tag } => {
                ranks[to as usize].lane(from).arrived.push_back(tag);
                try_match(to, from, now, &mut ranks, &mut q, cpu, cpus, bytes_per_elem);
                continue;
            }
            Ev::SendDone { node, peer, tag } => (node, ranks[node as usize].engine.on_event(CEv::Sent { peer, tag })),
            Ev::RecvDone { node, peer, tag } => {
                (node, ranks[node as usize].engine.on_event(CEv::Received { peer, tag }))
            }
        };
        let more = more.map_err(|e| e.to_string())?;
        issue(
            node,
            now,
            more,
            &mut ranks,
            &mut q,
            net,
            cpu,
            cpus,
            &mut done_at,
            &mut sent0,
            &mut commands,
            bytes_per_elem,
        );
    }
    if let Some(r) = ranks.iter().find(|r| !r.engine.is_done()) {
        return Err(format!("rank {} did not finish its {}", r.engine.rank(), kind.name()));
    }
    Ok(Timed {
        done_at,
        sent_bytes_rank0: sent0,
        commands,
        events,
        coarsening,
    })
}

fn predict_all_reduce(cfg: &PredictConfig) -> Result<Prediction, String> {
    let world = cfg.workers;
    let mut net = Network::new(world as usize, cfg.link.clone());
    let mut cpus = Cpus::new(world as usize, cfg.host_cores);
    let after_compute: Vec<Nanos> = (0..world).map(|_| cpus.compute(0, cfg.compute_ns)).collect();
    let real_bytes = 4.0 * cfg.params as f64;
    let cc = CollectiveConfig::default();
    if cfg.codec == CodecSpec::None {
        let kind = Kind::AllReduce(cc.all_reduce_algorithm(cfg.params as usize * 4, world));
        let t = time_collective(
            kind,
            world,
            real_bytes,
            cfg.params,
            &after_compute,
            &mut net,
            &mut cpus,
            &cfg.cpu,
            cfg.commands_budget,
        )?;
        return Ok(Prediction {
            step_ns: t.done_at.iter().copied().max().unwrap_or(0),
            compute_ns: 0,
            sent_bytes: t.sent_bytes_rank0,
            samples_per_s: 0.0,
            efficiency: 0.0,
            coarsening: t.coarsening,
            commands: t.commands,
            events: t.events,
        });
    }
    // node::compress: encode, all-gather lengths, all-gather padded messages, decode all.
    let msg = message_bytes(&cfg.codec, cfg.params)? + 4;
    let encode = ns_for(real_bytes, cfg.cpu.encode_gbps) + ns_for(real_bytes, cfg.cpu.feedback_gbps);
    let start: Vec<Nanos> = (0..world)
        .map(|r| cpus.run(r, after_compute[r as usize], encode))
        .collect();
    let lens = time_collective(
        Kind::AllGather(cc.all_gather_algorithm(4 * world as usize, world)),
        world,
        4.0 * f64::from(world),
        u64::from(world),
        &start,
        &mut net,
        &mut cpus,
        &cfg.cpu,
        cfg.commands_budget,
    )?;
    let words = msg.div_ceil(4);
    let total_words = words * u64::from(world);
    let gather = time_collective(
        Kind::AllGather(cc.all_gather_algorithm(4 * total_words as usize, world)),
        world,
        4.0 * total_words as f64,
        total_words,
        &lens.done_at,
        &mut net,
        &mut cpus,
        &cfg.cpu,
        cfg.commands_budget,
    )?;
    // Every rank decodes every message.
    let decode = u64::from(world) * ns_for(real_bytes, cfg.cpu.decode_gbps);
    let step_ns = (0..world)
        .map(|r| cpus.run(r, gather.done_at[r as usize], decode))
        .max()
        .unwrap_or(0);
    Ok(Prediction {
        step_ns,
        compute_ns: 0,
        sent_bytes: lens.sent_bytes_rank0 + gather.sent_bytes_rank0,
        samples_per_s: 0.0,
        efficiency: 0.0,
        coarsening: gather.coarsening.max(lens.coarsening),
        commands: lens.commands + gather.commands,
        events: lens.events + gather.events,
    })
}

// --- parameter server, timing only -------------------------------------------------------------

/// f32s each simulated shard holds (the real bytes are scaled from it).
const PS_SCALED_ELEMS: usize = 4;

enum PsEv {
    /// A worker's compute of `step` is over.
    Computed {
        worker: u32,
        step: u64,
    },
    /// A node's CPU has the message ready: it goes to the network.
    Hand {
        from: u32,
        to: u32,
        bytes: u64,
        then: Box<PsEv>,
    },
    /// A NIC finished a chunk ([`SharedNetwork`]).
    Egress(EgressDone),
    Pull {
        shard: u32,
        worker: u32,
        clock: u64,
    },
    Push {
        shard: u32,
        worker: u32,
        clock: u64,
    },
    Pulled {
        worker: u32,
        clock: u64,
    },
    Pushed {
        worker: u32,
        shard: u32,
    },
}

/// Schedules what the network asked for: its next chunk, and a delivery.
fn post(q: &mut Queue<PsEv>, s: Scheduled<PsEv>) {
    if let Some((at, done)) = s.next {
        q.push(at, PsEv::Egress(done));
    }
    if let Some((at, ev)) = s.delivered {
        q.push(at, ev);
    }
}

fn predict_ps(cfg: &PredictConfig) -> Result<Prediction, String> {
    let (w, s) = (cfg.workers, cfg.servers);
    let nodes = (w + s) as usize;
    // A worker talks to every shard and a shard to every worker at once: the
    // streams share each NIC (see `crate::net`).
    let mut net: SharedNetwork<PsEv> = SharedNetwork::new(nodes, cfg.link.clone());
    let cpu = &cfg.cpu;
    let shard_elems = cfg.params.div_ceil(u64::from(s));
    let f32_bytes = 4 * shard_elems;
    let compressed = cfg.codec != CodecSpec::None;
    let push_bytes = ps::msg::HEAD_BYTES as u64
        + if compressed {
            message_bytes(&cfg.codec, shard_elems)?
        } else {
            f32_bytes
        };
    let pulled_bytes = ps::msg::HEAD_BYTES as u64 + f32_bytes;
    let head = ps::msg::HEAD_BYTES as u64;
    // node::ps_client compresses each shard's part with error feedback and its accounting.
    let encode_ns = if compressed {
        ns_for(f32_bytes as f64, cpu.encode_gbps) + ns_for(f32_bytes as f64, cpu.feedback_gbps)
    } else {
        0
    };
    let decode_ns = if compressed {
        ns_for(f32_bytes as f64, cpu.decode_gbps)
    } else {
        0
    };
    let apply_ns = ns_for(f32_bytes as f64, cpu.apply_gbps);

    let mut layout = Layout::new();
    layout.push("w", &[PS_SCALED_ELEMS * s as usize], ParamKind::Dense);
    let placement = ps::Placement::new(ps::PlacementSpec::hashed(s, 8), &layout).map_err(|e| e.to_string())?;
    let sgd = optim::OptimConfig::default();
    let mut shards = Vec::new();
    for i in 0..s {
        let n = placement.dense_len(i);
        shards.push(
            ps::Shard::new(i, w, cfg.consistency, &sgd, &layout, &placement, vec![0.0; n])
                .map_err(|e| e.to_string())?,
        );
    }
    let mut q: Queue<PsEv> = Queue::new();
    let mut cpus = Cpus::new(nodes, cfg.host_cores);
    // Worker state.
    let mut pulled: Vec<BTreeMap<u64, u32>> = vec![BTreeMap::new(); w as usize];
    let mut acked = vec![vec![0u64; s as usize]; w as usize];
    let mut next_step = vec![0u64; w as usize];
    let mut computing = vec![false; w as usize];
    let mut pending_push: Vec<Option<u64>> = vec![None; w as usize];
    let mut step_done: Vec<Vec<Nanos>> = vec![Vec::new(); w as usize];
    let mut sent0 = 0u64;
    let mut events = 0u64;

    // The sender's CPU prepares a message (frame, crc32c, copy, and `extra_cpu`),
    // then hands it to the network, which delivers `then` on arrival.
    #[allow(clippy::too_many_arguments)]
    fn send(
        q: &mut Queue<PsEv>,
        cpus: &mut Cpus,
        cpu: &CpuModel,
        from: u32,
        to: u32,
        now: Nanos,
        bytes: u64,
        extra_cpu: Nanos,
        then: PsEv,
    ) {
        let t0 = cpus.run(
            from,
            now,
            cpu.frame_overhead_ns + extra_cpu + ns_for(bytes as f64, cpu.copy_gbps),
        );
        q.push(
            t0,
            PsEv::Hand {
                from,
                to,
                bytes,
                then: Box::new(then),
            },
        );
    }
    // Step 0's pulls.
    for wk in 0..w {
        for sh in 0..s {
            let pull = PsEv::Pull {
                shard: sh,
                worker: wk,
                clock: 0,
            };
            send(&mut q, &mut cpus, cpu, wk, w + sh, 0, head, 0, pull);
        }
    }
    let pull = crate::cluster::pull_of;
    while let Some((now, ev)) = q.pop() {
        events += 1;
        // The worker whose state this event changed: only it can move on (a
        // shard's outputs reach workers as later events), so the others are
        // not visited, which keeps 4,096 workers linear in the events.
        let moved = match ev {
            PsEv::Hand { from, to, bytes, then } => {
                post(&mut q, net.send(now, from, to, bytes, *then));
                None
            }
            PsEv::Egress(done) => {
                post(&mut q, net.on_egress_done(now, done));
                None
            }
            PsEv::Pull { shard, worker, clock } => {
                let out = shards[shard as usize]
                    .on_pull(worker, pull(clock))
                    .map_err(|e| e.to_string())?;
                for o in out {
                    if let ps::Output::Pulled { worker, clock, .. } = o {
                        let ev = PsEv::Pulled { worker, clock };
                        send(&mut q, &mut cpus, cpu, w + shard, worker, now, pulled_bytes, 0, ev);
                    }
                }
                None
            }
            PsEv::Push { shard, worker, clock } => {
                let ready = cpus.run(w + shard, now, decode_ns + apply_ns);
                let push = ps::Push {
                    clock,
                    dense: vec![0.0; placement.dense_len(shard)],
                    keys: Vec::new(),
                    values: Vec::new(),
                };
                let out = shards[shard as usize]
                    .on_push(worker, push)
                    .map_err(|e| e.to_string())?;
                for o in out {
                    match o {
                        ps::Output::Pushed { worker, .. } => {
                            let ev = PsEv::Pushed { worker, shard };
                            send(&mut q, &mut cpus, cpu, w + shard, worker, ready, head, 0, ev);
                        }
                        ps::Output::Pulled { worker, clock, .. } => {
                            let ev = PsEv::Pulled { worker, clock };
                            send(&mut q, &mut cpus, cpu, w + shard, worker, ready, pulled_bytes, 0, ev);
                        }
                    }
                }
                None
            }
            PsEv::Pulled { worker, clock } => {
                let wi = worker as usize;
                cpus.run(worker, now, ns_for(f32_bytes as f64, cpu.copy_gbps));
                *pulled[wi].entry(clock).or_default() += 1;
                Some(worker)
            }
            PsEv::Pushed { worker, shard } => {
                acked[worker as usize][shard as usize] += 1;
                Some(worker)
            }
            PsEv::Computed { worker, step } => {
                computing[worker as usize] = false;
                pending_push[worker as usize] = Some(step);
                Some(worker)
            }
        };
        // Move that worker on as far as it can (the loop of node::train::run_epoch_remote).
        if let Some(wk) = moved {
            let wi = wk as usize;
            if let Some(k) = pending_push[wi]
                && acked[wi].iter().all(|&a| a + 2 > k)
            {
                pending_push[wi] = None;
                let t = now.max(cpus.free_at(wk));
                for sh in 0..s {
                    let ev = PsEv::Push {
                        shard: sh,
                        worker: wk,
                        clock: k,
                    };
                    send(&mut q, &mut cpus, cpu, wk, w + sh, t, push_bytes, encode_ns, ev);
                    if wk == 0 {
                        sent0 += push_bytes + wire::HEADER_BYTES as u64;
                    }
                }
                step_done[wi].push(cpus.free_at(wk));
                next_step[wi] = k + 1;
            }
            let k = next_step[wi];
            if !computing[wi] && pending_push[wi].is_none() && k < PS_STEPS && pulled[wi].get(&k).copied() == Some(s) {
                pulled[wi].remove(&k);
                let t = now.max(cpus.free_at(wk));
                if k + 1 < PS_STEPS {
                    for sh in 0..s {
                        let ev = PsEv::Pull {
                            shard: sh,
                            worker: wk,
                            clock: k + 1,
                        };
                        send(&mut q, &mut cpus, cpu, wk, w + sh, t, head, 0, ev);
                        if wk == 0 {
                            sent0 += head + wire::HEADER_BYTES as u64;
                        }
                    }
                }
                computing[wi] = true;
                let computed = cpus.compute(t, cfg.compute_ns);
                q.push(computed, PsEv::Computed { worker: wk, step: k });
            }
        }
    }
    if let Some(wk) = (0..w as usize).find(|&i| step_done[i].len() as u64 != PS_STEPS) {
        return Err(format!(
            "worker {wk} did only {} of {PS_STEPS} steps",
            step_done[wk].len()
        ));
    }
    // Mean step time after the first step, over workers.
    let mean = step_done
        .iter()
        .map(|d| (d[d.len() - 1] - d[0]) as f64 / (d.len() - 1) as f64)
        .sum::<f64>()
        / f64::from(w);
    Ok(Prediction {
        step_ns: mean.round() as Nanos,
        compute_ns: 0,
        sent_bytes: sent0 / PS_STEPS,
        samples_per_s: 0.0,
        efficiency: 0.0,
        coarsening: 1,
        commands: 0,
        events,
    })
}

/// One row of a table of predictions, as text.
pub fn table_header() -> String {
    "| strategy | codec | workers | servers | step ms | compute ms | comm ms | samples/s | efficiency | MB sent/worker/step | msgs coarsened |\n|---|---|---|---|---|---|---|---|---|---|---|".into()
}

pub fn table_row(cfg: &PredictConfig, p: &Prediction) -> String {
    let servers = if cfg.strategy == Strategy::Ps {
        cfg.servers.to_string()
    } else {
        "-".into()
    };
    format!(
        "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.0} | {:.3} | {:.3} | {}x |",
        cfg.strategy,
        cfg.codec,
        cfg.workers,
        servers,
        p.step_ns as f64 / 1e6,
        p.compute_ns as f64 / 1e6,
        (p.step_ns.saturating_sub(p.compute_ns)) as f64 / 1e6,
        p.samples_per_s,
        p.efficiency,
        p.sent_bytes as f64 / 1e6,
        p.coarsening
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(workers: u32, strategy: Strategy) -> PredictConfig {
        PredictConfig {
            params: 1 << 20,
            compute_ns: 10_000_000,
            batch: 32,
            workers,
            servers: 2,
            link: LinkSpec::new(1e9, 50_000),
            strategy,
            codec: CodecSpec::None,
            consistency: ps::Consistency::Bsp,
            cpu: CpuModel::default(),
            host_cores: 0,
            commands_budget: COMMANDS_BUDGET,
        }
    }

    #[test]
    fn a_ring_is_near_its_bandwidth_bound() {
        // 4 MiB over 4 ranks at 1 Gbit/s: each rank sends 2·3/4·4 MiB ≈ 6.3 MB ≈ 50 ms on the wire.
        let p = predict(&cfg(4, Strategy::AllReduce)).unwrap();
        let comm_ms = (p.step_ns - p.compute_ns) as f64 / 1e6;
        let wire_ms = 2.0 * 0.75 * 4.0 * 1048576.0 * 8.0 / 1e9 * 1e3 / crate::net::WIRE_EFFICIENCY_DEFAULT;
        assert!(comm_ms > wire_ms && comm_ms < wire_ms * 1.25, "{comm_ms} vs {wire_ms}");
        assert_eq!(p.coarsening, 1);
    }

    #[test]
    fn compression_shrinks_the_bytes_and_one_worker_does_not_communicate() {
        let mut c = cfg(4, Strategy::AllReduce);
        c.codec = "topk:0.01:f16".parse().unwrap();
        let top = predict(&c).unwrap();
        let none = predict(&cfg(4, Strategy::AllReduce)).unwrap();
        assert!(
            top.sent_bytes * 20 < none.sent_bytes,
            "{} vs {}",
            top.sent_bytes,
            none.sent_bytes
        );
        assert!(top.step_ns < none.step_ns);
        let one = predict(&cfg(1, Strategy::AllReduce)).unwrap();
        assert_eq!(one.step_ns, one.compute_ns);
    }

    #[test]
    fn parameter_servers_add_a_round_trip_to_bsp_and_hide_it_under_async() {
        let bsp = predict(&cfg(4, Strategy::Ps)).unwrap();
        let mut a = cfg(4, Strategy::Ps);
        a.consistency = ps::Consistency::Async;
        let asy = predict(&a).unwrap();
        assert!(bsp.step_ns > bsp.compute_ns);
        assert!(asy.step_ns < bsp.step_ns, "{} vs {}", asy.step_ns, bsp.step_ns);
        let mut bad = cfg(4, Strategy::Ps);
        bad.workers = 0;
        assert!(predict(&bad).is_err());
    }

    #[test]
    fn a_shard_answers_the_pulls_of_a_bsp_step_side_by_side() {
        // 2 workers, 1 shard, 4 MiB of parameters at 1 Gbit/s: a pull or push is
        // ≈ 35 ms on the wire. The two pulls share the shard's NIC and finish
        // together, then both workers push through it: ≈ 4 transfers a step. Had
        // the shard sent them one after the other, the first worker's push would
        // overlap the second pull: ≈ 3.
        let mut c = cfg(2, Strategy::Ps);
        c.servers = 1;
        let p = predict(&c).unwrap();
        let wire_ms = 4.0 * 1048576.0 * 8.0 / 1e9 * 1e3 / crate::net::WIRE_EFFICIENCY_DEFAULT;
        let comm_ms = (p.step_ns - p.compute_ns) as f64 / 1e6;
        assert!(
            comm_ms > 3.7 * wire_ms && comm_ms < 4.3 * wire_ms,
            "{comm_ms} vs {wire_ms}"
        );
    }

    #[test]
    fn a_token_bucket_and_shared_cores_change_what_they_should() {
        let plain = predict(&cfg(2, Strategy::AllReduce)).unwrap();
        // A bucket the size of a whole chunk: the first frames after the compute leave at once.
        let mut burst = cfg(2, Strategy::AllReduce);
        burst.link.burst_bytes = 1 << 20;
        let burst = predict(&burst).unwrap();
        assert!(burst.step_ns < plain.step_ns, "{} vs {}", burst.step_ns, plain.step_ns);
        // Four workers' codec work on one core takes longer than on four.
        let mut own = cfg(4, Strategy::AllReduce);
        own.codec = "topk:0.01:f16".parse().unwrap();
        let mut shared = own.clone();
        shared.host_cores = 1;
        let (own, shared) = (predict(&own).unwrap(), predict(&shared).unwrap());
        assert!(shared.step_ns > own.step_ns, "{} vs {}", shared.step_ns, own.step_ns);
    }

    #[test]
    fn compute_on_a_shared_host_waits_for_a_core() {
        // Four workers' 10 ms of compute CPU on two cores: two after two, so
        // the last exchange cannot start before 20 ms.
        for strategy in [Strategy::AllReduce, Strategy::Ps] {
            let mut c = cfg(4, strategy);
            c.params = 1024;
            let own = predict(&c).unwrap();
            c.host_cores = 2;
            let shared = predict(&c).unwrap();
            assert!(own.step_ns < 2 * c.compute_ns, "{strategy}: {}", own.step_ns);
            assert!(shared.step_ns >= 2 * c.compute_ns, "{strategy}: {}", shared.step_ns);
        }
    }

    #[test]
    fn slower_cores_slow_the_exchange_not_the_given_compute() {
        let cpu = CpuModel::default().slower(2.0);
        assert_eq!(cpu.frame_overhead_ns, 2 * CpuModel::default().frame_overhead_ns);
        assert_eq!(cpu.encode_gbps, CpuModel::default().encode_gbps / 2.0);
        assert_eq!(CpuModel::default().slower(1.0), CpuModel::default());
        // A compressed exchange is CPU work: twice as slow cores, about twice its time.
        let mut c = cfg(4, Strategy::AllReduce);
        c.codec = "topk:0.01:f16".parse().unwrap();
        let base = predict(&c).unwrap();
        c.cpu = c.cpu.slower(2.0);
        let slow = predict(&c).unwrap();
        let (comm, slow_comm) = (base.step_ns - base.compute_ns, slow.step_ns - slow.compute_ns);
        assert_eq!(slow.compute_ns, base.compute_ns, "the compute is an input, not scaled");
        assert!(slow_comm > 3 * comm / 2, "{slow_comm} vs {comm}");
    }
}
