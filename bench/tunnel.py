#!/usr/bin/env python3
"""TCP and UDP inside a WireGuard tunnel through the relay, in network namespaces, links shaped.

    sudo python3 bench/tunnel.py                          # every scenario, 3 repetitions (about 20 minutes)
    sudo python3 bench/tunnel.py --quick --scenario unshaped --scenario equal --paths direct,mpudp
    sudo python3 bench/tunnel.py --go /work/go-original   # also the Go original
    python3 bench/tunnel.py --show PATH.json              # the table of a saved result

Root on Linux; iproute2 (`ip netns`, veth, `tc` with htb), wireguard-go, wg and
iperf3.  Standard library only, Python 3.7+.  Progress goes to stderr; stdout
holds only the table (or the JSON with --json).

What it builds, per scenario
----------------------------
Two network namespaces, made for the run (names carry the pid) and deleted in
a ``finally``, also on Ctrl-C; every child process (wireguard-go, iperf3, the
relays, the link emulator) has its own process group and PR_SET_PDEATHSIG
(harness.Child), so nothing outlives the bench::

    client namespace                                       server namespace
    iperf3 -c                                              iperf3 -s -B 10.77.0.2
      |                                                      ^
    wg 10.77.0.1 (wireguard-go)                            wg 10.77.0.2 (wireguard-go, :51820)
      | UDP to 127.0.0.1:6001 / :6002 / :6003                ^ UDP from 127.0.0.1
    relay client: mpudp / mpudp "aggregate" / Go           relay server :5001 / :5002 / :5003
      | link 0: c0 10.201.0.1 ==== veth, htb ==== s0 10.201.0.2 ^
      | link 1: c1 10.201.1.1 ==== veth, htb ==== s1 10.201.1.2 ^
      |   (delay: link 1 through tests/linkemu.py on 127.0.0.1, in front of c1)
    direct: wg --> 10.201.0.2:51820 over link 0 alone, no relay

Every relay pair runs all the time (idle pairs send only heartbeats); a path is
chosen by pointing the client WireGuard's peer endpoint at it (``wg set ...
endpoint``); the server WireGuard follows the first authenticated packet from
the new path (roaming).  Before each measurement a TCP connect to a closed port
of 10.77.0.2 must come back refused (an RST through the tunnel): the path
carries traffic both ways.

MTU.  Every path uses WireGuard MTU 1408 = 1500 (veth) - 20 (outer IPv4) - 8
(UDP) - 32 (mpudp) - 32 (WireGuard: 16 header + 16 tag); the inner IP header is
inside the 1408, so TCP's MSS is 1368.  A full packet is a 1500-byte datagram on
a relay's link and 1468 on the direct path (the Go original adds 1 byte: 1469);
nothing is fragmented.  The direct path keeps 1408 too, so every path carries
the same packets.

Shaping.  A link with a rate gets, on the egress of both veth ends (so both
directions): htb root, one class of rate = ceil = the link's rate, burst = cburst
= 2 ms at that rate (at least 2 full frames), quantum 1514, and a bfifo of 50 ms
at that rate as its queue (125 kB at 20 Mbit/s); htb counts Ethernet frames.
Extra one-way delay comes from tests/linkemu.py (a userspace UDP proxy) in the
client namespace, in front of the link: client link -> 127.0.0.1:port ->
emulator -> server's veth address, 15 ms each way.  linkemu accepts loopback
addresses only (a guard for the test suite); its process here widens that check,
and binds its upstream sockets to the wildcard address so the kernel picks the
veth's source address.

TCP.  The iperf3 senders use cubic (``--congestion``), what Linux, Windows and
macOS send with unless told otherwise, rather than whatever this machine's
net.ipv4.tcp_congestion_control says (the namespaces inherit it).  It matters
with links of unequal delay: BBR sizes its window by the least round trip of
the last 10 s, and a flow that started on the fast link keeps that one.

Blackhole.  The link's queue (the htb leaf) on both veth ends is replaced by a
``pfifo limit 0``: every packet is dropped inside the qdisc, silently: sendto()
still succeeds (none of the relays or wireguard-go sets IP_RECVERR) and the
interface, its address and its route stay up, as when a path dies somewhere
beyond the first hop.  ``ip link set down`` would not do: the route goes and
every send fails at once with ENETUNREACH, a signal a real dead path never
gives; the kernel here has no tc actions (act_gact) for a "drop" filter.

Method
------
Paths (--paths): ``direct`` (WireGuard over link 0 alone), ``go`` (the Go
original's client and server, with --go; all links; active-backup), ``mpudp``
(active-backup, all links, heartbeat_interval_sec 0.5) and ``mpudp-aggregate``
(the same pair with ``"aggregate": true`` in the client).  If mpudp.py does not
know the key (``--check`` exits 2 or warns "aggregate: unknown key") the column
says "not supported by this mpudp.py" and the pair is not started.

Each measurement runs once per path back to back within a repetition, in
--paths order, backwards in odd repetitions (as bench.py); every figure is the
median of --repeat runs [min-max]; agg/ab = mpudp-aggregate / mpudp of the same
repetition, then their median.

- TCP up / down: ``iperf3 -J -t SECONDS -O 1`` (-R for down); Mbit/s is the
  receiver's ``end.sum_received`` (the omitted first second left out).  Relay
  CPU ms/MB: CPU time of the path's client + server (/proc, all threads) from
  iperf3's start to its end, divided by the MB of every interval, omitted
  included.
- UDP (udp): ``iperf3 -u -b 1.8 x link 0's rate -l 1200 -t SECONDS``; delivered
  % = 100 - the receiver's lost_percent; out-of-order % = its out_of_order count
  / the datagrams sent.
- blackhole: ``iperf3 -R -t 10 -i 0.1 -J`` (the client is the receiver); at 4 s
  the link that carried the most bytes in the last second (link 0 unless an
  earlier failover moved the data) is blackholed both ways until the end.  Gap =
  the longest run of 0.1 s intervals that delivered nothing (to the interval,
  and including TCP's retransmission back-off after the relay switched);
  total = MB delivered.  Not for ``direct`` (one link: it never comes back).
  The link is restored after each run and given 3 s to become steady again.
- lowrate: ``iperf3 -u -b 160K -l 200 -t 10``: 100 datagrams of 200 B a second;
  relay CPU us per delivered datagram (heartbeats and timers included), and
  delivered %.  Relay paths only.
--quick: TCP and UDP 3 s, lowrate 4 s, blackhole 6 s at 2 s, one repetition.
"""

