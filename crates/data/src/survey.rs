//! A first look at a data file that parses no feature: its format, how many
//! data rows it holds and where they start; then reading only a range of its
//! rows, so that a worker parses and holds only its partition.
//!
//! How each format finds its rows without parsing the ones before:
//!
//! - **IDX**: the header gives the row count; a row starts at a fixed offset,
//!   so a plain file seeks there and a gzip one is decompressed up to it and
//!   the bytes thrown away.
//! - **LIBSVM and CSV**: one pass over the bytes with a SIMD newline search
//!   ([`crate::source`]'s line reader) counts the data rows (blank and
//!   comment lines, and a CSV header, are not rows) and notes a [`Mark`] —
//!   row, line number, byte offset — every [`MARK_EVERY_ROWS`] rows. A range
//!   read seeks (or, in gzip, decompresses and discards) to the last mark at
//!   or before its first row, tells apart fewer than `MARK_EVERY_ROWS` lines
//!   more, and parses from there. Line numbers stay those of the whole file.
//!
//!   A byte-range split (each worker takes a share of the bytes and starts at
//!   the first newline after its share's start) would skip the counting pass,
//!   but it cuts the file by bytes, not rows: the partitions would not be the
//!   ones [`crate::partitions`] cuts in proportion to the local batches, the
//!   ranks would hold different numbers of rows (and lock-step training takes
//!   the shortest), and no rank would know the total without asking the
//!   others. The pass costs a read of the bytes at memory speed, no parse and
//!   no memory beyond one buffer.
//! - **Parquet**: the footer gives each row group's row count; a range read
//!   skips the row groups outside the range unread.
//!
//! What a range read must agree on with the other ranges is settled here,
//! from the whole file: the number of classes (text: the pass also parses
//! each row's label, a few bytes; IDX: every label, one byte a row; Parquet:
//! the `label` column alone, unless `num_classes` is given) and the dimension
//! (dense formats: the header or schema; sparse formats: `hash_bits`, `dim`
//! or `.meta.json`). A sparse file with none of these has the dimension of its
//! largest index, which only a whole read finds: [`Survey::whole_file_needed`]
//! says so, and [`Survey::read`] refuses a range. IDX normalisation takes
//! fixed constants ([`crate::Normalize`]), no statistic of the file, so a
//! range is normalised as in a whole read.
//!
//! Errors in rows outside the range (a bad token, a quoted CSV field) are
//! found by the reader of those rows; bad labels are found by the survey.

use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::labels::Labels;
use crate::read::{ReadOptions, effective, idx_files};
use crate::source::{self, Lines};
use crate::{DataError, Dataset, Format};

/// Data rows between two marks of a text file: a range read tells apart at
/// most this many lines before its first row (a few milliseconds of work).
pub const MARK_EVERY_ROWS: u64 = 1 << 16;

/// Where a data row of a text file starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    /// 0-based data row.
    pub row: u64,
    /// 1-based number of the row's line.
    pub line: u64,
    /// Offset of the line's first byte in the (decompressed) file.
    pub offset: u64,
}

/// What a first look at a data file found; [`Survey::read`] reads row ranges of it.
#[derive(Clone, Debug)]
pub struct Survey {
    path: PathBuf,
    format: Format,
    /// The options every read goes by (format fixed, `.meta.json` applied, no row range).
    opts: ReadOptions,
    rows: u64,
    num_classes: u32,
    dim: Option<u64>,
    sparse: bool,
    whole_file_needed: Option<String>,
    layout: Layout,
}

#[derive(Clone, Debug)]
enum Layout {
    Idx(crate::idx::IdxSurvey),
    Text {
        marks: Vec<Mark>,
        /// CSV: fields per line and the label's position.
        csv_shape: Option<(usize, usize)>,
    },
    #[cfg_attr(not(feature = "parquet"), allow(dead_code))]
    Parquet,
}

