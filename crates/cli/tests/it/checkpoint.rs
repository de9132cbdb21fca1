//! Checkpoints: resuming continues bit for bit, `checkpoint verify` finds
//! damage, and a resume falls back past a damaged checkpoint.

use std::path::{Path, PathBuf};

use crate::support::{Finished, RUN_TIMEOUT, event, example, find_event, run, sinter, temp_dir};

/// Checkpoint directory of the second epoch: 468 steps of 128 rows per epoch of Fashion-MNIST's 60,000.
const EPOCH_2_CHECKPOINT: &str = "step-000000000936";
const EPOCH_1_CHECKPOINT: &str = "step-000000000468";

/// Trains the example MLP, made small, on Fashion-MNIST for `epochs` into `ckpt`.
fn train_small(dir: &Path, workers: u32, epochs: u32, ckpt: &Path, resume: bool) -> Finished {
    train_small_with(dir, workers, epochs, ckpt, resume, &[])
}

fn train_small_with(dir: &Path, workers: u32, epochs: u32, ckpt: &Path, resume: bool, extra: &[&str]) -> Finished {
    let mut cmd = sinter(dir);
    cmd.arg("train")
        .arg(example("fashion-mlp.toml"))
        .args(["--json", "-q", "--workers", &workers.to_string()])
        .args(extra)
        .args(["--set", "model.hidden=[32]", "--set", &format!("train.epochs={epochs}")])
        .arg("--set")
        .arg(format!("checkpoint.dir={}", ckpt.display()));
    if resume {
        cmd.arg("--resume").arg(ckpt);
    }
    let out = run(
        &format!("sinter train ({epochs} epochs, {workers} workers, resume {resume})"),
        &mut cmd,
        RUN_TIMEOUT,
    );
    out.assert_success().assert_no_panic();
    out
}

/// The checkpoint directories in `dir`, oldest first.
fn checkpoints(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    v.sort();
    v
}

