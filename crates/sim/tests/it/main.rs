//! The simulator's own tests: determinism, the invariants under every fault,
//! and that it finds a known protocol bug (issue 7: "Deterministic
//! simulation: test the protocols under every fault, and predict scale").

use sim::faults::Fault;
use sim::{Bug, FaultMix, SimConfig, fuzz, run};

/// Seeds CI runs on every push: about 8 s on one core in release.
const CI_SEEDS: u64 = 1_500;

#[test]
fn the_same_seed_gives_the_same_trace_byte_for_byte() {
    for (workers, servers) in [(4, 0), (3, 2)] {
        let mut cfg = SimConfig::new(11, workers, servers, 15, FaultMix::ALL);
        cfg.keep_trace = true;
        let (a, b) = (run(&cfg), run(&cfg));
        assert!(a.trace.lines() > 100, "a real run: {} lines", a.trace.lines());
        assert_eq!(a.trace.text(), b.trace.text());
        assert_eq!(a.trace.hash(), b.trace.hash());
        cfg.seed = 12;
        assert_ne!(run(&cfg).trace.hash(), a.trace.hash(), "another seed, another run");
    }
}

#[test]
fn every_fault_kind_alone_and_together_keeps_every_invariant() {
    let mixes = ["none", "delay", "loss", "partition", "crash", "slow", "all"];
    for (i, mix) in mixes.iter().enumerate() {
        for (workers, servers, consistency) in [
            (4, 0, ps::Consistency::Bsp),
            (3, 2, ps::Consistency::Bsp),
            (3, 1, ps::Consistency::Ssp { staleness: 1 }),
            (2, 2, ps::Consistency::Async),
        ] {
            let mut cfg = SimConfig::new(100 + i as u64, workers, servers, 12, mix.parse().unwrap());
            cfg.consistency = consistency;
            let r = run(&cfg);
            assert_eq!(r.violation, None, "{mix}, {workers} workers, {servers} servers");
            assert!(r.finished, "{mix}: the job finishes in the liveness phase");
        }
    }
}

#[test]
fn crashes_restart_the_job_from_a_checkpoint_and_it_still_ends_on_the_reference() {
    let mut restarted = 0;
    for seed in 0..40 {
        let r = run(&SimConfig::new(seed, 4, 0, 20, "crash".parse().unwrap()));
        assert_eq!(r.violation, None, "seed {seed}");
        restarted += u32::from(r.attempts > 1);
    }
    assert!(restarted >= 10, "crashes must cause restarts: {restarted} of 40");
}

#[test]
fn the_ci_seed_set_holds_every_invariant() {
    let s = fuzz::fuzz(0..CI_SEEDS, None, false, |_, _| {});
    let shown: Vec<String> = s.violations.iter().take(3).map(|v| v.to_string()).collect();
    assert!(
        s.violations.is_empty(),
        "{} violations, e.g. {shown:?}",
        s.violations.len()
    );
    assert_eq!(s.finished, CI_SEEDS);
    assert!(
        s.with_fault.iter().all(|&n| n > CI_SEEDS / 3),
        "every fault kind is exercised: {:?}",
        s.with_fault
    );
    assert!(
        s.attempts > CI_SEEDS + CI_SEEDS / 5,
        "faults make jobs restart: {} attempts",
        s.attempts
    );
    assert!(s.with_replicas > CI_SEEDS / 10, "{} replicated cases", s.with_replicas);
    assert!(
        s.failovers > 10 && s.backup_kills > 10,
        "replicas die: {} promotions, {} backups killed",
        s.failovers,
        s.backup_kills
    );
}

