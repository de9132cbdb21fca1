//! `sinter bench ps`: parameter-server throughput, latency and shard load.
//!
//! Every worker pushes (and first pulls) `keys_per_push` distinct keys drawn
//! from a Zipf distribution over `2^key_bits` rows of one table, as fast as
//! it can, for `steps` steps. Keys are drawn before the clock starts (a pool
//! of [`POOL_PUSHES`] key sets per worker, cycled), so the figures measure
//! the parameter server, not the sampler.
//!
//! `--inproc` runs the same `ps::Shard` engines in this process, on one
//! thread, with the same key sets and no network: the ceiling the networked
//! run is compared with.
//!
//! `--counter` makes the table a set of counters: SGD with lr 1 and a
//! gradient of -1 per pushed key, so every applied push adds exactly 1 to
//! each of its keys. Rank 0 reads the whole table at the end and compares it
//! with the count computed from every worker's key sets: updates lost or
//! applied twice (e.g. across failovers of replicated shards) show up exactly.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tensor::{Gradient, Layout, ParamKind, Rng, SparseRows};

use node::env::ClusterEnv;
use node::error::JobError;
use node::ps_client::{InitArgs, PsExchange};

/// Key sets drawn per worker before timing; cycled through.
pub const POOL_PUSHES: usize = 256;
/// Pushes sampled to find the hot keys.
const HOT_SAMPLE_PUSHES: usize = 256;

/// What a run measures: the same on every worker and in `--inproc`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PsBenchSpec {
    pub servers: u32,
    pub workers: u32,
    pub keys_per_push: usize,
    pub zipf: f64,
    pub key_bits: u32,
    pub steps: u64,
    pub hot_keys: usize,
    pub consistency: node::config::ConsistencyMode,
    pub staleness: u32,
    pub seed: u64,
    /// Server processes per shard (2: primary and backup).
    #[serde(default)]
    pub replicas: u32,
    /// Counter model (see the module doc).
    #[serde(default)]
    pub counter: bool,
}

/// One worker's figures (networked runs), or the whole run's (`--inproc`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PsBenchResult {
    pub mode: String,
    pub servers: u32,
    pub workers: u32,
    pub keys_per_push: usize,
    pub zipf: f64,
    pub hot_keys: usize,
    pub key_updates: u64,
    pub wall_s: f64,
    pub key_updates_per_s: f64,
    pub pull_p50_us: f64,
    pub pull_p99_us: f64,
    pub push_p50_us: f64,
    pub push_p99_us: f64,
    /// Per shard: keys pulled and pushed, bytes, requests.
    pub shard_keys: Vec<u64>,
    pub shard_bytes: Vec<u64>,
    pub shard_requests: Vec<u64>,
    pub keys_max_over_mean: f64,
    pub bytes_max_over_mean: f64,
    pub requests_max_over_mean: f64,
    #[serde(default)]
    pub replicas: u32,
    /// Counter runs, rank 0: the sum the table should hold, what it holds,
    /// and per key the shortfall and the excess, summed.
    #[serde(default)]
    pub counter_expected: Option<u64>,
    #[serde(default)]
    pub counter_total: Option<u64>,
    #[serde(default)]
    pub lost_updates: Option<u64>,
    #[serde(default)]
    pub extra_updates: Option<u64>,
    /// The failovers this worker went through.
    #[serde(default)]
    pub failovers: Vec<node::ps_client::FailoverRecord>,
}

fn layout(spec: &PsBenchSpec) -> Layout {
    let mut l = Layout::new();
    l.push("keys", &[1usize << spec.key_bits, 1], ParamKind::Table);
    l
}

fn optim(spec: &PsBenchSpec) -> optim::OptimConfig {
    let json = if spec.counter {
        r#"{"kind":"sgd","lr":1.0}"#
    } else {
        r#"{"kind":"adagrad","lr":0.01}"#
    };
    serde_json::from_str(json).expect("a valid optimizer config")
}

/// Zipf(s) over `n` ranks by inverse CDF; rank r maps to a scattered row.
struct Zipf {
    cdf: Vec<f64>,
    mask: u64,
}

