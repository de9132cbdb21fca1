//! What a running job tells the outside: progress per step, metrics per
//! epoch, the final summary. The binary renders these as a progress bar and
//! as JSON lines; the launcher relays its workers' lines the same way.

use serde::{Deserialize, Serialize};

/// Metrics after one epoch. Serialised as one `--json` line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    pub epoch: u32,
    pub step: u64,
    pub train_loss: f64,
    /// Training samples per second over the whole cluster, this epoch.
    pub samples_per_s: f64,
    /// Seconds since the job started.
    pub wall_s: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub test_acc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub test_auc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub test_logloss: Option<f64>,
    /// The data generator's Bayes-optimal AUC, when the data says.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bayes_auc: Option<f64>,
}

/// Progress within an epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub rank: u32,
    pub epoch: u32,
    pub step_in_epoch: u64,
    pub steps_per_epoch: u64,
    pub loss: f32,
    pub samples_per_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Report {
    Start {
        rank: u32,
        world: u32,
        epochs: u32,
        steps_per_epoch: u64,
        params: usize,
        start_epoch: u32,
        /// Data skew across workers: the largest partition over the mean, in rows
        /// and in non-zeros (1.0 is perfect balance).
        rows_max_over_mean: f64,
        nnz_max_over_mean: f64,
    },
    Step(StepReport),
    Epoch(EpochReport),
}

/// Receives reports as they happen.
pub trait Observer {
    fn report(&mut self, r: &Report);
}

/// Discards everything.
pub struct Quiet;

impl Observer for Quiet {
    fn report(&mut self, _: &Report) {}
}

impl<F: FnMut(&Report)> Observer for F {
    fn report(&mut self, r: &Report) {
        self(r)
    }
}
