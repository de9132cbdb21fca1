//! Elastic jobs (`cluster.elastic`). All-reduce: a worker killed with SIGKILL
//! no longer stops the job; the survivors regroup, continue from the newest
//! state, and take in the replacement the launcher starts. Parameter
//! servers: the replacement takes the lost worker's rank and continues where
//! the shards have it. Issue 6.

use std::time::Duration;

use serde_json::Value;

use crate::support::{
    KillOnDrop, Proc, ProcId, RUN_TIMEOUT, descendants, event, example, poll_until, sinter, temp_dir,
};

/// The longest a regroup may take here, from a kill to training again (issue 6: 2 s target on loopback).
const REGROUP_MS_MAX: f64 = 5_000.0;

/// Starts `sinter train --workers 3` elastic with `extra` settings; returns the
/// launcher once rank 0 has evaluated once (training is under way), with
/// what it started (killed on drop).
fn start_elastic(dir: &std::path::Path, extra: &[&str]) -> (Proc, KillOnDrop) {
    let mut launcher = Proc::spawn(
        "sinter train elastic",
        sinter(dir)
            .arg("train")
            .arg(example("fashion-mlp.toml"))
            .args(["--workers", "3", "--json", "-q"])
            .args(["--set", "cluster.elastic=true"])
            .args(["--set", "train.eval_every_steps=60"])
            .args(extra),
    );
    launcher.wait_json("the first evaluation", RUN_TIMEOUT, |v| event(v) == Some("eval"));
    let started = descendants(launcher.pid);
    assert_eq!(started.len(), 4, "coordinator and 3 workers expected: {started:?}");
    (launcher, KillOnDrop(started))
}

fn worker_with_rank(started: &[ProcId], rank: &str) -> ProcId {
    *started
        .iter()
        .find(|p| p.env("RANK").as_deref() == Some(rank))
        .unwrap_or_else(|| panic!("no child with RANK={rank} among {started:?}"))
}

fn regroups(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|v| event(v) == Some("regroup")).collect()
}

// issue 6: a killed worker is replaced; the job finishes with every worker agreeing
// (the coordinator compares parameter checksums at each epoch end) and trains as well.
#[test]
fn a_killed_worker_is_replaced_and_the_job_finishes() {
    let dir = temp_dir();
    let (launcher, started) = start_elastic(dir.path(), &["--set", "cluster.max_restarts=1"]);
    worker_with_rank(&started.0, "1").signal(libc::SIGKILL);
    let out = launcher.wait(RUN_TIMEOUT);
    out.assert_success();
    out.assert_no_panic();
    let lines = out.json_lines();
    let r = regroups(&lines);
    // Rank 0 reports each generation: one without the lost worker, one with its replacement.
    let worlds: Vec<u64> = r.iter().filter_map(|v| v["world"].as_u64()).collect();
    assert!(
        worlds.contains(&2),
        "no regroup to 2 workers: {worlds:?}\n{}",
        out.shown()
    );
    assert_eq!(
        worlds.last(),
        Some(&3),
        "the replacement never joined: {worlds:?}\n{}",
        out.shown()
    );
    let first = r[0];
    assert!(
        first["lost_rows"].as_u64().unwrap_or(0) > 0,
        "the lost rows were not shared out: {first}"
    );
    for g in &r {
        let ms = g["regroup_ms"].as_f64().expect("regroup_ms");
        assert!(ms < REGROUP_MS_MAX, "a regroup took {ms} ms: {g}");
    }
    let done = lines
        .iter()
        .rev()
        .find(|v| event(v) == Some("epoch"))
        .unwrap_or_else(|| panic!("no epoch line: {}", out.shown()));
    let acc = done["test_acc"].as_f64().expect("test_acc");
    assert!(acc > 0.84, "accuracy after the regroups: {acc}");
    assert!(
        out.stderr.contains("worker 1 lost"),
        "the launcher did not say so: {}",
        out.shown()
    );
    let alive: Vec<&ProcId> = started.0.iter().filter(|p| p.alive()).collect();
    assert!(alive.is_empty(), "still running: {alive:?}");
}

