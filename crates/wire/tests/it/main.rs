//! A whole connection in memory, as the `node` crate drives it: handshake,
//! control messages and a tensor chunk, through reads of awkward sizes.

use serde::{Deserialize, Serialize};
use wire::{
    Acceptor, AuthStep, Connector, FrameDecoder, FrameHeader, HEADER_BYTES, MessageType, PeerInfo, Role, Secret,
    decode_control, encode_control,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Hello {
    Ready { step: u64 },
}

const SERVER: PeerInfo = PeerInfo {
    role: Role::Server,
    rank: 1,
};
const WORKER: PeerInfo = PeerInfo {
    role: Role::Worker,
    rank: 5,
};

/// Delivers `bytes` to `on_read` in reads of `read_bytes`, like a socket.
fn deliver<T>(
    bytes: &[u8],
    read_bytes: usize,
    mut on_read: impl FnMut(&mut &[u8]) -> Option<T>,
) -> (Option<T>, Vec<u8>) {
    for (i, read) in bytes.chunks(read_bytes).enumerate() {
        let mut input = read;
        if let Some(done) = on_read(&mut input) {
            let rest_start = i * read_bytes + (read.len() - input.len());
            return (Some(done), bytes[rest_start..].to_vec());
        }
        assert!(input.is_empty());
    }
    (None, Vec::new())
}

#[test]
fn handshake_then_control_then_tensor_in_any_read_size() {
    let secret = Secret::new(b"a shared secret of 32 bytes.....".to_vec()).unwrap();
    for read_bytes in [1, 3, 7, 64, 4096] {
        let (mut acceptor, challenge) = Acceptor::new(&secret, SERVER, [1; 32]);
        let mut connector = Connector::new(&secret, WORKER, [2; 32]);

        let (step, _) = deliver(&challenge, read_bytes, |input| connector.on_bytes(input).unwrap());
        let Some(AuthStep::Send(response)) = step else {
            panic!("no response")
        };

        // The worker writes its first control message right behind its response.
        let mut worker_stream = response;
        worker_stream.extend(encode_control(WORKER.rank, &Hello::Ready { step: 3 }).unwrap());
        let (step, after_auth) = deliver(&worker_stream, read_bytes, |input| acceptor.on_bytes(input).unwrap());
        let Some(AuthStep::Authenticated {
            peer,
            send: Some(confirm),
        }) = step
        else {
            panic!("acceptor did not authenticate")
        };
        assert_eq!(peer, WORKER);

        let (step, _) = deliver(&confirm, read_bytes, |input| connector.on_bytes(input).unwrap());
        assert_eq!(
            step,
            Some(AuthStep::Authenticated {
                peer: SERVER,
                send: None
            })
        );

        let mut decoder = FrameDecoder::new();
        let (frame, _) = deliver(&after_auth, read_bytes, |input| decoder.decode(input).unwrap());
        let frame = frame.expect("the control message");
        assert_eq!(
            decode_control::<Hello>(&frame.header, &frame.payload).unwrap(),
            Hello::Ready { step: 3 }
        );

        // The data path: header, then the payload read straight into place.
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let payload: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let header = FrameHeader::tensor(0xabc, SERVER.rank, &payload).unwrap();
        let mut wire_bytes = header.encode().to_vec();
        wire_bytes.extend_from_slice(&payload);
        let received = FrameHeader::decode(wire_bytes[..HEADER_BYTES].try_into().unwrap()).unwrap();
        assert_eq!(
            (received.kind, received.tag, received.sender),
            (MessageType::Tensor, 0xabc, SERVER.rank)
        );
        let mut destination = vec![0u8; received.payload_bytes as usize];
        destination.copy_from_slice(&wire_bytes[HEADER_BYTES..]);
        received.check_payload(&destination).unwrap();
    }
}
