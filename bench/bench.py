#!/usr/bin/env python3
"""End-to-end benchmark of mpudp: separate processes on loopback, the direct path beside it.

    python3 bench/bench.py                 # about 2 minutes; prints a table
    python3 bench/bench.py --json          # the same run, JSON on stdout
    python3 bench/bench.py --quick --json  # a smoke run of a few seconds (tests/test_bench_smoke.py)
    python3 bench/bench.py --save PATH     # also write the JSON to PATH
    python3 bench/bench.py --show PATH     # print the table of a saved JSON result

Standard library only, Python 3.7+, Linux (/proc), loopback only (127.0.0.1).
Progress goes to stderr; stdout holds only the table or the JSON.

What runs
---------
Every party is its own process, so none shares a GIL with another::

    load generator --UDP--> mpudp client ==link 0==> mpudp server --UDP--> echo
        (one socket)                      ==link 1==>
    load generator --UDP--> echo                                     (the direct path)

- *echo*: this file with ``--role echo``: a loop of recvfrom_into/sendto on one
  socket, select() only when the socket is empty.
- *mpudp server* and *mpudp client*: ``python3 mpudp.py -config=PATH``, with the
  "default config" of the failover issue: heartbeat_interval_sec 0.5,
  max_consecutive_fail 5, two links, and a score_file / status_file (for the
  counters).  For the throughput, latency, CPU and
  memory figures both links go straight to the server (two client sockets, no
  extra hop); for failover and restart they go through *link emulators*
  (``--role links``: tests/linkemu.py LinkEmulators in a process of their own,
  steered over stdin) so a link can be blackholed.
- *bare forwarders* (the floor): two processes of this file with ``--role
  forward`` in the client's and the server's places (generator -> forwarder ->
  forwarder -> echo and back).  Each is the loop shape of an mpudp process
  (selectors, each socket drained until EAGAIN, recvfrom_into/send) with none of
  its protocol: no header, MAC, replay window, sessions or timers.
- *load generator*: ``--role loadgen``: one UDP socket that sends and receives,
  steered by JSON commands on stdin.  Each datagram carries a phase id, a
  sequence number and its send time (time.monotonic_ns), so latency comes from
  the echo itself and stragglers of an earlier phase are ignored.  An echo of
  a sequence number already echoed is counted as a duplicate, not delivered.
- the orchestrator (this process) spawns everything, each child in its own
  session (process group) with PR_SET_PDEATHSIG, and kills every group in a
  ``finally``, so nothing outlives the run even on error or Ctrl-C.

How each figure is measured
---------------------------
Each figure is measured 3 times (start-up 5 times; everything once with
--quick) and shown as the median with its spread [min-max].  Within one
repetition the direct and the relay measurement of a figure run back to back
(in alternating order), and ratios and differences are taken per repetition
before the median.

- *Delivered packets/s, Mbit/s (saturation)*: the generator keeps a window of
  WINDOW (128) datagrams outstanding: it sends whenever fewer are in flight and
  counts echoes.  In flight = sent - highest sequence number echoed (the path
  keeps order), so a lost datagram frees its slot when a later one returns; a
  silence of 100 ms frees them all.  After WARMUP seconds it counts echoes for
  DURATION seconds: pps = echoes / seconds; Mbit/s = pps * payload bytes * 8
  (payload only, no IP/UDP/relay headers, one direction).  The machine has 2
  cores: on the relay path the generator, client, server and echo share them,
  on the direct path the generator and echo do.  The CPU share each process
  got is reported, so whoever is the bottleneck is visible.
- *Fixed rate (1000 pps)*: open loop: datagram i is sent at start + i/rate,
  whatever comes back; delivered pps counts echoes in the window, loss counts
  the datagrams sent in the window whose echo never came.
- *Round-trip latency*: receive time minus the send time in the payload, for
  every echo of the 1000 pps phases; p50 and p99 by nearest rank.  "Added
  RTT" = relay p50 - direct p50 of the same repetition (the generator's and
  echo's own costs cancel out).
- *CPU per packet*: CPU time of each process over the measured window divided
  by the echoes counted in it.  CPU time is se.sum_exec_runtime from
  /proc/PID/task/*/sched (microsecond resolution) when the kernel has it,
  else utime+stime from /proc/PID/stat (10 ms ticks); both are in the JSON.
  "s per Mpkt" and "us per packet" are the same number; relay CPU/packet =
  (client + server CPU) / echoed packets.  It includes heartbeats and
  timers, i.e. what the relay really costs.
- *RSS*: VmRSS from /proc/PID/status.  Idle: once the relay has forwarded its
  first packet and sat idle for a second.  Under load: the largest VmRSS read
  at the end of a saturation window.  VmHWM (peak) at the end is in the JSON.
- *Start-up to forwarding*: the generator sends one datagram a millisecond
  to a free port; then a fresh server and a fresh client are spawned at once
  (server first) on that port; the figure is first echo - spawn time.  For
  reference, the JSON has the time of ``python3 -c pass`` and of
  ``python3 mpudp.py --version`` (the interpreter's and the import's share).
- *Failover gap*: 100 pps through the emulated links; after 1 s the
  link carrying the data (the one whose emulator counts the most datagrams)
  is blackholed both ways; the figure is the longest time between two
  consecutive echoes.  Between repetitions the link comes back and is given
  time to become steady again.
- *Server restart*: 100 pps; after 1 s the server gets SIGTERM, and once it has
  exited a new server is spawned on the same port; "resume" is the first echo
  - the new server's spawn time, "outage" is the first echo after - the last
  echo before.
- *Floor*: the bare forwarders at 1000 pps, both sizes, measured like the
  relay in every repetition (CPU of the two forwarders per echoed packet, added
  RTT p50 against the direct path of the same repetition).  What any CPython
  relay of this shape pays on this machine for its process wake-ups, and
  "mpudp - floor" is what mpudp's protocol and bookkeeping add to that, per
  repetition.
- *Redundancy 2*: a second relay (server + client) runs beside the first one,
  its client with ``"redundancy": 2`` (both loopback links carry every packet,
  the server answers on both).  At 1200 B only, in each repetition right after
  (or before) the first relay, it gets a saturation window of 1.5 s and a
  1000 pps window of 2 s (shorter than the others, to keep the run short; every
  figure is a rate or a median, so the length does not bias it).
  It is reported against the first relay (redundancy 1) of the same
  repetition: pkt/s, relay CPU/packet, added RTT p50 (- the direct path's p50),
  each as r2/r1 too.  Echoes delivered twice to the generator must be 0; the
  "duplicate" counters of both relays' server and client (copies dropped by the
  replay window) come from their status_file / score_file, read once the files
  are newer than the last measurement.
"""

from __future__ import print_function

import argparse
import json
import os
import platform
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MPUDP = os.path.join(ROOT, "mpudp.py")
TESTS = os.path.join(ROOT, "tests")
HOST = "127.0.0.1"

SIZES = (64, 1200)
RATE = 1000
# Datagrams in flight at saturation: deep enough that every stage of the relay path has a
# batch to work on, shallow enough to fit a socket buffer under Linux's default rmem_max
# (128 x ~2.3 KB of 1200-byte datagrams < 416 KB), so nothing is dropped.
WINDOW = 128
LOSS_TIMEOUT_S = 0.1
FAILOVER_RATE = 100
RELAY_CONFIG = {"heartbeat_interval_sec": 0.5, "max_consecutive_fail": 5}
REDUNDANCY = 2  # the second relay's client config "redundancy"
REDUNDANT_SIZE = 1200
STATUS_WAIT_S = 8.0  # a server writes its status_file every 5 s (its sweep), a client every 1 s

FULL = {"reps": 3, "warmup": 0.3, "sat_s": 2.5, "rate_s": 3.0, "failover_reps": 3, "restart_reps": 3,
        "startup_reps": 5, "idle_s": 1.0, "redundant_sat_s": 1.5, "redundant_rate_s": 2.0}
QUICK = {"reps": 1, "warmup": 0.1, "sat_s": 0.5, "rate_s": 0.5, "failover_reps": 1, "restart_reps": 1,
         "startup_reps": 1, "idle_s": 0.2, "redundant_sat_s": 0.5, "redundant_rate_s": 0.5}

