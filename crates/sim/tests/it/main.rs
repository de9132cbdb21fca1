//! The simulator's own tests: determinism, invariants under faults, and
//! that it finds a known protocol bug.

use sim::{Bug, FaultMix, SimConfig, fuzz, run};

#[test]
fn smoke() {
    for (w, s) in [(1, 0), (3, 0), (4, 0), (2, 1), (3, 2)] {
        let cfg = SimConfig::new(1, w, s, 12, FaultMix::ALL);
        let r = run(&cfg);
        eprintln!(
            "{w} {s}: {:?} events {} attempts {} finished {}",
            r.violation, r.events, r.attempts, r.finished
        );
    }
    let s = fuzz::fuzz(0..300, None, false, |_, _| {});
    eprintln!(
        "{} runs {} finished {:?} {:?}",
        s.runs,
        s.finished,
        s.with_fault,
        s.violations.iter().take(5).collect::<Vec<_>>()
    );
    let b = fuzz::fuzz(0..1000, Some(Bug::SspOffByOne), true, |_, _| {});
    eprintln!("{:?}", b.violations);
}
