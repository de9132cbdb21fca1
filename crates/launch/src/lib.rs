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

use node::config::JobConfig;
use node::error::JobError;
use node::report::{Observer, Report};
use node::train::Summary;

pub mod federation;

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
    FlServer,
    FlClient(u32),
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Coordinator => write!(f, "the coordinator"),
            Who::Worker(r) => write!(f, "worker rank {r}"),
            Who::Server(s) => write!(f, "server {s}"),
            Who::FlServer => write!(f, "the federation's server"),
            Who::FlClient(i) => write!(f, "federation client {i}"),
        }
    }
}

enum Msg {
    Line(Who, String),
    Exited(Who, ExitStatus),
}

/// The processes this launcher started. Each has a thread that relays its
/// stdout lines and then reaps it, so its `Exited` comes after all its lines.
///
/// **Invariant:** a signal reaches only the process the launcher started.
/// Each child is signalled through a pidfd opened before its reaper thread
/// exists; once the child is reaped the pidfd refers to no process
/// (`ESRCH`), so a recycled PID is never signalled, however the reaper and
/// a stop interleave.
struct Children {
    procs: Vec<(Who, ChildHandle, Arc<AtomicBool>)>,
}

/// A child process as a pidfd (Linux 5.3+): signals sent through it reach
/// that process or none.
struct ChildHandle(std::os::fd::OwnedFd);

