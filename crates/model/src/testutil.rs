//! Test helpers shared by the models' tests: random batches, a central
//! finite-difference gradient check and a check of the `ready` protocol.

use std::ops::Range;

use data::{Batch, BatchFeatures};
use tensor::{Gradient, ParamKind, Rng};

use crate::Model;

/// `rows` rows of `dim` standard-normal features with labels below `classes`.
pub fn dense_batch(dim: usize, rows: usize, classes: u32, seed: u64) -> Batch {
    let mut rng = Rng::new(seed);
    let values = (0..rows * dim).map(|_| rng.normal() as f32).collect();
    let labels = (0..rows).map(|_| rng.below(classes.into()) as u32).collect();
    Batch {
        features: BatchFeatures::Dense { dim, values },
        labels,
    }
}

/// `rows` binary-labelled sparse rows of 0..=max_nnz indices below `dim`
/// (repeats within a row allowed) with values in ±[0.5, 1.5).
pub fn sparse_batch(dim: u64, rows: usize, max_nnz: u64, seed: u64) -> Batch {
    let mut rng = Rng::new(seed);
    let (mut indptr, mut indices, mut values) = (vec![0u32], Vec::new(), Vec::new());
    for _ in 0..rows {
        for _ in 0..rng.below(max_nnz + 1) {
            indices.push(rng.below(dim) as u32);
            let sign = if rng.below(2) == 0 { -1.0 } else { 1.0 };
            values.push(sign * (0.5 + rng.next_f32()));
        }
        indptr.push(indices.len() as u32);
    }
    let labels = (0..rows).map(|_| rng.below(2) as u32).collect();
    Batch {
        features: BatchFeatures::Sparse {
            dim,
            indptr,
            indices,
            values,
        },
        labels,
    }
}

/// The gradient as one flat vector: dense ranges as given, table rows
/// scattered from `grad.sparse` (zero where untouched). Asserts that every
/// table tensor has exactly one sparse entry with distinct rows.
pub fn flatten(model: &dyn Model, grad: &Gradient) -> Vec<f32> {
    let layout = model.layout();
    let mut flat = vec![0.0f32; layout.len()];
    for (i, t) in layout.tensors().iter().enumerate() {
        match t.kind {
            ParamKind::Dense => flat[t.range()].copy_from_slice(&grad.dense[t.range()]),
            ParamKind::Table => {
                let s: Vec<_> = grad.sparse.iter().filter(|s| s.tensor == i).collect();
                assert_eq!(s.len(), 1, "{}: one sparse entry", t.name);
                let s = s[0];
                assert_eq!(s.row_len, t.row_len(), "{}: row_len", t.name);
                assert_eq!(s.values.len(), s.rows.len() * s.row_len, "{}: values length", t.name);
                let mut seen = std::collections::HashSet::new();
                for (k, &r) in s.rows.iter().enumerate() {
                    assert!(seen.insert(r), "{}: row {r} repeated", t.name);
                    assert!((r as usize) < t.shape[0], "{}: row {r} out of range", t.name);
                    let at = t.offset + r as usize * s.row_len;
                    flat[at..at + s.row_len].copy_from_slice(s.row(k));
                }
            }
        }
    }
    assert_eq!(
        grad.sparse.len(),
        layout.tensors().iter().filter(|t| t.kind == ParamKind::Table).count()
    );
    flat
}

/// Compares the model's gradient with central differences of its loss in
/// every parameter, at parameters from `init` plus uniform noise in ±0.3 (so
/// that zero-initialised tables are tested away from zero).
pub fn check_gradient(model: &mut dyn Model, batch: &Batch, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut params = vec![0.0f32; model.layout().len()];
    model.init(&mut params, &mut rng);
    params.iter_mut().for_each(|p| *p += (rng.next_f32() - 0.5) * 0.6);
    let mut grad = Gradient::for_layout(model.layout());
    model.forward_backward(&params, batch, &mut grad, &mut |_, _| {});
    let analytic = flatten(model, &grad);

    let eps = 2e-3f32;
    let mut scratch = Gradient::for_layout(model.layout());
    let mut worst = 0.0f32;
    for i in 0..params.len() {
        let keep = params[i];
        params[i] = keep + eps;
        let up = model.forward_backward(&params, batch, &mut scratch, &mut |_, _| {});
        params[i] = keep - eps;
        let down = model.forward_backward(&params, batch, &mut scratch, &mut |_, _| {});
        params[i] = keep;
        let numeric = (up - down) / (2.0 * eps);
        let err = (numeric - analytic[i]).abs();
        worst = worst.max(err / (1e-3 + analytic[i].abs()));
        assert!(
            err <= 5e-4 + 0.02 * analytic[i].abs(),
            "parameter {i}: analytic {} numeric {numeric}",
            analytic[i]
        );
    }
    let norm: f32 = analytic.iter().map(|g| g * g).sum::<f32>().sqrt();
    assert!(norm > 1e-3, "gradient is (nearly) zero: the check tested nothing");
}

/// Asserts that `ready` was called once per dense tensor, in descending
/// offset order (last layer first), with the final gradient values.
pub fn check_ready_order(model: &mut dyn Model, batch: &Batch, seed: u64) {
    let mut params = vec![0.0f32; model.layout().len()];
    model.init(&mut params, &mut Rng::new(seed));
    let mut grad = Gradient::for_layout(model.layout());
    grad.dense.fill(f32::NAN);
    let mut calls: Vec<(Range<usize>, Vec<f32>)> = Vec::new();
    model.forward_backward(&params, batch, &mut grad, &mut |r, v| calls.push((r, v.to_vec())));
    let mut want: Vec<Range<usize>> = model
        .layout()
        .tensors()
        .iter()
        .filter(|t| t.kind == ParamKind::Dense)
        .map(|t| t.range())
        .collect();
    want.reverse();
    let got: Vec<Range<usize>> = calls.iter().map(|c| c.0.clone()).collect();
    assert_eq!(got, want);
    for (r, v) in &calls {
        assert_eq!(&grad.dense[r.clone()], v.as_slice(), "{r:?} changed after ready");
        assert!(v.iter().all(|g| g.is_finite()), "{r:?} not written");
    }
}
