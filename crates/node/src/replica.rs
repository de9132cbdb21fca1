//! A replicated parameter-server shard process (`sinter server --replicas 2`):
//! the runtime of the `ps::Replica` engine.
//!
//! The coordinator makes each server the primary or the backup of a shard
//! (`ServerRole`). A primary starts like an unreplicated server (workers
//! connect, worker 0 sends the shard), then, told where its backup waits
//! (`BuildBackup`), connects to it, sends a [`ReplicaInit`] with the shard's
//! snapshot and forwards every push and worker state it applies, as
//! received, in one ordered stream (`Ps` frames: tag = entry seq, sender =
//! worker). The backup answers the snapshot, and then each entry, with a
//! `Pushed` frame carrying the seq below which it holds every entry; the
//! primary's engine then releases the workers' acknowledgements. Without a
//! backup that holds its state, the primary applies pushes and holds their
//! acknowledgements (see `ps::replica`).
//!
//! A backup accepts its primary's stream, tells the coordinator
//! `BackupReady` once the snapshot is in, and applies entries until the
//! stream ends. On `Promote` it first lets that stream drain (every entry
//! that arrived is applied; bounded by [`DRAIN_WAIT_MS`]), then serves the
//! workers that reconnect to it.
//!
//! Elastic jobs (`Setup::elastic`): the primary also takes a lost worker's
//! replacement, which connects with a newer generation than its rank's
//! connection: as in `server`, the rank's connection epoch is bumped and
//! `Replica::replace_worker` drops what the old process waited for, all under
//! the shard's lock; each reply carries the epoch of the connection it
//! answers, and one for an older connection is not written to the new one.
//! A broken worker connection is then not fatal (the coordinator decides).
//!
//! Threads: one per worker connection (as in `server`), one writer and one
//! reader per backup link, one reader of the primary's stream, one accept
//! loop (backups), and this thread, which takes the coordinator's word and
//! the other threads' news from one channel.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use ps::replica::{Command as Rc, Entry, Role as ReplicaRole};
use ps::{Message, Output, Placement, PlacementSpec, Replica, Request, Shard, Snapshot};
use serde::{Deserialize, Serialize};
use tensor::Layout;
use wire::msg::{FromCoordinator, PeerHello, ToCoordinator};
use wire::{FrameHeader, HEADER_BYTES, MessageType, PeerInfo, Role, Secret};

use crate::env::ClusterEnv;
use crate::error::JobError;
use crate::gate::{Admitted, Gate};
use crate::net::{self, ControlReader};
use crate::server::{INIT_CHUNK_VALUES, PsInit, PsReady, ServerOptions, ServerReport, accept_workers, take_init};
use crate::worker::{RENDEZVOUS_TIMEOUT_MS, Welcomed, rendezvous, spawn_heartbeats};

/// How long a promoted backup waits for its dead primary's stream to end.
pub const DRAIN_WAIT_MS: u64 = 1_000;
/// How often the main loop wakes while idle.
const IDLE_TICK_MS: u64 = 50;
/// Pushes of open BSP steps a snapshot may carry, per worker.
const PENDING_PER_WORKER_MAX: u32 = 16;
/// Connections a backup accepts over its life (its primary, then each worker after a promotion, with retries).
const ACCEPTS_MAX: u32 = 4 * crate::WORKERS_MAX + 16;

/// What a shard is: everything a replica needs besides the state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Setup {
    pub layout: Layout,
    pub optim_json: String,
    pub consistency: ps::Consistency,
    pub placement: PlacementSpec,
    /// `cluster.elastic`: lost workers are replaced rather than fatal.
    pub elastic: bool,
}

/// Primary → new backup, first on the replication stream: the shard, then
/// `image_frames` tensor frames (the image), `pending` push frames (the
/// open BSP steps, sender = worker) and `states` worker-state frames (the
/// workers' states for the next checkpoint, sender = worker). The backup
/// answers with a `Pushed` frame carrying `next_seq` once it holds all of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaInit {
    pub setup: Setup,
    pub workers: u32,
    pub clocks: Vec<u64>,
    pub applied: u64,
    pub next_seq: u64,
    pub image_frames: u32,
    pub pending: u32,
    pub states: u32,
}

/// One entry for the backup: the push or worker state as received.
struct Forwarded {
    seq: u64,
    worker: u32,
    payload: Vec<u8>,
}

struct Core {
    replica: Option<Replica>,
    /// The current backup link: its id and the queue to its writer thread.
    to_backup: Option<(u64, Sender<Forwarded>)>,
    /// Per worker: the epoch of its current connection (bumped by each new one).
    epochs: Vec<u64>,
    /// Per worker: the membership generation its current connection came with.
    generations: Vec<u64>,
}

