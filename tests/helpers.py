"""Traffic and observation helpers shared by the test files: sockets, waits, an echo
upstream, a recording link tap, an application, a paced stream, packet tools and
log-line helpers.  One copy each; the fixtures and the harnesses built from them
live in conftest.py.

Loopback only.  Every wait is bounded (WAIT_S) and waits on an event (a datagram,
a condition variable) where there is one; `wait_until` polls only state that has
no event to wait on (the kernel's /proc, a file).
"""

import collections
import itertools
import os
import random
import selectors
import socket
import struct
import sys
import threading
import time

import mpudp

WAIT_S = 15.0  # functional bound for anything a test waits on; generous for a loaded CI
LOOPBACK = "127.0.0.1"

# Seeded randomness of the hostile tests (fuzz, flood).  MPUDP_FUZZ_CASES (default 10000,
# well under a second) runs more cases; MPUDP_FUZZ_SEED replays the seed a failure names.
FUZZ_CASES = int(os.environ.get("MPUDP_FUZZ_CASES", "10000"))
FUZZ_SEED = int(os.environ.get("MPUDP_FUZZ_SEED", str(random.SystemRandom().randrange(1 << 32))))


# -- sockets and waits -------------------------------------------------------


def family_of(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def addr_text(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def udp_socket(host=LOOPBACK, blocking=True, timeout=None):
    """A UDP socket bound to a free port on `host`; non-blocking, or with `timeout`, if asked."""
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(blocking)
    if timeout is not None:
        sock.settimeout(timeout)
    return sock


def drain(sock):
    """Every datagram already waiting on `sock`, as (data, source), without waiting for more;
    the socket's blocking mode and timeout are left as they were."""
    previous = sock.gettimeout()
    sock.setblocking(False)
    out = []
    try:
        while True:
            try:
                out.append(sock.recvfrom(65536))
            except (BlockingIOError, InterruptedError):
                return out
            except OSError:  # an ICMP error for an earlier send; what is queued behind it still counts
                continue
    finally:
        sock.settimeout(previous)


def wait_until(predicate, what="a condition", timeout=WAIT_S, interval=0.01):
    """Poll `predicate` (for state with no event to wait on: the kernel's /proc, a file)
    until it is true, or fail the test; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("not within %ss: %s" % (timeout, what))
        time.sleep(interval)


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



class Echoes:
    """A paced stream of numbered datagrams through a relay pair (conftest.RelayPair) at
    `rate_pps`, and the echoes that came back: `received` (their numbers) and `arrivals`
    ((monotonic time, number), in the order they came)."""

    def __init__(self, pair, size, rate_pps):
        self.pair, self.size, self.rate_pps = pair, size, rate_pps
        self.sock = pair.app_socket()
        self.sock.settimeout(0.05)
        self.sent, self.received = 0, set()
        self.arrivals = []  # (monotonic time, seq)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._receive, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _send(self):
        padding = b"p" * (self.size - 4)
        for _ in paced(1.0 / self.rate_pps, self.stop):
            self.sock.sendto(struct.pack("!I", self.sent) + padding, self.pair.client_address)
            self.sent += 1

    def _receive(self):
        while not self.stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            seq = struct.unpack_from("!I", data)[0]
            self.received.add(seq)
            self.arrivals.append((time.monotonic(), seq))

    def since(self, moment):
        """How many echoes came at `moment` or later."""
        return sum(1 for at, _seq in list(self.arrivals) if at >= moment)

    def close(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(2)
        self.sock.close()


def reporter(tag):
    """A report(text) for one test file: a figure for the README, shown with `pytest -s`
    and in the log of a failing test."""
    def report(text):
        sys.stdout.write("\n[%s] %s\n" % (tag, text))
        sys.stdout.flush()
    return report


# -- an echo upstream --------------------------------------------------------


class EchoServer:
    """A UDP echo on loopback in a thread; records every datagram and its source.
    `echo = False` makes it a sink that only records."""

    def __init__(self, host=LOOPBACK, port=0, echo=True):
        self.sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.setblocking(False)
        self.address = tuple(self.sock.getsockname()[:2])
        self.echo = echo
        self.received = []  # (data, source)
        self.cond = threading.Condition()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="echo-%d" % self.address[1], daemon=True)
        self._thread.start()

    @property
    def text(self):
        return addr_text(*self.address)

    def _run(self):
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ, "sock")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while True:
                for key, _mask in selector.select():
                    if key.data == "wake":
                        return
                    for data, source in drain(self.sock):
                        with self.cond:
                            self.received.append((data, source))
                            self.cond.notify_all()
                        if self.echo:
                            try:
                                self.sock.sendto(data, source)
                            except OSError:
                                pass
        finally:
            selector.close()
            self.sock.close()

    def wait_for(self, predicate, timeout=WAIT_S):
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.received), timeout)

    def wait_count(self, n, timeout=WAIT_S):
        return self.wait_for(lambda received: len(received) >= n, timeout)

    def payloads(self, source=None):
        """The datagrams received, in order (from `source`'s host and port only, if given)."""
        with self.cond:
            return [data for data, src in self.received if source is None or src[:2] == source[:2]]

    def sources(self):
        with self.cond:
            return {source for _data, source in self.received}

    def close(self):
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join(WAIT_S)
        self._wake_r.close()
        self._wake_w.close()


# -- a recording link tap ----------------------------------------------------


class Tap:
    """A recording UDP forwarder standing for a link: client -> tap -> server, and back.

    Each client source address gets its own upstream socket (a NAT mapping), so the
    server sees one address per client link, and `send_as` can re-send a captured
    packet from exactly the address it first came from.  Every datagram is recorded
    both ways (`records("up")`: client to server, "down": server to client), as
    (time, data, client source).  `hold_up` / `hold_down` (set under `cond`) keep
    recording but stop forwarding that way, so a test can take a packet the other
    side never saw.  `address` / `text` are what the client sends to.
    """

    def __init__(self, target, host=LOOPBACK):
        self.target = tuple(target)
        self.listen = udp_socket(host, blocking=False)
        self.address = tuple(self.listen.getsockname()[:2])
        self.text = addr_text(*self.address)
        self.cond = threading.Condition()
        self.up = []  # (time, data, client source)
        self.down = []
        self.nat = {}  # client source -> upstream socket
        self.client_addr = None  # the latest client source
        self.hold_up = self.hold_down = False
        self._host = host
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listen, selectors.EVENT_READ, None)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="tap", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            for key, _mask in self._selector.select(0.05):
                if key.data is None:
                    self._from_client()
                else:
                    self._from_server(key.data)

    # Forwarding happens under the lock: once a test has set a hold, every packet
    # recorded before it has already been sent on.

    def _from_client(self):
        for data, source in drain(self.listen):
            with self.cond:
                sock = self.nat.get(source)
                if sock is None:
                    sock = self.nat[source] = udp_socket(self._host, blocking=False)
                    self._selector.register(sock, selectors.EVENT_READ, source)
                self.client_addr = source
                self.up.append((time.monotonic(), data, source))
                if not self.hold_up:
                    try:
                        sock.sendto(data, self.target)
                    except OSError:
                        pass
                self.cond.notify_all()

    def _from_server(self, source):
        for data, sender in drain(self.nat[source]):
            if tuple(sender[:2]) != self.target[:2]:
                continue  # only the server's packets are "down"
            with self.cond:
                self.down.append((time.monotonic(), data, source))
                if not self.hold_down:
                    try:
                        self.listen.sendto(data, source)
                    except OSError:
                        pass
                self.cond.notify_all()

    def records(self, direction):
        """[(time, data, client source)] seen going `direction` ("up" or "down")."""
        with self.cond:
            return list(self.up if direction == "up" else self.down)

    def packets(self, direction):
        """[data] seen going `direction`, in order."""
        return [data for _t, data, _source in self.records(direction)]

    def count(self, direction, packet_kind):
        return sum(1 for data in self.packets(direction) if kind(data) == packet_kind)

    def sources(self):
        with self.cond:
            return set(self.nat)

    def send_as(self, source, data):
        """Send `data` to the server from the address that carried `source`'s packets."""
        with self.cond:
            sock = self.nat[source]
        sock.sendto(data, self.target)

    def send_down(self, data, client):
        """Send `data` to the client socket `client` from the address it sends to."""
        self.listen.sendto(data, client)

    def wait_for(self, predicate, timeout=WAIT_S):
        """True once predicate(tap) holds (checked at each packet), False at the timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout)

    def close(self):
        self._stop = True
        self._thread.join(2)
        for sock in [self.listen] + list(self.nat.values()):
            sock.close()
        self._selector.close()


def captured(taps, direction, kinds):
    """[(data, client source, tap)] of the packets of `kinds` the taps saw going `direction`."""
    return [(data, source, tap) for tap in taps for _t, data, source in tap.records(direction)
            if kind(data) in kinds]


def duplicates(items):
    return sorted(item for item, count in collections.Counter(items).items() if count > 1)


# -- a local application -----------------------------------------------------


class App:
    """A local application: sends unique payloads through the client, counts what comes back."""

    def __init__(self, target, host=LOOPBACK):
        self.sock = udp_socket(host)
        self.target = target
        self.received = collections.Counter()
        self.n = 0

    def _next(self, prefix):
        payload = ("%s:%d" % (prefix, self.n)).encode()
        self.n += 1
        return payload

    def _receive_until(self, wanted, seconds):
        """Receive for `seconds` at most; True as soon as a payload in `wanted` comes back."""
        until = time.monotonic() + seconds
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                data, _ = self.sock.recvfrom(65536)
            except socket.timeout:
                return False
            self.received[data] += 1
            if data in wanted:
                return True

    def probe(self, prefix, timeout=WAIT_S, interval=0.05):
        """Send a fresh payload every `interval` until one is echoed back; the seconds it took.

        Every attempt is a new payload, so a payload seen twice anywhere is a replay."""
        start = time.monotonic()
        deadline = start + timeout
        sent = set()
        while time.monotonic() < deadline:
            payload = self._next(prefix)
            sent.add(payload)
            self.sock.sendto(payload, self.target)
            if self._receive_until(sent, min(interval, deadline - time.monotonic())):
                return time.monotonic() - start
        raise AssertionError("no echo for %r within %ss" % (prefix, timeout))

    def stream(self, prefix, count, size, timeout=WAIT_S):
        """`count` datagrams of `size` bytes, one at a time, each (re)sent until it is echoed:
        every one of them crossed the link at least once."""
        deadline = time.monotonic() + timeout
        for i in range(count):
            payload = ("%s:%06d:" % (prefix, i)).encode().ljust(size, b".")
            while True:
                assert time.monotonic() < deadline, "stream %r: %d of %d echoed in %ss" % (prefix, i, count, timeout)
                self.sock.sendto(payload, self.target)
                if self._receive_until({payload}, 0.25):
                    break

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
        for data, _ in drain(self.sock):
            self.received[data] += 1

    def close(self):
        self.sock.close()


# -- a paced stream ----------------------------------------------------------


SEQ_NUMBER = struct.Struct("!I")


class Stream:
    """Numbered datagrams, `rate` a second, from one application socket to `target` (a paced
    thread); every echo that comes back is recorded by its number and arrival time.

    A datagram is `tag`, its number (from 1) and padding up to `size` bytes; anything else
    that comes back is kept in `others`.  `count` ends the stream by itself (None: it runs
    until stop()).  `warm_up` makes one round trip first, so the session exists before the
    numbered stream starts."""

    def __init__(self, target, count=None, rate=100, size=64, tag=b"strm", warm_up=False):
        self.target = tuple(target)
        self.count = count
        self.interval = 1.0 / rate
        self.tag = tag
        self.padding = b"x" * max(0, size - len(tag) - SEQ_NUMBER.size)
        self.sock = udp_socket(target[0])
        if warm_up:
            round_trip(self.sock, self.target, b"warm-up")
        self.sock.settimeout(0.05)
        self.cond = threading.Condition()
        self.sent = 0
        self.arrivals = []  # (monotonic time, number) of every echo, copies included
        self.echoes = collections.Counter()  # number -> times it came back
        self.others = []  # anything else that came back
        self._stop_sending = threading.Event()
        self._stop_receiving = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, daemon=True)
        self._receiver.start()
        self._sender.start()

    @property
    def address(self):
        return self.sock.getsockname()[:2]

    def payload(self, seq):
        return self.tag + SEQ_NUMBER.pack(seq) + self.padding

    def number(self, data):
        """The number of one of this stream's datagrams, else None."""
        if len(data) >= len(self.tag) + SEQ_NUMBER.size and data.startswith(self.tag):
            return SEQ_NUMBER.unpack_from(data, len(self.tag))[0]
        return None

    def _send_loop(self):
        numbers = itertools.count(1) if self.count is None else range(1, self.count + 1)
        for seq, _ in zip(numbers, paced(self.interval, self._stop_sending)):
            try:
                self.sock.sendto(self.payload(seq), self.target)
            except OSError:
                pass
            with self.cond:
                self.sent = seq
                self.cond.notify_all()

    def _receive_loop(self):
        while not self._stop_receiving.is_set():
            try:
                data = self.sock.recv(65536)
            except OSError:  # socket.timeout is an OSError; so is a closed socket at the end
                continue
            seq = self.number(data)
            with self.cond:
                if seq is None:
                    self.others.append(data)
                else:
                    self.arrivals.append((time.monotonic(), seq))
                    self.echoes[seq] += 1
                self.cond.notify_all()

    def received(self):
        """How many echoes came back, copies included."""
        with self.cond:
            return len(self.arrivals)

    def wait_received(self, count, timeout=WAIT_S):
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.arrivals) >= count, timeout)
            got = len(self.arrivals)
        assert ok, "only %d of %d echoes arrived within %ss" % (got, count, timeout)

    def wait_sent(self, n):
        """Until `n` datagrams went out (the stream's own clock: n / rate seconds after its start)."""
        with self.cond:
            ok = self.cond.wait_for(lambda: self.sent >= n, n * self.interval + WAIT_S)
        assert ok, "the stream sent only %d of %d datagrams" % (self.sent, n)

    def wait_echoes(self, n, timeout=WAIT_S):
        """Until `n` different numbers came back."""
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.echoes) >= n, timeout)
            got = len(self.echoes)
        assert ok, "only %d of %d echoes arrived within %ss" % (got, n, timeout)

    def finish(self):
        """Wait for the last datagram to go out, then for a marker's echo: what the relay still
        held of the stream went by before it (each link, the server and the echo are FIFO)."""
        self.wait_sent(self.count)
        marker = b"end!" + self.tag
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            self.sock.sendto(marker, self.target)
            with self.cond:
                if self.cond.wait_for(lambda: marker in self.others, 0.25):  # resent if lost on a lossy link
                    return
        raise AssertionError("no echo of the end marker within %ss" % WAIT_S)

    def stop_when_echoed(self, timeout=WAIT_S):
        """Stop sending, wait (bounded) for the echoes of everything sent, stop;
        (numbers sent, numbers echoed in arrival order)."""
        self._stop_sending.set()
        self._sender.join(WAIT_S)
        with self.cond:
            sent = set(range(1, self.sent + 1))
            self.cond.wait_for(lambda: sent <= set(self.echoes), timeout)
            result = (sorted(sent), [seq for _t, seq in self.arrivals])
        self.stop()
        return result

    def upstream(self, echo):
        """Number -> times the EchoServer `echo` received it."""
        counts = collections.Counter()
        for data in echo.payloads():
            seq = self.number(data)
            if seq is not None:
                counts[seq] += 1
        return counts

    def replies(self):
        with self.cond:
            return collections.Counter(self.echoes)

    def longest_gap(self):
        """The longest time between two consecutive echoes."""
        with self.cond:
            times = sorted(t for t, _seq in self.arrivals)
        return max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else 0.0

    def stop(self):
        self._stop_sending.set()
        self._stop_receiving.set()
        self._sender.join(2)
        self._receiver.join(2)
        self.sock.close()


