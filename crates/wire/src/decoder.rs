//! `FrameDecoder`: turns a byte stream cut anywhere into whole, checked
//! frames, holding at most one frame (header plus a bounded payload) at a time.
//!
//! For control and authentication traffic. The tensor data path does not use
//! it: it reads the header, then `read_exact`s the payload into the
//! destination buffer and calls [`FrameHeader::check_payload`].

use crate::error::WireError;
use crate::header::{CONTROL_PAYLOAD_BYTES_MAX, FrameHeader, HEADER_BYTES, TENSOR_PAYLOAD_BYTES_MAX};

/// A complete frame whose header and payload crc have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: FrameHeader,
    pub payload: Vec<u8>,
}

/// Incremental frame decoder; see the module docs.
///
/// A header is validated as soon as its 32 bytes are in, so a bad magic,
/// version, crc or length is reported before any payload is buffered, and the
/// payload buffer is allocated only once its length is known to be within
/// this decoder's limit. After an error the stream cannot be resynchronised:
/// the decoder refuses further input and the connection must be closed.
#[derive(Debug)]
pub struct FrameDecoder {
    payload_bytes_max: u32,
    header_bytes: [u8; HEADER_BYTES],
    header_filled: usize,
    /// The header of the frame whose payload is being read.
    current: Option<FrameHeader>,
    payload: Vec<u8>,
    poisoned: bool,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new()
    }
}

impl FrameDecoder {
    /// A decoder for control traffic: payloads up to [`CONTROL_PAYLOAD_BYTES_MAX`].
    pub fn new() -> FrameDecoder {
        FrameDecoder::with_payload_bytes_max(CONTROL_PAYLOAD_BYTES_MAX)
    }

    /// A decoder that also rejects any frame whose payload is over
    /// `payload_bytes_max`, whatever its type allows.
    pub fn with_payload_bytes_max(payload_bytes_max: u32) -> FrameDecoder {
        assert!(
            payload_bytes_max <= TENSOR_PAYLOAD_BYTES_MAX,
            "decoder limit {payload_bytes_max} over the protocol maximum"
        );
        FrameDecoder {
            payload_bytes_max,
            header_bytes: [0; HEADER_BYTES],
            header_filled: 0,
            current: None,
            payload: Vec::new(),
            poisoned: false,
        }
    }

    /// Changes the limit for frames whose header has not yet been decoded,
    /// for example raising it from the handshake's to the control limit once
    /// the peer has authenticated.
    pub fn set_payload_bytes_max(&mut self, payload_bytes_max: u32) {
        assert!(
            payload_bytes_max <= TENSOR_PAYLOAD_BYTES_MAX,
            "decoder limit {payload_bytes_max} over the protocol maximum"
        );
        self.payload_bytes_max = payload_bytes_max;
    }

