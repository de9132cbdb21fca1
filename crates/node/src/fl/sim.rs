//! `sinter fl sim`: a whole federation in one process. The `fl::Rounds`
//! engine runs as it does behind real connections; every sampled client's
//! local training runs on a pool of threads, one model's scratch space per
//! thread (not per client), so memory grows with the threads and the
//! sampled clients' updates, not with the number of clients.
//!
//! With `[fl.dp]` each virtual client clips its update before the engine
//! sees it (`fl::LocalSpec::clip_norm`, as a client process does), the
//! engine samples, noises and accounts as `fl::Rounds` describes, and every
//! round line carries the ε spent so far.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use data::Dataset;
use fl::{Command, Event, LocalSpec, LocalTrainer, Rounds, Update};
use tensor::Rng;

use super::{FlSummary, RoundLine};
use crate::config::JobConfig;
use crate::error::JobError;

/// What a simulation runs on.
pub struct SimSpec {
    /// Virtual clients (overrides `fl.clients`).
    pub clients: Option<usize>,
    /// Threads that train clients at once; 0: one per core.
    pub threads: usize,
}

/// Bytes a model or an update costs on the wire besides its values: a frame
/// header and the round, client and sample count.
const MESSAGE_OVERHEAD_BYTES: u64 = wire::HEADER_BYTES as u64 + 24;

/// Runs the federation `cfg` describes; `on_round` sees every closed round.
pub fn run(cfg: &JobConfig, spec: &SimSpec, on_round: &mut dyn FnMut(&RoundLine)) -> Result<FlSummary, JobError> {
    let started = Instant::now();
    let origin = std::path::Path::new("<config>");
    let mut flc = super::section(cfg, origin)?;
    if let Some(n) = spec.clients {
        flc.clients = u32::try_from(n).unwrap_or(u32::MAX);
        flc.validate().map_err(|e| JobError::Config {
            path: origin.into(),
            why: format!("--clients {n}: {e}"),
        })?;
    }
    let clients = flc.clients as usize;
    let data = crate::job::load_data(cfg)?;
    let train = &data.train;
    let parts = super::split_clients(cfg, &flc, train, clients)?;
    let input_dim = usize::try_from(train.dim()).map_err(|_| JobError::Config {
        path: cfg.data.train.clone(),
        why: format!("feature dimension {} does not fit in memory", train.dim()),
    })?;
    let classes = train.num_classes as usize;
    let threads = if spec.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        spec.threads
    };
    let mut trainers = Vec::with_capacity(threads);
    for _ in 0..threads {
        trainers.push(LocalTrainer::new(model::build(&cfg.model, input_dim, classes)?, train));
    }
    let len = trainers[0].model().layout().len();
    let mut global = vec![0.0f32; len];
    trainers[0]
        .model()
        .init(&mut global, &mut Rng::derive(cfg.train.seed, 0x1417));
    let local = super::local_spec(cfg, &flc);
    let mut engine = Rounds::new(flc.clone(), cfg.train.seed, global);
    let clock = Instant::now();
    let now_ms = || clock.elapsed().as_millis() as u64;
    let mut commands = Vec::new();
    for client in 0..clients as u64 {
        commands.extend(engine.handle(Event::Joined { client, now_ms: 0 }));
    }
    commands.extend(engine.start(0));
    let setup_s = started.elapsed().as_secs_f64();
    let mut summary = FlSummary {
        clients,
        setup_s,
        ..FlSummary::default()
    };
    let message_bytes = 4 * len as u64 + MESSAGE_OVERHEAD_BYTES;
    let mut round_started = Instant::now();
    // The open round's time in the clients' training and in the engine.
    let (mut train_s, mut aggregate_s) = (0.0, 0.0);
    // With a codec, each update goes through it (with the client's own error
    // feedback) as it would cross the wire, and is counted at its coded size.
    let mut coded = Coded::new(&flc, len)?;
    let mut up_bytes = 0u64;
    loop {
        let asked: Vec<(u64, u32)> = commands
            .iter()
            .filter_map(|c| match c {
                Command::Train { client, round } => Some((*client, *round)),
                _ => None,
            })
            .collect();
        let mut next = Vec::new();
        for c in commands.drain(..) {
            match c {
                Command::Train { .. } => {}
                Command::Refused { client, round, reason } => {
                    tracing::warn!(client, round, %reason, "update refused");
                }
                Command::Closed(report) => {
                    let eval_started = Instant::now();
                    let metrics = if super::evaluated(&flc, report.round) {
                        evaluate(&mut trainers, engine.global(), data.test.as_ref(), classes)
                    } else {
                        None
                    };
                    let line = RoundLine {
                        wall_s: started.elapsed().as_secs_f64(),
                        round_s: round_started.elapsed().as_secs_f64(),
                        train_s,
                        aggregate_s,
                        eval_s: eval_started.elapsed().as_secs_f64(),
                        bytes_up: match coded {
                            Some(_) => std::mem::take(&mut up_bytes),
                            None => (report.updates + report.refused) as u64 * message_bytes,
                        },
                        bytes_down: report.sampled as u64 * message_bytes,
                        ..RoundLine::from_report(&report, metrics)
                    };
                    on_round(&line);
                    summary.add(&line);
                    round_started = Instant::now();
                }
                Command::Starved {
                    round,
                    connected,
                    needed,
                } => {
                    return Err(JobError::Federation(format!(
                        "round {round} could not start: {connected} clients connected, fl.min_clients is {needed}"
                    )));
                }
                Command::Done => {
                    summary.wall_s = started.elapsed().as_secs_f64();
                    summary.peak_rss_mb = super::peak_rss_mb();
                    return Ok(summary);
                }
            }
        }
        if asked.is_empty() {
            return Err(JobError::Federation(format!(
                "the engine asked for nothing after round {}",
                engine.rounds_done()
            )));
        }
        // Largest clients first, so the threads finish together (longest-processing-time first).
        let mut asked = asked;
        asked.sort_by_key(|&(client, _)| std::cmp::Reverse(parts[client as usize].len()));
        let train_started = Instant::now();
        let mut updates = train_clients(
            &mut trainers,
            engine.global(),
            train,
            &parts,
            &asked,
            &local,
            cfg.train.seed,
        )?;
        if let Some(c) = &mut coded {
            up_bytes = c.pass(&mut updates, cfg.train.seed)?;
        }
        train_s = train_started.elapsed().as_secs_f64();
        let aggregate_started = Instant::now();
        for update in updates {
            next.extend(engine.handle(Event::Update {
                update,
                now_ms: now_ms(),
            }));
        }
        aggregate_s = aggregate_started.elapsed().as_secs_f64();
        commands = next;
    }
}

