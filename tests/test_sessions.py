"""End-to-end session tests: real mpudp processes on loopback.

1. Session expiry on both sides while other sessions keep flowing; the expired
   session's upstream socket is closed and a returning application gets a new
   session (new id, new upstream source port).
2. Two clients through one server: per-client upstreams (`upstream_addrs`) and a
   shared one (`upstream_addr`); a silent client loses its return path without
   disturbing the other, and works again when it wakes up.
3. A real client process with client 1's keys claiming client_id 0.
4. Mixed families: one IPv4 link and one IPv6 link to a dual-stack server, the
   traffic moving from one family to the other mid-stream (and back), with the
   upstream on IPv4 and on IPv6.

(max_sessions on both sides is in test_hostile_flood.py, the forged-id cases in
test_hostile_replay.py; three applications' separation is in test_relay.py.)

Waits are on events (log lines, datagrams) with helpers.WAIT_S as the bound.
"""

import re
import signal
import time

import pytest

from conftest import MpudpProcess, free_udp_port, keypair, needs_ipv6, write_config
from helpers import LOOPBACK, WAIT_S, EchoServer, Stream, addr_text, line_count, round_trip, udp_socket
from linkemu import LinkEmulator


# -- helpers -------------------------------------------------------------------


def udp_socket_open(local_port, remote_port):
    """True if some UDP socket on this host is bound to `local_port` and connected to `remote_port`
    (from /proc/net/udp and udp6; None where there is no /proc)."""
    found = None
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(name) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        found = bool(found)
        for row in rows:
            fields = row.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == local_port and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                return True
    return found


def start_chatter(dest, prefix, every=0.03):
    """An application in a thread: sends `prefix`-tagged numbered datagrams every `every` seconds
    to `dest`; its echoes (`arrivals`: time, number) and any stranger's datagrams (`others`)."""
    return Stream(dest, rate=1.0 / every, size=0, tag=prefix + b"-")


# -- 1. session expiry ------------------------------------------------------------


def opened_session(pair, app_port, start_c, start_s):
    """(session id, upstream source address) of the session opened for the application on `app_port`."""
    _i, m = pair.client.wait_match(r"session ([0-9a-f]{8}) opened for 127\.0\.0\.1:%d$" % app_port, start_c)
    sid = m.group(1)
    _i, m = pair.server.wait_match(r"client 0: session %s opened, upstream %s from 127\.0\.0\.1:(\d+)$" % (
        sid, re.escape(pair.echo.text)), start_s)
    return sid, (LOOPBACK, int(m.group(1)))


@pytest.mark.slow
def test_idle_session_expires_on_both_sides_while_others_flow(relay_pair, cleanup):
    timeouts = {"session_timeout_sec": 1.0, "debug": True}
    pair = relay_pair(links=1, client=dict(timeouts), server=dict(timeouts))
    dest = pair.client_address
    echo_port = pair.echo.address[1]

    a = udp_socket(timeout=WAIT_S)
    cleanup(a.close)
    a_port = a.getsockname()[1]
    assert round_trip(a, dest, b"A-hello") == []
    a_old, a_source = opened_session(pair, a_port, 0, 0)
    assert pair.echo.payloads(a_source) == [b"A-hello"]
    assert udp_socket_open(a_source[1], echo_port) in (True, None)  # the check below can see it

    # B and C talk all along; A says nothing more.
    chatters = [start_chatter(dest, b"B"), start_chatter(dest, b"C")]
    for chatter in chatters:
        cleanup(chatter.stop)
    busy = [opened_session(pair, chatter.address[1], 0, 0) for chatter in chatters]
    for chatter in chatters:
        chatter.wait_received(3)
    assert len({a_old} | {sid for sid, _ in busy}) == 3
    assert len({a_source} | {source for _, source in busy}) == 3

    pair.client.wait_for_line("session %s for 127.0.0.1:%d expired" % (a_old, a_port))
    pair.server.wait_for_line("client 0: session %s expired" % a_old)
    after = time.monotonic()
    for chatter in chatters:
        chatter.wait_received(chatter.received() + 10)  # replies keep coming after A's expiry
        assert chatter.arrivals[-1][0] > after
        assert chatter.others == []
    for sid, source in busy:  # the busy sessions never expired, and kept their upstream socket
        assert pair.client.count_lines("session %s for" % sid) == 0
        assert pair.server.count_lines("session %s expired" % sid) == 0
        assert pair.server.count_lines("session %s opened" % sid) == 1
    for chatter, (_sid, source) in zip(chatters, busy):
        assert len(pair.echo.payloads(source)) >= chatter.received()

    # The server closed A's upstream socket: it is gone, and the echo never hears from it again.
    assert udp_socket_open(a_source[1], echo_port) in (False, None)

    # A talks again: a new session on both sides, a new upstream source port, and its reply.
    start_c, start_s = line_count(pair.client), line_count(pair.server)
    assert round_trip(a, dest, b"A-again") == []
    a_new, new_source = opened_session(pair, a_port, start_c, start_s)
    assert a_new != a_old
    assert new_source != a_source
    assert pair.echo.payloads(new_source)[0] == b"A-again"
    assert pair.echo.payloads(a_source) == [b"A-hello"]
    for chatter in chatters:
        chatter.stop()
        assert chatter.others == []
    assert pair.close() == {"client": 0, "server": 0}


