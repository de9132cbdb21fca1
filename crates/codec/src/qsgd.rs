//! `qsgd:S[:BUCKET]` (Alistarh et al., 2017): per bucket the L2 norm, and per
//! element a sign and a level in 0..=S, `S·|x| / norm` rounded stochastically,
//! decoded as `sign · norm · level / S`.
//!
//! Payload: `ceil(n / bucket)` norms (f32), then the signed levels packed
//! in 4 bits (two's complement, element `2i` in the low nibble of byte `i`)
//! when S ≤ 7, in an i8 when S ≤ 127 and in an i16 otherwise.
//! Error: `|x − decode(x)| ≤ norm / S` per element (up to f32 rounding of
//! `S·|x| / norm`, below S·2^-24 of a step); unbiased; per bucket of
//! b elements `E‖x − decode(x)‖² ≤ min(b / S², √b / S) · ‖x‖²` (Lemma 3.1).

use crate::error::CodecError;
use crate::header::{self, CodecId, Reader};
use crate::kernel::{Dither, Sink, simd_kernel, stochastic_round, sum_squares_f64};
use crate::spec::{BUCKET_MAX, LEVELS_MAX};

/// How many bits each level takes for `levels` levels.
fn level_bits(levels: u32) -> usize {
    match levels {
        0..=7 => 4,
        8..=127 => 8,
        _ => 16,
    }
}

pub(crate) fn payload_bytes(n: usize, levels: u32, bucket: usize) -> usize {
    4 * n.div_ceil(bucket) + (n * level_bits(levels)).div_ceil(8)
}

pub(crate) fn encode(values: &[f32], levels: u32, bucket: usize, seed: u64, out: &mut Vec<u8>) {
    let n = values.len();
    let buckets = n.div_ceil(bucket);
    let start = header::begin(
        out,
        CodecId::Qsgd,
        n,
        &[levels, bucket as u32],
        payload_bytes(n, levels, bucket),
    );
    let (norms, packed) = out[start..].split_at_mut(4 * buckets);
    if level_bits(levels) == 4 {
        packed.fill(0); // nibbles are or-ed in
    }
    quantize(values, levels, bucket, norms, packed, &mut Dither::new(seed));
}

simd_kernel! {
    fn quantize(values: &[f32], levels: u32, bucket: usize, norms: &mut [u8], packed: &mut [u8], dither: &mut Dither) {
        let bits = level_bits(levels);
        let s = levels as f32;
        let max = levels as i32;
        let mut q = vec![0i16; bucket.min(values.len())];
        let mut r = vec![0u32; bucket.min(values.len())];
        for (b, (x, norm_bytes)) in values.chunks(bucket).zip(norms.chunks_exact_mut(4)).enumerate() {
            let norm = sum_squares_f64(x).sqrt() as f32;
            norm_bytes.copy_from_slice(&norm.to_le_bytes());
            // As in int8: a zero or non-finite bucket sends zeros and decodes to 0 or NaN.
            let inv = if norm > 0.0 && norm.is_finite() { s / norm } else { 0.0 };
            let q = &mut q[..x.len()];
            let r = &mut r[..x.len()];
            dither.fill(r);
            for ((q, x), r) in q.iter_mut().zip(x).zip(r.iter()) {
                let level = stochastic_round(x.abs() * inv, *r).clamp(0, max);
                *q = (if x.is_sign_negative() { -level } else { level }) as i16;
            }
            let first = b * bucket;
            match bits {
                4 => pack_nibbles(q, first, packed),
                8 => {
                    for (d, q) in packed[first..first + q.len()].iter_mut().zip(q.iter()) {
                        *d = *q as i8 as u8;
                    }
                }
                _ => {
                    for (d, q) in packed[2 * first..2 * (first + q.len())].chunks_exact_mut(2).zip(q.iter()) {
                        d.copy_from_slice(&q.to_le_bytes());
                    }
                }
            }
        }
    }
}

/// Ors the levels `q` of elements `first..` into 4-bit slots (element `i`
/// in byte `i / 2`, low nibble first); `packed` starts zeroed.
#[inline(always)]
fn pack_nibbles(q: &[i16], first: usize, packed: &mut [u8]) {
    let nibble = |q: i16| (q as u8) & 0x0f;
    let (head, q) = if first % 2 == 1 { q.split_at(1) } else { q.split_at(0) };
    if let Some(h) = head.first() {
        packed[first / 2] |= nibble(*h) << 4;
    }
    let start = first.div_ceil(2);
    let pairs = q.chunks_exact(2);
    let tail = pairs.remainder();
    for (d, p) in packed[start..].iter_mut().zip(pairs) {
        *d = nibble(p[0]) | nibble(p[1]) << 4;
    }
    if let Some(t) = tail.first() {
        packed[start + q.len() / 2] |= nibble(*t);
    }
}

/// The levels of elements `first..first + q.len()` from their 4-bit slots.
#[inline(always)]
fn unpack_nibbles(packed: &[u8], first: usize, q: &mut [i8]) {
    let low = |b: u8| ((b << 4) as i8) >> 4;
    let high = |b: u8| (b as i8) >> 4;
    let (head, q) = if first % 2 == 1 {
        q.split_at_mut(1)
    } else {
        q.split_at_mut(0)
    };
    if let Some(h) = head.first_mut() {
        *h = high(packed[first / 2]);
    }
    let start = first.div_ceil(2);
    let last = start + q.len() / 2;
    let mut pairs = q.chunks_exact_mut(2);
    for (p, b) in (&mut pairs).zip(&packed[start..]) {
        p[0] = low(*b);
        p[1] = high(*b);
    }
    if let Some(t) = pairs.into_remainder().first_mut() {
        *t = low(packed[last]);
    }
}

pub(crate) fn decode<S: Sink>(mut msg: Reader<'_>, out: &mut [f32]) -> Result<(), CodecError> {
    msg.expect_elems(out.len())?;
    let levels = msg.param_in("levels", 1, LEVELS_MAX, "must be in 1..=32767")?;
    let bucket = msg.param_in("bucket", 1, BUCKET_MAX as u32, "must be in 1..=2^20")? as usize;
    let n = out.len();
    let buckets = n.div_ceil(bucket);
    let payload = msg.payload(payload_bytes(n, levels, bucket) as u64)?;
    let (norms, packed) = payload.split_at(4 * buckets);
    dequantize::<S>(norms, packed, levels, bucket, out);
    Ok(())
}

simd_kernel! {
    fn dequantize<S: Sink>(norms: &[u8], packed: &[u8], levels: u32, bucket: usize, out: &mut [f32]) {
        let bits = level_bits(levels);
        let mut nibbles = vec![0i8; if bits == 4 { bucket.min(out.len()) } else { 0 }];
        for (b, (o, norm)) in out.chunks_mut(bucket).zip(norms.chunks_exact(4)).enumerate() {
            let step = header::get_f32(norm) / levels as f32;
            let first = b * bucket;
            match bits {
                4 => {
                    let q = &mut nibbles[..o.len()];
                    unpack_nibbles(packed, first, q);
                    for (o, q) in o.iter_mut().zip(q.iter()) {
                        S::put(o, f32::from(*q) * step);
                    }
                }
                8 => {
                    for (o, q) in o.iter_mut().zip(&packed[first..]) {
                        S::put(o, f32::from(*q as i8) * step);
                    }
                }
                _ => {
                    for (o, q) in o.iter_mut().zip(packed[2 * first..].chunks_exact(2)) {
                        S::put(o, f32::from(i16::from_le_bytes([q[0], q[1]])) * step);
                    }
                }
            }
        }
    }
}
