//! The `sinter` binary: parses flags, loads and validates config, sets up
//! logging, dispatches to the library, and maps failures to exit codes.
//! No training, networking or file-format logic lives here.

mod progress;
mod units;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use node::config::JobConfig;

/// Prints a line on stdout. A reader that went away (`sinter checkpoint inspect DIR | head`)
/// is not an error, and must not stop a training run that prints JSON lines.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Exit codes (documented in the README).
use node::error::exit;

#[derive(Parser)]
#[command(name = "sinter", version, about = "Distributed machine-learning training")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model as described by a TOML config file.
    Train(TrainArgs),
    /// Generate or inspect data sets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Inspect or verify checkpoints.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Run the coordinator of a cluster (rendezvous, membership, failure detection).
    Coordinator(CoordinatorArgs),
    /// Measure Sinter against physical limits and peers.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run one worker of a cluster; finds the coordinator through MASTER_ADDR/MASTER_PORT
    /// (or DMLC_PS_ROOT_URI/DMLC_PS_ROOT_PORT) and takes RANK/WORLD_SIZE if set.
    Worker(WorkerArgs),
    /// Deterministic simulation of the protocols under faults (`--fuzz` for many
    /// seeds, `--reproduce SEED` to replay one), or scale prediction (`--predict`).
    Sim(Box<SimArgs>),
    /// Federated learning: clients that keep their data train one model in rounds.
    #[command(subcommand)]
    Fl(FlCommand),
    /// Run one parameter-server shard of a cluster; finds the coordinator through
    /// DMLC_PS_ROOT_URI/DMLC_PS_ROOT_PORT (or MASTER_ADDR/MASTER_PORT). Takes its
    /// model, optimizer and placement from worker 0: no config file needed.
    Server(ServerArgs),
}

