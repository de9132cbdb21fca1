//! Checkpoints of a training run: the model's parameters (named as the model
//! names them, so PyTorch, NumPy and JAX users can load `params.safetensors`),
//! the optimizer's state, and where training stands.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use checkpoint::{Manifest, NamedTensor, Snapshot};
use tensor::Layout;

use crate::config::JobConfig;
use crate::error::JobError;
use crate::train::Position;

/// The file group holding parameters.
pub const PARAMS: &str = "params";
/// The file group holding optimizer state.
pub const OPTIM: &str = "optim";

/// What a resume found.
#[derive(Debug)]
pub struct Restored {
    pub path: PathBuf,
    pub position: Position,
    /// Newer checkpoints that were damaged and skipped, with why.
    pub skipped: Vec<String>,
    /// The exchange's state (the `compress` group: error-feedback residuals,
    /// PowerSGD warm starts), for the exchange to take back.
    pub exchange: Vec<(String, Vec<f32>)>,
}

/// Writes a checkpoint of the current state into `dir` and prunes old ones;
/// `exchange` is the exchange's own state (the `compress` group), if any.
#[allow(clippy::too_many_arguments)]
pub fn save(
    dir: &Path,
    keep_last: usize,
    cfg: &JobConfig,
    layout: &Layout,
    params: &[f32],
    opt: &optim::Optimizer,
    pos: Position,
    exchange: &[(String, Vec<f32>)],
) -> Result<PathBuf, JobError> {
    let config = serde_json::to_value(cfg).unwrap_or(serde_json::Value::Null);
    let position = serde_json::to_value(pos).unwrap_or(serde_json::Value::Null);
    let mut snap = Snapshot::new(Manifest::new(pos.step, u64::from(pos.epoch), position, config));
    let tensors = layout
        .tensors()
        .iter()
        .map(|t| NamedTensor::new(&t.name, &t.shape, params[t.range()].to_vec()))
        .collect();
    snap.files.insert(PARAMS.into(), tensors);
    let state = opt
        .state_tensors()
        .into_iter()
        .map(|(name, data)| NamedTensor::vector(name, data))
        .collect();
    snap.files.insert(OPTIM.into(), state);
    if !exchange.is_empty() {
        let tensors = exchange
            .iter()
            .map(|(name, data)| NamedTensor::vector(name.clone(), data))
            .collect();
        snap.files.insert(crate::compress::STATE_GROUP.into(), tensors);
    }
    let path = checkpoint::write(dir, &snap)?;
    checkpoint::prune(dir, keep_last)?;
    Ok(path)
}

/// Loads the newest good checkpoint in `dir` into `params` and `opt`.
pub fn load(dir: &Path, layout: &Layout, params: &mut [f32], opt: &mut optim::Optimizer) -> Result<Restored, JobError> {
    let (snap, skipped) = checkpoint::load_latest(dir)?;
    let path = dir.join(checkpoint::dir_name(snap.manifest.step));
    let bad = |why: String| JobError::Resume {
        path: path.clone(),
        why,
    };
    let position: Position = serde_json::from_value(snap.manifest.data_position.clone())
        .map_err(|e| bad(format!("manifest data_position: {e}")))?;
    // Check everything before changing anything.
    let mut found = Vec::with_capacity(layout.tensors().len());
    for t in layout.tensors() {
        let saved = snap
            .tensor(PARAMS, &t.name)
            .ok_or_else(|| bad(format!("no tensor `{}` in params", t.name)))?;
        if saved.shape != t.shape {
            return Err(bad(format!(
                "tensor `{}` has shape {:?}; this model needs {:?}",
                t.name, saved.shape, t.shape
            )));
        }
        found.push((t.range(), &saved.data));
    }
    let state = snap.group(OPTIM).ok_or_else(|| bad("no optimizer state".into()))?;
    opt.load_state(state.iter().map(|t| (t.name.as_str(), t.data.as_slice())))?;
    for (range, data) in found {
        params[range].copy_from_slice(data);
    }
    for s in &skipped {
        tracing::warn!(path = %s.path.display(), error = %s.error, "skipped a damaged checkpoint");
    }
    let skipped = skipped
        .iter()
        .map(|s| format!("{}: {}", s.path.display(), s.error))
        .collect();
    let exchange = snap
        .group(crate::compress::STATE_GROUP)
        .map(|ts| ts.iter().map(|t| (t.name.clone(), t.data.clone())).collect())
        .unwrap_or_default();
    Ok(Restored {
        path,
        position,
        skipped,
        exchange,
    })
}

/// `sinter checkpoint inspect`: one line per checkpoint, then the newest one's tensors.
pub fn describe(dir: &Path) -> Result<String, JobError> {
    let mut out = String::new();
    let entries = checkpoint::list(dir)?;
    if entries.is_empty() {
        return Ok(format!("no checkpoints in {}", dir.display()));
    }
    for e in &entries {
        match checkpoint::verify(&e.path) {
            Ok(m) => {
                let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
                let _ = writeln!(
                    out,
                    "{}  step {}  epoch {}  {} files  {} bytes  ok",
                    e.path.display(),
                    m.step,
                    m.epoch,
                    m.files.len(),
                    bytes
                );
            }
            Err(err) => {
                let _ = writeln!(out, "{}  DAMAGED: {err}", e.path.display());
            }
        }
    }
    if let Ok((snap, _)) = checkpoint::load_latest(dir) {
        let _ = writeln!(out, "newest good checkpoint: step {}", snap.manifest.step);
        for (group, tensors) in &snap.files {
            for t in tensors {
                let _ = writeln!(out, "  {group}/{}  {:?}", t.name, t.shape);
            }
        }
    }
    Ok(out)
}

/// `sinter checkpoint verify`: checks every checkpoint; an error names the first damaged one.
pub fn verify_all(dir: &Path) -> Result<String, JobError> {
    let entries = checkpoint::list(dir)?;
    let mut out = String::new();
    for e in &entries {
        let m = checkpoint::verify(&e.path)?;
        let _ = writeln!(out, "{}  step {}  ok", e.path.display(), m.step);
    }
    if entries.is_empty() {
        return Err(JobError::Resume {
            path: dir.to_path_buf(),
            why: "no checkpoints here".into(),
        });
    }
    Ok(out)
}
