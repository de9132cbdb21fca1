//! A worker process in a cluster: joins the coordinator, connects to its
//! peers, trains its partition with gradients all-reduced every step, sends
//! heartbeats, and stops at once when the coordinator says the job failed.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use wire::msg::{FromCoordinator, ToCoordinator};
use wire::{PeerInfo, Role, Secret};

use crate::comm::{Comm, Connection};
use crate::config::{ClusterConfig, JobConfig};
use crate::elastic::{self, Generation, Membership};
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

/// A worker's place in a running cluster: its rank, its peers and its line to the coordinator.
pub struct Member {
    pub rank: u32,
    pub world: u32,
    pub generation: u64,
    pub coord: Arc<Mutex<TcpStream>>,
    /// The step the heartbeats report.
    pub step: Arc<AtomicU64>,
    pub comm: Comm,
    /// Data addresses of the workers, by rank.
    pub peers: Vec<String>,
    /// Data addresses of the parameter-server shards, by shard (empty for all-reduce jobs).
    pub servers: Vec<String>,
    /// Fires when the coordinator says everyone has finished.
    pub shutdown: mpsc::Receiver<()>,
    /// All-reduce jobs: the acceptor, the coordinator watch and their channels.
    pub(crate) membership: Option<Membership>,
    /// Whether this worker joined a running job (it has no training state yet).
    pub joined_late: bool,
    /// Elastic jobs: why the first links could not be formed (the worker regroups first).
    pub mesh_failed: Option<JobError>,
    /// Parameter-server jobs: the coordinator's other messages (promotions of
    /// replicated shards' backups, for `PsExchange::enable_failover`).
    pub ps_notices: Option<mpsc::Receiver<FromCoordinator>>,
}

/// Joins the cluster the environment names: authenticates with the coordinator,
/// gets a rank, connects to every peer, and starts heartbeats and the coordinator watch.
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
        joined_late,
    } = rendezvous(env, secret, Role::Worker)?;
    tracing::info!(rank, world, generation, joined_late, "joined");
    let (shutdown_tx, shutdown) = mpsc::channel();
    let mut ps_notices = None;
    let mut mesh_failed = None;
    // With parameter servers, workers talk to the servers only.
    let (conns, membership) = if servers.is_empty() {
        let g = Generation {
            generation,
            rank,
            peers: peers.clone(),
        };
        let mut m = Membership::start(listener, reader, secret, &g, shutdown_tx)?;
        let conns = elastic::mesh(
            &g,
            &m.inbound,
            &mut m.early,
            secret,
            cluster.transport,
            RENDEZVOUS_TIMEOUT_MS,
            RENDEZVOUS_TIMEOUT_MS,
        );
        // An elastic job survives a peer lost while the links form: this
        // worker regroups before its first step (see `Ring::train`).
        let conns = match conns {
            Ok(c) => c,
            Err(e) if cluster.elastic && elastic::recoverable(&e) => {
                mesh_failed = Some(e);
                (0..world).map(|_| None).collect()
            }
            Err(e) => return Err(e),
        };
        (conns, Some(m))
    } else {
        let (tx, rx) = mpsc::channel();
        ps_notices = Some(rx);
        spawn_abort_watch(reader, format!("rank {rank}"), Some(rank), shutdown_tx, Some(tx))?;
        ((0..world).map(|_| None).collect(), None)
    };
    log_links(rank, &conns);
    let coord = Arc::new(Mutex::new(coord));
    let step = Arc::new(AtomicU64::new(0));
    spawn_heartbeats(coord.clone(), rank, step.clone(), cluster.heartbeat_timeout_ms)?;
    let comm = Comm::new(
        rank,
        conns,
        collective::CollectiveConfig::default(),
        cluster.collective_timeout_ms,
        cluster.tensor_crc,
    )?;
    if let Some(m) = &membership {
        m.shared.register(generation, comm.stream_handles());
    }
    Ok(Member {
        rank,
        world,
        generation,
        coord,
        step,
        shutdown,
        comm,
        peers,
        servers,
        membership,
        joined_late,
        ps_notices,
        mesh_failed,
    })
}

