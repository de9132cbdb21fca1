//! The runtime: the only crate that opens sockets, starts threads and
//! processes, and reads clocks. It loads data, runs the training loop, and
//! drives the protocol engines (`collective`, `coordinator`) over TCP.
//!
//! Entry points, one per role of the `sinter` binary:
//! - [`job::run`]: `sinter train` in this process (the `launch` crate starts
//!   a local cluster of the roles below);
//! - [`coord::run`]: `sinter coordinator`;
//! - [`worker::run`]: `sinter worker`;
//! - [`server::run`]: `sinter server` (a parameter-server shard; replicated
//!   shards run [`replica::run`]).

pub mod comm;
pub mod compress;
pub mod config;
pub mod coord;
pub mod datagen;
pub mod elastic;
pub mod env;
pub mod error;
pub mod exchange;
pub mod fl;
pub mod gate;
pub mod job;
pub mod net;
pub mod ps_client;
pub mod replica;
pub mod report;
pub mod server;
pub mod shm;
pub mod state;
pub mod train;
pub mod worker;

pub use error::JobError;

/// The most workers one job may have (bounds connections, ranks and buffers).
pub const WORKERS_MAX: u32 = 256;

/// The most parameter-server shards one job may have.
pub const SERVERS_MAX: u32 = 64;

/// The most hot keys placed explicitly (bounds the placement message).
pub const HOT_KEYS_MAX: usize = 16_384;
