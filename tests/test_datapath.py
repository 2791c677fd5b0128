"""The client's data path, driven with fake sockets: every datagram an application
sends leaves byte-identical (under a valid MAC) or not at all, whatever send errors,
route changes and redundancy changes come in between; and control never runs inside
a drain.

A seeded property test: each seed plays a random interleaving of application
datagrams (random sizes, several applications), link send errors (ENETUNREACH,
EAGAIN, GSO refusals) and route changes (one link, several links carrying copies,
none).  Control here is the worst case: every send error it hears of moves the route.
The server's side of the epoch then checks every packet that left.
"""

import errno
import os
import random

import pytest

import mpudp

SEEDS = range(int(os.environ.get("MPUDP_DATAPATH_SEEDS", "120")))
SERVER = ("127.0.0.1", 9)


class FakeReactor:
    """What the data path uses of a Reactor: the clock, readers, and call_soon, whose
    calls run only when the test says (after a drain, as the real reactor does)."""

    def __init__(self):
        self.soon = []
        self.in_drain = False

    def time(self):
        return 0.0

    def add_reader(self, sock, handler):
        pass

    def remove_reader(self, sock):
        pass

    def call_soon(self, callback, *args):
        self.soon.append((callback, args))

    def run_soon(self):
        while self.soon:
            callback, args = self.soon.pop(0)
            callback(*args)


class FakeListenSocket:
    """The client's listen socket: datagrams queued by the test, replies recorded."""

    def __init__(self):
        self.queue = []

    def recvfrom_into(self, view):
        if not self.queue:
            raise BlockingIOError
        data, addr = self.queue.pop(0)
        view[:len(data)] = data
        return len(data), addr

    def sendto(self, data, addr):
        return len(data)


class FakeLinkSocket:
    """A link's socket: what leaves is recorded, split into datagrams as UDP_SEGMENT does;
    some sends fail as the rng says."""

    def __init__(self, rng, index, wire, error_rate):
        self.rng, self.index, self.wire, self.error_rate = rng, index, wire, error_rate

    def _fail(self):
        roll = self.rng.random()
        if roll < self.error_rate:
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
        if roll < 2 * self.error_rate:
            raise BlockingIOError

    def sendto(self, data, addr):
        self._fail()
        self.wire.append((self.index, bytes(data)))
        return len(data)

    def sendmsg(self, buffers, ancdata, flags, addr):
        if self.rng.random() < self.error_rate:
            raise OSError(errno.EINVAL, "Invalid argument")  # the kernel refuses the batch
        self._fail()
        data = b"".join(bytes(b) for b in buffers)
        seg = mpudp.SEGMENT_SIZE.unpack(ancdata[0][2])[0]
        for start in range(0, len(data), seg):
            self.wire.append((self.index, data[start:start + seg]))
        return len(data)


class WorstControl(mpudp.ClientControl):
    """Every send error moves the route somewhere else at random."""

    def __init__(self, reactor, data, links, rng):
        self.reactor, self.data, self.links, self.rng = reactor, data, links, rng
        self.errors = 0

    def on_send_error(self, link, exc):
        assert not self.reactor.in_drain, "control ran inside a drain"
        self.errors += 1
        self.data.route = random_route(self.rng, self.links)


def random_route(rng, links):
    count = rng.choice([0, 1, 1, 1, 2, 3])
    return mpudp.Route(tuple(rng.sample(links, count)))


def client_config():
    server_keys = mpudp.generate_private_key()
    client_key = mpudp.generate_private_key()
    return mpudp.parse_config({"mode": "client", "client": {
        "listen_addr": "127.0.0.1:0", "links": [{"remote_addr": "127.0.0.1:9"}] * 3,
        "client_private_key": mpudp.encode_key(client_key),
        "server_public_key": mpudp.encode_key(mpudp.public_key(server_keys))}}).section


def make_path(seed, error_rate=0.08):
    rng = random.Random(seed)
    config = client_config()
    reactor = FakeReactor()
    log = mpudp.Log(stream=open(os.devnull, "w"))
    wire = []
    links = []
    for i in range(3):
        spec = mpudp.LinkConfig("127.0.0.1:9", "127.0.0.1", 9, 0)
        link = mpudp.ClientLink(i, spec, lambda endpoint: None, 5, 0.0)
        link.sock = FakeLinkSocket(rng, i, wire, error_rate)
        links.append(link)
    data = mpudp.ClientDataPath(config, reactor, log, mpudp.Counters(), None)
    control = WorstControl(reactor, data, links, rng)
    data.control = control
    for link in links:
        link.on_send_error = (lambda l: lambda exc: reactor.call_soon(control.on_send_error, l, exc))(link)
    data.listen_sock = FakeListenSocket()
    secret = os.urandom(32)
    client_nonce, server_nonce = os.urandom(16), os.urandom(16)
    data.epoch = mpudp.Epoch(secret, client_nonce, server_nonce, is_client=True)
    server_epoch = mpudp.Epoch(secret, client_nonce, server_nonce, is_client=False)
    return rng, reactor, data, control, links, wire, server_epoch


def drain(reactor, data):
    reactor.in_drain = True
    try:
        data.on_local_readable()
    finally:
        reactor.in_drain = False
    reactor.run_soon()


