//! Synthetic dense classification data: Gaussian clusters, one per class,
//! with unit noise, and the Bayes-optimal accuracy of the test split.
//!
//! Class means are drawn once per seed with entries `N(0, separation² / (2·dim))`,
//! so that two means lie about `separation` noise standard deviations apart.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tensor::Rng;

use crate::auc::expected_auc;
use crate::synth::{GenReport, Tally, write_split_metas};
use crate::{CLASSES_MAX, DataError, Dataset, Features, OutFormat, RowWriter, Split};

/// Widest dense row generated.
pub const DENSE_DIM_MAX: usize = 1 << 16;
/// Largest table of class means (`classes × dim` values).
const MEANS_VALUES_MAX: usize = 1 << 24;
const STREAM_MEANS: u64 = 0;
const STREAM_TRAIN: u64 = 1;
const STREAM_TEST: u64 = 2;

/// Parameters of the dense generator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DenseGen {
    pub rows: u64,
    pub test_rows: u64,
    pub dim: usize,
    pub classes: u32,
    pub seed: u64,
    /// Typical distance between two class means, in noise standard deviations.
    pub separation: f64,
}

impl Default for DenseGen {
    fn default() -> Self {
        Self {
            rows: 60_000,
            test_rows: 10_000,
            dim: 64,
            classes: 10,
            seed: 1,
            separation: 4.0,
        }
    }
}

impl DenseGen {
    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |what, msg: String| Err(DataError::config(what, msg));
        if self.rows == 0 || self.test_rows == 0 {
            return bad(
                "rows",
                format!(
                    "{} train and {} test rows (need at least 1 each)",
                    self.rows, self.test_rows
                ),
            );
        }
        if !(1..=DENSE_DIM_MAX).contains(&self.dim) {
            return bad("dim", format!("{} (must be 1..={DENSE_DIM_MAX})", self.dim));
        }
        if !(2..=CLASSES_MAX).contains(&self.classes) || self.classes as usize * self.dim > MEANS_VALUES_MAX {
            return bad(
                "classes",
                format!(
                    "{} (must be 2..={CLASSES_MAX}, classes × dim ≤ {MEANS_VALUES_MAX})",
                    self.classes
                ),
            );
        }
        if !(self.separation >= 0.0 && self.separation.is_finite()) {
            return bad("separation", format!("{} (must be ≥ 0)", self.separation));
        }
        Ok(())
    }
}

/// The class means of a [`DenseGen`] and its row sampler.
#[derive(Clone, Debug)]
pub struct DenseModel {
    cfg: DenseGen,
    means: Vec<f64>,
}

impl DenseModel {
    pub fn new(cfg: &DenseGen) -> Result<Self, DataError> {
        cfg.validate()?;
        let mut rng = Rng::derive(cfg.seed, STREAM_MEANS);
        let scale = cfg.separation / (2.0 * cfg.dim as f64).sqrt();
        let means = (0..cfg.classes as usize * cfg.dim)
            .map(|_| scale * rng.normal())
            .collect();
        Ok(Self {
            cfg: cfg.clone(),
            means,
        })
    }

    pub fn mean(&self, class: u32) -> &[f64] {
        let d = self.cfg.dim;
        &self.means[class as usize * d..(class as usize + 1) * d]
    }

    /// Draws a row into `x`; returns its label.
    pub fn sample(&self, rng: &mut Rng, x: &mut Vec<f32>) -> u32 {
        let label = rng.below(u64::from(self.cfg.classes)) as u32;
        x.clear();
        x.extend(self.mean(label).iter().map(|&m| (m + rng.normal()) as f32));
        label
    }

    /// Class posteriors of `x` under the true model (equal priors, unit noise).
    pub fn posterior(&self, x: &[f32], out: &mut Vec<f64>) {
        out.clear();
        out.extend((0..self.cfg.classes).map(|c| {
            let d2: f64 = self
                .mean(c)
                .iter()
                .zip(x)
                .map(|(&m, &v)| (f64::from(v) - m).powi(2))
                .sum();
            -0.5 * d2
        }));
        let max = out.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for v in out.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in out.iter_mut() {
            *v /= sum;
        }
    }

    pub fn rng(&self, split: Split) -> Rng {
        Rng::derive(
            self.cfg.seed,
            if split == Split::Train {
                STREAM_TRAIN
            } else {
                STREAM_TEST
            },
        )
    }