impl Core {
    /// Each output with the epoch of its worker's connection now.
    fn stamp(&self, outputs: Vec<Output>) -> Vec<(Output, u64)> {
        outputs
            .into_iter()
            .map(|o| {
                let w = match &o {
                    Output::Pulled { worker, .. } | Output::Pushed { worker, .. } => *worker,
                };
                let epoch = self.epochs.get(w as usize).copied().unwrap_or(0);
                (o, epoch)
            })
            .collect()
    }
}

struct Shared {
    shard: u32,
    workers: u32,
    setup: OnceLock<Setup>,
    core: Mutex<Core>,
    /// Per worker: its current connection's stream and epoch.
    writers: Vec<Mutex<Option<(TcpStream, u64)>>>,
    events: Sender<Ev>,
    write_timeout_ms: u64,
}

enum Ev {
    Coord(FromCoordinator),
    Shutdown,
    /// A worker connected: its rank, the generation of its hello, its stream.
    Worker(u32, u64, TcpStream),
    Primary(TcpStream),
    WorkerEnded(u32, Option<JobError>),
    BackupLost(u64, String),
    FeedEnded(String),
}

impl Shared {
    fn core(&self) -> Result<MutexGuard<'_, Core>, JobError> {
        self.core.lock().map_err(|_| JobError::Server {
            server: self.shard,
            why: "a thread panicked holding the shard".into(),
        })
    }

    fn layout(&self) -> Option<&Layout> {
        self.setup.get().map(|s| &s.layout)
    }

    /// Sends each reply to its worker; a worker not connected (yet) misses it
    /// and asks again. A reply made for an earlier connection of the worker
    /// than its current one is dropped (see the module docs).
    fn reply(&self, outputs: Vec<(Output, u64)>) -> Result<(), JobError> {
        let mut out = Vec::new();
        for (o, epoch) in outputs {
            let to = match o {
                Output::Pulled {
                    worker,
                    req,
                    clock,
                    dense,
                    values,
                } => {
                    ps::msg::encode_pulled(req, clock, &dense, &values, &mut out);
                    worker
                }
                Output::Pushed { worker, clock } => {
                    ps::msg::encode_pushed(clock, &mut out);
                    worker
                }
            };
            let Some(slot) = self.writers.get(to as usize) else {
                continue;
            };
            let mut w = slot.lock().map_err(|_| JobError::Server {
                server: self.shard,
                why: "a writer lock is poisoned".into(),
            })?;
            if let Some((s, current)) = w.as_mut()
                && *current == epoch
            {
                write_ps(s, 0, self.shard, &out).map_err(|e| JobError::Peer {
                    rank: to,
                    why: format!("server {} could not reply: {e}", self.shard),
                })?;
            }
        }
        Ok(())
    }

    /// Carries out engine commands: entries to the backup, replies to workers.
    fn run(&self, core: &mut Core, cmds: Vec<Rc>, payload: &[u8], outputs: &mut Vec<Output>) {
        for c in cmds {
            match c {
                Rc::Reply(o) => outputs.push(o),
                Rc::Forward { seq, worker } => {
                    if let Some((_, tx)) = &core.to_backup {
                        // A closed queue means the link broke; its reader reports that.
                        let _ = tx.send(Forwarded {
                            seq,
                            worker,
                            payload: payload.to_vec(),
                        });
                    }
                }
                Rc::Applied { .. } => {}
            }
        }
    }
}