import argparse
import collections
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import harness  # noqa: E402
import procfs  # noqa: E402
import report  # noqa: E402
from harness import BenchError, Child, Kids, progress, write_config  # noqa: E402
from params import GO_CLIENT_CONFIG, GO_SERVER_CONFIG, MPUDP, RELAY_CONFIG, TESTS  # noqa: E402
from summary import ratio, spread  # noqa: E402

# ============================================================================
# Constants
# ============================================================================

DIRECT, GO, AB, AGG = "direct", "go", "mpudp", "mpudp-aggregate"
PATHS = (DIRECT, GO, AB, AGG)
RELAYS = (GO, AB, AGG)
SERVER_PORTS = {AB: 5001, AGG: 5002, GO: 5003}  # the relay servers' listen ports (server ns)
CLIENT_PORTS = {AB: 6001, AGG: 6002, GO: 6003}  # the relay clients' listen ports (client ns, 127.0.0.1)

VETH_MTU = 1500
IPV4_UDP_HEADERS = 28
MPUDP_OVERHEAD = 32
WIREGUARD_OVERHEAD = 32
WG_MTU = VETH_MTU - IPV4_UDP_HEADERS - MPUDP_OVERHEAD - WIREGUARD_OVERHEAD  # 1408
WG_PORT = 51820  # both WireGuards' listen port, each in its own namespace
WG_CLIENT_IP, WG_SERVER_IP = "10.77.0.1", "10.77.0.2"
IPERF_PORT = 5201
CLOSED_PORT = 9  # nothing listens there: a refused connect is a round trip through the tunnel
LINK_IP = "10.201.%d.%d"  # link i: client end .1, server end .2

QUEUE_MS = 50  # each shaped direction's bfifo, in ms at the link's rate
BURST_MS = 2  # htb burst/cburst, in ms at the link's rate
FRAME_BYTES = 1514
UDP_RATE_FACTOR = 1.8  # the udp scenario's stream, in multiples of link 0's rate
BEST_LINK_MARGIN = 10.0  # priority of every link but the fastest (score points, as 10 ms of RTT)
LOWRATE_PPS, LOWRATE_SIZE = 100, 200
RECOVER_S = 3.0  # after a blackhole, before the next measurement
SETTLE_S = 1.0  # quiet before WireGuard is pointed at the next path (see TunnelBench.use_path)
PROBE_TIMEOUT_S = 15.0

FULL = {"repeat": 3, "seconds": 8, "lowrate_s": 10, "blackhole_s": 10, "blackhole_at_s": 4.0}
QUICK = {"repeat": 1, "seconds": 3, "lowrate_s": 4, "blackhole_s": 6, "blackhole_at_s": 2.0}


def _links(rates, delay_ms=None):
    """Link specs: each rate in Mbit/s (None: not shaped); delay_ms {link index: extra one-way ms}."""
    return [{"mbit": rate, "delay_ms": (delay_ms or {}).get(i, 0)} for i, rate in enumerate(rates)]


# Scenario -> its links, the tests it runs and a one-line description for the table.
SCENARIOS = collections.OrderedDict([
    ("unshaped", {"links": _links([None]), "tests": ["tcp_up", "tcp_down"], "about": "1 link, not shaped"}),
    ("equal", {"links": _links([20, 20]), "tests": ["tcp_up", "tcp_down"], "about": "2 links of 20 Mbit/s"}),
    ("unequal", {"links": _links([50, 20]), "tests": ["tcp_up", "tcp_down"], "about": "50 and 20 Mbit/s"}),
    ("delay", {"links": _links([20, 20], {1: 15}), "tests": ["tcp_up", "tcp_down"],
               "about": "2 x 20 Mbit/s, link 1 +30 ms RTT"}),
    ("udp", {"links": _links([20, 20]), "tests": ["udp"], "about": "2 x 20 Mbit/s, UDP at 1.8x one link"}),
    ("blackhole", {"links": _links([20, 20]), "tests": ["blackhole"],
                   "about": "2 x 20 Mbit/s, the busy link dropped mid-transfer"}),
    ("lowrate", {"links": _links([20, 20]), "tests": ["lowrate"], "about": "2 x 20 Mbit/s, 100 pps of 200 B"}),
])

# Test -> its label, the paths it runs on, and its figures: (key, label, digits).
TESTS_RUN = {
    "tcp_up": {"label": "TCP up", "paths": PATHS,
               "figures": [("mbps", "Mbit/s", 1), ("cpu_ms_per_mb", "relay CPU ms/MB", 2)]},
    "tcp_down": {"label": "TCP down", "paths": PATHS,
                 "figures": [("mbps", "Mbit/s", 1), ("cpu_ms_per_mb", "relay CPU ms/MB", 2)]},
    "udp": {"label": "UDP", "paths": PATHS,
            "figures": [("delivered_pct", "delivered %", 1), ("out_of_order_pct", "out of order %", 2),
                        ("sent_mbps", "sent Mbit/s", 1), ("mbps", "received Mbit/s", 1)]},
    "blackhole": {"label": "TCP down", "paths": RELAYS,
                  "figures": [("gap_s", "longest gap s", 1), ("total_mb", "total MB", 1)]},
    "lowrate": {"label": "UDP 100 pps", "paths": RELAYS,
                "figures": [("cpu_us_per_pkt", "relay CPU us/pkt", 0), ("delivered_pct", "delivered %", 1)]},
}

# ============================================================================
# iperf3 JSON -> figures (pure)
# ============================================================================


def interval_bytes(report_json):
    """Bytes of every interval iperf3 reported, the omitted ones included."""
    return sum(i["sum"]["bytes"] for i in report_json.get("intervals", []))


def tcp_figures(report_json, cpu_s=None):
    """Mbit/s received (end.sum_received), MB carried, retransmits and, with the relay's CPU
    seconds over the run, CPU ms per MB carried."""
    end = report_json["end"]
    received = end["sum_received"]
    carried_mb = interval_bytes(report_json) / 1e6
    return {"mbps": received["bits_per_second"] / 1e6, "received_mb": received["bytes"] / 1e6,
            "carried_mb": carried_mb, "retransmits": end.get("sum_sent", {}).get("retransmits"),
            "congestion": end.get("sender_tcp_congestion"),
            "cpu_s": cpu_s,
            "cpu_ms_per_mb": cpu_s * 1000.0 / carried_mb if cpu_s is not None and carried_mb > 0 else None}


