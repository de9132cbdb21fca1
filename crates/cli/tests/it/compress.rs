//! Communication compression (issue 5): a local cluster trains with top-k
//! and error feedback, reports the bytes it sent, and resumes exactly with
//! its residuals.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::{Finished, RUN_TIMEOUT, event, example, fashion_mnist, find_event, run, sinter, temp_dir};

/// Trains the example MLP on 2 workers with `extra` `--set`s and returns the run.
fn train(dir: &Path, name: &str, extra: &[String]) -> Finished {
    let mut cmd = sinter(dir);
    cmd.arg("train")
        .arg(example("fashion-mlp.toml"))
        .args(["--json", "-q", "--workers", "2"]);
    for s in extra {
        cmd.arg("--set").arg(s);
    }
    let out = run(name, &mut cmd, RUN_TIMEOUT);
    out.assert_success().assert_no_panic();
    out
}

fn done(out: &Finished) -> Value {
    let lines = out.json_lines();
    let last = lines.last().unwrap_or_else(|| panic!("no output: {}", out.shown()));
    assert_eq!(event(last), Some("done"), "{}", out.shown());
    last.clone()
}

fn number(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("no number `{key}` in {v}"))
}

// issue 5: top-1% with error feedback sends at least 20× fewer bytes than the
// f32 all-reduce of the same steps, and the model still learns.
#[test]
fn topk_with_error_feedback_sends_20x_fewer_bytes_and_learns() {
    let dir = temp_dir();
    let steps = ["train.max_steps=90".to_string(), "train.eval_every_steps=30".into()];
    let plain = train(dir.path(), "sinter train (f32 all-reduce)", &steps);
    let mut topk_args = steps.to_vec();
    topk_args.push("compress.codec=topk:0.01".into());
    topk_args.push("compress.error_feedback=true".into());
    let topk = train(dir.path(), "sinter train (top-1%)", &topk_args);

    let (p, t) = (done(&plain), done(&topk));
    assert_eq!(p["steps"], 90);
    assert_eq!(t["steps"], 90);
    let (pb, tb) = (number(&p, "bytes_sent"), number(&t, "bytes_sent"));
    assert!(
        tb > 0.0 && pb >= 20.0 * tb,
        "f32 sent {pb} bytes, top-k {tb}: less than 20× apart"
    );

    let lines = topk.json_lines();
    let evals: Vec<&Value> = lines.iter().filter(|v| event(v) == Some("eval")).collect();
    assert_eq!(evals.len(), 2, "evaluations at steps 30 and 60: {}", topk.shown());
    let epoch = find_event(&lines, "epoch").unwrap_or_else(|| panic!("no epoch line: {}", topk.shown()));
    let losses = [number(evals[0], "train_loss"), number(evals[1], "train_loss")];
    assert!(losses[1] < losses[0], "the loss did not decrease: {losses:?}");
    assert!(number(epoch, "test_acc") > 0.7, "{epoch}");
    // Per step and per peer, with the ratio and the error, on every epoch and eval line.
    let comm = &epoch["comm"];
    assert!(number(comm, "ratio") >= 20.0, "{comm}");
    let rel = number(comm, "rel_error");
    assert!(rel > 0.0 && rel <= 1.0, "{comm}");
    let per_peer = comm["sent_per_peer"].as_array().expect("per peer");
    assert_eq!(per_peer.len(), 2);
    assert_eq!(
        per_peer[0].as_f64(),
        Some(0.0),
        "rank 0 sends nothing to itself: {comm}"
    );
    assert!(number(comm, "sent_per_step") > 0.0);
    assert_eq!(number(comm, "sent_total"), tb, "{comm}");
    let plain_epoch = find_event(&plain.json_lines(), "epoch").cloned().expect("epoch line");
    assert_eq!(number(&plain_epoch["comm"], "ratio"), 1.0, "{plain_epoch}");
}

fn safetensors(dir: &Path) -> PathBuf {
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
    v.pop().unwrap_or_else(|| panic!("no checkpoint in {}", dir.display()))
}

