//! The fixed 32-byte frame header, its limits and the payload checksum.
//!
//! The header is everything a reader needs before it touches the payload: the
//! payload's type, length and crc32c. So the data path writes the header and
//! then the payload slice, and reads the header and then `read_exact`s the
//! payload straight into its destination buffer, with no copy in between.
//!
//! | bytes  | field        | type      | meaning                                    |
//! |--------|--------------|-----------|--------------------------------------------|
//! | 0..4   | magic        | `b"SNTR"` | rejects anything that is not Sinter        |
//! | 4      | version      | u8        | [`PROTOCOL_VERSION`]                       |
//! | 5      | message type | u8        | [`MessageType`]                            |
//! | 6..8   | flags        | u16 LE    | none defined yet; must be zero             |
//! | 8..16  | tag          | u64 LE    | collective op / step / chunk; opaque here  |
//! | 16..20 | sender       | u32 LE    | the sender's rank                          |
//! | 20..24 | payload len  | u32 LE    | bytes after the header                     |
//! | 24..28 | payload crc  | u32 LE    | crc32c of the payload                      |
//! | 28..32 | header crc   | u32 LE    | crc32c of bytes 0..28                      |

use crate::error::WireError;

/// Bytes in an encoded [`FrameHeader`].
pub const HEADER_BYTES: usize = 32;

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"SNTR";

/// The protocol version this build speaks. Peers must match exactly.
/// Version 2: parameter-server frames, and the shared-memory negotiation after `PeerHello`.
/// Version 3: elastic membership messages (`Regroup` without previous ranks,
/// `Replace`), and a parameter-server shard's `PsReady` carries the worker's clock.
pub const PROTOCOL_VERSION: u8 = 3;

/// The largest control payload (postcard-encoded message) a peer may send.
pub const CONTROL_PAYLOAD_BYTES_MAX: u32 = 1 << 20;

/// The largest tensor payload (raw little-endian f32) in one frame: 16M values.
/// Larger tensors are split into chunks, each with its own `tag`.
pub const TENSOR_PAYLOAD_BYTES_MAX: u32 = 64 << 20;

/// The largest authentication payload; the real messages are under 100 bytes.
pub const AUTH_PAYLOAD_BYTES_MAX: u32 = 256;

/// The payload crc was not computed (`payload_crc` is 0) and is not checked.
/// For tensor frames on a path the sender trusts (TCP's own checksum, a
/// loopback device): the crc pass over cold data costs ~20% of a large
/// all-reduce on loopback here. Headers are always checked.
pub const FLAG_PAYLOAD_UNCHECKED: u16 = 1;

/// Flag bits this version understands: any other set bit is an error rather
/// than silently ignored, so a future flag cannot change a payload's meaning
/// without a version bump.
pub const FLAGS_KNOWN: u16 = FLAG_PAYLOAD_UNCHECKED;

const MAGIC_AT: usize = 0;
const VERSION_AT: usize = 4;
const KIND_AT: usize = 5;
const FLAGS_AT: usize = 6;
const TAG_AT: usize = 8;
const SENDER_AT: usize = 16;
const PAYLOAD_BYTES_AT: usize = 20;
const PAYLOAD_CRC_AT: usize = 24;
const HEADER_CRC_AT: usize = 28;

/// What a frame's payload holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// A postcard-encoded control message (see [`crate::encode_control`]).
    Control = 1,
    /// Raw little-endian f32 values; the length is a multiple of 4.
    Tensor = 2,
    /// A step of the authentication handshake (see [`crate::auth`]).
    Auth = 3,
    /// A parameter-server request or reply: a fixed binary head, keys and raw
    /// f32 values (the `ps` crate's `msg` module owns the layout).
    Ps = 4,
}

impl MessageType {
    /// Every message type, for tests and exhaustive checks.
    pub const ALL: [MessageType; 4] = [
        MessageType::Control,
        MessageType::Tensor,
        MessageType::Auth,
        MessageType::Ps,
    ];

    /// The type encoded as `byte`, if any. Zero is never a valid type, so a
    /// zeroed buffer is rejected.
    pub fn from_u8(byte: u8) -> Option<MessageType> {
        match byte {
            1 => Some(MessageType::Control),
            2 => Some(MessageType::Tensor),
            3 => Some(MessageType::Auth),
            4 => Some(MessageType::Ps),
            _ => None,
        }
    }

