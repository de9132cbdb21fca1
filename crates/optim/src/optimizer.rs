//! [`Optimizer`]: the state of one optimizer over a model's flat parameter
//! buffer (or one contiguous range of it), the step counter and the schedule,
//! and the names under which that state goes into a checkpoint.

use std::collections::BTreeMap;
use std::ops::Range;

use tensor::{Gradient, Layout, ParamKind, ParamTensor, SparseRows};

use crate::adagrad::{self, AdagradStep};
use crate::adam::{self, AdamStep};
use crate::config::OptimConfig;
use crate::error::OptimError;
use crate::ftrl::{self, FtrlStep};
use crate::rows::row_range;
use crate::sgd::{self, SgdStep};

/// Name of the state tensor that holds the step count.
pub const STEP_STATE_NAME: &str = "optim.step";
/// The step count is stored as two f32 values `[high, low]` with
/// `step = high * 2^24 + low`; each half is an integer below 2^24, which f32
/// holds exactly.
const STEP_HALF: u64 = 1 << 24;

/// One per-element state buffer over the owned range, e.g. Adam's first moment.
#[derive(Clone, Debug)]
struct Slot {
    /// Suffix of the state tensor names: `{param}.{suffix}`.
    suffix: &'static str,
    values: Vec<f32>,
}

/// The coefficients of the step in progress.
enum StepCoeffs {
    Sgd(SgdStep),
    Adam(AdamStep),
    Adagrad(AdagradStep),
    Ftrl(FtrlStep),
}

/// An optimizer over the parameters of a [`Layout`], or over one contiguous
/// range of it (a parameter-server shard).
///
/// A step is either [`Optimizer::step`] alone, or any number of
/// [`Optimizer::step_range`] and [`Optimizer::step_sparse`] calls over
/// disjoint parts followed by one [`Optimizer::finish_step`]. Both give
/// bitwise the same result, since every update is element-wise.
///
/// `Table` tensors are updated only through their sparse rows; `step_range`
/// skips them, so a dense range may span a table whose dense gradient is
/// meaningless.
#[derive(Clone, Debug)]
pub struct Optimizer {
    cfg: OptimConfig,
    layout: Layout,
    owned: Range<usize>,
    steps_done: u64,
    /// `steps_done` as [`STEP_STATE_NAME`] stores it.
    step_state: [f32; 2],
    slots: Vec<Slot>,
}

impl Optimizer {
    /// An optimizer over every parameter of `layout`.
    pub fn new(cfg: &OptimConfig, layout: &Layout) -> Result<Self, OptimError> {
        Self::for_range(cfg, layout, 0..layout.len())
    }

    /// An optimizer over the elements `owned` of `layout` only; it allocates
    /// state for that range alone.
    pub fn for_range(cfg: &OptimConfig, layout: &Layout, owned: Range<usize>) -> Result<Self, OptimError> {
        cfg.validate()?;
        if owned.start > owned.end || owned.end > layout.len() {
            return Err(OptimError::Range {
                range: owned,
                owned: 0..layout.len(),
            });
        }
        let n = owned.len();
        let slot = |suffix, init: f32| Slot {
            suffix,
            values: vec![init; n],
        };
        let slots = match cfg {
            OptimConfig::Sgd(c) if c.momentum == 0.0 => vec![],
            OptimConfig::Sgd(_) => vec![slot("momentum", 0.0)],
            OptimConfig::Adam(_) | OptimConfig::AdamW(_) => vec![slot("adam_m", 0.0), slot("adam_v", 0.0)],
            OptimConfig::Adagrad(c) => vec![slot("adagrad_sum", c.initial_accumulator)],
            OptimConfig::Ftrl(_) => vec![slot("ftrl_z", 0.0), slot("ftrl_n", 0.0)],
        };
        Ok(Self {
            cfg: cfg.clone(),
            layout: layout.clone(),
            owned,
            steps_done: 0,
            step_state: [0.0; 2],
            slots,
        })
    }

    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// The element range of the layout this optimizer updates.
    pub fn owned_range(&self) -> Range<usize> {
        self.owned.clone()
    }

