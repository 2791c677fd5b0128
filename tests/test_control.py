"""The control objects around the data path, each on its own, on a fake clock with fake
sockets: Reactor.call_soon, ClientHandshake, LinkMonitor, Steering and Route, ReturnPath."""

import io
import os

import pytest

from conftest import FakeClock

import mpudp

SERVER = ("192.0.2.1", 5000)


class RecordingSocket:
    """A link socket that keeps what is sent on it; `refuse` makes sends fail."""

    family = 2

    def __init__(self):
        self.sent = []
        self.refuse = None

    def sendto(self, data, addr):
        if self.refuse is not None:
            raise self.refuse
        self.sent.append(bytes(data))
        return len(data)

    def kinds(self):
        return [packet[0] & mpudp.TYPE_MASK for packet in self.sent]


def make_links(count, max_consecutive_fail=3):
    links = []
    for i in range(count):
        spec = mpudp.LinkConfig("192.0.2.1:5000", "192.0.2.1", 5000, 0)
        link = mpudp.ClientLink(i, spec, lambda endpoint: None, max_consecutive_fail, 0.0)
        link.sock = RecordingSocket()
        links.append(link)
    return links


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def reactor(clock):
    made = mpudp.Reactor(clock=clock, log=mpudp.Log(stream=io.StringIO(), clock=clock))
    yield made
    made.close()


def run_until(reactor, clock, when):
    """Fire every timer due up to `when`, in order."""
    while reactor._heap and reactor._heap[0][0] <= when:
        clock.now = max(clock.now, reactor._heap[0][0])
        reactor.run_once(0)
    clock.now = when


# -- Reactor.call_soon --------------------------------------------------------------


def test_call_soon_runs_after_the_current_callback_and_is_guarded(reactor, clock):
    order = []

    def drain():
        order.append("drain starts")
        reactor.call_soon(order.append, "control")
        reactor.call_soon(lambda: 1 / 0)  # a failing report does not stop the next
        reactor.call_soon(order.append, "more control")
        order.append("drain ends")

    reactor.call_at(clock.now, drain)
    reactor.call_at(clock.now, order.append, "next timer")
    reactor.run_once(0)
    assert order == ["drain starts", "drain ends", "control", "more control", "next timer"]
    assert reactor.errors["callback"] == 1


def test_cancel_counts_the_dead_entry_whichever_way_it_is_cancelled(reactor, clock):
    timers = [reactor.call_later(10, lambda: None) for _ in range(100)]
    for timer in timers[:70]:
        timer.cancel()  # the timer's own cancel, not reactor.cancel
    assert len(reactor._heap) < 100 and reactor.pending_timers == 30  # compacted once more than half was dead


# -- ClientHandshake -------------------------------------------------------------------


def handshake_for(reactor, links, epochs):
    secret = os.urandom(32)
    static = mpudp.StaticKeys(secret)
    handshake = mpudp.ClientHandshake(reactor, reactor.log, mpudp.Counters(), static, 3, lambda: links,
                                      epochs.append)
    handshake.retry_ceiling_s = 0.5
    for link in links:
        link.on_send_error = lambda exc: None
    return handshake, static


def server_answer(static, hello, kind, value):
    """The server's COOKIE or WELCOME to `hello` (what ServerHandshake sends)."""
    nonce = mpudp.HELLO_PAYLOAD.unpack_from(hello, mpudp.HEADER_SIZE)[0]
    return mpudp.seal(static.welcome_mac, kind, 0, 3, 0, mpudp.handshake_nonce(0), mpudp.WELCOME_PAYLOAD.pack(nonce, value))


