//! `sign[:BUCKET]`: 1-bit SGD / signSGD with a scale. Per bucket one f32
//! scale, the mean of `|x|`, and per element its sign bit; decoded as
//! `±scale`. The bucket is a multiple of 8 so that buckets start on a byte.
//!
//! Payload: `ceil(n / bucket)` scales (f32), then `ceil(n / 8)` bytes of
//! sign bits (element `i` is bit `i % 8` of byte `i / 8`; 1 = negative,
//! including −0.0; the unused bits of the last byte are 0).
//! Error: biased. Per bucket of b elements the mean of |x| is the scale that
//! minimises the error, which is then `‖x − decode(x)‖² = ‖x‖² − ‖x‖₁² / b`,
//! below `‖x‖²` unless x = 0: never worse than sending nothing. Meant to be
//! used with error feedback.

use crate::error::CodecError;
use crate::header::{self, CodecId, Reader};
use crate::kernel::{Sink, simd_kernel, sum_abs};
use crate::spec::BUCKET_MAX;

pub(crate) fn payload_bytes(n: usize, bucket: usize) -> usize {
    4 * n.div_ceil(bucket) + n.div_ceil(8)
}

pub(crate) fn encode(values: &[f32], bucket: usize, out: &mut Vec<u8>) {
    assert!(bucket.is_multiple_of(8), "the spec checks the bucket");
    let n = values.len();
    let buckets = n.div_ceil(bucket);
    let start = header::begin(out, CodecId::Sign, n, &[bucket as u32], payload_bytes(n, bucket));
    let (scales, bits) = out[start..].split_at_mut(4 * buckets);
    pack(values, bucket, scales, bits);
}

simd_kernel! {
    fn pack(values: &[f32], bucket: usize, scales: &mut [u8], bits: &mut [u8]) {
        let groups = values.chunks(bucket).zip(scales.chunks_exact_mut(4)).zip(bits.chunks_mut(bucket / 8));
        for ((x, scale), bits) in groups {
            let mean = sum_abs(x) / x.len() as f32;
            scale.copy_from_slice(&mean.to_le_bytes());
            let xs = x.chunks_exact(8);
            let tail = xs.remainder();
            let mut bs = bits.iter_mut();
            for (c, b) in xs.zip(&mut bs) {
                *b = sign_byte(c);
            }
            if let Some(b) = bs.next() {
                *b = sign_byte(tail);
            }
        }
    }
}

/// The sign bits of up to 8 values, the first in bit 0.
#[inline(always)]
fn sign_byte(x: &[f32]) -> u8 {
    let mut b = 0u32;
    for (j, v) in x.iter().enumerate() {
        b |= (v.to_bits() >> 31) << j;
    }
    b as u8
}

pub(crate) fn decode<S: Sink>(mut msg: Reader<'_>, out: &mut [f32]) -> Result<(), CodecError> {
    msg.expect_elems(out.len())?;
    let bucket = msg.param_in("bucket", 8, BUCKET_MAX as u32, "must be in 8..=2^20")? as usize;
    if !bucket.is_multiple_of(8) {
        return Err(msg.bad("bucket", bucket as u64, "must be a multiple of 8"));
    }
    let n = out.len();
    let buckets = n.div_ceil(bucket);
    let payload = msg.payload(payload_bytes(n, bucket) as u64)?;
    let (scales, bits) = payload.split_at(4 * buckets);
    unpack::<S>(scales, bits, bucket, out);
    Ok(())
}

simd_kernel! {
    fn unpack<S: Sink>(scales: &[u8], bits: &[u8], bucket: usize, out: &mut [f32]) {
        for ((o, s), bits) in out.chunks_mut(bucket).zip(scales.chunks_exact(4)).zip(bits.chunks(bucket / 8)) {
            let scale = header::get_f32(s).to_bits();
            let os = o.chunks_exact_mut(8);
            let tail_len = os.len() * 8;
            for (o, b) in os.zip(bits) {
                for (j, o) in o.iter_mut().enumerate() {
                    S::put(o, f32::from_bits(scale ^ (((u32::from(*b) >> j) & 1) << 31)));
                }
            }
            let tail = &mut o[tail_len..];
            if let Some(b) = bits.get(tail_len / 8) {
                for (j, o) in tail.iter_mut().enumerate() {
                    S::put(o, f32::from_bits(scale ^ (((u32::from(*b) >> j) & 1) << 31)));
                }
            }
        }
    }
}