def udp_figures(report_json, cpu_s=None):
    """The receiver's view of a UDP test: datagrams sent, lost, out of order, their shares, Mbit/s
    received and, with the relay's CPU seconds, CPU us per delivered datagram."""
    end = report_json["end"]
    s = end.get("sum_received") or end["sum"]
    sent, lost = s["packets"], s["lost_packets"]
    out_of_order = sum(st.get("udp", {}).get("out_of_order", 0) for st in end.get("streams", []))
    delivered = max(0, sent - lost)
    return {"sent": sent, "lost": lost, "delivered": delivered, "out_of_order": out_of_order,
            "delivered_pct": 100.0 - s["lost_percent"] if sent else None,
            "out_of_order_pct": 100.0 * out_of_order / sent if sent else None,
            "mbps": s["bits_per_second"] / 1e6 if "sum_received" in end else None,
            "sent_mbps": end["sum_sent"]["bits_per_second"] / 1e6 if "sum_sent" in end else None,
            "cpu_s": cpu_s,
            "cpu_us_per_pkt": cpu_s * 1e6 / delivered if cpu_s is not None and delivered else None}


def longest_silence(intervals):
    """(seconds, start) of the longest run of consecutive intervals that carried no bytes;
    (0.0, None) if every interval carried some."""
    best, best_start, run, run_start = 0.0, None, 0.0, None
    for i in intervals:
        s = i["sum"]
        if s["bytes"] == 0:
            if run_start is None:
                run, run_start = 0.0, s["start"]
            run += s["seconds"]
            if run > best:
                best, best_start = run, run_start
        else:
            run_start = None
    return best, best_start


def blackhole_figures(report_json, blackholed_at_s, link):
    """Longest gap in delivery (s), where it began, MB delivered, the link blackholed and when."""
    gap, start = longest_silence(report_json.get("intervals", []))
    received = report_json["end"]["sum_received"]
    return {"gap_s": gap, "gap_start_s": start, "total_mb": received["bytes"] / 1e6,
            "mbps": received["bits_per_second"] / 1e6, "link": link, "blackholed_at_s": blackholed_at_s}


def iperf_error(report_json):
    """Why iperf3's JSON has no result (its own error message), or None."""
    if not isinstance(report_json, dict):
        return "no JSON object"
    if report_json.get("error"):
        return report_json["error"]
    return None if report_json.get("end", {}).get("sum_received") else "no end.sum_received"


# ============================================================================
# Summary and table (pure)
# ============================================================================


def summarize(raw):
    """raw[scenario][test][path] = one result per repetition (figures, or {"error": ...}) ->
    {scenario: {test: {figure: {path: spread, "agg_over_ab": spread}}}}, ratios per repetition."""
    out = collections.OrderedDict()
    for scenario, tests in raw.items():
        out[scenario] = collections.OrderedDict()
        for test, by_path in tests.items():
            figures = collections.OrderedDict()
            for key, _label, _digits in TESTS_RUN[test]["figures"]:
                values = {path: [r.get(key) for r in runs] for path, runs in by_path.items()}
                row = {path: spread(v) for path, v in values.items()}
                if AB in values and AGG in values:
                    agg, ab = values[AGG], values[AB]
                    row["agg_over_ab"] = spread([ratio(agg[i], ab[i]) for i in range(min(len(agg), len(ab)))])
                figures[key] = row
            out[scenario][test] = figures
    return out


LABEL_W, CELL_W = 32, 22


def congestion_used(result):
    """The TCP senders' congestion control, as iperf3 reported it ("-C" or the namespaces' default)."""
    used = sorted({r.get("congestion") for tests in result.get("runs", {}).values() for paths in tests.values()
                   for reps in paths.values() for r in reps if r.get("congestion")})
    asked = result["params"].get("congestion")
    return "%s%s" % (", ".join(used) or asked or "not reported",
                     "" if asked else " (the system's default)")


def render(result):
    """The table of a result (run() or a saved file)."""
    lines = []
    add = lines.append
    m, p = result["machine"], result["params"]
    add("mpudp tunnel benchmark, %s%s" % (result.get("date", ""),
                                        "  (--quick: NOT comparable)" if result.get("quick") else ""))
    add("machine: %s, %s cores, kernel %s; %s; %s" % (
        m["cpu_model"], m["cores"], m["kernel"], result["tools"].get("wireguard-go", "?"),
        result["tools"].get("iperf3", "?")))
    mp = result["mpudp"]
    add("mpudp.py %s (sha256 %s, commit %s%s) under Python %s; %d run(s) per figure, median [min-max]; "
        "took %.0f s" % (mp["path"], mp["sha256"][:12], (mp["git"]["commit"] or "?")[:12],
                         " + uncommitted mpudp.py" if mp["git"]["mpudp_py_modified"] else "", m["python"],
                         p["repeat"], result.get("elapsed_s", 0)))
    add("WireGuard MTU %d on every path; shaped links: htb, burst %d ms, bfifo %d ms each way; TCP %d s "
        "(-O 1), congestion control %s" % (p["wg_mtu"], p["burst_ms"], p["queue_ms"], p["seconds"],
                                           congestion_used(result)))
    paths = result["paths"]
    columns = list(paths) + (["agg/ab"] if AB in paths and AGG in paths else [])

    def row(*cells):
        add("".join(str(c).ljust(CELL_W if i else LABEL_W) for i, c in enumerate(cells)).rstrip())

    add("")
    row("", *columns)
    unsupported = result.get("unsupported", {})
    for scenario, tests in result["figures"].items():
        row("%s: %s" % (scenario, result["scenarios"][scenario]["about"]))
        for test, figures in tests.items():
            spec = TESTS_RUN[test]
            for key, label, digits in spec["figures"]:
                cells = []
                for path in paths:
                    if path in unsupported:
                        cells.append("not supported")
                    elif path not in spec["paths"]:
                        cells.append("n/a")
                    else:
                        cells.append(report.cell(figures[key].get(path), digits))
                if "agg/ab" in columns:
                    cells.append(report.cell(figures[key].get("agg_over_ab"), 2))
                row("  %s  %s" % (spec["label"], label), *cells)
    for path, why in sorted(unsupported.items()):
        add("%s: not supported by this mpudp.py (%s)" % (path, why))
    for note in result.get("notes", []):
        add(note)
    return "\n".join(lines)


# ============================================================================
# Commands, namespaces, links, WireGuard
# ============================================================================


