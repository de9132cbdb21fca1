//! The client engine: makes its keys and shares, encrypts the shares for its
//! peers, masks its input, and answers one unmasking request.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use rand_core::CryptoRng;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::crypto::{Purpose, Seed, Sign, agree, apply_mask, open_shares, seal_shares};
use crate::shamir::{is_share, split};
use crate::{
    ClientError, ClientId, ClientKeys, ClientMessage, Config, PublicKeys, Round, SealedShares, ServerMessage,
    ShareValue,
};

/// One client of one session. Made with its input; every server message it
/// accepts returns its reply, and the reply to [`ServerMessage::Unmask`] is
/// its last. Any error stops it for good.
pub struct Client {
    config: Config,
    id: ClientId,
    public: PublicKeys,
    cipher_secret: StaticSecret,
    mask_secret: StaticSecret,
    /// b_u: the seed of the self mask.
    self_mask: Seed,
    state: State,
}

/// The shares a client holds of one client's secrets (its own included).
type Held = (ShareValue, ShareValue);

enum State {
    /// Sent `AdvertiseKeys`; waits for `Keys`.
    Keys {
        input: Vec<u32>,
        self_mask_shares: Vec<ShareValue>,
        key_shares: Vec<ShareValue>,
    },
    /// Sent `ShareKeys`; waits for `Shares`. `peers` are the other clients of
    /// U1 with (share-encryption key, pairwise mask seed).
    Shares {
        input: Vec<u32>,
        own: Held,
        peers: BTreeMap<ClientId, (Seed, Seed)>,
    },
    /// Sent `MaskedInput`; waits for `Unmask`. `held` covers U2.
    Unmask { held: BTreeMap<ClientId, Held> },
    /// Finished, or stopped on an error.
    Stopped,
}

impl State {
    fn round(&self) -> Option<Round> {
        match self {
            State::Keys { .. } => Some(Round::ShareKeys),
            State::Shares { .. } => Some(Round::MaskedInputCollection),
            State::Unmask { .. } => Some(Round::Unmasking),
            State::Stopped => None,
        }
    }
}

impl fmt::Debug for Client {
    // Never prints a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("session", &self.config.session)
            .field("waits_for", &self.state.round())
            .finish_non_exhaustive()
    }
}

/// Checks that ids are strictly ascending, so each appears once.
fn ascending(ids: impl Iterator<Item = ClientId>) -> Result<(), String> {
    let mut previous = None;
    for id in ids {
        if previous.is_some_and(|p| p >= id) {
            return Err(format!("client {id} out of ascending order or repeated"));
        }
        previous = Some(id);
    }
    Ok(())
}

impl Client {
    /// Makes client `id`'s keys and self-mask seed, shares the seed and the
    /// mask secret key among the session's clients, and returns the client
    /// with its round-0 message. All of the client's randomness is drawn
    /// here, from `rng`, which must never be replayed in another session.
    pub fn new<R: CryptoRng + ?Sized>(
        config: Config,
        id: ClientId,
        input: Vec<u32>,
        rng: &mut R,
    ) -> Result<(Client, ClientMessage), ClientError> {
        config.validate().map_err(|reason| ClientError::Config { reason })?;
        if !config.contains(id) {
            return Err(ClientError::Input {
                client: id,
                reason: format!("not a client of 0..{}", config.clients),
            });
        }
        if input.len() != config.vector_len as usize {
            return Err(ClientError::Input {
                client: id,
                reason: format!("input has {} elements, the session {}", input.len(), config.vector_len),
            });
        }
        let cipher_secret = StaticSecret::random_from_rng(rng);
        let mask_secret = StaticSecret::random_from_rng(rng);
        let mut self_mask = [0u8; 32];
        rng.fill_bytes(&mut self_mask);
        let self_mask_shares = split(&self_mask, config.threshold, config.clients, rng);
        let key_shares = split(&mask_secret.to_bytes(), config.threshold, config.clients, rng);
        let public = PublicKeys {
            cipher: PublicKey::from(&cipher_secret).to_bytes(),
            mask: PublicKey::from(&mask_secret).to_bytes(),
        };
        let client = Client {
            config,
            id,
            public,
            cipher_secret,
            mask_secret,
            self_mask,
            state: State::Keys {
                input,
                self_mask_shares,
                key_shares,
            },
        };
        Ok((client, ClientMessage::AdvertiseKeys(public)))
    }

