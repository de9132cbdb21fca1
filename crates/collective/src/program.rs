//! A rank's part of a collective written as a sequential program of sends and
//! receives, turned into a dependency graph by hazard analysis on the ranges.
//!
//! Algorithms only say what a rank does, in an order that would be correct if
//! every command ran to completion before the next. The hazard rules derive
//! what may overlap: a send waits for the last receive into its range
//! (read-after-write), a receive waits for every earlier send of its range
//! (write-after-read) and for the last receive into it (write-after-write).
//! Those rules are what keep outstanding commands race-free in the runtime.
//!
//! Every algorithm cuts the buffer into one fixed grid of segments, so two
//! non-empty ranges are either equal or disjoint; the builder asserts that and
//! tracks hazards per segment ([`Block`]) in O(log segments) per command.
//!
//! Bruck's all-gather moves runs of parts that do not lie on one grid; it
//! states its few hazards itself ([`Program::push_after`]) and a program is
//! built one way or the other, never both.
//!
//! The rules live in [`Block`] alone: [`Program`] applies them to a whole
//! program at once (the small algorithms), and the engine applies them to the
//! ring's program one command at a time as it is generated, forgetting the
//! commands that completed (see `engine`).

use std::collections::BTreeMap;
use std::ops::Range;

use crate::config::{COMMANDS_MAX, Kind};
use crate::error::CollectiveError;
use crate::tag::{Phase, SEGMENT_LIMIT, Tag};
use crate::{Rank, RecvOp};

/// One planned command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Op {
    pub peer: Rank,
    pub tag: Tag,
    pub range: Range<usize>,
    /// `None` for a send.
    pub recv: Option<RecvOp>,
}

/// Index of an op in program order.
pub(crate) type OpId = u32;

/// A short list of op ids, inline up to [`Ids::INLINE`]: most segments have
/// one or two readers and most ops one or two dependents, so the engine
/// allocates nothing per op on a ring of thousands of ranks.
#[derive(Clone, Debug, Default)]
pub(crate) struct Ids {
    len: u32,
    inline: [OpId; Ids::INLINE],
    /// All ids once there are more than [`Ids::INLINE`].
    spill: Vec<OpId>,
}

impl Ids {
    const INLINE: usize = 3;

    pub fn as_slice(&self) -> &[OpId] {
        if self.len as usize <= Ids::INLINE {
            &self.inline[..self.len as usize]
        } else {
            &self.spill
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, id: OpId) {
        let len = self.len as usize;
        if len < Ids::INLINE {
            self.inline[len] = id;
        } else {
            if len == Ids::INLINE {
                self.spill.clear();
                self.spill.extend_from_slice(&self.inline);
            }
            self.spill.push(id);
        }
        self.len += 1;
    }

    /// Appends every id to `out`, in order, and empties the list.
    pub fn drain_into(&mut self, out: &mut Vec<OpId>) {
        out.extend_from_slice(self.as_slice());
        self.len = 0;
        self.spill.clear();
    }

    /// Removes `id` if present, keeping the others in order.
    pub fn remove(&mut self, id: OpId) {
        let Some(at) = self.as_slice().iter().position(|&x| x == id) else {
            return;
        };
        let len = self.len as usize;
        if len <= Ids::INLINE {
            self.inline.copy_within(at + 1..len, at);
        } else {
            self.spill.remove(at);
            if len - 1 == Ids::INLINE {
                self.inline.copy_from_slice(&self.spill);
            }
        }
        self.len -= 1;
    }
}

/// Hazard state of one grid segment: the last op that wrote it and the ops
/// that read it since.
#[derive(Debug)]
pub(crate) struct Block {
    pub end: usize,
    last_writer: Option<OpId>,
    readers_since_write: Ids,
}

impl Block {
    pub fn new(end: usize) -> Block {
        Block {
            end,
            last_writer: None,
            readers_since_write: Ids::default(),
        }
    }

    /// The hazard rules: appends to `deps` what op `id` must wait for, a
    /// receive (`writes`) or a send of this segment, and records it.
    pub fn access(&mut self, id: OpId, writes: bool, deps: &mut Vec<OpId>) {
        deps.extend(self.last_writer);
        if writes {
            self.readers_since_write.drain_into(deps);
            self.last_writer = Some(id);
        } else {
            self.readers_since_write.push(id);
        }
    }

