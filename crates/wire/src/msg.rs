//! The control messages of the cluster, carried postcard-encoded in
//! `Control` frames. Tensors never travel this way.
//!
//! Every message that a peer can send is bounded: strings and lists are
//! checked against the limits below after decoding (postcard itself stops at
//! the frame's payload limit).

use serde::{Deserialize, Serialize};

pub use crate::auth::Role;

/// Longest address or reason string we accept from a peer.
pub const TEXT_BYTES_MAX: usize = 4096;
/// Most peers listed in one message.
pub const PEERS_MAX: usize = 4096;

/// Worker → coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToCoordinator {
    /// First message after authentication.
    Join {
        role: Role,
        /// The rank asked for (torchrun's `RANK`), if any.
        rank: Option<u32>,
        /// Where this worker accepts connections from its peers.
        data_addr: String,
        pid: u32,
    },
    /// Alive, at this step.
    Heartbeat { step: u64 },
    /// An epoch ended with these parameters (FNV-1a checksum of the bits).
    EpochDone { epoch: u32, checksum: u64 },
    /// This worker finished its work.
    Finished { steps: u64 },
    /// This worker is giving up; the job stops.
    Failed { reason: String },
}

/// Coordinator → worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FromCoordinator {
    /// The membership of this generation: your rank and every peer's data address, by rank.
    Welcome {
        generation: u64,
        rank: u32,
        world: u32,
        peers: Vec<String>,
    },
    /// Stop now: the job failed.
    Abort {
        generation: u64,
        reason: String,
        failed_rank: Option<u32>,
    },
    /// Everyone finished; exit.
    Shutdown,
}

/// Worker → worker, once, on a data connection after authentication.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerHello {
    pub generation: u64,
    pub rank: u32,
}

impl ToCoordinator {
    /// Checks the bounds that decoding alone does not.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Self::Join { data_addr, .. } if data_addr.len() > TEXT_BYTES_MAX => Err("data_addr too long".into()),
            Self::Failed { reason } if reason.len() > TEXT_BYTES_MAX => Err("reason too long".into()),
            _ => Ok(()),
        }
    }
}

impl FromCoordinator {
    /// Checks the bounds that decoding alone does not.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Self::Welcome { peers, rank, world, .. } => {
                if peers.len() > PEERS_MAX || peers.len() != *world as usize || rank >= world {
                    return Err(format!(
                        "welcome lists {} peers for world {world}, rank {rank}",
                        peers.len()
                    ));
                }
                if peers.iter().any(|p| p.len() > TEXT_BYTES_MAX) {
                    return Err("peer address too long".into());
                }
                Ok(())
            }
            Self::Abort { reason, .. } if reason.len() > TEXT_BYTES_MAX => Err("reason too long".into()),
            _ => Ok(()),
        }
    }
}
