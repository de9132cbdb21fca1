//! IDX files (the MNIST format, raw or gzip): unsigned-byte images of any
//! shape plus a label file, read into a dense data set with optional
//! normalisation; and the Fashion-MNIST layout of a directory.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{DataError, Dataset, Features, source};

/// Most dimensions an IDX header may declare.
pub const IDX_DIMS_MAX: usize = 8;
/// Largest IDX payload read into memory (16 GiB).
pub const IDX_PAYLOAD_BYTES_MAX: u64 = 1 << 34;
/// Growth step while reading a payload, so that a header that lies about the
/// size costs at most this much memory before the truncation is found.
const IDX_READ_CHUNK_BYTES: u64 = 64 << 20;
/// IDX element type code of unsigned bytes, the only one read.
const IDX_TYPE_U8: u8 = 0x08;

/// How pixel bytes become features.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Normalize {
    /// The raw byte as `f32` (0..=255).
    None,
    /// `x / 255`, in 0..=1.
    Scale01,
    /// `(x / 255 - mean) / std`, computed in `f32` like torchvision's
    /// `ToTensor` followed by `Normalize`.
    Standardize { mean: f32, std: f32 },
}

impl Normalize {
    /// The usual Fashion-MNIST statistics (mean 0.2860, std 0.3530), as the PyTorch peer uses them.
    pub const FASHION_MNIST: Self = Self::Standardize {
        mean: 0.2860,
        std: 0.3530,
    };

    fn validate(self) -> Result<(), DataError> {
        if let Self::Standardize { mean, std } = self
            && !(mean.is_finite() && std.is_finite() && std > 0.0)
        {
            return Err(DataError::config(
                "normalize",
                format!("mean {mean} and std {std} (std must be > 0)"),
            ));
        }
        Ok(())
    }

    /// The feature value of every byte value.
    fn table(self) -> [f32; 256] {
        std::array::from_fn(|b| {
            let x = b as f32;
            match self {
                Self::None => x,
                Self::Scale01 => x / 255.0,
                Self::Standardize { mean, std } => (x / 255.0 - mean) / std,
            }
        })
    }
}

/// Which half of a train/test directory to read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Split {
    #[default]
    Train,
    Test,
}

impl Split {
    /// File-name prefix of the MNIST convention.
    fn prefix(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Test => "t10k",
        }
    }
}

/// The image and label files of `split` in `dir`, named as MNIST names them
/// (`train-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each optionally `.gz`).
pub fn idx_paths(dir: &Path, split: Split) -> Result<(PathBuf, PathBuf), DataError> {
    let find = |kind: &str| {
        let stem = format!("{}-{kind}-ubyte", split.prefix());
        [format!("{stem}.gz"), stem.clone()]
            .into_iter()
            .map(|name| dir.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| DataError::format(dir, format!("no {stem} or {stem}.gz in this directory")))
    };
    Ok((find("images-idx3")?, find("labels-idx1")?))
}

/// The label file next to an image file: `-images-idx3` becomes `-labels-idx1` in the name.
pub fn idx_labels_for(images: &Path) -> Result<PathBuf, DataError> {
    let name = images.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if !name.contains("images-idx") {
        return Err(DataError::format(
            images,
            "cannot tell the label file of this IDX file (expected `images-idx` in its name); \
             pass the directory instead",
        ));
    }
    let labels = name
        .replacen("images-idx3", "labels-idx1", 1)
        .replacen("images-idx", "labels-idx", 1);
    Ok(images.with_file_name(labels))
}

/// Reads `split` of an MNIST-style directory.
pub fn read_idx_dir(dir: &Path, split: Split, normalize: Normalize) -> Result<Dataset, DataError> {
    let (images, labels) = idx_paths(dir, split)?;
    read_idx(&images, &labels, normalize)
}

/// Fashion-MNIST (train, test) from `dir`, standardised with [`Normalize::FASHION_MNIST`].
pub fn fashion_mnist(dir: &Path) -> Result<(Dataset, Dataset), DataError> {
    let train = read_idx_dir(dir, Split::Train, Normalize::FASHION_MNIST)?;
    let test = read_idx_dir(dir, Split::Test, Normalize::FASHION_MNIST)?;
    Ok((train, test))
}