/// Looks at `path` as [`crate::read_auto`] would read it: the format, the
/// data rows, the number of classes and the dimension, without parsing a
/// feature (see the module's documentation for what each format reads).
pub fn survey(path: &Path, opts: &ReadOptions) -> Result<Survey, DataError> {
    survey_marked(path, opts, MARK_EVERY_ROWS)
}

/// [`survey`] with a mark every `mark_every_rows` data rows (tests use few rows).
pub(crate) fn survey_marked(path: &Path, opts: &ReadOptions, mark_every_rows: u64) -> Result<Survey, DataError> {
    assert!(mark_every_rows > 0, "marks need a spacing");
    let (format, opts) = effective(path, opts)?;
    let sparse_dim = || match (opts.hash_bits, opts.dim) {
        (Some(bits), _) => Some(1u64 << bits),
        (None, dim) => dim,
    };
    let sparse_reason = |what: &str| {
        format!(
            "{what} without hash_bits, dim or a .meta.json: its dimension is its largest feature index + 1, \
             which only a read of every row finds"
        )
    };
    let survey = |rows, num_classes, (dim, sparse): (Option<u64>, bool), whole_file_needed, layout| Survey {
        path: path.to_owned(),
        format,
        opts: opts.clone(),
        rows,
        num_classes,
        dim,
        sparse,
        whole_file_needed,
        layout,
    };
    match format {
        Format::Idx => {
            let (images, labels) = idx_files(path, opts.split)?;
            let s = crate::idx::survey_idx(&images, &labels)?;
            Ok(survey(
                s.rows(),
                s.num_classes(),
                (Some(s.dim()), false),
                None,
                Layout::Idx(s),
            ))
        }
        Format::Libsvm | Format::Csv => {
            let scan = scan_text(path, format, &opts, mark_every_rows)?;
            let (dim, why) = match scan.csv_shape {
                Some((ncols, _)) => (Some(ncols as u64 - 1), None),
                None if format == Format::Csv => (Some(0), None),
                None => (
                    sparse_dim(),
                    sparse_dim().is_none().then(|| sparse_reason("a LIBSVM file")),
                ),
            };
            let layout = Layout::Text {
                marks: scan.marks,
                csv_shape: scan.csv_shape,
            };
            Ok(survey(
                scan.rows,
                scan.num_classes,
                (dim, format == Format::Libsvm),
                why,
                layout,
            ))
        }
        #[cfg(feature = "parquet")]
        Format::Parquet => {
            let s = crate::parquet::survey_parquet(path, &opts)?;
            let (dim, why) = if s.sparse {
                (
                    sparse_dim(),
                    sparse_dim().is_none().then(|| sparse_reason("a sparse Parquet file")),
                )
            } else {
                (Some(s.dense_dim as u64), None)
            };
            Ok(survey(s.rows, s.num_classes, (dim, s.sparse), why, Layout::Parquet))
        }
        #[cfg(not(feature = "parquet"))]
        Format::Parquet => Err(crate::read::not_compiled(path)),
    }
}

impl Survey {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Data rows in the file (what a whole read holds).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The number of classes of the whole file (what a whole read reports).
    pub fn num_classes(&self) -> u32 {
        self.num_classes
    }

    /// The feature dimension every range read has, when the survey knows it.
    pub fn dim(&self) -> Option<u64> {
        self.dim
    }

    /// Whether the rows are sparse (LIBSVM, or Parquet with `indices` and `values`).
    pub fn is_sparse(&self) -> bool {
        self.sparse
    }

    /// Why only a whole read gives this file's data set (`None`: a range read
    /// agrees with it).
    pub fn whole_file_needed(&self) -> Option<&str> {
        self.whole_file_needed.as_deref()
    }

    /// The marks of a text file, in row order (empty for other formats).
    pub fn marks(&self) -> &[Mark] {
        match &self.layout {
            Layout::Text { marks, .. } => marks,
            _ => &[],
        }
    }