def sh(argv, timeout=30, stdin=None):
    """Run a short command; its stdout, or BenchError with its stderr."""
    try:
        r = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=timeout, preexec_fn=harness._die_with_parent)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError("%s: %s" % (" ".join(argv), exc)) from None
    if r.returncode:
        raise BenchError("%s: exit %d: %s" % (" ".join(argv), r.returncode, r.stderr.strip()))
    return r.stdout


def in_ns(ns, *argv):
    return ["ip", "netns", "exec", ns] + list(argv)


def write_secret(directory, name, text):
    """A file only its owner can read."""
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def wg_keys():
    """(private, public) from `wg genkey` / `wg pubkey`."""
    private = sh(["wg", "genkey"]).strip()
    return private, sh(["wg", "pubkey"], stdin=private + "\n").strip()


class Topology(object):
    """The namespaces, veths, shaping, WireGuard pair and iperf3 server of one scenario.
    close() deletes everything it made, whatever build() got to."""

    def __init__(self, tag, links, workdir, kids):
        self.client_ns, self.server_ns = "mpudp-tun-%s-c" % tag, "mpudp-tun-%s-s" % tag
        self.wg_client, self.wg_server = "wg%sc" % tag, "wg%ss" % tag
        self.links, self.dir, self.kids = links, workdir, kids
        self.namespaces = []
        self.wg_public = {}

    def link_ip(self, i, side):
        return LINK_IP % (i, 1 if side == "client" else 2)

    def build(self):
        for ns in (self.client_ns, self.server_ns):
            self.namespaces.append(ns)
            sh(["ip", "netns", "add", ns])
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        for i, link in enumerate(self.links):
            sh(["ip", "link", "add", "name", "c%d" % i, "netns", self.client_ns, "mtu", str(VETH_MTU), "type", "veth",
                "peer", "name", "s%d" % i, "netns", self.server_ns, "mtu", str(VETH_MTU)])
            for ns, dev, side in ((self.client_ns, "c%d" % i, "client"), (self.server_ns, "s%d" % i, "server")):
                sh(["ip", "-n", ns, "addr", "add", self.link_ip(i, side) + "/24", "dev", dev])
                sh(["ip", "-n", ns, "link", "set", dev, "up"])
                if link["mbit"]:
                    shape(ns, dev, link["mbit"])
        self.wireguard()
        Child(self.kids, "iperf3-server", in_ns(
            self.server_ns, "iperf3", "-s", "-B", WG_SERVER_IP, "-p", str(IPERF_PORT)), self.dir, talk=False)
        wait_listening(self.server_ns, WG_SERVER_IP, IPERF_PORT)

    def wireguard(self):
        keys = {"client": wg_keys(), "server": wg_keys()}
        for side, ns, dev, ip, peer_ip in (("client", self.client_ns, self.wg_client, WG_CLIENT_IP, WG_SERVER_IP),
                                           ("server", self.server_ns, self.wg_server, WG_SERVER_IP, WG_CLIENT_IP)):
            Child(self.kids, "wireguard-go-" + side, in_ns(
                ns, "env", "WG_PROCESS_FOREGROUND=1", "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1",
                "wireguard-go", dev), self.dir, talk=False)
            wait_for_file(wg_socket(dev), 10, "wireguard-go %s" % dev)
            key_file = write_secret(self.dir, "wg-%s.key" % side, keys[side][0] + "\n")
            other = "server" if side == "client" else "client"
            argv = ["wg", "set", dev, "private-key", key_file, "listen-port", str(WG_PORT),
                    "peer", keys[other][1], "allowed-ips", peer_ip + "/32"]
            if side == "client":
                argv += ["endpoint", "%s:%d" % (self.link_ip(0, "server"), WG_PORT)]
            sh(in_ns(ns, *argv))
            sh(["ip", "-n", ns, "addr", "add", ip + "/24", "dev", dev])
            sh(["ip", "-n", ns, "link", "set", dev, "mtu", str(WG_MTU), "up"])
        self.wg_public = {side: keys[side][1] for side in keys}

    def point_wireguard_at(self, host, port):
        """The client WireGuard's peer endpoint: the direct path or a relay client."""
        sh(in_ns(self.client_ns, "wg", "set", self.wg_client, "peer", self.wg_public["server"],
                 "endpoint", "%s:%d" % (host, port)))

    def wg_endpoint(self, side):
        """The peer endpoint a WireGuard sends to now ("host:port"), as `wg show` says."""
        ns, dev = (self.client_ns, self.wg_client) if side == "client" else (self.server_ns, self.wg_server)
        return sh(in_ns(ns, "wg", "show", dev, "endpoints")).strip().split("\t")[-1]

    def link_bytes(self, i):
        """Bytes the client end of link i sent plus received so far."""
        info = json.loads(sh(["ip", "-n", self.client_ns, "-j", "-s", "link", "show", "dev", "c%d" % i]))[0]
        stats = info["stats64"]
        return stats["rx"]["bytes"] + stats["tx"]["bytes"]

    def blackhole(self, i, on):
        """Drop everything on link i both ways (its htb leaf becomes 20: pfifo limit 0), or give it
        its queue (10:) back.  A leaf of another kind needs another handle."""
        if not self.links[i]["mbit"]:
            raise BenchError("link %d is not shaped: nothing to blackhole" % i)
        leaf = ["handle", "20:", "pfifo", "limit", "0"] if on else ["handle", "10:"] + queue_args(self.links[i]["mbit"])
        for ns, dev in ((self.client_ns, "c%d" % i), (self.server_ns, "s%d" % i)):
            sh(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "parent", "1:10"] + leaf)

    def close(self):
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.namespaces = []
        for dev in (self.wg_client, self.wg_server):  # left behind if wireguard-go was SIGKILLed
            try:
                os.unlink(wg_socket(dev))
            except OSError:
                pass


def queue_args(mbit):
    """The shaped class's leaf: a bfifo of QUEUE_MS at the link's rate."""
    return ["bfifo", "limit", str(int(mbit * 1e6 / 8 * QUEUE_MS / 1000))]


