//! Named slices of a flat parameter buffer, and splitting a buffer into shards.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// How a parameter tensor receives gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamKind {
    /// Every step produces a gradient for every element (weights of dense layers).
    Dense,
    /// A table of rows of which a step touches only a few (embeddings, hashed
    /// feature weights). `shape[0]` is the number of rows.
    Table,
}

/// One named tensor inside the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
    /// Element offset in the flat buffer.
    pub offset: usize,
}

impl ParamTensor {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }

    /// Elements per row of a table (1 for a vector).
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }
}

/// The layout of a model's flat parameter buffer: tensors in offset order,
/// contiguous, without gaps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    tensors: Vec<ParamTensor>,
}

impl Layout {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a tensor after the last one and returns its range.
    pub fn push(&mut self, name: impl Into<String>, shape: &[usize], kind: ParamKind) -> Range<usize> {
        let offset = self.len();
        let name = name.into();
        assert!(
            self.tensors.iter().all(|t| t.name != name),
            "duplicate parameter name {name}"
        );
        self.tensors.push(ParamTensor {
            name,
            shape: shape.to_vec(),
            kind,
            offset,
        });
        self.tensors.last().expect("just pushed").range()
    }

    /// Total number of f32 elements.
    pub fn len(&self) -> usize {
        self.tensors.last().map_or(0, |t| t.offset + t.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn tensors(&self) -> &[ParamTensor] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&ParamTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Splits `0..len` into `parts` contiguous ranges whose sizes differ by at most one.
/// Part `i` of the result is the same on every rank, which is what the ring and
/// the parameter-server shards rely on.
pub fn shard_ranges(len: usize, parts: usize) -> Vec<Range<usize>> {
    assert!(parts > 0, "shard_ranges needs at least one part");
    let base = len / parts;
    let extra = len % parts;
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let size = base + usize::from(i < extra);
            let r = start..start + size;
            start += size;
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_contiguous() {
        let mut l = Layout::new();
        assert_eq!(l.push("w", &[3, 4], ParamKind::Dense), 0..12);
        assert_eq!(l.push("b", &[4], ParamKind::Dense), 12..16);
        assert_eq!(l.len(), 16);
        assert_eq!(l.get("b").map(|t| t.offset), Some(12));
    }

    proptest! {
        #[test]
        fn shards_cover_exactly(len in 0usize..10_000, parts in 1usize..64) {
            let r = shard_ranges(len, parts);
            prop_assert_eq!(r.len(), parts);
            prop_assert_eq!(r[0].start, 0);
            prop_assert_eq!(r[parts - 1].end, len);
            for w in r.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
                prop_assert!(w[0].len().abs_diff(w[1].len()) <= 1);
            }
        }
    }
}