/// Runs one replicated shard until the coordinator's shutdown.
pub fn run(env: &ClusterEnv, secret: &Secret, opts: &ServerOptions) -> Result<ServerReport, JobError> {
    let Welcomed {
        coord,
        reader,
        listener,
        generation,
        rank: shard,
        world: workers,
        ..
    } = rendezvous(env, secret, Role::Server)?;
    let coord = Arc::new(Mutex::new(coord));
    spawn_heartbeats(
        coord.clone(),
        shard,
        Arc::new(AtomicU64::new(0)),
        opts.heartbeat_timeout_ms,
    )?;
    let (tx, events) = mpsc::channel();
    spawn_watch(reader, shard, tx.clone())?;
    let primary = match events.recv_timeout(Duration::from_millis(RENDEZVOUS_TIMEOUT_MS)) {
        Ok(Ev::Coord(FromCoordinator::ServerRole { shard: s, primary })) if s == shard => primary,
        _ => {
            return Err(JobError::Coordinator(format!(
                "server {shard} was told no role (primary or backup): is the coordinator run with --replicas 2?"
            )));
        }
    };
    let role = if primary { "primary" } else { "backup" };
    tracing::info!(shard, workers, generation, role, "replicated server joined");
    let shared = Arc::new(Shared {
        shard,
        workers,
        setup: OnceLock::new(),
        core: Mutex::new(Core {
            replica: None,
            to_backup: None,
            epochs: vec![0; workers as usize],
            generations: vec![generation; workers as usize],
        }),
        writers: (0..workers).map(|_| Mutex::new(None)).collect(),
        events: tx.clone(),
        write_timeout_ms: opts.write_timeout_ms,
    });
    let gate = Gate::open(
        listener,
        secret.clone(),
        crate::server::own(shard),
        &format!("server-{shard}-{role}"),
    )?;
    if primary {
        let mut streams = accept_workers(&gate, workers, generation, shard)?;
        let (init, engine) = take_init(&mut streams[0], shard, workers)?;
        let ready = PsReady {
            shard,
            placement: init.placement.clone(),
            clock: init.resume_at.unwrap_or(0),
        };
        let _ = shared.setup.set(setup_of(&init));
        shared.core()?.replica = Some(Replica::primary(engine));
        for s in streams.iter_mut() {
            net::send_control(s, shard, &ready)?;
        }
        for (w, s) in streams.into_iter().enumerate() {
            register(&shared, w as u32, generation, s, false)?;
        }
        if init.elastic {
            // Lost workers' replacements connect here.
            spawn_accept(gate, shard, generation, workers, tx.clone())?;
        }
    } else {
        spawn_accept(gate, shard, generation, workers, tx.clone())?;
    }
    drop(tx);
    let mut waiting_workers: Vec<(u32, u64, TcpStream)> = Vec::new();
    let mut feed: Option<TcpStream> = None;
    let mut feed_open = false;
    let mut links = 0u64;
    let mut later: VecDeque<Ev> = VecDeque::new();
    loop {
        let ev = match later.pop_front() {
            Some(ev) => ev,
            None => match events.recv_timeout(Duration::from_millis(IDLE_TICK_MS)) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(JobError::Coordinator(format!(
                        "server {shard}: lost every event source"
                    )));
                }
            },
        };
        match ev {
            Ev::Shutdown => break,
            Ev::Coord(FromCoordinator::BuildBackup { shard: s, addr }) if s == shard => {
                links += 1;
                if let Err(e) = build_backup(&shared, &addr, secret, links) {
                    tracing::warn!(shard, role = "primary", addr, error = %e, "could not build a backup; continuing alone");
                }
            }
            Ev::Coord(FromCoordinator::Promote { shard: s, .. }) if s == shard => {
                let started = Instant::now();
                // Every entry the dead primary's stream delivered is applied before workers resend.
                let deadline = started + Duration::from_millis(DRAIN_WAIT_MS);
                while feed_open {
                    match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(Ev::FeedEnded(why)) => {
                            tracing::info!(shard, why, "the old primary's stream ended");
                            feed_open = false;
                        }
                        Ok(ev) => later.push_back(ev),
                        Err(_) => {
                            tracing::warn!(
                                shard,
                                waited_ms = DRAIN_WAIT_MS,
                                "the old primary's stream did not end; cutting it"
                            );
                            if let Some(f) = &feed {
                                let _ = f.shutdown(Shutdown::Both);
                            }
                            feed_open = false;
                        }
                    }
                }
                {
                    let mut core = shared.core()?;
                    let Some(r) = core.replica.as_mut() else {
                        return Err(JobError::Server {
                            server: shard,
                            why: "promoted before it held the shard's state".into(),
                        });
                    };
                    r.promote();
                    let next_seq = r.next_seq();
                    drop(core);
                    tracing::warn!(
                        shard,
                        role = "backup",
                        next_seq,
                        drain_ms = started.elapsed().as_millis() as u64,
                        "primary lost; this backup is the primary now"
                    );
                }
                for (w, g, s) in waiting_workers.drain(..) {
                    take_worker(&shared, w, g, s)?;
                }
            }
            Ev::Coord(other) => tracing::warn!(shard, ?other, "unexpected message from the coordinator"),
            Ev::Worker(w, g, s) => {
                let serving = shared
                    .core()?
                    .replica
                    .as_ref()
                    .is_some_and(|r| r.role() == ReplicaRole::Primary);
                if serving {
                    if let Err(e) = take_worker(&shared, w, g, s) {
                        tracing::warn!(shard, worker = w, error = %e, "refused a worker's connection");
                    }
                } else {
                    waiting_workers.retain(|(x, _, _)| *x != w);
                    waiting_workers.push((w, g, s));
                }
            }
            Ev::Primary(s) => {
                feed = s.try_clone().ok();
                feed_open = true;
                let (shared, coord) = (shared.clone(), coord.clone());
                thread::Builder::new()
                    .name("ps-feed".into())
                    .spawn(move || {
                        let why = match follow(&shared, s, &coord) {
                            Ok(()) => "closed".to_string(),
                            Err(e) => e.to_string(),
                        };
                        let _ = shared.events.send(Ev::FeedEnded(why));
                    })
                    .map_err(|e| JobError::io("spawning the replication reader", e))?;
            }
            Ev::FeedEnded(why) => {
                tracing::info!(shard, role = "backup", why, "the primary's stream ended");
                feed_open = false;
            }
            Ev::WorkerEnded(w, None) => tracing::debug!(shard, worker = w, "a worker closed its connection"),
            Ev::WorkerEnded(w, Some(e)) if shared.setup.get().is_some_and(|s| s.elastic) => {
                tracing::warn!(shard, worker = w, error = %e, "lost a worker's connection; waiting for its replacement");
            }
            Ev::WorkerEnded(_, Some(e)) => return Err(e),
            Ev::BackupLost(link, why) => {
                let mut core = shared.core()?;
                if core.to_backup.as_ref().is_some_and(|(l, _)| *l == link) {
                    core.to_backup = None;
                    let held = core.replica.as_mut().map_or(0, |r| {
                        r.backup_lost();
                        r.held()
                    });
                    drop(core);
                    tracing::warn!(
                        shard,
                        role = "primary",
                        why,
                        held,
                        "backup lost; pushes are applied and their acknowledgements held until a new backup holds them"
                    );
                }
            }
        }
    }
    let core = shared.core()?;
    let (values, stats, backup) = match &core.replica {
        Some(r) => (
            r.shard().values().len(),
            r.shard().stats().clone(),
            r.role() == ReplicaRole::Backup,
        ),
        None => (0, Default::default(), true),
    };
    Ok(ServerReport {
        shard,
        values,
        stats,
        backup,
    })
}

