//! One parameter-server shard as an engine: it takes decoded pulls and
//! pushes and returns replies; the runtime owns the sockets.
//!
//! Consistency is a rule about when a pull may be answered. Each worker's
//! clock is the number of steps it has pushed; a pull carries the step it
//! reads for. With `visible` = the number of steps every worker's update is
//! in (BSP: steps applied; SSP and async: the slowest worker's clock):
//! - BSP: answer when `visible ≥ clock` (one step, summed over workers, is
//!   applied as one optimizer step once every worker has pushed it);
//! - SSP with bound s: answer when `visible + s ≥ clock`; each push is
//!   applied on arrival as its own optimizer step;
//! - async: answer at once.
//!
//! A pull that may not be answered yet is deferred and answered by the push
//! that makes it visible. The slowest worker is never starved: its own pull
//! has `clock = visible`. The staleness of every answered pull,
//! `clock − visible`, is recorded in a histogram.
//!
//! **Invariant:** pushes from one worker arrive in clock order (0, 1, 2, …);
//! anything else is a protocol error naming the worker.
//!
//! Checkpoints under SSP and async are consistent cuts: at a checkpoint's
//! step C every worker sends a *cut barrier* (a `wait_all` snapshot pull at
//! offset [`CUT_BARRIER`]) before it pushes step C. The first barrier the
//! shard answers, which is when every worker's first C steps are in and
//! before any step C can be (its sender waits for this answer), saves the
//! shard's image as the cut of step C; the checkpoint's snapshot reads of
//! step C are answered from it, whatever the workers pushed since. (BSP needs
//! no barrier: step C is applied only once rank 0, which reads the snapshot
//! first, has pushed it.)
//!
//! A lost worker's replacement (elastic jobs, [`Shard::replace_worker`])
//! continues from the lowest of its predecessor's clocks over all shards, so a
//! shard that already took a step from the predecessor sees it again: such a
//! push is acknowledged and not applied, and only until the replacement has
//! caught up with this shard's clock. Each (worker, step) is applied once.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};
use tensor::{Layout, SparseRows};

use crate::error::PsError;
use crate::local::LocalLayout;
use crate::msg::{Pull, Push, WORKER_STATE_OFFSET};
use crate::placement::{Placement, mix64, split_key};

/// Staleness histogram: buckets 0..16 count staleness 0..15 exactly; bucket
/// 16 + k counts 2^(k+4) ..< 2^(k+5); the last bucket also takes anything larger.
pub const STALENESS_BUCKETS: usize = 44;

/// The histogram bucket of a staleness (see [`STALENESS_BUCKETS`]).
pub fn staleness_bucket(s: u64) -> usize {
    if s < 16 {
        return s as usize;
    }
    (16 + (63 - s.leading_zeros() as usize) - 4).min(STALENESS_BUCKETS - 1)
}

/// The smallest staleness bucket `b` counts.
pub fn staleness_bucket_floor(b: usize) -> u64 {
    if b < 16 { b as u64 } else { 1u64 << (b - 16 + 4) }
}

/// When a pull may be answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    /// Bulk-synchronous: every worker's step-k update before anyone reads step k+1.
    Bsp,
    /// Stale-synchronous: a worker may read up to `staleness` steps ahead of the slowest.
    Ssp { staleness: u32 },
    /// No waiting.
    Async,
}

/// A reply for the runtime to send.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    Pulled {
        worker: u32,
        req: u64,
        clock: u64,
        dense: Vec<f32>,
        values: Vec<f32>,
    },
    Pushed {
        worker: u32,
        clock: u64,
    },
}

/// Load and staleness seen by one shard.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardStats {
    pub pulls: u64,
    pub pushes: u64,
    /// Keys pulled plus keys pushed.
    pub keys: u64,
    /// Payload bytes received plus sent (keys and values).
    pub bytes: u64,
    /// Answered pulls by staleness (see [`STALENESS_BUCKETS`]); evaluation pulls are not counted.
    pub staleness: Vec<u64>,
    /// The largest staleness of any answered pull.
    pub staleness_max: u64,
    /// Most pulls deferred at once.
    pub deferred_max: u64,
    /// Optimizer steps applied.
    pub steps_applied: u64,
}

/// A fast hasher for integer keys (the keys are already spread by [`mix64`]).
#[derive(Default)]
pub struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = mix64(self.0 ^ *b as u64);
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.0 = mix64(i as u64);
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = mix64(i);
    }
}

pub type MixMap<K, V> = HashMap<K, V, BuildHasherDefault<MixHasher>>;

/// The snapshot offset of a cut barrier (see the module docs): a `wait_all`
/// pull at this offset with length 0 is answered, with no values, once every
/// worker has pushed `clock` steps, and saves the cut of step `clock`.
pub const CUT_BARRIER: u64 = u64::MAX;

/// The sum of every worker's push for one BSP step.
#[derive(Default)]
struct Pending {
    pushes: u32,
    dense: Vec<f32>,
    /// Per local table: local row → slot in `rows` / `values`.
    slots: Vec<MixMap<u32, u32>>,
    rows: Vec<Vec<u32>>,
    values: Vec<Vec<f32>>,
}

