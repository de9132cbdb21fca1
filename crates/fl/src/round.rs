//! `Rounds`: the server's engine. It samples clients, asks them for updates,
//! closes each round when its updates are in or at its deadline, and folds
//! the accepted updates into the global model.
//!
//! # With differential privacy (`[fl.dp]`)
//!
//! The engine runs DP-FedAvg with central noise (McMahan, Ramage, Talwar,
//! Zhang 2018, Algorithm 1, with uniform weights), and each round is one
//! step of the mechanism [`RdpAccountant`] accounts for:
//!
//! - **Poisson sampling.** Each connected client is sampled independently
//!   with probability q = `fl.fraction`, because that is the mechanism the
//!   accountant's amplification by sampling is proved for; a fixed-size
//!   sample (the engine's way without `[fl.dp]`) is a different one, which
//!   it does not cover. A round may then draw nobody; it closes at once.
//!   `fl.min_clients` still decides when a round may open.
//! - **A bound of exactly C.** An update whose L2 norm is above
//!   `fl.dp.clip_norm` is refused, without the 0.1% slack of
//!   `fl.update_norm_max`: the noise is scaled to C, so C must hold.
//!   Clients clip with [`crate::clip_l2`], which lands within it.
//! - **A noised mean with a fixed denominator.** The round's change is
//!   `(Σ accepted updates + N(0, (σC)²)) / (q·N)` per coordinate, N being
//!   the clients connected when the round opened (taken as public: the
//!   server sees who connects), then applied by the strategy as any mean
//!   would be. Dividing by the expected count q·N
//!   rather than the number that answered keeps one client's effect at
//!   C/(qN), where the noise was scaled. The updates are not weighted by
//!   their sample counts: a weight would be one more private value to
//!   release, and a client with a large weight would move the mean by more
//!   than C/(qN).
//! - **Every round releases.** A round applies its noised mean however many
//!   updates arrived, none included (an empty sample, every sampled client
//!   gone or refused, or fewer than `fl.min_updates` at the deadline): a
//!   round that kept the model when few clients answered would tell, by the
//!   model it left alone, something about who was sampled that the
//!   accountant does not count. The noise alone then moves the model, as
//!   in the paper's algorithm.
//! - **Replayable noise.** The noise is drawn from a stream of (seed,
//!   round), so a simulation replays exactly. Whoever knows the seed can
//!   subtract the noise: outside a simulation the seed must stay as secret
//!   as the updates (and see `privacy.rs` on a cryptographic source).
//!
//! After every round the engine composes one more round into its
//! [`RdpAccountant`] and reports ε for `fl.dp.delta` in the round's report.
//! The accountant is part of [`RoundsState`], so a resumed federation
//! reports the ε of all its rounds.
//!
//! The ε covers the global models the rounds release. The server's report
//! of a round (how many clients were sampled and answered, their training
//! loss) is the trusted server's own log and carries no noise.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tensor::Rng;

use crate::config::FlConfig;
use crate::privacy::{RdpAccountant, central_noise_stddev};
use crate::strategy::{PrivateMean, Strategy, StrategyState};
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
    /// The deadline came with fewer: the model did not change (without
    /// `[fl.dp]`; with it such a round closes as `Deadline` and releases its
    /// noised mean).
    TooFew,
    /// Poisson sampling (`[fl.dp]`) drew no client: the round closed as it
    /// opened, and the noise alone moved the model.
    Empty,
}

/// One closed round, for the runtime's `round` line.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundReport {
    pub round: u32,
    pub sampled: usize,
    /// Clients connected when the round opened.
    pub connected: usize,
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
    /// With `[fl.dp]`: the ε for `fl.dp.delta` of every round so far, this
    /// one included (`f64::INFINITY` without noise).
    pub epsilon: Option<f64>,
    pub opened_ms: u64,
    pub closed_ms: u64,
}

