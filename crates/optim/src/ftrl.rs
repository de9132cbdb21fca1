//! FTRL-Proximal (McMahan et al. 2013, "Ad Click Prediction: a View from the
//! Trenches", Algorithm 1), per coordinate:
//!
//! ```text
//! sigma = (sqrt(n + g^2) - sqrt(n)) / alpha
//! z += g - sigma * w;   n += g^2
//! w = 0                                                   if |z| <= l1
//!   = -(z - sign(z) * l1) / ((beta + sqrt(n)) / alpha + l2)   otherwise
//! ```
//!
//! The parameters are the weights `w`; they are recomputed from `z` and `n`
//! after each update, so a coordinate whose `|z|` stays within `l1` is an
//! exact zero (the sparsity FTRL is used for). Starting from `z = n = 0` the
//! weights are 0 whatever the buffer held before the first update.

use tensor::SparseRows;

use crate::config::FtrlConfig;
use crate::rows::row_range;

/// The coefficients of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FtrlStep {
    pub alpha: f32,
    pub beta: f32,
    pub l1: f32,
    pub l2: f32,
}

impl FtrlStep {
    /// `alpha` is the scheduled learning rate of this step.
    pub fn new(cfg: &FtrlConfig, alpha: f32) -> Self {
        Self {
            alpha,
            beta: cfg.beta,
            l1: cfg.l1,
            l2: cfg.l2,
        }
    }
}

/// Updates `z` and `n` from the gradient and writes the weights into `params`.
pub fn step_dense(h: &FtrlStep, params: &mut [f32], grad: &[f32], z: &mut [f32], n: &mut [f32]) {
    let len = params.len();
    assert!(
        grad.len() == len && z.len() == len && n.len() == len,
        "ftrl: slices differ in length"
    );
    let FtrlStep { alpha, beta, l1, l2 } = *h;
    for (((w, &g), z), n) in params.iter_mut().zip(grad).zip(z).zip(n) {
        let n_new = *n + g * g;
        let sigma = (n_new.sqrt() - n.sqrt()) / alpha;
        *z += g - sigma * *w;
        *n = n_new;
        *w = if z.abs() <= l1 {
            0.0
        } else {
            -(*z - l1.copysign(*z)) / ((beta + n.sqrt()) / alpha + l2)
        };
    }
}

/// Updates the touched rows of one table; `table`, `z` and `n` hold the whole table.
pub fn step_sparse(h: &FtrlStep, table: &mut [f32], grad: &SparseRows, z: &mut [f32], n: &mut [f32]) {
    for (i, &row) in grad.rows.iter().enumerate() {
        let r = row_range(row, grad.row_len);
        step_dense(h, &mut table[r.clone()], grad.row(i), &mut z[r.clone()], &mut n[r]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f32, want: f64) {
        assert!(
            (got as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{got} != {want}"
        );
    }

    #[test]
    fn ftrl_by_hand() {
        let h = FtrlStep {
            alpha: 0.5,
            beta: 1.0,
            l1: 0.1,
            l2: 0.2,
        };
        let (mut w, mut z, mut n) = ([0.0f32], [0.0f32], [0.0f32]);
        // g = 2: sigma = (2 - 0)/0.5 = 4; z = 2 - 4*0 = 2; n = 4;
        // w = -(2 - 0.1) / ((1 + 2)/0.5 + 0.2) = -1.9 / 6.2.
        step_dense(&h, &mut w, &[2.0], &mut z, &mut n);
        close(z[0], 2.0);
        close(n[0], 4.0);
        let w1 = -1.9 / 6.2;
        close(w[0], w1);
        // g = -1: sigma = (sqrt(5) - 2)/0.5; z = 2 - 1 - sigma*w1; n = 5;
        // w = -(z - 0.1) / ((1 + sqrt(5))/0.5 + 0.2).
        step_dense(&h, &mut w, &[-1.0], &mut z, &mut n);
        let sigma = (5f64.sqrt() - 2.0) / 0.5;
        let z2 = 1.0 - sigma * w1;
        close(z[0], z2);
        close(n[0], 5.0);
        close(w[0], -(z2 - 0.1) / ((1.0 + 5f64.sqrt()) / 0.5 + 0.2));
    }

    #[test]
    fn large_l1_gives_exact_zeros() {
        let h = FtrlStep {
            alpha: 0.1,
            beta: 1.0,
            l1: 10.0,
            l2: 0.0,
        };
        let mut w = vec![0.3f32, -0.2, 0.0, 5.0];
        let (mut z, mut n) = (vec![0.0f32; 4], vec![0.0f32; 4]);
        for _ in 0..20 {
            step_dense(&h, &mut w, &[0.4, -0.3, 0.1, 0.0], &mut z, &mut n);
        }
        assert!(w.iter().all(|&x| x == 0.0), "{w:?}");
        assert!(z.iter().all(|z| z.abs() <= 10.0), "{z:?}");
        // A consistent strong gradient eventually crosses the l1 threshold.
        for _ in 0..100 {
            step_dense(&h, &mut w, &[1.0, -1.0, 0.0, 0.0], &mut z, &mut n);
        }
        assert!(w[0] < 0.0 && w[1] > 0.0 && w[2] == 0.0 && w[3] == 0.0, "{w:?}");
    }

    #[test]
    fn sparse_equals_dense_on_touched_rows() {
        let h = FtrlStep {
            alpha: 0.1,
            beta: 1.0,
            l1: 0.01,
            l2: 0.1,
        };
        let (mut a, mut b) = (vec![0.0f32; 6], vec![0.0f32; 6]);
        let (mut za, mut na, mut zb, mut nb) = (vec![0.0; 6], vec![0.0; 6], vec![0.0; 6], vec![0.0; 6]);
        let grad = SparseRows {
            tensor: 0,
            row_len: 3,
            rows: vec![1],
            values: vec![0.5, -1.0, 0.0],
        };
        let dense = [0.0, 0.0, 0.0, 0.5, -1.0, 0.0];
        for _ in 0..3 {
            step_sparse(&h, &mut a, &grad, &mut za, &mut na);
            step_dense(&h, &mut b, &dense, &mut zb, &mut nb);
        }
        assert_eq!((a, za, na), (b, zb, nb));
    }
}
