"""End-to-end tests of mpudp's operation features: --status, --check, SIGUSR1, SIGHUP.

Real client and server processes on loopback (conftest.RelayPair).  Every wait
is on an event (a log line, an echo, a command's answer) with helpers.WAIT_S
as the failure bound only; nothing sleeps for a fixed time to "let things
settle".  The only sleep is the 10 ms pacing of the 100 pps sender.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import MPUDP, ROOT, MpudpProcess, free_udp_port, keypair, read_json, wait_json, write_config
from helpers import WAIT_S, EchoServer, Stream, addr_text


# -- helpers -------------------------------------------------------------------


def cli(*args):
    """Run `mpudp.py ARGS` to completion; (returncode, stdout + stderr)."""
    result = subprocess.run([sys.executable, MPUDP] + list(args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, cwd=ROOT, timeout=WAIT_S)
    return result.returncode, result.stdout


def status_until(config_path, predicate, timeout=WAIT_S):
    """Run --status until `predicate(rc, output)` holds; the last (rc, output) either way."""
    deadline = time.monotonic() + timeout
    while True:
        rc, out = cli("--status", "-config=%s" % config_path)
        if predicate(rc, out) or time.monotonic() > deadline:
            return rc, out
        time.sleep(0.1)  # poll interval of a bounded wait, not a settle-time


def wait_running(process):
    """The signal handlers are installed before this line is logged (run())."""
    process.wait_for_line("running as")


def signal_and_wait(process, sig, text):
    """Send `sig` and wait for the first line containing `text` logged after it; its index."""
    start = len(process.lines)
    process.proc.send_signal(sig)
    return process.wait_for_line(text, start=start)


def rewrite(path, mode, section):
    """Rewrite a config file in place (same path, so SIGHUP re-reads it)."""
    write_config(os.path.dirname(path), {"mode": mode, mode: section}, os.path.basename(path))


TABLE_HEADER_CLIENT = re.compile(r"\blink\s+address\s+state\s+srtt ms\s+loss%")
SERVER_HEADER = re.compile(r"\bclient\s+epoch\s+return path\s+upstream\s+sessions$")


# -- 1. --status ------------------------------------------------------------------


def test_status_client_and_server_running_then_stopped(relay_pair, tmp_path):
    score = str(tmp_path / "score.json")
    status = str(tmp_path / "status.json")
    pair = relay_pair(client={"score_file": score},
                      server={"status_file": status, "heartbeat_timeout_sec": 1, "session_timeout_sec": 4})
    app = pair.app_socket()
    pair.round_trip(app, b"status me")
    app.close()

    # Client: the link table with the active link starred, exit 0.
    rc, out = status_until(pair.client_config,
                           lambda rc, out: rc == 0 and re.search(r"(?m)^\*\s+\d+\s", out)
                           and "sessions: 1;" in out)
    assert rc == 0, out
    lines = out.splitlines()
    assert re.match(r"mpudp client, pid %d, updated \d+\.\d+s ago$" % pair.client.proc.pid, lines[0]), out
    assert TABLE_HEADER_CLIENT.search(lines[1]), out
    rows = [line for line in lines[2:] if re.match(r"^[ *]\s*\d+\s", line)]
    assert len(rows) == 2, out
    assert sum(1 for row in rows if row.startswith("*")) == 1, out  # exactly one active link
    for link in pair.links:
        assert addr_text(*link.address[:2]) in out
    assert re.search(r"(?m)^sessions: 1; epoch [0-9a-f]{4}; last switch ", out), out

    # Server: the clients table, written by the sweep (every 0.5 s with these timeouts).
    rc, out = status_until(pair.server_config,
                           lambda rc, out: rc == 0 and re.search(r"(?m)^0\s+[0-9a-f]{4}\s+link \d", out))
    assert rc == 0, out
    lines = out.splitlines()
    assert re.match(r"mpudp server, pid %d, updated \d+\.\d+s ago$" % pair.server.proc.pid, lines[0]), out
    assert SERVER_HEADER.match(lines[1]), out
    row = [line for line in lines if line.startswith("0 ")]
    assert len(row) == 1 and pair.echo.text in row[0], out

    # Stopped: not running, exit 3 (the files may still be there; the pid is dead).
    assert pair.client.stop() == 0
    assert pair.server.stop() == 0
    for path in (pair.client_config, pair.server_config):
        rc, out = cli("--status", "-config=%s" % path)
        assert rc == 3, out
        assert out.startswith("mpudp is not running"), out


def test_status_without_score_file_says_if_it_runs_and_which_key(tmp_path):
    """No status file configured: exit 0 while a daemon runs with this config (and which key
    would show its table), 3 once it stopped, as LSB's status."""
    server_keys, client_keys = keypair(), keypair()
    client_path = write_config(tmp_path, {"mode": "client", "client": {
        "listen_addr": "127.0.0.1:%d" % free_udp_port(), "links": [{"remote_addr": "127.0.0.1:40001"}],
        "client_private_key": client_keys[0], "server_public_key": server_keys[1]}}, "client.json")
    server_path = write_config(tmp_path, {"mode": "server", "server": {
        "listen_addr": "127.0.0.1:%d" % free_udp_port(), "upstream_addr": "127.0.0.1:40002",
        "server_private_key": server_keys[0], "client_public_keys": [client_keys[1]]}}, "server.json")
    for mode, path, key in (("client", client_path, "client.score_file"), ("server", server_path, "server.status_file")):
        rc, out = cli("--status", "-config=%s" % path)
        assert rc == 3 and out.startswith("mpudp is not running with %s" % path), out
        daemon = MpudpProcess(path)
        try:
            daemon.wait_for_line("running as %s" % mode)
            rc, out = cli("--status", "-config=%s" % path)
            assert rc == 0, out
            assert "is running (pid %d)" % daemon.proc.pid in out and "set %s in %s" % (key, path) in out, out
        finally:
            daemon.stop()
        rc, out = cli("--status", "-config=%s" % path)
        assert rc == 3, out


