//! A whole job in one thread: workers running the real collective engines or
//! talking to real parameter-server [`ps::Shard`]s, and the real
//! [`coordinator::Coordinator`], over the modelled [`crate::net`] network,
//! under the faults a seed draws ([`crate::faults`]), with every invariant
//! checked after every event.
//!
//! What the simulated processes do mirrors `node`:
//! - an all-reduce worker computes its gradient (virtual time: the step's
//!   compute time times the node's slowness), all-reduces it inline with the
//!   algorithm the node's config would choose, applies it, writes a
//!   checkpoint every few steps, heartbeats to the coordinator, and reports
//!   `Finished` after the last step;
//! - a parameter-server worker pulls step k+1 before computing step k and
//!   keeps at most two pushes per shard unacknowledged (`node::ps_client`);
//! - a parameter-server shard heartbeats to the coordinator from its welcome
//!   until the job ends (`node::server`): the coordinator fails a job whose
//!   member, worker or shard, is silent for a heartbeat timeout;
//! - with `replicas == 2`, a shard is a primary and a backup node, each a
//!   real [`ps::Replica`] (`node::replica`): the snapshot, the forwarded
//!   entries and the backup's `Applied` travel as messages; workers keep
//!   their pushes until acknowledged and resend them to a promoted backup.
//!   The simulator plays the coordinator's part for replicated shards
//!   (`coordinator::servers`) in the simplest form, with no messages: one
//!   latency after a crash it promotes a ready backup or tells the primary
//!   its backup is gone, and a restarted node becomes the backup of a shard
//!   that has none; with both replicas down the attempt fails;
//! - every wait has a deadline (collective, pull, push acknowledgement); a
//!   broken connection or a deadline makes the worker report `Failed`;
//! - when the coordinator ends a job attempt with a failure, the launcher
//!   (the simulator) restarts every process once all nodes are up: all-reduce
//!   jobs from the newest complete checkpoint, parameter-server jobs from the
//!   start (their checkpoints are not modelled). An attempt launched in the
//!   liveness phase, with every node up and no fault to come, must finish:
//!   its failure breaks the `liveness` invariant at once.
//!
//! Gradients are small integers that depend on the parameters, with learning
//! rate 1, so every sum is exact in f32 in any order: a synchronous run has
//! one correct trajectory, computed beforehand, and every replica must be on
//! it bit for bit.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::ops::Range;

use collective::{Collective, CollectiveConfig, Command as CCmd, Direction, Event as CEv, Kind, RecvOp, Tag};
use coordinator::{Command as KCmd, Coordinator, Event as KEv, Outcome};
use tensor::{Layout, ParamKind, Rng};
use wire::msg::{FromCoordinator, Role, ToCoordinator};

use crate::faults::{Fault, FaultMix, FaultPlan};
use crate::net::{LinkSpec, Network};
use crate::queue::{Nanos, Queue};
use crate::trace::{Trace, checksum};

const MS: Nanos = 1_000_000;
/// A collective, a pull or an acknowledgement waiting this long without progress fails.
pub const WAIT_TIMEOUT_NS: Nanos = 1_000 * MS;
const HEARTBEAT_INTERVAL_NS: Nanos = 200 * MS;
const HEARTBEAT_TIMEOUT_MS: u64 = 1_000;
const TICK_NS: Nanos = 100 * MS;
const RENDEZVOUS_TIMEOUT_MS: u64 = 3_000;
/// The launcher's pause before it restarts a failed job.
const RESTART_DELAY_NS: Nanos = 200 * MS;
/// Bytes of a control message on the wire (postcard messages are tens of bytes).
const CONTROL_BYTES: u64 = 64;
/// Unacknowledged pushes per shard (`node::ps_client::PUSH_WINDOW`).
const PUSH_WINDOW: u64 = 2;
/// Events one run may take before it counts as a livelock.
pub const EVENTS_MAX: u64 = 20_000_000;
/// Most job attempts before a run counts as a livelock.
pub const ATTEMPTS_MAX: u32 = 1_000;

/// A protocol bug the simulator can inject to show that it finds it. The
/// injection is the simulator's own: the production engines carry no switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// The off-by-one the SSP rule once had: a pull is answered
    /// `staleness + 1` steps ahead of the slowest worker. The simulator
    /// builds each shard with a bound one higher than the job's, and its
    /// `ssp-bound` invariant checks the job's.
    SspOffByOne,
    /// A replicated shard's primary acknowledging a push before its backup
    /// holds it. The simulator releases the acknowledgement the engine holds
    /// as soon as the primary applied the push (and swallows the engine's own
    /// release later); its `ack-needs-backup` invariant checks the backup.
    AckWithoutBackup,
}

impl Bug {
    /// The name `--bug` takes.
    pub fn name(self) -> &'static str {
        match self {
            Bug::SspOffByOne => "ssp-off-by-one",
            Bug::AckWithoutBackup => "ack-without-backup",
        }
    }
}

impl std::str::FromStr for Bug {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ssp-off-by-one" => Ok(Bug::SspOffByOne),
            "ack-without-backup" => Ok(Bug::AckWithoutBackup),
            _ => Err(format!("unknown bug `{s}` (known: ssp-off-by-one, ack-without-backup)")),
        }
    }
}

/// One simulated job.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    pub seed: u64,
    pub workers: u32,
    /// Parameter-server shards; 0 runs an all-reduce job.
    pub servers: u32,
    /// Replicas per shard: 1, or 2 (a primary and a backup, `ps::Replica`).
    pub replicas: u32,
    pub steps: u64,
    pub faults: FaultMix,
    pub consistency: ps::Consistency,
    /// Parameters (f32s).
    pub params: usize,
    pub segment_elems: usize,
    /// All-reduces of at most this many bytes use recursive doubling.
    pub small_message_bytes_max: usize,
    pub checkpoint_every: u64,
    pub compute_ns: Nanos,
    pub link: LinkSpec,
    pub bug: Option<Bug>,
    /// Keep the trace's text, not only its hash.
    pub keep_trace: bool,
    /// Faults added to the ones the seed draws (tests kill a chosen node at a chosen time).
    pub scripted_faults: Vec<(Nanos, Fault)>,
}

impl SimConfig {
    pub fn new(seed: u64, workers: u32, servers: u32, steps: u64, faults: FaultMix) -> Self {
        SimConfig {
            seed,
            workers,
            servers,
            replicas: 1,
            steps,
            faults,
            consistency: ps::Consistency::Ssp { staleness: 2 },
            params: 96,
            segment_elems: 8,
            small_message_bytes_max: 64,
            checkpoint_every: 5,
            compute_ns: 10 * MS,
            link: LinkSpec::new(1e9, 50_000),
            bug: None,
            keep_trace: false,
            scripted_faults: Vec::new(),
        }
    }

    /// Nodes of the job: workers, every replica of every shard, the coordinator.
    pub fn nodes(&self) -> u32 {
        self.workers + self.servers * self.replicas + 1
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(1..=64).contains(&self.workers) {
            return Err(format!("--workers {} is outside 1..=64", self.workers));
        }
        if self.servers > 16 {
            return Err(format!("--servers {} is outside 0..=16", self.servers));
        }
        if !(1..=100_000).contains(&self.steps) {
            return Err(format!("--steps {} is outside 1..=100000", self.steps));
        }
        if self.params == 0 || self.params > 1 << 20 {
            return Err(format!("{} parameters is outside 1..=1048576", self.params));
        }
        if self.servers > 0 && (self.params as u64) < u64::from(self.servers) {
            return Err("fewer parameters than servers".into());
        }
        if self.segment_elems == 0 || self.checkpoint_every == 0 {
            return Err("segment_elems and checkpoint_every must be positive".into());
        }
        if !(1..=2).contains(&self.replicas) || (self.replicas == 2 && self.servers == 0) {
            return Err(format!("{} replicas per shard: 1, or 2 with --servers", self.replicas));
        }
        if self.bug.is_some() && self.servers == 0 {
            return Err("the ssp-off-by-one bug is injected into the parameter server: give --servers".into());
        }
        if self.bug == Some(Bug::AckWithoutBackup) && self.replicas != 2 {
            return Err("the ack-without-backup bug needs replicated shards".into());
        }
        Ok(())
    }
}

/// An invariant that did not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub seed: u64,
    /// The event (counted from 1) after which it was seen.
    pub event: u64,
    pub at: Nanos,
    pub invariant: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: invariant `{}` broken at event {} (t = {:.3} ms): {}",
            self.seed,
            self.invariant,
            self.event,
            self.at as f64 / 1e6,
            self.detail
        )
    }
}

/// What one run did.
#[derive(Debug)]
pub struct RunReport {
    pub seed: u64,
    pub finished: bool,
    pub violation: Option<Violation>,
    pub events: u64,
    pub virtual_ns: Nanos,
    /// Job attempts (1 when nothing failed).
    pub attempts: u32,
    pub trace: Trace,
    pub plan: FaultPlan,
    pub wire_bytes: u64,
    pub messages: u64,
    /// Replicated shards: crashes of a shard's primary and of its backup
    /// while a job attempt ran, and backups promoted.
    pub primary_kills: u32,
    pub backup_kills: u32,
    pub failovers: u32,
}

#[derive(Debug)]
enum Msg {
    ToCoord(ToCoordinator),
    FromCoord(FromCoordinator),
    Frame {
        tag: Tag,
        data: Vec<f32>,
    },
    Pull(ps::Pull),
    Push(ps::Push),
    Pulled {
        clock: u64,
        dense: Vec<f32>,
    },
    Pushed {
        clock: u64,
    },
    /// Primary → backup: replication entry `seq`, worker `worker`'s push.
    Entry {
        seq: u64,
        worker: u32,
        push: ps::Push,
    },
    /// Primary → a new backup.
    Snapshot(Box<ps::Snapshot>),
    /// Backup → primary: every entry below `next` is applied.
    Applied {
        next: u64,
    },
}

impl Msg {
    fn bytes(&self) -> u64 {
        let head = ps::msg::HEAD_BYTES as u64;
        match self {
            Msg::ToCoord(_) | Msg::FromCoord(_) => CONTROL_BYTES,
            Msg::Frame { data, .. } => 4 * data.len() as u64,
            Msg::Pull(_) | Msg::Pushed { .. } | Msg::Applied { .. } => head,
            Msg::Push(p) | Msg::Entry { push: p, .. } => head + 4 * p.dense.len() as u64,
            Msg::Snapshot(s) => head + 4 * s.image.len() as u64 + 8 * s.clocks.len() as u64,
            Msg::Pulled { dense, .. } => head + 4 * dense.len() as u64,
        }
    }

