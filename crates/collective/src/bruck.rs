//! Bruck all-gather: in round `k` rank `r` sends the parts it holds, its own
//! and the ones after it (`r, r+1, …`, up to `2^k` of them, modulo `n`), to
//! rank `r - 2^k`, and receives the next ones (`r+2^k, …`) from rank `r + 2^k`.
//! After ceil(log2 n) rounds every rank holds all `n` parts, for any `n`.
//!
//! Each rank sends `n - 1` parts in all, as the ring does, but in log2(n)
//! frames instead of `n - 1`: for small buffers, where the ring's hops cost
//! more than its bytes (the lengths before a compressed all-gather, say).
//!
//! Parts are [`crate::chunk_range`]s of the buffer, so the parts `first ..
//! first + count` (modulo `n`) are at most two runs of elements, cut into
//! segments as usual and numbered across both runs. Runs do not lie on one
//! grid, so the hazards are stated here ([`Program::push_after`]), and there
//! are only these: a send carries parts received in earlier rounds and waits
//! for those receives; a receive writes parts no earlier command touched, so
//! it waits for nothing.

use std::ops::Range;

use crate::error::CollectiveError;
use crate::program::{Ctx, Op, OpId, Program};
use crate::tag::{Phase, SEGMENT_LIMIT};
use crate::{Rank, RecvOp, chunk_range};

pub(crate) fn all_gather(program: &mut Program, ctx: &Ctx) -> Result<(), CollectiveError> {
    let (world, rank) = (ctx.world, ctx.rank);
    // Every receive so far, with the range it writes.
    let mut received: Vec<(OpId, Range<usize>)> = Vec::new();
    let mut after = Vec::new();
    let mut round = 0u32;
    let mut distance = 1u32;
    while distance < world {
        let count = distance.min(world - distance);
        let to = (rank + world - distance) % world;
        let from = (rank + distance) % world;
        for (segment, range) in round_segments(ctx, rank, count)?.into_iter().enumerate() {
            after.clear();
            after.extend(
                received
                    .iter()
                    .filter(|(_, r)| r.start < range.end && range.start < r.end)
                    .map(|(id, _)| *id),
            );
            let op = Op {
                peer: to,
                tag: ctx.tag(Phase::Bruck, round, segment as u32),
                range,
                recv: None,
            };
            program.push_after(ctx, op, &after)?;
        }
        for (segment, range) in round_segments(ctx, from, count)?.into_iter().enumerate() {
            let op = Op {
                peer: from,
                tag: ctx.tag(Phase::Bruck, round, segment as u32),
                range: range.clone(),
                recv: Some(RecvOp::Copy),
            };
            let id = program.push_after(ctx, op, &[])?;
            received.push((id, range));
        }
        round += 1;
        distance = distance.saturating_mul(2);
    }
    Ok(())
}

