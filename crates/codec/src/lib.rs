//! Gradient compression: pure, deterministic codecs that turn a slice of f32
//! into a self-describing message and back, error feedback for the biased
//! ones, PowerSGD's two-round state machine, and a benchmark of them all.
//!
//! | codec | bytes per element (n large) | bound | unbiased |
//! |---|---|---|---|
//! | `none` | 4 | exact | yes |
//! | `fp16`, `bf16` | 2 | relative 2^-11, 2^-8 | ~ |
//! | `int8[:B]` | 1 + 4/B | `\|err\| ≤ max\|x\|/127` of the bucket | yes |
//! | `qsgd:S[:B]` | ½, 1 or 2 (S ≤ 7, ≤ 127, more) + 4/B | `\|err\| ≤ ‖x‖₂/S` of the bucket | yes |
//! | `sign[:B]` | 1/8 + 4/B | `‖err‖² = ‖x‖² − ‖x‖₁²/B` per bucket | no |
//! | `topk:F`, `randk:F` | (4 + g)·F, g ≈ 1.3 index bytes at F = 1% | `‖err‖² ≤ (1 − F)‖x‖²` (randk: expected) | no |
//! | `topk:F:f16`, `randk:F:f16` | (2 + g)·F | the same, plus `2^-10·\|x\|` per kept element | no |
//! | `threshold:T[:f16]` | 4 + g (2 + g) per `\|x\| > T` | `\|err\| ≤ T` | no |
//! | `powersgd:R` | 4·R·(rows + cols) / n | `‖err‖_F ≤ ‖x‖_F` | no |
//!
//! [`CodecSpec`] has the details of each; the modules say how each works.
//! A message is a header (codec id, format version, element count, the
//! codec's parameters) and a payload, all little-endian: see [`encode`].
//!
//! **Invariant:** pure and deterministic: the same spec, values and seed
//! give the same bytes, on any CPU and whichever compilation of a kernel
//! runs (baseline or AVX2, chosen at run time: the workspace builds for
//! baseline x86-64). No IO, threads or clocks here (the benchmark is
//! handed a clock).
//! **Invariant:** decoding never panics, whatever the bytes: a malformed
//! message is a [`CodecError`] naming what is wrong, and the output buffer
//! is unchanged. Decoding allocates no more than the output buffer or the
//! message holds, and takes time linear in both (PowerSGD: times its rank,
//! at most [`RANK_MAX`]).
//! Decoding checks structure (lengths, counts, indices), not values: a
//! well-formed message of odd floats decodes to odd floats; integrity is
//! the frame checksum's job (`wire`).
//!
//! Non-finite inputs never panic; a NaN or infinity makes its bucket decode
//! to NaN (int8, qsgd, sign), is sent as the largest magnitude (top-k,
//! threshold), or passes through (fp16/bf16, where |x| ≥ 65520 also becomes
//! ±inf in fp16).
//!
//! Seeds: stochastic rounding (int8, qsgd), random-k and the one-shot
//! PowerSGD draw from `tensor::Rng` streams seeded by the caller. Use a
//! different seed per step, rank and tensor (e.g. `Rng::derive`): int8 and
//! qsgd are unbiased over the seed, and the noise of different workers
//! cancels only if it is independent.
//!
//! Aggregating in a ring: each hop decodes the received chunk into f32 with
//! [`decode_add`] (adding to the local chunk) and encodes the sum once to
//! send it on. Every re-encoding adds its own error, which error feedback
//! (kept for the local gradient only) does not see: after the W − 1 hops of
//! a reduce-scatter a quantised partial sum has been rounded W − 1 times
//! (for the unbiased codecs the variance grows linearly with the hops), and
//! a sparse partial sum re-sparsified with top-k drops mass every hop while
//! the union of supports grows. Keep the all-gather phase lossless (send the
//! reduced chunk once in its final encoding), and prefer all-gather of sparse
//! messages over re-sparsifying sums. PowerSGD is linear: all-reduce its
//! factors (see [`PowerSgd`]), never its messages.
//!
//! Numbers: 25 MiB of gradients (6.5M f32) are 12.5 MiB in fp16, 6.3 MiB in
//! int8, 0.8 MiB in sign and about 0.35 MiB with top-1% (0.2 MiB with `:f16`). The targets, one core: fp16,
//! bf16, int8 and sign at ≥ 2 GB/s of f32 input each way, top-1% ≥ 0.5 GB/s;
//! [`bench::run`] measures them.

pub mod bench;
mod error;
mod feedback;
mod float;
mod header;
mod int8;
mod kernel;
mod powersgd;
mod qsgd;
mod sign;
mod sparse;
mod spec;

pub use error::CodecError;
pub use feedback::ErrorFeedback;
pub use float::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
pub use header::{CodecId, ELEMS_MAX, FORMAT_VERSION, HEADER_BYTES};
pub use powersgd::PowerSgd;
pub use spec::{BUCKET_MAX, CodecSpec, CompressConfig, DEFAULT_BUCKET, LEVELS_MAX, RANK_MAX, SparseValues};

