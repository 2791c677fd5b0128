"""Links on chosen uplinks: bind_interface, bind_addr and fwmark, end to end.

1. bind_interface: a client namespace and a server namespace joined by two veth
   pairs, vethA (10.211.1.0/24) and vethB (10.211.2.0/24); the server's one
   address, 10.211.9.9, is reachable by both, by vethA first (route metrics).
   Each link's heartbeats leave by its own interface and the data stream by the
   active link's, as the interfaces' own counters show.  The control: without
   bind_interface everything leaves by vethA.
2. fwmark: the server is routable only in table 100 (`ip rule add fwmark 0x64
   table 100`): the marked link carries the traffic, an unmarked link to the
   same address stays down (ENETUNREACH, counted).
3. bind_addr: links bound to loopback aliases (127.0.0.2, 127.0.0.3:PORT, ::1)
   are seen from exactly those sources (no namespace needed).  Between the two
   namespaces: the bound address picks the source, a `from` rule the uplink; the
   address removed and back.
4. No permission for SO_MARK: the start stops with one clear line, exit status 1.
5. An interface deleted under the active link (the link goes down at once, traffic
   moves to the other link) and made again (the link comes back on a new socket);
   one deleted and made again between two checks (a new index: in process, stepped
   by hand); an interface or address that is not there when the client starts.
6. Config errors of the new keys: one line naming the key path, exit status 2.
7. A reload (SIGHUP) that changes a link's bind_addr replaces the link: a new socket, seen
   by the server from the new address, the App's session going on; a link whose options did
   not change keeps its socket (the control); an invalid bind_addr is refused with one line
   and the link goes on as it was.

The namespace tests need root and iproute2 and skip otherwise.  Everything they
make lives in the namespaces they made (deleted at the end of each test); nothing
changes in the host's own namespace.  Figures (failover time) are printed; `pytest -s`
shows them.
"""

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import mpudp
from conftest import (
    MPUDP, ROOT, FakeClock, InProcess, MpudpProcess, NetNs, free_udp_port, keypair, needs_ipv6, write_config,
)
from helpers import WAIT_S, App, EchoServer, reporter, wait_for_last, wait_until

pytestmark = pytest.mark.slow  # network namespaces: the kernel's behaviour, the same on every Python (tox.ini)

SERVER_IP = "10.211.9.9"  # on the server namespace's lo, reachable by both veth pairs
# client-side interface: (its address, the server-side peer, the peer's address, gateway, route metric)
WANS = {
    "vethA": ("10.211.1.1/24", "peerA", "10.211.1.2/24", "10.211.1.2", 10),
    "vethB": ("10.211.2.1/24", "peerB", "10.211.2.2/24", "10.211.2.2", 20),
}
SOURCE = {"vethA": "10.211.1.1", "vethB": "10.211.2.1"}
RETURN_PATH = ("return path link", "replies now go by link")  # the server's lines naming where replies go
CARRIER = ("carries the traffic", "switch link ")  # the client's lines naming the link that carries the data
HEARTBEAT_S = 0.1
STREAM_PACKETS, STREAM_SIZE = 200, 1000  # a data stream the interface counters cannot miss

report = reporter("multiwan")