/// Trains the `asked` clients on `threads` trainers at once; the updates come
/// back in ascending client order.
fn train_clients(
    trainers: &mut [LocalTrainer],
    global: &[f32],
    train: &Dataset,
    parts: &[Vec<usize>],
    asked: &[(u64, u32)],
    spec: &LocalSpec,
    seed: u64,
) -> Result<Vec<Update>, JobError> {
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Result<Update, JobError>>> = Mutex::new(Vec::with_capacity(asked.len()));
    std::thread::scope(|s| {
        for trainer in trainers.iter_mut() {
            let (next, done) = (&next, &done);
            s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(client, round)) = asked.get(i) else {
                        break;
                    };
                    let rows = &parts[client as usize];
                    let mut delta = Vec::new();
                    let client_seed = Rng::derive(seed, (round as u64) << 32 | client).next_u64();
                    let result = trainer
                        .train(global, train, rows, spec, client_seed, &mut delta)
                        .map(|r| {
                            // The norm before clipping: what fl.dp.clip_norm is chosen against.
                            tracing::debug!(client, round, delta_norm = r.delta_norm, "client trained");
                            Update {
                                client,
                                round,
                                samples: r.samples,
                                train_loss: r.train_loss,
                                delta,
                            }
                        })
                        .map_err(|e| JobError::Federation(format!("client {client}, round {round}: {e}")));
                    done.lock().unwrap_or_else(|p| p.into_inner()).push(result);
                }
            });
        }
    });
    let mut updates = done
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    updates.sort_by_key(|u| u.client);
    Ok(updates)
}

/// The global model's test metrics, the test rows split over the trainers' models.
fn evaluate(
    trainers: &mut [LocalTrainer],
    global: &[f32],
    test: Option<&Dataset>,
    classes: usize,
) -> Option<fl::Metrics> {
    let test = test?;
    let rows: Vec<usize> = (0..test.rows()).collect();
    let chunk = rows.len().div_ceil(trainers.len()).max(1);
    let mut outs: Vec<Vec<f32>> = vec![Vec::new(); trainers.len()];
    std::thread::scope(|s| {
        for ((trainer, out), rows) in trainers.iter_mut().zip(&mut outs).zip(rows.chunks(chunk)) {
            s.spawn(move || fl::predict_rows(trainer.model_mut(), global, test, rows, out));
        }
    });
    let probs: Vec<f32> = outs.concat();
    Some(fl::metrics(&probs, classes, test))
}

/// The clients' codec in a simulation: an encoder per client that has sent
/// an update (its residual lives as long as the simulation).
struct Coded {
    spec: codec::CodecSpec,
    error_feedback: bool,
    model_len: usize,
    encoders: std::collections::HashMap<u64, fl::UpdateEncoder>,
    buf: Vec<u8>,
}