    /// Rows `range` (0-based data rows, clamped to the file) as a data set:
    /// exactly those rows of the whole read, with its number of classes and
    /// dimension. Errors name the file and the line (text, numbered as in the
    /// whole file) or row (binary, 0-based in the whole file).
    pub fn read(&self, range: Range<u64>) -> Result<Dataset, DataError> {
        if let Some(why) = &self.whole_file_needed {
            return Err(DataError::config(
                "row range",
                format!(
                    "{}: {why}; set hash_bits or dim, or read the whole file",
                    self.path.display()
                ),
            ));
        }
        let start = range.start.min(self.rows);
        let end = range.end.clamp(start, self.rows);
        let opts = ReadOptions {
            row_range: Some(start..end),
            ..self.opts.clone()
        };
        let labels = Labels::new(Some(self.num_classes));
        match &self.layout {
            Layout::Idx(s) => s.read(opts.normalize, start..end),
            Layout::Text { marks, csv_shape } => {
                // The last mark at or before `start`: rows before it are not even looked at.
                let at = marks.partition_point(|m| m.row <= start);
                let (lines, row, shape) = match at.checked_sub(1).map(|i| marks[i]) {
                    Some(m) => {
                        let reader = source::open_at(&self.path, m.offset)?;
                        (
                            Lines::starting_at(reader, &self.path, m.line, m.offset),
                            m.row,
                            *csv_shape,
                        )
                    }
                    // No data row at all: read from the top, header and all.
                    None => (Lines::new(source::open_at(&self.path, 0)?, &self.path), 0, None),
                };
                if self.format == Format::Csv {
                    crate::csv::parse_csv_from(lines, row, shape, &self.path, &opts, labels)
                } else {
                    crate::libsvm::parse_libsvm_from(lines, row, &self.path, &opts, labels)
                }
            }
            #[cfg(feature = "parquet")]
            Layout::Parquet => crate::parquet::read_parquet_rows(&self.path, &opts, labels, Some(start..end)),
            #[cfg(not(feature = "parquet"))]
            Layout::Parquet => Err(crate::read::not_compiled(&self.path)),
        }
    }
}

/// What one pass over a text file found.
struct TextScan {
    rows: u64,
    num_classes: u32,
    marks: Vec<Mark>,
    csv_shape: Option<(usize, usize)>,
}

