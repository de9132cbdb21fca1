#!/usr/bin/env python3
"""Connection flood against every listening TCP port of one process tree (issue 16).

Finds the TCP ports in LISTEN state owned by the process `--pid` and all its
descendants (the ppid field of /proc/*/stat; /proc/<pid>/task/*/children when
the kernel has it), by matching the inodes of /proc/<pid>/net/tcp and tcp6
(state 0A) against the `socket:[inode]` links in each process's /proc/<pid>/fd/.
It rescans every 0.2 s (every 2 ms during the first `--fast-scan-s`
seconds), so a port that appears later (a server started after the
coordinator, a worker's peer listener) is flooded from its first scan on, and
a port that disappears is dropped.

It opens `--rate` connections per second for `--seconds`, always to 127.0.0.1,
only to ports of that tree (listeners on 127.0.0.1, 0.0.0.0, :: or
::ffff:127.0.0.1; any other listener is listed under `skipped` and never
touched), spread round robin over the ports. Each connection does one of, in
turn:

- `close`: close as soon as it is connected;
- `junk`: send 64 random bytes, close;
- `hold`: send nothing, hold it open up to 2 s;
- `stall`: send a 32-byte frame header that passes every check but one
  (alternately the magic `SNTX`, or an `Auth` frame claiming a 4 GiB payload;
  the header crc32c is valid in both) and hold it open up to 2 s;
- `read`: read what the peer sends for up to 1 s, close.

At most 500 connections are held (`hold` and `stall`) at once; a new one past
that closes the oldest. Everything is nonblocking sockets on one thread
(epoll through `selectors`).

A connection slot that falls due while the tree has no listening port is
counted in `slots_without_port` and not attempted; `achieved_rate` is what was
attempted over the whole duration, `achieved_rate_with_ports` over the time
at least one port was known. A connect that has not completed after 2 s
(a full accept queue drops SYNs) is closed and counted in `connect_timeout`.

It stops at the deadline, when the root process has exited (or is a zombie),
or on SIGINT/SIGTERM, and prints one JSON line on stdout: the totals, the
achieved rate, attempts in each second (`per_second`), what each kind of
connection met (`modes`: connected, closed first by the peer and after how
long on average, reset, closed by us at its deadline, evicted, bytes read) and
the same counts per port with the owner's PID and role (`ports`). Found ports
and problems go to stderr.

Standard library only. Linux only (/proc, epoll).
"""

import argparse
import collections
import errno
import heapq
import json
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import time

SCAN_EVERY_S = 0.2
FAST_SCAN_EVERY_S = 0.002
HOLD_S = 2.0
READ_S = 1.0
CONNECT_TIMEOUT_S = 2.0
HELD_MAX = 500
# The most slots issued in one pass of the loop: a late loop catches up in
# bursts of at most this many rather than in one burst of thousands.
BURST_MAX = 200
RECV_BYTES = 4096
MODES = ("close", "junk", "hold", "stall", "read")
HEADER_BYTES = 32
PROTOCOL_VERSION = 3  # crates/wire/src/header.rs
MESSAGE_AUTH = 3


def _crc32c_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def frame_header(magic, kind, payload_bytes, tag, sender):
    """A 32-byte header in the layout of crates/wire/src/header.rs, header crc included."""
    head = magic + struct.pack("<BBHQIII", PROTOCOL_VERSION, kind, 0, tag, sender, payload_bytes, 0)
    assert len(head) == HEADER_BYTES - 4
    return head + struct.pack("<I", crc32c(head))


# Two stalling headers, each wrong in exactly one way.
STALL_HEADERS = (
    frame_header(b"SNTX", MESSAGE_AUTH, 64, 1, 0),  # wrong magic
    frame_header(b"SNTR", MESSAGE_AUTH, 0xFFFFFFF0, 1, 0),  # huge length
)


# ---------------------------------------------------------------- /proc