fn log_links(rank: u32, conns: &[Option<Connection>]) {
    for (peer, c) in conns.iter().enumerate() {
        if let Some(c) = c {
            let transport = if c.shm.is_some() { "shm" } else { "tcp" };
            tracing::info!(rank, peer, transport, "peer link");
        }
    }
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
    /// Admitted into a running (elastic) job with a new generation: as a new
    /// member of an all-reduce job, or in a lost worker's place in a
    /// parameter-server job.
    pub joined_late: bool,
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
    net::connect_handshake(&mut coord, secret, own).map_err(|e| match e {
        // Under torchrun, MASTER_ADDR:MASTER_PORT is torchrun's own store.
        JobError::NotSinter { addr, why } => JobError::Config {
            path: env.coordinator_from.into(),
            why: format!(
                "{addr} is not a Sinter coordinator ({why}); under torchrun, MASTER_PORT is torchrun's own store: start `sinter coordinator` on another port and name it with SINTER_COORDINATOR=host:port"
            ),
        },
        e => e,
    })?;
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
        Some(
            w @ (FromCoordinator::Welcome { .. } | FromCoordinator::Regroup { .. } | FromCoordinator::Replace { .. }),
        ) => w,
        Some(FromCoordinator::Abort { reason, .. }) => return Err(JobError::Coordinator(reason)),
        other => return Err(JobError::Coordinator(format!("expected a welcome, got {other:?}"))),
    };
    welcome.check().map_err(JobError::Coordinator)?;
    let (generation, rank, world, peers, servers, joined_late) = match welcome {
        FromCoordinator::Welcome {
            generation,
            rank,
            world,
            peers,
            servers,
        } => (generation, rank, world, peers, servers, false),
        FromCoordinator::Regroup {
            generation,
            rank,
            world,
            peers,
            ..
        } => (generation, rank, world, peers, Vec::new(), true),
        // A parameter-server worker has no peers among the workers.
        FromCoordinator::Replace {
            generation,
            rank,
            world,
            servers,
        } => (
            generation,
            rank,
            world,
            vec![String::new(); world as usize],
            servers,
            true,
        ),
        _ => unreachable!("matched above"),
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
        joined_late,
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
    // A first look at the data before joining (the files open, their headers
    // and labels are good, the rows are counted): a bad file fails this worker
    // before the cluster waits for it. The rows are read once the rank is known.
    let early = crate::job::load_early(&cfg)?;
    let member = join(env, secret, &cfg.cluster)?;
    let (rank, world) = (member.rank, member.world);
    if world != cfg.cluster.workers && !cfg.cluster.elastic {
        tracing::warn!(
            world,
            configured = cfg.cluster.workers,
            "cluster size differs from cluster.workers; using the coordinator's"
        );
    }
    let Member {
        coord,
        step,
        mut comm,
        shutdown,
        peers,
        servers,
        generation,
        membership,
        joined_late,
        ps_notices,
        mesh_failed,
        ..
    } = member;
    let cluster = cfg.cluster.clone();
    let optim = cfg.optim.clone();
    let read_after_join = matches!(early, crate::job::EarlyData::Surveyed { .. });
    let (mut data, data_report) = crate::job::load_for_rank(&cfg, early, rank, world)?;
    if read_after_join && servers.is_empty() {
        // The first collective waits for every rank's read (a parameter-server
        // job's shards wait for every worker instead) and gives the skew report
        // every partition's non-zeros.
        crate::job::exchange_partition_nnz(&mut comm, &mut data, cfg.train.batch_size)?;
    }
    let mut trainer = Trainer::new(cfg, data, rank, world)?;
    trainer.set_membership(generation, rank, &peers);
    let restored = match resume {
        Some(dir) => trainer.resume(dir)?.exchange,
        None => Vec::new(),
    };
    // Start, epoch and evaluation lines come from the current rank 0 only.
    let current_rank = membership
        .as_ref()
        .map_or_else(|| Arc::new(AtomicU32::new(rank)), |m| m.shared.rank.clone());
    let mut relay = |r: &crate::report::Report| {
        use crate::report::Report;
        match r {
            Report::Step(s) => step.store(s.step_in_epoch, Ordering::Relaxed),
            Report::Start { .. } | Report::Epoch(_) | Report::Eval(_) if current_rank.load(Ordering::Relaxed) != 0 => {
                return;
            }
            _ => {}
        }
        obs.report(r);
    };
    relay(&crate::report::Report::Data(data_report));
    let result = if servers.is_empty() {
        let membership = membership.expect("all-reduce workers watch their membership");
        let mut ring = Ring {
            coord: coord.clone(),
            cluster: cluster.clone(),
            secret: secret.clone(),
            membership,
            generation: Generation {
                generation,
                rank,
                peers,
            },
        };
        ring.train(&mut trainer, comm, &restored, joined_late, mesh_failed, &mut relay)
    } else {
        let mut ps = connect_servers(
            &mut trainer,
            &cluster,
            &optim,
            Seat {
                rank,
                world,
                generation,
                replacing: joined_late,
            },
            &servers,
            secret,
        )?;
        if joined_late {
            // In a lost worker's place: continue its partition where the shards have it.
            let step = ps.start_step();
            trainer.seek(step)?;
            tracing::info!(rank, step, "replacing a lost worker");
            relay(&crate::report::Report::Replaced {
                rank,
                step,
                unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            });
        }
        let compress = trainer.config().compress.clone();
        if compress.is_active() {
            let c = codec::CompressConfig {
                compress: compress.codec.clone(),
                error_feedback: compress.error_feedback,
            };
            ps.compress_pushes(c.compress.clone(), c.error_feedback(), trainer.config().train.seed);
            // The checkpoint's residuals are of its step; a lost worker's replacement starts from zero.
            if !joined_late {
                ps.load_push_residuals(&restored)?;
            }
        }
        if let Some(notices) = ps_notices.filter(|_| cluster.replicas > 1) {
            let wait_ms = crate::ps_client::failover_wait_ms(cluster.heartbeat_timeout_ms);
            ps.enable_failover(notices, secret.clone(), generation, wait_ms);
        }
        trainer.run(&mut ps, &mut relay)
    };
    let rank = trainer.rank();
    report_end(&coord, &shutdown, rank, result.as_ref().map(|s| s.steps))?;
    result
}

