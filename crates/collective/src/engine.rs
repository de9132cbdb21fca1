//! The engine: issues a planned program's commands as their dependencies
//! complete, within the per-peer in-flight bound, and checks every completion.
//!
//! Commands to one peer and direction are issued strictly in program order,
//! which is the order the peer's program uses for the matching commands; that
//! is what lets the runtime match frames to receives by position alone.
//!
//! Commands are generated from the plan only when a lane needs its next one,
//! and forgotten once they and every earlier command completed, so an engine
//! holds the commands in flight, not its whole program: a ring rank of 4,096
//! has 16,380 commands, and a simulator runs 4,096 such engines at once. A
//! command's dependencies are those of the whole program minus the ones that
//! completed before it was generated, which issues exactly the same commands
//! at the same events. Completions are matched against the handful of
//! commands outstanding on the event's lane, so nothing is hashed per event.

use std::collections::VecDeque;
use std::fmt;
use std::mem;

use crate::config::{CollectiveConfig, Kind, WORLD_MAX};
use crate::error::CollectiveError;
use crate::program::{Block, Ctx, Ids, Op, OpId, Program};
use crate::ring::RingPlan;
use crate::tag::{Phase, Tag};
use crate::{Algorithm, Command, Direction, Event, GatherAlgorithm, Rank, barrier, broadcast, bruck, doubling};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Planned,
    Issued,
    Completed,
}

/// The commands exchanged with one peer, per direction (`[sends, recvs]`,
/// indexed by [`dir_index`]), in program order.
#[derive(Debug)]
struct Lane {
    peer: Rank,
    /// Generated and not issued yet.
    pending: [VecDeque<OpId>; 2],
    /// Issued and not completed, in issue order; at most `in_flight_max`.
    outstanding: [Vec<OpId>; 2],
    /// Not generated yet.
    remaining: [usize; 2],
}

fn dir_index(direction: Direction) -> usize {
    match direction {
        Direction::Send => 0,
        Direction::Recv => 1,
    }
}

fn direction_of(op: &Op) -> Direction {
    if op.recv.is_some() {
        Direction::Recv
    } else {
        Direction::Send
    }
}

/// One generated command that is not forgotten yet.
#[derive(Debug)]
struct Slot {
    op: Op,
    state: State,
    /// Dependencies that have not completed yet.
    waiting_for: u32,
    /// Generated commands that wait for this one.
    dependents: Ids,
}

/// The segments that the ring's commands not completed yet touch, by start
/// offset: a few dozen at most with the default window, so two short vectors
/// scanned in order. A hash table's probe was a cache miss on most events of
/// a 1,024-rank prediction (a sixth of its time), where the scan reads one
/// or two cache lines of offsets.
#[derive(Debug, Default)]
struct Blocks {
    starts: Vec<usize>,
    blocks: Vec<Block>,
}

impl Blocks {
    fn position(&self, start: usize) -> Option<usize> {
        self.starts.iter().position(|&s| s == start)
    }

    /// The block starting at `start`, added (ending at `end`) if missing.
    fn get_or_insert(&mut self, start: usize, end: usize) -> &mut Block {
        let i = self.position(start).unwrap_or_else(|| {
            self.starts.push(start);
            self.blocks.push(Block::new(end));
            self.starts.len() - 1
        });
        &mut self.blocks[i]
    }

    fn get_mut(&mut self, start: usize) -> Option<&mut Block> {
        let i = self.position(start)?;
        Some(&mut self.blocks[i])
    }

    fn remove(&mut self, start: usize) {
        if let Some(i) = self.position(start) {
            self.starts.swap_remove(i);
            self.blocks.swap_remove(i);
        }
    }
}

/// Where the commands come from.
#[derive(Debug)]
enum Source {
    /// A program built whole, with its dependencies: recursive doubling,
    /// broadcast and barrier, whose programs are O(log n) or O(segments).
    Program { ops: Vec<Op>, deps: Vec<Vec<OpId>> },
    /// The ring's program, generated as needed ([`RingPlan`]). Dependencies
    /// come from the same hazard rules applied as each command is generated;
    /// `blocks` holds the segments that commands not completed yet touch, by
    /// start offset. `start` is the plan from its first command, to name
    /// a stray completion.
    Ring {
        plan: Box<RingPlan>,
        start: Box<RingPlan>,
        blocks: Blocks,
    },
}

