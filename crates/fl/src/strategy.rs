//! Aggregation strategies: how a round's accepted updates become the next
//! global model, and the server optimizer state some of them keep.
//!
//! Every strategy first reduces the updates to one change Δ (a weighted mean,
//! a coordinate-wise median or trimmed mean, or Krum's choice), then applies
//! it: `w += η·Δ` (FedAvg and the robust rules), `m = β·m + Δ; w += η·m`
//! (FedAvgM), or an adaptive step on Δ as a negative gradient (FedAdam,
//! FedYogi, FedAdagrad; Reddi et al. 2021, Algorithm 2, without bias
//! correction, with `v` starting at zero).
//!
//! Under differential privacy ([`Strategy::aggregate_private`]) Δ is instead
//! the noised, unweighted mean of DP-FedAvg, `(Σ updates + noise) / (q·N)`,
//! and only the strategies that apply a mean (FedAvg, FedAvgM and the
//! adaptive ones) take it; the config check refuses the others.
//!
//! Sums run in `f64` over the updates in the order given (ascending client),
//! so the same updates give bitwise the same model in any arrival order.

use serde::{Deserialize, Serialize};
use tensor::Rng;

use crate::config::{StrategyConfig, StrategyKind};
use crate::update::Update;

/// A strategy and its server-side state, sized to the model.
#[derive(Clone, Debug)]
pub struct Strategy {
    cfg: StrategyConfig,
    /// FedAvgM's momentum, or the adaptive optimizers' first moment.
    m: Vec<f32>,
    /// The adaptive optimizers' second moment.
    v: Vec<f32>,
    /// Scratch: Δ in f64, and one coordinate's values across the updates.
    delta: Vec<f64>,
    column: Vec<f32>,
}

/// A strategy's state, for a checkpoint of the server.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StrategyState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// What one aggregation did.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregated {
    /// L2 norm of Δ.
    pub delta_norm: f64,
    /// Krum: the client whose update was taken.
    pub chosen: Option<u64>,
}

/// DP-FedAvg's noise and denominator for one round.
#[derive(Clone, Debug)]
pub struct PrivateMean {
    /// Per coordinate, on the sum of the updates: σC.
    pub stddev: f64,
    /// The denominator q·N: the expected number of clients, not how many answered.
    pub expected_clients: f64,
    /// The round's noise stream; one standard normal per coordinate, in order.
    pub rng: Rng,
}

impl Strategy {
    pub fn new(cfg: StrategyConfig, model_len: usize) -> Self {
        let (m, v) = match cfg.kind {
            StrategyKind::FedAvgM => (vec![0.0; model_len], Vec::new()),
            StrategyKind::FedAdam | StrategyKind::FedYogi | StrategyKind::FedAdagrad => {
                (vec![0.0; model_len], vec![0.0; model_len])
            }
            _ => (Vec::new(), Vec::new()),
        };
        Self {
            cfg,
            m,
            v,
            delta: Vec::new(),
            column: Vec::new(),
        }
    }

    pub fn kind(&self) -> StrategyKind {
        self.cfg.kind
    }

    pub fn state(&self) -> StrategyState {
        StrategyState {
            m: self.m.clone(),
            v: self.v.clone(),
        }
    }

    /// Restores a checkpointed state; refused (returning why) when its sizes do not fit.
    pub fn load_state(&mut self, state: StrategyState) -> Result<(), String> {
        if state.m.len() != self.m.len() || state.v.len() != self.v.len() {
            return Err(format!(
                "the {} state holds {} and {} values, the model needs {} and {}",
                self.cfg.kind.name(),
                state.m.len(),
                state.v.len(),
                self.m.len(),
                self.v.len()
            ));
        }
        self.m = state.m;
        self.v = state.v;
        Ok(())
    }

