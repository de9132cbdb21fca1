//! `Rounds`: the server's engine. It samples clients, asks them for updates,
//! closes each round when its updates are in or at its deadline, and folds
//! the accepted updates into the global model.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tensor::Rng;

use crate::config::FlConfig;
use crate::strategy::{Strategy, StrategyState};
use crate::update::{ClientId, Update, UpdateRefusal, check_update};

/// What happened, with the runtime's monotonic time.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A client connected (or reconnected under the same id).
    Joined { client: ClientId, now_ms: u64 },
    /// A client's connection ended.
    Left { client: ClientId, now_ms: u64 },
    /// A client's update arrived.
    Update { update: Update, now_ms: u64 },
    /// Nothing else happened; time passed.
    Tick { now_ms: u64 },
}

impl Event {
    fn now_ms(&self) -> u64 {
        match self {
            Event::Joined { now_ms, .. }
            | Event::Left { now_ms, .. }
            | Event::Update { now_ms, .. }
            | Event::Tick { now_ms } => *now_ms,
        }
    }
}

/// What the runtime must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Send [`Rounds::global`] to `client` and ask for its update for `round`.
    Train { client: ClientId, round: u32 },
    /// `client`'s update was kept out of the aggregate; tell it and log it.
    Refused {
        client: ClientId,
        round: u32,
        reason: UpdateRefusal,
    },
    /// A round closed (the model changed if `report.aggregated`).
    Closed(RoundReport),
    /// No round could start: fewer than `fl.min_clients` clients stayed
    /// connected for `fl.round_timeout_ms`. The federation is over.
    Starved {
        round: u32,
        connected: usize,
        needed: usize,
    },
    /// Every round ran. Nothing follows.
    Done,
}

/// How a round ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Closing {
    /// Every sampled client answered, left or was refused.
    AllIn,
    /// The deadline came with at least `fl.min_updates` updates.
    Deadline,
    /// The deadline came with fewer: the model did not change.
    TooFew,
}

/// One closed round, for the runtime's `round` line.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundReport {
    pub round: u32,
    pub sampled: usize,
    /// Updates folded into the model.
    pub updates: usize,
    /// Sampled clients that left or did not answer by the deadline.
    pub dropped: usize,
    /// Updates refused by the checks (their clients were told).
    pub refused: usize,
    /// Updates that arrived for a round that was already closed, while this one was the latest.
    pub late: usize,
    pub samples: u64,
    /// The aggregated clients' training loss, weighted by samples.
    pub train_loss: f64,
    pub closing: Closing,
    pub aggregated: bool,
    pub delta_norm: f64,
    /// Krum's chosen client.
    pub chosen: Option<ClientId>,
    pub opened_ms: u64,
    pub closed_ms: u64,
}

/// The federation's state for a checkpoint: with the config and seed, enough
/// to continue exactly (client sampling is a function of seed and round).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundsState {
    pub rounds_done: u32,
    pub global: Vec<f32>,
    pub strategy: StrategyState,
}

struct OpenRound {
    round: u32,
    sampled: BTreeSet<ClientId>,
    /// Sampled clients that still owe an update and are connected.
    waiting: BTreeSet<ClientId>,
    updates: BTreeMap<ClientId, Update>,
    refused: usize,
    deadline_ms: u64,
    opened_ms: u64,
}

/// The server's engine (see the crate docs for the contract).
pub struct Rounds {
    cfg: FlConfig,
    seed: u64,
    global: Vec<f32>,
    strategy: Strategy,
    connected: BTreeSet<ClientId>,
    rounds_done: u32,
    open: Option<OpenRound>,
    /// When the engine began waiting for enough clients to start a round.
    idle_since_ms: Option<u64>,
    late: usize,
    now_ms: u64,
    /// Rounds open only after [`Rounds::start`], so a runtime can admit a known
    /// set of clients first.
    started: bool,
    /// Whether this engine has opened a round (the first waits for `start_clients`,
    /// after a resume too, so that a restarted server samples from the same clients).
    opened_any: bool,
    finished: bool,
}

impl Rounds {
    /// A federation over `global` (the initial model), from round 1. `cfg` must be valid.
    pub fn new(cfg: FlConfig, seed: u64, global: Vec<f32>) -> Self {
        let strategy = Strategy::new(cfg.strategy.clone(), global.len());
        Self {
            cfg,
            seed,
            global,
            strategy,
            connected: BTreeSet::new(),
            rounds_done: 0,
            open: None,
            idle_since_ms: None,
            late: 0,
            now_ms: 0,
            started: false,
            opened_any: false,
            finished: false,
        }
    }

