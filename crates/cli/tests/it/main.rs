//! Integration tests of the `sinter` binary: real processes on loopback, a
//! temp dir each, every wait with a deadline (see `support`).

mod bad_input;
mod checkpoint;
mod cluster;
mod compress;
mod data;
mod elastic;
mod federation;
mod hostile;
mod netns;
mod partition;
mod ps;
mod replication;
mod shm;
mod support;
mod train;
