//! Clusters of real processes: a worker killed or stopped ends the job within
//! its deadlines, naming the rank, with nothing left running; peers
//! authenticate; workers started without the launcher (torchrun and DMLC
//! conventions) find each other.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::{
    Finished, KillOnDrop, Proc, ProcId, RUN_TIMEOUT, descendants, event, example, find_event, poll_until, run, sinter,
    temp_dir,
};

/// How soon after a worker fails the whole job must have ended (issue 3).
const FAILURE_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a coordinator may take to print where it listens.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
const SECRET: &str = "integration-test-secret-0123456789";
const OTHER_SECRET: &str = "another-secret-of-enough-bytes-9876";

/// Starts a two-worker job that would train far longer than any test waits;
/// once rank 0 has reported its start, returns the launcher, what it started
/// (coordinator, rank 0, rank 1; killed on drop) and rank 1.
fn start_long_job(dir: &Path, extra: &[&str]) -> (Proc, KillOnDrop, ProcId) {
    let mut launcher = Proc::spawn(
        "sinter train --workers 2",
        sinter(dir)
            .arg("train")
            .arg(example("fashion-mlp.toml"))
            .args(["--workers", "2", "--json", "-q", "--set", "train.epochs=1000"])
            .args(extra),
    );
    launcher.wait_json("the start line", RUN_TIMEOUT, |v| event(v) == Some("start"));
    let started = descendants(launcher.pid);
    let guard = KillOnDrop(started.clone());
    assert_eq!(
        started.len(),
        3,
        "expected the coordinator and 2 workers under the launcher, found {started:?}"
    );
    let ranks: Vec<Option<String>> = started.iter().map(|p| p.env("RANK")).collect();
    let rank1 = started
        .iter()
        .zip(&ranks)
        .find(|(_, r)| r.as_deref() == Some("1"))
        .map(|(p, _)| *p)
        .unwrap_or_else(|| panic!("no child with RANK=1 among {started:?} (RANK values {ranks:?})"));
    assert!(
        ranks.iter().any(|r| r.as_deref() == Some("0")),
        "no child with RANK=0: {ranks:?}"
    );
    (launcher, guard, rank1)
}

