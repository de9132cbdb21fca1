//! The codec crate from the outside: round trips within each codec's stated
//! bound, decoding that never panics, error feedback that loses nothing,
//! and the benchmark on synthetic gradients.

mod bench;
mod bounds;
mod feedback;
mod malformed;

use codec::CodecSpec;
use proptest::prelude::*;

/// Every codec, with defaults and with odd parameters.
pub const SPECS: &[&str] = &[
    "none",
    "fp16",
    "bf16",
    "int8",
    "int8:7",
    "qsgd:1",
    "qsgd:7:33",
    "qsgd:15",
    "qsgd:300:100",
    "sign",
    "sign:8",
    "topk:0.01",
    "topk:0.3",
    "topk:0.02:f16",
    "randk:0.05",
    "randk:0.9",
    "randk:0.1:f16",
    "threshold:0",
    "threshold:0.7",
    "threshold:0.05:f16",
    "powersgd:1",
    "powersgd:4",
];

pub fn spec(s: &str) -> CodecSpec {
    s.parse().expect(s)
}

pub fn any_spec() -> impl Strategy<Value = CodecSpec> {
    proptest::sample::select(SPECS).prop_map(spec)
}

/// Gradient-like values: magnitudes over many decades, signs, some exact zeros.
pub fn gradient(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![
            1 => Just(0.0f32),
            8 => (-1.0f32..1.0, -6i32..4).prop_map(|(m, e)| m * 10f32.powi(e)),
        ],
        0..max_len,
    )
}

/// A shape for `n` elements: a vector or a matrix when `n` factors.
pub fn shape_for(n: usize, pick: usize) -> Vec<usize> {
    let divisors: Vec<usize> = (2..n).filter(|d| n.is_multiple_of(*d)).collect();
    if divisors.is_empty() || pick.is_multiple_of(3) {
        vec![n]
    } else {
        let rows = divisors[pick % divisors.len()];
        vec![rows, n / rows]
    }
}
