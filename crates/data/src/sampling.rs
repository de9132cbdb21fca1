//! Fast samplers for the generators: Zipf ranks (guide table over the head,
//! continuous inversion over the tail), Poisson counts (table inversion), and
//! a keyed bijection of `0..2^bits` that scatters ranks over feature ids.

use tensor::Rng;

use crate::sparse::fmix64;

/// Ranks drawn exactly from an alias table (Walker/Vose, 512 KiB); rarer
/// ranks are drawn by inverting the continuous power law with a ½ continuity
/// correction, whose mass per rank is off by a relative `s(s+1)/(24 k²)`,
/// below 1e-10 there.
pub(crate) const ZIPF_HEAD_RANKS: usize = 1 << 16;

/// Zipf's law over ranks `0..n`: `P(r) ∝ (r + 1)^-s`.
#[derive(Clone, Debug)]
pub(crate) struct Zipf {
    n: u64,
    s: f64,
    /// Alias table of the head: entry `i` keeps rank `i` if the low 32 bits
    /// of the draw are below `threshold`, else yields `alias`.
    threshold: Vec<u32>,
    alias: Vec<u32>,
    /// A draw below this (of 2^64) falls in the head.
    head_cut: u64,
    tail_start: f64,
    tail_mass: f64,
    total: f64,
}

impl Zipf {
    /// `n ≥ 1`, `s > 0` (validated by the caller).
    pub(crate) fn new(n: u64, s: f64) -> Self {
        assert!(n >= 1 && s > 0.0 && s.is_finite(), "Zipf needs n ≥ 1 and s > 0");
        let head = n.min(ZIPF_HEAD_RANKS as u64) as usize;
        let weights: Vec<f64> = (1..=head).map(|k| (k as f64).powf(-s)).collect();
        let head_mass: f64 = weights.iter().sum();
        let (threshold, alias) = alias_table(&weights, head_mass);
        let mut z = Self {
            n,
            s,
            threshold,
            alias,
            head_cut: u64::MAX,
            tail_start: 0.0,
            tail_mass: 0.0,
            total: head_mass,
        };
        if n > head as u64 {
            z.tail_start = z.big_f(head as f64 + 0.5);
            z.tail_mass = z.big_f(n as f64 + 0.5) - z.tail_start;
            z.total += z.tail_mass;
            z.head_cut = (head_mass / z.total * 2f64.powi(64)) as u64;
        }
        z
    }

    /// An antiderivative of `x^-s`.
    fn big_f(&self, x: f64) -> f64 {
        if (self.s - 1.0).abs() < 1e-9 {
            x.ln()
        } else {
            x.powf(1.0 - self.s) / (1.0 - self.s)
        }
    }

    fn big_f_inv(&self, y: f64) -> f64 {
        if (self.s - 1.0).abs() < 1e-9 {
            y.exp()
        } else {
            (y * (1.0 - self.s)).powf(1.0 / (1.0 - self.s))
        }
    }

    /// Probability of rank `r` (exact in the head, the integral over `r+½±½` in the tail).
    #[cfg(test)]
    pub(crate) fn probability(&self, r: u64) -> f64 {
        let mass = if r < self.threshold.len() as u64 {
            ((r + 1) as f64).powf(-self.s)
        } else {
            self.big_f(r as f64 + 1.5) - self.big_f(r as f64 + 0.5)
        };
        mass / self.total
    }

    pub(crate) fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.next_u64();
        if u < self.head_cut || self.tail_mass == 0.0 {
            let x = rng.next_u64();
            let i = (((x >> 32) * self.threshold.len() as u64) >> 32) as usize;
            let keep = (x as u32) < self.threshold[i];
            return if keep { i as u64 } else { u64::from(self.alias[i]) };
        }
        let v = (u - self.head_cut) as f64 / (u64::MAX - self.head_cut) as f64;
        let x = self.big_f_inv(self.tail_start + v * self.tail_mass);
        let head = self.threshold.len() as u64;
        // Rank k (1-based) owns [k - ½, k + ½).
        let k = (x + 0.5).floor() as u64;
        k.clamp(head + 1, self.n) - 1
    }
}

