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
    /// Elastic jobs: a collective of `generation` failed on the link to worker
    /// `rank` at `step`; the sender waits for a [`FromCoordinator::Regroup`].
    PeerLost { generation: u64, rank: u32, step: u64 },
    /// Replicated parameter servers: this server, backup of `shard`, holds
    /// its primary's state and applies every update after it.
    BackupReady { shard: u32 },
}

/// Coordinator → worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FromCoordinator {
    /// The membership of this generation: your rank (among workers, or among
    /// servers for a server), the number of workers, and every worker's and
    /// every parameter-server shard's data address, by rank.
    Welcome {
        generation: u64,
        rank: u32,
        world: u32,
        peers: Vec<String>,
        servers: Vec<String>,
    },
    /// Stop now: the job failed.
    Abort {
        generation: u64,
        reason: String,
        failed_rank: Option<u32>,
    },
    /// Everyone finished; exit.
    Shutdown,
    /// Elastic jobs: a new membership generation, sent to every worker of it,
    /// joiners included. Workers tell survivors from joiners by data address.
    Regroup {
        generation: u64,
        rank: u32,
        world: u32,
        peers: Vec<String>,
    },
    /// Replicated parameter servers (`cluster.replicas = 2`), to a server
    /// after its welcome: it serves `shard` as its primary, or as its backup.
    ServerRole { shard: u32, primary: bool },
    /// To the primary of `shard`: build a new backup at `addr` (the backup
    /// waits for the primary there) and forward every update to it.
    BuildBackup { shard: u32, addr: String },
    /// To every worker and to the new primary: the primary of `shard` died;
    /// its backup, at `addr`, serves the shard now.
    Promote { shard: u32, addr: String },
    /// Elastic parameter-server jobs, to a worker joining a running job: it
    /// takes the place of lost worker `rank` (its data partition and its
    /// clocks on the shards, which tell it the step to continue from).
    /// `servers` are the shards' current addresses, by shard.
    Replace {
        generation: u64,
        rank: u32,
        world: u32,
        servers: Vec<String>,
    },
}

/// Longest boot id we accept (Linux's is a 36-character UUID).
pub const BOOT_ID_BYTES_MAX: usize = 64;
/// Longest shared-memory segment name we accept.
pub const SEGMENT_NAME_BYTES_MAX: usize = 64;

/// Worker → worker, once, on a data connection after authentication: the
/// dialing (higher) rank introduces itself to the lower rank.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerHello {
    pub generation: u64,
    pub rank: u32,
    /// Where the sender runs, when it would share memory with a co-located
    /// peer; `None` asks for TCP. Appended after the original fields, so the
    /// fields before keep their encoding.
    pub host: Option<HostId>,
}

/// What decides whether two processes can share memory: the same kernel boot
/// (`/proc/sys/kernel/random/boot_id`) and the same network namespace (the
/// inode of `/proc/self/ns/net`), so that ranks placed in separate namespaces
/// to model separate hosts keep using the network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostId {
    pub boot_id: String,
    pub netns: u64,
}

/// Lower rank → higher rank, answering a [`PeerHello`]: how the pair moves tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerLink {
    /// Frames over this TCP stream.
    Tcp,
    /// Frames through a shared-memory segment under `/dev/shm/{name}` whose
    /// header carries `token`; the TCP stream stays open to tell liveness.
    Shm { name: String, token: [u8; 16] },
}

/// Higher rank → lower rank, after [`PeerLink::Shm`]: whether it mapped the
/// segment (else the pair uses TCP).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShmAck {
    pub mapped: bool,
}

impl PeerHello {
    /// Checks the bounds that decoding alone does not.
    pub fn check(&self) -> Result<(), String> {
        match &self.host {
            Some(h) if h.boot_id.len() > BOOT_ID_BYTES_MAX => Err("boot id too long".into()),
            _ => Ok(()),
        }
    }
}

impl PeerLink {
    /// Checks the bounds that decoding alone does not.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Self::Shm { name, .. } if name.len() > SEGMENT_NAME_BYTES_MAX => Err("segment name too long".into()),
            _ => Ok(()),
        }
    }
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
            Self::Welcome {
                peers,
                rank,
                world,
                servers,
                ..
            } => {
                if servers.len() > PEERS_MAX || servers.iter().any(|p| p.len() > TEXT_BYTES_MAX) {
                    return Err(format!("welcome lists {} servers", servers.len()));
                }
                let ranks = if servers.is_empty() {
                    *world
                } else {
                    (*world).max(servers.len() as u32)
                };
                if peers.len() > PEERS_MAX || peers.len() != *world as usize || *rank >= ranks {
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
            Self::BuildBackup { addr, .. } | Self::Promote { addr, .. } if addr.len() > TEXT_BYTES_MAX => {
                Err("address too long".into())
            }
            Self::Regroup { rank, world, peers, .. } => {
                if peers.len() > PEERS_MAX || peers.len() != *world as usize {
                    return Err(format!("regroup lists {} peers for world {world}", peers.len()));
                }
                if *rank >= *world || peers.iter().any(|p| p.len() > TEXT_BYTES_MAX) {
                    return Err(format!("regroup names rank {rank} of {world}, or an address too long"));
                }
                Ok(())
            }
            Self::Replace {
                rank, world, servers, ..
            } => {
                if servers.is_empty() || servers.len() > PEERS_MAX || servers.iter().any(|p| p.len() > TEXT_BYTES_MAX) {
                    return Err(format!("replace lists {} servers", servers.len()));
                }
                if *world as usize > PEERS_MAX || *rank >= *world {
                    return Err(format!("replace names rank {rank} of {world}"));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_hello_keeps_the_encoding_of_its_first_fields() {
        let tcp = PeerHello {
            generation: 7,
            rank: 3,
            host: None,
        };
        let shm = PeerHello {
            host: Some(HostId {
                boot_id: "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0".into(),
                netns: 4026531840,
            }),
            ..tcp.clone()
        };
        let old = postcard::to_allocvec(&(7u64, 3u32)).expect("encode");
        for hello in [tcp, shm] {
            let bytes = postcard::to_allocvec(&hello).expect("encode");
            assert_eq!(&bytes[..old.len()], &old[..], "{hello:?}");
            let back: PeerHello = postcard::from_bytes(&bytes).expect("decode");
            assert_eq!(back, hello);
            assert_eq!(back.check(), Ok(()));
        }
        let long = PeerHello {
            generation: 0,
            rank: 0,
            host: Some(HostId {
                boot_id: "x".repeat(BOOT_ID_BYTES_MAX + 1),
                netns: 0,
            }),
        };
        assert!(long.check().is_err());
        let link = PeerLink::Shm {
            name: "n".repeat(SEGMENT_NAME_BYTES_MAX + 1),
            token: [0; 16],
        };
        assert!(link.check().is_err());
    }
}
