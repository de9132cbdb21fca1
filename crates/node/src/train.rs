//! The training loop of one worker: its data partition, the model, the
//! optimizer, evaluation and checkpoints. How gradients meet the other
//! workers' is behind [`Exchange`]: nothing for a single process, ring
//! all-reduce over TCP for a cluster.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use data::{Batch, Dataset, EpochPlan};
use model::Model;
use serde::Serialize;
use tensor::{Gradient, ParamKind, Rng};

use crate::config::{JobConfig, SyncMode};
use crate::error::JobError;
use crate::ps_client::PsExchange;
use crate::report::{EpochReport, Observer, Report, StepReport, StepTime, Traffic};
use crate::state;

/// Rows predicted per evaluation batch.
const EVAL_BATCH_ROWS: usize = 1024;
/// Steps between progress reports.
const PROGRESS_EVERY_STEPS: u64 = 20;

/// How one worker's gradients or parameters meet the other workers'.
pub trait Exchange {
    fn rank(&self) -> u32;
    fn world(&self) -> u32;
    /// A dense gradient range is final; `values` already carry this worker's
    /// weight in the global mean. May start communicating at once.
    fn gradient_ready(&mut self, step: u64, range: Range<usize>, values: &[f32]) -> Result<(), JobError>;
    /// Waits for every range handed over this step and writes the sums into `grad`.
    fn finish_gradients(&mut self, step: u64, grad: &mut [f32]) -> Result<(), JobError>;
    /// Whether gradients are exchanged during the backward pass (`gradient_ready`,
    /// `finish_gradients`) or after it, in place (`allreduce_gradient`).
    fn overlaps(&self) -> bool {
        true
    }
    /// Sums the whole weighted gradient over all workers, in place.
    fn allreduce_gradient(&mut self, step: u64, grad: &mut [f32]) -> Result<(), JobError>;
    /// Replaces `params` by the mean over all workers (local SGD).
    fn average_params(&mut self, step: u64, params: &mut [f32]) -> Result<(), JobError>;
    /// Checks that every worker holds the same parameters (by checksum).
    fn verify_identical(&mut self, epoch: u32, checksum: u64) -> Result<(), JobError>;
    /// The parameter servers, when the optimizer runs there: the trainer then
    /// pulls before each step and pushes its gradient instead of stepping.
    fn remote(&mut self) -> Option<&mut PsExchange> {
        None
    }
    /// What the exchange moved since the last call (`None`: it does not count).
    fn take_traffic(&mut self) -> Option<Traffic> {
        None
    }
    /// Exchange state a checkpoint must hold to resume exactly (compression
    /// residuals), as named tensors. Called on every rank (it may run a
    /// collective); rank 0 writes what it returns.
    fn checkpoint_state(&mut self, _step: u64) -> Result<Vec<(String, Vec<f32>)>, JobError> {
        Ok(Vec::new())
    }
}

/// A single process: nothing to exchange.
pub struct Alone;

impl Exchange for Alone {
    fn rank(&self) -> u32 {
        0
    }
    fn world(&self) -> u32 {
        1
    }
    fn gradient_ready(&mut self, _: u64, _: Range<usize>, _: &[f32]) -> Result<(), JobError> {
        Ok(())
    }
    fn finish_gradients(&mut self, _: u64, _: &mut [f32]) -> Result<(), JobError> {
        Ok(())
    }
    fn allreduce_gradient(&mut self, _: u64, _: &mut [f32]) -> Result<(), JobError> {
        Ok(())
    }
    fn average_params(&mut self, _: u64, _: &mut [f32]) -> Result<(), JobError> {
        Ok(())
    }
    fn verify_identical(&mut self, _: u32, _: u64) -> Result<(), JobError> {
        Ok(())
    }
}

/// Brings the parameters a test batch needs into the buffer before it is predicted.
type Fetch<'a> = dyn FnMut(&dyn Model, &Batch, &mut [f32]) -> Result<(), JobError> + 'a;

/// Where training stands: what a checkpoint must hold to continue exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Position {
    /// The next epoch to run (epochs before it are complete).
    pub epoch: u32,
    /// Optimizer steps taken so far.
    pub step: u64,
    /// Steps of `epoch` already taken: non-zero only when `train.max_steps`
    /// stopped the job inside an epoch, so that a resume continues that
    /// epoch's plan after them instead of starting the next epoch.
    #[serde(default)]
    pub epoch_step: u64,
    /// The cluster's membership generation (the coordinator's state that a
    /// checkpoint keeps: a restarted coordinator continues after it).
    #[serde(default)]
    pub generation: u64,
}

/// The loaded data of a job.
pub struct JobData {
    /// The training rows this worker holds: rows `first_row .. first_row +
    /// train.rows()` of the `total_rows` in the file. The epoch plan works in
    /// these global row ids; a worker that read only its partition holds just
    /// the plan's rows for its rank.
    pub train: Dataset,
    pub first_row: usize,
    pub total_rows: usize,
    /// Non-zeros of every rank's partition, by rank, when the ranks told each
    /// other (all-reduce workers that hold only their partitions).
    pub partition_nnz: Option<Vec<u64>>,
    pub test: Option<Dataset>,
    /// Extra facts about the data to report (e.g. a generator's Bayes AUC).
    pub meta: Option<serde_json::Value>,
}

impl JobData {
    /// Data that holds every training row.
    pub fn whole(train: Dataset, test: Option<Dataset>, meta: Option<serde_json::Value>) -> Self {
        Self {
            first_row: 0,
            total_rows: train.rows(),
            train,
            partition_nnz: None,
            test,
            meta,
        }
    }

    /// Whether `train` holds only some of the file's rows.
    pub fn is_partial(&self) -> bool {
        self.first_row != 0 || self.train.rows() != self.total_rows
    }

