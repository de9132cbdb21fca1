//! Parquet (cargo feature `parquet`): reading a `label` column with either
//! dense numeric feature columns or sparse `indices`/`values` list columns,
//! and a streaming writer of both layouts.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float32Array, Int32Array, Int64Array, ListArray, RecordBatch};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Float32Type, Float64Type, Int64Type, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::labels::Labels;
use crate::read::ReadOptions;
use crate::sparse::SparseBuilder;
use crate::{DataError, Dataset, Features};

/// Rows per record batch when reading.
const PARQUET_READ_BATCH_ROWS: usize = 8192;
/// Rows per row group when writing (bounds the writer's memory).
const PARQUET_ROW_GROUP_ROWS: usize = 128 * 1024;
/// Buffered feature entries after which the writer hands a batch to Parquet.
const PARQUET_WRITE_BATCH_ENTRIES: usize = 1 << 22;

fn pq(path: &Path) -> impl Fn(parquet::errors::ParquetError) -> DataError + '_ {
    move |err| DataError::Parquet {
        path: path.to_owned(),
        err,
    }
}

fn arrow_err(path: &Path, row: u64) -> impl Fn(arrow::error::ArrowError) -> DataError + '_ {
    move |e| DataError::row(path, row, e.to_string())
}

fn is_numeric(t: &DataType) -> bool {
    t.is_integer() || t.is_floating()
}

fn list_of(t: &DataType) -> DataType {
    DataType::List(Arc::new(Field::new_list_field(t.clone(), true)))
}

/// Reads a Parquet file. Rows are numbered from 0 in errors. With
/// `opts.row_range`, only those rows (see [`crate::survey`]).
pub fn read_parquet(path: &Path, opts: &ReadOptions) -> Result<Dataset, DataError> {
    opts.validate()?;
    if let Some(range) = &opts.row_range {
        let opts = ReadOptions {
            format: Some(crate::Format::Parquet),
            ..opts.clone()
        };
        return crate::survey(path, &opts)?.read(range.clone());
    }
    read_parquet_rows(path, opts, Labels::new(opts.num_classes), None)
}

/// What the schema says about a file's rows.
struct Shape {
    /// `indices` and `values` list columns (else dense numeric columns).
    sparse: bool,
    /// Feature columns of a dense file.
    dense_dim: usize,
}

/// Checks the schema as every read needs it and narrows `builder` to the
/// columns read: `label`, and `indices`/`values` or the dense features.
fn shape(
    path: &Path,
    builder: ParquetRecordBatchReaderBuilder<File>,
) -> Result<(Shape, ParquetRecordBatchReaderBuilder<File>), DataError> {
    let schema = builder.schema().clone();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let Some(label_col) = names.iter().position(|&n| n == "label") else {
        return Err(DataError::format(
            path,
            format!("no `label` column (columns: {})", names.join(", ")),
        ));
    };
    let label_type = schema.field(label_col).data_type();
    if !is_numeric(label_type) {
        return Err(DataError::format(
            path,
            format!("column `label` has type {label_type}; it must be numeric"),
        ));
    }
    let sparse = names.contains(&"indices") && names.contains(&"values");
    if sparse {
        let roots: Vec<usize> = (0..names.len())
            .filter(|&i| ["label", "indices", "values"].contains(&names[i]))
            .collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let builder = builder.with_projection(mask);
        return Ok((Shape { sparse, dense_dim: 0 }, builder));
    }
    if let Some(f) = schema
        .fields()
        .iter()
        .find(|f| f.name() != "label" && !is_numeric(f.data_type()))
    {
        return Err(DataError::format(
            path,
            format!(
                "column `{}` has type {}; dense features must be numeric (or give `indices` and `values` list columns)",
                f.name(),
                f.data_type()
            ),
        ));
    }
    let dense_dim = schema.fields().len() - 1;
    Ok((Shape { sparse, dense_dim }, builder))
}

fn open_builder(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(pq(path))
}

