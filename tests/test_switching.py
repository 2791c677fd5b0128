"""Link-health and switching scenarios: failover, recovery, hysteresis, busy hold,
direction-split loss, all links down, DNS, and the score_file.

Most tests run real mpudp processes (conftest.RelayPair: echo upstream, server,
LinkEmulators, client) and steer the links while they watch the client's log
lines, its score_file and the emulators' counters.  The DNS tests build a
Server and a Client in this process on one Reactor (conftest.InProcess) with a Resolver whose
getaddrinfo is a stub the test controls.

Every wait is bounded and waits on an event (a log line, a datagram, a counter,
a score_file that says so); the negative checks ("no switch") observe a window
measured in heartbeats the emulators forwarded, not in sleeps.
"""

import json
import os
import re
import socket
import threading
import time

import pytest

import mpudp
from conftest import active_index, wait_json as wait_score
from helpers import WAIT_S, Stream, line_count, lines_from, link_name

LINK_FIELDS = ("index", "address", "state", "srtt_ms", "rttvar_ms", "jitter_ms", "loss", "loss_up",
               "loss_down", "score", "kbps", "active", "switches")


# -- log lines ---------------------------------------------------------------

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) ")


def line_time(line):
    """Wall-clock time (time.time() scale) of an mpudp log line, from its millisecond stamp."""
    match = _STAMP.match(line)
    assert match, "log line without a time stamp: %r" % line
    return time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000.0


def switch_text(pair, old, new, reason):
    return "switch %s -> %s: %s" % (link_name(pair, old), link_name(pair, new), reason)


def switch_lines(pair, start=0):
    return [line for line in lines_from(pair.client, start) if " switch link " in line]


# -- score_file --------------------------------------------------------------


def fresh_score(path, after, predicate=lambda data: True, what="a fresh write", timeout=WAIT_S):
    """The first score_file written after wall-clock time `after` (its "time" field)."""
    return wait_score(path, lambda d: d["time"] > after and predicate(d), what, timeout)


def settle(path):
    """Wait until every link is up and steady; return that score_file content."""
    return wait_score(path, lambda d: all(l["state"] == "up" and l["steady"] for l in d["links"]),
                      "every link up and steady")


def client_config(tmp_path, **overrides):
    cfg = {"score_file": str(tmp_path / "score.json")}
    cfg.update(overrides)
    return cfg


def wait_counter(link, key, at_least, timeout=WAIT_S):
    assert link.wait_for(lambda c: c[key] >= at_least, timeout), (
        "%r: counter %s never reached %d: %r" % (link, key, at_least, link.counters))


# ============================================================================
# 1. Failover
# ============================================================================


