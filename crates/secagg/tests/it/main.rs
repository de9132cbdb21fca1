//! Whole sessions in one process: n clients and a server whose messages go
//! through postcard, with clients lost before and after each round.

use std::collections::{BTreeMap, HashSet, VecDeque};

use chacha20::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use secagg::{
    Aggregate, Client, ClientId, ClientMessage, Command, Config, Round, SHARE_WORDS, Server, ServerError,
    ServerMessage, dequantize, quantize, quantize_step,
};

const CONFIG: Config = Config {
    session: 42,
    clients: 10,
    threshold: 7,
    vector_len: 1000,
};

/// Clients that go silent, each from the round given on: it sends nothing
/// for that round or later, and takes no message that starts one.
type Losses = BTreeMap<ClientId, Round>;

/// What one session did: its result and every message the server received.
struct Run {
    result: Result<Aggregate, ServerError>,
    received: Vec<(ClientId, Vec<u8>)>,
}

fn random_inputs(config: Config, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..config.clients)
        .map(|_| (0..config.vector_len).map(|_| rng.next_u32()).collect())
        .collect()
}

fn plain_sum(inputs: &[Vec<u32>], clients: impl Iterator<Item = ClientId>) -> Vec<u32> {
    let mut sum = vec![0u32; inputs[0].len()];
    for client in clients {
        for (s, x) in sum.iter_mut().zip(&inputs[client as usize]) {
            *s = s.wrapping_add(*x);
        }
    }
    sum
}

/// Runs a session; `tamper` may alter each client message on its way.
fn run_with(
    config: Config,
    inputs: &[Vec<u32>],
    losses: &Losses,
    seed: u64,
    tamper: &mut dyn FnMut(ClientId, &mut ClientMessage),
) -> Run {
    let present = |client: ClientId, round: Round| losses.get(&client).is_none_or(|&gone| round < gone);
    let mut received = Vec::new();
    let mut queue = VecDeque::new();
    let mut post = |from: ClientId, mut message: ClientMessage, queue: &mut VecDeque<(ClientId, ClientMessage)>| {
        if present(from, message.round()) {
            tamper(from, &mut message);
            let bytes = postcard::to_allocvec(&message).unwrap();
            queue.push_back((from, postcard::from_bytes(&bytes).unwrap()));
            received.push((from, bytes));
        }
    };
    let mut clients = Vec::new();
    for id in 0..config.clients {
        let mut rng = ChaCha20Rng::seed_from_u64(seed ^ (u64::from(id) << 32));
        let (client, advert) = Client::new(config, id, inputs[id as usize].clone(), &mut rng).unwrap();
        clients.push(client);
        post(id, advert, &mut queue);
    }
    let mut server = Server::new(config).unwrap();
    let mut result = None;
    loop {
        let commands = match queue.pop_front() {
            Some((from, message)) => server.receive(from, message),
            None if result.is_some() => break,
            // Everyone present has answered: the round's deadline.
            None => server.close_round(),
        };
        let commands = match commands {
            Ok(commands) => commands,
            Err(e) => {
                return Run {
                    result: Err(e),
                    received,
                };
            }
        };
        for command in commands {
            match command {
                Command::Send { to, message } => {
                    if present(to, message.round()) {
                        let bytes = postcard::to_allocvec(&message).unwrap();
                        let message: ServerMessage = postcard::from_bytes(&bytes).unwrap();
                        let reply = clients[to as usize].receive(message).unwrap();
                        post(to, reply, &mut queue);
                    }
                }
                Command::Done(aggregate) => result = Some(aggregate),
            }
        }
    }
    assert_eq!(server.round(), None);
    Run {
        result: Ok(result.unwrap()),
        received,
    }
}

fn run(config: Config, inputs: &[Vec<u32>], losses: &Losses, seed: u64) -> Run {
    run_with(config, inputs, losses, seed, &mut |_, _| {})
}

/// The clients whose masked inputs reach the server.
fn masked(config: Config, losses: &Losses) -> Vec<ClientId> {
    (0..config.clients)
        .filter(|c| losses.get(c).is_none_or(|&r| r > Round::MaskedInputCollection))
        .collect()
}

