//! The sparse codecs: `topk:F` keeps the `k = round(F·n)` (at least 1)
//! largest `|x|`, `randk:F` keeps `k` elements chosen at random, `threshold:T`
//! keeps every `|x| > T`. All three send (index, value) pairs sorted by
//! index, with the values exactly as given, and decode by scattering.
//!
//! Payload: a u32 parameter `nnz`, then `nnz` indices (u32, strictly
//! increasing, each `< n`), then `nnz` values (f32).
//! Errors, all biased and meant for error feedback:
//! top-k drops the smallest `n − k`, so `‖x − decode(x)‖² ≤ (1 − k/n)·‖x‖²`;
//! random-k drops `n − k` at random, so the same holds in expectation
//! (not rescaled by n/k: that variant is unbiased, but its error can exceed
//! ‖x‖ and it does not converge with error feedback);
//! threshold drops only `|x| ≤ T`, so `|x − decode(x)| ≤ T` per element.
//!
//! Top-k is a selection, not a sort: a threshold is estimated from a sample
//! of up to 2^16 magnitudes, one pass keeps the elements above it (about 1.1·k),
//! and a selection among those finds the exact k-th largest. Ties at the
//! k-th magnitude go to the lowest indices, so the result is exactly k
//! elements and does not depend on anything but the input.

use tensor::Rng;

use crate::error::CodecError;
use crate::header::{self, CodecId, Reader};
use crate::kernel::Sink;

/// Inputs up to this size skip the sampling and select among all elements.
const TOPK_DIRECT_MAX: usize = 1 << 16;
/// Most magnitudes sampled to estimate the top-k threshold.
const TOPK_SAMPLES_MAX: usize = 1 << 16;
/// At least this many elements per sampled one.
const TOPK_SAMPLE_STRIDE_MIN: usize = 16;

/// How many elements `topk:fraction` and `randk:fraction` keep of `n`.
pub(crate) fn keep_count(fraction: f64, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    ((fraction * n as f64).round() as usize).clamp(1, n)
}

pub(crate) fn message_bytes(nnz: usize) -> usize {
    header::HEADER_BYTES + 4 + 8 * nnz
}

/// `|x|` as an integer that orders like `|x|` (NaN above infinity).
#[inline(always)]
fn key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

pub(crate) fn encode_topk(values: &[f32], fraction: f64, out: &mut Vec<u8>) {
    let k = keep_count(fraction, values.len());
    write(CodecId::TopK, values, &topk_indices(values, k), out);
}

pub(crate) fn encode_randk(values: &[f32], fraction: f64, seed: u64, out: &mut Vec<u8>) {
    let k = keep_count(fraction, values.len());
    write(CodecId::RandK, values, &randk_indices(values.len(), k, seed), out);
}

pub(crate) fn encode_threshold(values: &[f32], threshold: f32, out: &mut Vec<u8>) {
    let t = key(threshold);
    let nnz = values.iter().filter(|x| key(**x) > t).count();
    let start = header::begin(out, CodecId::Threshold, values.len(), &[nnz as u32], 8 * nnz);
    let (idx, vals) = out[start..].split_at_mut(4 * nnz);
    let (mut idx, mut vals) = (idx.chunks_exact_mut(4), vals.chunks_exact_mut(4));
    for (i, x) in values.iter().enumerate() {
        if key(*x) > t {
            let (Some(d), Some(v)) = (idx.next(), vals.next()) else {
                unreachable!("the first pass counted these elements");
            };
            d.copy_from_slice(&(i as u32).to_le_bytes());
            v.copy_from_slice(&x.to_le_bytes());
        }
    }
}

fn write(id: CodecId, values: &[f32], indices: &[u32], out: &mut Vec<u8>) {
    let nnz = indices.len();
    let start = header::begin(out, id, values.len(), &[nnz as u32], 8 * nnz);
    let (idx, vals) = out[start..].split_at_mut(4 * nnz);
    for ((d, v), i) in idx.chunks_exact_mut(4).zip(vals.chunks_exact_mut(4)).zip(indices) {
        d.copy_from_slice(&i.to_le_bytes());
        v.copy_from_slice(&values[*i as usize].to_le_bytes());
    }
}