    fn name(&self) -> String {
        match self {
            Msg::ToCoord(m) => format!("{:?}", m),
            Msg::FromCoord(FromCoordinator::Welcome { generation, rank, .. }) => {
                format!("Welcome g{generation} r{rank}")
            }
            Msg::FromCoord(m) => format!("{m:?}"),
            Msg::Frame { tag, data } => format!("frame {} [{}]", tag_short(*tag), data.len()),
            Msg::Pull(p) => format!("pull c{}", p.clock),
            Msg::Push(p) => format!("push c{}", p.clock),
            Msg::Pulled { clock, .. } => format!("pulled c{clock}"),
            Msg::Pushed { clock } => format!("pushed c{clock}"),
            Msg::Entry { seq, worker, push } => format!("entry {seq} w{worker} c{}", push.clock),
            Msg::Snapshot(s) => format!("snapshot next {} clocks {:?}", s.next_seq, s.clocks),
            Msg::Applied { next } => format!("applied <{next}"),
        }
    }
}

fn tag_short(t: Tag) -> String {
    format!("{}.{:?}.{}.{}", t.op(), t.phase(), t.step(), t.segment())
}

#[derive(Debug)]
enum Ev {
    Fault(usize),
    Heal(usize),
    Restart(u32),
    SlowEnd(u32),
    SafetyEnd,
    LivenessDeadline,
    Launch,
    Deliver {
        inc: u32,
        from: u32,
        to: u32,
        /// The lives of `from` and `to` when it was sent (see `Sim::life`).
        lives: (u32, u32),
        msg: Msg,
    },
    /// Replicated shards: the peers of a crashed replica see its connections reset.
    ServerLost {
        inc: u32,
        node: u32,
        life: u32,
    },
    Egress {
        inc: u32,
        node: u32,
        peer: u32,
        tag: Tag,
        range: Range<usize>,
        arrive: Nanos,
        sent: Nanos,
    },
    SendDone {
        inc: u32,
        node: u32,
        peer: u32,
        tag: Tag,
    },
    RecvDone {
        inc: u32,
        node: u32,
        peer: u32,
        tag: Tag,
    },
    ComputeDone {
        inc: u32,
        node: u32,
        step: u64,
    },
    Broken {
        inc: u32,
        node: u32,
        peer: u32,
    },
    CoordDisconnected {
        inc: u32,
        conn: u32,
    },
    Tick {
        inc: u32,
    },
    Heartbeat {
        inc: u32,
        node: u32,
    },
    Deadline {
        inc: u32,
        node: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Joining,
    Computing(u64),
    Reducing(u64),
    WaitPull(u64),
    WaitAck(u64),
    Draining,
    Finished,
    Failed,
}

/// The runtime side of one collective: the caller's buffer and the queues.
struct Coll {
    /// The op id as tags carry it (the step, modulo 2^24).
    op: u32,
    engine: Collective,
    buf: Vec<f32>,
    recvs: BTreeMap<u32, VecDeque<(Tag, Range<usize>, RecvOp)>>,
    outstanding: Vec<(Direction, u32, Tag, Range<usize>)>,
}

struct PendingPull {
    got: Vec<Option<Vec<f32>>>,
    waiting: usize,
}

struct WorkerProc {
    rank: u32,
    params: Vec<f32>,
    grad: Vec<f32>,
    /// The next step to compute.
    step: u64,
    phase: Phase,
    /// Waiting since (the last progress), when waiting on a peer.
    wait_since: Option<Nanos>,
    deadline_at: Option<Nanos>,
    /// Frames that arrived before their receive was issued (socket buffers).
    arrived: BTreeMap<u32, VecDeque<(Tag, Vec<f32>)>>,
    coll: Option<Coll>,
    /// Parameter-server client: pulls in flight by clock, pushes acknowledged per shard.
    pulls: BTreeMap<u64, PendingPull>,
    acked: Vec<u64>,
    /// Per shard, the pushes sent and not acknowledged, oldest first: resent
    /// to a promoted backup (`node::ps_client` keeps them likewise).
    unacked: Vec<VecDeque<ps::Push>>,
}

struct ServerProc {
    shard: ps::Shard,
    /// Pushes handed to the shard, per worker (the simulator's own count).
    delivered: Vec<u64>,
    /// What the values must be: the initial values minus every push applied once.
    expected: Vec<f32>,
    /// BSP: sums of steps not complete yet.
    bsp: BTreeMap<u64, (u32, Vec<f32>)>,
    bsp_applied: u64,
    /// The coordinator's welcome came: the shard heartbeats.
    welcomed: bool,
}

/// One replica of a replicated shard (`SimConfig::replicas == 2`).
struct ReplicaProc {
    shard: u32,
    /// `None` while a new backup waits for its snapshot.
    engine: Option<ps::Replica>,
    /// Pushes handed to this replica per worker (the simulator's own count,
    /// from the pushes and entries it delivered and the snapshot's clocks).
    taken: Vec<u64>,
    /// What the values must be: the initial values minus each push the
    /// replica's clocks say it holds (BSP: of each step applied), once.
    expected: Vec<f32>,
    counted: Vec<u64>,
    bsp_counted: u64,
    /// `Bug::AckWithoutBackup`: acknowledgements the simulator released
    /// early, swallowed when the engine releases them.
    early: BTreeSet<(u32, u64)>,
}

/// Who serves a replicated shard now, as the coordinator would record it.
struct Pair {
    primary: u32,
    /// The backup attached to the primary (loading its snapshot, or loaded).
    backup: Option<u32>,
    /// The attached backup's clocks as last seen (kept when it dies).
    backup_clocks: Vec<u64>,
    /// Acknowledgements released per worker by the shard's primaries.
    released: Vec<u64>,
    /// Every push the workers sent it in this attempt, by (worker, clock).
    pushes: BTreeMap<(u32, u64), Vec<f32>>,
}

enum Proc {
    Down,
    Idle,
    Worker(Box<WorkerProc>),
    Server(Box<ServerProc>),
    Replica(Box<ReplicaProc>),
}

/// Runs one job to its end, or to the first violated invariant.
pub fn run(cfg: &SimConfig) -> RunReport {
    let mut sim = Sim::new(cfg.clone());
    sim.main_loop();
    let (wire_bytes, messages) = sim.net.totals();
    RunReport {
        seed: cfg.seed,
        finished: sim.finished,
        violation: sim.violation,
        events: sim.events,
        virtual_ns: sim.q.now(),
        attempts: sim.attempts,
        trace: sim.trace,
        plan: sim.plan,
        wire_bytes,
        messages,
        primary_kills: sim.primary_kills,
        backup_kills: sim.backup_kills,
        failovers: sim.failovers,
    }
}

struct Sim {
    cfg: SimConfig,
    q: Queue<Ev>,
    net: Network,
    plan: FaultPlan,
    rng_net: Rng,
    trace: Trace,
    events: u64,
    violation: Option<Violation>,
    finished: bool,
    /// The job attempt; events of earlier attempts are dropped.
    inc: u32,
    attempts: u32,
    launch_pending: bool,
    liveness: bool,
    /// The current attempt was launched in the liveness phase, with every
    /// node up and no fault to come: it must finish.
    attempt_fault_free: bool,
    procs: Vec<Proc>,
    up: Vec<bool>,
    slow: Vec<u32>,
    partitions: Vec<Option<(Vec<bool>, Nanos)>>,
    coord: Option<Coordinator>,
    coord_over: bool,
    /// Parameters after step k of the fault-free run.
    reference: Vec<Vec<f32>>,
    /// Checkpoints: step → each rank's parameters.
    checkpoints: BTreeMap<u64, Vec<Option<Vec<f32>>>>,
    layout: Layout,
    placement: Option<ps::Placement>,
    /// Workers that reported `Finished` in this attempt.
    finished_sent: Vec<bool>,
    /// Each shard's dense ranges of the global buffer.
    shard_ranges: Vec<Vec<Range<usize>>>,
    /// Per node, how many times it crashed or restarted: a message is lost
    /// when either end's life changed while it was in flight (replicated jobs).
    life: Vec<u32>,
    /// Replicated shards: who serves each.
    pairs: Vec<Pair>,
    primary_kills: u32,
    backup_kills: u32,
    failovers: u32,
}

impl Sim {
    fn new(cfg: SimConfig) -> Sim {
        let nodes = cfg.nodes();
        let mut plan_rng = Rng::derive(cfg.seed, 1);
        let job_ns = cfg.steps * (cfg.compute_ns + 2 * MS);
        let safety_end = if cfg.faults.is_none() {
            0
        } else {
            job_ns / 2 + plan_rng.below(job_ns * 2 + 1)
        };
        // Scripted faults happen in the safety phase: it lasts until the last one is over.
        let scripted_end = cfg
            .scripted_faults
            .iter()
            .map(|(at, f)| {
                match f {
                    Fault::Crash { restart_at, .. } => *restart_at,
                    Fault::Partition { until, .. } | Fault::Slow { until, .. } => *until,
                }
                .max(*at)
            })
            .max();
        let safety_end = safety_end.max(scripted_end.map_or(0, |t| t + 1));
        let mut plan = FaultPlan::draw(cfg.faults, nodes, safety_end, &mut plan_rng);
        plan.faults.extend(cfg.scripted_faults.iter().cloned());
        plan.faults.sort_by_key(|(t, _)| *t);
        let mut layout = Layout::new();
        layout.push("w", &[cfg.params], ParamKind::Dense);
        let placement = (cfg.servers > 0).then(|| {
            ps::Placement::new(ps::PlacementSpec::hashed(cfg.servers, 8), &layout).expect("validated shard count")
        });
        let reference = reference_run(&cfg);
        let shard_ranges = placement
            .as_ref()
            .map(|p| (0..cfg.servers).map(|s| p.dense_ranges(s).to_vec()).collect())
            .unwrap_or_default();
        let mut sim = Sim {
            net: Network::new(nodes as usize, cfg.link.clone()),
            q: Queue::new(),
            rng_net: Rng::derive(cfg.seed, 2),
            trace: Trace::new(cfg.keep_trace),
            events: 0,
            violation: None,
            finished: false,
            inc: 0,
            attempts: 0,
            launch_pending: false,
            liveness: false,
            attempt_fault_free: false,
            procs: (0..nodes).map(|_| Proc::Idle).collect(),
            up: vec![true; nodes as usize],
            slow: vec![1; nodes as usize],
            partitions: Vec::new(),
            coord: None,
            coord_over: false,
            reference,
            checkpoints: BTreeMap::new(),
            layout,
            placement,
            shard_ranges,
            finished_sent: vec![false; cfg.workers as usize],
            life: vec![0; nodes as usize],
            pairs: Vec::new(),
            primary_kills: 0,
            backup_kills: 0,
            failovers: 0,
            plan,
            cfg,
        };
        for (i, (at, _)) in sim.plan.faults.iter().enumerate() {
            sim.q.push(*at, Ev::Fault(i));
        }
        sim.q.push(sim.plan.safety_end, Ev::SafetyEnd);
        sim.q.push(0, Ev::Launch);
        sim
    }

