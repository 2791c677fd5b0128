"""Path MTU: the search (PathMtuSearch, pure), the prober that runs it on a fake clock
with fake sockets, the server's answer, and what steering does with a link that is
known to drop the datagrams the applications send."""

import io
import os
import random

import pytest

from conftest import FakeClock
from helpers import drain
from test_control import RecordingSocket, bring_up, make_links, run_until, steering_config

import mpudp

V4 = mpudp.IPV4_UDP_HEADERS
CEILING = mpudp.MAX_UDP_PAYLOAD  # loopback: 65535 - 28


def search_through(path_size, ceiling=CEILING, lose=lambda size, attempt: False):
    """Run a search against a path that passes datagrams up to `path_size`; the sizes probed."""
    search = mpudp.PathMtuSearch(ceiling, V4)
    probed = []
    for attempt in range(200):
        size = search.next_size()
        if size is None:
            return search, probed
        probed.append(size)
        if size <= path_size and not lose(size, attempt):
            search.on_answered(size)
        else:
            search.on_lost(size)
    raise AssertionError("the search did not end: %s" % probed[-20:])


@pytest.mark.parametrize("path_size", [1272, 1300, 1392, 1452, 1472, 1500, 4000, 9000 - 28, 30000, CEILING])
def test_the_search_ends_within_its_granularity_of_the_path(path_size):
    search, probed = search_through(path_size)
    assert path_size - mpudp.PMTU_GRANULARITY <= search.confirmed <= path_size
    if path_size >= CEILING:
        assert search.limit is None and probed == [CEILING]  # one probe: the interface's MTU passes
    else:
        assert path_size < search.limit <= path_size + mpudp.PMTU_GRANULARITY
        assert search.carries(search.confirmed - mpudp.OVERHEAD)
        assert not search.carries(search.limit - mpudp.OVERHEAD)
    assert len(probed) <= 3 * 20  # three tries per lost size, a binary search of 64 KB


def test_the_search_on_a_1500_byte_path_tries_the_interface_the_base_then_1500():
    search, probed = search_through(1500 - V4, ceiling=9000 - V4)
    assert probed[:5] == [9000 - V4] * 3 + [1280 - V4, 1500 - V4]
    assert search.confirmed == 1500 - V4 and search.limit <= 1500 - V4 + mpudp.PMTU_GRANULARITY


def test_seeded_paths_and_random_probe_loss_never_make_a_passing_size_a_limit():
    rng = random.Random(8899)
    for _ in range(300):
        path_size = rng.randrange(1280 - V4, CEILING)
        # One probe in five lost at random: a size is given up only after three losses in a row.
        losses = {}

        def lose(size, attempt, losses=losses):
            losses[size] = losses.get(size, 0) + 1
            return losses[size] <= 2 and rng.random() < 0.2

        search, _ = search_through(path_size, lose=lose)
        assert search.limit is None or search.limit > path_size, (path_size, search.limit)
        assert search.confirmed <= path_size


def test_a_path_below_the_base_ends_the_search_with_the_base_as_its_limit():
    search, probed = search_through(1000)
    assert search.limit == 1280 - V4 and search.confirmed == 0 and len(probed) == 6


def test_a_lost_size_is_a_limit_at_once_and_a_new_search_relaxes_it_only_at_its_end():
    search, _ = search_through(1300, ceiling=1500 - V4)
    limit = search.limit
    assert 1300 < limit <= 1308
    search.raise_()  # PMTU_RAISE_S later; the path has grown to 1472
    assert search.next_size() == 1500 - V4 and search.limit == limit  # still the old limit while probing
    search.on_answered(1500 - V4)
    assert search.next_size() is None and search.limit is None and search.confirmed == 1500 - V4
    search.restart(1500 - V4, V4)  # data stopped passing: search again from nothing
    assert search.confirmed == 0 and search.limit is None
    for _ in range(mpudp.PMTU_PROBE_TRIES - 1):
        assert not search.on_lost(1500 - V4)
    assert search.on_lost(1500 - V4) and search.limit == 1500 - V4  # tightened before the search ends


def test_recent_max_remembers_for_one_to_two_periods():
    recent = mpudp.RecentMax(15.0)
    assert recent.value(0.0) == 0
    recent.note(1400)
    recent.note(200)
    assert recent.value(14.0) == 1400
    assert recent.value(16.0) == 1400  # rotated: in the previous bucket
    assert recent.value(31.0) == 0
    recent.note(900)
    assert recent.value(32.0) == 900


def test_recent_min_forgets_an_old_least_after_one_to_two_periods():
    """A link's least RTT: a path that moved to a longer one is seen anew."""
    recent = mpudp.RecentMin(10.0)
    assert recent.value() is None
    recent.note(0.020, 0.0)
    recent.note(0.050, 5.0)
    assert recent.value() == 0.020
    recent.note(0.040, 12.0)  # rotated: 0.020 is in the previous bucket
    assert recent.value() == 0.020
    recent.note(0.045, 23.0)  # rotated again: 0.020 is gone
    assert recent.value() == 0.040
    recent.note(0.030, 24.0)
    assert recent.value() == 0.030


