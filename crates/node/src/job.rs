//! A job's data and a job of one worker: loads the data and runs it in this
//! process; and what a cluster worker reads: a survey of the files before it
//! joins, then its partition.

use std::path::Path;
use std::time::Instant;

use crate::config::{DataFormat, JobConfig, Normalize};
use crate::error::JobError;
use crate::report::{DataReport, Observer};
use crate::train::{Alone, JobData, Summary, Trainer};

/// Runs a job of one worker in this process and returns its summary (a
/// cluster's workers run [`crate::worker::run`]; `launch` starts them).
pub fn run(cfg: JobConfig, resume: Option<&Path>, obs: &mut dyn Observer) -> Result<Summary, JobError> {
    debug_assert!(
        cfg.cluster.workers <= 1 && cfg.cluster.servers == 0,
        "a cluster job runs through `launch`"
    );
    if cfg.compress.momentum > 0.0 {
        tracing::warn!(
            "compress.momentum applies between workers; one process trains without momentum (set optim.momentum instead)"
        );
    }
    let data = load_data(&cfg)?;
    let mut trainer = Trainer::new(cfg, data, 0, 1)?;
    if let Some(dir) = resume {
        let restored = trainer.resume(dir)?;
        tracing::info!(path = %restored.path.display(), epoch = restored.position.epoch, "resumed");
    }
    trainer.run(&mut Alone, obs)
}

/// How the config says to read its data files, for `split`.
pub fn read_options(cfg: &JobConfig, split: data::Split) -> data::ReadOptions {
    let d = &cfg.data;
    let mut csv = data::CsvOptions::default();
    if let Some(col) = &d.label_column {
        csv.label = match col.parse::<usize>() {
            Ok(i) => data::LabelColumn::Index(i),
            Err(_) => data::LabelColumn::Name(col.clone()),
        };
    }
    csv.header = if d.csv_header {
        data::Header::Auto
    } else {
        data::Header::Absent
    };
    data::ReadOptions {
        format: match d.format {
            DataFormat::Auto => None,
            DataFormat::Idx => Some(data::Format::Idx),
            DataFormat::Libsvm => Some(data::Format::Libsvm),
            DataFormat::Csv => Some(data::Format::Csv),
            DataFormat::Parquet => Some(data::Format::Parquet),
        },
        split,
        normalize: match d.normalize {
            Normalize::None => data::Normalize::None,
            Normalize::Scale01 => data::Normalize::Scale01,
            Normalize::Standardize => data::Normalize::FASHION_MNIST,
        },
        hash_bits: d.hash_bits,
        csv,
        ..Default::default()
    }
}

/// Reads the training and test data a config names, every row.
pub fn load_data(cfg: &JobConfig) -> Result<JobData, JobError> {
    let train = data::read_auto(&cfg.data.train, &read_options(cfg, data::Split::Train))?;
    check_model_input(cfg, matches!(train.features, data::Features::Sparse { .. }))?;
    let test = read_test(cfg, &train)?;
    Ok(JobData::whole(train, test, read_meta(cfg)?))
}

fn read_meta(cfg: &JobConfig) -> Result<Option<serde_json::Value>, JobError> {
    Ok(data::read_meta(&cfg.data.train)?.and_then(|m| serde_json::to_value(m).ok()))
}

/// Refuses a model that reads sparse (hashed) features on dense data, or the
/// other way round, as a config error naming the file: the models assert
/// their input kind, so this must hold before the first batch.
fn check_model_input(cfg: &JobConfig, data_sparse: bool) -> Result<(), JobError> {
    let model_sparse = cfg.model.sparse_input();
    if model_sparse == data_sparse {
        return Ok(());
    }
    let kind = cfg.model.kind();
    let why = if model_sparse {
        format!(
            "model.kind = \"{kind}\" reads sparse (hashed) features, but the training data is dense; use kind = \"mlp\" or \"softmax\", or a LIBSVM file"
        )
    } else {
        format!(
            "model.kind = \"{kind}\" reads dense features, but the training data is sparse (index:value); use kind = \"logreg\" or \"fm\""
        )
    };
    Err(JobError::Config {
        path: cfg.data.train.clone(),
        why,
    })
}

/// The test set's path: `data.test`, or the test split of an IDX directory.
fn test_path(cfg: &JobConfig) -> Option<&Path> {
    let d = &cfg.data;
    match &d.test {
        Some(p) => Some(p),
        None if d.train.is_dir() => Some(&d.train),
        None => None,
    }
}

