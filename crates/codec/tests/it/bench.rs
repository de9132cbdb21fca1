//! The benchmark on synthetic gradients: every codec reports sane numbers,
//! and the rows serialise. With `--nocapture` it prints the table.

use std::time::{Duration, Instant};

use codec::bench::{BenchRow, run};

use crate::{SPECS, spec};

fn print(rows: &[BenchRow]) {
    println!(
        "{:<14} {:>10} {:>12} {:>12} {:>8} {:>10}",
        "codec", "elems", "encode GB/s", "decode GB/s", "ratio", "rel_error"
    );
    for r in rows {
        println!(
            "{:<14} {:>10} {:>12.2} {:>12.2} {:>8.2} {:>10.2e}",
            r.codec, r.elems, r.encode_gbps, r.decode_gbps, r.ratio, r.rel_error
        );
    }
}

#[test]
fn bench_reports_every_codec_on_synthetic_gradients() {
    let mut rng = tensor::Rng::new(1);
    let x: Vec<f32> = (0..100_000).map(|_| (rng.normal() * 1e-3) as f32).collect();
    let specs: Vec<_> = SPECS.iter().map(|s| spec(s)).collect();
    let rows = run(&x, &specs, Duration::from_millis(5), Instant::now);
    print(&rows);
    assert_eq!(rows.len(), specs.len());
    for (row, s) in rows.iter().zip(SPECS) {
        assert_eq!(row.codec, spec(s).to_string());
        assert_eq!(row.elems, x.len());
        assert!(
            row.encode_gbps > 0.0 && row.decode_gbps > 0.0 && row.encode_gbps.is_finite(),
            "{row:?}"
        );
        assert!(row.ratio > 0.0, "{row:?}"); // below 1 for sparse codecs keeping more than half
        // The unbiased codecs may err by more than ‖x‖ (qsgd:1 does); the others never do.
        let bound = if spec(s).is_unbiased() { f64::INFINITY } else { 1.0 };
        assert!(row.rel_error >= 0.0 && row.rel_error <= bound, "{row:?}");
    }
    let by = |c: &str| rows.iter().find(|r| r.codec == c).expect(c);
    assert_eq!(by("none").rel_error, 0.0);
    assert!((by("fp16").ratio - 2.0).abs() < 0.01);
    assert!(by("sign").ratio > 25.0);
    assert!(by("topk:0.01").ratio > 45.0);
    assert!(by("int8").rel_error < 0.02); // about (3σ/127)/2 ÷ σ for normal data
    let json = serde_json::to_string(&rows).expect("serialise");
    let back: Vec<BenchRow> = serde_json::from_str(&json).expect("deserialise");
    assert_eq!(back.len(), rows.len());
    for (b, r) in back.iter().zip(&rows) {
        assert_eq!((&b.codec, b.elems), (&r.codec, r.elems));
        for (x, y) in [
            (b.encode_gbps, r.encode_gbps),
            (b.ratio, r.ratio),
            (b.rel_error, r.rel_error),
        ] {
            assert!((x - y).abs() <= 1e-12 * y.abs(), "{x} vs {y}");
        }
    }
}
