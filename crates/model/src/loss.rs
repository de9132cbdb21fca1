//! Losses and their gradients w.r.t. the model's output scores, computed so
//! that no input overflows: softmax cross-entropy through log-sum-exp and the
//! logistic loss through softplus.

/// `log Σ exp(x)`, shifted by the maximum so that no term overflows.
/// Returns −∞ for an empty slice and NaN if any element is NaN.
pub fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY || !max.is_finite() {
        // Empty, all −∞, or a +∞ (whose log-sum-exp is +∞); NaN survives the sum below.
        return if x.iter().any(|v| v.is_nan()) { f32::NAN } else { max };
    }
    let sum: f32 = x.iter().map(|&v| (v - max).exp()).sum();
    max + sum.ln()
}

/// Softmax cross-entropy of one row of `logits` against the class `label`.
///
/// Writes `scale · (softmax(logits) − onehot(label))`, the gradient of
/// `scale · loss`, into `grad` (which may be a copy of `logits`) and returns
/// the unscaled loss `log Σ exp(logits) − logits[label]`.
pub fn softmax_cross_entropy(logits: &[f32], label: usize, scale: f32, grad: &mut [f32]) -> f32 {
    assert_eq!(
        logits.len(),
        grad.len(),
        "softmax_cross_entropy: logits and grad differ in length"
    );
    assert!(
        label < logits.len(),
        "label {label} out of range for {} classes",
        logits.len()
    );
    let lse = log_sum_exp(logits);
    let loss = lse - logits[label];
    for (g, &z) in grad.iter_mut().zip(logits) {
        *g = scale * (z - lse).exp();
    }
    grad[label] -= scale;
    loss
}

/// Softmax probabilities of one row of `logits` into `probs`.
pub fn softmax(logits: &[f32], probs: &mut [f32]) {
    assert_eq!(logits.len(), probs.len(), "softmax: logits and probs differ in length");
    let lse = log_sum_exp(logits);
    for (p, &z) in probs.iter_mut().zip(logits) {
        *p = (z - lse).exp();
    }
}

/// `1 / (1 + e^−x)` without overflow for large `|x|`.
pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Logistic loss of a score (log-odds of class 1) against a binary label:
/// `softplus(score) − label · score`, returned with its derivative
/// `sigmoid(score) − label` w.r.t. the score.
pub fn logistic(score: f32, positive: bool) -> (f32, f32) {
    // softplus(s) = max(s, 0) + ln(1 + e^−|s|) never overflows, and e^−|s|
    // gives the sigmoid too.
    let e = (-score.abs()).exp();
    let softplus = score.max(0.0) + e.ln_1p();
    let sigmoid = if score >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
    let y = if positive { 1.0 } else { 0.0 };
    (softplus - y * score, sigmoid - y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sum_exp_survives_large_inputs() {
        let v = log_sum_exp(&[1000.0, 1000.0]);
        assert!((v - (1000.0 + 2f32.ln())).abs() < 1e-3, "{v}");
        assert_eq!(log_sum_exp(&[]), f32::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[f32::INFINITY, 0.0]), f32::INFINITY);
        assert!(log_sum_exp(&[f32::NAN, 0.0]).is_nan());
        assert!(log_sum_exp(&[0.0, f32::NAN]).is_nan());
    }

    #[test]
    fn softmax_cross_entropy_matches_definition() {
        let z = [0.5f32, -1.0, 2.0];
        let mut g = [0.0; 3];
        let loss = softmax_cross_entropy(&z, 2, 0.5, &mut g);
        let denom: f64 = z.iter().map(|&v| f64::from(v).exp()).sum();
        let want = -(f64::from(z[2]).exp() / denom).ln();
        assert!((f64::from(loss) - want).abs() < 1e-6);
        for (i, &gi) in g.iter().enumerate() {
            let p = f64::from(z[i]).exp() / denom;
            let y = if i == 2 { 1.0 } else { 0.0 };
            assert!((f64::from(gi) - 0.5 * (p - y)).abs() < 1e-6, "{i}: {gi}");
        }
        // Extreme logits stay finite.
        let loss = softmax_cross_entropy(&[1e30, -1e30], 1, 1.0, &mut [0.0; 2]);
        assert!(loss.is_finite() && loss > 1e29, "{loss}");
    }

    #[test]
    fn logistic_is_stable_and_its_derivative_is_right() {
        for &(s, y) in &[
            (0.0f32, true),
            (3.0, false),
            (-2.5, true),
            (80.0, true),
            (-80.0, true),
            (1e4, false),
        ] {
            let (l, d) = logistic(s, y);
            let (yf, sf) = (if y { 1.0 } else { 0.0 }, f64::from(s));
            let want = if sf.abs() > 30.0 {
                sf.max(0.0) - yf * sf
            } else {
                (1.0 + sf.exp()).ln() - yf * sf
            };
            assert!(
                (f64::from(l) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{s} {y}: {l} vs {want}"
            );
            let p = 1.0 / (1.0 + (-sf).exp());
            assert!((f64::from(d) - (p - yf)).abs() < 1e-6, "{s} {y}: {d}");
        }
        assert_eq!(sigmoid(-1e4), 0.0);
        assert_eq!(sigmoid(1e4), 1.0);
    }
}
