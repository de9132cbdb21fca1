//! CSV: dense rows of numbers with one label column, read with a small
//! hand-rolled splitter (quoted fields are rejected, not parsed), and a
//! streaming writer.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::shown;
use crate::labels::{Labels, parse_label};
use crate::libsvm::{parse_f32, push_f32, push_u64};
use crate::read::ReadOptions;
use crate::source::{self, Lines};
use crate::{DataError, Dataset, Features};

/// Widest CSV accepted (columns), a limit on what one header line can make us allocate per row.
pub const CSV_COLUMNS_MAX: usize = 1 << 20;

/// Whether the first line names the columns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Header {
    /// A header if any field of the first line is not a number.
    #[default]
    Auto,
    Present,
    Absent,
}

/// Which column holds the label.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LabelColumn {
    /// 0-based position.
    Index(usize),
    /// Name in the header (implies a header).
    Name(String),
}

impl Default for LabelColumn {
    fn default() -> Self {
        Self::Index(0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsvOptions {
    pub header: Header,
    pub label: LabelColumn,
    pub delimiter: u8,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            header: Header::Auto,
            label: LabelColumn::default(),
            delimiter: b',',
        }
    }
}

/// Reads a CSV file (plain or gzip) into a dense data set: the label column
/// and every other column as an `f32` feature, in file order. With
/// `opts.row_range`, only those rows (see [`crate::survey`]).
pub fn read_csv(path: &Path, opts: &ReadOptions) -> Result<Dataset, DataError> {
    opts.validate()?;
    if let Some(range) = &opts.row_range {
        let opts = ReadOptions {
            format: Some(crate::Format::Csv),
            ..opts.clone()
        };
        return crate::survey(path, &opts)?.read(range.clone());
    }
    parse_csv(source::open_at(path, 0)?, path, opts)
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ').unwrap_or(s.len());
    let end = s.iter().rposition(|&b| b != b' ').map_or(start, |p| p + 1);
    &s[start..end.max(start)]
}

/// Whether a line holds no data (blank lines are skipped).
pub(crate) fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|&b| b == b' ')
}

pub(crate) fn parse_csv<R: Read>(reader: R, path: &Path, opts: &ReadOptions) -> Result<Dataset, DataError> {
    parse_csv_from(
        Lines::new(reader, path),
        0,
        None,
        path,
        opts,
        Labels::new(opts.num_classes),
    )
}

/// The shape of a CSV file from its first non-blank line `line` (number
/// `at`): the number of fields, the label's position, and whether the line is
/// a header.
pub(crate) fn first_line(
    line: &[u8],
    at: u64,
    path: &Path,
    opts: &ReadOptions,
) -> Result<((usize, usize), bool), DataError> {
    reject_quotes(line, at, path, opts.csv.delimiter)?;
    first_line_shape(line, &opts.csv, opts.dim).map_err(|m| DataError::line(path, at, m))
}

fn reject_quotes(line: &[u8], at: u64, path: &Path, delim: u8) -> Result<(), DataError> {
    if memchr::memchr(b'"', line).is_some() {
        let field = line.split(|&b| b == delim).position(|f| f.contains(&b'"')).unwrap_or(0);
        return Err(DataError::line(
            path,
            at,
            format!("field {} is quoted: quoted CSV fields are not supported", field + 1),
        ));
    }
    Ok(())
}

/// The label of a data line of a file shaped `(ncols, label_col)`, or `None`
/// for a blank line: what a row scan needs, without the features. Errors are
/// those a full parse gives for the label field (or a line too short to hold it).
pub(crate) fn line_label(line: &[u8], (ncols, label_col): (usize, usize), delim: u8) -> Option<Result<i64, String>> {
    if is_blank(line) {
        return None;
    }
    let mut from = 0;
    for _ in 0..label_col {
        match memchr::memchr(delim, &line[from..]) {
            Some(i) => from += i + 1,
            None => {
                let found = line.split(|&b| b == delim).count();
                return Some(Err(format!("expected {ncols} fields, found {found}")));
            }
        }
    }
    let to = memchr::memchr(delim, &line[from..]).map_or(line.len(), |i| from + i);
    let field = trim(&line[from..to]);
    if field.is_empty() {
        return Some(Err(format!("field {} is empty", label_col + 1)));
    }
    Some(parse_label(field).map_err(|m| format!("field {}: {m}", label_col + 1)))
}