#[derive(Args)]
struct SimArgs {
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Workers; with --predict a comma-separated list (up to 4096).
    #[arg(long, default_value = "4")]
    workers: String,
    /// Parameter-server shards (0: all-reduce).
    #[arg(long, default_value_t = 0)]
    servers: u32,
    /// none, all, or a comma-separated list of delay, loss, partition, crash, slow.
    #[arg(long, default_value = "all")]
    faults: String,
    #[arg(long, default_value_t = 20)]
    steps: u64,
    /// bsp, ssp or async (parameter-server jobs).
    #[arg(long, default_value = "ssp")]
    consistency: String,
    #[arg(long, default_value_t = 2)]
    staleness: u32,
    /// Write the whole trace (one line per event) to this file.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Replay fuzz seed SEED with its trace's last events.
    #[arg(long, value_name = "SEED")]
    reproduce: Option<u64>,
    /// Run seeds --seed .. --seed + --seeds, each a random job shape and fault mix.
    #[arg(long)]
    fuzz: bool,
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    /// Test-only: switch a known protocol bug back on (ssp-off-by-one).
    #[arg(long, hide = true)]
    bug: Option<String>,
    /// Predict step time, throughput and scaling efficiency instead.
    #[arg(long)]
    predict: bool,
    /// Model size in f32 parameters (e.g. 100M).
    #[arg(long, default_value = "100M")]
    params: String,
    /// One worker's compute per step, in ms (a worker's epoch line reports it as
    /// `step_time`); with --host-cores, its CPU time (`compute_cpu_ms`).
    #[arg(long, default_value_t = 100.0)]
    compute_ms: f64,
    /// Samples per worker per step.
    #[arg(long, default_value_t = 32)]
    batch: u64,
    /// Link rate (e.g. 25gbit, 100mbit).
    #[arg(long, default_value = "25gbit")]
    bandwidth: String,
    #[arg(long, default_value_t = 10.0)]
    latency_us: f64,
    /// Bytes each NIC sends at once after a pause, each way: tbf's `burst`, or with a peak rate the smaller of `burst` and its `mtu` (e.g. 32KiB, tc's 32kb); 0: none, as a real NIC.
    #[arg(long, default_value = "0")]
    burst: String,
    /// Cores every node's compute and communication share (all processes on one
    /// machine); 0: each node has its own.
    #[arg(long, default_value_t = 0)]
    host_cores: u32,
    /// Most commands one simulated collective plans before real segments travel
    /// together (fewer: faster, less pipelining inside a chunk).
    #[arg(long, default_value_t = sim::predict::COMMANDS_BUDGET)]
    commands_budget: u64,
    /// allreduce and/or ps, comma-separated.
    #[arg(long, default_value = "allreduce")]
    strategy: String,
    /// Codecs, comma-separated (none, topk:0.01:f16, int8, ...).
    #[arg(long, default_value = "none")]
    codec: String,
    /// Codec encode and decode GB/s (default: this machine's `sinter bench codec` figures).
    #[arg(long, num_args = 2, value_names = ["ENCODE", "DECODE"])]
    codec_gbps: Vec<f64>,
    /// How many times slower this host's cores are than when the default CPU
    /// costs were measured (`sinter bench codec`); every CPU cost of the
    /// exchange is scaled by it. A job's own `compute_cpu_ms` against the same
    /// compute alone measures it on a shared host.
    #[arg(long, default_value_t = 1.0)]
    cpu_scale: f64,
    /// One JSON object per prediction.
    #[arg(long)]
    json: bool,
    /// Write the efficiency plot (SVG) here.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Args)]
struct ServerArgs {
    /// Must match the coordinator's.
    #[arg(long, default_value_t = 5_000)]
    heartbeat_timeout_ms: u64,
    /// A reply a worker does not take within this long fails the server.
    #[arg(long, default_value_t = 30_000)]
    write_timeout_ms: u64,
    /// Server processes per shard (`cluster.replicas`); must match the coordinator's.
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// File holding the shared secret (default: the SINTER_SECRET variable).
    #[arg(long)]
    secret_file: Option<PathBuf>,
}

#[derive(Args)]
struct CoordinatorArgs {
    /// Address to listen on; default 0.0.0.0:$MASTER_PORT (or $DMLC_PS_ROOT_PORT).
    #[arg(long)]
    listen: Option<String>,
    /// Number of workers; default $WORLD_SIZE (or $DMLC_NUM_WORKER).
    #[arg(long)]
    world: Option<u32>,
    /// Number of parameter-server shards; default $DMLC_NUM_SERVER, else 0.
    #[arg(long)]
    servers: Option<u32>,
    /// Server processes per shard: 2 runs a primary and a backup of each (`cluster.replicas`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
    replicas: u32,
    /// The job's checkpoint directory: a restarted coordinator continues the
    /// membership generations of the newest checkpoint there.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Elastic job, as MIN:MAX workers (torchrun's --nnodes form): lost
    /// workers no longer stop the job while MIN are left, and up to MAX may
    /// join. With --servers, a joining worker takes a lost worker's rank.
    #[arg(long, value_parser = parse_min_max)]
    elastic: Option<(u32, u32)>,
    /// Elastic parameter-server jobs: how long a lost worker's rank may wait for a replacement.
    #[arg(long, default_value_t = 10_000)]
    replace_timeout_ms: u64,
    #[arg(long, default_value_t = 5_000)]
    heartbeat_timeout_ms: u64,
    #[arg(long, default_value_t = COORDINATOR_RENDEZVOUS_TIMEOUT_MS)]
    rendezvous_timeout_ms: u64,
    /// File holding the shared secret (default: the SINTER_SECRET variable).
    #[arg(long)]
    secret_file: Option<PathBuf>,
}

/// How long `sinter coordinator` waits for every worker to join, by default.
const COORDINATOR_RENDEZVOUS_TIMEOUT_MS: u64 = 120_000;

#[derive(Subcommand)]
enum BenchCommand {
    /// All-reduce bandwidth and latency between worker processes (nccl-tests convention).
    Allreduce(AllreduceArgs),
    /// Parameter-server key updates/s, pull/push latency and per-shard load.
    Ps(PsArgs),
    /// Gradient codecs on one core: encode and decode GB/s, compression ratio and
    /// error, on real gradients (the Fashion-MNIST MLP's first SGD steps), and
    /// GB/s of the runtime's whole compressed exchange around each (median step).
    Codec(CodecArgs),
}

#[derive(Args)]
struct CodecArgs {
    /// Gradients to compress, e.g. 25MiB (f32 bytes).
    #[arg(long, default_value = "25MiB")]
    size: String,
    /// Codecs, comma-separated (default: every codec family; see `codec::CodecSpec`).
    #[arg(long, value_delimiter = ',')]
    codecs: Vec<String>,
    /// Fashion-MNIST IDX directory.
    #[arg(long, default_value = "data/fashion-mnist")]
    data: PathBuf,
    /// Least time per codec and direction; the fastest run counts.
    #[arg(long, default_value_t = 1000)]
    min_time_ms: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// One JSON object per codec on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PsArgs {
    #[arg(long, default_value_t = 2)]
    servers: u32,
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Distinct keys in each pull and push.
    #[arg(long, default_value_t = 1000)]
    keys_per_push: usize,
    /// Zipf exponent of key popularity.
    #[arg(long, default_value_t = 1.2)]
    zipf: f64,
    /// The table has 2^key_bits rows.
    #[arg(long, default_value_t = 22)]
    key_bits: u32,
    /// Pull+push steps per worker.
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    /// Hot keys placed to balance the shards (0: consistent hashing alone).
    #[arg(long, default_value_t = 1024)]
    hot_keys: usize,
    /// bsp, ssp or async.
    #[arg(long, default_value = "async")]
    consistency: String,
    #[arg(long, default_value_t = 4)]
    staleness: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The shard engines in this process without a network: the ceiling.
    #[arg(long)]
    inproc: bool,
    /// Server processes per shard: 2 replicates each shard (primary and backup).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
    replicas: u32,
    /// Counter model: every push adds 1 to each of its keys; rank 0 checks the
    /// final table against every push (lost or doubled updates).
    #[arg(long)]
    counter: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Internal: run as one bench worker of a cluster.
    #[arg(long, hide = true)]
    worker: bool,
}

#[derive(Args)]
struct AllreduceArgs {
    /// Worker processes to start on loopback.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Message sizes, e.g. 4KiB,1MiB,25MiB,100MiB.
    #[arg(long, default_value = "4KiB,1MiB,25MiB,100MiB")]
    sizes: String,
    /// One JSON object per size on stdout.
    #[arg(long)]
    json: bool,
    /// Run as one worker of an existing cluster (found through MASTER_ADDR/RANK/WORLD_SIZE).
    #[arg(long)]
    worker: bool,
    /// A collective waiting longer than this for a peer fails, naming it.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// Send tensor payloads without a crc32c (headers are still checked).
    #[arg(long)]
    no_tensor_crc: bool,
    /// How workers on this machine exchange tensors: auto (shared memory) or tcp.
    #[arg(long, default_value = "auto")]
    transport: node::config::Transport,
}

#[derive(Args)]
struct WorkerArgs {
    /// The job's config file.
    #[arg(long)]
    config: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from the newest good checkpoint in this directory.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Reports as JSON lines on stdout (the launcher reads these).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// The job's config file (see examples/).
    config: PathBuf,
    /// Override a config key, e.g. `--set optim.lr=0.1` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// One JSON object per line on stdout: per epoch, and `{"event":"done"}` last.
    #[arg(long)]
    json: bool,
    /// Continue from the newest good checkpoint in this directory.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Number of worker processes (overrides `cluster.workers`).
    #[arg(long)]
    workers: Option<u32>,
    /// Number of parameter-server shards (overrides `cluster.servers`; 0 = all-reduce).
    #[arg(long)]
    servers: Option<u32>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Subcommand)]
