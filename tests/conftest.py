"""Shared test fixtures: fake clock, keys, echo upstream, mpudp processes, relay pairs,
throw-away network namespaces.

Everything here uses loopback (or a namespace the test made) and waits on events
(a log line, a datagram, a counter) with generous bounds, never on fixed sleeps.
"""

import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mpudp  # noqa: E402
from linkemu import LinkEmulator  # noqa: E402

MPUDP = os.path.join(ROOT, "mpudp.py")
KEYGEN = os.path.join(ROOT, "keygen.py")
WAIT_S = 15.0  # functional bound for anything a test waits on; generous for a loaded CI


# -- fake time ---------------------------------------------------------------


class FakeClock:
    """A clock the test moves by hand (Twisted's task.Clock, Trio's MockClock)."""

    def __init__(self, start=1000.0):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def run_for(reactor, clock, seconds, step=0.01):
    """Advance a fake-clock reactor by `seconds` in `step`s, firing timers (and polling sockets)."""
    end = clock.now + seconds
    while clock.now < end:
        clock.advance(min(step, end - clock.now))
        reactor.run_once(0)


# -- keys and addresses ------------------------------------------------------


def keypair():
    """(private_b64, public_b64) of a fresh X25519 key."""
    private = mpudp.generate_private_key()
    return mpudp.encode_key(private), mpudp.encode_key(mpudp.public_key(private))


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


_EPHEMERAL_LOW = _ephemeral_low()
_PORTS_GIVEN = set()
_PORT_RANDOM = random.Random()  # its own: a test that seeds `random` must not fix the ports


def free_udp_port(host="127.0.0.1"):
    """A UDP port free now on `host`, for a process the test starts later.

    Taken below the kernel's ephemeral range where there is one, so that the
    sockets that bind port 0 meanwhile (link sockets, upstream sockets) cannot
    take it before its process binds it; never the same one twice in a run."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = _EPHEMERAL_LOW
    for _ in range(100):
        if low and low > 12000:
            port = _PORT_RANDOM.randrange(10000, low)
        else:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        if port in _PORTS_GIVEN:
            continue
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((host, port))
        except OSError:
            continue
        _PORTS_GIVEN.add(port)
        return port
    raise AssertionError("no free UDP port found on %s" % host)


def addr_text(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def ipv6_available():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not ipv6_available(), reason="IPv6 loopback (::1) is not available here")


@pytest.fixture
def cleanup():
    """Register callables to run at teardown, last registered first."""
    actions = []
    yield actions.append
    for action in reversed(actions):
        try:
            action()
        except Exception:
            pass


# -- an echo upstream --------------------------------------------------------


class EchoServer:
    """A UDP echo on loopback in a thread; records every datagram and its source."""

    def __init__(self, host="127.0.0.1", port=0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()[:2]
        self.received = []  # (data, source)
        self.cond = threading.Condition()
        self.echo = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def text(self):
        return addr_text(*self.address)

    def _run(self):
        while not self._stop:
            try:
                data, source = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError:
                if self._stop:
                    return
                continue
            with self.cond:
                self.received.append((data, source))
                self.cond.notify_all()
            if self.echo:
                try:
                    self.sock.sendto(data, source)
                except OSError:
                    pass

    def wait_for(self, predicate, timeout=WAIT_S):
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.received), timeout)

    def sources(self):
        with self.cond:
            return {source for _data, source in self.received}

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()


# -- paced traffic -------------------------------------------------------------


def paced(interval, stop):
    """Yield at once, then every `interval` seconds until the threading.Event `stop` is set.
    A sender that fell behind goes on from now: it never bursts to catch up."""
    next_at = time.monotonic()
    while not stop.is_set():
        yield
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            stop.wait(delay)  # pacing, not waiting for an event
        else:
            next_at = time.monotonic()


# -- score_file / status_file ------------------------------------------------

JSON_POLL_S = 0.05  # how often a test re-reads a status file (rewritten about once a second)


def read_json(path):
    """The parsed file, or None before its first write (it is replaced atomically: never half written)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def wait_json(path, predicate, what, timeout=WAIT_S):
    """The first content of the JSON file at `path` for which predicate(data) holds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        data = read_json(path)
        if data is not None:
            last = data
            if predicate(data):
                return data
        if time.monotonic() >= deadline:
            raise AssertionError("%s never showed %s within %ss; last content:\n%s" % (
                os.path.basename(path), what, timeout, json.dumps(last, indent=1)))
        time.sleep(JSON_POLL_S)  # a file has no change notification: poll it


def active_index(status):
    """The index of the client's one active link in a score_file's content."""
    active = [link["index"] for link in status["links"] if link["active"]]
    assert len(active) == 1, "exactly one link must be active: %r" % status["links"]
    return active[0]


# -- mpudp processes ---------------------------------------------------------


class MpudpProcess:
    """`python3 mpudp.py -config=PATH` as a child process; its stderr lines are kept and waitable."""

    def __init__(self, config_path, *extra_args, preexec_fn=None):
        self.config_path = config_path
        self.proc = subprocess.Popen(
            [sys.executable, MPUDP, "-config=%s" % config_path] + list(extra_args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, cwd=ROOT,
            preexec_fn=preexec_fn)
        self.lines = []
        self.cond = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(stream,), daemon=True)
                         for stream in (self.proc.stderr, self.proc.stdout)]
        for reader in self._readers:
            reader.start()

    def _read(self, stream):
        for line in stream:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_for_line(self, text, timeout=WAIT_S, start=0):
        """Index of the first line from `start` on containing `text`; fails the test if none comes."""
        def find():
            for i in range(start, len(self.lines)):
                if text in self.lines[i]:
                    return i
            return None

        with self.cond:
            self.cond.wait_for(lambda: find() is not None or self.proc.poll() is not None, timeout)
            index = find()
        if index is None:
            raise AssertionError("no line with %r within %ss (exit %r); output:\n%s" % (
                text, timeout, self.proc.poll(), "\n".join(self.lines[-40:])))
        return index

    def count_lines(self, text):
        with self.cond:
            return sum(1 for line in self.lines if text in line)

    def output(self):
        with self.cond:
            return "\n".join(self.lines)

    def stop(self, sig=signal.SIGTERM, timeout=WAIT_S):
        """Signal the process and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for reader in self._readers:
            reader.join(2)
        return self.proc.returncode