/// An all-reduce worker's training across membership generations.
struct Ring {
    coord: Arc<Mutex<TcpStream>>,
    cluster: ClusterConfig,
    secret: Secret,
    membership: Membership,
    generation: Generation,
}

impl Ring {
    /// Trains until the job ends. In an elastic job a lost peer or a new
    /// generation is survived: regroup, take the newest state, continue.
    fn train(
        &mut self,
        trainer: &mut Trainer,
        comm: Comm,
        restored: &[(String, Vec<f32>)],
        joined_late: bool,
        mesh_failed: Option<JobError>,
        obs: &mut dyn Observer,
    ) -> Result<Summary, JobError> {
        let mut comm = comm;
        let mut have_state = !joined_late;
        // When this worker first saw the membership change, if it is regrouping.
        let mut regrouping = joined_late.then(Instant::now);
        if let Some(e) = mesh_failed {
            regrouping = Some(Instant::now());
            comm = self.regroup(&e, trainer.position().step)?;
        }
        // Residuals restored from a checkpoint apply to the first membership only.
        let mut residuals = restored;
        loop {
            if let Some(since) = regrouping {
                match self.sync(trainer, &mut comm, have_state, since, !have_state) {
                    Ok(report) => {
                        obs.report(&crate::report::Report::Regroup(report));
                        have_state = true;
                    }
                    Err(e) if self.cluster.elastic && elastic::recoverable(&e) => {
                        comm = self.regroup(&e, trainer.position().step)?;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            if regrouping.is_some() {
                residuals = &[];
            }
            let mut ex = self.exchange(trainer, comm, residuals)?;
            let result = trainer.run(ex.as_mut(), obs);
            drop(ex);
            match result {
                Err(e) if self.cluster.elastic && elastic::recoverable(&e) => {
                    regrouping = Some(Instant::now());
                    comm = self.regroup(&e, trainer.position().step)?;
                }
                other => return other,
            }
        }
    }

    /// The exchange for this generation's links.
    fn exchange(
        &self,
        trainer: &Trainer,
        comm: Comm,
        residuals: &[(String, Vec<f32>)],
    ) -> Result<Box<dyn crate::train::Exchange>, JobError> {
        let compress = &trainer.config().compress;
        Ok(if compress.is_active() {
            Box::new(crate::compress::CompressExchange::new(
                comm,
                compress,
                trainer.layout(),
                trainer.config().train.seed,
                self.coord.clone(),
                residuals,
            )?)
        } else {
            Box::new(AllreduceExchange::new(
                comm,
                self.cluster.overlap,
                self.cluster.bucket_bytes,
                self.cluster.collective_timeout_ms,
                self.coord.clone(),
            )?)
        })
    }

    /// After `failure`: tells the coordinator, waits for the next generation and
    /// forms its links; again while the generation is replaced or its links fail.
    fn regroup(&mut self, failure: &JobError, step: u64) -> Result<Comm, JobError> {
        let deadline = elastic::after_ms(elastic::REGROUP_WAIT_MS);
        let mut failure = failure.to_string();
        loop {
            tracing::warn!(
                rank = self.generation.rank,
                generation = self.generation.generation,
                step,
                failure,
                "regrouping"
            );
            let lost = ToCoordinator::PeerLost {
                generation: self.generation.generation,
                rank: self.generation.rank,
                step,
            };
            net::send_control(
                &mut self.coord.lock().expect("coordinator stream lock"),
                self.generation.rank,
                &lost,
            )?;
            let g = elastic::next_generation(&self.membership.regroups, self.generation.generation, deadline)
                .map_err(|e| JobError::Coordinator(format!("{e} (after: {failure})")))?;
            self.generation = g;
            let m = &mut self.membership;
            let formed = elastic::mesh(
                &self.generation,
                &m.inbound,
                &mut m.early,
                &self.secret,
                self.cluster.transport,
                elastic::REGROUP_CONNECT_MS,
                elastic::REGROUP_WAIT_MS,
            )
            .and_then(|conns| {
                log_links(self.generation.rank, &conns);
                Comm::new(
                    self.generation.rank,
                    conns,
                    collective::CollectiveConfig::default(),
                    self.cluster.collective_timeout_ms,
                    self.cluster.tensor_crc,
                )
            });
            match formed {
                Ok(comm) => {
                    m.shared.register(self.generation.generation, comm.stream_handles());
                    return Ok(comm);
                }
                Err(e) if elastic::recoverable(&e) => failure = e.to_string(),
                Err(e) => return Err(e),
            }
        }
    }

    /// Agrees on the newest state, takes it, and cuts the rest of the epoch for
    /// this generation.
    fn sync(
        &self,
        trainer: &mut Trainer,
        comm: &mut Comm,
        have_state: bool,
        since: Instant,
        joined: bool,
    ) -> Result<crate::report::RegroupReport, JobError> {
        let source = elastic::sync_state(comm, trainer, have_state)?;
        let g = &self.generation;
        let moved = trainer.regroup(g.generation, g.rank, &g.peers);
        Ok(crate::report::RegroupReport {
            rank: g.rank,
            generation: g.generation,
            world: g.world(),
            source,
            step: trainer.position().step,
            joined,
            lost_rows: moved.lost_rows as u64,
            moved_rows: moved.moved_rows as u64,
            regroup_ms: since.elapsed().as_secs_f64() * 1e3,
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        })
    }
}

/// Where a worker sits in a parameter-server job.
struct Seat {
    rank: u32,
    world: u32,
    generation: u64,
    /// In a lost worker's place: the shards are running, and tell where to continue.
    replacing: bool,
}

/// Connects to the parameter servers; rank 0 first finds the hot keys in its
/// partition, places them, and starts the shards with the initial parameters
/// (unless it replaces a lost rank 0: the shards are running then).
fn connect_servers(
    trainer: &mut Trainer,
    cluster: &ClusterConfig,
    optim: &optim::OptimConfig,
    seat: Seat,
    servers: &[String],
    secret: &Secret,
) -> Result<PsExchange, JobError> {
    let Seat {
        rank,
        world,
        generation,
        replacing,
    } = seat;
    let consistency = cluster.consistency();
    // BSP sums the workers' pushes into one step of the global batch; SSP and
    // async apply each push as its own step on the worker's batch.
    let weight = if consistency == ps::Consistency::Bsp {
        trainer.weight()
    } else {
        1.0
    };
    let init = if rank == 0 && !replacing {
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
    // Elastic jobs: a wait for a shard may include a lost worker's replacement
    // (detection, a new process, its data): the coordinator's deadline for it comes first.
    let timeout_ms = if cluster.elastic {
        cluster.collective_timeout_ms + cluster.heartbeat_timeout_ms + cluster.replace_timeout_ms
    } else {
        cluster.collective_timeout_ms
    };
    PsExchange::connect(
        rank,
        world,
        generation,
        servers,
        secret,
        &layout,
        weight,
        timeout_ms,
        (!replacing).then(|| trainer.position().step),
        init.map(|placement| InitArgs {
            params: trainer.params(),
            optim,
            // A resumed trainer starts the shards from its checkpoint's optimizer state.
            resume: (trainer.position().step > 0).then(|| (trainer.optimizer(), trainer.position().step)),
            consistency,
            placement,
            elastic: cluster.elastic,
        }),
    )
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
    notices: Option<mpsc::Sender<FromCoordinator>>,
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
                        std::process::exit(crate::error::exit::ABORTED);
                    }
                    Ok(Some(FromCoordinator::Shutdown)) => {
                        let _ = shutdown.send(());
                        return;
                    }
                    Ok(Some(other)) => match &notices {
                        Some(tx) => {
                            let _ = tx.send(other);
                        }
                        None => tracing::warn!(?other, "unexpected message from the coordinator"),
                    },
                    Ok(None) | Err(_) => {
                        say(&format!("error: {who} stopping: lost the coordinator\n"));
                        std::process::exit(crate::error::exit::ABORTED);
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| JobError::io("spawning the coordinator watch", e))
}

/// Writes a whole line to stderr in one call: the processes of a local cluster
/// share one terminal, and a line written in pieces interleaves with theirs.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(line.as_bytes());
}