/// What a look at the footer (and, when the classes are not given, at the
/// label column alone) found.
pub(crate) struct ParquetSurvey {
    pub rows: u64,
    pub sparse: bool,
    /// Feature columns of a dense file (0 for a sparse one).
    pub dense_dim: usize,
    /// The number of classes: `opts.num_classes`, or found in every row's label.
    pub num_classes: u32,
}

/// Reads the footer: the schema and the row counts of the row groups. Unless
/// `opts.num_classes` is set, also reads the `label` column (only it) of every
/// row group, for the whole file's number of classes.
pub(crate) fn survey_parquet(path: &Path, opts: &ReadOptions) -> Result<ParquetSurvey, DataError> {
    let (shape, builder) = shape(path, open_builder(path)?)?;
    if !shape.sparse
        && let Some(want) = opts.dim
        && want != shape.dense_dim as u64
    {
        return Err(DataError::format(
            path,
            format!("{} feature columns, expected dim {want}", shape.dense_dim),
        ));
    }
    let groups = builder.metadata().row_groups();
    let rows = groups.iter().map(|g| g.num_rows().max(0) as u64).sum();
    let num_classes = match opts.num_classes {
        Some(n) => n,
        None => {
            let label_col = builder
                .schema()
                .fields()
                .iter()
                .position(|f| f.name() == "label")
                .expect("shape checked the label column");
            let mask = ProjectionMask::roots(builder.parquet_schema(), [label_col]);
            let reader = builder
                .with_projection(mask)
                .with_batch_size(PARQUET_READ_BATCH_ROWS)
                .build()
                .map_err(pq(path))?;
            let mut labels = Labels::counting(None);
            let mut row = 0u64;
            for batch in reader {
                let batch = batch.map_err(|e| DataError::row(path, row, e.to_string()))?;
                read_labels(&batch, path, row, &mut labels)?;
                row += batch.num_rows() as u64;
            }
            labels.finish("row").map_err(|(at, m)| DataError::row(path, at, m))?.1
        }
    };
    Ok(ParquetSurvey {
        rows,
        sparse: shape.sparse,
        dense_dim: shape.dense_dim,
        num_classes,
    })
}

/// Reads rows `range` (all rows if `None`). Row groups that end before the
/// range or start after it are skipped by the footer's row counts, unread.
pub(crate) fn read_parquet_rows(
    path: &Path,
    opts: &ReadOptions,
    mut labels: Labels,
    range: Option<Range<u64>>,
) -> Result<Dataset, DataError> {
    let (shape, mut builder) = shape(path, open_builder(path)?)?;
    let first = range.as_ref().map_or(0, |r| r.start);
    if let Some(range) = &range {
        let mut selected = Vec::new();
        let mut group_start = 0u64;
        let mut selected_start = None;
        for (g, meta) in builder.metadata().row_groups().iter().enumerate() {
            let group_end = group_start + meta.num_rows().max(0) as u64;
            if group_end > range.start && group_start < range.end {
                selected.push(g);
                selected_start.get_or_insert(group_start);
            }
            group_start = group_end;
        }
        let skip = range.start - selected_start.unwrap_or(range.start);
        builder = builder
            .with_row_groups(selected)
            .with_offset(skip as usize)
            .with_limit(range.end.saturating_sub(range.start) as usize);
    }
    let reader = builder
        .with_batch_size(PARQUET_READ_BATCH_ROWS)
        .build()
        .map_err(pq(path))?;
    let mut sparse_rows = SparseBuilder::new(opts.hash_bits, opts.dim);
    let mut dense: Vec<f32> = Vec::new();
    let mut row = first;
    for batch in reader {
        let batch = batch.map_err(|e| DataError::row(path, row, e.to_string()))?;
        read_labels(&batch, path, row, &mut labels)?;
        if shape.sparse {
            read_sparse(&batch, path, row, &mut sparse_rows)?;
        } else {
            read_dense(&batch, path, row, &mut dense)?;
        }
        row += batch.num_rows() as u64;
    }
    let (labels, num_classes) = labels.finish("row").map_err(|(at, m)| DataError::row(path, at, m))?;
    let features = if shape.sparse {
        sparse_rows.finish()
    } else {
        let dim = shape.dense_dim;
        if let Some(want) = opts.dim
            && want != dim as u64
        {
            return Err(DataError::format(
                path,
                format!("{dim} feature columns, expected dim {want}"),
            ));
        }
        Features::Dense { dim, values: dense }
    };
    Ok(Dataset {
        features,
        labels,
        num_classes,
    })
}

