//! Measures one secure-aggregation session in one process (n = 10 clients,
//! threshold 7, the 269,322 parameters of an MLP 784-256-256-10): the bytes
//! each party sends and receives as postcard messages, and each party's CPU
//! time in the engines, against sending and summing the plain updates.
//!
//! `cargo run -p secagg --release --example secagg_cost` prints JSON.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use chacha20::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use secagg::{Client, ClientId, ClientMessage, Command, Config, Round, Server, quantize};
use serde_json::json;

const CLIENTS: u32 = 10;
const THRESHOLD: u32 = 7;
/// 784·256 + 256 + 256·256 + 256 + 256·10 + 10.
const PARAMETERS: u32 = 269_322;
const CLIP: f32 = 0.05;
/// Sessions per scenario; times are the median (and the least) over them.
const REPEATS: usize = 11;

#[derive(Clone, Default)]
struct Party {
    sent_bytes: usize,
    received_bytes: usize,
    cpu: Duration,
}

struct Session {
    clients: Vec<Party>,
    server: Party,
    quantize: Duration,
    summed: usize,
}

/// One session; the clients in `dropped` go silent after sharing their keys.
fn session(config: Config, updates: &[Vec<f32>], dropped: &[ClientId], seed: u64) -> Session {
    let mut clients = vec![Party::default(); config.clients as usize];
    let mut server_party = Party::default();
    let mut queue: VecDeque<(ClientId, Vec<u8>)> = VecDeque::new();
    let mut engines = Vec::new();
    let mut quantize_time = Duration::ZERO;
    for id in 0..config.clients {
        let started = Instant::now();
        let input = quantize(&updates[id as usize], CLIP, config.clients);
        quantize_time += started.elapsed();
        let mut rng = ChaCha20Rng::seed_from_u64(seed ^ (u64::from(id) << 32));
        let started = Instant::now();
        let (engine, advert) = Client::new(config, id, input, &mut rng).expect("a valid client");
        clients[id as usize].cpu += started.elapsed();
        engines.push(engine);
        let bytes = postcard::to_allocvec(&advert).expect("encodes");
        clients[id as usize].sent_bytes += bytes.len();
        queue.push_back((id, bytes));
    }
    let mut server = Server::new(config).expect("a valid server");
    let mut summed = None;
    while summed.is_none() {
        let (commands, elapsed) = match queue.pop_front() {
            Some((from, bytes)) => {
                server_party.received_bytes += bytes.len();
                let message: ClientMessage = postcard::from_bytes(&bytes).expect("decodes");
                let started = Instant::now();
                let commands = server.receive(from, message).expect("an honest client");
                (commands, started.elapsed())
            }
            None => {
                let started = Instant::now();
                let commands = server.close_round().expect("enough clients");
                (commands, started.elapsed())
            }
        };
        server_party.cpu += elapsed;
        for command in commands {
            match command {
                Command::Send { to, message } => {
                    let bytes = postcard::to_allocvec(&message).expect("encodes");
                    server_party.sent_bytes += bytes.len();
                    let gone = dropped.contains(&to) && message.round() >= Round::MaskedInputCollection;
                    if gone {
                        continue;
                    }
                    let party = &mut clients[to as usize];
                    party.received_bytes += bytes.len();
                    let message = postcard::from_bytes(&bytes).expect("decodes");
                    let started = Instant::now();
                    let reply = engines[to as usize].receive(message).expect("an honest server");
                    party.cpu += started.elapsed();
                    let bytes = postcard::to_allocvec(&reply).expect("encodes");
                    party.sent_bytes += bytes.len();
                    queue.push_back((to, bytes));
                }
                Command::Done(aggregate) => summed = Some(aggregate.clients.len()),
            }
        }
    }
    Session {
        clients,
        server: server_party,
        quantize: quantize_time,
        summed: summed.expect("done"),
    }
}

/// The plain alternative's server work: summing the updates as they come.
fn plain_sum(updates: &[Vec<f32>]) -> (Vec<f32>, Duration) {
    let started = Instant::now();
    let mut sum = vec![0f32; updates[0].len()];
    for update in updates {
        for (s, x) in sum.iter_mut().zip(update) {
            *s += x;
        }
    }
    (sum, started.elapsed())
}

