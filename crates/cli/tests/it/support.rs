//! The harness of the integration tests: `sinter` processes with hard
//! deadlines, their output as it arrives, and the process table under /proc.
//!
//! Nothing here sleeps to synchronise: a test waits for an output line, an
//! exit or a state under /proc, always with a deadline, and a child that
//! misses its deadline is killed and fails the test.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The longest any single `sinter` run in these tests may take.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a killed child may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a child's output shown in a failure message.
const SHOWN_BYTES_MAX: usize = 4_000;

/// Variables through which a child could pick up a cluster, a secret or a log
/// level from the environment the tests run in.
const INHERITED_VARS_REMOVED: &[&str] = &[
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "DMLC_ROLE",
    "DMLC_PS_ROOT_URI",
    "DMLC_PS_ROOT_PORT",
    "DMLC_NUM_WORKER",
    "DMLC_NUM_SERVER",
    "DMLC_WORKER_ID",
    "SINTER_SECRET",
    "SINTER_LOG",
    "RUST_BACKTRACE",
];

/// The workspace root (examples/ and data/ live there).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn example(name: &str) -> PathBuf {
    root().join("examples").join(name)
}

pub fn fashion_mnist() -> PathBuf {
    root().join("data/fashion-mnist")
}

/// A fresh temporary directory for one test.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sinter-it-")
        .tempdir()
        .expect("creating a temp dir")
}

/// `sinter` run in `dir` (also its TMPDIR), with a clean cluster environment.
pub fn sinter(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sinter"));
    c.current_dir(dir).env("TMPDIR", dir).stdin(Stdio::null());
    for v in INHERITED_VARS_REMOVED {
        c.env_remove(v);
    }
    c
}

enum Event {
    Out(String),
    Err(String),
    OutClosed,
    ErrClosed,
    Exited(ExitStatus),
}

/// A running child. Dropping it kills it (by pid, if it has not been reaped).
pub struct Proc {
    pub name: String,
    pub pid: u32,
    events: Receiver<Event>,
    /// Set once the child is reaped; held while signalling it, so a signal
    /// never reaches a reused pid.
    reaped: Arc<Mutex<bool>>,
    stdout: Vec<String>,
    stderr: Vec<String>,
    status: Option<ExitStatus>,
    out_open: bool,
    err_open: bool,
}