fn setup_of(init: &PsInit) -> Setup {
    Setup {
        layout: init.layout.clone(),
        optim_json: init.optim_json.clone(),
        consistency: init.consistency,
        placement: init.placement.clone(),
        elastic: init.elastic,
    }
}

/// A worker that connected to the primary after the start: a lost worker's
/// replacement (a newer generation than its rank's connection, in an
/// elastic job), or a worker reconnecting after a failover. Either is told
/// the shard's placement and its clock here before it sends anything.
fn take_worker(shared: &Arc<Shared>, worker: u32, generation: u64, mut s: TcpStream) -> Result<(), JobError> {
    let replacing = {
        let core = shared.core()?;
        let current = core.generations.get(worker as usize).copied().unwrap_or(u64::MAX);
        if generation > current && !shared.setup.get().is_some_and(|s| s.elastic) {
            return Err(JobError::Peer {
                rank: worker,
                why: format!("a newer generation ({generation}) of a worker in a job that is not elastic"),
            });
        }
        generation > current
    };
    let placement = shared
        .setup
        .get()
        .map(|s| s.placement.clone())
        .ok_or_else(|| JobError::Server {
            server: shared.shard,
            why: "a worker connected before the shard held its state".into(),
        })?;
    let stream = s.try_clone().map_err(|e| JobError::io("cloning a worker stream", e))?;
    // The worker sends nothing before this message, so no reply to it can be lost meanwhile.
    let clock = register(shared, worker, generation, stream, replacing)?;
    net::send_control(
        &mut s,
        shared.shard,
        &PsReady {
            shard: shared.shard,
            placement,
            clock,
        },
    )?;
    if replacing {
        tracing::info!(
            shard = shared.shard,
            worker,
            clock,
            "a replacement took over a worker's rank"
        );
    }
    Ok(())
}

/// Makes `s` the worker's current connection and serves it on its own
/// thread; returns the worker's clock here. With `replace`, first tells the
/// engine a new process took the worker's place (see [`take_worker`]).
fn register(shared: &Arc<Shared>, worker: u32, generation: u64, s: TcpStream, replace: bool) -> Result<u64, JobError> {
    s.set_write_timeout(Some(Duration::from_millis(shared.write_timeout_ms)))
        .map_err(|e| JobError::io("set_write_timeout", e))?;
    let w = s.try_clone().map_err(|e| JobError::io("cloning a worker stream", e))?;
    let poisoned = || JobError::Server {
        server: shared.shard,
        why: "a lock is poisoned".into(),
    };
    let (epoch, clock) = {
        let mut core = shared.core()?;
        let i = worker as usize;
        if i >= core.epochs.len() {
            return Err(JobError::Peer {
                rank: worker,
                why: format!("no such worker in a job of {}", core.epochs.len()),
            });
        }
        core.epochs[i] += 1;
        core.generations[i] = core.generations[i].max(generation);
        let clock = match core.replica.as_mut() {
            Some(r) if replace => r.replace_worker(worker)?,
            Some(r) => r.shard().clock(worker)?,
            None => 0,
        };
        let epoch = core.epochs[i];
        // Swapped under the shard's lock: a reply stamped before the bump is not written to `w`.
        let mut old = shared.writers[i].lock().map_err(|_| poisoned())?;
        if let Some((old, _)) = old.as_ref() {
            // The old connection's reader ends on this (it may still be open: a stalled process).
            let _ = old.shutdown(Shutdown::Both);
        }
        *old = Some((w, epoch));
        (epoch, clock)
    };
    let sh = shared.clone();
    thread::Builder::new()
        .name(format!("ps-conn-{worker}"))
        .spawn(move || {
            let r = serve_worker(&sh, worker, epoch, s);
            let _ = sh.events.send(Ev::WorkerEnded(worker, r.err()));
        })
        .map_err(|e| JobError::io("spawning a connection thread", e))?;
    Ok(clock)
}

