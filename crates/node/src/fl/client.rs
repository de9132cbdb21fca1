//! `sinter fl client`: a site or device that trains on its own rows when the
//! server asks, and sends back only its update.
//!
//! The client reconnects when its connection is lost, with a backoff from
//! 100 ms doubling to 2 s, under the same name, so that it keeps its place in
//! an open round; it gives up, with an error naming the server, when it could
//! not reach it for `connect_timeout_ms`.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use fl::msg::{ToClient, ToServer};
use fl::{ClientId, LocalTrainer};
use tensor::Rng;
use wire::{MessageType, PeerInfo, Role, Secret};

use crate::config::JobConfig;
use crate::error::JobError;
use crate::net;

/// What a client needs besides its config.
pub struct ClientOptions {
    /// The server's `HOST:PORT`.
    pub server: String,
    /// Who the client is, the same across reconnections.
    pub name: String,
    pub secret: Secret,
    /// Give up when the server could not be reached for this long.
    pub connect_timeout_ms: u64,
    /// A connection that brings nothing for this long is taken as lost.
    pub idle_timeout_ms: u64,
    /// Train on part `i` of `n` of `data.train`, split by `fl.partition` (a
    /// federation on one machine); `None`: on every row of it.
    pub part: Option<(usize, usize)>,
}

/// What a client did.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ClientSummary {
    pub name: String,
    pub samples: usize,
    /// Rounds this client trained for.
    pub trained: u32,
    /// Rounds the federation ran.
    pub rounds: u32,
    pub reconnects: u32,
    pub train_s: f64,
    pub peak_rss_mb: f64,
}

/// What a client reports as it runs.
#[derive(Debug)]
pub enum ClientEvent<'a> {
    Connected { client: ClientId },
    Trained { round: u32, loss: f32, train_s: f64 },
    Refused { round: u32, why: &'a str },
    Lost { why: &'a str },
}

impl ClientEvent<'_> {
    /// The event as its `--json` line.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ClientEvent::Connected { client } => serde_json::json!({"event": "connected", "client": client}),
            ClientEvent::Trained { round, loss, train_s } => {
                serde_json::json!({"event": "trained", "round": round, "train_loss": loss, "train_s": train_s})
            }
            ClientEvent::Refused { round, why } => serde_json::json!({"event": "refused", "round": round, "why": why}),
            ClientEvent::Lost { why } => serde_json::json!({"event": "lost", "why": why}),
        }
    }
}

const BACKOFF_FIRST_MS: u64 = 100;
const BACKOFF_MAX_MS: u64 = 2_000;
const WELCOME_TIMEOUT_MS: u64 = 10_000;
/// Once a frame has begun, each of these brings more of it.
const STALL_MS: u64 = 10_000;

enum SessionEnd {
    Done(u32),
    Lost(String),
}

