//! Adagrad (Duchi, Hazan & Singer 2011) in PyTorch's form:
//! `s += g^2; p -= lr * g / (sqrt(s) + eps)`.

use tensor::SparseRows;

use crate::config::AdagradConfig;
use crate::rows::row_range;

/// The coefficients of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdagradStep {
    pub lr: f32,
    pub eps: f32,
}

impl AdagradStep {
    /// `lr` is the scheduled learning rate of this step.
    pub fn new(cfg: &AdagradConfig, lr: f32) -> Self {
        Self { lr, eps: cfg.eps }
    }
}

/// Updates `params` and the squared-gradient sums `sum` in place.
pub fn step_dense(h: &AdagradStep, params: &mut [f32], grad: &[f32], sum: &mut [f32]) {
    let n = params.len();
    assert!(grad.len() == n && sum.len() == n, "adagrad: slices differ in length");
    let (lr, eps) = (h.lr, h.eps);
    for ((p, &g), s) in params.iter_mut().zip(grad).zip(sum) {
        *s += g * g;
        *p -= lr * g / (s.sqrt() + eps);
    }
}

/// Updates the touched rows of one table; `table` and `sum` hold the whole
/// table. A row's sum grows only when the row is touched, exactly as in the
/// dense update with a zero gradient, so the two agree on every row.
pub fn step_sparse(h: &AdagradStep, table: &mut [f32], grad: &SparseRows, sum: &mut [f32]) {
    for (i, &row) in grad.rows.iter().enumerate() {
        let r = row_range(row, grad.row_len);
        step_dense(h, &mut table[r.clone()], grad.row(i), &mut sum[r]);
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
    fn adagrad_by_hand() {
        let h = AdagradStep { lr: 0.5, eps: 1e-10 };
        let (mut p, mut s) = ([1.0f32], [0.1f32]);
        // s = 0.1 + 9 = 9.1; p = 1 - 0.5 * 3 / sqrt(9.1).
        step_dense(&h, &mut p, &[3.0], &mut s);
        close(s[0], 9.1);
        let p1 = 1.0 - 1.5 / 9.1f64.sqrt();
        close(p[0], p1);
        // s = 9.1 + 16 = 25.1; p = p1 + 0.5 * 4 / sqrt(25.1).
        step_dense(&h, &mut p, &[-4.0], &mut s);
        close(s[0], 25.1);
        close(p[0], p1 + 2.0 / 25.1f64.sqrt());
    }

    #[test]
    fn sparse_equals_dense_on_every_row() {
        let h = AdagradStep { lr: 0.1, eps: 1e-10 };
        let init: Vec<f32> = (0..8).map(|i| i as f32 * 0.5 - 2.0).collect();
        let (mut a, mut b) = (init.clone(), init);
        let (mut sa, mut sb) = (vec![0.1f32; 8], vec![0.1f32; 8]);
        let grads = [
            SparseRows {
                tensor: 0,
                row_len: 2,
                rows: vec![3, 1],
                values: vec![1.0, -2.0, 0.5, 0.25],
            },
            SparseRows {
                tensor: 0,
                row_len: 2,
                rows: vec![1],
                values: vec![-3.0, 1.5],
            },
        ];
        for g in &grads {
            let mut dense = vec![0.0f32; 8];
            for (i, &row) in g.rows.iter().enumerate() {
                dense[row_range(row, 2)].copy_from_slice(g.row(i));
            }
            step_sparse(&h, &mut a, g, &mut sa);
            step_dense(&h, &mut b, &dense, &mut sb);
        }
        assert_eq!((a, sa), (b, sb));
    }
}
