//! Ring reduce-scatter and all-gather, and the ring all-reduce that runs one
//! after the other; each rank sends to `rank + 1` and receives from `rank - 1`.
//!
//! The buffer is cut into `world` chunks ([`tensor::shard_ranges`]) and each
//! chunk into segments. Reduce-scatter step `s`: send chunk `r - s - 1`,
//! receive chunk `r - s - 2` and add it in; after `n - 1` steps rank `r` holds
//! the sum of chunk `r`. All-gather step `s`: send chunk `r - s`, receive chunk
//! `r - s - 1` and copy it. Each rank sends `2 (n - 1) / n` of the buffer in
//! all, the least any all-reduce can; segments let step `s + 1` of one
//! segment overlap step `s` of the next.

use std::ops::Range;

use crate::RecvOp;
use crate::error::CollectiveError;
use crate::program::{Ctx, Program};
use crate::tag::Phase;

struct Ring {
    world: u32,
    rank: u32,
    left: u32,
    right: u32,
    chunks: Vec<Range<usize>>,
}

impl Ring {
    fn new(ctx: &Ctx) -> Ring {
        let world = ctx.world;
        Ring {
            world,
            rank: ctx.rank,
            left: (ctx.rank + world - 1) % world,
            right: (ctx.rank + 1) % world,
            chunks: tensor::shard_ranges(ctx.len, world as usize),
        }
    }

    /// Chunk `rank - back`, modulo the world size.
    fn chunk_back(&self, back: u32) -> Range<usize> {
        let index = (self.rank + self.world - back % self.world) % self.world;
        self.chunks[index as usize].clone()
    }
}

pub(crate) fn reduce_scatter(program: &mut Program, ctx: &Ctx) -> Result<(), CollectiveError> {
    let ring = Ring::new(ctx);
    for step in 0..ctx.world - 1 {
        let tag = |segment| ctx.tag(Phase::ReduceScatter, step, segment);
        for (segment, range) in ctx.segments(ring.chunk_back(step + 2))? {
            program.recv(ctx, ring.left, tag(segment), range, RecvOp::Reduce)?;
        }
        for (segment, range) in ctx.segments(ring.chunk_back(step + 1))? {
            program.send(ctx, ring.right, tag(segment), range)?;
        }
    }
    Ok(())
}

