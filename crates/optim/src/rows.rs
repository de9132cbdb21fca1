//! Where a row of a table lies inside the table's slice.

use std::ops::Range;

/// The element range of `row` in a table whose rows hold `row_len` elements.
pub(crate) fn row_range(row: u32, row_len: usize) -> Range<usize> {
    let start = row as usize * row_len;
    start..start + row_len
}