def test_a_handshake_sends_hello_on_every_link_answers_a_cookie_and_makes_the_epoch(reactor, clock):
    links, epochs = make_links(2), []
    handshake, static = handshake_for(reactor, links, epochs)
    handshake.start()
    assert [l.sock.kinds() for l in links] == [[mpudp.TYPE_HELLO], [mpudp.TYPE_HELLO]]
    hello = links[1].sock.sent[0]
    assert mpudp.verify(static.hello_mac, hello, len(hello))
    cookie = os.urandom(16)
    handshake.on_packet(links[1], server_answer(static, hello, mpudp.TYPE_COOKIE, cookie))
    again = links[1].sock.sent[-1]
    assert len(links[1].sock.sent) == 2 and len(links[0].sock.sent) == 1  # on that link only, at once
    assert mpudp.HELLO_PAYLOAD.unpack_from(again, mpudp.HEADER_SIZE)[1] == cookie
    handshake.on_packet(links[1], server_answer(static, hello, mpudp.TYPE_COOKIE, cookie))
    assert len(links[1].sock.sent) == 2 and handshake.counters["stale_welcome"] == 1  # a copy: no second HELLO
    server_nonce = os.urandom(16)
    handshake.on_packet(links[1], server_answer(static, hello, mpudp.TYPE_WELCOME, server_nonce))
    assert len(epochs) == 1 and not handshake.under_way
    client_nonce = mpudp.HELLO_PAYLOAD.unpack_from(hello, mpudp.HEADER_SIZE)[0]
    server_side = mpudp.Epoch(static.secret, client_nonce, server_nonce, is_client=False)
    assert epochs[0].tag == server_side.tag
    packet = mpudp.seal(epochs[0].tx_mac, mpudp.TYPE_DATA, 0, 3, 1, epochs[0].next_nonce(), b"x")
    assert mpudp.verify(server_side.rx_mac, packet, len(packet))
    assert reactor.pending_timers == 0  # no retry left behind


def test_a_handshake_retries_sooner_first_and_changes_its_nonce(reactor, clock):
    links, epochs = make_links(1), []
    handshake, static = handshake_for(reactor, links, epochs)
    handshake.start()
    sent_at = []
    for _ in range(12):
        sent_at.append(clock.now)
        run_until(reactor, clock, reactor._heap[0][0])
    gaps = [round(b - a, 3) for a, b in zip(sent_at, sent_at[1:])]
    assert gaps[:4] == [0.05, 0.1, 0.2, 0.4] and set(gaps[4:]) == {0.5}
    nonces = [mpudp.HELLO_PAYLOAD.unpack_from(p, mpudp.HEADER_SIZE)[0] for p in links[0].sock.sent]
    assert len(set(nonces[:mpudp.HELLO_TRIES_PER_NONCE - 1])) == 1 and len(set(nonces)) >= 3
    assert "no answer from the server" in reactor.log.stream.getvalue()


def test_a_welcome_for_another_nonce_or_under_another_key_makes_nothing(reactor, clock):
    links, epochs = make_links(1), []
    handshake, static = handshake_for(reactor, links, epochs)
    handshake.start()
    hello = links[0].sock.sent[0]
    stranger = mpudp.StaticKeys(os.urandom(32))
    handshake.on_packet(links[0], server_answer(stranger, hello, mpudp.TYPE_WELCOME, os.urandom(16)))
    other = mpudp.seal(static.welcome_mac, mpudp.TYPE_WELCOME, 0, 3, 0, mpudp.handshake_nonce(0),
                       mpudp.WELCOME_PAYLOAD.pack(os.urandom(16), os.urandom(16)))
    handshake.on_packet(links[0], other)
    assert epochs == [] and handshake.under_way
    assert handshake.counters["auth"] == 1 and handshake.counters["stale_welcome"] == 1


# -- LinkMonitor -----------------------------------------------------------------------


class DataPathView:
    """What the monitor reads of the data path."""

    def __init__(self, links):
        secret, c, s = os.urandom(32), os.urandom(16), os.urandom(16)
        self.epoch = mpudp.Epoch(secret, c, s, is_client=True)
        self.server_epoch = mpudp.Epoch(secret, c, s, is_client=False)
        self.route = mpudp.Route((links[0],))


def monitor_for(reactor, links):
    data = DataPathView(links)
    events = []
    monitor = mpudp.LinkMonitor(reactor, mpudp.Counters(), 3, data, lambda l: events.append(("up", l.index)),
                                lambda l: events.append(("down", l.index)))
    monitor.interval_s = 0.5
    errors = []
    for link in links:
        link.on_send_error = lambda exc, link=link: errors.append((link.index, exc))
    return monitor, data, events, errors


def answer(link, data, clock, monitor):
    """Echo the link's last heartbeat (as the server does, bitmap: all received)."""
    packet = link.sock.sent[-1]
    seq = mpudp.HEARTBEAT_PAYLOAD.unpack_from(packet, mpudp.HEADER_SIZE)[0]
    monitor.on_echo(link, seq, 0xFFFFFFFF, 0, 0)
    return seq