# -- 2. SIGUSR1 ---------------------------------------------------------------------


def test_sigusr1_logs_the_tables(relay_pair):
    pair = relay_pair()
    app = pair.app_socket()
    pair.round_trip(app, b"usr1")
    app.close()
    wait_running(pair.client)
    wait_running(pair.server)
    pair.server.wait_for_line("client 0: return path link")  # validated: no such line comes after the signal

    start = len(pair.client.lines)
    header = signal_and_wait(pair.client, signal.SIGUSR1, "srtt ms")
    assert TABLE_HEADER_CLIENT.search(pair.client.lines[header])
    summary = pair.client.wait_for_line("sessions: 1; epoch ", start=start)
    rows = pair.client.lines[header + 1:summary]
    assert len(rows) == 2, rows
    assert sum(1 for row in rows if re.search(r"INFO\s+\*\s+\d", row)) == 1, rows

    header = signal_and_wait(pair.server, signal.SIGUSR1, "return path")
    assert SERVER_HEADER.search(pair.server.lines[header]), pair.server.lines[header]
    row = pair.server.wait_for_line(pair.echo.text, start=header + 1)
    assert re.search(r"INFO\s+0\s+[0-9a-f]{4}\s+link \d", pair.server.lines[row]), pair.server.lines[row]
    assert pair.client.proc.poll() is None and pair.server.proc.poll() is None


# -- 3. SIGHUP with traffic flowing -----------------------------------------------


@pytest.mark.slow
def test_sighup_reload_under_traffic_loses_nothing(relay_pair, tmp_path):
    score = str(tmp_path / "score.json")
    pair = relay_pair(client={"score_file": score})
    wait_running(pair.client)
    stream = Stream(pair.client_address, warm_up=True)
    try:
        stream.wait_received(100)

        direct = addr_text(pair.host, pair.server_port)
        cfg = dict(pair.client_cfg)
        cfg["links"] = [dict(link) for link in cfg["links"]] + [{"remote_addr": direct}]
        cfg["links"][1]["priority"] = 7.5
        cfg.update(switch_threshold=40, loss_weight=3, debug=True)
        rewrite(pair.client_config, "client", cfg)
        start = len(pair.client.lines)
        at_reload = stream.received()
        pair.client.proc.send_signal(signal.SIGHUP)

        pair.client.wait_for_line("config reloaded from %s" % pair.client_config, start=start)
        added = pair.client.wait_for_line("reload: link 2 (%s) added" % direct, start=start)
        pair.client.wait_for_line("link 2 (%s) up" % direct, start=added)
        pair.client.wait_for_line("DEBUG", start=start)
        pair.client.wait_for_line("srtt ms", start=start)  # the debug link table, every heartbeat
        stream.wait_received(at_reload + 200)  # two more seconds of stream after the reload
    finally:
        sent, echoed = stream.stop_when_echoed()

    missing = set(sent) - set(echoed)
    assert not missing, "%d of %d datagrams lost across the reload, e.g. %r" % (
        len(missing), len(sent), sorted(missing)[:5])
    assert set(echoed) <= set(sent)
    assert len(sent) >= 300
    # The kept links were kept (matched by remote_addr), not re-added.
    assert pair.client.count_lines("removed") == 0
    assert pair.client.count_lines(") added") == 1
    assert pair.client.count_lines("reload refused") == 0
    # The in-place changes are what the client now reports.
    def reloaded(status):
        return len(status["links"]) == 3 and status["links"][2]["state"] == "up"
    status = wait_json(score, reloaded, "three links, link 2 up")
    assert [link["priority"] for link in status["links"]] == [0, 7.5, 0]
    assert status["links"][2]["address"] == direct
    assert status["links"][0]["srtt_ms"] is not None  # link 0 kept its measurements
    assert pair.client.proc.poll() is None


