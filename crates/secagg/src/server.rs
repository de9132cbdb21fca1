//! The server engine: relays keys and encrypted shares, sums the masked
//! inputs, asks the survivors for the shares that remove the masks, and
//! returns the sum of the surviving clients' inputs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use x25519_dalek::{PublicKey, StaticSecret};

use crate::crypto::{Purpose, SHARE_CIPHERTEXT_BYTES, Sign, agree, apply_mask};
use crate::shamir::{combine, is_share, weights_at_zero};
use crate::{
    ClientId, ClientKeys, ClientMessage, Config, PublicKeys, Round, SealedShares, ServerError, ServerMessage,
    ShareValue,
};

/// Work for the runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Send `message` to client `to`.
    Send { to: ClientId, message: ServerMessage },
    /// The session is over with this result; nothing follows.
    Done(Aggregate),
}

/// The result of a session.
#[derive(Clone, PartialEq, Eq)]
pub struct Aggregate {
    /// Σ x_u over `clients`, in Z_{2^32}.
    pub sum: Vec<u32>,
    /// U3, ascending: the clients whose masked inputs arrived in round 2.
    pub clients: Vec<ClientId>,
}

impl fmt::Debug for Aggregate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Aggregate")
            .field("len", &self.sum.len())
            .field("head", &&self.sum[..self.sum.len().min(4)])
            .field("clients", &self.clients)
            .finish()
    }
}

/// The server of one session. Each accepted message may close its round
/// (when every client expected in it has answered) and so return commands;
/// the runtime closes a round itself at its deadline with
/// [`Server::close_round`].
pub struct Server {
    config: Config,
    /// The round open, `None` once the session is over.
    round: Option<Round>,
    /// U1 and its keys.
    keys: BTreeMap<ClientId, PublicKeys>,
    /// U2's ciphertexts by sender, each ascending by recipient; emptied
    /// when they are relayed.
    sealed: BTreeMap<ClientId, Vec<SealedShares>>,
    /// U2, ascending, once round 1 has closed.
    shared: Vec<ClientId>,
    /// Σ y_u over the masked inputs so far.
    sum: Vec<u32>,
    /// U3.
    masked: BTreeSet<ClientId>,
    /// The unmasking request: U3 and U2 \ U3, ascending.
    survivors: Vec<ClientId>,
    dropped: Vec<ClientId>,
    /// Round 3's answers.
    responses: BTreeMap<ClientId, Answer>,
}

/// One survivor's round-3 shares, aligned with `survivors` and `dropped`.
type Answer = (Vec<ShareValue>, Vec<ShareValue>);

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .field("round", &self.round)
            .field("answered", &self.answered())
            .field("expected", &self.expected())
            .finish_non_exhaustive()
    }
}

impl Server {
    pub fn new(config: Config) -> Result<Server, ServerError> {
        config.validate().map_err(|reason| ServerError::Config { reason })?;
        Ok(Server {
            config,
            round: Some(Round::AdvertiseKeys),
            keys: BTreeMap::new(),
            sealed: BTreeMap::new(),
            shared: Vec::new(),
            sum: Vec::new(),
            masked: BTreeSet::new(),
            survivors: Vec::new(),
            dropped: Vec::new(),
            responses: BTreeMap::new(),
        })
    }

    /// The round open, `None` once the session is over.
    pub fn round(&self) -> Option<Round> {
        self.round
    }

    /// Clients that have answered the open round.
    pub fn answered(&self) -> u32 {
        let count = match self.round {
            Some(Round::AdvertiseKeys) => self.keys.len(),
            Some(Round::ShareKeys) => self.sealed.len(),
            Some(Round::MaskedInputCollection) => self.masked.len(),
            Some(Round::Unmasking) => self.responses.len(),
            None => 0,
        };
        count as u32
    }