/// Trains the job `base` makes 2 epochs straight into `a`, 1 epoch into `b`
/// and then resumed from `b` to 2, and asserts that the resumed run starts at
/// epoch 1 and that both end on the same bytes of parameters, optimizer and
/// compression state. Returns `a`.
fn assert_resume_is_exact(dir: &Path, what: &str, base: impl Fn() -> std::process::Command) -> PathBuf {
    let train = |epochs: u32, ckpt: &Path, resume: bool| {
        let mut cmd = base();
        cmd.arg("--set")
            .arg(format!("train.epochs={epochs}"))
            .arg("--set")
            .arg(format!("checkpoint.dir={}", ckpt.display()));
        if resume {
            cmd.arg("--resume").arg(ckpt);
        }
        let out = run(
            &format!("sinter train ({what}, {epochs} epochs, resume {resume})"),
            &mut cmd,
            RUN_TIMEOUT,
        );
        out.assert_success().assert_no_panic();
        out
    };
    let (a, b) = (dir.join("a"), dir.join("b"));
    train(2, &a, false);
    train(1, &b, false);
    let resumed = train(2, &b, true);
    let start = find_event(&resumed.json_lines(), "start").cloned().expect("start line");
    assert_eq!(start["start_epoch"], 1, "{}", resumed.shown());
    let (na, nb) = (safetensors(&a), safetensors(&b));
    assert_eq!(na.file_name(), nb.file_name());
    for file in ["params.safetensors", "optim.safetensors", "compress.safetensors"] {
        let read = |p: &Path| std::fs::read(p.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(
            read(&na) == read(&nb),
            "{file} differs between the straight run and the resumed one"
        );
    }
    a
}

// issue 5: residuals, velocities and PowerSGD's warm start are training state:
// 1 epoch + resume + 1 epoch ends on the same bytes as 2 epochs straight.
#[test]
fn resume_with_compression_state_is_exact() {
    let dir = temp_dir();
    // Top-k with error feedback on the first layer, PowerSGD on the second, int8 elsewhere,
    // momentum moved before compression: every kind of state there is.
    let job = dir.path().join("job.toml");
    let text = std::fs::read_to_string(example("fashion-mlp.toml")).expect("example");
    let text = format!(
        "{text}\n[compress]\ncodec = \"int8\"\nmomentum = 0.9\n\
         [[compress.groups]]\nparams = [\"layers.0.weight\"]\ncodec = \"topk:0.02:f16\"\n\
         [[compress.groups]]\nparams = [\"layers.1.weight\"]\ncodec = \"powersgd:2\"\n"
    );
    std::fs::write(&job, text).expect("writing the job");
    let a = assert_resume_is_exact(dir.path(), "compressed", || {
        let mut cmd = sinter(dir.path());
        cmd.arg("train")
            .arg(&job)
            .args(["--json", "-q", "--workers", "2"])
            .arg("--set")
            .arg(format!("data.train={}", fashion_mnist().display()))
            .args(["--set", "model.hidden=[64, 32]", "--set", "optim.momentum=0"]);
        cmd
    });
    let text = inspect(dir.path(), &a);
    for name in [
        "compress/rank0.layers.0.weight.ef_residual",
        "compress/rank1.layers.0.weight.ef_residual",
        "compress/rank1.layers.1.weight.ef_residual",
        "compress/layers.1.weight.powersgd_q",
        "compress/rank1.layers.2.bias.velocity",
    ] {
        assert!(text.contains(name), "no {name} in the checkpoint:\n{text}");
    }
    // int8 keeps no residual by default.
    assert!(!text.contains("layers.2.weight.ef_residual"), "{text}");
}

/// Runs the example MLP (made small) with parameter servers, top-1% pushes and error
/// feedback, for `epochs` into `ckpt`: `shape` is (workers, servers, replicas per shard).
fn train_ps_topk(dir: &Path, shape: (u32, u32, u32), epochs: u32, ckpt: &Path, resume: bool) -> Finished {
    let mut cmd = sinter(dir);
    cmd.arg("train")
        .arg(example("fashion-mlp.toml"))
        .args(["--json", "-q"])
        .args(["--workers", &shape.0.to_string(), "--servers", &shape.1.to_string()])
        .arg("--set")
        .arg(format!("cluster.replicas={}", shape.2))
        .args(["--set", "model.hidden=[32]", "--set", "cluster.consistency=\"bsp\""])
        .args([
            "--set",
            "compress.codec=topk:0.01",
            "--set",
            "compress.error_feedback=true",
        ])
        .arg("--set")
        .arg(format!("train.epochs={epochs}"))
        .arg("--set")
        .arg(format!("checkpoint.dir={}", ckpt.display()));
    if resume {
        cmd.arg("--resume").arg(ckpt);
    }
    let out = run(
        &format!(
            "sinter train --servers {} --workers {} (replicas {}, top-1%, {epochs} epochs, resume {resume})",
            shape.1, shape.0, shape.2
        ),
        &mut cmd,
        RUN_TIMEOUT,
    );
    out.assert_success().assert_no_panic();
    out
}

fn inspect(dir: &Path, ckpt: &Path) -> String {
    let listing = run(
        "sinter checkpoint inspect",
        sinter(dir).args(["checkpoint", "inspect"]).arg(ckpt),
        RUN_TIMEOUT,
    );
    listing.assert_success();
    listing.stdout.join("\n")
}

// issue 5: with parameter servers each worker's push residuals (one per shard) are training
// state too: the shards hand them to rank 0 for the checkpoint, and 1 epoch + resume + 1 epoch
// ends on the same bytes as 2 epochs straight (BSP, 2 workers, 2 shards, top-1% + error
// feedback), with plain shards and with replicated ones (the primaries keep the residuals).
#[test]
fn parameter_server_push_residuals_resume_exactly() {
    for replicas in [1, 2] {
        assert_ps_resume_is_exact(replicas);
    }
}

fn assert_ps_resume_is_exact(replicas: u32) {
    let dir = temp_dir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let shape = (2, 2, replicas);
    train_ps_topk(dir.path(), shape, 2, &a, false);
    train_ps_topk(dir.path(), shape, 1, &b, false);
    let resumed = train_ps_topk(dir.path(), shape, 2, &b, true);
    let start = find_event(&resumed.json_lines(), "start").cloned().expect("start line");
    assert_eq!(start["start_epoch"], 1, "{}", resumed.shown());
    assert!(
        !resumed.stderr.contains("starting from zero") && !resumed.stderr.contains("start from zero"),
        "a residual was missing on resume: {}",
        resumed.shown()
    );

    let (na, nb) = (safetensors(&a), safetensors(&b));
    assert_eq!(na.file_name(), nb.file_name());
    for file in ["params.safetensors", "optim.safetensors", "compress.safetensors"] {
        let read = |p: &Path| std::fs::read(p.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let (x, y) = (read(&na), read(&nb));
        assert!(
            x == y,
            "{file} differs between the straight run and the resumed one (replicas {replicas})"
        );
    }
    let text = inspect(dir.path(), &a);
    for rank in 0..2 {
        for tensor in ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"] {
            let name = format!("compress/rank{rank}.{tensor}.ef_residual");
            assert!(text.contains(&name), "no {name} in the checkpoint:\n{text}");
        }
    }
    // Top-1% leaves most of each gradient in the residual: it is not all zeros.
    let ck = std::fs::read(na.join("compress.safetensors")).expect("compress group");
    let nonzero = ck.iter().filter(|b| **b != 0).count();
    assert!(
        ck.len() > 4 * 2 * 25_000 && nonzero > ck.len() / 2,
        "{} bytes, {nonzero} not zero",
        ck.len()
    );
}

// issue 5: the same checkpoint resumes on 4 workers and 3 shards: the residuals are re-split
// over the new shards, the two new ranks start theirs from zero (with a warning), and the next
// checkpoint holds all four.
#[test]
fn parameter_server_push_residuals_resume_on_another_cluster_shape() {
    let dir = temp_dir();
    let b = dir.path().join("b");
    train_ps_topk(dir.path(), (2, 2, 1), 1, &b, false);
    let resumed = train_ps_topk(dir.path(), (4, 3, 1), 2, &b, true);
    assert!(
        resumed.stderr.contains("different number of workers"),
        "no warning about the ranks without residuals: {}",
        resumed.shown()
    );
    let lines = resumed.json_lines();
    let done = find_event(&lines, "done").unwrap_or_else(|| panic!("no done line: {}", resumed.shown()));
    assert_eq!(done["servers"].as_array().map(Vec::len), Some(3));
    let acc = done["last"]["test_acc"].as_f64().unwrap_or(0.0);
    assert!(acc > 0.75, "test accuracy {acc} after the resume: {}", resumed.shown());
    let text = inspect(dir.path(), &b);
    for rank in 0..4 {
        let name = format!("compress/rank{rank}.layers.1.weight.ef_residual");
        assert!(text.contains(&name), "no {name} in the checkpoint:\n{text}");
    }
}

/// Local SGD on 3 workers averaging every 4 steps, the example MLP made small, 1 epoch.
fn train_local_sgd(dir: &Path, name: &str, codec: &[&str]) -> Finished {
    let mut cmd = sinter(dir);
    cmd.arg("train")
        .arg(example("fashion-mlp.toml"))
        .args(["--json", "-q", "--workers", "3"])
        .args(["--set", "model.hidden=[64]", "--set", "train.epochs=1"])
        .args([
            "--set",
            "cluster.sync=\"local_sgd\"",
            "--set",
            "cluster.average_every=4",
        ]);
    for s in codec {
        cmd.arg("--set").arg(s);
    }
    let out = run(name, &mut cmd, RUN_TIMEOUT);
    out.assert_success().assert_no_panic();
    out
}

// issue 5: compression on the model-averaging path. Local SGD compresses each worker's change
// since the last average (with error feedback for top-k); every rank ends each epoch on the same
// parameters (the coordinator compares their checksums and would stop the job), the model
// learns, and the averages cost far fewer bytes than uncompressed local SGD.
#[test]
fn compressed_local_sgd_agrees_across_ranks_learns_and_sends_fewer_bytes() {
    let dir = temp_dir();
    let plain = train_local_sgd(dir.path(), "sinter train (local SGD, f32)", &[]);
    let topk = train_local_sgd(
        dir.path(),
        "sinter train (local SGD, top-1% + EF)",
        &["compress.codec=topk:0.01", "compress.error_feedback=true"],
    );
    let int8 = train_local_sgd(dir.path(), "sinter train (local SGD, int8)", &["compress.codec=int8"]);
    let (p, t, i) = (done(&plain), done(&topk), done(&int8));
    for (name, d, out) in [("f32", &p, &plain), ("top-k", &t, &topk), ("int8", &i, &int8)] {
        // 468 steps; the epoch-end checksum comparison passed, or the job would have failed.
        assert_eq!(d["steps"], 468, "{name}: {}", out.shown());
        let acc = number(&d["last"], "test_acc");
        assert!(acc > 0.78, "{name}: test accuracy {acc}: {}", out.shown());
    }
    let acc = |d: &Value| number(&d["last"], "test_acc");
    assert!(
        acc(&t) > acc(&p) - 0.03 && acc(&i) > acc(&p) - 0.01,
        "accuracy f32 {}, top-k {}, int8 {}",
        acc(&p),
        acc(&t),
        acc(&i)
    );
    let (pb, tb, ib) = (
        number(&p, "bytes_sent"),
        number(&t, "bytes_sent"),
        number(&i, "bytes_sent"),
    );
    // The f32 ring sends 2·(W−1)/W·4N = 5.3N bytes per average; int8's all-gather (W−1)·N = 2N,
    // top-1% a few hundredths of N. The first average of a run is exact (f32) in every case.
    assert!(tb > 0.0 && pb >= 15.0 * tb, "f32 local SGD sent {pb} bytes, top-k {tb}");
    assert!(ib > 0.0 && pb >= 2.2 * ib, "f32 local SGD sent {pb} bytes, int8 {ib}");
    let epoch = find_event(&topk.json_lines(), "epoch").cloned().expect("epoch line");
    assert!(number(&epoch["comm"], "ratio") >= 15.0, "{epoch}");
}

// issue 5: compressed local SGD's state (the last average and the residuals) makes a resume
// exact: 1 epoch + resume + 1 epoch ends on the same bytes as 2 epochs straight. Plain SGD, so
// that no per-worker optimizer state is involved (a checkpoint holds rank 0's).
#[test]
fn compressed_local_sgd_resumes_exactly() {
    let dir = temp_dir();
    let a = assert_resume_is_exact(dir.path(), "local SGD, top-1%", || {
        let mut cmd = sinter(dir.path());
        cmd.arg("train")
            .arg(example("fashion-mlp.toml"))
            .args(["--json", "-q", "--workers", "2"])
            .args(["--set", "model.hidden=[32]", "--set", "optim.momentum=0"])
            .args([
                "--set",
                "cluster.sync=\"local_sgd\"",
                "--set",
                "cluster.average_every=4",
            ])
            .args([
                "--set",
                "compress.codec=topk:0.01",
                "--set",
                "compress.error_feedback=true",
            ]);
        cmd
    });
    let text = inspect(dir.path(), &a);
    for name in [
        "compress/layers.0.weight.local_sgd_average",
        "compress/rank0.layers.0.weight.ef_residual",
        "compress/rank1.layers.1.bias.ef_residual",
    ] {
        assert!(text.contains(name), "no {name} in the checkpoint:\n{text}");
    }
}
