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

use wire::msg::{FromCoordinator, HostId, PeerHello, ToCoordinator};
use wire::{PeerInfo, Role, Secret};

use crate::comm::{Comm, Connection};
use crate::config::{ClusterConfig, JobConfig, Transport};
use crate::env::ClusterEnv;
use crate::error::JobError;
use crate::exchange::AllreduceExchange;
use crate::net::{self, ControlReader};
use crate::ps_client::{InitArgs, PsExchange};
use crate::report::Observer;
use crate::train::{Summary, Trainer};

/// Rows of rank 0's partition scanned for hot keys before a parameter-server job starts.
const HOT_KEY_SAMPLE_ROWS: usize = 200_000;
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
    /// Data addresses of the parameter-server shards, by shard (empty for all-reduce jobs).
    pub servers: Vec<String>,
    /// Fires when the coordinator says everyone has finished.
    pub shutdown: mpsc::Receiver<()>,
}

/// Joins the cluster the environment names: authenticates with the coordinator,
/// gets a rank, connects to every peer, and starts heartbeats and the abort watch.
pub fn join(env: &ClusterEnv, secret: &Secret, cluster: &ClusterConfig) -> Result<Member, JobError> {
    let Welcomed {
        coord,
        reader,
        listener,
        generation,
        rank,
        world,
        peers,
        servers,
    } = rendezvous(env, secret, Role::Worker)?;
    tracing::info!(rank, world, generation, "joined");
    // With parameter servers, workers talk to the servers only.
    let conns = if servers.is_empty() {
        mesh(rank, world, generation, &peers, &listener, secret, cluster.transport)?
    } else {
        (0..world).map(|_| None).collect()
    };
    for (peer, c) in conns.iter().enumerate() {
        if let Some(c) = c {
            let transport = if c.shm.is_some() { "shm" } else { "tcp" };
            tracing::info!(rank, peer, transport, "peer link");
        }
    }
    let coord = Arc::new(Mutex::new(coord));
    let step = Arc::new(AtomicU64::new(0));
    spawn_heartbeats(coord.clone(), rank, step.clone(), cluster.heartbeat_timeout_ms)?;
    let (shutdown_tx, shutdown) = mpsc::channel();
    spawn_abort_watch(reader, format!("rank {rank}"), Some(rank), shutdown_tx)?;
    let comm = Comm::new(
        rank,
        conns,
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
        servers,
    })
}

/// A process the coordinator has admitted: its line to the coordinator, the
/// listener its peers reach it on, and the membership the welcome named.
pub(crate) struct Welcomed {
    pub coord: TcpStream,
    pub reader: ControlReader,
    pub listener: TcpListener,
    pub generation: u64,
    /// Among the processes of its role (workers, or parameter-server shards).
    pub rank: u32,
    /// Workers in the job.
    pub world: u32,
    pub peers: Vec<String>,
    pub servers: Vec<String>,
}

