//! `sinter bench codec`: each codec's encode and decode speed on one core,
//! compression ratio and error, on real gradients: those of the Fashion-MNIST
//! MLP 784-256-256-10 over its first steps of SGD, concatenated up to the
//! requested size (the model has 269,322 parameters, so 25 MiB is the
//! gradients of 25 consecutive steps).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use codec::CodecSpec;
use codec::bench::BenchRow;
use data::Batch;
use tensor::{Gradient, Rng};

use crate::config::JobConfig;
use crate::error::JobError;

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
}

/// The gradients of the example MLP's first SGD steps (lr 0.05, momentum
/// 0.9, batch 128), concatenated and cut to `elems`; and how many steps that took.
pub fn gradients(data_dir: &Path, elems: usize, seed: u64) -> Result<(Vec<f32>, u64), JobError> {
    let path = toml::Value::String(data_dir.display().to_string());
    let text = format!(
        "[data]\nformat = \"idx\"\ntrain = {path}\nnormalize = \"standardize\"\n\
         [model]\nkind = \"mlp\"\nhidden = [256, 256]\n\
         [optim]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n"
    );
    let cfg = JobConfig::parse(&text, Path::new("<sinter bench codec>"), &[])?;
    let data = crate::job::load_data(&cfg)?;
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
    Ok((out, steps))
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
    let (values, steps) = gradients(&b.data, b.elems, b.seed)?;
    let source = format!("fashion-mnist mlp 784-256-256-10, steps 1..={steps}");
    Ok(codec::bench::run(&values, &specs, b.min_time, Instant::now)
        .into_iter()
        .map(|row| CodecBenchRow {
            row,
            gradients: source.clone(),
        })
        .collect())
}
