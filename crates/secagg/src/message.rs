//! The messages clients and the server exchange, serde-serializable so that a
//! runtime can carry them in frames. The sender of a client's message is the
//! connection it came on, never a field of the message.

use serde::{Deserialize, Serialize};

use crate::{ClientId, Round, ShareValue};

/// A client's two X25519 public keys for one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PublicKeys {
    /// c_u^PK: agreed with each peer's into the key that encrypts their shares.
    pub cipher: [u8; 32],
    /// s_u^PK: agreed with each peer's into the seed of their pairwise mask.
    pub mask: [u8; 32],
}

/// One client's advertised keys, as the server relays them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClientKeys {
    pub client: ClientId,
    pub keys: PublicKeys,
}

/// Shares encrypted by one client for another, carried by the server.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SealedShares {
    /// The recipient in [`ClientMessage::ShareKeys`], the sender in
    /// [`ServerMessage::Shares`].
    pub peer: ClientId,
    /// [`crate::SHARE_CIPHERTEXT_BYTES`] bytes of ChaCha20-Poly1305.
    pub ciphertext: Vec<u8>,
}

/// What a client sends the server, one per round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Round 0: the client's public keys.
    AdvertiseKeys(PublicKeys),
    /// Round 1: for every other client that advertised keys, in ascending
    /// order, its shares of this client's self-mask seed and mask key.
    ShareKeys(Vec<SealedShares>),
    /// Round 2: the input under its masks, y_u, in Z_{2^32}.
    MaskedInput(#[serde(with = "le_words")] Vec<u32>),
    /// Round 3: the shares the server asked for, in the order of its
    /// [`ServerMessage::Unmask`] lists.
    Unmasking {
        /// A share of b_v for each v in `survivors`.
        self_mask_shares: Vec<ShareValue>,
        /// A share of s_v^SK for each v in `dropped`.
        key_shares: Vec<ShareValue>,
    },
}

/// What the server sends a client; each starts the round of the reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// Starts round 1: the keys of every client that advertised (U1), in
    /// ascending order, the recipient's own among them.
    Keys(Vec<ClientKeys>),
    /// Starts round 2: what every other client that shared (U2) encrypted
    /// for the recipient, in ascending order of sender.
    Shares(Vec<SealedShares>),
    /// Starts round 3: the clients whose masked inputs are in the sum (U3)
    /// and those of U2 that sent none; both ascending, together U2.
    Unmask {
        survivors: Vec<ClientId>,
        dropped: Vec<ClientId>,
    },
}

impl ClientMessage {
    /// The round this message answers.
    pub fn round(&self) -> Round {
        match self {
            ClientMessage::AdvertiseKeys(_) => Round::AdvertiseKeys,
            ClientMessage::ShareKeys(_) => Round::ShareKeys,
            ClientMessage::MaskedInput(_) => Round::MaskedInputCollection,
            ClientMessage::Unmasking { .. } => Round::Unmasking,
        }
    }
}

impl ServerMessage {
    /// The round this message starts.
    pub fn round(&self) -> Round {
        match self {
            ServerMessage::Keys(_) => Round::ShareKeys,
            ServerMessage::Shares(_) => Round::MaskedInputCollection,
            ServerMessage::Unmask { .. } => Round::Unmasking,
        }
    }
}

/// A vector of u32 as one byte string of little-endian words, 4 bytes each
/// whatever the encoding's integer format (postcard would otherwise spend
/// five on a uniformly random word).
mod le_words {
    use std::fmt;

    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    use crate::VECTOR_LEN_MAX;

    const BYTES_MAX: usize = 4 * VECTOR_LEN_MAX as usize;

    pub(super) fn serialize<S: Serializer>(words: &[u32], serializer: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = words.iter().flat_map(|word| word.to_le_bytes()).collect();
        serializer.serialize_bytes(&bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
        deserializer.deserialize_bytes(WordsVisitor)
    }

    struct WordsVisitor;

    fn words<E: de::Error>(bytes: &[u8]) -> Result<Vec<u32>, E> {
        if !bytes.len().is_multiple_of(4) || bytes.len() > BYTES_MAX {
            return Err(E::invalid_length(bytes.len(), &WordsVisitor));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|le| u32::from_le_bytes([le[0], le[1], le[2], le[3]]))
            .collect())
    }

    impl<'de> Visitor<'de> for WordsVisitor {
        type Value = Vec<u32>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a multiple of 4 bytes, at most {BYTES_MAX}")
        }

        fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Vec<u32>, E> {
            words(bytes)
        }

        // Self-describing formats such as JSON write bytes as a sequence.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u32>, A::Error> {
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(BYTES_MAX));
            while let Some(byte) = seq.next_element::<u8>()? {
                if bytes.len() == BYTES_MAX {
                    return Err(de::Error::invalid_length(BYTES_MAX + 1, &self));
                }
                bytes.push(byte);
            }
            words(&bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn masked_input_costs_four_bytes_a_word() {
        let message = ClientMessage::MaskedInput(vec![u32::MAX, 0, 0x0102_0304]);
        let bytes = postcard::to_allocvec(&message).unwrap();
        // Variant 2, length 12, then the words little-endian.
        assert_eq!(bytes, [2, 12, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 4, 3, 2, 1]);
        assert_eq!(postcard::from_bytes::<ClientMessage>(&bytes).unwrap(), message);
        let json = serde_json::to_string(&message).unwrap();
        assert_eq!(serde_json::from_str::<ClientMessage>(&json).unwrap(), message);
    }

    #[test]
    fn a_ragged_masked_input_is_refused() {
        // Length 3: not a whole word.
        assert!(postcard::from_bytes::<ClientMessage>(&[2, 3, 1, 2, 3]).is_err());
    }

    #[test]
    fn every_message_round_trips() {
        let keys = PublicKeys {
            cipher: [1; 32],
            mask: [2; 32],
        };
        let sealed = SealedShares {
            peer: 4,
            ciphertext: vec![9; crate::SHARE_CIPHERTEXT_BYTES],
        };
        let client = [
            ClientMessage::AdvertiseKeys(keys),
            ClientMessage::ShareKeys(vec![sealed.clone()]),
            ClientMessage::Unmasking {
                self_mask_shares: vec![[1, 2, 3, 4, 5]],
                key_shares: vec![],
            },
        ];
        for message in client {
            let bytes = postcard::to_allocvec(&message).unwrap();
            assert_eq!(postcard::from_bytes::<ClientMessage>(&bytes).unwrap(), message);
        }
        let server = [
            ServerMessage::Keys(vec![ClientKeys { client: 3, keys }]),
            ServerMessage::Shares(vec![sealed]),
            ServerMessage::Unmask {
                survivors: vec![0, 2],
                dropped: vec![1],
            },
        ];
        for message in server {
            let bytes = postcard::to_allocvec(&message).unwrap();
            assert_eq!(postcard::from_bytes::<ServerMessage>(&bytes).unwrap(), message);
        }
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = postcard::from_bytes::<ClientMessage>(&bytes);
            let _ = postcard::from_bytes::<ServerMessage>(&bytes);
        }
    }
}