fn check_exact(losses: Losses) {
    let inputs = random_inputs(CONFIG, 1);
    let run = run(CONFIG, &inputs, &losses, 2);
    let aggregate = run.result.unwrap_or_else(|e| panic!("{losses:?}: {e}"));
    let clients = masked(CONFIG, &losses);
    assert_eq!(aggregate.clients, clients, "{losses:?}");
    assert_eq!(aggregate.sum, plain_sum(&inputs, clients.into_iter()), "{losses:?}");
}

#[test]
fn the_sum_is_exact_with_clients_lost_after_masking() {
    for lost in [&[][..], &[4], &[0, 5, 9]] {
        check_exact(lost.iter().map(|&c| (c, Round::Unmasking)).collect());
    }
}

#[test]
fn the_sum_is_exact_with_clients_lost_before_masking() {
    use Round::*;
    let cases: [&[(ClientId, Round)]; 6] = [
        &[(3, MaskedInputCollection)],
        &[
            (1, MaskedInputCollection),
            (6, MaskedInputCollection),
            (8, MaskedInputCollection),
        ],
        &[(2, ShareKeys)],
        &[(7, AdvertiseKeys), (8, ShareKeys)],
        // One lost in each round, the last after masking: 7 survivors answer.
        &[(0, ShareKeys), (5, MaskedInputCollection), (9, Unmasking)],
        &[(9, AdvertiseKeys), (1, MaskedInputCollection), (4, Unmasking)],
    ];
    for losses in cases {
        check_exact(losses.iter().copied().collect());
    }
}

#[test]
fn fewer_survivors_than_the_threshold_is_an_error() {
    let inputs = random_inputs(CONFIG, 1);
    for (round, got) in [
        (Round::AdvertiseKeys, 6),
        (Round::MaskedInputCollection, 6),
        (Round::Unmasking, 6),
    ] {
        let losses = [1, 3, 5, 7].map(|c| (c, round)).into_iter().collect();
        let result = run(CONFIG, &inputs, &losses, 2).result;
        assert_eq!(
            result,
            Err(ServerError::TooFewClients {
                round,
                got,
                threshold: 7
            })
        );
    }
}

#[test]
fn the_server_never_sees_an_input() {
    let inputs = random_inputs(CONFIG, 3);
    let losses: Losses = [(2, Round::MaskedInputCollection), (6, Round::Unmasking)]
        .into_iter()
        .collect();
    let run = run(CONFIG, &inputs, &losses, 4);
    assert!(run.result.is_ok());
    // No 16 bytes of any input, at any word, appear anywhere in what the
    // server received.
    let windows: HashSet<&[u8]> = run.received.iter().flat_map(|(_, bytes)| bytes.windows(16)).collect();
    for input in &inputs {
        let bytes: Vec<u8> = input.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert!(
            (0..=bytes.len() - 16)
                .step_by(4)
                .all(|at| !windows.contains(&bytes[at..at + 16]))
        );
    }
    // Each masked input differs from its input nearly everywhere (a word
    // agrees by chance with probability 2^-32).
    let mut masked_inputs = 0;
    for (from, bytes) in &run.received {
        if let ClientMessage::MaskedInput(y) = postcard::from_bytes(bytes).unwrap() {
            let x = &inputs[*from as usize];
            assert_ne!(&y, x);
            let differing = y.iter().zip(x).filter(|(y, x)| y != x).count();
            assert!(differing >= 990, "client {from}: {differing} of 1000 differ");
            masked_inputs += 1;
        }
    }
    assert_eq!(masked_inputs, 9);
}

#[test]
fn the_same_seeds_give_the_same_session() {
    let inputs = random_inputs(CONFIG, 5);
    let losses: Losses = [(3, Round::MaskedInputCollection)].into_iter().collect();
    let (a, b, c) = (
        run(CONFIG, &inputs, &losses, 6),
        run(CONFIG, &inputs, &losses, 6),
        run(CONFIG, &inputs, &losses, 7),
    );
    assert_eq!(a.received, b.received);
    assert_eq!(a.result, b.result);
    assert_ne!(a.received, c.received);
    assert_eq!(a.result, c.result);
}

