"""Segmentation offload: SendBatch (UDP_SEGMENT) and coalesced receives (UDP_GRO).

SendBatch is driven with a recording socket (which packets went out in which
call, and what happens when the kernel refuses), then with real loopback
sockets; a burst through an in-process relay checks that batching and
coalescing change nothing the applications see.
"""

import errno
import socket

import pytest

from conftest import WAIT_S

import mpudp

linux_offload = pytest.mark.skipif(not mpudp.GSO_AVAILABLE, reason="UDP_SEGMENT/UDP_GRO are Linux-only")


class RecordingSocket:
    """Records sends as (kind, bytes, segment size); `refuse` makes sendmsg fail with an errno."""

    def __init__(self, refuse=None, full=False):
        self.sent = []
        self.refuse = refuse
        self.full = full

    def sendto(self, data, addr):
        if self.full:
            raise BlockingIOError(errno.EAGAIN, "full")
        self.sent.append(("sendto", bytes(data), None, addr))

    def sendmsg(self, buffers, ancdata, flags, addr):
        if self.full:
            raise BlockingIOError(errno.EAGAIN, "full")
        if self.refuse:
            raise OSError(self.refuse, "refused")
        (level, kind, value), = ancdata
        assert (level, kind) == (socket.IPPROTO_UDP, mpudp.UDP_SEGMENT)
        self.sent.append(("gso", bytes(buffers[0]), mpudp.SEGMENT_SIZE.unpack(value)[0], addr))


ADDR = ("127.0.0.1", 9)


def batch_for(sock, enabled=True, addrs=(ADDR,)):
    """A batch in the middle of a drain: its first packet (sent at once) is behind it."""
    errors = []
    batch = mpudp.SendBatch(mpudp.Counters())
    batch.enabled = enabled
    batch.aim(sock, list(addrs), errors.append)
    batch.eager = False
    return batch, errors


def put(batch, data):
    """What a data path does: write a packet at `end` (sealed in real life) and push it."""
    batch.buf[batch.end:batch.end + len(data)] = data
    batch.push(len(data))


def packets(n, size, first=0):
    return [bytes([first + i]) * size for i in range(n)]


def test_packets_of_one_size_leave_in_one_call():
    sock = RecordingSocket()
    batch, errors = batch_for(sock)
    for p in packets(5, 100):
        put(batch, p)
    assert sock.sent == []  # nothing until the drain ends
    batch.flush()
    assert sock.sent == [("gso", b"".join(packets(5, 100)), 100, ADDR)]
    assert batch.sent_bytes == 500 and errors == []


def test_the_first_packet_after_aim_leaves_at_once_and_the_rest_wait_for_the_drain_end():
    """At light load a drain holds one packet: it must not wait for the drain's last
    receive.  Packets behind it were queued meanwhile, and they are the batch."""
    sock = RecordingSocket()
    batch = mpudp.SendBatch(mpudp.Counters())
    batch.aim(sock, [ADDR], pytest.fail)
    first, rest = packets(3, 100)[0], packets(3, 100)[1:]
    put(batch, first)
    assert sock.sent == [("sendto", first, None, ADDR)]
    for p in rest:
        put(batch, p)
    assert len(sock.sent) == 1
    batch.flush()
    assert sock.sent[1:] == [("gso", b"".join(rest), 100, ADDR)]
    # The next drain aims again: its first packet goes at once too.
    batch.aim(sock, [ADDR], pytest.fail)
    put(batch, b"n" * 100)
    assert sock.sent[-1] == ("sendto", b"n" * 100, None, ADDR) and batch.sent_bytes == 400