def read_score_file(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # not written yet, or caught between write and rename on an odd filesystem


def wait_for_status(path, predicate, what):
    """The client's score_file once `predicate(status)` holds (it is written at most once a second)."""
    def check():
        status = read_score_file(path)
        return status if status is not None and predicate(status) else None
    return wait_until(check, what)


# -- two uplinks between two namespaces -------------------------------------------


class TwoWans:
    """A client namespace and a server namespace, joined by veth pairs from WANS.

    The server (and its echo upstream) run in the server namespace, listening on
    SERVER_IP; the client and the application in the client namespace."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs, self.closers = [], []
        self.server_ns = None
        self.client_ns = NetNs("mw-client")
        try:
            self.server_ns = NetNs("mw-server")
            for ns in (self.client_ns, self.server_ns):
                # Replies come back on the link's own interface, not always the best
                # route's: no reverse-path filter.  No IPv6 chatter in the counters.
                for key in ("net/ipv4/conf/all/rp_filter", "net/ipv4/conf/default/rp_filter"):
                    ns.sysctl(key, 0)
                for key in ("net/ipv6/conf/all/disable_ipv6", "net/ipv6/conf/default/disable_ipv6"):
                    if os.path.exists("/proc/sys/" + key):  # not there if IPv6 is off altogether
                        ns.sysctl(key, 1)
            self.server_ns.ip("addr", "add", SERVER_IP + "/32", "dev", "lo")
        except BaseException:
            self.close()
            raise
        self.score_file = os.path.join(str(tmp_path), "score.json")
        self.server = self.client = self.app = None
        self.port = 0

    def add_wan(self, name, route=True):
        """The veth pair `name` (both ends up, addressed), with a main-table route to the server."""
        address, peer, peer_address, gateway, metric = WANS[name]
        self.client_ns.add_veth(name, address, self.server_ns, peer, peer_address)
        if route:
            self.client_ns.ip("route", "add", SERVER_IP + "/32", "via", gateway, "dev", name, "metric", str(metric))

    def start(self, links, **client_options):
        """Echo and server in the server namespace, client and App in the client namespace;
        `links` are client.links entries without remote_addr (all go to the server)."""
        server_keys, client_keys = keypair(), keypair()

        def in_server_ns():
            echo = EchoServer("127.0.0.1")
            self.closers.append(echo.close)
            port = free_udp_port(SERVER_IP)
            path = write_config(self.tmp_path, {"mode": "server", "server": {
                "listen_addr": "%s:%d" % (SERVER_IP, port), "upstream_addr": echo.text,
                "server_private_key": server_keys[0], "client_public_keys": [client_keys[1]]}}, "server.json")
            server = MpudpProcess(path)
            self.procs.append(server)
            return port, server

        self.port, self.server = self.server_ns.inside(in_server_ns)
        self.server.wait_for_line("server listening on")
        client_cfg = {
            "links": [dict({"remote_addr": "%s:%d" % (SERVER_IP, self.port)}, **link) for link in links],
            "heartbeat_interval_sec": HEARTBEAT_S, "score_file": self.score_file,
            "client_private_key": client_keys[0], "server_public_key": server_keys[1],
        }
        client_cfg.update(client_options)

        def in_client_ns():
            port = free_udp_port()
            client_cfg["listen_addr"] = "127.0.0.1:%d" % port
            client = MpudpProcess(write_config(self.tmp_path, {"mode": "client", "client": client_cfg},
                                               "client.json"))
            self.procs.append(client)
            app = App(("127.0.0.1", port))
            self.closers.append(app.close)
            return client, app

        self.client, self.app = self.client_ns.inside(in_client_ns)

    def link(self, index):
        """How the client's log names link `index`."""
        return "link %d (%s:%d)" % (index, SERVER_IP, self.port)

    def counters(self, *interfaces):
        return {name: self.client_ns.counters(name) for name in interfaces}

    def close(self):
        for process in self.procs:
            process.stop()
        for close in self.closers:
            close()
        for ns in (self.server_ns, self.client_ns):
            if ns is not None:
                ns.close()


@pytest.fixture
def two_wans(tmp_path):
    """A factory for TwoWans; processes stopped and namespaces deleted at the end of the test."""
    made = []

    def make():
        wans = TwoWans(tmp_path)
        made.append(wans)
        return wans

    yield make
    for wans in made:
        wans.close()


def wait_carried_by(wans, index, interface, start=0, start_server=0):
    """Link `index` carries the data and the server's replies, its packets from `interface`'s
    address: the client's last line naming a carrier names it, then the server's last
    return-path line does.  The client first: the server names the link of the first HELLO
    even when another link answers first and carries the data until a switch back."""
    name = wans.link(index)
    wait_for_last(wans.client, CARRIER, (name + " carries the traffic", "-> " + name), start=start)
    wait_for_last(wans.server, RETURN_PATH, "link %d (%s:" % (index, SOURCE[interface]), start=start_server)


def growth(before, after, key):
    return {name: after[name][key] - before[name][key] for name in after}


def assert_stream_leaves_by(wans, prefix, interface, other=None):
    """A STREAM_PACKETS x STREAM_SIZE data stream: all of it leaves by `interface`, next to
    nothing (heartbeats) by `other`."""
    names = (interface,) + ((other,) if other else ())
    before = wans.counters(*names)
    wans.app.stream(prefix, STREAM_PACKETS, STREAM_SIZE)
    grew = growth(before, wans.counters(*names), "tx_bytes")
    assert grew[interface] >= STREAM_PACKETS * STREAM_SIZE, grew
    if other:
        assert grew[other] < STREAM_PACKETS * STREAM_SIZE // 10, grew
    return grew


# -- 1. bind_interface ---------------------------------------------------------------


@pytest.mark.parametrize("bound", [True, False], ids=["bind_interface", "control-unbound"])
def test_each_link_leaves_by_its_own_interface(two_wans, bound):
    """Link 0 bound to vethA, link 1 (preferred) to vethB: heartbeats leave by both interfaces,
    the data stream by vethB, and the server sees link 1 from vethB's address.  Unbound
    (the control), both links follow the best route: everything leaves by vethA."""
    wans = two_wans()
    wans.add_wan("vethA")
    wans.add_wan("vethB")
    links = [{"priority": 100}, {}]
    if bound:
        links[0]["bind_interface"], links[1]["bind_interface"] = "vethA", "vethB"
    wans.start(links)
    wans.client.wait_for_line("handshake done")
    wans.client.wait_for_line(wans.link(1) + " up")
    wans.app.probe("first")
    link1_leaves_by = "vethB" if bound else "vethA"
    wait_carried_by(wans, 1, link1_leaves_by)

    # Heartbeats alone (the application is quiet): 10 a second on each link.
    before = wans.counters("vethA", "vethB")
    if bound:
        wait_until(lambda: min(growth(before, wans.counters("vethA", "vethB"), "tx_packets").values()) >= 10,
                   "both interfaces send heartbeats")
    else:
        wait_until(lambda: growth(before, wans.counters("vethA"), "tx_packets")["vethA"] >= 20,
                   "vethA sends both links' heartbeats")
        grew = growth(before, wans.counters("vethA", "vethB"), "tx_packets")
        assert grew["vethB"] <= 2, grew  # nothing routes there (an ARP probe at most)

    other = "vethA" if bound else "vethB"
    grew = assert_stream_leaves_by(wans, "stream", link1_leaves_by, other)
    report("%s: a %d x %d B stream sent %d B on %s, %d B on %s" % (
        "bound" if bound else "unbound", STREAM_PACKETS, STREAM_SIZE, grew[link1_leaves_by], link1_leaves_by,
        grew[other], other))
    assert [p.stop() for p in wans.procs] == [0, 0]


# -- 2. fwmark -----------------------------------------------------------------------


def test_fwmark_link_is_policy_routed(two_wans):
    """The server is routable only in table 100, for packets marked 0x64: the link with
    fwmark "0x64" comes up and carries the data by vethB; the unmarked link to the same
    address gets ENETUNREACH (counted) and stays down."""
    wans = two_wans()
    wans.add_wan("vethA", route=False)
    wans.add_wan("vethB", route=False)
    wans.client_ns.ip("rule", "add", "fwmark", "0x64", "table", "100")
    wans.client_ns.ip("route", "add", SERVER_IP + "/32", "via", WANS["vethB"][3], "dev", "vethB", "table", "100")
    wans.start([{}, {"fwmark": "0x64"}])
    wans.client.wait_for_line("handshake done")
    wans.client.wait_for_line(wans.link(1) + " up")
    wans.client.wait_for_line("%s: [Errno %d]" % (wans.link(0), errno.ENETUNREACH))
    wans.app.probe("marked")
    wait_carried_by(wans, 1, "vethB")
    assert_stream_leaves_by(wans, "marked", "vethB", "vethA")

    status = wait_for_status(wans.score_file, lambda s: s["links"][1]["state"] == "up"
                             and s["counters"].get("link_errors", 0) >= 3, "score_file: link 1 up, link errors")
    assert status["links"][0]["state"] == "down", status["links"][0]
    assert status["links"][1]["via"] == "mark 0x64"
    assert "via" not in status["links"][0]
    assert wans.client.count_lines(wans.link(0) + " up") == 0, wans.client.output()
    assert [p.stop() for p in wans.procs] == [0, 0]


# -- 3. bind_addr --------------------------------------------------------------------


def loopback_alias_or_skip(host):
    try:
        return free_udp_port(host)
    except OSError as exc:
        pytest.skip("cannot bind %s here (Linux routes all of 127/8 to lo): %s" % (host, exc))


def sources_by_link(sink):
    """{link index: {source address}} of the mpudp packets the sink received."""
    found = {}
    for data, source in list(sink.received):
        if len(data) >= mpudp.HEADER_SIZE:
            found.setdefault(mpudp.HEADER.unpack_from(data)[1], set()).add(source[:2])
    return found


def test_bind_addr_packets_come_from_the_bound_address(tmp_path):
    """Links bound to 127.0.0.2 (any port), 127.0.0.3:PORT and, with a host-name remote,
    127.0.0.4: a sink in the server's place sees each link's packets from exactly there."""
    fixed_port = loopback_alias_or_skip("127.0.0.3")
    loopback_alias_or_skip("127.0.0.4")
    sink = EchoServer("127.0.0.1")
    sink.echo = False
    server_keys, client_keys = keypair(), keypair()
    path = write_config(tmp_path, {"mode": "client", "client": {
        "listen_addr": "127.0.0.1:%d" % free_udp_port(),
        "links": [{"remote_addr": sink.text, "bind_addr": "127.0.0.2"},
                  {"remote_addr": sink.text, "bind_addr": "127.0.0.3:%d" % fixed_port},
                  {"remote_addr": "localhost:%d" % sink.address[1], "bind_addr": "127.0.0.4"}],
        "heartbeat_interval_sec": HEARTBEAT_S,
        "client_private_key": client_keys[0], "server_public_key": server_keys[1]}})
    client = MpudpProcess(path)
    try:
        sink.wait_for(lambda _: len(sources_by_link(sink)) == 3)  # HELLOs, retried until answered
        found = sources_by_link(sink)
    finally:
        code = client.stop()
        sink.close()
    assert {host for host, _port in found[0]} == {"127.0.0.2"}, found
    assert found[1] == {("127.0.0.3", fixed_port)}, found
    assert {host for host, _port in found[2]} == {"127.0.0.4"}, found
    assert len(found[0]) == len(found[2]) == 1, found  # one socket per link: one source port
    assert code == 0, client.output()


@needs_ipv6
def test_bind_addr_ipv6_bracketed_and_bare(tmp_path):
    """"[::1]:PORT" binds address and port, a bare "::1" the address."""
    fixed_port = free_udp_port("::1")
    sink = EchoServer("::1")
    sink.echo = False
    server_keys, client_keys = keypair(), keypair()
    path = write_config(tmp_path, {"mode": "client", "client": {
        "listen_addr": "127.0.0.1:%d" % free_udp_port(),
        "links": [{"remote_addr": sink.text, "bind_addr": "[::1]:%d" % fixed_port},
                  {"remote_addr": sink.text, "bind_addr": "::1"}],
        "heartbeat_interval_sec": HEARTBEAT_S,
        "client_private_key": client_keys[0], "server_public_key": server_keys[1]}})
    client = MpudpProcess(path)
    try:
        sink.wait_for(lambda _: len(sources_by_link(sink)) == 2)
        found = sources_by_link(sink)
    finally:
        code = client.stop()
        sink.close()
    assert found[0] == {("::1", fixed_port)}, found
    assert len(found[1]) == 1 and next(iter(found[1]))[0] == "::1", found
    assert code == 0, client.output()


def test_bind_addr_round_trip_through_a_server(tmp_path):
    """End to end: the server's replies find a link bound to 127.0.0.3:PORT, and the server
    names that exact source as the return path."""
    fixed_port = loopback_alias_or_skip("127.0.0.3")
    loopback_alias_or_skip("127.0.0.2")
    echo = EchoServer("127.0.0.1")
    server_keys, client_keys = keypair(), keypair()
    server_port, client_port = free_udp_port(), free_udp_port()
    server = MpudpProcess(write_config(tmp_path, {"mode": "server", "server": {
        "listen_addr": "127.0.0.1:%d" % server_port, "upstream_addr": echo.text,
        "server_private_key": server_keys[0], "client_public_keys": [client_keys[1]]}}, "server.json"))
    client = None
    app = App(("127.0.0.1", client_port))
    try:
        server.wait_for_line("server listening on")
        remote = "127.0.0.1:%d" % server_port
        client = MpudpProcess(write_config(tmp_path, {"mode": "client", "client": {
            "listen_addr": "127.0.0.1:%d" % client_port,
            "links": [{"remote_addr": remote, "bind_addr": "127.0.0.2", "priority": 100},
                      {"remote_addr": remote, "bind_addr": "127.0.0.3:%d" % fixed_port}],
            "heartbeat_interval_sec": HEARTBEAT_S,
            "client_private_key": client_keys[0], "server_public_key": server_keys[1]}}, "client.json"))
        client.wait_for_line("handshake done")
        client.wait_for_line("link 1 (%s) up" % remote)
        app.probe("bound")
        wait_for_last(server, RETURN_PATH, "link 1 (127.0.0.3:%d)" % fixed_port)
        app.probe("bound-again")
        assert all("(127.0.0.1:" not in line for line in server.lines if any(m in line for m in RETURN_PATH)), \
            server.output()
    finally:
        codes = [p.stop() for p in (client, server) if p is not None]
        app.close()
        echo.close()
    assert codes == [0, 0]


# -- 4. no permission ----------------------------------------------------------------

MARK_PROBE = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
              "s.setsockopt(socket.SOL_SOCKET, %d, 100)" % mpudp.SO_MARK)


