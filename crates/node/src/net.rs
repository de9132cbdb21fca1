//! TCP plumbing: connecting with a deadline, the authentication handshake,
//! and reading and writing frames. Every blocking call here has a deadline.
//!
//! **Invariant:** no connection carries anything but `Auth` frames until its
//! handshake has succeeded; a peer without the shared secret is refused and
//! logged.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use wire::{Acceptor, AuthStep, Connector, FrameDecoder, FrameHeader, HEADER_BYTES, MessageType, PeerInfo};

use crate::error::JobError;
pub use wire::Secret;

/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// Pause between connection attempts while a peer is not listening yet.
const CONNECT_RETRY_MS: u64 = 20;
/// Socket buffers for the data path: large enough to keep a 25 MiB
/// all-reduce streaming without stalls on loopback.
const DATA_SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// A fresh nonce from the kernel's random source.
pub fn nonce() -> Result<wire::Nonce, JobError> {
    let mut n = [0u8; wire::NONCE_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .map_err(|e| JobError::io("reading /dev/urandom", e))?;
    Ok(n)
}

/// Connects to `addr`, retrying refused connections until `timeout_ms` has passed.
pub fn connect(addr: &str, timeout_ms: u64) -> Result<TcpStream, JobError> {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    let resolved: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| JobError::io(format!("resolving {addr}"), e))?
        .collect();
    let target = *resolved
        .first()
        .ok_or_else(|| JobError::io(format!("resolving {addr}"), io::Error::other("no address")))?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&target, left.max(Duration::from_millis(1))) {
            Ok(s) => {
                s.set_nodelay(true).map_err(|e| JobError::io("TCP_NODELAY", e))?;
                return Ok(s);
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(JobError::io(
                    format!("connecting to {addr} (gave up after {timeout_ms} ms)"),
                    e,
                ));
            }
            // The peer may not be listening yet: wait a little and try again, within the deadline.
            Err(_) => std::thread::sleep(Duration::from_millis(CONNECT_RETRY_MS).min(left)),
        }
    }
}

/// Binds a listener; `addr` may use port 0.
pub fn listen(addr: &str) -> Result<TcpListener, JobError> {
    TcpListener::bind(addr).map_err(|e| JobError::io(format!("listening on {addr}"), e))
}

/// Tunes a data-path stream: no Nagle, big buffers.
pub fn tune_data_stream(s: &TcpStream) -> Result<(), JobError> {
    s.set_nodelay(true).map_err(|e| JobError::io("TCP_NODELAY", e))?;
    set_buffer(s, libc::SO_SNDBUF)?;
    set_buffer(s, libc::SO_RCVBUF)
}

fn set_buffer(s: &TcpStream, opt: libc::c_int) -> Result<(), JobError> {
    use std::os::fd::AsRawFd;
    let v = DATA_SOCKET_BUFFER_BYTES as libc::c_int;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a valid pointer to `v`.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(JobError::io("setsockopt socket buffer", io::Error::last_os_error()));
    }
    Ok(())
}

/// Runs the acceptor side of the handshake on a fresh connection.
pub fn accept_handshake(s: &mut TcpStream, secret: &Secret, own: PeerInfo) -> Result<PeerInfo, JobError> {
    let (mut acc, challenge) = Acceptor::new(secret, own, nonce()?);
    with_deadline(s, HANDSHAKE_TIMEOUT_MS, |s| {
        s.write_all(&challenge)
            .map_err(|e| JobError::io("sending auth challenge", e))?;
        drive(s, |input| acc.on_bytes(input))
    })
}

/// Runs the connector side of the handshake on a fresh connection. A peer
/// that says nothing, or whose first bytes are not a Sinter frame, is not a
/// Sinter process ([`JobError::NotSinter`]): a Sinter acceptor speaks first.
pub fn connect_handshake(s: &mut TcpStream, secret: &Secret, own: PeerInfo) -> Result<PeerInfo, JobError> {
    let mut conn = Connector::new(secret, own, nonce()?);
    let addr = s.peer_addr().map_or_else(|_| "the peer".to_string(), |a| a.to_string());
    let mut frames = 0u32;
    with_deadline(s, HANDSHAKE_TIMEOUT_MS, |s| {
        drive(s, |input| {
            frames += 1;
            conn.on_bytes(input)
        })
    })
    .map_err(|e| match (frames, &e) {
        (0, JobError::Io { err, .. }) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            JobError::NotSinter {
                addr,
                why: format!("it accepted the connection but sent nothing in {HANDSHAKE_TIMEOUT_MS} ms"),
            }
        }
        (0, JobError::Wire(wire::WireError::BadMagic { got })) => JobError::NotSinter {
            addr,
            why: format!("its first bytes {got:02x?} are not a Sinter frame"),
        },
        _ => e,
    })
}