/// One rank's part of one collective operation.
pub struct Collective {
    kind: Kind,
    op: u32,
    rank: Rank,
    world: u32,
    len: usize,
    in_flight_max: usize,
    source: Source,
    /// Commands in the whole program.
    total: usize,
    /// Commands generated so far: the next one's id.
    generated: usize,
    /// Commands `base..generated`; every command before `base` completed.
    window: VecDeque<Slot>,
    base: OpId,
    /// Sorted by peer, so commands come out in a deterministic order.
    lanes: Vec<Lane>,
    completed: usize,
    started: bool,
    done: bool,
    /// Reused for the dependencies of the command being generated.
    scratch: Vec<OpId>,
}

impl Collective {
    /// Plans rank `rank`'s part of collective `kind` over `world` ranks on a
    /// buffer of `len` f32s. `op` identifies the operation in every tag
    /// (modulo [`crate::tag::OP_ID_LIMIT`]); all ranks must pass the same
    /// `kind`, `op`, `world`, `len` and `config.segment_elems`.
    pub fn new(
        kind: Kind,
        op: u32,
        rank: Rank,
        world: u32,
        len: usize,
        config: &CollectiveConfig,
    ) -> Result<Collective, CollectiveError> {
        config.validate()?;
        let ctx = Ctx {
            op,
            rank,
            world,
            len,
            segment_elems: config.segment_elems,
            kind,
        };
        if !(1..=WORLD_MAX).contains(&world) {
            return Err(ctx.invalid(format!("world size {world} is outside 1..={WORLD_MAX}")));
        }
        if rank >= world {
            return Err(ctx.invalid(format!("rank {rank} is not below the world size")));
        }
        let ring_phases: &[Phase] = match kind {
            Kind::AllReduce(Algorithm::Ring) => &[Phase::ReduceScatter, Phase::AllGather],
            Kind::ReduceScatter => &[Phase::ReduceScatter],
            Kind::AllGather(GatherAlgorithm::Ring) => &[Phase::AllGather],
            _ => &[],
        };
        if !ring_phases.is_empty() {
            let plan = RingPlan::new(&ctx, ring_phases);
            return Collective::from_ring(ctx, config.inflight_per_peer, plan);
        }
        let mut program = Program::new();
        match kind {
            Kind::AllReduce(Algorithm::RecursiveDoubling) => doubling::all_reduce(&mut program, &ctx)?,
            Kind::AllGather(GatherAlgorithm::Bruck) => bruck::all_gather(&mut program, &ctx)?,
            Kind::Broadcast { root, algorithm } => {
                if root >= world {
                    return Err(ctx.invalid(format!("broadcast root {root} is not below the world size")));
                }
                broadcast::broadcast(&mut program, &ctx, root, algorithm)?;
            }
            Kind::Barrier => {
                if len != 0 {
                    return Err(ctx.invalid(format!("a barrier moves no data, but len is {len}")));
                }
                barrier::barrier(&mut program, &ctx)?;
            }
            Kind::AllReduce(Algorithm::Ring) | Kind::ReduceScatter | Kind::AllGather(GatherAlgorithm::Ring) => {
                unreachable!("ring kinds are planned lazily")
            }
        }
        Ok(Collective::from_program(ctx, config.inflight_per_peer, program))
    }

    fn from_ring(ctx: Ctx, in_flight_max: usize, plan: RingPlan) -> Result<Collective, CollectiveError> {
        let mut lanes = Vec::new();
        let total = plan.count(|peer, direction, count| {
            lane_mut(&mut lanes, peer).remaining[dir_index(direction)] += count;
        })?;
        let source = Source::Ring {
            start: Box::new(plan.clone()),
            plan: Box::new(plan),
            blocks: Blocks::default(),
        };
        Ok(Collective::with_source(ctx, in_flight_max, source, total, lanes))
    }