/// The fuzzer once drew only jobs of at most 30 steps and 6 workers, none
/// longer than the coordinator's heartbeat timeout, and missed issue 16.
#[test]
fn the_ci_seed_set_covers_long_jobs_many_workers_and_every_shard_count() {
    let cases: Vec<SimConfig> = (0..CI_SEEDS).map(|seed| fuzz::case(seed, None)).collect();
    let count = |f: &dyn Fn(&SimConfig) -> bool| cases.iter().filter(|c| f(c)).count() as u64;
    assert_eq!(cases.iter().map(|c| c.workers).max(), Some(fuzz::WORKERS_MAX));
    assert_eq!(cases.iter().map(|c| c.servers).max(), Some(fuzz::SHARDS_MAX));
    assert!(
        cases
            .iter()
            .all(|c| c.steps <= fuzz::STEPS_MAX && c.workers <= fuzz::WORKERS_MAX)
    );
    assert!(
        cases.iter().any(|c| c.steps > fuzz::STEPS_MAX - 50),
        "some jobs near the longest"
    );
    // 200 steps of at least 2 ms outlast a 1,000 ms heartbeat timeout.
    let long_ps = count(&|c| c.servers > 0 && c.steps >= 200);
    let long_all_reduce = count(&|c| c.servers == 0 && c.steps >= 200);
    assert!(long_ps >= CI_SEEDS / 50, "{long_ps} long parameter-server jobs");
    assert!(
        long_all_reduce >= CI_SEEDS / 50,
        "{long_all_reduce} long all-reduce jobs"
    );
    let short = count(&|c| c.steps <= 30);
    assert!(short >= CI_SEEDS * 6 / 10, "most cases stay short: {short}");
}

/// The SSP rule once answered a pull `staleness + 1` steps ahead; injected by
/// the simulator (each shard built with a bound one higher than the one the
/// `ssp-bound` invariant checks), it must be found within the first 1,000
/// seeds, and the seed must replay to the same violation.
#[test]
fn the_reintroduced_ssp_bug_is_found_and_replays() {
    let s = fuzz::fuzz(0..1_000, Some(Bug::SspOffByOne), true, |_, _| {});
    let v = s.violations.first().expect("the bug is found within 1,000 seeds");
    assert_eq!(v.invariant, "ssp-bound", "{v}");
    let again = run(&fuzz::case(v.seed, Some(Bug::SspOffByOne)));
    assert_eq!(again.violation.as_ref(), Some(v), "the seed replays the same violation");
    assert_eq!(
        run(&fuzz::case(v.seed, None)).violation,
        None,
        "without the bug the seed passes"
    );
}

/// `sinter sim --seed 1 --workers 8 --servers 2 --faults none --steps 200`,
/// as the CLI builds it.
fn issue_16_job(seed: u64, faults: FaultMix) -> SimConfig {
    let one = sim::cmd::OneRun {
        seed,
        workers: 8,
        servers: 2,
        faults,
        steps: 200,
        consistency: ps::Consistency::Ssp { staleness: 2 },
        bug: None,
    };
    one.config()
}

// Issue 16: "Reliability": a parameter-server job longer than the heartbeat
// timeout failed every attempt without a single fault, because the simulated
// shards never heartbeat to the coordinator.
#[test]
fn issue_16_a_long_parameter_server_job_without_faults_finishes_in_one_attempt() {
    let r = run(&issue_16_job(1, FaultMix::NONE));
    assert_eq!(r.violation, None);
    assert!(r.finished);
    assert_eq!(r.attempts, 1, "no fault, no restart");
    assert!(
        r.virtual_ns > 2_000_000_000,
        "the job outlasts the 1,000 ms heartbeat timeout: {} ns",
        r.virtual_ns
    );
}

// Issue 16: "Reliability": every seed tried at 200 steps with all faults broke
// the liveness invariant, for the same reason.
#[test]
fn issue_16_long_parameter_server_jobs_under_every_fault_finish() {
    for seed in 1..=4 {
        let r = run(&issue_16_job(seed, FaultMix::ALL));
        assert_eq!(r.violation, None, "seed {seed}");
        assert!(r.finished, "seed {seed}");
    }
}

