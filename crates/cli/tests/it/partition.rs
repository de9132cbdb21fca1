//! Each worker of a cluster reads only its partition of the training data
//! (issue 3), and training on partitions is training on the whole file.

use std::path::Path;

use serde_json::Value;

use crate::support::{Finished, RUN_TIMEOUT, event, example, find_event, gen_click, run, sinter, temp_dir};

/// The `data` lines of a run, by rank.
fn data_lines(out: &Finished) -> Vec<Value> {
    let mut lines: Vec<Value> = out
        .json_lines()
        .into_iter()
        .filter(|v| event(v) == Some("data"))
        .collect();
    lines.sort_by_key(|v| v["rank"].as_u64());
    assert_eq!(lines.len(), 2, "one data line per worker: {}", out.shown());
    lines
}

/// `(first_row, rows, rows_total, test_rows)` of a data line.
fn read(line: &Value) -> (u64, u64, u64, u64) {
    let n = |k: &str| line[k].as_u64().unwrap_or_else(|| panic!("no `{k}` in {line}"));
    (n("first_row"), n("rows"), n("rows_total"), n("test_rows"))
}

fn train_fashion(dir: &Path, elastic: bool) -> Finished {
    let out = run(
        &format!("sinter train --workers 2 (elastic {elastic})"),
        sinter(dir).arg("train").arg(example("fashion-mlp.toml")).args([
            "--workers",
            "2",
            "--json",
            "-q",
            "--set",
            "train.epochs=1",
            "--set",
            &format!("cluster.elastic={elastic}"),
        ]),
        RUN_TIMEOUT,
    );
    out.assert_success().assert_no_panic();
    out
}

// issue 3: "each worker reads only its partition of the data".
#[test]
fn each_all_reduce_worker_reads_only_its_partition_and_trains_as_on_the_whole_file() {
    let dir = temp_dir();
    let parts = train_fashion(dir.path(), false);
    let lines = data_lines(&parts);
    // Global batch 128 over 2 workers: 64 rows each per step, so the 60000 rows split in halves.
    assert_eq!(read(&lines[0]), (0, 30_000, 60_000, 10_000), "{}", lines[0]);
    assert_eq!(read(&lines[1]), (30_000, 30_000, 60_000, 0), "{}", lines[1]);
    for l in &lines {
        assert!(l.get("whole_file").is_none(), "{l}");
        assert_eq!(l["nnz"], 30_000 * 784, "{l}");
    }
    let all = parts.json_lines();
    let start = find_event(&all, "start").unwrap_or_else(|| panic!("no start line: {}", parts.shown()));
    // The workers exchanged their partitions' non-zeros for the skew report.
    assert_eq!(start["rows_max_over_mean"], 1.0, "{start}");
    assert_eq!(start["nnz_max_over_mean"], 1.0, "{start}");

    // An elastic job reads every row (a regroup may give a worker any row),
    // and trains on exactly the same rows in the same order.
    let whole = train_fashion(dir.path(), true);
    for l in data_lines(&whole) {
        assert_eq!(read(&l), (0, 60_000, 60_000, 10_000), "{l}");
        assert!(l["whole_file"].as_str().is_some_and(|w| w.contains("elastic")), "{l}");
    }
    let epoch = |out: &Finished| {
        find_event(&out.json_lines(), "epoch")
            .unwrap_or_else(|| panic!("no epoch line: {}", out.shown()))
            .clone()
    };
    let (p, w) = (epoch(&parts), epoch(&whole));
    let acc = p["test_acc"].as_f64().expect("test_acc");
    assert!(acc > 0.84, "one epoch on partitions reached only {acc}");
    assert_eq!(
        (&p["test_acc"], &p["train_loss"]),
        (&w["test_acc"], &w["train_loss"]),
        "partitions {p} vs whole file {w}"
    );
}

