//! Flat f32 parameter buffers and the vocabulary every other crate shares:
//! the named layout of a model's parameters, contiguous shard ranges, a seeded
//! RNG whose whole state fits in a checkpoint, and the GEMM trait.
//!
//! **Invariant:** a model's parameters are one contiguous `Vec<f32>`; a
//! [`Layout`] names slices of it. Collectives, optimizers and checkpoints all
//! work on that flat buffer and never need to know the model.

pub mod gemm;
mod grad;
mod layout;
mod rng;

pub use grad::{Gradient, SparseRows};
pub use layout::{Layout, ParamKind, ParamTensor, shard_ranges};
pub use rng::Rng;