    pub(crate) fn from_program(ctx: Ctx, in_flight_max: usize, program: Program) -> Collective {
        let Program { ops, deps, .. } = program;
        let mut keys: Vec<(Rank, Direction, Tag)> = ops.iter().map(|op| (op.peer, direction_of(op), op.tag)).collect();
        keys.sort_unstable();
        if let Some(twice) = keys.windows(2).find(|w| w[0] == w[1]) {
            let (peer, direction, tag) = twice[0];
            panic!("rank {} planned {direction} {tag} with peer {peer} twice", ctx.rank);
        }
        let mut lanes = Vec::new();
        for op in &ops {
            lane_mut(&mut lanes, op.peer).remaining[dir_index(direction_of(op))] += 1;
        }
        let total = ops.len();
        Collective::with_source(ctx, in_flight_max, Source::Program { ops, deps }, total, lanes)
    }

    fn with_source(ctx: Ctx, in_flight_max: usize, source: Source, total: usize, lanes: Vec<Lane>) -> Collective {
        Collective {
            kind: ctx.kind,
            op: ctx.op,
            rank: ctx.rank,
            world: ctx.world,
            len: ctx.len,
            in_flight_max,
            source,
            total,
            generated: 0,
            window: VecDeque::new(),
            base: 0,
            lanes,
            completed: 0,
            started: false,
            done: false,
            scratch: Vec::new(),
        }
    }

    /// The first commands. Call once, before any [`Collective::on_event`].
    pub fn start(&mut self) -> Vec<Command> {
        assert!(
            !self.started,
            "rank {}: {} op {} started twice",
            self.rank,
            self.kind.name(),
            self.op
        );
        self.started = true;
        self.issue_ready()
    }

    /// Records a completion and returns the commands it unblocks. An event
    /// that matches no issued, uncompleted command is an error and changes
    /// nothing.
    pub fn on_event(&mut self, event: Event) -> Result<Vec<Command>, CollectiveError> {
        let (peer, direction, tag) = match event {
            Event::Sent { peer, tag } => (peer, Direction::Send, tag),
            Event::Received { peer, tag } => (peer, Direction::Recv, tag),
        };
        let d = dir_index(direction);
        let found = self
            .lanes
            .binary_search_by_key(&peer, |l| l.peer)
            .ok()
            .and_then(|lane| {
                let at = self.lanes[lane].outstanding[d]
                    .iter()
                    .position(|&id| self.slot(id).op.tag == tag)?;
                Some((lane, at))
            });
        let Some((lane, at)) = found else {
            return Err(self.unmatched(peer, direction, tag));
        };
        let id = self.lanes[lane].outstanding[d].remove(at);
        self.complete(id);
        Ok(self.issue_ready())
    }

    /// Whether [`Command::Done`] has been issued.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The receives issued and not yet completed, by peer then issue order:
    /// whom a stalled collective waits for, and at which phase, step and
    /// segment (the tag's `Display` says it in words).
    pub fn waiting_on(&self) -> Vec<(Rank, Tag)> {
        self.outstanding(Direction::Recv)
    }

    /// The sends issued and not yet completed, by peer then issue order: a
    /// collective stalled here waits for a peer that stopped reading.
    pub fn sends_outstanding(&self) -> Vec<(Rank, Tag)> {
        self.outstanding(Direction::Send)
    }

