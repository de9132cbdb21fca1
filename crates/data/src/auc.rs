//! Area under the ROC curve: of scores against labels (Mann-Whitney), and
//! in expectation over labels drawn from known probabilities (the Bayes AUC).

/// AUC of `scores` for binary `labels` (class 1 positive), ties counted ½.
/// `None` if either class is absent.
pub fn auc(scores: &[f64], labels: &[u32]) -> Option<f64> {
    assert_eq!(scores.len(), labels.len(), "one score per label");
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut pos_below_neg_pairs, mut neg_seen, mut pos, mut neg) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        let (mut gp, mut gn) = (0.0, 0.0);
        while j < order.len() && scores[order[j]] == scores[order[i]] {
            if labels[order[j]] == 1 {
                gp += 1.0
            } else {
                gn += 1.0
            }
            j += 1;
        }
        pos_below_neg_pairs += gp * neg_seen + 0.5 * gp * gn;
        neg_seen += gn;
        pos += gp;
        neg += gn;
        i = j;
    }
    (pos > 0.0 && neg > 0.0).then(|| pos_below_neg_pairs / (pos * neg))
}

/// The AUC that the true probabilities `p` achieve as scores, in expectation
/// over labels drawn as Bernoulli(`p_i`): over pairs `i ≠ j`,
/// `Σ p_i (1 - p_j) ([p_i > p_j] + ½ [p_i = p_j]) / Σ p_i (1 - p_j)`.
/// O(n log n). `None` if the denominator is zero (all `p` 0, or all 1).
pub fn expected_auc(p: &[f64]) -> Option<f64> {
    let mut p = p.to_vec();
    p.sort_unstable_by(f64::total_cmp);
    let (mut num, mut neg_below) = (0.0f64, 0.0f64);
    let (mut sum_p, mut sum_q, mut sum_pq) = (0.0f64, 0.0f64, 0.0f64);
    let mut i = 0;
    while i < p.len() {
        let mut j = i;
        let (mut gp, mut gq, mut gpq) = (0.0, 0.0, 0.0);
        while j < p.len() && p[j] == p[i] {
            gp += p[j];
            gq += 1.0 - p[j];
            gpq += p[j] * (1.0 - p[j]);
            j += 1;
        }
        // A positive here outranks every negative below; equal scores count ½, except a row with itself.
        num += gp * neg_below + 0.5 * (gp * gq - gpq);
        neg_below += gq;
        sum_p += gp;
        sum_q += gq;
        sum_pq += gpq;
        i = j;
    }
    let den = sum_p * sum_q - sum_pq;
    (den > 0.0).then(|| num / den)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor::Rng;

    #[test]
    fn auc_of_small_cases() {
        assert_eq!(auc(&[0.1, 0.9], &[0, 1]), Some(1.0));
        assert_eq!(auc(&[0.9, 0.1], &[0, 1]), Some(0.0));
        assert_eq!(auc(&[0.5, 0.5], &[0, 1]), Some(0.5));
        assert_eq!(auc(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1]), Some(0.75));
        assert_eq!(auc(&[0.1], &[1]), None);
    }

    #[test]
    fn expected_auc_matches_brute_force_and_simulation() {
        let p = [0.1, 0.7, 0.7, 0.3, 0.95, 0.5];
        let (mut num, mut den) = (0.0, 0.0);
        for i in 0..p.len() {
            for j in 0..p.len() {
                if i != j {
                    let w = p[i] * (1.0 - p[j]);
                    den += w;
                    num += w * if p[i] > p[j] {
                        1.0
                    } else if p[i] == p[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        let e = expected_auc(&p).expect("defined");
        assert!((e - num / den).abs() < 1e-12, "{e} vs {}", num / den);
        assert_eq!(expected_auc(&[1.0, 1.0]), None);

        let mut rng = Rng::new(9);
        let p: Vec<f64> = (0..20_000).map(|_| rng.next_f64()).collect();
        let labels: Vec<u32> = p.iter().map(|&x| u32::from(rng.next_f64() < x)).collect();
        let empirical = auc(&p, &labels).expect("both classes");
        let expected = expected_auc(&p).expect("defined");
        // Uniform p gives 5/6 in the limit.
        assert!((expected - 5.0 / 6.0).abs() < 0.005, "{expected}");
        assert!((empirical - expected).abs() < 0.01, "{empirical} vs {expected}");
    }
}
