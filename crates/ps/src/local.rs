//! The part of a model one shard holds, as a compact layout of its own.
//!
//! A shard's buffer is laid out as: its dense pieces (in global buffer order,
//! one local tensor per global tensor they come from), then, for every table,
//! the rows it owns in ascending row order. The local tensors keep their
//! global names, so optimizer state tensors are named as on a single process.

use std::ops::Range;

use tensor::{Layout, ParamKind};

use crate::placement::{Placement, key};

/// Marks a global row this shard does not own.
const NOT_OWNED: u32 = u32::MAX;

/// The rows of one table that a shard owns.
#[derive(Clone, Debug)]
pub struct LocalTable {
    /// The table's tensor index in the global layout.
    pub tensor: usize,
    /// Its tensor index in the local layout.
    pub local_tensor: usize,
    pub row_len: usize,
    /// Element offset of the table in the local buffer.
    pub offset: usize,
    /// Owned global rows, ascending.
    pub rows: Vec<u32>,
    /// Global row → local row, or `NOT_OWNED`. O(table rows) memory: a limit
    /// for tables of more than ~10^9 rows.
    index: Vec<u32>,
}

impl LocalTable {
    /// The local row of a global row, if this shard owns it.
    pub fn local_row(&self, row: u32) -> Option<u32> {
        self.index.get(row as usize).copied().filter(|&r| r != NOT_OWNED)
    }
}

/// What one shard holds of a global layout.
#[derive(Clone, Debug)]
pub struct LocalLayout {
    pub local: Layout,
    /// (global range, local offset) of each dense piece; local offsets start at 0 and are contiguous.
    pub dense: Vec<(Range<usize>, usize)>,
    /// Total dense elements (the dense pieces fill `0..dense_len` of the local buffer).
    pub dense_len: usize,
    pub tables: Vec<LocalTable>,
}

impl LocalLayout {
    pub fn new(global: &Layout, placement: &Placement, shard: u32) -> Self {
        let mut local = Layout::new();
        let mut dense = Vec::new();
        let mut dense_len = 0;
        for r in placement.dense_ranges(shard) {
            // A piece may span tensors: one local tensor per global tensor it touches.
            for t in global.tensors().iter().filter(|t| t.kind == ParamKind::Dense) {
                let tr = t.range();
                let (s, e) = (r.start.max(tr.start), r.end.min(tr.end));
                if s < e {
                    local.push(t.name.clone(), &[e - s], ParamKind::Dense);
                    dense.push((s..e, dense_len));
                    dense_len += e - s;
                }
            }
        }
        let mut tables = Vec::new();
        for (i, t) in global.tensors().iter().enumerate() {
            if t.kind != ParamKind::Table {
                continue;
            }
            let n = t.shape[0];
            let mut index = vec![NOT_OWNED; n];
            let mut rows = Vec::new();
            for row in 0..n as u32 {
                if placement.shard_of(key(i, row)) == shard {
                    index[row as usize] = rows.len() as u32;
                    rows.push(row);
                }
            }
            let mut shape = t.shape.clone();
            shape[0] = rows.len();
            let range = local.push(t.name.clone(), &shape, ParamKind::Table);
            tables.push(LocalTable {
                tensor: i,
                local_tensor: local.tensors().len() - 1,
                row_len: t.row_len(),
                offset: range.start,
                rows,
                index,
            });
        }
        Self {
            local,
            dense,
            dense_len,
            tables,
        }
    }

    /// Copies the local tensor `name` (an optimizer state tensor shaped like
    /// the parameter it belongs to) into its places in the global tensor of
    /// the same name, `global` (which holds that whole tensor).
    pub fn scatter_tensor(&self, layout: &Layout, name: &str, local: &[f32], global: &mut [f32]) -> bool {
        self.map_tensor(layout, name, |l, g| global[g].copy_from_slice(&local[l]))
    }

    /// Copies this shard's part of the global tensor `name` (whole, in `global`) into `out`.
    pub fn gather_tensor(&self, layout: &Layout, name: &str, global: &[f32], out: &mut Vec<f32>) -> bool {
        out.clear();
        self.map_tensor(layout, name, |_, g| out.extend_from_slice(&global[g]))
    }

