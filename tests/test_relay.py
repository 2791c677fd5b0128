"""End-to-end tests: real mpudp client and server processes relaying UDP on loopback.

Each test builds the chain of conftest.RelayPair (an echo upstream, a server
process, link emulators and a client process), or a variant of it, and talks
to the client's listen address like a local application would.

Waits are on events (a datagram, a log line, a counter) with helpers.WAIT_S as
the failure bound only.  "Nothing was forwarded" is made exact rather than
timed: loopback delivers a datagram into the receiver's queue before sendto()
returns and each mpudp socket is read in order, so a legit datagram sent after
the garbage is handled after it; once its echo is back, anything the garbage
would have caused has already happened.
"""

import collections
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import mpudp
from conftest import MPUDP, ROOT, MpudpProcess, free_udp_port, keypair, needs_ipv6, write_config
from helpers import WAIT_S, EchoServer, addr_text, drain, header, kind, payload_of, udp_socket
from linkemu import LinkEmulator

MAX = mpudp.MAX_DATA_PAYLOAD  # 65475: the largest datagram the relay carries
HDR = mpudp.HEADER_SIZE
MACLEN = mpudp.MAC_SIZE


# -- helpers -------------------------------------------------------------------


def _receive(sock, wanted, timeout):
    """(True, others) once a datagram equal to `wanted` arrives on `sock`, (False, others) at the
    timeout; `others` are the datagrams that arrived before it, in order."""
    deadline = time.monotonic() + timeout
    others = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False, others
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(65536)
        except socket.timeout:
            continue
        if data == wanted:
            return True, others
        others.append(data)


def receive_until(sock, wanted, timeout=WAIT_S):
    """Every datagram arriving on `sock` before the first one equal to `wanted` (which must come)."""
    found, others = _receive(sock, wanted, timeout)
    assert found, "%r never arrived; got instead: %r" % (wanted[:40], [d[:40] for d in others])
    return others


def exchange(pair, sock, payload):
    """Send `payload` once through the relay and wait for its echo; return whatever else arrived first.

    Sent once, so a second copy of anything is a finding; use it where nothing floods the path."""
    sock.sendto(payload, pair.client_address)
    return receive_until(sock, payload)


def sync(pair, sock, payload, resend_s=1.0):
    """Like exchange(), but resend if the echo is late (a flood just before may have cost the
    datagram a socket buffer); copies of `payload` are left out of what it returns."""
    deadline = time.monotonic() + WAIT_S
    others = []
    while time.monotonic() < deadline:
        sock.sendto(payload, pair.client_address)
        found, more = _receive(sock, payload, min(resend_s, max(0.01, deadline - time.monotonic())))
        others += [d for d in more if d != payload]
        if found:
            return others
    raise AssertionError("no echo of %r within %ss; got instead: %r" % (payload, WAIT_S, others))


def nothing_queued(sock):
    """True if no datagram is waiting on `sock` (a non-blocking look, no waiting)."""
    return drain(sock) == []


def send_until(sock, dest, payload, predicate, timeout=WAIT_S, every=0.05):
    """Send `payload` to `dest` every `every` seconds until predicate() holds; False if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.sendto(payload, dest)
        if predicate():
            return True
        time.sleep(every)  # pacing of the traffic, not a wait for an outcome
    return predicate()


def assert_clean_exit(process):
    assert process.stop() == 0, process.output()
    assert "Traceback" not in process.output()


def session_sources(server):
    """{session id: upstream source address} from a debug-enabled server's log."""
    found = {}
    for match in re.finditer(r"session ([0-9a-f]{8}) opened, upstream \S+ from (\S+)", server.output()):
        found[match.group(1)] = match.group(2)
    return found


# -- packets on the wire -------------------------------------------------------


def data_packet(packets, payload):
    """The captured DATA packet that carries `payload`."""
    for packet in packets:
        if len(packet) >= mpudp.OVERHEAD and kind(packet) == mpudp.TYPE_DATA and payload_of(packet) == payload:
            return packet
    raise AssertionError("no DATA packet with %r captured" % payload)