/// Reads one `Ps` frame into `payload`; `None` at a clean end of the stream.
fn read_ps(s: &mut TcpStream, payload: &mut Vec<u8>) -> Result<Option<FrameHeader>, String> {
    let mut h = [0u8; HEADER_BYTES];
    match s.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let h = FrameHeader::decode(&h).map_err(|e| e.to_string())?;
    if h.kind != MessageType::Ps {
        return Err(format!("expected a parameter-server frame, got {}", h.kind));
    }
    payload.resize(h.payload_bytes as usize, 0);
    s.read_exact(payload).map_err(|e| e.to_string())?;
    h.check_payload(payload).map_err(|e| e.to_string())?;
    Ok(Some(h))
}

/// Writes one `Ps` frame with a tag, header and payload in one call (no Nagle split).
fn write_ps(s: &mut TcpStream, tag: u64, sender: u32, payload: &[u8]) -> Result<(), std::io::Error> {
    crate::net::write_frame(s, MessageType::Ps, tag, sender, payload)
}

/// Serves one connection of `worker` until it closes, or until a newer
/// connection of the worker takes over (`epoch` is no longer current).
fn serve_worker(shared: &Shared, worker: u32, epoch: u64, mut s: TcpStream) -> Result<(), JobError> {
    let shard = shared.shard;
    let broke = |why: String| JobError::Peer {
        rank: worker,
        why: format!("connection to server {shard} broke: {why}"),
    };
    let layout = shared
        .layout()
        .ok_or_else(|| broke("the shard has no layout yet".into()))?;
    let dense_len = {
        let core = shared.core()?;
        let r = core
            .replica
            .as_ref()
            .ok_or_else(|| broke("the shard has no state yet".into()))?;
        r.shard().layout().dense_len
    };
    let mut payload = Vec::new();
    net::set_stall_timeout(&s, shared.write_timeout_ms)?;
    loop {
        if net::read_ps_frame(&mut s, &mut payload, shared.write_timeout_ms)
            .map_err(broke)?
            .is_none()
        {
            return Ok(());
        }
        // Decoded (a compressed dense gradient too) before the shard's lock,
        // so that the workers' decodes run in parallel.
        let request = ps::msg::decode(&payload, Some(layout))
            .and_then(|m| m.into_request(dense_len))
            .map_err(|e| JobError::Peer {
                rank: worker,
                why: format!("sent server {shard} {e}"),
            })?;
        let mut outputs = Vec::new();
        let stamped = {
            let mut core = shared.core()?;
            let core = &mut *core;
            if core.epochs.get(worker as usize) != Some(&epoch) {
                // Replaced: what the old connection still sent is not applied.
                return Ok(());
            }
            let r = core
                .replica
                .as_mut()
                .ok_or_else(|| broke("the shard has no state yet".into()))?;
            let cmds = match request {
                Request::Pull(p) => r.on_pull(worker, p),
                Request::WorkerState { clock, state } => r.on_worker_state(worker, clock, state),
                Request::Push(p) => r.on_push(worker, p),
            }
            .map_err(|e| JobError::Peer {
                rank: worker,
                why: format!("server {shard}: {e}"),
            })?;
            shared.run(core, cmds, &payload, &mut outputs);
            core.stamp(outputs)
        };
        shared.reply(stamped)?;
    }
}

