"""Starting, steering and stopping the benchmark's processes, and the order of the windows.

`Bench.run()` is the whole measurement: it spawns the helper roles (roles.py) and
the relays (mpudp.py, the floor's bare forwarders and, with --go, the Go
original), interleaves their windows per repetition, and returns the raw
results for summary.py.  Every child runs in its own process group with
PR_SET_PDEATHSIG, and `Kids.close()` ends every group, so nothing outlives a run.
"""

import hashlib
import json
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import time

import procfs
from params import (BENCH, FAILOVER_RATE, GO_CLIENT_CONFIG, GO_SERVER_CONFIG, HOST, MPUDP, PATHS, RATE,
                    REDUNDANCY, REDUNDANT_SIZE, RELAY_CONFIG, ROOT, SIZES, STATUS_WAIT_S)


class BenchError(Exception):
    """A run that cannot go on: a child died, did not answer, or a relay never forwarded."""


# ============================================================================
# Children, process groups, clean-up
# ============================================================================

try:
    import ctypes

    _LIBC = ctypes.CDLL(None, use_errno=True)
except Exception:  # not Linux, or no ctypes: Kids.close() still cleans up
    _LIBC = None


def _die_with_parent():
    """preexec_fn: SIGKILL this child if the harness dies (PR_SET_PDEATHSIG)."""
    if _LIBC is not None:
        try:
            _LIBC.prctl(1, signal.SIGKILL, 0, 0, 0)
        except Exception:
            pass


