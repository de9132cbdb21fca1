//! The worker's side of cluster membership: the links to its peers for one
//! generation, and — in an elastic job (`cluster.elastic`) — carrying on
//! after the membership changes.
//!
//! Three threads take part. The *acceptor* takes every peer connection for
//! the life of the process, authenticates it and reads its hello; the
//! *coordinator watch* hears of new generations ([`FromCoordinator::Regroup`]);
//! the training thread forms the links ([`mesh`]) and runs the steps.
//!
//! When a collective fails on a lost peer, or the coordinator opens a new
//! generation (a worker was lost, or one joins), the training thread:
//! 1. drops its links (their peers' collectives fail at once, so the whole
//!    old ring stops within a few milliseconds) and tells the coordinator;
//! 2. waits (bounded) for the newest generation, and forms its links;
//! 3. agrees with the others on who holds the newest training state — the
//!    worker with the most steps; a synchronous step that completed anywhere
//!    completed with every worker's gradient in it — and copies that state
//!    to everyone ([`sync_state`]): parameters, optimizer state, position,
//!    and the epoch's plan of rows, which each worker then cuts for the new
//!    membership (`data::EpochPlan::regroup`);
//! 4. continues the epoch where it stood.
//!
//! A newer generation announced during 2–3 interrupts them: the watch shuts
//! the links down and wakes the mesh, and the worker starts again at 2.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use wire::msg::{FromCoordinator, HostId, PeerHello};
use wire::{PeerInfo, Role, Secret};

use crate::comm::{Comm, Connection};
use crate::config::Transport;
use crate::error::JobError;
use crate::gate::Gate;
use crate::net::{self, ControlReader};
use crate::train::Trainer;

/// How often the peer acceptor looks up from its gate.
const ACCEPT_TICK_MS: u64 = 1_000;

/// A peer's connection after authentication and hello, or word that the
/// generation the mesh is forming has been replaced.
pub(crate) enum Inbound {
    Peer { hello: PeerHello, stream: TcpStream },
    Superseded(u64),
}

/// A membership the coordinator announced.
#[derive(Clone, Debug)]
pub(crate) struct Generation {
    pub generation: u64,
    pub rank: u32,
    pub peers: Vec<String>,
}

impl Generation {
    pub fn world(&self) -> u32 {
        self.peers.len() as u32
    }
}

/// What the training thread shares with the acceptor and the coordinator watch.
#[derive(Clone, Default)]
pub(crate) struct Shared {
    /// The newest generation announced.
    pub latest: Arc<AtomicU64>,
    /// This worker's rank in it: what the acceptor answers a handshake with.
    pub rank: Arc<AtomicU32>,
    /// The current links' streams: shut down when a newer generation opens.
    pub links: Arc<Mutex<Vec<TcpStream>>>,
}

impl Shared {
    /// Replaces the registered links by `streams`, or shuts them down at once
    /// if a newer generation than `generation` was announced meanwhile.
    pub fn register(&self, generation: u64, streams: Vec<TcpStream>) {
        let mut links = self.links.lock().expect("links lock");
        if self.latest.load(Ordering::SeqCst) > generation {
            streams.iter().for_each(|s| drop(s.shutdown(Shutdown::Both)));
        }
        *links = streams;
    }