@pytest.mark.slow
@pytest.mark.parametrize("busy", [False, True], ids=["light", "busy"])
def test_failover_when_active_link_dies(relay_pair, tmp_path, busy):
    """The down path: a blackholed active link is declared down and left at once, busy or not.

    With the default switch_threshold (25) one or two missed heartbeats (5 % loss each, x5) can
    already make a regular "better by" switch before the link is declared down.  The light case
    raises the threshold so the failover always takes the down path, the slower one.  The busy
    case keeps the default: the busy hold vetoes every regular switch.

    The gap is the wait for the next heartbeat (0 to heartbeat_interval_sec, depending on when the
    link dies) plus 3.5 heartbeat timeouts (the first miss, then probes every half timeout): on
    loopback the timeout is its 100 ms floor, so 0.35 s to 0.85 s here, up to 1.35 s at the
    default heartbeat_interval_sec of 1.
    """
    interval = 0.5
    overrides = {"heartbeat_interval_sec": interval, "max_consecutive_fail": 5}
    if busy:
        overrides["throughput_threshold_kbps"] = 1  # any stream counts as busy
    else:
        overrides["switch_threshold"] = 200  # 4 misses cost 100: no regular switch before the 5th
    pair = relay_pair(links=2, client=client_config(tmp_path, **overrides))
    score = pair.client_cfg["score_file"]
    active = active_index(settle(score))
    other = 1 - active

    stream = Stream(pair.client_address, rate=100, size=32)
    try:
        stream.wait_received(30)
        if busy:  # the busy hold would apply to a regular switch: it must not veto leaving a dead link
            data = wait_score(score, lambda d: d["links"][active]["kbps"] > 10 * overrides["throughput_threshold_kbps"],
                              "the active link busy")
            assert data["links"][active]["active"]
        start = line_count(pair.client)
        down_out_before = pair.links[other].counters["down_out"]
        blackholed_at = time.monotonic()
        pair.links[active].set(blackhole=True)

        index = pair.client.wait_for_line(switch_text(pair, active, other, "active link down"), start=start)
        detected_after = time.monotonic() - blackholed_at
        pair.server.wait_for_line("replies now go by link %d" % other)
        received = stream.received()
        stream.wait_received(received + 50)  # traffic resumes, on the other link
    finally:
        stream.stop()
    gap = stream.longest_gap()
    print("\nfailover (%s, heartbeat %.1fs): switch logged %.0f ms after the blackhole, "
          "longest gap in echoes %.0f ms" % ("busy" if busy else "light", interval, detected_after * 1000, gap * 1000))
    wait_counter(pair.links[other], "down_out", down_out_before + 50)
    assert pair.client.count_lines("%s down after 5 missed heartbeats" % link_name(pair, active)) == 1
    assert index > start
    assert gap < 3.0, "longest gap in echoes %.2fs (target < 1.0s)" % gap
    assert pair.client.proc.poll() is None


# ============================================================================
# 2. Recovery with hysteresis
# ============================================================================


@pytest.mark.slow
def test_recovered_link_is_taken_back_only_when_steady_and_better(relay_pair, tmp_path):
    interval = 0.2
    pair = relay_pair(links=2, client=client_config(tmp_path, heartbeat_interval_sec=interval))
    score = pair.client_cfg["score_file"]
    old = active_index(settle(score))
    new = 1 - old

    pair.links[old].set(blackhole=True)
    # "active link down", or already "better by" after a missed heartbeat or two: either leaves it.
    start = line_count(pair.client)
    pair.client.wait_for_line("switch %s -> %s: " % (link_name(pair, old), link_name(pair, new)), start=start)
    pair.client.wait_for_line("%s down after" % link_name(pair, old), start=start)
    pair.links[new].set(delay_s=0.05)  # the link we failed over to is slow: ~100 ms RTT, score ~ -100
    answers_before = pair.links[old].counters["down_out"]
    start = line_count(pair.client)
    pair.links[old].set(blackhole=False)

    up = pair.client.wait_for_line("%s up" % link_name(pair, old), start=start)
    back = pair.client.wait_for_line(switch_text(pair, new, old, "better by"), start=start)
    answers = pair.links[old].counters["down_out"] - answers_before
    lines = lines_from(pair.client, 0)
    assert up < back, "the recovered link was taken before it was up"
    assert switch_lines(pair, start) == [lines[back]], "exactly one switch, back to the recovered link"
    waited = line_time(lines[back]) - line_time(lines[up])
    print("\nrecovery: link %d up, taken back %.2fs later after %d answered heartbeats" % (old, waited, answers))
    assert waited >= (mpudp.RECOVERY_ANSWERS - 1) * interval
    assert answers >= mpudp.RECOVERY_ANSWERS
    data = fresh_score(score, line_time(lines[back]))
    assert active_index(data) == old
    assert data["links"][old]["steady"]


# ============================================================================
# 3 and 4. Switch threshold
# ============================================================================