pub struct Shard {
    index: u32,
    workers: u32,
    consistency: Consistency,
    map: LocalLayout,
    values: Vec<f32>,
    opt: optim::Optimizer,
    /// Steps pushed, per worker.
    clocks: Vec<u64>,
    /// BSP: steps applied.
    applied: u64,
    pending: BTreeMap<u64, Pending>,
    deferred: Vec<(u32, Pull)>,
    /// Per worker: replaced, and not yet caught up with its clock here (see the module docs).
    replaced: Vec<bool>,
    /// The last checkpoint cut: its step and the shard's image then.
    cut: Option<(u64, Vec<f32>)>,
    stats: ShardStats,
    /// Scratch for building the optimizer's sparse rows.
    scratch: Vec<SparseRows>,
    /// Per worker: its state for the next checkpoint (error-feedback residual
    /// over the dense part; empty when it keeps none) and the pushes it had
    /// made. Kept for the checkpoint's writer, never applied.
    worker_states: Vec<Option<(u64, Vec<f32>)>>,
}

impl Shard {
    /// Shard `index` of `placement`, holding the values `init` (a local buffer, see
    /// [`LocalLayout::gather`]) and a fresh optimizer.
    pub fn new(
        index: u32,
        workers: u32,
        consistency: Consistency,
        optim: &optim::OptimConfig,
        layout: &Layout,
        placement: &Placement,
        init: Vec<f32>,
    ) -> Result<Self, PsError> {
        if index >= placement.shards() || workers == 0 {
            return Err(PsError::Placement(format!(
                "shard {index} of {} with {workers} workers",
                placement.shards()
            )));
        }
        let map = LocalLayout::new(layout, placement, index);
        if init.len() != map.local.len() {
            return Err(PsError::Placement(format!(
                "shard {index} holds {} values; got {} to start from",
                map.local.len(),
                init.len()
            )));
        }
        let opt = optim::Optimizer::new(optim, &map.local)?;
        let scratch = map
            .tables
            .iter()
            .map(|t| SparseRows {
                tensor: t.local_tensor,
                row_len: t.row_len,
                ..SparseRows::default()
            })
            .collect();
        Ok(Self {
            index,
            workers,
            consistency,
            map,
            values: init,
            opt,
            clocks: vec![0; workers as usize],
            applied: 0,
            pending: BTreeMap::new(),
            deferred: Vec::new(),
            replaced: vec![false; workers as usize],
            cut: None,
            stats: ShardStats {
                staleness: vec![0; STALENESS_BUCKETS],
                ..ShardStats::default()
            },
            scratch,
            worker_states: vec![None; workers as usize],
        })
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn layout(&self) -> &LocalLayout {
        &self.map
    }

    /// The shard's values (local layout).
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    pub fn optimizer(&self) -> &optim::Optimizer {
        &self.opt
    }

    pub fn stats(&self) -> &ShardStats {
        &self.stats
    }

    /// Steps whose every worker update is in the values.
    pub fn visible(&self) -> u64 {
        match self.consistency {
            Consistency::Bsp => self.applied,
            _ => self.clocks.iter().copied().min().unwrap_or(0),
        }
    }

    /// The shard's whole state as one buffer: its values, then every optimizer
    /// state tensor in [`optim::Optimizer::state_tensors`] order (the step
    /// count last). A worker that builds the same optimizer over the same
    /// local layout knows every part's name and length.
    pub fn image(&self) -> Vec<f32> {
        let mut out = self.values.clone();
        for (_, t) in self.opt.state_tensors() {
            out.extend_from_slice(t);
        }
        out
    }

    /// Elements in [`Shard::image`].
    pub fn image_len(&self) -> usize {
        self.values.len() + self.opt.state_tensors().iter().map(|(_, t)| t.len()).sum::<usize>()
    }

    /// Replaces values and optimizer state by an image (as [`Shard::image`] lays
    /// it out) and starts every worker's clock at `clock`, to resume a run.
    pub fn restore(&mut self, image: &[f32], clock: u64) -> Result<(), PsError> {
        if image.len() != self.image_len() {
            return Err(PsError::Placement(format!(
                "shard {} state holds {} values; the image has {}",
                self.index,
                self.image_len(),
                image.len()
            )));
        }
        let n = self.values.len();
        let mut at = n;
        let mut named: Vec<(String, &[f32])> = Vec::new();
        for (name, t) in self.opt.state_tensors() {
            named.push((name, &image[at..at + t.len()]));
            at += t.len();
        }
        self.opt.load_state(named)?;
        self.values.copy_from_slice(&image[..n]);
        self.clocks.iter_mut().for_each(|c| *c = clock);
        self.applied = clock;
        Ok(())
    }

    /// Steps this shard has taken from `worker` (the clock of its next push).
    pub fn clock(&self, worker: u32) -> Result<u64, PsError> {
        self.check_worker(worker)?;
        Ok(self.clocks[worker as usize])
    }

    /// Every worker's clock, by worker.
    pub fn clocks(&self) -> &[u64] {
        &self.clocks
    }

    /// BSP: steps applied (the other rules leave it at 0).
    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn consistency(&self) -> Consistency {
        self.consistency
    }

    /// Replaces values and optimizer state by an image and sets each worker's
    /// clock and the BSP steps applied: a replica built from another's state.
    pub fn restore_state(&mut self, image: &[f32], clocks: &[u64], applied: u64) -> Result<(), PsError> {
        if clocks.len() != self.clocks.len() {
            return Err(PsError::Placement(format!(
                "shard {} serves {} workers; the state names {}",
                self.index,
                self.clocks.len(),
                clocks.len()
            )));
        }
        self.restore(image, applied)?;
        self.clocks.copy_from_slice(clocks);
        self.pending.clear();
        self.deferred.clear();
        Ok(())
    }

    /// Replaces the values (local layout), keeping the optimizer state and clocks.
    pub fn restore_values(&mut self, values: &[f32]) -> Result<(), PsError> {
        if values.len() != self.values.len() {
            return Err(PsError::Placement(format!(
                "shard {} holds {} values; got {}",
                self.index,
                self.values.len(),
                values.len()
            )));
        }
        self.values.copy_from_slice(values);
        Ok(())
    }

    /// A new process takes the place of lost `worker`: its pulls waiting here
    /// are dropped (they would be answered to the replacement, which never
    /// asked), and pushes of steps this shard already has are acknowledged
    /// without being applied until the replacement catches up. Returns the
    /// worker's clock here: the first step this shard has not taken from it.
    pub fn replace_worker(&mut self, worker: u32) -> Result<u64, PsError> {
        self.check_worker(worker)?;
        self.deferred.retain(|(w, _)| *w != worker);
        self.replaced[worker as usize] = true;
        Ok(self.clocks[worker as usize])
    }

    /// Pulls waiting for a slower worker.
    pub fn deferred(&self) -> usize {
        self.deferred.len()
    }

    fn check_worker(&self, worker: u32) -> Result<(), PsError> {
        if worker >= self.workers {
            return Err(PsError::Protocol {
                worker,
                why: format!("no such worker (the job has {})", self.workers),
            });
        }
        Ok(())
    }

    fn may_answer(&self, worker: u32, p: &Pull) -> bool {
        if p.snapshot.is_some_and(|(offset, _)| offset == CUT_BARRIER) {
            return self.visible() >= p.clock;
        }
        if p.snapshot.is_some_and(|(offset, _)| offset >= WORKER_STATE_OFFSET) {
            return self.worker_states_ready(worker, p.clock);
        }
        let visible = self.visible();
        match (p.wait_all, self.consistency) {
            (true, _) | (false, Consistency::Bsp) => visible >= p.clock,
            (false, Consistency::Ssp { staleness }) => visible + staleness as u64 >= p.clock,
            (false, Consistency::Async) => true,
        }
    }

    /// A worker asks for values. Answered now, or later by the push that allows it.
    pub fn on_pull(&mut self, worker: u32, pull: Pull) -> Result<Vec<Output>, PsError> {
        self.check_worker(worker)?;
        // Refuse foreign keys now, not when the deferred pull is answered.
        for &k in &pull.keys {
            self.local_offset(worker, k)?;
        }
        self.stats.pulls += 1;
        if self.may_answer(worker, &pull) {
            return Ok(vec![self.answer(worker, pull)?]);
        }
        self.deferred.push((worker, pull));
        self.stats.deferred_max = self.stats.deferred_max.max(self.deferred.len() as u64);
        Ok(Vec::new())
    }

    /// A worker's state for the next checkpoint (`msg::Message::WorkerState`),
    /// sent after its `clock`-th push and before the next. Answers the
    /// checkpoint's reads of [`Shard::worker_state_image`] it completes.
    pub fn on_worker_state(&mut self, worker: u32, clock: u64, state: Vec<f32>) -> Result<Vec<Output>, PsError> {
        self.check_worker(worker)?;
        let pushed = self.clocks[worker as usize];
        if clock != pushed {
            return Err(PsError::Protocol {
                worker,
                why: format!("sent its state as of step {clock} after {pushed} pushes"),
            });
        }
        self.check_state_len(worker, &state)?;
        self.worker_states[worker as usize] = Some((clock, state));
        let mut out = Vec::new();
        self.release(&mut out)?;
        Ok(out)
    }

    /// A worker's state is empty (it keeps none) or one value per dense value here.
    fn check_state_len(&self, worker: u32, state: &[f32]) -> Result<(), PsError> {
        if !state.is_empty() && state.len() != self.map.dense_len {
            return Err(PsError::Protocol {
                worker,
                why: format!(
                    "a state of {} values; shard {} holds {} dense values",
                    state.len(),
                    self.index,
                    self.map.dense_len
                ),
            });
        }
        Ok(())
    }

    /// Every worker state held for the next checkpoint: (worker, clock, state),
    /// for a new backup's snapshot.
    pub fn worker_states(&self) -> Vec<(u32, u64, Vec<f32>)> {
        self.worker_states
            .iter()
            .enumerate()
            .filter_map(|(w, s)| s.as_ref().map(|(c, v)| (w as u32, *c, v.clone())))
            .collect()
    }

    /// A backup takes a worker's state from its primary's snapshot: as
    /// [`Shard::on_worker_state`] checks it, except for the clock, which is
    /// the step the state was handed over at, not this shard's clock now.
    pub fn restore_worker_state(&mut self, worker: u32, clock: u64, state: Vec<f32>) -> Result<(), PsError> {
        self.check_worker(worker)?;
        self.check_state_len(worker, &state)?;
        self.worker_states[worker as usize] = Some((clock, state));
        Ok(())
    }

    /// Every worker's state as of `clock` pushes, for a checkpoint: one value
    /// per worker first, 1 when its state is here and 0 when not (it sent
    /// none, an empty one, or one of another step), then the states that are
    /// here, in worker order. Read with snapshot pulls from
    /// [`WORKER_STATE_OFFSET`].
    pub fn worker_state_image(&self, clock: u64) -> Vec<f32> {
        fn here(s: &Option<(u64, Vec<f32>)>, clock: u64) -> Option<&[f32]> {
            s.as_ref()
                .filter(|(c, v)| *c == clock && !v.is_empty())
                .map(|(_, v)| &v[..])
        }
        let mut out: Vec<f32> = self
            .worker_states
            .iter()
            .map(|s| if here(s, clock).is_some() { 1.0 } else { 0.0 })
            .collect();
        for v in self.worker_states.iter().filter_map(|s| here(s, clock)) {
            out.extend_from_slice(v);
        }
        out
    }

    /// Whether the states as of `clock` are all in, or will never come (a
    /// worker that pushed past `clock` sent its state before, if at all).
    /// The asker's own is not waited for: it sent it before asking, on the
    /// same ordered stream, so it is here unless a failover lost it.
    fn worker_states_ready(&self, asker: u32, clock: u64) -> bool {
        self.worker_states
            .iter()
            .enumerate()
            .all(|(w, s)| w as u32 == asker || s.as_ref().is_some_and(|(c, _)| *c >= clock) || self.clocks[w] > clock)
    }

    /// A worker's gradient for its next step.
    pub fn on_push(&mut self, worker: u32, push: Push) -> Result<Vec<Output>, PsError> {
        self.check_worker(worker)?;
        let expected = self.clocks[worker as usize];
        if push.clock < expected && self.replaced[worker as usize] {
            // The predecessor's push of this step is already in (see `replace_worker`).
            return Ok(vec![Output::Pushed {
                worker,
                clock: push.clock,
            }]);
        }
        if push.clock != expected {
            return Err(PsError::Protocol {
                worker,
                why: format!("pushed step {} but its next step is {expected}", push.clock),
            });
        }
        if !push.dense.is_empty() && push.dense.len() != self.map.dense_len {
            return Err(PsError::Protocol {
                worker,
                why: format!(
                    "pushed {} dense values; shard {} holds {}",
                    push.dense.len(),
                    self.index,
                    self.map.dense_len
                ),
            });
        }
        // A NaN or an infinity would spread through the optimizer into every
        // later pull: the push is refused, naming the worker, before it is applied.
        if let Some(i) = push.dense.iter().chain(&push.values).position(|g| !g.is_finite()) {
            return Err(PsError::Protocol {
                worker,
                why: format!("pushed a non-finite gradient (value {i} of step {})", push.clock),
            });
        }
        self.stats.pushes += 1;
        self.stats.keys += push.keys.len() as u64;
        self.stats.bytes += (push.keys.len() * 8 + (push.dense.len() + push.values.len()) * 4) as u64;
        match self.consistency {
            Consistency::Bsp => self.accumulate(worker, push)?,
            _ => self.apply_one(worker, &push)?,
        }
        self.clocks[worker as usize] += 1;
        self.replaced[worker as usize] = false;
        let mut out = vec![Output::Pushed {
            worker,
            clock: expected,
        }];
        self.release(&mut out)?;
        Ok(out)
    }

    /// Answers every deferred pull that may now be answered, oldest first.
    fn release(&mut self, out: &mut Vec<Output>) -> Result<(), PsError> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        let waiting = std::mem::take(&mut self.deferred);
        for (w, p) in waiting {
            if self.may_answer(w, &p) {
                out.push(self.answer(w, p)?);
            } else {
                self.deferred.push((w, p));
            }
        }
        Ok(())
    }