def forged(template, payload, seq_ahead, mac=None):
    """`template`'s header with a sequence number `seq_ahead` past it, `payload`, and a wrong MAC."""
    type_flags, link, client_id, session, nonce = header(template)
    packed = mpudp.HEADER.pack(type_flags, link, client_id, session, nonce + seq_ahead)
    return packed + payload + (mac if mac is not None else os.urandom(MACLEN))


def bit_flips(packet):
    """Copies of `packet` with one bit flipped: one copy per byte, every bit position used."""
    return [packet[:i] + bytes([packet[i] ^ (1 << (i % 8))]) + packet[i + 1:] for i in range(len(packet))]


def server_barrier(pair, sock, avoid_tag):
    """Return once the server has handled every datagram already sent to it.

    Sends a genuine HELLO with a new nonce (the test knows the keys) and waits for
    its answer (a COOKIE, as it carries none): the server reads its listen socket
    in order, so every earlier datagram was handled before.  Such a HELLO leaves
    no state at all: no epoch, no return path, no session.
    """
    nonce = os.urandom(mpudp.NONCE_SIZE)
    while mpudp.epoch_tag(nonce) == avoid_tag:
        nonce = os.urandom(mpudp.NONCE_SIZE)
    hello = mpudp.seal(mpudp.StaticKeys(pair.client_secret).hello_mac, mpudp.TYPE_HELLO, 0, 0, 0,
                       mpudp.handshake_nonce(mpudp.epoch_tag(nonce)), mpudp.HELLO_PAYLOAD.pack(nonce, bytes(16)))
    sock.sendto(hello, (pair.host, pair.server_port))
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, _ = sock.recvfrom(65536)
        except socket.timeout:
            break
        if kind(data) == mpudp.TYPE_COOKIE and payload_of(data)[:mpudp.NONCE_SIZE] == nonce:
            return
    raise AssertionError("the server did not answer a genuine HELLO")


@pytest.fixture
def one_tap_pair(tapped_pair):
    """A factory: a RelayPair with one link that is a Tap (pair.tap); the client never gives
    the link up while a test holds it."""
    return lambda: tapped_pair(links=1, client={"max_consecutive_fail": 1000, "heartbeat_interval_sec": 0.2})


# -- 1. traffic both ways over several links -------------------------------------


def test_two_links_relay_200_distinct_datagrams_both_ways(relay_pair):
    pair = relay_pair(links=2, server={"debug": True})
    app = pair.app_socket()
    rng = random.Random(1)
    sent = [b"dgram-%03d:" % i + bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 1200)))
            for i in range(200)]
    assert len(set(sent)) == 200
    received = []
    for start in range(0, 200, 20):  # bursts small enough for any socket buffer on the path
        burst = sent[start:start + 20]
        for payload in burst:
            app.sendto(payload, pair.client_address)
        got = []
        while len(got) < len(burst):
            data, source = app.recvfrom(65536)
            assert source[:2] == pair.client_address, "a reply came from %r, not the client" % (source,)
            got.append(data)
        assert collections.Counter(got) == collections.Counter(burst)
        received.extend(got)
    assert collections.Counter(received) == collections.Counter(sent)  # intact, each exactly once

    assert collections.Counter(pair.echo.payloads()) == collections.Counter(sent)
    sources = pair.echo.sources()
    app_address = app.getsockname()[:2]
    assert len(sources) == 1 and app_address not in sources and pair.client_address not in sources
    # ... and that one source is the upstream socket the server opened for the session.
    opened = session_sources(pair.server)
    assert len(opened) == 1
    assert addr_text(*next(iter(sources))) == next(iter(opened.values()))

    for link in pair.links:  # both links measured: heartbeats up, echoes down
        counters = link.counters
        assert counters["up_out"] > 0 and counters["down_out"] > 0, counters
    # The data went by the links (a loaded machine may see a switch mid-test, so not all by one).
    assert sum(link.counters["up_in"] for link in pair.links) >= 200
    assert pair.close() == {"client": 0, "server": 0}


# -- 2. sizes ----------------------------------------------------------------------