    pub fn id(&self) -> ClientId {
        self.id
    }

    pub fn public_keys(&self) -> PublicKeys {
        self.public
    }

    /// The round whose message the client will send next, `None` once it
    /// has finished or stopped.
    pub fn round(&self) -> Option<Round> {
        self.state.round()
    }

    /// Takes the server's next message and returns the client's reply.
    pub fn receive(&mut self, message: ServerMessage) -> Result<ClientMessage, ClientError> {
        // Taken out, so that an error leaves the client stopped.
        let state = std::mem::replace(&mut self.state, State::Stopped);
        let (next, reply) = match (state, message) {
            (
                State::Keys {
                    input,
                    self_mask_shares,
                    key_shares,
                },
                ServerMessage::Keys(keys),
            ) => self.share_keys(input, &self_mask_shares, &key_shares, &keys)?,
            (State::Shares { input, own, peers }, ServerMessage::Shares(shares)) => {
                self.mask_input(input, own, &peers, &shares)?
            }
            (State::Unmask { held }, ServerMessage::Unmask { survivors, dropped }) => {
                (State::Stopped, self.unmask(&held, &survivors, &dropped)?)
            }
            (State::Stopped, _) => return Err(ClientError::Stopped { client: self.id }),
            (state, message) => {
                let round = state.round().expect("not stopped");
                return Err(ClientError::OutOfOrder {
                    client: self.id,
                    round,
                    got: message.round(),
                });
            }
        };
        self.state = next;
        Ok(reply)
    }

    fn malformed(&self, round: Round, reason: String) -> ClientError {
        ClientError::Malformed {
            client: self.id,
            round,
            reason,
        }
    }

    /// Round 1: checks U1's keys and encrypts each peer's shares for it.
    fn share_keys(
        &self,
        input: Vec<u32>,
        self_mask_shares: &[ShareValue],
        key_shares: &[ShareValue],
        keys: &[ClientKeys],
    ) -> Result<(State, ClientMessage), ClientError> {
        let round = Round::ShareKeys;
        let Config {
            session,
            clients,
            threshold,
            ..
        } = self.config;
        if keys.len() > clients as usize {
            return Err(self.malformed(round, format!("{} keys for a session of {clients} clients", keys.len())));
        }
        ascending(keys.iter().map(|k| k.client)).map_err(|reason| self.malformed(round, reason))?;
        if let Some(k) = keys.iter().find(|k| !self.config.contains(k.client)) {
            return Err(self.malformed(
                round,
                format!("keys of client {}, not a client of 0..{clients}", k.client),
            ));
        }
        match keys.iter().find(|k| k.client == self.id) {
            None => return Err(self.malformed(round, "this client's keys are missing".into())),
            Some(own) if own.keys != self.public => {
                return Err(self.malformed(round, "this client's keys were replaced".into()));
            }
            Some(_) => {}
        }
        if keys.len() < threshold as usize {
            return Err(ClientError::TooFewClients {
                client: self.id,
                round,
                got: keys.len() as u32,
                threshold,
            });
        }
        let mut peers = BTreeMap::new();
        let mut sealed = Vec::with_capacity(keys.len() - 1);
        for ClientKeys { client: peer, keys } in keys.iter().copied().filter(|k| k.client != self.id) {
            let low_order = |which: &str| self.malformed(round, format!("client {peer}'s {which} key is of low order"));
            let share_key = agree(
                &self.cipher_secret,
                &keys.cipher,
                Purpose::ShareEncryption,
                session,
                self.id,
                peer,
            )
            .ok_or_else(|| low_order("cipher"))?;
            let mask_seed = agree(
                &self.mask_secret,
                &keys.mask,
                Purpose::PairwiseMask,
                session,
                self.id,
                peer,
            )
            .ok_or_else(|| low_order("mask"))?;
            let (self_mask, mask_key) = (&self_mask_shares[peer as usize], &key_shares[peer as usize]);
            sealed.push(SealedShares {
                peer,
                ciphertext: seal_shares(&share_key, session, self.id, peer, self_mask, mask_key),
            });
            peers.insert(peer, (share_key, mask_seed));
        }
        let own = (self_mask_shares[self.id as usize], key_shares[self.id as usize]);
        Ok((State::Shares { input, own, peers }, ClientMessage::ShareKeys(sealed)))
    }

