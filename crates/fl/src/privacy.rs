//! Differential privacy for federated averaging (DP-FedAvg): clipping a
//! client's update, Gaussian noise on the sum of updates, and the Rényi-DP
//! accountant that turns (sampling rate, noise multiplier, rounds) into ε.
//!
//! # The mechanism
//!
//! DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially
//! Private Recurrent Language Models") protects a whole client, every row it
//! holds, rather than one row:
//!
//! 1. Each round samples every client independently with probability `q`
//!    (Poisson sampling).
//! 2. Each sampled client clips its update to L2 norm at most `C` with
//!    [`clip_l2`], so adding or removing one client moves the sum of updates
//!    by at most `C`: that is the sensitivity the noise is scaled to.
//! 3. Gaussian noise of standard deviation `σC` per coordinate lands on the
//!    sum, where σ is the noise multiplier. It gets there in one of two ways:
//!    - **Central DP.** The server, trusted to see the clipped updates, adds
//!      N(0, (σC)²) to their sum ([`add_gaussian`] with
//!      [`central_noise_stddev`]) and then divides by the *expected* number of
//!      clients `qN`, not by how many took part: that count is itself private,
//!      and dividing by it would leave the average without the fixed
//!      sensitivity `C/(qN)` the noise is scaled to.
//!    - **Distributed DP.** Each client adds N(0, (σC)²/n) to its own clipped
//!      update ([`distributed_noise_stddev`]) and secure aggregation shows the
//!      server only the sum, whose n independent shares add up to N(0, (σC)²):
//!      the server never sees one update, and what it sees carries the same
//!      noise as under central DP. Take n as the fewest updates a round may
//!      close with (`fl.min_updates`): a round that closes with more carries
//!      more noise, never less, whereas clients that drop out below n would
//!      leave the sum with less noise than the accountant assumes.
//! 4. [`RdpAccountant`] adds up the privacy spent over the rounds and reports
//!    the ε for a chosen δ.
//!
//! # What this does not cover
//!
//! - The accountant's ε holds for Poisson sampling, which is how the engine
//!   samples under `[fl.dp]`. A round that samples a fixed number of clients
//!   ([`crate::FlConfig::sample_size`], the engine's way without `[fl.dp]`)
//!   is sampling without replacement, a different mechanism (Wang, Balle,
//!   Kasiviswanathan 2019 analyse it under replace-one neighbours), which
//!   this ε does not cover.
//! - The noise comes from [`tensor::Rng`] (xoshiro256++, Box-Muller in f64,
//!   rounded to f32): right in distribution, but not cryptographic, and
//!   floating-point samples can leak through their low bits (Mironov 2012,
//!   "On Significance of the Least Significant Bits for Differential
//!   Privacy"). That is enough for simulation and research; a deployment
//!   facing a real adversary needs a CSPRNG and a discrete Gaussian (Canonne,
//!   Kamath, Steinke 2020), which secure aggregation over integers needs
//!   anyway (Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian
//!   Mechanism for Federated Learning with Secure Aggregation").
//!
//! # The accountant
//!
//! One round of the mechanism is the Poisson-subsampled Gaussian mechanism.
//! Its Rényi divergence of order α is ln(A_α)/(α − 1), with A_α from Mironov,
//! Talwar, Zhang 2019 ("Rényi Differential Privacy of the Sampled Gaussian
//! Mechanism", section 3), and rounds compose by adding. The orders and the
//! conversion to (ε, δ) are those of Google's `dp-accounting`
//! (`dp_accounting.rdp.RdpAccountant` with its default orders), so the two
//! agree: `bench/fl_dp_accountant.py` compares them. Integer orders use the
//! exact binomial sum, fractional ones the two-sided series of section 3.3.
//! The one difference: every order's RDP is also bounded by the unsampled
//! Gaussian's, α/(2σ²), which can only lower ε. On the bench's grid it
//! matters only for fractional orders near 1 whose series both give up on
//! (dp-accounting then drops the order): at q = 0.9 with 1,000 rounds or
//! more, where ε is in the thousands, Sinter's is up to 14% lower; elsewhere
//! the two agree to 1e-10.

use std::f64::consts::{PI, SQRT_2};

use serde::{Deserialize, Serialize};
use tensor::Rng;

use crate::error::FlError;

/// Clipping scales by `C/norm` shrunk by 2^-22, four times the relative
/// rounding of one f32 (2^-24), so rounding the scaled values to f32 and
/// summing the norm in f64 cannot carry the result past `C`: the privacy
/// guarantee needs the bound to hold exactly, not nearly.
const CLIP_SHRINK: f64 = 1.0 - 1.0 / (1u64 << 22) as f64;

