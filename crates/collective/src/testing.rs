//! An in-process harness that runs one collective on n engines in one
//! thread: it plays the runtime for every rank, in a fixed or seeded random
//! interleaving, and checks the runtime contract of the crate docs as it goes.
//!
//! The network model is the strictest the contract allows: a directed link
//! holds one frame (the receiver's read-ahead slot) and a send completes only
//! when its frame enters the link. A schedule that finishes here finishes on
//! any runtime that keeps the contract; more buffering only adds slack.
//!
//! Public behind the `testing` feature so that other crates' simulators and
//! tests can reuse it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Range;

use tensor::Rng;

use crate::{Collective, CollectiveConfig, CollectiveError, Command, Direction, Event, Kind, Rank, RecvOp, Tag};

/// The op id [`Harness::all_ranks`] gives its engines.
pub const TEST_OP_ID: u32 = 9;
/// Frames a directed link holds: the receiver's one-frame read-ahead.
pub const LINK_FRAMES_MAX: usize = 1;

/// Which deliverable action runs next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Always the first enabled action: ranks in order, sends before receives.
    Fifo,
    /// A uniformly random enabled action, from a seeded RNG: the same seed
    /// gives the same run.
    Random { seed: u64 },
}

/// What went wrong, with the rank at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HarnessError {
    #[error("rank {rank}: {source}")]
    Engine { rank: Rank, source: CollectiveError },
    #[error("rank {rank} expected {expected} from rank {peer} but the next frame is {got}")]
    TagMismatch {
        rank: Rank,
        peer: Rank,
        expected: Tag,
        got: Tag,
    },
    #[error("rank {rank} expected {expected} f32s for {tag} from rank {peer} but the frame has {got}")]
    LengthMismatch {
        rank: Rank,
        peer: Rank,
        tag: Tag,
        expected: usize,
        got: usize,
    },
    #[error("rank {rank}: {detail}")]
    Contract { rank: Rank, detail: String },
    #[error("no action is possible and ranks are not done: {ranks:?}")]
    Stalled { ranks: Vec<Stalled> },
}

/// A rank that is not done when nothing can move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stalled {
    pub rank: Rank,
    /// [`Collective::waiting_on`].
    pub receiving_from: Vec<(Rank, Tag)>,
    /// [`Collective::sends_outstanding`].
    pub sending_to: Vec<(Rank, Tag)>,
}

/// Traffic of one rank.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RankStats {
    pub frames_sent: usize,
    pub elems_sent: usize,
    pub frames_received: usize,
    pub elems_received: usize,
}

impl RankStats {
    pub fn bytes_sent(&self) -> usize {
        self.elems_sent * size_of::<f32>()
    }

    pub fn bytes_received(&self) -> usize {
        self.elems_received * size_of::<f32>()
    }
}

#[derive(Debug)]
struct Frame {
    tag: Tag,
    data: Vec<f32>,
}

#[derive(Debug)]
struct RankState {
    engine: Collective,
    buffer: Vec<f32>,
    sends: BTreeMap<Rank, VecDeque<(Tag, Range<usize>)>>,
    recvs: BTreeMap<Rank, VecDeque<(Tag, Range<usize>, RecvOp)>>,
    /// Issued and not completed, to check the range rules.
    outstanding: Vec<(Direction, Rank, Tag, Range<usize>)>,
    issued: Vec<(u64, Command)>,
    completed: Vec<(u64, Event)>,
    stats: RankStats,
    started: bool,
    done: bool,
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Send { from: Rank, to: Rank },
    Recv { at: Rank, from: Rank },
}

/// n engines, their buffers and the links between them.
#[derive(Debug)]
pub struct Harness {
    ranks: Vec<RankState>,
    links: HashMap<(Rank, Rank), VecDeque<Frame>>,
    blocked: HashSet<(Rank, Rank)>,
    held: HashSet<Rank>,
    segment_elems_max: Option<usize>,
    in_flight_max: usize,
    clock: u64,
}

impl Harness {
    /// Engines in rank order, each with its input buffer.
    pub fn new(engines: Vec<Collective>, buffers: Vec<Vec<f32>>) -> Harness {
        assert_eq!(engines.len(), buffers.len(), "one buffer per engine");
        let ranks = engines
            .into_iter()
            .zip(buffers)
            .enumerate()
            .map(|(rank, (engine, buffer))| {
                assert_eq!(engine.rank() as usize, rank, "engines must be in rank order");
                assert_eq!(engine.len(), buffer.len(), "rank {rank}: buffer length");
                RankState {
                    engine,
                    buffer,
                    sends: BTreeMap::new(),
                    recvs: BTreeMap::new(),
                    outstanding: Vec::new(),
                    issued: Vec::new(),
                    completed: Vec::new(),
                    stats: RankStats::default(),
                    started: false,
                    done: false,
                }
            })
            .collect();
        Harness {
            ranks,
            links: HashMap::new(),
            blocked: HashSet::new(),
            held: HashSet::new(),
            segment_elems_max: None,
            in_flight_max: 0,
            clock: 0,
        }
    }