# Targets: (key in the flat figures, label, op, limit, Go original's figure or None).
TARGETS = [
    ("ratio_sat_1200", "delivered 1200 B pkt/s, relay/direct", ">=", 0.25, 0.21),
    ("cpu_sat_64", "relay CPU/pkt at saturation, 64 B (us)", "<=", 25.0, 28.9),
    ("cpu_sat_1200", "relay CPU/pkt at saturation, 1200 B (us)", "<=", 25.0, 28.9),
    ("cpu_rate_64", "relay CPU/pkt at 1000 pps, 64 B (us)", "<=", 100.0, 197.0),
    ("cpu_rate_1200", "relay CPU/pkt at 1000 pps, 1200 B (us)", "<=", 100.0, 197.0),
    ("added_p50_64", "added RTT p50 at 1000 pps, 64 B (ms)", "<=", 0.15, 0.22),
    ("added_p50_1200", "added RTT p50 at 1000 pps, 1200 B (ms)", "<=", 0.15, 0.22),
    ("rss_idle_client_mb", "idle RSS, client (MB)", "<", 20.0, 4.7),
    ("rss_idle_server_mb", "idle RSS, server (MB)", "<", 20.0, 4.7),
    ("startup_ms", "start-up to forwarding (ms)", "<", 200.0, None),
    ("failover_gap_s", "failover gap, active link blackholed (s)", "<", 1.0, None),
    ("r2_duplicates", "echoes delivered twice, redundancy 2", "<=", 0, None),
]

PAYLOAD_HEADER = struct.Struct("!IIQ")  # phase, sequence number, send time (monotonic ns)


# ============================================================================
# /proc readings (used by the load generator and the orchestrator)
# ============================================================================

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_times(pid):
    """(stat seconds, sched seconds or None) of a process: utime+stime, and the
    sum of se.sum_exec_runtime over its threads.  None if the process is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    stat_s = (int(fields[11]) + int(fields[12])) / float(CLK_TCK)
    sched_s = 0.0
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/sched" % (pid, tid)) as f:
                for line in f:
                    if line.startswith("se.sum_exec_runtime"):
                        sched_s += float(line.split(":")[1]) / 1000.0
                        break
                else:
                    raise OSError("no se.sum_exec_runtime")
    except (OSError, ValueError, IndexError):
        sched_s = None
    return stat_s, sched_s


def proc_status_kb(pid, key):
    """A 'kB' line of /proc/PID/status (VmRSS, VmHWM), or None."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def system_busy():
    """(busy seconds, steal seconds) of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    busy = sum(values[:3]) + sum(values[5:8])
    return busy / float(CLK_TCK), values[7] / float(CLK_TCK) if len(values) > 7 else 0.0


def cpu_snapshot(pids):
    snap = {name: cpu_times(pid) for name, pid in pids.items()}
    snap["_system"] = system_busy()
    return snap


def cpu_delta(before, after):
    """CPU seconds each process used between two snapshots; "_background": what the rest of
    the machine (other processes, the kernel's own threads, steal) used meanwhile."""
    out = {}
    for name, b in before.items():
        a = after.get(name)
        if name == "_system":
            if a is not None and b is not None:
                ours = sum(v["s"] for v in out.values())
                out["_background"] = {"busy_s": round(a[0] - b[0], 3), "steal_s": round(a[1] - b[1], 3),
                                      "other_s": round(max(0.0, a[0] - b[0] - ours), 3)}
            continue
        if a is None or b is None:
            continue
        stat_s = a[0] - b[0]
        sched_s = a[1] - b[1] if a[1] is not None and b[1] is not None else None
        out[name] = {"stat_s": round(stat_s, 4), "sched_s": None if sched_s is None else round(sched_s, 6),
                     "s": round(sched_s if sched_s is not None else stat_s, 6),
                     "source": "sched" if sched_s is not None else "stat"}
    return out


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


def latency_summary(rtts_ns):
    rtts_ns.sort()
    if not rtts_ns:
        return {"n": 0}
    return {"n": len(rtts_ns), "p50_ms": percentile(rtts_ns, 0.5) / 1e6, "p90_ms": percentile(rtts_ns, 0.9) / 1e6,
            "p99_ms": percentile(rtts_ns, 0.99) / 1e6, "min_ms": rtts_ns[0] / 1e6, "max_ms": rtts_ns[-1] / 1e6}


# ============================================================================
# Child roles: echo, load generator, link emulators
# ============================================================================


def stdin_closed():
    """True when the orchestrator has gone (EOF on stdin); call only when stdin is readable."""
    try:
        return not os.read(sys.stdin.fileno(), 4096)
    except OSError:
        return True


def role_echo():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, 1 << 20)
    sock.bind((HOST, 0))
    sock.setblocking(False)
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


