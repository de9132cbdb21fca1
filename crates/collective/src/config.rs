//! Which collective to run, which algorithm runs it, and the typed config
//! (segment size, in-flight bound, small-message threshold) with its limits.

use serde::{Deserialize, Serialize};

use crate::Rank;
use crate::error::CollectiveError;
use crate::tag::{SEGMENT_LIMIT, STEP_LIMIT};

/// 64 Ki f32s = 256 KiB per frame: large enough that the per-frame cost is
/// noise at 4 GB/s (≈ 60 µs per frame), small enough that a 2-rank ring on a
/// 25 MiB buffer has ~50 segments to pipeline.
pub const SEGMENT_ELEMS_DEFAULT: usize = 64 * 1024;
/// 16 Mi f32s = 64 MiB, the wire crate's largest tensor payload.
pub const SEGMENT_ELEMS_MAX: usize = 16 << 20;
/// Four segments in flight per peer and direction keep a stream busy while
/// the previous frame is being added into the buffer.
pub const INFLIGHT_PER_PEER_DEFAULT: usize = 4;
pub const INFLIGHT_PER_PEER_MAX: usize = 64;
/// All-reduces of at most this many bytes use recursive doubling: at 4 KiB
/// the cost is the number of round trips, log2(n) against the ring's 2(n-1).
pub const SMALL_MESSAGE_BYTES_MAX_DEFAULT: usize = 64 * 1024;
/// The ring has `world - 1` steps per phase and the step field has 16 bits.
pub const WORLD_MAX: u32 = STEP_LIMIT;
/// Commands one engine may plan; at ~100 bytes each this caps an engine's
/// memory at ~100 MB. A ring all-reduce of 400 MB over 8 ranks with the
/// default segment needs ~5,400.
pub const COMMANDS_MAX: usize = 1 << 20;

const _: () = assert!(SEGMENT_LIMIT as usize >= 1 << 20);

/// The collective's own section of the job config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectiveConfig {
    /// f32s per frame. Chunks are cut into segments of this size so that the
    /// steps of a ring pipeline; also the runtime's staging buffer size.
    pub segment_elems: usize,
    /// Outstanding sends, and separately outstanding receives, per peer.
    pub inflight_per_peer: usize,
    /// All-reduces of at most this many bytes use recursive doubling and
    /// broadcasts use the binomial tree; larger ones use the ring and the chain.
    pub small_message_bytes_max: usize,
}

impl Default for CollectiveConfig {
    fn default() -> Self {
        CollectiveConfig {
            segment_elems: SEGMENT_ELEMS_DEFAULT,
            inflight_per_peer: INFLIGHT_PER_PEER_DEFAULT,
            small_message_bytes_max: SMALL_MESSAGE_BYTES_MAX_DEFAULT,
        }
    }
}

impl CollectiveConfig {
    pub fn validate(&self) -> Result<(), CollectiveError> {
        let bad = |reason: String| Err(CollectiveError::Config { reason });
        if !(1..=SEGMENT_ELEMS_MAX).contains(&self.segment_elems) {
            return bad(format!(
                "segment_elems = {} is outside 1..={SEGMENT_ELEMS_MAX}",
                self.segment_elems
            ));
        }
        if !(1..=INFLIGHT_PER_PEER_MAX).contains(&self.inflight_per_peer) {
            return bad(format!(
                "inflight_per_peer = {} is outside 1..={INFLIGHT_PER_PEER_MAX}",
                self.inflight_per_peer
            ));
        }
        Ok(())
    }

    /// The all-reduce algorithm for a buffer of `len_bytes` over `world` ranks
    /// under this config's threshold.
    pub fn all_reduce_algorithm(&self, len_bytes: usize, world: u32) -> Algorithm {
        Algorithm::choose_with(len_bytes, world, self.small_message_bytes_max)
    }

    /// The all-gather algorithm for a whole buffer (every rank's part) of
    /// `len_bytes` over `world` ranks.
    pub fn all_gather_algorithm(&self, len_bytes: usize, world: u32) -> GatherAlgorithm {
        if world > 2 && len_bytes <= self.small_message_bytes_max {
            GatherAlgorithm::Bruck
        } else {
            GatherAlgorithm::Ring
        }
    }

    /// The broadcast algorithm for a buffer of `len_bytes` over `world` ranks.
    pub fn broadcast_algorithm(&self, len_bytes: usize, world: u32) -> BroadcastAlgorithm {
        if world > 2 && len_bytes <= self.small_message_bytes_max {
            BroadcastAlgorithm::BinomialTree
        } else {
            BroadcastAlgorithm::Chain
        }
    }
}

/// How an all-reduce is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Reduce-scatter then all-gather around a ring: each rank sends
    /// 2(n-1)/n of the buffer, in 2(n-1) pipelined steps. For large buffers.
    Ring,
    /// Pairwise exchanges of the whole buffer in log2(n) rounds, with one
    /// fold in and out for the ranks above the largest power of two. For
    /// small buffers, where round trips cost more than bytes.
    RecursiveDoubling,
}

