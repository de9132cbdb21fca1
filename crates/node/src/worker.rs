//! A worker process in a cluster: joins the coordinator, connects to its
//! peers, trains its partition with gradients all-reduced every step, sends
//! heartbeats, and stops at once when the coordinator says the job failed.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use wire::msg::{FromCoordinator, PeerHello, ToCoordinator};
use wire::{PeerInfo, Role, Secret};

use crate::comm::Comm;
use crate::config::{ClusterConfig, JobConfig};
use crate::env::ClusterEnv;
use crate::error::JobError;
use crate::exchange::AllreduceExchange;
use crate::net::{self, ControlReader};
use crate::report::Observer;
use crate::train::{Summary, Trainer};

/// How long a worker waits for the whole cluster to assemble.
pub const RENDEZVOUS_TIMEOUT_MS: u64 = 60_000;
/// Heartbeats per heartbeat timeout.
const HEARTBEATS_PER_TIMEOUT: u64 = 5;
/// How long a finished worker waits for the others to finish.
const SHUTDOWN_WAIT_MS: u64 = 60_000;
/// Exit code of a worker told to stop because another one failed.
pub const EXIT_ABORTED: i32 = 3;

/// A worker's place in a running cluster: its rank, its peers and its line to the coordinator.
pub struct Member {
    pub rank: u32,
    pub world: u32,
    pub generation: u64,
    pub coord: Arc<Mutex<TcpStream>>,
    /// The step the heartbeats report.
    pub step: Arc<AtomicU64>,
    pub comm: Comm,
    /// Fires when the coordinator says everyone has finished.
    pub shutdown: mpsc::Receiver<()>,
}

/// Joins the cluster the environment names: authenticates with the coordinator,
/// gets a rank, connects to every peer, and starts heartbeats and the abort watch.
pub fn join(env: &ClusterEnv, secret: &Secret, cluster: &ClusterConfig) -> Result<Member, JobError> {
    let coord_addr = env.coordinator.clone().ok_or_else(|| JobError::Config {
        path: "$MASTER_ADDR".into(),
        why: "a worker needs the coordinator's address (MASTER_ADDR and MASTER_PORT, or DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT)".into(),
    })?;
    let mut coord = net::connect(&coord_addr, RENDEZVOUS_TIMEOUT_MS)?;
    let own = PeerInfo {
        role: Role::Worker,
        rank: env.rank.unwrap_or(u32::MAX),
    };
    net::connect_handshake(&mut coord, secret, own)?;
    // Peers reach us on the interface that reaches the coordinator.
    let local_ip = coord.local_addr().map_err(|e| JobError::io("local address", e))?.ip();
    let listener = net::listen(&format!("{local_ip}:0"))?;
    let data_addr = listener
        .local_addr()
        .map_err(|e| JobError::io("listener address", e))?
        .to_string();
    let join = ToCoordinator::Join {
        role: Role::Worker,
        rank: env.rank,
        data_addr,
        pid: std::process::id(),
    };
    net::send_control(&mut coord, own.rank, &join)?;
    let mut reader = ControlReader::new(coord.try_clone().map_err(|e| JobError::io("cloning", e))?);
    let welcome = match reader.recv::<FromCoordinator>(Some(RENDEZVOUS_TIMEOUT_MS))? {
        Some(w @ FromCoordinator::Welcome { .. }) => w,
        Some(FromCoordinator::Abort { reason, .. }) => return Err(JobError::Coordinator(reason)),
        other => return Err(JobError::Coordinator(format!("expected a welcome, got {other:?}"))),
    };
    welcome.check().map_err(JobError::Coordinator)?;
    let FromCoordinator::Welcome {
        generation,
        rank,
        world,
        peers,
    } = welcome
    else {
        unreachable!("matched above")
    };
    tracing::info!(rank, world, generation, "joined");
    let streams = mesh(rank, world, generation, &peers, &listener, secret)?;
    let coord = Arc::new(Mutex::new(coord));
    let step = Arc::new(AtomicU64::new(0));
    spawn_heartbeats(coord.clone(), rank, step.clone(), cluster.heartbeat_timeout_ms)?;
    let (shutdown_tx, shutdown) = mpsc::channel();
    spawn_abort_watch(reader, rank, shutdown_tx)?;
    let comm = Comm::new(
        rank,
        streams,
        collective::CollectiveConfig::default(),
        cluster.collective_timeout_ms,
        cluster.tensor_crc,
    )?;
    Ok(Member {
        rank,
        world,
        generation,
        coord,
        step,
        shutdown,
        comm,
    })
}

