"""UDP link emulator for mpudp scenario tests.

One ``LinkEmulator`` stands for one network link between the mpudp client and
the mpudp server::

    client --(udp)--> emu.address  [emulator]  upstream socket --(udp)--> target

Datagrams from a client source address are forwarded to ``target`` from an
upstream socket that belongs to that source address (like a NAT mapping);
replies the target sends to that upstream socket are forwarded back to the
client.  Added delay, jitter, random loss per direction and a blackhole (dead
link) can be changed while traffic flows, and so can three ways a path fails
that heartbeats alone do not show: dropping only some mpudp packet types (the
type is in the clear), dropping datagrams over a size (an MTU black hole), and
a racer that sends a copy of every client datagram from another address just
before the original.  ``rebind()`` gives every client a new upstream socket (a
NAT or frp server that changes its source port).

Standard library only, Python 3.7+, loopback addresses only (127.0.0.0/8, ::1).

Example::

    with LinkEmulator(server_addr, seed=1) as link:
        client.sendto(b"hi", link.address)
        link.set(loss_up=0.5, delay_s=0.05)
        assert link.wait_for(lambda c: c["up_out"] >= 1, timeout=5)

Counters (``link.counters`` returns a snapshot copy):

    up_in         datagrams received from clients
    up_out        datagrams sent to the target
    up_dropped    client->target datagrams dropped by loss_up or blackhole
    down_in       datagrams received from the target
    down_out      datagrams sent back to clients
    down_dropped  target->client datagrams dropped by loss_down or blackhole
    errors        socket errors (e.g. ECONNREFUSED while the target is down);
                  a datagram whose send failed is counted here, not in *_dropped
    peers_created upstream sockets (NAT mappings) created
    peers_evicted upstream sockets closed because max_peers was reached
    racer_out_bytes bytes the racer sent to the target (copies of client datagrams)
    racer_in_bytes  bytes the target sent to the racer's address
"""

import collections
import errno
import heapq
import ipaddress
import random
import selectors
import socket
import threading
import time

__all__ = ["LinkEmulator"]

_MAX_DATAGRAM = 65535
_BATCH = 64  # datagrams read per readiness event, so one socket cannot starve others

_UP = 0
_DOWN = 1

_LISTEN = "listen"
_WAKE = "wake"
_RACER = "racer"
_RACER_LEAD_S = 0.003  # the original follows the racer's copy by this much

_COUNTER_NAMES = (
    "up_in",
    "up_out",
    "up_dropped",
    "down_in",
    "down_out",
    "down_dropped",
    "errors",
    "peers_created",
    "peers_evicted",
    "racer_out_bytes",
    "racer_in_bytes",
)


def _check_loopback(addr, what):
    """Return (family, (host, port)) for a loopback address or raise ValueError."""
    if not isinstance(addr, (tuple, list)) or len(addr) < 2:
        raise ValueError("%s must be a (host, port) tuple, got %r" % (what, addr))
    host, port = addr[0], addr[1]
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("%s host must be a literal IP address, got %r" % (what, host))
    if not ip.is_loopback:
        raise ValueError("%s must be a loopback address (127.0.0.0/8 or ::1), got %r"
                         % (what, host))
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError("%s port must be an integer, got %r" % (what, port))
    if not 0 <= port <= 65535:
        raise ValueError("%s port out of range: %r" % (what, port))
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, (str(ip), port)


def _loopback_for(family):
    return "::1" if family == socket.AF_INET6 else "127.0.0.1"


def _check_probability(name, value):
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError("%s must be within 0..1, got %r" % (name, value))
    return value


def _check_seconds(name, value):
    value = float(value)
    if not value >= 0.0:  # also rejects NaN
        raise ValueError("%s must be >= 0, got %r" % (name, value))
    return value


class _Peer(object):
    """One NAT mapping: a client source address and its upstream socket."""

    __slots__ = ("key", "addr", "sock", "family", "gen", "closed")

    def __init__(self, key, addr):
        self.key = key
        self.addr = addr  # full sockaddr of the client, used to reply
        self.sock = None
        self.family = None
        self.gen = -1  # target generation the socket is connected to
        self.closed = False


