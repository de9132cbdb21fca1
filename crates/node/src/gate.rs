//! The door of every listening socket: one thread accepts connections and
//! runs their authentication handshakes on nonblocking sockets, many at once,
//! and hands over only the authenticated ones.
//!
//! **Invariant:** no stranger can stop a process or keep its peers out. A
//! connection that fails its handshake, sends anything but `Auth` frames,
//! or is not done within [`net::HANDSHAKE_TIMEOUT_MS`] is closed and counted,
//! never returned as an error. At most [`PENDING_MAX`] handshakes are open
//! at once; a new connection past that closes the oldest open one, so a
//! flood of idle connections holds no slot for long, while a real peer,
//! whose handshake takes two round trips, gets through.
//!
//! The owner receives [`Admitted`] connections (blocking sockets, no byte
//! past the handshake read) from [`Gate::next`] with a deadline of its own.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread;
use std::time::{Duration, Instant};

use wire::{Acceptor, AuthStep, FrameHeader, HEADER_BYTES, MessageType, PeerInfo, Secret};

use crate::error::JobError;
use crate::net;

/// Handshakes open at once; a connection past this closes the oldest.
pub const PENDING_MAX: usize = 256;
/// Authenticated connections waiting for their owner; more are closed.
const ADMITTED_QUEUE_MAX: usize = 64;
/// The longest the gate thread sleeps in `poll(2)`, so that it sees a closed gate.
const POLL_MS_MAX: u64 = 100;
/// At most one warning about refused connections per this many ms (with the count since).
const WARN_EVERY_MS: u64 = 1_000;

/// An authenticated connection: a blocking socket, positioned right after the handshake.
pub struct Admitted {
    pub stream: TcpStream,
    pub peer: PeerInfo,
    pub addr: SocketAddr,
}

/// What the gate has done, for tests and reports.
#[derive(Debug, Default)]
pub struct GateCounts {
    pub accepted: AtomicU64,
    pub admitted: AtomicU64,
    /// Closed before authenticating: bad or no proof, wrong frames, timed out, evicted.
    pub refused: AtomicU64,
}

/// The receiving end of a gate; dropping it stops the gate thread (within [`POLL_MS_MAX`]).
pub struct Gate {
    rx: Receiver<Admitted>,
    closed: Arc<AtomicBool>,
    counts: Arc<GateCounts>,
}

impl Gate {
    /// Starts the gate thread on `listener`; `own` is who this process says it is.
    pub fn open(listener: TcpListener, secret: Secret, own: PeerInfo, name: &str) -> Result<Gate, JobError> {
        Self::open_as(listener, secret, move || own, name)
    }

    /// Like [`Gate::open`], for a process whose rank may change while the
    /// gate is open (an elastic worker): `own` is asked at each connection.
    pub fn open_as(
        listener: TcpListener,
        secret: Secret,
        own: impl Fn() -> PeerInfo + Send + 'static,
        name: &str,
    ) -> Result<Gate, JobError> {
        listener
            .set_nonblocking(true)
            .map_err(|e| JobError::io("making the listener nonblocking", e))?;
        let (tx, rx) = mpsc::sync_channel(ADMITTED_QUEUE_MAX);
        let closed = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(GateCounts::default());
        let mut door = Door {
            listener,
            secret,
            own: Box::new(own),
            pending: Vec::new(),
            tx,
            closed: closed.clone(),
            counts: counts.clone(),
            name: name.to_string(),
            last_warn: None,
            unwarned: 0,
        };
        thread::Builder::new()
            .name(format!("gate-{name}"))
            .spawn(move || door.run())
            .map_err(|e| JobError::io("spawning the gate thread", e))?;
        Ok(Gate { rx, closed, counts })
    }

    /// The next authenticated connection, waiting at most `timeout`.
    /// `Disconnected` means the gate thread stopped (its listener failed).
    pub fn next(&self, timeout: Duration) -> Result<Admitted, RecvTimeoutError> {
        self.rx.recv_timeout(timeout)
    }