/// A child that has exited and closed its output.
#[derive(Debug)]
pub struct Finished {
    pub name: String,
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let mut child: Child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let pid = child.id();
        let (tx, events) = mpsc::channel();
        let out = child.stdout.take().expect("stdout is piped");
        let err = child.stderr.take().expect("stderr is piped");
        spawn_reader(out, tx.clone(), Event::Out, Event::OutClosed);
        spawn_reader(err, tx.clone(), Event::Err, Event::ErrClosed);
        let reaped = Arc::new(Mutex::new(false));
        let flag = reaped.clone();
        thread::spawn(move || {
            wait_exited_without_reaping(pid);
            let mut reaped = flag.lock().unwrap_or_else(|e| e.into_inner());
            let status = child.wait().expect("waiting for a child");
            *reaped = true;
            drop(reaped);
            let _ = tx.send(Event::Exited(status));
        });
        Proc {
            name: name.to_string(),
            pid,
            events,
            reaped,
            stdout: Vec::new(),
            stderr: Vec::new(),
            status: None,
            out_open: true,
            err_open: true,
        }
    }

    /// Sends `sig` to the child unless it has been reaped already.
    pub fn signal(&self, sig: libc::c_int) {
        let reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        if !*reaped {
            // SAFETY: kill(2) on our own child, which is not reaped (we hold the flag's lock).
            unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        }
    }

    fn take(&mut self, e: Event) {
        match e {
            Event::Out(l) => self.stdout.push(l),
            Event::Err(l) => self.stderr.push(l),
            Event::OutClosed => self.out_open = false,
            Event::ErrClosed => self.err_open = false,
            Event::Exited(s) => self.status = Some(s),
        }
    }

    /// Output so far, for failure messages.
    fn shown(&self) -> String {
        format!(
            "{} (pid {}), status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.name,
            self.pid,
            self.status,
            tail(&self.stdout.join("\n")),
            tail(&self.stderr.join("\n"))
        )
    }

    /// Kills the child, waits (bounded) for it to be reaped and fails the test.
    fn fail(&mut self, why: &str) -> ! {
        self.kill_and_reap();
        panic!("{why}\n{}", self.shown());
    }

    /// SIGKILL, then waits (bounded by `REAP_TIMEOUT`) until the child is reaped.
    fn kill_and_reap(&mut self) {
        self.signal(libc::SIGKILL);
        let deadline = Instant::now() + REAP_TIMEOUT;
        while self.status.is_none() {
            match self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(e) => self.take(e),
                Err(_) => break,
            }
        }
    }

    /// Waits for a stdout line (printed so far or later) that is JSON satisfying `pred`, and returns it.
    pub fn wait_json(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            for line in &self.stdout[seen..] {
                if let Ok(v) = serde_json::from_str::<Value>(line)
                    && pred(&v)
                {
                    return v;
                }
            }
            seen = self.stdout.len();
            if self.status.is_some() && !self.out_open {
                self.fail(&format!("{} ended without printing {what}", self.name));
            }
            match self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(e) => self.take(e),
                Err(RecvTimeoutError::Timeout) => {
                    self.fail(&format!("{} did not print {what} within {timeout:?}", self.name))
                }
                Err(RecvTimeoutError::Disconnected) => self.fail("lost the child's events"),
            }
        }
    }

    /// Waits for the child to exit and close its stdout and stderr (so no
    /// descendant holds them), at most `timeout`; kills it and fails the test
    /// when it takes longer.
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        while self.status.is_none() || self.out_open || self.err_open {
            match self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(e) => self.take(e),
                Err(RecvTimeoutError::Timeout) if self.status.is_some() => self.fail(&format!(
                    "{} exited, but its stdout or stderr was still open {timeout:?} after the start of the wait: \
                     a process it started outlived it",
                    self.name
                )),
                Err(RecvTimeoutError::Timeout) => self.fail(&format!("{} did not exit within {timeout:?}", self.name)),
                Err(RecvTimeoutError::Disconnected) => self.fail("lost the child's events"),
            }
        }
        Finished {
            name: self.name.clone(),
            status: self.status.expect("exited"),
            stdout: std::mem::take(&mut self.stdout),
            stderr: self.stderr.join("\n"),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill_and_reap();
        }
    }
}

fn spawn_reader(r: impl Read + Send + 'static, tx: mpsc::Sender<Event>, line: fn(String) -> Event, closed: Event) {
    thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send(line(l)).is_err() {
                return;
            }
        }
        let _ = tx.send(closed);
    });
}

/// Blocks until `pid` (our child) has exited, leaving it unreaped.
fn wait_exited_without_reaping(pid: u32) {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value; waitid writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with a valid siginfo pointer.
        let rc = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(SHOWN_BYTES_MAX);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn all_output(&self) -> String {
        format!("{}\n{}", self.stdout.join("\n"), self.stderr)
    }

    /// Fails the test unless the child exited with code 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.status.success(), "{} failed: {}", self.name, self.shown());
        self
    }

    /// Every stdout line as a JSON object (fails the test on any other line).
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{}: stdout line is not JSON ({e}): {l}", self.name));
                assert!(v.is_object(), "{}: stdout line is not a JSON object: {l}", self.name);
                v
            })
            .collect()
    }

    /// Fails the test if the output shows a panic.
    pub fn assert_no_panic(&self) -> &Self {
        assert!(
            !self.all_output().contains("panicked"),
            "{} panicked: {}",
            self.name,
            self.shown()
        );
        self
    }

    pub fn shown(&self) -> String {
        format!(
            "{} exited {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.name,
            self.status,
            tail(&self.stdout.join("\n")),
            tail(&self.stderr)
        )
    }
}

