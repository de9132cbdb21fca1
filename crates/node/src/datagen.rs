//! `sinter data gen`, `sinter data inspect` and `sinter data partition`: thin,
//! timed wrappers over the `data` crate's generators, summary and client splits.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::JobError;

/// What `sinter data gen` was asked for.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub kind: String,
    pub out: PathBuf,
    pub test_out: Option<PathBuf>,
    pub rows: u64,
    pub test_rows: u64,
    pub hash_bits: u32,
    pub nnz: f64,
    pub zipf: f64,
    pub dim: usize,
    pub classes: u32,
    pub seed: u64,
    pub format: String,
}

/// `train.svm` → `train.test.svm` (the test split beside the training file).
fn beside(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match out.extension() {
        Some(ext) => out.with_file_name(format!("{stem}.test.{}", ext.to_string_lossy())),
        None => out.with_file_name(format!("{stem}.test")),
    }
}

/// Generates the data set and returns a printable report.
pub fn generate(req: &GenRequest) -> Result<String, JobError> {
    let format: data::OutFormat = req.format.parse()?;
    let test_out = req.test_out.clone().unwrap_or_else(|| beside(&req.out));
    for p in [&req.out, &test_out] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| JobError::io(format!("creating {}", dir.display()), e))?;
        }
    }
    let started = Instant::now();
    let report = match req.kind.as_str() {
        "click" => {
            let cfg = data::ClickGen {
                rows: req.rows,
                test_rows: req.test_rows,
                hash_bits: req.hash_bits,
                nnz_mean: req.nnz,
                zipf_s: req.zipf,
                seed: req.seed,
                ..data::ClickGen::default()
            };
            data::generate_click(&cfg, &req.out, &test_out, format)?
        }
        "dense" => {
            let cfg = data::DenseGen {
                rows: req.rows,
                test_rows: req.test_rows,
                dim: req.dim,
                classes: req.classes,
                seed: req.seed,
                ..data::DenseGen::default()
            };
            data::generate_dense(&cfg, &req.out, &test_out, format)?
        }
        other => {
            return Err(JobError::Config {
                path: PathBuf::from("sinter data gen"),
                why: format!("unknown generator `{other}` (click or dense)"),
            });
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let rows = req.rows + req.test_rows;
    Ok(format!(
        "{report}\nwrote {} and {} in {secs:.1} s ({:.0} rows/s)",
        req.out.display(),
        test_out.display(),
        rows as f64 / secs.max(1e-9)
    ))
}

/// Summarises a data file.
pub fn inspect(path: &Path, hash_bits: Option<u32>) -> Result<data::Summary, JobError> {
    let opts = data::ReadOptions {
        hash_bits,
        ..Default::default()
    };
    Ok(data::inspect(path, &opts)?)
}

/// What `sinter data partition` was asked for.
#[derive(Clone, Debug)]
pub struct PartitionRequest {
    pub input: PathBuf,
    pub clients: usize,
    pub scheme: String,
    pub seed: u64,
    pub out: PathBuf,
    /// `libsvm`, `csv` or `parquet`; empty: CSV for dense data, LIBSVM for sparse.
    pub format: String,
    pub hash_bits: Option<u32>,
}

/// Splits a data file among clients, writes `client-NNNNN.EXT` per client and
/// `partition.json` (scheme, seed, each client's rows and label counts) into
/// `out`, and returns the skew.
pub fn partition(req: &PartitionRequest) -> Result<data::ClientSkew, JobError> {
    let opts = data::ReadOptions {
        hash_bits: req.hash_bits,
        ..Default::default()
    };
    let ds = data::read_auto(&req.input, &opts)?;
    let split = match req.scheme.strip_prefix("file:") {
        Some(path) => data::ClientSplit::read_owners(Path::new(path), ds.rows(), req.clients)?,
        None => req.scheme.parse::<data::ClientSplit>()?,
    };
    let parts = split.split(&ds, req.clients, req.seed)?;
    let format: data::OutFormat = match req.format.as_str() {
        "" if matches!(ds.features, data::Features::Dense { .. }) => data::OutFormat::Csv,
        "" => data::OutFormat::Libsvm,
        f => f.parse()?,
    };
    std::fs::create_dir_all(&req.out).map_err(|e| JobError::io(format!("creating {}", req.out.display()), e))?;
    for (c, rows) in parts.iter().enumerate() {
        let path = req.out.join(format!("client-{c:05}.{format}"));
        data::write_dataset(&ds.select(rows), &path, format)?;
    }
    let skew = data::ClientSkew::new(&ds, &parts);
    let manifest = serde_json::json!({
        "input": req.input,
        "scheme": req.scheme,
        "seed": req.seed,
        "clients": req.clients,
        "format": format.to_string(),
        "skew": &skew,
    });
    let path = req.out.join("partition.json");
    std::fs::write(&path, manifest.to_string()).map_err(|e| JobError::io(format!("writing {}", path.display()), e))?;
    Ok(skew)
}
