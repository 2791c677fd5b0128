"""The server's return path, driven packet by packet: which links replies (and their
copies, with redundancy) go back on, and that only authenticated, fresh packets move it.

A Server runs on a reactor in this process; the test is the client, with one UDP
socket per link, and the upstream, echoing by hand.  Packets are made with the
wire functions (seal) under keys from a real handshake.
"""

import os

import mpudp

DATA, HEARTBEAT, ACTIVE = mpudp.TYPE_DATA, mpudp.TYPE_HEARTBEAT, mpudp.FLAG_ACTIVE


def copies_flags(copies):
    return (copies - 1) << mpudp.COPIES_SHIFT


def announce(bench, links):
    """What the client does when links start carrying: an ACTIVE heartbeat on each (a
    data copy that loses the race to another link is dropped unread, so data alone
    cannot tell the server about every carrier)."""
    for link in links:
        bench.send(link, HEARTBEAT | ACTIVE | copies_flags(len(links)))


def send_data(bench, links, payload, copies=None):
    """One data packet on each of `links`, one sequence number for all copies."""
    bench.epoch.tx_seq += 1
    seq = bench.epoch.tx_seq
    for link in links:
        bench.send(link, DATA | ACTIVE | copies_flags(copies or len(links)), payload, seq=seq)
    return seq


def return_links(bench):
    return sorted(link for link, _addr in bench.server.peers[0].return_path.links)


def test_copies_go_upstream_once_and_replies_come_back_on_every_carrier(bench):
    before = bench.taken()
    announce(bench, [0, 1])
    send_data(bench, [0, 1], b"hello")
    bench.until_taken(before + 4)
    assert bench.upstream_payloads() == [b"hello"]
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
    announce(bench, [0, 1])
    send_data(bench, [0, 1], b"a")
    bench.until_taken(before + 4)
    assert return_links(bench) == [0, 1]


def test_return_links_follow_the_newest_active_packets(bench):
    carry_on_links_0_and_1(bench)
    # The client's carriers become links 1 and 2 (link 0 died): a heartbeat on the new
    # one, data on both.  Link 0's last ACTIVE packet is now the oldest.
    before = bench.taken()
    bench.send(2, HEARTBEAT | ACTIVE | copies_flags(2))
    send_data(bench, [1, 2], b"b")
    bench.until_taken(before + 3)
    assert return_links(bench) == [1, 2]
    assert sorted(bench.replies(b"r", [1, 2])) == [1, 2]


def test_one_copy_again_means_one_return_link(bench):
    carry_on_links_0_and_1(bench)
    before = bench.taken()
    send_data(bench, [1], b"b")  # redundancy over: copies 1, on link 1
    bench.until_taken(before + 1)
    assert return_links(bench) == [1]
    assert sorted(bench.replies(b"r", [1])) == [1]


def test_a_late_active_packet_does_not_move_the_return_path_back(bench):
    """Numbered before the switch to link 1, delayed on link 2: accepted (it is fresh and
    authentic) but older than link 1's packet, so replies stay on link 1."""
    before = bench.taken()
    base = bench.epoch.tx_seq
    bench.send(0, DATA | ACTIVE, b"a", seq=base + 1)
    bench.send(1, DATA | ACTIVE, b"c", seq=base + 3)
    bench.until_taken(before + 2)
    assert return_links(bench) == [1]
    before = bench.taken()
    bench.send(2, DATA | ACTIVE, b"b", seq=base + 2)
    bench.until_taken(before + 1)
    assert sorted(bench.upstream_payloads()) == [b"a", b"b", b"c"]
    assert return_links(bench) == [1]
    assert sorted(bench.replies(b"r", [1])) == [1]


def test_forged_or_replayed_packets_do_not_move_the_return_path(bench):
    before = bench.taken()
    seq = send_data(bench, [0], b"a")
    bench.until_taken(before + 1)
    wrong_mac = mpudp.make_mac(os.urandom(32))
    before = bench.taken()
    bench.send(1, DATA | ACTIVE | copies_flags(2), b"forged", mac=wrong_mac)  # new link, more copies
    bench.send(2, DATA | ACTIVE | copies_flags(3), b"a", seq=seq)  # a copy of seq, replayed on link 2
    bench.until_taken(before + 2)
    assert bench.server.counters["auth"] == 1 and bench.server.counters["duplicate"] == 1
    assert return_links(bench) == [0]
    assert bench.upstream_payloads() == [b"a"]
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
    bench.until_taken(before + 2)
    assert return_links(bench) == [0, 1]
    assert sorted(bench.replies(b"r", [0, 1])) == [0, 1]
    # Its own older packets never move a link's address back.
    stale = bench.server.peers[0].return_path._carriers[1]
    before = bench.taken()
    bench.send(1, HEARTBEAT | ACTIVE | copies_flags(2), seq=base + 1)  # a replay: refused
    bench.until_taken(before + 1)
    assert bench.server.peers[0].return_path._carriers[1] == stale
