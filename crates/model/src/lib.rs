//! Models with hand-written forward and backward passes over a flat parameter
//! buffer, the losses they train with, and the metrics they are judged by.
//!
//! **Invariant:** a model never owns its parameters. The caller holds the
//! flat buffer (so the same buffer can be all-reduced, sharded, optimised and
//! checkpointed without the model's help); the model holds only scratch space,
//! sized on first use and reused, so a step allocates nothing once warm.
//!
//! Numbers: the MLP 784-256-256-10 costs 2·(784·256 + 256·256 + 256·10) ≈
//! 0.54 MFLOP per sample forward and twice that backward less the unneeded
//! input gradient of the first layer, ≈ 1.2 MFLOP per sample; at the ~200
//! GFLOP/s the GEMM reaches on these shapes that bounds one thread at ~160k
//! samples/s. Sparse models cost O(nnz) (O(factors·nnz) for FM) per batch and
//! touch only the rows of their tables that the batch names.

mod config;
mod dense;
pub mod loss;
pub mod metrics;
mod sparse;

use std::ops::Range;

use data::Batch;
use tensor::{Gradient, Layout, Rng};

pub use config::{FACTORS_MAX, HASH_BITS_MAX, HIDDEN_WIDTH_MAX, ModelConfig, ModelError, build};
pub use dense::{Mlp, SoftmaxRegression};
pub use sparse::{FactorizationMachine, SparseLogReg};

/// A trainable model over a flat parameter buffer described by [`Model::layout`].
pub trait Model: Send {
    /// Names, shapes and kinds of the parameters, in buffer order.
    fn layout(&self) -> &Layout;

    /// Writes initial values into `params` (length `layout().len()`).
    fn init(&self, params: &mut [f32], rng: &mut Rng);

    /// Forward and backward pass on `batch`; returns the mean loss over the batch.
    ///
    /// Overwrites the `Dense` ranges of `grad.dense` and replaces `grad.sparse`
    /// with the mean-loss gradient. Calls `ready(range, values)` once per dense
    /// tensor as soon as its gradient is final, in backward order (last layer
    /// first), where `values` is `grad.dense[range]`, so a caller can start
    /// communicating it while earlier layers still compute (the caller cannot
    /// read `grad` itself while the model holds it).
    fn forward_backward(
        &mut self,
        params: &[f32],
        batch: &Batch,
        grad: &mut Gradient,
        ready: &mut dyn FnMut(Range<usize>, &[f32]),
    ) -> f32;

    /// Predictions for `batch` into `out`: `rows × classes` probabilities for
    /// multi-class models, `rows` probabilities of class 1 for binary ones.
    fn predict(&mut self, params: &[f32], batch: &Batch, out: &mut Vec<f32>);

    /// Number of classes the model predicts (2 for binary models).
    fn num_classes(&self) -> usize;

    /// The distinct rows of the model's `Table` tensors that a pass over
    /// `batch` reads, ascending, into `rows` (cleared first). Every table of
    /// a model is indexed by the same row ids. A parameter-server worker
    /// pulls exactly these rows before the step. Dense models touch none.
    fn touched_rows(&self, _batch: &Batch, rows: &mut Vec<u32>) {
        rows.clear();
    }
}

#[cfg(test)]
mod testutil;