/// Vose's alias table of `weights` (summing to `total`), with thresholds in
/// units of 2^-32. An entry that keeps all of its mass aliases itself.
fn alias_table(weights: &[f64], total: f64) -> (Vec<u32>, Vec<u32>) {
    let n = weights.len();
    let mut scaled: Vec<f64> = weights.iter().map(|w| w * n as f64 / total).collect();
    let mut threshold = vec![u32::MAX; n];
    let mut alias: Vec<u32> = (0..n as u32).collect();
    let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| scaled[i] < 1.0);
    while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
        threshold[s] = (scaled[s] * 2f64.powi(32)) as u32;
        alias[s] = l as u32;
        scaled[l] -= 1.0 - scaled[s];
        if scaled[l] < 1.0 {
            large.pop();
            small.push(l);
        }
    }
    // Whatever is left holds (up to rounding) exactly its own share.
    (threshold, alias)
}

/// Poisson counts by inverting a tabulated CDF.
#[derive(Clone, Debug)]
pub(crate) struct Poisson {
    cdf: Vec<f64>,
}

impl Poisson {
    /// `lambda` in `0..=1e6` (validated by the caller).
    pub(crate) fn new(lambda: f64) -> Self {
        assert!((0.0..=1e6).contains(&lambda), "Poisson mean {lambda} out of range");
        let k_max = (lambda + 12.0 * lambda.sqrt() + 30.0).ceil() as usize;
        let mut cdf = Vec::with_capacity(k_max + 1);
        // Log-space recurrence: e^-λ underflows for λ > 745 but its logarithm does not.
        let mut log_p = -lambda;
        let mut acc = 0.0;
        for k in 0..=k_max {
            if k > 0 {
                log_p += lambda.ln() - (k as f64).ln();
            }
            acc += log_p.exp();
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        if let Some(last) = cdf.last_mut() {
            *last = 1.0;
        }
        Self { cdf }
    }

    pub(crate) fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.next_f64();
        self.cdf.partition_point(|&c| c <= u).min(self.cdf.len() - 1) as u64
    }
}

/// A keyed bijection of `0..2^bits` (three rounds of add, multiply by an odd
/// constant, xor-shift, all mod `2^bits`), so that hot ranks land on ids
/// spread over the whole space, and its inverse.
#[derive(Clone, Debug)]
pub(crate) struct Scatter {
    mask: u64,
    shift: u32,
    keys: [u64; 3],
    mults: [u64; 3],
    inverses: [u64; 3],
}

impl Scatter {
    pub(crate) fn new(bits: u32, key: u64) -> Self {
        assert!((1..=32).contains(&bits), "Scatter needs 1..=32 bits");
        let mults = [
            0x9E37_79B9_7F4A_7C15 | 1,
            0xBF58_476D_1CE4_E5B9 | 1,
            0x94D0_49BB_1331_11EB | 1,
        ];
        let keys = [fmix64(key ^ 1), fmix64(key ^ 2), fmix64(key ^ 3)];
        Self {
            mask: (1u64 << bits) - 1,
            shift: bits.div_ceil(2),
            keys,
            mults,
            inverses: mults.map(inverse_odd),
        }
    }

    pub(crate) fn apply(&self, mut x: u64) -> u64 {
        for r in 0..3 {
            x = x.wrapping_add(self.keys[r]) & self.mask;
            x = x.wrapping_mul(self.mults[r]) & self.mask;
            x ^= x >> self.shift;
        }
        x
    }

    pub(crate) fn invert(&self, mut x: u64) -> u64 {
        for r in (0..3).rev() {
            // x ^= x >> shift undoes itself because 2 · shift ≥ bits.
            x ^= x >> self.shift;
            x = x.wrapping_mul(self.inverses[r]) & self.mask;
            x = x.wrapping_sub(self.keys[r]) & self.mask;
        }
        x
    }
}

/// The inverse of an odd number modulo 2^64 (Newton's iteration doubles the correct bits).
fn inverse_odd(m: u64) -> u64 {
    let mut inv = m;
    for _ in 0..6 {
        inv = inv.wrapping_mul(2u64.wrapping_sub(m.wrapping_mul(inv)));
    }
    inv
}

