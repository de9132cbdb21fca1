//! The training loop of one worker: its data partition, the model, the
//! optimizer, evaluation and checkpoints. How gradients meet the other
//! workers' is behind [`Exchange`]: nothing for a single process, ring
//! all-reduce over TCP for a cluster.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use data::{Batch, Dataset};
use model::Model;
use serde::Serialize;
use tensor::{Gradient, ParamKind, Rng};

use crate::config::{JobConfig, SyncMode};
use crate::error::JobError;
use crate::ps_client::PsExchange;
use crate::report::{EpochReport, Observer, Report, StepReport, Traffic};
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
}

/// The loaded data of a job.
pub struct JobData {
    pub train: Dataset,
    pub test: Option<Dataset>,
    /// Extra facts about the data to report (e.g. a generator's Bayes AUC).
    pub meta: Option<serde_json::Value>,
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Summary {
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

/// The rows, steps and batch size of one worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rows: Range<usize>,
    pub local_batch: usize,
    pub steps_per_epoch: u64,
}

impl Shard {
    /// Splits `total_rows` into `world` contiguous balanced partitions and a
    /// global batch into local batches. Every rank computes the same
    /// `steps_per_epoch` (the last incomplete global batch is dropped), which
    /// the lock-step all-reduce relies on.
    pub fn new(total_rows: usize, world: u32, rank: u32, global_batch: usize) -> Self {
        let w = world as usize;
        let parts = tensor::shard_ranges(total_rows, w);
        let local = tensor::shard_ranges(global_batch, w);
        let steps = (0..w)
            .map(|r| parts[r].len() / local[r].len().max(1))
            .min()
            .unwrap_or(0);
        Self {
            rows: parts[rank as usize].clone(),
            local_batch: local[rank as usize].len(),
            steps_per_epoch: steps as u64,
        }
    }
}

/// One worker's training state.
pub struct Trainer {
    cfg: JobConfig,
    model: Box<dyn Model>,
    params: Vec<f32>,
    grad: Gradient,
    opt: optim::Optimizer,
    data: JobData,
    shard: Shard,
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
        let shard = Shard::new(data.train.rows(), world, rank, cfg.train.batch_size);
        if shard.steps_per_epoch == 0 {
            return Err(JobError::Config {
                path: PathBuf::from("<config>"),
                why: format!(
                    "{} training rows are too few for a global batch of {} over {world} workers",
                    data.train.rows(),
                    cfg.train.batch_size
                ),
            });
        }
        let weight = shard.local_batch as f32 / cfg.train.batch_size as f32;
        Ok(Self {
            cfg,
            model,
            params,
            grad,
            opt,
            data,
            shard,
            pos: Position::default(),
            weight,
            scaled: Vec::new(),
            traffic: Default::default(),
            started: Instant::now(),
            eval_s: 0.0,
            eval_window: (0.0, 0),
        })
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn position(&self) -> Position {
        self.pos
    }

