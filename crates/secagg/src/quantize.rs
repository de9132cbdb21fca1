//! Fixed-point encoding of f32 updates into Z_{2^32}, scaled so that the sum
//! of up to `clients_max` encoded inputs never wraps.
//!
//! A value v is clipped to [−clip, clip] and encoded as
//! q = round((v + clip) / step), with `levels` = ⌊(2^32 − 1) / clients_max⌋
//! and step = 2·clip / levels, so q ∈ [0, levels] and clients_max of them
//! sum to at most 2^32 − 1. A sum s of `count` encodings decodes to
//! s·step − count·clip, which is within count·step/2 of the sum of the
//! clipped values (each encoding rounds by at most step/2), before the
//! result is itself rounded to f32. NaN is encoded as 0.

/// The largest encoding, so that `clients_max` of them sum to at most
/// 2^32 − 1.
fn levels(clients_max: u32) -> u32 {
    assert!(clients_max >= 1, "clients_max must be at least 1");
    u32::MAX / clients_max
}

/// The distance between neighbouring encodings: 2·clip / levels. The
/// decoded sum of `count` inputs is within count·step/2 of the sum of the
/// clipped values.
pub fn quantize_step(clip: f32, clients_max: u32) -> f64 {
    assert!(
        clip.is_finite() && clip > 0.0,
        "clip must be finite and positive, not {clip}"
    );
    2.0 * f64::from(clip) / f64::from(levels(clients_max))
}

/// Encodes `values`, clipped to [−clip, clip], for a sum over at most
/// `clients_max` clients.
///
/// # Panics
///
/// If `clip` is not finite and positive or `clients_max` is 0.
pub fn quantize(values: &[f32], clip: f32, clients_max: u32) -> Vec<u32> {
    quantize_step(clip, clients_max); // checks the arguments
    let (clip, top) = (f64::from(clip), f64::from(levels(clients_max)));
    values
        .iter()
        .map(|&v| {
            let v = if v.is_nan() {
                0.0
            } else {
                f64::from(v).clamp(-clip, clip)
            };
            // (v + clip)/step, with step's division last so that the ends
            // and the middle are exact.
            ((v + clip) * top / (2.0 * clip)).round().min(top) as u32
        })
        .collect()
}

/// Decodes the sum of `count` encodings made with the same `clip` and
/// `clients_max`.
///
/// # Panics
///
/// As [`quantize`], and if `count` exceeds `clients_max`.
pub fn dequantize(sum: &[u32], clip: f32, clients_max: u32, count: u32) -> Vec<f32> {
    assert!(
        count <= clients_max,
        "a sum of {count} inputs, more than clients_max = {clients_max}"
    );
    quantize_step(clip, clients_max); // checks the arguments
    let (clip, top) = (f64::from(clip), f64::from(levels(clients_max)));
    let offset = f64::from(count) * clip;
    sum.iter()
        .map(|&s| (f64::from(s) * (2.0 * clip) / top - offset) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use chacha20::ChaCha20Rng;
    use rand_core::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn encodings_span_zero_to_levels() {
        let levels = u32::MAX / 10;
        assert_eq!(levels, 429_496_729);
        assert_eq!(
            quantize(
                &[-1.0, -5.0, 1.0, 7.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN],
                1.0,
                10
            ),
            [0, 0, levels, levels, levels, 0, levels.div_ceil(2)]
        );
        // 0 sits halfway: levels/2 = 214748364.5 rounds away from zero.
        assert_eq!(quantize(&[0.0], 1.0, 10), [214_748_365]);
        assert_eq!(quantize_step(1.0, 1), 2.0 / f64::from(u32::MAX));
    }

    #[test]
    fn the_largest_sum_does_not_wrap() {
        for clients_max in [1, 2, 3, 10, 1000, 1024] {
            let top = quantize(&[1.0], 1.0, clients_max)[0];
            assert!(
                u64::from(top) * u64::from(clients_max) <= u64::from(u32::MAX),
                "{clients_max}"
            );
            let sum = (0..clients_max).fold(0u32, |acc, _| acc.checked_add(top).expect("no wrap"));
            assert_eq!(dequantize(&[sum], 1.0, clients_max, clients_max), [clients_max as f32]);
        }
    }

    #[test]
    fn the_decoded_sum_is_within_the_documented_error() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let (clip, clients_max, len) = (0.5f32, 10u32, 1000);
        let step = quantize_step(clip, clients_max);
        for count in [1, 3, 10] {
            let inputs: Vec<Vec<f32>> = (0..count)
                .map(|_| {
                    (0..len)
                        .map(|_| (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 1.2)
                        .collect()
                })
                .collect();
            let mut sum = vec![0u32; len];
            for input in &inputs {
                for (s, q) in sum.iter_mut().zip(quantize(input, clip, clients_max)) {
                    *s = s.wrapping_add(q);
                }
            }
            let decoded = dequantize(&sum, clip, clients_max, count);
            for (i, &got) in decoded.iter().enumerate() {
                let exact: f64 = inputs.iter().map(|x| f64::from(x[i]).clamp(-0.5, 0.5)).sum();
                // count·step/2 for the encodings, plus half an f32 ulp of the result.
                let bound = f64::from(count) * step / 2.0 + exact.abs() * f64::from(f32::EPSILON) / 2.0;
                assert!(
                    (f64::from(got) - exact).abs() <= bound * (1.0 + 1e-9),
                    "{i}: {got} vs {exact}"
                );
            }
        }
    }
}