@pytest.mark.slow
def test_switches_to_a_clearly_better_link(relay_pair, tmp_path):
    pair = relay_pair(links=2, client=client_config(tmp_path))
    score = pair.client_cfg["score_file"]
    slow = active_index(settle(score))
    fast = 1 - slow
    start = line_count(pair.client)
    pair.links[slow].set(delay_s=0.05)  # ~100 ms RTT: score ~ -100 against ~ -0.5

    index = pair.client.wait_for_line(switch_text(pair, slow, fast, "better by"), start=start)
    gain = float(re.search(r"better by (-?[\d.]+)", lines_from(pair.client, index)[0]).group(1))
    assert gain > 25.0
    assert switch_lines(pair, start) == lines_from(pair.client, index)[:1]
    # A link whose RTT jumps from ~0.3 ms to ~100 ms is slow, not dead.
    assert pair.client.count_lines("%s down" % link_name(pair, slow)) == 0
    data = fresh_score(score, line_time(lines_from(pair.client, index)[0]))
    assert active_index(data) == fast


@pytest.mark.slow
def test_no_switch_inside_the_threshold(relay_pair, tmp_path):
    heartbeats = 15  # the observed window: 3 s at the fixture's 0.2 s heartbeat
    pair = relay_pair(links=2, client=client_config(tmp_path))
    score = pair.client_cfg["score_file"]
    first = settle(score)
    active = active_index(first)
    other = 1 - active
    start = line_count(pair.client)
    base = [link.counters["down_out"] for link in pair.links]
    pair.links[active].set(delay_s=0.005)  # ~10 ms RTT: worse than the other link, but by less than 25

    for link, count in zip(pair.links, base):
        wait_counter(link, "down_out", count + heartbeats)
    data = fresh_score(score, time.time())
    links = data["links"]
    assert links[active]["srtt_ms"] >= 5.0, "the added delay must have been measured: %r" % links[active]
    assert 0 < links[other]["score"] - links[active]["score"] < 25.0, links
    assert switch_lines(pair, start) == [], "switched although the gain is below switch_threshold"
    assert active_index(data) == active
    assert [l["switches"] for l in links] == [l["switches"] for l in first["links"]]


# ============================================================================
# 5. No regular switch while the active link is busy
# ============================================================================


@pytest.mark.slow
def test_no_switch_while_busy_then_switch_when_idle(relay_pair, tmp_path):
    threshold = 20.0
    pair = relay_pair(links=2, client=client_config(tmp_path, throughput_threshold_kbps=threshold))
    score = pair.client_cfg["score_file"]
    busy = active_index(settle(score))
    other = 1 - busy

    stream = Stream(pair.client_address, rate=100, size=1200)  # ~1 Mbit/s each way
    stopped_at = None
    try:
        stream.wait_received(20)
        wait_score(score, lambda d: d["links"][busy]["kbps"] > 10 * threshold, "the active link busy")
        start = line_count(pair.client)
        pair.links[busy].set(delay_s=0.05)  # now the other link is much better
        data = wait_score(
            score, lambda d: d["links"][other]["steady"] and d["links"][other]["score"] - d["links"][busy]["score"] > 50,
            "the idle link better by more than 50")
        assert data["links"][busy]["kbps"] > threshold
        wait_counter(pair.links[other], "down_out", pair.links[other].counters["down_out"] + 10)  # 2 s more
        assert switch_lines(pair, start) == [], "switched away from a busy link"
        received = stream.received()
        stream.wait_received(received + 20)  # the stream still flows on the slow link
    finally:
        stream.stop()
        stopped_at = time.time()

    index = pair.client.wait_for_line(switch_text(pair, busy, other, "better by"), start=start)
    line = lines_from(pair.client, index)[0]
    waited = line_time(line) - stopped_at
    print("\nbusy hold: switched %.2fs after the stream stopped" % waited)
    # The throughput is measured over a THROUGHPUT_WINDOW_S window: the stream's bytes must age out first.
    assert waited >= mpudp.THROUGHPUT_WINDOW_S - 1.0
    assert switch_lines(pair, start) == [line]


