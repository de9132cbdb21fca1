//! Step throughput of each optimizer over a 270k-parameter dense buffer (the
//! size of the default Fashion-MNIST MLP), against memcpy of the same bytes
//! measured in the same run. Run with `cargo bench -p optim`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use optim::{AdagradConfig, AdamConfig, FtrlConfig, OptimConfig, Optimizer, SgdConfig};
use tensor::{Gradient, Layout, ParamKind, Rng};

const PARAMS: usize = 270_000;
const WARMUP_ITERS: usize = 50;
const ITERS: usize = 1_000;

/// Median and minimum time of `f` over `ITERS` calls.
fn time(mut f: impl FnMut()) -> (Duration, Duration) {
    for _ in 0..WARMUP_ITERS {
        f();
    }
    let mut t: Vec<Duration> = (0..ITERS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    t.sort();
    (t[ITERS / 2], t[0])
}

fn main() {
    let mut layout = Layout::new();
    layout.push("w", &[PARAMS], ParamKind::Dense);
    let mut rng = Rng::new(1);
    let mut grad = Gradient::for_layout(&layout);
    grad.dense.iter_mut().for_each(|g| *g = rng.normal() as f32 * 1e-3);
    let mut params: Vec<f32> = (0..PARAMS).map(|_| rng.normal() as f32).collect();

    // memcpy of the bytes SGD with momentum moves: 3 arrays read, 2 written.
    let src = vec![1.0f32; 2 * PARAMS];
    let mut dst = vec![0.0f32; 2 * PARAMS];
    let (memcpy, _) = time(|| {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    });
    let memcpy_bytes = 2 * 2 * PARAMS * 4;
    println!(
        "machine: {} cores; {PARAMS} params; median of {ITERS} steps",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "memcpy {:>4} KB: {:>7.1} us  ({:.1} GB/s)",
        memcpy_bytes / 1000,
        us(memcpy),
        gbps(memcpy_bytes, memcpy)
    );

    let cases = [
        (
            "sgd",
            OptimConfig::Sgd(SgdConfig {
                lr: 0.01,
                ..SgdConfig::default()
            }),
            12,
        ),
        (
            "sgd momentum",
            OptimConfig::Sgd(SgdConfig {
                lr: 0.01,
                momentum: 0.9,
                ..SgdConfig::default()
            }),
            20,
        ),
        (
            "sgd nesterov+wd",
            OptimConfig::Sgd(SgdConfig {
                lr: 0.01,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 1e-4,
                ..SgdConfig::default()
            }),
            20,
        ),
        ("adam", OptimConfig::Adam(AdamConfig::default()), 28),
        (
            "adamw",
            OptimConfig::AdamW(AdamConfig {
                weight_decay: 0.01,
                ..AdamConfig::default()
            }),
            28,
        ),
        ("adagrad", OptimConfig::Adagrad(AdagradConfig::default()), 20),
        (
            "ftrl",
            OptimConfig::Ftrl(FtrlConfig {
                l1: 1e-3,
                ..FtrlConfig::default()
            }),
            28,
        ),
    ];
    for (name, cfg, bytes_per_param) in cases {
        let Ok(mut opt) = Optimizer::new(&cfg, &layout) else {
            eprintln!("{name}: invalid config");
            std::process::exit(1);
        };
        let (median, min) = time(|| {
            if let Err(e) = opt.step(&mut params, &grad) {
                eprintln!("{name}: {e}");
                std::process::exit(1);
            }
        });
        let bytes = bytes_per_param * PARAMS;
        println!(
            "{name:<16} {:>7.1} us (min {:>6.1})  {:>5.1} GB/s  {:.2}x memcpy time per byte",
            us(median),
            us(min),
            gbps(bytes, median),
            (median.as_secs_f64() / bytes as f64) / (memcpy.as_secs_f64() / memcpy_bytes as f64),
        );
    }
    black_box(&params);
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}