    /// Folds `updates` (checked, each `global.len()` long, in ascending client
    /// order, at least one) into `global`.
    pub fn aggregate(&mut self, global: &mut [f32], updates: &[&Update]) -> Aggregated {
        assert!(!updates.is_empty(), "aggregate needs at least one update");
        self.start(global, updates);
        let mut chosen = None;
        match self.cfg.kind {
            StrategyKind::Median => self.per_coordinate(updates, median),
            StrategyKind::TrimmedMean => {
                let trim = (self.cfg.trim_fraction * updates.len() as f64).floor() as usize;
                self.per_coordinate(updates, |col| trimmed_mean(col, trim))
            }
            StrategyKind::Krum => {
                let i = krum(updates, self.cfg.byzantine as usize);
                chosen = Some(updates[i].client);
                for (d, &x) in self.delta.iter_mut().zip(&updates[i].delta) {
                    *d = x as f64;
                }
            }
            _ => {
                let total: f64 = updates.iter().map(|u| u.samples as f64).sum();
                for u in updates {
                    let w = u.samples as f64 / total;
                    for (d, &x) in self.delta.iter_mut().zip(&u.delta) {
                        *d += w * x as f64;
                    }
                }
            }
        }
        let delta_norm = self.delta.iter().map(|d| d * d).sum::<f64>().sqrt();
        self.apply(global);
        Aggregated { delta_norm, chosen }
    }

    /// DP-FedAvg: `Δ[j] = (Σ_k update_k[j] + stddev·z[j]) / expected_clients`, with
    /// `z[j]` the `j`-th standard normal of `noise.rng` and the sum unweighted
    /// over `updates` (checked, clipped, in ascending client order; possibly
    /// none, when Δ is the noise alone); then applied as the strategy applies
    /// its mean.
    ///
    /// Panics for a strategy that does not apply a mean, or a denominator
    /// that is not a finite value above 0: the config check refuses both.
    pub fn aggregate_private(&mut self, global: &mut [f32], updates: &[&Update], mut noise: PrivateMean) -> Aggregated {
        assert!(
            matches!(
                self.cfg.kind,
                StrategyKind::FedAvg
                    | StrategyKind::FedAvgM
                    | StrategyKind::FedAdam
                    | StrategyKind::FedYogi
                    | StrategyKind::FedAdagrad
            ),
            "{} does not apply a mean, which DP-FedAvg's noise is scaled to",
            self.cfg.kind.name()
        );
        assert!(
            noise.expected_clients > 0.0 && noise.expected_clients.is_finite(),
            "DP denominator {} is not a finite value > 0",
            noise.expected_clients
        );
        assert!(
            noise.stddev >= 0.0 && noise.stddev.is_finite(),
            "noise stddev {} is not a finite value >= 0",
            noise.stddev
        );
        self.start(global, updates);
        for u in updates {
            for (d, &x) in self.delta.iter_mut().zip(&u.delta) {
                *d += x as f64;
            }
        }
        for d in self.delta.iter_mut() {
            *d = (*d + noise.stddev * noise.rng.normal()) / noise.expected_clients;
        }
        let delta_norm = self.delta.iter().map(|d| d * d).sum::<f64>().sqrt();
        self.apply(global);
        Aggregated {
            delta_norm,
            chosen: None,
        }
    }

    /// Checks what every aggregation assumes of its updates (ascending
    /// clients, the model's length) and zeroes Δ.
    fn start(&mut self, global: &[f32], updates: &[&Update]) {
        assert!(
            updates.windows(2).all(|w| w[0].client < w[1].client),
            "updates out of client order"
        );
        let len = global.len();
        assert!(
            updates.iter().all(|u| u.delta.len() == len),
            "an unchecked update reached the aggregate"
        );
        self.delta.clear();
        self.delta.resize(len, 0.0);
    }

    fn per_coordinate(&mut self, updates: &[&Update], reduce: impl Fn(&mut [f32]) -> f64) {
        for j in 0..self.delta.len() {
            self.column.clear();
            self.column.extend(updates.iter().map(|u| u.delta[j]));
            self.delta[j] = reduce(&mut self.column);
        }
    }