    /// Round 2: opens the shares of U2 and masks the input:
    /// y_u = x_u + PRG(b_u) + Σ_{v<u} PRG(s_uv) − Σ_{v>u} PRG(s_uv).
    fn mask_input(
        &self,
        input: Vec<u32>,
        own: Held,
        peers: &BTreeMap<ClientId, (Seed, Seed)>,
        shares: &[SealedShares],
    ) -> Result<(State, ClientMessage), ClientError> {
        let round = Round::MaskedInputCollection;
        let Config { session, threshold, .. } = self.config;
        if shares.len() > peers.len() {
            return Err(self.malformed(round, format!("{} shares from {} peers", shares.len(), peers.len())));
        }
        ascending(shares.iter().map(|s| s.peer)).map_err(|reason| self.malformed(round, reason))?;
        if let Some(s) = shares.iter().find(|s| !peers.contains_key(&s.peer)) {
            return Err(self.malformed(round, format!("shares from client {}, not a peer in round 1", s.peer)));
        }
        let got = shares.len() as u32 + 1;
        if got < threshold {
            return Err(ClientError::TooFewClients {
                client: self.id,
                round,
                got,
                threshold,
            });
        }
        let mut held = BTreeMap::from([(self.id, own)]);
        for SealedShares { peer, ciphertext } in shares {
            let (share_key, _) = &peers[peer];
            let opened = open_shares(share_key, session, *peer, self.id, ciphertext).ok_or(ClientError::Decrypt {
                client: self.id,
                round,
                from: *peer,
            })?;
            if !is_share(&opened.0) || !is_share(&opened.1) {
                return Err(self.malformed(round, format!("the shares from client {peer} are not field elements")));
            }
            held.insert(*peer, opened);
        }
        let mut masked = input;
        apply_mask(&mut masked, &self.self_mask, Sign::Plus);
        for SealedShares { peer, .. } in shares {
            let (_, mask_seed) = &peers[peer];
            apply_mask(
                &mut masked,
                mask_seed,
                if *peer < self.id { Sign::Plus } else { Sign::Minus },
            );
        }
        Ok((State::Unmask { held }, ClientMessage::MaskedInput(masked)))
    }