def round_trip(sock, dest, payload, timeout=WAIT_S):
    """Send `payload` from `sock` to `dest` (again every 0.25 s) until its echo comes back;
    every other datagram that arrived meanwhile.  The socket's timeout is left as it was."""
    previous = sock.gettimeout()
    deadline = time.monotonic() + timeout
    others = []
    try:
        while time.monotonic() < deadline:
            sock.sendto(payload, dest)
            sock.settimeout(0.25)
            try:
                while True:
                    data = sock.recvfrom(65536)[0]
                    if data == payload:
                        return others
                    others.append(data)
            except socket.timeout:
                continue
    finally:
        sock.settimeout(previous)
    raise AssertionError("no echo of %r within %ss; got instead %r" % (payload[:40], timeout, others[:10]))


# -- packets on the wire -----------------------------------------------------


def kind(data):
    return data[0] & mpudp.TYPE_MASK if data else None


def header(data):
    """(type_flags, link, client_id, session, nonce) of a packet."""
    return mpudp.HEADER.unpack_from(data)


def payload_of(packet):
    return packet[mpudp.HEADER_SIZE:len(packet) - mpudp.MAC_SIZE]


def random_bytes(rng, n):
    return rng.getrandbits(8 * n).to_bytes(n, "little") if n > 0 else b""