/// Counts the data rows of a LIBSVM or CSV file, parsing only each row's
/// label, and marks a row every `mark_every_rows`.
fn scan_text(path: &Path, format: Format, opts: &ReadOptions, mark_every_rows: u64) -> Result<TextScan, DataError> {
    let mut lines = Lines::new(source::open_at(path, 0)?, path);
    let mut labels = Labels::counting(opts.num_classes);
    let mut marks = Vec::new();
    let mut rows = 0u64;
    let mut csv_shape = None;
    let delimiter = opts.csv.delimiter;
    while let Some(l) = lines.next_line()? {
        let label = match (format, csv_shape) {
            (Format::Csv, Some(shape)) => crate::csv::line_label(l.bytes, shape, delimiter),
            (Format::Csv, None) => {
                if crate::csv::is_blank(l.bytes) {
                    continue;
                }
                let (shape, is_header) = crate::csv::first_line(l.bytes, l.number, path, opts)?;
                csv_shape = Some(shape);
                if is_header {
                    continue;
                }
                crate::csv::line_label(l.bytes, shape, delimiter)
            }
            _ => crate::libsvm::line_label(l.bytes),
        };
        let Some(label) = label else { continue };
        let label = label.map_err(|m| DataError::line(path, l.number, m))?;
        labels
            .push(label, l.number)
            .map_err(|m| DataError::line(path, l.number, m))?;
        if rows.is_multiple_of(mark_every_rows) {
            marks.push(Mark {
                row: rows,
                line: l.number,
                offset: l.offset,
            });
        }
        rows += 1;
    }
    let (_, num_classes) = labels.finish("line").map_err(|(at, m)| DataError::line(path, at, m))?;
    Ok(TextScan {
        rows,
        num_classes,
        marks,
        csv_shape,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use proptest::prelude::*;

    use super::*;
    use crate::{CsvOptions, Features, LabelColumn, Normalize, read_auto};

    /// One generated row: a label and (index, value) entries with distinct indices.
    type Row = (i64, Vec<(u32, f32)>);

    fn rows_strategy(classes: i64) -> impl Strategy<Value = Vec<Row>> {
        let entry = (0u32..12, prop_oneof![Just(1.0f32), Just(0.5), Just(-2.25), Just(3.0)]);
        let row = (
            if classes == 0 {
                prop_oneof![Just(-1i64), Just(1)].boxed()
            } else {
                (0..classes).boxed()
            },
            proptest::collection::btree_map(entry.0, entry.1, 0..5).prop_map(|m| m.into_iter().collect()),
        );
        proptest::collection::vec(row, 0..60)
    }

    /// Text decorations: blank and comment lines between rows, `\r\n` line ends, leading blanks.
    #[derive(Clone, Debug)]
    struct Style {
        noise: Vec<u8>,
        crlf: bool,
        final_newline: bool,
        gzip: bool,
    }

    fn style() -> impl Strategy<Value = Style> {
        (
            proptest::collection::vec(0u8..8, 64),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(noise, crlf, final_newline, gzip)| Style {
                noise,
                crlf,
                final_newline,
                gzip,
            })
    }

    fn write(path: &Path, mut text: Vec<u8>, style: &Style) {
        if !style.final_newline && text.last() == Some(&b'\n') {
            text.pop();
            if style.crlf {
                text.pop();
            }
        }
        let bytes = if style.gzip {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&text).expect("gzip to memory");
            enc.finish().expect("gzip to memory")
        } else {
            text
        };
        std::fs::write(path, bytes).expect("write");
    }

    fn end(style: &Style) -> &'static [u8] {
        if style.crlf { b"\r\n" } else { b"\n" }
    }

    fn libsvm_text(rows: &[Row], style: &Style) -> Vec<u8> {
        let mut t = Vec::new();
        for (i, (label, entries)) in rows.iter().enumerate() {
            match style.noise[i % style.noise.len()] {
                0 => t.extend_from_slice(end(style)),
                1 => {
                    t.extend_from_slice(b"  # a comment 1:2");
                    t.extend_from_slice(end(style));
                }
                2 => t.extend_from_slice(b" \t"),
                _ => {}
            }
            t.extend_from_slice(format!("{label:+}").as_bytes());
            for (i, v) in entries {
                t.extend_from_slice(format!(" {i}:{v:?}").as_bytes());
            }
            if style.noise[(i + 7) % style.noise.len()] == 3 {
                t.extend_from_slice(b" # trailing");
            }
            t.extend_from_slice(end(style));
        }
        t
    }

    fn csv_text(rows: &[Row], dim: u32, header: bool, style: &Style) -> Vec<u8> {
        let mut t = Vec::new();
        if style.noise[0] == 0 {
            t.extend_from_slice(end(style));
        }
        if header {
            t.extend_from_slice(b"x0,y");
            (1..dim).for_each(|i| t.extend_from_slice(format!(",x{i}").as_bytes()));
            t.extend_from_slice(end(style));
        }
        for (r, (label, entries)) in rows.iter().enumerate() {
            if style.noise[(r + 1) % style.noise.len()] == 0 {
                t.extend_from_slice(b"   ");
                t.extend_from_slice(end(style));
            }
            let mut dense = vec![0.0f32; dim as usize];
            entries.iter().for_each(|&(i, v)| dense[i as usize % dim as usize] = v);
            // The label is the second column.
            t.extend_from_slice(format!("{:?},{label}", dense[0]).as_bytes());
            dense[1..]
                .iter()
                .for_each(|v| t.extend_from_slice(format!(", {v:?}").as_bytes()));
            t.extend_from_slice(end(style));
        }
        t
    }

    /// Every row range of `path` read through a survey with marks every
    /// `mark_every` rows equals that range of the whole read.
    fn assert_ranges_match(path: &Path, opts: &ReadOptions, mark_every: u64, cuts: &[(u64, u64)]) {
        let whole = read_auto(path, opts).expect("whole read");
        let s = survey_marked(path, opts, mark_every).expect("survey");
        assert_eq!(s.rows(), whole.rows() as u64, "{}", path.display());
        assert_eq!(s.num_classes(), whole.num_classes);
        assert_eq!(s.dim(), Some(whole.dim()));
        let n = s.rows();
        let mut ranges: Vec<(u64, u64)> = cuts.iter().map(|&(a, b)| (a % (n + 1), b % (n + 2))).collect();
        ranges.extend([(0, n), (0, 0), (n, n), (n / 2, n), (0, n + 5)]);
        for (a, b) in ranges {
            let (a, b) = (a.min(b), a.max(b));
            let got = s.read(a..b).unwrap_or_else(|e| panic!("range {a}..{b}: {e}"));
            let idx: Vec<usize> = (a.min(n) as usize..b.min(n) as usize).collect();
            assert_eq!(got, whole.select(&idx), "range {a}..{b} of {}", path.display());
        }
    }

    fn cuts() -> impl Strategy<Value = Vec<(u64, u64)>> {
        proptest::collection::vec((0u64..100, 0u64..100), 4)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn libsvm_ranges_match_the_whole_read(
            rows in prop_oneof![rows_strategy(0), rows_strategy(4)],
            style in style(),
            mark_every in 1u64..6,
            hashed in any::<bool>(),
            cuts in cuts(),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("r.svm");
            write(&path, libsvm_text(&rows, &style), &style);
            let opts = ReadOptions {
                hash_bits: hashed.then_some(3),
                dim: (!hashed).then_some(12),
                ..ReadOptions::default()
            };
            assert_ranges_match(&path, &opts, mark_every, &cuts);
        }

        #[test]
        fn csv_ranges_match_the_whole_read(
            rows in rows_strategy(3),
            style in style(),
            header in any::<bool>(),
            dim in 2u32..5,
            mark_every in 1u64..6,
            cuts in cuts(),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("r.csv");
            write(&path, csv_text(&rows, dim, header, &style), &style);
            let opts = ReadOptions {
                csv: CsvOptions { label: LabelColumn::Index(1), ..CsvOptions::default() },
                ..ReadOptions::default()
            };
            assert_ranges_match(&path, &opts, mark_every, &cuts);
        }

        #[test]
        fn idx_ranges_match_the_whole_read(
            pixels in proptest::collection::vec(any::<u8>(), 0..240),
            row_bytes in 1usize..7,
            gzip in (any::<bool>(), any::<bool>()),
            cuts in cuts(),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let rows = pixels.len() / row_bytes;
            let labels: Vec<u8> = pixels.iter().step_by(row_bytes).take(rows).map(|p| p % 7).collect();
            let ip = dir.path().join("train-images-idx3-ubyte");
            let lp = dir.path().join("train-labels-idx1-ubyte");
            crate::write_idx_u8(&ip, &[rows as u32, 1, row_bytes as u32], &pixels[..rows * row_bytes]).expect("write");
            crate::write_idx_u8(&lp, &[rows as u32], &labels).expect("write");
            for (path, gz) in [(&ip, gzip.0), (&lp, gzip.1)] {
                if gz {
                    let plain = std::fs::read(path).expect("read");
                    write(path, plain, &Style { noise: vec![9], crlf: false, final_newline: true, gzip: true });
                }
            }
            let opts = ReadOptions { normalize: Normalize::Scale01, ..ReadOptions::default() };
            assert_ranges_match(dir.path(), &opts, 1, &cuts);
        }
    }

    proptest! {
        /// On any text a whole read accepts, the survey counts the same rows
        /// and a range read agrees; on any bytes, neither panics.
        #[test]
        fn surveys_agree_with_whole_reads_on_near_valid_text(
            text in "([ \t]*(\\+?1|0|2|-1)( [0-9]{1,2}:[0-9x]{1,2}(\\.5)?){0,3}[ \t]*(#.*)?\r?\n|[ \t]*(#.*)?\r?\n){0,12}",
            csv in "(y,a,b\r?\n)?(( *|[0-3], ?[0-9]{1,2}(\\.[0-9])?,[0-9x]{1,2})\r?\n){0,12}",
            cut in (0u64..14, 0u64..14),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            for (name, body) in [("t.svm", &text), ("t.csv", &csv)] {
                let path = dir.path().join(name);
                std::fs::write(&path, body).expect("write");
                let opts = ReadOptions { dim: name.ends_with(".svm").then_some(1 << 20), ..ReadOptions::default() };
                let whole = read_auto(&path, &opts);
                let surveyed = survey_marked(&path, &opts, 2);
                if let Ok(whole) = whole {
                    let s = surveyed.expect("a file a whole read accepts passes its survey");
                    prop_assert_eq!(s.rows(), whole.rows() as u64);
                    let (a, b) = (cut.0.min(cut.1).min(s.rows()), cut.0.max(cut.1).min(s.rows()));
                    let idx: Vec<usize> = (a as usize..b as usize).collect();
                    prop_assert_eq!(s.read(a..b).expect("range"), whole.select(&idx));
                } else if let Ok(s) = surveyed {
                    let _ = s.read(cut.0..cut.1);
                }
            }
        }
    }

    #[cfg(feature = "parquet")]
    mod parquet {
        use std::sync::Arc;

        use ::parquet::arrow::ArrowWriter;
        use arrow::array::{ArrayRef, Float32Array, Int32Array, ListArray, RecordBatch};
        use arrow::datatypes::{Float32Type, Int32Type};

        use super::*;

        /// Writes `rows` with a row group every `group_rows` rows (the writer
        /// closes a group at each flush), sparse or dense.
        fn write_parquet(path: &Path, rows: &[Row], group_rows: usize, dense_dim: Option<u32>) {
            let mut writer: Option<ArrowWriter<std::fs::File>> = None;
            for chunk in rows.chunks(group_rows.max(1)) {
                let labels: ArrayRef = Arc::new(Int32Array::from_iter_values(chunk.iter().map(|r| r.0 as i32)));
                let batch = match dense_dim {
                    None => {
                        let ind = ListArray::from_iter_primitive::<Int32Type, _, _>(
                            chunk
                                .iter()
                                .map(|r| Some(r.1.iter().map(|&(i, _)| Some(i as i32)).collect::<Vec<_>>())),
                        );
                        let val = ListArray::from_iter_primitive::<Float32Type, _, _>(
                            chunk
                                .iter()
                                .map(|r| Some(r.1.iter().map(|&(_, v)| Some(v)).collect::<Vec<_>>())),
                        );
                        RecordBatch::try_from_iter([
                            ("label", labels),
                            ("indices", Arc::new(ind) as ArrayRef),
                            ("values", Arc::new(val) as ArrayRef),
                        ])
                    }
                    Some(dim) => {
                        let mut cols = vec![("label".to_string(), labels)];
                        for c in 0..dim {
                            let col = chunk
                                .iter()
                                .map(|r| r.1.iter().find(|&&(i, _)| i % dim == c).map_or(0.0, |&(_, v)| v));
                            cols.push((
                                format!("x{c}"),
                                Arc::new(Float32Array::from_iter_values(col)) as ArrayRef,
                            ));
                        }
                        RecordBatch::try_from_iter(cols)
                    }
                }
                .expect("batch");
                let w = writer.get_or_insert_with(|| {
                    ArrowWriter::try_new(std::fs::File::create(path).expect("create"), batch.schema(), None)
                        .expect("writer")
                });
                w.write(&batch).expect("write");
                w.flush().expect("close the row group");
            }
            if let Some(w) = writer {
                w.close().expect("close");
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(32))]

            #[test]
            fn parquet_ranges_match_the_whole_read(
                rows in rows_strategy(4).prop_filter("a file needs a row group", |r| !r.is_empty()),
                group_rows in 1usize..9,
                dense in proptest::option::of(1u32..4),
                classes_given in any::<bool>(),
                cuts in cuts(),
            ) {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("r.parquet");
                write_parquet(&path, &rows, group_rows, dense);
                let opts = ReadOptions {
                    dim: dense.is_none().then_some(12),
                    num_classes: classes_given.then_some(5),
                    ..ReadOptions::default()
                };
                assert_ranges_match(&path, &opts, 1, &cuts);
            }
        }

        #[test]
        fn sparse_parquet_without_a_dimension_needs_the_whole_file() {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("s.parquet");
            write_parquet(&path, &[(1, vec![(3, 1.0)]), (0, vec![])], 1, None);
            let s = survey(&path, &ReadOptions::default()).expect("survey");
            assert_eq!((s.rows(), s.num_classes(), s.dim()), (2, 2, None));
            assert!(s.whole_file_needed().is_some_and(|w| w.contains("sparse Parquet")));
            let err = s.read(0..1).expect_err("refused").to_string();
            assert!(
                err.contains("s.parquet: a sparse Parquet file without hash_bits"),
                "{err}"
            );
        }
    }

    fn text_file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn text_marks_note_row_line_and_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = text_file(dir.path(), "m.svm", "# c\n1 1:1\n\n0 2:1\n1 3:1\n");
        let s = survey_marked(&path, &ReadOptions::default(), 2).expect("survey");
        let want = [
            Mark {
                row: 0,
                line: 2,
                offset: 4,
            },
            Mark {
                row: 2,
                line: 5,
                offset: 17,
            },
        ];
        assert_eq!(s.marks(), &want);
        assert_eq!((s.rows(), s.num_classes(), s.format()), (3, 2, Format::Libsvm));
    }

    #[test]
    fn a_range_read_names_whole_file_lines_and_does_not_parse_rows_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = "1 1:1\n0 2:oops\n# c\n1 3:1\n0 4:1\n1 5:x\n";
        let path = text_file(dir.path(), "e.svm", text);
        let opts = ReadOptions {
            dim: Some(10),
            ..ReadOptions::default()
        };
        let s = survey_marked(&path, &opts, 1).expect("labels are fine: the survey passes");
        assert_eq!(s.rows(), 5);
        let rows = s.read(2..4).expect("rows 2 and 3 are good, and row 1 is not parsed");
        assert_eq!(rows.labels, vec![1, 0]);
        let err = s.read(3..5).expect_err("row 4 is bad").to_string();
        assert!(err.ends_with("/e.svm:6: bad value in token `5:x`"), "{err}");
        let err = read_auto(
            &path,
            &ReadOptions {
                row_range: Some(0..2),
                ..opts.clone()
            },
        )
        .expect_err("row 1 is bad")
        .to_string();
        assert!(err.ends_with("/e.svm:2: bad value in token `2:oops`"), "{err}");

        let path = text_file(dir.path(), "l.svm", "1 1:1\n\n0 2:1\n-1 3:1\n");
        let err = survey(&path, &opts).expect_err("mixed labels").to_string();
        assert!(
            err.contains("/l.svm:3: label 0 mixed with label -1 (first at line 4)"),
            "{err}"
        );
        let path = text_file(dir.path(), "c.csv", "y,a\n1,2\n\n0,3\nz,4\n");
        let err = survey(&path, &ReadOptions::default())
            .expect_err("bad label")
            .to_string();
        assert!(err.ends_with("/c.csv:5: field 1: label `z` is not an integer"), "{err}");
    }

    #[test]
    fn sparse_text_without_a_dimension_needs_the_whole_file_and_a_meta_file_gives_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = text_file(dir.path(), "d.svm", "1 7:1\n0 2:1\n");
        let s = survey(&path, &ReadOptions::default()).expect("survey");
        assert_eq!(s.dim(), None);
        assert!(
            s.whole_file_needed()
                .is_some_and(|w| w.contains("largest feature index"))
        );
        let err = s.read(0..1).expect_err("refused").to_string();
        assert!(err.contains("invalid row range: "), "{err}");
        let meta = crate::Meta {
            generator: "click".into(),
            split: "train".into(),
            format: "libsvm".into(),
            seed: 0,
            rows: 2,
            nnz: 2,
            dim: 16,
            num_classes: 2,
            bayes_auc: None,
            bayes_accuracy: None,
            mean_p: None,
            logit_std: None,
            params: serde_json::json!({}),
        };
        crate::write_meta(&path, &meta).expect("meta");
        let s = survey(&path, &ReadOptions::default()).expect("survey");
        assert_eq!((s.dim(), s.whole_file_needed()), (Some(16), None));
        assert_eq!(s.read(1..2).expect("range").dim(), 16);
    }

    #[test]
    fn idx_classes_come_from_every_label_and_a_truncated_gzip_file_fails_its_last_reader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ip = dir.path().join("train-images-idx3-ubyte");
        let lp = dir.path().join("train-labels-idx1-ubyte");
        crate::write_idx_u8(&ip, &[4, 2], &[1, 2, 3, 4, 5, 6, 7, 8]).expect("write");
        crate::write_idx_u8(&lp, &[4], &[0, 0, 1, 9]).expect("write");
        let s = survey(dir.path(), &ReadOptions::default()).expect("survey");
        let first = s.read(0..2).expect("read");
        assert_eq!((first.num_classes, first.labels.clone()), (10, vec![0, 0]));

        let mut plain = std::fs::read(&ip).expect("read");
        plain.truncate(plain.len() - 3);
        write(
            &ip,
            plain.clone(),
            &Style {
                noise: vec![9],
                crlf: false,
                final_newline: true,
                gzip: true,
            },
        );
        let s = survey(dir.path(), &ReadOptions::default()).expect("a gzip file's length is not checked up front");
        assert!(s.read(0..2).is_ok());
        let err = s.read(2..4).expect_err("truncated").to_string();
        assert!(
            err.contains("train-images-idx3-ubyte: truncated: dimensions [4, 2] need 8 bytes"),
            "{err}"
        );
        std::fs::write(&ip, &plain).expect("write");
        let err = survey(dir.path(), &ReadOptions::default())
            .expect_err("plain and short")
            .to_string();
        assert!(err.contains("train-images-idx3-ubyte: truncated"), "{err}");
    }

    #[test]
    fn fashion_mnist_halves_are_the_whole_read_halves() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist");
        let opts = ReadOptions {
            normalize: Normalize::FASHION_MNIST,
            ..ReadOptions::default()
        };
        let s = survey(&dir, &opts).expect("survey");
        assert_eq!((s.rows(), s.num_classes(), s.dim()), (60_000, 10, Some(784)));
        let whole = crate::read_auto(&dir, &opts).expect("whole");
        let half = s.read(30_000..60_000).expect("second half");
        let idx: Vec<usize> = (30_000..60_000).collect();
        assert_eq!(half, whole.select(&idx));
        assert!(matches!(half.features, Features::Dense { dim: 784, .. }));
    }
}
