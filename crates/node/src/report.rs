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
    /// Seconds of `wall_s` rank 0 spent evaluating (so far): `wall_s − eval_s`
    /// is the training time.
    #[serde(default)]
    pub eval_s: f64,
    /// What this worker's exchange moved since the previous report.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub comm: Option<CommReport>,
    /// Where this worker's training time went this epoch (epoch lines only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub step_time: Option<StepTime>,
}

/// One worker's mean step over an epoch, split by what the training thread
/// was doing: in the exchange (the collective or the servers, with the codec
/// and the waits for peers), or outside it (batch gather, forward and
/// backward pass, optimizer step).
///
/// A step is communication-bound when `exchange_ms` is well above
/// `exchange_cpu_ms`, the CPU the exchange itself used on the training thread
/// (other threads' work, such as a parameter-server client's receives, only
/// counts in `cpu_ms`). On a machine whose cores the job's processes share,
/// `cpu_ms` × processes ÷ cores near the step time says the step is CPU-bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTime {
    pub steps: u64,
    /// Wall time in the exchange, per step.
    pub exchange_ms: f64,
    /// The training thread's CPU time in the exchange, per step.
    pub exchange_cpu_ms: f64,
    /// Wall time outside the exchange, per step.
    pub compute_ms: f64,
    /// The training thread's CPU time outside the exchange, per step: the
    /// compute, as `sinter sim --predict --host-cores` takes it.
    pub compute_cpu_ms: f64,
    /// The whole process's CPU time (all threads), per step.
    pub cpu_ms: f64,
}

/// Bytes a worker's exchange sent and received, per step and per peer, and
/// how much compression saved and cost.
///
/// Bytes are those of the collectives' frames (payload and 32-byte headers),
/// counted from the collective engines' plans, not from the sockets: TCP/IP
/// headers and retransmissions come on top.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CommReport {
    /// Steps these figures cover.
    pub steps: u64,
    /// Mean bytes sent and received per step.
    pub sent_per_step: f64,
    pub received_per_step: f64,
    /// Mean bytes sent to and received from each peer per step: by rank
    /// (all-reduce), or by shard (parameter servers).
    pub sent_per_peer: Vec<f64>,
    pub received_per_peer: Vec<f64>,
    /// What an uncompressed all-reduce of the same gradient sends, over what was sent.
    pub ratio: f64,
    /// ‖g − ĝ‖ / ‖g‖ over the compressed tensors, with g the (error-corrected)
    /// gradient a codec was given and ĝ what its message decodes to; 0 uncompressed.
    pub rel_error: f64,
    /// Bytes sent and received since the job (or this process) started.
    pub sent_total: u64,
    pub received_total: u64,
}

/// Traffic and compression error of some steps, summed; [`Traffic::report`]
/// turns it into means.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Traffic {
    pub steps: u64,
    /// Bytes sent to and received from each peer, by rank.
    pub sent: Vec<u64>,
    pub received: Vec<u64>,
    /// Bytes an uncompressed all-reduce of the same tensors would have sent.
    pub uncompressed: u64,
    /// Σ‖g − ĝ‖² and Σ‖g‖² over the compressed tensors.
    pub err2: f64,
    pub norm2: f64,
}

impl Traffic {
    pub fn new(world: u32) -> Self {
        Self {
            sent: vec![0; world as usize],
            received: vec![0; world as usize],
            ..Self::default()
        }
    }

    pub fn sent_total(&self) -> u64 {
        self.sent.iter().sum()
    }

    pub fn received_total(&self) -> u64 {
        self.received.iter().sum()
    }