/// Primary: connects to a new backup at `addr`, sends it the shard's
/// snapshot and from then on every entry; a reader applies its acknowledgements.
fn build_backup(shared: &Arc<Shared>, addr: &str, secret: &Secret, link: u64) -> Result<(), JobError> {
    let shard = shared.shard;
    let setup = shared.setup.get().cloned().ok_or_else(|| JobError::Server {
        server: shard,
        why: "asked to build a backup before it held the shard".into(),
    })?;
    let mut s = net::connect(addr, net::HANDSHAKE_TIMEOUT_MS)?;
    let own = PeerInfo {
        role: Role::Server,
        rank: shard,
    };
    let them = net::connect_handshake(&mut s, secret, own)?;
    if them.role != Role::Server || them.rank != shard {
        return Err(JobError::Server {
            server: shard,
            why: format!("{addr} answered as {them}, not as a server of shard {shard}"),
        });
    }
    net::tune_data_stream(&s)?;
    s.set_write_timeout(Some(Duration::from_millis(shared.write_timeout_ms)))
        .map_err(|e| JobError::io("set_write_timeout", e))?;
    let reader = s
        .try_clone()
        .map_err(|e| JobError::io("cloning the backup stream", e))?;
    let (tx, rx) = mpsc::channel();
    let snap = {
        let mut core = shared.core()?;
        let r = core.replica.as_mut().ok_or_else(|| JobError::Server {
            server: shard,
            why: "asked to build a backup before it held the shard".into(),
        })?;
        let snap = r.attach_backup()?;
        core.to_backup = Some((link, tx));
        snap
    };
    tracing::info!(
        shard,
        role = "primary",
        addr,
        next_seq = snap.next_seq,
        "building a backup"
    );
    let sh = shared.clone();
    thread::Builder::new()
        .name("ps-backup-out".into())
        .spawn(move || {
            if let Err(e) = feed_backup(&sh, s, setup, snap, rx) {
                let _ = sh.events.send(Ev::BackupLost(link, e));
            }
        })
        .map_err(|e| JobError::io("spawning the backup writer", e))?;
    let sh = shared.clone();
    thread::Builder::new()
        .name("ps-backup-in".into())
        .spawn(move || {
            let why = take_acks(&sh, reader, link);
            let _ = sh.events.send(Ev::BackupLost(link, why));
        })
        .map(|_| ())
        .map_err(|e| JobError::io("spawning the backup reader", e))
}

/// Primary → backup: the snapshot, then each entry as the engine forwards it.
fn feed_backup(
    shared: &Shared,
    mut s: TcpStream,
    setup: Setup,
    snap: Snapshot,
    rx: Receiver<Forwarded>,
) -> Result<(), String> {
    let chunks: Vec<&[f32]> = snap.image.chunks(INIT_CHUNK_VALUES).collect();
    let init = ReplicaInit {
        setup,
        workers: shared.workers,
        clocks: snap.clocks.clone(),
        applied: snap.applied,
        next_seq: snap.next_seq,
        image_frames: chunks.len() as u32,
        pending: snap.pending.len() as u32,
        states: snap.states.len() as u32,
    };
    net::send_control(&mut s, shared.shard, &init).map_err(|e| e.to_string())?;
    for c in chunks {
        net::write_tensor(&mut s, 0, shared.shard, c).map_err(|e| format!("sending the image: {e}"))?;
    }
    let mut buf = Vec::new();
    for (w, p) in &snap.pending {
        ps::msg::encode_push(p.clock, &p.dense, &p.keys, &p.values, &mut buf);
        write_ps(&mut s, 0, *w, &buf).map_err(|e| format!("sending an open step: {e}"))?;
    }
    for (w, clock, state) in &snap.states {
        ps::msg::encode_worker_state(*clock, state, &mut buf);
        write_ps(&mut s, 0, *w, &buf).map_err(|e| format!("sending a worker's state: {e}"))?;
    }
    // Ends when the link is replaced or dropped (the queue closes).
    for e in rx {
        write_ps(&mut s, e.seq, e.worker, &e.payload).map_err(|e| format!("forwarding: {e}"))?;
    }
    Ok(())
}

/// Primary: the backup's acknowledgements, until its stream ends (returns why).
fn take_acks(shared: &Shared, mut s: TcpStream, link: u64) -> String {
    let mut payload = Vec::new();
    loop {
        match read_ps(&mut s, &mut payload) {
            Ok(Some(_)) => {}
            Ok(None) => return "the backup closed its stream".into(),
            Err(e) => return e,
        }
        // Every entry below `next` is in the backup (after its snapshot: the snapshot's next_seq).
        let next = match ps::msg::decode(&payload, None) {
            Ok(Message::Pushed { clock }) => clock,
            Ok(other) => return format!("the backup sent {other:?}"),
            Err(e) => return format!("the backup sent {e}"),
        };
        let mut outputs = Vec::new();
        let stamped = {
            let Ok(mut core) = shared.core() else {
                return "a thread panicked".into();
            };
            if core.to_backup.as_ref().is_none_or(|(l, _)| *l != link) {
                return "replaced".into();
            }
            let Some(r) = core.replica.as_mut() else {
                return "no shard".into();
            };
            match r.on_applied(next) {
                Ok(cmds) => {
                    for c in cmds {
                        if let Rc::Reply(o) = c {
                            outputs.push(o);
                        }
                    }
                }
                Err(e) => return e.to_string(),
            }
            core.stamp(outputs)
        };
        if let Err(e) = shared.reply(stamped) {
            tracing::warn!(shard = shared.shard, error = %e, "could not pass on an acknowledgement");
        }
    }
}