class LoadGen(object):
    """One socket; runs one command at a time and answers with one JSON line."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, option, 1 << 20)
        self.sock.bind((HOST, 0))
        self.sock.setblocking(False)
        self.rbuf = bytearray(65536)

    def drain(self, seconds):
        """Read and drop whatever arrives for `seconds` (echoes still in flight)."""
        end = time.monotonic() + seconds
        sock, rbuf = self.sock, self.rbuf
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            try:
                sock.recv_into(rbuf)
            except BlockingIOError:
                select.select([sock], [], [], left)
            except OSError:
                pass

    def saturate(self, cmd):
        """Keep `window` datagrams in flight, counted as TCP counts bytes in flight: sent minus
        the highest sequence number echoed (the path keeps order), so a lost datagram frees
        its slot as soon as a later one comes back; 100 ms of silence frees them all."""
        sock, rbuf = self.sock, self.rbuf
        target, size, window, phase = tuple(cmd["target"]), cmd["size"], cmd["window"], cmd["phase"]
        pids = cmd.get("pids", {})
        pids["loadgen"] = os.getpid()
        buf = bytearray(size)
        pack_into, unpack_from = PAYLOAD_HEADER.pack_into, PAYLOAD_HEADER.unpack_from
        sendto, recv_into = sock.sendto, sock.recv_into
        clock_ns, clock = time.monotonic_ns, time.monotonic
        start = clock()
        measure_at_ns = int((start + cmd["warmup"]) * 1e9)
        end_at = start + cmd["warmup"] + cmd["duration"]
        end_ns = None
        seq = acked = received = send_errors = timeouts = duplicates = 0
        acked_at_start = 0
        rtts = []
        seen = bytearray(1 << 16)  # seen[s]: echo s has arrived (grown as seq grows)
        cpu0 = t0 = None
        while True:
            while seq - acked < window:
                seq += 1
                if seq == len(seen):
                    seen.extend(bytes(len(seen)))
                pack_into(buf, 0, phase, seq, clock_ns())
                try:
                    sendto(buf, target)
                except (BlockingIOError, InterruptedError):
                    seq -= 1
                    break
                except OSError:
                    seq -= 1
                    send_errors += 1
                    break
            try:
                n = recv_into(rbuf)
            except BlockingIOError:
                if not select.select([sock], [], [], LOSS_TIMEOUT_S)[0]:
                    timeouts += 1
                    acked = seq  # everything in flight is presumed lost
                    if clock() >= end_at:
                        break
                continue
            except OSError:
                continue
            now_ns = clock_ns()
            p, s, sent_ns = unpack_from(rbuf)
            if p != phase or n != size:
                continue
            if seen[s]:
                duplicates += 1
                continue
            seen[s] = 1
            if s > acked:
                acked = s
            if end_ns is not None:
                received += 1
                rtts.append(now_ns - sent_ns)
                if now_ns >= end_ns:
                    break
            elif now_ns >= measure_at_ns:
                cpu0, t0 = cpu_snapshot(pids), clock()
                end_ns = int((t0 + cmd["duration"]) * 1e9)
                acked_at_start = acked
        t1 = clock()
        cpu1 = cpu_snapshot(pids) if cpu0 is not None else None
        rss = {name: proc_status_kb(pid, "VmRSS") for name, pid in pids.items()}
        self.drain(0.15)
        seconds = (t1 - t0) if t0 is not None else 0.0
        return {"sent": seq, "received": received, "lost": max(0, acked - acked_at_start - received),
                "timeouts": timeouts, "send_errors": send_errors, "duplicates": duplicates,
                "seconds": seconds, "pps": received / seconds if seconds else 0.0,
                "mbps": received * size * 8 / seconds / 1e6 if seconds else 0.0,
                "latency": latency_summary(rtts), "cpu": cpu_delta(cpu0, cpu1) if cpu0 else {}, "rss_kb": rss,
                "rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}

    def rate(self, cmd):
        """Open loop at cmd["rate"] pps.  Optional: "arrivals" (return every echo's arrival
        time), "stop_after_resume" {"gap", "extra", "after"}: stop `extra` s after the first
        echo that ends a gap >= `gap` s (only gaps ending `after` s past the start count)."""
        sock, rbuf = self.sock, self.rbuf
        target, size, phase = tuple(cmd["target"]), cmd["size"], cmd["phase"]
        pids = cmd.get("pids", {})
        pids["loadgen"] = os.getpid()
        interval = 1.0 / cmd["rate"]
        resume = cmd.get("stop_after_resume")
        keep_arrivals = cmd.get("arrivals", False)
        buf = bytearray(size)
        pack_into, unpack_from = PAYLOAD_HEADER.pack_into, PAYLOAD_HEADER.unpack_from
        clock_ns, clock = time.monotonic_ns, time.monotonic
        start = clock()
        measure_at = start + cmd.get("warmup", 0.0)
        end_at = measure_at + cmd["duration"]
        next_send = start
        seq = 0
        first_seq = last_seq = None  # the sequence numbers sent in the measured window
        in_window = received_window = duplicates = 0
        seen = bytearray(1 << 12)  # seen[s]: echo s has arrived (grown as seq grows)
        arrivals = []
        rtts = []
        last_rx = None
        stop_at = end_at
        cpu0 = cpu_snapshot(pids) if cmd.get("warmup", 0.0) == 0 else None
        t0 = start if cpu0 is not None else None
        while True:
            # Receive everything waiting first, so arrival times are not delayed by sends.
            while True:
                try:
                    n = sock.recv_into(rbuf)
                except BlockingIOError:
                    break
                except OSError:
                    continue
                now_ns = clock_ns()
                p, s, sent_ns = unpack_from(rbuf)
                if p != phase or n != size:
                    continue
                if seen[s]:
                    duplicates += 1
                    continue
                seen[s] = 1
                now = now_ns / 1e9
                if keep_arrivals:
                    arrivals.append(now)
                if resume and last_rx is not None and now - last_rx >= resume["gap"] \
                        and now - start >= resume["after"] and stop_at == end_at:
                    stop_at = min(end_at, now + resume["extra"])
                last_rx = now
                if first_seq is not None and s >= first_seq and (last_seq is None or s <= last_seq):
                    rtts.append(now_ns - sent_ns)
                    received_window += 1
            now = clock()
            if cpu0 is None and now >= measure_at:
                cpu0, t0 = cpu_snapshot(pids), now
            if now >= stop_at:
                break
            if now >= next_send:
                if now - next_send > 0.05:
                    next_send = now  # a long stall: do not burst more than 50 ms worth
                seq += 1
                if seq == len(seen):
                    seen.extend(bytes(len(seen)))
                pack_into(buf, 0, phase, seq, clock_ns())
                try:
                    sock.sendto(buf, target)
                except OSError:
                    pass
                if now >= measure_at:
                    if first_seq is None:
                        first_seq = seq
                    in_window += 1
                next_send += interval
                continue
            select.select([sock], [], [], min(next_send, stop_at) - now)
        t1 = clock()
        last_seq = seq
        cpu1 = cpu_snapshot(pids)
        rss = {name: proc_status_kb(pid, "VmRSS") for name, pid in pids.items()}
        # Late echoes of the window's last datagrams still count as delivered (not for pps).
        delivered_pps = received_window / (t1 - t0) if t0 is not None and t1 > t0 else 0.0
        end = clock() + 0.2
        while clock() < end:
            try:
                n = sock.recv_into(rbuf)
            except BlockingIOError:
                select.select([sock], [], [], max(0.0, end - clock()))
                continue
            except OSError:
                continue
            now_ns = clock_ns()
            p, s, sent_ns = unpack_from(rbuf)
            if p != phase or n != size:
                continue
            if seen[s]:
                duplicates += 1
                continue
            seen[s] = 1
            if first_seq is not None and first_seq <= s <= last_seq:
                rtts.append(now_ns - sent_ns)
                received_window += 1
        seconds = t1 - t0 if t0 is not None else 0.0
        result = {"sent": in_window, "sent_total": seq, "received": received_window, "duplicates": duplicates,
                  "lost": max(0, in_window - received_window),
                  "loss": (1.0 - received_window / float(in_window)) if in_window else None,
                  "seconds": seconds, "pps": delivered_pps, "mbps": delivered_pps * size * 8 / 1e6,
                  "start": start, "stop": t1, "latency": latency_summary(rtts),
                  "cpu": cpu_delta(cpu0, cpu1) if cpu0 else {}, "rss_kb": rss}
        if keep_arrivals:
            result["arrivals"] = arrivals
        return result

    def first_echo(self, cmd):
        """Send one datagram every `interval` s until the first echo; its arrival time."""
        sock, rbuf = self.sock, self.rbuf
        target, phase = tuple(cmd["target"]), cmd["phase"]
        buf = bytearray(cmd["size"])
        deadline = time.monotonic() + cmd["timeout"]
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            PAYLOAD_HEADER.pack_into(buf, 0, phase, seq, time.monotonic_ns())
            try:
                sock.sendto(buf, target)
            except OSError:
                pass
            if select.select([sock], [], [], cmd["interval"])[0]:
                try:
                    n = sock.recv_into(rbuf)
                except OSError:
                    continue
                now = time.monotonic()
                if n == len(buf) and PAYLOAD_HEADER.unpack_from(rbuf)[0] == phase:
                    self.drain(0.05)
                    return {"first": now, "sent": seq}
        return {"first": None, "sent": seq}


def role_loadgen():
    gen = LoadGen()
    print(json.dumps({"pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            result = getattr(gen, cmd["cmd"])(cmd)
        except Exception as exc:  # report, do not die: the orchestrator decides
            result = {"error": "%s: %s" % (type(exc).__name__, exc)}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


def role_forward(target_port):
    """One hop of the floor: what an mpudp process does per packet minus the protocol
    (no header, MAC, replay window, sessions or timers).  Datagrams from the listen
    socket go to the target from a connected socket, its replies to the last sender;
    the same loop shape as mpudp's reactor (selectors, each socket drained until EAGAIN)."""
    listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listen.bind((HOST, 0))
    listen.setblocking(False)
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.connect((HOST, target_port))
    upstream.setblocking(False)
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


def role_links(target_port, count):
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


# ============================================================================
# Orchestrator: children, process groups, clean-up
# ============================================================================


def _die_with_parent():
    """preexec_fn: SIGKILL this child if the orchestrator dies (PR_SET_PDEATHSIG)."""
    if _LIBC is not None:
        try:
            _LIBC.prctl(1, signal.SIGKILL, 0, 0, 0)
        except Exception:
            pass


try:
    import ctypes

    _LIBC = ctypes.CDLL(None, use_errno=True)
except Exception:  # not Linux, or no ctypes: the finally-block still cleans up
    _LIBC = None


class BenchError(Exception):
    pass


class Child(object):
    """A child process in its own process group; stdin/stdout speak JSON lines if `talk`."""

    def __init__(self, kids, name, argv, log_dir, talk=True):
        self.name = name
        self.log_path = os.path.join(log_dir, "%s.%d.log" % (name, len(kids.all)))
        self.log = open(self.log_path, "w")
        self.spawned_at = time.monotonic()
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.PIPE if talk else subprocess.DEVNULL,
            stdout=subprocess.PIPE if talk else self.log, stderr=self.log,
            start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        self._buf = b""
        kids.all.append(self)

    def send(self, obj):
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self, timeout):
        """The next JSON line on stdout; BenchError after `timeout` s or if the child died."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("%s: no answer within %.0f s (log %s)" % (self.name, timeout, self.log_path))
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise BenchError("%s exited with %r: %s" % (self.name, self.proc.poll(), self.tail()))
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line.decode())
        if isinstance(reply, dict) and "error" in reply:
            raise BenchError("%s: %s" % (self.name, reply["error"]))
        return reply

    def ask(self, obj, timeout):
        self.send(obj)
        return self.recv(timeout)

    def tail(self, lines=15):
        try:
            self.log.flush()
            with open(self.log_path) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout=5.0):
        """SIGTERM, then SIGKILL after `timeout`; the exit status."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except OSError:
                    pass
                self.proc.wait()
        return self.proc.returncode