class LinkEmulator(object):
    def __init__(self, target, listen=("127.0.0.1", 0), seed=0, max_peers=64):
        """A UDP proxy: datagrams arriving on `listen` from the client side are
        forwarded to `target` (the server) from a per-peer upstream socket, replies
        from the target go back to that peer. Runs in a daemon thread (selectors
        loop + a heap for delayed delivery) once start() is called."""
        self._target_family, self._target = _check_loopback(target, "target")
        listen_family, listen_addr = _check_loopback(listen, "listen")
        max_peers = int(max_peers)
        if max_peers < 1:
            raise ValueError("max_peers must be >= 1, got %r" % (max_peers,))
        self._max_peers = max_peers
        self._target_gen = 0

        # One lock protects knobs, target and counters; the condition is
        # notified whenever a counter changes.
        self._cond = threading.Condition(threading.Lock())
        self._counters = dict((name, 0) for name in _COUNTER_NAMES)
        self._delay = 0.0
        self._jitter = 0.0
        self._loss_up = 0.0
        self._loss_down = 0.0
        self._blackhole = False
        self._drop_kinds = frozenset()
        self._drop_over = 0
        self._racer_on = False
        self._rebind = False
        self._racer = None

        master = random.Random(seed)
        self._rng_up = random.Random(master.getrandbits(64))
        self._rng_down = random.Random(master.getrandbits(64))
        self._rng_jitter = random.Random(master.getrandbits(64))

        # Loop-thread state (only touched by the loop thread once started).
        self._heap = []
        self._seq = 0
        self._last_due = [0.0, 0.0]
        self._peers = collections.OrderedDict()
        self.last_error = None

        self._started = False
        self._closed = False
        self._stop = False
        self._torn_down = False
        self._teardown_lock = threading.Lock()
        self.thread = None

        self._sel = None
        self._wake_r = self._wake_w = None
        self._listen = socket.socket(listen_family, socket.SOCK_DGRAM)
        try:
            self._listen.bind(listen_addr)
            self._listen.setblocking(False)
            self._address = tuple(self._listen.getsockname()[:2])
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._sel = selectors.DefaultSelector()
            self._sel.register(self._listen, selectors.EVENT_READ, _LISTEN)
            self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        except BaseException:
            self._teardown()
            raise

    # ------------------------------------------------------------------ API

    @property
    def address(self):
        """(host, port) the client should send to (the link's remote address)."""
        return self._address

    @property
    def target(self):
        with self._cond:
            return self._target

    @property
    def closed(self):
        return self._closed

    @property
    def counters(self):
        """Snapshot copy of the counters."""
        with self._cond:
            return dict(self._counters)

    @property
    def settings(self):
        with self._cond:
            return {
                "delay_s": self._delay,
                "jitter_s": self._jitter,
                "loss_up": self._loss_up,
                "loss_down": self._loss_down,
                "blackhole": self._blackhole,
            }

    def start(self):
        """Start the forwarding thread. A second call is a no-op."""
        with self._cond:
            if self._closed:
                raise RuntimeError("LinkEmulator is closed")
            if self._started:
                return self
            self._started = True
            self.thread = threading.Thread(
                target=self._run,
                name="linkemu-%s:%d" % (self._address[0], self._address[1]),
            )
            self.thread.daemon = True
        self.thread.start()
        return self

    def close(self, timeout=5.0):
        """Stop the thread and close all sockets. Idempotent."""
        with self._cond:
            if self._closed:
                already = True
            else:
                already = False
                self._closed = True
                self._stop = True
            thread = self.thread
        if not already:
            self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if not thread.is_alive():
                self._teardown()
                return
        if thread is None:
            self._teardown()
        # If the thread did not exit within timeout it still owns its sockets;
        # closing them under it could hit a reused fd, so leave them to it.

    def set(self, *, delay_s=None, loss_up=None, loss_down=None, blackhole=None,
            jitter_s=None, drop_kinds=None, drop_over=None, racer=None):
        """Change link knobs; None leaves a knob unchanged. Applies to the next
        datagram (blackhole also drops datagrams already held for delay).
        drop_kinds: mpudp packet types (byte 0's low 4 bits) dropped both ways;
        drop_over: datagrams longer than this many bytes dropped both ways (0: none);
        racer: copy every client datagram to the target from another socket first.
        Invalid values raise ValueError and change nothing."""
        values = {}
        if drop_kinds is not None:
            values["_drop_kinds"] = frozenset(int(k) for k in drop_kinds)
        if drop_over is not None:
            values["_drop_over"] = int(drop_over)
        if racer is not None:
            values["_racer_on"] = bool(racer)
        if delay_s is not None:
            values["_delay"] = _check_seconds("delay_s", delay_s)
        if jitter_s is not None:
            values["_jitter"] = _check_seconds("jitter_s", jitter_s)
        if loss_up is not None:
            values["_loss_up"] = _check_probability("loss_up", loss_up)
        if loss_down is not None:
            values["_loss_down"] = _check_probability("loss_down", loss_down)
        if blackhole is not None:
            values["_blackhole"] = bool(blackhole)
        with self._cond:
            for name, value in values.items():
                setattr(self, name, value)

    def rebind(self):
        """Every client gets a new upstream socket, so the target sees a new source port
        (a NAT whose mapping expired, an frp server that reconnected)."""
        with self._cond:
            self._rebind = True
        self._wake()

    def retarget(self, target):
        """Send upstream traffic to a new server address from now on. Existing
        NAT mappings keep their client-facing identity; their upstream sockets
        are re-pointed (or recreated if the address family changes)."""
        family, addr = _check_loopback(target, "target")
        with self._cond:
            self._target_family = family
            self._target = addr
            self._target_gen += 1
        self._wake()

    def wait_for(self, predicate, timeout):
        """Wait until predicate(counters) is true or timeout elapses; returns the
        last predicate result. Woken on every counter change (no polling)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: predicate(dict(self._counters)), timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def __repr__(self):
        return "<LinkEmulator %s -> %s %s%s>" % (
            self._address, self._target, self.settings,
            " closed" if self._closed else "")

    # --------------------------------------------------------------- helpers

    def _count(self, name, n=1):
        with self._cond:
            self._counters[name] += n
            self._cond.notify_all()

    def _error(self, exc):
        self.last_error = exc
        self._count("errors")

    def _wake(self):
        try:
            self._wake_w.send(b"x")
        except (OSError, AttributeError):
            pass  # buffer full (a wakeup is pending anyway) or already closed

    def _teardown(self):
        with self._teardown_lock:
            if self._torn_down:
                return
            self._torn_down = True
        for peer in list(self._peers.values()):
            self._close_peer(peer)
        self._peers.clear()
        del self._heap[:]
        if self._racer is not None:
            self._racer.close()
        if self._sel is not None:
            try:
                self._sel.close()
            except Exception:
                pass
        for sock in (self._listen, self._wake_r, self._wake_w):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass

    # ---------------------------------------------------------- loop thread

    def _run(self):
        try:
            while not self._stop:
                if self._heap:
                    timeout = max(0.0, self._heap[0][0] - time.monotonic())
                else:
                    timeout = None
                try:
                    events = self._sel.select(timeout)
                except (OSError, ValueError) as exc:
                    self.last_error = exc
                    break
                for key, _mask in events:
                    if self._stop:
                        break
                    try:
                        tag = key.data
                        if tag is _WAKE:
                            self._drain_wake()
                            self._apply_target()
                        elif tag is _RACER:
                            self._on_racer_readable()
                        elif tag is _LISTEN:
                            self._on_client_readable()
                        else:
                            self._on_upstream_readable(tag)
                    except Exception as exc:  # never let the thread die
                        self._error(exc)
                if self._stop:
                    break
                try:
                    self._flush_due()
                except Exception as exc:
                    self._error(exc)
        finally:
            self._teardown()

    def _drain_wake(self):
        while True:
            try:
                if not self._wake_r.recv(4096):
                    return
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return

    def _target_snapshot(self):
        with self._cond:
            return self._target_family, self._target, self._target_gen

    def _apply_target(self):
        family, target, gen = self._target_snapshot()
        with self._cond:
            rebind, self._rebind = self._rebind, False
        for peer in list(self._peers.values()):
            if rebind and peer.sock is not None:
                self._close_sock(peer.sock)
                peer.sock = None
            if rebind or peer.gen != gen:
                self._connect_peer(peer, family, target, gen)

    def _connect_peer(self, peer, family, target, gen):
        """(Re)point peer's upstream socket at target. Returns True on success."""
        try:
            if peer.sock is None or peer.family != family:
                if peer.sock is not None:
                    self._close_sock(peer.sock)
                    peer.sock = None
                sock = socket.socket(family, socket.SOCK_DGRAM)
                try:
                    sock.setblocking(False)
                    sock.bind((_loopback_for(family), 0))
                    sock.connect(target)
                    self._sel.register(sock, selectors.EVENT_READ, peer)
                except BaseException:
                    sock.close()
                    raise
                peer.sock = sock
                peer.family = family
            else:
                peer.sock.connect(target)
            peer.gen = gen
            return True
        except OSError as exc:
            self._error(exc)
            return False

    def _close_sock(self, sock):
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError, RuntimeError, OSError):
            pass
        try:
            sock.close()
        except OSError:
            pass

    def _close_peer(self, peer):
        peer.closed = True
        if peer.sock is not None:
            self._close_sock(peer.sock)
            peer.sock = None

    def _get_peer(self, addr):
        key = tuple(addr[:2])
        peer = self._peers.get(key)
        if peer is not None:
            self._peers.move_to_end(key)
            return peer
        while len(self._peers) >= self._max_peers:
            _key, old = self._peers.popitem(last=False)
            self._close_peer(old)
            self._count("peers_evicted")
        peer = _Peer(key, addr)
        family, target, gen = self._target_snapshot()
        if not self._connect_peer(peer, family, target, gen):
            return None
        self._peers[key] = peer
        self._count("peers_created")
        return peer

    def _ingress(self, direction, data=b""):
        """Count an arriving datagram and decide its fate.
        Returns None to drop, else (delay, jitter)."""
        if direction == _UP:
            n_in, n_drop, rng = "up_in", "up_dropped", self._rng_up
        else:
            n_in, n_drop, rng = "down_in", "down_dropped", self._rng_down
        with self._cond:
            self._counters[n_in] += 1
            loss = self._loss_up if direction == _UP else self._loss_down
            # Always draw, so the stream position equals the datagram index
            # and a given seed gives the same drop pattern for any loss value.
            drop = rng.random() < loss or self._blackhole
            if data and ((data[0] & 0x0F) in self._drop_kinds or 0 < self._drop_over < len(data)):
                drop = True
            if drop:
                self._counters[n_drop] += 1
            delay, jitter = self._delay, self._jitter
            self._cond.notify_all()
        if drop:
            return None
        return delay, jitter

    def _schedule(self, direction, delay, jitter, data, dest):
        due = time.monotonic() + delay
        if jitter > 0.0:
            due += self._rng_jitter.uniform(0.0, jitter)
        else:
            # A FIFO link: never let a datagram overtake an earlier one when
            # there is no jitter (e.g. after the delay was lowered).
            due = max(due, self._last_due[direction])
        self._last_due[direction] = max(due, self._last_due[direction])
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, direction, data, dest))

    def _on_client_readable(self):
        for _ in range(_BATCH):
            try:
                data, addr = self._listen.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. WSAECONNRESET on Windows
                self._error(exc)
                continue
            fate = self._ingress(_UP, data)
            if fate is None:
                continue
            peer = self._get_peer(addr)
            if peer is None:
                continue  # socket creation failed, counted in errors
            delay = fate[0]
            if self._race(data):
                delay += _RACER_LEAD_S
            self._schedule(_UP, delay, fate[1], data, peer)

    def _on_upstream_readable(self, peer):
        for _ in range(_BATCH):
            if peer.closed or peer.sock is None:
                return
            try:
                data = peer.sock.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ECONNREFUSED: target not listening
                self._error(exc)
                continue
            fate = self._ingress(_DOWN, data)
            if fate is None:
                continue
            self._schedule(_DOWN, fate[0], fate[1], data, peer.addr)

    def _race(self, data):
        """With the racer on, a copy of `data` goes to the target now from the racer's own
        socket (another address); True if it went."""
        with self._cond:
            on = self._racer_on
        if not on:
            return False
        family, target, _gen = self._target_snapshot()
        if self._racer is None:
            self._racer = socket.socket(family, socket.SOCK_DGRAM)
            self._racer.bind((_loopback_for(family), 0))
            self._racer.setblocking(False)
            self._sel.register(self._racer, selectors.EVENT_READ, _RACER)
        try:
            self._racer.sendto(data, target)
        except OSError as exc:
            self._error(exc)
            return False
        self._count("racer_out_bytes", len(data))
        return True

    def _on_racer_readable(self):
        for _ in range(_BATCH):
            try:
                data = self._racer.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._error(exc)
                continue
            self._count("racer_in_bytes", len(data))  # the racer never answers

    def _flush_due(self):
        heap = self._heap
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _due, _seq, direction, data, dest = heapq.heappop(heap)
            with self._cond:
                blackhole = self._blackhole
            if direction == _UP:
                if blackhole or dest.closed:
                    # Dead link, or the NAT mapping was evicted meanwhile.
                    self._count("up_dropped")
                    continue
                self._send_up(dest, data)
            else:
                if blackhole:
                    self._count("down_dropped")
                    continue
                self._send_down(dest, data)

    def _send_up(self, peer, data):
        family, target, gen = self._target_snapshot()
        if peer.gen != gen:
            if not self._connect_peer(peer, family, target, gen):
                return
        for attempt in (0, 1):
            try:
                peer.sock.send(data)
            except OSError as exc:
                self._error(exc)
                # A pending ECONNREFUSED belongs to an earlier datagram and is
                # cleared by reporting it: retry once so a restarted server
                # gets this one.
                if attempt == 0 and getattr(exc, "errno", None) in (
                        errno.ECONNREFUSED, errno.ECONNRESET):
                    continue
                return
            self._count("up_out")
            return

    def _send_down(self, addr, data):
        try:
            self._listen.sendto(data, addr)
        except OSError as exc:
            self._error(exc)
            return
        self._count("down_out")