enum FlCommand {
    /// A whole federation in this process: N virtual clients, each with its part of
    /// `data.train` split by `fl.partition`, trained on a pool of threads.
    Sim(FlSimArgs),
    /// The federation's server: admits clients, runs the rounds, evaluates the
    /// global model on `data.test` and prints a line per round.
    Server(FlServerArgs),
    /// A client: trains on its own `data.train` when the server asks and sends back its update.
    Client(FlClientArgs),
}

#[derive(Args)]
struct FlServerArgs {
    config: PathBuf,
    /// Address to listen on (port 0: any free port; the `listening` line says which).
    #[arg(long, default_value = "0.0.0.0:7070")]
    listen: String,
    /// File holding the shared secret (default: the SINTER_SECRET variable).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// One JSON object per event (listening, joined, left, round_start, round, refused) and `done`.
    #[arg(long)]
    json: bool,
    /// Continue from the newest good checkpoint in this directory (`checkpoint.dir` writes them).
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
}

#[derive(Args)]
struct FlClientArgs {
    /// The server's HOST:PORT.
    #[arg(long)]
    server: String,
    /// The client's config: its own `data.train`, and the `[model]` the server also runs.
    #[arg(long)]
    config: PathBuf,
    /// The client's name, kept across reconnections (default: client-PID).
    #[arg(long)]
    name: Option<String>,
    /// Train on part I of N of data.train, split by fl.partition (a federation on one machine).
    #[arg(long, value_name = "I/N")]
    part: Option<String>,
    /// Give up when the server could not be reached for this long.
    #[arg(long, default_value_t = 60_000)]
    connect_timeout_ms: u64,
    /// Take the connection as lost when the server sends nothing for this long.
    #[arg(long, default_value_t = 600_000)]
    idle_timeout_ms: u64,
    /// File holding the shared secret (default: the SINTER_SECRET variable).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct FlSimArgs {
    config: PathBuf,
    /// Virtual clients (overrides `fl.clients`).
    #[arg(long)]
    clients: Option<usize>,
    /// Threads that train clients at once (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Override a config key, e.g. `--set fl.rounds=5` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// One JSON object per round and a final `done` line on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write a synthetic data set (train and test files, plus FILE.meta.json).
    Gen(GenArgs),
    /// Print rows, features, non-zeros and label balance of a data file.
    Inspect {
        path: PathBuf,
        /// Hash sparse feature ids into 2^bits buckets.
        #[arg(long)]
        hash_bits: Option<u32>,
    },
    /// Split a data file among federated clients: one file per client in --out,
    /// with partition.json and a report of the label and size skew.
    Partition(PartitionArgs),
}

#[derive(Args)]
struct PartitionArgs {
    input: PathBuf,
    #[arg(long)]
    clients: usize,
    /// iid, dirichlet:ALPHA (label skew), shards:K (K label-sorted shards each),
    /// quantity:BETA (size skew), or file:PATH (the client of every row, one a line).
    #[arg(long, default_value = "iid")]
    scheme: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
    /// libsvm, csv or parquet (default: csv for dense data, libsvm for sparse).
    #[arg(long, default_value = "")]
    format: String,
    /// Hash sparse feature ids into 2^bits buckets.
    #[arg(long)]
    hash_bits: Option<u32>,
}

