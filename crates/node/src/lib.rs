//! The runtime: the only crate that opens sockets, starts threads and
//! processes, and reads clocks. It loads data, runs the training loop, and
//! drives the protocol engines (`collective`, `coordinator`) over TCP.
//!
//! Entry points, one per role of the `sinter` binary:
//! - [`job::run`]: `sinter train`, in this process or as a local cluster;
//! - [`coord::run`]: `sinter coordinator`;
//! - [`worker::run`]: `sinter worker`.

pub mod bench;
pub mod comm;
pub mod config;
pub mod coord;
pub mod datagen;
pub mod env;
pub mod error;
pub mod exchange;
pub mod job;
pub mod launcher;
pub mod net;
pub mod report;
pub mod state;
pub mod train;
pub mod worker;

pub use error::JobError;

/// The most workers one job may have (bounds connections, ranks and buffers).
pub const WORKERS_MAX: u32 = 256;
