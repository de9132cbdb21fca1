//! Federated learning with real processes: `sinter fl server` and `sinter fl
//! client`s on loopback, clients killed and stopped mid-round, a latecomer;
//! `fl sim` and `data partition` as a user runs them.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Proc, RUN_TIMEOUT, event, run, sinter, temp_dir};

const SECRET: &str = "federation-test-secret-0123456789";

/// A dense 4-class set (train and test CSV) and a federation config over it.
fn dense_federation(dir: &std::path::Path, fl: &str) -> std::path::PathBuf {
    let generated = run(
        "data gen",
        sinter(dir).args([
            "data",
            "gen",
            "dense",
            "--out",
            "train.csv",
            "--format",
            "csv",
            "--rows",
            "16000",
            "--test-rows",
            "2000",
            "--dim",
            "32",
            "--classes",
            "4",
        ]),
        RUN_TIMEOUT,
    );
    generated.assert_success();
    let config = dir.join("fl.toml");
    let text = format!(
        "[data]\nformat = \"csv\"\ntrain = \"train.csv\"\ntest = \"train.test.csv\"\ncsv_header = true\nlabel_column = \"label\"\n\
         [model]\nkind = \"mlp\"\nhidden = [64]\n[optim]\nkind = \"sgd\"\nlr = 0.05\n[train]\nbatch_size = 32\nseed = 1\n\
         [fl]\n{fl}\n"
    );
    std::fs::write(&config, text).expect("writing the config");
    config
}

/// `sinter fl server fl.toml` in `dir` with `args` (default `--listen 127.0.0.1:0`), and the address it listens on.
fn start_server(dir: &std::path::Path, args: &[&str]) -> (Proc, String) {
    let mut cmd = sinter(dir);
    cmd.args(["fl", "server", "fl.toml", "--json"])
        .env("SINTER_SECRET", SECRET);
    if !args.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    let mut server = Proc::spawn("server", cmd.args(args));
    let addr = server.wait_json("listening", RUN_TIMEOUT, |v| event(v) == Some("listening"))["addr"]
        .as_str()
        .expect("an address")
        .to_string();
    (server, addr)
}

fn client(dir: &std::path::Path, addr: &str, i: usize, n: usize) -> Proc {
    Proc::spawn(
        &format!("client {i}"),
        sinter(dir)
            .args([
                "fl", "client", "--server", addr, "--config", "fl.toml", "--json", "--name",
            ])
            .arg(format!("site-{i}"))
            .arg("--part")
            .arg(format!("{i}/{n}"))
            .args(["--connect-timeout-ms", "20000"])
            .env("SINTER_SECRET", SECRET),
    )
}

fn round_start(server: &mut Proc, round: u64) {
    server.wait_json(&format!("round {round} starts"), RUN_TIMEOUT, |v| {
        event(v) == Some("round_start") && v["round"] == round
    });
}

/// A round line's updates and dropped clients.
fn updates_dropped(line: &Value) -> (u64, u64) {
    (
        line["updates"].as_u64().unwrap_or(u64::MAX),
        line["dropped"].as_u64().unwrap_or(u64::MAX),
    )
}

fn round_line(server: &mut Proc, round: u64) -> Value {
    server.wait_json(&format!("round {round}"), RUN_TIMEOUT, |v| {
        event(v) == Some("round") && v["round"] == round
    })
}

