//! Streaming row writers behind one type, so that generators and converters
//! write LIBSVM, CSV or Parquet without holding the data set in memory.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{CsvWriter, DataError, Dataset, Features, LibsvmWriter};

/// Output format of writers and generators.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutFormat {
    #[default]
    Libsvm,
    /// Dense rows only.
    Csv,
    /// Needs the cargo feature `parquet`.
    Parquet,
}

impl fmt::Display for OutFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Libsvm => "libsvm",
            Self::Csv => "csv",
            Self::Parquet => "parquet",
        })
    }
}

impl FromStr for OutFormat {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, DataError> {
        match s.to_ascii_lowercase().as_str() {
            "libsvm" | "svm" | "svmlight" => Ok(Self::Libsvm),
            "csv" => Ok(Self::Csv),
            "parquet" => Ok(Self::Parquet),
            _ => Err(DataError::config(
                "format",
                format!("`{s}` (use libsvm, csv or parquet)"),
            )),
        }
    }
}

impl OutFormat {
    /// The usual file extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Libsvm => "svm",
            Self::Csv => "csv",
            Self::Parquet => "parquet",
        }
    }
}

/// A file being written row by row.
pub enum RowWriter {
    Libsvm(LibsvmWriter),
    Csv(CsvWriter),
    #[cfg(feature = "parquet")]
    Parquet(Box<crate::ParquetWriter>),
}

impl RowWriter {
    /// A writer of sparse rows with indices below `dim`.
    pub fn create_sparse(path: &Path, format: OutFormat, dim: u64) -> Result<Self, DataError> {
        match format {
            OutFormat::Libsvm => Ok(Self::Libsvm(LibsvmWriter::create(path)?)),
            OutFormat::Csv => Err(DataError::config(
                "format",
                "CSV holds dense rows only; use libsvm or parquet",
            )),
            #[cfg(feature = "parquet")]
            OutFormat::Parquet => Ok(Self::Parquet(Box::new(crate::ParquetWriter::create_sparse(path, dim)?))),
            #[cfg(not(feature = "parquet"))]
            OutFormat::Parquet => {
                let _ = dim;
                Err(DataError::config(
                    "format",
                    "Parquet support is not compiled in (cargo feature `parquet`)",
                ))
            }
        }
    }

    /// A writer of dense rows of `dim` values.
    pub fn create_dense(path: &Path, format: OutFormat, dim: usize) -> Result<Self, DataError> {
        match format {
            OutFormat::Libsvm => Ok(Self::Libsvm(LibsvmWriter::create(path)?)),
            OutFormat::Csv => Ok(Self::Csv(CsvWriter::create(path, dim)?)),
            #[cfg(feature = "parquet")]
            OutFormat::Parquet => Ok(Self::Parquet(Box::new(crate::ParquetWriter::create_dense(path, dim)?))),
            #[cfg(not(feature = "parquet"))]
            OutFormat::Parquet => Err(DataError::config(
                "format",
                "Parquet support is not compiled in (cargo feature `parquet`)",
            )),
        }
    }

    pub fn write_sparse(&mut self, label: u32, indices: &[u32], values: &[f32]) -> Result<(), DataError> {
        match self {
            Self::Libsvm(w) => w.write_sparse(label, indices, values),
            Self::Csv(w) => w.write_sparse(label, indices, values),
            #[cfg(feature = "parquet")]
            Self::Parquet(w) => w.write_sparse(label, indices, values),
        }
    }

    pub fn write_dense(&mut self, label: u32, values: &[f32]) -> Result<(), DataError> {
        match self {
            Self::Libsvm(w) => w.write_dense(label, values),
            Self::Csv(w) => w.write_dense(label, values),
            #[cfg(feature = "parquet")]
            Self::Parquet(w) => w.write_dense(label, values),
        }
    }

    /// Flushes and syncs the file.
    pub fn finish(self) -> Result<(), DataError> {
        match self {
            Self::Libsvm(w) => w.finish(),
            Self::Csv(w) => w.finish(),
            #[cfg(feature = "parquet")]
            Self::Parquet(w) => w.finish(),
        }
    }
}

/// Writes a whole data set (conversion between formats, tests).
pub fn write_dataset(ds: &Dataset, path: &Path, format: OutFormat) -> Result<(), DataError> {
    match &ds.features {
        Features::Dense { dim, values } => {
            let mut w = RowWriter::create_dense(path, format, *dim)?;
            for (r, &label) in ds.labels.iter().enumerate() {
                w.write_dense(label, &values[r * dim..(r + 1) * dim])?;
            }
            w.finish()
        }
        Features::Sparse {
            dim,
            indptr,
            indices,
            values,
        } => {
            let mut w = RowWriter::create_sparse(path, format, *dim)?;
            for (r, &label) in ds.labels.iter().enumerate() {
                let (s, e) = (indptr[r] as usize, indptr[r + 1] as usize);
                w.write_sparse(label, &indices[s..e], &values[s..e])?;
            }
            w.finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ReadOptions, read_auto};

    #[test]
    fn every_format_round_trips_through_read_auto() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sparse = Dataset {
            features: Features::Sparse {
                dim: 50,
                indptr: vec![0, 2, 2, 3],
                indices: vec![1, 49, 7],
                values: vec![1.0, 0.5, -2.0],
            },
            labels: vec![1, 0, 1],
            num_classes: 2,
        };
        let dense = Dataset {
            features: Features::Dense {
                dim: 2,
                values: vec![0.5, -1.0, 2.0, 0.0, 1.0, 1.0],
            },
            labels: vec![2, 0, 1],
            num_classes: 3,
        };
        let opts = ReadOptions {
            dim: Some(50),
            ..ReadOptions::default()
        };
        let mut formats = vec![OutFormat::Libsvm];
        if cfg!(feature = "parquet") {
            formats.push(OutFormat::Parquet);
        }
        for f in &formats {
            let path = dir.path().join(format!("s.{}", f.extension()));
            write_dataset(&sparse, &path, *f).expect("write");
            assert_eq!(read_auto(&path, &opts).expect("read"), sparse, "{f}");
        }
        formats.push(OutFormat::Csv);
        for f in &formats {
            let path = dir.path().join(format!("d.{}", f.extension()));
            write_dataset(&dense, &path, *f).expect("write");
            let opts = ReadOptions {
                dim: (*f == OutFormat::Libsvm).then_some(2),
                ..ReadOptions::default()
            };
            let back = read_auto(&path, &opts).expect("read");
            assert_eq!(back.labels, dense.labels, "{f}");
            assert_eq!(back.num_classes, dense.num_classes, "{f}");
            if *f != OutFormat::Libsvm {
                assert_eq!(back.features, dense.features, "{f}");
            }
        }
        assert!(write_dataset(&sparse, &dir.path().join("x.csv"), OutFormat::Csv).is_err());
        assert_eq!("Parquet".parse::<OutFormat>().ok(), Some(OutFormat::Parquet));
        assert!("xml".parse::<OutFormat>().is_err());
    }
}
