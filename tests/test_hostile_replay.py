"""Hostile network, replays: DATA and HEARTBEAT packets captured on the wire (client to
server) and DATA captured server to client are re-sent at once, from the same and from
another address, after the client restarts, after the server restarts, after a replayed
HELLO.  None is forwarded to the upstream or the application, none is echoed as a
heartbeat, none moves the return path.  A client forging another client's id gets
nothing through.

Captures use helpers.Tap, a recording UDP forwarder (one upstream socket per client
source address, like a NAT) between the client's links and the server
(conftest.tapped_pair).  Since the test knows both private keys it can also build
valid packets with mpudp's own functions.  Loopback only.  Resume times are printed
(`pytest -s` shows them).
"""

import time

import mpudp
from conftest import free_udp_port, keypair, write_config
from helpers import (
    LOOPBACK, WAIT_S, App, alive, captured, drain, duplicates, header, kind, manual_handshake, receive_reply, reporter,
    static_secret,
    udp_socket,
)

DATA, HEARTBEAT, ECHO, HELLO, WELCOME, COOKIE = (mpudp.TYPE_DATA, mpudp.TYPE_HEARTBEAT, mpudp.TYPE_ECHO,
                                                 mpudp.TYPE_HELLO, mpudp.TYPE_WELCOME, mpudp.TYPE_COOKIE)
HANDSHAKE_REPLY_SIZE = mpudp.OVERHEAD + mpudp.WELCOME_PAYLOAD.size  # WELCOME and COOKIE: HELLO's size

report = reporter("hostile")


def client_sources(taps):
    return {(source, tap) for tap in taps for source in tap.sources()}


def echoed_heartbeats(taps):
    """(epoch tag, link, heartbeat seq) of every ECHO the server sent back through the taps."""
    keys = []
    for data, _source, _tap in captured(taps, "down", (ECHO,)):
        if len(data) == mpudp.OVERHEAD + mpudp.ECHO_PAYLOAD.size:
            _flags, link, _cid, _session, nonce = header(data)
            hb_seq = mpudp.ECHO_PAYLOAD.unpack_from(data, mpudp.HEADER_SIZE)[0]
            keys.append((nonce >> mpudp.SEQ_BITS, link, hb_seq))
    return keys


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
    assert duplicates(pair.echo.payloads()) == [], where + ": the upstream saw a payload twice"
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
# Captured packets re-sent
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
    n_before = len(pair.echo.payloads())
    before = set(pair.echo.payloads())

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
    after = pair.echo.payloads()[n_before:]
    assert not before.intersection(after), "an old payload reached the upstream after the restart"

    # (e) a replayed HELLO after the restart: at most a COOKIE or WELCOME back, never data.
    distinct_hellos = sorted({data for data, _s, _t in hellos})
    for data, source, tap in hellos[:1]:
        tap.send_as(source, data)  # from the client's own address: the client ignores the WELCOME
    attacker.send(distinct_hellos, pair.server_addr)
    replay(pair, attacker, c2s, s2c, sources)
    check_nothing_replayed(pair, app, attacker, "replayed HELLO after server restart",
                           welcome_allowed=len(distinct_hellos))
    assert not before.intersection(pair.echo.payloads()[n_before:])
    app.close()
    attacker.close()


# ============================================================================
# Another client's id
# ============================================================================


def test_forged_client_id_gets_nothing_through(tapped_pair, tmp_path):
    other_private, other_public = keypair()
    pair = tapped_pair(extra_client_keys=[other_public])  # client 1: a second, valid key pair
    app = App(pair.client_address)
    app.probe("client0")
    secret = static_secret((other_private, other_public), pair.server_keys)

    # Client 1 is genuine: as itself, its data goes through (so its keys are good).
    sock = udp_socket()
    epoch = manual_handshake(sock, pair.server_addr, secret, client_id=1)
    assert epoch is not None
    sock.sendto(mpudp.seal(epoch.tx_mac, DATA | mpudp.FLAG_ACTIVE, 0, 1, 7, epoch.next_nonce(), b"client1-genuine"),
                pair.server_addr)
    assert pair.echo.wait_for(lambda r: any(data == b"client1-genuine" for data, _ in r))
    reply = receive_reply(sock, pair.server_addr, epoch, 1)  # the upstream's answer, under client 1's own keys
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
                                     mpudp.HEARTBEAT_PAYLOAD.pack(i + 1, 0, 0, 0, 0, 0, 0)))
    sock.setblocking(False)
    assert drain(sock) == []
    for packet in forged:
        sock.sendto(packet, pair.server_addr)
    app.probe("client0-barrier")
    app.probe("client0-barrier2")
    assert not any(data.startswith(b"forged-") for data in pair.echo.payloads())
    assert drain(sock) == [], "the forger got an answer"

    # A real mpudp client with client 1's key configured as client 0 never gets a handshake.
    forger_port = free_udp_port()
    forger_cfg = write_config(tmp_path, {"mode": "client", "client": {
        "listen_addr": "%s:%d" % (LOOPBACK, forger_port),
        "links": [{"remote_addr": "%s:%d" % pair.server_addr}], "heartbeat_interval_sec": 0.1,
        "client_id": 0, "client_private_key": other_private, "server_public_key": pair.server_keys[1]}},
        "forger.json")
    forger = pair.spawn(forger_cfg)
    forger.wait_for_line("client 0 listening")
    forger_app = App((LOOPBACK, forger_port))
    assert forger_app.silent_for("forger-app", 1.0) == []
    assert forger.count_lines("handshake done") == 0
    assert not any(data.startswith(b"forger-app") for data in pair.echo.payloads())
    app.probe("client0-still-fine")
    sock.close()
    app.close()
    forger_app.close()