    fn apply(&mut self, global: &mut [f32]) {
        let c = &self.cfg;
        let lr = c.server_lr as f64;
        match c.kind {
            StrategyKind::FedAvgM => {
                for ((w, m), &d) in global.iter_mut().zip(&mut self.m).zip(&self.delta) {
                    let mn = c.momentum as f64 * *m as f64 + d;
                    *m = mn as f32;
                    *w = (*w as f64 + lr * mn) as f32;
                }
            }
            StrategyKind::FedAdam | StrategyKind::FedYogi | StrategyKind::FedAdagrad => {
                let (b1, b2, tau) = (c.beta1 as f64, c.beta2 as f64, c.tau as f64);
                for (((w, m), v), &d) in global.iter_mut().zip(&mut self.m).zip(&mut self.v).zip(&self.delta) {
                    let mn = b1 * *m as f64 + (1.0 - b1) * d;
                    let d2 = d * d;
                    let vo = *v as f64;
                    let vn = match c.kind {
                        StrategyKind::FedAdam => b2 * vo + (1.0 - b2) * d2,
                        StrategyKind::FedYogi => vo - (1.0 - b2) * d2 * (vo - d2).signum(),
                        _ => vo + d2,
                    };
                    *m = mn as f32;
                    *v = vn as f32;
                    *w = (*w as f64 + lr * mn / (vn.sqrt() + tau)) as f32;
                }
            }
            _ => {
                for (w, &d) in global.iter_mut().zip(&self.delta) {
                    *w = (*w as f64 + lr * d) as f32;
                }
            }
        }
    }
}

/// The median of `col` (the mean of the two middle values for an even count).
fn median(col: &mut [f32]) -> f64 {
    let n = col.len();
    let mid = n / 2;
    let (_, &mut hi, _) = col.select_nth_unstable_by(mid, f32::total_cmp);
    if n % 2 == 1 {
        return hi as f64;
    }
    let lo = col[..mid].iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (lo as f64 + hi as f64) / 2.0
}

/// The mean of `col` without its `trim` smallest and `trim` largest values.
fn trimmed_mean(col: &mut [f32], trim: usize) -> f64 {
    let trim = trim.min((col.len() - 1) / 2);
    col.sort_unstable_by(f32::total_cmp);
    let kept = &col[trim..col.len() - trim];
    kept.iter().map(|&x| x as f64).sum::<f64>() / kept.len() as f64
}

