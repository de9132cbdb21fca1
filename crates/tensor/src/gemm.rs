//! The GEMM trait the model crate computes with, and its implementation.
//! (Filled in by the model work: see `model`.)