def write_config(directory, data, name="config.json"):
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    os.chmod(path, 0o600)
    return path


class RelayPair:
    """An echo upstream, an mpudp server, N link emulators and an mpudp client, all on loopback.

    Tests talk to the client's listen address with `app_socket()` and steer the
    links through `self.links[i].set(...)` (see linkemu.LinkEmulator).
    """

    def __init__(self, directory, links=2, host="127.0.0.1", client=None, server=None, emulate=True,
                 echo_host=None):
        self.directory = directory
        self.host = host
        self.echo = EchoServer(echo_host or host)
        self.server_keys, self.client_keys = keypair(), keypair()
        self.server_port = free_udp_port(host)
        server_cfg = {
            "listen_addr": addr_text(host, self.server_port),
            "upstream_addr": self.echo.text,
            "server_private_key": self.server_keys[0],
            "client_public_keys": [self.client_keys[1]],
        }
        server_cfg.update(server or {})
        self.server_config = write_config(directory, {"mode": "server", "server": server_cfg}, "server.json")
        self.server = MpudpProcess(self.server_config)
        self.server.wait_for_line("server listening on")
        target = (host, self.server_port)
        self.links = [LinkEmulator(target, listen=(host, 0), seed=i).start() for i in range(links)] if emulate else []
        remotes = [addr_text(*link.address[:2]) for link in self.links] or [addr_text(*target)] * links
        self.client_port = free_udp_port(host)
        client_cfg = {
            "listen_addr": addr_text(host, self.client_port),
            "links": [{"remote_addr": r} for r in remotes],
            "heartbeat_interval_sec": 0.2,
            "client_private_key": self.client_keys[0],
            "server_public_key": self.server_keys[1],
        }
        client_cfg.update(client or {})
        self.client_cfg = client_cfg
        self.client_config = write_config(directory, {"mode": "client", "client": client_cfg}, "client.json")
        self.client = MpudpProcess(self.client_config)
        self.client.wait_for_line("handshake done")

    @property
    def client_address(self):
        return (self.host, self.client_port)

    def app_socket(self, timeout=WAIT_S):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((self.host, 0))
        s.settimeout(timeout)
        return s

    def round_trip(self, sock, payload, timeout=WAIT_S):
        """Send until an echo of `payload` comes back (the first datagrams may race the handshake)."""
        deadline = time.monotonic() + timeout
        sock.settimeout(0.25)
        while time.monotonic() < deadline:
            sock.sendto(payload, self.client_address)
            try:
                while True:
                    data, _ = sock.recvfrom(65536)
                    if data == payload:
                        return data
            except socket.timeout:
                continue
        raise AssertionError("no echo of %r within %ss" % (payload[:20], timeout))

    def close(self):
        codes = {"client": self.client.stop(), "server": self.server.stop()}
        for link in self.links:
            link.close()
        self.echo.close()
        return codes