    fn answer(&mut self, worker: u32, pull: Pull) -> Result<Output, PsError> {
        if !pull.wait_all && pull.snapshot.is_none() {
            let s = pull.clock.saturating_sub(self.visible());
            self.stats.staleness[staleness_bucket(s)] += 1;
            self.stats.staleness_max = self.stats.staleness_max.max(s);
        }
        if pull.snapshot.is_some_and(|(offset, _)| offset == CUT_BARRIER) {
            if self.cut.as_ref().is_none_or(|(c, _)| *c < pull.clock) {
                self.cut = Some((pull.clock, self.image()));
            }
            return Ok(Output::Pulled {
                worker,
                req: pull.req,
                clock: pull.clock,
                dense: Vec::new(),
                values: Vec::new(),
            });
        }
        if let Some((offset, len)) = pull.snapshot {
            // Each part copies only its own values: a snapshot read in parts
            // costs the image once, not once per part.
            let values = match offset.checked_sub(WORKER_STATE_OFFSET) {
                Some(at) => part_of(&[&self.worker_state_image(pull.clock)], at, len),
                None => match &self.cut {
                    // The cut of this step, when the workers made one (SSP and async).
                    Some((c, image)) if *c == pull.clock => part_of(&[image], offset, len),
                    _ => {
                        let state = self.opt.state_tensors();
                        let parts: Vec<&[f32]> = std::iter::once(&self.values[..])
                            .chain(state.iter().map(|(_, t)| *t))
                            .collect();
                        part_of(&parts, offset, len)
                    }
                },
            };
            let values = values.ok_or_else(|| PsError::Protocol {
                worker,
                why: format!(
                    "snapshot part {offset}+{len} outside the {} values of shard {}",
                    self.image_len(),
                    self.index
                ),
            })?;
            return Ok(Output::Pulled {
                worker,
                req: pull.req,
                clock: pull.clock,
                dense: Vec::new(),
                values,
            });
        }
        let dense = if pull.dense {
            self.values[..self.map.dense_len].to_vec()
        } else {
            Vec::new()
        };
        let mut values = Vec::new();
        for &k in &pull.keys {
            let (at, len) = self.local_offset(worker, k)?;
            values.extend_from_slice(&self.values[at..at + len]);
        }
        self.stats.keys += pull.keys.len() as u64;
        self.stats.bytes += (pull.keys.len() * 8 + (dense.len() + values.len()) * 4) as u64;
        Ok(Output::Pulled {
            worker,
            req: pull.req,
            clock: pull.clock,
            dense,
            values,
        })
    }