# -- 2. two clients through one server ----------------------------------------------


class TwoClients(object):
    """One server process with two client keys, and client processes built by hand."""

    def __init__(self, tmp_path, cleanup, echoes, shared_upstream=False, heartbeat_timeout=1.0):
        self.tmp_path, self.cleanup = tmp_path, cleanup
        self.server_keys = keypair()
        self.client_keys = [keypair(), keypair()]
        self.server_addr = (LOOPBACK, free_udp_port())
        server = {
            "listen_addr": addr_text(*self.server_addr),
            "server_private_key": self.server_keys[0],
            "client_public_keys": [k[1] for k in self.client_keys],
            "heartbeat_timeout_sec": heartbeat_timeout,
            "debug": True,
        }
        if shared_upstream:
            server["upstream_addr"] = echoes[0].text
        else:
            server["upstream_addrs"] = [echo.text for echo in echoes]
        self.server = MpudpProcess(write_config(tmp_path, {"mode": "server", "server": server}, "server.json"))
        cleanup(self.server.stop)
        self.server.wait_for_line("server listening on")

    def client(self, name, client_id, private_key):
        """A client process with one link straight to the server: (process, listen address)."""
        listen = (LOOPBACK, free_udp_port())
        config = write_config(self.tmp_path, {"mode": "client", "client": {
            "listen_addr": addr_text(*listen),
            "links": [{"remote_addr": addr_text(*self.server_addr)}],
            "heartbeat_interval_sec": 0.2,
            "client_id": client_id,
            "client_private_key": private_key,
            "server_public_key": self.server_keys[1],
        }}, name + ".json")
        process = MpudpProcess(config)
        self.cleanup(lambda: process.stop())
        self.cleanup(lambda: process.proc.poll() is None and process.proc.send_signal(signal.SIGCONT))
        process.wait_for_line("client %d listening" % client_id)
        return process, listen

    def genuine(self, client_id):
        process, listen = self.client("client%d" % client_id, client_id, self.client_keys[client_id][0])
        process.wait_for_line("handshake done")
        return process, listen


def interleave(apps_and_dests, n):
    """Every app sends `tag-i` for i < n, interleaved; each gets exactly its own back."""
    for i in range(n):
        for app, dest, tag in apps_and_dests:
            app.sendto(b"%s-%d" % (tag, i), dest)
    for app, dest, tag in apps_and_dests:
        want = {b"%s-%d" % (tag, i) for i in range(n)}
        got = set()
        while not want <= got:
            data = app.recvfrom(65536)[0]
            assert data in want, "%r got %r" % (tag, data)
            got.add(data)
        # a barrier sent once: nothing else (no stranger's reply) arrived before it
        assert [d for d in round_trip(app, dest, tag + b"-barrier") if d not in want] == []


