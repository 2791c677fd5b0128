"""Hostile-network tests: what an attacker on a link, a flood, and broken
surroundings can and cannot do to mpudp.

1. Replay safety: DATA and HEARTBEAT packets captured on the wire (client to
   server) and DATA captured server to client are re-sent at once, from the
   same and from another address, after the client restarts, after the server
   restarts, after a replayed HELLO.  None is forwarded to the upstream or the
   application, none is echoed as a heartbeat, none moves the return path.  A
   client forging another client's id gets nothing through.
2. Fuzz: thousands of seeded random, truncated, oversized, bit-flipped and
   header-mutated packets fed to a real Server and Client in this process;
   every one is dropped and counted, nothing escapes into the reactor's
   guard, and a legitimate round trip still works.  The pure decoders are fed
   random input too.
3. Flood: a legitimate stream keeps flowing while ten times its rate of
   garbage, replays and wrong-key packets hits the server; the server's memory
   does not grow.
4. Faults: upstream down and back, server restart, client restart, a route
   vanishing (ENETUNREACH, in a network namespace when we may make one), a
   full socket buffer.  Resume times are printed (`pytest -s` shows them).
5. Limits: max_sessions on both sides, pending epochs and HELLO answers per
   sweep on the server.
6. Private keys never appear in logs or in the score_file.

Fuzz knobs (environment): MPUDP_FUZZ_CASES (default 10000, well under a second) runs more,
MPUDP_FUZZ_SEED replays the seed a failure message names.

Captures use `Tap`, a small recording UDP forwarder (one upstream socket per
client source address, like a NAT) between the client's links and the server.
Since the test knows both private keys it can also build valid packets with
mpudp's own functions.  Loopback only, except the namespace test, which runs
everything inside a throw-away network namespace.
"""

import collections
import errno
import io
import json
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest

from conftest import (  # noqa: E402  (conftest puts the repo root on sys.path)
    WAIT_S, EchoServer, FakeClock, MpudpProcess, NetNs, free_udp_port, keypair, write_config,
)

import mpudp  # noqa: E402

LOOPBACK = "127.0.0.1"
FUZZ_CASES = int(os.environ.get("MPUDP_FUZZ_CASES", "10000"))
FUZZ_SEED = int(os.environ.get("MPUDP_FUZZ_SEED", str(random.SystemRandom().randrange(1 << 32))))

DATA, HEARTBEAT, ECHO, HELLO, WELCOME, COOKIE = (mpudp.TYPE_DATA, mpudp.TYPE_HEARTBEAT, mpudp.TYPE_ECHO,
                                                 mpudp.TYPE_HELLO, mpudp.TYPE_WELCOME, mpudp.TYPE_COOKIE)
HANDSHAKE_REPLY_SIZE = mpudp.OVERHEAD + mpudp.WELCOME_PAYLOAD.size  # WELCOME and COOKIE: HELLO's size

# Counters that mean "dropped before anything moved" (PROTOCOL.md, "Receiving a packet").
SERVER_PRE_AUTH_DROPS = {"short", "unknown_client", "stale_epoch", "replay", "duplicate", "auth", "hello_limit"}
CLIENT_PRE_AUTH_DROPS = {"short", "bad_header", "stale_welcome", "stale_epoch", "replay", "duplicate", "auth"}


def report(text):
    """A figure for the README: shown with `pytest -s`, and in the log of a failing test."""
    sys.stdout.write("\n[hostile] %s\n" % text)
    sys.stdout.flush()


# ============================================================================
# Helpers: sockets, packets, processes
# ============================================================================


def udp_socket(blocking=True, host=LOOPBACK):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setblocking(blocking)
    return s


def drain(sock):
    """Every datagram waiting on a non-blocking socket, as (data, source)."""
    out = []
    while True:
        try:
            out.append(sock.recvfrom(65536))
        except (BlockingIOError, InterruptedError):
            return out
        except OSError:  # an ICMP error for an earlier send; what is queued behind it still counts
            continue


def kind(data):
    return data[0] & mpudp.TYPE_MASK if data else None


def header(data):
    return mpudp.HEADER.unpack_from(data)


def random_bytes(rng, n):
    return rng.getrandbits(8 * n).to_bytes(n, "little") if n > 0 else b""


def wait_until(predicate, timeout=WAIT_S, interval=0.01, what="a condition"):
    """Poll `predicate` (for state only the kernel or /proc shows) until true, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def udp_drops(port):
    """The kernel's drop count (/proc/net/udp*) of the sockets bound to local `port`."""
    total = 0
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(name) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                total += int(fields[-1])
    return total


def alive(process):
    return process.proc.poll() is None


class Tap:
    """A recording UDP forwarder between a client's link and the server.

    Each client source address gets its own upstream socket (a NAT mapping), so
    the server sees one address per client link, and `send_as` can re-send a
    captured packet from exactly the address it first came from.
    """

    def __init__(self, target):
        self.target = target
        self.listen = udp_socket(blocking=False)
        self.address = self.listen.getsockname()
        self.text = "%s:%d" % self.address
        self.cond = threading.Condition()
        self.up = []  # (time, data, client source)
        self.down = []
        self.nat = {}  # client source -> upstream socket
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listen, selectors.EVENT_READ, None)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="tap", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            for key, _mask in self.selector.select(0.05):
                if key.data is None:
                    self._from_client()
                else:
                    self._from_server(key.data)

    def _from_client(self):
        for data, source in drain(self.listen):
            with self.cond:
                sock = self.nat.get(source)
                if sock is None:
                    sock = self.nat[source] = udp_socket(blocking=False)
                    self.selector.register(sock, selectors.EVENT_READ, source)
                self.up.append((time.monotonic(), data, source))
                self.cond.notify_all()
            try:
                sock.sendto(data, self.target)
            except OSError:
                pass

    def _from_server(self, source):
        for data, _addr in drain(self.nat[source]):
            with self.cond:
                self.down.append((time.monotonic(), data, source))
                self.cond.notify_all()
            try:
                self.listen.sendto(data, source)
            except OSError:
                pass

    def records(self, direction):
        with self.cond:
            return list(self.up if direction == "up" else self.down)

    def sources(self):
        with self.cond:
            return set(self.nat)

    def send_as(self, source, data):
        """Send `data` to the server from the address that carried `source`'s packets."""
        with self.cond:
            sock = self.nat[source]
        sock.sendto(data, self.target)

    def wait_for(self, predicate, timeout=WAIT_S):
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout)

    def count(self, direction, packet_kind):
        return sum(1 for _t, data, _s in (self.up if direction == "up" else self.down)
                   if kind(data) == packet_kind)

    def close(self):
        self._stop = True
        self._thread.join(2)
        for sock in [self.listen] + list(self.nat.values()):
            sock.close()
        self.selector.close()


def captured(taps, direction, kinds):
    """[(data, client source, tap)] of the packets of `kinds` the taps saw going `direction`."""
    return [(data, source, tap) for tap in taps for _t, data, source in tap.records(direction)
            if kind(data) in kinds]


def client_sources(taps):
    return {(source, tap) for tap in taps for source in tap.sources()}


def echoed_heartbeats(taps):
    """(epoch tag, link, heartbeat seq) of every ECHO the server sent back through the taps."""
    keys = []
    for data, _source, _tap in captured(taps, "down", (ECHO,)):
        if len(data) == mpudp.OVERHEAD + mpudp.ECHO_PAYLOAD.size:
            _flags, link, _cid, _session, nonce = header(data)
            hb_seq, _bitmap = mpudp.ECHO_PAYLOAD.unpack_from(data, mpudp.HEADER_SIZE)
            keys.append((nonce >> mpudp.SEQ_BITS, link, hb_seq))
    return keys


def duplicates(items):
    return sorted(item for item, count in collections.Counter(items).items() if count > 1)


def echo_payloads(echo):
    with echo.cond:
        return [data for data, _source in echo.received]


class App:
    """A local application: sends unique payloads through the client, keeps count of what comes back."""

    def __init__(self, target, host=LOOPBACK):
        self.sock = udp_socket(host=host)
        self.target = target
        self.received = collections.Counter()
        self.n = 0

    def probe(self, prefix, timeout=WAIT_S, interval=0.05):
        """Send fresh payloads until one is echoed back; the seconds it took.

        Every attempt is a new payload, so a payload seen twice anywhere is a replay."""
        start = time.monotonic()
        deadline = start + timeout
        sent = set()
        while time.monotonic() < deadline:
            payload = ("%s:%d" % (prefix, self.n)).encode()
            self.n += 1
            sent.add(payload)
            self.sock.sendto(payload, self.target)
            until = min(time.monotonic() + interval, deadline)
            while True:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                self.sock.settimeout(remaining)
                try:
                    data, _ = self.sock.recvfrom(65536)
                except socket.timeout:
                    break
                self.received[data] += 1
                if data in sent:
                    return time.monotonic() - start
        raise AssertionError("no echo for %r within %ss" % (prefix, timeout))

    def silent_for(self, prefix, seconds, count=10):
        """Send `count` payloads over `seconds`; the replies that came back (expected: none)."""
        got = []
        for i in range(count):
            self.sock.sendto(("%s:%d" % (prefix, i)).encode(), self.target)
            self.sock.settimeout(seconds / count)
            try:
                data, _ = self.sock.recvfrom(65536)
                got.append(data)
            except socket.timeout:
                pass
        return got

    def drain(self):
        self.sock.setblocking(False)
        for data, _ in drain(self.sock):
            self.received[data] += 1
        self.sock.setblocking(True)

    def close(self):
        self.sock.close()


