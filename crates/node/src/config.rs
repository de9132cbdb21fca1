//! The job configuration: one TOML file per run, every key documented in
//! `examples/*.toml`, every key overridable with `--set section.key=value`.
//!
//! Each section's type belongs to the crate that uses it (`model::ModelConfig`,
//! `optim::OptimConfig`); this module composes them, applies overrides and
//! validates the whole once.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::JobError;

/// A whole training job.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub data: DataConfig,
    pub model: model::ModelConfig,
    pub optim: optim::OptimConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// What crosses the wire: codecs per parameter group (`crate::compress`).
    #[serde(default)]
    pub compress: crate::compress::CompressSection,
    /// A federation (`sinter fl ...`, or `sinter train` with this section): rounds, sampling, strategy.
    #[serde(default)]
    pub fl: Option<fl::FlConfig>,
}

/// Where the data comes from and how to read it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `auto` (by extension and magic bytes), `idx`, `libsvm`, `csv` or `parquet`.
    #[serde(default)]
    pub format: DataFormat,
    /// Training data: a file, or for IDX a directory holding the standard file names.
    pub train: PathBuf,
    /// Test data; for IDX directories the test split of `train` when absent.
    #[serde(default)]
    pub test: Option<PathBuf>,
    /// Pixel normalisation for IDX images: `none`, `scale01` or `standardize`
    /// (Fashion-MNIST mean 0.2860, std 0.3530).
    #[serde(default)]
    pub normalize: Normalize,
    /// Hash sparse feature ids into 2^hash_bits buckets (LIBSVM, Parquet).
    #[serde(default)]
    pub hash_bits: Option<u32>,
    /// CSV: the label column, by name or 0-based index (default: the first).
    #[serde(default)]
    pub label_column: Option<String>,
    /// CSV: whether the first line is a header.
    #[serde(default = "default_true")]
    pub csv_header: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    #[default]
    Auto,
    Idx,
    Libsvm,
    Csv,
    Parquet,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    None,
    Scale01,
    #[default]
    Standardize,
}

/// The training loop.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: u32,
    /// Global batch size: split evenly across workers.
    pub batch_size: usize,
    /// Seeds parameter init, shuffling and every other random choice.
    pub seed: u64,
    /// Evaluate on the test set every this many epochs (and after the last one).
    pub eval_every_epochs: u32,
    /// Stop after this many steps in total (0: no limit). For smoke tests and benchmarks.
    pub max_steps: u64,
    /// Also evaluate (rank 0) every this many steps within an epoch, reported
    /// as `eval` lines (0: only per epoch). All-reduce jobs; for learning curves.
    pub eval_every_steps: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 128,
            seed: 0,
            eval_every_epochs: 1,
            max_steps: 0,
            eval_every_steps: 0,
        }
    }
}

/// Checkpointing.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Directory of checkpoints; none are written when absent.
    pub dir: Option<PathBuf>,
    /// Write a checkpoint every this many epochs (and after the last one).
    pub every_epochs: u32,
    /// Keep the newest this many checkpoints.
    pub keep_last: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            dir: None,
            every_epochs: 1,
            keep_last: 3,
        }
    }
}