/// Feeds received frames to a handshake until it authenticates the peer.
/// Reads exactly one frame at a time, so no byte after the handshake is consumed.
fn drive(
    s: &mut TcpStream,
    mut step: impl FnMut(&mut &[u8]) -> Result<Option<AuthStep>, wire::WireError>,
) -> Result<PeerInfo, JobError> {
    let mut frame = [0u8; HEADER_BYTES + wire::AUTH_PAYLOAD_BYTES_MAX as usize];
    let io = |e: io::Error| match e.kind() {
        // A peer that refuses our proof closes the connection without a word.
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => JobError::io(
            "authentication failed: the peer closed the connection during the handshake (do both sides have the same secret?)",
            e,
        ),
        _ => JobError::io("authentication handshake", e),
    };
    loop {
        s.read_exact(&mut frame[..HEADER_BYTES]).map_err(io)?;
        let mut h = [0u8; HEADER_BYTES];
        h.copy_from_slice(&frame[..HEADER_BYTES]);
        let header = FrameHeader::decode(&h)?;
        if header.kind != MessageType::Auth {
            return Err(JobError::Wire(wire::WireError::AuthFailed {
                peer: None,
                reason: wire::AuthFailure::UnexpectedMessage {
                    expected: "an auth frame",
                    got: "another frame",
                },
            }));
        }
        let len = HEADER_BYTES + header.payload_bytes as usize;
        s.read_exact(&mut frame[HEADER_BYTES..len]).map_err(io)?;
        let mut input = &frame[..len];
        match step(&mut input)? {
            None => {}
            Some(AuthStep::Send(bytes)) => s.write_all(&bytes).map_err(io)?,
            Some(AuthStep::Authenticated { peer, send }) => {
                if let Some(bytes) = send {
                    s.write_all(&bytes).map_err(io)?;
                }
                return Ok(peer);
            }
        }
    }
}

/// Runs `f` with read and write timeouts on `s`, then clears them.
fn with_deadline<T>(
    s: &mut TcpStream,
    timeout_ms: u64,
    f: impl FnOnce(&mut TcpStream) -> Result<T, JobError>,
) -> Result<T, JobError> {
    let t = Some(Duration::from_millis(timeout_ms));
    s.set_read_timeout(t).map_err(|e| JobError::io("set_read_timeout", e))?;
    s.set_write_timeout(t)
        .map_err(|e| JobError::io("set_write_timeout", e))?;
    let r = f(s);
    s.set_read_timeout(None)
        .map_err(|e| JobError::io("set_read_timeout", e))?;
    s.set_write_timeout(None)
        .map_err(|e| JobError::io("set_write_timeout", e))?;
    r
}

/// Writes one control message as a frame.
pub fn send_control<T: Serialize>(s: &mut TcpStream, sender: u32, msg: &T) -> Result<(), JobError> {
    let bytes = wire::encode_control(sender, msg)?;
    s.write_all(&bytes)
        .map_err(|e| JobError::io("sending control message", e))
}

/// Reads exactly one control message and not a byte more, for a stream whose
/// following bytes belong to someone else (the data path after a peer's hello).
pub fn recv_control_exact<T: DeserializeOwned>(s: &mut TcpStream, timeout_ms: u64) -> Result<T, JobError> {
    with_deadline(s, timeout_ms, |s| {
        let mut h = [0u8; HEADER_BYTES];
        s.read_exact(&mut h)
            .map_err(|e| JobError::io("reading a control message", e))?;
        let header = FrameHeader::decode(&h)?;
        if header.kind != MessageType::Control {
            return Err(JobError::Coordinator(format!(
                "expected a control frame, got {}",
                header.kind
            )));
        }
        let mut payload = vec![0u8; header.payload_bytes as usize];
        s.read_exact(&mut payload)
            .map_err(|e| JobError::io("reading a control message", e))?;
        Ok(wire::decode_control(&header, &payload)?)
    })
}

/// Reads control frames from a stream, with a bounded buffer. It may read past
/// the last frame returned, so it must own the stream's read side.
pub struct ControlReader {
    stream: TcpStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    pending: std::collections::VecDeque<wire::Frame>,
}

