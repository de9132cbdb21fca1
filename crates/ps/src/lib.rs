//! The parameter server, as engines that do no IO.
//!
//! - [`placement`]: which shard owns which dense range and which table row
//!   (consistent hashing with virtual nodes, plus explicit places for hot keys);
//! - [`sketch`]: finds the hot keys (Count-Min sketch with a candidate set);
//! - [`local`]: the compact layout of what one shard holds;
//! - [`shard`]: one shard: values, server-side optimizer, consistency clocks
//!   (BSP, SSP, async), deferred pulls, load and staleness figures;
//! - [`msg`]: the binary push/pull messages;
//! - [`replica`]: primary-backup replication of a shard (forward, hold the
//!   acknowledgement until the backup applied, deduplicate resent pushes).
//!
//! The runtime (`node::server`, `node::ps_client`) moves the messages; these
//! modules decide everything else, so the same code runs under tests and, in
//! `sinter bench ps --inproc`, without any network.

pub mod error;
pub mod local;
pub mod msg;
pub mod placement;
pub mod replica;
pub mod shard;
pub mod sketch;

pub use error::PsError;
pub use local::LocalLayout;
pub use msg::{Message, Pull, Push, Request};
pub use placement::{Placement, PlacementSpec, balance_hot_keys, key, split_key};
pub use replica::{Replica, Snapshot};
pub use shard::{CUT_BARRIER, Consistency, Output, Shard, ShardStats, staleness_bucket, staleness_bucket_floor};
pub use sketch::HotKeys;