#[derive(Args)]
struct GenArgs {
    /// `click` (sparse binary, Zipf features, planted logistic model) or `dense` (classes).
    kind: String,
    /// Training data file to write; the test split goes beside it (`*.test.*`) unless --test-out.
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    test_out: Option<PathBuf>,
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    #[arg(long, default_value_t = 100_000)]
    test_rows: u64,
    /// Click data: hashed feature space is 2^bits.
    #[arg(long, default_value_t = 20)]
    hash_bits: u32,
    /// Click data: mean non-zeros per row.
    #[arg(long, default_value_t = 40.0)]
    nnz: f64,
    /// Click data: Zipf exponent of feature frequencies.
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Dense data: features per row.
    #[arg(long, default_value_t = 32)]
    dim: usize,
    /// Dense data: number of classes.
    #[arg(long, default_value_t = 4)]
    classes: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `libsvm`, `parquet` or `csv` (dense only).
    #[arg(long, default_value = "libsvm")]
    format: String,
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// List the checkpoints in a directory with their step, epoch and files.
    Inspect { dir: PathBuf },
    /// Check every file's length and checksum; exits non-zero on the first bad one.
    Verify { dir: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Train(a) => train(a),
        Command::Data(d) => data_command(d),
        Command::Checkpoint(c) => checkpoint_command(c),
        Command::Coordinator(a) => coordinator(a),
        Command::Worker(a) => worker(a),
        Command::Server(a) => server(a),
        Command::Sim(a) => sim_command(*a),
        Command::Fl(f) => fl_command(f),
        Command::Bench(BenchCommand::Allreduce(a)) => bench_allreduce(a),
        Command::Bench(BenchCommand::Ps(a)) => bench_ps(a),
        Command::Bench(BenchCommand::Codec(a)) => bench_codec(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One write: the workers of a local cluster share the launcher's stderr,
            // and a message written in pieces interleaves with theirs.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!("error: {}\n", describe_chain(&e)).as_bytes(),
            );
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The error and its causes, once each: many library errors already quote their
/// cause in their own message, and printing the chain would repeat it.
fn describe_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SINTER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not in logs captured to a file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn exit_code(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<node::JobError>()
        .map_or(exit::FAILURE, node::JobError::exit_code)
}

fn train(a: TrainArgs) -> Result<()> {
    let mut overrides = a.overrides.clone();
    if let Some(w) = a.workers {
        overrides.push(format!("cluster.workers={w}"));
    }
    if let Some(s) = a.servers {
        overrides.push(format!("cluster.servers={s}"));
    }
    let cfg = JobConfig::load(&a.config, &overrides)?;
    tracing::info!(config = ?cfg, "effective config");
    if cfg.fl.is_some() {
        return train_federation(&cfg, a.json);
    }
    let mut console = progress::Console::new(a.json, a.quiet);
    let summary = launch::run(cfg, a.resume.as_deref(), &mut console);
    console.finish();
    let summary = summary?;
    if !summary.servers.is_empty() && !a.json && !a.quiet {
        eprintln!("{}", node::server::describe_shards(&summary.servers));
    }
    let mut done = serde_json::to_value(&summary).context("summary to JSON")?;
    done["event"] = "done".into();
    console.json_line(&done);
    Ok(())
}

/// `sinter train` with an `[fl]` section: a server and `fl.clients` client processes on loopback.
fn train_federation(cfg: &JobConfig, json: bool) -> Result<()> {
    let rounds = cfg.fl.as_ref().map_or(0, |f| f.rounds);
    let done = launch::federation::run(cfg, &mut |v| print_fl_line(v, rounds, json))?;
    print_fl_line(&done, rounds, json);
    Ok(())
}

fn load_secret(file: Option<&std::path::Path>) -> Result<node::net::Secret> {
    Ok(match file {
        Some(f) => node::net::Secret::from_file(f)?,
        None => node::net::Secret::from_env("SINTER_SECRET")?,
    })
}

fn coordinator(a: CoordinatorArgs) -> Result<()> {
    let env = node::env::ClusterEnv::from_process()?;
    let listen = match a.listen {
        Some(l) => l,
        None => {
            let port = env
                .coordinator_port
                .context("no --listen and no MASTER_PORT / DMLC_PS_ROOT_PORT")?;
            // Every address of the coordinator's family: `[::]` for an IPv6 MASTER_ADDR.
            let any = if env.coordinator.as_deref().is_some_and(|c| c.starts_with('[')) {
                "::"
            } else {
                "0.0.0.0"
            };
            node::env::host_port(any, port)
        }
    };
    let world = a
        .world
        .or(env.world)
        .context("no --world and no WORLD_SIZE / DMLC_NUM_WORKER")?;
    let secret = load_secret(a.secret_file.as_deref())?;
    let listener = node::net::listen(&listen)?;
    let addr = listener.local_addr().context("listener address")?;
    let saved = a.checkpoint_dir.as_deref().and_then(node::coord::saved_generation);
    out!(
        "{}",
        serde_json::json!({
            "listening": addr.to_string(),
            "world": world,
            "continues_after": saved.map(|(generation, step)| serde_json::json!({"generation": generation, "step": step})),
        })
    );
    let outcome = node::coord::run(
        listener,
        node::coord::CoordinatorConfig {
            world,
            servers: a.servers.or(env.servers).unwrap_or(0),
            heartbeat_timeout_ms: a.heartbeat_timeout_ms,
            rendezvous_timeout_ms: a.rendezvous_timeout_ms,
            continue_after: saved.map_or(0, |(generation, _)| generation),
            replicas: a.replicas,
            on_shard: Some(|v| out!("{}", node::coord::shard_json(v))),
            elastic: a.elastic.map(|(min_workers, max_workers)| node::coord::Elastic {
                min_workers,
                max_workers,
                settle_ms: node::coord::REGROUP_SETTLE_MS,
                replace_timeout_ms: a.replace_timeout_ms,
            }),
        },
        secret,
    )?;
    match outcome {
        node::coord::Outcome::Finished => Ok(()),
        node::coord::Outcome::Failed { rank, reason } => {
            // The launcher reads this line to name the rank at fault.
            out!(
                "{}",
                serde_json::json!({ "event": "failed", "rank": rank, "reason": reason })
            );
            Err(match rank {
                Some(rank) => node::JobError::Peer { rank, why: reason },
                None => node::JobError::Coordinator(reason),
            }
            .into())
        }
    }
}

fn server(a: ServerArgs) -> Result<()> {
    let secret = load_secret(a.secret_file.as_deref())?;
    let env = node::env::ClusterEnv::from_process()?;
    let report = node::server::run(
        &env,
        &secret,
        &node::server::ServerOptions {
            heartbeat_timeout_ms: a.heartbeat_timeout_ms,
            write_timeout_ms: a.write_timeout_ms,
            replicas: a.replicas,
        },
    )?;
    let mut line = serde_json::to_value(&report).context("server report to JSON")?;
    line["event"] = "server".into();
    out!("{line}");
    Ok(())
}

fn worker(a: WorkerArgs) -> Result<()> {
    // ps-lite's convention: one command line for every role, DMLC_ROLE picks it.
    let cfg = JobConfig::load(&a.config, &a.overrides)?;
    let env = node::env::ClusterEnv::from_process()?;
    let c = &cfg.cluster;
    match env.role {
        Some(node::env::Role::Server) => {
            return server(ServerArgs {
                heartbeat_timeout_ms: c.heartbeat_timeout_ms,
                write_timeout_ms: c.collective_timeout_ms.max(30_000),
                replicas: c.replicas,
                secret_file: c.secret_file.clone(),
            });
        }
        Some(node::env::Role::Scheduler) => {
            // World and servers come from DMLC_NUM_WORKER and DMLC_NUM_SERVER, the rest from the config.
            return coordinator(CoordinatorArgs {
                listen: None,
                world: None,
                servers: None,
                replicas: c.replicas,
                checkpoint_dir: cfg.checkpoint.dir.clone(),
                elastic: c.elastic.then(|| (c.min_workers, c.max_workers_or_workers())),
                replace_timeout_ms: c.replace_timeout_ms,
                heartbeat_timeout_ms: c.heartbeat_timeout_ms,
                rendezvous_timeout_ms: COORDINATOR_RENDEZVOUS_TIMEOUT_MS,
                secret_file: c.secret_file.clone(),
            });
        }
        Some(node::env::Role::Worker) | None => {}
    }
    let secret = load_secret(cfg.cluster.secret_file.as_deref())?;
    let mut console = progress::Console::new(a.json, true);
    let summary = node::worker::run(cfg, &env, &secret, a.resume.as_deref(), &mut console)?;
    let mut done = serde_json::to_value(&summary).context("summary to JSON")?;
    done["event"] = "done".into();
    console.json_line(&done);
    Ok(())
}

fn bench_allreduce(a: AllreduceArgs) -> Result<()> {
    let sizes = units::f32_sizes(&a.sizes).map_err(|e| anyhow::anyhow!("--sizes: {e}"))?;
    let print = |r: &bench::allreduce::AllreduceResult, json: bool| {
        if json {
            out!("{}", serde_json::to_string(r).unwrap_or_default());
        } else {
            out!(
                "{:>12} B  {} workers  {:<18} algbw {:>7.3} GB/s  busbw {:>7.3} GB/s  p50 {:>10.1} us  {}",
                r.bytes,
                r.workers,
                r.algorithm,
                r.algbw_gbps,
                r.busbw_gbps,
                r.p50_us,
                if r.correct { "correct" } else { "WRONG" }
            );
        }
    };
    if a.worker {
        let env = node::env::ClusterEnv::from_process()?;
        let secret = load_secret(None)?;
        for r in bench::allreduce::allreduce_worker(&env, &secret, &sizes, a.timeout_ms, !a.no_tensor_crc, a.transport)?
        {
            print(&r, true);
        }
        return Ok(());
    }
    let mut args: Vec<std::ffi::OsString> = [
        "bench",
        "allreduce",
        "--worker",
        "--sizes",
        &a.sizes,
        "--timeout-ms",
        &a.timeout_ms.to_string(),
    ]
    .iter()
    .map(Into::into)
    .collect();
    if a.no_tensor_crc {
        args.push("--no-tensor-crc".into());
    }
    args.push("--transport".into());
    args.push(a.transport.to_string().into());
    let mut cluster = launch::LocalCluster::start(a.workers, 5_000, &args)?;
    cluster.supervise(&mut |rank, v| {
        if rank == 0
            && let Ok(r) = serde_json::from_value::<bench::allreduce::AllreduceResult>(v)
        {
            print(&r, a.json);
        }
    })?;
    Ok(())
}

fn sim_command(a: SimArgs) -> Result<()> {
    use sim::cmd;
    let e = |e: String| anyhow::anyhow!(e);
    let bug = a.bug.as_deref().map(str::parse::<sim::Bug>).transpose().map_err(e)?;
    let mut stdout = std::io::stdout().lock();
    let mut trace_file = match &a.trace {
        Some(p) => Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?),
        None => None,
    };
    let trace = trace_file.as_mut().map(|f| f as &mut dyn std::io::Write);
    let held = if a.predict {
        let workers = a
            .workers
            .split(',')
            .map(|w| {
                w.trim()
                    .parse::<u32>()
                    .map_err(|_| anyhow::anyhow!("--workers: `{w}` is not a number"))
            })
            .collect::<Result<Vec<_>>>()?;
        let strategies = a
            .strategy
            .split(',')
            .map(|s| s.trim().parse::<sim::predict::Strategy>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(e)?;
        let base = sim::predict::PredictConfig {
            params: units::count(&a.params).map_err(e)?,
            compute_ns: (a.compute_ms * 1e6).round() as u64,
            batch: a.batch,
            workers: 1,
            servers: a.servers.max(1),
            link: sim::net::LinkSpec {
                burst_bytes: units::bytes(&a.burst).map_err(e)?,
                ..sim::net::LinkSpec::new(
                    units::rate(&a.bandwidth).map_err(e)?,
                    (a.latency_us * 1e3).round() as u64,
                )
            },
            strategy: sim::predict::Strategy::AllReduce,
            codec: codec_none(),
            consistency: cmd::parse_consistency(&a.consistency, a.staleness).map_err(e)?,
            cpu: sim::predict::CpuModel::default(),
            host_cores: a.host_cores,
            commands_budget: a.commands_budget.max(1),
        };
        if !(a.cpu_scale.is_finite() && a.cpu_scale > 0.0) {
            anyhow::bail!("--cpu-scale {} is not a positive factor", a.cpu_scale);
        }
        let run = cmd::PredictRun {
            base,
            workers,
            strategies,
            codecs: cmd::parse_codecs(&a.codec).map_err(e)?,
            codec_gbps: (a.codec_gbps.len() == 2).then(|| (a.codec_gbps[0], a.codec_gbps[1])),
            cpu_scale: a.cpu_scale,
            json: a.json,
        };
        let svg = cmd::predict_table(&run, &mut stdout).map_err(e)?;
        if let Some(p) = &a.plot {
            std::fs::write(p, svg).with_context(|| format!("writing {}", p.display()))?;
        }
        true
    } else if let Some(seed) = a.reproduce {
        cmd::reproduce(seed, bug, trace, &mut stdout).map_err(e)?
    } else if a.fuzz {
        let to = a.seed.checked_add(a.seeds).context("--seed + --seeds overflows")?;
        cmd::fuzz_seeds(a.seed, to, bug, false, &mut stdout).map_err(e)?
    } else {
        let one = cmd::OneRun {
            seed: a.seed,
            workers: a
                .workers
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("--workers: `{}` is not a number", a.workers))?,
            servers: a.servers,
            faults: a.faults.parse().map_err(|m: String| anyhow::anyhow!("--faults: {m}"))?,
            steps: a.steps,
            consistency: cmd::parse_consistency(&a.consistency, a.staleness).map_err(e)?,
            bug,
        };
        cmd::one(&one, trace, &mut stdout).map_err(e)?
    };
    if !held {
        anyhow::bail!("an invariant was violated (see above)");
    }
    Ok(())
}

fn codec_none() -> sim::predict::CodecSpec {
    sim::predict::CodecSpec::None
}

fn bench_codec(a: CodecArgs) -> Result<()> {
    let bytes = match units::f32_sizes(&a.size).map_err(|e| anyhow::anyhow!("--size: {e}"))?[..] {
        [b] => b,
        _ => anyhow::bail!("--size takes one size, e.g. 25MiB"),
    };
    let names: Vec<String> = if a.codecs.is_empty() {
        bench::compression::DEFAULT_SPECS
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        a.codecs.clone()
    };
    let rows = bench::compression::run(&bench::compression::CodecBench {
        data: a.data,
        elems: bytes / 4,
        specs: names,
        min_time: std::time::Duration::from_millis(a.min_time_ms),
        seed: a.seed,
    })?;
    for r in &rows {
        if a.json {
            out!("{}", serde_json::to_string(r).context("row to JSON")?);
        } else {
            let exchange = r
                .exchange_gbps
                .map_or_else(|| "-".to_string(), |g| format!("{g:.2} GB/s"));
            out!(
                "{:<16} {:>10} f32  encode {:>7.2} GB/s  decode {:>7.2} GB/s  ratio {:>7.1}  rel_error {:.3e}  exchange {exchange:>10}",
                r.row.codec,
                r.row.elems,
                r.row.encode_gbps,
                r.row.decode_gbps,
                r.row.ratio,
                r.row.rel_error
            );
        }
    }
    if !a.json
        && let Some(r) = rows.first()
    {
        out!("gradients: {}", r.gradients);
    }
    Ok(())
}

fn bench_ps(a: PsArgs) -> Result<()> {
    let consistency: node::config::ConsistencyMode =
        serde_json::from_value(serde_json::Value::String(a.consistency.clone()))
            .map_err(|_| anyhow::anyhow!("--consistency must be bsp, ssp or async, not `{}`", a.consistency))?;
    let spec = bench::parameter_server::PsBenchSpec {
        servers: a.servers,
        workers: a.workers,
        keys_per_push: a.keys_per_push,
        zipf: a.zipf,
        key_bits: a.key_bits,
        steps: a.steps,
        hot_keys: a.hot_keys,
        consistency,
        staleness: a.staleness,
        seed: a.seed,
        replicas: a.replicas,
        counter: a.counter,
    };
    anyhow::ensure!(
        (1..=24).contains(&a.key_bits) && a.keys_per_push > 0 && a.keys_per_push <= 1 << (a.key_bits - 1),
        "--key-bits must be in 1..=24 and --keys-per-push in 1..=2^(key_bits-1)"
    );
    anyhow::ensure!(
        a.servers > 0 && a.workers > 0 && a.zipf > 0.0,
        "--servers, --workers and --zipf must be positive"
    );
    let print = |r: &bench::parameter_server::PsBenchResult| {
        if a.json {
            out!("{}", serde_json::to_string(r).unwrap_or_default());
        } else {
            out!(
                "{:<8} {} servers {} workers  {:>12.0} key updates/s  pull p50 {:>8.1} us p99 {:>8.1} us  push p50 {:>8.1} us p99 {:>8.1} us  load max/mean keys {:.3} bytes {:.3} requests {:.3}",
                r.mode,
                r.servers,
                r.workers,
                r.key_updates_per_s,
                r.pull_p50_us,
                r.pull_p99_us,
                r.push_p50_us,
                r.push_p99_us,
                r.keys_max_over_mean,
                r.bytes_max_over_mean,
                r.requests_max_over_mean
            );
        }
    };
    if a.inproc {
        print(&bench::parameter_server::inproc(&spec)?);
        return Ok(());
    }
    let env = node::env::ClusterEnv::from_process()?;
    if a.worker {
        let secret = load_secret(None)?;
        let r = bench::parameter_server::worker(&spec, &env, &secret)?;
        out!("{}", serde_json::to_string(&r).context("result to JSON")?);
        return Ok(());
    }
    let mut args: Vec<std::ffi::OsString> = vec!["bench".into(), "ps".into(), "--worker".into()];
    for (k, v) in [
        ("--servers", a.servers.to_string()),
        ("--workers", a.workers.to_string()),
        ("--keys-per-push", a.keys_per_push.to_string()),
        ("--zipf", a.zipf.to_string()),
        ("--key-bits", a.key_bits.to_string()),
        ("--steps", a.steps.to_string()),
        ("--hot-keys", a.hot_keys.to_string()),
        ("--consistency", a.consistency.clone()),
        ("--staleness", a.staleness.to_string()),
        ("--seed", a.seed.to_string()),
        ("--replicas", a.replicas.to_string()),
    ] {
        args.push(k.into());
        args.push(v.into());
    }
    if a.counter {
        args.push("--counter".into());
    }
    let mut cluster = launch::LocalCluster::start_replicated(a.workers, a.servers, a.replicas, 5_000, &args, None)?;
    let mut workers = Vec::new();
    let mut servers = Vec::new();
    cluster.supervise_all(
        &mut |_, v| {
            if let Ok(r) = serde_json::from_value::<bench::parameter_server::PsBenchResult>(v) {
                workers.push(r);
            }
        },
        &mut |_, v| {
            // Replicated shards: who serves each shard, as the coordinator says (for tests and logs).
            if v.get("event").and_then(|e| e.as_str()) == Some("shard") {
                if a.json {
                    out!("{v}");
                }
                return;
            }
            if let Ok(r) = serde_json::from_value::<node::server::ServerReport>(v) {
                servers.push(r);
            }
        },
    )?;
    servers.retain(|s| !s.backup);
    anyhow::ensure!(
        workers.len() == a.workers as usize && servers.len() == a.servers as usize,
        "got {} worker and {} server reports",
        workers.len(),
        servers.len()
    );
    print(&bench::parameter_server::combine(&spec, &workers, &servers));
    Ok(())
}

fn data_command(d: DataCommand) -> Result<()> {
    match d {
        DataCommand::Gen(g) => node::datagen::generate(&node::datagen::GenRequest {
            kind: g.kind,
            out: g.out,
            test_out: g.test_out,
            rows: g.rows,
            test_rows: g.test_rows,
            hash_bits: g.hash_bits,
            nnz: g.nnz,
            zipf: g.zipf,
            dim: g.dim,
            classes: g.classes,
            seed: g.seed,
            format: g.format,
        })
        .map(|report| out!("{report}"))
        .map_err(Into::into),
        DataCommand::Partition(p) => {
            let skew = node::datagen::partition(&node::datagen::PartitionRequest {
                input: p.input,
                clients: p.clients,
                scheme: p.scheme,
                seed: p.seed,
                out: p.out.clone(),
                format: p.format,
                hash_bits: p.hash_bits,
            })?;
            out!("{skew}");
            out!(
                "wrote {} client files and partition.json to {}",
                p.clients,
                p.out.display()
            );
            Ok(())
        }
        DataCommand::Inspect { path, hash_bits } => {
            let summary = node::datagen::inspect(&path, hash_bits)?;
            out!("{summary}");
            Ok(())
        }
    }
}

fn fl_command(f: FlCommand) -> Result<()> {
    match f {
        FlCommand::Server(a) => fl_server(a),
        FlCommand::Client(a) => fl_client(a),
        FlCommand::Sim(a) => {
            let cfg = JobConfig::load(&a.config, &a.overrides)?;
            tracing::info!(config = ?cfg, "effective config");
            let spec = node::fl::sim::SimSpec {
                clients: a.clients,
                threads: a.threads,
            };
            let rounds = cfg.fl.as_ref().map_or(0, |f| f.rounds);
            let summary = node::fl::sim::run(&cfg, &spec, &mut |line| {
                let mut v = serde_json::to_value(line).unwrap_or_default();
                v["event"] = "round".into();
                print_fl_line(&v, rounds, a.json);
            })?;
            print_fl_line(&fl_done(&summary)?, rounds, a.json);
            Ok(())
        }
    }
}

fn fl_server(a: FlServerArgs) -> Result<()> {
    use node::fl::server::ServerEvent;
    let cfg = JobConfig::load(&a.config, &a.overrides)?;
    tracing::info!(config = ?cfg, "effective config");
    let opts = node::fl::server::ServerOptions {
        listen: a.listen.clone(),
        secret: load_secret(a.secret_file.as_deref())?,
        resume: a.resume.clone(),
    };
    let rounds = cfg.fl.as_ref().map_or(0, |f| f.rounds);
    let summary = node::fl::server::run(&cfg, &opts, &mut |ev| {
        let v = match ev {
            ServerEvent::Listening { addr } => serde_json::json!({"event": "listening", "addr": addr}),
            ServerEvent::Joined { client, name, samples } => {
                serde_json::json!({"event": "joined", "client": client, "name": name, "samples": samples})
            }
            ServerEvent::Left { client, why } => serde_json::json!({"event": "left", "client": client, "why": why}),
            ServerEvent::RoundStart { round, sampled } => {
                serde_json::json!({"event": "round_start", "round": round, "sampled": sampled})
            }
            ServerEvent::Refused { client, round, why } => {
                serde_json::json!({"event": "refused", "client": client, "round": round, "why": why})
            }
            ServerEvent::Round(line) => {
                let mut v = serde_json::to_value(line).unwrap_or_default();
                v["event"] = "round".into();
                v
            }
        };
        if a.json {
            out!("{v}");
        } else {
            match v["event"].as_str() {
                Some("round") => out!(
                    "round {}/{rounds}  clients {}  updates {}  dropped {}  test_acc {}  {:.2} s",
                    v["round"],
                    v["clients"],
                    v["updates"],
                    v["dropped"],
                    v["test_acc"],
                    v["wall_s"].as_f64().unwrap_or(0.0)
                ),
                Some("listening") => out!("listening on {}", v["addr"]),
                _ => tracing::info!("{v}"),
            }
        }
    })?;
    print_fl_line(&fl_done(&summary)?, rounds, a.json);
    Ok(())
}

fn fl_done(summary: &node::fl::FlSummary) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(summary).context("summary to JSON")?;
    v["event"] = "done".into();
    Ok(v)
}

