"""Hostile input, second round: config, status and signal input that used to escape as
a traceback, a hang or a half-applied reload; file-descriptor starvation of one client
by another; COOKIE reflection; log floods a remote peer could cause; timers that piled up.
"""

import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import (MPUDP, ROOT, WAIT_S, EchoServer, FakeClock, MpudpProcess, addr_text, free_udp_port,
                      keypair, wait_json, write_config)

import mpudp


def client_config(keys=None, **extra):
    server_keys, client_keys = keys or (keypair(), keypair())
    section = {"listen_addr": "127.0.0.1:%d" % free_udp_port(), "links": [{"remote_addr": "127.0.0.1:9"}],
               "client_private_key": client_keys[0], "server_public_key": server_keys[1]}
    section.update(extra)
    return {"mode": "client", "client": section}


def check(path):
    return subprocess.run([sys.executable, MPUDP, "--check", "-config=%s" % path], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=WAIT_S, cwd=ROOT)


# -- config input: one line naming the key, exit 2 ------------------------------------


def bad_files(tmp_path):
    """name -> (writer of the bad file at a path, what the one error line must name)."""
    good = client_config()

    def json_with(**changes):
        def write(path):
            data = json.loads(json.dumps(good))
            data["client"].update(changes)
            with open(path, "w") as f:
                json.dump(data, f)
        return write

    def text(content, mode="w"):
        def write(path):
            with open(path, mode) as f:
                f.write(content)
        return write

    def huge(path):
        with open(path, "wb") as f:
            f.truncate((16 << 20) + 10)

    return {
        "400-digit integer": (text(json.dumps(good)[:-2] + ', "heartbeat_interval_sec": 1' + "0" * 400 + "}}"),
                              "client.heartbeat_interval_sec: is too large"),
        "deeply nested JSON": (text('{"mode": "client", "client": ' + "[" * 100000 + "]" * 100000 + "}"),
                               "nested too deeply"),
        "not UTF-8": (text(json.dumps(good).encode()[:-2] + b', "score_file": "\xff\xfe"}}', "wb"), "not UTF-8"),
        "larger than any config": (huge, "larger than"),
        "non-ASCII host": (json_with(listen_addr="\u00fc" * 300 + ".example:5000"), "client.listen_addr"),
        "NUL in an interface name": (json_with(links=[{"remote_addr": "127.0.0.1:9", "bind_interface": "eth\u00000"}]),
                                     "client.links[0].bind_interface"),
        "NUL in a host name": (json_with(links=[{"remote_addr": "relay\u0000.example:9"}]), "client.links[0].remote_addr"),
    }


@pytest.mark.parametrize("case", ["400-digit integer", "deeply nested JSON", "not UTF-8", "larger than any config",
                                  "non-ASCII host", "NUL in an interface name", "NUL in a host name"])
def test_a_bad_config_is_one_line_naming_the_key_and_exit_2(tmp_path, case):
    path = str(tmp_path / "config.json")
    write, named = bad_files(tmp_path)[case]
    write(path)
    os.chmod(path, 0o600)
    result = check(path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpudp: config error: ") and named in lines[0], lines
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_config_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path, kind):
    path = {"device": "/dev/zero", "directory": str(tmp_path)}.get(kind, str(tmp_path / "fifo"))
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes to it: reading it would hang
    result = check(path)  # the timeout in check() is the hang detector
    assert result.returncode == 2
    assert result.stderr.strip().endswith("not a regular file") or "Is a directory" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_config_writable_by_others_is_warned_about(tmp_path):
    path = write_config(tmp_path, client_config())
    os.chmod(path, 0o622)
    result = check(path)
    assert result.returncode == 0
    assert "writable by other users" in result.stderr and "chmod 600" in result.stderr


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def test_a_refused_reload_says_so_every_time_and_changes_nothing(tmp_path):
    """Each bad file, twice, on SIGHUP: a "reload refused" line each time (not swallowed by a
    rate limit), no socket leaked, and the running config still applies."""
    keys = (keypair(), keypair())
    path = write_config(tmp_path, client_config(keys))
    good = open(path).read()
    client = MpudpProcess(path)
    try:
        client.wait_for_line("first choice")
        fds = fd_count(client.proc.pid)
        refusals = 0
        for case, (write, _named) in bad_files(tmp_path).items():
            for _ in range(2):
                write(path)
                client.proc.send_signal(signal.SIGHUP)
                refusals += 1
                with client.cond:  # a line per signal
                    client.cond.wait_for(lambda: client.count_lines("reload refused") >= refusals, WAIT_S)
                assert client.count_lines("reload refused") == refusals, (case, client.output())
        assert client.count_lines("internal error") == 0, client.output()
        assert fd_count(client.proc.pid) == fds
        with open(path, "w") as f:
            f.write(good)
        client.proc.send_signal(signal.SIGHUP)
        client.wait_for_line("config reloaded")
        assert client.proc.poll() is None
    finally:
        assert client.stop() == 0