    /// Clients that may answer the open round: all of them, then U1, U2, U3.
    pub fn expected(&self) -> u32 {
        let count = match self.round {
            Some(Round::AdvertiseKeys) => self.config.clients as usize,
            Some(Round::ShareKeys) => self.keys.len(),
            Some(Round::MaskedInputCollection) => self.shared.len(),
            Some(Round::Unmasking) => self.survivors.len(),
            None => 0,
        };
        count as u32
    }

    /// Takes a message from client `from` (the runtime vouches for the
    /// sender). On an error the message is discarded and nothing changes.
    pub fn receive(&mut self, from: ClientId, message: ClientMessage) -> Result<Vec<Command>, ServerError> {
        let Some(round) = self.round else {
            return Err(ServerError::Finished { client: from });
        };
        if !self.config.contains(from) {
            return Err(ServerError::UnknownClient {
                client: from,
                round,
                clients: self.config.clients,
            });
        }
        if message.round() != round {
            return Err(ServerError::OutOfOrder {
                client: from,
                round,
                got: message.round(),
            });
        }
        let malformed = |reason: String| ServerError::Malformed {
            client: from,
            round,
            reason,
        };
        let (member, answered) = match round {
            Round::AdvertiseKeys => (true, self.keys.contains_key(&from)),
            Round::ShareKeys => (self.keys.contains_key(&from), self.sealed.contains_key(&from)),
            Round::MaskedInputCollection => (self.shared.binary_search(&from).is_ok(), self.masked.contains(&from)),
            Round::Unmasking => (
                self.survivors.binary_search(&from).is_ok(),
                self.responses.contains_key(&from),
            ),
        };
        if !member {
            return Err(ServerError::NotInRound { client: from, round });
        }
        if answered {
            return Err(ServerError::Duplicate { client: from, round });
        }
        match message {
            ClientMessage::AdvertiseKeys(keys) => {
                self.keys.insert(from, keys);
            }
            ClientMessage::ShareKeys(sealed) => {
                let recipients = self.keys.keys().copied().filter(|&v| v != from);
                if sealed.len() != recipients.clone().count() {
                    return Err(malformed(format!(
                        "{} ciphertexts for the {} other clients that advertised keys",
                        sealed.len(),
                        self.keys.len() - 1
                    )));
                }
                for (SealedShares { peer, ciphertext }, expected) in sealed.iter().zip(recipients) {
                    if *peer != expected {
                        return Err(malformed(format!(
                            "ciphertext for client {peer} where client {expected}'s is due"
                        )));
                    }
                    if ciphertext.len() != SHARE_CIPHERTEXT_BYTES {
                        return Err(malformed(format!(
                            "ciphertext for client {peer} has {} bytes, not {SHARE_CIPHERTEXT_BYTES}",
                            ciphertext.len()
                        )));
                    }
                }
                self.sealed.insert(from, sealed);
            }
            ClientMessage::MaskedInput(masked) => {
                if masked.len() != self.sum.len() {
                    return Err(malformed(format!(
                        "masked input has {} elements, the session {}",
                        masked.len(),
                        self.sum.len()
                    )));
                }
                for (total, y) in self.sum.iter_mut().zip(&masked) {
                    *total = total.wrapping_add(*y);
                }
                self.masked.insert(from);
            }
            ClientMessage::Unmasking {
                self_mask_shares,
                key_shares,
            } => {
                if self_mask_shares.len() != self.survivors.len() || key_shares.len() != self.dropped.len() {
                    return Err(malformed(format!(
                        "{} self-mask shares and {} key shares for {} survivors and {} dropped",
                        self_mask_shares.len(),
                        key_shares.len(),
                        self.survivors.len(),
                        self.dropped.len()
                    )));
                }
                if !self_mask_shares.iter().chain(&key_shares).all(is_share) {
                    return Err(malformed("a share is not a field element".into()));
                }
                self.responses.insert(from, (self_mask_shares, key_shares));
            }
        }
        if self.answered() == self.expected() {
            self.close_round()
        } else {
            Ok(Vec::new())
        }
    }

