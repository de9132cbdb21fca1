//! `sinter bench codec`: each codec's encode and decode speed on one core,
//! compression ratio and error, on real gradients: those of the Fashion-MNIST
//! MLP 784-256-256-10 over its first steps of SGD, concatenated up to the
//! requested size (the model has 269,322 parameters, so 25 MiB is the
//! gradients of 25 consecutive steps).
//!
//! Also the whole exchange the runtime wraps around a codec
//! ([`CompressExchange`], as `sinter train` runs it with `[compress]` and
//! error feedback) on one rank, step after step over the MLP's own tensors:
//! error feedback, the codec per tensor, the compression-error figures,
//! framing, and decoding its own message. Every worker of a compressed
//! all-reduce does this once a step and then decodes each other rank's
//! message, which is what `sinter sim --predict` charges it.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use codec::CodecSpec;
use codec::bench::BenchRow;
use collective::CollectiveConfig;
use data::Batch;
use tensor::{Gradient, Layout, Rng};

use node::comm::Comm;
use node::compress::{CompressExchange, CompressSection};
use node::config::JobConfig;
use node::error::JobError;
use node::train::Exchange;

/// Codecs measured when none are named.
pub const DEFAULT_SPECS: &[&str] = &[
    "none",
    "fp16",
    "bf16",
    "int8",
    "sign",
    "qsgd:15",
    "topk:0.01",
    "topk:0.01:f16",
    "randk:0.01",
    "powersgd:4",
];
/// Rows per SGD step (the example job's global batch).
const BATCH_ROWS: usize = 128;
/// Most f32s of gradients (1 GiB): bounds what `--size` can make this allocate.
pub const ELEMS_MAX: usize = 1 << 28;

/// What to measure.
#[derive(Clone, Debug)]
pub struct CodecBench {
    /// A Fashion-MNIST IDX directory.
    pub data: PathBuf,
    /// f32s of gradients.
    pub elems: usize,
    /// Codec strings (`"topk:0.01"`).
    pub specs: Vec<String>,
    /// Least time per codec and direction.
    pub min_time: Duration,
    pub seed: u64,
}

/// One codec's figures and where the gradients came from.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CodecBenchRow {
    #[serde(flatten)]
    pub row: BenchRow,
    /// `"fashion-mnist mlp 784-256-256-10, steps 1..=S"`.
    pub gradients: String,
    /// GB/s of f32 gradients through the runtime's whole exchange on one
    /// rank (see the module docs); `None` for `none`, which has no exchange.
    pub exchange_gbps: Option<f64>,
}

/// The gradients of the example MLP's first SGD steps (lr 0.05, momentum
/// 0.9, batch 128), concatenated and cut to `elems`; and how many steps that took.
pub fn gradients(data_dir: &Path, elems: usize, seed: u64) -> Result<(Vec<f32>, u64, Layout), JobError> {
    let path = toml::Value::String(data_dir.display().to_string());
    let text = format!(
        "[data]\nformat = \"idx\"\ntrain = {path}\nnormalize = \"standardize\"\n\
         [model]\nkind = \"mlp\"\nhidden = [256, 256]\n\
         [optim]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n"
    );
    let cfg = JobConfig::parse(&text, Path::new("<sinter bench codec>"), &[])?;
    let data = node::job::load_data(&cfg)?;
    let train = &data.train;
    let dim = usize::try_from(train.dim()).map_err(|_| JobError::Config {
        path: data_dir.to_path_buf(),
        why: "feature dimension does not fit in memory".into(),
    })?;
    let mut model = model::build(&cfg.model, dim, train.num_classes as usize)?;
    let layout = model.layout().clone();
    let mut params = vec![0f32; layout.len()];
    model.init(&mut params, &mut Rng::derive(seed, 0x1417));
    let mut opt = optim::Optimizer::new(&cfg.optim, &layout)?;
    let mut grad = Gradient::for_layout(&layout);
    let mut order: Vec<usize> = (0..train.rows()).collect();
    Rng::derive(seed, 0xE90C).shuffle(&mut order);
    let mut batch = Batch::for_dataset(train);
    let mut out = Vec::with_capacity(elems + layout.len());
    let mut steps = 0u64;
    for idx in order.chunks_exact(BATCH_ROWS).cycle() {
        if out.len() >= elems {
            break;
        }
        batch.gather(train, idx);
        model.forward_backward(&params, &batch, &mut grad, &mut |_, _| {});
        out.extend_from_slice(&grad.dense);
        opt.step(&mut params, &grad)?;
        steps += 1;
    }
    out.truncate(elems);
    Ok((out, steps, layout))
}

