//! The coordinator process: accepts authenticated connections, turns what
//! arrives into events for the `coordinator` engine with the current time,
//! and carries out its commands.

use std::collections::HashMap;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use coordinator::{Command, ConnId, Coordinator, Event};
pub use coordinator::{Elastic, Outcome, ShardView};
use wire::msg::ToCoordinator;
use wire::{PeerInfo, Role, Secret};

use crate::error::JobError;
use crate::gate::{Admitted, Gate};
use crate::net::{self, ControlReader};

/// Connections the coordinator holds at once; more are refused.
pub const CONNECTIONS_MAX: usize = 4 * crate::WORKERS_MAX as usize + 16;
/// How often the accept thread looks up from the gate.
const ACCEPT_TICK_MS: u64 = 1_000;
/// Ticks per heartbeat timeout: how finely failure detection sees time.
const TICKS_PER_TIMEOUT: u64 = 10;

pub struct CoordinatorConfig {
    pub world: u32,
    /// Parameter-server shards that must join besides the workers.
    pub servers: u32,
    pub heartbeat_timeout_ms: u64,
    pub rendezvous_timeout_ms: u64,
    /// Survive lost workers and take in new ones (see `coordinator::elastic`).
    pub elastic: Option<coordinator::Elastic>,
    /// A restarted coordinator: the last generation its predecessor opened.
    pub continue_after: u64,
    /// Server processes per shard: 1, or 2 for a primary and a backup (`coordinator::servers`).
    pub replicas: u32,
    /// Called when a replicated shard's primary or backup changes (the binary prints it).
    pub on_shard: Option<fn(&ShardView)>,
}

/// The membership generation and step of the newest good checkpoint in `dir`
/// (what a restarted coordinator continues after), if there is one.
pub fn saved_generation(dir: &std::path::Path) -> Option<(u64, u64)> {
    let (snap, _) = checkpoint::load_latest(dir).ok()?;
    let generation = snap
        .manifest
        .data_position
        .get("generation")
        .and_then(|g| g.as_u64())
        .unwrap_or(0);
    Some((generation, snap.manifest.step))
}

/// Elastic jobs: how long after the first news of a lost or joining worker the
/// next generation opens, so that the other news of the same event make one generation.
pub const REGROUP_SETTLE_MS: u64 = 100;

enum Input {
    Joined { conn: ConnId, stream: TcpStream },
    Message { conn: ConnId, msg: ToCoordinator },
    Gone { conn: ConnId },
}