class Attacker:
    """A socket somewhere else: sends what it is given, keeps whatever comes back."""

    def __init__(self):
        self.sock = udp_socket(blocking=False)
        self.got = []

    def send(self, packets, addr):
        for data in packets:
            try:
                self.sock.sendto(data, addr)
            except OSError:
                pass

    def replies(self):
        self.got.extend(data for data, _ in drain(self.sock))
        return list(self.got)

    def close(self):
        self.sock.close()


class TappedPair:
    """An echo upstream, an mpudp server, one Tap per link and an mpudp client (processes).

    Like conftest.RelayPair, but every link goes through a recording Tap, and
    either process can be stopped and started again on the same config.
    """

    def __init__(self, directory, links=2, server=None, client=None, extra_links=(), extra_client_keys=(),
                 config_mode=0o600, wait_handshake=True):
        self.directory = directory
        self.procs = []
        self.taps = []
        self.server = self.client = None
        self.echo = EchoServer(LOOPBACK)
        try:
            self.server_keys, self.client_keys = keypair(), keypair()
            self.server_port = free_udp_port()
            self.server_addr = (LOOPBACK, self.server_port)
            self.taps = [Tap(self.server_addr) for _ in range(links)]
            server_cfg = {
                "listen_addr": "%s:%d" % self.server_addr,
                "upstream_addr": self.echo.text,
                "server_private_key": self.server_keys[0],
                "client_public_keys": [self.client_keys[1]] + list(extra_client_keys),
            }
            server_cfg.update(server or {})
            self.server_config = write_config(directory, {"mode": "server", "server": server_cfg}, "server.json")
            self.client_port = free_udp_port()
            self.client_address = (LOOPBACK, self.client_port)
            client_cfg = {
                "listen_addr": "%s:%d" % self.client_address,
                "links": [{"remote_addr": tap.text} for tap in self.taps] + list(extra_links),
                "heartbeat_interval_sec": 0.1,
                "client_private_key": self.client_keys[0],
                "server_public_key": self.server_keys[1],
            }
            client_cfg.update(client or {})
            self.client_config = write_config(directory, {"mode": "client", "client": client_cfg}, "client.json")
            for path in (self.server_config, self.client_config):
                os.chmod(path, config_mode)
            self.start_server()
            self.start_client(wait_handshake)
        except BaseException:
            self.close()
            raise
        d = mpudp.decode_key
        self.client_secret = mpudp.static_secret(d(self.client_keys[0]), d(self.server_keys[1]),
                                                 d(self.client_keys[1]), d(self.server_keys[1]))

    def _spawn(self, path):
        process = MpudpProcess(path)
        self.procs.append(process)
        return process

    def start_server(self):
        self.server = self._spawn(self.server_config)
        self.server.wait_for_line("server listening on")

    def start_client(self, wait_handshake=True):
        self.client = self._spawn(self.client_config)
        if wait_handshake:
            self.client.wait_for_line("handshake done")

    def close(self):
        codes = [process.stop() for process in reversed(self.procs)]
        for tap in self.taps:
            tap.close()
        self.echo.close()
        return codes


@pytest.fixture
def tapped_pair(tmp_path):
    made = []

    def make(**kwargs):
        pair = TappedPair(tmp_path, **kwargs)
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.close()


def replay(pair, attacker, c2s, s2c, targets):
    """Re-send captured client->server packets from their own address and from the attacker's,
    and captured server->client DATA to each of the client link sockets in `targets`."""
    for data, source, tap in c2s:
        if source in tap.sources():
            tap.send_as(source, data)
    attacker.send([data for data, _source, _tap in c2s], pair.server_addr)
    for data, _source, _tap in s2c:
        for target, _tap in targets:
            attacker.send([data], target)


def check_nothing_replayed(pair, app, attacker, where, welcome_allowed=0):
    """The common verdict: no payload twice at the upstream or the app, no heartbeat echoed
    twice, nothing (or only that many WELCOMEs or COOKIEs, HELLO's size) back to the attacker."""
    app.probe(where + "-barrier")  # the server and client have read everything sent before
    app.probe(where + "-barrier2")
    app.drain()
    assert duplicates(echo_payloads(pair.echo)) == [], where + ": the upstream saw a payload twice"
    assert duplicates(app.received.elements()) == [], where + ": the application got a payload twice"
    assert duplicates(echoed_heartbeats(pair.taps)) == [], where + ": a heartbeat was echoed twice"
    replies = attacker.replies()
    others = [r for r in replies if kind(r) not in (WELCOME, COOKIE) or len(r) != HANDSHAKE_REPLY_SIZE]
    assert others == [], where + ": the attacker got %d answer(s) (types %s)" % (
        len(others), sorted({kind(r) for r in others}))
    assert len(replies) <= welcome_allowed, where + ": %d answers for %d HELLOs" % (len(replies), welcome_allowed)
    assert alive(pair.server) and alive(pair.client)


def capture_traffic(pair, app, n=10):
    for i in range(n):
        app.probe("before")
    for tap in pair.taps:  # heartbeats on every link, and replies on the active one
        assert tap.wait_for(lambda t: t.count("up", HEARTBEAT) >= 3 and t.count("down", ECHO) >= 3)
    c2s = captured(pair.taps, "up", (DATA, HEARTBEAT))
    s2c = captured(pair.taps, "down", (DATA,))
    hellos = captured(pair.taps, "up", (HELLO,))
    assert sum(1 for c in c2s if kind(c[0]) == DATA) >= n and s2c and hellos
    return c2s, s2c, hellos


# ============================================================================
# 1. Replay safety
# ============================================================================


def test_replays_refused_at_once_and_after_a_client_restart(tapped_pair):
    pair = tapped_pair()
    app = App(pair.client_address)
    attacker = Attacker()
    c2s, s2c, hellos = capture_traffic(pair, app)
    first_sources = client_sources(pair.taps)

    # (a) at once from the same address, (b) from another address, and server->client DATA
    # replayed to the client's link sockets.
    replay(pair, attacker, c2s, s2c, first_sources)
    check_nothing_replayed(pair, app, attacker, "at once")

    # (c) the client restarts: a new epoch; the old packets are dead for good.
    assert pair.client.stop() == 0
    started = time.monotonic()
    pair.start_client()
    resume = app.probe("after-client-restart")
    report("client restart: traffic resumes %.0f ms after the new client process starts"
           % ((time.monotonic() - started) * 1000))
    pair.server.wait_for_line("new epoch", start=pair.server.wait_for_line("new epoch") + 1)
    new_sources = client_sources(pair.taps) - first_sources
    assert new_sources, "the restarted client uses new link sockets"
    replay(pair, attacker, c2s, s2c, new_sources | first_sources)
    check_nothing_replayed(pair, app, attacker, "after client restart")

    # A replayed HELLO of the old run gets at most a COOKIE (its cookie, if any, was made for
    # the client's address) or a WELCOME with a fresh server nonce the attacker cannot use,
    # both no larger than the HELLO; and the old packets still do not verify.
    old_welcomes = {bytes(d[mpudp.HEADER_SIZE + 16:mpudp.HEADER_SIZE + 32])
                    for d, _s, _t in captured(pair.taps, "down", (WELCOME,))}
    distinct_hellos = sorted({data for data, _s, _t in hellos})
    attacker.send(distinct_hellos, pair.server_addr)
    replay(pair, attacker, c2s, s2c, new_sources)
    check_nothing_replayed(pair, app, attacker, "after replayed HELLO", welcome_allowed=len(distinct_hellos))
    for welcome in attacker.replies():
        client_nonce = welcome[mpudp.HEADER_SIZE:mpudp.HEADER_SIZE + 16]
        assert client_nonce in {h[mpudp.HEADER_SIZE:mpudp.HEADER_SIZE + 16] for h in distinct_hellos}
        assert welcome[mpudp.HEADER_SIZE + 16:mpudp.HEADER_SIZE + 32] not in old_welcomes, \
            "a replayed HELLO must get a fresh server nonce"
    assert resume < WAIT_S
    app.close()
    attacker.close()


def test_replays_refused_after_a_server_restart(tapped_pair):
    pair = tapped_pair()
    app = App(pair.client_address)
    attacker = Attacker()
    c2s, s2c, hellos = capture_traffic(pair, app)
    sources = client_sources(pair.taps)
    n_before = len(echo_payloads(pair.echo))
    before = set(echo_payloads(pair.echo))

    # (d) the server restarts on the same port; the client notices and shakes hands again.
    handshakes = pair.client.wait_for_line("handshake done")
    stopped = time.monotonic()
    assert pair.server.stop() == 0
    started = time.monotonic()
    pair.start_server()
    pair.client.wait_for_line("handshake done", start=handshakes + 1)
    handshake_s = time.monotonic() - started
    app.probe("after-server-restart")
    resumed = time.monotonic()
    report("server restart: handshake again %.0f ms after the new server starts; traffic resumes "
           "%.0f ms after it starts (%.0f ms after the old one was stopped)"
           % (handshake_s * 1000, (resumed - started) * 1000, (resumed - stopped) * 1000))

    replay(pair, attacker, c2s, s2c, sources)
    check_nothing_replayed(pair, app, attacker, "after server restart")
    after = echo_payloads(pair.echo)[n_before:]
    assert not before.intersection(after), "an old payload reached the upstream after the restart"

    # (e) a replayed HELLO after the restart: at most a COOKIE or WELCOME back, never data.
    distinct_hellos = sorted({data for data, _s, _t in hellos})
    for data, source, tap in hellos[:1]:
        tap.send_as(source, data)  # from the client's own address: the client ignores the WELCOME
    attacker.send(distinct_hellos, pair.server_addr)
    replay(pair, attacker, c2s, s2c, sources)
    check_nothing_replayed(pair, app, attacker, "replayed HELLO after server restart",
                           welcome_allowed=len(distinct_hellos))
    assert not before.intersection(echo_payloads(pair.echo)[n_before:])
    app.close()
    attacker.close()