    fn coord_node(&self) -> u32 {
        self.cfg.nodes() - 1
    }

    fn replicated(&self) -> bool {
        self.cfg.replicas > 1
    }

    /// The shard a server node serves (any replica).
    fn shard_of(&self, node: u32) -> u32 {
        (node - self.cfg.workers) % self.cfg.servers
    }

    /// The node workers send a shard's pulls and pushes to.
    fn primary_node(&self, shard: u32) -> u32 {
        match self.pairs.get(shard as usize) {
            Some(p) if self.replicated() => p.primary,
            _ => self.cfg.workers + shard,
        }
    }

    fn now(&self) -> Nanos {
        self.q.now()
    }

    fn record(&mut self, what: fmt::Arguments<'_>) {
        let now = self.now();
        self.trace.record(now, what);
    }

    fn violate(&mut self, invariant: &'static str, detail: String) {
        if self.violation.is_none() {
            let now = self.now();
            self.trace.record(now, format_args!("VIOLATION {invariant}: {detail}"));
            self.violation = Some(Violation {
                seed: self.cfg.seed,
                event: self.events,
                at: now,
                invariant,
                detail,
            });
        }
    }

    fn main_loop(&mut self) {
        while self.violation.is_none() && !self.finished {
            let Some((_, ev)) = self.q.pop() else {
                self.violate("liveness", "nothing left to happen and the job has not finished".into());
                break;
            };
            self.events += 1;
            if self.events > EVENTS_MAX || self.attempts > ATTEMPTS_MAX {
                let detail = format!(
                    "{} events and {} attempts without finishing",
                    self.events, self.attempts
                );
                self.violate("liveness", detail);
                break;
            }
            self.handle(ev);
            self.check_deadlines();
            if self.replicated() && self.violation.is_none() {
                self.check_replicas();
            }
        }
    }

    /// No wait outlives its deadline: the deadline event fires exactly at it.
    fn check_deadlines(&mut self) {
        let now = self.now();
        let mut late = None;
        for p in &self.procs {
            if let Proc::Worker(w) = p
                && let Some(since) = w.wait_since
                && now > since + WAIT_TIMEOUT_NS
            {
                late = Some((w.rank, since));
            }
        }
        if let Some((rank, since)) = late {
            self.violate(
                "deadline",
                format!(
                    "worker {rank} has waited {:.3} ms, past its {} ms deadline",
                    (now - since) as f64 / 1e6,
                    WAIT_TIMEOUT_NS / MS
                ),
            );
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Fault(i) => self.fault(i),
            Ev::Heal(i) => {
                if let Some(p) = self.partitions.get_mut(i) {
                    *p = None;
                }
                self.record(format_args!("heal partition {i}"));
            }
            Ev::Restart(node) => {
                if !self.up[node as usize] {
                    self.up[node as usize] = true;
                    self.procs[node as usize] = Proc::Idle;
                    self.life[node as usize] += 1;
                    self.record(format_args!("restart node {node}"));
                    if self.launch_pending {
                        self.q.push(self.now(), Ev::Launch);
                    }
                    if self.replicated() && node >= self.cfg.workers && node < self.coord_node() {
                        self.replica_restarted(node);
                    }
                }
            }
            Ev::SlowEnd(node) => self.slow[node as usize] = 1,
            Ev::SafetyEnd => {
                self.liveness = true;
                self.record(format_args!("safety phase over: faults off"));
                self.partitions.iter_mut().for_each(|p| *p = None);
                self.slow.iter_mut().for_each(|s| *s = 1);
                for n in 0..self.up.len() as u32 {
                    self.handle(Ev::Restart(n));
                }
                let budget = 10_000 * MS + self.cfg.steps * (4 * self.cfg.compute_ns + 20 * MS);
                self.q.push(self.now() + budget, Ev::LivenessDeadline);
            }
            Ev::LivenessDeadline => {
                let detail = format!(
                    "the job did not finish within the liveness phase ({} attempts)",
                    self.attempts
                );
                self.violate("liveness", detail);
            }
            Ev::Launch => self.launch(),
            Ev::Deliver {
                inc,
                from,
                to,
                lives,
                msg,
            } => {
                let alive = (self.life[from as usize], self.life[to as usize]) == lives;
                if inc == self.inc && (alive || !self.replicated()) {
                    self.deliver(from, to, msg);
                }
            }
            Ev::ServerLost { inc, node, life } => {
                if inc == self.inc && self.life[node as usize] == life {
                    self.server_lost(node);
                }
            }
            Ev::Egress {
                inc,
                node,
                peer,
                tag,
                range,
                arrive,
                sent,
            } => {
                if inc != self.inc {
                    return;
                }
                let Some(w) = self.worker(node) else { return };
                let Some(c) = w.coll.as_ref().filter(|c| c.op == tag.op()) else {
                    return;
                };
                let data = c.buf[range].to_vec();
                let lives = (self.life[node as usize], self.life[peer as usize]);
                self.q.push(
                    arrive,
                    Ev::Deliver {
                        inc,
                        from: node,
                        to: peer,
                        lives,
                        msg: Msg::Frame { tag, data },
                    },
                );
                self.q.push(sent, Ev::SendDone { inc, node, peer, tag });
            }
            Ev::SendDone { inc, node, peer, tag } => {
                if inc == self.inc {
                    self.completion(node, peer, tag, Direction::Send);
                }
            }
            Ev::RecvDone { inc, node, peer, tag } => {
                if inc == self.inc {
                    self.completion(node, peer, tag, Direction::Recv);
                }
            }
            Ev::ComputeDone { inc, node, step } => {
                if inc == self.inc {
                    self.compute_done(node, step);
                }
            }
            Ev::Broken { inc, node, peer } => {
                if inc == self.inc {
                    self.broken(node, peer);
                }
            }
            Ev::CoordDisconnected { inc, conn } => {
                if inc == self.inc {
                    self.record(format_args!("coordinator: connection {conn} closed"));
                    self.coordinator(KEv::Disconnected { conn: conn as u64 });
                }
            }
            Ev::Tick { inc } => {
                if inc == self.inc && self.coord.is_some() {
                    self.coordinator(KEv::Tick);
                    self.q.push(self.now() + TICK_NS, Ev::Tick { inc });
                }
            }
            Ev::Heartbeat { inc, node } => {
                if inc != self.inc {
                    return;
                }
                let step = match &self.procs[node as usize] {
                    Proc::Worker(w) if !matches!(w.phase, Phase::Joining | Phase::Failed | Phase::Finished) => w.step,
                    // A shard heartbeats from its welcome until the job ends, with
                    // step 0, as `node::server` does.
                    Proc::Server(_) => 0,
                    _ => return,
                };
                self.send(node, self.coord_node(), Msg::ToCoord(ToCoordinator::Heartbeat { step }));
                self.q
                    .push(self.now() + HEARTBEAT_INTERVAL_NS, Ev::Heartbeat { inc, node });
            }
            Ev::Deadline { inc, node } => {
                if inc == self.inc {
                    self.deadline(node);
                }
            }
        }
    }

    fn worker(&mut self, node: u32) -> Option<&mut WorkerProc> {
        match self.procs.get_mut(node as usize) {
            Some(Proc::Worker(w)) => Some(w),
            _ => None,
        }
    }

    // --- faults --------------------------------------------------------------------------------

    fn fault(&mut self, i: usize) {
        let (_, fault) = self.plan.faults[i].clone();
        match fault {
            Fault::Partition { side, until } => {
                let id = self.partitions.len();
                let cut: Vec<usize> = (0..side.len()).filter(|&n| side[n]).collect();
                self.record(format_args!("partition {id}: {cut:?} cut off until {until}"));
                self.partitions.push(Some((side, until)));
                self.q.push(until, Ev::Heal(id));
            }
            Fault::Crash { node, restart_at } => {
                if !self.up[node as usize] {
                    return;
                }
                self.record(format_args!("crash node {node}, restart at {restart_at}"));
                let was = std::mem::replace(&mut self.procs[node as usize], Proc::Down);
                self.up[node as usize] = false;
                self.life[node as usize] += 1;
                self.q.push(restart_at, Ev::Restart(node));
                if matches!(was, Proc::Idle) {
                    return;
                }
                // The kernel resets the dead process's connections.
                let at = self.now() + self.cfg.link.latency_ns;
                let inc = self.inc;
                if let Proc::Replica(r) = &was {
                    let pair = &self.pairs[r.shard as usize];
                    if pair.primary == node {
                        self.primary_kills += 1;
                    } else if pair.backup == Some(node) {
                        self.backup_kills += 1;
                    }
                    let life = self.life[node as usize];
                    self.q.push(at, Ev::ServerLost { inc, node, life });
                    return;
                }
                self.q.push(at, Ev::CoordDisconnected { inc, conn: node });
                for peer in self.data_peers(node) {
                    self.q.push(
                        at,
                        Ev::Broken {
                            inc,
                            node: peer,
                            peer: node,
                        },
                    );
                }
            }
            Fault::Slow { node, factor, until } => {
                self.record(format_args!("node {node} computes {factor}x slower until {until}"));
                self.slow[node as usize] = factor;
                self.q.push(until, Ev::SlowEnd(node));
            }
        }
    }

