//! On-disk checkpoints: a directory of safetensors files (one per group,
//! e.g. `params`, `optim`) plus `manifest.json` with the step, epoch, data
//! position, run config and each file's length and crc32c. Writes are
//! atomic; reads verify every checksum before parsing; a damaged newest
//! checkpoint falls back to the previous good one.
//!
//! The tensor files are plain safetensors with F32 tensors under the model's
//! names, so `safetensors.numpy.load_file("params.safetensors")` (or PyTorch's
//! and JAX's loaders) read them directly.
//!
//! Numbers: a 100M-parameter model is 400 MB per group; writing builds one
//! group's file in memory (peak: the snapshot plus one file), and reading
//! holds one file's bytes next to the converted tensors.

mod error;
mod manifest;
mod store;
mod tensors;

pub use error::CheckpointError;
pub use manifest::{
    FILES_MAX, FORMAT_VERSION, FileEntry, MANIFEST_BYTES_MAX, MANIFEST_NAME, Manifest, TENSOR_FILE_EXT,
};
pub use store::{Entry, Skipped, Snapshot, dir_name, list, load_latest, prune, read, verify, write};
pub use tensors::NamedTensor;