/// Runs a client until the federation ends.
pub fn run(
    cfg: &JobConfig,
    opts: &ClientOptions,
    on_event: &mut dyn FnMut(ClientEvent<'_>),
) -> Result<ClientSummary, JobError> {
    fl::msg::check_name(&opts.name).map_err(|why| JobError::Config {
        path: "--name".into(),
        why,
    })?;
    let flc = cfg.fl.clone().unwrap_or_default();
    let train = data::read_auto(&cfg.data.train, &crate::job::read_options(cfg, data::Split::Train))?;
    let rows: Vec<usize> = match opts.part {
        Some((i, n)) => {
            let mut parts = super::split_clients(cfg, &flc, &train, n)?;
            if i >= parts.len() {
                return Err(JobError::Config {
                    path: "--part".into(),
                    why: format!("part {i} of {n} does not exist"),
                });
            }
            parts.swap_remove(i)
        }
        None => (0..train.rows()).collect(),
    };
    let dim = usize::try_from(train.dim()).map_err(|_| JobError::Config {
        path: cfg.data.train.clone(),
        why: format!("feature dimension {} does not fit in memory", train.dim()),
    })?;
    let mut trainer = LocalTrainer::new(model::build(&cfg.model, dim, train.num_classes as usize)?, &train);
    let mut summary = ClientSummary {
        name: opts.name.clone(),
        samples: rows.len(),
        ..ClientSummary::default()
    };
    let mut client = Session {
        opts,
        trainer: &mut trainer,
        train: &train,
        rows: &rows,
        summary: &mut summary,
        encoder: None,
    };
    // Sessions that end before training a round back off like failed connections,
    // and give up at the same deadline.
    let mut failing_since: Option<Instant> = None;
    let mut backoff = BACKOFF_FIRST_MS;
    loop {
        let stream = connect(opts)?;
        let trained_before = client.summary.trained;
        match client.serve(stream, on_event)? {
            SessionEnd::Done(rounds) => {
                client.summary.rounds = rounds;
                break;
            }
            SessionEnd::Lost(why) => {
                on_event(ClientEvent::Lost { why: &why });
                client.summary.reconnects += 1;
                if client.summary.trained > trained_before {
                    (failing_since, backoff) = (None, BACKOFF_FIRST_MS);
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed().as_millis() as u64 + backoff >= opts.connect_timeout_ms {
                    return Err(JobError::Federation(format!(
                        "the connection to the federation server at {} kept failing for {} ms (--connect-timeout-ms); the last: {why}",
                        opts.server, opts.connect_timeout_ms
                    )));
                }
                // A backoff between attempts, not a synchronisation: nothing else is waited for.
                std::thread::sleep(Duration::from_millis(backoff));
                backoff = (backoff * 2).min(BACKOFF_MAX_MS);
            }
        }
    }
    summary.peak_rss_mb = super::peak_rss_mb();
    Ok(summary)
}

/// Connects and authenticates, retrying with backoff until `connect_timeout_ms`.
fn connect(opts: &ClientOptions) -> Result<TcpStream, JobError> {
    let started = Instant::now();
    let mut backoff = BACKOFF_FIRST_MS;
    let own = PeerInfo {
        role: Role::FlClient,
        rank: 0,
    };
    loop {
        let left = opts
            .connect_timeout_ms
            .saturating_sub(started.elapsed().as_millis() as u64);
        let attempt = net::connect(&opts.server, left.clamp(1, 5_000)).and_then(|mut s| {
            let peer = net::connect_handshake(&mut s, &opts.secret, own)?;
            if peer.role != Role::FlServer {
                return Err(JobError::NotSinter {
                    addr: opts.server.clone(),
                    why: format!("it is a Sinter {peer}, not a federation's server"),
                });
            }
            Ok(s)
        });
        match attempt {
            Ok(s) => return Ok(s),
            Err(e @ JobError::NotSinter { .. }) => return Err(e),
            Err(e) if started.elapsed().as_millis() as u64 + backoff >= opts.connect_timeout_ms => {
                return Err(JobError::Federation(format!(
                    "no federation server answered at {} for {} ms (--connect-timeout-ms); the last attempt: {e}",
                    opts.server, opts.connect_timeout_ms
                )));
            }
            Err(e) => {
                tracing::info!(server = %opts.server, error = %e, retry_in_ms = backoff, "federation server not reachable; retrying");
                // A backoff between attempts, not a synchronisation: nothing else is waited for.
                std::thread::sleep(Duration::from_millis(backoff));
                backoff = (backoff * 2).min(BACKOFF_MAX_MS);
            }
        }
    }
}

struct Session<'a> {
    opts: &'a ClientOptions,
    trainer: &'a mut LocalTrainer,
    train: &'a data::Dataset,
    rows: &'a [usize],
    summary: &'a mut ClientSummary,
    /// The update encoder, with its error-feedback residual, kept across
    /// reconnections while the server asks for the same codec.
    encoder: Option<(String, fl::UpdateEncoder)>,
}

impl Session<'_> {
    /// One connection: hello, welcome, then rounds until the end or the connection is lost.
    fn serve(&mut self, mut s: TcpStream, on_event: &mut dyn FnMut(ClientEvent<'_>)) -> Result<SessionEnd, JobError> {
        let lost = |why: String| Ok(SessionEnd::Lost(why));
        let hello = ToServer::Hello {
            name: self.opts.name.clone(),
            samples: self.rows.len() as u64,
        };
        if let Err(e) = net::send_control(&mut s, 0, &hello) {
            return lost(e.to_string());
        }
        let welcome: ToClient = match net::recv_control_exact(&mut s, WELCOME_TIMEOUT_MS) {
            Ok(w) => w,
            Err(e) => return lost(format!("no welcome: {e}")),
        };
        let (client, spec) = match welcome {
            ToClient::Welcome {
                client,
                model_len,
                spec,
            } => {
                let ours = self.trainer.model().layout().len() as u64;
                if model_len != ours {
                    return Err(JobError::Config {
                        path: "[model]".into(),
                        why: format!(
                            "the server's model has {model_len} values, this client's [model] and data make {ours}; they must match"
                        ),
                    });
                }
                (client, spec)
            }
            ToClient::Rejected { why } => {
                return Err(JobError::Federation(format!(
                    "the server at {} refused this client: {why}",
                    self.opts.server
                )));
            }
            other => return lost(format!("expected a welcome, got {other:?}")),
        };
        on_event(ClientEvent::Connected { client });
        let local = spec.local().map_err(JobError::Federation)?;
        let model_len = self.trainer.model().layout().len();
        // The residual carries over a reconnection; a server that asks for another codec starts it afresh.
        if self.encoder.as_ref().is_none_or(|(codec, _)| *codec != spec.codec) {
            let e = spec.encoder(model_len).map_err(JobError::Federation)?;
            self.encoder = Some((spec.codec.clone(), e));
        }
        let mut coded = Vec::new();
        if let Err(e) = s.set_read_timeout(Some(Duration::from_millis(self.opts.idle_timeout_ms.max(1)))) {
            return lost(e.to_string());
        }
        let (mut payload, mut global, mut delta) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            let h = match net::read_frame(&mut s, &mut payload, STALL_MS) {
                Ok(Some(h)) if h.kind == MessageType::Control => h,
                Ok(Some(h)) => return lost(format!("expected a control frame, got a {} frame", h.kind)),
                Ok(None) => return lost("the server closed the connection".into()),
                Err(e) => return lost(e),
            };
            let msg: ToClient = match wire::decode_control(&h, &payload) {
                Ok(m) => m,
                Err(e) => return lost(e.to_string()),
            };
            match msg {
                ToClient::Train { round } => {
                    match net::read_frame(&mut s, &mut payload, STALL_MS) {
                        Ok(Some(t))
                            if t.kind == MessageType::Tensor
                                && t.tag == round as u64
                                && payload.len() == 4 * self.trainer.model().layout().len() => {}
                        Ok(_) => return lost(format!("the model for round {round} did not follow its message")),
                        Err(e) => return lost(e),
                    }
                    global.clear();
                    global.extend(
                        payload
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                    );
                    let started = Instant::now();
                    let seed = Rng::derive(spec.seed, (round as u64) << 32 | client).next_u64();
                    let r = self
                        .trainer
                        .train(&global, self.train, self.rows, &local, seed, &mut delta)
                        .map_err(|e| JobError::Federation(format!("training for round {round}: {e}")))?;
                    let train_s = started.elapsed().as_secs_f64();
                    self.summary.trained += 1;
                    self.summary.train_s += train_s;
                    on_event(ClientEvent::Trained {
                        round,
                        loss: r.train_loss,
                        train_s,
                    });
                    let update = ToServer::Update {
                        round,
                        samples: r.samples,
                        train_loss: r.train_loss,
                    };
                    let Some((_, encoder)) = self.encoder.as_mut() else {
                        return Err(JobError::Federation("no update encoder after the welcome".into()));
                    };
                    if !encoder.is_plain() {
                        encoder
                            .encode(&delta, seed, &mut coded)
                            .map_err(|e| JobError::Federation(e.to_string()))?;
                    }
                    let sent = wire::encode_control(0, &update)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                        .and_then(|b| s.write_all(&b))
                        .and_then(|()| match encoder.is_plain() {
                            true => net::write_tensor(&mut s, round as u64, 0, &delta),
                            false => net::write_frame(&mut s, MessageType::Ps, round as u64, 0, &coded),
                        });
                    if let Err(e) = sent {
                        return lost(format!("sending the update for round {round}: {e}"));
                    }
                }
                ToClient::Refused { round, why } => on_event(ClientEvent::Refused { round, why: &why }),
                ToClient::Done { rounds } => return Ok(SessionEnd::Done(rounds)),
                ToClient::Welcome { .. } | ToClient::Rejected { .. } => {
                    return lost("a second welcome".into());
                }
            }
        }
    }
}