    /// Nodes holding a data connection to `node`.
    fn data_peers(&self, node: u32) -> Vec<u32> {
        let (w, s) = (self.cfg.workers, self.cfg.servers);
        if s > 0 {
            return if node < w {
                (w..w + s).collect()
            } else {
                (0..w).collect()
            };
        }
        if w < 2 {
            return Vec::new();
        }
        let mut peers = vec![(node + 1) % w, (node + w - 1) % w];
        if self.all_reduce_kind() == Kind::AllReduce(collective::Algorithm::RecursiveDoubling) {
            peers = (0..w).filter(|&p| p != node).collect();
        }
        peers.sort_unstable();
        peers.dedup();
        peers
    }

    fn separated(&self, a: u32, b: u32) -> Option<Nanos> {
        self.partitions
            .iter()
            .flatten()
            .filter(|(side, _)| side[a as usize] != side[b as usize])
            .map(|(_, until)| *until)
            .max()
    }

    /// Hands a message to the network; it arrives as a `Deliver` event.
    fn send(&mut self, from: u32, to: u32, msg: Msg) {
        let extra = self.fault_delay(from, to);
        let transit = self.net.transmit(self.now(), from, to, msg.bytes(), extra);
        self.q.push(
            transit.arrive,
            Ev::Deliver {
                inc: self.inc,
                from,
                to,
                lives: (self.life[from as usize], self.life[to as usize]),
                msg,
            },
        );
    }

    fn fault_delay(&mut self, from: u32, to: u32) -> Nanos {
        let now = self.now();
        let mut extra = self.plan.message_delay(now, &mut self.rng_net);
        if let Some(until) = self.separated(from, to) {
            // TCP retransmits until the partition heals; the next retry after it gets through.
            let held = until + self.rng_net.below(self.plan.rto_ns) - now;
            extra = extra.max(held);
        }
        extra
    }

    // --- job attempts --------------------------------------------------------------------------

    fn launch(&mut self) {
        if self.finished || self.coord.is_some() {
            return;
        }
        if self.up.iter().any(|u| !u) {
            self.launch_pending = true;
            self.record(format_args!("launch waits for crashed nodes"));
            return;
        }
        self.launch_pending = false;
        self.attempts += 1;
        self.attempt_fault_free = self.liveness;
        self.finished_sent.iter_mut().for_each(|f| *f = false);
        self.coord_over = false;
        let (start, params) = self.resume_point();
        let attempt = self.attempts;
        self.record(format_args!("launch attempt {attempt} at step {start}"));
        // Replicated shards do not join the coordinator: the simulator plays
        // its part for them (`coordinator::servers`), see `server_lost`.
        let joining_servers = if self.replicated() { 0 } else { self.cfg.servers };
        self.coord = Some(Coordinator::new(coordinator::Config {
            world: self.cfg.workers,
            servers: joining_servers,
            heartbeat_timeout_ms: HEARTBEAT_TIMEOUT_MS,
            rendezvous_timeout_ms: RENDEZVOUS_TIMEOUT_MS,
            elastic: None,
        }));
        let (w, s) = (self.cfg.workers, self.cfg.servers);
        for rank in 0..w {
            self.procs[rank as usize] = Proc::Worker(Box::new(WorkerProc {
                rank,
                params: params.clone(),
                grad: vec![0.0; self.cfg.params],
                step: start,
                phase: Phase::Joining,
                wait_since: None,
                deadline_at: None,
                arrived: BTreeMap::new(),
                coll: None,
                pulls: BTreeMap::new(),
                acked: vec![0; s as usize],
                unacked: vec![VecDeque::new(); s as usize],
            }));
        }
        if self.replicated() {
            self.launch_replicas();
        } else {
            for shard in 0..s {
                let proc = self.new_server(shard);
                self.procs[(w + shard) as usize] = proc;
            }
        }
        let coord = self.coord_node();
        for node in 0..w + joining_servers {
            let role = if node < w { Role::Worker } else { Role::Server };
            let rank = if node < w { node } else { node - w };
            let join = ToCoordinator::Join {
                role,
                rank: Some(rank),
                data_addr: format!("node{node}"),
                pid: node,
            };
            self.send(node, coord, Msg::ToCoord(join));
        }
        let inc = self.inc;
        self.q.push(self.now() + TICK_NS, Ev::Tick { inc });
    }

    /// Where a new attempt starts: the newest complete checkpoint (all-reduce) or the beginning.
    fn resume_point(&self) -> (u64, Vec<f32>) {
        if self.cfg.servers == 0
            && let Some((&step, parts)) = self
                .checkpoints
                .iter()
                .rev()
                .find(|(_, parts)| parts.iter().all(Option::is_some))
        {
            return (step, parts[0].clone().expect("complete"));
        }
        (0, self.reference[0].clone())
    }

    fn new_server(&self, shard: u32) -> Proc {
        let (engine, init) = self.new_shard(shard);
        Proc::Server(Box::new(ServerProc {
            shard: engine,
            delivered: vec![0; self.cfg.workers as usize],
            expected: init,
            bsp: BTreeMap::new(),
            bsp_applied: 0,
            welcomed: false,
        }))
    }

    /// A fresh shard engine and its initial values.
    fn new_shard(&self, shard: u32) -> (ps::Shard, Vec<f32>) {
        let placement = self.placement.as_ref().expect("a parameter-server job");
        let local = ps::LocalLayout::new(&self.layout, placement, shard);
        let mut init = Vec::new();
        local.gather(&self.layout, &self.reference[0], &mut init);
        let sgd = optim::OptimConfig::Sgd(optim::SgdConfig {
            lr: 1.0,
            ..optim::SgdConfig::default()
        });
        let consistency = match (self.cfg.bug, self.cfg.consistency) {
            (Some(Bug::SspOffByOne), ps::Consistency::Ssp { staleness }) => ps::Consistency::Ssp {
                staleness: staleness + 1,
            },
            (_, consistency) => consistency,
        };
        let engine = ps::Shard::new(
            shard,
            self.cfg.workers,
            consistency,
            &sgd,
            &self.layout,
            placement,
            init.clone(),
        )
        .expect("a valid shard");
        (engine, init)
    }

    fn coordinator(&mut self, event: KEv) {
        let now_ms = self.now() / MS;
        let Some(c) = self.coord.as_mut() else { return };
        let commands = c.on_event(now_ms, event);
        let coord = self.coord_node();
        for cmd in commands {
            match cmd {
                KCmd::Send { conn, msg } => self.send(coord, conn as u32, Msg::FromCoord(msg)),
                KCmd::Exit(outcome) => self.job_over(outcome),
                KCmd::Close { conn } => self.record(format_args!("coordinator closes {conn}")),
                _ => {}
            }
        }
    }

    fn job_over(&mut self, outcome: Outcome) {
        if self.coord_over {
            self.violate(
                "one-outcome",
                format!("a second outcome {outcome:?} for one job attempt"),
            );
            return;
        }
        self.coord_over = true;
        let attempt = self.attempts;
        self.record(format_args!("attempt {attempt} over: {outcome:?}"));
        match outcome {
            Outcome::Finished => {
                self.check_final();
                self.finished = true;
            }
            Outcome::Failed { reason, .. } if self.attempt_fault_free => {
                let detail = format!("attempt {attempt} was launched after the faults stopped and failed: {reason}");
                self.violate("liveness", detail);
            }
            Outcome::Failed { .. } => {
                self.inc += 1;
                self.coord = None;
                for p in &mut self.procs {
                    if !matches!(p, Proc::Down) {
                        *p = Proc::Idle;
                    }
                }
                self.net.reset_streams();
                self.q.push(self.now() + RESTART_DELAY_NS, Ev::Launch);
            }
        }
    }

    fn check_final(&mut self) {
        let steps = self.cfg.steps;
        let mut problems = Vec::new();
        let coord = self.coord_node() as usize;
        for (node, p) in self.procs[..coord].iter().enumerate() {
            match p {
                Proc::Worker(w) if w.step != steps || w.phase != Phase::Finished => {
                    problems.push(format!("worker {} is at step {} ({:?})", w.rank, w.step, w.phase));
                }
                Proc::Server(s) if s.delivered.iter().any(|&d| d != steps) => {
                    problems.push(format!(
                        "shard {} took {:?} pushes, not {steps} from each worker",
                        s.shard.index(),
                        s.delivered
                    ));
                }
                // A process that died (and maybe restarted) after every worker reported
                // Finished changes nothing here.
                Proc::Replica(r) => {
                    if let Some(e) = r.engine.as_ref()
                        && self.pairs[r.shard as usize].primary == node as u32
                        && e.shard().clocks().iter().any(|&c| c != steps)
                    {
                        problems.push(format!(
                            "shard {}'s primary took {:?} pushes, not {steps} from each worker",
                            r.shard,
                            e.shard().clocks()
                        ));
                    }
                }
                Proc::Down | Proc::Idle if self.finished_sent.iter().all(|f| *f) => {}
                Proc::Down | Proc::Idle => problems.push("a process of the job is gone".into()),
                _ => {}
            }
        }
        if !problems.is_empty() {
            self.violate("one-outcome", format!("the job finished but {}", problems.join("; ")));
        }
    }

    // --- messages --------------------------------------------------------------------------------

    fn deliver(&mut self, from: u32, to: u32, msg: Msg) {
        if matches!(self.procs[to as usize], Proc::Down | Proc::Idle) && to != self.coord_node() {
            return;
        }
        self.record(format_args!("{from}>{to} {}", msg.name()));
        match msg {
            Msg::ToCoord(m) => self.coordinator(KEv::Message {
                conn: from as u64,
                msg: m,
            }),
            Msg::FromCoord(m) => self.on_coordinator_msg(to, m),
            Msg::Frame { tag, data } => {
                let Some(w) = self.worker(to) else { return };
                w.arrived.entry(from).or_default().push_back((tag, data));
                self.match_frames(to, from);
            }
            Msg::Pull(p) if self.replicated() => self.replica_pull(to, from, p),
            Msg::Push(p) if self.replicated() => self.replica_push(to, from, p),
            Msg::Pull(p) => self.server_pull(to, from, p),
            Msg::Push(p) => self.server_push(to, from, p),
            Msg::Entry { seq, worker, push } => self.replica_entry(to, seq, worker, push),
            Msg::Snapshot(snap) => self.replica_snapshot(to, from, *snap),
            Msg::Applied { next } => self.replica_applied(to, next),
            Msg::Pulled { clock, dense } => self.worker_pulled(to, from, clock, dense),
            Msg::Pushed { clock } => self.worker_pushed(to, from, clock),
        }
    }