/// One line of a federation's server: as it is with `--json`, else as text
/// for the rounds, the address and the end (the rest to the log).
fn print_fl_line(v: &serde_json::Value, rounds: u32, json: bool) {
    if json {
        out!("{v}");
        return;
    }
    let f = |key: &str| v[key].as_f64().unwrap_or(0.0);
    match v["event"].as_str() {
        Some("round") => {
            let metric = match (v["test_acc"].as_f64(), v["test_auc"].as_f64()) {
                (_, Some(auc)) => format!("  test_auc {auc:.4}"),
                (Some(acc), None) => format!("  test_acc {acc:.4}"),
                _ => String::new(),
            };
            out!(
                "round {}/{rounds}  clients {}  updates {}  dropped {}  loss {:.4}{metric}  {:.2} s",
                v["round"],
                v["clients"],
                v["updates"],
                v["dropped"],
                f("train_loss"),
                f("wall_s")
            );
        }
        Some("listening") => out!("listening on {}", v["addr"]),
        Some("done") => out!(
            "done: {} rounds, {} clients, test_acc {}, {:.2} s ({:.2} s in the clients' training), peak RSS {:.1} MiB",
            v["rounds"],
            v["clients"],
            v["test_acc"],
            f("wall_s"),
            f("train_s"),
            f("peak_rss_mb")
        ),
        _ => tracing::info!("{v}"),
    }
}