/// Scales `update` down to L2 norm at most `clip_norm` (`C`) and returns its
/// norm before clipping (summed in f64). An update already within the bound
/// is left bitwise as it was.
///
/// An update with a non-finite value has no norm to scale to; it is zeroed,
/// so the bound still holds, and its non-finite norm is returned so that the
/// caller can refuse it (as [`crate::FlConfig::update_norm_max`]'s check
/// would have).
///
/// Panics if `clip_norm` is not a finite value above 0: the config check
/// refuses such a bound before any round runs.
pub fn clip_l2(update: &mut [f32], clip_norm: f64) -> f64 {
    assert!(
        clip_norm > 0.0 && clip_norm.is_finite(),
        "clip_norm {clip_norm} is not a finite value > 0"
    );
    let norm = update.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    if !norm.is_finite() {
        update.fill(0.0);
    } else if norm > clip_norm {
        let scale = clip_norm / norm * CLIP_SHRINK;
        for x in update.iter_mut() {
            *x = (f64::from(*x) * scale) as f32;
        }
    }
    norm
}

/// Adds independent N(0, stddev²) noise to every value of `sum`, drawn from
/// `rng` (one standard normal per value, in order, so a seed replays).
///
/// Panics if `stddev` is negative or not finite.
pub fn add_gaussian(sum: &mut [f32], stddev: f64, rng: &mut Rng) {
    assert!(
        stddev >= 0.0 && stddev.is_finite(),
        "noise stddev {stddev} is not a finite value >= 0"
    );
    for x in sum.iter_mut() {
        *x = (f64::from(*x) + stddev * rng.normal()) as f32;
    }
}

/// Central DP: the stddev the server adds to the sum of clipped updates, σC.
pub fn central_noise_stddev(noise_multiplier: f64, clip_norm: f64) -> f64 {
    noise_multiplier * clip_norm
}

/// Distributed DP: the stddev each of `clients` clients adds to its own
/// clipped update, σC/√n, so that the sum of `clients` of them carries σC.
pub fn distributed_noise_stddev(noise_multiplier: f64, clip_norm: f64, clients: u32) -> f64 {
    assert!(clients > 0, "distributed noise needs at least one client");
    noise_multiplier * clip_norm / f64::from(clients).sqrt()
}

/// The privacy spent by a federation: every round samples each client with
/// probability `q` and adds Gaussian noise of `noise_multiplier` times the
/// clip norm to the sum of their clipped updates.
///
/// Its whole state is these two numbers and the count of rounds, so a
/// checkpoint holds it (it serializes as `q`, `noise_multiplier`, `rounds`)
/// and a resumed federation reports the same ε. Loading a checkpoint checks
/// the parameters as [`RdpAccountant::new`] does. A federation that changes
/// `q` or σ midway needs one accountant per setting and the RDP of both added
/// per order, which this type does not do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "AccountantFields")]
pub struct RdpAccountant {
    q: f64,
    noise_multiplier: f64,
    rounds: u64,
}

/// What a checkpoint holds, checked before it becomes an [`RdpAccountant`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountantFields {
    q: f64,
    noise_multiplier: f64,
    rounds: u64,
}

impl TryFrom<AccountantFields> for RdpAccountant {
    type Error = FlError;

    fn try_from(fields: AccountantFields) -> Result<Self, FlError> {
        let mut accountant = RdpAccountant::new(fields.q, fields.noise_multiplier)?;
        accountant.compose(fields.rounds);
        Ok(accountant)
    }
}

impl RdpAccountant {
    /// An accountant with no rounds spent. `q` must lie in (0, 1] (1 is no
    /// sampling: every client every round), `noise_multiplier` must be finite
    /// and >= 0 (0 is no noise, and ε is infinite after the first round).
    pub fn new(q: f64, noise_multiplier: f64) -> Result<Self, FlError> {
        if !(q > 0.0 && q <= 1.0) {
            return Err(bad("q", q, "is not in (0, 1]"));
        }
        if !(noise_multiplier >= 0.0 && noise_multiplier.is_finite()) {
            return Err(bad("noise_multiplier", noise_multiplier, "is not a finite value >= 0"));
        }
        Ok(Self {
            q,
            noise_multiplier,
            rounds: 0,
        })
    }

    /// Counts `rounds` more rounds of the mechanism.
    pub fn compose(&mut self, rounds: u64) {
        self.rounds = self.rounds.saturating_add(rounds);
    }

    pub fn q(&self) -> f64 {
        self.q
    }

    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// The smallest ε over the orders for which the rounds so far are
    /// (ε, δ)-DP, and the order that gave it. `delta` must lie in (0, 1).
    ///
    /// With no rounds ε is 0; without noise it is `f64::INFINITY`. When ε is 0
    /// or infinite the order carries no meaning (the first order is returned).
    pub fn epsilon(&self, delta: f64) -> Result<(f64, f64), FlError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(bad("delta", delta, "is not in (0, 1)"));
        }
        // Nothing released is nothing spent; it also keeps 0 · ∞ (no rounds of
        // a noiseless mechanism) out of the sum below.
        if self.rounds == 0 {
            return Ok((0.0, ORDERS[0]));
        }
        let rounds = self.rounds as f64;
        let rdp = ORDERS.map(|order| rounds * rdp_one_round(self.q, self.noise_multiplier, order));
        Ok(epsilon_from_rdp(&rdp, delta))
    }
}

