//! The shared-memory transport between workers on one machine, from outside:
//! it is chosen by default, `tcp` still works when asked for, and a killed
//! worker is still named promptly with nothing left in /dev/shm. (Workers in
//! separate network namespaces keep TCP: `netns`.)

use std::time::Duration;

use crate::support::{KillOnDrop, Proc, RUN_TIMEOUT, descendants, event, example, find_event, run, sinter, temp_dir};

/// How soon after a worker is killed the whole job must have ended.
const FAILURE_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The transports of the `peer link` log lines (`SINTER_LOG=info`), one per worker and peer.
fn peer_links(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("peer link"))
        .map(|l| {
            l.split_once("transport=")
                .map_or("?", |(_, t)| t.trim().trim_matches('"'))
        })
        .collect()
}

/// Entries of /dev/shm made by any of `pids` (segments are named `sinter-<creator pid>-…`).
fn segments_of(pids: &[u32]) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else {
        return Vec::new();
    };
    dir.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| pids.iter().any(|p| n.starts_with(&format!("sinter-{p}-"))))
        .collect()
}

#[test]
fn bench_workers_on_one_machine_share_memory_unless_told_tcp() {
    for (flag, want) in [(None, "shm"), (Some("tcp"), "tcp")] {
        let dir = temp_dir();
        let mut cmd = sinter(dir.path());
        cmd.args(["bench", "allreduce", "--workers", "2", "--sizes", "4KiB,1MiB", "--json"]);
        if let Some(t) = flag {
            cmd.args(["--transport", t]);
        }
        let out = run(
            &format!("sinter bench allreduce --transport {want}"),
            &mut cmd,
            RUN_TIMEOUT,
        );
        out.assert_success().assert_no_panic();
        let lines = out.json_lines();
        assert_eq!(lines.len(), 2, "{}", out.shown());
        for l in &lines {
            assert_eq!(l["correct"], true, "{l}");
            assert_eq!(l["transport"], want, "{l}");
        }
    }
}

#[test]
fn training_links_local_workers_through_shared_memory_and_tcp_still_trains() {
    for (transport, want) in [("auto", "shm"), ("tcp", "tcp")] {
        let dir = temp_dir();
        let out = run(
            &format!("sinter train --workers 2 with transport {transport}"),
            sinter(dir.path())
                .env("SINTER_LOG", "info")
                .arg("train")
                .arg(example("fashion-mlp.toml"))
                .args(["--workers", "2", "--json", "-q", "--set", "train.max_steps=30", "--set"])
                .arg(format!("cluster.transport=\"{transport}\"")),
            RUN_TIMEOUT,
        );
        out.assert_success().assert_no_panic();
        let done = find_event(&out.json_lines(), "done")
            .cloned()
            .unwrap_or_else(|| panic!("no done line: {}", out.shown()));
        assert_eq!(done["steps"], 30, "{done}");
        // Rank 0's link to rank 1 and rank 1's to rank 0.
        assert_eq!(peer_links(&out.stderr), [want, want], "{}", out.shown());
    }
}

// The kill tests in `cluster` run on shared memory too (the default); this one also checks
// that the job used it and that no segment outlives the processes.
#[test]
fn a_killed_worker_on_shared_memory_is_named_and_leaves_nothing_in_dev_shm() {
    let dir = temp_dir();
    let mut launcher = Proc::spawn(
        "sinter train --workers 2",
        sinter(dir.path())
            .env("SINTER_LOG", "info")
            .arg("train")
            .arg(example("fashion-mlp.toml"))
            .args(["--workers", "2", "--json", "-q", "--set", "train.epochs=1000"]),
    );
    launcher.wait_json("the start line", RUN_TIMEOUT, |v| event(v) == Some("start"));
    let started = KillOnDrop(descendants(launcher.pid));
    let pids: Vec<u32> = started.0.iter().map(|p| p.pid).collect();
    let rank1 = *started
        .0
        .iter()
        .find(|p| p.env("RANK").as_deref() == Some("1"))
        .unwrap_or_else(|| panic!("no child with RANK=1 among {:?}", started.0));
    rank1.signal(libc::SIGKILL);
    let out = launcher.wait(FAILURE_EXIT_TIMEOUT);
    assert!(!out.status.success(), "the job succeeded: {}", out.shown());
    out.assert_no_panic();
    assert!(
        out.stderr.contains("rank 1"),
        "stderr does not name rank 1: {}",
        out.shown()
    );
    assert_eq!(peer_links(&out.stderr), ["shm", "shm"], "{}", out.shown());
    let alive: Vec<_> = started.0.iter().filter(|p| p.alive()).collect();
    assert!(alive.is_empty(), "still running: {alive:?}");
    assert_eq!(segments_of(&pids), Vec::<String>::new(), "segments left in /dev/shm");
}