def proc_state(pid):
    """The state letter of /proc/<pid>/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3].decode()


def tree_pids(root):
    """The root and all its live descendants."""
    children = collections.defaultdict(list)
    task_dir = f"/proc/{root}/task"
    use_children_files = False
    try:
        tids = os.listdir(task_dir)
        use_children_files = bool(tids) and os.path.exists(f"{task_dir}/{tids[0]}/children")
    except OSError:
        return []
    if not use_children_files:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if fields[0] == b"Z":
                continue
            children[int(fields[1])].append(int(entry))
    seen = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        if use_children_files:
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
            except OSError:
                continue
        else:
            todo.extend(children.get(pid, ()))
    return seen


def socket_inodes(pid):
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return inodes
    for fd in fds:
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def _v4(hex_addr):
    return socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(hex_addr, 16)))


def _v6(hex_addr):
    words = [struct.pack("<I", int(hex_addr[i : i + 8], 16)) for i in range(0, 32, 8)]
    return socket.inet_ntop(socket.AF_INET6, b"".join(words))


def listeners(pid):
    """(local address, port, inode) of every socket in LISTEN state in pid's network namespace."""
    out = []
    for name, decode in (("tcp", _v4), ("tcp6", _v6)):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":
                continue
            addr, port = fields[1].split(":")
            out.append((decode(addr), int(port, 16), int(fields[9])))
    return out


REACHABLE_ON_LOOPBACK = {"127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1"}


