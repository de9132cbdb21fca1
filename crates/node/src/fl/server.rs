//! `sinter fl server`: the `fl::Rounds` engine behind real connections.
//!
//! Threads: the gate admits authenticated connections; one reader thread per
//! connection reads the client's hello and its updates and hands them to the
//! main thread as events; one writer thread per connection sends what the
//! main thread queues for it (models, refusals, the end), so a client that
//! stops reading never blocks the others; the main thread owns the engine,
//! its clock, and the evaluation.
//!
//! A client keeps its [`fl::ClientId`] across reconnections by its name; a
//! second connection under a name that is connected replaces the first.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use fl::msg::{ToClient, ToServer, TrainSpec};
use fl::{ClientId, Command, Event, Rounds, Update};
use tensor::Rng;
use wire::{MessageType, PeerInfo, Role, Secret};

use super::{FlSummary, RoundLine};
use crate::config::JobConfig;
use crate::error::JobError;
use crate::gate::Gate;
use crate::net;

/// What a server needs besides its config.
pub struct ServerOptions {
    pub listen: String,
    pub secret: Secret,
    /// Continue the federation from the newest good checkpoint in this directory.
    pub resume: Option<std::path::PathBuf>,
}

/// A client's hello must arrive this soon after its handshake.
const HELLO_TIMEOUT_MS: u64 = 5_000;
/// Once a frame has begun, each of these brings more of it, or the connection is dropped.
const STALL_MS: u64 = 10_000;
/// A write to a client that takes longer than this drops the client.
const WRITE_TIMEOUT_MS: u64 = 30_000;
/// Messages queued for one client; a client this far behind is dropped.
const QUEUE_MAX: usize = 8;
/// The main loop wakes at least this often without events.
const IDLE_WAKE_MS: u64 = 1_000;
/// After the last round, how long the writers get to deliver `Done`.
const FLUSH_MS: u64 = 5_000;
/// Clients connected at once (each holds a reader and a writer thread); more are refused.
pub const CONNECTIONS_MAX: usize = 4_096;
/// Events the readers may queue for the main thread; a full queue makes them
/// wait (a client that floods updates stalls only its own connection).
const EVENTS_MAX: usize = 256;

/// What the server reports as it runs, for the binary to print.
#[derive(Debug)]
pub enum ServerEvent<'a> {
    Listening {
        addr: String,
    },
    Joined {
        client: ClientId,
        name: &'a str,
        samples: u64,
    },
    Left {
        client: ClientId,
        why: &'a str,
    },
    RoundStart {
        round: u32,
        sampled: Vec<ClientId>,
    },
    Refused {
        client: ClientId,
        round: u32,
        why: String,
    },
    Round(&'a RoundLine),
}

enum Ev {
    Hello {
        conn: u64,
        name: String,
        samples: u64,
        writer: TcpStream,
    },
    Update {
        conn: u64,
        update: Update,
        bytes: u64,
    },
    Closed {
        conn: u64,
        why: String,
    },
}

enum Out {
    Control(ToClient),
    Model { round: u32, model: Arc<Vec<f32>> },
}

struct Conn {
    client: ClientId,
    tx: SyncSender<Out>,
    stream: TcpStream,
}