/// Authenticates with the coordinator the environment names, joins as `role`
/// (asking for the environment's rank, if any, for a worker) and waits for the welcome.
pub(crate) fn rendezvous(env: &ClusterEnv, secret: &Secret, role: Role) -> Result<Welcomed, JobError> {
    let coord_addr = env.coordinator.clone().ok_or_else(|| JobError::Config {
        path: "$MASTER_ADDR".into(),
        why: format!(
            "a {} needs the coordinator's address (MASTER_ADDR and MASTER_PORT, or DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT)",
            if role == Role::Server { "server" } else { "worker" }
        ),
    })?;
    let mut coord = net::connect(&coord_addr, RENDEZVOUS_TIMEOUT_MS)?;
    let asked = if role == Role::Worker { env.rank } else { None };
    let own = PeerInfo {
        role,
        rank: asked.unwrap_or(u32::MAX),
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
        role,
        rank: asked,
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
        servers,
    } = welcome
    else {
        unreachable!("matched above")
    };
    Ok(Welcomed {
        coord,
        reader,
        listener,
        generation,
        rank,
        world,
        peers,
        servers,
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
        servers,
        generation,
        ..
    } = member;
    let cluster = cfg.cluster.clone();
    let optim = cfg.optim.clone();
    let mut trainer = Trainer::new(cfg, data, rank, world)?;
    let restored = match resume {
        Some(dir) => trainer.resume(dir)?.exchange,
        None => Vec::new(),
    };
    let compress = trainer.config().compress.clone();
    let mut ex: Box<dyn crate::train::Exchange> = if servers.is_empty() && compress.is_active() {
        Box::new(crate::compress::CompressExchange::new(
            comm,
            &compress,
            trainer.layout(),
            trainer.config().train.seed,
            coord.clone(),
            &restored,
        )?)
    } else if servers.is_empty() {
        Box::new(AllreduceExchange::new(
            comm,
            cluster.overlap,
            cluster.bucket_bytes,
            cluster.collective_timeout_ms,
            coord.clone(),
        )?)
    } else {
        let mut ps = connect_servers(
            &mut trainer,
            &cluster,
            &optim,
            rank,
            world,
            generation,
            &servers,
            secret,
        )?;
        if compress.is_active() {
            let c = codec::CompressConfig {
                compress: compress.codec.clone(),
                error_feedback: compress.error_feedback,
            };
            ps.compress_pushes(c.compress.clone(), c.error_feedback(), trainer.config().train.seed);
        }
        Box::new(ps)
    };
    let mut relay = |r: &crate::report::Report| {
        if let crate::report::Report::Step(s) = r {
            step.store(s.step_in_epoch, Ordering::Relaxed);
        }
        obs.report(r);
    };
    let result = trainer.run(ex.as_mut(), &mut relay);
    report_end(&coord, &shutdown, rank, result.as_ref().map(|s| s.steps))?;
    result
}

/// Connects to the parameter servers; rank 0 first finds the hot keys in its
/// partition, places them, and starts the shards with the initial parameters.
#[allow(clippy::too_many_arguments)]
fn connect_servers(
    trainer: &mut Trainer,
    cluster: &ClusterConfig,
    optim: &optim::OptimConfig,
    rank: u32,
    world: u32,
    generation: u64,
    servers: &[String],
    secret: &Secret,
) -> Result<PsExchange, JobError> {
    let consistency = cluster.consistency();
    // BSP sums the workers' pushes into one step of the global batch; SSP and
    // async apply each push as its own step on the worker's batch.
    let weight = if consistency == ps::Consistency::Bsp {
        trainer.weight()
    } else {
        1.0
    };
    let init = if rank == 0 {
        let (hot_rows, total) = trainer.hot_rows(HOT_KEY_SAMPLE_ROWS, cluster.hot_keys);
        let layout = trainer.layout();
        let tables: Vec<(usize, u64)> = layout
            .tensors()
            .iter()
            .enumerate()
            .filter(|(_, t)| t.kind == tensor::ParamKind::Table)
            .map(|(i, t)| (i, t.row_len() as u64))
            .collect();
        // Load in values moved: a row's count times its length, for every table.
        let hot: Vec<(u64, u64)> = hot_rows
            .iter()
            .flat_map(|&(r, c)| tables.iter().map(move |&(t, len)| (ps::key(t, r), c * len)))
            .collect();
        let all: u64 = total * tables.iter().map(|(_, len)| len).sum::<u64>();
        let rest = all.saturating_sub(hot.iter().map(|(_, w)| w).sum());
        let mut spec = ps::PlacementSpec::hashed(servers.len() as u32, cluster.vnodes);
        spec.hot = ps::balance_hot_keys(spec.shards, &hot, rest);
        Some(spec)
    } else {
        None
    };
    let layout = trainer.layout().clone();
    PsExchange::connect(
        rank,
        world,
        generation,
        servers,
        secret,
        &layout,
        weight,
        cluster.collective_timeout_ms,
        trainer.position().step,
        init.map(|placement| InitArgs {
            params: trainer.params(),
            optim,
            // A resumed trainer starts the shards from its checkpoint's optimizer state.
            resume: (trainer.position().step > 0).then(|| (trainer.optimizer(), trainer.position().step)),
            consistency,
            placement,
        }),
    )
}

/// Connects every pair of workers once: rank i dials every rank below it and
/// accepts every rank above it. With `transport = auto`, pairs on the same
/// machine also set up a shared-memory link (`shm::dial`, `shm::answer`).
/// Returns one connection per peer, by rank.
fn mesh(
    rank: u32,
    world: u32,
    generation: u64,
    peers: &[String],
    listener: &TcpListener,
    secret: &Secret,
    transport: Transport,
) -> Result<Vec<Option<Connection>>, JobError> {
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
    let budget = Arc::new(crate::shm::Budget::default());
    let mut conns: Vec<Option<Connection>> = (0..world).map(|_| None).collect();
    let expect_inbound = (world - 1 - rank) as usize;
    let (tx, rx) = mpsc::channel();
    let accept_listener = listener.try_clone().map_err(|e| JobError::io("cloning listener", e))?;
    let accept_secret = secret.clone();
    let (accept_host, accept_budget) = (host.clone(), budget.clone());
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
                        let shm =
                            crate::shm::answer(&mut s, rank, generation, accept_host.as_ref(), &hello, &accept_budget)?;
                        Ok((hello, Connection { stream: s, shm }))
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
        let shm = crate::shm::dial(&mut s, rank, peer as u32, generation, host.as_ref(), &budget)?;
        conns[peer] = Some(Connection { stream: s, shm });
    }
    let deadline = Instant::now() + Duration::from_millis(RENDEZVOUS_TIMEOUT_MS);
    for _ in 0..expect_inbound {
        let left = deadline.saturating_duration_since(Instant::now());
        let (hello, c) = rx.recv_timeout(left).map_err(|_| {
            let missing: Vec<u32> = (rank + 1..world).filter(|r| conns[*r as usize].is_none()).collect();
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
            || conns[hello.rank as usize].is_some()
        {
            return Err(JobError::Peer {
                rank: hello.rank,
                why: format!("unexpected hello {hello:?}"),
            });
        }
        conns[hello.rank as usize] = Some(c);
    }
    Ok(conns)
}

pub(crate) fn spawn_heartbeats(
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
/// `who` names this process in messages ("rank 2", "server 1"); `own_rank` is
/// its worker rank, so that it does not repeat an abort that blames itself.
pub(crate) fn spawn_abort_watch(
    mut reader: ControlReader,
    who: String,
    own_rank: Option<u32>,
    shutdown: mpsc::Sender<()>,
) -> Result<(), JobError> {
    thread::Builder::new()
        .name("coordinator-watch".into())
        .spawn(move || {
            loop {
                match reader.recv::<FromCoordinator>(None) {
                    Ok(Some(FromCoordinator::Abort {
                        reason, failed_rank, ..
                    })) => {
                        if failed_rank.is_none() || failed_rank != own_rank {
                            say(&format!("error: {who} stopping: {reason}\n"));
                        }
                        std::process::exit(EXIT_ABORTED);
                    }
                    Ok(Some(FromCoordinator::Shutdown)) => {
                        let _ = shutdown.send(());
                        return;
                    }
                    Ok(Some(other)) => tracing::warn!(?other, "unexpected message from the coordinator"),
                    Ok(None) | Err(_) => {
                        say(&format!("error: {who} stopping: lost the coordinator\n"));
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