use kernel::{Add, Set, Sink, Sub};

/// Encodes `values` as one message into `out`, replacing its contents
/// (its capacity is reused). `seed` drives stochastic rounding (int8,
/// qsgd) and random-k; the other codecs ignore it.
///
/// The values are treated as one vector: `powersgd` sends them as they are
/// (see [`encode_shaped`]).
pub fn encode(spec: &CodecSpec, values: &[f32], seed: u64, out: &mut Vec<u8>) -> Result<(), CodecError> {
    encode_shaped(spec, values, &[values.len()], seed, out)
}

/// [`encode`] for a tensor of `shape`. Only `powersgd` uses the shape: as a
/// `shape[0] × (product of the rest)` matrix, as the paper reshapes
/// convolution kernels; shapes of one dimension are sent as they are.
pub fn encode_shaped(
    spec: &CodecSpec,
    values: &[f32],
    shape: &[usize],
    seed: u64,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    check_encode(spec, values.len(), shape)?;
    match *spec {
        CodecSpec::None => float::encode_none(values, out),
        CodecSpec::Fp16 => float::encode_half(CodecId::Fp16, values, out),
        CodecSpec::Bf16 => float::encode_half(CodecId::Bf16, values, out),
        CodecSpec::Int8 { bucket } => int8::encode(values, bucket as usize, seed, out),
        CodecSpec::Qsgd { levels, bucket } => qsgd::encode(values, levels, bucket as usize, seed, out),
        CodecSpec::Sign { bucket } => sign::encode(values, bucket as usize, out),
        CodecSpec::TopK { fraction, values: v } => sparse::encode_topk(values, fraction, v, out),
        CodecSpec::RandK { fraction, values: v } => sparse::encode_randk(values, fraction, v, seed, out),
        CodecSpec::Threshold { threshold, values: v } => sparse::encode_threshold(values, threshold, v, out),
        CodecSpec::PowerSgd { rank } => {
            let (rows, cols) = matrix_shape(shape, values.len());
            if powersgd::compresses(rank as usize, rows, cols) {
                powersgd::encode(values, rank as usize, rows, cols, seed, out);
            } else {
                float::encode_none(values, out);
            }
        }
    }
    Ok(())
}

/// Decodes a message into `out`, which must have the message's element count.
pub fn decode(bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
    decode_into::<Set>(bytes, out)
}

/// Decodes a message and adds it to `out` (summing received chunks).
pub fn decode_add(bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
    decode_into::<Add>(bytes, out)
}

/// Decodes a message and subtracts it from `out` (error feedback).
pub(crate) fn decode_sub(bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
    decode_into::<Sub>(bytes, out)
}

fn decode_into<S: Sink>(bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
    let msg = header::Reader::new(bytes)?;
    match msg.id {
        CodecId::None | CodecId::Fp16 | CodecId::Bf16 => float::decode::<S>(msg, out),
        CodecId::Int8 => int8::decode::<S>(msg, out),
        CodecId::Qsgd => qsgd::decode::<S>(msg, out),
        CodecId::Sign => sign::decode::<S>(msg, out),
        CodecId::TopK | CodecId::RandK | CodecId::Threshold => sparse::decode::<S>(msg, out),
        CodecId::PowerSgd => powersgd::decode::<S>(msg, out),
    }
}

/// The exact message length for `n` elements, for codecs where it depends
/// on `n` alone; `None` for the sparse codecs (their varint indices take
/// what the gaps between kept elements need: see [`sparse_len_max`]) and
/// `powersgd` (shape-dependent).
pub fn compressed_len(spec: &CodecSpec, n: usize) -> Option<usize> {
    let h = HEADER_BYTES;
    Some(match *spec {
        CodecSpec::None => h + 4 * n,
        CodecSpec::Fp16 | CodecSpec::Bf16 => h + 2 * n,
        CodecSpec::Int8 { bucket } => h + 4 + 4 * n.div_ceil(bucket.max(1) as usize) + n,
        CodecSpec::Qsgd { levels, bucket } => h + 8 + qsgd::payload_bytes(n, levels, bucket.max(1) as usize),
        CodecSpec::Sign { bucket } => h + 4 + sign::payload_bytes(n, bucket.max(1) as usize),
        CodecSpec::TopK { .. } | CodecSpec::RandK { .. } | CodecSpec::Threshold { .. } | CodecSpec::PowerSgd { .. } => {
            return None;
        }
    })
}

/// The longest message `topk` or `randk` can make for `n` elements: its
/// `k` indices at the 5 bytes a varint may take. (A bound, for buffers;
/// [`compressed_len`] is exact where lengths are fixed.)
pub fn sparse_len_max(spec: &CodecSpec, n: usize) -> Option<usize> {
    match *spec {
        CodecSpec::TopK { fraction, values } | CodecSpec::RandK { fraction, values } => {
            let k = sparse::keep_count(fraction, n);
            Some(HEADER_BYTES + 16 + (5 + values.bytes()) * k)
        }
        _ => None,
    }
}