/// Tells the coordinator this worker is done (or failed). After success, waits
/// (bounded) for the coordinator's word that every worker has finished: a
/// process that exits while a peer still reads from it may reset the
/// connection and destroy frames the peer has not read yet.
pub fn report_end(
    coord: &Mutex<TcpStream>,
    shutdown: &mpsc::Receiver<()>,
    rank: u32,
    result: Result<u64, &JobError>,
) -> Result<(), JobError> {
    let mut c = coord.lock().expect("coordinator stream lock");
    match result {
        Ok(steps) => {
            net::send_control(&mut c, rank, &ToCoordinator::Finished { steps })?;
            drop(c);
            if shutdown.recv_timeout(Duration::from_millis(SHUTDOWN_WAIT_MS)).is_err() {
                tracing::warn!(
                    rank,
                    waited_ms = SHUTDOWN_WAIT_MS,
                    "no shutdown from the coordinator; exiting anyway"
                );
            }
            Ok(())
        }
        Err(e) => {
            // Best effort: the coordinator also sees this worker disconnect.
            let _ = net::send_control(&mut c, rank, &ToCoordinator::Failed { reason: e.to_string() });
            Ok(())
        }
    }
}

/// Runs one training worker until the job ends.
pub fn run(
    cfg: JobConfig,
    env: &ClusterEnv,
    secret: &Secret,
    resume: Option<&Path>,
    obs: &mut dyn Observer,
) -> Result<Summary, JobError> {
    // Load the data first: a bad file fails this worker before the cluster waits for it.
    let data = crate::job::load_data(&cfg)?;
    let member = join(env, secret, &cfg.cluster)?;
    let (rank, world) = (member.rank, member.world);
    if world != cfg.cluster.workers {
        tracing::warn!(
            world,
            configured = cfg.cluster.workers,
            "cluster size differs from cluster.workers; using the coordinator's"
        );
    }
    let Member {
        coord,
        step,
        comm,
        shutdown,
        ..
    } = member;
    let mut ex = AllreduceExchange::new(
        comm,
        cfg.cluster.overlap,
        cfg.cluster.bucket_bytes,
        cfg.cluster.collective_timeout_ms,
        coord.clone(),
    )?;
    let mut trainer = Trainer::new(cfg, data, rank, world)?;
    if let Some(dir) = resume {
        trainer.resume(dir)?;
    }
    let mut relay = |r: &crate::report::Report| {
        if let crate::report::Report::Step(s) = r {
            step.store(s.step_in_epoch, Ordering::Relaxed);
        }
        obs.report(r);
    };
    let result = trainer.run(&mut ex, &mut relay);
    report_end(&coord, &shutdown, rank, result.as_ref().map(|s| s.steps))?;
    result
}