def seal_hello(static, client_id, nonce, cookie=bytes(mpudp.NONCE_SIZE)):
    return mpudp.seal(static.hello_mac, HELLO, 0, client_id, 0, mpudp.epoch_tag(nonce) << mpudp.SEQ_BITS,
                      mpudp.HELLO_PAYLOAD.pack(nonce, cookie))


def with_cookie(static, hello, cookie):
    """A HELLO again with `cookie` in it: only the holder of the static key can make this."""
    _flags, _link, client_id, _session, _nonce = header(hello)
    return seal_hello(static, client_id, hello[mpudp.HEADER_SIZE:mpudp.HEADER_SIZE + mpudp.NONCE_SIZE], cookie)


def handshake_value(data, nonce):
    """The second field of a WELCOME or COOKIE for `nonce` (server nonce or cookie), else None."""
    if kind(data) not in (WELCOME, COOKIE) or len(data) != HANDSHAKE_REPLY_SIZE:
        return None
    client_nonce, value = mpudp.WELCOME_PAYLOAD.unpack_from(data, mpudp.HEADER_SIZE)
    return value if client_nonce == nonce else None


def manual_handshake(sock, server_addr, secret, client_id, timeout=WAIT_S):
    """HELLO, COOKIE, HELLO with the cookie, WELCOME, by hand: the client-side Epoch, or None
    if no WELCOME came."""
    nonce = os.urandom(mpudp.NONCE_SIZE)
    static = mpudp.StaticKeys(secret)
    hello = seal_hello(static, client_id, nonce)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.sendto(hello, server_addr)
        sock.settimeout(0.1)
        try:
            data, _ = sock.recvfrom(65536)
        except socket.timeout:
            continue
        if not mpudp.verify(static.welcome_mac, data, len(data)) or handshake_value(data, nonce) is None:
            continue
        if kind(data) == COOKIE:
            hello = seal_hello(static, client_id, nonce, handshake_value(data, nonce))
        else:
            return mpudp.Epoch(secret, nonce, handshake_value(data, nonce), is_client=True)
    return None


def test_forged_client_id_gets_nothing_through(tapped_pair, tmp_path):
    other_private, other_public = keypair()
    pair = tapped_pair(extra_client_keys=[other_public])  # client 1: a second, valid key pair
    app = App(pair.client_address)
    app.probe("client0")
    d = mpudp.decode_key
    secret = mpudp.static_secret(d(other_private), d(pair.server_keys[1]), d(other_public), d(pair.server_keys[1]))

    # Client 1 is genuine: as itself, its data goes through (so its keys are good).
    sock = udp_socket()
    epoch = manual_handshake(sock, pair.server_addr, secret, client_id=1)
    assert epoch is not None
    sock.sendto(mpudp.seal(epoch.tx_mac, DATA | mpudp.FLAG_ACTIVE, 0, 1, 7, epoch.next_nonce(), b"client1-genuine"),
                pair.server_addr)
    assert pair.echo.wait_for(lambda r: any(data == b"client1-genuine" for data, _ in r))
    sock.settimeout(WAIT_S)
    reply = sock.recv(65536)  # the upstream's answer, back to client 1 under its own keys
    assert mpudp.verify(epoch.rx_mac, reply, len(reply)) and reply[mpudp.HEADER_SIZE:-16] == b"client1-genuine"

    # Client 1 claims to be client 0: its HELLO, and its data under client 0's epoch tag.
    forged_hello_epoch = manual_handshake(sock, pair.server_addr, secret, client_id=0, timeout=1.0)
    assert forged_hello_epoch is None, "a HELLO with a forged client id was answered"
    tag0 = header(captured(pair.taps, "up", (HEARTBEAT,))[-1][0])[4] >> mpudp.SEQ_BITS
    forged = []
    for i in range(50):
        for tag in (tag0, epoch.tag):
            nonce = (tag << mpudp.SEQ_BITS) | (10 ** 6 + i)
            forged.append(mpudp.seal(epoch.tx_mac, DATA | mpudp.FLAG_ACTIVE, 0, 0, 7, nonce, b"forged-%d" % i))
            forged.append(mpudp.seal(epoch.tx_mac, HEARTBEAT | mpudp.FLAG_ACTIVE, 0, 0, 0, nonce,
                                     mpudp.HEARTBEAT_PAYLOAD.pack(i + 1, 0)))
    sock.setblocking(False)
    assert drain(sock) == []
    for packet in forged:
        sock.sendto(packet, pair.server_addr)
    app.probe("client0-barrier")
    app.probe("client0-barrier2")
    assert not any(data.startswith(b"forged-") for data in echo_payloads(pair.echo))
    assert drain(sock) == [], "the forger got an answer"

    # A real mpudp client with client 1's key configured as client 0 never gets a handshake.
    forger_port = free_udp_port()
    forger_cfg = write_config(tmp_path, {"mode": "client", "client": {
        "listen_addr": "%s:%d" % (LOOPBACK, forger_port),
        "links": [{"remote_addr": "%s:%d" % pair.server_addr}], "heartbeat_interval_sec": 0.1,
        "client_id": 0, "client_private_key": other_private, "server_public_key": pair.server_keys[1]}},
        "forger.json")
    forger = pair._spawn(forger_cfg)
    forger.wait_for_line("client 0 listening")
    forger_app = App((LOOPBACK, forger_port))
    assert forger_app.silent_for("forger-app", 1.0) == []
    assert forger.count_lines("handshake done") == 0
    assert not any(data.startswith(b"forger-app") for data in echo_payloads(pair.echo))
    app.probe("client0-still-fine")
    sock.close()
    app.close()
    forger_app.close()


# ============================================================================
# In-process rig: a real Server and Client on one reactor with a fake clock
# ============================================================================