/// Reads an image file and its label file (each raw or gzip, told apart by magic bytes).
pub fn read_idx(images: &Path, labels: &Path, normalize: Normalize) -> Result<Dataset, DataError> {
    normalize.validate()?;
    let image_file = parse_idx_u8(source::open(images)?, images)?;
    let label_file = parse_idx_u8(source::open(labels)?, labels)?;
    assemble(image_file, images, label_file, labels, normalize)
}

/// A decoded IDX file: dimensions and payload.
#[derive(Debug)]
pub(crate) struct IdxU8 {
    dims: Vec<u32>,
    data: Vec<u8>,
}

/// The header of an IDX file.
#[derive(Clone, Debug)]
struct IdxHeader {
    dims: Vec<u32>,
    /// Bytes of the header itself: where the payload starts.
    bytes: u64,
    /// Bytes of payload the dimensions call for.
    payload: u64,
}

impl IdxHeader {
    fn truncated(&self, path: &Path, found: u64) -> DataError {
        DataError::format(
            path,
            format!(
                "truncated: dimensions {:?} need {} bytes of data, found {found}",
                self.dims, self.payload
            ),
        )
    }

    fn trailing(&self, path: &Path) -> DataError {
        DataError::format(path, format!("trailing bytes after the {} bytes of data", self.payload))
    }
}

fn parse_idx_header<R: Read>(r: &mut R, path: &Path) -> Result<IdxHeader, DataError> {
    let mut magic = [0u8; 4];
    read_exact_or(r, &mut magic, path, "truncated header (no 4-byte magic)")?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(DataError::format(
            path,
            format!(
                "bad magic {:02x} {:02x}: not an IDX file (must start with 00 00)",
                magic[0], magic[1]
            ),
        ));
    }
    if magic[2] != IDX_TYPE_U8 {
        return Err(DataError::format(
            path,
            format!(
                "unsupported IDX element type 0x{:02x}: only unsigned byte (0x08) is read",
                magic[2]
            ),
        ));
    }
    let ndims = usize::from(magic[3]);
    if ndims == 0 || ndims > IDX_DIMS_MAX {
        return Err(DataError::format(
            path,
            format!("{ndims} dimensions (must be 1..={IDX_DIMS_MAX})"),
        ));
    }
    let mut dims = Vec::with_capacity(ndims);
    let mut payload: u64 = 1;
    for d in 0..ndims {
        let mut b = [0u8; 4];
        read_exact_or(
            r,
            &mut b,
            path,
            &format!("truncated header (dimension {d} of {ndims} missing)"),
        )?;
        let n = u32::from_be_bytes(b);
        dims.push(n);
        payload = payload.saturating_mul(u64::from(n));
    }
    let row_bytes = dims[1..].iter().fold(1u64, |acc, &n| acc.saturating_mul(u64::from(n)));
    if payload > IDX_PAYLOAD_BYTES_MAX || row_bytes > IDX_PAYLOAD_BYTES_MAX {
        return Err(DataError::format(
            path,
            format!("dimensions {dims:?} need {payload} bytes, over IDX_PAYLOAD_BYTES_MAX ({IDX_PAYLOAD_BYTES_MAX})"),
        ));
    }
    Ok(IdxHeader {
        dims,
        bytes: 4 + 4 * ndims as u64,
        payload,
    })
}

pub(crate) fn parse_idx_u8<R: Read>(mut r: R, path: &Path) -> Result<IdxU8, DataError> {
    let header = parse_idx_header(&mut r, path)?;
    let payload = header.payload;
    let mut data = Vec::with_capacity(payload.min(IDX_READ_CHUNK_BYTES) as usize);
    (&mut r)
        .take(payload)
        .read_to_end(&mut data)
        .map_err(|e| DataError::io(path, e))?;
    if (data.len() as u64) < payload {
        return Err(header.truncated(path, data.len() as u64));
    }
    let mut extra = [0u8; 1];
    let n = r.read(&mut extra).map_err(|e| DataError::io(path, e))?;
    if n != 0 {
        return Err(header.trailing(path));
    }
    Ok(IdxU8 {
        dims: header.dims,
        data,
    })
}

