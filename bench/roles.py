"""The benchmark's helper processes: echo upstream, load generator, bare forwarder, link emulators.

Each runs as ``python3 bench/bench.py --role NAME [ARGS]`` in a process of its own
(own GIL), prints one JSON line when it is ready ({"port": ...} or {"pid": ...}),
and ends when its stdin closes (the harness has gone).  The load generator also
takes its commands as JSON lines on stdin and answers each with one JSON line.

Every datagram the load generator sends carries a header::

    0      4          12          20
    +------+----------+-----------+---------- - -
    |phase | sequence | send time | padding to the datagram size
    +------+----------+-----------+---------- - -
     u32    u32        u64 monotonic ns (big-endian)

so latency comes from the echo itself, and stragglers of an earlier phase
(another phase id) are ignored.
"""

import json
import os
import select
import selectors
import socket
import struct
import sys
import time

import procfs
from params import HOST, LOSS_TIMEOUT_S, TESTS

PAYLOAD_HEADER = struct.Struct("!IIQ")  # phase, sequence number, send time (monotonic ns)
NEVER = 1 << 62  # a sequence number no phase reaches


def stdin_closed():
    """True when the harness has gone (EOF on stdin); call only when stdin is readable."""
    try:
        return not os.read(sys.stdin.fileno(), 4096)
    except OSError:
        return True