def test_heartbeats_carry_active_only_on_carriers_and_an_echo_brings_a_link_up(reactor, clock):
    links = make_links(2)
    monitor, data, events, _ = monitor_for(reactor, links)
    for link in links:
        monitor.beat_now(link)
    reactor.run_once(0)
    flags = [l.sock.sent[0][0] for l in links]
    assert flags == [mpudp.TYPE_HEARTBEAT | mpudp.FLAG_ACTIVE, mpudp.TYPE_HEARTBEAT]
    for link in links:
        packet = link.sock.sent[0]
        assert mpudp.verify(data.server_epoch.rx_mac, packet, len(packet))
    clock.advance(0.02)
    answer(links[1], data, clock, monitor)
    assert events == [("up", 1)] and links[1].health.srtt == pytest.approx(0.02)


def test_misses_take_a_link_down_fast_and_forget_leaves_no_timer(reactor, clock):
    links = make_links(1, max_consecutive_fail=3)
    monitor, data, events, _ = monitor_for(reactor, links)
    link = links[0]
    monitor.beat_now(link)
    reactor.run_once(0)
    clock.advance(0.01)
    answer(link, data, clock, monitor)
    start = clock.now
    deadline = start + 10
    while ("down", 0) not in events and clock.now < deadline:
        run_until(reactor, clock, reactor._heap[0][0])
    assert ("down", 0) in events
    # First miss after up to one interval plus a timeout, then probes every half timeout:
    # far sooner than three intervals plus three timeouts.
    assert clock.now - start < 0.5 + 3 * 0.1 + 0.2, clock.now - start
    monitor.forget(link)
    assert reactor.pending_timers == 0 and not monitor.watching(link)


def test_a_refused_heartbeat_is_reported_not_raised(reactor, clock):
    links = make_links(1)
    monitor, data, events, errors = monitor_for(reactor, links)
    links[0].sock.refuse = OSError(101, "Network is unreachable")
    monitor.beat_now(links[0])
    reactor.run_once(0)
    assert [(i, e.errno) for i, e in errors] == [(0, 101)] and reactor.errors["callback"] == 0


# -- Steering and Route ----------------------------------------------------------------


def client_config(links=3, **extra):
    """A client's config file as parsed JSON: `links` links to one server, and `extra` keys."""
    server, client = mpudp.generate_private_key(), mpudp.generate_private_key()
    section = {"listen_addr": "127.0.0.1:0", "links": [{"remote_addr": "192.0.2.1:5000"}] * links,
               "client_private_key": mpudp.encode_key(client),
               "server_public_key": mpudp.encode_key(mpudp.public_key(server))}
    section.update(extra)
    return {"mode": "client", "client": section}


def steering_config(**extra):
    return mpudp.parse_config(client_config(**extra)).section


def bring_up(link, now, rtt=0.01, answers=4):
    for seq in range(1, answers + 1):
        link.health.on_sent(seq + 1000 * link.index, now)
        link.health.on_echo(seq + 1000 * link.index, 1, now + rtt)


def test_steering_fails_over_and_publishes_a_new_route_each_time(clock):
    links = make_links(2)
    steering = mpudp.Steering(steering_config(), mpudp.Log(stream=io.StringIO()))
    first = steering.first_choice(links, clock.now)
    assert first.carriers == (links[0],) and steering.active is links[0]
    for link in links:
        bring_up(link, clock.now)
    assert steering.evaluate(links, clock.now).carriers == (links[0],)
    links[0].health.force_down(clock.now)
    after = steering.evaluate(links, clock.now)
    assert after.carriers == (links[1],) and first.carriers == (links[0],)  # the old route is untouched
    assert after.data_flags == mpudp.TYPE_DATA | mpudp.FLAG_ACTIVE and links[1].switches == 1


def test_redundancy_puts_the_best_other_links_in_the_route(clock):
    links = make_links(3)
    steering = mpudp.Steering(steering_config(redundancy=2), mpudp.Log(stream=io.StringIO()))
    for link, rtt in zip(links, (0.01, 0.05, 0.02)):
        bring_up(link, clock.now, rtt)
    steering.first_choice(links, clock.now)
    route = steering.evaluate(links, clock.now)
    assert route.carriers == (links[0], links[2])
    assert route.data_flags == mpudp.TYPE_DATA | mpudp.FLAG_ACTIVE | (1 << mpudp.COPIES_SHIFT)
    assert route.heartbeat_flags(links[2]) & mpudp.FLAG_ACTIVE
    assert route.heartbeat_flags(links[1]) == mpudp.TYPE_HEARTBEAT