#[test]
fn bad_configs_are_errors_not_panics() {
    let mut cfg = SimConfig::new(0, 0, 0, 5, FaultMix::NONE);
    assert!(cfg.validate().unwrap_err().contains("--workers"));
    cfg.workers = 2;
    cfg.bug = Some(Bug::SspOffByOne);
    assert!(cfg.validate().unwrap_err().contains("--servers"));
    assert!("ssp-off-by-two".parse::<Bug>().is_err());
    cfg.servers = 1;
    cfg.bug = Some(Bug::AckWithoutBackup);
    assert!(cfg.validate().unwrap_err().contains("replicated"));
    cfg.replicas = 3;
    assert!(cfg.validate().unwrap_err().contains("replicas"));
}

const MS: u64 = 1_000_000;

/// A job of 3 workers and 2 shards, each a primary and a backup (nodes 3, 4
/// primaries, 5, 6 backups), with no fault but the ones scripted.
fn replicated_job(consistency: ps::Consistency, kills: &[(u64, u32, u64)]) -> SimConfig {
    let mut cfg = SimConfig::new(7, 3, 2, 40, FaultMix::NONE);
    cfg.replicas = 2;
    cfg.consistency = consistency;
    cfg.scripted_faults = kills
        .iter()
        .map(|&(at, node, restart_at)| {
            (
                at * MS,
                Fault::Crash {
                    node,
                    restart_at: restart_at * MS,
                },
            )
        })
        .collect();
    cfg
}

// Issue 15, requirement 3: a replicated shard whose primary dies mid-run
// fails over to its backup: the workers resend what was not acknowledged,
// the restarted node becomes the new backup, and the job finishes in the
// same attempt with every push applied exactly once (the simulator checks
// each replica's values against its pushes after every change, and every
// primary's clocks at the end).
#[test]
fn issue_15_a_replicated_job_survives_a_primary_kill_with_every_push_applied_once() {
    let modes = [
        ps::Consistency::Bsp,
        ps::Consistency::Ssp { staleness: 1 },
        ps::Consistency::Async,
    ];
    for consistency in modes {
        // Shard 0's primary dies at 150 ms and is back at 250 ms; shard 1's backup dies at 200 ms.
        let r = run(&replicated_job(consistency, &[(150, 3, 250), (200, 6, 300)]));
        assert_eq!(r.violation, None, "{consistency:?}");
        assert!(r.finished, "{consistency:?}");
        assert_eq!(r.attempts, 1, "{consistency:?}: a failover is not a restart");
        assert_eq!(
            (r.primary_kills, r.backup_kills, r.failovers),
            (1, 1, 1),
            "{consistency:?}"
        );
        // Both replicas of shard 0 down at once: the attempt fails and the job restarts.
        let r = run(&replicated_job(consistency, &[(150, 3, 250), (151, 5, 260)]));
        assert_eq!(r.violation, None, "{consistency:?}");
        assert!(r.finished && r.attempts > 1, "{consistency:?}: {} attempts", r.attempts);
    }
}

/// The engine's rule that an acknowledgement waits for a backup holding the
/// push, broken from outside (the simulator releases a held acknowledgement
/// at once): the fuzzer must find it within the first 300 seeds, and the seed
/// must replay to the same violation.
#[test]
fn an_acknowledgement_released_before_the_backup_holds_the_push_is_found() {
    let s = fuzz::fuzz(0..300, Some(Bug::AckWithoutBackup), true, |_, _| {});
    let v = s.violations.first().expect("the bug is found within 300 seeds");
    assert_eq!(v.invariant, "ack-needs-backup", "{v}");
    let again = run(&fuzz::case(v.seed, Some(Bug::AckWithoutBackup)));
    assert_eq!(again.violation.as_ref(), Some(v), "the seed replays the same violation");
    assert_eq!(
        run(&fuzz::case(v.seed, None)).violation,
        None,
        "without the bug the seed passes"
    );
}