/// The shape of the cluster and how workers synchronise.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Worker processes. 1 trains in the launcher's own process.
    pub workers: u32,
    /// How gradients or parameters are synchronised.
    pub sync: SyncMode,
    /// Local SGD: steps between parameter averages (1 = average every step).
    pub average_every: u32,
    /// Overlap the all-reduce with the backward pass on a communication thread
    /// (worth it when each worker has a spare core); otherwise all-reduce the
    /// whole gradient in place after the backward pass.
    pub overlap: bool,
    /// Gradient buckets for the overlapped all-reduce, in bytes.
    pub bucket_bytes: usize,
    /// A worker silent for this long is declared dead.
    pub heartbeat_timeout_ms: u64,
    /// A collective waiting this long for a peer fails, naming the peer.
    pub collective_timeout_ms: u64,
    /// Whether tensor frames carry a crc32c of their payload (headers always do).
    /// Off trades end-to-end checking for ~20% more all-reduce bandwidth on loopback.
    pub tensor_crc: bool,
    /// How ranks on the same machine (same boot, same network namespace) exchange
    /// tensors: `auto` uses shared memory (falling back to TCP, with the reason
    /// logged, when a segment cannot be made), `tcp` always uses TCP.
    pub transport: Transport,
    /// Parameter-server shards. 0: workers all-reduce; more: workers pull
    /// parameters from and push gradients to this many `sinter server` processes.
    pub servers: u32,
    /// Parameter server: when a worker may read (`bsp`, `ssp` or `async`).
    pub consistency: ConsistencyMode,
    /// Parameter server, `ssp`: how many steps a worker may run ahead of the slowest.
    pub staleness: u32,
    /// Parameter server: how many of the most frequent table rows (found by a
    /// frequency sketch over rank 0's partition) are placed explicitly to
    /// balance shard load; 0 places every row by consistent hashing.
    pub hot_keys: usize,
    /// Parameter server: virtual nodes per shard on the consistent-hash ring.
    pub vnodes: u32,
    /// Parameter server: server processes per shard. 1: a lost server stops
    /// the job. 2: each shard has a primary and a backup that applies every
    /// push before it is acknowledged; a lost primary's backup takes over, and
    /// the launcher starts a replacement that becomes the new backup.
    pub replicas: u32,
    /// File holding the shared secret peers authenticate with; the
    /// `SINTER_SECRET` environment variable is used when absent; the launcher
    /// makes a fresh one for a local cluster.
    pub secret_file: Option<PathBuf>,
    /// Survive the loss of workers. All-reduce jobs: the survivors regroup
    /// and continue, and workers that join a running job are taken in.
    /// Parameter-server jobs: a worker that joins takes the lost worker's rank
    /// and continues its partition from the step the shards have from it.
    /// Off: the first lost worker stops the job, naming it.
    pub elastic: bool,
    /// Elastic parameter-server jobs: a lost worker's rank left without a
    /// replacement this long stops the job, naming the rank.
    pub replace_timeout_ms: u64,
    /// Elastic jobs: fewer workers than this left stops the job.
    pub min_workers: u32,
    /// Elastic jobs: joins beyond this many workers are refused (0: `workers`).
    pub max_workers: u32,
    /// `sinter train`, elastic jobs: how many lost workers the launcher
    /// replaces with new processes over the whole run.
    pub max_restarts: u32,
}

impl ClusterConfig {
    /// `max_workers`, with 0 meaning `workers`.
    pub fn max_workers_or_workers(&self) -> u32 {
        if self.max_workers == 0 {
            self.workers
        } else {
            self.max_workers
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            sync: SyncMode::Allreduce,
            average_every: 1,
            overlap: false,
            bucket_bytes: 256 * 1024,
            heartbeat_timeout_ms: 5_000,
            collective_timeout_ms: 8_000,
            tensor_crc: true,
            transport: Transport::Auto,
            servers: 0,
            consistency: ConsistencyMode::Bsp,
            staleness: 4,
            hot_keys: 1024,
            vnodes: ps::placement::VNODES_DEFAULT,
            replicas: 1,
            secret_file: None,
            elastic: false,
            replace_timeout_ms: 10_000,
            min_workers: 1,
            max_workers: 0,
            max_restarts: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// All-reduce the gradients every step (synchronous data parallelism).
    Allreduce,
    /// Local SGD: `average_every` local steps, then average the parameters.
    LocalSgd,
}

/// When a parameter-server worker may read (see `ps::shard`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsistencyMode {
    Bsp,
    Ssp,
    Async,
}

impl ClusterConfig {
    /// The parameter servers' consistency rule.
    pub fn consistency(&self) -> ps::Consistency {
        match self.consistency {
            ConsistencyMode::Bsp => ps::Consistency::Bsp,
            ConsistencyMode::Ssp => ps::Consistency::Ssp {
                staleness: self.staleness,
            },
            ConsistencyMode::Async => ps::Consistency::Async,
        }
    }
}

/// `cluster.transport`: how co-located ranks exchange tensors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Shared memory with ranks on the same machine, TCP with the others.
    #[default]
    Auto,
    /// TCP with every rank.
    Tcp,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Auto => "auto",
            Transport::Tcp => "tcp",
        })
    }
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Transport::Auto),
            "tcp" => Ok(Transport::Tcp),
            _ => Err(format!("unknown transport `{s}` (auto or tcp)")),
        }
    }
}

fn default_true() -> bool {
    true
}

impl JobConfig {
    /// Reads `path`, applies `key=value` overrides and validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, JobError> {
        let text = std::fs::read_to_string(path).map_err(|e| JobError::Config {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        Self::parse(&text, path, overrides)
    }

    /// Parses TOML text (`origin` names it in errors), applies overrides and validates.
    pub fn parse(text: &str, origin: &Path, overrides: &[String]) -> Result<Self, JobError> {
        let err = |why: String| JobError::Config {
            path: origin.to_path_buf(),
            why,
        };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| err(e.to_string()))?;
        for o in overrides {
            apply_override(&mut table, o).map_err(|why| err(format!("--set {o}: {why}")))?;
        }
        let mut cfg: JobConfig = table.try_into().map_err(|e: toml::de::Error| err(e.to_string()))?;
        cfg.resolve_paths(origin);
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    /// Relative data paths are relative to the config file's directory when
    /// they exist there, else to the current directory.
    fn resolve_paths(&mut self, origin: &Path) {
        let base = origin.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.exists() && base.join(&*p).exists() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data.train);
        if let Some(t) = self.data.test.as_mut() {
            fix(t);
        }
    }

