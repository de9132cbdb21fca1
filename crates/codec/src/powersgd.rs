//! `powersgd:R` (Vogels et al., 2019): a rank-R approximation `P̂ Qᵀ` of a
//! gradient matrix M (rows × cols) from one step of subspace iteration,
//! `P = M Q`, `P̂ = orthonormalise(P)`, `Q = Mᵀ P̂`, warm-started from the
//! previous step's Q.
//!
//! In a cluster it takes two all-reduces, so it is a small state machine,
//! [`PowerSgd`], driven by the caller (see its docs). [`crate::encode_shaped`]
//! offers a one-shot form for a single node: its Q starts from random numbers
//! every time, so it approximates worse than a warm-started [`PowerSgd`].
//!
//! Layout: P is stored by columns (`rank × rows`, column `k` contiguous) and
//! so is Q (`rank × cols`), so every loop runs over contiguous memory.
//! Message payload: P̂ then Q, f32 each; parameters `rank`, `rows`, `cols`.
//!
//! Error: biased. The one-shot form sends the projection of M onto the
//! span of P̂, so `‖M − P̂Qᵀ‖_F ≤ ‖M‖_F`; warm-started over steps it tends to
//! the best rank-R error. Meant to be used with error feedback.
//!
//! Falls back to sending f32 as is (codec `none`), as the paper does for
//! biases: for 1-D tensors (or a shape with one row or one column), and when
//! `rank·(rows + cols) ≥ rows·cols`, where the factors would not be smaller.

use tensor::Rng;

use crate::error::CodecError;
use crate::header::{self, CodecId, Reader};
use crate::kernel::{Sink, axpy, dot, simd_kernel};
use crate::spec::RANK_MAX;

/// The PowerSGD state of one gradient matrix: its shape, rank and the Q of
/// the last step (the warm start), which belongs in checkpoints.
///
/// One step on every worker, with `m` the (error-corrected) gradient:
///
/// 1. `ps.compute_p(m, &mut p)`, then all-reduce `p` (sum or mean: the next
///    step normalises it).
/// 2. `ps.compute_q(m, &mut p, &mut q)` orthonormalises the reduced `p` in
///    place and computes `q`; all-reduce `q` and divide it by the number of
///    workers (the mean).
/// 3. `ps.finish(&p, &q, &mut approx)` keeps `q` as the next warm start and
///    writes the approximation `P̂ Qᵀ`, the same on every worker; with error
///    feedback the residual is `m − approx` ([`crate::ErrorFeedback::record`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PowerSgd {
    q: Vec<f32>,
    rank: usize,
    rows: usize,
    cols: usize,
}

impl PowerSgd {
    /// Suffix of the warm-start tensor's name in a checkpoint: `{param}.powersgd_q`.
    pub const STATE_SUFFIX: &'static str = "powersgd_q";

