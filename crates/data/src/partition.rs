//! Splitting a data set among workers (by rows, round robin, or balancing
//! non-zeros), the skew of a split, and each epoch's shuffled row order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tensor::Rng;

use crate::{DataError, Dataset};

/// How rows are dealt to parts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Partition {
    /// Consecutive ranges whose sizes differ by at most one row.
    #[default]
    Contiguous,
    /// Row `r` goes to part `r % parts`.
    Strided,
    /// Longest-processing-time greedy: rows by decreasing non-zeros, each to
    /// the part with the fewest non-zeros so far. The heaviest part exceeds
    /// the mean by at most the largest row.
    BalancedNnz,
}

impl FromStr for Partition {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, DataError> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "contiguous" => Ok(Self::Contiguous),
            "strided" | "round-robin" => Ok(Self::Strided),
            "balanced-nnz" | "nnz" => Ok(Self::BalancedNnz),
            _ => Err(DataError::config(
                "partition",
                format!("`{s}` (use contiguous, strided or balanced-nnz)"),
            )),
        }
    }
}

/// Row range of `part` when `rows` rows are cut into `parts` contiguous
/// ranges whose sizes differ by at most one (the first `rows % parts` are larger).
/// Equal to the ranges of [`Partition::Contiguous`]. (A training job's
/// workers read [`crate::partitions`] instead: the epoch plan cuts the rows in
/// proportion to the local batches, which differ when the global batch does
/// not divide evenly.)
pub fn partition_range(rows: usize, parts: usize, part: usize) -> Range<usize> {
    assert!(part < parts, "part {part} of {parts}");
    let (base, extra) = (rows / parts, rows % parts);
    let start = part * base + part.min(extra);
    start..start + base + usize::from(part < extra)
}

/// Row ids of each part; every row is in exactly one part, ascending within it.
pub fn partition(ds: &Dataset, parts: usize, strategy: Partition) -> Vec<Vec<usize>> {
    assert!(parts > 0, "partition needs at least one part");
    let rows = ds.rows();
    match strategy {
        Partition::Contiguous => (0..parts).map(|p| partition_range(rows, parts, p).collect()).collect(),
        Partition::Strided => (0..parts).map(|p| (p..rows).step_by(parts).collect()).collect(),
        Partition::BalancedNnz => {
            let mut order: Vec<usize> = (0..rows).collect();
            // Stable: equal rows keep file order, so the result is deterministic.
            order.sort_by_key(|&r| Reverse(ds.row_nnz(r)));
            let mut heap: BinaryHeap<Reverse<(u64, usize, usize)>> = (0..parts).map(|p| Reverse((0, 0, p))).collect();
            let mut out = vec![Vec::with_capacity(rows / parts + 1); parts];
            for r in order {
                let Some(Reverse((nnz, count, p))) = heap.pop() else {
                    unreachable!("the heap holds `parts` ≥ 1 entries")
                };
                out[p].push(r);
                heap.push(Reverse((nnz + ds.row_nnz(r) as u64, count + 1, p)));
            }
            for part in &mut out {
                part.sort_unstable();
            }
            out
        }
    }
}

/// How uneven a partition is: the busiest part against the mean.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SkewReport {
    pub rows_max_over_mean: f64,
    pub nnz_max_over_mean: f64,
    /// (rows, non-zeros) of each part.
    pub per_part: Vec<(usize, u64)>,
}

impl SkewReport {
    pub fn new(ds: &Dataset, parts: &[Vec<usize>]) -> Self {
        let per_part: Vec<(usize, u64)> = parts
            .iter()
            .map(|p| (p.len(), p.iter().map(|&r| ds.row_nnz(r) as u64).sum()))
            .collect();
        let ratio = |xs: Vec<f64>| {
            let mean = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
            let max = xs.iter().copied().fold(0.0, f64::max);
            if mean > 0.0 { max / mean } else { 1.0 }
        };
        Self {
            rows_max_over_mean: ratio(per_part.iter().map(|&(r, _)| r as f64).collect()),
            nnz_max_over_mean: ratio(per_part.iter().map(|&(_, n)| n as f64).collect()),
            per_part,
        }
    }
}

impl fmt::Display for SkewReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "part        rows           nnz")?;
        for (p, (rows, nnz)) in self.per_part.iter().enumerate() {
            writeln!(f, "{p:>4} {rows:>11} {nnz:>13}")?;
        }
        write!(
            f,
            "max/mean: rows {:.4}, nnz {:.4}",
            self.rows_max_over_mean, self.nnz_max_over_mean
        )
    }
}