fn column<'a>(batch: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a ArrayRef, DataError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| DataError::format(path, format!("no `{name}` column")))
}

fn first_null(a: &dyn Array) -> Option<usize> {
    if a.null_count() == 0 {
        return None;
    }
    (0..a.len()).find(|&i| a.is_null(i))
}

fn read_labels(batch: &RecordBatch, path: &Path, row0: u64, labels: &mut Labels) -> Result<(), DataError> {
    let col = cast(column(batch, "label", path)?, &DataType::Float64).map_err(arrow_err(path, row0))?;
    if let Some(i) = first_null(&col) {
        return Err(DataError::row(path, row0 + i as u64, "label is null"));
    }
    for (i, &v) in col.as_primitive::<Float64Type>().values().iter().enumerate() {
        let at = row0 + i as u64;
        if v.fract() != 0.0 || !v.is_finite() {
            return Err(DataError::row(path, at, format!("label {v} is not an integer")));
        }
        labels
            .push(v.clamp(-2.0, f64::from(u32::MAX)) as i64, at)
            .map_err(|m| DataError::row(path, at, m))?;
    }
    Ok(())
}

fn read_sparse(batch: &RecordBatch, path: &Path, row0: u64, out: &mut SparseBuilder) -> Result<(), DataError> {
    let as_list = |name: &str, elem: DataType| -> Result<ListArray, DataError> {
        let col = column(batch, name, path)?;
        let ok = match col.data_type() {
            DataType::List(f) | DataType::LargeList(f) => {
                if name == "indices" {
                    f.data_type().is_integer()
                } else {
                    is_numeric(f.data_type())
                }
            }
            _ => false,
        };
        if !ok {
            let want = if name == "indices" {
                "a list of integers"
            } else {
                "a list of numbers"
            };
            return Err(DataError::format(
                path,
                format!("column `{name}` has type {}; it must be {want}", col.data_type()),
            ));
        }
        let cast = cast(col, &list_of(&elem)).map_err(arrow_err(path, row0))?;
        Ok(cast.as_list::<i32>().clone())
    };
    let indices = as_list("indices", DataType::Int64)?;
    let values = as_list("values", DataType::Float32)?;
    let (ix, vx) = (
        indices.values().as_primitive::<Int64Type>(),
        values.values().as_primitive::<Float32Type>(),
    );
    let (io, vo) = (indices.value_offsets(), values.value_offsets());
    for r in 0..batch.num_rows() {
        let at = row0 + r as u64;
        if indices.is_null(r) || values.is_null(r) {
            return Err(DataError::row(path, at, "indices or values is null"));
        }
        let (is, ie) = (io[r] as usize, io[r + 1] as usize);
        let (vs, ve) = (vo[r] as usize, vo[r + 1] as usize);
        if ie - is != ve - vs {
            return Err(DataError::row(
                path,
                at,
                format!("{} indices but {} values", ie - is, ve - vs),
            ));
        }
        for (k, j) in (is..ie).zip(vs..ve) {
            if ix.is_null(k) || vx.is_null(j) {
                out.discard_row();
                return Err(DataError::row(path, at, "null inside indices or values"));
            }
            let index = ix.value(k);
            let index =
                u64::try_from(index).map_err(|_| DataError::row(path, at, format!("index {index} is negative")));
            if let Err(m) = index.and_then(|i| out.push(i, vx.value(j)).map_err(|m| DataError::row(path, at, m))) {
                out.discard_row();
                return Err(m);
            }
        }
        out.end_row();
    }
    Ok(())
}

