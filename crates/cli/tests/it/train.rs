//! `sinter train` on the example job: the JSON-lines log, in one process and
//! as a local cluster.

use crate::support::{RUN_TIMEOUT, event, example, find_event, run, sinter, temp_dir};

/// Keys every `epoch` line of the example job carries.
const EPOCH_KEYS: &[&str] = &["epoch", "step", "train_loss", "samples_per_s", "wall_s", "test_acc"];

#[test]
fn train_json_prints_start_epoch_and_done_lines() {
    let dir = temp_dir();
    let out = run(
        "sinter train",
        sinter(dir.path()).arg("train").arg(example("fashion-mlp.toml")).args([
            "--workers",
            "1",
            "--json",
            "--set",
            "train.max_steps=50",
        ]),
        RUN_TIMEOUT,
    );
    out.assert_success().assert_no_panic();
    let lines = out.json_lines();
    assert!(lines.len() >= 3, "{}", out.shown());
    assert_eq!(event(&lines[0]), Some("start"), "{}", out.shown());
    assert_eq!(lines[0]["world"], 1);
    let epochs: Vec<_> = lines.iter().filter(|v| event(v) == Some("epoch")).collect();
    assert!(!epochs.is_empty(), "no epoch line: {}", out.shown());
    for e in &epochs {
        for k in EPOCH_KEYS {
            assert!(
                e.get(*k).is_some_and(|v| v.is_number()),
                "epoch line without a numeric `{k}`: {e}"
            );
        }
    }
    let acc = epochs[0]["test_acc"].as_f64().expect("number");
    assert!((0.0..=1.0).contains(&acc), "test_acc {acc}");
    // One process has no exchange: its whole step is compute.
    let t = &epochs[0]["step_time"];
    assert_eq!(t["steps"], 50, "{t}");
    assert_eq!(t["exchange_ms"], 0.0, "{t}");
    assert!(t["compute_ms"].as_f64().is_some_and(|v| v > 0.0), "{t}");
    assert!(t["cpu_ms"].as_f64().is_some_and(|v| v > 0.0), "{t}");
    let (cpu, wall) = (t["compute_cpu_ms"].as_f64(), t["compute_ms"].as_f64());
    assert!(cpu.zip(wall).is_some_and(|(c, w)| c > 0.0 && c <= w + 0.01), "{t}");
    let done = lines.last().expect("lines");
    assert_eq!(event(done), Some("done"), "last line: {done}");
    // max_steps stops the run mid-epoch, after exactly that many steps.
    assert_eq!(done["steps"], 50, "{done}");
}

// issue 3: a local cluster of two worker processes trains and reports like one process.
#[test]
fn train_with_two_workers_reports_world_2_and_finishes() {
    let dir = temp_dir();
    let out = run(
        "sinter train --workers 2",
        sinter(dir.path()).arg("train").arg(example("fashion-mlp.toml")).args([
            "--workers",
            "2",
            "--json",
            "--set",
            "train.max_steps=100",
        ]),
        RUN_TIMEOUT,
    );
    out.assert_success().assert_no_panic();
    let lines = out.json_lines();
    let start = find_event(&lines, "start").unwrap_or_else(|| panic!("no start line: {}", out.shown()));
    assert_eq!(start["world"], 2, "{start}");
    // Only rank 0's start and epoch lines are relayed.
    assert_eq!(
        lines.iter().filter(|v| event(v) == Some("start")).count(),
        1,
        "{}",
        out.shown()
    );
    let epoch = find_event(&lines, "epoch").unwrap_or_else(|| panic!("no epoch line: {}", out.shown()));
    assert!(epoch["test_acc"].is_number(), "{epoch}");
    // The step splits into compute and exchange, which add up to the epoch's
    // step time; the exchange's own CPU is part of its wall time.
    let t = &epoch["step_time"];
    let ms = |k: &str| t[k].as_f64().unwrap_or_else(|| panic!("no `{k}` in {t}"));
    let step_ms = 128.0 / epoch["samples_per_s"].as_f64().expect("number") * 1e3;
    assert!(ms("exchange_ms") > 0.0 && ms("compute_ms") > 0.0, "{t}");
    let sum = ms("exchange_ms") + ms("compute_ms");
    assert!((sum - step_ms).abs() < 0.02 * step_ms, "{sum} vs {step_ms}: {t}");
    assert!(
        ms("exchange_cpu_ms") > 0.0 && ms("exchange_cpu_ms") <= ms("exchange_ms") + 0.01,
        "{t}"
    );
    let done = lines.last().expect("lines");
    assert_eq!(event(done), Some("done"), "{}", out.shown());
    assert_eq!(done["steps"], 100, "{done}");
    // The launcher removes its run directory (it lives in TMPDIR, the test's dir).
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("listing")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "the launcher left {left:?} behind");
}
