//! Evaluation metrics over predictions in the layout [`crate::Model::predict`]
//! writes: accuracy, log loss and ROC AUC.
//!
//! None of them panics on a value: NaN predictions count as wrong (accuracy),
//! are clamped (log loss) or sort above every number (AUC).

use std::cmp::Ordering;

/// Probability floor of [`log_loss`]: `−ln(1e-7) ≈ 16.1` caps one row's loss.
pub const LOG_LOSS_EPS: f64 = 1e-7;

/// Fraction of rows whose predicted class is the label.
///
/// `probs` is either `rows × classes` (the arg-max is the prediction; the
/// first maximum wins) or, for `classes == 2`, one probability of class 1 per
/// row (class 1 when `p ≥ 0.5`). Returns NaN for no rows.
pub fn accuracy(probs: &[f32], classes: usize, labels: &[u32]) -> f64 {
    let rows = labels.len();
    let correct = if classes == 2 && probs.len() == rows {
        probs
            .iter()
            .zip(labels)
            .filter(|&(&p, &y)| (p >= 0.5) == (y == 1))
            .count()
    } else {
        assert!(classes > 0, "accuracy needs at least one class");
        assert_eq!(
            probs.len(),
            rows * classes,
            "accuracy: {} predictions for {rows} rows × {classes} classes",
            probs.len()
        );
        probs
            .chunks_exact(classes)
            .zip(labels)
            .filter(|&(row, &y)| argmax(row) == Some(y as usize))
            .count()
    };
    correct as f64 / rows as f64
}

