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
//!
//! The ring's program has 4 (n - 1) groups of segments, O(n) commands per
//! rank and O(n²) over all ranks: 67 M for 4,096 ranks. So it is not stored:
//! [`RingPlan`] computes command `i` from the rank, the step and the chunk
//! sizes as the engine needs it, and the engine keeps only the commands
//! between the oldest one not completed and the newest one generated.

use std::ops::Range;

use crate::config::COMMANDS_MAX;
use crate::error::CollectiveError;
use crate::program::{Ctx, Op};
use crate::tag::Phase;
use crate::{Direction, Rank, RecvOp};

/// The commands of one ring step that move one chunk to or from one peer:
/// the chunk cut into segments, numbered from 0.
#[derive(Clone, Debug)]
pub(crate) struct Group {
    pub peer: Rank,
    pub phase: Phase,
    pub step: u32,
    pub range: Range<usize>,
    /// `None` for the sends.
    pub recv: Option<RecvOp>,
}

impl Group {
    pub fn direction(&self) -> Direction {
        if self.recv.is_some() {
            Direction::Recv
        } else {
            Direction::Send
        }
    }
}

/// A rank's ring program ([`Phase::ReduceScatter`], [`Phase::AllGather`] or
/// both, in that order), generated one command at a time in program order.
///
/// Program order, per phase and step: the receives of the step's chunk, then
/// the sends. Reduce-scatter step `s`: receive chunk `r - s - 2` from the
/// left and add it in, send chunk `r - s - 1` to the right. All-gather step
/// `s`: receive chunk `r - s - 1` and copy it, send chunk `r - s`.
#[derive(Clone, Debug)]
pub(crate) struct RingPlan {
    ctx: Ctx,
    left: Rank,
    right: Rank,
    phases: Vec<Phase>,
    /// The next group: `phases[phase]`, group `group` of the phase.
    phase: usize,
    group: u32,
    /// The group being cut into segments, and its next segment.
    current: Option<Group>,
    segment: u32,
    segments: u32,
}

impl RingPlan {
    pub fn new(ctx: &Ctx, phases: &[Phase]) -> RingPlan {
        let world = ctx.world;
        RingPlan {
            ctx: ctx.clone(),
            left: (ctx.rank + world - 1) % world,
            right: (ctx.rank + 1) % world,
            phases: phases.to_vec(),
            phase: 0,
            group: 0,
            current: None,
            segment: 0,
            segments: 0,
        }
    }

    /// Groups per phase: a receive and a send in each of the `n - 1` steps.
    fn groups_per_phase(&self) -> u32 {
        2 * (self.ctx.world - 1)
    }

    /// Chunk `rank - back`, modulo the world size; the range
    /// [`tensor::shard_ranges`] gives it, computed without the whole list.
    fn chunk_back(&self, back: u32) -> Range<usize> {
        let world = self.ctx.world;
        let index = ((self.ctx.rank + world - back % world) % world) as usize;
        let parts = world as usize;
        let (base, extra) = (self.ctx.len / parts, self.ctx.len % parts);
        let start = index * base + index.min(extra);
        start..start + base + usize::from(index < extra)
    }

    fn group_at(&self, phase: Phase, group: u32) -> Group {
        let step = group / 2;
        let receive = group.is_multiple_of(2);
        let (peer, back, recv) = match (phase, receive) {
            (Phase::ReduceScatter, true) => (self.left, step + 2, Some(RecvOp::Reduce)),
            (Phase::ReduceScatter, false) => (self.right, step + 1, None),
            (Phase::AllGather, true) => (self.left, step + 1, Some(RecvOp::Copy)),
            (Phase::AllGather, false) => (self.right, step, None),
            _ => unreachable!("the ring has no {} phase", phase.name()),
        };
        Group {
            peer,
            phase,
            step,
            range: self.chunk_back(back),
            recv,
        }
    }

