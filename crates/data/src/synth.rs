//! What the generators report, and the meta files they write beside each split.

use std::fmt;
use std::path::Path;

use serde::Serialize;

use crate::{DataError, Meta, OutFormat, write_meta};

/// Figures of one generated split.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SplitStats {
    pub rows: u64,
    /// Stored entries: non-zeros of sparse rows, `rows × dim` for dense ones.
    pub nnz: u64,
    /// Rows per class.
    pub label_counts: Vec<u64>,
    /// Mean true probability of class 1 (click data).
    pub mean_p: Option<f64>,
    /// Standard deviation of the planted logit over rows (click data).
    pub logit_std: Option<f64>,
}

/// What a generator wrote. Timing is the caller's business.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GenReport {
    /// `click` or `dense`.
    pub generator: &'static str,
    pub dim: u64,
    pub num_classes: u32,
    pub train: SplitStats,
    pub test: SplitStats,
    /// Expected AUC of the true probabilities on the test split (binary tasks).
    pub bayes_auc: Option<f64>,
    /// Expected accuracy of the Bayes classifier on the test split (dense data).
    pub bayes_accuracy: Option<f64>,
}

impl fmt::Display for GenReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: dim {}, {} classes", self.generator, self.dim, self.num_classes)?;
        if let Some(a) = self.bayes_auc {
            write!(f, ", Bayes AUC {a:.4}")?;
        }
        if let Some(a) = self.bayes_accuracy {
            write!(f, ", Bayes accuracy {a:.4}")?;
        }
        for (name, s) in [("train", &self.train), ("test", &self.test)] {
            let per_row = if s.rows == 0 { 0.0 } else { s.nnz as f64 / s.rows as f64 };
            write!(
                f,
                "\n  {name:<5} {:>10} rows  {per_row:>8.2} nnz/row  classes {:?}",
                s.rows, s.label_counts
            )?;
            if let Some(p) = s.mean_p {
                write!(f, "  mean p {p:.4}")?;
            }
            if let Some(sd) = s.logit_std {
                write!(f, "  logit std {sd:.3}")?;
            }
        }
        Ok(())
    }
}

/// Running sums of one split while it is written.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) stats: SplitStats,
    sum_p: f64,
    sum_logit: f64,
    sum_logit_sq: f64,
}

impl Tally {
    pub(crate) fn new(classes: u32) -> Self {
        let stats = SplitStats {
            label_counts: vec![0; classes as usize],
            ..SplitStats::default()
        };
        Self {
            stats,
            ..Self::default()
        }
    }

    pub(crate) fn row(&mut self, label: u32, nnz: usize) {
        self.stats.rows += 1;
        self.stats.nnz += nnz as u64;
        self.stats.label_counts[label as usize] += 1;
    }

    pub(crate) fn logit(&mut self, logit: f64, p: f64) {
        self.sum_p += p;
        self.sum_logit += logit;
        self.sum_logit_sq += logit * logit;
    }

    pub(crate) fn finish(mut self, with_logits: bool) -> SplitStats {
        let n = self.stats.rows as f64;
        if with_logits && self.stats.rows > 0 {
            let mean = self.sum_logit / n;
            self.stats.mean_p = Some(self.sum_p / n);
            self.stats.logit_std = Some((self.sum_logit_sq / n - mean * mean).max(0.0).sqrt());
        }
        self.stats
    }
}

/// Writes `FILE.meta.json` beside both splits.
pub(crate) fn write_split_metas(
    report: &GenReport,
    seed: u64,
    params: &impl Serialize,
    format: OutFormat,
    train: &Path,
    test: &Path,
) -> Result<(), DataError> {
    let params = serde_json::to_value(params).map_err(|e| DataError::config("generator parameters", e.to_string()))?;
    for (split, stats, path) in [("train", &report.train, train), ("test", &report.test, test)] {
        let meta = Meta {
            generator: report.generator.into(),
            split: split.into(),
            format: format.to_string(),
            seed,
            rows: stats.rows,
            nnz: stats.nnz,
            dim: report.dim,
            num_classes: report.num_classes,
            bayes_auc: report.bayes_auc,
            bayes_accuracy: report.bayes_accuracy,
            mean_p: stats.mean_p,
            logit_std: stats.logit_std,
            params: params.clone(),
        };
        write_meta(path, &meta)?;
    }
    Ok(())
}
