//! Parameter-server jobs of real processes: sparse models train through
//! shards under each consistency rule, and a killed shard ends the job
//! naming it.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::support::{
    KillOnDrop, Proc, RUN_TIMEOUT, descendants, event, example, find_event, gen_click, run, sinter, temp_dir,
};

/// Writes click data and a logreg job over it into `dir`; returns the config path.
fn click_job(dir: &Path) -> std::path::PathBuf {
    let train = dir.join("c.svm");
    let test = dir.join("c.test.svm");
    gen_click(dir, &train, 40_000, 10_000, 16);
    let cfg = dir.join("click.toml");
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
epochs = 2
batch_size = 64
[cluster]
workers = 2
servers = 2
"#,
        train = train.display().to_string(),
        test = test.display().to_string(),
    );
    std::fs::write(&cfg, text).expect("writing the config");
    cfg
}

/// Index of the highest non-empty staleness bucket over every shard.
fn max_staleness(servers: &[Value]) -> usize {
    servers
        .iter()
        .flat_map(|s| {
            s["stats"]["staleness"]
                .as_array()
                .expect("a staleness histogram")
                .iter()
                .enumerate()
                .filter(|(_, c)| c.as_u64().unwrap_or(0) > 0)
                .map(|(i, _)| i)
        })
        .max()
        .unwrap_or(0)
}

// issue 4: sparse LR trains through 2 servers + 2 workers under BSP, SSP and async;
// BSP never reads stale values, SSP stays within its bound, the shards share the load.
#[test]
fn sparse_logreg_trains_through_two_shards_under_each_consistency_rule() {
    let dir = temp_dir();
    let cfg = click_job(dir.path());
    for (mode, bound) in [("bsp", 0usize), ("ssp", 2), ("async", usize::MAX)] {
        let out = run(
            &format!("sinter train --servers 2 ({mode})"),
            sinter(dir.path()).arg("train").arg(&cfg).args([
                "--json",
                "-q",
                "--set",
                &format!("cluster.consistency=\"{mode}\""),
                "--set",
                "cluster.staleness=2",
            ]),
            RUN_TIMEOUT,
        );
        out.assert_success().assert_no_panic();
        let lines = out.json_lines();
        let done = find_event(&lines, "done").unwrap_or_else(|| panic!("no done line: {}", out.shown()));
        let last = &done["last"];
        let (auc, bayes) = (
            last["test_auc"].as_f64().unwrap_or(0.0),
            last["bayes_auc"].as_f64().unwrap_or(1.0),
        );
        assert!(
            auc > bayes - 0.05,
            "{mode}: test AUC {auc} far below Bayes {bayes}: {}",
            out.shown()
        );
        let servers = done["servers"].as_array().cloned().unwrap_or_default();
        assert_eq!(servers.len(), 2, "{mode}: one report per shard: {}", out.shown());
        let keys: Vec<f64> = servers
            .iter()
            .map(|s| s["stats"]["keys"].as_f64().unwrap_or(0.0))
            .collect();
        assert!(keys.iter().all(|k| *k > 0.0), "{mode}: a shard saw no keys: {keys:?}");
        let skew = keys.iter().cloned().fold(0.0, f64::max) / (keys.iter().sum::<f64>() / 2.0);
        assert!(skew < 1.2, "{mode}: shard key load max/mean {skew}");
        let stale = max_staleness(&servers);
        assert!(
            stale <= bound,
            "{mode}: a pull read {stale} steps stale (bound {bound})"
        );
        if mode == "bsp" {
            let applied: Vec<u64> = servers
                .iter()
                .map(|s| s["stats"]["steps_applied"].as_u64().unwrap_or(0))
                .collect();
            assert_eq!(
                applied[0],
                done["steps"].as_u64().unwrap_or(1),
                "BSP applies one step per global step"
            );
        }
    }
}

// issue 4 (and the no-hang rule): a shard killed with SIGKILL ends the job, naming it,
// with nothing left running.
#[test]
fn killed_server_ends_the_job_naming_the_shard() {
    let dir = temp_dir();
    let mut launcher = Proc::spawn(
        "sinter train --servers 2",
        sinter(dir.path()).arg("train").arg(example("fashion-mlp.toml")).args([
            "--workers",
            "2",
            "--servers",
            "2",
            "--json",
            "-q",
            "--set",
            "train.epochs=1000",
        ]),
    );
    launcher.wait_json("the start line", RUN_TIMEOUT, |v| event(v) == Some("start"));
    let started = descendants(launcher.pid);
    let guard = KillOnDrop(started.clone());
    assert_eq!(started.len(), 5, "coordinator, 2 servers, 2 workers: {started:?}");
    let server = *started
        .iter()
        .find(|p| p.env("DMLC_ROLE").as_deref() == Some("server"))
        .unwrap_or_else(|| panic!("no child with DMLC_ROLE=server among {started:?}"));
    server.signal(libc::SIGKILL);
    let out = launcher.wait(Duration::from_secs(10));
    assert!(!out.status.success(), "the job succeeded: {}", out.shown());
    out.assert_no_panic();
    assert!(
        out.stderr.contains("server"),
        "stderr does not name the server: {}",
        out.shown()
    );
    let alive: Vec<_> = guard.0.iter().filter(|p| p.alive()).collect();
    assert!(alive.is_empty(), "still running: {alive:?}\n{}", out.shown());
}