/// The segments of parts `first .. first + count` (modulo the world), in
/// order; empty parts take no segment. Sender and receiver compute the same.
fn round_segments(ctx: &Ctx, first: Rank, count: u32) -> Result<Vec<Range<usize>>, CollectiveError> {
    let (len, world) = (ctx.len, ctx.world);
    let run = |a: Rank, b: Rank| chunk_range(len, world, a).start..chunk_range(len, world, b - 1).end;
    let end = first + count;
    let runs = if end <= world {
        [run(first, end), 0..0]
    } else {
        [run(first, world), run(0, end - world)]
    };
    let mut segments = Vec::new();
    for range in runs {
        let n = ctx.segment_count(&range)?;
        segments.extend((0..n).map(|i| ctx.segment(&range, i)));
    }
    if segments.len() > SEGMENT_LIMIT as usize {
        return Err(ctx.invalid(format!(
            "a Bruck round of {} segments is over the tag's limit of {SEGMENT_LIMIT}; raise segment_elems",
            segments.len()
        )));
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::testing::{Harness, Order, TEST_OP_ID};
    use crate::{Collective, CollectiveConfig, Command, GatherAlgorithm, Kind, Phase, RecvOp, Tag, chunk_range};

    const BRUCK: Kind = Kind::AllGather(GatherAlgorithm::Bruck);
    const RING: Kind = Kind::AllGather(GatherAlgorithm::Ring);

    /// Rank `r`'s input: its own part holds `r * 1000 + i`, the rest is noise
    /// that must be overwritten.
    fn inputs(world: u32, len: usize) -> Vec<Vec<f32>> {
        (0..world)
            .map(|r| {
                let own = chunk_range(len, world, r);
                (0..len)
                    .map(|i| {
                        if own.contains(&i) {
                            (r * 1000) as f32 + i as f32
                        } else {
                            -1.0
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn expected(world: u32, len: usize) -> Vec<f32> {
        let mut out = vec![0.0; len];
        for r in 0..world {
            for i in chunk_range(len, world, r) {
                out[i] = (r * 1000) as f32 + i as f32;
            }
        }
        out
    }

    #[test]
    fn five_ranks_take_three_rounds_and_the_last_sends_one_part() {
        // Parts of 2 elements: rank 1 sends part 1 to rank 0, parts 1-2 to
        // rank 4, then part 1 alone to rank 2 (5 - 4 = 1 part left).
        let mut e = Collective::new(BRUCK, TEST_OP_ID, 1, 5, 10, &CollectiveConfig::default()).unwrap();
        let tag = |round| Tag::new(TEST_OP_ID, Phase::Bruck, round, 0);
        let sorted = |commands: Vec<Command>| {
            let mut v: Vec<String> = commands.iter().map(|c| format!("{c:?}")).collect();
            v.sort();
            v
        };
        let recv = |peer, round, range| Command::Recv {
            peer,
            tag: tag(round),
            range,
            op: RecvOp::Copy,
        };
        let send = |peer, round, range| Command::Send {
            peer,
            tag: tag(round),
            range,
        };
        assert_eq!(
            sorted(e.start()),
            sorted(vec![
                send(0, 0, 2..4),
                recv(2, 0, 4..6),
                recv(3, 1, 6..10),
                send(2, 2, 2..4),
                recv(0, 2, 0..2),
            ])
        );
        // Round 1's send carries part 2, so it waits for round 0's receive.
        let next = e.on_event(crate::Event::Received { peer: 2, tag: tag(0) }).unwrap();
        assert_eq!(next, vec![send(4, 1, 2..6)]);
    }

    #[test]
    fn a_wrapping_run_is_two_ranges_numbered_as_one_message() {
        // Parts of 2 elements in segments of 1. In round 1 rank 3 of 4 sends
        // parts 3 and 0: segments 0-1 are 6..8, segments 2-3 are 0..2, which
        // wait for round 0's receive of part 0 from rank 0.
        let config = CollectiveConfig {
            segment_elems: 1,
            ..CollectiveConfig::default()
        };
        let mut h = Harness::all_ranks(BRUCK, 4, &config, inputs(4, 8)).unwrap();
        h.run(Order::Fifo).unwrap();
        for rank in 0..4 {
            assert_eq!(h.buffer(rank), &expected(4, 8)[..], "rank {rank}");
        }
        let mut e = Collective::new(BRUCK, TEST_OP_ID, 3, 4, 8, &config).unwrap();
        let tag = |round, segment| Tag::new(TEST_OP_ID, Phase::Bruck, round, segment);
        let sends = |commands: Vec<Command>| {
            let mut v: Vec<(u32, Tag, std::ops::Range<usize>)> = commands
                .into_iter()
                .filter_map(|c| match c {
                    Command::Send { peer, tag, range } => Some((peer, tag, range)),
                    _ => None,
                })
                .collect();
            v.sort_by_key(|(peer, tag, _)| (*peer, tag.to_u64()));
            v
        };
        assert_eq!(
            sends(e.start()),
            vec![
                (1, tag(1, 0), 6..7),
                (1, tag(1, 1), 7..8),
                (2, tag(0, 0), 6..7),
                (2, tag(0, 1), 7..8)
            ]
        );
        let received = |segment| crate::Event::Received {
            peer: 0,
            tag: tag(0, segment),
        };
        assert_eq!(sends(e.on_event(received(0)).unwrap()), vec![(1, tag(1, 2), 0..1)]);
        assert_eq!(sends(e.on_event(received(1)).unwrap()), vec![(1, tag(1, 3), 1..2)]);
    }

    #[test]
    fn bruck_sends_log2_frames_where_the_ring_sends_n_minus_1() {
        let world = 64;
        let mut bruck = Harness::all_ranks(BRUCK, world, &CollectiveConfig::default(), inputs(world, 256)).unwrap();
        bruck.run(Order::Fifo).unwrap();
        let mut ring = Harness::all_ranks(RING, world, &CollectiveConfig::default(), inputs(world, 256)).unwrap();
        ring.run(Order::Fifo).unwrap();
        // Six rounds; a round whose parts wrap past the last one is two frames.
        for (rank, (b, r)) in bruck.stats().iter().zip(ring.stats()).enumerate() {
            assert!(
                (6..=12).contains(&b.frames_sent),
                "rank {rank}: {} frames",
                b.frames_sent
            );
            assert_eq!(b.elems_sent, 252, "rank {rank}");
            assert_eq!((r.frames_sent, r.elems_sent), (63, 252));
        }
        assert_eq!(bruck.stats()[0].frames_sent, 6);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn bruck_gathers_every_part_on_every_rank(
            world in 1..=13u32, len in 0..400usize, segment_elems in 1..64usize,
            in_flight in 1..6usize, seed in any::<u64>(),
        ) {
            let config = CollectiveConfig { segment_elems, inflight_per_peer: in_flight, ..CollectiveConfig::default() };
            let mut h = Harness::all_ranks(BRUCK, world, &config, inputs(world, len)).unwrap();
            h.run(Order::Random { seed }).unwrap();
            for rank in 0..world {
                prop_assert_eq!(h.buffer(rank), &expected(world, len)[..], "rank {}", rank);
            }
            prop_assert!(h.in_flight_max() <= in_flight);
        }
    }
}