    /// Adds `other` in (peers beyond this one's length extend it).
    pub fn add(&mut self, other: &Traffic) {
        for (mine, theirs) in [(&mut self.sent, &other.sent), (&mut self.received, &other.received)] {
            if mine.len() < theirs.len() {
                mine.resize(theirs.len(), 0);
            }
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a += b;
            }
        }
        self.steps += other.steps;
        self.uncompressed += other.uncompressed;
        self.err2 += other.err2;
        self.norm2 += other.norm2;
    }

    /// Means per step of these steps; `total` holds the totals so far.
    pub fn report(&self, total: &Traffic) -> CommReport {
        let steps = self.steps.max(1) as f64;
        let per = |v: &[u64]| v.iter().map(|b| *b as f64 / steps).collect::<Vec<f64>>();
        let sent = self.sent_total();
        CommReport {
            steps: self.steps,
            sent_per_step: sent as f64 / steps,
            received_per_step: self.received_total() as f64 / steps,
            sent_per_peer: per(&self.sent),
            received_per_peer: per(&self.received),
            ratio: if sent == 0 {
                1.0
            } else {
                self.uncompressed as f64 / sent as f64
            },
            rel_error: if self.norm2 > 0.0 {
                (self.err2 / self.norm2).sqrt()
            } else {
                0.0
            },
            sent_total: total.sent_total(),
            received_total: total.received_total(),
        }
    }
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
    /// What this worker's exchange moved since its previous step report.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub comm: Option<CommReport>,
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
        /// and in non-zeros (1.0 is perfect balance). The non-zeros are absent
        /// when no rank knows every partition's: parameter-server workers that
        /// read only their partitions exchange no counts (each `data` line has its own).
        rows_max_over_mean: f64,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        nnz_max_over_mean: Option<f64>,
    },
    /// What one worker of a cluster read of the training data (every rank sends one, before training).
    Data(DataReport),
    Step(StepReport),
    Epoch(EpochReport),
    /// A test-set evaluation within an epoch (`train.eval_every_steps`):
    /// `epoch` is the epoch in progress, `train_loss` the mean since the previous one.
    Eval(EpochReport),
    /// An elastic job continued with a new membership (see `elastic`).
    Regroup(RegroupReport),
    /// An elastic parameter-server job: this process took lost worker
    /// `rank`'s place and continues its partition at `step` (the first step
    /// not every shard had from it); `unix_ms` is when it was ready to train.
    Replaced {
        rank: u32,
        step: u64,
        unix_ms: u64,
    },
    /// Replicated parameter servers: who serves a shard now (from the coordinator).
    Shard {
        shard: u32,
        primary_pid: Option<u32>,
        backup_pid: Option<u32>,
        backup_ready: bool,
        /// Promotions of a backup so far.
        failovers: u32,
    },
}

/// What one worker read: its partition of the training rows, or every row and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataReport {
    pub rank: u32,
    pub world: u32,
    /// Data rows in the training file.
    pub rows_total: u64,
    /// The rows this worker parsed and holds: `first_row .. first_row + rows`
    /// (its partition of the epoch plan, or every row).
    pub first_row: u64,
    pub rows: u64,
    /// Stored entries of those rows (non-zeros; `rows × dim` for dense data).
    pub nnz: u64,
    /// Why this worker read every row; absent when it read only its partition.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub whole_file: Option<String>,
    /// Rows of the test set this worker read (only rank 0 evaluates).
    pub test_rows: u64,
    /// Milliseconds of the first look at the data files, before joining the
    /// cluster (row count and labels: a bad file fails early); 0 when the
    /// worker read every row before joining (elastic jobs).
    pub survey_ms: f64,
    /// Milliseconds reading the training rows and the test set.
    pub read_ms: f64,
}

/// One worker's view of a membership change it came through.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegroupReport {
    pub rank: u32,
    pub generation: u64,
    pub world: u32,
    /// The rank whose training state everyone continued from.
    pub source: u32,
    /// Optimizer steps of that state (the step training continues at).
    pub step: u64,
    /// Whether this worker joined with this generation.
    pub joined: bool,
    /// Rows of lost workers shared out to the others, and rows moved to joiners.
    pub lost_rows: u64,
    pub moved_rows: u64,
    /// From this worker's first sign of the change (a failed collective, or
    /// news of a new generation) to training again.
    pub regroup_ms: f64,
    /// When training resumed, in milliseconds since the Unix epoch (to line
    /// up with outside events, such as when a process was killed).
    pub unix_ms: u64,
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