    /// Steps completed so far.
    pub fn step_count(&self) -> u64 {
        self.steps_done
    }

    /// The learning rate (FTRL: alpha) the next step uses, after the schedule.
    pub fn learning_rate(&self) -> f32 {
        self.cfg.lr() * self.cfg.schedule().factor(self.steps_done)
    }

    /// One whole step: the dense gradient of every owned `Dense` tensor and
    /// the rows of every `Table` tensor, then [`Optimizer::finish_step`].
    ///
    /// `params` holds the owned range (the whole buffer for [`Optimizer::new`]);
    /// `grad` is laid out over the whole layout. Nothing is updated when the
    /// gradient does not fit the layout.
    pub fn step(&mut self, params: &mut [f32], grad: &Gradient) -> Result<(), OptimError> {
        check_len("parameters", self.owned.len(), params.len())?;
        check_len("dense gradient", self.layout.len(), grad.dense.len())?;
        for rows in &grad.sparse {
            self.check_sparse(rows)?;
        }
        let coeffs = self.coeffs();
        for t in self.layout.tensors().iter().filter(|t| t.kind == ParamKind::Dense) {
            let r = intersect(&t.range(), &self.owned);
            if r.is_empty() {
                continue;
            }
            let local = r.start - self.owned.start..r.end - self.owned.start;
            apply(
                &coeffs,
                &mut self.slots,
                local.clone(),
                &mut params[local],
                &grad.dense[r],
            );
        }
        for rows in &grad.sparse {
            self.apply_sparse(&coeffs, params, rows);
        }
        self.finish_step();
        Ok(())
    }

    /// Updates the elements `range` of the layout from their dense gradient,
    /// at the current step, skipping `Table` tensors. `params` and `grad`
    /// hold exactly `range` (the caller's shard or bucket).
    /// Call [`Optimizer::finish_step`] once every part of the step is applied.
    pub fn step_range(&mut self, params: &mut [f32], grad: &[f32], range: Range<usize>) -> Result<(), OptimError> {
        if range.start > range.end || range.start < self.owned.start || range.end > self.owned.end {
            return Err(OptimError::Range {
                range,
                owned: self.owned.clone(),
            });
        }
        check_len("parameters", range.len(), params.len())?;
        check_len("gradient", range.len(), grad.len())?;
        let coeffs = self.coeffs();
        for t in self.layout.tensors().iter().filter(|t| t.kind == ParamKind::Dense) {
            let r = intersect(&t.range(), &range);
            if r.is_empty() {
                continue;
            }
            let state = r.start - self.owned.start..r.end - self.owned.start;
            let local = r.start - range.start..r.end - range.start;
            apply(
                &coeffs,
                &mut self.slots,
                state,
                &mut params[local.clone()],
                &grad[local],
            );
        }
        Ok(())
    }

    /// Updates the touched rows of one `Table` tensor at the current step.
    /// `params` holds the owned range; every touched row must lie inside it.
    /// Rows are distinct by [`SparseRows`]' contract; a repeated row would be
    /// updated once per occurrence.
    /// Call [`Optimizer::finish_step`] once every part of the step is applied.
    pub fn step_sparse(&mut self, params: &mut [f32], rows: &SparseRows) -> Result<(), OptimError> {
        check_len("parameters", self.owned.len(), params.len())?;
        self.check_sparse(rows)?;
        let coeffs = self.coeffs();
        self.apply_sparse(&coeffs, params, rows);
        Ok(())
    }

    /// Ends the step that `step_range` and `step_sparse` calls applied: the
    /// next updates use the next step's bias correction and learning rate.
    pub fn finish_step(&mut self) {
        self.steps_done += 1;
        assert!(
            self.steps_done < STEP_HALF * STEP_HALF,
            "optimizer step count overflows its checkpoint form"
        );
        self.step_state = [
            (self.steps_done / STEP_HALF) as f32,
            (self.steps_done % STEP_HALF) as f32,
        ];
    }