def test_sizes_up_to_max_relayed_intact(relay_pair):
    pair = relay_pair(links=1)
    app = pair.app_socket()
    sizes = (0, 1, 1400, MAX)
    payloads = [bytes(random.Random(size).getrandbits(8) for _ in range(size)) for size in sizes]
    for payload in payloads:
        assert pair.round_trip(app, payload) == payload
    assert set(pair.echo.payloads()) == set(payloads)  # the upstream got each one whole, nothing else


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)], ids=["ipv4", "ipv6"])
def test_oversize_datagrams_are_dropped_not_truncated(relay_pair, host):
    # Over IPv4 an oversize packet could not even be sent (65507 is IPv4's limit); IPv6 takes
    # up to 65527 bytes, so there only mpudp's own size checks stand between it and truncation.
    pair = relay_pair(links=1, host=host)
    app = pair.app_socket()
    assert pair.round_trip(app, b"first") == b"first"
    upstream_source = pair.echo.received[0][1]

    def oversize(tag, size):
        return (b"oversize-%s:" % tag).ljust(size, b"#")

    biggest = 65507 if host == "127.0.0.1" else 65527  # the largest UDP datagram of the family
    # Application -> client: MAX + 1, and the largest datagram there is.
    app.sendto(oversize(b"up1", MAX + 1), pair.client_address)
    app.sendto(oversize(b"up2", biggest), pair.client_address)
    # Upstream -> server (to the session's upstream socket): the same.
    pair.echo.sock.sendto(oversize(b"down1", MAX + 1), upstream_source)
    pair.echo.sock.sendto(oversize(b"down2", biggest), upstream_source)
    # A datagram of exactly MAX still goes both ways after them.
    largest = oversize(b"max", MAX)
    others = exchange(pair, app, largest)
    assert [d for d in others if d != b"first"] == []  # nothing oversize, whole or cut, reached the app
    assert set(pair.echo.payloads()) == {b"first", largest}  # nor the upstream
    assert pair.server.proc.poll() is None and pair.client.proc.poll() is None


# -- 3. IPv6 -----------------------------------------------------------------------


@needs_ipv6
@pytest.mark.parametrize("host, echo_host", [("::1", "::1"), ("::1", "127.0.0.1"), ("127.0.0.1", "::1")],
                         ids=["all-v6", "v6-links-v4-upstream", "v4-links-v6-upstream"])
def test_ipv6_loopback(relay_pair, host, echo_host):
    pair = relay_pair(links=2, host=host, echo_host=echo_host)
    assert all(link.address[0] == host for link in pair.links)
    app = pair.app_socket()
    for payload in (b"v6-hello", b"x" * 1400, b"y" * MAX):
        assert pair.round_trip(app, payload) == payload
    assert set(pair.echo.payloads()) == {b"v6-hello", b"x" * 1400, b"y" * MAX}
    for source in pair.echo.sources():
        assert (":" in source[0]) == (":" in echo_host)
    assert pair.close() == {"client": 0, "server": 0}


@needs_ipv6
def test_dual_stack_listen_addresses(relay_pair):
    """Client and server listen on ":port" (every address, IPv6 and IPv4); one link goes by
    127.0.0.1 and one by ::1, and applications of both families are served."""
    server_port, client_port = free_udp_port(), free_udp_port()
    pair = relay_pair(links=0, server={"listen_addr": ":%d" % server_port},
                      client={"listen_addr": ":%d" % client_port,
                              "links": [{"remote_addr": "127.0.0.1:%d" % server_port},
                                        {"remote_addr": "[::1]:%d" % server_port}]})
    pair.server_port, pair.client_port = server_port, client_port
    pair.client.wait_for_line("link 0 (127.0.0.1:%d) up" % server_port)
    pair.client.wait_for_line("link 1 ([::1]:%d) up" % server_port)
    app4, app6 = pair.app_socket(), udp_socket("::1")
    app6.settimeout(WAIT_S)
    for payload in (b"dual-4", b"4" * MAX):
        assert pair.round_trip(app4, payload) == payload
    for payload in (b"dual-6", b"6" * MAX):
        app6.sendto(payload, ("::1", client_port))
        assert receive_until(app6, payload) == []
    assert set(pair.echo.payloads()) == {b"dual-4", b"4" * MAX, b"dual-6", b"6" * MAX}
    assert len(pair.echo.sources()) == 2  # two applications, two sessions
    assert pair.close() == {"client": 0, "server": 0}


