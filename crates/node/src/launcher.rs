//! `sinter train --workers N [--servers M]`: starts a coordinator, M
//! parameter-server shards and N worker processes on
//! loopback, relays their reports into one progress display and one JSON log,
//! and stops them all on the first failure or on Ctrl-C.
//!
//! **Invariant:** the launcher never returns while a child it started is
//! still running: every path out kills and reaps them (and children die with
//! the launcher through `PR_SET_PDEATHSIG` should it be killed itself).

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use crate::config::JobConfig;
use crate::error::JobError;
use crate::report::{Observer, Report};
use crate::train::Summary;

/// How often the supervisor looks at the interrupt flag.
const SUPERVISE_TICK_MS: u64 = 50;
/// Time children get between SIGTERM and SIGKILL.
const STOP_GRACE_MS: u64 = 2_000;
/// After a worker exits with an error, how long to wait for the coordinator's verdict.
const VERDICT_WAIT_MS: u64 = 1_000;
/// The longest the coordinator may take to say where it listens.
const COORDINATOR_START_TIMEOUT_MS: u64 = 10_000;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Which child a message is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Coordinator,
    Worker(u32),
    Server(u32),
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Coordinator => write!(f, "the coordinator"),
            Who::Worker(r) => write!(f, "worker rank {r}"),
            Who::Server(s) => write!(f, "server {s}"),
        }
    }
}

enum Msg {
    Line(Who, String),
    Exited(Who, ExitStatus),
}

/// The processes this launcher started. Each has a thread that relays its
/// stdout lines and then reaps it, so its `Exited` comes after all its lines.
struct Children {
    procs: Vec<(Who, u32, Arc<AtomicBool>)>,
}