fn bad(name: &'static str, value: f64, why: &'static str) -> FlError {
    FlError::Privacy { name, value, why }
}

/// Rényi orders: dp-accounting's defaults (1.1 to 10.9 in steps of 0.1, the
/// integers 11 to 63, then 128, 256, 512, 1024). Each is computed as
/// dp-accounting computes it (`1 + x / 10.0`), so the same f64 decides
/// whether an order is an integer.
const ORDERS: [f64; ORDERS_LEN] = orders();
const ORDERS_LEN: usize = 99 + 53 + 4;

const fn orders() -> [f64; ORDERS_LEN] {
    let mut out = [0.0; ORDERS_LEN];
    let mut i = 0;
    while i < 99 {
        out[i] = 1.0 + (i + 1) as f64 / 10.0;
        i += 1;
    }
    let mut k = 0;
    while k < 53 {
        out[99 + k] = (11 + k) as f64;
        k += 1;
    }
    out[152] = 128.0;
    out[153] = 256.0;
    out[154] = 512.0;
    out[155] = 1024.0;
    out
}

// The conversion below divides by α − 1 and takes ln(1 − 1/α).
const _: () = assert!(ORDERS[0] > 1.0);

/// Most terms of the fractional-order series before the order is given up
/// (its ln A_α taken as infinite, which leaves only the unsampled bound in
/// [`rdp_one_round`]). Near α = 1 with q >= 0.1 the terms fall only like a
/// power of k and do not get e^-30 below the sum within this many;
/// dp-accounting stops at the same count and gives up the same orders.
const FRACTIONAL_TERMS_MAX: u32 = 1000;

/// The series stops once both halves' terms are falling and the larger is
/// this far (in ln) below the sum: e^-30 ≈ 1e-13 of it.
const FRACTIONAL_TAIL_LN: f64 = 30.0;

/// The Rényi divergence of order `order` of one round.
fn rdp_one_round(q: f64, sigma: f64, order: f64) -> f64 {
    if sigma == 0.0 {
        return f64::INFINITY;
    }
    // No sampling: the plain Gaussian mechanism, α/(2σ²).
    let unsampled = order / (2.0 * sigma * sigma);
    if q == 1.0 {
        return unsampled;
    }
    let log_a = if order.fract() == 0.0 {
        log_a_integer(q, sigma, order as u32)
    } else {
        log_a_fractional(q, sigma, order)
    };
    // Sampling never costs privacy: the sampled mechanism's output is a
    // mixture of the unsampled one's and Rényi divergence is jointly
    // quasi-convex (van Erven and Harremoës 2014, "Rényi Divergence and
    // Kullback-Leibler Divergence"), so α/(2σ²) bounds every order. On the
    // bench's grid it binds only where the fractional series gave an order
    // up; without it ε could fall as q rises to 1 (dp-accounting reports
    // ε ≈ 614,000 at q = 0.9 and 611,000 at q = 1 for σ = 0.3 and 100,000 rounds).
    (log_a / (order - 1.0)).min(unsampled)
}

/// ln A_α for integer α and 0 < q < 1 (Mironov, Talwar, Zhang 2019, section
/// 3.2): A_α = Σ_{k=0..α} C(α, k) (1 − q)^(α−k) q^k exp((k² − k)/(2σ²)),
/// every term positive, summed in log space.
fn log_a_integer(q: f64, sigma: f64, alpha: u32) -> f64 {
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let mut sum = LogSum::default();
    // ln C(α, k) by the ratio C(α, k) = C(α, k − 1)(α − k + 1)/k: no
    // factorial overflows and no log-gamma is needed.
    let mut log_binom = 0.0;
    for k in 0..=alpha {
        if k > 0 {
            log_binom += f64::from(alpha - k + 1).ln() - f64::from(k).ln();
        }
        let kf = f64::from(k);
        sum.add(log_binom + kf * log_q + f64::from(alpha - k) * log_1mq + gauss_exponent(kf, sigma));
    }
    sum.ln()
}