def test_append_sends_the_first_payload_from_where_it_is_and_copies_the_rest():
    sock = RecordingSocket()
    batch = mpudp.SendBatch(mpudp.Counters())
    batch.aim(sock, [ADDR, ("127.0.0.1", 10)], pytest.fail)
    source = bytearray(b"a" * 50 + b"b" * 50 + b"c" * 50)
    view = memoryview(source)
    batch.append(view[:50])
    assert sock.sent == [("sendto", b"a" * 50, None, ADDR), ("sendto", b"a" * 50, None, ("127.0.0.1", 10))]
    assert batch.count == 0 and batch.end == 0  # nothing was copied into the batch
    batch.append(view[50:100])
    batch.append(view[100:])
    source[:] = b"z" * 150  # the batch holds its own copies of those two
    batch.flush()
    assert sock.sent[2:] == [("gso", b"b" * 50 + b"c" * 50, 50, addr) for addr in (ADDR, ("127.0.0.1", 10))]
    assert batch.sent_bytes == 2 * 150


def test_a_first_payload_that_cannot_leave_is_counted_or_reported():
    full = mpudp.SendBatch(mpudp.Counters(), "local_full")
    full.aim(RecordingSocket(full=True), [ADDR], pytest.fail)
    full.append(memoryview(b"p" * 10))
    assert full.counters["local_full"] == 1 and full.sent_bytes == 0

    class Refusing(RecordingSocket):
        def sendto(self, data, addr):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    errors = []
    refused = mpudp.SendBatch(mpudp.Counters())
    refused.aim(Refusing(), [ADDR], errors.append)
    refused.append(memoryview(b"p" * 10))
    assert [e.errno for e in errors] == [errno.ECONNREFUSED]


def test_a_single_packet_is_a_plain_sendto():
    sock = RecordingSocket()
    batch, _ = batch_for(sock)
    put(batch, b"x" * 40)
    batch.flush()
    batch.flush()  # empty: nothing
    assert sock.sent == [("sendto", b"x" * 40, None, ADDR)]


def test_a_shorter_packet_ends_the_batch_and_a_longer_one_starts_the_next():
    sock = RecordingSocket()
    batch, _ = batch_for(sock)
    first, second = packets(3, 100), packets(2, 200, first=10)
    for p in first:
        put(batch, p)
    put(batch, b"s" * 60)  # shorter: it may be the last segment, and the batch goes at once
    assert sock.sent == [("gso", b"".join(first) + b"s" * 60, 100, ADDR)]
    for p in second:
        put(batch, p)
    put(batch, b"L" * 300)  # longer than the batch's segments: the batch goes, it starts anew
    batch.flush()
    assert sock.sent[1:] == [("gso", b"".join(second), 200, ADDR), ("sendto", b"L" * 300, None, ADDR)]


