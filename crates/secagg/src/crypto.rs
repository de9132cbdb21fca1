//! The protocol's primitives: X25519 key agreement, HKDF-SHA256 key
//! derivation, ChaCha20-Poly1305 for the shares one client sends another,
//! and the ChaCha20 keystream that expands a seed into a mask.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::ClientId;
use crate::shamir::{SHARE_WORDS, ShareValue};

/// A 32-byte key: a self-mask seed, a pairwise mask seed or a share key.
pub(crate) type Seed = [u8; 32];

/// Salt of every derivation and prefix of every associated data: keys and
/// ciphertexts of this protocol are never those of another.
const DOMAIN: &[u8] = b"sinter secagg v1";

/// What a derived key is for (HKDF info), so the two uses of one pair of
/// clients never share a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// s_uv, from the mask keys: seeds the pairwise mask of u and v.
    PairwiseMask,
    /// From the cipher keys: encrypts the shares u and v send each other.
    ShareEncryption,
}

/// Bytes of one encrypted message of shares: a share of the sender's
/// self-mask seed and a share of its mask secret key, for one recipient,
/// plus the 16-byte Poly1305 tag.
pub const SHARE_CIPHERTEXT_BYTES: usize = SHARE_PLAINTEXT_BYTES + 16;
const SHARE_PLAINTEXT_BYTES: usize = 2 * SHARE_WORDS * 8;

/// The key clients `a` and `b` derive from their X25519 agreement; it is the
/// same on both sides. `None` if the peer's public key is of low order (the
/// shared point is the identity, which the peer could predict for any key).
pub(crate) fn agree(
    secret: &StaticSecret,
    peer: &[u8; 32],
    purpose: Purpose,
    session: u64,
    a: ClientId,
    b: ClientId,
) -> Option<Seed> {
    let shared = secret.diffie_hellman(&PublicKey::from(*peer));
    if !shared.was_contributory() {
        return None;
    }
    let label: &[u8] = match purpose {
        Purpose::PairwiseMask => b"pairwise mask",
        Purpose::ShareEncryption => b"share encryption",
    };
    let (low, high) = (a.min(b), a.max(b));
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(DOMAIN), shared.as_bytes())
        .expand_multi_info(
            &[label, &session.to_le_bytes(), &low.to_le_bytes(), &high.to_le_bytes()],
            &mut key,
        )
        .expect("32 bytes is within HKDF-SHA256's output length");
    Some(key)
}

/// The nonce of the one ciphertext `from` sends `to` under their key: the
/// key is fresh in every session and each direction is used once.
fn nonce(from: ClientId, to: ClientId) -> chacha20poly1305::Nonce {
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&from.to_le_bytes());
    nonce[4..8].copy_from_slice(&to.to_le_bytes());
    nonce.into()
}

fn associated_data(session: u64, from: ClientId, to: ClientId) -> Vec<u8> {
    [DOMAIN, &session.to_le_bytes(), &from.to_le_bytes(), &to.to_le_bytes()].concat()
}

/// Encrypts the two shares `from` holds for `to`.
pub(crate) fn seal_shares(
    key: &Seed,
    session: u64,
    from: ClientId,
    to: ClientId,
    self_mask: &ShareValue,
    mask_key: &ShareValue,
) -> Vec<u8> {
    let mut plaintext = Vec::with_capacity(SHARE_PLAINTEXT_BYTES);
    for word in self_mask.iter().chain(mask_key) {
        plaintext.extend_from_slice(&word.to_le_bytes());
    }
    let aad = associated_data(session, from, to);
    let ciphertext = ChaCha20Poly1305::new(&(*key).into())
        .encrypt(
            &nonce(from, to),
            Payload {
                msg: &plaintext,
                aad: &aad,
            },
        )
        .expect("80 bytes are within ChaCha20-Poly1305's message length");
    debug_assert_eq!(ciphertext.len(), SHARE_CIPHERTEXT_BYTES);
    ciphertext
}

/// Decrypts what `from` sent `to`: (share of the self-mask seed, share of
/// the mask key), or `None` if it is not exactly such a ciphertext under
/// this key, session and pair.
pub(crate) fn open_shares(
    key: &Seed,
    session: u64,
    from: ClientId,
    to: ClientId,
    ciphertext: &[u8],
) -> Option<(ShareValue, ShareValue)> {
    if ciphertext.len() != SHARE_CIPHERTEXT_BYTES {
        return None;
    }
    let aad = associated_data(session, from, to);
    let plaintext = ChaCha20Poly1305::new(&(*key).into())
        .decrypt(
            &nonce(from, to),
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .ok()?;
    let mut words = plaintext
        .chunks_exact(8)
        .map(|le| u64::from_le_bytes(le.try_into().expect("8-byte chunk")));
    let self_mask = std::array::from_fn(|_| words.next().expect("80-byte plaintext"));
    let mask_key = std::array::from_fn(|_| words.next().expect("80-byte plaintext"));
    Some((self_mask, mask_key))
}

/// Whether a mask is added to or taken from a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sign {
    Plus,
    Minus,
}