/// The federation's state for a checkpoint: with the config and seed, enough
/// to continue exactly (client sampling and noise are functions of seed and round).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundsState {
    pub rounds_done: u32,
    pub global: Vec<f32>,
    pub strategy: StrategyState,
    /// With `[fl.dp]`: the privacy spent so far (q, σ and the rounds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accountant: Option<RdpAccountant>,
}

struct OpenRound {
    round: u32,
    /// Clients connected when the round opened (N in the DP mean's q·N).
    connected: usize,
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
    /// With `[fl.dp]`: every closed round composed in.
    accountant: Option<RdpAccountant>,
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
    /// A federation over `global` (the initial model), from round 1. `cfg` must be
    /// valid ([`FlConfig::validate`]); an invalid `[fl.dp]` is a bug of the caller's.
    pub fn new(cfg: FlConfig, seed: u64, global: Vec<f32>) -> Self {
        let strategy = Strategy::new(cfg.strategy.clone(), global.len());
        let accountant = cfg.dp.as_ref().map(|dp| {
            RdpAccountant::new(cfg.fraction, dp.noise_multiplier)
                .unwrap_or_else(|e| panic!("an unchecked [fl.dp] reached the engine: {e}"))
        });
        Self {
            cfg,
            seed,
            global,
            strategy,
            accountant,
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
    ///
    /// With `[fl.dp]` the state's accountant must be for the config's q and σ:
    /// the accountant composes rounds of one setting only, and rounds run
    /// without noise have no finite ε to add up.
    pub fn resume(cfg: FlConfig, seed: u64, state: RoundsState) -> Result<Self, String> {
        let mut r = Self::new(cfg, seed, state.global);
        r.strategy.load_state(state.strategy)?;
        r.rounds_done = state.rounds_done;
        match (&mut r.accountant, state.accountant) {
            (None, None) => {}
            (Some(want), Some(saved)) => {
                if (saved.q(), saved.noise_multiplier()) != (want.q(), want.noise_multiplier()) {
                    return Err(format!(
                        "the checkpoint's privacy was spent at q = {}, σ = {}, the config's fl.fraction and \
                         fl.dp.noise_multiplier are {} and {}; the accountant composes one setting only",
                        saved.q(),
                        saved.noise_multiplier(),
                        want.q(),
                        want.noise_multiplier()
                    ));
                }
                *want = saved;
            }
            (Some(_), None) if state.rounds_done > 0 => {
                return Err(format!(
                    "the checkpoint's {} rounds ran without [fl.dp]: their privacy loss has no bound to continue from",
                    state.rounds_done
                ));
            }
            (Some(_), None) => {}
            (None, Some(_)) => {
                return Err(
                    "the checkpoint's rounds ran with [fl.dp], the config has none: keep fl.dp to continue".into(),
                );
            }
        }
        Ok(r)
    }

    pub fn state(&self) -> RoundsState {
        RoundsState {
            rounds_done: self.rounds_done,
            global: self.global.clone(),
            strategy: self.strategy.state(),
            accountant: self.accountant.clone(),
        }
    }

    /// With `[fl.dp]`: the ε for `fl.dp.delta` of the rounds closed so far.
    pub fn epsilon(&self) -> Option<f64> {
        let (accountant, dp) = (self.accountant.as_ref()?, self.cfg.dp.as_ref()?);
        let (epsilon, _order) = accountant
            .epsilon(dp.delta)
            .unwrap_or_else(|e| panic!("an unchecked fl.dp.delta reached the engine: {e}"));
        Some(epsilon)
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
        let checked = match &self.cfg.dp {
            None => check_update(
                &update.delta,
                update.samples,
                self.global.len(),
                self.cfg.update_norm_max,
            ),
            // Exactly C: the noise is scaled to it. `clip_l2` sums the norm in
            // f64 in the same order as `check_update`, so a clipped update passes.
            Some(dp) => check_update(&update.delta, update.samples, self.global.len(), 0.0).and_then(|norm| {
                if norm > dp.clip_norm {
                    Err(UpdateRefusal::NormAboveBound {
                        norm,
                        bound: dp.clip_norm,
                    })
                } else {
                    Ok(norm)
                }
            }),
        };
        match checked {
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
                let closing = if o.updates.len() >= self.cfg.min_updates as usize || self.cfg.dp.is_some() {
                    Closing::Deadline
                } else {
                    Closing::TooFew
                };
                self.close(now, closing, out);
            }
        }
        // Each pass opens a round; one that sampled nobody closes at once and
        // the next opens, so the loop runs at most once per remaining round.
        while self.open.is_none() && !self.finished && self.started {
            if self.rounds_done >= self.cfg.rounds {
                self.finished = true;
                out.push(Command::Done);
                return;
            }
            let needed = self.cfg.min_clients as usize;
            let since = *self.idle_since_ms.get_or_insert(now);
            let timed_out = now >= since + self.cfg.round_timeout_ms;
            // The first round of this engine waits for `start_clients`, until its deadline.
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
            if self.open.as_ref().is_some_and(|o| o.sampled.is_empty()) {
                self.close(now, Closing::Empty, out);
            }
        }
    }

    fn open_next(&mut self, now: u64, out: &mut Vec<Command>) {
        let round = self.rounds_done + 1;
        let pool: Vec<ClientId> = self.connected.iter().copied().collect();
        let sampled = if self.cfg.dp.is_some() {
            poisson_sample(&pool, self.cfg.fraction, self.seed, round)
        } else {
            sample(&pool, self.cfg.sample_size(pool.len()), self.seed, round)
        };
        out.extend(sampled.iter().map(|&client| Command::Train { client, round }));
        self.open = Some(OpenRound {
            round,
            connected: pool.len(),
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
        let (aggregated, delta_norm, chosen) = match &self.cfg.dp {
            None if closing != Closing::TooFew && !updates.is_empty() => {
                let a = self.strategy.aggregate(&mut self.global, &updates);
                (true, a.delta_norm, a.chosen)
            }
            None => (false, 0.0, None),
            Some(dp) => {
                let noise = PrivateMean {
                    stddev: central_noise_stddev(dp.noise_multiplier, dp.clip_norm),
                    expected_clients: self.cfg.fraction * o.connected as f64,
                    rng: noise_rng(self.seed, o.round),
                };
                let a = self.strategy.aggregate_private(&mut self.global, &updates, noise);
                (true, a.delta_norm, a.chosen)
            }
        };
        self.rounds_done = o.round;
        if let Some(accountant) = &mut self.accountant {
            accountant.compose(1);
        }
        out.push(Command::Closed(RoundReport {
            round: o.round,
            sampled: o.sampled.len(),
            connected: o.connected,
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
            epsilon: self.epsilon(),
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

/// Each of `pool` (sorted, distinct) drawn independently with probability `q`
/// by a stream of (seed, round), in pool order: Poisson sampling, as the
/// privacy accountant assumes. Sorted; may be empty.
fn poisson_sample(pool: &[ClientId], q: f64, seed: u64, round: u32) -> BTreeSet<ClientId> {
    let mut rng = Rng::derive(seed, 0xF2_0000_0000 | round as u64);
    // One draw per client whether or not it is taken, so that a client's
    // fate depends only on its place in the pool.
    pool.iter().copied().filter(|_| rng.next_f64() < q).collect()
}

/// The stream a round's DP noise is drawn from.
fn noise_rng(seed: u64, round: u32) -> Rng {
    Rng::derive(seed, 0xD9_0000_0000 | round as u64)
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

    fn dp_cfg(rounds: u32, fraction: f64, sigma: f64, clip_norm: f64) -> FlConfig {
        FlConfig {
            dp: Some(crate::DpConfig {
                noise_multiplier: sigma,
                clip_norm,
                delta: 1e-5,
                mode: crate::DpMode::Central,
            }),
            ..cfg(rounds, fraction, 1, 1)
        }
    }

    /// Joins `clients` before starting, so the first round samples from all of them.
    fn started_with(r: &mut Rounds, clients: &[ClientId]) -> Vec<Command> {
        let mut cmds: Vec<Command> = clients
            .iter()
            .flat_map(|&client| r.handle(Event::Joined { client, now_ms: 0 }))
            .collect();
        cmds.extend(r.start(0));
        cmds
    }

    fn asked(cmds: &[Command]) -> Vec<(ClientId, u32)> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::Train { client, round } => Some((*client, *round)),
                _ => None,
            })
            .collect()
    }

    /// Answers every `Train` with `value(client, round)` (two values) until
    /// `stop` rounds are done; returns the closed rounds' reports.
    fn drive(
        r: &mut Rounds,
        mut cmds: Vec<Command>,
        stop: u32,
        value: impl Fn(ClientId, u32) -> [f32; 2],
    ) -> Vec<RoundReport> {
        let mut reports = Vec::new();
        loop {
            reports.extend(cmds.iter().filter_map(|c| match c {
                Command::Closed(rep) => Some(rep.clone()),
                _ => None,
            }));
            if r.rounds_done() >= stop {
                return reports;
            }
            let trains = asked(&cmds);
            assert!(!trains.is_empty(), "the engine asked for nothing: {cmds:?}");
            cmds = trains
                .into_iter()
                .flat_map(|(client, round)| {
                    let mut u = update(client, round, 0.0);
                    u.delta = value(client, round).to_vec();
                    r.handle(Event::Update { update: u, now_ms: 1 })
                })
                .collect();
        }
    }

    fn accountant_epsilon(q: f64, sigma: f64, rounds: u64) -> f64 {
        let mut a = RdpAccountant::new(q, sigma).unwrap();
        a.compose(rounds);
        a.epsilon(1e-5).unwrap().0
    }

    #[test]
    fn poisson_sampling_draws_q_n_on_average_and_replays() {
        // 2,000 rounds of N = 1,000 at q = 0.1: the mean size's stddev is
        // √(Nq(1−q)/2000) ≈ 0.21, so 1.5 is seven of them; the size's variance
        // is Nq(1−q) = 90 (0 for a fixed-size sample), its estimate's stddev
        // about 90·√(2/2000) ≈ 2.8, so 18 is six.
        let pool: Vec<ClientId> = (0..1000).collect();
        let sizes: Vec<f64> = (1..=2000)
            .map(|round| poisson_sample(&pool, 0.1, 3, round).len() as f64)
            .collect();
        let mean = sizes.iter().sum::<f64>() / sizes.len() as f64;
        let var = sizes.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (sizes.len() - 1) as f64;
        assert!((mean - 100.0).abs() < 1.5, "mean size {mean}");
        assert!((var - 90.0).abs() < 18.0, "size variance {var}");
        let a = poisson_sample(&pool, 0.1, 3, 1);
        assert_eq!(a, poisson_sample(&pool, 0.1, 3, 1));
        assert_ne!(a, poisson_sample(&pool, 0.1, 3, 2));
        assert_ne!(a, poisson_sample(&pool, 0.1, 4, 1));
        assert!(a.iter().all(|c| pool.contains(c)));
        assert_eq!(poisson_sample(&pool, 1.0, 3, 1).len(), 1000);
    }

    #[test]
    fn a_dp_round_releases_the_noised_unweighted_mean_over_the_expected_count() {
        let (sigma, clip_norm, q) = (0.8, 1.0, 0.5);
        let mut c = dp_cfg(1, q, sigma, clip_norm);
        c.strategy.server_lr = 0.5;
        let mut r = Rounds::new(c, 7, vec![0.25; 2]);
        let pool: Vec<ClientId> = (0..10).collect();
        let cmds = started_with(&mut r, &pool);
        let sampled: Vec<ClientId> = asked(&cmds).iter().map(|&(client, _)| client).collect();
        assert_eq!(sampled, poisson_sample(&pool, q, 7, 1).into_iter().collect::<Vec<_>>());
        assert!(sampled.len() >= 3, "seed 7 samples {sampled:?}");
        // The first sends a long update (refused), the second one clipped to C
        // by clip_l2 (accepted: the bound holds exactly), the rest short ones
        // with different sample counts (which do not weigh).
        let mut ups: Vec<Update> = sampled
            .iter()
            .map(|&client| Update {
                samples: 1 + client * 100,
                delta: vec![0.1 * client as f32, -0.05],
                ..update(client, 1, 0.0)
            })
            .collect();
        ups[0].delta = vec![3.0, 4.0];
        ups[1].delta = vec![30.0, -40.0];
        crate::clip_l2(&mut ups[1].delta, clip_norm);
        let mut last = Vec::new();
        for u in ups.iter().cloned() {
            last = r.handle(Event::Update { update: u, now_ms: 1 });
        }
        let rep = closed(&last).clone();
        assert_eq!((rep.updates, rep.refused, rep.connected), (sampled.len() - 1, 1, 10));
        // By hand: Σ of the accepted updates, plus σC times the round's normals, over qN.
        let mut noise = noise_rng(7, 1);
        let want: Vec<f32> = (0..2)
            .map(|j| {
                let sum: f64 = ups[1..].iter().map(|u| u.delta[j] as f64).sum();
                let mean = (sum + sigma * clip_norm * noise.normal()) / (q * 10.0);
                (0.25f64 + 0.5 * mean) as f32
            })
            .collect();
        assert_eq!(r.global(), want.as_slice());
        assert_eq!(rep.epsilon, Some(accountant_epsilon(q, sigma, 1)));
        assert_eq!(last.last(), Some(&Command::Done));
    }

    #[test]
    fn with_dp_an_update_above_c_is_refused_without_slack() {
        let mut r = Rounds::new(dp_cfg(1, 1.0, 1.0, 5.0), 7, vec![0.0; 2]);
        started_with(&mut r, &[1, 2]);
        let within = Update {
            delta: vec![3.0, 4.0],
            ..update(1, 1, 0.0)
        };
        assert!(
            r.handle(Event::Update {
                update: within,
                now_ms: 1
            })
            .is_empty()
        );
        // 0.02% over C: within update_norm_max's slack, but not within C.
        let over = Update {
            delta: vec![3.0, 4.001],
            ..update(2, 1, 0.0)
        };
        let cmds = r.handle(Event::Update {
            update: over,
            now_ms: 2,
        });
        assert!(
            matches!(&cmds[0], Command::Refused { client: 2, reason: UpdateRefusal::NormAboveBound { bound, .. }, .. } if *bound == 5.0),
            "{cmds:?}"
        );
        assert_eq!((closed(&cmds).updates, closed(&cmds).refused), (1, 1));
    }

    #[test]
    fn an_empty_round_closes_at_once_and_the_noise_alone_moves_the_model() {
        let pool: Vec<ClientId> = vec![1, 2, 3];
        let seed = (0..)
            .find(|&s| poisson_sample(&pool, 0.2, s, 1).is_empty() && !poisson_sample(&pool, 0.2, s, 2).is_empty())
            .unwrap();
        let mut r = Rounds::new(dp_cfg(3, 0.2, 1.0, 0.5), seed, vec![0.0; 2]);
        let cmds = started_with(&mut r, &pool);
        let rep = closed(&cmds);
        assert_eq!(
            (rep.round, rep.sampled, rep.updates, rep.closing, rep.aggregated),
            (1, 0, 0, Closing::Empty, true)
        );
        assert_eq!(rep.epsilon, Some(accountant_epsilon(0.2, 1.0, 1)));
        // Round 2 opened in the same breath.
        assert!(!asked(&cmds).is_empty() && asked(&cmds).iter().all(|&(_, round)| round == 2));
        let mut noise = noise_rng(seed, 1);
        let want: Vec<f32> = (0..2).map(|_| (0.5 * noise.normal() / (0.2 * 3.0)) as f32).collect();
        assert_eq!(r.global(), want.as_slice());
    }

    #[test]
    fn with_dp_a_round_short_of_min_updates_still_releases_at_the_deadline() {
        let mut c = dp_cfg(1, 1.0, 1.0, 1.0);
        (c.min_clients, c.min_updates) = (3, 3);
        let mut r = Rounds::new(c, 7, vec![0.0; 2]);
        started_with(&mut r, &[1, 2, 3]);
        r.handle(Event::Update {
            update: update(1, 1, 0.5),
            now_ms: 1,
        });
        let cmds = r.handle(Event::Tick { now_ms: 1_000 });
        let rep = closed(&cmds);
        assert_eq!(
            (rep.closing, rep.aggregated, rep.updates, rep.dropped),
            (Closing::Deadline, true, 1, 2)
        );
        assert_ne!(r.global(), &[0.0, 0.0]);
    }

    #[test]
    fn epsilon_after_r_rounds_is_the_accountants_and_survives_a_resume() {
        let c = dp_cfg(6, 0.3, 1.1, 1.0);
        let pool: Vec<ClientId> = (0..20).collect();
        let value = |client: ClientId, round: u32| [0.01 * client as f32, -0.02 * round as f32];
        let mut whole = Rounds::new(c.clone(), 5, vec![0.0; 2]);
        let cmds = started_with(&mut whole, &pool);
        let reports = drive(&mut whole, cmds, 6, value);
        assert_eq!(reports.len(), 6);
        for rep in &reports {
            assert_eq!(
                rep.epsilon,
                Some(accountant_epsilon(0.3, 1.1, rep.round as u64)),
                "round {}",
                rep.round
            );
        }
        assert_eq!(whole.epsilon(), reports[5].epsilon);

        // Stop after 3, write the state out and read it back, and go on.
        let mut first = Rounds::new(c.clone(), 5, vec![0.0; 2]);
        let cmds = started_with(&mut first, &pool);
        drive(&mut first, cmds, 3, value);
        let saved = toml::to_string(&first.state()).unwrap();
        let state: RoundsState = toml::from_str(&saved).unwrap();
        assert_eq!(state.accountant.as_ref().map(|a| a.rounds()), Some(3));
        let mut second = Rounds::resume(c.clone(), 5, state.clone()).unwrap();
        assert_eq!(second.epsilon(), reports[2].epsilon);
        let cmds = started_with(&mut second, &pool);
        let rest = drive(&mut second, cmds, 6, value);
        // The same rounds, up to the runtime's clock.
        let untimed = |reps: &[RoundReport]| -> Vec<RoundReport> {
            reps.iter()
                .map(|r| RoundReport {
                    opened_ms: 0,
                    closed_ms: 0,
                    ..r.clone()
                })
                .collect()
        };
        assert_eq!(untimed(&rest), untimed(&reports[3..]));
        assert_eq!(whole.global(), second.global());

        // A state that does not fit the config is refused, saying why.
        let mut other_sigma = c.clone();
        other_sigma.dp.as_mut().unwrap().noise_multiplier = 2.0;
        let err = Rounds::resume(other_sigma, 5, state.clone()).err().unwrap();
        assert!(err.contains("σ"), "{err}");
        let err = Rounds::resume(cfg(6, 0.3, 1, 1), 5, state.clone()).err().unwrap();
        assert!(err.contains("fl.dp"), "{err}");
        let without = RoundsState {
            accountant: None,
            ..state
        };
        let err = Rounds::resume(c, 5, without).err().unwrap();
        assert!(err.contains("without [fl.dp]"), "{err}");
    }
}
