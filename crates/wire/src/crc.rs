//! crc32c (Castagnoli) for frame headers and payloads, with carry-less multiply folding on x86-64.
//!
//! Every tensor frame's payload is checksummed on both ends, so this is on the training step's
//! critical path (issue 3: ~9% of a 2-worker step with the `crc32c` crate).
//!
//! How it works, in the reflected bit order the CRC uses (bit 0 of byte 0 is the message's
//! highest power of x; a 16-byte block loaded little-endian into a 128-bit register holds
//! x^127 in bit 0 and x^0 in bit 127):
//!
//! - The running crc is XORed into the first 4 bytes, after which the crc of the message is
//!   `M(x)·x^32 mod P`, a function of `M mod P` only. So a block `A` that lies `d` bits before a
//!   later block `B` can be replaced by anything congruent to `A·x^d` and added into `B`.
//! - Split `A = A_hi·x^64 + A_lo`. A 64×64 carry-less multiply of `A_hi` by a 32-bit reflected
//!   constant `K` lands in a 128-bit register as `A_hi·K·x^33`, so `K = x^(d+64-33) mod P` for
//!   the high half and `x^(d-33) mod P` for the low half ([`fold_keys`]). Both products fit in
//!   128 bits; their XOR, added into `B`, is the fold.
//! - Four 128-bit accumulators (PCLMULQDQ) or four 512-bit ones (VPCLMULQDQ, 16 lanes) run
//!   independently, are folded into one 128-bit block at the end, and that block plus the
//!   tail under 16 bytes go through the SSE4.2 `crc32` instruction, which does the final
//!   reduction to 32 bits with no Barrett step.
//!
//! The path is chosen once per process from the CPU's features ([`CrcPath::detected`]); without
//! PCLMULQDQ and SSE4.2 (or off x86-64) the `crc32c` crate does the work.

use std::sync::atomic::{AtomicU8, Ordering};

/// The Castagnoli polynomial 0x1EDC6F41 (x^32 implied), bit-reflected.
pub const CASTAGNOLI_REFLECTED: u32 = 0x82F6_3B78;

/// Extends `crc` (start from 0) with `bytes`: `crc32c_append(crc32c(a), b) == crc32c(a ++ b)`.
/// The same results as `crc32c::crc32c_append`, on the fastest path this CPU has.
pub fn crc32c_append(crc: u32, bytes: &[u8]) -> u32 {
    match CrcPath::detected() {
        #[cfg(target_arch = "x86_64")]
        CrcPath::Clmul512 => {
            // SAFETY: `detected` chose this path only after finding every feature it enables.
            unsafe { x86::append_clmul512(crc, bytes) }
        }
        #[cfg(target_arch = "x86_64")]
        CrcPath::Clmul128 => {
            // SAFETY: `detected` chose this path only after finding every feature it enables.
            unsafe { x86::append_clmul128(crc, bytes) }
        }
        _ => crc32c::crc32c_append(crc, bytes),
    }
}

/// crc32c of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c_append(0, bytes)
}

/// One way of computing the crc32c; tests and benchmarks force each one with [`CrcPath::append`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrcPath {
    /// The `crc32c` crate (SSE4.2 or ARMv8 CRC instructions where present, else tables).
    Crate,
    /// Four 128-bit PCLMULQDQ fold lanes, SSE4.2 `crc32` for the reduction and the tail.
    Clmul128,
    /// Four 512-bit VPCLMULQDQ fold registers (AVX-512), then as [`CrcPath::Clmul128`].
    Clmul512,
}

/// [`CrcPath::detected`]'s cache: 0 until the first call, then the path's index plus one.
static DETECTED: AtomicU8 = AtomicU8::new(0);

impl CrcPath {
    /// Every path, slowest first.
    pub const ALL: [CrcPath; 3] = [CrcPath::Crate, CrcPath::Clmul128, CrcPath::Clmul512];

