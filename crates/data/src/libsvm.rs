//! LIBSVM / SVMlight text: a hand-rolled reader over bytes (no regex, no
//! allocation per token) and a streaming writer.
//!
//! A line is `label [qid:N] index:value ... [# comment]`. Blank and
//! comment-only lines are skipped. Indices are kept as given (0- or 1-based)
//! unless `hash_bits` is set; each row is sorted by index and duplicate
//! indices are merged by summing their values.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::shown;
use crate::labels::{Labels, parse_label};
use crate::read::ReadOptions;
use crate::source::{self, Lines};
use crate::sparse::SparseBuilder;
use crate::{DataError, Dataset};

/// Reads a LIBSVM file (plain or gzip) into a sparse data set. With
/// `opts.row_range`, only those rows (see [`crate::survey`]).
pub fn read_libsvm(path: &Path, opts: &ReadOptions) -> Result<Dataset, DataError> {
    opts.validate()?;
    if let Some(range) = &opts.row_range {
        let opts = ReadOptions {
            format: Some(crate::Format::Libsvm),
            ..opts.clone()
        };
        return crate::survey(path, &opts)?.read(range.clone());
    }
    parse_libsvm(source::open_at(path, 0)?, path, opts)
}

pub(crate) fn parse_libsvm<R: Read>(reader: R, path: &Path, opts: &ReadOptions) -> Result<Dataset, DataError> {
    parse_libsvm_from(Lines::new(reader, path), 0, path, opts, Labels::new(opts.num_classes))
}

/// Parses the data rows of `lines`, the first of which is row `row` of the
/// file, keeping those in `opts.row_bounds()`. Lines before the first kept
/// row are only told apart (data row or not), never parsed.
pub(crate) fn parse_libsvm_from<R: Read>(
    mut lines: Lines<R>,
    mut row: u64,
    path: &Path,
    opts: &ReadOptions,
    mut labels: Labels,
) -> Result<Dataset, DataError> {
    let mut features = SparseBuilder::new(opts.hash_bits, opts.dim);
    let (first, end) = opts.row_bounds();
    while let Some(l) = lines.next_line()? {
        let (at, line) = (l.number, strip_comment(l.bytes));
        let Some(label_end) = first_token(line) else { continue };
        let r = row;
        row += 1;
        if r < first {
            continue;
        }
        if r >= end {
            break;
        }
        let (label_tok, rest) = line.split_at(label_end);
        let label = parse_label(trim_start(label_tok)).map_err(|m| DataError::line(path, at, m))?;
        if let Err(m) = parse_entries(rest, &mut features) {
            features.discard_row();
            return Err(DataError::line(path, at, m));
        }
        features.end_row();
        labels.push(label, at).map_err(|m| DataError::line(path, at, m))?;
    }
    debug_assert_eq!(features.rows(), labels.len());
    let (labels, num_classes) = labels.finish("line").map_err(|(at, m)| DataError::line(path, at, m))?;
    Ok(Dataset {
        features: features.finish(),
        labels,
        num_classes,
    })
}

/// The label of a LIBSVM line, or `None` for a blank or comment-only line
/// (which is no data row): what a row scan needs, without the features.
/// Looks only at the line's first token, so it costs a few bytes per line;
/// it agrees with [`parse_libsvm_from`] (tested).
pub(crate) fn line_label(line: &[u8]) -> Option<Result<i64, String>> {
    let start = line.iter().position(|&b| !is_space(b))?;
    if line[start] == b'#' {
        return None;
    }
    let len = line[start..]
        .iter()
        .position(|&b| is_space(b) || b == b'#')
        .unwrap_or(line.len() - start);
    Some(parse_label(&line[start..start + len]))
}

