//! Models on hashed sparse features, logistic regression (`SparseLogReg`)
//! and the factorization machine (`FactorizationMachine`), whose table
//! gradients are row-sparse: one entry per distinct row the batch touched.
//!
//! Indices are folded into the table by `index mod 2^hash_bits` (a mask), so
//! a batch whose feature space is larger than the table still works.
//! Duplicate rows, within a row or across the batch, are summed into one
//! gradient row through `RowSlots`, a row → position map sized to the batch,
//! never to the table, so a step costs O(nnz) whatever the table size.

use std::ops::Range;

use data::{Batch, BatchFeatures};
use tensor::{Gradient, Layout, ParamKind, Rng, SparseRows};

use crate::{Model, loss};

/// Standard deviation of the initial FM factors (the libFM default is 0.1;
/// smaller keeps the pairwise term from dominating the first steps).
pub const FM_INIT_STD: f64 = 0.01;

/// One batch's CSR arrays, checked for consistency.
struct Csr<'a> {
    indptr: &'a [u32],
    indices: &'a [u32],
    values: &'a [f32],
}

impl<'a> Csr<'a> {
    fn of(kind: &str, batch: &'a Batch) -> Self {
        match &batch.features {
            BatchFeatures::Sparse {
                indptr,
                indices,
                values,
                ..
            } => {
                assert_eq!(indptr.len(), batch.rows() + 1, "sparse batch: indptr length");
                assert_eq!(
                    indices.len(),
                    values.len(),
                    "sparse batch: indices and values differ in length"
                );
                assert_eq!(indptr[batch.rows()] as usize, indices.len(), "sparse batch: indptr end");
                Self {
                    indptr,
                    indices,
                    values,
                }
            }
            BatchFeatures::Dense { .. } => panic!(
                "model `{kind}` reads sparse features but the batch is dense (check ModelConfig::sparse_input first)"
            ),
        }
    }

    /// Positions of row `r`'s non-zeros in `indices` and `values`.
    fn span(&self, r: usize) -> Range<usize> {
        self.indptr[r] as usize..self.indptr[r + 1] as usize
    }

    /// The table row of the non-zero `PREFETCH_NNZ` positions after `e`, if any.
    #[inline]
    fn row_ahead(&self, e: usize, mask: u32) -> Option<usize> {
        self.indices.get(e + PREFETCH_NNZ).map(|&i| (i & mask) as usize)
    }
}

/// The distinct table rows (`index & mask`) of a sparse batch, ascending.
fn touched(kind: &str, batch: &Batch, mask: u32, rows: &mut Vec<u32>) {
    let csr = Csr::of(kind, batch);
    rows.clear();
    rows.extend(csr.indices.iter().map(|&i| i & mask));
    rows.sort_unstable();
    rows.dedup();
}

/// Maps the table rows one step touches to their position in the step's
/// [`SparseRows`]: an open-addressing hash table sized to the batch's
/// non-zeros, not to the table, so that it stays in the L2 cache whatever
/// the table size, and is cleared by visiting only the entries the step set.
#[derive(Debug, Default)]
struct RowSlots {
    /// `row << 32 | position`, or [`RowSlots::EMPTY`]. Length a power of two,
    /// at least twice the step's non-zeros, so probes stay short and always end.
    entries: Vec<u64>,
    /// Entries set this step, to clear them for the next one.
    used: Vec<u32>,
}

impl RowSlots {
    const EMPTY: u64 = u64::MAX;

    /// Clears the map for a step of at most `nnz` distinct rows.
    fn prepare(&mut self, nnz: usize) {
        let len = (2 * nnz).next_power_of_two().max(64);
        if self.entries.len() < len {
            self.entries.clear();
            self.entries.resize(len, Self::EMPTY);
        } else {
            for &h in &self.used {
                self.entries[h as usize] = Self::EMPTY;
            }
        }
        self.used.clear();
    }

    /// Number of distinct rows seen this step; they hold positions `0..distinct()`.
    fn distinct(&self) -> usize {
        self.used.len()
    }