/// A standard normal from a 64-bit hash (Box-Muller on two derived uniforms).
pub(crate) fn normal_from_hash(h: u64) -> f64 {
    let u1 = ((h >> 11) as f64 + 1.0) * (1.0 / (1u64 << 53) as f64);
    let u2 = (fmix64(h ^ 0x5851_F42D_4C95_7F2D) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_frequencies_match_the_law() {
        for (n, s) in [(1u64 << 22, 1.1), (100, 0.8), (1 << 16, 1.0)] {
            let z = Zipf::new(n, s);
            let mut rng = Rng::new(3);
            let draws = 400_000;
            let mut counts = [0u32; 4];
            let mut tail = 0u32;
            let mut in_band = 0u32;
            for _ in 0..draws {
                let r = z.sample(&mut rng);
                assert!(r < n);
                if r < 4 {
                    counts[r as usize] += 1;
                }
                if r >= ZIPF_HEAD_RANKS as u64 {
                    tail += 1;
                }
                if (100..1000).contains(&r) {
                    in_band += 1;
                }
            }
            for (r, &c) in counts.iter().enumerate() {
                let p = z.probability(r as u64);
                let sd = (p * (1.0 - p) / draws as f64).sqrt();
                let f = f64::from(c) / draws as f64;
                assert!((f - p).abs() < 5.0 * sd, "n {n} s {s} rank {r}: {f} vs {p}");
            }
            let p_tail: f64 = 1.0
                - (0..ZIPF_HEAD_RANKS.min(n as usize) as u64)
                    .map(|r| z.probability(r))
                    .sum::<f64>();
            assert!(p_tail >= -1e-9);
            let f_tail = f64::from(tail) / draws as f64;
            // A band of the head exercises the alias table beyond the hottest ranks.
            let band = 100..1000u64.min(n);
            let p_band: f64 = band.clone().map(|r| z.probability(r)).sum();
            let f_band = f64::from(in_band) / draws as f64;
            let sd = (p_band * (1.0 - p_band) / draws as f64).sqrt();
            assert!(
                (f_band - p_band).abs() < 5.0 * sd + 1e-12,
                "n {n} s {s}: band {f_band} vs {p_band}"
            );
            assert!(
                (f_tail - p_tail).abs() < 0.005,
                "n {n} s {s}: tail {f_tail} vs {p_tail}"
            );
        }
    }

    #[test]
    fn poisson_mean_and_variance() {
        for lambda in [0.0, 3.0, 39.0, 2000.0] {
            let p = Poisson::new(lambda);
            let mut rng = Rng::new(5);
            let n = 100_000;
            let xs: Vec<f64> = (0..n).map(|_| p.sample(&mut rng) as f64).collect();
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            assert!(
                (mean - lambda).abs() < 0.05 * lambda.sqrt() + 1e-9,
                "λ {lambda}: mean {mean}"
            );
            assert!((var - lambda).abs() < 0.05 * lambda + 1e-9, "λ {lambda}: var {var}");
        }
    }

    #[test]
    fn scatter_is_a_bijection_with_an_inverse() {
        let s = Scatter::new(10, 42);
        let mut seen = vec![false; 1024];
        for x in 0..1024 {
            let y = s.apply(x) as usize;
            assert!(!seen[y], "collision at {x}");
            seen[y] = true;
            assert_eq!(s.invert(y as u64), x);
        }
        for bits in [1, 7, 22, 32] {
            let s = Scatter::new(bits, 7);
            let mut rng = Rng::new(bits.into());
            for _ in 0..1000 {
                let x = rng.next_u64() & ((1u64 << bits) - 1);
                assert_eq!(s.invert(s.apply(x)), x);
                assert!(s.apply(x) < 1u64 << bits);
            }
        }
        // Hot ranks are scattered, not clustered at the start of the space.
        let s = Scatter::new(22, 1);
        assert!((0..16).map(|r| s.apply(r)).filter(|&id| id < 1 << 18).count() < 8);
    }

    #[test]
    fn hashed_normals_are_standard() {
        let n = 200_000u64;
        let xs: Vec<f64> = (0..n).map(|i| normal_from_hash(fmix64(i))).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "mean {mean} var {var}");
    }
}
