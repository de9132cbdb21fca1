//! Data-parallel exchange over a [`Comm`], in one of two modes:
//! - overlapped (`cluster.overlap = true`): gradients are packed into buckets
//!   in the order the backward pass finishes them and all-reduced on a
//!   communication thread while the earlier layers still compute;
//! - inline (the default): after the backward pass, the whole gradient is
//!   all-reduced in place by the training thread. On a machine with no spare
//!   core (2 workers on 2 cores) the extra thread and the bucket copies cost
//!   more than the overlap gains (figures in `examples/fashion-mlp.toml`).
//!
//! **Invariant:** every rank forms the same buckets in the same order (same
//! layout, same `bucket_bytes`), so collectives line up without negotiation.

use std::net::TcpStream;
use std::ops::Range;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use wire::msg::ToCoordinator;

use crate::comm::Comm;
use crate::compress::{all_reduce_kind, plan_traffic};
use crate::error::JobError;
use crate::net;
use crate::report::Traffic;
use crate::train::Exchange;

/// Buckets in flight at once (a model has a handful; this bounds the queue).
const BUCKETS_INFLIGHT_MAX: usize = 64;

struct Job {
    id: usize,
    step: u64,
    buf: Vec<f32>,
    what: &'static str,
}

type Reply = (usize, Result<Vec<f32>, JobError>);

/// All-reduce of gradients (or parameters) with the other workers.
pub struct AllreduceExchange {
    /// The communicator when running inline; `None` when the comm thread owns it.
    inline: Option<Comm>,
    rank: u32,
    world: u32,
    bucket_elems: usize,
    jobs: Option<SyncSender<Job>>,
    replies: Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
    /// The bucket being filled: its values and the gradient ranges they came from.
    filling: (Vec<f32>, Vec<Range<usize>>),
    /// Ranges of each bucket sent this step, by bucket id.
    sent: Vec<Vec<Range<usize>>>,
    pool: Vec<Vec<f32>>,
    wait_ms: u64,
    coordinator: Arc<Mutex<TcpStream>>,
    /// What the all-reduces moved since the trainer last asked.
    traffic: Traffic,
}

impl AllreduceExchange {
    pub fn new(
        comm: Comm,
        overlap: bool,
        bucket_bytes: usize,
        collective_timeout_ms: u64,
        coordinator: Arc<Mutex<TcpStream>>,
    ) -> Result<Self, JobError> {
        let (rank, world) = (comm.rank(), comm.world());
        let (comm, inline) = if overlap {
            (Some(comm), None)
        } else {
            (None, Some(comm))
        };
        let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(BUCKETS_INFLIGHT_MAX);
        let (reply_tx, replies) = mpsc::sync_channel::<Reply>(BUCKETS_INFLIGHT_MAX);
        let thread = comm
            .map(|mut comm| {
                thread::Builder::new().name("comm".into()).spawn(move || {
                    for mut job in jobs_rx {
                        let r = comm.all_reduce(&mut job.buf, job.step, job.what).map(|()| job.buf);
                        if reply_tx.send((job.id, r)).is_err() {
                            return;
                        }
                    }
                })
            })
            .transpose()
            .map_err(|e| JobError::io("spawning the comm thread", e))?;
        Ok(Self {
            inline,
            rank,
            world,
            bucket_elems: (bucket_bytes / 4).max(1),
            jobs: Some(jobs_tx),
            replies,
            thread,
            filling: (Vec::new(), Vec::new()),
            sent: Vec::new(),
            pool: Vec::new(),
            // The comm thread's own deadline fires first and names the rank; this one only
            // guards against the comm thread itself being stuck.
            wait_ms: collective_timeout_ms * 2 + 1_000,
            coordinator,
            traffic: Traffic::new(world),
        })
    }

    /// Counts an all-reduce of `len` f32s (uncompressed: it is its own reference).
    fn count(&mut self, len: usize) {
        let before = self.traffic.sent_total();
        plan_traffic(
            all_reduce_kind(len, self.world),
            self.rank,
            self.world,
            len,
            &mut self.traffic,
        );
        self.traffic.uncompressed += self.traffic.sent_total() - before;
    }