def static_secret(client_keys, server_keys):
    """The static secret of a client and a server, from their (private_b64, public_b64) pairs,
    derived as the client does."""
    d = mpudp.decode_key
    return mpudp.static_secret(d(client_keys[0]), d(server_keys[1]), d(client_keys[1]), d(server_keys[1]))


def seal_hello(static, client_id, nonce, cookie=bytes(mpudp.NONCE_SIZE)):
    return mpudp.seal(static.hello_mac, mpudp.TYPE_HELLO, 0, client_id, 0, mpudp.handshake_nonce(mpudp.epoch_tag(nonce)),
                      mpudp.HELLO_PAYLOAD.pack(nonce, cookie))


def handshake_value(data, nonce):
    """The second field of a WELCOME or COOKIE for `nonce` (server nonce or cookie), else None."""
    if kind(data) not in (mpudp.TYPE_WELCOME, mpudp.TYPE_COOKIE) or \
            len(data) != mpudp.OVERHEAD + mpudp.WELCOME_PAYLOAD.size:
        return None
    client_nonce, value = mpudp.WELCOME_PAYLOAD.unpack_from(data, mpudp.HEADER_SIZE)
    return value if client_nonce == nonce else None


def manual_handshake(sock, server_addr, secret, client_id, timeout=WAIT_S):
    """HELLO, COOKIE, HELLO with the cookie, WELCOME, by hand from `sock` to a server in
    another process or thread: the client-side Epoch, or None if no WELCOME came."""
    nonce = os.urandom(mpudp.NONCE_SIZE)
    static = mpudp.StaticKeys(secret)
    hello = seal_hello(static, client_id, nonce)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.sendto(hello, server_addr)
        for data in _receive_a_moment(sock):
            if not mpudp.verify(static.welcome_mac, data, len(data)) or handshake_value(data, nonce) is None:
                continue
            if kind(data) == mpudp.TYPE_COOKIE:
                hello = seal_hello(static, client_id, nonce, handshake_value(data, nonce))
            else:
                return mpudp.Epoch(secret, nonce, handshake_value(data, nonce), is_client=True)
    return None