# ============================================================================
# 6. Loss by direction
# ============================================================================


@pytest.mark.slow
def test_direction_split_loss_in_score_file(relay_pair, tmp_path):
    # With 50 % loss on both links, both are now and then down at once and the client re-handshakes:
    # the direction split must hold across that too (test_loss_direction_survives_a_new_epoch).
    pair = relay_pair(links=2, client=client_config(tmp_path, heartbeat_interval_sec=0.1))
    score = pair.client_cfg["score_file"]
    settle(score)
    base = [link.counters for link in pair.links]
    pair.links[0].set(loss_up=0.5)  # heartbeats lost on the way to the server
    pair.links[1].set(loss_down=0.5)  # echoes lost on the way back
    # More heartbeats than the loss window (20) went by since, on each link.
    wait_counter(pair.links[0], "up_in", base[0]["up_in"] + 30)
    wait_counter(pair.links[1], "down_in", base[1]["down_in"] + 30)

    snapshots, datas = [], []
    after = time.time()
    for _ in range(3):  # three consecutive writes: the loss window is short at first, one write can be unlucky
        data = fresh_score(score, after)
        snapshots.append(data["links"])
        datas.append(data)
        after = data["time"]
    why = "\n".join([json.dumps(d, sort_keys=True) for d in datas] + [
        line for line in lines_from(pair.client, 0) if "down after" in line or "handshake" in line or "switch" in line])
    for links in snapshots:
        for link in links:
            assert link["loss_up"] is not None and link["loss_down"] is not None, why
    mean = lambda index, key: sum(links[index][key] for links in snapshots) / len(snapshots)  # noqa: E731
    print("\nloss: link 0 up %.2f down %.2f, link 1 up %.2f down %.2f" % (
        mean(0, "loss_up"), mean(0, "loss_down"), mean(1, "loss_up"), mean(1, "loss_down")))
    # Means over the three writes: one write once read 0.10 (2 of 20) for a direction without loss.
    assert mean(0, "loss_up") > 0.2, why
    assert mean(0, "loss_down") < 0.1, why
    assert mean(1, "loss_down") > 0.2, why
    assert mean(1, "loss_up") < 0.1, why
    assert mean(0, "loss") > 0.2 and mean(1, "loss") > 0.2, why


# ============================================================================
# 7. Every link down, then one comes back
# ============================================================================


@pytest.mark.slow
def test_all_links_down_then_one_recovers(relay_pair, tmp_path):
    pair = relay_pair(links=2, client=client_config(tmp_path))
    score = pair.client_cfg["score_file"]
    settle(score)
    app = pair.app_socket()
    pair.round_trip(app, b"before")
    start = line_count(pair.client)
    for link in pair.links:
        link.set(blackhole=True)
    for i in range(2):
        pair.client.wait_for_line("%s down after" % link_name(pair, i), start=start)
    assert pair.client.proc.poll() is None, "the client must keep running with every link down"
    data = fresh_score(score, time.time(), lambda d: all(l["state"] == "down" for l in d["links"]),
                       "every link down")
    active = active_index(data)
    revived = 1 - active  # bring back the link that is not the active one: the client must move
    pair.links[revived].set(blackhole=False)
    revived_at = time.monotonic()
    pair.round_trip(app, b"after", timeout=WAIT_S)
    took = time.monotonic() - revived_at
    print("\nall links down: echo round trip again %.2fs after link %d came back" % (took, revived))
    pair.client.wait_for_line("%s up" % link_name(pair, revived), start=start)
    pair.client.wait_for_line(switch_text(pair, active, revived, "active link down"), start=start)
    assert took < 5.0
    assert pair.client.proc.poll() is None


# ============================================================================
# 9. score_file
# ============================================================================