    /// Closes the open round with the clients that have answered, as the
    /// runtime does at the round's deadline. With fewer than the threshold
    /// it is an error and the round stays open.
    pub fn close_round(&mut self) -> Result<Vec<Command>, ServerError> {
        let Some(round) = self.round else {
            return Err(ServerError::NothingOpen);
        };
        let (got, threshold) = (self.answered(), self.config.threshold);
        if got < threshold {
            return Err(ServerError::TooFewClients { round, got, threshold });
        }
        match round {
            Round::AdvertiseKeys => {
                let keys: Vec<ClientKeys> = self
                    .keys
                    .iter()
                    .map(|(&client, &keys)| ClientKeys { client, keys })
                    .collect();
                self.round = Some(Round::ShareKeys);
                Ok(self
                    .keys
                    .keys()
                    .map(|&to| Command::Send {
                        to,
                        message: ServerMessage::Keys(keys.clone()),
                    })
                    .collect())
            }
            Round::ShareKeys => {
                self.shared = self.sealed.keys().copied().collect();
                let mut inboxes: BTreeMap<ClientId, Vec<SealedShares>> = self
                    .shared
                    .iter()
                    .map(|&v| (v, Vec::with_capacity(self.shared.len() - 1)))
                    .collect();
                // Senders in ascending order, so every inbox is ascending too.
                for (from, sealed) in std::mem::take(&mut self.sealed) {
                    for SealedShares { peer, ciphertext } in sealed {
                        if let Some(inbox) = inboxes.get_mut(&peer) {
                            inbox.push(SealedShares { peer: from, ciphertext });
                        }
                    }
                }
                self.sum = vec![0; self.config.vector_len as usize];
                self.round = Some(Round::MaskedInputCollection);
                Ok(inboxes
                    .into_iter()
                    .map(|(to, shares)| Command::Send {
                        to,
                        message: ServerMessage::Shares(shares),
                    })
                    .collect())
            }
            Round::MaskedInputCollection => {
                self.survivors = self.masked.iter().copied().collect();
                self.dropped = self
                    .shared
                    .iter()
                    .copied()
                    .filter(|v| !self.masked.contains(v))
                    .collect();
                self.round = Some(Round::Unmasking);
                let message = ServerMessage::Unmask {
                    survivors: self.survivors.clone(),
                    dropped: self.dropped.clone(),
                };
                Ok(self
                    .survivors
                    .iter()
                    .map(|&to| Command::Send {
                        to,
                        message: message.clone(),
                    })
                    .collect())
            }
            Round::Unmasking => {
                // Success or not, the session ends here: the sum is spent.
                self.round = None;
                Ok(vec![Command::Done(self.unmask()?)])
            }
        }
    }

