//! `sinter train`: loads the data and runs the job, in this process for one
//! worker or as a local cluster of processes for more.

use std::path::Path;

use crate::config::{DataFormat, JobConfig, Normalize};
use crate::error::JobError;
use crate::report::Observer;
use crate::train::{Alone, JobData, Summary, Trainer};

/// Runs a whole job and returns its summary.
pub fn run(cfg: JobConfig, resume: Option<&Path>, obs: &mut dyn Observer) -> Result<Summary, JobError> {
    if cfg.cluster.workers > 1 || cfg.cluster.servers > 0 {
        return crate::launcher::run(&cfg, resume, obs);
    }
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

/// Reads the training and test data a config names.
pub fn load_data(cfg: &JobConfig) -> Result<JobData, JobError> {
    let d = &cfg.data;
    let train = data::read_auto(&d.train, &read_options(cfg, data::Split::Train))?;
    let mut test_opts = read_options(cfg, data::Split::Test);
    // The test set must live in the training set's feature space.
    if d.hash_bits.is_none() && matches!(train.features, data::Features::Sparse { .. }) {
        test_opts.dim = Some(train.dim());
    }
    test_opts.num_classes = Some(train.num_classes);
    let test = match &d.test {
        Some(p) => Some(data::read_auto(p, &test_opts)?),
        None if d.train.is_dir() => Some(data::read_auto(&d.train, &test_opts)?),
        None => None,
    };
    if let Some(t) = &test
        && t.dim() != train.dim()
    {
        return Err(JobError::Config {
            path: d.test.clone().unwrap_or_else(|| d.train.clone()),
            why: format!("test data has {} features, training data {}", t.dim(), train.dim()),
        });
    }
    let meta = data::read_meta(&d.train)?.and_then(|m| serde_json::to_value(m).ok());
    Ok(JobData { train, test, meta })
}
