//! Building compressed sparse rows from (index, value) pairs as a reader finds
//! them: feature hashing, range checks, and sorting and merging each row.

use crate::Features;

/// Widest hashed feature space: indices are stored as `u32`.
pub const HASH_BITS_MAX: u32 = 32;

/// Hashes a feature index into `0..2^bits`: the top `bits` bits of the 64-bit
/// finaliser of MurmurHash3 (`fmix64`) applied to the index. Fixed forever,
/// so that files hashed today and models trained on them agree tomorrow.
pub fn hash_index(index: u64, bits: u32) -> u32 {
    assert!((1..=HASH_BITS_MAX).contains(&bits), "hash_bits {bits} outside 1..=32");
    (fmix64(index) >> (64 - bits)) as u32
}

/// MurmurHash3's 64-bit finaliser: a bijection on `u64` with full avalanche.
pub(crate) fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// Accumulates rows. Each finished row is sorted by index with duplicate
/// indices merged by summing their values (what feature hashing does with
/// collisions anyway), so input need not be sorted or free of duplicates.
#[derive(Debug)]
pub(crate) struct SparseBuilder {
    hash_bits: Option<u32>,
    dim_fixed: Option<u64>,
    indptr: Vec<u64>,
    indices: Vec<u32>,
    values: Vec<f32>,
    max_index: Option<u32>,
    row_unsorted: bool,
    scratch: Vec<(u32, f32)>,
}

impl SparseBuilder {
    /// `hash_bits` and `dim_fixed` must have been validated (bits in 1..=32, `dim_fixed` ≥ 1).
    pub(crate) fn new(hash_bits: Option<u32>, dim_fixed: Option<u64>) -> Self {
        Self {
            hash_bits,
            dim_fixed,
            indptr: vec![0],
            indices: Vec::new(),
            values: Vec::new(),
            max_index: None,
            row_unsorted: false,
            scratch: Vec::new(),
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.indptr.len() - 1
    }

    /// Adds one entry to the current row; returns the message if it is invalid.
    pub(crate) fn push(&mut self, index: u64, value: f32) -> Result<(), String> {
        if !value.is_finite() {
            return Err(format!("value {value} of index {index} is not finite"));
        }
        let i = match self.hash_bits {
            Some(bits) => hash_index(index, bits),
            None => {
                if let Some(dim) = self.dim_fixed
                    && index >= dim
                {
                    return Err(format!("index {index} out of range: dim is {dim}"));
                }
                u32::try_from(index).map_err(|_| format!("index {index} exceeds {} (u32); set hash_bits", u32::MAX))?
            }
        };
        let row_start = *self.indptr.last().unwrap_or(&0) as usize;
        if self.indices.len() > row_start && self.indices.last().is_some_and(|&last| i <= last) {
            self.row_unsorted = true;
        }
        self.max_index = Some(self.max_index.map_or(i, |m| m.max(i)));
        self.indices.push(i);
        self.values.push(value);
        Ok(())
    }

    /// Drops the entries of the current row (a line that failed halfway).
    pub(crate) fn discard_row(&mut self) {
        let start = *self.indptr.last().unwrap_or(&0) as usize;
        self.indices.truncate(start);
        self.values.truncate(start);
        self.row_unsorted = false;
    }

    pub(crate) fn end_row(&mut self) {
        let start = *self.indptr.last().unwrap_or(&0) as usize;
        if self.row_unsorted {
            self.scratch.clear();
            self.scratch.extend(
                self.indices[start..]
                    .iter()
                    .copied()
                    .zip(self.values[start..].iter().copied()),
            );
            self.scratch.sort_unstable_by_key(|&(i, _)| i);
            self.indices.truncate(start);
            self.values.truncate(start);
            for &(i, v) in &self.scratch {
                if self.indices.len() > start && self.indices.last() == Some(&i) {
                    if let Some(last) = self.values.last_mut() {
                        *last += v;
                    }
                } else {
                    self.indices.push(i);
                    self.values.push(v);
                }
            }
            self.row_unsorted = false;
        }
        self.indptr.push(self.indices.len() as u64);
    }

    pub(crate) fn finish(self) -> Features {
        let dim = match (self.hash_bits, self.dim_fixed) {
            (Some(bits), _) => 1u64 << bits,
            (None, Some(dim)) => dim,
            (None, None) => self.max_index.map_or(0, |m| u64::from(m) + 1),
        };
        Features::Sparse {
            dim,
            indptr: self.indptr,
            indices: self.indices,
            values: self.values,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_sorted_and_duplicates_summed() {
        let mut b = SparseBuilder::new(None, None);
        for (i, v) in [(5, 1.0), (2, 2.0), (5, 0.5)] {
            b.push(i, v).expect("valid entry");
        }
        b.end_row();
        b.end_row();
        b.push(1, 3.0).expect("valid entry");
        b.end_row();
        let f = b.finish();
        let want = Features::Sparse {
            dim: 6,
            indptr: vec![0, 2, 2, 3],
            indices: vec![2, 5, 1],
            values: vec![2.0, 1.5, 3.0],
        };
        assert_eq!(f, want);
    }

    #[test]
    fn range_and_value_checks() {
        let mut b = SparseBuilder::new(None, Some(10));
        assert!(b.push(10, 1.0).expect_err("out of range").contains("out of range"));
        assert!(b.push(1, f32::NAN).is_err());
        let mut b = SparseBuilder::new(None, None);
        assert!(b.push(1 << 32, 1.0).expect_err("too wide").contains("hash_bits"));
        let mut h = SparseBuilder::new(Some(4), None);
        h.push(1 << 40, 1.0).expect("hashing accepts any index");
        h.end_row();
        assert!(matches!(h.finish(), Features::Sparse { dim: 16, .. }));
    }

    #[test]
    fn hash_is_fixed() {
        // Pinned values: changing the hash silently breaks every trained model.
        assert_eq!(hash_index(0, 20), 0);
        assert_eq!(hash_index(1, 32), (fmix64(1) >> 32) as u32);
        assert_eq!(fmix64(1), 0xb456_bcfc_34c2_cb2c);
        assert!((0..1000u64).all(|i| hash_index(i, 10) < 1024));
    }
}
