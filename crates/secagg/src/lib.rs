//! Secure aggregation for federated learning (Bonawitz et al. 2017,
//! "Practical Secure Aggregation for Privacy-Preserving Machine Learning")
//! as engines that do no IO: the server learns the sum of the surviving
//! clients' inputs and nothing else about any one of them.
//!
//! Inputs are vectors of `u32` in the ring Z_{2^32}; [`quantize`] encodes an
//! `f32` update into it so that the sum of up to `clients_max` of them does
//! not wrap, and [`dequantize`] decodes the sum. A session has n clients,
//! `0..n`, and a threshold t ([`Config`]); each round needs at least t of
//! them.
//!
//! - **Round 0, AdvertiseKeys.** Each [`Client`] makes two X25519 key pairs,
//!   c for encryption and s for masks, and sends both public keys. The
//!   [`Server`] relays the list (U1) to every client that advertised.
//! - **Round 1, ShareKeys.** Each client draws a self-mask seed b_u and
//!   Shamir-shares b_u and its s secret key into n shares with threshold t;
//!   it encrypts each other client v's two shares under a key from
//!   KA(c_u, c_v) and sends them through the server, which relays to every
//!   client that shared (U2) what was encrypted for it.
//! - **Round 2, MaskedInputCollection.** Each client sends
//!   y_u = x_u + PRG(b_u) + Σ_{v<u} PRG(s_uv) − Σ_{v>u} PRG(s_uv) over
//!   v in U2, with s_uv derived from KA(s_u, s_v). The pairwise masks cancel
//!   in a sum over all of U2; the server adds up the y_u it gets (U3).
//! - **Round 3, Unmasking.** The server names the survivors (U3) and the
//!   clients of U2 that sent no masked input; each survivor returns its
//!   share of b_v for every survivor v and of s_v's secret key for every
//!   dropped v, and refuses a request that names a client as both. From t
//!   answers the server rebuilds those secrets, removes the self masks of U3
//!   and the pairwise masks U3 shared with the dropped clients, and returns
//!   Σ x_u over U3 ([`Command::Done`]).
//!
//! Engines take messages and return messages: [`Client::receive`] returns
//! the client's reply, [`Server::receive`] and [`Server::close_round`] return
//! [`Command`]s. The runtime carries them (they are serde types) and owns the
//! sockets and the clocks.
//!
//! # What the runtime must guarantee
//!
//! 1. **Authenticated senders.** The `from` given to [`Server::receive`] is
//!    the client at the other end of that connection (the `wire` handshake),
//!    and a client's messages reach the server in the order it sent them.
//!    The channel need not be secret: shares are encrypted end to end.
//! 2. **Fresh randomness.** Every [`Client::new`] gets a cryptographically
//!    secure RNG whose stream is never used again, by another client or in
//!    another session. Fresh keys in every session are what make the fixed
//!    share nonces safe, and what keep a mask key revealed because its
//!    client dropped in one session from unmasking it in the next.
//! 3. **One configuration.** The server and every client of a session are
//!    made with the same [`Config`], whose `session` is not reused.
//! 4. **Deadlines.** A round closes by itself once every client expected in
//!    it has answered ([`Server::expected`]); otherwise the runtime calls
//!    [`Server::close_round`] at the round's deadline.
//! 5. **Bounded frames.** The runtime decodes messages from frames it has
//!    bounded (`wire`'s payload limits). The largest message is a masked
//!    input: 4 bytes per element plus a few bytes of header in postcard.
//!
//! In return the engines guarantee:
//!
//! - no IO, clocks or threads, and determinism: the same configuration,
//!   inputs, RNG streams and message order give the same messages and sum;
//! - no panic on any message: a malformed or out-of-order message is a
//!   [`ServerError`] or [`ClientError`] naming the client and the round. The
//!   server discards a refused message and is left as it was (the sender
//!   counts as silent in that round); a client stops on any error;
//! - nothing a peer sends makes an engine keep more than the configuration
//!   allows ([`CLIENTS_MAX`], [`VECTOR_LEN_MAX`]): every length is checked
//!   against it before anything sized by it is kept;
//! - every round closes with at least t answers, or stays open with
//!   [`ServerError::TooFewClients`];
//! - [`Command::Done`] carries Σ x_u mod 2^32 over U3 exactly when the clients
//!   follow the protocol, and comes once, last;
//! - a client answers at most one unmasking request, and reveals for each
//!   peer a share of at most one of its two secrets.
//!
//! # Security model
//!
//! The server is **honest but curious**: it follows the protocol and tries
//! to learn what it can from what it sees. What each message shows it:
//!
//! - AdvertiseKeys: public keys.
//! - ShareKeys: ChaCha20-Poly1305 ciphertexts under keys agreed between
//!   clients, which the server cannot compute; the session and the pair are
//!   bound into each, so none can be replayed to another client or session.
//! - MaskedInput: x_u + PRG(b_u) + pairwise masks. While b_u is secret the
//!   ChaCha20 keystream hides x_u completely (computationally).
//! - Unmasking: for each client, t shares of b_v if its masked input is in
//!   the sum, or of s_v's secret key if it is not, never both. The self
//!   masks come off only the survivors' y_u, which are summed, and the
//!   pairwise masks between survivors only cancel in the sum, so the server
//!   learns Σ x_u over U3 and no single x_u.
//!
//! The threshold t is the number of shares that open a secret: fewer show
//! nothing about it (Shamir), so the server needs t answers in round 3, and
//! up to t − 1 clients colluding with the server cannot open an honest
//! client's secrets by pooling their shares. [`Config::validate`] requires
//! t > n/2, so that no two disjoint sets of t clients exist to be asked
//! for different secrets of one client.
//!
//! What is **not** protected:
//!
//! - **A malicious server.** This is the honest-but-curious protocol,
//!   without the paper's consistency round (signed survivor lists) and
//!   without a PKI binding public keys to clients. A server that deviates
//!   can replace a client's advertised keys with its own, or invent clients
//!   whose shares it holds, and so open any client's masks.
//! - **Malicious clients.** A client can send any y_u: nothing checks that
//!   an input is in range, and the sum silently absorbs garbage. Only the
//!   client's own clipping in [`quantize`] bounds what it contributes, and
//!   the server can no longer check single updates (shape, norm bound) as
//!   the `fl` engine does with plain ones.
//! - **The sum itself.** The server learns Σ x_u over U3; with few
//!   survivors, or sums over sets that differ by one client across sessions,
//!   that can say much about one client. Differential privacy is separate.
//! - **Metadata.** Who takes part, who drops out, and when, are visible.
//! - **Secrets at rest in memory.** The X25519 secrets are zeroized on drop
//!   (`x25519-dalek`); the self-mask seed and the held shares are not.