    /// The largest payload a frame of this type may carry.
    pub fn payload_bytes_max(self) -> u32 {
        match self {
            MessageType::Control => CONTROL_PAYLOAD_BYTES_MAX,
            MessageType::Tensor => TENSOR_PAYLOAD_BYTES_MAX,
            MessageType::Auth => AUTH_PAYLOAD_BYTES_MAX,
            MessageType::Ps => TENSOR_PAYLOAD_BYTES_MAX,
        }
    }
}

impl std::fmt::Display for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            MessageType::Control => "control",
            MessageType::Tensor => "tensor",
            MessageType::Auth => "auth",
            MessageType::Ps => "ps",
        };
        f.write_str(name)
    }
}

/// A decoded, validated frame header. The magic, version and header crc are
/// not fields: [`FrameHeader::encode`] writes them and [`FrameHeader::decode`]
/// checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    pub kind: MessageType,
    pub flags: u16,
    /// The collective operation, step and chunk the payload belongs to.
    /// Opaque to this crate.
    pub tag: u64,
    /// The sender's rank.
    pub sender: u32,
    pub payload_bytes: u32,
    /// crc32c of the payload.
    pub payload_crc: u32,
}

impl FrameHeader {
    /// The header for `payload`: checks the length against the type's limit
    /// (and alignment for tensors) and computes the payload crc.
    pub fn new(kind: MessageType, tag: u64, sender: u32, payload: &[u8]) -> Result<FrameHeader, WireError> {
        let payload_bytes = check_payload_bytes(kind, payload.len())?;
        Ok(FrameHeader {
            kind,
            flags: 0,
            tag,
            sender,
            payload_bytes,
            payload_crc: payload_crc(payload),
        })
    }

    /// The header for a tensor chunk, ready to be written before `payload`.
    pub fn tensor(tag: u64, sender: u32, payload: &[u8]) -> Result<FrameHeader, WireError> {
        FrameHeader::new(MessageType::Tensor, tag, sender, payload)
    }

    /// A tensor header whose payload crc is neither computed nor checked
    /// (see [`FLAG_PAYLOAD_UNCHECKED`]).
    pub fn tensor_unchecked(tag: u64, sender: u32, payload_bytes: usize) -> Result<FrameHeader, WireError> {
        let payload_bytes = check_payload_bytes(MessageType::Tensor, payload_bytes)?;
        Ok(FrameHeader {
            kind: MessageType::Tensor,
            flags: FLAG_PAYLOAD_UNCHECKED,
            tag,
            sender,
            payload_bytes,
            payload_crc: 0,
        })
    }

    /// Whether the payload carries a crc to check.
    pub fn payload_checked(&self) -> bool {
        self.flags & FLAG_PAYLOAD_UNCHECKED == 0
    }

