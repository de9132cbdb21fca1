//! SGD with momentum, Nesterov momentum and L2 weight decay, in PyTorch's
//! form: `g += wd*p; v = mu*v + g; p -= lr * (nesterov ? g + mu*v : v)`.

use tensor::SparseRows;

use crate::config::SgdConfig;
use crate::rows::row_range;

/// The coefficients of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    pub lr: f32,
    pub momentum: f32,
    pub nesterov: bool,
    pub weight_decay: f32,
}

impl SgdStep {
    /// `lr` is the scheduled learning rate of this step.
    pub fn new(cfg: &SgdConfig, lr: f32) -> Self {
        Self {
            lr,
            momentum: cfg.momentum,
            nesterov: cfg.nesterov,
            weight_decay: cfg.weight_decay,
        }
    }
}

/// Updates `params` in place. `velocity` is the momentum buffer, of
/// `params.len()` elements, or empty when `momentum` is 0 (plain SGD keeps no state).
pub fn step_dense(h: &SgdStep, params: &mut [f32], grad: &[f32], velocity: &mut [f32]) {
    assert_eq!(params.len(), grad.len(), "sgd: params and grad differ in length");
    let SgdStep {
        lr,
        momentum: mu,
        nesterov,
        weight_decay: wd,
    } = *h;
    if velocity.is_empty() {
        for (p, &g) in params.iter_mut().zip(grad) {
            *p -= lr * (g + wd * *p);
        }
        return;
    }
    assert_eq!(
        params.len(),
        velocity.len(),
        "sgd: params and velocity differ in length"
    );
    // Separate loops so that each one vectorises without a branch inside.
    if nesterov {
        for ((p, &g), v) in params.iter_mut().zip(grad).zip(velocity) {
            let g = g + wd * *p;
            *v = mu * *v + g;
            *p -= lr * (g + mu * *v);
        }
    } else {
        for ((p, &g), v) in params.iter_mut().zip(grad).zip(velocity) {
            let g = g + wd * *p;
            *v = mu * *v + g;
            *p -= lr * *v;
        }
    }
}

/// Updates the touched rows of one table. `table` and `velocity` hold the
/// whole table (`velocity` empty without momentum); untouched rows keep their
/// parameters and their velocity (lazy momentum).
pub fn step_sparse(h: &SgdStep, table: &mut [f32], grad: &SparseRows, velocity: &mut [f32]) {
    for (i, &row) in grad.rows.iter().enumerate() {
        let r = row_range(row, grad.row_len);
        let v = if velocity.is_empty() {
            &mut [][..]
        } else {
            &mut velocity[r.clone()]
        };
        step_dense(h, &mut table[r], grad.row(i), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{a:?} != {b:?}");
        }
    }

    #[test]
    fn plain_sgd_with_weight_decay_by_hand() {
        let h = SgdStep {
            lr: 0.1,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.5,
        };
        let mut p = [1.0f32, -2.0];
        // p -= 0.1 * (g + 0.5 p): 1 - 0.1*(0.5+0.5) = 0.9; -2 - 0.1*(1 - 1) = -2.
        step_dense(&h, &mut p, &[0.5, 1.0], &mut []);
        close(&p, &[0.9, -2.0]);
        // 0.9 - 0.1*(0.5+0.45) = 0.805; -2 - 0.1*(1-1) = -2.
        step_dense(&h, &mut p, &[0.5, 1.0], &mut []);
        close(&p, &[0.805, -2.0]);
    }

    #[test]
    fn momentum_by_hand() {
        let h = SgdStep {
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        };
        let (mut p, mut v) = ([1.0f32], [0.0f32]);
        step_dense(&h, &mut p, &[1.0], &mut v); // v = 1, p = 0.9
        close(&v, &[1.0]);
        close(&p, &[0.9]);
        step_dense(&h, &mut p, &[1.0], &mut v); // v = 1.9, p = 0.71
        close(&v, &[1.9]);
        close(&p, &[0.71]);
        step_dense(&h, &mut p, &[-1.0], &mut v); // v = 0.71, p = 0.639
        close(&v, &[0.71]);
        close(&p, &[0.639]);
    }

    #[test]
    fn nesterov_with_weight_decay_by_hand() {
        let h = SgdStep {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.1,
        };
        let (mut p, mut v) = ([1.0f32], [0.0f32]);
        // g = 1 + 0.1 = 1.1; v = 1.1; p = 1 - 0.1*(1.1 + 0.99) = 0.791.
        step_dense(&h, &mut p, &[1.0], &mut v);
        close(&v, &[1.1]);
        close(&p, &[0.791]);
        // g = 1 + 0.0791 = 1.0791; v = 0.99 + 1.0791 = 2.0691;
        // p = 0.791 - 0.1*(1.0791 + 1.86219) = 0.496871.
        step_dense(&h, &mut p, &[1.0], &mut v);
        close(&v, &[2.0691]);
        close(&p, &[0.496871]);
    }

    #[test]
    fn sparse_without_momentum_equals_dense_with_zero_rows() {
        let h = SgdStep {
            lr: 0.05,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        };
        let init: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
        let grad = SparseRows {
            tensor: 0,
            row_len: 3,
            rows: vec![3, 1],
            values: vec![1.0, 2.0, 3.0, -1.0, 0.5, 4.0],
        };
        let mut dense_grad = vec![0.0f32; 12];
        dense_grad[9..12].copy_from_slice(&[1.0, 2.0, 3.0]);
        dense_grad[3..6].copy_from_slice(&[-1.0, 0.5, 4.0]);
        let (mut a, mut b) = (init.clone(), init);
        step_sparse(&h, &mut a, &grad, &mut []);
        step_dense(&h, &mut b, &dense_grad, &mut []);
        assert_eq!(a, b);
    }
}
