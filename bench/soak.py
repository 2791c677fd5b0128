#!/usr/bin/env python3
"""Soak: hours of life in minutes; watch the memory and file descriptors of client and server.

    python3 bench/soak.py [--minutes 5] [--pps 100] [--json results.json]

Starts an echo upstream, an mpudp server, one tests/linkemu.LinkEmulator per
link and an mpudp client (real processes, loopback only), then for --minutes:

- steady traffic: --pps datagrams a second from the local applications, each
  echoed back by the upstream;
- sessions churning: every --churn-every seconds the oldest application socket
  is closed and a new one opened (a new session on both sides; the idle ones
  expire after --session-timeout seconds);
- links flapping: every --flap-every seconds one link (in turn) is blackholed
  for half that time, so the client fails over and back.

RSS (VmRSS) and the open file descriptor count (/proc/PID/fd) of client and
server are sampled at the start, every --sample-every seconds and at the end,
printed as a table, then summarised as JSON (also written to --json).
Linux only (/proc); standard library only.
"""

import argparse
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import mpudp  # noqa: E402
from linkemu import LinkEmulator  # noqa: E402


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


class Echo(threading.Thread):
    """The upstream: echoes every datagram."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = False

    def run(self):
        while not self.stopping:
            try:
                data, addr = self.sock.recvfrom(65536)
                self.sock.sendto(data, addr)
            except socket.timeout:
                continue
            except OSError:
                if self.stopping:
                    return


class Daemon:
    """python3 mpudp.py -config=PATH with its log in a file."""

    def __init__(self, config_path, log_path):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "mpudp.py"), "-config=%s" % config_path],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_for(self, text, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path) as f:
                if text in f.read():
                    return True
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit("no %r in %s (exit %r)" % (text, self.log_path, self.proc.poll()))

    def count(self, text):
        with open(self.log_path) as f:
            return sum(1 for line in f if text in line)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class Traffic(threading.Thread):
    """Applications sending unique payloads at `pps`; one is replaced every `churn_s` seconds."""

    def __init__(self, target, pps, apps, churn_s):
        super().__init__(daemon=True)
        self.target, self.pps, self.churn_s = target, pps, churn_s
        self.selector = selectors.DefaultSelector()
        self.apps = []
        for _ in range(apps):
            self._open_app()
        self.sent = self.received = self.sessions_opened = 0
        self.lock = threading.Lock()
        self.stopping = False

    def _open_app(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ)
        self.apps.append(sock)

    def counts(self):
        with self.lock:
            return self.sent, self.received

    def run(self):
        start = time.monotonic()
        next_churn = start + self.churn_s
        n = 0
        while not self.stopping:
            now = time.monotonic()
            due = int((now - start) * self.pps)
            while n < due:
                app = self.apps[n % len(self.apps)]
                try:
                    app.sendto(b"soak:%d" % n, self.target)
                except OSError:
                    pass
                n += 1
                with self.lock:
                    self.sent += 1
            if now >= next_churn:
                old = self.apps.pop(0)
                self.selector.unregister(old)
                old.close()
                self._open_app()
                self.sessions_opened += 1
                next_churn += self.churn_s
            for key, _ in self.selector.select(0.005):
                while True:
                    try:
                        key.fileobj.recv(65536)
                    except OSError:
                        break
                    with self.lock:
                        self.received += 1
        for sock in self.apps:
            sock.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--pps", type=float, default=100.0, help="application datagrams a second (all apps)")
    parser.add_argument("--apps", type=int, default=4, help="application sockets at once")
    parser.add_argument("--links", type=int, default=2)
    parser.add_argument("--churn-every", type=float, default=3.0, help="seconds between session replacements")
    parser.add_argument("--flap-every", type=float, default=10.0, help="seconds between link flaps")
    parser.add_argument("--session-timeout", type=float, default=15.0, help="session_timeout_sec, both sides")
    parser.add_argument("--sample-every", type=float, default=30.0)
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="mpudp-soak-")
    server_key, client_key = mpudp.generate_private_key(), mpudp.generate_private_key()
    echo = Echo()
    echo.start()
    server_port, client_port = free_port(), free_port()

    def config(name, data):
        path = os.path.join(workdir, name)
        with open(path, "w") as f:
            json.dump(data, f)
        os.chmod(path, 0o600)
        return path

    server = Daemon(config("server.json", {"mode": "server", "server": {
        "listen_addr": "127.0.0.1:%d" % server_port, "upstream_addr": "127.0.0.1:%d" % echo.port,
        "session_timeout_sec": args.session_timeout,
        "server_private_key": mpudp.encode_key(server_key),
        "client_public_keys": [mpudp.encode_key(mpudp.public_key(client_key))]}}),
        os.path.join(workdir, "server.log"))
    server.wait_for("server listening on")
    links = [LinkEmulator(("127.0.0.1", server_port), seed=i).start() for i in range(args.links)]
    client = Daemon(config("client.json", {"mode": "client", "client": {
        "listen_addr": "127.0.0.1:%d" % client_port,
        "links": [{"remote_addr": "%s:%d" % link.address[:2]} for link in links],
        "heartbeat_interval_sec": 0.2, "session_timeout_sec": args.session_timeout,
        "client_private_key": mpudp.encode_key(client_key),
        "server_public_key": mpudp.encode_key(mpudp.public_key(server_key))}}),
        os.path.join(workdir, "client.log"))
    client.wait_for("handshake done")
    traffic = Traffic(("127.0.0.1", client_port), args.pps, args.apps, args.churn_every)
    traffic.start()

    header = "%7s  %13s %10s  %13s %10s  %8s %8s %9s  %8s %6s" % (
        "t s", "client RSS kB", "client fds", "server RSS kB", "server fds", "sent", "echoed", "delivered",
        "sessions", "flaps")
    print("soak for %g min in %s (logs there); %d link(s), %g pps, a new session every %gs, a flap every %gs"
          % (args.minutes, workdir, args.links, args.pps, args.churn_every, args.flap_every))
    print(header)
    samples = []
    flaps = 0
    last = (0, 0)

    def sample(t):
        nonlocal last
        sent, received = traffic.counts()
        interval = (sent - last[0], received - last[1])
        last = (sent, received)
        row = {"t": round(t, 1),
               "client_rss_kb": rss_kb(client.proc.pid), "client_fds": fd_count(client.proc.pid),
               "server_rss_kb": rss_kb(server.proc.pid), "server_fds": fd_count(server.proc.pid),
               "sent": sent, "echoed": received,
               "delivered": round(interval[1] / interval[0], 4) if interval[0] else None,
               "sessions_opened": args.apps + traffic.sessions_opened, "flaps": flaps}
        samples.append(row)
        print("%7.1f  %13d %10d  %13d %10d  %8d %8d %9s  %8d %6d" % (
            row["t"], row["client_rss_kb"], row["client_fds"], row["server_rss_kb"], row["server_fds"],
            sent, received, "-" if row["delivered"] is None else "%.1f%%" % (100 * row["delivered"]),
            row["sessions_opened"], flaps))
        sys.stdout.flush()

    start = time.monotonic()
    end = start + args.minutes * 60
    next_sample = start + args.sample_every
    next_flap = start + args.flap_every
    restore_at = None
    flapped = None
    stopped_early = None
    time.sleep(1.0)  # the first sessions are open and echoing
    sample(time.monotonic() - start)
    try:
        while time.monotonic() < end:
            now = time.monotonic()
            if restore_at is not None and now >= restore_at:
                links[flapped].set(blackhole=False)
                restore_at = None
            if now >= next_flap:
                flapped = flaps % len(links)
                links[flapped].set(blackhole=True)
                restore_at = now + args.flap_every / 2
                flaps += 1
                next_flap += args.flap_every
            if now >= next_sample:
                sample(now - start)
                next_sample += args.sample_every
            if client.proc.poll() is not None or server.proc.poll() is not None:
                stopped_early = "client" if client.proc.poll() is not None else "server"
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        stopped_early = "interrupted"
    for link in links:
        link.set(blackhole=False)
    time.sleep(1.0)  # let the last echoes come back
    traffic.stopping = True
    traffic.join(5)
    if client.proc.poll() is None and server.proc.poll() is None:
        sample(time.monotonic() - start)
    switches = client.count("switch link")
    codes = {"client": client.stop(), "server": server.stop()}
    for link in links:
        link.close()
    echo.stopping = True

    first, final = samples[0], samples[-1]
    sent, received = traffic.counts()
    summary = {
        "minutes": round((time.monotonic() - start) / 60, 2),
        "pps": args.pps, "links": args.links, "flaps": flaps, "switches": switches,
        "sessions_opened": final["sessions_opened"],
        "sent": sent, "echoed": received, "delivered": round(received / sent, 4) if sent else None,
        "client": {"rss_kb_start": first["client_rss_kb"], "rss_kb_end": final["client_rss_kb"],
                   "rss_kb_max": max(s["client_rss_kb"] for s in samples),
                   "fds_start": first["client_fds"], "fds_end": final["client_fds"],
                   "fds_max": max(s["client_fds"] for s in samples), "exit": codes["client"]},
        "server": {"rss_kb_start": first["server_rss_kb"], "rss_kb_end": final["server_rss_kb"],
                   "rss_kb_max": max(s["server_rss_kb"] for s in samples),
                   "fds_start": first["server_fds"], "fds_end": final["server_fds"],
                   "fds_max": max(s["server_fds"] for s in samples), "exit": codes["server"]},
        "stopped_early": stopped_early,
        "samples": samples,
        "workdir": workdir,
    }
    printable = dict(summary)
    del printable["samples"]
    print(json.dumps(printable, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    ok = stopped_early is None and codes == {"client": 0, "server": 0}
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
