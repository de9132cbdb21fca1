//! Fuzz target: arbitrary bytes as a parameter-server message (with and
//! without a layout to check keys against) and as a compressed gradient
//! (`codec::decode` and `decode_add` into buffers of several sizes).
//! Nothing may panic; an accepted push must carry one row per key.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tensor::{Layout, ParamKind};

fuzz_target!(|data: &[u8]| {
    let mut layout = Layout::new();
    layout.push("w", &[16, 4], ParamKind::Dense);
    layout.push("emb", &[1000, 8], ParamKind::Table);
    layout.push("bias", &[1000, 1], ParamKind::Table);
    if let Ok(ps::Message::Push(p)) = ps::msg::decode(data, Some(&layout)) {
        let want: usize = p
            .keys
            .iter()
            .map(|&k| layout.tensors()[ps::split_key(k).0].row_len())
            .sum();
        assert_eq!(p.values.len(), want);
    }
    let _ = ps::msg::decode(data, None);
    for n in [0usize, 1, 7, 64, 1000] {
        let mut out = vec![0.0f32; n];
        let before = out.clone();
        if codec::decode(data, &mut out).is_err() {
            assert!(out.iter().zip(&before).all(|(a, b)| a.to_bits() == b.to_bits()), "a failed decode wrote");
        }
        let _ = codec::decode_add(data, &mut out);
    }
});