# -- 4. Refused reloads ---------------------------------------------------------------


def test_sighup_refuses_invalid_and_restart_needing_configs(relay_pair):
    pair = relay_pair()
    wait_running(pair.client)
    app = pair.app_socket()
    pair.round_trip(app, b"before")
    path = pair.client_config
    good = dict(pair.client_cfg)
    refused = "reload refused, the running config stays: "

    with open(path, "w") as f:
        f.write('{"mode": "client", "client": {')  # not JSON
    line = signal_and_wait(pair.client, signal.SIGHUP, refused)
    assert "ERROR" in pair.client.lines[line]
    pair.round_trip(app, b"after bad json")

    rewrite(path, "client", dict(good, heartbeat_interval_sec=-1))
    line = signal_and_wait(pair.client, signal.SIGHUP, refused)
    assert "client.heartbeat_interval_sec" in pair.client.lines[line], pair.client.lines[line]
    pair.round_trip(app, b"after bad value")

    other_port = pair.client_port + 1 if pair.client_port < 65535 else pair.client_port - 1
    changes = [
        ("client_id", {"client_id": 1}),
        ("listen_addr", {"listen_addr": addr_text(pair.host, other_port)}),
        ("client_private_key", {"client_private_key": keypair()[0]}),
    ]
    for key, change in changes:
        rewrite(path, "client", dict(good, **change))
        line = signal_and_wait(pair.client, signal.SIGHUP, refused)
        assert "ERROR" in pair.client.lines[line]
        assert "changing client.%s needs a restart" % key in pair.client.lines[line], pair.client.lines[line]
        pair.round_trip(app, ("after %s" % key).encode())
    assert pair.client.count_lines("config reloaded") == 0
    assert pair.client.proc.poll() is None

    rewrite(path, "client", dict(good, switch_threshold=30))
    signal_and_wait(pair.client, signal.SIGHUP, "config reloaded from %s" % path)
    pair.round_trip(app, b"after the fix")
    app.close()
    assert pair.client.count_lines(refused) == 5
    assert pair.client.proc.poll() is None


# -- 5. Server SIGHUP -------------------------------------------------------------------


@pytest.mark.slow
def test_server_sighup_new_upstream_for_new_sessions_only(relay_pair, cleanup_echo):
    pair = relay_pair(server={"heartbeat_timeout_sec": 2, "session_timeout_sec": 30})
    wait_running(pair.server)
    old_app = pair.app_socket()
    pair.round_trip(old_app, b"old session 1")
    assert pair.echo.wait_for(lambda r: any(d == b"old session 1" for d, _ in r))

    echo2 = cleanup_echo(EchoServer())
    section = read_json(pair.server_config)["server"]
    section.update(upstream_addr=echo2.text, heartbeat_timeout_sec=1, session_timeout_sec=1.5, debug=True)
    rewrite(pair.server_config, "server", section)
    start = len(pair.server.lines)
    pair.server.proc.send_signal(signal.SIGHUP)
    pair.server.wait_for_line("config reloaded from %s" % pair.server_config, start=start)
    pair.server.wait_for_line("reload: client 0 now goes to upstream %s" % echo2.text, start=start)

    new_app = pair.app_socket()
    pair.round_trip(new_app, b"new session")
    pair.round_trip(old_app, b"old session 2")
    assert echo2.wait_for(lambda r: any(d == b"new session" for d, _ in r))
    assert pair.echo.wait_for(lambda r: any(d == b"old session 2" for d, _ in r))
    assert not any(d == b"new session" for d, _ in pair.echo.received)
    assert not any(d.startswith(b"old session") for d, _ in echo2.received)

    # The shorter session timeout is in force: the idle old session expires on the
    # server (debug is on now), and the old app's next datagram opens a new
    # server session, which goes to the new upstream.
    first = pair.server.wait_for_line("expired", start=start)
    pair.server.wait_for_line("expired", start=first + 1)  # both idle sessions, the old one included
    pair.round_trip(old_app, b"old app, new server session")
    assert echo2.wait_for(lambda r: any(d == b"old app, new server session" for d, _ in r))
    old_app.close()
    new_app.close()
    assert pair.server.count_lines("reload refused") == 0
    assert pair.server.proc.poll() is None