def shape(ns, dev, mbit):
    """htb at `mbit` on the egress of `dev`, with a bounded bfifo (see the module docstring)."""
    burst = max(2 * FRAME_BYTES, int(mbit * 1e6 / 8 * BURST_MS / 1000))
    tc = ["tc", "-n", ns]
    sh(tc + ["qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "10"])
    sh(tc + ["class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", "%gmbit" % mbit,
             "ceil", "%gmbit" % mbit, "burst", str(burst), "cburst", str(burst), "quantum", str(FRAME_BYTES)])
    sh(tc + ["qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:"] + queue_args(mbit))


def wg_socket(dev):
    return "/var/run/wireguard/%s.sock" % dev  # wireguard-go's UAPI socket: one directory for all namespaces


def wait_for_file(path, timeout, what):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise BenchError("%s: %s did not appear within %.0f s" % (what, path, timeout))
        time.sleep(0.05)


def wait_listening(ns, ip, port, timeout=10.0):
    """Until /proc/net/tcp of `ns` has a listening socket on ip:port."""
    want = "%s:%04X" % ("".join("%02X" % b for b in reversed(socket.inet_aton(ip))), port)
    deadline = time.monotonic() + timeout
    while True:
        table = sh(in_ns(ns, "cat", "/proc/net/tcp"))
        if any(line.split()[1] == want and line.split()[3] == "0A" for line in table.splitlines()[1:]):
            return
        if time.monotonic() > deadline:
            raise BenchError("nothing listens on %s:%d in %s" % (ip, port, ns))
        time.sleep(0.05)


# ============================================================================
# Relays
# ============================================================================


class Relays(object):
    """The relay pairs of one scenario: {path: {"client": Child, "server": Child}}."""

    def __init__(self, bench, topo, paths):
        self.bench, self.topo, self.paths = bench, topo, paths
        self.pairs = {}

    def link_remotes(self, path, emulated):
        """Each link's remote_addr for `path`'s client: the server's veth address, or the emulator."""
        remotes = []
        for i in range(len(self.topo.links)):
            if i in emulated:
                remotes.append("127.0.0.1:%d" % emulated[i][path])
            else:
                remotes.append("%s:%d" % (self.topo.link_ip(i, "server"), SERVER_PORTS[path]))
        return remotes

    def priorities(self):
        """Each link's priority: 0 for the fastest (an unshaped link is), BEST_LINK_MARGIN for the
        others, so active-backup runs on the fastest link, as the aggregate figures' baseline
        must; equal links all get 0 (the relay then picks by RTT)."""
        rates = [float("inf") if link["mbit"] is None else link["mbit"] for link in self.topo.links]
        return [0.0 if rate == max(rates) else BEST_LINK_MARGIN for rate in rates]

    def start(self, emulated):
        for path in self.paths:
            if path in RELAYS:
                start = self.start_go if path == GO else self.start_mpudp
                self.pairs[path] = start(path, self.link_remotes(path, emulated))

    def start_mpudp(self, path, remotes):
        keys, b = self.bench.keys, self.bench
        server = {"listen_addr": "0.0.0.0:%d" % SERVER_PORTS[path], "upstream_addr": "127.0.0.1:%d" % WG_PORT,
                  "server_private_key": keys["server_private"], "client_public_keys": [keys["client_public"]]}
        client = dict(RELAY_CONFIG, listen_addr="127.0.0.1:%d" % CLIENT_PORTS[path],
                      links=[{"remote_addr": r, "priority": p} for r, p in zip(remotes, self.priorities())],
                      client_private_key=keys["client_private"],
                      server_public_key=keys["server_public"])
        if path == AGG:
            client["aggregate"] = True
            client["debug"] = bool(os.environ.get("MPUDP_BENCH_DEBUG"))
        # The status files, for a run kept with --keep (shares, estimates, reorder counts).
        client["score_file"] = os.path.join(b.dir, "%s-client-status.json" % path)
        server["status_file"] = os.path.join(b.dir, "%s-server-status.json" % path)
        return self.spawn(path, b.python, [b.mpudp], {"mode": "server", "server": server},
                          {"mode": "client", "client": client})

    def start_go(self, path, remotes):
        go = self.bench.go
        server_private, server_public = go.key_pair()
        client_private, client_public = go.key_pair()
        server = dict(GO_SERVER_CONFIG, listen_addr="0.0.0.0:%d" % SERVER_PORTS[path],
                      upstream_addrs=["127.0.0.1:%d" % WG_PORT], server_private_key=server_private,
                      client_public_keys=[client_public])
        client = dict(GO_CLIENT_CONFIG, listen_addr="127.0.0.1:%d" % CLIENT_PORTS[path],
                      links=[{"remote_addr": r, "priority": p} for r, p in zip(remotes, self.priorities())],
                      client_private_key=client_private, server_public_key=server_public)
        return self.spawn(path, go.mpudp, [], {"mode": "server", "server": server},
                          {"mode": "client", "client": client})

    def spawn(self, path, program, args, server_cfg, client_cfg):
        pair = {}
        for who, ns, cfg in (("server", self.topo.server_ns, server_cfg), ("client", self.topo.client_ns, client_cfg)):
            config = write_config(self.bench.dir, "%s-%s.json" % (path, who), cfg)
            pair[who] = Child(self.bench.kids, "%s-%s" % (path, who),
                              in_ns(ns, program, *(args + ["-config=%s" % config])), self.bench.dir, talk=False)
        return pair

    def pids(self, path):
        pair = self.pairs.get(path)
        return {who: child.pid for who, child in pair.items()} if pair else {}

    def dead(self, path):
        """'client exited with N: log tail' if a process of the pair has exited, else None."""
        for who, child in self.pairs.get(path, {}).items():
            if child.proc.poll() is not None:
                return "%s exited with %d: %s" % (who, child.proc.returncode, log_tail(child.log_path, 5).strip())
        return None


def aggregate_support(python, mpudp, workdir, keys):
    """None if mpudp.py accepts "aggregate": true in a client config, else why not."""
    cfg = {"mode": "client", "client": {"listen_addr": "127.0.0.1:%d" % CLIENT_PORTS[AGG],
                                        "links": [{"remote_addr": "10.201.0.2:%d" % SERVER_PORTS[AGG]}],
                                        "client_private_key": keys["client_private"],
                                        "server_public_key": keys["server_public"], "aggregate": True}}
    path = write_config(workdir, "aggregate-check.json", cfg)
    r = subprocess.run([python, mpudp, "-config=%s" % path, "--check"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    return aggregate_verdict(r.returncode, r.stderr)


def aggregate_verdict(returncode, stderr):
    """None (supported) or the line saying why not, from `mpudp.py --check`'s exit and stderr."""
    lines = [line.strip() for line in stderr.splitlines() if "aggregate" in line]
    if returncode == 2:
        return lines[0] if lines else "config error (exit 2)"
    for line in lines:
        if "unknown key" in line:
            return line
    return None


# ============================================================================
# Measurements
# ============================================================================


class TunnelBench(object):
    """One run: every scenario in turn, each with its own topology (see the module docstring)."""

    def __init__(self, args, params, workdir):
        self.p = params
        self.dir = workdir
        self.python, self.mpudp = args.python, os.path.abspath(args.mpudp)
        self.go = harness.GoOriginal(args.go, args.go_keygen) if args.go else None
        self.paths = args.paths
        self.kids = Kids()
        self.topology = None
        self.unsupported = {}
        self.notes = []
        self.keys = harness.relay_keys()
        subprocess.run([self.python, "-m", "compileall", "-q", self.mpudp], stdout=subprocess.DEVNULL, check=False)

    def close(self):
        self.kids.close()
        if self.topology is not None:
            self.topology.close()

    def run(self, scenarios):
        if AGG in self.paths:
            why = aggregate_support(self.python, self.mpudp, self.dir, self.keys)
            if why:
                self.unsupported[AGG] = why
                progress("mpudp-aggregate: not supported by this mpudp.py (%s)" % why)
        raw = collections.OrderedDict()
        for n, name in enumerate(scenarios):
            raw[name] = self.scenario(n, name, SCENARIOS[name])
        return raw

    def scenario(self, n, name, spec):
        tag = "%dn%d" % (os.getpid(), n)  # wireguard-go names a socket after the interface: unique per run
        self.topology = topo = Topology(tag, spec["links"], self.dir, self.kids)
        progress("%s: %s; namespaces %s, %s" % (name, spec["about"], topo.client_ns, topo.server_ns))
        try:
            topo.build()
            emulated = self.emulators(topo)
            relays = Relays(self, topo, [p for p in self.paths if p not in self.unsupported])
            relays.start(emulated)
            live = self.wait_paths(topo, relays)
            return self.repetitions(name, spec, topo, relays, live)
        finally:
            self.kids.close()  # this scenario's children (the earlier ones have ended)
            topo.close()
            self.topology = None

    def emulators(self, topo):
        """{link index: {path: emulator port}} for the links with extra delay (one process of
        LinkEmulators in the client namespace, one emulator per relay path and link)."""
        out = {}
        for i, link in enumerate(topo.links):
            if not link["delay_ms"]:
                continue
            targets = {path: [topo.link_ip(i, "server"), SERVER_PORTS[path]] for path in RELAYS if path in self.paths}
            spec = json.dumps({"delay_s": link["delay_ms"] / 1000.0, "targets": targets})
            child = Child(self.kids, "linkemu-%d" % i, in_ns(topo.client_ns, sys.executable, os.path.abspath(__file__),
                                                            "--role", "linkemu", spec), self.dir)
            out[i] = child.recv(15)["ports"]
        return out

    def endpoint(self, path):
        if path == DIRECT:
            return self.topology.link_ip(0, "server"), WG_PORT
        return "127.0.0.1", CLIENT_PORTS[path]

    def use_path(self, topo, path, timeout=PROBE_TIMEOUT_S):
        """Point WireGuard at `path` and wait for a round trip through it; seconds it took, or None.

        WireGuard roams: each side sends to wherever the newest authenticated packet came from.
        A packet of the last test still on its way through the previous path (the tail of a
        download) would pull both back there, so the caller leaves SETTLE_S of quiet first,
        and measure() checks that both endpoints stayed put until the test's end."""
        topo.point_wireguard_at(*self.endpoint(path))
        argv = in_ns(topo.client_ns, sys.executable, os.path.abspath(__file__), "--role", "probe",
                     WG_SERVER_IP, str(CLOSED_PORT), str(timeout))
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True,
                           timeout=timeout + 15, preexec_fn=harness._die_with_parent)
        return float(r.stdout) if r.returncode == 0 else None

    def wait_paths(self, topo, relays):
        """The paths that carry traffic; a relay that exits on a config error (exit 2) because it
        does not know "aggregate" is reported as not supported."""
        live = []
        for path in relays.paths:
            took = self.use_path(topo, path)
            why = relays.dead(path)
            if path == AGG and why and "exited with 2" in why:
                self.unsupported[AGG] = why.splitlines()[0]
                progress("mpudp-aggregate: not supported by this mpudp.py (%s)" % why)
            elif took is None or why:
                self.notes.append("%s never carried traffic in this scenario: %s" % (path, why or "no round trip"))
                progress(self.notes[-1])
            else:
                progress("%s: first round trip through the tunnel after %.2f s" % (path, took))
                live.append(path)
        return live

    def repetitions(self, name, spec, topo, relays, live):
        runs = collections.OrderedDict((test, collections.OrderedDict()) for test in spec["tests"])
        for rep in range(self.p["repeat"]):
            order = [p for p in self.paths if p not in self.unsupported]
            if rep % 2:
                order.reverse()
            for test in spec["tests"]:
                for path in order:
                    if path not in TESTS_RUN[test]["paths"]:
                        continue
                    r = self.measure(test, spec, topo, relays, path) if path in live else {"error": "not running"}
                    runs[test].setdefault(path, []).append(r)
                    progress("rep %d %s %s %s: %s" % (rep + 1, name, test, path, brief(test, r)))
        return runs

    def measure(self, test, spec, topo, relays, path):
        time.sleep(SETTLE_S)
        if self.use_path(topo, path, timeout=5.0) is None:
            return {"error": relays.dead(path) or "no round trip through the tunnel"}
        endpoints = (topo.wg_endpoint("client"), topo.wg_endpoint("server"))
        if endpoints[0] != "%s:%d" % self.endpoint(path):
            return {"error": "WireGuard went back to %s before the test" % endpoints[0]}
        links_before = [topo.link_bytes(i) for i in range(len(topo.links))]
        r = self.blackhole(topo, relays, path) if test == "blackhole" else self.transfer(test, spec, topo, relays, path)
        after = (topo.wg_endpoint("client"), topo.wg_endpoint("server"))
        if after != endpoints and "error" not in r:
            r = {"error": "WireGuard roamed during the test: %s -> %s" % (" / ".join(endpoints), " / ".join(after))}
        r["link_mb"] = [round((topo.link_bytes(i) - b) / 1e6, 2) for i, b in enumerate(links_before)]
        return r

    def transfer(self, test, spec, topo, relays, path):
        seconds = self.p["seconds"]
        if test in ("tcp_up", "tcp_down"):
            argv = ["-t", str(seconds), "-O", "1"] + (["-R"] if test == "tcp_down" else [])
            parse = tcp_figures
        elif test == "udp":
            argv = ["-u", "-b", "%gM" % (UDP_RATE_FACTOR * spec["links"][0]["mbit"]), "-l", "1200",
                    "-t", str(seconds)]
            parse = udp_figures
        else:
            argv = ["-u", "-b", str(LOWRATE_PPS * LOWRATE_SIZE * 8), "-l", str(LOWRATE_SIZE),
                    "-t", str(self.p["lowrate_s"])]
            parse = udp_figures
        pids = relays.pids(path)
        before = procfs.cpu_snapshot(pids)
        out = self.iperf(topo, argv, path)
        cpu = procfs.cpu_delta(before, procfs.cpu_snapshot(pids))
        if "error" in out:
            return out
        cpu_s = sum(cpu[who]["s"] for who in pids) if pids and all(who in cpu for who in pids) else None
        return parse(out, cpu_s)

    def iperf(self, topo, argv, name, timeout=None, during=None):
        """iperf3 -c in the client namespace; its JSON, or {"error": ...}.  `during(start)` runs
        while it does (the blackhole)."""
        if self.p.get("congestion") and "-u" not in argv:
            argv = ["-C", self.p["congestion"]] + list(argv)  # iperf3 asks its server for it too (-R)
        full = in_ns(topo.client_ns, "iperf3", "-c", WG_SERVER_IP, "-p", str(IPERF_PORT), "-J",
                     "--connect-timeout", "3000", *argv)
        child = Child(self.kids, "iperf3-" + name, full, self.dir)
        started = time.monotonic()
        extra = during(started) if during else None
        try:
            stdout, _ = child.proc.communicate(timeout=timeout or 60 + self.p["seconds"] * 2)
        except subprocess.TimeoutExpired:
            child.stop()
            return {"error": "iperf3 did not finish"}
        finally:
            child.log.close()
        try:
            out = json.loads(stdout.decode() or "{}")
        except ValueError:
            return {"error": "iperf3 wrote no JSON: %s" % log_tail(child.log_path, 3).strip()}
        error = iperf_error(out)
        if error:
            return {"error": "iperf3: %s" % error}
        if extra is not None:
            out["_during"] = extra
        return out

    def blackhole(self, topo, relays, path):
        """A TCP download; at blackhole_at_s the busiest link drops everything (see the docstring)."""
        at, seconds = self.p["blackhole_at_s"], self.p["blackhole_s"]
        state = {}

        def drop_busiest(started):
            time.sleep(max(0.0, started + at - 1.0 - time.monotonic()))
            before = [topo.link_bytes(i) for i in range(len(topo.links))]
            time.sleep(max(0.0, started + at - time.monotonic()))
            moved = [topo.link_bytes(i) - b for i, b in enumerate(before)]
            link = max(range(len(moved)), key=lambda i: moved[i])
            topo.blackhole(link, True)
            state.update(link=link, at=time.monotonic() - started)
            return state

        try:
            out = self.iperf(topo, ["-R", "-t", str(seconds), "-i", "0.1"], path, timeout=seconds + 60,
                             during=drop_busiest)
        finally:
            if "link" in state:
                topo.blackhole(state["link"], False)
        time.sleep(RECOVER_S)
        if "error" in out:
            return out
        return blackhole_figures(out, round(state["at"], 2), state["link"])


def brief(test, r):
    """One progress line's figures, and the MB each link carried (both ways, all relays)."""
    links = "; links %s MB" % " + ".join("%.1f" % mb for mb in r["link_mb"]) if "link_mb" in r else ""
    return _brief(test, r) + links


def _brief(test, r):
    if "error" in r:
        return "ERROR " + r["error"]
    if test == "blackhole":
        return "link %d dropped at %.1f s, gap %.1f s, %.1f MB" % (r["link"], r["blackholed_at_s"], r["gap_s"],
                                                                 r["total_mb"])
    if test == "lowrate":
        return "%.2f%% delivered, %s us/pkt" % (r["delivered_pct"], report.fmt(r["cpu_us_per_pkt"], 0))
    if test == "udp":
        return "%.2f%% delivered, %.2f%% out of order" % (r["delivered_pct"], r["out_of_order_pct"])
    return "%.1f Mbit/s, %s ms/MB" % (r["mbps"], report.fmt(r["cpu_ms_per_mb"], 2))


# ============================================================================
# Roles: processes of this file inside a namespace
# ============================================================================


def _any_address(addr, what):
    """linkemu's address check, for any literal IP: (family, (host, port))."""
    ip = ipaddress.ip_address(addr[0])
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (str(ip), int(addr[1]))


def role_linkemu(args):
    """LinkEmulators on 127.0.0.1 in front of non-loopback targets; {"ports": {name: port}} when
    ready; ends when stdin closes."""
    spec = json.loads(args[0])
    sys.path.insert(0, TESTS)
    import linkemu
    linkemu._check_loopback = _any_address  # the target is the server's veth address, not loopback
    linkemu._loopback_for = lambda family: "::" if family == socket.AF_INET6 else "0.0.0.0"
    emulators = {}
    try:
        for name, target in spec["targets"].items():
            emulators[name] = linkemu.LinkEmulator(tuple(target), listen=("127.0.0.1", 0))
            emulators[name].set(delay_s=spec["delay_s"])
            emulators[name].start()
        print(json.dumps({"ports": {name: e.address[1] for name, e in emulators.items()}}), flush=True)
        while os.read(sys.stdin.fileno(), 4096):
            pass
    finally:
        for e in emulators.values():
            e.close()
    return 0


def role_probe(args):
    """TCP connects to host:port until one is answered (refused or accepted); prints the seconds
    it took and exits 0, or exits 1 after `timeout` s."""
    host, port, timeout = args[0], int(args[1]), float(args[2])
    start = time.monotonic()
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(0.5)
        try:
            sock.connect((host, port))
            answered = True
        except ConnectionRefusedError:
            answered = True
        except OSError:
            answered = False
        finally:
            sock.close()
        if answered:
            print("%.3f" % (time.monotonic() - start))
            return 0
        if time.monotonic() - start > timeout:
            return 1
        time.sleep(0.1)


ROLES = {"linkemu": role_linkemu, "probe": role_probe}

# ============================================================================
# Run and command line
# ============================================================================


def parse_args(argv):
    parser = argparse.ArgumentParser(description="WireGuard through the relay in network namespaces "
                                                 "(see the module docstring).")
    parser.add_argument("--scenario", action="append", metavar="NAME",
                        help="one of %s, or all (default); may be repeated" % ", ".join(SCENARIOS))
    parser.add_argument("--paths", default=",".join(PATHS),
                        help="comma-separated, from %s (default: all; go only with --go)" % ",".join(PATHS))
    parser.add_argument("--repeat", type=int, help="repetitions of every figure (default 3, --quick 1)")
    parser.add_argument("--seconds", type=int, help="length of a TCP or UDP test (default 8, --quick 3)")
    parser.add_argument("--quick", action="store_true", help="short tests, one repetition (figures not comparable)")
    parser.add_argument("--go", metavar="PATH", help="the Go original: a directory with its mpudp and keygen")
    parser.add_argument("--go-keygen", metavar="PATH", help="the Go original's keygen, if not beside --go")
    parser.add_argument("--mpudp", default=MPUDP, help="the mpudp.py to run (default: this checkout's)")
    parser.add_argument("--congestion", metavar="NAME", default="cubic",
                        help="TCP congestion control of the iperf3 senders (iperf3 -C; default cubic, what Linux, "
                        "Windows and macOS use by default; 'system': net.ipv4.tcp_congestion_control's)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs mpudp.py")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--save", metavar="PATH", help="also write the JSON result to PATH")
    parser.add_argument("--show", metavar="PATH", help="print the table of a saved JSON result and exit")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.scenarios = choose_scenarios(args.scenario, parser.error)
    args.paths = choose_paths(args.paths, bool(args.go), parser.error)
    return args


def choose_scenarios(names, error):
    """The scenarios to run, in SCENARIOS order; None or "all": every one."""
    if not names or "all" in names:
        return list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        error("unknown scenario %s (choose from %s, all)" % (", ".join(unknown), ", ".join(SCENARIOS)))
    return [n for n in SCENARIOS if n in names]


def choose_paths(text, have_go, error):
    """The paths of --paths, in PATHS order; go dropped (with a note on stderr) without --go."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PATHS]
    if unknown or not names:
        error("unknown path %s (choose from %s)" % (", ".join(unknown) or "''", ", ".join(PATHS)))
    if GO in names and not have_go:
        if text != ",".join(PATHS):
            sys.stderr.write("tunnel: path go needs --go DIR; left out\n")
        names.remove(GO)
    elif have_go and GO not in names:
        sys.stderr.write("tunnel: --go given but --paths leaves go out; add it to measure the Go original\n")
    return [p for p in PATHS if p in names]


def log_tail(path, lines=15):
    """The end of a child's log (harness.Child.tail needs the log open; a scenario closes them)."""
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def check_system():
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, tc, wireguard-go)")
    missing = [tool for tool in ("ip", "tc", "wg", "wireguard-go", "iperf3") if not shutil.which(tool)]
    if missing:
        raise BenchError("not installed: %s" % ", ".join(missing))


def tool_versions():
    out = {}
    for tool, argv in (("wireguard-go", ["wireguard-go", "--version"]), ("iperf3", ["iperf3", "--version"])):
        try:
            out[tool] = subprocess.run(argv, stdout=subprocess.PIPE, universal_newlines=True,
                                       timeout=10).stdout.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            out[tool] = "?"
    return out


def run(args):
    """The whole measurement in a temporary work directory; the JSON result, or None on failure."""
    params = dict(QUICK if args.quick else FULL)
    if args.repeat:
        params["repeat"] = args.repeat
    if args.seconds:
        params["seconds"] = args.seconds
    params["congestion"] = None if args.congestion == "system" else args.congestion
    workdir = tempfile.mkdtemp(prefix="mpudp-tunnel-")
    started = time.monotonic()
    bench = None
    try:
        check_system()
        bench = TunnelBench(args, params, workdir)
        raw = bench.run(args.scenarios)
    except BenchError as exc:
        sys.stderr.write("tunnel: %s\n" % exc)
        for k in bench.kids.all if bench is not None else ():
            if k.proc.poll() not in (None, 0):
                sys.stderr.write("--- %s (pid %d, exit %r) log tail:\n%s" % (k.name, k.pid, k.proc.poll(),
                                                                            log_tail(k.log_path)))
        return None
    finally:
        if bench is not None:
            bench.close()
        if args.keep:
            sys.stderr.write("tunnel: work directory kept: %s\n" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return build_result(args, params, bench, raw, time.monotonic() - started)


def git_of(path):
    """The commit of the checkout holding `path`, and whether that file differs from it."""
    def git(*args):
        try:
            return subprocess.run(["git", "-C", os.path.dirname(path)] + list(args), stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, universal_newlines=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "mpudp_py_modified": bool(git("status", "--porcelain", "--", os.path.basename(path)))}


def build_result(args, params, bench, raw, elapsed):
    with open(bench.mpudp, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"schema": "mpudp-bench-tunnel/1", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "quick": args.quick, "elapsed_s": round(elapsed, 1),
            "machine": harness.machine_info(bench.python), "tools": tool_versions(),
            "mpudp": {"path": bench.mpudp, "sha256": digest, "git": git_of(bench.mpudp)},
            "go": bench.go.info() if bench.go else {"measured": False},
            "params": dict(params, wg_mtu=WG_MTU, veth_mtu=VETH_MTU, queue_ms=QUEUE_MS, burst_ms=BURST_MS,
                           relay_config=RELAY_CONFIG, udp_rate_factor=UDP_RATE_FACTOR,
                           lowrate={"pps": LOWRATE_PPS, "size": LOWRATE_SIZE}, recover_s=RECOVER_S),
            "paths": bench.paths, "unsupported": bench.unsupported, "notes": bench.notes,
            "scenarios": {name: SCENARIOS[name] for name in raw},
            "runs": raw, "figures": summarize(raw)}


def main(argv=None):
    args = parse_args(argv)
    if args.role:
        return ROLES[args.role](args.role_args)
    if args.show:
        with open(args.show) as f:
            print(render(json.load(f)))
        return 0

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = run(args)
    except KeyboardInterrupt:
        sys.stderr.write("tunnel: interrupted; namespaces and children cleaned up\n")
        return 130
    if result is None:
        return 1
    text = json.dumps(result, indent=1)
    if args.save:
        with open(args.save, "w") as f:
            f.write(text + "\n")
    print(text if args.json else render(result))
    progress("done in %.1f s" % result["elapsed_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
