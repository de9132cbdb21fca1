//! A client's local training (epochs of minibatch steps on its own rows,
//! from the global model, with FedProx's proximal term, the update clipped
//! for DP-FedAvg) and the evaluation of a model on a test set: pure
//! computation, run by a client process or by a virtual client of `fl sim`.

use data::{Batch, Dataset};
use model::Model;
use optim::{OptimConfig, Optimizer};
use tensor::{Gradient, ParamKind, Rng};

use crate::error::FlError;
use crate::privacy::clip_l2;

/// How a client trains in a round.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalSpec {
    pub epochs: u32,
    pub batch_size: usize,
    /// FedProx's μ: each step adds μ·(w − w_global) to the dense gradient.
    pub proximal_mu: f32,
    pub optim: OptimConfig,
    /// DP-FedAvg's C (`fl.dp.clip_norm`): the update is clipped to this L2
    /// norm before it leaves the trainer, so no caller can send it unclipped.
    pub clip_norm: Option<f64>,
}

/// What a client's round of training gave.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainResult {
    pub samples: u64,
    /// Mean batch loss of the last local epoch.
    pub train_loss: f32,
    pub steps: u64,
    /// The update's L2 norm before clipping (summed in f64; not finite if training diverged).
    pub delta_norm: f64,
}

/// A model with its scratch space, reused across the rounds a thread or
/// process trains: a round allocates nothing once warm but the optimizer state.
pub struct LocalTrainer {
    model: Box<dyn Model>,
    grad: Gradient,
    batch: Batch,
    order: Vec<usize>,
    params: Vec<f32>,
}

impl LocalTrainer {
    /// `data` names the feature kind of the batches (dense or sparse).
    pub fn new(model: Box<dyn Model>, data: &Dataset) -> Self {
        let grad = Gradient::for_layout(model.layout());
        Self {
            model,
            grad,
            batch: Batch::for_dataset(data),
            order: Vec::new(),
            params: Vec::new(),
        }
    }

    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    pub fn model_mut(&mut self) -> &mut dyn Model {
        self.model.as_mut()
    }

    /// Trains from `global` on `rows` of `data` and writes `local − global`
    /// into `delta`, clipped to `spec.clip_norm` if set. Each epoch visits the
    /// rows in an order drawn from (`seed`, epoch); the last batch of an epoch
    /// may be short.
    ///
    /// An update with a non-finite value is left as it is rather than
    /// clipped (which would zero it): the server's check then refuses it and
    /// says why, as it does without clipping.
    pub fn train(
        &mut self,
        global: &[f32],
        data: &Dataset,
        rows: &[usize],
        spec: &LocalSpec,
        seed: u64,
        delta: &mut Vec<f32>,
    ) -> Result<TrainResult, FlError> {
        let layout = self.model.layout().clone();
        if global.len() != layout.len() {
            return Err(FlError::Model(format!(
                "the global model has {} values, the local model {}",
                global.len(),
                layout.len()
            )));
        }
        if rows.is_empty() {
            return Err(FlError::Model("the client holds no training rows".into()));
        }
        // A client process takes C from its server: checked, not trusted.
        if let Some(c) = spec.clip_norm
            && !(c > 0.0 && c.is_finite())
        {
            return Err(FlError::Privacy {
                name: "clip_norm",
                value: c,
                why: "is not a finite value > 0",
            });
        }
        let mut opt = Optimizer::new(&spec.optim, &layout).map_err(|e| FlError::Model(e.to_string()))?;
        self.params.clear();
        self.params.extend_from_slice(global);
        let dense: Vec<std::ops::Range<usize>> = layout
            .tensors()
            .iter()
            .filter(|t| t.kind == ParamKind::Dense)
            .map(|t| t.range())
            .collect();
        let mut steps = 0;
        let mut last_loss = 0.0;
        for epoch in 0..spec.epochs {
            self.order.clear();
            self.order.extend_from_slice(rows);
            Rng::derive(seed, epoch as u64).shuffle(&mut self.order);
            let (mut loss_sum, mut batches) = (0.0f64, 0u64);
            for chunk in self.order.chunks(spec.batch_size.max(1)) {
                self.batch.gather(data, chunk);
                let loss = self
                    .model
                    .forward_backward(&self.params, &self.batch, &mut self.grad, &mut |_, _| {});
                if spec.proximal_mu > 0.0 {
                    for r in &dense {
                        for ((g, &w), &w0) in self.grad.dense[r.clone()]
                            .iter_mut()
                            .zip(&self.params[r.clone()])
                            .zip(&global[r.clone()])
                        {
                            *g += spec.proximal_mu * (w - w0);
                        }
                    }
                }
                opt.step(&mut self.params, &self.grad)
                    .map_err(|e| FlError::Model(e.to_string()))?;
                loss_sum += loss as f64;
                batches += 1;
                steps += 1;
            }
            last_loss = (loss_sum / batches.max(1) as f64) as f32;
        }
        delta.clear();
        delta.extend(self.params.iter().zip(global).map(|(&w, &w0)| w - w0));
        let delta_norm = delta.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
        if let Some(c) = spec.clip_norm
            && delta_norm.is_finite()
        {
            clip_l2(delta, c);
        }
        Ok(TrainResult {
            samples: rows.len() as u64,
            train_loss: last_loss,
            steps,
            delta_norm,
        })
    }
}

