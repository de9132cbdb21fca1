//! Shamir secret sharing of 32-byte secrets over the prime field of order
//! p = 2^61 − 1: each secret is cut into five 7-byte words, and each word is
//! the constant term of its own random polynomial of degree t − 1.

use rand_core::CryptoRng;

/// The field's order, a Mersenne prime, so that reduction is two folds.
pub(crate) const PRIME: u64 = (1 << 61) - 1;

/// Bytes in a shared secret: a self-mask seed or an X25519 secret key.
pub(crate) const SECRET_BYTES: usize = 32;

/// Bytes of the secret carried by one field element (56 bits < 61).
const WORD_BYTES: usize = 7;

/// Field elements in one share of a 32-byte secret.
pub const SHARE_WORDS: usize = SECRET_BYTES.div_ceil(WORD_BYTES);

/// One Shamir share of a 32-byte secret: [`SHARE_WORDS`] elements of the
/// field of order 2^61 − 1, the evaluations of the words' polynomials at the
/// holder's point x = client id + 1.
pub type ShareValue = [u64; SHARE_WORDS];

/// Why shares did not give back a secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ShamirError {
    #[error("no shares")]
    Empty,
    #[error("point x = 0 holds the secret itself, not a share")]
    ZeroPoint,
    #[error("two shares at x = {0}")]
    DuplicatePoint(u32),
    #[error("the shares' polynomials give {0:#x} at 0, which is not a word of a secret")]
    NotASecret(u64),
}

fn reduce(x: u128) -> u64 {
    // 2^61 ≡ 1 (mod p): add the high bits to the low bits, twice.
    let folded = (x as u64 & PRIME) + (x >> 61) as u64;
    let folded = (folded & PRIME) + (folded >> 61);
    if folded >= PRIME { folded - PRIME } else { folded }
}

fn add(a: u64, b: u64) -> u64 {
    let sum = a + b;
    if sum >= PRIME { sum - PRIME } else { sum }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + PRIME - b }
}

fn mul(a: u64, b: u64) -> u64 {
    debug_assert!(a < PRIME && b < PRIME);
    reduce(u128::from(a) * u128::from(b))
}

fn pow(mut base: u64, mut exponent: u64) -> u64 {
    let mut result = 1;
    while exponent > 0 {
        if exponent & 1 == 1 {
            result = mul(result, base);
        }
        base = mul(base, base);
        exponent >>= 1;
    }
    result
}

fn inverse(a: u64) -> u64 {
    assert!(a != 0 && a < PRIME, "inverse of {a} in GF(2^61 - 1)");
    pow(a, PRIME - 2)
}

/// A uniform element: 61 random bits, redrawn in the one case (all ones)
/// that is not below p.
fn random_element<R: CryptoRng + ?Sized>(rng: &mut R) -> u64 {
    loop {
        let candidate = rng.next_u64() >> 3;
        if candidate < PRIME {
            return candidate;
        }
    }
}

/// Whether every word of a share received from a peer is a field element.
pub(crate) fn is_share(value: &ShareValue) -> bool {
    value.iter().all(|&word| word < PRIME)
}

fn encode(secret: &[u8; SECRET_BYTES]) -> ShareValue {
    let mut words = [0u64; SHARE_WORDS];
    for (word, bytes) in words.iter_mut().zip(secret.chunks(WORD_BYTES)) {
        let mut le = [0u8; 8];
        le[..bytes.len()].copy_from_slice(bytes);
        *word = u64::from_le_bytes(le);
    }
    words
}

fn decode(words: &ShareValue) -> Result<[u8; SECRET_BYTES], ShamirError> {
    let mut secret = [0u8; SECRET_BYTES];
    for (&word, bytes) in words.iter().zip(secret.chunks_mut(WORD_BYTES)) {
        if word >> (8 * bytes.len()) != 0 {
            return Err(ShamirError::NotASecret(word));
        }
        bytes.copy_from_slice(&word.to_le_bytes()[..bytes.len()]);
    }
    Ok(secret)
}