fn is_space(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn strip_comment(line: &[u8]) -> &[u8] {
    match memchr::memchr(b'#', line) {
        Some(p) => &line[..p],
        None => line,
    }
}

fn trim_start(s: &[u8]) -> &[u8] {
    let skip = s.iter().take_while(|&&b| is_space(b)).count();
    &s[skip..]
}

/// End of the first token of `line`, or `None` if the line is blank.
fn first_token(line: &[u8]) -> Option<usize> {
    let start = line.iter().position(|&b| !is_space(b))?;
    Some(
        line[start..]
            .iter()
            .position(|&b| is_space(b))
            .map_or(line.len(), |p| start + p),
    )
}

fn parse_entries(rest: &[u8], features: &mut SparseBuilder) -> Result<(), String> {
    for tok in rest.split(|&b| is_space(b)).filter(|t| !t.is_empty()) {
        let Some(colon) = tok.iter().position(|&b| b == b':') else {
            return Err(format!("token `{}` is not index:value", shown(tok)));
        };
        let (key, value) = (&tok[..colon], &tok[colon + 1..]);
        if key == b"qid" {
            parse_u64(value).ok_or_else(|| format!("bad qid in token `{}`", shown(tok)))?;
            continue;
        }
        let index = parse_u64(key).ok_or_else(|| format!("bad index in token `{}`", shown(tok)))?;
        let value = parse_f32(value).ok_or_else(|| format!("bad value in token `{}`", shown(tok)))?;
        features.push(index, value)?;
    }
    Ok(())
}

/// `[0-9]{1,19}` (always fits a `u64`).
pub(crate) fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(b - b'0');
    }
    Some(v)
}

