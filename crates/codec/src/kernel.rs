//! What the codecs' inner loops share: compiling a kernel twice (baseline
//! x86-64 and AVX2) and picking at run time, the write modes of decoding, the
//! lane-parallel dither stream, stochastic rounding and fixed-order reductions.
//!
//! The workspace builds for baseline x86-64 (SSE2), so loops the compiler
//! vectorises there run at a quarter of the width this machine has. A kernel
//! written with [`simd_kernel!`] is compiled once more with AVX2 enabled and
//! chosen when the CPU has it.
//!
//! **Invariant:** both compilations give bitwise the same results. Rust never
//! fuses or reorders float operations on its own, and every reduction here
//! (sums, dot products) accumulates in a fixed number of lanes in a fixed order.

use std::sync::atomic::{AtomicU8, Ordering};

use tensor::Rng;

/// Defines `fn $name` that runs `$body` compiled for AVX2 (and FMA, BMI1/2,
/// LZCNT, POPCNT: x86-64-v3) when the CPU has them, and for the baseline otherwise.
macro_rules! simd_kernel {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident $(<$($g:ident : $bound:path),*>)? ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?
        $body:block
    ) => {
        $(#[$meta])*
        $vis fn $name $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
                fn avx2 $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
                    portable $(::<$($g),*>)? ($($arg),*)
                }
                if $crate::kernel::has_avx2() {
                    // SAFETY: `avx2` only needs the CPU features it enables, and `has_avx2` found them all.
                    return unsafe { avx2 $(::<$($g),*>)? ($($arg),*) };
                }
            }
            portable $(::<$($g),*>)? ($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

const UNKNOWN: u8 = 0;
const ABSENT: u8 = 1;
const PRESENT: u8 = 2;
static AVX2: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether the AVX2 compilation of the kernels may run on this CPU.
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(test)]
    if tests::PORTABLE_ONLY.load(Ordering::Relaxed) {
        return false;
    }
    match AVX2.load(Ordering::Relaxed) {
        PRESENT => true,
        ABSENT => false,
        _ => {
            let present = detect_avx2();
            AVX2.store(if present { PRESENT } else { ABSENT }, Ordering::Relaxed);
            present
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_avx2() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx2") && has!("fma") && has!("bmi1") && has!("bmi2") && has!("lzcnt") && has!("popcnt")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx2() -> bool {
    false
}

/// How a decoder writes a decoded value into the caller's buffer.
pub(crate) trait Sink {
    /// Whether elements the message does not mention become zero.
    const OVERWRITES: bool;
    fn put(dst: &mut f32, v: f32);
}

/// `decode`: the buffer becomes the message.
pub(crate) enum Set {}
/// `decode_add`: the message is added to the buffer.
pub(crate) enum Add {}
/// Error feedback: the message is subtracted from the buffer.
pub(crate) enum Sub {}

impl Sink for Set {
    const OVERWRITES: bool = true;
    #[inline(always)]
    fn put(dst: &mut f32, v: f32) {
        *dst = v;
    }
}

impl Sink for Add {
    const OVERWRITES: bool = false;
    #[inline(always)]
    fn put(dst: &mut f32, v: f32) {
        *dst += v;
    }
}

impl Sink for Sub {
    const OVERWRITES: bool = false;
    #[inline(always)]
    fn put(dst: &mut f32, v: f32) {
        *dst -= v;
    }
}

/// Independent xoshiro256++ streams stepped together, so that the compiler
/// vectorises the loop over them; stream `l` is `Rng::derive(seed, l)`.
const DITHER_LANES: usize = 64;
/// Numbers per refill: the two 32-bit halves of each lane's output.
const DITHER_BLOCK: usize = 2 * DITHER_LANES;

/// The random numbers of stochastic rounding: a stream of u32 in which
/// element `i` of a message gets number `i`, whatever the bucket size.
/// Refill `j` holds the low halves of the lanes' `j`-th outputs (lane order),
/// then their high halves.
pub(crate) struct Dither {
    s: [[u64; DITHER_LANES]; 4],
    block: [u32; DITHER_BLOCK],
    used: usize,
}

impl Dither {
    pub fn new(seed: u64) -> Self {
        let mut s = [[0; DITHER_LANES]; 4];
        for lane in 0..DITHER_LANES {
            let state = Rng::derive(seed, lane as u64).state();
            for (word, v) in s.iter_mut().zip(state) {
                word[lane] = v;
            }
        }
        Self {
            s,
            block: [0; DITHER_BLOCK],
            used: DITHER_BLOCK,
        }
    }

    /// Fills `out` with the next `out.len()` numbers of the stream.
    #[inline(always)]
    pub fn fill(&mut self, mut out: &mut [u32]) {
        while !out.is_empty() {
            if self.used == DITHER_BLOCK {
                self.refill();
            }
            let take = (DITHER_BLOCK - self.used).min(out.len());
            let (head, rest) = out.split_at_mut(take);
            head.copy_from_slice(&self.block[self.used..self.used + take]);
            self.used += take;
            out = rest;
        }
    }

    #[inline(always)]
    fn refill(&mut self) {
        let [s0, s1, s2, s3] = &mut self.s;
        let (lo, hi) = self.block.split_at_mut(DITHER_LANES);
        for l in 0..DITHER_LANES {
            let r = s0[l].wrapping_add(s3[l]).rotate_left(23).wrapping_add(s0[l]);
            let t = s1[l] << 17;
            s2[l] ^= s0[l];
            s3[l] ^= s1[l];
            s1[l] ^= s2[l];
            s0[l] ^= s3[l];
            s2[l] ^= t;
            s3[l] = s3[l].rotate_left(45);
            lo[l] = r as u32;
            hi[l] = (r >> 32) as u32;
        }
        self.used = 0;
    }
}

/// Adding and subtracting 1.5·2^23 rounds an f32 below 2^22 in magnitude to an integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Rounds `y` down or up at random, up with probability `y - floor(y)`
/// (to within 2^-24), using the top 24 bits of `r`. `|y|` must be below
/// 2^22 for the result to be right; otherwise (NaN too) the result is some
/// integer, and nothing panics. Branch-free and without float-to-int
/// conversions (whose saturation does not vectorise), so that it vectorises.
#[inline(always)]
pub(crate) fn stochastic_round(y: f32, r: u32) -> i32 {
    let nearest = (y + ROUND_MAGIC) - ROUND_MAGIC;
    let floor = if nearest > y { nearest - 1.0 } else { nearest };
    let frac = y - floor; // exact
    let u = ((r >> 8) as i32) as f32 * (1.0 / 16_777_216.0);
    let q = if frac > u { floor + 1.0 } else { floor };
    // q is an integer below 2^22 in magnitude: its value sits in the low mantissa bits of q + 1.5·2^23.
    ((q + ROUND_MAGIC).to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32)
}

/// Lanes of the fixed-order reductions below.
const LANES: usize = 16;

/// The largest `|x|` as f32 bits (NaN counts as larger than infinity).
#[inline(always)]
pub(crate) fn max_abs_bits(x: &[f32]) -> u32 {
    x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff))
}