def without_mark_permission():
    """A command prefix under which SO_MARK fails with EPERM, or None.  Linux 5.17 and later
    let CAP_NET_RAW set marks too, so both capabilities go (from the bounding set: root
    keeps its files, so the config stays readable)."""
    if not sys.platform.startswith("linux"):
        return None
    candidates = [[]]  # not root: nothing to drop
    if shutil.which("setpriv"):
        candidates.append(["setpriv", "--bounding-set=-net_admin,-net_raw", "--inh-caps=-net_admin,-net_raw", "--"])
    if shutil.which("capsh"):
        candidates.append(["capsh", "--drop=cap_net_admin,cap_net_raw", "--", "-c", 'exec "$0" "$@"'])
    for prefix in candidates:
        try:
            probe = subprocess.run(prefix + [sys.executable, "-c", MARK_PROBE], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, universal_newlines=True, timeout=WAIT_S)
        except OSError:
            continue
        if probe.returncode != 0 and "PermissionError" in probe.stderr:
            return prefix
    return None


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["address", "host-name"])
def test_fwmark_without_permission_stops_the_start(tmp_path, host):
    """One line naming the link, the option and the capability; exit status 1.  A host-name
    remote is not resolved yet at start: its options are tried on a throw-away socket."""
    prefix = without_mark_permission()
    if prefix is None:
        pytest.skip("cannot run a process without CAP_NET_ADMIN and CAP_NET_RAW here (setpriv, capsh)")
    server_keys, client_keys = keypair(), keypair()
    remote = "%s:%d" % (host, free_udp_port())
    path = write_config(tmp_path, {"mode": "client", "client": {
        "listen_addr": "127.0.0.1:%d" % free_udp_port(),
        "links": [{"remote_addr": remote}, {"remote_addr": remote, "fwmark": "0x64"}],
        "client_private_key": client_keys[0], "server_public_key": server_keys[1]}})
    done = subprocess.run(prefix + [sys.executable, MPUDP, "-config=%s" % path], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=WAIT_S, cwd=ROOT)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    failed = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert len(failed) == 1, done.stderr
    assert " ERROR " in failed[0], failed
    assert failed[0].endswith("cannot start: link 1 (%s): fwmark 0x64: Operation not permitted "
                              "(SO_MARK needs CAP_NET_ADMIN, or CAP_NET_RAW since Linux 5.17)" % remote), failed


