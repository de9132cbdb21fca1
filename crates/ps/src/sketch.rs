//! Finding hot keys in a stream: a Count-Min sketch for frequencies and a
//! bounded candidate set of the heaviest keys seen (the "CM + heap" heavy
//! hitters of Cormode and Muthukrishnan).
//!
//! Memory is fixed (`depth × width` counters plus `capacity` candidates)
//! whatever the number of distinct keys. Estimates never undercount; they
//! overcount by at most `e/width × total` with probability `1 − e^-depth`.

use std::collections::HashMap;

use crate::placement::mix64;

/// Counters per row of the sketch.
pub const WIDTH_DEFAULT: usize = 1 << 16;
/// Rows (independent hashes) of the sketch.
pub const DEPTH: usize = 4;

pub struct HotKeys {
    width: usize,
    counts: Vec<u32>,
    capacity: usize,
    candidates: HashMap<u64, u32>,
    /// The smallest estimate in `candidates` when it is full (recomputed lazily).
    floor: u32,
    total: u64,
}

impl HotKeys {
    /// Tracks up to `capacity` heavy keys.
    pub fn new(capacity: usize) -> Self {
        Self::with_width(capacity, WIDTH_DEFAULT)
    }

    pub fn with_width(capacity: usize, width: usize) -> Self {
        assert!(width.is_power_of_two() && capacity > 0);
        Self {
            width,
            counts: vec![0; DEPTH * width],
            capacity,
            candidates: HashMap::with_capacity(capacity + 1),
            floor: 0,
            total: 0,
        }
    }

    /// Counts one occurrence of `key`.
    pub fn add(&mut self, key: u64) {
        self.total += 1;
        let mut est = u32::MAX;
        let h = mix64(key);
        for d in 0..DEPTH {
            // Two halves of one 64-bit hash give the row hashes (Kirsch–Mitzenmacher).
            let i = (h as u32).wrapping_add((d as u32).wrapping_mul((h >> 32) as u32 | 1)) as usize & (self.width - 1);
            let c = &mut self.counts[d * self.width + i];
            *c = c.saturating_add(1);
            est = est.min(*c);
        }
        if let Some(e) = self.candidates.get_mut(&key) {
            *e = est;
            return;
        }
        if self.candidates.len() < self.capacity {
            self.candidates.insert(key, est);
            if self.candidates.len() == self.capacity {
                self.floor = self.candidates.values().copied().min().unwrap_or(0);
            }
            return;
        }
        if est > self.floor {
            let (&weakest, _) = self
                .candidates
                .iter()
                .min_by_key(|(k, e)| (**e, **k))
                .expect("full candidate set");
            self.candidates.remove(&weakest);
            self.candidates.insert(key, est);
            self.floor = self.candidates.values().copied().min().unwrap_or(0);
        }
    }

    /// Occurrences counted so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The estimated count of `key` (never below the true count).
    pub fn estimate(&self, key: u64) -> u32 {
        let h = mix64(key);
        (0..DEPTH)
            .map(|d| {
                let i =
                    (h as u32).wrapping_add((d as u32).wrapping_mul((h >> 32) as u32 | 1)) as usize & (self.width - 1);
                self.counts[d * self.width + i]
            })
            .min()
            .unwrap_or(0)
    }

    /// The `n` heaviest candidates, heaviest first: (key, estimated count).
    pub fn top(&self, n: usize) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.candidates.keys().map(|&k| (k, self.estimate(k) as u64)).collect();
        v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor::Rng;

    #[test]
    fn finds_the_heaviest_keys_of_a_zipf_stream() {
        // Zipf 1.2 over 1M keys by inverse-CDF sampling.
        let n = 1_000_000usize;
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0f64;
        for k in 1..=n {
            acc += (k as f64).powf(-1.2);
            cdf.push(acc);
        }
        let mut rng = Rng::new(7);
        let mut exact: HashMap<u64, u64> = HashMap::new();
        let mut hk = HotKeys::new(256);
        for _ in 0..300_000 {
            let u = rng.next_f64() * acc;
            let k = cdf.partition_point(|&c| c < u) as u64;
            *exact.entry(k).or_default() += 1;
            hk.add(k);
        }
        let mut truth: Vec<(u64, u64)> = exact.into_iter().collect();
        truth.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let found: std::collections::HashSet<u64> = hk.top(100).into_iter().map(|(k, _)| k).collect();
        let hits = truth[..50].iter().filter(|(k, _)| found.contains(k)).count();
        assert_eq!(hits, 50, "the 50 heaviest keys are among the top 100 reported");
        for (k, c) in &truth[..50] {
            assert!(hk.estimate(*k) as u64 >= *c, "never undercounts");
        }
    }
}
