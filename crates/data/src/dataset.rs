//! In-memory data sets and the batches cut from them.

/// Feature matrix of a data set.
#[derive(Clone, Debug, PartialEq)]
pub enum Features {
    /// Row-major `rows × dim` values.
    Dense { dim: usize, values: Vec<f32> },
    /// Compressed sparse rows. Row `r` holds `indices[indptr[r]..indptr[r+1]]`
    /// (each `< dim`) with the matching `values`. `indptr.len() == rows + 1`.
    Sparse {
        dim: u64,
        indptr: Vec<u64>,
        indices: Vec<u32>,
        values: Vec<f32>,
    },
}

/// A labelled data set held in memory.
///
/// Labels are class ids in `0..num_classes`; binary tasks have `num_classes == 2`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub features: Features,
    pub labels: Vec<u32>,
    pub num_classes: u32,
}

impl Dataset {
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// Number of feature columns (the hashed space for sparse data).
    pub fn dim(&self) -> u64 {
        match &self.features {
            Features::Dense { dim, .. } => *dim as u64,
            Features::Sparse { dim, .. } => *dim,
        }
    }

    /// Non-zeros of row `r` (the row length for dense data).
    pub fn row_nnz(&self, r: usize) -> usize {
        match &self.features {
            Features::Dense { dim, .. } => *dim,
            Features::Sparse { indptr, .. } => (indptr[r + 1] - indptr[r]) as usize,
        }
    }

    /// Stored entries: the non-zeros of sparse data, `rows × dim` for dense data.
    pub fn nnz(&self) -> u64 {
        match &self.features {
            Features::Dense { values, .. } => values.len() as u64,
            Features::Sparse { indptr, .. } => indptr.last().copied().unwrap_or(0),
        }
    }

    /// A new data set of rows `idx` of this one, in that order (a worker's partition).
    pub fn select(&self, idx: &[usize]) -> Dataset {
        let labels = idx.iter().map(|&i| self.labels[i]).collect();
        let features = match &self.features {
            Features::Dense { dim, values } => {
                let mut out = Vec::with_capacity(idx.len() * dim);
                for &i in idx {
                    out.extend_from_slice(&values[i * dim..(i + 1) * dim]);
                }
                Features::Dense { dim: *dim, values: out }
            }
            Features::Sparse {
                dim,
                indptr,
                indices,
                values,
            } => {
                let mut ptr = Vec::with_capacity(idx.len() + 1);
                ptr.push(0u64);
                let (mut ind, mut val) = (Vec::new(), Vec::new());
                for &i in idx {
                    let (s, e) = (indptr[i] as usize, indptr[i + 1] as usize);
                    ind.extend_from_slice(&indices[s..e]);
                    val.extend_from_slice(&values[s..e]);
                    ptr.push(ind.len() as u64);
                }
                Features::Sparse {
                    dim: *dim,
                    indptr: ptr,
                    indices: ind,
                    values: val,
                }
            }
        };
        Dataset {
            features,
            labels,
            num_classes: self.num_classes,
        }
    }
}

/// Batch features, with buffers reused from batch to batch.
#[derive(Clone, Debug, PartialEq)]
pub enum BatchFeatures {
    Dense {
        dim: usize,
        values: Vec<f32>,
    },
    Sparse {
        dim: u64,
        indptr: Vec<u32>,
        indices: Vec<u32>,
        values: Vec<f32>,
    },
}

/// Rows gathered from a [`Dataset`] for one step.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub features: BatchFeatures,
    pub labels: Vec<u32>,
}

impl Batch {
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// An empty batch shaped for `ds`, to be filled by [`Batch::gather`].
    pub fn for_dataset(ds: &Dataset) -> Self {
        let features = match &ds.features {
            Features::Dense { dim, .. } => BatchFeatures::Dense {
                dim: *dim,
                values: Vec::new(),
            },
            Features::Sparse { dim, .. } => BatchFeatures::Sparse {
                dim: *dim,
                indptr: vec![0],
                indices: Vec::new(),
                values: Vec::new(),
            },
        };
        Self {
            features,
            labels: Vec::new(),
        }
    }

    /// Replaces the contents with rows `idx` of `ds`, in that order.
    pub fn gather(&mut self, ds: &Dataset, idx: &[usize]) {
        self.labels.clear();
        self.labels.extend(idx.iter().map(|&i| ds.labels[i]));
        match (&ds.features, &mut self.features) {
            (Features::Dense { dim, values }, BatchFeatures::Dense { values: out, .. }) => {
                out.clear();
                for &i in idx {
                    out.extend_from_slice(&values[i * dim..(i + 1) * dim]);
                }
            }
            (
                Features::Sparse {
                    indptr,
                    indices,
                    values,
                    ..
                },
                BatchFeatures::Sparse {
                    indptr: bp,
                    indices: bi,
                    values: bv,
                    ..
                },
            ) => {
                bp.clear();
                bi.clear();
                bv.clear();
                bp.push(0);
                for &i in idx {
                    let (s, e) = (indptr[i] as usize, indptr[i + 1] as usize);
                    bi.extend_from_slice(&indices[s..e]);
                    bv.extend_from_slice(&values[s..e]);
                    bp.push(bi.len() as u32);
                }
            }
            _ => panic!("batch shape does not match the data set (dense vs sparse)"),
        }
    }
}