    /// Where global row `row` is in `train`. A row this worker does not hold
    /// means the plan and the rows read disagree: a bug, not bad input.
    fn local_row(&self, row: u32) -> usize {
        let local = (row as usize).wrapping_sub(self.first_row);
        assert!(
            local < self.train.rows(),
            "row {row} is outside the rows this worker holds ({}..{})",
            self.first_row,
            self.first_row + self.train.rows()
        );
        local
    }
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Summary {
    /// The rank of the worker this summary is from, when the run ended.
    #[serde(default)]
    pub rank: u32,
    pub epochs: u32,
    pub steps: u64,
    pub wall_s: f64,
    pub last: Option<EpochReport>,
    pub checkpoint: Option<PathBuf>,
    /// Parameter-server jobs: each shard's load and staleness figures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<crate::server::ServerReport>,
    /// Seconds of `wall_s` spent evaluating (on rank 0).
    #[serde(default)]
    pub eval_s: f64,
    /// Bytes this worker's exchange sent and received over the run (see `report::CommReport`).
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default)]
    pub bytes_received: u64,
}

/// One worker's training state.
pub struct Trainer {
    cfg: JobConfig,
    model: Box<dyn Model>,
    params: Vec<f32>,
    grad: Gradient,
    opt: optim::Optimizer,
    data: JobData,
    /// This worker's place among the workers (changes when an elastic job regroups).
    rank: u32,
    world: u32,
    /// The current epoch's rows by rank and how far they are trained (`None`
    /// between epochs), and the epoch's steps before the plan was last regrouped.
    plan: Option<EpochPlan>,
    steps_before_plan: u64,
    /// The data address of each rank of `plan` (elastic jobs; empty otherwise).
    owners: Vec<String>,
    /// Whether `run` has reported its start (it runs again after a regroup).
    start_reported: bool,
    /// The checkpoint being written in the background (rank 0).
    writer: Option<std::thread::JoinHandle<Result<PathBuf, JobError>>>,
    /// This step's rows, as `Batch::gather` takes them.
    batch_rows: Vec<usize>,
    pos: Position,
    /// This worker's share of the global mean gradient: local_batch / global_batch.
    weight: f32,
    /// Scratch for weighted gradient ranges handed to an overlapping exchange.
    scaled: Vec<f32>,
    /// The exchange's traffic since the last step report, since the last
    /// epoch or evaluation report, and in all.
    traffic: [Traffic; 3],
    /// When `run` started, and the seconds since spent evaluating.
    started: Instant,
    eval_s: f64,
    /// Loss sum and steps since the last evaluation within an epoch.
    eval_window: (f64, u64),
    /// Time the training thread spent in the exchange this epoch: wall and
    /// the thread's CPU.
    exchange_spent: Spent,
    /// The line of an epoch whose training is done but whose end (the
    /// parameter check, evaluation, checkpoint) a lost peer interrupted: an
    /// elastic job's next generation reports it first.
    unreported: Option<EpochReport>,
}

/// Indices of [`Trainer::traffic`].
const SINCE_STEP_REPORT: usize = 0;
const SINCE_REPORT: usize = 1;
const TOTAL: usize = 2;

impl Trainer {
    pub fn new(cfg: JobConfig, data: JobData, rank: u32, world: u32) -> Result<Self, JobError> {
        let input_dim = usize::try_from(data.train.dim()).map_err(|_| JobError::Config {
            path: PathBuf::from("<config>"),
            why: format!("feature dimension {} does not fit in memory", data.train.dim()),
        })?;
        let model = model::build(&cfg.model, input_dim, data.train.num_classes as usize)?;
        let layout = model.layout().clone();
        let mut params = vec![0.0f32; layout.len()];
        model.init(&mut params, &mut Rng::derive(cfg.train.seed, 0x1417));
        let grad = Gradient::for_layout(&layout);
        let opt = optim::Optimizer::new(&cfg.optim, &layout)?;
        let has_tables = layout.tensors().iter().any(|t| t.kind == ParamKind::Table);
        if world > 1 && has_tables && cfg.cluster.servers == 0 {
            return Err(JobError::Config {
                path: PathBuf::from("<config>"),
                why: format!(
                    "model `{}` has sparse tables, which all-reduce does not carry; train it with one worker or with parameter servers (cluster.servers)",
                    model_kind(&cfg)
                ),
            });
        }
        if data.total_rows > data::PLAN_ROWS_MAX {
            return Err(JobError::Config {
                path: PathBuf::from("<config>"),
                why: format!("{} training rows are more than a worker can plan", data.total_rows),
            });
        }
        let plan = EpochPlan::new(data.total_rows, world, cfg.train.batch_size, cfg.train.seed, 0);
        if plan.steps() == 0 {
            return Err(JobError::Config {
                path: PathBuf::from("<config>"),
                why: format!(
                    "{} training rows are too few for a global batch of {} over {world} workers",
                    data.total_rows, cfg.train.batch_size
                ),
            });
        }
        if data.is_partial() {
            let part = data::partitions(data.total_rows, world, cfg.train.batch_size)[rank as usize].clone();
            assert_eq!(
                part,
                data.first_row..data.first_row + data.train.rows(),
                "rank {rank} of {world} holds rows that are not its partition"
            );
        }
        let weight = plan.batch_rows(rank) as f32 / cfg.train.batch_size as f32;
        Ok(Self {
            cfg,
            model,
            params,
            grad,
            opt,
            data,
            rank,
            world,
            plan: None,
            steps_before_plan: 0,
            owners: Vec::new(),
            start_reported: false,
            writer: None,
            batch_rows: Vec::new(),
            pos: Position::default(),
            weight,
            scaled: Vec::new(),
            traffic: Default::default(),
            started: Instant::now(),
            eval_s: 0.0,
            eval_window: (0.0, 0),
            exchange_spent: Spent::default(),
            unreported: None,
        })
    }