    /// Rebuilds b_v of every survivor and s_v^SK of every dropped client from
    /// the first t answers, and takes their masks out of the sum.
    fn unmask(&mut self) -> Result<Aggregate, ServerError> {
        let round = Round::Unmasking;
        let session = self.config.session;
        let responders: Vec<(&ClientId, &Answer)> =
            self.responses.iter().take(self.config.threshold as usize).collect();
        let points: Vec<u32> = responders.iter().map(|&(&id, _)| id + 1).collect();
        let weights = weights_at_zero(&points).expect("client ids + 1 are distinct and non-zero");
        let mut sum = std::mem::take(&mut self.sum);
        for (i, &v) in self.survivors.iter().enumerate() {
            let seed = combine(&weights, responders.iter().map(|(_, (self_mask, _))| &self_mask[i])).map_err(|e| {
                ServerError::Reconstruct {
                    client: v,
                    round,
                    secret: "self-mask seed",
                    reason: e.to_string(),
                }
            })?;
            apply_mask(&mut sum, &seed, Sign::Minus);
        }
        for (j, &v) in self.dropped.iter().enumerate() {
            let failed = |reason: String| ServerError::Reconstruct {
                client: v,
                round,
                secret: "mask key",
                reason,
            };
            let bytes =
                combine(&weights, responders.iter().map(|(_, (_, key))| &key[j])).map_err(|e| failed(e.to_string()))?;
            let secret = StaticSecret::from(bytes);
            if PublicKey::from(&secret).to_bytes() != self.keys[&v].mask {
                return Err(failed("the rebuilt key is not the one it advertised".into()));
            }
            for &u in &self.survivors {
                let seed = agree(&secret, &self.keys[&u].mask, Purpose::PairwiseMask, session, v, u)
                    .ok_or_else(|| failed(format!("survivor {u}'s mask key is of low order")))?;
                // u added PRG(s_uv) if v < u and took it away if v > u.
                apply_mask(&mut sum, &seed, if v < u { Sign::Minus } else { Sign::Plus });
            }
        }
        Ok(Aggregate {
            sum,
            clients: self.survivors.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: Config = Config {
        session: 9,
        clients: 3,
        threshold: 2,
        vector_len: 2,
    };

    fn keys(id: ClientId) -> PublicKeys {
        PublicKeys {
            cipher: [id as u8; 32],
            mask: [id as u8 + 100; 32],
        }
    }

    /// A ciphertext that tells who made it for whom.
    fn sealed(from: ClientId, to: ClientId) -> SealedShares {
        SealedShares {
            peer: to,
            ciphertext: vec![(16 * from + to) as u8; SHARE_CIPHERTEXT_BYTES],
        }
    }

    fn share_keys(from: ClientId, to: &[ClientId]) -> ClientMessage {
        ClientMessage::ShareKeys(to.iter().map(|&v| sealed(from, v)).collect())
    }

    fn send(to: ClientId, message: ServerMessage) -> Command {
        Command::Send { to, message }
    }

    /// A server in round 2 whose U1 is {0, 1, 2} and U2 is {0, 1}.
    fn in_round_2() -> Server {
        let mut server = Server::new(CONFIG).unwrap();
        for id in 0..3 {
            server.receive(id, ClientMessage::AdvertiseKeys(keys(id))).unwrap();
        }
        server.receive(0, share_keys(0, &[1, 2])).unwrap();
        server.receive(1, share_keys(1, &[0, 2])).unwrap();
        server.close_round().unwrap();
        server
    }

    #[test]
    fn round_0_closes_when_everyone_advertised() {
        let mut server = Server::new(CONFIG).unwrap();
        assert_eq!(server.receive(2, ClientMessage::AdvertiseKeys(keys(2))), Ok(vec![]));
        assert_eq!(server.receive(0, ClientMessage::AdvertiseKeys(keys(0))), Ok(vec![]));
        let list: Vec<ClientKeys> = [0, 1, 2]
            .map(|client| ClientKeys {
                client,
                keys: keys(client),
            })
            .to_vec();
        assert_eq!(
            server.receive(1, ClientMessage::AdvertiseKeys(keys(1))),
            Ok(vec![
                send(0, ServerMessage::Keys(list.clone())),
                send(1, ServerMessage::Keys(list.clone())),
                send(2, ServerMessage::Keys(list)),
            ])
        );
        assert_eq!(server.round(), Some(Round::ShareKeys));
        assert_eq!((server.answered(), server.expected()), (0, 3));
    }

    #[test]
    fn a_round_closes_at_its_deadline_with_at_least_the_threshold() {
        let mut server = Server::new(CONFIG).unwrap();
        server.receive(1, ClientMessage::AdvertiseKeys(keys(1))).unwrap();
        let too_few = ServerError::TooFewClients {
            round: Round::AdvertiseKeys,
            got: 1,
            threshold: 2,
        };
        assert_eq!(server.close_round(), Err(too_few));
        assert_eq!((server.round(), server.answered()), (Some(Round::AdvertiseKeys), 1));
        server.receive(2, ClientMessage::AdvertiseKeys(keys(2))).unwrap();
        let list: Vec<ClientKeys> = [1, 2]
            .map(|client| ClientKeys {
                client,
                keys: keys(client),
            })
            .to_vec();
        assert_eq!(
            server.close_round(),
            Ok(vec![
                send(1, ServerMessage::Keys(list.clone())),
                send(2, ServerMessage::Keys(list))
            ])
        );
        // Client 0 missed round 0, so it has no part in round 1.
        assert_eq!(
            server.receive(0, share_keys(0, &[1, 2])),
            Err(ServerError::NotInRound {
                client: 0,
                round: Round::ShareKeys
            })
        );
    }

    #[test]
    fn round_1_relays_each_ciphertext_to_its_recipient() {
        let mut server = Server::new(CONFIG).unwrap();
        for id in 0..3 {
            server.receive(id, ClientMessage::AdvertiseKeys(keys(id))).unwrap();
        }
        assert_eq!(server.receive(2, share_keys(2, &[0, 1])), Ok(vec![]));
        assert_eq!(server.receive(0, share_keys(0, &[1, 2])), Ok(vec![]));
        // Client 1 is silent; at the deadline 0 and 2 get each other's.
        let from = |sender: ClientId, to: ClientId| SealedShares {
            peer: sender,
            ..sealed(sender, to)
        };
        assert_eq!(
            server.close_round(),
            Ok(vec![
                send(0, ServerMessage::Shares(vec![from(2, 0)])),
                send(2, ServerMessage::Shares(vec![from(0, 2)]))
            ])
        );
        assert_eq!(server.expected(), 2);
    }

    #[test]
    fn round_2_sums_and_names_survivors_and_dropped() {
        let mut server = in_round_2();
        assert_eq!(
            server.receive(1, ClientMessage::MaskedInput(vec![u32::MAX, 5])),
            Ok(vec![])
        );
        assert_eq!(
            server.close_round(),
            Err(ServerError::TooFewClients {
                round: Round::MaskedInputCollection,
                got: 1,
                threshold: 2
            })
        );
        let unmask = ServerMessage::Unmask {
            survivors: vec![0, 1],
            dropped: vec![],
        };
        assert_eq!(
            server.receive(0, ClientMessage::MaskedInput(vec![2, 7])),
            Ok(vec![send(0, unmask.clone()), send(1, unmask)])
        );
        assert_eq!(server.sum, [1, 12]);
    }

    #[test]
    fn malformed_and_misplaced_messages_are_errors_that_change_nothing() {
        let round = Round::ShareKeys;
        let malformed = |client, reason: &str| ServerError::Malformed {
            client,
            round,
            reason: reason.into(),
        };
        let mut server = Server::new(CONFIG).unwrap();
        for id in 0..3 {
            server.receive(id, ClientMessage::AdvertiseKeys(keys(id))).unwrap();
        }
        let mut short = share_keys(0, &[1, 2]);
        if let ClientMessage::ShareKeys(list) = &mut short {
            list[1].ciphertext.pop();
        }
        let cases = [
            (
                3,
                share_keys(3, &[0, 1]),
                ServerError::UnknownClient {
                    client: 3,
                    round,
                    clients: 3,
                },
            ),
            (
                0,
                ClientMessage::MaskedInput(vec![1, 2]),
                ServerError::OutOfOrder {
                    client: 0,
                    round,
                    got: Round::MaskedInputCollection,
                },
            ),
            (
                0,
                ClientMessage::AdvertiseKeys(keys(0)),
                ServerError::OutOfOrder {
                    client: 0,
                    round,
                    got: Round::AdvertiseKeys,
                },
            ),
            (
                0,
                share_keys(0, &[1]),
                malformed(0, "1 ciphertexts for the 2 other clients that advertised keys"),
            ),
            (
                0,
                share_keys(0, &[2, 1]),
                malformed(0, "ciphertext for client 2 where client 1's is due"),
            ),
            (
                0,
                share_keys(0, &[0, 1]),
                malformed(0, "ciphertext for client 0 where client 1's is due"),
            ),
            (0, short, malformed(0, "ciphertext for client 2 has 95 bytes, not 96")),
        ];
        for (from, message, expected) in cases {
            assert_eq!(server.receive(from, message), Err(expected));
            assert_eq!((server.round(), server.answered()), (Some(round), 0));
        }
        server.receive(0, share_keys(0, &[1, 2])).unwrap();
        assert_eq!(
            server.receive(0, share_keys(0, &[1, 2])),
            Err(ServerError::Duplicate { client: 0, round })
        );
        assert_eq!(server.answered(), 1);
    }

    #[test]
    fn malformed_inputs_and_answers_are_errors() {
        let mut server = in_round_2();
        let round = Round::MaskedInputCollection;
        assert_eq!(
            server.receive(0, ClientMessage::MaskedInput(vec![1, 2, 3])),
            Err(ServerError::Malformed {
                client: 0,
                round,
                reason: "masked input has 3 elements, the session 2".into()
            })
        );
        assert_eq!(
            server.receive(2, ClientMessage::MaskedInput(vec![1, 2])),
            Err(ServerError::NotInRound { client: 2, round })
        );
        server.receive(0, ClientMessage::MaskedInput(vec![1, 2])).unwrap();
        server.receive(1, ClientMessage::MaskedInput(vec![1, 2])).unwrap();
        let round = Round::Unmasking;
        let answer = |self_mask_shares: Vec<ShareValue>| ClientMessage::Unmasking {
            self_mask_shares,
            key_shares: vec![],
        };
        assert_eq!(
            server.receive(0, answer(vec![[0; 5]])),
            Err(ServerError::Malformed {
                client: 0,
                round,
                reason: "1 self-mask shares and 0 key shares for 2 survivors and 0 dropped".into()
            })
        );
        assert_eq!(
            server.receive(0, answer(vec![[0; 5], [0, 0, crate::shamir::PRIME, 0, 0]])),
            Err(ServerError::Malformed {
                client: 0,
                round,
                reason: "a share is not a field element".into()
            })
        );
        assert_eq!(server.answered(), 0);
    }

    /// A server in round 3 with survivors {0, 1} and nobody dropped.
    fn in_round_3() -> Server {
        let mut server = in_round_2();
        server.receive(0, ClientMessage::MaskedInput(vec![0, 0])).unwrap();
        server.receive(1, ClientMessage::MaskedInput(vec![0, 0])).unwrap();
        server
    }

    fn answer(share: u64) -> ClientMessage {
        ClientMessage::Unmasking {
            self_mask_shares: vec![[share; 5]; 2],
            key_shares: vec![],
        }
    }

    #[test]
    fn nothing_is_accepted_after_the_session_ends() {
        let mut server = in_round_3();
        assert_eq!(server.receive(0, answer(1)), Ok(vec![]));
        // Equal shares at points 1 and 2 lie on a constant polynomial, so
        // they rebuild a seed (of bytes 1, 0, ...); the sum is meaningless
        // but the session ends.
        let commands = server.receive(1, answer(1)).unwrap();
        assert!(matches!(&commands[..], [Command::Done(Aggregate { clients, .. })] if clients == &[0, 1]));
        assert_eq!(server.round(), None);
        assert_eq!(
            server.receive(1, ClientMessage::MaskedInput(vec![0, 0])),
            Err(ServerError::Finished { client: 1 })
        );
        assert_eq!(server.close_round(), Err(ServerError::NothingOpen));
    }

    #[test]
    fn shares_that_rebuild_no_secret_end_the_session() {
        let mut server = in_round_3();
        server.receive(0, answer(0)).unwrap();
        // 2·f(1) − f(2) = −1 = p − 1: more than the 56 bits a word carries.
        assert_eq!(
            server.receive(1, answer(1)),
            Err(ServerError::Reconstruct {
                client: 0,
                round: Round::Unmasking,
                secret: "self-mask seed",
                reason: "the shares' polynomials give 0x1ffffffffffffffe at 0, which is not a word of a secret".into()
            })
        );
        assert_eq!(server.round(), None);
    }
}