    pub fn shard(&self) -> &Shard {
        &self.shard
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
        let end = self.shard.rows.start + sample_rows.min(self.shard.rows.len());
        let idx: Vec<usize> = (self.shard.rows.start..end).collect();
        // Counted per training batch: a shard's key load is the number of
        // requests (batches) that carry the key.
        for chunk in idx.chunks(self.shard.local_batch.max(1)) {
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
        self.pos = restored.position;
        Ok(restored)
    }

    /// Runs the remaining epochs.
    pub fn run(&mut self, ex: &mut dyn Exchange, obs: &mut dyn Observer) -> Result<Summary, JobError> {
        let started = Instant::now();
        self.started = started;
        let epochs = self.cfg.train.epochs;
        let mut batch = Batch::for_dataset(&self.data.train);
        let mut last = None;
        let mut checkpoint = None;
        let skew = partition_skew(&self.data.train, ex.world());
        obs.report(&Report::Start {
            rank: ex.rank(),
            world: ex.world(),
            epochs,
            steps_per_epoch: self.shard.steps_per_epoch,
            params: self.params.len(),
            start_epoch: self.pos.epoch,
            rows_max_over_mean: skew.0,
            nnz_max_over_mean: skew.1,
        });
        while self.pos.epoch < epochs {
            let epoch = self.pos.epoch;
            let epoch_started = Instant::now();
            let (loss, samples) = self.run_epoch(epoch, &mut batch, ex, obs)?;
            let epoch_train_s = epoch_started.elapsed().as_secs_f64();
            self.pos.epoch += 1;
            ex.verify_identical(epoch, checksum(&self.params))?;
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
            };
            let last_epoch = self.pos.epoch == epochs || self.stop_requested();
            if ex.rank() == 0 && (last_epoch || self.pos.epoch.is_multiple_of(self.cfg.train.eval_every_epochs)) {
                let eval_started = Instant::now();
                match ex.remote() {
                    Some(remote) => self.evaluate_remote(&mut report, remote)?,
                    None => self.evaluate(&mut report),
                }
                self.eval_s += eval_started.elapsed().as_secs_f64();
            }
            report.eval_s = self.eval_s;
            let ck = &self.cfg.checkpoint;
            let checkpoint_due = ck.dir.is_some() && (last_epoch || self.pos.epoch.is_multiple_of(ck.every_epochs));
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
                let (params, opt) = match &remote {
                    Some((p, o)) => (&p[..], o),
                    None => (&self.params[..], &self.opt),
                };
                checkpoint = Some(state::save(
                    &dir,
                    ck.keep_last,
                    &self.cfg,
                    self.model.layout(),
                    params,
                    opt,
                    self.pos,
                    &exchange_state,
                )?);
            }
            report.wall_s = started.elapsed().as_secs_f64();
            self.eval_window = (0.0, 0);
            obs.report(&Report::Epoch(report.clone()));
            last = Some(report);
            if self.stop_requested() {
                break;
            }
        }
        if let Some(remote) = ex.remote() {
            remote.flush(self.pos.step)?;
        }
        Ok(Summary {
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

    fn stop_requested(&self) -> bool {
        self.cfg.train.max_steps > 0 && self.pos.step >= self.cfg.train.max_steps
    }

    /// One epoch over this worker's partition; returns (mean loss, samples seen by this worker).
    fn run_epoch(
        &mut self,
        epoch: u32,
        batch: &mut Batch,
        ex: &mut dyn Exchange,
        obs: &mut dyn Observer,
    ) -> Result<(f64, u64), JobError> {
        let order = self.epoch_order(epoch);
        let (rank, world) = (ex.rank(), ex.world());
        if let Some(remote) = ex.remote() {
            return self.run_epoch_remote(epoch, &order, batch, rank, world, remote, obs);
        }
        let lb = self.shard.local_batch;
        let local_sgd = self.cfg.cluster.sync == SyncMode::LocalSgd && ex.world() > 1;
        let mut loss_sum = 0.0f64;
        let mut samples = 0u64;
        let mut window = (Instant::now(), 0u64);
        for i in 0..self.shard.steps_per_epoch {
            let idx = &order[i as usize * lb..(i as usize + 1) * lb];
            batch.gather(&self.data.train, idx);
            let step = self.pos.step;
            let loss = if local_sgd || ex.world() == 1 {
                self.model
                    .forward_backward(&self.params, batch, &mut self.grad, &mut |_, _| {})
            } else {
                self.exchange_step(step, batch, ex)?
            };
            self.opt.step(&mut self.params, &self.grad)?;
            if local_sgd && (step + 1).is_multiple_of(self.cfg.cluster.average_every as u64) {
                ex.average_params(step, &mut self.params)?;
            }
            if !loss.is_finite() {
                return Err(JobError::NotFinite { step, loss });
            }
            self.pos.step += 1;
            loss_sum += loss as f64;
            samples += lb as u64;
            self.count_traffic(ex.take_traffic());
            self.progress(&mut window, (rank, world), epoch, i, loss, obs);
            self.evaluate_within_epoch(rank, epoch, i, loss, obs);
            if self.stop_requested() {
                break;
            }
        }
        if local_sgd {
            // The epoch ends on averaged parameters, whatever the phase of the averaging period.
            ex.average_params(self.pos.step, &mut self.params)?;
        }
        let steps = (samples / lb as u64).max(1);
        Ok((loss_sum / steps as f64, samples))
    }

    /// This worker's rows of the training set in epoch `epoch`'s order.
    fn epoch_order(&self, epoch: u32) -> Vec<usize> {
        let mut order: Vec<usize> = self.shard.rows.clone().collect();
        Rng::derive(self.cfg.train.seed, 0xE90C ^ ((epoch as u64) << 20)).shuffle(&mut order);
        order
    }

    /// Counts a finished step into the progress window; reports it every
    /// `PROGRESS_EVERY_STEPS` steps and at the epoch's end.
    fn progress(
        &mut self,
        window: &mut (Instant, u64),
        (rank, world): (u32, u32),
        epoch: u32,
        i: u64,
        loss: f32,
        obs: &mut dyn Observer,
    ) {
        window.1 += self.shard.local_batch as u64;
        if (i + 1).is_multiple_of(PROGRESS_EVERY_STEPS) || i + 1 == self.shard.steps_per_epoch {
            let secs = window.0.elapsed().as_secs_f64().max(1e-9);
            obs.report(&Report::Step(StepReport {
                rank,
                epoch: epoch + 1,
                step_in_epoch: i + 1,
                steps_per_epoch: self.shard.steps_per_epoch,
                loss,
                samples_per_s: window.1 as f64 * world as f64 / secs,
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
        let epoch_end = i + 1 == self.shard.steps_per_epoch || self.stop_requested();
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
    #[allow(clippy::too_many_arguments)]
    fn run_epoch_remote(
        &mut self,
        epoch: u32,
        order: &[usize],
        batch: &mut Batch,
        rank: u32,
        world: u32,
        remote: &mut PsExchange,
        obs: &mut dyn Observer,
    ) -> Result<(f64, u64), JobError> {
        let lb = self.shard.local_batch;
        let steps = self.shard.steps_per_epoch as usize;
        let has_dense = self.model.layout().tensors().iter().any(|t| t.kind == ParamKind::Dense);
        let mut next = Batch::for_dataset(&self.data.train);
        let mut rows = Vec::new();
        let (mut loss_sum, mut samples) = (0.0f64, 0u64);
        let mut window = (Instant::now(), 0u64);
        batch.gather(&self.data.train, &order[..lb]);
        self.model.touched_rows(batch, &mut rows);
        remote.pull_start(self.pos.step, &rows, has_dense, false)?;
        for i in 0..steps {
            let step = self.pos.step;
            remote.pull_finish(&mut self.params)?;
            let last = i + 1 == steps || (self.cfg.train.max_steps > 0 && step + 1 >= self.cfg.train.max_steps);
            if !last {
                next.gather(&self.data.train, &order[(i + 1) * lb..(i + 2) * lb]);
                self.model.touched_rows(&next, &mut rows);
                remote.pull_start(step + 1, &rows, has_dense, false)?;
            }
            let loss = self
                .model
                .forward_backward(&self.params, batch, &mut self.grad, &mut |_, _| {});
            remote.push(step, &self.grad)?;
            self.count_traffic(remote.take_traffic());
            std::mem::swap(batch, &mut next);
            if !loss.is_finite() {
                return Err(JobError::NotFinite { step, loss });
            }
            self.pos.step += 1;
            loss_sum += loss as f64;
            samples += lb as u64;
            self.progress(&mut window, (rank, world), epoch, i as u64, loss, obs);
            if last {
                break;
            }
        }
        let steps = (samples / lb as u64).max(1);
        Ok((loss_sum / steps as f64, samples))
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
            ex.allreduce_gradient(step, &mut self.grad.dense)?;
            return Ok(loss);
        }
        let mut failed = None;
        let weight = self.weight;
        let scaled = &mut self.scaled;
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
                if let Err(e) = ex.gradient_ready(step, range, values) {
                    failed = Some(e);
                }
            });
        if let Some(e) = failed {
            return Err(e);
        }
        ex.finish_gradients(step, &mut self.grad.dense)?;
        Ok(loss)
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

fn model_kind(cfg: &JobConfig) -> String {
    serde_json::to_value(&cfg.model)
        .ok()
        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Max over mean of rows and of non-zeros across the `world` contiguous
/// partitions that [`Shard::new`] cuts.
pub fn partition_skew(ds: &Dataset, world: u32) -> (f64, f64) {
    let parts = tensor::shard_ranges(ds.rows(), world as usize);
    let rows: Vec<f64> = parts.iter().map(|r| r.len() as f64).collect();
    let nnz: Vec<f64> = parts
        .iter()
        .map(|r| r.clone().map(|i| ds.row_nnz(i) as f64).sum())
        .collect();
    let ratio = |v: &[f64]| {
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        if mean > 0.0 {
            v.iter().cloned().fold(0.0, f64::max) / mean
        } else {
            1.0
        }
    };
    (ratio(&rows), ratio(&nnz))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_agree_on_steps_and_cover_the_batch() {
        for (rows, world, batch) in [(60_000, 2, 128), (60_000, 3, 128), (1000, 4, 7), (10, 1, 3)] {
            let shards: Vec<Shard> = (0..world).map(|r| Shard::new(rows, world, r, batch)).collect();
            let steps = shards[0].steps_per_epoch;
            assert!(shards.iter().all(|s| s.steps_per_epoch == steps));
            assert_eq!(shards.iter().map(|s| s.local_batch).sum::<usize>(), batch);
            assert!(
                shards
                    .iter()
                    .all(|s| s.local_batch as u64 * steps <= s.rows.len() as u64)
            );
        }
        assert_eq!(Shard::new(60_000, 2, 0, 128).steps_per_epoch, 468);
    }

    #[test]
    fn checksum_sees_one_bit() {
        let a = vec![1.0f32, 2.0, 3.0];
        let mut b = a.clone();
        b[1] = f32::from_bits(b[1].to_bits() ^ 1);
        assert_ne!(checksum(&a), checksum(&b));
    }
}
