//! Everything that can go wrong reading or writing a checkpoint, each naming
//! the file, group or tensor at fault.

use std::path::PathBuf;

use crate::store::Skipped;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: missing, though the manifest lists it")]
    MissingFile { path: PathBuf },
    #[error("{path}: invalid manifest: {source}")]
    ManifestJson { path: PathBuf, source: serde_json::Error },
    #[error("{path}: invalid manifest: {why}")]
    ManifestInvalid { path: PathBuf, why: String },
    #[error("{path}: {got} bytes, but the manifest says {expected}")]
    FileLength { path: PathBuf, expected: u64, got: u64 },
    #[error("{path}: crc32c is {got:08x}, but the manifest says {expected:08x}")]
    Checksum { path: PathBuf, expected: u32, got: u32 },
    #[error("{path}: not a valid safetensors file: {source}")]
    Safetensors {
        path: PathBuf,
        source: safetensors::SafeTensorError,
    },
    #[error("{path}: tensor `{tensor}`: {why}")]
    BadTensor { path: PathBuf, tensor: String, why: String },
    #[error("group `{group}`, tensor `{tensor}`: {why}")]
    InvalidTensor { group: String, tensor: String, why: String },
    #[error("group name `{group}`: {why}")]
    InvalidGroup { group: String, why: &'static str },
    #[error("{dir}: no readable checkpoint ({} skipped as unreadable)", skipped.len())]
    NoCheckpoint { dir: PathBuf, skipped: Vec<Skipped> },
}

impl CheckpointError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, op, source }
    }
}