fn newest(dir: &Path) -> PathBuf {
    checkpoints(dir)
        .pop()
        .unwrap_or_else(|| panic!("no checkpoint in {}", dir.display()))
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn verify(dir: &Path, ckpt: &Path) -> Finished {
    run(
        "sinter checkpoint verify",
        sinter(dir).args(["checkpoint", "verify"]).arg(ckpt),
        RUN_TIMEOUT,
    )
}

fn start_epoch(out: &Finished) -> u64 {
    let lines = out.json_lines();
    let start = find_event(&lines, "start").unwrap_or_else(|| panic!("no start line: {}", out.shown()));
    start["start_epoch"]
        .as_u64()
        .unwrap_or_else(|| panic!("no start_epoch: {start}"))
}

/// Runs 2 epochs straight and 1 + 1 with a resume; the final checkpoints must hold the same bytes.
fn assert_resume_is_exact(workers: u32) {
    assert_resume_is_exact_with(workers, &[]);
}

fn assert_resume_is_exact_with(workers: u32, extra: &[&str]) {
    let dir = temp_dir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    train_small_with(dir.path(), workers, 2, &a, false, extra);
    let first = train_small_with(dir.path(), workers, 1, &b, false, extra);
    assert_eq!(start_epoch(&first), 0);
    let resumed = train_small_with(dir.path(), workers, 2, &b, true, extra);
    assert_eq!(
        start_epoch(&resumed),
        1,
        "the resume did not start at epoch 1: {}",
        resumed.shown()
    );
    assert_eq!(event(resumed.json_lines().last().expect("lines")), Some("done"));

    let (na, nb) = (newest(&a), newest(&b));
    assert!(na.ends_with(EPOCH_2_CHECKPOINT), "{}", na.display());
    assert!(nb.ends_with(EPOCH_2_CHECKPOINT), "{}", nb.display());
    // The safetensors files hold only names, shapes and values (the manifests differ by their time).
    for file in ["params.safetensors", "optim.safetensors"] {
        let (x, y) = (read(&na.join(file)), read(&nb.join(file)));
        assert_eq!(x.len(), y.len(), "{file} lengths differ");
        assert!(x == y, "{file} differs between the straight run and the resumed one");
    }
    // A second epoch changes the parameters, so the comparison above can tell runs apart.
    assert_ne!(
        read(&a.join(EPOCH_1_CHECKPOINT).join("params.safetensors")),
        read(&na.join("params.safetensors"))
    );

    for d in [&a, &b] {
        let v = verify(dir.path(), d);
        v.assert_success();
        assert_eq!(
            v.stdout.iter().filter(|l| l.ends_with(" ok")).count(),
            2,
            "{}",
            v.shown()
        );
    }
}

// issue 2: resuming from a checkpoint continues exactly where the run stopped.
#[test]
fn resume_gives_the_same_parameters_as_an_uninterrupted_run() {
    assert_resume_is_exact(1);
}

// issue 2: the same in a local cluster (rank 0 writes, every rank resumes).
#[test]
fn resume_in_a_cluster_gives_the_same_parameters_as_an_uninterrupted_run() {
    assert_resume_is_exact(2);
}

// issue 4, issue 6: a parameter-server job (BSP, 2 workers, 2 shards) checkpoints the model
// gathered from its shards, optimizer state included, and resumes exactly.
#[test]
fn resume_through_parameter_servers_gives_the_same_parameters_as_an_uninterrupted_run() {
    assert_resume_is_exact_with(2, &["--servers", "2"]);
}

// issue 6 (requirement 4): a checkpoint written by 2 shards and 2 workers resumes on 3 shards
// and 4 workers and reaches the accuracy of the run that was never interrupted.
#[test]
fn parameter_server_checkpoint_resumes_on_another_cluster_shape() {
    let dir = temp_dir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let straight = train_small_with(dir.path(), 2, 2, &a, false, &["--servers", "2"]);
    train_small_with(dir.path(), 2, 1, &b, false, &["--servers", "2"]);
    let resumed = train_small_with(dir.path(), 4, 2, &b, true, &["--servers", "3"]);
    assert_eq!(start_epoch(&resumed), 1, "{}", resumed.shown());
    let acc = |out: &Finished| {
        let lines = out.json_lines();
        let done = find_event(&lines, "done").unwrap_or_else(|| panic!("no done line: {}", out.shown()));
        (
            done["last"]["test_acc"].as_f64().unwrap_or(0.0),
            done["servers"].as_array().map(Vec::len),
        )
    };
    let ((acc_a, shards_a), (acc_b, shards_b)) = (acc(&straight), acc(&resumed));
    assert_eq!((shards_a, shards_b), (Some(2), Some(3)));
    assert!(
        (acc_a - acc_b).abs() < 0.01,
        "uninterrupted {acc_a} vs resumed on 3 shards and 4 workers {acc_b}"
    );
    // 4 workers of 32 rows take the same 468 steps an epoch as 2 of 64.
    assert!(newest(&b).ends_with(EPOCH_2_CHECKPOINT), "{}", newest(&b).display());
}

// issue 6: under async consistency a parameter-server checkpoint is a consistent cut:
// every worker's first N steps are in it and none after, so the shards had taken
// exactly workers × N optimizer steps (each async push is one), however far ahead
// a fast worker ran meanwhile.
#[test]
fn an_async_parameter_server_checkpoint_is_a_consistent_cut() {
    let dir = temp_dir();
    let ck = dir.path().join("ck");
    let extra = [
        "--servers",
        "2",
        "--set",
        "cluster.consistency=\"async\"",
        "--set",
        "checkpoint.keep_last=3",
    ];
    train_small_with(dir.path(), 3, 3, &ck, false, &extra);
    let all = checkpoints(&ck);
    assert_eq!(all.len(), 3, "{all:?}");
    for path in all {
        let snap = checkpoint::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let t = snap
            .tensor("optim", "optim.step")
            .unwrap_or_else(|| panic!("{}: no optim.step", path.display()));
        // Stored as (steps / 2^24, steps % 2^24), exactly representable in f32.
        let steps = t.data[0] as u64 * (1 << 24) + t.data[1] as u64;
        assert_eq!(steps, 3 * snap.manifest.step, "{}", path.display());
    }
}

// issue 2, issue 6: one flipped byte is found, and a resume falls back to the previous checkpoint.
#[test]
fn damaged_checkpoint_is_reported_and_resume_falls_back_to_the_previous_one() {
    let dir = temp_dir();
    let ckpt = dir.path().join("ckpt");
    train_small(dir.path(), 1, 2, &ckpt, false);
    let all = checkpoints(&ckpt);
    assert_eq!(all.len(), 2, "{all:?}");
    let damaged = newest(&ckpt).join("params.safetensors");
    let good = read(&damaged);
    let mut bytes = good.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&damaged, &bytes).expect("writing the damaged file");

    let v = verify(dir.path(), &ckpt);
    assert!(!v.status.success(), "verify passed a damaged checkpoint: {}", v.shown());
    v.assert_no_panic();
    assert!(
        v.stderr.contains(&damaged.display().to_string()),
        "verify does not name {}: {}",
        damaged.display(),
        v.shown()
    );

    let inspect = run(
        "sinter checkpoint inspect",
        sinter(dir.path()).args(["checkpoint", "inspect"]).arg(&ckpt),
        RUN_TIMEOUT,
    );
    inspect.assert_success();
    assert!(
        inspect
            .stdout
            .iter()
            .any(|l| l.contains(EPOCH_2_CHECKPOINT) && l.contains("DAMAGED")),
        "{}",
        inspect.shown()
    );

    let resumed = train_small(dir.path(), 1, 2, &ckpt, true);
    assert_eq!(
        start_epoch(&resumed),
        1,
        "did not fall back to the epoch-1 checkpoint: {}",
        resumed.shown()
    );
    assert!(
        resumed.stderr.contains("damaged") && resumed.stderr.contains(EPOCH_2_CHECKPOINT),
        "the resume does not say it skipped {EPOCH_2_CHECKPOINT}: {}",
        resumed.shown()
    );
    // stderr is a pipe here: log lines carry no terminal colour codes.
    assert!(
        !resumed.stderr.contains('\x1b'),
        "colour codes in a captured log: {}",
        resumed.shown()
    );
    assert_eq!(event(resumed.json_lines().last().expect("lines")), Some("done"));
    // The rerun epoch replaced the damaged checkpoint with exactly what was there before the damage.
    verify(dir.path(), &ckpt).assert_success();
    assert!(
        read(&damaged) == good,
        "the rewritten checkpoint differs from the original"
    );
}