/// The indices of the `k` largest `|x|`, ascending; ties go to lower indices.
pub(crate) fn topk_indices(x: &[f32], k: usize) -> Vec<u32> {
    let n = x.len();
    if k == 0 {
        return Vec::new();
    }
    if k >= n {
        return (0..n as u32).collect();
    }
    if n <= TOPK_DIRECT_MAX {
        return topk_exact(x, k);
    }
    let t = estimate_threshold(x, k);
    // One pass: keep what is above the estimate, count what equals it.
    let mut above: Vec<u32> = Vec::with_capacity(k + k / 4 + 16);
    let mut equal = 0usize;
    for (i, v) in x.iter().enumerate() {
        let kv = key(*v);
        if kv > t {
            above.push(i as u32);
        } else if kv == t {
            equal += 1;
        }
    }
    if above.len() >= k {
        let mut keys: Vec<u32> = above.iter().map(|&i| key(x[i as usize])).collect();
        let (kth, greater) = kth_largest(&mut keys, k);
        let mut ties = k - greater;
        above.retain(|&i| {
            let kv = key(x[i as usize]);
            let keep = kv > kth || (kv == kth && ties > 0);
            if kv == kth && keep {
                ties -= 1;
            }
            keep
        });
        return above;
    }
    if above.len() + equal >= k {
        // The estimate is the k-th largest itself (common when many values are equal, e.g. zero).
        return emit(x, t, k - above.len(), k);
    }
    // The estimate was too high: rare; select among everything.
    topk_exact(x, k)
}

/// Selects among all elements.
fn topk_exact(x: &[f32], k: usize) -> Vec<u32> {
    let mut keys: Vec<u32> = x.iter().map(|v| key(*v)).collect();
    let (kth, greater) = kth_largest(&mut keys, k);
    emit(x, kth, k - greater, k)
}

/// The k-th largest of `keys` (which it reorders) and how many are larger.
fn kth_largest(keys: &mut [u32], k: usize) -> (u32, usize) {
    let (larger_or_equal, kth, _) = keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
    let kth = *kth;
    (kth, larger_or_equal.iter().filter(|&&v| v > kth).count())
}

/// The indices of every key above `kth` and of the first `ties` equal to it.
fn emit(x: &[f32], kth: u32, mut ties: usize, k: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(k);
    for (i, v) in x.iter().enumerate() {
        let kv = key(*v);
        if kv > kth || (kv == kth && ties > 0) {
            if kv == kth {
                ties -= 1;
            }
            out.push(i as u32);
        }
    }
    debug_assert_eq!(out.len(), k);
    out
}

/// A magnitude that about `1.1·k` elements exceed: the sample's order
/// statistic at `k/n` plus three standard deviations. Any value is correct;
/// a bad one costs time only. The sample positions are fixed (one random
/// offset per stride, from a constant seed), so results never depend on them.
fn estimate_threshold(x: &[f32], k: usize) -> u32 {
    let n = x.len();
    let samples = (n / TOPK_SAMPLE_STRIDE_MIN).clamp(1, TOPK_SAMPLES_MAX);
    let stride = n / samples;
    let mut rng = Rng::new(0x70b_4e55);
    let mut sample: Vec<u32> = (0..samples)
        .map(|j| key(x[j * stride + rng.below(stride as u64) as usize]))
        .collect();
    let expected = samples as f64 * k as f64 / n as f64;
    let rank = (expected + 3.0 * expected.sqrt() + 2.0).ceil() as usize;
    let rank = rank.clamp(1, samples);
    let (_, t, _) = sample.select_nth_unstable_by(rank - 1, |a, b| b.cmp(a));
    *t
}

/// `k` distinct indices below `n` chosen uniformly at random, ascending.
pub(crate) fn randk_indices(n: usize, k: usize, seed: u64) -> Vec<u32> {
    if k >= n {
        return (0..n as u32).collect();
    }
    // Mark k (or, when k > n/2, the n − k to leave out) distinct positions in a bitmap.
    let invert = k > n / 2;
    let marks = if invert { n - k } else { k };
    let mut bits = vec![0u64; n.div_ceil(64)];
    let mut rng = Rng::new(seed);
    let mut marked = 0;
    while marked < marks {
        let i = rng.below(n as u64) as usize;
        let (word, bit) = (&mut bits[i / 64], 1u64 << (i % 64));
        if *word & bit == 0 {
            *word |= bit;
            marked += 1;
        }
    }
    let mut out = Vec::with_capacity(k);
    for (w, &word) in bits.iter().enumerate() {
        let mut word = if invert { !word } else { word };
        let valid = n - 64 * w;
        if valid < 64 {
            word &= (1u64 << valid) - 1;
        }
        while word != 0 {
            out.push((64 * w) as u32 + word.trailing_zeros());
            word &= word - 1;
        }
    }
    debug_assert_eq!(out.len(), k);
    out
}