    /// Where probing for `row` starts. Fibonacci hashing, so that strided
    /// indices (multiples of a power of two) spread out too.
    #[inline]
    fn home(&self, row: u32) -> usize {
        (row.wrapping_mul(0x9E37_79B9) as usize) & (self.entries.len() - 1)
    }

    #[inline]
    fn prefetch(&self, row: u32) {
        // Empty before the first step (predict may run first).
        if !self.entries.is_empty() {
            prefetch(&self.entries, self.home(row));
        }
    }

    /// Position of `row`, the next free one if the step meets it for the first time.
    #[inline]
    fn position(&mut self, row: u32) -> usize {
        let mask = self.entries.len() - 1;
        let mut h = self.home(row);
        loop {
            let e = self.entries[h];
            if e == Self::EMPTY {
                let p = self.used.len();
                assert!(
                    2 * p < self.entries.len(),
                    "RowSlots sized for fewer rows than the step touched"
                );
                self.entries[h] = u64::from(row) << 32 | p as u64;
                self.used.push(h as u32);
                return p;
            }
            if (e >> 32) as u32 == row {
                return e as u32 as usize;
            }
            h = (h + 1) & mask;
        }
    }
}

/// Hints the CPU to fetch `slice[i]` into the cache; a no-op off x86-64 or out of bounds.
#[inline(always)]
fn prefetch<T>(slice: &[T], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(x) = slice.get(i) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: SSE is part of the x86-64 baseline, and a prefetch never
        // faults (the pointer is valid anyway: it comes from a reference).
        unsafe { _mm_prefetch::<_MM_HINT_T0>((x as *const T).cast::<i8>()) };
    }
}

/// How many non-zeros ahead the sparse models prefetch their table rows:
/// about one row of a typical CTR data set, enough to cover a cache miss.
const PREFETCH_NNZ: usize = 32;

/// Makes `grad.sparse` one empty entry per `(tensor, row_len)`, reusing its buffers.
fn reset_tables(grad: &mut Gradient, tables: &[(usize, usize)]) {
    let fits = grad.sparse.len() == tables.len()
        && grad
            .sparse
            .iter()
            .zip(tables)
            .all(|(s, &(t, len))| s.tensor == t && s.row_len == len);
    if !fits {
        grad.sparse = tables
            .iter()
            .map(|&(tensor, row_len)| SparseRows {
                tensor,
                row_len,
                ..SparseRows::default()
            })
            .collect();
    }
    grad.sparse.iter_mut().for_each(SparseRows::clear);
}

fn positive(label: u32) -> bool {
    assert!(label < 2, "binary model got label {label}");
    label == 1
}

/// Logistic regression on hashed sparse features: `p = σ(bias + Σ w[i]·x_i)`.
/// Parameters: the table `w` `[2^hash_bits, 1]` and `bias` `[1]`.
#[derive(Debug)]
pub struct SparseLogReg {
    layout: Layout,
    w: Range<usize>,
    bias: Range<usize>,
    slots: RowSlots,
}

impl SparseLogReg {
    pub fn new(hash_bits: u32) -> Self {
        assert!(
            (1..=crate::HASH_BITS_MAX).contains(&hash_bits),
            "hash_bits {hash_bits} out of range"
        );
        let mut layout = Layout::new();
        let w = layout.push("w", &[1 << hash_bits, 1], ParamKind::Table);
        let bias = layout.push("bias", &[1], ParamKind::Dense);
        Self {
            layout,
            w,
            bias,
            slots: RowSlots::default(),
        }
    }

    fn score(&self, params: &[f32], mask: u32, csr: &Csr<'_>, r: usize) -> f32 {
        let w = &params[self.w.clone()];
        let mut s = params[self.bias.start];
        for e in csr.span(r) {
            if let Some(ahead) = csr.row_ahead(e, mask) {
                prefetch(w, ahead);
                self.slots.prefetch(ahead as u32);
            }
            s += w[(csr.indices[e] & mask) as usize] * csr.values[e];
        }
        s
    }
}

