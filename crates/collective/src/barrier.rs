//! Dissemination barrier: in round `k` rank `r` sends an empty frame to
//! `r + 2^k` and waits for one from `r - 2^k`, and only then starts round
//! `k + 1`. After ceil(log2 n) rounds every rank has heard, through some
//! chain, from every other, so none finishes before all have started.

use crate::RecvOp;
use crate::error::CollectiveError;
use crate::program::{Ctx, Program};
use crate::tag::Phase;

pub(crate) fn barrier(program: &mut Program, ctx: &Ctx) -> Result<(), CollectiveError> {
    let (world, rank) = (ctx.world, ctx.rank);
    let rounds = if world == 1 {
        0
    } else {
        32 - (world - 1).leading_zeros()
    };
    let mut received = Vec::new();
    for round in 0..rounds {
        let distance = 1 << round;
        let tag = ctx.tag(Phase::Barrier, round, 0);
        let send = program.send(ctx, (rank + distance) % world, tag, 0..0)?;
        // A round's frame says "I have heard from everyone the earlier rounds
        // reach": it waits for every earlier receive. Empty ranges carry no
        // data hazard, so the order is explicit.
        for &recv in &received {
            program.order(recv, send);
        }
        received.push(program.recv(ctx, (rank + world - distance) % world, tag, 0..0, RecvOp::Copy)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::testing::{Harness, HarnessError, Order, TEST_OP_ID};
    use crate::{Collective, CollectiveConfig, Command, Event, Kind, Phase, RecvOp, Tag};

    fn engines(world: u32) -> Vec<Collective> {
        (0..world)
            .map(|rank| {
                Collective::new(Kind::Barrier, TEST_OP_ID, rank, world, 0, &CollectiveConfig::default()).unwrap()
            })
            .collect()
    }

    #[test]
    fn rounds_wait_for_the_previous_round() {
        let mut e = Collective::new(Kind::Barrier, TEST_OP_ID, 0, 5, 0, &CollectiveConfig::default()).unwrap();
        let tag = |round| Tag::new(TEST_OP_ID, Phase::Barrier, round, 0);
        let recv = |peer, round| Command::Recv {
            peer,
            tag: tag(round),
            range: 0..0,
            op: RecvOp::Copy,
        };
        let send = |peer, round| Command::Send {
            peer,
            tag: tag(round),
            range: 0..0,
        };
        // Every receive is posted at once; each round's send waits for all earlier rounds' receives.
        assert_eq!(e.start(), vec![recv(1, 2), recv(3, 1), recv(4, 0), send(1, 0)]);
        assert_eq!(e.on_event(Event::Received { peer: 3, tag: tag(1) }).unwrap(), vec![]);
        assert_eq!(
            e.on_event(Event::Received { peer: 4, tag: tag(0) }).unwrap(),
            vec![send(2, 1), send(4, 2)]
        );
        assert_eq!(e.on_event(Event::Sent { peer: 1, tag: tag(0) }).unwrap(), vec![]);
    }

    #[test]
    fn a_barrier_with_len_is_invalid() {
        assert!(Collective::new(Kind::Barrier, TEST_OP_ID, 0, 2, 1, &CollectiveConfig::default()).is_err());
    }

    proptest! {
        #[test]
        fn barrier_completes_on_every_rank(world in 1..=9u32, seed in any::<u64>()) {
            let mut h = Harness::new(engines(world), vec![Vec::new(); world as usize]);
            h.run(Order::Random { seed }).unwrap();
            let frames: Vec<usize> = h.stats().iter().map(|s| s.frames_sent).collect();
            let rounds = if world == 1 { 0 } else { (world - 1).ilog2() as usize + 1 };
            prop_assert_eq!(frames, vec![rounds; world as usize]);
        }

        /// A rank that never arrives holds every other rank in the barrier.
        #[test]
        fn no_rank_passes_before_all_arrive(world in 2..=9u32, late_seed in any::<u32>(), seed in any::<u64>()) {
            let late = late_seed % world;
            let mut h = Harness::new(engines(world), vec![Vec::new(); world as usize]);
            h.hold(late);
            let err = h.run(Order::Random { seed }).unwrap_err();
            let HarnessError::Stalled { ranks } = err else { panic!("{err}") };
            prop_assert_eq!(ranks.len(), world as usize);
        }
    }
}