def test_auto_redundancy_adds_a_copy_while_the_active_link_misses(clock):
    links = make_links(2, max_consecutive_fail=10)
    steering = mpudp.Steering(steering_config(redundancy="auto"), mpudp.Log(stream=io.StringIO()))
    for link in links:
        bring_up(link, clock.now, answers=49)  # one miss in 50 costs 10 points: no switch
    steering.first_choice(links, clock.now)
    assert len(steering.evaluate(links, clock.now).carriers) == 1
    links[0].health.on_sent(99, clock.now)
    links[0].health.on_timeout(99, clock.now + 1)
    assert steering.evaluate(links, clock.now).carriers == (links[0], links[1])


def test_a_link_without_a_socket_carries_nothing(clock):
    links = make_links(1)
    steering = mpudp.Steering(steering_config(), mpudp.Log(stream=io.StringIO()))
    bring_up(links[0], clock.now)
    steering.first_choice(links, clock.now)
    links[0].sock = None
    assert steering.evaluate(links, clock.now).carriers == ()


# -- ReturnPath ------------------------------------------------------------------------


A, B, C = ("192.0.2.1", 1), ("192.0.2.2", 2), ("192.0.2.3", 3)
COPIES2 = 1 << mpudp.COPIES_SHIFT


def trusting(*addrs):
    """A ReturnPath whose addresses have answered their challenges (and no path yet)."""
    path = mpudp.ReturnPath()
    for addr in addrs:
        assert path.observe(0, addr, 0, 0, 100) == mpudp.PATH_CHALLENGE
        assert not path.validate(addr, path.unvalidated[addr].token)  # validated; seq 0 moves nothing
    assert path.addr is None and path.unvalidated == {}
    return path


def test_the_return_path_follows_the_newest_active_packet_only():
    path = trusting(A, B)
    assert path.observe(0, A, 5, 0, 100) == mpudp.PATH_MOVED and path.addrs == [A] and path.links == ((0, A),)
    assert path.observe(1, B, 7, 0, 100) == mpudp.PATH_MOVED and path.addrs == [B]
    assert path.observe(0, A, 6, 0, 100) == mpudp.PATH_SAME and path.addrs == [B]  # late: never moves it back
    assert path.observe(1, B, 8, 0, 100) == mpudp.PATH_SAME  # same place: no change to report


def test_with_copies_the_slower_link_carries_too_and_a_new_epoch_restarts_the_numbers():
    path = trusting(A, B, C)
    path.observe(0, A, 10, COPIES2, 100)
    assert path.observe(1, B, 9, COPIES2, 100) == mpudp.PATH_MOVED  # the slower copy's link joins, though older
    assert sorted(path.addrs) == [A, B] and path.links == ((0, A), (1, B))
    assert path.observe(1, B, 8, COPIES2, 100) == mpudp.PATH_SAME  # late even for its own link
    path.new_epoch()
    assert path.observe(2, C, 1, 0, 100) == mpudp.PATH_MOVED and path.addrs == [C]  # numbers start again at 1
    path.clear()
    assert path.addr is None and path.addrs == [] and path.links == ()


# -- DataLiveness ------------------------------------------------------------------------


def test_data_sent_and_never_counted_by_the_server_makes_a_link_unfit_then_retried_later():
    live, now = mpudp.DataLiveness(), 100.0
    assert not live.on_echo(0, 0, server_rx=0, server_tx=0, now=now)  # the first echo sets the counts
    assert not live.on_echo(50, 0, 26, 0, now + 0.5)  # half of 50 lost: random loss, not a verdict
    assert not live.on_echo(60, 0, 26, 0, now + 1.0)  # 10 sent, none arrived: not yet enough to judge
    assert live.on_echo(66, 0, 26, 0, now + 1.5)  # 16 in a row, none arrived: no data gets through
    assert live.lost_way == "up" and not live.fit(now + 1.5)
    assert live.fit(now + 1.5 + mpudp.DATA_RETRY_FIRST_S)  # tried again after the hold
    assert live.on_echo(100, 0, 26, 0, now + 20)  # still nothing: unfit again, for longer
    assert live.unfit_until == now + 20 + 2 * mpudp.DATA_RETRY_FIRST_S
    assert not live.on_echo(150, 0, 56, 0, now + 60)  # data again: the hold is short again
    assert live.hold_s == mpudp.DATA_RETRY_FIRST_S


def test_data_the_server_sent_that_never_arrived_makes_a_link_unfit():
    live = mpudp.DataLiveness()
    live.on_echo(0, received_now=3, server_rx=0, server_tx=3, now=0.0)
    assert not live.on_echo(0, 20, 0, 30, 1.0)  # 10 of 27 lost
    assert live.on_echo(0, 20, 0, 30 + mpudp.DATA_LOST_PACKETS, 2.0) and live.lost_way == "down"


