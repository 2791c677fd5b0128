"""Hostile surroundings, links and neighbours: the upstream down and back, a link whose
sends the kernel refuses (ENETUNREACH: down at once, not after missed heartbeats), a
route vanishing in a network namespace (when we may make one), a link to a closed port;
and the start-up choice of link is logged.  Resume times are printed (`pytest -s`).
"""

import errno
import time

from conftest import MpudpProcess, NetNs, free_udp_port, keypair, write_config
from helpers import LOOPBACK, WAIT_S, App, EchoServer, alive, reporter, wait_for_last

report = reporter("hostile")


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


# ============================================================================
# The upstream
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


# ============================================================================
# A link that cannot send
# ============================================================================


def test_a_link_whose_sends_are_unreachable_is_down_at_once(rig):
    """ENETUNREACH on a send (no route for the link now): the link is down at once and the
    traffic moves to the other link, not after max_consecutive_fail missed heartbeats; one
    warning, the later refusals only counted; back up through heartbeats once it can send."""
    r = rig()
    r.client.close()  # a client with two links to the same server instead
    server = "%s:%d" % r.server_addr
    client = r.start_client(dict(r.client_cfg, links=[{"remote_addr": server}, {"remote_addr": server}],
                                 max_consecutive_fail=50))  # missed heartbeats alone would take 10 s
    assert r.run_until(lambda: all(l.health.up for l in client.links) and client.active is not None, 5.0)
    gone = client.active
    other = next(l for l in client.links if l is not gone)
    real_sock, gone.sock = gone.sock, NoRoute(gone.sock)
    mark = len(r.log_text())
    went_down_at = r.clock.now
    r.app.sendto(b"lost: the first packet after the route went", r.client_addr)
    r.app.sendto(b"queued behind it", r.client_addr)
    assert r.settle(lambda: client.active is other), r.log_text()[mark:]
    assert r.clock.now == went_down_at  # no time passed: no heartbeat was missed
    assert not gone.health.up
    # Only the packet the kernel refused is lost: the one behind it waited in the
    # socket and went by the other link.
    assert r.settle(lambda: b"queued behind it" in r.upstream_payloads()), r.upstream_payloads()
    assert b"lost: the first packet after the route went" not in r.upstream_payloads()
    assert r.round_trip(b"by the other link")
    r.run(2.0)  # 10 heartbeat intervals: the gone link's heartbeats are refused too
    log = r.log_text()[mark:]
    assert log.count("%s: [Errno %d] Network is unreachable; down until its heartbeats are answered again"
                     % (gone.name, errno.ENETUNREACH)) == 1, log
    assert "missed heartbeats" not in log and not gone.health.up and client.active is other
    assert client.counters["link_errors"] >= 5  # the data packet and the heartbeats: each refused

    gone.sock = real_sock  # the route is back
    assert r.run_until(lambda: gone.health.up, 10.0), r.log_text()[mark:]
    assert r.round_trip(b"after the route came back")


def test_the_start_up_choice_of_link_is_logged(rig):
    """The link that carries the traffic from the start is named once, like every later switch."""
    r = rig()
    lines = [line for line in r.log_text().splitlines() if "carries the traffic" in line]
    assert [line.split(" INFO  ", 1)[-1] for line in lines] == [
        "first choice: %s carries the traffic" % r.client.links[0].name], lines
    assert r.client.active is r.client.links[0]


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
