"""Shared test fixtures and harnesses: a fake clock, keys and ports, mpudp processes
(MpudpProcess) and relay pairs of them (RelayPair: links through LinkEmulators or
recording Taps), mpudp in this process (InProcess: servers and clients on one
Reactor, a fake or real clock; ServerBench: a server alone, the test its client),
and throw-away network namespaces.  The traffic helpers they use (EchoServer, Tap,
App, Stream, waits, packet tools) are in helpers.py.

Fixtures: cleanup, relay_pair, tapped_pair, in_process, rig, bench.

Everything here uses loopback (or a namespace the test made) and waits on events
(a log line, a datagram, a counter) with generous bounds, never on fixed sleeps.
"""

import ctypes
import io
import json
import os
import random
import re
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
from helpers import (  # noqa: E402
    LOOPBACK, WAIT_S, EchoServer, Tap, addr_text, drain, round_trip, seal_hello, static_secret, udp_socket,
)
from linkemu import LinkEmulator  # noqa: E402

MPUDP = os.path.join(ROOT, "mpudp.py")
KEYGEN = os.path.join(ROOT, "keygen.py")


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
    """`python3 mpudp.py -config=PATH` as a child process; its stderr lines are kept and waitable.
    One still running when its test ends is stopped, and fails the test (no_process_left)."""

    started = []  # this test's, for no_process_left

    def __init__(self, config_path, *extra_args, preexec_fn=None):
        self.config_path = config_path
        self.proc = subprocess.Popen(
            [sys.executable, MPUDP, "-config=%s" % config_path] + list(extra_args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, cwd=ROOT,
            preexec_fn=preexec_fn)
        MpudpProcess.started.append(self)
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
        return self._wait_line(lambda line: text in line, "with %r" % text, timeout, start)[0]

    def wait_line_ending(self, text, start=0, timeout=WAIT_S):
        """Index of the first line from `start` on that ends with `text`; fails the test if none comes."""
        return self._wait_line(lambda line: line.endswith(text), "ending with %r" % text, timeout, start)[0]

    def wait_match(self, pattern, start=0, timeout=WAIT_S):
        """(index, match) of the first line from `start` on matching the regex `pattern`."""
        return self._wait_line(re.compile(pattern).search, "matching %r" % pattern, timeout, start)

    def _wait_line(self, test, what, timeout, start):
        """(index, test(line)) of the first line from `start` on for which test(line) is true."""
        def find():
            for i in range(start, len(self.lines)):
                found = test(self.lines[i])
                if found:
                    return i, found
            return None

        with self.cond:
            self.cond.wait_for(lambda: find() is not None or self.proc.poll() is not None, timeout)
            result = find()
        if result is None:
            raise AssertionError("no line %s within %ss (exit %r); output:\n%s" % (
                what, timeout, self.proc.poll(), "\n".join(self.lines[-40:])))
        return result

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
    """An echo upstream, an mpudp server, one link per client link in front of the server,
    and an mpudp client: processes, all on loopback.

    The links go through LinkEmulators (tests steer them with `self.links[i].set(...)`,
    see linkemu.LinkEmulator), through recording Taps (`taps=True`: `self.taps`, see
    helpers.Tap), or straight to the server (`emulate=False`).  Tests talk to the client's listen address with
    `app_socket()`; either process can be stopped and started again on the same config
    (`start_server`, `start_client`), and `spawn` starts another one that `close` stops.
    """

    def __init__(self, directory, links=2, host=LOOPBACK, client=None, server=None, emulate=True, taps=False,
                 echo_host=None, extra_links=(), extra_client_keys=(), config_mode=0o600, wait_handshake=True):
        self.directory = directory
        self.host = host
        self.procs, self.links, self.taps = [], [], []
        self.server = self.client = None
        self.echo = EchoServer(echo_host or host)
        try:
            self.server_keys, self.client_keys = keypair(), keypair()
            self.server_port = free_udp_port(host)
            if taps:
                self.taps = [Tap(self.server_addr, host) for _ in range(links)]
                remotes = [tap.text for tap in self.taps]
            elif emulate:
                self.links = [LinkEmulator(self.server_addr, listen=(host, 0), seed=i).start() for i in range(links)]
                remotes = [addr_text(*link.address[:2]) for link in self.links]
            else:
                remotes = [addr_text(*self.server_addr)] * links
            server_cfg = {
                "listen_addr": addr_text(host, self.server_port),
                "upstream_addr": self.echo.text,
                "server_private_key": self.server_keys[0],
                "client_public_keys": [self.client_keys[1]] + list(extra_client_keys),
            }
            server_cfg.update(server or {})
            self.server_config = write_config(directory, {"mode": "server", "server": server_cfg}, "server.json")
            self.client_port = free_udp_port(host)
            client_cfg = {
                "listen_addr": addr_text(host, self.client_port),
                "links": [{"remote_addr": r} for r in remotes] + list(extra_links),
                "heartbeat_interval_sec": 0.2,
                "client_private_key": self.client_keys[0],
                "server_public_key": self.server_keys[1],
            }
            client_cfg.update(client or {})
            self.client_cfg = client_cfg
            self.client_config = write_config(directory, {"mode": "client", "client": client_cfg}, "client.json")
            for path in (self.server_config, self.client_config):
                os.chmod(path, config_mode)
            self.start_server()
            self.start_client(wait_handshake)
        except BaseException:
            self.close()
            raise

    @property
    def server_addr(self):
        return (self.host, self.server_port)

    @property
    def client_address(self):
        return (self.host, self.client_port)

    @property
    def tap(self):
        return self.taps[0]

    @property
    def client_secret(self):
        return static_secret(self.client_keys, self.server_keys)

    def spawn(self, config_path):
        """An mpudp process on `config_path`, stopped by close()."""
        process = MpudpProcess(config_path)
        self.procs.append(process)
        return process

    def start_server(self):
        self.server = self.spawn(self.server_config)
        self.server.wait_for_line("server listening on")

    def start_client(self, wait_handshake=True):
        self.client = self.spawn(self.client_config)
        if wait_handshake:
            self.client.wait_for_line("handshake done")

    def app_socket(self, timeout=WAIT_S):
        return udp_socket(self.host, timeout=timeout)

    def round_trip(self, sock, payload, timeout=WAIT_S):
        """Send until an echo of `payload` comes back (the first datagrams may race the handshake)."""
        round_trip(sock, self.client_address, payload, timeout)
        return payload

    def close(self):
        """Stop everything; the exit status of the client and of the server."""
        codes = {}
        for process in reversed(self.procs):
            code = process.stop()
            if process is self.client:
                codes["client"] = code
            elif process is self.server:
                codes["server"] = code
        for link in self.links + self.taps:
            link.close()
        self.echo.close()
        return codes


@pytest.fixture(autouse=True)
def no_process_left():
    """Every mpudp process a test starts is stopped by the time it ends (after its other
    fixtures' teardown, which this one wraps): a leaked daemon would run on forever."""
    MpudpProcess.started = []
    yield
    left = [process for process in MpudpProcess.started if process.proc.poll() is None]
    for process in left:
        process.stop(signal.SIGKILL)
    MpudpProcess.started = []
    assert not left, "left running: %s" % [process.config_path for process in left]


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


@pytest.fixture
def tapped_pair(relay_pair):
    """A factory for RelayPairs whose links go through Taps, heartbeats every 0.1 s unless
    `client` says otherwise: tapped_pair(links=2, client={...}, server={...}, ...)."""
    def make(links=2, client=None, **kwargs):
        client = dict({"heartbeat_interval_sec": 0.1}, **(client or {}))
        return relay_pair(links=links, taps=True, client=client, **kwargs)
    return make


# -- mpudp in this process ---------------------------------------------------


class InProcess:
    """mpudp Servers and Clients in this process, on one Reactor, and the sockets around them.

    `clock`: a FakeClock the test moves (timers fire only when it does), or None for
    real time.  `getaddrinfo`: the Resolver's look-up, a stub the test steers (default:
    the system's).  `heartbeat_s`: every client's heartbeat_interval_sec unless a test
    gives its own (default: mpudp's).

    The upstream is a socket on the same reactor that records every datagram, as
    (data, source), in `upstream_seen` and echoes it back while `echo_upstream` is
    true.  `app` is the application's socket (non-blocking; the test reads it, the
    reactor does not).  Clients and servers share one log text (`log_text()`), with a
    Log each (the reactor's is the clients').

    Stepping: pump() is one pass of the loop; run() moves a fake clock on; run_until()
    runs until a condition holds, on the harness's clock; settle() pumps with a fake
    clock standing still (loopback delivery is not instant on a loaded machine).
    """

    def __init__(self, clock=None, getaddrinfo=None, heartbeat_s=None):
        self.clock = clock
        time_source = clock if clock is not None else time.monotonic
        self.log_stream = io.StringIO()
        self.log = mpudp.Log(stream=self.log_stream, clock=time_source)
        self.server_log = mpudp.Log(stream=self.log_stream, clock=time_source)
        self.reactor = mpudp.Reactor(clock=time_source, log=self.log)
        self.resolver = (mpudp.Resolver(self.reactor) if getaddrinfo is None
                         else mpudp.Resolver(self.reactor, getaddrinfo=getaddrinfo))
        self.heartbeat_s = heartbeat_s
        self.server_keys, self.client_keys = keypair(), keypair()
        self.servers, self.clients, self.emulators, self.sockets = [], [], [], []
        self.server = self.client = None  # the first server, the latest client
        self.client_cfg = None  # the latest client's configuration
        self.upstream = self.socket()
        self.upstream_seen = []  # (data, source)
        self.echo_upstream = True
        self.reactor.add_reader(self.upstream, self._on_upstream)
        self.app = self.socket()

    # -- building ------------------------------------------------------------

    def socket(self):
        """A non-blocking loopback UDP socket, closed with the harness."""
        sock = udp_socket(blocking=False)
        self.sockets.append(sock)
        return sock

    def _on_upstream(self):
        for data, source in drain(self.upstream):
            self.upstream_seen.append((data, source))
            if self.echo_upstream:
                self.upstream.sendto(data, source)

    def upstream_payloads(self):
        return [data for data, _source in self.upstream_seen]

    def server_section(self, **overrides):
        cfg = {"listen_addr": "127.0.0.1:0", "upstream_addr": "%s:%d" % self.upstream.getsockname(),
               "server_private_key": self.server_keys[0], "client_public_keys": [self.client_keys[1]]}
        cfg.update(overrides)
        return mpudp.parse_config({"mode": "server", "server": cfg}).section

    def add_server(self, **overrides):
        server = mpudp.Server(self.server_section(**overrides), self.reactor, self.server_log, self.resolver)
        server.start()
        self.servers.append(server)
        self.server = self.server or server
        return server

    def client_config(self, links=None, **overrides):
        """A client's configuration: `links` are remote addresses or link objects (default: one
        link to the first server)."""
        if links is None:
            links = [addr_text(*self.address_of(self.server))]
        cfg = {"listen_addr": "127.0.0.1:0",
               "links": [link if isinstance(link, dict) else {"remote_addr": link} for link in links],
               "client_private_key": self.client_keys[0], "server_public_key": self.server_keys[1]}
        if self.heartbeat_s is not None:
            cfg["heartbeat_interval_sec"] = self.heartbeat_s
        cfg.update(overrides)
        return cfg

    def client_section(self, links=None, **overrides):
        return mpudp.parse_config({"mode": "client", "client": self.client_config(links, **overrides)}).section

    def add_client(self, links=None, **overrides):
        """A started Client (now `self.client`) with client_config(links, **overrides)."""
        return self.start_client(self.client_config(links, **overrides))

    def start_client(self, cfg=None):
        """A started Client on `cfg` (default: the latest client's configuration again)."""
        self.client_cfg = cfg if cfg is not None else self.client_cfg
        section = mpudp.parse_config({"mode": "client", "client": self.client_cfg}).section
        self.client = mpudp.Client(section, self.reactor, self.log, self.resolver)
        self.clients.append(self.client)
        self.client.start()
        return self.client

    def add_emulator(self, target):
        emulator = LinkEmulator(target, seed=len(self.emulators)).start()
        self.emulators.append(emulator)
        return emulator

    def connect(self, server=None, client=None):
        """A server and a client with one link to it, heartbeats every 0.2 s unless `client`
        says otherwise; returns once both hold the epoch and the link is up."""
        self.add_server(**(server or {}))
        self.add_client(**dict({"heartbeat_interval_sec": 0.2}, **(client or {})))
        assert self.run_until(lambda: self.client.epoch is not None and self.peer.epoch is not None
                              and self.client.links[0].health.up and self.peer.links, 5.0), self.log_text()
        return self

    @staticmethod
    def address_of(server):
        return tuple(server.listen_sock.getsockname()[:2])

    @property
    def server_addr(self):
        return self.address_of(self.server)

    @property
    def peer(self):
        return self.server.peers[0]

    @property
    def client_addr(self):
        return self.client.listen_sock.getsockname()

    @property
    def link_addr(self):
        return (LOOPBACK, self.client.links[0].sock.getsockname()[1])

    # -- stepping ------------------------------------------------------------

    def pump(self, wait=0.0):
        """One pass of the loop; `wait` real seconds at most for a socket if no timer is due.
        The upstream is read after the pass too, so what the pass forwarded is seen at once."""
        self.reactor.run_once(wait)
        self._on_upstream()

    def run(self, seconds, step=0.01):
        """Move the fake clock on by `seconds` in `step`s, a pass of the loop each."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.advance(min(step, end - self.clock.now))
            self.pump()

    def run_until(self, predicate, seconds, step=0.01):
        """Run until predicate(), for `seconds` at most on the harness's clock (a fake one
        moved on by `step` a pass); False if it never holds."""
        if self.clock is None:
            deadline = time.monotonic() + seconds
            while not predicate():
                if time.monotonic() >= deadline:
                    return False
                self.pump(step)
            return True
        end = self.clock.now + seconds
        while not predicate():
            if self.clock.now >= end:
                return False
            self.clock.advance(step)
            self.pump(0.002)
        return True

    def wait_for(self, predicate, what, timeout=WAIT_S):
        """run_until(predicate), or fail the test naming `what`, with the log's tail."""
        if not self.run_until(predicate, timeout, 0.05):
            raise AssertionError("not within %ss: %s\nlog:\n%s" % (timeout, what, self.log_text()[-3000:]))

    def settle(self, predicate, timeout=WAIT_S):
        """Pump, a fake clock standing still, until predicate(); False if it never holds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            self.pump(0.005)
        return True

    def round_trip(self, payload, timeout=None):
        """Send `payload` from the app socket until its echo comes back; the real seconds that took,
        or the test fails.  On a fake clock it is sent once and the clock moved on by 1 ms a pass,
        2 s at most; in real time it is sent again every 0.25 s, `timeout` (WAIT_S) at most."""
        start = time.monotonic()
        got = []

        def echoed():
            got.extend(data for data, _ in drain(self.app))
            return payload in got

        if self.clock is not None:
            self.app.sendto(payload, self.client_addr)
            if self.run_until(echoed, timeout or 2.0, 0.001):
                return time.monotonic() - start
        else:
            deadline = start + (timeout or WAIT_S)
            while time.monotonic() < deadline:
                self.app.sendto(payload, self.client_addr)
                if self.run_until(echoed, min(0.25, deadline - time.monotonic()), 0.005):
                    return time.monotonic() - start
        raise AssertionError("no echo of %r within %ss\nlog:\n%s" % (payload, timeout, self.log_text()[-3000:]))

    # -- looking -------------------------------------------------------------

    def drops(self):
        return sum(self.server.counters.values()), sum(self.client.counters.values())

    def log_text(self):
        return self.log_stream.getvalue()

    def log_count(self, text):
        return sum(1 for line in self.log_text().splitlines() if text in line)

    def close(self):
        for client in self.clients:
            client.close()
        for server in self.servers:
            server.close()
        self.resolver.close()
        self.reactor.close()
        for emulator in self.emulators:
            emulator.close()
        for sock in self.sockets:
            sock.close()


class ServerBench(InProcess):
    """A Server alone in this process, in real time; the test is the client, with one UDP
    socket per link (`links[i]`) and keys from a real handshake (`epoch`), and answers for
    the upstream by hand (`replies`): the upstream records, it does not echo."""

    def __init__(self, links=3):
        InProcess.__init__(self)
        self.echo_upstream = False
        self.add_server()
        self.secret = static_secret(self.client_keys, self.server_keys)
        self.links = [self.socket() for _ in range(links)]
        self.epoch = self.handshake()
        self.validate_links()

    def handshake(self):
        """HELLO -> COOKIE, HELLO with the cookie -> WELCOME, each answer checked."""
        static = mpudp.StaticKeys(self.secret)
        nonce = os.urandom(mpudp.NONCE_SIZE)
        cookie = bytes(mpudp.NONCE_SIZE)
        sock = self.links[0]
        for _ in range(2):
            sock.sendto(seal_hello(static, 0, nonce, cookie), self.server_addr)
            got = []
            assert self.settle(lambda: got.extend(drain(sock)) or got)
            packet = got[0][0]
            assert mpudp.verify(static.welcome_mac, packet, len(packet))
            _nonce, value = mpudp.WELCOME_PAYLOAD.unpack_from(packet, mpudp.HEADER_SIZE)
            if packet[0] & mpudp.TYPE_MASK == mpudp.TYPE_WELCOME:
                return mpudp.Epoch(self.secret, nonce, value, is_client=True)
            cookie = value
        raise AssertionError("no WELCOME")

    def validate_links(self):
        """Each link's address answers the server's challenge, as a client does (PROTOCOL.md,
        "Return path"), so that the tests see the return path move at once."""
        for i, sock in enumerate(self.links):
            self.send(i, mpudp.TYPE_HEARTBEAT | mpudp.FLAG_ACTIVE)
            got = []

            def challenged():
                got.extend(p for p, _ in drain(sock) if p[0] & mpudp.TYPE_MASK == mpudp.TYPE_CHALLENGE)
                return got

            assert self.settle(challenged), "no CHALLENGE for link %d" % i
            challenge = got[0]
            assert mpudp.verify(self.epoch.rx_mac, challenge, len(challenge))
            self.send(i, mpudp.TYPE_RESPONSE, challenge[mpudp.HEADER_SIZE:-mpudp.MAC_SIZE])
        assert self.settle(lambda: not self.peer.return_path.unvalidated)

    def send(self, link, type_flags, payload=b"", seq=None, mac=None):
        """A packet as the client would send it on `link`; its sequence number."""
        epoch = self.epoch
        if seq is None:
            epoch.tx_seq += 1
            seq = epoch.tx_seq
        packet = mpudp.seal(mac or epoch.tx_mac, type_flags, link, 0, 7, epoch.nonce_base | seq,
                            payload or mpudp.HEARTBEAT_PAYLOAD.pack(seq, 0, 0, 0, 0, 0, 0))
        self.links[link].sendto(packet, self.server_addr)
        return seq

    def taken(self):
        """How many packets the server has taken in: forwarded or counted as dropped."""
        return self.peer.packets + sum(self.server.counters.values())

    def until_taken(self, count):
        """Pump until the server has taken `count` packets in."""
        assert self.settle(lambda: self.taken() >= count)

    def replies(self, payload, expected):
        """Send `payload` from the upstream to the session and wait until it came back on
        the `expected` links; {link: [packets]} of what arrived on every link by then."""
        session_source = self.upstream_seen[0][1]
        self.upstream.sendto(payload, session_source)
        got = {}

        def arrived():
            for i, sock in enumerate(self.links):
                for data, _ in drain(sock):
                    if data[0] & mpudp.TYPE_MASK == mpudp.TYPE_DATA:
                        got.setdefault(i, []).append(data)
            return set(expected) <= set(got)

        assert self.settle(arrived), got
        return got


@pytest.fixture
def in_process():
    """A factory for InProcess (its keyword arguments); each is closed at the end of the test,
    which then fails if a reactor callback raised (the reactor swallows and counts them)."""
    made = []

    def make(**kwargs):
        harness = InProcess(**kwargs)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()
    for harness in made:
        assert dict(harness.reactor.errors) == {}, harness.log_text()[-3000:]


@pytest.fixture
def rig(in_process):
    """A factory for an in-process server and client on a fake clock, connected:
    rig(server={...}, client={...}) (see InProcess.connect)."""
    def make(server=None, client=None):
        return in_process(clock=FakeClock()).connect(server, client)
    return make


@pytest.fixture
def bench():
    """A ServerBench with three links, closed at the end of the test (which then fails if a
    reactor callback raised)."""
    bench = ServerBench()
    yield bench
    bench.close()
    assert dict(bench.reactor.errors) == {}, bench.log_text()[-3000:]


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


# -- the slow scenarios on some Pythons only ---------------------------------


def pytest_collection_modifyitems(config, items):
    """MPUDP_SKIP_SLOW=1 (tox, for every Python but the newest):
    tests marked `slow` are skipped, with the reason shown by -ra."""
    if os.environ.get("MPUDP_SKIP_SLOW") != "1":
        return
    skip = pytest.mark.skip(reason="slow scenario: tox runs these on the newest Python "
                                   "(MPUDP_SKIP_SLOW=1 here)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
