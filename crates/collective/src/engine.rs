//! The engine: issues a planned program's commands as their dependencies
//! complete, within the per-peer in-flight bound, and checks every completion.
//!
//! Commands to one peer and direction are issued strictly in program order,
//! which is the order the peer's program uses for the matching commands; that
//! is what lets the runtime match frames to receives by position alone.

use std::collections::HashMap;
use std::fmt;

use crate::config::{CollectiveConfig, Kind, WORLD_MAX};
use crate::error::CollectiveError;
use crate::program::{Ctx, Op, OpId, Program};
use crate::tag::Tag;
use crate::{Command, Direction, Event, Rank, barrier, broadcast, doubling, ring};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Planned,
    Issued,
    Completed,
}

/// The commands exchanged with one peer, per direction, in program order.
#[derive(Debug)]
struct Lane {
    peer: Rank,
    /// `[sends, recvs]`, indexed by [`dir_index`].
    ops: [Vec<OpId>; 2],
    /// The next op of `ops[d]` to issue.
    next: [usize; 2],
    in_flight: [usize; 2],
}

fn dir_index(direction: Direction) -> usize {
    match direction {
        Direction::Send => 0,
        Direction::Recv => 1,
    }
}

/// One rank's part of one collective operation.
pub struct Collective {
    kind: Kind,
    op: u32,
    rank: Rank,
    world: u32,
    len: usize,
    in_flight_max: usize,
    ops: Vec<Op>,
    state: Vec<State>,
    /// Dependencies of each op that have not completed yet.
    waiting_for: Vec<u32>,
    /// `dependents[dependents_at[i]..dependents_at[i + 1]]` wait for op `i`.
    dependents_at: Vec<usize>,
    dependents: Vec<OpId>,
    /// Sorted by peer, so commands come out in a deterministic order.
    lanes: Vec<Lane>,
    by_tag: HashMap<(Rank, Direction, Tag), OpId>,
    completed: usize,
    started: bool,
    done: bool,
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
        let mut program = Program::new();
        match kind {
            Kind::AllReduce(crate::Algorithm::Ring) => {
                ring::reduce_scatter(&mut program, &ctx)?;
                ring::all_gather(&mut program, &ctx)?;
            }
            Kind::AllReduce(crate::Algorithm::RecursiveDoubling) => doubling::all_reduce(&mut program, &ctx)?,
            Kind::ReduceScatter => ring::reduce_scatter(&mut program, &ctx)?,
            Kind::AllGather => ring::all_gather(&mut program, &ctx)?,
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
        }
        Ok(Collective::from_program(ctx, config.inflight_per_peer, program))
    }

    fn from_program(ctx: Ctx, in_flight_max: usize, program: Program) -> Collective {
        let Program { ops, deps, .. } = program;
        let waiting_for = deps.iter().map(|d| d.len() as u32).collect();
        let mut dependents_at = vec![0usize; ops.len() + 1];
        for &dep in deps.iter().flatten() {
            dependents_at[dep as usize + 1] += 1;
        }
        for i in 0..ops.len() {
            dependents_at[i + 1] += dependents_at[i];
        }
        let mut fill = dependents_at.clone();
        let mut dependents = vec![0; dependents_at[ops.len()]];
        for (later, earlier) in deps.iter().enumerate() {
            for &dep in earlier {
                dependents[fill[dep as usize]] = later as OpId;
                fill[dep as usize] += 1;
            }
        }

        let mut lanes: Vec<Lane> = Vec::new();
        let mut by_tag = HashMap::with_capacity(ops.len());
        for (id, op) in ops.iter().enumerate() {
            let direction = if op.recv.is_some() {
                Direction::Recv
            } else {
                Direction::Send
            };
            let previous = by_tag.insert((op.peer, direction, op.tag), id as OpId);
            assert!(
                previous.is_none(),
                "rank {} planned {direction} {} with peer {} twice",
                ctx.rank,
                op.tag,
                op.peer
            );
            let lane = match lanes.binary_search_by_key(&op.peer, |l| l.peer) {
                Ok(i) => i,
                Err(i) => {
                    let lane = Lane {
                        peer: op.peer,
                        ops: [Vec::new(), Vec::new()],
                        next: [0; 2],
                        in_flight: [0; 2],
                    };
                    lanes.insert(i, lane);
                    i
                }
            };
            lanes[lane].ops[dir_index(direction)].push(id as OpId);
        }

        Collective {
            kind: ctx.kind,
            op: ctx.op,
            rank: ctx.rank,
            world: ctx.world,
            len: ctx.len,
            in_flight_max,
            state: vec![State::Planned; ops.len()],
            ops,
            waiting_for,
            dependents_at,
            dependents,
            lanes,
            by_tag,
            completed: 0,
            started: false,
            done: false,
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
        let rank = self.rank;
        let Some(&id) = self.by_tag.get(&(peer, direction, tag)) else {
            return Err(CollectiveError::UnknownTag {
                rank,
                peer,
                direction,
                tag,
            });
        };
        match self.state[id as usize] {
            State::Planned => {
                return Err(CollectiveError::NotIssued {
                    rank,
                    peer,
                    direction,
                    tag,
                });
            }
            State::Completed => {
                return Err(CollectiveError::Duplicate {
                    rank,
                    peer,
                    direction,
                    tag,
                });
            }
            State::Issued => {}
        }
        self.state[id as usize] = State::Completed;
        self.completed += 1;
        let lane = self
            .lanes
            .binary_search_by_key(&peer, |l| l.peer)
            .expect("a planned op has a lane");
        self.lanes[lane].in_flight[dir_index(direction)] -= 1;
        let (from, to) = (self.dependents_at[id as usize], self.dependents_at[id as usize + 1]);
        for &later in &self.dependents[from..to] {
            self.waiting_for[later as usize] -= 1;
        }
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
            .flat_map(|lane| lane.ops[d][..lane.next[d]].iter().map(move |&id| (lane.peer, id)))
            .filter(|&(_, id)| self.state[id as usize] == State::Issued)
            .map(|(peer, id)| (peer, self.ops[id as usize].tag))
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
        self.ops.len()
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
            for lane in &mut self.lanes {
                while lane.in_flight[d] < self.in_flight_max {
                    let Some(&id) = lane.ops[d].get(lane.next[d]) else {
                        break;
                    };
                    if self.waiting_for[id as usize] > 0 {
                        break;
                    }
                    lane.next[d] += 1;
                    lane.in_flight[d] += 1;
                    self.state[id as usize] = State::Issued;
                    let op = &self.ops[id as usize];
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
                }
            }
        }
        if self.completed == self.ops.len() {
            self.done = true;
            out.push(Command::Done);
        }
        out
    }
}

impl fmt::Debug for Collective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Collective")
            .field("kind", &self.kind)
            .field("op", &self.op)
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("len", &self.len)
            .field("commands", &self.ops.len())
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