# -- 5. an interface that goes away, or is not there yet ------------------------------


def test_interface_deleted_and_made_again(two_wans):
    """vethB is deleted under the active link 1: the link goes down at once and traffic
    moves to link 0 (vethA); vethB made again (a new index): link 1 gets a new socket,
    comes up, and the data leaves by the new vethB."""
    wans = two_wans()
    wans.add_wan("vethA")
    wans.add_wan("vethB")
    wans.start([{"bind_interface": "vethA", "priority": 100}, {"bind_interface": "vethB"}])
    wans.client.wait_for_line("handshake done")
    wans.client.wait_for_line(wans.link(1) + " up")
    wans.app.probe("before")
    wait_carried_by(wans, 1, "vethB")
    old_index = int(wans.client_ns.run("cat", "/sys/class/net/vethB/ifindex"))

    mark, mark_server = len(wans.client.lines), len(wans.server.lines)
    deleted = time.monotonic()
    wans.client_ns.ip("link", "del", "vethB")
    wans.app.probe("gone", interval=0.02)
    resumed_s = time.monotonic() - deleted
    lost = wans.client.lines[wans.client.wait_for_line("the link is down until it is back", start=mark)]
    # The heartbeat-interval check says "went away"; a send that came first says ENODEV.
    assert (wans.link(1) + ": interface vethB went away;" in lost
            or wans.link(1) + ": No such device (vethB);" in lost), lost
    wans.client.wait_for_line("switch %s -> %s" % (wans.link(1), wans.link(0)), start=mark)
    wans.server.wait_for_line("replies now go by link 0 (%s:" % SOURCE["vethA"], start=mark_server)
    assert_stream_leaves_by(wans, "failed-over", "vethA")
    status = wait_for_status(wans.score_file, lambda s: s["links"][1].get("waiting"), "score_file: link 1 waiting")
    assert "vethB" in status["links"][1]["waiting"] and status["links"][1]["state"] == "down", status["links"][1]
    report("vethB deleted under the active link: traffic resumed on vethA after %.0f ms (%s)" % (
        resumed_s * 1000, lost.split(": ", 1)[1] if ": " in lost else lost))

    mark, mark_server = len(wans.client.lines), len(wans.server.lines)
    made = time.monotonic()
    wans.add_wan("vethB")
    new_index = int(wans.client_ns.run("cat", "/sys/class/net/vethB/ifindex"))
    assert new_index != old_index
    wans.client.wait_for_line(wans.link(1) + ": its socket is ready again", start=mark)
    wans.client.wait_for_line(wans.link(1) + " up", start=mark)
    up_s = time.monotonic() - made
    wait_carried_by(wans, 1, "vethB", start=mark, start_server=mark_server)
    back_s = time.monotonic() - made
    assert_stream_leaves_by(wans, "back", "vethB", "vethA")
    report("vethB made again: link 1 up after %.0f ms, carrying traffic again after %.0f ms" % (
        up_s * 1000, back_s * 1000))
    assert [p.stop() for p in wans.procs] == [0, 0]


