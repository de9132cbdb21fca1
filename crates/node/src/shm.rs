//! The shared-memory transport between two ranks on the same machine: one
//! segment per pair holding two single-producer/single-consumer byte rings
//! (one per direction) that carry exactly the frames TCP would (32-byte
//! header, then the payload), the futex words a rank sleeps on, and the setup
//! handshake that decides, over the pair's authenticated TCP stream, whether
//! the two may share memory at all.
//!
//! Segment layout (`SEGMENT_CONTROL_BYTES` of control, then the rings):
//!
//! ```text
//! 0        magic, layout version, ring size, token        (written once by the creator)
//! 128      head[0], head[1]    ring i's write position, each on its own cache-line pair
//! 384      tail[0], tail[1]    ring i's read position
//! 640      bell[0], bell[1]    side i's futex word and sleep state
//! 4096     ring 0 data         side 0 (the lower rank) → side 1
//! 4096+R   ring 1 data         side 1 → side 0
//! ```
//!
//! **Invariant:** per ring, `tail <= head <= tail + ring_bytes` (byte counts
//! since the segment was made; they never wrap in a job's lifetime). Only the
//! producer stores `head` (Release, after copying the bytes in) and only the
//! consumer stores `tail` (Release, after copying the bytes out), so bytes in
//! `[tail, head)` are never written and bytes outside it are never read. A
//! value that breaks the invariant is a corrupt segment: an error naming the
//! peer, never a read outside the mapping.
//!
//! Frames are `32 + 4k` bytes, so every payload f32 sits at a stream offset,
//! and (the ring size being a power of two) a ring offset, that is a multiple
//! of 4: an f32 never straddles the wrap.
//!
//! Waking: a side that found nothing to do stores its sleep state (`FUTEX` or
//! `POLL`) into its bell, then re-checks the rings, then sleeps. The other side,
//! after each head or tail store, looks at that state (a load on a line that
//! only changes around sleeps: no syscall on the hot path) and, only if it is
//! set, takes it back and wakes the sleeper: `FUTEX_WAKE` on the bell word, or
//! for a sleeper in `poll(2)` a doorbell byte on the pair's TCP stream (which
//! `comm` does). A SeqCst fence on both sides between the store and the load
//! makes a lost wake-up impossible (Dekker).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::mem::size_of;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
use std::time::Duration;

use wire::msg::{HostId, PeerHello, PeerLink, ShmAck};

use crate::error::JobError;
use crate::net;

/// Bytes of each direction's ring. 4 MiB holds 16 default segments
/// (256 KiB), four times the engines' in-flight window, so a sender is not
/// held up by a receiver busy adding the previous segment. Must be a power
/// of two (so `offset = position % ring_bytes` is a mask and an f32 never
/// straddles the wrap) and at least a frame header.
pub const RING_BYTES: usize = 4 << 20;
/// Shared-memory links one process may hold. Each maps 2 × `RING_BYTES` of
/// tmpfs (8 MiB; pages are only allocated as bytes flow), so this caps a
/// process at 256 MiB of /dev/shm; peers beyond it use TCP.
pub const SHM_LINKS_MAX: usize = 32;
/// Where segments are made: POSIX shared memory on Linux.
const SHM_DIR: &str = "/dev/shm";
/// Segment names: `sinter-<creator pid>-<32 hex digits>`.
const NAME_PREFIX: &str = "sinter-";
const NAME_BYTES_MAX: usize = 64;
pub const TOKEN_BYTES: usize = 16;
const MAGIC: [u8; 8] = *b"SNTRSHM\0";
const LAYOUT_VERSION: u32 = 1;
/// Two cache lines: Intel's adjacent-line prefetcher pulls lines in pairs.
const LINE_BYTES: usize = 128;
/// The control part of a segment, before the rings: one page.
const SEGMENT_CONTROL_BYTES: usize = 4096;

/// A side's sleep state, in its bell.
const AWAKE: u32 = 0;
/// Asleep in `FUTEX_WAIT` on its bell word: wake with `FUTEX_WAKE`.
pub const SLEEP_FUTEX: u32 = 1;
/// Asleep in `poll(2)` on its sockets: wake with a byte on the pair's TCP stream.
pub const SLEEP_POLL: u32 = 2;

#[repr(C, align(128))]
struct Line<T>(T);

