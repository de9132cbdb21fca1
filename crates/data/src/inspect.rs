//! `inspect`: the shape of a data file (rows, features, non-zeros, classes)
//! and its generator's meta data, as a small table.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{DataError, Features, Format, Meta, ReadOptions, detect_format, read_auto, read_meta};

/// Classes listed one by one in the table; the rest are summed.
const CLASSES_SHOWN_MAX: usize = 12;

/// What a data file holds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub path: PathBuf,
    pub format: Format,
    pub rows: usize,
    /// Number of features (the hashed space for sparse data).
    pub features: u64,
    /// Non-zero values (sparse: stored entries; dense: values that are not 0).
    pub nnz: u64,
    pub nnz_per_row_mean: f64,
    pub nnz_per_row_max: u64,
    pub num_classes: u32,
    /// Rows per class id.
    pub label_counts: Vec<u64>,
    /// The generator's `.meta.json`, if there is one.
    pub meta: Option<Meta>,
}

/// Reads `path` (any format [`read_auto`] reads) and summarises it.
pub fn inspect(path: &Path, opts: &ReadOptions) -> Result<Summary, DataError> {
    let format = match opts.format {
        Some(f) => f,
        None => detect_format(path)?,
    };
    let ds = read_auto(path, opts)?;
    let row_nnz: Box<dyn Fn(usize) -> u64> = match &ds.features {
        Features::Sparse { indptr, .. } => Box::new(move |r| indptr[r + 1] - indptr[r]),
        Features::Dense { dim, values } => {
            let dim = *dim;
            Box::new(move |r| values[r * dim..(r + 1) * dim].iter().filter(|&&v| v != 0.0).count() as u64)
        }
    };
    let (mut nnz, mut max) = (0u64, 0u64);
    for r in 0..ds.rows() {
        let n = row_nnz(r);
        nnz += n;
        max = max.max(n);
    }
    let mut label_counts = vec![0u64; ds.num_classes as usize];
    for &l in &ds.labels {
        label_counts[l as usize] += 1;
    }
    Ok(Summary {
        path: path.to_owned(),
        format,
        rows: ds.rows(),
        features: ds.dim(),
        nnz,
        nnz_per_row_mean: if ds.rows() == 0 {
            0.0
        } else {
            nnz as f64 / ds.rows() as f64
        },
        nnz_per_row_max: max,
        num_classes: ds.num_classes,
        label_counts,
        meta: if format == Format::Idx { None } else { read_meta(path)? },
    })
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cells = self.rows as f64 * self.features as f64;
        let density = if cells > 0.0 { self.nnz as f64 / cells } else { 0.0 };
        writeln!(f, "file       {}", self.path.display())?;
        writeln!(f, "format     {}", self.format)?;
        writeln!(f, "rows       {}", self.rows)?;
        writeln!(f, "features   {}", self.features)?;
        writeln!(
            f,
            "nnz        {} ({:.2} per row, max {}, density {density:.3e})",
            self.nnz, self.nnz_per_row_mean, self.nnz_per_row_max
        )?;
        write!(f, "classes    {}:", self.num_classes)?;
        for (c, &n) in self.label_counts.iter().enumerate().take(CLASSES_SHOWN_MAX) {
            let share = if self.rows == 0 {
                0.0
            } else {
                100.0 * n as f64 / self.rows as f64
            };
            write!(f, " {c}={n} ({share:.1}%)")?;
        }
        if self.label_counts.len() > CLASSES_SHOWN_MAX {
            let rest: u64 = self.label_counts[CLASSES_SHOWN_MAX..].iter().sum();
            write!(f, " others={rest}")?;
        }
        if let Some(m) = &self.meta {
            write!(
                f,
                "\nmeta       {} ({} split), seed {}, {} rows",
                m.generator, m.split, m.seed, m.rows
            )?;
            if let Some(a) = m.bayes_auc {
                write!(f, ", Bayes AUC {a:.4}")?;
            }
            if let Some(a) = m.bayes_accuracy {
                write!(f, ", Bayes accuracy {a:.4}")?;
            }
            if let Some(p) = m.mean_p {
                write!(f, ", mean p {p:.4}")?;
            }
            if let Some(sd) = m.logit_std {
                write!(f, ", logit std {sd:.3}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClickGen, OutFormat, generate_click};

    #[test]
    fn summary_of_a_generated_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = ClickGen {
            rows: 300,
            test_rows: 200,
            hash_bits: 12,
            ..ClickGen::default()
        };
        let (train, test) = (dir.path().join("tr.svm"), dir.path().join("te.svm"));
        let report = generate_click(&cfg, &train, &test, OutFormat::Libsvm).expect("generate");
        let s = inspect(&train, &ReadOptions::default()).expect("inspect");
        assert_eq!(
            (s.rows, s.features, s.nnz, s.format),
            (300, 4096, report.train.nnz, Format::Libsvm)
        );
        assert_eq!(s.label_counts, report.train.label_counts);
        assert_eq!(s.meta.as_ref().map(|m| m.bayes_auc), Some(report.bayes_auc));
        let text = s.to_string();
        assert!(text.contains("rows       300") && text.contains("Bayes AUC"), "{text}");
    }

    #[test]
    fn summary_of_a_dense_file_counts_true_non_zeros() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.csv");
        std::fs::write(&path, "label,a,b\n1,0,2\n0,3,4\n").expect("write");
        let s = inspect(&path, &ReadOptions::default()).expect("inspect");
        assert_eq!((s.rows, s.features, s.nnz, s.nnz_per_row_max), (2, 2, 3, 2));
        assert_eq!(s.label_counts, vec![1, 1]);
        assert!(s.meta.is_none());
    }
}