def receive_reply(sock, server_addr, epoch, client_id, link=0, timeout=WAIT_S):
    """The next packet other than a CHALLENGE for a hand-made client; a CHALLENGE on the
    way is answered with its RESPONSE, as a client does (PROTOCOL.md, "Return path")."""
    sock.settimeout(timeout)
    while True:
        data = sock.recv(65536)
        if kind(data) != mpudp.TYPE_CHALLENGE or not mpudp.verify(epoch.rx_mac, data, len(data)):
            return data
        sock.sendto(mpudp.seal(epoch.tx_mac, mpudp.TYPE_RESPONSE, link, client_id, 0, epoch.next_nonce(),
                               data[mpudp.HEADER_SIZE:-mpudp.MAC_SIZE]), server_addr)


def _receive_a_moment(sock, seconds=0.1):
    previous = sock.gettimeout()
    sock.settimeout(seconds)
    try:
        return [sock.recvfrom(65536)[0]]
    except socket.timeout:
        return []
    finally:
        sock.settimeout(previous)


# -- log lines of an mpudp process -------------------------------------------


def line_count(process):
    with process.cond:
        return len(process.lines)


def lines_from(process, start=0):
    with process.cond:
        return list(process.lines[start:])


def wait_for_last(process, markers, wanted, start=0, timeout=WAIT_S):
    """Wait until, from line `start` on, the last line of `process` containing one of `markers`
    contains `wanted` (a string, or a tuple of strings any one of which will do); fails the
    test if it does not."""
    alternatives = (wanted,) if isinstance(wanted, str) else wanted

    def last_has():
        lines = [line for line in process.lines[start:] if any(m in line for m in markers)]
        return bool(lines) and any(w in lines[-1] for w in alternatives)

    with process.cond:
        if process.cond.wait_for(last_has, timeout):
            return True
    raise AssertionError("the last %s line is not about %r within %ss; output:\n%s" % (
        markers, wanted, timeout, "\n".join(process.lines[-40:])))


def link_name(pair, index):
    """How the client names a link in its log: "link 1 (127.0.0.1:40000)"."""
    return "link %d (%s)" % (index, pair.client_cfg["links"][index]["remote_addr"])


def alive(process):
    return process.proc.poll() is None
