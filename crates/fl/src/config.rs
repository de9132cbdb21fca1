//! The typed `[fl]` section of a job config: rounds, sampling, deadlines, the
//! aggregation strategy and differential privacy (`[fl.dp]`), with validation
//! that names the offending key.

use serde::{Deserialize, Serialize};

use crate::error::FlError;

/// `[fl]`: how a federation runs.
///
/// ```toml
/// [fl]
/// rounds = 20
/// clients = 10              # virtual clients (`fl sim`) or local processes (`train`)
/// fraction = 0.5            # share of the connected clients sampled per round
/// min_clients = 2           # a round starts with at least this many connected, and samples at least this many
/// start_clients = 10        # the first round waits for this many (up to round_timeout_ms)
/// min_updates = 2           # a round that reaches its deadline closes with at least this many updates
/// round_timeout_ms = 60000
/// local_epochs = 1
/// partition = "dirichlet:0.5"
/// strategy = { kind = "fedadam", server_lr = 0.01 }
/// ```
///
/// The clients train with the job's `[optim]` and `train.batch_size`; their
/// optimizer state starts afresh every round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlConfig {
    pub rounds: u32,
    pub clients: u32,
    pub fraction: f64,
    pub min_clients: u32,
    /// The first round waits for this many connected clients (0: `min_clients`),
    /// or until `round_timeout_ms`, then starts with at least `min_clients`.
    pub start_clients: u32,
    pub min_updates: u32,
    pub round_timeout_ms: u64,
    pub local_epochs: u32,
    /// How a single training file is split over simulated or local clients:
    /// `iid`, `dirichlet:ALPHA`, `shards:K` or `quantity:BETA` (see `data::federated`).
    pub partition: String,
    /// FedProx's proximal term μ/2·‖w − w_global‖² on the clients; 0 is FedAvg's plain local SGD.
    pub proximal_mu: f32,
    /// An update whose L2 norm exceeds this is refused (0: no bound).
    pub update_norm_max: f64,
    /// Evaluate the global model on the test set every this many rounds (and after the last).
    pub eval_every_rounds: u32,
    /// How a client's update crosses the wire: a `codec` spec (`none`, `fp16`,
    /// `int8`, `qsgd:15`, `sign`, `topk:0.01`, ...; PowerSGD's two rounds are not
    /// supported), with each client's compression error carried to its next
    /// update when `error_feedback` is on.
    pub codec: String,
    pub error_feedback: bool,
    pub strategy: StrategyConfig,
    /// `[fl.dp]`: DP-FedAvg (absent: no differential privacy).
    pub dp: Option<DpConfig>,
}

impl Default for FlConfig {
    fn default() -> Self {
        Self {
            rounds: 10,
            clients: 10,
            fraction: 1.0,
            min_clients: 1,
            start_clients: 0,
            min_updates: 1,
            round_timeout_ms: 600_000,
            local_epochs: 1,
            partition: "iid".into(),
            proximal_mu: 0.0,
            update_norm_max: 0.0,
            eval_every_rounds: 1,
            codec: "none".into(),
            error_feedback: true,
            strategy: StrategyConfig::default(),
            dp: None,
        }
    }
}

/// `[fl.dp]`: client-level differential privacy by DP-FedAvg (McMahan,
/// Ramage, Talwar, Zhang 2018), with central noise.
///
/// ```toml
/// [fl.dp]
/// noise_multiplier = 1.0    # σ: the noise's stddev is σ·clip_norm
/// clip_norm = 0.5           # C: every update is clipped to this L2 norm
/// delta = 1e-5              # the δ the reported ε holds for
/// mode = "central"
/// ```
///
/// With it a round samples each connected client independently with
/// probability `fl.fraction` (Poisson sampling, which the accountant
/// assumes), the clients clip their updates to `clip_norm`, and the server
/// releases `(Σ clipped updates + N(0, (σC)²)) / (q·N)` per coordinate as
/// the round's mean update, unweighted (see `crate::Rounds`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// σ, the noise's stddev over the clip norm (0: no noise, and ε is infinite).
    pub noise_multiplier: f64,
    /// C: the L2 norm each client clips its update to, and the server's bound.
    pub clip_norm: f64,
    /// The δ of the (ε, δ) guarantee each round reports ε for.
    #[serde(default = "DpConfig::default_delta")]
    pub delta: f64,
    #[serde(default)]
    pub mode: DpMode,
}

