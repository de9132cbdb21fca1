//! A parameter-server shard process (`sinter server`): joins the coordinator,
//! accepts every worker, takes its part of the model from worker 0, then
//! serves pulls and pushes through the `ps::Shard` engine until the
//! coordinator says the job is over.
//!
//! Threads: one per worker connection reads a request, runs it through the
//! shard (one lock around the engine) and writes the replies (one lock per
//! outgoing stream; a reply to another worker, such as a deferred pull this
//! push released, goes out from this thread too). No hand-off between
//! threads on the request path: on a 2-core machine each wake-up costs more
//! than the engine work of a typical request. Workers always drain their
//! replies (a reader thread per server), so a blocking write here cannot
//! deadlock; it is still bounded by a write timeout.
//!
//! The server needs no config file: the layout, optimizer, consistency and
//! placement come from worker 0 in [`PsInit`], so the same job file drives
//! every role.
//!
//! Elastic jobs (`PsInit::elastic`): a broken worker connection does not stop
//! the shard; the coordinator decides whether the job goes on. A lost worker's
//! replacement connects with a newer generation than its rank's connection
//! and takes it over: under the engine lock the rank's connection epoch is
//! bumped (a thread still serving the old connection stops touching the
//! engine) and `Shard::replace_worker` drops the old process's waiting pulls
//! and gives the clock the replacement continues from ([`PsReady::clock`]).
//!
//! **Invariant:** a reply reaches a worker only through the connection that
//! asked for it: a thread of a replaced connection writes nothing to its
//! rank's new stream (each writer carries the epoch of its connection).

use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ps::{Output, Placement, PlacementSpec, Request, Shard, ShardStats};
use serde::{Deserialize, Serialize};
use tensor::Layout;
use wire::msg::PeerHello;
use wire::{MessageType, PeerInfo, Role, Secret};

use crate::env::ClusterEnv;
use crate::error::JobError;
use crate::gate::{Admitted, Gate};
use crate::net;
use crate::worker::{RENDEZVOUS_TIMEOUT_MS, Welcomed, rendezvous, spawn_abort_watch, spawn_heartbeats};

/// How often the engine loop looks for the coordinator's shutdown while idle.
const IDLE_TICK_MS: u64 = 50;
/// Values per frame when a shard's initial values are sent (16 MiB).
pub const INIT_CHUNK_VALUES: usize = 4 << 20;

/// Worker 0 → each server, once, before training: everything the shard needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PsInit {
    pub layout: Layout,
    /// The optimizer config as JSON (postcard cannot carry its tagged enum).
    pub optim_json: String,
    pub consistency: ps::Consistency,
    pub placement: PlacementSpec,
    /// Tensor frames that follow with the shard's initial values (local layout order),
    /// followed, when resuming, by its optimizer state (a shard image: see `ps::Shard::image`).
    pub init_frames: u32,
    /// Resuming from a checkpoint at this step: the frames carry a whole image
    /// and every worker's clock starts here.
    pub resume_at: Option<u64>,
    /// `cluster.elastic`: lost workers are replaced rather than fatal.
    pub elastic: bool,
}

/// Server → every worker, once the shard is ready: the placement to route by,
/// and the worker's clock here (the step of its next push: 0, the step a
/// resumed job starts at, or for a lost worker's replacement the first step
/// this shard has not taken from its rank).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PsReady {
    pub shard: u32,
    pub placement: PlacementSpec,
    pub clock: u64,
}

/// What a server reports when the job ends (one JSON line on stdout).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerReport {
    pub shard: u32,
    /// Values this shard holds.
    pub values: usize,
    pub stats: ShardStats,
    /// Replicated shards: this server was the backup when the job ended.
    #[serde(default)]
    pub backup: bool,
}