    fn on_coordinator_msg(&mut self, node: u32, msg: FromCoordinator) {
        match msg {
            FromCoordinator::Welcome { rank, .. } if node >= self.cfg.workers => {
                self.server_welcomed(node, rank);
            }
            FromCoordinator::Welcome { rank, world, .. } => {
                let inc = self.inc;
                let servers = self.cfg.servers;
                let wn = self.cfg.workers;
                let Some(w) = self.worker(node) else { return };
                if w.phase != Phase::Joining {
                    return;
                }
                let (own, step) = (w.rank, w.step);
                if rank != own || world != wn {
                    let detail = format!("worker {own} was welcomed as rank {rank} of {world}");
                    self.violate("one-outcome", detail);
                    return;
                }
                self.q
                    .push(self.now() + HEARTBEAT_INTERVAL_NS, Ev::Heartbeat { inc, node });
                if servers == 0 && step >= self.cfg.steps {
                    // Resumed from the last step's checkpoint: nothing left to do.
                    if let Some(w) = self.worker(node) {
                        w.phase = Phase::Finished;
                    }
                    self.report_finished(node);
                } else if servers == 0 {
                    self.start_compute(node);
                } else {
                    self.pull_start(node, step);
                    if let Some(w) = self.worker(node) {
                        w.phase = Phase::WaitPull(step);
                    }
                    self.start_wait(node);
                }
            }
            FromCoordinator::Abort { .. } | FromCoordinator::Shutdown => {}
            _ => {}
        }
    }

    /// A shard's welcome starts its heartbeats, as a worker's does: the
    /// coordinator fails a job whose member, worker or server, is silent for
    /// longer than the heartbeat timeout.
    fn server_welcomed(&mut self, node: u32, rank: u32) {
        let inc = self.inc;
        let shard = node - self.cfg.workers;
        let Some(s) = self.server(node) else { return };
        if s.welcomed {
            return;
        }
        s.welcomed = true;
        if rank != shard {
            self.violate("one-outcome", format!("shard {shard} was welcomed as shard {rank}"));
            return;
        }
        self.q
            .push(self.now() + HEARTBEAT_INTERVAL_NS, Ev::Heartbeat { inc, node });
    }

    fn report_finished(&mut self, node: u32) {
        let steps = self.cfg.steps;
        self.finished_sent[node as usize] = true;
        self.send(node, self.coord_node(), Msg::ToCoord(ToCoordinator::Finished { steps }));
    }

    fn broken(&mut self, node: u32, peer: u32) {
        let Some(w) = self.worker(node) else { return };
        if matches!(w.phase, Phase::Finished | Phase::Failed | Phase::Joining) {
            return;
        }
        self.fail_worker(node, format!("connection to node {peer} reset"));
    }

    fn fail_worker(&mut self, node: u32, reason: String) {
        let Some(w) = self.worker(node) else { return };
        w.phase = Phase::Failed;
        w.wait_since = None;
        w.coll = None;
        self.record(format_args!("worker {node} fails: {reason}"));
        self.send(node, self.coord_node(), Msg::ToCoord(ToCoordinator::Failed { reason }));
    }

    // --- waits and deadlines -----------------------------------------------------------------------

    /// The worker waits on a peer from now (or made progress while waiting).
    fn start_wait(&mut self, node: u32) {
        let now = self.now();
        let inc = self.inc;
        let Some(w) = self.worker(node) else { return };
        w.wait_since = Some(now);
        if w.deadline_at.is_none() {
            w.deadline_at = Some(now + WAIT_TIMEOUT_NS);
            self.q.push(now + WAIT_TIMEOUT_NS, Ev::Deadline { inc, node });
        }
    }

    fn deadline(&mut self, node: u32) {
        let now = self.now();
        let inc = self.inc;
        let Some(w) = self.worker(node) else { return };
        w.deadline_at = None;
        let Some(since) = w.wait_since else { return };
        if now < since + WAIT_TIMEOUT_NS {
            w.deadline_at = Some(since + WAIT_TIMEOUT_NS);
            self.q.push(since + WAIT_TIMEOUT_NS, Ev::Deadline { inc, node });
            return;
        }
        let what = match (&w.coll, w.phase) {
            (Some(c), _) => {
                let waiting = c.engine.waiting_on();
                match waiting.first() {
                    Some((peer, tag)) => {
                        format!("all-reduce waited {} ms for rank {peer} ({tag})", WAIT_TIMEOUT_NS / MS)
                    }
                    None => format!("all-reduce waited {} ms to send", WAIT_TIMEOUT_NS / MS),
                }
            }
            (None, phase) => format!("{phase:?} waited {} ms for a server", WAIT_TIMEOUT_NS / MS),
        };
        self.fail_worker(node, what);
    }

    // --- all-reduce workers ------------------------------------------------------------------------

    fn all_reduce_kind(&self) -> Kind {
        let cc = CollectiveConfig {
            small_message_bytes_max: self.cfg.small_message_bytes_max,
            ..CollectiveConfig::default()
        };
        Kind::AllReduce(cc.all_reduce_algorithm(self.cfg.params * 4, self.cfg.workers))
    }

    fn start_compute(&mut self, node: u32) {
        let at = self.now() + self.cfg.compute_ns * u64::from(self.slow[node as usize]);
        let inc = self.inc;
        let Some(w) = self.worker(node) else { return };
        let step = w.step;
        w.phase = Phase::Computing(step);
        w.wait_since = None;
        self.q.push(at, Ev::ComputeDone { inc, node, step });
    }

    fn compute_done(&mut self, node: u32, step: u64) {
        let seed = self.cfg.seed;
        let servers = self.cfg.servers;
        let Some(w) = self.worker(node) else { return };
        if w.phase != Phase::Computing(step) {
            return;
        }
        let mut grad = std::mem::take(&mut w.grad);
        gradient(seed, w.rank, step, &w.params, &mut grad);
        w.grad = grad;
        if servers > 0 {
            w.phase = Phase::WaitAck(step);
            self.ps_advance(node);
            return;
        }
        let kind = self.all_reduce_kind();
        let cc = CollectiveConfig {
            segment_elems: self.cfg.segment_elems,
            small_message_bytes_max: self.cfg.small_message_bytes_max,
            ..CollectiveConfig::default()
        };
        let (world, len) = (self.cfg.workers, self.cfg.params);
        let Some(w) = self.worker(node) else { return };
        let mut engine = match Collective::new(kind, step as u32, w.rank, world, len, &cc) {
            Ok(e) => e,
            Err(e) => {
                self.violate("engine-contract", format!("worker {node}: {e}"));
                return;
            }
        };
        let first = engine.start();
        w.coll = Some(Coll {
            op: Tag::new(step as u32, collective::Phase::ReduceScatter, 0, 0).op(),
            engine,
            buf: w.grad.clone(),
            recvs: BTreeMap::new(),
            outstanding: Vec::new(),
        });
        w.phase = Phase::Reducing(step);
        self.start_wait(node);
        self.execute(node, first);
    }

    fn execute(&mut self, node: u32, commands: Vec<CCmd>) {
        for cmd in commands {
            if self.violation.is_some() {
                return;
            }
            let Some(w) = self.worker(node) else { return };
            let Some(c) = w.coll.as_mut() else { return };
            let broken = match &cmd {
                CCmd::Done => (!c.outstanding.is_empty())
                    .then(|| format!("Done with {} commands outstanding", c.outstanding.len())),
                CCmd::Send { range, .. } | CCmd::Recv { range, .. } => {
                    let is_recv = matches!(cmd, CCmd::Recv { .. });
                    if range.end > c.buf.len() {
                        Some(format!("{cmd:?} beyond a buffer of {}", c.buf.len()))
                    } else {
                        c.outstanding
                            .iter()
                            .find(|(d, _, _, r)| {
                                r.start < range.end && range.start < r.end && (is_recv || *d == Direction::Recv)
                            })
                            .map(|o| format!("{cmd:?} overlaps outstanding {o:?}"))
                    }
                }
            };
            if let Some(detail) = broken {
                self.violate("engine-contract", format!("worker {node}: {detail}"));
                return;
            }
            match cmd {
                CCmd::Send { peer, tag, range } => {
                    c.outstanding.push((Direction::Send, peer, tag, range.clone()));
                    let bytes = 4 * range.len() as u64;
                    let extra = self.fault_delay(node, peer);
                    let t = self.net.transmit(self.now(), node, peer, bytes, extra);
                    let inc = self.inc;
                    self.q.push(
                        t.start,
                        Ev::Egress {
                            inc,
                            node,
                            peer,
                            tag,
                            range,
                            arrive: t.arrive,
                            sent: t.sent,
                        },
                    );
                }
                CCmd::Recv { peer, tag, range, op } => {
                    c.outstanding.push((Direction::Recv, peer, tag, range.clone()));
                    c.recvs.entry(peer).or_default().push_back((tag, range, op));
                    self.match_frames(node, peer);
                }
                CCmd::Done => self.reduced(node),
            }
        }
    }

    /// Applies arrived frames to the receives waiting for them, in order.
    fn match_frames(&mut self, node: u32, peer: u32) {
        let inc = self.inc;
        let Some(w) = self.worker(node) else { return };
        let Some(c) = w.coll.as_mut() else { return };
        let mut done = Vec::new();
        let mut broken = None;
        while let (Some(queue), Some(frames)) = (c.recvs.get_mut(&peer), w.arrived.get_mut(&peer)) {
            if queue.is_empty() || frames.is_empty() {
                break;
            }
            let (tag, range, op) = queue.pop_front().expect("checked");
            let (got, data) = frames.pop_front().expect("checked");
            if got != tag || data.len() != range.len() {
                broken = Some(format!(
                    "worker {node} expected {} [{}] from {peer}, got {} [{}]",
                    tag_short(tag),
                    range.len(),
                    tag_short(got),
                    data.len()
                ));
                break;
            }
            let target = &mut c.buf[range.clone()];
            match op {
                RecvOp::Reduce => target.iter_mut().zip(&data).for_each(|(x, y)| *x += y),
                RecvOp::Copy => target.copy_from_slice(&data),
            }
            let i = c
                .outstanding
                .iter()
                .position(|(d, p, t, _)| (*d, *p, *t) == (Direction::Recv, peer, tag))
                .expect("an issued receive is outstanding");
            c.outstanding.swap_remove(i);
            done.push(tag);
        }
        if let Some(detail) = broken {
            self.violate("frames-match-receives", detail);
            return;
        }
        for tag in done {
            self.q.push(self.now(), Ev::RecvDone { inc, node, peer, tag });
        }
    }

