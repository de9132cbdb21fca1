//! Hostile strangers: connections that flood every listening port of a job
//! (the coordinator's, each parameter-server shard's, each worker's peer
//! listener) from its first moment, through rendezvous and training, change
//! nothing in what the job computes. Issue 16.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Proc, RUN_TIMEOUT, descendants, example, find_event, gen_click, sinter, temp_dir};

/// Connections the flooder opens per second, over every port it found.
const FLOOD_PER_S: u64 = 1_000;
/// Idle connections the flooder holds open at once (the oldest is closed first).
const HELD_MAX: usize = 300;

/// Ports in LISTEN state owned by `pid` (from /proc/PID/net/tcp{,6} and the
/// process's socket descriptors).
fn listening_ports(pid: u32) -> Vec<u16> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: BTreeSet<String> = fds
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
                ports.extend(port);
            }
        }
    }
    ports
}

/// What a flood did.
#[derive(Debug, Default)]
struct Flooded {
    connected: AtomicU64,
    /// Connections made to each process (by pid).
    processes: std::sync::Mutex<BTreeMap<u32, u64>>,
}

/// Floods every port the process tree of `root` listens on until `stop`:
/// in turn, a connection closed at once, one that sends garbage, one that
/// sends a frame header with a bad magic and stalls, and one held open idle.
fn flood(root: u32, stop: Arc<AtomicBool>, seen: Arc<Flooded>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut targets: Vec<(u32, u16)> = Vec::new();
        let mut held: VecDeque<TcpStream> = VecDeque::new();
        let mut scanned = Instant::now() - Duration::from_secs(1);
        let gap = Duration::from_micros(1_000_000 / FLOOD_PER_S);
        let mut next = Instant::now();
        let mut k = 0usize;
        while !stop.load(Ordering::SeqCst) {
            if scanned.elapsed() > Duration::from_millis(50) {
                let pids = std::iter::once(root).chain(descendants(root).into_iter().map(|p| p.pid));
                targets = pids
                    .flat_map(|pid| listening_ports(pid).into_iter().map(move |port| (pid, port)))
                    .collect();
                scanned = Instant::now();
            }
            if targets.is_empty() {
                thread::sleep(Duration::from_millis(1));
                continue;
            }
            let (pid, port) = targets[k % targets.len()];
            k += 1;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
                seen.connected.fetch_add(1, Ordering::Relaxed);
                *seen.processes.lock().expect("lock").entry(pid).or_default() += 1;
                match k % 4 {
                    0 => {}
                    1 => {
                        let _ = s.write_all(&[0x5A; 64]);
                    }
                    2 => {
                        let mut header = [0xFFu8; 32];
                        header[..4].copy_from_slice(b"NOPE");
                        let _ = s.write_all(&header);
                        held.push_back(s);
                    }
                    _ => held.push_back(s),
                }
                while held.len() > HELD_MAX {
                    held.pop_front();
                }
            }
            next += gap;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            } else {
                next = Instant::now();
            }
        }
    })
}

/// Runs `sinter train CONFIG --json -q EXTRA`, flooded from its start when
/// `flooded`; returns its last epoch line and what the flood did.
fn run_job(dir: &Path, config: &Path, extra: &[&str], flooded: bool) -> (Value, Arc<Flooded>) {
    let mut cmd = sinter(dir);
    cmd.arg("train").arg(config).args(["--json", "-q"]).args(extra);
    let job = Proc::spawn(&format!("sinter train (flooded: {flooded})"), &mut cmd);
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Flooded::default());
    let flooder = flooded.then(|| flood(job.pid, stop.clone(), seen.clone()));
    let out = job.wait(RUN_TIMEOUT);
    stop.store(true, Ordering::SeqCst);
    if let Some(f) = flooder {
        f.join().expect("the flooder panicked");
    }
    out.assert_success().assert_no_panic();
    let lines = out.json_lines();
    assert!(find_event(&lines, "done").is_some(), "no done line: {}", out.shown());
    let last = lines
        .iter()
        .rev()
        .find(|l| l.get("event").and_then(Value::as_str) == Some("epoch"))
        .cloned()
        .unwrap_or_else(|| panic!("no epoch line: {}", out.shown()));
    (last, seen)
}

/// Each listening process got at least this many strangers' connections
/// (the flooder aims at 1,000 a second; on a loaded 2-core machine it makes
/// far fewer, but never so few).
const PER_PROCESS_MIN: u64 = 20;

fn assert_flood_reached(seen: &Flooded, processes_min: usize) {
    let per_process = seen.processes.lock().expect("lock").clone();
    assert!(
        per_process.len() >= processes_min && per_process.values().all(|&n| n >= PER_PROCESS_MIN),
        "the flood reached {per_process:?} (pid: connections), not {processes_min} processes with {PER_PROCESS_MIN} each ({} in all)",
        seen.connected.load(Ordering::Relaxed)
    );
}

/// A flood of every port of a 2-worker all-reduce job (coordinator and both
/// workers' peer listeners), from its rendezvous to its end: the job
/// finishes, and its parameters are the quiet run's bit for bit, so its
/// loss and accuracy are equal.
#[test]
fn a_flood_during_rendezvous_and_training_changes_nothing_in_an_all_reduce_job() {
    let dir = temp_dir();
    // About 2 s of training: the flood covers the rendezvous and every epoch.
    let small = ["--workers", "2", "--set", "train.epochs=3"];
    let config = example("fashion-mlp.toml");
    let (quiet, _) = run_job(dir.path(), &config, &small, false);
    let (loud, seen) = run_job(dir.path(), &config, &small, true);
    assert_flood_reached(&seen, 3);
    for key in ["train_loss", "test_acc"] {
        assert_eq!(loud[key], quiet[key], "{key}: flooded {loud} quiet {quiet}");
    }
}

/// The same against a parameter-server job (coordinator, 2 shards, 2
/// workers) under BSP: the final test AUC is the quiet run's.
#[test]
fn a_flood_during_rendezvous_and_training_changes_nothing_in_a_parameter_server_job() {
    let dir = temp_dir();
    let train = dir.path().join("c.svm");
    let test = dir.path().join("c.test.svm");
    gen_click(dir.path(), &train, 40_000, 10_000, 16);
    let config = dir.path().join("click.toml");
    let text = format!(
        "[data]\nformat = \"libsvm\"\ntrain = {:?}\ntest = {:?}\nhash_bits = 16\n[model]\nkind = \"logreg\"\nhash_bits = 16\n\
         [optim]\nkind = \"adagrad\"\nlr = 0.1\n[train]\nepochs = 3\nbatch_size = 64\n\
         [cluster]\nworkers = 2\nservers = 2\nconsistency = \"bsp\"\n",
        train.display().to_string(),
        test.display().to_string()
    );
    std::fs::write(&config, text).expect("writing the config");
    let (quiet, _) = run_job(dir.path(), &config, &[], false);
    let (loud, seen) = run_job(dir.path(), &config, &[], true);
    // The coordinator and both shards at least (the workers listen on nothing here).
    assert_flood_reached(&seen, 3);
    let auc = |v: &Value| v["test_auc"].as_f64().unwrap_or_else(|| panic!("no test_auc: {v}"));
    assert!(
        (auc(&loud) - auc(&quiet)).abs() < 1e-6,
        "flooded AUC {} against quiet {}",
        auc(&loud),
        auc(&quiet)
    );
}