/// ln A_α for fractional α and 0 < q < 1 (Mironov, Talwar, Zhang 2019,
/// section 3.3): A_α splits at z0 = σ² ln(1/q − 1) + 1/2 into two series,
///
/// A0 = Σ_k C(α, k) q^k (1 − q)^(α−k) exp((k² − k)/(2σ²)) · erfc((k − z0)/(√2σ))/2,
/// A1 = Σ_k C(α, k) q^(α−k) (1 − q)^k exp(((α−k)² − (α−k))/(2σ²)) · erfc((z0 − (α−k))/(√2σ))/2.
///
/// Past k = α the binomials alternate in sign; their magnitudes are summed,
/// which can only overstate A_α and so ε, and is what dp-accounting sums.
fn log_a_fractional(q: f64, sigma: f64, alpha: f64) -> f64 {
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let log_odds = log_1mq - log_q;
    // At q = 1/2 the odds term is 0; spelt out so that a σ² that overflows
    // cannot make it ∞ · 0.
    let z0 = if log_odds == 0.0 {
        0.5
    } else {
        sigma * sigma * log_odds + 0.5
    };
    let erfc_scale = SQRT_2 * sigma;
    let ln_half = -std::f64::consts::LN_2;

    let (mut a0, mut a1) = (LogSum::default(), LogSum::default());
    let (mut last0, mut last1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let mut log_binom = 0.0; // ln |C(α, k)|
    for k in 0..FRACTIONAL_TERMS_MAX {
        let kf = f64::from(k);
        if k > 0 {
            log_binom += (alpha - kf + 1.0).abs().ln() - kf.ln();
        }
        let j = alpha - kf;
        let s0 = log_binom
            + kf * log_q
            + j * log_1mq
            + gauss_exponent(kf, sigma)
            + ln_half
            + log_erfc((kf - z0) / erfc_scale);
        let s1 =
            log_binom + j * log_q + kf * log_1mq + gauss_exponent(j, sigma) + ln_half + log_erfc((z0 - j) / erfc_scale);
        // ∞ − ∞ from a σ so small that its square underflows: give the order
        // up rather than guess.
        if s0.is_nan() || s1.is_nan() {
            return f64::INFINITY;
        }
        a0.add(s0);
        a1.add(s1);
        let total = log_add(a0.ln(), a1.ln());
        if s0 < last0 && s1 < last1 && s0.max(s1) < total - FRACTIONAL_TAIL_LN {
            return total;
        }
        last0 = s0;
        last1 = s1;
    }
    f64::INFINITY
}

/// (k² − k)/(2σ²), written out as 0 where k² − k is 0 so that a σ² that
/// underflows to 0 gives ∞ for the other terms but never 0/0.
fn gauss_exponent(k: f64, sigma: f64) -> f64 {
    let num = k * k - k;
    if num == 0.0 { 0.0 } else { num / (2.0 * sigma * sigma) }
}

/// dp-accounting's conversion from RDP to (ε, δ), order by order, keeping
/// the smallest ε and its order (the first one on ties):
///
/// - if δ² > 1 − e^(−r), ε = 0: RDP grows with the order, so r bounds the KL
///   divergence, and total variation is at most √(1 − e^(−KL));
/// - otherwise ε = r + ln(1 − 1/α) − ln(δα)/(α − 1) (Canonne, Kamath,
///   Steinke 2020, "The Discrete Gaussian for Differential Privacy",
///   proposition 12; also Asoodeh et al. 2020).
fn epsilon_from_rdp(rdp: &[f64; ORDERS_LEN], delta: f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, ORDERS[0]);
    for (&order, &r) in ORDERS.iter().zip(rdp) {
        // A_α >= 1 exactly, so a negative r is rounding; NaN would be a bug
        // above and counts as no guarantee.
        let r = if r.is_nan() { f64::INFINITY } else { r.max(0.0) };
        let eps = if delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else {
            r + (-1.0 / order).ln_1p() - (delta * order).ln() / (order - 1.0)
        };
        if eps < best.0 {
            best = (eps, order);
        }
    }
    (best.0.max(0.0), best.1)
}

/// ln Σ e^(x_i), streamed: it keeps the largest term and the sum of the
/// others scaled by it, so no term overflows or underflows on its own.
#[derive(Debug)]
struct LogSum {
    max: f64,
    /// Σ e^(x_i − max).
    scaled: f64,
}

impl Default for LogSum {
    fn default() -> Self {
        Self {
            max: f64::NEG_INFINITY,
            scaled: 0.0,
        }
    }
}

impl LogSum {
    fn add(&mut self, x: f64) {
        debug_assert!(!x.is_nan(), "LogSum::add(NaN)");
        if x == f64::NEG_INFINITY || self.max == f64::INFINITY {
            return;
        }
        if x <= self.max {
            self.scaled += (x - self.max).exp();
        } else {
            self.scaled = self.scaled * (self.max - x).exp() + 1.0;
            self.max = x;
        }
    }

    fn ln(&self) -> f64 {
        if self.max.is_infinite() {
            self.max
        } else {
            self.max + self.scaled.ln()
        }
    }
}

/// ln(e^a + e^b).
fn log_add(a: f64, b: f64) -> f64 {
    let mut sum = LogSum::default();
    sum.add(a);
    sum.add(b);
    sum.ln()
}