    fn validate(&self) -> Result<(), String> {
        let t = &self.train;
        let c = &self.cluster;
        if let Some(f) = &self.fl {
            f.validate().map_err(|e| e.to_string())?;
            if !f.partition.starts_with("file:") {
                f.partition
                    .parse::<data::ClientSplit>()
                    .map_err(|e| format!("config key fl.partition: {e}"))?;
            }
        }
        if t.epochs == 0 {
            return Err("train.epochs must be at least 1".into());
        }
        if t.batch_size == 0 {
            return Err("train.batch_size must be at least 1".into());
        }
        if c.workers == 0 || c.workers > crate::WORKERS_MAX {
            return Err(format!("cluster.workers must be in 1..={}", crate::WORKERS_MAX));
        }
        if t.batch_size < c.workers as usize {
            return Err(format!(
                "train.batch_size {} is smaller than cluster.workers {}: every worker needs at least one row per step",
                t.batch_size, c.workers
            ));
        }
        if !(1..=2).contains(&c.replicas) || (c.replicas > 1 && c.servers == 0) {
            return Err("cluster.replicas must be 1, or 2 with cluster.servers".into());
        }
        if c.servers > crate::SERVERS_MAX {
            return Err(format!("cluster.servers must be in 0..={}", crate::SERVERS_MAX));
        }
        if c.servers > 0 && c.sync == SyncMode::LocalSgd {
            return Err("cluster.sync = \"local_sgd\" averages parameters between workers; it does not combine with cluster.servers".into());
        }
        if c.hot_keys > crate::HOT_KEYS_MAX {
            return Err(format!("cluster.hot_keys must be at most {}", crate::HOT_KEYS_MAX));
        }
        if c.vnodes == 0 || c.vnodes > ps::placement::VNODES_MAX {
            return Err(format!("cluster.vnodes must be in 1..={}", ps::placement::VNODES_MAX));
        }
        if c.average_every == 0 {
            return Err("cluster.average_every must be at least 1".into());
        }
        if c.elastic && c.servers > 0 && c.replace_timeout_ms < 100 {
            return Err("cluster.replace_timeout_ms must be at least 100 ms".into());
        }
        if c.elastic && (c.min_workers == 0 || c.min_workers > c.workers || c.max_workers_or_workers() < c.workers) {
            return Err(format!(
                "cluster.min_workers ({}) must be in 1..=workers ({}) and cluster.max_workers ({}) at least workers",
                c.min_workers, c.workers, c.max_workers
            ));
        }
        if c.max_workers > crate::WORKERS_MAX {
            return Err(format!("cluster.max_workers must be at most {}", crate::WORKERS_MAX));
        }
        if c.heartbeat_timeout_ms < 100 || c.collective_timeout_ms < 100 {
            return Err("cluster timeouts must be at least 100 ms".into());
        }
        if t.eval_every_epochs == 0 || self.checkpoint.every_epochs == 0 {
            return Err("train.eval_every_epochs and checkpoint.every_epochs must be at least 1".into());
        }
        if self.checkpoint.keep_last == 0 {
            return Err("checkpoint.keep_last must be at least 1".into());
        }
        self.compress.validate()?;
        if self.compress.momentum > 0.0 {
            match &self.optim {
                optim::OptimConfig::Sgd(sgd) if sgd.momentum == 0.0 => {}
                optim::OptimConfig::Sgd(_) => {
                    return Err("compress.momentum moves SGD's momentum before compression; set optim.momentum = 0 so that it is applied once".into());
                }
                _ => return Err("compress.momentum is SGD momentum: it needs optim.kind = \"sgd\"".into()),
            }
        }
        if self.compress.is_active() && c.servers > 0 {
            // Pushes carry each shard's dense part as one message.
            if !self.compress.groups.is_empty() || self.compress.momentum > 0.0 {
                return Err("with cluster.servers, compress takes one codec for the whole push: compress.groups and compress.momentum apply to all-reduce only".into());
            }
            if matches!(self.compress.codec, codec::CodecSpec::PowerSgd { .. }) {
                return Err("compress.codec = \"powersgd\" needs the all-reduce (its factors are summed); parameter-server pushes take the other codecs".into());
            }
        }
        if self.compress.momentum > 0.0 && c.sync == SyncMode::LocalSgd {
            // Local SGD compresses the parameters' change between averages, and no
            // gradient crosses the wire: each worker's optimizer keeps its own momentum.
            return Err("compress.momentum corrects gradients before they are compressed, but cluster.sync = \"local_sgd\" exchanges parameter deltas, not gradients: leave compress.momentum at 0 and keep momentum in the optimizer (optim.momentum)".into());
        }
        Ok(())
    }
}