def test_interface_made_again_between_two_checks_in_process(tmp_path):
    """ppp0 style: the interface is deleted and made again (same name, new index) between two
    heartbeat-interval checks.  The old socket can never send again (ENODEV), so the check
    compares indexes: the link loses its socket at the first check and gets a new one, bound
    to the new interface, at the next.  A real Client in this process, inside a namespace,
    stepped by hand (no send comes first, so the index check is what acts)."""
    ns = NetNs("mw-inproc")
    try:
        def scenario():
            ns.add_veth("ppp9", "10.211.3.1/24", ns, "peer9", "10.211.3.2/24")
            harness = InProcess(clock=FakeClock())
            try:
                client = harness.add_client([{"remote_addr": "10.211.3.2:9", "bind_interface": "ppp9"}],
                                            heartbeat_interval_sec=HEARTBEAT_S)
                link = client.links[0]
                old_sock, old_index = link.sock, link.ifindex
                assert old_sock is not None and old_index == socket.if_nametoindex("ppp9")
                ns.ip("link", "del", "ppp9")
                ns.add_veth("ppp9", "10.211.3.1/24", ns, "peer9", "10.211.3.2/24")
                new_index = socket.if_nametoindex("ppp9")
                assert new_index != old_index
                with pytest.raises(OSError) as info:  # what the old socket gets now
                    old_sock.sendto(b"x", ("10.211.3.2", 9))
                assert info.value.errno == errno.ENODEV

                client.evaluate()  # the heartbeat-interval check: a new index
                assert link.sock is None and link.waiting == "interface ppp9 went away", harness.log_text()
                assert old_sock.fileno() == -1  # closed
                assert "link 0 (10.211.3.2:9): interface ppp9 went away; the link is down until it is back" \
                    in harness.log_text()
                assert client.status()["links"][0]["waiting"] == "interface ppp9 went away"

                client.evaluate()  # the next check: made again, on the new interface
                assert link.sock is not None and link.ifindex == new_index and link.waiting == ""
                assert link.sock.getsockopt(socket.SOL_SOCKET, mpudp.SO_BINDTODEVICE, 16).rstrip(b"\0") == b"ppp9"
                link.sock.sendto(b"x", ("10.211.3.2", 9))  # no ENODEV: the new socket can send
                assert ("link 0 (10.211.3.2:9): its socket is ready again (interface ppp9 went away was the "
                        "trouble)") in harness.log_text()
                assert "waiting" not in client.status()["links"][0]
            finally:
                harness.close()

        ns.inside(scenario)
    finally:
        ns.close()


SOURCE_TABLE = "102"  # `ip rule add from 10.211.2.1 table 102`: a bind_addr link's uplink


def add_source_rule(wans):
    """Packets from vethB's address leave by vethB (a bound source address alone does not pick
    the uplink: Linux routes by destination, from whichever address)."""
    wans.client_ns.ip("rule", "add", "from", SOURCE["vethB"], "table", SOURCE_TABLE)


def add_source_route(wans):
    wans.client_ns.ip("route", "replace", SERVER_IP + "/32", "via", WANS["vethB"][3], "dev", "vethB",
                      "table", SOURCE_TABLE)


@pytest.mark.parametrize("option, value, trouble", [
    ("bind_interface", "vethB", "bind_interface vethB: No such device"),
    ("bind_addr", SOURCE["vethB"], "bind_addr %s: Cannot assign requested address" % SOURCE["vethB"]),
])
def test_interface_or_address_not_there_at_start(two_wans, option, trouble, value):
    """Link 1 bound to vethB or its address, neither there yet: a warning, not a failure; the
    client runs on link 0; once vethB is made, link 1 gets its socket, comes up and takes over."""
    wans = two_wans()
    wans.add_wan("vethA")
    add_source_rule(wans)
    wans.start([{"bind_interface": "vethA", "priority": 100}, {option: value}])
    wans.client.wait_for_line(wans.link(1) + ": %s; the link is down until that changes" % trouble)
    wans.client.wait_for_line("handshake done")
    wans.app.probe("one-link")
    status = wait_for_status(wans.score_file, lambda s: s["links"][0]["state"] == "up",
                             "score_file: link 0 up")
    assert status["links"][1].get("waiting") == trouble, status["links"][1]
    assert status["links"][1]["via"] == ("dev " if option == "bind_interface" else "from ") + value
    assert wans.client.count_lines(trouble) == 1, wans.client.output()  # said once, not at every retry

    mark, mark_server = len(wans.client.lines), len(wans.server.lines)
    wans.add_wan("vethB")
    add_source_route(wans)
    wans.client.wait_for_line(wans.link(1) + ": its socket is ready again", start=mark)
    wans.client.wait_for_line(wans.link(1) + " up", start=mark)
    wait_carried_by(wans, 1, "vethB", start=mark, start_server=mark_server)
    assert_stream_leaves_by(wans, "late", "vethB", "vethA")
    assert [p.stop() for p in wans.procs] == [0, 0]


def test_bind_addr_picks_the_source_and_a_rule_the_uplink(two_wans):
    """Link 1 bound to vethB's address: without a rule its packets leave by the best route
    (vethA) from that address; with `ip rule add from ADDR table 102` by vethB.  The address
    removed: sendto says ENETUNREACH, the link goes down at once and traffic moves to link 0;
    the address back, the same socket works again."""
    wans = two_wans()
    wans.add_wan("vethA")
    wans.add_wan("vethB")
    wans.start([{"bind_interface": "vethA", "priority": 100}, {"bind_addr": SOURCE["vethB"]}])
    wans.client.wait_for_line("handshake done")
    wans.client.wait_for_line(wans.link(1) + " up")
    wans.app.probe("first")
    wait_carried_by(wans, 1, "vethB")
    assert_stream_leaves_by(wans, "no-rule", "vethA")
    add_source_rule(wans)
    add_source_route(wans)
    assert_stream_leaves_by(wans, "rule", "vethB", "vethA")

    mark, mark_server = len(wans.client.lines), len(wans.server.lines)
    removed = time.monotonic()
    wans.client_ns.ip("addr", "del", WANS["vethB"][0], "dev", "vethB")  # its routes go with it
    wans.app.probe("address-gone", interval=0.02)
    resumed_s = time.monotonic() - removed
    wans.client.wait_for_line("switch %s -> %s" % (wans.link(1), wans.link(0)), start=mark)
    wans.server.wait_for_line("replies now go by link 0 (%s:" % SOURCE["vethA"], start=mark_server)
    assert wans.client.count_lines("%s: [Errno %d] Network is unreachable; down until its heartbeats are "
                                   "answered again" % (wans.link(1), errno.ENETUNREACH)) == 1
    assert not any("missed heartbeats" in line for line in wans.client.lines[mark:]), wans.client.lines[mark:]
    report("bind_addr's address removed: traffic resumed on link 0 after %.0f ms (%s)" % (
        resumed_s * 1000, "; ".join(line.split(None, 3)[3] for line in wans.client.lines[mark:]
                                    if wans.link(1) in line and "switch" not in line)))

    mark, mark_server = len(wans.client.lines), len(wans.server.lines)
    wans.client_ns.ip("addr", "add", WANS["vethB"][0], "dev", "vethB")
    add_source_route(wans)
    wans.client.wait_for_line(wans.link(1) + " up", start=mark)
    wait_carried_by(wans, 1, "vethB", start=mark, start_server=mark_server)
    assert_stream_leaves_by(wans, "address-back", "vethB", "vethA")
    assert [p.stop() for p in wans.procs] == [0, 0]