    /// (local table index, local row) of a key this shard owns.
    fn locate(&self, worker: u32, key: u64) -> Result<(usize, u32), PsError> {
        let (tensor, row) = split_key(key);
        self.map
            .tables
            .iter()
            .position(|t| t.tensor == tensor)
            .and_then(|i| self.map.tables[i].local_row(row).map(|r| (i, r)))
            .ok_or_else(|| PsError::Protocol {
                worker,
                why: format!(
                    "key {key:#x} (tensor {tensor}, row {row}) is not on shard {}",
                    self.index
                ),
            })
    }

    /// Element offset and row length of a key's row in the local buffer.
    fn local_offset(&self, worker: u32, key: u64) -> Result<(usize, usize), PsError> {
        let (t, r) = self.locate(worker, key)?;
        let t = &self.map.tables[t];
        Ok((t.offset + r as usize * t.row_len, t.row_len))
    }

    /// Async and SSP: one push is one optimizer step.
    fn apply_one(&mut self, worker: u32, push: &Push) -> Result<(), PsError> {
        for s in &mut self.scratch {
            s.clear();
        }
        let mut at = 0;
        for &k in &push.keys {
            let (t, r) = self.locate(worker, k)?;
            let s = &mut self.scratch[t];
            s.rows.push(r);
            s.values.extend_from_slice(&push.values[at..at + s.row_len]);
            at += s.row_len;
        }
        let dense = (!push.dense.is_empty()).then_some(&push.dense[..]);
        self.step(dense)
    }