/// One line on the shards of a finished job: load balance and how stale reads were.
pub fn describe_shards(reports: &[ServerReport]) -> String {
    let ratio = |f: fn(&ShardStats) -> u64| {
        let v: Vec<f64> = reports.iter().map(|r| f(&r.stats) as f64).collect();
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        if mean > 0.0 {
            v.iter().cloned().fold(0.0, f64::max) / mean
        } else {
            1.0
        }
    };
    let mut hist = vec![0u64; ps::shard::STALENESS_BUCKETS];
    for r in reports {
        for (h, c) in hist.iter_mut().zip(&r.stats.staleness) {
            *h += c;
        }
    }
    let total: u64 = hist.iter().sum();
    let median = hist
        .iter()
        .scan(0u64, |acc, c| {
            *acc += c;
            Some(*acc)
        })
        .position(|acc| acc * 2 >= total.max(1))
        .map_or(0, ps::staleness_bucket_floor);
    let max = reports.iter().map(|r| r.stats.staleness_max).max().unwrap_or(0);
    format!(
        "{} shards; load max/mean: keys {:.3}, bytes {:.3}, requests {:.3}; staleness of reads: median {}{}, max {max}",
        reports.len(),
        ratio(|s| s.keys),
        ratio(|s| s.bytes),
        ratio(|s| s.pulls + s.pushes),
        median,
        if median >= 16 { "+" } else { "" },
    )
}

/// Server-side settings that are not part of the job file.
pub struct ServerOptions {
    pub heartbeat_timeout_ms: u64,
    /// A blocked reply write fails after this long.
    pub write_timeout_ms: u64,
    /// Server processes per shard (`cluster.replicas`): 2 runs [`crate::replica`].
    pub replicas: u32,
}

/// Connections a shard accepts after the first one of every worker (replacements).
const REPLACEMENTS_MAX: usize = 4096;

/// What the connection threads share.
struct Shared {
    shard: u32,
    layout: Layout,
    /// Dense values this shard holds (a compressed push decodes to this many).
    dense_len: usize,
    /// Once a worker's frame has begun, the longest a read may wait for more of it.
    stall_ms: u64,
    engine: Mutex<Core>,
    writers: Vec<Mutex<Writer>>,
}

/// The engine, and which connection of each worker is current.
struct Core {
    shard: Shard,
    /// Per worker: the epoch of its current connection (bumped by a replacement).
    epochs: Vec<u64>,
    /// Per worker: the membership generation its current connection came with.
    generations: Vec<u64>,
}

/// A worker's outgoing stream and the epoch of the connection it belongs to.
struct Writer {
    stream: TcpStream,
    epoch: u64,
}

/// A connection thread's end: its worker, and whether it closed cleanly (`None`) or something broke.
struct Ended(u32, Option<JobError>);

/// Runs one shard until the coordinator's shutdown; returns its figures.
pub fn run(env: &ClusterEnv, secret: &Secret, opts: &ServerOptions) -> Result<ServerReport, JobError> {
    if opts.replicas > 1 {
        return crate::replica::run(env, secret, opts);
    }
    let Welcomed {
        coord,
        reader,
        listener,
        generation,
        rank: shard,
        world: workers,
        servers,
        ..
    } = rendezvous(env, secret, Role::Server)?;
    if shard as usize >= servers.len() {
        return Err(JobError::Coordinator(format!(
            "made this server shard {shard} of {}",
            servers.len()
        )));
    }
    tracing::info!(shard, workers, generation, "server joined");
    let coord = Arc::new(Mutex::new(coord));
    spawn_heartbeats(coord, shard, Arc::new(AtomicU64::new(0)), opts.heartbeat_timeout_ms)?;
    let (shutdown_tx, shutdown) = mpsc::channel();
    spawn_abort_watch(reader, format!("server {shard}"), None, shutdown_tx, None)?;

    let gate = Gate::open(listener, secret.clone(), own(shard), &format!("server-{shard}"))?;
    let mut streams = accept_workers(&gate, workers, generation, shard)?;
    let (init, engine) = take_init(&mut streams[0], shard, workers)?;
    let ready = PsReady {
        shard,
        placement: init.placement.clone(),
        clock: init.resume_at.unwrap_or(0),
    };
    for s in streams.iter_mut() {
        net::send_control(s, shard, &ready)?;
    }
    let mut writers = Vec::with_capacity(streams.len());
    for s in &streams {
        writers.push(Mutex::new(Writer {
            stream: writer_of(s, opts.write_timeout_ms)?,
            epoch: 0,
        }));
    }
    let shared = Arc::new(Shared {
        shard,
        layout: init.layout,
        dense_len: engine.layout().dense_len,
        stall_ms: opts.write_timeout_ms,
        engine: Mutex::new(Core {
            shard: engine,
            epochs: vec![0; workers as usize],
            generations: vec![generation; workers as usize],
        }),
        writers,
    });
    let (tx, ended) = mpsc::channel::<Ended>();
    for (w, s) in streams.into_iter().enumerate() {
        spawn_connection(&shared, w as u32, 0, s, &tx)?;
    }
    if init.elastic {
        spawn_replacements(gate, shared.clone(), ready, opts.write_timeout_ms, tx.clone())?;
    }
    drop(tx);
    wait_for_end(&ended, &shutdown, shard, init.elastic)?;
    let core = shared.engine.lock().map_err(|_| JobError::Server {
        server: shard,
        why: "a connection thread panicked".into(),
    })?;
    Ok(ServerReport {
        shard,
        values: core.shard.values().len(),
        stats: core.shard.stats().clone(),
        backup: false,
    })
}