/// Connects every pair of workers once: rank i dials every rank below it and
/// accepts every rank above it. Returns one stream per peer, by rank.
fn mesh(
    rank: u32,
    world: u32,
    generation: u64,
    peers: &[String],
    listener: &TcpListener,
    secret: &Secret,
) -> Result<Vec<Option<TcpStream>>, JobError> {
    let own = PeerInfo {
        role: Role::Worker,
        rank,
    };
    let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    let expect_inbound = (world - 1 - rank) as usize;
    let (tx, rx) = mpsc::channel();
    let accept_listener = listener.try_clone().map_err(|e| JobError::io("cloning listener", e))?;
    let accept_secret = secret.clone();
    thread::Builder::new()
        .name("mesh-accept".into())
        .spawn(move || {
            for _ in 0..expect_inbound {
                let r = accept_listener
                    .accept()
                    .map_err(|e| JobError::io("accepting a peer", e))
                    .and_then(|(mut s, _)| {
                        net::accept_handshake(&mut s, &accept_secret, own)?;
                        let hello: PeerHello = net::recv_control_exact(&mut s, net::HANDSHAKE_TIMEOUT_MS)?;
                        Ok((hello, s))
                    });
                if tx.send(r).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| JobError::io("spawning the accept thread", e))?;
    for (peer, addr) in peers.iter().enumerate().take(rank as usize) {
        let mut s = net::connect(addr, RENDEZVOUS_TIMEOUT_MS)?;
        let them = net::connect_handshake(&mut s, secret, own)?;
        if them.rank != peer as u32 {
            return Err(JobError::Peer {
                rank: peer as u32,
                why: format!("{addr} answered as {them}"),
            });
        }
        net::send_control(&mut s, rank, &PeerHello { generation, rank })?;
        streams[peer] = Some(s);
    }
    let deadline = Instant::now() + Duration::from_millis(RENDEZVOUS_TIMEOUT_MS);
    for _ in 0..expect_inbound {
        let left = deadline.saturating_duration_since(Instant::now());
        let (hello, s) = rx.recv_timeout(left).map_err(|_| {
            let missing: Vec<u32> = (rank + 1..world).filter(|r| streams[*r as usize].is_none()).collect();
            JobError::Stalled {
                op: format!("connecting peers {missing:?}"),
                step: 0,
                rank: missing.first().copied().unwrap_or(rank),
                waited_ms: RENDEZVOUS_TIMEOUT_MS,
            }
        })??;
        if hello.generation != generation
            || hello.rank <= rank
            || hello.rank >= world
            || streams[hello.rank as usize].is_some()
        {
            return Err(JobError::Peer {
                rank: hello.rank,
                why: format!("unexpected hello {hello:?}"),
            });
        }
        streams[hello.rank as usize] = Some(s);
    }
    Ok(streams)
}

fn spawn_heartbeats(
    coord: Arc<Mutex<TcpStream>>,
    rank: u32,
    step: Arc<AtomicU64>,
    timeout_ms: u64,
) -> Result<(), JobError> {
    let every = Duration::from_millis((timeout_ms / HEARTBEATS_PER_TIMEOUT).max(10));
    thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            loop {
                thread::sleep(every);
                let msg = ToCoordinator::Heartbeat {
                    step: step.load(Ordering::Relaxed),
                };
                let Ok(mut s) = coord.lock() else { return };
                if net::send_control(&mut s, rank, &msg).is_err() {
                    return;
                }
            }
        })
        .map(|_| ())
        .map_err(|e| JobError::io("spawning the heartbeat thread", e))
}

/// Watches the coordinator: an abort, or the coordinator's disappearance, ends
/// this process at once (a collective may be blocked waiting for a dead peer).
fn spawn_abort_watch(mut reader: ControlReader, rank: u32, shutdown: mpsc::Sender<()>) -> Result<(), JobError> {
    thread::Builder::new()
        .name("coordinator-watch".into())
        .spawn(move || {
            loop {
                match reader.recv::<FromCoordinator>(None) {
                    Ok(Some(FromCoordinator::Abort {
                        reason, failed_rank, ..
                    })) => {
                        if failed_rank != Some(rank) {
                            say(&format!("error: rank {rank} stopping: {reason}\n"));
                        }
                        std::process::exit(EXIT_ABORTED);
                    }
                    Ok(Some(FromCoordinator::Shutdown)) => {
                        let _ = shutdown.send(());
                        return;
                    }
                    Ok(Some(other)) => tracing::warn!(?other, "unexpected message from the coordinator"),
                    Ok(None) | Err(_) => {
                        say(&format!("error: rank {rank} stopping: lost the coordinator\n"));
                        std::process::exit(EXIT_ABORTED);
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| JobError::io("spawning the coordinator watch", e))
}

/// Writes a whole line to stderr in one call: the processes of a local cluster
/// share one terminal, and a line written in pieces interleaves with theirs.
fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(line.as_bytes());
}