    /// BSP: adds a push into its step's sum; applies every complete step in order.
    fn accumulate(&mut self, worker: u32, push: Push) -> Result<(), PsError> {
        let tables = self.map.tables.len();
        let mut located = Vec::with_capacity(push.keys.len());
        for &k in &push.keys {
            located.push(self.locate(worker, k)?);
        }
        let p = self.pending.entry(push.clock).or_insert_with(|| Pending {
            slots: vec![MixMap::default(); tables],
            rows: vec![Vec::new(); tables],
            values: vec![Vec::new(); tables],
            ..Pending::default()
        });
        if !push.dense.is_empty() {
            if p.dense.is_empty() {
                p.dense = push.dense;
            } else {
                p.dense.iter_mut().zip(&push.dense).for_each(|(a, b)| *a += b);
            }
        }
        let mut at = 0;
        for (t, r) in located {
            let row_len = self.map.tables[t].row_len;
            let src = &push.values[at..at + row_len];
            at += row_len;
            let n = p.rows[t].len() as u32;
            let slot = *p.slots[t].entry(r).or_insert(n) as usize;
            if slot == n as usize {
                p.rows[t].push(r);
                p.values[t].extend_from_slice(src);
            } else {
                p.values[t][slot * row_len..(slot + 1) * row_len]
                    .iter_mut()
                    .zip(src)
                    .for_each(|(a, b)| *a += b);
            }
        }
        p.pushes += 1;
        while self
            .pending
            .get(&self.applied)
            .is_some_and(|p| p.pushes == self.workers)
        {
            let p = self.pending.remove(&self.applied).expect("checked");
            for (s, (rows, values)) in self.scratch.iter_mut().zip(p.rows.into_iter().zip(p.values)) {
                s.rows = rows;
                s.values = values;
            }
            let dense = (!p.dense.is_empty()).then_some(&p.dense[..]);
            self.step(dense)?;
            self.applied += 1;
        }
        Ok(())
    }

    /// One optimizer step from `dense` (the whole dense part, if any) and the scratch rows.
    fn step(&mut self, dense: Option<&[f32]>) -> Result<(), PsError> {
        let n = self.map.dense_len;
        if let Some(g) = dense {
            self.opt.step_range(&mut self.values[..n], g, 0..n)?;
        }
        for s in &self.scratch {
            if !s.rows.is_empty() {
                self.opt.step_sparse(&mut self.values, s)?;
            }
        }
        self.opt.finish_step();
        self.stats.steps_applied += 1;
        Ok(())
    }
}