/// Parses the data rows of `lines`, the first of which is row `row` of the
/// file, keeping those in `opts.row_bounds()`. `shape` is `None` when `lines`
/// starts at the top of the file (its first non-blank line tells the shape
/// and may be a header), else the shape the top of the file told. Lines before
/// the first kept row are only told apart (data row or blank), never parsed.
pub(crate) fn parse_csv_from<R: Read>(
    mut lines: Lines<R>,
    mut row: u64,
    mut shape: Option<(usize, usize)>,
    path: &Path,
    opts: &ReadOptions,
    mut labels: Labels,
) -> Result<Dataset, DataError> {
    let delim = opts.csv.delimiter;
    let mut values: Vec<f32> = Vec::new();
    let (first, end) = opts.row_bounds();
    while let Some(l) = lines.next_line()? {
        let (at, line) = (l.number, l.bytes);
        if is_blank(line) {
            continue;
        }
        let (ncols, label_col) = match shape {
            Some(s) => s,
            None => {
                let (s, is_header) = first_line(line, at, path, opts)?;
                shape = Some(s);
                if is_header {
                    continue;
                }
                s
            }
        };
        let r = row;
        row += 1;
        if r < first {
            continue;
        }
        if r >= end {
            break;
        }
        reject_quotes(line, at, path, delim)?;
        let row_start = values.len();
        let mut n = 0;
        for (c, field) in line.split(|&b| b == delim).enumerate() {
            n += 1;
            if n > ncols {
                break;
            }
            let field = trim(field);
            if field.is_empty() {
                values.truncate(row_start);
                return Err(DataError::line(path, at, format!("field {} is empty", c + 1)));
            }
            if c == label_col {
                let label =
                    parse_label(field).map_err(|m| DataError::line(path, at, format!("field {}: {m}", c + 1)))?;
                labels.push(label, at).map_err(|m| DataError::line(path, at, m))?;
            } else {
                match parse_f32(field) {
                    Some(v) if v.is_finite() => values.push(v),
                    _ => {
                        return Err(DataError::line(
                            path,
                            at,
                            format!("field {}: `{}` is not a finite number", c + 1, shown(field)),
                        ));
                    }
                }
            }
        }
        if n != ncols {
            let found = if n > ncols {
                line.split(|&b| b == delim).count()
            } else {
                n
            };
            return Err(DataError::line(
                path,
                at,
                format!("expected {ncols} fields, found {found}"),
            ));
        }
    }
    let dim = shape.map_or(0, |(ncols, _)| ncols - 1);
    let (labels, num_classes) = labels.finish("line").map_err(|(at, m)| DataError::line(path, at, m))?;
    Ok(Dataset {
        features: Features::Dense { dim, values },
        labels,
        num_classes,
    })
}

/// Number of fields, label position, and whether `line` is a header.
fn first_line_shape(line: &[u8], csv: &CsvOptions, dim: Option<u64>) -> Result<((usize, usize), bool), String> {
    let fields: Vec<&[u8]> = line.split(|&b| b == csv.delimiter).map(trim).collect();
    let ncols = fields.len();
    if ncols < 2 {
        return Err(format!(
            "1 field: a CSV data set needs a label and at least one feature (delimiter `{}`)",
            char::from(csv.delimiter)
        ));
    }
    if ncols > CSV_COLUMNS_MAX {
        return Err(format!("{ncols} fields, over CSV_COLUMNS_MAX ({CSV_COLUMNS_MAX})"));
    }
    if let Some(dim) = dim
        && dim != ncols as u64 - 1
    {
        return Err(format!(
            "{ncols} fields give {} features, expected dim {dim}",
            ncols - 1
        ));
    }
    let is_header = match (csv.header, &csv.label) {
        (Header::Present, _) | (Header::Auto, LabelColumn::Name(_)) => true,
        (Header::Absent, _) => false,
        (Header::Auto, LabelColumn::Index(_)) => fields.iter().any(|f| parse_f32(f).is_none()),
    };
    let label_col = match &csv.label {
        LabelColumn::Index(i) if *i < ncols => *i,
        LabelColumn::Index(i) => return Err(format!("label column {i} (0-based) but only {ncols} fields")),
        LabelColumn::Name(name) if is_header => fields
            .iter()
            .position(|f| *f == name.as_bytes())
            .ok_or_else(|| format!("no column named `{name}` in the header"))?,
        LabelColumn::Name(name) => {
            return Err(format!(
                "label column `{name}` given by name but the file has no header"
            ));
        }
    };
    Ok(((ncols, label_col), is_header))
}

/// Writes dense rows as CSV with a `label,x0,x1,...` header, streaming.
pub struct CsvWriter {
    out: BufWriter<File>,
    line: Vec<u8>,
    dense_row: Vec<f32>,
    dim: usize,
    path: PathBuf,
}

impl CsvWriter {
    pub fn create(path: &Path, dim: usize) -> Result<Self, DataError> {
        let file = File::create(path).map_err(|e| DataError::io(path, e))?;
        let mut w = Self {
            out: BufWriter::with_capacity(1 << 20, file),
            line: Vec::new(),
            dense_row: Vec::new(),
            dim,
            path: path.to_owned(),
        };
        w.line.extend_from_slice(b"label");
        for i in 0..dim {
            w.line.extend_from_slice(b",x");
            push_u64(&mut w.line, i as u64);
        }
        w.line.push(b'\n');
        w.out.write_all(&w.line).map_err(|e| DataError::io(path, e))?;
        Ok(w)
    }

    pub fn write_dense(&mut self, label: u32, values: &[f32]) -> Result<(), DataError> {
        assert_eq!(values.len(), self.dim, "row width differs from the header");
        self.line.clear();
        push_u64(&mut self.line, u64::from(label));
        for &v in values {
            self.line.push(b',');
            if v == 0.0 {
                self.line.push(b'0');
            } else {
                push_f32(&mut self.line, v);
            }
        }
        self.line.push(b'\n');
        self.out.write_all(&self.line).map_err(|e| DataError::io(&self.path, e))
    }