/// What a look at an image file and its label file found: the headers, and
/// the number of classes among all labels. The image payload is not read.
#[derive(Clone, Debug)]
pub(crate) struct IdxSurvey {
    images: PathBuf,
    labels: PathBuf,
    image_header: IdxHeader,
    label_header: IdxHeader,
    num_classes: u32,
}

/// Label bytes read at a time while a survey looks for the largest label.
const IDX_LABEL_CHUNK_BYTES: usize = 64 << 10;

/// Reads the headers of `images` and `labels` and every label (one byte per
/// row, so the number of classes is the whole file's, for a tiny part of the
/// cost of the images). A plain image file's length is checked against its
/// header; a gzip one's only by the reader of its last rows.
pub(crate) fn survey_idx(images: &Path, labels: &Path) -> Result<IdxSurvey, DataError> {
    let image_header = parse_idx_header(&mut source::open(images)?, images)?;
    if !source::is_gzip(images)? {
        let len = std::fs::metadata(images).map_err(|e| DataError::io(images, e))?.len();
        let found = len.saturating_sub(image_header.bytes);
        if found < image_header.payload {
            return Err(image_header.truncated(images, found));
        }
        if found > image_header.payload {
            return Err(image_header.trailing(images));
        }
    }
    let mut r = source::open(labels)?;
    let label_header = parse_idx_header(&mut r, labels)?;
    let count = image_header.dims[0];
    if label_header.dims.len() != 1 {
        return Err(DataError::format(
            labels,
            format!(
                "a label file has 1 dimension, this one has {} ({:?})",
                label_header.dims.len(),
                label_header.dims
            ),
        ));
    }
    if label_header.dims[0] != count {
        return Err(DataError::format(
            labels,
            format!(
                "holds {} labels but {} holds {count} images",
                label_header.dims[0],
                images.display()
            ),
        ));
    }
    let mut chunk = vec![0u8; IDX_LABEL_CHUNK_BYTES];
    let (mut seen, mut max) = (0u64, 0u8);
    let mut payload = (&mut r).take(label_header.payload);
    loop {
        match payload.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                seen += n as u64;
                max = chunk[..n].iter().copied().fold(max, u8::max);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DataError::io(labels, e)),
        }
    }
    if seen < label_header.payload {
        return Err(label_header.truncated(labels, seen));
    }
    if r.read(&mut chunk[..1]).map_err(|e| DataError::io(labels, e))? != 0 {
        return Err(label_header.trailing(labels));
    }
    Ok(IdxSurvey {
        images: images.to_owned(),
        labels: labels.to_owned(),
        image_header,
        label_header,
        num_classes: (u32::from(max) + 1).max(2),
    })
}

impl IdxSurvey {
    pub(crate) fn rows(&self) -> u64 {
        u64::from(self.image_header.dims[0])
    }

    pub(crate) fn dim(&self) -> u64 {
        self.image_header.dims[1..].iter().map(|&d| u64::from(d)).product()
    }

    pub(crate) fn num_classes(&self) -> u32 {
        self.num_classes
    }

    /// Rows `range` (clamped to the file): a plain file seeks to them, a gzip
    /// one is decompressed up to them and no further than their end (except
    /// for the last rows, whose reader checks that nothing trails them).
    pub(crate) fn read(&self, normalize: Normalize, range: Range<u64>) -> Result<Dataset, DataError> {
        normalize.validate()?;
        let rows = self.rows();
        let start = range.start.min(rows);
        let end = range.end.clamp(start, rows);
        let dim = self.dim();
        let pixels = read_span(&self.images, &self.image_header, start * dim, (end - start) * dim)?;
        let labels = read_span(&self.labels, &self.label_header, start, end - start)?;
        let table = normalize.table();
        Ok(Dataset {
            features: Features::Dense {
                dim: dim as usize,
                values: pixels.iter().map(|&b| table[usize::from(b)]).collect(),
            },
            labels: labels.iter().map(|&l| u32::from(l)).collect(),
            num_classes: self.num_classes,
        })
    }
}