pub(crate) fn decode<S: Sink>(mut msg: Reader<'_>, out: &mut [f32]) -> Result<(), CodecError> {
    msg.expect_elems(out.len())?;
    let n = out.len();
    let nnz = msg.param("nnz")?;
    if nnz as usize > n {
        return Err(msg.bad("nnz", nnz.into(), "exceeds the element count"));
    }
    let nnz = nnz as usize;
    let id = msg.id;
    let payload = msg.payload(8 * nnz as u64)?;
    let (idx, vals) = payload.split_at(4 * nnz);
    // Check every index before writing, so that a bad message leaves `out` as it was.
    let mut previous: Option<u32> = None;
    for (position, b) in idx.chunks_exact(4).enumerate() {
        let index = header::get_u32(b);
        if index as usize >= n {
            return Err(CodecError::IndexOutOfRange {
                codec: id,
                position,
                index,
                elems: n,
            });
        }
        if let Some(previous) = previous
            && index <= previous
        {
            return Err(CodecError::IndexOrder {
                codec: id,
                position,
                index,
                previous,
            });
        }
        previous = Some(index);
    }
    if S::OVERWRITES {
        out.fill(0.0);
    }
    for (i, v) in idx.chunks_exact(4).zip(vals.chunks_exact(4)) {
        S::put(&mut out[header::get_u32(i) as usize], header::get_f32(v));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn by_sorting(x: &[f32], k: usize) -> Vec<u32> {
        let mut order: Vec<u32> = (0..x.len() as u32).collect();
        order.sort_by(|&a, &b| key(x[b as usize]).cmp(&key(x[a as usize])).then(a.cmp(&b)));
        order.truncate(k);
        order.sort();
        order
    }

    #[test]
    fn topk_keeps_exactly_the_k_largest_magnitudes() {
        let mut rng = Rng::new(1);
        for &n in &[1usize, 7, 1000, TOPK_DIRECT_MAX + 1, 300_000] {
            let x: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            for &k in &[1usize, 3, n / 100, n / 2, n] {
                let k = k.clamp(1, n);
                assert_eq!(topk_indices(&x, k), by_sorting(&x, k), "n {n} k {k}");
            }
        }
    }

    #[test]
    fn topk_breaks_ties_by_index_when_most_values_are_equal() {
        let mut x = vec![0f32; 200_000];
        for i in (0..x.len()).step_by(1000) {
            x[i] = -2.0;
        }
        x[5] = 0.5;
        x[77] = -0.5;
        for k in [10, 200, 201, 202, 210, 5000] {
            assert_eq!(topk_indices(&x, k), by_sorting(&x, k), "k {k}");
        }
        // Constant input: the sample's estimate equals everything.
        let x = vec![1.5f32; 100_000];
        assert_eq!(topk_indices(&x, 10), (0..10).collect::<Vec<u32>>());
    }

    #[test]
    fn topk_survives_an_adversarial_sample() {
        // Large values exactly where a strided sample does not look, small ones where it does:
        // whatever the estimate, the answer is exact.
        let n = 1 << 20;
        let x: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { 1.0 + i as f32 } else { 1e-3 }).collect();
        assert_eq!(topk_indices(&x, 1000), by_sorting(&x, 1000));
        assert_eq!(topk_indices(&x, n / 2), by_sorting(&x, n / 2));
    }

    #[test]
    fn randk_picks_k_distinct_sorted_indices_deterministically() {
        for &(n, k) in &[
            (10usize, 3usize),
            (100, 99),
            (1000, 500),
            (1000, 501),
            (64, 64),
            (65, 1),
        ] {
            let a = randk_indices(n, k, 9);
            assert_eq!(a.len(), k);
            assert!(a.windows(2).all(|w| w[0] < w[1]));
            assert!(a.iter().all(|&i| (i as usize) < n));
            assert_eq!(a, randk_indices(n, k, 9));
        }
        assert_ne!(randk_indices(1000, 10, 1), randk_indices(1000, 10, 2));
    }

    #[test]
    fn randk_is_uniform() {
        let n = 50;
        let mut hits = vec![0u32; n];
        for seed in 0..20_000 {
            for i in randk_indices(n, 5, seed) {
                hits[i as usize] += 1;
            }
        }
        // Each index is kept with probability 1/10: 2000 ± 42.
        assert!(hits.iter().all(|&h| (1800..2200).contains(&h)), "{hits:?}");
    }

    #[test]
    fn keep_count_rounds_and_keeps_at_least_one() {
        assert_eq!(keep_count(0.01, 0), 0);
        assert_eq!(keep_count(0.01, 10), 1);
        assert_eq!(keep_count(0.01, 6_500_000), 65_000);
        assert_eq!(keep_count(1.0, 17), 17);
    }
}
