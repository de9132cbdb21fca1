//! The error type of the data crate: every failure names the file and, where
//! there is one, the line (text formats, 1-based) or row (Parquet, 0-based).

use std::path::{Path, PathBuf};

/// Everything that can go wrong reading, writing or generating data.
///
/// The messages carry the whole story (file, line or row, what was wrong), so
/// the variants deliberately have no `source()`: printing an error chain shows
/// each cause once.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The operating system refused an operation, or a compressed stream was corrupt.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// A text file (LIBSVM, CSV) has a bad line; `line` is 1-based.
    #[error("{}:{line}: {msg}", path.display())]
    Line { path: PathBuf, line: u64, msg: String },
    /// A record of a binary file (Parquet, IDX) is bad; `row` is 0-based.
    #[error("{}: row {row}: {msg}", path.display())]
    Row { path: PathBuf, row: u64, msg: String },
    /// The file as a whole is malformed (bad magic, truncated, inconsistent sizes).
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// The Parquet library rejected the file or the data.
    #[cfg(feature = "parquet")]
    #[error("{}: parquet: {err}", path.display())]
    Parquet {
        path: PathBuf,
        err: parquet::errors::ParquetError,
    },
    /// An option or generator parameter is out of its range.
    #[error("invalid {what}: {msg}")]
    Config { what: &'static str, msg: String },
}

impl DataError {
    pub(crate) fn io(path: &Path, err: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            err,
        }
    }

    pub(crate) fn line(path: &Path, line: u64, msg: impl Into<String>) -> Self {
        Self::Line {
            path: path.to_owned(),
            line,
            msg: msg.into(),
        }
    }

    #[cfg_attr(not(feature = "parquet"), allow(dead_code))]
    pub(crate) fn row(path: &Path, row: u64, msg: impl Into<String>) -> Self {
        Self::Row {
            path: path.to_owned(),
            row,
            msg: msg.into(),
        }
    }

    pub(crate) fn format(path: &Path, msg: impl Into<String>) -> Self {
        Self::Format {
            path: path.to_owned(),
            msg: msg.into(),
        }
    }

    pub(crate) fn config(what: &'static str, msg: impl Into<String>) -> Self {
        Self::Config { what, msg: msg.into() }
    }
}

/// Shows at most `TOKEN_SHOWN_BYTES_MAX` bytes of untrusted input inside an
/// error message, lossily decoded, so that a 1 GB garbage line stays readable.
pub(crate) fn shown(bytes: &[u8]) -> String {
    const TOKEN_SHOWN_BYTES_MAX: usize = 40;
    if bytes.len() <= TOKEN_SHOWN_BYTES_MAX {
        String::from_utf8_lossy(bytes).into_owned()
    } else {
        format!("{}...", String::from_utf8_lossy(&bytes[..TOKEN_SHOWN_BYTES_MAX]))
    }
}