    fn completion(&mut self, node: u32, peer: u32, tag: Tag, direction: Direction) {
        let Some(w) = self.worker(node) else { return };
        let Some(c) = w.coll.as_mut() else { return };
        if c.engine.is_done() || tag.op() != c.op {
            return;
        }
        if direction == Direction::Send {
            let Some(i) = c
                .outstanding
                .iter()
                .position(|(d, p, t, _)| (*d, *p, *t) == (Direction::Send, peer, tag))
            else {
                return;
            };
            c.outstanding.swap_remove(i);
        }
        let event = match direction {
            Direction::Send => CEv::Sent { peer, tag },
            Direction::Recv => CEv::Received { peer, tag },
        };
        match c.engine.on_event(event) {
            Ok(more) => {
                self.start_wait(node);
                self.execute(node, more);
            }
            Err(e) => self.violate("engine-contract", format!("worker {node}: {e}")),
        }
    }

    /// The all-reduce is done: apply the sum, check it, checkpoint, go on.
    fn reduced(&mut self, node: u32) {
        let Some(w) = self.worker(node) else { return };
        let Some(c) = w.coll.take() else { return };
        for (p, g) in w.params.iter_mut().zip(&c.buf) {
            *p -= g;
        }
        self.after_step(node);
    }

    fn after_step(&mut self, node: u32) {
        let steps = self.cfg.steps;
        let every = self.cfg.checkpoint_every;
        let world = self.cfg.workers as usize;
        let Some(w) = self.worker(node) else { return };
        w.step += 1;
        w.wait_since = None;
        let (rank, step) = (w.rank, w.step);
        let sum = checksum(&w.params);
        let want = checksum(&self.reference[step as usize]);
        if sum != want {
            self.violate(
                "replicas-identical",
                format!("worker {rank} after step {step} holds parameters {sum:016x}; the synchronous trajectory has {want:016x}"),
            );
            return;
        }
        let Some(w) = self.worker(node) else { return };
        if step % every == 0 || step == steps {
            let params = w.params.clone();
            let parts = self.checkpoints.entry(step).or_insert_with(|| vec![None; world]);
            parts[rank as usize] = Some(params);
            if parts.iter().all(Option::is_some) {
                self.check_checkpoint(step);
            }
        }
        if step == steps {
            let Some(w) = self.worker(node) else { return };
            w.phase = Phase::Finished;
            self.report_finished(node);
        } else {
            self.start_compute(node);
        }
    }

    /// A complete checkpoint is a consistent cut: every rank's part is the same step's state.
    fn check_checkpoint(&mut self, step: u64) {
        let want = checksum(&self.reference[step as usize]);
        let parts = &self.checkpoints[&step];
        let bad: Vec<usize> = parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.as_ref().map(|p| checksum(p)) != Some(want))
            .map(|(r, _)| r)
            .collect();
        self.record(format_args!("checkpoint {step} complete"));
        if !bad.is_empty() {
            self.violate(
                "checkpoint-consistent-cut",
                format!("checkpoint of step {step}: ranks {bad:?} saved another state"),
            );
        }
    }

    // --- parameter-server workers ------------------------------------------------------------------

    fn pull_start(&mut self, node: u32, clock: u64) {
        let s = self.cfg.servers;
        let Some(worker) = self.worker(node) else { return };
        worker.pulls.insert(
            clock,
            PendingPull {
                got: vec![None; s as usize],
                waiting: s as usize,
            },
        );
        for shard in 0..s {
            let to = self.primary_node(shard);
            self.send(node, to, Msg::Pull(pull_of(clock)));
        }
    }

    fn worker_pulled(&mut self, node: u32, from: u32, clock: u64, dense: Vec<f32>) {
        let shard = self.shard_of(from);
        if from != self.primary_node(shard) {
            // From a primary since replaced: its connection is gone.
            return;
        }
        let want = self.placement.as_ref().map_or(0, |p| p.dense_len(shard));
        let Some(w) = self.worker(node) else { return };
        let Some(p) = w.pulls.get_mut(&clock) else {
            let detail = format!("worker {node} got an answer to a pull of step {clock} it did not make");
            self.violate("engine-contract", detail);
            return;
        };
        if dense.len() != want || p.got[shard as usize].is_some() {
            let detail = format!("shard {shard} answered step {clock} with {} values", dense.len());
            self.violate("engine-contract", detail);
            return;
        }
        p.got[shard as usize] = Some(dense);
        p.waiting -= 1;
        self.start_wait_if_waiting(node);
        self.ps_advance(node);
    }

    fn worker_pushed(&mut self, node: u32, from: u32, clock: u64) {
        let shard = self.shard_of(from) as usize;
        if from != self.primary_node(shard as u32) {
            return;
        }
        let Some(w) = self.worker(node) else { return };
        if clock != w.acked[shard] || w.unacked[shard].front().map(|p| p.clock) != Some(clock) {
            let detail = format!(
                "worker {node}: shard {shard} acknowledged step {clock}, expected {}",
                w.acked[shard]
            );
            self.violate("acked-push-kept", detail);
            return;
        }
        w.acked[shard] += 1;
        w.unacked[shard].pop_front();
        self.start_wait_if_waiting(node);
        self.ps_advance(node);
    }

    fn start_wait_if_waiting(&mut self, node: u32) {
        if self.worker(node).is_some_and(|w| w.wait_since.is_some()) {
            self.start_wait(node);
        }
    }

    /// Moves a parameter-server worker on as far as its replies allow.
    fn ps_advance(&mut self, node: u32) {
        let steps = self.cfg.steps;
        let primaries: Vec<u32> = (0..self.cfg.servers).map(|s| self.primary_node(s)).collect();
        let replicated = self.replicated();
        loop {
            let ranges = &self.shard_ranges;
            let Some(Proc::Worker(w)) = self.procs.get_mut(node as usize) else {
                return;
            };
            match w.phase {
                Phase::WaitPull(k) => {
                    if w.pulls.get(&k).is_none_or(|p| p.waiting > 0) {
                        return;
                    }
                    let pull = w.pulls.remove(&k).expect("checked");
                    for (dense, ranges) in pull.got.into_iter().zip(ranges) {
                        let dense = dense.expect("complete");
                        let mut at = 0;
                        for r in ranges {
                            w.params[r.clone()].copy_from_slice(&dense[at..at + r.len()]);
                            at += r.len();
                        }
                    }
                    if self.cfg.consistency == ps::Consistency::Bsp
                        && checksum(&w.params) != checksum(&self.reference[k as usize])
                    {
                        let detail = format!("worker {node} read step {k}'s parameters off the synchronous trajectory");
                        self.violate("bsp-reads-reference", detail);
                        return;
                    }
                    if k + 1 < steps {
                        self.pull_start(node, k + 1);
                    }
                    self.start_compute(node);
                    return;
                }
                Phase::WaitAck(k) => {
                    if w.acked.iter().any(|&a| a + PUSH_WINDOW <= k) {
                        self.start_wait(node);
                        return;
                    }
                    let pushes: Vec<ps::Push> = ranges
                        .iter()
                        .map(|rs| ps::Push {
                            clock: k,
                            dense: rs.iter().flat_map(|r| w.grad[r.clone()].iter().copied()).collect(),
                            keys: Vec::new(),
                            values: Vec::new(),
                        })
                        .collect();
                    w.step = k + 1;
                    w.phase = if k + 1 < steps {
                        Phase::WaitPull(k + 1)
                    } else {
                        Phase::Draining
                    };
                    for (s, push) in pushes.into_iter().enumerate() {
                        w.unacked[s].push_back(push.clone());
                        if replicated {
                            self.pairs[s].pushes.insert((node, k), push.dense.clone());
                        }
                    }
                    let Some(Proc::Worker(w)) = self.procs.get(node as usize) else {
                        return;
                    };
                    let sends: Vec<(u32, ps::Push)> = primaries
                        .iter()
                        .zip(&w.unacked)
                        .map(|(&to, q)| (to, q.back().expect("just queued").clone()))
                        .collect();
                    for (to, push) in sends {
                        self.send(node, to, Msg::Push(push));
                    }
                    self.start_wait(node);
                }
                Phase::Draining => {
                    if w.acked.iter().any(|&a| a < steps) {
                        return;
                    }
                    w.phase = Phase::Finished;
                    w.wait_since = None;
                    self.report_finished(node);
                    return;
                }
                _ => return,
            }
        }
    }

    // --- parameter-server shards ---------------------------------------------------------------------

    fn server(&mut self, node: u32) -> Option<&mut ServerProc> {
        match self.procs.get_mut(node as usize) {
            Some(Proc::Server(s)) => Some(s),
            _ => None,
        }
    }

    fn server_pull(&mut self, node: u32, worker: u32, pull: ps::Pull) {
        let Some(s) = self.server(node) else { return };
        match s.shard.on_pull(worker, pull) {
            Ok(out) => self.server_outputs(node, out),
            Err(e) => self.violate("engine-contract", format!("shard {}: {e}", node - self.cfg.workers)),
        }
    }

    fn server_push(&mut self, node: u32, worker: u32, push: ps::Push) {
        let bsp = self.cfg.consistency == ps::Consistency::Bsp;
        let workers = self.cfg.workers;
        let Some(s) = self.server(node) else { return };
        let out = match s.shard.on_push(worker, push.clone()) {
            Ok(out) => out,
            Err(e) => {
                self.violate("engine-contract", format!("shard {}: {e}", node - workers));
                return;
            }
        };
        s.delivered[worker as usize] += 1;
        if bsp {
            let e = s
                .bsp
                .entry(push.clock)
                .or_insert_with(|| (0, vec![0.0; push.dense.len()]));
            e.0 += 1;
            e.1.iter_mut().zip(&push.dense).for_each(|(a, b)| *a += b);
            while s.bsp.get(&s.bsp_applied).is_some_and(|(n, _)| *n == workers) {
                let (_, sum) = s.bsp.remove(&s.bsp_applied).expect("checked");
                s.expected.iter_mut().zip(&sum).for_each(|(v, g)| *v -= g);
                s.bsp_applied += 1;
            }
        } else {
            s.expected.iter_mut().zip(&push.dense).for_each(|(v, g)| *v -= g);
        }
        if checksum(s.shard.values()) != checksum(&s.expected) {
            let detail = format!(
                "shard {} after worker {worker}'s push of step {}: its values are not its pushes applied once each",
                node - workers,
                push.clock
            );
            self.violate("acked-push-kept", detail);
            return;
        }
        self.server_outputs(node, out);
    }

