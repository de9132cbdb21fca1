//! Synthetic click-through data: sparse binary rows whose feature ids follow
//! Zipf's law, labelled by a planted logistic model, with the Bayes-optimal
//! AUC of the test split reported.
//!
//! The planted weight of the feature of frequency rank `r` (0 = hottest) is
//! `w_r = weight_std / (1 + r / weight_decay_rank) · z_r`, with `z_r` a standard
//! normal: for the 2^16 hottest ranks drawn from a hash of (seed, r) and
//! tabulated; for rarer ranks picked by a hash of (seed, r) from a table of
//! 2^16 standard normal draws (rarely two rare ranks share a `z`; their
//! weights are tiny anyway). No table of 2^hash_bits weights.
//! Rare features get small weights on purpose: a one-epoch learner sees them
//! too seldom to estimate them, and with equal weights they would put the
//! Bayes AUC out of its reach. The intercept is set so that the mean logit
//! over rows is `bias` (measured on a pilot sample of [`PILOT_ROWS`] rows).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tensor::Rng;

use crate::auc::expected_auc;
use crate::sampling::{Poisson, Scatter, ZIPF_HEAD_RANKS, Zipf, normal_from_hash};
use crate::sparse::{HASH_BITS_MAX, fmix64};
use crate::synth::{GenReport, Tally, write_split_metas};
use crate::{DataError, Dataset, Features, OutFormat, RowWriter, Split};

/// Largest mean number of non-zeros per row.
pub const NNZ_MEAN_MAX: f64 = 10_000.0;
/// Rows drawn to centre the planted logit.
pub const PILOT_ROWS: u64 = 20_000;
/// Streams of `Rng::derive(seed, _)`.
const STREAM_TRAIN: u64 = 1;
const STREAM_TEST: u64 = 2;
const STREAM_PILOT: u64 = 3;
const STREAM_NORMALS: u64 = 4;
/// Standard normal draws shared by the weights of rare ranks (a power of two).
const TAIL_NORMALS: usize = 1 << 16;
/// Keys of the hashes that place ranks on ids and draw weights.
const KEY_SCATTER: u64 = 0x5CA7_7E12;
const KEY_WEIGHT: u64 = 0x3E16_4721;

/// Parameters of the click-through generator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClickGen {
    /// Rows of the train split.
    pub rows: u64,
    /// Rows of the test split (independent draws from the same model).
    pub test_rows: u64,
    /// Feature ids are `0..2^hash_bits` (0-based in the files).
    pub hash_bits: u32,
    /// Mean number of ids drawn per row (1 + Poisson(nnz_mean - 1)); repeats
    /// are merged, so rows hold somewhat fewer non-zeros.
    pub nnz_mean: f64,
    /// Zipf exponent of id frequencies.
    pub zipf_s: f64,
    pub seed: u64,
    /// Standard deviation of the weights of the hottest features.
    pub weight_std: f64,
    /// Frequency rank at which the weight standard deviation has halved.
    pub weight_decay_rank: f64,
    /// Mean logit over rows (sets the click rate: -1 gives about 0.34 with the default spread).
    pub bias: f64,
}

impl Default for ClickGen {
    fn default() -> Self {
        Self {
            rows: 1_000_000,
            test_rows: 100_000,
            hash_bits: 22,
            nnz_mean: 40.0,
            zipf_s: 1.1,
            seed: 1,
            weight_std: 0.5,
            weight_decay_rank: 1000.0,
            bias: -1.0,
        }
    }
}

impl ClickGen {
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
        if !(1..=HASH_BITS_MAX).contains(&self.hash_bits) {
            return bad("hash_bits", format!("{} (must be 1..={HASH_BITS_MAX})", self.hash_bits));
        }
        if !(1.0..=NNZ_MEAN_MAX).contains(&self.nnz_mean) {
            return bad("nnz_mean", format!("{} (must be 1..={NNZ_MEAN_MAX})", self.nnz_mean));
        }
        if !(self.zipf_s > 0.0 && self.zipf_s <= 10.0) {
            return bad("zipf_s", format!("{} (must be in (0, 10])", self.zipf_s));
        }
        if !(self.weight_std >= 0.0 && self.weight_std.is_finite()) {
            return bad("weight_std", format!("{} (must be ≥ 0)", self.weight_std));
        }
        if !(self.weight_decay_rank > 0.0 && self.weight_decay_rank.is_finite()) {
            return bad("weight_decay_rank", format!("{} (must be > 0)", self.weight_decay_rank));
        }
        if !self.bias.is_finite() {
            return bad("bias", format!("{}", self.bias));
        }
        Ok(())
    }

    pub fn dim(&self) -> u64 {
        1u64 << self.hash_bits
    }
}