impl ChildHandle {
    /// Opens a pidfd for `pid`, which must be a child of ours not yet reaped.
    fn open(pid: u32) -> std::io::Result<Self> {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the fd was just returned to us by the kernel and is owned by nobody else.
        Ok(Self(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as libc::c_int) }))
    }

    /// Sends `sig`; `Ok(false)` when the process is already gone (reaped).
    fn signal(&self, sig: libc::c_int) -> std::io::Result<bool> {
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_send_signal(2) on an fd we own, with no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(false);
        }
        Err(e)
    }
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
        // Before the reaper thread exists: the child cannot have been reaped yet.
        let handle = match ChildHandle::open(child.id()) {
            Ok(h) => h,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(JobError::io(format!("opening a pidfd for {who}"), e));
            }
        };
        let out = child.stdout.take().expect("stdout is piped");
        let exited = Arc::new(AtomicBool::new(false));
        self.procs.push((who, handle, exited.clone()));
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
        for (who, handle, exited) in &self.procs {
            if !exited.load(Ordering::SeqCst)
                && let Err(e) = handle.signal(sig)
            {
                tracing::warn!(child = %who, signal = sig, error = %e, "cannot signal a child");
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

/// What every launch needs before its first child: the `sinter` binary, a
/// fresh shared secret (hex) for the children, and Ctrl-C and SIGTERM turned
/// into [`INTERRUPTED`], so the launcher stops its children before it exits.
fn prepare_children() -> Result<(PathBuf, String), JobError> {
    let exe = std::env::current_exe().map_err(|e| JobError::io("locating the sinter binary", e))?;
    let secret_hex: String = node::net::nonce()?.iter().map(|b| format!("{b:02x}")).collect();
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    Ok((exe, secret_hex))
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
    /// Worker processes started (replacements included).
    workers: u32,
    servers: u32,
    /// Elastic jobs: how to start a replacement worker, and how many more may be.
    replace: Option<Replacement>,
    /// Replicated parameter servers: how to start a replacement server.
    replace_server: Option<Replacement>,
}

/// Servers killed by a signal that the launcher replaces over a run of a
/// replicated job (each replacement becomes the backup of a shard that lost one).
pub const SERVER_RESTARTS_MAX: u32 = 32;

/// `cluster.elastic` as the launcher applies it.
#[derive(Clone, Copy, Debug)]
pub struct Elasticity {
    pub min_workers: u32,
    pub max_workers: u32,
    /// Lost workers the launcher replaces over the whole run.
    pub max_restarts: u32,
    /// Parameter-server jobs: how long a lost worker's rank waits for its replacement.
    pub replace_timeout_ms: u64,
}

/// What starting one more worker takes.
struct Replacement {
    exe: PathBuf,
    args: Vec<OsString>,
    env: Vec<(&'static str, String)>,
    left: u32,
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
        Self::start_job(workers, servers, heartbeat_timeout_ms, worker_args, None)
    }

    /// As [`LocalCluster::start_with_servers`]; with `elastic`, the coordinator
    /// survives lost workers and the launcher replaces up to `max_restarts` of them.
    pub fn start_job(
        workers: u32,
        servers: u32,
        heartbeat_timeout_ms: u64,
        worker_args: &[OsString],
        elastic: Option<Elasticity>,
    ) -> Result<Self, JobError> {
        Self::start_replicated(workers, servers, 1, heartbeat_timeout_ms, worker_args, elastic)
    }

    /// As [`LocalCluster::start_job`], with `replicas` server processes per
    /// shard (`cluster.replicas`); with 2, a server killed by a signal is
    /// replaced (up to [`SERVER_RESTARTS_MAX`] times) and the coordinator
    /// makes the new one a backup.
    pub fn start_replicated(
        workers: u32,
        servers: u32,
        replicas: u32,
        heartbeat_timeout_ms: u64,
        worker_args: &[OsString],
        elastic: Option<Elasticity>,
    ) -> Result<Self, JobError> {
        let replicas = replicas.max(1);
        let (exe, secret_hex) = prepare_children()?;
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
        if let Some(e) = elastic {
            coord
                .arg("--elastic")
                .arg(format!("{}:{}", e.min_workers, e.max_workers))
                .arg("--replace-timeout-ms")
                .arg(e.replace_timeout_ms.to_string());
        }
        if replicas > 1 {
            coord.arg("--replicas").arg(replicas.to_string());
        }
        children.spawn(Who::Coordinator, coord, &tx)?;
        let addr = wait_for_address(&rx)?;
        let (host, port) = addr.rsplit_once(':').unwrap_or(("127.0.0.1", "0"));
        let server_args: Vec<OsString> = vec![
            "server".into(),
            "--heartbeat-timeout-ms".into(),
            heartbeat_timeout_ms.to_string().into(),
            "--replicas".into(),
            replicas.to_string().into(),
        ];
        let server_env = vec![
            ("DMLC_ROLE", "server".to_string()),
            ("DMLC_PS_ROOT_URI", host.to_string()),
            ("DMLC_PS_ROOT_PORT", port.to_string()),
            ("DMLC_NUM_SERVER", servers.to_string()),
            ("DMLC_NUM_WORKER", workers.to_string()),
            ("SINTER_SECRET", secret_hex.clone()),
        ];
        for shard in 0..servers * replicas {
            let mut s = Command::new(&exe);
            s.args(&server_args).envs(server_env.iter().map(|(k, v)| (k, v)));
            children.spawn(Who::Server(shard), s, &tx)?;
        }
        let replace_server = (replicas > 1).then(|| Replacement {
            exe: exe.clone(),
            args: server_args,
            env: server_env,
            left: SERVER_RESTARTS_MAX,
        });
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
        // A replacement joins without a rank: the coordinator gives it one.
        let replace = elastic.map(|e| Replacement {
            exe: exe.clone(),
            args: worker_args.to_vec(),
            env: vec![
                ("MASTER_ADDR", host.to_string()),
                ("MASTER_PORT", port.to_string()),
                ("WORLD_SIZE", workers.to_string()),
                ("SINTER_SECRET", secret_hex.clone()),
            ],
            left: e.max_restarts,
        });
        Ok(Self {
            children,
            rx,
            _tx: tx,
            workers,
            servers: servers * replicas,
            replace,
            replace_server,
        })
    }

    /// Elastic jobs: a worker exited with `status`; the coordinator decides
    /// whether the job goes on (its failure line stops everything). Starts a
    /// replacement while the restart budget lasts.
    fn worker_lost(&mut self, id: u32, status: ExitStatus) -> Result<(), JobError> {
        let Some(r) = self.replace.as_mut() else {
            return Ok(());
        };
        let mut line = format!("worker {id} lost ({})", describe(status));
        if r.left > 0 {
            r.left -= 1;
            let mut w = Command::new(&r.exe);
            w.args(&r.args);
            for (k, v) in &r.env {
                w.env(k, v);
            }
            let new_id = self.workers;
            self.children.spawn(Who::Worker(new_id), w, &self._tx)?;
            self.workers += 1;
            line.push_str(&format!(
                "; started worker {new_id} to replace it ({} restarts left)",
                r.left
            ));
        }
        node::worker::say(&format!("{line}\n"));
        Ok(())
    }

    /// Replicated servers: server process `id` was killed; the coordinator
    /// promotes its backup (or fails the job, naming the shard). Starts a
    /// replacement, which joins as a backup.
    fn server_lost(&mut self, id: u32, status: ExitStatus) -> Result<(), JobError> {
        let Some(r) = self.replace_server.as_mut() else {
            return Ok(());
        };
        r.left -= 1;
        let mut s = Command::new(&r.exe);
        s.args(&r.args).envs(r.env.iter().map(|(k, v)| (k, v)));
        let new_id = self.children.procs.len() as u32;
        let left = r.left;
        self.children.spawn(Who::Server(new_id), s, &self._tx)?;
        node::worker::say(&format!(
            "server process {id} {}; started server process {new_id} to become a backup ({left} restarts left)\n",
            describe(status)
        ));
        Ok(())
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
        let mut lost = 0u32;
        let mut servers_done = 0u32;
        let mut coordinator_done: Option<Instant> = None;
        loop {
            if INTERRUPTED.load(Ordering::SeqCst) {
                self.children.stop_all();
                return Err(JobError::Interrupted);
            }
            let msg = match self.rx.recv_timeout(Duration::from_millis(SUPERVISE_TICK_MS)) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    // The job is over; a worker it dropped (stopped, or cut off) ends with it.
                    if coordinator_done.is_some_and(|t: Instant| t.elapsed() > Duration::from_millis(STOP_GRACE_MS)) {
                        self.children.stop_all();
                        return Ok(());
                    }
                    continue;
                }
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
                // A cluster starts no federation's processes (`federation` supervises those).
                Msg::Line(Who::FlServer | Who::FlClient(_), _) => {}
                Msg::Line(Who::Coordinator, line) => {
                    if let Some(failure) = coordinator_failure(&line) {
                        self.children.stop_all();
                        return Err(failure);
                    }
                    // Replicated shards: who is primary and backup now, relayed as a server line.
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                        && v.get("event").and_then(|e| e.as_str()) == Some("shard")
                    {
                        let shard = v.get("shard").and_then(|s| s.as_u64()).unwrap_or(0) as u32;
                        on_server_line(shard, v);
                    }
                }
                Msg::Exited(Who::Server(id), status)
                    if status.signal().is_some() && self.replace_server.as_ref().is_some_and(|r| r.left > 0) =>
                {
                    self.server_lost(id, status)?;
                }
                // A worker that exits with exit::ABORTED was told to stop, or lost the
                // coordinator: not a lost worker; the coordinator's verdict decides.
                Msg::Exited(Who::Worker(id), status)
                    if !status.success()
                        && self.replace.is_some()
                        && status.code() != Some(node::error::exit::ABORTED) =>
                {
                    lost += 1;
                    self.worker_lost(id, status)?;
                    if finished + lost == self.workers && servers_done == self.servers && coordinator_done.is_some() {
                        return Ok(());
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
                        Who::Coordinator => coordinator_done = Some(Instant::now()),
                        Who::FlServer | Who::FlClient(_) => {}
                    }
                    if finished + lost == self.workers && servers_done == self.servers && coordinator_done.is_some() {
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
                // Killed, or gone without saying why the job failed.
                Who::Coordinator => JobError::CoordinatorLost(why),
                Who::FlServer | Who::FlClient(_) => JobError::Federation(why),
            }
        };
        if status.signal().is_some() {
            return own();
        }
        if status.code() == Some(i32::from(node::error::exit::USAGE)) {
            return JobError::Refused { who: who.to_string() };
        }
        let deadline = Instant::now() + Duration::from_millis(VERDICT_WAIT_MS);
        while let Ok(msg) = self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            match msg {
                Msg::Line(Who::Coordinator, line) => {
                    if let Some(failure) = coordinator_failure(&line) {
                        return failure;
                    }
                }
                // The worker stopped because the coordinator is gone.
                Msg::Exited(Who::Coordinator, st) if !st.success() => {
                    return JobError::CoordinatorLost(format!("the coordinator {}", describe(st)));
                }
                _ => {}
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

/// Runs a whole job: in this process for one worker and no servers
/// ([`node::job::run`]), else as a local cluster; returns rank 0's summary.
pub fn run(cfg: JobConfig, resume: Option<&Path>, obs: &mut dyn Observer) -> Result<Summary, JobError> {
    if cfg.cluster.workers <= 1 && cfg.cluster.servers == 0 {
        return node::job::run(cfg, resume, obs);
    }
    run_cluster(&cfg, resume, obs)
}

/// Runs a whole local cluster for `cfg` and returns rank 0's summary.
fn run_cluster(cfg: &JobConfig, resume: Option<&Path>, obs: &mut dyn Observer) -> Result<Summary, JobError> {
    let (_cleanup, job_file) = write_job_file(cfg, "sinter-launch")?;
    let mut resume = resume.map(Path::to_path_buf);
    let mut restarts_left = cfg.cluster.max_restarts;
    loop {
        match run_once(cfg, &job_file, resume.as_deref(), obs) {
            Err(JobError::CoordinatorLost(why)) if restarts_left > 0 && cfg.checkpoint.dir.is_some() => {
                restarts_left -= 1;
                let dir = cfg.checkpoint.dir.clone().expect("checked above");
                // The newest good checkpoint, if one was written; else the start.
                let saved = node::coord::saved_generation(&dir);
                node::worker::say(&format!(
                    "the coordinator was lost ({why}); restarting the job from {} ({restarts_left} restarts left)\n",
                    match saved {
                        Some((_, step)) => format!("the checkpoint of step {step} in {}", dir.display()),
                        None => "the beginning (no checkpoint yet)".into(),
                    }
                ));
                resume = saved.map(|_| dir);
            }
            other => return other,
        }
    }
}

/// One start of the whole cluster, resuming from `resume` if given.
fn run_once(
    cfg: &JobConfig,
    job_file: &Path,
    resume: Option<&Path>,
    obs: &mut dyn Observer,
) -> Result<Summary, JobError> {
    let mut args: Vec<OsString> = vec!["worker".into(), "--config".into(), job_file.into(), "--json".into()];
    if let Some(dir) = resume {
        args.push("--resume".into());
        args.push(dir.into());
    }
    let c = &cfg.cluster;
    let elastic = c.elastic.then(|| Elasticity {
        min_workers: c.min_workers,
        max_workers: c.max_workers_or_workers(),
        max_restarts: c.max_restarts,
        replace_timeout_ms: c.replace_timeout_ms,
    });
    let mut cluster =
        LocalCluster::start_replicated(c.workers, c.servers, c.replicas, c.heartbeat_timeout_ms, &args, elastic)?;
    let mut summary: Option<Summary> = None;
    let mut servers = Vec::new();
    // Both kinds of line report to the observer, one at a time.
    let obs = std::cell::RefCell::new(obs);
    let mut on_server = |_, v: serde_json::Value| {
        if v.get("event").and_then(|e| e.as_str()) == Some("shard") {
            // Replicated shards: who serves a shard now, as the coordinator says.
            if let Ok(r) = serde_json::from_value::<Report>(v) {
                obs.borrow_mut().report(&r);
            }
            return;
        }
        // Replicated shards: the primaries' reports.
        if let Ok(r) = serde_json::from_value::<node::server::ServerReport>(v)
            && !r.backup
        {
            servers.push(r);
        }
    };
    cluster.supervise_all(
        &mut |rank, v| {
            if v.get("event").and_then(|e| e.as_str()) == Some("done") {
                // The summary of the worker that ended as rank 0 (in an elastic
                // job, not necessarily the process that started as rank 0).
                if let Ok(s) = serde_json::from_value::<Summary>(v)
                    && s.rank == 0
                {
                    summary = Some(s);
                }
                return;
            }
            // Workers send start, epoch and evaluation lines from rank 0 only.
            let _ = rank;
            if let Ok(r) = serde_json::from_value::<Report>(v) {
                obs.borrow_mut().report(&r);
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

/// Writes the effective config where the children read it: a private
/// directory that goes away with the returned guard.
fn write_job_file(cfg: &JobConfig, prefix: &str) -> Result<(RemoveOnDrop, PathBuf), JobError> {
    let run_dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).map_err(|e| JobError::io(format!("creating {}", run_dir.display()), e))?;
    let guard = RemoveOnDrop(run_dir.clone());
    let job_file = run_dir.join("job.toml");
    let text = toml::to_string(cfg).map_err(|e| JobError::Config {
        path: job_file.clone(),
        why: e.to_string(),
    })?;
    std::fs::write(&job_file, text).map_err(|e| JobError::io(format!("writing {}", job_file.display()), e))?;
    Ok((guard, job_file))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 16: the launcher signalled a child's PID after `wait()` had
    /// reaped it, so a recycled PID could be killed. Through the pidfd, a
    /// reaped child is gone (`Ok(false)`), whatever process holds its PID now.
    #[test]
    fn a_reaped_child_is_never_signalled() {
        let mut child = Command::new("sleep").arg("30").spawn().expect("starting sleep");
        let handle = ChildHandle::open(child.id()).expect("pidfd_open");
        assert!(handle.signal(libc::SIGKILL).expect("signal a live child"));
        let status = child.wait().expect("reaping");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Reaped: its PID is free for the system to hand out again.
        assert!(!handle.signal(libc::SIGKILL).expect("signal a reaped child"));
    }
}
