//! Recursive-doubling all-reduce: in round `k` every rank swaps its whole
//! buffer with the rank whose (virtual) index differs in bit `k` and adds
//! what it got, so after log2(p) rounds everyone holds the sum. For small
//! buffers, where the 2(n-1) steps of the ring cost more than the bytes.
//!
//! With `n = p + surplus` ranks, `p` the largest power of two, the ranks
//! below `2 * surplus` pair up first: each even one folds its buffer into the
//! odd one above it and sits out; the odd one takes virtual index `r / 2`,
//! the ranks from `2 * surplus` on take `r - surplus`. At the end the odd
//! ones hand the result back. Partners add the same two values in opposite
//! order, which IEEE addition makes bit-identical, so every rank ends with
//! the same bits.

use crate::RecvOp;
use crate::error::CollectiveError;
use crate::program::{Ctx, Program};
use crate::tag::Phase;

pub(crate) fn all_reduce(program: &mut Program, ctx: &Ctx) -> Result<(), CollectiveError> {
    let (world, rank) = (ctx.world, ctx.rank);
    let pow = 1u32 << (31 - world.leading_zeros());
    let surplus = world - pow;
    let segments = ctx.segments(0..ctx.len)?;

    if rank < 2 * surplus && rank % 2 == 0 {
        let partner = rank + 1;
        for (segment, range) in &segments {
            program.send(ctx, partner, ctx.tag(Phase::FoldIn, 0, *segment), range.clone())?;
        }
        for (segment, range) in &segments {
            program.recv(
                ctx,
                partner,
                ctx.tag(Phase::FoldOut, 0, *segment),
                range.clone(),
                RecvOp::Copy,
            )?;
        }
        return Ok(());
    }

    let folded = rank < 2 * surplus;
    if folded {
        for (segment, range) in &segments {
            program.recv(
                ctx,
                rank - 1,
                ctx.tag(Phase::FoldIn, 0, *segment),
                range.clone(),
                RecvOp::Reduce,
            )?;
        }
    }
    let virtual_rank = if folded { rank / 2 } else { rank - surplus };
    let real = |v: u32| if v < surplus { 2 * v + 1 } else { v + surplus };
    let mut round = 0;
    while 1 << round < pow {
        let partner = real(virtual_rank ^ (1 << round));
        for (segment, range) in &segments {
            // Send first: the receive adds into the range this send reads.
            let tag = ctx.tag(Phase::Exchange, round, *segment);
            program.send(ctx, partner, tag, range.clone())?;
            program.recv(ctx, partner, tag, range.clone(), RecvOp::Reduce)?;
        }
        round += 1;
    }
    if folded {
        for (segment, range) in &segments {
            program.send(ctx, rank - 1, ctx.tag(Phase::FoldOut, 0, *segment), range.clone())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::testing::{Harness, Order, TEST_OP_ID, integer_inputs, sum};
    use crate::{Algorithm, Collective, CollectiveConfig, Command, Event, Kind, Phase, RecvOp, Tag};

    const RD: Kind = Kind::AllReduce(Algorithm::RecursiveDoubling);

    fn tag(phase: Phase, step: u32) -> Tag {
        Tag::new(TEST_OP_ID, phase, step, 0)
    }

    #[test]
    fn three_ranks_fold_exchange_and_unfold() {
        let config = CollectiveConfig::default();
        // Rank 0 folds into rank 1 and waits for the result.
        let mut e = Collective::new(RD, TEST_OP_ID, 0, 3, 2, &config).unwrap();
        assert_eq!(
            e.start(),
            vec![Command::Send {
                peer: 1,
                tag: tag(Phase::FoldIn, 0),
                range: 0..2
            }]
        );
        assert_eq!(
            e.on_event(Event::Sent {
                peer: 1,
                tag: tag(Phase::FoldIn, 0)
            })
            .unwrap(),
            vec![Command::Recv {
                peer: 1,
                tag: tag(Phase::FoldOut, 0),
                range: 0..2,
                op: RecvOp::Copy
            }]
        );
        assert_eq!(
            e.on_event(Event::Received {
                peer: 1,
                tag: tag(Phase::FoldOut, 0)
            })
            .unwrap(),
            vec![Command::Done]
        );

        // Rank 1 adds rank 0's buffer, swaps with rank 2, then hands the sum back.
        let mut e = Collective::new(RD, TEST_OP_ID, 1, 3, 2, &config).unwrap();
        let exchange = tag(Phase::Exchange, 0);
        assert_eq!(
            e.start(),
            vec![Command::Recv {
                peer: 0,
                tag: tag(Phase::FoldIn, 0),
                range: 0..2,
                op: RecvOp::Reduce
            }]
        );
        assert_eq!(
            e.on_event(Event::Received {
                peer: 0,
                tag: tag(Phase::FoldIn, 0)
            })
            .unwrap(),
            vec![Command::Send {
                peer: 2,
                tag: exchange,
                range: 0..2
            }]
        );
        // The exchange receive adds into what is being sent: it waits for the send.
        assert_eq!(
            e.on_event(Event::Sent { peer: 2, tag: exchange }).unwrap(),
            vec![Command::Recv {
                peer: 2,
                tag: exchange,
                range: 0..2,
                op: RecvOp::Reduce
            }]
        );
        assert_eq!(
            e.on_event(Event::Received { peer: 2, tag: exchange }).unwrap(),
            vec![Command::Send {
                peer: 0,
                tag: tag(Phase::FoldOut, 0),
                range: 0..2
            }]
        );
        assert_eq!(
            e.on_event(Event::Sent {
                peer: 0,
                tag: tag(Phase::FoldOut, 0)
            })
            .unwrap(),
            vec![Command::Done]
        );
    }

    #[test]
    fn power_of_two_ranks_swap_log2_times() {
        let inputs = integer_inputs(8, 100, 3);
        let mut h = Harness::all_ranks(RD, 8, &CollectiveConfig::default(), inputs).unwrap();
        h.run(Order::Fifo).unwrap();
        for stats in h.stats() {
            assert_eq!((stats.frames_sent, stats.elems_sent), (3, 300));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn recursive_doubling_equals_the_sequential_sum(
            world in 1..=9u32, len in 0..5000usize, segment_elems in 1..2000usize,
            in_flight in 1..6usize, seed in any::<u64>(),
        ) {
            let config = CollectiveConfig { segment_elems, inflight_per_peer: in_flight, ..CollectiveConfig::default() };
            let inputs = integer_inputs(world, len, seed);
            let expected = sum(&inputs);
            let mut h = Harness::all_ranks(RD, world, &config, inputs).unwrap();
            h.run(Order::Random { seed }).unwrap();
            for rank in 0..world {
                prop_assert_eq!(h.buffer(rank), &expected[..], "rank {}", rank);
            }
            prop_assert!(h.in_flight_max() <= in_flight);
        }

        /// With arbitrary floats the sum depends on the order, but every rank
        /// must still end with the same bits, or replicas drift apart.
        #[test]
        fn every_rank_ends_with_the_same_bits(
            world in 1..=9u32, len in 0..300usize, segment_elems in 1..100usize,
            ring in any::<bool>(), seed in any::<u64>(),
        ) {
            let config = CollectiveConfig { segment_elems, ..CollectiveConfig::default() };
            let mut rng = tensor::Rng::new(seed);
            let inputs: Vec<Vec<f32>> = (0..world).map(|_| (0..len).map(|_| rng.normal() as f32 * 1e3).collect()).collect();
            let algorithm = if ring { Algorithm::Ring } else { Algorithm::RecursiveDoubling };
            let mut h = Harness::all_ranks(Kind::AllReduce(algorithm), world, &config, inputs).unwrap();
            h.run(Order::Random { seed }).unwrap();
            let bits = |rank| h.buffer(rank).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for rank in 1..world {
                prop_assert_eq!(bits(rank), bits(0), "rank {}", rank);
            }
        }
    }
}