/// The job has ended with a failure naming rank 1, and nothing it started still runs.
fn assert_failed_naming_rank_1(out: &Finished, started: &KillOnDrop, tmp: &Path) {
    assert!(!out.status.success(), "the job succeeded: {}", out.shown());
    out.assert_no_panic();
    assert!(
        out.stderr.contains("rank 1"),
        "stderr does not name rank 1: {}",
        out.shown()
    );
    let alive: Vec<&ProcId> = started.0.iter().filter(|p| p.alive()).collect();
    assert!(
        alive.is_empty(),
        "still running after the launcher exited: {alive:?}\n{}",
        out.shown()
    );
    let left: Vec<_> = std::fs::read_dir(tmp)
        .expect("listing the temp dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "the launcher left {left:?} in its TMPDIR");
}

// issue 3 (requirement 4): a worker killed with SIGKILL ends the whole job, naming it.
#[test]
fn killed_worker_ends_the_job_naming_its_rank_and_leaves_no_process() {
    let dir = temp_dir();
    let (launcher, started, rank1) = start_long_job(dir.path(), &[]);
    rank1.signal(libc::SIGKILL);
    // Fails the test (and kills the launcher) unless it exits within the timeout.
    let out = launcher.wait(FAILURE_EXIT_TIMEOUT);
    assert_failed_naming_rank_1(&out, &started, dir.path());
}

// issue 3: every wait has a deadline; a stopped (not dead) worker is found by heartbeat and collective timeouts.
#[test]
fn stalled_worker_ends_the_job_within_the_timeouts_naming_its_rank() {
    let dir = temp_dir();
    let timeouts = [
        "--set",
        "cluster.heartbeat_timeout_ms=1000",
        "--set",
        "cluster.collective_timeout_ms=2000",
    ];
    let (launcher, started, rank1) = start_long_job(dir.path(), &timeouts);
    rank1.signal(libc::SIGSTOP);
    poll_until("rank 1 stopped", Duration::from_secs(5), || rank1.stopped());
    let out = launcher.wait(FAILURE_EXIT_TIMEOUT);
    // Should rank 1 still be there, the assertion fails and `started` kills it on drop.
    assert_failed_naming_rank_1(&out, &started, dir.path());
    assert_eq!(out.code(), Some(3), "a peer failure exits with code 3: {}", out.shown());
}

// issue 3: Ctrl-C stops every process cleanly, with the documented exit code.
#[test]
fn interrupt_stops_the_whole_cluster_with_exit_code_130() {
    let dir = temp_dir();
    let (launcher, started, _) = start_long_job(dir.path(), &[]);
    launcher.signal(libc::SIGINT);
    let out = launcher.wait(FAILURE_EXIT_TIMEOUT);
    assert_eq!(out.code(), Some(130), "{}", out.shown());
    out.assert_no_panic();
    let alive: Vec<&ProcId> = started.0.iter().filter(|p| p.alive()).collect();
    assert!(alive.is_empty(), "still running after the launcher exited: {alive:?}");
}

// issue 3: periodic model averaging (local SGD) trains and ends on parameters every rank agrees on
// (the coordinator compares their checksums at each epoch end and would fail the job otherwise).
#[test]
fn local_sgd_cluster_finishes_with_agreeing_parameters() {
    let dir = temp_dir();
    let out = run(
        "sinter train local_sgd",
        sinter(dir.path()).arg("train").arg(example("fashion-mlp.toml")).args([
            "--workers",
            "2",
            "--json",
            "-q",
            "--set",
            "train.epochs=1",
            "--set",
            "cluster.sync=\"local_sgd\"",
            "--set",
            "cluster.average_every=4",
        ]),
        RUN_TIMEOUT,
    );
    out.assert_success();
    let lines = out.json_lines();
    let epoch = find_event(&lines, "epoch").unwrap_or_else(|| panic!("no epoch line: {}", out.shown()));
    let acc = epoch["test_acc"].as_f64().expect("test_acc");
    assert!(acc > 0.75, "local SGD reached only {acc}");
}

/// A coordinator on 127.0.0.1:0 and the `(host, port)` it printed.
fn start_coordinator(dir: &Path, world: Option<u32>, env: &[(&str, &str)]) -> (Proc, String, String) {
    let mut cmd = sinter(dir);
    cmd.args(["coordinator", "--listen", "127.0.0.1:0"]);
    if let Some(w) = world {
        cmd.args(["--world", &w.to_string()]);
    }
    cmd.envs(env.iter().copied());
    let mut coord = Proc::spawn("sinter coordinator", &mut cmd);
    let line = coord.wait_json("its address", LISTEN_TIMEOUT, |v| v.get("listening").is_some());
    let addr = line["listening"]
        .as_str()
        .unwrap_or_else(|| panic!("listening is not a string: {line}"));
    let (host, port) = addr.rsplit_once(':').unwrap_or_else(|| panic!("not host:port: {addr}"));
    (coord, host.to_string(), port.to_string())
}

fn bench_worker(dir: &Path, sizes: &str) -> Command {
    let mut c = sinter(dir);
    c.args(["bench", "allreduce", "--worker", "--sizes", sizes]);
    c
}

/// Rank 0's benchmark lines: one per size, each correct, for `world` workers.
fn assert_bench_results(out: &Finished, sizes: &[u64], world: u64) {
    let lines: Vec<Value> = out.json_lines();
    assert_eq!(lines.len(), sizes.len(), "{}", out.shown());
    for (l, bytes) in lines.iter().zip(sizes) {
        assert_eq!(l["bytes"], *bytes, "{l}");
        assert_eq!(l["workers"], world, "{l}");
        assert_eq!(l["correct"], true, "{l}");
    }
}

// issue 3: peers authenticate with a shared secret; a worker with another secret is refused.
#[test]
fn worker_with_the_wrong_secret_is_refused_and_the_right_one_joins() {
    let dir = temp_dir();
    let (coord, host, port) = start_coordinator(dir.path(), Some(1), &[("SINTER_SECRET", SECRET)]);
    let cluster_env = [
        ("MASTER_ADDR", host.as_str()),
        ("MASTER_PORT", port.as_str()),
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
    ];

    let wrong = run(
        "bench worker with the wrong secret",
        bench_worker(dir.path(), "4KiB")
            .envs(cluster_env)
            .env("SINTER_SECRET", OTHER_SECRET),
        RUN_TIMEOUT,
    );
    assert!(
        !wrong.status.success(),
        "a worker with the wrong secret joined: {}",
        wrong.shown()
    );
    wrong.assert_no_panic();
    assert!(
        wrong.stderr.to_lowercase().contains("authentication"),
        "the error does not say authentication failed: {}",
        wrong.shown()
    );
    assert!(wrong.stdout.is_empty(), "{}", wrong.shown());
    assert_each_cause_shown_once(&wrong.stderr);

    let right = run(
        "bench worker with the right secret",
        bench_worker(dir.path(), "4KiB")
            .envs(cluster_env)
            .env("SINTER_SECRET", SECRET),
        RUN_TIMEOUT,
    );
    right.assert_success();
    assert_bench_results(&right, &[4096], 1);

    let coord = coord.wait(RUN_TIMEOUT);
    coord.assert_success().assert_no_panic();
    assert!(
        coord.stderr.contains("refused an unauthenticated connection"),
        "the coordinator did not log the refusal: {}",
        coord.shown()
    );
}

/// The binary prints an error's chain once: no `: `-separated part of an
/// `error:` line repeats (a cause that is both in a message and its `source()`).
fn assert_each_cause_shown_once(stderr: &str) {
    for line in stderr.lines().filter(|l| l.starts_with("error:")) {
        let parts: Vec<&str> = line.split(": ").collect();
        for (i, p) in parts.iter().enumerate() {
            assert!(!parts[i + 1..].contains(p), "`{p}` is shown twice in: {line}");
        }
    }
}

/// Runs a coordinator and two benchmark workers with the environment `worker_env` gives
/// each; returns the workers' results in start order.
fn run_bench_cluster(
    coord_env: &[(&str, &str)],
    world_flag: Option<u32>,
    worker_env: impl Fn(usize, &str, &str) -> Vec<(String, String)>,
) -> Vec<Finished> {
    let dir = temp_dir();
    let mut env = coord_env.to_vec();
    env.push(("SINTER_SECRET", SECRET));
    let (coord, host, port) = start_coordinator(dir.path(), world_flag, &env);
    let workers: Vec<Proc> = (0..2)
        .map(|i| {
            Proc::spawn(
                &format!("bench worker {i}"),
                bench_worker(dir.path(), "4KiB,1MiB")
                    .env("SINTER_SECRET", SECRET)
                    .envs(worker_env(i, &host, &port)),
            )
        })
        .collect();
    let results: Vec<Finished> = workers.into_iter().map(|w| w.wait(RUN_TIMEOUT)).collect();
    for r in &results {
        r.assert_success().assert_no_panic();
    }
    coord.wait(RUN_TIMEOUT).assert_success();
    results
}

// issue 3: workers started by another scheduler find the coordinator through torchrun's variables.
#[test]
fn workers_started_torchrun_style_all_reduce_correctly() {
    let results = run_bench_cluster(&[], Some(2), |i, host, port| {
        [
            ("MASTER_ADDR", host),
            ("MASTER_PORT", port),
            ("RANK", &i.to_string()),
            ("WORLD_SIZE", "2"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    });
    assert_bench_results(&results[0], &[4096, 1 << 20], 2);
    assert!(
        results[1].stdout.is_empty(),
        "rank 1 printed results: {}",
        results[1].shown()
    );
}

// issue 3: the same through ps-lite's DMLC variables, with ranks assigned by arrival.
#[test]
fn workers_started_dmlc_style_get_ranks_by_arrival_and_all_reduce_correctly() {
    // The coordinator takes its world size from DMLC_NUM_WORKER too.
    let results = run_bench_cluster(
        &[("DMLC_NUM_WORKER", "2"), ("DMLC_ROLE", "scheduler")],
        None,
        |_, host, port| {
            [
                ("DMLC_PS_ROOT_URI", host),
                ("DMLC_PS_ROOT_PORT", port),
                ("DMLC_NUM_WORKER", "2"),
                ("DMLC_ROLE", "worker"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
        },
    );
    let (printed, silent): (Vec<&Finished>, Vec<&Finished>) = results.iter().partition(|r| !r.stdout.is_empty());
    assert_eq!(
        (printed.len(), silent.len()),
        (1, 1),
        "exactly one worker must have become rank 0: {results:?}"
    );
    assert_bench_results(printed[0], &[4096, 1 << 20], 2);
}

/// Issue 16: ps-lite starts every process with one command line and lets
/// `DMLC_ROLE` pick the role; `DMLC_ROLE=scheduler` on `sinter worker` used
/// to start a worker. Here the scheduler is the coordinator, the two
/// workers train the default job's model for a few steps, and all succeed.
#[test]
fn one_worker_command_line_takes_each_dmlc_role() {
    let dir = temp_dir();
    let config = example("fashion-mlp.toml");
    let dmlc = |role: &str, port: &str| {
        let mut c = sinter(dir.path());
        c.args(["worker", "--config"])
            .arg(&config)
            .args(["--json", "--set", "train.epochs=1", "--set", "train.max_steps=20"])
            .envs([
                ("DMLC_ROLE", role),
                ("DMLC_PS_ROOT_URI", "127.0.0.1"),
                ("DMLC_PS_ROOT_PORT", port),
                ("DMLC_NUM_WORKER", "2"),
                ("SINTER_SECRET", SECRET),
            ]);
        c
    };
    // Port 0: the scheduler says where it listens, as `sinter coordinator` does.
    let mut scheduler = Proc::spawn("DMLC_ROLE=scheduler", &mut dmlc("scheduler", "0"));
    let line = scheduler.wait_json("its address", LISTEN_TIMEOUT, |v| v.get("listening").is_some());
    assert_eq!(line["world"], 2, "{line}");
    let addr = line["listening"]
        .as_str()
        .unwrap_or_else(|| panic!("listening is not a string: {line}"));
    let (_, port) = addr.rsplit_once(':').unwrap_or_else(|| panic!("not host:port: {addr}"));
    let workers: Vec<Proc> = (0..2)
        .map(|i| Proc::spawn(&format!("DMLC_ROLE=worker {i}"), &mut dmlc("worker", port)))
        .collect();
    let done: Vec<Finished> = workers.into_iter().map(|w| w.wait(RUN_TIMEOUT)).collect();
    for w in &done {
        w.assert_success().assert_no_panic();
        assert!(
            find_event(&w.json_lines(), "done").is_some(),
            "no done line: {}",
            w.shown()
        );
    }
    scheduler.wait(RUN_TIMEOUT).assert_success().assert_no_panic();
}

/// Under torchrun, `MASTER_ADDR:MASTER_PORT` is torchrun's own store, which
/// says nothing to a Sinter worker (the worker used to fail with "Resource
/// temporarily unavailable"). A peer that is not Sinter, silent or speaking
/// something else, is named as the clash with a usage error; and
/// `SINTER_COORDINATOR` names Sinter's coordinator beside torchrun's variables.
#[test]
fn under_torchrun_a_port_clash_is_named_and_sinter_coordinator_wins() {
    let dir = temp_dir();
    // Two strangers on the master port: one silent (as torchrun's store is), one that speaks first.
    for speaks in [false, true] {
        let store = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = store.local_addr().expect("addr").port().to_string();
        let stranger = std::thread::spawn(move || {
            let (mut s, _) = store.accept().expect("accept");
            if speaks {
                let _ = std::io::Write::write_all(&mut s, b"HTTP/1.1 400 Bad Request\r\n\r\n");
            }
            // Held open until the worker gives up on it.
            let _ = std::io::Read::read(&mut s, &mut [0u8; 1024]);
        });
        let out = run(
            "sinter worker against a stranger",
            sinter(dir.path())
                .args(["worker", "--config"])
                .arg(example("fashion-mlp.toml"))
                .envs([
                    ("MASTER_ADDR", "127.0.0.1"),
                    ("MASTER_PORT", port.as_str()),
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("SINTER_SECRET", SECRET),
                ]),
            RUN_TIMEOUT,
        );
        out.assert_no_panic();
        assert_eq!(out.code(), Some(2), "{}", out.shown());
        for named in [
            "is not a Sinter coordinator",
            "$MASTER_PORT",
            "SINTER_COORDINATOR",
            port.as_str(),
        ] {
            assert!(
                out.stderr.contains(named),
                "stderr does not name `{named}`: {}",
                out.shown()
            );
        }
        stranger.join().expect("the stranger thread");
    }
    // With a stranger on MASTER_PORT, SINTER_COORDINATOR reaches the real coordinator.
    let store = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let store_port = store.local_addr().expect("addr").port().to_string();
    let results = run_bench_cluster(&[], Some(2), |i, host, port| {
        [
            ("MASTER_ADDR", host.to_string()),
            ("MASTER_PORT", store_port.clone()),
            ("SINTER_COORDINATOR", format!("{host}:{port}")),
            ("RANK", i.to_string()),
            ("WORLD_SIZE", "2".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    });
    assert_bench_results(&results[0], &[4096, 1 << 20], 2);
    drop(store);
}