/// Issue 16: a run stopped by `train.max_steps` inside an epoch checkpointed
/// the next epoch as its position, so `--resume` skipped the rest of the
/// epoch. Now 200 steps, then a resume to the epoch's end, give the bytes of
/// one uninterrupted epoch (468 steps), in one process and in a cluster.
#[test]
fn a_resume_after_max_steps_finishes_the_epoch_exactly() {
    for workers in [1, 2] {
        let dir = temp_dir();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        train_small(dir.path(), workers, 1, &a, false);
        let stopped = train_small_with(dir.path(), workers, 1, &b, false, &["--set", "train.max_steps=200"]);
        assert_eq!(event(stopped.json_lines().last().expect("lines")), Some("done"));
        assert!(newest(&b).ends_with("step-000000000200"), "{}", newest(&b).display());
        let resumed = train_small(dir.path(), workers, 1, &b, true);
        assert_eq!(
            start_epoch(&resumed),
            0,
            "the resume skipped the stopped epoch: {}",
            resumed.shown()
        );
        let (na, nb) = (newest(&a), newest(&b));
        assert!(na.ends_with(EPOCH_1_CHECKPOINT), "{}", na.display());
        assert!(nb.ends_with(EPOCH_1_CHECKPOINT), "{workers} workers: {}", nb.display());
        for file in ["params.safetensors", "optim.safetensors"] {
            assert!(
                read(&na.join(file)) == read(&nb.join(file)),
                "{workers} workers: {file} differs between the straight epoch and 200 steps plus a resume"
            );
        }
    }
}
