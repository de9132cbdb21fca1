//! Fuzz mode: many seeds, each drawing a job shape and a fault mix, each run
//! through a safety phase (faults on) and a liveness phase (faults off).
//! A seed names its whole case, so `sinter sim --reproduce SEED` replays it.

use std::ops::Range;

use tensor::Rng;

use crate::cluster::{Bug, RunReport, SimConfig, Violation, run};
use crate::faults::FaultMix;
use crate::net::LinkSpec;

const MS: u64 = 1_000_000;

/// Most workers of a case.
pub const WORKERS_MAX: u32 = 16;
/// Most parameter-server shards of a case.
pub const SHARDS_MAX: u32 = 4;
/// Most steps of a case.
pub const STEPS_MAX: u64 = 500;

/// The job and faults of fuzz seed `seed` (with `bug` switched on when the
/// job has what it lives in: parameter servers, replicated ones for
/// [`Bug::AckWithoutBackup`]).
///
/// Most cases are small and short, so that many seeds run in little time;
/// a quarter have up to [`WORKERS_MAX`] workers, and three in ten outlast
/// the coordinator's heartbeat timeout and the wait deadlines several times
/// over (a tenth up to [`STEPS_MAX`] steps). A third of the
/// parameter-server cases replicate every shard on two nodes (drawn last,
/// so the other draws of a seed are what they were before replicas).
pub fn case(seed: u64, bug: Option<Bug>) -> SimConfig {
    let mut rng = Rng::derive(seed, 0xF022);
    let workers = match rng.below(4) {
        0 => 1 + rng.below(u64::from(WORKERS_MAX)) as u32,
        _ => 1 + rng.below(6) as u32,
    };
    let servers = match rng.below(2) {
        0 => 0,
        _ => 1 + rng.below(u64::from(SHARDS_MAX)) as u32,
    };
    let steps = match rng.below(10) {
        0 => 151 + rng.below(STEPS_MAX - 150),
        1 | 2 => 31 + rng.below(120),
        _ => 5 + rng.below(26),
    };
    let faults = FaultMix::random(&mut rng);
    let mut cfg = SimConfig::new(seed, workers, servers, steps, faults);
    cfg.consistency = match rng.below(4) {
        0 => ps::Consistency::Bsp,
        1 => ps::Consistency::Async,
        _ => ps::Consistency::Ssp {
            staleness: 1 + rng.below(3) as u32,
        },
    };
    cfg.params = (servers.max(1) as usize).max(8 + rng.below(120) as usize);
    cfg.segment_elems = 1 + rng.below(32) as usize;
    cfg.small_message_bytes_max = [0, 64, 1 << 20][rng.below(3) as usize];
    cfg.checkpoint_every = 1 + rng.below(5);
    cfg.compute_ns = (2 + rng.below(18)) * MS;
    let bandwidth = [1e8, 1e9, 1e10][rng.below(3) as usize];
    cfg.link = LinkSpec::new(bandwidth, 10_000 + rng.below(1_000_000));
    if servers > 0 && rng.below(3) == 0 {
        cfg.replicas = 2;
    }
    cfg.bug = bug.filter(|b| match b {
        Bug::SspOffByOne => servers > 0,
        Bug::AckWithoutBackup => cfg.replicas == 2,
    });
    cfg
}

/// What a fuzz run found.
#[derive(Debug, Default)]
pub struct FuzzSummary {
    pub runs: u64,
    pub finished: u64,
    pub events: u64,
    pub attempts: u64,
    pub violations: Vec<Violation>,
    /// Runs with each fault kind on: delay, loss, partition, crash, slow.
    pub with_fault: [u64; 5],
    pub with_servers: u64,
    /// Runs whose shards have a primary and a backup.
    pub with_replicas: u64,
    /// Replicated runs: primaries and backups killed while an attempt ran, backups promoted.
    pub primary_kills: u64,
    pub backup_kills: u64,
    pub failovers: u64,
}

/// Runs every seed of `seeds` (stopping at the first violation when
/// `stop_at_first`), calling `each` after every run.
pub fn fuzz(
    seeds: Range<u64>,
    bug: Option<Bug>,
    stop_at_first: bool,
    mut each: impl FnMut(&SimConfig, &RunReport),
) -> FuzzSummary {
    let mut s = FuzzSummary::default();
    for seed in seeds {
        let cfg = case(seed, bug);
        let report = run(&cfg);
        s.runs += 1;
        s.finished += u64::from(report.finished);
        s.events += report.events;
        s.attempts += u64::from(report.attempts);
        let f = cfg.faults;
        for (i, on) in [f.delay, f.loss, f.partition, f.crash, f.slow].into_iter().enumerate() {
            s.with_fault[i] += u64::from(on);
        }
        s.with_servers += u64::from(cfg.servers > 0);
        s.with_replicas += u64::from(cfg.replicas > 1);
        s.primary_kills += u64::from(report.primary_kills);
        s.backup_kills += u64::from(report.backup_kills);
        s.failovers += u64::from(report.failovers);
        each(&cfg, &report);
        if let Some(v) = report.violation {
            s.violations.push(v);
            if stop_at_first {
                break;
            }
        }
    }
    s
}