    fn outstanding(&self, direction: Direction) -> Vec<(Rank, Tag)> {
        let d = dir_index(direction);
        self.lanes
            .iter()
            .flat_map(|lane| lane.outstanding[d].iter().map(move |&id| (lane.peer, id)))
            .map(|(peer, id)| (peer, self.slot(id).op.tag))
            .collect()
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn rank(&self) -> Rank {
        self.rank
    }

    pub fn world(&self) -> u32 {
        self.world
    }

    /// The buffer length, in f32s, every command's range lies within.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Commands this engine issues in all, [`Command::Done`] excluded.
    pub fn command_count(&self) -> usize {
        self.total
    }

    fn slot(&self, id: OpId) -> &Slot {
        &self.window[(id - self.base) as usize]
    }

    /// Why an event that matches no outstanding command is wrong: it names a
    /// command not issued yet, one that completed, or none at all.
    fn unmatched(&self, peer: Rank, direction: Direction, tag: Tag) -> CollectiveError {
        let rank = self.rank;
        let is_it = |op: &Op| op.peer == peer && op.tag == tag && direction_of(op) == direction;
        let state = match self.window.iter().find(|slot| is_it(&slot.op)) {
            Some(slot) => Some(slot.state),
            None => {
                // Forgotten (so completed), not generated yet, or not in the plan.
                let id = match &self.source {
                    Source::Program { ops, .. } => ops.iter().position(is_it),
                    Source::Ring { start, .. } => {
                        let mut plan = RingPlan::clone(start);
                        std::iter::from_fn(|| plan.next_op()).position(|op| is_it(&op))
                    }
                };
                id.map(|id| {
                    if id < self.base as usize {
                        State::Completed
                    } else {
                        State::Planned
                    }
                })
            }
        };
        match state {
            None => CollectiveError::UnknownTag {
                rank,
                peer,
                direction,
                tag,
            },
            Some(State::Planned) => CollectiveError::NotIssued {
                rank,
                peer,
                direction,
                tag,
            },
            Some(State::Completed) => CollectiveError::Duplicate {
                rank,
                peer,
                direction,
                tag,
            },
            Some(State::Issued) => unreachable!("an issued command is outstanding on its lane"),
        }
    }

    /// Generates the next command of the plan with its dependencies on the
    /// commands that have not completed; `false` after the last one.
    fn generate(&mut self) -> bool {
        let id = self.generated as OpId;
        let (window, base) = (&self.window, self.base);
        let done = |dep: OpId| dep < base || window[(dep - base) as usize].state == State::Completed;
        self.scratch.clear();
        let op = match &mut self.source {
            Source::Program { ops, deps } => {
                let Some(op) = ops.get(id as usize) else {
                    return false;
                };
                self.scratch
                    .extend(deps[id as usize].iter().copied().filter(|&dep| !done(dep)));
                op.clone()
            }
            Source::Ring { plan, blocks, .. } => {
                let Some(op) = plan.next_op() else {
                    return false;
                };
                if !op.range.is_empty() {
                    let block = blocks.get_or_insert(op.range.start, op.range.end);
                    assert_eq!(
                        block.end, op.range.end,
                        "range {:?} is not on the segment grid",
                        op.range
                    );
                    // Every command a block names has not completed (see `complete`).
                    block.access(id, op.recv.is_some(), &mut self.scratch);
                }
                op
            }
        };
        for &dep in &self.scratch {
            self.window[(dep - self.base) as usize].dependents.push(id);
        }
        let lane = self
            .lanes
            .binary_search_by_key(&op.peer, |l| l.peer)
            .expect("every peer of the plan has a lane");
        let d = dir_index(direction_of(&op));
        let lane = &mut self.lanes[lane];
        lane.remaining[d] -= 1;
        lane.pending[d].push_back(id);
        self.window.push_back(Slot {
            op,
            state: State::Planned,
            waiting_for: self.scratch.len() as u32,
            dependents: Ids::default(),
        });
        self.generated += 1;
        true
    }

    /// Marks command `id` completed, releases what waits for it, and forgets
    /// the commands no later one can depend on.
    fn complete(&mut self, id: OpId) {
        let base = self.base;
        let slot = &mut self.window[(id - base) as usize];
        slot.state = State::Completed;
        let dependents = mem::take(&mut slot.dependents);
        if let Source::Ring { blocks, .. } = &mut self.source
            && !slot.op.range.is_empty()
        {
            let start = slot.op.range.start;
            let block = blocks.get_mut(start).expect("a generated command's block is tracked");
            block.retire(id, slot.op.recv.is_some());
            if block.is_idle() {
                blocks.remove(start);
            }
        }
        self.completed += 1;
        for &later in dependents.as_slice() {
            self.window[(later - base) as usize].waiting_for -= 1;
        }
        while self.window.front().is_some_and(|slot| slot.state == State::Completed) {
            self.window.pop_front();
            self.base += 1;
        }
    }

    /// Issues every op at the head of its lane whose dependencies completed,
    /// receives first so the runtime can post them before the sends it
    /// unblocks; then `Done` once everything completed.
    fn issue_ready(&mut self) -> Vec<Command> {
        let mut out = Vec::new();
        if !self.started || self.done {
            return out;
        }
        for direction in [Direction::Recv, Direction::Send] {
            let d = dir_index(direction);
            for lane in 0..self.lanes.len() {
                while self.lanes[lane].outstanding[d].len() < self.in_flight_max {
                    while self.lanes[lane].pending[d].is_empty() && self.lanes[lane].remaining[d] > 0 {
                        assert!(self.generate(), "the plan ended before its counted commands");
                    }
                    let Some(&id) = self.lanes[lane].pending[d].front() else {
                        break;
                    };
                    let base = self.base;
                    let slot = &mut self.window[(id - base) as usize];
                    if slot.waiting_for > 0 {
                        break;
                    }
                    slot.state = State::Issued;
                    let op = &slot.op;
                    out.push(match op.recv {
                        Some(recv_op) => Command::Recv {
                            peer: op.peer,
                            tag: op.tag,
                            range: op.range.clone(),
                            op: recv_op,
                        },
                        None => Command::Send {
                            peer: op.peer,
                            tag: op.tag,
                            range: op.range.clone(),
                        },
                    });
                    let lane = &mut self.lanes[lane];
                    lane.pending[d].pop_front();
                    lane.outstanding[d].push(id);
                }
            }
        }
        if self.completed == self.total {
            self.done = true;
            out.push(Command::Done);
        }
        out
    }
}

/// The lane of `peer` in `lanes` (sorted by peer), added if missing.
fn lane_mut(lanes: &mut Vec<Lane>, peer: Rank) -> &mut Lane {
    let at = match lanes.binary_search_by_key(&peer, |l| l.peer) {
        Ok(at) => at,
        Err(at) => {
            let lane = Lane {
                peer,
                pending: [VecDeque::new(), VecDeque::new()],
                outstanding: [Vec::new(), Vec::new()],
                remaining: [0; 2],
            };
            lanes.insert(at, lane);
            at
        }
    };
    &mut lanes[at]
}

impl fmt::Debug for Collective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Collective")
            .field("kind", &self.kind)
            .field("op", &self.op)
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("len", &self.len)
            .field("commands", &self.total)
            .field("completed", &self.completed)
            .field("done", &self.done)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use crate::config::COMMANDS_MAX;
    use crate::{Algorithm, BroadcastAlgorithm, Collective, CollectiveConfig, CollectiveError, Kind};