/// The planted model of a [`ClickGen`], and its row sampler.
#[derive(Clone, Debug)]
pub struct ClickModel {
    cfg: ClickGen,
    zipf: Zipf,
    extra_nnz: Poisson,
    scatter: Scatter,
    weight_key: u64,
    /// Weights of the head ranks of the Zipf sampler.
    table: Vec<f64>,
    /// Standard normal draws for the `z` of rarer ranks (length a power of two).
    normals: Vec<f32>,
    intercept: f64,
}

/// Reusable buffers of the row sampler.
#[derive(Debug, Default)]
pub struct ClickRow {
    /// Feature ids of the row, ascending, distinct.
    pub ids: Vec<u32>,
    pub logit: f64,
    pub p: f64,
    pub label: u32,
    /// `seen[r] == stamp` if head rank `r` is already in the row: repeats
    /// are dropped without sorting ranks.
    seen: Vec<u32>,
    stamp: u32,
    /// Tail ranks of the row (few; searched linearly).
    tail: Vec<u64>,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl ClickModel {
    pub fn new(cfg: &ClickGen) -> Result<Self, DataError> {
        cfg.validate()?;
        let n = cfg.dim();
        let mut model = Self {
            cfg: cfg.clone(),
            zipf: Zipf::new(n, cfg.zipf_s),
            extra_nnz: Poisson::new(cfg.nnz_mean - 1.0),
            scatter: Scatter::new(cfg.hash_bits, fmix64(cfg.seed ^ KEY_SCATTER)),
            weight_key: fmix64(cfg.seed ^ KEY_WEIGHT),
            table: Vec::new(),
            normals: Vec::new(),
            intercept: 0.0,
        };
        let mut rng = Rng::derive(cfg.seed, STREAM_NORMALS);
        model.normals = (0..TAIL_NORMALS).map(|_| rng.normal() as f32).collect();
        model.table = (0..n.min(ZIPF_HEAD_RANKS as u64))
            .map(|r| model.rank_sd(r) * normal_from_hash(fmix64(model.weight_key ^ r)))
            .collect();
        let mut rng = Rng::derive(cfg.seed, STREAM_PILOT);
        let mut row = ClickRow::default();
        let mut sum = 0.0;
        for _ in 0..PILOT_ROWS {
            model.sample(&mut rng, &mut row);
            sum += row.logit;
        }
        model.intercept = cfg.bias - sum / PILOT_ROWS as f64;
        Ok(model)
    }

    pub fn config(&self) -> &ClickGen {
        &self.cfg
    }

    /// The intercept of the planted model.
    pub fn intercept(&self) -> f64 {
        self.intercept
    }

    fn rank_sd(&self, rank: u64) -> f64 {
        self.cfg.weight_std / (1.0 + rank as f64 / self.cfg.weight_decay_rank)
    }

    /// The weight of a rank beyond the table (the table holds the head).
    fn tail_weight(&self, rank: u64) -> f64 {
        let z = self.normals[fmix64(self.weight_key ^ rank) as usize & (TAIL_NORMALS - 1)];
        self.rank_sd(rank) * f64::from(z)
    }

    fn rank_weight(&self, rank: u64) -> f64 {
        match self.table.get(rank as usize) {
            Some(&w) => w,
            None => self.tail_weight(rank),
        }
    }

    /// The planted weight of feature `id` (which must be below `2^hash_bits`).
    pub fn weight(&self, id: u32) -> f64 {
        self.rank_weight(self.scatter.invert(u64::from(id)))
    }

    /// The planted logit of a row holding `ids` (distinct), each with value 1.
    pub fn logit(&self, ids: &[u32]) -> f64 {
        self.intercept + ids.iter().map(|&id| self.weight(id)).sum::<f64>()
    }

    /// Draws one row into `row`: its ids, logit, probability and label.
    pub fn sample(&self, rng: &mut Rng, row: &mut ClickRow) {
        let head = self.table.len();
        if row.seen.len() != head {
            row.seen = vec![0; head];
            row.stamp = 0;
        }
        row.stamp = row.stamp.wrapping_add(1);
        if row.stamp == 0 {
            row.seen.fill(0);
            row.stamp = 1;
        }
        let draws = 1 + self.extra_nnz.sample(rng);
        row.ids.clear();
        row.tail.clear();
        let mut logit = self.intercept;
        for _ in 0..draws {
            let rank = self.zipf.sample(rng);
            if let Some(seen) = row.seen.get_mut(rank as usize) {
                if *seen == row.stamp {
                    continue;
                }
                *seen = row.stamp;
                logit += self.table[rank as usize];
            } else {
                if row.tail.contains(&rank) {
                    continue;
                }
                row.tail.push(rank);
                logit += self.tail_weight(rank);
            }
            row.ids.push(self.scatter.apply(rank) as u32);
        }
        row.ids.sort_unstable();
        row.logit = logit;
        row.p = sigmoid(logit);
        row.label = u32::from(rng.next_f64() < row.p);
    }

    /// The stream of rows of `split`; the generator's files hold exactly these rows.
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

    /// A split in memory, with each row's true probability.
    pub fn dataset(&self, split: Split) -> (Dataset, Vec<f64>) {
        let rows = if split == Split::Train {
            self.cfg.rows
        } else {
            self.cfg.test_rows
        };
        let mut rng = self.rng(split);
        let mut row = ClickRow::default();
        let mut indptr = Vec::with_capacity(rows as usize + 1);
        indptr.push(0u64);
        // Repeats are merged, so rows hold fewer than `nnz_mean` ids: this is an upper estimate.
        let mut indices = Vec::with_capacity((rows as f64 * self.cfg.nnz_mean).min((1u64 << 28) as f64) as usize);
        let mut labels = Vec::with_capacity(rows as usize);
        let mut p = Vec::with_capacity(rows as usize);
        for _ in 0..rows {
            self.sample(&mut rng, &mut row);
            indices.extend_from_slice(&row.ids);
            indptr.push(indices.len() as u64);
            labels.push(row.label);
            p.push(row.p);
        }
        let values = vec![1.0; indices.len()];
        let features = Features::Sparse {
            dim: self.cfg.dim(),
            indptr,
            indices,
            values,
        };
        (
            Dataset {
                features,
                labels,
                num_classes: 2,
            },
            p,
        )
    }
}

/// Writes the train and test splits of `cfg` (streaming: memory holds one
/// row, plus one `f64` per test row for the Bayes AUC) and a `.meta.json`
/// beside each.
pub fn generate_click(
    cfg: &ClickGen,
    train_path: &Path,
    test_path: &Path,
    format: OutFormat,
) -> Result<GenReport, DataError> {
    let model = ClickModel::new(cfg)?;
    let mut test_p = Vec::with_capacity(cfg.test_rows.min(1 << 24) as usize);
    let mut splits = Vec::with_capacity(2);
    for (split, path, rows) in [
        (Split::Train, train_path, cfg.rows),
        (Split::Test, test_path, cfg.test_rows),
    ] {
        let mut out = RowWriter::create_sparse(path, format, cfg.dim())?;
        let mut rng = model.rng(split);
        let mut row = ClickRow::default();
        let mut tally = Tally::new(2);
        let mut values = vec![1.0f32; 64];
        for _ in 0..rows {
            model.sample(&mut rng, &mut row);
            if values.len() < row.ids.len() {
                values.resize(row.ids.len(), 1.0);
            }
            out.write_sparse(row.label, &row.ids, &values[..row.ids.len()])?;
            tally.row(row.label, row.ids.len());
            tally.logit(row.logit, row.p);
            if split == Split::Test {
                test_p.push(row.p);
            }
        }
        out.finish()?;
        splits.push(tally.finish(true));
    }
    let test = splits.pop().unwrap_or_default();
    let train = splits.pop().unwrap_or_default();
    let report = GenReport {
        generator: "click",
        dim: cfg.dim(),
        num_classes: 2,
        train,
        test,
        bayes_auc: expected_auc(&test_p),
        bayes_accuracy: None,
    };
    write_split_metas(&report, cfg.seed, cfg, format, train_path, test_path)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auc::auc;
    use crate::{ReadOptions, read_auto, read_meta};

    fn small() -> ClickGen {
        ClickGen {
            rows: 20_000,
            test_rows: 20_000,
            hash_bits: 18,
            seed: 11,
            ..ClickGen::default()
        }
    }

    #[test]
    fn label_mean_matches_mean_p_and_true_weights_reach_bayes_auc() {
        let model = ClickModel::new(&small()).expect("valid");
        let (ds, p) = model.dataset(Split::Test);
        let n = p.len() as f64;
        let mean_p = p.iter().sum::<f64>() / n;
        let mean_y = ds.labels.iter().map(|&l| f64::from(l)).sum::<f64>() / n;
        let sd = (mean_p * (1.0 - mean_p) / n).sqrt();
        assert!((mean_y - mean_p).abs() < 4.0 * sd, "labels {mean_y} vs p {mean_p}");
        // The logit of the true weights, recomputed from the ids alone.
        let Features::Sparse { indptr, indices, .. } = &ds.features else {
            panic!("sparse expected")
        };
        let scores: Vec<f64> = (0..ds.rows())
            .map(|r| model.logit(&indices[indptr[r] as usize..indptr[r + 1] as usize]))
            .collect();
        for (s, &pi) in scores.iter().zip(&p).take(100) {
            assert!((sigmoid(*s) - pi).abs() < 1e-9);
        }
        let empirical = auc(&scores, &ds.labels).expect("both classes");
        let bayes = expected_auc(&p).expect("defined");
        assert!((empirical - bayes).abs() < 0.01, "AUC {empirical} vs Bayes {bayes}");
        assert!(
            (0.75..0.95).contains(&bayes),
            "Bayes AUC {bayes} outside the intended range"
        );
    }

    #[test]
    fn defaults_give_the_intended_logit_scale_and_click_rate() {
        let cfg = ClickGen {
            rows: 20_000,
            test_rows: 1,
            ..ClickGen::default()
        };
        let model = ClickModel::new(&cfg).expect("valid");
        let (ds, p) = model.dataset(Split::Train);
        let logits: Vec<f64> = p.iter().map(|&x| (x / (1.0 - x)).ln()).collect();
        let mean = logits.iter().sum::<f64>() / logits.len() as f64;
        let sd = (logits.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / logits.len() as f64).sqrt();
        assert!((mean - cfg.bias).abs() < 0.1, "mean logit {mean}");
        assert!((1.4..2.1).contains(&sd), "logit std {sd}");
        let nnz_per_row = ds.nnz() as f64 / ds.rows() as f64;
        assert!((25.0..40.0).contains(&nnz_per_row), "nnz/row {nnz_per_row}");
    }

    #[test]
    fn files_hold_the_in_memory_rows_and_meta_reports_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = ClickGen {
            rows: 500,
            test_rows: 300,
            hash_bits: 16,
            ..ClickGen::default()
        };
        let (train, test) = (dir.path().join("train.svm"), dir.path().join("test.svm"));
        let report = generate_click(&cfg, &train, &test, OutFormat::Libsvm).expect("generate");
        let model = ClickModel::new(&cfg).expect("valid");
        let back = read_auto(&train, &ReadOptions::default()).expect("read back");
        assert_eq!(back, model.dataset(Split::Train).0);
        let meta = read_meta(&test).expect("meta").expect("meta present");
        assert_eq!((meta.rows, meta.dim, meta.split.as_str()), (300, 1 << 16, "test"));
        assert_eq!(meta.bayes_auc, report.bayes_auc);
        assert_eq!(meta.nnz, report.test.nnz);
        assert_eq!(report.train.label_counts.iter().sum::<u64>(), 500);
        assert!(report.to_string().contains("Bayes AUC"));
        #[cfg(feature = "parquet")]
        {
            let (pt, ps) = (dir.path().join("train.parquet"), dir.path().join("test.parquet"));
            generate_click(&cfg, &pt, &ps, OutFormat::Parquet).expect("generate parquet");
            assert_eq!(read_auto(&pt, &ReadOptions::default()).expect("read back"), back);
        }
    }

    #[test]
    fn same_seed_same_data_other_seed_other_data() {
        let a = ClickModel::new(&small()).expect("valid").dataset(Split::Train).0;
        let b = ClickModel::new(&small()).expect("valid").dataset(Split::Train).0;
        let c = ClickModel::new(&ClickGen { seed: 12, ..small() })
            .expect("valid")
            .dataset(Split::Train)
            .0;
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        for cfg in [
            ClickGen {
                hash_bits: 0,
                ..ClickGen::default()
            },
            ClickGen {
                nnz_mean: 0.5,
                ..ClickGen::default()
            },
            ClickGen {
                zipf_s: 0.0,
                ..ClickGen::default()
            },
            ClickGen {
                test_rows: 0,
                ..ClickGen::default()
            },
            ClickGen {
                weight_std: f64::NAN,
                ..ClickGen::default()
            },
        ] {
            assert!(
                matches!(ClickModel::new(&cfg), Err(DataError::Config { .. })),
                "{cfg:?}"
            );
        }
    }
}