/// The order in which a worker visits the rows of its partition in one epoch.
pub struct EpochOrder;

impl EpochOrder {
    /// A permutation of `0..rows`, shuffled by `Rng::derive(seed, epoch)`:
    /// the same on every run, different for every epoch.
    // The shared API (design brief) names this `new` and has it return the permutation itself.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(rows: usize, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..rows).collect();
        Rng::derive(seed, epoch).shuffle(&mut order);
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClickGen, ClickModel, Features, Split};
    use proptest::prelude::*;

    fn sparse_with_nnz(nnz: &[usize]) -> Dataset {
        let mut indptr = vec![0u64];
        for &n in nnz {
            indptr.push(indptr.last().copied().unwrap_or(0) + n as u64);
        }
        let total = *indptr.last().unwrap_or(&0) as usize;
        Dataset {
            features: Features::Sparse {
                dim: 1,
                indptr,
                indices: vec![0; total],
                values: vec![1.0; total],
            },
            labels: vec![0; nnz.len()],
            num_classes: 2,
        }
    }

    fn every_row_once(parts: &[Vec<usize>], rows: usize) -> bool {
        let mut seen = vec![0u8; rows];
        parts.iter().flatten().for_each(|&r| seen[r] += 1);
        seen.iter().all(|&c| c == 1)
    }

    proptest! {
        #[test]
        fn rows_are_dealt_once_and_evenly(
            nnz in proptest::collection::vec(0usize..50, 0..300),
            parts in 1usize..17,
        ) {
            let ds = sparse_with_nnz(&nnz);
            for strategy in [Partition::Contiguous, Partition::Strided, Partition::BalancedNnz] {
                let p = partition(&ds, parts, strategy);
                prop_assert_eq!(p.len(), parts);
                prop_assert!(every_row_once(&p, nnz.len()));
                prop_assert!(p.iter().all(|part| part.windows(2).all(|w| w[0] < w[1])));
                let skew = SkewReport::new(&ds, &p);
                if strategy != Partition::BalancedNnz && nnz.len() >= parts {
                    let rows_per_part = nnz.len() / parts;
                    prop_assert!(skew.rows_max_over_mean <= 1.0 + 1.0 / rows_per_part as f64 + 1e-12);
                }
                if strategy == Partition::BalancedNnz {
                    let mean = nnz.iter().sum::<usize>() as f64 / parts as f64;
                    let biggest = nnz.iter().copied().max().unwrap_or(0) as f64;
                    let max = skew.per_part.iter().map(|&(_, n)| n as f64).fold(0.0, f64::max);
                    prop_assert!(max <= mean + biggest + 1e-9);
                }
            }
            for (p, range) in (0..parts).map(|p| (p, partition_range(nnz.len(), parts, p))) {
                prop_assert_eq!(partition(&ds, parts, Partition::Contiguous)[p].clone(), range.collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn balanced_nnz_evens_out_zipf_rows() {
        // Row lengths from click data, sorted so that contiguous ranges are badly skewed.
        let cfg = ClickGen {
            rows: 20_000,
            test_rows: 1,
            hash_bits: 16,
            nnz_mean: 20.0,
            ..ClickGen::default()
        };
        let (ds, _) = ClickModel::new(&cfg).expect("valid").dataset(Split::Train);
        let mut lens: Vec<usize> = (0..ds.rows()).map(|r| ds.row_nnz(r)).collect();
        lens.sort_unstable();
        let sorted = sparse_with_nnz(&lens);
        let contiguous = SkewReport::new(&sorted, &partition(&sorted, 8, Partition::Contiguous));
        let balanced = SkewReport::new(&sorted, &partition(&sorted, 8, Partition::BalancedNnz));
        assert!(contiguous.nnz_max_over_mean > 1.2, "{contiguous}");
        assert!(balanced.nnz_max_over_mean < 1.05, "{balanced}");
        assert!(balanced.to_string().contains("max/mean"));
    }

    #[test]
    fn epoch_order_is_a_deterministic_permutation() {
        let a = EpochOrder::new(1000, 7, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, EpochOrder::new(1000, 7, 0));
        assert_ne!(a, EpochOrder::new(1000, 7, 1));
        assert_ne!(a, EpochOrder::new(1000, 8, 0));
    }

    #[test]
    fn strategy_names_parse() {
        assert_eq!("balanced_nnz".parse::<Partition>().ok(), Some(Partition::BalancedNnz));
        assert!("random".parse::<Partition>().is_err());
    }
}