# -- 4. wrong keys -----------------------------------------------------------------


@pytest.mark.parametrize("wrong", ["client-has-wrong-server-key", "server-has-wrong-client-key"])
def test_wrong_keys_let_nothing_through(tmp_path, cleanup, wrong):
    echo = EchoServer()
    cleanup(echo.close)
    server_keys, client_keys, stranger = keypair(), keypair(), keypair()
    server_port = free_udp_port()
    server = MpudpProcess(write_config(tmp_path, {"mode": "server", "server": {
        "listen_addr": addr_text("127.0.0.1", server_port),
        "upstream_addr": echo.text,
        "server_private_key": server_keys[0],
        "client_public_keys": [stranger[1] if wrong.startswith("server") else client_keys[1]],
    }}, "server.json"))
    cleanup(server.stop)
    server.wait_for_line("running as server")
    link = LinkEmulator(("127.0.0.1", server_port), seed=0).start()
    cleanup(link.close)
    client_port = free_udp_port()
    client = MpudpProcess(write_config(tmp_path, {"mode": "client", "client": {
        "listen_addr": addr_text("127.0.0.1", client_port),
        "links": [{"remote_addr": addr_text(*link.address)}],
        "heartbeat_interval_sec": 0.2,
        "client_private_key": client_keys[0],
        "server_public_key": stranger[1] if wrong.startswith("client") else server_keys[1],
    }}, "client.json"))
    cleanup(client.stop)
    client.wait_for_line("running as client")

    app = udp_socket()
    # The application keeps sending while the client's HELLOs reach the server, again and again.
    assert send_until(app, ("127.0.0.1", client_port), b"must-not-pass",
                      lambda: link.counters["up_out"] >= 6)
    counters = link.counters
    assert counters["down_in"] == 0, "the server answered a HELLO it cannot verify: %r" % counters
    assert echo.received == []
    assert nothing_queued(app)
    assert "handshake done" not in client.output()
    assert client.proc.poll() is None and server.proc.poll() is None
    assert_clean_exit(client)
    assert_clean_exit(server)


# -- 5. garbage, forgeries and replays ----------------------------------------------


def garbage_like(template, marker, seed):
    """About a hundred datagrams that must all be dropped by whoever receives `template`'s kind
    of packet: random bytes, truncations, fresh sequence numbers with bad MACs, every type."""
    rng = random.Random(seed)
    _flags, _link, _client, session, nonce = header(template)
    garbage = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 1500))) for _ in range(30)]
    garbage += [template[:n] for n in range(mpudp.OVERHEAD)]  # truncated, down to empty
    garbage += [template[:-1], template[:-MACLEN], template + b"\0", template[:HDR] + marker]
    for ahead in (1, 2, 100, 1000, 5000, 1 << 40):  # a fresh sequence number with a bad MAC
        garbage.append(forged(template, marker, ahead))
        garbage.append(forged(template, marker, ahead, mac=template[-MACLEN:]))
    wrong_key = mpudp.make_mac(bytes(rng.getrandbits(8) for _ in range(32)))
    flag_bytes = [t | f for t in range(16) for f in (0, mpudp.FLAG_ACTIVE)] + [rng.randrange(256) for _ in range(8)]
    for i, type_flags in enumerate(flag_bytes):  # every type, sealed with a key nobody has
        garbage.append(mpudp.seal(wrong_key, type_flags, 0, 0, session, nonce + 10 + i, marker))
    for client_id in (1, 2, 0xFFFF):  # clients nobody knows
        packet = forged(template, marker, 400)
        garbage.append(packet[:2] + client_id.to_bytes(2, "big") + packet[4:])
    other_epoch = (nonce ^ (1 << 60)) + 500  # another epoch's tag
    garbage.append(template[:8] + other_epoch.to_bytes(8, "big") + marker + os.urandom(MACLEN))
    return garbage


