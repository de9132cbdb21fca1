//! Deterministic simulation of Sinter's protocols, and scale prediction.
//!
//! The protocol engines do no IO (see `ARCHITECTURE.md`), so this crate runs
//! the real ring all-reduce ([`collective`]), parameter-server shard
//! ([`ps::Shard`]) and coordinator ([`coordinator::Coordinator`]) engines in
//! one thread, under a virtual clock ([`queue`]), over a modelled network
//! ([`net`]), with faults drawn from a seed ([`faults`]).
//!
//! - [`cluster`]: one job under faults, every invariant checked after every
//!   event; the same seed and commit give the same trace, byte for byte.
//! - [`fuzz`]: many seeds with random fault mixes and job shapes, each a
//!   safety phase (faults on) then a liveness phase (faults off: the job
//!   must finish, and an attempt launched in it must finish without a
//!   restart).
//! - [`predict`]: step time, throughput and scaling efficiency of a model
//!   on a cluster that does not exist, from the same engines.
//!
//! Nothing here reads a clock, opens a socket or spawns a thread, and no
//! hash map is ever iterated: a run is a function of its config and seed.

pub mod cluster;
pub mod cmd;
pub mod faults;
pub mod fuzz;
pub mod net;
pub mod plot;
pub mod predict;
pub mod queue;
pub mod trace;

pub use cluster::{Bug, RunReport, SimConfig, Violation, run};
pub use faults::FaultMix;