    /// Continues a checkpointed federation; refused (returning why) when the state does not fit.
    pub fn resume(cfg: FlConfig, seed: u64, state: RoundsState) -> Result<Self, String> {
        let mut r = Self::new(cfg, seed, state.global);
        r.strategy.load_state(state.strategy)?;
        r.rounds_done = state.rounds_done;
        Ok(r)
    }

    pub fn state(&self) -> RoundsState {
        RoundsState {
            rounds_done: self.rounds_done,
            global: self.global.clone(),
            strategy: self.strategy.state(),
        }
    }

    /// The global model; unchanged while a round is open.
    pub fn global(&self) -> &[f32] {
        &self.global
    }

    pub fn rounds_done(&self) -> u32 {
        self.rounds_done
    }

    /// The open round's number, if one is open.
    pub fn open_round(&self) -> Option<u32> {
        self.open.as_ref().map(|o| o.round)
    }

    pub fn connected(&self) -> usize {
        self.connected.len()
    }

    /// When the runtime must next deliver an event, if it must at all.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        if self.finished {
            return None;
        }
        match (&self.open, self.idle_since_ms) {
            (Some(o), _) => Some(o.deadline_ms),
            (None, Some(t)) => Some(t + self.cfg.round_timeout_ms),
            (None, None) => None,
        }
    }

    /// Starts the federation: from now on a round opens whenever enough
    /// clients are connected (the first at once, if they already are).
    pub fn start(&mut self, now_ms: u64) -> Vec<Command> {
        self.started = true;
        self.handle(Event::Tick { now_ms })
    }

    pub fn handle(&mut self, event: Event) -> Vec<Command> {
        let now = event.now_ms();
        assert!(now >= self.now_ms, "time went back from {} to {now}", self.now_ms);
        self.now_ms = now;
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        match event {
            Event::Joined { client, .. } => {
                self.connected.insert(client);
                // A sampled client that comes back before the round closes is asked again.
                if let Some(o) = &mut self.open
                    && o.sampled.contains(&client)
                    && !o.updates.contains_key(&client)
                    && o.waiting.insert(client)
                {
                    out.push(Command::Train { client, round: o.round });
                }
            }
            Event::Left { client, .. } => {
                self.connected.remove(&client);
                if let Some(o) = &mut self.open {
                    o.waiting.remove(&client);
                }
            }
            Event::Update { update, .. } => self.take_update(update, &mut out),
            Event::Tick { .. } => {}
        }
        self.progress(now, &mut out);
        out
    }

    fn take_update(&mut self, update: Update, out: &mut Vec<Command>) {
        let client = update.client;
        let Some(o) = &mut self.open else {
            self.late += 1;
            return;
        };
        if update.round < o.round {
            self.late += 1;
            return;
        }
        let round = o.round;
        let refuse = |reason| Command::Refused { client, round, reason };
        if update.round != round || !o.sampled.contains(&client) {
            out.push(refuse(UpdateRefusal::NotAsked { round: update.round }));
            return;
        }
        if o.updates.contains_key(&client) {
            out.push(refuse(UpdateRefusal::Duplicate));
            return;
        }
        o.waiting.remove(&client);
        match check_update(
            &update.delta,
            update.samples,
            self.global.len(),
            self.cfg.update_norm_max,
        ) {
            Ok(_) => {
                o.updates.insert(client, update);
            }
            Err(reason) => {
                o.refused += 1;
                out.push(refuse(reason));
            }
        }
    }

    fn progress(&mut self, now: u64, out: &mut Vec<Command>) {
        if let Some(o) = &self.open {
            if o.waiting.is_empty() {
                self.close(now, Closing::AllIn, out);
            } else if now >= o.deadline_ms {
                let closing = if o.updates.len() >= self.cfg.min_updates as usize {
                    Closing::Deadline
                } else {
                    Closing::TooFew
                };
                self.close(now, closing, out);
            }
        }
        if self.open.is_some() || self.finished || !self.started {
            return;
        }
        if self.rounds_done >= self.cfg.rounds {
            self.finished = true;
            out.push(Command::Done);
            return;
        }
        let needed = self.cfg.min_clients as usize;
        let since = *self.idle_since_ms.get_or_insert(now);
        let timed_out = now >= since + self.cfg.round_timeout_ms;
        // The first round waits for `start_clients`, until its deadline.
        let wanted = if !self.opened_any && !timed_out {
            needed.max(self.cfg.start_clients as usize)
        } else {
            needed
        };
        if self.connected.len() < wanted {
            if timed_out {
                self.finished = true;
                out.push(Command::Starved {
                    round: self.rounds_done + 1,
                    connected: self.connected.len(),
                    needed,
                });
            }
            return;
        }
        self.idle_since_ms = None;
        self.opened_any = true;
        self.open_next(now, out);
    }

    fn open_next(&mut self, now: u64, out: &mut Vec<Command>) {
        let round = self.rounds_done + 1;
        let pool: Vec<ClientId> = self.connected.iter().copied().collect();
        let k = self.cfg.sample_size(pool.len());
        let sampled = sample(&pool, k, self.seed, round);
        out.extend(sampled.iter().map(|&client| Command::Train { client, round }));
        self.open = Some(OpenRound {
            round,
            waiting: sampled.clone(),
            sampled,
            updates: BTreeMap::new(),
            refused: 0,
            deadline_ms: now + self.cfg.round_timeout_ms,
            opened_ms: now,
        });
    }

    fn close(&mut self, now: u64, closing: Closing, out: &mut Vec<Command>) {
        let o = self.open.take().expect("close without an open round");
        let updates: Vec<&Update> = o.updates.values().collect();
        let samples: u64 = updates.iter().map(|u| u.samples).sum();
        let train_loss = if samples == 0 {
            0.0
        } else {
            updates
                .iter()
                .map(|u| u.train_loss as f64 * u.samples as f64)
                .sum::<f64>()
                / samples as f64
        };
        let aggregated = closing != Closing::TooFew && !updates.is_empty();
        let (delta_norm, chosen) = if aggregated {
            let a = self.strategy.aggregate(&mut self.global, &updates);
            (a.delta_norm, a.chosen)
        } else {
            (0.0, None)
        };
        self.rounds_done = o.round;
        out.push(Command::Closed(RoundReport {
            round: o.round,
            sampled: o.sampled.len(),
            updates: if aggregated { updates.len() } else { 0 },
            dropped: o.sampled.len() - updates.len() - o.refused,
            refused: o.refused,
            late: std::mem::take(&mut self.late),
            samples,
            train_loss,
            closing,
            aggregated,
            delta_norm,
            chosen,
            opened_ms: o.opened_ms,
            closed_ms: now,
        }));
    }
}