impl ControlReader {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            decoder: FrameDecoder::new(),
            buf: vec![0; 64 * 1024],
            pending: Default::default(),
        }
    }

    /// The next control message; `None` when the peer closed the connection cleanly.
    /// With a timeout, a silent peer is an error after `timeout_ms`.
    pub fn recv<T: DeserializeOwned>(&mut self, timeout_ms: Option<u64>) -> Result<Option<T>, JobError> {
        self.stream
            .set_read_timeout(timeout_ms.map(Duration::from_millis))
            .map_err(|e| JobError::io("set_read_timeout", e))?;
        loop {
            if let Some(frame) = self.pending.pop_front() {
                if frame.header.kind != MessageType::Control {
                    return Err(JobError::Coordinator(format!(
                        "expected a control frame, got {}",
                        frame.header.kind
                    )));
                }
                return Ok(Some(wire::decode_control(&frame.header, &frame.payload)?));
            }
            let n = match self.stream.read(&mut self.buf) {
                Ok(0) => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
                Ok(n) => n,
                Err(e) => return Err(JobError::io("reading control message", e)),
            };
            let mut input = &self.buf[..n];
            while let Some(frame) = self.decoder.decode(&mut input)? {
                self.pending.push_back(frame);
            }
        }
    }
}

/// Writes a tensor frame: header, then the payload straight from the buffer.
pub fn write_tensor(s: &mut TcpStream, tag: u64, sender: u32, values: &[f32]) -> Result<(), io::Error> {
    write_frame(s, MessageType::Tensor, tag, sender, as_bytes(values))
}

/// Writes one frame of `kind` with its header and payload in one vectored
/// call (no Nagle split between them).
pub fn write_frame(
    s: &mut TcpStream,
    kind: MessageType,
    tag: u64,
    sender: u32,
    payload: &[u8],
) -> Result<(), io::Error> {
    let header = FrameHeader::new(kind, tag, sender, payload).map_err(io::Error::other)?;
    let h = header.encode();
    let mut bufs = [io::IoSlice::new(&h), io::IoSlice::new(payload)];
    let mut slices: &mut [io::IoSlice] = &mut bufs;
    while !slices.is_empty() {
        let n = s.write_vectored(slices)?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        io::IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// Reads and validates one frame header.
pub fn read_header(s: &mut TcpStream) -> Result<FrameHeader, io::Error> {
    let mut h = [0u8; HEADER_BYTES];
    s.read_exact(&mut h)?;
    FrameHeader::decode(&h).map_err(io::Error::other)
}

/// Reads one `Ps` frame from a stream whose read timeout is `stall_ms`
/// (set by the caller once): a stream may stay idle between frames for as
/// long as it likes (a silent peer is the coordinator's to judge, by its
/// heartbeats), but once a frame has begun, every `stall_ms` must bring more
/// of it. `None` at a clean end of the stream, between frames.
pub fn read_ps_frame(s: &mut TcpStream, payload: &mut Vec<u8>, stall_ms: u64) -> Result<Option<FrameHeader>, String> {
    let h = read_frame(s, payload, stall_ms)?;
    if let Some(h) = &h
        && h.kind != MessageType::Ps
    {
        return Err(format!("expected a parameter-server frame, got {}", h.kind));
    }
    Ok(h)
}

/// Reads one frame of any kind, checked (header, length limit of its kind,
/// payload checksum), under [`read_ps_frame`]'s rule: idle between frames for
/// as long as the peer likes, but no stall of `stall_ms` inside one.
pub fn read_frame(s: &mut TcpStream, payload: &mut Vec<u8>, stall_ms: u64) -> Result<Option<FrameHeader>, String> {
    let mut h = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        match s.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err("the connection closed inside a frame".into()),
            Ok(n) => got += n,
            Err(e) if is_timeout(&e) && got == 0 => {}
            Err(e) if is_timeout(&e) => return Err(format!("a frame stalled for {stall_ms} ms after {got} bytes")),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    let h = FrameHeader::decode(&h).map_err(|e| e.to_string())?;
    payload.resize(h.payload_bytes as usize, 0);
    s.read_exact(payload).map_err(|e| match is_timeout(&e) {
        true => format!("a frame's payload stalled for {stall_ms} ms"),
        false => e.to_string(),
    })?;
    h.check_payload(payload).map_err(|e| e.to_string())?;
    Ok(Some(h))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Sets the read timeout [`read_ps_frame`] counts a stall by.
pub fn set_stall_timeout(s: &TcpStream, stall_ms: u64) -> Result<(), JobError> {
    s.set_read_timeout(Some(Duration::from_millis(stall_ms.max(1))))
        .map_err(|e| JobError::io("set_read_timeout", e))
}

/// The bytes of an f32 slice (little-endian hosts only; see the assertion below).
pub fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every bit pattern is a valid u8; the length is exact.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

/// The bytes of a mutable f32 slice, for reading straight into it.
pub fn as_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v)) }
}

// Tensors travel as raw little-endian f32; a big-endian port must byte-swap.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "Sinter's tensor frames assume a little-endian host"
);