    /// `kind` on every rank of a world of `inputs.len()`, op id
    /// [`TEST_OP_ID`]; also checks that no frame exceeds `config.segment_elems`.
    pub fn all_ranks(
        kind: Kind,
        world: u32,
        config: &CollectiveConfig,
        inputs: Vec<Vec<f32>>,
    ) -> Result<Harness, CollectiveError> {
        assert_eq!(inputs.len(), world as usize, "one input per rank");
        let len = inputs.first().map_or(0, Vec::len);
        let engines = (0..world)
            .map(|rank| Collective::new(kind, TEST_OP_ID, rank, world, len, config))
            .collect::<Result<Vec<_>, _>>()?;
        let mut harness = Harness::new(engines, inputs);
        harness.segment_elems_max = Some(config.segment_elems);
        Ok(harness)
    }

    /// Frames from `from` to `to` are never delivered, as if the link hung.
    pub fn block_link(&mut self, from: Rank, to: Rank) {
        self.blocked.insert((from, to));
    }

    /// `rank` is never started, as if it had not reached the collective.
    pub fn hold(&mut self, rank: Rank) {
        self.held.insert(rank);
    }

    /// Starts every engine not held and runs until all are done or nothing can move.
    pub fn run(&mut self, order: Order) -> Result<(), HarnessError> {
        for rank in 0..self.ranks.len() as Rank {
            if !self.ranks[rank as usize].started && !self.held.contains(&rank) {
                self.ranks[rank as usize].started = true;
                let commands = self.ranks[rank as usize].engine.start();
                self.issue(rank, commands)?;
            }
        }
        let mut rng = match order {
            Order::Fifo => None,
            Order::Random { seed } => Some(Rng::new(seed)),
        };
        loop {
            let actions = self.enabled();
            if actions.is_empty() {
                break;
            }
            let pick = rng.as_mut().map_or(0, |rng| rng.below(actions.len() as u64) as usize);
            self.execute(actions[pick])?;
        }
        let ranks: Vec<Stalled> = self
            .ranks
            .iter()
            .filter(|r| !r.done)
            .map(|r| Stalled {
                rank: r.engine.rank(),
                receiving_from: r.engine.waiting_on(),
                sending_to: r.engine.sends_outstanding(),
            })
            .collect();
        if ranks.is_empty() {
            Ok(())
        } else {
            Err(HarnessError::Stalled { ranks })
        }
    }

    pub fn buffer(&self, rank: Rank) -> &[f32] {
        &self.ranks[rank as usize].buffer
    }

    pub fn engine(&self, rank: Rank) -> &Collective {
        &self.ranks[rank as usize].engine
    }

    /// Per rank, in rank order.
    pub fn stats(&self) -> Vec<RankStats> {
        self.ranks.iter().map(|r| r.stats.clone()).collect()
    }

    /// The most commands seen outstanding for one rank, peer and direction.
    pub fn in_flight_max(&self) -> usize {
        self.in_flight_max
    }

    /// Commands `rank` issued, with the harness clock at issue.
    pub fn issued(&self, rank: Rank) -> impl Iterator<Item = (u64, &Command)> {
        self.ranks[rank as usize].issued.iter().map(|(at, c)| (*at, c))
    }