    pub fn counts(&self) -> &GateCounts {
        &self.counts
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

/// One open handshake.
struct Pending {
    stream: TcpStream,
    addr: SocketAddr,
    acceptor: Acceptor,
    deadline: Instant,
    /// Bytes of the frame being read: the header, then its payload.
    frame: Vec<u8>,
    /// Bytes still to write (the challenge, then the confirmation).
    out: Vec<u8>,
    written: usize,
    /// Set once the peer proved the secret; admitted when `out` is written.
    peer: Option<PeerInfo>,
}

/// Why a handshake was closed.
enum Refusal {
    Closed,
    Io(io::Error),
    Auth(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Closed => f.write_str("closed during the handshake"),
            Refusal::Io(e) => write!(f, "{e}"),
            Refusal::Auth(why) => f.write_str(why),
        }
    }
}

impl Pending {
    /// Bytes the current frame still needs: the header, then its payload.
    fn wanted(&self) -> Result<usize, Refusal> {
        if self.frame.len() < HEADER_BYTES {
            return Ok(HEADER_BYTES - self.frame.len());
        }
        let mut h = [0u8; HEADER_BYTES];
        h.copy_from_slice(&self.frame[..HEADER_BYTES]);
        let header = FrameHeader::decode(&h).map_err(|e| Refusal::Auth(e.to_string()))?;
        if header.kind != MessageType::Auth {
            return Err(Refusal::Auth(format!(
                "sent a {} frame before authenticating",
                header.kind
            )));
        }
        Ok(HEADER_BYTES + header.payload_bytes as usize - self.frame.len())
    }

    /// Reads what the socket has of the current frame, never past it; feeds
    /// a whole frame to the handshake.
    fn read(&mut self) -> Result<(), Refusal> {
        loop {
            if self.peer.is_some() {
                return Ok(());
            }
            let want = self.wanted()?;
            if want == 0 {
                let mut input = &self.frame[..];
                let step = self
                    .acceptor
                    .on_bytes(&mut input)
                    .map_err(|e| Refusal::Auth(e.to_string()))?;
                self.frame.clear();
                match step {
                    None => return Err(Refusal::Auth("an incomplete handshake frame".into())),
                    Some(AuthStep::Send(bytes)) => self.out.extend_from_slice(&bytes),
                    Some(AuthStep::Authenticated { peer, send }) => {
                        self.out.extend_from_slice(&send.unwrap_or_default());
                        self.peer = Some(peer);
                    }
                }
                continue;
            }
            let at = self.frame.len();
            self.frame.resize(at + want, 0);
            match self.stream.read(&mut self.frame[at..]) {
                Ok(0) => return Err(Refusal::Closed),
                Ok(n) => self.frame.truncate(at + n),
                Err(e) => {
                    self.frame.truncate(at);
                    return match e.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                        _ => Err(Refusal::Io(e)),
                    };
                }
            }
        }
    }

    /// Writes what it can of `out`.
    fn write(&mut self) -> Result<(), Refusal> {
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(0) => return Err(Refusal::Closed),
                Ok(n) => self.written += n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {
                    return Ok(());
                }
                Err(e) => return Err(Refusal::Io(e)),
            }
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.peer.is_some() && self.written == self.out.len()
    }
}

/// The gate thread's state.
struct Door {
    listener: TcpListener,
    secret: Secret,
    own: Box<dyn Fn() -> PeerInfo + Send>,
    /// Oldest first.
    pending: Vec<Pending>,
    tx: SyncSender<Admitted>,
    closed: Arc<AtomicBool>,
    counts: Arc<GateCounts>,
    name: String,
    last_warn: Option<Instant>,
    unwarned: u64,
}

