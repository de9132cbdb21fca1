//! Measures the wire format's per-byte and per-frame costs against memcpy in
//! the same run: `cargo bench -p wire`.

use std::hint::black_box;
use std::time::Instant;

use wire::{FrameDecoder, FrameHeader, HEADER_BYTES, encode_control, payload_crc};

const PAYLOAD_BYTES: usize = 4 << 20;
const ROUNDS: usize = 5;

/// The best of `ROUNDS` runs of `iterations` calls, in seconds per call.
fn best_seconds(iterations: usize, mut f: impl FnMut()) -> f64 {
    (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iterations {
                f();
            }
            start.elapsed().as_secs_f64() / iterations as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let payload: Vec<u8> = (0..PAYLOAD_BYTES).map(|i| (i * 131 + 7) as u8).collect();
    let mut copy = vec![0u8; PAYLOAD_BYTES];

    let memcpy_s = best_seconds(100, || {
        copy.copy_from_slice(black_box(&payload));
        black_box(&mut copy);
    });
    let crc_s = best_seconds(100, || {
        black_box(payload_crc(black_box(&payload)));
    });
    let gb = PAYLOAD_BYTES as f64 / 1e9;
    println!("memcpy 4 MiB:          {:6.2} GB/s", gb / memcpy_s);
    println!(
        "crc32c 4 MiB:          {:6.2} GB/s ({:.2}x memcpy)",
        gb / crc_s,
        memcpy_s / crc_s
    );

    let header = FrameHeader::tensor(42, 3, &payload).unwrap_or_else(|error| panic!("{error}"));
    let encoded = header.encode();
    let encode_s = best_seconds(1_000_000, || {
        black_box(black_box(&header).encode());
    });
    let decode_s = best_seconds(1_000_000, || {
        black_box(FrameHeader::decode(black_box(&encoded)).ok());
    });
    println!("header encode:         {:6.1} ns", encode_s * 1e9);
    println!("header decode:         {:6.1} ns", decode_s * 1e9);

    let message: Vec<u32> = (0..64).collect();
    let frame = encode_control(1, &message).unwrap_or_else(|error| panic!("{error}"));
    let stream: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * 1000).collect();
    let decode_stream_s = best_seconds(100, || {
        let mut decoder = FrameDecoder::new();
        let mut input = &stream[..];
        while let Ok(Some(frame)) = decoder.decode(&mut input) {
            black_box(frame);
        }
    });
    println!(
        "FrameDecoder, {}-byte control frames: {:6.1} ns/frame ({} header bytes)",
        frame.len(),
        decode_stream_s * 1e9 / 1000.0,
        HEADER_BYTES
    );
}