/// Shares `secret` among `count` holders so that any `threshold` of them
/// rebuild it and fewer learn nothing about it. Share `i` is for the point
/// x = i + 1.
pub(crate) fn split<R: CryptoRng + ?Sized>(
    secret: &[u8; SECRET_BYTES],
    threshold: u32,
    count: u32,
    rng: &mut R,
) -> Vec<ShareValue> {
    assert!(1 <= threshold && threshold <= count, "{threshold} of {count} shares");
    // coefficients[k][w]: the coefficient of x^k in word w's polynomial.
    let mut coefficients = vec![[0u64; SHARE_WORDS]; threshold as usize];
    coefficients[0] = encode(secret);
    for row in &mut coefficients[1..] {
        for coefficient in row.iter_mut() {
            *coefficient = random_element(rng);
        }
    }
    (1..=u64::from(count))
        .map(|x| {
            let mut share = [0u64; SHARE_WORDS];
            for (w, value) in share.iter_mut().enumerate() {
                // Horner's rule from the highest coefficient down.
                *value = coefficients.iter().rev().fold(0, |acc, row| add(mul(acc, x), row[w]));
            }
            share
        })
        .collect()
}

/// The Lagrange weights that carry values at the points `xs` to the value at
/// 0: secret = Σ weight_i · share_i. They depend only on the points, so one
/// set serves every secret shared among the same holders.
pub(crate) fn weights_at_zero(xs: &[u32]) -> Result<Vec<u64>, ShamirError> {
    if xs.is_empty() {
        return Err(ShamirError::Empty);
    }
    for (i, &x) in xs.iter().enumerate() {
        if x == 0 {
            return Err(ShamirError::ZeroPoint);
        }
        if xs[..i].contains(&x) {
            return Err(ShamirError::DuplicatePoint(x));
        }
    }
    Ok(xs
        .iter()
        .map(|&xi| {
            let (mut numerator, mut denominator) = (1, 1);
            for &xj in xs.iter().filter(|&&xj| xj != xi) {
                numerator = mul(numerator, u64::from(xj));
                denominator = mul(denominator, sub(u64::from(xj), u64::from(xi)));
            }
            mul(numerator, inverse(denominator))
        })
        .collect())
}

/// Rebuilds a secret from shares at the points whose `weights` these are,
/// in the same order. Every share must be a field element ([`is_share`]).
pub(crate) fn combine<'a>(
    weights: &[u64],
    shares: impl ExactSizeIterator<Item = &'a ShareValue>,
) -> Result<[u8; SECRET_BYTES], ShamirError> {
    assert_eq!(weights.len(), shares.len(), "one weight per share");
    let mut words = [0u64; SHARE_WORDS];
    for (&weight, share) in weights.iter().zip(shares) {
        debug_assert!(is_share(share));
        for (word, &value) in words.iter_mut().zip(share) {
            *word = add(*word, mul(weight, value));
        }
    }
    decode(&words)
}

#[cfg(test)]
mod tests {
    use chacha20::ChaCha20Rng;
    use proptest::prelude::*;
    use rand_core::SeedableRng;

    use super::*;

    #[test]
    fn field_arithmetic() {
        assert_eq!(reduce(u128::from(PRIME)), 0);
        assert_eq!(reduce(u128::from(PRIME) + 5), 5);
        assert_eq!(mul(PRIME - 1, PRIME - 1), 1); // (−1)² = 1
        assert_eq!(mul(1 << 60, 2), 1); // 2^61 ≡ 1
        assert_eq!(mul(1 << 60, 4), 2);
        assert_eq!(add(PRIME - 1, 1), 0);
        assert_eq!(sub(0, 1), PRIME - 1);
        assert_eq!(inverse(2), 1 << 60);
        for a in [1, 2, 3, 12345, PRIME - 2, PRIME - 1] {
            assert_eq!(mul(a, inverse(a)), 1, "{a}");
        }
    }

    #[test]
    fn words_carry_seven_bytes_each() {
        let secret: [u8; 32] = std::array::from_fn(|i| 0xff - i as u8);
        let words = encode(&secret);
        assert_eq!(words[0], 0x00f9_fafb_fcfd_feff);
        assert_eq!(words[4], 0xe0e1_e2e3);
        assert_eq!(decode(&words), Ok(secret));
        let mut bad = words;
        bad[4] = 1 << 32;
        assert_eq!(decode(&bad), Err(ShamirError::NotASecret(1 << 32)));
    }

    #[test]
    fn shares_lie_on_the_polynomial() {
        // With threshold 1 every share is the secret; with 2 the shares of a
        // word step by the same random slope.
        let secret = [7u8; 32];
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let shares = split(&secret, 1, 3, &mut rng);
        assert!(shares.iter().all(|share| *share == encode(&secret)));
        let shares = split(&secret, 2, 3, &mut rng);
        for (w, &constant) in encode(&secret).iter().enumerate() {
            let slope = sub(shares[0][w], constant);
            assert_eq!(shares[1][w], add(shares[0][w], slope));
            assert_eq!(shares[2][w], add(shares[1][w], slope));
        }
    }

