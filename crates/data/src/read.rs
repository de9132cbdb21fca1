//! Reader options and `read_auto`: picking the format of a path by its
//! extension, or failing that by its first bytes, and dispatching.

use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::csv::CsvOptions;
use crate::idx::{Normalize, Split};
use crate::labels::CLASSES_MAX;
use crate::sparse::HASH_BITS_MAX;
use crate::{DataError, Dataset, meta, source};

/// File formats the crate reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Format {
    Idx,
    Libsvm,
    Csv,
    Parquet,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Idx => "idx",
            Self::Libsvm => "libsvm",
            Self::Csv => "csv",
            Self::Parquet => "parquet",
        })
    }
}

/// How to read a file. `Default` reads any format with no hashing, the
/// dimension taken from the data (or its `.meta.json`), and IDX pixels scaled to 0..1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReadOptions {
    /// Skip detection and read this format.
    pub format: Option<Format>,
    /// For an IDX directory: which split.
    pub split: Split,
    /// For IDX: how pixels become features.
    pub normalize: Normalize,
    /// For sparse data: hash every feature index into `0..2^hash_bits` with
    /// [`crate::hash_index`]. `None` keeps indices as given.
    pub hash_bits: Option<u32>,
    /// The number of features. Sparse: indices must be below it (default:
    /// the `dim` of `FILE.meta.json` if present, else max index + 1). CSV:
    /// the number of feature columns must equal it.
    pub dim: Option<u64>,
    /// The number of classes; labels must be below it (default: inferred).
    pub num_classes: Option<u32>,
    /// Keep only data rows in this 0-based range (a worker's contiguous
    /// slice, see [`crate::partitions`]); rows outside it are not parsed (see
    /// [`crate::survey`]). Sparse files need `dim` or `hash_bits` (or a
    /// `.meta.json`) for it, so that every slice has the same dimension.
    pub row_range: Option<Range<u64>>,
    pub csv: CsvOptions,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            format: None,
            split: Split::Train,
            normalize: Normalize::Scale01,
            hash_bits: None,
            dim: None,
            num_classes: None,
            row_range: None,
            csv: CsvOptions::default(),
        }
    }
}

impl ReadOptions {
    pub fn validate(&self) -> Result<(), DataError> {
        if let Some(bits) = self.hash_bits
            && !(1..=HASH_BITS_MAX).contains(&bits)
        {
            return Err(DataError::config(
                "hash_bits",
                format!("{bits} (must be 1..={HASH_BITS_MAX})"),
            ));
        }
        match (self.dim, self.hash_bits) {
            (Some(0), _) => return Err(DataError::config("dim", "0 (must be at least 1)")),
            (Some(dim), Some(bits)) if dim != 1u64 << bits => {
                return Err(DataError::config(
                    "dim",
                    format!("{dim} contradicts hash_bits {bits} (2^{bits})"),
                ));
            }
            _ => {}
        }
        if let Some(n) = self.num_classes
            && !(2..=CLASSES_MAX).contains(&n)
        {
            return Err(DataError::config(
                "num_classes",
                format!("{n} (must be 2..={CLASSES_MAX})"),
            ));
        }
        if matches!(self.csv.delimiter, b'"' | b'\n' | b'\r' | b'#') || !self.csv.delimiter.is_ascii() {
            return Err(DataError::config(
                "csv delimiter",
                format!("{:?}", char::from(self.csv.delimiter)),
            ));
        }
        Ok(())
    }

    /// First kept row and the row after the last (0-based).
    pub(crate) fn row_bounds(&self) -> (u64, u64) {
        self.row_range.as_ref().map_or((0, u64::MAX), |r| (r.start, r.end))
    }
}

