//! The one error type of the crate: a collective that cannot be built, or an
//! event from the runtime that matches no outstanding command.

use crate::tag::Tag;
use crate::{Direction, Rank};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollectiveError {
    /// A [`crate::CollectiveConfig`] value is out of range.
    #[error("collective config: {reason}")]
    Config { reason: String },

    /// The parameters of a collective are out of range; nothing was started.
    #[error("invalid collective on rank {rank} of {world}: {reason}")]
    Invalid { rank: Rank, world: u32, reason: String },

    /// The runtime reported a completion for a tag this engine never uses
    /// with that peer in that direction: a runtime bug or a stray frame.
    #[error("rank {rank}: {direction} completion for {tag} with peer {peer} matches no command of this collective")]
    UnknownTag {
        rank: Rank,
        peer: Rank,
        direction: Direction,
        tag: Tag,
    },

    /// The runtime reported a completion for a command not issued yet.
    #[error("rank {rank}: {direction} completion for {tag} with peer {peer} before the command was issued")]
    NotIssued {
        rank: Rank,
        peer: Rank,
        direction: Direction,
        tag: Tag,
    },

    /// The runtime reported the same completion twice.
    #[error("rank {rank}: duplicate {direction} completion for {tag} with peer {peer}")]
    Duplicate {
        rank: Rank,
        peer: Rank,
        direction: Direction,
        tag: Tag,
    },
}