/// Below this erfc comes from the power series of erf, above it from the
/// continued fraction, which converges in under 60 terms from here on.
const ERFC_SERIES_MAX: f64 = 2.0;
/// Caps on both expansions' terms; neither needs a tenth of it to converge.
const ERFC_TERMS_MAX: u32 = 500;

/// ln erfc(x), accurate to about 1e-14 relative over the whole line, also
/// where erfc(x) itself underflows (x > 27): the fractional-order series
/// multiplies huge exponentials by tiny tails.
fn log_erfc(x: f64) -> f64 {
    if x.is_nan() {
        x
    } else if x >= ERFC_SERIES_MAX {
        log_erfc_continued_fraction(x)
    } else if x >= 0.0 {
        (-erf_series(x)).ln_1p()
    } else if x > -ERFC_SERIES_MAX {
        erf_series(-x).ln_1p()
    } else {
        // erfc(x) = 2 − erfc(−x), and erfc(−x) < 0.005 here.
        (2.0 - log_erfc_continued_fraction(-x).exp()).ln()
    }
}

/// erf(x) for 0 <= x < 2 by the series of positive terms
/// erf(x) = 2/√π · e^(−x²) · Σ_n 2^n x^(2n+1) / (1·3·…·(2n+1)),
/// which has no cancellation (Abramowitz and Stegun 7.1.6).
fn erf_series(x: f64) -> f64 {
    let two_x2 = 2.0 * x * x;
    let mut term = x;
    let mut sum = x;
    for n in 1..ERFC_TERMS_MAX {
        term *= two_x2 / f64::from(2 * n + 1);
        sum += term;
        if term <= sum * f64::EPSILON * 0.125 {
            break;
        }
    }
    2.0 / PI.sqrt() * (-x * x).exp() * sum
}