@pytest.mark.slow
def test_score_file_is_atomic_json_without_keys(relay_pair, tmp_path):
    pair = relay_pair(links=2, client=client_config(tmp_path))
    score = pair.client_cfg["score_file"]
    settle(score)
    reads, times, texts = 0, [], []
    deadline = time.monotonic() + WAIT_S
    while len(times) < 4 and time.monotonic() < deadline:  # read in a tight loop across 3 rewrites
        with open(score) as f:
            text = f.read()
        reads += 1
        data = json.loads(text)  # raises on a partial file
        if not times or data["time"] != times[-1]:
            times.append(data["time"])
            texts.append(text)
    assert len(times) == 4, "the score_file was not rewritten 3 times within %ss" % WAIT_S
    assert reads > 100, "the file was read only %d times" % reads
    assert all(b - a >= 0.9 for a, b in zip(times, times[1:])), "written more than once a second: %r" % times

    remotes = [link["remote_addr"] for link in pair.client_cfg["links"]]
    for text in texts:
        data = json.loads(text)
        assert abs(data["time"] - time.time()) < 60
        assert [link["index"] for link in data["links"]] == [0, 1]
        assert [link["address"] for link in data["links"]] == remotes
        active_index(data)
        for link in data["links"]:
            missing = [field for field in LINK_FIELDS if field not in link]
            assert not missing, "link entry lacks %s: %r" % (missing, link)
            assert link["state"] in ("up", "down")
            assert isinstance(link["score"], (int, float)) and isinstance(link["kbps"], (int, float))
            assert isinstance(link["switches"], int) and isinstance(link["active"], bool)
            assert 0.0 <= link["loss"] <= 1.0
        for secret in (pair.client_keys[0], pair.server_keys[0]):
            assert secret not in text, "a private key in the score_file"
    pair.close()
    leftovers = [name for name in os.listdir(str(tmp_path)) if name.startswith("score.json") and name != "score.json"]
    assert leftovers == [], "temporary files left behind: %r" % leftovers


# ============================================================================
# 8. DNS: Server and Client in this process, a stub resolver
# ============================================================================


class StubDNS:
    """A getaddrinfo the test steers: fail, answer an address, or hang until released."""

    def __init__(self, name="relay.test"):
        self.name = name
        self.lock = threading.Lock()
        self.answer = None  # None: socket.gaierror
        self.hang = False
        self.calls = 0
        self.entered_hang = threading.Event()
        self.release = threading.Event()

    def set(self, answer=None, hang=False):
        with self.lock:
            self.answer, self.hang = answer, hang

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        assert host == self.name, host
        with self.lock:
            self.calls += 1
            answer, hang = self.answer, self.hang
        if hang:
            self.entered_hang.set()
            self.release.wait(4 * WAIT_S)
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP, "", tuple(answer))]


@pytest.fixture
def inproc(in_process):
    """A factory: a real-time InProcess whose Resolver asks the stub `dns`, heartbeats every
    0.1 s; a look-up still hanging is released at the end of the test."""
    stubs = []

    def make(dns):
        stubs.append(dns)
        return in_process(getaddrinfo=dns, heartbeat_s=0.1)

    yield make
    for dns in stubs:
        dns.release.set()


def test_dns_client_starts_before_the_name_resolves(inproc):
    dns = StubDNS()
    relay = inproc(dns)
    server = relay.add_server()
    port = relay.address_of(server)[1]
    client = relay.add_client(["relay.test:%d" % port])
    relay.wait_for(lambda: client.links[0].endpoint.failures >= 1, "a failed look-up")
    assert relay.log_count("cannot resolve relay.test:%d" % port) == 1
    link = client.status()["links"][0]
    assert (link["state"], link["resolved"]) == ("down", "-")
    assert client.epoch is None

    dns.set(answer=relay.address_of(server))  # the retry (back-off from 1 s) finds it
    relay.wait_for(lambda: client.epoch is not None, "the handshake")
    relay.round_trip(b"resolved late")
    link = client.status()["links"][0]
    assert link["resolved"] == "127.0.0.1:%d" % port
    assert relay.log_count("relay.test:%d resolves to 127.0.0.1:%d" % (port, port)) == 1