# -- steering ---------------------------------------------------------------------------------


def test_a_link_known_to_drop_the_datagrams_sent_lately_is_left_for_one_that_carries_them():
    clock = FakeClock()
    links = make_links(2)
    largest = [0]
    log = io.StringIO()
    steering = mpudp.Steering(steering_config(), mpudp.Log(stream=log), lambda now: largest[0])
    for link, rtt in zip(links, (0.01, 0.03)):
        bring_up(link, clock.now, rtt)
    steering.first_choice(links, clock.now)
    assert steering.evaluate(links, clock.now).carriers == (links[0],)
    links[0].pmtu.limit = 1301  # datagrams of 1301 bytes or more do not pass: 1268-byte payloads do
    route = steering.evaluate(links, clock.now)
    assert route.carriers == (links[0],)  # nothing large sent: it still carries everything there is
    assert route.watch_above == 1301 - 1 - mpudp.OVERHEAD and route.carried_up_to == 1268
    largest[0] = 1269
    route = steering.evaluate(links, clock.now)
    assert route.carriers == (links[1],) and route.carried_up_to == mpudp.MAX_DATA_PAYLOAD
    assert "active link down" in log.getvalue()
    # Both too small: size is no reason to move (both are up), and the log says what to do.
    links[1].pmtu.limit = 1201
    route = steering.evaluate(links, clock.now)
    assert route.carriers == (links[1],) and route.carried_up_to == 1168
    assert "1269-byte datagrams are larger than any link that is up carries" in log.getvalue()
    assert "link 0 at most 1268, link 1 at most 1168" in log.getvalue()


# -- the prober ---------------------------------------------------------------------------------


class ProbedPath:
    """Answers the probes on a link's RecordingSocket as a server behind a path that
    passes datagrams up to `size` would; the probes stay in `sent` for the test."""

    def __init__(self, link, data, prober, size):
        self.link, self.data, self.prober, self.size = link, data, prober, size
        self.seen = 0

    def answer(self):
        for packet in self.link.sock.sent[self.seen:]:
            self.seen += 1
            if packet[0] & mpudp.TYPE_MASK != mpudp.TYPE_PROBE:
                continue
            assert mpudp.verify(self.data.server_epoch.rx_mac, packet, len(packet))
            assert packet[mpudp.HEADER_SIZE + 4:-mpudp.MAC_SIZE] == bytes(len(packet) - mpudp.OVERHEAD - 4)
            if len(packet) <= self.size:
                probe_id = mpudp.PROBE_PAYLOAD.unpack_from(packet, mpudp.HEADER_SIZE)[0]
                self.prober.on_ack(self.link, probe_id, len(packet))


    def answer_until_found(self, reactor, clock):
        """Answer, and move the clock on 50 ms a step, until the search ends (5 s at most)."""
        for _ in range(100):
            self.answer()
            if not self.link.pmtu.searching:
                return
            clock.advance(0.05)
            run_until(reactor, clock, clock.now)


class UnfragmentedSocket(RecordingSocket):
    """send_unfragmented's socket options are recorded; a size over `refuse_over` is
    refused as the kernel refuses a probe larger than the route's MTU."""

    def __init__(self, refuse_over=None):
        super().__init__()
        self.options = []
        self.refuse_over = refuse_over

    def getsockopt(self, level, option):
        return 1  # IP_PMTUDISC_WANT

    def setsockopt(self, level, option, value):
        self.options.append((level, option, value))

    def sendto(self, data, addr):
        if self.refuse_over is not None and len(data) > self.refuse_over:
            raise OSError(90, "Message too long")
        return super().sendto(data, addr)


def prober_for(reactor, links):
    from test_control import DataPathView
    data = DataPathView(links)
    limits = []
    prober = mpudp.PathProber(reactor, mpudp.Counters(), 3, data, lambda link: limits.append(link.pmtu.limit))
    for link in links:
        link.endpoint.family = 2
        link.sock = UnfragmentedSocket()
        link.on_send_error = lambda exc: None
        bring_up(link, reactor.time())
    return prober, data, limits


@pytest.fixture
def fake(monkeypatch):
    clock = FakeClock()
    reactor = mpudp.Reactor(clock=clock, log=mpudp.Log(stream=io.StringIO(), clock=clock))
    # The route's MTU of a 1500-byte interface, whatever this machine's routes are.
    monkeypatch.setattr(mpudp, "route_mtu", lambda family, addr, interface="": 1500)
    yield reactor, clock
    reactor.close()