@pytest.mark.slow
def test_two_clients_own_upstreams_and_a_silent_one(tmp_path, cleanup):
    echoes = [EchoServer(), EchoServer()]
    for echo in echoes:
        cleanup(echo.close)
    rig = TwoClients(tmp_path, cleanup, echoes, heartbeat_timeout=1.0)
    (c0, dest0), (c1, dest1) = rig.genuine(0), rig.genuine(1)
    app0, app1 = udp_socket(timeout=WAIT_S), udp_socket(timeout=WAIT_S)
    cleanup(app0.close)
    cleanup(app1.close)
    assert round_trip(app0, dest0, b"c0-hello") == []
    assert round_trip(app1, dest1, b"c1-hello") == []
    interleave([(app0, dest0, b"c0"), (app1, dest1, b"c1")], 20)
    assert all(d.startswith(b"c0-") for d in echoes[0].payloads()), echoes[0].payloads()
    assert all(d.startswith(b"c1-") for d in echoes[1].payloads()), echoes[1].payloads()
    assert len(echoes[0].payloads()) >= 22 and len(echoes[1].payloads()) >= 22

    # Client 1 freezes: the server drops its return path, client 0 goes on regardless.
    app0.close()
    chatter = start_chatter(dest0, b"c0-flow")
    cleanup(chatter.stop)
    chatter.wait_received(3)
    start = line_count(rig.server)
    c1.proc.send_signal(signal.SIGSTOP)
    try:
        rig.server.wait_for_line("client 1 silent for", start=start)
        dropped_at = time.monotonic()
        chatter.wait_received(chatter.received() + 15)
        assert chatter.arrivals[-1][0] > dropped_at
        assert rig.server.count_lines("client 0 silent") == 0
        assert chatter.others == []
    finally:
        c1.proc.send_signal(signal.SIGCONT)
    # Client 1 wakes up and works again (its return path comes back).
    assert round_trip(app1, dest1, b"c1-awake") == []
    assert rig.server.count_lines("client 1 silent for") == 1
    chatter.wait_received(chatter.received() + 5)
    chatter.stop()
    assert chatter.others == []
    assert not any(d.startswith(b"c1") for d in echoes[0].payloads())
    assert not any(d.startswith(b"c0") for d in echoes[1].payloads())
    assert c1.stop() == 0 and c0.stop() == 0 and rig.server.stop() == 0


def test_two_clients_share_the_single_upstream_addr(tmp_path, cleanup):
    echo = EchoServer()
    cleanup(echo.close)
    rig = TwoClients(tmp_path, cleanup, [echo], shared_upstream=True)
    (c0, dest0), (c1, dest1) = rig.genuine(0), rig.genuine(1)
    app0, app1 = udp_socket(timeout=WAIT_S), udp_socket(timeout=WAIT_S)
    cleanup(app0.close)
    cleanup(app1.close)
    assert round_trip(app0, dest0, b"c0-hello") == []
    assert round_trip(app1, dest1, b"c1-hello") == []
    interleave([(app0, dest0, b"c0"), (app1, dest1, b"c1")], 20)
    data = echo.payloads()
    assert {d for d in data if d.startswith(b"c0-")} >= {b"c0-%d" % i for i in range(20)}
    assert {d for d in data if d.startswith(b"c1-")} >= {b"c1-%d" % i for i in range(20)}
    # two sessions, one per client, from two upstream sockets
    with echo.cond:
        by_source = {}
        for d, source in echo.received:
            by_source.setdefault(source, set()).add(d[:2])
    assert sorted(by_source.values()) == [{b"c0"}, {b"c1"}]
    for i in (0, 1):
        rig.server.wait_for_line("client %d: session" % i)
    assert c0.stop() == 0 and c1.stop() == 0 and rig.server.stop() == 0


# -- 3. a client forging the other's id ---------------------------------------------


