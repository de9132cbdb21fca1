//! The dense float codecs: `none` (f32 as is), `fp16` and `bf16`, with
//! round-to-nearest-even conversions written as branch-free selects so that
//! the compiler vectorises them.
//!
//! Why not the `half` crate: its slice conversions use F16C only when the
//! build enables it, and this workspace builds for baseline x86-64; the
//! hand-written conversion below, compiled for AVX2 by `simd_kernel!`, meets
//! the throughput target without a dependency.

use crate::error::CodecError;
use crate::header::{self, CodecId, Reader};
use crate::kernel::{Sink, simd_kernel};

/// f32 bits of 0.5: adding it aligns an f16 subnormal's mantissa at the
/// bottom of the f32 mantissa, so the FPU does the rounding (F. Giesen).
const DENORM_MAGIC: u32 = 126 << 23;
/// f32 bits of 65536.0 = 2^16, the first |x| whose f16 exponent overflows.
const F16_OVERFLOW: u32 = (127 + 16) << 23;
/// f32 bits of 2^-14, the smallest normal f16.
const F16_MIN_NORMAL: u32 = 113 << 23;

/// f32 → IEEE binary16 bits, round to nearest even; overflow gives ±inf,
/// NaN a quiet NaN.
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let a = bits & 0x7fff_ffff;
    let inf_nan = if a > 0x7f80_0000 { 0x7e00 } else { 0x7c00 };
    let subnormal = (f32::from_bits(a) + f32::from_bits(DENORM_MAGIC))
        .to_bits()
        .wrapping_sub(DENORM_MAGIC);
    // Rebias the exponent (127 → 15) and round: add 0xfff plus the lowest kept bit.
    let odd = (a >> 13) & 1;
    let normal = a.wrapping_sub(112 << 23).wrapping_add(0xfff + odd) >> 13;
    let h = if a >= F16_OVERFLOW {
        inf_nan
    } else if a < F16_MIN_NORMAL {
        subnormal
    } else {
        normal
    };
    (h | sign) as u16
}

/// IEEE binary16 bits → f32 (exact).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    const EXP: u32 = 0x7c00 << 13;
    let h = u32::from(h);
    let o = (h & 0x7fff) << 13;
    let exp = o & EXP;
    let normal = o + ((127 - 15) << 23);
    let inf_nan = normal + ((128 - 16) << 23);
    // A subnormal: give it the smallest normal exponent, then subtract that power of two.
    let subnormal = (f32::from_bits(normal + (1 << 23)) - f32::from_bits(F16_MIN_NORMAL)).to_bits();
    let bits = if exp == EXP {
        inf_nan
    } else if exp == 0 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(bits | ((h & 0x8000) << 16))
}

/// f32 → bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x40;
    (if b & 0x7fff_ffff > 0x7f80_0000 { nan } else { rounded }) as u16
}

/// bfloat16 bits → f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

pub(crate) fn encode_none(values: &[f32], out: &mut Vec<u8>) {
    let start = header::begin(out, CodecId::None, values.len(), &[], 4 * values.len());
    header::put_f32s(&mut out[start..], values);
}

pub(crate) fn encode_half(id: CodecId, values: &[f32], out: &mut Vec<u8>) {
    let start = header::begin(out, id, values.len(), &[], 2 * values.len());
    let payload = &mut out[start..];
    match id {
        CodecId::Fp16 => to_fp16(values, payload),
        CodecId::Bf16 => to_bf16(values, payload),
        _ => unreachable!("encode_half is for fp16 and bf16"),
    }
}

simd_kernel! {
    fn to_fp16(values: &[f32], payload: &mut [u8]) {
        for (d, x) in payload.chunks_exact_mut(2).zip(values) {
            d.copy_from_slice(&f32_to_f16(*x).to_le_bytes());
        }
    }
}

simd_kernel! {
    fn to_bf16(values: &[f32], payload: &mut [u8]) {
        for (d, x) in payload.chunks_exact_mut(2).zip(values) {
            d.copy_from_slice(&f32_to_bf16(*x).to_le_bytes());
        }
    }
}

pub(crate) fn decode<S: Sink>(msg: Reader<'_>, out: &mut [f32]) -> Result<(), CodecError> {
    msg.expect_elems(out.len())?;
    let id = msg.id;
    let width = if id == CodecId::None { 4 } else { 2 };
    let payload = msg.payload(width * out.len() as u64)?;
    match id {
        CodecId::None => from_f32::<S>(payload, out),
        CodecId::Fp16 => from_fp16::<S>(payload, out),
        CodecId::Bf16 => from_bf16::<S>(payload, out),
        _ => unreachable!("float::decode is for none, fp16 and bf16"),
    }
    Ok(())
}

simd_kernel! {
    fn from_f32<S: Sink>(payload: &[u8], out: &mut [f32]) {
        for (o, b) in out.iter_mut().zip(payload.chunks_exact(4)) {
            S::put(o, header::get_f32(b));
        }
    }
}