def test_dns_refresh_follows_a_moved_name(inproc):
    dns = StubDNS()
    relay = inproc(dns)
    server = relay.add_server()
    first = relay.add_emulator(relay.address_of(server))
    second = relay.add_emulator(relay.address_of(server))
    dns.set(answer=first.address)
    client = relay.add_client(["relay.test:1"], dns_refresh_interval_sec=1)
    relay.round_trip(b"via the first address")
    assert first.counters["up_out"] > 0 and second.counters["up_in"] == 0

    dns.set(answer=second.address)
    relay.wait_for(lambda: client.links[0].addr == second.address, "the refresh to the second address")
    relay.round_trip(b"via the second address")
    moved = first.counters
    before = second.counters
    for i in range(10):
        relay.round_trip(b"after the move %d" % i)
    assert second.wait_for(lambda c: c["up_out"] >= before["up_out"] + 10 and c["down_out"] >= before["down_out"] + 10,
                           WAIT_S), second.counters  # its counters move just after it forwarded
    assert first.counters["up_in"] == moved["up_in"], "traffic still goes to the old address"
    assert relay.log_count("resolves to %s (was %s)" % (
        mpudp.format_address(second.address), mpudp.format_address(first.address))) == 1


def test_dns_refresh_follows_a_name_to_another_server(inproc):
    dns = StubDNS()
    relay = inproc(dns)
    old, new = relay.add_server(), relay.add_server()  # same keys, another port (e.g. a replaced frp host)
    dns.set(answer=relay.address_of(old))
    client = relay.add_client(["relay.test:1"], dns_refresh_interval_sec=1)
    relay.round_trip(b"old server")
    epoch = client.epoch.tag

    dns.set(answer=relay.address_of(new))
    relay.wait_for(lambda: client.links[0].addr == relay.address_of(new), "the refresh to the new server")
    took = relay.round_trip(b"new server")  # it does not know our epoch: the client must notice and re-handshake
    print("\nname moved to another server: traffic again after %.2fs" % took)
    assert client.epoch.tag != epoch
    assert new.peers[0].epoch is not None and new.peers[0].epoch.tag == client.epoch.tag


@pytest.mark.slow
def test_dns_failed_refresh_keeps_the_address_and_logs_once(inproc):
    dns = StubDNS()
    relay = inproc(dns)
    server = relay.add_server()
    address = relay.address_of(server)
    dns.set(answer=address)
    client = relay.add_client(["relay.test:1"], dns_refresh_interval_sec=1)
    relay.round_trip(b"resolved")
    endpoint = client.links[0].endpoint

    dns.set(answer=None)
    relay.wait_for(lambda: endpoint.failures >= 2, "two failed refreshes")
    assert client.links[0].addr == address
    assert relay.log_count("cannot resolve relay.test:1") == 1
    assert relay.log_count("keeping %s" % mpudp.format_address(address)) == 1
    relay.round_trip(b"still flowing")

    dns.set(answer=address)  # a success, then a new failure is logged again (once)
    relay.wait_for(lambda: endpoint.failures == 0, "a successful refresh")
    dns.set(answer=None)
    relay.wait_for(lambda: endpoint.failures >= 1, "another failed refresh")
    assert relay.log_count("cannot resolve relay.test:1") == 2
    assert client.links[0].addr == address


