//! Throughput, compression ratio and error of each codec on given values:
//! what `sinter bench codec` reports.
//!
//! The clock is the caller's (`node` and the binary are the crates that read
//! clocks): pass `std::time::Instant::now`.
//! Throughput counts f32 input bytes (`4·n`) per second, both ways, so that
//! codecs compare with each other and with memcpy; the `none` codec is a
//! little-endian copy each way, the memcpy reference of the same run.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::spec::CodecSpec;

/// At least this many timed runs per codec and direction, however slow.
const RUNS_MIN: usize = 3;
/// At most this many, however fast.
const RUNS_MAX: usize = 10_000;

/// One codec's results. GB/s are 10^9 bytes of f32 input per second, from
/// the fastest run (the least disturbed by other work on the machine).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    pub codec: String,
    pub elems: usize,
    pub encode_gbps: f64,
    pub decode_gbps: f64,
    /// f32 bytes / encoded bytes.
    pub ratio: f64,
    /// ‖x − decode(encode(x))‖₂ / ‖x‖₂ (0 when x = 0 and decodes to 0).
    pub rel_error: f64,
}

/// Encodes and decodes `values` with each spec for at least `min_time` per
/// direction. PowerSGD treats the values as the most nearly square matrix
/// [`matrix_shape`] finds (a prime length is a vector, sent as f32).
///
/// # Panics
/// If a spec is invalid (parse specs with `FromStr`, which validates).
pub fn run(values: &[f32], specs: &[CodecSpec], min_time: Duration, mut now: impl FnMut() -> Instant) -> Vec<BenchRow> {
    let n = values.len();
    let shape = matrix_shape(n);
    let bytes = 4.0 * n as f64;
    let mut msg = Vec::new();
    let mut decoded = vec![0f32; n];
    let mut rows = Vec::with_capacity(specs.len());
    for spec in specs {
        let mut seed = 0u64;
        let encode_s = fastest(min_time, &mut now, || {
            crate::encode_shaped(spec, values, &shape, seed, &mut msg).expect("the caller passes valid specs");
            seed += 1;
        });
        crate::encode_shaped(spec, values, &shape, 0, &mut msg).expect("valid spec");
        let decode_s = fastest(min_time, &mut now, || {
            crate::decode(&msg, &mut decoded).expect("a message this crate just encoded decodes");
        });
        let (mut err, mut norm) = (0f64, 0f64);
        for (x, d) in values.iter().zip(&decoded) {
            err += (f64::from(*x) - f64::from(*d)).powi(2);
            norm += f64::from(*x).powi(2);
        }
        let rel_error = if err == 0.0 { 0.0 } else { (err / norm).sqrt() };
        rows.push(BenchRow {
            codec: spec.to_string(),
            elems: n,
            encode_gbps: bytes / encode_s / 1e9,
            decode_gbps: bytes / decode_s / 1e9,
            ratio: bytes / msg.len() as f64,
            rel_error,
        });
    }
    rows
}

/// The fastest of the runs of `f`, in seconds, running it until `min_time`
/// has passed and at least [`RUNS_MIN`] times.
fn fastest(min_time: Duration, now: &mut impl FnMut() -> Instant, mut f: impl FnMut()) -> f64 {
    let start = now();
    let mut best = f64::INFINITY;
    for run in 0..RUNS_MAX {
        let t0 = now();
        f();
        let t1 = now();
        best = best.min(t1.duration_since(t0).as_secs_f64());
        if run + 1 >= RUNS_MIN && t1.duration_since(start) >= min_time {
            break;
        }
    }
    // A clock too coarse to see one run must not give an infinite rate.
    best.max(1e-9)
}

/// `[rows, cols]` with `rows · cols = n` and `rows ≤ cols` as close as
/// possible: the matrix PowerSGD sees in the benchmark.
pub fn matrix_shape(n: usize) -> [usize; 2] {
    let mut rows = (n as f64).sqrt() as usize;
    while rows > 1 && !n.is_multiple_of(rows) {
        rows -= 1;
    }
    let rows = rows.max(1);
    [rows, n / rows]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_shape_is_nearly_square() {
        assert_eq!(matrix_shape(6_553_600), [2560, 2560]);
        assert_eq!(matrix_shape(12), [3, 4]);
        assert_eq!(matrix_shape(13), [1, 13]);
        assert_eq!(matrix_shape(0), [1, 0]);
        assert_eq!(matrix_shape(1), [1, 1]);
    }
}
