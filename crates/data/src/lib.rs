//! Data sets: readers for IDX, LIBSVM, CSV and Parquet, synthetic generators,
//! batches, partitioners and skew reports.
//!
//! Every reader returns a [`Dataset`] and every malformed input a
//! [`DataError`] naming the file and the line (text) or row (binary) at fault.
//! [`survey`] counts a file's rows without parsing them, and
//! [`Survey::read`] reads only a range of them (a worker's partition).

mod auc;
mod blobs;
mod click;
mod csv;
mod dataset;
mod error;
mod federated;
mod idx;
mod inspect;
mod labels;
mod libsvm;
mod meta;
#[cfg(feature = "parquet")]
mod parquet;
mod partition;
mod plan;
mod read;
mod sampling;
mod source;
mod sparse;
mod survey;
mod synth;
mod writer;

pub use auc::{auc, expected_auc};
pub use blobs::{DENSE_DIM_MAX, DenseGen, DenseModel, generate_dense};
pub use click::{ClickGen, ClickModel, ClickRow, NNZ_MEAN_MAX, PILOT_ROWS, generate_click};
pub use csv::{CSV_COLUMNS_MAX, CsvOptions, CsvWriter, Header, LabelColumn, read_csv};
pub use dataset::{Batch, BatchFeatures, Dataset, Features};
pub use error::DataError;
pub use federated::{CLIENT_ROWS_MIN, ClientSkew, ClientSplit};
pub use idx::{
    IDX_DIMS_MAX, IDX_PAYLOAD_BYTES_MAX, Normalize, Split, fashion_mnist, idx_labels_for, idx_paths, read_idx,
    read_idx_dir, write_idx_u8,
};
pub use inspect::{Summary, inspect};
pub use labels::CLASSES_MAX;
pub use libsvm::{LibsvmWriter, read_libsvm};
pub use meta::{META_BYTES_MAX, Meta, meta_path, read_meta, write_meta};
#[cfg(feature = "parquet")]
pub use parquet::{ParquetWriter, read_parquet};
pub use partition::{EpochOrder, Partition, SkewReport, partition, partition_range};
pub use plan::{EpochPlan, PLAN_ROWS_MAX, Reassigned, local_batches, partitions};
pub use read::{Format, ReadOptions, detect_format, read_auto};
pub use source::LINE_BYTES_MAX;
pub use sparse::{HASH_BITS_MAX, hash_index};
pub use survey::{MARK_EVERY_ROWS, Mark, Survey, survey};
pub use synth::{GenReport, SplitStats};
pub use writer::{OutFormat, RowWriter, write_dataset};
