//! The federation's runtime: drives the `fl` engines behind real connections
//! ([`server`], [`client`]) or over virtual clients in this process
//! ([`sim`]), and reports each round as a line.
//!
//! A federation's data: every client's rows come from one training file split
//! by `fl.partition` (`data::ClientSplit`), or, for `fl.partition =
//! "file:PATH"`, by a file naming the client of every row.

pub mod client;
pub mod server;
pub mod sim;

use serde::{Serialize, Serializer};

use crate::config::JobConfig;
use crate::error::JobError;

/// One closed round, as a `--json` line (`event: "round"`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RoundLine {
    pub round: u32,
    /// Clients sampled for the round.
    pub clients: usize,
    pub updates: usize,
    pub dropped: usize,
    pub refused: usize,
    pub late: usize,
    pub train_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_acc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_auc: Option<f64>,
    /// Seconds since the federation started.
    pub wall_s: f64,
    /// This round's wall time, and its part in the clients' training (the
    /// floor: the clients' work), the aggregation and the evaluation.
    pub round_s: f64,
    pub train_s: f64,
    pub aggregate_s: f64,
    pub eval_s: f64,
    /// What crossed (or, in a simulation, would cross) the network: models
    /// down to the sampled clients, updates up from them, frame headers included.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// With `[fl.dp]`: the ε for `fl.dp.delta` spent by the rounds so far,
    /// this one included (the string "inf" without noise).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "epsilon_json")]
    pub epsilon: Option<f64>,
}

/// The federation's final figures (`event: "done"`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FlSummary {
    pub rounds: u32,
    pub clients: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_acc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_auc: Option<f64>,
    pub wall_s: f64,
    /// Seconds before round 1: reading and splitting the data, building the model.
    pub setup_s: f64,
    /// Sums over the rounds of [`RoundLine`]'s parts.
    pub train_s: f64,
    pub aggregate_s: f64,
    pub eval_s: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// The process's peak resident set (VmHWM), in MiB.
    pub peak_rss_mb: f64,
    /// With `[fl.dp]`: the ε of the whole federation, as its last round reported it.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "epsilon_json")]
    pub epsilon: Option<f64>,
}

/// ε as a JSON number, or the string "inf" (JSON has no infinity, and
/// serde_json would write `null`, which reads as "no DP").
fn epsilon_json<S: Serializer>(epsilon: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match epsilon {
        Some(e) if e.is_infinite() => s.serialize_str("inf"),
        Some(e) => s.serialize_f64(*e),
        None => s.serialize_none(),
    }
}

impl RoundLine {
    /// A closed round's line as far as the engine and the evaluation tell it;
    /// the runtime adds its times and bytes.
    pub fn from_report(report: &fl::RoundReport, metrics: Option<fl::Metrics>) -> Self {
        Self {
            round: report.round,
            clients: report.sampled,
            updates: report.updates,
            dropped: report.dropped,
            refused: report.refused,
            late: report.late,
            train_loss: report.train_loss,
            test_acc: metrics.map(|m| m.acc),
            test_auc: metrics.and_then(|m| m.auc),
            epsilon: report.epsilon,
            ..Self::default()
        }
    }
}

/// Whether round `round` is evaluated: every `fl.eval_every_rounds`, and the last.
pub fn evaluated(flc: &fl::FlConfig, round: u32) -> bool {
    round == flc.rounds || round.is_multiple_of(flc.eval_every_rounds)
}

impl FlSummary {
    /// Adds a closed round's figures.
    pub fn add(&mut self, line: &RoundLine) {
        self.rounds = line.round;
        self.test_acc = line.test_acc.or(self.test_acc);
        self.test_auc = line.test_auc.or(self.test_auc);
        self.bytes_up += line.bytes_up;
        self.bytes_down += line.bytes_down;
        self.train_s += line.train_s;
        self.aggregate_s += line.aggregate_s;
        self.eval_s += line.eval_s;
        self.epsilon = line.epsilon.or(self.epsilon);
    }
}

/// The test set a server evaluates the global model on: `data.test`, or the
/// test split of an IDX directory. It also gives the model its shape.
pub fn read_server_test(cfg: &JobConfig) -> Result<data::Dataset, JobError> {
    let d = &cfg.data;
    let path = match &d.test {
        Some(p) => p.clone(),
        None if d.train.is_dir() => d.train.clone(),
        None => {
            return Err(JobError::Config {
                path: d.train.clone(),
                why: "a federation's server evaluates the global model on data.test, and takes the model's shape from it; set data.test".into(),
            });
        }
    };
    Ok(data::read_auto(
        &path,
        &crate::job::read_options(cfg, data::Split::Test),
    )?)
}

/// The model's metrics on every row of `test`, on this thread.
pub fn evaluate_one(
    trainer: &mut fl::LocalTrainer,
    global: &[f32],
    test: &data::Dataset,
    classes: usize,
) -> fl::Metrics {
    let rows: Vec<usize> = (0..test.rows()).collect();
    let mut probs = Vec::new();
    fl::predict_rows(trainer.model_mut(), global, test, &rows, &mut probs);
    fl::metrics(&probs, classes, test)
}

/// How the clients train: `[fl]`'s epochs and μ, the job's `[optim]` and batch size.
pub fn local_spec(cfg: &JobConfig, flc: &fl::FlConfig) -> fl::LocalSpec {
    fl::LocalSpec {
        epochs: flc.local_epochs,
        batch_size: cfg.train.batch_size,
        proximal_mu: flc.proximal_mu,
        optim: cfg.optim.clone(),
        // DP-FedAvg: every client clips its update before it leaves it.
        clip_norm: flc.dp.as_ref().map(|dp| dp.clip_norm),
    }
}