    /// This worker's rank (it changes when an elastic job regroups).
    pub fn rank(&self) -> u32 {
        self.rank
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn position(&self) -> Position {
        self.pos
    }

    /// Steps per epoch at the start of an epoch, with the current membership.
    pub fn steps_per_epoch(&self) -> u64 {
        self.fresh_plan(0).steps()
    }

    fn fresh_plan(&self, epoch: u32) -> EpochPlan {
        EpochPlan::new(
            self.data.total_rows,
            self.world,
            self.cfg.train.batch_size,
            self.cfg.train.seed,
            epoch,
        )
    }

    /// The skew of the plan's partitions for `world` workers: rows from their
    /// ranges; non-zeros from the rows when this worker holds them all, else
    /// from the counts the ranks exchanged (`None` if they did not).
    fn partition_skew(&self, world: u32) -> (f64, Option<f64>) {
        let parts = data::partitions(self.data.total_rows, world, self.cfg.train.batch_size);
        let nnz = match &self.data.partition_nnz {
            Some(n) if n.len() == parts.len() => Some(n.clone()),
            _ if !self.data.is_partial() => Some(
                parts
                    .iter()
                    .map(|p| p.clone().map(|r| self.data.train.row_nnz(r) as u64).sum())
                    .collect(),
            ),
            _ => None,
        };
        partition_skew(&parts, nnz.as_deref())
    }

    pub fn layout(&self) -> &tensor::Layout {
        self.model.layout()
    }

    pub fn optimizer(&self) -> &optim::Optimizer {
        &self.opt
    }

    /// This worker's weight in the global mean gradient (local batch / global batch).
    pub fn weight(&self) -> f32 {
        self.weight
    }

    pub fn config(&self) -> &JobConfig {
        &self.cfg
    }

    /// The `n` most frequent table rows in the first `sample_rows` rows of this
    /// worker's partition, found with a Count-Min sketch: (row, count), and the
    /// total count of row references seen.
    pub fn hot_rows(&mut self, sample_rows: usize, n: usize) -> (Vec<(u32, u64)>, u64) {
        if n == 0 || !self.layout().tensors().iter().any(|t| t.kind == ParamKind::Table) {
            return (Vec::new(), 0);
        }
        let mut sketch = ps::HotKeys::new(n.saturating_mul(2));
        let mut batch = Batch::for_dataset(&self.data.train);
        let mut rows = Vec::new();
        let plan = self.fresh_plan(0);
        let part = plan.remaining(self.rank);
        let idx: Vec<usize> = part[..sample_rows.min(part.len())]
            .iter()
            .map(|&r| self.data.local_row(r))
            .collect();
        // Counted per training batch: a shard's key load is the number of
        // requests (batches) that carry the key.
        for chunk in idx.chunks(plan.batch_rows(self.rank).max(1)) {
            batch.gather(&self.data.train, chunk);
            self.model.touched_rows(&batch, &mut rows);
            for &r in &rows {
                sketch.add(r as u64);
            }
        }
        let top = sketch.top(n).into_iter().map(|(k, c)| (k as u32, c)).collect();
        (top, sketch.total())
    }

    /// Continues from the newest good checkpoint in `dir`.
    pub fn resume(&mut self, dir: &Path) -> Result<state::Restored, JobError> {
        let restored = state::load(dir, self.model.layout(), &mut self.params, &mut self.opt)?;
        // The membership is this cluster's, not the checkpoint's.
        let generation = self.pos.generation;
        self.pos = restored.position;
        self.pos.generation = generation;
        self.plan = None;
        self.steps_before_plan = 0;
        if self.pos.epoch_step > 0 {
            // Stopped by `train.max_steps` inside this epoch: its plan, past the steps taken.
            let mut plan = self.fresh_plan(self.pos.epoch);
            for _ in 0..self.pos.epoch_step.min(plan.steps()) {
                plan.advance();
            }
            self.plan = Some(plan);
        }
        Ok(restored)
    }

    /// Puts this worker at optimizer step `step` of an uninterrupted run with
    /// its membership: the epoch, and the epoch's plan past the steps taken.
    /// A parameter-server worker that replaces a lost one does this: the model
    /// and its optimizer state are on the shards, the rest follows from `step`.
    pub fn seek(&mut self, step: u64) -> Result<(), JobError> {
        let per_epoch = self.steps_per_epoch();
        if per_epoch == 0 {
            return Err(JobError::Config {
                path: self.cfg.data.train.clone(),
                why: "no full batch per epoch for this worker".into(),
            });
        }
        let epoch = u32::try_from(step / per_epoch).map_err(|_| JobError::Peer {
            rank: self.rank,
            why: format!("the shards say this rank is at step {step}, past any epoch"),
        })?;
        let mut plan = self.fresh_plan(epoch);
        for _ in 0..step % per_epoch {
            plan.advance();
        }
        self.pos.epoch = epoch;
        self.pos.step = step;
        self.plan = Some(plan);
        self.steps_before_plan = 0;
        Ok(())
    }

    /// The training state another worker continues from when an elastic job
    /// regroups (see [`crate::elastic`]): position, the epoch's plan and the
    /// data addresses of its ranks, parameters and optimizer state.
    /// Compression residuals are not part of it: they restart from zero.
    pub fn export_state(&self) -> Vec<u8> {
        let mut w = Vec::new();
        w.extend_from_slice(STATE_MAGIC);
        put(&mut w, self.pos.epoch as u64);
        put(&mut w, self.pos.step);
        put(
            &mut w,
            self.steps_before_plan + self.plan.as_ref().map_or(0, EpochPlan::done),
        );
        put(&mut w, self.owners.len() as u64);
        for o in &self.owners {
            put(&mut w, o.len() as u64);
            w.extend_from_slice(o.as_bytes());
        }
        let mut words = Vec::new();
        if let Some(plan) = &self.plan {
            plan.encode(&mut words);
        }
        put(&mut w, words.len() as u64);
        words.iter().for_each(|&x| put(&mut w, x));
        let floats = |w: &mut Vec<u8>, v: &[f32]| {
            put(w, v.len() as u64);
            v.iter().for_each(|x| w.extend_from_slice(&x.to_le_bytes()));
        };
        floats(&mut w, &self.params);
        for (_, v) in self.opt.state_tensors() {
            floats(&mut w, v);
        }
        w
    }

    /// Replaces the training state by one [`Self::export_state`] made; checks
    /// everything before changing anything.
    pub fn import_state(&mut self, bytes: &[u8]) -> Result<(), JobError> {
        let bad = |why: String| JobError::Peer {
            rank: self.rank,
            why: format!("training state from the regroup source: {why}"),
        };
        let mut r = Reader { bytes, at: 0 };
        if r.take(STATE_MAGIC.len()).map_err(&bad)? != STATE_MAGIC {
            return Err(bad("not a training state".into()));
        }
        let epoch = u32::try_from(r.u64().map_err(&bad)?).map_err(|_| bad("epoch overflows".into()))?;
        let step = r.u64().map_err(&bad)?;
        let steps_before_plan = r.u64().map_err(&bad)?;
        let owners_n = r.len(wire::msg::PEERS_MAX).map_err(&bad)?;
        let mut owners = Vec::with_capacity(owners_n);
        for _ in 0..owners_n {
            let n = r.len(wire::msg::TEXT_BYTES_MAX).map_err(&bad)?;
            let s = std::str::from_utf8(r.take(n).map_err(&bad)?).map_err(|_| bad("address not UTF-8".into()))?;
            owners.push(s.to_string());
        }
        let words_n = r.len(bytes.len() / 8).map_err(&bad)?;
        let words: Vec<u64> = (0..words_n).map(|_| r.u64()).collect::<Result<_, _>>().map_err(&bad)?;
        let plan = if words.is_empty() {
            None
        } else {
            let (plan, rest) = EpochPlan::decode(&words, self.data.total_rows).map_err(&bad)?;
            if !rest.is_empty() || plan.world() as usize != owners.len() {
                return Err(bad(format!(
                    "a plan for {} ranks with {} addresses",
                    plan.world(),
                    owners.len()
                )));
            }
            Some(plan)
        };
        let params = r.floats(self.params.len()).map_err(&bad)?;
        let mut state = Vec::new();
        for (name, v) in self.opt.state_tensors() {
            state.push((name, r.floats(v.len()).map_err(&bad)?));
        }
        if r.at != bytes.len() {
            return Err(bad(format!("{} bytes too many", bytes.len() - r.at)));
        }
        self.opt
            .load_state(state.iter().map(|(n, v)| (n.as_str(), v.as_slice())))?;
        self.params.copy_from_slice(&params);
        self.pos.epoch = epoch;
        self.pos.step = step;
        self.steps_before_plan = steps_before_plan;
        self.plan = plan;
        self.owners = owners;
        Ok(())
    }

    /// Continues with a new membership: this worker is `rank` of the workers
    /// at `peers` (data addresses). The rest of the epoch's rows are shared out
    /// ([`EpochPlan::regroup`]); returns what moved.
    pub fn regroup(&mut self, generation: u64, rank: u32, peers: &[String]) -> data::Reassigned {
        let previous: Vec<Option<u32>> = peers
            .iter()
            .map(|a| self.owners.iter().position(|o| o == a).map(|i| i as u32))
            .collect();
        let mut moved = data::Reassigned::default();
        if let Some(plan) = &self.plan {
            let (next, m) = plan.regroup(&previous, self.cfg.train.batch_size);
            self.plan = Some(next);
            moved = m;
        }
        self.set_membership(generation, rank, peers);
        moved
    }

    /// This worker's rank and every rank's data address (for a later regroup).
    pub fn set_membership(&mut self, generation: u64, rank: u32, peers: &[String]) {
        self.pos.generation = generation;
        self.rank = rank;
        self.world = peers.len().max(1) as u32;
        self.owners = peers.to_vec();
        self.weight = self.local_batch() as f32 / self.cfg.train.batch_size as f32;
    }

    /// Runs the remaining epochs.
    pub fn run(&mut self, ex: &mut dyn Exchange, obs: &mut dyn Observer) -> Result<Summary, JobError> {
        let started = Instant::now();
        self.started = started;
        let epochs = self.cfg.train.epochs;
        let mut batch = Batch::for_dataset(&self.data.train);
        let mut last = None;
        let mut checkpoint = None;
        // Once per process: an elastic job's later generations report `regroup` lines instead.
        if !std::mem::replace(&mut self.start_reported, true) {
            let skew = self.partition_skew(ex.world());
            obs.report(&Report::Start {
                rank: ex.rank(),
                world: ex.world(),
                epochs,
                steps_per_epoch: self.steps_per_epoch(),
                params: self.params.len(),
                start_epoch: self.pos.epoch,
                rows_max_over_mean: skew.0,
                nnz_max_over_mean: skew.1,
            });
        }
        // Only if the state continues right after that epoch (a state synced
        // from an older step trains it again, and reports it then).
        if let Some(mut report) = self.unreported.take().filter(|r| r.epoch == self.pos.epoch) {
            self.evaluate_if_due(&mut report, ex)?;
            report.wall_s = started.elapsed().as_secs_f64();
            obs.report(&Report::Epoch(report.clone()));
            last = Some(report);
        }
        while self.pos.epoch < epochs {
            let epoch = self.pos.epoch;
            let epoch_started = Instant::now();
            let cpu_started = (
                cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID),
                cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID),
            );
            let steps_started = self.pos.step;
            self.exchange_spent = Spent::default();
            let (loss, samples) = self.run_epoch(epoch, &mut batch, ex, obs)?;
            let epoch_train = epoch_started.elapsed();
            let epoch_train_s = epoch_train.as_secs_f64();
            let step_time = step_time(
                self.pos.step - steps_started,
                epoch_train,
                self.exchange_spent,
                cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(cpu_started.0),
                cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID).saturating_sub(cpu_started.1),
            );
            let epoch_steps_done = self.steps_before_plan + self.plan.as_ref().map_or(0, EpochPlan::done);
            let epoch_complete = self.plan.as_ref().is_none_or(|p| p.left() == 0);
            self.plan = None;
            self.steps_before_plan = 0;
            if epoch_complete {
                self.pos.epoch += 1;
                self.pos.epoch_step = 0;
            } else {
                // `train.max_steps` stopped the epoch: it stays the next one to run, with
                // the steps taken recorded, so a resume continues it (see `resume`).
                debug_assert!(self.stop_requested());
                self.pos.epoch_step = epoch_steps_done;
            }
            let mut report = EpochReport {
                epoch: epoch + 1,
                step: self.pos.step,
                train_loss: loss,
                samples_per_s: samples as f64 * ex.world() as f64 / epoch_train_s.max(1e-9),
                wall_s: 0.0,
                test_acc: None,
                test_auc: None,
                test_logloss: None,
                bayes_auc: self
                    .data
                    .meta
                    .as_ref()
                    .and_then(|m| m.get("bayes_auc"))
                    .and_then(|v| v.as_f64()),
                eval_s: 0.0,
                comm: self.traffic_report(SINCE_REPORT),
                step_time,
            };
            // Until it is reported, a regroup here must not lose the epoch's line.
            self.unreported = Some(report.clone());
            ex.verify_identical(epoch, checksum(&self.params))?;
            self.evaluate_if_due(&mut report, ex)?;
            let last_epoch = self.training_over();
            let ck = &self.cfg.checkpoint;
            let checkpoint_due = ck.dir.is_some() && (last_epoch || self.pos.epoch.is_multiple_of(ck.every_epochs));
            if checkpoint_due
                && self.cfg.cluster.consistency() != ps::Consistency::Bsp
                && let Some(remote) = ex.remote()
            {
                // SSP and async: every worker meets at this step before it pushes the next, so
                // the checkpoint is a consistent cut of it (see `ps::shard`); BSP is one already.
                remote.cut(self.pos.step)?;
            }
            // Every rank hands over its exchange state (compression residuals); rank 0 writes it.
            let exchange_state = if checkpoint_due {
                ex.checkpoint_state(self.pos.step)?
            } else {
                Vec::new()
            };
            let ck = &self.cfg.checkpoint;
            if ex.rank() == 0 && checkpoint_due {
                let dir = ck.dir.clone().unwrap_or_default();
                // With parameter servers the model lives on the shards: gather it
                // as of this step (every worker's pushes in) and write it as a
                // single process would.
                let remote = match ex.remote() {
                    Some(r) => Some(r.snapshot(self.pos.step, &self.cfg.optim)?),
                    None => None,
                };
                let (params, opt) = match remote {
                    Some((p, o)) => (p, o),
                    None => (self.params.clone(), self.opt.clone()),
                };
                // Written in the background from a copy while training goes on;
                // the previous write is waited for first, so at most one runs.
                if let Some(path) = self.finish_checkpoint()? {
                    checkpoint = Some(path);
                }
                let (cfg, layout, pos) = (self.cfg.clone(), self.model.layout().clone(), self.pos);
                let keep = cfg.checkpoint.keep_last;
                let write = move || state::save(&dir, keep, &cfg, &layout, &params, &opt, pos, &exchange_state);
                self.writer = Some(
                    std::thread::Builder::new()
                        .name("checkpoint".into())
                        .spawn(write)
                        .map_err(|e| JobError::io("spawning the checkpoint writer", e))?,
                );
            }
            report.wall_s = started.elapsed().as_secs_f64();
            self.eval_window = (0.0, 0);
            self.unreported = None;
            obs.report(&Report::Epoch(report.clone()));
            last = Some(report);
            if self.stop_requested() {
                break;
            }
        }
        if let Some(remote) = ex.remote() {
            remote.flush(self.pos.step)?;
        }
        if let Some(path) = self.finish_checkpoint()? {
            checkpoint = Some(path);
        }
        Ok(Summary {
            rank: self.rank,
            epochs,
            steps: self.pos.step,
            wall_s: started.elapsed().as_secs_f64(),
            last,
            checkpoint,
            servers: Vec::new(),
            eval_s: self.eval_s,
            bytes_sent: self.traffic[TOTAL].sent_total(),
            bytes_received: self.traffic[TOTAL].received_total(),
        })
    }

    /// Waits for the checkpoint being written in the background, if any; its path.
    fn finish_checkpoint(&mut self) -> Result<Option<PathBuf>, JobError> {
        match self.writer.take() {
            None => Ok(None),
            Some(w) => w
                .join()
                .map_err(|_| JobError::io("writing a checkpoint", std::io::Error::other("the writer panicked")))?
                .map(Some),
        }
    }

    fn stop_requested(&self) -> bool {
        self.cfg.train.max_steps > 0 && self.pos.step >= self.cfg.train.max_steps
    }

    /// The epoch just ended is the job's last: all epochs done, or `max_steps` reached.
    fn training_over(&self) -> bool {
        self.pos.epoch == self.cfg.train.epochs || self.stop_requested()
    }

    /// One epoch over this worker's partition; returns (mean loss, samples seen by this worker).
    fn run_epoch(
        &mut self,
        epoch: u32,
        batch: &mut Batch,
        ex: &mut dyn Exchange,
        obs: &mut dyn Observer,
    ) -> Result<(f64, u64), JobError> {
        debug_assert_eq!((ex.rank(), ex.world()), (self.rank, self.world));
        if self.plan.is_none() {
            self.plan = Some(self.fresh_plan(epoch));
        }
        if let Some(remote) = ex.remote() {
            return self.run_epoch_remote(epoch, batch, remote, obs);
        }
        let rank = self.rank;
        let local_sgd = self.cfg.cluster.sync == SyncMode::LocalSgd && ex.world() > 1;
        let mut loss_sum = 0.0f64;
        let mut samples = 0u64;
        let mut window = (Instant::now(), 0u64);
        while self.take_batch(0, batch) {
            let step = self.pos.step;
            let loss = if local_sgd || ex.world() == 1 {
                self.model
                    .forward_backward(&self.params, batch, &mut self.grad, &mut |_, _| {})
            } else {
                self.exchange_step(step, batch, ex)?
            };
            self.opt.step(&mut self.params, &self.grad)?;
            if local_sgd && (step + 1).is_multiple_of(self.cfg.cluster.average_every as u64) {
                timed(&mut self.exchange_spent, || ex.average_params(step, &mut self.params))?;
            }
            if !loss.is_finite() {
                return Err(JobError::NotFinite { step, loss });
            }
            self.pos.step += 1;
            let i = self.finish_step();
            loss_sum += loss as f64;
            samples += batch.rows() as u64;
            self.count_traffic(ex.take_traffic());
            self.progress(&mut window, epoch, i, loss, obs);
            self.evaluate_within_epoch(rank, epoch, i, loss, obs);
            if self.stop_requested() {
                break;
            }
        }
        if local_sgd {
            // The epoch ends on averaged parameters, whatever the phase of the averaging period.
            let step = self.pos.step;
            timed(&mut self.exchange_spent, || ex.average_params(step, &mut self.params))?;
        }
        Ok((
            loss_sum / (samples / self.local_batch().max(1) as u64).max(1) as f64,
            samples,
        ))
    }

    /// Gathers this worker's rows of the plan's step `done + ahead` into
    /// `batch`; false when the epoch's plan has no such step.
    fn take_batch(&mut self, ahead: u64, batch: &mut Batch) -> bool {
        let Some(rows) = self.plan.as_ref().and_then(|p| p.batch(self.rank, ahead)) else {
            return false;
        };
        self.batch_rows.clear();
        let data = &self.data;
        self.batch_rows.extend(rows.iter().map(|&r| data.local_row(r)));
        batch.gather(&self.data.train, &self.batch_rows);
        true
    }

    /// Advances the plan past a step every worker took; returns the step's index in the epoch.
    fn finish_step(&mut self) -> u64 {
        let plan = self.plan.as_mut().expect("a step runs inside an epoch's plan");
        plan.advance();
        self.steps_before_plan + plan.done() - 1
    }

    /// This worker's rows per step.
    fn local_batch(&self) -> usize {
        self.plan
            .as_ref()
            .map_or_else(|| self.fresh_plan(0).batch_rows(self.rank), |p| p.batch_rows(self.rank))
    }

    /// The current epoch's steps in all (`steps_before_plan` plus the plan's).
    fn epoch_steps(&self) -> u64 {
        self.steps_before_plan + self.plan.as_ref().map_or(0, EpochPlan::steps)
    }

    /// Counts a finished step into the progress window; reports it every
    /// `PROGRESS_EVERY_STEPS` steps and at the epoch's end.
    fn progress(&mut self, window: &mut (Instant, u64), epoch: u32, i: u64, loss: f32, obs: &mut dyn Observer) {
        // Global rows: the throughput of the whole job.
        window.1 += self.cfg.train.batch_size as u64;
        let steps = self.epoch_steps();
        if (i + 1).is_multiple_of(PROGRESS_EVERY_STEPS) || i + 1 == steps {
            let secs = window.0.elapsed().as_secs_f64().max(1e-9);
            obs.report(&Report::Step(StepReport {
                rank: self.rank,
                epoch: epoch + 1,
                step_in_epoch: i + 1,
                steps_per_epoch: steps,
                loss,
                samples_per_s: window.1 as f64 / secs,
                comm: self.traffic_report(SINCE_STEP_REPORT),
            }));
            *window = (Instant::now(), 0);
        }
    }

    /// Adds one step's traffic to every window.
    fn count_traffic(&mut self, t: Option<Traffic>) {
        if let Some(mut t) = t {
            t.steps = 1;
            for w in &mut self.traffic {
                w.add(&t);
            }
        }
    }

    /// Means of window `which` (`None` when it counted nothing), which restarts.
    fn traffic_report(&mut self, which: usize) -> Option<crate::report::CommReport> {
        debug_assert_ne!(which, TOTAL);
        let w = std::mem::take(&mut self.traffic[which]);
        (w.steps > 0).then(|| w.report(&self.traffic[TOTAL]))
    }

    /// `train.eval_every_steps`: rank 0 evaluates after every that many steps
    /// and reports an `eval` line, except where the epoch's own evaluation
    /// comes next. `wall_s` is taken before evaluating and `eval_s` counts the
    /// evaluations before this one, so `wall_s − eval_s` is the training time
    /// at which the parameters had this accuracy.
    fn evaluate_within_epoch(&mut self, rank: u32, epoch: u32, i: u64, loss: f32, obs: &mut dyn Observer) {
        self.eval_window.0 += f64::from(loss);
        self.eval_window.1 += 1;
        let every = self.cfg.train.eval_every_steps;
        if rank != 0 || every == 0 || !self.pos.step.is_multiple_of(every) {
            return;
        }
        let epoch_end = i + 1 == self.epoch_steps() || self.stop_requested();
        let epoch_eval = epoch + 1 == self.cfg.train.epochs
            || (epoch + 1).is_multiple_of(self.cfg.train.eval_every_epochs)
            || self.stop_requested();
        if epoch_end && epoch_eval {
            return;
        }
        let (loss_sum, steps) = std::mem::take(&mut self.eval_window);
        let mut report = EpochReport {
            epoch: epoch + 1,
            step: self.pos.step,
            train_loss: loss_sum / steps.max(1) as f64,
            samples_per_s: 0.0,
            wall_s: self.started.elapsed().as_secs_f64(),
            test_acc: None,
            test_auc: None,
            test_logloss: None,
            bayes_auc: None,
            eval_s: self.eval_s,
            comm: self.traffic_report(SINCE_REPORT),
            step_time: None,
        };
        let train_s = report.wall_s - self.eval_s;
        report.samples_per_s = self.pos.step as f64 * self.cfg.train.batch_size as f64 / train_s.max(1e-9);
        let eval_started = Instant::now();
        self.evaluate(&mut report);
        self.eval_s += eval_started.elapsed().as_secs_f64();
        obs.report(&Report::Eval(report));
    }

    /// One epoch against parameter servers: pull the batch's rows, compute,
    /// push the gradient. Step k+1's pull is sent before step k computes.
    fn run_epoch_remote(
        &mut self,
        epoch: u32,
        batch: &mut Batch,
        remote: &mut PsExchange,
        obs: &mut dyn Observer,
    ) -> Result<(f64, u64), JobError> {
        let has_dense = self.model.layout().tensors().iter().any(|t| t.kind == ParamKind::Dense);
        let mut next = Batch::for_dataset(&self.data.train);
        let mut rows = Vec::new();
        let (mut loss_sum, mut samples) = (0.0f64, 0u64);
        let mut window = (Instant::now(), 0u64);
        if !self.take_batch(0, batch) {
            return Ok((0.0, 0));
        }
        self.model.touched_rows(batch, &mut rows);
        let step = self.pos.step;
        timed(&mut self.exchange_spent, || {
            remote.pull_start(step, &rows, has_dense, false)
        })?;
        loop {
            let step = self.pos.step;
            timed(&mut self.exchange_spent, || remote.pull_finish(&mut self.params))?;
            let stop = self.cfg.train.max_steps > 0 && step + 1 >= self.cfg.train.max_steps;
            let last = stop || !self.take_batch(1, &mut next);
            if !last {
                self.model.touched_rows(&next, &mut rows);
                timed(&mut self.exchange_spent, || {
                    remote.pull_start(step + 1, &rows, has_dense, false)
                })?;
            }
            let loss = self
                .model
                .forward_backward(&self.params, batch, &mut self.grad, &mut |_, _| {});
            // Before the push: the shards refuse a non-finite gradient, and the
            // cause to report is this worker's diverged loss.
            if !loss.is_finite() {
                return Err(JobError::NotFinite { step, loss });
            }
            timed(&mut self.exchange_spent, || remote.push(step, &self.grad))?;
            self.count_traffic(remote.take_traffic());
            std::mem::swap(batch, &mut next);
            self.pos.step += 1;
            let i = self.finish_step();
            loss_sum += loss as f64;
            samples += next.rows() as u64;
            self.progress(&mut window, epoch, i, loss, obs);
            if last {
                break;
            }
        }
        Ok((
            loss_sum / (samples / self.local_batch().max(1) as u64).max(1) as f64,
            samples,
        ))
    }

    /// Backward pass with gradients handed to the exchange as they become final.
    fn exchange_step(&mut self, step: u64, batch: &Batch, ex: &mut dyn Exchange) -> Result<f32, JobError> {
        if !ex.overlaps() {
            let loss = self
                .model
                .forward_backward(&self.params, batch, &mut self.grad, &mut |_, _| {});
            if self.weight != 1.0 {
                self.grad.dense.iter_mut().for_each(|g| *g *= self.weight);
            }
            timed(&mut self.exchange_spent, || {
                ex.allreduce_gradient(step, &mut self.grad.dense)
            })?;
            return Ok(loss);
        }
        let mut failed = None;
        let weight = self.weight;
        let scaled = &mut self.scaled;
        let spent = &mut self.exchange_spent;
        let loss = self
            .model
            .forward_backward(&self.params, batch, &mut self.grad, &mut |range, values| {
                if failed.is_some() {
                    return;
                }
                let values = if weight == 1.0 {
                    values
                } else {
                    scaled.clear();
                    scaled.extend(values.iter().map(|v| v * weight));
                    &scaled[..]
                };
                if let Err(e) = timed(spent, || ex.gradient_ready(step, range, values)) {
                    failed = Some(e);
                }
            });
        if let Some(e) = failed {
            return Err(e);
        }
        timed(&mut self.exchange_spent, || {
            ex.finish_gradients(step, &mut self.grad.dense)
        })?;
        Ok(loss)
    }

    /// Rank 0, after the last epoch and every `eval_every_epochs`: fills the
    /// test metrics of the `report` of the epoch just trained, and its `eval_s`.
    fn evaluate_if_due(&mut self, report: &mut EpochReport, ex: &mut dyn Exchange) -> Result<(), JobError> {
        let last_epoch = self.training_over();
        if ex.rank() == 0 && (last_epoch || self.pos.epoch.is_multiple_of(self.cfg.train.eval_every_epochs)) {
            let eval_started = Instant::now();
            match ex.remote() {
                Some(remote) => self.evaluate_remote(report, remote)?,
                None => self.evaluate(report),
            }
            self.eval_s += eval_started.elapsed().as_secs_f64();
        }
        report.eval_s = self.eval_s;
        Ok(())
    }

    /// Fills the test metrics of `report`.
    fn evaluate(&mut self, report: &mut EpochReport) {
        // Without servers there is nothing to pull: the closure never fails.
        let _ = self.evaluate_with(report, &mut |_, _, _| Ok(()));
    }

    /// Fills the test metrics of `report` from the servers' current values:
    /// each test batch's rows are pulled once every worker has pushed as many
    /// steps as this one.
    fn evaluate_remote(&mut self, report: &mut EpochReport, remote: &mut PsExchange) -> Result<(), JobError> {
        let clock = self.pos.step;
        let mut rows = Vec::new();
        let mut first = true;
        self.evaluate_with(report, &mut |model, batch, params| {
            model.touched_rows(batch, &mut rows);
            remote.pull_start(clock, &rows, std::mem::take(&mut first), true)?;
            remote.pull_finish(params)
        })
    }

    /// Predicts the test set batch by batch, calling `fetch` before each batch.
    fn evaluate_with(&mut self, report: &mut EpochReport, fetch: &mut Fetch<'_>) -> Result<(), JobError> {
        let Some(test) = self.data.test.as_ref() else {
            return Ok(());
        };
        let classes = self.model.num_classes();
        let mut batch = Batch::for_dataset(test);
        let mut out = Vec::new();
        let mut probs = Vec::with_capacity(test.rows() * if classes > 2 { classes } else { 1 });
        let idx: Vec<usize> = (0..test.rows()).collect();
        for chunk in idx.chunks(EVAL_BATCH_ROWS) {
            batch.gather(test, chunk);
            fetch(self.model.as_ref(), &batch, &mut self.params)?;
            self.model.predict(&self.params, &batch, &mut out);
            probs.extend_from_slice(&out);
        }
        if classes > 2 {
            report.test_acc = Some(model::metrics::accuracy(&probs, classes, &test.labels));
        } else {
            report.test_auc = Some(model::metrics::auc(&probs, &test.labels));
            report.test_logloss = Some(model::metrics::log_loss(&probs, &test.labels));
            let correct = probs
                .iter()
                .zip(&test.labels)
                .filter(|(p, y)| (**p >= 0.5) == (**y == 1))
                .count();
            report.test_acc = Some(correct as f64 / test.rows().max(1) as f64);
        }
        Ok(())
    }
}