/// The runtime's whole exchange with `spec` and error feedback, on one rank,
/// over `layout`'s tensors, fed consecutive steps of `grads` (cycling) for at
/// least `min_time`: GB/s of f32 gradients in the median step.
fn exchange_gbps(spec: &CodecSpec, layout: &Layout, grads: &[f32], min_time: Duration) -> Result<f64, JobError> {
    let n = layout.len();
    let steps = grads.len() / n;
    if steps == 0 {
        return Err(JobError::Config {
            path: "--size".into(),
            why: format!("the exchange needs at least one step of gradients ({n} f32s)"),
        });
    }
    let section = CompressSection {
        codec: spec.clone(),
        error_feedback: Some(true),
        ..CompressSection::default()
    };
    // One rank: its collectives complete at once. The coordinator stream is only
    // written at checkpoints, which this loop does not take.
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| JobError::io("binding a loopback socket", e))?;
    let addr = listener.local_addr().map_err(|e| JobError::io("loopback address", e))?;
    let coordinator = TcpStream::connect(addr).map_err(|e| JobError::io("loopback connect", e))?;
    let comm = Comm::new(0, vec![None::<TcpStream>], CollectiveConfig::default(), 10_000, true)?;
    let mut ex = CompressExchange::new(comm, &section, layout, 0, Arc::new(Mutex::new(coordinator)), &[])?;
    let mut g = vec![0f32; n];
    // The median step counts: a training step's typical cost, as the compute
    // time it is added to is a mean over many steps.
    let (mut spent, mut steps_took) = (Duration::ZERO, Vec::new());
    while spent < min_time || steps_took.len() < 3 {
        let at = (steps_took.len() % steps) * n;
        g.copy_from_slice(&grads[at..at + n]);
        let t = Instant::now();
        ex.allreduce_gradient(steps_took.len() as u64, &mut g)?;
        let took = t.elapsed();
        spent += took;
        steps_took.push(took);
    }
    steps_took.sort_unstable();
    let median = steps_took[steps_took.len() / 2];
    Ok(4.0 * n as f64 / median.as_secs_f64().max(1e-9) / 1e9)
}

/// Measures every codec of `b` on the gradients (one core: this thread).
pub fn run(b: &CodecBench) -> Result<Vec<CodecBenchRow>, JobError> {
    if b.elems == 0 || b.elems > ELEMS_MAX {
        return Err(JobError::Config {
            path: "--size".into(),
            why: format!("{} f32s; give 1..={ELEMS_MAX}", b.elems),
        });
    }
    let specs = b
        .specs
        .iter()
        .map(|s| s.parse::<CodecSpec>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| JobError::Config {
            path: "--codecs".into(),
            why: e.to_string(),
        })?;
    let (values, steps, layout) = gradients(&b.data, b.elems, b.seed)?;
    let source = format!("fashion-mnist mlp 784-256-256-10, steps 1..={steps}");
    let rows = codec::bench::run(&values, &specs, b.min_time, Instant::now);
    let mut out = Vec::with_capacity(rows.len());
    for (row, spec) in rows.into_iter().zip(&specs) {
        let exchange_gbps = match spec {
            CodecSpec::None => None,
            spec => Some(exchange_gbps(spec, &layout, &values, b.min_time)?),
        };
        out.push(CodecBenchRow {
            row,
            gradients: source.clone(),
            exchange_gbps,
        });
    }
    Ok(out)
}