    const RING: Kind = Kind::AllReduce(Algorithm::Ring);

    #[test]
    fn invalid_parameters_are_errors() {
        let config = CollectiveConfig::default();
        let invalid = invalid_reason;
        assert_eq!(
            invalid(Collective::new(RING, 0, 0, 0, 4, &config)),
            "world size 0 is outside 1..=65536"
        );
        assert_eq!(
            invalid(Collective::new(RING, 0, 3, 3, 4, &config)),
            "rank 3 is not below the world size"
        );
        let broadcast = Kind::Broadcast {
            root: 5,
            algorithm: BroadcastAlgorithm::Chain,
        };
        assert_eq!(
            invalid(Collective::new(broadcast, 0, 0, 5, 4, &config)),
            "broadcast root 5 is not below the world size"
        );
        let bad_config = CollectiveConfig {
            inflight_per_peer: 0,
            ..CollectiveConfig::default()
        };
        assert!(matches!(
            Collective::new(RING, 0, 0, 2, 4, &bad_config),
            Err(CollectiveError::Config { .. })
        ));
    }

    #[test]
    fn plans_beyond_the_command_limit_are_refused() {
        // 2 ranks, one-element segments: 2 commands per element and phase.
        let config = CollectiveConfig {
            segment_elems: 1,
            ..CollectiveConfig::default()
        };
        let fits = Collective::new(RING, 0, 0, 2, COMMANDS_MAX / 2, &config).unwrap();
        assert_eq!(fits.command_count(), COMMANDS_MAX);
        let reason = invalid_reason(Collective::new(RING, 0, 0, 2, COMMANDS_MAX / 2 + 2, &config));
        assert!(reason.contains("raise segment_elems"), "{reason}");
    }

    fn invalid_reason(result: Result<Collective, CollectiveError>) -> String {
        match result {
            Err(CollectiveError::Invalid { reason, .. }) => reason,
            other => panic!("{other:?}"),
        }
    }
}
