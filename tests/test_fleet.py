"""What an operator of many relays needs from the daemon itself: Prometheus metrics,
a SIGUSR1 that the documented command reaches, log lines that name what to fix, and
a plain word about the MTU."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from conftest import MPUDP, ROOT, WAIT_S, MpudpProcess, free_udp_port, keypair, wait_json, write_config

import mpudp

import pytest

pytestmark = pytest.mark.slow  # real processes for seconds each (tox.ini)

METRIC_LINE = re.compile(r'^(mpudp_[a-z_]+)(\{[a-z_]+="[^"\n]*"(,[a-z_]+="[^"\n]*")*\})? '
                         r'(-?[0-9.e+-]+|NaN|\+Inf)$')


def parse_metrics(text):
    """{(name, labels text): value} of a Prometheus text file; fails on any line out of format."""
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        match = METRIC_LINE.match(line)
        assert match, "not a metric line: %r" % line
        assert match.group(1) in types, "a sample before its TYPE: %r" % line
        samples[(match.group(1), match.group(2) or "")] = float(match.group(4))
    return samples, types


def wait_metrics(path, predicate, what):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                parsed = parse_metrics(f.read())
            if predicate(*parsed):
                return parsed
        time.sleep(0.05)  # a file has no change notification: poll it
    raise AssertionError("%s never showed %s" % (path, what))


def test_metrics_files_for_node_exporter(relay_pair, tmp_path):
    client_metrics, server_metrics = str(tmp_path / "client.prom"), str(tmp_path / "server.prom")
    pair = relay_pair(links=2, client={"metrics_file": client_metrics},
                      server={"metrics_file": server_metrics})
    app = pair.app_socket()
    for i in range(20):
        assert pair.round_trip(app, b"metered %d" % i)

    samples, types = wait_metrics(
        client_metrics, lambda s, t: sum(v for (n, _), v in s.items() if n == "mpudp_link_received_packets_total") >= 20,
        "the echoes counted")
    links = {labels for name, labels in samples if name == "mpudp_link_up"}
    assert links == {'{link="%d",remote="%s:%d"}' % ((i,) + tuple(pair.links[i].address[:2])) for i in range(2)}
    assert sum(samples[("mpudp_link_active", l)] for l in links) == 1
    assert sum(samples[("mpudp_link_carrier", l)] for l in links) == 1
    assert all(types[name] == "counter" for name in types if name.endswith("_total"))
    assert samples[("mpudp_handshake_age_seconds", "")] < WAIT_S
    sent_before = sum(v for (n, _), v in samples.items() if n == "mpudp_link_sent_packets_total")

    server_samples, _ = wait_metrics(
        server_metrics, lambda s, t: s.get(("mpudp_client_received_packets_total", '{client="0"}'), 0) >= 20,
        "client 0's packets")
    assert server_samples[("mpudp_client_last_seen_age_seconds", '{client="0"}')] <= mpudp.SWEEP_INTERVAL_CEILING_S
    assert server_samples[("mpudp_client_return_links", '{client="0"}')] == 1
    assert server_samples[("mpudp_client_sent_packets_total", '{client="0"}')] >= 20
    assert server_samples[("mpudp_sessions", "")] == 1

    # Counters only grow: later content has each at least as high.
    later, _ = wait_metrics(client_metrics, lambda s, t: sum(
        v for (n, _), v in s.items() if n == "mpudp_link_sent_packets_total") > sent_before, "more heartbeats")
    assert all(later[key] >= value for key, value in samples.items() if key[0].endswith("_total"))


def test_status_json_has_counts_ages_and_carriers(relay_pair, tmp_path):
    score, status_file = str(tmp_path / "score.json"), str(tmp_path / "status.json")
    pair = relay_pair(links=2, client={"score_file": score}, server={"status_file": status_file})
    app = pair.app_socket()
    assert pair.round_trip(app, b"counted")
    client = wait_json(score, lambda d: sum(l["rx_packets"] for l in d["links"]) > 0, "packets counted")
    assert client["carriers"] == [l["index"] for l in client["links"] if l["active"]]
    assert client["uptime_s"] >= 0 and client["handshake_age_s"] is not None
    assert "stale_welcome" not in client["counters"], client["counters"]  # a clean start is not a drop
    server = wait_json(status_file, lambda d: d["clients"][0]["rx_packets"] > 0, "packets counted")
    assert server["clients"][0]["last_seen_age_s"] is not None and server["uptime_s"] >= 0


def test_the_documented_sigusr1_command_finds_the_daemon(relay_pair):
    pair = relay_pair(links=1)
    found = subprocess.run(["pgrep", "-f", "%s -config=%s" % (MPUDP, pair.client_config)],
                           stdout=subprocess.PIPE, universal_newlines=True, timeout=WAIT_S)
    assert found.stdout.split() == [str(pair.client.proc.pid)], found.stdout
    mark = len(pair.client.lines)
    os.kill(int(found.stdout.split()[0]), signal.SIGUSR1)
    pair.client.wait_for_line("srtt ms", start=mark)


def test_cannot_start_names_the_address(tmp_path):
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    server_keys, client_keys = keypair(), keypair()
    path = write_config(tmp_path, {"mode": "server", "server": {
        "listen_addr": "127.0.0.1:%d" % port, "upstream_addr": "127.0.0.1:9",
        "server_private_key": server_keys[0], "client_public_keys": [client_keys[1]]}})
    try:
        result = subprocess.run([sys.executable, MPUDP, "-config=%s" % path], stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=WAIT_S, cwd=ROOT)
    finally:
        taken.close()
    assert result.returncode == 1
    assert "cannot start: 127.0.0.1:%d: Address already in use" % port in result.stderr, result.stderr


def test_a_link_never_answered_says_so_once(relay_pair, tmp_path):
    pair = relay_pair(links=1, emulate=False)
    pair.client.stop()  # this test's client instead: one good link, one to a port nobody listens on
    dead = free_udp_port()
    cfg = dict(pair.client_cfg, links=[{"remote_addr": "127.0.0.1:%d" % pair.server_port},
                                       {"remote_addr": "127.0.0.1:%d" % dead}])
    pair.client = client = MpudpProcess(write_config(tmp_path, {"mode": "client", "client": cfg}, "two.json"))
    pair.procs.append(client)  # stopped with the pair at the end of the test
    client.wait_for_line("link 1 (127.0.0.1:%d): none of its %d heartbeats was ever answered" % (
        dead, mpudp.NEVER_ANSWERED_HEARTBEATS))
    app = pair.app_socket()
    assert pair.round_trip(app, b"the other link works")
    assert client.count_lines("was ever answered") == 1


def test_check_says_which_mtu_fits(tmp_path):
    server_keys, client_keys = keypair(), keypair()

    def check(links):
        path = write_config(tmp_path, {"mode": "client", "client": {
            "listen_addr": "127.0.0.1:0", "links": [{"remote_addr": r} for r in links],
            "client_private_key": client_keys[0], "server_public_key": server_keys[1]}})
        out = subprocess.run([sys.executable, MPUDP, "--check", "-config=%s" % path], stdout=subprocess.PIPE,
                             universal_newlines=True, timeout=WAIT_S, cwd=ROOT).stdout
        return [line for line in out.splitlines() if line.startswith("MTU:")]

    assert check(["192.0.2.1:5000"]) == [
        "MTU: application datagrams up to 1440 bytes cross a 1500-byte path unfragmented on these links "
        "(mpudp adds 32); inside WireGuard, set MTU 1408"]
    assert "up to 1420 bytes" in check(["192.0.2.1:5000", "[2001:db8::1]:5000"])[0]
    assert "MTU 1388" in check(["relay.example:5000"])[0]  # not resolved yet: IPv6 may be the way


def test_a_datagram_too_large_for_a_1500_byte_path_is_said_once_and_still_carried(relay_pair, tmp_path):
    score = str(tmp_path / "score.json")
    pair = relay_pair(links=1, client={"score_file": score})
    app = pair.app_socket()
    big = b"B" * 1452  # a full WireGuard packet at its default MTU 1420
    for i in range(3):
        payload = big[:-1] + bytes([i])
        assert pair.round_trip(app, payload) == payload
    pair.client.wait_for_line("sent a 1452-byte datagram: over a 1500-byte path only 1440 fit")
    assert pair.client.count_lines("-byte datagram: over a 1500-byte path") == 1
    wait_json(score, lambda d: d["counters"].get("over_1500_path", 0) >= 3, "large datagrams counted")


def test_the_example_config_says_keys_must_be_generated():
    result = subprocess.run([sys.executable, MPUDP, "--check", "-config=%s" % os.path.join(ROOT, "config.json")],
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=WAIT_S, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines and all("still the example's placeholder: generate the keys first" in l for l in lines), lines
    assert json.load(open(os.path.join(ROOT, "config.json")))["client"]["listen_addr"].startswith("127.0.0.1:")
