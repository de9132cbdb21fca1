//! The sparse codecs: `topk:F` keeps the `k = round(F·n)` (at least 1)
//! largest `|x|`, `randk:F` keeps `k` elements chosen at random, `threshold:T`
//! keeps every `|x| > T`. All three send the kept indices, ascending, as
//! delta varints and the values as f32 (exact) or, with `:f16`, as IEEE half
//! of `x / s` with `s` the largest finite kept `|x|`; decoding scatters.
//!
//! Parameters: `nnz`, `values` (0: f32, 1: f16), `index_bytes`, and for f16
//! `scale` (the f32 bits of `s`). Payload: the indices in `index_bytes`
//! bytes, then `nnz` values (4 or 2 bytes each). Index `j` is sent as the
//! LEB128 varint of `i_j − i_{j−1} − 1` (of `i_0` for the first), so every
//! well-formed message lists strictly increasing indices; a gap below 128
//! takes one byte, below 16384 two. Top-1% of a gradient, whose gaps
//! average 100, takes about 1.3 bytes per index: 5.3 bytes per kept element
//! with f32 values and 3.3 with f16, against 8 for a plain u32 index and
//! f32 value.
//!
//! Errors, all biased and meant for error feedback:
//! top-k drops the smallest `n − k`, so `‖x − decode(x)‖² ≤ (1 − k/n)·‖x‖²`;
//! random-k drops `n − k` at random, so the same holds in expectation
//! (not rescaled by n/k: that variant is unbiased, but its error can exceed
//! ‖x‖ and it does not converge with error feedback);
//! threshold drops only `|x| ≤ T`, so `|x − decode(x)| ≤ T` per element.
//! With f16 values each kept element is off by at most
//! `2^-10·|x| + 2^-24·s` more (half's relative 2^-11 for `|x/s| ≥ 2^-14` and
//! absolute 2^-25 below, plus f32 rounding of the division and the product).
//! Non-finite values: NaN and ±inf are sent as they are (the scale is taken
//! over the finite ones; an infinity stays infinite).
//!
//! Top-k is a selection, not a sort: a threshold is estimated from a sample
//! of up to 2^16 magnitudes, one pass keeps the elements above it (about 1.1·k),
//! and a selection among those finds the exact k-th largest. Ties at the
//! k-th magnitude go to the lowest indices, so the result is exactly k
//! elements and does not depend on anything but the input.

use tensor::Rng;

use crate::error::CodecError;
use crate::float::{f16_to_f32, f32_to_f16};
use crate::header::{self, CodecId, Reader};
use crate::kernel::Sink;
use crate::spec::SparseValues;

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

/// Most bytes of one varint index (a u32 in 7-bit groups).
const VARINT_BYTES_MAX: usize = 5;
/// `values` parameter: f32 values.
const VALUES_F32: u32 = 0;
/// `values` parameter: f16 values of `x / scale`.
const VALUES_F16: u32 = 1;

/// `|x|` as an integer that orders like `|x|` (NaN above infinity).
#[inline(always)]
fn key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

pub(crate) fn encode_topk(values: &[f32], fraction: f64, format: SparseValues, out: &mut Vec<u8>) {
    let k = keep_count(fraction, values.len());
    write(CodecId::TopK, values, &topk_indices(values, k), format, out);
}

pub(crate) fn encode_randk(values: &[f32], fraction: f64, format: SparseValues, seed: u64, out: &mut Vec<u8>) {
    let k = keep_count(fraction, values.len());
    write(
        CodecId::RandK,
        values,
        &randk_indices(values.len(), k, seed),
        format,
        out,
    );
}

pub(crate) fn encode_threshold(values: &[f32], threshold: f32, format: SparseValues, out: &mut Vec<u8>) {
    let t = key(threshold);
    let indices: Vec<u32> = (0..values.len() as u32)
        .filter(|&i| key(values[i as usize]) > t)
        .collect();
    write(CodecId::Threshold, values, &indices, format, out);
}

/// Bytes of `v` as a LEB128 varint.
#[inline(always)]
fn varint_len(v: u32) -> usize {
    // 1 + ⌊(bits − 1) / 7⌋, with 0 taking one byte.
    let bits = 32 - (v | 1).leading_zeros() as usize;
    1 + (bits - 1) / 7
}

/// The gaps `indices` are sent as: the first index, then each index minus the previous one minus one.
fn gaps(indices: &[u32]) -> impl Iterator<Item = u32> + '_ {
    let mut previous: Option<u32> = None;
    indices.iter().map(move |&i| {
        let g = match previous {
            None => i,
            Some(p) => i - p - 1,
        };
        previous = Some(i);
        g
    })
}