/// The `[fl]` section, or a config error saying the job needs one.
pub fn section(cfg: &JobConfig, origin: &std::path::Path) -> Result<fl::FlConfig, JobError> {
    cfg.fl.clone().ok_or_else(|| JobError::Config {
        path: origin.to_path_buf(),
        why: "a federation needs an [fl] section".into(),
    })
}

/// The rows of each of `clients` clients of `train`.
pub fn split_clients(
    cfg: &JobConfig,
    flc: &fl::FlConfig,
    train: &data::Dataset,
    clients: usize,
) -> Result<Vec<Vec<usize>>, JobError> {
    let split = match flc.partition.strip_prefix("file:") {
        Some(path) => data::ClientSplit::read_owners(std::path::Path::new(path), train.rows(), clients)?,
        None => flc.partition.parse::<data::ClientSplit>()?,
    };
    Ok(split.split(train, clients, cfg.train.seed)?)
}

/// Checkpoint groups of a federation's server: the global model (named like
/// a training checkpoint's `params`, so the same tools read it) and the
/// strategy's state.
const PARAMS: &str = "params";
const SERVER: &str = "server";

/// Where a federation's server stands, in its checkpoint's manifest.
#[derive(serde::Serialize, serde::Deserialize)]
struct FlPosition {
    fl_rounds_done: u32,
    /// With `[fl.dp]`: the privacy spent so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    accountant: Option<fl::RdpAccountant>,
}

/// Writes the server's state after `state.rounds_done` rounds into `dir`
/// (`step-{rounds}`, atomically) and keeps the newest `keep_last`.
pub fn save_state(
    dir: &std::path::Path,
    keep_last: usize,
    cfg: &JobConfig,
    layout: &tensor::Layout,
    state: &fl::RoundsState,
) -> Result<std::path::PathBuf, JobError> {
    let position = serde_json::to_value(FlPosition {
        fl_rounds_done: state.rounds_done,
        accountant: state.accountant.clone(),
    })
    .unwrap_or_default();
    let config = serde_json::to_value(cfg).unwrap_or_default();
    let mut snap = checkpoint::Snapshot::new(checkpoint::Manifest::new(
        u64::from(state.rounds_done),
        0,
        position,
        config,
    ));
    let params = layout
        .tensors()
        .iter()
        .map(|t| checkpoint::NamedTensor::new(&t.name, &t.shape, state.global[t.range()].to_vec()))
        .collect();
    snap.files.insert(PARAMS.into(), params);
    snap.files.insert(
        SERVER.into(),
        vec![
            checkpoint::NamedTensor::vector("strategy.m", &state.strategy.m),
            checkpoint::NamedTensor::vector("strategy.v", &state.strategy.v),
        ],
    );
    let path = checkpoint::write(dir, &snap)?;
    checkpoint::prune(dir, keep_last)?;
    Ok(path)
}

/// The server's state from the newest good checkpoint in `dir`, checked against the model's layout.
pub fn load_state(dir: &std::path::Path, layout: &tensor::Layout) -> Result<fl::RoundsState, JobError> {
    let (snap, skipped) = checkpoint::load_latest(dir)?;
    for s in &skipped {
        tracing::warn!(path = %s.path.display(), error = %s.error, "skipped a damaged checkpoint");
    }
    let path = dir.join(checkpoint::dir_name(snap.manifest.step));
    let bad = |why: String| JobError::Resume {
        path: path.clone(),
        why,
    };
    let position: FlPosition = serde_json::from_value(snap.manifest.data_position.clone())
        .map_err(|e| bad(format!("not a federation's checkpoint: {e}")))?;
    let mut global = vec![0.0f32; layout.len()];
    for t in layout.tensors() {
        let saved = snap
            .tensor(PARAMS, &t.name)
            .ok_or_else(|| bad(format!("{PARAMS} has no tensor {}", t.name)))?;
        if saved.data.len() != t.len() {
            return Err(bad(format!(
                "tensor {} holds {} values, the model's {}",
                t.name,
                saved.data.len(),
                t.len()
            )));
        }
        global[t.range()].copy_from_slice(&saved.data);
    }
    let vector = |name: &str| snap.tensor(SERVER, name).map(|t| t.data.clone()).unwrap_or_default();
    Ok(fl::RoundsState {
        rounds_done: position.fl_rounds_done,
        global,
        strategy: fl::StrategyState {
            m: vector("strategy.m"),
            v: vector("strategy.v"),
        },
        accountant: position.accountant,
    })
}

/// The peak resident set of this process in MiB (VmHWM), 0 where /proc does not say.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epsilon_is_in_the_lines_only_with_dp_and_infinity_is_spelt_out() {
        let json = |line: &RoundLine| serde_json::to_value(line).unwrap();
        assert!(json(&RoundLine::default()).get("epsilon").is_none());
        let line = RoundLine {
            epsilon: Some(7.5),
            ..RoundLine::default()
        };
        assert_eq!(json(&line)["epsilon"], 7.5);
        let line = RoundLine {
            epsilon: Some(f64::INFINITY),
            ..RoundLine::default()
        };
        assert_eq!(json(&line)["epsilon"], "inf");
        let done = FlSummary {
            epsilon: Some(8.0),
            ..FlSummary::default()
        };
        assert_eq!(serde_json::to_value(&done).unwrap()["epsilon"], 8.0);
        assert!(
            serde_json::to_value(FlSummary::default())
                .unwrap()
                .get("epsilon")
                .is_none()
        );
    }
}