simd_kernel! {
    fn from_fp16<S: Sink>(payload: &[u8], out: &mut [f32]) {
        for (o, b) in out.iter_mut().zip(payload.chunks_exact(2)) {
            S::put(o, f16_to_f32(u16::from_le_bytes([b[0], b[1]])));
        }
    }
}

simd_kernel! {
    fn from_bf16<S: Sink>(payload: &[u8], out: &mut [f32]) {
        for (o, b) in out.iter_mut().zip(payload.chunks_exact(2)) {
            S::put(o, bf16_to_f32(u16::from_le_bytes([b[0], b[1]])));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every finite f16 value, ascending, with its bits (positive half only).
    fn positive_f16() -> Vec<(f64, u16)> {
        (0u16..0x7c00).map(|h| (f64::from(f16_to_f32(h)), h)).collect()
    }

    /// The nearest f16 by search, ties to the even bit pattern; `None` for overflow.
    fn reference_f16(x: f32, table: &[(f64, u16)]) -> u16 {
        let sign = if x.is_sign_negative() { 0x8000 } else { 0 };
        let a = f64::from(x.abs());
        if a >= 65520.0 {
            return 0x7c00 | sign; // halfway between 65504 and 2^16 rounds to even: infinity
        }
        let i = table.partition_point(|(v, _)| *v < a);
        let h = if i == 0 {
            table[0].1
        } else if i == table.len() {
            table[i - 1].1
        } else {
            let (lo, hi) = (table[i - 1], table[i]);
            let (dl, dh) = (a - lo.0, hi.0 - a);
            if dl < dh || (dl == dh && lo.1 % 2 == 0) {
                lo.1
            } else {
                hi.1
            }
        };
        h | sign
    }

    #[test]
    fn f16_decodes_every_pattern_and_reencodes_it() {
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            if x.is_nan() {
                assert!(f32_to_f16(x) & 0x7fff > 0x7c00, "{h:#06x}");
            } else {
                assert_eq!(f32_to_f16(x), h, "{h:#06x} -> {x}");
            }
        }
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
    }

    #[test]
    fn f16_rounds_to_nearest_even() {
        let table = positive_f16();
        let mut rng = tensor::Rng::new(5);
        let check = |x: f32| {
            if !x.is_nan() {
                assert_eq!(f32_to_f16(x), reference_f16(x, &table), "{x:e} ({:#010x})", x.to_bits());
            }
        };
        // Every f16 value, the midpoints between neighbours and one f32 ulp either side.
        for w in table.windows(2) {
            let mid = ((w[0].0 + w[1].0) / 2.0) as f32;
            for x in [
                w[0].0 as f32,
                mid,
                f32::from_bits(mid.to_bits() - 1),
                f32::from_bits(mid.to_bits() + 1),
            ] {
                check(x);
                check(-x);
            }
        }
        for x in [
            65504.0f32,
            65519.99,
            65520.0,
            1e9,
            f32::INFINITY,
            f32::MIN_POSITIVE,
            1e-10,
        ] {
            check(x);
            check(-x);
        }
        for _ in 0..200_000 {
            check(f32::from_bits(rng.next_u64() as u32));
        }
    }

    #[test]
    fn f16_relative_error_is_at_most_2_pow_minus_11_in_the_normal_range() {
        let mut rng = tensor::Rng::new(9);
        for _ in 0..200_000 {
            let x = ((rng.next_f64() * 2.0 - 1.0) * 65504.0 * rng.next_f64().powi(8)) as f32;
            let y = f16_to_f32(f32_to_f16(x));
            if x.abs() >= 2f32.powi(-14) {
                assert!((y - x).abs() <= x.abs() * 2f32.powi(-11), "{x} -> {y}");
            } else {
                assert!((y - x).abs() <= 2f32.powi(-25), "{x} -> {y}");
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_nan() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        assert_eq!(f32_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80); // rounds up to infinity
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert!(bf16_to_f32(f32_to_bf16(f32::from_bits(0x7f80_0001))).is_nan());
        let mut rng = tensor::Rng::new(11);
        for _ in 0..200_000 {
            let x = f32::from_bits(rng.next_u64() as u32);
            if !x.is_finite() || x.abs() > 3.0e38 || x.abs() < f32::MIN_POSITIVE {
                continue;
            }
            let y = bf16_to_f32(f32_to_bf16(x));
            assert!((y - x).abs() <= x.abs() * 2f32.powi(-8), "{x} -> {y}");
            // Exactly as f64 rounding to 8 significant bits would do it.
            let b = x.to_bits();
            let (lo, hi) = (
                f32::from_bits(b & 0xffff_0000),
                f32::from_bits((b & 0xffff_0000) + 0x1_0000),
            );
            let (dl, dh) = ((x - lo).abs(), (hi - x).abs());
            let want = if dl < dh || (dl == dh && (b >> 16).is_multiple_of(2)) {
                lo
            } else {
                hi
            };
            assert_eq!(y, want, "{x}");
        }
    }
}
