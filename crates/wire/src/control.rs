//! Control messages: any serde type, postcard-encoded, in a `Control` frame.
//! Tensors never go through here.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::WireError;
use crate::header::{FrameHeader, HEADER_BYTES, MessageType, check_payload_bytes};

/// The tag of control frames: control messages carry their own identifiers.
const CONTROL_TAG: u64 = 0;

/// One whole frame (header then postcard payload) ready to write.
/// Fails if the encoded message is over [`crate::CONTROL_PAYLOAD_BYTES_MAX`].
pub fn encode_control<T: Serialize>(sender: u32, message: &T) -> Result<Vec<u8>, WireError> {
    let mut frame =
        postcard::to_extend(message, vec![0u8; HEADER_BYTES]).map_err(|source| WireError::ControlEncode { source })?;
    let header = FrameHeader::new(MessageType::Control, CONTROL_TAG, sender, &frame[HEADER_BYTES..])?;
    frame[..HEADER_BYTES].copy_from_slice(&header.encode());
    Ok(frame)
}

/// The message in a control frame. Checks the type, length and crc (so the
/// payload need not have come through a [`crate::FrameDecoder`]) and rejects
/// trailing bytes.
pub fn decode_control<T: DeserializeOwned>(header: &FrameHeader, payload: &[u8]) -> Result<T, WireError> {
    if header.kind != MessageType::Control {
        return Err(WireError::WrongMessageType {
            expected: MessageType::Control,
            got: header.kind,
            sender: header.sender,
        });
    }
    check_payload_bytes(MessageType::Control, payload.len())?;
    header.check_payload(payload)?;
    let (message, rest) = postcard::take_from_bytes(payload).map_err(|source| WireError::ControlDecode {
        sender: header.sender,
        source,
    })?;
    if !rest.is_empty() {
        return Err(WireError::ControlTrailingBytes {
            sender: header.sender,
            bytes: rest.len(),
        });
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde::Deserialize;

    use super::*;
    use crate::decoder::FrameDecoder;
    use crate::header::CONTROL_PAYLOAD_BYTES_MAX;

    /// A stand-in for the coordinator's messages, which live elsewhere.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum TestMessage {
        Join { rank: u32, addr: String },
        Step { step: u64, loss: f32 },
        Members(Vec<u32>),
        Blob(Vec<u8>),
    }

    fn header_and_payload(frame: &[u8]) -> (FrameHeader, &[u8]) {
        let (head, payload) = frame.split_at(HEADER_BYTES);
        (FrameHeader::decode(head.try_into().unwrap()).unwrap(), payload)
    }

    #[test]
    fn round_trips_through_the_decoder() {
        let messages = [
            TestMessage::Join {
                rank: 4,
                addr: "127.0.0.1:7070".into(),
            },
            TestMessage::Step { step: 12, loss: 0.25 },
            TestMessage::Members(vec![0, 1, 2]),
        ];
        let mut stream = Vec::new();
        for message in &messages {
            stream.extend(encode_control(5, message).unwrap());
        }
        let mut decoder = FrameDecoder::new();
        let mut input = &stream[..];
        let mut got = Vec::new();
        while let Some(frame) = decoder.decode(&mut input).unwrap() {
            assert_eq!(frame.header.sender, 5);
            got.push(decode_control::<TestMessage>(&frame.header, &frame.payload).unwrap());
        }
        assert_eq!(got, messages);
    }

    #[test]
    fn refuses_to_encode_an_oversized_message() {
        let message = TestMessage::Blob(vec![0; CONTROL_PAYLOAD_BYTES_MAX as usize]);
        let error = encode_control(0, &message).unwrap_err();
        assert!(
            matches!(
                error,
                WireError::PayloadTooLarge {
                    kind: MessageType::Control,
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn refuses_a_tensor_frame() {
        let header = FrameHeader::tensor(0, 2, &[0; 4]).unwrap();
        let error = decode_control::<TestMessage>(&header, &[0; 4]).unwrap_err();
        assert!(
            matches!(
                error,
                WireError::WrongMessageType {
                    expected: MessageType::Control,
                    got: MessageType::Tensor,
                    sender: 2
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn checks_the_payload_crc() {
        let mut frame = encode_control(1, &TestMessage::Members(vec![1, 2, 3])).unwrap();
        let last = frame.len() - 1;
        frame[last] ^= 1;
        let (header, payload) = header_and_payload(&frame);
        let error = decode_control::<TestMessage>(&header, payload).unwrap_err();
        assert!(matches!(error, WireError::PayloadCrc { .. }), "{error:?}");
    }

    #[test]
    fn rejects_trailing_bytes_and_garbage() {
        let mut payload = postcard::to_allocvec(&TestMessage::Members(vec![1])).unwrap();
        payload.push(0);
        let header = FrameHeader::new(MessageType::Control, 0, 6, &payload).unwrap();
        let error = decode_control::<TestMessage>(&header, &payload).unwrap_err();
        assert!(
            matches!(error, WireError::ControlTrailingBytes { sender: 6, bytes: 1 }),
            "{error:?}"
        );

        let garbage = [200u8, 1, 2];
        let header = FrameHeader::new(MessageType::Control, 0, 6, &garbage).unwrap();
        let error = decode_control::<TestMessage>(&header, &garbage).unwrap_err();
        assert!(matches!(error, WireError::ControlDecode { sender: 6, .. }), "{error:?}");
    }

    proptest! {
        #[test]
        fn decode_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let header = FrameHeader::new(MessageType::Control, 0, 0, &payload).unwrap();
            let _ = decode_control::<TestMessage>(&header, &payload);
        }

        #[test]
        fn decode_inverts_encode(step in any::<u64>(), loss in any::<f32>().prop_filter("NaN != NaN", |l| !l.is_nan())) {
            let message = TestMessage::Step { step, loss };
            let frame = encode_control(9, &message).unwrap();
            let (header, payload) = header_and_payload(&frame);
            prop_assert_eq!(decode_control::<TestMessage>(&header, payload).unwrap(), message);
        }
    }
}