// issue 6: below cluster.min_workers the job stops, naming the lost rank, within the deadline.
#[test]
fn losing_workers_below_the_minimum_stops_the_job_naming_the_rank() {
    let dir = temp_dir();
    let (launcher, started) = start_elastic(
        dir.path(),
        &["--set", "cluster.min_workers=3", "--set", "train.epochs=1000"],
    );
    worker_with_rank(&started.0, "2").signal(libc::SIGKILL);
    let out = launcher.wait(Duration::from_secs(10));
    assert!(!out.status.success(), "{}", out.shown());
    out.assert_no_panic();
    assert!(
        out.stderr.contains("rank 2") && out.stderr.contains("min_workers"),
        "{}",
        out.shown()
    );
    let alive: Vec<&ProcId> = started.0.iter().filter(|p| p.alive()).collect();
    assert!(alive.is_empty(), "still running: {alive:?}");
}

// issue 6: a stopped (not dead) worker is dropped by its heartbeats; the others go on without it.
#[test]
fn a_stalled_worker_is_dropped_and_the_others_finish() {
    let dir = temp_dir();
    let (launcher, started) = start_elastic(
        dir.path(),
        &[
            "--set",
            "cluster.heartbeat_timeout_ms=1000",
            "--set",
            "cluster.collective_timeout_ms=3000",
        ],
    );
    let stalled = worker_with_rank(&started.0, "2");
    stalled.signal(libc::SIGSTOP);
    let out = launcher.wait(RUN_TIMEOUT);
    // The stopped worker is not reaped by the job: it ends with it (SIGKILL on drop).
    stalled.signal(libc::SIGKILL);
    out.assert_success();
    out.assert_no_panic();
    let lines = out.json_lines();
    let worlds: Vec<u64> = regroups(&lines).iter().filter_map(|v| v["world"].as_u64()).collect();
    assert!(
        worlds.contains(&2),
        "no regroup without the stalled worker: {}",
        out.shown()
    );
    assert!(
        lines
            .iter()
            .any(|v| event(v) == Some("epoch") && v["test_acc"].as_f64().is_some()),
        "{}",
        out.shown()
    );
}

// issue 6 (requirement 3): the coordinator killed mid-run is restarted by the launcher,
// and the job resumes from its newest checkpoint and finishes.
#[test]
fn a_killed_coordinator_is_restarted_and_the_job_resumes_from_its_checkpoint() {
    let dir = temp_dir();
    let ck = dir.path().join("ck");
    let mut launcher = Proc::spawn(
        "sinter train with a checkpoint dir",
        sinter(dir.path())
            .arg("train")
            .arg(example("fashion-mlp.toml"))
            .args(["--workers", "2", "--json", "-q"])
            .args(["--set", "train.epochs=3", "--set", "cluster.max_restarts=1"])
            .arg("--set")
            .arg(format!("checkpoint.dir=\"{}\"", ck.display())),
    );
    launcher.wait_json("the first epoch's end", RUN_TIMEOUT, |v| event(v) == Some("epoch"));
    // Checkpoints are written in the background while training goes on: wait for the first.
    poll_until("the first checkpoint", RUN_TIMEOUT, || {
        std::fs::read_dir(&ck)
            .map(|d| {
                d.flatten().any(|e| {
                    // Not a checkpoint still being written (`checkpoint::store` renames it into place).
                    !e.file_name().to_string_lossy().starts_with(".tmp-") && e.path().join("manifest.json").exists()
                })
            })
            .unwrap_or(false)
    });
    let started = descendants(launcher.pid);
    let coordinator = *started
        .iter()
        .find(|p| p.args().iter().any(|a| a == "coordinator"))
        .unwrap_or_else(|| panic!("no coordinator among {started:?}"));
    coordinator.signal(libc::SIGKILL);
    let out = launcher.wait(RUN_TIMEOUT);
    out.assert_success();
    out.assert_no_panic();
    assert!(
        out.stderr.contains("the coordinator was lost")
            && out.stderr.contains("restarting the job from the checkpoint"),
        "{}",
        out.shown()
    );
    let lines = out.json_lines();
    let starts: Vec<&Value> = lines.iter().filter(|v| event(v) == Some("start")).collect();
    assert_eq!(starts.len(), 2, "one start per cluster: {}", out.shown());
    let resumed_at = starts[1]["start_epoch"].as_u64().expect("start_epoch");
    assert!(resumed_at >= 1, "the second cluster started over: {}", starts[1]);
    let last = lines
        .iter()
        .rev()
        .find(|v| event(v) == Some("epoch"))
        .expect("an epoch line");
    assert_eq!(last["epoch"].as_u64(), Some(3), "{last}");
    assert_eq!(last["step"].as_u64(), Some(3 * 468), "{last}");
    assert!(last["test_acc"].as_f64().expect("test_acc") > 0.85, "{last}");
    let alive: Vec<&ProcId> = started.iter().filter(|p| p.alive()).collect();
    assert!(alive.is_empty(), "still running: {alive:?}");
}