    /// The optimizer's whole state, for a checkpoint: `{param}.{suffix}` for
    /// every per-element buffer (`momentum`, `adam_m`, `adam_v`,
    /// `adagrad_sum`, `ftrl_z`, `ftrl_n`) over the owned part of each tensor,
    /// then [`STEP_STATE_NAME`].
    pub fn state_tensors(&self) -> Vec<(String, &[f32])> {
        let mut out = Vec::with_capacity(self.layout.tensors().len() * self.slots.len() + 1);
        for t in self.layout.tensors() {
            let r = intersect(&t.range(), &self.owned);
            if r.is_empty() {
                continue;
            }
            let local = r.start - self.owned.start..r.end - self.owned.start;
            for s in &self.slots {
                out.push((format!("{}.{}", t.name, s.suffix), &s.values[local.clone()]));
            }
        }
        out.push((STEP_STATE_NAME.to_string(), &self.step_state[..]));
        out
    }

    /// Replaces the whole state by `tensors` (as [`Optimizer::state_tensors`]
    /// names them). Every expected name must be present with its exact length
    /// and no other name may appear; on any error nothing changes.
    pub fn load_state<'a, S: AsRef<str>>(
        &mut self,
        tensors: impl IntoIterator<Item = (S, &'a [f32])>,
    ) -> Result<(), OptimError> {
        let mut given: BTreeMap<String, &[f32]> = BTreeMap::new();
        for (name, values) in tensors {
            let name = name.as_ref();
            if given.insert(name.to_string(), values).is_some() {
                return Err(OptimError::StateValue {
                    name: name.to_string(),
                    why: "given twice".into(),
                });
            }
        }
        let mut expected: Vec<(String, usize)> = Vec::new();
        for (name, values) in self.state_tensors() {
            expected.push((name, values.len()));
        }
        for (name, len) in &expected {
            let values = given
                .get(name)
                .ok_or_else(|| OptimError::MissingState { name: name.clone() })?;
            if values.len() != *len {
                return Err(OptimError::StateLength {
                    name: name.clone(),
                    expected: *len,
                    got: values.len(),
                });
            }
        }
        if let Some(name) = given.keys().find(|g| !expected.iter().any(|(e, _)| e == *g)) {
            return Err(OptimError::UnexpectedState {
                name: name.clone(),
                kind: self.cfg.kind(),
            });
        }
        let steps_done = decode_step(given[STEP_STATE_NAME])?;

        for t in self.layout.tensors() {
            let r = intersect(&t.range(), &self.owned);
            if r.is_empty() {
                continue;
            }
            let local = r.start - self.owned.start..r.end - self.owned.start;
            for s in &mut self.slots {
                let name = format!("{}.{}", t.name, s.suffix);
                s.values[local.clone()].copy_from_slice(given[&name]);
            }
        }
        self.steps_done = steps_done;
        self.step_state = [given[STEP_STATE_NAME][0], given[STEP_STATE_NAME][1]];
        Ok(())
    }

    fn coeffs(&self) -> StepCoeffs {
        let lr = self.learning_rate();
        match &self.cfg {
            OptimConfig::Sgd(c) => StepCoeffs::Sgd(SgdStep::new(c, lr)),
            OptimConfig::Adam(c) => StepCoeffs::Adam(AdamStep::new(c, false, lr, self.steps_done + 1)),
            OptimConfig::AdamW(c) => StepCoeffs::Adam(AdamStep::new(c, true, lr, self.steps_done + 1)),
            OptimConfig::Adagrad(c) => StepCoeffs::Adagrad(AdagradStep::new(c, lr)),
            OptimConfig::Ftrl(c) => StepCoeffs::Ftrl(FtrlStep::new(c, lr)),
        }
    }

