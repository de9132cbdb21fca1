//! The two failure domains: what the server engine refuses from a client, and
//! what a client engine refuses from the server. Every variant names the
//! client and the round.

use crate::{ClientId, Round};

/// Why the server engine refused a message or could not close a round.
///
/// A refused message is discarded and leaves the engine as it was, so the
/// sender counts as not having answered that round.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    /// A [`crate::Config`] value is out of range; no server was made.
    #[error("secagg config: {reason}")]
    Config { reason: String },

    /// The runtime delivered a message from an id outside `0..clients`.
    #[error("{round}: message from client {client}, but the session's clients are 0..{clients}")]
    UnknownClient {
        client: ClientId,
        round: Round,
        clients: u32,
    },

    /// The message belongs to another round than the one open.
    #[error("{round}: client {client} sent a message of {got}")]
    OutOfOrder { client: ClientId, round: Round, got: Round },

    /// The sender missed an earlier round, so it has no part in this one.
    #[error("{round}: client {client} is not in this round; it missed an earlier one")]
    NotInRound { client: ClientId, round: Round },

    /// The sender already answered this round.
    #[error("{round}: second message from client {client}")]
    Duplicate { client: ClientId, round: Round },

    /// The message does not have the shape the round requires.
    #[error("{round}: malformed message from client {client}: {reason}")]
    Malformed {
        client: ClientId,
        round: Round,
        reason: String,
    },

    /// Closing the round needs at least the threshold's worth of answers;
    /// the round stays open.
    #[error("{round}: {got} clients answered, fewer than the threshold {threshold}")]
    TooFewClients { round: Round, got: u32, threshold: u32 },

    /// The unmasking shares of a client do not give back its secret: some
    /// survivor sent a share it was not given. The session has failed.
    #[error("{round}: the shares of client {client} do not rebuild its {secret}: {reason}")]
    Reconstruct {
        client: ClientId,
        round: Round,
        secret: &'static str,
        reason: String,
    },

    /// The session is over (its sum was returned, or it failed); the message
    /// came too late.
    #[error("message from client {client} after the session ended")]
    Finished { client: ClientId },

    /// The runtime asked to close a round of a session that is over.
    #[error("no round to close: the session ended")]
    NothingOpen,
}

/// Why a client engine refused the server's message, or its own input.
///
/// Any error stops the client: it sends nothing more in this session.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// A [`crate::Config`] value is out of range; no client was made.
    #[error("secagg config: {reason}")]
    Config { reason: String },

    /// The client's id or input does not fit the session; no client was made.
    #[error("client {client}: {reason}")]
    Input { client: ClientId, reason: String },

    /// The server's message starts another round than the one the client
    /// is waiting for.
    #[error("client {client}, {round}: the server sent the message that starts {got}")]
    OutOfOrder { client: ClientId, round: Round, got: Round },

    /// The server's message does not have the shape the round requires.
    #[error("client {client}, {round}: malformed message from the server: {reason}")]
    Malformed {
        client: ClientId,
        round: Round,
        reason: String,
    },

    /// The server's message leaves fewer clients than the threshold.
    #[error(
        "client {client}, {round}: the server's message leaves {got} clients, fewer than the threshold {threshold}"
    )]
    TooFewClients {
        client: ClientId,
        round: Round,
        got: u32,
        threshold: u32,
    },

    /// The shares relayed from `from` did not decrypt: they were altered,
    /// or made for another client, pair or session.
    #[error("client {client}, {round}: the shares from client {from} do not decrypt")]
    Decrypt {
        client: ClientId,
        round: Round,
        from: ClientId,
    },

    /// The server asked for both secrets of one client, which together
    /// would unmask that client's input; the client refuses and reveals
    /// nothing.
    #[error(
        "client {client}, {round}: refused to reveal both the self-mask share and the mask-key share of client {target}"
    )]
    Refused {
        client: ClientId,
        round: Round,
        target: ClientId,
    },

    /// The client has finished or stopped on an earlier error.
    #[error("client {client}: stopped; it answers nothing more in this session")]
    Stopped { client: ClientId },
}