    /// The 32 header bytes, header crc included.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut bytes = [0u8; HEADER_BYTES];
        bytes[MAGIC_AT..MAGIC_AT + 4].copy_from_slice(&MAGIC);
        bytes[VERSION_AT] = PROTOCOL_VERSION;
        bytes[KIND_AT] = self.kind as u8;
        bytes[FLAGS_AT..FLAGS_AT + 2].copy_from_slice(&self.flags.to_le_bytes());
        bytes[TAG_AT..TAG_AT + 8].copy_from_slice(&self.tag.to_le_bytes());
        bytes[SENDER_AT..SENDER_AT + 4].copy_from_slice(&self.sender.to_le_bytes());
        bytes[PAYLOAD_BYTES_AT..PAYLOAD_BYTES_AT + 4].copy_from_slice(&self.payload_bytes.to_le_bytes());
        bytes[PAYLOAD_CRC_AT..PAYLOAD_CRC_AT + 4].copy_from_slice(&self.payload_crc.to_le_bytes());
        let header_crc = crate::crc::crc32c(&bytes[..HEADER_CRC_AT]);
        bytes[HEADER_CRC_AT..].copy_from_slice(&header_crc.to_le_bytes());
        bytes
    }

    /// Parses and validates 32 received bytes.
    ///
    /// Checks, in order: magic, version, header crc, message type, flags,
    /// payload length. The version comes before the crc because the version
    /// defines where the crc is; so a peer running another version gets a
    /// version error naming both, not a crc error.
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<FrameHeader, WireError> {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(WireError::BadMagic { got: magic });
        }
        let version = bytes[VERSION_AT];
        if version != PROTOCOL_VERSION {
            return Err(WireError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        let stored = read_u32(bytes, HEADER_CRC_AT);
        let computed = crate::crc::crc32c(&bytes[..HEADER_CRC_AT]);
        if stored != computed {
            return Err(WireError::HeaderCrc { stored, computed });
        }
        let kind_byte = bytes[KIND_AT];
        let kind = MessageType::from_u8(kind_byte).ok_or(WireError::UnknownMessageType { got: kind_byte })?;
        let flags = u16::from_le_bytes([bytes[FLAGS_AT], bytes[FLAGS_AT + 1]]);
        if flags & !FLAGS_KNOWN != 0 {
            return Err(WireError::UnknownFlags {
                got: flags,
                known: FLAGS_KNOWN,
            });
        }
        let payload_bytes = read_u32(bytes, PAYLOAD_BYTES_AT);
        check_payload_bytes(kind, payload_bytes as usize)?;
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&bytes[TAG_AT..TAG_AT + 8]);
        Ok(FrameHeader {
            kind,
            flags,
            tag: u64::from_le_bytes(tag),
            sender: read_u32(bytes, SENDER_AT),
            payload_bytes,
            payload_crc: read_u32(bytes, PAYLOAD_CRC_AT),
        })
    }

    /// Checks a received payload's length and crc against this header.
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), WireError> {
        if payload.len() != self.payload_bytes as usize {
            return Err(WireError::PayloadLength {
                kind: self.kind,
                sender: self.sender,
                expected: self.payload_bytes,
                got: payload.len(),
            });
        }
        self.check_payload_crc(payload_crc(payload))
    }

    /// Checks a crc the caller computed itself, for example with
    /// [`payload_crc_append`] over chunks as they arrived.
    pub fn check_payload_crc(&self, computed: u32) -> Result<(), WireError> {
        if self.payload_checked() && computed != self.payload_crc {
            return Err(WireError::PayloadCrc {
                kind: self.kind,
                tag: self.tag,
                sender: self.sender,
                stored: self.payload_crc,
                computed,
            });
        }
        Ok(())
    }
}

/// crc32c of a payload ([`crate::crc32c`]: carry-less multiply folding where the CPU has it).
pub fn payload_crc(payload: &[u8]) -> u32 {
    crate::crc::crc32c(payload)
}

/// Extends `crc` (start from 0) with `chunk`: the crc of a payload read in
/// pieces equals [`payload_crc`] of the whole.
pub fn payload_crc_append(crc: u32, chunk: &[u8]) -> u32 {
    crate::crc::crc32c_append(crc, chunk)
}

/// The payload length as a u32 if `kind` allows it.
pub(crate) fn check_payload_bytes(kind: MessageType, bytes: usize) -> Result<u32, WireError> {
    let max = kind.payload_bytes_max();
    let Ok(bytes_u32) = u32::try_from(bytes) else {
        return Err(WireError::PayloadTooLarge {
            kind,
            bytes: bytes as u64,
            max,
        });
    };
    if bytes_u32 > max {
        return Err(WireError::PayloadTooLarge {
            kind,
            bytes: u64::from(bytes_u32),
            max,
        });
    }
    if kind == MessageType::Tensor && bytes_u32 % 4 != 0 {
        return Err(WireError::TensorPayloadMisaligned { bytes: bytes_u32 });
    }
    Ok(bytes_u32)
}