    /// Checks that `rows` fits a `Table` tensor of the layout inside the owned range.
    fn check_sparse(&self, rows: &SparseRows) -> Result<(), OptimError> {
        let tensors = self.layout.tensors();
        let t = tensors.get(rows.tensor).ok_or(OptimError::UnknownTensor {
            tensor: rows.tensor,
            tensors: tensors.len(),
        })?;
        if t.kind != ParamKind::Table {
            return Err(OptimError::NotATable { name: t.name.clone() });
        }
        let shape_err = |what, expected, got| OptimError::SparseShape {
            name: t.name.clone(),
            what,
            expected,
            got,
        };
        if rows.row_len != t.row_len() {
            return Err(shape_err("row_len", t.row_len(), rows.row_len));
        }
        let want = rows.rows.len().saturating_mul(rows.row_len);
        if rows.values.len() != want {
            return Err(shape_err("values length", want, rows.values.len()));
        }
        let table_rows = table_rows(t);
        for &row in &rows.rows {
            if row as usize >= table_rows {
                return Err(OptimError::RowOutOfRange {
                    name: t.name.clone(),
                    row,
                    rows: table_rows,
                });
            }
            let r = row_range(row, rows.row_len);
            let (start, end) = (t.offset + r.start, t.offset + r.end);
            if start < self.owned.start || end > self.owned.end {
                return Err(OptimError::RowNotOwned {
                    name: t.name.clone(),
                    row,
                    owned: self.owned.clone(),
                });
            }
        }
        Ok(())
    }

    /// Applies checked rows: each row is a dense update of its own elements.
    fn apply_sparse(&mut self, coeffs: &StepCoeffs, params: &mut [f32], rows: &SparseRows) {
        // Checked rows lie inside the owned range, though the table may start before it.
        let offset = self.layout.tensors()[rows.tensor].offset;
        for (i, &row) in rows.rows.iter().enumerate() {
            let r = row_range(row, rows.row_len);
            let local = offset + r.start - self.owned.start..offset + r.end - self.owned.start;
            apply(coeffs, &mut self.slots, local.clone(), &mut params[local], rows.row(i));
        }
    }
}

/// Runs one kernel over `params` with the state elements `state` of every slot.
fn apply(coeffs: &StepCoeffs, slots: &mut [Slot], state: Range<usize>, params: &mut [f32], grad: &[f32]) {
    match (coeffs, slots) {
        (StepCoeffs::Sgd(h), []) => sgd::step_dense(h, params, grad, &mut []),
        (StepCoeffs::Sgd(h), [v]) => sgd::step_dense(h, params, grad, &mut v.values[state]),
        (StepCoeffs::Adam(h), [m, v]) => {
            adam::step_dense(h, params, grad, &mut m.values[state.clone()], &mut v.values[state])
        }
        (StepCoeffs::Adagrad(h), [s]) => adagrad::step_dense(h, params, grad, &mut s.values[state]),
        (StepCoeffs::Ftrl(h), [z, n]) => {
            ftrl::step_dense(h, params, grad, &mut z.values[state.clone()], &mut n.values[state])
        }
        _ => unreachable!("optimizer state slots do not match the optimizer kind"),
    }
}

fn table_rows(t: &ParamTensor) -> usize {
    t.shape.first().copied().unwrap_or(1)
}

fn intersect(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    let start = a.start.max(b.start);
    start..a.end.min(b.end).max(start)
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), OptimError> {
    if expected == got {
        Ok(())
    } else {
        Err(OptimError::Length { what, expected, got })
    }
}