/// Runs `cmd` to completion within `timeout`.
pub fn run(name: &str, cmd: &mut Command, timeout: Duration) -> Finished {
    Proc::spawn(name, cmd).wait(timeout)
}

/// `sinter data gen click` into `train` (the test split beside it, `*.test.svm`),
/// asserted to succeed.
pub fn gen_click(dir: &Path, train: &Path, rows: u64, test_rows: u64, hash_bits: u32) -> Finished {
    let out = run(
        "sinter data gen",
        sinter(dir)
            .args(["data", "gen", "click", "--rows", &rows.to_string()])
            .args([
                "--test-rows",
                &test_rows.to_string(),
                "--hash-bits",
                &hash_bits.to_string(),
            ])
            .arg("--out")
            .arg(train),
        RUN_TIMEOUT,
    );
    out.assert_success();
    out
}

/// The `event` of a JSON line.
pub fn event(v: &Value) -> Option<&str> {
    v.get("event").and_then(Value::as_str)
}

/// The first line whose `event` is `name`.
pub fn find_event<'a>(lines: &'a [Value], name: &str) -> Option<&'a Value> {
    lines.iter().find(|v| event(v) == Some(name))
}

/// A process as /proc shows it: its pid and its start time, so that a reused
/// pid is not mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcId {
    pub pid: u32,
    start_ticks: u64,
}

/// (state, ppid, start time) from /proc/PID/stat.
fn stat(pid: u32) -> Option<(char, u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 3 (state), 4 (ppid) and 22 (starttime) of proc(5), counted from `state`.
    Some((
        f.first()?.chars().next()?,
        f.get(1)?.parse().ok()?,
        f.get(19)?.parse().ok()?,
    ))
}

impl ProcId {
    /// Whether this very process still exists and has not exited (a zombie has).
    pub fn alive(&self) -> bool {
        matches!(stat(self.pid), Some((state, _, start)) if start == self.start_ticks && state != 'Z' && state != 'X')
    }

    /// Whether the process is stopped by a signal (state `T`).
    pub fn stopped(&self) -> bool {
        matches!(stat(self.pid), Some((state, _, start)) if start == self.start_ticks && state == 'T')
    }

    /// The value of an environment variable of the process.
    pub fn env(&self, key: &str) -> Option<String> {
        let bytes = std::fs::read(format!("/proc/{}/environ", self.pid)).ok()?;
        bytes.split(|b| *b == 0).find_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.strip_prefix(key)
                .and_then(|r| r.strip_prefix('='))
                .map(str::to_string)
        })
    }

    /// The command line, argument by argument (empty once the process is gone).
    pub fn args(&self) -> Vec<String> {
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|b| {
                b.split(|c| *c == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sends `sig`, if this very process is still there.
    pub fn signal(&self, sig: libc::c_int) {
        if self.alive() {
            // SAFETY: kill(2); the start time check above guards against a reused pid.
            unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        }
    }
}

/// Every live descendant of `pid`.
pub fn descendants(pid: u32) -> Vec<ProcId> {
    let mut table = Vec::new();
    for e in std::fs::read_dir("/proc").expect("reading /proc").flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((state, ppid, start_ticks)) = stat(p)
            && state != 'Z'
        {
            table.push((ProcId { pid: p, start_ticks }, ppid));
        }
    }
    let mut out: Vec<ProcId> = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for (p, ppid) in &table {
            if *ppid == parent && !out.contains(p) {
                out.push(*p);
                frontier.push(p.pid);
            }
        }
    }
    out
}

/// Waits until `pred` holds, looking at /proc every few milliseconds; fails after `timeout`.
pub fn poll_until(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !pred() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Kills, on drop, every process in the list that is still alive: whatever a
/// test asserted, it leaves nothing behind.
pub struct KillOnDrop(pub Vec<ProcId>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            p.signal(libc::SIGKILL);
            p.signal(libc::SIGCONT);
        }
    }
}