@pytest.fixture
def cleanup_echo():
    made = []

    def make(echo):
        made.append(echo)
        return echo

    yield make
    for echo in made:
        echo.close()


# -- 6. --check -----------------------------------------------------------------------


def test_check_describes_client_and_server_configs(tmp_path):
    server_keys, client_keys, other_client = keypair(), keypair(), keypair()
    client_path = write_config(tmp_path, {"mode": "client", "client": {
        "listen_addr": "127.0.0.1:40000",
        "links": [{"remote_addr": "127.0.0.1:40001"}, {"remote_addr": "[::1]:40002", "priority": 5}],
        "client_id": 3, "switch_threshold": 12,
        "client_private_key": client_keys[0], "server_public_key": server_keys[1]}}, "client.json")
    rc, out = cli("--check", "-config=%s" % client_path)
    assert rc == 0, out
    lines = out.splitlines()
    assert "mode: client" in lines
    assert "listen_addr: 127.0.0.1:40000" in lines
    assert "client_id: 3" in lines
    assert "links[0]: 127.0.0.1:40001, priority 0" in lines
    assert "links[1]: [::1]:40002, priority 5" in lines
    assert any("switch when better by 12" in line for line in lines), out
    assert lines[-1] == "config OK"
    assert client_keys[0] not in out and server_keys[1] not in out

    server_path = write_config(tmp_path, {"mode": "server", "server": {
        "listen_addr": "127.0.0.1:40001", "upstream_addrs": ["127.0.0.1:5000", "127.0.0.1:5001"],
        "server_private_key": server_keys[0], "client_public_keys": [client_keys[1], other_client[1]]}},
        "server.json")
    rc, out = cli("--check", "-config=%s" % server_path)
    assert rc == 0, out
    lines = out.splitlines()
    assert "mode: server" in lines
    assert "listen_addr: 127.0.0.1:40001" in lines
    assert "client 0: upstream 127.0.0.1:5000" in lines
    assert "client 1: upstream 127.0.0.1:5001" in lines
    assert lines[-1] == "config OK"
    assert server_keys[0] not in out

    bad_path = write_config(tmp_path, {"mode": "client", "client": {
        "listen_addr": "127.0.0.1:40000", "links": [],
        "client_private_key": client_keys[0], "server_public_key": server_keys[1]}}, "bad.json")
    rc, out = cli("--check", "-config=%s" % bad_path)
    assert rc == 2, out
    assert "config error" in out and "client.links" in out, out
    assert "config OK" not in out


def test_sighup_removing_the_active_link_moves_the_traffic(relay_pair, tmp_path):
    score = str(tmp_path / "score.json")
    pair = relay_pair(client={"score_file": score})
    wait_running(pair.client)
    stream = Stream(pair.client_address, warm_up=True)
    try:
        stream.wait_received(50)
        status = wait_json(score, lambda s: any(link["active"] for link in s["links"]), "an active link")
        active = [link["index"] for link in status["links"] if link["active"]]
        assert len(active) == 1, status
        kept = 1 - active[0]
        cfg = dict(pair.client_cfg)
        removed_addr = cfg["links"][active[0]]["remote_addr"]
        kept_addr = cfg["links"][kept]["remote_addr"]
        cfg["links"] = [dict(cfg["links"][kept])]  # the other link, now link 0
        rewrite(pair.client_config, "client", cfg)
        start = len(pair.client.lines)
        pair.client.proc.send_signal(signal.SIGHUP)
        pair.client.wait_for_line("reload: link %d (%s) removed" % (active[0], removed_addr), start=start)
        pair.client.wait_for_line("first choice: link 0 (%s) carries the traffic" % kept_addr, start=start)
        pair.client.wait_for_line("config reloaded", start=start)
        stream.wait_received(stream.received() + 100)  # the stream goes on over the kept link
    finally:
        sent, echoed = stream.stop_when_echoed()
    # Replies in flight on the removed link's socket may be lost; nothing else is.
    missing = set(sent) - set(echoed)
    assert len(missing) <= 5, "%d of %d lost" % (len(missing), len(sent))
    status = wait_json(score, lambda s: len(s["links"]) == 1, "one link")
    assert [(link["index"], link["address"], link["active"]) for link in status["links"]] == [(0, kept_addr, True)]
    assert pair.client.proc.poll() is None