impl Children {
    fn spawn(&mut self, who: Who, mut cmd: Command, tx: &Sender<Msg>) -> Result<(), JobError> {
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| JobError::io(format!("starting {who}"), e))?;
        let out = child.stdout.take().expect("stdout is piped");
        let exited = Arc::new(AtomicBool::new(false));
        self.procs.push((who, child.id(), exited.clone()));
        let tx = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(Msg::Line(who, line));
            }
            let status = child.wait();
            exited.store(true, Ordering::SeqCst);
            if let Ok(status) = status {
                let _ = tx.send(Msg::Exited(who, status));
            }
        });
        Ok(())
    }

    fn signal_all(&self, sig: libc::c_int) {
        for (_, pid, exited) in &self.procs {
            if !exited.load(Ordering::SeqCst) {
                // SAFETY: kill(2) on a child of ours that has not been reaped yet.
                unsafe { libc::kill(*pid as libc::pid_t, sig) };
            }
        }
    }

    fn all_exited(&self) -> bool {
        self.procs.iter().all(|(_, _, e)| e.load(Ordering::SeqCst))
    }

    /// SIGTERM, a grace period, then SIGKILL; returns once all are reaped (bounded).
    fn stop_all(&mut self) {
        self.signal_all(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_millis(STOP_GRACE_MS);
        while !self.all_exited() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        self.signal_all(libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_millis(STOP_GRACE_MS);
        while !self.all_exited() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(9)) => "was killed (SIGKILL)".into(),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
}

/// A coordinator and N worker processes on loopback, supervised.
pub struct LocalCluster {
    children: Children,
    rx: mpsc::Receiver<Msg>,
    _tx: Sender<Msg>,
    workers: u32,
    servers: u32,
}

impl LocalCluster {
    /// Starts `sinter coordinator` and `workers` × `sinter WORKER_ARGS..` with the
    /// torchrun variables and a fresh shared secret.
    pub fn start(workers: u32, heartbeat_timeout_ms: u64, worker_args: &[OsString]) -> Result<Self, JobError> {
        Self::start_with_servers(workers, 0, heartbeat_timeout_ms, worker_args)
    }

    /// As [`LocalCluster::start`], plus `servers` × `sinter server` with ps-lite's
    /// `DMLC_*` variables.
    pub fn start_with_servers(
        workers: u32,
        servers: u32,
        heartbeat_timeout_ms: u64,
        worker_args: &[OsString],
    ) -> Result<Self, JobError> {
        let exe = std::env::current_exe().map_err(|e| JobError::io("locating the sinter binary", e))?;
        let secret_hex: String = crate::net::nonce()?.iter().map(|b| format!("{b:02x}")).collect();
        // SAFETY: installing a handler that only stores to an atomic.
        unsafe {
            libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        }
        let (tx, rx) = mpsc::channel::<Msg>();
        let mut children = Children { procs: Vec::new() };
        let mut coord = Command::new(&exe);
        coord
            .args([
                "coordinator",
                "--listen",
                "127.0.0.1:0",
                "--world",
                &workers.to_string(),
                "--servers",
                &servers.to_string(),
            ])
            .arg("--heartbeat-timeout-ms")
            .arg(heartbeat_timeout_ms.to_string())
            .env("SINTER_SECRET", &secret_hex);
        children.spawn(Who::Coordinator, coord, &tx)?;
        let addr = wait_for_address(&rx)?;
        let (host, port) = addr.rsplit_once(':').unwrap_or(("127.0.0.1", "0"));
        for shard in 0..servers {
            let mut s = Command::new(&exe);
            s.arg("server")
                .arg("--heartbeat-timeout-ms")
                .arg(heartbeat_timeout_ms.to_string())
                .env("DMLC_ROLE", "server")
                .env("DMLC_PS_ROOT_URI", host)
                .env("DMLC_PS_ROOT_PORT", port)
                .env("DMLC_NUM_SERVER", servers.to_string())
                .env("DMLC_NUM_WORKER", workers.to_string())
                .env("SINTER_SECRET", &secret_hex);
            children.spawn(Who::Server(shard), s, &tx)?;
        }
        for rank in 0..workers {
            let mut w = Command::new(&exe);
            w.args(worker_args)
                .env("MASTER_ADDR", host)
                .env("MASTER_PORT", port)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", workers.to_string())
                .env("SINTER_SECRET", &secret_hex);
            children.spawn(Who::Worker(rank), w, &tx)?;
        }
        Ok(Self {
            children,
            rx,
            _tx: tx,
            workers,
            servers,
        })
    }

    /// Relays every JSON line a worker prints to `on_line(rank, value)` (a
    /// server's to `on_server_line`) until all
    /// processes have exited successfully; on the first failure (or Ctrl-C) stops
    /// the others and returns an error naming who failed.
    pub fn supervise(&mut self, on_line: &mut dyn FnMut(u32, serde_json::Value)) -> Result<(), JobError> {
        self.supervise_all(on_line, &mut |_, _| {})
    }

    pub fn supervise_all(
        &mut self,
        on_line: &mut dyn FnMut(u32, serde_json::Value),
        on_server_line: &mut dyn FnMut(u32, serde_json::Value),
    ) -> Result<(), JobError> {
        let mut finished = 0u32;
        let mut servers_done = 0u32;
        let mut coordinator_done = false;
        loop {
            if INTERRUPTED.load(Ordering::SeqCst) {
                self.children.stop_all();
                return Err(JobError::Interrupted);
            }
            let msg = match self.rx.recv_timeout(Duration::from_millis(SUPERVISE_TICK_MS)) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => unreachable!("the cluster holds a sender"),
            };
            match msg {
                Msg::Line(Who::Worker(rank), line) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        on_line(rank, v);
                    }
                }
                Msg::Line(Who::Server(shard), line) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        on_server_line(shard, v);
                    }
                }
                Msg::Line(Who::Coordinator, line) => {
                    if let Some(failure) = coordinator_failure(&line) {
                        self.children.stop_all();
                        return Err(failure);
                    }
                }
                Msg::Exited(who, status) => {
                    if !status.success() {
                        let failure = self.blame(who, status);
                        self.children.stop_all();
                        return Err(failure);
                    }
                    match who {
                        Who::Worker(_) => finished += 1,
                        Who::Server(_) => servers_done += 1,
                        Who::Coordinator => coordinator_done = true,
                    }
                    if finished == self.workers && servers_done == self.servers && coordinator_done {
                        return Ok(());
                    }
                }
            }
        }
    }
}

