//! Which shard owns which parameters.
//!
//! - Dense tensors: the dense elements of the layout, in buffer order, are cut
//!   into `shards` contiguous pieces of equal size (±1 element), so every
//!   shard carries the same dense bytes. A piece may span tensor boundaries.
//! - Table rows: a row's [`key`] is placed by consistent hashing with
//!   `vnodes` virtual nodes per shard: growing from M to M+1 shards moves
//!   about 1/(M+1) of the keys, not most of them.
//! - Hot keys: an explicit `key → shard` table that overrides the hash, built
//!   by [`balance_hot_keys`] from measured key frequencies.
//!
//! **Invariant:** a [`Placement`] is a pure function of its [`PlacementSpec`]
//! and the layout, so every worker and server that holds the same spec
//! routes every key to the same shard.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use tensor::{Layout, ParamKind};

use crate::error::PsError;
use crate::shard::MixMap;

/// Virtual nodes per shard on the hash ring unless configured.
pub const VNODES_DEFAULT: u32 = 128;
/// Most virtual nodes per shard we accept (bounds the ring a peer can make us build).
pub const VNODES_MAX: u32 = 4096;
/// Most shards.
pub const SHARDS_MAX: u32 = 1024;
/// Most hot-key overrides in one placement.
pub const HOT_KEYS_MAX: usize = 65_536;

/// The key of one table row: the table's tensor index in the layout and the row.
pub fn key(tensor: usize, row: u32) -> u64 {
    ((tensor as u64) << 32) | row as u64
}

/// The tensor index and row of a key.
pub fn split_key(key: u64) -> (usize, u32) {
    ((key >> 32) as usize, key as u32)
}

/// splitmix64's finaliser: a fast bijective mixer, the hash of keys and ring points.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// What every participant must agree on; small enough to send in a control message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementSpec {
    pub shards: u32,
    pub vnodes: u32,
    /// Keys placed explicitly, overriding the hash ring.
    pub hot: Vec<(u64, u32)>,
}

impl PlacementSpec {
    pub fn hashed(shards: u32, vnodes: u32) -> Self {
        Self {
            shards,
            vnodes,
            hot: Vec::new(),
        }
    }

    pub fn validate(&self) -> Result<(), PsError> {
        if self.shards == 0 || self.shards > SHARDS_MAX {
            return Err(PsError::Placement(format!(
                "{} shards (must be 1..={SHARDS_MAX})",
                self.shards
            )));
        }
        if self.vnodes == 0 || self.vnodes > VNODES_MAX {
            return Err(PsError::Placement(format!(
                "{} virtual nodes per shard (must be 1..={VNODES_MAX})",
                self.vnodes
            )));
        }
        if self.hot.len() > HOT_KEYS_MAX {
            return Err(PsError::Placement(format!(
                "{} hot keys (at most {HOT_KEYS_MAX})",
                self.hot.len()
            )));
        }
        if let Some((k, s)) = self.hot.iter().find(|(_, s)| *s >= self.shards) {
            return Err(PsError::Placement(format!(
                "hot key {k:#x} placed on shard {s} of {}",
                self.shards
            )));
        }
        Ok(())
    }
}

/// Routes dense elements and table keys to shards.
#[derive(Clone, Debug)]
pub struct Placement {
    spec: PlacementSpec,
    /// Ring points sorted by position: (position, shard).
    ring: Vec<(u64, u32)>,
    hot: MixMap<u64, u32>,
    /// Per shard, the flat-buffer ranges of the dense elements it owns.
    dense: Vec<Vec<Range<usize>>>,
}

impl Placement {
    pub fn new(spec: PlacementSpec, layout: &Layout) -> Result<Self, PsError> {
        spec.validate()?;
        let mut ring: Vec<(u64, u32)> = (0..spec.shards)
            .flat_map(|s| (0..spec.vnodes).map(move |v| (mix64(((s as u64) << 32) ^ v as u64 ^ 0x005E_ED0F_7A81), s)))
            .collect();
        ring.sort_unstable();
        let hot = spec.hot.iter().copied().collect();
        let dense = dense_pieces(layout, spec.shards as usize);
        Ok(Self { spec, ring, hot, dense })
    }

    pub fn spec(&self) -> &PlacementSpec {
        &self.spec
    }

    pub fn shards(&self) -> u32 {
        self.spec.shards
    }

    /// The shard that owns `key`.
    pub fn shard_of(&self, key: u64) -> u32 {
        if !self.hot.is_empty()
            && let Some(&s) = self.hot.get(&key)
        {
            return s;
        }
        self.hashed_shard_of(key)
    }

    /// The shard the hash ring alone gives `key` (what plain hashing would do).
    pub fn hashed_shard_of(&self, key: u64) -> u32 {
        let h = mix64(key);
        let i = self.ring.partition_point(|&(p, _)| p < h);
        self.ring[if i == self.ring.len() { 0 } else { i }].1
    }

    /// The flat-buffer ranges of the dense elements `shard` owns, in buffer order.
    pub fn dense_ranges(&self, shard: u32) -> &[Range<usize>] {
        &self.dense[shard as usize]
    }

    /// Number of dense elements `shard` owns.
    pub fn dense_len(&self, shard: u32) -> usize {
        self.dense[shard as usize].iter().map(|r| r.len()).sum()
    }
}