def test_client_with_client1_keys_claiming_id_0_gets_nothing_through(tmp_path, cleanup):
    echoes = [EchoServer(), EchoServer()]
    for echo in echoes:
        cleanup(echo.close)
    rig = TwoClients(tmp_path, cleanup, echoes)
    c0, dest0 = rig.genuine(0)
    app0, forger_app = udp_socket(timeout=WAIT_S), udp_socket(timeout=WAIT_S)
    cleanup(app0.close)
    cleanup(forger_app.close)
    assert round_trip(app0, dest0, b"c0-before") == []

    forger, forger_dest = rig.client("forger", 0, rig.client_keys[1][0])
    # Its application sends all along; the forger's HELLOs go unanswered, ten times over.
    start = time.monotonic()
    while forger.count_lines("no answer from the server to") == 0:
        assert time.monotonic() - start < WAIT_S, forger.output()
        forger_app.sendto(b"forged-%d" % int((time.monotonic() - start) * 100), forger_dest)
        time.sleep(0.05)  # pacing of the traffic, not a wait for an outcome
    assert forger.count_lines("handshake done") == 0
    assert round_trip(app0, dest0, b"c0-after") == []  # client 0 undisturbed (and a barrier)
    assert _nothing_waiting(forger_app), "the forger's application got an answer"
    assert not any(d.startswith(b"forged-") for echo in echoes for d in echo.payloads())
    assert echoes[1].payloads() == []
    assert rig.server.count_lines("client 0: new epoch") == 1
    assert rig.server.count_lines("replies now go by") == 0
    assert forger.stop() == 0 and c0.stop() == 0


def _nothing_waiting(sock):
    sock.setblocking(False)
    try:
        sock.recvfrom(65536)
        return False
    except (BlockingIOError, InterruptedError):
        return True
    finally:
        sock.settimeout(WAIT_S)


# -- 4. mixed families: the traffic moves between an IPv4 and an IPv6 link ----------------


@pytest.mark.slow
@needs_ipv6
@pytest.mark.parametrize("echo_host", ["127.0.0.1", "::1"], ids=["v4-upstream", "v6-upstream"])
def test_switch_between_ipv4_and_ipv6_links_mid_stream(relay_pair, cleanup, echo_host):
    """The server listens on ":port" (both families); link 0 reaches it by 127.0.0.1 and link 1 by
    ::1, each through an emulator.  Blackholing the active link moves a running stream to the link
    of the other family and back; the session and its upstream socket stay the same throughout."""
    server_port = free_udp_port()
    emu4 = LinkEmulator((LOOPBACK, server_port), listen=(LOOPBACK, 0), seed=4).start()
    emu6 = LinkEmulator(("::1", server_port), listen=("::1", 0), seed=6).start()
    cleanup(emu4.close)
    cleanup(emu6.close)
    emu6.set(blackhole=True)  # link 0 (IPv4) carries the traffic first
    names = ["link 0 (%s)" % addr_text(*emu4.address[:2]), "link 1 (%s)" % addr_text(*emu6.address[:2])]
    pair = relay_pair(links=0, echo_host=echo_host, server={"listen_addr": ":%d" % server_port},
                      client={"links": [{"remote_addr": addr_text(*emu.address[:2])} for emu in (emu4, emu6)],
                              "switch_threshold": 1000})  # only "active link down" moves the traffic
    chatter = start_chatter(pair.client_address, b"mixed")
    cleanup(chatter.stop)
    chatter.wait_received(5)
    v4 = r"(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]):"  # a dual-stack socket sees IPv4 peers v4-mapped
    pair.server.wait_match(r"client 0: return path link 0 \(%s" % v4)
    sources = pair.echo.sources()
    assert len(sources) == 1 and (":" in next(iter(sources))[0]) == (":" in echo_host)

    for old, new, down, up in ((0, 1, emu4, emu6), (1, 0, emu6, emu4)):
        start_c, start_s = line_count(pair.client), line_count(pair.server)
        up.set(blackhole=False)
        pair.client.wait_for_line("%s up" % names[new], start=start_c)
        down.set(blackhole=True)
        pair.client.wait_for_line("switch %s -> %s: active link down" % (names[old], names[new]), start=start_c)
        family = r"\[::1\]:" if new == 1 else v4
        pair.server.wait_match(r"client 0: replies now go by link %d \(%s" % (new, family), start_s)
        switched_at = time.monotonic()
        carried = up.counters["down_out"]
        chatter.wait_received(chatter.received() + 20)  # the stream goes on, on the other family's link
        assert chatter.arrivals[-1][0] > switched_at
        assert up.counters["down_out"] >= carried + 20
    chatter.stop()
    assert chatter.others == []
    assert pair.echo.sources() == sources  # one session, one upstream socket, across both switches
    assert pair.client.count_lines("handshake done") == 1  # no new epoch was needed
    assert pair.close() == {"client": 0, "server": 0}