/// A client's side of a compressed update: the codec and, with error
/// feedback, what compression left out of its earlier updates.
pub struct UpdateEncoder {
    spec: codec::CodecSpec,
    feedback: Option<codec::ErrorFeedback>,
}

impl UpdateEncoder {
    /// `spec` must have passed `FlConfig::validate` (no PowerSGD).
    pub fn new(spec: codec::CodecSpec, error_feedback: bool, model_len: usize) -> Self {
        let feedback = (error_feedback && spec != codec::CodecSpec::None).then(|| codec::ErrorFeedback::new(model_len));
        Self { spec, feedback }
    }

    /// `None` when updates go as plain `f32` (the `none` codec).
    pub fn is_plain(&self) -> bool {
        self.spec == codec::CodecSpec::None
    }

    /// Encodes `delta` into `out` (a self-describing codec message).
    pub fn encode(&mut self, delta: &[f32], seed: u64, out: &mut Vec<u8>) -> Result<(), FlError> {
        let r = match &mut self.feedback {
            Some(f) => f.compress(&self.spec, delta, seed, out),
            None => codec::encode(&self.spec, delta, seed, out),
        };
        r.map_err(|e| FlError::Model(format!("compressing the update: {e}")))
    }
}

/// A compressed update's values, `model_len` of them; a malformed message is an error saying what.
pub fn decode_update(bytes: &[u8], model_len: usize) -> Result<Vec<f32>, String> {
    let mut out = vec![0.0f32; model_len];
    codec::decode(bytes, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Test metrics of a model.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Metrics {
    /// Accuracy (multi-class), or accuracy at 0.5 (binary).
    pub acc: f64,
    /// Binary models only.
    pub auc: Option<f64>,
    pub log_loss: Option<f64>,
}

/// Rows per prediction batch when evaluating.
pub const EVAL_BATCH_ROWS: usize = 1024;

/// The model's probabilities for `rows` of `test`, in row order, appended to `out`.
pub fn predict_rows(model: &mut dyn Model, params: &[f32], test: &Dataset, rows: &[usize], out: &mut Vec<f32>) {
    let mut batch = Batch::for_dataset(test);
    let mut probs = Vec::new();
    for chunk in rows.chunks(EVAL_BATCH_ROWS) {
        batch.gather(test, chunk);
        model.predict(params, &batch, &mut probs);
        out.extend_from_slice(&probs);
    }
}

/// Metrics from the probabilities of every row of `test`, in row order:
/// `classes` per row from a multi-class model (a softmax over two classes
/// included), one per row (of class 1) from a binary one.
pub fn metrics(probs: &[f32], classes: usize, test: &Dataset) -> Metrics {
    if probs.len() != test.rows() {
        return Metrics {
            acc: model::metrics::accuracy(probs, classes, &test.labels),
            auc: None,
            log_loss: None,
        };
    }
    let correct = probs
        .iter()
        .zip(&test.labels)
        .filter(|(p, y)| (**p >= 0.5) == (**y == 1))
        .count();
    Metrics {
        acc: correct as f64 / test.rows().max(1) as f64,
        auc: Some(model::metrics::auc(probs, &test.labels)),
        log_loss: Some(model::metrics::log_loss(probs, &test.labels)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use data::Features;

    fn blobs(rows: usize, seed: u64) -> Dataset {
        let mut rng = Rng::new(seed);
        let mut values = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..rows {
            let y = rng.below(2) as u32;
            let c = if y == 1 { 1.0 } else { -1.0 };
            values.extend([c + 0.3 * rng.normal() as f32, c + 0.3 * rng.normal() as f32]);
            labels.push(y);
        }
        Dataset {
            features: Features::Dense { dim: 2, values },
            labels,
            num_classes: 2,
        }
    }

    fn spec(mu: f32) -> LocalSpec {
        LocalSpec {
            epochs: 2,
            batch_size: 16,
            proximal_mu: mu,
            optim: OptimConfig::Sgd(optim::SgdConfig {
                lr: 0.1,
                ..Default::default()
            }),
            clip_norm: None,
        }
    }

    fn trainer(ds: &Dataset) -> LocalTrainer {
        LocalTrainer::new(Box::new(model::SoftmaxRegression::new(2, 2)), ds)
    }

    #[test]
    fn local_training_learns_and_repeats_exactly() {
        let ds = blobs(200, 1);
        let rows: Vec<usize> = (0..200).collect();
        let global = vec![0.0; trainer(&ds).model().layout().len()];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let ra = trainer(&ds).train(&global, &ds, &rows, &spec(0.0), 5, &mut a).unwrap();
        trainer(&ds).train(&global, &ds, &rows, &spec(0.0), 5, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!((ra.samples, ra.steps), (200, 26));
        let local: Vec<f32> = global.iter().zip(&a).map(|(g, d)| g + d).collect();
        let mut t = trainer(&ds);
        let mut probs = Vec::new();
        predict_rows(t.model.as_mut(), &local, &ds, &rows, &mut probs);
        assert!(metrics(&probs, 2, &ds).acc > 0.95);
    }

    #[test]
    fn the_proximal_term_keeps_the_model_nearer_the_global_one() {
        let ds = blobs(200, 2);
        let rows: Vec<usize> = (0..200).collect();
        let global = vec![0.0; trainer(&ds).model().layout().len()];
        let norm = |mu| {
            let mut d = Vec::new();
            trainer(&ds).train(&global, &ds, &rows, &spec(mu), 5, &mut d).unwrap();
            d.iter().map(|x| x * x).sum::<f32>().sqrt()
        };
        assert!(norm(1.0) < 0.8 * norm(0.0), "{} vs {}", norm(1.0), norm(0.0));
    }

    #[test]
    fn a_client_without_rows_or_with_a_wrong_model_is_an_error() {
        let ds = blobs(10, 3);
        let mut d = Vec::new();
        assert!(trainer(&ds).train(&[0.0; 6], &ds, &[], &spec(0.0), 1, &mut d).is_err());
        assert!(trainer(&ds).train(&[0.0; 5], &ds, &[0], &spec(0.0), 1, &mut d).is_err());
    }

    #[test]
    fn a_clipped_update_leaves_within_the_bound_and_keeps_its_direction() {
        let ds = blobs(200, 4);
        let rows: Vec<usize> = (0..200).collect();
        let global = vec![0.0; trainer(&ds).model().layout().len()];
        let (mut free, mut clipped) = (Vec::new(), Vec::new());
        let r = trainer(&ds)
            .train(&global, &ds, &rows, &spec(0.0), 5, &mut free)
            .unwrap();
        let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
        assert_eq!(r.delta_norm, norm(&free));
        let c = r.delta_norm / 4.0;
        let bounded = LocalSpec {
            clip_norm: Some(c),
            ..spec(0.0)
        };
        let rc = trainer(&ds)
            .train(&global, &ds, &rows, &bounded, 5, &mut clipped)
            .unwrap();
        // The norm before clipping is reported; the update itself is within C, exactly.
        assert_eq!(rc.delta_norm, r.delta_norm);
        assert!(
            norm(&clipped) <= c && norm(&clipped) > c * (1.0 - 1e-5),
            "{} vs {c}",
            norm(&clipped)
        );
        for (a, b) in free.iter().zip(&clipped) {
            assert!((f64::from(*a) / 4.0 - f64::from(*b)).abs() < 1e-6, "{a} {b}");
        }
        // A bound above the norm leaves the update bitwise alone.
        let loose = LocalSpec {
            clip_norm: Some(r.delta_norm * 2.0),
            ..spec(0.0)
        };
        trainer(&ds)
            .train(&global, &ds, &rows, &loose, 5, &mut clipped)
            .unwrap();
        assert_eq!(clipped, free);
        // A bound that came over the wire broken is an error, not a panic.
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let broken = LocalSpec {
                clip_norm: Some(bad),
                ..spec(0.0)
            };
            let err = trainer(&ds)
                .train(&global, &ds, &rows, &broken, 5, &mut clipped)
                .unwrap_err();
            assert!(err.to_string().contains("clip_norm"), "{err}");
        }
    }
}