impl Door {
    fn run(&mut self) {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(PENDING_MAX + 1);
        while !self.closed.load(Ordering::SeqCst) {
            let now = Instant::now();
            let wait_ms = self
                .pending
                .iter()
                .map(|p| p.deadline.saturating_duration_since(now).as_millis() as u64 + 1)
                .min()
                .unwrap_or(POLL_MS_MAX)
                .min(POLL_MS_MAX);
            fds.clear();
            fds.push(libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            fds.extend(self.pending.iter().map(|p| libc::pollfd {
                fd: p.stream.as_raw_fd(),
                events: libc::POLLIN | if p.written < p.out.len() { libc::POLLOUT } else { 0 },
                revents: 0,
            }));
            // SAFETY: poll(2) reads and writes `fds.len()` pollfd structs we own.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms as libc::c_int) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(gate = %self.name, error = %e, "poll failed; the gate stops");
                    return;
                }
                continue;
            }
            // Service the open handshakes first: a new connection may evict one.
            let ready: Vec<bool> = fds[1..].iter().map(|f| f.revents != 0).collect();
            let mut i = 0;
            let mut k = 0;
            while i < self.pending.len() {
                let p = &mut self.pending[i];
                let r = if ready[k] {
                    p.write().and_then(|()| p.read()).and_then(|()| p.write())
                } else {
                    Ok(())
                };
                k += 1;
                match r {
                    Ok(()) if p.done() => {
                        let p = self.pending.remove(i);
                        if !self.admit(p) {
                            return;
                        }
                    }
                    Ok(()) if Instant::now() >= p.deadline => {
                        let p = self.pending.remove(i);
                        self.refuse(p.addr, &Refusal::Auth("the handshake timed out".into()));
                    }
                    Ok(()) => i += 1,
                    Err(why) => {
                        let p = self.pending.remove(i);
                        self.refuse(p.addr, &why);
                    }
                }
            }
            if fds[0].revents != 0 && !self.accept_all() {
                return;
            }
        }
    }

    /// Accepts every waiting connection; false if the listener failed for good.
    fn accept_all(&mut self) -> bool {
        loop {
            match self.listener.accept() {
                Ok((stream, addr)) => {
                    self.counts.accepted.fetch_add(1, Ordering::Relaxed);
                    if let Err(why) = self.start(stream, addr) {
                        self.refuse(addr, &why);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                // Out of descriptors or a connection reset before accept: refuse, go on.
                Err(e) if is_transient(&e) => {
                    self.note(None, &Refusal::Io(e));
                    return true;
                }
                Err(e) => {
                    tracing::error!(gate = %self.name, error = %e, "accept failed; the gate stops");
                    return false;
                }
            }
        }
    }

    fn start(&mut self, stream: TcpStream, addr: SocketAddr) -> Result<(), Refusal> {
        stream.set_nonblocking(true).map_err(Refusal::Io)?;
        let nonce = net::nonce().map_err(|e| Refusal::Auth(e.to_string()))?;
        let (acceptor, challenge) = Acceptor::new(&self.secret, (self.own)(), nonce);
        if self.pending.len() >= PENDING_MAX {
            let oldest = self.pending.remove(0);
            self.refuse(oldest.addr, &Refusal::Auth("evicted by newer connections".into()));
        }
        let mut p = Pending {
            stream,
            addr,
            acceptor,
            deadline: Instant::now() + Duration::from_millis(net::HANDSHAKE_TIMEOUT_MS),
            frame: Vec::with_capacity(HEADER_BYTES),
            out: challenge,
            written: 0,
            peer: None,
        };
        p.write()?;
        self.pending.push(p);
        Ok(())
    }

    /// Hands an authenticated connection to the owner; false once the owner is gone.
    fn admit(&mut self, p: Pending) -> bool {
        let Some(peer) = p.peer else { return true };
        if let Err(e) = p.stream.set_nonblocking(false) {
            self.refuse(p.addr, &Refusal::Io(e));
            return true;
        }
        tracing::info!(gate = %self.name, peer = %peer, addr = %p.addr, "authenticated");
        let admitted = Admitted {
            stream: p.stream,
            peer,
            addr: p.addr,
        };
        match self.tx.try_send(admitted) {
            Ok(()) => {
                self.counts.admitted.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Full(a)) => {
                tracing::warn!(gate = %self.name, peer = %a.peer, "too many authenticated connections waiting; closed one");
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    fn refuse(&mut self, addr: SocketAddr, why: &Refusal) {
        self.counts.refused.fetch_add(1, Ordering::Relaxed);
        self.note(Some(addr), why);
    }

    /// Logs a refusal: at once if none was logged in the last [`WARN_EVERY_MS`], else counted into the next line.
    fn note(&mut self, addr: Option<SocketAddr>, why: &Refusal) {
        let now = Instant::now();
        if self
            .last_warn
            .is_some_and(|t| now.duration_since(t) < Duration::from_millis(WARN_EVERY_MS))
        {
            self.unwarned += 1;
            return;
        }
        let before = std::mem::take(&mut self.unwarned);
        let addr = addr.map_or_else(|| "-".to_string(), |a| a.to_string());
        tracing::warn!(gate = %self.name, peer = %addr, reason = %why, refused_since_last_warning = before, "refused an unauthenticated connection");
        self.last_warn = Some(now);
    }
}

/// Errors of `accept(2)` that concern one connection or a passing shortage.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
                | libc::EPERM
        )
    ) || e.kind() == io::ErrorKind::Interrupted
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::Role;

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes().to_vec()).expect("secret")
    }

    fn gate(secret: &Secret) -> (Gate, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let own = PeerInfo {
            role: Role::Server,
            rank: 0,
        };
        (Gate::open(listener, secret.clone(), own, "test").expect("gate"), addr)
    }

    fn join(addr: SocketAddr, secret: &Secret, rank: u32) -> Result<TcpStream, JobError> {
        let mut s = net::connect(&addr.to_string(), 2_000)?;
        let own = PeerInfo {
            role: Role::Worker,
            rank,
        };
        net::connect_handshake(&mut s, secret, own)?;
        Ok(s)
    }

    /// Issue 16: one stranger's connection during rendezvous ended a shard.
    /// Behind the gate, strangers (silent, garbage, a wrong secret, a data
    /// frame) are refused and counted, and a real peer still gets in, with
    /// the bytes it sent after the handshake untouched.
    #[test]
    fn strangers_are_refused_and_a_peer_still_gets_in() {
        let good = secret("the-secret-of-this-test-job");
        let (gate, addr) = gate(&good);
        let _silent = TcpStream::connect(addr).expect("connect");
        let mut garbage = TcpStream::connect(addr).expect("connect");
        garbage.write_all(&[0xAB; 100]).expect("garbage");
        let mut data = TcpStream::connect(addr).expect("connect");
        data.write_all(&wire::encode_control(0, &0u32).expect("frame"))
            .expect("frame");
        let wrong = join(addr, &secret("another-secret-not-this-one"), 9);
        assert!(wrong.is_err(), "a wrong secret authenticated");
        let mut s = join(addr, &good, 3).expect("a peer with the secret gets in");
        s.write_all(b"after").expect("write");
        let a = gate.next(Duration::from_secs(5)).expect("admitted");
        assert_eq!(a.peer.rank, 3);
        let mut after = [0u8; 5];
        let mut stream = a.stream;
        stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        stream.read_exact(&mut after).expect("read");
        assert_eq!(&after, b"after");
        // The garbage, the data frame and the wrong secret are refused by now; the silent one later.
        let deadline = Instant::now() + Duration::from_secs(5);
        while gate.counts().refused.load(Ordering::Relaxed) < 3 {
            assert!(Instant::now() < deadline, "refused {:?}", gate.counts());
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(gate.counts().admitted.load(Ordering::Relaxed), 1);
    }

    /// Idle connections past [`PENDING_MAX`] evict the oldest, so a flood of
    /// them cannot keep a peer out for a handshake timeout.
    #[test]
    fn a_flood_of_idle_connections_does_not_keep_a_peer_out() {
        let good = secret("the-secret-of-this-test-job");
        let (gate, addr) = gate(&good);
        let idle: Vec<TcpStream> = (0..PENDING_MAX + 50)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        let started = Instant::now();
        let s = join(addr, &good, 1).expect("a peer with the secret gets in");
        let a = gate.next(Duration::from_secs(5)).expect("admitted");
        assert_eq!(a.peer.rank, 1);
        assert!(
            started.elapsed() < Duration::from_millis(net::HANDSHAKE_TIMEOUT_MS / 2),
            "the peer waited {:?} behind idle connections",
            started.elapsed()
        );
        drop((s, idle));
    }
}