def role_of(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    return argv[1].decode(errors="replace") if len(argv) > 1 and argv[1] else "?"


def scan(root):
    """{port: (pid, local address)} of the tree's listeners reachable on 127.0.0.1, and the others."""
    pids = tree_pids(root)
    owner = {}
    for pid in pids:
        for inode in socket_inodes(pid):
            owner[inode] = pid
    ports, skipped = {}, {}
    if not pids:
        return ports, skipped, pids
    for addr, port, inode in listeners(pids[0]):
        pid = owner.get(inode)
        if pid is None:
            continue
        if addr in REACHABLE_ON_LOOPBACK:
            ports[port] = (pid, addr)
        else:
            skipped[port] = (pid, addr)
    return ports, skipped, pids


# ---------------------------------------------------------------- flood


class Conn:
    __slots__ = ("sock", "port", "mode", "state", "opened", "deadline", "bytes_in")

    def __init__(self, sock, port, mode, now):
        self.sock = sock
        self.port = port
        self.mode = mode
        self.state = "connecting"
        self.opened = now
        self.deadline = now + CONNECT_TIMEOUT_S
        self.bytes_in = 0


def new_port_stats(pid, addr, role, seen_s):
    return {
        "pid": pid,
        "role": role,
        "addr": addr,
        "first_seen_s": round(seen_s, 3),
        "last_seen_s": round(seen_s, 3),
        "first_attempt_s": None,
        "attempted": 0,
        "connected": 0,
        "refused": 0,
        "refused_first_s": None,
        "connect_timeout": 0,
        "errors": 0,
        "peer_closed": 0,
        "peer_reset": 0,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pid", type=int, required=True, help="root of the process tree to flood")
    ap.add_argument("--rate", type=float, default=1000.0, help="connections per second (default 1000)")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long (default 60)")
    ap.add_argument("--progress", action="store_true", help="one stderr line per second")
    ap.add_argument("--fast-scan-s", type=float, default=0.0,
                    help="rescan every 2 ms instead of 0.2 s for this many seconds after the start, to catch a "
                         "rendezvous that is over within milliseconds (costs most of a core meanwhile; default 0)")
    args = ap.parse_args()
    assert args.rate > 0 and args.seconds > 0

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    stop = {"why": None}

    def on_signal(signum, _frame):
        stop["why"] = "signal"

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    sel = selectors.DefaultSelector()
    conns = {}  # fd -> Conn
    timers = []  # heap of (deadline, sequence number, Conn)
    held = collections.deque()  # Conns in hold/stall, oldest first (may hold closed ones)
    held_open = 0
    held_max_seen = 0

    totals = collections.Counter()
    errors = collections.Counter()
    modes = {m: collections.Counter() for m in MODES}
    port_stats = {}
    skipped_seen = {}
    per_second = collections.Counter()
    ports_live = []
    rr_port = 0
    slot_count = 0
    with_ports_s = 0.0
    lag_max_s = 0.0
    stall_turn = 0
    timer_seq = 0
    scans = 0
    progress_at = 1.0

    print(f"flood: watching pid {args.pid}, {args.rate:g} connections/s for {args.seconds:g} s", file=sys.stderr,
          flush=True)
    started_unix_s = time.time()
    start = time.monotonic()
    deadline = start + args.seconds
    next_scan = start
    last_tick = start
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    def close(conn, outcome=None):
        nonlocal held_open
        fd = conn.sock.fileno()
        if conn.state in ("connecting", "held", "reading"):
            try:
                sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        if conn.state == "held":
            held_open -= 1
        if outcome:
            modes[conn.mode][outcome] += 1
        conn.state = "closed"
        conns.pop(fd, None)
        conn.sock.close()

    def push_timer(conn):
        nonlocal timer_seq
        timer_seq += 1
        heapq.heappush(timers, (conn.deadline, timer_seq, conn))

    def connected(conn, now):
        nonlocal held_open, held_max_seen, stall_turn
        ps = port_stats[conn.port]
        ps["connected"] += 1
        totals["connected"] += 1
        modes[conn.mode]["connected"] += 1
        try:
            if conn.mode == "close":
                close(conn)
                return
            if conn.mode == "junk":
                conn.sock.send(os.urandom(64))
                close(conn)
                return
            if conn.mode == "stall":
                conn.sock.send(STALL_HEADERS[stall_turn % 2])
                stall_turn += 1
        except (BrokenPipeError, ConnectionResetError):
            ps["peer_reset"] += 1
            close(conn, "peer_reset")
            return
        if conn.mode == "read":
            conn.state = "reading"
            conn.deadline = now + READ_S
        else:
            conn.state = "held"
            conn.deadline = now + HOLD_S
            held.append(conn)
            held_open += 1
            while held_open > HELD_MAX:
                old = held.popleft()
                if old.state == "held":
                    close(old, "evicted")
            held_max_seen = max(held_max_seen, held_open)
        sel.modify(conn.sock, selectors.EVENT_READ, conn)
        push_timer(conn)

    def attempt(port, now):
        ps = port_stats[port]
        mode = MODES[totals["attempted"] % len(MODES)]
        totals["attempted"] += 1
        ps["attempted"] += 1
        modes[mode]["attempted"] += 1
        per_second[int(now - start)] += 1
        if ps["first_attempt_s"] is None:
            ps["first_attempt_s"] = round(now - start, 3)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            errors[errno.errorcode.get(e.errno, str(e.errno))] += 1
            totals["errors"] += 1
            ps["errors"] += 1
            return
        sock.setblocking(False)
        rc = sock.connect_ex(("127.0.0.1", port))
        conn = Conn(sock, port, mode, now)
        conns[sock.fileno()] = conn
        if rc == 0:
            sel.register(sock, selectors.EVENT_WRITE, conn)
            connected(conn, now)
        elif rc == errno.EINPROGRESS:
            sel.register(sock, selectors.EVENT_WRITE, conn)
            push_timer(conn)
        else:
            failed(conn, rc)

    def failed(conn, rc):
        ps = port_stats[conn.port]
        if rc == errno.ECONNREFUSED:
            totals["refused"] += 1
            ps["refused"] += 1
            if ps["refused_first_s"] is None:
                ps["refused_first_s"] = round(time.monotonic() - start, 3)
            close(conn, "refused")
        else:
            errors[errno.errorcode.get(rc, str(rc))] += 1
            totals["errors"] += 1
            ps["errors"] += 1
            close(conn, "error")

    def readable(conn, now):
        ps = port_stats[conn.port]
        try:
            data = conn.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except ConnectionResetError:
            ps["peer_reset"] += 1
            close(conn, "peer_reset")
            return
        if not data:
            ps["peer_closed"] += 1
            modes[conn.mode]["peer_closed_after_ms_sum"] += int((now - conn.opened) * 1000)
            close(conn, "peer_closed")
            return
        conn.bytes_in += len(data)
        modes[conn.mode]["bytes_received"] += len(data)

    while True:
        now = time.monotonic()
        if stop["why"]:
            break
        if now >= deadline:
            stop["why"] = "deadline"
            break
        if now >= next_scan:
            if proc_state(args.pid) in (None, "Z", "X"):
                stop["why"] = "tree_exited"
                break
            found, skipped, _ = scan(args.pid)
            for port, (pid, addr) in found.items():
                if port not in port_stats or port_stats[port]["pid"] != pid:
                    if port in port_stats:  # the same port number, a new owner: keep both apart
                        port_stats[f"{port}@{port_stats[port]['pid']}"] = port_stats.pop(port)
                    port_stats[port] = new_port_stats(pid, addr, role_of(pid), now - start)
                    print(f"flood: +{now - start:.2f}s port {port} ({port_stats[port]['role']}, pid {pid})",
                          file=sys.stderr)
                port_stats[port]["last_seen_s"] = round(now - start, 3)
            for port, (pid, addr) in skipped.items():
                skipped_seen[port] = {"pid": pid, "addr": addr, "role": role_of(pid)}
            ports_live = sorted(found)
            next_scan = now + (FAST_SCAN_EVERY_S if now - start < args.fast_scan_s else SCAN_EVERY_S)
            scans += 1

        # Connection slots due by now.
        due = int((now - start) * args.rate) - slot_count
        lag_max_s = max(lag_max_s, due / args.rate if due > 1 else 0.0)
        for _ in range(min(due, BURST_MAX)):
            slot_count += 1
            if not ports_live:
                totals["slots_without_port"] += 1
                continue
            rr_port = (rr_port + 1) % len(ports_live)
            attempt(ports_live[rr_port], now)
        if ports_live:
            with_ports_s += now - last_tick
        last_tick = now

        # Deadlines: connects that did not complete, holds and reads that are over.
        while timers and timers[0][0] <= now:
            _, _, conn = heapq.heappop(timers)
            if conn.state == "closed" or conn.deadline > now:
                continue
            if conn.state == "connecting":
                totals["connect_timeout"] += 1
                port_stats[conn.port]["connect_timeout"] += 1
                close(conn, "connect_timeout")
            else:
                close(conn, "closed_by_us")

        next_slot = start + (slot_count + 1) / args.rate
        wake = min(next_slot, next_scan, deadline, timers[0][0] if timers else deadline)
        for key, _ in sel.select(max(0.0, wake - time.monotonic())):
            conn = key.data
            if conn.state == "closed":
                continue
            now = time.monotonic()
            if conn.state == "connecting":
                rc = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if rc == 0:
                    connected(conn, now)
                else:
                    failed(conn, rc)
            else:
                readable(conn, now)

        while held and held[0].state != "held":
            held.popleft()
        if args.progress and now - start >= progress_at:
            progress_at += 1.0
            print(f"flood: +{now - start:.0f}s attempted {totals['attempted']} connected {totals['connected']}"
                  f" refused {totals['refused']} timeouts {totals['connect_timeout']} open {len(conns)}"
                  f" ports {ports_live}", file=sys.stderr)

    end = time.monotonic()
    for conn in list(conns.values()):
        close(conn, "open_at_end")
    duration = end - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    full_seconds = [per_second.get(s, 0) for s in range(int(duration))]
    # The first second with a port is partial (ports appear during it); leave it out of min and max.
    first = next((i for i, n in enumerate(full_seconds) if n > 0), len(full_seconds))
    busy_seconds = full_seconds[first + 1 :]
    mode_out = {}
    for m, c in modes.items():
        d = dict(c)
        closed = d.get("peer_closed", 0)
        if closed:
            d["peer_closed_after_ms_mean"] = round(d.pop("peer_closed_after_ms_sum") / closed, 1)
        mode_out[m] = d
    result = {
        "event": "flood",
        "pid": args.pid,
        "rate_target": args.rate,
        "seconds_target": args.seconds,
        "stopped_by": stop["why"],
        "started_unix_s": round(started_unix_s, 3),
        "fast_scan_s": args.fast_scan_s,
        "scans": scans,
        "duration_s": round(duration, 3),
        "attempted": totals["attempted"],
        "connected": totals["connected"],
        "refused": totals["refused"],
        "connect_timeout": totals["connect_timeout"],
        "errors": totals["errors"],
        "error_kinds": dict(errors),
        "slots_without_port": totals["slots_without_port"],
        "achieved_rate": round(totals["attempted"] / duration, 1) if duration > 0 else 0.0,
        "seconds_with_ports": round(with_ports_s, 3),
        "achieved_rate_with_ports": round(totals["attempted"] / with_ports_s, 1) if with_ports_s > 0 else 0.0,
        "per_second_min": min(busy_seconds) if busy_seconds else 0,
        "per_second_max": max(busy_seconds) if busy_seconds else 0,
        "per_second": full_seconds,
        "loop_lag_max_ms": round(lag_max_s * 1000, 1),
        "held_max": held_max_seen,
        "modes": mode_out,
        "ports": {str(p): s for p, s in sorted(port_stats.items(), key=lambda kv: str(kv[0]))},
        "skipped": {str(p): s for p, s in skipped_seen.items()},
        "cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 3),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
