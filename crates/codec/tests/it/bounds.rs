//! decode ∘ encode within each codec's stated bound, on random gradients,
//! and the unbiased codecs unbiased over seeds.

use codec::{CodecId, CodecSpec, SparseValues, decode, decode_add, encode, encode_shaped, f16_to_f32, f32_to_f16};
use proptest::prelude::*;

use crate::{any_spec, gradient, shape_for, spec};

fn norm2(x: impl Iterator<Item = f32>) -> f64 {
    x.map(|v| f64::from(v).powi(2)).sum()
}

/// The kept indices of a sparse message, read independently of the crate's
/// decoder (parameters `nnz`, `values`, `index_bytes` [, `scale`], then
/// delta varints), and the f16 scale (1 for f32 values).
fn sparse_message(msg: &[u8]) -> (Vec<usize>, f32) {
    let param = |i: usize| u32::from_le_bytes(msg[8 + 4 * i..12 + 4 * i].try_into().expect("4 bytes"));
    let (nnz, f16, index_bytes) = (param(0) as usize, param(1) == 1, param(2) as usize);
    let (scale, start) = if f16 { (f32::from_bits(param(3)), 24) } else { (1.0, 20) };
    let bytes = &msg[start..start + index_bytes];
    let (mut kept, mut at, mut next) = (Vec::new(), 0, 0usize);
    for _ in 0..nnz {
        let (mut gap, mut shift) = (0usize, 0);
        loop {
            let b = bytes[at];
            at += 1;
            gap |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        kept.push(next + gap);
        next += gap + 1;
    }
    assert_eq!(at, index_bytes);
    let value_bytes = if f16 { 2 } else { 4 };
    assert_eq!(msg.len(), start + index_bytes + value_bytes * nnz);
    (kept, scale)
}

/// Checks `d = decode(encode(x))` against the bound `spec` states.
fn check_bound(spec: &CodecSpec, x: &[f32], d: &[f32], msg: &[u8]) {
    let n = x.len();
    let err = |i: usize| (x[i] - d[i]).abs();
    match *spec {
        CodecSpec::None => assert_eq!(x, d),
        CodecSpec::Fp16 => {
            for i in 0..n {
                let a = x[i].abs();
                if a >= 2f32.powi(-14) {
                    assert!(err(i) <= a * 2f32.powi(-11), "{} -> {}", x[i], d[i]);
                } else {
                    assert!(err(i) <= 2f32.powi(-25), "{} -> {}", x[i], d[i]);
                }
            }
        }
        CodecSpec::Bf16 => {
            for i in 0..n {
                // Below f32's normal range bf16 keeps the same absolute step as f32 subnormals' top bits.
                let bound = (x[i].abs() * 2f32.powi(-8)).max(2f32.powi(-134));
                assert!(err(i) <= bound, "{} -> {}", x[i], d[i]);
            }
        }
        CodecSpec::Int8 { bucket } => {
            for (b, xs) in x.chunks(bucket as usize).enumerate() {
                let scale = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                for (j, v) in xs.iter().enumerate() {
                    let i = b * bucket as usize + j;
                    // Up to f32 rounding of x / scale (below 127·2^-24 of a step).
                    assert!(err(i) <= scale * (1.0 + 1e-5), "{v} -> {}, scale {scale}", d[i]);
                }
            }
        }
        CodecSpec::Qsgd { levels, bucket } => {
            for (b, xs) in x.chunks(bucket as usize).enumerate() {
                let norm = norm2(xs.iter().copied()).sqrt() as f32;
                for (j, v) in xs.iter().enumerate() {
                    let i = b * bucket as usize + j;
                    let slack = 1.0 + levels as f32 * 2f32.powi(-22);
                    assert!(err(i) <= norm / levels as f32 * slack, "{v} -> {}, norm {norm}", d[i]);
                    assert!(d[i] == 0.0 || d[i].signum() == v.signum(), "{v} -> {}", d[i]);
                }
            }
        }
        CodecSpec::Sign { bucket } => {
            let b = bucket as usize;
            for (xs, ds) in x.chunks(b).zip(d.chunks(b)) {
                let e = norm2(xs.iter().zip(ds).map(|(a, b)| a - b));
                let l1: f64 = xs.iter().map(|v| f64::from(v.abs())).sum();
                let want = norm2(xs.iter().copied()) - l1 * l1 / xs.len() as f64;
                assert!(
                    (e - want).abs() <= 1e-4 * norm2(xs.iter().copied()) + 1e-30,
                    "{e} vs {want}"
                );
            }
        }
        CodecSpec::TopK { values, .. } | CodecSpec::RandK { values, .. } | CodecSpec::Threshold { values, .. } => {
            let (kept, scale) = sparse_message(msg);
            let nnz = kept.len();
            let mut is_kept = vec![false; n];
            for &i in &kept {
                is_kept[i] = true;
                match values {
                    SparseValues::F32 => assert_eq!(d[i].to_bits(), x[i].to_bits(), "kept values are sent exactly"),
                    SparseValues::F16 => {
                        let bound = x[i].abs() * 2f32.powi(-10) + scale * 2f32.powi(-24);
                        assert!(err(i) <= bound, "{} -> {}, scale {scale}", x[i], d[i]);
                    }
                }
            }
            for i in 0..n {
                if !is_kept[i] {
                    assert_eq!(d[i], 0.0);
                }
            }
            match *spec {
                CodecSpec::TopK { fraction, .. } | CodecSpec::RandK { fraction, .. } => {
                    let k = if n == 0 {
                        0
                    } else {
                        ((fraction * n as f64).round() as usize).clamp(1, n)
                    };
                    assert_eq!(nnz, k);
                }
                _ => {}
            }
            if let CodecSpec::TopK { .. } = spec {
                let smallest_kept = kept.iter().map(|&i| x[i].abs()).fold(f32::INFINITY, f32::min);
                let largest_dropped = (0..n).filter(|i| !is_kept[*i]).map(|i| x[i].abs()).fold(0f32, f32::max);
                assert!(smallest_kept >= largest_dropped, "{smallest_kept} < {largest_dropped}");
            }
            if let CodecSpec::Threshold { threshold, .. } = *spec {
                for i in 0..n {
                    assert_eq!(is_kept[i], x[i].abs() > threshold, "{}", x[i]);
                }
            }
        }
        CodecSpec::PowerSgd { .. } => {
            let e = norm2(x.iter().zip(d).map(|(a, b)| a - b));
            assert!(e <= norm2(x.iter().copied()) * (1.0 + 1e-4) + 1e-30, "{e}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip_is_within_the_stated_bound(
        spec in any_spec(),
        x in gradient(3000),
        seed in any::<u64>(),
        pick in any::<usize>(),
    ) {
        let shape = shape_for(x.len(), pick);
        let mut msg = Vec::new();
        encode_shaped(&spec, &x, &shape, seed, &mut msg).expect("encode");
        let mut d = vec![f32::NAN; x.len()];
        decode(&msg, &mut d).expect("decode");
        check_bound(&spec, &x, &d, &msg);

        // Deterministic: the same seed gives the same bytes, into a used buffer too.
        let mut again = vec![0xAB; 7];
        encode_shaped(&spec, &x, &shape, seed, &mut again).expect("encode");
        prop_assert_eq!(&again, &msg);

        // decode_add adds what decode writes.
        let base: Vec<f32> = (0..x.len()).map(|i| i as f32 * 0.25).collect();
        let mut sum = base.clone();
        decode_add(&msg, &mut sum).expect("decode_add");
        for i in 0..x.len() {
            prop_assert_eq!(sum[i].to_bits(), (base[i] + d[i]).to_bits());
        }
    }
}

#[test]
fn fp16_is_exact_on_every_f16_value() {
    let x: Vec<f32> = (0..=u16::MAX).map(f16_to_f32).filter(|v| !v.is_nan()).collect();
    let mut msg = Vec::new();
    encode(&spec("fp16"), &x, 0, &mut msg).expect("encode");
    let mut d = vec![0f32; x.len()];
    decode(&msg, &mut d).expect("decode");
    assert!(x.iter().zip(&d).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert_eq!(f32_to_f16(70000.0), 0x7c00, "overflow is infinity");
}

/// The mean of `decode(encode(x, seed))` over many seeds approaches x.
fn assert_unbiased(spec: &CodecSpec, x: &[f32], step: impl Fn(usize) -> f32) {
    let seeds = 4000;
    let mut mean = vec![0f64; x.len()];
    let (mut msg, mut d) = (Vec::new(), vec![0f32; x.len()]);
    for seed in 0..seeds {
        encode(spec, x, seed, &mut msg).expect("encode");
        decode(&msg, &mut d).expect("decode");
        for (m, v) in mean.iter_mut().zip(&d) {
            *m += f64::from(*v) / seeds as f64;
        }
    }
    for (i, (m, v)) in mean.iter().zip(x).enumerate() {
        // One draw is off by at most one step, so its standard deviation is at most step/2.
        let sigma = f64::from(step(i)) / 2.0 / (seeds as f64).sqrt();
        assert!(
            (m - f64::from(*v)).abs() <= 5.0 * sigma + 1e-9,
            "{spec} x[{i}] = {v}: mean {m}"
        );
    }
}

#[test]
fn int8_and_qsgd_are_unbiased_over_seeds() {
    let x: Vec<f32> = (0..300).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_unbiased(&spec("int8:64"), &x, |i| {
        let b = &x[i / 64 * 64..((i / 64 + 1) * 64).min(x.len())];
        b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0
    });
    let norm = norm2(x.iter().copied()).sqrt() as f32;
    assert_unbiased(&spec("qsgd:4:512"), &x, |_| norm / 4.0);
    assert!(max > 0.0);
}

#[test]
fn different_seeds_round_differently() {
    let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.01).sin()).collect();
    for s in ["int8", "qsgd:7", "randk:0.1"] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode(&spec(s), &x, 1, &mut a).expect("encode");
        encode(&spec(s), &x, 2, &mut b).expect("encode");
        assert_ne!(a, b, "{s}");
    }
}

#[test]
fn topk_on_25_mib_keeps_exactly_the_largest() {
    let mut rng = tensor::Rng::new(3);
    let x: Vec<f32> = (0..6_553_600).map(|_| rng.normal() as f32).collect();
    let mut msg = Vec::new();
    encode(&spec("topk:0.01"), &x, 0, &mut msg).expect("encode");
    let mut d = vec![0f32; x.len()];
    decode(&msg, &mut d).expect("decode");
    check_bound(&spec("topk:0.01"), &x, &d, &msg);
    assert_eq!(msg[0], CodecId::TopK as u8);
    // Gaps of about 100 take one or two varint bytes: well under the 8 bytes of a u32 index and an f32.
    let k = 65_536;
    assert!(msg.len() < 5 * k + 5 * k / 10, "{} bytes for {k} elements", msg.len());
    assert!(msg.len() <= codec::sparse_len_max(&spec("topk:0.01"), x.len()).expect("sparse"));
    encode(&spec("topk:0.01:f16"), &x, 0, &mut msg).expect("encode");
    assert!(msg.len() < 3 * k + 5 * k / 10, "{} bytes for {k} elements", msg.len());
    decode(&msg, &mut d).expect("decode");
    check_bound(&spec("topk:0.01:f16"), &x, &d, &msg);
}