/// Appends the batch's feature columns row-major.
fn read_dense(batch: &RecordBatch, path: &Path, row0: u64, out: &mut Vec<f32>) -> Result<(), DataError> {
    let schema = batch.schema();
    let mut cols = Vec::new();
    for (f, col) in schema.fields().iter().zip(batch.columns()) {
        if f.name() == "label" {
            continue;
        }
        let c = cast(col, &DataType::Float32).map_err(arrow_err(path, row0))?;
        if let Some(i) = first_null(&c) {
            return Err(DataError::row(
                path,
                row0 + i as u64,
                format!("column `{}` is null", f.name()),
            ));
        }
        cols.push(c);
    }
    let cols: Vec<&Float32Array> = cols.iter().map(|c| c.as_primitive::<Float32Type>()).collect();
    out.reserve(batch.num_rows() * cols.len());
    for r in 0..batch.num_rows() {
        for (c, col) in cols.iter().enumerate() {
            let v = col.value(r);
            if !v.is_finite() {
                let name = schema
                    .fields()
                    .iter()
                    .filter(|f| f.name() != "label")
                    .nth(c)
                    .map_or("?", |f| f.name());
                return Err(DataError::row(path, row0 + r as u64, format!("column `{name}` is {v}")));
            }
            out.push(v);
        }
    }
    Ok(())
}

/// Streams rows into a Parquet file: `label: int32` plus either
/// `indices: list<int32>` (`list<int64>` if `dim` exceeds `i32`) and
/// `values: list<float32>`, or dense `x0..x{dim-1}: float32` columns.
pub struct ParquetWriter {
    writer: ArrowWriter<File>,
    schema: SchemaRef,
    path: PathBuf,
    dense_dim: Option<usize>,
    wide_indices: bool,
    labels: Vec<i32>,
    offsets: Vec<i32>,
    indices: Vec<u32>,
    values: Vec<f32>,
}

impl ParquetWriter {
    /// A writer of sparse rows with indices below `dim`.
    pub fn create_sparse(path: &Path, dim: u64) -> Result<Self, DataError> {
        let wide = dim > i32::MAX as u64 + 1;
        let index_type = if wide { DataType::Int64 } else { DataType::Int32 };
        let schema = Schema::new(vec![
            Field::new("label", DataType::Int32, false),
            Field::new("indices", list_of(&index_type), false),
            Field::new("values", list_of(&DataType::Float32), false),
        ]);
        Self::create(path, schema, None, wide)
    }

    /// A writer of dense rows of `dim` values.
    pub fn create_dense(path: &Path, dim: usize) -> Result<Self, DataError> {
        let mut fields = vec![Field::new("label", DataType::Int32, false)];
        fields.extend((0..dim).map(|i| Field::new(format!("x{i}"), DataType::Float32, false)));
        Self::create(path, Schema::new(fields), Some(dim), false)
    }