/// `k` of `pool` (sorted, distinct) chosen uniformly without replacement by
/// a stream of (seed, round): a partial Fisher–Yates shuffle. Sorted.
fn sample(pool: &[ClientId], k: usize, seed: u64, round: u32) -> BTreeSet<ClientId> {
    let mut v = pool.to_vec();
    let mut rng = Rng::derive(seed, 0xF1_0000_0000 | round as u64);
    for i in 0..k.min(v.len()) {
        let j = i + rng.below((v.len() - i) as u64) as usize;
        v.swap(i, j);
    }
    v.truncate(k);
    v.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rounds: u32, fraction: f64, min_clients: u32, min_updates: u32) -> FlConfig {
        FlConfig {
            rounds,
            fraction,
            min_clients,
            min_updates,
            round_timeout_ms: 1_000,
            ..FlConfig::default()
        }
    }

    fn update(client: ClientId, round: u32, value: f32) -> Update {
        Update {
            client,
            round,
            samples: 10,
            train_loss: 1.0,
            delta: vec![value; 2],
        }
    }

    fn joined(r: &mut Rounds, clients: &[ClientId]) -> Vec<Command> {
        r.start(0);
        clients
            .iter()
            .flat_map(|&client| r.handle(Event::Joined { client, now_ms: 0 }))
            .collect()
    }

    fn closed(cmds: &[Command]) -> &RoundReport {
        cmds.iter()
            .find_map(|c| match c {
                Command::Closed(r) => Some(r),
                _ => None,
            })
            .expect("a round closed")
    }

    #[test]
    fn a_round_starts_with_min_clients_and_closes_when_all_updates_are_in() {
        let mut r = Rounds::new(cfg(1, 1.0, 2, 2), 7, vec![0.0; 2]);
        assert_eq!(r.start(0), vec![]);
        assert_eq!(r.handle(Event::Joined { client: 4, now_ms: 0 }), vec![]);
        assert_eq!(
            r.handle(Event::Joined { client: 9, now_ms: 1 }),
            vec![
                Command::Train { client: 4, round: 1 },
                Command::Train { client: 9, round: 1 }
            ]
        );
        assert_eq!(r.next_deadline_ms(), Some(1_001));
        assert_eq!(
            r.handle(Event::Update {
                update: update(9, 1, 2.0),
                now_ms: 5
            }),
            vec![]
        );
        let cmds = r.handle(Event::Update {
            update: update(4, 1, 4.0),
            now_ms: 6,
        });
        let rep = closed(&cmds);
        assert_eq!(
            (rep.round, rep.updates, rep.dropped, rep.closing),
            (1, 2, 0, Closing::AllIn)
        );
        assert_eq!(cmds.last(), Some(&Command::Done));
        assert_eq!(r.global(), &[3.0, 3.0]);
    }

    #[test]
    fn a_dropout_closes_the_round_at_once_when_the_rest_are_in() {
        let mut r = Rounds::new(cfg(2, 1.0, 3, 1), 7, vec![0.0; 2]);
        joined(&mut r, &[1, 2, 3]);
        r.handle(Event::Update {
            update: update(1, 1, 1.0),
            now_ms: 1,
        });
        r.handle(Event::Update {
            update: update(2, 1, 1.0),
            now_ms: 2,
        });
        let cmds = r.handle(Event::Left { client: 3, now_ms: 3 });
        let rep = closed(&cmds);
        assert_eq!((rep.updates, rep.dropped, rep.closing), (2, 1, Closing::AllIn));
        // Round 2 waits for a third client, and starts when one joins.
        assert_eq!(cmds.len(), 1);
        assert_eq!(r.next_deadline_ms(), Some(1_003));
        assert_eq!(
            r.handle(Event::Joined { client: 5, now_ms: 4 }),
            vec![
                Command::Train { client: 1, round: 2 },
                Command::Train { client: 2, round: 2 },
                Command::Train { client: 5, round: 2 }
            ]
        );
    }

    #[test]
    fn the_deadline_closes_a_round_with_enough_updates_and_drops_late_ones() {
        let mut r = Rounds::new(cfg(2, 1.0, 3, 2), 7, vec![0.0; 2]);
        joined(&mut r, &[1, 2, 3]);
        r.handle(Event::Update {
            update: update(1, 1, 1.0),
            now_ms: 10,
        });
        r.handle(Event::Update {
            update: update(2, 1, 3.0),
            now_ms: 20,
        });
        assert!(r.handle(Event::Tick { now_ms: 999 }).is_empty());
        let cmds = r.handle(Event::Tick { now_ms: 1_000 });
        let rep = closed(&cmds);
        assert_eq!((rep.updates, rep.dropped, rep.closing), (2, 1, Closing::Deadline));
        assert_eq!(r.global(), &[2.0, 2.0]);
        // Client 3's answer to round 1 arrives in round 2: dropped, counted, never applied.
        assert!(
            r.handle(Event::Update {
                update: update(3, 1, 100.0),
                now_ms: 1_001
            })
            .is_empty()
        );
        for c in [1, 2, 3] {
            r.handle(Event::Update {
                update: update(c, 2, 0.0),
                now_ms: 1_002,
            });
        }
        assert_eq!(r.global(), &[2.0, 2.0]);
        assert_eq!(r.rounds_done(), 2);
    }

    #[test]
    fn too_few_updates_at_the_deadline_leave_the_model_unchanged() {
        let mut r = Rounds::new(cfg(1, 1.0, 3, 2), 7, vec![0.5; 2]);
        joined(&mut r, &[1, 2, 3]);
        r.handle(Event::Update {
            update: update(1, 1, 1.0),
            now_ms: 10,
        });
        let cmds = r.handle(Event::Tick { now_ms: 1_000 });
        let rep = closed(&cmds);
        assert_eq!((rep.aggregated, rep.updates, rep.closing), (false, 0, Closing::TooFew));
        assert_eq!(r.global(), &[0.5, 0.5]);
    }

    #[test]
    fn bad_unasked_and_repeated_updates_are_refused_naming_the_client() {
        let mut r = Rounds::new(cfg(1, 0.5, 2, 1), 7, vec![0.0; 2]);
        let cmds = joined(&mut r, &[1, 2, 3, 4]);
        let sampled: Vec<ClientId> = cmds
            .iter()
            .filter_map(|c| match c {
                Command::Train { client, .. } => Some(*client),
                _ => None,
            })
            .collect();
        assert_eq!(sampled.len(), 2);
        let outsider = (1..=4).find(|c| !sampled.contains(c)).unwrap();
        let (a, b) = (sampled[0], sampled[1]);
        assert_eq!(
            r.handle(Event::Update {
                update: update(outsider, 1, 1.0),
                now_ms: 1
            }),
            vec![Command::Refused {
                client: outsider,
                round: 1,
                reason: UpdateRefusal::NotAsked { round: 1 }
            }]
        );
        let mut nan = update(a, 1, 1.0);
        nan.delta[1] = f32::NAN;
        let cmds = r.handle(Event::Update { update: nan, now_ms: 2 });
        assert!(matches!(
            &cmds[0],
            Command::Refused { client, reason: UpdateRefusal::NotFinite { index: 1, .. }, .. } if *client == a
        ));
        let cmds = r.handle(Event::Update {
            update: update(b, 1, 1.0),
            now_ms: 3,
        });
        let rep = closed(&cmds);
        assert_eq!((rep.updates, rep.refused, rep.dropped), (1, 1, 0));
        assert_eq!(r.global(), &[1.0, 1.0]);
    }

    #[test]
    fn a_sampled_client_that_comes_back_is_asked_again() {
        let mut r = Rounds::new(cfg(1, 1.0, 2, 1), 7, vec![0.0; 2]);
        joined(&mut r, &[1, 2]);
        r.handle(Event::Left { client: 2, now_ms: 5 });
        assert_eq!(
            r.handle(Event::Joined { client: 2, now_ms: 6 }),
            vec![Command::Train { client: 2, round: 1 }]
        );
    }

    #[test]
    fn without_enough_clients_the_federation_starves_at_the_deadline() {
        let mut r = Rounds::new(cfg(1, 1.0, 2, 1), 7, vec![0.0; 2]);
        // Before start, joining clients open nothing.
        assert!(r.handle(Event::Joined { client: 1, now_ms: 0 }).is_empty());
        assert!(r.handle(Event::Joined { client: 2, now_ms: 0 }).is_empty());
        assert!(r.handle(Event::Left { client: 2, now_ms: 0 }).is_empty());
        assert!(r.start(0).is_empty());
        assert_eq!(r.next_deadline_ms(), Some(1_000));
        assert_eq!(
            r.handle(Event::Tick { now_ms: 1_000 }),
            vec![Command::Starved {
                round: 1,
                connected: 1,
                needed: 2
            }]
        );
        assert_eq!(r.next_deadline_ms(), None);
    }

    #[test]
    fn the_first_round_waits_for_start_clients_until_its_deadline() {
        let mut c = cfg(2, 1.0, 2, 1);
        c.start_clients = 3;
        let mut r = Rounds::new(c, 7, vec![0.0; 2]);
        r.start(0);
        assert!(r.handle(Event::Joined { client: 1, now_ms: 0 }).is_empty());
        assert!(r.handle(Event::Joined { client: 2, now_ms: 10 }).is_empty());
        // Two of three at the deadline: the round starts with them (min_clients is 2).
        assert_eq!(
            r.handle(Event::Tick { now_ms: 1_000 }),
            vec![
                Command::Train { client: 1, round: 1 },
                Command::Train { client: 2, round: 1 }
            ]
        );
        let mut c = cfg(1, 1.0, 2, 1);
        c.start_clients = 3;
        let mut r = Rounds::new(c, 7, vec![0.0; 2]);
        r.start(0);
        r.handle(Event::Joined { client: 1, now_ms: 0 });
        r.handle(Event::Joined { client: 2, now_ms: 0 });
        assert_eq!(r.handle(Event::Joined { client: 3, now_ms: 5 }).len(), 3);
    }

    #[test]
    fn sampling_is_a_function_of_seed_round_and_clients() {
        let pool: Vec<ClientId> = (0..100).collect();
        let a = sample(&pool, 10, 3, 1);
        assert_eq!(a, sample(&pool, 10, 3, 1));
        assert_ne!(a, sample(&pool, 10, 3, 2));
        assert_eq!(a.len(), 10);
    }

    #[test]
    fn a_resumed_federation_continues_exactly() {
        let run = |r: &mut Rounds, rounds: std::ops::RangeInclusive<u32>| {
            for round in rounds {
                for c in 1..=3 {
                    r.handle(Event::Update {
                        update: update(c, round, round as f32 * c as f32),
                        now_ms: round as u64,
                    });
                }
            }
        };
        let mut fedadam = cfg(4, 1.0, 3, 1);
        fedadam.strategy.kind = crate::StrategyKind::FedAdam;
        let mut whole = Rounds::new(fedadam.clone(), 7, vec![0.0; 2]);
        joined(&mut whole, &[1, 2, 3]);
        run(&mut whole, 1..=4);
        let mut first = Rounds::new(fedadam.clone(), 7, vec![0.0; 2]);
        joined(&mut first, &[1, 2, 3]);
        run(&mut first, 1..=2);
        let state = first.state();
        // The checkpoint is taken between rounds: round 3 is open, its model is the state's.
        assert_eq!(first.open_round(), Some(3));
        let mut second = Rounds::resume(fedadam, 7, state).unwrap();
        joined(&mut second, &[1, 2, 3]);
        run(&mut second, 3..=4);
        assert_eq!(whole.global(), second.global());
    }
}
