//! crc32c throughput of every path this CPU has, against the `crc32c` crate and memcpy in the
//! same run: `cargo run --release -p wire --example crc_speed [ROUNDS]`.

use std::hint::black_box;
use std::time::Instant;

use wire::CrcPath;

/// Bytes hashed per timed repetition, so small buffers are timed over many calls.
const BYTES_PER_REP: usize = 256 << 20;

/// The best of `rounds` runs, in seconds per call of `f`.
fn best_seconds(rounds: usize, calls: usize, mut f: impl FnMut()) -> f64 {
    (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..calls {
                f();
            }
            start.elapsed().as_secs_f64() / calls as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(7);
    println!("detected path: {:?}", CrcPath::detected());
    for (label, len) in [("64 KiB", 64usize << 10), ("25 MiB", 25 << 20)] {
        let data: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(131) + 7) as u8).collect();
        let mut copy = vec![0u8; len];
        let calls = (BYTES_PER_REP / len).max(4);
        let gb = len as f64 / 1e9;
        let memcpy_s = best_seconds(rounds, calls, || {
            copy.copy_from_slice(black_box(&data));
            black_box(&mut copy);
        });
        println!("{label}: memcpy {:6.2} GB/s", gb / memcpy_s);
        let mut crate_s = f64::NAN;
        for path in CrcPath::ALL {
            if !path.available() {
                println!("{label}: {path:?} not available");
                continue;
            }
            let s = best_seconds(rounds, calls, || {
                black_box(path.append(0, black_box(&data)));
            });
            if path == CrcPath::Crate {
                crate_s = s;
            }
            println!(
                "{label}: {:<8} {:6.2} GB/s  {:.2}x crate  {:.2}x memcpy",
                format!("{path:?}"),
                gb / s,
                crate_s / s,
                memcpy_s / s
            );
        }
    }
}