impl DpConfig {
    fn default_delta() -> f64 {
        1e-5
    }
}

/// `fl.dp.mode`: who adds the noise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpMode {
    /// The server, trusted to see the clipped updates, noises their sum.
    #[default]
    Central,
    /// Each client noises its own update and secure aggregation shows the
    /// server only the sum. Refused by the config check until secure
    /// aggregation is part of a federation's rounds.
    Distributed,
}

/// Most clients a federation admits, and most sampled per round: each sampled
/// client's update is held until its round closes.
pub const CLIENTS_MAX: u32 = 1_000_000;
pub const ROUNDS_MAX: u32 = 1_000_000;

/// `fl.strategy`: how accepted updates become the next global model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StrategyConfig {
    pub kind: StrategyKind,
    /// Server learning rate η: FedAvg and the robust rules apply η times the aggregate
    /// (1 is plain averaging); FedAvgM and the adaptive ones their own step.
    pub server_lr: f32,
    /// FedAvgM's server momentum β.
    pub momentum: f32,
    /// The adaptive optimizers' β1, β2 and τ (Reddi et al. 2021).
    pub beta1: f32,
    pub beta2: f32,
    pub tau: f32,
    /// Trimmed mean: the share of values dropped at each end, per coordinate.
    pub trim_fraction: f64,
    /// Krum: the number of Byzantine clients tolerated (f); needs n > 2f + 2 updates.
    pub byzantine: u32,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self {
            kind: StrategyKind::FedAvg,
            server_lr: 1.0,
            momentum: 0.9,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
            trim_fraction: 0.1,
            byzantine: 1,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// Mean of the updates weighted by the clients' sample counts (McMahan et al. 2017).
    #[default]
    #[serde(rename = "fedavg")]
    FedAvg,
    /// FedAvg with server momentum (Hsu et al. 2019).
    #[serde(rename = "fedavgm")]
    FedAvgM,
    /// Adam on the server over the averaged update (Reddi et al. 2021).
    #[serde(rename = "fedadam")]
    FedAdam,
    #[serde(rename = "fedyogi")]
    FedYogi,
    #[serde(rename = "fedadagrad")]
    FedAdagrad,
    /// Coordinate-wise median (Yin et al. 2018), unweighted.
    Median,
    /// Coordinate-wise trimmed mean (Yin et al. 2018), unweighted.
    TrimmedMean,
    /// Krum (Blanchard et al. 2017): the update closest to its n − f − 2 nearest others.
    Krum,
}

impl StrategyKind {
    pub fn name(self) -> &'static str {
        match self {
            StrategyKind::FedAvg => "fedavg",
            StrategyKind::FedAvgM => "fedavgm",
            StrategyKind::FedAdam => "fedadam",
            StrategyKind::FedYogi => "fedyogi",
            StrategyKind::FedAdagrad => "fedadagrad",
            StrategyKind::Median => "median",
            StrategyKind::TrimmedMean => "trimmed_mean",
            StrategyKind::Krum => "krum",
        }
    }
}