impl Model for SparseLogReg {
    fn touched_rows(&self, batch: &Batch, rows: &mut Vec<u32>) {
        touched("logreg", batch, (self.w.len() - 1) as u32, rows);
    }

    fn layout(&self) -> &Layout {
        &self.layout
    }

    /// All zeros, as is usual for (convex) logistic regression.
    fn init(&self, params: &mut [f32], _rng: &mut Rng) {
        assert_eq!(params.len(), self.layout.len(), "logreg: params length");
        params.fill(0.0);
    }

    fn forward_backward(
        &mut self,
        params: &[f32],
        batch: &Batch,
        grad: &mut Gradient,
        ready: &mut dyn FnMut(Range<usize>, &[f32]),
    ) -> f32 {
        assert_eq!(params.len(), self.layout.len(), "logreg: params length");
        assert_eq!(grad.dense.len(), self.layout.len(), "logreg: gradient length");
        let csr = Csr::of("logreg", batch);
        let rows = batch.rows();
        let mask = (self.w.len() - 1) as u32;
        let scale = if rows == 0 { 0.0 } else { 1.0 / rows as f32 };
        let nnz = csr.indices.len();
        self.slots.prepare(nnz);
        reset_tables(grad, &[(0, 1)]);
        let gw = &mut grad.sparse[0];
        // Room for every non-zero being a new row; cut to the distinct rows below.
        gw.rows.resize(nnz, 0);
        gw.values.resize(nnz, 0.0);

        let mut total = 0.0f64;
        let mut gbias = 0.0f32;
        for (r, &label) in batch.labels.iter().enumerate() {
            let s = self.score(params, mask, &csr, r);
            let (l, d) = loss::logistic(s, positive(label));
            total += f64::from(l);
            let d = d * scale;
            gbias += d;
            for e in csr.span(r) {
                let row = csr.indices[e] & mask;
                let p = self.slots.position(row);
                gw.rows[p] = row;
                gw.values[p] += d * csr.values[e];
            }
        }
        gw.rows.truncate(self.slots.distinct());
        gw.values.truncate(self.slots.distinct());
        grad.dense[self.bias.clone()].fill(gbias);
        ready(self.bias.clone(), &grad.dense[self.bias.clone()]);
        (total * f64::from(scale)) as f32
    }

    fn predict(&mut self, params: &[f32], batch: &Batch, out: &mut Vec<f32>) {
        let csr = Csr::of("logreg", batch);
        let mask = (self.w.len() - 1) as u32;
        out.clear();
        out.extend((0..batch.rows()).map(|r| loss::sigmoid(self.score(params, mask, &csr, r))));
    }

    fn num_classes(&self) -> usize {
        2
    }
}

/// A second-order factorization machine (Rendle, 2010) on hashed sparse
/// features with the logistic loss:
/// `score = bias + Σ w[i]·x_i + Σ_{i<j} ⟨v_i, v_j⟩·x_i·x_j`, the pairwise
/// term computed in O(factors · nnz) as `½ Σ_f ((Σ_i v_if x_i)² − Σ_i v_if² x_i²)`.
/// Parameters: tables `w` `[2^hash_bits, 1]` and `v` `[2^hash_bits, factors]`, and `bias` `[1]`.
#[derive(Debug)]
pub struct FactorizationMachine {
    layout: Layout,
    factors: usize,
    w: Range<usize>,
    v: Range<usize>,
    bias: Range<usize>,
    slots: RowSlots,
    /// `Σ_i v_if x_i` of the current row, per factor.
    sum: Vec<f32>,
    /// `Σ_i v_if² x_i²` of the current row, per factor.
    sum_sq: Vec<f32>,
}