/// Writes the message for `values[indices]`; `indices` are strictly increasing.
fn write(id: CodecId, values: &[f32], indices: &[u32], format: SparseValues, out: &mut Vec<u8>) {
    let nnz = indices.len();
    let index_bytes: usize = gaps(indices).map(varint_len).sum();
    // At most 5 bytes per index: only a message of nearly 2^32 kept elements comes near.
    assert!(
        u32::try_from(index_bytes).is_ok(),
        "sparse indices beyond 4 GiB in one message"
    );
    let value_bytes = format.bytes() * nnz;
    let mut params = vec![nnz as u32, VALUES_F32, index_bytes as u32];
    let scale = match format {
        SparseValues::F32 => 1.0,
        SparseValues::F16 => {
            let max = indices
                .iter()
                .map(|&i| values[i as usize].abs())
                .filter(|a| a.is_finite())
                .fold(0f32, f32::max);
            let scale = if max > 0.0 { max } else { 1.0 };
            params[1] = VALUES_F16;
            params.push(scale.to_bits());
            scale
        }
    };
    let start = header::begin(out, id, values.len(), &params, index_bytes + value_bytes);
    let (idx, vals) = out[start..].split_at_mut(index_bytes);
    let mut at = 0;
    for mut g in gaps(indices) {
        while g >= 0x80 {
            idx[at] = (g as u8) | 0x80;
            g >>= 7;
            at += 1;
        }
        idx[at] = g as u8;
        at += 1;
    }
    debug_assert_eq!(at, index_bytes);
    match format {
        SparseValues::F32 => {
            for (v, i) in vals.chunks_exact_mut(4).zip(indices) {
                v.copy_from_slice(&values[*i as usize].to_le_bytes());
            }
        }
        SparseValues::F16 => {
            for (v, i) in vals.chunks_exact_mut(2).zip(indices) {
                v.copy_from_slice(&f32_to_f16(values[*i as usize] / scale).to_le_bytes());
            }
        }
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

/// Reads the varint at `*at`; `None` when it is cut off or exceeds 32 bits.
#[inline(always)]
fn read_varint(b: &[u8], at: &mut usize) -> Option<u32> {
    let mut v = 0u64;
    for shift in 0..VARINT_BYTES_MAX {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << (7 * shift);
        if byte & 0x80 == 0 {
            return u32::try_from(v).ok();
        }
    }
    None
}

/// The indices of a message's index bytes, one at a time.
struct Indices<'a> {
    bytes: &'a [u8],
    at: usize,
    next: u64,
}

impl<'a> Indices<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0, next: 0 }
    }

    /// The next index, or `None` for a malformed varint. Never overflows:
    /// at most 2^32 indices each advance by at most 2^32.
    #[inline(always)]
    fn next(&mut self) -> Option<u64> {
        let gap = read_varint(self.bytes, &mut self.at)?;
        let index = self.next + u64::from(gap);
        self.next = index + 1;
        Some(index)
    }
}

pub(crate) fn decode<S: Sink>(mut msg: Reader<'_>, out: &mut [f32]) -> Result<(), CodecError> {
    msg.expect_elems(out.len())?;
    let n = out.len();
    let nnz = msg.param("nnz")?;
    if nnz as usize > n {
        return Err(msg.bad("nnz", nnz.into(), "exceeds the element count"));
    }
    let nnz = nnz as usize;
    let format = msg.param_in("values", VALUES_F32, VALUES_F16, "must be 0 (f32) or 1 (f16)")?;
    let index_bytes = msg.param("index_bytes")? as u64;
    if index_bytes < nnz as u64 || index_bytes > (VARINT_BYTES_MAX * nnz) as u64 {
        return Err(msg.bad("index_bytes", index_bytes, "must be between 1 and 5 bytes per index"));
    }
    let (format, scale) = if format == VALUES_F16 {
        let scale = f32::from_bits(msg.param("scale")?);
        (SparseValues::F16, scale)
    } else {
        (SparseValues::F32, 1.0)
    };
    let id = msg.id;
    let payload = msg.payload(index_bytes + (format.bytes() * nnz) as u64)?;
    let (idx, vals) = payload.split_at(index_bytes as usize);
    // Check every index before writing, so that a bad message leaves `out` as it was.
    let mut indices = Indices::new(idx);
    for position in 0..nnz {
        let Some(index) = indices.next() else {
            return Err(CodecError::IndexEncoding {
                codec: id,
                position,
                why: "the varint is cut off or exceeds 32 bits",
            });
        };
        if index >= n as u64 {
            return Err(CodecError::IndexOutOfRange {
                codec: id,
                position,
                index,
                elems: n,
            });
        }
    }
    if indices.at != idx.len() {
        return Err(CodecError::IndexEncoding {
            codec: id,
            position: nnz,
            why: "bytes are left after the last index",
        });
    }
    if S::OVERWRITES {
        out.fill(0.0);
    }
    let mut indices = Indices::new(idx);
    match format {
        SparseValues::F32 => {
            for v in vals.chunks_exact(4) {
                let i = indices.next().expect("checked above") as usize;
                S::put(&mut out[i], header::get_f32(v));
            }
        }
        SparseValues::F16 => {
            for v in vals.chunks_exact(2) {
                let i = indices.next().expect("checked above") as usize;
                S::put(&mut out[i], f16_to_f32(u16::from_le_bytes([v[0], v[1]])) * scale);
            }
        }
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
    fn varints_round_trip_at_every_length() {
        for v in [
            0u32,
            1,
            127,
            128,
            16_383,
            16_384,
            (1 << 21) - 1,
            1 << 21,
            (1 << 28) - 1,
            1 << 28,
            u32::MAX,
        ] {
            assert_eq!(gaps(&[v]).collect::<Vec<u32>>(), [v]);
            let mut bytes = Vec::new();
            let mut g = v;
            while g >= 0x80 {
                bytes.push((g as u8) | 0x80);
                g >>= 7;
            }
            bytes.push(g as u8);
            assert_eq!(bytes.len(), varint_len(v), "{v}");
            let mut at = 0;
            assert_eq!(read_varint(&bytes, &mut at), Some(v));
            assert_eq!(at, bytes.len());
        }
        // Six bytes, or five whose value exceeds 32 bits, are refused.
        assert_eq!(read_varint(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01], &mut 0), None);
        assert_eq!(read_varint(&[0xff, 0xff, 0xff, 0xff, 0x10], &mut 0), None);
        assert_eq!(read_varint(&[0x80], &mut 0), None);
    }

    #[test]
    fn keep_count_rounds_and_keeps_at_least_one() {
        assert_eq!(keep_count(0.01, 0), 0);
        assert_eq!(keep_count(0.01, 10), 1);
        assert_eq!(keep_count(0.01, 6_500_000), 65_000);
        assert_eq!(keep_count(1.0, 17), 17);
    }
}
