//! Error feedback loses nothing: Σ decoded + residual = Σ gradients; and the
//! PowerSGD state machine with error feedback, on two simulated workers.

use codec::{CodecSpec, ErrorFeedback, PowerSgd, decode, decode_add};
use proptest::prelude::*;

use crate::{any_spec, shape_for, spec};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn sum_of_decoded_plus_residual_is_sum_of_gradients(
        spec in any_spec(),
        len in 0usize..600,
        steps in 1usize..8,
        seed in any::<u64>(),
        pick in any::<usize>(),
    ) {
        let shape = shape_for(len, pick);
        let mut rng = tensor::Rng::new(seed);
        let mut ef = ErrorFeedback::new(len);
        let (mut sent, mut given, mut scale) = (vec![0f64; len], vec![0f64; len], vec![0f64; len]);
        let (mut msg, mut d) = (Vec::new(), vec![0f32; len]);
        for step in 0..steps {
            let g: Vec<f32> = (0..len).map(|_| (rng.normal() * 0.1) as f32).collect();
            ef.compress_shaped(&spec, &g, &shape, seed ^ step as u64, &mut msg).expect("compress");
            decode(&msg, &mut d).expect("decode");
            for i in 0..len {
                sent[i] += f64::from(d[i]);
                given[i] += f64::from(g[i]);
                scale[i] += f64::from(g[i].abs()) + f64::from(d[i].abs()) + f64::from(ef.state()[i].abs());
            }
        }
        for i in 0..len {
            let total = sent[i] + f64::from(ef.state()[i]);
            // Each step rounds g + r and g' − d once each in f32.
            prop_assert!((total - given[i]).abs() <= 1e-6 * scale[i] + 1e-30,
                "{spec} [{i}]: {total} vs {given:?}", given = given[i]);
        }
    }
}

#[test]
fn topk_with_error_feedback_eventually_sends_everything() {
    // A constant gradient: what top-1% skips accumulates until it is sent.
    let g = vec![1f32; 1000];
    let mut ef = ErrorFeedback::new(g.len());
    let (mut msg, mut total) = (Vec::new(), vec![0f32; g.len()]);
    for step in 0..100 {
        ef.compress(&spec("topk:0.01"), &g, step, &mut msg).expect("compress");
        decode_add(&msg, &mut total).expect("decode");
    }
    assert!(total.iter().all(|v| *v > 0.0), "every element was sent at least once");
    let residual_max = ef.state().iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(residual_max <= 100.0, "{residual_max}");
}

#[test]
fn powersgd_two_rounds_on_two_workers_with_error_feedback() {
    let (rows, cols, rank) = (24, 16, 2);
    let n = rows * cols;
    let mut rng = tensor::Rng::new(8);
    let mut workers: Vec<(PowerSgd, ErrorFeedback)> = (0..2)
        .map(|_| (PowerSgd::new(rank, rows, cols, 77), ErrorFeedback::new(n)))
        .collect();
    let (mut applied, mut given) = (vec![0f64; n], vec![0f64; n]);
    for _step in 0..5 {
        let grads: Vec<Vec<f32>> = (0..2).map(|_| (0..n).map(|_| rng.normal() as f32).collect()).collect();
        // Round 1: every worker corrects its gradient and computes P; all-reduce (sum) P.
        let mut corrected = grads.clone();
        let mut p_sum = vec![0f32; rows * rank];
        for ((ps, ef), m) in workers.iter().zip(&mut corrected) {
            ef.correct(m);
            let mut p = vec![0f32; ps.p_len()];
            ps.compute_p(m, &mut p);
            p_sum.iter_mut().zip(&p).for_each(|(s, v)| *s += v);
        }
        // Round 2: Q from the reduced P; all-reduce (mean) Q.
        let mut q_mean = vec![0f32; cols * rank];
        let mut p_hat = Vec::new();
        for ((ps, _), m) in workers.iter().zip(&corrected) {
            let (mut p, mut q) = (p_sum.clone(), vec![0f32; ps.q_len()]);
            ps.compute_q(m, &mut p, &mut q);
            q_mean.iter_mut().zip(&q).for_each(|(s, v)| *s += v / 2.0);
            p_hat = p;
        }
        // Finish: the same approximation everywhere; each residual keeps what its gradient lost.
        let mut approxes = Vec::new();
        for ((ps, ef), m) in workers.iter_mut().zip(&corrected) {
            let mut approx = vec![0f32; n];
            ps.finish(&p_hat, &q_mean, &mut approx);
            ef.record(m, &approx);
            approxes.push(approx);
        }
        assert_eq!(approxes[0], approxes[1]);
        assert_eq!(workers[0].0.state(), &q_mean[..]);
        for i in 0..n {
            applied[i] += f64::from(approxes[0][i]);
            given[i] += f64::from(grads[0][i] + grads[1][i]) / 2.0;
        }
    }
    // With the residuals' mean, what was applied is what was given.
    for i in 0..n {
        let r = (f64::from(workers[0].1.state()[i]) + f64::from(workers[1].1.state()[i])) / 2.0;
        assert!((applied[i] + r - given[i]).abs() < 1e-4, "[{i}]");
    }
}

#[test]
fn residual_survives_a_checkpoint() {
    let g: Vec<f32> = (0..64).map(|i| (i as f32).sin()).collect();
    let s = CodecSpec::Sign { bucket: 16 };
    let mut a = ErrorFeedback::new(64);
    let (mut ma, mut mb) = (Vec::new(), Vec::new());
    a.compress(&s, &g, 0, &mut ma).expect("compress");
    let mut b = ErrorFeedback::new(64);
    b.load_state(a.state()).expect("load");
    a.compress(&s, &g, 1, &mut ma).expect("compress");
    b.compress(&s, &g, 1, &mut mb).expect("compress");
    assert_eq!(ma, mb);
    assert_eq!(a, b);
}