impl Coded {
    fn new(flc: &fl::FlConfig, model_len: usize) -> Result<Option<Self>, JobError> {
        let spec: codec::CodecSpec = flc.codec.parse().map_err(|e| JobError::Config {
            path: "<config>".into(),
            why: format!("fl.codec: {e}"),
        })?;
        Ok((spec != codec::CodecSpec::None).then(|| Self {
            spec,
            error_feedback: flc.error_feedback,
            model_len,
            encoders: std::collections::HashMap::new(),
            buf: Vec::new(),
        }))
    }

    /// Replaces each update's values by what its coded message decodes to; returns the bytes sent.
    fn pass(&mut self, updates: &mut [Update], seed: u64) -> Result<u64, JobError> {
        let mut bytes = 0;
        for u in updates {
            let (spec, feedback, len) = (self.spec.clone(), self.error_feedback, self.model_len);
            let encoder = self
                .encoders
                .entry(u.client)
                .or_insert_with(|| fl::UpdateEncoder::new(spec, feedback, len));
            let client_seed = Rng::derive(seed, (u.round as u64) << 32 | u.client).next_u64();
            encoder
                .encode(&u.delta, client_seed, &mut self.buf)
                .map_err(|e| JobError::Federation(format!("client {}: {e}", u.client)))?;
            u.delta = fl::decode_update(&self.buf, len).map_err(JobError::Federation)?;
            bytes += self.buf.len() as u64 + MESSAGE_OVERHEAD_BYTES;
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// Two Gaussian blobs as CSV (label first), and a job that federates a
    /// softmax model over them under `[fl.dp]`.
    fn dp_job(dir: &std::path::Path) -> JobConfig {
        let mut rng = Rng::new(9);
        let mut csv = String::new();
        for _ in 0..400 {
            let y = rng.below(2);
            let c = if y == 1 { 1.0 } else { -1.0 };
            csv += &format!("{y},{},{}\n", c + 0.5 * rng.normal(), c + 0.5 * rng.normal());
        }
        let path = dir.join("blobs.csv");
        std::fs::File::create(&path).unwrap().write_all(csv.as_bytes()).unwrap();
        let text = format!(
            "[data]\ntrain = {path:?}\ntest = {path:?}\n[model]\nkind = \"softmax\"\n[optim]\nkind = \"sgd\"\nlr = 0.5\n\
             [train]\nbatch_size = 8\nseed = 3\n\
             [fl]\nrounds = 6\nclients = 20\nfraction = 0.3\n\
             [fl.dp]\nnoise_multiplier = 0.5\nclip_norm = 0.05\n"
        );
        JobConfig::parse(&text, std::path::Path::new("<test>"), &[]).expect("config")
    }

    fn run_lines(cfg: &JobConfig) -> (Vec<RoundLine>, FlSummary) {
        let mut lines = Vec::new();
        let spec = SimSpec {
            clients: None,
            threads: 2,
        };
        let summary = run(cfg, &spec, &mut |l| lines.push(l.clone())).expect("the federation runs");
        (lines, summary)
    }

    #[test]
    fn a_dp_federation_clips_reports_epsilon_every_round_and_replays() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dp_job(dir.path());
        let (lines, summary) = run_lines(&cfg);
        assert_eq!(lines.len(), 6);
        for (i, line) in lines.iter().enumerate() {
            let mut accountant = fl::RdpAccountant::new(0.3, 0.5).unwrap();
            accountant.compose(i as u64 + 1);
            assert_eq!(line.epsilon, Some(accountant.epsilon(1e-5).unwrap().0), "{line:?}");
            // One local epoch at lr 0.5 moves a client far more than C = 0.05:
            // none refused means every client clipped before sending.
            assert_eq!((line.refused, line.dropped), (0, 0), "{line:?}");
        }
        // Poisson sampling: the sizes vary around q·N = 6.
        let sizes: Vec<usize> = lines.iter().map(|l| l.clients).collect();
        assert!(sizes.iter().any(|&s| s != sizes[0]), "{sizes:?}");
        assert_eq!(summary.epsilon, lines[5].epsilon);
        let acc = summary.test_acc.expect("a test set");
        assert!(acc > 0.8, "test accuracy {acc}");
        // The same seed replays the same federation, noise included.
        let (again, _) = run_lines(&cfg);
        let untimed = |ls: &[RoundLine]| -> Vec<RoundLine> {
            ls.iter()
                .map(|l| RoundLine {
                    wall_s: 0.0,
                    round_s: 0.0,
                    train_s: 0.0,
                    aggregate_s: 0.0,
                    eval_s: 0.0,
                    ..l.clone()
                })
                .collect()
        };
        assert_eq!(untimed(&lines), untimed(&again));
    }
}