    /// The rank is capped at `min(rows, cols)`; Q starts as standard normal
    /// numbers from `seed`, which must be the same on every worker.
    pub fn new(rank: usize, rows: usize, cols: usize, seed: u64) -> Self {
        assert!(
            rank >= 1 && rows >= 1 && cols >= 1,
            "PowerSGD needs rank, rows and cols ≥ 1"
        );
        let rank = rank.min(rows).min(cols);
        let mut rng = Rng::new(seed);
        let q = (0..rank * cols).map(|_| rng.normal() as f32).collect();
        Self { q, rank, rows, cols }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Whether a `rows × cols` matrix is worth factoring at `rank` (else send it as f32):
    /// both sides above 1 and the factors smaller than the matrix.
    pub fn compresses(rank: usize, rows: usize, cols: usize) -> bool {
        compresses(rank, rows, cols)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Elements of P: `rank × rows`.
    pub fn p_len(&self) -> usize {
        self.rank * self.rows
    }

    /// Elements of Q: `rank × cols`.
    pub fn q_len(&self) -> usize {
        self.rank * self.cols
    }

    /// `p = M Q` with the warm-start Q; `m` is row-major rows × cols.
    pub fn compute_p(&self, m: &[f32], p: &mut [f32]) {
        assert_eq!(m.len(), self.rows * self.cols, "PowerSGD: matrix length");
        assert_eq!(p.len(), self.p_len(), "PowerSGD: P length");
        multiply_p(m, &self.q, self.rows, self.cols, p);
    }

    /// Orthonormalises the reduced `p` in place (Gram–Schmidt), then `q = Mᵀ P̂`.
    pub fn compute_q(&self, m: &[f32], p: &mut [f32], q: &mut [f32]) {
        assert_eq!(m.len(), self.rows * self.cols, "PowerSGD: matrix length");
        assert_eq!(p.len(), self.p_len(), "PowerSGD: P length");
        assert_eq!(q.len(), self.q_len(), "PowerSGD: Q length");
        orthonormalise(p, self.rows);
        multiply_q(m, p, self.rows, self.cols, q);
    }

    /// Keeps the reduced (mean) `q` as the next warm start and writes `P̂ Qᵀ` into `approx`.
    pub fn finish(&mut self, p: &[f32], q: &[f32], approx: &mut [f32]) {
        self.decompress(p, q, approx);
        self.q.copy_from_slice(q);
    }

    /// `out = P̂ Qᵀ` for this shape and rank.
    pub fn decompress(&self, p: &[f32], q: &[f32], out: &mut [f32]) {
        assert_eq!(p.len(), self.p_len(), "PowerSGD: P length");
        assert_eq!(q.len(), self.q_len(), "PowerSGD: Q length");
        assert_eq!(out.len(), self.rows * self.cols, "PowerSGD: output length");
        reconstruct::<crate::kernel::Set>(p, q, self.rows, self.cols, out);
    }

    /// The warm-start Q, for a checkpoint.
    pub fn state(&self) -> &[f32] {
        &self.q
    }

    /// Replaces the warm-start Q by one from a checkpoint.
    pub fn load_state(&mut self, q: &[f32]) -> Result<(), CodecError> {
        if q.len() != self.q.len() {
            return Err(CodecError::StateLength {
                what: "PowerSGD warm-start Q",
                expected: self.q.len(),
                got: q.len(),
            });
        }
        self.q.copy_from_slice(q);
        Ok(())
    }
}

/// Whether a `rows × cols` matrix is sent as rank-`rank` factors (else as f32).
pub(crate) fn compresses(rank: usize, rows: usize, cols: usize) -> bool {
    let rank = rank.min(rows).min(cols);
    rows > 1 && cols > 1 && rank * (rows + cols) < rows * cols
}

/// The one-shot form: one subspace iteration from a random Q.
pub(crate) fn encode(values: &[f32], rank: usize, rows: usize, cols: usize, seed: u64, out: &mut Vec<u8>) {
    debug_assert!(compresses(rank, rows, cols));
    let ps = PowerSgd::new(rank, rows, cols, seed);
    let (mut p, mut q) = (vec![0f32; ps.p_len()], vec![0f32; ps.q_len()]);
    ps.compute_p(values, &mut p);
    ps.compute_q(values, &mut p, &mut q);
    let params = [ps.rank as u32, rows as u32, cols as u32];
    let start = header::begin(out, CodecId::PowerSgd, values.len(), &params, 4 * (p.len() + q.len()));
    let (pb, qb) = out[start..].split_at_mut(4 * p.len());
    header::put_f32s(pb, &p);
    header::put_f32s(qb, &q);
}

pub(crate) fn decode<S: Sink>(mut msg: Reader<'_>, out: &mut [f32]) -> Result<(), CodecError> {
    msg.expect_elems(out.len())?;
    let rank = msg.param_in("rank", 1, RANK_MAX as u32, "must be in 1..=256")? as u64;
    let rows = msg.param_in("rows", 1, u32::MAX, "must be at least 1")?;
    let cols = msg.param_in("cols", 1, u32::MAX, "must be at least 1")?;
    if u64::from(rows) * u64::from(cols) != out.len() as u64 {
        return Err(msg.bad("rows", rows.into(), "rows × cols is not the element count"));
    }
    let (rows, cols) = (rows as usize, cols as usize);
    let payload = msg.payload(4 * rank * (rows as u64 + cols as u64))?;
    let rank = rank as usize;
    let p: Vec<f32> = payload[..4 * rank * rows]
        .chunks_exact(4)
        .map(header::get_f32)
        .collect();
    let q: Vec<f32> = payload[4 * rank * rows..]
        .chunks_exact(4)
        .map(header::get_f32)
        .collect();
    reconstruct::<S>(&p, &q, rows, cols, out);
    Ok(())
}

simd_kernel! {
    /// `p[k][i] = Σ_j m[i][j] q[k][j]`.
    fn multiply_p(m: &[f32], q: &[f32], rows: usize, cols: usize, p: &mut [f32]) {
        for (i, row) in m.chunks_exact(cols).enumerate() {
            for (k, qk) in q.chunks_exact(cols).enumerate() {
                p[k * rows + i] = dot(row, qk);
            }
        }
    }
}

simd_kernel! {
    /// `q[k][j] = Σ_i p[k][i] m[i][j]`.
    fn multiply_q(m: &[f32], p: &[f32], rows: usize, cols: usize, q: &mut [f32]) {
        q.fill(0.0);
        for (i, row) in m.chunks_exact(cols).enumerate() {
            for (k, qk) in q.chunks_exact_mut(cols).enumerate() {
                axpy(qk, p[k * rows + i], row);
            }
        }
    }
}

simd_kernel! {
    /// Gram–Schmidt on the columns of P (each `len` long, contiguous), each
    /// column projected out twice ("twice is enough": one pass loses
    /// orthogonality when a column is nearly dependent on earlier ones).
    /// A column left with no more than f32 rounding of its original length,
    /// or not finite, becomes zero, so a gradient of rank below R gives fewer
    /// components, and a zero gradient a zero approximation, not NaN.
    fn orthonormalise(p: &mut [f32], len: usize) {
        let columns = p.len() / len;
        for k in 0..columns {
            let (done, rest) = p.split_at_mut(k * len);
            let col = &mut rest[..len];
            let before = dot(col, col).sqrt();
            for _ in 0..2 {
                for prev in done.chunks_exact(len) {
                    let c = dot(col, prev);
                    axpy(col, -c, prev);
                }
            }
            let after = dot(col, col).sqrt();
            let independent = after > before * f32::EPSILON * 16.0 && after.is_finite();
            let inv = if independent { 1.0 / after } else { 0.0 };
            for v in col.iter_mut() {
                *v *= inv;
            }
        }
    }
}

simd_kernel! {
    /// `out[i] (S)= Σ_k p[k][i] q[k]`, one row at a time.
    fn reconstruct<S: Sink>(p: &[f32], q: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
        let mut row = vec![0f32; cols];
        for (i, o) in out.chunks_exact_mut(cols).enumerate() {
            row.fill(0.0);
            for (k, qk) in q.chunks_exact(cols).enumerate() {
                axpy(&mut row, p[k * rows + i], qk);
            }
            for (o, v) in o.iter_mut().zip(&row) {
                S::put(o, *v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frobenius(a: &[f32]) -> f64 {
        a.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt()
    }

    /// A rows × cols matrix of exact rank `rank`.
    fn low_rank(rows: usize, cols: usize, rank: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let u: Vec<f32> = (0..rows * rank).map(|_| rng.normal() as f32).collect();
        let v: Vec<f32> = (0..cols * rank).map(|_| rng.normal() as f32).collect();
        let mut m = vec![0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                m[i * cols + j] = (0..rank).map(|k| u[i * rank + k] * v[j * rank + k]).sum();
            }
        }
        m
    }

    #[test]
    fn p_columns_are_orthonormal() {
        let (rows, cols) = (40, 30);
        let m = low_rank(rows, cols, 6, 1);
        let ps = PowerSgd::new(4, rows, cols, 2);
        let (mut p, mut q) = (vec![0f32; ps.p_len()], vec![0f32; ps.q_len()]);
        ps.compute_p(&m, &mut p);
        ps.compute_q(&m, &mut p, &mut q);
        for a in 0..4 {
            for b in 0..4 {
                let d = dot(&p[a * rows..(a + 1) * rows], &p[b * rows..(b + 1) * rows]);
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((d - want).abs() < 1e-5, "{a} {b}: {d}");
            }
        }
    }

    #[test]
    fn recovers_a_matrix_of_lower_rank_exactly_enough() {
        let (rows, cols) = (50, 40);
        let m = low_rank(rows, cols, 3, 7);
        let mut ps = PowerSgd::new(3, rows, cols, 8);
        let (mut p, mut q, mut approx) = (vec![0f32; ps.p_len()], vec![0f32; ps.q_len()], vec![0f32; m.len()]);
        ps.compute_p(&m, &mut p);
        ps.compute_q(&m, &mut p, &mut q);
        ps.finish(&p, &q, &mut approx);
        let err: Vec<f32> = m.iter().zip(&approx).map(|(a, b)| a - b).collect();
        assert!(
            frobenius(&err) < 1e-4 * frobenius(&m),
            "{}",
            frobenius(&err) / frobenius(&m)
        );
    }

    #[test]
    fn warm_start_converges_to_the_best_rank_r_error() {
        // M = Σ σ_r u_r v_rᵀ with orthonormal u, v: the best rank-2 error is known.
        let (rows, cols, sigma) = (60, 50, [8.0f32, 4.0, 2.0, 1.0, 0.5]);
        let mut rng = Rng::new(5);
        let mut u: Vec<f32> = (0..sigma.len() * rows).map(|_| rng.normal() as f32).collect();
        let mut v: Vec<f32> = (0..sigma.len() * cols).map(|_| rng.normal() as f32).collect();
        orthonormalise(&mut u, rows);
        orthonormalise(&mut v, cols);
        let mut m = vec![0f32; rows * cols];
        for (r, s) in sigma.iter().enumerate() {
            for i in 0..rows {
                axpy(
                    &mut m[i * cols..(i + 1) * cols],
                    s * u[r * rows + i],
                    &v[r * cols..(r + 1) * cols],
                );
            }
        }
        let total: f32 = sigma.iter().map(|s| s * s).sum();
        let best = (sigma[2..].iter().map(|s| s * s).sum::<f32>() / total).sqrt() as f64;

        let mut ps = PowerSgd::new(2, rows, cols, 3);
        let (mut p, mut q, mut approx) = (vec![0f32; ps.p_len()], vec![0f32; ps.q_len()], vec![0f32; m.len()]);
        let mut errors = Vec::new();
        for _ in 0..12 {
            ps.compute_p(&m, &mut p);
            ps.compute_q(&m, &mut p, &mut q);
            ps.finish(&p, &q, &mut approx);
            let err: Vec<f32> = m.iter().zip(&approx).map(|(a, b)| a - b).collect();
            errors.push(frobenius(&err) / frobenius(&m));
        }
        assert!(errors.windows(2).all(|w| w[1] <= w[0] + 1e-6), "{errors:?}");
        assert!(errors[0] > best * 1.01, "{errors:?} vs {best}");
        assert!((errors[11] - best).abs() < 1e-3 * best, "{errors:?} vs {best}");
    }

    #[test]
    fn zero_gradient_gives_zero_not_nan() {
        let mut ps = PowerSgd::new(2, 5, 6, 1);
        let m = vec![0f32; 30];
        let (mut p, mut q, mut approx) = (vec![0f32; ps.p_len()], vec![0f32; ps.q_len()], vec![1f32; 30]);
        ps.compute_p(&m, &mut p);
        ps.compute_q(&m, &mut p, &mut q);
        ps.finish(&p, &q, &mut approx);
        assert!(approx.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn state_round_trips_and_refuses_the_wrong_length() {
        let a = PowerSgd::new(2, 5, 6, 1);
        let mut b = PowerSgd::new(2, 5, 6, 99);
        assert_ne!(a, b);
        b.load_state(a.state()).expect("same shape");
        assert_eq!(a, b);
        let err = b.load_state(&[0.0; 3]).expect_err("wrong length");
        assert!(err.to_string().contains("expected 12"), "{err}");
    }

    #[test]
    fn rank_is_capped_and_small_shapes_fall_back() {
        assert_eq!(PowerSgd::new(10, 3, 100, 0).rank(), 3);
        assert!(!compresses(4, 1, 1000));
        assert!(!compresses(4, 8, 8)); // 4·16 = 64 ≥ 64
        assert!(compresses(4, 9, 9));
    }
}
