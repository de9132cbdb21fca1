//! Decoding never panics and never changes the output on an error, whatever
//! the bytes; each kind of damage gets the error that names it.

use codec::{CodecError, FORMAT_VERSION, decode, decode_add, encode, encode_shaped};
use proptest::prelude::*;

use crate::{any_spec, gradient, shape_for, spec};

/// Decodes `bytes` into buffers of several lengths, both ways; on an error
/// the buffer must be as it was.
fn decode_everything(bytes: &[u8], around: usize) {
    let around = around.min(1 << 16); // the test's allocation, not the decoder's
    for len in [0, 1, around.saturating_sub(1), around, around + 1, 4096] {
        let before: Vec<f32> = (0..len).map(|i| i as f32).collect();
        let mut out = before.clone();
        if decode(bytes, &mut out).is_err() {
            assert!(out.iter().zip(&before).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let mut out = before.clone();
        if decode_add(bytes, &mut out).is_err() {
            assert!(out.iter().zip(&before).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        decode_everything(&bytes, 16);
    }

    #[test]
    fn random_bytes_behind_a_valid_header_never_panic(
        id in 0u8..10,
        elems in prop_oneof![0u32..70, Just(u32::MAX), any::<u32>()],
        rest in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut bytes = vec![id, FORMAT_VERSION, 0, 0];
        bytes.extend_from_slice(&elems.to_le_bytes());
        bytes.extend_from_slice(&rest);
        decode_everything(&bytes, elems as usize);
    }

    #[test]
    fn damaged_messages_never_panic(
        spec in any_spec(),
        x in gradient(300),
        pick in any::<usize>(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
        extra in prop::collection::vec(any::<u8>(), 0..9),
    ) {
        let mut msg = Vec::new();
        encode_shaped(&spec, &x, &shape_for(x.len(), pick), 1, &mut msg).expect("encode");
        let mut damaged = msg.clone();
        for (at, v) in edits {
            let at = at % damaged.len();
            damaged[at] = v;
        }
        decode_everything(&damaged, x.len());
        decode_everything(&msg[..cut % (msg.len() + 1)], x.len());
        let mut longer = msg.clone();
        longer.extend_from_slice(&extra);
        decode_everything(&longer, x.len());
    }
}

fn err(bytes: &[u8], len: usize) -> String {
    let mut out = vec![0f32; len];
    let e: CodecError = decode(bytes, &mut out).expect_err("malformed");
    e.to_string()
}

fn message(s: &str, x: &[f32]) -> Vec<u8> {
    let mut msg = Vec::new();
    encode(&spec(s), x, 0, &mut msg).expect("encode");
    msg
}

#[test]
fn each_kind_of_damage_is_named() {
    let x: Vec<f32> = (0..100).map(|i| i as f32 - 50.0).collect();

    assert_eq!(err(&[1, 1, 0], 3), "message: 3 bytes, shorter than the 8-byte header");
    assert_eq!(err(&[42, 1, 0, 0, 0, 0, 0, 0], 0), "message: unknown codec id 42");
    assert_eq!(
        err(&[1, 9, 0, 0, 0, 0, 0, 0], 0),
        "message: format version 9, this build reads version 1"
    );
    assert_eq!(
        err(&[1, 1, 1, 0, 0, 0, 0, 0], 0),
        "message: reserved header bytes are 0x0001, expected 0"
    );

    let fp16 = message("fp16", &x);
    assert_eq!(
        err(&fp16, 99),
        "fp16 message holds 100 elements, the output buffer has 99"
    );
    assert_eq!(
        err(&fp16[..fp16.len() - 1], 100),
        "fp16 message: payload is 199 bytes, expected 200 for 100 elements"
    );

    let int8 = message("int8", &x);
    assert_eq!(
        err(&int8[..10], 100),
        "int8 message: truncated in the header parameter `bucket`"
    );
    let mut zero_bucket = int8.clone();
    zero_bucket[8..12].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        err(&zero_bucket, 100),
        "int8 message: parameter `bucket` = 0: must be in 1..=2^20"
    );

    // Indices 0, 1, 2, 98, 99 (the largest |x|) as gaps 0, 0, 0, 95, 0: one varint byte each.
    // Parameters nnz, values, index_bytes at 8..20; indices at 20..25; f32 values after.
    let topk = message("topk:0.05", &x);
    assert_eq!(&topk[20..25], &[0, 0, 0, 95, 0]);
    let mut out_of_range = topk.clone();
    out_of_range[20] = 100;
    assert_eq!(
        err(&out_of_range, 100),
        "topk message: index 100 at position 0 is out of range for 100 elements"
    );
    let mut past_the_end = topk.clone();
    past_the_end[23] = 96;
    assert_eq!(
        err(&past_the_end, 100),
        "topk message: index 100 at position 4 is out of range for 100 elements"
    );
    let mut cut_off = topk.clone();
    cut_off[24] = 0x80;
    assert_eq!(
        err(&cut_off, 100),
        "topk message: index at position 4: the varint is cut off or exceeds 32 bits"
    );
    let mut left_over = topk.clone();
    left_over[16..20].copy_from_slice(&6u32.to_le_bytes());
    left_over.insert(25, 0);
    assert_eq!(
        err(&left_over, 100),
        "topk message: index at position 5: bytes are left after the last index"
    );
    let mut too_many = topk.clone();
    too_many[8..12].copy_from_slice(&101u32.to_le_bytes());
    assert_eq!(
        err(&too_many, 100),
        "topk message: parameter `nnz` = 101: exceeds the element count"
    );
    let mut bad_values = topk.clone();
    bad_values[12..16].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(
        err(&bad_values, 100),
        "topk message: parameter `values` = 2: must be 0 (f32) or 1 (f16)"
    );
    let mut few_index_bytes = topk.clone();
    few_index_bytes[16..20].copy_from_slice(&4u32.to_le_bytes());
    assert_eq!(
        err(&few_index_bytes, 100),
        "topk message: parameter `index_bytes` = 4: must be between 1 and 5 bytes per index"
    );
    let f16 = message("topk:0.05:f16", &x);
    assert_eq!(
        f32::from_bits(u32::from_le_bytes(f16[20..24].try_into().expect("4"))),
        50.0
    );
    assert_eq!(f16.len(), 24 + 5 + 2 * 5);

    let psgd = {
        let mut msg = Vec::new();
        encode_shaped(&spec("powersgd:2"), &x, &[10, 10], 0, &mut msg).expect("encode");
        msg
    };
    let mut bad_rows = psgd.clone();
    bad_rows[12..16].copy_from_slice(&11u32.to_le_bytes());
    assert_eq!(
        err(&bad_rows, 100),
        "powersgd message: parameter `rows` = 11: rows × cols is not the element count"
    );
    let mut huge_rank = psgd.clone();
    huge_rank[8..12].copy_from_slice(&100_000u32.to_le_bytes());
    assert_eq!(
        err(&huge_rank, 100),
        "powersgd message: parameter `rank` = 100000: must be in 1..=256"
    );
}