/// Values `offset .. offset + len` of the concatenation of `parts`, or
/// `None` when the range is not inside it.
fn part_of(parts: &[&[f32]], offset: u64, len: u64) -> Option<Vec<f32>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    if end > parts.iter().map(|p| p.len()).sum::<usize>() {
        return None;
    }
    let mut out = Vec::with_capacity(end - start);
    let mut at = 0;
    for p in parts {
        let (lo, hi) = (start.max(at), end.min(at + p.len()));
        if lo < hi {
            out.extend_from_slice(&p[lo - at..hi - at]);
        }
        at += p.len();
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{PlacementSpec, key};
    use tensor::ParamKind;

    fn setup(workers: u32, c: Consistency) -> (Layout, Placement, Shard) {
        let mut l = Layout::new();
        l.push("w", &[3], ParamKind::Dense);
        l.push("emb", &[8, 2], ParamKind::Table);
        let p = Placement::new(PlacementSpec::hashed(1, 8), &l).unwrap();
        let ll = LocalLayout::new(&l, &p, 0);
        let init = vec![0.0; ll.local.len()];
        let sgd: optim::OptimConfig = serde_json::from_str(r#"{"kind":"sgd","lr":1.0}"#).unwrap();
        let s = Shard::new(0, workers, c, &sgd, &l, &p, init).unwrap();
        (l, p, s)
    }

    fn push(clock: u64, g: f32) -> Push {
        Push {
            clock,
            dense: vec![g; 3],
            keys: vec![key(1, 5)],
            values: vec![g, 2.0 * g],
        }
    }

    fn pull(clock: u64) -> Pull {
        Pull {
            req: clock,
            clock,
            wait_all: false,
            dense: true,
            keys: vec![key(1, 5)],
            snapshot: None,
        }
    }

    #[test]
    fn an_image_restores_values_state_and_clocks() {
        let (l, p, mut s) = setup(2, Consistency::Bsp);
        s.on_push(0, push(0, 1.0)).unwrap();
        s.on_push(1, push(0, 1.0)).unwrap();
        let image = s.image();
        assert_eq!(image.len(), s.image_len());
        let ll = LocalLayout::new(&l, &p, 0);
        let sgd: optim::OptimConfig = serde_json::from_str(r#"{"kind":"sgd","lr":1.0}"#).unwrap();
        let mut t = Shard::new(0, 3, Consistency::Bsp, &sgd, &l, &p, vec![0.0; ll.local.len()]).unwrap();
        t.restore(&image, 1).unwrap();
        assert_eq!(t.values(), s.values());
        assert_eq!(t.visible(), 1);
        assert!(t.on_push(2, push(0, 1.0)).is_err(), "clocks resume at 1");
        let mut snap = pull(1);
        snap.snapshot = Some((1, 2));
        match &s.on_pull(0, snap).unwrap()[0] {
            Output::Pulled { values, .. } => assert_eq!(values[..], image[1..3]),
            o => panic!("{o:?}"),
        }
        assert!(t.restore(&image[1..], 0).is_err());
    }

    /// A checkpoint's read of the workers' states as of `clock`, elements `at..at + len`.
    fn state_read(clock: u64, at: u64, len: u64) -> Pull {
        Pull {
            req: 100 + at,
            clock,
            wait_all: true,
            dense: false,
            keys: Vec::new(),
            snapshot: Some((WORKER_STATE_OFFSET + at, len)),
        }
    }

    fn pulled(out: &[Output]) -> Vec<f32> {
        match out {
            [.., Output::Pulled { values, .. }] => values.clone(),
            o => panic!("no answered pull in {o:?}"),
        }
    }

    #[test]
    fn worker_states_are_read_once_every_worker_sent_its_own_or_moved_on() {
        let (_, _, mut s) = setup(3, Consistency::Bsp);
        for w in 0..3 {
            s.on_push(w, push(0, 1.0)).unwrap();
        }
        // The asker's own state is in; worker 1 keeps none; worker 2's is still on its way.
        assert!(s.on_worker_state(0, 1, vec![1.0, 2.0, 3.0]).unwrap().is_empty());
        assert!(s.on_pull(0, state_read(1, 0, 3)).unwrap().is_empty(), "deferred");
        assert!(
            s.on_worker_state(1, 1, Vec::new()).unwrap().is_empty(),
            "worker 2 still missing"
        );
        let out = s.on_worker_state(2, 1, vec![4.0, 5.0, 6.0]).unwrap();
        assert_eq!(pulled(&out), [1.0, 0.0, 1.0], "one flag per worker");
        assert_eq!(
            pulled(&s.on_pull(0, state_read(1, 3, 6)).unwrap()),
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        // The image stays the shard's own: values and optimizer state only.
        assert_eq!(s.image().len(), s.image_len());
        // A state of another step, or of the wrong size, is a protocol error naming the worker.
        let e = s.on_worker_state(0, 0, Vec::new()).unwrap_err().to_string();
        assert!(e.contains("as of step 0 after 1 pushes"), "{e}");
        let e = s.on_worker_state(1, 1, vec![0.0; 2]).unwrap_err().to_string();
        assert!(e.contains("state of 2 values") && e.contains("3 dense"), "{e}");
        assert!(s.on_pull(0, state_read(1, 9, 1)).is_err(), "outside the states");
    }

    #[test]
    fn a_worker_that_pushed_past_the_step_without_a_state_is_not_waited_for() {
        let (_, _, mut s) = setup(2, Consistency::Bsp);
        s.on_push(0, push(0, 1.0)).unwrap();
        s.on_push(1, push(0, 1.0)).unwrap();
        assert!(s.on_pull(0, state_read(1, 0, 2)).unwrap().is_empty());
        // Worker 1 goes on to step 1 without sending a state: none will come.
        let out = s.on_push(1, push(1, 1.0)).unwrap();
        assert_eq!(pulled(&out), [0.0, 0.0]);
        s.on_push(0, push(1, 1.0)).unwrap();
        s.on_worker_state(0, 2, vec![7.0; 3]).unwrap();
        assert_eq!(pulled(&s.on_pull(1, state_read(2, 0, 2)).unwrap()), [1.0, 0.0]);
        // A state of an older checkpoint is not this one's.
        s.on_push(0, push(2, 1.0)).unwrap();
        s.on_push(0, push(3, 1.0)).unwrap();
        assert_eq!(pulled(&s.on_pull(1, state_read(3, 0, 2)).unwrap()), [0.0, 0.0]);
    }

    #[test]
    fn bsp_sums_a_step_over_workers_and_defers_reads_until_it_is_applied() {
        let (_, _, mut s) = setup(2, Consistency::Bsp);
        assert_eq!(s.on_pull(0, pull(0)).unwrap().len(), 1, "step 0 reads at once");
        s.on_push(0, push(0, 1.0)).unwrap();
        assert!(
            s.on_pull(0, pull(1)).unwrap().is_empty(),
            "worker 1 has not pushed step 0"
        );
        let out = s.on_push(1, push(0, 2.0)).unwrap();
        assert_eq!(out.len(), 2, "ack and the released pull: {out:?}");
        let Output::Pulled { dense, values, .. } = &out[1] else {
            panic!("{out:?}")
        };
        assert_eq!(dense, &vec![-3.0; 3], "one SGD step on the sum");
        assert_eq!(values, &vec![-3.0, -6.0]);
        assert_eq!(s.stats().steps_applied, 1);
        assert_eq!(s.stats().staleness[0], 2);
    }

    #[test]
    fn ssp_lets_a_worker_run_ahead_by_the_bound_and_no_further() {
        let (_, _, mut s) = setup(2, Consistency::Ssp { staleness: 2 });
        for c in 0..2 {
            s.on_push(0, push(c, 1.0)).unwrap();
        }
        assert_eq!(s.on_pull(0, pull(2)).unwrap().len(), 1, "2 ahead of worker 1: allowed");
        s.on_push(0, push(2, 1.0)).unwrap();
        assert!(s.on_pull(0, pull(3)).unwrap().is_empty(), "3 ahead: waits");
        // The slowest worker is never made to wait.
        assert_eq!(s.on_pull(1, pull(0)).unwrap().len(), 1);
        let out = s.on_push(1, push(0, 1.0)).unwrap();
        assert!(
            matches!(
                out[1],
                Output::Pulled {
                    worker: 0,
                    clock: 3,
                    ..
                }
            ),
            "{out:?}"
        );
        assert_eq!(s.stats().staleness[2], 2, "read 2 ahead, twice");
        assert_eq!(s.stats().staleness[0], 1);
        assert_eq!(s.stats().steps_applied, 4, "each push is a step");
    }

    #[test]
    fn async_never_waits_but_wait_all_does() {
        let (_, _, mut s) = setup(2, Consistency::Async);
        for c in 0..10 {
            s.on_push(0, push(c, 1.0)).unwrap();
        }
        assert_eq!(s.on_pull(0, pull(10)).unwrap().len(), 1);
        assert_eq!(s.stats().staleness[10], 1);
        assert_eq!(s.stats().staleness_max, 10);
        let mut p = pull(10);
        p.wait_all = true;
        assert!(s.on_pull(0, p).unwrap().is_empty());
    }

    #[test]
    fn a_replacement_resends_steps_the_shard_has_once_and_its_predecessors_pulls_are_dropped() {
        let (_, _, mut s) = setup(2, Consistency::Bsp);
        s.on_push(0, push(0, 1.0)).unwrap();
        s.on_push(1, push(0, 1.0)).unwrap();
        s.on_push(0, push(1, 1.0)).unwrap();
        // Worker 0 waits for worker 1's step 1, then dies.
        assert!(s.on_pull(0, pull(2)).unwrap().is_empty());
        assert_eq!(s.deferred(), 1);
        assert_eq!(s.replace_worker(0).unwrap(), 2, "the replacement's first step here");
        assert_eq!(
            s.deferred(),
            0,
            "the dead worker's pull is not answered to its replacement"
        );
        // The replacement continues from step 1 (another shard had only step 0 from the
        // predecessor): this shard acknowledges step 1 again without applying it.
        let before = s.values().to_vec();
        let out = s.on_push(0, push(1, 100.0)).unwrap();
        assert_eq!(out, vec![Output::Pushed { worker: 0, clock: 1 }]);
        assert_eq!(s.values(), &before[..]);
        assert_eq!(s.clock(0).unwrap(), 2);
        // Its step 2 is new; once caught up, an old step is a protocol error again.
        s.on_push(0, push(2, 1.0)).unwrap();
        assert!(s.on_push(0, push(1, 1.0)).is_err());
        // Worker 1's step 1 completes step 1 with the predecessor's gradient (1.0, not 100.0).
        s.on_push(1, push(1, 1.0)).unwrap();
        assert_eq!(s.stats().steps_applied, 2);
        assert_eq!(s.values()[0], -4.0, "two SGD steps of 1 + 1");
        assert!(s.replace_worker(9).is_err());
    }

    fn barrier(clock: u64) -> Pull {
        Pull {
            req: 100 + clock,
            clock,
            wait_all: true,
            dense: false,
            keys: Vec::new(),
            snapshot: Some((CUT_BARRIER, 0)),
        }
    }

    fn snapshot_values(out: &[Output]) -> Vec<f32> {
        match out {
            [Output::Pulled { values, .. }] => values.clone(),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn an_async_checkpoint_reads_the_cut_even_after_faster_workers_pushed_on() {
        let (_, _, mut s) = setup(2, Consistency::Async);
        // Step 1 is a checkpoint's. Worker 0 is fast; worker 1 has not pushed step 0 yet.
        s.on_push(0, push(0, 1.0)).unwrap();
        assert!(
            s.on_pull(0, barrier(1)).unwrap().is_empty(),
            "waits for worker 1's step 0"
        );
        let out = s.on_push(1, push(0, 1.0)).unwrap();
        assert_eq!(out.len(), 2, "ack and worker 0's barrier: {out:?}");
        let at_cut = s.image();
        // Worker 1's barrier comes later; worker 0 already pushed on past the cut.
        s.on_push(0, push(1, 5.0)).unwrap();
        assert_eq!(s.on_pull(1, barrier(1)).unwrap().len(), 1);
        assert_ne!(s.image(), at_cut);
        let mut read = pull(1);
        read.wait_all = true;
        read.snapshot = Some((0, at_cut.len() as u64));
        assert_eq!(
            snapshot_values(&s.on_pull(0, read).unwrap()),
            at_cut,
            "the cut, not the present"
        );
        // A later cut replaces it.
        s.on_push(1, push(1, 1.0)).unwrap();
        assert_eq!(s.on_pull(0, barrier(2)).unwrap().len(), 1);
        let mut read = pull(2);
        read.wait_all = true;
        read.snapshot = Some((0, 3));
        assert_eq!(snapshot_values(&s.on_pull(0, read).unwrap()), s.image()[..3]);
    }

    /// Issue 16: every snapshot part copied the whole image first, so a
    /// snapshot read in k parts cost k images. Parts are now cut from the
    /// values and optimizer state in place; every part of every size is
    /// still the image's slice, and a part past the end is refused.
    #[test]
    fn snapshot_parts_are_slices_of_the_image() {
        let (_, _, mut s) = setup(2, Consistency::Async);
        s.on_push(0, push(0, 1.0)).unwrap();
        s.on_push(1, push(0, 2.0)).unwrap();
        let image = s.image();
        assert!(image.len() > s.values().len(), "the image holds optimizer state too");
        for len in 1..=image.len() {
            for offset in 0..=image.len() - len {
                let mut read = pull(1);
                read.wait_all = true;
                read.snapshot = Some((offset as u64, len as u64));
                assert_eq!(
                    snapshot_values(&s.on_pull(0, read).unwrap()),
                    image[offset..offset + len],
                    "part {offset}+{len}"
                );
            }
        }
        let mut read = pull(1);
        read.wait_all = true;
        read.snapshot = Some((image.len() as u64 - 1, 2));
        assert!(s.on_pull(0, read).is_err(), "a part past the end");
        assert_eq!(part_of(&[&[1.0, 2.0], &[], &[3.0]], 1, 2), Some(vec![2.0, 3.0]));
        assert_eq!(part_of(&[&[1.0]], u64::MAX, 2), None);
    }

    /// Issue 16: a peer with the secret pushing NaN or infinity is refused,
    /// named, and nothing of its push is applied.
    #[test]
    fn a_non_finite_push_is_refused_naming_the_worker() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let (_, _, mut s) = setup(2, Consistency::Async);
            let before = s.image();
            let mut p = push(0, 1.0);
            p.dense[1] = bad;
            let e = s.on_push(1, p).unwrap_err().to_string();
            assert!(e.contains("worker 1") && e.contains("non-finite"), "{e}");
            assert_eq!(s.image(), before, "nothing applied");
            assert_eq!(s.clock(1).unwrap(), 0, "the step was not counted");
        }
    }

    #[test]
    fn staleness_buckets_are_exact_then_powers_of_two() {
        assert_eq!(
            (0..16).map(staleness_bucket).collect::<Vec<_>>(),
            (0..16).collect::<Vec<_>>()
        );
        assert_eq!(staleness_bucket(16), 16);
        assert_eq!(staleness_bucket(31), 16);
        assert_eq!(staleness_bucket(32), 17);
        assert_eq!(staleness_bucket(4434), 16 + 12 - 4);
        assert_eq!(staleness_bucket(u64::MAX), STALENESS_BUCKETS - 1);
        for b in 0..STALENESS_BUCKETS {
            assert_eq!(staleness_bucket(staleness_bucket_floor(b)), b);
        }
    }

    #[test]
    fn protocol_errors_name_the_worker() {
        let (_, _, mut s) = setup(2, Consistency::Async);
        let e = s.on_push(1, push(3, 1.0)).unwrap_err().to_string();
        assert!(e.contains("worker 1") && e.contains("pushed step 3"), "{e}");
        let e = s.on_push(7, push(0, 1.0)).unwrap_err().to_string();
        assert!(e.contains("worker 7"), "{e}");
        let mut p = push(0, 1.0);
        p.dense.push(0.0);
        assert!(s.on_push(0, p).unwrap_err().to_string().contains("dense values"));
    }
}