impl FlConfig {
    /// Checks every key; the error names the first bad one as `fl.KEY`.
    pub fn validate(&self) -> Result<(), FlError> {
        let bad = |key: &str, why: String| {
            Err(FlError::Config {
                key: format!("fl.{key}"),
                why,
            })
        };
        if self.rounds == 0 || self.rounds > ROUNDS_MAX {
            return bad("rounds", format!("{} is not in 1..={ROUNDS_MAX}", self.rounds));
        }
        if self.clients == 0 || self.clients > CLIENTS_MAX {
            return bad("clients", format!("{} is not in 1..={CLIENTS_MAX}", self.clients));
        }
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return bad("fraction", format!("{} is not in (0, 1]", self.fraction));
        }
        if self.min_clients == 0 || self.min_clients > CLIENTS_MAX {
            return bad(
                "min_clients",
                format!("{} is not in 1..={CLIENTS_MAX}", self.min_clients),
            );
        }
        if self.start_clients > CLIENTS_MAX {
            return bad(
                "start_clients",
                format!("{} is above {CLIENTS_MAX}", self.start_clients),
            );
        }
        if self.min_updates == 0 || self.min_updates > self.min_clients {
            return bad(
                "min_updates",
                format!(
                    "{} is not in 1..=fl.min_clients ({})",
                    self.min_updates, self.min_clients
                ),
            );
        }
        if self.round_timeout_ms == 0 {
            return bad("round_timeout_ms", "must be above 0".into());
        }
        if self.local_epochs == 0 {
            return bad("local_epochs", "must be at least 1".into());
        }
        if !(self.proximal_mu >= 0.0 && self.proximal_mu.is_finite()) {
            return bad(
                "proximal_mu",
                format!("{} is not a finite value >= 0", self.proximal_mu),
            );
        }
        if !(self.update_norm_max >= 0.0 && self.update_norm_max.is_finite()) {
            return bad(
                "update_norm_max",
                format!("{} is not a finite value >= 0", self.update_norm_max),
            );
        }
        if self.eval_every_rounds == 0 {
            return bad("eval_every_rounds", "must be at least 1".into());
        }
        match self.codec.parse::<codec::CodecSpec>() {
            Ok(codec::CodecSpec::PowerSgd { .. }) => {
                return bad(
                    "codec",
                    "PowerSGD needs two rounds of messages; choose another codec".into(),
                );
            }
            Ok(_) => {}
            Err(e) => return bad("codec", e.to_string()),
        }
        let s = &self.strategy;
        if !(s.server_lr > 0.0 && s.server_lr.is_finite()) {
            return bad(
                "strategy.server_lr",
                format!("{} is not a finite value > 0", s.server_lr),
            );
        }
        for (key, v) in [("momentum", s.momentum), ("beta1", s.beta1), ("beta2", s.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(&format!("strategy.{key}"), format!("{v} is not in [0, 1)"));
            }
        }
        if !(s.tau > 0.0 && s.tau.is_finite()) {
            return bad("strategy.tau", format!("{} is not a finite value > 0", s.tau));
        }
        if !(0.0..0.5).contains(&s.trim_fraction) {
            return bad(
                "strategy.trim_fraction",
                format!("{} is not in [0, 0.5)", s.trim_fraction),
            );
        }
        if let Some(dp) = &self.dp {
            self.validate_dp(dp)?;
        }
        if s.kind == StrategyKind::Krum && self.min_updates <= 2 * s.byzantine + 2 {
            return bad(
                "min_updates",
                format!(
                    "Krum with fl.strategy.byzantine = {} needs every round to close with more than {} updates",
                    s.byzantine,
                    2 * s.byzantine + 2
                ),
            );
        }
        Ok(())
    }

    fn validate_dp(&self, dp: &DpConfig) -> Result<(), FlError> {
        let bad = |key: &str, why: String| {
            Err(FlError::Config {
                key: format!("fl.{key}"),
                why,
            })
        };
        if !(dp.noise_multiplier >= 0.0 && dp.noise_multiplier.is_finite()) {
            return bad(
                "dp.noise_multiplier",
                format!("{} is not a finite value >= 0", dp.noise_multiplier),
            );
        }
        if !(dp.clip_norm > 0.0 && dp.clip_norm.is_finite()) {
            return bad("dp.clip_norm", format!("{} is not a finite value > 0", dp.clip_norm));
        }
        if !(dp.delta > 0.0 && dp.delta < 1.0) {
            return bad("dp.delta", format!("{} is not in (0, 1)", dp.delta));
        }
        if dp.mode == DpMode::Distributed {
            return bad(
                "dp.mode",
                "\"distributed\" has every client noise its own update, which protects it only if \
                 secure aggregation hides each update from the server, and secure aggregation is not \
                 wired into a federation's rounds yet; use \"central\""
                    .into(),
            );
        }
        // The noise is scaled to one client's largest effect on a mean, C/(qN);
        // a median, a trimmed mean or Krum's choice has no such bound.
        if !matches!(
            self.strategy.kind,
            StrategyKind::FedAvg
                | StrategyKind::FedAvgM
                | StrategyKind::FedAdam
                | StrategyKind::FedYogi
                | StrategyKind::FedAdagrad
        ) {
            return bad(
                "strategy.kind",
                format!(
                    "\"{}\" does not combine with [fl.dp]: the noise is scaled to a mean of clipped updates; \
                     use fedavg, fedavgm, fedadam, fedyogi or fedadagrad",
                    self.strategy.kind.name()
                ),
            );
        }
        if self.update_norm_max != 0.0 && self.update_norm_max != dp.clip_norm {
            return bad(
                "update_norm_max",
                format!(
                    "{} differs from fl.dp.clip_norm ({}): with [fl.dp] the server refuses updates above the \
                     clip norm; leave fl.update_norm_max at 0",
                    self.update_norm_max, dp.clip_norm
                ),
            );
        }
        Ok(())
    }

    /// The L2 norm above which the server refuses an update (0: none): with
    /// `[fl.dp]` the clip norm, held exactly; else `update_norm_max`, with
    /// [`crate::check_update`]'s 0.1% slack.
    pub fn norm_bound(&self) -> f64 {
        self.dp.as_ref().map_or(self.update_norm_max, |dp| dp.clip_norm)
    }

    /// How many of `connected` clients a round samples: `fraction` of them,
    /// rounded down, but at least `min_clients` (the caller checks there are that many).
    /// Without `[fl.dp]` only; with it each client is drawn with probability `fraction`.
    pub fn sample_size(&self, connected: usize) -> usize {
        let k = (connected as f64 * self.fraction).floor() as usize;
        k.max(self.min_clients as usize).min(connected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_a_bad_key_is_named() {
        FlConfig::default().validate().unwrap();
        let cfg = FlConfig {
            fraction: 1.5,
            ..FlConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("fl.fraction") && err.contains("1.5"), "{err}");
        let cfg = FlConfig {
            strategy: StrategyConfig {
                beta2: 1.0,
                ..StrategyConfig::default()
            },
            ..FlConfig::default()
        };
        assert!(cfg.validate().unwrap_err().to_string().contains("fl.strategy.beta2"));
    }

    #[test]
    fn sampling_takes_the_fraction_but_at_least_min_clients() {
        let cfg = FlConfig {
            fraction: 0.5,
            min_clients: 2,
            min_updates: 1,
            ..FlConfig::default()
        };
        assert_eq!(cfg.sample_size(10), 5);
        assert_eq!(cfg.sample_size(3), 2);
        assert_eq!(cfg.sample_size(2), 2);
    }

    #[test]
    fn a_strategy_is_written_as_in_the_docs() {
        let cfg: FlConfig =
            toml::from_str("rounds = 3\nstrategy = { kind = \"fedadam\", server_lr = 0.01 }\n").unwrap();
        assert_eq!(cfg.strategy.kind, StrategyKind::FedAdam);
        assert_eq!(cfg.strategy.server_lr, 0.01);
        assert!(toml::from_str::<FlConfig>("strategy = { kind = \"fedsgd\" }").is_err());
    }

    #[test]
    fn dp_is_written_as_in_the_docs_with_delta_and_mode_defaulted() {
        let cfg: FlConfig = toml::from_str("fraction = 0.1\n[dp]\nnoise_multiplier = 1.0\nclip_norm = 0.5\n").unwrap();
        cfg.validate().unwrap();
        let dp = cfg.dp.as_ref().unwrap();
        assert_eq!(
            (dp.noise_multiplier, dp.clip_norm, dp.delta, dp.mode),
            (1.0, 0.5, 1e-5, DpMode::Central)
        );
        assert_eq!(cfg.norm_bound(), 0.5);
        assert_eq!(FlConfig::default().norm_bound(), 0.0);
        // σ and C have no default; an unknown key is refused, and each is named.
        let err = toml::from_str::<FlConfig>("[dp]\nnoise_multiplier = 1.0\n").unwrap_err();
        assert!(err.to_string().contains("clip_norm"), "{err}");
        let err =
            toml::from_str::<FlConfig>("[dp]\nnoise_multiplier = 1.0\nclip_norm = 1.0\nepsilon = 8\n").unwrap_err();
        assert!(err.to_string().contains("epsilon"), "{err}");
        assert!(
            toml::from_str::<FlConfig>("[dp]\nnoise_multiplier = 1.0\nclip_norm = 1.0\nmode = \"local\"\n").is_err()
        );
    }

    #[test]
    fn dp_errors_name_the_key() {
        let dp = DpConfig {
            noise_multiplier: 1.0,
            clip_norm: 0.5,
            delta: 1e-5,
            mode: DpMode::Central,
        };
        let with = |f: &dyn Fn(&mut FlConfig)| {
            let mut cfg = FlConfig {
                dp: Some(dp.clone()),
                ..FlConfig::default()
            };
            f(&mut cfg);
            cfg.validate().map_err(|e| e.to_string())
        };
        with(&|_| {}).unwrap();
        // σ = 0 is allowed (no noise; ε is infinite), and the bound may be spelt out.
        with(&|c| c.dp.as_mut().unwrap().noise_multiplier = 0.0).unwrap();
        with(&|c| c.update_norm_max = 0.5).unwrap();
        let dp_cases: [(&str, f64); 7] = [
            ("noise_multiplier", -1.0),
            ("noise_multiplier", f64::NAN),
            ("noise_multiplier", f64::INFINITY),
            ("clip_norm", 0.0),
            ("clip_norm", f64::INFINITY),
            ("delta", 0.0),
            ("delta", 1.0),
        ];
        for (key, value) in dp_cases {
            let err = with(&|c| {
                let dp = c.dp.as_mut().unwrap();
                match key {
                    "noise_multiplier" => dp.noise_multiplier = value,
                    "clip_norm" => dp.clip_norm = value,
                    _ => dp.delta = value,
                }
            })
            .unwrap_err();
            assert!(
                err.contains(&format!("fl.dp.{key}")) && err.contains(&value.to_string()),
                "{err}"
            );
        }
        let err = with(&|c| c.strategy.kind = StrategyKind::Median).unwrap_err();
        assert!(err.contains("fl.strategy.kind") && err.contains("median"), "{err}");
        let err = with(&|c| c.strategy.kind = StrategyKind::Krum).unwrap_err();
        assert!(err.contains("fl.strategy.kind") && err.contains("krum"), "{err}");
        let err = with(&|c| c.update_norm_max = 2.0).unwrap_err();
        assert!(
            err.contains("fl.update_norm_max") && err.contains("fl.dp.clip_norm"),
            "{err}"
        );
        let err = with(&|c| c.dp.as_mut().unwrap().mode = DpMode::Distributed).unwrap_err();
        assert!(
            err.contains("fl.dp.mode") && err.contains("secure aggregation"),
            "{err}"
        );
        let err = with(&|c| c.strategy.kind = StrategyKind::TrimmedMean).unwrap_err();
        assert!(err.contains("trimmed_mean") && err.contains("fl.dp"), "{err}");
    }
}
