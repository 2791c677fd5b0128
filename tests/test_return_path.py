"""The server's return path, driven packet by packet: which links replies (and their
copies, with redundancy) go back on, and that only authenticated, fresh packets move it.

A Server runs on a reactor in this process; the test is the client, with one UDP
socket per link, and the upstream, echoing by hand.  Packets are made with the
wire functions (seal) under keys from a real handshake.
"""

import os
import socket
import time

import pytest

from conftest import WAIT_S, keypair

import mpudp

LOOPBACK = "127.0.0.1"
DATA, HEARTBEAT, ACTIVE = mpudp.TYPE_DATA, mpudp.TYPE_HEARTBEAT, mpudp.FLAG_ACTIVE


def copies_flags(copies):
    return (copies - 1) << mpudp.COPIES_SHIFT


def udp_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.setblocking(False)
    return sock


def drain(sock):
    got = []
    while True:
        try:
            got.append(sock.recvfrom(65536))
        except BlockingIOError:
            return got


class ServerBench:
    """One Server in this process; `links[i]` is the test's socket for link i."""

    def __init__(self, links=3):
        self.log = mpudp.Log(stream=open(os.devnull, "w"))
        self.reactor = mpudp.Reactor(log=self.log)
        self.resolver = mpudp.Resolver(self.reactor)
        self.upstream = udp_socket()
        server_keys, client_keys = keypair(), keypair()
        section = mpudp.parse_config({"mode": "server", "server": {
            "listen_addr": "127.0.0.1:0", "upstream_addr": "%s:%d" % self.upstream.getsockname(),
            "server_private_key": server_keys[0], "client_public_keys": [client_keys[1]]}}).section
        self.server = mpudp.Server(section, self.reactor, self.log, self.resolver)
        self.server.start()
        self.address = self.server.listen_sock.getsockname()
        self.secret = section.static_secrets[0]
        self.links = [udp_socket() for _ in range(links)]
        self.upstream_seen = []
        self.epoch = self.handshake()

    def pump_until(self, predicate, timeout=WAIT_S):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            self.reactor.run_once(0.005)
            for data, source in drain(self.upstream):
                self.upstream_seen.append((data, source))
        return True

    def handshake(self):
        static = mpudp.StaticKeys(self.secret)
        nonce = os.urandom(mpudp.NONCE_SIZE)
        cookie = bytes(mpudp.NONCE_SIZE)
        sock = self.links[0]
        for _ in range(2):  # HELLO -> COOKIE, HELLO with the cookie -> WELCOME
            sock.sendto(mpudp.seal(static.hello_mac, mpudp.TYPE_HELLO, 0, 0, 0,
                                   mpudp.epoch_tag(nonce) << mpudp.SEQ_BITS,
                                   mpudp.HELLO_PAYLOAD.pack(nonce, cookie)), self.address)
            got = []
            assert self.pump_until(lambda: got.extend(drain(sock)) or got)
            packet = got[0][0]
            assert mpudp.verify(static.welcome_mac, packet, len(packet))
            _nonce, value = mpudp.WELCOME_PAYLOAD.unpack_from(packet, mpudp.HEADER_SIZE)
            if packet[0] & mpudp.TYPE_MASK == mpudp.TYPE_WELCOME:
                return mpudp.Epoch(self.secret, nonce, value, is_client=True)
            cookie = value
        raise AssertionError("no WELCOME")

    def send(self, link, type_flags, payload=b"", seq=None, mac=None):
        """A packet as the client would send it on `link`; its sequence number."""
        epoch = self.epoch
        if seq is None:
            epoch.tx_seq += 1
            seq = epoch.tx_seq
        packet = mpudp.seal(mac or epoch.tx_mac, type_flags, link, 0, 7, epoch.nonce_base | seq,
                            payload or mpudp.HEARTBEAT_PAYLOAD.pack(seq, 0))
        self.links[link].sendto(packet, self.address)
        return seq

    def announce(self, links):
        """What the client does when links start carrying: an ACTIVE heartbeat on each (a
        data copy that loses the race to another link is dropped unread, so data alone
        cannot tell the server about every carrier)."""
        for link in links:
            self.send(link, HEARTBEAT | ACTIVE | copies_flags(len(links)))

    def send_data(self, links, payload, copies=None):
        """One data packet on each of `links`, one sequence number for all copies."""
        self.epoch.tx_seq += 1
        seq = self.epoch.tx_seq
        for link in links:
            self.send(link, DATA | ACTIVE | copies_flags(copies or len(links)), payload, seq=seq)
        return seq

    def settle(self, count_before):
        """Pump until the server has taken `count_before` + this many packets in."""
        peer = self.server.peers[0]
        assert self.pump_until(lambda: peer.packets + sum(self.server.counters.values()) >= count_before)

    def taken(self):
        return self.server.peers[0].packets + sum(self.server.counters.values())

    def replies(self, payload, expected):
        """Send `payload` from the upstream to the session and wait until it came back on
        the `expected` links; {link: [packets]} of what arrived on every link by then."""
        session_source = next(source for data, source in self.upstream_seen)
        self.upstream.sendto(payload, session_source)
        got = {}

        def arrived():
            for i, sock in enumerate(self.links):
                for data, _ in drain(sock):
                    if data[0] & mpudp.TYPE_MASK == DATA:
                        got.setdefault(i, []).append(data)
            return set(expected) <= set(got)

        assert self.pump_until(arrived), got
        return got

    def close(self):
        self.server.close()
        self.resolver.close()
        self.reactor.close()
        for sock in self.links + [self.upstream]:
            sock.close()


