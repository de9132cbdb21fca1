//! Prints `codec::bench::run` on 25 MiB of synthetic gradients (6.5M f32,
//! normal with a few outliers), one core:
//! `cargo run --release -p codec --example codec_speed [-- SPEC...]`.

use std::time::{Duration, Instant};

use codec::CodecSpec;

const ELEMS: usize = 25 << 18; // 25 MiB of f32
const DEFAULT_SPECS: &[&str] = &[
    "none",
    "fp16",
    "bf16",
    "int8",
    "qsgd:15",
    "qsgd:7",
    "sign",
    "topk:0.01",
    "topk:0.01:f16",
    "topk:0.001",
    "randk:0.01",
    "threshold:0.003",
    "powersgd:4",
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let specs: Vec<CodecSpec> = if args.is_empty() {
        DEFAULT_SPECS
            .iter()
            .map(|s| s.parse().expect("default specs parse"))
            .collect()
    } else {
        args.iter()
            .map(|s| s.parse().unwrap_or_else(|e| panic!("{e}")))
            .collect()
    };
    let mut rng = tensor::Rng::new(7);
    let x: Vec<f32> = (0..ELEMS)
        .map(|i| {
            let v = rng.normal() as f32 * 1e-3;
            if i % 9973 == 0 { v * 100.0 } else { v }
        })
        .collect();
    let rows = codec::bench::run(&x, &specs, Duration::from_millis(500), Instant::now);
    println!(
        "{:<16} {:>9} {:>12} {:>12} {:>9} {:>10}",
        "codec", "elems", "encode GB/s", "decode GB/s", "ratio", "rel_error"
    );
    for r in rows {
        println!(
            "{:<16} {:>9} {:>12.2} {:>12.2} {:>9.1} {:>10.3e}",
            r.codec, r.elems, r.encode_gbps, r.decode_gbps, r.ratio, r.rel_error
        );
    }
}