/// Applies one `a.b.c=value` override. The value is parsed as a TOML value
/// (`3`, `0.5`, `true`, `[256, 128]`, `"x"`), and taken as a string when it
/// does not parse, so `--set data.train=path/to/file` works unquoted.
fn apply_override(table: &mut toml::Table, spec: &str) -> Result<(), String> {
    let (key, raw) = spec.split_once('=').ok_or("expected key=value")?;
    let key = key.trim();
    if key.is_empty() {
        return Err("empty key".into());
    }
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").ok_or("no value")?,
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    let (last, parents) = parts.split_last().ok_or("empty key")?;
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| format!("{p} is not a table"))?;
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        [data]
        train = "data/fashion-mnist"
        [model]
        kind = "mlp"
        hidden = [256, 256]
        [optim]
        kind = "sgd"
        lr = 0.05
        momentum = 0.9
    "#;

    #[test]
    fn overrides_apply_to_nested_keys_with_typed_values() {
        let o = [
            "train.epochs=3".to_string(),
            "optim.lr=0.1".into(),
            "model.hidden=[64]".into(),
        ];
        let c = JobConfig::parse(BASE, Path::new("x.toml"), &o).expect("valid");
        assert_eq!(c.train.epochs, 3);
        assert_eq!(c.cluster.workers, 1);
        let shown = format!("{:?}", c.model);
        assert!(shown.contains("64"), "{shown}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_the_file_name() {
        let e = JobConfig::parse(BASE, Path::new("job.toml"), &["train.epoch=3".into()]).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("job.toml") && s.contains("epoch"), "{s}");
        let e = JobConfig::parse(BASE, Path::new("job.toml"), &["train.batch_size=0".into()]).unwrap_err();
        assert!(e.to_string().contains("batch_size"), "{e}");
        let e = JobConfig::parse(BASE, Path::new("job.toml"), &["nonsense".into()]).unwrap_err();
        assert!(e.to_string().contains("key=value"), "{e}");
    }

    #[test]
    fn compress_section_parses_overrides_and_validates() {
        let text = format!(
            "{BASE}\n[compress]\ncodec = \"int8\"\n[[compress.groups]]\nparams = [\"*.bias\"]\ncodec = \"none\"\n"
        );
        let c = JobConfig::parse(&text, Path::new("x.toml"), &["compress.codec=topk:0.01:f16".into()]).expect("valid");
        assert_eq!(c.compress.codec.to_string(), "topk:0.01:f16");
        assert_eq!(c.compress.groups.len(), 1);
        assert!(c.compress.is_active());
        // The launcher hands workers the effective config as TOML: it must read back the same.
        let back = JobConfig::parse(&toml::to_string(&c).expect("ser"), Path::new("y.toml"), &[]).expect("reparse");
        assert_eq!(back.compress, c.compress);
        assert!(
            !JobConfig::parse(BASE, Path::new("x.toml"), &[])
                .expect("valid")
                .compress
                .is_active()
        );
        let e = JobConfig::parse(BASE, Path::new("job.toml"), &["compress.codec=topk:3".into()]).unwrap_err();
        assert!(
            e.to_string().contains("job.toml") && e.to_string().contains("fraction must be in (0, 1]"),
            "{e}"
        );
        let e = JobConfig::parse(BASE, Path::new("job.toml"), &["compress.codek=int8".into()]).unwrap_err();
        assert!(e.to_string().contains("codek"), "{e}");
        // Local SGD compresses its parameter deltas; gradient momentum correction has nothing to act on.
        let local_sgd = ["compress.codec=int8".to_string(), "cluster.sync=\"local_sgd\"".into()];
        let c = JobConfig::parse(BASE, Path::new("job.toml"), &local_sgd).expect("compressed local SGD");
        assert_eq!(c.cluster.sync, SyncMode::LocalSgd);
        let mut with_momentum = local_sgd.to_vec();
        with_momentum.extend(["compress.momentum=0.9".to_string(), "optim.momentum=0".into()]);
        let e = JobConfig::parse(BASE, Path::new("job.toml"), &with_momentum).unwrap_err();
        assert!(
            e.to_string().contains("compress.momentum") && e.to_string().contains("local_sgd"),
            "{e}"
        );
        let c = JobConfig::parse(BASE, Path::new("x.toml"), &["train.eval_every_steps=50".into()]).expect("valid");
        assert_eq!(c.train.eval_every_steps, 50);
    }

    #[test]
    fn unquoted_path_override_is_a_string() {
        let c = JobConfig::parse(BASE, Path::new("x.toml"), &["data.train=/tmp/a.svm".into()]).expect("valid");
        assert_eq!(c.data.train, PathBuf::from("/tmp/a.svm"));
    }
}