def test_the_prober_finds_the_path_mtu_with_df_probes_sealed_under_the_epoch(fake):
    reactor, clock = fake
    links = make_links(1)
    prober, data, limits = prober_for(reactor, links)
    link = links[0]
    path = ProbedPath(link, data, prober, 1400)
    prober.on_link_up(link)
    path.answer_until_found(reactor, clock)
    assert not link.pmtu.searching
    assert 1400 - mpudp.PMTU_GRANULARITY <= link.pmtu.confirmed <= 1400 < link.pmtu.limit
    assert limits[-1] == link.pmtu.limit
    # Each probe went out with DF and no local fragmentation, and the option was put back.
    options = link.sock.options
    assert options[0] == (mpudp.socket.IPPROTO_IP, mpudp.IP_MTU_DISCOVER, mpudp.PMTUDISC_PROBE)
    assert options[1] == (mpudp.socket.IPPROTO_IP, mpudp.IP_MTU_DISCOVER, 1)
    assert len(options) == 2 * sum(1 for p in link.sock.sent if p[0] & mpudp.TYPE_MASK == mpudp.TYPE_PROBE)
    # Nothing more until PMTU_RAISE_S later: then larger sizes are tried again, the interface's first.
    sent = len(link.sock.sent)
    run_until(reactor, clock, clock.now + mpudp.PMTU_RAISE_S - 1)
    assert len(link.sock.sent) == sent
    run_until(reactor, clock, clock.now + 1)
    assert [len(p) for p in link.sock.sent[sent:]] == [1500 - V4]


def test_a_probe_lost_while_heartbeats_are_lost_too_is_no_verdict_on_its_size(fake):
    reactor, clock = fake
    links = make_links(1)
    prober, data, limits = prober_for(reactor, links)
    link = links[0]
    prober.on_link_up(link)
    first = [p for p in link.sock.sent if p[0] & mpudp.TYPE_MASK == mpudp.TYPE_PROBE]
    assert [len(p) for p in first] == [1500 - V4]
    link.health.on_sent(9, clock.now + 0.05)
    link.health.on_timeout(9, clock.now + 0.1)  # a heartbeat missed: the link itself is in trouble
    run_until(reactor, clock, clock.now + 5)
    assert link.pmtu.tries == 0 and link.pmtu.limit is None and limits == []
    sent = len(link.sock.sent)
    link.health.on_sent(10, clock.now)
    link.health.on_echo(10, 1, clock.now + 0.01)  # it answers again
    assert link.health.consecutive_fail == 0
    prober.tick()
    assert len(link.sock.sent) == sent + 1  # the search goes on


def test_a_probe_the_kernel_refuses_as_too_long_is_a_lost_size_at_once(fake):
    reactor, clock = fake
    links = make_links(1)
    prober, data, limits = prober_for(reactor, links)
    link = links[0]
    link.sock.refuse_over = 1400
    path = ProbedPath(link, data, prober, 1400)
    prober.on_link_up(link)
    assert link.pmtu.limit == 1500 - V4  # refused locally: no need for three tries
    path.answer_until_found(reactor, clock)
    assert 1400 - mpudp.PMTU_GRANULARITY <= link.pmtu.confirmed <= 1400 < link.pmtu.limit


def test_a_late_or_forged_probe_ack_moves_nothing(fake):
    reactor, clock = fake
    links = make_links(1)
    prober, data, limits = prober_for(reactor, links)
    link = links[0]
    prober.on_link_up(link)
    probe = link.sock.sent[-1]
    probe_id = mpudp.PROBE_PAYLOAD.unpack_from(probe, mpudp.HEADER_SIZE)[0]
    prober.on_ack(link, probe_id + 1, len(probe))  # another id
    prober.on_ack(link, probe_id, len(probe) - 8)  # another size
    assert link.pmtu.confirmed == 0
    run_until(reactor, clock, clock.now + 2 * link.health.timeout() + 0.01)  # given up on once
    assert link.pmtu.tries == 1
    prober.on_ack(link, probe_id, len(probe))  # the first one's answer, too late
    assert link.pmtu.confirmed == 0


# -- the server ---------------------------------------------------------------------------------


def test_the_server_answers_a_probe_with_its_id_at_its_size_and_nothing_else(bench):
    sock = bench.links[1]

    def answers():
        got = []
        bench.settle(lambda: got.extend(p for p, _ in drain(sock)) or got, timeout=0.3)
        return got

    for probe_id, size in enumerate((36, 1252, 1400, 9000), 1):
        payload = mpudp.PROBE_PAYLOAD.pack(probe_id) + bytes(size - mpudp.OVERHEAD - mpudp.PROBE_PAYLOAD.size)
        bench.send(1, mpudp.TYPE_PROBE, payload)
        got = answers()
        assert [len(p) for p in got] == [size]
        answer = got[0]
        assert answer[0] == mpudp.TYPE_PROBE_ACK and answer[1] == 1  # on the link it came on
        assert mpudp.verify(bench.epoch.rx_mac, answer, len(answer))
        assert mpudp.PROBE_PAYLOAD.unpack_from(answer, mpudp.HEADER_SIZE)[0] == probe_id
    # Forged (a bad MAC) or replayed: dropped, counted, no answer.
    forged_mac = mpudp.make_mac(os.urandom(32))
    bench.send(1, mpudp.TYPE_PROBE, mpudp.PROBE_PAYLOAD.pack(9) + bytes(1000), mac=forged_mac)
    bench.send(1, mpudp.TYPE_PROBE, mpudp.PROBE_PAYLOAD.pack(9) + bytes(1000), seq=1)
    assert bench.settle(lambda: bench.server.counters["auth"] >= 1 and bench.server.counters["replay"]
                        + bench.server.counters["duplicate"] >= 1)
    assert answers() == []