def test_garbage_to_server_is_never_forwarded(one_tap_pair):
    pair = one_tap_pair()
    tap = pair.tap
    app = pair.app_socket()
    assert exchange(pair, app, b"legit-1") == []
    template = data_packet(tap.packets("up"), b"legit-1")
    _flags, _link, _client, session, nonce = header(template)
    marker = b"GARBAGE-must-not-reach-the-upstream"

    garbage = garbage_like(template, marker, seed=5)
    garbage.append(mpudp.seal(mpudp.StaticKeys(pair.client_secret).hello_mac, mpudp.TYPE_DATA | mpudp.FLAG_ACTIVE, 0, 0,
                              session, nonce + 300, marker))  # a real key, but not a data key
    garbage.append(mpudp.seal(mpudp.make_mac(os.urandom(32)), mpudp.TYPE_HELLO, 0, 0, 0, 0,
                              bytes(32)))  # a HELLO with a bad MAC
    garbage += [p for p in tap.packets("down")]  # the server's own packets (WELCOME, echoes, data), reflected
    attacker = udp_socket()
    for packet in garbage:
        attacker.sendto(packet, (pair.host, pair.server_port))
    for packet in garbage[-40:]:  # some also from the address the server knows as the client
        tap.send_as(tap.client_addr, packet)

    legit = [b"legit-1"]
    for n in range(2, 5):  # legit traffic flows after it (so no forgery moved the replay window)
        legit.append(b"legit-%d" % n)
        assert sync(pair, app, legit[-1]) == []
    assert set(pair.echo.payloads()) == set(legit)
    assert nothing_queued(attacker)  # no answer to any of it
    assert pair.server.proc.poll() is None
    assert "Traceback" not in pair.server.output() and "internal error" not in pair.server.output()
    assert pair.close() == {"client": 0, "server": 0}


def test_bit_flipped_packets_are_rejected_by_the_server(one_tap_pair):
    pair = one_tap_pair()
    tap = pair.tap
    app = pair.app_socket()
    assert exchange(pair, app, b"warm-up") == []
    with tap.cond:
        tap.hold_up = True  # take the next packet before the server sees it
    marker = b"flip-me-" + os.urandom(8).hex().encode()
    app.sendto(marker, pair.client_address)
    assert tap.wait_for(lambda t: any(kind(p) == mpudp.TYPE_DATA and payload_of(p) == marker
                                      for p in t.packets("up")))
    original = data_packet(tap.packets("up"), marker)
    for packet in bit_flips(original):  # from the genuine address, with a fresh sequence number
        tap.send_as(tap.client_addr, packet)
    tap.send_as(tap.client_addr, original)  # the packet itself is good
    assert receive_until(app, marker) == []  # its echo, and nothing before it
    with tap.cond:
        tap.hold_up = False
    assert exchange(pair, app, b"after") == []
    assert pair.echo.payloads() == [b"warm-up", marker, b"after"]
    assert pair.close() == {"client": 0, "server": 0}


def test_replayed_packets_are_not_forwarded_and_do_not_move_the_return_path(one_tap_pair):
    pair = one_tap_pair()
    tap = pair.tap
    app = pair.app_socket()
    markers = [b"once-%d" % i for i in range(5)]
    for payload in markers:
        assert exchange(pair, app, payload) == []
    session_upstream = pair.echo.received[0][1]
    epoch_tag = header(data_packet(tap.packets("up"), markers[0]))[4] >> mpudp.SEQ_BITS
    with tap.cond:
        tap.hold_up = True  # from here no genuine packet reaches the server to set the path right again
        captured = tap.packets("up")
    assert sum(1 for p in captured if kind(p) == mpudp.TYPE_DATA) >= len(markers)
    assert any(kind(p) == mpudp.TYPE_HEARTBEAT for p in captured)

    attacker = udp_socket()
    for packet in captured:  # every packet the client sent (HELLO, heartbeats, data), from its own address
        tap.send_as(tap.client_addr, packet)
    for packet in captured:  # then from another address: the last word, if replays counted
        attacker.sendto(packet, (pair.host, pair.server_port))
    barrier = udp_socket()
    server_barrier(pair, barrier, epoch_tag)  # the server has handled all of them
    barrier.close()

    # The upstream speaks now: the reply must take the genuine path, not the attacker's.
    pair.echo.sock.sendto(b"probe", session_upstream)
    assert receive_until(app, b"probe") == []
    assert nothing_queued(attacker), "the server sent something to the replaying address"
    with tap.cond:
        tap.hold_up = False
    assert sync(pair, app, b"after") == []
    assert nothing_queued(attacker)
    counts = collections.Counter(pair.echo.payloads())
    assert set(counts) == set(markers) | {b"after"}
    assert all(counts[m] == 1 for m in markers), counts  # no second copy of anything
    assert ":%d" % attacker.getsockname()[1] not in pair.server.output()
    assert pair.close() == {"client": 0, "server": 0}


