//! `sinter data gen|inspect` and training a sparse model on what they make.

use crate::support::{RUN_TIMEOUT, event, gen_click, run, sinter, temp_dir};

#[test]
fn generated_click_data_inspects_and_trains_logreg_towards_the_bayes_auc() {
    let dir = temp_dir();
    let train = dir.path().join("c.svm");
    let test = dir.path().join("c.test.svm");
    let generated = gen_click(dir.path(), &train, 20_000, 5000, 16);
    assert!(
        test.is_file(),
        "no test split beside the training file: {}",
        generated.shown()
    );

    let inspect = run(
        "sinter data inspect",
        sinter(dir.path()).args(["data", "inspect"]).arg(&train),
        RUN_TIMEOUT,
    );
    inspect.assert_success();
    let field = |name: &str| -> Vec<String> {
        let line = inspect
            .stdout
            .iter()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no `{name}`: {}", inspect.shown()));
        line.split_whitespace().skip(1).map(str::to_string).collect()
    };
    assert_eq!(field("rows"), ["20000"], "{}", inspect.shown());
    assert_eq!(
        field("classes").first().map(String::as_str),
        Some("2:"),
        "{}",
        inspect.shown()
    );

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
batch_size = 128
"#,
        train = train.display().to_string(),
        test = test.display().to_string(),
    );
    std::fs::write(&cfg, text).expect("writing the config");
    let out = run(
        "sinter train logreg",
        sinter(dir.path()).arg("train").arg(&cfg).args(["--json", "-q"]),
        RUN_TIMEOUT,
    );
    out.assert_success().assert_no_panic();
    let lines = out.json_lines();
    let done = lines.last().expect("lines");
    assert_eq!(event(done), Some("done"), "{}", out.shown());
    let last = &done["last"];
    let auc = last["test_auc"]
        .as_f64()
        .unwrap_or_else(|| panic!("no test_auc in {done}"));
    let bayes = last["bayes_auc"]
        .as_f64()
        .unwrap_or_else(|| panic!("no bayes_auc in {done}"));
    assert!(auc > 0.6, "test_auc {auc}");
    // No model beats the generator's Bayes-optimal AUC by more than sampling noise.
    assert!(auc < bayes + 0.02, "test_auc {auc} above the Bayes AUC {bayes}");
}