fn median(mut values: Vec<Duration>) -> f64 {
    values.sort();
    values[values.len() / 2].as_secs_f64() * 1e3
}

fn least(values: Vec<Duration>) -> f64 {
    values.into_iter().min().expect("runs").as_secs_f64() * 1e3
}

fn main() {
    let config = Config {
        session: 1,
        clients: CLIENTS,
        threshold: THRESHOLD,
        vector_len: PARAMETERS,
    };
    let mut rng = ChaCha20Rng::seed_from_u64(2026);
    let updates: Vec<Vec<f32>> = (0..CLIENTS)
        .map(|_| {
            (0..PARAMETERS)
                .map(|_| (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 0.02)
                .collect()
        })
        .collect();
    let plain_bytes = 4 * PARAMETERS as usize;
    let plain_times: Vec<Duration> = (0..REPEATS)
        .map(|_| std::hint::black_box(plain_sum(&updates)).1)
        .collect();
    let plain_server_ms = median(plain_times.clone());
    let plain_server_ms_min = least(plain_times);

    let mut scenarios = Vec::new();
    for (name, dropped) in [
        ("no dropouts", vec![]),
        ("3 of 10 dropped after sharing keys", vec![7, 8, 9]),
    ] {
        let runs: Vec<Session> = (0..REPEATS).map(|_| session(config, &updates, &dropped, 7)).collect();
        let first = &runs[0];
        let clients: Vec<_> = (0..CLIENTS as usize)
            .map(|id| {
                let party = &first.clients[id];
                json!({
                    "id": id,
                    "sent_bytes": party.sent_bytes,
                    "received_bytes": party.received_bytes,
                    "cpu_ms": median(runs.iter().map(|r| r.clients[id].cpu).collect()),
                    "cpu_ms_min": least(runs.iter().map(|r| r.clients[id].cpu).collect()),
                })
            })
            .collect();
        let surviving: Vec<usize> = (0..CLIENTS as usize)
            .filter(|id| !dropped.contains(&(*id as u32)))
            .collect();
        let client_sent_max = surviving
            .iter()
            .map(|&id| first.clients[id].sent_bytes)
            .max()
            .expect("clients");
        let client_cpu_ms_max = surviving
            .iter()
            .map(|&id| median(runs.iter().map(|r| r.clients[id].cpu).collect()))
            .fold(0.0, f64::max);
        let server_cpu_ms = median(runs.iter().map(|r| r.server.cpu).collect());
        let plain_server_received = surviving.len() * plain_bytes;
        scenarios.push(json!({
            "name": name,
            "dropped_after_sharing": dropped,
            "summed_clients": first.summed,
            "clients": clients,
            "server": {
                "sent_bytes": first.server.sent_bytes,
                "received_bytes": first.server.received_bytes,
                "cpu_ms": server_cpu_ms,
                "cpu_ms_min": least(runs.iter().map(|r| r.server.cpu).collect()),
            },
            "quantize_ms_per_client": median(runs.iter().map(|r| r.quantize).collect()) / f64::from(CLIENTS),
            "plain": {
                "client_sent_bytes": plain_bytes,
                "server_received_bytes": plain_server_received,
                "server_sum_cpu_ms": plain_server_ms,
                "server_sum_cpu_ms_min": plain_server_ms_min,
            },
            "ratio": {
                "client_sent_bytes_max_to_plain": client_sent_max as f64 / plain_bytes as f64,
                "server_received_bytes_to_plain": first.server.received_bytes as f64 / plain_server_received as f64,
                "server_cpu_to_plain_sum": server_cpu_ms / plain_server_ms,
            },
            "client_cpu_ms_max": client_cpu_ms_max,
        }));
    }
    let report = json!({
        "clients": CLIENTS,
        "threshold": THRESHOLD,
        "vector_len": PARAMETERS,
        "encoding": "postcard, frame headers not counted",
        "cpu": format!(
            "Instant around the engine calls only (not encoding), one thread; median and least of {REPEATS} sessions"
        ),
        "scenarios": scenarios,
    });
    println!("{}", serde_json::to_string_pretty(&report).expect("serializes"));
}