    /// Every group, in program order, from the start whatever was generated.
    pub fn groups(&self) -> impl Iterator<Item = Group> + '_ {
        let per_phase = self.groups_per_phase();
        self.phases
            .iter()
            .flat_map(move |&phase| (0..per_phase).map(move |g| self.group_at(phase, g)))
    }

    /// Checks the plan as [`crate::program::Program`] would while building it
    /// (the segment limit of each group, then [`COMMANDS_MAX`]), and reports
    /// each group's peer, direction and command count. Returns the total.
    pub fn count(&self, mut each: impl FnMut(Rank, Direction, usize)) -> Result<usize, CollectiveError> {
        let mut total = 0usize;
        for group in self.groups() {
            let count = self.ctx.segment_count(&group.range)? as usize;
            if total + count > COMMANDS_MAX {
                return Err(self.ctx.too_many_commands());
            }
            total += count;
            if count > 0 {
                each(group.peer, group.direction(), count);
            }
        }
        Ok(total)
    }

    /// The next command in program order; `None` after the last.
    pub fn next_op(&mut self) -> Option<Op> {
        while self.segment == self.segments {
            if self.phase == self.phases.len() {
                return None;
            }
            if self.group == self.groups_per_phase() {
                self.phase += 1;
                self.group = 0;
                continue;
            }
            let group = self.group_at(self.phases[self.phase], self.group);
            self.group += 1;
            // Within the tag's limit: `count` checked every group up front.
            self.segments = group.range.len().div_ceil(self.ctx.segment_elems) as u32;
            self.segment = 0;
            self.current = Some(group);
        }
        let group = self.current.as_ref().expect("a group is being cut");
        let segment = self.segment;
        self.segment += 1;
        Some(Op {
            peer: group.peer,
            tag: self.ctx.tag(group.phase, group.step, segment),
            range: self.ctx.segment(&group.range, segment),
            recv: group.recv,
        })
    }
}