/// Starts `sinter train` on the parameter-server example with `workers` workers,
/// elastic, with `extra` settings; returns the launcher once the first epoch ended.
fn start_ps_elastic(dir: &std::path::Path, name: &str, workers: u32, extra: &[&str]) -> Proc {
    let mut launcher = Proc::spawn(
        name,
        sinter(dir)
            .arg("train")
            .arg(example("fashion-mlp-ps.toml"))
            .args(["--workers", &workers.to_string(), "--json", "-q"])
            .args(["--set", "cluster.elastic=true"])
            .args(extra),
    );
    launcher.wait_json("the first epoch's end", RUN_TIMEOUT, |v| event(v) == Some("epoch"));
    launcher
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Kill → the replacement ready to train, on loopback (issue 6's target is 2 s; CI is noisy).
const REPLACE_MS_MAX: u64 = 10_000;

// issue 6: in a parameter-server job a killed worker's rank is taken over by the
// process the launcher starts, which continues the lost worker's partition at
// the step the shards have from it. Under BSP each shard then applies every
// step exactly once with every worker's push in it: nothing lost, nothing twice.
// Rank 0 (evaluation, checkpoints) is killed too.
#[test]
fn killed_parameter_server_workers_are_replaced_under_their_ranks_and_no_step_is_lost() {
    let dir = temp_dir();
    let mut launcher = start_ps_elastic(
        dir.path(),
        "sinter train ps elastic",
        3,
        &[
            "--set",
            "cluster.max_restarts=2",
            "--set",
            "cluster.consistency=\"bsp\"",
            "--set",
            "train.epochs=3",
        ],
    );
    let started = KillOnDrop(descendants(launcher.pid));
    assert_eq!(started.0.len(), 6, "coordinator, 2 servers, 3 workers: {:?}", started.0);
    let mut replaced = Vec::new();
    for rank in [1u64, 0] {
        let killed_ms = unix_ms();
        worker_with_rank(&started.0, &rank.to_string()).signal(libc::SIGKILL);
        let r = launcher.wait_json("the replacement", RUN_TIMEOUT, |v| {
            event(v) == Some("replaced") && v["rank"].as_u64() == Some(rank)
        });
        let took_ms = r["unix_ms"].as_u64().expect("unix_ms").saturating_sub(killed_ms);
        assert!(
            took_ms < REPLACE_MS_MAX,
            "rank {rank}'s replacement took {took_ms} ms: {r}"
        );
        replaced.push(r);
    }
    let out = launcher.wait(RUN_TIMEOUT);
    out.assert_success();
    out.assert_no_panic();
    let lines = out.json_lines();
    let done = lines
        .iter()
        .find(|v| event(v) == Some("done"))
        .unwrap_or_else(|| panic!("no done line: {}", out.shown()));
    let steps = done["steps"].as_u64().expect("steps");
    assert_eq!(steps, 3 * 468, "three epochs of 60,000 rows in global batches of 128");
    let shards = done["servers"].as_array().expect("servers");
    assert_eq!(shards.len(), 2);
    for s in shards {
        let st = &s["stats"];
        assert_eq!(st["steps_applied"].as_u64(), Some(steps), "shard {}: {st}", s["shard"]);
        assert_eq!(st["pushes"].as_u64(), Some(3 * steps), "shard {}: {st}", s["shard"]);
    }
    // The replacements continued inside the run, not from its start.
    for r in &replaced {
        let at = r["step"].as_u64().expect("step");
        assert!(at > 0 && at < steps, "{r}");
    }
    let acc = lines
        .iter()
        .rev()
        .find(|v| event(v) == Some("epoch"))
        .and_then(|v| v["test_acc"].as_f64())
        .unwrap_or_else(|| panic!("no test accuracy: {}", out.shown()));
    assert!(acc > 0.84, "accuracy after two replacements: {acc}");
    let alive: Vec<&ProcId> = started.0.iter().filter(|p| p.alive()).collect();
    assert!(alive.is_empty(), "still running: {alive:?}");
}

// issue 6: replicated shards and replaced workers together: a worker and a
// shard's primary killed in one run; still every step applied exactly once.
#[test]
fn a_killed_worker_and_a_killed_primary_in_one_replicated_elastic_job_lose_no_step() {
    let dir = temp_dir();
    let mut launcher = start_ps_elastic(
        dir.path(),
        "sinter train ps elastic replicated",
        2,
        &[
            "--set",
            "cluster.max_restarts=1",
            "--set",
            "cluster.replicas=2",
            "--set",
            "cluster.consistency=\"bsp\"",
        ],
    );
    let started = KillOnDrop(descendants(launcher.pid));
    assert_eq!(
        started.0.len(),
        7,
        "coordinator, 2 × 2 servers, 2 workers: {:?}",
        started.0
    );
    worker_with_rank(&started.0, "1").signal(libc::SIGKILL);
    launcher.wait_json("the replacement", RUN_TIMEOUT, |v| {
        event(v) == Some("replaced") && v["rank"].as_u64() == Some(1)
    });
    // The primary of shard 0: the first server the coordinator reported as such.
    let primary = launcher.wait_json("shard 0's replicas", RUN_TIMEOUT, |v| {
        event(v) == Some("shard") && v["shard"].as_u64() == Some(0) && v["backup_ready"].as_bool() == Some(true)
    });
    let pid = primary["primary_pid"].as_u64().expect("primary_pid") as u32;
    let victim = *started.0.iter().find(|p| p.pid == pid).expect("the primary is a child");
    victim.signal(libc::SIGKILL);
    let out = launcher.wait(RUN_TIMEOUT);
    out.assert_success();
    out.assert_no_panic();
    let lines = out.json_lines();
    let done = lines
        .iter()
        .find(|v| event(v) == Some("done"))
        .unwrap_or_else(|| panic!("no done line: {}", out.shown()));
    let steps = done["steps"].as_u64().expect("steps");
    assert_eq!(steps, 3 * 468);
    for s in done["servers"].as_array().expect("servers") {
        let st = &s["stats"];
        assert_eq!(st["steps_applied"].as_u64(), Some(steps), "shard {}: {st}", s["shard"]);
    }
    let alive: Vec<&ProcId> = started.0.iter().filter(|p| p.alive()).collect();
    assert!(alive.is_empty(), "still running: {alive:?}");
}

// issue 6: a lost parameter-server worker nobody replaces stops the job within
// cluster.replace_timeout_ms, naming its rank.
#[test]
fn an_unreplaced_parameter_server_worker_stops_the_job_naming_its_rank() {
    let dir = temp_dir();
    let launcher = start_ps_elastic(
        dir.path(),
        "sinter train ps elastic, no restarts",
        2,
        &[
            "--set",
            "cluster.max_restarts=0",
            "--set",
            "cluster.replace_timeout_ms=1000",
        ],
    );
    let started = KillOnDrop(descendants(launcher.pid));
    let t = std::time::Instant::now();
    worker_with_rank(&started.0, "1").signal(libc::SIGKILL);
    let out = launcher.wait(RUN_TIMEOUT);
    assert_eq!(out.code(), Some(3), "{}", out.shown());
    assert!(
        out.stderr.contains("rank 1") && out.stderr.contains("no worker took its place within 1000 ms"),
        "{}",
        out.shown()
    );
    assert!(t.elapsed() < Duration::from_secs(15), "took {:?}", t.elapsed());
    let alive: Vec<&ProcId> = started.0.iter().filter(|p| p.alive()).collect();
    assert!(alive.is_empty(), "still running: {alive:?}");
}
