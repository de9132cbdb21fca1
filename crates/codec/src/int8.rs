//! `int8[:BUCKET]`: per bucket one f32 scale `max|x| / 127` and one signed
//! byte per element, `x / scale` rounded stochastically to an integer in
//! −127..=127.
//!
//! Payload: `ceil(n / bucket)` scales (f32), then `n` levels (i8).
//! Error: `|x − decode(x)| ≤ scale` per element (up to f32 rounding of
//! `x / scale`, below 127·2^-24 of a step); unbiased: rounding goes up with
//! probability equal to the fraction, to within 2^-16 of a step.

use crate::error::CodecError;
use crate::header::{self, CodecId, Reader};
use crate::kernel::{Dither, Sink, max_abs_bits, simd_kernel, stochastic_round};
use crate::spec::BUCKET_MAX;

pub(crate) fn encode(values: &[f32], bucket: usize, seed: u64, out: &mut Vec<u8>) {
    let n = values.len();
    let buckets = n.div_ceil(bucket);
    let start = header::begin(out, CodecId::Int8, n, &[bucket as u32], 4 * buckets + n);
    let (scales, levels) = out[start..].split_at_mut(4 * buckets);
    quantize(values, bucket, scales, levels, &mut Dither::new(seed));
}

simd_kernel! {
    fn quantize(values: &[f32], bucket: usize, scales: &mut [u8], levels: &mut [u8], dither: &mut Dither) {
        let mut r = vec![0u32; bucket.min(values.len())];
        for ((x, scale), q) in values.chunks(bucket).zip(scales.chunks_exact_mut(4)).zip(levels.chunks_mut(bucket)) {
            let max = f32::from_bits(max_abs_bits(x));
            scale.copy_from_slice(&(max / 127.0).to_le_bytes());
            // A zero, infinite or NaN bucket sends levels 0; its scale (0, inf
            // or NaN) makes it decode to 0 or NaN, so a non-finite gradient is not hidden.
            let inv = if max > 0.0 && max.is_finite() { 127.0 / max } else { 0.0 };
            let r = &mut r[..x.len()];
            dither.fill(r);
            for ((q, x), r) in q.iter_mut().zip(x).zip(r.iter()) {
                *q = stochastic_round(x * inv, *r).clamp(-127, 127) as i8 as u8;
            }
        }
    }
}

pub(crate) fn decode<S: Sink>(mut msg: Reader<'_>, out: &mut [f32]) -> Result<(), CodecError> {
    msg.expect_elems(out.len())?;
    let bucket = msg.param_in("bucket", 1, BUCKET_MAX as u32, "must be in 1..=2^20")? as usize;
    let n = out.len();
    let buckets = n.div_ceil(bucket);
    let payload = msg.payload(4 * buckets as u64 + n as u64)?;
    let (scales, levels) = payload.split_at(4 * buckets);
    dequantize::<S>(scales, levels, bucket, out);
    Ok(())
}

simd_kernel! {
    fn dequantize<S: Sink>(scales: &[u8], levels: &[u8], bucket: usize, out: &mut [f32]) {
        for ((o, q), s) in out.chunks_mut(bucket).zip(levels.chunks(bucket)).zip(scales.chunks_exact(4)) {
            let scale = header::get_f32(s);
            for (o, q) in o.iter_mut().zip(q) {
                S::put(o, f32::from(*q as i8) * scale);
            }
        }
    }
}