fn read_u32(bytes: &[u8; HEADER_BYTES], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> FrameHeader {
        FrameHeader::tensor(0x0102_0304_0506_0708, 7, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap()
    }

    /// Recomputes the header crc after a test has changed a field.
    fn reseal(bytes: &mut [u8; HEADER_BYTES]) {
        let crc = crc32c::crc32c(&bytes[..HEADER_CRC_AT]);
        bytes[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn layout_matches_the_documented_table() {
        let header = sample();
        let bytes = header.encode();
        assert_eq!(&bytes[0..4], b"SNTR");
        assert_eq!(bytes[4], PROTOCOL_VERSION);
        assert_eq!(bytes[5], 2);
        assert_eq!(&bytes[6..8], &[0, 0]);
        assert_eq!(&bytes[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&bytes[16..20], &[7, 0, 0, 0]);
        assert_eq!(&bytes[20..24], &[8, 0, 0, 0]);
        assert_eq!(&bytes[24..28], &payload_crc(&[1, 2, 3, 4, 5, 6, 7, 8]).to_le_bytes());
        assert_eq!(&bytes[28..32], &crc32c::crc32c(&bytes[..28]).to_le_bytes());
    }

    #[test]
    fn round_trips_every_type() {
        for kind in MessageType::ALL {
            let header = FrameHeader::new(kind, u64::MAX, u32::MAX, &[0; 16]).unwrap();
            assert_eq!(FrameHeader::decode(&header.encode()).unwrap(), header);
        }
    }

    #[test]
    fn bad_magic_is_named() {
        let mut bytes = sample().encode();
        bytes[0] = b'H';
        let error = FrameHeader::decode(&bytes).unwrap_err();
        assert!(
            matches!(error, WireError::BadMagic { got } if got == *b"HNTR"),
            "{error:?}"
        );
        assert!(error.to_string().contains("magic"), "{error}");
    }

    #[test]
    fn other_version_names_both_versions() {
        let mut bytes = sample().encode();
        bytes[VERSION_AT] = 1;
        let error = FrameHeader::decode(&bytes).unwrap_err();
        assert!(
            matches!(error, WireError::VersionMismatch { ours: 3, theirs: 1 }),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "protocol version: peer speaks version 1, this build speaks version 3"
        );
    }

    #[test]
    fn unknown_type_is_named() {
        for got in [0, 5, 255] {
            let mut bytes = sample().encode();
            bytes[KIND_AT] = got;
            reseal(&mut bytes);
            let error = FrameHeader::decode(&bytes).unwrap_err();
            assert!(
                matches!(error, WireError::UnknownMessageType { got: g } if g == got),
                "{error:?}"
            );
            assert!(error.to_string().contains("message type"), "{error}");
        }
    }

    #[test]
    fn unchecked_payloads_skip_only_the_payload_crc() {
        let h = FrameHeader::tensor_unchecked(7, 1, 8).expect("valid");
        let back = FrameHeader::decode(&h.encode()).expect("valid header");
        assert!(!back.payload_checked());
        assert!(back.check_payload(&[9u8; 8]).is_ok());
        assert!(back.check_payload(&[9u8; 4]).is_err(), "length is still checked");
        let mut bytes = h.encode();
        bytes[TAG_AT] ^= 1;
        assert!(FrameHeader::decode(&bytes).is_err(), "header crc is still checked");
    }

    #[test]
    fn unknown_flags_are_rejected() {
        let mut bytes = sample().encode();
        bytes[FLAGS_AT] = 2;
        reseal(&mut bytes);
        let error = FrameHeader::decode(&bytes).unwrap_err();
        assert!(
            matches!(
                error,
                WireError::UnknownFlags {
                    got: 2,
                    known: FLAGS_KNOWN
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn any_flipped_bit_after_the_version_is_a_header_crc_error() {
        let clean = sample().encode();
        for bit in (VERSION_AT + 1) * 8..HEADER_BYTES * 8 {
            let mut bytes = clean;
            bytes[bit / 8] ^= 1 << (bit % 8);
            let error = FrameHeader::decode(&bytes).unwrap_err();
            assert!(matches!(error, WireError::HeaderCrc { .. }), "bit {bit}: {error:?}");
            assert!(error.to_string().contains("header crc"), "{error}");
        }
    }

    #[test]
    fn oversized_lengths_are_rejected_with_the_limit() {
        let cases = [
            (MessageType::Control, CONTROL_PAYLOAD_BYTES_MAX + 1),
            (MessageType::Tensor, TENSOR_PAYLOAD_BYTES_MAX + 4),
            (MessageType::Auth, AUTH_PAYLOAD_BYTES_MAX + 1),
            (MessageType::Ps, TENSOR_PAYLOAD_BYTES_MAX + 1),
            (MessageType::Control, u32::MAX),
        ];
        for (kind, bytes_claimed) in cases {
            let mut bytes = FrameHeader::new(kind, 0, 0, &[]).unwrap().encode();
            bytes[PAYLOAD_BYTES_AT..PAYLOAD_BYTES_AT + 4].copy_from_slice(&bytes_claimed.to_le_bytes());
            reseal(&mut bytes);
            let error = FrameHeader::decode(&bytes).unwrap_err();
            let expected_max = kind.payload_bytes_max();
            assert!(
                matches!(error, WireError::PayloadTooLarge { kind: k, bytes: b, max }
                    if k == kind && b == u64::from(bytes_claimed) && max == expected_max),
                "{error:?}"
            );
            assert!(error.to_string().contains("payload length"), "{error}");
        }
    }

    #[test]
    fn limits_are_inclusive() {
        let mut bytes = FrameHeader::new(MessageType::Control, 0, 0, &[]).unwrap().encode();
        bytes[PAYLOAD_BYTES_AT..PAYLOAD_BYTES_AT + 4].copy_from_slice(&CONTROL_PAYLOAD_BYTES_MAX.to_le_bytes());
        reseal(&mut bytes);
        assert_eq!(
            FrameHeader::decode(&bytes).unwrap().payload_bytes,
            CONTROL_PAYLOAD_BYTES_MAX
        );
    }

    #[test]
    fn tensor_payloads_are_whole_f32s() {
        let error = FrameHeader::tensor(0, 0, &[0; 6]).unwrap_err();
        assert!(
            matches!(error, WireError::TensorPayloadMisaligned { bytes: 6 }),
            "{error:?}"
        );
        let mut bytes = sample().encode();
        bytes[PAYLOAD_BYTES_AT] = 9;
        reseal(&mut bytes);
        let error = FrameHeader::decode(&bytes).unwrap_err();
        assert!(
            matches!(error, WireError::TensorPayloadMisaligned { bytes: 9 }),
            "{error:?}"
        );
    }

    #[test]
    fn new_refuses_oversized_payloads() {
        let payload = vec![0u8; AUTH_PAYLOAD_BYTES_MAX as usize + 1];
        let error = FrameHeader::new(MessageType::Auth, 0, 0, &payload).unwrap_err();
        assert!(
            matches!(
                error,
                WireError::PayloadTooLarge {
                    kind: MessageType::Auth,
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn payload_checks_name_length_and_crc() {
        let header = sample();
        header.check_payload(&[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let error = header.check_payload(&[1, 2, 3, 4, 5, 6, 7, 9]).unwrap_err();
        assert!(matches!(error, WireError::PayloadCrc { sender: 7, .. }), "{error:?}");
        assert!(error.to_string().contains("payload crc"), "{error}");
        let error = header.check_payload(&[1, 2, 3, 4]).unwrap_err();
        assert!(
            matches!(
                error,
                WireError::PayloadLength {
                    expected: 8,
                    got: 4,
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn crc_of_chunks_equals_crc_of_whole() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 31) as u8).collect();
        let whole = payload_crc(&payload);
        let chunked = payload.chunks(777).fold(0, payload_crc_append);
        assert_eq!(chunked, whole);
        sample_for(&payload).check_payload_crc(chunked).unwrap();
    }

    fn sample_for(payload: &[u8]) -> FrameHeader {
        FrameHeader::new(MessageType::Control, 0, 0, payload).unwrap()
    }

    fn any_header() -> impl Strategy<Value = FrameHeader> {
        (
            0..MessageType::ALL.len(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(|(kind, tag, sender, len, payload_crc)| {
                let kind = MessageType::ALL[kind];
                let payload_bytes = match kind {
                    MessageType::Tensor => len % (TENSOR_PAYLOAD_BYTES_MAX / 4 + 1) * 4,
                    _ => len % (kind.payload_bytes_max() + 1),
                };
                FrameHeader {
                    kind,
                    flags: 0,
                    tag,
                    sender,
                    payload_bytes,
                    payload_crc,
                }
            })
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(header in any_header()) {
            prop_assert_eq!(FrameHeader::decode(&header.encode()).unwrap(), header);
        }

        #[test]
        fn decode_never_panics(bytes in any::<[u8; HEADER_BYTES]>()) {
            let _ = FrameHeader::decode(&bytes);
        }

        /// Random bytes almost never pass the magic check; these do, so the
        /// later checks get exercised too.
        #[test]
        fn decode_never_panics_past_the_magic(mut bytes in any::<[u8; HEADER_BYTES]>(), seal in any::<bool>()) {
            bytes[..4].copy_from_slice(&MAGIC);
            bytes[VERSION_AT] = PROTOCOL_VERSION;
            if seal {
                reseal(&mut bytes);
            }
            if let Ok(header) = FrameHeader::decode(&bytes) {
                prop_assert_eq!(header.encode(), bytes);
            }
        }
    }
}