/// How to read the test set so that it lives in the training set's feature
/// space and classes (`dim`: the training dimension, when known).
fn test_options(cfg: &JobConfig, sparse: bool, dim: Option<u64>, num_classes: u32) -> data::ReadOptions {
    let mut opts = read_options(cfg, data::Split::Test);
    if cfg.data.hash_bits.is_none() && sparse {
        opts.dim = dim;
    }
    opts.num_classes = Some(num_classes);
    opts
}

/// Reads the whole test set, if the config names one.
fn read_test(cfg: &JobConfig, train: &data::Dataset) -> Result<Option<data::Dataset>, JobError> {
    let Some(path) = test_path(cfg) else {
        return Ok(None);
    };
    let sparse = matches!(train.features, data::Features::Sparse { .. });
    let test = data::read_auto(path, &test_options(cfg, sparse, Some(train.dim()), train.num_classes))?;
    if test.dim() != train.dim() {
        return Err(JobError::Config {
            path: path.to_owned(),
            why: format!("test data has {} features, training data {}", test.dim(), train.dim()),
        });
    }
    Ok(Some(test))
}

/// What a worker of a cluster holds of its data before it knows its rank.
pub enum EarlyData {
    /// Every row, and why (an elastic job: a regroup may give a worker any row).
    Whole { data: Box<JobData>, why: String, ms: f64 },
    /// A first look at the training and test files (they open, their headers
    /// and labels are good, the rows are counted); the rows are read once the
    /// rank is known.
    Surveyed {
        train: Box<data::Survey>,
        test: Option<Box<data::Survey>>,
        ms: f64,
    },
}

/// What a cluster worker reads before it joins: enough to fail on a bad file
/// before the cluster waits for it, and no more than it will keep.
pub fn load_early(cfg: &JobConfig) -> Result<EarlyData, JobError> {
    let started = Instant::now();
    if cfg.cluster.elastic {
        let why = "elastic job: a regroup may give this worker any row".to_string();
        tracing::info!(reason = %why, "reading the whole training file");
        let data = Box::new(load_data(cfg)?);
        return Ok(EarlyData::Whole {
            data,
            why,
            ms: ms_since(started),
        });
    }
    let train = data::survey(&cfg.data.train, &read_options(cfg, data::Split::Train))?;
    check_model_input(cfg, train.is_sparse())?;
    let test = match test_path(cfg) {
        Some(path) => {
            let opts = test_options(cfg, train.is_sparse(), train.dim(), train.num_classes());
            Some(Box::new(data::survey(path, &opts)?))
        }
        None => None,
    };
    Ok(EarlyData::Surveyed {
        train: Box::new(train),
        test,
        ms: ms_since(started),
    })
}

/// The data rank `rank` of `world` trains on: its partition of the training
/// rows — the contiguous range [`data::partitions`] gives it, the one every
/// epoch's plan draws its rows from — and, on rank 0 alone (the only rank that
/// evaluates), the test set. Every row instead when the job is elastic, has
/// one worker, or the survey says a range read cannot agree with the other
/// ranks (the reason is logged and reported).
pub fn load_for_rank(
    cfg: &JobConfig,
    early: EarlyData,
    rank: u32,
    world: u32,
) -> Result<(JobData, DataReport), JobError> {
    let started = Instant::now();
    let (data, whole_file, survey_ms, read_before_ms) = match early {
        EarlyData::Whole { data, why, ms } => (*data, Some(why), 0.0, ms),
        EarlyData::Surveyed { train, test, ms } => {
            let why = if world <= 1 {
                Some("one worker".to_string())
            } else {
                train
                    .whole_file_needed()
                    .map(|w| format!("{w} (set data.hash_bits to read only this worker's partition)"))
            };
            if let Some(w) = &why
                && world > 1
            {
                tracing::warn!(rank, file = %train.path().display(), reason = %w, "reading the whole training file");
            }
            if train.rows() > data::PLAN_ROWS_MAX as u64 {
                return Err(JobError::Config {
                    path: train.path().to_owned(),
                    why: format!("{} training rows are more than a worker can plan", train.rows()),
                });
            }
            let data = match &why {
                Some(_) => {
                    let all = data::read_auto(&cfg.data.train, &read_options(cfg, data::Split::Train))?;
                    let test = if rank == 0 { read_test(cfg, &all)? } else { None };
                    JobData::whole(all, test, read_meta(cfg)?)
                }
                None => {
                    let rows = train.rows() as usize;
                    let part = data::partitions(rows, world, cfg.train.batch_size)[rank as usize].clone();
                    let first_row = part.start;
                    let rows_read = train.read(part.start as u64..part.end as u64)?;
                    // Only rank 0 evaluates (`Trainer::run`); the others checked the test file's survey.
                    let test = match (rank, test) {
                        (0, Some(_)) => read_test(cfg, &rows_read)?,
                        _ => None,
                    };
                    tracing::info!(
                        rank,
                        first_row,
                        rows = rows_read.rows(),
                        total = rows,
                        "read this worker's partition"
                    );
                    JobData {
                        train: rows_read,
                        first_row,
                        total_rows: rows,
                        partition_nnz: None,
                        test,
                        meta: read_meta(cfg)?,
                    }
                }
            };
            (data, why, ms, 0.0)
        }
    };
    let report = DataReport {
        rank,
        world,
        rows_total: data.total_rows as u64,
        first_row: data.first_row as u64,
        rows: data.train.rows() as u64,
        nnz: data.train.nnz(),
        whole_file,
        test_rows: data.test.as_ref().map_or(0, |t| t.rows() as u64),
        survey_ms,
        read_ms: read_before_ms + ms_since(started),
    };
    Ok((data, report))
}