/// Elements of keystream made per pass; the buffer lives on the stack.
const MASK_CHUNK_ELEMS: usize = 1024;

/// `acc ± PRG(seed)` in Z_{2^32}, element-wise. PRG(seed) is the ChaCha20
/// keystream (RFC 8439) under key `seed`, nonce 0 and counter 0, read as
/// little-endian u32s; its 256 GiB period is far past
/// [`crate::VECTOR_LEN_MAX`] elements.
pub(crate) fn apply_mask(acc: &mut [u32], seed: &Seed, sign: Sign) {
    let mut keystream = ChaCha20::new(&(*seed).into(), &[0u8; 12].into());
    let mut buffer = [0u8; 4 * MASK_CHUNK_ELEMS];
    for chunk in acc.chunks_mut(MASK_CHUNK_ELEMS) {
        let bytes = &mut buffer[..4 * chunk.len()];
        keystream.write_keystream(bytes);
        let words = bytes
            .chunks_exact(4)
            .map(|le| u32::from_le_bytes([le[0], le[1], le[2], le[3]]));
        match sign {
            Sign::Plus => chunk.iter_mut().zip(words).for_each(|(a, m)| *a = a.wrapping_add(m)),
            Sign::Minus => chunk.iter_mut().zip(words).for_each(|(a, m)| *a = a.wrapping_sub(m)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_is_the_chacha20_keystream() {
        // RFC 8439 appendix A.1, test vector 1: key 0, nonce 0, counter 0.
        let mut acc = vec![0u32; 4];
        apply_mask(&mut acc, &[0; 32], Sign::Plus);
        assert_eq!(acc, [0xade0_b876, 0x903d_f1a0, 0xe56a_5d40, 0x28bd_8653]);
        apply_mask(&mut acc, &[0; 32], Sign::Minus);
        assert_eq!(acc, [0; 4]);
    }

    #[test]
    fn mask_is_one_stream_across_chunks() {
        let seed = [9u8; 32];
        let mut long = vec![0u32; 2 * MASK_CHUNK_ELEMS + 3];
        apply_mask(&mut long, &seed, Sign::Plus);
        let mut short = vec![0u32; 5];
        apply_mask(&mut short, &seed, Sign::Plus);
        assert_eq!(&long[..5], &short[..]);
        assert_ne!(long[MASK_CHUNK_ELEMS], long[0]);
    }

    #[test]
    fn x25519_matches_rfc7748() {
        // RFC 7748 section 6.1.
        let hex = |s: &str| -> [u8; 32] {
            std::array::from_fn(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        };
        let alice = StaticSecret::from(hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"));
        let bob_public = hex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
        let shared = alice.diffie_hellman(&PublicKey::from(bob_public));
        assert_eq!(
            shared.to_bytes(),
            hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
        );
    }

    #[test]
    fn agreement_is_symmetric_and_separated() {
        let (a, b) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
        let (a_public, b_public) = (PublicKey::from(&a).to_bytes(), PublicKey::from(&b).to_bytes());
        let ab = agree(&a, &b_public, Purpose::PairwiseMask, 5, 0, 1);
        assert!(ab.is_some());
        assert_eq!(ab, agree(&b, &a_public, Purpose::PairwiseMask, 5, 1, 0));
        assert_ne!(ab, agree(&a, &b_public, Purpose::ShareEncryption, 5, 0, 1));
        assert_ne!(ab, agree(&a, &b_public, Purpose::PairwiseMask, 6, 0, 1));
        assert_ne!(ab, agree(&a, &b_public, Purpose::PairwiseMask, 5, 0, 2));
        // The identity point would give every client the same "secret".
        assert_eq!(agree(&a, &[0; 32], Purpose::PairwiseMask, 5, 0, 1), None);
    }

    #[test]
    fn shares_open_only_for_their_session_and_pair() {
        let key = [3u8; 32];
        let self_mask = [1, 2, 3, 4, 5];
        let mask_key = [6, 7, 8, 9, 10];
        let sealed = seal_shares(&key, 5, 0, 1, &self_mask, &mask_key);
        assert_eq!(sealed.len(), SHARE_CIPHERTEXT_BYTES);
        assert_eq!(open_shares(&key, 5, 0, 1, &sealed), Some((self_mask, mask_key)));
        assert_eq!(open_shares(&key, 6, 0, 1, &sealed), None);
        assert_eq!(open_shares(&key, 5, 1, 0, &sealed), None);
        assert_eq!(open_shares(&[4; 32], 5, 0, 1, &sealed), None);
        assert_eq!(open_shares(&key, 5, 0, 1, &sealed[1..]), None);
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert_eq!(open_shares(&key, 5, 0, 1, &flipped), None);
    }
}