    /// Forgets op `id`, which completed: an op planned later need not wait
    /// for it.
    pub fn retire(&mut self, id: OpId, writes: bool) {
        if writes {
            if self.last_writer == Some(id) {
                self.last_writer = None;
            }
        } else {
            self.readers_since_write.remove(id);
        }
    }

    /// Whether no op that has not completed touches the segment.
    pub fn is_idle(&self) -> bool {
        self.last_writer.is_none() && self.readers_since_write.is_empty()
    }
}

/// What an algorithm needs to know about the collective it plans.
#[derive(Clone, Debug)]
pub(crate) struct Ctx {
    pub op: u32,
    pub rank: Rank,
    pub world: u32,
    pub len: usize,
    pub segment_elems: usize,
    pub kind: Kind,
}

impl Ctx {
    pub fn invalid(&self, reason: String) -> CollectiveError {
        CollectiveError::Invalid {
            rank: self.rank,
            world: self.world,
            reason,
        }
    }

    /// The plan needs more than [`COMMANDS_MAX`] commands.
    pub fn too_many_commands(&self) -> CollectiveError {
        self.invalid(format!(
            "{} of {} f32s needs more than {COMMANDS_MAX} commands; raise segment_elems",
            self.kind.name(),
            self.len
        ))
    }

    pub fn tag(&self, phase: Phase, step: u32, segment: u32) -> Tag {
        Tag::new(self.op, phase, step, segment)
    }

    /// `range` cut into segments of at most `segment_elems`, numbered from 0;
    /// none for an empty range.
    pub fn segments(&self, range: Range<usize>) -> Result<Vec<(u32, Range<usize>)>, CollectiveError> {
        let count = self.segment_count(&range)?;
        Ok((0..count).map(|i| (i, self.segment(&range, i))).collect())
    }

    /// How many segments [`Ctx::segments`] cuts `range` into, or why it cannot.
    pub fn segment_count(&self, range: &Range<usize>) -> Result<u32, CollectiveError> {
        let count = range.len().div_ceil(self.segment_elems);
        if count > SEGMENT_LIMIT as usize {
            return Err(self.invalid(format!(
                "{} f32s in segments of {} make {count} segments, over the tag's limit of {SEGMENT_LIMIT}; raise segment_elems",
                range.len(),
                self.segment_elems
            )));
        }
        Ok(count as u32)
    }

    /// Segment `i` of `range`, as [`Ctx::segments`] cuts it.
    pub fn segment(&self, range: &Range<usize>, i: u32) -> Range<usize> {
        let start = range.start + i as usize * self.segment_elems;
        start..(start + self.segment_elems).min(range.end)
    }
}

/// The program being built: ops in program order and their predecessors.
pub(crate) struct Program {
    pub ops: Vec<Op>,
    pub deps: Vec<Vec<OpId>>,
    blocks: BTreeMap<usize, Block>,
    /// Built with [`Program::push_after`]: no grid, hazards stated by the algorithm.
    explicit: bool,
}

impl Program {
    pub fn new() -> Program {
        Program {
            ops: Vec::new(),
            deps: Vec::new(),
            blocks: BTreeMap::new(),
            explicit: false,
        }
    }

    pub fn send(&mut self, ctx: &Ctx, peer: Rank, tag: Tag, range: Range<usize>) -> Result<OpId, CollectiveError> {
        self.push(
            ctx,
            Op {
                peer,
                tag,
                range,
                recv: None,
            },
        )
    }

    pub fn recv(
        &mut self,
        ctx: &Ctx,
        peer: Rank,
        tag: Tag,
        range: Range<usize>,
        op: RecvOp,
    ) -> Result<OpId, CollectiveError> {
        self.push(
            ctx,
            Op {
                peer,
                tag,
                range,
                recv: Some(op),
            },
        )
    }

    /// Makes `later` wait for `earlier` although their ranges do not say so
    /// (the barrier's rounds move no data).
    pub fn order(&mut self, earlier: OpId, later: OpId) {
        assert!(earlier < later, "an op can only wait for an earlier one");
        let deps = &mut self.deps[later as usize];
        if !deps.contains(&earlier) {
            deps.push(earlier);
        }
    }

    /// Adds `op` waiting for exactly the ops in `after`, without the grid's
    /// hazard analysis. The algorithm answers for the engine's guarantees:
    /// every receive that writes data a send carries is in that send's
    /// `after`, and no two outstanding ranges can conflict (the harness checks
    /// both under random orders).
    pub fn push_after(&mut self, ctx: &Ctx, op: Op, after: &[OpId]) -> Result<OpId, CollectiveError> {
        assert!(self.blocks.is_empty(), "a program mixes grid and explicit hazards");
        self.explicit = true;
        let id = self.checked_id(ctx, &op)?;
        assert!(after.iter().all(|&a| a < id), "an op can only wait for an earlier one");
        self.ops.push(op);
        self.deps.push(after.to_vec());
        Ok(id)
    }