/// Runs the coordinator on `listener` until the job ends; returns how it ended.
pub fn run(listener: TcpListener, cfg: CoordinatorConfig, secret: Secret) -> Result<Outcome, JobError> {
    let (tx, rx) = mpsc::channel::<Input>();
    let own = PeerInfo {
        role: Role::Coordinator,
        rank: 0,
    };
    let gate = Gate::open(listener, secret, own, "coordinator")?;
    let accept_tx = tx.clone();
    thread::Builder::new()
        .name("accept".into())
        .spawn(move || accept_loop(gate, accept_tx))
        .map_err(|e| JobError::io("spawning the accept thread", e))?;
    drop(tx);
    let mut engine = Coordinator::new(coordinator::Config {
        world: cfg.world,
        servers: cfg.servers,
        heartbeat_timeout_ms: cfg.heartbeat_timeout_ms,
        rendezvous_timeout_ms: cfg.rendezvous_timeout_ms,
        elastic: cfg.elastic,
    })
    .with_replicas(cfg.replicas.clamp(1, 2));
    engine.continue_after(cfg.continue_after);
    let mut conns: HashMap<ConnId, TcpStream> = HashMap::new();
    let start = Instant::now();
    let mut tick_ms = (cfg.heartbeat_timeout_ms / TICKS_PER_TIMEOUT).max(10);
    if let Some(e) = cfg.elastic {
        // A regroup opens within a tick of its settle time.
        tick_ms = tick_ms.min((e.settle_ms / 2).max(10));
    }
    let tick = Duration::from_millis(tick_ms);
    let mut next_tick = Instant::now() + tick;
    loop {
        let now_ms = start.elapsed().as_millis() as u64;
        let event = match rx.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            Ok(Input::Joined { conn, stream }) => {
                conns.insert(conn, stream);
                continue;
            }
            Ok(Input::Message { conn, msg }) => Event::Message { conn, msg },
            Ok(Input::Gone { conn }) => {
                conns.remove(&conn);
                Event::Disconnected { conn }
            }
            Err(RecvTimeoutError::Timeout) => {
                next_tick = Instant::now() + tick;
                Event::Tick
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(JobError::Coordinator("the accept thread stopped".into()));
            }
        };
        for cmd in engine.on_event(now_ms, event) {
            match cmd {
                Command::Send { conn, msg } => {
                    if let Some(s) = conns.get_mut(&conn) {
                        // A failed write shows up as a disconnect from the reader side.
                        if let Err(e) = net::send_control(s, 0, &msg) {
                            tracing::warn!(conn, error = %e, "send to worker failed");
                        }
                    }
                }
                Command::Close { conn } => {
                    if let Some(s) = conns.remove(&conn) {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                }
                Command::Shard(v) => {
                    tracing::info!(shard = v.shard, primary = ?v.primary_pid, backup = ?v.backup_pid, ready = v.backup_ready, failovers = v.failovers, "shard replicas");
                    if let Some(f) = cfg.on_shard {
                        f(&v);
                    }
                }
                Command::Exit(outcome) => {
                    for s in conns.values() {
                        let _ = s.shutdown(Shutdown::Write);
                    }
                    return Ok(outcome);
                }
            }
        }
    }
}

/// Takes the gate's authenticated connections for the coordinator's life,
/// each read on a thread of its own, at most [`CONNECTIONS_MAX`] at once.
fn accept_loop(gate: Gate, tx: Sender<Input>) {
    let mut next: ConnId = 0;
    let live = Arc::new(AtomicUsize::new(0));
    loop {
        let admitted = match gate.next(Duration::from_millis(ACCEPT_TICK_MS)) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Admitted { stream, peer, addr } = admitted;
        if live.load(Ordering::SeqCst) >= CONNECTIONS_MAX {
            tracing::warn!(peer = %peer, addr = %addr, limit = CONNECTIONS_MAX, "refusing connection: too many");
            continue;
        }
        let conn = next;
        next += 1;
        let _ = stream.set_nodelay(true);
        let Ok(writer) = stream.try_clone() else { continue };
        if tx.send(Input::Joined { conn, stream: writer }).is_err() {
            return;
        }
        live.fetch_add(1, Ordering::SeqCst);
        let (conn_tx, held) = (tx.clone(), live.clone());
        let spawned = thread::Builder::new().name(format!("conn-{conn}")).spawn(move || {
            read_loop(conn, stream, &conn_tx);
            held.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            // The slot is given back and the engine told the connection is gone.
            live.fetch_sub(1, Ordering::SeqCst);
            tracing::error!(conn, error = %e, "cannot spawn a connection thread");
            let _ = tx.send(Input::Gone { conn });
        }
    }
}

fn read_loop(conn: ConnId, stream: TcpStream, tx: &Sender<Input>) {
    let mut reader = ControlReader::new(stream);
    loop {
        match reader.recv::<ToCoordinator>(None) {
            Ok(Some(msg)) => {
                if tx.send(Input::Message { conn, msg }).is_err() {
                    return;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(conn, error = %e, "dropping a connection");
                break;
            }
        }
    }
    let _ = tx.send(Input::Gone { conn });
}

/// A shard's replicas as the JSON line `sinter coordinator` prints (`"event": "shard"`).
pub fn shard_json(v: &ShardView) -> serde_json::Value {
    serde_json::json!({
        "event": "shard",
        "shard": v.shard,
        "primary_pid": v.primary_pid,
        "backup_pid": v.backup_pid,
        "backup_ready": v.backup_ready,
        "failovers": v.failovers,
    })
}