class Rig:
    """Server, client, an upstream the test echoes by hand, an application socket: one process."""

    def __init__(self, server=None, client=None):
        self.clock = FakeClock()
        self.logbuf = io.StringIO()
        self.log = mpudp.Log(stream=self.logbuf, clock=self.clock)
        self.reactor = mpudp.Reactor(clock=self.clock, log=self.log)
        self.resolver = mpudp.Resolver(self.reactor)
        self.upstream = udp_socket(blocking=False)
        self.upstream_seen = []
        self.server_keys, self.client_keys = keypair(), keypair()
        server_cfg = {"listen_addr": "127.0.0.1:0", "upstream_addr": "%s:%d" % self.upstream.getsockname(),
                      "server_private_key": self.server_keys[0], "client_public_keys": [self.client_keys[1]]}
        server_cfg.update(server or {})
        self.server = mpudp.Server(mpudp.parse_config({"mode": "server", "server": server_cfg}).section,
                                   self.reactor, self.log, self.resolver)
        self.server.start()
        self.server_addr = self.server.listen_sock.getsockname()
        self.client_cfg = {"listen_addr": "127.0.0.1:0", "links": [{"remote_addr": "%s:%d" % self.server_addr}],
                           "heartbeat_interval_sec": 0.2, "client_private_key": self.client_keys[0],
                           "server_public_key": self.server_keys[1]}
        self.client_cfg.update(client or {})
        self.client = self.new_client()
        self.app = udp_socket(blocking=False)
        assert self.run_until(lambda: self.client.epoch is not None and self.peer.epoch is not None
                              and self.client.links[0].health.up and self.peer.heartbeats, 5.0), \
            self.logbuf.getvalue()

    def new_client(self):
        client = mpudp.Client(mpudp.parse_config({"mode": "client", "client": self.client_cfg}).section,
                              self.reactor, self.log, self.resolver)
        client.start()
        return client

    @property
    def peer(self):
        return self.server.peers[0]

    @property
    def client_addr(self):
        return self.client.listen_sock.getsockname()

    @property
    def link_addr(self):
        return (LOOPBACK, self.client.links[0].sock.getsockname()[1])

    def pump(self, wait=0.0):
        """One pass of the loop; `wait` real seconds at most for a socket if no timer is due."""
        self.reactor.run_once(wait)
        for data, source in drain(self.upstream):
            self.upstream_seen.append(data)
            self.upstream.sendto(data, source)

    def run(self, seconds, step=0.01):
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.advance(min(step, end - self.clock.now))
            self.pump()

    def settle(self, predicate, timeout=WAIT_S):
        """Pump, the fake clock standing still, until predicate() (loopback delivery is not
        instant on a loaded machine); False if it never holds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            self.pump(0.005)
        return True

    def run_until(self, predicate, fake_seconds, step=0.01):
        """Advance the fake clock by `step`s (at most `fake_seconds`) until predicate()."""
        end = self.clock.now + fake_seconds
        while not predicate():
            if self.clock.now >= end:
                return False
            self.clock.advance(step)
            self.pump(0.002)
        return True

    def round_trip(self, payload):
        self.app.sendto(payload, self.client_addr)
        got = []
        return self.run_until(lambda: got.extend(d for d, _ in drain(self.app)) or payload in got, 2.0, 0.001)

    def drops(self):
        return sum(self.server.counters.values()), sum(self.client.counters.values())

    def close(self):
        self.client.close()
        self.server.close()
        self.resolver.close()
        self.reactor.close()
        for sock in (self.upstream, self.app):
            sock.close()


@pytest.fixture
def rig():
    made = []

    def make(**kwargs):
        r = Rig(**kwargs)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


# ============================================================================
# 2. Fuzz
# ============================================================================


def mutate_header(rng, packet, own_tag, client_id_choices):
    """`packet` with some header fields replaced by random or edge-case values."""
    type_flags, link, client_id, session, nonce = header(packet)
    if rng.random() < 0.5:
        type_flags = rng.randrange(256)
    if rng.random() < 0.3:
        link = rng.choice((0, 1, 255, rng.randrange(256)))
    if rng.random() < 0.4:
        client_id = rng.choice(client_id_choices + (0xFFFF, rng.randrange(1 << 16)))
    if rng.random() < 0.3:
        session = rng.choice((0, 0xFFFFFFFF, rng.randrange(1 << 32)))
    if rng.random() < 0.6:
        seq = rng.choice((0, 1, mpudp.SEQ_MASK, rng.randrange(1 << 48)))
        tag = rng.choice((own_tag, own_tag, rng.randrange(1 << 16)))
        nonce = (tag << mpudp.SEQ_BITS) | seq
    mutated = bytearray(packet)
    mpudp.HEADER.pack_into(mutated, 0, type_flags, link, client_id, session, nonce)
    if bytes(mutated) == packet:
        mutated[-1] ^= 1  # never a valid packet
    return bytes(mutated)


def fuzz_packet(rng, templates, own_tag, client_ids):
    """One hostile datagram: (what, bytes).  No template is ever sent unmodified."""
    template = rng.choice(templates)
    roll = rng.random()
    if roll < 0.15:
        return "garbage", random_bytes(rng, rng.choice((rng.randrange(mpudp.OVERHEAD), rng.randrange(2000))))
    if roll < 0.3:
        return "truncated", template[:rng.randrange(len(template))]
    if roll < 0.33:
        n = rng.randint(60000, mpudp.MAX_UDP_PAYLOAD)
        body = bytearray(random_bytes(rng, n))
        if rng.random() < 0.5:  # a plausible header, so the MAC of a huge packet is computed
            mpudp.HEADER.pack_into(body, 0, DATA | mpudp.FLAG_ACTIVE, 0, client_ids[0], 1,
                                   (own_tag << mpudp.SEQ_BITS) | rng.randrange(1, 1 << 47))
        return "oversized", bytes(body)
    if roll < 0.6:
        flipped = bytearray(template)
        for _ in range(rng.randint(1, 8)):
            bit = rng.randrange(len(flipped) * 8)
            flipped[bit // 8] ^= 1 << (bit % 8)
        if bytes(flipped) == template:
            flipped[0] ^= 0x40
        return "bitflip", bytes(flipped)
    if roll < 0.9:
        return "header", mutate_header(rng, template, own_tag, client_ids)
    return "extended", template + random_bytes(rng, rng.randint(1, 64))


def build_templates(r, rng):
    """Packets that would be accepted if sent as they are: (to the server, to the client)."""
    s_epoch = r.peer.epoch
    static = r.client.static
    seq = [1 << 40]

    def nonce():
        seq[0] += 1
        return s_epoch.nonce_base | seq[0]

    c2s, s2c = [], []
    for i in range(8):
        payload = random_bytes(rng, rng.randrange(1, 300))
        c2s.append(mpudp.seal(s_epoch.rx_mac, DATA | mpudp.FLAG_ACTIVE, 0, 0, 1 + i, nonce(), payload))
        c2s.append(mpudp.seal(s_epoch.rx_mac, HEARTBEAT | mpudp.FLAG_ACTIVE, 0, 0, 0, nonce(),
                              mpudp.HEARTBEAT_PAYLOAD.pack(i + 1, 0)))
        client_nonce = os.urandom(16)
        c2s.append(mpudp.seal(static.hello_mac, HELLO, 0, 0, 0, mpudp.epoch_tag(client_nonce) << mpudp.SEQ_BITS,
                              mpudp.HELLO_PAYLOAD.pack(client_nonce, bytes(16))))
        s2c.append(mpudp.seal(s_epoch.tx_mac, DATA, 0, 0, 1 + i, nonce(), payload))
        s2c.append(mpudp.seal(s_epoch.tx_mac, ECHO, 0, 0, 0, nonce(), mpudp.ECHO_PAYLOAD.pack(i + 1, 1)))
        s2c.append(mpudp.seal(static.welcome_mac, WELCOME, 0, 0, 0, 0,
                              mpudp.WELCOME_PAYLOAD.pack(os.urandom(16), os.urandom(16))))
    return c2s, s2c


def delta(after, before):
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def test_fuzz_server_and_client_in_process(rig):
    r = rig()
    seed = FUZZ_SEED
    rng = random.Random(seed)
    where = "fuzz seed %d (MPUDP_FUZZ_SEED=%d replays it)" % (seed, seed)
    assert r.round_trip(b"before fuzz")
    c2s, s2c = build_templates(r, rng)
    own_tag = r.peer.epoch.tag
    s_epoch, c_epoch = r.peer.epoch, r.client.epoch
    return_path = (r.peer.return_path.addr, r.peer.return_path.link)
    server_before, client_before = dict(r.server.counters), dict(r.client.counters)
    upstream_before = len(r.upstream_seen)
    fuzz = udp_socket(blocking=False)
    sent = {"server": 0, "client": 0}
    kinds = collections.Counter()
    started = time.monotonic()
    base = r.drops()

    def accounted():
        server_drops, client_drops = r.drops()
        return server_drops - base[0] == sent["server"] and client_drops - base[1] == sent["client"]

    settled = True
    for _ in range(FUZZ_CASES):
        to_server = rng.random() < 0.5
        what, packet = fuzz_packet(rng, c2s if to_server else s2c, own_tag, (0, 1) if to_server else (0,))
        kinds[what] += 1
        fuzz.sendto(packet, r.server_addr if to_server else r.link_addr)
        sent["server" if to_server else "client"] += 1
        # The clock stands still: no timer runs, so no legitimate packet is sent meanwhile.
        if not r.settle(accounted, timeout=5):
            settled = False
            break
    elapsed = time.monotonic() - started
    server_drops, client_drops = delta(r.server.counters, server_before), delta(r.client.counters, client_before)
    report("fuzz: %d cases in %.2fs (%s); server %s; client %s; %s" % (
        FUZZ_CASES, elapsed, dict(kinds), server_drops, client_drops, where))
    assert r.reactor.errors["callback"] == 0, "%s: an exception escaped:\n%s" % (where, r.logbuf.getvalue()[-2000:])
    assert settled, "%s: sent %s, counted server %s client %s" % (where, sent, server_drops, client_drops)
    assert set(server_drops) <= SERVER_PRE_AUTH_DROPS, where
    assert set(client_drops) <= CLIENT_PRE_AUTH_DROPS, where
    assert len(r.upstream_seen) == upstream_before, "%s: fuzz reached the upstream" % where
    assert drain(r.app) == [], "%s: fuzz reached the application" % where
    assert drain(fuzz) == [], "%s: a fuzz packet was answered" % where
    assert r.peer.epoch is s_epoch and r.client.epoch is c_epoch and not r.peer.pending, where
    assert (r.peer.return_path.addr, r.peer.return_path.link) == return_path, "%s: the return path moved" % where
    assert r.round_trip(b"after fuzz"), where
    fuzz.close()


def test_fuzz_authenticated_nonsense_in_process(rig):
    """Valid MACs around nonsense (odd types, lengths, links, sessions): handled, never a crash."""
    r = rig()
    seed = FUZZ_SEED ^ 0x5A5A
    rng = random.Random(seed)
    where = "fuzz seed %d (MPUDP_FUZZ_SEED=%d replays it)" % (seed, FUZZ_SEED)
    assert r.round_trip(b"before")
    # Sealed with each side's own send counter, so later legitimate packets stay in the windows.
    c2s_epoch, s2c_epoch = r.client.epoch, r.peer.epoch
    sessions = set(r.client.sessions_by_id)
    fuzz = udp_socket(blocking=False)
    upstream_before = len(r.upstream_seen)
    cases = max(200, FUZZ_CASES // 4)
    for _ in range(cases):
        payload_len = rng.choice((0, 1, 7, 8, 9, 31, 32, 33, rng.randrange(1500)))
        if rng.random() < 0.5:  # to the server: anything but DATA (which would be forwarded, legitimately)
            packet_kind = rng.choice((0, HEARTBEAT, ECHO, HELLO, WELCOME, 6, 9, 15))
            link = rng.randrange(256)
            if packet_kind == HEARTBEAT and rng.random() < 0.5:
                # A well-formed heartbeat; its seq stays near the link's last one (a huge gap is
                # test_authenticated_heartbeat_with_a_huge_seq_gap_is_cheap's business).
                last = r.peer.heartbeats.get(link, [1000, 0])[0]
                payload = mpudp.HEARTBEAT_PAYLOAD.pack(max(1, last + rng.randint(-40, 40)), rng.getrandbits(32))
            else:
                if packet_kind == HEARTBEAT and payload_len == mpudp.HEARTBEAT_PAYLOAD.size:
                    payload_len += 1
                payload = random_bytes(rng, payload_len)
            packet = mpudp.seal(c2s_epoch.tx_mac, packet_kind, link, 0, rng.getrandbits(32),
                                c2s_epoch.next_nonce(), payload)
            fuzz.sendto(packet, r.server_addr)
        else:
            packet_kind = rng.choice((0, DATA, HEARTBEAT, ECHO, HELLO, WELCOME, 7, 15))
            session = rng.getrandbits(32)
            while session in sessions:
                session = rng.getrandbits(32)
            if packet_kind == ECHO and rng.random() < 0.5:
                payload = mpudp.ECHO_PAYLOAD.pack(rng.getrandbits(32), rng.getrandbits(32))
            else:
                payload = random_bytes(rng, payload_len)
            packet = mpudp.seal(s2c_epoch.tx_mac, packet_kind, 0, 0, session, s2c_epoch.next_nonce(), payload)
            fuzz.sendto(packet, r.link_addr)
        r.pump()
    quiet_until = time.monotonic() + 0.2
    while time.monotonic() < quiet_until:  # the last ones are read
        r.pump(0.01)
    assert r.reactor.errors["callback"] == 0, "%s:\n%s" % (where, r.logbuf.getvalue()[-2000:])
    assert len(r.upstream_seen) == upstream_before, where
    assert drain(r.app) == [], where
    answers = drain(fuzz)
    assert all(kind(data) == ECHO and len(data) == mpudp.OVERHEAD + mpudp.ECHO_PAYLOAD.size
               for data, _ in answers), where
    assert r.round_trip(b"after"), where
    fuzz.close()


LOW_ORDER_POINTS = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    (2 ** 255 - 19 - 1).to_bytes(32, "little"),
    (2 ** 255 - 19).to_bytes(32, "little"),
    (2 ** 255 - 19 + 1).to_bytes(32, "little"),
]


def test_fuzz_pure_decoders():
    seed = FUZZ_SEED ^ 0xD0D0
    rng = random.Random(seed)
    where = "seed %d (MPUDP_FUZZ_SEED=%d replays it)" % (seed, FUZZ_SEED)
    mac = mpudp.make_mac(random_bytes(rng, 32))
    for _ in range(FUZZ_CASES):
        data = random_bytes(rng, rng.randrange(80))
        try:
            fields = mpudp.parse_header(data)
        except mpudp.ProtocolError:
            assert len(data) < mpudp.OVERHEAD, where
        else:
            assert len(data) >= mpudp.OVERHEAD and len(fields) == 5, where
            assert mpudp.HEADER.pack(*fields) == data[:mpudp.HEADER_SIZE], where
        as_view = rng.random() < 0.5
        assert mpudp.verify(mac, memoryview(bytearray(data)) if as_view else data,
                            rng.randint(0, len(data))) is False, where
        # The fixed-size payloads the receive paths unpack after their length checks.
        if len(data) >= mpudp.HEADER_SIZE + 32:
            mpudp.HELLO_PAYLOAD.unpack_from(data, mpudp.HEADER_SIZE)
            mpudp.ECHO_PAYLOAD.unpack_from(data, mpudp.HEADER_SIZE)
        text = rng.choice((
            data.decode("latin-1"),
            random_bytes(rng, rng.randrange(48)).hex(),
            mpudp.encode_key(random_bytes(rng, rng.choice((31, 32, 33)))),
            mpudp.encode_key(random_bytes(rng, 32))[:-1] + rng.choice("=*-A \n"),
        ))
        try:
            assert len(mpudp.decode_key(text)) == 32, where
        except mpudp.ProtocolError:
            pass
    for point in LOW_ORDER_POINTS:  # never a usable secret from a degenerate public key
        with pytest.raises(mpudp.ProtocolError):
            mpudp.static_secret(mpudp.generate_private_key(), point, point, point)


def test_replay_window_matches_a_model():
    seed = FUZZ_SEED ^ 0x77
    rng = random.Random(seed)
    for size in (4, 64, mpudp.REPLAY_WINDOW_SIZE):
        window, accepted, top = mpudp.ReplayWindow(size), set(), 0
        recent = collections.deque(maxlen=64)
        for _ in range(FUZZ_CASES):
            roll = rng.random()
            if roll < 0.4:
                seq = top + rng.randint(-2 * size, 3)
            elif roll < 0.6 and recent:
                seq = rng.choice(recent)
            elif roll < 0.7:
                seq = rng.choice((0, 1, top - size, top - size + 1, mpudp.SEQ_MASK))
            else:
                seq = top + rng.randint(1, 5 * size)
            seq = min(max(seq, 0), mpudp.SEQ_MASK)
            expected = seq != 0 and seq + size > top and seq not in accepted
            assert window.fresh(seq) == expected, "seed %d size %d seq %d top %d" % (seed, size, seq, top)
            if expected and rng.random() < 0.8:
                window.mark(seq)
                accepted.add(seq)
                recent.append(seq)
                top = max(top, seq)


# ============================================================================
# 3. Flood
# ============================================================================


FLOODER = r"""
import binascii, json, socket, sys, time
path, host, port, rate, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
packets = [binascii.unhexlify(line.strip()) for line in open(path) if line.strip()]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.setblocking(False)
sent = received = errors = 0
start = time.monotonic()
print("started", flush=True)
while True:
    elapsed = time.monotonic() - start
    if elapsed >= seconds:
        break
    for _ in range(max(0, min(int(elapsed * rate) - sent, 500))):
        try:
            s.sendto(packets[sent % len(packets)], (host, port))
        except OSError:
            errors += 1
        sent += 1
    try:
        while True:
            s.recv(65536)
            received += 1
    except OSError:
        pass
    time.sleep(0.002)