def udp_socket(buffer_bytes=1 << 20):
    """A non-blocking UDP socket on HOST, any port, with large buffers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, buffer_bytes)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    return sock


# ============================================================================
# Echo upstream
# ============================================================================


def role_echo():
    """Send every datagram back to where it came from; select() only when the socket is empty."""
    sock = udp_socket()
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    buf = bytearray(65536)
    view = memoryview(buf)
    recvfrom_into, sendto = sock.recvfrom_into, sock.sendto
    watch = [sock, sys.stdin]
    while True:
        try:
            n, addr = recvfrom_into(buf)
        except BlockingIOError:
            readable = select.select(watch, [], [])[0]
            if sys.stdin in readable and stdin_closed():
                return
            continue
        except OSError:
            continue
        try:
            sendto(view[:n], addr)
        except OSError:
            pass


# ============================================================================
# Load generator
# ============================================================================


def percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list, or None if it is empty."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


def latency_summary(rtts_ns):
    """{n, p50_ms, p90_ms, p99_ms, min_ms, max_ms} of round-trip times in ns (sorts them)."""
    rtts_ns.sort()
    if not rtts_ns:
        return {"n": 0}
    return {"n": len(rtts_ns), "p50_ms": percentile(rtts_ns, 0.5) / 1e6, "p90_ms": percentile(rtts_ns, 0.9) / 1e6,
            "p99_ms": percentile(rtts_ns, 0.99) / 1e6, "min_ms": rtts_ns[0] / 1e6, "max_ms": rtts_ns[-1] / 1e6}


class Echoes(object):
    """What came back in one phase.  Each sequence number is taken once (a later copy is a
    duplicate, not delivered); an echo is *counted* (received, RTT) while `counting` is on
    and its sequence number is within first..last.  `highest` is the highest sequence
    number echoed; `resumed_at`, the arrival (monotonic s) of the first echo that ended a
    silence of `gap` s once `after` s had passed since `start` (the failover figures)."""

    def __init__(self, phase, size, arrivals=False, gap=None, after=0.0, start=0.0):
        self.phase, self.size = phase, size
        self.seen = bytearray(1 << 12)  # seen[s]: echo s has arrived (grown as needed)
        self.counting = True
        self.first, self.last = 0, NEVER
        self.highest = self.received = self.duplicates = 0
        self.rtts = []
        self.arrivals = [] if arrivals else None
        self.gap, self.resume_after = gap, start + after
        self.last_rx = self.resumed_at = None

    def take(self, buf, n, now_ns):
        """Account for one datagram of `n` bytes in `buf` that arrived at `now_ns`."""
        phase, s, sent_ns = PAYLOAD_HEADER.unpack_from(buf)
        if phase != self.phase or n != self.size:
            return
        seen = self.seen
        while s >= len(seen):
            seen.extend(bytes(len(seen)))
        if seen[s]:
            self.duplicates += 1
            return
        seen[s] = 1
        if s > self.highest:
            self.highest = s
        if self.arrivals is not None or self.gap is not None:
            self._note_arrival(now_ns / 1e9)
        if self.counting and self.first <= s <= self.last:
            self.received += 1
            self.rtts.append(now_ns - sent_ns)

    def _note_arrival(self, now):
        if self.arrivals is not None:
            self.arrivals.append(now)
        if (self.gap is not None and self.resumed_at is None and self.last_rx is not None
                and now - self.last_rx >= self.gap and now >= self.resume_after):
            self.resumed_at = now
        self.last_rx = now


class LoadGen(object):
    """One socket for every command, so a relay that answers only the first address it
    saw (the Go original's client) answers it in every phase.  Runs one command at a time."""

    def __init__(self):
        self.sock = udp_socket()
        self.rbuf = bytearray(65536)
        self.sink = Echoes(phase=None, size=None)  # takes nothing: for reads that only drain

    def receive(self, echoes, timeout):
        """The one receive loop: wait up to `timeout` s for a datagram unless one is waiting,
        then read until the socket is empty, handing each to `echoes`.  Returns how many."""
        sock, rbuf, take = self.sock, self.rbuf, echoes.take
        recv_into, clock_ns = sock.recv_into, time.monotonic_ns  # local aliases: this loop runs per datagram
        got = 0
        while True:
            try:
                n = recv_into(rbuf)
            except BlockingIOError:
                if got or timeout <= 0 or not select.select([sock], [], [], timeout)[0]:
                    return got
                timeout = 0
                continue
            except OSError:
                continue
            got += 1
            take(rbuf, n, clock_ns())

    def drain(self, seconds, echoes=None):
        """Read for `seconds` (echoes still in flight), into `echoes` or dropped."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            self.receive(echoes or self.sink, left)

    def send(self, buf, phase, seq, target):
        """Stamp and send datagram `seq`; False if the socket refused it."""
        PAYLOAD_HEADER.pack_into(buf, 0, phase, seq, time.monotonic_ns())
        try:
            self.sock.sendto(buf, target)
        except OSError:
            return False
        return True

    def saturate(self, cmd):
        """Keep `window` datagrams in flight, counted as TCP counts bytes in flight: sent minus
        the highest sequence number echoed (the path keeps order), so a lost datagram frees
        its slot as soon as a later one comes back; 100 ms of silence frees them all."""
        target, size, window, phase = tuple(cmd["target"]), cmd["size"], cmd["window"], cmd["phase"]
        pids = dict(cmd.get("pids", {}), loadgen=os.getpid())
        echoes = Echoes(phase, size)
        echoes.counting = False
        buf = bytearray(size)
        clock = time.monotonic
        measure_at = clock() + cmd["warmup"]
        end_at = measure_at + cmd["duration"]
        seq = acked = send_errors = timeouts = acked_at_start = 0
        cpu0 = t0 = None
        while True:
            while seq - acked < window:
                if not self.send(buf, phase, seq + 1, target):
                    send_errors += 1
                    break
                seq += 1
            if not self.receive(echoes, LOSS_TIMEOUT_S):
                timeouts += 1
                acked = seq  # everything in flight is presumed lost
            acked = max(acked, echoes.highest)
            now = clock()
            if cpu0 is None and now >= measure_at:
                cpu0, t0 = procfs.cpu_snapshot(pids), now
                acked_at_start, echoes.counting = acked, True
                end_at = now + cmd["duration"]
            elif now >= end_at:
                break
        t1 = clock()
        cpu1 = procfs.cpu_snapshot(pids)
        echoes.counting = False
        rss = {name: procfs.proc_status_kb(pid, "VmRSS") for name, pid in pids.items()}
        self.drain(0.15, echoes)
        seconds = t1 - t0
        received = echoes.received
        return {"sent": seq, "received": received, "lost": max(0, acked - acked_at_start - received),
                "timeouts": timeouts, "send_errors": send_errors, "duplicates": echoes.duplicates,
                "seconds": seconds, "pps": received / seconds if seconds else 0.0,
                "mbps": received * size * 8 / seconds / 1e6 if seconds else 0.0,
                "latency": latency_summary(echoes.rtts), "cpu": procfs.cpu_delta(cpu0, cpu1), "rss_kb": rss,
                "rcvbuf": self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}

    def rate(self, cmd):
        """Open loop at cmd["rate"] pps.  Optional: "arrivals" (return every echo's arrival
        time), "stop_after_resume" {"gap", "extra", "after"}: stop `extra` s after the first
        echo that ends a gap >= `gap` s (only gaps ending `after` s past the start count)."""
        target, size, phase = tuple(cmd["target"]), cmd["size"], cmd["phase"]
        pids = dict(cmd.get("pids", {}), loadgen=os.getpid())
        interval = 1.0 / cmd["rate"]
        resume = cmd.get("stop_after_resume") or {}
        clock = time.monotonic
        start = clock()
        echoes = Echoes(phase, size, arrivals=cmd.get("arrivals", False), gap=resume.get("gap"),
                        after=resume.get("after", 0.0), start=start)
        echoes.first = NEVER  # counted: the datagrams sent in the measured window, set below
        buf = bytearray(size)
        measure_at = start + cmd.get("warmup", 0.0)
        end_at = stop_at = measure_at + cmd["duration"]
        next_send = start
        seq = in_window = 0
        cpu0 = t0 = None
        wait = 0.0
        while True:
            self.receive(echoes, wait)  # everything waiting first, so sends do not delay arrival times
            now = clock()
            if cpu0 is None and now >= measure_at:
                cpu0, t0 = procfs.cpu_snapshot(pids), now
            if echoes.resumed_at is not None:
                stop_at = min(end_at, echoes.resumed_at + resume["extra"])
            if now >= stop_at:
                break
            if now < next_send:
                wait = min(next_send, stop_at) - now
                continue
            if now - next_send > 0.05:
                next_send = now  # a long stall: do not burst more than 50 ms worth
            seq += 1
            self.send(buf, phase, seq, target)
            if now >= measure_at:
                if echoes.first == NEVER:
                    echoes.first = seq
                in_window += 1
            next_send += interval
            wait = 0.0
        t1 = clock()
        echoes.last = seq
        cpu1 = procfs.cpu_snapshot(pids)
        rss = {name: procfs.proc_status_kb(pid, "VmRSS") for name, pid in pids.items()}
        # Late echoes of the window's last datagrams count as delivered (for loss, not pps).
        seconds = t1 - t0 if t0 is not None else 0.0
        delivered_pps = echoes.received / seconds if seconds > 0 else 0.0
        arrivals = echoes.arrivals
        self.drain(0.2, echoes)
        received = echoes.received
        result = {"sent": in_window, "sent_total": seq, "received": received, "duplicates": echoes.duplicates,
                  "lost": max(0, in_window - received),
                  "loss": (1.0 - received / float(in_window)) if in_window else None,
                  "seconds": seconds, "pps": delivered_pps, "mbps": delivered_pps * size * 8 / 1e6,
                  "start": start, "stop": t1, "latency": latency_summary(echoes.rtts),
                  "cpu": procfs.cpu_delta(cpu0, cpu1) if cpu0 else {}, "rss_kb": rss}
        if arrivals is not None:
            result["arrivals"] = [t for t in arrivals if t <= t1]
        return result

    def first_echo(self, cmd):
        """Send one datagram every `interval` s until the first echo; its arrival time."""
        target, phase = tuple(cmd["target"]), cmd["phase"]
        buf = bytearray(cmd["size"])
        echoes = Echoes(phase, cmd["size"], arrivals=True)
        deadline = time.monotonic() + cmd["timeout"]
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            self.send(buf, phase, seq, target)
            self.receive(echoes, cmd["interval"])
            if echoes.arrivals:
                self.drain(0.05)
                return {"first": echoes.arrivals[0], "sent": seq}
        return {"first": None, "sent": seq}


def role_loadgen():
    """Answer each JSON command on stdin ({"cmd": "saturate" | "rate" | "first_echo", ...})."""
    gen = LoadGen()
    print(json.dumps({"pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            result = getattr(gen, cmd["cmd"])(cmd)
        except Exception as exc:  # report, do not die: the harness decides
            result = {"error": "%s: %s" % (type(exc).__name__, exc)}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


# ============================================================================
# Bare forwarder (one hop of the floor)
# ============================================================================


def role_forward(target_port):
    """One hop of the floor: what an mpudp process does per packet minus the protocol
    (no header, MAC, replay window, sessions or timers).  Datagrams from the listen
    socket go to the target from a connected socket, its replies to the last sender;
    the same loop shape as mpudp's reactor (selectors, each socket drained until EAGAIN)
    and the same socket buffer size."""
    listen = udp_socket()  # mpudp's socket buffers too (1 MiB asked), so a burst fits
    upstream = udp_socket()
    upstream.connect((HOST, target_port))
    buf = bytearray(65536)
    view = memoryview(buf)
    sender = [None]  # the last address a datagram came from: where replies go

    def forward():
        while True:
            try:
                n, sender[0] = listen.recvfrom_into(buf)
            except BlockingIOError:
                return
            except OSError:
                continue
            try:
                upstream.send(view[:n])
            except OSError:
                pass

    def reply():
        while True:
            try:
                n = upstream.recv_into(buf)
            except BlockingIOError:
                return
            except OSError:
                continue
            try:
                listen.sendto(view[:n], sender[0])
            except OSError:
                pass

    selector = selectors.DefaultSelector()
    selector.register(listen, selectors.EVENT_READ, forward)
    selector.register(upstream, selectors.EVENT_READ, reply)
    selector.register(sys.stdin, selectors.EVENT_READ, None)
    print(json.dumps({"port": listen.getsockname()[1]}), flush=True)
    while True:
        for key, _events in selector.select():
            if key.data is not None:
                key.data()
            elif stdin_closed():
                return


# ============================================================================
# Link emulators (failover and restart)
# ============================================================================


def role_links(target_port, count):
    """`count` tests/linkemu.py LinkEmulators to `target_port`, steered by JSON on stdin:
    {"cmd": "blackhole", "link": i, "on": bool} and {"cmd": "counters"}."""
    sys.path.insert(0, TESTS)
    from linkemu import LinkEmulator
    links = [LinkEmulator((HOST, target_port), listen=(HOST, 0), seed=i).start() for i in range(count)]
    print(json.dumps({"ports": [link.address[1] for link in links]}), flush=True)
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "blackhole":
                links[cmd["link"]].set(blackhole=cmd["on"])
                reply = {"ok": True}
            elif cmd["cmd"] == "counters":
                reply = {"counters": [link.counters for link in links]}
            else:
                reply = {"error": "unknown command"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        for link in links:
            link.close()


ROLES = {"echo": lambda args: role_echo(), "loadgen": lambda args: role_loadgen(),
         "forward": lambda args: role_forward(int(args[0])),
         "links": lambda args: role_links(int(args[0]), int(args[1]))}
