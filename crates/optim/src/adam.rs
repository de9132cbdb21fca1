//! Adam (Kingma & Ba) with bias correction, and AdamW's decoupled weight decay,
//! in PyTorch's form.
//!
//! The row-sparse version is *lazy*: only the touched rows' moments decay and
//! update, and bias correction uses the optimizer's global step count `t` (as
//! PyTorch's `SparseAdam` and TensorFlow's `LazyAdam` do), not a per-row
//! count. A row first touched at step `t` therefore sees a bias correction
//! for `t` steps of history it never had; its first update is smaller than a
//! fresh dense Adam's would be. Per-row counts would cost one more value per
//! row in the state and in every checkpoint.

use tensor::SparseRows;

use crate::config::AdamConfig;
use crate::rows::row_range;

/// The coefficients of one step `t` (1-based).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// AdamW: decay the parameters directly rather than through the gradient.
    pub decoupled: bool,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bias_correction2_sqrt: f32,
}

impl AdamStep {
    /// `lr` is the scheduled learning rate of step `t >= 1`.
    pub fn new(cfg: &AdamConfig, decoupled: bool, lr: f32, t: u64) -> Self {
        assert!(t >= 1, "adam: steps count from 1");
        let t = t as f64;
        let bc1 = 1.0 - (cfg.beta1 as f64).powf(t);
        let bc2 = 1.0 - (cfg.beta2 as f64).powf(t);
        Self {
            lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            decoupled,
            step_size: (lr as f64 / bc1) as f32,
            bias_correction2_sqrt: bc2.sqrt() as f32,
        }
    }
}

/// Updates `params` and the first and second moments `m` and `v` in place.
pub fn step_dense(h: &AdamStep, params: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
    let n = params.len();
    assert!(
        grad.len() == n && m.len() == n && v.len() == n,
        "adam: slices differ in length"
    );
    let (b1, b2, eps) = (h.beta1, h.beta2, h.eps);
    let (c1, c2) = (1.0 - b1, 1.0 - b2);
    let (step_size, bc2) = (h.step_size, h.bias_correction2_sqrt);
    // AdamW shrinks p first; Adam adds wd*p to the gradient.
    let (shrink, l2) = if h.decoupled {
        (1.0 - h.lr * h.weight_decay, 0.0)
    } else {
        (1.0, h.weight_decay)
    };
    for (((p, &g), m), v) in params.iter_mut().zip(grad).zip(m).zip(v) {
        let g = g + l2 * *p;
        *p *= shrink;
        *m = b1 * *m + c1 * g;
        *v = b2 * *v + c2 * g * g;
        *p -= step_size * *m / (v.sqrt() / bc2 + eps);
    }
}

/// Lazy Adam over the touched rows of one table; `table`, `m` and `v` hold the whole table.
pub fn step_sparse(h: &AdamStep, table: &mut [f32], grad: &SparseRows, m: &mut [f32], v: &mut [f32]) {
    for (i, &row) in grad.rows.iter().enumerate() {
        let r = row_range(row, grad.row_len);
        step_dense(h, &mut table[r.clone()], grad.row(i), &mut m[r.clone()], &mut v[r]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(weight_decay: f32) -> AdamConfig {
        AdamConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay,
            ..AdamConfig::default()
        }
    }

    fn close(got: f32, want: f64) {
        assert!(
            (got as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{got} != {want}"
        );
    }

    #[test]
    fn adam_by_hand() {
        let c = cfg(0.0);
        let (mut p, mut m, mut v) = ([1.0f32], [0.0f32], [0.0f32]);
        // t=1, g=2: m = 0.2, v = 0.04; mhat = 2, vhat = 4; p = 1 - 0.1 * 2/2 = 0.9.
        step_dense(&AdamStep::new(&c, false, 0.1, 1), &mut p, &[2.0], &mut m, &mut v);
        close(m[0], 0.2);
        close(v[0], 0.04);
        close(p[0], 0.9);
        // t=2, g=-1: m = 0.18 - 0.1 = 0.08, v = 0.0396 + 0.01 = 0.0496;
        // mhat = 0.08/0.19, vhat = 0.0496/0.0199; p = 0.9 - 0.1*mhat/sqrt(vhat).
        step_dense(&AdamStep::new(&c, false, 0.1, 2), &mut p, &[-1.0], &mut m, &mut v);
        close(m[0], 0.08);
        close(v[0], 0.0496);
        let want = 0.9 - 0.1 * (0.08 / 0.19) / (0.0496f64 / 0.0199).sqrt();
        close(p[0], want);
    }

    #[test]
    fn adam_weight_decay_enters_the_gradient() {
        let c = cfg(0.5);
        let (mut p, mut m, mut v) = ([2.0f32], [0.0f32], [0.0f32]);
        // g = 1 + 0.5*2 = 2: m = 0.2, v = 0.04, p = 2 - 0.1 = 1.9.
        step_dense(&AdamStep::new(&c, false, 0.1, 1), &mut p, &[1.0], &mut m, &mut v);
        close(m[0], 0.2);
        close(p[0], 1.9);
    }

    #[test]
    fn adamw_decays_the_parameter_directly() {
        let c = cfg(0.5);
        let (mut p, mut m, mut v) = ([2.0f32], [0.0f32], [0.0f32]);
        // p = 2 * (1 - 0.05) = 1.9; g = 1: m = 0.1, v = 0.01, step = 0.1 * 1/1; p = 1.8.
        step_dense(&AdamStep::new(&c, true, 0.1, 1), &mut p, &[1.0], &mut m, &mut v);
        close(m[0], 0.1);
        close(v[0], 0.01);
        close(p[0], 1.8);
        // t=2, g=1: p = 1.8*0.95 = 1.71; m = 0.19, v = 0.0199; mhat = 1, vhat = 1; p = 1.61.
        step_dense(&AdamStep::new(&c, true, 0.1, 2), &mut p, &[1.0], &mut m, &mut v);
        close(p[0], 1.61);
    }

    #[test]
    fn lazy_sparse_equals_dense_on_rows_touched_every_step() {
        let c = cfg(0.0);
        let init: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
        let (mut a, mut b) = (init.clone(), init);
        let (mut am, mut av, mut bm, mut bv) = (vec![0.0; 6], vec![0.0; 6], vec![0.0; 6], vec![0.0; 6]);
        let grad = SparseRows {
            tensor: 0,
            row_len: 2,
            rows: vec![2, 0],
            values: vec![0.5, -1.0, 2.0, 0.25],
        };
        let dense = [2.0, 0.25, 0.0, 0.0, 0.5, -1.0];
        for t in 1..=3 {
            let h = AdamStep::new(&c, false, 0.1, t);
            step_sparse(&h, &mut a, &grad, &mut am, &mut av);
            step_dense(&h, &mut b, &dense, &mut bm, &mut bv);
        }
        for i in [0, 1, 4, 5] {
            assert_eq!((a[i], am[i], av[i]), (b[i], bm[i], bv[i]), "element {i}");
        }
        // The untouched row keeps its parameters and zero moments.
        assert_eq!((a[2], a[3], am[2], av[3]), (-0.5, 0.5, 0.0, 0.0));
    }
}