fn decode_step(values: &[f32]) -> Result<u64, OptimError> {
    let half = |x: f32| (x.is_finite() && x >= 0.0 && x.fract() == 0.0 && (x as u64) < STEP_HALF).then_some(x as u64);
    match (half(values[0]), half(values[1])) {
        (Some(high), Some(low)) => Ok(high * STEP_HALF + low),
        _ => Err(OptimError::StateValue {
            name: STEP_STATE_NAME.to_string(),
            why: format!("{values:?} is not [high, low] with integers in 0..2^24"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use tensor::Rng;

    use super::*;
    use crate::config::{AdagradConfig, AdamConfig, FtrlConfig, SgdConfig};
    use crate::schedule::LrSchedule;

    /// A dense matrix, a 5x3 table, a bias and a 4x1 table.
    fn layout() -> Layout {
        let mut l = Layout::new();
        l.push("layers.0.weight", &[3, 4], ParamKind::Dense);
        l.push("emb", &[5, 3], ParamKind::Table);
        l.push("layers.0.bias", &[4], ParamKind::Dense);
        l.push("lr.w", &[4], ParamKind::Table);
        l
    }

    fn warmup() -> LrSchedule {
        LrSchedule::WarmupCosine {
            warmup_steps: 2,
            total_steps: 8,
            min_factor: 0.1,
        }
    }

    fn configs() -> Vec<OptimConfig> {
        vec![
            OptimConfig::Sgd(SgdConfig {
                lr: 0.1,
                ..SgdConfig::default()
            }),
            OptimConfig::Sgd(SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 0.01,
                schedule: LrSchedule::Step {
                    every_steps: 3,
                    gamma: 0.5,
                },
            }),
            OptimConfig::Adam(AdamConfig {
                lr: 0.01,
                weight_decay: 0.1,
                schedule: warmup(),
                ..AdamConfig::default()
            }),
            OptimConfig::AdamW(AdamConfig {
                lr: 0.01,
                weight_decay: 0.1,
                ..AdamConfig::default()
            }),
            OptimConfig::Adagrad(AdagradConfig {
                lr: 0.1,
                initial_accumulator: 0.1,
                ..AdagradConfig::default()
            }),
            OptimConfig::Ftrl(FtrlConfig {
                l1: 0.01,
                l2: 0.1,
                schedule: warmup(),
                ..FtrlConfig::default()
            }),
        ]
    }

    fn init(layout: &Layout) -> Vec<f32> {
        let mut rng = Rng::new(11);
        (0..layout.len()).map(|_| rng.normal() as f32).collect()
    }

    /// A random gradient touching a random subset of each table's rows.
    fn gradient(layout: &Layout, rng: &mut Rng) -> Gradient {
        let mut g = Gradient::for_layout(layout);
        for x in &mut g.dense {
            *x = rng.normal() as f32;
        }
        for s in &mut g.sparse {
            let rows = layout.tensors()[s.tensor].shape[0];
            for row in 0..rows as u32 {
                if rng.below(2) == 0 {
                    s.rows.push(row);
                    s.values.extend((0..s.row_len).map(|_| rng.normal() as f32));
                }
            }
        }
        g
    }

    type OwnedState = Vec<(String, Vec<f32>)>;

    fn owned_state(opt: &Optimizer) -> OwnedState {
        opt.state_tensors().into_iter().map(|(n, v)| (n, v.to_vec())).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn resumed_run_is_bitwise_identical() {
        let layout = layout();
        for cfg in configs() {
            let grads: Vec<Gradient> = {
                let mut rng = Rng::new(5);
                (0..9).map(|_| gradient(&layout, &mut rng)).collect()
            };
            let mut straight = init(&layout);
            let mut opt = Optimizer::new(&cfg, &layout).expect("valid");
            for g in &grads {
                opt.step(&mut straight, g).expect("fits");
            }

            let mut resumed = init(&layout);
            let mut first = Optimizer::new(&cfg, &layout).expect("valid");
            for g in &grads[..4] {
                first.step(&mut resumed, g).expect("fits");
            }
            let saved = owned_state(&first);
            let mut second = Optimizer::new(&cfg, &layout).expect("valid");
            second
                .load_state(saved.iter().map(|(n, v)| (n.as_str(), v.as_slice())))
                .expect("loads");
            assert_eq!(second.step_count(), 4);
            for g in &grads[4..] {
                second.step(&mut resumed, g).expect("fits");
            }
            assert_eq!(bits(&straight), bits(&resumed), "{}", cfg.kind());
            assert_eq!(owned_state(&opt), owned_state(&second), "{}", cfg.kind());
        }
    }

    #[test]
    fn split_step_equals_whole_step() {
        let layout = layout();
        for cfg in configs() {
            let mut rng = Rng::new(9);
            let (mut whole, mut split) = (init(&layout), init(&layout));
            let (mut a, mut b) = (
                Optimizer::new(&cfg, &layout).expect("valid"),
                Optimizer::new(&cfg, &layout).expect("valid"),
            );
            for _ in 0..4 {
                let g = gradient(&layout, &mut rng);
                a.step(&mut whole, &g).expect("fits");
                // Buckets that cut through tensors, in reverse order.
                for r in [30..layout.len(), 7..30, 0..7] {
                    b.step_range(&mut split[r.clone()], &g.dense[r.clone()], r)
                        .expect("fits");
                }
                for s in &g.sparse {
                    b.step_sparse(&mut split, s).expect("fits");
                }
                b.finish_step();
            }
            assert_eq!(bits(&whole), bits(&split), "{}", cfg.kind());
        }
    }

    #[test]
    fn shards_equal_the_whole_and_hold_only_their_state() {
        let layout = layout();
        // 0..18 ends after row 1 of `emb` (12 + 2*3); the rest holds rows 2.. and the others.
        let cut = 18;
        for cfg in configs() {
            let mut rng = Rng::new(3);
            let mut whole = init(&layout);
            let mut opt = Optimizer::new(&cfg, &layout).expect("valid");
            let mut shards: Vec<(Range<usize>, Vec<f32>, Optimizer)> = [0..cut, cut..layout.len()]
                .into_iter()
                .map(|r| {
                    let o = Optimizer::for_range(&cfg, &layout, r.clone()).expect("valid");
                    (r.clone(), whole[r].to_vec(), o)
                })
                .collect();
            for _ in 0..3 {
                let g = gradient(&layout, &mut rng);
                opt.step(&mut whole, &g).expect("fits");
                for (r, params, o) in &mut shards {
                    o.step_range(params, &g.dense[r.clone()], r.clone()).expect("fits");
                    for s in &g.sparse {
                        // Each shard gets the rows it owns, as a parameter server would route them.
                        let t = &layout.tensors()[s.tensor];
                        let mut mine = SparseRows {
                            tensor: s.tensor,
                            row_len: s.row_len,
                            ..SparseRows::default()
                        };
                        for (i, &row) in s.rows.iter().enumerate() {
                            let start = t.offset + row as usize * s.row_len;
                            if r.contains(&start) {
                                mine.rows.push(row);
                                mine.values.extend_from_slice(s.row(i));
                            }
                        }
                        o.step_sparse(params, &mine).expect("owned rows");
                    }
                    o.finish_step();
                }
            }
            let joined: Vec<f32> = shards.iter().flat_map(|(_, p, _)| p.iter().copied()).collect();
            assert_eq!(bits(&whole), bits(&joined), "{}", cfg.kind());
            let state_len: usize = shards[0].2.state_tensors().iter().map(|(_, v)| v.len()).sum();
            assert_eq!(state_len, cut * shards[0].2.slots.len() + 2, "{}", cfg.kind());
        }
    }

    #[test]
    fn sparse_rows_match_a_dense_update_for_sgd_and_adagrad() {
        let mut sparse_layout = Layout::new();
        sparse_layout.push("emb", &[4, 2], ParamKind::Table);
        let mut dense_layout = Layout::new();
        dense_layout.push("emb", &[4, 2], ParamKind::Dense);
        let rows = SparseRows {
            tensor: 0,
            row_len: 2,
            rows: vec![2, 0],
            values: vec![1.0, -1.0, 0.5, 2.0],
        };
        let mut sparse_grad = Gradient::for_layout(&sparse_layout);
        sparse_grad.sparse[0] = rows;
        let mut dense_grad = Gradient::for_layout(&dense_layout);
        dense_grad.dense = vec![0.5, 2.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0];
        for cfg in [
            OptimConfig::Sgd(SgdConfig {
                lr: 0.1,
                ..SgdConfig::default()
            }),
            OptimConfig::Adagrad(AdagradConfig {
                lr: 0.1,
                initial_accumulator: 0.1,
                ..AdagradConfig::default()
            }),
        ] {
            let init = vec![1.0f32, -1.0, 0.5, 0.25, 2.0, 3.0, -0.5, 0.0];
            let (mut a, mut b) = (init.clone(), init);
            let mut oa = Optimizer::new(&cfg, &sparse_layout).expect("valid");
            let mut ob = Optimizer::new(&cfg, &dense_layout).expect("valid");
            for _ in 0..3 {
                oa.step(&mut a, &sparse_grad).expect("fits");
                ob.step(&mut b, &dense_grad).expect("fits");
            }
            assert_eq!(bits(&a), bits(&b), "{}", cfg.kind());
            assert_eq!(owned_state(&oa), owned_state(&ob), "{}", cfg.kind());
        }
    }

    #[test]
    fn state_is_named_after_the_parameters() {
        let layout = layout();
        let cfg = OptimConfig::Adam(AdamConfig::default());
        let opt = Optimizer::new(&cfg, &layout).expect("valid");
        let names: Vec<String> = opt.state_tensors().into_iter().map(|(n, _)| n).collect();
        assert_eq!(&names[..2], ["layers.0.weight.adam_m", "layers.0.weight.adam_v"]);
        assert_eq!(names.len(), 4 * 2 + 1);
        assert_eq!(names.last().map(String::as_str), Some(STEP_STATE_NAME));
        let plain = Optimizer::new(&OptimConfig::default(), &layout).expect("valid");
        assert_eq!(plain.state_tensors().len(), 1, "plain SGD keeps only the step count");
    }

    #[test]
    fn step_count_survives_beyond_f32_integers() {
        let layout = layout();
        let mut opt = Optimizer::new(&OptimConfig::default(), &layout).expect("valid");
        let target = (1u64 << 24) * 3 + 5;
        let state = [3.0f32, 4.0];
        opt.load_state(vec![(STEP_STATE_NAME, &state[..])]).expect("loads");
        opt.finish_step();
        assert_eq!(opt.step_count(), target);
        let saved = owned_state(&opt);
        let mut back = Optimizer::new(&OptimConfig::default(), &layout).expect("valid");
        back.load_state(saved.iter().map(|(n, v)| (n.as_str(), v.as_slice())))
            .expect("loads");
        assert_eq!(back.step_count(), target);
    }

    #[test]
    fn load_state_refuses_what_does_not_fit_and_changes_nothing() {
        let layout = layout();
        let cfg = OptimConfig::Adagrad(AdagradConfig::default());
        let mut opt = Optimizer::new(&cfg, &layout).expect("valid");
        let good = owned_state(&opt);
        let with = |edit: &dyn Fn(&mut OwnedState)| {
            let mut s = good.clone();
            edit(&mut s);
            s
        };
        let cases: Vec<(OwnedState, &str)> = vec![
            (with(&|s| drop(s.remove(0))), "layers.0.weight.adagrad_sum` is missing"),
            (
                with(&|s| s[1].1.push(0.0)),
                "emb.adagrad_sum`: 16 elements, expected 15",
            ),
            (
                with(&|s| s.push(("emb.adam_m".into(), vec![0.0; 15]))),
                "`emb.adam_m` is not state of this adagrad",
            ),
            (with(&|s| s.last_mut().expect("step").1[1] = 0.5), STEP_STATE_NAME),
            (with(&|s| s.push(s[0].clone())), "given twice"),
        ];
        for (state, want) in cases {
            let e = opt
                .load_state(state.iter().map(|(n, v)| (n.as_str(), v.as_slice())))
                .expect_err(want);
            assert!(e.to_string().contains(want), "{e} lacks {want}");
            assert_eq!(owned_state(&opt), good);
        }
        let moments = OptimConfig::Sgd(SgdConfig {
            momentum: 0.9,
            ..SgdConfig::default()
        });
        let e = Optimizer::new(&moments, &layout)
            .expect("valid")
            .load_state(good.iter().map(|(n, v)| (n.as_str(), v.as_slice())))
            .expect_err("adagrad state into sgd");
        assert!(matches!(e, OptimError::MissingState { .. }), "{e}");
    }

    #[test]
    fn bad_gradients_are_refused_before_any_update() {
        let layout = layout();
        let mut opt = Optimizer::new(&OptimConfig::default(), &layout).expect("valid");
        let mut params = init(&layout);
        let before = params.clone();
        let mut rng = Rng::new(1);
        let good = gradient(&layout, &mut rng);
        let mut cases: Vec<(Gradient, &str)> = Vec::new();
        let mut g = good.clone();
        g.dense.pop();
        cases.push((g, "dense gradient: 34 elements, expected 35"));
        let mut g = good.clone();
        g.sparse[0].rows.push(5);
        g.sparse[0].values.extend([0.0; 3]);
        cases.push((g, "`emb`: row 5 is out of range (the table has 5 rows)"));
        let mut g = good.clone();
        g.sparse[1].values.push(1.0);
        cases.push((g, "`lr.w`: values length"));
        let mut g = good.clone();
        g.sparse[0].tensor = 0;
        cases.push((g, "`layers.0.weight`: the tensor is Dense"));
        let mut g = good.clone();
        g.sparse[1].tensor = 9;
        cases.push((g, "tensor #9"));
        for (g, want) in cases {
            let e = opt.step(&mut params, &g).expect_err(want);
            assert!(e.to_string().contains(want), "{e} lacks {want}");
            assert_eq!(params, before);
            assert_eq!(opt.step_count(), 0);
        }
        let e = opt
            .step_range(&mut params[..3], &good.dense[..3], 33..36)
            .expect_err("outside");
        assert!(matches!(e, OptimError::Range { .. }), "{e}");
        let e = opt
            .step_range(&mut params[..3], &good.dense[..2], 0..3)
            .expect_err("short");
        assert!(matches!(e, OptimError::Length { .. }), "{e}");
        let mut shard = Optimizer::for_range(&OptimConfig::default(), &layout, 0..15).expect("valid");
        let rows = SparseRows {
            tensor: 1,
            row_len: 3,
            rows: vec![1],
            values: vec![1.0; 3],
        };
        let e = shard
            .step_sparse(&mut params[..15], &rows)
            .expect_err("row 1 spans 15..18");
        assert!(matches!(e, OptimError::RowNotOwned { row: 1, .. }), "{e}");
    }

    #[test]
    fn schedule_scales_the_learning_rate() {
        let mut layout = Layout::new();
        layout.push("w", &[1], ParamKind::Dense);
        let cfg = OptimConfig::Sgd(SgdConfig {
            lr: 1.0,
            schedule: LrSchedule::Step {
                every_steps: 1,
                gamma: 0.5,
            },
            ..SgdConfig::default()
        });
        let mut opt = Optimizer::new(&cfg, &layout).expect("valid");
        let mut p = [0.0f32];
        let mut g = Gradient::for_layout(&layout);
        g.dense[0] = 1.0;
        let mut seen = Vec::new();
        for _ in 0..3 {
            assert_eq!(opt.learning_rate(), 0.5f32.powi(opt.step_count() as i32));
            opt.step(&mut p, &g).expect("fits");
            seen.push(p[0]);
        }
        assert_eq!(seen, [-1.0, -1.5, -1.75]);
    }

    #[test]
    fn invalid_config_is_refused_at_construction() {
        let cfg = OptimConfig::Adam(AdamConfig {
            beta1: 1.5,
            ..AdamConfig::default()
        });
        let e = Optimizer::new(&cfg, &layout()).expect_err("beta1 1.5");
        assert!(e.to_string().contains("beta1"), "{e}");
    }
}