@pytest.mark.slow
def test_dns_hung_refresh_does_not_stall_forwarding(inproc):
    dns = StubDNS()
    relay = inproc(dns)
    server = relay.add_server()
    dns.set(answer=relay.address_of(server))
    client = relay.add_client(["relay.test:1"], dns_refresh_interval_sec=1)
    relay.round_trip(b"resolved")

    dns.set(answer=relay.address_of(server), hang=True)
    relay.wait_for(dns.entered_hang.is_set, "a refresh that hangs")
    calls = dns.calls
    hung_at = time.monotonic()
    latencies = []
    i = 0
    while time.monotonic() - hung_at < 2.5:  # across two more refresh intervals
        latencies.append(relay.round_trip(b"while hung %d" % i, timeout=5.0))
        i += 1
    assert not dns.release.is_set()
    assert dns.calls == calls, "a second look-up thread for the same name while one hangs"
    assert max(latencies) < 0.5, "forwarding stalled: %r" % latencies
    assert client.status()["links"][0]["state"] == "up"


def test_dns_hung_first_lookup_does_not_stall_the_other_link(inproc):
    dns = StubDNS()
    dns.set(answer=None, hang=True)
    relay = inproc(dns)
    server = relay.add_server()
    literal = "%s:%d" % relay.address_of(server)
    client = relay.add_client(["relay.test:1", literal])
    relay.wait_for(dns.entered_hang.is_set, "the look-up to hang")
    relay.round_trip(b"first")  # may wait for the handshake and for the literal link to come up
    latencies = [relay.round_trip(b"literal link %d" % i, timeout=5.0) for i in range(10)]
    assert max(latencies) < 0.5, "forwarding stalled: %r" % latencies
    assert not dns.release.is_set() and dns.calls == 1
    assert client.active is client.links[1]
    assert client.status()["links"][0]["state"] == "down"


# ============================================================================
# The steady gate, measured exactly in-process
# ============================================================================


@pytest.mark.slow
def test_recovered_link_needs_recovery_answers_intervals_to_be_steady(inproc):
    """RECOVERY_ANSWERS answers a heartbeat interval apart, not fast probes (and not stale probes'
    timeouts) make a recovered link steady again: a flapping link is not chosen."""
    interval = 0.5
    dns = StubDNS()
    relay = inproc(dns)
    server = relay.add_server()
    links = [relay.add_emulator(relay.address_of(server)) for _ in range(2)]
    client = relay.add_client(["%s:%d" % link.address for link in links], heartbeat_interval_sec=interval)
    relay.wait_for(lambda: all(l.health.steady for l in client.links), "both links steady")
    index = 1 - client.active.index
    health = client.links[index].health
    links[index].set(blackhole=True)
    relay.wait_for(lambda: not health.up, "the link down")
    # Down for a while: two more heartbeats lost, so the fast probes of the last moments it was up
    # are over.  (A link back within one fast probe of being declared down gets its next answer
    # from the probe still scheduled, 50 ms later: steady after ~interval + 50 ms, not 2 intervals.)
    dropped = links[index].counters["up_dropped"]
    relay.wait_for(lambda: links[index].counters["up_dropped"] >= dropped + 2, "two more heartbeats lost")
    links[index].set(blackhole=False)
    relay.wait_for(lambda: health.up, "the link up again")
    up_at = health.changed_at
    relay.wait_for(lambda: health.steady, "the link steady")
    steady_at = relay.reactor.time()
    print("\nsteady %.2fs after up (heartbeat %.1fs)" % (steady_at - up_at, interval))
    assert steady_at - up_at >= (mpudp.RECOVERY_ANSWERS - 1) * interval - 0.1  # 0.1: the loop's lateness


# ============================================================================
# Loss direction across a lost and recovered return path, measured in-process
# ============================================================================


def _lose_echoes_until_down(relay, emulator, health):
    """Drop every echo on `emulator` until the client calls the link down, then let them through."""
    emulator.set(loss_down=1.0)
    relay.wait_for(lambda: not health.up, "the link down")
    emulator.set(loss_down=0.0)