    #[test]
    fn bad_points_are_errors() {
        assert_eq!(weights_at_zero(&[]), Err(ShamirError::Empty));
        assert_eq!(weights_at_zero(&[1, 0]), Err(ShamirError::ZeroPoint));
        assert_eq!(weights_at_zero(&[3, 1, 3]), Err(ShamirError::DuplicatePoint(3)));
        // Points 1 and 2: f(0) = 2·f(1) − f(2).
        assert_eq!(weights_at_zero(&[1, 2]), Ok(vec![2, PRIME - 1]));
    }

    /// A secret, a threshold, a share count and a choice of holders.
    fn case() -> impl Strategy<Value = ([u8; 32], u32, u32, u64, Vec<usize>)> {
        (1u32..=12)
            .prop_flat_map(|count| (1..=count, Just(count)))
            .prop_flat_map(|(threshold, count)| {
                let order = Just((0..count as usize).collect::<Vec<_>>()).prop_shuffle();
                (any::<[u8; 32]>(), Just(threshold), Just(count), any::<u64>(), order)
            })
    }

    proptest! {
        #[test]
        fn any_threshold_shares_rebuild_the_secret((secret, threshold, count, seed, order) in case()) {
            let shares = split(&secret, threshold, count, &mut ChaCha20Rng::seed_from_u64(seed));
            prop_assert_eq!(shares.len(), count as usize);
            // The first `threshold` holders of a random order, and all of them.
            for holders in [&order[..threshold as usize], &order[..]] {
                let xs: Vec<u32> = holders.iter().map(|&i| i as u32 + 1).collect();
                let weights = weights_at_zero(&xs).unwrap();
                let rebuilt = combine(&weights, holders.iter().map(|&i| &shares[i]));
                prop_assert_eq!(rebuilt, Ok(secret));
            }
        }

        #[test]
        fn fewer_than_threshold_shares_do_not_rebuild_it((secret, threshold, count, seed, order) in case()) {
            prop_assume!(threshold >= 2);
            let shares = split(&secret, threshold, count, &mut ChaCha20Rng::seed_from_u64(seed));
            let holders = &order[..threshold as usize - 1];
            let xs: Vec<u32> = holders.iter().map(|&i| i as u32 + 1).collect();
            let weights = weights_at_zero(&xs).unwrap();
            // Interpolating t − 1 points gives the polynomial of degree t − 2
            // through them, whose value at 0 is a uniform field element
            // independent of the secret: it differs from it (or is not even a
            // valid encoding) but for a chance of 2^-61 per word.
            let rebuilt = combine(&weights, holders.iter().map(|&i| &shares[i]));
            prop_assert_ne!(rebuilt, Ok(secret));
        }

        #[test]
        fn fewer_than_threshold_shares_fit_every_secret(
            (secret, threshold, count, seed, order) in case(), other in any::<[u8; 32]>()
        ) {
            // Adding (other − secret)·L(x), where L has degree t − 1, L(0) = 1
            // and L vanishes at the t − 1 held points, turns this sharing into
            // a sharing of `other` that agrees on every held share. The map is
            // a bijection between the random polynomials, so the held shares
            // are distributed alike whatever the secret: they reveal nothing.
            prop_assume!(threshold >= 2);
            let shares = split(&secret, threshold, count, &mut ChaCha20Rng::seed_from_u64(seed));
            let held: Vec<u64> = order[..threshold as usize - 1].iter().map(|&i| i as u64 + 1).collect();
            let at_zero = held.iter().fold(1, |acc, &h| mul(acc, sub(0, h)));
            let vanishing = |x: u64| mul(held.iter().fold(1, |acc, &h| mul(acc, sub(x, h))), inverse(at_zero));
            let (from, to) = (encode(&secret), encode(&other));
            let moved: Vec<ShareValue> = shares
                .iter()
                .enumerate()
                .map(|(i, share)| {
                    let l = vanishing(i as u64 + 1);
                    std::array::from_fn(|w| add(share[w], mul(sub(to[w], from[w]), l)))
                })
                .collect();
            for &h in &held {
                prop_assert_eq!(moved[h as usize - 1], shares[h as usize - 1]);
            }
            let holders = &order[..threshold as usize];
            let xs: Vec<u32> = holders.iter().map(|&i| i as u32 + 1).collect();
            let weights = weights_at_zero(&xs).unwrap();
            prop_assert_eq!(combine(&weights, holders.iter().map(|&i| &moved[i])), Ok(other));
        }
    }
}