impl FactorizationMachine {
    pub fn new(hash_bits: u32, factors: usize) -> Self {
        assert!(
            (1..=crate::HASH_BITS_MAX).contains(&hash_bits),
            "hash_bits {hash_bits} out of range"
        );
        assert!(
            (1..=crate::FACTORS_MAX).contains(&factors),
            "factors {factors} out of range"
        );
        let mut layout = Layout::new();
        let w = layout.push("w", &[1 << hash_bits, 1], ParamKind::Table);
        let v = layout.push("v", &[1 << hash_bits, factors], ParamKind::Table);
        let bias = layout.push("bias", &[1], ParamKind::Dense);
        Self {
            layout,
            factors,
            w,
            v,
            bias,
            slots: RowSlots::default(),
            sum: vec![0.0; factors],
            sum_sq: vec![0.0; factors],
        }
    }

    /// Score of one row; leaves `Σ_i v_if x_i` in `self.sum`.
    fn score(&mut self, params: &[f32], mask: u32, csr: &Csr<'_>, r: usize) -> f32 {
        let k = self.factors;
        let (w, v) = (&params[self.w.clone()], &params[self.v.clone()]);
        let mut linear = params[self.bias.start];
        self.sum.fill(0.0);
        self.sum_sq.fill(0.0);
        for e in csr.span(r) {
            if let Some(ahead) = csr.row_ahead(e, mask) {
                prefetch(w, ahead);
                self.slots.prefetch(ahead as u32);
                prefetch(v, ahead * k);
                prefetch(v, ahead * k + k - 1);
            }
            let (i, x) = ((csr.indices[e] & mask) as usize, csr.values[e]);
            linear += w[i] * x;
            let vi = &v[i * k..(i + 1) * k];
            for ((s, q), &vf) in self.sum.iter_mut().zip(self.sum_sq.iter_mut()).zip(vi) {
                let t = vf * x;
                *s += t;
                *q += t * t;
            }
        }
        let pair: f32 = self.sum.iter().zip(&self.sum_sq).map(|(&s, &q)| s * s - q).sum();
        linear + 0.5 * pair
    }
}

impl Model for FactorizationMachine {
    fn touched_rows(&self, batch: &Batch, rows: &mut Vec<u32>) {
        touched("fm", batch, (self.w.len() - 1) as u32, rows);
    }

    fn layout(&self) -> &Layout {
        &self.layout
    }

    /// `w` and `bias` zero, `v` normal with standard deviation [`FM_INIT_STD`]
    /// (zero factors would have zero gradient and never move).
    fn init(&self, params: &mut [f32], rng: &mut Rng) {
        assert_eq!(params.len(), self.layout.len(), "fm: params length");
        params.fill(0.0);
        for p in &mut params[self.v.clone()] {
            *p = (rng.normal() * FM_INIT_STD) as f32;
        }
    }

    fn forward_backward(
        &mut self,
        params: &[f32],
        batch: &Batch,
        grad: &mut Gradient,
        ready: &mut dyn FnMut(Range<usize>, &[f32]),
    ) -> f32 {
        assert_eq!(params.len(), self.layout.len(), "fm: params length");
        assert_eq!(grad.dense.len(), self.layout.len(), "fm: gradient length");
        let csr = Csr::of("fm", batch);
        let rows = batch.rows();
        let k = self.factors;
        let mask = (self.w.len() - 1) as u32;
        let scale = if rows == 0 { 0.0 } else { 1.0 / rows as f32 };
        let nnz = csr.indices.len();
        self.slots.prepare(nnz);
        reset_tables(grad, &[(0, 1), (1, k)]);
        let (gw, gv) = grad.sparse.split_at_mut(1);
        let (gw, gv) = (&mut gw[0], &mut gv[0]);
        // Room for every non-zero being a new row; cut to the distinct rows below.
        gw.rows.resize(nnz, 0);
        gw.values.resize(nnz, 0.0);
        gv.values.resize(nnz * k, 0.0);
        let v = &params[self.v.clone()];

        let mut total = 0.0f64;
        let mut gbias = 0.0f32;
        for (r, &label) in batch.labels.iter().enumerate() {
            let s = self.score(params, mask, &csr, r);
            let (l, d) = loss::logistic(s, positive(label));
            total += f64::from(l);
            let d = d * scale;
            gbias += d;
            for e in csr.span(r) {
                let (row, x) = (csr.indices[e] & mask, csr.values[e]);
                let p = self.slots.position(row);
                let dx = d * x;
                gw.rows[p] = row;
                gw.values[p] += dx;
                // d score / d v_if = x_i (Σ_j v_jf x_j − v_if x_i)
                let vi = &v[row as usize * k..(row as usize + 1) * k];
                let gvi = &mut gv.values[p * k..(p + 1) * k];
                for ((g, &vf), &s) in gvi.iter_mut().zip(vi).zip(&self.sum) {
                    *g += dx * (s - vf * x);
                }
            }
        }
        gw.rows.truncate(self.slots.distinct());
        gw.values.truncate(self.slots.distinct());
        gv.values.truncate(self.slots.distinct() * k);
        gv.rows.clone_from(&gw.rows);
        grad.dense[self.bias.clone()].fill(gbias);
        ready(self.bias.clone(), &grad.dense[self.bias.clone()]);
        (total * f64::from(scale)) as f32
    }