def child_environment():
    """The environment of every child: the harness's, as a user's shell would have it: without
    PYTHONDONTWRITEBYTECODE, so the relays load cached bytecode (their RSS is a user's)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


class Child(object):
    """A child process in its own process group; stdin/stdout speak JSON lines if `talk`."""

    def __init__(self, kids, name, argv, log_dir, talk=True):
        self.name = name
        self.log_path = os.path.join(log_dir, "%s.%d.log" % (name, len(kids.all)))
        self.log = open(self.log_path, "w")
        self.spawned_at = time.monotonic()
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.PIPE if talk else subprocess.DEVNULL,
            stdout=subprocess.PIPE if talk else self.log, stderr=self.log, env=child_environment(),
            start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        self.ready = None
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

    def rss_kb(self, key="VmRSS"):
        return procfs.proc_status_kb(self.pid, key)

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


_T0 = time.monotonic()


def progress(message):
    sys.stderr.write("[bench %6.1fs] %s\n" % (time.monotonic() - _T0, message))
    sys.stderr.flush()


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def relay_keys():
    """A fresh server and client key pair, base64 as the configs take them."""
    sys.path.insert(0, ROOT)
    import mpudp  # the keys only: the relays run in their own processes
    server_key, client_key = mpudp.generate_private_key(), mpudp.generate_private_key()
    return {"server_private": mpudp.encode_key(server_key),
            "server_public": mpudp.encode_key(mpudp.public_key(server_key)),
            "client_private": mpudp.encode_key(client_key),
            "client_public": mpudp.encode_key(mpudp.public_key(client_key))}


def write_config(directory, name, data):
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    return path


# ============================================================================
# The Go original
# ============================================================================


class GoOriginal(object):
    """The Go original's `mpudp` and `keygen` binaries, built from its source outside this
    repository.  `path` is a directory holding both (or mpudp/mpudp and keygen/keygen, as
    its source tree builds them), or the mpudp binary itself, `keygen` then beside it or
    given."""

    def __init__(self, path, keygen=None):
        if os.path.isdir(path):
            self.mpudp = _first_executable(path, ("mpudp", os.path.join("mpudp", "mpudp")))
            self.keygen = keygen or _first_executable(path, ("keygen", os.path.join("keygen", "keygen")))
        else:
            self.mpudp = path
            self.keygen = keygen or os.path.join(os.path.dirname(os.path.abspath(path)), "keygen")
        for what, binary in (("mpudp", self.mpudp), ("keygen", self.keygen)):
            if not binary or not os.path.isfile(binary) or not os.access(binary, os.X_OK):
                raise BenchError("--go: no executable %s binary at %s" % (what, binary or path))

    def key_pair(self):
        """(private, public) base64 keys from the original's keygen (ed25519)."""
        out = subprocess.run([self.keygen], stdout=subprocess.PIPE, universal_newlines=True, timeout=30).stdout
        keys = {}
        for line in out.splitlines():
            label, _, value = line.partition(":")
            keys[label.split()[0].lower() if label.split() else ""] = value.strip()
        if not keys.get("private") or not keys.get("public"):
            raise BenchError("--go: unexpected keygen output: %r" % out[:200])
        return keys["private"], keys["public"]

    def info(self):
        """What identifies the binaries in a saved result."""
        with open(self.mpudp, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        return {"measured": True, "mpudp": self.mpudp, "keygen": self.keygen, "mpudp_sha256": digest}


def _first_executable(directory, names):
    for name in names:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    return None


# ============================================================================
# The run
# ============================================================================

DESCRIPTIONS = {"relay": "mpudp", "redundant": "mpudp with redundancy %d" % REDUNDANCY,
                "floor": "the bare forwarders", "go": "the Go original"}


class Bench(object):
    """One benchmark run: `run()` returns the raw results (see summary.py for the figures)."""

    def __init__(self, params, python, workdir, go=None):
        self.p = params
        self.python = python
        self.dir = workdir
        self.go = go
        self.kids = Kids()
        self.phase = 0
        self.keys = relay_keys()
        import mpudp  # its version only; the relay itself runs in its own processes
        self.mpudp_version = getattr(mpudp, "__version__", "?")
        # As packaging/install.sh does: mpudp.py re-executes itself as `import mpudp`, which
        # loads this bytecode instead of compiling (and keeping the compiler's memory).
        subprocess.run([python, "-m", "compileall", "-q", MPUDP], stdout=subprocess.DEVNULL, check=False)

    # -- children --------------------------------------------------------------

    def helper(self, role, *args):
        """A process of roles.py; waits for its ready line (in .ready)."""
        child = Child(self.kids, role, [sys.executable, BENCH, "--role", role] + list(args), self.dir)
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

    def go_relay(self):
        """The Go original's server and client, configured as mpudp's relay is (two links to the
        server, heartbeats every 0.5 s).  Its links are told apart by remote address only, so
        both carry the same one: link 0 carries the data, as in mpudp's pair."""
        server_private, server_public = self.go.key_pair()
        client_private, client_public = self.go.key_pair()
        server_port, client_port = free_udp_port(), free_udp_port()
        server_cfg = dict(GO_SERVER_CONFIG, listen_addr="%s:%d" % (HOST, server_port),
                          upstream_addrs=["%s:%d" % tuple(self.echo_addr)], server_private_key=server_private,
                          client_public_keys=[client_public])
        client_cfg = dict(GO_CLIENT_CONFIG, listen_addr="%s:%d" % (HOST, client_port),
                          links=[{"remote_addr": "%s:%d" % (HOST, server_port), "priority": 0.0}] * 2,
                          client_private_key=client_private, server_public_key=server_public)
        paths = {mode: write_config(self.dir, "go-%s.json" % mode, {"mode": mode, mode: cfg})
                 for mode, cfg in (("server", server_cfg), ("client", client_cfg))}
        server = Child(self.kids, "go-server", [self.go.mpudp, "-config=%s" % paths["server"]], self.dir, talk=False)
        client = Child(self.kids, "go-client", [self.go.mpudp, "-config=%s" % paths["client"]], self.dir, talk=False)
        return {"server": server, "client": client, "addr": [HOST, client_port]}

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
                  "go": self.go.info() if self.go else {"measured": False},
                  "params": dict(self.p, rate_pps=RATE, sizes=list(SIZES),
                                 failover_rate_pps=FAILOVER_RATE, relay_config=RELAY_CONFIG,
                                 go_config={"server": GO_SERVER_CONFIG, "client": GO_CLIENT_CONFIG},
                                 host=HOST, python=self.python),
                  "load_average": {"start": procfs.load_average()}}
        self.echo = self.helper("echo")
        self.echo_addr = [HOST, self.echo.ready["port"]]
        self.loadgen = self.helper("loadgen")
        progress("echo on %s, load generator pid %d" % (self.echo_addr[1], self.loadgen.pid))
        result["startup"] = self.startup()
        result["steady"] = self.steady_state()
        result["failover"], result["restart"] = self.failover_and_restart()
        result["load_average"]["end"] = procfs.load_average()
        return result

    def steady_state(self):
        """Throughput, latency, CPU and RSS of every path of PATHS, their windows interleaved:
        in each repetition every path's window of one figure runs back to back, in PATHS order
        (backwards in odd repetitions).  The raw results, for summary.summarize_run."""
        relays = {"relay": self.relay("", {}), "redundant": self.relay("-r2", {"redundancy": REDUNDANCY}),
                  "floor": self.floor()}
        if self.go:
            relays["go"] = self.go_relay()
        for path in PATHS:
            if path in relays:
                self.wait_forwarding(relays[path]["addr"], DESCRIPTIONS[path])
        time.sleep(self.p["idle_s"])
        idle = {path: {who: rel[who].rss_kb() for who in ("client", "server")} for path, rel in relays.items()}
        targets = dict({path: rel["addr"] for path, rel in relays.items()}, direct=self.echo_addr)
        pids = {path: {"client": rel["client"].pid, "server": rel["server"].pid, "echo": self.echo.pid}
                for path, rel in relays.items()}
        pids["direct"] = pids["relay"]
        runs = {}  # "kind size path" -> list of results, one per repetition
        for rep in range(self.p["reps"]):
            order = [path for path in PATHS if path in targets]
            if rep % 2:
                order.reverse()
            for kind in ("sat", "rate"):
                for size in SIZES:
                    for path in order:
                        if path == "redundant" and size != REDUNDANT_SIZE:
                            continue
                        seconds = self.p[("redundant_%s_s" if path == "redundant" else "%s_s") % kind]
                        r = self.measure(kind, size, targets[path], pids[path], seconds)
                        runs.setdefault((kind, size, path), []).append(r)
                        progress("rep %d %-4s %4d B %-9s %8.0f pps  p50 %.3f ms  loss %s" % (
                            rep + 1, kind, size, path, r["pps"], r["latency"].get("p50_ms") or 0,
                            r.get("loss") if kind == "rate" else r["lost"]))
        hwm = {path: {who: rel[who].rss_kb("VmHWM") for who in ("client", "server")} for path, rel in relays.items()}
        counters = self.relay_counters({path: relays[path] for path in ("relay", "redundant")}, since=time.time())
        codes = {path: {who: rel[who].stop() for who in ("client", "server")} for path, rel in relays.items()}
        return {"runs": runs, "idle_rss_kb": idle, "hwm_kb": hwm, "counters": counters, "exit": codes,
                "paths": sorted(relays)}

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
            ms, server, code = self.time_to_first_echo(client_port, lambda: (
                self.server(server_port, self.echo_addr[1], name="startup-server"),
                self.client(client_port, [server_port, server_port], name="startup-client")))
            # For reference: a fresh client alone, the server already running.
            client_port = free_udp_port()
            client_ms, _, code2 = self.time_to_first_echo(client_port, lambda: (
                None, self.client(client_port, [server_port, server_port], name="startup-client")))
            codes = {"client": [code, code2], "server": server.stop()}
            runs.append({"ms": ms, "client_only_ms": client_ms, "exit": codes})
            progress("start-up %d: %s ms (a fresh client alone: %s ms)" % (
                rep + 1, "%.1f" % ms if ms is not None else "no echo",
                "%.1f" % client_ms if client_ms is not None else "no echo"))
        return {"runs": runs, "python_startup_ms": time_command([self.python, "-c", "pass"]),
                "mpudp_version_ms": time_command([self.python, MPUDP, "--version"]),
                "python_bare_rss_kb": bare_rss(self.python)}

    def time_to_first_echo(self, client_port, spawn):
        """Ms from `spawn()` (-> (server or None, client)) to the first echo through the client's
        port, while the generator already sends there; (ms or None, server, client's exit)."""
        self.loadgen.send({"cmd": "first_echo", "target": [HOST, client_port], "size": 64,
                           "interval": 0.001, "timeout": 10.0, "phase": self.next_phase()})
        time.sleep(0.02)  # the generator is sending before anything is spawned
        spawned = time.monotonic()
        server, client = spawn()
        reply = self.loadgen.recv(20)
        ms = (reply["first"] - spawned) * 1000 if reply["first"] is not None else None
        return ms, server, client.stop()

    def failover_and_restart(self):
        server_port, client_port = free_udp_port(), free_udp_port()
        links = self.helper("links", str(server_port), "2")
        server = self.server(server_port, self.echo_addr[1], name="fo-server")
        client = self.client(client_port, links.ready["ports"], name="fo-client")
        relay_addr = [HOST, client_port]
        self.wait_forwarding(relay_addr, "the emulated links")
        time.sleep(2.0)  # both links answering long enough to be steady candidates
        failovers = [self.failover(rep, links, relay_addr) for rep in range(self.p["failover_reps"])]
        time.sleep(1.0)
        restarts = []
        for rep in range(self.p["restart_reps"]):
            run, server = self.restart(rep, server, server_port, relay_addr)
            restarts.append(run)
        codes = {"client": client.stop(), "server": server.stop()}
        links.stop()
        return {"runs": failovers, "exit": codes}, {"runs": restarts}

    def failover(self, rep, links, relay_addr):
        """Blackhole the link carrying the data at FAILOVER_RATE; the longest gap in echoes."""
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
        progress("failover %d: link %d blackholed, gap %s s, %d lost" % (
            rep + 1, active, "%.3f" % gap if gap is not None else "?", r["lost"]))
        return {"gap_s": gap, "link": active, "lost": r["lost"], "sent": r["sent"]}

    def restart(self, rep, server, server_port, relay_addr):
        """SIGTERM the server, spawn a new one on its port; (the run's figures, the new server)."""
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
        after = [t for t in r["arrivals"] if t > respawned]
        before = [t for t in r["arrivals"] if t <= killed]
        resume = after[0] - respawned if after else None
        outage = after[0] - before[-1] if after and before else None
        progress("restart %d: first echo %s s after the new server's spawn (outage %s s)" % (
            rep + 1, "%.3f" % resume if resume is not None else "never",
            "%.3f" % outage if outage is not None else "?"))
        return {"resume_s": resume, "outage_s": outage, "old_server_exit": code,
                "stop_wait_s": respawned - killed}, server


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
            "system": platform.system(), "machine": platform.machine(), "clk_tck": procfs.CLK_TCK}


def git_info():
    def git(*args):
        try:
            return subprocess.run(["git"] + list(args), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, universal_newlines=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "mpudp_py_modified": bool(git("status", "--porcelain", "--", "mpudp.py"))}