/// `len` payload bytes of an IDX file from payload byte `from`, with the
/// whole read's errors for a file that ends early or runs on.
fn read_span(path: &Path, header: &IdxHeader, from: u64, len: u64) -> Result<Vec<u8>, DataError> {
    let mut r = source::open_at(path, header.bytes + from).map_err(|e| match e {
        // A gzip stream that ends before the span: the file is truncated.
        DataError::Format { .. } => header.truncated(path, from),
        other => other,
    })?;
    let mut data = Vec::with_capacity(len.min(IDX_READ_CHUNK_BYTES) as usize);
    (&mut r)
        .take(len)
        .read_to_end(&mut data)
        .map_err(|e| DataError::io(path, e))?;
    if (data.len() as u64) < len {
        return Err(header.truncated(path, from + data.len() as u64));
    }
    if from + len == header.payload {
        let mut extra = [0u8; 1];
        if r.read(&mut extra).map_err(|e| DataError::io(path, e))? != 0 {
            return Err(header.trailing(path));
        }
    }
    Ok(data)
}

fn read_exact_or<R: Read>(r: &mut R, buf: &mut [u8], path: &Path, msg: &str) -> Result<(), DataError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => DataError::format(path, msg),
        _ => DataError::io(path, e),
    })
}

pub(crate) fn assemble(
    images: IdxU8,
    images_path: &Path,
    labels: IdxU8,
    labels_path: &Path,
    normalize: Normalize,
) -> Result<Dataset, DataError> {
    if labels.dims.len() != 1 {
        return Err(DataError::format(
            labels_path,
            format!(
                "a label file has 1 dimension, this one has {} ({:?})",
                labels.dims.len(),
                labels.dims
            ),
        ));
    }
    let count = images.dims[0] as usize;
    if labels.data.len() != count {
        return Err(DataError::format(
            labels_path,
            format!(
                "holds {} labels but {} holds {count} images",
                labels.data.len(),
                images_path.display()
            ),
        ));
    }
    let dim: usize = images.dims[1..].iter().map(|&d| d as usize).product();
    let table = normalize.table();
    let values = images.data.iter().map(|&b| table[usize::from(b)]).collect();
    let num_classes = labels.data.iter().map(|&l| u32::from(l) + 1).max().unwrap_or(0).max(2);
    let labels = labels.data.iter().map(|&l| u32::from(l)).collect();
    Ok(Dataset {
        features: Features::Dense { dim, values },
        labels,
        num_classes,
    })
}

