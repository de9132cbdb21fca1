//! Everything that can go wrong in the optim crate: a bad config key, a
//! gradient that does not fit the layout, saved state that does not fit.

use std::ops::Range;

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("optim ({kind}): {key} = {value}: {why}")]
    Config {
        kind: &'static str,
        key: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("{what}: {got} elements, expected {expected}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("range {range:?} is not inside the optimizer's range {owned:?}")]
    Range { range: Range<usize>, owned: Range<usize> },
    #[error("sparse gradient names tensor #{tensor}, but the layout has {tensors} tensors")]
    UnknownTensor { tensor: usize, tensors: usize },
    #[error("sparse gradient for `{name}`: the tensor is Dense, not a Table")]
    NotATable { name: String },
    #[error("sparse gradient for `{name}`: {what} is {got}, expected {expected}")]
    SparseShape {
        name: String,
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("sparse gradient for `{name}`: row {row} is out of range (the table has {rows} rows)")]
    RowOutOfRange { name: String, row: u32, rows: usize },
    #[error("sparse gradient for `{name}`: row {row} is not inside the optimizer's range {owned:?}")]
    RowNotOwned {
        name: String,
        row: u32,
        owned: Range<usize>,
    },
    #[error("optimizer state `{name}` is missing")]
    MissingState { name: String },
    #[error("optimizer state `{name}` is not state of this {kind} optimizer")]
    UnexpectedState { name: String, kind: &'static str },
    #[error("optimizer state `{name}`: {got} elements, expected {expected}")]
    StateLength { name: String, expected: usize, got: usize },
    #[error("optimizer state `{name}`: {why}")]
    StateValue { name: String, why: String },
}