time.sleep(0.2)
try:
    while True:
        s.recv(65536)
        received += 1
except OSError:
    pass
print(json.dumps({"sent": sent, "received": received, "errors": errors, "seconds": time.monotonic() - start}))
"""


def flood_packets(pair, rng, n=400):
    """Garbage, captured replays, and packets under a wrong key that reach the MAC check."""
    c2s = [data for data, _s, _t in captured(pair.taps, "up", (DATA, HEARTBEAT))]
    hellos = [data for data, _s, _t in captured(pair.taps, "up", (HELLO,))]
    tag = header(c2s[-1])[4] >> mpudp.SEQ_BITS
    wrong = mpudp.make_mac(random_bytes(rng, 32))
    packets = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.25:
            packets.append(rng.choice(c2s))
        elif roll < 0.5:
            nonce = (tag << mpudp.SEQ_BITS) | rng.randrange(1 << 30, 1 << 47)
            packets.append(mpudp.seal(wrong, rng.choice((DATA, HEARTBEAT)) | mpudp.FLAG_ACTIVE, 0, 0,
                                      rng.getrandbits(32), nonce, random_bytes(rng, rng.randrange(8, 1200))))
        elif roll < 0.7:
            packets.append(random_bytes(rng, rng.randrange(1, 1400)))
        elif roll < 0.8:
            packets.append(rng.choice(hellos))
        elif roll < 0.9:
            client_nonce = random_bytes(rng, 16)
            packets.append(mpudp.seal(wrong, HELLO, 0, 0, 0, mpudp.epoch_tag(client_nonce) << mpudp.SEQ_BITS,
                                      mpudp.HELLO_PAYLOAD.pack(client_nonce, bytes(16))))
        else:
            packets.append(mpudp.seal(wrong, DATA, 0, rng.choice((1, 2, 0xFFFF)), 1,
                                      rng.getrandbits(64), random_bytes(rng, 100)))
    return packets


@pytest.mark.slow
def test_flood_does_not_starve_legitimate_traffic(tapped_pair, tmp_path):
    legit_pps, flood_factor, flood_s = 200, 10, 3.0
    pair = tapped_pair()
    app = App(pair.client_address)
    for _ in range(5):
        app.probe("warm-up")
    for tap in pair.taps:
        assert tap.wait_for(lambda t: t.count("up", HEARTBEAT) >= 3)
    packets = flood_packets(pair, random.Random(FUZZ_SEED))
    packet_file = os.path.join(str(tmp_path), "flood.hex")
    with open(packet_file, "w") as f:
        f.write("\n".join(p.hex() for p in packets))
    pid = pair.server.proc.pid

    flooder = subprocess.Popen(
        [sys.executable, "-c", FLOODER, packet_file, LOOPBACK, str(pair.server_port),
         str(legit_pps * flood_factor), str(flood_s)], stdout=subprocess.PIPE, universal_newlines=True)
    try:
        assert flooder.stdout.readline().strip() == "started"
        rss_start = rss_kb(pid)
        # The legitimate stream: legit_pps unique payloads for as long as the flood lasts.
        sock = app.sock
        sock.setblocking(False)
        sent, received = set(), set()
        start = time.monotonic()
        while time.monotonic() - start < flood_s - 0.2:
            due = int((time.monotonic() - start) * legit_pps)
            while len(sent) < due:
                payload = b"legit:%d" % len(sent)
                sock.sendto(payload, pair.client_address)
                sent.add(payload)
            received.update(data for data, _ in drain(sock))
            time.sleep(0.002)
        tail = time.monotonic() + 1.0
        while time.monotonic() < tail and not sent <= received:
            received.update(data for data, _ in drain(sock))
            time.sleep(0.01)
        out, _ = flooder.communicate(timeout=WAIT_S)
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait()
    rss_end = rss_kb(pid)
    flood = json.loads(out.strip().splitlines()[-1])
    fraction = len(received & sent) / float(len(sent))
    report("flood: %d hostile packets at %.0f pps against %d legitimate at %d pps: %.1f%% of the legitimate "
           "echoed back; server RSS %d -> %d kB (%+d kB); flooder got %d answers"
           % (flood["sent"], flood["sent"] / flood["seconds"], len(sent), legit_pps, 100 * fraction,
              rss_start, rss_end, rss_end - rss_start, flood["received"]))
    assert flood["sent"] >= legit_pps * flood_factor * flood_s * 0.8, "the flooder fell behind: %s" % flood
    assert fraction >= 0.9
    assert rss_end - rss_start < 5 * 1024
    assert flood["received"] == 0, "the server answered the flood"
    assert duplicates(echo_payloads(pair.echo)) == []
    assert alive(pair.server) and alive(pair.client)
    app.sock.setblocking(True)
    app.probe("after-flood")


# ============================================================================
# 4. Faults
# ============================================================================


def test_upstream_down_and_back(relay_pair):
    pair = relay_pair(links=1)
    app = App(pair.client_address)
    app.probe("up")
    port = pair.echo.address[1]
    pair.echo.close()
    mark = len(pair.server.lines)
    for i in range(5):  # into a closed port: ECONNREFUSED on the server's connected upstream socket
        app.sock.sendto(b"void:%d" % i, pair.client_address)
        time.sleep(0.02)
    line = pair.server.lines[pair.server.wait_for_line("upstream %s:%d: " % (LOOPBACK, port), start=mark)]
    assert "refused" in line.lower(), line
    started = time.monotonic()
    pair.echo = EchoServer(LOOPBACK, port)
    app.probe("back")
    report("upstream down and back: traffic resumes %.0f ms after the upstream listens again"
           % ((time.monotonic() - started) * 1000))
    assert alive(pair.server) and alive(pair.client)
    app.close()


def wait_for_last(process, markers, wanted, timeout=WAIT_S):
    """Wait until the last line of `process` containing one of `markers` contains `wanted`."""
    def last_has():
        lines = [line for line in process.lines if any(m in line for m in markers)]
        return bool(lines) and wanted in lines[-1]

    with process.cond:
        return process.cond.wait_for(last_has, timeout)


class NoRoute:
    """A link socket whose sends the kernel refuses with ENETUNREACH (its route is gone):
    everything else, receiving included, goes to the real socket."""

    def __init__(self, sock):
        self.sock = sock

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def sendto(self, *args):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    sendmsg = sendto


def test_a_link_whose_sends_are_unreachable_is_down_at_once():
    """ENETUNREACH on a send (no route for the link now): the link is down at once and the
    traffic moves to the other link, not after max_consecutive_fail missed heartbeats; one
    warning, the later refusals only counted; back up through heartbeats once it can send."""
    rig = Rig()
    try:
        rig.client.close()  # a client with two links to the same server instead
        server = "%s:%d" % rig.server_addr
        rig.client_cfg.update(links=[{"remote_addr": server}, {"remote_addr": server}],
                              max_consecutive_fail=50)  # missed heartbeats alone would take 10 s
        rig.client = client = rig.new_client()
        assert rig.run_until(lambda: all(l.health.up for l in client.links) and client.active is not None, 5.0)
        gone = client.active
        other = next(l for l in client.links if l is not gone)
        real_sock, gone.sock = gone.sock, NoRoute(gone.sock)
        mark = len(rig.logbuf.getvalue())
        went_down_at = rig.clock.now
        rig.app.sendto(b"lost: the first packet after the route went", rig.client_addr)
        rig.app.sendto(b"queued behind it", rig.client_addr)
        assert rig.settle(lambda: client.active is other), rig.logbuf.getvalue()[mark:]
        assert rig.clock.now == went_down_at  # no time passed: no heartbeat was missed
        assert not gone.health.up
        # Only the packet the kernel refused is lost: the one behind it waited in the
        # socket and went by the other link.
        assert rig.settle(lambda: b"queued behind it" in rig.upstream_seen), rig.upstream_seen
        assert b"lost: the first packet after the route went" not in rig.upstream_seen
        assert rig.round_trip(b"by the other link")
        rig.run(2.0)  # 10 heartbeat intervals: the gone link's heartbeats are refused too
        log = rig.logbuf.getvalue()[mark:]
        assert log.count("%s: [Errno %d] Network is unreachable; down until its heartbeats are answered again"
                         % (gone.name, errno.ENETUNREACH)) == 1, log
        assert "missed heartbeats" not in log and not gone.health.up and client.active is other
        assert client.counters["link_errors"] >= 5  # the data packet and the heartbeats: each refused

        gone.sock = real_sock  # the route is back
        assert rig.run_until(lambda: gone.health.up, 10.0), rig.logbuf.getvalue()[mark:]
        assert rig.round_trip(b"after the route came back")
    finally:
        rig.close()


def test_the_start_up_choice_of_link_is_logged():
    """The link that carries the traffic from the start is named once, like every later switch."""
    rig = Rig()
    try:
        lines = [line for line in rig.logbuf.getvalue().splitlines() if "carries the traffic" in line]
        assert [line.split(" INFO  ", 1)[-1] for line in lines] == [
            "first choice: %s carries the traffic" % rig.client.links[0].name], lines
        assert rig.client.active is rig.client.links[0]
    finally:
        rig.close()


def test_route_vanishes_enetunreach_in_a_netns(tmp_path):
    """The active link's route disappears (`ip addr del`: sendto says ENETUNREACH on the client,
    and on the server for replies); the link is down at once, not by missed heartbeats, and
    traffic moves to the other link; the route comes back.

    Everything runs inside a new network namespace whose loopback carries a second
    address, 10.203.0.1/24: link 0 goes to 127.0.0.1, link 1 (preferred by priority) to
    10.203.0.1.  Deleting that address removes the route; the namespace has no default route.
    """
    ns = NetNs("hostile")
    procs, closers = [], []
    try:
        ns.ip("addr", "add", "10.203.0.1/24", "dev", "lo")
        server_keys, client_keys = keypair(), keypair()

        def setup():
            echo = EchoServer(LOOPBACK)
            closers.append(echo.close)
            port, client_port = free_udp_port(), free_udp_port()
            server_cfg = write_config(tmp_path, {"mode": "server", "server": {
                "listen_addr": "0.0.0.0:%d" % port, "upstream_addr": echo.text,
                "server_private_key": server_keys[0], "client_public_keys": [client_keys[1]]}}, "server.json")
            client_cfg = write_config(tmp_path, {"mode": "client", "client": {
                "listen_addr": "127.0.0.1:%d" % client_port,
                "links": [{"remote_addr": "127.0.0.1:%d" % port, "priority": 100},
                          {"remote_addr": "10.203.0.1:%d" % port}],
                "heartbeat_interval_sec": 0.1, "client_private_key": client_keys[0],
                "server_public_key": server_keys[1]}}, "client.json")
            server = MpudpProcess(server_cfg)
            procs.append(server)
            server.wait_for_line("server listening on")
            client = MpudpProcess(client_cfg)
            procs.append(client)
            app = App((LOOPBACK, client_port))
            closers.append(app.close)
            return server, client, app

        server, client, app = ns.inside(setup)
        client.wait_for_line("handshake done")
        # At start the first link to answer may carry traffic until the preferred one is
        # steady: wait for the client to hand it to link 1 (the server's log alone can show
        # link 1 first, from the start-up heartbeat, before link 0 took over).  Until both
        # links have answered, the start-up choice may still move.
        def link_1_carries():
            if not all(any(line.split(" INFO  ", 1)[-1].startswith("link %d (" % i) and " up, rtt " in line
                           for line in client.lines) for i in (0, 1)):
                return False
            lines = [line for line in client.lines if " carries the traffic" in line or " switch link " in line]
            return bool(lines) and ("-> link 1 (" in lines[-1] or ": link 1 (" in lines[-1])

        with client.cond:
            assert client.cond.wait_for(link_1_carries, WAIT_S), client.output()
        app.probe("via-link-1")
        assert wait_for_last(server, ("return path link", "replies now go by link"), "link 1 ")

        mark_client, mark_server = len(client.lines), len(server.lines)
        vanished = time.monotonic()
        ns.ip("addr", "del", "10.203.0.1/24", "dev", "lo")
        app.probe("route-gone", interval=0.02)
        resume = time.monotonic() - vanished
        line = client.lines[client.wait_for_line("unreachable", start=mark_client)]
        assert "link 1" in line, line
        client.wait_for_line("switch link 1 (10.203.0.1", start=mark_client)  # "-> link 0 ...: <why>"
        assert "down until its heartbeats are answered again" in line, line
        assert not any("missed heartbeats" in l for l in client.lines[mark_client:]), client.lines[mark_client:]
        server.wait_for_line("replies now go by link 0", start=mark_server)
        report("route vanished (ENETUNREACH): traffic resumes on the other link %.0f ms after the address "
               "was deleted" % (resume * 1000))

        mark_client = len(client.lines)
        ns.ip("addr", "add", "10.203.0.1/24", "dev", "lo")
        client.wait_for_line("link 1 (10.203.0.1", start=mark_client)  # "... up, rtt ..."
        app.probe("route-back")
        assert alive(server) and alive(client)
        assert [p.stop() for p in procs] == [0, 0]
    finally:
        for process in procs:
            process.stop()
        for close in closers:
            close()
        ns.close()


def test_link_to_a_closed_port_is_harmless(tapped_pair):
    """Without a namespace: a link whose remote is a closed loopback port (ICMP port
    unreachable; the client's unconnected link socket is not told) is just a dead link,
    even when it is the preferred one."""
    closed = free_udp_port()
    pair = tapped_pair(links=1, extra_links=[{"remote_addr": "%s:%d" % (LOOPBACK, closed), "priority": -100}])
    app = App(pair.client_address)
    for i in range(5):
        app.probe("over-link-0")
    assert pair.client.count_lines("link 1 (%s:%d) up" % (LOOPBACK, closed)) == 0
    assert alive(pair.client) and alive(pair.server)
    app.close()


def test_full_socket_buffer_is_survived(relay_pair):
    pair = relay_pair(links=1)
    app = App(pair.client_address)
    app.probe("before")
    drops_before = udp_drops(pair.client_port)
    blaster = udp_socket(blocking=False)
    payload = b"x" * 1200
    blasted = refused = 0
    pid = pair.client.proc.pid
    os.kill(pid, signal.SIGSTOP)  # the client cannot forward at all: its listen buffer fills
    try:
        for _ in range(4000):
            try:
                blaster.sendto(payload, pair.client_address)
                blasted += 1
            except BlockingIOError:
                refused += 1
    finally:
        os.kill(pid, signal.SIGCONT)
    for _ in range(4000):  # and faster than it can forward while it runs
        try:
            blaster.sendto(payload, pair.client_address)
            blasted += 1
        except BlockingIOError:
            refused += 1
    drops = udp_drops(pair.client_port) - drops_before
    recovered = app.probe("after", timeout=WAIT_S)
    report("full socket buffer: %d datagrams blasted at the client (%d EAGAIN at the sender), %d dropped "
           "by the kernel at its listen socket; traffic works again %.0f ms later"
           % (blasted, refused, drops, recovered * 1000))
    assert drops > 0
    assert alive(pair.client) and alive(pair.server)
    blaster.close()
    app.close()


# ============================================================================
# 5. Limits
# ============================================================================


@pytest.mark.parametrize("side, limit", [("client", 3), ("server", 2)])
def test_max_sessions_refuses_the_next_one(relay_pair, side, limit):
    pair = relay_pair(links=1, **{side: {"max_sessions": limit}})
    refusing = getattr(pair, side)
    apps = [App(pair.client_address) for _ in range(limit + 1)]
    for i, app in enumerate(apps[:limit]):
        app.probe("app%d" % i)
    assert apps[limit].silent_for("app%d" % limit, 1.0) == []
    refusing.wait_for_line("max_sessions (%d) reached" % limit)
    for i, app in enumerate(apps[:limit]):
        app.probe("app%d-again" % i)
    assert not any(data.startswith(b"app%d" % limit) for data in echo_payloads(pair.echo))
    assert alive(refusing)
    for app in apps:
        app.close()


def captured_hellos(r, n):
    """The first HELLO of each of `n` new runs of the rig's client, captured on their way
    (never delivered): valid, distinct, and in whatever format the client uses."""
    capture = udp_socket(blocking=False)
    cfg = dict(r.client_cfg, links=[{"remote_addr": "%s:%d" % capture.getsockname()}])
    section = mpudp.parse_config({"mode": "client", "client": cfg}).section
    hellos = []
    for i in range(n):
        client = mpudp.Client(section, r.reactor, r.log, r.resolver)
        client.start()  # says HELLO at once
        client.close()
        wait_until(lambda: hellos.extend(d for d, _ in drain(capture) if kind(d) == HELLO) or len(hellos) > i,
                   what="captured HELLO %d" % i, interval=0.001)
    capture.close()
    assert len({h[mpudp.HEADER_SIZE:mpudp.HEADER_SIZE + mpudp.NONCE_SIZE] for h in hellos}) == n
    return hellos


def first_hello(r):
    return captured_hellos(r, 1)[0]


def get_cookie(r, sock, hello):
    """Send `hello` from `sock` and return the cookie the server answers with."""
    nonce = hello[mpudp.HEADER_SIZE:mpudp.HEADER_SIZE + mpudp.NONCE_SIZE]
    found = []
    sock.sendto(hello, r.server_addr)
    assert r.settle(lambda: found.extend(
        v for v in (handshake_value(d, nonce) for d, _ in drain(sock)) if v is not None) or found)
    return found[0]


def test_hellos_without_a_fresh_cookie_leave_no_state(rig):
    """A HELLO with no cookie, an old one, or one made for another address gets a COOKIE (the
    same size) and creates nothing; the same HELLO with a fresh cookie gets a WELCOME."""
    r = rig()
    hello = first_hello(r)
    attacker, other = udp_socket(blocking=False), udp_socket(blocking=False)
    pending = dict(r.peer.pending)
    cookie = get_cookie(r, attacker, hello)  # no cookie: a COOKIE back, no state
    assert r.peer.pending == pending and r.server.counters["hello_limit"] == 0
    for sender, hello_sent in ((other, with_cookie(r.client.static, hello, cookie)),  # made for `attacker`
                               (attacker, with_cookie(r.client.static, hello, bytes(range(16))))):
        assert get_cookie(r, sender, hello_sent) is not None  # a COOKIE again, not a WELCOME
        assert r.peer.pending == pending
    r.run(2 * mpudp.COOKIE_PERIOD_S + 0.1, step=1.0)  # the cookie grows old
    assert get_cookie(r, attacker, with_cookie(r.client.static, hello, cookie)) != cookie
    assert r.peer.pending == pending
    fresh = get_cookie(r, attacker, hello)
    attacker.sendto(with_cookie(r.client.static, hello, fresh), r.server_addr)
    welcomes = []
    assert r.settle(lambda: welcomes.extend(d for d, _ in drain(attacker) if kind(d) == WELCOME) or welcomes)
    assert len(r.peer.pending) == len(pending) + 1
    attacker.close()
    other.close()


def test_pending_epochs_and_hello_answers_are_bounded(rig):
    r = rig()
    per_sweep = 2 * mpudp.HELLOS_PER_SWEEP
    hellos = captured_hellos(r, 3 * per_sweep)  # valid and distinct: many client runs
    attacker = udp_socket(blocking=False)
    epoch = r.peer.epoch
    for sweep in range(3):
        r.run(mpudp.SWEEP_INTERVAL_CEILING_S + 0.1, step=0.05)  # a sweep refills the budget
        answered = []
        for hello in hellos[sweep * per_sweep:(sweep + 1) * per_sweep]:
            hello = with_cookie(r.client.static, hello, get_cookie(r, attacker, hello))
            before = len(answered) + sum(r.server.counters.values())
            attacker.sendto(hello, r.server_addr)
            assert r.settle(lambda: answered.extend(d for d, _ in drain(attacker))
                            or len(answered) + sum(r.server.counters.values()) == before + 1)
            assert len(r.peer.pending) <= mpudp.PENDING_EPOCHS_PER_CLIENT
        assert all(kind(d) == WELCOME and len(d) == mpudp.OVERHEAD + mpudp.WELCOME_PAYLOAD.size for d in answered)
        assert len(answered) == mpudp.HELLOS_PER_SWEEP, "sweep %d: %d WELCOMEs" % (sweep, len(answered))
    assert r.server.counters["hello_limit"] == 3 * (per_sweep - mpudp.HELLOS_PER_SWEEP)
    assert r.peer.epoch is epoch, "HELLOs must not displace the running epoch"
    assert r.reactor.errors["callback"] == 0
    assert r.round_trip(b"still works")
    attacker.close()


# ============================================================================
# 6. Keys never in logs
# ============================================================================


def secret_forms(private_b64s, extra=()):
    """The ways a key could leak: base64, a 16-character piece of it, hex."""
    forms = []
    for private_b64 in private_b64s:
        raw = mpudp.decode_key(private_b64)
        forms += [private_b64, private_b64[:16], private_b64[16:32], raw.hex()[:32]]
    for raw in extra:
        forms += [mpudp.encode_key(raw)[:16], raw.hex()[:32]]
    return forms


def run_cli(*args):
    return subprocess.run([sys.executable, mpudp.__file__] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True).stdout


def test_private_keys_never_in_logs_or_status_files(tapped_pair, tmp_path):
    score_file = os.path.join(str(tmp_path), "score.json")
    status_file = os.path.join(str(tmp_path), "status.json")
    pair = tapped_pair(config_mode=0o644,  # also the "readable by other users" warning
                       server={"debug": True, "max_sesions": 10, "status_file": status_file,
                               "heartbeat_timeout_sec": 1},
                       client={"debug": True, "score_file": score_file, "hearbeat_interval": 1})
    app = App(pair.client_address)
    for i in range(5):
        app.probe("traffic")
    wait_until(lambda: os.path.exists(score_file) and os.path.exists(status_file), what="the status files")
    for process in (pair.client, pair.server):  # SIGUSR1: the status table in the log
        mark = len(process.lines)
        process.proc.send_signal(signal.SIGUSR1)
        process.wait_for_line("epoch", start=mark)
    # SIGHUP with another private key in the file: refused, and the new key is not logged either.
    other_private, _other_public = keypair()
    with open(pair.client_config) as f:
        original = f.read()
    config = json.loads(original)
    config["client"]["client_private_key"] = other_private
    with open(pair.client_config, "w") as f:
        json.dump(config, f)
    mark = len(pair.client.lines)
    pair.client.proc.send_signal(signal.SIGHUP)
    pair.client.wait_for_line("reload refused", start=mark)
    with open(pair.client_config, "w") as f:
        f.write(original)
    pair.client.proc.send_signal(signal.SIGHUP)
    pair.client.wait_for_line("config reloaded", start=mark)
    app.probe("after-reload")
    cli = [run_cli("-config=%s" % path, flag) for path in (pair.server_config, pair.client_config)
           for flag in ("--check", "--status")]
    assert pair.client.stop() == 0 and pair.server.stop() == 0
    texts = [("client log", pair.client.output()), ("server log", pair.server.output())]
    for path in (score_file, status_file):
        with open(path) as f:
            texts.append((os.path.basename(path), f.read()))
    texts += [("command line", text) for text in cli]
    everything = "\n".join(text for _name, text in texts)
    for exercised in ("did you mean", "readable by other users", "opened for", "srtt ms", "reload refused"):
        assert exercised in everything, exercised  # the paths that could leak were taken
    for name, text in texts:
        for secret in secret_forms([pair.server_keys[0], pair.client_keys[0], other_private],
                                   [pair.client_secret]):
            assert secret not in text, "a private key (or the static secret) appears in the %s" % name
    app.close()


def test_restarted_client_with_a_colliding_epoch_tag_still_connects(rig):
    """A restarted client whose first HELLO nonce has the tag of the epoch the server still
    holds for its previous run: the server takes that HELLO for a replay, so the client must
    move on to a new nonce (HELLO_TRIES_PER_NONCE) rather than retry the same one forever."""
    r = rig()
    tag = r.client.epoch.tag
    r.client.close()  # the client dies without a word; the server keeps its epoch
    real_urandom = mpudp.os.urandom
    first = {"nonce": True}

    def urandom(n):
        if n == mpudp.NONCE_SIZE and first["nonce"]:
            first["nonce"] = False
            return bytes([tag >> 8, tag & 0xFF]) + real_urandom(n - 2)
        return real_urandom(n)

    mpudp.os.urandom = urandom
    try:
        r.client = r.new_client()
    finally:
        mpudp.os.urandom = real_urandom
    r.run_until(lambda: r.client.epoch is not None, 10.0, step=0.05)
    assert r.client.epoch is not None, "no handshake in 10 s; server counters %s" % dict(r.server.counters)
    assert r.client.epoch.tag != tag and r.server.counters["replay"] >= 1
    assert r.round_trip(b"after the clash")


# ============================================================================
# Regressions: bugs these tests found, fixed in mpudp.py since
# ============================================================================


def test_authenticated_heartbeat_with_a_huge_seq_gap_is_cheap(rig):
    """Server.on_heartbeat (then Server._echo) once shifted the heartbeat bitmap by (hb_seq - last), up to 2**31 bits: one
    40-byte heartbeat from an authenticated client allocated integers of up to 256 MB."""
    r = rig()
    epoch = r.peer.epoch
    last = r.peer.heartbeats[0][0]
    sock = udp_socket(blocking=False)
    packet = mpudp.seal(epoch.rx_mac, HEARTBEAT, 0, 0, 0, epoch.nonce_base | (epoch.window.top + 100),
                        mpudp.HEARTBEAT_PAYLOAD.pack(last + (1 << 26), 0))  # 2**31 - 1 is allowed too
    sock.sendto(packet, r.server_addr)
    echoes = []
    tracemalloc.start()
    try:
        echoed = r.settle(lambda: echoes.extend(drain(sock)) or echoes)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert echoed, "the heartbeat was not echoed"
    assert peak < 1 << 20, "one heartbeat cost %.1f MB" % (peak / 1e6)
    sock.close()


def test_a_mistyped_private_key_is_not_echoed_in_config_errors(tmp_path):
    """A private key given with the wrong JSON type (e.g. in a list) was echoed in the config
    error, 38 of its 44 base64 characters; on SIGHUP the same line goes to the log (syslog)."""
    private, public = keypair()
    leaks = []
    for wrong in ([private], {"key": private}):
        path = write_config(tmp_path, {"mode": "client", "client": {
            "listen_addr": "127.0.0.1:9", "links": [{"remote_addr": "127.0.0.1:5"}],
            "client_private_key": wrong, "server_public_key": public}}, "mistyped.json")
        out = run_cli("-config=%s" % path, "--check")
        assert "client_private_key" in out  # the error is reported...
        leaks += [form for form in secret_forms([private]) if form in out]
    assert leaks == [], "...with the key in it"


class HelloRace:
    """Old HELLOs against a client's new one, the attacker always first after a sweep.

    An attacker sending a few thousand HELLOs a second is, after each sweep refills the
    budget, ahead of a client that retries every heartbeat almost every time; here it is
    every time.  It is adaptive, as a real one can be: a HELLO that got a WELCOME goes to the
    back of its queue (the server will remember that nonce for a while), the others stay in front.
    """

    def __init__(self, r, stash, fresh):
        self.r, self.fresh, self.static = r, fresh, r.client.static
        self.queue = collections.deque(stash)
        self.attacker, self.client = udp_socket(blocking=False), udp_socket(blocking=False)
        self.client_answered = False

    def _send_and_settle(self, sock, packets):
        """Send, then pump until the server has dealt with each (a WELCOME or a counted drop)."""
        r = self.r
        before = sum(r.server.counters.values())
        answers = []

        def done():
            answers.extend(d for d, _ in drain(sock) if kind(d) in (WELCOME, COOKIE))
            return len(answers) + sum(r.server.counters.values()) - before >= len(packets)

        for packet in packets:
            sock.sendto(packet, r.server_addr)
        assert r.settle(done)
        nonce = lambda data: data[mpudp.HEADER_SIZE:mpudp.HEADER_SIZE + mpudp.NONCE_SIZE]  # noqa: E731
        self.cookie = next((a[mpudp.HEADER_SIZE + 16:mpudp.HEADER_SIZE + 32] for a in answers if kind(a) == COOKIE), None)
        return {nonce(a) for a in answers if kind(a) == WELCOME}

    def step(self, seconds):
        self.r.clock.advance(seconds)
        self.r.pump()  # timers first: a sweep refills the budget here
        burst = [self.queue.popleft() for _ in range(min(mpudp.HELLOS_PER_SWEEP + 1, len(self.queue)))]
        answered = self._send_and_settle(self.attacker, burst)
        nonce = lambda hello: hello[mpudp.HEADER_SIZE:mpudp.HEADER_SIZE + mpudp.NONCE_SIZE]  # noqa: E731
        self.queue.extendleft(reversed([h for h in burst if nonce(h) not in answered]))
        self.queue.extend(h for h in burst if nonce(h) in answered)
        # The attacker cannot put the COOKIEs it gets into its HELLOs (the MAC covers them); the client can.
        if self._send_and_settle(self.client, [self.fresh]) or (
                self.cookie is not None
                and self._send_and_settle(self.client, [with_cookie(self.static, self.fresh, self.cookie)])):
            self.client_answered = True
        return self.client_answered

    def close(self):
        self.attacker.close()
        self.client.close()


def test_replayed_old_hellos_cannot_starve_a_new_handshake(rig):
    """HELLOs captured from 9 earlier client runs, replayed after every sweep, used up the HELLO
    budget (HELLOS_PER_SWEEP) before the client's new HELLO, sweep after sweep, for ever."""
    r = rig()
    r.client.close()  # the client's old run is gone; its new run says HELLO below
    race = HelloRace(r, captured_hellos(r, mpudp.HELLOS_PER_SWEEP + 1), first_hello(r))
    sweeps = 3
    for _ in range(int(sweeps * mpudp.SWEEP_INTERVAL_CEILING_S / 0.2) + 2):
        if race.step(0.2):  # the client retries every 0.2 s
            break
    assert race.client_answered, "refused for %d sweeps: %s" % (sweeps, dict(r.server.counters))
    race.close()


# ============================================================================
# Captured HELLOs cannot starve a new handshake (the cookie round)
# ============================================================================


class StillStarved(AssertionError):
    """The client's new handshake was refused for the whole run."""


def test_a_large_stash_of_captured_hellos_cannot_starve_a_new_handshake(rig):
    remembered = getattr(mpudp, "SEEN_HELLOS_PER_CLIENT", 1024)
    if remembered > 4096:
        pytest.skip("too many HELLOs to capture in a unit test")
    r = rig()
    r.client.close()
    stash = captured_hellos(r, remembered + 2 * (mpudp.HELLOS_PER_SWEEP + 1))
    race = HelloRace(r, stash, first_hello(r))
    sweeps = remembered // mpudp.HELLOS_PER_SWEEP + 5  # long enough for the oldest to be forgotten
    step_s = 1.0  # the client retries every second
    for _ in range(int(sweeps * mpudp.SWEEP_INTERVAL_CEILING_S / step_s)):
        if race.step(step_s):
            break
    race.close()
    if not race.client_answered:
        raise StillStarved("refused for %d sweeps (%.0f s): %s" % (
            sweeps, sweeps * mpudp.SWEEP_INTERVAL_CEILING_S, dict(r.server.counters)))