/// Writes an unsigned-byte IDX file (uncompressed) with the given dimensions.
pub fn write_idx_u8(path: &Path, dims: &[u32], data: &[u8]) -> Result<(), DataError> {
    assert!(
        (1..=IDX_DIMS_MAX).contains(&dims.len()),
        "IDX needs 1..={IDX_DIMS_MAX} dimensions"
    );
    let len: u64 = dims.iter().map(|&d| u64::from(d)).product();
    assert_eq!(
        len,
        data.len() as u64,
        "dimensions {dims:?} do not match {} bytes",
        data.len()
    );
    let file = File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut out = BufWriter::new(file);
    let mut header = vec![0, 0, IDX_TYPE_U8, dims.len() as u8];
    for d in dims {
        header.extend_from_slice(&d.to_be_bytes());
    }
    let io = |e| DataError::io(path, e);
    out.write_all(&header).map_err(io)?;
    out.write_all(data).map_err(io)?;
    out.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write_pair(dir: &Path, images: &[u8], dims: &[u32], labels: &[u8]) -> (PathBuf, PathBuf) {
        let (ip, lp) = (dir.join("train-images-idx3-ubyte"), dir.join("train-labels-idx1-ubyte"));
        write_idx_u8(&ip, dims, images).expect("write images");
        write_idx_u8(&lp, &[labels.len() as u32], labels).expect("write labels");
        (ip, lp)
    }

    #[test]
    fn round_trip_with_each_normalisation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ip, lp) = write_pair(dir.path(), &[0, 255, 51, 102, 0, 0], &[3, 1, 2], &[2, 0, 1]);
        let raw = read_idx(&ip, &lp, Normalize::None).expect("read");
        assert_eq!(raw.labels, vec![2, 0, 1]);
        assert_eq!(raw.num_classes, 3);
        assert_eq!(
            raw.features,
            Features::Dense {
                dim: 2,
                values: vec![0.0, 255.0, 51.0, 102.0, 0.0, 0.0]
            }
        );
        let s = read_idx_dir(dir.path(), Split::Train, Normalize::Scale01).expect("read dir");
        let Features::Dense { values, .. } = &s.features else {
            panic!("dense expected")
        };
        assert_eq!(values[..3], [0.0, 1.0, 0.2]);
        let z = read_idx(&ip, &lp, Normalize::FASHION_MNIST).expect("read");
        let Features::Dense { values, .. } = &z.features else {
            panic!("dense expected")
        };
        assert_eq!(values[1], (1.0f32 - 0.2860) / 0.3530);
        assert!(read_idx(&ip, &lp, Normalize::Standardize { mean: 0.0, std: 0.0 }).is_err());
    }

    #[test]
    fn malformed_files_name_the_file_and_the_fault() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ip, lp) = write_pair(dir.path(), &[1, 2, 3, 4], &[2, 2], &[0, 1]);
        let mut bytes = std::fs::read(&ip).expect("read back");

        bytes.pop();
        std::fs::write(&ip, &bytes).expect("write");
        let err = read_idx(&ip, &lp, Normalize::None).expect_err("truncated").to_string();
        assert!(err.contains("train-images-idx3-ubyte: truncated"), "{err}");

        bytes[0] = 0x50;
        std::fs::write(&ip, &bytes).expect("write");
        let err = read_idx(&ip, &lp, Normalize::None).expect_err("bad magic").to_string();
        assert!(err.contains("train-images-idx3-ubyte: bad magic 50 00"), "{err}");

        write_pair(dir.path(), &[1, 2, 3, 4], &[2, 2], &[0, 1, 1]);
        let err = read_idx(&ip, &lp, Normalize::None)
            .expect_err("count mismatch")
            .to_string();
        assert!(err.contains("train-labels-idx1-ubyte: holds 3 labels but"), "{err}");
        assert!(err.contains("holds 2 images"), "{err}");

        let err = read_idx(&dir.path().join("nope"), &lp, Normalize::None)
            .expect_err("missing")
            .to_string();
        assert!(err.contains("nope: "), "{err}");
        let err = read_idx_dir(dir.path(), Split::Test, Normalize::None)
            .expect_err("no test split")
            .to_string();
        assert!(err.contains("no t10k-images-idx3-ubyte"), "{err}");
    }

    #[test]
    fn labels_path_is_derived_from_images_path() {
        let p = idx_labels_for(Path::new("/d/t10k-images-idx3-ubyte.gz")).expect("derivable");
        assert_eq!(p, Path::new("/d/t10k-labels-idx1-ubyte.gz"));
        assert!(idx_labels_for(Path::new("/d/t10k-labels-idx1-ubyte")).is_err());
    }

    #[test]
    fn fashion_mnist_from_the_repository() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist");
        let (train, test) = fashion_mnist(&dir).expect("committed data set");
        assert_eq!((train.rows(), test.rows()), (60_000, 10_000));
        assert_eq!((train.dim(), train.num_classes), (784, 10));
        // Every class appears 6000 times in train (documented by Zalando).
        let mut counts = [0u32; 10];
        train.labels.iter().for_each(|&l| counts[l as usize] += 1);
        assert!(counts.iter().all(|&c| c == 6000), "{counts:?}");
        let Features::Dense { values, .. } = &train.features else {
            panic!("dense expected")
        };
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len() as f64;
        assert!(mean.abs() < 0.01, "standardised mean {mean}");
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(
            head in proptest::collection::vec(any::<u8>(), 0..16),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
            valid_start in any::<bool>(),
        ) {
            let mut bytes = if valid_start { vec![0, 0, 8] } else { Vec::new() };
            bytes.extend_from_slice(&head);
            bytes.extend_from_slice(&tail);
            let labels = parse_idx_u8(&[0u8, 0, 8, 1, 0, 0, 0, 1, 3][..], Path::new("l"));
            match (parse_idx_u8(&bytes[..], Path::new("i")), labels) {
                (Ok(images), Ok(labels)) => {
                    let _ = assemble(images, Path::new("i"), labels, Path::new("l"), Normalize::Scale01);
                }
                (Err(e), _) => prop_assert!(e.to_string().starts_with("i: ")),
                (_, Err(e)) => prop_assert!(false, "valid label file rejected: {e}"),
            }
        }
    }
}