#[test]
fn a_forged_key_share_is_caught() {
    let inputs = random_inputs(CONFIG, 1);
    let losses: Losses = [(8, Round::MaskedInputCollection)].into_iter().collect();
    let run = run_with(CONFIG, &inputs, &losses, 2, &mut |from, message| {
        if let (0, ClientMessage::Unmasking { key_shares, .. }) = (from, message) {
            key_shares[0][0] ^= 1;
        }
    });
    assert_eq!(
        run.result,
        Err(ServerError::Reconstruct {
            client: 8,
            round: Round::Unmasking,
            secret: "mask key",
            reason: "the rebuilt key is not the one it advertised".into(),
        })
    );
}

#[test]
fn relayed_shares_bound_for_another_client_do_not_decrypt() {
    // A server that swaps two ciphertexts in a client's inbox is caught.
    let config = Config {
        vector_len: 4,
        ..CONFIG
    };
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut clients = Vec::new();
    let mut server = Server::new(config).unwrap();
    let mut commands = Vec::new();
    for id in 0..config.clients {
        let (client, advert) = Client::new(config, id, vec![0; 4], &mut rng).unwrap();
        clients.push(client);
        commands = server.receive(id, advert).unwrap();
    }
    let mut next = Vec::new();
    for command in commands {
        let Command::Send { to, message } = command else {
            panic!()
        };
        next = server
            .receive(to, clients[to as usize].receive(message).unwrap())
            .unwrap();
    }
    let Command::Send {
        to: 0,
        message: ServerMessage::Shares(mut inbox),
    } = next.swap_remove(0)
    else {
        panic!()
    };
    let (first, second) = inbox.split_at_mut(1);
    std::mem::swap(&mut first[0].ciphertext, &mut second[0].ciphertext);
    assert_eq!(
        clients[0].receive(ServerMessage::Shares(inbox)),
        Err(secagg::ClientError::Decrypt {
            client: 0,
            round: Round::MaskedInputCollection,
            from: 1
        })
    );
}

#[test]
fn garbled_frames_do_not_decode() {
    let message = ClientMessage::Unmasking {
        self_mask_shares: vec![[7; SHARE_WORDS]],
        key_shares: vec![],
    };
    let bytes = postcard::to_allocvec(&message).unwrap();
    assert!(postcard::from_bytes::<ClientMessage>(&bytes[..bytes.len() - 1]).is_err());
    assert!(postcard::from_bytes::<ClientMessage>(&[9]).is_err());
}

#[test]
fn quantized_updates_sum_securely_within_the_documented_error() {
    let config = Config {
        vector_len: 1000,
        ..CONFIG
    };
    let (clip, clients_max) = (0.25f32, config.clients);
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    let updates: Vec<Vec<f32>> = (0..config.clients)
        .map(|_| {
            (0..config.vector_len)
                .map(|_| (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 0.6)
                .collect()
        })
        .collect();
    let inputs: Vec<Vec<u32>> = updates.iter().map(|u| quantize(u, clip, clients_max)).collect();
    let losses: Losses = [(4, Round::MaskedInputCollection)].into_iter().collect();
    let aggregate = run(config, &inputs, &losses, 9).result.unwrap();
    let count = aggregate.clients.len() as u32;
    assert_eq!(count, 9);
    let decoded = dequantize(&aggregate.sum, clip, clients_max, count);
    let step = quantize_step(clip, clients_max);
    for (i, &got) in decoded.iter().enumerate() {
        let exact: f64 = aggregate
            .clients
            .iter()
            .map(|&c| f64::from(updates[c as usize][i]).clamp(-0.25, 0.25))
            .sum();
        let bound = f64::from(count) * step / 2.0 + exact.abs() * f64::from(f32::EPSILON) / 2.0;
        assert!(
            (f64::from(got) - exact).abs() <= bound * (1.0 + 1e-9),
            "{i}: {got} vs {exact}"
        );
    }
}