mod client;
mod config;
mod crypto;
mod error;
mod message;
mod quantize;
mod server;
mod shamir;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use client::Client;
pub use config::{CLIENTS_MAX, Config, VECTOR_LEN_MAX};
pub use crypto::SHARE_CIPHERTEXT_BYTES;
pub use error::{ClientError, ServerError};
pub use message::{ClientKeys, ClientMessage, PublicKeys, SealedShares, ServerMessage};
pub use quantize::{dequantize, quantize, quantize_step};
pub use server::{Aggregate, Command, Server};
pub use shamir::{SHARE_WORDS, ShareValue};

/// A client's index in its session, `0..Config::clients`. Its Shamir point
/// is `id + 1`.
pub type ClientId = u32;

/// The four rounds of a session. A client's message belongs to the round it
/// answers; a server message starts the round whose answer it asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Round {
    AdvertiseKeys,
    ShareKeys,
    MaskedInputCollection,
    Unmasking,
}

impl fmt::Display for Round {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (number, name) = match self {
            Round::AdvertiseKeys => (0, "AdvertiseKeys"),
            Round::ShareKeys => (1, "ShareKeys"),
            Round::MaskedInputCollection => (2, "MaskedInputCollection"),
            Round::Unmasking => (3, "Unmasking"),
        };
        write!(f, "round {number} ({name})")
    }
}
