//! The federation's runtime: drives the `fl` engines over virtual clients in
//! this process ([`sim`]), and reports each round as a line.
//!
//! A federation's data: every client's rows come from one training file split
//! by `fl.partition` (`data::ClientSplit`), or, for `fl.partition =
//! "file:PATH"`, by a file naming the client of every row.

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