#[repr(C)]
struct Bell {
    /// The futex word: bumped by the other side to wake this one.
    word: AtomicU32,
    /// `AWAKE`, `SLEEP_FUTEX` or `SLEEP_POLL`: stored by this side, taken back by the waker.
    state: AtomicU32,
}

#[repr(C)]
struct Identity {
    magic: [u8; 8],
    version: u32,
    _pad: u32,
    ring_bytes: u64,
    token: [u8; TOKEN_BYTES],
}

/// The control page. Everything another process writes while we run is an atomic.
#[repr(C)]
struct Control {
    id: Line<Identity>,
    head: [Line<AtomicU64>; 2],
    tail: [Line<AtomicU64>; 2],
    bell: [Line<Bell>; 2],
}

const _: () = assert!(size_of::<Control>() <= SEGMENT_CONTROL_BYTES);
const _: () = assert!(size_of::<Line<AtomicU64>>() == LINE_BYTES);
const _: () = assert!(RING_BYTES.is_power_of_two() && RING_BYTES >= wire::HEADER_BYTES);

/// Bytes of a segment with two rings of `ring_bytes`.
fn segment_bytes(ring_bytes: usize) -> usize {
    SEGMENT_CONTROL_BYTES + 2 * ring_bytes
}

/// A `MAP_SHARED` mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; which bytes are written
// concurrently is governed by the ring protocol (atomics for the shared words).
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` (or anonymous shared memory when `fd` is `None`) read-write.
    fn new(fd: Option<&File>, len: usize) -> io::Result<Self> {
        let (flags, raw) = match fd {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping at an address the kernel chooses; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is a mapping we made and nothing borrows it past this value.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// What the caller must do after a ring operation so the other side wakes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Nothing: the other side was awake, or it was woken through its futex.
    Nothing,
    /// The other side sleeps in `poll(2)`: write a byte to the pair's TCP stream.
    Doorbell,
}

/// One side of a pair's segment: producer of one ring, consumer of the other.
pub struct Endpoint {
    map: Mapping,
    ring_bytes: usize,
    /// 0 for the creator (the lower rank), 1 for the other.
    side: usize,
    /// Our ring's head (we are its only writer) and the last tail we saw.
    tx_head: u64,
    tx_tail_seen: u64,
    /// The other ring's tail (we are its only writer) and the last head we saw.
    rx_tail: u64,
    rx_head_seen: u64,
}

impl Endpoint {
    /// Both ends of one segment in this process, over anonymous shared memory (tests).
    #[cfg(test)]
    pub fn pair(ring_bytes: usize) -> io::Result<(Endpoint, Endpoint)> {
        assert!(
            ring_bytes.is_power_of_two() && ring_bytes >= 4,
            "ring of {ring_bytes} bytes"
        );
        let len = segment_bytes(ring_bytes);
        let a = Mapping::new(None, len)?;
        // SAFETY: mremap with old_size 0 on a MAP_SHARED mapping makes a second mapping of the
        // same pages at a fresh address and leaves the first in place; each end owns one.
        let p = unsafe { libc::mremap(a.ptr.as_ptr().cast(), 0, len, libc::MREMAP_MAYMOVE) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mremap returned null"))?;
        let b = Mapping { ptr, len };
        Ok((Endpoint::new(a, ring_bytes, 0), Endpoint::new(b, ring_bytes, 1)))
    }

    fn new(map: Mapping, ring_bytes: usize, side: usize) -> Self {
        assert!(map.len >= segment_bytes(ring_bytes));
        Self {
            map,
            ring_bytes,
            side,
            tx_head: 0,
            tx_tail_seen: 0,
            rx_tail: 0,
            rx_head_seen: 0,
        }
    }

    fn ctl(&self) -> &Control {
        // SAFETY: the mapping is at least SEGMENT_CONTROL_BYTES, page-aligned (so aligned for
        // Control), lives as long as `self`, and every field another process may write while
        // we hold this reference is an atomic; the identity bytes are written only before
        // the segment is shared.
        unsafe { &*self.map.ptr.as_ptr().cast::<Control>() }
    }

    fn ring(&self, i: usize) -> *mut u8 {
        // SAFETY: SEGMENT_CONTROL_BYTES + i * ring_bytes (i < 2) is inside the mapping.
        unsafe { self.map.ptr.as_ptr().add(SEGMENT_CONTROL_BYTES + i * self.ring_bytes) }
    }

    fn peer(&self) -> usize {
        1 - self.side
    }

    /// Copies as much of `bufs` (in order) into our ring as fits; returns the bytes written (0: full).
    pub fn write(&mut self, bufs: &[&[u8]]) -> io::Result<usize> {
        let want: usize = bufs.iter().map(|b| b.len()).sum();
        let cap = self.ring_bytes as u64;
        if cap - (self.tx_head - self.tx_tail_seen) < want as u64 {
            let tail = self.ctl().tail[self.side].0.load(Ordering::Acquire);
            if tail > self.tx_head || self.tx_head - tail > cap || tail < self.tx_tail_seen {
                return Err(corrupt("tail", tail, self.tx_head));
            }
            self.tx_tail_seen = tail;
        }
        let mut free = (cap - (self.tx_head - self.tx_tail_seen)) as usize;
        let ring = self.ring(self.side);
        let mut written = 0;
        for b in bufs {
            if free == 0 {
                break;
            }
            let n = b.len().min(free);
            let at = (self.tx_head as usize + written) & (self.ring_bytes - 1);
            let first = n.min(self.ring_bytes - at);
            // SAFETY: `at + first <= ring_bytes` and `n - first < ring_bytes` bytes at the ring's
            // start are inside our ring; they lie in [head, tail + cap), which the consumer does
            // not read until we publish the new head below; `b` does not overlap the mapping
            // (it is the caller's memory).
            unsafe {
                std::ptr::copy_nonoverlapping(b.as_ptr(), ring.add(at), first);
                std::ptr::copy_nonoverlapping(b.as_ptr().add(first), ring, n - first);
            }
            written += n;
            free -= n;
        }
        if written > 0 {
            self.tx_head += written as u64;
            self.ctl().head[self.side].0.store(self.tx_head, Ordering::Release);
        }
        Ok(written)
    }

    /// Copies up to `dst.len()` bytes out of the other side's ring; returns the bytes read (0: empty).
    pub fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        let peer = self.peer();
        if self.rx_head_seen - self.rx_tail < dst.len() as u64 {
            self.load_head()?;
        }
        let n = ((self.rx_head_seen - self.rx_tail) as usize).min(dst.len());
        if n == 0 {
            return Ok(0);
        }
        let at = self.rx_tail as usize & (self.ring_bytes - 1);
        let first = n.min(self.ring_bytes - at);
        let ring = self.ring(peer);
        // SAFETY: as in `write`: the bytes are inside the peer's ring, in [tail, head), which the
        // producer published (Acquire in `load_head`) and does not touch until we store the tail.
        unsafe {
            std::ptr::copy_nonoverlapping(ring.add(at), dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(ring, dst.as_mut_ptr().add(first), n - first);
        }
        self.rx_tail += n as u64;
        self.ctl().tail[peer].0.store(self.rx_tail, Ordering::Release);
        Ok(n)
    }

    /// The next readable bytes of the other side's ring that are contiguous in memory, up to
    /// `max`, without consuming them (see [`Endpoint::consume`]). Empty when the ring is.
    pub fn peek(&mut self, max: usize) -> io::Result<&[u8]> {
        if self.rx_head_seen - self.rx_tail < max as u64 {
            self.load_head()?;
        }
        let at = self.rx_tail as usize & (self.ring_bytes - 1);
        let n = ((self.rx_head_seen - self.rx_tail) as usize)
            .min(max)
            .min(self.ring_bytes - at);
        // SAFETY: as in `read`; the slice lives while `self` is borrowed, and the producer does
        // not write [tail, head) before `consume` moves the tail past it.
        Ok(unsafe { std::slice::from_raw_parts(self.ring(self.peer()).add(at), n) })
    }

    /// Marks `n` bytes returned by [`Endpoint::peek`] as read.
    pub fn consume(&mut self, n: usize) {
        assert!(
            n as u64 <= self.rx_head_seen - self.rx_tail,
            "consumed more than was readable"
        );
        self.rx_tail += n as u64;
        self.ctl().tail[self.peer()].0.store(self.rx_tail, Ordering::Release);
    }

    fn load_head(&mut self) -> io::Result<()> {
        let head = self.ctl().head[self.peer()].0.load(Ordering::Acquire);
        if head < self.rx_head_seen || head - self.rx_tail > self.ring_bytes as u64 {
            return Err(corrupt("head", head, self.rx_tail));
        }
        self.rx_head_seen = head;
        Ok(())
    }

    /// Whether the other side's ring has bytes for us.
    pub fn readable(&self) -> bool {
        self.ctl().head[self.peer()].0.load(Ordering::Acquire) != self.rx_tail
    }

    /// Whether our ring has room for at least one byte.
    pub fn writable(&self) -> bool {
        let tail = self.ctl().tail[self.side].0.load(Ordering::Acquire);
        self.tx_head.wrapping_sub(tail) < self.ring_bytes as u64
    }

    /// After a write or read: wakes the other side if it sleeps. Costs one fence and one load
    /// unless it does.
    pub fn notify(&self) -> Wake {
        fence(Ordering::SeqCst);
        let bell = &self.ctl().bell[self.peer()].0;
        if bell.state.load(Ordering::Relaxed) == AWAKE {
            return Wake::Nothing;
        }
        match bell.state.swap(AWAKE, Ordering::AcqRel) {
            SLEEP_FUTEX => {
                bell.word.fetch_add(1, Ordering::SeqCst);
                futex_wake(&bell.word);
                Wake::Nothing
            }
            SLEEP_POLL => Wake::Doorbell,
            _ => Wake::Nothing,
        }
    }

    /// Declares this side about to sleep (`SLEEP_FUTEX` or `SLEEP_POLL`) and returns the bell
    /// word's value to wait on. The caller must re-check [`Endpoint::readable`] and
    /// [`Endpoint::writable`] after this and before sleeping.
    pub fn arm(&self, how: u32) -> u32 {
        let bell = &self.ctl().bell[self.side].0;
        bell.state.store(how, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        bell.word.load(Ordering::SeqCst)
    }

    /// Declares this side awake again.
    pub fn disarm(&self) {
        self.ctl().bell[self.side].0.state.store(AWAKE, Ordering::SeqCst);
    }

    /// The futex word this side sleeps on.
    pub fn bell(&self) -> &AtomicU32 {
        &self.ctl().bell[self.side].0.word
    }
}

fn corrupt(what: &str, value: u64, ours: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("shared-memory ring corrupt: {what} {value} against our position {ours}"),
    )
}

/// `FUTEX_WAKE` of one waiter on a word in shared memory (not `FUTEX_PRIVATE`: the
/// sleeper is another process).
fn futex_wake(word: &AtomicU32) {
    // SAFETY: futex(2) on the address of a live, aligned u32; FUTEX_WAKE only reads the address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            1,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0,
        )
    };
}

/// Sleeps while `word == expected`, for at most `timeout`. Returns on a wake, a changed
/// value, a signal or the timeout alike: the caller re-checks its rings.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) -> io::Result<()> {
    let ts = timespec(timeout);
    // SAFETY: futex(2) on the address of a live, aligned u32 with a valid relative timeout.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::ETIMEDOUT | libc::EINTR) => Ok(()),
            _ => Err(e),
        };
    }
    Ok(())
}

/// `struct futex_waitv` of linux/futex.h.
#[repr(C)]
struct FutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

/// futex2 flag: the word is a u32 (no `FUTEX2_PRIVATE`: shared between processes).
const FUTEX2_SIZE_U32: u32 = 0x02;
/// The kernel's limit on words per `futex_waitv`.
pub const FUTEX_WAITV_MAX: usize = 128;

/// Sleeps until any of `words` (each with the value it was read at) is woken or changed, or
/// `timeout` passes. `Err` with `ENOSYS` before Linux 5.16: the caller falls back to `poll(2)`.
pub fn futex_waitv(words: &[(&AtomicU32, u32)], timeout: Duration) -> io::Result<()> {
    assert!(words.len() <= FUTEX_WAITV_MAX);
    let v: Vec<FutexWaitv> = words
        .iter()
        .map(|(w, val)| FutexWaitv {
            val: u64::from(*val),
            uaddr: w.as_ptr() as u64,
            flags: FUTEX2_SIZE_U32,
            reserved: 0,
        })
        .collect();
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into `now`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let d = timespec(timeout);
    let mut until = libc::timespec {
        tv_sec: now.tv_sec + d.tv_sec,
        tv_nsec: now.tv_nsec + d.tv_nsec,
    };
    if until.tv_nsec >= 1_000_000_000 {
        until.tv_sec += 1;
        until.tv_nsec -= 1_000_000_000;
    }
    // SAFETY: futex_waitv(2) reads `v.len()` valid futex_waitv structs naming live, aligned
    // u32s, and an absolute CLOCK_MONOTONIC timeout.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            v.as_ptr(),
            v.len() as libc::c_uint,
            0 as libc::c_uint,
            &until as *const libc::timespec,
            libc::CLOCK_MONOTONIC,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::ETIMEDOUT | libc::EINTR) => Ok(()),
            _ => Err(e),
        };
    }
    Ok(())
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

/// Where this process runs, as far as sharing memory goes: ranks share memory only with the
/// same boot (same kernel) and the same network namespace (a peer reached over a veth pair
/// is measured as a network peer on purpose).
pub fn host_id() -> Result<HostId, String> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map_err(|e| format!("reading /proc/sys/kernel/random/boot_id: {e}"))?
        .trim()
        .to_string();
    let netns = std::fs::metadata("/proc/self/ns/net")
        .map_err(|e| format!("stat /proc/self/ns/net: {e}"))?
        .ino();
    if boot_id.is_empty() || boot_id.len() > wire::msg::BOOT_ID_BYTES_MAX {
        return Err(format!("unexpected boot id {boot_id:?}"));
    }
    Ok(HostId { boot_id, netns })
}

/// The shared-memory links a process holds, against `SHM_LINKS_MAX`.
#[derive(Default)]
pub struct Budget(AtomicUsize);

impl Budget {
    fn take(&self) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < SHM_LINKS_MAX).then_some(n + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The dialing (higher) rank's side of a pair's setup, right after authentication: sends
/// its hello (with its host when `host` is set: `cluster.transport = "auto"`), reads the
/// lower rank's answer and, for a segment, maps it, checks it and acknowledges.
///
/// A failure of shared memory leaves the pair on TCP with the reason logged; only a failure
/// of the TCP stream itself is an error.
pub fn dial(
    s: &mut TcpStream,
    own_rank: u32,
    peer: u32,
    generation: u64,
    host: Option<&HostId>,
    budget: &Budget,
) -> Result<Option<Endpoint>, JobError> {
    let offered = host.is_some() && budget.take();
    let hello = PeerHello {
        generation,
        rank: own_rank,
        host: host.filter(|_| offered).cloned(),
    };
    net::send_control(s, own_rank, &hello)?;
    let answer: PeerLink = net::recv_control_exact(s, net::HANDSHAKE_TIMEOUT_MS)?;
    answer.check().map_err(|why| JobError::Peer { rank: peer, why })?;
    let (name, token) = match answer {
        PeerLink::Shm { name, token } if offered => (name, token),
        PeerLink::Shm { .. } => {
            return Err(JobError::Peer {
                rank: peer,
                why: "offered shared memory that was not asked for".into(),
            });
        }
        PeerLink::Tcp => {
            if offered {
                budget.give_back();
            }
            return Ok(None);
        }
    };
    match open(&name, &token, RING_BYTES) {
        Ok(ep) => {
            net::send_control(s, own_rank, &ShmAck { mapped: true })?;
            Ok(Some(ep))
        }
        Err(why) => {
            budget.give_back();
            tracing::warn!(rank = own_rank, peer, why, "cannot map the peer's segment; using TCP");
            net::send_control(s, own_rank, &ShmAck { mapped: false })?;
            Ok(None)
        }
    }
}

/// The accepting (lower) rank's side, after it read the peer's hello: when both want shared
/// memory and run on the same boot in the same network namespace, makes a segment, offers
/// it, and waits for the peer to map it; otherwise answers TCP. Failures as in [`dial`].
pub fn answer(
    s: &mut TcpStream,
    own_rank: u32,
    generation: u64,
    host: Option<&HostId>,
    hello: &PeerHello,
    budget: &Budget,
) -> Result<Option<Endpoint>, JobError> {
    let peer = hello.rank;
    hello.check().map_err(|why| JobError::Peer { rank: peer, why })?;
    let why_not = match (host, &hello.host) {
        _ if hello.generation != generation || hello.rank <= own_rank => Some("an unexpected hello"),
        (None, _) => Some("transport is tcp here"),
        (_, None) => Some("the peer asked for TCP"),
        (Some(a), Some(b)) if a.boot_id != b.boot_id => Some("another machine"),
        (Some(a), Some(b)) if a.netns != b.netns => Some("another network namespace"),
        _ => None,
    };
    if let Some(why) = why_not {
        tracing::debug!(rank = own_rank, peer, why, "no shared memory");
        net::send_control(s, own_rank, &PeerLink::Tcp)?;
        return Ok(None);
    }
    if !budget.take() {
        tracing::warn!(
            rank = own_rank,
            peer,
            links_max = SHM_LINKS_MAX,
            "too many shared-memory links; using TCP"
        );
        net::send_control(s, own_rank, &PeerLink::Tcp)?;
        return Ok(None);
    }
    let (ep, name, token) = match create(RING_BYTES) {
        Ok(made) => made,
        Err(why) => {
            budget.give_back();
            tracing::warn!(
                rank = own_rank,
                peer,
                why,
                "cannot make a shared-memory segment; using TCP"
            );
            net::send_control(s, own_rank, &PeerLink::Tcp)?;
            return Ok(None);
        }
    };
    // Whatever happens next, the name goes: once the peer has mapped the segment (or failed
    // to), nobody needs it, and nothing must be left in /dev/shm.
    let _unlink = Unlink(format!("{SHM_DIR}/{name}"));
    let mapped = net::send_control(s, own_rank, &PeerLink::Shm { name, token })
        .and_then(|()| net::recv_control_exact::<ShmAck>(s, net::HANDSHAKE_TIMEOUT_MS));
    match mapped {
        Ok(ShmAck { mapped: true }) => Ok(Some(ep)),
        Ok(ShmAck { mapped: false }) => {
            budget.give_back();
            tracing::warn!(rank = own_rank, peer, "the peer could not map the segment; using TCP");
            Ok(None)
        }
        Err(e) => {
            budget.give_back();
            Err(e)
        }
    }
}

/// Unlinks a segment's name on drop (a name already gone is fine: both sides unlink).
struct Unlink(String);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn random<const N: usize>() -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(b)
}

/// Makes a fresh segment (`O_EXCL`, mode 0600) under a random name, maps it and writes its
/// identity. The caller unlinks the name once the peer has mapped it.
fn create(ring_bytes: usize) -> Result<(Endpoint, String, [u8; TOKEN_BYTES]), String> {
    let suffix: String = random::<16>()?.iter().map(|b| format!("{b:02x}")).collect();
    let name = format!("{NAME_PREFIX}{}-{suffix}", std::process::id());
    let token = random::<TOKEN_BYTES>()?;
    let path = format!("{SHM_DIR}/{name}");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| format!("creating {path}: {e}"))?;
    let len = segment_bytes(ring_bytes);
    let mapped = f
        .set_len(len as u64)
        .and_then(|()| Mapping::new(Some(&f), len))
        .map_err(|e| {
            let _ = std::fs::remove_file(&path);
            format!("sizing and mapping {path}: {e}")
        })?;
    // SAFETY: the mapping is fresh, page-aligned and longer than an Identity; no other process
    // knows its name yet, so this is the only access.
    unsafe {
        mapped.ptr.as_ptr().cast::<Identity>().write(Identity {
            magic: MAGIC,
            version: LAYOUT_VERSION,
            _pad: 0,
            ring_bytes: ring_bytes as u64,
            token,
        });
    }
    Ok((Endpoint::new(mapped, ring_bytes, 0), name, token))
}

/// Opens and maps the segment the peer made, unlinks its name (both sides have it mapped
/// now, or this side gives up on it), and checks that it is a private file of ours of the
/// expected size carrying the expected identity and token.
fn open(name: &str, token: &[u8; TOKEN_BYTES], ring_bytes: usize) -> Result<Endpoint, String> {
    let valid_name = name.len() <= NAME_BYTES_MAX
        && name.starts_with(NAME_PREFIX)
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !valid_name {
        return Err(format!("refusing segment name {name:?}"));
    }
    let path = format!("{SHM_DIR}/{name}");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| format!("opening {path}: {e}"))?;
    let _unlink = Unlink(path.clone());
    let meta = f.metadata().map_err(|e| format!("stat {path}: {e}"))?;
    let len = segment_bytes(ring_bytes);
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if !meta.is_file() || meta.uid() != uid || meta.mode() & 0o077 != 0 || meta.len() != len as u64 {
        return Err(format!(
            "{path} is not a private segment of ours of {len} bytes (uid {}, mode {:o}, {} bytes)",
            meta.uid(),
            meta.mode() & 0o7777,
            meta.len()
        ));
    }
    let map = Mapping::new(Some(&f), len).map_err(|e| format!("mapping {path}: {e}"))?;
    // SAFETY: the mapping is page-aligned and longer than an Identity, every bit pattern is a
    // valid Identity, and the creator wrote it before sending us the name.
    let id = unsafe { map.ptr.as_ptr().cast::<Identity>().read() };
    if id.magic != MAGIC || id.version != LAYOUT_VERSION || id.ring_bytes != ring_bytes as u64 {
        return Err(format!(
            "{path} has layout {:?} version {} with {}-byte rings; expected {MAGIC:?} version {LAYOUT_VERSION} with {ring_bytes}",
            id.magic, id.version, id.ring_bytes
        ));
    }
    if id.token != *token {
        return Err(format!("{path} does not carry the token the peer sent"));
    }
    Ok(Endpoint::new(map, ring_bytes, 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn drain(rx: &mut Endpoint, out: &mut Vec<u8>, chunk: usize) -> usize {
        let mut buf = vec![0u8; chunk.max(1)];
        let n = rx.read(&mut buf).expect("read");
        out.extend_from_slice(&buf[..n]);
        n
    }

    #[test]
    fn an_empty_ring_reads_nothing_and_a_full_one_takes_nothing() {
        let (mut a, mut b) = Endpoint::pair(64).expect("pair");
        assert!(!b.readable());
        assert_eq!(b.read(&mut [0u8; 8]).expect("read"), 0);
        assert!(a.writable());
        assert_eq!(a.write(&[&[7u8; 100]]).expect("write"), 64, "only the ring's size fits");
        assert!(!a.writable());
        assert_eq!(a.write(&[&[1u8; 1]]).expect("write"), 0);
        assert!(b.readable());
        let mut got = Vec::new();
        assert_eq!(drain(&mut b, &mut got, 100), 64);
        assert_eq!(got, vec![7u8; 64]);
        assert!(a.writable() && !b.readable());
        // The other direction is independent.
        assert_eq!(b.write(&[&[9u8; 3]]).expect("write"), 3);
        let mut back = Vec::new();
        assert_eq!(drain(&mut a, &mut back, 10), 3);
        assert_eq!(back, vec![9u8; 3]);
    }

    #[test]
    fn bytes_wrap_around_the_end_of_the_ring() {
        let (mut a, mut b) = Endpoint::pair(16).expect("pair");
        let mut got = Vec::new();
        // Move the positions to 10, so the next write of 12 wraps.
        assert_eq!(a.write(&[&[0u8; 10]]).expect("write"), 10);
        assert_eq!(drain(&mut b, &mut got, 10), 10);
        let data: Vec<u8> = (1..=12).collect();
        assert_eq!(a.write(&[&data[..5], &data[5..]]).expect("write"), 12);
        got.clear();
        assert_eq!(drain(&mut b, &mut got, 64), 12);
        assert_eq!(got, data);
        // And peek stops at the wrap.
        assert_eq!(a.write(&[&data]).expect("write"), 12);
        let first = b.peek(64).expect("peek").to_vec();
        assert_eq!(first, data[..10], "bytes up to the end of the ring (positions 22..32)");
        b.consume(first.len());
        assert_eq!(b.peek(64).expect("peek"), &data[10..]);
    }

    #[test]
    fn a_frame_larger_than_the_ring_streams_through_it() {
        let (mut a, mut b) = Endpoint::pair(256).expect("pair");
        let frame: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (mut sent, mut got) = (0, Vec::new());
        while got.len() < frame.len() {
            sent += a.write(&[&frame[sent..]]).expect("write");
            drain(&mut b, &mut got, 97);
        }
        assert_eq!(got, frame);
    }

    #[test]
    fn a_head_beyond_the_ring_is_corruption_not_a_wild_read() {
        let (_a, mut b) = Endpoint::pair(64).expect("pair");
        b.ctl().head[0].0.store(65, Ordering::Release);
        let e = b.read(&mut [0u8; 8]).expect_err("corrupt");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    #[test]
    fn a_sleeper_is_woken_through_its_futex_or_asked_for_a_doorbell() {
        let (mut a, b) = Endpoint::pair(64).expect("pair");
        // Awake: nothing to do.
        assert_eq!(a.notify(), Wake::Nothing);
        let seen = b.arm(SLEEP_FUTEX);
        assert_eq!(a.write(&[&[1]]).expect("write"), 1);
        assert_eq!(a.notify(), Wake::Nothing);
        assert_ne!(b.bell().load(Ordering::SeqCst), seen, "the waker bumps the bell");
        // The wait returns at once: the word changed.
        futex_wait(b.bell(), seen, Duration::from_secs(10)).expect("futex");
        b.arm(SLEEP_POLL);
        assert_eq!(a.notify(), Wake::Doorbell);
        assert_eq!(a.notify(), Wake::Nothing, "one doorbell per sleep");
    }

    #[test]
    fn a_futex_sleeper_in_another_thread_wakes_when_bytes_arrive() {
        let (mut a, mut b) = Endpoint::pair(64).expect("pair");
        let sleeper = std::thread::spawn(move || {
            let mut got = [0u8; 1];
            loop {
                let v = b.arm(SLEEP_FUTEX);
                if b.readable() {
                    b.disarm();
                    assert_eq!(b.read(&mut got).expect("read"), 1);
                    return got[0];
                }
                futex_waitv(&[(b.bell(), v)], Duration::from_secs(30)).expect("futex_waitv");
            }
        });
        assert_eq!(a.write(&[&[42]]).expect("write"), 1);
        a.notify();
        assert_eq!(sleeper.join().expect("sleeper"), 42);
    }

    #[test]
    fn a_segment_is_private_checked_on_open_and_unlinked() {
        let (_a, name, token) = create(64).expect("create");
        let path = format!("{SHM_DIR}/{name}");
        let meta = std::fs::metadata(&path).expect("the name exists until the peer opens it");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_ne!(token, [0; TOKEN_BYTES], "a random token");
        let e = open(&name, &[0; TOKEN_BYTES], 64)
            .err()
            .expect("a wrong token is refused");
        assert!(e.contains("token"), "{e}");
        assert!(std::fs::metadata(&path).is_err(), "a refused segment is unlinked too");

        let (_a, name, token) = create(64).expect("create");
        let e = open(&name, &token, 128).err().expect("a wrong ring size is refused");
        assert!(e.contains("bytes"), "{e}");

        let (mut a, name, token) = create(64).expect("create");
        let mut b = open(&name, &token, 64).expect("open");
        assert!(
            std::fs::metadata(format!("{SHM_DIR}/{name}")).is_err(),
            "open unlinks the name"
        );
        assert_eq!(a.write(&[b"hel", b"lo"]).expect("write"), 5);
        let mut got = [0u8; 5];
        assert_eq!(b.read(&mut got).expect("read"), 5);
        assert_eq!(&got, b"hello");

        for bad in ["../../etc/passwd", "sinter-1/../x", "other-name"] {
            assert!(
                open(bad, &token, 64).err().expect("refused").contains("refusing"),
                "{bad}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random chunked writes (vectored) and reads through a small ring deliver every byte in order.
        #[test]
        fn chunked_writes_and_reads_preserve_the_stream(
            ring_log2 in 2u32..9,
            data in proptest::collection::vec(any::<u8>(), 0..4000),
            writes in proptest::collection::vec(1usize..300, 1..50),
            reads in proptest::collection::vec(1usize..300, 1..50),
            peek in any::<bool>(),
        ) {
            let (mut a, mut b) = Endpoint::pair(1 << ring_log2).expect("pair");
            let (mut sent, mut got) = (0usize, Vec::with_capacity(data.len()));
            let mut i = 0usize;
            while got.len() < data.len() {
                let w = writes[i % writes.len()].min(data.len() - sent);
                let split = w / 2;
                sent += a.write(&[&data[sent..sent + split], &data[sent + split..sent + w]]).expect("write");
                let r = reads[i % reads.len()];
                if peek {
                    let s = b.peek(r).expect("peek").to_vec();
                    b.consume(s.len());
                    got.extend_from_slice(&s);
                } else {
                    drain(&mut b, &mut got, r);
                }
                i += 1;
                prop_assert!(i < 1_000_000, "no progress");
            }
            prop_assert_eq!(got, data);
        }
    }
}