/// ln erfc(x) for x >= 2 from the continued fraction
/// √π e^(x²) erfc(x) = 1/(x + (1/2)/(x + (2/2)/(x + (3/2)/(x + …))))
/// (Abramowitz and Stegun 7.1.14), evaluated by the modified Lentz method;
/// the e^(−x²) stays in log space.
fn log_erfc_continued_fraction(x: f64) -> f64 {
    if x == f64::INFINITY {
        return f64::NEG_INFINITY;
    }
    const TINY: f64 = 1e-300;
    let mut f = x;
    let mut c = x;
    let mut d = 0.0;
    for n in 1..ERFC_TERMS_MAX {
        let a = f64::from(n) / 2.0;
        d = x + a * d;
        if d == 0.0 {
            d = TINY;
        }
        d = 1.0 / d;
        c = x + a / c;
        if c == 0.0 {
            c = TINY;
        }
        let delta = c * d;
        f *= delta;
        if (delta - 1.0).abs() < f64::EPSILON {
            break;
        }
    }
    -x * x - 0.5 * PI.ln() - f.ln()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tensor::Rng;

    use super::*;

    fn norm(v: &[f32]) -> f64 {
        v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
    }

    #[test]
    fn clipping_scales_a_long_update_to_the_bound_and_returns_its_norm() {
        let mut v = [3.0f32, 4.0];
        assert_eq!(clip_l2(&mut v, 1.0), 5.0);
        assert!(norm(&v) <= 1.0 && norm(&v) > 1.0 - 1e-6, "{v:?}");
        assert!(
            (f64::from(v[0]) / f64::from(v[1]) - 0.75).abs() < 1e-6,
            "direction kept: {v:?}"
        );

        let mut rng = Rng::new(3);
        for len in [1, 2, 7, 1000, 100_000] {
            for clip_norm in [1e-3, 0.5, 1.0, 10.0] {
                let mut v: Vec<f32> = (0..len).map(|_| (rng.normal() * 50.0) as f32).collect();
                let before = norm(&v);
                assert_eq!(clip_l2(&mut v, clip_norm), before);
                let after = norm(&v);
                assert!(after <= clip_norm, "len {len}: {after} > {clip_norm}");
                assert!(after > clip_norm * (1.0 - 1e-5), "len {len}: {after} shrank too far");
            }
        }
    }

    #[test]
    fn clipping_leaves_a_short_update_untouched() {
        let v = vec![0.1f32, -0.2, 0.3, 1e-30, 0.0];
        let mut w = v.clone();
        assert_eq!(clip_l2(&mut w, 1.0), norm(&v));
        assert_eq!(w, v);
        let mut empty: [f32; 0] = [];
        assert_eq!(clip_l2(&mut empty, 1.0), 0.0);
        // Exactly at the bound is within it.
        let mut w = [3.0f32, 4.0];
        assert_eq!(clip_l2(&mut w, 5.0), 5.0);
        assert_eq!(w, [3.0, 4.0]);
    }

    #[test]
    fn clipping_zeroes_an_update_without_a_norm() {
        let mut v = [1.0f32, f32::INFINITY, 2.0];
        assert_eq!(clip_l2(&mut v, 1.0), f64::INFINITY);
        assert_eq!(v, [0.0; 3]);
        let mut v = [1.0f32, f32::NAN];
        assert!(clip_l2(&mut v, 1.0).is_nan());
        assert_eq!(v, [0.0; 2]);
    }

    /// Mean and standard deviation of `v` about 0 and about its mean.
    fn moments(v: &[f32]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var.sqrt())
    }

    #[test]
    fn noise_has_the_asked_stddev() {
        // 200,000 draws: the sample stddev's own stddev is σ/√(2n) ≈ 0.16% of
        // σ, so 1% is six of those; the mean's is σ/√n.
        const N: usize = 200_000;
        let mut rng = Rng::new(7);
        let mut v = vec![0.0f32; N];
        add_gaussian(&mut v, 3.0, &mut rng);
        let (mean, stddev) = moments(&v);
        assert!(mean.abs() < 5.0 * 3.0 / (N as f64).sqrt(), "mean {mean}");
        assert!((stddev / 3.0 - 1.0).abs() < 0.01, "stddev {stddev}");

        // The noise lands on what is there, and a seed replays it.
        let mut a = vec![10.0f32; 4];
        let mut b = a.clone();
        add_gaussian(&mut a, 0.5, &mut Rng::new(1));
        add_gaussian(&mut b, 0.5, &mut Rng::new(1));
        assert_eq!(a, b);
        assert!(a.iter().all(|&x| (x - 10.0).abs() < 5.0 && x != 10.0), "{a:?}");
    }

    #[test]
    fn distributed_noise_sums_to_the_central_noise() {
        const N: usize = 100_000;
        const CLIENTS: u32 = 10;
        let (sigma, clip_norm) = (1.2, 0.5);
        let per_client = distributed_noise_stddev(sigma, clip_norm, CLIENTS);
        let mut sum = vec![0.0f32; N];
        for client in 0..CLIENTS {
            let mut share = vec![0.0f32; N];
            add_gaussian(&mut share, per_client, &mut Rng::derive(11, u64::from(client)));
            for (s, x) in sum.iter_mut().zip(&share) {
                *s += x;
            }
        }
        let (_, stddev) = moments(&sum);
        let central = central_noise_stddev(sigma, clip_norm);
        assert_eq!(central, 0.6);
        assert!((stddev / central - 1.0).abs() < 0.015, "{stddev} vs {central}");
    }

    #[test]
    fn log_erfc_matches_reference_values() {
        // ln(2) + scipy.special.log_ndtr(-x·√2), scipy 1.17.1.
        let cases: [(f64, f64); 16] = [
            (-3.0, 0.6931361352504468),
            (-0.5, 0.4190391477755596),
            (0.0, 0.0),
            (1e-3, -0.001129015889621443),
            (0.5, -0.7350111298370848),
            (1.0, -1.849605509933249),
            (1.9, -4.93234586278027),
            (2.0, -5.36494126461664),
            (2.1, -5.816010968867557),
            (3.0, -10.720363041981116),
            (5.0, -27.200889545537446),
            (10.0, -102.87988902484493),
            (27.0, -732.8688865078977),
            (30.0, -903.9741171106442),
            (100.0, -10005.177585122668),
            (1e5, -10000000012.085293),
        ];
        for (x, want) in cases {
            let got = log_erfc(x);
            let tol = 1e-13 * f64::max(1.0, want.abs());
            assert!((got - want).abs() <= tol, "log_erfc({x}) = {got}, want {want}");
        }
        assert_eq!(log_erfc(f64::INFINITY), f64::NEG_INFINITY);
        assert_eq!(log_erfc(f64::NEG_INFINITY), std::f64::consts::LN_2);
    }

    #[test]
    fn orders_are_dp_accountings() {
        assert_eq!(ORDERS[0], 1.1);
        assert_eq!(ORDERS[8], 1.9);
        assert_eq!(ORDERS[9], 2.0);
        assert_eq!(ORDERS[98], 10.9);
        assert_eq!(ORDERS[99], 11.0);
        assert_eq!(ORDERS[151], 63.0);
        assert_eq!(ORDERS[155], 1024.0);
        assert!(ORDERS.windows(2).all(|w| w[0] < w[1]));
        // Nine of 1.1..=10.9 are integers (2.0 to 10.0) and take the exact sum.
        assert_eq!(ORDERS[..99].iter().filter(|o| o.fract() == 0.0).count(), 9);
    }

    /// (q, σ, rounds, ε, best order) at δ = 1e-5 from dp-accounting 0.6.0
    /// (Python 3.11.7, numpy 2.4.6, scipy 1.17.1):
    /// `a = dp_accounting.rdp.RdpAccountant(); a.compose(
    /// dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
    /// q, dp_accounting.GaussianDpEvent(sigma)), rounds));
    /// a.get_epsilon_and_optimal_order(1e-5)`.
    const DP_ACCOUNTING: [(f64, f64, u64, f64, f64); 36] = [
        (0.01, 0.5, 1, 4.3951835489313265, 3.4),
        (0.01, 0.5, 20, 6.129602778797695, 2.8),
        (0.01, 0.5, 1000, 15.4721334181956, 2.0),
        (0.01, 1.0, 1, 0.9555491480288791, 9.9),
        (0.01, 1.0, 20, 1.0704660242003823, 9.2),
        (0.01, 1.0, 1000, 2.101366525420273, 7.8),
        (0.01, 2.0, 1, 0.19357815314381346, 37.0),
        (0.01, 2.0, 20, 0.21013272372424296, 36.0),
        (0.01, 2.0, 1000, 0.6861853363943164, 24.0),
        (0.1, 0.5, 1, 7.35527276006338, 3.0),
        (0.1, 0.5, 20, 18.156030500467466, 1.9),
        (0.1, 0.5, 1000, 236.4514167809057, 1.7),
        (0.1, 1.0, 1, 2.1330059954307927, 6.0),
        (0.1, 1.0, 20, 4.224294366910831, 4.2),
        (0.1, 1.0, 1000, 27.163494340026944, 2.0),
        (0.1, 2.0, 1, 0.5259327241842917, 18.0),
        (0.1, 2.0, 20, 1.227109583620802, 12.0),
        (0.1, 2.0, 1000, 8.946956795817709, 3.5),
        (0.5, 0.5, 1, 9.721757109629905, 3.2),
        (0.5, 0.5, 20, 53.71465069934543, 1.7),
        (0.5, 0.5, 1000, 1960.4495865487515, 1.7),
        (0.5, 1.0, 1, 3.8935758858888048, 5.4),
        (0.5, 1.0, 20, 16.57523846008367, 2.3),
        (0.5, 1.0, 1000, 346.0112594415911, 1.9),
        (0.5, 2.0, 1, 1.5228001985408304, 10.5),
        (0.5, 2.0, 20, 6.2290611084024965, 4.1),
        (0.5, 2.0, 1000, 78.72535548550877, 2.0),
        (1.0, 0.5, 1, 10.725509696418232, 3.3),
        (1.0, 0.5, 20, 81.11630842505602, 1.5),
        (1.0, 0.5, 1000, 2311.7782575788606, 1.1),
        (1.0, 1.0, 1, 4.728507067217623, 5.4),
        (1.0, 1.0, 20, 30.12663110385034, 2.0),
        (1.0, 1.0, 1000, 654.8612600716533, 1.2),
        (1.0, 2.0, 1, 2.165715659029443, 9.6),
        (1.0, 2.0, 20, 12.301691480042894, 3.0),
        (1.0, 2.0, 1000, 198.53553359954904, 1.3),
    ];

    fn epsilon(q: f64, sigma: f64, rounds: u64, delta: f64) -> (f64, f64) {
        let mut accountant = RdpAccountant::new(q, sigma).unwrap();
        accountant.compose(rounds);
        accountant.epsilon(delta).unwrap()
    }

    #[test]
    fn epsilon_matches_dp_accounting() {
        let mut worst = 0.0f64;
        for (q, sigma, rounds, want, want_order) in DP_ACCOUNTING {
            let (got, order) = epsilon(q, sigma, rounds, 1e-5);
            let rel = (got / want - 1.0).abs();
            assert!(rel < 0.01, "q {q} σ {sigma} rounds {rounds}: ε {got} vs {want}");
            assert_eq!(order, want_order, "q {q} σ {sigma} rounds {rounds}");
            worst = worst.max(rel);
        }
        assert!(worst < 1e-9, "worst relative error {worst}");
    }

    #[test]
    fn epsilon_grows_with_rounds_and_q_and_falls_with_sigma() {
        let qs = [1e-4, 0.003, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0];
        let sigmas = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 5.0];
        let rounds = [1, 2, 5, 20, 100, 1000, 100_000];
        for &sigma in &sigmas {
            for &r in &rounds {
                let eps: Vec<f64> = qs.iter().map(|&q| epsilon(q, sigma, r, 1e-5).0).collect();
                assert!(eps.windows(2).all(|w| w[0] <= w[1]), "σ {sigma} rounds {r}: {eps:?}");
            }
            for &q in &qs {
                let eps: Vec<f64> = rounds.iter().map(|&r| epsilon(q, sigma, r, 1e-5).0).collect();
                assert!(eps.windows(2).all(|w| w[0] < w[1]), "σ {sigma} q {q}: {eps:?}");
            }
        }
        for &q in &qs {
            for &r in &rounds {
                let eps: Vec<f64> = sigmas.iter().map(|&s| epsilon(q, s, r, 1e-5).0).collect();
                assert!(eps.windows(2).all(|w| w[0] >= w[1]), "q {q} rounds {r}: {eps:?}");
            }
        }
        // A larger δ buys a smaller ε.
        assert!(epsilon(0.1, 1.0, 100, 1e-3).0 < epsilon(0.1, 1.0, 100, 1e-8).0);
    }

    #[test]
    fn no_noise_no_rounds_and_no_sampling() {
        assert_eq!(epsilon(0.1, 0.0, 1, 1e-5).0, f64::INFINITY);
        assert_eq!(epsilon(1.0, 0.0, 1, 1e-5).0, f64::INFINITY);
        assert_eq!(epsilon(0.1, 0.0, 0, 1e-5), (0.0, 1.1));
        assert_eq!(epsilon(0.1, 1.0, 0, 1e-5), (0.0, 1.1));
        // q = 1 is the plain Gaussian mechanism: R rounds of RDP αR/(2σ²),
        // so at α = 2, R = 1, σ = 1 the bound is 1 + ln(1/2) − ln(2δ).
        let delta: f64 = 1e-5;
        let at_order_2 = 1.0 + (0.5f64).ln() - (2.0 * delta).ln();
        let (eps, _) = epsilon(1.0, 1.0, 1, delta);
        assert!(eps <= at_order_2 && eps > 0.0, "{eps} vs {at_order_2}");
        // A great deal of noise spends next to nothing.
        let (eps, _) = epsilon(0.01, 1e4, 1, delta);
        assert!(eps < 1e-3, "{eps}");
    }

    #[test]
    fn bad_parameters_are_named() {
        for (q, sigma, name) in [
            (0.0, 1.0, "q"),
            (1.5, 1.0, "q"),
            (-0.1, 1.0, "q"),
            (f64::NAN, 1.0, "q"),
            (0.1, -1.0, "noise_multiplier"),
            (0.1, f64::NAN, "noise_multiplier"),
            (0.1, f64::INFINITY, "noise_multiplier"),
        ] {
            let err = RdpAccountant::new(q, sigma).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
        let accountant = RdpAccountant::new(0.1, 1.0).unwrap();
        for delta in [0.0, 1.0, -1e-5, 2.0, f64::NAN] {
            let err = accountant.epsilon(delta).unwrap_err().to_string();
            assert!(err.contains("delta"), "{err}");
        }
    }

    #[test]
    fn a_resumed_accountant_reports_the_same_epsilon() {
        let mut accountant = RdpAccountant::new(0.05, 1.1).unwrap();
        accountant.compose(30);
        let saved = toml::to_string(&accountant).unwrap();
        let mut resumed: RdpAccountant = toml::from_str(&saved).unwrap();
        assert_eq!(resumed, accountant);
        assert_eq!(resumed.epsilon(1e-5).unwrap(), accountant.epsilon(1e-5).unwrap());
        resumed.compose(10);
        accountant.compose(10);
        assert_eq!(resumed.epsilon(1e-5).unwrap(), accountant.epsilon(1e-5).unwrap());
        assert_eq!(resumed.rounds(), 40);

        let err = toml::from_str::<RdpAccountant>("q = 1.5\nnoise_multiplier = 1.0\nrounds = 3\n").unwrap_err();
        assert!(err.to_string().contains("q = 1.5"), "{err}");
        assert!(toml::from_str::<RdpAccountant>("q = 0.5\nnoise_multiplier = 1.0\nrounds = 3\nsigma = 2\n").is_err());
    }

    fn any_q() -> impl Strategy<Value = f64> {
        prop_oneof![
            0.0..=1.0f64,
            Just(1.0),
            Just(f64::MIN_POSITIVE),
            Just(5e-324),
            Just(1.0 - f64::EPSILON / 2.0),
            Just(0.5),
        ]
        .prop_filter("q in (0, 1]", |&q| q > 0.0)
    }

    fn any_sigma() -> impl Strategy<Value = f64> {
        prop_oneof![
            0.0..100.0f64,
            Just(0.0),
            Just(5e-324),
            Just(1e-160),
            Just(1e160),
            Just(f64::MAX),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn epsilon_is_a_number_for_any_valid_parameters(
            q in any_q(),
            sigma in any_sigma(),
            rounds in prop_oneof![0..2000u64, Just(u64::MAX)],
            delta in prop_oneof![1e-300..1.0f64, Just(f64::MIN_POSITIVE), Just(1.0 - f64::EPSILON)],
        ) {
            let (eps, order) = epsilon(q, sigma, rounds, delta);
            prop_assert!(eps >= 0.0, "ε {eps}");
            prop_assert!(ORDERS.contains(&order));
            // Sampling never costs privacy.
            let (unsampled, _) = epsilon(1.0, sigma, rounds, delta);
            prop_assert!(eps <= unsampled, "ε {eps} at q {q} above {unsampled} at q = 1");
        }
    }
}