    /// The staleness bound the `ssp-bound` invariant enforces (`None`: async).
    fn staleness_bound(&self) -> Option<u64> {
        match self.cfg.consistency {
            ps::Consistency::Bsp => Some(0),
            ps::Consistency::Ssp { staleness } => Some(u64::from(staleness)),
            ps::Consistency::Async => None,
        }
    }

    /// Sends a shard's answer to a read of step `clock`, unless the slowest
    /// worker had pushed fewer than `clock - bound` steps (`ssp-bound`);
    /// false when it broke the bound.
    fn answer_read(&mut self, node: u32, who: &str, worker: u32, clock: u64, dense: Vec<f32>, slowest: u64) -> bool {
        if let Some(bound) = self.staleness_bound()
            && slowest + bound < clock
        {
            let detail = format!(
                "{who} answered worker {worker}'s read of step {clock} while the slowest worker had pushed {slowest} steps (bound {bound})"
            );
            self.violate("ssp-bound", detail);
            return false;
        }
        self.send(node, worker, Msg::Pulled { clock, dense });
        true
    }

    fn server_outputs(&mut self, node: u32, out: Vec<ps::Output>) {
        let workers = self.cfg.workers;
        for o in out {
            let Some(s) = self.server(node) else { return };
            match o {
                ps::Output::Pulled {
                    worker, clock, dense, ..
                } => {
                    let slowest = s.delivered.iter().copied().min().unwrap_or(0);
                    let who = format!("shard {}", node - workers);
                    if !self.answer_read(node, &who, worker, clock, dense, slowest) {
                        return;
                    }
                }
                ps::Output::Pushed { worker, clock } => {
                    if s.delivered[worker as usize] != clock + 1 {
                        let detail = format!(
                            "shard {} acknowledged step {clock} of worker {worker} before taking it",
                            node - workers
                        );
                        self.violate("acked-push-kept", detail);
                        return;
                    }
                    self.send(node, worker, Msg::Pushed { clock });
                }
            }
        }
    }

    // --- replicated shards ---------------------------------------------------------------------------
    //
    // With `replicas == 2` each shard is a primary and a backup node, each a
    // `ps::Replica`. The simulator plays the coordinator's part for them, in
    // the simplest form: it knows at once (one latency after a crash, when
    // the connections reset) which replica died, promotes a ready backup and
    // tells the workers, which resend their unacknowledged pushes and open
    // pulls to it; a restarted node becomes the backup of a shard that lacks
    // one. No message carries this; the real `coordinator::servers` does it
    // over the control connections.

    fn replica(&mut self, node: u32) -> Option<&mut ReplicaProc> {
        match self.procs.get_mut(node as usize) {
            Some(Proc::Replica(r)) => Some(r),
            _ => None,
        }
    }

    fn new_replica_proc(&self, shard: u32, engine: Option<ps::Replica>) -> Proc {
        let (_, init) = self.new_shard(shard);
        let workers = self.cfg.workers as usize;
        Proc::Replica(Box::new(ReplicaProc {
            shard,
            engine,
            taken: vec![0; workers],
            expected: init,
            counted: vec![0; workers],
            bsp_counted: 0,
            early: BTreeSet::new(),
        }))
    }

    /// Every shard's primary and backup, the backup loading the primary's snapshot.
    fn launch_replicas(&mut self) {
        let (w, s) = (self.cfg.workers, self.cfg.servers);
        self.pairs = (0..s)
            .map(|shard| Pair {
                primary: w + shard,
                backup: None,
                backup_clocks: vec![0; w as usize],
                released: vec![0; w as usize],
                pushes: BTreeMap::new(),
            })
            .collect();
        for shard in 0..s {
            let (engine, _) = self.new_shard(shard);
            let proc = self.new_replica_proc(shard, Some(ps::Replica::primary(engine)));
            self.procs[(w + shard) as usize] = proc;
            self.attach_backup(shard, w + s + shard);
        }
    }

    /// `node` becomes the backup of `shard`: the primary ships it a snapshot.
    fn attach_backup(&mut self, shard: u32, node: u32) {
        let primary = self.pairs[shard as usize].primary;
        let Some(engine) = self.replica(primary).and_then(|r| r.engine.as_mut()) else {
            return;
        };
        let snap = match engine.attach_backup() {
            Ok(snap) => snap,
            Err(e) => {
                self.violate("engine-contract", format!("shard {shard}: {e}"));
                return;
            }
        };
        let proc = self.new_replica_proc(shard, None);
        self.procs[node as usize] = proc;
        let pair = &mut self.pairs[shard as usize];
        pair.backup = Some(node);
        pair.backup_clocks.iter_mut().for_each(|c| *c = 0);
        self.record(format_args!(
            "shard {shard}: node {node} attached as backup of node {primary}"
        ));
        self.send(primary, node, Msg::Snapshot(Box::new(snap)));
    }

    /// A server node restarted: if the attempt runs and its shard has a
    /// primary but no backup, it becomes the backup.
    fn replica_restarted(&mut self, node: u32) {
        let shard = self.shard_of(node);
        if self.coord.is_none() || self.coord_over || self.pairs.len() != self.cfg.servers as usize {
            return;
        }
        let pair = &self.pairs[shard as usize];
        if pair.primary == node || pair.backup == Some(node) {
            // Restarted before its peers saw the reset.
            self.server_lost(node);
        }
        let pair = &self.pairs[shard as usize];
        let primary = pair.primary;
        let serving = matches!(&self.procs[primary as usize], Proc::Replica(r) if r.engine.is_some());
        if pair.backup.is_none() && serving && primary != node {
            self.attach_backup(shard, node);
        }
    }

    /// The connections of crashed replica `node` reset: promote its backup,
    /// or tell the primary its backup is gone, or (both down) fail the attempt.
    fn server_lost(&mut self, node: u32) {
        let shard = self.shard_of(node);
        let Some(pair) = self.pairs.get(shard as usize) else {
            return;
        };
        if pair.backup == Some(node) {
            self.pairs[shard as usize].backup = None;
            let primary = self.pairs[shard as usize].primary;
            self.record(format_args!("shard {shard}: backup node {node} lost"));
            if let Some(e) = self.replica(primary).and_then(|r| r.engine.as_mut()) {
                e.backup_lost();
            }
            return;
        }
        if pair.primary != node {
            return;
        }
        let ready = pair
            .backup
            .filter(|&b| matches!(&self.procs[b as usize], Proc::Replica(r) if r.engine.is_some()));
        let Some(backup) = ready else {
            // No replica of the shard survives: its workers' connections reset
            // and the attempt fails, as it does for an unreplicated shard.
            self.record(format_args!(
                "shard {shard}: primary node {node} lost with no ready backup"
            ));
            self.pairs[shard as usize].backup = None;
            let now = self.now();
            let inc = self.inc;
            for worker in 0..self.cfg.workers {
                self.q.push(
                    now,
                    Ev::Broken {
                        inc,
                        node: worker,
                        peer: node,
                    },
                );
            }
            return;
        };
        let Some(r) = self.replica(backup) else { return };
        let Some(e) = r.engine.as_mut() else { return };
        e.promote();
        let pair = &mut self.pairs[shard as usize];
        pair.primary = backup;
        pair.backup = None;
        self.failovers += 1;
        self.record(format_args!(
            "shard {shard}: primary node {node} lost; backup node {backup} promoted"
        ));
        self.check_replicas();
        // The workers resend what the shard has not acknowledged, and the pulls it has not answered.
        for worker in 0..self.cfg.workers {
            let Some(w) = self.worker(worker) else { continue };
            if matches!(w.phase, Phase::Joining | Phase::Failed | Phase::Finished) {
                continue;
            }
            let pushes: Vec<ps::Push> = w.unacked[shard as usize].iter().cloned().collect();
            let pulls: Vec<u64> = w
                .pulls
                .iter()
                .filter(|(_, p)| p.got[shard as usize].is_none())
                .map(|(&c, _)| c)
                .collect();
            for push in pushes {
                self.send(worker, backup, Msg::Push(push));
            }
            for clock in pulls {
                self.send(worker, backup, Msg::Pull(pull_of(clock)));
            }
        }
    }

    fn replica_pull(&mut self, node: u32, worker: u32, pull: ps::Pull) {
        let Some(r) = self.replica(node) else { return };
        let shard = r.shard;
        let Some(e) = r.engine.as_mut() else {
            self.violate(
                "engine-contract",
                format!("shard {shard}: a pull reached a loading backup"),
            );
            return;
        };
        match e.on_pull(worker, pull) {
            Ok(cmds) => self.replica_commands(node, cmds, None),
            Err(e) => self.violate("engine-contract", format!("shard {shard} node {node}: {e}")),
        }
    }

    fn replica_push(&mut self, node: u32, worker: u32, push: ps::Push) {
        let bug = self.cfg.bug == Some(Bug::AckWithoutBackup);
        let Some(r) = self.replica(node) else { return };
        let shard = r.shard;
        let Some(e) = r.engine.as_mut() else {
            self.violate(
                "engine-contract",
                format!("shard {shard}: a push reached a loading backup"),
            );
            return;
        };
        let fresh = e.shard().clock(worker).is_ok_and(|c| push.clock >= c);
        let cmds = match e.on_push(worker, push.clone()) {
            Ok(cmds) => cmds,
            Err(e) => {
                self.violate("engine-contract", format!("shard {shard} node {node}: {e}"));
                return;
            }
        };
        if fresh {
            r.taken[worker as usize] = push.clock + 1;
        }
        let acked_now = cmds.iter().any(|c| {
            matches!(c, ps::replica::Command::Reply(ps::Output::Pushed { worker: w, clock }) if *w == worker && *clock == push.clock)
        });
        if bug && fresh && !acked_now {
            // The injected bug: the held acknowledgement goes out now.
            r.early.insert((worker, push.clock));
            self.release(node, worker, push.clock);
        }
        self.replica_commands(node, cmds, Some((worker, &push)));
        self.check_expected(node);
    }