@pytest.mark.parametrize("seed", SEEDS)
def test_every_datagram_leaves_byte_identical_or_not_at_all(seed):
    rng, reactor, data, control, links, wire, server_epoch = make_path(seed)
    apps = [("127.0.0.1", 40000 + i) for i in range(3)]
    sent = {}  # payload -> the application that sent it
    data.route = random_route(rng, links)
    for step in range(40):
        for _ in range(rng.choice([1, 1, 2, 5, 20, 70])):  # one datagram, or a burst that batches
            app = rng.choice(apps)
            size = rng.choice([0, 1, 40, 200, 1200, 1400, rng.randrange(2000)])
            payload = b"%d/%d:" % (seed, len(sent)) + os.urandom(size)
            sent[payload] = app
            data.listen_sock.queue.append((payload, app))
        drain(reactor, data)
        if rng.random() < 0.3:
            data.route = random_route(rng, links)  # control, between wake-ups

    window = mpudp.ReplayWindow()
    by_seq = {}  # seq -> payload: copies carry one sequence number and the same bytes
    session_of = {}  # session id -> application
    for link_index, packet in wire:
        assert mpudp.verify(server_epoch.rx_mac, packet, len(packet)), "a packet left with a bad MAC"
        type_flags, link, _client, session, nonce = mpudp.parse_header(packet)
        assert link == link_index, "a packet names another link than the one it left by"
        assert type_flags & mpudp.TYPE_MASK == mpudp.TYPE_DATA and type_flags & mpudp.FLAG_ACTIVE
        payload = packet[mpudp.HEADER_SIZE:-mpudp.MAC_SIZE]
        assert payload in sent, "a datagram left that no application sent (corrupted or spliced)"
        assert session_of.setdefault(session, sent[payload]) == sent[payload], "two applications, one session"
        seq = nonce & mpudp.SEQ_MASK
        assert by_seq.setdefault(seq, payload) == payload, "one sequence number for two datagrams"
        window.mark(seq)
    assert len(set(by_seq.values())) == len(by_seq), "one datagram sent under two sequence numbers"
    assert wire, "nothing left at all: the test would prove nothing"


def test_a_send_error_moves_the_route_only_after_the_drain():
    """The regression of a8520ac: an error on the link's batch switched the route to two
    carriers in the middle of the drain, and later datagrams carried the stranded packet's
    bytes in front.  Now the drain stops at the error and leaves the rest unread; control
    moves the route after it, and only the refused datagram is lost."""
    rng, reactor, data, control, links, wire, server_epoch = make_path(1, error_rate=0.0)
    data.route = mpudp.Route((links[0],))
    first = {"failed": False}
    real_sendto = links[0].sock.sendto

    def fail_once(packet, addr):
        if not first["failed"]:
            first["failed"] = True
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
        return real_sendto(packet, addr)

    links[0].sock.sendto = fail_once
    moved = []
    control.on_send_error = lambda link, exc: (moved.append(reactor.in_drain),
                                               setattr(data, "route", mpudp.Route((links[1], links[2]))))
    data.listen_sock.queue.extend([(b"A" * 200, ("127.0.0.1", 1)), (b"B" * 50, ("127.0.0.1", 1))])
    drain(reactor, data)
    assert moved == [False], "control ran inside the drain, or never"
    assert [q[0] for q in data.listen_sock.queue] == [b"B" * 50]  # left unread for the new route
    drain(reactor, data)  # the socket is still readable: the loop comes back at once
    data.listen_sock.queue.append((b"C" * 40, ("127.0.0.1", 1)))
    drain(reactor, data)
    payloads = [(link, p[mpudp.HEADER_SIZE:-mpudp.MAC_SIZE]) for link, p in wire]
    assert payloads == [(1, b"B" * 50), (2, b"B" * 50), (1, b"C" * 40), (2, b"C" * 40)], payloads
    for _link, packet in wire:
        assert mpudp.verify(server_epoch.rx_mac, packet, len(packet))


class FakeReceiveSocket:
    """A link socket with datagrams waiting to be read."""

    def __init__(self, datagrams):
        self.datagrams = list(datagrams)

    def recvfrom_into(self, view):
        if not self.datagrams:
            raise BlockingIOError
        data = self.datagrams.pop(0)
        view[:len(data)] = data
        return len(data), SERVER


def test_an_echo_counts_only_for_the_link_it_names():
    """An on-path party copied link 1's echoes onto link 0's socket and kept a dead link 0
    up.  The echo names its link under the MAC: on another link's socket it is dropped."""
    rng, reactor, data, control, links, wire, server_epoch = make_path(2)
    echoes = []
    control.on_echo = lambda link, seq, bitmap, server_rx, server_tx, largest, up_queue: echoes.append((link.index, seq))
    echo = mpudp.seal(server_epoch.tx_mac, mpudp.TYPE_ECHO, 1, 0, 0, server_epoch.next_nonce(),
                      mpudp.ECHO_PAYLOAD.pack(7, 1, 0, 0, 0, 0))
    links[0].sock = FakeReceiveSocket([echo])
    data.on_link_readable(links[0])
    reactor.run_soon()
    assert echoes == [] and data.counters["wrong_link"] == 1
    links[1].sock = FakeReceiveSocket([mpudp.seal(server_epoch.tx_mac, mpudp.TYPE_ECHO, 1, 0, 0,
                                                  server_epoch.next_nonce(), mpudp.ECHO_PAYLOAD.pack(8, 1, 0, 0, 0, 0))])
    data.on_link_readable(links[1])
    assert echoes == [], "control must not run inside the drain"
    reactor.run_soon()
    assert echoes == [(1, 8)]