pub(crate) fn all_gather(program: &mut Program, ctx: &Ctx) -> Result<(), CollectiveError> {
    let ring = Ring::new(ctx);
    for step in 0..ctx.world - 1 {
        let tag = |segment| ctx.tag(Phase::AllGather, step, segment);
        for (segment, range) in ctx.segments(ring.chunk_back(step + 1))? {
            program.recv(ctx, ring.left, tag(segment), range, RecvOp::Copy)?;
        }
        for (segment, range) in ctx.segments(ring.chunk_back(step))? {
            program.send(ctx, ring.right, tag(segment), range)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::testing::{Harness, Order, integer_inputs, sum};
    use crate::{Algorithm, Collective, CollectiveConfig, Command, Event, Kind, Phase, RecvOp, Tag, chunk_range};

    const OP: u32 = crate::testing::TEST_OP_ID;

    fn config(segment_elems: usize) -> CollectiveConfig {
        CollectiveConfig {
            segment_elems,
            ..CollectiveConfig::default()
        }
    }

    fn tag(phase: Phase, step: u32, segment: u32) -> Tag {
        Tag::new(OP, phase, step, segment)
    }

    fn send(peer: u32, phase: Phase, step: u32, range: std::ops::Range<usize>) -> Command {
        Command::Send {
            peer,
            tag: tag(phase, step, 0),
            range,
        }
    }

    fn recv(peer: u32, phase: Phase, step: u32, range: std::ops::Range<usize>, op: RecvOp) -> Command {
        Command::Recv {
            peer,
            tag: tag(phase, step, 0),
            range,
            op,
        }
    }

    fn sent(peer: u32, phase: Phase, step: u32) -> Event {
        Event::Sent {
            peer,
            tag: tag(phase, step, 0),
        }
    }

    fn received(peer: u32, phase: Phase, step: u32) -> Event {
        Event::Received {
            peer,
            tag: tag(phase, step, 0),
        }
    }

    use Phase::{AllGather as AG, ReduceScatter as RS};
    use RecvOp::{Copy, Reduce};

    #[test]
    fn two_ranks_exact_commands() {
        // Chunks 0..2 and 2..4, one segment each. Rank 0 sends chunk 1 and
        // keeps the sum of chunk 0, then sends chunk 0 and receives chunk 1.
        let mut e = Collective::new(Kind::AllReduce(Algorithm::Ring), OP, 0, 2, 4, &config(2)).unwrap();
        assert_eq!(e.start(), vec![recv(1, RS, 0, 0..2, Reduce), send(1, RS, 0, 2..4)]);
        // The all-gather receive overwrites chunk 1, so it waits until chunk 1 is sent.
        assert_eq!(e.on_event(received(1, RS, 0)).unwrap(), vec![send(1, AG, 0, 0..2)]);
        assert_eq!(e.on_event(sent(1, RS, 0)).unwrap(), vec![recv(1, AG, 0, 2..4, Copy)]);
        assert_eq!(e.waiting_on(), vec![(1, tag(AG, 0, 0))]);
        assert_eq!(e.on_event(sent(1, AG, 0)).unwrap(), vec![]);
        assert!(!e.is_done());
        assert_eq!(e.on_event(received(1, AG, 0)).unwrap(), vec![Command::Done]);
        assert!(e.is_done());
        assert_eq!(e.waiting_on(), vec![]);
    }

    #[test]
    fn three_ranks_exact_commands() {
        // Rank 1 of 3 on 3 elements: chunk c is c..c+1; left is 0, right is 2.
        let mut e = Collective::new(Kind::AllReduce(Algorithm::Ring), OP, 1, 3, 3, &config(4)).unwrap();
        assert_eq!(
            e.start(),
            vec![
                recv(0, RS, 0, 2..3, Reduce),
                recv(0, RS, 1, 1..2, Reduce),
                send(2, RS, 0, 0..1)
            ]
        );
        // Step 1 sends what step 0 reduced.
        assert_eq!(e.on_event(received(0, RS, 0)).unwrap(), vec![send(2, RS, 1, 2..3)]);
        // Chunk 1 is now reduced: the all-gather starts with it.
        assert_eq!(e.on_event(received(0, RS, 1)).unwrap(), vec![send(2, AG, 0, 1..2)]);
        // All-gather step 0 overwrites chunk 0, which reduce-scatter step 0 sent.
        assert_eq!(e.on_event(sent(2, RS, 0)).unwrap(), vec![recv(0, AG, 0, 0..1, Copy)]);
        // Step 1 overwrites chunk 2: it waits for that send.
        assert_eq!(e.on_event(sent(2, RS, 1)).unwrap(), vec![recv(0, AG, 1, 2..3, Copy)]);
        assert_eq!(e.on_event(received(0, AG, 0)).unwrap(), vec![send(2, AG, 1, 0..1)]);
        assert_eq!(e.on_event(sent(2, AG, 0)).unwrap(), vec![]);
        assert_eq!(e.on_event(received(0, AG, 1)).unwrap(), vec![]);
        assert_eq!(e.on_event(sent(2, AG, 1)).unwrap(), vec![Command::Done]);
    }

    #[test]
    fn segments_pipeline_up_to_the_in_flight_bound() {
        // Rank 0 of 2, 20 elements, chunks of 10 in segments of 2: 5 segments per chunk.
        let config = CollectiveConfig {
            segment_elems: 2,
            inflight_per_peer: 3,
            ..CollectiveConfig::default()
        };
        let mut e = Collective::new(Kind::AllReduce(Algorithm::Ring), OP, 0, 2, 20, &config).unwrap();
        let seg = |segment| Tag::new(OP, RS, 0, segment);
        let first = e.start();
        assert_eq!(
            first,
            vec![
                Command::Recv {
                    peer: 1,
                    tag: seg(0),
                    range: 0..2,
                    op: Reduce
                },
                Command::Recv {
                    peer: 1,
                    tag: seg(1),
                    range: 2..4,
                    op: Reduce
                },
                Command::Recv {
                    peer: 1,
                    tag: seg(2),
                    range: 4..6,
                    op: Reduce
                },
                Command::Send {
                    peer: 1,
                    tag: seg(0),
                    range: 10..12
                },
                Command::Send {
                    peer: 1,
                    tag: seg(1),
                    range: 12..14
                },
                Command::Send {
                    peer: 1,
                    tag: seg(2),
                    range: 14..16
                },
            ]
        );
        // A completed send frees one slot: exactly one more send goes out.
        assert_eq!(
            e.on_event(Event::Sent { peer: 1, tag: seg(0) }).unwrap(),
            vec![Command::Send {
                peer: 1,
                tag: seg(3),
                range: 16..18
            }]
        );
        // A completed receive frees a receive slot; sends are still at the bound.
        assert_eq!(
            e.on_event(Event::Received { peer: 1, tag: seg(0) }).unwrap(),
            vec![Command::Recv {
                peer: 1,
                tag: seg(3),
                range: 6..8,
                op: Reduce
            }]
        );
        assert_eq!(
            e.on_event(Event::Sent { peer: 1, tag: seg(1) }).unwrap(),
            vec![Command::Send {
                peer: 1,
                tag: seg(4),
                range: 18..20
            }]
        );
        // The first all-gather send carries segment 0, reduced above.
        assert_eq!(
            e.on_event(Event::Sent { peer: 1, tag: seg(2) }).unwrap(),
            vec![Command::Send {
                peer: 1,
                tag: Tag::new(OP, AG, 0, 0),
                range: 0..2
            }]
        );
        // Segment 1 is not reduced yet, so the next all-gather send waits although a slot is free.
        assert_eq!(e.on_event(Event::Sent { peer: 1, tag: seg(3) }).unwrap(), vec![]);
    }

    #[test]
    fn bad_events_are_errors_and_change_nothing() {
        let mut e = Collective::new(Kind::AllReduce(Algorithm::Ring), OP, 0, 2, 4, &config(2)).unwrap();
        assert!(e.on_event(sent(1, RS, 0)).is_err(), "before start");
        e.start();
        let unknown = [
            Event::Received {
                peer: 1,
                tag: Tag::new(OP + 1, RS, 0, 0),
            },
            Event::Received {
                peer: 1,
                tag: tag(RS, 1, 0),
            },
            Event::Received {
                peer: 1,
                tag: Tag::new(OP, Phase::Exchange, 0, 0),
            },
            sent(0, RS, 0),
        ];
        for event in unknown {
            let err = e.on_event(event).unwrap_err();
            assert!(
                matches!(err, crate::CollectiveError::UnknownTag { .. }),
                "{event:?}: {err}"
            );
        }
        // The all-gather receive exists but has not been issued yet.
        assert!(matches!(
            e.on_event(received(1, AG, 0)),
            Err(crate::CollectiveError::NotIssued { .. })
        ));
        assert_eq!(e.on_event(received(1, RS, 0)).unwrap(), vec![send(1, AG, 0, 0..2)]);
        let err = e.on_event(received(1, RS, 0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rank 0: duplicate receive completion for op 9 reduce-scatter step 0 segment 0 with peer 1"
        );
        assert_eq!(e.waiting_on(), vec![]);
    }

    #[test]
    fn degenerate_sizes_finish_at_once_or_skip_empty_chunks() {
        for (world, len) in [(1, 0), (1, 7), (4, 0)] {
            let mut e = Collective::new(Kind::AllReduce(Algorithm::Ring), OP, 0, world, len, &config(2)).unwrap();
            assert_eq!(e.start(), vec![Command::Done], "world {world} len {len}");
        }
        // 2 elements over 4 ranks: chunks 2 and 3 are empty and never sent.
        let mut h =
            Harness::all_ranks(Kind::AllReduce(Algorithm::Ring), 4, &config(1), integer_inputs(4, 2, 1)).unwrap();
        h.run(Order::Fifo).unwrap();
        let frames: usize = h.stats().iter().map(|s| s.frames_sent).sum();
        assert_eq!(
            frames,
            2 * 3 * 2,
            "each non-empty chunk travels n - 1 times in each phase"
        );
    }

    #[test]
    fn every_send_follows_the_receives_it_forwards() {
        let world = 4;
        let mut h = Harness::all_ranks(
            Kind::AllReduce(Algorithm::Ring),
            world,
            &config(3),
            integer_inputs(world, 40, 3),
        )
        .unwrap();
        h.run(Order::Random { seed: 5 }).unwrap();
        for rank in 0..world {
            for (at, command) in h.issued(rank) {
                let Command::Send { tag, .. } = command else { continue };
                // Reduce-scatter step s > 0 forwards what step s - 1 reduced; all-gather step 0
                // sends what the last reduce-scatter step reduced; all-gather step s > 0 forwards
                // what step s - 1 copied.
                let needs = match (tag.phase(), tag.step()) {
                    (Phase::ReduceScatter, 0) => continue,
                    (Phase::ReduceScatter, s) => Tag::new(OP, RS, s - 1, tag.segment()),
                    (Phase::AllGather, 0) => Tag::new(OP, RS, world - 2, tag.segment()),
                    (Phase::AllGather, s) => Tag::new(OP, AG, s - 1, tag.segment()),
                    _ => unreachable!(),
                };
                let left = (rank + world - 1) % world;
                let done_at = h.completed_at(rank, Event::Received { peer: left, tag: needs });
                assert!(
                    done_at.is_some_and(|t| t < at),
                    "rank {rank}: {tag} issued before {needs} completed"
                );
            }
        }
    }

    #[test]
    fn withheld_frame_is_named_by_waiting_on() {
        let world = 3;
        let mut h = Harness::all_ranks(
            Kind::AllReduce(Algorithm::Ring),
            world,
            &config(4),
            integer_inputs(world, 9, 1),
        )
        .unwrap();
        h.block_link(2, 0);
        let err = h.run(Order::Fifo).unwrap_err();
        let crate::testing::HarnessError::Stalled { ranks } = err else {
            panic!("{err}")
        };
        assert_eq!(ranks.iter().map(|s| s.rank).collect::<Vec<_>>(), vec![0, 1, 2]);
        // Rank 0 waits on the blocked link; rank 1 on data rank 0 can no longer forward.
        assert_eq!(ranks[0].receiving_from[0], (2, Tag::new(OP, RS, 0, 0)));
        assert_eq!(ranks[1].receiving_from[0], (0, Tag::new(OP, RS, 1, 0)));
        for stalled in &ranks[..2] {
            let left = (stalled.rank + world - 1) % world;
            assert!(
                stalled.receiving_from.iter().all(|(peer, _)| *peer == left),
                "{stalled:?}"
            );
        }
        // Rank 2 has everything it needs but cannot hand its first frame to rank 0.
        assert_eq!(ranks[2].sending_to[0], (0, Tag::new(OP, RS, 0, 0)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn all_reduce_equals_the_sequential_sum(
            world in 1..=9u32, len in 0..5000usize, segment_elems in 1..400usize,
            in_flight in 1..6usize, seed in any::<u64>(),
        ) {
            let config = CollectiveConfig { segment_elems, inflight_per_peer: in_flight, ..CollectiveConfig::default() };
            let inputs = integer_inputs(world, len, seed);
            let expected = sum(&inputs);
            let mut h = Harness::all_ranks(Kind::AllReduce(Algorithm::Ring), world, &config, inputs).unwrap();
            h.run(Order::Random { seed }).unwrap();
            for rank in 0..world {
                prop_assert_eq!(h.buffer(rank), &expected[..], "rank {}", rank);
            }
            prop_assert!(h.in_flight_max() <= in_flight);
            // Bandwidth-optimal volume: rank r sends every chunk but r in reduce-scatter and
            // every chunk but r + 1 in all-gather, 2 (n - 1) / n of the buffer to within 2 elements.
            for (rank, stats) in (0..world).zip(h.stats()) {
                let own = chunk_range(len, world, rank).len() + chunk_range(len, world, (rank + 1) % world).len();
                let elems = if world == 1 { 0 } else { 2 * len - own };
                prop_assert_eq!(stats.elems_sent, elems);
                prop_assert_eq!(stats.bytes_sent(), 4 * elems);
                let ideal = 2.0 * f64::from(world - 1) / f64::from(world) * len as f64;
                prop_assert!((stats.elems_sent as f64 - ideal).abs() < 2.0);
                let segments = |c| chunk_range(len, world, c).len().div_ceil(segment_elems);
                let all: usize = (0..world).map(segments).sum();
                let frames = if world == 1 { 0 } else { 2 * all - segments(rank) - segments((rank + 1) % world) };
                prop_assert_eq!(stats.frames_sent, frames);
            }
        }

        #[test]
        fn reduce_scatter_leaves_each_rank_its_chunk_sum(
            world in 1..=9u32, len in 0..5000usize, segment_elems in 1..400usize, seed in any::<u64>(),
        ) {
            let config = config(segment_elems);
            let inputs = integer_inputs(world, len, seed);
            let expected = sum(&inputs);
            let mut h = Harness::all_ranks(Kind::ReduceScatter, world, &config, inputs).unwrap();
            h.run(Order::Random { seed }).unwrap();
            for rank in 0..world {
                let chunk = chunk_range(len, world, rank);
                prop_assert_eq!(&h.buffer(rank)[chunk.clone()], &expected[chunk], "rank {}", rank);
            }
        }

        #[test]
        fn all_gather_gives_every_rank_every_chunk(
            world in 1..=9u32, len in 0..5000usize, segment_elems in 1..400usize, seed in any::<u64>(),
        ) {
            let config = config(segment_elems);
            let mut inputs = integer_inputs(world, len, seed);
            let mut expected = vec![0.0; len];
            for rank in 0..world {
                let chunk = chunk_range(len, world, rank);
                expected[chunk.clone()].copy_from_slice(&inputs[rank as usize][chunk.clone()]);
                // Garbage outside the own chunk must be overwritten.
                for (i, x) in inputs[rank as usize].iter_mut().enumerate() {
                    if !chunk.contains(&i) { *x = -1.0; }
                }
            }
            let mut h = Harness::all_ranks(Kind::AllGather, world, &config, inputs).unwrap();
            h.run(Order::Random { seed }).unwrap();
            for rank in 0..world {
                prop_assert_eq!(h.buffer(rank), &expected[..], "rank {}", rank);
            }
        }
    }
}