/// Σ|x| in f32, accumulated in [`LANES`] lanes in a fixed order.
#[inline(always)]
pub(crate) fn sum_abs(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v.abs();
        }
    }
    for (a, v) in acc.iter_mut().zip(tail) {
        *a += v.abs();
    }
    reduce(acc)
}

/// Σx² in f64, accumulated in [`LANES`] lanes in a fixed order.
#[inline(always)]
pub(crate) fn sum_squares_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            let v = f64::from(*v);
            *a += v * v;
        }
    }
    for (a, v) in acc.iter_mut().zip(tail) {
        let v = f64::from(*v);
        *a += v * v;
    }
    let mut s = 0.0;
    for a in acc {
        s += a;
    }
    s
}

/// Σ a·b in f32, accumulated in [`LANES`] lanes in a fixed order.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    for ((s, x), y) in acc.iter_mut().zip(ta).zip(tb) {
        *s += x * y;
    }
    reduce(acc)
}

/// `y += a·x`.
#[inline(always)]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    assert_eq!(y.len(), x.len());
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[inline(always)]
fn reduce(acc: [f32; LANES]) -> f32 {
    // Pairwise, in a fixed order.
    let mut v = acc;
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            v[i] += v[i + width];
        }
        width /= 2;
    }
    v[0]
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// Makes [`has_avx2`] say no, so a test can compare the two compilations.
    pub(crate) static PORTABLE_ONLY: AtomicBool = AtomicBool::new(false);

    #[test]
    fn dither_is_the_derived_rngs_lane_by_lane() {
        let mut d = Dither::new(42);
        // Odd pieces, to cross refills at different places.
        let mut stream = Vec::new();
        for len in [1usize, 127, 3, 200, 181] {
            let mut piece = vec![0u32; len];
            d.fill(&mut piece);
            stream.extend(piece);
        }
        let mut rngs: Vec<Rng> = (0..DITHER_LANES).map(|l| Rng::derive(42, l as u64)).collect();
        for block in stream.chunks(DITHER_BLOCK) {
            let outputs: Vec<u64> = rngs.iter_mut().map(|r| r.next_u64()).collect();
            for (i, v) in block.iter().enumerate() {
                let r = outputs[i % DITHER_LANES];
                let want = if i < DITHER_LANES { r as u32 } else { (r >> 32) as u32 };
                assert_eq!(*v, want, "number {i}");
            }
        }
    }

    #[test]
    fn stochastic_round_brackets_and_is_unbiased() {
        let mut d = Dither::new(3);
        let trials = 64_000;
        let mut r = vec![0u32; trials];
        for &y in &[-3.75f32, -0.5, 0.0, 0.1, 2.0, 126.9, -126.25] {
            d.fill(&mut r);
            let mut sum = 0i64;
            for r in &r {
                let q = stochastic_round(y, *r);
                assert!(q == y.floor() as i32 || q == y.ceil() as i32, "{y} -> {q}");
                sum += i64::from(q);
            }
            let mean = sum as f64 / trials as f64;
            // The standard deviation of one draw is at most 1/2.
            assert!(
                (mean - f64::from(y)).abs() < 5.0 * 0.5 / (trials as f64).sqrt(),
                "{y}: {mean}"
            );
        }
        for y in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30] {
            stochastic_round(y, 7); // some integer; no panic
        }
        assert_eq!(stochastic_round(-4_194_303.0, 0), -4_194_303);
        assert_eq!(stochastic_round(4_194_303.5, 0), 4_194_304);
    }

    #[test]
    fn reductions_match_plain_sums() {
        let x: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let plain: f32 = x.iter().map(|v| v.abs()).sum();
        assert_eq!(sum_abs(&x), plain); // small integers: exact in any order
        assert_eq!(dot(&x, &x) as f64, sum_squares_f64(&x));
        assert_eq!(f32::from_bits(max_abs_bits(&x)), 50.0);
    }
}
