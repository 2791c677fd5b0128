"""Tests for tests/linkemu.py, the UDP link emulator used by scenario tests.

Loopback only; every wait is bounded and waits on an event (a reply, a
condition variable) rather than sleeping.
"""

import socket
import sys
import threading
import time

import pytest

from conftest import ipv6_available
from helpers import EchoServer
from linkemu import LinkEmulator

TIMEOUT = 5.0  # upper bound for any single wait


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def echo2():
    server = EchoServer()
    yield server
    server.close()


def make_client(host="127.0.0.1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(TIMEOUT)
    return sock


@pytest.fixture
def client():
    sock = make_client()
    yield sock
    sock.close()


def roundtrip(sock, emu, payload):
    sock.sendto(payload, emu.address)
    data, addr = sock.recvfrom(65535)
    assert tuple(addr[:2]) == emu.address
    return data


def assert_nothing_pending(sock):
    sock.setblocking(False)
    try:
        with pytest.raises((BlockingIOError, socket.timeout)):
            sock.recvfrom(65535)
    finally:
        sock.settimeout(TIMEOUT)


# --------------------------------------------------------------------------


def test_datagrams_reach_echo_and_come_back(echo, client):
    with LinkEmulator(echo.address) as emu:
        for i in range(10):
            payload = b"hello-%d" % i
            assert roundtrip(client, emu, payload) == payload
        assert echo.payloads() == [b"hello-%d" % i for i in range(10)]
        # One NAT mapping for one client: the echo sees one source, which is
        # the emulator's upstream socket, not the client.
        sources = set(echo.sources())
        assert len(sources) == 1
        assert sources != {tuple(client.getsockname()[:2])}
        assert emu.wait_for(lambda c: c["down_out"] == 10, TIMEOUT)
        c = emu.counters
        assert (c["up_in"], c["up_out"], c["down_in"], c["down_out"]) == (10, 10, 10, 10)
        assert c["up_dropped"] == c["down_dropped"] == c["errors"] == 0
        assert c["peers_created"] == 1


def test_large_datagram_passes_intact(echo, client):
    payload = bytes(bytearray(range(256))) * 200  # 51200 bytes
    with LinkEmulator(echo.address) as emu:
        assert roundtrip(client, emu, payload) == payload


def test_loss_up_drops_everything_upstream(echo, client):
    n = 20
    with LinkEmulator(echo.address) as emu:
        emu.set(loss_up=1.0)
        for i in range(n):
            client.sendto(b"x%d" % i, emu.address)
        assert emu.wait_for(lambda c: c["up_dropped"] == n, TIMEOUT), emu.counters
        c = emu.counters
        assert c["up_in"] == n and c["up_out"] == 0 and c["down_in"] == 0
        assert echo.received == []
        assert_nothing_pending(client)


def test_loss_down_drops_replies_only(echo, client):
    n = 20
    with LinkEmulator(echo.address) as emu:
        emu.set(loss_down=1.0)
        for i in range(n):
            client.sendto(b"y%d" % i, emu.address)
        assert emu.wait_for(lambda c: c["down_dropped"] == n, TIMEOUT), emu.counters
        assert echo.wait_count(n, TIMEOUT)
        assert sorted(echo.payloads()) == sorted(b"y%d" % i for i in range(n))
        c = emu.counters
        assert c["up_out"] == n and c["down_in"] == n and c["down_out"] == 0
        assert_nothing_pending(client)


def test_blackhole_then_restore(echo, client):
    with LinkEmulator(echo.address) as emu:
        assert roundtrip(client, emu, b"before") == b"before"
        emu.set(blackhole=True)
        for i in range(5):
            client.sendto(b"dead%d" % i, emu.address)
        assert emu.wait_for(lambda c: c["up_dropped"] == 5, TIMEOUT), emu.counters
        assert echo.payloads() == [b"before"]
        assert_nothing_pending(client)
        emu.set(blackhole=False)
        assert roundtrip(client, emu, b"after") == b"after"
        assert echo.payloads() == [b"before", b"after"]


def test_blackhole_drops_datagrams_already_in_flight(echo, client):
    with LinkEmulator(echo.address) as emu:
        emu.set(delay_s=0.3)
        client.sendto(b"inflight", emu.address)
        assert emu.wait_for(lambda c: c["up_in"] == 1, TIMEOUT)
        emu.set(blackhole=True)  # while the datagram is held for delay
        assert emu.wait_for(lambda c: c["up_dropped"] == 1, TIMEOUT), emu.counters
        assert emu.counters["up_out"] == 0
        assert echo.received == []


def test_delay_applies_both_ways(echo, client):
    with LinkEmulator(echo.address) as emu:
        emu.set(delay_s=0.2)
        t0 = time.monotonic()
        assert roundtrip(client, emu, b"slow") == b"slow"
        elapsed = time.monotonic() - t0
        assert elapsed >= 0.4, elapsed
        emu.set(delay_s=0)
        assert roundtrip(client, emu, b"fast") == b"fast"


def test_delay_does_not_busy_spin(echo, client):
    # While a datagram is held for 2 x 0.3 s the process should be idle: a
    # spinning loop would burn about as much CPU time as wall time.
    with LinkEmulator(echo.address) as emu:
        emu.set(delay_s=0.3)
        cpu0, t0 = time.process_time(), time.monotonic()
        assert roundtrip(client, emu, b"idle") == b"idle"
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
        assert wall >= 0.6
        assert cpu < 0.25, "cpu %.3fs over %.3fs wall" % (cpu, wall)


def test_order_preserved_when_delay_lowered_without_jitter(echo, client):
    with LinkEmulator(echo.address) as emu:
        emu.set(delay_s=0.3)
        client.sendto(b"first", emu.address)
        assert emu.wait_for(lambda c: c["up_in"] == 1, TIMEOUT)
        emu.set(delay_s=0)
        client.sendto(b"second", emu.address)
        got = [client.recvfrom(65535)[0], client.recvfrom(65535)[0]]
        assert got == [b"first", b"second"]
        assert echo.payloads() == [b"first", b"second"]


def test_many_delayed_datagrams_keep_order(echo, client):
    n = 50
    with LinkEmulator(echo.address) as emu:
        emu.set(delay_s=0.05)
        for i in range(n):
            client.sendto(b"%03d" % i, emu.address)
        got = [client.recvfrom(65535)[0] for _ in range(n)]
        assert got == [b"%03d" % i for i in range(n)]


def test_jitter_delivers_everything(echo, client):
    n = 30
    with LinkEmulator(echo.address) as emu:
        emu.set(jitter_s=0.05)
        for i in range(n):
            client.sendto(b"j%02d" % i, emu.address)
        got = [client.recvfrom(65535)[0] for _ in range(n)]
        assert sorted(got) == sorted(b"j%02d" % i for i in range(n))
        c = emu.counters
        assert c["up_dropped"] == c["down_dropped"] == 0


def _seeded_loss_run(seed, n=400):
    """Send n datagrams through loss_up=0.5; return the set of indices that
    reached the server. Sending is paced on the emulator's up_in counter so the
    kernel never drops anything and only the emulator's RNG decides."""
    server = EchoServer(echo=False)
    sock = make_client()
    try:
        with LinkEmulator(server.address, seed=seed) as emu:
            emu.set(loss_up=0.5)
            for i in range(n):
                sock.sendto(b"%d" % i, emu.address)
                assert emu.wait_for(lambda c, i=i: c["up_in"] > i, TIMEOUT)
            assert emu.wait_for(
                lambda c: c["up_out"] + c["up_dropped"] == n, TIMEOUT), emu.counters
            c = emu.counters
            assert server.wait_count(c["up_out"], TIMEOUT)
            delivered = set(int(p) for p in server.payloads())
            assert len(delivered) == c["up_out"] == n - c["up_dropped"]
            return delivered
    finally:
        sock.close()
        server.close()


def test_seeded_loss_is_reproducible_and_about_half():
    n = 400
    first = _seeded_loss_run(seed=1234, n=n)
    second = _seeded_loss_run(seed=1234, n=n)
    other = _seeded_loss_run(seed=99, n=n)
    assert first == second  # same datagrams dropped, not just the same count
    dropped = n - len(first)
    assert 150 <= dropped <= 250, dropped  # ~half (5 sigma band)
    assert other != first


def test_ipv6_loopback():
    if not ipv6_available():
        pytest.skip("cannot bind ::1 (IPv6 loopback unavailable)")
    server = EchoServer(host="::1")
    sock = make_client("::1")
    try:
        with LinkEmulator(server.address, listen=("::1", 0)) as emu:
            assert emu.address[0] == "::1"
            assert roundtrip(sock, emu, b"v6") == b"v6"
            assert server.received[0][1][0] == "::1"
        # Mixed families: IPv4 listen side, IPv6 server side.
        sock4 = make_client()
        try:
            with LinkEmulator(server.address) as emu:
                assert roundtrip(sock4, emu, b"4to6") == b"4to6"
        finally:
            sock4.close()
    finally:
        sock.close()
        server.close()


def test_retarget_moves_traffic(echo, echo2, client):
    with LinkEmulator(echo.address) as emu:
        assert roundtrip(client, emu, b"one") == b"one"
        emu.retarget(echo2.address)
        assert emu.target == echo2.address
        assert roundtrip(client, emu, b"two") == b"two"
        assert echo.payloads() == [b"one"]
        assert echo2.payloads() == [b"two"]
        # The existing mapping was re-pointed, not replaced.
        assert emu.counters["peers_created"] == 1


def test_server_restart_on_same_port_is_survived(client):
    server = EchoServer()
    port = server.address[1]
    try:
        with LinkEmulator(server.address) as emu:
            assert roundtrip(client, emu, b"up") == b"up"
            server.close()
            # Nothing listens now: the connected upstream socket gets
            # ECONNREFUSED, which is counted, not raised.
            got_error = False
            for i in range(20):
                client.sendto(b"void%d" % i, emu.address)
                if emu.wait_for(lambda c: c["errors"] >= 1, 0.5):
                    got_error = True
                    break
            if not got_error and not sys.platform.startswith("linux"):
                pytest.skip("platform does not report ICMP port unreachable")
            assert got_error, emu.counters
            assert emu.thread.is_alive()
            server = EchoServer(port=port)  # the server restarts
            assert roundtrip(client, emu, b"back") == b"back"
            assert server.payloads() == [b"back"]
            assert emu.counters["peers_created"] == 1
    finally:
        server.close()


def test_pending_refusal_does_not_eat_next_datagram(client):
    # The ECONNREFUSED caused by datagram A is reported on the next send on the
    # same socket; that send (datagram B) must be retried, not lost.
    server = EchoServer()
    try:
        with LinkEmulator(server.address) as emu:
            assert roundtrip(client, emu, b"up") == b"up"  # create the mapping
            server.close()
            emu.set(delay_s=0.3)
            client.sendto(b"A", emu.address)
            assert emu.wait_for(lambda c: c["up_in"] == 2, TIMEOUT)
            emu.set(delay_s=0)
            client.sendto(b"B", emu.address)  # FIFO: due together with A
            assert emu.wait_for(lambda c: c["up_out"] == 3, TIMEOUT), emu.counters
    finally:
        server.close()


def test_per_peer_mapping_bounded_lru(echo):
    clients = [make_client() for _ in range(3)]

    def rt(i, tag):
        payload = b"c%d-%s" % (i, tag)
        assert roundtrip(clients[i], emu, payload) == payload  # reply to the right client
        return echo.received[-1][1]  # upstream source the server saw

    try:
        with LinkEmulator(echo.address, max_peers=2) as emu:
            src0, src1 = rt(0, b"a"), rt(1, b"a")
            assert src0 != src1  # one upstream socket per client
            assert rt(0, b"b") == src0  # same client, same mapping
            assert emu.counters["peers_evicted"] == 0
            src2 = rt(2, b"a")  # third peer: evicts the least recently used (1)
            assert src2 not in (src0, src1)
            assert emu.counters["peers_evicted"] == 1
            assert rt(0, b"c") == src0  # client 0 was used recently: kept
            assert rt(1, b"b") not in (src0, src1, src2)  # client 1: new mapping
            assert emu.counters["peers_evicted"] == 2  # client 2 evicted now
            assert emu.counters["peers_created"] == 4
    finally:
        for c in clients:
            c.close()


def test_wait_for_times_out_and_wakes(echo, client):
    with LinkEmulator(echo.address) as emu:
        t0 = time.monotonic()
        assert emu.wait_for(lambda c: c["up_in"] >= 1, 0.1) is False
        assert time.monotonic() - t0 >= 0.1
        client.sendto(b"wake", emu.address)
        assert emu.wait_for(lambda c: c["down_out"] >= 1, TIMEOUT) is True


def test_close_is_idempotent_and_stops_thread(echo, client):
    emu = LinkEmulator(echo.address).start()
    assert emu.start() is emu  # second start is a no-op
    thread = emu.thread
    assert thread.is_alive() and thread.daemon
    assert roundtrip(client, emu, b"x") == b"x"
    emu.close()
    assert not thread.is_alive()
    assert thread not in threading.enumerate()
    assert emu.closed
    emu.close()  # idempotent
    with pytest.raises(RuntimeError):
        emu.start()
    # Its port is released: a new socket can bind it.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(emu.address)
    finally:
        s.close()


def test_close_without_start_and_context_manager(echo, client):
    emu = LinkEmulator(echo.address)
    emu.close()
    emu.close()
    assert emu.thread is None
    with LinkEmulator(echo.address) as emu2:
        assert emu2.thread.is_alive()
        assert roundtrip(client, emu2, b"cm") == b"cm"
    assert not emu2.thread.is_alive()


def test_rejects_non_loopback_and_bad_knobs(echo):
    with pytest.raises(ValueError):
        LinkEmulator(("10.0.0.1", 9))
    with pytest.raises(ValueError):
        LinkEmulator(echo.address, listen=("0.0.0.0", 0))
    with pytest.raises(ValueError):
        LinkEmulator(("example.com", 9))
    with LinkEmulator(echo.address) as emu:
        with pytest.raises(ValueError):
            emu.retarget(("192.0.2.1", 9))
        assert emu.target == echo.address
        for bad in ({"loss_up": 1.5}, {"loss_down": -0.1}, {"delay_s": -1},
                    {"jitter_s": float("nan")}):
            with pytest.raises(ValueError):
                emu.set(**bad)
        with pytest.raises(TypeError):
            emu.set(0.1)  # knobs are keyword-only
        assert emu.settings == {"delay_s": 0.0, "jitter_s": 0.0, "loss_up": 0.0,
                                "loss_down": 0.0, "blackhole": False}