/// Backup: takes the snapshot from the primary's stream, says it is ready,
/// then applies every entry and acknowledges it, until the stream ends.
fn follow(shared: &Shared, mut s: TcpStream, coord: &Mutex<TcpStream>) -> Result<(), JobError> {
    let shard = shared.shard;
    let bad = |why: String| JobError::Server {
        server: shard,
        why: format!("its primary's replication stream: {why}"),
    };
    let init: ReplicaInit = net::recv_control_exact(&mut s, RENDEZVOUS_TIMEOUT_MS)?;
    if init.workers != shared.workers
        || init.clocks.len() != shared.workers as usize
        || init.pending > shared.workers.saturating_mul(PENDING_PER_WORKER_MAX)
        || init.states > shared.workers
    {
        return Err(bad(format!(
            "a snapshot for {} workers with {} clocks, {} open pushes and {} worker states; this job has {} workers",
            init.workers,
            init.clocks.len(),
            init.pending,
            init.states,
            shared.workers
        )));
    }
    let optim: optim::OptimConfig = serde_json::from_str(&init.setup.optim_json)
        .map_err(|e| bad(format!("an optimizer config it cannot read: {e}")))?;
    let placement = Placement::new(init.setup.placement.clone(), &init.setup.layout)?;
    let n = ps::LocalLayout::new(&init.setup.layout, &placement, shard).local.len();
    let engine = Shard::new(
        shard,
        shared.workers,
        init.setup.consistency,
        &optim,
        &init.setup.layout,
        &placement,
        vec![0.0; n],
    )?;
    let want = engine.image_len();
    s.set_read_timeout(Some(Duration::from_millis(RENDEZVOUS_TIMEOUT_MS)))
        .map_err(|e| JobError::io("set_read_timeout", e))?;
    let mut image: Vec<f32> = Vec::with_capacity(want);
    for _ in 0..init.image_frames {
        let h = net::read_header(&mut s).map_err(|e| bad(format!("reading the image: {e}")))?;
        let k = h.payload_bytes as usize / 4;
        if h.kind != MessageType::Tensor || image.len() + k > want {
            return Err(bad(format!("more than the {want} values of the image")));
        }
        let at = image.len();
        image.resize(at + k, 0.0);
        let bytes = net::as_bytes_mut(&mut image[at..]);
        s.read_exact(bytes)
            .map_err(|e| bad(format!("reading the image: {e}")))?;
        h.check_payload(bytes)?;
    }
    if image.len() != want {
        return Err(bad(format!(
            "an image of {} values; the shard holds {want}",
            image.len()
        )));
    }
    let dense_len = engine.layout().dense_len;
    let mut payload = Vec::new();
    let mut pending = Vec::with_capacity(init.pending as usize);
    for _ in 0..init.pending {
        let h = read_ps(&mut s, &mut payload)
            .map_err(&bad)?
            .ok_or_else(|| bad("ended inside the snapshot".into()))?;
        let msg = ps::msg::decode(&payload, Some(&init.setup.layout)).map_err(|e| bad(e.to_string()))?;
        let p = msg
            .into_push(dense_len)
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad("an open step that is not a push".into()))?;
        pending.push((h.sender, p));
    }
    let mut states = Vec::with_capacity(init.states as usize);
    for _ in 0..init.states {
        let h = read_ps(&mut s, &mut payload)
            .map_err(&bad)?
            .ok_or_else(|| bad("ended inside the snapshot".into()))?;
        match ps::msg::decode(&payload, Some(&init.setup.layout)).map_err(|e| bad(e.to_string()))? {
            Message::WorkerState { clock, state } => states.push((h.sender, clock, state)),
            other => return Err(bad(format!("a worker state that is {other:?}"))),
        }
    }
    s.set_read_timeout(None)
        .map_err(|e| JobError::io("set_read_timeout", e))?;
    let snap = Snapshot {
        image,
        clocks: init.clocks,
        applied: init.applied,
        pending,
        states,
        next_seq: init.next_seq,
    };
    let replica = Replica::backup(engine, &snap)?;
    let loaded = replica.loaded();
    let _ = shared.setup.set(init.setup.clone());
    shared.core()?.replica = Some(replica);
    let mut ack = Vec::new();
    // The primary releases the acknowledgements the snapshot holds.
    if let Rc::Applied { next } = loaded {
        ps::msg::encode_pushed(next, &mut ack);
        write_ps(&mut s, 0, shard, &ack).map_err(|e| bad(format!("acknowledging the snapshot: {e}")))?;
    }
    {
        let mut c = coord
            .lock()
            .map_err(|_| bad("the coordinator stream lock is poisoned".into()))?;
        net::send_control(&mut c, shard, &ToCoordinator::BackupReady { shard })?;
    }
    tracing::info!(
        shard,
        role = "backup",
        next_seq = init.next_seq,
        "holds the primary's state"
    );
    let layout = &init.setup.layout;
    loop {
        let Some(h) = read_ps(&mut s, &mut payload).map_err(&bad)? else {
            return Ok(());
        };
        let msg = ps::msg::decode(&payload, Some(layout)).map_err(|e| bad(e.to_string()))?;
        let entry = match msg {
            Message::WorkerState { clock, state } => Entry::State { clock, state },
            other => Entry::Push(
                other
                    .into_push(dense_len)
                    .map_err(|e| bad(e.to_string()))?
                    .ok_or_else(|| bad("an entry that is neither a push nor a worker state".into()))?,
            ),
        };
        let applied = {
            let mut core = shared.core()?;
            let r = core.replica.as_mut().ok_or_else(|| bad("no shard".into()))?;
            if r.role() != ReplicaRole::Backup {
                // Promoted (the drain wait ran out): the rest is the workers' to resend.
                return Ok(());
            }
            r.on_forward(h.tag, h.sender, entry)?
        };
        for c in applied {
            if let Rc::Applied { next } = c {
                ps::msg::encode_pushed(next, &mut ack);
                write_ps(&mut s, 0, shard, &ack).map_err(|e| bad(format!("acknowledging: {e}")))?;
            }
        }
    }
}