    /// Writes a sparse row as a dense one (indices must be below `dim`).
    pub fn write_sparse(&mut self, label: u32, indices: &[u32], values: &[f32]) -> Result<(), DataError> {
        assert_eq!(indices.len(), values.len(), "indices and values differ in length");
        let mut row = std::mem::take(&mut self.dense_row);
        row.clear();
        row.resize(self.dim, 0.0);
        for (&i, &v) in indices.iter().zip(values) {
            assert!(
                (i as usize) < self.dim,
                "index {i} not below the CSV width {}",
                self.dim
            );
            row[i as usize] += v;
        }
        let written = self.write_dense(label, &row);
        self.dense_row = row;
        written
    }

    pub fn finish(mut self) -> Result<(), DataError> {
        self.out.flush().map_err(|e| DataError::io(&self.path, e))?;
        self.out.get_ref().sync_all().map_err(|e| DataError::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_with(text: &str, csv: CsvOptions) -> Result<Dataset, DataError> {
        let opts = ReadOptions {
            csv,
            ..ReadOptions::default()
        };
        parse_csv(text.as_bytes(), Path::new("t.csv"), &opts)
    }

    fn parse(text: &str) -> Result<Dataset, DataError> {
        parse_with(text, CsvOptions::default())
    }

    #[test]
    fn header_detection_and_label_by_name() {
        let ds = parse("y,a,b\n1, 0.5 ,2\n0,1e1,-3\n").expect("valid");
        assert_eq!(ds.labels, vec![1, 0]);
        assert_eq!(
            ds.features,
            Features::Dense {
                dim: 2,
                values: vec![0.5, 2.0, 10.0, -3.0]
            }
        );
        let no_header = parse("2,0.5\n\n0,1\n").expect("valid");
        assert_eq!(no_header.labels, vec![2, 0]);
        assert_eq!(no_header.num_classes, 3);
        let by_name = CsvOptions {
            label: LabelColumn::Name("y".into()),
            ..CsvOptions::default()
        };
        let ds = parse_with("a,y\n0.5,1\n", by_name).expect("valid");
        assert_eq!(
            (ds.labels.clone(), ds.features),
            (
                vec![1],
                Features::Dense {
                    dim: 1,
                    values: vec![0.5]
                }
            )
        );
        let tabs = CsvOptions {
            delimiter: b'\t',
            ..CsvOptions::default()
        };
        assert_eq!(parse_with("1\t2\n", tabs).expect("valid").dim(), 1);
    }

    #[test]
    fn malformed_rows_name_file_and_line() {
        let err = parse("y,a,b\n1,2,3\n0,1\n").expect_err("short row").to_string();
        assert_eq!(err, "t.csv:3: expected 3 fields, found 2");
        let err = parse("1,2\n0,1,5\n").expect_err("long row").to_string();
        assert_eq!(err, "t.csv:2: expected 2 fields, found 3");
        let err = parse("1,2\n0,\"1\"\n").expect_err("quoted").to_string();
        assert_eq!(err, "t.csv:2: field 2 is quoted: quoted CSV fields are not supported");
        let err = parse("1,2\n0,abc\n").expect_err("not a number").to_string();
        assert_eq!(err, "t.csv:2: field 2: `abc` is not a finite number");
        let err = parse("1,2\n0,\n").expect_err("empty").to_string();
        assert_eq!(err, "t.csv:2: field 2 is empty");
        let by_name = CsvOptions {
            label: LabelColumn::Name("z".into()),
            ..CsvOptions::default()
        };
        let err = parse_with("a,y\n", by_name).expect_err("no such column").to_string();
        assert_eq!(err, "t.csv:1: no column named `z` in the header");
    }

    #[test]
    fn writer_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.csv");
        let mut w = CsvWriter::create(&path, 3).expect("create");
        w.write_dense(2, &[0.0, 1.5, -1e-9]).expect("write");
        w.write_dense(0, &[1.0, 0.25, 3.0]).expect("write");
        w.finish().expect("finish");
        let ds = read_csv(&path, &ReadOptions::default()).expect("read back");
        assert_eq!(ds.labels, vec![2, 0]);
        assert_eq!(
            ds.features,
            Features::Dense {
                dim: 3,
                values: vec![0.0, 1.5, -1e-9, 1.0, 0.25, 3.0]
            }
        );
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_csv(&bytes[..], Path::new("p.csv"), &ReadOptions::default());
        }

        #[test]
        fn never_panics_on_near_valid_text(text in "([-a-z0-9., \"]{0,12}\n){0,8}") {
            if let Ok(ds) = parse(&text) {
                prop_assert_eq!(ds.rows() * ds.dim() as usize, match &ds.features {
                    Features::Dense { values, .. } => values.len(),
                    Features::Sparse { .. } => usize::MAX,
                });
            }
        }
    }
}