/// Cuts the dense elements of `layout` into `shards` equal contiguous pieces.
fn dense_pieces(layout: &Layout, shards: usize) -> Vec<Vec<Range<usize>>> {
    let dense: Vec<Range<usize>> = layout
        .tensors()
        .iter()
        .filter(|t| t.kind == ParamKind::Dense && !t.is_empty())
        .map(|t| t.range())
        .collect();
    let total: usize = dense.iter().map(|r| r.len()).sum();
    let cuts = tensor::shard_ranges(total, shards);
    let mut out = vec![Vec::<Range<usize>>::new(); shards];
    // Walk the dense index space and the tensors together.
    let (mut t, mut t_used) = (0usize, 0usize);
    for (s, cut) in cuts.iter().enumerate() {
        let mut need = cut.len();
        while need > 0 {
            let r = &dense[t];
            let take = need.min(r.len() - t_used);
            let start = r.start + t_used;
            match out[s].last_mut() {
                Some(last) if last.end == start => last.end += take,
                _ => out[s].push(start..start + take),
            }
            need -= take;
            t_used += take;
            if t_used == r.len() {
                t += 1;
                t_used = 0;
            }
        }
    }
    out
}

/// Places the hottest keys so that no shard carries more than its share.
///
/// `hot` holds (key, weight) for the keys to place explicitly, where weight
/// is the key's measured load (e.g. how many requests carry it); `rest` is
/// the total weight of every other key, which the hash ring spreads evenly
/// (expected `rest / shards` per shard). Greedy, heaviest key first, onto
/// the least-loaded shard (longest-processing-time scheduling: within 4/3 of
/// the best possible maximum).
///
/// Limit: a single key heavier than `total / shards` cannot be balanced by
/// placement; splitting one key across shards is not done.
pub fn balance_hot_keys(shards: u32, hot: &[(u64, u64)], rest: u64) -> Vec<(u64, u32)> {
    let mut load = vec![rest as f64 / shards as f64; shards as usize];
    let mut keys: Vec<(u64, u64)> = hot.to_vec();
    keys.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut out = Vec::with_capacity(keys.len());
    for (k, w) in keys {
        let (s, _) = load
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .expect("at least one shard");
        load[s] += w as f64;
        out.push((k, s as u32));
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        let mut l = Layout::new();
        l.push("w1", &[10, 3], ParamKind::Dense);
        l.push("emb", &[100, 4], ParamKind::Table);
        l.push("b1", &[7], ParamKind::Dense);
        l
    }

    #[test]
    fn dense_pieces_cover_every_dense_element_once_and_balance() {
        let l = layout();
        for shards in 1..6u32 {
            let p = Placement::new(PlacementSpec::hashed(shards, 16), &l).unwrap();
            let mut seen = vec![0u8; l.len()];
            for s in 0..shards {
                for r in p.dense_ranges(s) {
                    for i in r.clone() {
                        seen[i] += 1;
                    }
                }
            }
            for t in l.tensors() {
                let want = u8::from(t.kind == ParamKind::Dense);
                assert!(
                    seen[t.range()].iter().all(|&c| c == want),
                    "{shards} shards, {}",
                    t.name
                );
            }
            let lens: Vec<usize> = (0..shards).map(|s| p.dense_len(s)).collect();
            assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1, "{lens:?}");
        }
    }

    #[test]
    fn adding_a_shard_moves_about_one_in_m_plus_one_keys() {
        let l = layout();
        let a = Placement::new(PlacementSpec::hashed(4, VNODES_DEFAULT), &l).unwrap();
        let b = Placement::new(PlacementSpec::hashed(5, VNODES_DEFAULT), &l).unwrap();
        let n = 200_000u32;
        let moved = (0..n)
            .filter(|&r| a.shard_of(key(1, r)) != b.shard_of(key(1, r)))
            .count();
        let frac = moved as f64 / n as f64;
        // Ideal 1/5 = 0.2; modulo hashing would move 0.8.
        assert!((0.12..0.3).contains(&frac), "moved {frac}");
        // And every key that moved went to the new shard.
        assert!((0..n).all(|r| {
            let k = key(1, r);
            a.shard_of(k) == b.shard_of(k) || b.shard_of(k) == 4
        }));
    }

    #[test]
    fn hashing_spreads_keys_evenly() {
        let p = Placement::new(PlacementSpec::hashed(4, VNODES_DEFAULT), &layout()).unwrap();
        let mut count = [0usize; 4];
        for r in 0..400_000u32 {
            count[p.shard_of(key(1, r)) as usize] += 1;
        }
        let max = *count.iter().max().unwrap() as f64;
        assert!(max / 100_000.0 < 1.12, "{count:?}");
    }

    #[test]
    fn hot_keys_override_the_ring_and_balance() {
        let hot: Vec<(u64, u64)> = (0..8).map(|i| (key(1, i), 100 - i as u64)).collect();
        let placed = balance_hot_keys(4, &hot, 0);
        let mut load = [0u64; 4];
        for (k, s) in &placed {
            load[*s as usize] += hot.iter().find(|h| h.0 == *k).unwrap().1;
        }
        assert!(load.iter().max().unwrap() - load.iter().min().unwrap() <= 8, "{load:?}");
        let spec = PlacementSpec {
            shards: 4,
            vnodes: 8,
            hot: placed.clone(),
        };
        let p = Placement::new(spec, &layout()).unwrap();
        for (k, s) in placed {
            assert_eq!(p.shard_of(k), s);
        }
    }

    #[test]
    fn bad_specs_are_refused() {
        let l = layout();
        assert!(Placement::new(PlacementSpec::hashed(0, 8), &l).is_err());
        assert!(Placement::new(PlacementSpec::hashed(2, 0), &l).is_err());
        let spec = PlacementSpec {
            shards: 2,
            vnodes: 8,
            hot: vec![(1, 2)],
        };
        let e = Placement::new(spec, &l).unwrap_err();
        assert!(e.to_string().contains("shard 2 of 2"), "{e}");
    }
}