/// A decimal float; `1` (the common case in click data) without the general parser.
pub(crate) fn parse_f32(s: &[u8]) -> Option<f32> {
    if s == b"1" {
        return Some(1.0);
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// Writes rows as LIBSVM text, streaming: memory does not grow with the file.
/// Labels are written as class ids; indices as given; values `1` as `1`.
pub struct LibsvmWriter {
    out: BufWriter<File>,
    line: Vec<u8>,
    path: PathBuf,
}

impl LibsvmWriter {
    pub fn create(path: &Path) -> Result<Self, DataError> {
        let file = File::create(path).map_err(|e| DataError::io(path, e))?;
        Ok(Self {
            out: BufWriter::with_capacity(1 << 20, file),
            line: Vec::new(),
            path: path.to_owned(),
        })
    }

    pub fn write_sparse(&mut self, label: u32, indices: &[u32], values: &[f32]) -> Result<(), DataError> {
        assert_eq!(indices.len(), values.len(), "indices and values differ in length");
        self.line.clear();
        push_u64(&mut self.line, u64::from(label));
        for (&i, &v) in indices.iter().zip(values) {
            self.line.push(b' ');
            push_u64(&mut self.line, u64::from(i));
            self.line.push(b':');
            push_f32(&mut self.line, v);
        }
        self.line.push(b'\n');
        self.out.write_all(&self.line).map_err(|e| DataError::io(&self.path, e))
    }

    /// Writes the non-zero entries of a dense row, 0-based.
    pub fn write_dense(&mut self, label: u32, values: &[f32]) -> Result<(), DataError> {
        self.line.clear();
        push_u64(&mut self.line, u64::from(label));
        for (i, &v) in values.iter().enumerate() {
            if v != 0.0 {
                self.line.push(b' ');
                push_u64(&mut self.line, i as u64);
                self.line.push(b':');
                push_f32(&mut self.line, v);
            }
        }
        self.line.push(b'\n');
        self.out.write_all(&self.line).map_err(|e| DataError::io(&self.path, e))
    }

    pub fn finish(mut self) -> Result<(), DataError> {
        self.out.flush().map_err(|e| DataError::io(&self.path, e))?;
        self.out.get_ref().sync_all().map_err(|e| DataError::io(&self.path, e))
    }
}

pub(crate) fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut n = digits.len();
    loop {
        n -= 1;
        digits[n] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[n..]);
}

/// Shortest text that parses back to the same `f32`.
pub(crate) fn push_f32(out: &mut Vec<u8>, v: f32) {
    if v == 1.0 {
        out.push(b'1');
    } else {
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{v:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Features;
    use proptest::prelude::*;

    fn parse(text: &str) -> Result<Dataset, DataError> {
        parse_libsvm(text.as_bytes(), Path::new("t.svm"), &ReadOptions::default())
    }

    #[test]
    fn parses_labels_comments_qid_and_unsorted_rows() {
        let ds = parse("# header\n+1 qid:3 7:0.5 2:1 # tail\n\n-1\t1:2e0  2:-1.5\n").expect("valid");
        assert_eq!(ds.labels, vec![1, 0]);
        assert_eq!(ds.num_classes, 2);
        let want = Features::Sparse {
            dim: 8,
            indptr: vec![0, 2, 4],
            indices: vec![2, 7, 1, 2],
            values: vec![1.0, 0.5, 2.0, -1.5],
        };
        assert_eq!(ds.features, want);
    }

    #[test]
    fn bad_token_names_file_line_and_token() {
        let text = "1 1:1\n0 2:1\n# c\n1 3:1\n\n0 1:1\n1 2:1 3:abc\n";
        let err = parse(text).expect_err("bad value").to_string();
        assert_eq!(err, "t.svm:7: bad value in token `3:abc`");
        let err = parse("1 1:1\n1 x\n").expect_err("no colon").to_string();
        assert_eq!(err, "t.svm:2: token `x` is not index:value");
        let err = parse("1 -3:1\n").expect_err("negative index").to_string();
        assert!(err.starts_with("t.svm:1: bad index"), "{err}");
        let err = parse("abc 1:1\n").expect_err("bad label").to_string();
        assert!(err.starts_with("t.svm:1: label `abc`"), "{err}");
    }

    #[test]
    fn index_out_of_range_without_hashing() {
        let opts = ReadOptions {
            dim: Some(100),
            ..ReadOptions::default()
        };
        let err = parse_libsvm(&b"1 5:1\n0 100:1\n"[..], Path::new("d.svm"), &opts).expect_err("range");
        assert_eq!(err.to_string(), "d.svm:2: index 100 out of range: dim is 100");
        let err = parse("1 4294967296:1\n").expect_err("wider than u32").to_string();
        assert!(err.starts_with("t.svm:1: index 4294967296 exceeds"), "{err}");
    }

    #[test]
    fn hashing_maps_into_the_hashed_space() {
        let opts = ReadOptions {
            hash_bits: Some(8),
            ..ReadOptions::default()
        };
        let ds = parse_libsvm(&b"1 123456789012:1 5:2\n"[..], Path::new("h.svm"), &opts).expect("valid");
        let Features::Sparse { dim, indices, .. } = &ds.features else {
            panic!("sparse expected")
        };
        assert_eq!(*dim, 256);
        let mut want = vec![crate::hash_index(123_456_789_012, 8), crate::hash_index(5, 8)];
        want.sort_unstable();
        want.dedup();
        assert_eq!(indices, &want);
    }

    #[test]
    fn row_range_keeps_only_those_rows() {
        let opts = ReadOptions {
            row_range: Some(1..3),
            dim: Some(10),
            ..ReadOptions::default()
        };
        let text = b"0 1:1\n# skip\n1 2:1\n0 3:1\n1 4:1 this-line-is-never-parsed\n";
        let ds = parse_libsvm(&text[..], Path::new("r.svm"), &opts).expect("valid");
        assert_eq!(ds.labels, vec![1, 0]);
        assert_eq!(ds.row_nnz(1), 1);
    }

    #[test]
    fn writer_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.svm");
        let mut w = LibsvmWriter::create(&path).expect("create");
        w.write_sparse(1, &[0, 9, 4_000_000], &[1.0, 0.1, -3.25e-7])
            .expect("write");
        w.write_dense(0, &[0.0, 2.5, 0.0]).expect("write");
        w.finish().expect("finish");
        let ds = read_libsvm(&path, &ReadOptions::default()).expect("read back");
        assert_eq!(ds.labels, vec![1, 0]);
        let Features::Sparse {
            indices, values, dim, ..
        } = &ds.features
        else {
            panic!("sparse expected")
        };
        assert_eq!(*dim, 4_000_001);
        assert_eq!(indices, &vec![0, 9, 4_000_000, 1]);
        assert_eq!(values, &vec![1.0, 0.1, -3.25e-7, 2.5]);
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_libsvm(&bytes[..], Path::new("p.svm"), &ReadOptions::default());
        }

        #[test]
        fn never_panics_on_near_valid_text(
            text in "([-+]?[0-9]{0,3}( [0-9a-z]{0,4}:[-0-9.e]{0,5}){0,4}( #.*)?\n){0,8}",
            hash in proptest::option::of(1u32..=32),
        ) {
            let opts = ReadOptions { hash_bits: hash, ..ReadOptions::default() };
            if let Ok(ds) = parse_libsvm(text.as_bytes(), Path::new("p.svm"), &opts) {
                prop_assert!(ds.labels.iter().all(|&l| l < ds.num_classes));
            }
        }
    }
}
