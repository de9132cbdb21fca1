//! Federated learning as engines that do no IO.
//!
//! A federation trains one global model over clients that keep their data.
//! Each round the server samples some of the connected clients, sends them
//! the global model, and each sampled client trains on its own rows and
//! returns its change (an [`Update`]); the server checks every update, folds
//! the accepted ones into the global model with a [`Strategy`], and starts
//! the next round.
//!
//! [`Rounds`] is the server's engine: it takes [`Event`]s (a client joined or
//! left, an update arrived, time passed) and returns [`Command`]s (send the
//! model to client 7 for round 3; round 3 closed). It never sees a socket or
//! a clock, so the same engine runs behind real connections (`sinter fl
//! server`), behind thousands of virtual clients in one process (`sinter fl
//! sim`), and in tests that assert the exact commands.
//!
//! Differential privacy (DP-FedAvg, `[fl.dp]`, [`DpConfig`]) is a set of
//! pure functions beside the engine, which the engine and the clients' local
//! training use: clients clip their updates with [`clip_l2`] (through
//! [`LocalSpec::clip_norm`]), Gaussian noise lands on the sum
//! ([`add_gaussian`], centrally or spread over the clients), and
//! [`RdpAccountant`] reports the ε spent so far. With `[fl.dp]` the engine
//! samples clients by Poisson sampling, holds updates to the clip norm,
//! noises their unweighted mean and reports ε after every round (see
//! `round.rs` for why each is so).
//!
//! # What the runtime must guarantee
//!
//! 1. **Time only moves forward.** Every event carries `now_ms` from one
//!    monotonic clock; a value smaller than an earlier one is a bug.
//! 2. **Ticks.** While a round is open the runtime delivers an event (a
//!    [`Event::Tick`] if nothing else happens) no later than
//!    [`Rounds::next_deadline_ms`], so the round closes on time.
//! 3. **One identity per connection.** A [`ClientId`] names one connected
//!    client until its `Left`; an id is not reused within a federation.
//! 4. **The model it sends is the engine's.** A [`Command::Train`] asks the
//!    runtime to send [`Rounds::global`] as it is when the command is
//!    returned (it does not change until the round closes).
//!
//! In return the engine guarantees:
//!
//! - every round ends: when all its sampled clients have answered or left,
//!   or at its deadline, whichever comes first (a round that sampled nobody
//!   ends as it opens); a dropout never hangs it;
//! - an update is folded in only for the round it was asked for, only from a
//!   client sampled for that round, at most once per client, and only after
//!   [`check_update`] accepted it (shape, finite values, norm bound); late,
//!   unasked and refused updates are counted in the round's report, and a
//!   refusal names the client;
//! - the choice of clients, and with `[fl.dp]` the noise, is a pure function
//!   of the seed, the round and the set of connected clients, so a
//!   federation replays exactly;
//! - aggregation folds updates in ascending client order, so the same
//!   updates give bitwise the same model whatever order they arrived in.

mod config;
mod error;
mod local;
pub mod msg;
mod privacy;
mod round;
mod strategy;
mod update;

pub use config::{CLIENTS_MAX, DpConfig, DpMode, FlConfig, ROUNDS_MAX, StrategyConfig, StrategyKind};
pub use error::FlError;
pub use local::{
    EVAL_BATCH_ROWS, LocalSpec, LocalTrainer, Metrics, TrainResult, UpdateEncoder, decode_update, metrics, predict_rows,
};
pub use privacy::{RdpAccountant, add_gaussian, central_noise_stddev, clip_l2, distributed_noise_stddev};
pub use round::{Closing, Command, Event, RoundReport, Rounds, RoundsState};
pub use strategy::{Aggregated, PrivateMean, Strategy, StrategyState};
pub use update::{ClientId, Update, UpdateRefusal, check_update};
