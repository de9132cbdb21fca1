//! The runtime's failures, each with the context a user needs to act on it:
//! the file, the rank, the operation and the step.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("config {path}: {why}")]
    Config { path: PathBuf, why: String },
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Optim(#[from] optim::OptimError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("cannot resume from {path}: {why}")]
    Resume { path: PathBuf, why: String },
    // Not a `source`: the message already shows the cause, and the binary
    // prints the error chain, which would show it twice.
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("rank {rank}: {why}")]
    Peer { rank: u32, why: String },
    /// What listens at an address this process was told to reach is not Sinter.
    #[error("{addr} is not a Sinter process: {why}")]
    NotSinter { addr: String, why: String },
    #[error("{op} at step {step} timed out after {waited_ms} ms waiting for rank {rank}")]
    Stalled {
        op: String,
        step: u64,
        rank: u32,
        waited_ms: u64,
    },
    #[error("server {server}: {why}")]
    Server { server: u32, why: String },
    #[error(transparent)]
    Ps(#[from] ps::PsError),
    #[error("federation: {0}")]
    Federation(String),
    #[error("coordinator: {0}")]
    Coordinator(String),
    /// The coordinator process died (not a job failure it reported).
    #[error("the coordinator was lost: {0}")]
    CoordinatorLost(String),
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error(transparent)]
    Collective(#[from] collective::CollectiveError),
    #[error("parameters differ between ranks after epoch {epoch}: {detail}")]
    Diverged { epoch: u32, detail: String },
    #[error(
        "training diverged: the loss became {loss} at step {step}; lower optim.lr (or the momentum, with asynchronous servers)"
    )]
    NotFinite { step: u64, loss: f32 },
    /// A child process of a local cluster refused the config or its data
    /// (it exited with [`exit::USAGE`] and printed why on stderr).
    #[error("{who} refused the job's config or data (its error is above)")]
    Refused { who: String },
    #[error("interrupted")]
    Interrupted,
}

/// The process exit codes of every role (documented in the README).
pub mod exit {
    /// A failure of the data, a checkpoint, or IO.
    pub const FAILURE: u8 = 1;
    /// Bad usage or config, including a model that cannot read the data.
    pub const USAGE: u8 = 2;
    /// A peer failed or stalled (the message names the rank or shard).
    pub const PEER: u8 = 3;
    /// A process that the coordinator told to stop, or that lost the
    /// coordinator, exits with this (`std::process::exit` takes an `i32`):
    /// the job's failure is a peer's, and the coordinator names it.
    pub const ABORTED: i32 = PEER as i32;
    pub const INTERRUPTED: u8 = 130;
}

impl JobError {
    /// The exit code a process ends with on this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config { .. }
            | Self::Model(_)
            | Self::Refused { .. }
            | Self::Data(data::DataError::Config { .. }) => exit::USAGE,
            Self::Peer { .. }
            | Self::Stalled { .. }
            | Self::Server { .. }
            | Self::NotSinter { .. }
            | Self::Federation(_) => exit::PEER,
            Self::Interrupted => exit::INTERRUPTED,
            _ => exit::FAILURE,
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            err: source,
        }
    }
}