    /// When `event` was reported to `rank`, if it was.
    pub fn completed_at(&self, rank: Rank, event: Event) -> Option<u64> {
        self.ranks[rank as usize]
            .completed
            .iter()
            .find(|(_, e)| *e == event)
            .map(|(at, _)| *at)
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn enabled(&self) -> Vec<Action> {
        let mut actions = Vec::new();
        for (rank, state) in self.ranks.iter().enumerate() {
            let rank = rank as Rank;
            for (&to, queue) in &state.sends {
                let room = self.links.get(&(rank, to)).map_or(0, VecDeque::len) < LINK_FRAMES_MAX;
                if !queue.is_empty() && room && !self.blocked.contains(&(rank, to)) {
                    actions.push(Action::Send { from: rank, to });
                }
            }
            for (&from, queue) in &state.recvs {
                if !queue.is_empty() && self.links.get(&(from, rank)).is_some_and(|l| !l.is_empty()) {
                    actions.push(Action::Recv { at: rank, from });
                }
            }
        }
        actions
    }

    fn execute(&mut self, action: Action) -> Result<(), HarnessError> {
        match action {
            Action::Send { from, to } => {
                let state = &mut self.ranks[from as usize];
                let (tag, range) = state
                    .sends
                    .get_mut(&to)
                    .and_then(VecDeque::pop_front)
                    .expect("enabled send");
                let data = state.buffer[range.clone()].to_vec();
                state.stats.frames_sent += 1;
                state.stats.elems_sent += data.len();
                self.links.entry((from, to)).or_default().push_back(Frame { tag, data });
                self.complete(from, Direction::Send, to, tag, Event::Sent { peer: to, tag })
            }
            Action::Recv { at, from } => {
                let frame = self
                    .links
                    .get_mut(&(from, at))
                    .and_then(VecDeque::pop_front)
                    .expect("enabled receive");
                let state = &mut self.ranks[at as usize];
                let (tag, range, op) = state
                    .recvs
                    .get_mut(&from)
                    .and_then(VecDeque::pop_front)
                    .expect("enabled receive");
                if frame.tag != tag {
                    return Err(HarnessError::TagMismatch {
                        rank: at,
                        peer: from,
                        expected: tag,
                        got: frame.tag,
                    });
                }
                if frame.data.len() != range.len() {
                    let (expected, got) = (range.len(), frame.data.len());
                    return Err(HarnessError::LengthMismatch {
                        rank: at,
                        peer: from,
                        tag,
                        expected,
                        got,
                    });
                }
                let target = &mut state.buffer[range];
                match op {
                    RecvOp::Reduce => target.iter_mut().zip(&frame.data).for_each(|(x, y)| *x += y),
                    RecvOp::Copy => target.copy_from_slice(&frame.data),
                }
                state.stats.frames_received += 1;
                state.stats.elems_received += frame.data.len();
                self.complete(at, Direction::Recv, from, tag, Event::Received { peer: from, tag })
            }
        }
    }

    fn complete(
        &mut self,
        rank: Rank,
        direction: Direction,
        peer: Rank,
        tag: Tag,
        event: Event,
    ) -> Result<(), HarnessError> {
        let at = self.tick();
        let state = &mut self.ranks[rank as usize];
        let i = state
            .outstanding
            .iter()
            .position(|(d, p, t, _)| (*d, *p, *t) == (direction, peer, tag))
            .expect("an executed command is outstanding");
        state.outstanding.swap_remove(i);
        state.completed.push((at, event));
        let commands = state
            .engine
            .on_event(event)
            .map_err(|source| HarnessError::Engine { rank, source })?;
        self.issue(rank, commands)
    }

    /// Queues commands and checks the engine's side of the contract.
    fn issue(&mut self, rank: Rank, commands: Vec<Command>) -> Result<(), HarnessError> {
        for command in commands {
            let at = self.tick();
            let state = &mut self.ranks[rank as usize];
            let broken = |detail: String| Err(HarnessError::Contract { rank, detail });
            if state.done {
                return broken(format!("{command:?} after Done"));
            }
            state.issued.push((at, command.clone()));
            let (direction, peer, tag, range) = match command {
                Command::Done => {
                    if !state.outstanding.is_empty() {
                        return broken(format!("Done with {} commands outstanding", state.outstanding.len()));
                    }
                    state.done = true;
                    continue;
                }
                Command::Send { peer, tag, ref range } => (Direction::Send, peer, tag, range.clone()),
                Command::Recv {
                    peer, tag, ref range, ..
                } => (Direction::Recv, peer, tag, range.clone()),
            };
            if range.end > state.buffer.len() {
                return broken(format!("{command:?} beyond a buffer of {}", state.buffer.len()));
            }
            if self.segment_elems_max.is_some_and(|max| range.len() > max) {
                return broken(format!("{command:?} is longer than a segment"));
            }
            let overlaps = |r: &Range<usize>| r.start < range.end && range.start < r.end;
            if let Some(other) = state
                .outstanding
                .iter()
                .find(|(d, _, _, r)| overlaps(r) && (direction == Direction::Recv || *d == Direction::Recv))
            {
                return broken(format!("{command:?} overlaps outstanding {other:?}"));
            }
            state.outstanding.push((direction, peer, tag, range.clone()));
            let in_flight = state
                .outstanding
                .iter()
                .filter(|(d, p, _, _)| (*d, *p) == (direction, peer))
                .count();
            self.in_flight_max = self.in_flight_max.max(in_flight);
            match command {
                Command::Send { .. } => state.sends.entry(peer).or_default().push_back((tag, range)),
                Command::Recv { op, .. } => state.recvs.entry(peer).or_default().push_back((tag, range, op)),
                Command::Done => unreachable!(),
            }
        }
        Ok(())
    }
}

/// `world` buffers of `len` small integers in -8..=8 drawn from `seed`: sums
/// of up to 2^20 of them are exact in f32 in any order.
pub fn integer_inputs(world: u32, len: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    (0..world)
        .map(|_| (0..len).map(|_| rng.below(17) as f32 - 8.0).collect())
        .collect()
}

/// The element-wise sum, rank 0 first.
pub fn sum(inputs: &[Vec<f32>]) -> Vec<f32> {
    let len = inputs.first().map_or(0, Vec::len);
    let mut total = vec![0.0; len];
    for input in inputs {
        total.iter_mut().zip(input).for_each(|(t, x)| *t += x);
    }
    total
}
