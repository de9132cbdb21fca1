//! Sinter's wire format: frame headers, limits, checksums, control messages
//! and the authentication handshake. Pure and sans-IO: no sockets, threads,
//! clocks or RNG; the `node` crate moves the bytes.
//!
//! Layers, as in mini-redis: a [`FrameHeader`] is decoded and checked
//! (magic, version, crc, length against a named limit) before any payload is
//! read; a [`FrameDecoder`] turns a fragmented byte stream into whole
//! [`Frame`]s; [`decode_control`] turns a control frame into a message.
//!
//! **Invariant:** nothing a peer sends makes this crate allocate more than
//! [`HEADER_BYTES`] plus the payload limit of the frame's type.
//! **Invariant:** no function here panics on received bytes.

pub mod auth;
mod control;
mod crc;
mod decoder;
mod error;
mod header;
pub mod msg;

pub use auth::{
    Acceptor, AuthFailure, AuthStep, Connector, NONCE_BYTES, Nonce, PeerInfo, Role, SECRET_BYTES_MIN, Secret,
};
pub use control::{decode_control, encode_control};
pub use crc::{CrcPath, crc32c, crc32c_append};
pub use decoder::{Frame, FrameDecoder};
pub use error::WireError;
pub use header::{
    AUTH_PAYLOAD_BYTES_MAX, CONTROL_PAYLOAD_BYTES_MAX, FLAG_PAYLOAD_UNCHECKED, FLAGS_KNOWN, FrameHeader, HEADER_BYTES,
    MAGIC, MessageType, PROTOCOL_VERSION, TENSOR_PAYLOAD_BYTES_MAX, payload_crc, payload_crc_append,
};