/// The first bytes of [`Trainer::export_state`]'s form (and its version).
const STATE_MAGIC: &[u8; 8] = b"SNTSTAT1";

fn put(w: &mut Vec<u8>, x: u64) {
    w.extend_from_slice(&x.to_le_bytes());
}

/// Reads [`Trainer::export_state`]'s form; every error says what was short or too big.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("ends at byte {} of a {}-byte field", self.bytes.len(), n))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    /// A length, at most `max`.
    fn len(&mut self, max: usize) -> Result<usize, String> {
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| format!("length {n} over the limit {max}"))
    }

    /// A length-prefixed f32 vector that must hold exactly `expect` values.
    fn floats(&mut self, expect: usize) -> Result<Vec<f32>, String> {
        let n = self.u64()?;
        if n != expect as u64 {
            return Err(format!("{n} values where this model has {expect}"));
        }
        Ok(self
            .take(expect * 4)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
}

fn model_kind(cfg: &JobConfig) -> String {
    serde_json::to_value(&cfg.model)
        .ok()
        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Max over mean of rows and of non-zeros across partitions `parts` (global
/// row ranges, as [`data::partitions`] cuts them), given each one's non-zeros
/// (`None`: unknown, and so is their skew).
pub fn partition_skew(parts: &[Range<usize>], nnz: Option<&[u64]>) -> (f64, Option<f64>) {
    let ratio = |v: &[f64]| {
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        if mean > 0.0 {
            v.iter().cloned().fold(0.0, f64::max) / mean
        } else {
            1.0
        }
    };
    let rows: Vec<f64> = parts.iter().map(|r| r.len() as f64).collect();
    let nnz = nnz.map(|n| ratio(&n.iter().map(|&x| x as f64).collect::<Vec<f64>>()));
    (ratio(&rows), nnz)
}

/// FNV-1a over the parameter bits: equal on every rank iff the parameters are bitwise equal
/// (up to a 2^-64 chance).
pub fn checksum(params: &[f32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in params {
        h ^= p.to_bits() as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Time spent in a phase: wall, and the CPU time of the thread that ran it.
#[derive(Clone, Copy, Debug, Default)]
struct Spent {
    wall: Duration,
    cpu: Duration,
}

/// Runs `f`, adding its wall and thread CPU time to `spent` (two clock reads
/// a call; the thread clock is a system call).
fn timed<T>(spent: &mut Spent, f: impl FnOnce() -> T) -> T {
    let (t, c) = (Instant::now(), cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID));
    let out = f();
    spent.wall += t.elapsed();
    spent.cpu += cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID).saturating_sub(c);
    out
}

/// CPU time so far of `clock`: this process (`CLOCK_PROCESS_CPUTIME_ID`, all
/// threads) or this thread. Zero if the clock cannot be read.
pub(crate) fn cpu_clock(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec.max(0) as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32)
}

/// The mean step of an epoch of `steps` steps (`None` without steps), from
/// its wall time, the exchange's share, and the CPU time of the process and
/// of the training thread.
fn step_time(steps: u64, train: Duration, exchange: Spent, cpu: Duration, thread_cpu: Duration) -> Option<StepTime> {
    if steps == 0 {
        return None;
    }
    let per_step_ms = |d: Duration| d.as_secs_f64() * 1e3 / steps as f64;
    Some(StepTime {
        steps,
        exchange_ms: per_step_ms(exchange.wall),
        exchange_cpu_ms: per_step_ms(exchange.cpu),
        compute_ms: per_step_ms(train.saturating_sub(exchange.wall)),
        compute_cpu_ms: per_step_ms(thread_cpu.saturating_sub(exchange.cpu)),
        cpu_ms: per_step_ms(cpu),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_comes_from_the_plan_partitions_and_unknown_non_zeros_stay_unknown() {
        // A global batch of 3 over 2 workers: local batches 2 and 1, rows shared 2:1.
        let parts = data::partitions(300, 2, 3);
        assert_eq!(parts, vec![0..200, 200..300]);
        let (rows, nnz) = partition_skew(&parts, Some(&[100, 300]));
        assert!((rows - 200.0 / 150.0).abs() < 1e-12, "{rows}");
        assert_eq!(nnz, Some(1.5));
        assert_eq!(partition_skew(&parts, None).1, None);
    }

    /// One rank whose end-of-epoch parameter check fails once, as when a peer
    /// is lost just as an epoch ends and an elastic job regroups.
    struct LosesAPeerAtEpochEnd {
        failed: bool,
    }

    impl Exchange for LosesAPeerAtEpochEnd {
        fn rank(&self) -> u32 {
            0
        }
        fn world(&self) -> u32 {
            1
        }
        fn gradient_ready(&mut self, _: u64, _: Range<usize>, _: &[f32]) -> Result<(), JobError> {
            Ok(())
        }
        fn finish_gradients(&mut self, _: u64, _: &mut [f32]) -> Result<(), JobError> {
            Ok(())
        }
        fn allreduce_gradient(&mut self, _: u64, _: &mut [f32]) -> Result<(), JobError> {
            Ok(())
        }
        fn average_params(&mut self, _: u64, _: &mut [f32]) -> Result<(), JobError> {
            Ok(())
        }
        fn verify_identical(&mut self, _: u32, _: u64) -> Result<(), JobError> {
            if std::mem::replace(&mut self.failed, true) {
                return Ok(());
            }
            Err(JobError::Peer {
                rank: 1,
                why: "connection reset".into(),
            })
        }
    }

    struct Lines(Vec<Report>);

    impl crate::report::Observer for Lines {
        fn report(&mut self, r: &Report) {
            self.0.push(r.clone());
        }
    }

    // issue 6: an epoch whose end coincides with a regroup still gets its line.
    #[test]
    fn an_epoch_ended_by_a_regroup_is_reported_by_the_next_generation() {
        let text = "[data]\ntrain = \"unused\"\n[model]\nkind = \"softmax\"\n[optim]\nkind = \"sgd\"\nlr = 0.1\n\
                    [train]\nbatch_size = 8\nepochs = 2\n";
        let cfg = JobConfig::parse(text, Path::new("<test>"), &[]).expect("config");
        let rows = 64;
        let values = (0..rows * 2).map(|i| (i % 7) as f32 - 3.0).collect();
        let train = Dataset {
            features: data::Features::Dense { dim: 2, values },
            labels: (0..rows as u32).map(|r| r % 2).collect(),
            num_classes: 2,
        };
        let mut trainer = Trainer::new(cfg, JobData::whole(train, None, None), 0, 1).expect("trainer");
        let mut ex = LosesAPeerAtEpochEnd { failed: false };
        let mut lines = Lines(Vec::new());
        assert!(
            trainer.run(&mut ex, &mut lines).is_err(),
            "the first generation ends in a regroup"
        );
        assert_eq!(trainer.position().epoch, 1);
        trainer.run(&mut ex, &mut lines).expect("the next generation finishes");
        let epochs: Vec<&EpochReport> = lines
            .0
            .iter()
            .filter_map(|r| match r {
                Report::Epoch(e) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(
            epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(),
            vec![1, 2],
            "{epochs:?}"
        );
        assert_eq!(epochs[0].step, 8, "{:?}", epochs[0]);
        assert!(
            epochs[0].train_loss.is_finite() && epochs[0].samples_per_s > 0.0,
            "{:?}",
            epochs[0]
        );
    }

    #[test]
    fn checksum_sees_one_bit() {
        let a = vec![1.0f32, 2.0, 3.0];
        let mut b = a.clone();
        b[1] = f32::from_bits(b[1].to_bits() ^ 1);
        assert_ne!(checksum(&a), checksum(&b));
    }
}