/// The clone of a worker's stream that replies are written to.
fn writer_of(s: &TcpStream, write_timeout_ms: u64) -> Result<TcpStream, JobError> {
    s.set_write_timeout(Some(Duration::from_millis(write_timeout_ms)))
        .map_err(|e| JobError::io("set_write_timeout", e))?;
    s.try_clone().map_err(|e| JobError::io("cloning a worker stream", e))
}

fn spawn_connection(
    shared: &Arc<Shared>,
    worker: u32,
    epoch: u64,
    s: TcpStream,
    tx: &mpsc::Sender<Ended>,
) -> Result<(), JobError> {
    let (shared, tx) = (shared.clone(), tx.clone());
    thread::Builder::new()
        .name(format!("ps-conn-{worker}"))
        .spawn(move || {
            let r = serve_connection(&shared, worker, epoch, s);
            let _ = tx.send(Ended(worker, r.err()));
        })
        .map(|_| ())
        .map_err(|e| JobError::io("spawning a connection thread", e))
}

/// Elastic jobs: accepts lost workers' replacements for as long as the shard
/// runs. Only authenticated connections count towards [`REPLACEMENTS_MAX`].
fn spawn_replacements(
    gate: Gate,
    shared: Arc<Shared>,
    ready: PsReady,
    write_timeout_ms: u64,
    tx: mpsc::Sender<Ended>,
) -> Result<(), JobError> {
    let shard = shared.shard;
    thread::Builder::new()
        .name("ps-replacements".into())
        .spawn(move || {
            let mut taken = 0;
            while taken < REPLACEMENTS_MAX {
                let a = match gate.next(Duration::from_millis(IDLE_TICK_MS)) {
                    Ok(a) => a,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                taken += 1;
                let (from, peer) = (a.addr, a.peer);
                match take_replacement(&shared, a.stream, peer, &ready, write_timeout_ms, &tx) {
                    Ok(worker) => {
                        tracing::info!(shard, worker, peer = %from, "a replacement took over a worker's rank")
                    }
                    Err(e) => tracing::warn!(shard, peer = %from, error = %e, "refused a connection"),
                }
            }
            tracing::warn!(
                shard,
                limit = REPLACEMENTS_MAX,
                "accepted as many replacements as allowed"
            );
        })
        .map(|_| ())
        .map_err(|e| JobError::io("spawning the replacement acceptor", e))
}

/// Who a shard says it is in handshakes.
pub(crate) fn own(shard: u32) -> PeerInfo {
    PeerInfo {
        role: Role::Server,
        rank: shard,
    }
}

/// Makes an authenticated replacement worker's connection its rank's
/// current one (see the module docs for the order of the steps); returns its rank.
fn take_replacement(
    shared: &Arc<Shared>,
    mut s: TcpStream,
    peer: PeerInfo,
    ready: &PsReady,
    write_timeout_ms: u64,
    tx: &mpsc::Sender<Ended>,
) -> Result<u32, JobError> {
    let shard = shared.shard;
    let hello: PeerHello = net::recv_control_exact(&mut s, net::HANDSHAKE_TIMEOUT_MS)?;
    let poisoned = || JobError::Server {
        server: shard,
        why: "a connection thread panicked".into(),
    };
    let (epoch, clock) = {
        let mut core = shared.engine.lock().map_err(|_| poisoned())?;
        let w = hello.rank as usize;
        if peer.role != Role::Worker || w >= core.epochs.len() || hello.generation <= core.generations[w] {
            return Err(JobError::Peer {
                rank: hello.rank,
                why: format!(
                    "server {shard} got a {:?}'s hello {hello:?}: not a newer generation of a worker of this job",
                    peer.role
                ),
            });
        }
        core.generations[w] = hello.generation;
        core.epochs[w] += 1;
        let clock = core.shard.replace_worker(hello.rank)?;
        (core.epochs[w], clock)
    };
    net::tune_data_stream(&s)?;
    net::send_control(&mut s, shard, &PsReady { clock, ..ready.clone() })?;
    let stream = writer_of(&s, write_timeout_ms)?;
    {
        let mut w = shared.writers[hello.rank as usize].lock().map_err(|_| poisoned())?;
        // The old connection's reader ends on this (it may still be open: a stalled process).
        let _ = w.stream.shutdown(std::net::Shutdown::Both);
        *w = Writer { stream, epoch };
    }
    spawn_connection(shared, hello.rank, epoch, s, tx)?;
    Ok(hello.rank)
}

/// Takes one authenticated connection from every worker through `gate`;
/// returns them by worker rank. A connection that authenticates but then
/// says nothing sensible (no hello, another job's generation, a rank out of
/// range or taken) is logged and dropped: only the deadline, which names
/// the workers still missing, ends the wait.
pub(crate) fn accept_workers(
    gate: &Gate,
    workers: u32,
    generation: u64,
    shard: u32,
) -> Result<Vec<TcpStream>, JobError> {
    let deadline = Instant::now() + Duration::from_millis(RENDEZVOUS_TIMEOUT_MS);
    let mut streams: Vec<Option<TcpStream>> = (0..workers).map(|_| None).collect();
    while streams.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Admitted { mut stream, peer, addr } = match gate.next(left) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout) => {
                let missing: Vec<usize> = (0..workers as usize).filter(|w| streams[*w].is_none()).collect();
                return Err(JobError::Stalled {
                    op: format!("server {shard} waiting for workers {missing:?} to connect"),
                    step: 0,
                    rank: missing[0] as u32,
                    waited_ms: RENDEZVOUS_TIMEOUT_MS,
                });
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(JobError::Server {
                    server: shard,
                    why: "its listener failed while workers were connecting".into(),
                });
            }
        };
        let hello = match net::recv_control_exact::<PeerHello>(&mut stream, net::HANDSHAKE_TIMEOUT_MS) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(shard, peer = %peer, addr = %addr, error = %e, "dropped a connection without a hello");
                continue;
            }
        };
        let w = hello.rank as usize;
        if peer.role != Role::Worker || hello.generation != generation || w >= streams.len() || streams[w].is_some() {
            tracing::warn!(shard, peer = %peer, addr = %addr, hello = ?hello, "dropped a connection: not a missing worker of this generation");
            continue;
        }
        net::tune_data_stream(&stream)?;
        streams[w] = Some(stream);
    }
    Ok(streams.into_iter().map(|s| s.expect("all connected")).collect())
}