def test_garbage_forgeries_and_replays_to_the_client_are_never_delivered(one_tap_pair):
    pair = one_tap_pair()
    tap = pair.tap
    app = pair.app_socket()
    assert exchange(pair, app, b"reply-once") == []
    reply = data_packet(tap.packets("down"), b"reply-once")
    client_link = tap.client_addr  # the client's socket for this link
    attacker = udp_socket()

    garbage = garbage_like(reply, b"GARBAGE-must-not-reach-the-app", seed=7)
    garbage += [p for p in tap.packets("up")]  # the client's own packets reflected back (HELLO, heartbeats, data)
    garbage += [p for p in tap.packets("down") if kind(p) == mpudp.TYPE_WELCOME]  # the WELCOME replayed
    garbage += bit_flips(reply)
    for packet in [reply] + garbage:  # a replay first, then the rest
        attacker.sendto(packet, client_link)
    for packet in [reply] + garbage[-40:]:  # and from the address the client sends to
        tap.send_down(packet, client_link)
    syncs = {b"sync-1"}
    others = sync(pair, app, b"sync-1")
    assert others == [], "delivered to the app: %r" % others  # no second "reply-once", no garbage

    # A reply the client has not seen yet: forged and flipped copies first, then the real one.
    with tap.cond:
        tap.hold_down = True
    fresh = b"fresh-" + os.urandom(8).hex().encode()
    app.sendto(fresh, pair.client_address)
    assert tap.wait_for(lambda t: any(kind(p) == mpudp.TYPE_DATA and payload_of(p) == fresh
                                      for p in t.packets("down")))
    original = data_packet(tap.packets("down"), fresh)
    for packet in [forged(original, fresh, 1)] + bit_flips(original):
        tap.send_down(packet, client_link)
    tap.send_down(original, client_link)
    assert receive_until(app, fresh) == []
    with tap.cond:
        tap.hold_down = False
    tap.send_down(original, client_link)  # once more: a replay now
    attacker.sendto(original, client_link)
    syncs.add(b"sync-2")
    assert sync(pair, app, b"sync-2") == []
    assert {data for data, _ in drain(app)} <= syncs  # at most a late copy of a resent sync, never `fresh` again
    assert nothing_queued(attacker)
    assert pair.client.proc.poll() is None
    assert "Traceback" not in pair.client.output() and "internal error" not in pair.client.output()
    assert pair.close() == {"client": 0, "server": 0}


# -- 6. config errors through the command line ---------------------------------------


def _client_config():
    server_keys, client_keys = keypair(), keypair()
    return {"mode": "client", "client": {
        "listen_addr": "127.0.0.1:%d" % free_udp_port(),
        "links": [{"remote_addr": "127.0.0.1:5000"}, {"remote_addr": "[::1]:5000"}],
        "client_private_key": client_keys[0],
        "server_public_key": server_keys[1],
    }}


def _server_config():
    server_keys, client_keys = keypair(), keypair()
    return {"mode": "server", "server": {
        "listen_addr": "127.0.0.1:%d" % free_udp_port(),
        "upstream_addr": "127.0.0.1:6000",
        "server_private_key": server_keys[0],
        "client_public_keys": [client_keys[1]],
    }}


def _short_key():
    import base64
    return base64.b64encode(os.urandom(31)).decode()


def _set(path, value):
    def change(config):
        *parents, last = path
        node = config
        for key in parents:
            node = node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return change


