//! The coordinator process: accepts authenticated connections, turns what
//! arrives into events for the `coordinator` engine with the current time,
//! and carries out its commands.

use std::collections::HashMap;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

pub use coordinator::Outcome;
use coordinator::{Command, ConnId, Coordinator, Event};
use wire::msg::ToCoordinator;
use wire::{PeerInfo, Role, Secret};

use crate::error::JobError;
use crate::net::{self, ControlReader};

/// Connections the coordinator holds at once; more are refused.
pub const CONNECTIONS_MAX: usize = 4 * crate::WORKERS_MAX as usize + 16;
/// Ticks per heartbeat timeout: how finely failure detection sees time.
const TICKS_PER_TIMEOUT: u64 = 10;

pub struct CoordinatorConfig {
    pub world: u32,
    /// Parameter-server shards that must join besides the workers.
    pub servers: u32,
    pub heartbeat_timeout_ms: u64,
    pub rendezvous_timeout_ms: u64,
}

enum Input {
    Joined { conn: ConnId, stream: TcpStream },
    Message { conn: ConnId, msg: ToCoordinator },
    Gone { conn: ConnId },
}

/// Runs the coordinator on `listener` until the job ends; returns how it ended.
pub fn run(listener: TcpListener, cfg: CoordinatorConfig, secret: Secret) -> Result<Outcome, JobError> {
    let (tx, rx) = mpsc::channel::<Input>();
    let accept_tx = tx.clone();
    thread::Builder::new()
        .name("accept".into())
        .spawn(move || accept_loop(listener, secret, accept_tx))
        .map_err(|e| JobError::io("spawning the accept thread", e))?;
    drop(tx);
    let mut engine = Coordinator::new(coordinator::Config {
        world: cfg.world,
        servers: cfg.servers,
        heartbeat_timeout_ms: cfg.heartbeat_timeout_ms,
        rendezvous_timeout_ms: cfg.rendezvous_timeout_ms,
    });
    let mut conns: HashMap<ConnId, TcpStream> = HashMap::new();
    let start = Instant::now();
    let tick = Duration::from_millis((cfg.heartbeat_timeout_ms / TICKS_PER_TIMEOUT).max(10));
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

fn accept_loop(listener: TcpListener, secret: Secret, tx: Sender<Input>) {
    let mut next: ConnId = 0;
    let live = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let peer_addr = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        if live.load(std::sync::atomic::Ordering::Relaxed) >= CONNECTIONS_MAX {
            tracing::warn!(peer = %peer_addr, limit = CONNECTIONS_MAX, "refusing connection: too many");
            continue;
        }
        let conn = next;
        next += 1;
        let tx = tx.clone();
        let secret = secret.clone();
        let live = live.clone();
        live.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let spawned = thread::Builder::new().name(format!("conn-{conn}")).spawn(move || {
            let own = PeerInfo {
                role: Role::Coordinator,
                rank: 0,
            };
            match net::accept_handshake(&mut stream, &secret, own) {
                Ok(peer) => {
                    tracing::info!(conn, peer = %peer, addr = %peer_addr, "authenticated");
                    let _ = stream.set_nodelay(true);
                    if let Ok(w) = stream.try_clone()
                        && tx.send(Input::Joined { conn, stream: w }).is_ok()
                    {
                        read_loop(conn, stream, &tx);
                    }
                }
                Err(e) => tracing::warn!(peer = %peer_addr, error = %e, "refused an unauthenticated connection"),
            }
            live.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
        if spawned.is_err() {
            tracing::error!("cannot spawn a connection thread");
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