/// Reads worker 0's [`PsInit`] and the shard's initial values; builds the shard.
pub(crate) fn take_init(s: &mut TcpStream, shard: u32, workers: u32) -> Result<(PsInit, Shard), JobError> {
    let init: PsInit = net::recv_control_exact(s, RENDEZVOUS_TIMEOUT_MS)?;
    let optim: optim::OptimConfig = serde_json::from_str(&init.optim_json).map_err(|e| JobError::Peer {
        rank: 0,
        why: format!("sent an optimizer config server {shard} cannot read: {e}"),
    })?;
    let placement = Placement::new(init.placement.clone(), &init.layout)?;
    let n_values = ps::LocalLayout::new(&init.layout, &placement, shard).local.len();
    let mut engine = Shard::new(
        shard,
        workers,
        init.consistency,
        &optim,
        &init.layout,
        &placement,
        vec![0.0; n_values],
    )?;
    let want = if init.resume_at.is_some() {
        engine.image_len()
    } else {
        n_values
    };
    let mut values: Vec<f32> = Vec::with_capacity(want);
    s.set_read_timeout(Some(Duration::from_millis(RENDEZVOUS_TIMEOUT_MS)))
        .map_err(|e| JobError::io("set_read_timeout", e))?;
    for _ in 0..init.init_frames {
        let h = net::read_header(s).map_err(|e| JobError::io("reading initial values", e))?;
        let n = h.payload_bytes as usize / 4;
        if h.kind != MessageType::Tensor || values.len() + n > want {
            return Err(JobError::Peer {
                rank: 0,
                why: format!("sent more initial values than shard {shard} holds ({want})"),
            });
        }
        let at = values.len();
        values.resize(at + n, 0.0);
        let bytes = net::as_bytes_mut(&mut values[at..]);
        s.read_exact(bytes)
            .map_err(|e| JobError::io("reading initial values", e))?;
        h.check_payload(bytes)?;
    }
    s.set_read_timeout(None)
        .map_err(|e| JobError::io("set_read_timeout", e))?;
    if values.len() != want {
        return Err(JobError::Peer {
            rank: 0,
            why: format!("sent {} initial values; shard {shard} holds {want}", values.len()),
        });
    }
    match init.resume_at {
        Some(step) => engine.restore(&values, step)?,
        None => engine.restore_values(&values)?,
    }
    Ok((init, engine))
}