    /// Round 3: reveals shares of b_v for the survivors and of s_v^SK for the
    /// dropped, never both for one client.
    fn unmask(
        &self,
        held: &BTreeMap<ClientId, Held>,
        survivors: &[ClientId],
        dropped: &[ClientId],
    ) -> Result<ClientMessage, ClientError> {
        let round = Round::Unmasking;
        let threshold = self.config.threshold;
        if survivors.len() > held.len() || dropped.len() > held.len() {
            return Err(self.malformed(
                round,
                format!(
                    "{} survivors and {} dropped of {} clients",
                    survivors.len(),
                    dropped.len(),
                    held.len()
                ),
            ));
        }
        // Refuse first: nothing else about the request matters then.
        let surviving: BTreeSet<ClientId> = survivors.iter().copied().collect();
        if let Some(&target) = dropped.iter().find(|v| surviving.contains(v)) {
            return Err(ClientError::Refused {
                client: self.id,
                round,
                target,
            });
        }
        ascending(survivors.iter().copied()).map_err(|reason| self.malformed(round, format!("survivors: {reason}")))?;
        ascending(dropped.iter().copied()).map_err(|reason| self.malformed(round, format!("dropped: {reason}")))?;
        if let Some(v) = survivors.iter().chain(dropped).find(|v| !held.contains_key(v)) {
            return Err(self.malformed(round, format!("client {v} sent this client no shares in round 1")));
        }
        if !surviving.contains(&self.id) {
            return Err(self.malformed(round, "this client sent its masked input but is not a survivor".into()));
        }
        if survivors.len() + dropped.len() != held.len() {
            return Err(self.malformed(
                round,
                format!(
                    "the lists name {} of the {} clients that shared",
                    survivors.len() + dropped.len(),
                    held.len()
                ),
            ));
        }
        if survivors.len() < threshold as usize {
            let got = survivors.len() as u32;
            return Err(ClientError::TooFewClients {
                client: self.id,
                round,
                got,
                threshold,
            });
        }
        Ok(ClientMessage::Unmasking {
            self_mask_shares: survivors.iter().map(|v| held[v].0).collect(),
            key_shares: dropped.iter().map(|v| held[v].1).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use chacha20::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;

    const CONFIG: Config = Config {
        session: 9,
        clients: 3,
        threshold: 2,
        vector_len: 4,
    };

    fn make(id: ClientId) -> (Client, ClientMessage) {
        Client::new(CONFIG, id, vec![id; 4], &mut ChaCha20Rng::seed_from_u64(u64::from(id))).unwrap()
    }

    fn keys_of(clients: &[Client]) -> Vec<ClientKeys> {
        clients
            .iter()
            .map(|c| ClientKeys {
                client: c.id(),
                keys: c.public_keys(),
            })
            .collect()
    }

    /// Three clients past round 1, with what each of them encrypted.
    fn after_share_keys() -> (Vec<Client>, Vec<Vec<SealedShares>>) {
        let mut clients: Vec<Client> = (0..3).map(|id| make(id).0).collect();
        let keys = keys_of(&clients);
        let sealed = clients
            .iter_mut()
            .map(|c| match c.receive(ServerMessage::Keys(keys.clone())).unwrap() {
                ClientMessage::ShareKeys(sealed) => sealed,
                other => panic!("{other:?}"),
            })
            .collect();
        (clients, sealed)
    }

    /// What the server relays to `to`: every other sender's ciphertext for it.
    fn inbox(sealed: &[Vec<SealedShares>], to: ClientId) -> Vec<SealedShares> {
        (0..sealed.len() as u32)
            .filter(|&from| from != to)
            .map(|from| {
                let s = sealed[from as usize].iter().find(|s| s.peer == to).unwrap();
                SealedShares {
                    peer: from,
                    ciphertext: s.ciphertext.clone(),
                }
            })
            .collect()
    }

    /// Client 0 past round 2, waiting for the unmasking request.
    fn waiting_to_unmask() -> Client {
        let (mut clients, sealed) = after_share_keys();
        let reply = clients[0].receive(ServerMessage::Shares(inbox(&sealed, 0))).unwrap();
        assert!(matches!(reply, ClientMessage::MaskedInput(ref y) if y.len() == 4));
        clients.swap_remove(0)
    }

    fn malformed(client: ClientId, round: Round, reason: &str) -> ClientError {
        ClientError::Malformed {
            client,
            round,
            reason: reason.into(),
        }
    }

    #[test]
    fn new_checks_the_id_and_the_input() {
        let mut rng = ChaCha20Rng::seed_from_u64(0);
        let err = Client::new(CONFIG, 3, vec![0; 4], &mut rng).unwrap_err();
        assert_eq!(
            err,
            ClientError::Input {
                client: 3,
                reason: "not a client of 0..3".into()
            }
        );
        let err = Client::new(CONFIG, 1, vec![0; 5], &mut rng).unwrap_err();
        assert_eq!(
            err,
            ClientError::Input {
                client: 1,
                reason: "input has 5 elements, the session 4".into()
            }
        );
        let err = Client::new(Config { threshold: 1, ..CONFIG }, 1, vec![0; 4], &mut rng).unwrap_err();
        assert!(matches!(err, ClientError::Config { .. }), "{err}");
    }

    #[test]
    fn the_same_seed_gives_the_same_keys() {
        let (a, advert) = make(1);
        assert_eq!(advert, ClientMessage::AdvertiseKeys(a.public_keys()));
        assert_eq!(make(1).1, advert);
        assert_ne!(make(2).1, advert);
        assert_ne!(a.public_keys().cipher, a.public_keys().mask);
    }

    #[test]
    fn round_1_encrypts_shares_for_every_peer() {
        let (_, sealed) = after_share_keys();
        for (from, sealed) in sealed.iter().enumerate() {
            let peers: Vec<ClientId> = sealed.iter().map(|s| s.peer).collect();
            let others: Vec<ClientId> = (0..3).filter(|&v| v != from as u32).collect();
            assert_eq!(peers, others);
            assert!(
                sealed
                    .iter()
                    .all(|s| s.ciphertext.len() == crate::SHARE_CIPHERTEXT_BYTES)
            );
        }
    }

    #[test]
    fn bad_key_lists_are_errors() {
        let clients: Vec<Client> = (0..3).map(|id| make(id).0).collect();
        let keys = keys_of(&clients);
        let round = Round::ShareKeys;
        let cases: Vec<(Vec<ClientKeys>, ClientError)> = vec![
            (
                vec![keys[1], keys[2]],
                malformed(0, round, "this client's keys are missing"),
            ),
            (
                vec![
                    ClientKeys {
                        client: 0,
                        keys: keys[1].keys,
                    },
                    keys[1],
                ],
                malformed(0, round, "this client's keys were replaced"),
            ),
            (
                vec![keys[1], keys[0]],
                malformed(0, round, "client 0 out of ascending order or repeated"),
            ),
            (
                vec![keys[0], keys[0]],
                malformed(0, round, "client 0 out of ascending order or repeated"),
            ),
            (
                vec![
                    keys[0],
                    ClientKeys {
                        client: 7,
                        keys: keys[1].keys,
                    },
                ],
                malformed(0, round, "keys of client 7, not a client of 0..3"),
            ),
            (
                vec![keys[0], keys[1], keys[2], keys[2]],
                malformed(0, round, "4 keys for a session of 3 clients"),
            ),
            (
                vec![keys[0]],
                ClientError::TooFewClients {
                    client: 0,
                    round,
                    got: 1,
                    threshold: 2,
                },
            ),
            (
                vec![
                    keys[0],
                    ClientKeys {
                        client: 1,
                        keys: PublicKeys {
                            cipher: [0; 32],
                            mask: keys[1].keys.mask,
                        },
                    },
                ],
                malformed(0, round, "client 1's cipher key is of low order"),
            ),
        ];
        for (list, expected) in cases {
            let mut client = make(0).0;
            assert_eq!(client.receive(ServerMessage::Keys(list)), Err(expected));
            assert_eq!(client.round(), None);
            assert_eq!(
                client.receive(ServerMessage::Keys(keys.clone())),
                Err(ClientError::Stopped { client: 0 })
            );
        }
    }

    #[test]
    fn bad_share_lists_are_errors() {
        let round = Round::MaskedInputCollection;
        let (_, sealed) = after_share_keys();
        let good = inbox(&sealed, 0);
        let mut tampered = good.clone();
        tampered[1].ciphertext[5] ^= 1;
        let mut misdirected = good.clone();
        misdirected[0].ciphertext = sealed[1].iter().find(|s| s.peer == 2).unwrap().ciphertext.clone();
        let mut from_self = good.clone();
        from_self[0].peer = 0;
        let cases: Vec<(Vec<SealedShares>, ClientError)> = vec![
            (
                tampered,
                ClientError::Decrypt {
                    client: 0,
                    round,
                    from: 2,
                },
            ),
            (
                misdirected,
                ClientError::Decrypt {
                    client: 0,
                    round,
                    from: 1,
                },
            ),
            (
                from_self,
                malformed(0, round, "shares from client 0, not a peer in round 1"),
            ),
            (
                vec![good[1].clone(), good[0].clone()],
                malformed(0, round, "client 1 out of ascending order or repeated"),
            ),
            (
                vec![],
                ClientError::TooFewClients {
                    client: 0,
                    round,
                    got: 1,
                    threshold: 2,
                },
            ),
        ];
        for (list, expected) in cases {
            let (mut clients, _) = after_share_keys();
            assert_eq!(clients[0].receive(ServerMessage::Shares(list)), Err(expected));
        }
    }

    #[test]
    fn a_request_for_both_secrets_of_one_client_is_refused() {
        let mut client = waiting_to_unmask();
        let request = ServerMessage::Unmask {
            survivors: vec![0, 1],
            dropped: vec![1, 2],
        };
        assert_eq!(
            client.receive(request),
            Err(ClientError::Refused {
                client: 0,
                round: Round::Unmasking,
                target: 1
            })
        );
        // It stays silent afterwards, even for a request it would have answered.
        let fair = ServerMessage::Unmask {
            survivors: vec![0, 1],
            dropped: vec![2],
        };
        assert_eq!(client.receive(fair), Err(ClientError::Stopped { client: 0 }));
    }

    #[test]
    fn bad_unmasking_requests_are_errors() {
        let round = Round::Unmasking;
        let cases = [
            (
                (vec![1, 0, 2], vec![]),
                malformed(0, round, "survivors: client 0 out of ascending order or repeated"),
            ),
            (
                (vec![0, 1], vec![5]),
                malformed(0, round, "client 5 sent this client no shares in round 1"),
            ),
            (
                (vec![1, 2], vec![0]),
                malformed(0, round, "this client sent its masked input but is not a survivor"),
            ),
            (
                (vec![0, 2], vec![]),
                malformed(0, round, "the lists name 2 of the 3 clients that shared"),
            ),
            (
                (vec![0], vec![1, 2]),
                ClientError::TooFewClients {
                    client: 0,
                    round,
                    got: 1,
                    threshold: 2,
                },
            ),
            (
                (vec![0, 1, 2, 3], vec![]),
                malformed(0, round, "4 survivors and 0 dropped of 3 clients"),
            ),
        ];
        for ((survivors, dropped), expected) in cases {
            let mut client = waiting_to_unmask();
            assert_eq!(
                client.receive(ServerMessage::Unmask { survivors, dropped }),
                Err(expected)
            );
        }
    }

    #[test]
    fn a_client_answers_one_unmasking_request_only() {
        let mut client = waiting_to_unmask();
        let request = ServerMessage::Unmask {
            survivors: vec![0, 1],
            dropped: vec![2],
        };
        let reply = client.receive(request.clone()).unwrap();
        let ClientMessage::Unmasking {
            self_mask_shares,
            key_shares,
        } = reply
        else {
            panic!("{reply:?}")
        };
        assert_eq!((self_mask_shares.len(), key_shares.len()), (2, 1));
        assert_eq!(client.round(), None);
        // A second request could ask for the other secret of a client.
        let swapped = ServerMessage::Unmask {
            survivors: vec![0, 2],
            dropped: vec![1],
        };
        assert_eq!(client.receive(swapped), Err(ClientError::Stopped { client: 0 }));
    }

    #[test]
    fn messages_out_of_order_are_errors() {
        let mut client = make(0).0;
        let unmask = ServerMessage::Unmask {
            survivors: vec![0, 1],
            dropped: vec![],
        };
        assert_eq!(
            client.receive(unmask),
            Err(ClientError::OutOfOrder {
                client: 0,
                round: Round::ShareKeys,
                got: Round::Unmasking
            })
        );
        let (mut clients, _) = after_share_keys();
        let keys = keys_of(&clients);
        assert_eq!(
            clients[2].receive(ServerMessage::Keys(keys)),
            Err(ClientError::OutOfOrder {
                client: 2,
                round: Round::MaskedInputCollection,
                got: Round::ShareKeys
            })
        );
    }
}