/// Backup: accepts its primary's stream and, once promoted, the workers.
/// Only authenticated connections count towards [`ACCEPTS_MAX`].
fn spawn_accept(gate: Gate, shard: u32, generation: u64, workers: u32, tx: Sender<Ev>) -> Result<(), JobError> {
    thread::Builder::new()
        .name("ps-accept".into())
        .spawn(move || {
            let mut taken = 0;
            while taken < ACCEPTS_MAX {
                let Admitted {
                    mut stream,
                    peer,
                    addr: from,
                } = match gate.next(Duration::from_millis(IDLE_TICK_MS)) {
                    Ok(a) => a,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                taken += 1;
                let r = match peer.role {
                    Role::Server => net::tune_data_stream(&stream).map(|()| Ev::Primary(stream)),
                    Role::Worker => (|| {
                        let hello: PeerHello = net::recv_control_exact(&mut stream, net::HANDSHAKE_TIMEOUT_MS)?;
                        // A newer generation is a lost worker's replacement (elastic jobs).
                        if hello.generation < generation || hello.rank >= workers {
                            return Err(JobError::Peer {
                                rank: hello.rank,
                                why: format!("server {shard} got an unexpected hello {hello:?}"),
                            });
                        }
                        net::tune_data_stream(&stream)?;
                        Ok(Ev::Worker(hello.rank, hello.generation, stream))
                    })(),
                    other => Err(JobError::Coordinator(format!(
                        "a {other:?} connected to server {shard}"
                    ))),
                };
                match r {
                    Ok(ev) => {
                        if tx.send(ev).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(shard, peer = %from, error = %e, "refused a connection"),
                }
            }
            tracing::warn!(shard, limit = ACCEPTS_MAX, "accepted as many connections as allowed");
        })
        .map(|_| ())
        .map_err(|e| JobError::io("spawning the accept thread", e))
}

/// Watches the coordinator: an abort or its loss ends the process; its
/// other messages go to the main loop.
fn spawn_watch(mut reader: ControlReader, shard: u32, tx: Sender<Ev>) -> Result<(), JobError> {
    let say = |line: String| {
        let _ = std::io::stderr().write_all(line.as_bytes());
    };
    thread::Builder::new()
        .name("coordinator-watch".into())
        .spawn(move || {
            loop {
                match reader.recv::<FromCoordinator>(None) {
                    Ok(Some(FromCoordinator::Abort { reason, .. })) => {
                        say(format!("error: server {shard} stopping: {reason}\n"));
                        std::process::exit(crate::error::exit::ABORTED);
                    }
                    Ok(Some(FromCoordinator::Shutdown)) => {
                        let _ = tx.send(Ev::Shutdown);
                        return;
                    }
                    Ok(Some(m)) => {
                        if let Err(why) = m.check() {
                            say(format!("error: server {shard} stopping: the coordinator sent {why}\n"));
                            std::process::exit(crate::error::exit::ABORTED);
                        }
                        if tx.send(Ev::Coord(m)).is_err() {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => {
                        say(format!("error: server {shard} stopping: lost the coordinator\n"));
                        std::process::exit(crate::error::exit::ABORTED);
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| JobError::io("spawning the coordinator watch", e))
}