def test_sigterm_after_a_burst_of_sighup_is_not_lost(tmp_path):
    """2,000 SIGHUPs then SIGTERM: the reloads are coalesced, the process exits, and the
    wake-up fd's overflow leaves nothing on stderr."""
    path = write_config(tmp_path, client_config())
    client = MpudpProcess(path)
    try:
        client.wait_for_line("first choice")
        for _ in range(2000):  # paced: signals sent at once would merge in the kernel into one
            os.kill(client.proc.pid, signal.SIGHUP)
            time.sleep(0.0005)
        os.kill(client.proc.pid, signal.SIGTERM)
        assert client.proc.wait(WAIT_S) == 0
    finally:
        client.stop()
    output = client.output()
    assert "Exception ignored" not in output and "BlockingIOError" not in output, output[-2000:]
    reloads = client.count_lines("config reloaded")
    assert 1 <= reloads < 2000, reloads  # at least one, and bursts were coalesced
    assert client.lines[-1].endswith("stopping")


# -- --status on untrusted files: a clear line, exit 3 ------------------------------------


def status(path):
    return subprocess.run([sys.executable, MPUDP, "--status", "-config=%s" % path], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=WAIT_S, cwd=ROOT)


GARBAGE = {
    "deep nesting": lambda: "[" * 100000 + "]" * 100000,
    "huge time": lambda: '{"time": 1%s, "pid": %d, "links": []}' % ("0" * 400, os.getpid()),
    "huge pid": lambda: '{"time": %f, "pid": 1%s, "links": []}' % (time.time(), "0" * 400),
    "no links": lambda: json.dumps({"time": time.time(), "pid": os.getpid()}),
    "links not a list": lambda: json.dumps({"time": time.time(), "pid": os.getpid(), "links": 7,
                                            "sessions": 0, "epoch": None}),
    "NaN time": lambda: '{"time": NaN, "pid": %d, "links": [], "sessions": 0, "epoch": null}' % os.getpid(),
    "time in the future": lambda: json.dumps({"time": time.time() + 3600, "pid": os.getpid(), "links": [],
                                              "sessions": 0, "epoch": None}),
    "not UTF-8": lambda: b"\xff\xfe{}",
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_status_of_a_garbage_file_is_one_line_and_exit_3(tmp_path, case):
    score = str(tmp_path / "score.json")
    path = write_config(tmp_path, client_config(score_file=score))
    content = GARBAGE[case]()
    with open(score, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    result = status(path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert len(result.stdout.splitlines()) == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "running" not in result.stdout or "not running" in result.stdout


# -- files written by the daemon ------------------------------------------------------


def test_a_planted_symlink_at_the_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = str(tmp_path / "status.json")
    os.symlink(str(victim), "%s.tmp%d" % (target, os.getpid()))
    mpudp.write_json_atomically(target, {"ok": 1})
    assert victim.read_text() == "precious\n"
    assert json.loads(open(target).read()) == {"ok": 1} and not os.path.islink(target)
    assert set(os.listdir(str(tmp_path))) == {"victim", "status.json"}  # the planted link is gone


# -- timers that piled up -------------------------------------------------------------


class FailingResolver:
    """Every look-up fails at once (a router whose WAN is down for a day)."""

    def __init__(self):
        self.lookups = 0

    def lookup(self, key, host, port, callback, family=0):
        self.lookups += 1
        callback(OSError("Temporary failure in name resolution"))
        return True


def test_a_name_that_never_resolves_keeps_one_retry_and_one_refresh_timer():
    clock = FakeClock()
    log = mpudp.Log(stream=io.StringIO(), clock=clock)
    reactor = mpudp.Reactor(clock=clock, log=log)
    resolver = FailingResolver()
    endpoint = mpudp.Endpoint("relay.example:9", "relay.example", 9, lambda e: None)
    endpoint.start(reactor, resolver, log, 600.0)
    most = 0
    for _ in range(24 * 60):  # a day of retries at the 60 s ceiling, timer by timer
        clock.now = reactor._heap[0][0]
        reactor.run_once(0)
        most = max(most, reactor.pending_timers)
    assert resolver.lookups > 24 * 60 // 2  # it kept trying
    assert most <= 2 and len(reactor._heap) <= 4, (most, len(reactor._heap))
    assert log.stream.getvalue().count("cannot resolve") == 1
    endpoint.close()
    assert reactor.pending_timers == 0


# -- COOKIE answers at a bounded rate ---------------------------------------------------


def make_handshake(clock):
    reactor = mpudp.Reactor(clock=clock, log=mpudp.Log(stream=io.StringIO()))
    sent = []
    counters = mpudp.Counters()
    handshake = mpudp.ServerHandshake(reactor, reactor.log, counters,
                                      lambda packet, addr: sent.append((bytes(packet), addr)))
    secret = os.urandom(32)
    peer = mpudp.Peer(0, secret, mpudp.Endpoint("127.0.0.1:9", "127.0.0.1", 9, lambda e: None))
    return handshake, peer, sent, counters


def hello(peer, nonce):
    return mpudp.seal(peer.static.hello_mac, mpudp.TYPE_HELLO, 0, 0, 0, mpudp.handshake_nonce(mpudp.epoch_tag(nonce)),
                      mpudp.HELLO_PAYLOAD.pack(nonce, bytes(16)))


def test_cookie_answers_are_limited_per_source_prefix_and_in_all():
    clock = FakeClock()
    handshake, peer, sent, counters = make_handshake(clock)
    captured = hello(peer, os.urandom(16))  # replayed with spoofed sources
    for i in range(100):
        handshake.on_hello(peer, 0, ("192.0.2.%d" % (i % 200), 4000 + i), captured)
    assert len(sent) == mpudp.COOKIE_BURST_PER_PREFIX and counters["cookie_limit"] == 100 - len(sent)
    assert all(packet[0] & mpudp.TYPE_MASK == mpudp.TYPE_COOKIE for packet, _ in sent)
    del sent[:]
    handshake.on_hello(peer, 0, ("198.51.100.1", 4000), captured)  # another network: its own budget
    assert len(sent) == 1
    clock.advance(1.0)  # the first prefix's bucket refills at its rate
    for i in range(100):
        handshake.on_hello(peer, 0, ("192.0.2.1", 5000 + i), captured)
    assert len(sent) == 1 + int(mpudp.COOKIES_PER_PREFIX_PER_S)
    del sent[:]
    clock.advance(100.0)
    for i in range(3000):  # from 3,000 networks at once: the global bucket
        handshake.on_hello(peer, 0, ("10.%d.%d.1" % (i // 256, i % 256), 4000), captured)
    assert len(sent) == mpudp.COOKIE_BURST


def test_a_real_handshake_still_gets_its_cookie_and_welcome_under_the_limit():
    clock = FakeClock()
    handshake, peer, sent, counters = make_handshake(clock)
    nonce = os.urandom(16)
    source = ("203.0.113.5", 4000)
    for _ in range(mpudp.COOKIE_BURST_PER_PREFIX):
        handshake.on_hello(peer, 0, ("203.0.113.9", 4000), hello(peer, os.urandom(16)))  # a neighbour's flood
    clock.advance(0.1)
    handshake.on_hello(peer, 0, source, hello(peer, nonce))
    cookie_packet, _ = sent[-1]
    assert cookie_packet[0] & mpudp.TYPE_MASK == mpudp.TYPE_COOKIE
    cookie = mpudp.COOKIE_PAYLOAD.unpack_from(cookie_packet, mpudp.HEADER_SIZE)[1]
    handshake.on_hello(peer, 0, source, mpudp.seal(
        peer.static.hello_mac, mpudp.TYPE_HELLO, 0, 0, 0, mpudp.handshake_nonce(mpudp.epoch_tag(nonce)),
        mpudp.HELLO_PAYLOAD.pack(nonce, cookie)))
    assert sent[-1][0][0] & mpudp.TYPE_MASK == mpudp.TYPE_WELCOME  # WELCOMEs are bounded by the hello budget


# -- the return path's log lines ------------------------------------------------------


def test_a_nat_alternating_source_ports_gets_a_few_lines_then_a_summary():
    clock = FakeClock()
    stream = io.StringIO()
    log = mpudp.Log(stream=stream, clock=clock)
    reactor = mpudp.Reactor(clock=clock, log=log)
    server_keys, client_keys = keypair(), keypair()
    config = mpudp.parse_config({"mode": "server", "server": {
        "listen_addr": "127.0.0.1:0", "upstream_addr": "127.0.0.1:9", "server_private_key": server_keys[0],
        "client_public_keys": [client_keys[1]]}}).section
    resolver = mpudp.Resolver(reactor)
    server = mpudp.Server(config, reactor, log, resolver)
    peer = server.peers[0]
    try:
        ports = (40000, 40001)
        for port in ports + (5000,):  # both NAT mappings answered their challenges, and a later one
            source = ("192.0.2.1" if port != 5000 else "192.0.2.2", port)
            peer.return_path.observe(0, source, 0, 0, 100)
            peer.return_path.validate(source, peer.return_path.unvalidated[source].token)
        for seq in range(1, 10001):  # 10 s at 1,000 pps, one NAT mapping then the other
            if peer.return_path.observe(0, ("192.0.2.1", ports[seq % 2]), seq, 0, 100) == mpudp.PATH_MOVED:
                server.on_return_path_moved(peer)
            if seq % 100 == 0:
                clock.advance(0.1)
                reactor.run_once(0)
        lines = [l for l in stream.getvalue().splitlines() if "go by link" in l or "return path link" in l]
        assert 1 <= len(lines) <= mpudp.PATH_LINES_PER_INTERVAL + 2, lines
        assert "moved" in lines[-1] and "times since the last line" in lines[-1], lines[-1]
        clock.advance(mpudp.PATH_LINE_INTERVAL_S * 2)
        reactor.run_once(0)
        quiet_mark = len(stream.getvalue())
        assert peer.return_path.observe(1, ("192.0.2.2", 5000), 20000, 0, 100) == mpudp.PATH_MOVED  # an ordinary switch
        server.on_return_path_moved(peer)
        assert "replies now go by link 1 (192.0.2.2:5000)" in stream.getvalue()[quiet_mark:]
    finally:
        server.close()
        resolver.close()
        reactor.close()


# -- one client cannot starve the others of file descriptors ---------------------------


NOFILE = 100  # the budget is NOFILE - RESERVED_FDS sessions


def limit_open_files():
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def round_trip(sock, target, payload):
    deadline = time.monotonic() + WAIT_S
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        sock.sendto(payload, target)
        try:
            if sock.recv(65536) == payload:
                return True
        except socket.timeout:
            continue
    return False


@pytest.mark.slow
def test_a_greedy_client_gives_way_when_the_descriptors_run_out(tmp_path):
    budget = NOFILE - mpudp.RESERVED_FDS
    echo = EchoServer()
    server_keys, keys0, keys1 = keypair(), keypair(), keypair()
    server_port = free_udp_port()
    status_file = str(tmp_path / "status.json")
    server_path = write_config(tmp_path, {"mode": "server", "server": {
        "listen_addr": addr_text("127.0.0.1", server_port), "upstream_addr": echo.text,
        "server_private_key": server_keys[0], "client_public_keys": [keys0[1], keys1[1]],
        "status_file": status_file, "heartbeat_timeout_sec": 1.0}}, "server.json")
    server = MpudpProcess(server_path, preexec_fn=limit_open_files)
    clients, apps = [], []
    try:
        server.wait_for_line("server listening on")
        server.wait_for_line("leaves room for %d" % budget)
        for client_id, keys in enumerate((keys0, keys1)):
            path = write_config(tmp_path, client_config(
                (server_keys, keys), client_id=client_id, heartbeat_interval_sec=0.2,
                links=[{"remote_addr": addr_text("127.0.0.1", server_port)}]), "client%d.json" % client_id)
            clients.append(MpudpProcess(path))
            clients[-1].wait_for_line("handshake done")
        targets = [("127.0.0.1", int(json.load(open(c.config_path))["client"]["listen_addr"].split(":")[1]))
                   for c in clients]
        for i in range(budget + 30):  # client 0: more applications than there are descriptors
            app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            app.bind(("127.0.0.1", 0))
            apps.append(app)
            assert round_trip(app, targets[0], b"greedy %d" % i), "application %d of client 0 got no echo" % i
        late = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        late.bind(("127.0.0.1", 0))
        apps.append(late)
        assert round_trip(late, targets[1], b"client 1 still gets a session")
        seen = wait_json(status_file, lambda d: d["counters"].get("session_evicted", 0) >= 31,
                         "sessions evicted for the newcomers")
        assert seen["sessions"] <= budget and seen["session_budget"] == budget
        assert server.count_lines("Too many open files") == 0, server.output()
        result = subprocess.run([sys.executable, MPUDP, "--status", "-config=%s" % server_path],
                                stdout=subprocess.PIPE, universal_newlines=True, timeout=WAIT_S, cwd=ROOT)
        assert result.returncode == 0, result.stdout
    finally:
        for app in apps:
            app.close()
        for client in clients:
            client.stop()
        server.stop()
        echo.close()