/// The whole ring program built at once, as the engine built it before
/// [`RingPlan`]: the reference the lazy engine is tested against.
#[cfg(test)]
pub(crate) fn plan_eagerly(
    program: &mut crate::program::Program,
    ctx: &Ctx,
    phases: &[Phase],
) -> Result<(), CollectiveError> {
    for group in RingPlan::new(ctx, phases).groups() {
        for (segment, range) in ctx.segments(group.range.clone())? {
            let tag = ctx.tag(group.phase, group.step, segment);
            match group.recv {
                Some(op) => program.recv(ctx, group.peer, tag, range, op)?,
                None => program.send(ctx, group.peer, tag, range)?,
            };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::testing::{Harness, Order, integer_inputs, sum};
    use crate::{
        Algorithm, Collective, CollectiveConfig, Command, Event, GatherAlgorithm, Kind, Phase, RecvOp, Tag, chunk_range,
    };

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

    /// Rank `rank`'s engine built from the whole program at once, as before
    /// [`super::RingPlan`]: every dependency known up front.
    fn whole_program_engine(kind: Kind, rank: u32, world: u32, len: usize, config: &CollectiveConfig) -> Collective {
        let phases: &[Phase] = match kind {
            Kind::ReduceScatter => &[RS],
            Kind::AllGather(GatherAlgorithm::Ring) => &[AG],
            _ => &[RS, AG],
        };
        let ctx = crate::program::Ctx {
            op: OP,
            rank,
            world,
            len,
            segment_elems: config.segment_elems,
            kind,
        };
        let mut program = crate::program::Program::new();
        super::plan_eagerly(&mut program, &ctx, phases).unwrap();
        Collective::from_program(ctx, config.inflight_per_peer, program)
    }

    const RING_KINDS: [Kind; 3] = [
        Kind::AllReduce(Algorithm::Ring),
        Kind::ReduceScatter,
        Kind::AllGather(GatherAlgorithm::Ring),
    ];

    #[test]
    fn plans_too_large_are_refused_as_before() {
        // Segment limit: one chunk of 2^20 + 1 one-element segments.
        let e = Collective::new(
            Kind::AllGather(GatherAlgorithm::Ring),
            OP,
            0,
            2,
            2 * (crate::tag::SEGMENT_LIMIT as usize + 1),
            &config(1),
        );
        let Err(crate::CollectiveError::Invalid { reason, .. }) = e else {
            panic!("{e:?}")
        };
        assert!(reason.contains("over the tag's limit"), "{reason}");
        // Command limit: 4 ranks, chunks of 2^18 one-element segments: 4 groups of 3 steps, 3 · 2^20 commands.
        let e = Collective::new(Kind::AllReduce(Algorithm::Ring), OP, 0, 4, 4 << 18, &config(1));
        let Err(crate::CollectiveError::Invalid { reason, .. }) = e else {
            panic!("{e:?}")
        };
        assert!(reason.contains("more than 1048576 commands"), "{reason}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// The engine generates the ring's program as it goes and forgets what
        /// completed; the same program built whole must issue exactly the same
        /// commands at the same events, in every rank, under any interleaving.
        #[test]
        fn the_generated_ring_issues_what_the_whole_program_issues(
            world in 1..=9u32, len in 0..3000usize, segment_elems in 1..300usize,
            in_flight in 1..6usize, kind in 0..3usize, seed in any::<u64>(),
        ) {
            let kind = RING_KINDS[kind];
            let config = CollectiveConfig { segment_elems, inflight_per_peer: in_flight, ..CollectiveConfig::default() };
            let generated: Vec<Collective> =
                (0..world).map(|r| Collective::new(kind, OP, r, world, len, &config).unwrap()).collect();
            let whole: Vec<Collective> = (0..world).map(|r| whole_program_engine(kind, r, world, len, &config)).collect();
            for (g, w) in generated.iter().zip(&whole) {
                prop_assert_eq!(g.command_count(), w.command_count());
            }
            let inputs = integer_inputs(world, len, seed);
            let mut a = Harness::new(generated, inputs.clone());
            let mut b = Harness::new(whole, inputs);
            a.run(Order::Random { seed }).unwrap();
            b.run(Order::Random { seed }).unwrap();
            for rank in 0..world {
                let (ia, ib): (Vec<_>, Vec<_>) = (a.issued(rank).collect(), b.issued(rank).collect());
                prop_assert_eq!(ia, ib, "rank {}", rank);
                prop_assert_eq!(a.buffer(rank), b.buffer(rank));
            }
        }

        /// Fed the same events, valid or not (completions of outstanding
        /// commands, of commands not issued yet, twice, or of no command), one
        /// rank's generated and whole-program engines answer the same: the
        /// same commands, or the same error.
        #[test]
        fn the_generated_ring_answers_every_event_as_the_whole_program(
            world in 1..=6u32, rank_seed in any::<u32>(), len in 0..400usize, segment_elems in 1..60usize,
            in_flight in 1..5usize, kind in 0..3usize, seed in any::<u64>(),
        ) {
            let kind = RING_KINDS[kind];
            let rank = rank_seed % world;
            let config = CollectiveConfig { segment_elems, inflight_per_peer: in_flight, ..CollectiveConfig::default() };
            let mut g = Collective::new(kind, OP, rank, world, len, &config).unwrap();
            let mut w = whole_program_engine(kind, rank, world, len, &config);
            // Every completion the program can see, and one it cannot.
            let mut pool = vec![Event::Received { peer: (rank + 1) % world, tag: Tag::new(OP, Phase::Barrier, 0, 0) }];
            let phases: &[Phase] = match kind { Kind::ReduceScatter => &[RS], Kind::AllGather(GatherAlgorithm::Ring) => &[AG], _ => &[RS, AG] };
            let ctx = crate::program::Ctx { op: OP, rank, world, len, segment_elems, kind };
            let mut plan = super::RingPlan::new(&ctx, phases);
            while let Some(op) = plan.next_op() {
                pool.push(match op.recv {
                    Some(_) => Event::Received { peer: op.peer, tag: op.tag },
                    None => Event::Sent { peer: op.peer, tag: op.tag },
                });
            }
            let note = |commands: &[Command], outstanding: &mut Vec<Event>| {
                for c in commands {
                    match c {
                        Command::Send { peer, tag, .. } => outstanding.push(Event::Sent { peer: *peer, tag: *tag }),
                        Command::Recv { peer, tag, .. } => outstanding.push(Event::Received { peer: *peer, tag: *tag }),
                        Command::Done => {}
                    }
                }
            };
            let mut rng = tensor::Rng::new(seed);
            let early = pool[rng.below(pool.len() as u64) as usize];
            prop_assert_eq!(g.on_event(early), w.on_event(early), "before start");
            let first = w.start();
            prop_assert_eq!(&g.start(), &first);
            let mut outstanding = Vec::new();
            note(&first, &mut outstanding);
            for _ in 0..4 * pool.len() + 8 {
                let event = if !outstanding.is_empty() && rng.below(2) == 0 {
                    outstanding.swap_remove(rng.below(outstanding.len() as u64) as usize)
                } else {
                    pool[rng.below(pool.len() as u64) as usize]
                };
                let (rg, rw) = (g.on_event(event), w.on_event(event));
                prop_assert_eq!(&rg, &rw, "{:?}", event);
                if let Ok(commands) = rw {
                    note(&commands, &mut outstanding);
                }
                prop_assert_eq!(g.waiting_on(), w.waiting_on());
                prop_assert_eq!(g.sends_outstanding(), w.sends_outstanding());
                prop_assert_eq!(g.is_done(), w.is_done());
            }
        }

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
            let mut h = Harness::all_ranks(Kind::AllGather(GatherAlgorithm::Ring), world, &config, inputs).unwrap();
            h.run(Order::Random { seed }).unwrap();
            for rank in 0..world {
                prop_assert_eq!(h.buffer(rank), &expected[..], "rank {}", rank);
            }
        }
    }
}