CONFIG_ERRORS = [
    # (id, base config, change, key path the error must name)
    ("missing-client-key", _client_config, _set(("client", "server_public_key"), KeyError),
     "client.server_public_key"),
    ("missing-links", _client_config, _set(("client", "links"), KeyError), "client.links"),
    ("missing-upstream", _server_config, _set(("server", "upstream_addr"), KeyError), "server.upstream_addr"),
    ("missing-mode", _client_config, _set(("mode",), KeyError), "mode"),
    ("wrong-type-number", _client_config, _set(("client", "heartbeat_interval_sec"), "fast"),
     "client.heartbeat_interval_sec"),
    ("wrong-type-int", _client_config, _set(("client", "max_consecutive_fail"), 2.5), "client.max_consecutive_fail"),
    ("wrong-type-list", _client_config, _set(("client", "links"), {"remote_addr": "1.2.3.4:5"}), "client.links"),
    ("wrong-type-bool", _server_config, _set(("server", "debug"), "yes"), "server.debug"),
    ("wrong-type-section", _server_config, _set(("server",), ["listen_addr"]), "server"),
    ("bad-address-no-port", _client_config, _set(("client", "listen_addr"), "localhost"), "client.listen_addr"),
    ("bad-address-v6-brackets", _client_config, _set(("client", "links", 1, "remote_addr"), "::1:5000"),
     "client.links[1].remote_addr"),
    ("bad-address-port-range", _server_config, _set(("server", "upstream_addr"), "127.0.0.1:70000"),
     "server.upstream_addr"),
    ("bad-address-port-zero", _client_config, _set(("client", "links", 0, "remote_addr"), "1.2.3.4:0"),
     "client.links[0].remote_addr"),
    ("bad-base64", _client_config, _set(("client", "client_private_key"), "not base64 at all!"),
     "client.client_private_key"),
    ("short-key", _client_config, _set(("client", "server_public_key"), _short_key()),
     "client.server_public_key"),
    ("short-client-key", _server_config, _set(("server", "client_public_keys"), [keypair()[1], _short_key()]),
     "server.client_public_keys[1]"),
    ("low-order-key", _client_config, _set(("client", "server_public_key"), "A" * 43 + "="),
     "client.server_public_key"),
    ("unknown-mode", _client_config, _set(("mode",), "relay"), "mode"),
]


def run_with_config(tmp_path, config):
    path = write_config(tmp_path, config)
    return subprocess.run([sys.executable, MPUDP, "-config=%s" % path], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=WAIT_S, cwd=ROOT)