/// Krum: the index of the update whose summed squared distance to its
/// `n − f − 2` nearest others is smallest (ties to the lower client). With too
/// few updates for `f` (a round closed short), it scores against all others.
fn krum(updates: &[&Update], f: usize) -> usize {
    let n = updates.len();
    let mut dist = vec![0.0f64; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let d: f64 = updates[i]
                .delta
                .iter()
                .zip(&updates[j].delta)
                .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                .sum();
            dist[i * n + j] = d;
            dist[j * n + i] = d;
        }
    }
    let neighbours = n.saturating_sub(f + 2).max(1).min(n - 1);
    let mut best = (f64::INFINITY, 0);
    for i in 0..n {
        let mut row: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| dist[i * n + j]).collect();
        row.sort_unstable_by(f64::total_cmp);
        let score: f64 = row.iter().take(neighbours).sum();
        if score < best.0 {
            best = (score, i);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(client: u64, samples: u64, delta: Vec<f32>) -> Update {
        Update {
            client,
            round: 1,
            samples,
            train_loss: 0.0,
            delta,
        }
    }

    fn run(kind: StrategyKind, global: &mut [f32], updates: &[Update]) -> Aggregated {
        let cfg = StrategyConfig {
            kind,
            ..StrategyConfig::default()
        };
        let mut s = Strategy::new(cfg, global.len());
        let refs: Vec<&Update> = updates.iter().collect();
        s.aggregate(global, &refs)
    }

    #[test]
    fn fedavg_weights_by_samples() {
        let mut w = vec![1.0, 1.0];
        run(
            StrategyKind::FedAvg,
            &mut w,
            &[update(1, 1, vec![4.0, 0.0]), update(2, 3, vec![0.0, 4.0])],
        );
        assert_eq!(w, vec![2.0, 4.0]);
    }

    #[test]
    fn the_robust_rules_ignore_one_wild_update() {
        let ups = [
            update(1, 1, vec![1.0]),
            update(2, 1, vec![2.0]),
            update(3, 1, vec![3.0]),
            update(4, 1, vec![4.0]),
            update(5, 1, vec![1000.0]),
        ];
        let mut w = vec![0.0];
        run(StrategyKind::Median, &mut w, &ups);
        assert_eq!(w, vec![3.0]);
        let mut w = vec![0.0];
        let cfg = StrategyConfig {
            kind: StrategyKind::TrimmedMean,
            trim_fraction: 0.2,
            ..StrategyConfig::default()
        };
        let refs: Vec<&Update> = ups.iter().collect();
        Strategy::new(cfg, 1).aggregate(&mut w, &refs);
        assert_eq!(w, vec![3.0]);
        let mut w = vec![0.0];
        let out = run(StrategyKind::Krum, &mut w, &ups);
        assert!(w[0] < 5.0 && out.chosen != Some(5), "{w:?} {out:?}");
        let mut even = vec![0.0];
        run(StrategyKind::Median, &mut even, &ups[..4]);
        assert_eq!(even, vec![2.5]);
    }

    #[test]
    fn fedavgm_accumulates_momentum() {
        let cfg = StrategyConfig {
            kind: StrategyKind::FedAvgM,
            momentum: 0.5,
            ..StrategyConfig::default()
        };
        let mut s = Strategy::new(cfg, 1);
        let u = update(1, 1, vec![1.0]);
        let mut w = vec![0.0];
        s.aggregate(&mut w, &[&u]);
        s.aggregate(&mut w, &[&u]);
        assert_eq!(w, vec![1.0 + 1.5]);
    }

    #[test]
    fn the_adaptive_steps_follow_reddi_et_al() {
        // One step from m = v = 0 with Δ = 0.5: m = 0.1·0.5, v per rule; w = η·m/(√v + τ).
        let d = 0.5f64;
        for (kind, v) in [
            (StrategyKind::FedAdam, 0.01 * d * d),
            (StrategyKind::FedYogi, 0.01 * d * d),
            (StrategyKind::FedAdagrad, d * d),
        ] {
            let mut w = vec![0.0];
            run(kind, &mut w, &[update(1, 1, vec![d as f32])]);
            let want = (0.1 * d / (v.sqrt() + 1e-3)) as f32;
            assert!((w[0] - want).abs() < 1e-6, "{kind:?}: {} vs {want}", w[0]);
        }
    }

    #[test]
    fn the_state_round_trips_and_a_wrong_size_is_refused() {
        let cfg = StrategyConfig {
            kind: StrategyKind::FedAdam,
            ..StrategyConfig::default()
        };
        let mut a = Strategy::new(cfg.clone(), 2);
        let mut w = vec![0.0, 0.0];
        a.aggregate(&mut w, &[&update(1, 1, vec![1.0, -1.0])]);
        let mut b = Strategy::new(cfg.clone(), 2);
        b.load_state(a.state()).unwrap();
        let (mut wa, mut wb) = (w.clone(), w.clone());
        let u = update(1, 1, vec![0.5, 0.25]);
        a.aggregate(&mut wa, &[&u]);
        b.aggregate(&mut wb, &[&u]);
        assert_eq!(wa, wb);
        assert!(Strategy::new(cfg, 3).load_state(a.state()).is_err());
    }
}
