//! Gradients of a flat parameter buffer: dense for `Dense` tensors, row-sparse
//! for `Table` tensors (only the rows a batch touched).

/// The touched rows of one `Table` tensor. `rows` are distinct; `values` holds
/// `rows.len() * row_len` elements, row `i` at `values[i*row_len..(i+1)*row_len]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseRows {
    /// Index of the tensor in the model's [`crate::Layout`].
    pub tensor: usize,
    pub row_len: usize,
    pub rows: Vec<u32>,
    pub values: Vec<f32>,
}

impl SparseRows {
    pub fn clear(&mut self) {
        self.rows.clear();
        self.values.clear();
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.row_len..(i + 1) * self.row_len]
    }
}

/// The gradient of a mean loss over a batch.
///
/// `dense` has the length of the whole layout; only the ranges of `Dense`
/// tensors are meaningful (the ranges of `Table` tensors are left untouched).
/// `sparse` holds one entry per `Table` tensor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gradient {
    pub dense: Vec<f32>,
    pub sparse: Vec<SparseRows>,
}

impl Gradient {
    pub fn for_layout(layout: &crate::Layout) -> Self {
        let sparse = layout
            .tensors()
            .iter()
            .enumerate()
            .filter(|(_, t)| t.kind == crate::ParamKind::Table)
            .map(|(i, t)| SparseRows {
                tensor: i,
                row_len: t.row_len(),
                ..SparseRows::default()
            })
            .collect();
        Self {
            dense: vec![0.0; layout.len()],
            sparse,
        }
    }
}