# -- 6. config -----------------------------------------------------------------------

KEYS = keypair(), keypair()


def client_config(*links):
    return {"mode": "client", "client": {
        "listen_addr": "127.0.0.1:8999",
        "links": [dict({"remote_addr": "10.0.0.1:5000"}, **links[0]),
                  dict({"remote_addr": "10.0.0.2:5000"}, **links[1])],
        "client_private_key": KEYS[0][0], "server_public_key": KEYS[1][1]}}


@pytest.mark.parametrize("link, key", [
    ({"fwmark": "0xZZ"}, "fwmark"),
    ({"fwmark": -1}, "fwmark"),
    ({"fwmark": 2 ** 32}, "fwmark"),
    ({"fwmark": "0x100000000"}, "fwmark"),
    ({"fwmark": 1.5}, "fwmark"),
    ({"bind_addr": "not-an-ip"}, "bind_addr"),
    ({"bind_addr": "10.0.0.9:notaport"}, "bind_addr"),
    ({"bind_addr": "::1"}, "bind_addr"),  # IPv6 source, IPv4 remote_addr
    ({"bind_addr": "10.0.0.9", "remote_addr": "[2001:db8::1]:5000"}, "bind_addr"),
    ({"bind_addr": 7}, "bind_addr"),
    ({"bind_interface": "a" * 16}, "bind_interface"),
    ({"bind_interface": "\u00e9" * 8}, "bind_interface"),  # 8 characters, 16 bytes
    ({"bind_interface": "eth 1"}, "bind_interface"),
    ({"bind_interface": "a/b"}, "bind_interface"),
], ids=lambda value: repr(value) if not isinstance(value, str) else value)
def test_config_error_names_the_key(link, key):
    with pytest.raises(mpudp.ConfigError) as info:
        mpudp.parse_config(client_config({}, link))
    lines = str(info.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith("client.links[1].%s: " % key), lines


def test_config_good_values():
    config = mpudp.parse_config(client_config(
        {"bind_interface": "a" * 15, "fwmark": 100, "bind_addr": "10.0.0.9:40000"},
        {"fwmark": "0x64", "bind_addr": "[2001:db8::7]:40000", "remote_addr": "[2001:db8::1]:5000"}))
    first, second = config.section.links
    assert (first.bind_interface, first.fwmark) == ("a" * 15, 100)
    assert first.bind_addr == ("10.0.0.9:40000", socket.AF_INET, ("10.0.0.9", 40000))
    assert second.fwmark == 0x64
    assert second.bind_addr[1] == socket.AF_INET6 and second.bind_addr[2][:2] == ("2001:db8::7", 40000)
    bare = mpudp.parse_config(client_config({}, {"bind_addr": "2001:db8::7", "remote_addr": "[2001:db8::1]:5000",
                                                 "fwmark": "0xffffffff"})).section.links[1]
    assert bare.bind_addr[2][:2] == ("2001:db8::7", 0) and bare.fwmark == 0xFFFFFFFF


def test_config_host_name_remote_takes_either_family_of_bind_addr():
    """Only a numeric remote_addr can disagree with bind_addr; a host name is looked up in
    bind_addr's family."""
    for bind in ("10.0.0.9", "[2001:db8::7]:0"):
        config = mpudp.parse_config(client_config({}, {"remote_addr": "vpn.example.net:5000", "bind_addr": bind}))
        assert config.section.links[1].bind_addr[0] == bind


def cli(*args):
    return subprocess.run([sys.executable, MPUDP] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, cwd=ROOT, timeout=WAIT_S)


def test_cli_check_describes_and_refuses(tmp_path):
    good = write_config(tmp_path, client_config(
        {}, {"bind_interface": "veth1", "fwmark": "0x64", "bind_addr": "10.0.0.9"}), "good.json")
    result = cli("-config=%s" % good, "--check")
    assert result.returncode == 0, result.stderr
    assert "links[0]: 10.0.0.1:5000, priority 0" in result.stdout.splitlines()
    assert "links[1]: 10.0.0.2:5000, priority 0, dev veth1 mark 0x64 from 10.0.0.9" in result.stdout.splitlines()

    bad = write_config(tmp_path, client_config({"fwmark": -1}, {"bind_interface": "x" * 16}), "bad.json")
    result = cli("-config=%s" % bad, "--check")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(": ")[2] for line in lines] == ["client.links[0].fwmark", "client.links[1].bind_interface"], \
        lines
    assert all(line.startswith("mpudp: config error: ") for line in lines), lines


# -- 7. a reload that changes a link's socket options ---------------------------------
#
# A reload matches links by (remote_addr, socket options): a link whose bind_interface,
# bind_addr or fwmark changed is an old link removed and a new one added (a new socket),
# a link whose options did not change keeps its socket.  Loopback aliases stand for the
# uplinks' addresses, as in section 3.

