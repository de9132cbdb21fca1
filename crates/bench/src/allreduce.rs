//! `sinter bench allreduce`: all-reduce bandwidth and latency between real
//! worker processes, reported in the nccl-tests convention, with every result
//! checked against the sequential sum.

use std::time::Instant;

use serde::Serialize;

use node::config::{ClusterConfig, Transport};
use node::env::ClusterEnv;
use node::error::JobError;
use node::net::Secret;
use node::worker;

/// Bytes moved per size before timing stops (at least `ITERS_MIN` iterations).
const TIMED_BYTES_TARGET: usize = 2 << 30;
const ITERS_MIN: usize = 5;
const ITERS_MAX: usize = 2_000;
const WARMUP_ITERS: usize = 3;

/// One line of the benchmark's output.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct AllreduceResult {
    pub bytes: usize,
    pub workers: u32,
    pub iters: usize,
    pub algorithm: String,
    /// bytes / time: what the caller sees.
    pub algbw_gbps: f64,
    /// algbw × 2(n-1)/n: what each link carries, comparable across rank counts.
    pub busbw_gbps: f64,
    pub p50_us: f64,
    pub mean_us: f64,
    pub correct: bool,
    /// Whether tensor payloads carried a crc32c.
    pub tensor_crc: bool,
    /// How rank 0 reached its peers: `shm`, `tcp`, or `mixed`.
    #[serde(default)]
    pub transport: String,
}

/// The value rank `r` contributes at index `i`: small integers, so the sum is exact in f32.
fn contribution(rank: u32, i: usize) -> f32 {
    ((i % 7) as u32 + rank + 1) as f32
}

/// One benchmark worker: joins the cluster, runs every size, and returns rank 0's results
/// (other ranks return an empty list).
pub fn allreduce_worker(
    env: &ClusterEnv,
    secret: &Secret,
    sizes: &[usize],
    timeout_ms: u64,
    tensor_crc: bool,
    transport: Transport,
) -> Result<Vec<AllreduceResult>, JobError> {
    let cluster = ClusterConfig {
        collective_timeout_ms: timeout_ms,
        tensor_crc,
        transport,
        ..ClusterConfig::default()
    };
    let mut m = worker::join(env, secret, &cluster)?;
    let (rank, world) = (m.rank, m.world);
    let links: Vec<&str> = m.comm.transports().into_iter().flatten().map(|t| t.as_str()).collect();
    let transport = match links.first() {
        None => "none",
        Some(first) if links.iter().all(|l| l == first) => first,
        Some(_) => "mixed",
    }
    .to_string();
    let mut out = Vec::new();
    let result = (|| {
        for &bytes in sizes {
            let len = bytes / 4;
            let mut buf = vec![0f32; len];
            let fill = |buf: &mut [f32]| buf.iter_mut().enumerate().for_each(|(i, v)| *v = contribution(rank, i));
            // Correctness first, on the very buffer size being timed.
            fill(&mut buf);
            m.comm.all_reduce(&mut buf, 0, "bench all-reduce")?;
            let correct = buf
                .iter()
                .enumerate()
                .all(|(i, v)| *v == (0..world).map(|r| contribution(r, i)).sum::<f32>());
            for _ in 0..WARMUP_ITERS {
                m.comm.all_reduce(&mut buf, 0, "bench all-reduce")?;
            }
            let iters = (TIMED_BYTES_TARGET / bytes.max(1)).clamp(ITERS_MIN, ITERS_MAX);
            let mut times_us = Vec::with_capacity(iters);
            // As the peers' scripts do: a barrier before each iteration, then the slowest
            // rank's time per iteration, then the median over iterations.
            for it in 0..iters {
                if it % 16 == 0 {
                    // Values grow with each sum; refilling keeps them finite, outside the timed part.
                    fill(&mut buf);
                }
                m.comm
                    .run(collective::Kind::Barrier, &mut [], it as u64, "bench barrier")?;
                let t = Instant::now();
                m.comm.all_reduce(&mut buf, it as u64, "bench all-reduce")?;
                times_us.push(t.elapsed().as_secs_f64() * 1e6);
            }
            let times_us = slowest_rank_times(&mut m.comm, rank, world, &times_us)?;
            let mean_us = times_us.iter().sum::<f64>() / iters as f64;
            let mut times_us = times_us;
            times_us.sort_by(|a, b| a.total_cmp(b));
            let p50_us = times_us[iters / 2];
            let algbw = bytes as f64 / (p50_us * 1e-6) / 1e9;
            let algorithm = format!(
                "{:?}",
                collective::CollectiveConfig::default().all_reduce_algorithm(bytes, world)
            );
            if rank == 0 {
                out.push(AllreduceResult {
                    bytes,
                    workers: world,
                    iters,
                    algorithm,
                    algbw_gbps: algbw,
                    busbw_gbps: algbw * 2.0 * (world as f64 - 1.0) / world as f64,
                    p50_us,
                    mean_us,
                    correct,
                    tensor_crc,
                    transport: transport.clone(),
                });
            }
            if !correct {
                return Err(JobError::Peer {
                    rank,
                    why: format!("all-reduce of {bytes} bytes gave a wrong sum"),
                });
            }
        }
        Ok(())
    })();
    worker::report_end(
        &m.coord,
        &m.shutdown,
        rank,
        result.as_ref().map(|()| sizes.len() as u64),
    )?;
    result.map(|()| out)
}

/// Per iteration, the largest of every rank's time (gathered with one all-reduce).
fn slowest_rank_times(comm: &mut node::comm::Comm, rank: u32, world: u32, mine: &[f64]) -> Result<Vec<f64>, JobError> {
    let n = mine.len();
    let mut all = vec![0f32; n * world as usize];
    for (i, t) in mine.iter().enumerate() {
        all[rank as usize * n + i] = *t as f32;
    }
    comm.all_reduce(&mut all, 0, "bench gather times")?;
    Ok((0..n)
        .map(|i| (0..world as usize).map(|r| all[r * n + i] as f64).fold(0.0, f64::max))
        .collect())
}