    fn predict(&mut self, params: &[f32], batch: &Batch, out: &mut Vec<f32>) {
        let csr = Csr::of("fm", batch);
        let mask = (self.w.len() - 1) as u32;
        out.clear();
        for r in 0..batch.rows() {
            let s = self.score(params, mask, &csr, r);
            out.push(loss::sigmoid(s));
        }
    }

    fn num_classes(&self) -> usize {
        2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{check_gradient, check_ready_order, dense_batch, flatten, sparse_batch};

    #[test]
    fn logreg_gradient_matches_finite_differences() {
        // dim 40 > 2^4 rows: indices fold, so rows repeat within and across rows.
        let batch = sparse_batch(40, 6, 5, 31);
        check_gradient(&mut SparseLogReg::new(4), &batch, 41);
    }

    #[test]
    fn fm_gradient_matches_finite_differences() {
        let batch = sparse_batch(40, 6, 5, 32);
        check_gradient(&mut FactorizationMachine::new(3, 3), &batch, 42);
    }

    #[test]
    fn ready_reports_the_bias() {
        check_ready_order(&mut SparseLogReg::new(4), &sparse_batch(40, 5, 4, 33), 1);
        check_ready_order(&mut FactorizationMachine::new(4, 2), &sparse_batch(40, 5, 4, 34), 1);
    }

    /// The same model written with dense per-row feature vectors and a dense
    /// gradient: the sparse rows must equal it row for row, and list each
    /// touched row once.
    #[test]
    fn sparse_rows_equal_the_dense_gradient() {
        let bits = 5;
        let table = 1usize << bits;
        let batch = sparse_batch(1000, 64, 30, 35);
        let mut m = SparseLogReg::new(bits);
        let mut params = vec![0.0; m.layout().len()];
        let mut rng = Rng::new(4);
        params.iter_mut().for_each(|p| *p = rng.next_f32() - 0.5);
        let mut grad = Gradient::for_layout(m.layout());
        // Twice, so the second step runs on slots the first one left behind.
        for _ in 0..2 {
            m.forward_backward(&params, &batch, &mut grad, &mut |_, _| {});
        }
        let flat = flatten(&m, &grad);

        let BatchFeatures::Sparse {
            indptr,
            indices,
            values,
            ..
        } = &batch.features
        else {
            unreachable!()
        };
        let mut want = vec![0.0f64; table + 1];
        let mut touched = std::collections::HashSet::new();
        for (r, &y) in batch.labels.iter().enumerate() {
            let mut x = vec![0.0f64; table];
            for e in indptr[r] as usize..indptr[r + 1] as usize {
                x[indices[e] as usize % table] += f64::from(values[e]);
                touched.insert(indices[e] % table as u32);
            }
            let s: f64 = f64::from(params[table]) + x.iter().zip(&params).map(|(a, &w)| a * f64::from(w)).sum::<f64>();
            let d = (1.0 / (1.0 + (-s).exp()) - f64::from(y)) / 64.0;
            x.iter().enumerate().for_each(|(i, a)| want[i] += d * a);
            want[table] += d;
        }
        assert_eq!(grad.sparse[0].rows.len(), touched.len());
        for (i, (&g, &w)) in flat.iter().zip(&want).enumerate() {
            assert!((f64::from(g) - w).abs() < 1e-5, "row {i}: {g} vs {w}");
        }
    }

    #[test]
    fn fm_pairwise_term_matches_the_double_sum() {
        let (bits, k) = (4u32, 3usize);
        let mut m = FactorizationMachine::new(bits, k);
        let mut params = vec![0.0; m.layout().len()];
        let mut rng = Rng::new(8);
        params.iter_mut().for_each(|p| *p = rng.next_f32() - 0.5);
        let batch = sparse_batch(16, 20, 6, 36);
        let mut out = Vec::new();
        m.predict(&params, &batch, &mut out);
        let BatchFeatures::Sparse {
            indptr,
            indices,
            values,
            ..
        } = &batch.features
        else {
            unreachable!()
        };
        let (w, v, b) = (&params[..16], &params[16..16 + 16 * k], params[16 + 16 * k]);
        for r in 0..batch.rows() {
            let e: Vec<usize> = (indptr[r] as usize..indptr[r + 1] as usize).collect();
            let mut s = f64::from(b);
            for (a, &ea) in e.iter().enumerate() {
                let (ia, xa) = (indices[ea] as usize, f64::from(values[ea]));
                s += f64::from(w[ia]) * xa;
                for &eb in &e[a + 1..] {
                    let (ib, xb) = (indices[eb] as usize, f64::from(values[eb]));
                    let dot: f64 = (0..k)
                        .map(|f| f64::from(v[ia * k + f]) * f64::from(v[ib * k + f]))
                        .sum();
                    s += dot * xa * xb;
                }
            }
            let p = 1.0 / (1.0 + (-s).exp());
            assert!((f64::from(out[r]) - p).abs() < 1e-5, "row {r}: {} vs {p}", out[r]);
        }
    }

    #[test]
    fn fm_learns_an_interaction() {
        // Label = feature a XOR-like pairing of two hashed features: only the
        // pairwise term can express "both or neither".
        let mut rng = Rng::new(2);
        let (mut indptr, mut indices, mut values, mut labels) = (vec![0u32], vec![], vec![], vec![]);
        for _ in 0..512 {
            let (a, b) = (rng.below(2) as u32, rng.below(2) as u32);
            indices.extend([a, 2 + b]);
            values.extend([1.0, 1.0]);
            indptr.push(indices.len() as u32);
            labels.push(u32::from(a == b));
        }
        let batch = Batch {
            features: BatchFeatures::Sparse {
                dim: 4,
                indptr,
                indices,
                values,
            },
            labels,
        };
        let mut m = FactorizationMachine::new(2, 4);
        let mut params = vec![0.0; m.layout().len()];
        m.init(&mut params, &mut Rng::new(3));
        params[4..20].iter_mut().for_each(|p| *p *= 30.0);
        let mut grad = Gradient::for_layout(m.layout());
        let first = m.forward_backward(&params, &batch, &mut grad, &mut |_, _| {});
        let mut last = first;
        for _ in 0..300 {
            let g = flatten(&m, &grad);
            params.iter_mut().zip(&g).for_each(|(p, g)| *p -= 0.5 * g);
            last = m.forward_backward(&params, &batch, &mut grad, &mut |_, _| {});
        }
        assert!(last < first / 10.0, "loss {first} -> {last}: not down 10×");
    }

    #[test]
    #[should_panic(expected = "reads sparse features but the batch is dense")]
    fn dense_batch_is_refused() {
        let mut m = SparseLogReg::new(3);
        let p = vec![0.0; m.layout().len()];
        m.forward_backward(
            &p,
            &dense_batch(3, 2, 2, 1),
            &mut Gradient::for_layout(m.layout()),
            &mut |_, _| {},
        );
    }
}