/// Index of the first maximum; None if the row is empty or all NaN.
fn argmax(row: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in row.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// Mean negative log-likelihood of the labels, with probabilities clamped to
/// `[LOG_LOSS_EPS, 1 − LOG_LOSS_EPS]` (NaN is read as `LOG_LOSS_EPS`).
///
/// `p` is either one probability of class 1 per row (binary; label 1 is
/// positive, anything else negative) or `rows × classes` probabilities.
/// Returns NaN for no rows.
pub fn log_loss(p: &[f32], labels: &[u32]) -> f64 {
    let rows = labels.len();
    if rows == 0 {
        return f64::NAN;
    }
    let clamp = |q: f32| {
        let q = f64::from(q);
        if q.is_nan() {
            LOG_LOSS_EPS
        } else {
            q.clamp(LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
        }
    };
    let total: f64 = if p.len() == rows {
        p.iter()
            .zip(labels)
            .map(|(&q, &y)| -(if y == 1 { clamp(q) } else { 1.0 - clamp(q) }).ln())
            .sum()
    } else {
        assert!(
            p.len().is_multiple_of(rows),
            "log_loss: {} predictions is not a whole number per row for {rows} rows",
            p.len()
        );
        let classes = p.len() / rows;
        p.chunks_exact(classes)
            .zip(labels)
            .map(|(row, &y)| -row.get(y as usize).map_or(LOG_LOSS_EPS, |&q| clamp(q)).ln())
            .sum()
    };
    total / rows as f64
}

/// Area under the ROC curve: the probability that a random positive (label
/// 1) scores above a random negative (any other label), ties counting one half.
///
/// Exact, by the Mann-Whitney rank sum with tied scores given their mean rank;
/// O(n log n). Returns NaN when either class is absent.
pub fn auc(scores: &[f32], labels: &[u32]) -> f64 {
    assert_eq!(
        scores.len(),
        labels.len(),
        "auc: {} scores for {} labels",
        scores.len(),
        labels.len()
    );
    let n = scores.len();
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_unstable_by(|&a, &b| cmp_score(scores[a as usize], scores[b as usize]));
    let mut rank_sum_pos = 0.0f64;
    let mut pos = 0u64;
    let mut i = 0;
    while i < n {
        // Ranks i+1..=j share the mean rank (i + 1 + j) / 2.
        let s = scores[order[i] as usize];
        let mut j = i + 1;
        while j < n && cmp_score(scores[order[j] as usize], s) == Ordering::Equal {
            j += 1;
        }
        let tied_pos = order[i..j].iter().filter(|&&r| labels[r as usize] == 1).count() as u64;
        rank_sum_pos += tied_pos as f64 * (i + 1 + j) as f64 / 2.0;
        pos += tied_pos;
        i = j;
    }
    let neg = n as u64 - pos;
    if pos == 0 || neg == 0 {
        return f64::NAN;
    }
    let (pos, neg) = (pos as f64, neg as f64);
    (rank_sum_pos - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// Numeric order with every NaN equal to every other and above all numbers,
/// and −0 equal to +0.
fn cmp_score(a: f32, b: f32) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (false, false) => a.partial_cmp(&b).expect("neither is NaN"),
        (an, bn) => an.cmp(&bn),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// O(n²) definition: pairs (positive, negative) ordered right, ties half.
    fn auc_brute(scores: &[f32], labels: &[u32]) -> f64 {
        let (mut num, mut pairs) = (0.0, 0.0);
        for (i, &si) in scores.iter().enumerate() {
            for (j, &sj) in scores.iter().enumerate() {
                if labels[i] == 1 && labels[j] != 1 {
                    pairs += 1.0;
                    num += match cmp_score(si, sj) {
                        Ordering::Greater => 1.0,
                        Ordering::Equal => 0.5,
                        Ordering::Less => 0.0,
                    };
                }
            }
        }
        if pairs == 0.0 { f64::NAN } else { num / pairs }
    }

    proptest! {
        #[test]
        fn auc_equals_pairwise_count(
            rows in prop::collection::vec((0u8..12, 0u32..3), 0..200),
            with_nan: bool,
        ) {
            // Few distinct scores so that ties are common; label 2 is a negative too.
            let mut scores: Vec<f32> = rows.iter().map(|r| f32::from(r.0) / 4.0 - 1.0).collect();
            if with_nan && !scores.is_empty() {
                scores[0] = f32::NAN;
            }
            let labels: Vec<u32> = rows.iter().map(|r| r.1).collect();
            let (fast, slow) = (auc(&scores, &labels), auc_brute(&scores, &labels));
            prop_assert!(fast.is_nan() == slow.is_nan(), "{fast} vs {slow}");
            if !slow.is_nan() {
                prop_assert!((fast - slow).abs() < 1e-12, "{fast} vs {slow}");
            }
        }
    }

    #[test]
    fn auc_known_values() {
        assert_eq!(auc(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1]), 0.75);
        assert_eq!(auc(&[0.5, 0.5], &[0, 1]), 0.5);
        assert_eq!(auc(&[0.9, 0.1], &[1, 0]), 1.0);
        assert!(auc(&[0.9, 0.1], &[1, 1]).is_nan());
        assert!(auc(&[], &[]).is_nan());
    }

    #[test]
    fn accuracy_reads_both_layouts() {
        assert_eq!(accuracy(&[0.1, 0.7, 0.2, 0.6, 0.3, 0.1], 3, &[1, 2]), 0.5);
        assert_eq!(accuracy(&[0.2, 0.9, 0.5], 2, &[0, 1, 0]), 2.0 / 3.0);
        assert_eq!(accuracy(&[0.2, 0.8, 0.6, 0.4], 2, &[1, 1]), 0.5);
        assert_eq!(accuracy(&[f32::NAN, f32::NAN], 2, &[0]), 0.0);
        assert!(accuracy(&[], 3, &[]).is_nan());
    }

    #[test]
    fn log_loss_is_clamped() {
        let perfect = log_loss(&[1.0, 0.0], &[1, 0]);
        assert!(perfect > 0.0 && perfect < 1e-6, "{perfect}");
        let worst = log_loss(&[0.0, f32::NAN], &[1, 1]);
        assert!((worst + LOG_LOSS_EPS.ln()).abs() < 1e-9, "{worst}");
        let half = log_loss(&[0.5, 0.5], &[0, 1]);
        assert!((half - 2f64.ln()).abs() < 1e-9);
        let multi = log_loss(&[0.25, 0.75, 0.5, 0.5], &[1, 0]);
        assert!((multi - (-(0.75f64.ln()) - 0.5f64.ln()) / 2.0).abs() < 1e-9, "{multi}");
    }
}