    /// Takes bytes from the front of `input` and returns the next complete
    /// frame, if one is finished. Returns `Ok(None)` only once `input` is
    /// empty, so the usual loop is
    /// `while let Some(frame) = decoder.decode(&mut input)? { .. }`.
    /// Never takes bytes beyond the end of the frame it returns.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, WireError> {
        if self.poisoned {
            return Err(WireError::DecoderPoisoned);
        }
        let result = self.decode_inner(input);
        if result.is_err() {
            self.poisoned = true;
            self.current = None;
            self.payload = Vec::new();
        }
        result
    }

    fn decode_inner(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, WireError> {
        loop {
            match self.current {
                None => {
                    let take = (HEADER_BYTES - self.header_filled).min(input.len());
                    let (head, rest) = input.split_at(take);
                    self.header_bytes[self.header_filled..self.header_filled + take].copy_from_slice(head);
                    self.header_filled += take;
                    *input = rest;
                    if self.header_filled < HEADER_BYTES {
                        return Ok(None);
                    }
                    let header = FrameHeader::decode(&self.header_bytes)?;
                    if header.payload_bytes > self.payload_bytes_max {
                        return Err(WireError::DecoderLimit {
                            bytes: header.payload_bytes,
                            max: self.payload_bytes_max,
                        });
                    }
                    self.header_filled = 0;
                    self.payload = Vec::with_capacity(header.payload_bytes as usize);
                    self.current = Some(header);
                }
                Some(header) => {
                    let needed = header.payload_bytes as usize;
                    let take = (needed - self.payload.len()).min(input.len());
                    let (head, rest) = input.split_at(take);
                    self.payload.extend_from_slice(head);
                    *input = rest;
                    if self.payload.len() < needed {
                        return Ok(None);
                    }
                    self.current = None;
                    let payload = std::mem::take(&mut self.payload);
                    header.check_payload(&payload)?;
                    return Ok(Some(Frame { header, payload }));
                }
            }
        }
    }

    /// Bytes held for the frame in progress (header bytes, or payload bytes
    /// once the header is decoded). At most `HEADER_BYTES + payload_bytes_max`.
    pub fn buffered_bytes(&self) -> usize {
        match self.current {
            None => self.header_filled,
            Some(_) => HEADER_BYTES + self.payload.len(),
        }
    }

    /// Call when the stream has ended: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.poisoned {
            return Err(WireError::DecoderPoisoned);
        }
        let needed = match self.current {
            None if self.header_filled == 0 => return Ok(()),
            None => HEADER_BYTES,
            Some(header) => HEADER_BYTES + header.payload_bytes as usize,
        };
        Err(WireError::Truncated {
            buffered: self.buffered_bytes(),
            needed,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::header::{AUTH_PAYLOAD_BYTES_MAX, MessageType};

    fn frame_bytes(kind: MessageType, tag: u64, payload: &[u8]) -> Vec<u8> {
        let header = FrameHeader::new(kind, tag, 3, payload).unwrap();
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(payload);
        bytes
    }

    /// Four frames of every type, one of them empty.
    fn valid_stream() -> Vec<u8> {
        let mut stream = frame_bytes(MessageType::Control, 0, b"hello");
        stream.extend(frame_bytes(MessageType::Tensor, 9, &[0; 4096]));
        stream.extend(frame_bytes(MessageType::Control, 1, &[]));
        stream.extend(frame_bytes(MessageType::Auth, 2, &[7; 40]));
        stream
    }

    /// Feeds `stream` cut at `cuts` and returns the frames, or the first error.
    fn decode_all(stream: &[u8], cuts: &[usize]) -> Result<Vec<Frame>, WireError> {
        let mut decoder = FrameDecoder::new();
        let mut frames = Vec::new();
        let mut start = 0;
        let mut ends: Vec<usize> = cuts.iter().map(|cut| cut % (stream.len() + 1)).collect();
        ends.sort_unstable();
        ends.push(stream.len());
        for end in ends {
            let mut input = &stream[start..end];
            while let Some(frame) = decoder.decode(&mut input)? {
                frames.push(frame);
            }
            assert!(input.is_empty());
            assert!(decoder.buffered_bytes() <= HEADER_BYTES + CONTROL_PAYLOAD_BYTES_MAX as usize);
            start = end;
        }
        decoder.finish()?;
        Ok(frames)
    }

    #[test]
    fn decodes_a_stream_in_one_piece_and_byte_by_byte() {
        let stream = valid_stream();
        let whole = decode_all(&stream, &[]).unwrap();
        let kinds: Vec<_> = whole.iter().map(|frame| frame.header.kind).collect();
        assert_eq!(
            kinds,
            [
                MessageType::Control,
                MessageType::Tensor,
                MessageType::Control,
                MessageType::Auth
            ]
        );
        assert_eq!(whole[0].payload, b"hello");
        assert!(whole[2].payload.is_empty());
        let cuts: Vec<usize> = (0..stream.len()).collect();
        assert_eq!(decode_all(&stream, &cuts).unwrap(), whole);
    }

    #[test]
    fn takes_no_bytes_past_the_frame_it_returns() {
        let stream = valid_stream();
        let first_len = HEADER_BYTES + 5;
        let mut decoder = FrameDecoder::new();
        let mut input = &stream[..];
        let frame = decoder.decode(&mut input).unwrap().unwrap();
        assert_eq!(frame.payload, b"hello");
        assert_eq!(input, &stream[first_len..]);
    }

    #[test]
    fn stream_ending_inside_a_frame_is_truncated() {
        let stream = valid_stream();
        for (end, needed) in [(10, HEADER_BYTES), (HEADER_BYTES + 2, HEADER_BYTES + 5)] {
            let mut decoder = FrameDecoder::new();
            let mut input = &stream[..end];
            assert_eq!(decoder.decode(&mut input).unwrap(), None);
            let error = decoder.finish().unwrap_err();
            assert!(
                matches!(error, WireError::Truncated { buffered, needed: n } if buffered == end && n == needed),
                "{error:?}"
            );
            assert!(error.to_string().contains("truncated"), "{error}");
        }
    }

    #[test]
    fn corrupt_payload_is_a_crc_error_and_poisons_the_decoder() {
        let mut stream = valid_stream();
        stream[HEADER_BYTES] ^= 0x20;
        let mut decoder = FrameDecoder::new();
        let mut input = &stream[..];
        let error = decoder.decode(&mut input).unwrap_err();
        assert!(
            matches!(
                error,
                WireError::PayloadCrc {
                    kind: MessageType::Control,
                    sender: 3,
                    ..
                }
            ),
            "{error:?}"
        );
        let error = decoder.decode(&mut input).unwrap_err();
        assert!(matches!(error, WireError::DecoderPoisoned), "{error:?}");
        assert!(matches!(decoder.finish(), Err(WireError::DecoderPoisoned)));
    }

    #[test]
    fn header_errors_arrive_before_the_payload() {
        let mut stream = frame_bytes(MessageType::Control, 0, b"payload");
        stream[0] = 0;
        let mut decoder = FrameDecoder::new();
        let error = decoder.decode(&mut &stream[..HEADER_BYTES]).unwrap_err();
        assert!(matches!(error, WireError::BadMagic { .. }), "{error:?}");
    }

    #[test]
    fn a_frame_over_the_decoder_limit_is_refused_before_buffering() {
        let header = FrameHeader {
            kind: MessageType::Tensor,
            flags: 0,
            tag: 0,
            sender: 1,
            payload_bytes: 2 << 20,
            payload_crc: 0,
        };
        let mut decoder = FrameDecoder::new();
        let error = decoder.decode(&mut &header.encode()[..]).unwrap_err();
        let max = CONTROL_PAYLOAD_BYTES_MAX;
        assert!(
            matches!(error, WireError::DecoderLimit { bytes, max: m } if bytes == 2 << 20 && m == max),
            "{error:?}"
        );

        let mut decoder = FrameDecoder::with_payload_bytes_max(AUTH_PAYLOAD_BYTES_MAX);
        let stream = frame_bytes(MessageType::Control, 0, &[0; 300]);
        assert!(matches!(
            decoder.decode(&mut &stream[..]),
            Err(WireError::DecoderLimit { bytes: 300, .. })
        ));
    }

    #[test]
    fn raising_the_limit_applies_to_the_next_header() {
        let stream = frame_bytes(MessageType::Control, 0, &[0; 300]);
        let mut decoder = FrameDecoder::with_payload_bytes_max(AUTH_PAYLOAD_BYTES_MAX);
        decoder.set_payload_bytes_max(CONTROL_PAYLOAD_BYTES_MAX);
        assert_eq!(decoder.decode(&mut &stream[..]).unwrap().unwrap().payload.len(), 300);
    }

    proptest! {
        #[test]
        fn any_fragmentation_gives_the_same_frames(cuts in proptest::collection::vec(any::<usize>(), 0..40)) {
            let stream = valid_stream();
            prop_assert_eq!(decode_all(&stream, &cuts).unwrap(), decode_all(&stream, &[]).unwrap());
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let _ = decode_all(&bytes, &cuts);
        }

        /// Arbitrary bytes rarely get past the magic; a valid stream with a
        /// few bytes overwritten exercises every later check.
        #[test]
        fn never_panics_on_a_corrupted_stream(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut stream = valid_stream();
            let len = stream.len();
            for (at, byte) in edits {
                stream[at % len] = byte;
            }
            let _ = decode_all(&stream, &cuts);
        }
    }
}