fn fl_client(a: FlClientArgs) -> Result<()> {
    let cfg = JobConfig::load(&a.config, &a.overrides)?;
    let part = match &a.part {
        None => None,
        Some(p) => {
            let parsed = p
                .split_once('/')
                .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
                .filter(|&(i, n)| i < n);
            Some(parsed.ok_or_else(|| node::JobError::Config {
                path: "--part".into(),
                why: format!("`{p}` is not I/N with I < N"),
            })?)
        }
    };
    let opts = node::fl::client::ClientOptions {
        server: a.server.clone(),
        name: a
            .name
            .clone()
            .unwrap_or_else(|| format!("client-{}", std::process::id())),
        secret: load_secret(a.secret_file.as_deref())?,
        connect_timeout_ms: a.connect_timeout_ms,
        idle_timeout_ms: a.idle_timeout_ms,
        part,
    };
    let summary = node::fl::client::run(&cfg, &opts, &mut |ev| {
        let v = ev.to_json();
        if a.json {
            out!("{v}");
        } else {
            tracing::info!("{v}");
        }
    })?;
    let mut v = serde_json::to_value(&summary).context("summary to JSON")?;
    v["event"] = "done".into();
    if a.json {
        out!("{v}");
    } else {
        out!(
            "done: trained {} of {} rounds on {} rows",
            summary.trained,
            summary.rounds,
            summary.samples
        );
    }
    Ok(())
}

fn checkpoint_command(c: CheckpointCommand) -> Result<()> {
    match c {
        CheckpointCommand::Inspect { dir } => {
            out!("{}", node::state::describe(&dir)?);
            Ok(())
        }
        CheckpointCommand::Verify { dir } => {
            out!("{}", node::state::verify_all(&dir)?);
            Ok(())
        }
    }
}

/// `MIN:MAX`, with 1 <= MIN <= MAX.
fn parse_min_max(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s.split_once(':').ok_or_else(|| format!("`{s}` is not MIN:MAX"))?;
    let min: u32 = a.trim().parse().map_err(|e| format!("MIN `{a}`: {e}"))?;
    let max: u32 = b.trim().parse().map_err(|e| format!("MAX `{b}`: {e}"))?;
    if min == 0 || min > max {
        return Err(format!("`{s}`: need 1 <= MIN <= MAX"));
    }
    Ok((min, max))
}