/// Runs a federation to its end; `on_event` sees what happens as it happens.
pub fn run(
    cfg: &JobConfig,
    opts: &ServerOptions,
    on_event: &mut dyn FnMut(ServerEvent<'_>),
) -> Result<FlSummary, JobError> {
    let started = Instant::now();
    let flc = super::section(cfg, std::path::Path::new("<config>"))?;
    let test = super::read_server_test(cfg)?;
    let dim = usize::try_from(test.dim()).map_err(|_| JobError::Config {
        path: cfg.data.train.clone(),
        why: format!("feature dimension {} does not fit in memory", test.dim()),
    })?;
    let classes = test.num_classes as usize;
    let mut evaluator = fl::LocalTrainer::new(model::build(&cfg.model, dim, classes)?, &test);
    let model_len = evaluator.model().layout().len();
    let mut global = vec![0.0f32; model_len];
    evaluator
        .model()
        .init(&mut global, &mut Rng::derive(cfg.train.seed, 0x1417));
    let spec = TrainSpec::new(
        &super::local_spec(cfg, &flc),
        cfg.train.seed,
        &flc.codec,
        flc.error_feedback,
    );

    let listener = net::listen(&opts.listen)?;
    let addr = listener
        .local_addr()
        .map_err(|e| JobError::io("reading the listening address", e))?;
    let own = PeerInfo {
        role: Role::FlServer,
        rank: 0,
    };
    let gate = Gate::open(listener, opts.secret.clone(), own, "fl-server")?;
    on_event(ServerEvent::Listening { addr: addr.to_string() });

    let (ev_tx, ev_rx) = mpsc::sync_channel::<Ev>(EVENTS_MAX);
    let stop = Arc::new(AtomicBool::new(false));
    let bytes_down = Arc::new(AtomicU64::new(0));
    let acceptor = spawn_acceptor(gate, ev_tx, stop.clone(), model_len)?;

    let layout = evaluator.model().layout().clone();
    let mut engine = match &opts.resume {
        Some(dir) => {
            let state = super::load_state(dir, &layout)?;
            tracing::info!(rounds_done = state.rounds_done, dir = %dir.display(), "resuming the federation");
            Rounds::resume(flc.clone(), cfg.train.seed, state)
                .map_err(|why| JobError::Resume { path: dir.clone(), why })?
        }
        None => Rounds::new(flc.clone(), cfg.train.seed, global),
    };
    let clock = Instant::now();
    let now_ms = || clock.elapsed().as_millis() as u64;
    let mut state = State {
        names: HashMap::new(),
        current: HashMap::new(),
        conns: HashMap::new(),
        writers: Vec::new(),
        snapshot: None,
        bytes_down: bytes_down.clone(),
        spec,
        model_len,
        done: false,
    };
    let mut summary = FlSummary {
        setup_s: started.elapsed().as_secs_f64(),
        ..FlSummary::default()
    };
    let mut bytes_up = 0u64;
    let (mut down_at_open, mut round_started) = (0u64, Instant::now());
    // The last round whose start was reported.
    let mut announced = None;
    let mut pending = engine.start(now_ms());
    let result = loop {
        // Carry out what the engine asked for.
        let mut opened = Vec::new();
        let mut outcome = None;
        for c in pending.drain(..) {
            match c {
                Command::Train { client, round } => {
                    if announced != Some(round) {
                        announced = Some(round);
                        round_started = Instant::now();
                        down_at_open = bytes_down.load(Ordering::Relaxed);
                        opened.push(client);
                    } else if !opened.is_empty() {
                        opened.push(client);
                    }
                    state.send_model(client, round, engine.global());
                }
                Command::Refused { client, round, reason } => {
                    let why = reason.to_string();
                    state.send(
                        client,
                        Out::Control(ToClient::Refused {
                            round,
                            why: why.clone(),
                        }),
                    );
                    on_event(ServerEvent::Refused { client, round, why });
                }
                Command::Closed(report) => {
                    let eval_started = Instant::now();
                    let last = report.round == flc.rounds;
                    let metrics = super::evaluated(&flc, report.round)
                        .then(|| super::evaluate_one(&mut evaluator, engine.global(), &test, classes));
                    let line = RoundLine {
                        wall_s: started.elapsed().as_secs_f64(),
                        round_s: round_started.elapsed().as_secs_f64(),
                        // The round's time open: the clients' training and the network.
                        train_s: (report.closed_ms - report.opened_ms) as f64 / 1e3,
                        eval_s: eval_started.elapsed().as_secs_f64(),
                        bytes_up: std::mem::take(&mut bytes_up),
                        bytes_down: bytes_down.load(Ordering::Relaxed) - down_at_open,
                        ..RoundLine::from_report(&report, metrics)
                    };
                    summary.add(&line);
                    on_event(ServerEvent::Round(&line));
                    let every = cfg.checkpoint.every_epochs.max(1);
                    if let Some(dir) = &cfg.checkpoint.dir
                        && (last || report.round % every == 0)
                    {
                        match super::save_state(dir, cfg.checkpoint.keep_last, cfg, &layout, &engine.state()) {
                            Ok(path) => {
                                tracing::info!(round = report.round, path = %path.display(), "saved the federation")
                            }
                            // A checkpoint that cannot be written ends the federation, as it ends a training job.
                            Err(e) => outcome = Some(Err(e)),
                        }
                    }
                }
                Command::Starved {
                    round,
                    connected,
                    needed,
                } => {
                    outcome = Some(Err(JobError::Federation(format!(
                        "round {round} could not start within fl.round_timeout_ms = {} ms: {connected} clients connected, fl.min_clients is {needed}",
                        flc.round_timeout_ms
                    ))));
                }
                Command::Done => outcome = Some(Ok(())),
            }
        }
        if let (false, Some(round)) = (opened.is_empty(), announced) {
            on_event(ServerEvent::RoundStart { round, sampled: opened });
        }
        if let Some(outcome) = outcome {
            break outcome;
        }
        // Wait for the next event, or the engine's deadline.
        let now = now_ms();
        let wait_ms = engine
            .next_deadline_ms()
            .map_or(IDLE_WAKE_MS, |d| d.saturating_sub(now).min(IDLE_WAKE_MS));
        let events = match ev_rx.recv_timeout(Duration::from_millis(wait_ms.max(1))) {
            Ok(ev) => state.on_event(ev, &mut bytes_up, on_event),
            Err(RecvTimeoutError::Timeout) => vec![Event::Tick { now_ms: 0 }],
            Err(RecvTimeoutError::Disconnected) => {
                break Err(JobError::Federation("the server's listener stopped".into()));
            }
        };
        for event in events {
            pending.extend(engine.handle(with_time(event, now_ms())));
        }
    };
    state.done = true;
    stop.store(true, Ordering::SeqCst);
    for conn in state.conns.values() {
        let _ = conn.tx.try_send(Out::Control(ToClient::Done {
            rounds: engine.rounds_done(),
        }));
    }
    state.finish();
    let _ = acceptor.join();
    result?;
    summary.clients = state.names.len();
    summary.wall_s = started.elapsed().as_secs_f64();
    summary.peak_rss_mb = super::peak_rss_mb();
    Ok(summary)
}

/// A client's id: the 64-bit FNV-1a hash of its name, a fixed function, so
/// the same names give the same ids (and the same samples) in every run.
fn client_id(name: &str) -> ClientId {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn with_time(event: Event, now_ms: u64) -> Event {
    match event {
        Event::Joined { client, .. } => Event::Joined { client, now_ms },
        Event::Left { client, .. } => Event::Left { client, now_ms },
        Event::Update { update, .. } => Event::Update { update, now_ms },
        Event::Tick { .. } => Event::Tick { now_ms },
    }
}

struct State {
    /// Every name seen, with the id it keeps.
    names: HashMap<String, ClientId>,
    /// The live connection of each connected client.
    current: HashMap<ClientId, u64>,
    conns: HashMap<u64, Conn>,
    writers: Vec<std::thread::JoinHandle<()>>,
    /// The open round's model, shared by every writer that sends it.
    snapshot: Option<(u32, Arc<Vec<f32>>)>,
    bytes_down: Arc<AtomicU64>,
    spec: TrainSpec,
    model_len: usize,
    done: bool,
}

impl State {
    fn send_model(&mut self, client: ClientId, round: u32, global: &[f32]) {
        let model = match &self.snapshot {
            Some((r, m)) if *r == round => m.clone(),
            _ => {
                let m = Arc::new(global.to_vec());
                self.snapshot = Some((round, m.clone()));
                m
            }
        };
        self.send(client, Out::Control(ToClient::Train { round }));
        self.send(client, Out::Model { round, model });
    }

    /// Queues `out` for `client`; a client whose queue is full is dropped (its reader reports it).
    fn send(&mut self, client: ClientId, out: Out) {
        let Some(conn) = self.current.get(&client).and_then(|c| self.conns.get(c)) else {
            return;
        };
        if let Err(TrySendError::Full(_)) = conn.tx.try_send(out) {
            tracing::warn!(
                client,
                "a client fell {QUEUE_MAX} messages behind; dropping its connection"
            );
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
    }

    /// Turns a connection's event into the engine's, if it is one.
    fn on_event(&mut self, ev: Ev, bytes_up: &mut u64, on_event: &mut dyn FnMut(ServerEvent<'_>)) -> Vec<Event> {
        match ev {
            Ev::Hello {
                conn,
                name,
                samples,
                writer,
            } => {
                let (tx, rx) = mpsc::sync_channel(QUEUE_MAX);
                let Ok(stream) = writer.try_clone() else {
                    let _ = writer.shutdown(Shutdown::Both);
                    return Vec::new();
                };
                let refusal = match fl::msg::check_name(&name) {
                    Err(why) => Some(why),
                    Ok(()) if self.done => Some("the federation is over".into()),
                    Ok(()) if self.conns.len() >= CONNECTIONS_MAX => {
                        Some(format!("the server holds its maximum of {CONNECTIONS_MAX} clients"))
                    }
                    Ok(()) => None,
                };
                if let Some(why) = refusal {
                    let _ = tx.try_send(Out::Control(ToClient::Rejected { why }));
                    self.spawn_writer(writer, rx);
                    return Vec::new();
                }
                // A client's id is its name's, so a restarted server numbers (and samples) them alike.
                let client = client_id(&name);
                if let Some((other, _)) = self.names.iter().find(|(n, id)| **id == client && **n != name) {
                    let why = format!("its name's id collides with client {other:?}'s; choose another name");
                    let _ = tx.try_send(Out::Control(ToClient::Rejected { why }));
                    self.spawn_writer(writer, rx);
                    return Vec::new();
                }
                self.names.insert(name.clone(), client);
                let mut events = Vec::new();
                if let Some(old) = self.current.insert(client, conn)
                    && let Some(c) = self.conns.remove(&old)
                {
                    // The new connection replaces the old: the engine sees the client leave and rejoin.
                    let _ = c.stream.shutdown(Shutdown::Both);
                    events.push(Event::Left { client, now_ms: 0 });
                }
                let _ = tx.try_send(Out::Control(ToClient::Welcome {
                    client,
                    model_len: self.model_len as u64,
                    spec: self.spec.clone(),
                }));
                self.spawn_writer(writer, rx);
                self.conns.insert(conn, Conn { client, tx, stream });
                on_event(ServerEvent::Joined {
                    client,
                    name: &name,
                    samples,
                });
                events.push(Event::Joined { client, now_ms: 0 });
                events
            }
            Ev::Update {
                conn,
                mut update,
                bytes,
            } => {
                // The reader does not know who the connection is; the hello told the main thread.
                let Some(c) = self.conns.get(&conn) else {
                    return Vec::new();
                };
                update.client = c.client;
                *bytes_up += bytes;
                vec![Event::Update { update, now_ms: 0 }]
            }
            Ev::Closed { conn, why } => {
                let Some(c) = self.conns.remove(&conn) else {
                    return Vec::new();
                };
                if self.current.get(&c.client) != Some(&conn) {
                    return Vec::new();
                }
                self.current.remove(&c.client);
                on_event(ServerEvent::Left {
                    client: c.client,
                    why: &why,
                });
                vec![Event::Left {
                    client: c.client,
                    now_ms: 0,
                }]
            }
        }
    }
}

impl State {
    fn spawn_writer(&mut self, stream: TcpStream, rx: Receiver<Out>) {
        let bytes = self.bytes_down.clone();
        let spawned = std::thread::Builder::new()
            .name("fl-writer".into())
            .spawn(move || write_loop(stream, rx, &bytes));
        match spawned {
            Ok(h) => self.writers.push(h),
            Err(e) => tracing::warn!(error = %e, "could not start a client's writer thread; the client will time out"),
        }
    }

    /// Ends every connection once its writer has sent what was queued (bounded by [`FLUSH_MS`]).
    fn finish(&mut self) {
        let conns: Vec<Conn> = self.conns.drain().map(|(_, c)| c).collect();
        let streams: Vec<TcpStream> = conns.iter().filter_map(|c| c.stream.try_clone().ok()).collect();
        drop(conns);
        let deadline = Instant::now() + Duration::from_millis(FLUSH_MS);
        for h in self.writers.drain(..) {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        for s in streams {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Sends a client what the main thread queues for it, until the queue closes.
fn write_loop(mut stream: TcpStream, rx: Receiver<Out>, bytes: &AtomicU64) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS)));
    for out in rx {
        let sent = match &out {
            Out::Control(msg) => wire::encode_control(0, msg)
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|b| stream.write_all(&b).map(|()| b.len())),
            Out::Model { round, model } => {
                net::write_tensor(&mut stream, *round as u64, 0, model).map(|()| wire::HEADER_BYTES + 4 * model.len())
            }
        };
        match sent {
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!(error = %e, "writing to a client failed; closing it");
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
        }
        if matches!(out, Out::Control(ToClient::Done { .. } | ToClient::Rejected { .. })) {
            let _ = stream.shutdown(Shutdown::Write);
            return;
        }
    }
}

/// Takes admitted connections and starts a reader for each, until `stop`.
fn spawn_acceptor(
    gate: Gate,
    ev_tx: SyncSender<Ev>,
    stop: Arc<AtomicBool>,
    model_len: usize,
) -> Result<std::thread::JoinHandle<()>, JobError> {
    std::thread::Builder::new()
        .name("fl-acceptor".into())
        .spawn(move || {
            let mut next_conn = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let Ok(admitted) = gate.next(Duration::from_millis(100)) else {
                    continue;
                };
                if admitted.peer.role != Role::FlClient {
                    tracing::warn!(peer = %admitted.peer, addr = %admitted.addr, "not a federation client; closed");
                    continue;
                }
                next_conn += 1;
                let (conn, tx) = (next_conn, ev_tx.clone());
                let spawned = std::thread::Builder::new()
                    .name("fl-reader".into())
                    .spawn(move || read_loop(conn, admitted.stream, &tx, model_len));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "could not start a client's reader thread; closed it");
                }
            }
        })
        .map_err(|e| JobError::io("spawning the federation's acceptor thread", e))
}

