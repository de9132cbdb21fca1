//! Data sets: readers for IDX, LIBSVM, CSV and Parquet, synthetic generators,
//! batches, partitioners and skew reports.

mod dataset;

pub use dataset::{Batch, BatchFeatures, Dataset, Features};