class Kids(object):
    """Every child ever spawned; close() ends all their process groups."""

    def __init__(self):
        self.all = []

    def close(self):
        alive = [k for k in self.all if k.proc.poll() is None]
        for k in alive:
            try:
                os.killpg(k.pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + 3.0
        for k in alive:
            try:
                k.proc.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for k in alive:
            try:
                os.killpg(k.pid, signal.SIGKILL)  # also anything left in its group
            except OSError:
                pass
            k.proc.wait()
        for k in self.all:
            for stream in (k.proc.stdin, k.proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
            k.log.close()


def progress(message):
    sys.stderr.write("[bench %6.1fs] %s\n" % (time.monotonic() - _T0, message))
    sys.stderr.flush()


_T0 = time.monotonic()


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def write_config(directory, name, data):
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    return path


class Bench(object):
    def __init__(self, params, python, workdir):
        self.p = params
        self.python = python
        self.dir = workdir
        self.kids = Kids()
        self.phase = 0
        sys.path.insert(0, ROOT)
        import mpudp  # the keys only; the relay itself runs in its own processes
        server_key, client_key = mpudp.generate_private_key(), mpudp.generate_private_key()
        self.keys = {"server_private": mpudp.encode_key(server_key),
                     "server_public": mpudp.encode_key(mpudp.public_key(server_key)),
                     "client_private": mpudp.encode_key(client_key),
                     "client_public": mpudp.encode_key(mpudp.public_key(client_key))}
        self.mpudp_version = getattr(mpudp, "__version__", "?")
        # As packaging/install.sh does: mpudp.py re-executes itself as `import mpudp`, which
        # loads this bytecode instead of compiling (and keeping the compiler's memory).
        subprocess.run([python, "-m", "compileall", "-q", MPUDP], stdout=subprocess.DEVNULL, check=False)

    # -- children --------------------------------------------------------------

    def helper(self, role, *args):
        child = Child(self.kids, role, [sys.executable, os.path.abspath(__file__), "--role", role] + list(args),
                      self.dir)
        child.ready = child.recv(15)
        return child

    def server(self, port, upstream_port, name="server", status_file=None):
        cfg = {"listen_addr": "%s:%d" % (HOST, port), "upstream_addr": "%s:%d" % (HOST, upstream_port),
               "server_private_key": self.keys["server_private"],
               "client_public_keys": [self.keys["client_public"]]}
        if status_file:
            cfg["status_file"] = status_file
        path = write_config(self.dir, "%s.json" % name, {"mode": "server", "server": cfg})
        return Child(self.kids, name, [self.python, MPUDP, "-config=%s" % path], self.dir, talk=False)

    def client(self, port, link_ports, name="client", extra=None):
        cfg = {"listen_addr": "%s:%d" % (HOST, port),
               "links": [{"remote_addr": "%s:%d" % (HOST, p)} for p in link_ports],
               "client_private_key": self.keys["client_private"],
               "server_public_key": self.keys["server_public"]}
        cfg.update(RELAY_CONFIG)
        cfg.update(extra or {})
        path = write_config(self.dir, "%s.json" % name, {"mode": "client", "client": cfg})
        return Child(self.kids, name, [self.python, MPUDP, "-config=%s" % path], self.dir, talk=False)

    def relay(self, suffix, client_extra):
        """A server and a client with two direct links, each writing its status to a file."""
        server_port, client_port = free_udp_port(), free_udp_port()
        status = {who: os.path.join(self.dir, "%s%s.status.json" % (who, suffix)) for who in ("client", "server")}
        server = self.server(server_port, self.echo_addr[1], "server" + suffix, status_file=status["server"])
        client = self.client(client_port, [server_port, server_port], "client" + suffix,
                             dict(client_extra, score_file=status["client"]))
        return {"server": server, "client": client, "addr": [HOST, client_port], "status": status}

    def floor(self):
        """Two bare forwarders (--role forward) in the client's and the server's places."""
        server = self.helper("forward", str(self.echo_addr[1]))
        client = self.helper("forward", str(server.ready["port"]))
        return {"server": server, "client": client, "addr": [HOST, client.ready["port"]]}

    def next_phase(self):
        self.phase += 1
        return self.phase

    def first_echo(self, target, timeout=10.0):
        return self.loadgen.ask({"cmd": "first_echo", "target": target, "size": 64, "interval": 0.001,
                                 "timeout": timeout, "phase": self.next_phase()}, timeout + 5)

    def wait_forwarding(self, target, what):
        reply = self.first_echo(target)
        if reply["first"] is None:
            raise BenchError("no echo through %s within 10 s" % what)

    # -- the run -----------------------------------------------------------------

    def run(self):
        result = {"schema": "mpudp-bench/1", "machine": machine_info(self.python),
                  "mpudp": {"version": self.mpudp_version, "git": git_info()},
                  "params": dict(self.p, rate_pps=RATE, sizes=list(SIZES),
                                 failover_rate_pps=FAILOVER_RATE, relay_config=RELAY_CONFIG,
                                 host=HOST, python=self.python)}
        self.echo = self.helper("echo")
        self.echo_addr = [HOST, self.echo.ready["port"]]
        self.loadgen = self.helper("loadgen")
        progress("echo on %s, load generator pid %d" % (self.echo_addr[1], self.loadgen.pid))
        result["startup"] = self.startup()
        result.update(self.steady_state())
        result["failover"], result["restart"] = self.failover_and_restart()
        return result

    def steady_state(self):
        """Throughput, latency, CPU and RSS: relay with two direct links, and the direct path;
        at REDUNDANT_SIZE also a second relay whose client has "redundancy": REDUNDANCY."""
        relays = {"relay": self.relay("", {}), "redundant": self.relay("-r2", {"redundancy": REDUNDANCY})}
        floor = self.floor()
        self.wait_forwarding(relays["relay"]["addr"], "the relay")
        self.wait_forwarding(relays["redundant"]["addr"], "the relay with redundancy %d" % REDUNDANCY)
        self.wait_forwarding(floor["addr"], "the bare forwarders")
        time.sleep(self.p["idle_s"])
        client, server = relays["relay"]["client"], relays["relay"]["server"]
        idle = {name: proc_status_kb(k.pid, "VmRSS") for name, k in (("client", client), ("server", server))}
        targets = dict({path: rel["addr"] for path, rel in relays.items()}, direct=self.echo_addr,
                       floor=floor["addr"])
        pids = {path: {"client": rel["client"].pid, "server": rel["server"].pid, "echo": self.echo.pid}
                for path, rel in dict(relays, floor=floor).items()}
        pids["direct"] = pids["relay"]
        runs = {}  # (kind, size, path) -> list of results
        for rep in range(self.p["reps"]):
            order = ("direct", "relay", "floor", "redundant")
            if rep % 2:
                order = order[::-1]
            for kind in ("sat", "rate"):
                for size in SIZES:
                    for path in order:
                        if (path == "redundant" and size != REDUNDANT_SIZE) or (path == "floor" and kind != "rate"):
                            continue
                        seconds = self.p[("redundant_%s_s" if path == "redundant" else "%s_s") % kind]
                        r = self.measure(kind, size, targets[path], pids[path], seconds)
                        runs.setdefault((kind, size, path), []).append(r)
                        progress("rep %d %-4s %4d B %-9s %8.0f pps  p50 %.3f ms  loss %s" % (
                            rep + 1, kind, size, path, r["pps"], r["latency"].get("p50_ms") or 0,
                            r.get("loss") if kind == "rate" else r["lost"]))
        hwm = {name: proc_status_kb(k.pid, "VmHWM") for name, k in (("client", client), ("server", server))}
        counters = self.relay_counters(relays, since=time.time())
        codes = {"client": client.stop(), "server": server.stop()}
        codes_r2 = {"client": relays["redundant"]["client"].stop(), "server": relays["redundant"]["server"].stop()}
        out = summarize_steady(runs, idle, hwm, codes)
        out["redundancy"] = summarize_redundancy(runs, counters, codes_r2)
        out["floor"] = summarize_floor(runs)
        return out

    def relay_counters(self, relays, since):
        """{path: {"client": counters, "server": counters}} from the status files written after
        `since` (wall clock; a server writes its file every 5 s); None for a file that was not."""
        deadline = time.monotonic() + STATUS_WAIT_S
        progress("waiting for the relays' status files")
        return {path: {who: read_status_counters(file_path, since, deadline)
                       for who, file_path in rel["status"].items()} for path, rel in relays.items()}

    def measure(self, kind, size, target, pids, seconds):
        cmd = {"target": target, "size": size, "phase": self.next_phase(), "warmup": self.p["warmup"],
               "pids": pids, "duration": seconds}
        if kind == "sat":
            cmd.update(cmd="saturate", window=self.p["window"])
        else:
            cmd.update(cmd="rate", rate=RATE)
        return self.loadgen.ask(cmd, seconds + 20)

    def startup(self):
        """Fresh server + client spawned at once; spawn -> first echo through them."""
        runs = []
        for rep in range(self.p["startup_reps"]):
            server_port, client_port = free_udp_port(), free_udp_port()
            self.loadgen.send({"cmd": "first_echo", "target": [HOST, client_port], "size": 64,
                               "interval": 0.001, "timeout": 10.0, "phase": self.next_phase()})
            time.sleep(0.02)  # the generator is sending before anything is spawned
            spawned = time.monotonic()
            server = self.server(server_port, self.echo_addr[1], name="startup-server")
            client = self.client(client_port, [server_port, server_port], name="startup-client")
            reply = self.loadgen.recv(20)
            ms = (reply["first"] - spawned) * 1000 if reply["first"] is not None else None
            code = client.stop()
            # For reference: a fresh client alone, the server already running.
            client_port = free_udp_port()
            self.loadgen.send({"cmd": "first_echo", "target": [HOST, client_port], "size": 64,
                               "interval": 0.001, "timeout": 10.0, "phase": self.next_phase()})
            time.sleep(0.02)
            spawned = time.monotonic()
            client = self.client(client_port, [server_port, server_port], name="startup-client")
            reply = self.loadgen.recv(20)
            client_ms = (reply["first"] - spawned) * 1000 if reply["first"] is not None else None
            codes = {"client": [code, client.stop()], "server": server.stop()}
            runs.append({"ms": ms, "client_only_ms": client_ms, "exit": codes})
            progress("start-up %d: %s ms (a fresh client alone: %s ms)" % (
                rep + 1, "%.1f" % ms if ms is not None else "no echo",
                "%.1f" % client_ms if client_ms is not None else "no echo"))
        return {"ms": spread([r["ms"] for r in runs]), "client_only_ms": spread([r["client_only_ms"] for r in runs]),
                "runs": runs, "python_startup_ms": time_command([self.python, "-c", "pass"]),
                "mpudp_version_ms": time_command([self.python, MPUDP, "--version"]),
                "python_bare_rss_kb": bare_rss(self.python)}

    def failover_and_restart(self):
        server_port, client_port = free_udp_port(), free_udp_port()
        links = self.helper("links", str(server_port), "2")
        server = self.server(server_port, self.echo_addr[1], name="fo-server")
        client = self.client(client_port, links.ready["ports"], name="fo-client")
        relay_addr = [HOST, client_port]
        self.wait_forwarding(relay_addr, "the emulated links")
        time.sleep(2.0)  # both links answering long enough to be steady candidates
        failovers = []
        for rep in range(self.p["failover_reps"]):
            if rep:
                time.sleep(2.5)  # the link blackholed last time comes back and becomes steady
            self.loadgen.send({"cmd": "rate", "target": relay_addr, "size": 64, "rate": FAILOVER_RATE,
                               "duration": 8.0, "phase": self.next_phase(), "arrivals": True,
                               "stop_after_resume": {"gap": 0.05, "extra": 0.5, "after": 0.9}})
            c0 = links.ask({"cmd": "counters"}, 5)["counters"]
            time.sleep(0.9)
            c1 = links.ask({"cmd": "counters"}, 5)["counters"]
            active = max(range(len(c1)), key=lambda i: c1[i]["up_in"] - c0[i]["up_in"])
            links.ask({"cmd": "blackhole", "link": active, "on": True}, 5)
            blackholed = time.monotonic()
            r = self.loadgen.recv(20)
            links.ask({"cmd": "blackhole", "link": active, "on": False}, 5)
            gap = longest_gap(r["arrivals"], r["stop"], after=blackholed)
            failovers.append({"gap_s": gap, "link": active, "lost": r["lost"], "sent": r["sent"]})
            progress("failover %d: link %d blackholed, gap %s s, %d lost" % (
                rep + 1, active, "%.3f" % gap if gap is not None else "?", r["lost"]))
        time.sleep(1.0)
        restarts = []
        for rep in range(self.p["restart_reps"]):
            if rep:
                time.sleep(1.0)
            self.loadgen.send({"cmd": "rate", "target": relay_addr, "size": 64, "rate": FAILOVER_RATE,
                               "duration": 15.0, "phase": self.next_phase(), "arrivals": True,
                               "stop_after_resume": {"gap": 0.2, "extra": 0.5, "after": 0.9}})
            time.sleep(1.0)
            killed = time.monotonic()
            code = server.stop()
            server = self.server(server_port, self.echo_addr[1], name="fo-server")
            respawned = server.spawned_at
            r = self.loadgen.recv(30)
            arrivals = r["arrivals"]
            after = [t for t in arrivals if t > respawned]
            before = [t for t in arrivals if t <= killed]
            resume = after[0] - respawned if after else None
            outage = after[0] - before[-1] if after and before else None
            restarts.append({"resume_s": resume, "outage_s": outage, "old_server_exit": code,
                             "stop_wait_s": respawned - killed})
            progress("restart %d: first echo %s s after the new server's spawn (outage %s s)" % (
                rep + 1, "%.3f" % resume if resume is not None else "never",
                "%.3f" % outage if outage is not None else "?"))
        codes = {"client": client.stop(), "server": server.stop()}
        links.stop()
        return ({"gap_s": spread([f["gap_s"] for f in failovers]), "runs": failovers, "exit": codes},
                {"resume_s": spread([r["resume_s"] for r in restarts]),
                 "outage_s": spread([r["outage_s"] for r in restarts]), "runs": restarts})


def read_status_counters(path, since, deadline):
    """The "counters" of a score_file / status_file once its "time" is `since` or later;
    polls until time.monotonic() reaches `deadline`, then None."""
    while True:
        try:
            with open(path) as f:
                status = json.load(f)
            if status.get("time", 0) >= since:
                return status.get("counters", {})
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def longest_gap(arrivals, stop, after):
    """The longest time between consecutive echoes around `after`; to `stop` if none came after it."""
    times = sorted(arrivals)
    gaps = [b - a for a, b in zip(times, times[1:]) if b > after]
    tail = [stop - times[-1]] if times and times[-1] <= after else []
    return max(gaps + tail) if gaps + tail else None


def bare_rss(python):
    """VmRSS of the interpreter doing nothing (what site-packages and the build cost)."""
    try:
        out = subprocess.run([python, "-c", "print(open('/proc/self/status').read())"], stdout=subprocess.PIPE,
                             universal_newlines=True, timeout=30).stdout
        return int(out.split("VmRSS:")[1].split()[0])
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def time_command(argv, times=3):
    """Median wall time of running argv, in ms."""
    runs = []
    for _ in range(times):
        start = time.monotonic()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, timeout=30)
        runs.append((time.monotonic() - start) * 1000)
    return round(sorted(runs)[len(runs) // 2], 1)


# ============================================================================
# Summaries
# ============================================================================


def spread(values):
    """{median, min, max, runs} of the values that exist (None: a run without a figure)."""
    present = sorted(v for v in values if v is not None)
    out = {"runs": values}
    if present:
        n = len(present)
        median = present[n // 2] if n % 2 else (present[n // 2 - 1] + present[n // 2]) / 2.0
        out.update(median=median, min=present[0], max=present[-1])
    else:
        out.update(median=None, min=None, max=None)
    return out


def summarize_steady(runs, idle, hwm, codes):
    out = {"throughput": {}, "latency": {}, "cpu": {}, "rss_kb": {}, "steady_exit": codes}
    for kind in ("sat", "rate"):
        label = "saturation" if kind == "sat" else "rate_%d" % RATE
        tp, cpu = out["throughput"].setdefault(label, {}), out["cpu"].setdefault(label, {})
        for size in SIZES:
            direct, relay = runs[(kind, size, "direct")], runs[(kind, size, "relay")]
            entry = {}
            for path, rs in (("direct", direct), ("relay", relay)):
                entry[path] = {"pps": spread([r["pps"] for r in rs]), "mbps": spread([r["mbps"] for r in rs]),
                               "lost": [r["lost"] for r in rs], "received": [r["received"] for r in rs]}
                if kind == "rate":
                    entry[path]["loss"] = spread([r["loss"] for r in rs])
                entry[path]["background_cores"] = spread([background_cores(r) for r in rs])
            entry["ratio"] = spread([r["pps"] / d["pps"] if d["pps"] else None for d, r in zip(direct, relay)])
            tp[str(size)] = entry
            c = {}
            for who in ("client", "server", "echo", "loadgen"):
                rs = relay if who in ("client", "server") else direct
                c["%s_s_per_Mpkt" % who] = spread([
                    r["cpu"][who]["s"] / r["received"] * 1e6 if r["received"] and who in r["cpu"] else None
                    for r in rs])
            c["relay_us_per_pkt"] = spread([
                (r["cpu"]["client"]["s"] + r["cpu"]["server"]["s"]) / r["received"] * 1e6
                if r["received"] and "client" in r["cpu"] and "server" in r["cpu"] else None for r in relay])
            c["relay_us_per_pkt_stat"] = spread([
                (r["cpu"]["client"]["stat_s"] + r["cpu"]["server"]["stat_s"]) / r["received"] * 1e6
                if r["received"] and "client" in r["cpu"] and "server" in r["cpu"] else None for r in relay])
            c["cpu_source"] = relay[0]["cpu"].get("client", {}).get("source")
            c["core_share"] = {}  # share of one core each process got during the window
            for path, rs in (("direct", direct), ("relay", relay)):
                c["core_share"][path] = {
                    who: spread([r["cpu"][who]["s"] / r["seconds"] if r["seconds"] and who in r["cpu"] else None
                                 for r in rs])["median"]
                    for who in ("client", "server", "echo", "loadgen") if who in rs[0]["cpu"]}
            cpu[str(size)] = c
            if kind == "rate":
                lat = {}
                for path, rs in (("direct", direct), ("relay", relay)):
                    lat[path] = {q: spread([r["latency"].get(q) for r in rs]) for q in ("p50_ms", "p90_ms", "p99_ms")}
                lat["added_p50_ms"] = spread([
                    r["latency"]["p50_ms"] - d["latency"]["p50_ms"]
                    if r["latency"].get("p50_ms") is not None and d["latency"].get("p50_ms") is not None else None
                    for d, r in zip(direct, relay)])
                lat["added_p99_ms"] = spread([
                    r["latency"]["p99_ms"] - d["latency"]["p99_ms"]
                    if r["latency"].get("p99_ms") is not None and d["latency"].get("p99_ms") is not None else None
                    for d, r in zip(direct, relay)])
                out["latency"][str(size)] = lat
            else:
                out["latency"].setdefault("saturation", {})[str(size)] = {
                    path: {"p50_ms": spread([r["latency"].get("p50_ms") for r in rs])}
                    for path, rs in (("direct", direct), ("relay", relay))}
    out["loadgen_rcvbuf"] = runs[("sat", SIZES[0], "direct")][0].get("rcvbuf")
    every = [background_cores(r) for rs in runs.values() for r in rs]
    every = [v for v in every if v is not None]
    out["background_cores"] = {"median": spread(every)["median"], "max": max(every) if every else None,
                               "note": "CPU used by anything but the benchmark's processes during the "
                                       "measured windows, in cores (the machine has %s)" % os.cpu_count()}
    for who in ("client", "server"):
        loads = [r["rss_kb"].get(who) for key, rs in runs.items() if key[0] == "sat" and key[2] == "relay"
                 for r in rs]
        loads = [v for v in loads if v is not None]
        out["rss_kb"][who] = {"idle": idle.get(who), "load": max(loads) if loads else None, "peak_hwm": hwm.get(who)}
    return out


def background_cores(r):
    b = r["cpu"].get("_background")
    return b["other_s"] / r["seconds"] if b and r["seconds"] else None


def relay_us_per_pkt(r, who=("client", "server")):
    """CPU us of `who` (the relay: client + server) per echoed packet of one measurement."""
    if not r["received"] or any(w not in r["cpu"] for w in who):
        return None
    return sum(r["cpu"][w]["s"] for w in who) / r["received"] * 1e6


def ratio(a, b):
    return a / b if a is not None and b is not None and b > 0 else None


def added_p50(r, direct):
    a, d = r["latency"].get("p50_ms"), direct["latency"].get("p50_ms")
    return a - d if a is not None and d is not None else None


def summarize_floor(runs):
    """At RATE: the bare forwarders ("floor") against the direct path and the relay of the
    same repetition: what any CPython relay of this shape pays, and what mpudp adds to it."""
    out = {}
    for size in SIZES:
        direct, relay, floor = (runs[("rate", size, path)] for path in ("direct", "relay", "floor"))
        floor_cpu = [relay_us_per_pkt(r) for r in floor]
        floor_added = [added_p50(f, d) for f, d in zip(floor, direct)]
        out[str(size)] = {
            "relay_us_per_pkt": spread(floor_cpu),
            "added_p50_ms": spread(floor_added),
            "loss": spread([r["loss"] for r in floor]),
            "mpudp_minus_floor_us_per_pkt": spread([
                relay_us_per_pkt(r) - f if relay_us_per_pkt(r) is not None and f is not None else None
                for r, f in zip(relay, floor_cpu)]),
            "mpudp_minus_floor_added_p50_ms": spread([
                added_p50(r, d) - f if added_p50(r, d) is not None and f is not None else None
                for r, d, f in zip(relay, direct, floor_added)]),
        }
    return out


def summarize_redundancy(runs, counters, codes):
    """Redundancy 1 ("r1": the relay of summarize_steady) against REDUNDANCY ("r2") at
    REDUNDANT_SIZE, ratios r2/r1 per repetition; echoes delivered twice; the relays' counters."""
    out = {"redundancy": REDUNDANCY, "size": REDUNDANT_SIZE, "exit": codes}
    labels = {"r1": "relay", "r2": "redundant"}
    for kind in ("sat", "rate"):
        direct = runs[(kind, REDUNDANT_SIZE, "direct")]
        entry = {}
        for name, path in labels.items():
            rs = runs[(kind, REDUNDANT_SIZE, path)]
            e = {"pps": spread([r["pps"] for r in rs]), "mbps": spread([r["mbps"] for r in rs]),
                 "relay_us_per_pkt": spread([relay_us_per_pkt(r) for r in rs]),
                 "client_us_per_pkt": spread([relay_us_per_pkt(r, ("client",)) for r in rs]),
                 "server_us_per_pkt": spread([relay_us_per_pkt(r, ("server",)) for r in rs]),
                 "received": [r["received"] for r in rs], "lost": [r["lost"] for r in rs],
                 "duplicates": [r.get("duplicates") for r in rs], "seconds": [r["seconds"] for r in rs],
                 "background_cores": spread([background_cores(r) for r in rs])}
            if kind == "rate":
                e["loss"] = spread([r["loss"] for r in rs])
                e["p50_ms"] = spread([r["latency"].get("p50_ms") for r in rs])
                e["p99_ms"] = spread([r["latency"].get("p99_ms") for r in rs])
                e["added_p50_ms"] = spread([added_p50(r, d) for r, d in zip(rs, direct)])
            entry[name] = e
        pairs = list(zip(runs[(kind, REDUNDANT_SIZE, "relay")], runs[(kind, REDUNDANT_SIZE, "redundant")], direct))
        entry["ratio"] = {"pps": spread([ratio(r2["pps"], r1["pps"]) for r1, r2, _ in pairs]),
                          "relay_us_per_pkt": spread([ratio(relay_us_per_pkt(r2), relay_us_per_pkt(r1))
                                                      for r1, r2, _ in pairs])}
        if kind == "rate":
            entry["ratio"]["added_p50_ms"] = spread([ratio(added_p50(r2, d), added_p50(r1, d))
                                                     for r1, r2, d in pairs])
        out["saturation" if kind == "sat" else "rate_%d" % RATE] = entry
    # Every echo the generator got twice, on every path and size: must be 0.
    out["duplicates_delivered"] = {path: sum(r.get("duplicates") or 0 for key, rs in runs.items()
                                             if key[2] == path for r in rs)
                                   for path in ("direct", "relay", "redundant")}
    out["counters"] = {}
    for name, path in labels.items():
        sent = sum(r.get("sent_total", r["sent"]) for key, rs in runs.items() if key[2] == path for r in rs)
        c = dict(counters.get(path, {}), datagrams_sent=sent)
        server = c.get("server")
        # Copies the server dropped per datagram sent: 0 with redundancy 1, about 1 with 2.
        c["server_duplicate_per_datagram"] = (server.get("duplicate", 0) / float(sent)
                                              if server is not None and sent else None)
        out["counters"][name] = c
    return out


def flat_figures(result):
    """The figures the targets are judged on, by name."""
    f = {}
    tp, cpu, lat = result["throughput"], result["cpu"], result["latency"]
    f["ratio_sat_1200"] = tp["saturation"]["1200"]["ratio"]["median"]
    for size in SIZES:
        f["cpu_sat_%d" % size] = cpu["saturation"][str(size)]["relay_us_per_pkt"]["median"]
        f["cpu_rate_%d" % size] = cpu["rate_%d" % RATE][str(size)]["relay_us_per_pkt"]["median"]
        f["added_p50_%d" % size] = lat[str(size)]["added_p50_ms"]["median"]
    for who in ("client", "server"):
        kb = result["rss_kb"][who]["idle"]
        f["rss_idle_%s_mb" % who] = kb / 1024.0 if kb is not None else None
    f["startup_ms"] = result["startup"]["ms"]["median"]
    f["failover_gap_s"] = result["failover"]["gap_s"]["median"]
    red = result.get("redundancy")
    f["r2_duplicates"] = red["duplicates_delivered"]["redundant"] if red else None
    return f


def judge(result):
    figures = flat_figures(result)
    out = []
    for key, label, op, limit, go in TARGETS:
        value = figures.get(key)
        if value is None:
            ok = False
        elif op == ">=":
            ok = value >= limit
        elif op == "<=":
            ok = value <= limit
        else:
            ok = value < limit
        out.append({"key": key, "label": label, "op": op, "limit": limit, "value": value, "pass": ok, "go": go})
    return out


# ============================================================================
# Machine and repository
# ============================================================================


def machine_info(python):
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = None
    try:
        version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                                 stdout=subprocess.PIPE, universal_newlines=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = "?"
    return {"cpu_model": model, "cores": os.cpu_count(), "cores_allowed": allowed,
            "python": version, "python_bench": platform.python_version(),
            "implementation": platform.python_implementation(), "kernel": platform.release(),
            "system": platform.system(), "machine": platform.machine(), "clk_tck": CLK_TCK}


def git_info():
    def git(*args):
        try:
            return subprocess.run(["git"] + list(args), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, universal_newlines=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "mpudp_py_modified": bool(git("status", "--porcelain", "--", "mpudp.py"))}


# ============================================================================
# The table
# ============================================================================


def fmt(value, digits=0, thousands=True):
    if value is None:
        return "-"
    if thousands and digits == 0:
        return "{:,.0f}".format(value)
    return "%.*f" % (digits, value)


def cell(s, digits=0):
    """median [min-max] of a spread."""
    if s is None or s.get("median") is None:
        return "-"
    if s.get("min") == s.get("max") or len([v for v in s["runs"] if v is not None]) < 2:
        return fmt(s["median"], digits)
    return "%s [%s-%s]" % (fmt(s["median"], digits), fmt(s["min"], digits), fmt(s["max"], digits))


def render(result):
    lines = []
    add = lines.append
    m = result["machine"]
    reps = result["params"]["reps"]
    add("mpudp %s benchmark, %s%s" % (result["mpudp"]["version"], result.get("date", ""),
                                      "  (--quick: NOT comparable)" if result.get("quick") else ""))
    add("machine: %s, %s cores, Python %s (%s), kernel %s" % (
        m["cpu_model"], m["cores"], m["python"], m["implementation"], m["kernel"]))
    git = result["mpudp"]["git"]
    add("commit %s%s; %d run(s) per figure, shown as median [min-max]; run took %.0f s" % (
        (git["commit"] or "?")[:12], " + uncommitted mpudp.py" if git["mpudp_py_modified"] else "", reps,
        result.get("elapsed_s", 0)))
    add("")
    w = (28, 26, 26, 20)
    row = lambda *c: add("".join(str(x).ljust(n) for x, n in zip(c, w)).rstrip())
    row("", "direct (gen->echo)", "relay (gen->client->server->echo)", "")
    row("THROUGHPUT", "", "", "relay/direct")
    for label, key in (("saturation", "saturation"), ("%d pps" % RATE, "rate_%d" % RATE)):
        for size in SIZES:
            e = result["throughput"][key][str(size)]
            row("%s %d B  pkt/s" % (label, size), cell(e["direct"]["pps"]), cell(e["relay"]["pps"]),
                cell(e["ratio"], 2))
            row("%s %d B  Mbit/s" % (label, size), cell(e["direct"]["mbps"], 1), cell(e["relay"]["mbps"], 1), "")
            if key != "saturation":
                row("%s %d B  loss %%" % (label, size), cell(pct(e["direct"]["loss"]), 2),
                    cell(pct(e["relay"]["loss"]), 2), "")
    add("")
    row("LATENCY (RTT, ms)", "", "", "added by relay")
    for size in SIZES:
        l = result["latency"][str(size)]
        row("%d pps %d B  p50" % (RATE, size), cell(l["direct"]["p50_ms"], 3), cell(l["relay"]["p50_ms"], 3),
            "+" + cell(l["added_p50_ms"], 3))
        row("%d pps %d B  p99" % (RATE, size), cell(l["direct"]["p99_ms"], 3), cell(l["relay"]["p99_ms"], 3),
            "+" + cell(l["added_p99_ms"], 3))
    for size in SIZES:
        l = result["latency"]["saturation"][str(size)]
        row("saturation %d B  p50" % size, cell(l["direct"]["p50_ms"], 3), cell(l["relay"]["p50_ms"], 3),
            "(window %d)" % result["params"]["window"])
    add("")
    add("CPU per echoed packet (us = CPU s per million packets; source: %s)" % (
        result["cpu"]["saturation"]["1200"].get("cpu_source")))
    w2 = (24, 20, 20, 24, 40)
    row2 = lambda *c: add("".join(str(x).ljust(n) for x, n in zip(c, w2)).rstrip())
    row2("", "client", "server", "relay (client+server)", "core share: client/server/echo/loadgen")
    for label, key in (("saturation", "saturation"), ("%d pps" % RATE, "rate_%d" % RATE)):
        for size in SIZES:
            c = result["cpu"][key][str(size)]
            share = c["core_share"]["relay"]
            row2("%s %d B" % (label, size), cell(c["client_s_per_Mpkt"], 1), cell(c["server_s_per_Mpkt"], 1),
                 cell(c["relay_us_per_pkt"], 1),
                 "/".join("%.0f%%" % (100 * share[k]) if share.get(k) is not None else "-"
                          for k in ("client", "server", "echo", "loadgen")))
    for size in SIZES:
        c = result["cpu"]["saturation"][str(size)]
        share = c["core_share"]["direct"]
        row2("direct path sat. %d B" % size, "echo %s" % cell(c["echo_s_per_Mpkt"], 1),
             "gen %s" % cell(c["loadgen_s_per_Mpkt"], 1), "",
             "-/-/" + "/".join("%.0f%%" % (100 * share[k]) if share.get(k) is not None else "-"
                               for k in ("echo", "loadgen")))
    add("")
    if result.get("floor"):
        render_floor(result, row)
        add("")
    if result.get("redundancy"):
        render_redundancy(result["redundancy"], result["params"], row, add)
        add("")
    add("MEMORY (VmRSS, MB)      idle      under load   peak (VmHWM)")
    for who in ("client", "server"):
        r = result["rss_kb"][who]
        add("  %-20s  %-9s %-12s %s" % (who, mb(r["idle"]), mb(r["load"]), mb(r["peak_hwm"])))
    add("  (a bare interpreter here: %s MB)" % mb(result["startup"].get("python_bare_rss_kb")))
    add("")
    s = result["startup"]
    add("START-UP to forwarding, fresh server + client: %s ms" % cell(s["ms"], 1))
    add("  for reference: a fresh client alone %s ms; python3 -c pass %s ms; mpudp.py --version %s ms" % (
        cell(s.get("client_only_ms"), 1), s["python_startup_ms"], s["mpudp_version_ms"]))
    fo, rs = result["failover"], result["restart"]
    add("FAILOVER gap at %d pps, active link blackholed: %s s" % (
        result["params"]["failover_rate_pps"], cell(fo["gap_s"], 3)))
    add("SERVER RESTART: first echo %s s after the new server's spawn; outage %s s" % (
        cell(rs["resume_s"], 3), cell(rs["outage_s"], 3)))
    bg = result.get("background_cores") or {}
    if bg.get("median") is not None:
        add("Background CPU (other processes) during the measured windows: median %.2f, max %.2f cores" % (
            bg["median"], bg["max"]))
        for key, what in (("saturation", "saturation throughput is understated"),
                          ("rate_%d" % RATE, "the %d pps latencies may be inflated" % RATE)):
            entries = [(e, ("direct", "relay")) for e in result["throughput"][key].values()]
            if result.get("redundancy"):
                entries.append((result["redundancy"][key], ("r2",)))
            busy = [v for e, paths in entries for path in paths
                    for v in e[path].get("background_cores", {}).get("runs", []) if v is not None and v > 0.25]
            if busy:
                add("  ** %d %s window(s) had more than 0.25 cores of other load: %s **" % (len(busy), key, what))
    add("")
    add("TARGETS                                        value      target     Go original")
    for t in result["targets"]:
        digits = 3 if t["key"].startswith(("added", "failover", "ratio")) else 1
        limit_digits = 2 if t["limit"] < 1 else 1
        if isinstance(t["limit"], int):  # a count
            digits = limit_digits = 0
        add("  [%s] %-40s %-10s %-2s %-7s %s" % (
            "PASS" if t["pass"] else "FAIL", t["label"], fmt(t["value"], digits), t["op"],
            fmt(t["limit"], limit_digits, thousands=False), "-" if t["go"] is None else t["go"]))
    passed = sum(1 for t in result["targets"] if t["pass"])
    add("  %d of %d targets met" % (passed, len(result["targets"])))
    return "\n".join(lines)


def render_floor(result, row):
    """The floor rows: bare forwarders in place of client and server, at RATE."""
    row("FLOOR at %d pps" % RATE, "bare forwarders", "mpudp (relay)", "mpudp - floor")
    for size in SIZES:
        f, c = result["floor"][str(size)], result["cpu"]["rate_%d" % RATE][str(size)]
        row("%d B  CPU us/pkt" % size, cell(f["relay_us_per_pkt"], 1), cell(c["relay_us_per_pkt"], 1),
            cell(f["mpudp_minus_floor_us_per_pkt"], 1))
        row("%d B  added RTT p50 ms" % size, "+" + cell(f["added_p50_ms"], 3),
            "+" + cell(result["latency"][str(size)]["added_p50_ms"], 3), cell(f["mpudp_minus_floor_added_p50_ms"], 3))
    row("  (two stdlib selectors processes forwarding with recvfrom_into/send, no protocol)", "", "", "")


def render_redundancy(red, params, row, add):
    """The redundancy 2 against 1 rows (`row`, `add`: render's column and line writers)."""
    row("REDUNDANCY, %d B" % red["size"], "redundancy 1 (= relay)",
        "redundancy %d" % red["redundancy"], "r%d/r1" % red["redundancy"])
    sat, rate = red["saturation"], red["rate_%d" % RATE]
    row("saturation pkt/s", cell(sat["r1"]["pps"]), cell(sat["r2"]["pps"]), cell(sat["ratio"]["pps"], 2))
    row("saturation Mbit/s", cell(sat["r1"]["mbps"], 1), cell(sat["r2"]["mbps"], 1), "")
    row("saturation CPU us/pkt", cell(sat["r1"]["relay_us_per_pkt"], 1), cell(sat["r2"]["relay_us_per_pkt"], 1),
        cell(sat["ratio"]["relay_us_per_pkt"], 2))
    row("%d pps CPU us/pkt" % RATE, cell(rate["r1"]["relay_us_per_pkt"], 1),
        cell(rate["r2"]["relay_us_per_pkt"], 1), cell(rate["ratio"]["relay_us_per_pkt"], 2))
    for label, key in (("  client", "client_us_per_pkt"), ("  server", "server_us_per_pkt")):
        row(label, cell(rate["r1"][key], 1), cell(rate["r2"][key], 1), "")
    added = lambda s: "-" if s["median"] is None else "+" + cell(s, 3)
    row("%d pps added RTT p50 ms" % RATE, added(rate["r1"]["added_p50_ms"]), added(rate["r2"]["added_p50_ms"]),
        cell(rate["ratio"]["added_p50_ms"], 2))
    row("%d pps loss %%" % RATE, cell(pct(rate["r1"]["loss"]), 2), cell(pct(rate["r2"]["loss"]), 2), "")
    dup = red["duplicates_delivered"]
    row("echoes delivered twice", dup["relay"], dup["redundant"], "(direct %d)" % dup["direct"])
    copies = []
    for name in ("r1", "r2"):
        c = red["counters"][name]
        copies.append("%s / %s" % tuple("-" if c.get(who) is None else fmt(c[who].get("duplicate", 0))
                                        for who in ("server", "client")))
    row('"duplicate" server/client', copies[0], copies[1], "")
    per = red["counters"]["r2"].get("server_duplicate_per_datagram")
    add("  (r%d: windows of %.1f s at saturation and %.1f s at %d pps; its server dropped %s copies per datagram)" % (
        red["redundancy"], params.get("redundant_sat_s", 0), params.get("redundant_rate_s", 0), RATE, fmt(per, 2)))


def pct(s):
    """A spread of fractions as percentages."""
    if s is None:
        return None
    scale = lambda v: v * 100 if isinstance(v, (int, float)) else v
    out = {k: scale(v) for k, v in s.items() if k != "runs"}
    out["runs"] = [scale(v) for v in s["runs"]]
    return out


def mb(kb):
    return "-" if kb is None else "%.1f" % (kb / 1024.0)


# ============================================================================
# Main
# ============================================================================


def main(argv=None):
    parser = argparse.ArgumentParser(description="End-to-end benchmark of mpudp (see the module docstring).")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (figures not comparable)")
    parser.add_argument("--save", metavar="PATH", help="also write the JSON result to PATH")
    parser.add_argument("--show", metavar="PATH", help="print the table of a saved JSON result and exit")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs mpudp.py")
    parser.add_argument("--window", type=int, default=WINDOW, help="datagrams in flight at saturation (%(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.role == "echo":
        return role_echo()
    if args.role == "loadgen":
        return role_loadgen()
    if args.role == "forward":
        return role_forward(int(args.role_args[0]))
    if args.role == "links":
        return role_links(int(args.role_args[0]), int(args.role_args[1]))
    if args.show:
        with open(args.show) as f:
            print(render(json.load(f)))
        return 0

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    params = dict(QUICK if args.quick else FULL, window=args.window)
    workdir = tempfile.mkdtemp(prefix="mpudp-bench-")
    bench = None
    started = time.monotonic()
    try:
        bench = Bench(params, args.python, workdir)
        result = bench.run()
    except BenchError as exc:
        sys.stderr.write("bench: %s\n" % exc)
        if bench is not None:
            for k in bench.kids.all:
                if not k.name.startswith(("echo", "loadgen", "links")):
                    sys.stderr.write("--- %s (pid %d, exit %r) log tail:\n%s" % (
                        k.name, k.pid, k.proc.poll(), k.tail()))
        return 1
    finally:
        if bench is not None:
            bench.kids.close()
        if args.keep:
            sys.stderr.write("bench: work directory kept: %s\n" % workdir)
        else:
            for name in os.listdir(workdir):
                os.unlink(os.path.join(workdir, name))
            os.rmdir(workdir)
    result["quick"] = args.quick
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["targets"] = judge(result)
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.save:
        with open(args.save, "w") as f:
            f.write(text + "\n")
    print(text if args.json else render(result))
    progress("done in %.1f s" % result["elapsed_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