/// Serves one worker's requests until it closes the connection, or until a
/// replacement of the worker takes over (its connection `epoch` is no longer current).
fn serve_connection(shared: &Shared, worker: u32, epoch: u64, mut s: TcpStream) -> Result<(), JobError> {
    let shard = shared.shard;
    let broke = |why: String| JobError::Peer {
        rank: worker,
        why: format!("connection to server {shard} broke: {why}"),
    };
    let mut payload = Vec::new();
    let mut out = Vec::new();
    net::set_stall_timeout(&s, shared.stall_ms)?;
    loop {
        if net::read_ps_frame(&mut s, &mut payload, shared.stall_ms)
            .map_err(broke)?
            .is_none()
        {
            return Ok(());
        }
        let msg = ps::msg::decode(&payload, Some(&shared.layout)).map_err(|e| JobError::Peer {
            rank: worker,
            why: format!("sent server {shard} {e}"),
        })?;
        // Decoded (a compressed dense gradient too) before the shard's lock,
        // so that the workers' decodes run in parallel.
        let request = msg.into_request(shared.dense_len).map_err(|e| JobError::Peer {
            rank: worker,
            why: format!("sent server {shard} {e}"),
        })?;
        let outputs = {
            let mut core = shared
                .engine
                .lock()
                .map_err(|_| broke("another connection thread panicked".into()))?;
            if core.epochs[worker as usize] != epoch {
                // Replaced: what the old process still sent is not applied.
                return Ok(());
            }
            let engine = &mut core.shard;
            match request {
                Request::Pull(p) => engine.on_pull(worker, p),
                Request::Push(p) => engine.on_push(worker, p),
                // Error-feedback residuals for a checkpoint (`ps_client::PsExchange::checkpoint_residuals`).
                Request::WorkerState { clock, state } => engine.on_worker_state(worker, clock, state),
            }
        }
        .map_err(|e| JobError::Peer {
            rank: worker,
            why: format!("server {shard}: {e}"),
        })?;
        for o in outputs {
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
            let mut w = shared.writers[to as usize]
                .lock()
                .map_err(|_| broke("a writer lock is poisoned".into()))?;
            if to == worker && w.epoch != epoch {
                // Replaced since this reply was made: it is not the new process's.
                continue;
            }
            write_frame(&mut w.stream, shard, &out).map_err(|e| JobError::Peer {
                rank: to,
                why: format!("server {shard} could not reply: {e}"),
            })?;
        }
    }
}

/// Waits for the coordinator's shutdown; a connection that broke first fails
/// the server, unless the job is `elastic` (the coordinator decides then).
fn wait_for_end(ended: &Receiver<Ended>, shutdown: &Receiver<()>, shard: u32, elastic: bool) -> Result<(), JobError> {
    let mut open = true;
    loop {
        if shutdown.try_recv().is_ok() {
            return Ok(());
        }
        if !open {
            // Every worker has closed its connection: the coordinator's word is due.
            return shutdown
                .recv_timeout(Duration::from_millis(RENDEZVOUS_TIMEOUT_MS))
                .map_err(|_| JobError::Coordinator(format!("server {shard}: every worker left but no shutdown came")));
        }
        match ended.recv_timeout(Duration::from_millis(IDLE_TICK_MS)) {
            Ok(Ended(_, None)) | Err(RecvTimeoutError::Timeout) => {}
            Ok(Ended(worker, Some(e))) if elastic => {
                tracing::warn!(shard, worker, error = %e, "lost a worker's connection; waiting for its replacement");
            }
            Ok(Ended(_, Some(e))) => return Err(e),
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
    }
}

/// Writes one `Ps` frame: header, then payload.
pub fn write_frame(s: &mut TcpStream, sender: u32, payload: &[u8]) -> Result<(), std::io::Error> {
    crate::net::write_frame(s, MessageType::Ps, 0, sender, payload)
}