impl Zipf {
    fn new(s: f64, bits: u32) -> Self {
        let n = 1usize << bits;
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 1..=n {
            acc += (k as f64).powf(-s);
            cdf.push(acc);
        }
        Self {
            cdf,
            mask: n as u64 - 1,
        }
    }

    fn row(&self, rng: &mut Rng) -> u32 {
        let u = rng.next_f64() * self.cdf[self.cdf.len() - 1];
        let rank = self.cdf.partition_point(|&c| c < u) as u64;
        (ps::placement::mix64(rank) & self.mask) as u32
    }

    /// `k` distinct rows, ascending.
    fn push_rows(&self, rng: &mut Rng, k: usize) -> Vec<u32> {
        let mut rows = Vec::with_capacity(k);
        // Draw until k distinct rows: a push carries each key once.
        let mut seen = std::collections::HashSet::with_capacity(k * 2);
        while rows.len() < k {
            let r = self.row(rng);
            if seen.insert(r) {
                rows.push(r);
            }
        }
        rows.sort_unstable();
        rows
    }
}

fn pool(spec: &PsBenchSpec, zipf: &Zipf, worker: u32) -> Vec<Vec<u32>> {
    let mut rng = Rng::derive(spec.seed, 0xB5 ^ ((worker as u64) << 16));
    (0..POOL_PUSHES)
        .map(|_| zipf.push_rows(&mut rng, spec.keys_per_push))
        .collect()
}

/// The placement every shard and worker uses: consistent hashing, plus the
/// `hot_keys` heaviest keys of a sample placed to balance load.
fn placement_spec(spec: &PsBenchSpec, zipf: &Zipf) -> ps::PlacementSpec {
    let mut p = ps::PlacementSpec::hashed(spec.servers, ps::placement::VNODES_DEFAULT);
    if spec.hot_keys == 0 {
        return p;
    }
    let mut sketch = ps::HotKeys::new(spec.hot_keys * 2);
    let mut rng = Rng::derive(spec.seed, 0x407);
    for _ in 0..HOT_SAMPLE_PUSHES {
        for r in zipf.push_rows(&mut rng, spec.keys_per_push) {
            sketch.add(ps::key(0, r));
        }
    }
    let hot = sketch.top(spec.hot_keys);
    let rest = sketch.total().saturating_sub(hot.iter().map(|(_, c)| c).sum());
    p.hot = ps::balance_hot_keys(spec.servers, &hot, rest);
    p
}