def test_loss_direction_when_only_echoes_were_lost(inproc):
    """Heartbeats reached the server, only the echoes were lost: the echo bitmap tells, so it is downlink loss."""
    relay = inproc(StubDNS())
    server = relay.add_server()
    emulators = [relay.add_emulator(relay.address_of(server)) for _ in range(2)]
    client = relay.add_client(["%s:%d" % e.address for e in emulators])
    relay.wait_for(lambda: all(l.health.steady for l in client.links), "both links steady")
    index = 1 - client.active.index  # the other link stays up: no new epoch
    health = client.links[index].health
    epoch = client.epoch.tag
    _lose_echoes_until_down(relay, emulators[index], health)
    relay.wait_for(lambda: health.consecutive_ok >= 2, "two answers again")
    assert client.epoch.tag == epoch
    assert emulators[index].counters["up_dropped"] == 0
    assert health.loss_up() < 0.1, "heartbeats that reached the server counted as uplink loss"
    assert health.loss_down() > 0.2


def test_loss_direction_survives_a_new_epoch(inproc):
    """The same, but the only link goes down, so the client re-handshakes: the server's heartbeat
    bitmap must survive the new epoch, or the lost echoes read as uplink loss."""
    relay = inproc(StubDNS())
    server = relay.add_server()
    emulator = relay.add_emulator(relay.address_of(server))
    client = relay.add_client(["%s:%d" % emulator.address])
    health = client.links[0].health
    relay.wait_for(lambda: health.steady, "the link steady")
    epoch = client.epoch.tag
    _lose_echoes_until_down(relay, emulator, health)  # the only link: the client re-handshakes
    relay.wait_for(lambda: client.epoch.tag != epoch and server.peers[0].epoch.tag == client.epoch.tag,
                    "the new epoch on both sides")
    answered = health.consecutive_ok
    relay.wait_for(lambda: health.consecutive_ok >= answered + 2, "two answers in the new epoch")
    assert emulator.counters["up_dropped"] == 0, "no heartbeat was lost on the way to the server"
    print("\nafter a new epoch: loss_up %.2f loss_down %.2f" % (health.loss_up(), health.loss_down() or 0))
    assert health.loss_up() < 0.1, "heartbeats that reached the server counted as uplink loss"
    assert health.loss_down() > 0.2


@pytest.mark.slow
def test_link_back_at_once_after_down_is_not_steady_sooner(inproc):
    """A link that comes back just as it is declared down: the answers to the fast probes sent
    around that moment (and to the fast probe still scheduled) come within ~0.1 s and must not
    make it steady sooner than (RECOVERY_ANSWERS-1) heartbeat intervals (a flapping link)."""
    interval = 0.5
    relay = inproc(StubDNS())
    server = relay.add_server()
    links = [relay.add_emulator(relay.address_of(server)) for _ in range(2)]
    client = relay.add_client(["%s:%d" % link.address for link in links], heartbeat_interval_sec=interval)
    relay.wait_for(lambda: all(l.health.steady for l in client.links), "both links steady")
    index = 1 - client.active.index
    health = client.links[index].health
    links[index].set(blackhole=True)
    relay.wait_for(lambda: health.consecutive_fail >= max(1, health.max_consecutive_fail - 1), "all but one miss")
    # Back now, with 40 ms each way (80 ms RTT, inside the 100 ms heartbeat timeout): the probe still
    # lost makes the link down, the probes sent just before and after answer right after that.
    links[index].set(blackhole=False, delay_s=0.04)
    relay.wait_for(lambda: not health.up, "the link down")
    relay.wait_for(lambda: health.up, "the link up again")
    up_at = health.changed_at
    relay.wait_for(lambda: health.steady, "the link steady")
    steady_at = relay.reactor.time()
    print("\nback at once: steady %.2fs after up (heartbeat %.1fs)" % (steady_at - up_at, interval))
    assert steady_at - up_at >= (mpudp.RECOVERY_ANSWERS - 1) * interval - 0.1  # 0.1: the loop's lateness