def test_an_idle_link_or_a_restarted_server_is_no_verdict():
    live = mpudp.DataLiveness()
    for i in range(50):  # heartbeats only: nothing sent either way
        assert not live.on_echo(7, 9, 7, 9, float(i))
    assert not live.on_echo(7 + 100, 9, 0, 0, 60.0)  # the server's counts went back: a new server
    assert live.fit(60.0)
    assert not live.on_echo(0xFFFFFFFF + 108, 9, 100, 0, 61.0)  # our count wraps at 32 bits, as the wire's


# -- ReturnPath: path validation --------------------------------------------------------


def test_a_new_address_is_challenged_and_gets_at_most_three_times_its_bytes_until_it_answers():
    path = mpudp.ReturnPath()
    assert path.observe(0, A, 1, 0, 100) == mpudp.PATH_CHALLENGE  # even the first address
    assert path.addrs == [A] and path.addr is None  # replies within its budget, not yet the path
    path.spent(250)
    assert path.addrs == [A]
    path.spent(50)  # 300 = 3 x 100 bytes: spent
    assert path.addrs == []
    assert not path.validate(A, path.unvalidated[A].token ^ 1)  # a wrong token validates nothing
    assert path.validate(A, path.unvalidated[A].token) and path.addr == A and path.addrs == [A]
    assert path.observe(0, A, 2, 0, 100) == mpudp.PATH_SAME  # validated: no more challenges


def test_a_racer_from_another_address_does_not_move_the_path():
    path = mpudp.ReturnPath()
    path.observe(0, A, 1, 0, 100)
    path.validate(A, path.unvalidated[A].token)
    for seq in range(2, 50):  # the racer's copy always arrives first; A's originals are duplicates
        assert path.observe(0, C, seq, 0, 100) == mpudp.PATH_CHALLENGE
        path.spent(100)
    assert path.addr == A and path.links == ((0, A),)
    assert path.addrs == [A, C]  # C gets replies only while its 3x budget lasts
    for _ in range(200):
        path.spent(100)
    assert path.addrs == [A]


# -- protocol versions ---------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_a_server_of_another_protocol_version_is_refused_with_a_line_saying_so(reactor, clock, version):
    links, epochs = make_links(1), []
    handshake, static = handshake_for(reactor, links, epochs)
    handshake.start()
    hello = links[0].sock.sent[0]
    assert mpudp.parse_header(hello)[4] & mpudp.SEQ_MASK == mpudp.PROTOCOL_VERSION
    nonce = mpudp.HELLO_PAYLOAD.unpack_from(hello, mpudp.HEADER_SIZE)[0]
    old = mpudp.seal(static.welcome_mac, mpudp.TYPE_WELCOME, 0, 3, 0, version if version > 1 else 0,  # 1: 0 there
                     mpudp.WELCOME_PAYLOAD.pack(nonce, os.urandom(16)))
    handshake.on_packet(links[0], old)
    assert epochs == [] and handshake.counters["old_version"] == 1
    assert "the server answers in wire protocol version %d, this client speaks %d" % (
        version, mpudp.PROTOCOL_VERSION) in reactor.log.stream.getvalue()


@pytest.mark.parametrize("version", [1, 2])
def test_a_client_of_another_protocol_version_is_refused_with_a_line_saying_so(clock, version):
    reactor = mpudp.Reactor(clock=clock, log=mpudp.Log(stream=io.StringIO(), clock=clock))
    sent = []
    handshake = mpudp.ServerHandshake(reactor, reactor.log, mpudp.Counters(), lambda p, a: sent.append(bytes(p)))
    peer = mpudp.Peer(4, os.urandom(32), mpudp.Endpoint("127.0.0.1:9", "127.0.0.1", 9, lambda e: None))
    nonce = os.urandom(16)
    old = mpudp.seal(peer.static.hello_mac, mpudp.TYPE_HELLO, 0, 4, 0,
                     mpudp.epoch_tag(nonce) << mpudp.SEQ_BITS | (version if version > 1 else 0),
                     mpudp.HELLO_PAYLOAD.pack(nonce, bytes(16)))
    for _ in range(3):
        handshake.on_hello(peer, 0, ("192.0.2.1", 4000), old)
    assert sent == [] and handshake.counters["old_version"] == 3  # no answer at all
    text = reactor.log.stream.getvalue()
    assert text.count("client 4 speaks wire protocol version %d, this server speaks %d: it is refused" % (
        version, mpudp.PROTOCOL_VERSION)) == 1
    reactor.close()
