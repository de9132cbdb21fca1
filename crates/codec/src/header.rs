//! The header every message starts with, and bounds-checked reading of the
//! parameters and payload behind it.
//!
//! ```text
//! byte 0      codec id (CodecId)
//! byte 1      format version (FORMAT_VERSION)
//! bytes 2..4  reserved, zero
//! bytes 4..8  element count, u32 little-endian
//! then        the codec's parameters, u32 little-endian each
//! then        the payload, little-endian
//! ```

use std::fmt;

use crate::error::CodecError;

/// Bytes of the fixed part of the header, before the codec's parameters.
pub const HEADER_BYTES: usize = 8;
/// The message format this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Most elements one message can carry (the count is a u32, and so are sparse indices).
pub const ELEMS_MAX: usize = u32::MAX as usize;

/// The first byte of a message: which codec wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CodecId {
    None = 0,
    Fp16 = 1,
    Bf16 = 2,
    Int8 = 3,
    Qsgd = 4,
    Sign = 5,
    TopK = 6,
    RandK = 7,
    Threshold = 8,
    PowerSgd = 9,
}

impl CodecId {
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::None,
            1 => Self::Fp16,
            2 => Self::Bf16,
            3 => Self::Int8,
            4 => Self::Qsgd,
            5 => Self::Sign,
            6 => Self::TopK,
            7 => Self::RandK,
            8 => Self::Threshold,
            9 => Self::PowerSgd,
            _ => return None,
        })
    }

    /// The name a [`crate::CodecSpec`] string starts with.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Fp16 => "fp16",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
            Self::Qsgd => "qsgd",
            Self::Sign => "sign",
            Self::TopK => "topk",
            Self::RandK => "randk",
            Self::Threshold => "threshold",
            Self::PowerSgd => "powersgd",
        }
    }
}

impl fmt::Display for CodecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Makes `out` exactly one message long, writes the header and `params`, and
/// returns where the payload of `payload_bytes` starts. Bytes already in
/// `out` are reused, not cleared: every codec writes its whole payload.
pub(crate) fn begin(out: &mut Vec<u8>, id: CodecId, elems: usize, params: &[u32], payload_bytes: usize) -> usize {
    assert!(elems <= ELEMS_MAX, "callers check the element count");
    let start = HEADER_BYTES + 4 * params.len();
    out.resize(start + payload_bytes, 0);
    out[..4].copy_from_slice(&[id as u8, FORMAT_VERSION, 0, 0]);
    out[4..8].copy_from_slice(&(elems as u32).to_le_bytes());
    for (dst, p) in out[HEADER_BYTES..start].chunks_exact_mut(4).zip(params) {
        dst.copy_from_slice(&p.to_le_bytes());
    }
    start
}

/// A message whose fixed header has been checked; parameters are read from
/// `rest` in order, then [`Reader::payload`] checks the remaining length.
pub(crate) struct Reader<'a> {
    pub id: CodecId,
    pub elems: usize,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Result<Self, CodecError> {
        let Some((head, rest)) = bytes.split_first_chunk::<HEADER_BYTES>() else {
            return Err(CodecError::TruncatedHeader {
                needed: HEADER_BYTES,
                got: bytes.len(),
            });
        };
        let id = CodecId::from_byte(head[0]).ok_or(CodecError::UnknownCodec { id: head[0] })?;
        if head[1] != FORMAT_VERSION {
            return Err(CodecError::Version {
                got: head[1],
                expected: FORMAT_VERSION,
            });
        }
        let reserved = u16::from_le_bytes([head[2], head[3]]);
        if reserved != 0 {
            return Err(CodecError::Reserved { got: reserved });
        }
        let elems = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        Ok(Self { id, elems, rest })
    }

    /// Checks that the message is for a buffer of `len` elements.
    pub fn expect_elems(&self, len: usize) -> Result<(), CodecError> {
        if self.elems != len {
            return Err(CodecError::WrongCount {
                codec: self.id,
                message: self.elems,
                buffer: len,
            });
        }
        Ok(())
    }

    pub fn param(&mut self, param: &'static str) -> Result<u32, CodecError> {
        let Some((p, rest)) = self.rest.split_first_chunk::<4>() else {
            return Err(CodecError::TruncatedParam { codec: self.id, param });
        };
        self.rest = rest;
        Ok(u32::from_le_bytes(*p))
    }

    /// A parameter that must lie in `min..=max`.
    pub fn param_in(&mut self, param: &'static str, min: u32, max: u32, why: &'static str) -> Result<u32, CodecError> {
        let value = self.param(param)?;
        if value < min || value > max {
            return Err(self.bad(param, value.into(), why));
        }
        Ok(value)
    }

    pub fn bad(&self, param: &'static str, value: u64, why: &'static str) -> CodecError {
        CodecError::BadParam {
            codec: self.id,
            param,
            value,
            why,
        }
    }

    /// The payload, which must be exactly `expected` bytes.
    pub fn payload(self, expected: u64) -> Result<&'a [u8], CodecError> {
        if self.rest.len() as u64 != expected {
            return Err(CodecError::PayloadLength {
                codec: self.id,
                elems: self.elems,
                expected,
                got: self.rest.len(),
            });
        }
        Ok(self.rest)
    }
}

/// Writes `v` into `dst` as little-endian f32s; `dst` is exactly `4 * v.len()` bytes.
#[inline(always)]
pub(crate) fn put_f32s(dst: &mut [u8], v: &[f32]) {
    assert_eq!(dst.len(), 4 * v.len());
    for (d, x) in dst.chunks_exact_mut(4).zip(v) {
        d.copy_from_slice(&x.to_le_bytes());
    }
}

#[inline(always)]
pub(crate) fn get_f32(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