@pytest.fixture
def relay_pair(tmp_path):
    """A factory for RelayPair; everything it made is stopped at the end of the test."""
    made = []

    def make(**kwargs):
        pair = RelayPair(tmp_path, **kwargs)
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.close()


# -- network namespaces ------------------------------------------------------


class NetNs:
    """A throw-away network namespace with its loopback up (root only; skips otherwise).

    `ip(...)` and `run(...)` run commands inside it, `inside(function)` runs Python
    inside it, `close()` deletes it (and the interfaces in it).  Nothing is changed in
    the host's own namespace: veth pairs are made from inside, with the peer end put
    straight into the other namespace."""

    CLONE_NEWNET = 0x40000000

    def __init__(self, tag="test"):
        if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("ip") is None:
            pytest.skip("needs Linux, root and iproute2 to make a network namespace")
        self.libc = ctypes.CDLL(None, use_errno=True)
        if not hasattr(self.libc, "setns"):
            pytest.skip("libc has no setns")
        self.name = "mpudp-%s-%d-%d" % (tag, os.getpid(), random.randrange(1 << 30))
        made = subprocess.run(["ip", "netns", "add", self.name], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True)
        if made.returncode != 0:
            pytest.skip("cannot make a network namespace: %s" % made.stdout.strip())
        self.ip("link", "set", "lo", "up")

    def run(self, *command):
        """`command` run inside the namespace (with its own /sys); its stdout.  Fails the test
        with the command's stderr if it fails."""
        done = subprocess.run(["ip", "netns", "exec", self.name] + list(command), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True)
        if done.returncode != 0:
            raise AssertionError("in netns %s: %s: exit %d: %s" % (
                self.name, " ".join(command), done.returncode, done.stderr.strip()))
        return done.stdout

    def ip(self, *args):
        return self.run("ip", *args)

    def sysctl(self, key, value):
        """Set /proc/sys/<key> ("net/ipv4/conf/all/rp_filter") of this namespace."""
        def write():
            with open("/proc/sys/" + key, "w") as f:
                f.write(str(value))
        self.inside(write)

    def add_veth(self, name, address, peer_ns, peer_name, peer_address):
        """A veth pair: `name` here with `address`, `peer_name` in `peer_ns` with
        `peer_address` ("10.0.0.1/24"), both up."""
        self.ip("link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", peer_ns.name)
        self.ip("addr", "add", address, "dev", name)
        peer_ns.ip("addr", "add", peer_address, "dev", peer_name)
        self.ip("link", "set", name, "up")
        peer_ns.ip("link", "set", peer_name, "up")

    def counters(self, interface):
        """{"tx_packets", "tx_bytes", "rx_packets", "rx_bytes"} of an interface in this namespace."""
        stats = json.loads(self.ip("-s", "-j", "link", "show", "dev", interface))[0]["stats64"]
        return {"%s_%s" % (way, what): stats[way][what] for way in ("tx", "rx") for what in ("packets", "bytes")}

    def inside(self, function):
        """function() run on a thread that entered the namespace (sockets and child processes
        it makes live there); its result."""
        result = {}

        def work():
            try:
                fd = os.open("/var/run/netns/%s" % self.name, os.O_RDONLY)
                try:
                    if self.libc.setns(fd, self.CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                result["value"] = function()
            except BaseException as exc:  # handed to the caller
                result["error"] = exc

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]

    def close(self):
        subprocess.run(["ip", "netns", "del", self.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# -- the slow scenarios on some Pythons only -----------------------------------


def pytest_collection_modifyitems(config, items):
    """MPUDP_SKIP_SLOW=1 (tox, for the Pythons between the oldest and the newest):
    tests marked `slow` are skipped, with the reason shown by -ra."""
    if os.environ.get("MPUDP_SKIP_SLOW") != "1":
        return
    skip = pytest.mark.skip(reason="slow scenario: tox runs these on the oldest and newest Python "
                                   "(MPUDP_SKIP_SLOW=1 here)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
