//! Throughput of the hot path on one thread: the GEMM on the MLP's shapes
//! (against the GEMM's own rate on a large square product, measured in the
//! same run), the MLP's forward_backward, and the sparse models'.
//!
//! Run: `cargo run --release -p model --example bench`

use std::hint::black_box;
use std::time::Instant;

use data::{Batch, BatchFeatures};
use model::{FactorizationMachine, Mlp, Model, SparseLogReg};
use tensor::gemm::{CpuGemm, Gemm, Operand};
use tensor::{Gradient, Rng};

/// Wall time per call of `f`: the best of `rounds` rounds of at least `round_s` seconds.
fn time_per_call(mut f: impl FnMut(), rounds: usize, round_s: f64) -> f64 {
    f();
    let mut calls = 1usize;
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-7);
    calls = calls.max((round_s / once) as usize);
    let mut best = f64::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..calls {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / calls as f64);
    }
    best
}

fn gemm_gflops(g: &dyn Gemm, m: usize, n: usize, k: usize, at: bool, bt: bool) -> f64 {
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0.0f32; m * n];
    let secs = time_per_call(
        || {
            g.sgemm(
                m,
                n,
                k,
                1.0,
                Operand { data: &a, trans: at },
                Operand { data: &b, trans: bt },
                0.0,
                &mut c,
            );
            black_box(&mut c);
        },
        5,
        0.1,
    );
    2.0 * (m * n * k) as f64 / secs / 1e9
}

fn main() {
    // Optional argument: which part to run (gemm, mlp, sparse); all by default.
    let only = std::env::args().nth(1);
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    if run("gemm") || run("mlp") {
        gemm_and_mlp(run("gemm"), run("mlp"));
    }
    if run("sparse") {
        sparse();
    }
}

fn gemm_and_mlp(gemm: bool, mlp: bool) {
    let g = CpuGemm::new(1);
    let peak = gemm_gflops(&g, 512, 512, 512, false, false);
    println!("GEMM, 1 thread; reference: 512×512×512 at {peak:.0} GFLOP/s");
    for batch in [64usize, 128].into_iter().filter(|_| gemm) {
        // The products of one MLP step, activations feature-major (see model's dense.rs).
        let shapes = [
            ("fwd   W1·Xᵀ", 256, batch, 784, false, true),
            ("fwd   W2·H1ᵀ", 256, batch, 256, false, false),
            ("fwd   W3·H2ᵀ", 10, batch, 256, false, false),
            ("dW3 = dZ3ᵀ·H2", 10, 256, batch, false, true),
            ("dH2 = W3ᵀ·dZ3ᵀ", 256, batch, 10, true, false),
            ("dW2 = dZ2ᵀ·H1", 256, 256, batch, false, true),
            ("dH1 = W2ᵀ·dZ2ᵀ", 256, batch, 256, true, false),
            ("dW1 = dZ1ᵀ·X", 256, 784, batch, false, false),
        ];
        for (name, m, n, k, at, bt) in shapes {
            let r = gemm_gflops(&g, m, n, k, at, bt);
            println!(
                "  batch {batch:4} {name:16} {m:4}×{n:4}×{k:4}  {r:6.1} GFLOP/s  ({:3.0}% of reference)",
                100.0 * r / peak
            );
        }
    }

    if !mlp {
        return;
    }
    let sizes = [784usize, 256, 256, 10];
    // Forward 2·Σ in·out, backward the same for the weights plus the input
    // gradients of every layer but the first.
    let layer_flop: Vec<f64> = sizes.windows(2).map(|w| 2.0 * (w[0] * w[1]) as f64).collect();
    let flop_per_sample = 2.0 * layer_flop.iter().sum::<f64>() + layer_flop[1..].iter().sum::<f64>();
    println!(
        "MLP 784-256-256-10 forward_backward, 1 thread ({:.2} MFLOP/sample)",
        flop_per_sample / 1e6
    );
    for batch in [64usize, 128] {
        let mut m = Mlp::new(sizes.to_vec());
        let mut params = vec![0.0; m.layout().len()];
        let mut rng = Rng::new(1);
        m.init(&mut params, &mut rng);
        let values = (0..batch * 784).map(|_| rng.normal() as f32).collect();
        let labels = (0..batch).map(|_| rng.below(10) as u32).collect();
        let b = Batch {
            features: BatchFeatures::Dense { dim: 784, values },
            labels,
        };
        let mut grad = Gradient::for_layout(m.layout());
        let secs = time_per_call(
            || {
                black_box(m.forward_backward(&params, &b, &mut grad, &mut |_, _| {}));
            },
            7,
            0.3,
        );
        let sps = batch as f64 / secs;
        println!(
            "  batch {batch:4}: {sps:8.0} samples/s  {:6.1} GFLOP/s  ({:3.0}% of the reference GEMM)",
            sps * flop_per_sample / 1e9,
            100.0 * sps * flop_per_sample / 1e9 / peak
        );
    }
}

fn sparse() {
    println!("sparse models, 40 nnz/row, indices uniform in 2^24 folded into 2^20 rows, 1 thread,");
    println!("cycling through 32 distinct batches (one repeated batch would stay in cache)");
    for batch in [128usize, 256, 512, 1024] {
        let mut rng = Rng::new(batch as u64);
        let nnz = 40;
        let batches: Vec<Batch> = (0..32)
            .map(|_| {
                let indptr = (0..=batch).map(|r| (r * nnz) as u32).collect();
                let indices = (0..batch * nnz).map(|_| rng.below(1 << 24) as u32).collect();
                let values = vec![1.0f32; batch * nnz];
                let labels = (0..batch).map(|_| rng.below(2) as u32).collect();
                Batch {
                    features: BatchFeatures::Sparse {
                        dim: 1 << 24,
                        indptr,
                        indices,
                        values,
                    },
                    labels,
                }
            })
            .collect();
        let models: [(&str, Box<dyn Model>); 2] = [
            ("logreg", Box::new(SparseLogReg::new(20))),
            ("fm k=8", Box::new(FactorizationMachine::new(20, 8))),
        ];
        for (name, mut m) in models {
            let mut params = vec![0.0f32; m.layout().len()];
            m.init(&mut params, &mut rng);
            params.iter_mut().step_by(7).for_each(|p| *p += 0.01);
            let mut grad = Gradient::for_layout(m.layout());
            let mut next = 0;
            let secs = time_per_call(
                || {
                    next = (next + 1) % batches.len();
                    black_box(m.forward_backward(&params, &batches[next], &mut grad, &mut |_, _| {}));
                },
                7,
                0.2,
            );
            let mut out = Vec::new();
            let psecs = time_per_call(
                || {
                    next = (next + 1) % batches.len();
                    m.predict(&params, &batches[next], &mut out);
                    black_box(&out);
                },
                7,
                0.2,
            );
            println!(
                "  {name:7} batch {batch:5}: {:6.2} M rows/s  (predict, the forward pass alone: {:6.2} M rows/s)",
                batch as f64 / secs / 1e6,
                batch as f64 / psecs / 1e6
            );
        }
    }
}