fn gradient(rows: &[u32], counter: bool) -> Gradient {
    let g = if counter { -1.0 } else { 1e-3 };
    Gradient {
        dense: Vec::new(),
        sparse: vec![SparseRows {
            tensor: 0,
            row_len: 1,
            rows: rows.to_vec(),
            values: vec![g; rows.len()],
        }],
    }
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn max_over_mean(v: &[u64]) -> f64 {
    let mean = v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    if mean == 0.0 {
        return 1.0;
    }
    *v.iter().max().unwrap_or(&0) as f64 / mean
}

impl PsBenchResult {
    /// Fills the load figures from per-shard stats.
    pub fn set_load(&mut self, stats: &[&ps::ShardStats]) {
        self.shard_keys = stats.iter().map(|s| s.keys).collect();
        self.shard_bytes = stats.iter().map(|s| s.bytes).collect();
        self.shard_requests = stats.iter().map(|s| s.pulls + s.pushes).collect();
        self.keys_max_over_mean = max_over_mean(&self.shard_keys);
        self.bytes_max_over_mean = max_over_mean(&self.shard_bytes);
        self.requests_max_over_mean = max_over_mean(&self.shard_requests);
    }
}

fn base(spec: &PsBenchSpec, mode: &str) -> PsBenchResult {
    PsBenchResult {
        replicas: spec.replicas.max(1),
        mode: mode.into(),
        servers: spec.servers,
        workers: spec.workers,
        keys_per_push: spec.keys_per_push,
        zipf: spec.zipf,
        hot_keys: spec.hot_keys,
        ..PsBenchResult::default()
    }
}

/// The shard engines alone, in this process, one thread: the ceiling.
pub fn inproc(spec: &PsBenchSpec) -> Result<PsBenchResult, JobError> {
    let zipf = Zipf::new(spec.zipf, spec.key_bits);
    let layout = layout(spec);
    let placement = ps::Placement::new(placement_spec(spec, &zipf), &layout)?;
    let consistency = node::config::ClusterConfig {
        consistency: spec.consistency,
        staleness: spec.staleness,
        ..Default::default()
    }
    .consistency();
    let mut shards = Vec::new();
    for s in 0..spec.servers {
        let n = ps::LocalLayout::new(&layout, &placement, s).local.len();
        shards.push(ps::Shard::new(
            s,
            spec.workers,
            consistency,
            &optim(spec),
            &layout,
            &placement,
            vec![0.0; n],
        )?);
    }
    let pools: Vec<Vec<Vec<u32>>> = (0..spec.workers).map(|w| pool(spec, &zipf, w)).collect();
    let m = spec.servers as usize;
    let mut keys: Vec<Vec<u64>> = vec![Vec::new(); m];
    let started = Instant::now();
    let mut updates = 0u64;
    for step in 0..spec.steps {
        for w in 0..spec.workers {
            let rows = &pools[w as usize][step as usize % POOL_PUSHES];
            keys.iter_mut().for_each(Vec::clear);
            for &r in rows {
                let k = ps::key(0, r);
                keys[placement.shard_of(k) as usize].push(k);
            }
            for (s, shard) in shards.iter_mut().enumerate() {
                let pull = ps::Pull {
                    req: step,
                    clock: step,
                    wait_all: false,
                    dense: false,
                    keys: keys[s].clone(),
                    snapshot: None,
                };
                shard.on_pull(w, pull)?;
                let push = ps::Push {
                    clock: step,
                    dense: Vec::new(),
                    keys: keys[s].clone(),
                    values: vec![1e-3; keys[s].len()],
                };
                shard.on_push(w, push)?;
            }
            updates += rows.len() as u64;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let mut r = base(spec, "inproc");
    r.key_updates = updates;
    r.wall_s = wall;
    r.key_updates_per_s = updates as f64 / wall.max(1e-9);
    r.set_load(&shards.iter().map(|s| s.stats()).collect::<Vec<_>>());
    Ok(r)
}

/// One bench worker of a networked run (started by the launcher).
pub fn worker(spec: &PsBenchSpec, env: &ClusterEnv, secret: &node::net::Secret) -> Result<PsBenchResult, JobError> {
    let zipf = Zipf::new(spec.zipf, spec.key_bits);
    let cluster = node::config::ClusterConfig {
        consistency: spec.consistency,
        staleness: spec.staleness,
        servers: spec.servers,
        ..Default::default()
    };
    let mut member = node::worker::join(env, secret, &cluster)?;
    let layout = layout(spec);
    let params = vec![0.0f32; layout.len()];
    let opt = optim(spec);
    let init = (member.rank == 0).then(|| InitArgs {
        params: &params,
        optim: &opt,
        resume: None,
        consistency: cluster.consistency(),
        placement: placement_spec(spec, &zipf),
        elastic: false,
    });
    let mut ex = PsExchange::connect(
        member.rank,
        member.world,
        member.generation,
        &member.servers,
        secret,
        &layout,
        1.0,
        cluster.collective_timeout_ms,
        Some(0),
        init,
    )?;
    if let Some(notices) = member.ps_notices.take().filter(|_| spec.replicas > 1) {
        let wait_ms = node::ps_client::failover_wait_ms(cluster.heartbeat_timeout_ms);
        ex.enable_failover(notices, secret.clone(), member.generation, wait_ms);
    }
    let pushes = pool(spec, &zipf, member.rank);
    let grads: Vec<Gradient> = pushes.iter().map(|r| gradient(r, spec.counter)).collect();
    let mut params = params;
    let started = Instant::now();
    let mut updates = 0u64;
    // As the trainer does: step k+1's pull goes out before step k's push.
    ex.pull_start(0, &pushes[0], false, false)?;
    for step in 0..spec.steps {
        let i = step as usize % POOL_PUSHES;
        ex.pull_finish(&mut params)?;
        if step + 1 < spec.steps {
            ex.pull_start(step + 1, &pushes[(i + 1) % POOL_PUSHES], false, false)?;
        }
        ex.push(step, &grads[i])?;
        updates += pushes[i].len() as u64;
    }
    ex.flush(spec.steps)?;
    let wall = started.elapsed().as_secs_f64();
    let counted = match spec.counter && member.rank == 0 {
        true => Some(count_check(spec, &zipf, &mut ex, &mut params)?),
        false => None,
    };
    node::worker::report_end(&member.coord, &member.shutdown, member.rank, Ok(spec.steps))?;
    let mut r = base(spec, "network");
    if let Some((expected, total, lost, extra)) = counted {
        r.counter_expected = Some(expected);
        r.counter_total = Some(total);
        r.lost_updates = Some(lost);
        r.extra_updates = Some(extra);
    }
    r.failovers = ex.failovers.clone();
    r.key_updates = updates;
    r.wall_s = wall;
    r.key_updates_per_s = updates as f64 / wall.max(1e-9);
    r.pull_p50_us = percentile(&mut ex.latencies.pull_us, 0.5);
    r.pull_p99_us = percentile(&mut ex.latencies.pull_us, 0.99);
    r.push_p50_us = percentile(&mut ex.latencies.push_us, 0.5);
    r.push_p99_us = percentile(&mut ex.latencies.push_us, 0.99);
    Ok(r)
}

/// Counter runs: reads every row once every worker has pushed every step and
/// compares it with the count of every push of every worker. Returns (expected
/// total, total held, shortfall, excess).
fn count_check(
    spec: &PsBenchSpec,
    zipf: &Zipf,
    ex: &mut PsExchange,
    params: &mut [f32],
) -> Result<(u64, u64, u64, u64), JobError> {
    let rows = 1usize << spec.key_bits;
    let mut want = vec![0u64; rows];
    for w in 0..spec.workers {
        let p = pool(spec, zipf, w);
        for step in 0..spec.steps {
            for &r in &p[step as usize % POOL_PUSHES] {
                want[r as usize] += 1;
            }
        }
    }
    let all: Vec<u32> = (0..rows as u32).collect();
    ex.pull_start(spec.steps, &all, false, true)?;
    ex.pull_finish(params)?;
    let (mut total, mut lost, mut extra) = (0u64, 0u64, 0u64);
    for (r, &w) in want.iter().enumerate() {
        // Counts stay exact in f32 up to 2^24.
        let got = params[r].round().max(0.0) as u64;
        total += got;
        lost += w.saturating_sub(got);
        extra += got.saturating_sub(w);
    }
    let expected = want.iter().sum();
    if lost > 0 || extra > 0 {
        tracing::error!(expected, total, lost, extra, "the counters do not add up");
    }
    Ok((expected, total, lost, extra))
}

/// Combines the workers' and servers' lines of a networked run into one result.
pub fn combine(spec: &PsBenchSpec, workers: &[PsBenchResult], servers: &[node::server::ServerReport]) -> PsBenchResult {
    let mut r = base(spec, "network");
    r.replicas = spec.replicas.max(1);
    for w in workers {
        r.failovers.extend(w.failovers.iter().cloned());
        if w.counter_expected.is_some() {
            r.counter_expected = w.counter_expected;
            r.counter_total = w.counter_total;
            r.lost_updates = w.lost_updates;
            r.extra_updates = w.extra_updates;
        }
    }
    r.key_updates = workers.iter().map(|w| w.key_updates).sum();
    // The run lasts as long as its slowest worker.
    r.wall_s = workers.iter().map(|w| w.wall_s).fold(0.0, f64::max);
    r.key_updates_per_s = r.key_updates as f64 / r.wall_s.max(1e-9);
    let mean = |f: fn(&PsBenchResult) -> f64| workers.iter().map(f).sum::<f64>() / workers.len().max(1) as f64;
    r.pull_p50_us = mean(|w| w.pull_p50_us);
    r.pull_p99_us = workers.iter().map(|w| w.pull_p99_us).fold(0.0, f64::max);
    r.push_p50_us = mean(|w| w.push_p50_us);
    r.push_p99_us = workers.iter().map(|w| w.push_p99_us).fold(0.0, f64::max);
    // Replicated shards: the load is the primaries'.
    let mut servers: Vec<&node::server::ServerReport> = servers.iter().filter(|s| !s.backup).collect();
    servers.sort_by_key(|s| s.shard);
    r.set_load(&servers.iter().map(|s| &s.stats).collect::<Vec<_>>());
    r
}
