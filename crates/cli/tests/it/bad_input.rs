//! Bad input never crashes: damaged data files and bad configs end with a
//! documented exit code and a message naming the file, line or key.

use std::path::Path;

use crate::support::{Finished, RUN_TIMEOUT, example, fashion_mnist, run, sinter, temp_dir};

/// Exit codes of `crates/cli/src/main.rs` (`exit` module).
const EXIT_FAILURE: i32 = 1;
const EXIT_USAGE: i32 = 2;

fn train(dir: &Path, config: &Path, extra: &[&str]) -> Finished {
    let out = run(
        "sinter train",
        sinter(dir).arg("train").arg(config).args(["--json", "-q"]).args(extra),
        RUN_TIMEOUT,
    );
    out.assert_no_panic();
    out
}

fn assert_refused(out: &Finished, code: i32, names: &[&str]) {
    assert_eq!(out.code(), Some(code), "expected exit code {code}: {}", out.shown());
    for n in names {
        assert!(out.stderr.contains(n), "stderr does not name `{n}`: {}", out.shown());
    }
    assert!(
        out.stdout.iter().all(|l| !l.contains("\"done\"")),
        "a refused job printed a done line: {}",
        out.shown()
    );
}

fn write(p: &Path, bytes: &[u8]) {
    std::fs::write(p, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
}

/// A job on the IDX directory `data` (an MLP, one worker).
fn idx_job(dir: &Path, data: &Path) -> std::path::PathBuf {
    let cfg = dir.join("job.toml");
    let text = format!(
        "[data]\nformat = \"idx\"\ntrain = {:?}\n[model]\nkind = \"mlp\"\nhidden = [8]\n[optim]\nkind = \"sgd\"\nlr = 0.1\n",
        data.display().to_string()
    );
    write(&cfg, text.as_bytes());
    cfg
}

/// An IDX header: magic 00 00 08 (unsigned byte) NDIMS, then the dimensions, big-endian.
fn idx_header(dims: &[u32]) -> Vec<u8> {
    let mut h = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        h.extend_from_slice(&d.to_be_bytes());
    }
    h
}

#[test]
fn truncated_idx_file_is_refused_naming_it() {
    let dir = temp_dir();
    let data = dir.path().join("idx");
    std::fs::create_dir(&data).expect("mkdir");
    // 100 images of 28×28 announced, 1,000 bytes present.
    let mut images = idx_header(&[100, 28, 28]);
    images.extend(std::iter::repeat_n(7u8, 1_000));
    write(&data.join("train-images-idx3-ubyte"), &images);
    let mut labels = idx_header(&[100]);
    labels.extend((0..100u8).map(|i| i % 10));
    write(&data.join("train-labels-idx1-ubyte"), &labels);
    let out = train(dir.path(), &idx_job(dir.path(), &data), &[]);
    assert_refused(&out, EXIT_FAILURE, &["train-images-idx3-ubyte"]);
}

#[test]
fn truncated_gzip_idx_file_is_refused_naming_it() {
    let dir = temp_dir();
    let data = dir.path().join("idx");
    std::fs::create_dir(&data).expect("mkdir");
    // The first 64 KiB of the real gzip stream: a valid start that ends too soon.
    let whole = std::fs::read(fashion_mnist().join("train-images-idx3-ubyte.gz")).expect("reading Fashion-MNIST");
    write(&data.join("train-images-idx3-ubyte.gz"), &whole[..64 * 1024]);
    std::fs::copy(
        fashion_mnist().join("train-labels-idx1-ubyte.gz"),
        data.join("train-labels-idx1-ubyte.gz"),
    )
    .expect("copying labels");
    let out = train(dir.path(), &idx_job(dir.path(), &data), &[]);
    assert_refused(&out, EXIT_FAILURE, &["train-images-idx3-ubyte.gz"]);
}