// issue 3: parameter-server workers read their partitions of a LIBSVM file too;
// they share no collective, so the start line reports the rows' skew only.
#[test]
fn parameter_server_workers_read_only_their_rows_of_a_libsvm_file() {
    let dir = temp_dir();
    let train = dir.path().join("c.svm");
    let test = dir.path().join("c.test.svm");
    gen_click(dir.path(), &train, 20_001, 5000, 16);
    let cfg = dir.path().join("click.toml");
    let text = format!(
        r#"
[data]
format = "libsvm"
train = {train:?}
test = {test:?}
hash_bits = 16
[model]
kind = "logreg"
hash_bits = 16
[optim]
kind = "adagrad"
lr = 0.1
[train]
epochs = 1
batch_size = 64
[cluster]
workers = 2
servers = 1
"#,
        train = train.display().to_string(),
        test = test.display().to_string(),
    );
    std::fs::write(&cfg, text).expect("writing the config");
    let out = run(
        "sinter train --servers 1",
        sinter(dir.path()).arg("train").arg(&cfg).args(["--json", "-q"]),
        RUN_TIMEOUT,
    );
    out.assert_success().assert_no_panic();
    let lines = data_lines(&out);
    // An odd row count: the first partition takes the extra row.
    assert_eq!(read(&lines[0]), (0, 10_001, 20_001, 5_000), "{}", lines[0]);
    assert_eq!(read(&lines[1]), (10_001, 10_000, 20_001, 0), "{}", lines[1]);
    let all = out.json_lines();
    let start = find_event(&all, "start").unwrap_or_else(|| panic!("no start line: {}", out.shown()));
    assert!(
        (start["rows_max_over_mean"].as_f64().expect("rows skew") - 1.0).abs() < 1e-3,
        "{start}"
    );
    assert!(start.get("nnz_max_over_mean").is_none(), "{start}");
    let done = all.last().expect("lines");
    let auc = done["last"]["test_auc"]
        .as_f64()
        .unwrap_or_else(|| panic!("no test_auc: {done}"));
    let bayes = done["last"]["bayes_auc"]
        .as_f64()
        .unwrap_or_else(|| panic!("no bayes_auc: {done}"));
    assert!(auc > 0.6 && auc < bayes + 0.02, "test_auc {auc}, Bayes {bayes}");
}

// issue 3: a sparse file whose dimension only every row tells (no data.hash_bits,
// no .meta.json) is read whole by every worker, with the reason logged and reported.
#[test]
fn a_sparse_file_without_a_fixed_dimension_is_read_whole_and_says_why() {
    let dir = temp_dir();
    let train = dir.path().join("c.svm");
    gen_click(dir.path(), &train, 4000, 1000, 12);
    for meta in ["c.svm.meta.json", "c.test.svm.meta.json"] {
        std::fs::remove_file(dir.path().join(meta)).expect("removing the meta file");
    }
    let cfg = dir.path().join("click.toml");
    let text = format!(
        r#"
[data]
format = "libsvm"
train = {train:?}
test = {test:?}
[model]
kind = "logreg"
hash_bits = 12
[optim]
kind = "adagrad"
lr = 0.1
[train]
epochs = 1
batch_size = 64
[cluster]
workers = 2
servers = 1
"#,
        train = train.display().to_string(),
        test = dir.path().join("c.test.svm").display().to_string(),
    );
    std::fs::write(&cfg, text).expect("writing the config");
    let out = run(
        "sinter train (whole-file fallback)",
        sinter(dir.path()).arg("train").arg(&cfg).args(["--json", "-q"]),
        RUN_TIMEOUT,
    );
    out.assert_success().assert_no_panic();
    let lines = data_lines(&out);
    assert_eq!(read(&lines[0]), (0, 4_000, 4_000, 1_000), "{}", lines[0]);
    assert_eq!(read(&lines[1]), (0, 4_000, 4_000, 0), "{}", lines[1]);
    for l in &lines {
        let why = l["whole_file"].as_str().unwrap_or_else(|| panic!("no reason: {l}"));
        assert!(
            why.contains("largest feature index") && why.contains("data.hash_bits"),
            "{l}"
        );
    }
    assert!(
        out.stderr.contains("reading the whole training file"),
        "{}",
        out.shown()
    );
}
