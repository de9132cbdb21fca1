//! `CodecError`: every way a compression spec, an encoded message, a shape or
//! a saved codec state can be wrong, each naming what was expected and what came.

use crate::header::CodecId;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("compression spec {spec:?}: {why}")]
    Spec { spec: String, why: String },
    #[error("message: {got} bytes, shorter than the {needed}-byte header")]
    TruncatedHeader { needed: usize, got: usize },
    #[error("message: unknown codec id {id}")]
    UnknownCodec { id: u8 },
    #[error("message: format version {got}, this build reads version {expected}")]
    Version { got: u8, expected: u8 },
    #[error("message: reserved header bytes are {got:#06x}, expected 0")]
    Reserved { got: u16 },
    #[error("{codec} message: truncated in the header parameter `{param}`")]
    TruncatedParam { codec: CodecId, param: &'static str },
    #[error("{codec} message: parameter `{param}` = {value}: {why}")]
    BadParam {
        codec: CodecId,
        param: &'static str,
        value: u64,
        why: &'static str,
    },
    #[error("{codec} message: payload is {got} bytes, expected {expected} for {elems} elements")]
    PayloadLength {
        codec: CodecId,
        elems: usize,
        expected: u64,
        got: usize,
    },
    #[error("{codec} message holds {message} elements, the output buffer has {buffer}")]
    WrongCount {
        codec: CodecId,
        message: usize,
        buffer: usize,
    },
    #[error("{codec} message: index {index} at position {position} is out of range for {elems} elements")]
    IndexOutOfRange {
        codec: CodecId,
        position: usize,
        index: u64,
        elems: usize,
    },
    #[error("{codec} message: index at position {position}: {why}")]
    IndexEncoding {
        codec: CodecId,
        position: usize,
        why: &'static str,
    },
    #[error("encode: {elems} elements exceed the limit of {max} per message")]
    TooManyElements { elems: usize, max: usize },
    #[error("encode: shape {shape:?} holds {expected} elements, the values have {got}")]
    Shape {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error("{what}: {got} values, expected {expected}")]
    StateLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
}
