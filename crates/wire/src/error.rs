//! `WireError`: every way bytes from a peer, a secret or a handshake can be
//! wrong, each with the field, the expected value and what arrived.

use std::path::PathBuf;

use crate::auth::{AuthFailure, PeerInfo};
use crate::header::MessageType;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame magic: expected \"SNTR\", got {got:02x?} (not a Sinter peer?)")]
    BadMagic { got: [u8; 4] },
    #[error("protocol version: peer speaks version {theirs}, this build speaks version {ours}")]
    VersionMismatch { ours: u8, theirs: u8 },
    #[error("header crc: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("message type: unknown type byte {got}")]
    UnknownMessageType { got: u8 },
    #[error("flags: unknown bits in {got:#06x} (known {known:#06x})")]
    UnknownFlags { got: u16, known: u16 },
    #[error("payload length: {kind} payload of {bytes} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge { kind: MessageType, bytes: u64, max: u32 },
    #[error("payload length: tensor payload of {bytes} bytes is not a multiple of 4")]
    TensorPayloadMisaligned { bytes: u32 },
    #[error("payload length: {kind} frame from rank {sender}: header says {expected} bytes, got {got}")]
    PayloadLength {
        kind: MessageType,
        sender: u32,
        expected: u32,
        got: usize,
    },
    #[error(
        "payload crc: {kind} frame from rank {sender}, tag {tag:#x}: stored {stored:#010x}, computed {computed:#010x}"
    )]
    PayloadCrc {
        kind: MessageType,
        tag: u64,
        sender: u32,
        stored: u32,
        computed: u32,
    },
    #[error("truncated frame: stream ended after {buffered} of {needed} bytes")]
    Truncated { buffered: usize, needed: usize },
    #[error("frame decoder: payload of {bytes} bytes exceeds this decoder's limit of {max} bytes")]
    DecoderLimit { bytes: u32, max: u32 },
    #[error("frame decoder: used after an earlier error; the connection must be closed")]
    DecoderPoisoned,
    #[error("message type: expected a {expected} frame, got {got} from rank {sender}")]
    WrongMessageType {
        expected: MessageType,
        got: MessageType,
        sender: u32,
    },
    #[error("control message from rank {sender}: {source}")]
    ControlDecode { sender: u32, source: postcard::Error },
    #[error("control message from rank {sender}: {bytes} trailing bytes after the message")]
    ControlTrailingBytes { sender: u32, bytes: usize },
    #[error("control message: cannot encode: {source}")]
    ControlEncode { source: postcard::Error },
    #[error("authentication failed{}: {reason}", peer_suffix(.peer))]
    AuthFailed {
        peer: Option<PeerInfo>,
        reason: AuthFailure,
    },
    #[error("secret file {}: {source}", path.display())]
    SecretFile { path: PathBuf, source: std::io::Error },
    #[error("secret file {}: larger than the limit of {max} bytes", path.display())]
    SecretFileTooLarge { path: PathBuf, max: usize },
    #[error("secret: environment variable {var} is not set")]
    SecretEnvMissing { var: String },
    #[error("secret from {origin}: {bytes} bytes, at least {min} needed")]
    SecretTooShort { origin: String, bytes: usize, min: usize },
}

fn peer_suffix(peer: &Option<PeerInfo>) -> String {
    match peer {
        Some(peer) => format!(" with a peer claiming to be {peer}"),
        None => String::new(),
    }
}