    fn submit(&mut self, step: u64, buf: Vec<f32>, what: &'static str) -> Result<usize, JobError> {
        self.count(buf.len());
        let id = self.sent.len();
        let jobs = self.jobs.as_ref().expect("present until drop");
        jobs.send(Job { id, step, buf, what }).map_err(|_| self.comm_gone())?;
        Ok(id)
    }

    fn flush(&mut self, step: u64) -> Result<(), JobError> {
        if self.filling.1.is_empty() {
            return Ok(());
        }
        let (buf, ranges) = std::mem::take(&mut self.filling);
        self.submit(step, buf, "gradient all-reduce")?;
        self.sent.push(ranges);
        Ok(())
    }

    fn wait(&mut self) -> Result<Reply, JobError> {
        match self.replies.recv_timeout(Duration::from_millis(self.wait_ms)) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(JobError::Stalled {
                op: "all-reduce (comm thread)".into(),
                step: 0,
                rank: self.rank,
                waited_ms: self.wait_ms,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(self.comm_gone()),
        }
    }

    fn comm_gone(&self) -> JobError {
        JobError::Peer {
            rank: self.rank,
            why: "the communication thread stopped".into(),
        }
    }
}

impl Exchange for AllreduceExchange {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn world(&self) -> u32 {
        self.world
    }

    fn gradient_ready(&mut self, step: u64, range: Range<usize>, values: &[f32]) -> Result<(), JobError> {
        if self.filling.0.capacity() == 0 {
            self.filling.0 = self.pool.pop().unwrap_or_default();
            self.filling.0.clear();
        }
        self.filling.0.extend_from_slice(values);
        self.filling.1.push(range);
        if self.filling.0.len() >= self.bucket_elems {
            self.flush(step)?;
        }
        Ok(())
    }

    fn finish_gradients(&mut self, step: u64, grad: &mut [f32]) -> Result<(), JobError> {
        self.flush(step)?;
        let mut first_err = None;
        for _ in 0..self.sent.len() {
            let (id, r) = self.wait()?;
            match r {
                Ok(buf) => {
                    let mut at = 0;
                    for range in &self.sent[id] {
                        grad[range.clone()].copy_from_slice(&buf[at..at + range.len()]);
                        at += range.len();
                    }
                    self.pool.push(buf);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.sent.clear();
        first_err.map_or(Ok(()), Err)
    }

    fn overlaps(&self) -> bool {
        self.inline.is_none()
    }

    fn allreduce_gradient(&mut self, step: u64, grad: &mut [f32]) -> Result<(), JobError> {
        match self.inline.as_mut() {
            Some(comm) => {
                comm.all_reduce(grad, step, "gradient all-reduce")?;
                self.count(grad.len());
                Ok(())
            }
            None => {
                self.gradient_ready(step, 0..grad.len(), grad)?;
                self.finish_gradients(step, grad)
            }
        }
    }

    fn average_params(&mut self, step: u64, params: &mut [f32]) -> Result<(), JobError> {
        if let Some(comm) = self.inline.as_mut() {
            comm.all_reduce(params, step, "parameter average")?;
            self.count(params.len());
            let inv = 1.0 / self.world as f32;
            params.iter_mut().for_each(|p| *p *= inv);
            return Ok(());
        }
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(params);
        self.submit(step, buf, "parameter average")?;
        let (_, r) = self.wait()?;
        let buf = r?;
        let inv = 1.0 / self.world as f32;
        for (p, s) in params.iter_mut().zip(&buf) {
            *p = s * inv;
        }
        self.pool.push(buf);
        Ok(())
    }

    fn verify_identical(&mut self, epoch: u32, checksum: u64) -> Result<(), JobError> {
        // The coordinator compares every rank's checksum and stops the job on a mismatch.
        let mut s = self.coordinator.lock().expect("coordinator stream lock");
        net::send_control(&mut s, self.rank, &ToCoordinator::EpochDone { epoch, checksum })
    }

    fn take_traffic(&mut self) -> Option<Traffic> {
        Some(std::mem::replace(&mut self.traffic, Traffic::new(self.world)))
    }
}

impl Drop for AllreduceExchange {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