    /// Carries out a replica's commands; `from_worker` is the push just applied, for `Forward`.
    fn replica_commands(&mut self, node: u32, cmds: Vec<ps::replica::Command>, from_worker: Option<(u32, &ps::Push)>) {
        use ps::replica::Command as RCmd;
        let Some(r) = self.replica(node) else { return };
        let shard = r.shard;
        for c in cmds {
            if self.violation.is_some() {
                return;
            }
            match c {
                RCmd::Reply(ps::Output::Pushed { worker, clock }) => {
                    let Some(r) = self.replica(node) else { return };
                    if r.early.remove(&(worker, clock)) {
                        continue;
                    }
                    self.release(node, worker, clock);
                }
                RCmd::Reply(out) => self.server_outputs_replica(node, out),
                RCmd::Forward { seq, worker } => {
                    let Some((w, push)) = from_worker.filter(|(w, _)| *w == worker) else {
                        self.violate(
                            "engine-contract",
                            format!("shard {shard}: Forward of entry {seq} answers no push"),
                        );
                        return;
                    };
                    let Some(backup) = self.pairs[shard as usize].backup else {
                        self.violate(
                            "engine-contract",
                            format!("shard {shard}: Forward of entry {seq} without a backup"),
                        );
                        return;
                    };
                    let push = push.clone();
                    self.send(node, backup, Msg::Entry { seq, worker: w, push });
                }
                RCmd::Applied { next } => {
                    let primary = self.pairs[shard as usize].primary;
                    self.send(node, primary, Msg::Applied { next });
                }
            }
        }
    }

    /// The primary acknowledges `(worker, clock)`: the attached backup must hold it.
    fn release(&mut self, node: u32, worker: u32, clock: u64) {
        let Some(r) = self.replica(node) else { return };
        let shard = r.shard as usize;
        let pair = &mut self.pairs[shard];
        let held = pair.backup.is_some() && pair.backup_clocks[worker as usize] > clock;
        if !held {
            let detail = format!(
                "shard {shard} (node {node}) acknowledged worker {worker}'s push of step {clock} while its backup {:?} held {} of its pushes",
                pair.backup, pair.backup_clocks[worker as usize]
            );
            self.violate("ack-needs-backup", detail);
            return;
        }
        let r = &mut pair.released[worker as usize];
        *r = (*r).max(clock + 1);
        self.send(node, worker, Msg::Pushed { clock });
    }

    /// A pull's answer from a replicated primary, under the staleness bound.
    fn server_outputs_replica(&mut self, node: u32, out: ps::Output) {
        let Some(r) = self.replica(node) else { return };
        let shard = r.shard;
        match out {
            ps::Output::Pulled {
                worker, clock, dense, ..
            } => {
                let slowest = r.taken.iter().copied().min().unwrap_or(0);
                let who = format!("shard {shard} (node {node})");
                self.answer_read(node, &who, worker, clock, dense, slowest);
            }
            ps::Output::Pushed { worker, clock } => self.release(node, worker, clock),
        }
    }

    fn replica_entry(&mut self, node: u32, seq: u64, worker: u32, push: ps::Push) {
        let Some(r) = self.replica(node) else { return };
        let shard = r.shard;
        let Some(e) = r.engine.as_mut() else {
            self.violate(
                "engine-contract",
                format!("shard {shard}: entry {seq} before the snapshot"),
            );
            return;
        };
        let clock = push.clock;
        match e.on_forward(seq, worker, ps::replica::Entry::Push(push)) {
            Ok(cmds) => {
                let t = &mut r.taken[worker as usize];
                *t = (*t).max(clock + 1);
                self.backup_changed(node);
                self.replica_commands(node, cmds, None);
                self.check_expected(node);
            }
            Err(e) => self.violate("engine-contract", format!("shard {shard} backup node {node}: {e}")),
        }
    }

    fn replica_snapshot(&mut self, node: u32, from: u32, snap: ps::Snapshot) {
        let Some(r) = self.replica(node) else { return };
        let shard = r.shard;
        if r.engine.is_some() {
            self.violate(
                "engine-contract",
                format!("shard {shard}: a second snapshot for node {node}"),
            );
            return;
        }
        let (fresh, _) = self.new_shard(shard);
        let engine = match ps::Replica::backup(fresh, &snap) {
            Ok(e) => e,
            Err(e) => {
                self.violate("engine-contract", format!("shard {shard} backup node {node}: {e}"));
                return;
            }
        };
        let loaded = engine.loaded();
        let Some(r) = self.replica(node) else { return };
        r.taken = snap.clocks.clone();
        r.engine = Some(engine);
        self.backup_changed(node);
        self.check_expected(node);
        let ps::replica::Command::Applied { next } = loaded else {
            self.violate("engine-contract", format!("shard {shard}: loaded() is {loaded:?}"));
            return;
        };
        self.send(node, from, Msg::Applied { next });
    }

    fn replica_applied(&mut self, node: u32, next: u64) {
        let Some(r) = self.replica(node) else { return };
        let shard = r.shard;
        let Some(e) = r.engine.as_mut() else { return };
        match e.on_applied(next) {
            Ok(cmds) => self.replica_commands(node, cmds, None),
            Err(e) => self.violate("engine-contract", format!("shard {shard} node {node}: {e}")),
        }
    }

    /// Records the clocks of the shard's attached backup, as the release check sees them.
    fn backup_changed(&mut self, node: u32) {
        let Some(r) = self.replica(node) else { return };
        let shard = r.shard as usize;
        let Some(e) = r.engine.as_ref() else { return };
        let clocks = e.shard().clocks().to_vec();
        let pair = &mut self.pairs[shard];
        if pair.backup == Some(node) {
            pair.backup_clocks = clocks;
        }
    }

    /// The replica's values are its initial values minus each push its
    /// clocks say it holds, exactly once (BSP: of each step applied).
    fn check_expected(&mut self, node: u32) {
        let bsp = self.cfg.consistency == ps::Consistency::Bsp;
        let workers = self.cfg.workers;
        let Some(Proc::Replica(r)) = self.procs.get_mut(node as usize) else {
            return;
        };
        let Some(e) = r.engine.as_ref() else { return };
        let pushes = &self.pairs[r.shard as usize].pushes;
        let mut missing = None;
        let mut sub = |expected: &mut Vec<f32>, w: u32, k: u64| match pushes.get(&(w, k)) {
            Some(g) => expected.iter_mut().zip(g).for_each(|(v, g)| *v -= g),
            None => missing = Some((w, k)),
        };
        if bsp {
            while r.bsp_counted < e.shard().applied() {
                for w in 0..workers {
                    sub(&mut r.expected, w, r.bsp_counted);
                }
                r.bsp_counted += 1;
            }
        } else {
            for w in 0..workers {
                let have = e.shard().clock(w).unwrap_or(0);
                while r.counted[w as usize] < have {
                    sub(&mut r.expected, w, r.counted[w as usize]);
                    r.counted[w as usize] += 1;
                }
            }
        }
        let shard = r.shard;
        if let Some((w, k)) = missing {
            self.violate(
                "acked-push-applied-once",
                format!("shard {shard} node {node} holds worker {w}'s push of step {k}, which was never sent"),
            );
            return;
        }
        if checksum(e.shard().values()) != checksum(&r.expected) {
            let detail = format!(
                "shard {shard} node {node} ({:?}, clocks {:?}): its values are not its pushes applied once each",
                e.role(),
                e.shard().clocks()
            );
            self.violate("acked-push-applied-once", detail);
        }
    }

    /// After every event: every acknowledged push is in each shard's live
    /// primary, and a backup level with its primary holds the same image.
    fn check_replicas(&mut self) {
        for shard in 0..self.pairs.len() {
            let pair = &self.pairs[shard];
            let Some(Proc::Replica(p)) = self.procs.get(pair.primary as usize) else {
                continue;
            };
            let Some(pe) = p.engine.as_ref() else { continue };
            if let Some(w) =
                (0..self.cfg.workers).find(|&w| pe.shard().clock(w).unwrap_or(0) < pair.released[w as usize])
            {
                let detail = format!(
                    "shard {shard}'s primary node {} holds {} of worker {w}'s pushes; {} were acknowledged",
                    pair.primary,
                    pe.shard().clock(w).unwrap_or(0),
                    pair.released[w as usize]
                );
                self.violate("acked-push-applied-once", detail);
                return;
            }
            let Some(b) = pair.backup else { continue };
            let Some(Proc::Replica(br)) = self.procs.get(b as usize) else {
                continue;
            };
            let Some(be) = br.engine.as_ref() else { continue };
            if be.next_seq() == pe.next_seq() && be.shard().image() != pe.shard().image() {
                let detail = format!(
                    "shard {shard}: backup node {b} and primary node {} both at entry {} hold different images",
                    pair.primary,
                    pe.next_seq()
                );
                self.violate("backup-equals-primary", detail);
                return;
            }
        }
    }
}

/// A dense pull of step `clock`, as a parameter-server worker makes it (the
/// predictor's workers make the same).
pub(crate) fn pull_of(clock: u64) -> ps::Pull {
    ps::Pull {
        req: clock,
        clock,
        wait_all: false,
        dense: true,
        keys: Vec::new(),
        snapshot: None,
    }
}

/// The gradient of worker `rank` at `step` for `params`: small integers that
/// depend on the parameters, so a wrong value changes everything after it.
pub fn gradient(seed: u64, rank: u32, step: u64, params: &[f32], out: &mut [f32]) {
    for (i, (g, p)) in out.iter_mut().zip(params).enumerate() {
        let h = ps::placement::mix64(seed ^ (u64::from(rank) << 40) ^ (step << 20) ^ i as u64);
        let from_p = (*p as i64).rem_euclid(3) - 1;
        *g = ((h % 9) as i64 - 4 + from_p) as f32;
    }
}

/// The parameters after each step of the fault-free synchronous run.
fn reference_run(cfg: &SimConfig) -> Vec<Vec<f32>> {
    let mut rng = Rng::derive(cfg.seed, 3);
    let mut params: Vec<f32> = (0..cfg.params).map(|_| rng.below(7) as f32 - 3.0).collect();
    let mut out = vec![params.clone()];
    let mut grad = vec![0.0; cfg.params];
    let mut sum = vec![0.0; cfg.params];
    for step in 0..cfg.steps {
        sum.iter_mut().for_each(|s| *s = 0.0);
        for rank in 0..cfg.workers {
            gradient(cfg.seed, rank, step, &params, &mut grad);
            sum.iter_mut().zip(&grad).for_each(|(s, g)| *s += g);
        }
        params.iter_mut().zip(&sum).for_each(|(p, g)| *p -= g);
        out.push(params.clone());
    }
    out
}