impl LocalCluster {
    /// Who is at fault when `who` exited with `status`: a worker killed by a signal
    /// is; a worker that exited with an error may only have been told to stop, so the
    /// coordinator's verdict, if it comes within a short wait, names the rank instead.
    fn blame(&mut self, who: Who, status: ExitStatus) -> JobError {
        let own = || {
            let why = format!("{who} {}", describe(status));
            match who {
                Who::Worker(rank) => JobError::Peer { rank, why },
                Who::Server(server) => JobError::Server { server, why },
                Who::Coordinator => JobError::Coordinator(why),
            }
        };
        if status.signal().is_some() {
            return own();
        }
        let deadline = Instant::now() + Duration::from_millis(VERDICT_WAIT_MS);
        while let Ok(msg) = self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if let Msg::Line(Who::Coordinator, line) = msg
                && let Some(failure) = coordinator_failure(&line)
            {
                return failure;
            }
        }
        own()
    }
}

/// The coordinator's `{"event":"failed","rank":R,"reason":...}` line as an error.
fn coordinator_failure(line: &str) -> Option<JobError> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("event")?.as_str()? != "failed" {
        return None;
    }
    let why = v.get("reason").and_then(|r| r.as_str()).unwrap_or("failed").to_string();
    Some(match v.get("rank").and_then(|r| r.as_u64()) {
        Some(rank) => JobError::Peer { rank: rank as u32, why },
        None => JobError::Coordinator(why),
    })
}

/// Runs a whole local cluster for `cfg` and returns rank 0's summary.
pub fn run(cfg: &JobConfig, resume: Option<&Path>, obs: &mut dyn Observer) -> Result<Summary, JobError> {
    let run_dir = std::env::temp_dir().join(format!("sinter-launch-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).map_err(|e| JobError::io(format!("creating {}", run_dir.display()), e))?;
    let _cleanup = RemoveOnDrop(run_dir.clone());
    let job_file = run_dir.join("job.toml");
    let text = toml::to_string(cfg).map_err(|e| JobError::Config {
        path: job_file.clone(),
        why: e.to_string(),
    })?;
    std::fs::write(&job_file, text).map_err(|e| JobError::io(format!("writing {}", job_file.display()), e))?;
    let mut args: Vec<OsString> = vec![
        "worker".into(),
        "--config".into(),
        job_file.clone().into(),
        "--json".into(),
    ];
    if let Some(dir) = resume {
        args.push("--resume".into());
        args.push(dir.into());
    }
    let mut cluster = LocalCluster::start_with_servers(
        cfg.cluster.workers,
        cfg.cluster.servers,
        cfg.cluster.heartbeat_timeout_ms,
        &args,
    )?;
    let mut summary: Option<Summary> = None;
    let mut servers = Vec::new();
    let mut on_server = |_, v: serde_json::Value| {
        if let Ok(r) = serde_json::from_value::<crate::server::ServerReport>(v) {
            servers.push(r);
        }
    };
    cluster.supervise_all(
        &mut |rank, v| {
            if v.get("event").and_then(|e| e.as_str()) == Some("done") {
                if rank == 0 {
                    summary = serde_json::from_value::<Summary>(v).ok();
                }
                return;
            }
            if let Ok(r) = serde_json::from_value::<Report>(v) {
                let relay = match &r {
                    Report::Start { .. } | Report::Epoch(_) | Report::Eval(_) => rank == 0,
                    Report::Step(_) => true,
                };
                if relay {
                    obs.report(&r);
                }
            }
        },
        &mut on_server,
    )?;
    let mut summary = summary.ok_or_else(|| JobError::Peer {
        rank: 0,
        why: "finished without a summary".into(),
    })?;
    servers.sort_by_key(|r| r.shard);
    summary.servers = servers;
    Ok(summary)
}

fn wait_for_address(rx: &mpsc::Receiver<Msg>) -> Result<String, JobError> {
    let deadline = Instant::now() + Duration::from_millis(COORDINATOR_START_TIMEOUT_MS);
    loop {
        match rx.recv_timeout(Duration::from_millis(SUPERVISE_TICK_MS)) {
            Ok(Msg::Line(Who::Coordinator, line)) => {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && let Some(a) = v.get("listening").and_then(|a| a.as_str())
                {
                    return Ok(a.to_string());
                }
            }
            Ok(Msg::Exited(who, status)) => {
                return Err(JobError::Coordinator(format!(
                    "{who} {} before listening",
                    describe(status)
                )));
            }
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(JobError::Coordinator("lost the coordinator's output".into()));
            }
        }
        if Instant::now() > deadline {
            return Err(JobError::Coordinator(format!(
                "did not start listening within {COORDINATOR_START_TIMEOUT_MS} ms"
            )));
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