/// Issue 20, item 3: a server and 8 client processes. Two clients are killed
/// (SIGKILL) while they train: their connections end, and the round closes
/// with the other six, counting two dropped. A third is stopped (SIGSTOP)
/// mid-round: its connection stays open, and the round closes at its deadline
/// without it. The next round runs, and a client started late joins and trains.
#[test]
fn a_federation_survives_killed_and_stopped_clients_and_takes_a_latecomer() {
    let dir = temp_dir();
    let d = dir.path();
    dense_federation(
        d,
        "rounds = 5\nfraction = 1.0\nmin_clients = 5\nstart_clients = 8\nmin_updates = 4\nround_timeout_ms = 4000\nlocal_epochs = 20\npartition = \"iid\"",
    );
    let (mut server, addr) = start_server(d, &[]);
    let mut clients: Vec<Proc> = (0..8).map(|i| client(d, &addr, i, 9)).collect();
    let r1 = round_line(&mut server, 1);
    assert_eq!(updates_dropped(&r1), (8, 0), "{r1}");

    // Round 2: kill two clients as soon as they have the model.
    round_start(&mut server, 2);
    for c in &clients[..2] {
        c.signal(libc::SIGKILL);
    }
    let r2 = round_line(&mut server, 2);
    assert_eq!(updates_dropped(&r2), (6, 2), "{r2}");

    // Round 3: stop a third; its connection stays open, so only the deadline closes the round.
    round_start(&mut server, 3);
    clients[2].signal(libc::SIGSTOP);
    let r3 = round_line(&mut server, 3);
    assert_eq!(updates_dropped(&r3), (5, 1), "{r3}");
    assert!(
        r3["round_s"].as_f64().unwrap_or(0.0) >= 3.9,
        "round 3 closed before its deadline: {r3}"
    );

    // A client started now joins and is sampled in the next round.
    clients.push(client(d, &addr, 8, 9));
    let joined = server.wait_json("the latecomer joins", RUN_TIMEOUT, |v| {
        event(v) == Some("joined") && v["name"] == "site-8"
    });
    let r5 = round_line(&mut server, 5);
    assert!(r5["updates"].as_u64() >= Some(5), "{r5}");
    assert!(r5["test_acc"].as_f64().unwrap_or(0.0) > 0.6, "{r5}");
    let done = server.wait(RUN_TIMEOUT);
    done.assert_success().assert_no_panic();
    // The stopped client never sent its update; it goes the way of the killed ones.
    clients[2].signal(libc::SIGKILL);
    let latecomer = clients.pop().expect("the latecomer").wait(RUN_TIMEOUT);
    latecomer.assert_success();
    let trained: Vec<u64> = latecomer
        .json_lines()
        .iter()
        .filter(|v| event(v) == Some("trained"))
        .filter_map(|v| v["round"].as_u64())
        .collect();
    assert!(
        !trained.is_empty(),
        "the latecomer (client {}) trained no round",
        joined["client"]
    );
    for c in clients.drain(3..) {
        let f = c.wait(RUN_TIMEOUT);
        f.assert_success();
    }
}

/// A federation's server killed mid-federation resumes from its checkpoint
/// (`--resume`), its clients reconnect by themselves, and the model it ends
/// with is bitwise the one of a federation that was never interrupted.
#[test]
fn a_killed_server_resumes_from_its_checkpoint_to_the_same_model() {
    let dir = temp_dir();
    let d = dir.path();
    dense_federation(
        d,
        "rounds = 4\nfraction = 1.0\nmin_clients = 3\nstart_clients = 3\nmin_updates = 3\nlocal_epochs = 2\npartition = \"iid\"",
    );
    let server = |ck: &str, listen: &str, resume: bool| {
        let checkpoint = format!("checkpoint.dir=\"{ck}\"");
        let mut args = vec!["--listen", listen, "--set", &checkpoint];
        if resume {
            args.extend(["--resume", ck]);
        }
        start_server(d, &args)
    };
    // Uninterrupted.
    let (a, addr) = server("ck-a", "127.0.0.1:0", false);
    let clients: Vec<Proc> = (0..3).map(|i| client(d, &addr, i, 3)).collect();
    a.wait(RUN_TIMEOUT).assert_success();
    for c in clients {
        c.wait(RUN_TIMEOUT).assert_success();
    }
    // Killed once round 2 is saved (round 3's start comes after its save), then resumed on the same port.
    let (mut b, addr) = server("ck-b", "127.0.0.1:0", false);
    let clients: Vec<Proc> = (0..3).map(|i| client(d, &addr, i, 3)).collect();
    round_start(&mut b, 3);
    b.signal(libc::SIGKILL);
    drop(b);
    let (mut resumed, _) = server("ck-b", &addr, true);
    let r3 = resumed.wait_json("round 3", RUN_TIMEOUT, |v| event(v) == Some("round") && v["round"] == 3);
    assert_eq!(r3["updates"].as_u64(), Some(3), "{r3}");
    resumed.wait(RUN_TIMEOUT).assert_success();
    for c in clients {
        let f = c.wait(RUN_TIMEOUT);
        f.assert_success();
        assert!(
            f.json_lines().iter().any(|v| event(v) == Some("lost")),
            "{} never lost its server",
            f.name
        );
    }
    let params = |ck: &str| std::fs::read(d.join(ck).join("step-000000000004/params.safetensors"));
    let (pa, pb) = (params("ck-a"), params("ck-b"));
    assert!(
        pa.is_ok(),
        "no checkpoint of round 4 in ck-a: {:?}",
        std::fs::read_dir(d.join("ck-a")).map(|r| r.count())
    );
    assert!(pa.ok() == pb.ok(), "the resumed federation ended with another model");
}