@pytest.fixture
def bench():
    made = ServerBench()
    yield made
    made.close()


def return_links(bench):
    return sorted(link for link, _addr in bench.server.peers[0].return_path.links)


def test_copies_go_upstream_once_and_replies_come_back_on_every_carrier(bench):
    before = bench.taken()
    bench.announce([0, 1])
    bench.send_data([0, 1], b"hello")
    bench.settle(before + 4)
    assert [data for data, _ in bench.upstream_seen] == [b"hello"]
    assert bench.server.counters["duplicate"] == 1
    assert return_links(bench) == [0, 1]

    got = bench.replies(b"reply", [0, 1])
    assert sorted(got) == [0, 1]
    (first,), (second,) = got[0], got[1]
    assert first == second  # the same bytes: one MAC, sent twice
    assert mpudp.verify(bench.epoch.rx_mac, first, len(first))
    assert first[mpudp.HEADER_SIZE:-mpudp.MAC_SIZE] == b"reply"


def carry_on_links_0_and_1(bench):
    """The client starts sending copies on links 0 and 1: the server answers on both."""
    before = bench.taken()
    bench.announce([0, 1])
    bench.send_data([0, 1], b"a")
    bench.settle(before + 4)
    assert return_links(bench) == [0, 1]


def test_return_links_follow_the_newest_active_packets(bench):
    carry_on_links_0_and_1(bench)
    # The client's carriers become links 1 and 2 (link 0 died): a heartbeat on the new
    # one, data on both.  Link 0's last ACTIVE packet is now the oldest.
    before = bench.taken()
    bench.send(2, HEARTBEAT | ACTIVE | copies_flags(2))
    bench.send_data([1, 2], b"b")
    bench.settle(before + 3)
    assert return_links(bench) == [1, 2]
    assert sorted(bench.replies(b"r", [1, 2])) == [1, 2]


def test_one_copy_again_means_one_return_link(bench):
    carry_on_links_0_and_1(bench)
    before = bench.taken()
    bench.send_data([1], b"b")  # redundancy over: copies 1, on link 1
    bench.settle(before + 1)
    assert return_links(bench) == [1]
    assert sorted(bench.replies(b"r", [1])) == [1]


def test_a_late_active_packet_does_not_move_the_return_path_back(bench):
    """Numbered before the switch to link 1, delayed on link 2: accepted (it is fresh and
    authentic) but older than link 1's packet, so replies stay on link 1."""
    before = bench.taken()
    base = bench.epoch.tx_seq
    bench.send(0, DATA | ACTIVE, b"a", seq=base + 1)
    bench.send(1, DATA | ACTIVE, b"c", seq=base + 3)
    bench.settle(before + 2)
    assert return_links(bench) == [1]
    before = bench.taken()
    bench.send(2, DATA | ACTIVE, b"b", seq=base + 2)
    bench.settle(before + 1)
    assert sorted(data for data, _ in bench.upstream_seen) == [b"a", b"b", b"c"]
    assert return_links(bench) == [1]
    assert sorted(bench.replies(b"r", [1])) == [1]


def test_forged_or_replayed_packets_do_not_move_the_return_path(bench):
    before = bench.taken()
    seq = bench.send_data([0], b"a")
    bench.settle(before + 1)
    wrong_mac = mpudp.make_mac(os.urandom(32))
    before = bench.taken()
    bench.send(1, DATA | ACTIVE | copies_flags(2), b"forged", mac=wrong_mac)  # new link, more copies
    bench.send(2, DATA | ACTIVE | copies_flags(3), b"a", seq=seq)  # a copy of seq, replayed on link 2
    bench.settle(before + 2)
    assert bench.server.counters["auth"] == 1 and bench.server.counters["duplicate"] == 1
    assert return_links(bench) == [0]
    assert [data for data, _ in bench.upstream_seen] == [b"a"]
    assert sorted(bench.replies(b"r", [0])) == [0]


def test_a_slower_carrying_link_is_answered_on_too(bench):
    """Redundancy over a fast and a slow link: the slow link's packets always arrive
    after newer ones from the fast link (its data copies are dropped as duplicates
    unread), yet it carries, so replies must go there too."""
    before = bench.taken()
    base = bench.epoch.tx_seq
    bench.send(0, DATA | ACTIVE | copies_flags(2), b"a", seq=base + 2)  # fast link, newer
    bench.send(1, HEARTBEAT | ACTIVE | copies_flags(2), seq=base + 1)  # slow link's heartbeat, older
    bench.epoch.tx_seq = base + 2
    bench.settle(before + 2)
    assert return_links(bench) == [0, 1]
    assert sorted(bench.replies(b"r", [0, 1])) == [0, 1]
    # Its own older packets never move a link's address back.
    stale = bench.server.peers[0].return_path._carriers[1]
    before = bench.taken()
    bench.send(1, HEARTBEAT | ACTIVE | copies_flags(2), seq=base + 1)  # a replay: refused
    bench.settle(before + 1)
    assert bench.server.peers[0].return_path._carriers[1] == stale