/// Everything [`encode_shaped`] can refuse, checked before anything is written.
pub(crate) fn check_encode(spec: &CodecSpec, len: usize, shape: &[usize]) -> Result<(), CodecError> {
    spec.validate()?;
    if len > ELEMS_MAX {
        return Err(CodecError::TooManyElements {
            elems: len,
            max: ELEMS_MAX,
        });
    }
    let elems = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
    if elems != Some(len) {
        return Err(CodecError::Shape {
            shape: shape.to_vec(),
            expected: elems.unwrap_or(usize::MAX),
            got: len,
        });
    }
    Ok(())
}

/// `shape` as rows × cols: `shape[0]` × the rest; 1 × n for one dimension.
fn matrix_shape(shape: &[usize], len: usize) -> (usize, usize) {
    match shape {
        [rows, rest @ ..] if !rest.is_empty() => (*rows, rest.iter().product()),
        _ => (1, len),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::kernel::tests::PORTABLE_ONLY;

    fn specs() -> Vec<CodecSpec> {
        [
            "none",
            "fp16",
            "bf16",
            "int8",
            "int8:100",
            "qsgd:5",
            "qsgd:100:64",
            "qsgd:1000",
            "sign",
            "sign:16",
            "topk:0.01",
            "topk:0.01:f16",
            "randk:0.1",
            "randk:0.1:f16",
            "threshold:0.5",
            "threshold:0.5:f16",
            "powersgd:2",
        ]
        .iter()
        .map(|s| s.parse().expect(s))
        .collect()
    }

    #[test]
    fn both_kernel_compilations_give_the_same_bytes() {
        if !kernel::has_avx2() {
            return; // nothing to compare on this CPU
        }
        let mut rng = tensor::Rng::new(4);
        let x: Vec<f32> = (0..100_003).map(|_| (rng.normal() * 3.0) as f32).collect();
        let shape = [331, 100_003 / 331];
        let x = &x[..shape[0] * shape[1]];
        for spec in specs() {
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            let (mut fast_out, mut slow_out) = (vec![1f32; x.len()], vec![1f32; x.len()]);
            encode_shaped(&spec, x, &shape, 7, &mut fast).expect("encode");
            decode_add(&fast, &mut fast_out).expect("decode");
            PORTABLE_ONLY.store(true, Ordering::Relaxed);
            encode_shaped(&spec, x, &shape, 7, &mut slow).expect("encode");
            decode_add(&slow, &mut slow_out).expect("decode");
            PORTABLE_ONLY.store(false, Ordering::Relaxed);
            assert!(fast == slow, "{spec}: messages differ");
            assert!(
                fast_out.iter().zip(&slow_out).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{spec}: decoded values differ"
            );
        }
    }

    #[test]
    fn compressed_len_is_the_message_length() {
        let x: Vec<f32> = (0..1037).map(|i| (i as f32 * 0.37).sin()).collect();
        for spec in specs() {
            let mut out = Vec::new();
            encode(&spec, &x, 1, &mut out).expect("encode");
            match compressed_len(&spec, x.len()) {
                Some(len) => assert_eq!(len, out.len(), "{spec}"),
                None => assert!(matches!(
                    spec,
                    CodecSpec::TopK { .. }
                        | CodecSpec::RandK { .. }
                        | CodecSpec::Threshold { .. }
                        | CodecSpec::PowerSgd { .. }
                )),
            }
            if let Some(max) = sparse_len_max(&spec, x.len()) {
                assert!(out.len() <= max, "{spec}: {} > {max}", out.len());
            }
        }
    }

    #[test]
    fn encode_refuses_bad_shapes_and_specs() {
        let mut out = Vec::new();
        let err = encode_shaped(&CodecSpec::Fp16, &[1.0; 6], &[4, 2], 0, &mut out).expect_err("shape");
        assert_eq!(
            err.to_string(),
            "encode: shape [4, 2] holds 8 elements, the values have 6"
        );
        let spec = CodecSpec::TopK {
            fraction: 3.0,
            values: SparseValues::F32,
        };
        let err = encode(&spec, &[1.0], 0, &mut out).expect_err("spec");
        assert_eq!(
            err.to_string(),
            "compression spec \"topk:3\": fraction must be in (0, 1], got 3"
        );
    }

    #[test]
    fn powersgd_falls_back_to_f32_for_vectors_and_tiny_matrices() {
        let spec = CodecSpec::PowerSgd { rank: 4 };
        let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
        for shape in [&[64][..], &[1, 64], &[64, 1], &[8, 8]] {
            let mut out = Vec::new();
            encode_shaped(&spec, &x, shape, 0, &mut out).expect("encode");
            assert_eq!(out[0], CodecId::None as u8, "{shape:?}");
            let mut back = vec![0f32; 64];
            decode(&out, &mut back).expect("decode");
            assert_eq!(back, x);
        }
        let mut out = Vec::new();
        encode_shaped(&spec, &[0.5; 400], &[20, 20], 0, &mut out).expect("encode");
        assert_eq!(out[0], CodecId::PowerSgd as u8);
        assert_eq!(out.len(), HEADER_BYTES + 12 + 4 * 4 * 40);
    }
}
