//! `sinter train` with an `[fl]` section: a federation on this machine. One
//! `sinter fl server` and `fl.clients` `sinter fl client` processes on
//! loopback, each client training on its part of `data.train` split by
//! `fl.partition`; the server's round lines are relayed.
//!
//! A client that fails does not end the federation (the rounds go on
//! without it, as they would across sites); the server's end does. As for a
//! cluster, the launcher never returns while a child it started runs.

use std::ffi::OsString;
use std::process::Command;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use node::config::JobConfig;
use node::error::JobError;

use super::{Children, INTERRUPTED, Msg, STOP_GRACE_MS, SUPERVISE_TICK_MS, Who, describe};

/// The longest the server may take to say where it listens.
const SERVER_START_TIMEOUT_MS: u64 = 30_000;

/// Runs the federation `cfg` describes; `on_line` sees each of the server's
/// JSON lines (`round`, `joined`, ...); returns its `done` line.
pub fn run(cfg: &JobConfig, on_line: &mut dyn FnMut(&serde_json::Value)) -> Result<serde_json::Value, JobError> {
    let flc = cfg.fl.as_ref().ok_or_else(|| JobError::Config {
        path: "<config>".into(),
        why: "a federation needs an [fl] section".into(),
    })?;
    let (_cleanup, job_file) = super::write_job_file(cfg, "sinter-fl")?;
    let (exe, secret_hex) = super::prepare_children()?;
    let (tx, rx) = mpsc::channel::<Msg>();
    let mut children = Children { procs: Vec::new() };
    let mut server = Command::new(&exe);
    server
        .args(["fl", "server"])
        .arg(&job_file)
        .args(["--listen", "127.0.0.1:0", "--json"])
        .env("SINTER_SECRET", &secret_hex);
    children.spawn(Who::FlServer, server, &tx)?;
    let addr = wait_for_server(&rx, on_line)?;
    for i in 0..flc.clients {
        let mut client = Command::new(&exe);
        let args: [OsString; 10] = [
            "fl".into(),
            "client".into(),
            "--server".into(),
            addr.clone().into(),
            "--config".into(),
            job_file.clone().into(),
            "--part".into(),
            format!("{i}/{}", flc.clients).into(),
            "--name".into(),
            format!("client-{i}").into(),
        ];
        client.args(args).env("SINTER_SECRET", &secret_hex);
        children.spawn(Who::FlClient(i), client, &tx)?;
    }
    let mut done = None;
    loop {
        if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
            children.stop_all();
            return Err(JobError::Interrupted);
        }
        match rx.recv_timeout(Duration::from_millis(SUPERVISE_TICK_MS)) {
            Ok(Msg::Line(Who::FlServer, line)) => {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v.get("event").and_then(|e| e.as_str()) == Some("done") {
                        done = Some(v);
                    } else {
                        on_line(&v);
                    }
                }
            }
            Ok(Msg::Exited(Who::FlServer, status)) => {
                if !status.success() {
                    children.stop_all();
                    return Err(JobError::Federation(format!("the server {}", describe(status))));
                }
                break;
            }
            Ok(Msg::Exited(who, status)) if !status.success() => {
                tracing::warn!(child = %who, "{who} {}; the federation goes on without it", describe(status));
            }
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    // The clients end on the server's `Done`; give them the grace a stop would.
    let deadline = Instant::now() + Duration::from_millis(STOP_GRACE_MS);
    while !children.all_exited() && Instant::now() < deadline {
        let _ = rx.recv_timeout(Duration::from_millis(SUPERVISE_TICK_MS));
    }
    children.stop_all();
    done.ok_or_else(|| JobError::Federation("the server ended without its summary".into()))
}

/// The server's address from its `listening` line.
fn wait_for_server(rx: &mpsc::Receiver<Msg>, on_line: &mut dyn FnMut(&serde_json::Value)) -> Result<String, JobError> {
    let deadline = Instant::now() + Duration::from_millis(SERVER_START_TIMEOUT_MS);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(SUPERVISE_TICK_MS)) {
            Ok(Msg::Line(Who::FlServer, line)) => {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if let Some(a) = v.get("addr").and_then(|a| a.as_str()) {
                    return Ok(a.to_string());
                }
                on_line(&v);
            }
            Ok(Msg::Exited(who, status)) => {
                return Err(JobError::Federation(format!(
                    "{who} {} before listening",
                    describe(status)
                )));
            }
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Err(JobError::Federation("lost the server's output".into())),
        }
    }
    Err(JobError::Federation(format!(
        "the server did not start listening within {SERVER_START_TIMEOUT_MS} ms"
    )))
}