    /// Calls `f(local range, global range)` for every run of elements of tensor `name`
    /// this shard holds, in local order; ranges are relative to the tensor's start.
    /// False when neither the layout nor this shard has the tensor.
    fn map_tensor(&self, layout: &Layout, name: &str, mut f: impl FnMut(Range<usize>, Range<usize>)) -> bool {
        let Some((gi, gt)) = layout.tensors().iter().enumerate().find(|(_, t)| t.name == name) else {
            return false;
        };
        match gt.kind {
            ParamKind::Dense => {
                let Some((r, _)) = self
                    .dense
                    .iter()
                    .find(|(r, _)| r.start >= gt.offset && r.end <= gt.offset + gt.len())
                else {
                    return false;
                };
                f(0..r.len(), r.start - gt.offset..r.end - gt.offset);
            }
            ParamKind::Table => {
                let Some(t) = self.table(gi) else { return false };
                for (i, &row) in t.rows.iter().enumerate() {
                    let g = row as usize * t.row_len;
                    f(i * t.row_len..(i + 1) * t.row_len, g..g + t.row_len);
                }
            }
        }
        true
    }

    /// The local table of global tensor `tensor`.
    pub fn table(&self, tensor: usize) -> Option<&LocalTable> {
        self.tables.iter().find(|t| t.tensor == tensor)
    }

    /// Copies this shard's part of a global buffer into a local one.
    pub fn gather(&self, global_layout: &Layout, global: &[f32], local: &mut Vec<f32>) {
        local.clear();
        local.resize(self.local.len(), 0.0);
        for (r, at) in &self.dense {
            local[*at..*at + r.len()].copy_from_slice(&global[r.clone()]);
        }
        for t in &self.tables {
            let base = global_layout.tensors()[t.tensor].offset;
            for (i, &row) in t.rows.iter().enumerate() {
                let src = base + row as usize * t.row_len;
                let dst = t.offset + i * t.row_len;
                local[dst..dst + t.row_len].copy_from_slice(&global[src..src + t.row_len]);
            }
        }
    }

    /// Writes a local buffer back into its places in a global one.
    pub fn scatter(&self, global_layout: &Layout, local: &[f32], global: &mut [f32]) {
        for (r, at) in &self.dense {
            global[r.clone()].copy_from_slice(&local[*at..*at + r.len()]);
        }
        for t in &self.tables {
            let base = global_layout.tensors()[t.tensor].offset;
            for (i, &row) in t.rows.iter().enumerate() {
                let dst = base + row as usize * t.row_len;
                let src = t.offset + i * t.row_len;
                global[dst..dst + t.row_len].copy_from_slice(&local[src..src + t.row_len]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::PlacementSpec;

    #[test]
    fn shards_partition_the_buffer_and_scatter_undoes_gather() {
        let mut l = Layout::new();
        l.push("a", &[5, 3], ParamKind::Dense);
        l.push("emb", &[50, 2], ParamKind::Table);
        l.push("b", &[4], ParamKind::Dense);
        l.push("w", &[50, 1], ParamKind::Table);
        let global: Vec<f32> = (0..l.len()).map(|i| i as f32).collect();
        for shards in 1..5 {
            let p = Placement::new(PlacementSpec::hashed(shards, 8), &l).unwrap();
            let mut back = vec![-1.0f32; l.len()];
            let mut total = 0;
            for s in 0..shards {
                let ll = LocalLayout::new(&l, &p, s);
                let mut local = Vec::new();
                ll.gather(&l, &global, &mut local);
                total += local.len();
                ll.scatter(&l, &local, &mut back);
            }
            assert_eq!(total, l.len(), "every element on exactly one shard");
            assert_eq!(back, global);
            // Tensor by tensor, as optimizer state travels.
            for t in l.tensors() {
                let whole = global[t.range()].to_vec();
                let mut rebuilt = vec![-1.0f32; t.len()];
                for s in 0..shards {
                    let ll = LocalLayout::new(&l, &p, s);
                    let mut part = Vec::new();
                    if ll.gather_tensor(&l, &t.name, &whole, &mut part) {
                        assert!(ll.scatter_tensor(&l, &t.name, &part, &mut rebuilt));
                    }
                }
                assert_eq!(rebuilt, whole, "{}", t.name);
            }
        }
    }
}