    fn create(path: &Path, schema: Schema, dense_dim: Option<usize>, wide_indices: bool) -> Result<Self, DataError> {
        let schema = Arc::new(schema);
        let file = File::create(path).map_err(|e| DataError::io(path, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(PARQUET_ROW_GROUP_ROWS))
            .build();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(pq(path))?;
        Ok(Self {
            writer,
            schema,
            path: path.to_owned(),
            dense_dim,
            wide_indices,
            labels: Vec::new(),
            offsets: vec![0],
            indices: Vec::new(),
            values: Vec::new(),
        })
    }

    pub fn write_sparse(&mut self, label: u32, indices: &[u32], values: &[f32]) -> Result<(), DataError> {
        assert!(self.dense_dim.is_none(), "sparse row written to a dense Parquet writer");
        assert_eq!(indices.len(), values.len(), "indices and values differ in length");
        self.labels.push(label as i32);
        self.indices.extend_from_slice(indices);
        self.values.extend_from_slice(values);
        self.offsets.push(self.indices.len() as i32);
        self.flush_if_full()
    }

    pub fn write_dense(&mut self, label: u32, values: &[f32]) -> Result<(), DataError> {
        assert_eq!(
            Some(values.len()),
            self.dense_dim,
            "dense row width differs from the schema"
        );
        self.labels.push(label as i32);
        self.values.extend_from_slice(values);
        self.flush_if_full()
    }

    fn flush_if_full(&mut self) -> Result<(), DataError> {
        if self.values.len() >= PARQUET_WRITE_BATCH_ENTRIES || self.labels.len() >= PARQUET_ROW_GROUP_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DataError> {
        if self.labels.is_empty() {
            return Ok(());
        }
        let rows = self.labels.len();
        let mut columns: Vec<ArrayRef> = vec![Arc::new(Int32Array::from(std::mem::take(&mut self.labels)))];
        match self.dense_dim {
            Some(dim) => {
                for c in 0..dim {
                    let col: Float32Array = (0..rows).map(|r| self.values[r * dim + c]).collect::<Vec<f32>>().into();
                    columns.push(Arc::new(col));
                }
                self.values.clear();
            }
            None => {
                let offsets = OffsetBuffer::new(ScalarBuffer::from(std::mem::replace(&mut self.offsets, vec![0])));
                let indices: ArrayRef = if self.wide_indices {
                    Arc::new(self.indices.iter().map(|&i| i64::from(i)).collect::<Int64Array>())
                } else {
                    Arc::new(self.indices.iter().map(|&i| i as i32).collect::<Int32Array>())
                };
                let index_field = Arc::new(Field::new_list_field(indices.data_type().clone(), true));
                let values: ArrayRef = Arc::new(Float32Array::from(std::mem::take(&mut self.values)));
                let value_field = Arc::new(Field::new_list_field(DataType::Float32, true));
                let err = |e: arrow::error::ArrowError| DataError::format(&self.path, e.to_string());
                columns.push(Arc::new(
                    ListArray::try_new(index_field, offsets.clone(), indices, None).map_err(err)?,
                ));
                columns.push(Arc::new(
                    ListArray::try_new(value_field, offsets, values, None).map_err(err)?,
                ));
                self.indices.clear();
            }
        }
        let batch = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| DataError::format(&self.path, e.to_string()))?;
        self.writer.write(&batch).map_err(pq(&self.path))
    }

    pub fn finish(mut self) -> Result<(), DataError> {
        self.flush()?;
        let path = self.path.clone();
        let file = self.writer.into_inner().map_err(pq(&path))?;
        file.sync_all().map_err(|e| DataError::io(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.parquet");
        let mut w = ParquetWriter::create_sparse(&path, 1 << 20).expect("create");
        w.write_sparse(1, &[3, 1 << 19], &[1.0, 0.5]).expect("write");
        w.write_sparse(0, &[], &[]).expect("write");
        w.write_sparse(1, &[7], &[-2.0]).expect("write");
        w.finish().expect("finish");
        let opts = ReadOptions {
            dim: Some(1 << 20),
            ..ReadOptions::default()
        };
        let ds = read_parquet(&path, &opts).expect("read back");
        assert_eq!(ds.labels, vec![1, 0, 1]);
        let want = Features::Sparse {
            dim: 1 << 20,
            indptr: vec![0, 2, 2, 3],
            indices: vec![3, 1 << 19, 7],
            values: vec![1.0, 0.5, -2.0],
        };
        assert_eq!(ds.features, want);
        let slice = ReadOptions {
            row_range: Some(1..3),
            ..opts
        };
        assert_eq!(read_parquet(&path, &slice).expect("slice").labels, vec![0, 1]);
    }

    #[test]
    fn dense_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.parquet");
        let mut w = ParquetWriter::create_dense(&path, 2).expect("create");
        w.write_dense(3, &[0.5, -1.0]).expect("write");
        w.write_dense(0, &[2.0, 0.0]).expect("write");
        w.finish().expect("finish");
        let ds = read_parquet(&path, &ReadOptions::default()).expect("read back");
        assert_eq!((ds.labels.clone(), ds.num_classes), (vec![3, 0], 4));
        assert_eq!(
            ds.features,
            Features::Dense {
                dim: 2,
                values: vec![0.5, -1.0, 2.0, 0.0]
            }
        );
    }

    fn write_batch(path: &Path, batch: RecordBatch) {
        let file = File::create(path).expect("create");
        let mut w = ArrowWriter::try_new(file, batch.schema(), None).expect("writer");
        w.write(&batch).expect("write");
        w.close().expect("close");
    }

    #[test]
    fn malformed_rows_name_file_and_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.parquet");
        let labels: ArrayRef = Arc::new(arrow::array::Float64Array::from(vec![1.0, 0.5]));
        let x: ArrayRef = Arc::new(Float32Array::from(vec![1.0, 2.0]));
        write_batch(
            &path,
            RecordBatch::try_from_iter([("label", labels), ("x", x.clone())]).expect("batch"),
        );
        let err = read_parquet(&path, &ReadOptions::default())
            .expect_err("fractional label")
            .to_string();
        assert!(
            err.ends_with("bad.parquet: row 1: label 0.5 is not an integer"),
            "{err}"
        );

        let names: ArrayRef = Arc::new(arrow::array::StringArray::from(vec!["a", "b"]));
        write_batch(
            &path,
            RecordBatch::try_from_iter([("y", x.clone()), ("name", names)]).expect("batch"),
        );
        let err = read_parquet(&path, &ReadOptions::default())
            .expect_err("no label")
            .to_string();
        assert!(
            err.ends_with("bad.parquet: no `label` column (columns: y, name)"),
            "{err}"
        );

        let labels: ArrayRef = Arc::new(Int32Array::from(vec![0, 1]));
        let idx = ListArray::from_iter_primitive::<arrow::datatypes::Int32Type, _, _>([
            Some(vec![Some(1), Some(2)]),
            Some(vec![Some(-4)]),
        ]);
        let val = ListArray::from_iter_primitive::<Float32Type, _, _>([
            Some(vec![Some(1.0), Some(1.0)]),
            Some(vec![Some(1.0)]),
        ]);
        let batch = RecordBatch::try_from_iter([
            ("label", labels),
            ("indices", Arc::new(idx) as ArrayRef),
            ("values", Arc::new(val) as ArrayRef),
        ])
        .expect("batch");
        write_batch(&path, batch);
        let err = read_parquet(&path, &ReadOptions::default())
            .expect_err("negative index")
            .to_string();
        assert!(err.ends_with("bad.parquet: row 1: index -4 is negative"), "{err}");

        std::fs::write(&path, b"PAR1 not really").expect("write");
        let err = read_parquet(&path, &ReadOptions::default())
            .expect_err("garbage")
            .to_string();
        assert!(err.contains("bad.parquet: parquet: "), "{err}");
    }

    #[test]
    fn corrupted_files_give_errors_that_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.parquet");
        let mut w = ParquetWriter::create_sparse(&path, 1 << 20).expect("create");
        for r in 0..50u32 {
            w.write_sparse(r % 2, &[r, r + 7, 1000 + r], &[1.0, 0.5, 2.0])
                .expect("write");
        }
        w.finish().expect("finish");
        let good = std::fs::read(&path).expect("read");
        let mut rng = tensor::Rng::new(1);
        let bad = dir.path().join("mutated.parquet");
        for _ in 0..300 {
            let mut bytes = good.clone();
            for _ in 0..1 + rng.below(4) {
                let k = rng.below(bytes.len() as u64) as usize;
                bytes[k] = rng.next_u64() as u8;
            }
            bytes.truncate(bytes.len() - rng.below(4) as usize);
            std::fs::write(&bad, &bytes).expect("write");
            // A panic inside the Parquet library would fail this test too.
            if let Err(e) = read_parquet(&bad, &ReadOptions::default()) {
                assert!(e.to_string().contains("mutated.parquet"), "{e}");
            }
        }
    }
}