    /// The id `op` would get, after the checks every op passes.
    fn checked_id(&self, ctx: &Ctx, op: &Op) -> Result<OpId, CollectiveError> {
        if self.ops.len() == COMMANDS_MAX {
            return Err(ctx.too_many_commands());
        }
        assert!(
            op.peer < ctx.world && op.peer != ctx.rank,
            "rank {} planned a command for peer {}",
            ctx.rank,
            op.peer
        );
        Ok(self.ops.len() as OpId)
    }

    fn push(&mut self, ctx: &Ctx, op: Op) -> Result<OpId, CollectiveError> {
        assert!(!self.explicit, "a program mixes grid and explicit hazards");
        let id = self.checked_id(ctx, &op)?;
        let mut deps = Vec::new();
        if let Some(block) = self.block(&op.range) {
            block.access(id, op.recv.is_some(), &mut deps);
        }
        self.ops.push(op);
        self.deps.push(deps);
        Ok(id)
    }

    /// The hazard state of `range`'s segment; `None` for an empty range, which
    /// touches no data.
    fn block(&mut self, range: &Range<usize>) -> Option<&mut Block> {
        if range.is_empty() {
            return None;
        }
        let prev = self
            .blocks
            .range(..range.end)
            .next_back()
            .map(|(start, b)| (*start, b.end));
        match prev {
            Some((start, end)) if start == range.start => {
                assert_eq!(end, range.end, "range {range:?} is not on the segment grid");
            }
            Some((_, end)) => {
                assert!(end <= range.start, "range {range:?} overlaps a segment of the grid");
                self.new_block(range);
            }
            None => self.new_block(range),
        }
        self.blocks.get_mut(&range.start)
    }

    fn new_block(&mut self, range: &Range<usize>) {
        self.blocks.insert(range.start, Block::new(range.end));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Algorithm;

    fn ctx() -> Ctx {
        Ctx {
            op: 0,
            rank: 0,
            world: 4,
            len: 8,
            segment_elems: 4,
            kind: Kind::AllReduce(Algorithm::Ring),
        }
    }

    #[test]
    fn hazards_become_dependencies() {
        let c = ctx();
        let t = |s| c.tag(Phase::Exchange, s, 0);
        let mut p = Program::new();
        let send_a = p.send(&c, 1, t(0), 0..4).unwrap();
        let send_b = p.send(&c, 2, t(1), 0..4).unwrap();
        let other = p.recv(&c, 3, t(2), 4..8, RecvOp::Copy).unwrap();
        let recv = p.recv(&c, 1, t(3), 0..4, RecvOp::Reduce).unwrap();
        let resend = p.send(&c, 2, t(4), 0..4).unwrap();
        let rewrite = p.recv(&c, 3, t(5), 0..4, RecvOp::Copy).unwrap();
        assert_eq!(p.deps[send_a as usize], vec![]);
        assert_eq!(p.deps[send_b as usize], vec![]);
        assert_eq!(p.deps[other as usize], vec![]);
        assert_eq!(p.deps[recv as usize], vec![send_a, send_b], "write after read");
        assert_eq!(p.deps[resend as usize], vec![recv], "read after write");
        assert_eq!(
            p.deps[rewrite as usize],
            vec![recv, resend],
            "write after write and read"
        );
    }

    #[test]
    #[should_panic(expected = "overlaps")]
    fn ranges_off_the_grid_are_a_bug() {
        let c = ctx();
        let mut p = Program::new();
        p.send(&c, 1, c.tag(Phase::Exchange, 0, 0), 0..4).unwrap();
        let _ = p.send(&c, 1, c.tag(Phase::Exchange, 0, 1), 2..6);
    }

    #[test]
    fn segments_cover_the_range() {
        let c = ctx();
        assert_eq!(c.segments(3..13).unwrap(), vec![(0, 3..7), (1, 7..11), (2, 11..13)]);
        assert_eq!(c.segments(5..5).unwrap(), vec![]);
        let tiny = Ctx {
            segment_elems: 1,
            len: usize::MAX,
            ..ctx()
        };
        assert!(tiny.segments(0..SEGMENT_LIMIT as usize + 1).is_err());
    }
}