    /// Shuts every registered link down: collectives waiting on them fail.
    fn interrupt(&self) {
        for s in self.links.lock().expect("links lock").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Takes every peer connection for the life of the process: authenticates
/// it behind a [`Gate`] (so a stranger neither stops nor delays the mesh),
/// reads its hello and hands both to the mesh being formed. A connection
/// that fails on the way is logged and dropped.
pub(crate) fn spawn_acceptor(
    listener: TcpListener,
    secret: Secret,
    shared: Shared,
    tx: Sender<Inbound>,
) -> Result<(), JobError> {
    // Peers check the rank the handshake names: this worker's rank of the moment.
    let rank = shared.rank.clone();
    let own = move || PeerInfo {
        role: Role::Worker,
        rank: rank.load(Ordering::SeqCst),
    };
    let gate = Gate::open_as(listener, secret, own, "peers")?;
    thread::Builder::new()
        .name("peer-accept".into())
        .spawn(move || {
            loop {
                let mut a = match gate.next(Duration::from_millis(ACCEPT_TICK_MS)) {
                    Ok(a) => a,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                match net::recv_control_exact::<PeerHello>(&mut a.stream, net::HANDSHAKE_TIMEOUT_MS) {
                    Ok(hello) => {
                        if tx
                            .send(Inbound::Peer {
                                hello,
                                stream: a.stream,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(peer = %a.peer, error = %e, "dropped a peer connection during its hello"),
                }
            }
        })
        .map(|_| ())
        .map_err(|e| JobError::io("spawning the peer acceptor", e))
}

/// Watches the coordinator: an abort, or the coordinator's disappearance,
/// ends this process at once (a collective may be blocked on a dead peer);
/// a new generation interrupts the current links and is passed on.
pub(crate) fn spawn_member_watch(
    mut reader: ControlReader,
    shared: Shared,
    regroups: Sender<Generation>,
    inbound: Sender<Inbound>,
    shutdown: Sender<()>,
) -> Result<(), JobError> {
    thread::Builder::new()
        .name("coordinator-watch".into())
        .spawn(move || {
            loop {
                let who = format!("rank {}", shared.rank.load(Ordering::SeqCst));
                match reader.recv::<FromCoordinator>(None) {
                    Ok(Some(FromCoordinator::Abort {
                        reason, failed_rank, ..
                    })) => {
                        if failed_rank != Some(shared.rank.load(Ordering::SeqCst)) {
                            crate::worker::say(&format!("error: {who} stopping: {reason}\n"));
                        }
                        std::process::exit(crate::error::exit::ABORTED);
                    }
                    Ok(Some(FromCoordinator::Shutdown)) => {
                        let _ = shutdown.send(());
                        return;
                    }
                    Ok(Some(msg @ FromCoordinator::Regroup { .. })) => {
                        if let Err(why) = msg.check() {
                            tracing::warn!(why, "ignored a malformed regroup");
                            continue;
                        }
                        let FromCoordinator::Regroup {
                            generation,
                            rank,
                            peers,
                            ..
                        } = msg
                        else {
                            unreachable!("matched above")
                        };
                        tracing::info!(generation, rank, world = peers.len(), "new generation");
                        shared.latest.fetch_max(generation, Ordering::SeqCst);
                        shared.rank.store(rank, Ordering::SeqCst);
                        shared.interrupt();
                        let _ = inbound.send(Inbound::Superseded(generation));
                        if regroups
                            .send(Generation {
                                generation,
                                rank,
                                peers,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(Some(other)) => tracing::warn!(?other, "unexpected message from the coordinator"),
                    Ok(None) | Err(_) => {
                        crate::worker::say(&format!("error: {who} stopping: lost the coordinator\n"));
                        std::process::exit(crate::error::exit::ABORTED);
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| JobError::io("spawning the coordinator watch", e))
}

/// Connects every pair of workers of generation `g` once: each rank dials
/// every lower rank and takes the higher ranks' connections from `inbound`.
/// With `transport = auto`, pairs on the same machine also set up a
/// shared-memory link (`shm::dial`, `shm::answer`). Connections of earlier
/// generations are dropped; a later generation's are kept in `early` for the
/// mesh that needs them. Every wait ends by `deadline`; word of a newer
/// generation ends the mesh with an error. Returns one connection per peer, by rank.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mesh(
    g: &Generation,
    inbound: &Receiver<Inbound>,
    early: &mut Vec<(PeerHello, TcpStream)>,
    secret: &Secret,
    transport: Transport,
    connect_ms: u64,
    wait_ms: u64,
) -> Result<Vec<Option<Connection>>, JobError> {
    let deadline = after_ms(wait_ms);
    let (rank, world, generation) = (g.rank, g.world(), g.generation);
    let own = PeerInfo {
        role: Role::Worker,
        rank,
    };
    let host: Option<HostId> = match transport {
        Transport::Tcp => None,
        Transport::Auto => crate::shm::host_id()
            .map_err(|why| tracing::warn!(rank, why, "cannot tell which peers share this machine; using TCP"))
            .ok(),
    };
    let budget = crate::shm::Budget::default();
    let mut conns: Vec<Option<Connection>> = (0..world).map(|_| None).collect();
    for (peer, addr) in g.peers.iter().enumerate().take(rank as usize) {
        let mut s = net::connect(addr, connect_ms)?;
        let them = net::connect_handshake(&mut s, secret, own)?;
        if them.rank != peer as u32 {
            return Err(JobError::Peer {
                rank: peer as u32,
                why: format!("{addr} answered as {them} in generation {generation}"),
            });
        }
        let shm = crate::shm::dial(&mut s, rank, peer as u32, generation, host.as_ref(), &budget)?;
        conns[peer] = Some(Connection { stream: s, shm });
    }
    let missing = |conns: &[Option<Connection>]| -> Vec<u32> {
        (rank + 1..world).filter(|r| conns[*r as usize].is_none()).collect()
    };
    early.retain(|(h, _)| h.generation >= generation);
    loop {
        let waiting = missing(&conns);
        let Some(&first) = waiting.first() else { break };
        let (hello, mut s) = match early.iter().position(|(h, _)| h.generation == generation) {
            Some(i) => early.swap_remove(i),
            None => {
                let left = deadline.saturating_duration_since(Instant::now());
                match inbound.recv_timeout(left) {
                    Ok(Inbound::Peer { hello, stream }) => (hello, stream),
                    Ok(Inbound::Superseded(newer)) if newer > generation => {
                        return Err(superseded(rank, generation, newer));
                    }
                    Ok(Inbound::Superseded(_)) => continue,
                    Err(_) => {
                        return Err(JobError::Stalled {
                            op: format!("connecting peers {waiting:?} of generation {generation}"),
                            step: 0,
                            rank: first,
                            waited_ms: wait_ms,
                        });
                    }
                }
            }
        };
        if hello.check().is_err() || hello.generation < generation {
            continue;
        }
        if hello.generation > generation {
            early.push((hello, s));
            continue;
        }
        if hello.rank <= rank || hello.rank >= world || conns[hello.rank as usize].is_some() {
            return Err(JobError::Peer {
                rank: hello.rank,
                why: format!("unexpected hello {hello:?}"),
            });
        }
        let shm = crate::shm::answer(&mut s, rank, generation, host.as_ref(), &hello, &budget)?;
        conns[hello.rank as usize] = Some(Connection { stream: s, shm });
    }
    Ok(conns)
}

fn superseded(rank: u32, generation: u64, newer: u64) -> JobError {
    JobError::Peer {
        rank,
        why: format!("generation {generation} was replaced by {newer}"),
    }
}

/// The newest generation announced so far, waiting for one newer than
/// `after` until `deadline`.
pub(crate) fn next_generation(
    regroups: &Receiver<Generation>,
    after: u64,
    deadline: Instant,
) -> Result<Generation, JobError> {
    let mut newest: Option<Generation> = None;
    while let Ok(g) = regroups.try_recv() {
        newest = Some(g);
    }
    loop {
        if let Some(g) = newest.take().filter(|g| g.generation > after) {
            // Later news may already be queued behind it.
            let mut g = g;
            while let Ok(n) = regroups.try_recv() {
                g = n;
            }
            return Ok(g);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match regroups.recv_timeout(left) {
            Ok(g) => newest = Some(g),
            Err(_) => {
                return Err(JobError::Coordinator(format!(
                    "no new membership generation after {after} within the deadline"
                )));
            }
        }
    }
}

/// Whether a training error may be survived by regrouping: a lost or stalled
/// peer, or a link that broke. Errors of this worker's own (bad data, a
/// diverged loss, a malformed frame) are not.
pub(crate) fn recoverable(e: &JobError) -> bool {
    matches!(
        e,
        JobError::Peer { .. } | JobError::Stalled { .. } | JobError::Io { .. }
    )
}

/// After a membership change: finds the worker with the newest training
/// state (most steps; joiners have none) and copies its state to all.
/// Returns the source's rank.
pub(crate) fn sync_state(comm: &mut Comm, trainer: &mut Trainer, have_state: bool) -> Result<u32, JobError> {
    let (rank, world) = (comm.rank(), comm.world());
    // Keys in 16-bit halves: sums of one non-zero slot per rank stay exact in f32.
    let key = if have_state { trainer.position().step + 1 } else { 0 };
    let mut keys = vec![0.0f32; 3 * world as usize];
    let at = 3 * rank as usize;
    keys[at] = (key >> 32 & 0xffff) as f32;
    keys[at + 1] = (key >> 16 & 0xffff) as f32;
    keys[at + 2] = (key & 0xffff) as f32;
    comm.all_reduce(&mut keys, 0, "finding the newest training state")?;
    let decoded: Vec<u64> = keys
        .chunks_exact(3)
        .map(|k| ((k[0] as u64) << 32) | ((k[1] as u64) << 16) | k[2] as u64)
        .collect();
    let (source, &best) = decoded
        .iter()
        .enumerate()
        .max_by_key(|&(r, k)| (*k, std::cmp::Reverse(r)))
        .expect("a world has ranks");
    if best == 0 {
        return Err(JobError::Coordinator(
            "no worker of the new generation holds the training state".into(),
        ));
    }
    let source = source as u32;
    let mut bytes = if rank == source {
        trainer.export_state()
    } else {
        Vec::new()
    };
    let mut len = [0.0f32; 4];
    if rank == source {
        for (i, l) in len.iter_mut().enumerate() {
            *l = (bytes.len() as u64 >> (48 - 16 * i) & 0xffff) as f32;
        }
    }
    comm.broadcast(&mut len, source, 0, "sizing the training state")?;
    let n = len.iter().fold(0u64, |acc, &x| acc << 16 | x as u64) as usize;
    let mut words = vec![0.0f32; n.div_ceil(4)];
    if rank == source {
        bytes.resize(words.len() * 4, 0);
        for (w, c) in words.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = f32::from_bits(u32::from_le_bytes(c.try_into().expect("4 bytes")));
        }
    }
    comm.broadcast(&mut words, source, 0, "copying the training state")?;
    if rank != source {
        bytes = words.iter().flat_map(|w| w.to_bits().to_le_bytes()).collect();
        bytes.truncate(n);
        trainer.import_state(&bytes)?;
    }
    Ok(source)
}

/// The channels and shared state of a worker's membership.
pub(crate) struct Membership {
    pub shared: Shared,
    pub regroups: Receiver<Generation>,
    pub inbound: Receiver<Inbound>,
    pub early: Vec<(PeerHello, TcpStream)>,
}

impl Membership {
    /// Starts the acceptor on `listener` and the coordinator watch on `reader`.
    pub fn start(
        listener: TcpListener,
        reader: ControlReader,
        secret: &Secret,
        first: &Generation,
        shutdown: Sender<()>,
    ) -> Result<Self, JobError> {
        let shared = Shared::default();
        shared.latest.store(first.generation, Ordering::SeqCst);
        shared.rank.store(first.rank, Ordering::SeqCst);
        let (in_tx, inbound) = mpsc::channel();
        let (re_tx, regroups) = mpsc::channel();
        spawn_acceptor(listener, secret.clone(), shared.clone(), in_tx.clone())?;
        spawn_member_watch(reader, shared.clone(), re_tx, in_tx, shutdown)?;
        Ok(Self {
            shared,
            regroups,
            inbound,
            early: Vec::new(),
        })
    }
}

/// How long a regrouping worker waits for each thing: the coordinator's
/// next generation, and its peers' connections.
pub(crate) const REGROUP_WAIT_MS: u64 = 15_000;
/// How long dialing a peer of a new generation may take (it is already listening).
pub(crate) const REGROUP_CONNECT_MS: u64 = 2_000;

/// A deadline `ms` from now.
pub(crate) fn after_ms(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}
