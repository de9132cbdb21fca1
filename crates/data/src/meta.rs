//! `FILE.meta.json`: what a generated data file holds and how it was made
//! (generator, parameters, seed, sizes, Bayes-optimal scores), written beside it.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::DataError;

/// Largest meta file read; anything bigger is not ours.
pub const META_BYTES_MAX: u64 = 1 << 20;

/// The description of one generated data file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// `click` or `dense`.
    pub generator: String,
    /// `train` or `test`.
    pub split: String,
    /// `libsvm`, `csv` or `parquet`.
    pub format: String,
    pub seed: u64,
    pub rows: u64,
    /// Stored entries (non-zeros of sparse rows; `rows × dim` for dense ones).
    pub nnz: u64,
    pub dim: u64,
    pub num_classes: u32,
    /// AUC of the true probabilities as scores, in expectation over the labels, on the test split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bayes_auc: Option<f64>,
    /// Expected accuracy of the Bayes classifier on the test split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bayes_accuracy: Option<f64>,
    /// Mean of the true probabilities of class 1 on this split (click data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_p: Option<f64>,
    /// Standard deviation of the planted logit over rows (click data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_std: Option<f64>,
    /// The generator's configuration, as given.
    pub params: serde_json::Value,
}

/// `data/train.svm` → `data/train.svm.meta.json`.
pub fn meta_path(data: &Path) -> PathBuf {
    let mut name = data.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".meta.json");
    data.with_file_name(name)
}

/// The meta file beside `data`, or `None` if there is none.
pub fn read_meta(data: &Path) -> Result<Option<Meta>, DataError> {
    if data.is_dir() || data.file_name().is_none() {
        return Ok(None);
    }
    let path = meta_path(data);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DataError::io(&path, e)),
    };
    let mut bytes = Vec::new();
    file.take(META_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| DataError::io(&path, e))?;
    if bytes.len() as u64 > META_BYTES_MAX {
        return Err(DataError::format(
            &path,
            format!("larger than META_BYTES_MAX ({META_BYTES_MAX} bytes)"),
        ));
    }
    let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| DataError::Line {
        path: path.clone(),
        line: e.line() as u64,
        msg: e.to_string(),
    })?;
    if meta.dim == 0 || !(2..=crate::CLASSES_MAX).contains(&meta.num_classes) {
        return Err(DataError::format(
            &path,
            format!(
                "dim {} and num_classes {} (need dim ≥ 1, 2 ≤ classes ≤ CLASSES_MAX)",
                meta.dim, meta.num_classes
            ),
        ));
    }
    Ok(Some(meta))
}

/// Writes the meta file beside `data` (through a temporary file and a rename,
/// so that a reader never sees half of it).
pub fn write_meta(data: &Path, meta: &Meta) -> Result<(), DataError> {
    let path = meta_path(data);
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut text = serde_json::to_string_pretty(meta).map_err(|e| DataError::format(&path, e.to_string()))?;
    text.push('\n');
    std::fs::write(&tmp, text).map_err(|e| DataError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("train.svm");
        assert_eq!(read_meta(&data).expect("no meta is fine"), None);
        let meta = Meta {
            generator: "click".into(),
            split: "train".into(),
            format: "libsvm".into(),
            seed: 7,
            rows: 10,
            nnz: 400,
            dim: 1 << 20,
            num_classes: 2,
            bayes_auc: Some(0.8),
            bayes_accuracy: None,
            mean_p: Some(0.25),
            logit_std: Some(1.7),
            params: serde_json::json!({"zipf_s": 1.1}),
        };
        write_meta(&data, &meta).expect("write");
        assert_eq!(meta_path(&data), dir.path().join("train.svm.meta.json"));
        assert_eq!(read_meta(&data).expect("read"), Some(meta));
        std::fs::write(meta_path(&data), "{\n\"generator\": 3\n}").expect("write");
        let err = read_meta(&data).expect_err("malformed").to_string();
        assert!(err.contains("train.svm.meta.json:2: "), "{err}");
    }
}
