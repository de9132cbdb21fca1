//! `sinter-edge` against a real federation server (in this test's process):
//! it trains every round and exits 0; without a server it gives up at its
//! deadline with exit code 3.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SECRET: &str = "edge-test-secret-0123456789abcdef";

/// A linearly separable two-class CSV of `rows` rows.
fn write_csv(path: &Path, rows: usize, seed: u64) {
    let mut text = String::from("label,a,b,c\n");
    let mut x = seed;
    for r in 0..rows {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let noise = ((x >> 40) as f64 / (1u64 << 24) as f64) - 0.5;
        let y = r % 2;
        let c = if y == 1 { 1.0 } else { -1.0 };
        text.push_str(&format!("{y},{},{},{}\n", c + noise, c - noise, noise));
    }
    std::fs::write(path, text).expect("writing a CSV");
}

fn config(dir: &Path) -> std::path::PathBuf {
    write_csv(&dir.join("train.csv"), 400, 1);
    write_csv(&dir.join("test.csv"), 200, 2);
    let path = dir.join("edge.toml");
    std::fs::write(
        &path,
        "[data]\nformat = \"csv\"\ntrain = \"train.csv\"\ntest = \"test.csv\"\ncsv_header = true\nlabel_column = \"label\"\n\
         [model]\nkind = \"softmax\"\n[optim]\nkind = \"sgd\"\nlr = 0.1\n[train]\nbatch_size = 16\n\
         [fl]\nrounds = 2\nmin_clients = 1\nmin_updates = 1\nround_timeout_ms = 20000\n",
    )
    .expect("writing the config");
    path
}

fn edge(dir: &Path, server: &str, timeout_ms: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sinter-edge"));
    c.current_dir(dir)
        .args([
            "--server",
            server,
            "--config",
            "edge.toml",
            "--json",
            "--connect-timeout-ms",
            timeout_ms,
        ])
        .env("SINTER_SECRET", SECRET)
        .stdin(Stdio::null());
    c
}

#[test]
fn the_edge_client_trains_every_round_of_a_federation() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let cfg_path = config(dir.path());
    let cfg = node::config::JobConfig::load(&cfg_path, &[]).expect("the config");
    let (tx, rx) = mpsc::channel();
    let server = std::thread::spawn(move || {
        let opts = node::fl::server::ServerOptions {
            listen: "127.0.0.1:0".into(),
            secret: node::net::Secret::new(SECRET.as_bytes().to_vec()).expect("a secret"),
            resume: None,
        };
        node::fl::server::run(&cfg, &opts, &mut |ev| {
            if let node::fl::server::ServerEvent::Listening { addr } = ev {
                let _ = tx.send(addr);
            }
        })
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).expect("the server listens");
    let out = edge(dir.path(), &addr, "20000").output().expect("running sinter-edge");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("\"event\":\"trained\"").count(), 2, "{stdout}");
    let summary = server.join().expect("the server thread").expect("the federation");
    assert_eq!(summary.rounds, 2);
    assert!(summary.test_acc.unwrap_or(0.0) > 0.9, "{summary:?}");
}

#[test]
fn the_edge_client_without_a_server_gives_up_with_exit_code_3() {
    let dir = tempfile::tempdir().expect("a temp dir");
    config(dir.path());
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let addr = free.local_addr().expect("its address").to_string();
    drop(free);
    let started = Instant::now();
    let out = edge(dir.path(), &addr, "800").output().expect("running sinter-edge");
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&addr));
    assert!(started.elapsed() < Duration::from_secs(15));
}