REFUSED = "reload refused, the running config stays: "


def send_sighup(process, wanted):
    """SIGHUP, then the index of the first line containing `wanted` after it."""
    mark = len(process.lines)
    process.proc.send_signal(signal.SIGHUP)
    return process.wait_for_line(wanted, start=mark)


def server_return_path(server, link=0, timeout=WAIT_S):
    """(host, port) the server sends link `link`'s replies to, from the table it logs on
    SIGUSR1.  The signal is handled after every packet that reached the server before it,
    so the table shows the address of the newest packet the test has seen answered."""
    pattern = re.compile(r"\blink %d (\d+\.\d+\.\d+\.\d+):(\d+)\b" % link)  # not "link 0 (ADDR)"
    mark = len(server.lines)
    server.proc.send_signal(signal.SIGUSR1)

    def found():
        for line in server.lines[mark:]:
            match = pattern.search(line)
            if match:
                return match.group(1), int(match.group(2))
        return None

    with server.cond:
        server.cond.wait_for(lambda: found() is not None, timeout)
        path = found()
    assert path is not None, "no return path of link %d in the server's SIGUSR1 table; output:\n%s" % (
        link, "\n".join(server.lines[mark:]))
    return path


def udp_address_in_use(address):
    """True if a UDP socket is bound to `address` (host, port): binding it again fails.  Link
    sockets do not set SO_REUSEADDR, so this tells whether a link's socket is still open."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            return True
    return False


class BoundClient:
    """An echo upstream, a server on 127.0.0.1 and a client (HEARTBEAT_S) whose links go to
    the server from loopback aliases; an App talks to the client.  Everything it makes is
    handed to `cleanup` as it is made."""

    def __init__(self, tmp_path, cleanup, links):
        self.echo = EchoServer("127.0.0.1")
        cleanup(self.echo.close)
        server_keys, client_keys = keypair(), keypair()
        server_port, client_port = free_udp_port(), free_udp_port()
        self.server = MpudpProcess(write_config(tmp_path, {"mode": "server", "server": {
            "listen_addr": "127.0.0.1:%d" % server_port, "upstream_addr": self.echo.text,
            "server_private_key": server_keys[0], "client_public_keys": [client_keys[1]]}}, "server.json"))
        cleanup(self.server.stop)
        self.app = App(("127.0.0.1", client_port))
        cleanup(self.app.close)
        self.server.wait_for_line("server listening on")
        self.remote = "127.0.0.1:%d" % server_port
        self.client_cfg = {
            "listen_addr": "127.0.0.1:%d" % client_port,
            "links": [dict({"remote_addr": self.remote}, **link) for link in links],
            "heartbeat_interval_sec": HEARTBEAT_S,
            "client_private_key": client_keys[0], "server_public_key": server_keys[1]}
        self.client_path = write_config(tmp_path, {"mode": "client", "client": self.client_cfg}, "client.json")
        self.client = MpudpProcess(self.client_path)
        cleanup(self.client.stop)
        self.client.wait_for_line("running as")  # its SIGHUP handler is in place
        self.client.wait_for_line("handshake done")

    def link(self, index):
        return "link %d (%s)" % (index, self.remote)

    def rewrite(self, links):
        """The client's config file with these links (the rest unchanged), for a SIGHUP."""
        cfg = dict(self.client_cfg, links=[dict({"remote_addr": self.remote}, **link) for link in links])
        write_config(os.path.dirname(self.client_path), {"mode": "client", "client": cfg},
                     os.path.basename(self.client_path))

    def upstream_sources(self, prefix):
        """Where the upstream got the App's payloads `prefix:N` from (the server's session socket)."""
        with self.echo.cond:
            return {source for data, source in self.echo.received if data.startswith(prefix.encode() + b":")}


@pytest.fixture
def bound_client(tmp_path, cleanup):
    """A factory for BoundClient; its processes and sockets are closed at the end of the test."""
    return lambda links: BoundClient(tmp_path, cleanup, links)


@pytest.mark.parametrize("new_link, replaced", [
    ({"bind_addr": "127.0.0.3"}, True),
    ({"bind_addr": "127.0.0.2", "priority": 10}, False),  # the control: options unchanged
], ids=["bind_addr-changed", "options-unchanged"])
def test_reload_rebinds_a_link_whose_bind_addr_changed(bound_client, new_link, replaced):
    """The client's one link, bound to 127.0.0.2, carries the App's traffic; the config is
    rewritten and SIGHUP sent.  bind_addr 127.0.0.3: the link is removed and added again
    (a new socket), the server now gets its packets, and sends the replies, from 127.0.0.3,
    and the App's session goes on through the same server-side socket.  The control changes
    the link's priority only: it keeps its socket, the server sees the same address and port."""
    loopback_alias_or_skip("127.0.0.2")
    loopback_alias_or_skip("127.0.0.3")
    pair = bound_client([{"bind_addr": "127.0.0.2"}])
    pair.app.probe("before")
    wait_for_last(pair.server, RETURN_PATH, "link 0 (127.0.0.2:")
    before = server_return_path(pair.server)
    assert before[0] == "127.0.0.2", before
    via_server = pair.upstream_sources("before")
    assert len(via_server) == 1 and next(iter(via_server))[0] == "127.0.0.1", via_server

    pair.rewrite([new_link])
    mark, mark_server = len(pair.client.lines), len(pair.server.lines)
    send_sighup(pair.client, "config reloaded from %s" % pair.client_path)
    # The link's socket was closed (or kept) before that line: the port is free (or not).
    assert udp_address_in_use(before) is not replaced, "the link's old socket %r is %s after the reload" % (
        before, "still open" if replaced else "closed")
    back_s = pair.app.probe("after")  # resent until echoed: the new link may take a few heartbeats
    after = server_return_path(pair.server)
    if replaced:
        wait_for_last(pair.server, RETURN_PATH, "link 0 (127.0.0.3:", start=mark_server)
        assert after[0] == "127.0.0.3", (before, after)
        pair.app.probe("settled")  # and again, once the server has moved to the new address
        assert server_return_path(pair.server) == after
        report("bind_addr of the only link changed by SIGHUP: traffic back after %.1f ms" % (back_s * 1000))
    else:
        assert after == before, "the link's socket was not kept: %r -> %r" % (before, after)
    assert pair.upstream_sources("after") == via_server  # the same session, through the server

    reload_lines = [line for line in pair.client.lines[mark:] if "reload" in line]
    expected = ["reload: %s added: from 127.0.0.3" % pair.link(0),
                "reload: %s removed: from 127.0.0.2" % pair.link(0)] if replaced else []
    assert [line.split(" INFO  ", 1)[-1] for line in reload_lines] == expected + [
        "config reloaded from %s" % pair.client_path], reload_lines
    assert [p.stop() for p in (pair.client, pair.server)] == [0, 0]


