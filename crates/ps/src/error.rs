//! `PsError`: every way a placement, a push/pull message, a worker's request or
//! the shard's optimizer can fail in the parameter-server engines.

use thiserror::Error;

/// What went wrong in the parameter-server engine or its messages. Every
/// variant names what was wrong and where, so a runtime can log it with the
/// peer that sent it.
#[derive(Debug, Error)]
pub enum PsError {
    #[error("placement: {0}")]
    Placement(String),
    #[error("malformed parameter-server message: {0}")]
    Message(String),
    #[error("worker {worker}: {why}")]
    Protocol { worker: u32, why: String },
    #[error("optimizer on the shard: {0}")]
    Optim(#[from] optim::OptimError),
}