def test_a_batch_holds_at_most_64_segments_and_one_datagram_of_bytes():
    sock = RecordingSocket()
    batch, _ = batch_for(sock)
    for p in packets(70, 10):
        put(batch, p)
    batch.flush()
    assert [(kind, len(data) // 10) for kind, data, _seg, _addr in sock.sent] == [("gso", 64), ("gso", 6)]
    sock.sent.clear()
    for i in range(50):
        put(batch, bytes([i]) * 1400)
    batch.flush()
    sizes = [len(data) for _kind, data, _seg, _addr in sock.sent]
    assert max(sizes) <= mpudp.GSO_MAX_BYTES and sum(sizes) == 50 * 1400
    assert b"".join(data for _kind, data, _seg, _addr in sock.sent) == b"".join(bytes([i]) * 1400 for i in range(50))


def test_there_is_always_room_for_the_largest_datagram():
    """Whatever was batched, the next receive can take a whole datagram (never truncated)."""
    sock = RecordingSocket()
    batch, _ = batch_for(sock)
    for size in (65000, mpudp.MAX_UDP_PAYLOAD, 100, 100, 64000, 1200, 1200, 1200):
        assert len(batch.room()) == mpudp.MAX_DATA_PAYLOAD + 1, (size, batch.end)
        put(batch, b"z" * size)
    batch.flush()
    assert b"".join(data for _kind, data, _seg, _addr in sock.sent) == b"".join(
        b"z" * size for size in (65000, mpudp.MAX_UDP_PAYLOAD, 100, 100, 64000, 1200, 1200, 1200))


def test_every_address_gets_the_batch():
    sock = RecordingSocket()
    batch, _ = batch_for(sock, addrs=(ADDR, ("127.0.0.1", 10)))
    for p in packets(2, 50):
        put(batch, p)
    batch.flush()
    assert [addr for _k, _d, _s, addr in sock.sent] == [ADDR, ("127.0.0.1", 10)]


def test_off_means_one_packet_per_call():
    sock = RecordingSocket()
    batch, _ = batch_for(sock, enabled=False)
    for p in packets(3, 100):
        put(batch, p)
    assert [kind for kind, *_ in sock.sent] == ["sendto"] * 3


@pytest.mark.parametrize("refusal, stays_on", [(errno.EINVAL, True), (errno.EIO, True),
                                              (errno.ENOPROTOOPT, False), (errno.EOPNOTSUPP, False)])
def test_a_refused_batch_goes_packet_by_packet_and_is_remembered(refusal, stays_on):
    sock = RecordingSocket(refuse=refusal)
    batch, errors = batch_for(sock)
    for p in packets(4, 1500):
        put(batch, p)
    batch.flush()
    assert sock.sent == [("sendto", p, None, ADDR) for p in packets(4, 1500)]
    assert errors == [] and batch.counters["gso_refused"] == 1 and batch.sent_bytes == 6000
    # A segment that size (e.g. above the path MTU) is not batched again; smaller ones are,
    # unless the kernel has no UDP_SEGMENT at all.
    assert batch.enabled is stays_on and batch.max_seg == 1499
    sock.sent.clear()
    for p in packets(2, 1500):
        put(batch, p)
    assert [kind for kind, *_ in sock.sent] == ["sendto", "sendto"]


def test_a_full_socket_counts_every_packet_of_the_batch():
    sock = RecordingSocket(full=True)
    batch, errors = batch_for(sock)
    for p in packets(5, 100):
        put(batch, p)
    batch.flush()
    assert batch.counters["tx_full"] == 5 and errors == [] and batch.sent_bytes == 0


def test_other_errors_go_to_the_owner():
    class Broken(RecordingSocket):
        def sendmsg(self, *args):
            raise OSError(errno.ENETUNREACH, "Network is unreachable")

    batch, _ = batch_for(Broken())
    errors = []
    # The batch is empty when its owner hears of the error, and says it failed: the
    # client's drain stops there and leaves the rest unread for the next route.
    batch.on_error = lambda exc: errors.append((exc.errno, batch.count, batch.end))
    for p in packets(3, 100):
        put(batch, p)
    batch.flush()
    assert errors == [(errno.ENETUNREACH, 0, 0)] and batch.failed
    batch.aim(Broken(), [ADDR], errors.append)
    assert not batch.failed  # until the next error


# -- the kernel's side, on loopback -----------------------------------------------


def loopback_socket(gro=False):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    if gro:
        assert mpudp.enable_gro(sock)
    return sock


def receive_all(sock, expected_bytes, gro):
    """(datagrams, receive calls) until `expected_bytes` arrived; coalesced ones split."""
    sock.settimeout(WAIT_S)
    buf = bytearray(70000)
    got, calls = [], 0
    while sum(map(len, got)) < expected_bytes:
        if gro:
            n, ancdata, _flags, _addr = sock.recvmsg_into([buf], mpudp.GRO_CMSG_SPACE)
            seg = mpudp.gro_segment_size(ancdata, n) if ancdata else n
        else:
            n = seg = sock.recv_into(buf)
        calls += 1
        got.extend(bytes(buf[off:min(off + seg, n)]) for off in range(0, n, seg))
    return got, calls


@linux_offload
@pytest.mark.parametrize("gro", [False, True])
def test_the_receiver_gets_the_same_datagrams(gro):
    sender, receiver = loopback_socket(), loopback_socket(gro)
    try:
        batch = mpudp.SendBatch(mpudp.Counters())
        batch.aim(sender, [receiver.getsockname()], pytest.fail)
        sent = packets(20, 1200) + [b"t" * 700]
        for p in sent:
            put(batch, p)
        batch.flush()
        got, calls = receive_all(receiver, sum(map(len, sent)), gro)
        assert got == sent
        assert batch.counters.get("gso_refused", 0) == 0
        if gro:
            assert calls < len(sent)  # coalesced: the batch came in one receive (or a few)
        else:
            assert calls == len(sent)  # the kernel cut it into ordinary datagrams
    finally:
        sender.close()
        receiver.close()


def test_gro_segment_size_reads_the_control_message():
    value = mpudp.GRO_SIZE.pack(1232)
    assert mpudp.gro_segment_size([(socket.IPPROTO_UDP, mpudp.UDP_GRO, value)], 5000) == 1232
    assert mpudp.gro_segment_size([(socket.IPPROTO_UDP, mpudp.UDP_GRO, value)], 1232) == 1232
    assert mpudp.gro_segment_size([(socket.IPPROTO_UDP, mpudp.UDP_GRO, b"\0")], 5000) == 5000  # malformed
    assert mpudp.gro_segment_size([(socket.SOL_SOCKET, 1, value)], 5000) == 5000  # someone else's
    assert mpudp.gro_segment_size([(socket.IPPROTO_UDP, mpudp.UDP_GRO, mpudp.GRO_SIZE.pack(0))], 50) == 50


@linux_offload
def test_a_burst_through_the_relay_arrives_whole_and_in_order(rig):
    """64 datagrams at once from an application: the client seals them into one batch for
    the link, the server takes them in with one coalesced receive and hands them to the
    upstream in one call, the replies go back the same way; the application gets each
    reply once, in order."""
    r = rig()
    sent = [b"burst-%03d-" % i + b"x" * 1000 for i in range(64)]
    for payload in sent:
        r.app.sendto(payload, r.client_addr)
    got = []

    def all_back():
        while True:
            try:
                got.append(r.app.recv(65536))
            except BlockingIOError:
                return len(got) >= len(sent)

    assert r.settle(all_back), "%d of %d replies" % (len(got), len(sent))
    assert got == sent
    assert r.upstream_payloads() == sent
    # Each hop batched: app -> link (client), link -> upstream and upstream -> link
    # (server), link -> app (client).
    assert r.client.data._batch.gso_sends >= 1 and r.server.data._batch.gso_sends >= 1
    assert r.server.data._upstream_batch.gso_sends >= 1 and r.client.data._app_batch.gso_sends >= 1
    assert r.server.counters.get("auth", 0) == 0 and r.client.counters.get("auth", 0) == 0


@linux_offload
def test_interleaved_bursts_of_two_applications_stay_apart(rig):
    """Two applications' datagrams alternate in one burst: a batch holds one session's
    packets in a row, so every change of session sends what was gathered; each application
    gets exactly its own replies, in order."""
    r = rig()
    other = r.socket()
    apps = [r.app, other]
    sent = {0: [], 1: []}
    for i in range(40):
        which = (i // 3) % 2  # runs of three from each
        payload = b"app%d-%03d-" % (which, i) + b"y" * 500
        sent[which].append(payload)
        apps[which].sendto(payload, r.client_addr)
    got = {0: [], 1: []}

    def all_back():
        for which, app in enumerate(apps):
            while True:
                try:
                    got[which].append(app.recv(65536))
                except BlockingIOError:
                    break
        return all(len(got[w]) >= len(sent[w]) for w in got)

    assert r.settle(all_back), {w: len(got[w]) for w in got}
    assert got == sent