/// How long an all-reduce worker that read its rows after joining waits for
/// the others to have read theirs: as long as the rendezvous, which every
/// read fell before when workers read their data before joining.
pub const DATA_READ_WAIT_MS: u64 = crate::worker::RENDEZVOUS_TIMEOUT_MS;

/// Tells every all-reduce worker the non-zeros of every rank's partition
/// (into `data.partition_nnz`), with a deadline of [`DATA_READ_WAIT_MS`]
/// instead of a training step's: the collective is also where a worker that
/// read its rows quickly waits for the slowest.
pub fn exchange_partition_nnz(
    comm: &mut crate::comm::Comm,
    data: &mut JobData,
    global_batch: usize,
) -> Result<(), JobError> {
    let own = if data.is_partial() {
        data.train.nnz()
    } else {
        let part = data::partitions(data.total_rows, comm.world(), global_batch)[comm.rank() as usize].clone();
        part.map(|r| data.train.row_nnz(r) as u64).sum()
    };
    let step_timeout_ms = comm.set_timeout_ms(DATA_READ_WAIT_MS);
    let gathered = gather_nnz(comm, own);
    comm.set_timeout_ms(step_timeout_ms);
    data.partition_nnz = Some(gathered?);
    Ok(())
}

/// Bits per `f32` limb of a count: every integer below 2^24 is exact in an
/// `f32`, and so is a sum of one such value and zeros.
const NNZ_LIMB_BITS: u32 = 24;
/// Limbs per count: 3 × 24 bits cover a `u64`.
const NNZ_LIMBS: usize = 3;

/// Every rank's partition non-zeros, by rank, through one all-reduce: each
/// rank writes its count in its own slot, as limbs whose `f32` sum is exact.
fn gather_nnz(comm: &mut crate::comm::Comm, nnz: u64) -> Result<Vec<u64>, JobError> {
    let (rank, world) = (comm.rank() as usize, comm.world() as usize);
    let mut buf = vec![0.0f32; world * NNZ_LIMBS];
    buf[rank * NNZ_LIMBS..(rank + 1) * NNZ_LIMBS].copy_from_slice(&to_limbs(nnz));
    comm.all_reduce(&mut buf, 0, "exchanging partition non-zeros")?;
    Ok(buf.chunks_exact(NNZ_LIMBS).map(from_limbs).collect())
}

fn to_limbs(x: u64) -> [f32; NNZ_LIMBS] {
    std::array::from_fn(|k| ((x >> (NNZ_LIMB_BITS * k as u32)) & ((1 << NNZ_LIMB_BITS) - 1)) as f32)
}

fn from_limbs(limbs: &[f32]) -> u64 {
    limbs
        .iter()
        .enumerate()
        .map(|(k, &x)| (x as u64) << (NNZ_LIMB_BITS * k as u32))
        .sum()
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_the_f32_all_reduce_exactly() {
        for x in [0, 1, (1 << 24) - 1, 1 << 24, 23_520_000, (1 << 48) + 12_345, u64::MAX] {
            // What the all-reduce does to a rank's slot: adds zeros from the other ranks.
            let summed: Vec<f32> = to_limbs(x).iter().map(|&l| l + 0.0 + 0.0).collect();
            assert_eq!(from_limbs(&summed), x);
        }
    }
}