impl Algorithm {
    /// The algorithm for `len_bytes` over `world` ranks with the default
    /// threshold [`SMALL_MESSAGE_BYTES_MAX_DEFAULT`].
    pub fn choose(len_bytes: usize, world: u32) -> Algorithm {
        Algorithm::choose_with(len_bytes, world, SMALL_MESSAGE_BYTES_MAX_DEFAULT)
    }

    /// As [`Algorithm::choose`] with the threshold overridden. Every rank must
    /// choose the same way; a mismatch fails on the first frame's tag.
    pub fn choose_with(len_bytes: usize, world: u32, small_message_bytes_max: usize) -> Algorithm {
        if world > 1 && len_bytes <= small_message_bytes_max {
            Algorithm::RecursiveDoubling
        } else {
            Algorithm::Ring
        }
    }
}

/// How an all-gather is spread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatherAlgorithm {
    /// Each part travels around the ring in `n - 1` pipelined steps. For large buffers.
    Ring,
    /// Bruck's dissemination: in round `k` every rank passes the parts it holds
    /// (its own and the `2^k - 1` after it) to the rank `2^k` below it, so after
    /// ceil(log2 n) rounds everyone holds every part, for any `n`. Each rank
    /// still sends `n - 1` parts, in log2(n) frames instead of `n - 1`. For
    /// small buffers, where the ring's hops cost more than the bytes.
    Bruck,
}

/// How a broadcast is spread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BroadcastAlgorithm {
    /// root → root+1 → … in pipelined segments: every rank sends the buffer
    /// once, so the time is ≈ len/bandwidth + (n-2) segment hops. For large buffers.
    Chain,
    /// A binomial tree: log2(n) hops, but the root sends the buffer log2(n)
    /// times. For small buffers.
    BinomialTree,
}

/// Which collective an engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Every rank ends with the element-wise sum of all ranks' buffers.
    AllReduce(Algorithm),
    /// Rank `r` ends with the sum of chunk `r` (see [`crate::chunk_range`]) in
    /// that range of its buffer; the rest of its buffer holds partial sums.
    ReduceScatter,
    /// Rank `r` contributes chunk `r` of its buffer; every rank ends with
    /// every chunk.
    AllGather(GatherAlgorithm),
    /// Every rank ends with the root's buffer.
    Broadcast { root: Rank, algorithm: BroadcastAlgorithm },
    /// No rank completes before every rank has started. `len` must be 0.
    Barrier,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::AllReduce(Algorithm::Ring) => "ring all-reduce",
            Kind::AllReduce(Algorithm::RecursiveDoubling) => "recursive-doubling all-reduce",
            Kind::ReduceScatter => "reduce-scatter",
            Kind::AllGather(GatherAlgorithm::Ring) => "ring all-gather",
            Kind::AllGather(GatherAlgorithm::Bruck) => "bruck all-gather",
            Kind::Broadcast {
                algorithm: BroadcastAlgorithm::Chain,
                ..
            } => "chain broadcast",
            Kind::Broadcast {
                algorithm: BroadcastAlgorithm::BinomialTree,
                ..
            } => "tree broadcast",
            Kind::Barrier => "barrier",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_picks_recursive_doubling_for_small_buffers() {
        assert_eq!(Algorithm::choose(4 << 10, 8), Algorithm::RecursiveDoubling);
        assert_eq!(
            Algorithm::choose(SMALL_MESSAGE_BYTES_MAX_DEFAULT, 8),
            Algorithm::RecursiveDoubling
        );
        assert_eq!(
            Algorithm::choose(SMALL_MESSAGE_BYTES_MAX_DEFAULT + 1, 8),
            Algorithm::Ring
        );
        assert_eq!(Algorithm::choose(4, 1), Algorithm::Ring);
        assert_eq!(
            Algorithm::choose_with(1 << 20, 8, 1 << 20),
            Algorithm::RecursiveDoubling
        );
        let config = CollectiveConfig {
            small_message_bytes_max: 0,
            ..CollectiveConfig::default()
        };
        assert_eq!(config.all_reduce_algorithm(4, 8), Algorithm::Ring);
        assert_eq!(config.broadcast_algorithm(4, 8), BroadcastAlgorithm::Chain);
        assert_eq!(config.all_gather_algorithm(4, 8), GatherAlgorithm::Ring);
        let default = CollectiveConfig::default();
        assert_eq!(default.all_gather_algorithm(4 * 4096, 4096), GatherAlgorithm::Bruck);
        assert_eq!(default.all_gather_algorithm(8, 2), GatherAlgorithm::Ring);
        assert_eq!(default.all_gather_algorithm(1 << 20, 8), GatherAlgorithm::Ring);
        assert_eq!(
            CollectiveConfig::default().broadcast_algorithm(4, 8),
            BroadcastAlgorithm::BinomialTree
        );
    }

    #[test]
    fn config_limits_are_checked() {
        assert_eq!(CollectiveConfig::default().validate(), Ok(()));
        let zero_segment = CollectiveConfig {
            segment_elems: 0,
            ..CollectiveConfig::default()
        };
        assert!(zero_segment.validate().is_err());
        let huge_window = CollectiveConfig {
            inflight_per_peer: INFLIGHT_PER_PEER_MAX + 1,
            ..CollectiveConfig::default()
        };
        assert!(huge_window.validate().is_err());
    }
}