/// Reads one client's hello, then its updates, and reports them; the end of
/// the connection, or anything malformed, is its `Closed`.
fn read_loop(conn: u64, mut stream: TcpStream, tx: &SyncSender<Ev>, model_len: usize) {
    let why = match read_client(conn, &mut stream, tx, model_len) {
        Ok(()) => "closed the connection".to_string(),
        Err(why) => why,
    };
    let _ = stream.shutdown(Shutdown::Both);
    let _ = tx.send(Ev::Closed { conn, why });
}

fn read_client(conn: u64, stream: &mut TcpStream, tx: &SyncSender<Ev>, model_len: usize) -> Result<(), String> {
    let hello: ToServer = net::recv_control_exact(stream, HELLO_TIMEOUT_MS).map_err(|e| e.to_string())?;
    let ToServer::Hello { name, samples } = hello else {
        return Err("its first message was not a hello".into());
    };
    let writer = stream.try_clone().map_err(|e| e.to_string())?;
    tx.send(Ev::Hello {
        conn,
        name,
        samples,
        writer,
    })
    .map_err(|_| "the server is stopping".to_string())?;
    net::set_stall_timeout(stream, STALL_MS).map_err(|e| e.to_string())?;
    let mut payload = Vec::new();
    loop {
        let Some(h) = net::read_frame(stream, &mut payload, STALL_MS)? else {
            return Ok(());
        };
        let msg: ToServer = match h.kind {
            MessageType::Control => wire::decode_control(&h, &payload).map_err(|e| e.to_string())?,
            kind => return Err(format!("expected an update message, got a {kind} frame")),
        };
        let ToServer::Update {
            round,
            samples,
            train_loss,
        } = msg
        else {
            return Err("a second hello".into());
        };
        let mut bytes = (wire::HEADER_BYTES + payload.len()) as u64;
        let Some(t) = net::read_frame(stream, &mut payload, STALL_MS)? else {
            return Err("the connection closed between an update and its values".into());
        };
        if t.tag != round as u64 {
            return Err(format!(
                "the values of the update for round {round} came with tag {}",
                t.tag
            ));
        }
        bytes += (wire::HEADER_BYTES + payload.len()) as u64;
        let delta = match t.kind {
            MessageType::Tensor if payload.len() == 4 * model_len => payload
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            // A compressed update: the codec's message, whose decoder never panics.
            MessageType::Ps => fl::decode_update(&payload, model_len)
                .map_err(|e| format!("the compressed update for round {round} does not decode: {e}"))?,
            kind => {
                return Err(format!(
                    "the values of the update for round {round} came as a {kind} frame of {} bytes; expected {} bytes of f32 or a codec's message",
                    payload.len(),
                    4 * model_len
                ));
            }
        };
        let update = Update {
            client: 0,
            round,
            samples,
            train_loss,
            delta,
        };
        tx.send(Ev::Update { conn, update, bytes })
            .map_err(|_| "the server is stopping".to_string())?;
    }
}