    /// Whether this CPU has the features the path needs.
    pub fn available(self) -> bool {
        match self {
            CrcPath::Crate => true,
            #[cfg(target_arch = "x86_64")]
            CrcPath::Clmul128 => {
                std::arch::is_x86_feature_detected!("pclmulqdq") && std::arch::is_x86_feature_detected!("sse4.2")
            }
            #[cfg(target_arch = "x86_64")]
            CrcPath::Clmul512 => {
                CrcPath::Clmul128.available()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("vpclmulqdq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest available path, detected on the first call and cached.
    pub fn detected() -> CrcPath {
        match DETECTED.load(Ordering::Relaxed) {
            0 => {
                // Threads racing here all detect the same path; the last store wins harmlessly.
                let best = *CrcPath::ALL
                    .iter()
                    .rev()
                    .find(|p| p.available())
                    .unwrap_or(&CrcPath::Crate);
                let index = CrcPath::ALL.iter().position(|p| *p == best).unwrap_or(0);
                DETECTED.store(index as u8 + 1, Ordering::Relaxed);
                best
            }
            n => CrcPath::ALL[usize::from(n - 1)],
        }
    }

    /// [`crc32c_append`] on this path, or `None` if this CPU lacks its features.
    pub fn append(self, crc: u32, bytes: &[u8]) -> Option<u32> {
        if !self.available() {
            return None;
        }
        Some(match self {
            CrcPath::Crate => crc32c::crc32c_append(crc, bytes),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available` checked every feature the function enables.
            CrcPath::Clmul128 => unsafe { x86::append_clmul128(crc, bytes) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available` checked every feature the function enables.
            CrcPath::Clmul512 => unsafe { x86::append_clmul512(crc, bytes) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => return None,
        })
    }
}

/// `x^n mod P` as a 32-bit reflected value (bit 31 - i holds the coefficient of x^i).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only the folds and tests use it
pub(crate) const fn xpow_mod(n: u32) -> u32 {
    // x^0 = 1 is bit 31. Multiplying by x shifts towards bit 0; the coefficient of x^31
    // leaving bit 0 becomes x^32, which is P's low 32 terms.
    let mut v: u32 = 1 << 31;
    let mut i = 0;
    while i < n {
        v = if v & 1 == 1 {
            (v >> 1) ^ CASTAGNOLI_REFLECTED
        } else {
            v >> 1
        };
        i += 1;
    }
    v
}

/// The two constants that fold a 128-bit block forward by `distance_bits`: `[for the low
/// qword (x^127..x^64), for the high qword (x^63..x^0)]`. See the module doc for the 33.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only the folds and tests use it
pub(crate) const fn fold_keys(distance_bits: u32) -> [u64; 2] {
    [
        xpow_mod(distance_bits + 64 - 33) as u64,
        xpow_mod(distance_bits - 33) as u64,
    ]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m128i, __m512i, _MM_HINT_T0, _mm_clmulepi64_si128, _mm_crc32_u8, _mm_crc32_u64, _mm_cvtsi32_si128,
        _mm_cvtsi128_si64, _mm_extract_epi64, _mm_loadu_si128, _mm_prefetch, _mm_set_epi64x, _mm_xor_si128,
        _mm512_broadcast_i32x4, _mm512_clmulepi64_epi128, _mm512_extracti32x4_epi32, _mm512_loadu_si512,
        _mm512_ternarylogic_epi64, _mm512_xor_si512, _mm512_zextsi128_si512,
    };

    use super::fold_keys;

    /// Below this many bytes the `crc32` instruction alone is used: measured on the issue 3
    /// machine, folding 128 bytes takes 9 ns and the instruction 13 ns, 96 bytes 11 and 10.
    const CLMUL128_BYTES_MIN: usize = 128;
    /// Below this many bytes (one block of the 512-bit loop) the 128-bit path takes over.
    const CLMUL512_BYTES_MIN: usize = 256;
    /// How far ahead of the 512-bit loop to prefetch.
    const PREFETCH_BYTES: usize = 1024;

    const KEYS_128: [u64; 2] = fold_keys(128);
    const KEYS_256: [u64; 2] = fold_keys(256);
    const KEYS_384: [u64; 2] = fold_keys(384);
    const KEYS_512: [u64; 2] = fold_keys(512);
    const KEYS_2048: [u64; 2] = fold_keys(2048);

    #[target_feature(enable = "sse2")]
    fn keys128(keys: [u64; 2]) -> __m128i {
        _mm_set_epi64x(keys[1] as i64, keys[0] as i64)
    }

    #[target_feature(enable = "sse2")]
    fn load128(block: &[u8; 16]) -> __m128i {
        // SAFETY: `block` is 16 readable bytes; the load has no alignment requirement.
        unsafe { _mm_loadu_si128(block.as_ptr().cast()) }
    }

    #[target_feature(enable = "avx512f")]
    fn load512(block: &[u8; 64]) -> __m512i {
        // SAFETY: `block` is 64 readable bytes; the load has no alignment requirement.
        unsafe { _mm512_loadu_si512(block.as_ptr().cast()) }
    }

    /// Asks for the cache lines `PREFETCH_BYTES` past `block`: on a buffer that comes from
    /// memory, one sequential stream of 512-bit loads otherwise waits on DRAM.
    #[target_feature(enable = "sse")]
    fn prefetch(block: &[u8; 256]) {
        let ahead = block.as_ptr().wrapping_add(PREFETCH_BYTES);
        for line in 0..4 {
            // A hint: it never faults, even past the end of the buffer.
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64).cast());
        }
    }

    /// `x` carried forward by the keys' distance, added to `next`.
    #[target_feature(enable = "pclmulqdq,sse2")]
    fn fold128(x: __m128i, keys: __m128i, next: __m128i) -> __m128i {
        // The low qword holds the high powers of x (reflected order).
        let hi = _mm_clmulepi64_si128::<0x00>(x, keys);
        let lo = _mm_clmulepi64_si128::<0x11>(x, keys);
        _mm_xor_si128(_mm_xor_si128(hi, lo), next)
    }

    /// [`fold128`] on the four 128-bit lanes of `x` at once.
    #[target_feature(enable = "avx512f,vpclmulqdq")]
    fn fold512(x: __m512i, keys: __m512i, next: __m512i) -> __m512i {
        let hi = _mm512_clmulepi64_epi128::<0x00>(x, keys);
        let lo = _mm512_clmulepi64_epi128::<0x11>(x, keys);
        // 0x96: the truth table of a ^ b ^ c.
        _mm512_ternarylogic_epi64::<0x96>(hi, lo, next)
    }

    /// The raw (uninverted) crc state `state` extended with `bytes`, 8 bytes per instruction.
    #[target_feature(enable = "sse4.2")]
    fn crc32_bytes(mut state: u32, bytes: &[u8]) -> u32 {
        let (words, tail) = bytes.as_chunks::<8>();
        for w in words {
            state = _mm_crc32_u64(u64::from(state), u64::from_le_bytes(*w)) as u32;
        }
        for &b in tail {
            state = _mm_crc32_u8(state, b);
        }
        state
    }

    /// The raw crc state of the 16-byte block `x` followed by `rest`, after folding `rest`'s
    /// whole blocks into `x`.
    #[target_feature(enable = "pclmulqdq,sse4.2")]
    fn finish(mut x: __m128i, rest: &[u8]) -> u32 {
        let keys = keys128(KEYS_128);
        let (blocks, tail) = rest.as_chunks::<16>();
        for b in blocks {
            x = fold128(x, keys, load128(b));
        }
        // `x`'s raw crc from a zero state: the instruction reduces its 128 bits to 32.
        let lo = _mm_cvtsi128_si64(x) as u64;
        let hi = _mm_extract_epi64::<1>(x) as u64;
        let state = _mm_crc32_u64(_mm_crc32_u64(0, lo), hi) as u32;
        crc32_bytes(state, tail)
    }

    /// [`super::crc32c_append`] with four 128-bit fold lanes.
    #[target_feature(enable = "pclmulqdq,sse4.2")]
    pub(super) fn append_clmul128(crc: u32, bytes: &[u8]) -> u32 {
        if bytes.len() < CLMUL128_BYTES_MIN {
            return !crc32_bytes(!crc, bytes);
        }
        let (blocks, rest) = bytes.as_chunks::<64>();
        let (first, blocks) = blocks.split_first().expect("at least CLMUL128_BYTES_MIN bytes");
        let (lanes, _) = first.as_chunks::<16>();
        // The running state enters as an XOR into the first 4 bytes of the message.
        let mut x0 = _mm_xor_si128(load128(&lanes[0]), _mm_cvtsi32_si128(!crc as i32));
        let mut x1 = load128(&lanes[1]);
        let mut x2 = load128(&lanes[2]);
        let mut x3 = load128(&lanes[3]);
        let keys = keys128(KEYS_512);
        for block in blocks {
            let (lanes, _) = block.as_chunks::<16>();
            x0 = fold128(x0, keys, load128(&lanes[0]));
            x1 = fold128(x1, keys, load128(&lanes[1]));
            x2 = fold128(x2, keys, load128(&lanes[2]));
            x3 = fold128(x3, keys, load128(&lanes[3]));
        }
        let keys = keys128(KEYS_128);
        let x = fold128(x0, keys, x1);
        let x = fold128(x, keys, x2);
        let x = fold128(x, keys, x3);
        !finish(x, rest)
    }

    /// [`super::crc32c_append`] with four 512-bit fold registers (16 lanes).
    #[target_feature(enable = "avx512f,vpclmulqdq,pclmulqdq,sse4.2")]
    pub(super) fn append_clmul512(crc: u32, bytes: &[u8]) -> u32 {
        if bytes.len() < CLMUL512_BYTES_MIN {
            return append_clmul128(crc, bytes);
        }
        let (blocks, rest) = bytes.as_chunks::<256>();
        let (first, blocks) = blocks.split_first().expect("at least CLMUL512_BYTES_MIN bytes");
        let (regs, _) = first.as_chunks::<64>();
        let state = _mm512_zextsi128_si512(_mm_cvtsi32_si128(!crc as i32));
        let mut z0 = _mm512_xor_si512(load512(&regs[0]), state);
        let mut z1 = load512(&regs[1]);
        let mut z2 = load512(&regs[2]);
        let mut z3 = load512(&regs[3]);
        let keys = _mm512_broadcast_i32x4(keys128(KEYS_2048));
        for block in blocks {
            prefetch(block);
            let (regs, _) = block.as_chunks::<64>();
            z0 = fold512(z0, keys, load512(&regs[0]));
            z1 = fold512(z1, keys, load512(&regs[1]));
            z2 = fold512(z2, keys, load512(&regs[2]));
            z3 = fold512(z3, keys, load512(&regs[3]));
        }
        let keys = _mm512_broadcast_i32x4(keys128(KEYS_512));
        let mut z = fold512(z0, keys, z1);
        z = fold512(z, keys, z2);
        z = fold512(z, keys, z3);
        let (regs, rest) = rest.as_chunks::<64>();
        for r in regs {
            z = fold512(z, keys, load512(r));
        }
        // The four lanes of `z` are 384, 256, 128 and 0 bits before the end of the block.
        let l0 = _mm512_extracti32x4_epi32::<0>(z);
        let l1 = _mm512_extracti32x4_epi32::<1>(z);
        let l2 = _mm512_extracti32x4_epi32::<2>(z);
        let l3 = _mm512_extracti32x4_epi32::<3>(z);
        let x = fold128(l0, keys128(KEYS_384), l3);
        let x = fold128(l1, keys128(KEYS_256), x);
        let x = fold128(l2, keys128(KEYS_128), x);
        !finish(x, rest)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// `x^n mod P` by long division in the normal (unreflected) bit order, with the full
    /// 33-bit polynomial: an independent check of [`xpow_mod`].
    fn xpow_mod_normal(n: u32) -> u32 {
        const P: u64 = 0x1_1EDC_6F41;
        let mut v: u64 = 1;
        for _ in 0..n {
            v <<= 1;
            if v & (1 << 32) != 0 {
                v ^= P;
            }
        }
        v as u32
    }

    /// Deterministic bytes, so failures reproduce.
    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    }

    #[test]
    fn fold_constants_match_long_division() {
        assert_eq!(CASTAGNOLI_REFLECTED, 0x1EDC_6F41u32.reverse_bits());
        for n in [0, 1, 31, 32, 33, 95, 159, 223, 287, 351, 415, 479, 543, 2015, 2079] {
            assert_eq!(xpow_mod(n), xpow_mod_normal(n).reverse_bits(), "x^{n}");
        }
        // x^32 mod P is P's low terms; x^(-33) offsets as the module doc says.
        assert_eq!(xpow_mod(32), CASTAGNOLI_REFLECTED);
        assert_eq!(fold_keys(128), [u64::from(xpow_mod(159)), u64::from(xpow_mod(95))]);
    }

    #[test]
    fn known_answers() {
        // The CRC-32C check value, and RFC 3720 B.4's 32 bytes of zeros and of 0xff.
        for path in CrcPath::ALL {
            let Some(check) = path.append(0, b"123456789") else {
                assert!(!path.available());
                continue;
            };
            assert_eq!(check, 0xE306_9283, "{path:?}");
            assert_eq!(path.append(0, &[0; 32]), Some(0x8A91_36AA), "{path:?}");
            assert_eq!(path.append(0, &[0xff; 32]), Some(0x62A8_AB43), "{path:?}");
        }
    }

    #[test]
    fn detected_is_the_fastest_available_path() {
        let best = CrcPath::detected();
        assert!(best.available());
        assert_eq!(CrcPath::detected(), best, "cached");
        let later = CrcPath::ALL.iter().skip_while(|p| **p != best).skip(1);
        assert!(later.clone().all(|p| !p.available()), "{best:?} but {later:?} exist");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("pclmulqdq") && std::arch::is_x86_feature_detected!("sse4.2") {
            assert_ne!(best, CrcPath::Crate);
        }
    }

    /// Each path forced explicitly, over every length to 2 KiB and the boundaries of the
    /// fold loops beyond, against the crate.
    fn check_path(path: CrcPath) {
        let data = bytes(70_000, 1);
        let lens = (0..2048).chain([4095, 4096, 4097, 65_535, 65_536, 65_537, 69_999]);
        for len in lens {
            let crc = crc32c::crc32c_append(0x1234_5678, &data[..len]);
            match path.append(0x1234_5678, &data[..len]) {
                Some(got) => assert_eq!(got, crc, "{path:?} len {len}"),
                None => return assert!(!path.available(), "{path:?}"),
            }
        }
    }

    #[test]
    fn crate_path_matches_the_crate() {
        check_path(CrcPath::Crate);
    }

    #[test]
    fn clmul128_path_matches_the_crate() {
        check_path(CrcPath::Clmul128);
    }

    #[test]
    fn clmul512_path_matches_the_crate() {
        check_path(CrcPath::Clmul512);
    }

    #[test]
    fn every_offset_and_length_matches_the_crate() {
        let data = bytes(64 + 1500, 2);
        for offset in 0..64 {
            for len in 0..1500 {
                let slice = &data[offset..offset + len];
                let expected = crc32c::crc32c(slice);
                for path in CrcPath::ALL {
                    if let Some(got) = path.append(0, slice) {
                        assert_eq!(got, expected, "{path:?} offset {offset} len {len}");
                    }
                }
                assert_eq!(crc32c(slice), expected);
            }
        }
    }

    proptest! {
        #[test]
        fn random_lengths_match_the_crate(
            len in 0usize..100 << 10,
            offset in 0usize..64,
            seed: u64,
            crc: u32,
        ) {
            let data = bytes(offset + len, seed);
            let slice = &data[offset..];
            let expected = crc32c::crc32c_append(crc, slice);
            prop_assert_eq!(crc32c_append(crc, slice), expected);
            for path in CrcPath::ALL {
                if let Some(got) = path.append(crc, slice) {
                    prop_assert_eq!(got, expected, "{:?}", path);
                }
            }
        }

        #[test]
        fn appends_split_anywhere_match_the_whole(
            len in 0usize..100 << 10,
            seed: u64,
            mut cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..8),
        ) {
            let data = bytes(len, seed);
            let expected = crc32c::crc32c(&data);
            let mut at: Vec<usize> = cuts.iter_mut().map(|c| c.index(len + 1)).collect();
            at.sort_unstable();
            for path in CrcPath::ALL {
                if !path.available() {
                    continue;
                }
                let mut crc = 0;
                let mut start = 0;
                for &end in at.iter().chain([&len]) {
                    crc = path.append(crc, &data[start..end]).unwrap_or_default();
                    start = end;
                }
                prop_assert_eq!(crc, expected, "{:?} cuts {:?}", path, at);
            }
        }
    }
}