def test_reload_keeps_an_unchanged_link_and_rebinds_a_changed_one(tmp_path, cleanup):
    """Two links to a sink in the server's place (the client sends HELLOs on both, every
    heartbeat interval): link 0 on 127.0.0.2, link 1 on 127.0.0.3.  One reload changes link 0's
    priority and link 1's bind_addr (to 127.0.0.4): link 0's packets still come from the same
    address and port, link 1's only from 127.0.0.4 once the first one has."""
    for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        loopback_alias_or_skip(host)
    sink = EchoServer("127.0.0.1")
    sink.echo = False
    cleanup(sink.close)
    server_keys, client_keys = keypair(), keypair()
    cfg = {"listen_addr": "127.0.0.1:%d" % free_udp_port(),
           "links": [{"remote_addr": sink.text, "bind_addr": "127.0.0.2"},
                     {"remote_addr": sink.text, "bind_addr": "127.0.0.3"}],
           "heartbeat_interval_sec": HEARTBEAT_S,
           "client_private_key": client_keys[0], "server_public_key": server_keys[1]}
    path = write_config(tmp_path, {"mode": "client", "client": cfg})
    client = MpudpProcess(path)
    cleanup(client.stop)
    client.wait_for_line("running as")
    assert sink.wait_for(lambda _: len(sources_by_link(sink)) == 2), sources_by_link(sink)
    before = sources_by_link(sink)
    assert [{host for host, _port in before[i]} for i in (0, 1)] == [{"127.0.0.2"}, {"127.0.0.3"}], before
    assert len(before[0]) == len(before[1]) == 1, before

    def packets_since(start):
        """[(link, source)] of the packets the sink received from index `start` on."""
        return [(mpudp.HEADER.unpack_from(data)[1], source[:2])
                for data, source in sink.received[start:] if len(data) >= mpudp.HEADER_SIZE]

    cfg["links"] = [dict(cfg["links"][0], priority=10), dict(cfg["links"][1], bind_addr="127.0.0.4")]
    write_config(tmp_path, {"mode": "client", "client": cfg})
    mark = len(client.lines)
    send_sighup(client, "config reloaded from %s" % path)
    old_link0, old_link1 = next(iter(before[0])), next(iter(before[1]))
    assert udp_address_in_use(old_link0), "link 0's socket was closed by the reload"
    assert not udp_address_in_use(old_link1), "the replaced link 1's socket is still open"
    # The sink may still hold a packet the old link 1 sent before the reload: from the first
    # one from the new address on, every packet of link 1 must come from there.
    assert sink.wait_for(lambda _: any(link == 1 and source[0] == "127.0.0.4" for link, source in packets_since(0)))
    first_new = next(i for i, (link, source) in enumerate(packets_since(0)) if link == 1 and source[0] == "127.0.0.4")
    assert sink.wait_for(lambda _: min(sum(1 for link, _s in packets_since(first_new) if link == i)
                                       for i in (0, 1)) >= 5), packets_since(first_new)
    later = packets_since(first_new)
    assert {source for link, source in later if link == 1} == {later[0][1]}, later  # one new socket
    assert sources_by_link(sink)[0] == before[0], "link 0 lost its socket: %r" % sources_by_link(sink)
    reload_lines = [line.split(" INFO  ", 1)[-1] for line in client.lines[mark:] if "reload" in line]
    assert reload_lines == ["reload: link 1 (%s) added: from 127.0.0.4" % sink.text,
                            "reload: link 1 (%s) removed: from 127.0.0.3" % sink.text,
                            "config reloaded from %s" % path], reload_lines
    assert client.stop() == 0


def test_reload_with_an_invalid_bind_addr_is_refused(bound_client):
    """A bind_addr that is not an address, or not of remote_addr's family: the reload is refused
    with one line naming the key, and the link goes on with its socket (the same source address
    and port at the server), carrying the App's traffic."""
    loopback_alias_or_skip("127.0.0.2")
    pair = bound_client([{"bind_addr": "127.0.0.2"}])
    pair.app.probe("before")
    wait_for_last(pair.server, RETURN_PATH, "link 0 (127.0.0.2:")
    before = server_return_path(pair.server)
    for bad, why in [("not-an-ip", "'not-an-ip': needs an IP address of this host"),
                     ("::1", "'::1' is IPv6 but remote_addr %r is IPv4" % pair.remote)]:
        pair.rewrite([{"bind_addr": bad}])
        mark = len(pair.client.lines)
        refused = send_sighup(pair.client, REFUSED)
        assert " ERROR " in pair.client.lines[refused], pair.client.lines[refused]
        assert pair.client.lines[refused].split(REFUSED, 1)[1].startswith(
            "client.links[0].bind_addr: " + why), pair.client.lines[refused]
        assert udp_address_in_use(before), "the refused reload closed the link's socket"
        pair.app.probe("after " + bad)
        assert server_return_path(pair.server) == before
        assert [line for line in pair.client.lines[mark:] if "reload" in line] == [pair.client.lines[refused]]
    assert pair.client.count_lines("config reloaded") == 0
    assert [p.stop() for p in (pair.client, pair.server)] == [0, 0]
