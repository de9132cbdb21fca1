//! Fuzz target: arbitrary bytes, cut into reads of any size, into
//! `FrameDecoder` + `decode_control` (every control message a peer's first
//! frame after the handshake can hold) and into both handshake state machines.
//! Nothing may panic, and every frame that comes out must satisfy the limits.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use wire::{
    AUTH_PAYLOAD_BYTES_MAX, Acceptor, CONTROL_PAYLOAD_BYTES_MAX, Connector, FrameDecoder, FrameHeader, HEADER_BYTES,
    MAGIC, MessageType, PROTOCOL_VERSION, PeerInfo, Role, Secret, crc32c, decode_control,
};

/// A stand-in for the coordinator's messages: strings, sequences, options and
/// nesting, the shapes postcard has to bound.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
enum Message {
    Join { rank: u32, addr: String },
    Members(Vec<(u32, String)>),
    Step { step: u64, loss: f32, note: Option<String> },
    Blob(Vec<u8>),
}

const ME: PeerInfo = PeerInfo {
    role: Role::Server,
    rank: 0,
};

fuzz_target!(|data: &[u8]| {
    let Some((&control, data)) = data.split_first() else {
        return;
    };
    header_round_trip(data);
    let read_bytes = usize::from(control & 0x3f) + 1;
    let stream = if control & 0x80 != 0 {
        framed(data)
    } else {
        data.to_vec()
    };

    let mut decoder = FrameDecoder::new();
    'reads: for read in stream.chunks(read_bytes) {
        let mut input = read;
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(frame)) => {
                    assert_eq!(frame.payload.len(), frame.header.payload_bytes as usize);
                    assert!(frame.header.payload_bytes <= CONTROL_PAYLOAD_BYTES_MAX);
                    assert_eq!(FrameHeader::decode(&frame.header.encode()).ok(), Some(frame.header));
                    let _ = decode_control::<Message>(&frame.header, &frame.payload);
                    // The real control messages (replication's `ServerRole`, `BuildBackup`,
                    // `Promote`, `BackupReady` among them): decoding and bound checks never panic.
                    if let Ok(m) = decode_control::<wire::msg::FromCoordinator>(&frame.header, &frame.payload) {
                        let _ = m.check();
                    }
                    if let Ok(m) = decode_control::<wire::msg::ToCoordinator>(&frame.header, &frame.payload) {
                        let _ = m.check();
                    }
                    // The first frames on a worker-to-worker data connection after
                    // authentication: the dialer's hello and the lower rank's answers.
                    if let Ok(m) = decode_control::<wire::msg::PeerHello>(&frame.header, &frame.payload) {
                        let _ = m.check();
                    }
                    if let Ok(m) = decode_control::<wire::msg::PeerLink>(&frame.header, &frame.payload) {
                        let _ = m.check();
                    }
                    let _ = decode_control::<wire::msg::ShmAck>(&frame.header, &frame.payload);
                }
                Ok(None) => break,
                Err(_) => break 'reads,
            }
        }
        assert!(input.is_empty());
        assert!(decoder.buffered_bytes() <= HEADER_BYTES + CONTROL_PAYLOAD_BYTES_MAX as usize);
    }
    let _ = decoder.finish();

    let secret = Secret::new(vec![7; 32]).expect("a 32-byte secret is long enough");
    let (mut acceptor, _challenge) = Acceptor::new(&secret, ME, [1; 32]);
    let mut connector = Connector::new(&secret, ME, [2; 32]);
    for read in stream.chunks(read_bytes) {
        let mut input = read;
        let _ = acceptor.on_bytes(&mut input);
        let mut input = read;
        let _ = connector.on_bytes(&mut input);
    }
});

/// Wraps pieces of the input (split at 0xff) in valid frames, alternating
/// control and auth, so that the fuzzer reaches postcard and the handshake
/// parser without having to forge crcs.
fn framed(data: &[u8]) -> Vec<u8> {
    let mut stream = Vec::new();
    for (i, piece) in data.split(|&byte| byte == 0xff).enumerate() {
        let kind = if i % 2 == 0 {
            MessageType::Control
        } else {
            MessageType::Auth
        };
        if kind == MessageType::Auth && piece.len() > AUTH_PAYLOAD_BYTES_MAX as usize {
            continue;
        }
        if let Ok(header) = FrameHeader::new(kind, i as u64, 0, piece) {
            stream.extend_from_slice(&header.encode());
            stream.extend_from_slice(piece);
        }
    }
    stream
}

/// `FrameHeader::decode` on the first 32 bytes as they are, then with magic,
/// version and header crc made valid so that the checks behind the crc (type,
/// flags, length against the type's limit) see arbitrary values. A header that
/// decodes must encode back to the same bytes: no two byte strings mean one header.
fn header_round_trip(data: &[u8]) {
    let mut bytes = [0u8; HEADER_BYTES];
    let n = data.len().min(HEADER_BYTES);
    bytes[..n].copy_from_slice(&data[..n]);
    if let Ok(header) = FrameHeader::decode(&bytes) {
        assert_eq!(header.encode(), bytes);
    }
    bytes[..4].copy_from_slice(&MAGIC);
    bytes[4] = PROTOCOL_VERSION;
    let crc = crc32c(&bytes[..HEADER_BYTES - 4]);
    bytes[HEADER_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    match FrameHeader::decode(&bytes) {
        Ok(header) => {
            assert_eq!(header.encode(), bytes);
            assert!(header.payload_bytes <= header.kind.payload_bytes_max());
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}
