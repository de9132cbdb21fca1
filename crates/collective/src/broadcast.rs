//! Broadcast from a root, as a pipelined chain or a binomial tree; ranks are
//! numbered relative to the root (`v = rank - root`), segments flow down as
//! soon as they arrive.
//!
//! Chain: `v` receives from `v - 1` and forwards to `v + 1`. Tree: `v`
//! receives from `v` with its highest bit cleared and forwards to `v + 2^k`
//! for every `2^k > v` below the world size, the largest subtree first; the
//! tag's step is `k`, the level of the receiving rank.

use crate::config::BroadcastAlgorithm;
use crate::error::CollectiveError;
use crate::program::{Ctx, Program};
use crate::tag::Phase;
use crate::{Rank, RecvOp};

/// A relative rank and the tag step of frames between it and this rank.
type Hop = (u32, u32);

pub(crate) fn broadcast(
    program: &mut Program,
    ctx: &Ctx,
    root: Rank,
    algorithm: BroadcastAlgorithm,
) -> Result<(), CollectiveError> {
    let world = ctx.world;
    let v = (ctx.rank + world - root) % world;
    let real = |v: u32| (v + root) % world;
    let segments = ctx.segments(0..ctx.len)?;
    // (relative rank, level) to receive from and to send to.
    let (parent, children, phase): (Option<Hop>, Vec<Hop>, Phase) = match algorithm {
        BroadcastAlgorithm::Chain => {
            let parent = (v > 0).then(|| (v - 1, 0));
            let child = (v + 1 < world).then_some((v + 1, 0));
            (parent, child.into_iter().collect(), Phase::BroadcastChain)
        }
        BroadcastAlgorithm::BinomialTree => {
            let high_bit = |v: u32| 31 - v.leading_zeros();
            let parent = (v > 0).then(|| (v - (1 << high_bit(v)), high_bit(v)));
            let first = if v == 0 { 0 } else { high_bit(v) + 1 };
            let children = (first..32)
                .rev()
                .filter(|&k| u64::from(v) + (1u64 << k) < u64::from(world))
                .map(|k| (v + (1 << k), k));
            (parent, children.collect(), Phase::BroadcastTree)
        }
    };
    for (segment, range) in segments {
        if let Some((p, level)) = parent {
            program.recv(
                ctx,
                real(p),
                ctx.tag(phase, level, segment),
                range.clone(),
                RecvOp::Copy,
            )?;
        }
        for &(c, level) in &children {
            program.send(ctx, real(c), ctx.tag(phase, level, segment), range.clone())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::testing::{Harness, Order, TEST_OP_ID, integer_inputs};
    use crate::{BroadcastAlgorithm, Collective, CollectiveConfig, Command, Kind, Phase, Tag};

    #[test]
    fn tree_root_sends_to_the_largest_subtree_first() {
        // Root 2 of 6: relative ranks 1, 2, 4 are real 3, 4, 0.
        let kind = Kind::Broadcast {
            root: 2,
            algorithm: BroadcastAlgorithm::BinomialTree,
        };
        let mut e = Collective::new(kind, TEST_OP_ID, 2, 6, 3, &CollectiveConfig::default()).unwrap();
        let send = |peer, level| Command::Send {
            peer,
            tag: Tag::new(TEST_OP_ID, Phase::BroadcastTree, level, 0),
            range: 0..3,
        };
        // Lanes come out in peer order.
        assert_eq!(e.start(), vec![send(0, 2), send(3, 0), send(4, 1)]);
    }

    #[test]
    fn chain_sends_each_segment_on_as_it_arrives() {
        let config = CollectiveConfig {
            segment_elems: 10,
            ..CollectiveConfig::default()
        };
        let kind = Kind::Broadcast {
            root: 0,
            algorithm: BroadcastAlgorithm::Chain,
        };
        let mut h = Harness::all_ranks(kind, 4, &config, integer_inputs(4, 95, 1)).unwrap();
        h.run(Order::Fifo).unwrap();
        let frames: Vec<usize> = h.stats().iter().map(|s| s.frames_sent).collect();
        assert_eq!(frames, vec![10, 10, 10, 0]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn every_rank_ends_with_the_root_buffer(
            world in 1..=9u32, root_seed in any::<u32>(), len in 0..5000usize, segment_elems in 1..400usize,
            tree in any::<bool>(), in_flight in 1..6usize, seed in any::<u64>(),
        ) {
            let root = root_seed % world;
            let algorithm = if tree { BroadcastAlgorithm::BinomialTree } else { BroadcastAlgorithm::Chain };
            let config = CollectiveConfig { segment_elems, inflight_per_peer: in_flight, ..CollectiveConfig::default() };
            let inputs = integer_inputs(world, len, seed);
            let expected = inputs[root as usize].clone();
            let mut h = Harness::all_ranks(Kind::Broadcast { root, algorithm }, world, &config, inputs).unwrap();
            h.run(Order::Random { seed }).unwrap();
            for rank in 0..world {
                prop_assert_eq!(h.buffer(rank), &expected[..], "rank {}", rank);
            }
            // Every rank but the root receives the buffer exactly once.
            let received: usize = h.stats().iter().map(|s| s.elems_received).sum();
            prop_assert_eq!(received, (world as usize - 1) * len);
        }
    }
}
