//! Collective operations — ring all-reduce, reduce-scatter, all-gather,
//! broadcast, barrier, recursive-doubling all-reduce and Bruck all-gather — as
//! engines that do no IO.
//!
//! An engine ([`Collective`]) takes [`Event`]s (a frame was sent, a frame was
//! received) and returns [`Command`]s (send this range of the buffer to rank 3,
//! receive a frame from rank 2 and add it into this range). It never sees a
//! byte: the runtime owns the `f32` buffer and the streams, and moves data
//! straight between them. The same engines run in the node runtime, in the
//! in-process [`testing`] harness and in the simulator.
//!
//! # What the runtime must guarantee
//!
//! 1. **Order per peer and direction.** Sends to one peer go out on its stream
//!    in issue order; receives from one peer are matched to that peer's frames
//!    in issue order. Across peers, and between the sends and receives of one
//!    peer, the runtime may run everything concurrently and report
//!    completions in any order.
//! 2. **Checked receives.** The next frame from `peer` must carry the tag and
//!    `range.len()` f32s of the `Recv` at the head of that peer's queue;
//!    anything else is a protocol error naming the peer and both tags.
//! 3. **Read-ahead.** The receiver for a peer reads that peer's next frame
//!    (at most [`CollectiveConfig::segment_elems`] f32s) into a staging buffer
//!    without waiting for the matching `Recv`, and a `Send` to a peer that is
//!    blocked must not stop reading from it. Recursive doubling needs this:
//!    both partners send a segment before either may overwrite it.
//! 4. **Completions after the fact.** Report `Sent` only once the runtime no
//!    longer reads `buffer[range]` (copied to the socket or a staging buffer),
//!    and `Received` only once `buffer[range]` holds the result.
//!
//! In return every engine guarantees:
//!
//! - a `Send` is issued only after every `Recv` that writes data it carries
//!   has completed;
//! - the ranges of outstanding `Recv`s are disjoint from each other and from
//!   the ranges of outstanding `Send`s (outstanding `Send`s may overlap), so
//!   the per-peer tasks can share one buffer without data races;
//! - at most [`CollectiveConfig::inflight_per_peer`] `Send`s and as many
//!   `Recv`s are outstanding per peer, and no range is longer than
//!   [`CollectiveConfig::segment_elems`];
//! - [`Command::Done`] is issued exactly once, last, after every completion;
//! - only the barrier sends empty frames (`0..0`); the others skip empty
//!   chunks, so `len < world` and `len == 0` work and `len == 0` or
//!   `world == 1` is `Done` from `start()`.
//!
//! Frames of one collective are matched by position, so a stream carries one
//! collective at a time, or the runtime demultiplexes by [`Tag::op`].
//!
//! Tags are described in [`tag`]. Chunks are [`tensor::shard_ranges`], so part
//! `i` of a buffer is the same range on every rank.

mod barrier;
mod broadcast;
mod bruck;
mod config;
mod doubling;
mod engine;
mod error;
mod program;
mod ring;
pub mod tag;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::fmt;
use std::ops::Range;

pub use config::{
    Algorithm, BroadcastAlgorithm, COMMANDS_MAX, CollectiveConfig, GatherAlgorithm, INFLIGHT_PER_PEER_DEFAULT,
    INFLIGHT_PER_PEER_MAX, Kind, SEGMENT_ELEMS_DEFAULT, SEGMENT_ELEMS_MAX, SMALL_MESSAGE_BYTES_MAX_DEFAULT, WORLD_MAX,
};
pub use engine::Collective;
pub use error::CollectiveError;
pub use tag::{Phase, Tag};

/// A process's index in its group, `0..world`.
pub type Rank = u32;

/// What to do with a received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecvOp {
    /// `buffer[range][i] += frame[i]`.
    Reduce,
    /// `buffer[range].copy_from_slice(frame)`.
    Copy,
}

/// Work for the runtime. Ranges index the caller's `f32` buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Send `buffer[range]` to `peer` as one frame tagged `tag`. The runtime
    /// reads the buffer when it executes this, then reports [`Event::Sent`].
    Send { peer: Rank, tag: Tag, range: Range<usize> },
    /// Take the next frame from `peer`, which must carry `tag` and
    /// `range.len()` f32s, apply it to `buffer[range]` with `op`, then report
    /// [`Event::Received`].
    Recv {
        peer: Rank,
        tag: Tag,
        range: Range<usize>,
        op: RecvOp,
    },
    /// The collective is complete; the buffer holds the result.
    Done,
}

/// A completion reported by the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// The `Send` to `peer` tagged `tag` no longer needs the buffer.
    Sent { peer: Rank, tag: Tag },
    /// The `Recv` from `peer` tagged `tag` has been applied to the buffer.
    Received { peer: Rank, tag: Tag },
}

/// Which way a command moves data; used in errors and by the harness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Send,
    Recv,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Send => "send",
            Direction::Recv => "receive",
        })
    }
}

/// The range of chunk `part` when `len` elements are split over `world`
/// ranks: where reduce-scatter leaves rank `part`'s result and where
/// all-gather expects rank `part`'s input.
pub fn chunk_range(len: usize, world: u32, part: Rank) -> Range<usize> {
    assert!(part < world, "chunk {part} of a world of {world}");
    tensor::shard_ranges(len, world as usize).swap_remove(part as usize)
}