    /// A split in memory; the generator's files hold exactly these rows.
    pub fn dataset(&self, split: Split) -> Dataset {
        let rows = if split == Split::Train {
            self.cfg.rows
        } else {
            self.cfg.test_rows
        };
        let mut rng = self.rng(split);
        let mut x = Vec::with_capacity(self.cfg.dim);
        let mut values = Vec::with_capacity(rows as usize * self.cfg.dim);
        let labels = (0..rows)
            .map(|_| {
                let label = self.sample(&mut rng, &mut x);
                values.extend_from_slice(&x);
                label
            })
            .collect();
        Dataset {
            features: Features::Dense {
                dim: self.cfg.dim,
                values,
            },
            labels,
            num_classes: self.cfg.classes,
        }
    }
}

/// Writes the train and test splits of `cfg`, streaming, with a `.meta.json` beside each.
pub fn generate_dense(
    cfg: &DenseGen,
    train_path: &Path,
    test_path: &Path,
    format: OutFormat,
) -> Result<GenReport, DataError> {
    let model = DenseModel::new(cfg)?;
    let mut splits = Vec::with_capacity(2);
    let (mut best_sum, mut p1) = (0.0f64, Vec::new());
    let mut post = Vec::new();
    for (split, path, rows) in [
        (Split::Train, train_path, cfg.rows),
        (Split::Test, test_path, cfg.test_rows),
    ] {
        let mut out = RowWriter::create_dense(path, format, cfg.dim)?;
        let mut rng = model.rng(split);
        let mut x = Vec::with_capacity(cfg.dim);
        let mut tally = Tally::new(cfg.classes);
        for _ in 0..rows {
            let label = model.sample(&mut rng, &mut x);
            out.write_dense(label, &x)?;
            tally.row(label, cfg.dim);
            if split == Split::Test {
                model.posterior(&x, &mut post);
                best_sum += post.iter().copied().fold(0.0, f64::max);
                if cfg.classes == 2 {
                    p1.push(post[1]);
                }
            }
        }
        out.finish()?;
        splits.push(tally.finish(false));
    }
    let test = splits.pop().unwrap_or_default();
    let train = splits.pop().unwrap_or_default();
    let report = GenReport {
        generator: "dense",
        dim: cfg.dim as u64,
        num_classes: cfg.classes,
        bayes_accuracy: Some(best_sum / test.rows as f64),
        bayes_auc: if cfg.classes == 2 { expected_auc(&p1) } else { None },
        train,
        test,
    };
    write_split_metas(&report, cfg.seed, cfg, format, train_path, test_path)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ReadOptions, read_auto};

    #[test]
    fn bayes_accuracy_matches_the_nearest_mean_classifier() {
        let cfg = DenseGen {
            rows: 10,
            test_rows: 4000,
            dim: 16,
            classes: 4,
            seed: 3,
            separation: 3.0,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let (train, test) = (dir.path().join("train.csv"), dir.path().join("test.csv"));
        let report = generate_dense(&cfg, &train, &test, OutFormat::Csv).expect("generate");
        let model = DenseModel::new(&cfg).expect("valid");
        let ds = read_auto(&test, &ReadOptions::default()).expect("read back");
        let Features::Dense { values, .. } = &ds.features else {
            panic!("dense expected")
        };
        let mut post = Vec::new();
        let correct = (0..ds.rows())
            .filter(|&r| {
                model.posterior(&values[r * 16..(r + 1) * 16], &mut post);
                let best = (0..4).max_by(|&a, &b| post[a].total_cmp(&post[b])).unwrap_or(0);
                best == ds.labels[r] as usize
            })
            .count();
        let accuracy = correct as f64 / ds.rows() as f64;
        let bayes = report.bayes_accuracy.expect("reported");
        assert!((accuracy - bayes).abs() < 0.03, "accuracy {accuracy} vs Bayes {bayes}");
        assert!((0.6..0.99).contains(&bayes), "{bayes}");
        assert_eq!(ds, model.dataset(Split::Test));
    }

    #[test]
    fn binary_dense_data_reports_an_auc() {
        let cfg = DenseGen {
            rows: 10,
            test_rows: 2000,
            dim: 4,
            classes: 2,
            ..DenseGen::default()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let (train, test) = (dir.path().join("a.svm"), dir.path().join("b.svm"));
        let report = generate_dense(&cfg, &train, &test, OutFormat::Libsvm).expect("generate");
        assert!(report.bayes_auc.is_some_and(|a| a > 0.9), "{report}");
        assert_eq!(read_auto(&test, &ReadOptions::default()).expect("read back").dim(), 4);
        assert!(
            DenseModel::new(&DenseGen {
                classes: 1,
                ..DenseGen::default()
            })
            .is_err()
        );
    }
}