#[test]
fn libsvm_file_with_a_bad_token_is_refused_naming_the_line() {
    let dir = temp_dir();
    let svm = dir.path().join("bad.svm");
    write(&svm, b"1 3:0.5 7:1\n0 2:abc 5:1\n1 1:1\n");
    let cfg = dir.path().join("job.toml");
    let text = format!(
        "[data]\nformat = \"libsvm\"\ntrain = {:?}\nhash_bits = 10\n[model]\nkind = \"logreg\"\nhash_bits = 10\n[optim]\nkind = \"adagrad\"\nlr = 0.1\n",
        svm.display().to_string()
    );
    write(&cfg, text.as_bytes());
    let out = train(dir.path(), &cfg, &[]);
    assert_refused(&out, EXIT_FAILURE, &[&format!("{}:2", svm.display()), "abc"]);
}

#[test]
fn config_with_an_unknown_key_is_a_usage_error_naming_the_key() {
    let dir = temp_dir();
    let cfg = dir.path().join("typo.toml");
    let mut text = std::fs::read_to_string(example("fashion-mlp.toml")).expect("reading the example");
    text = text.replace("../data/fashion-mnist", &fashion_mnist().display().to_string());
    text = text.replace("epochs = 2", "epoch = 2");
    assert!(text.contains("epoch = 2"), "the example changed; update this test");
    write(&cfg, text.as_bytes());
    let out = train(dir.path(), &cfg, &[]);
    assert_refused(&out, EXIT_USAGE, &["typo.toml", "epoch"]);
}

#[test]
fn set_without_equals_is_a_usage_error_naming_it() {
    let dir = temp_dir();
    let out = train(dir.path(), &example("fashion-mlp.toml"), &["--set", "train.epochs"]);
    assert_refused(&out, EXIT_USAGE, &["train.epochs", "key=value"]);
}

#[test]
fn a_prediction_with_a_bad_value_is_refused_naming_it() {
    let dir = temp_dir();
    for (flag, value) in [("--cpu-scale", "0"), ("--cpu-scale", "NaN"), ("--burst", "lots")] {
        let out = run(
            "sinter sim --predict",
            sinter(dir.path()).args(["sim", "--predict", "--workers", "2", flag, value]),
            RUN_TIMEOUT,
        );
        out.assert_no_panic();
        assert_refused(&out, EXIT_FAILURE, &[value]);
        assert!(
            out.stdout.is_empty(),
            "{flag} {value} printed a prediction: {}",
            out.shown()
        );
    }
}

#[test]
fn missing_config_file_is_a_usage_error_naming_it() {
    let dir = temp_dir();
    let out = train(dir.path(), &dir.path().join("nowhere.toml"), &[]);
    assert_refused(&out, EXIT_USAGE, &["nowhere.toml"]);
}

/// Issue 16: a sparse model on dense data (and a dense model on sparse data)
/// ended in a panic with exit 101; it is a config error naming the data file
/// and the model, in one process and in a cluster.
#[test]
fn a_model_that_cannot_read_the_data_is_a_usage_error() {
    let dir = temp_dir();
    let csv = dir.path().join("dense.csv");
    let rows: String = (0..64).map(|i| format!("{},{}.5,{}\n", i % 2, i, 64 - i)).collect();
    write(&csv, format!("label,a,b\n{rows}").as_bytes());
    let svm = dir.path().join("sparse.svm");
    let rows: String = (0..64)
        .map(|i| format!("{} {}:1 {}:0.5\n", i % 2, 1 + i % 7, 9 + i % 5))
        .collect();
    write(&svm, rows.as_bytes());
    let cases = [
        (
            &csv,
            "[model]\nkind = \"logreg\"\nhash_bits = 10\n[optim]\nkind = \"adagrad\"\nlr = 0.1\n",
            "logreg",
        ),
        (
            &svm,
            "[model]\nkind = \"mlp\"\nhidden = [8]\n[optim]\nkind = \"sgd\"\nlr = 0.1\n",
            "mlp",
        ),
    ];
    for (data, model, kind) in cases {
        let cfg = dir.path().join(format!("{kind}.toml"));
        let text = format!(
            "[data]\ntrain = {:?}\n{model}[train]\nbatch_size = 8\n",
            data.display().to_string()
        );
        write(&cfg, text.as_bytes());
        for workers in ["1", "2"] {
            let out = train(dir.path(), &cfg, &["--workers", workers]);
            assert_refused(&out, EXIT_USAGE, &[&data.display().to_string(), kind]);
        }
    }
}
