//! Benchmarks that drive the runtime (`node`) the way a job does, each a
//! `sinter bench` command: [`allreduce`] between real worker processes,
//! [`parameter_server`] throughput, latency and shard load (with its
//! in-process ceiling), and [`compression`], the codecs on one core and the
//! whole compressed exchange around them.
//!
//! This crate reads clocks and, for the exchange it times, opens a loopback
//! socket pair: it is a user of the runtime, like the binary, not a protocol.

pub mod allreduce;
pub mod compression;
pub mod parameter_server;