def test_reload_removing_a_link_whose_lookup_is_still_running(in_process):
    """A link removed by a reload while its DNS look-up hangs: the late answer is ignored, not an error."""
    release = threading.Event()

    def slow_getaddrinfo(host, port, *args):
        release.wait(WAIT_S)
        return [(socket.AF_INET, socket.SOCK_DGRAM, 0, "", ("127.0.0.1", port))]

    harness = in_process(getaddrinfo=slow_getaddrinfo)  # a Client in this process, a resolver stub
    try:
        client = harness.add_client(["127.0.0.1:9", "relay.test:9"])
        client.reconfigure(harness.client_section(["127.0.0.1:9"]))  # relay.test is still being looked up
        assert [link.endpoint.text for link in client.links] == ["127.0.0.1:9"]
        release.set()
        assert harness.run_until(lambda: not harness.resolver._in_flight, WAIT_S, 0.05), \
            "the look-up never came back"
        assert harness.reactor.errors["callback"] == 0
        assert [link.endpoint.text for link in client.links] == ["127.0.0.1:9"]
    finally:
        release.set()


def test_reload_keeps_each_of_several_links_that_go_the_same_way(in_process):
    """Two links to one address with the same options (two sockets, two NAT mappings): a
    reload that keeps them keeps both, in order, with their sockets; one that drops the
    second retires exactly that one.  (They were matched by a dict key, so the second
    replaced the first: a new link was made and the old one kept running, unreferenced.)"""
    harness = in_process()  # a Client in this process: its links and their sockets are inspected
    client = harness.add_client(["127.0.0.1:9", "127.0.0.1:9", "127.0.0.1:10"])
    first, second, third = client.links
    sockets = [link.sock for link in client.links]
    assert len({id(s) for s in sockets}) == 3 and None not in sockets
    mark = len(harness.log_text())

    client.reconfigure(harness.client_section(["127.0.0.1:9", "127.0.0.1:9", "127.0.0.1:10"], switch_threshold=40))
    assert client.links == [first, second, third]
    assert [link.sock for link in client.links] == sockets
    assert [link.index for link in client.links] == [0, 1, 2]
    assert "reload:" not in harness.log_text()[mark:]

    client.reconfigure(harness.client_section(["127.0.0.1:9", "127.0.0.1:10"]))
    assert client.links == [first, third] and [link.index for link in client.links] == [0, 1]
    assert first.sock is sockets[0] and third.sock is sockets[2]
    assert second.sock is None and not client.monitor.watching(second) and sockets[1].fileno() == -1  # retired
    reload_lines = [line for line in harness.log_text()[mark:].splitlines() if "reload:" in line]
    assert len(reload_lines) == 1 and reload_lines[0].endswith("reload: link 1 (127.0.0.1:9) removed"), \
        reload_lines


def test_reload_compares_a_bind_addr_as_an_address_not_as_text(in_process):
    """"127.0.0.2" and "127.0.0.2:0" are the same binding: the link keeps its socket; a
    different port is a new one."""
    harness = in_process()

    def link(bind_addr):
        return [{"remote_addr": "127.0.0.1:9", "bind_addr": bind_addr}]

    client = harness.add_client(link("127.0.0.2"))
    link0, sock = client.links[0], client.links[0].sock
    assert sock.getsockname()[0] == "127.0.0.2"
    client.reconfigure(harness.client_section(link("127.0.0.2:0")))
    assert client.links == [link0] and link0.sock is sock
    port = free_udp_port("127.0.0.2")
    client.reconfigure(harness.client_section(link("127.0.0.2:%d" % port)))
    assert client.links[0] is not link0 and client.links[0].sock.getsockname() == ("127.0.0.2", port)
    assert sock.fileno() == -1