@pytest.mark.parametrize("case", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors_exit_2_naming_the_key(tmp_path, case):
    _id, base, change, key_path = case
    config = base()
    change(config)
    result = run_with_config(tmp_path, config)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines, "no error message"
    assert all(line.startswith("mpudp: config error: ") for line in lines), result.stderr
    assert any(line.startswith("mpudp: config error: %s" % key_path) for line in lines), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_config_error_names_upstream_addrs_item_like_other_lists(tmp_path):
    config = _server_config()
    config["server"]["client_public_keys"].append(keypair()[1])
    config["server"]["upstream_addrs"] = ["127.0.0.1:6001", "nowhere"]
    result = run_with_config(tmp_path, config)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("mpudp: config error: server.upstream_addrs[1]: "), result.stderr


def test_config_error_for_a_top_level_that_is_not_an_object_names_something(tmp_path):
    result = run_with_config(tmp_path, ["mode", "client"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("mpudp: config error: ") for line in lines)
    assert not any(line.startswith("mpudp: config error: :") for line in lines), result.stderr


def test_config_errors_are_all_reported_at_once(tmp_path):
    config = _client_config()
    config["client"]["heartbeat_interval_sec"] = "fast"
    config["client"]["links"][0]["remote_addr"] = "nowhere"
    del config["client"]["client_private_key"]
    result = run_with_config(tmp_path, config)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    named = [line[len("mpudp: config error: "):].split(":")[0] for line in result.stderr.splitlines()]
    assert {"client.heartbeat_interval_sec", "client.links[0].remote_addr", "client.client_private_key"} <= set(named)


def test_valid_base_configs_pass_check(tmp_path):
    """The base configs the error cases start from are themselves valid (so each case tests one error)."""
    for name, base in (("c.json", _client_config), ("s.json", _server_config)):
        path = write_config(tmp_path, base(), name)
        result = subprocess.run([sys.executable, MPUDP, "-config=%s" % path, "--check"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=WAIT_S, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        assert "config OK" in result.stdout


# -- 7. signals ----------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signals_stop_client_and_server_cleanly(relay_pair, sig):
    pair = relay_pair(links=2)
    app = pair.app_socket()
    assert pair.round_trip(app, b"before the signal") == b"before the signal"
    for process in (pair.client, pair.server):
        started = time.monotonic()
        assert process.stop(sig) == 0, process.output()
        assert time.monotonic() - started < 5.0
        assert "stopping" in process.output()
        assert "Traceback" not in process.output()


# -- 8. the demo -----------------------------------------------------------------------


@pytest.mark.slow
def test_demo_shows_echoes_and_a_switch():
    result = subprocess.run([sys.executable, MPUDP, "--demo", "--demo-seconds", "6"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=6 + WAIT_S, cwd=ROOT)
    out = result.stdout
    assert result.returncode == 0, out
    done = re.search(r"demo done: (\d+) sent, (\d+) echoed back", out)
    assert done, out
    sent, echoed = int(done.group(1)), int(done.group(2))
    assert sent > 0 and echoed > sent // 2, out
    assert ">>> link 0 gets" in out and ">>> link 1 dies" in out
    assert re.search(r"switch link \d .* -> link \d ", out), out
    assert "Traceback" not in out


# -- 9. several local applications (sessions) -------------------------------------------


def test_three_apps_each_get_only_their_own_replies(relay_pair):
    pair = relay_pair(links=2, server={"debug": True})
    apps = [pair.app_socket() for _ in range(3)]
    for i, app in enumerate(apps):  # each opens its session
        assert pair.round_trip(app, b"app%d-hello" % i) == b"app%d-hello" % i
    for n in range(10):  # interleaved
        for i, app in enumerate(apps):
            app.sendto(b"app%d-%d" % (i, n), pair.client_address)
    for i, app in enumerate(apps):
        want = {b"app%d-%d" % (i, n) for n in range(10)}
        got = set()
        while not want <= got:
            data, _ = app.recvfrom(65536)
            assert data.startswith(b"app%d-" % i), "app %d got %r" % (i, data)
            got.add(data)
        others = exchange(pair, app, b"app%d-last" % i)
        assert all(d.startswith(b"app%d-" % i) for d in others), others
    sources = pair.echo.sources()
    assert len({port for _host, port in sources}) == 3
    assert not sources & {app.getsockname()[:2] for app in apps}
    assert len(session_sources(pair.server)) == 3
    assert pair.close() == {"client": 0, "server": 0}


# -- 10. socket errors are not fatal ---------------------------------------------------------


def test_upstream_down_is_logged_not_fatal_and_traffic_resumes(relay_pair):
    pair = relay_pair(links=1)
    app = pair.app_socket()
    assert pair.round_trip(app, b"before") == b"before"
    host, port = pair.echo.address
    first_source = pair.echo.received[0][1]
    pair.echo.close()  # the upstream goes away: the server's sends now get ECONNREFUSED

    named = "upstream %s:%d: " % (host, port)  # the line names the upstream
    assert send_until(app, pair.client_address, b"into the void",
                      lambda: pair.server.count_lines(named) > 0), pair.server.output()
    line = next(text for text in pair.server.output().splitlines() if named in text)
    assert line.endswith("Connection refused"), line
    assert pair.server.proc.poll() is None and pair.client.proc.poll() is None

    pair.echo = EchoServer(host, port)  # back on the same port (pair.close() closes it)
    assert pair.round_trip(app, b"after") == b"after"
    assert pair.echo.received[0][1] == first_source  # the same session went on
    assert pair.close() == {"client": 0, "server": 0}
    assert "Traceback" not in pair.server.output()