/// `sinter train` with an `[fl]` section starts a server and `fl.clients` client processes and ends with them.
#[test]
fn train_with_an_fl_section_runs_a_local_federation_of_processes() {
    let dir = temp_dir();
    let d = dir.path();
    dense_federation(
        d,
        "rounds = 2\nclients = 3\nstart_clients = 3\nmin_clients = 2\nmin_updates = 2\npartition = \"iid\"",
    );
    let f = run("train", sinter(d).args(["train", "fl.toml", "--json"]), RUN_TIMEOUT);
    f.assert_success().assert_no_panic();
    let lines = f.json_lines();
    let rounds: Vec<&Value> = lines.iter().filter(|v| event(v) == Some("round")).collect();
    assert_eq!(rounds.len(), 2, "{lines:?}");
    assert!(rounds.iter().all(|r| r["updates"] == 3), "{rounds:?}");
    let done = lines.iter().find(|v| event(v) == Some("done")).expect("a done line");
    assert_eq!(
        (done["rounds"].as_u64(), done["clients"].as_u64()),
        (Some(2), Some(3)),
        "{done}"
    );
}

/// Strangers never stop a federation: garbage on the server's port and a
/// client with the wrong secret are refused, and the clients with the right
/// one train every round.
#[test]
fn strangers_and_wrong_secrets_do_not_stop_a_federation() {
    use std::io::Write as _;
    let dir = temp_dir();
    let d = dir.path();
    // The clients' updates cross the wire compressed (int8 with error feedback).
    dense_federation(
        d,
        "rounds = 3\nmin_clients = 2\nstart_clients = 2\nmin_updates = 2\npartition = \"iid\"\ncodec = \"int8\"",
    );
    let (server, addr) = start_server(d, &[]);
    let mut garbage = std::net::TcpStream::connect(&addr).expect("connecting");
    garbage.write_all(&[0xAB; 4096]).expect("writing garbage");
    let wrong = run(
        "client with the wrong secret",
        sinter(d)
            .args([
                "fl",
                "client",
                "--server",
                &addr,
                "--config",
                "fl.toml",
                "--connect-timeout-ms",
                "1000",
            ])
            .env("SINTER_SECRET", "not-the-federation-secret-000000"),
        RUN_TIMEOUT,
    );
    assert_ne!(wrong.code(), Some(0), "{}", wrong.shown());
    let clients: Vec<Proc> = (0..2).map(|i| client(d, &addr, i, 2)).collect();
    let done = server.wait(RUN_TIMEOUT);
    done.assert_success();
    let rounds: Vec<Value> = done
        .json_lines()
        .into_iter()
        .filter(|v| event(v) == Some("round"))
        .collect();
    assert_eq!(rounds.len(), 3);
    assert!(rounds.iter().all(|r| r["updates"] == 2), "{rounds:?}");
    // int8: about a quarter of the f32 bytes down (models go as f32).
    let (up, down) = (
        rounds[0]["bytes_up"].as_f64().unwrap_or(0.0),
        rounds[0]["bytes_down"].as_f64().unwrap_or(0.0),
    );
    assert!(up > 0.0 && up < 0.3 * down, "up {up} down {down}");
    assert!(rounds[2]["test_acc"].as_f64().unwrap_or(0.0) > 0.6, "{rounds:?}");
    for c in clients {
        c.wait(RUN_TIMEOUT).assert_success();
    }
    drop(garbage);
}