/// The format of `path`: a directory is an IDX train/test directory; then
/// the extension (ignoring a final `.gz`); then the first bytes.
pub fn detect_format(path: &Path) -> Result<Format, DataError> {
    if path.is_dir() {
        return Ok(Format::Idx);
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    let ext = name.rsplit_once('.').map_or("", |(_, e)| e);
    match ext {
        "svm" | "libsvm" | "txt" | "svmlight" => return Ok(Format::Libsvm),
        "csv" | "tsv" => return Ok(Format::Csv),
        "parquet" | "pq" => return Ok(Format::Parquet),
        "idx" => return Ok(Format::Idx),
        _ if name.contains("-ubyte") || name.contains(".idx") => return Ok(Format::Idx),
        _ => {}
    }
    let mut magic = [0u8; 4];
    let n = source::sniff(path, &mut magic)?;
    if n == 4 && &magic == b"PAR1" {
        return Ok(Format::Parquet);
    }
    if n >= 2 && magic[..2] == [0x1f, 0x8b] || n == 4 && magic[..3] == [0, 0, 8] {
        return Ok(Format::Idx);
    }
    Err(DataError::format(
        path,
        "cannot tell the format (extensions: .svm/.libsvm/.txt, .csv, .parquet, .idx or an MNIST name, \
         each optionally .gz; or a directory of IDX files); name it explicitly",
    ))
}

/// Reads any supported file. For IDX, `path` is either a directory holding
/// the MNIST names (`opts.split` picks train or test) or an image file whose
/// label file is named alike (`...-images-idx3-...` → `...-labels-idx1-...`).
/// Sparse formats take `dim` and `num_classes` from `FILE.meta.json` when the
/// options leave them unset, so that train and test files agree.
///
/// With `opts.row_range`, only those rows are parsed and held: this is
/// [`crate::survey`] then [`crate::Survey::read`].
pub fn read_auto(path: &Path, opts: &ReadOptions) -> Result<Dataset, DataError> {
    if let Some(range) = &opts.row_range {
        return crate::survey(path, opts)?.read(range.clone());
    }
    let (format, opts) = effective(path, opts)?;
    match format {
        Format::Idx => {
            let (images, labels) = idx_files(path, opts.split)?;
            crate::idx::read_idx(&images, &labels, opts.normalize)
        }
        Format::Libsvm => crate::libsvm::read_libsvm(path, &opts),
        Format::Csv => crate::csv::read_csv(path, &opts),
        #[cfg(feature = "parquet")]
        Format::Parquet => crate::parquet::read_parquet(path, &opts),
        #[cfg(not(feature = "parquet"))]
        Format::Parquet => Err(not_compiled(path)),
    }
}

#[cfg(not(feature = "parquet"))]
pub(crate) fn not_compiled(path: &Path) -> DataError {
    DataError::format(path, "Parquet support is not compiled in (cargo feature `parquet`)")
}

/// The format of `path` and the options a read of it goes by: validated, with
/// the format fixed, `dim` and `num_classes` from `FILE.meta.json` where the
/// options leave them open, and no row range.
pub(crate) fn effective(path: &Path, opts: &ReadOptions) -> Result<(Format, ReadOptions), DataError> {
    opts.validate()?;
    let format = match opts.format {
        Some(f) => f,
        None => detect_format(path)?,
    };
    let mut opts = ReadOptions {
        format: Some(format),
        row_range: None,
        ..opts.clone()
    };
    if format != Format::Idx
        && let Some(m) = meta::read_meta(path)?
    {
        if opts.dim.is_none() && opts.hash_bits.is_none() {
            opts.dim = Some(m.dim);
        }
        if opts.num_classes.is_none() {
            opts.num_classes = Some(m.num_classes);
        }
        opts.validate()?;
    }
    Ok((format, opts))
}

/// The image and label files of an IDX path: a directory's `split`, or an image file and the label file named alike.
pub(crate) fn idx_files(path: &Path, split: Split) -> Result<(std::path::PathBuf, std::path::PathBuf), DataError> {
    if path.is_dir() {
        crate::idx::idx_paths(path, split)
    } else {
        Ok((path.to_owned(), crate::idx::idx_labels_for(path)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_name_and_by_magic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        assert_eq!(detect_format(Path::new("a/b.svm")).ok(), Some(Format::Libsvm));
        assert_eq!(detect_format(Path::new("b.libsvm.gz")).ok(), Some(Format::Libsvm));
        assert_eq!(detect_format(Path::new("b.CSV")).ok(), Some(Format::Csv));
        assert_eq!(detect_format(Path::new("x.parquet")).ok(), Some(Format::Parquet));
        assert_eq!(
            detect_format(Path::new("train-images-idx3-ubyte.gz")).ok(),
            Some(Format::Idx)
        );
        assert_eq!(detect_format(d).ok(), Some(Format::Idx));
        std::fs::write(d.join("noext"), b"PAR1....").expect("write");
        assert_eq!(detect_format(&d.join("noext")).ok(), Some(Format::Parquet));
        std::fs::write(d.join("other"), b"hello").expect("write");
        let err = detect_format(&d.join("other")).expect_err("unknown").to_string();
        assert!(err.contains("other: cannot tell the format"), "{err}");
        let err = read_auto(&d.join("missing.svm"), &ReadOptions::default())
            .expect_err("missing")
            .to_string();
        assert!(err.contains("missing.svm: "), "{err}");
    }

    #[test]
    fn options_are_validated() {
        let bad = [
            ReadOptions {
                hash_bits: Some(33),
                ..ReadOptions::default()
            },
            ReadOptions {
                dim: Some(0),
                ..ReadOptions::default()
            },
            ReadOptions {
                hash_bits: Some(4),
                dim: Some(10),
                ..ReadOptions::default()
            },
            ReadOptions {
                num_classes: Some(1),
                ..ReadOptions::default()
            },
        ];
        for opts in bad {
            assert!(matches!(opts.validate(), Err(DataError::Config { .. })), "{opts:?}");
        }
        assert!(
            ReadOptions {
                hash_bits: Some(4),
                dim: Some(16),
                ..ReadOptions::default()
            }
            .validate()
            .is_ok()
        );
    }
}