/// A client whose server never answers gives up at its deadline, naming the server (exit 3).
#[test]
fn a_client_without_a_server_gives_up_at_its_deadline_naming_it() {
    let dir = temp_dir();
    let d = dir.path();
    dense_federation(d, "rounds = 1");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = listener.local_addr().expect("its address").to_string();
    drop(listener);
    let started = std::time::Instant::now();
    let f = run(
        "client",
        sinter(d)
            .args([
                "fl",
                "client",
                "--server",
                &addr,
                "--config",
                "fl.toml",
                "--connect-timeout-ms",
                "1500",
            ])
            .env("SINTER_SECRET", SECRET),
        RUN_TIMEOUT,
    );
    assert_eq!(f.code(), Some(3), "{}", f.shown());
    assert!(
        f.stderr.contains(&addr) && f.stderr.contains("--connect-timeout-ms"),
        "{}",
        f.shown()
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "gave up after {:?}",
        started.elapsed()
    );
}

/// `fl sim` runs a whole federation in one process, the same seed giving the same model.
#[test]
fn fl_sim_runs_every_round_and_repeats_exactly() {
    let dir = temp_dir();
    let d = dir.path();
    dense_federation(
        d,
        "rounds = 3\nclients = 20\nfraction = 0.5\nmin_clients = 2\nmin_updates = 2\npartition = \"dirichlet:0.5\"",
    );
    let sim = || {
        let f = run(
            "fl sim",
            sinter(d).args(["fl", "sim", "fl.toml", "--json"]),
            RUN_TIMEOUT,
        );
        f.assert_success().assert_no_panic();
        f.json_lines()
    };
    let (a, b) = (sim(), sim());
    let rounds: Vec<&Value> = a.iter().filter(|v| event(v) == Some("round")).collect();
    assert_eq!(rounds.len(), 3);
    assert!(
        rounds.iter().all(|r| r["clients"] == 10 && r["updates"] == 10),
        "{rounds:?}"
    );
    let acc = |lines: &[Value]| {
        lines
            .iter()
            .rev()
            .find(|v| event(v) == Some("done"))
            .map(|v| v["test_acc"].clone())
    };
    assert_eq!(acc(&a), acc(&b));
    assert!(acc(&a).and_then(|v| v.as_f64()).unwrap_or(0.0) > 0.5, "{a:?}");
}

/// `data partition` writes one file per client holding every row once, and reports the skew.
#[test]
fn data_partition_writes_every_row_to_one_client_file() {
    let dir = temp_dir();
    let d = dir.path();
    dense_federation(d, "rounds = 1");
    let f = run(
        "data partition",
        sinter(d).args([
            "data",
            "partition",
            "train.csv",
            "--clients",
            "5",
            "--scheme",
            "dirichlet:0.3",
            "--seed",
            "4",
            "--out",
            "parts",
        ]),
        RUN_TIMEOUT,
    );
    f.assert_success();
    let shown = f.stdout.join("\n");
    assert!(shown.contains("label skew") && shown.contains("size skew"), "{shown}");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("parts/partition.json")).expect("partition.json"))
            .expect("JSON");
    let rows: Vec<u64> = manifest["skew"]["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(rows.iter().sum::<u64>(), 16_000);
    for (c, &n) in rows.iter().enumerate() {
        let text = std::fs::read_to_string(d.join(format!("parts/client-{c:05}.csv"))).expect("a client file");
        assert_eq!(
            text.lines().count() as u64,
            n + 1,
            "client {c} (a header line and its rows)"
        );
    }
    let bad = run(
        "data partition",
        sinter(d).args([
            "data",
            "partition",
            "train.csv",
            "--clients",
            "5",
            "--scheme",
            "dirichlet:-1",
            "--out",
            "p",
        ]),
        RUN_TIMEOUT,
    );
    assert_eq!(bad.code(), Some(2), "{}", bad.shown());
    assert!(bad.stderr.contains("dirichlet:-1"), "{}", bad.shown());
}
